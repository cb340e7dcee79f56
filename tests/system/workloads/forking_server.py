"""A forking HTTP/1.1 server shaped like Postgres's postmaster: for each accepted connection it
first forks a bystander child (which exits at once, like an autovacuum worker the postmaster
forks from a signal handler), then the child that serves the connection, then closes its own
copy of the socket. Prints "ready PORT" once listening; answers every request 200 "ok" until
the client hangs up.

    forking_server.py
"""

from __future__ import annotations

import os
import socket
import sys


def serve(conn: socket.socket) -> None:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        _, _, buf = buf.partition(b"\r\n\r\n")
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def main() -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    print(f"ready {ls.getsockname()[1]}", flush=True)
    while True:
        conn, _ = ls.accept()
        if os.fork() == 0:  # the bystander
            os._exit(0)
        if os.fork() == 0:  # the server of this connection
            ls.close()
            serve(conn)
            os._exit(0)
        conn.close()
        while True:  # reap what has exited
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


if __name__ == "__main__":
    sys.exit(main())
