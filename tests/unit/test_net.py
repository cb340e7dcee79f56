"""Public-network filter, conntrack parsing, /proc/net/tcp address decoding, and the TCP
tracker's folding of the kernel's connect counts (a fake map plays the kernel)."""

import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.containers.registry import Container, Process
from agent.metrics import Families
from agent.net import tcp
from agent.net.conntrack import parse
from agent.net.public import PublicFilter
from agent.net.tcp import EV_CONNECT, EV_CONNECT_FAILED, TCP_EVENT, TcpTracker, _hex_addr, endpoint


@pytest.mark.parametrize(("ip", "tracked"), [
    ("10.1.2.3", True), ("172.20.0.1", True), ("192.168.1.1", True), ("100.64.0.1", True),
    ("127.0.0.1", True), ("::1", True), ("fd00::1", True),
    ("169.254.169.254", False), ("fe80::1", False),
    ("203.0.113.5", True), ("198.51.100.5", False), ("8.8.8.8", False),
    ("::ffff:203.0.113.9", True), ("::ffff:10.0.0.1", True), ("2001:db8::1", False),
])
def test_only_private_or_listed_destinations_are_tracked(ip: str, tracked: bool) -> None:
    f = PublicFilter(["203.0.113.0/24"])
    assert f.should_track(ipaddress.ip_address(ip)) is tracked


def test_default_tracks_every_public_ipv4() -> None:
    f = PublicFilter(["0.0.0.0/0"])
    assert f.should_track(ipaddress.ip_address("8.8.8.8"))
    assert not f.should_track(ipaddress.ip_address("169.254.1.1"))
    assert not f.should_track(ipaddress.ip_address("2001:4860::8888"))


def test_conntrack_reply_source_is_the_real_peer() -> None:
    text = (
        "ipv4     2 tcp      6 117 TIME_WAIT src=10.201.5.1 dst=10.201.5.100 sport=40000 dport=80 "
        "src=10.201.5.2 dst=10.201.5.1 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2\n"
        "ipv4     2 udp      17 20 src=10.0.0.1 dst=10.0.0.53 sport=5353 dport=53 src=10.0.0.53 dst=10.0.0.1 sport=53 dport=5353 mark=0 use=1\n"
        "ipv6     10 tcp      6 431999 ESTABLISHED src=fd00:0:0:0:0:0:0:1 dst=fd00::2 sport=1 dport=2 "
        "src=fd00::2 dst=fd00::1 sport=2 dport=1 [ASSURED] mark=0 use=2\n"
        "garbage line\n"
    )
    table = parse(text)
    assert table == {
        ("10.201.5.1", 40000, "10.201.5.100", 80): ("10.201.5.2", 8080),
        ("fd00::1", 1, "fd00::2", 2): ("fd00::2", 2),
    }


def test_proc_net_tcp_addresses() -> None:
    assert _hex_addr("0100007F:1F90") == ("127.0.0.1", 8080)
    assert _hex_addr("00000000000000000000000001000000:0050") == ("::1", 80)
    assert _hex_addr("0000000000000000FFFF00000201A8C0:01BB") == ("192.168.1.2", 443)
    assert endpoint("::1", 80) == "[::1]:80" and endpoint("10.0.0.1", 5432) == "10.0.0.1:5432"


# ----------------------------------------------- kernel-side connect counts ---

CID = "/system.slice/app.service"
VIP, BACKEND = "10.96.0.10", "10.0.0.7"


class FakeRegistry:
    """Processes 100 and 101 in one container, 300 known outside any container."""

    def __init__(self) -> None:
        self.c = Container(CID, CID, "systemd", CID, {}, 0.0)
        self.in_container = {100, 101}
        self.appearing: set[int] = set()  # processes the registry would find if it looked

    def container_of_recent(self, pid: int) -> Container | None:
        return self.c if pid in self.in_container else None

    def container_of(self, pid: int) -> Container | None:
        return self.container_of_recent(pid)

    def process(self, pid: int) -> Process | None:
        if pid in self.in_container or pid == 300:
            return Process(pid, 0, "x", CID, CID if pid in self.in_container else None, frozenset())
        return None

    def containers(self) -> list[Container]:
        return [self.c]

    def add(self, pid: int) -> Process | None:
        """Reading /proc: the test says what it finds (`appearing`)."""
        if pid in self.appearing:
            self.in_container.add(pid)
        return self.process(pid)


class FakeConntrack:
    """DNAT of VIP:80 to BACKEND:8080; nothing else translated."""

    def netns_of(self, pid: int) -> int | None:
        return 1

    def resolve(self, items: list[tuple[int | None, tuple[str, int, str, int]]]) -> list[tuple[str, int] | None]:
        return [(BACKEND, 8080) if (dst, dport) == (VIP, 80) else None for _, (_, _, dst, dport) in items]

    def close(self) -> None:
        pass


