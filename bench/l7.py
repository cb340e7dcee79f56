"""L7 load on a traced server, per protocol family (--protocol): HTTP/1.1 (wrk against nginx),
HTTP/2 (h2load against nginx's h2c port, one stream at a time per connection), Redis
(redis-benchmark GET/SET against redis-server) or MySQL (mariadb-slap's clients, each a
connection of `SELECT 1` queries, against mariadbd with its own datadir; its p99 is not known,
only its throughput); client and server on loopback in test cgroups,
first without the agent, then with it (sampling 1.0, every request a span, unless --sampling). Prints the throughput
ratio (target >= 0.97), the p99 latency ratio (target <= 1.05), agent CPU µs per request
(target <= 10), in-kernel ns per request from kernel.bpf_stats_enabled (target <= 1,000), and
events lost (target 0). Asserts nothing: this machine is noisy; run it twice.

Run as root: `python bench/l7.py [--protocol http|http2|redis|mysql] [--client wrk|hey] [--seconds 10] [--connections 20]
[--sampling 1.0] [--rate N]` (h2load is Debian's nghttp2-client).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import AgentProcess, TestCgroups, bpf_programs, free_port, wait_port  # noqa: E402
from tests.system.servers import Nginx, Redis, Server  # noqa: E402

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


def hey(cg: TestCgroups, cid: str, url: str, seconds: float, connections: int, rate: int) -> tuple[float, float, int]:
    """(requests/s, p99 seconds, requests) of one hey run (a Go client, keep-alive): `connections`
    workers, each at most rate/connections requests/s when `rate` is given."""
    argv = ["hey", "-z", f"{seconds:g}s", "-c", str(connections),
            *(["-q", str(max(1, rate // connections))] if rate else []), url]
    p = cg.spawn(cid, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.communicate()[0].decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = float(re.search(r"99%+ in ([\d.]+) secs", out).group(1))  # type: ignore[union-attr]
    total = sum(int(n) for n in re.findall(r"\[\d+\]\s+(\d+) responses", out))
    return rps, p99, total


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


def redis_paced(cg: TestCgroups, cid: str, port: int, seconds: float, connections: int,
                rate: int) -> tuple[float, float, int]:
    """(requests/s, p99 seconds, requests) of bench/redis_paced.py: `connections` connections
    asking about `rate` commands a second together."""
    argv = [sys.executable, str(Path(__file__).with_name("redis_paced.py")), str(port), str(rate), f"{seconds:g}",
            str(connections)]
    p = cg.spawn(cid, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = json.loads(p.communicate()[0].decode().strip().splitlines()[-1])
    return out["rps"], out["p99"], out["requests"]


class MariaDB(Server):
    """mariadbd on loopback, its datadir made by mariadb-install-db (as tests/system/test_l7_mysql.py
    starts it); root over the socket, USER over TCP."""

    USER, PASSWORD = "bench", "bench-pw"

    def __init__(self) -> None:
        super().__init__()
        self.host, self.port = "127.0.0.1", free_port()
        self.data, self.sock = os.path.join(self.dir, "data"), os.path.join(self.dir, "mysqld.sock")
        self.common = ["--no-defaults", f"--datadir={self.data}", "--user=root", "--skip-log-bin",
                       "--innodb-buffer-pool-size=16M", "--max-connections=500"]

    def start(self, cgroups: TestCgroups | None = None, cid: str | None = None) -> MariaDB:
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=180)
        setup = (f"FLUSH PRIVILEGES;\nCREATE USER '{self.USER}'@'127.0.0.1' IDENTIFIED BY '{self.PASSWORD}';\n"
                 f"GRANT ALL ON *.* TO '{self.USER}'@'127.0.0.1';\nCREATE DATABASE bench;\n")  # a statement a line
        subprocess.run(["mariadbd", *self.common, "--bootstrap"], input=setup.encode(), check=True,
                       capture_output=True, timeout=120)
        self._spawn(["mariadbd", *self.common, f"--socket={self.sock}", f"--port={self.port}",
                     f"--bind-address={self.host}", "--skip-name-resolve", f"--pid-file={self.dir}/mysqld.pid"],
                    cgroups, cid)
        wait_port(self.host, self.port, timeout=60, proc=self.proc)
        return self

    def questions(self) -> int:
        """The server's Questions counter (statements run), asked over its socket."""
        out = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.sock}", "-uroot", "-N", "-e",
                              "SHOW GLOBAL STATUS LIKE 'Questions'"], check=True, capture_output=True, text=True)
        return int(out.stdout.split()[1])


