"""A ClickHouse client for the ClickHouse tests: the real client library, clickhouse-driver's Client
(the native protocol, no compression), against the test's server. It runs OK queries that
succeed and FAILED that the server answers with an Exception (an unknown table), alternating
while both last, each with a literal the agent must mask; prints one JSON line with what the
server answered, then waits for stdin to close before it exits, so the agent sees the process
alive while it handles the events. The driver pings the server before a query on a connection
it holds, and reconnects after an Exception.

    python -m tests.system.workloads.clickhouse_client PORT OK FAILED
    prints {"counts": {"ok": n, "failed": n}, "codes": [the Exceptions' codes]}
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from clickhouse_driver import Client
from clickhouse_driver.errors import ServerException

OK_QUERY = "SELECT {i} + 1 AS n, 'secret-{i}' AS s"
FAILED_QUERY = "SELECT * FROM missing_t WHERE secret = 'x{i}'"


def main() -> None:
    port, ok, failed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    client = Client("127.0.0.1", port=port, connect_timeout=10, send_receive_timeout=20)
    counts: Counter[str] = Counter()
    codes: list[int] = []
    plan = [kind for i in range(max(ok, failed)) for kind, n in (("ok", ok), ("failed", failed)) if i < n]
    for i, kind in enumerate(plan):
        try:
            rows = client.execute((OK_QUERY if kind == "ok" else FAILED_QUERY).format(i=i))
            assert rows == [(i + 1, f"secret-{i}")] or rows == [(1,)], rows  # the stand-in answers 1
            counts["ok"] += 1
        except ServerException as e:
            counts["failed"] += 1
            codes.append(e.code)
    print(json.dumps({"counts": dict(counts), "codes": codes}), flush=True)
    sys.stdin.read()
    client.disconnect()


if __name__ == "__main__":
    main()
