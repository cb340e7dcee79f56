"""A FoundationDB client for the FoundationDB tests, written to the flow transport as
FoundationDB's sources define it (tests/system/workloads/fdb_wire.py): no FoundationDB client
library can be installed here (the foundationdb package on PyPI is a binding to libfdb_c, which
no Debian package ships). Like FoundationDB's transport it opens the connection with its
ConnectPacket and its first request in one write, sends every request to an endpoint token with
its own random reply token, and matches replies by that token. It runs what the specs say,
prints one JSON line with what the replies were, then waits for stdin to close before it exits,
so the agent sees the process alive while it handles the events.

    python -m tests.system.workloads.fdb_client PORT SPEC ...   each SPEC is OP:N
        get        N GetValueRequests, each waited for
        get-old    N GetValueRequests of keys under "old/" (transaction_too_old)
        grv        N GetReadVersionRequests
        commit     N CommitTransactionRequests
        conflict   N CommitTransactionRequests that conflict (not_committed)
        multiplex  N GetValueRequests of keys slow/0..slow/N-1 written one by one without waiting,
                   then all waited for: the server answers them in reverse order
    prints {"counts": {"ok": n, "failed": n}}
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter

from tests.system.workloads import fdb_wire as w

ENDPOINT = os.urandom(16)  # the server's request stream (any token: the stand-in serves them all)


def main() -> None:
    port, specs = int(sys.argv[1]), sys.argv[2:]
    sock = socket.create_connection(("127.0.0.1", port))
    r = w.Reader(sock)
    pending = w.connect_packet()  # sent with the first request
    counts: Counter[str] = Counter()

    def send(file_id: int, key: bytes) -> bytes:
        nonlocal pending
        token = os.urandom(16)
        sock.sendall(pending + w.request(file_id, token, key, ENDPOINT))
        if pending:
            w.read_connect(r)  # the server's ConnectPacket, sent when it accepted
            pending = b""
        return token

    def wait(tokens: set[bytes]) -> None:
        while tokens:
            pk = w.read_packet(r)
            if pk.token in tokens:
                tokens.discard(pk.token)
                counts["ok" if w.reply_error(pk) is None else "failed"] += 1

    ops = {"get": (w.GET_VALUE, "k/"), "get-old": (w.GET_VALUE, "old/"), "grv": (w.GET_READ_VERSION, "v/"),
           "commit": (w.COMMIT, "c/"), "conflict": (w.COMMIT, "conflict/")}
    for spec in specs:
        op, n = spec.split(":")
        if op == "multiplex":
            tokens = {send(w.GET_VALUE, f"slow/{j}".encode()) for j in range(int(n))}
        else:
            file_id, prefix = ops[op]
            tokens = set()
            for i in range(int(n)):
                wait({send(file_id, f"{prefix}secret-{i}".encode())})
        wait(tokens)
    print(json.dumps({"counts": counts}), flush=True)
    sys.stdin.read()
    sock.close()


if __name__ == "__main__":
    main()
