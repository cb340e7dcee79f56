"""FoundationDB, its flow transport (fdbrpc/FlowTransport.cpp, flow/flat_buffers.h).

A connection opens with a ConnectPacket each way — its length (u32, little-endian, not counting
itself), the protocol version (u64; with the object serializer flag its bytes 6 and 7 are 0xdb
0x1f), ports and addresses — and then carries packets: a length (u32), an XXH3 checksum (u64; not
on TLS connections), the destination endpoint's token (16 bytes) and a flatbuffers message: the
root table's offset (u32), the message's file identifier (u32), the tables. A request (a type
with a file identifier below: GetValueRequest, CommitTransactionRequest, ...) carries the token of
its reply promise among its fields; the reply is a packet to that token whose message is
ErrorOr<reply> (file identifier 2 << 24 | the reply type's): a union whose type tag is 1 for an
Error (a table with the error code) and 2 for the reply.

Many requests are in flight on one connection and answered in any order: a FoundationDB
connection is a stream connection (contract.h), every read and write comes to `feed`, framed by
the packets' lengths (agent/l7/framing.py), and a request the node agent recognises (its
REQUESTS and interface identifiers) waits (at most MAX_PENDING per connection, its first
KEEP_REQUEST bytes kept) until a reply whose token is among those bytes. Whether packets carry a
checksum is learnt per direction from where the first packet's file identifier is.

Status, in the node agent's values: the node agent counts every reply "ok"; here a reply that is
an Error is "failed" (its code is the request's error), any other "ok" — also one whose union
cannot be read. FoundationDB requests make no spans (the node agent makes none)."""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.framing import Framer

# The file identifiers of requests the node agent recognises (its interface identifiers too).
REQUESTS: dict[int, str] = {
    8454530: "GetValueRequest", 6795746: "GetKeyValuesRequest", 6795747: "GetMappedKeyValuesRequest",
    93948: "CommitTransactionRequest", 838566: "GetReadVersionRequest", 7554186: "SetRequest",
    8500026: "ClearRequest", 10457870: "GetKeyRequest", 14747733: "WatchValueRequest",
    214728: "OpenDatabaseCoordRequest", 2828131: "GlobalConfigRefreshRequest",
    9144680: "GetKeyServerLocationsRequest", 9467439: "GetServerDBInfoRequest",
    9467438: "UpdateServerDBInfoRequest", 14332605: "RegisterWorkerRequest", 1254174: "GetWorkersRequest",
    905920: "RecruitStorageRequest", 16665642: "InitializeStorageRequest", 8265613: "InitializeGrvProxyRequest",
    10344153: "InitializeCommitProxyRequest", 15604392: "InitializeTLogRequest",
    6416816: "InitializeRatekeeperRequest", 4022206: "TLogCommitRequest", 11001131: "TLogPeekRequest",
    10072821: "TLogPeekStreamRequest", 13290999: "GetStorageMetricsRequest", 14419140: "StatusRequest",
    4707015: "PingRequest", 10624019: "EchoRequest", 4146513: "NetworkTestRequest",
    72435: "RecruitBlobWorkerRequest", 5838547: "InitializeBlobWorkerRequest",
    2567474: "InitializeBlobManagerRequest", 1985879: "HaltBlobWorkerRequest", 4149140: "HaltBlobManagerRequest",
    4150141: "BlobGranuleFileRequest", 2508597: "GetBlobGranuleLocationsRequest",
    905381: "AssignBlobRangeRequest", 4844288: "RevokeBlobRangeRequest", 7932681: "InitializeBlobMigratorRequest",
    4980139: "HaltBlobMigratorRequest", 4180191: "InitializeEncryptKeyProxyRequest",
    2378138: "HaltEncryptKeyProxyRequest", 923040: "ConfigTransactionGetRequest",
    103841: "ConfigTransactionCommitRequest", 178935: "ConfigFollowerGetChangesRequest",
    601281: "ConfigBroadcastChangesRequest", 3104275: "InitializeConsistencyScanRequest",
    2323417: "HaltConsistencyScanRequest",
    15302073: "StorageServerInterface", 8743216: "GrvProxyInterface", 8954922: "CommitProxyInterface",
    5979145: "MasterInterface", 5983305: "RatekeeperInterface", 12383874: "DataDistributorInterface",
    16308510: "TLogInterface", 1755944: "ResolverInterface", 8358753: "BlobWorkerInterface",
    369169: "BlobManagerInterface", 1303419: "EncryptKeyProxyInterface", 4983265: "ConsistencyScanInterface",
    14712718: "WorkerInterface", 15888863: "ClusterInterface", 985636: "ProcessInterface",
}
ERROR_OR = 2  # the ErrorOr<T> wrapper's tag in a composed file identifier's top byte
TAG_ERROR, TAG_VALUE = 1, 2  # ErrorOr's union type tags (flatbuffers counts alternatives from 1)
ERROR_FILE_ID = 14065384  # Error's own file identifier
VERSION_MAGIC = b"\xdb\x1f"  # bytes 6-7 of the protocol version with the object serializer flag
PACKET_LIMIT = 100 * 1024 * 1024  # L7_FDB_PACKET_LIMIT
HEAD = 36  # L7_FDB_HEAD: length, checksum, token, root offset, file identifier
TOKEN = 16
MAX_PENDING = 64  # requests of one connection waiting (the oldest go first)
MAX_CONNECTIONS = 1024  # connections followed (the least recently used go first)
KEEP_REQUEST = 256  # bytes of a request's message searched for its reply's token


