"""A MySQL/MariaDB client on the wire (the client/server protocol: handshake v10,
mysql_native_password, the text protocol and the binary protocol of prepared statements), for the
MySQL tests. It logs in, runs what the specs say one command at a time, reading each answer
whole before the next, prints one JSON line with what the server answered, then waits for stdin
to close before it exits, so the agent sees the process alive while it handles the events.

    run PORT USER PASSWORD DATABASE SPEC ...   each SPEC is OP:N
        ok          N COM_QUERY `SELECT <i> + 1, 'secret-<i>'` (a result set)
        fail        N COM_QUERY of a missing table (ERR 1146)
        long        N COM_QUERY `SELECT <i> AS n, '<3000 x>' AS pad` (longer than the payload the
                    kernel keeps; its answer longer than the answer bytes it keeps)
        insert      N COM_QUERY `INSERT INTO ca_kv VALUES (<i>, 'v-<i>')` (OK)
        prep        one COM_STMT_PREPARE of `SELECT ? + 1, 'abc' AS s`, N COM_STMT_EXECUTE of
                    it with 1..N, then COM_STMT_CLOSE (no answer)
        prep-bad    N COM_STMT_PREPARE of a statement with a syntax error (ERR 1064)
        exec-dup    one COM_STMT_PREPARE of `INSERT INTO ca_dup VALUES (?, 'x')`, 1 + N
                    COM_STMT_EXECUTE with the same key, the client's pid (one OK, then N
                    ERR 1062: a duplicate), then COM_STMT_CLOSE
    prints {"answers": [[command, status, code], ...], "counts": {"ok": n, "failed": n},
            "prepared": [statement id, ...]}
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
from collections import Counter
from collections.abc import Callable

COM_QUIT, COM_QUERY, COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_CLOSE = 0x01, 0x03, 0x16, 0x17, 0x19
# CLIENT_LONG_PASSWORD, _LONG_FLAG, _CONNECT_WITH_DB, _PROTOCOL_41, _TRANSACTIONS,
# _SECURE_CONNECTION, _MULTI_RESULTS, _PLUGIN_AUTH
CAPABILITIES = 0x1 | 0x4 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x20000 | 0x80000
MYSQL_TYPE_LONGLONG = 0x08
SERVER_MORE_RESULTS_EXIST = 0x0008


class ServerError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def native_password(password: str, scramble: bytes) -> bytes:
    """mysql_native_password: SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password)))."""
    if not password:
        return b""
    h1 = hashlib.sha1(password.encode()).digest()
    h2 = hashlib.sha1(h1).digest()
    h3 = hashlib.sha1(scramble + h2).digest()
    return bytes(a ^ b for a, b in zip(h1, h3, strict=True))


def lenenc(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(data[pos + 1:pos + 1 + size], "little"), pos + 1 + size


def error_of(payload: bytes) -> ServerError:
    code = int.from_bytes(payload[1:3], "little")
    return ServerError(code, payload[9:].decode(errors="replace"))


class Connection:
    def __init__(self, port: int, user: str, password: str, database: str) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.seq = 0
        greeting = self.packet()
        if greeting[0] == 0xFF:
            raise error_of(greeting)
        # protocol 10: version\0, thread id (4), scramble part 1 (8), 0, capabilities (2),
        # charset, status (2), capabilities (2), scramble length, 10 reserved, scramble part 2
        end = greeting.index(b"\0", 1)
        pos = end + 1 + 4
        scramble = greeting[pos:pos + 8]
        pos += 8 + 1 + 2 + 1 + 2 + 2 + 1 + 10
        scramble += greeting[pos:pos + 12]
        token = native_password(password, scramble)
        login = (struct.pack("<IIB23x", CAPABILITIES, 1 << 24, 33) + user.encode() + b"\0"
                 + bytes([len(token)]) + token + database.encode() + b"\0" + b"mysql_native_password\0")
        self.send(login, seq=1)
        answer = self.packet()
        if answer[0] == 0xFE:  # an auth switch: the plug-in's name, then its scramble
            name_end = answer.index(b"\0", 1)
            self.send(native_password(password, answer[name_end + 1:].rstrip(b"\0")), seq=self.seq + 1)
            answer = self.packet()
        if answer[0] == 0xFF:
            raise error_of(answer)

    # ---------------------------------------------------------------------- packets --

    def send(self, payload: bytes, seq: int = 0) -> None:
        """One packet in one write (as client libraries write a command)."""
        self.s.sendall(struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload)
        self.seq = seq

    def packet(self) -> bytes:
        while len(self.buf) < 4 or len(self.buf) < 4 + int.from_bytes(self.buf[:3], "little"):
            more = self.s.recv(65536)
            if not more:
                raise EOFError("the server closed the connection")
            self.buf += more
        n = int.from_bytes(self.buf[:3], "little")
        self.seq = self.buf[3]
        payload, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return payload

    def until_eof(self) -> None:
        while True:
            p = self.packet()
            if p[0] == 0xFE and len(p) < 9:
                return
            if p[0] == 0xFF:
                raise error_of(p)

    def result(self) -> int:
        """Reads an answer to a query or an execute whole; returns its rows (or affected rows)."""
        first = self.packet()
        if first[0] == 0xFF:
            raise error_of(first)
        if first[0] == 0x00:
            affected, _ = lenenc(first, 1)
            return affected
        columns, _ = lenenc(first, 0)
        for _ in range(columns):
            self.packet()
        self.until_eof()  # after the column definitions
        rows = 0
        while True:
            p = self.packet()
            if p[0] == 0xFE and len(p) < 9:
                return rows
            if p[0] == 0xFF:
                raise error_of(p)
            rows += 1

    # --------------------------------------------------------------------- commands --

    def query(self, sql: str) -> int:
        self.send(bytes([COM_QUERY]) + sql.encode())
        return self.result()

    def prepare(self, sql: str) -> tuple[int, int]:
        """(statement id, parameter count)"""
        self.send(bytes([COM_STMT_PREPARE]) + sql.encode())
        ok = self.packet()
        if ok[0] == 0xFF:
            raise error_of(ok)
        stmt, columns, params = struct.unpack_from("<IHH", ok, 1)
        if params:
            for _ in range(params):
                self.packet()
            self.until_eof()
        if columns:
            for _ in range(columns):
                self.packet()
            self.until_eof()
        return stmt, params

    def execute(self, stmt: int, *args: int) -> int:
        body = bytes([COM_STMT_EXECUTE]) + struct.pack("<IBI", stmt, 0, 1)
        if args:
            body += b"\0" * ((len(args) + 7) // 8) + b"\x01"  # no NULLs; the types follow
            body += b"".join(struct.pack("<BB", MYSQL_TYPE_LONGLONG, 0) for _ in args)
            body += b"".join(struct.pack("<q", a) for a in args)
        self.send(body)
        return self.result()

    def close_statement(self, stmt: int) -> None:
        self.send(bytes([COM_STMT_CLOSE]) + struct.pack("<I", stmt))  # no answer

    def quit(self) -> None:
        self.send(bytes([COM_QUIT]))
        self.s.close()


def run(conn: Connection, specs: list[str]) -> tuple[list[tuple[str, str, int]], list[int]]:
    """(command, status, error code) of each request, and the ids of the statements prepared."""
    answers: list[tuple[str, str, int]] = []
    prepared: list[int] = []

    def attempt(command: str, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
            answers.append((command, "ok", 0))
        except ServerError as e:
            answers.append((command, "failed", e.code))

    for spec in specs:
        op, _, count = spec.partition(":")
        n = int(count or 1)
        if op == "ok":
            for i in range(n):
                attempt("query", conn.query, f"SELECT {i} + 1, 'secret-{i}'")
        elif op == "fail":
            for i in range(n):
                attempt("query", conn.query, f"SELECT * FROM ca_missing_{i} WHERE secret = 'x{i}'")
        elif op == "long":
            for i in range(n):
                attempt("query", conn.query, f"SELECT {i} AS n, '{'x' * 3000}' AS pad")
        elif op == "insert":
            for i in range(n):
                attempt("query", conn.query, f"INSERT INTO ca_kv VALUES ({i}, 'v-{i}')")
        elif op == "prep":
            stmt, _ = conn.prepare("SELECT ? + 1, 'abc' AS s")
            answers.append(("prepare", "ok", 0))
            prepared.append(stmt)
            for i in range(n):
                attempt("execute", conn.execute, stmt, i + 1)
            conn.close_statement(stmt)
        elif op == "prep-bad":
            for i in range(n):
                attempt("prepare", conn.prepare, f"SELEKT {i} FROM nowhere WHERE x = 'y'")
        elif op == "exec-dup":
            stmt, _ = conn.prepare("INSERT INTO ca_dup VALUES (?, 'x')")
            answers.append(("prepare", "ok", 0))
            prepared.append(stmt)
            key = os.getpid()  # new in the table: the first insert succeeds
            for _ in range(n + 1):
                attempt("execute", conn.execute, stmt, key)
            conn.close_statement(stmt)
        else:
            raise SystemExit(f"unknown spec {spec}")
    return answers, prepared


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[0] != "run":
        print(__doc__, file=sys.stderr)
        return 2
    port, user, password, database, *specs = argv[1:]
    conn = Connection(int(port), user, password, database)
    answers, prepared = run(conn, specs)
    conn.quit()
    counts = Counter(status for _, status, _ in answers)
    print(json.dumps({"answers": answers, "counts": dict(counts), "prepared": prepared}), flush=True)
    sys.stdin.read()  # until the test closes it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
