"""A CPython workload for the GIL wait tests: `gil.py THREADS SECONDS` prints a "ready" JSON line,
waits for a line on stdin (the test lets it go once the agent follows it), runs THREADS threads
that each spin in Python bytecode for SECONDS (with two or more they contend for the GIL the
whole time), prints one JSON line of what it measured itself, and waits for stdin to close.

Two measures of the wait:
- `condwait`: with tests/system/workloads/condwait_timer.c preloaded (LD_PRELOAD), the total
  time its threads spent in pthread_cond_timedwait, where CPython's take_gil waits for the GIL,
  timed in the process with its own clock (None without the library).
- `slept`: from each thread's wall time, CPU time and the kernel's run-queue time
  (/proc/self/task/TID/schedstat), the time it was neither running nor queued for a CPU:
  asleep, which for a spinning thread is waiting for the GIL. A bound, not the same thing: it
  leaves out the time a woken waiter queues for a CPU inside its wait, and counts the wait of
  a thread that was made to drop the GIL until the other has taken it (outside
  pthread_cond_timedwait); the first grows with the machine's load.
With one thread there is nothing to wait for."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time


def schedstat() -> tuple[int, int]:
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        run, queued, _ = f.read().split()
    return int(run), int(queued)


def condwait() -> tuple[float, int] | None:
    lib = ctypes.CDLL(None)
    try:
        total, calls = lib.condwait_total_ns, lib.condwait_calls
    except AttributeError:
        return None
    total.restype = calls.restype = ctypes.c_ulonglong
    return total() / 1e9, int(calls())


def main() -> None:
    n, seconds = int(sys.argv[1]), float(sys.argv[2])
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    results: list[dict[str, float]] = []
    barrier = threading.Barrier(n)
    before = condwait()

    def spin() -> None:
        barrier.wait()
        run0, q0 = schedstat()
        w0 = time.monotonic()
        end = w0 + seconds
        x = 0
        while time.monotonic() < end:
            x += 1
        run1, q1 = schedstat()
        results.append({"wall": time.monotonic() - w0, "run": (run1 - run0) / 1e9, "queued": (q1 - q0) / 1e9})

    threads = [threading.Thread(target=spin) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = condwait()
    out: dict[str, object] = {"event": "done", "threads": results,
                              "slept": sum(max(0.0, r["wall"] - r["run"] - r["queued"]) for r in results),
                              "condwait": None, "condwait_calls": None}
    if before is not None and after is not None:
        out["condwait"], out["condwait_calls"] = after[0] - before[0], after[1] - before[1]
    print(json.dumps(out), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
