"""ICMP echo round-trip time from a container's network namespace to the peers of its open
TCP connections: `container_net_latency_seconds{destination_ip}`, as the node agent's pinger.

A component with its own thread. Every round (the scrape interval) it takes the active
destinations from the TCP tracker (their actual, post-NAT address), groups them by network
namespace, sends one echo request to each from a socket in that namespace and waits up to
`timeout` after the namespace's last request. A destination that does not answer in time has
no series until a later round answers (the node agent does the same). IPv4 only, loopback
skipped, as the node agent. A scrape reads the last round's results; it never pings.

Round trip: the kernel's receive timestamp of the reply (SO_TIMESTAMPNS) minus the time taken
just before the request was sent.

Bounds: at most `max_targets` (namespace, IP) pairs a round (the rest are skipped and counted),
at most `rate` requests a second, `timeout` per namespace, at most `max_namespaces` namespaces a
round.

Privileges: an ICMP socket is raw (CAP_NET_RAW) or, without it, a datagram "ping" socket (only
when the group is inside the namespace's net.ipv4.ping_group_range). The agent's own
namespace's socket is opened at attach, while the capabilities are still held, and kept: the
agent drops CAP_NET_RAW after attach, and an open socket keeps working. Another namespace needs
setns(CLONE_NEWNET), i.e. CAP_SYS_ADMIN, which the agent gives up after attach: when it held it at
start, a helper process started before the drop (agent/net/nsopener.py: it keeps CAP_SYS_ADMIN,
CAP_NET_RAW and CAP_SYS_PTRACE and only opens ICMP sockets in a given process's namespace)
hands the pinger a socket per namespace and round. An agent that keeps CAP_SYS_ADMIN
(--keep-capabilities; kernels before 5.8 keep it for the BPF maps) enters the namespace itself.
An agent started without CAP_SYS_ADMIN skips other namespaces and counts them in
coroot_agent_pinger_skipped_total{reason="netns"}.
Measures and reports; ships nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from agent import caps
from agent.component import Component
from agent.containers.registry import Registry
from agent.ebpf.maps import Programs
from agent.metrics import Families
from agent.net.nsopener import KEEP, NsOpener, open_icmp
from agent.net.tcp import TcpTracker

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
SO_TIMESTAMPNS = 35  # also SCM_TIMESTAMPNS (asm-generic/socket.h)
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
TIMEOUT = 0.3  # seconds after a namespace's last request (the node agent's pingTimeout)
MAX_TARGETS = 512  # (namespace, IP) pairs pinged per round
MAX_NAMESPACES = 64  # namespaces pinged per round
RATE = 1000  # echo requests per second, at most
_BURST = 50  # requests sent back to back before the rate pause
_TIMESPEC = struct.Struct("@qq")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    body = b"coroot-agent"
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum(head + body), ident, seq) + body


def parse_echo_reply(packet: bytes, raw: bool) -> tuple[int, int] | None:
    """(identifier, sequence) of an echo reply; None for anything else. A raw socket's packet
    starts with the IP header; a datagram ping socket's with the ICMP header."""
    if raw:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4:]
    if len(packet) < 8:
        return None
    kind, code, _, ident, seq = struct.unpack_from("!BBHHH", packet)
    if kind != ICMP_ECHO_REPLY or code != 0:
        return None
    return ident, seq


