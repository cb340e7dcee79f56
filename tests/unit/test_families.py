"""Metric families by name, type and label set, against the node agent's own (the table in
tests/unit/nodeagent_families.py, from its source at the commit named there).

Here: the table's own consistency, and the collectors that need no BPF, built as agent/run.py
builds them, on this machine's real /proc, /sys and cgroups (the node, the cgroups, application
types, restarts, disks), plus the TCP tracker and the pinger fed what the kernel and the network
would give them. tests/system/test_families.py checks every family of a running agent after
real traffic, the L7 and log families included."""

from __future__ import annotations

import socket
import time

from prometheus_client.core import Metric

from agent.component import Component
from agent.containers.apptype import AppTypeCollector
from agent.containers.disk import DiskCollector
from agent.containers.registry import Container, Registry
from agent.containers.restarts import RestartCounter
from agent.metrics import Families
from agent.net.pinger import Pinger
from agent.net.public import PublicFilter
from agent.net.tcp import EV_CONNECT, EV_CONNECT_FAILED, EV_LISTEN_OPEN, TCP_EVENT, TcpTracker
from agent.node.cgroups import CgroupCollector
from agent.node.node import NodeCollector
from tests.unit.nodeagent_families import _CT, CONST_LABELS, FAMILIES

CONST = {"machine_id": "0" * 32, "system_uuid": "u"}


def exported(fams: list[Metric]) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names), a name as its samples carry it (counters with _total)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for m in fams:
        for s in m.samples:
            name = m.name if m.type == "histogram" else s.name
            out.setdefault(name, (m.type, set()))[1].update(set(s.labels) - {"le"})
    return {n: (t, frozenset(lb)) for n, (t, lb) in out.items()}


def mismatches(got: dict[str, tuple[str, frozenset[str]]]) -> dict[str, object]:
    bad: dict[str, object] = {}
    for name, (kind, labels) in got.items():
        if name.startswith("coroot_agent_"):
            continue
        if name not in FAMILIES:
            bad[name] = "not a node agent family"
            continue
        want_kind, want = FAMILIES[name]
        if (kind, labels) != (want_kind, want | CONST_LABELS):
            bad[name] = (kind, want_kind, sorted(labels ^ (want | CONST_LABELS)))
    return bad


def test_the_table_is_consistent() -> None:
    for name, (kind, labels) in FAMILIES.items():
        assert kind in ("gauge", "counter", "histogram"), name
        assert not labels & CONST_LABELS, name
        assert ("container_id" in labels) == name.startswith("container_"), name
        assert not name.startswith("container_") or _CT <= labels, name
        assert not (kind == "histogram" and "le" in labels), name
    # a few the server reads, spelled out: a typo in the table must not hide a mismatch
    assert FAMILIES["container_net_latency_seconds"] == ("gauge", _CT | {"destination_ip"})
    assert FAMILIES["container_http_requests_duration_seconds_total"] == (
        "histogram", _CT | {"destination", "actual_destination"})
    assert FAMILIES["node_cloud_info"][1] == {"provider", "account_id", "instance_id", "instance_type",
                                              "instance_life_cycle", "region", "availability_zone",
                                              "availability_zone_id", "local_ipv4", "public_ipv4"}


def test_the_comparison_finds_a_wrong_label_an_unknown_family_and_a_wrong_type() -> None:
    f = Families(CONST)
    f.gauge("node_info", "x", 1, hostname="h", kernel_version="k", extra="e")
    f.gauge("node_made_up", "x", 1)
    f.gauge("container_restarts_total", "x", 1, container_id="c", app_id="")
    f.counter("node_resources_cpu_usage_seconds_total", "x", 1, mode="user")
    assert mismatches(exported(list(f))) == {
        "node_info": ("gauge", "gauge", ["extra"]),
        "node_made_up": "not a node agent family",
        "container_restarts_total": ("gauge", "counter", []),
    }


class OneContainer:
    def __init__(self) -> None:
        self.c = Container("/system.slice/app.service", "", "systemd", "/system.slice/app.service", {}, 0.0)

    def container_of(self, pid: int) -> Container:
        return self.c

    container_of_recent = container_of

    def process(self, pid: int) -> None:
        return None  # no process placed provisionally

    def containers(self) -> list[Container]:
        return [self.c]

    def pids(self) -> list[int]:
        return []


class NoConntrack:
    def netns_of(self, pid: int) -> int:
        return 1

    def resolve(self, items: list[object]) -> list[None]:
        return [None] * len(items)

    def close(self) -> None:
        pass


def tcp_event(kind: int, dst: str = "10.0.0.9", dport: int = 80, sport: int = 40000) -> bytes:
    return TCP_EVENT.pack(1_000, 2_000_000, 0, 0, kind, 100, 5, 0, 2, sport, dport, 0,
                          socket.inet_aton("10.0.0.1") + bytes(12), socket.inet_aton(dst) + bytes(12))


def scrape(components: list[Component]) -> dict[str, tuple[str, frozenset[str]]]:
    f = Families(CONST)
    for c in components:
        c.collect(f)
        c.self_metrics(f)
    return exported(list(f))


def test_collectors_on_this_machine_export_the_node_agents_families() -> None:
    registry = Registry(min_container_age=0)
    registry.scan()
    parts: list[Component] = [NodeCollector(), CgroupCollector(registry),
                              AppTypeCollector(registry, runtimes=False), RestartCounter(registry),
                              DiskCollector(registry)]
    for c in parts:
        c.start()
    try:
        for c in parts:
            c.tick(time.monotonic(), [])
        got = scrape(parts)
    finally:
        for c in parts:
            c.close()
    assert mismatches(got) == {}
    for name in ("node_info", "node_cloud_info", "node_uptime_seconds", "node_resources_cpu_usage_seconds_total",
                 "node_resources_memory_total_bytes", "node_net_interface_up", "node_agent_info"):
        # (container families need a container, which this machine may not have at the moment:
        # tests/system/test_families.py makes them)
        assert name in got, name


def test_tcp_and_pinger_families_match() -> None:
    reg = OneContainer()
    tcp = TcpTracker(reg, PublicFilter(["0.0.0.0/0"]), (32768, 60999), conntrack=NoConntrack())  # type: ignore[arg-type]
    tcp.handle_event(tcp_event(EV_CONNECT))
    tcp.handle_event(tcp_event(EV_CONNECT_FAILED, dport=81))
    tcp.handle_event(tcp_event(EV_LISTEN_OPEN, dst="0.0.0.0", dport=0, sport=8080))
    tcp.tick(time.monotonic(), [])
    ping = Pinger(reg, tcp, interval=1.0)  # type: ignore[arg-type]
    ping._rtt = {reg.c.id: {"10.0.0.9": 0.001}}  # what a round that got a reply leaves
    got = scrape([tcp, ping])
    assert mismatches(got) == {}
    assert {"container_net_tcp_successful_connects_total", "container_net_tcp_connection_time_seconds_total",
            "container_net_tcp_failed_connects_total", "container_net_tcp_active_connections",
            "container_net_tcp_bytes_sent_total", "container_net_tcp_bytes_received_total",
            "container_net_tcp_retransmits_total", "container_net_latency_seconds"} <= set(got)
    assert tcp.active_destinations() == [(reg.c.id, 1, 100, "10.0.0.9")]
