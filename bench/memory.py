"""The agent's memory under a steady traced load: RSS by part over time.

Starts nginx in a test cgroup, an agent with the embedded store (or `--remote`: the test-only
HTTP front on chDB in its own process), then drives paced HTTP/1 requests with wrk (about `--rate` per second, every
request a span at sampling 1.0) for `--minutes`, printing every `--every` seconds the agent's
RSS and its split by part (`coroot_agent_memory_bytes`: the store engine's code pages, the BPF
compiler's, BPF maps, other files, anonymous memory), the rows waiting in the sink, and the
spans stored. Prints the peak and the last reading at the end. The targets (issue: ≤ 300 MB
with the embedded store after an hour of load, ≤ 100 MB with a remote store) are printed next
to them; nothing is asserted (this machine is shared and noisy).

Run as root: `python bench/memory.py [--minutes 10] [--rate 4000] [--remote] [--agent-args=...]`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import AgentProcess, ClickHouseFront, TestCgroups  # noqa: E402
from tests.system.servers import Nginx  # noqa: E402

MB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=int, default=4000, help="about this many requests/s (wrk, 1,000 per connection)")
    ap.add_argument("--every", type=float, default=30, help="seconds between readings")
    ap.add_argument("--remote", action="store_true", help="a remote store: the test-only HTTP front on chDB, in "
                                                          "its own process")
    ap.add_argument("--agent-args", default="", help="more agent flags, e.g. --disable-profiling")
    args = ap.parse_args()
    cg = TestCgroups()
    server = Nginx()
    agent: AgentProcess | None = None
    wrk: subprocess.Popen[bytes] | None = None
    front: ClickHouseFront | None = None
    tmp = tempfile.mkdtemp(prefix="coroot-agent-bench-")
    try:
        store_args: list[str] = []
        if args.remote:
            front = ClickHouseFront(f"{tmp}/front")
            front.start()
            store_args = ["--clickhouse-address", f"127.0.0.1:{front.port}", "--clickhouse-user", front.user,
                          "--clickhouse-password", front.password]
        server.start(cg, cg.create("bench-server"))
        cid = cg.create("bench-client")
        paced = f"{server.dir}/paced.lua"
        Path(paced).write_text("function delay()\n  return 1\nend\n")
        agent = AgentProcess(["--min-container-age", "0s", "--traces-sampling", "1.0", *store_args,
                              *args.agent_args.split()])
        agent.start()
        proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
        seconds = args.minutes * 60
        wrk = cg.spawn(cid, ["wrk", "-t1", f"-c{max(1, args.rate // 1000)}", f"-d{seconds:g}s", "-s", paced,
                             f"http://127.0.0.1:{server.port}/bench"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        peak = 0
        last = ""
        print(f"paced wrk ~{args.rate:,}/s for {args.minutes:g} min; agent pid {proc.pid}")
        print(f"{'min':>5} {'RSS MB':>7}  parts (MB)                                                   pending   stored")
        while True:
            time.sleep(max(0.0, min(args.every, t0 + seconds - time.monotonic())))
            metrics = agent.metrics()
            rss = proc.memory_info().rss
            peak = max(peak, rss)
            parts = {lb["part"]: v for n, lb, v in metrics if n == "coroot_agent_memory_bytes"}
            pending = sum(v for n, _, v in metrics if n == "coroot_agent_store_pending_rows")
            stored = sum(v for n, lb, v in metrics
                         if n == "coroot_agent_store_rows_written_total" and lb.get("table") == "otel_traces")
            split = " ".join(f"{k}={v / MB:.0f}" for k, v in sorted(parts.items()))
            last = f"{(time.monotonic() - t0) / 60:5.1f} {rss / MB:7.0f}  {split:60s} {pending:7.0f} {stored:9.0f}"
            print(last, flush=True)
            if time.monotonic() - t0 >= seconds:
                break
        embedded = not args.remote
        print(f"peak RSS {peak / MB:.0f} MB; last {proc.memory_info().rss / MB:.0f} MB "
              f"(target <= {300 if embedded else 100} MB {'embedded' if embedded else 'remote'} store, after 1 h)")
    finally:
        if wrk is not None:
            wrk.kill()
            wrk.wait()
        if agent is not None:
            agent.stop()
            shutil.rmtree(agent.storage, ignore_errors=True)
        server.stop()
        cg.cleanup()
        if front is not None:
            front.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
