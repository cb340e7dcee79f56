"""Profiler overhead at 99 Hz: agent CPU as % of one core with and without the profiler, on an
idle machine and with both cores busy in test cgroups (target < 1% of one core for the
profiler; measured in steady state, after the workers' symbol tables were loaded once), and
in-kernel ns per sample from kernel.bpf_stats_enabled. The busy workers are python3
processes, so the in-kernel cost includes their Python frame walk. Prints; asserts nothing.

Run as root: `python bench/profiler.py [--seconds 20] [--busy-only] [--agent-args=--enable-native-unwinding]`;
with the native unwinder on it also prints what building the tables at start cost (agent CPU from
its start until no table was built for 5 s, and the tables' own build time and CFI bytes).
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


def settle_tables(agent: AgentProcess, quiet: float = 8.0, limit: float = 240.0) -> float:
    """Steady state for the native unwinder too: wait until no unwind table has been built for
    `quiet` seconds and the agent used under a third of a core meanwhile (a table being built
    takes seconds: at start the agent builds one per executable file of the host's profiled
    processes, ~30 s of CPU for this host's 45 files), at most `limit` seconds."""
    p = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
    t0 = time.monotonic()
    window: list[tuple[float, float, float]] = []  # (time, built, agent CPU)
    while time.monotonic() - t0 < limit:
        try:
            built = sum(v for n, _, v in agent.metrics() if n == "coroot_agent_profiler_unwind_tables_built_total")
        except Exception:  # noqa: BLE001 - not listening yet
            built = -1.0
        now = time.monotonic()
        window.append((now, built, sum(p.cpu_times()[:2])))
        old = [w for w in window if w[0] <= now - quiet]
        if built >= 0 and old:
            w0 = old[-1]
            if all(w[1] == built for w in window if w[0] >= w0[0]) and (window[-1][2] - w0[2]) / (now - w0[0]) < 0.33:
                m = {n: v for n, lb, v in agent.metrics() if n.startswith("coroot_agent_profiler_unwind_")}
                secs = m.get("coroot_agent_profiler_unwind_build_seconds_total", 0.0)
                mb = m.get("coroot_agent_profiler_unwind_cfi_bytes_total", 0.0) / 1e6
                print(f"  unwind tables settled: {built:.0f} built in {secs:.1f} s of build time, {mb:.1f} MB of CFI "
                      f"({secs / mb if mb else 0:.2f} s/MB), {now - t0:.0f} s after the wait began")
                return now - t0
        time.sleep(1)
    print("  unwind tables did not settle")
    return limit


def native_counts(agent: AgentProcess) -> dict[str, float]:
    """The kernel's native-walk counters (coroot_agent_profiler_native_*)."""
    out: dict[str, float] = {}
    try:
        for n, labels, v in agent.metrics():
            if n == "coroot_agent_profiler_native_frames_total":
                out[labels.get("by", "")] = v
            elif n == "coroot_agent_profiler_native_stacks_total":
                out["stacks"] = v
            elif n == "coroot_agent_profiler_native_cached_frames_total":
                out["cached"] = v
    except Exception:  # noqa: BLE001 - not listening
        pass
    out.setdefault("cached", 0.0)
    return out


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
        p = psutil.Process(agent.proc.pid)
        settle_tables(agent)
        start_cpu = sum(p.cpu_times()[:2])
        print(f"  agent CPU from its start to steady state: {start_cpu:.1f} s "
              f"({time.time() - p.create_time():.0f} s after its start)")
        # kernel.bpf_stats_enabled is global: another run on this machine may have reset it
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
        n0 = native_counts(agent)
        c0, s0 = sum(p.cpu_times()[:2]), sample_prog(agent.proc.pid)
        time.sleep(seconds)
        c1, s1 = sum(p.cpu_times()[:2]), sample_prog(agent.proc.pid)
        n1 = native_counts(agent)
        if n1.get("stacks", 0) > n0.get("stacks", 0):
            d = {k: v - n0.get(k, 0) for k, v in n1.items()}
            walks = d["stacks"]
            print(f"  native walks {walks:.0f} ({walks / max(s1[1] - s0[1], 1):.0%} of the samples): frames a walk "
                  f"{(d['table'] + d['frame_pointer']) / walks:.1f}, by table {d['table'] / walks:.1f} "
                  f"(from the cache {d['cached'] / walks:.1f}), by frame pointer {d['frame_pointer'] / walks:.1f}")
        return (c1 - c0) / seconds * 100, (s1[0] - s0[0], s1[1] - s0[1])
    finally:
        for w in workers:
            w.kill()
        agent.stop()
        cg.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--busy-only", action="store_true", help="skip the idle-machine runs")
    ap.add_argument("--agent-args", default="", help="more agent arguments for the runs with the profiler")
    a = ap.parse_args()
    secs = a.seconds
    extra = a.agent_args.split()
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    try:
        for busy in (True,) if a.busy_only else (False, True):
            what = "both cores busy" if busy else "idle machine"
            without, _ = measure(["--disable-profiling"], secs, busy)
            with_, (ns, runs) = measure(extra, secs, busy)
            print(f"{what}: agent CPU {with_:.2f}% of one core with the profiler at 99 Hz, {without:.2f}% without "
                  f"(profiler: {with_ - without:.2f}%; target < 1%)")
            if runs:
                print(f"{what}: in-kernel {ns / runs:.0f} ns per sample ({runs} samples)")
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)


if __name__ == "__main__":
    main()
