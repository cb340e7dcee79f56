"""Every metric family a running agent exports after real traffic, compared by name, type and
label set with the node agent's own (tests/unit/nodeagent_families.py, built from its source).

Traffic: HTTP through nginx (both sides), Redis and Postgres clients and servers, DNS over a
resolver in another namespace, a failed TCP connect, connections held to a host in another
namespace (the pinger), error log lines. Families that traffic must produce are waited for;
then every family in one scrape, whatever produced it, must match the table, and the agent's
own coroot_agent_* are the only names the table lacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from tests.system.helpers import (
    AgentProcess,
    LogWriter,
    RemoteHost,
    TestCgroups,
    TwoHosts,
    metric_families,
    run_client,
    wait_for,
)
from tests.system.servers import Dnsmasq, Nginx, Postgres, Redis
from tests.unit.nodeagent_families import CONST_LABELS, FAMILIES

pytestmark = [pytest.mark.agent_args("--scrape-interval", "1s"), pytest.mark.agent_without("profiling")]

PEER = [sys.executable, "-m", "tests.system.workloads.tcp_peer"]
SETTLE = 30  # a bound on the wait for what the traffic produces, on a loaded machine

# What the traffic below must produce (each family is then checked like every other).
PRODUCED = (
    "node_info", "node_cloud_info", "node_resources_cpu_usage_seconds_total", "node_net_interface_ip",
    "container_info", "container_resources_cpu_usage_seconds_total", "container_application_type",
    "container_http_requests_total", "container_http_requests_duration_seconds_total",
    "container_http_inbound_requests_total", "container_http_inbound_requests_duration_seconds_total",
    "container_redis_queries_total", "container_redis_queries_duration_seconds_total",
    "container_redis_inbound_queries_total", "container_postgres_queries_total",
    "container_postgres_inbound_queries_total", "container_dns_requests_total",
    "container_dns_requests_duration_seconds_total", "ip_to_fqdn",
    "container_net_tcp_successful_connects_total", "container_net_tcp_failed_connects_total",
    "container_net_tcp_active_connections", "container_net_tcp_listen_info", "container_net_tcp_bytes_sent_total",
    "container_net_latency_seconds", "container_log_messages_total",
    "container_resources_cpu_delay_seconds_total", "container_resources_disk_delay_seconds_total",
)


def exported(agent: AgentProcess) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) of one scrape; a name as its samples carry it (counters with
    _total, histograms without _bucket/_sum/_count), label names over all its series."""
    out: dict[str, tuple[str, set[str]]] = {}
    for fam in metric_families(agent.get("/metrics")):
        for s in fam.samples:
            if fam.type == "histogram":
                name, labels = fam.name, set(s.labels) - {"le"}
            elif s.name.endswith("_created"):
                continue
            else:
                name, labels = s.name, set(s.labels)
            out.setdefault(name, (fam.type, set()))[1].update(labels)
    return {n: (t, frozenset(lb)) for n, (t, lb) in out.items()}


