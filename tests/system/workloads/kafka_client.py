"""A Kafka client for the Kafka tests: the real client library, kafka-python's KafkaProducer,
against the test's broker. Idempotence off and acks=1 (no InitProducerId, one response per
Produce), no retries, no linger. It runs what the specs say, prints one JSON line with what the
broker answered, then waits for stdin to close before it exits, so the agent sees the process
alive while it handles the events.

    python -m tests.system.workloads.kafka_client PORT SPEC ...   each SPEC is OP:N
        ok        N sends to topic "ok-topic", each waited for (one Produce request each)
        bad       N sends to topic "bad-topic", each waited for (error 10: MessageSizeTooLarge)
        pipeline  N sends to "ok-topic" 30 ms apart without waiting, then a flush: with a
                  broker that answers late, up to 5 Produce requests are in flight at once
    prints {"counts": {"ok": n, "failed": n}}
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

from kafka import KafkaProducer
from kafka.errors import KafkaError


def main() -> None:
    port, specs = int(sys.argv[1]), sys.argv[2:]
    producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", enable_idempotence=False, acks=1, retries=0,
                             linger_ms=0, max_in_flight_requests_per_connection=5, request_timeout_ms=20_000)
    counts: Counter[str] = Counter()
    for spec in specs:
        op, n = spec.split(":")
        if op == "pipeline":
            futures = []
            for i in range(int(n)):
                futures.append(producer.send("ok-topic", f"secret-{i}".encode()))
                time.sleep(0.03)
            producer.flush(30)
            for f in futures:
                try:
                    f.get(30)
                    counts["ok"] += 1
                except KafkaError:
                    counts["failed"] += 1
            continue
        for i in range(int(n)):
            try:
                producer.send("bad-topic" if op == "bad" else "ok-topic", f"secret-{i}".encode()).get(30)
                counts["ok"] += 1
            except KafkaError:
                counts["failed"] += 1
    print(json.dumps({"counts": counts}), flush=True)
    sys.stdin.read()
    producer.close(5)


if __name__ == "__main__":
    main()
