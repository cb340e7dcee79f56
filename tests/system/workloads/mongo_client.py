"""A MongoDB client for the MongoDB tests: the real driver, pymongo, against the test's server.
It connects (directConnection: one server), runs what the specs say one operation at a time,
prints one JSON line with what the server answered, then waits for stdin to close before it
exits, so the agent sees the process alive while it handles the events.

    python -m tests.system.workloads.mongo_client PORT SPEC ...   each SPEC is OP:N
        find       N find({"name": "secret-<i>", "age": {"$gt": <i>}}) (ok, an empty batch)
        find-fail  N find({"fail": "secret-<i>"}) (the server answers ok 0: OperationFailure)
        insert     N insert_one({"_id": "k-<i>", "pw": "secret-<i>"}) (ok)
        insert-dup N insert_one({"_id": "dup"}) (a writeError 11000: DuplicateKeyError)
    prints {"counts": {"ok": n, "failed": n}}
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from pymongo import MongoClient
from pymongo.errors import OperationFailure


def main() -> None:
    port, specs = int(sys.argv[1]), sys.argv[2:]
    client: MongoClient = MongoClient("127.0.0.1", port, directConnection=True, serverSelectionTimeoutMS=10_000,
                                      connect=True, retryWrites=False, retryReads=False)
    coll = client["ca"]["people"]
    counts: Counter[str] = Counter()
    for spec in specs:
        op, n = spec.split(":")
        for i in range(int(n)):
            try:
                if op == "find":
                    list(coll.find({"name": f"secret-{i}", "age": {"$gt": i}}))
                elif op == "find-fail":
                    list(coll.find({"fail": f"secret-{i}"}))
                elif op == "insert":
                    coll.insert_one({"_id": f"k-{i}", "pw": f"secret-{i}"})
                elif op == "insert-dup":
                    coll.insert_one({"_id": "dup"})
                else:
                    raise SystemExit(f"unknown op {op}")
                counts["ok"] += 1
            except OperationFailure:
                counts["failed"] += 1
    print(json.dumps({"counts": counts}), flush=True)
    sys.stdin.read()
    client.close()


if __name__ == "__main__":
    main()
