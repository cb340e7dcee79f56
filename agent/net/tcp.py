"""The connection table and the TCP metrics of reference §1 (TCP), per container and
destination.

Fed by bpf/tcp.c events (connect, listen, close) and by a /proc seed of the
connections and listening sockets that existed before the agent started. Byte and retransmit
counters of live connections stay in the kernel's `conns` map and are read at scrape time;
closed connections' final values are added to per-destination totals. actual_destination comes
from conntrack, resolved in batches (one table read per network namespace per tick).

Connect counts are exact when the event buffer overflows: the kernel's `tcp_connects` map
counts, per (process, destination), the failed connects (they send no event) and the successful
connects whose event was lost, with their time; the growth of each entry is folded into the
totals with every batch, and an entry is deleted once its process is gone. A successful connect
still sends its event, because NAT is per connection: each one is resolved through conntrack.
A lost one cannot be, and counts toward the actual destination last resolved for its container
and destination (the destination itself when none was): exact unless a DNATed destination
balances over several targets, where the destination's total stays exact and only the split of
the lost connects among its targets is a guess.
A destination whose address came from a DNS answer of several addresses, all public, is folded
into its domain when its actual destination is public too (common.NewDestinationKey, common/net.go
261-271): destination "<domain>:<port>" and an empty actual_destination. The domain is looked up
by the dialled address in the agent-wide address -> domain map the DNS answers fill
(registry.go:532-536, `names`), when the connection is resolved (the node agent: at connect); a
failed connect's actual destination is its destination.
A component (agent/component.py): events and ticks change the table on the poll thread; a scrape
only reads it (a connection still waiting for its batch is counted after the next tick).
Decodes and aggregates; ships nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.component import Component
from agent.containers.procfs import fd_targets
from agent.containers.registry import Process, Registry, rekey
from agent.ebpf.maps import BpfMap, Programs
from agent.metrics import Families
from agent.net.conntrack import Conntrack
from agent.net.public import PublicFilter, is_external, normalize

log = logging.getLogger(__name__)

# Mirror of struct tcp_event in bpf/tcp.c.
TCP_EVENT = struct.Struct("<QQQQIIIIHHHH16s16s")
EV_CONNECT, EV_CONNECT_FAILED, EV_LISTEN_OPEN, EV_LISTEN_CLOSE, EV_CLOSE, EV_LATE_RETRANSMITS = 1, 2, 3, 4, 5, 6
RECENTLY_CLOSED = 8192  # closed connections remembered for retransmits after close()
AF_INET, AF_INET6 = 2, 10
CONN_OUTBOUND = 1
MAX_CONNS = 65536  # user-space mirror of the kernel's bound
MAX_RETRY = 10_000  # connect events of processes the registry does not know yet
MAX_ACTUALS = 65536  # (container, destination) -> last actual destination, for lost connects
MAX_ATTEMPTS = 65536  # destination IPs remembered with their last connect attempt (for ip_to_fqdn)


def _addr(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.IPv4Address(raw[:4]) if family == AF_INET else ipaddress.IPv6Address(raw)
    return normalize(ip)


def endpoint(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str, port: int) -> str:
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass
class Conn:
    """One outbound connection. `container_id` is taken when the connection is first seen, so
    its counts survive the process (a short-lived client exits before its batch is resolved)."""

    pid: int
    fd: int
    container_id: str
    src: str
    sport: int
    dst: str
    dport: int
    destination: str
    actual: str | None = None  # None until conntrack resolution
    netns: int | None = None
    start_ns: int = 0


DestKey = tuple[str, str, str]  # container_id, destination, actual_destination
Names = Callable[[str], str | None]  # an address -> the domain it is folded into, or None


def no_names(ip: str) -> str | None:
    return None


class TcpTracker(Component):
    name = "tcp"

    def __init__(self, registry: Registry, public: PublicFilter, ephemeral: tuple[int, int],
                 conntrack: Conntrack | None = None, procfs: str = "/proc") -> None:
        self.registry = registry
        self.public = public
        self.ephemeral = ephemeral
        self.conntrack = conntrack or Conntrack(procfs)
        self.procfs = procfs
        self._lock = threading.Lock()
        self._conns: dict[tuple[int, int], Conn] = {}
        self._pending: list[Conn] = []
        self._pending_connects: list[tuple[Conn, float, int]] = []  # (conn, seconds, retransmits)
        self._connects: dict[DestKey, list[float]] = defaultdict(lambda: [0.0, 0.0])  # count, seconds
        self._failed: dict[tuple[str, str], int] = defaultdict(int)
        self._closed: dict[DestKey, list[int]] = defaultdict(lambda: [0, 0, 0])  # sent, received, retransmits
        self._listens: dict[tuple[int, str], str] = {}  # (pid, listen_addr) -> container_id
        # closed connections, for retransmits after close(): their totals' key, or the Conn
        # itself while it waits for its batch
        self._recently_closed: OrderedDict[tuple[int, int, int], DestKey | Conn] = OrderedDict()
        self._closed_pending: list[tuple[Conn, tuple[int, int, int]]] = []
        self._late_pending: list[tuple[Conn, int]] = []
        self._exited: list[tuple[int, int]] = []  # (pid, monotonic ns of its exit)
        self._live: BpfMap | None = None  # the kernel's `conns` map: live byte and retransmit counters
        self._counts: BpfMap | None = None  # the kernel's `tcp_connects` map: failed and lost connects
        self._uncounted: BpfMap | None = None
        # kernel `tcp_connects` entry (tgid, family, daddr, dport) -> (failed, lost, lost_ns) folded so far
        self._folded: dict[tuple[int, int, bytes, int], tuple[int, int, int]] = {}
        # (container, dialled "ip:port") -> the (destination, actual_destination) it was last labelled
        self._last_actual: dict[tuple[str, str], tuple[str, str]] = {}
        self.names: Names = no_names  # the DNS answers' folded domains (agent/l7/dns.py Dns.collapsed)
        self._attempts: dict[str, float] = {}  # destination IP -> monotonic time of its last connect attempt
        self._unknown_pids: set[int] = set()  # processes with connects the registry lacks
        self._retry: list[bytes] = []  # their connect events, handled once more after it read them
        self.events = 0
        # Hot-path caches (bounded): destination bytes -> (tracked, ip, "ip:port"); pid -> netns.
        self._dst_cache: dict[tuple[int, bytes, int], tuple[bool, str, str]] = {}
        self._src_cache: dict[tuple[int, bytes], str] = {}
        self._netns: dict[int, int | None] = {}

    # ------------------------------------------------------------ component --

    def attach(self, programs: Programs | None) -> None:
        """Take the kernel's `conns` map and seed the table with the connections and listening
        sockets that exist already."""
        self._live = programs.map("conns") if programs is not None else None
        self._counts = programs.map("tcp_connects") if programs is not None else None
        self._uncounted = programs.map("tcp_uncounted") if programs is not None else None
        if programs is not None:
            n = seed(self, self.registry.pids())
            log.info("TCP: %d connections open before the agent started are tracked", n)

    def tick(self, now: float, gone: list[str]) -> None:
        self.forget_containers(gone)
        self.resolve_pending()

    def close(self) -> None:
        """Nothing reads the kernel's map after this (it is freed next); the conntrack handles
        are closed."""
        with self._lock:
            self._live = self._counts = self._uncounted = None
            self.conntrack.close()

    # --------------------------------------------------------------- events --

    def handle_event(self, raw: bytes, retry: bool = False) -> None:
        (start, duration, sent, received, kind, pid, fd, retrans, family, sport, dport, _,
         saddr, daddr) = TCP_EVENT.unpack_from(raw)
        if not retry:
            self.events += 1
        with self._lock:
            if kind == EV_CONNECT or kind == EV_CONNECT_FAILED:
                tracked, dst, dst_ep = self._destination(family, daddr, dport)
                if not tracked:
                    return
                c = self.registry.container_of_recent(pid)  # it may have exited since
                known = self.registry.process(pid)
                # not known yet, or only from its fork (its exec may move it): its exec event is
                # late or lost; once more after the registry has read it
                unsure = known is None if c is None else known is not None and known.provisional
                if unsure and not retry and len(self._retry) < MAX_RETRY:
                    self._retry.append(raw)
                    self._unknown_pids.add(pid)
                    return
                if c is None:
                    return
                self._attempts.pop(dst, None)  # oldest first: the bound drops the least recent
                self._attempts[dst] = time.monotonic()
                if len(self._attempts) > MAX_ATTEMPTS:
                    del self._attempts[next(iter(self._attempts))]
                if kind == EV_CONNECT_FAILED:  # only when the kernel's map had no room for it
                    self._failed[(c.id, self._domain_of(dst, dport, dst) or dst_ep)] += 1
                    return
                src = self._src_cache.get((family, saddr))
                if src is None:
                    if len(self._src_cache) > 4096:
                        self._src_cache.clear()
                    src = self._src_cache[(family, saddr)] = str(_addr(family, saddr))
                conn = Conn(pid, fd, c.id, src, sport, dst, dport, dst_ep, start_ns=start)
                netns = self._netns.get(pid, -1)
                if netns == -1:  # now, while the process surely lives
                    netns = self._netns[pid] = self.conntrack.netns_of(pid)
                conn.netns = netns
                old = self._conns.pop((pid, fd), None)
                if old is not None:
                    self._account_close(old, None)
                if len(self._conns) < MAX_CONNS:
                    self._conns[(pid, fd)] = conn
                self._pending_connects.append((conn, duration / 1e9, retrans))
                self._pending.append(conn)
            elif kind == EV_CLOSE:
                closed = self._conns.pop((pid, fd), None)
                if closed is not None:
                    self._account_close(closed, (sent, received, retrans))
            elif kind == EV_LATE_RETRANSMITS:
                late = self._recently_closed.get((pid, fd, start))
                if isinstance(late, Conn):  # its close waits for the next batch: so does this
                    self._late_pending.append((late, retrans))
                elif late is not None:
                    self._closed[late][2] += retrans
            elif kind == EV_LISTEN_OPEN:
                self._listen(pid, endpoint(_addr(family, saddr), sport), sport)
            elif kind == EV_LISTEN_CLOSE:
                self._listens.pop((pid, endpoint(_addr(family, saddr), sport)), None)

    def _destination(self, family: int, daddr: bytes, dport: int) -> tuple[bool, str, str]:
        key = (family, daddr, dport)
        hit = self._dst_cache.get(key)
        if hit is None:
            if len(self._dst_cache) > 65536:
                self._dst_cache.clear()
            ip = _addr(family, daddr)
            hit = self._dst_cache[key] = (self.public.should_track(ip), str(ip), endpoint(ip, dport))
        return hit

    def _domain_of(self, dst: str, dport: int, actual_ip: str) -> str | None:
        """The destination "<domain>:<port>" of a connection to dst:dport whose actual destination
        is `actual_ip`, when it is folded into the domain (its actual_destination is then empty):
        the dialled address came from an answer of several public addresses and the actual
        destination is public (common.NewDestinationKey). None: labelled by its addresses."""
        name = self.names(dst)  # a dict lookup: first, as it is rarely a name
        if name is not None and is_external(actual_ip):
            return f"{name}:{dport}"
        return None

    def _listen(self, pid: int, addr: str, port: int) -> None:
        lo, hi = self.ephemeral
        if lo <= port <= hi:
            return  # Coroot's rule: a listener on an ephemeral port is a client-side artifact
        c = self.registry.container_of(pid)
        if c is not None:
            self._listens[(pid, addr)] = c.id

    def _account_close(self, conn: Conn, final: tuple[int, int, int] | None) -> None:
        """Move a connection's counters to the closed totals. `final` comes with the close
        event; otherwise (process gone, fd reused) read what the kernel map still has."""
        if final is None:
            final = self._read_live(conn) or (0, 0, 0)
            self._delete_live(conn)
        if conn.actual is None:
            # Not resolved yet (a short connection): resolved with the next batch, where one
            # conntrack read serves every connection of the namespace.
            self._closed_pending.append((conn, final))
            self._recently_closed[(conn.pid, conn.fd, conn.start_ns)] = conn
            return
        self._add_closed(conn, final)

    def _add_closed(self, conn: Conn, final: tuple[int, int, int]) -> DestKey:
        key = (conn.container_id, conn.destination, conn.destination if conn.actual is None else conn.actual)
        totals = self._closed[key]
        for i in range(3):
            totals[i] += final[i]
        self._recently_closed[(conn.pid, conn.fd, conn.start_ns)] = key
        if len(self._recently_closed) > RECENTLY_CLOSED:
            self._recently_closed.popitem(last=False)
        return key

    def is_open(self, pid: int, fd: int, start_ns: int) -> bool:
        with self._lock:
            conn = self._conns.get((pid, fd))
            return conn is not None and conn.start_ns == start_ns

    def connection(self, pid: int, fd: int, start_ns: int) -> Conn | None:
        """The outbound connection (pid, fd) that started at start_ns: open, or recently closed."""
        with self._lock:
            conn = self._conns.get((pid, fd))
            if conn is not None and conn.start_ns == start_ns:
                return conn
            late = self._recently_closed.get((pid, fd, start_ns))
            if isinstance(late, Conn) or late is None:
                return late
            cid, dst, actual = late  # its totals' key: enough for a request's labels
            ip, _, port = dst.rpartition(":")  # a folded one's "address" is its domain
            return Conn(pid, fd, cid, "", 0, ip.strip("[]"), int(port), dst, actual, start_ns=start_ns)

    def active_destinations(self) -> list[tuple[str, int | None, int, str]]:
        """(container_id, netns inode, a pid in that namespace, IP) for the actual destination of
        each open outbound connection whose actual destination is known, one entry per
        (container, namespace, IP). Read-only: for the pinger's thread."""
        out: dict[tuple[str, int | None, str], int] = {}
        with self._lock:
            for conn in self._conns.values():
                if not conn.actual:  # not resolved, or folded into a domain: no address to ping
                    continue
                ip = conn.dst if conn.actual == conn.destination else conn.actual.rpartition(":")[0].strip("[]")
                out.setdefault((conn.container_id, conn.netns, ip), conn.pid)
        return [(cid, netns, pid, ip) for (cid, netns, ip), pid in out.items()]

    def destination_ips(self, since: float) -> set[str]:
        """The IPs of tracked destinations with a connect attempt at or after `since` (monotonic)
        or an open connection: what the node agent's registry keeps ip_to_fqdn entries for
        (containers/registry.go:194-226, lastConnectionAttempts). Older attempts are forgotten."""
        with self._lock:
            for ip in [ip for ip, at in self._attempts.items() if at < since]:
                del self._attempts[ip]
            return set(self._attempts) | {conn.dst for conn in self._conns.values()}

    def on_process(self, what: str, proc: Process) -> None:
        """Registry listener: a process that exited takes its connections and listens along.
        Its connections are closed at the next tick, not now: the close events its exit caused
        may still wait in their own buffer (drained after the process events of a batch), and
        they carry the final counts."""
        if what != "removed":
            return
        with self._lock:
            self._netns.pop(proc.pid, None)
            self._exited.append((proc.pid, time.monotonic_ns()))
            for key in [k for k in self._listens if k[0] == proc.pid]:
                del self._listens[key]

    def _close_exited(self) -> None:
        """Connections of processes that exited and whose close event never came (lock held)."""
        exited, self._exited = self._exited, []
        for pid, at in exited:
            for key in [k for k, c in self._conns.items() if k[0] == pid and c.start_ns <= at]:
                self._account_close(self._conns.pop(key), None)

    # --------------------------------------------------------- kernel map --

    def _read_live(self, conn: Conn) -> tuple[int, int, int] | None:
        t = self._live
        if t is None:
            return None
        v = t.get(t.key(conn.pid, conn.fd))
        if v is None:
            return None
        return int(v.bytes_sent), int(v.bytes_received), int(v.retransmits)

    def _delete_live(self, conn: Conn) -> None:
        t = self._live
        if t is not None:
            t.delete(t.key(conn.pid, conn.fd))

    def track_existing(self, conn: Conn) -> None:
        """A connection found in /proc at start: count it from now on, in the kernel too."""
        with self._lock:
            conn.netns = self.conntrack.netns_of(conn.pid)
            self._conns[(conn.pid, conn.fd)] = conn
            self._pending.append(conn)
            t = self._live
            if t is not None:
                leaf = t.leaf()
                leaf.flags = CONN_OUTBOUND
                t.set(t.key(conn.pid, conn.fd), leaf)

    # ---------------------------------------------------------- conntrack --

    def _resolve(self, conns: list[Conn]) -> None:
        items = [(c.netns, (c.src, c.sport, c.dst, c.dport)) for c in conns]
        for conn, peer in zip(conns, self.conntrack.resolve(items), strict=True):
            folded = self._domain_of(conn.dst, conn.dport, str(peer[0]) if peer else conn.dst)
            if folded is not None:
                conn.destination, conn.actual = folded, ""
            else:
                conn.actual = endpoint(peer[0], peer[1]) if peer else conn.destination

    def resolve_pending(self) -> None:
        """Label new connections with their actual destination and count their connects (the
        poll thread: every tick, and when an L7 request needs its connection's labels now)."""
        with self._lock:
            unknown, self._unknown_pids = self._unknown_pids, set()
            retry, self._retry = self._retry, []
        for pid in unknown:  # met in events or in the kernel's counts: read before this batch
            if self.registry.process(pid) is None:
                self.registry.add(pid)
        for raw in retry:
            self.handle_event(raw, retry=True)
        with self._lock:
            self._close_exited()
            pending, self._pending = self._pending, []
            connects, self._pending_connects = self._pending_connects, []
            closed, self._closed_pending = self._closed_pending, []
            late, self._late_pending = self._late_pending, []
            todo = [c for c in pending if c.actual is None]
            if todo:
                self._resolve(todo)
            for conn, final in closed:
                self._add_closed(conn, final)  # maps the connection to its totals' key
            for conn, n in late:
                key = self._recently_closed.get((conn.pid, conn.fd, conn.start_ns))
                if isinstance(key, tuple):
                    self._closed[key][2] += n
            for conn, seconds, _retrans in connects:
                actual = conn.destination if conn.actual is None else conn.actual
                agg = self._connects[(conn.container_id, conn.destination, actual)]
                agg[0] += 1
                agg[1] += seconds
                if len(self._last_actual) >= MAX_ACTUALS:
                    self._last_actual.clear()
                dialled = conn.destination if actual else endpoint(conn.dst, conn.dport)  # folded: its address
                self._last_actual[(conn.container_id, dialled)] = (conn.destination, actual)
            self._fold_kernel_counts()

    def _fold_kernel_counts(self) -> None:
        """Add the growth of the kernel's connect counts to the totals (lock held). An entry
        whose process is gone grows no more: folded a last time and deleted. A live process the
        registry does not know yet is read into it; one outside any (reported) container has
        its entries deleted uncounted, as its events would be."""
        t = self._counts
        if t is None:
            return
        for k, v in t.items():
            tgid, family, dport = int(k.tgid), int(k.family), int(k.dport)
            daddr = bytes(k.daddr)
            key = (tgid, family, daddr, dport)
            now = (int(v.failed), int(v.lost), int(v.lost_ns))
            alive = os.path.exists(f"{self.procfs}/{tgid}")
            c = self.registry.container_of_recent(tgid)
            if c is None and alive and self.registry.process(tgid) is None:
                # Not known: its exec event is still on its way, or was lost. The registry reads
                # it after this batch (not under our lock: it calls its listeners), or its counts
                # would go uncounted if it exited before the registry's next resync.
                self._unknown_pids.add(tgid)
                continue
            if c is None:
                self._folded.pop(key, None)
                t.delete(k)
                continue
            before = self._folded.get(key, (0, 0, 0))
            if now != before:
                tracked, dst_ip, dst_ep = self._destination(family, daddr, dport)
                if tracked:
                    self._attempts[dst_ip] = time.monotonic()
                    if now[0] > before[0]:
                        self._failed[(c.id, self._domain_of(dst_ip, dport, dst_ip) or dst_ep)] += now[0] - before[0]
                    if now[1] > before[1]:
                        last = self._last_actual.get((c.id, dst_ep))
                        if last is None:  # never resolved: its actual destination is its destination
                            folded = self._domain_of(dst_ip, dport, dst_ip)
                            last = (folded, "") if folded is not None else (dst_ep, dst_ep)
                        agg = self._connects[(c.id, *last)]
                        agg[0] += now[1] - before[1]
                        agg[1] += (now[2] - before[2]) / 1e9
            if alive:
                self._folded[key] = now
            else:
                self._folded.pop(key, None)
                t.delete(k)

    # ------------------------------------------------------------ metrics --

    def collect(self, f: Families) -> None:
        """Read-only: the totals, plus the kernel's live counters of resolved open connections."""
        with self._lock:
            live: dict[DestKey, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # sent, recv, retrans, active
            for conn in self._conns.values():
                if conn.actual is None:
                    continue
                agg = live[(conn.container_id, conn.destination, conn.actual)]
                agg[3] += 1
                counters = self._read_live(conn)
                if counters:
                    for i in range(3):
                        agg[i] += counters[i]
            apps = {c.id: c.app_id for c in self.registry.containers()}
            for (cid, dst, actual), (n, secs) in self._connects.items():
                if cid not in apps:
                    continue
                lbl = {"container_id": cid, "app_id": apps[cid], "destination": dst, "actual_destination": actual}
                f.counter("container_net_tcp_successful_connects_total", "successful TCP connects", n, **lbl)
                f.counter("container_net_tcp_connection_time_seconds_total", "time spent in TCP connect", secs, **lbl)
            failed = self._failed_now()
            for (cid, dst), n in failed.items():
                if cid in apps:
                    f.counter("container_net_tcp_failed_connects_total", "failed TCP connects", n,
                              container_id=cid, app_id=apps[cid], destination=dst)
            keys = set(self._closed) | set(live)
            for key in keys:
                cid, dst, actual = key
                if cid not in apps:
                    continue
                closed = self._closed.get(key, [0, 0, 0])
                now = live.get(key, [0, 0, 0, 0])
                lbl = {"container_id": cid, "app_id": apps[cid], "destination": dst, "actual_destination": actual}
                f.counter("container_net_tcp_bytes_sent_total", "bytes sent", closed[0] + now[0], **lbl)
                f.counter("container_net_tcp_bytes_received_total", "bytes received", closed[1] + now[1], **lbl)
                f.counter("container_net_tcp_retransmits_total", "TCP segments retransmitted", closed[2] + now[2], **lbl)
                f.gauge("container_net_tcp_active_connections", "open TCP connections", now[3], **lbl)
            for (_pid, addr), cid in sorted(self._listens.items()):
                if cid in apps:
                    f.gauge("container_net_tcp_listen_info", "a listening TCP socket", 1,
                            container_id=cid, app_id=apps[cid], listen_addr=addr, proxy="")

    def on_rename(self, old: str, new: str) -> None:
        """Connections and totals of `old` are `new`'s (added to what `new` has)."""
        def add(kept: list[Any], moved: list[Any]) -> list[Any]:
            for i, v in enumerate(moved):
                kept[i] += v
            return kept

        with self._lock:
            conns = [*self._conns.values(), *self._pending, *(c for c, _, _ in self._pending_connects),
                     *(c for c, _ in self._closed_pending), *(c for c, _ in self._late_pending),
                     *(v for v in self._recently_closed.values() if isinstance(v, Conn))]
            for conn in conns:
                if conn.container_id == old:
                    conn.container_id = new
            for k, v in self._recently_closed.items():
                if isinstance(v, tuple) and v[0] == old:
                    self._recently_closed[k] = (new, v[1], v[2])
            rekey(self._connects, old, new, add)
            rekey(self._closed, old, new, add)
            rekey(self._failed, old, new, lambda a, b: a + b)
            for lk, cid in self._listens.items():
                if cid == old:
                    self._listens[lk] = new
            rekey(self._last_actual, old, new, lambda kept, _moved: kept)

    def _failed_now(self) -> dict[tuple[str, str], int]:
        """Failed connects with what the kernel counted since the last batch (lock held; read
        only: the batch adds the same growth to the same series, so the value never goes back).
        A refused connect shows at the next scrape, not the next batch, as its event used to."""
        t = self._counts
        if t is None:
            return self._failed
        out = dict(self._failed)
        for k, v in t.items():
            tgid = int(k.tgid)
            if self.registry.process(tgid) is None:
                continue  # not known, or gone: the batch decides
            c = self.registry.container_of(tgid)
            key = (tgid, int(k.family), bytes(k.daddr), int(k.dport))
            grown = int(v.failed) - self._folded.get(key, (0, 0, 0))[0]
            if c is None or grown <= 0:
                continue
            tracked, dst_ip, dst_ep = self._destination(key[1], key[2], key[3])
            if tracked:
                dest = self._domain_of(dst_ip, key[3], dst_ip) or dst_ep
                out[(c.id, dest)] = out.get((c.id, dest), 0) + grown
        return out

    def forget_containers(self, gone: list[str]) -> None:
        """Drop totals of containers the registry forgot (bounded memory)."""
        if not gone:
            return
        dead = set(gone)
        with self._lock:
            for ck in [k for k in self._connects if k[0] in dead]:
                del self._connects[ck]
            for tk in [k for k in self._closed if k[0] in dead]:
                del self._closed[tk]
            for fk in [k for k in self._failed if k[0] in dead]:
                del self._failed[fk]
            for ak in [k for k in self._last_actual if k[0] in dead]:
                del self._last_actual[ak]

    def self_metrics(self, f: Families) -> None:
        t = self._uncounted
        if t is not None:
            f.counter("coroot_agent_tcp_uncounted_connects_total", "TCP connects counted nowhere: the kernel's "
                      "connect-count map and the event buffer were both full", t.percpu_sum(0))


# ------------------------------------------------------------- /proc seed ---

_STATE_ESTABLISHED, _STATE_LISTEN = "01", "0A"


def _hex_addr(text: str) -> tuple[str, int]:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[::-1])
    else:
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return str(normalize(ip)), int(port, 16)


