"""A Dubbo2 client for the Dubbo2 tests: the real client library dubbo-ssl-python's DubboClient
(the Dubbo2 protocol with Hessian2 serialization, a direct connection, no registry) against the
test's provider (tests/system/workloads/dubbo2_responder.py). The library keeps one connection
per provider and answers each call by its request id, so calls made from several threads are in
flight together on that connection. It runs what the specs say, prints one JSON line with what
the calls got, then waits for stdin to close before it exits, so the agent sees the process
alive while it handles the events.

    python -m tests.system.workloads.dubbo2_client PORT SPEC ...   each SPEC is OP:N
        ok         N calls of GreetingService.sayHello("secret-<i>"), each waited for
        fail       N calls of GreetingService.fail (SERVICE_ERROR, 70)
        missing    N calls of a service the provider does not export (SERVICE_NOT_FOUND, 60)
        multiplex  N calls of GreetingService.slow(j), j = 0..N-1, made at once from N threads,
                   then all waited for: the provider answers them in reverse order
    prints {"counts": {"ok": n, "failed": n}}
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import Counter

from dubbo_ssl.client import DubboClient
from dubbo_ssl.common.exceptions import DubboException

GREETING = "org.apache.dubbo.demo.GreetingService"
MISSING = "org.apache.dubbo.demo.MissingService"


def main() -> None:
    port, specs = int(sys.argv[1]), sys.argv[2:]
    logging.getLogger("dubbo_ssl").setLevel(logging.CRITICAL)  # it logs every failed call's exception
    host = f"127.0.0.1:{port}"
    greeting = DubboClient(GREETING, group="", version="0.0.0", dubbo_version="2.0.2", host=host)
    missing = DubboClient(MISSING, group="", version="0.0.0", dubbo_version="2.0.2", host=host)
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def run(client: DubboClient, method: str, *args: object) -> None:
        try:
            client.call(method, list(args), timeout=20)
            status = "ok"
        except DubboException:
            status = "failed"
        with lock:
            counts[status] += 1

    for spec in specs:
        op, n = spec.split(":")
        if op == "multiplex":
            threads = [threading.Thread(target=run, args=(greeting, "slow", j)) for j in range(int(n))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            continue
        for i in range(int(n)):
            if op == "ok":
                run(greeting, "sayHello", f"secret-{i}")
            elif op == "fail":
                run(greeting, "fail", f"secret-{i}")
            elif op == "missing":
                run(missing, "sayHello", f"secret-{i}")
    print(json.dumps({"counts": counts}), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
