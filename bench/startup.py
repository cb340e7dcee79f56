"""Start-up to the first /metrics answer (budget 10 s, BCC compilation and opening the embedded
store included) and the agent's RSS after start, with the embedded store (the default; chDB
alone is ~290 MB when it opens, most of it start-up pages the agent gives back: agent/memory.py).
RSS with a remote store is printed by bench/store.py, and under load by bench/memory.py.
Prints figures; asserts nothing.

Run as root: `make bench` or `python bench/startup.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import AgentProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    starts, rss = [], []
    for _ in range(args.runs):
        a = AgentProcess()
        starts.append(a.start())
        time.sleep(2)  # let it settle: first scrape done, LLVM memory freed
        a.get("/metrics")
        rss.append(psutil.Process(a.proc.pid).memory_info().rss / 2**20)
        a.stop()
    print(f"start-up to first /metrics: median {statistics.median(starts):.2f} s "
          f"(min {min(starts):.2f}, max {max(starts):.2f}; budget 10 s; ratio to budget "
          f"{statistics.median(starts) / 10:.2f})")
    print(f"RSS after start with the embedded store: median {statistics.median(rss):.0f} MB "
          f"(min {min(rss):.0f}, max {max(rss):.0f}); with a remote store see bench/store.py")


if __name__ == "__main__":
    main()
