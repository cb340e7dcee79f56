"""Where the agent's time goes per traced HTTP request, stage by stage: nginx and wrk on
loopback in test cgroups at a paced rate (sampling 1.0, every request a span), first without the
agent (throughput and p99 for the ratios), then with it while py-spy samples the agent's Python
threads and kernel.bpf_stats_enabled counts each BPF program's run time. Prints:

- the in-kernel ns per request of each BPF program (kernel capture),
- µs of agent CPU per request for each user-space stage: the CPU (user + system) of the
  threads named as the process (Python's; also the store engine's threads it leaves unnamed)
  split by the shares of py-spy's samples of the thread holding the GIL (--gil): wake-up and
  ring read, decode, attribution and counting, parse, span row, batching and insert into the
  store, the CPU profiler's symbolization (not per request), everything else (scrapes,
  housekeeping, other buffers, log lines); then the CPU of the store engine's named threads
  (its insert pipeline, merges), which py-spy does not see, by thread name,
- the throughput and p99 ratios and the total CPU, as bench/l7.py prints them.

Asserts nothing: the machine is noisy; run it twice (--runs 2 does) and compare.

Run as root: `python bench/l7_stages.py [--rate 4000] [--seconds 15] [--runs 1]`; py-spy is in
the `bench` extra (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.system.helpers import AgentProcess, TestCgroups  # noqa: E402
from tests.system.servers import Nginx  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_l7", ROOT / "bench" / "l7.py")
assert _spec and _spec.loader
bench_l7 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_l7)

STAGES = ("wake-up and ring read", "decode", "attribution and counting", "parse", "span row",
          "batching and insert", "CPU profiler (not per request)", "other Python")
PLUGIN_FILES = re.compile(r"agent/l7/(?!tracer|contract|hist|tls|gotls|tlsbin)\w+\.py")  # TLS: uprobe attaching
PLUGIN_CLASSES = {"Http", "Http2", "Redis", "Postgres", "Mysql", "Dns", "Kafka", "Mongo", "Memcached", "Nats",
                  "Rabbitmq", "Zookeeper", "HttpParser"}


def frame_stage(frame: str) -> str | None:
    """The stage a py-spy frame ("Qualified.function (file:line)") belongs to, or None."""
    fn, _, where = frame.partition(" (")
    if fn.startswith(("Sink.", "Store.", "Client.", "Batch.")) or "clickhouse" in where or "chdb" in where:
        return "batching and insert"
    if fn in ("L7Tracer._span", "L7Tracer._peer", "L7Tracer._flush_spans") or fn.startswith("SpanColumns."):
        return "span row"
    if "contract.py" in where:
        return "decode"
    if PLUGIN_FILES.search(where) or fn.split(".")[0] in PLUGIN_CLASSES:
        return "parse"
    if fn in ("L7Tracer._handle", "L7Tracer.handle_event", "L7Tracer.handle_events", "L7Tracer._event") \
            or fn.startswith(("TcpTracker.", "Registry.", "Hist.")) \
            or "service_name" in fn:
        return "attribution and counting"
    if fn.startswith(("Loaded.poll", "_open.", "BPF.", "RingBuf.", "Ring.", "Batched.", "string_at")) \
            or "/bcc/" in where:
        return "wake-up and ring read"
    if fn.startswith(("Profiler.", "Symbolizer.")):
        return "CPU profiler (not per request)"
    return None


def stack_stage(frames: list[str]) -> str:
    """Root-to-leaf frames of one sample: the deepest stage, except that everything under the
    span row builder is the span row (the plug-in's span() included) and everything under the
    sink is insert."""
    stage = None
    for fr in frames:
        s = frame_stage(fr)
        if s is None:
            continue
        if stage == "batching and insert":
            break
        if stage == "span row" and s != "batching and insert":
            continue
        stage = s
    return stage or "other Python"


def read_raw(path: str) -> collections.Counter[str]:
    """py-spy's raw (collapsed) output: `thread;frame;frame... count` a line."""
    out: collections.Counter[str] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            out[stack_stage(stack.split(";")[1:])] += int(n)
    return out


def thread_cpu(pid: int) -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) of each thread of `pid`, by (tid, name)."""
    out: dict[tuple[int, str], float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        out[(int(tid), comm)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def by_thread_name(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]) -> dict[str, float]:
    """CPU seconds spent between the two readings, by thread name (digits dropped: a pool's threads together)."""
    out: collections.Counter[str] = collections.Counter()
    for key, v in after.items():
        out[re.sub(r"\d+", "", key[1])] += v - before.get(key, 0.0)
    return dict(out)


def run_once(args: argparse.Namespace, cg: TestCgroups, cid: str, url: str, paced: str,
             connections: int) -> dict[str, float]:
    base_rps, base_p99, _ = bench_l7.wrk(cg, cid, url, args.seconds, connections, paced)
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    agent = AgentProcess(["--min-container-age", "0s", "--traces-sampling", "1.0", *args.agent_args.split()])
    raw = tempfile.mktemp(suffix=".txt", prefix="l7-stages-")
    try:
        agent.start()
        time.sleep(2)
        proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
        before = {lb["program"]: (v, 0.0) for n, lb, v in agent.metrics()
                  if n == "coroot_agent_bpf_program_run_seconds_total"}
        runs0 = {lb["program"]: v for n, lb, v in agent.metrics() if n == "coroot_agent_bpf_program_runs_total"}
        cpu0 = sum(proc.cpu_times()[:2])
        threads0 = thread_cpu(proc.pid)
        spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--nonblocking",
                                "-r", str(args.hz), "-d", str(int(args.seconds + 6)), "-f", "raw", "-o", raw, "--gil",
                                "-p", str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rps, p99, total = bench_l7.wrk(cg, cid, url, args.seconds, connections, paced)
        spy.wait(timeout=60)
        bench_l7.wait_stored(agent, 60)  # every span in the store: its insert is part of a request's cost
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        threads = by_thread_name(threads0, thread_cpu(proc.pid))
        with open(f"/proc/{proc.pid}/comm") as f:
            python_name = f.read().strip()
        metrics = agent.metrics()
        ns = {lb["program"]: v * 1e9 - before.get(lb["program"], (0.0, 0.0))[0] * 1e9 for n, lb, v in metrics
              if n == "coroot_agent_bpf_program_run_seconds_total"}
        runs = {lb["program"]: v - runs0.get(lb["program"], 0) for n, lb, v in metrics
                if n == "coroot_agent_bpf_program_runs_total"}
        spans = sum(v for n, _, v in metrics if n == "coroot_agent_l7_spans_total")
        lost = sum(v for n, _, v in metrics if n == "coroot_agent_lost_events_total")
        samples = read_raw(raw)
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        rss, hwm = (int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
    finally:
        agent.stop()
        shutil.rmtree(agent.storage, ignore_errors=True)
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
        if os.path.exists(raw):
            if args.keep:
                shutil.move(raw, args.keep)
            else:
                os.unlink(raw)
    # the samples cover the load plus up to 6 s of draining; CPU also the wait for the last insert
    cpu_us = cpu * 1e6 / total
    row: dict[str, float] = {"requests": total, "rps": rps, "base_rps": base_rps, "p99": p99 / base_p99,
                             "cpu": cpu_us, "kernel": sum(ns.values()) / total, "spans": spans, "lost": lost,
                             "rss": rss, "peak rss": hwm}
    # py-spy samples the thread holding the GIL at a wall-clock rate: on a loaded machine that
    # thread is often descheduled while holding it, so samples/rate overstates CPU. Each stage
    # gets its share of the samples applied to the measured CPU of the threads that carry the
    # process's name (Python's, and the store engine's threads it did not name) instead; the
    # engine's named threads (insert pipeline, merges) are a line of their own.
    native = sum(v for name, v in threads.items() if name != python_name)
    row["native threads"] = native * 1e6 / total
    python_us = cpu_us - row["native threads"]
    n = sum(samples.values()) or 1
    for stage in STAGES:
        row[stage] = samples.get(stage, 0) / n * python_us
    row["GIL held, wall clock"] = n / args.hz * 1e6 / total
    print(f"\nrun: {total:,} requests at {rps:,.0f}/s (without the agent {base_rps:,.0f}/s), "
          f"{spans:,.0f} spans, {lost:.0f} events lost")
    print(f"throughput ratio {rps / base_rps:.3f}, p99 ratio {p99 / base_p99:.2f} "
          f"({base_p99 * 1e3:.2f} -> {p99 * 1e3:.2f} ms), agent CPU {cpu_us:.1f} µs per request; "
          f"agent RSS {rss:.0f} MB (peak {hwm:.0f} MB, embedded store)")
    print("kernel capture, ns per request (runs per request):")
    for prog, v in sorted(ns.items(), key=lambda kv: -kv[1]):
        if v > 0:
            print(f"  {prog:44s} {v / total:7.0f}  ({runs.get(prog, 0) / total:.1f} runs, "
                  f"{v / max(1, runs.get(prog, 0)):.0f} ns a run)")
    print(f"  {'all programs':44s} {row['kernel']:7.0f}")
    print(f"agent CPU, µs per request, by stage (py-spy samples of the {python_us:.1f} µs of threads named "
          f"{python_name!r}):")
    for stage in STAGES:
        print(f"  {stage:44s} {row[stage]:7.1f}")
    print(f"  {'store engine, its named threads (not sampled)':44s} {row['native threads']:7.1f}  (" + ", ".join(
        f"{name} {v * 1e6 / total:.1f}" for name, v in sorted(threads.items(), key=lambda kv: -kv[1])
        if v > 0 and name != python_name) + ")")
    print(f"  ({n:,} samples; the GIL was held {row['GIL held, wall clock']:.1f} µs of wall clock per request)")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=4000, help="requests/s (1,000 per wrk connection)")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--hz", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--keep", help="keep py-spy's raw stacks in this file")
    ap.add_argument("--agent-args", default="", help="more agent flags, e.g. --disable-profiling (the host-wide "
                                                     "CPU profiler symbolizes other users' new binaries too)")
    args = ap.parse_args()
    cg = TestCgroups()
    server = Nginx()
    try:
        server.start(cg, cg.create("bench-server"))
        url = f"http://127.0.0.1:{server.port}/bench"
        cid = cg.create("bench-client")
        paced = f"{server.dir}/paced.lua"
        Path(paced).write_text("function delay()\n  return 1\nend\n")
        connections = max(1, args.rate // 1000)
        bench_l7.wrk(cg, cid, url, 2, connections, paced)  # warm-up
        rows = [run_once(args, cg, cid, url, paced, connections) for _ in range(args.runs)]
        if len(rows) > 1:
            print("\nspread over runs (min-max):")
            for k in ("cpu", "native threads", "kernel", "p99", "rss", *STAGES):
                vals = [r[k] for r in rows]
                print(f"  {k:44s} {min(vals):7.1f} - {max(vals):7.1f}")
    finally:
        server.stop()
        cg.cleanup()


if __name__ == "__main__":
    main()
