"""Profiler overhead at 99 Hz: agent CPU as % of one core with and without the profiler, on an
idle machine and with both cores busy in test cgroups (target < 1% of one core for the
profiler; measured in steady state, after the workers' symbol tables were loaded once), and
in-kernel ns per sample from kernel.bpf_stats_enabled. The busy workers are python3
processes, so the in-kernel cost includes their Python frame walk. Prints; asserts nothing.

Run as root: `python bench/profiler.py [--seconds 20]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import AgentProcess, TestCgroups, bpf_programs  # noqa: E402

BUSY = "import time\nend = time.time() + float(__import__('sys').argv[1])\nwhile time.time() < end: pass\n"


def sample_prog(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the agent's perf-event programs (BPF_PROG_TYPE_PERF_EVENT = 7):
    on_cpu_sample, whose runs include the native unwinder it tail-calls (a tail-called program
    has no runs of its own in the kernel's stats)."""
    ns = runs = 0
    for v in bpf_programs(pid).values():
        if v.get("prog_type") == 7:
            ns += v.get("run_time_ns", 0)
            runs += v.get("run_cnt", 0)
    return ns, runs


def settle_tables(agent: AgentProcess, quiet: float = 5.0, limit: float = 180.0) -> None:
    """Steady state for the native unwinder too: wait until no unwind table has been built for
    `quiet` seconds (at start the agent builds one per executable file of the host's profiled
    processes: ~30 s of CPU for this host's 45 files), at most `limit` seconds."""
    t0 = last_change = time.monotonic()
    last = -1.0
    while time.monotonic() - t0 < limit:
        try:
            built = sum(v for n, _, v in agent.metrics() if n == "coroot_agent_profiler_unwind_tables_built_total")
        except Exception:  # noqa: BLE001 - not listening yet
            built = -1.0
        if built != last:
            last, last_change = built, time.monotonic()
        elif built >= 0 and time.monotonic() - last_change >= quiet:
            print(f"  unwind tables settled: {built:.0f} built, {time.monotonic() - t0:.0f} s")
            return
        time.sleep(1)


def measure(args: list[str], seconds: float, busy: bool) -> tuple[float, tuple[int, int]]:
    cg = TestCgroups()
    agent = AgentProcess(["--min-container-age", "0s", *args])
    agent.start()
    workers = []
    try:
        time.sleep(2)
        if busy:
            cid = cg.create("busy")
            workers = [cg.spawn(cid, [sys.executable, "-c", BUSY, str(seconds + 8)]) for _ in range(2)]
            # Steady state: the first drains load the workers' ELF symbol tables once (~0.5 s of
            # CPU for python3's), which is not a per-second cost.
            time.sleep(5)
        settle_tables(agent)
        p = psutil.Process(agent.proc.pid)
        c0, s0 = sum(p.cpu_times()[:2]), sample_prog(agent.proc.pid)
        time.sleep(seconds)
        c1, s1 = sum(p.cpu_times()[:2]), sample_prog(agent.proc.pid)
        return (c1 - c0) / seconds * 100, (s1[0] - s0[0], s1[1] - s0[1])
    finally:
        for w in workers:
            w.kill()
        agent.stop()
        cg.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    secs = ap.parse_args().seconds
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    try:
        for busy in (False, True):
            what = "both cores busy" if busy else "idle machine"
            without, _ = measure(["--disable-profiling"], secs, busy)
            with_, (ns, runs) = measure([], secs, busy)
            print(f"{what}: agent CPU {with_:.2f}% of one core with the profiler at 99 Hz, {without:.2f}% without "
                  f"(profiler: {with_ - without:.2f}%; target < 1%)")
            if runs:
                print(f"{what}: in-kernel {ns / runs:.0f} ns per sample ({runs} samples)")
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)


if __name__ == "__main__":
    main()