def mariadb_slap(cg: TestCgroups, cid: str, server: MariaDB, seconds: float, connections: int,
                 paced: bool = False) -> tuple[float, float, int]:
    """(requests/s, 0: p99 unknown, requests) of mariadb-slap's clients running `SELECT 1` for
    about `seconds` (`paced`: `SELECT SLEEP(0.002)`, at most 500/s per connection, as mariadb-slap
    has no rate of its own); the requests are what the server counted (its Questions, less our own)."""
    per_client = int(500 * seconds) if paced else max(1, int(8_000 * seconds / connections))
    argv = ["mariadb-slap", "--no-defaults", f"--host={server.host}", f"--port={server.port}", f"--user={server.USER}",
            f"--password={server.PASSWORD}", "--create-schema=bench", "--no-drop", f"--concurrency={connections}",
            f"--number-of-queries={per_client * connections}",
            f"--query={'SELECT SLEEP(0.002)' if paced else 'SELECT 1'}", "--iterations=1"]
    before = server.questions()
    t0 = time.monotonic()
    p = cg.spawn(cid, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.communicate()[0].decode()
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"mariadb-slap failed: {out}")
    total = server.questions() - before - 1  # our SHOW STATUS
    return total / took, 0.0, total


class H2cNginx(Nginx):
    """nginx whose plain port speaks HTTP/2 with prior knowledge (h2c)."""

    def __init__(self) -> None:
        super().__init__()
        conf = os.path.join(self.dir, "nginx.conf")
        text = Path(conf).read_text()
        Path(conf).write_text(text.replace(f"listen {self.host}:{self.port};", f"listen {self.host}:{self.port} http2;"))


