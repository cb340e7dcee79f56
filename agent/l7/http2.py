"""HTTP/2 and gRPC over it (RFC 9113, RFC 7541 via the `hpack` library): a stream plug-in. The
kernel recognises a connection by the client's preface and then hands every read and write of it
here in order (bpf/include/l7/contract.h); this module splits them into frames, decodes header
blocks with one HPACK decoder per direction, and pairs each client stream's request headers with
the server's response headers and trailers: `:method`, `:path`, `:status`, `grpc-status`.

What the kernel hands over is a call's first bytes (--l7-payload-size) and its full size, so a
frame that runs past the captured bytes is skipped by its length into the next call, and a
frame split between two fully captured calls (a read that ends mid-frame) is joined. A header
block that is cut off cannot be decoded, and the HPACK dynamic table may then be out of step:
the decoder is reset on any decoding error (headers of later requests that refer to lost entries
are missing, never wrong). Must not raise on any input; everything per connection is bounded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import hpack
from hpack import hpack as hpack_decoder
from hpack.exceptions import HPACKError

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.http import mask_query, mask_url_path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
DATA, HEADERS, RST_STREAM, CONTINUATION = 0x0, 0x1, 0x3, 0x9
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
              "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
MAX_CONNECTIONS = 4096  # connections with state (LRU)
MAX_STREAMS = 1024  # open streams per connection (the oldest is dropped)
MAX_PENDING = 65536  # bytes of a frame split between calls that are kept to join it
MAX_TABLE = 65536  # HPACK dynamic table size a peer may ask for
MAX_DECODED = 256  # header blocks remembered per direction while the dynamic table is unchanged
_SETTINGS = b"\0\0\x12\x04\0\0\0\0\0\0\x03\0\0\0\x64\0\x04\0\x10\0\0\0\x02\0\0\0\0"


def status_label(code: int, grpc: int) -> str:
    """The metric's status: `grpc:<NAME>` for gRPC, else the HTTP status class."""
    if grpc >= 0:
        return "grpc:" + (GRPC_CODES[grpc] if grpc < len(GRPC_CODES) else "UNKNOWN")
    return f"{code // 100}xx" if 100 <= code < 600 else "unknown"


@dataclass
class Stream:
    start_ns: int
    method: str = ""
    path: str = ""
    scheme: str = ""
    code: int = 0
    grpc: int = -1


