"""Cassandra, the CQL native protocol v3-v5 (Cassandra's doc/native_protocol_v*.spec).

A message (an "envelope") is a 9-byte header — version (a response's with the high bit set),
flags, stream id (int16), opcode, body length (int32) — and its body. A client has many requests
in flight on one connection, each under its own stream id, answered in any order: a CQL
connection is a stream connection (contract.h), every read and write comes to `feed`, and a
request waits under its stream id until the response with that id. In v5, once the STARTUP
handshake is done, envelopes travel inside segments: a 3-byte little-endian header (payload
length, 17 bits, and a self-contained flag) with its CRC24, the payload (whole envelopes, or
part of one large envelope), and a CRC32. When the STARTUP asked for LZ4, segments are
compressed: a 5-byte header (payload length, uncompressed length, 17 bits each, the flag) with
its CRC24 over those 5 bytes, the payload an LZ4 block (an uncompressed length of 0: stored as
is), a CRC32. A segment is told from an envelope by its header's CRC24 (either header's). A
compressed payload is decompressed (cramjam's LZ4 block decoder, never to more than the header's
uncompressed length, at most 128 KiB) when it was captured whole: one the capture cut (a segment
larger than what the kernel copies of a call) or that does not decode is not read, nor are v4's
compressed envelopes (their requests are not counted; a compressed envelope's status is still
its opcode's).

Counted, as the node agent counts them: QUERY, EXECUTE and BATCH, "ok" for a RESULT, "failed"
for an ERROR (its code, in the spec's hex, is the span's message). PREPARE is not counted; its
RESULT's prepared id names the statement of later EXECUTEs (per process, bounded). Statements
have their literals masked (quoted strings, numbers, blobs, UUIDs) unless masking is off. Spans
(the node agent makes none for CQL): "query", db.system "cassandra", db.statement; only for
requests whose statement is known."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import cramjam

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.framing import Frame, Framer
from agent.l7.sql import mask_literals

ERROR, STARTUP, READY, OPTIONS, QUERY, RESULT, PREPARE, EXECUTE, REGISTER, BATCH = (
    0x00, 0x01, 0x02, 0x05, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D)
COUNTED = {QUERY: "QUERY", EXECUTE: "EXECUTE", BATCH: "BATCH"}
F_COMPRESSED, F_TRACING, F_CUSTOM, F_WARNING = 0x01, 0x02, 0x04, 0x08
RESULT_PREPARED = 4
MAX_BODY = 256 * 1024 * 1024  # L7_CQL_MAX_BODY
MAX_PENDING = 1024  # requests of one connection waiting (the protocol allows 32,768 stream ids)
MAX_CONNECTIONS = 4096
MAX_PREPARED = 10_000  # prepared statements remembered, over all processes
MAX_BATCH = 64  # statements of a batch shown in its span
SEGMENT_HEADER, SEGMENT_CRC = 3, 4  # a v5 segment: 3 bytes + CRC24 (3), payload, CRC32 (4)
COMPRESSED_HEADER = 5  # a compressed v5 segment's header: 5 bytes + CRC24 (3)
MAX_SEGMENT = 0x1FFFF  # a segment's payload, compressed or not, is at most 128 KiB - 1
CRC24_INIT, CRC24_POLY = 0x875060, 0x1974F0B

_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")


def crc24(value: int, length: int = SEGMENT_HEADER) -> int:
    """A v5 segment header's CRC24 (of its `length` little-endian bytes)."""
    crc = CRC24_INIT
    for _ in range(length):
        crc ^= (value & 0xFF) << 16
        value >>= 8
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= CRC24_POLY
    return crc & 0xFFFFFF


def segment_payload(head: bytes) -> tuple[int, bool] | None:
    """(payload length, self-contained) of an uncompressed v5 segment header, or None."""
    if len(head) < SEGMENT_HEADER + 3:
        return None
    value = int.from_bytes(head[:3], "little")
    if crc24(value) != int.from_bytes(head[3:6], "little"):
        return None
    return value & 0x1FFFF, bool(value >> 17 & 1)


@dataclass(frozen=True)
class SegmentHeader:
    length: int  # the payload's on the wire
    uncompressed: int  # its length decompressed; 0: not compressed
    self_contained: bool
    size: int  # the header's with its CRC24: 6, or 8 when compressed


