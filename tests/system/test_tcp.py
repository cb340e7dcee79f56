"""TCP telemetry against real traffic between two network namespaces ("hosts"), with the
client and the server each in a test cgroup ("container"). Every count is exact: the test
knows what it sent."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.system.helpers import AgentFactory, AgentProcess, TestCgroups, TwoHosts, wait_for

pytestmark = [pytest.mark.agent_args("--track-public-network", "203.0.113.0/24"), pytest.mark.agent_without("profiling", "l7")]

PEER = [sys.executable, "-m", "tests.system.workloads.tcp_peer"]
PUBLIC_IN, PUBLIC_OUT = "203.0.113.2", "198.51.100.2"  # documentation ranges, only inside our namespaces
HEADER = 8  # each exchange's header, sent by the client
# How long the agent may take to show what a finished client did: a bound on the wait, not on
# the counts (those are exact); seconds on a loaded machine, where 3 was seen not to do.
SETTLE = 10


@dataclass
class Env:
    hosts: TwoHosts
    cgroups: TestCgroups
    agent: AgentProcess
    client_cid: str
    server_cid: str

    def client(self, *args: str) -> subprocess.Popen[str]:
        p = self.cgroups.spawn(self.client_cid, self.hosts.argv(self.hosts.cli, *PEER, *args),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return p  # type: ignore[return-value]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.agent.value(name, container_id=self.client_cid, **labels)


@pytest.fixture(scope="module")
def env(agent: AgentProcess) -> Iterator[Env]:
    hosts = TwoHosts(extra_srv_addrs=(PUBLIC_IN, PUBLIC_OUT))
    cgroups = TestCgroups()
    try:
        server_cid, client_cid = cgroups.create("tcp-server"), cgroups.create("tcp-client")
        for port in ("8080", "8081"):
            srv = cgroups.spawn(server_cid, hosts.argv(hosts.srv, *PEER, "server", "0.0.0.0", port),
                                stdout=subprocess.PIPE)
            assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        nft = hosts.argv(hosts.srv, "nft")
        subprocess.run([*nft, "add table inet catest"], check=True)
        subprocess.run([*nft, "add chain inet catest in { type filter hook input priority 0 ; }"], check=True)
        subprocess.run([*nft, "add rule inet catest in tcp dport 7 drop"], check=True)  # a black hole
        subprocess.run([*nft, "add rule inet catest in tcp dport 8081 numgen random mod 10 < 2 drop"], check=True)
        yield Env(hosts, cgroups, agent, client_cid, server_cid)
    finally:
        cgroups.cleanup()
        hosts.cleanup()


def finish(p: subprocess.Popen[str], expect: str = "done") -> str:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    assert line.startswith(expect), line
    return line


def test_connects_and_bytes_are_counted_exactly(env: Env) -> None:
    dst = f"{env.hosts.srv_ip}:8080"
    n, send, recv = 20, 3000, 700
    p = env.client("transfer", env.hosts.srv_ip, "8080", str(n), str(send), str(recv))
    finish(p)
    lbl = {"destination": dst, "actual_destination": dst}
    assert wait_for(lambda: env.metric("container_net_tcp_successful_connects_total", **lbl) == n, SETTLE)
    assert env.metric("container_net_tcp_bytes_sent_total", **lbl) == n * (send + HEADER)
    assert env.metric("container_net_tcp_bytes_received_total", **lbl) == n * recv
    assert env.metric("container_net_tcp_connection_time_seconds_total", **lbl) > 0
    assert env.metric("container_net_tcp_active_connections", **lbl) == 0
    assert env.agent.value("container_net_tcp_listen_info", container_id=env.server_cid,
                           listen_addr="0.0.0.0:8080") == 1
    # inbound connections feed no outbound counters of the server
    assert env.agent.value("container_net_tcp_successful_connects_total", container_id=env.server_cid) is None
    p.communicate("\n")


def test_refused_and_timed_out_connects_are_failed_connects(env: Env) -> None:
    refused, blackholed = 3, 2
    p1 = env.client("fail", env.hosts.srv_ip, "9", str(refused), "2")
    p2 = env.client("fail", env.hosts.srv_ip, "7", str(blackholed), "0.5")
    assert finish(p1) == f"done {refused}" and finish(p2) == f"done {blackholed}"
    rst = wait_for(lambda: env.metric("container_net_tcp_failed_connects_total", destination=f"{env.hosts.srv_ip}:9"), SETTLE)
    hole = wait_for(lambda: env.metric("container_net_tcp_failed_connects_total", destination=f"{env.hosts.srv_ip}:7"), SETTLE)
    assert (rst, hole) == (refused, blackholed)
    assert rst + hole == refused + blackholed
    p1.communicate("\n")
    p2.communicate("\n")


def test_retransmits_equal_the_kernels_own_count(env: Env) -> None:
    # RetransSegs counts the whole namespace: first let the earlier tests' sockets finish (a FIN
    # of theirs retransmitted during this test would count there and not to this destination).
    def quiet() -> bool:
        out = env.hosts.run(env.hosts.cli, "ss", "-tanH")
        return all(line.split()[0] in ("TIME-WAIT", "LISTEN") for line in out.splitlines())

    assert wait_for(quiet, 30)
    before = env.hosts.snmp(env.hosts.cli, "RetransSegs")
    dst = f"{env.hosts.srv_ip}:8081"
    p = env.client("transfer", env.hosts.srv_ip, "8081", "5", "200000", "100")
    finish(p)
    p.communicate("\n")

    def settled() -> bool:  # every socket to the port ended (FINs retransmit after close())
        out = env.hosts.run(env.hosts.cli, "ss", "-tanH", "dst", dst)
        return all(line.split()[0] == "TIME-WAIT" for line in out.splitlines())

    assert wait_for(settled, 30)
    delta = env.hosts.snmp(env.hosts.cli, "RetransSegs") - before
    assert delta > 0, "the drop rule made no retransmissions"
    got = wait_for(lambda: env.metric("container_net_tcp_retransmits_total", destination=dst,
                                      actual_destination=dst) == delta, SETTLE)
    missed = {lb["program"]: v for n, lb, v in env.agent.metrics()
              if n == "coroot_agent_bpf_missed_runs_total" and v}  # runs the kernel skipped (recursion)
    assert got, (env.metric("container_net_tcp_retransmits_total", destination=dst), delta,
                 env.agent.value("coroot_agent_lost_events_total", what="tcp_events"), missed,
                 env.hosts.run(env.hosts.cli, "ss", "-tanH"))


def test_dnat_gives_the_real_backend_as_actual_destination(env: Env) -> None:
    vip = f"10.201.{env.hosts.k}.100"
    nft = env.hosts.argv(env.hosts.cli, "nft")
    subprocess.run([*nft, "add table ip canat"], check=True)
    subprocess.run([*nft, "add chain ip canat out { type nat hook output priority -100 ; }"], check=True)
    subprocess.run([*nft, f"add rule ip canat out ip daddr {vip} tcp dport 80 dnat to {env.hosts.srv_ip}:8080"], check=True)
    p = env.client("transfer", vip, "80", "3", "10", "10")
    finish(p)
    lbl = {"destination": f"{vip}:80", "actual_destination": f"{env.hosts.srv_ip}:8080"}
    assert wait_for(lambda: env.metric("container_net_tcp_successful_connects_total", **lbl) == 3, SETTLE)
    assert env.metric("container_net_tcp_bytes_received_total", **lbl) == 30
    p.communicate("\n")


def test_active_connections_include_those_opened_before_the_agent(env: Env, agent_factory: AgentFactory) -> None:
    hold = env.client("hold", env.hosts.srv_ip, "8080")
    assert hold.stdin is not None
    finish(hold, "ready")
    hold.stdin.write("open 3\n")
    hold.stdin.flush()
    finish(hold, "ok")
    late = agent_factory()
    try:
        dst = f"{env.hosts.srv_ip}:8080"

        def active() -> float | None:
            return late.value("container_net_tcp_active_connections", container_id=env.client_cid,
                              destination=dst, actual_destination=dst)

        assert wait_for(lambda: active() == 3, SETTLE), active()
        hold.stdin.write("open 2\n")
        hold.stdin.flush()
        finish(hold, "ok")
        assert wait_for(lambda: active() == 5, SETTLE), active()
        hold.stdin.write("close\n")
        hold.stdin.flush()
        finish(hold, "ok")
        assert wait_for(lambda: active() == 0, SETTLE), active()
        # the 3 seeded connections' bytes count from the start, the 2 new ones from their connect
        assert late.value("container_net_tcp_bytes_sent_total", container_id=env.client_cid,
                          destination=dst, actual_destination=dst) == 2 * (10 + HEADER)
    finally:
        hold.communicate("exit\n")


def test_public_destinations_are_labelled_only_inside_tracked_prefixes(env: Env) -> None:
    p1 = env.client("transfer", PUBLIC_IN, "8080", "2", "10", "10")
    p2 = env.client("transfer", PUBLIC_OUT, "8080", "2", "10", "10")
    finish(p1)
    finish(p2)
    lbl = {"destination": f"{PUBLIC_IN}:8080", "actual_destination": f"{PUBLIC_IN}:8080"}
    assert wait_for(lambda: env.metric("container_net_tcp_successful_connects_total", **lbl) == 2, SETTLE)
    names = {lb.get("destination") for _, lb, _ in env.agent.metrics()}
    assert f"{PUBLIC_OUT}:8080" not in names
    p1.communicate("\n")
    p2.communicate("\n")


def test_a_client_that_exits_at_once_is_counted_fully(env: Env) -> None:
    dst = f"{env.hosts.srv_ip}:8080"
    lbl = {"destination": dst, "actual_destination": dst}
    before = {m: env.metric(m, **lbl) or 0 for m in ("container_net_tcp_successful_connects_total",
                                                      "container_net_tcp_bytes_sent_total")}
    p = env.client("transfer", env.hosts.srv_ip, "8080", "50", "100", "100")
    p.communicate("\n")  # it exits as soon as it is done, before the agent's next batch
    assert p.returncode == 0
    assert wait_for(lambda: env.metric("container_net_tcp_successful_connects_total", **lbl)
                    == before["container_net_tcp_successful_connects_total"] + 50, SETTLE)
    assert env.metric("container_net_tcp_bytes_sent_total", **lbl) == before["container_net_tcp_bytes_sent_total"] + 50 * 108


def test_ipv6_connections_are_counted_with_bracketed_destinations(env: Env) -> None:
    srv = env.cgroups.spawn(env.server_cid, [*PEER, "server", "::1", "18093"], stdout=subprocess.PIPE)
    assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
    p = env.cgroups.spawn(env.client_cid, [*PEER, "transfer", "::1", "18093", "4", "50", "20"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    finish(p)  # type: ignore[arg-type]
    lbl = {"destination": "[::1]:18093", "actual_destination": "[::1]:18093"}
    assert wait_for(lambda: env.metric("container_net_tcp_successful_connects_total", **lbl) == 4, SETTLE)
    assert env.metric("container_net_tcp_bytes_sent_total", **lbl) == 4 * (50 + HEADER)
    assert env.metric("container_net_tcp_bytes_received_total", **lbl) == 4 * 20
    p.communicate("\n")


BURST = [sys.executable, "-m", "tests.system.workloads.tcp_burst"]


def test_connect_counts_stay_exact_when_the_event_buffer_overflows(env: Env, agent_factory: AgentFactory) -> None:
    """Two bursts of short connects (and refused ones) from one container to 200 loopback
    listeners, seen by an agent whose TCP event buffer holds one page (~39 events): the first
    while it runs, the second while it is stopped (SIGSTOP: a descheduled agent on a busy node),
    so events are surely lost. Every connect is still counted, per destination, exactly: while
    the client lives, and after it exited (its kernel entries folded a last time and deleted)."""
    small = agent_factory("--tcp-events-pages", "1")
    cid = env.cgroups.create("tcp-burst")
    listeners, connects, refused_ports, refused = 200, 10_000, 10, 500
    want: dict[tuple[str, str], float] = {}

    def counts() -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for name, lb, v in small.metrics():
            if lb.get("container_id") == cid and name in ("container_net_tcp_successful_connects_total",
                                                          "container_net_tcp_failed_connects_total"):
                assert lb.get("actual_destination", lb["destination"]) == lb["destination"], lb
                out[(name, lb["destination"])] = v
        return out

    def check(when: str) -> None:
        got = wait_for(lambda: (c := counts()) == want and c, 60) or counts()
        wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        lost = small.value("coroot_agent_lost_events_total", what="tcp_events")
        missed = {lb["program"]: v for n, lb, v in small.metrics() if n == "coroot_agent_bpf_missed_runs_total" and v}
        assert not wrong and len(got) == len(want), (when, len(wrong), sorted(wrong.items())[:5], sum(got.values()),
                                                     sum(want.values()), lost, missed)

    for stopped in (False, True):
        p = env.cgroups.spawn(cid, env.hosts.argv(env.hosts.cli, *BURST, "127.0.0.1", str(listeners), str(connects),
                                                  str(refused_ports), str(refused)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdin is not None and p.stdout is not None
        ready = p.stdout.readline().split()
        assert ready[0] == "ready", ready
        good, bad = ready[1].split(","), ready[3].split(",")
        for name, ports, n in (("container_net_tcp_successful_connects_total", good, connects / listeners),
                               ("container_net_tcp_failed_connects_total", bad, refused / refused_ports)):
            for port in ports:  # the second burst's ports may be some of the first's again
                key = (name, f"127.0.0.1:{port}")
                want[key] = want.get(key, 0) + n
        if stopped:
            small.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().split()[:3] == ["done", str(connects), str(refused)]
        finally:
            if stopped:
                small.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        check(f"burst {'2, agent stopped' if stopped else '1'}, client alive")
        p.stdin.write("exit\n")
        p.stdin.flush()
        assert p.wait(30) == 0
        time.sleep(2)  # a few batches: the client's entries are folded a last time and deleted
        check(f"burst {'2' if stopped else '1'}, client exited")

    lost = small.value("coroot_agent_lost_events_total", what="tcp_events")
    assert lost is not None and lost > 0, "the event buffer never overflowed: the test proves nothing"
    assert sum(v for (n, _), v in counts().items() if n.endswith("successful_connects_total")) == 2 * connects
    secs = [v for n, lb, v in small.metrics() if n == "container_net_tcp_connection_time_seconds_total"
            and lb.get("container_id") == cid]
    assert len(secs) == len([k for k in want if k[0].endswith("successful_connects_total")])
    assert all(s > 0 for s in secs)
    assert small.value("coroot_agent_tcp_uncounted_connects_total") == 0
