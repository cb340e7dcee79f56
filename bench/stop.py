"""Time from SIGTERM to the agent's exit (budget 2 s, every batch flushed), idle and with every
core busy (one CPU burner per core, at the agent's own priority). Prints the times and, from the
agent's log, how long each component took to close (the `closed … in` lines at debug level).
Asserts nothing.

Run as root: `python bench/stop.py [--runs N] [--settle SECONDS] [-- AGENT FLAGS...]`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import AgentProcess  # noqa: E402

BURN = "while True: pass"
CLOSED = re.compile(r"closed (\S+) in ([0-9.]+)s")
STOPPED = re.compile(r"stopped in ([0-9.]+)s")


def one_stop(settle: float, flags: list[str]) -> tuple[float, dict[str, float]]:
    a = AgentProcess(["--log-level", "debug", *flags])
    try:
        a.start(timeout=180)  # BCC's compile is slow on a busy machine
    except RuntimeError:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        raise
    time.sleep(settle)  # a few profiler drains, a scrape or two, batches to flush
    t0 = time.monotonic()
    code = a.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - t0
    if code != 0:
        print(f"agent exited with {code}:\n{a.log()[-3000:]}", file=sys.stderr)
    text = a.log()
    parts = {name: float(s) for name, s in CLOSED.findall(text)}
    stopped = STOPPED.search(text)
    if stopped:  # the rest: signal delivery, the main thread waking up, the interpreter's exit
        parts["(stop() in all)"] = float(stopped.group(1))
    return took, parts


def measure(label: str, runs: int, settle: float, flags: list[str]) -> None:
    times: list[float] = []
    slowest: dict[str, float] = {}
    for _ in range(runs):
        took, parts = one_stop(settle, flags)
        times.append(took)
        for name, s in parts.items():
            slowest[name] = max(slowest.get(name, 0.0), s)
    print(f"{label}: stop median {statistics.median(times):.2f} s, max {max(times):.2f} s "
          f"(budget 2 s) over {runs} runs: {', '.join(f'{t:.2f}' for t in times)}")
    if slowest:
        top = sorted(slowest.items(), key=lambda kv: -kv[1])[:7]
        print("  slowest closes: " + ", ".join(f"{n} {s:.2f}s" for n, s in top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds the agent runs before SIGTERM")
    ap.add_argument("flags", nargs="*", help="agent flags, after --")
    args = ap.parse_args()
    measure("idle", args.runs, args.settle, args.flags)
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(os.cpu_count() or 1)]
    try:
        measure(f"{len(burners)} cores busy", args.runs, args.settle, args.flags)
    finally:
        for p in burners:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
