"""ClickHouse, the native protocol (TCP port 9000, 9440 with TLS; ClickHouse's src/Core/Protocol.h,
ProtocolDefines.h, Interpreters/ClientInfo.cpp and Server/TCPHandler.cpp).

A packet is a varint type and its fields: integers as LEB128 varints or fixed little-endian,
strings as a varint length and the bytes. After the handshake (Hello both ways) a client sends a
Query — the query id, the client info, the settings, the interserver secret, the processing
stage, the compression flag, the query's text and, from revision 54459, its parameters — and
then Data blocks (an empty one at least: the end of the external tables); the server answers
with Data blocks (a header block first), Progress, ProfileInfo, Totals, Extremes, Log,
TableColumns, ProfileEvents and EndOfStream, or with an Exception (its code an int32, then its
name, message and stack trace).

Which fields a Query carries depends on the protocol revision both ends agreed on (the smaller of
the two Hello packets'), which a capture of one packet does not show. The client info says the
client's own revision, the most it can be; the parser tries the layouts of each revision range
at or below it, newest first, and takes the first that reads to the end: the text ends the
packet, or a Data packet follows it, or the capture ends inside it. Queries cut by the capture
end in "...<TRUNCATED>", as the node agent shows them. Settings in the binary format of
revisions before 54429 carry no type: a value is read as a varint when a setting's name follows
it, else as a string. Not read: packets in chunked framing (from 54470, only when both ends ask
for it), and a Query after a non-empty addendum (the quota key a client of 54458 or later sends
once after Hello; clickhouse-driver writes it with its first Query). A Query is never
compressed (only Data blocks are).

Requests, as the node agent counts them: every Query the kernel's detector
(bpf/include/l7/clickhouse.h) recognises — the same checks are made here — with its text as the
statement, literals masked (mask_sql_literals). The detector takes more than the node agent's:
query ids of any length up to 127 (the node agent's: empty or a UUID), the client info without
the start time (servers before revision 54449, such as Debian's 18.16), a Query after an empty
addendum. Status from the first packet of the answer: an
Exception "failed" (its code is the span's message), any packet a running query sends "ok",
anything else "unknown". Spans, as the node agent's: "query", db.system "clickhouse",
db.statement. The node agent reads the text only for clients of revision 54460 or less, with the
start time in the client info; this parser reads older and newer layouts too."""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.sql import mask_literals

CLIENT_QUERY, CLIENT_DATA = 1, 2
SERVER_EXCEPTION = 2
# what a running query sends: Data, Progress, EndOfStream, ProfileInfo, Totals, Extremes, Log,
# TableColumns, PartUUIDs, ReadTaskRequest, ProfileEvents, MergeTreeReadTaskRequest
RUNNING = frozenset({1, 3, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15})
MAX_ERROR_CODE = 4096  # above: not an Exception (the node agent's bound)
INTERFACE_TCP = 1
MAX_INTERFACE = 10
TRUNCATED = "...<TRUNCATED>"

# The detector's bounds (bpf/include/l7/clickhouse.h)
MIN_QUERY = 32
MAX_ID, MAX_USER, MAX_ADDRESS = 127, 63, 48

# Protocol revisions at which a Query's layout changes (ProtocolDefines.h)
QUOTA_KEY = 54060
VERSION_PATCH = 54401
SETTINGS_AS_STRINGS = 54429
INTERSERVER_SECRET = 54441
OPENTELEMETRY = 54442
DISTRIBUTED_DEPTH = 54448
START_TIME = 54449
PARALLEL_REPLICAS = 54453
PARAMETERS = 54459
SCRIPT_LINE = 54475
JWT = 54476
CLIENT_AGENT = 54485
LAYOUTS = (CLIENT_AGENT, JWT, SCRIPT_LINE, PARAMETERS, PARALLEL_REPLICAS, START_TIME, DISTRIBUTED_DEPTH,
           OPENTELEMETRY, INTERSERVER_SECRET, SETTINGS_AS_STRINGS, VERSION_PATCH, QUOTA_KEY)
MAX_SETTINGS = 1024  # settings (or parameters) of one Query read before giving up
_IDENT = re.compile(rb"[a-z_][a-z0-9_]{0,127}")  # a setting's name
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Query:
    text: str  # as sent (not masked); "" when the layout was not understood
    truncated: bool = False  # the capture ends inside the text


@dataclass(frozen=True)
class Reply:
    status: str  # ok | failed | unknown
    code: int = 0  # an Exception's


class _Stop(Exception):
    """The bytes end, or are not what this layout has there."""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise _Stop
        self.pos += 1
        return self.data[self.pos - 1]

    def uvarint(self) -> int:
        v = shift = 0
        while shift < 64:
            b = self.byte()
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7
        raise _Stop

    def skip(self, n: int) -> None:
        if n > len(self.data) - self.pos:
            raise _Stop
        self.pos += n

    def string(self) -> int:
        """Skips a string; returns its length."""
        n = self.uvarint()
        self.skip(n)
        return n

    def flag(self) -> int:
        v = self.byte()
        if v > 1:
            raise _Stop
        return v