def u32(data: bytes, pos: int) -> int:
    if pos < 0 or pos + 4 > len(data):
        raise IndexError(pos)
    return int.from_bytes(data[pos:pos + 4], "little")


def connect_length(head: bytes) -> int | None:
    """A ConnectPacket's size with its length field, from its first bytes, or None."""
    if len(head) < 12 or head[9] != 0 or head[10:12] != VERSION_MAGIC:
        return None
    n = u32(head, 0)
    return 4 + n if 16 <= n <= 128 else None


def packet_layout(head: bytes) -> bool | None:
    """Whether the packet whose first 36 bytes are `head` has a checksum (True), not (False), or
    None when neither place holds a request's or a reply's file identifier."""
    for checksum, pos in ((True, 28), (False, 20)):
        root, fid = u32(head, pos), u32(head, pos + 4)
        if 8 <= root < u32(head, 0) and (fid in REQUESTS or fid >> 24 == ERROR_OR):
            return checksum
    return None


@dataclass(frozen=True)
class Packet:
    token: bytes
    file_id: int
    message: bytes  # the flatbuffers message, as far as it was captured


class Side:
    """One direction of a connection: its framing, and whether its packets carry a checksum."""

    def __init__(self) -> None:
        self.checksum: bool | None = None
        self.framer = Framer(HEAD, self._size)

    def _size(self, head: bytes) -> int | None:
        connect = connect_length(head) if self.checksum is None else None  # only before the first packet
        if connect is not None:
            return connect
        n = u32(head, 0)
        if not 24 <= n <= PACKET_LIMIT:
            return None
        if self.checksum is None:
            self.checksum = packet_layout(head)
            if self.checksum is None:
                return None
        return (12 if self.checksum else 4) + n

    def packet(self, data: bytes) -> Packet | None:
        if connect_length(data) is not None or self.checksum is None:
            return None
        start = 12 if self.checksum else 4
        message = data[start + TOKEN:]
        if len(message) < 8:
            return None
        return Packet(data[start:start + TOKEN], u32(message, 4), message)


def i32(data: bytes, pos: int) -> int:
    if pos < 0 or pos + 4 > len(data):
        raise IndexError(pos)
    return int.from_bytes(data[pos:pos + 4], "little", signed=True)


def u16(data: bytes, pos: int) -> int:
    if pos < 0 or pos + 2 > len(data):
        raise IndexError(pos)
    return int.from_bytes(data[pos:pos + 2], "little")


