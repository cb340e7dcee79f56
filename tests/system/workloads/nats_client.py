"""A NATS client on the wire (the client protocol of docs.nats.io), for the NATS tests. Each
command prints one JSON line with what it did, then waits for stdin to close before it exits,
so the agent sees the process alive while it handles the events.

    pub PORT SUBJECT SPEC ...   publishes on one connection; each SPEC is one write: "N" (N
                                PUBs), "N:h" (N HPUBs, with a header); then PING until PONG, so
                                the server has them all; prints {"published": total}
    sub PORT SUBJECT COUNT      subscribes, prints {"ready": true} once the server confirmed it
                                (PONG), reads until COUNT messages (MSG or HMSG) came, prints
                                {"received": COUNT, "headers": HMSGs}
"""

from __future__ import annotations

import json
import socket
import sys

PAYLOAD = b"hi"
HEADERS = b"NATS/1.0\r\nk: v\r\n\r\n"


class Conn:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        info = self.line()
        assert info.startswith(b"INFO "), info
        self.s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"lang":"python"}\r\n')
        self.ping()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            more = self.s.recv(65536)
            if not more:
                raise EOFError("the server closed the connection")
            self.buf += more
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            more = self.s.recv(65536)
            if not more:
                raise EOFError("the server closed the connection")
            self.buf += more
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def ping(self) -> None:
        """PING, and lines until its PONG (the server has handled everything sent before)."""
        self.s.sendall(b"PING\r\n")
        while (line := self.line()) != b"PONG":
            assert line != b"PING" and not line.startswith(b"-ERR"), line


def pub(port: int, subject: str, specs: list[str]) -> dict:
    c = Conn(port)
    total = 0
    for spec in specs:
        n, _, kind = spec.partition(":")
        if kind == "h":
            one = b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(HEADERS), len(HEADERS) + len(PAYLOAD),
                                                 HEADERS, PAYLOAD)
        else:
            one = b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(PAYLOAD), PAYLOAD)
        c.s.sendall(one * int(n))  # one write
        total += int(n)
    c.ping()
    return {"published": total}


def sub(port: int, subject: str, count: int) -> dict:
    c = Conn(port)
    c.s.sendall(b"SUB %s 1\r\n" % subject.encode())
    c.ping()
    print(json.dumps({"ready": True}), flush=True)
    got = headers = 0
    while got < count:
        parts = c.line().split()
        op = parts[0].upper()
        if op == b"PING":
            c.s.sendall(b"PONG\r\n")
            continue
        assert op in (b"MSG", b"HMSG"), parts
        c.take(int(parts[-1]) + 2)
        got += 1
        headers += op == b"HMSG"
    return {"received": got, "headers": headers}


def main() -> None:
    cmd, port, subject, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    result = pub(port, subject, rest) if cmd == "pub" else sub(port, subject, int(rest[0]))
    print(json.dumps(result), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
