"""A memcached client on the wire (memcached's doc/protocol.txt and doc/protocol-binary.txt),
for the memcached tests: one connection, one write per request, each reply read whole before the
next request, so both sides see one request per call. It prints one JSON line with what the
server answered, then waits for stdin to close before it exits, so the agent sees the process
alive while it handles the events.

    text PORT VALUE STEP...     the text protocol; every value stored is VALUE plus a number
    binary PORT VALUE STEP...   the binary protocol

Steps, in order; "name:N" does N requests (keys are the protocol's prefix and a number):
    set:N      set keys 0..N-1                  (STORED / status 0)
    get:N      get keys 0..N-1 (hits)           (VALUE ... END / status 0)
    miss:N     get keys never set               (END / status 1, key not found)
    fail:N     incr a key whose value is text   (CLIENT_ERROR / status 6, non-numeric value)
    pipe       text: set, touch, delete, delete (not found), get (a miss) in one write; memcached
               writes the replies before a get or an error at once, and these after it together
    multi:N    binary: N writes of getkq (a miss), getkq (a hit) and a no-op
    noreply:N  text: N "set ... noreply" writes; binary: N setq writes (nothing answers them)
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from collections import Counter

HEADER = struct.Struct("!BBHBBHIIQ")  # magic, opcode, key length, extras length, data type, status, body, opaque, cas
GET, SET, INCR, NOOP, GETKQ, SETQ = 0x00, 0x01, 0x05, 0x0A, 0x0D, 0x11


class Conn:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def more(self) -> None:
        data = self.s.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


class Text:
    def __init__(self, port: int, value: str) -> None:
        self.c = Conn(port)
        self.value = value
        self.seen: Counter[str] = Counter()

    def reply(self) -> str:
        """One reply; a retrieval's VALUE blocks are read up to its END."""
        line = self.c.line()
        if not line.startswith(b"VALUE "):
            return line.split(b" ")[0].decode()
        while line.startswith(b"VALUE "):
            self.c.take(int(line.split(b" ")[3]) + 2)
            line = self.c.line()
        assert line == b"END", line
        return "HIT"

    def call(self, data: bytes, replies: int = 1) -> None:
        self.c.s.sendall(data)
        for _ in range(replies):
            self.seen[self.reply()] += 1

    def data(self, i: int) -> bytes:
        return f"{self.value}{i}".encode()

    def step(self, name: str, n: int) -> None:
        for i in range(n):
            v = self.data(i)
            if name == "set":
                self.call(b"set t%d 0 0 %d\r\n%s\r\n" % (i, len(v), v))
            elif name == "get":
                self.call(b"get t%d\r\n" % i)
            elif name == "miss":
                self.call(b"get missing%d\r\n" % i)
            elif name == "fail":
                self.call(b"incr t%d 1\r\n" % i)  # its value is text
            elif name == "noreply":
                self.c.s.sendall(b"set q%d 0 0 %d noreply\r\n%s\r\n" % (i, len(v), v))
        if name == "pipe":
            v = self.data(99)
            self.call(b"set p 0 0 %d\r\n%s\r\ntouch p 100\r\ndelete p\r\ndelete p\r\nget p\r\n" % (len(v), v), 5)


class Binary:
    def __init__(self, port: int, value: str) -> None:
        self.c = Conn(port)
        self.value = value
        self.seen: Counter[str] = Counter()
        self.opaque = 0

    def frame(self, op: int, key: bytes, extras: bytes = b"", value: bytes = b"") -> bytes:
        self.opaque += 1
        return HEADER.pack(0x80, op, len(key), len(extras), 0, 0, len(key) + len(extras) + len(value), self.opaque,
                           0) + extras + key + value

    def reply(self) -> tuple[int, int]:
        """(opcode, status) of one response."""
        h = HEADER.unpack(self.c.take(HEADER.size))
        assert h[0] == 0x81, h
        self.c.take(h[6])
        return h[1], h[5]

    def call(self, data: bytes, until: int) -> None:
        """Write, then read responses up to the one with opcode `until`."""
        self.c.s.sendall(data)
        while True:
            op, status = self.reply()
            self.seen[f"0x{op:02x}:{status}"] += 1
            if op == until:
                return

    def step(self, name: str, n: int) -> None:
        for i in range(n):
            v = f"{self.value}{i}".encode()
            if name == "set":
                self.call(self.frame(SET, b"b%d" % i, bytes(8), v), SET)
            elif name == "get":
                self.call(self.frame(GET, b"b%d" % i), GET)
            elif name == "miss":
                self.call(self.frame(GET, b"missing%d" % i), GET)
            elif name == "fail":
                self.call(self.frame(INCR, b"b%d" % i, struct.pack("!QQI", 1, 0, 0)), INCR)
            elif name == "multi":
                self.call(self.frame(GETKQ, b"missing%d" % i) + self.frame(GETKQ, b"b%d" % i) + self.frame(NOOP, b""),
                          NOOP)
            elif name == "noreply":
                self.c.s.sendall(self.frame(SETQ, b"q%d" % i, bytes(8), v))


def main() -> None:
    proto, port, value, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    client = Text(port, value) if proto == "text" else Binary(port, value)
    for step in steps:
        name, _, n = step.partition(":")
        client.step(name, int(n or 1))
    print(json.dumps(dict(sorted(client.seen.items()))), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