def field_at(m: bytes, table: int, index: int) -> int:
    """The position of a table's field `index` (0 when the vtable does not have it)."""
    vt = table - i32(m, table)
    if 4 + 2 * index + 2 > u16(m, vt):
        return 0
    off = u16(m, vt + 4 + 2 * index)
    return table + off if off >= 4 else 0


def reply_error(message: bytes) -> int | None:
    """The error code of an ErrorOr reply that is an Error; None for a value or what cannot be read."""
    try:
        root = u32(message, 0)
        tag_at = field_at(message, root, 0)
        if not tag_at or tag_at >= len(message) or message[tag_at] != TAG_ERROR:
            return None
        value_at = field_at(message, root, 1)
        if not value_at:
            return None
        error = value_at + u32(message, value_at)
        code_at = field_at(message, error, 0)
        return u16(message, code_at) if code_at else None
    except IndexError:
        return None


@dataclass
class Pending:
    name: str
    message: bytes  # its first KEEP_REQUEST bytes: its reply promise's token is among them
    ts_ns: int


@dataclass
class Connection:
    client: Side = field(default_factory=Side)
    server: Side = field(default_factory=Side)
    pending: OrderedDict[int, Pending] = field(default_factory=OrderedDict)  # by arrival
    seq: int = 0


# ---------------------------------------------------------------- wire samples and tests --

def connect_packet(version: int = 0x0FDB00B073000000 | 0x1000000000000000) -> bytes:
    """A ConnectPacket (IPv4, no canonical address): 44 bytes."""
    body = struct.pack("<QHQIH16s", version, 0, 0, 0, 0, bytes(16))
    return struct.pack("<I", len(body)) + body


def _table(fields: list[tuple[str, bytes | int]], vtable_at: int, at: int) -> tuple[bytes, bytes]:
    """A table at position `at` with its vtable at `vtable_at`: (table bytes, vtable bytes)."""
    body = b""
    offsets = []
    for kind, value in fields:
        pos = 4 + len(body)
        if kind == "ref":
            assert isinstance(value, int)
            body += struct.pack("<I", (value - (at + pos)) & 0xFFFFFFFF)
        elif kind == "u8":
            body += bytes([int(value)])
        elif kind == "u16":
            body += struct.pack("<H", value)
        elif kind == "u64":
            body += struct.pack("<Q", value)
        else:
            assert isinstance(value, bytes)
            body += value
        offsets.append(pos)
    table = struct.pack("<i", at - vtable_at) + body
    table += bytes(-len(table) % 4)
    vtable = struct.pack("<HH", 4 + 2 * len(offsets), len(table)) + b"".join(struct.pack("<H", o) for o in offsets)
    return table, vtable + bytes(-len(vtable) % 4)


def message(file_id: int, tables: list[list[tuple[str, bytes | int]]]) -> bytes:
    """A flatbuffers message as FoundationDB lays it out (samples and tests): the root offset and
    `file_id`, the tables in order (the first is the root), their vtables at the end. A field is
    (kind, value): "u8", "u16", "u64", "uid" (16 bytes as given) or "ref" (an offset to the table
    whose index is the value)."""
    shapes = [_table(t, 0, 0) for t in tables]  # the sizes: a table's and its vtable's
    at, pos = [], 8
    for table, _ in shapes:
        at.append(pos)
        pos += len(table)
    vt_at, vts = [], b""
    for _, vtable in shapes:
        vt_at.append(pos + len(vts))
        vts += vtable
    out = struct.pack("<II", at[0], file_id)
    for i, t in enumerate(tables):
        resolved = [(k, at[int(v)] if k == "ref" else v) for k, v in t]
        out += _table(resolved, vt_at[i], at[i])[0]
    return out + vts


def packet(token: bytes, msg: bytes, checksum: bool = True) -> bytes:
    """A packet to `token` (the checksum is not computed here: any 8 bytes pass the parser)."""
    return struct.pack("<I", TOKEN + len(msg)) + (bytes(8) if checksum else b"") + token + msg


