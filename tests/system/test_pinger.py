"""container_net_latency_seconds against real ICMP: a container ("client" cgroup) holds TCP
connections to servers in other network namespaces ("hosts"), and the agent pings each
connection's peer from the container's namespace.

This kernel has no netem, so the known delay comes from an echo responder in the slow host
(tests/system/workloads/echo_responder.py) that answers after 20 ms while that host's kernel
answers nothing itself; the fast host's kernel answers at once; the silent host answers nobody."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from agent import caps
from tests.system.helpers import (
    AgentFactory,
    AgentProcess,
    RemoteHost,
    TestCgroups,
    TwoHosts,
    setpriv,
    wait_for,
)

pytestmark = [pytest.mark.agent_args("--scrape-interval", "1s"), pytest.mark.agent_without("profiling", "l7")]

PEER = [sys.executable, "-m", "tests.system.workloads.tcp_peer"]
RESPONDER = ["chrt", "-f", "10", sys.executable, "-m", "tests.system.workloads.echo_responder"]
DELAY = 0.020
SETTLE = 20  # a bound on the wait for a round that saw the connections, on a loaded machine


@dataclass
class Hosts:
    fast: RemoteHost
    slow: RemoteHost
    silent: RemoteHost


def serve(cgroups: TestCgroups, cid: str, argv: list[str]) -> None:
    p = cgroups.spawn(cid, [*argv, *PEER, "server", "0.0.0.0", "8080"], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"


def hold(cgroups: TestCgroups, cid: str, ip: str, argv: list[str] | None = None) -> subprocess.Popen[str]:
    """One open connection from the container to ip:8080, kept until the test ends."""
    p = cgroups.spawn(cid, [*(argv or []), *PEER, "hold", ip, "8080"], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.stdin.write("open 1\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"
    return p  # type: ignore[return-value]


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    made: list[RemoteHost] = []
    cgroups = TestCgroups()
    try:
        for net in (204, 205, 206):
            made.append(RemoteHost(net))
        fast, slow, silent = made
        servers = cgroups.create("ping-servers")
        for h in made:
            serve(cgroups, servers, h.argv())
        p = cgroups.spawn(servers, slow.argv(*RESPONDER, str(DELAY)), stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        subprocess.run(silent.argv("sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"), check=True)
        yield Hosts(fast, slow, silent)
    finally:
        cgroups.cleanup()
        for h in made:
            h.cleanup()


def latency(agent: AgentProcess, cid: str) -> dict[str, float]:
    return {lb["destination_ip"]: v for n, lb, v in agent.metrics()
            if n == "container_net_latency_seconds" and lb.get("container_id") == cid}


def rounds(agent: AgentProcess) -> float:
    return agent.value("coroot_agent_pinger_rounds_total") or 0.0


def test_latency_of_each_active_destination_from_the_hosts_namespace(
        agent: AgentProcess, hosts: Hosts, cgroups: TestCgroups) -> None:
    cid = cgroups.create("ping-client")
    for h in (hosts.fast, hosts.slow, hosts.silent):
        hold(cgroups, cid, h.ip)
    assert wait_for(lambda: len(latency(agent, cid)) == 2, SETTLE), agent.log()[-3000:]
    # Three more rounds: every one pinged all three, and the silent host never has a series.
    start = rounds(agent)
    seen: list[dict[str, float]] = []

    def three_more() -> bool:
        seen.append(latency(agent, cid))
        return rounds(agent) >= start + 3

    assert wait_for(three_more, SETTLE, interval=0.5)
    got = latency(agent, cid)
    assert set(got) == {hosts.fast.ip, hosts.slow.ip}, got
    assert got[hosts.fast.ip] < 0.010, got
    assert DELAY <= got[hosts.slow.ip] <= DELAY + 0.010, got
    assert all(hosts.silent.ip not in s for s in seen)
    lb = {"container_id": cid, "destination_ip": hosts.fast.ip}
    assert agent.value("container_net_latency_seconds", **lb) == got[hosts.fast.ip]
    series = [lbs for n, lbs, _ in agent.metrics() if n == "container_net_latency_seconds" and lbs["container_id"] == cid]
    assert all(set(s) == {"machine_id", "system_uuid", "container_id", "app_id", "destination_ip"} for s in series)
    assert (agent.value("coroot_agent_pinger_requests_total") or 0) >= 3 * 3
    assert (agent.value("coroot_agent_pinger_replies_total") or 0) >= 3 * 2


def helper_of(agent: AgentProcess) -> psutil.Process:
    found = [c for c in psutil.Process(agent.pid).children() if c.name() == "coroot-nsopener"]
    assert len(found) == 1, [(c.pid, c.name()) for c in psutil.Process(agent.pid).children()]
    return found[0]


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_a_container_in_its_own_namespace_is_pinged_from_there_through_the_namespace_helper(
        agent: AgentProcess, agent_factory: AgentFactory, cgroups: TestCgroups) -> None:
    two = TwoHosts()
    try:
        serve(cgroups, cgroups.create("ping-srv"), two.argv(two.srv))
        cid = cgroups.create("ping-netns-client")
        hold(cgroups, cid, two.srv_ip, two.argv(two.cli))
        # The module's agent dropped CAP_SYS_ADMIN after attach; its helper, started before the
        # drop, opens the socket in the client's namespace: 10.201.K.2 is reachable only from there.
        assert wait_for(lambda: two.srv_ip in latency(agent, cid), SETTLE), agent.log()[-3000:]
        assert latency(agent, cid)[two.srv_ip] < 0.010
        assert "CAP_SYS_ADMIN" not in caps.names_of(int(status(agent.pid)["CapEff"], 16))
        assert not agent.value("coroot_agent_pinger_skipped_total", reason="netns")

        # The helper holds exactly three capabilities, no_new_privs, and nothing but its end of
        # the agent's socket pair and its own namespace (no BPF object, no listening socket, no
        # store file; stderr is the agent's).
        helper = helper_of(agent)
        st = status(helper.pid)
        assert caps.names_of(int(st["CapEff"], 16)) == {"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"}
        assert caps.names_of(int(st["CapPrm"], 16)) == {"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"}
        assert st["NoNewPrivs"] == "1"
        fds = {int(n): os.readlink(f"/proc/{helper.pid}/fd/{n}") for n in os.listdir(f"/proc/{helper.pid}/fd")}
        assert fds[0] == fds[1] == "/dev/null" and fds[2] == os.readlink(f"/proc/{agent.pid}/fd/2"), fds
        own_ns = os.readlink(f"/proc/{helper.pid}/ns/net")
        assert sorted(t.split(":")[0] for n, t in fds.items() if n > 2) == ["net", "socket"], fds  # its own netns
        assert own_ns in fds.values(), fds
        # that socket: an unnamed Unix socket pair's end (nobody can connect to it); no inet socket
        conns = helper.net_connections("all")
        assert [(c.family, c.type, c.laddr, c.raddr) for c in conns] == \
            [(socket.AF_UNIX, socket.SOCK_SEQPACKET, "", "")], conns
        # An unprivileged user cannot reach it: its descriptors, memory and environment are closed.
        for path in (f"/proc/{helper.pid}/fd", f"/proc/{helper.pid}/environ", f"/proc/{helper.pid}/mem"):
            r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                                "cat" if not path.endswith("/fd") else "ls", path], capture_output=True, text=True)
            assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r)

        # An agent that keeps CAP_SYS_ADMIN enters the namespace itself, with no helper.
        kept = agent_factory("--keep-capabilities", "--scrape-interval", "1s")
        assert wait_for(lambda: two.srv_ip in latency(kept, cid), SETTLE), kept.log()[-3000:]
        assert latency(kept, cid)[two.srv_ip] < 0.010
        assert not [c for c in psutil.Process(kept.pid).children() if c.name() == "coroot-nsopener"]

        # An agent started without CAP_SYS_ADMIN cannot enter it, and says so.
        names = [c for c in (*caps.REQUIRED_NAMES, "CAP_NET_RAW") if c in caps.held("CapBnd")]
        without = agent_factory("--scrape-interval", "1s", prefix=setpriv(names))
        assert wait_for(lambda: (without.value("coroot_agent_pinger_skipped_total", reason="netns") or 0) >= 1,
                        SETTLE), without.log()[-3000:]
        assert latency(without, cid) == {}
        assert "cannot enter containers' network namespaces" in without.log()
    finally:
        two.cleanup()


def test_disable_pinger_sends_nothing_and_exports_no_latency(
        agent_factory: AgentFactory, hosts: Hosts, cgroups: TestCgroups) -> None:
    off = agent_factory("--disable-pinger", "--scrape-interval", "1s")
    cid = cgroups.create("ping-off")
    hold(cgroups, cid, hosts.fast.ip)
    assert wait_for(lambda: off.value("container_net_tcp_active_connections", container_id=cid) == 1, SETTLE)
    # Time for three rounds, had there been a pinger: none ran and nothing is exported.
    time.sleep(3.5)
    names = {n for n, _, _ in off.metrics()}
    assert "container_net_latency_seconds" not in names
    assert not any(n.startswith("coroot_agent_pinger_") for n in names)
    assert "pinger:" not in off.log()


def test_the_namespace_helper_ends_with_its_agent(agent: AgentProcess) -> None:
    """Last in the module: it stops the module's agent."""
    helper = helper_of(agent)
    assert agent.stop() == 0
    assert wait_for(lambda: not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE, 5)
