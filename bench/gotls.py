"""Go crypto/tls tracing cost: a Go HTTPS client (built here, tests/system/workloads/gotls/)
making --requests requests at --rate a second over one keep-alive connection to nginx's TLS
port, in test cgroups, with the agent at sampling 1.0 (every request a span). Prints agent CPU
µs per request and in-kernel ns per request (kernel.bpf_stats_enabled): the Go TLS uprobe
programs alone, and every program of the agent (which also sees the rest of this shared
machine's traffic, so that figure is an upper bound). Asserts nothing.

Run as root: `python bench/gotls.py [--requests 20000] [--rate 2000] [--go 1.15]` (--go 1.15: the
client built with Go 1.15, traced through the stack-ABI programs; tests.gobuild.old_go fetches it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.gobuild import OLD_GO, go_build, old_go  # noqa: E402
from tests.system.helpers import REPO, AgentProcess, TestCgroups, bpf_programs, wait_for  # noqa: E402
from tests.system.servers import Nginx  # noqa: E402


def prog_names(progs: dict[str, dict[str, int]]) -> dict[str, str]:
    """prog_id -> program name (the kernel keeps its first 15 characters), from bpftool."""
    out = {}
    for k in progs:
        try:
            info = json.loads(subprocess.run(["bpftool", "prog", "show", "id", k, "--json"], capture_output=True,
                                             text=True, check=True).stdout)
        except (OSError, subprocess.CalledProcessError, ValueError):
            continue
        out[k] = info.get("name", "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--go", choices=sorted(OLD_GO), help="build the client with this old Go (default: Debian's go)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gotls-bench-"))
    client = go_build(REPO / "tests" / "system" / "workloads" / "gotls" / "client.go", work / "client", work,
                      go=old_go(args.go) if args.go else "go")
    cg = TestCgroups()
    nginx = Nginx()
    agent = AgentProcess(["--min-container-age", "0s", "--traces-sampling", "1.0"])
    try:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
        nginx.start(cg, cg.create("bench-nginx"))
        agent.start()
        cid = cg.create("bench-goclient")
        p = cg.spawn(cid, [client, "-wait", "-rate", str(args.rate), "-ca", nginx.ca,
                           f"https://127.0.0.1:{nginx.tls_port}", f"/ok:{args.requests}"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdin is not None
        assert json.loads(p.stdout.readline()) == {"ready": True}
        assert wait_for(lambda: f"Go crypto/tls uprobes on {client} " in agent.log(), 30), "not attached"
        names = prog_names(bpf_programs(agent.pid))
        go_progs = {k for k, name in names.items() if name.startswith("go_tls")}
        ssl_progs = {k for k, name in names.items() if name.startswith("ssl_")}
        proc = psutil.Process(agent.pid)
        cpu0, progs0 = sum(proc.cpu_times()[:2]), bpf_programs(agent.pid)
        p.stdin.write("go\n")
        p.stdin.flush()
        result = json.loads(p.stdout.readline())
        time.sleep(3)  # the agent drains what is queued
        cpu, progs1 = sum(proc.cpu_times()[:2]) - cpu0, bpf_programs(agent.pid)
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(10)

        def ns(keys: set[str] | None, what: str = "run_time_ns") -> int:
            return sum(v.get(what, 0) - progs0.get(k, {}).get(what, 0)
                       for k, v in progs1.items() if keys is None or k in keys)

        n = args.requests
        counted = sum(v for name, lb, v in agent.metrics()
                      if name == "container_http_requests_total" and lb.get("container_id") == cid)
        print(f"requests {n} in {result['seconds']:.1f}s ({n / result['seconds']:.0f}/s), counted {counted:.0f}")
        print(f"agent CPU per request: {cpu / n * 1e6:.1f} µs")
        print(f"in-kernel per request: {ns(go_progs) / n:.0f} ns in the Go TLS uprobes (the client), "
              f"{ns(ssl_progs) / n:.0f} ns in the OpenSSL uprobes (nginx), "
              f"{ns(None) / n:.0f} ns in all programs (with the whole machine's traffic)")
        print(f"uprobe runs per request: Go TLS {ns(go_progs, 'run_cnt') / n:.2f}, "
              f"OpenSSL {ns(ssl_progs, 'run_cnt') / n:.2f}")
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
        agent.cleanup()
        nginx.stop()
        cg.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
