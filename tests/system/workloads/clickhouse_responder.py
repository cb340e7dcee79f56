"""A ClickHouse server stand-in speaking the native protocol of a newer revision than Debian's
clickhouse-server 18.16 (revision 54412) does: the ClickHouse tests run the real Debian server,
and this one only adds the layout a client writes to a current server (the start time in the
client info, settings as strings, parameters after the text), which 18.16 cannot make a client
write. It answers by the protocol (ClickHouse's src/Core/Protocol.h, Server/TCPHandler.cpp) as
far as clickhouse-driver needs, at 127.0.0.1:PORT, revision REVISION (default 54460):

- Hello: the server's Hello (name, version, revision, time zone, display name, patch; from 54461
  the password rules, from 54462 a nonce); from 54458 the client's addendum (its quota key);
- Ping: Pong;
- Query, then the client's Data blocks up to the empty one: a query naming a table that starts
  with "missing" is answered with an Exception (code 60, UNKNOWN_TABLE), any other with a header
  Data block (one UInt8 column "x"), a Data block of one row (1) and EndOfStream.

Each answer is logged to stdout as a JSON line {"query", "status"}.

    python -m tests.system.workloads.clickhouse_responder PORT [REVISION]
"""

from __future__ import annotations

import json
import re
import socket
import struct
import sys
import threading

HELLO, QUERY, DATA, CANCEL, PING = 0, 1, 2, 3, 4
S_HELLO, S_DATA, S_EXCEPTION, S_PONG, S_END = 0, 1, 2, 4, 5
UNKNOWN_TABLE = 60
LOCK = threading.Lock()
MISSING = re.compile(r"\bmissing\w*", re.I)


class Closed(Exception):
    pass


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def uvarint(self) -> int:
        v = shift = 0
        while True:
            b = self.read(1)[0]
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7

    def string(self) -> str:
        return self.read(self.uvarint()).decode(errors="replace")


def uvarint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string(s: str) -> bytes:
    raw = s.encode()
    return uvarint(len(raw)) + raw


def settings(c: Conn) -> None:
    while c.string():
        c.uvarint()  # flags
        c.string()


def query(c: Conn, rev: int) -> str:
    """A Query's text (its type read already), in the layout of revision `rev`."""
    c.string()  # query id
    if c.read(1)[0]:  # query kind; 0: no client info follows
        c.string()
        c.string()
        c.string()  # initial user, query id, address
        if rev >= 54449:
            c.read(8)
        if c.read(1)[0] == 1:  # TCP
            c.string()
            c.string()
            c.string()
            c.uvarint()
            c.uvarint()
            c.uvarint()
        c.string()  # quota key
        if rev >= 54448:
            c.uvarint()
        c.uvarint()  # patch
        if rev >= 54442 and c.read(1)[0]:
            c.read(24)
            c.string()
            c.read(1)
        if rev >= 54453:
            c.uvarint()
            c.uvarint()
            c.uvarint()
    settings(c)
    if rev >= 54441:
        c.string()  # interserver secret
    c.uvarint()  # stage
    c.uvarint()  # compression (the driver's default: none)
    text = c.string()
    if rev >= 54459:
        settings(c)  # parameters
    return text


def block(c: Conn) -> bool:
    """A Data packet's block (its type read already): False when it is the empty one."""
    c.string()  # temporary table name
    c.uvarint()
    c.read(1)
    c.uvarint()
    c.read(4)
    c.uvarint()  # block info: is_overflows, bucket_num, end
    columns, rows = c.uvarint(), c.uvarint()
    if columns:
        raise Closed  # the stand-in takes no external tables or inserts
    return rows > 0


def data_block(rev: int, values: list[int]) -> bytes:
    out = bytes([S_DATA]) + string("") + uvarint(1) + b"\x00" + uvarint(2) + struct.pack("<i", -1) + uvarint(0)
    out += uvarint(1) + uvarint(len(values)) + string("x") + string("UInt8")
    if rev >= 54454:
        out += b"\x00"  # no custom serialization
    return out + bytes(values)


def exception(code: int, message: str) -> bytes:
    return bytes([S_EXCEPTION]) + struct.pack("<i", code) + string("DB::Exception") + string(message) + \
        string("") + b"\x00"


def serve(sock: socket.socket, revision: int) -> None:
    c = Conn(sock)
    try:
        if c.uvarint() != HELLO:
            return
        c.string()
        c.uvarint()
        c.uvarint()
        client_rev = c.uvarint()
        c.string()
        c.string()
        c.string()  # database, user, password
        rev = min(revision, client_rev)
        hello = bytes([S_HELLO]) + string("ClickHouse") + uvarint(23) + uvarint(8) + uvarint(revision)
        hello += string("UTC") + string("stand-in") + uvarint(1)
        if rev >= 54461:
            hello += uvarint(0)  # password complexity rules
        if rev >= 54462:
            hello += struct.pack("<Q", 0)  # nonce
        sock.sendall(hello)
        if rev >= 54458:
            c.string()  # the addendum: quota key
        while True:
            kind = c.uvarint()
            if kind == PING:
                sock.sendall(bytes([S_PONG]))
            elif kind == DATA:
                block(c)
            elif kind == QUERY:
                text = query(c, rev)
                while c.uvarint() == DATA and block(c):
                    pass
                missing = MISSING.search(text)
                with LOCK:  # logged before it is sent: a client that has its answer finds it logged
                    print(json.dumps({"query": text, "status": "failed" if missing else "ok"}), flush=True)
                if missing:
                    sock.sendall(exception(UNKNOWN_TABLE, f"Table default.{missing.group(0)} does not exist."))
                else:
                    sock.sendall(data_block(rev, []))
                    sock.sendall(data_block(rev, [1]) + bytes([S_END]))
            else:
                return
    except (Closed, OSError):
        pass
    finally:
        sock.close()


def main() -> None:
    port = int(sys.argv[1])
    revision = int(sys.argv[2]) if len(sys.argv) > 2 else 54460
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        sock, _ = srv.accept()
        threading.Thread(target=serve, args=(sock, revision), daemon=True).start()


if __name__ == "__main__":
    main()
