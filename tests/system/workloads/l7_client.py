"""Clients the L7 tests run inside test cgroups. Each prints one JSON line with what it did
(counts and, for HTTP, the durations it measured) and then waits for a line on stdin before
exiting, so the agent sees the process alive while it handles the events.

    http HOST PORT [--ca CA] [--header K:V] [--reconnect] PATH:COUNT ...
                                                one keep-alive connection (TLS with --ca);
                                                --reconnect: a new connection per request
    wait CMD ARGS...                            import ssl, print {"ready": true}, wait for a line
                                                on stdin, then run CMD
    pg DSN                                      the Postgres script of the tests
    redis HOST PORT PASSWORD                    the Redis script of the tests
    dns NAME ...                                getaddrinfo (glibc's resolver) per name
    dnsq SERVER QTYPE:NAME ...                  one query each (RFC 1035), in turn, on one UDP
                                                socket connected to SERVER:53; the answers' RCODEs
"""

from __future__ import annotations

import json
import socket
import sys
import time


def http(args: list[str]) -> dict:
    import http.client
    import ssl

    host, port, rest = args[0], int(args[1]), args[2:]
    if rest and rest[0] == "--ca":
        ctx = ssl.create_default_context(cafile=rest[1])
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, context=ctx)
        rest = rest[2:]
    else:
        conn = http.client.HTTPConnection(host, port)
    headers = {}
    while rest and rest[0] == "--header":
        name, _, value = rest[1].partition(":")
        headers[name] = value
        rest = rest[2:]
    reconnect = bool(rest) and rest[0] == "--reconnect"
    rest = rest[1:] if reconnect else rest
    durations: list[float] = []
    statuses: dict[str, int] = {}
    for spec in rest:
        path, _, count = spec.rpartition(":")
        for _ in range(int(count)):
            t0 = time.perf_counter()
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            r.read()
            durations.append(time.perf_counter() - t0)
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
            if reconnect:
                conn.close()  # the next request connects again
    return {"statuses": statuses, "durations": durations}


def pg(args: list[str]) -> dict:
    """50 good queries and 5 failing ones: 20 simple, 15 unnamed extended (parameters), 15
    executions of a named prepared statement, 5 errors (a missing table, a division by zero)."""
    import psycopg

    ok = failed = 0
    with psycopg.connect(args[0], autocommit=True, prepare_threshold=None) as c:
        for i in range(20):
            c.execute(f"SELECT {i} AS n, 'secret-{i}' AS s")  # simple protocol: no parameters
            ok += 1
        for i in range(15):
            c.execute("SELECT %s::int + 1, %s::text", (i, "hunter2"))  # unnamed Parse/Bind/Execute
            ok += 1
        for i in range(15):
            c.execute("SELECT %s::int * 2", (i,), prepare=True)  # named statement: Parse once, Bind each
            ok += 1
        for i in range(5):
            try:
                c.execute(f"SELECT * FROM missing_table_{i}" if i % 2 == 0 else "SELECT 1 / 0")
            except psycopg.Error:
                failed += 1
    return {"ok": ok, "failed": failed}


def redis_(args: list[str]) -> dict:
    import redis

    r = redis.Redis(host=args[0], port=int(args[1]), password=args[2] or None)
    for i in range(40):
        r.set(f"key:{i}", f"value-secret-{i}")
    for i in range(40):
        r.get(f"key:{i}")
    errors = 0
    for i in range(5):
        try:
            r.lpush(f"key:{i}", "x")  # WRONGTYPE: the key holds a string
        except redis.ResponseError:
            errors += 1
    p = r.pipeline(transaction=False)
    for i in range(20):
        p.get(f"key:{i}")
    p.execute()
    return {"set": 40, "get": 40 + 20, "errors": errors}


def dns(args: list[str]) -> dict:
    out = {}
    for name in args:
        try:
            out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)})
        except socket.gaierror as e:
            out[name] = str(e)
    return out


def dnsq(args: list[str]) -> dict:
    import struct

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((args[0], 53))
    rcodes = []
    for i, item in enumerate(args[1:]):
        qtype, name = item.split(":", 1)
        qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"
        ident = 0x5000 + i
        s.send(struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", int(qtype), 1))
        while True:
            r = s.recv(4096)
            if r[:2] == struct.pack("!H", ident):
                break
        rcodes.append(r[3] & 0xF)
    s.close()
    return {"rcodes": rcodes}


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "wait":  # libssl is mapped now; the caller waits for the agent to find it
        import ssl  # noqa: F401

        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        cmd, args = args[0], args[1:]
    result = {"http": http, "pg": pg, "redis": redis_, "dns": dns, "dnsq": dnsq}[cmd](args)
    print(json.dumps(result), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