@dataclass
class Side:
    """One direction's frames: its HPACK decoder and where its next frame starts."""

    decoder: hpack.Decoder = field(default_factory=lambda: _decoder())
    skip: int = 0  # bytes of a frame begun in an earlier call still to come
    pending: bytes = b""  # the start of a frame that the next call completes
    block: bytearray | None = None  # a header block awaiting CONTINUATION frames
    block_stream: int = 0
    block_flags: int = 0
    # Blocks that left the dynamic table as it was (all indexed: a gRPC call's after the first)
    # decode the same while it stays so: their headers, valid for `table` (see _table_state).
    decoded: dict[bytes, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    table: tuple[int, int, int] = (0, 0, 0)

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        state = _table_state(self.decoder)
        if state != self.table:
            self.decoded.clear()
            self.table = state
        hit = self.decoded.get(block)
        if hit is not None:
            return hit
        headers: list[tuple[bytes, bytes]] = self.decoder.decode(block, raw=True)
        if _table_state(self.decoder) == state and len(self.decoded) < MAX_DECODED:
            self.decoded[block] = headers
        return headers


@dataclass
class Connection:
    client: Side = field(default_factory=Side)
    server: Side = field(default_factory=Side)
    streams: p.Lru[int, Stream] = field(default_factory=lambda: p.Lru(MAX_STREAMS))  # by stream id, oldest first


# The library Huffman-decodes every literal in pure Python, most of a header block's cost; the
# same literals come again and again (server, content-type, a date within its second), so the
# decoder's Huffman function is memoized, bounded (its input is a slice of one block: bytes or
# a read-only memoryview, both hashable by content).
if not hasattr(hpack_decoder.decode_huffman, "cache_info"):
    hpack_decoder.decode_huffman = functools.lru_cache(maxsize=4096)(hpack_decoder.decode_huffman)


def _table_state(d: hpack.Decoder) -> tuple[int, int, int]:
    """What changes whenever a block changes the HPACK dynamic table: its size limit, its
    length, and its newest entry (an insertion puts a new one first)."""
    t = d.header_table
    entries = t.dynamic_entries
    return t.maxsize, len(entries), id(entries[0]) if entries else 0


def _decoder() -> hpack.Decoder:
    d = hpack.Decoder()
    d.max_allowed_table_size = MAX_TABLE
    return d


class Http2(p.Protocol):
    id = contract.HTTP2
    name = "http2"
    stem = p.Stem("http", "requests")  # the node agent counts HTTP/2 and gRPC as HTTP
    streaming = True
    kernel_requests = (PREFACE + _SETTINGS,)
    kernel_non_requests = (b"PRI * HTTP/1.1\r\n\r\n", _SETTINGS, b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2")

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._conns: p.Lru[p.ConnKey, Connection] = p.Lru(MAX_CONNECTIONS)

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        return []  # a stream protocol: see feed

    def feed(self, conn: p.ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[p.Request]:
        c = self._conns.setdefault(conn, Connection)
        out: list[p.Request] = []
        try:
            self._frames(c, client, ts_ns, data, max(size, len(data)), out)
        except Exception:  # noqa: BLE001 - garbage in: this direction starts over, nothing out
            side = c.client if client else c.server
            side.skip, side.pending, side.block = 0, b"", None
            side.decoder = _decoder()
        return out

    def _frames(self, c: Connection, client: bool, ts: int, data: bytes, size: int, out: list[p.Request]) -> None:
        side = c.client if client else c.server
        complete = len(data) >= size  # the whole call was captured
        if side.skip:
            if side.skip >= size:
                side.skip -= size
                return
            data, size, side.skip = data[side.skip:], size - side.skip, 0
        if side.pending:
            data, size = side.pending + data, len(side.pending) + size
            side.pending = b""
        pos = len(PREFACE) if client and data.startswith(PREFACE) else 0
        while pos + FRAME_HEADER <= len(data):
            length = int.from_bytes(data[pos:pos + 3], "big")
            kind, flags = data[pos + 3], data[pos + 4]
            sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            end = pos + FRAME_HEADER + length
            if end > len(data):  # runs past what was captured
                if complete and end - pos <= MAX_PENDING:
                    side.pending = data[pos:]  # the next call completes it
                elif end > size:
                    side.skip = end - size
                if kind in (HEADERS, CONTINUATION) and not side.pending:
                    side.block = None  # a header block that cannot be decoded
                return
            self._frame(c, side, client, kind, flags, sid, data[pos + FRAME_HEADER:end], ts, out)
            pos = end
        if pos < len(data) and complete:
            side.pending = data[pos:]  # a frame header split between calls

    def _frame(self, c: Connection, side: Side, client: bool, kind: int, flags: int, sid: int, payload: bytes,
               ts: int, out: list[p.Request]) -> None:
        if kind == HEADERS:
            if flags & PADDED:
                pad = payload[0] if payload else 0
                payload = payload[1:len(payload) - pad] if pad < len(payload) else b""
            if flags & PRIORITY:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers(c, side, client, sid, flags, bytes(payload), ts, out)
            else:
                side.block, side.block_stream, side.block_flags = bytearray(payload), sid, flags
        elif kind == CONTINUATION:
            if side.block is None or sid != side.block_stream:
                return
            side.block += payload
            if len(side.block) > MAX_PENDING:
                side.block = None
                side.decoder = _decoder()
            elif flags & END_HEADERS:
                block, side.block = bytes(side.block), None
                self._headers(c, side, client, sid, side.block_flags, block, ts, out)
        elif kind == DATA:
            if not client and flags & END_STREAM:
                self._finish(c, sid, ts, out)
        elif kind == RST_STREAM:
            c.streams.pop(sid)  # reset: neither answered nor failed by the server

    def _headers(self, c: Connection, side: Side, client: bool, sid: int, flags: int, block: bytes, ts: int,
                 out: list[p.Request]) -> None:
        try:
            headers = side.decode(block)
        except (HPACKError, ValueError, IndexError, UnicodeDecodeError):
            side.decoder = _decoder()  # out of step with the peer's encoder: start over
            side.decoded.clear()
            return
        if client:
            s = c.streams.peek(sid)
            if s is None:
                s = Stream(ts)
                c.streams.put(sid, s)
            for name, value in headers:
                if name == b":method" and not s.method:
                    s.method = value.decode("latin-1")[:32]
                elif name == b":path" and not s.path:
                    s.path = value.decode("latin-1")[:4096]
                elif name == b":scheme" and not s.scheme:
                    s.scheme = value.decode("latin-1")[:16]
            return
        s = c.streams.peek(sid)
        if s is None:
            return  # its request was not seen
        for name, value in headers:
            if name == b":status" and value.isdigit():
                s.code = int(value)
            elif name == b"grpc-status" and value.isdigit():
                s.grpc = int(value)
        if flags & END_STREAM:
            self._finish(c, sid, ts, out)

    def _finish(self, c: Connection, sid: int, ts: int, out: list[p.Request]) -> None:
        s = c.streams.pop(sid)
        if s is None:
            return
        m = self.settings.masks
        path = s.path
        if m.url_query:
            path = mask_query(path)
        if m.url_path:
            path = mask_url_path(path)
        out.append(p.Request(self.id, status_label(s.code, s.grpc), max(ts - s.start_ns, 0) / 1e9, s.method,
                             path, s.code, error=s.scheme, grpc=s.grpc, start_ns=s.start_ns))

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        if r.path.partition("?")[0] in self.settings.exclude_paths:
            return None
        scheme = r.error or ("https" if tls else "http")
        attrs = {"http.url": f"{scheme}://{peer.destination}{r.path or '/unknown'}",
                 "http.method": r.method or "unknown"}
        s = p.Span(r.method or "unknown", attrs)
        if r.code:
            attrs["http.status_code"] = str(r.code)
        if r.grpc >= 0:
            attrs["rpc.grpc.status_code"] = str(r.grpc)
        if r.code >= 400 or r.grpc > 0:
            s.status = "STATUS_CODE_ERROR"
        return s
