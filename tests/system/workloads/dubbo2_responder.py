"""A Dubbo provider stand-in for the Dubbo2 tests: no Debian package ships Apache Dubbo (a Java
provider needs the Dubbo jars from Maven, which cannot be installed here), so this answers the
Dubbo2 protocol by its specification (the Dubbo2 TCP protocol page of dubbo.apache.org): a
16-byte header — magic 0xdabb, flags (request 0x80, two-way 0x40, event 0x20, serialization id),
status, request id (int64), body length (int32) — and a Hessian2 body, one provider at
127.0.0.1:PORT.

- service org.apache.dubbo.demo.GreetingService, method sayHello(String): OK (20), the value
  "hello, <name>" (RESPONSE_VALUE);
- method fail: SERVICE_ERROR (70) with an error message;
- any other service: SERVICE_NOT_FOUND (60) with an error message;
- method slow(int j): OK, answered (20 - j) * DELAY_MS / 20 ms after it came while later requests
  are read and answered meanwhile: requests in flight together on one connection are answered
  out of order;
- a heartbeat (an event request) is answered with an event response; a one-way request is not
  answered.

Headers and bodies are read with separate reads, and each answer is written at once. Each
answer to a two-way request is logged to stdout as a JSON line {"id", "service", "method",
"status"}.

    python -m tests.system.workloads.dubbo2_responder PORT [DELAY_MS]
"""

from __future__ import annotations

import json
import socket
import sys
import threading

GREETING = "org.apache.dubbo.demo.GreetingService"
F_REQUEST, F_TWO_WAY, F_EVENT = 0x80, 0x40, 0x20
OK, SERVICE_NOT_FOUND, SERVICE_ERROR = 20, 60, 70
LOG = threading.Lock()


def hessian_string(s: str) -> bytes:
    raw, n = s.encode(), len(s)
    if n <= 0x1F:
        return bytes([n]) + raw
    if n <= 0x3FF:
        return bytes([0x30 + (n >> 8), n & 0xFF]) + raw
    return b"S" + n.to_bytes(2, "big") + raw


class Reader:
    """Hessian2 values of a request body, as far as this provider needs them."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def string(self) -> str:
        code = self.byte()
        if code <= 0x1F:
            n = code
        elif 0x30 <= code <= 0x33:
            n = ((code - 0x30) << 8) | self.byte()
        elif code == 0x53:  # 'S' (this client writes no 'R' chunks)
            n = (self.byte() << 8) | self.byte()
        else:
            raise ValueError(f"no string: 0x{code:02x}")
        chars = []
        while n > 0:
            lead = self.data[self.pos]
            width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3
            chars.append(self.data[self.pos:self.pos + width].decode())
            self.pos += width
            n -= 1
        return "".join(chars)

    def int_(self) -> int:
        code = self.byte()
        if 0x80 <= code <= 0xBF:
            return code - 0x90
        if 0xC0 <= code <= 0xCF:
            return ((code - 0xC8) << 8) | self.byte()
        if 0xD0 <= code <= 0xD7:
            return ((code - 0xD4) << 16) | (self.byte() << 8) | self.byte()
        if code == 0x49:  # 'I'
            return int.from_bytes(bytes(self.byte() for _ in range(4)), "big", signed=True)
        raise ValueError(f"no int: 0x{code:02x}")


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class Connection:
    def __init__(self, conn: socket.socket, delay_ms: int) -> None:
        self.conn, self.delay_ms = conn, delay_ms
        self.lock = threading.Lock()

    def send(self, flags: int, status: int, rid: bytes, body: bytes) -> None:
        with self.lock:
            self.conn.sendall(b"\xda\xbb" + bytes([flags, status]) + rid + len(body).to_bytes(4, "big") + body)

    def answer(self, serialization: int, rid: bytes, service: str, method: str, status: int, body: bytes) -> None:
        with LOG:  # logged before it is sent: a client that has its answer finds it logged
            print(json.dumps({"id": int.from_bytes(rid, "big"), "service": service, "method": method,
                              "status": status}), flush=True)
        self.send(serialization, status, rid, body)

    def serve(self) -> None:
        try:
            while True:
                head = recv_exact(self.conn, 16)
                if head[:2] != b"\xda\xbb":
                    return
                body = recv_exact(self.conn, int.from_bytes(head[12:16], "big"))
                self.handle(head, body)
        except (EOFError, OSError):
            pass
        finally:
            self.conn.close()

    def handle(self, head: bytes, body: bytes) -> None:
        flags, rid = head[2], head[4:12]
        serialization = flags & 0x1F
        if flags & F_EVENT:  # a heartbeat: answered with an event response (a null value)
            if flags & F_REQUEST and flags & F_TWO_WAY:
                self.send(F_EVENT | serialization, OK, rid, b"N")
            return
        if not flags & F_REQUEST or not flags & F_TWO_WAY:
            return
        r = Reader(body)
        r.string()  # the Dubbo version
        service = r.string()
        r.string()  # the service version
        method = r.string()
        r.string()  # the parameter types
        if service != GREETING:
            self.answer(serialization, rid, service, method, SERVICE_NOT_FOUND,
                        hessian_string(f"Not found exported service: {service}"))
        elif method == "fail":
            self.answer(serialization, rid, service, method, SERVICE_ERROR,
                        hessian_string("java.lang.IllegalStateException: failed on purpose"))
        elif method == "slow":
            j = r.int_()
            delay = max(20 - j, 0) * self.delay_ms / 20 / 1000
            value = b"\x91" + hessian_string(f"slow {j}")
            threading.Timer(delay, self.answer, (serialization, rid, service, method, OK, value)).start()
        else:
            name = r.string()
            self.answer(serialization, rid, service, method, OK, b"\x91" + hessian_string(f"hello, {name}"))


def main() -> None:
    port = int(sys.argv[1])
    delay_ms = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=Connection(conn, delay_ms).serve, daemon=True).start()


if __name__ == "__main__":
    main()
