"""What the application runtime metrics cost. Prints; asserts nothing.

JVM: real JVMs (tests/system/workloads/GcLoop.java, compiled here) in test cgroups, read by the
JVM component over the real registry: microseconds per hsperfdata decode (whole file, the
wanted entries, a refresh of a parsed layout) and per read as the agent does it (NSpid, the
safe open through /proc/PID/root, the read, the refresh), and what that makes per JVM at the
5 s refresh.

Python GIL: the agent's uprobes sit on the C library's pthread_cond_timedwait, which every
process on the host using that library runs. A loop of calls that return at once (a deadline in
the past), timed without the agent, then with it from a process it does not follow (the
probes fire, the kernel side leaves after one lookup) and from a Python process it follows
(the wait is timed and added): nanoseconds each call costs more, and the BPF programs' own run
time per call (kernel.bpf_stats_enabled).

Node.js: the agent's uprobes sit on libuv's uv__io_poll (entry and return) and its I/O callbacks
in the node binary, which only Node.js runs. A chain of setImmediate callbacks (one event-loop
iteration, one uv__io_poll call each) in a test cgroup, timed without the agent and with it
following the process: nanoseconds each iteration costs more, and the BPF programs' own run
time per call.

.NET: the agent's cost is decoding the nettrace stream of each process's System.Runtime
EventCounters; timed on the session recorded from the real .NET Core 3.1.23 runtime
(tests/unit/data/dotnet31_system_runtime.nettrace): per counter event and per report of the
19 counters .NET 3.1 sends each interval.

Run as root: `python bench/runtime.py [--jvms 4] [--rounds 200] [--calls 200000] [--iterations 200000]
[--only jvm|python|nodejs|dotnet]`.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.containers.registry import Registry  # noqa: E402
from agent.runtime import hsperfdata, jvm  # noqa: E402
from tests.system.helpers import AGENT_DEFAULTS, REPO, AgentProcess, TestCgroups, wait_for  # noqa: E402

GC_LOOP = REPO / "tests" / "system" / "workloads" / "GcLoop.java"
# Calls pthread_cond_timedwait (through ctypes) with a deadline in the past; prints ns per call
# beyond the same loop without the call, best of three.
COND_LOOP = """
import ctypes, sys, time
libc = ctypes.CDLL("libc.so.6")
cond, mutex = ctypes.create_string_buffer(64), ctypes.create_string_buffer(64)
class Timespec(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
past = ctypes.byref(Timespec(0, 0))
lock, unlock, wait = libc.pthread_mutex_lock, libc.pthread_mutex_unlock, libc.pthread_cond_timedwait
def loop(n, call):
    t = time.perf_counter()
    for _ in range(n):
        lock(mutex)
        if call:
            wait(cond, mutex, past)
        unlock(mutex)
    return (time.perf_counter() - t) / n
n = int(sys.argv[1])
sys.stdin.readline()
print((min(loop(n, True) for _ in range(3)) - min(loop(n, False) for _ in range(3))) * 1e9, flush=True)
"""

# Runs `n` event-loop iterations (a setImmediate chain) three times once told to; prints the
# best ns per iteration.
LOOP_JS = """
const n = Number(process.argv[1]);
function once() {
  return new Promise((done) => {
    let i = 0;
    const t = process.hrtime.bigint();
    const step = () => { if (++i === n) done(Number(process.hrtime.bigint() - t) / n); else setImmediate(step); };
    setImmediate(step);
  });
}
process.stdin.once('data', async () => {
  let best = Infinity;
  for (let k = 0; k < 3; k++) best = Math.min(best, await once());
  console.log(best);
  process.exit(0);
});
"""


def per_call_us(fn, n: int) -> float:  # noqa: ANN001
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def bench_jvm(n_jvms: int, rounds: int) -> None:
    classes = Path(tempfile.mkdtemp(prefix="coroot-agent-bench-", dir="/var/tmp"))
    cg = TestCgroups()
    procs = []
    try:
        subprocess.run(["javac", "-d", str(classes), str(GC_LOOP)], check=True, timeout=120)
        for _ in range(n_jvms):
            cid = cg.create("bench-jvm")
            p = cg.spawn(cid, ["java", "-cp", str(classes), "GcLoop", "0.2"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None
            started = json.loads(p.stdout.readline())
            json.loads(p.stdout.readline())
            procs.append((p, started))
        pid0 = procs[0][0].pid
        data = next(Path("/tmp").glob(f"hsperfdata_*/{pid0}")).read_bytes()
        full = per_call_us(lambda: hsperfdata.parse(data), 300)
        wanted = per_call_us(lambda: hsperfdata.parse(data, want=jvm._wanted), 300)
        pd = hsperfdata.parse(data, want=jvm._wanted)
        refresh = per_call_us(lambda: pd.refresh(data), 3000)
        stats = per_call_us(lambda: jvm.JvmStats.from_perf(pd), 3000)
        print(f"hsperfdata of a JDK 17 JVM: {len(data)} bytes, {pd.num_entries} entries, {len(pd.entries)} wanted")
        print(f"  decode the whole file:      {full:8.1f} us")
        print(f"  decode the wanted entries:  {wanted:8.1f} us  (the first read of a JVM)")
        print(f"  refresh a parsed layout:    {refresh:8.1f} us  (every later read)")
        print(f"  metrics from the counters:  {stats:8.1f} us")

        reg = Registry(min_container_age=0)
        reg.scan()
        m = jvm.JvmMetrics(reg, refresh=0.0)  # every JVM is due every round
        m.round()  # classify and the first (layout) read
        assert m.reads.get("ok", 0) >= n_jvms, m.reads
        before = sum(m.reads.values())
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            m.round()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        reads = sum(m.reads.values()) - before
        per_read = cpu / reads * 1e6
        print(f"the component over the real registry, {n_jvms} JVMs, {reads} reads:")
        print(f"  CPU per read (NSpid, safe open in the JVM's root, read, refresh): {per_read:.1f} us "
              f"(wall {wall / reads * 1e6:.1f} us)")
        print(f"  per JVM at the {jvm.REFRESH_SECONDS:g} s refresh: {per_read / jvm.REFRESH_SECONDS / 1e4:.4f}% "
              f"of one core; 1000 JVMs on a node: {per_read * 1000 / jvm.REFRESH_SECONDS / 1e4:.2f}%")
    finally:
        for p, _ in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(30)
        cg.cleanup()
        shutil.rmtree(classes, ignore_errors=True)


def cond_loop(calls: int, cg: TestCgroups | None, wait_followed: AgentProcess | None = None) -> float:
    """ns per call beyond the loop; in a test cgroup (a container) when `cg` is given."""
    argv = ["/usr/bin/python3", "-c", COND_LOOP, str(calls)]
    kw = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    p = cg.spawn(cg.create("bench-gil"), argv, **kw) if cg is not None else subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    if wait_followed is not None:
        assert wait_for(lambda: [1 for n, lb, _ in wait_followed.metrics()
                                 if n == "coroot_agent_python_processes" and _ >= 1], 30), "not followed"
    out, _ = p.communicate("go\n", timeout=300)
    return float(out)


def bench_python(calls: int) -> None:
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    cg = TestCgroups()
    a = AgentProcess([*AGENT_DEFAULTS, "--disable-l7-tracing", "--disable-profiling", "--disable-log-parsing",
                      "--disable-log-entries"])
    try:
        without = cond_loop(calls, None)
        a.start()
        # a Python process in a container: the agent probes the host's C library and follows it
        followed = cond_loop(calls, cg, wait_followed=a)
        unfollowed = cond_loop(calls, None)
        samples = [(n, lb.get("program", ""), v) for n, lb, v in a.metrics()]
        runs = {p: v for n, p, v in samples if n == "coroot_agent_bpf_program_runs_total" and p.startswith("python_")}
        secs = {p: v for n, p, v in samples if n == "coroot_agent_bpf_program_run_seconds_total"
                and p.startswith("python_")}
        print(f"pthread_cond_timedwait, {calls} calls a loop (ctypes; ns beyond the loop, best of 3):")
        print(f"  without the agent:                       {without:8.0f} ns a call")
        print(f"  with it, a process it does not follow:   {unfollowed:8.0f} ns (+{unfollowed - without:.0f})")
        print(f"  with it, a Python process it follows:    {followed:8.0f} ns (+{followed - without:.0f})")
        for prog in sorted(runs):
            if runs[prog]:
                print(f"  {prog}: {secs.get(prog, 0) / runs[prog] * 1e9:.0f} ns in the kernel a run "
                      f"({runs[prog]:.0f} runs, all processes)")
    finally:
        cg.cleanup()
        a.cleanup()


def event_loop(iterations: int, cg: TestCgroups, followed_by: AgentProcess | None = None) -> float:
    """ns per event-loop iteration of a Node.js process in a test cgroup."""
    node = shutil.which("node") or shutil.which("nodejs") or "node"
    p = cg.spawn(cg.create("bench-nodejs"), [node, "-e", LOOP_JS, str(iterations)], stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, text=True)
    if followed_by is not None:
        assert wait_for(lambda: [1 for n, _, v in followed_by.metrics()
                                 if n == "coroot_agent_nodejs_processes" and v >= 1], 30), "not followed"
    out, _ = p.communicate("go\n", timeout=300)
    return float(out)


def bench_nodejs(iterations: int) -> None:
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    cg = TestCgroups()
    a = AgentProcess([*AGENT_DEFAULTS, "--enable-nodejs-monitoring", "--disable-l7-tracing", "--disable-profiling",
                      "--disable-log-parsing", "--disable-log-entries"])
    try:
        without = event_loop(iterations, cg)
        a.start()
        followed = event_loop(iterations, cg, followed_by=a)
        samples = [(n, lb.get("program", ""), v) for n, lb, v in a.metrics()]
        runs = {p: v for n, p, v in samples if n == "coroot_agent_bpf_program_runs_total" and p.startswith("nodejs_")}
        secs = {p: v for n, p, v in samples if n == "coroot_agent_bpf_program_run_seconds_total"
                and p.startswith("nodejs_")}
        print(f"Node.js event loop, {iterations} setImmediate iterations (ns an iteration, best of 3):")
        print(f"  without the agent:                  {without:8.0f} ns")
        print(f"  with it, following the process:     {followed:8.0f} ns (+{followed - without:.0f})")
        for prog in sorted(runs):
            if runs[prog]:
                print(f"  {prog}: {secs.get(prog, 0) / runs[prog] * 1e9:.0f} ns in the kernel a run ({runs[prog]:.0f} runs)")
    finally:
        cg.cleanup()
        a.cleanup()


def bench_dotnet(rounds: int) -> None:
    from agent.runtime import dotnet, nettrace

    data = (Path(__file__).resolve().parent.parent / "tests" / "unit" / "data"
            / "dotnet31_system_runtime.nettrace").read_bytes()

    def one() -> int:
        r = nettrace.Reader(io.BytesIO(data).read)
        c = dotnet.Counters()
        events = 0
        try:
            r.open()
            while not r.ended:
                for ev in r.next_block():
                    c.add(ev.values)
                    events += 1
        except nettrace.Invalid:
            pass  # the recording ends mid-object
        return events

    events = one()
    us = per_call_us(one, rounds)
    print(json.dumps({"runtime": "dotnet", "events": events, "us_per_recording": round(us, 1),
                      "us_per_counter_event": round(us / events, 2),
                      "us_per_report_of_19_counters": round(us / events * 19, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jvms", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--iterations", type=int, default=200_000)
    ap.add_argument("--only", choices=("jvm", "python", "nodejs", "dotnet"))
    args = ap.parse_args()
    if args.only in (None, "jvm"):
        bench_jvm(args.jvms, args.rounds)
    if args.only in (None, "python"):
        bench_python(args.calls)
    if args.only in (None, "nodejs"):
        bench_nodejs(args.iterations)
    if args.only in (None, "dotnet"):
        bench_dotnet(args.rounds)


if __name__ == "__main__":
    main()
