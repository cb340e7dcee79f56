"""FoundationDB's flow transport, written for the FoundationDB tests from FoundationDB's own
sources (fdbrpc/FlowTransport.cpp: ConnectPacket, the packet framing and its XXH3 checksum;
flow/flat_buffers.h: the flatbuffers layout of messages, ErrorOr's union; fdbrpc/fdbrpc.h: a
request's reply promise serialized as its token, the reply sent to that token) as far as a
client's GetValue, GetReadVersion and Commit requests and their replies need: no FoundationDB
client library can be installed here (the foundationdb package on PyPI is a binding to
libfdb_c, which no Debian package ships), nor a server.

A packet: length (u32, little-endian, of what follows the checksum), XXH3-64 of those bytes (u64),
the destination token (16 bytes), the message: root table offset (u32), file identifier (u32),
tables (each an int32 offset back to its vtable, then its fields), vectors (a u32 count, then the
elements), vtables (u16 vtable size, u16 table size, u16 per field: its offset in the table)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import xxhash

PROTOCOL_VERSION = 0x0FDB00B073000000 | 0x1000000000000000  # 7.3, with the object serializer flag
GET_VALUE, GET_READ_VERSION, COMMIT = 8454530, 838566, 93948
GET_VALUE_REPLY, GET_READ_VERSION_REPLY, COMMIT_ID = 1378929, 15709388, 14254927
ERROR_OR = 2 << 24
TAG_ERROR, TAG_VALUE = 1, 2
NAMES = {GET_VALUE: "GetValueRequest", GET_READ_VERSION: "GetReadVersionRequest", COMMIT: "CommitTransactionRequest"}


def connect_packet() -> bytes:
    body = struct.pack("<QHQIH16s", PROTOCOL_VERSION, 0, 0, 0x7F000001, 0, bytes(16))
    return struct.pack("<I", len(body)) + body


Field = tuple[str, object]  # ("u8" | "u16" | "u64" | "uid" | "table" | "bytes", value)


def flatbuffer(file_id: int, root: list[Field]) -> bytes:
    """A message whose root table has `root`'s fields; a "table" field's value is a list of
    fields (a sub-table), a "bytes" field's a byte string (a vector of u8)."""
    tables: list[list[Field]] = []
    vectors: list[bytes] = []
    target: dict[tuple[int, int], int] = {}  # (table, field) -> the index of its table or vector

    def collect(fields: list[Field]) -> int:
        tables.append(fields)
        me = len(tables) - 1
        for i, (kind, value) in enumerate(fields):
            if kind == "table":
                target[(me, i)] = collect(value)  # type: ignore[arg-type]
            elif kind == "bytes":
                target[(me, i)] = len(vectors)
                vectors.append(value)  # type: ignore[arg-type]
        return me

    collect(root)
    sizes = {"u8": 1, "u16": 2, "u64": 8, "uid": 16, "table": 4, "bytes": 4}
    table_len = [4 + sum(sizes[k] for k, _ in t) for t in tables]
    table_len = [n + (-n % 4) for n in table_len]
    table_at, pos = [], 8
    for n in table_len:
        table_at.append(pos)
        pos += n
    vector_at = []
    for v in vectors:
        vector_at.append(pos)
        pos += 4 + len(v) + (-(4 + len(v)) % 4)
    vtable_at = []
    for t in tables:
        vtable_at.append(pos)
        n = 4 + 2 * len(t)
        pos += n + (-n % 4)
    out = bytearray(pos)
    struct.pack_into("<II", out, 0, table_at[0], file_id)
    for i, t in enumerate(tables):
        at = table_at[i]
        struct.pack_into("<i", out, at, at - vtable_at[i])
        offsets, p = [], at + 4
        for j, (kind, value) in enumerate(t):
            offsets.append(p - at)
            if kind == "u8":
                out[p] = value  # type: ignore[call-overload]
            elif kind == "u16":
                struct.pack_into("<H", out, p, value)
            elif kind == "u64":
                struct.pack_into("<Q", out, p, value)
            elif kind == "uid":
                out[p:p + 16] = value  # type: ignore[index]
            elif kind == "table":
                struct.pack_into("<I", out, p, table_at[target[(i, j)]] - p)
            else:
                struct.pack_into("<I", out, p, vector_at[target[(i, j)]] - p)
            p += sizes[kind]
        struct.pack_into(f"<HH{len(offsets)}H", out, vtable_at[i], 4 + 2 * len(offsets), table_len[i], *offsets)
    for v, at in zip(vectors, vector_at, strict=True):
        struct.pack_into("<I", out, at, len(v))
        out[at + 4:at + 4 + len(v)] = v
    return bytes(out)