def _addendum(data: bytes) -> int:
    """1 if the Query follows an empty addendum (a client's quota key, from revision 54458, which
    clickhouse-driver writes with its first Query), else 0."""
    return 1 if data[:2] == b"\x00\x01" else 0


def looks_like_query(data: bytes) -> bool:
    """The kernel's test (bpf/include/l7/clickhouse.h): a Query's header up to the interface."""
    n = len(data)
    if n < MIN_QUERY:
        return False
    off = _addendum(data)
    if data[off] != CLIENT_QUERY or data[off + 1] > MAX_ID:
        return False
    off += 2 + data[off + 1]
    if off + 2 > n or data[off] not in (1, 2) or data[off + 1] > MAX_USER:
        return False
    off += 2 + data[off + 1]
    if off + 1 > n or data[off] > MAX_ID:
        return False
    off += 1 + data[off]
    if off + 2 > n or data[off] > MAX_ADDRESS:
        return False
    first = data[off + 1]
    if data[off] and not (0x30 <= first <= 0x39 or first in b"[:"):
        return False
    off += 1 + data[off]
    if off + 1 > n:
        return False
    if 1 <= data[off] <= MAX_INTERFACE:
        return True
    return off + 9 <= n and 1 <= data[off + 8] <= MAX_INTERFACE


def _settings(r: _Reader) -> None:
    """Skips settings (or parameters) as strings with flags, to the empty name that ends them."""
    for _ in range(MAX_SETTINGS):
        if not r.string():
            return
        r.uvarint()
        r.string()
    raise _Stop


def _name(data: bytes, pos: int) -> bool:
    """A setting's name (or the empty one that ends them) at pos."""
    if pos >= len(data):
        return False
    n = data[pos]
    return n == 0 or (n < 0x80 and pos + 1 + n <= len(data) and _IDENT.fullmatch(data[pos + 1:pos + 1 + n]) is not None)


def _binary_settings(r: _Reader) -> None:
    """Skips settings in the binary format of revisions before 54429: a name, then its value as
    its type writes it — a varint (numbers, booleans, durations) or a string (strings, floats,
    enums). The type is not on the wire: a value is a varint when a name follows it as one."""
    for _ in range(MAX_SETTINGS):
        n = r.uvarint()
        if not n:
            return
        if _IDENT.fullmatch(r.data[r.pos:r.pos + n]) is None:
            raise _Stop
        r.skip(n)
        start = r.pos
        try:
            r.uvarint()
            if _name(r.data, r.pos):
                continue
        except _Stop:
            pass
        r.pos = start
        r.string()
    raise _Stop


def _text(data: bytes, rev: int) -> tuple[bytes, bool] | None:
    """The query's text and whether the capture cut it, if the packet reads to its end in the
    layout of revision `rev`."""
    r = _Reader(data)
    r.skip(_addendum(data) + 1)  # the packet type
    r.string()  # query id
    r.skip(1)  # query kind
    r.string()  # initial user
    r.string()  # initial query id
    r.string()  # initial address
    if rev >= START_TIME:
        r.skip(8)
    if r.byte() != INTERFACE_TCP:
        return None
    r.string()  # OS user
    r.string()  # client host name
    r.string()  # client name
    r.uvarint()  # major
    r.uvarint()  # minor
    if r.uvarint() < rev:  # the client's revision: the agreed one is not newer
        return None
    if rev >= QUOTA_KEY:
        r.string()
    if rev >= DISTRIBUTED_DEPTH:
        r.uvarint()
    if rev >= VERSION_PATCH:
        r.uvarint()
    if rev >= OPENTELEMETRY and r.flag():
        r.skip(16 + 8)  # trace id, span id
        r.string()  # trace state
        r.skip(1)  # trace flags
    if rev >= PARALLEL_REPLICAS:
        for _ in range(3):
            r.uvarint()
    if rev >= SCRIPT_LINE:
        r.uvarint()
        r.uvarint()
    if rev >= JWT and r.flag():
        r.string()
    if rev >= CLIENT_AGENT:
        r.string()
    if rev >= SETTINGS_AS_STRINGS:
        _settings(r)
    else:
        _binary_settings(r)
    if rev >= INTERSERVER_SECRET and r.string() > 32:
        return None
    if r.uvarint() > 4 or r.uvarint() > 1:  # stage, compression
        return None
    length = r.uvarint()
    start = r.pos
    raw = data[start:start + length]
    truncated = len(raw) < length
    if not truncated:
        r.pos = start + length
        if rev >= PARAMETERS:
            try:
                _settings(r)
            except _Stop:  # the capture ends inside the parameters
                return raw, False
        if r.pos < len(data) and data[r.pos] != CLIENT_DATA:
            return None
    return raw, truncated


