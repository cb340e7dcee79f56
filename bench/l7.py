"""L7 load on a traced server, per protocol family (--protocol): HTTP/1.1 (wrk against nginx),
HTTP/2 (h2load against nginx's h2c port, one stream at a time per connection) or Redis
(redis-benchmark GET/SET against redis-server); client and server on loopback in test cgroups,
first without the agent, then with it (sampling 1.0, every request a span, unless --sampling). Prints the throughput
ratio (target >= 0.97), the p99 latency ratio (target <= 1.05), agent CPU µs per request
(target <= 10), in-kernel ns per request from kernel.bpf_stats_enabled (target <= 1,000), and
events lost (target 0). Asserts nothing: this machine is noisy; run it twice.

Run as root: `python bench/l7.py [--protocol http|http2|redis] [--seconds 10] [--connections 20]
[--sampling 1.0] [--rate N]` (h2load is Debian's nghttp2-client).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import AgentProcess, TestCgroups, bpf_programs  # noqa: E402
from tests.system.servers import Nginx, Redis  # noqa: E402

UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(cg: TestCgroups, cid: str, url: str, seconds: float, connections: int,
        paced: str | None = None) -> tuple[float, float, int]:
    """(requests/s, p99 seconds, requests) of one wrk run in the client cgroup; `paced`: a Lua
    script making each connection wait 1 ms between requests (about 1,000/s per connection)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", *(["-s", paced] if paced else []), url]
    p = cg.spawn(cid, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.communicate()[0].decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, float(m.group(1)) * UNITS[m.group(2)], total  # type: ignore[union-attr]


def h2load(cg: TestCgroups, cid: str, url: str, seconds: float, connections: int,
           rate: int, log: str) -> tuple[float, float, int]:
    """(requests/s, p99 seconds, requests) of one h2load run (HTTP/2 prior knowledge); p99 from
    its per-request log (start, status, microseconds per line)."""
    argv = ["h2load", f"-c{connections}", "-m1", f"-D{seconds:g}", f"--log-file={log}",
            *([f"--rps={max(1, rate // connections)}"] if rate else []), url]
    p = cg.spawn(cid, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.communicate()[0].decode()
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))  # type: ignore[union-attr]
    with open(log) as f:
        lat = sorted(int(line.split()[2]) for line in f if len(line.split()) == 3)
    os.unlink(log)
    return rps, lat[int(len(lat) * 0.99)] / 1e6 if lat else 0.0, total