@pytest.fixture(scope="module")
def traffic(agent: AgentProcess) -> Iterator[None]:
    cgroups = TestCgroups()
    nginx, redis, pg = Nginx(), Redis(), Postgres()
    two, remote = TwoHosts(), RemoteHost(207)
    netns_etc = f"/etc/netns/{two.cli}"
    logfile = f"/var/log/catest-families-{os.getpid()}.log"
    dns = Dnsmasq(two.srv_ip, {"svc.test": ("10.9.0.1",)})
    clients = []
    try:
        nginx.start(cgroups, cgroups.create("fam-nginx"))
        redis.start(cgroups, cgroups.create("fam-redis"))
        pg.start(cgroups, cgroups.create("fam-pg"))
        os.makedirs(netns_etc)
        with open(f"{netns_etc}/resolv.conf", "w") as f:
            f.write(f"nameserver {two.srv_ip}\noptions attempts:1 timeout:2\n")
        dns.start(two.argv(two.srv))
        srv = cgroups.spawn(cgroups.create("fam-tcp-srv"), remote.argv(*PEER, "server", "0.0.0.0", "8080"),
                            stdout=subprocess.PIPE)
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"

        cid = cgroups.create("fam-client")
        clients.append(run_client(cgroups, cid, "http", "127.0.0.1", str(nginx.port), "/ok:3", "/missing:1"))
        clients.append(run_client(cgroups, cid, "redis", "127.0.0.1", str(redis.port), ""))
        clients.append(run_client(cgroups, cid, "pg", pg.dsn))
        clients.append(run_client(cgroups, cid, "dns", "svc.test", argv_prefix=tuple(two.argv(two.cli))))
        fail = cgroups.spawn(cid, [*PEER, "fail", "127.0.0.1", "9", "1", "2"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert fail.stdout is not None and fail.stdout.readline().strip() == "done 1"
        hold = cgroups.spawn(cid, [*PEER, "hold", remote.ip, "8080"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert hold.stdin is not None and hold.stdout is not None and hold.stdout.readline().strip() == "ready"
        hold.stdin.write("open 1\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == "ok"
        logs = LogWriter(cgroups, cid)
        logs(f"open {logfile}")
        logs("lines 5 ERROR family check {i}")
        yield
        logs.close()
    finally:
        for c in clients:
            c.finish()
        for s in (nginx, redis, pg, dns):
            s.stop()
        cgroups.cleanup()
        shutil.rmtree(netns_etc, ignore_errors=True)
        if os.path.exists(logfile):
            os.unlink(logfile)
        two.cleanup()
        remote.cleanup()


def test_every_exported_family_has_the_node_agents_name_type_and_labels(agent: AgentProcess, traffic: None) -> None:
    got: dict[str, tuple[str, frozenset[str]]] = {}

    def produced() -> bool:
        got.clear()
        got.update(exported(agent))
        return all(n in got for n in PRODUCED)

    assert wait_for(produced, SETTLE, interval=0.5), sorted(set(PRODUCED) - set(got))
    unknown = sorted(n for n in got if n not in FAMILIES and not n.startswith("coroot_agent_"))
    assert unknown == [], f"families the node agent does not export: {unknown}"
    wrong = {}
    for name, (kind, labels) in sorted(got.items()):
        if name.startswith("coroot_agent_"):
            continue
        want_kind, want = FAMILIES[name]
        if (kind, labels) != (want_kind, want | CONST_LABELS):
            wrong[name] = {"type": (kind, want_kind), "extra": sorted(labels - want - CONST_LABELS),
                           "missing": sorted((want | CONST_LABELS) - labels)}
    assert wrong == {}, "\n".join(f"{n}: {d}" for n, d in wrong.items())
    assert len([n for n in got if n in FAMILIES]) >= len(PRODUCED)


def test_the_agents_memory_by_part_adds_up_to_its_rss(agent: AgentProcess, traffic: None) -> None:
    """coroot_agent_memory_bytes{part} (agent/memory.py) splits the agent's RSS: every part is
    there (embedded store: the engine's heap too), and together they are the process's RSS as
    the kernel counts it, read a moment apart (an insert moves it by tens of MB)."""

    def parts() -> dict[str, float]:
        return {lb["part"]: v for n, lb, v in agent.metrics() if n == "coroot_agent_memory_bytes"}

    assert wait_for(lambda: "engine_heap" in parts(), 30, interval=0.5), parts()
    got = parts()
    rss = psutil.Process(agent.pid).memory_info().rss
    assert set(got) == {"engine_code", "compiler_code", "bpf_maps", "other_files", "engine_heap", "anonymous"}
    assert all(v >= 0 for v in got.values()) and got["engine_heap"] > 0 and got["bpf_maps"] > 0, got
    assert 0.6 * rss < sum(got.values()) < 1.4 * rss, (sum(got.values()), rss, got)
    paged_out = agent.value("coroot_agent_memory_paged_out_bytes")
    assert paged_out is not None and paged_out > 50 << 20, paged_out  # at least LLVM's start-up pages