def _plain(raw: bytes, truncated: bool) -> Query | None:
    """The text if it reads as a statement: UTF-8 (a character the capture cut in two dropped),
    no control characters but tabs and line ends, not blank."""
    for cut in range(min(4, len(raw)) + 1 if truncated else 1):
        try:
            text = raw[:len(raw) - cut].decode()
        except UnicodeDecodeError:
            continue
        if text.strip() and not _CONTROL.search(text):
            return Query(text.strip(), truncated)
        return None
    return None


def parse_query(data: bytes) -> Query | None:
    """The Query in a call's first bytes, or None when it is not one (as the kernel decides). Its
    text is "" when no layout reads it. Never raises."""
    try:
        if not looks_like_query(data):
            return None
        found: list[tuple[bytes, bool]] = []
        for rev in LAYOUTS:
            try:
                t = _text(data, rev)
            except _Stop:
                continue
            if t is not None:
                q = _plain(*t)
                if q is not None:
                    return q
                found.append(t)
        if found:  # no layout gives a plain text: the newest's, as it is
            raw, truncated = found[0]
            return Query(raw.decode(errors="replace").strip(), truncated)
        return Query("")
    except (IndexError, ValueError):
        return None


def parse_reply(data: bytes) -> Reply:
    """The status of an answer's first packet. Never raises."""
    if not data:
        return Reply("unknown")
    kind = data[0]
    if kind == SERVER_EXCEPTION:
        code = int.from_bytes(data[1:5], "little", signed=True) if len(data) >= 5 else -1
        if 0 < code <= MAX_ERROR_CODE:
            return Reply("failed", code)
        return Reply("unknown")
    if kind in RUNNING:
        return Reply("ok")
    return Reply("unknown")


class Clickhouse(p.Protocol):
    id = contract.CLICKHOUSE
    name = "clickhouse"
    stem = p.Stem("clickhouse", "queries")
    # Written by clickhouse-driver 0.2.11 (client revision 54468) to Debian's clickhouse-server
    # 18.16 (revision 54412: no start time, binary settings), and to servers of revisions 54460
    # and 54468 (the start time, settings as strings, parameters after the text): the first
    # Query of a connection after the empty addendum, one with a query id, one with a setting,
    # one with an OpenTelemetry context and the empty Data block after it (as a server reads it).
    kernel_requests = (
        bytes.fromhex("010001000009302e302e302e303a300104726f6f7402766d18436c69636b486f75736520707974686f"
                      "6e2d647269766572140ac4a90300020002000f53454c45435420312c202761626327"),
        bytes.fromhex("00010001000009302e302e302e303a30d09ada7ad16106000104726f6f7402766d18436c69636b486f7573"
                      "6520707974686f6e2d647269766572140ac4a90300000200000000000002000f53454c45435420312c2027"
                      "6162632700"),
        bytes.fromhex("00010a6d792d71756572792d3101000009302e302e302e303a309059dd7ad16106000104726f6f7402766d"
                      "18436c69636b486f75736520707974686f6e2d647269766572140ac4a9030000020000000000000200085345"
                      "4c454354203200"),
        bytes.fromhex("010001000009302e302e302e303a30c5e4f37ad16106000104726f6f7402766d18436c69636b486f757365"
                      "20707974686f6e2d647269766572140ac4a903000002000000000b6d61785f7468726561647300013200000200"
                      "0853454c454354203300"),
        bytes.fromhex("00010001000009302e302e302e303a30e19fe17ad16106000104726f6f7402766d18436c69636b486f7573"
                      "6520707974686f6e2d647269766572140ac4a903000002019c31801c21eb4884dd43cd161965f70a31332069"
                      "716badb70001000000000002000853454c4543542034000200010002ffffffff000000"),
    )
    kernel_non_requests = (
        bytes.fromhex("0018436c69636b486f75736520707974686f6e2d647269766572140ac4a903000764656661756c7400"),  # Hello
        bytes.fromhex("0200010002ffffffff000000"),  # an empty Data block
        bytes.fromhex("04"),  # Ping
        bytes.fromhex("03"),  # Cancel
        bytes.fromhex("000a436c69636b486f75736512108ca903074574632f55544302766d01"),  # the server's Hello
        bytes.fromhex("0100010002ffffffff00020001310555496e743805276162632706537472696e67"),  # a Data reply
        bytes.fromhex("023c0000000d44423a3a457863657074696f6e275461626c652064656661756c742e6d697373696e675f74"
                      "20646f6573206e6f742065786973742e0000"),  # an Exception
        bytes.fromhex("0200010002ffffffff00020201610655496e7433320100000002000000017306537472696e670178017902"
                      "00010002ffffffff000000"),  # an INSERT's Data block, and the empty one
    )

    def _mask(self, sql: str) -> str:
        return mask_literals(sql) if self.settings.masks.sql_literals else sql

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        q = parse_query(request)
        if q is None:
            return []
        reply = parse_reply(response)
        statement = self._mask(q.text) + (TRUNCATED if q.truncated else "") if q.text else ""
        error = str(reply.code) if reply.status == "failed" else ""
        return [p.Request(self.id, reply.status, seconds, statement=statement, error=error)]

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        return p.db_span(r, "clickhouse", "query")