def redis_benchmark(cg: TestCgroups, cid: str, port: int, seconds: float, connections: int) -> tuple[float, float, int]:
    """(requests/s, p99 seconds, requests) of redis-benchmark GET and SET for about `seconds`."""
    n = int(15_000 * seconds)  # about what this machine does per second under the agent, so runs take ~seconds
    argv = ["redis-benchmark", "-p", str(port), "-c", str(connections), "-n", str(n), "-t", "get,set", "--csv"]
    p = cg.spawn(cid, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = p.communicate()[0].decode()
    rows = [line.replace('"', "").split(",") for line in out.splitlines() if line.startswith('"GET"') or
            line.startswith('"SET"')]
    rps = sum(float(r[1]) for r in rows) / len(rows)
    p99 = max(float(r[6]) for r in rows) / 1e3
    return rps, p99, n * len(rows)


class H2cNginx(Nginx):
    """nginx whose plain port speaks HTTP/2 with prior knowledge (h2c)."""

    def __init__(self) -> None:
        super().__init__()
        conf = os.path.join(self.dir, "nginx.conf")
        text = Path(conf).read_text()
        Path(conf).write_text(text.replace(f"listen {self.host}:{self.port};", f"listen {self.host}:{self.port} http2;"))


COUNTED = {"http": "container_http_requests_total", "http2": "container_http_requests_total",
           "redis": "container_redis_queries_total"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--protocol", choices=sorted(COUNTED), default="http")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--sampling", default="1.0", help="--traces-sampling of the agent (the targets are for 1.0)")
    ap.add_argument("--rate", type=int, default=0,
                    help="about this many requests/s (1,000 per connection, paced by wrk's delay()) instead of "
                         "as fast as nginx goes; e.g. 10000, the load Coroot quotes its agent's cost at")
    ap.add_argument("--agent-args", default="", help="more agent flags, e.g. --disable-l7-tracing for a baseline "
                                                     "of the TCP probes alone")
    args = ap.parse_args()
    cg = TestCgroups()
    server: Nginx | Redis = H2cNginx() if args.protocol == "http2" else Redis() if args.protocol == "redis" else Nginx()
    agent: AgentProcess | None = None
    try:
        server.start(cg, cg.create("bench-server"))
        url = f"http://127.0.0.1:{server.port}/bench"
        cid = cg.create("bench-client")
        paced = None
        if args.rate and args.protocol == "http":
            paced = f"{server.dir}/paced.lua"
            Path(paced).write_text("function delay()\n  return 1\nend\n")
            args.connections = max(1, args.rate // 1000)

        def load(seconds: float) -> tuple[float, float, int]:
            if args.protocol == "http2":
                return h2load(cg, cid, url, seconds, args.connections, args.rate, f"{server.dir}/h2load.log")
            if args.protocol == "redis":
                return redis_benchmark(cg, cid, server.port, seconds, args.connections)
            return wrk(cg, cid, url, seconds, args.connections, paced)

        load(2)  # warm-up
        base_rps, base_p99, _ = load(args.seconds)

        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
        agent = AgentProcess(["--min-container-age", "0s", "--traces-sampling", args.sampling, *args.agent_args.split()])
        agent.start()
        time.sleep(2)
        proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
        cpu0 = sum(proc.cpu_times()[:2])
        progs0 = bpf_programs(proc.pid)
        rps, p99, total = load(args.seconds)
        time.sleep(3)  # the agent drains what is queued
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        progs1 = bpf_programs(proc.pid)
        ns = sum(v.get("run_time_ns", 0) - progs0.get(k, {}).get("run_time_ns", 0) for k, v in progs1.items())
        metrics = agent.metrics()
        counted = sum(v for n, lb, v in metrics if n == COUNTED[args.protocol] and lb.get("container_id") == cid)
        spans = sum(v for n, _, v in metrics if n == "coroot_agent_l7_spans_total")
        lost = sum(v for n, lb, v in metrics if n == "coroot_agent_lost_events_total")
        print(f"{args.protocol}, {args.connections} connections{f', ~{args.rate:,}/s' if args.rate else ''}")
        print(f"without the agent: {base_rps:,.0f} requests/s, p99 {base_p99 * 1e3:.2f} ms")
        print(f"with the agent:    {rps:,.0f} requests/s, p99 {p99 * 1e3:.2f} ms; {total:,} requests, "
              f"{counted:,.0f} counted, {spans:,.0f} spans")
        print(f"throughput ratio: {rps / base_rps:.3f} (target >= 0.97)")
        print(f"p99 latency ratio: {p99 / base_p99:.3f} (target <= 1.05)")
        print(f"agent CPU: {cpu * 1e6 / total:.1f} µs per request (target <= 10); {cpu / args.seconds * 100:.0f}% of one core")
        print(f"in-kernel: {ns / total:.0f} ns per request (target <= 1,000), all programs of the agent")
        print(f"events lost: {lost:.0f} (target 0)")
        per_prog = {lb["program"]: v for n, lb, v in metrics if n == "coroot_agent_bpf_program_run_seconds_total"}
        print("in-kernel by program (ns per request, since the agent started):")
        for prog, sec in sorted(per_prog.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {prog:48s} {sec * 1e9 / total:8.0f}")
    finally:
        if agent is not None:
            agent.stop()
            shutil.rmtree(agent.storage, ignore_errors=True)
        server.stop()
        cg.cleanup()
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)


if __name__ == "__main__":
    main()