def packet(token: bytes, message: bytes) -> bytes:
    body = token + message
    return struct.pack("<IQ", len(body), xxhash.xxh3_64_intdigest(body)) + body


def request(file_id: int, reply_token: bytes, key: bytes, to: bytes) -> bytes:
    """A request to endpoint `to`: the root's one field is the request, whose fields are a
    version, its reply promise (the token) and the key."""
    return packet(to, flatbuffer(file_id, [("table", [("u64", 7), ("uid", reply_token), ("bytes", key)])]))


def reply(token: bytes, file_id: int, error: int | None = None) -> bytes:
    """ErrorOr<EnsureTable<reply>>: the union's type tag and the Error or the reply table."""
    if error is not None:
        root: list[Field] = [("u8", TAG_ERROR), ("table", [("u16", error)])]
    else:
        root = [("u8", TAG_VALUE), ("table", [("u64", 42), ("bytes", b"value")])]
    return packet(token, flatbuffer(ERROR_OR | file_id, root))


# ---------------------------------------------------------------------------------- reading --

class Reader:
    """A connection's bytes as FoundationDB's transport reads them: as much as has come (up to
    64 KiB) at each read, packets cut from that buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def read_connect(r: Reader) -> int:
    """The peer's ConnectPacket: its protocol version."""
    n = struct.unpack("<I", r.take(4))[0]
    body = r.take(n)
    return int(struct.unpack_from("<Q", body)[0])


@dataclass(frozen=True)
class Packet:
    token: bytes
    message: bytes

    @property
    def file_id(self) -> int:
        return int(struct.unpack_from("<I", self.message, 4)[0])

    def field(self, table: int, index: int) -> int:
        """The position of field `index` of the table at `table`."""
        vt = table - struct.unpack_from("<i", self.message, table)[0]
        return table + struct.unpack_from("<H", self.message, vt + 4 + 2 * index)[0]

    def ref(self, at: int) -> int:
        return at + int(struct.unpack_from("<I", self.message, at)[0])

    @property
    def root(self) -> int:
        return int(struct.unpack_from("<I", self.message, 0)[0])


def read_packet(r: Reader) -> Packet:
    n, checksum = struct.unpack("<IQ", r.take(12))
    body = r.take(n)
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise ValueError("checksum mismatch")
    return Packet(body[:16], body[16:])


def request_fields(pk: Packet) -> tuple[bytes, bytes]:
    """A request's reply token and key."""
    req = pk.ref(pk.field(pk.root, 0))
    token = pk.message[pk.field(req, 1):pk.field(req, 1) + 16]
    at = pk.ref(pk.field(req, 2))
    n = struct.unpack_from("<I", pk.message, at)[0]
    return token, pk.message[at + 4:at + 4 + n]


def reply_error(pk: Packet) -> int | None:
    """The error code of an ErrorOr reply, None for a value."""
    if pk.message[pk.field(pk.root, 0)] != TAG_ERROR:
        return None
    err = pk.ref(pk.field(pk.root, 1))
    return int(struct.unpack_from("<H", pk.message, pk.field(err, 0))[0])