def segment_header(head: bytes) -> SegmentHeader | None:
    """An uncompressed or a compressed v5 segment's header, from its first 8 bytes, or None."""
    seg = segment_payload(head)
    if seg is not None:
        return SegmentHeader(seg[0], 0, seg[1], SEGMENT_HEADER + 3)
    if len(head) < COMPRESSED_HEADER + 3:
        return None
    value = int.from_bytes(head[:COMPRESSED_HEADER], "little")
    if crc24(value, COMPRESSED_HEADER) != int.from_bytes(head[COMPRESSED_HEADER:COMPRESSED_HEADER + 3], "little"):
        return None
    return SegmentHeader(value & MAX_SEGMENT, value >> 17 & MAX_SEGMENT, bool(value >> 34 & 1), COMPRESSED_HEADER + 3)


def decompress(payload: bytes, uncompressed: int) -> bytes | None:
    """A compressed segment's payload (an LZ4 block, whole) decompressed to its `uncompressed`
    length (at most MAX_SEGMENT; the decoder writes no more), or None if it does not decode so."""
    if not 0 < uncompressed <= MAX_SEGMENT:
        return None
    out = bytearray(uncompressed)  # the decoder fails rather than write past it
    try:
        n = cramjam.lz4.decompress_block_into(payload, out)
    except (cramjam.DecompressionError, ValueError, OverflowError):
        return None
    return bytes(out) if n == uncompressed else None


def envelope_size(head: bytes) -> int | None:
    """An envelope's size with its header, from its first 9 bytes, or None."""
    if len(head) < 9 or not 3 <= head[0] & 0x7F <= 5 or head[1] > 0x1F or head[4] > 0x10:
        return None
    n = int.from_bytes(head[5:9], "big")
    return 9 + n if n <= MAX_BODY else None


def _frame_size(head: bytes) -> int | None:
    seg = segment_header(head)
    if seg is not None:
        return seg.size + seg.length + SEGMENT_CRC
    return envelope_size(head)


@dataclass(frozen=True)
class Envelope:
    version: int
    flags: int
    stream: int
    opcode: int
    body: bytes  # as far as it was captured
    length: int  # the body's length on the wire


def envelopes(data: bytes) -> list[Envelope]:
    """The envelopes that begin in `data` (a message, or a self-contained segment's payload)."""
    out: list[Envelope] = []
    pos = 0
    while pos + 9 <= len(data):
        size = envelope_size(data[pos:pos + 9])
        if size is None:
            break
        h = data[pos:pos + 9]
        out.append(Envelope(h[0], h[1], int.from_bytes(h[2:4], "big", signed=True), h[4],
                            data[pos + 9:pos + size], size - 9))
        pos += size
    return out


