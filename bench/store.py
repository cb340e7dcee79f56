"""Store throughput and agent memory, printed (no asserts):

- spans/s through the sink into the embedded store (target 100,000/s on this machine);
- spans/s through the sink to a remote store (the test-only HTTP front on chDB);
- agent RSS with the embedded store loaded, and with a remote store (budget 150 MB).

Run as root: `python bench/store.py [--spans N]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent import config  # noqa: E402
from agent.sinks.batcher import Sink  # noqa: E402
from agent.sinks.spool import Spool  # noqa: E402
from agent.sinks.store import Store  # noqa: E402
from tests.system.helpers import AgentProcess, ClickHouseFront, span  # noqa: E402


def through_sink(store: Store, n: int, tmp: str) -> float:
    store.open()
    store.migrate()
    base = time.time_ns()
    rows = [span(i, base) for i in range(n)]
    sink = Sink(store, Spool(f"{tmp}/spool", 1 << 30), max_rows=10_000, max_age=60)
    sink.start()
    t0 = time.monotonic()
    for r in rows:
        sink.add("otel_traces", r)
    sink.close()
    took = time.monotonic() - t0
    store.close()
    assert sink.stats.written["otel_traces"] == n
    return n / took


def agent_rss(args: list[str]) -> float:
    a = AgentProcess(args)
    a.start()
    time.sleep(3)
    a.get("/metrics")
    rss = psutil.Process(a.proc.pid).memory_info().rss / 2**20
    a.stop()
    return rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spans", type=int, default=200_000)
    n = ap.parse_args().spans
    tmp = tempfile.mkdtemp(prefix="coroot-agent-bench-")
    try:
        rate = through_sink(Store(config.load({"storage_path": f"{tmp}/embedded"}, {}, None)), n, f"{tmp}/e")
        print(f"embedded store: {rate:,.0f} spans/s through the sink (target 100,000; ratio {rate / 100_000:.2f})")
        front = ClickHouseFront(f"{tmp}/front")
        front.start()
        try:
            cfg = config.load({"clickhouse_address": f"127.0.0.1:{front.port}", "clickhouse_user": "coroot",
                               "clickhouse_password": "secret"}, {}, None)
            rate = through_sink(Store(cfg), n, f"{tmp}/r")
            print(f"remote store over HTTP (test front on chDB): {rate:,.0f} spans/s through the sink")
            remote_rss = agent_rss(["--clickhouse-address", f"127.0.0.1:{front.port}",
                                    "--clickhouse-user", "coroot", "--clickhouse-password", "secret"])
        finally:
            front.stop()
        print(f"agent RSS with the embedded store loaded: {agent_rss([]):.0f} MB")
        print(f"agent RSS with a remote store: {remote_rss:.0f} MB (budget 150 MB; ratio {remote_rss / 150:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