def wait_stored(agent: AgentProcess, timeout: float) -> float:
    """Spans the agent's sink has written to its store, once it has written all it made (the
    batches it keeps for up to --store-batch-age), or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = agent.metrics()
        made = sum(v for n, _, v in metrics if n == "coroot_agent_l7_spans_total")
        stored = sum(v for n, lb, v in metrics
                     if n == "coroot_agent_store_rows_written_total" and lb.get("table") == "otel_traces")
        if stored >= made or time.monotonic() > deadline:
            return stored
        time.sleep(0.2)


COUNTED = {"http": "container_http_requests_total", "http2": "container_http_requests_total",
           "redis": "container_redis_queries_total", "mysql": "container_mysql_queries_total"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--protocol", choices=sorted(COUNTED), default="http")
    ap.add_argument("--client", choices=("wrk", "hey"), default="wrk", help="HTTP/1 load generator (hey: Debian's "
                                                                           "hey, a Go client)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--sampling", default="1.0", help="--traces-sampling of the agent (the targets are for 1.0)")
    ap.add_argument("--rate", type=int, default=0,
                    help="about this many requests/s (1,000 per connection, paced by wrk's delay(); mysql: 500 "
                         "per connection, paced by SELECT SLEEP(0.002); redis: bench/redis_paced.py) instead of "
                         "as fast as nginx goes; e.g. 10000, the load Coroot quotes its agent's cost at")
    ap.add_argument("--agent-args", default="", help="more agent flags, e.g. --disable-l7-tracing for a baseline "
                                                     "of the TCP probes alone")
    args = ap.parse_args()
    cg = TestCgroups()
    server: Server = {"http2": H2cNginx, "redis": Redis, "mysql": MariaDB}.get(args.protocol, Nginx)()
    agent: AgentProcess | None = None
    try:
        assert isinstance(server, Nginx | Redis | MariaDB)
        server.start(cg, cg.create("bench-server"))
        url = f"http://127.0.0.1:{server.port}/bench"
        cid = cg.create("bench-client")
        paced = None
        if args.rate and args.protocol == "http" and args.client == "wrk":
            paced = f"{server.dir}/paced.lua"
            Path(paced).write_text("function delay()\n  return 1\nend\n")
            args.connections = max(1, args.rate // 1000)
        if args.rate and args.protocol == "redis":
            args.connections = max(1, args.rate // 1000)
        if args.rate and args.protocol == "mysql":
            args.connections = max(1, args.rate // 500)

        def load(seconds: float) -> tuple[float, float, int]:
            if args.protocol == "http2":
                return h2load(cg, cid, url, seconds, args.connections, args.rate, f"{server.dir}/h2load.log")
            if isinstance(server, Redis) and args.rate:
                return redis_paced(cg, cid, server.port, seconds, args.connections, args.rate)
            if isinstance(server, Redis):
                return redis_benchmark(cg, cid, server.port, seconds, args.connections)
            if isinstance(server, MariaDB):
                return mariadb_slap(cg, cid, server, seconds, args.connections, paced=bool(args.rate))
            if args.client == "hey":
                return hey(cg, cid, url, seconds, args.connections, args.rate)
            return wrk(cg, cid, url, seconds, args.connections, paced)

        load(2)  # warm-up
        base_rps, base_p99, _ = load(args.seconds)

        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
        agent = AgentProcess(["--min-container-age", "0s", "--traces-sampling", args.sampling, *args.agent_args.split()])
        agent.start()
        time.sleep(2)
        proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
        cpu0, wall0 = sum(proc.cpu_times()[:2]), time.monotonic()
        progs0 = bpf_programs(proc.pid)
        rps, p99, total = load(args.seconds)
        time.sleep(3)  # the agent drains what is queued
        stored = wait_stored(agent, 60)  # and its store has every span: its insert is part of a request's cost
        cpu, wall = sum(proc.cpu_times()[:2]) - cpu0, time.monotonic() - wall0
        progs1 = bpf_programs(proc.pid)
        stats_on = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
        ns = sum(v.get("run_time_ns", 0) - progs0.get(k, {}).get("run_time_ns", 0) for k, v in progs1.items())
        metrics = agent.metrics()
        counted = sum(v for n, lb, v in metrics if n == COUNTED[args.protocol] and lb.get("container_id") == cid)
        spans = sum(v for n, _, v in metrics if n == "coroot_agent_l7_spans_total")
        lost = sum(v for n, lb, v in metrics if n == "coroot_agent_lost_events_total")
        print(f"{args.protocol}{f' ({args.client})' if args.protocol == 'http' else ''}, {args.connections} connections{f', ~{args.rate:,}/s' if args.rate else ''}")
        print(f"without the agent: {base_rps:,.0f} requests/s, p99 {base_p99 * 1e3:.2f} ms")
        print(f"with the agent:    {rps:,.0f} requests/s, p99 {p99 * 1e3:.2f} ms; {total:,} requests, "
              f"{counted:,.0f} counted, {spans:,.0f} spans, {stored:,.0f} stored")
        print(f"throughput ratio: {rps / base_rps:.3f} (target >= 0.97)")
        print(f"p99 latency ratio: {p99 / base_p99:.3f} (target <= 1.05)" if base_p99 else "p99: not known")
        print(f"agent CPU: {cpu * 1e6 / total:.1f} µs per request (target <= 10); {cpu / wall * 100:.0f}% of one core")
        print(f"in-kernel: {ns / total:.0f} ns per request (target <= 1,000), all programs of the agent"
              f"{'' if stats_on else '; NOT KNOWN: kernel.bpf_stats_enabled was turned off during the run'}")
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