@dataclass
class DestKey:
    tgid: int
    family: int
    dport: int
    daddr: bytes


@dataclass
class Counts:
    failed: int = 0
    lost: int = 0
    lost_ns: int = 0


class FakeCounts:
    """The kernel's tcp_connects map: the test plays the kernel, growing the counts."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, str, int], tuple[DestKey, Counts]] = {}

    def at(self, tgid: int, ip: str, port: int) -> Counts:
        k = (tgid, ip, port)
        if k not in self.entries:
            raw = ipaddress.ip_address(ip).packed.ljust(16, b"\0")
            self.entries[k] = (DestKey(tgid, 2, port, raw), Counts())
        return self.entries[k][1]

    def items(self) -> list[tuple[DestKey, Counts]]:
        return [(k, Counts(v.failed, v.lost, v.lost_ns)) for k, v in self.entries.values()]

    def delete(self, key: DestKey) -> bool:
        ip = str(ipaddress.ip_address(key.daddr[:4]))
        return self.entries.pop((key.tgid, ip, key.dport), None) is not None

    def percpu_sum(self, index: int) -> int:
        return 0


class FakePrograms:
    def __init__(self, counts: FakeCounts) -> None:
        self.counts = counts

    def map(self, name: str) -> object:
        return self.counts if name in ("tcp_connects", "tcp_uncounted") else None


def tracker(tmp_path: Path) -> tuple[TcpTracker, FakeCounts]:
    for pid in (100, 101, 300):  # alive: a /proc entry each
        (tmp_path / str(pid)).mkdir()
    t = TcpTracker(FakeRegistry(), PublicFilter(["0.0.0.0/0"]), (32768, 60999),  # type: ignore[arg-type]
                   conntrack=FakeConntrack(), procfs=str(tmp_path))  # type: ignore[arg-type]
    counts = FakeCounts()
    t._counts = counts  # type: ignore[assignment]
    t._uncounted = counts  # type: ignore[assignment]
    return t, counts


def connect_event(pid: int, fd: int, ip: str, port: int, ns: int = 1000, kind: int = EV_CONNECT) -> bytes:
    return TCP_EVENT.pack(fd, ns, 0, 0, kind, pid, fd, 0, 2, 40000 + fd, port, 0,
                          ipaddress.ip_address("10.0.0.1").packed.ljust(16, b"\0"),
                          ipaddress.ip_address(ip).packed.ljust(16, b"\0"))


def metrics(t: TcpTracker) -> dict[tuple[str, str, str], float]:
    f = Families({})
    t.collect(f)
    t.self_metrics(f)
    out = {}
    for fam in f:
        for s in fam.samples:
            if "connect" in s.name:
                out[(s.name, s.labels.get("destination", ""), s.labels.get("actual_destination", ""))] = s.value
    return out


def test_failed_connects_count_from_the_kernel_map_by_growth(tmp_path: Path) -> None:
    t, k = tracker(tmp_path)
    k.at(100, "10.0.0.9", 9).failed = 3
    t.resolve_pending()
    assert metrics(t)[("container_net_tcp_failed_connects_total", "10.0.0.9:9", "")] == 3
    k.at(100, "10.0.0.9", 9).failed = 5
    k.at(101, "10.0.0.9", 9).failed = 1  # another process of the container: one series
    # a scrape shows the growth before the batch folds it; the batch then adds just as much
    assert metrics(t)[("container_net_tcp_failed_connects_total", "10.0.0.9:9", "")] == 6
    t.resolve_pending()
    t.resolve_pending()  # nothing grew: nothing added
    assert metrics(t)[("container_net_tcp_failed_connects_total", "10.0.0.9:9", "")] == 6
    # a failed connect the map had no room for comes as an event, counted once too
    t.handle_event(connect_event(100, 5, "10.0.0.9", 9, kind=EV_CONNECT_FAILED))
    t.resolve_pending()
    assert metrics(t)[("container_net_tcp_failed_connects_total", "10.0.0.9:9", "")] == 7


def test_lost_connects_add_to_the_events_and_take_the_last_actual_destination(tmp_path: Path) -> None:
    t, k = tracker(tmp_path)
    t.handle_event(connect_event(100, 3, VIP, 80, ns=2_000_000_000))
    t.handle_event(connect_event(100, 4, "10.0.0.8", 5432, ns=1_000_000_000))
    t.resolve_pending()
    k.at(100, VIP, 80).lost, k.at(100, VIP, 80).lost_ns = 2, 3_000_000_000
    k.at(100, "10.0.0.8", 5432).lost, k.at(100, "10.0.0.8", 5432).lost_ns = 4, 4_000_000_000
    k.at(100, "10.0.0.5", 6379).lost, k.at(100, "10.0.0.5", 6379).lost_ns = 1, 500_000_000  # no event at all
    t.resolve_pending()
    m = metrics(t)
    nat = ("container_net_tcp_successful_connects_total", f"{VIP}:80", f"{BACKEND}:8080")
    assert m[nat] == 3
    assert m[("container_net_tcp_connection_time_seconds_total", *nat[1:])] == 5.0
    assert m[("container_net_tcp_successful_connects_total", "10.0.0.8:5432", "10.0.0.8:5432")] == 5
    assert m[("container_net_tcp_successful_connects_total", "10.0.0.5:6379", "10.0.0.5:6379")] == 1
    assert not any(key[0].endswith("connects_total") and key[1] == f"{VIP}:80" and key[2] == f"{VIP}:80" for key in m)
    assert m[("coroot_agent_tcp_uncounted_connects_total", "", "")] == 0


def test_an_entry_is_folded_a_last_time_and_deleted_when_its_process_is_gone(tmp_path: Path) -> None:
    t, k = tracker(tmp_path)
    k.at(101, "10.0.0.9", 9).failed = 2
    t.resolve_pending()
    k.at(101, "10.0.0.9", 9).failed = 4  # grew before the exit
    (tmp_path / "101").rmdir()
    t.resolve_pending()
    assert k.entries == {} and t._folded == {}
    assert metrics(t)[("container_net_tcp_failed_connects_total", "10.0.0.9:9", "")] == 4


def test_unknown_processes_are_read_and_processes_outside_containers_are_not_counted(tmp_path: Path) -> None:
    t, k = tracker(tmp_path)
    (tmp_path / "200").mkdir()  # alive, and its exec event was lost: the registry reads it
    (tmp_path / "201").mkdir()  # alive, and /proc could not tell yet: it waits
    t.registry.appearing.add(200)  # type: ignore[attr-defined]
    k.at(200, "10.0.0.9", 9).failed = 1
    k.at(201, "10.0.0.9", 9).failed = 2
    k.at(300, "10.0.0.9", 9).failed = 1  # a host process
    t.resolve_pending()
    assert sorted(k.entries) == [(200, "10.0.0.9", 9), (201, "10.0.0.9", 9)]
    assert ("container_net_tcp_failed_connects_total", "10.0.0.9:9", "") not in metrics(t)
    t.resolve_pending()  # the registry has read 200 before this batch
    assert metrics(t)[("container_net_tcp_failed_connects_total", "10.0.0.9:9", "")] == 1
    t.registry.appearing.add(201)  # type: ignore[attr-defined]
    t.resolve_pending()
    t.resolve_pending()
    assert metrics(t)[("container_net_tcp_failed_connects_total", "10.0.0.9:9", "")] == 3


def test_a_connect_of_a_process_the_registry_lacks_is_handled_again_once_it_is_read(tmp_path: Path) -> None:
    t, _ = tracker(tmp_path)
    t.registry.appearing.add(102)  # type: ignore[attr-defined]
    t.handle_event(connect_event(102, 3, "10.0.0.8", 5432))
    t.handle_event(connect_event(777, 3, "10.0.0.8", 5432))  # gone before the registry could read it
    t.resolve_pending()
    t.resolve_pending()
    m = metrics(t)
    assert m[("container_net_tcp_successful_connects_total", "10.0.0.8:5432", "10.0.0.8:5432")] == 1
    assert t._retry == [] and t.events == 2


def test_destination_ips_are_those_connected_to_lately_or_still_open(tmp_path: Path) -> None:
    """What ip_to_fqdn keeps (the node agent: containers/registry.go:194-226): the IPs of
    connect attempts since a time, successful, failed or only counted by the kernel, and of
    open connections however old."""
    t, k = tracker(tmp_path)
    t.handle_event(connect_event(100, 3, "10.0.0.7", 80))
    t.handle_event(connect_event(100, 5, "10.0.0.9", 9, kind=EV_CONNECT_FAILED))
    k.at(100, "10.0.0.5", 6379).lost = 1  # no event at all
    t.resolve_pending()
    assert t.destination_ips(0.0) == {"10.0.0.7", "10.0.0.9", "10.0.0.5"}
    later = time.monotonic() + 1
    assert t.destination_ips(later) == {"10.0.0.7"}  # the open connection only
    assert t.destination_ips(0.0) == {"10.0.0.7"}  # the old attempts are forgotten


def test_connect_attempts_are_remembered_for_at_most_max_attempts_ips(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "MAX_ATTEMPTS", 2)
    t, _ = tracker(tmp_path)
    for fd, ip in enumerate(("10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"), start=3):
        t.handle_event(connect_event(100, fd, ip, 9, kind=EV_CONNECT_FAILED))
    # 10.0.0.2 was the least recent when 10.0.0.3 came: dropped; 10.0.0.1 was attempted again
    assert set(t._attempts) == {"10.0.0.1", "10.0.0.3"}
