"""A Cassandra node stand-in for the Cassandra tests: no Debian package ships Cassandra (and a JVM
node is not installable here), so this answers the CQL native protocol by its specification
(Cassandra's doc/native_protocol_v4.spec and _v5.spec) as far as cassandra-driver needs, one node
at 127.0.0.1:PORT, protocol v3-v5:

- OPTIONS: SUPPORTED (LZ4 compression offered); STARTUP and REGISTER: READY. In v5, every
  message after the READY that answers STARTUP travels in segments (a 3-byte header with its
  CRC24, the payload, its CRC32), both ways, as the spec's framing section says; when the STARTUP
  asked for COMPRESSION lz4, in compressed segments (a 5-byte header — compressed and
  uncompressed payload lengths, self-contained flag — with its CRC24, the payload an LZ4 block
  made by the `lz4` package, or stored as is with an uncompressed length of 0 when LZ4 does not
  make it smaller, its CRC32). v4's compressed envelopes are not spoken: ask for LZ4 in v5 only;
- QUERY: system.local answers one row for this node, system.peers(_v2) none; a statement that
  names a table starting with "missing" is answered with ERROR 0x2200 (Invalid), one that does
  not parse ("SELEC ...") with 0x2000 (Syntax error); SELECT answers one row, anything else Void;
- PREPARE: a prepared id (the statement's MD5) with its bind variables' metadata; EXECUTE of a
  statement on a "missing..." table: ERROR 0x2200, else as QUERY; an unknown id: 0x2500;
- BATCH: Void, or ERROR 0x2200 when one of its statements names a "missing..." table.

A statement on table ca.slow or ca.missing_slow with `id = N` is answered (20 - N) * DELAY_MS / 20 ms after it came
while later requests are read and answered meanwhile: requests multiplexed on one connection are
answered out of order. Each answer is logged to stdout as a JSON line {"op", "stream", "version",
"lz4" (its connection's segments are compressed), "status", "statement"}.

    python -m tests.system.workloads.cassandra_responder PORT [DELAY_MS]
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import sys
import threading
import uuid
import zlib

import lz4.block

ERROR, STARTUP, READY, OPTIONS, SUPPORTED, QUERY, RESULT, PREPARE, EXECUTE, REGISTER, BATCH = (
    0x00, 0x01, 0x02, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D)
NAMES = {STARTUP: "STARTUP", OPTIONS: "OPTIONS", QUERY: "QUERY", PREPARE: "PREPARE", EXECUTE: "EXECUTE",
         REGISTER: "REGISTER", BATCH: "BATCH"}
VARCHAR, UUID, INET, SET = 0x000D, 0x000C, 0x0010, 0x0022
LOCK = threading.Lock()
PREPARED: dict[bytes, str] = {}
HOST_ID, SCHEMA = uuid.UUID(int=1), uuid.UUID(int=2)


def crc24(value: int, length: int = 3) -> int:
    crc = 0x875060
    for _ in range(length):
        crc ^= (value & 0xFF) << 16
        value >>= 8
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1974F0B
    return crc & 0xFFFFFF


def segment(payload: bytes) -> bytes:
    value = len(payload) | 1 << 17  # self-contained
    crc = zlib.crc32(payload, zlib.crc32(b"\xfa\x2d\x55\xca"))  # the spec's CRC32 initial bytes
    return value.to_bytes(3, "little") + crc24(value).to_bytes(3, "little") + payload + crc.to_bytes(4, "little")


def compressed_segment(payload: bytes) -> bytes:
    block = lz4.block.compress(payload, store_size=False)
    body, n = (block, len(payload)) if len(block) < len(payload) else (payload, 0)
    value = len(body) | n << 17 | 1 << 34  # self-contained
    crc = zlib.crc32(body, zlib.crc32(b"\xfa\x2d\x55\xca"))
    return value.to_bytes(5, "little") + crc24(value, 5).to_bytes(3, "little") + body + crc.to_bytes(4, "little")


def string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


def short_bytes(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def value(b: bytes | None) -> bytes:
    return struct.pack(">i", -1) if b is None else struct.pack(">i", len(b)) + b


def inet(ip: str) -> bytes:
    return socket.inet_aton(ip)


def rows(columns: list[tuple[str, bytes]], data: list[list[bytes | None]], table: str = "t") -> bytes:
    """RESULT Rows: a global table spec, the columns (name, type option), the rows."""
    meta = struct.pack(">ii", 0x0001, len(columns)) + string("system") + string(table)
    meta += b"".join(string(name) + t for name, t in columns)
    body = struct.pack(">i", len(data)) + b"".join(b"".join(value(v) for v in row) for row in data)
    return struct.pack(">i", 2) + meta + body


def t(code: int) -> bytes:
    return struct.pack(">H", code)


def local_row(port: int) -> bytes:
    cols = [("key", t(VARCHAR)), ("cluster_name", t(VARCHAR)), ("data_center", t(VARCHAR)),
            ("rack", t(VARCHAR)), ("release_version", t(VARCHAR)), ("partitioner", t(VARCHAR)),
            ("rpc_address", t(INET)), ("broadcast_address", t(INET)), ("listen_address", t(INET)),
            ("host_id", t(UUID)), ("schema_version", t(UUID)), ("tokens", t(SET) + t(VARCHAR))]
    tokens = struct.pack(">i", 1) + value(b"0")
    row = [b"local", b"ca-cluster", b"dc1", b"r1", b"4.1.5", b"org.apache.cassandra.dht.Murmur3Partitioner",
           inet("127.0.0.1"), inet("127.0.0.1"), inet("127.0.0.1"), HOST_ID.bytes, SCHEMA.bytes, tokens]
    return rows(cols, [row], "local")


def error(code: int, message: str) -> bytes:
    return struct.pack(">i", code) + string(message)


def answer_statement(cql: str, port: int) -> tuple[int, bytes]:
    low = cql.strip().lower()
    if "system.local" in low:
        return RESULT, local_row(port)
    if "system.peers" in low:
        return RESULT, rows([("peer", t(INET))], [], "peers")
    if re.search(r"\bmissing\w*", low):
        return ERROR, error(0x2200, "unconfigured table")
    if not re.match(r"(select|insert|update|delete|use|begin|create)\b", low):
        return ERROR, error(0x2000, "line 1:0 no viable alternative at input")
    if low.startswith("use "):
        return RESULT, struct.pack(">i", 3) + string(low[4:].strip(' ;"'))
    if low.startswith("select"):
        return RESULT, rows([("name", t(VARCHAR))], [[b"x"]], "people")
    return RESULT, struct.pack(">i", 1)  # Void


class Conn:
    def __init__(self, sock: socket.socket, port: int, delay_ms: int) -> None:
        self.sock, self.port, self.delay_ms = sock, port, delay_ms
        self.segments = False  # v5 framing, after the READY that answers STARTUP
        self.lz4 = False  # and its segments compressed (the STARTUP asked for lz4)
        self.write_lock = threading.Lock()

    def send(self, version: int, stream: int, opcode: int, body: bytes) -> None:
        msg = struct.pack(">BBhBi", version | 0x80, 0, stream, opcode, len(body)) + body
        with self.write_lock:
            self.sock.sendall((compressed_segment(msg) if self.lz4 else segment(msg)) if self.segments else msg)

    def answer(self, version: int, stream: int, op: int, body: bytes) -> None:
        r = Reader(body)
        statement = ""
        if op == OPTIONS:
            out = struct.pack(">H", 3) + string("CQL_VERSION") + struct.pack(">H", 1) + string("3.4.5")
            out += string("COMPRESSION") + struct.pack(">H", 1) + string("lz4")
            out += string("PROTOCOL_VERSIONS") + struct.pack(">H", 3) + string("3/v3") + string("4/v4") + string("5/v5")
            self.reply(version, stream, op, SUPPORTED, out, "")
            return
        if op in (STARTUP, REGISTER):
            options = {r.string(): r.string() for _ in range(r.short())} if op == STARTUP else {}
            self.reply(version, stream, op, READY, b"", "")
            if op == STARTUP and version >= 5:
                self.segments = True
                self.lz4 = options.get("COMPRESSION") == "lz4"
            return
        if op == QUERY:
            statement = r.long_string()
            code, out = answer_statement(statement, self.port)
        elif op == PREPARE:
            statement = r.long_string()
            pid = hashlib.md5(statement.encode()).digest()
            PREPARED[pid] = statement
            n = statement.count("?")
            meta = struct.pack(">iii", 0x0001, n, 0) + string("ca") + string("people")
            meta += b"".join(string(f"p{i}") + t(VARCHAR) for i in range(n))
            result_meta = struct.pack(">ii", 0x0004, 0)
            ids = short_bytes(pid) + (short_bytes(pid[:8]) if version >= 5 else b"")
            code, out = RESULT, struct.pack(">i", 4) + ids + meta + result_meta
        elif op == EXECUTE:
            pid = r.short_bytes()
            known = PREPARED.get(pid)
            if known is None:
                code, out = ERROR, error(0x2500, "unprepared") + short_bytes(pid)
            else:
                statement = known
                code, out = answer_statement(known, self.port)
        elif op == BATCH:
            r.take(1)
            parts = []
            for _ in range(r.short()):
                kind = r.take(1)[0]
                parts.append(r.long_string() if kind == 0 else PREPARED.get(r.short_bytes(), ""))
                for _ in range(r.short()):
                    r.value()
            statement = "; ".join(parts)
            bad = any(re.search(r"\bmissing\w*", s.lower()) for s in parts)
            code, out = (ERROR, error(0x2200, "unconfigured table")) if bad else (RESULT, struct.pack(">i", 1))
        else:
            code, out = ERROR, error(0x000A, f"unexpected opcode {op}")
        m = re.search(r"ca\.(?:missing_)?slow\b.*\bid\s*=\s*(\d+)", statement)
        if m and self.delay_ms:
            delay = max(20 - int(m[1]), 1) * self.delay_ms / 20 / 1000
            threading.Timer(delay, self.reply, (version, stream, op, code, out, statement)).start()
        else:
            self.reply(version, stream, op, code, out, statement)

    def reply(self, version: int, stream: int, op: int, code: int, body: bytes, statement: str) -> None:
        with LOCK:  # logged before it is sent: a client that has its answer finds it logged
            sys.stdout.write(json.dumps({"op": NAMES.get(op, str(op)), "stream": stream, "version": version,
                                         "lz4": self.lz4,
                                         "status": "failed" if code == ERROR else "ok",
                                         "statement": statement}) + "\n")
            sys.stdout.flush()
        try:
            self.send(version, stream, code, body)
        except OSError:
            return

    def serve(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                buf += data
                while True:
                    msg, buf = self.next_message(buf)
                    if msg is None:
                        break
                    version, _flags, stream, op, length = struct.unpack(">BBhBi", msg[:9])
                    self.answer(version, stream, op, msg[9:9 + length])
        except OSError:
            return
        finally:
            self.sock.close()

    def next_message(self, buf: bytes) -> tuple[bytes | None, bytes]:
        if self.segments:
            size = 5 if self.lz4 else 3  # the header, before its CRC24
            if len(buf) < size + 3:
                return None, buf
            head = int.from_bytes(buf[:size], "little")
            if crc24(head, size) != int.from_bytes(buf[size:size + 3], "little"):
                raise OSError("bad segment header")
            n, at = head & 0x1FFFF, size + 3
            if len(buf) < at + n + 4:
                return None, buf
            payload, rest = buf[at:at + n], buf[at + n + 4:]  # the driver's messages fit in one segment each
            uncompressed = head >> 17 & 0x1FFFF if self.lz4 else 0
            if uncompressed:
                payload = lz4.block.decompress(payload, uncompressed_size=uncompressed)
            return payload, rest
        if len(buf) < 9:
            return None, buf
        n = struct.unpack(">i", buf[5:9])[0]
        if len(buf) < 9 + n:
            return None, buf
        return buf[:9 + n], buf[9 + n:]


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def short(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def string(self) -> str:
        return self.take(self.short()).decode()

    def long_string(self) -> str:
        return self.take(struct.unpack(">i", self.take(4))[0]).decode()

    def short_bytes(self) -> bytes:
        return self.take(self.short())

    def value(self) -> None:
        n = struct.unpack(">i", self.take(4))[0]
        if n > 0:
            self.take(n)


def main() -> None:
    port = int(sys.argv[1])
    delay_ms = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Conn(sock, port, delay_ms).serve, daemon=True).start()


if __name__ == "__main__":
    main()
