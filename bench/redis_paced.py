"""A paced Redis client for bench/l7.py --protocol redis --rate N: `connections` connections,
each sending one command at a time (SET, then GET of a missing key, alternately: every reply is
one line, `+OK` or `$-1`) on a fixed schedule, so that together they ask about `rate` commands a
second; redis-benchmark has no pacing and runs as fast as the server goes. Prints one JSON line:
requests answered, requests/s, p99 latency in seconds.

Run: `python bench/redis_paced.py PORT RATE SECONDS CONNECTIONS` (bench/l7.py runs it in the
client's test cgroup).
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time

COMMANDS = (b"*3\r\n$3\r\nSET\r\n$5\r\nbench\r\n$1\r\nv\r\n", b"*2\r\n$3\r\nGET\r\n$7\r\nmissing\r\n")


def main() -> None:
    port, rate, seconds, connections = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    interval = connections / rate  # each connection's period
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    end = start + seconds
    socks = []
    for i in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        # [socket, next send time, sent at (0: idle), buffer, commands sent]
        state = [s, start + interval * i / connections, 0.0, b"", 0]
        sel.register(s, selectors.EVENT_READ, state)
        socks.append(state)
    latencies: list[float] = []
    while True:
        now = time.monotonic()
        if now >= end and all(st[2] == 0.0 for st in socks):
            break
        for st in socks:
            if st[2] == 0.0 and now >= st[1] and now < end:
                st[0].sendall(COMMANDS[st[4] % 2])
                st[4] += 1
                st[2] = now
                st[1] += interval
                if st[1] < now - interval:  # far behind (the machine stalled): do not burst
                    st[1] = now
        idle_next = min((st[1] for st in socks if st[2] == 0.0), default=now + 0.01)
        for key, _ in sel.select(max(0.0, min(idle_next, end) - time.monotonic())):
            st = key.data
            st[3] += st[0].recv(4096)
            if st[3].endswith(b"\r\n"):
                latencies.append(time.monotonic() - st[2])
                st[2], st[3] = 0.0, b""
    took = time.monotonic() - start
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    print(json.dumps({"requests": len(latencies), "rps": len(latencies) / took, "p99": p99}))


if __name__ == "__main__":
    main()
