"""Kafka wire protocol (kafka.apache.org/protocol): every message is an int32 big-endian size and
its bytes. A request's header: api key (int16), api version (int16), correlation id (int32),
client id (nullable string), and in the flexible versions of an API (KIP-482) tagged fields; a
response's header: the correlation id, and tagged fields when the request's version is flexible
(ApiVersions' response header never has them).

Kafka is a stream protocol (contract.h): a client pipelines requests on one connection and the
broker answers each by its correlation id, so the kernel makes every read and write of a Kafka
connection an event and `feed` pairs them here: the client's bytes and the broker's are framed
by their size prefix (agent/l7/framing.py), each request waits under its correlation id (at
most MAX_PENDING per connection) until the response naming it, and is counted once, with the
time from the call that carried it to the call that carried the response's first bytes. Status, as the node agent's values: "failed" when the response carries an error code
(a top-level one, or a partition's of Produce, Fetch and Metadata), "ok" when the codes it
carries are 0, "unknown" when no response with its correlation id was seen or the API's
response is not read here. Kafka requests make no spans (the node agent makes none)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.framing import Framer

PRODUCE, FETCH, METADATA, API_VERSIONS = 0, 1, 3, 18

# The first flexible version of each API key (KIP-482), None: never flexible.
FLEXIBLE: dict[int, int | None] = {
    0: 9, 1: 12, 2: 6, 3: 9, 4: 4, 5: 2, 6: 6, 7: 3, 8: 8, 9: 6, 10: 3, 11: 6, 12: 4, 13: 4, 14: 4, 15: 5,
    16: 3, 17: None, 18: 3, 19: 5, 20: 4, 21: 2, 22: 2, 23: 4, 24: 3, 25: 3, 26: 3, 27: 1, 28: 3, 29: 2,
    30: 2, 31: 2, 32: 4, 33: 2, 34: 2, 35: 2, 36: 2, 37: 2, 38: 2, 39: 2, 40: 2, 41: 2, 42: 2, 43: 2, 44: 1,
    47: None, 48: 1, 49: 1, 53: 1, 54: 1,
}  # keys not listed (45, 46, 50-52, 55 and up) are flexible from version 0

NAMES = {
    0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit", 9: "OffsetFetch",
    10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat", 13: "LeaveGroup", 14: "SyncGroup",
    15: "DescribeGroups", 16: "ListGroups", 17: "SaslHandshake", 18: "ApiVersions", 19: "CreateTopics",
    20: "DeleteTopics", 22: "InitProducerId", 36: "SaslAuthenticate",
}

# Responses whose body starts with [throttle_time_ms int32 from version T] error_code int16:
# key -> T (None: the error code comes first in every version).
TOP_ERROR: dict[int, int | None] = {
    10: 1,  # FindCoordinator (before v4, which answers per key)
    11: 2, 12: 1, 13: 1, 14: 1, 16: 1,  # JoinGroup, Heartbeat, LeaveGroup, SyncGroup, ListGroups
    17: None, 18: None, 36: None,  # SaslHandshake, ApiVersions, SaslAuthenticate
    22: 0, 25: 0, 26: 0,  # InitProducerId, AddOffsetsToTxn, EndTxn
    60: 0,  # DescribeCluster
}

MAX_REQUESTS = 64  # pipelined requests read from one write
MAX_PENDING = 256  # requests of one connection waiting for their responses (the oldest go first)
MAX_CONNECTIONS = 4096  # connections followed (the least recently used go first)
MAX_API_KEY, MAX_API_VERSION = 92, 20  # L7_KAFKA_MAX_API_KEY, L7_KAFKA_MAX_API_VERSION


def flexible(key: int, version: int) -> bool:
    first = FLEXIBLE.get(key, 0)
    return first is not None and version >= first


@dataclass(frozen=True)
class Header:
    key: int
    version: int
    correlation_id: int
    client_id: str = ""

    @property
    def name(self) -> str:
        return NAMES.get(self.key, f"ApiKey{self.key}")


class Short(Exception):
    """The bytes end before the field."""


class Reader:
    def __init__(self, data: bytes, pos: int, compact: bool) -> None:
        self.data, self.pos, self.compact = data, pos, compact

    def take(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        if self.pos + n > len(self.data):
            raise Short
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def num(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big", signed=True)

    def uvarint(self) -> int:
        v = shift = 0
        while True:
            b = self.take(1)[0]
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def length(self) -> int:
        """An array's or a (nullable) string's length, -1 for null."""
        return self.uvarint() - 1 if self.compact else self.num(4)

    def string(self) -> None:
        n = self.uvarint() - 1 if self.compact else self.num(2)
        if n > 0:
            self.take(n)

    def bytes_(self) -> None:
        n = self.length()
        if n > 0:
            self.take(n)

    def tags(self) -> None:
        if self.compact:
            for _ in range(self.uvarint()):
                self.uvarint()
                self.take(self.uvarint())

    def array(self) -> int:
        n = self.length()
        if n > 1_000_000:
            raise ValueError("array too long")
        return max(n, 0)


def parse_requests(data: bytes) -> list[Header]:
    """The requests in a write (a pipeline holds several), as far as their headers were captured."""
    out: list[Header] = []
    if len(data) < 15:  # the kernel looks at 15 bytes of the first
        return out
    pos = 0
    while pos + 12 <= len(data) and len(out) < MAX_REQUESTS:
        size = int.from_bytes(data[pos:pos + 4], "big", signed=True)
        key = int.from_bytes(data[pos + 4:pos + 6], "big", signed=True)
        version = int.from_bytes(data[pos + 6:pos + 8], "big", signed=True)
        corr = int.from_bytes(data[pos + 8:pos + 12], "big", signed=True)
        # as the kernel's detector (bpf/include/l7/kafka.h) checks a request
        if size < 10 or not 0 <= key <= MAX_API_KEY or not 0 <= version <= MAX_API_VERSION or corr < 0:
            break
        client = ""
        if pos + 14 <= len(data):
            n = int.from_bytes(data[pos + 12:pos + 14], "big", signed=True)
            if n != -1 and (n <= 0 or n + 10 > size or (pos + 15 <= len(data) and not 0x20 <= data[pos + 14] <= 0x7E)):
                break
            if n > 0:
                client = data[pos + 14:pos + 14 + n].decode("utf-8", "replace")
        out.append(Header(key, version, corr, client))
        pos += 4 + size
    return out


@dataclass(frozen=True)
class Response:
    correlation_id: int
    status: str
    error: int = 0  # the first non-zero error code


def _codes(key: int, version: int, r: Reader) -> list[int]:
    """The error codes of a response body, as far as they were captured (Short ends it)."""
    codes: list[int] = []
    try:
        if key in TOP_ERROR and not (key == 10 and version >= 4):
            t = TOP_ERROR[key]
            if t is not None and version >= t:
                r.num(4)
            codes.append(r.num(2))
        elif key == PRODUCE:
            for _ in range(r.array()):
                if version >= 13:
                    r.take(16)  # topic id
                else:
                    r.string()
                for _ in range(r.array()):
                    r.num(4)  # partition index
                    codes.append(r.num(2))
                    r.num(8)  # base offset
                    if version >= 2:
                        r.num(8)  # log append time
                    if version >= 5:
                        r.num(8)  # log start offset
                    if version >= 8:
                        for _ in range(r.array()):  # record errors
                            r.num(4)
                            r.string()
                            r.tags()
                        r.string()  # error message
                    r.tags()
                r.tags()
        elif key == FETCH:
            if version >= 1:
                r.num(4)  # throttle time
            if version >= 7:
                codes.append(r.num(2))
                r.num(4)  # session id
            for _ in range(r.array()):
                if version >= 13:
                    r.take(16)
                else:
                    r.string()
                for _ in range(r.array()):
                    r.num(4)
                    codes.append(r.num(2))
                    r.num(8)  # high watermark
                    if version >= 4:
                        r.num(8)  # last stable offset
                        if version >= 5:
                            r.num(8)  # log start offset
                        for _ in range(r.array()):  # aborted transactions
                            r.num(8)
                            r.num(8)
                            r.tags()
                    if version >= 11:
                        r.num(4)  # preferred read replica
                    r.bytes_()  # records
                    r.tags()
                r.tags()
        elif key == METADATA:
            if version >= 3:
                r.num(4)
            for _ in range(r.array()):  # brokers
                r.num(4)
                r.string()
                r.num(4)
                if version >= 1:
                    r.string()  # rack
                r.tags()
            if version >= 2:
                r.string()  # cluster id
            if version >= 1:
                r.num(4)  # controller id
            if r.array():  # topics: the first one's code is all that is read of them
                codes.append(r.num(2))
            else:  # brokers only
                codes.append(0)
        else:
            return []
    except Short:
        pass
    return codes


def parse_responses(data: bytes, requests: dict[int, Header]) -> dict[int, Response]:
    """The responses (by correlation id) in a read, for the requests they answer."""
    out: dict[int, Response] = {}
    pos = 0
    while pos + 8 <= len(data) and len(out) < MAX_REQUESTS:
        size = int.from_bytes(data[pos:pos + 4], "big", signed=True)
        corr = int.from_bytes(data[pos + 4:pos + 8], "big", signed=True)
        h = requests.get(corr)
        if size < 4 or h is None:
            break
        body = data[pos + 8:pos + 4 + size]
        try:
            r = Reader(body, 0, flexible(h.key, h.version))
            if h.key != API_VERSIONS:
                r.tags()  # the response header's
            codes = _codes(h.key, h.version, r)
        except (Short, ValueError):
            codes = []
        if not codes:
            out[corr] = Response(corr, "unknown")
        else:
            bad = [c for c in codes if c]
            out[corr] = Response(corr, "failed", bad[0]) if bad else Response(corr, "ok")
        pos += 4 + size
    return out


def request(key: int, version: int, corr: int, body: bytes = b"", client: str | None = "ca") -> bytes:
    """A request's bytes (the plug-in's samples; tests)."""
    head = key.to_bytes(2, "big") + version.to_bytes(2, "big") + corr.to_bytes(4, "big", signed=True)
    head += b"\xff\xff" if client is None else len(client).to_bytes(2, "big") + client.encode()
    if flexible(key, version):
        head += b"\0"  # no tagged fields
    msg = head + body
    return len(msg).to_bytes(4, "big") + msg


def _size(head: bytes) -> int | None:
    """A message's size with its size prefix, from its first 4 bytes."""
    n = int.from_bytes(head[:4], "big", signed=True)
    return n + 4 if 0 <= n <= MAX_MESSAGE else None


