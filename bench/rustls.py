"""rustls tracing cost: a rustls HTTPS client (built here with Debian's cargo against Debian's
rustls crate, tests/system/workloads/rustls/) making --requests requests at --rate a second
over one keep-alive connection to nginx's TLS port (OpenSSL), in test cgroups, with the agent at
sampling 1.0 (every request a span). Prints agent CPU µs per request and in-kernel ns per
request (kernel.bpf_stats_enabled): the rustls uprobe programs (the client), the OpenSSL ones
(nginx: the same requests, inbound; on a private copy of libssl, as the system tests use, so no
other process's calls count), and every program of the agent (which also sees the rest of this
shared machine's traffic, so that figure is an upper bound). The kernel counts a tail-called
program's time in its caller's. Asserts nothing.

Run as root: `python bench/rustls.py [--requests 20000] [--rate 2000]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gotls import prog_names  # noqa: E402
from tests.rustbuild import cargo_build  # noqa: E402
from tests.system.helpers import AgentProcess, TestCgroups, bpf_programs, wait_for  # noqa: E402
from tests.system.servers import Nginx  # noqa: E402
from tests.system.test_l7_rustls import PROJECT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=2000)
    args = ap.parse_args()
    client = str(cargo_build(PROJECT, "rustls-peer"))
    libdir = tempfile.mkdtemp(prefix="rustls-bench-libssl-")
    found = subprocess.run(["sh", "-c", "ldconfig -p | awk '/libssl.so.3 .*x86-64/{print $NF; exit}'"],
                           capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(found, os.path.join(libdir, "libssl.so.3"))
    os.environ["LD_LIBRARY_PATH"] = libdir  # nginx maps this copy (see tests/system/conftest.py)
    cg = TestCgroups()
    nginx = Nginx()
    agent = AgentProcess(["--min-container-age", "0s", "--traces-sampling", "1.0"])
    try:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
        nginx.start(cg, cg.create("bench-nginx"))
        agent.start()
        cid = cg.create("bench-rustlsclient")
        p = cg.spawn(cid, [client, "client", "--wait", "--rate", str(args.rate), nginx.ca,
                           f"127.0.0.1:{nginx.tls_port}", "localhost", f"/ok:{args.requests}"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdin is not None
        assert json.loads(p.stdout.readline()) == {"ready": True}
        assert wait_for(lambda: f"rustls uprobes on {client}" in agent.log(), 30), "not attached"
        time.sleep(1)
        names = prog_names(bpf_programs(agent.pid))
        groups = {"rustls": {k for k, name in names.items() if name.startswith("rustls_")},
                  "ssl": {k for k, name in names.items() if name.startswith("ssl_")}}
        proc = psutil.Process(agent.pid)
        # again: the switch is the host's, and another bench ending meanwhile turns it off (the
        # runs per request printed below show whether it stayed on)
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
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
        print(f"agent CPU per request: {cpu / n * 1e6:.1f} µs (client and nginx sides)")
        print(f"in-kernel per request: {ns(groups['rustls']) / n:.0f} ns in the rustls uprobes (the client), "
              f"{ns(groups['ssl']) / n:.0f} ns in the OpenSSL uprobes (nginx), "
              f"{ns(None) / n:.0f} ns in all programs (with the whole machine's traffic)")
        print(f"uprobe runs per request: rustls {ns(groups['rustls'], 'run_cnt') / n:.2f}, "
              f"OpenSSL {ns(groups['ssl'], 'run_cnt') / n:.2f}")
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
        agent.cleanup()
        nginx.stop()
        cg.cleanup()
        shutil.rmtree(libdir, ignore_errors=True)


if __name__ == "__main__":
    main()
