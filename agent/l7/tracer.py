"""L7 requests from bpf/l7.c: request/response pairs decoded by the protocol plug-ins
(agent/l7/protocols.py), counted as the metrics of reference §1 (L7) and written as spans
(reference §4) through the storage sink. This module keeps what every protocol shares:
attribution to containers and connections, deferral, the kernel's HTTP counts, aggregation by
the plug-ins' metric stems and the span rows; what a protocol's bytes mean is its plug-in's.

Outbound requests take `destination`/`actual_destination` from the TCP tracker's connection;
an event whose connection is not known yet (its connect event is still in the other buffer,
or conntrack has not resolved it) waits for the next housekeeping tick, once. Metrics are never
sampled; spans are produced for outbound requests only (the client's view, as Coroot does),
when tracing is on, the container has not opted out (COROOT_EBPF_TRACES), the sample is drawn
and the plug-in makes one (HTTP leaves out excluded paths).

HTTP is counted in the kernel (`l7_http`: inbound per process, outbound per connection, by
status class with a histogram), read at scrape time; a connection's counts are folded into its
destination's totals once it is closed, a process's inbound counts when it exits. The kernel
sends an HTTP event only for a span (outbound, sampled there), or to be counted here when its
map is full (the event then lacks F_COUNTED). Decodes and aggregates; the sink ships.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import defaultdict
from typing import Any, Protocol

from agent.component import Component
from agent.containers.cgroup import service_name
from agent.containers.registry import Container, Process, rekey
from agent.ebpf.maps import BpfMap, Programs
from agent.l7 import contract
from agent.l7.contract import F_COUNTED, F_OUTBOUND, F_TLS, HTTP, HTTP_STATUS, KERNEL_STATS
from agent.l7.dns import Dns
from agent.l7.hist import Hist
from agent.l7.protocol import Masks, Peer, Request, Settings, Stem
from agent.l7.protocol import Protocol as Plugin
from agent.l7.protocols import PLUGINS
from agent.metrics import Families
from agent.net.tcp import Conn
from agent.sinks import schema

log = logging.getLogger(__name__)

__all__ = ["Hist", "L7Tracer", "Masks", "SpanColumns"]

MAX_DEFERRED = 10_000
MAX_CACHED = 10_000  # span peers and resources kept for the next spans (cleared when full)
UNKNOWN_GRACE = 10.0  # seconds an l7_http connection may wait for its connect event
DEFER_GRACE = 3.0  # seconds an event may wait for its connection or process (over several ticks)
FQDN_GC_SECONDS = 600.0  # ip_to_fqdn keeps addresses connected to within this (the node agent's gcInterval)
RESOLVE_EVERY = 0.05  # seconds: at most this often a request resolves its connection's NAT at once


class Connections(Protocol):
    """What the tracer needs of the TCP tracker (agent/net/tcp.py TcpTracker)."""

    def connection(self, pid: int, fd: int, start_ns: int) -> Conn | None: ...

    def is_open(self, pid: int, fd: int, start_ns: int) -> bool: ...

    def resolve_pending(self) -> None: ...

    def destination_ips(self, since: float) -> set[str]: ...


class Containers(Protocol):
    """What the tracer needs of the registry (agent/containers/registry.py Registry)."""

    procfs: str

    def container(self, cid: str) -> Container | None: ...

    def container_of_recent(self, pid: int) -> Container | None: ...

    def process(self, pid: int) -> Process | None: ...

    def containers(self) -> list[Container]: ...


class Sink(Protocol):
    """The storage sink (agent/sinks/batcher.py Sink). One that also has `add_columns(table,
    columns)` takes each batch of spans as columns in one call; else a row at a time."""

    def add(self, table: str, row: tuple[Any, ...]) -> None: ...


OutKey = tuple[str, int, str, str, str, str]  # container, protocol, destination, actual, status, method
InKey = tuple[str, int, str]  # container, protocol, status


class SpanColumns:
    """otel_traces rows being made, a list per column: one append per value, no row object.
    Trace and span ids are drawn for all of them at once when the columns are taken."""

    __slots__ = ("timestamps", "names", "services", "resources", "attributes", "durations", "statuses",
                 "messages")

    def __init__(self) -> None:
        self.timestamps: list[int] = []
        self.names: list[str] = []
        self.services: list[str] = []
        self.resources: list[dict[str, str]] = []
        self.attributes: list[dict[str, str]] = []
        self.durations: list[int] = []
        self.statuses: list[str] = []
        self.messages: list[str] = []

    def __len__(self) -> int:
        return len(self.timestamps)

    def add(self, ts: int, name: str, service: str, resource: dict[str, str], attributes: dict[str, str],
            duration: int, status: str, message: str) -> None:
        self.timestamps.append(ts)
        self.names.append(name)
        self.services.append(service)
        self.resources.append(resource)
        self.attributes.append(attributes)
        self.durations.append(duration)
        self.statuses.append(status)
        self.messages.append(message)

    def columns(self) -> list[list[Any]]:
        """Every insert column of otel_traces (agent/sinks/schema.py), in its order."""
        n = len(self.timestamps)
        ids = random.randbytes(24 * n).hex()  # 32 hex digits of trace id, then 16 of span id, per span
        return schema.columns("otel_traces", {
            "Timestamp": self.timestamps,
            "TraceId": [ids[i:i + 32] for i in range(0, 48 * n, 48)],
            "SpanId": [ids[i:i + 16] for i in range(32, 48 * n, 48)],
            "SpanName": self.names,
            "SpanKind": ["SPAN_KIND_CLIENT"] * n,
            "ServiceName": self.services,
            "ResourceAttributes": self.resources,
            "SpanAttributes": self.attributes,
            "Duration": self.durations,
            "StatusCode": self.statuses,
            "StatusMessage": self.messages,
        }, n)


class L7Tracer(Component):
    name = "l7"

    def __init__(self, registry: Containers, tcp: Connections, sink: Sink | None, *, spans: bool = True,
                 sampling: float = 1.0, exclude_paths: tuple[str, ...] = (), max_fqdns: int = 50,
                 masks: Masks | None = None, hostname: str | None = None, host_id: str = "") -> None:
        self.registry = registry
        self.tcp = tcp
        self.sink = sink
        self.spans = spans and sink is not None
        self.sampling = sampling
        self.hostname = hostname or socket.gethostname()
        self.host_id = host_id
        settings = Settings(masks=masks or Masks(), exclude_paths=frozenset(exclude_paths), max_fqdns=max_fqdns)
        self.plugins: dict[int, Plugin] = {cls.id: cls(settings) for cls in PLUGINS}
        self._next_fqdn_gc = 0.0
        self._lock = threading.Lock()
        self._out: dict[OutKey, Hist] = defaultdict(Hist)
        self._in: dict[InKey, Hist] = defaultdict(Hist)
        # events (and what a stream plug-in decoded of them) waiting for their connection or process,
        # with when they first waited
        self._deferred: list[tuple[contract.Event, list[Request] | None, float]] = []
        self._http: BpfMap | None = None  # the kernel's l7_http map
        self._stats: BpfMap | None = None  # the kernel's l7_stats counters
        self._unknown: dict[tuple[int, int, int], float] = {}  # l7_http connections not seen yet
        self._last_resolve = 0.0
        self._clock_offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self._spans = SpanColumns()  # spans made since the last hand-over to the sink
        self._peers: dict[tuple[str, str | None], tuple[Peer, dict[str, str]]] = {}
        self._resources: dict[str, tuple[str, dict[str, str]]] = {}  # container -> service.name, resource
        # (destination, actual, tls, protocol, method, path, code) -> span name, attributes, status,
        # message, or () for no span: plug-ins whose span() depends on only these (span_by_path)
        self._made: dict[tuple[Any, ...], tuple[str, dict[str, str], str, str] | tuple[()]] = {}
        self.requests = 0
        self.spans_written = 0
        self.unattributed = 0
        self.deferred_dropped = 0

    # ---------------------------------------------------------- component --

    def attach(self, programs: Programs | None, stats: Any = None) -> None:
        if stats is not None:  # TRANSITIONAL: run.py still hands raw tables; removed with that wiring
            self._http, self._stats = BpfMap(programs, "l7_http"), BpfMap(stats, "l7_stats")
            return
        self._http = programs.map("l7_http") if programs is not None else None
        self._stats = programs.map("l7_stats") if programs is not None else None

    def tick(self, now: float, gone: list[str]) -> None:
        self.forget_containers(gone)
        self.retry_deferred()
        self.fold_closed()
        if now >= self._next_fqdn_gc:
            if self._next_fqdn_gc:  # the first tick only starts the clock, as the node agent's ticker
                active = self.tcp.destination_ips(now - FQDN_GC_SECONDS)
                dns = self.plugins[contract.DNS]
                if isinstance(dns, Dns):
                    with self._lock:
                        dns.gc(active)
            self._next_fqdn_gc = now + FQDN_GC_SECONDS

    def close(self) -> None:
        """Nothing reads the kernel's maps after this (they are freed next)."""
        self._http = self._stats = None

    def kernel_stats(self) -> dict[str, int]:
        """bpf/l7.c's counters, summed over CPUs."""
        t = self._stats
        if t is None:
            return {}
        return {what: t.percpu_sum(i) for i, what in enumerate(KERNEL_STATS)}

    @staticmethod
    def kernel_sampling(enabled: bool, sampling: float) -> int:
        """CA_L7_SAMPLE: HTTP requests whose random draw is below it become span events."""
        return int(sampling * 2**32) if enabled else 0

    # --------------------------------------------------------------- events --

    def handle_event(self, raw: bytes) -> None:
        """One record of the kernel's buffer (an exception is the caller's)."""
        with self._lock:
            try:
                self._event(contract.unpack(raw))
            finally:
                self._flush_spans()

    def handle_events(self, records: list[bytes]) -> None:
        """The records of one read of the kernel's buffer (agent/ebpf/ringbuf.py Batched), in
        order: one lock for all of them, and their spans handed to the sink as one batch of
        columns. A record that fails is logged and the others are handled."""
        unpack, event = contract.unpack, self._event
        with self._lock:
            try:
                for raw in records:
                    try:
                        event(unpack(raw))
                    except Exception:  # noqa: BLE001 - one bad event must not stop the others
                        log.exception("handling an L7 event")
            finally:
                self._flush_spans()

    def _event(self, e: contract.Event) -> None:
        plugin = self.plugins.get(e.protocol)
        if plugin is None or (plugin.stem is not None and not plugin.stem.inbound and not e.flags & F_OUTBOUND):
            return
        decoded = None
        if plugin.streaming:  # its calls are parsed in order now; what they complete waits if need be
            client = e.written == e.outbound
            data = e.response + e.request  # a stream event's bytes: resp[] first (contract.h)
            decoded = plugin.feed((e.pid, e.fd, e.conn_start), client, e.start_ns, data, e.call_size)
            if not decoded:
                return
        self._handle(e, plugin, decoded)

    def _handle(self, e: contract.Event, plugin: Plugin, decoded: list[Request] | None,
                since: float | None = None) -> None:
        """`since`: when the event was first deferred (None: it is new). An event waits for its
        connection or process at most DEFER_GRACE seconds, over several ticks: its connect event
        can be read after it (the two travel in different buffers, and one poll pass reads the
        TCP buffer before the L7 one), and then after the tick that retries it."""
        flags = e.flags
        outbound = bool(flags & F_OUTBOUND) and plugin.stem is not None  # DNS: counted for the client's container
        conn: Conn | None = None
        if outbound:  # the container that made the connection, even if the process is gone
            conn = self.tcp.connection(e.pid, e.fd, e.conn_start)
            if conn is not None and conn.actual is None:
                now = time.monotonic()
                if now - self._last_resolve >= RESOLVE_EVERY:  # its conntrack read now, not in a second
                    self._last_resolve = now
                    self.tcp.resolve_pending()
            if conn is None or conn.actual is None:
                if not self._defer(e, decoded, since) and conn is None:
                    self.unattributed += 1
                return
            c = self.registry.container(conn.container_id)
        else:
            c = self.registry.container_of_recent(e.pid)
            if c is None and self.registry.process(e.pid) is None and self._defer(e, decoded, since):
                return  # the process's exec event may still be in its buffer
        if c is None:
            return
        requests = decoded if decoded is not None else plugin.parse(
            (e.pid, e.fd, e.conn_start), e.request, e.response, e.duration_ns / 1e9)
        if not requests:
            return
        if plugin.stem is None:
            self.requests += len(requests)
            plugin.record(c.id, requests, e.outbound)
            return
        counted = bool(flags & F_COUNTED)
        if not counted:  # a counted (HTTP) event is here for its span only
            self.requests += len(requests)
            if not outbound:
                for r in requests:
                    self._in[(c.id, e.protocol, r.status)].observe(r.duration)
                return
            assert conn is not None and conn.actual is not None
            actual = conn.actual
            by_method = plugin.stem.method
            for r in requests:
                key = (c.id, e.protocol, conn.destination, actual, r.status, r.method if by_method else "")
                self._out[key].observe(r.duration)
        if outbound and self.spans and "traces" not in c.opt_out:
            assert conn is not None
            tls = bool(flags & F_TLS)
            for r in requests:
                self._span(plugin, c.id, conn, r, r.start_ns or e.start_ns, tls, sampled=counted)

    def _defer(self, e: contract.Event, decoded: list[Request] | None, since: float | None) -> bool:
        """Keep the event for the next ticks; False when it has waited DEFER_GRACE already."""
        now = time.monotonic()
        if since is not None and now - since >= DEFER_GRACE:
            return False
        if len(self._deferred) >= MAX_DEFERRED:
            self._deferred.pop(0)
            self.deferred_dropped += 1
        self._deferred.append((e, decoded, now if since is None else since))
        return True

    def retry_deferred(self) -> None:
        """Events that waited for their connection or process: handled now, kept for the next
        tick (up to DEFER_GRACE seconds after they came), or dropped. The connections they wait
        for are resolved first: one that came after the last resolution would otherwise still
        have no actual destination, and its requests would be lost."""
        with self._lock:
            todo, self._deferred = self._deferred, []
            if todo:
                self._last_resolve = time.monotonic()
                self.tcp.resolve_pending()
            try:
                for e, decoded, since in todo:
                    self._handle(e, self.plugins[e.protocol], decoded, since)
            finally:
                self._flush_spans()

    # ---------------------------------------------------------------- spans --

    def _span(self, plugin: Plugin, cid: str, conn: Conn, r: Request, start_mono: int, tls: bool,
              sampled: bool = False) -> None:
        if not sampled and self.sampling < 1.0 and random.random() >= self.sampling:
            return
        made = None
        if plugin.span_by_path:  # the same request to the same peer: the span made last time
            skey = (conn.destination, conn.actual, tls, plugin.id, r.method, r.path, r.code)
            made = self._made.get(skey)
        if made is None:
            peer, peer_attrs = self._peer(conn)
            span = plugin.span(r, peer, tls)
            if span is not None:
                attrs = peer_attrs.copy()
                if tls:
                    attrs["tls"] = "true"
                attrs.update(span.attributes)
                made = (span.name, attrs, span.status, span.message)
            if plugin.span_by_path:
                if len(self._made) >= MAX_CACHED:
                    self._made.clear()
                self._made[skey] = made or ()
        if not made:  # None, or () cached: the plug-in makes no span of this request
            return
        hit = self._resources.get(cid)
        if hit is None:
            app = service_name(cid)
            hit = (app, {"host.name": self.hostname, "host.id": self.host_id, "service.name": app, "container.id": cid})
            if len(self._resources) >= MAX_CACHED:
                self._resources.clear()
            self._resources[cid] = hit
        self._spans.add(start_mono + self._clock_offset, made[0], hit[0], hit[1], made[1], int(r.duration * 1e9),
                        made[2], made[3])
        self.spans_written += 1

    def _peer(self, conn: Conn) -> tuple[Peer, dict[str, str]]:
        """The peer spans on `conn` show, and its span attributes (copied by each span): the
        actual destination (after NAT) when it is known, as the node agent's
        NewTrace(ActualDestinationIfKnown()) (containers/container.go, common/net.go) — a call to
        a Kubernetes Service shows the pod that answered. The server finds a service's client
        spans by net.peer.name (and port) among its instances' listen addresses
        (inboundSpansFilter), which are the pods', not the Service's; http.url takes the same
        host:port (tracing/tracing.go). Always an address, never
        a DNS name, unless the destination is folded into its domain (several public
        addresses, common.NewDestinationKey: then the domain and the dialled port)."""
        key = (conn.destination, conn.actual)  # the destination holds the dialled address and port
        hit = self._peers.get(key)
        if hit is None:
            actual = conn.destination if conn.actual is None else conn.actual
            if conn.actual == "":  # folded: HostPort.Host() of a destination without an address
                name, port, actual_ip = conn.destination.rpartition(":")[0], conn.dport, ""
            elif actual == conn.destination:
                name, port, actual_ip = conn.dst, conn.dport, conn.dst
            else:
                host, _, p = actual.rpartition(":")
                name = actual_ip = host.strip("[]")
                port = int(p) if p.isdigit() else conn.dport
            peer = Peer(conn.destination if actual == "" else actual, name, port, actual_ip)
            hit = (peer, {"net.peer.name": peer.name, "net.peer.port": str(peer.port),
                          "net.sock.peer.addr": peer.actual_ip})
            if len(self._peers) >= MAX_CACHED:
                self._peers.clear()
            self._peers[key] = hit
        return hit

    def _flush_spans(self) -> None:
        """The spans made so far go to the sink: as one batch of columns when it takes them."""
        spans = self._spans
        if not spans.timestamps:
            return
        self._spans = SpanColumns()
        sink = self.sink
        assert sink is not None
        columns = spans.columns()
        add_columns = getattr(sink, "add_columns", None)
        if add_columns is not None:
            add_columns("otel_traces", columns)
            return
        for row in zip(*columns, strict=True):
            sink.add("otel_traces", row)

    # ------------------------------------------------ the kernel's HTTP counts --

    def _http_live(self) -> list[tuple[Any, str, Hist]]:
        """(kernel key, status, counts) of every entry of the kernel's HTTP map."""
        t = self._http
        if t is None:
            return []
        return [(k, HTTP_STATUS[k.status] if k.status < len(HTTP_STATUS) else "unknown", Hist.of_kernel(v))
                for k, v in t.items()]

    def fold_closed(self) -> None:
        """Outbound HTTP counts of closed connections move to their destination's totals and
        leave the kernel map (housekeeping)."""
        t = self._http
        if t is None:
            return
        now = time.monotonic()
        with self._lock:
            for k, status, h in self._http_live():
                if not k.outbound:
                    self._fold_exited(t, k, status, h)
                    continue
                pid, fd, start = int(k.tgid), int(k.fd), int(k.conn_start)
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
                    assert conn.actual is not None
                    key = (conn.container_id, HTTP, conn.destination, conn.actual, status, "")
                    self._out[key].merge(h)
                self._unknown.pop((pid, fd, start), None)
                t.delete(k)
            if len(self._unknown) > MAX_DEFERRED:
                self._unknown.clear()

    def _fold_exited(self, t: BpfMap, key: Any, status: str, h: Hist) -> None:
        """Inbound counts of a process that is gone but whose exit the registry never handled
        (it was never known to it): folded like on_process does, so the map cannot fill up."""
        tgid = int(key.tgid)
        if self.registry.process(tgid) is not None or os.path.exists(f"{self.registry.procfs}/{tgid}"):
            return
        c = self.registry.container_of_recent(tgid)
        if c is not None:
            self._in[(c.id, HTTP, status)].merge(h)
        t.delete(key)

    def collapsed_name(self, ip: str) -> str | None:
        """The domain outbound connections to `ip` are folded into (agent/l7/dns.py Dns.collapsed):
        for the TCP tracker's labels."""
        dns = self.plugins.get(contract.DNS)
        return dns.collapsed(ip) if isinstance(dns, Dns) else None

    def on_process(self, what: str, proc: Process) -> None:
        """An exited process's inbound HTTP counts move to its container's totals, and its
        kernel entries are freed."""
        t = self._http
        if what != "removed" or t is None:
            return
        with self._lock:
            for st in range(len(HTTP_STATUS)):
                key = t.key(proc.pid, 0, 0, st, 0)
                v = t.get(key)
                if v is None:
                    continue
                if proc.container_id is not None:
                    self._in[(proc.container_id, HTTP, HTTP_STATUS[st])].merge(Hist.of_kernel(v))
                t.delete(key)

    def on_rename(self, old: str, new: str) -> None:
        """Counts of `old` are `new`'s (added to what `new` has); deferred events carry no id."""
        def add(kept: Hist, moved: Hist) -> Hist:
            kept.merge(moved)
            return kept

        with self._lock:
            rekey(self._out, old, new, add)
            rekey(self._in, old, new, add)
            for plugin in self.plugins.values():
                plugin.rename(old, new)

    def forget_containers(self, gone: list[str]) -> None:
        if not gone:
            return
        dead = set(gone)
        with self._lock:
            for ok in [k for k in self._out if k[0] in dead]:
                del self._out[ok]
            for ik in [k for k in self._in if k[0] in dead]:
                del self._in[ik]
            for plugin in self.plugins.values():
                plugin.forget(dead)

    # -------------------------------------------------------------- metrics --

    def collect(self, f: Families) -> None:
        """Read-only: the kernel's live HTTP counts are added to copies of the totals."""
        with self._lock:
            apps = {c.id: c.app_id for c in self.registry.containers()}
            # by metric stem: plug-ins that share one (HTTP/1 and HTTP/2) make one series
            outbound: dict[tuple[str, Stem, str, str, str, str], Hist] = defaultdict(Hist)
            inbound: dict[tuple[str, Stem, str], Hist] = defaultdict(Hist)
            http = self.plugins[HTTP].stem
            assert http is not None
            for (cid, proto, dst, actual, status, method), h in self._out.items():
                stem = self.plugins[proto].stem
                if stem is not None:
                    outbound[(cid, stem, dst, actual, status, method)].merge(h)
            for (cid, proto, status), h in self._in.items():
                stem = self.plugins[proto].stem
                if stem is not None:
                    inbound[(cid, stem, status)].merge(h)
            for k, status, h in self._http_live():
                if k.outbound:
                    conn = self.tcp.connection(int(k.tgid), int(k.fd), int(k.conn_start))
                    if conn is not None and conn.actual is not None:
                        outbound[(conn.container_id, http, conn.destination, conn.actual, status, "")].merge(h)
                else:
                    c = self.registry.container_of_recent(int(k.tgid))
                    if c is not None:
                        inbound[(c.id, http, status)].merge(h)
            hists: dict[tuple[str, Stem, str, str], Hist] = defaultdict(Hist)
            for (cid, stem, dst, actual, status, method), h in outbound.items():
                if cid not in apps:
                    continue
                p, unit = stem.protocol, stem.unit
                lbl = {"container_id": cid, "app_id": apps[cid], "destination": dst, "actual_destination": actual}
                by = {"method": method} if stem.method else {}
                f.counter(f"container_{p}_{unit}_total", f"outbound {p} {unit}", h.count, **lbl, status=status, **by)
                # the node agent's histograms have no status: one per destination, summed below
                if stem.histogram:
                    hists[(cid, stem, dst, actual)].merge(h)
            for (cid, stem, dst, actual), h in hists.items():
                p, unit = stem.protocol, stem.unit
                f.histogram(f"container_{p}_{unit}_duration_seconds_total", f"outbound {p} {unit} by duration", h,
                            container_id=cid, app_id=apps[cid], destination=dst, actual_destination=actual)
            in_hists: dict[tuple[str, Stem], Hist] = defaultdict(Hist)
            for (cid, stem, status), h in inbound.items():
                if cid not in apps:
                    continue
                p, unit = stem.protocol, stem.unit
                f.counter(f"container_{p}_inbound_{unit}_total", f"inbound {p} {unit}", h.count, container_id=cid,
                          app_id=apps[cid], status=status)
                if stem.histogram:
                    in_hists[(cid, stem)].merge(h)
            for (cid, stem), h in in_hists.items():
                p, unit = stem.protocol, stem.unit
                f.histogram(f"container_{p}_inbound_{unit}_duration_seconds_total", f"inbound {p} {unit} by duration",
                            h, container_id=cid, app_id=apps[cid])
            for plugin in self.plugins.values():
                plugin.collect(f, apps)

    def self_metrics(self, f: Families) -> None:
        f.counter("coroot_agent_l7_requests_total", "L7 requests decoded from the kernel's pairs", self.requests)
        for what, n in self.kernel_stats().items():
            f.counter("coroot_agent_l7_kernel_total", "the kernel side's request accounting: requests recognised, "
                      "requests that replaced an unanswered one, pairs made, HTTP requests its map had no room for, "
                      "reads/writes whose tail call into the L7 program failed",
                      n, what=what)
        f.counter("coroot_agent_l7_spans_total", "spans handed to the store", self.spans_written)
        f.counter("coroot_agent_l7_unattributed_total",
                  "outbound requests dropped: their connection was never seen", self.unattributed)
        f.counter("coroot_agent_l7_deferred_dropped_total",
                  "events dropped because too many waited for their connection", self.deferred_dropped)


class L7Collector:
    """TRANSITIONAL: the prometheus collector run.py registers until it drives components."""

    def __init__(self, tracer: L7Tracer, const: dict[str, str]) -> None:
        self.tracer = tracer
        self.const = const

    def collect(self) -> Any:
        f = Families(self.const)
        self.tracer.tcp.resolve_pending()
        self.tracer.collect(f)
        self.tracer.self_metrics(f)
        yield from f