MAX_MESSAGE = 100 * 1024 * 1024  # L7_KAFKA_MAX_REQUEST: the broker's socket.request.max.bytes


@dataclass
class Connection:
    requests: Framer = field(default_factory=lambda: Framer(4, _size))
    responses: Framer = field(default_factory=lambda: Framer(4, _size))
    pending: p.Lru[int, tuple[Header, int]] = field(default_factory=lambda: p.Lru(MAX_PENDING))  # id -> (header, ts)


class Kafka(p.Protocol):
    id = contract.KAFKA
    name = "kafka"
    stem = p.Stem("kafka", "requests")
    streaming = True
    kernel_requests = (
        request(API_VERSIONS, 3, 1, b"\x0dkafka-python\x061.0.0\0"),
        request(METADATA, 8, 2, b"\0\0\0\x01\0\x05topic\x01\0\0"),
        request(PRODUCE, 7, 3, b"\xff\xff\0\x01\0\0\x03\xe8\0\0\0\0", client=None),
        request(PRODUCE, 7, 3, b"\xff\xff\0\x01", client="producer-1") + request(PRODUCE, 7, 4, b"\xff\xff\0\x01"),
    )
    kernel_non_requests = (
        b"\0\0\0\x0c\0\0\0\x01\0\0\0\0\0\0\0\0",  # a response: size, correlation id, body
        request(PRODUCE, 7, -5),  # a negative correlation id
        request(PRODUCE, 7, 3, client=""),  # an empty client id (ZooKeeper's framing looks so)
        request(API_VERSIONS, 3, 1)[:12],  # too short
        request(PRODUCE, 7, 3, b"\0" * 8)[:-3],  # longer than the call
    )

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        reqs = parse_requests(request)
        if not reqs:
            return []
        resps = parse_responses(response, {h.correlation_id: h for h in reqs})
        out = []
        for h in reqs:
            r = resps.get(h.correlation_id)
            status = r.status if r is not None else "unknown"
            out.append(p.Request(self.id, status, seconds, h.name, error=str(r.error) if r and r.error else ""))
        return out

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._conns: p.Lru[p.ConnKey, Connection] = p.Lru(MAX_CONNECTIONS)

    def feed(self, conn: p.ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[p.Request]:
        c = self._conns.setdefault(conn, Connection)
        out: list[p.Request] = []
        if client:
            for f in c.requests.feed(data, size, ts_ns):
                for h in parse_requests(f.data)[:1]:
                    c.pending.put(h.correlation_id, (h, f.ts_ns))
            return out
        for f in c.responses.feed(data, size, ts_ns):
            if len(f.data) < 8:
                continue
            corr = int.from_bytes(f.data[4:8], "big", signed=True)
            waiting = c.pending.pop(corr)
            if waiting is None:
                continue
            h, start = waiting
            r = parse_responses(f.data, {corr: h}).get(corr)
            status = r.status if r is not None else "unknown"
            out.append(p.Request(self.id, status, max(f.ts_ns - start, 0) / 1e9, h.name,
                                 error=str(r.error) if r and r.error else "", start_ns=start))
        return out
