"""Log pipeline throughput: lines/s parsed (levels, patterns, PII scrubber) and stored
(otel_logs in the embedded store), and agent CPU per 1,000 lines, for a process in a test
cgroup writing to a file under /var/log. Target >= 50,000 lines/s. Prints; asserts nothing.

Run as root: `python bench/logs.py [--lines 200000]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import AgentProcess, TestCgroups  # noqa: E402

WRITER = """
import sys
n = int(sys.argv[2])
with open(sys.argv[1], "a") as f:
    for i in range(n):
        f.write(f"2024-05-01 10:00:00 {'ERROR' if i % 5 == 0 else 'INFO'} request {i} from user{i % 97}@example.com took {i % 1000} ms\\n")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", type=int, default=200_000)
    n = ap.parse_args().lines
    path = f"/var/log/bench-{uuid.uuid4().hex[:8]}.log"
    cg = TestCgroups()
    agent = AgentProcess(["--min-container-age", "0s", "--store-batch-age", "1s"])
    agent.start()
    try:
        cid = cg.create("logbench")
        proc = psutil.Process(agent.proc.pid)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        cg.spawn(cid, [sys.executable, "-c", WRITER, path, str(n)]).wait()

        def counted() -> float:
            return sum(v for name, lb, v in agent.metrics()
                       if name == "container_log_messages_total" and lb.get("container_id") == cid)

        while counted() < n and time.monotonic() - t0 < 300:
            time.sleep(0.2)
        took = time.monotonic() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        print(f"{counted():.0f} of {n} lines parsed in {took:.1f} s: {n / took:,.0f} lines/s (target 50,000; "
              f"ratio {n / took / 50_000:.2f}); agent CPU {cpu / n * 1000 * 1000:.1f} ms per 1,000 lines")
    finally:
        agent.stop()
        cg.cleanup()
        if os.path.exists(path):
            os.unlink(path)
        subprocess.run(["true"])


if __name__ == "__main__":
    main()