def request(file_id: int, reply_token: bytes, to: bytes = b"\x01" * 16, key: bytes = b"k",
            checksum: bool = True) -> bytes:
    """A request as a flatbuffers message: the root (its one field, the request), the request's
    version, reply promise token and key (a table standing in for the key's vector)."""
    tables: list[list[tuple[str, bytes | int]]] = [
        [("ref", 1)], [("u64", 7), ("uid", reply_token), ("ref", 2)], [("u16", len(key)), ("uid", key.ljust(16, b"\0")[:16])]]
    return packet(to, message(file_id, tables), checksum)


def reply(token: bytes, file_id: int, error: int | None = None, checksum: bool = True) -> bytes:
    """An ErrorOr<EnsureTable<reply>> to `token`: an Error with its code, or a value."""
    if error is not None:
        tables: list[list[tuple[str, bytes | int]]] = [[("u8", TAG_ERROR), ("ref", 1)], [("u16", error)]]
    else:
        tables = [[("u8", TAG_VALUE), ("ref", 1)], [("u64", 42)]]
    return packet(token, message(ERROR_OR << 24 | file_id, tables), checksum)


GET_VALUE, GET_READ_VERSION, COMMIT = 8454530, 838566, 93948
GET_VALUE_REPLY, GET_READ_VERSION_REPLY, VOID = 1378929, 15709388, 2010442
T1, T2 = bytes(range(16)), bytes(range(16, 32))


class FoundationDB(p.Protocol):
    id = contract.FOUNDATIONDB
    name = "foundationdb"
    stem = p.Stem("foundationdb", "requests")
    streaming = True
    kernel_requests = (
        request(GET_VALUE, T1),
        request(GET_READ_VERSION, T1) + request(COMMIT, T2),  # two at once
        request(COMMIT, T2, checksum=False),  # TLS: no checksum
        connect_packet() + request(GET_VALUE, T1),  # the connection's first write
        request(4707015, T1)[:36],  # a ping, its first bytes in this segment of the write
    )
    kernel_non_requests = (
        connect_packet(),  # alone
        reply(T1, GET_VALUE_REPLY),  # a reply
        reply(T1, VOID, error=1007),
        request(1234567, T1),  # an unknown type
        request(GET_VALUE, T1)[:35],  # shorter than a packet's head
        struct.pack("<I", 0x7FFFFFFF) + request(GET_VALUE, T1)[4:],  # beyond the packet limit
        connect_packet() + reply(T1, VOID),
    )

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._conns: OrderedDict[p.ConnKey, Connection] = OrderedDict()

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        return []  # a stream protocol: see feed

    def feed(self, conn: p.ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[p.Request]:
        c = self._conns.get(conn)
        if c is None:
            c = self._conns[conn] = Connection()
            if len(self._conns) > MAX_CONNECTIONS:
                self._conns.popitem(last=False)
        else:
            self._conns.move_to_end(conn)
        out: list[p.Request] = []
        side = c.client if client else c.server
        try:
            for f in side.framer.feed(data, size, ts_ns):
                pk = side.packet(f.data)
                if pk is None:
                    continue
                if client:
                    if pk.file_id in REQUESTS:
                        c.seq += 1
                        c.pending[c.seq] = Pending(REQUESTS[pk.file_id], pk.message[:KEEP_REQUEST], f.ts_ns)
                        if len(c.pending) > MAX_PENDING:
                            c.pending.popitem(last=False)
                elif pk.file_id >> 24 == ERROR_OR:
                    self._reply(c, pk, f.ts_ns, out)
        except (IndexError, ValueError):  # garbage in: this direction starts over
            if client:
                c.client = Side()
            else:
                c.server = Side()
        return out

    def _reply(self, c: Connection, pk: Packet, ts: int, out: list[p.Request]) -> None:
        for seq, waiting in c.pending.items():
            if pk.token in waiting.message:
                del c.pending[seq]
                code = reply_error(pk.message)
                out.append(p.Request(self.id, "ok" if code is None else "failed", max(ts - waiting.ts_ns, 0) / 1e9,
                                     waiting.name, error="" if code is None else str(code),
                                     code=code or 0, start_ns=waiting.ts_ns))
                return

    def forget(self, containers: set[str]) -> None:
        """Connections go with their LRU bound; nothing is kept per container."""