class Short(Exception):
    """The bytes end before the field."""


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        if self.pos + n > len(self.data):
            raise Short
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def int_(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big", signed=True)

    def string(self) -> str:
        return self.take(self.int_(2)).decode("utf-8", "replace")

    def long_string(self, cut: bool = True) -> str:
        """A [long string]; with `cut`, as much of it as was captured."""
        n = self.int_(4)
        if n < 0:
            raise ValueError("negative length")
        if cut and self.pos + n > len(self.data):
            n = len(self.data) - self.pos
        return self.take(n).decode("utf-8", "replace")

    def short_bytes(self) -> bytes:
        return self.take(self.int_(2))

    def value(self) -> None:
        n = self.int_(4)
        if n > 0:
            self.take(n)

    def prefix(self, flags: int, response: bool) -> None:
        """What a body carries before its message: tracing id, warnings, custom payload."""
        if response and flags & F_TRACING:
            self.take(16)
        if response and flags & F_WARNING:
            for _ in range(self.int_(2)):
                self.string()
        if flags & F_CUSTOM:
            for _ in range(self.int_(2)):
                self.string()
                self.value()


def mask(cql: str) -> str:
    """CQL with its literals masked: SQL's (agent/l7/sql.py), and unquoted UUIDs."""
    return mask_literals(_UUID.sub("?", cql))


@dataclass(frozen=True)
class Call:
    """A request's opcode and what it runs: a statement, or a prepared id to look up."""

    opcode: int
    statement: str = ""
    prepared_id: bytes = b""
    batch: tuple[str | bytes, ...] = ()


def parse_request(e: Envelope) -> Call | None:
    """A QUERY, PREPARE, EXECUTE or BATCH (not masked), or None."""
    if e.version & 0x80 or e.opcode not in (QUERY, PREPARE, EXECUTE, BATCH):
        return None
    if e.flags & F_COMPRESSED:
        return Call(e.opcode)
    r = Reader(e.body)
    items: list[str | bytes] = []
    try:
        r.prefix(e.flags, False)
        if e.opcode in (QUERY, PREPARE):
            return Call(e.opcode, r.long_string())
        if e.opcode == EXECUTE:
            return Call(e.opcode, prepared_id=r.short_bytes())
        r.take(1)  # the batch's type
        for _ in range(min(r.int_(2), MAX_BATCH)):
            kind = r.take(1)[0]
            items.append(r.long_string() if kind == 0 else r.short_bytes())
            for _ in range(r.int_(2)):
                r.value()
        return Call(e.opcode, batch=tuple(items))
    except (Short, ValueError):
        return Call(e.opcode) if e.opcode != BATCH else Call(e.opcode, batch=tuple(items))


@dataclass(frozen=True)
class Reply:
    status: str
    error: str = ""
    prepared_id: bytes = b""


def parse_response(e: Envelope) -> Reply | None:
    """A RESULT ("ok", with a prepared id) or an ERROR ("failed", its code), or None."""
    if not e.version & 0x80 or e.opcode not in (RESULT, ERROR):
        return None
    if e.flags & F_COMPRESSED:
        return Reply("ok" if e.opcode == RESULT else "failed")
    r = Reader(e.body)
    try:
        r.prefix(e.flags, True)
        if e.opcode == ERROR:
            return Reply("failed", f"{r.int_(4) & 0xFFFFFFFF:04x}")
        if r.int_(4) == RESULT_PREPARED:
            return Reply("ok", prepared_id=r.short_bytes())
    except (Short, ValueError):
        pass
    return Reply("ok" if e.opcode == RESULT else "failed")


@dataclass
class Side:
    """One direction of a connection: its framing, and the rest of a large v5 envelope."""

    framer: Framer = field(default_factory=lambda: Framer(9, _frame_size))
    rest: int = 0  # bytes of an envelope split over segments still to come

    def messages(self, f: Frame) -> list[Envelope]:
        seg = segment_header(f.data)
        if seg is None:
            return envelopes(f.data)
        payload, length, whole = f.data[seg.size:seg.size + seg.length], seg.length, seg.self_contained
        if seg.uncompressed:
            length = seg.uncompressed
            if not whole and self.rest > 0:  # a later part of a large envelope: nothing to read
                self.rest = max(self.rest - length, 0)
                return []
            if len(payload) < seg.length:  # cut by the capture: an LZ4 block decodes only whole
                self.rest = 0
                return []
            decoded = decompress(payload, seg.uncompressed)
            if decoded is None:
                self.rest = 0
                return []
            payload = decoded
        if whole:
            self.rest = 0
            return envelopes(payload)
        if self.rest > 0:  # a later part of a large envelope
            self.rest = max(self.rest - length, 0)
            return []
        found = envelopes(payload)
        if found:
            self.rest = max(9 + found[0].length - length, 0)
        return found[:1]


@dataclass
class Pending:
    call: Call
    ts_ns: int


@dataclass
class Connection:
    client: Side = field(default_factory=Side)
    server: Side = field(default_factory=Side)
    pending: p.Lru[int, Pending] = field(default_factory=lambda: p.Lru(MAX_PENDING))  # by stream id


def message(opcode: int, stream: int, body: bytes = b"", version: int = 4, flags: int = 0) -> bytes:
    """An envelope's bytes (a response's version has the high bit set; samples and tests)."""
    return bytes([version, flags]) + stream.to_bytes(2, "big", signed=True) + bytes([opcode]) + \
        len(body).to_bytes(4, "big") + body


def long_string(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(4, "big") + raw


def query(stream: int, cql: str, version: int = 4) -> bytes:
    """A QUERY at consistency ONE with no other parameters."""
    params = b"\0\x01" + (b"\0\0\0\0" if version >= 5 else b"\0")
    return message(QUERY, stream, long_string(cql) + params, version)


def segment(payload: bytes, self_contained: bool = True) -> bytes:
    """An uncompressed v5 segment (its CRC32 is not checked here: zeros)."""
    value = len(payload) | (int(self_contained) << 17)
    return value.to_bytes(3, "little") + crc24(value).to_bytes(3, "little") + payload + b"\0\0\0\0"


def compressed_segment(payload: bytes, self_contained: bool = True) -> bytes:
    """An LZ4-compressed v5 segment (stored as is when LZ4 does not make it smaller, as the
    spec says; its CRC32 is not checked here: zeros)."""
    block = bytes(cramjam.lz4.compress_block(payload, store_size=False))
    body, n = (block, len(payload)) if len(block) < len(payload) else (payload, 0)
    value = len(body) | n << 17 | int(self_contained) << 34
    return value.to_bytes(5, "little") + crc24(value, 5).to_bytes(3, "little") + body + b"\0\0\0\0"


_STARTUP = message(STARTUP, 0, b"\0\x01\0\x0bCQL_VERSION\0\x053.0.0", version=5)
_STARTUP_LZ4 = message(STARTUP, 0, b"\0\x02\0\x0bCQL_VERSION\0\x053.0.0\0\x0bCOMPRESSION\0\x03lz4", version=5)


class Cassandra(p.Protocol):
    id = contract.CASSANDRA
    name = "cassandra"
    stem = p.Stem("cassandra", "queries")
    streaming = True
    kernel_requests = (
        message(OPTIONS, 0),
        _STARTUP,
        _STARTUP_LZ4,  # asks for LZ4: the segments after its READY are compressed
        query(3, "SELECT name FROM ks.people WHERE id = 'x'"),
        message(PREPARE, 4, long_string("INSERT INTO ks.t (a) VALUES (?)"), version=3),
        message(EXECUTE, 5, b"\0\x10" + bytes(16) + b"\0\x01\0", version=4),
        message(BATCH, 6, b"\0\0\x01\0" + long_string("INSERT INTO ks.t (a) VALUES (1)") + b"\0\0\0\x01\0"),
        query(7, "SELECT 1", version=5) + query(8, "SELECT 2", version=5),  # two written at once
    )
    kernel_non_requests = (
        message(RESULT, 3, b"\0\0\0\x01", version=0x84),  # a response
        message(ERROR, 3, b"\0\0\x22\0\0\x01x", version=0x84),
        message(READY, 0, version=0x85),
        query(-1, "SELECT 1"),  # a negative stream id is the server's
        query(3, "SELECT 1", version=2),  # an older protocol
        query(3, "SELECT 1")[:-2],  # longer than the call
        message(OPTIONS, 0, b"\0\0"),  # OPTIONS has no body
        message(0x06, 0, b"\0\0"),  # SUPPORTED: a response's opcode
        segment(query(9, "SELECT 1", version=5)),  # v5's framing: after the handshake
        compressed_segment(query(9, "SELECT name FROM ks.people WHERE id = 'aaaaaaaaaaaa'", version=5)),
    )

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._conns: p.Lru[p.ConnKey, Connection] = p.Lru(MAX_CONNECTIONS)
        self._prepared: p.Lru[tuple[int, bytes], str] = p.Lru(MAX_PREPARED)  # (pid, id) -> statement

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        return []  # a stream protocol: see feed

    def feed(self, conn: p.ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[p.Request]:
        c = self._conns.setdefault(conn, Connection)
        out: list[p.Request] = []
        side = c.client if client else c.server
        try:
            for f in side.framer.feed(data, size, ts_ns):
                for e in side.messages(f):
                    if client:
                        self._request(c, e, f.ts_ns)
                    else:
                        self._response(conn[0], c, e, f.ts_ns, out)
        except (Short, ValueError, IndexError):  # garbage in: this direction starts over
            side.framer = Framer(9, _frame_size)
            side.rest = 0
        return out

    def _request(self, c: Connection, e: Envelope, ts: int) -> None:
        call = parse_request(e)
        if call is None or e.stream < 0:
            return
        c.pending.put(e.stream, Pending(call, ts))

    def _response(self, pid: int, c: Connection, e: Envelope, ts: int, out: list[p.Request]) -> None:
        reply = parse_response(e)
        if reply is None:
            return
        waiting = c.pending.pop(e.stream)
        if waiting is None:
            return
        call = waiting.call
        if call.opcode == PREPARE:
            if reply.prepared_id and call.statement:
                self._prepared.put((pid, reply.prepared_id), call.statement)
            return
        out.append(p.Request(self.id, reply.status, max(ts - waiting.ts_ns, 0) / 1e9, COUNTED[call.opcode],
                             statement=self._statement(pid, call), error=reply.error, start_ns=waiting.ts_ns))

    def _statement(self, pid: int, call: Call) -> str:
        def text(item: str | bytes) -> str:
            if isinstance(item, bytes):
                return self._prepared.peek((pid, item)) or ""
            return item

        if call.opcode == BATCH:
            parts = [text(i) for i in call.batch]
            if not parts or not all(parts):
                return ""
            cql = "; ".join(parts)
        else:
            cql = text(call.prepared_id) if call.opcode == EXECUTE else call.statement
        if not cql:
            return ""
        return mask(cql) if self.settings.masks.sql_literals else cql

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        if not r.statement:
            return None
        return p.db_span(r, "cassandra", "query")

    def forget(self, containers: set[str]) -> None:
        """Connections and prepared ids go with their LRU bounds; nothing is kept per container."""
