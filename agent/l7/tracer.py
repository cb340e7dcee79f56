"""L7 requests from bpf/l7.c: request/response pairs decoded with the parsers of this package,
counted as the metrics of reference §1 (L7) and written as spans (reference §4) through the
storage sink.

Outbound requests take `destination`/`actual_destination` from the TCP tracker's connection;
an event whose connection is not known yet (its connect event is still in the other buffer,
or conntrack has not resolved it) waits for the next housekeeping tick, once. Metrics are never
sampled; spans are produced for outbound requests only (the client's view, as Coroot does),
when tracing is on, the container has not opted out (COROOT_EBPF_TRACES), the sample is drawn
and the HTTP path is not excluded.

HTTP is counted in the kernel (`l7_http`: inbound per process, outbound per connection, by
status class with a histogram), read at scrape time; a connection's counts are folded into its
destination's totals once it is closed, a process's inbound counts when it exits. The kernel
sends an HTTP event only for a span (outbound, sampled there), or to be counted here when its
map is full (the event then lacks F_COUNTED). Decodes and aggregates; the sink ships.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
import socket
import struct
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import Metric

from agent.containers.registry import Registry
from agent.l7 import dns, http, postgres, redis
from agent.metrics import Families
from agent.net.tcp import Conn, TcpTracker

log = logging.getLogger(__name__)

# Mirror of struct l7_event in bpf/l7.c: header, then CA_L7_RESP response bytes, then the request.
L7_HEADER = struct.Struct("<QQQIIIIIIII")
RESP_MAX = 512
HTTP, POSTGRES, REDIS, DNS = 1, 2, 3, 4
F_OUTBOUND, F_INBOUND, F_TLS, F_COUNTED = 1, 2, 4, 8
# bpf/l7.c l7_stats, by index
KERNEL_STATS = ("requests", "replaced_unanswered", "paired", "http_counted_in_user_space")
HTTP_STATUS = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")  # the kernel's status index
PROTOCOLS = {HTTP: "http", POSTGRES: "postgres", REDIS: "redis", DNS: "dns"}
# Outbound metric stem per protocol; inbound puts `_inbound_` after the protocol.
STEMS = {HTTP: ("http", "requests"), POSTGRES: ("postgres", "queries"), REDIS: ("redis", "queries")}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # Coroot's L7 buckets
MAX_DEFERRED = 10_000
UNKNOWN_GRACE = 10.0  # seconds an l7_http connection may wait for its connect event
RESOLVE_EVERY = 0.05  # seconds: at most this often a request resolves its connection's NAT at once
MAX_PG_CONNS = 4096
MAX_FQDNS = 10_000
OTHER_DOMAIN = "other"  # DNS requests for domains beyond a container's cap are counted here


@dataclass(frozen=True)
class Masks:
    url_query: bool = True
    url_path: bool = True
    sql_literals: bool = True
    redis_values: bool = True


@dataclass
class Request:
    """One request of a pair (a pipelined payload yields several)."""

    protocol: int
    status: str
    duration: float
    method: str = ""  # HTTP method, Redis command
    path: str = ""  # HTTP path
    http_status: int = 0
    statement: str = ""
    error: str = ""


class Hist:
    __slots__ = ("count", "sum", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * len(BUCKETS)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        i = bisect.bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            self.buckets[i] += 1

    def add(self, count: int, sum_seconds: float, buckets: list[int]) -> None:
        self.count += count
        self.sum += sum_seconds
        for i, n in enumerate(buckets):
            self.buckets[i] += n

    def merge(self, other: Hist) -> None:
        self.add(other.count, other.sum, other.buckets)

    @classmethod
    def of_kernel(cls, v: object) -> Hist:
        """From a bpf/l7.c `struct l7_hist` (count, sum_ns, buckets)."""
        h = cls()
        h.add(int(v.count), v.sum_ns / 1e9, [int(b) for b in v.buckets])  # type: ignore[attr-defined]
        return h

    def cumulative(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for le, n in zip(BUCKETS, self.buckets, strict=True):
            acc += n
            out.append((repr(le), acc))
        out.append(("+Inf", self.count))
        return out


def pg_status(resp: bytes) -> tuple[str, str]:
    """ok / failed (with the SQLSTATE) / unknown from the first bytes of a backend reply."""
    results = postgres.parse_results(resp)
    for r in results:
        if r.error:
            return "failed", r.code
    if results or resp[:1] in (b"1", b"2", b"T", b"D", b"n", b"s", b"I", b"Z", b"t", b"N", b"S", b"3"):
        return "ok", ""
    return "unknown", ""


class L7Tracer:
    def __init__(self, registry: Registry, tcp: TcpTracker, sink: object | None, *, spans: bool = True,
                 sampling: float = 1.0, exclude_paths: tuple[str, ...] = (), max_fqdns: int = 50,
                 masks: Masks | None = None, hostname: str | None = None, host_id: str = "") -> None:
        self.registry = registry
        self.tcp = tcp
        self.sink = sink
        self.spans = spans and sink is not None
        self.sampling = sampling
        self.exclude_paths = frozenset(exclude_paths)
        self.max_fqdns = max_fqdns
        self.masks = masks or Masks()
        self.hostname = hostname or socket.gethostname()
        self.host_id = host_id
        self._lock = threading.Lock()
        self._out: dict[tuple[str, int, str, str, str], Hist] = defaultdict(Hist)
        self._in: dict[tuple[str, int, str], Hist] = defaultdict(Hist)
        self._dns: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._dns_hist: dict[str, Hist] = defaultdict(Hist)
        self._domains: dict[str, set[str]] = defaultdict(set)
        self.fqdn: OrderedDict[str, str] = OrderedDict()  # ip -> name, from DNS answers
        self._pg: OrderedDict[tuple[int, int, int], postgres.Connection] = OrderedDict()
        self._deferred: list[bytes] = []  # events waiting for their connection or process, once
        self._http_table: object | None = None  # the kernel's l7_http map
        self._stats_table: object | None = None  # the kernel's l7_stats counters
        self._unknown: dict[tuple[int, int, int], float] = {}  # l7_http connections not seen yet
        self._last_resolve = 0.0
        self._clock_offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self.requests = 0
        self.spans_written = 0
        self.unattributed = 0
        self.deferred_dropped = 0

    def attach(self, http_table: object | None, stats_table: object | None = None) -> None:
        self._http_table = http_table
        self._stats_table = stats_table

    def kernel_stats(self) -> dict[str, int]:
        """bpf/l7.c's counters, summed over CPUs."""
        t = self._stats_table
        if t is None:
            return {}
        out = {}
        try:
            for i, what in enumerate(KERNEL_STATS):
                out[what] = sum(int(v) for v in t[t.Key(i)])  # type: ignore[attr-defined,index]
        except (KeyError, OSError):  # the maps are being freed at shutdown
            return {}
        return out

    @staticmethod
    def kernel_sampling(enabled: bool, sampling: float) -> int:
        """CA_L7_SAMPLE: HTTP requests whose random draw is below it become span events."""
        return int(sampling * 2**32) if enabled else 0

    # --------------------------------------------------------------- events --

    def handle_event(self, raw: bytes) -> None:
        with self._lock:
            self._handle(raw, retry=0)

    def _handle(self, raw: bytes, retry: int) -> None:
        (start, duration, conn_start, pid, fd, proto, flags, req_len, _req_size, resp_len,
         _pmax) = L7_HEADER.unpack_from(raw)
        base = L7_HEADER.size
        resp = raw[base:base + resp_len]
        req = raw[base + RESP_MAX:base + RESP_MAX + req_len]
        seconds = duration / 1e9
        outbound = bool(flags & F_OUTBOUND) and proto != DNS
        conn: Conn | None = None
        if outbound:  # the container that made the connection, even if the process is gone
            conn = self.tcp.connection(pid, fd, conn_start)
            if conn is not None and conn.actual is None:
                now = time.monotonic()
                if now - self._last_resolve >= RESOLVE_EVERY:  # its conntrack read now, not in a second
                    self._last_resolve = now
                    self.tcp.resolve_pending()
            if conn is None or conn.actual is None:
                if retry == 0:
                    self._defer(raw)
                elif conn is None:
                    self.unattributed += 1
                return
            c = self.registry.container(conn.container_id)
        else:
            c = self.registry.container_of_recent(pid)
            if c is None and retry == 0 and self.registry.process(pid) is None:
                self._defer(raw)  # the process's exec event may still be in its buffer
                return
        if c is None:
            return
        if proto == DNS:
            self._dns_pair(c.id, req, resp, seconds)
            return
        requests = self._parse(proto, pid, fd, conn_start, req, resp, seconds)
        if not requests:
            return
        counted = bool(flags & F_COUNTED)  # HTTP counted in the kernel: this event is for a span
        if not counted:
            self.requests += len(requests)
            if not outbound:
                for r in requests:
                    self._in[(c.id, proto, r.status)].observe(r.duration)
                return
            assert conn is not None
            actual = conn.actual or conn.destination
            for r in requests:
                self._out[(c.id, proto, conn.destination, actual, r.status)].observe(r.duration)
        if outbound and self.spans and "traces" not in c.opt_out:
            assert conn is not None
            for r in requests:
                self._span(c.id, c.app_id, conn, r, start, bool(flags & F_TLS), sampled=counted)

    def _defer(self, raw: bytes) -> None:
        if len(self._deferred) >= MAX_DEFERRED:
            self._deferred.pop(0)
            self.deferred_dropped += 1
        self._deferred.append(raw)

    def retry_deferred(self) -> None:
        """Events that waited for their connection or process: handled now, or dropped."""
        with self._lock:
            todo, self._deferred = self._deferred, []
            for raw in todo:
                self._handle(raw, retry=1)

    def _parse(self, proto: int, pid: int, fd: int, conn_start: int, req: bytes, resp: bytes,
               seconds: float) -> list[Request]:
        if proto == HTTP:
            reqs = http.parse_requests(req, mask=self.masks.url_query, mask_path=self.masks.url_path)
            resps = http.parse_responses(resp)
            out = []
            for i, q in enumerate(reqs or [None]):
                code = resps[i].status if i < len(resps) else 0
                status = resps[i].status_class if i < len(resps) else "unknown"
                out.append(Request(HTTP, status, seconds, q.method if q else "", q.path if q else "", code))
            return out
        if proto == POSTGRES:
            key = (pid, fd, conn_start)
            state = self._pg.get(key)
            if state is None:
                state = self._pg[key] = postgres.Connection()
                if len(self._pg) > MAX_PG_CONNS:
                    self._pg.popitem(last=False)
            else:
                self._pg.move_to_end(key)
            queries = postgres.parse_queries(req, state, mask=self.masks.sql_literals)
            if not queries:
                return []  # a Parse that only prepares, a Close, a Sync
            status, code = pg_status(resp)
            return [Request(POSTGRES, status, seconds, "query", statement=q.statement, error=code) for q in queries]
        if proto == REDIS:
            cmds = redis.parse_commands(req, mask=self.masks.redis_values)
            replies = redis.parse_replies(resp)
            out = []
            for i, cmd in enumerate(cmds):
                status = ("failed" if replies[i].error else "ok") if i < len(replies) else "unknown"
                out.append(Request(REDIS, status, seconds, cmd.name, statement=cmd.statement))
            return out
        return []

    def _dns_pair(self, cid: str, req: bytes, resp: bytes, seconds: float) -> None:
        q = dns.parse(req)
        if q is None:
            return
        r = dns.parse(resp)
        status = r.rcode if r is not None else "unknown"
        domains = self._domains[cid]
        domain = q.domain
        if domain not in domains:
            if len(domains) >= self.max_fqdns:
                domain = OTHER_DOMAIN
            else:
                domains.add(domain)
        self._dns[(cid, q.qtype, domain, status)] += 1
        self._dns_hist[cid].observe(seconds)
        self.requests += 1
        if r is not None:
            for ip, name in r.answers:
                self.fqdn[ip] = name
                self.fqdn.move_to_end(ip)
            while len(self.fqdn) > MAX_FQDNS:
                self.fqdn.popitem(last=False)

    # ---------------------------------------------------------------- spans --

    def _span(self, cid: str, app: str, conn: Conn, r: Request, start_mono: int, tls: bool,
              sampled: bool = False) -> None:
        if r.protocol == HTTP and r.path.partition("?")[0] in self.exclude_paths:
            return
        if not sampled and self.sampling < 1.0 and random.random() >= self.sampling:
            return
        actual = conn.actual or conn.destination
        actual_ip = actual.rpartition(":")[0].strip("[]")
        attrs = {
            "net.peer.name": self.fqdn.get(conn.dst, conn.dst),
            "net.peer.port": str(conn.dport),
            "net.sock.peer.addr": actual_ip,
        }
        if tls:
            attrs["tls"] = "true"
        status_code, message = "STATUS_CODE_UNSET", ""
        if r.protocol == HTTP:
            name = r.method or "unknown"
            attrs["http.url"] = f"{'https' if tls else 'http'}://{conn.destination}{r.path}"
            attrs["http.method"] = r.method
            if r.http_status:
                attrs["http.status_code"] = str(r.http_status)
                status_code = "STATUS_CODE_ERROR" if r.http_status >= 400 else "STATUS_CODE_OK"
        else:
            system = "postgresql" if r.protocol == POSTGRES else "redis"
            name = r.method
            attrs["db.system"] = system
            attrs["db.statement"] = r.statement
            if r.protocol == REDIS:
                attrs["db.operation"] = r.method
            if r.status == "failed":
                status_code, message = "STATUS_CODE_ERROR", r.error
            elif r.status == "ok":
                status_code = "STATUS_CODE_OK"
        resource = {"host.name": self.hostname, "host.id": self.host_id, "service.name": app, "container.id": cid}
        row = (
            start_mono + self._clock_offset, f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}",
            "", "", name, "SPAN_KIND_CLIENT", app, resource, attrs, int(r.duration * 1e9), status_code, message,
            [], [], [], [], [], [], [],
        )
        self.sink.add("otel_traces", row)  # type: ignore[union-attr]
        self.spans_written += 1

    # -------------------------------------------------------------- metrics --

    def _http_live(self) -> list[tuple[object, str, Hist]]:
        """(kernel key, status, counts) of every entry of the kernel's HTTP map."""
        t = self._http_table
        if t is None:
            return []
        out = []
        for k, v in t.items():  # type: ignore[attr-defined]
            out.append((k, HTTP_STATUS[k.status] if k.status < len(HTTP_STATUS) else "unknown", Hist.of_kernel(v)))
        return out

    def _delete_live(self, key: object) -> None:
        try:
            del self._http_table[key]  # type: ignore[attr-defined,index]
        except KeyError:
            pass

    def fold_closed(self) -> None:
        """Outbound HTTP counts of closed connections move to their destination's totals and
        leave the kernel map (housekeeping)."""
        if self._http_table is None:
            return
        now = time.monotonic()
        with self._lock:
            for k, status, h in self._http_live():
                if not k.outbound:  # type: ignore[attr-defined]
                    self._fold_exited(k, status, h)
                    continue
                pid, fd, start = int(k.tgid), int(k.fd), int(k.conn_start)  # type: ignore[attr-defined]
                if self.tcp.is_open(pid, fd, start):
                    continue
                conn = self.tcp.connection(pid, fd, start)
                if conn is not None and conn.actual is None:
                    continue  # closed before its NAT lookup: the next tick
                if conn is None:
                    # Counted before its connect event was read (the two travel separately): wait
                    # for it, and give up only on a connection still unknown after a while.
                    first = self._unknown.setdefault((pid, fd, start), now)
                    if now - first < UNKNOWN_GRACE:
                        continue
                    self.unattributed += h.count
                    log.debug("HTTP counts of an unknown connection dropped: pid %d fd %d start %d: %d",
                              pid, fd, start, h.count)
                else:
                    key = (conn.container_id, HTTP, conn.destination, conn.actual or conn.destination, status)
                    self._out[key].merge(h)
                self._unknown.pop((pid, fd, start), None)
                self._delete_live(k)
            if len(self._unknown) > MAX_DEFERRED:
                self._unknown.clear()

    def _fold_exited(self, key: object, status: str, h: Hist) -> None:
        """Inbound counts of a process that is gone but whose exit the registry never handled
        (it was never known to it): folded like on_process does, so the map cannot fill up."""
        tgid = int(key.tgid)  # type: ignore[attr-defined]
        if self.registry.process(tgid) is not None or os.path.exists(f"{self.registry.procfs}/{tgid}"):
            return
        c = self.registry.container_of_recent(tgid)
        if c is not None:
            self._in[(c.id, HTTP, status)].merge(h)
        self._delete_live(key)

    def on_process(self, what: str, proc: object) -> None:
        """Registry listener: an exited process's inbound HTTP counts move to its container's
        totals, and its kernel entries are freed."""
        t = self._http_table
        if what != "removed" or t is None:
            return
        pid = proc.pid  # type: ignore[attr-defined]
        cid = getattr(proc, "container_id", None)
        with self._lock:
            for st in range(len(HTTP_STATUS)):
                key = t.Key(pid, 0, 0, st, 0)  # type: ignore[attr-defined]
                try:
                    v = t[key]  # type: ignore[index]
                except KeyError:
                    continue
                if cid is not None:
                    self._in[(cid, HTTP, HTTP_STATUS[st])].merge(Hist.of_kernel(v))
                self._delete_live(key)

    def forget_containers(self, gone: list[str]) -> None:
        if not gone:
            return
        dead = set(gone)
        with self._lock:
            for d in (self._out, self._in, self._dns):
                for k in [k for k in d if k[0] in dead]:
                    del d[k]
            for cid in dead:
                self._domains.pop(cid, None)
                self._dns_hist.pop(cid, None)

    def collect(self, f: Families) -> None:
        self.tcp.resolve_pending()
        with self._lock:
            apps = {c.id: c.app_id for c in self.registry.containers()}
            outbound: dict[tuple[str, int, str, str, str], Hist] = defaultdict(Hist)
            inbound: dict[tuple[str, int, str], Hist] = defaultdict(Hist)
            for key, h in self._out.items():
                outbound[key].merge(h)
            for key, h in self._in.items():
                inbound[key].merge(h)
            for k, status, h in self._http_live():
                if k.outbound:  # type: ignore[attr-defined]
                    conn = self.tcp.connection(int(k.tgid), int(k.fd), int(k.conn_start))  # type: ignore[attr-defined]
                    if conn is not None and conn.actual is not None:
                        outbound[(conn.container_id, HTTP, conn.destination, conn.actual, status)].merge(h)
                else:
                    c = self.registry.container_of_recent(int(k.tgid))  # type: ignore[attr-defined]
                    if c is not None:
                        inbound[(c.id, HTTP, status)].merge(h)
            for (cid, proto, dst, actual, status), h in outbound.items():
                if cid not in apps:
                    continue
                p, unit = STEMS[proto]
                lbl = {"container_id": cid, "app_id": apps[cid], "destination": dst,
                       "actual_destination": actual, "status": status}
                f.counter(f"container_{p}_{unit}_total", f"outbound {PROTOCOLS[proto]} {unit}", h.count, **lbl)
                lbl.pop("status")
                f.histogram(f"container_{p}_{unit}_duration_seconds_total",
                            f"outbound {PROTOCOLS[proto]} {unit} by duration", h, status=status, **lbl)
            for (cid, proto, status), h in inbound.items():
                if cid not in apps:
                    continue
                p, unit = STEMS[proto]
                lbl = {"container_id": cid, "app_id": apps[cid], "status": status}
                f.counter(f"container_{p}_inbound_{unit}_total", f"inbound {PROTOCOLS[proto]} {unit}", h.count, **lbl)
                f.histogram(f"container_{p}_inbound_{unit}_duration_seconds_total",
                            f"inbound {PROTOCOLS[proto]} {unit} by duration", h, **lbl)
            for (cid, qtype, domain, status), n in self._dns.items():
                if cid in apps:
                    f.counter("container_dns_requests_total", "DNS requests", n, container_id=cid,
                              app_id=apps[cid], request_type=qtype, domain=domain, status=status)
            for cid, h in self._dns_hist.items():
                if cid in apps:
                    f.histogram("container_dns_requests_duration_seconds_total", "DNS requests by duration", h,
                                container_id=cid, app_id=apps[cid])
            for ip, name in self.fqdn.items():
                f.gauge("ip_to_fqdn", "an IP address and the name a DNS answer gave it", 1, ip=ip, fqdn=name)


class L7Collector:
    def __init__(self, tracer: L7Tracer, const: dict[str, str]) -> None:
        self.tracer = tracer
        self.const = const

    def collect(self) -> Iterator[Metric]:
        f = Families(self.const)
        self.tracer.collect(f)
        t = self.tracer
        f.counter("coroot_agent_l7_requests_total", "L7 requests decoded from the kernel's pairs", t.requests)
        for what, n in t.kernel_stats().items():
            f.counter("coroot_agent_l7_kernel_total", "the kernel side's request accounting: requests recognised, "
                      "requests that replaced an unanswered one, pairs made, HTTP requests its map had no room for",
                      n, what=what)
        f.counter("coroot_agent_l7_spans_total", "spans handed to the store", t.spans_written)
        f.counter("coroot_agent_l7_unattributed_total",
                  "outbound requests dropped: their connection was never seen", t.unattributed)
        f.counter("coroot_agent_l7_deferred_dropped_total",
                  "events dropped because too many waited for their connection", t.deferred_dropped)
        yield from f
