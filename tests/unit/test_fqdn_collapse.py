"""Destinations folded into their DNS domain, as the node agent does (common/net.go:244-271
NewDomain/NewDestinationKey, containers/container.go:648, registry.go:532-536): a connection
whose dialled address came from a DNS answer of several addresses, all public, and whose
actual destination is public too, is labelled destination="<domain>:<port>" with an empty
actual_destination, and its spans' net.peer.name is the domain.

The real TCP tracker and the real L7 tracer, wired as agent/run.py wires them, fed packed
kernel events (TCP connects, DNS answers, Redis pairs). Stand-ins only for what needs a kernel:
the registry (tests/unit/test_net.py), conntrack (a table the test writes) and the kernel's
connect-count map. tests/system/test_tcp.py shows the same through real BPF and dnsmasq."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from agent.containers.registry import Container
from agent.l7 import contract
from agent.l7.contract import F_OUTBOUND
from agent.l7.tracer import L7Tracer
from agent.metrics import Families
from agent.net.public import PublicFilter
from agent.net.tcp import EV_CONNECT_FAILED, TcpTracker
from tests.unit.l7_helpers import Rows, paired
from tests.unit.test_net import CID, FakeCounts, FakeRegistry, connect_event

GET = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
TCP_FAMILIES = ("container_net_tcp_successful_connects_total", "container_net_tcp_connection_time_seconds_total",
                "container_net_tcp_bytes_sent_total", "container_net_tcp_bytes_received_total",
                "container_net_tcp_retransmits_total", "container_net_tcp_active_connections")


class Registry(FakeRegistry):
    def container(self, cid: str) -> Container | None:
        return self.c if cid == CID else None


class Nat:
    """conntrack: the test says which (dst, port) is translated to what."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, int], tuple[str, int]] = {}

    def netns_of(self, pid: int) -> int | None:
        return 1

    def resolve(self, items: list[tuple[int | None, tuple[str, int, str, int]]]) -> list[tuple[str, int] | None]:
        return [self.table.get((dst, dport)) for _, (_, _, dst, dport) in items]

    def close(self) -> None:
        pass


def dns_pair(name: str, ips: list[str], qid: int = 0x1234) -> tuple[bytes, bytes]:
    """A query for `name` (type A) and its answer with `ips`."""
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question
    answers = b"".join(b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + ipaddress.IPv4Address(ip).packed
                       for ip in ips)
    return query, struct.pack(">HHHHHH", qid, 0x8180, 1, len(ips), 0, 0) + question + answers


def setup(tmp_path: Path, public: list[str] | None = None) -> tuple[TcpTracker, L7Tracer, Nat, FakeCounts, Rows]:
    for pid in (100, 101, 300):
        (tmp_path / str(pid)).mkdir()
    nat = Nat()
    tcp = TcpTracker(Registry(), PublicFilter(["0.0.0.0/0"] if public is None else public),  # type: ignore[arg-type]
                     (32768, 60999), conntrack=nat, procfs=str(tmp_path))  # type: ignore[arg-type]
    counts = FakeCounts()
    tcp._counts = counts  # type: ignore[assignment]
    rows = Rows()
    l7 = L7Tracer(tcp.registry, tcp, rows, hostname="h", host_id="m")  # type: ignore[arg-type]
    tcp.names = l7.collapsed_name  # as agent/run.py wires them
    return tcp, l7, nat, counts, rows


def answer(l7: L7Tracer, name: str, ips: list[str]) -> None:
    q, a = dns_pair(name, ips)
    l7.handle_event(paired(contract.DNS, F_OUTBOUND, q, a, fd=20, start=1))


def series(*components: TcpTracker | L7Tracer) -> dict[tuple[str, str, str], float]:
    """(family, destination, actual_destination) -> value, of the series with a destination."""
    f = Families({})
    for c in components:
        c.collect(f)
    return {(s.name, s.labels["destination"], s.labels.get("actual_destination", "-")): s.value
            for fam in f for s in fam.samples if "destination" in s.labels}


