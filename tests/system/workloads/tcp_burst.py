"""A burst of short TCP connections (system tests and bench/tcp.py; run inside a test cgroup).

    tcp_burst.py HOST LISTENERS CONNECTS REFUSED_PORTS REFUSED

Opens LISTENERS listening sockets on HOST and REFUSED_PORTS sockets bound there without
listening (a connect to them is refused, and no other process can take the port meanwhile),
prints `ready PORT,PORT,... | PORT,...` (listening | refused) and waits for a line on stdin.
Then makes CONNECTS connections, round-robin over the listeners (each connected and closed at
once), and REFUSED refused connects, round-robin over the refused ports, spread evenly through
the burst; the listeners' queues are drained as it goes. Prints `done OK FAILED SECONDS` and
exits when stdin gives another line (or closes).
"""

from __future__ import annotations

import socket
import sys
import time


def main() -> None:
    host, listeners, connects, refused_ports, refused = sys.argv[1], *(int(x) for x in sys.argv[2:6])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    servers = []
    for _ in range(listeners):
        s = socket.socket(family)
        s.bind((host, 0))
        s.listen(4096)
        s.setblocking(False)
        servers.append(s)
    closed = []
    for _ in range(refused_ports):
        s = socket.socket(family)
        s.bind((host, 0))  # bound, not listening: a SYN to it gets a reset
        closed.append(s)
    ports = [s.getsockname()[1] for s in servers]
    nope = [s.getsockname()[1] for s in closed]
    print("ready", ",".join(map(str, ports)), "|", ",".join(map(str, nope)), flush=True)
    sys.stdin.readline()
    every = connects // refused if refused else 0  # a refused connect after this many good ones
    ok = failed = 0
    t0 = time.monotonic()
    for i in range(connects):
        c = socket.socket(family)
        c.connect((host, ports[i % listeners]))
        c.close()
        ok += 1
        if every and (i + 1) % every == 0 and failed < refused:
            c = socket.socket(family)
            try:
                c.connect((host, nope[failed % refused_ports]))
            except ConnectionRefusedError:
                failed += 1
            finally:
                c.close()
        if (i + 1) % listeners == 0:  # each listener has one connection more queued: take them
            for s in servers:
                try:
                    while True:
                        s.accept()[0].close()
                except BlockingIOError:
                    pass
    while failed < refused:  # the remainder, when REFUSED does not divide CONNECTS
        c = socket.socket(family)
        try:
            c.connect((host, nope[failed % refused_ports]))
        except ConnectionRefusedError:
            failed += 1
        finally:
            c.close()
    took = time.monotonic() - t0
    print("done", ok, failed, f"{took:.2f}", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
