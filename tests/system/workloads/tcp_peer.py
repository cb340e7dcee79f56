"""TCP workloads for the system tests (run inside test cgroups and network namespaces).

    server HOST PORT                serve exchanges (below) on every connection
    transfer HOST PORT N SEND RECV  N connections: send SEND bytes, read RECV bytes, close
    fail HOST PORT N TIMEOUT        N connects that fail (refused, or timed out after TIMEOUT s)
    hold HOST PORT                  read commands on stdin: 'open K', 'close', 'exit'

An exchange: the client sends an 8-byte header (bytes it sends, bytes it wants back) and that
many bytes; the server answers with the bytes asked for and keeps the connection until the
client closes it. Each command prints a line when it is ready or done, so the test knows when
to look.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading


def recv_exact(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = c.recv(min(65536, n - len(buf)))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


def serve(host: str, port: int) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(512)
    print("ready", flush=True)

    def handle(c: socket.socket) -> None:
        try:
            while True:
                head = c.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    return
                size, reply = struct.unpack("!II", head)
                recv_exact(c, size)
                c.sendall(b"r" * reply)
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def exchange(c: socket.socket, send: int, recv: int) -> None:
    # 8 bytes of header count as sent bytes too: callers account for them
    c.sendall(struct.pack("!II", send, recv) + b"s" * send)
    recv_exact(c, recv)


def main() -> None:
    cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "server":
        serve(host, port)
    elif cmd == "transfer":
        n, send, recv = (int(x) for x in sys.argv[4:7])
        for _ in range(n):
            with socket.create_connection((host, port), timeout=30) as c:
                exchange(c, send, recv)
        print("done", flush=True)
        sys.stdin.readline()  # stay alive until the test has looked
    elif cmd == "fail":
        n, timeout = int(sys.argv[4]), float(sys.argv[5])
        failed = 0
        for _ in range(n):
            c = socket.socket()
            c.settimeout(timeout)
            try:
                c.connect((host, port))
            except OSError:
                failed += 1
            finally:
                c.close()
        print(f"done {failed}", flush=True)
        sys.stdin.readline()
    elif cmd == "hold":
        held: list[socket.socket] = []
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if words[0] == "open":
                for _ in range(int(words[1])):
                    c = socket.create_connection((host, port), timeout=30)
                    exchange(c, 10, 10)
                    held.append(c)
            elif words[0] == "close":
                for c in held:
                    c.close()
                held.clear()
            elif words[0] == "exit":
                return
            print("ok", flush=True)


if __name__ == "__main__":
    main()