def test_a_public_address_of_a_several_public_addresses_answer_is_folded_into_its_domain(tmp_path: Path) -> None:
    tcp, l7, _, counts, rows = setup(tmp_path)
    answer(l7, "api.example.com", ["203.0.113.10", "203.0.113.11"])
    tcp.handle_event(connect_event(100, 3, "203.0.113.10", 6379, ns=2_000_000_000))
    tcp.handle_event(connect_event(100, 4, "203.0.113.11", 6379, ns=1_000_000_000))
    tcp.handle_event(connect_event(100, 5, "203.0.113.11", 6379, kind=EV_CONNECT_FAILED))  # no room in the map
    tcp.resolve_pending()
    counts.at(100, "203.0.113.10", 6379).failed = 2  # refused: counted by the kernel
    counts.at(100, "203.0.113.10", 6379).lost = 1  # an event lost: the last labels of its address
    tcp.resolve_pending()
    l7.handle_event(paired(contract.REDIS, F_OUTBOUND, GET, b"$1\r\nv\r\n", fd=3, start=3))  # connect_event: start=fd
    m = series(tcp, l7)
    folded = ("api.example.com:6379", "")
    assert m[("container_net_tcp_successful_connects_total", *folded)] == 3
    assert m[("container_net_tcp_connection_time_seconds_total", *folded)] == 3.0
    assert m[("container_net_tcp_active_connections", *folded)] == 2
    for name in TCP_FAMILIES:
        assert [k for k in m if k[0] == name] == [(name, *folded)]
    assert m[("container_net_tcp_failed_connects_total", "api.example.com:6379", "-")] == 3
    assert m[("container_redis_queries_total", *folded)] == 1
    assert m[("container_redis_queries_duration_seconds_total_count", *folded)] == 1
    assert len(rows.rows) == 1
    a = rows.rows[0]["SpanAttributes"]
    assert (a["net.peer.name"], a["net.peer.port"], a["net.sock.peer.addr"]) == ("api.example.com", "6379", "")
    assert tcp.active_destinations() == []  # no address to ping: the node agent pings none (container.go:1203)
    f = Families({})
    l7.collect(f)
    assert not [s for fam in f for s in fam.samples if s.name == "ip_to_fqdn"]


def test_a_single_address_answer_a_private_answer_and_a_private_actual_destination_are_not_folded(
        tmp_path: Path) -> None:
    tcp, l7, nat, _, rows = setup(tmp_path)
    answer(l7, "one.example.com", ["203.0.113.20"])
    answer(l7, "db.internal", ["10.0.0.40", "10.0.0.41"])
    answer(l7, "mixed.example.com", ["203.0.113.30", "10.0.0.30"])
    answer(l7, "lb.example.com", ["203.0.113.50", "203.0.113.51"])
    nat.table[("203.0.113.50", 6379)] = ("10.0.0.7", 6380)  # DNAT to a private backend: the actual one is checked
    for fd, ip in ((3, "203.0.113.20"), (4, "10.0.0.40"), (5, "203.0.113.30"), (6, "203.0.113.50")):
        tcp.handle_event(connect_event(100, fd, ip, 6379, ns=fd))
    tcp.resolve_pending()
    l7.handle_event(paired(contract.REDIS, F_OUTBOUND, GET, b"$1\r\nv\r\n", fd=3, start=3))
    l7.handle_event(paired(contract.REDIS, F_OUTBOUND, GET, b"$1\r\nv\r\n", fd=6, start=6))
    m = series(tcp, l7)
    pairs = {(d, a) for (name, d, a) in m if name == "container_net_tcp_successful_connects_total"}
    assert pairs == {("203.0.113.20:6379", "203.0.113.20:6379"), ("10.0.0.40:6379", "10.0.0.40:6379"),
                     ("203.0.113.30:6379", "203.0.113.30:6379"), ("203.0.113.50:6379", "10.0.0.7:6380")}
    assert m[("container_redis_queries_total", "203.0.113.20:6379", "203.0.113.20:6379")] == 1
    assert m[("container_redis_queries_total", "203.0.113.50:6379", "10.0.0.7:6380")] == 1
    # spans show the actual destination when it is known (the node agent's ActualDestinationIfKnown)
    peers = [(r["SpanAttributes"]["net.peer.name"], r["SpanAttributes"]["net.peer.port"],
              r["SpanAttributes"]["net.sock.peer.addr"]) for r in rows.rows]
    assert peers == [("203.0.113.20", "6379", "203.0.113.20"), ("10.0.0.7", "6380", "10.0.0.7")]


def test_without_the_public_network_tracked_a_folded_domain_makes_no_series(tmp_path: Path) -> None:
    tcp, l7, _, _, _ = setup(tmp_path, public=[])
    answer(l7, "api.example.com", ["203.0.113.10", "203.0.113.11"])
    tcp.handle_event(connect_event(100, 3, "203.0.113.10", 6379))
    tcp.resolve_pending()
    assert [k for k in series(tcp) if k[0].startswith("container_net_tcp")] == []


def test_the_fold_is_decided_per_connection_by_the_answer_known_when_it_is_resolved(tmp_path: Path) -> None:
    tcp, l7, _, _, _ = setup(tmp_path)
    tcp.handle_event(connect_event(100, 3, "203.0.113.10", 6379, ns=3))
    tcp.resolve_pending()  # no answer yet: its address
    answer(l7, "api.example.com", ["203.0.113.10", "203.0.113.11"])
    tcp.handle_event(connect_event(100, 4, "203.0.113.10", 6379, ns=4))
    tcp.resolve_pending()
    answer(l7, "api.example.com", ["203.0.113.10"])  # now a single address: no longer folded
    tcp.handle_event(connect_event(100, 5, "203.0.113.10", 6379, ns=5))
    tcp.resolve_pending()
    m = series(tcp)
    assert m[("container_net_tcp_active_connections", "203.0.113.10:6379", "203.0.113.10:6379")] == 2
    assert m[("container_net_tcp_active_connections", "api.example.com:6379", "")] == 1
