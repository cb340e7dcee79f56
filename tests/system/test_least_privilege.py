"""Least privilege, for real: the agent and `check` run under `setpriv` with a bounding set of
exactly agent/caps.py REQUIRED (root's uid, no other capability: no CAP_SYS_ADMIN, no
CAP_DAC_OVERRIDE), and every probe family loads and works; then one capability is taken away
and both `check` and the agent name it and what goes with it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from agent import caps
from tests.system.helpers import (
    AgentFactory,
    TestCgroups,
    coroot_agent,
    free_port,
    releasers_of,
    run_client,
    setpriv,
    wait_for,
)
from tests.system.servers import Nginx


def machine_bounding_set() -> set[str]:
    return caps.held("CapBnd")


def required_here() -> list[str]:
    """REQUIRED, less what this machine's own bounding set lacks (this test machine's root has
    no CAP_SYS_RESOURCE at all; the kernel, 5.11+, charges maps to memory cgroups instead)."""
    return [c for c in caps.REQUIRED_NAMES if c in machine_bounding_set()]


def check(names: list[str]) -> str:
    r = coroot_agent("check", prefix=setpriv(names), timeout=300)
    return r.stdout + r.stderr


def test_every_probe_family_loads_and_works_with_exactly_the_required_set(
        cgroups: TestCgroups, agent_factory: AgentFactory) -> None:
    names = required_here()
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"} <= set(names)
    out = check(names)
    for fam in ("proc", "tcp", "l7", "logs", "profiler"):
        assert any(line.startswith(f"probes: {fam}") and " ok " in line for line in out.splitlines()), out
    assert "CAP_SYS_ADMIN" not in out.split("held:", 1)[1].splitlines()[0]

    nginx = Nginx()
    try:
        agent = agent_factory(prefix=setpriv(names))
        assert agent.proc is not None
        log = agent.log()
        assert "BPF compiled and attached" in log and "proc, tcp, l7, logs, profiler" in log, log
        # CAP_NET_ADMIN is optional (caps.OPTIONAL): without it the delay metrics are off, said so.
        assert "taskstats unavailable" in log and "needs CAP_NET_ADMIN" in log, log
        # Attached, then down to what it keeps, in every thread, with no_new_privs.
        keep = caps.keep_after_start() & set(names)
        status = f"/proc/{agent.proc.pid}/status"
        assert caps.held("CapEff", status) == keep and caps.held("CapPrm", status) == keep
        assert caps.no_new_privs(status)
        for task in os.listdir(f"/proc/{agent.proc.pid}/task"):
            assert caps.held("CapEff", f"/proc/{agent.proc.pid}/task/{task}/status") == keep
        assert agent.value("coroot_agent_tls_libraries") >= 1  # uprobes attached without CAP_SYS_ADMIN
        assert agent.value("coroot_agent_bpf_compile_seconds") > 0
        # And the probes work: a TLS and a plain request through nginx, counted and connected.
        nginx.start(cgroups, cgroups.create("lp-nginx"))
        cid = cgroups.create("lp-client")
        c = run_client(cgroups, cid, "http", "127.0.0.1", str(nginx.tls_port), "--ca", nginx.ca, "/x:3")
        wait_for(lambda: agent.value("container_http_requests_total", container_id=cid, status="2xx") == 3, 20)
        wait_for(lambda: agent.value("container_net_tcp_successful_connects_total", container_id=cid) == 1, 20)
        c.finish()
        # Stopped, it leaves no uprobe definition behind in tracing/uprobe_events (without
        # CAP_SYS_ADMIN BCC defines every uprobe there), not even for an attach that failed.
        pid = agent.proc.pid
        agent.stop()
        assert wait_for(lambda: not releasers_of(pid), 30)  # they go once its probes are detached
        left = [line for line in Path("/sys/kernel/tracing/uprobe_events").read_text().splitlines()
                if line.split()[0].endswith(f"_bcc_{pid}")]
        assert left == [], left
    finally:
        nginx.stop()


def test_without_perfmon_check_names_it_and_the_agent_refuses_with_the_reason(tmp_path: Path) -> None:
    names = [c for c in required_here() if c != "CAP_PERFMON"]
    out = check(names)
    rows = [line for line in out.splitlines() if line.startswith("probes: ") and "off in this configuration" not in line]
    assert len(rows) == 5 and all("FAIL" in r and "cannot load without CAP_PERFMON" in r for r in rows), out
    # the Python GIL probes are off by default: named as such, never a failure
    assert any(line.startswith("probes: python") and " ok " in line and "off in this configuration" in line
               for line in out.splitlines()), out
    port = free_port()
    r = coroot_agent("run", "--listen", f"127.0.0.1:{port}", "--storage-path", str(tmp_path), "--wal-dir",
                     str(tmp_path / "wal"), prefix=setpriv(names), timeout=60)
    assert r.returncode != 0 and "missing CAP_PERFMON" in r.stderr + r.stdout


def test_without_sys_ptrace_the_agent_says_what_it_lost_and_it_is_lost(
        cgroups: TestCgroups, agent_factory: AgentFactory, tmp_path: Path) -> None:
    names = [c for c in required_here() if c != "CAP_SYS_PTRACE"]
    out = check(names)
    assert any("CAP_SYS_PTRACE" in line and "missing" in line and "TLS uprobes" in line for line in out.splitlines())
    agent = agent_factory(prefix=setpriv(names))
    assert "without CAP_SYS_PTRACE: for processes with more privileges than the agent: TLS uprobes" in agent.log()
    # A process with all of root's capabilities maps its own copy of libssl: the agent cannot
    # reach it through /proc/PID/root, so no uprobe goes on it (with the capability, the L7
    # test sees the same copy attached within seconds).
    before = agent.value("coroot_agent_tls_libraries")
    shutil.copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", tmp_path / "libssl.so.3")
    cid = cgroups.create("lp-noptrace")
    c = run_client(cgroups, cid, "wait", "http", "127.0.0.1", "1", env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert str(tmp_path / "libssl.so.3") in open(f"/proc/{c.proc.pid}/maps").read()
    time.sleep(7)  # past both looks at a new process (1 s and 5 s)
    assert agent.value("coroot_agent_tls_libraries") == before
    c.proc.kill()
    c.proc.wait()
