"""The pinger's packets, its choice of destinations and bounds, its matching of replies and its
series. Unit tests run without root, so no ICMP socket can be opened here: a stand-in socket
answers the way the network would (the replies it is told to give, after the requests it saw);
tests/system/test_pinger.py pings for real."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

from agent.containers.registry import Container
from agent.metrics import Families
from agent.net.pinger import (
    ICMP_ECHO_REPLY,
    SO_TIMESTAMPNS,
    IcmpSocket,
    Pinger,
    checksum,
    echo_request,
    parse_echo_reply,
    rx_time,
)

CID, OTHER = "/system.slice/app.service", "/system.slice/other.service"
OWN_NS = 4026531840


def reply_of(request: bytes, ident: int | None = None, seq: int | None = None) -> bytes:
    _, _, _, rid, rseq = struct.unpack_from("!BBHHH", request)
    body = request[8:]
    head = struct.pack("!BBHHH", ICMP_ECHO_REPLY, 0, 0, rid if ident is None else ident, rseq if seq is None else seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REPLY, 0, checksum(head + body), *struct.unpack_from("!HH", head, 4)) + body


def ip_header(src: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 1, 0, socket.inet_aton(src), socket.inet_aton("10.0.0.1"))


class Network:
    """Stands in for a raw ICMP socket: `answer(ip, request)` says what comes back (a list of
    packets, IP header included, after `delay` seconds), or nothing. select() works on it
    through a socketpair that holds one byte per queued reply."""

    def __init__(self, answer: Callable[[str, bytes], list[bytes]], delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.sent: list[tuple[str, float]] = []
        self._r, self._w = socket.socketpair()
        self._queue: list[tuple[float, bytes, str]] = []

    def fileno(self) -> int:
        return self._r.fileno()

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sent.append((addr[0], time.monotonic()))
        for packet in self.answer(addr[0], data):
            self._queue.append((time.time() + self.delay, packet, addr[0]))
            self._w.send(b"x")
        return len(data)

    def recvmsg(self, size: int, ancsize: int) -> tuple[bytes, list[tuple[int, int, bytes]], int, tuple[str, int]]:
        at, packet, peer = self._queue.pop(0)
        self._r.recv(1)
        time.sleep(max(0.0, at - time.time()))
        return packet, [(socket.SOL_SOCKET, SO_TIMESTAMPNS, struct.pack("@qq", int(at), int(at % 1 * 1e9)))], 0, (peer, 0)

    def recv(self, size: int) -> bytes:
        raise BlockingIOError

    def close(self) -> None:
        self._r.close()
        self._w.close()


class Tracker:
    def __init__(self, dests: list[tuple[str, int | None, int, str]]) -> None:
        self.dests = dests

    def active_destinations(self) -> list[tuple[str, int | None, int, str]]:
        return list(self.dests)


class Registry:
    def containers(self) -> list[Container]:
        return [Container(CID, "app", "systemd", CID, {}, 0.0), Container(OTHER, "other", "systemd", OTHER, {}, 0.0)]


def pinger(dests: list[tuple[str, int | None, int, str]], net: Network | None = None, **kw: object) -> Pinger:
    p = Pinger(Registry(), Tracker(dests), interval=1.0, **kw)  # type: ignore[arg-type]
    p._own_netns = OWN_NS
    if net is not None:
        p._own = IcmpSocket(net, raw=True, ident=0x1234)  # type: ignore[arg-type]
    return p


def series(p: Pinger) -> dict[tuple[str, str], float]:
    f = Families({"machine_id": "m", "system_uuid": "u"})
    p.collect(f)
    out = {}
    for m in f:
        for s in m.samples:
            assert m.name == "container_net_latency_seconds" and m.type == "gauge"
            assert set(s.labels) == {"machine_id", "system_uuid", "container_id", "app_id", "destination_ip"}
            out[(s.labels["container_id"], s.labels["destination_ip"])] = s.value
    return out


# ---------------------------------------------------------------- packets --

def test_an_echo_request_checksums_to_zero_and_carries_id_and_sequence() -> None:
    pkt = echo_request(0xBEEF, 7)
    assert checksum(pkt) == 0
    assert struct.unpack_from("!BBHHH", pkt)[0:2] == (8, 0)
    assert struct.unpack_from("!HH", pkt, 4) == (0xBEEF, 7)


def test_replies_are_parsed_from_raw_and_datagram_sockets_and_nothing_else_is() -> None:
    rep = reply_of(echo_request(0x1234, 9))
    assert parse_echo_reply(ip_header("10.0.0.9") + rep, raw=True) == (0x1234, 9)
    assert parse_echo_reply(rep, raw=False) == (0x1234, 9)
    assert parse_echo_reply(ip_header("10.0.0.9") + echo_request(0x1234, 9), raw=True) is None  # a request
    unreachable = struct.pack("!BBHI", 3, 1, 0, 0) + ip_header("10.0.0.1")
    assert parse_echo_reply(ip_header("10.0.0.1") + unreachable, raw=True) is None
    assert parse_echo_reply(b"\x45\0", raw=True) is None and parse_echo_reply(b"\0\0", raw=False) is None


def test_the_kernels_receive_timestamp_is_read_from_the_control_message() -> None:
    anc = [(socket.SOL_SOCKET, SO_TIMESTAMPNS, struct.pack("@qq", 1700000000, 250_000_000))]
    assert rx_time(anc) == 1700000000.25
    assert rx_time([]) is None


# ------------------------------------------------------------ destinations --

def test_targets_are_ipv4_non_loopback_peers_grouped_by_namespace() -> None:
    p = pinger([
        (CID, OWN_NS, 10, "10.0.0.9"), (OTHER, OWN_NS, 11, "10.0.0.9"),  # one ping serves both
        (CID, OWN_NS, 10, "127.0.0.1"), (CID, OWN_NS, 10, "fd00::9"), (CID, OWN_NS, 10, "::ffff:10.0.0.7"),
        (CID, 555, 20, "10.0.0.9"), (CID, 555, 20, "10.1.0.1"),
    ])
    got = p.targets()
    assert set(got) == {OWN_NS, 555}
    assert got[OWN_NS] == (10, [(CID, "10.0.0.9"), (OTHER, "10.0.0.9")])
    assert got[555] == (20, [(CID, "10.0.0.9"), (CID, "10.1.0.1")])
    assert p.skipped == {}


def test_a_round_pings_at_most_max_targets_and_counts_the_rest() -> None:
    dests: list[tuple[str, int | None, int, str]] = [(CID, OWN_NS, 10, f"10.0.{i // 250}.{i % 250 + 1}")
                                                     for i in range(30)]
    p = pinger(dests, max_targets=20)
    got = p.targets()
    assert sum(len(m) for _, m in got.values()) == 20
    assert p.skipped == {"limit": 10}


# ------------------------------------------------------------------ rounds --

def test_a_round_times_each_reply_and_a_silent_peer_has_no_series() -> None:
    def answer(ip: str, req: bytes) -> list[bytes]:
        if ip == "10.0.0.3":
            return []  # no reply: like the node agent, no series
        rep = reply_of(req)
        if ip == "10.0.0.2":  # someone else's reply (another identifier) and a wrong sequence first
            return [ip_header(ip) + reply_of(req, ident=0x9999), ip_header(ip) + reply_of(req, seq=0xFFFF),
                    ip_header(ip) + rep, ip_header(ip) + rep]
        return [ip_header(ip) + rep]

    net = Network(answer, delay=0.02)
    p = pinger([(CID, OWN_NS, 10, "10.0.0.1"), (CID, OWN_NS, 10, "10.0.0.2"), (CID, OWN_NS, 10, "10.0.0.3"),
                (OTHER, OWN_NS, 11, "10.0.0.1")], net, timeout=0.2)
    t0 = time.monotonic()
    p.ping_round()
    elapsed = time.monotonic() - t0
    got = series(p)
    assert set(got) == {(CID, "10.0.0.1"), (CID, "10.0.0.2"), (OTHER, "10.0.0.1")}
    assert all(0.02 <= v < 0.1 for v in got.values()), got
    assert got[(CID, "10.0.0.1")] == got[(OTHER, "10.0.0.1")]
    assert (p.requests, p.replies, p.rounds) == (3, 2, 1)
    assert 0.2 <= elapsed < 1.0  # the silent peer: waited for up to the timeout, no longer
    net.close()


def test_requests_keep_to_the_rate() -> None:
    net = Network(lambda ip, req: [])
    p = pinger([(CID, OWN_NS, 10, f"10.0.{i // 250}.{i % 250 + 1}") for i in range(120)], net, timeout=0.05, rate=1000)
    p.ping_round()
    assert len(net.sent) == 120
    # bursts of 50 at 1000 a second: the 51st request leaves 50 ms after the first, the 101st 100 ms
    first = net.sent[0][1]
    assert net.sent[50][1] - first >= 0.05 and net.sent[100][1] - first >= 0.1
    net.close()


def test_a_round_replaces_the_last_and_forgotten_containers_go() -> None:
    up = {"10.0.0.1"}
    net = Network(lambda ip, req: [ip_header(ip) + reply_of(req)] if ip in up else [])
    p = pinger([(CID, OWN_NS, 10, "10.0.0.1"), (OTHER, OWN_NS, 11, "10.0.0.1")], net, timeout=0.05)
    p.ping_round()
    assert set(series(p)) == {(CID, "10.0.0.1"), (OTHER, "10.0.0.1")}
    p.tick(time.monotonic(), [OTHER])
    assert set(series(p)) == {(CID, "10.0.0.1")}
    up.clear()  # the peer stops answering: its series goes with the next round
    p.ping_round()
    assert series(p) == {}
    net.close()


def test_without_an_icmp_socket_the_own_namespace_is_skipped_and_counted() -> None:
    p = pinger([(CID, OWN_NS, 10, "10.0.0.1"), (CID, OWN_NS, 10, "10.0.0.2")])
    p.ping_round()
    assert series(p) == {} and p.skipped == {"no_socket": 2} and p.requests == 0


def test_a_stop_ends_a_round_within_a_fraction_of_its_timeout() -> None:
    net = Network(lambda ip, req: [])
    p = pinger([(CID, OWN_NS, 10, f"10.0.0.{i}") for i in range(1, 5)], net, timeout=5.0)
    threading.Timer(0.1, p._stop.set).start()
    t0 = time.monotonic()
    p.ping_round()
    assert time.monotonic() - t0 < 0.5
    assert len(net.sent) == 4
    net.close()
