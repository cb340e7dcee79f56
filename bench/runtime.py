"""What the application runtime metrics cost. Prints; asserts nothing.

JVM: real JVMs (tests/system/workloads/GcLoop.java, compiled here) in test cgroups, read by the
JVM component over the real registry: microseconds per hsperfdata decode (whole file, the
wanted entries, a refresh of a parsed layout) and per read as the agent does it (NSpid, the
safe open through /proc/PID/root, the read, the refresh), and what that makes per JVM at the
5 s refresh.

Run as root: `python bench/runtime.py [--jvms 4] [--rounds 200]`.
"""

from __future__ import annotations

import argparse
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
from tests.system.helpers import REPO, TestCgroups  # noqa: E402

GC_LOOP = REPO / "tests" / "system" / "workloads" / "GcLoop.java"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jvms", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    bench_jvm(args.jvms, args.rounds)


if __name__ == "__main__":
    main()
