"""The running agent: a list of components (agent/component.py) — tracers, collectors, sinks —
that `Agent` attaches, starts, ticks, scrapes and closes in order, around the pieces that are
not components: tracefs, headers, the BPF loader, the registry, the store and the HTTP API.
One thread polls the event buffers and ticks the components; the API's scrapes and the metric
shippers only read them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from agent import __version__, caps, memory, units
from agent.api.server import ApiServer, Response
from agent.component import Component
from agent.config import Config
from agent.containers.apptype import AppTypeCollector
from agent.containers.disk import DiskCollector
from agent.containers.registry import Registry
from agent.containers.restarts import RestartCounter
from agent.containers.runtimes.resolver import runtime_resolver
from agent.containers.systemd import SystemdUnits
from agent.containers.taskstats import DelayCollector
from agent.ebpf import headers as headers_mod
from agent.ebpf import loader, tracefs
from agent.l7.tls import TlsAttacher
from agent.l7.tracer import L7Tracer, Masks
from agent.logs.collector import LogCollector
from agent.logs.pii import Scrubber
from agent.memory import MemoryMetrics
from agent.metrics import Families, host_labels
from agent.net.pinger import Pinger
from agent.net.public import PublicFilter
from agent.net.tcp import TcpTracker
from agent.node.cgroups import CgroupCollector
from agent.node.node import NodeCollector
from agent.profiling.profiler import Profiler
from agent.query import StoreLock, api_handler, socket_path
from agent.runtime.dotnet import DotNetMetrics
from agent.runtime.jvm import JvmMetrics
from agent.runtime.nodejs import NodejsMetrics
from agent.runtime.python import PythonGilMetrics
from agent.sinks.batcher import Sink
from agent.sinks.history import MetricHistory
from agent.sinks.remote_write import RemoteWriter
from agent.sinks.spool import Spool
from agent.sinks.store import Store, StoreError

log = logging.getLogger(__name__)

POLL_MS = 100
HOUSEKEEPING_SECONDS = 1.0
RESYNC_SECONDS = 30.0
POLLER_JOIN_SECONDS = 1.0
RUNTIME_STARTUP_WAIT = 2.0  # seconds start-up waits for the runtimes' names of running containers


class ComponentsCollector:
    """The one prometheus collector: each component's series and self-metrics, in list order,
    with the host's labels on every series. A component that fails is logged and skipped; the
    others still answer."""

    def __init__(self, components: Sequence[Component], const: dict[str, str]) -> None:
        self.components = tuple(components)
        self.const = const

    def collect(self) -> Iterator[Metric]:
        f = Families(self.const)
        for c in self.components:
            try:
                c.collect(f)
                c.self_metrics(f)
            except Exception:  # noqa: BLE001 - one component must not empty the scrape
                log.exception("%s: collecting its metrics", c.name)
        yield from f


class RegistryMetrics(Component):
    """What the registry tracks, as self-metrics."""

    name = "registry"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def self_metrics(self, f: Families) -> None:
        r = self.registry
        f.gauge("coroot_agent_tracked_processes", "processes the registry knows", len(r.pids()))
        f.gauge("coroot_agent_tracked_containers", "containers reported", len(r.containers()))
        f.counter("coroot_agent_process_events_total", "process events received from the kernel", r.events_seen)
        f.counter("coroot_agent_processes_placed_from_events_total", "processes gone before /proc could be read, "
                  "placed in a container by their fork/exec event's cgroup", r.from_event)


def _overrides(c: Component, method: str) -> bool:
    return getattr(type(c), method) is not getattr(Component, method)


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = Registry(
            procfs=cfg.procfs_root,
            cgroupfs=cfg.cgroupfs_root,
            min_container_age=cfg.min_container_age,
            dead_container_ttl=cfg.dead_container_ttl,
            allowlist=cfg.container_allowlist,
            denylist=cfg.container_denylist,
        )
        self.resolver = runtime_resolver(cfg)
        self.registry.use_resolver(self.resolver)
        self.tcp = TcpTracker(self.registry, PublicFilter(cfg.track_public_networks),
                              units.parse_port_range(cfg.ephemeral_port_range), procfs=cfg.procfs_root)
        # In start order; closed in reverse. What reads the BPF maps comes after `BpfStats`
        # (which frees them) and what writes rows after the sink (which flushes them).
        self.components: list[Component] = []
        self.bpf: loader.Loaded | None = None
        self.metrics = CollectorRegistry(auto_describe=False)
        self.api: ApiServer | None = None
        self.store: Store | None = None
        self.sink: Sink | None = None
        self._lock: StoreLock | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.started_at = 0.0
        self.jvm: JvmMetrics | None = None
        self.dotnet: DotNetMetrics | None = None
        self.tls: TlsAttacher | None = None

    def families(self) -> list[str]:
        return self.cfg.probe_families

    def start(self) -> None:
        t0 = time.monotonic()
        log.info("coroot-agent %s starting", __version__)
        memory.tune_malloc()
        mounts = tracefs.ensure_mounted()
        if not mounts.ok:
            raise RuntimeError(f"tracefs is not available ({mounts.error}); run `coroot-agent check`")
        hdr = headers_mod.resolve()
        if not hdr.found:
            raise RuntimeError(hdr.detail)
        log.info("kernel headers: %s", hdr.detail)
        host, port = self.cfg.listen_address
        sock = socket_path(self.cfg)
        os.makedirs(os.path.dirname(sock), mode=0o755, exist_ok=True)
        try:  # bind before the slow part, so a taken port fails at once
            self.api = ApiServer(host, port, self.metrics, self.cfg.api_key, self._health,
                                 unix_path=sock, unix_group=self.cfg.api_socket_group)
        except OSError as e:
            what = e.strerror or str(e)
            if "group" in what:
                raise RuntimeError(f"api_socket_group: {what}") from None
            if sock in what:
                raise RuntimeError(f"cannot serve the local API socket: {what}; choose another --api-socket") from None
            raise RuntimeError(f"cannot listen on {host}:{port}: {what}; choose another --listen") from None
        if not self.cfg.api_key:
            log.info("no api_key: /api/* answers only on %s (root%s); TCP clients get 403", sock,
                     f" and group {self.cfg.api_socket_group}" if self.cfg.api_socket_group else "")
        self.api.route("/api/processes", self._api_processes)
        self._check_capabilities()
        self._prepare_store()
        assert self.sink is not None
        self.components = [self.sink]  # closed (flushed) even if the rest never comes
        n = self.registry.scan()
        log.info("registry: %d processes, %d containers", n, len(self.registry.containers()))
        log.info("compiling BPF programs (%s); this takes a few seconds", ", ".join(self.families()))
        const = host_labels(self.cfg.procfs_root, state_dir=self.cfg.storage_path)
        parts = self._components(const)
        handlers: dict[str, loader.Handler] = {"proc_events": self.registry.handle_event,
                                               "tcp_events": self.tcp.handle_event}
        defines: dict[str, str | int] = {}
        for c in parts:
            if isinstance(c, LogCollector):
                handlers["log_events"] = c.handle_event
            elif isinstance(c, L7Tracer):
                handlers["l7_events"] = loader.Batched(c.handle_events)  # many records a call
                cfg = self.cfg
                defines = {"CA_SELF_TGID": os.getpid(), "CA_L7_PAYLOAD": cfg.l7_payload_size,
                           "CA_L7_SAMPLE": L7Tracer.kernel_sampling(cfg.tracer_enabled, cfg.traces_sampling)}
        if self.cfg.tcp_events_pages:
            defines["CA_TCP_EVENTS_PAGES"] = self.cfg.tcp_events_pages
        self.bpf = loader.load(self.families(), handlers, hdr, defines=defines,
                               sample_hz=self.cfg.profiling_frequency)
        self.components = [loader.BpfStats(self.bpf), self.sink, *parts]
        # Processes that started between the scan and the attach are caught here.
        self.registry.scan()
        for c in self.components:
            c.attach(self.bpf)
        for c in self.components:  # after attach: a listener may write to a map
            if _overrides(c, "on_process"):
                self.registry.subscribe(c.on_process)
            if _overrides(c, "on_rename"):
                self.registry.subscribe_renames(c.on_rename)
        # Probes attached: give up what is not needed any more, before any thread of ours (or
        # of the store engine) starts, so that every thread runs with the smaller set.
        self._drop_capabilities()
        self._open_store()
        for c in self.components:
            c.start()
        # The containers running already: their runtimes' names before the first scrape, when
        # the runtimes answer quickly (one that is down or slow leaves the cgroup-derived ids).
        t = time.monotonic()
        if not self.resolver.wait_idle(RUNTIME_STARTUP_WAIT):
            log.info("container runtimes: lookups still running after %gs; ids change when they answer",
                     RUNTIME_STARTUP_WAIT)
        n = len(self.registry.apply_runtime_answers())
        log.info("container runtimes: %d containers named in %.2fs", n, time.monotonic() - t)
        self.metrics.register(ComponentsCollector(self.components, const))
        self.metrics.register(self.api.collector())
        self.api.start()
        self._poller = threading.Thread(target=self._poll_loop, name="bpf-poll", daemon=True)
        self._poller.start()
        self.started_at = time.monotonic()
        shown = f"[{host}]" if ":" in host else host
        log.info("ready in %.1fs: serving /metrics on http://%s:%d", self.started_at - t0, shown, self.api.port)

    def _components(self, const: dict[str, str]) -> list[Component]:
        """Everything after the BPF programs and the sink, in start order: the tracers, the
        collectors, the metric shipper (whose last scrape follows the profiler's and the logs'
        last flush, as it closes after them), then the profiler and the logs."""
        cfg = self.cfg
        out: list[Component] = [self.resolver, self.tcp]
        if "l7" in self.families():
            l7 = L7Tracer(self.registry, self.tcp, self.sink, spans=cfg.tracer_enabled,
                          sampling=cfg.traces_sampling, exclude_paths=cfg.exclude_http_requests_by_path,
                          max_fqdns=cfg.max_fqdns_per_container, host_id=const["machine_id"],
                          masks=Masks(url_query=cfg.mask_url_query, sql_literals=cfg.mask_sql_literals,
                                      redis_values=cfg.mask_redis_values, url_path=cfg.mask_url_path))
            out.append(l7)
            self.tcp.names = l7.collapsed_name  # destinations folded into their DNS domain
            self.tls = TlsAttacher(procfs=cfg.procfs_root, pids=self.registry.pids)
            out.append(self.tls)
        systemd = SystemdUnits(self.registry, procfs=cfg.procfs_root)
        out += [systemd, NodeCollector(cfg.procfs_root), CgroupCollector(self.registry, systemd=systemd),
                AppTypeCollector(self.registry, procfs=cfg.procfs_root, runtimes=cfg.l7_tracing),
                RestartCounter(self.registry), DiskCollector(self.registry, procfs=cfg.procfs_root),
                RegistryMetrics(self.registry), DelayCollector(self.registry, interval=cfg.scrape_interval)]
        if cfg.pinger_enabled:
            out.append(Pinger(self.registry, self.tcp, interval=cfg.scrape_interval, procfs=cfg.procfs_root,
                              ns_helper=cfg.drop_capabilities and "CAP_SYS_ADMIN" not in caps.keep_after_start()))
        if cfg.jvm_enabled:
            self.jvm = JvmMetrics(self.registry, procfs=cfg.procfs_root)
            out.append(self.jvm)
        if cfg.dotnet_enabled:
            self.dotnet = DotNetMetrics(self.registry, procfs=cfg.procfs_root, interval=cfg.dotnet_interval)
            out.append(self.dotnet)
        if "python" in self.families():
            out.append(PythonGilMetrics(self.registry, procfs=cfg.procfs_root))
        if "nodejs" in self.families():
            out.append(NodejsMetrics(self.registry, procfs=cfg.procfs_root))
        shipper = self._metrics_shipper()
        if shipper is not None:
            out.append(shipper)
        if "profiler" in self.families():
            out.append(Profiler(self.registry, self.sink, cfg.profiling_frequency, cfg.profiling_interval,
                                host_id=const["machine_id"], native_unwinding=cfg.native_unwinding))
        if "logs" in self.families():
            scrubber = Scrubber(emails=cfg.log_mask_emails, cards=cfg.log_mask_cards, tokens=cfg.log_mask_tokens,
                                secrets=cfg.log_mask_secrets, headers=cfg.log_mask_headers,
                                cloud_keys=cfg.log_mask_cloud_keys, ipv4=cfg.log_mask_ipv4)
            out.append(LogCollector(self.registry, self.sink, metrics=cfg.log_metrics_enabled,
                                    entries=cfg.log_entries_enabled,
                                    patterns_per_container=cfg.log_patterns_per_container,
                                    scrubber=scrubber, host_id=const["machine_id"]))
        # last to start: it gives the start-up code pages back
        out.append(MemoryMetrics(interval=cfg.scrape_interval,
                                 engine_resident=self.store.engine_resident if self.store else None))
        return out

    def _check_capabilities(self) -> None:
        have = caps.held()
        lost = caps.lost_features(have)
        fatal = [cap for cap, _ in lost if cap in ("CAP_BPF", "CAP_PERFMON")]
        if fatal:
            raise RuntimeError(f"missing {', '.join(fatal)}: no probe can load; grant {', '.join(fatal)} "
                               f"(kernel 5.8+) or {caps.LEGACY_BPF}, and run `coroot-agent check`")
        for cap, what in lost:
            log.warning("without %s: %s", cap, what)

    def _drop_capabilities(self) -> None:
        if not self.cfg.drop_capabilities:
            log.info("capabilities kept (--keep-capabilities)")
            return
        try:
            dropped = caps.drop_to(caps.keep_after_start())
        except OSError as e:
            log.warning("could not drop capabilities: %s", e)
            return
        log.info("capabilities: kept %s; dropped %d others; no_new_privs set",
                 ", ".join(sorted(caps.held())) or "none", len(dropped))

    def _prepare_store(self) -> None:
        """The store's objects and lock, without opening it: the engine starts threads, which
        must start after the capabilities are dropped."""
        cfg = self.cfg
        store = Store(cfg)  # a bad address fails here, with the fix in the message
        if store.embedded:
            lock = StoreLock.for_config(cfg)
            deadline = time.monotonic() + 10
            assert self.api is not None
            h = self.api.host
            info = {"pid": os.getpid(), "listen": f"[{h}]:{self.api.port}" if ":" in h else f"{h}:{self.api.port}",
                    "socket": socket_path(cfg)}
            while not lock.acquire(info):
                if time.monotonic() > deadline:
                    holder = lock.holder() or {}
                    raise RuntimeError(f"the store at {cfg.storage_path} is held by another process "
                                       f"(pid {holder.get('pid', '?')}); use another --storage-path")
                time.sleep(0.2)
            self._lock = lock
        self.store = store
        spool = Spool(os.path.join(cfg.wal_dir, "clickhouse"), cfg.store_spool_size)
        self.sink = Sink(store, spool, max_rows=cfg.store_batch_rows, max_age=cfg.store_batch_age)
        assert self.api is not None
        self.api.route("/api/query", api_handler(store))

    def _open_store(self) -> None:
        store, sink = self.store, self.sink
        assert store is not None and sink is not None
        if store.embedded:
            log.info("opening %s", store.describe())
            store.open()
            store.migrate()
        else:
            log.info("using %s", store.describe())
            try:
                store.open()
                store.migrate()
            except StoreError as e:
                log.error("%s; spooling to disk and retrying", e)

    def _metrics_shipper(self) -> Component | None:
        """remote_write when a URL is set; else, with the embedded store, the metric history."""
        cfg = self.cfg
        instance = socket.gethostname()
        if cfg.metrics_endpoint:
            spool = Spool(os.path.join(cfg.wal_dir, "remote_write"), cfg.max_spool_size)
            log.info("remote_write to %s every %gs", cfg.metrics_endpoint, cfg.scrape_interval)
            return RemoteWriter(
                cfg.metrics_endpoint, self.metrics, spool, interval=cfg.scrape_interval,
                user=cfg.prometheus_user, password=cfg.prometheus_password,
                headers=cfg.prometheus_custom_headers, api_key=cfg.api_key,
                skip_verify=cfg.insecure_skip_verify, ca_file=cfg.ca_file, instance=instance,
            )
        if self.store is not None and self.store.embedded and self.sink is not None:
            log.info("no remote_write URL: metric history goes to the store's metrics table every %gs",
                     cfg.scrape_interval)
            return MetricHistory(self.metrics, self.sink, cfg.scrape_interval, instance)
        return None

    def _api_processes(self, query: str, _body: bytes) -> Response:
        """Every process the registry knows: pid, comm, container and opt-outs (?pid=N for one);
        for a JVM, `jvm`: where its counters are read from, or why there are none; for a .NET process,
        `dotnet`: its diagnostics socket and whether its counters are read, or why not; `tls`: the TLS
        libraries found in it and whether they are traced, or why not (once it was looked at)."""
        want = parse_qs(query).get("pid")
        pids = [int(p) for p in want if p.isdigit()] if want else sorted(self.registry.pids())
        out = []
        for pid in pids:
            p = self.registry.process(pid)
            if p is None:
                continue
            c = self.registry.container_of(pid)
            out.append({"pid": p.pid, "comm": p.comm, "cgroup": p.cgroup_path,
                        "container_id": c.id if c else None, "opt_out": sorted(p.opt_out)})
            jvm = self.jvm.describe(pid) if self.jvm is not None else None
            if jvm is not None:
                out[-1]["jvm"] = jvm
            dotnet = self.dotnet.describe(pid) if self.dotnet is not None else None
            if dotnet is not None:
                out[-1]["dotnet"] = dotnet
            tls = self.tls.describe(pid) if self.tls is not None else None
            if tls is not None:
                out[-1]["tls"] = tls
        return Response(200, json.dumps(out).encode() + b"\n")

    def _health(self) -> tuple[bool, str]:
        if self._poller is None or not self._poller.is_alive():
            return False, "event polling is not running"
        return True, "ok"

    def _poll_loop(self) -> None:
        next_housekeeping = next_resync = time.monotonic()
        while not self._stop.is_set():
            try:
                assert self.bpf is not None
                self.bpf.poll(POLL_MS)
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._tick(now)
                    next_housekeeping = now + HOUSEKEEPING_SECONDS
                if now >= next_resync:
                    self.registry.scan()
                    next_resync = now + RESYNC_SECONDS
            except Exception:  # noqa: BLE001 - one bad event must not stop the agent
                log.exception("event loop")
                time.sleep(0.1)

    def _tick(self, now: float) -> None:
        """Housekeeping: the registry forgets dead containers, then each component ticks, in
        list order (the TCP tracker labels new connections before the L7 tracer retries the
        requests that waited for them)."""
        gone = self.registry.housekeeping()
        for c in self.components:
            try:
                c.tick(now, gone)
            except Exception:  # noqa: BLE001 - the others still tick
                log.exception("%s: tick", c.name)

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Detach every probe (in the background: the kernel takes ~1 s for them all, while the
        rest closes), stop polling, read what the buffers hold and tick once more, close the
        components in reverse order (each flushes), then the store and the API. Safe to call
        twice."""
        t0 = time.monotonic()
        log.info("stopping")
        self._stop.set()
        if self.bpf is not None:
            self.bpf.begin_detach()
        poller_gone = True
        if self._poller is not None:
            self._poller.join(timeout=POLLER_JOIN_SECONDS)
            poller_gone = not self._poller.is_alive()
            self._poller = None
        if self.bpf is not None:
            if poller_gone:  # else it still polls: leave the buffers and ticks to it
                try:
                    self.bpf.poll(0)
                    self._tick(time.monotonic())
                except Exception:  # noqa: BLE001
                    log.exception("the last tick")
            else:
                log.warning("event polling did not stop within %gs", POLLER_JOIN_SECONDS)
        for c in reversed(self.components):
            t = time.monotonic()
            try:
                c.close()
            except Exception:  # noqa: BLE001 - the others still close and flush
                log.exception("closing %s", c.name)
            log.debug("closed %s in %.2fs", c.name, time.monotonic() - t)
        self.components = []
        self.bpf = None
        self.sink = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.api is not None:
            self.api.stop()
            self.api = None
        log.info("stopped in %.2fs", time.monotonic() - t0)