def rx_time(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return float(sec) + float(nsec) / 1e9
    return None


@dataclass
class IcmpSocket:
    """One ICMP socket in one network namespace. `raw`: a raw socket (replies carry the IP
    header and every echo reply of the namespace arrives: those with another identifier are
    someone else's); otherwise a ping socket (the kernel sets the identifier and delivers
    only this socket's replies)."""

    sock: socket.socket
    raw: bool
    ident: int

    @classmethod
    def open(cls) -> IcmpSocket:
        """Raw when allowed, else a ping socket. OSError when neither is."""
        s, raw = open_icmp()
        return cls.of(s, raw)

    @classmethod
    def of(cls, s: socket.socket, raw: bool) -> IcmpSocket:
        """An ICMP socket opened here or elsewhere (the namespace helper's), made ready."""
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        # a ping socket's identifier is the kernel's to choose (and to match replies by)
        return cls(s, raw, os.getpid() & 0xFFFF if raw else 0)

    def drain(self) -> None:
        """Drop what arrived between rounds (a raw socket sees every echo reply of its namespace)."""
        with contextlib.suppress(OSError):
            for _ in range(100_000):
                self.sock.recv(2048)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Round:
    """One namespace's requests of a round: seq -> (IP, send time)."""

    sent: dict[int, tuple[str, float]] = field(default_factory=dict)
    rtt: dict[str, float] = field(default_factory=dict)


class Pinger(Component):
    name = "pinger"

    def __init__(self, registry: Registry, tcp: TcpTracker, interval: float, timeout: float = TIMEOUT,
                 max_targets: int = MAX_TARGETS, rate: int = RATE, procfs: str = "/proc",
                 ns_helper: bool = False) -> None:
        """`ns_helper`: the agent will drop CAP_SYS_ADMIN after attach; start the namespace
        helper (agent/net/nsopener.py) then, while it is held, to open sockets in containers'
        namespaces afterwards."""
        self.registry = registry
        self.tcp = tcp
        self.interval = interval
        self.timeout = timeout
        self.max_targets = max_targets
        self.rate = rate
        self.procfs = procfs
        self._lock = threading.Lock()
        self._rtt: dict[str, dict[str, float]] = {}  # container_id -> IP -> seconds, the last round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own: IcmpSocket | None = None  # the agent's own namespace's socket, opened at attach
        self._own_netns: int | None = None
        self._own_ns_fd = -1
        self._ns_helper = ns_helper
        self._opener: NsOpener | None = None
        self._seq = 0
        self._warned: set[str] = set()
        self.rounds = 0
        self.requests = 0
        self.replies = 0
        self.skipped: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------ component --

    def attach(self, programs: Programs | None) -> None:
        """Open the agent's own namespace's ICMP socket now, while CAP_NET_RAW is held."""
        try:
            self._own_netns = os.stat(f"{self.procfs}/self/ns/net").st_ino
            self._own_ns_fd = os.open(f"{self.procfs}/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("pinger: cannot read the agent's network namespace (%s): no latency is measured", e)
            return
        try:
            self._own = IcmpSocket.open()
            log.info("pinger: %s ICMP socket every %gs", "raw" if self._own.raw else "datagram", self.interval)
        except OSError as e:
            log.warning("pinger: no ICMP socket (%s): grant CAP_NET_RAW or set net.ipv4.ping_group_range; "
                        "container_net_latency_seconds is not measured", e)
        if self._ns_helper and "CAP_SYS_ADMIN" in caps.held():
            opener = NsOpener(self.procfs)
            try:
                opener.start()
                self._opener = opener
                log.info("pinger: containers' network namespaces are entered by a helper process (pid %d) that "
                         "keeps only %s", opener.pid, ", ".join(sorted(KEEP)))
            except OSError as e:
                log.warning("pinger: cannot start the namespace helper (%s): containers in their own network "
                            "namespaces are not pinged", e)

    def start(self) -> None:
        if self._own_ns_fd < 0:
            return
        self._thread = threading.Thread(target=self._run, name="pinger", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1.0)
            self._thread = None
        if self._own is not None:
            self._own.close()
            self._own = None
        if self._own_ns_fd >= 0:
            os.close(self._own_ns_fd)
            self._own_ns_fd = -1
        if self._opener is not None:
            self._opener.close()
            self._opener = None

    def tick(self, now: float, gone: list[str]) -> None:
        if gone:
            with self._lock:
                for cid in gone:
                    self._rtt.pop(cid, None)

    def collect(self, f: Families) -> None:
        with self._lock:
            rtt = self._rtt
        apps = {c.id: c.app_id for c in self.registry.containers()}
        for cid, by_ip in rtt.items():
            if cid not in apps:
                continue
            for ip, seconds in sorted(by_ip.items()):
                f.gauge("container_net_latency_seconds", "round-trip time between the container and a remote IP",
                        seconds, container_id=cid, app_id=apps[cid], destination_ip=ip)

    def self_metrics(self, f: Families) -> None:
        f.counter("coroot_agent_pinger_rounds_total", "pinger rounds", self.rounds)
        f.counter("coroot_agent_pinger_requests_total", "ICMP echo requests sent", self.requests)
        f.counter("coroot_agent_pinger_replies_total", "ICMP echo replies matched to a request", self.replies)
        for reason, n in sorted(self.skipped.items()):
            f.counter("coroot_agent_pinger_skipped_total", "destinations not pinged in a round", n, reason=reason)

    # ---------------------------------------------------------------- rounds --

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.ping_round()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("pinger round")

    def targets(self) -> dict[int | None, tuple[int, list[tuple[str, str]]]]:
        """netns -> (a pid in it, [(container_id, IP)]), bounded; what is left out is counted."""
        by_ns: dict[int | None, tuple[int, list[tuple[str, str]]]] = {}
        pairs: set[tuple[int | None, str]] = set()
        for cid, netns, pid, ip in sorted(self.tcp.active_destinations(), key=lambda d: (d[1] or 0, d[3], d[0])):
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                continue
            if addr.version != 4 or addr.is_loopback or addr.is_unspecified:
                continue
            if (netns, ip) not in pairs:
                if len(pairs) >= self.max_targets or (netns not in by_ns and len(by_ns) >= MAX_NAMESPACES):
                    self.skipped["limit"] += 1
                    continue
                pairs.add((netns, ip))
            by_ns.setdefault(netns, (pid, []))[1].append((cid, ip))
        return by_ns

    def ping_round(self) -> None:
        """Ping every target once, namespace by namespace, and publish the results."""
        result: dict[str, dict[str, float]] = defaultdict(dict)
        for netns, (pid, members) in self.targets().items():
            if self._stop.is_set():
                return
            ips = sorted({ip for _, ip in members})
            rtt = self._ping_namespace(netns, pid, ips)
            for cid, ip in members:
                if ip in rtt:
                    result[cid][ip] = rtt[ip]
        with self._lock:
            self._rtt = dict(result)
        self.rounds += 1

    def _ping_namespace(self, netns: int | None, pid: int, ips: list[str]) -> dict[str, float]:
        if netns is not None and netns == self._own_netns:
            if self._own is None:
                self.skipped["no_socket"] += len(ips)
                return {}
            self._own.drain()
            return self.ping(self._own, ips)
        s = self._open_in(pid, netns)
        if s is None:
            self.skipped["netns"] += len(ips)
            return {}
        try:
            return self.ping(s, ips)
        finally:
            s.close()

    def _open_in(self, pid: int, netns: int | None) -> IcmpSocket | None:
        """An ICMP socket in pid's network namespace: from the namespace helper when there is
        one, else this thread enters the namespace (with CAP_SYS_ADMIN), opens the socket and
        returns to the agent's. None when not allowed (warned once a reason)."""
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"{self.procfs}/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # the process is gone: its connections go at the next tick
        if self._opener is not None:
            try:
                inode = netns or os.fstat(fd).st_ino
            finally:
                os.close(fd)
            opened, code = self._opener.open_icmp(pid, inode)
            if opened is None:
                if code not in (errno.ENOENT, errno.ESRCH, errno.ESTALE):  # not a process gone or recycled
                    self._warn_once(f"helper-{code}", "pinger: the namespace helper cannot open an ICMP socket in "
                                    "a container's namespace (%s)", os.strerror(code))
                return None
            try:
                return IcmpSocket.of(opened.sock, opened.raw)
            except OSError as e:
                self._warn_once("socket", "pinger: an ICMP socket from the namespace helper is unusable (%s)", e)
                return None
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                self._warn_once("setns", "pinger: cannot enter containers' network namespaces (%s): they are not "
                                "pinged; the agent keeps no CAP_SYS_ADMIN after start (see --keep-capabilities)",
                                os.strerror(ctypes.get_errno()))
                return None
            try:
                return IcmpSocket.open()
            except OSError as e:
                self._warn_once("socket", "pinger: no ICMP socket in a container's namespace (%s): grant "
                                "CAP_NET_RAW or set its net.ipv4.ping_group_range", e)
                return None
            finally:
                if libc.setns(self._own_ns_fd, CLONE_NEWNET) != 0:  # never expected: stop pinging
                    self._stop.set()
                    log.error("pinger: cannot return to the agent's network namespace (%s): stopped",
                              os.strerror(ctypes.get_errno()))
        finally:
            os.close(fd)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def ping(self, s: IcmpSocket, ips: list[str]) -> dict[str, float]:
        """One echo request to each IP through `s`, at most `rate` a second; the round trips of
        the replies that came within `timeout` of the last request."""
        r = Round()
        pause = _BURST / self.rate
        for i, ip in enumerate(ips):
            if self._stop.is_set():  # the agent stops: no more requests, no waiting for replies
                return r.rtt
            if i and i % _BURST == 0:  # the rate: read replies meanwhile
                until = time.monotonic() + pause
                self._receive(s, r, until)
                time.sleep(max(0.0, until - time.monotonic()))
            seq = self._next_seq()
            t = time.time()
            try:
                s.sock.sendto(echo_request(s.ident, seq), (ip, 0))
            except BlockingIOError:
                self.skipped["send_buffer"] += 1
                continue
            except OSError as e:  # unreachable network and the like: no answer, no series
                log.debug("pinger: %s: %s", ip, e)
                continue
            self.requests += 1
            r.sent[seq] = (ip, t)
        self._receive(s, r, time.monotonic() + self.timeout)
        return r.rtt

    def _receive(self, s: IcmpSocket, r: Round, until: float) -> None:
        while len(r.rtt) < len(r.sent) and not self._stop.is_set():
            left = min(until - time.monotonic(), 0.1)  # a stop is noticed within 0.1 s
            if left <= 0:
                return
            if not select.select([s.sock], [], [], left)[0]:
                continue
            try:
                data, anc, _, peer = s.sock.recvmsg(2048, socket.CMSG_SPACE(_TIMESPEC.size))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # an ICMP error queued on the socket: not a reply
                log.debug("pinger: %s", e)
                continue
            reply = parse_echo_reply(data, s.raw)
            if reply is None:
                continue
            ident, seq = reply
            if s.raw and ident != s.ident:
                continue
            sent = r.sent.get(seq)
            if sent is None or sent[0] != peer[0] or sent[0] in r.rtt:
                continue
            at = rx_time(anc) or time.time()
            r.rtt[sent[0]] = max(0.0, at - sent[1])
            self.replies += 1