def read_sockets(procfs: str, pid: int) -> dict[int, tuple[str, tuple[str, int], tuple[str, int]]]:
    """inode -> (state, local, remote) for the TCP sockets of pid's network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{procfs}/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            p = line.split()
            if len(p) < 10:
                continue
            out[int(p[9])] = (p[3], _hex_addr(p[1]), _hex_addr(p[2]))
    return out


def socket_fds(procfs: str, pid: int) -> dict[int, int]:
    """inode -> fd for pid's sockets."""
    return {int(t[8:-1]): fd for fd, t in fd_targets(procfs, pid).items() if t.startswith("socket:[")}


def seed(tracker: TcpTracker, pids: list[int]) -> int:
    """Register the established outbound connections and listening sockets of processes in
    containers. Returns the connections seeded."""
    n = 0
    by_netns: dict[int, dict[int, tuple[str, tuple[str, int], tuple[str, int]]]] = {}
    for pid in pids:
        if tracker.registry.container_of(pid) is None:
            continue
        fds = socket_fds(tracker.procfs, pid)
        if not fds:
            continue
        try:
            netns = os.stat(f"{tracker.procfs}/{pid}/ns/net").st_ino
        except OSError:
            continue
        socks = by_netns.get(netns)
        if socks is None:
            socks = by_netns[netns] = read_sockets(tracker.procfs, pid)
        listening = {local[1] for state, local, _ in socks.values() if state == _STATE_LISTEN}
        for inode, fd in fds.items():
            entry = socks.get(inode)
            if entry is None:
                continue
            state, local, remote = entry
            if state == _STATE_LISTEN:
                with tracker._lock:
                    tracker._listen(pid, endpoint(local[0], local[1]), local[1])
            elif state == _STATE_ESTABLISHED and local[1] not in listening:
                if not tracker.public.should_track(ipaddress.ip_address(remote[0])):
                    continue
                c = tracker.registry.container_of(pid)
                if c is None:  # exited meanwhile
                    continue
                tracker.track_existing(Conn(pid, fd, c.id, local[0], local[1], remote[0], remote[1],
                                            endpoint(remote[0], remote[1])))
                n += 1
    return n
