"""A Cassandra client for the Cassandra tests: the real client library, cassandra-driver's
Cluster and Session, against the test's node (tests/system/workloads/cassandra_responder.py),
with the protocol version asked for (4, 5 with its segment framing, or 5lz4: v5 with LZ4-compressed
segments; no compression otherwise), schema and token
metadata off (the control connection then reads system.local and system.peers only). It runs
what the specs say, prints one JSON line with what the driver got, then waits for stdin to close
before it exits, so the agent sees the process alive while it handles the events.

    python -m tests.system.workloads.cassandra_client PORT 4|5|5lz4 SPEC ...   each SPEC is OP:N
        query        N SELECTs with literals (a string and a number), each waited for
        query-fail   N SELECTs on a missing table (ERROR 0x2200)
        syntax       N statements that do not parse (ERROR 0x2000)
        prepared     one PREPARE, then N EXECUTEs of it with bound values
        prepared-fail one PREPARE of an INSERT into a missing table, then N EXECUTEs (0x2200)
        batch        N BATCHes of two INSERTs with literals
        batch-fail   N BATCHes, one INSERT of which is into a missing table (0x2200)
        multiplex    N SELECTs (ids 0..N-1) sent at once, on ca.slow and, every other one, on
                     ca.missing_slow, then all waited for: the node answers them in reverse order
    prints {"counts": {"ok": n, "failed": n}}
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from cassandra import DriverException
from cassandra.cluster import Cluster
from cassandra.policies import RoundRobinPolicy
from cassandra.query import BatchStatement


def main() -> None:
    port, version, specs = int(sys.argv[1]), int(sys.argv[2][:1]), sys.argv[3:]
    compression: str | bool = "lz4" if sys.argv[2].endswith("lz4") else False
    cluster = Cluster(["127.0.0.1"], port=port, protocol_version=version, compression=compression,
                      schema_metadata_enabled=False,
                      token_metadata_enabled=False, load_balancing_policy=RoundRobinPolicy(),
                      connect_timeout=10, control_connection_timeout=10)
    session = cluster.connect()
    session.default_timeout = 20
    counts: Counter[str] = Counter()

    def run(statement: object, params: object = None) -> None:
        try:
            session.execute(statement, params)  # type: ignore[arg-type]
            counts["ok"] += 1
        except DriverException:
            counts["failed"] += 1
        except Exception as e:  # noqa: BLE001 - the server's errors are the driver's own exception types
            if type(e).__module__.startswith("cassandra"):
                counts["failed"] += 1
            else:
                raise

    for spec in specs:
        op, n = spec.split(":")
        for i in range(int(n) if op != "multiplex" else 0):
            if op == "query":
                run(f"SELECT name FROM ca.people WHERE id = 'secret-{i}' AND age > {40 + i}")
            elif op == "query-fail":
                run(f"SELECT name FROM ca.missing WHERE id = 'secret-{i}'")
            elif op == "syntax":
                run(f"SELEC name FROM ca.people WHERE id = 'secret-{i}'")
            elif op in ("prepared", "prepared-fail"):
                if i == 0:
                    table = "ca.people" if op == "prepared" else "ca.missing_people"
                    stmt = session.prepare(f"INSERT INTO {table} (id, name) VALUES (?, ?)")
                run(stmt, (f"secret-{i}", "x"))
            elif op in ("batch", "batch-fail"):
                b = BatchStatement()
                b.add(f"INSERT INTO ca.people (id, name) VALUES ('secret-{i}', 'x')")
                b.add(f"INSERT INTO ca.{'people' if op == 'batch' else 'missing'} (id, age) VALUES ('secret-{i}', 7)")
                run(b)
        if op == "multiplex":
            futures = [session.execute_async(f"SELECT name FROM ca.{'slow' if j % 2 == 0 else 'missing_slow'} "
                                             f"WHERE id = {j}") for j in range(int(n))]
            for f in futures:
                try:
                    f.result()
                    counts["ok"] += 1
                except Exception as e:  # noqa: BLE001
                    if not type(e).__module__.startswith("cassandra"):
                        raise
                    counts["failed"] += 1
    print(json.dumps({"counts": counts}), flush=True)
    sys.stdin.read()
    cluster.shutdown()


if __name__ == "__main__":
    main()
