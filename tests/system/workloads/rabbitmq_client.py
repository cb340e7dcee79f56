"""An AMQP 0-9-1 publisher on the wire, for the RabbitMQ tests: unlike librabbitmq (which sends
each frame with its own send()), it writes whole messages, several at once. It prints one JSON
line with what it did, then waits for stdin to close before it exits, so the agent sees the
process alive while it handles the events.

    publish PORT QUEUE SPEC ...   declares QUEUE, then each SPEC "N" is one write of N messages
                                  (each a Basic.Publish, its content header and its body) to it
                                  through the default exchange; closes the channel (the broker
                                  has them all once it answers) and prints {"published": total}
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

FRAME_END = b"\xce"
BODY = b"hello"


def shortstr(s: bytes) -> bytes:
    return bytes([len(s)]) + s


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END


def method(channel: int, cls: int, mid: int, args: bytes = b"") -> bytes:
    return frame(1, channel, struct.pack(">HH", cls, mid) + args)


class Conn:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.s.sendall(b"AMQP\x00\x00\x09\x01")
        self.expect(10, 10)  # Connection.Start
        self.s.sendall(method(0, 10, 11, struct.pack(">I", 0) + shortstr(b"PLAIN")
                              + struct.pack(">I", 12) + b"\0guest\0guest" + shortstr(b"en_US")))
        tune = self.expect(10, 30)
        channel_max, frame_max, _ = struct.unpack(">HIH", tune[:8])
        self.s.sendall(method(0, 10, 31, struct.pack(">HIH", channel_max, frame_max, 0)))  # no heartbeats
        self.s.sendall(method(0, 10, 40, shortstr(b"/") + shortstr(b"") + b"\0"))  # Connection.Open
        self.expect(10, 41)
        self.s.sendall(method(1, 20, 10, shortstr(b"")))  # Channel.Open
        self.expect(20, 11)

    def expect(self, cls: int, mid: int) -> bytes:
        """The next method frame, which must be (cls, mid); its arguments."""
        while True:
            while len(self.buf) < 7 or len(self.buf) < 8 + struct.unpack(">I", self.buf[3:7])[0]:
                more = self.s.recv(65536)
                if not more:
                    raise EOFError("the broker closed the connection")
                self.buf += more
            kind, _channel, size = struct.unpack(">BHI", self.buf[:7])
            payload, self.buf = self.buf[7:7 + size], self.buf[8 + size:]
            if kind != 1:
                continue  # a heartbeat
            got = struct.unpack(">HH", payload[:4])
            assert got == (cls, mid), f"expected {(cls, mid)}, got {got}: {payload!r}"
            return payload[4:]

    def close(self) -> None:
        self.s.sendall(method(1, 20, 40, struct.pack(">H", 200) + shortstr(b"") + struct.pack(">HH", 0, 0)))
        self.expect(20, 41)  # Channel.Close-Ok: everything before it was handled
        self.s.sendall(method(0, 10, 50, struct.pack(">H", 200) + shortstr(b"") + struct.pack(">HH", 0, 0)))
        self.expect(10, 51)
        self.s.close()


def message(queue: bytes) -> bytes:
    publish = method(1, 60, 40, struct.pack(">H", 0) + shortstr(b"") + shortstr(queue) + b"\0")
    header = frame(2, 1, struct.pack(">HHQH", 60, 0, len(BODY), 0))  # no properties
    return publish + header + frame(3, 1, BODY)


def connect(port: int, within: float = 30.0) -> Conn:
    """A connection once the broker serves AMQP: a starting RabbitMQ accepts TCP before it is
    ready and closes what it accepted then (seen once in a full suite run)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return Conn(port)
        except (EOFError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def publish(port: int, queue: str, specs: list[str]) -> dict:
    c = connect(port)
    q = queue.encode()
    c.s.sendall(method(1, 50, 10, struct.pack(">H", 0) + shortstr(q) + b"\0" + struct.pack(">I", 0)))
    c.expect(50, 11)  # Queue.Declare-Ok
    total = 0
    for spec in specs:
        c.s.sendall(message(q) * int(spec))  # one write
        total += int(spec)
    c.close()
    return {"published": total}


def main() -> None:
    cmd, port, queue, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    assert cmd == "publish", cmd
    print(json.dumps(publish(port, queue, rest)), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
