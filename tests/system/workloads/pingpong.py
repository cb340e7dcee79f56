"""A TCP ping-pong of bytes no L7 detector recognises, for bench/l7_nomatch.py: what the agent's
L7 detection costs on a connection that carries none of its protocols.

    python -m tests.system.workloads.pingpong serve PORT
    python -m tests.system.workloads.pingpong client PORT CONNECTIONS ROUNDS SIZE

The server echoes what it reads; each client connection writes SIZE bytes and reads them back,
ROUNDS times. The client prints the number of round trips made.
"""

from __future__ import annotations

import socket
import sys
import threading

PAYLOAD = b"~nomatch~" * 1000  # no detector's first bytes: no method, no length prefix, no header


def echo(c: socket.socket) -> None:
    with c:
        while data := c.recv(65536):
            c.sendall(data)


def serve(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=echo, args=(c,), daemon=True).start()


def client(port: int, rounds: int, size: int, done: list[int]) -> None:
    msg = PAYLOAD[:size]
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            c.sendall(msg)
            got = 0
            while got < size:
                b = c.recv(size - got)
                if not b:
                    return
                got += len(b)
            done[0] += 1


def main() -> None:
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
        return
    port, conns, rounds, size = (int(a) for a in sys.argv[2:6])
    done = [0]
    threads = [threading.Thread(target=client, args=(port, rounds, size, done)) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(done[0], flush=True)


if __name__ == "__main__":
    main()
