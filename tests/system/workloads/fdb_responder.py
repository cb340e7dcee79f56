"""A FoundationDB server stand-in for the FoundationDB tests: no FoundationDB server or client
library can be installed here (no Debian package; the PyPI binding needs libfdb_c), so this
answers the flow transport as FoundationDB's sources define it (tests/system/workloads/
fdb_wire.py), one process at 127.0.0.1:PORT. On each connection it sends its ConnectPacket,
reads the client's (reading as much as has come at a time, as FoundationDB does), then answers each request packet (its checksum checked) with a packet to
the request's reply token:

- GetValueRequest: a GetValueReply; transaction_too_old (1007) for a key under "old/";
- GetReadVersionRequest: a GetReadVersionReply;
- CommitTransactionRequest: a CommitID; not_committed (1020) for a key under "conflict/";
- a key "slow/<j>" is answered (20 - j) * DELAY_MS / 20 ms after it came while later requests are
  read and answered meanwhile: requests in flight together are answered out of order.

Each answer is logged to stdout as a JSON line {"type", "key", "error"} (error: the code or null).

    python -m tests.system.workloads.fdb_responder PORT [DELAY_MS]
"""

from __future__ import annotations

import json
import socket
import sys
import threading

from tests.system.workloads import fdb_wire as w

REPLIES = {w.GET_VALUE: w.GET_VALUE_REPLY, w.GET_READ_VERSION: w.GET_READ_VERSION_REPLY, w.COMMIT: w.COMMIT_ID}
LOG = threading.Lock()


def serve(conn: socket.socket, delay_ms: int) -> None:
    lock = threading.Lock()

    def answer(file_id: int, token: bytes, key: bytes, error: int | None) -> None:
        with LOG:  # logged before it is sent: a client that has its answer finds it logged
            print(json.dumps({"type": w.NAMES[file_id], "key": key.decode(), "error": error}), flush=True)
        with lock:
            conn.sendall(w.reply(token, REPLIES[file_id], error))

    try:
        conn.sendall(w.connect_packet())
        r = w.Reader(conn)
        w.read_connect(r)
        while True:
            pk = w.read_packet(r)
            if pk.file_id not in REPLIES:
                continue
            token, key = w.request_fields(pk)
            error = None
            if pk.file_id == w.GET_VALUE and key.startswith(b"old/"):
                error = 1007  # transaction_too_old
            elif pk.file_id == w.COMMIT and key.startswith(b"conflict/"):
                error = 1020  # not_committed
            if key.startswith(b"slow/"):
                delay = max(20 - int(key[5:]), 0) * delay_ms / 20 / 1000
                threading.Timer(delay, answer, (pk.file_id, token, key, error)).start()
            else:
                answer(pk.file_id, token, key, error)
    except (EOFError, OSError, ValueError):
        pass
    finally:
        conn.close()


def main() -> None:
    port = int(sys.argv[1])
    delay_ms = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, delay_ms), daemon=True).start()


if __name__ == "__main__":
    main()
