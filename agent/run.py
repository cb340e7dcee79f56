"""The running agent: wires tracefs, headers, the BPF loader, the registry, collectors and the
HTTP API together, polls event buffers on one thread, and shuts everything down in order.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from agent import __version__, caps, units
from agent.api.server import ApiServer, Response
from agent.config import Config
from agent.containers.registry import Registry
from agent.ebpf import headers as headers_mod
from agent.ebpf import loader, tracefs
from agent.l7.tls import TlsAttacher
from agent.l7.tracer import L7Collector, L7Tracer, Masks
from agent.logs.collector import LogCollector
from agent.logs.pii import Scrubber
from agent.metrics import Families, host_labels
from agent.net.public import PublicFilter
from agent.net.tcp import TcpCollector, TcpTracker
from agent.net.tcp import seed as seed_tcp
from agent.node.cgroups import CgroupCollector
from agent.node.node import NodeCollector
from agent.profiling.profiler import Profiler
from agent.query import StoreLock, api_handler, socket_path
from agent.sinks.batcher import Sink, SinkCollector
from agent.sinks.history import MetricHistory
from agent.sinks.remote_write import RemoteWriter, WriterCollector
from agent.sinks.spool import Spool
from agent.sinks.store import Store, StoreError

log = logging.getLogger(__name__)

POLL_MS = 100
HOUSEKEEPING_SECONDS = 1.0
RESYNC_SECONDS = 30.0


class SelfCollector:
    """The agent's own health: events lost per buffer, what the registry tracks."""

    def __init__(self, agent: Agent, const: dict[str, str]) -> None:
        self.agent = agent
        self.const = const

    def collect(self) -> Iterator[Metric]:
        f = Families(self.const)
        a = self.agent
        bpf = a.bpf
        if bpf is not None:
            for buf, n in bpf.lost().items():
                f.counter("coroot_agent_lost_events_total", "events the kernel could not hand to the agent (full buffer)", n, what=buf)
            f.gauge("coroot_agent_bpf_compile_seconds", "time to compile and attach the BPF programs", bpf.compile_seconds)
            for prog, (ns, runs) in bpf.run_seconds().items():
                if runs:  # only with kernel.bpf_stats_enabled=1
                    f.counter("coroot_agent_bpf_program_run_seconds_total", "time spent in the program (kernel.bpf_stats_enabled)", ns / 1e9, program=prog)
                    f.counter("coroot_agent_bpf_program_runs_total", "program runs (kernel.bpf_stats_enabled)", runs, program=prog)
            for prog, n in bpf.missed_runs().items():
                f.counter("coroot_agent_bpf_missed_runs_total", "program runs the kernel skipped (it fired while another BPF program ran on that CPU)", n, program=prog)
        prof = a.profiler
        if prof is not None:
            f.counter("coroot_agent_profiler_samples_total", "CPU samples written to the store", prof.samples_written)
            f.counter("coroot_agent_profiler_dropped_samples_total", "samples not counted: the kernel's count map was full", prof.drops)
            for cache, n in prof.symbols.sizes.items():
                f.gauge("coroot_agent_profiler_symbol_cache_entries", "entries in the symbolizer's caches", n, cache=cache)
        if a.tls is not None:
            f.gauge("coroot_agent_tls_libraries", "OpenSSL libraries with uprobes attached", len(a.tls.libraries))
        f.gauge("coroot_agent_tracked_processes", "processes the registry knows", len(a.registry.pids()))
        f.gauge("coroot_agent_tracked_containers", "containers reported", len(a.registry.containers()))
        f.counter("coroot_agent_process_events_total", "process events received from the kernel", a.registry.events_seen)
        yield from f


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
        self.tcp = TcpTracker(self.registry, PublicFilter(cfg.track_public_networks),
                              units.parse_port_range(cfg.ephemeral_port_range), procfs=cfg.procfs_root)
        self.registry.subscribe(self.tcp.on_process)
        self.profiler: Profiler | None = None
        self.logs: LogCollector | None = None
        self.l7: L7Tracer | None = None
        self.tls: TlsAttacher | None = None
        self.bpf: loader.Loaded | None = None
        self.metrics = CollectorRegistry(auto_describe=False)
        self.api: ApiServer | None = None
        self.store: Store | None = None
        self.sink: Sink | None = None
        self._lock: StoreLock | None = None
        self.writer: RemoteWriter | None = None
        self.history: MetricHistory | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.started_at = 0.0

    def families(self) -> list[str]:
        fams = ["proc", "tcp"]
        if self.cfg.l7_tracing:
            fams.append("l7")
        if self.cfg.log_metrics_enabled or self.cfg.log_entries_enabled:
            fams.append("logs")
        if self.cfg.profiler_enabled:
            fams.append("profiler")
        return fams

    def start(self) -> None:
        t0 = time.monotonic()
        log.info("coroot-agent %s starting", __version__)
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
        n = self.registry.scan()
        log.info("registry: %d processes, %d containers", n, len(self.registry.containers()))
        log.info("compiling BPF programs (%s); this takes a few seconds", ", ".join(self.families()))
        const = host_labels(self.cfg.procfs_root, state_dir=self.cfg.storage_path)
        if "logs" in self.families():
            c = self.cfg
            scrubber = Scrubber(emails=c.log_mask_emails, cards=c.log_mask_cards, tokens=c.log_mask_tokens,
                                secrets=c.log_mask_secrets, headers=c.log_mask_headers,
                                cloud_keys=c.log_mask_cloud_keys, ipv4=c.log_mask_ipv4)
            self.logs = LogCollector(self.registry, self.sink, metrics=c.log_metrics_enabled,
                                     entries=c.log_entries_enabled,
                                     patterns_per_container=c.log_patterns_per_container,
                                     scrubber=scrubber, const_labels=const)
        handlers = {"proc_events": self.registry.handle_event, "tcp_events": self.tcp.handle_event}
        if self.logs is not None:
            handlers["log_events"] = self.logs.handle_event
        defines: dict[str, str | int] = {}
        if "l7" in self.families():
            cfg = self.cfg
            self.l7 = L7Tracer(self.registry, self.tcp, self.sink, spans=cfg.tracer_enabled,
                               sampling=cfg.traces_sampling, exclude_paths=cfg.exclude_http_requests_by_path,
                               max_fqdns=cfg.max_fqdns_per_container, host_id=const["machine_id"],
                               masks=Masks(url_query=cfg.mask_url_query, sql_literals=cfg.mask_sql_literals,
                                           redis_values=cfg.mask_redis_values, url_path=cfg.mask_url_path))
            handlers["l7_events"] = self.l7.handle_event
            defines = {"CA_SELF_TGID": os.getpid(), "CA_L7_PAYLOAD": cfg.l7_payload_size,
                       "CA_L7_SAMPLE": L7Tracer.kernel_sampling(cfg.tracer_enabled, cfg.traces_sampling)}
        self.bpf = loader.load(self.families(), handlers, hdr, defines=defines,
                               sample_hz=self.cfg.profiling_frequency)
        # Processes that started between the scan and the attach are caught here.
        self.registry.scan()
        self.tcp.attach(self.bpf.table("conns"))
        if "profiler" in self.families():
            self.profiler = Profiler(self.registry, self.sink, self.cfg.profiling_frequency,
                                     self.cfg.profiling_interval)
            self.registry.subscribe(self.profiler.on_process)
            self.profiler.attach(self.bpf.bpf)
        n = seed_tcp(self.tcp, self.registry.pids())
        log.info("TCP: %d connections open before the agent started are tracked", n)
        if self.l7 is not None:
            self.l7.attach(self.bpf.table("l7_http"), self.bpf.table("l7_stats"))
            self.registry.subscribe(self.l7.on_process)
            self.tls = TlsAttacher(self.bpf.bpf, self.cfg.procfs_root)
            self.tls.scan(self.registry.pids())
            self.registry.subscribe(self.tls.on_process)
            log.info("TLS: OpenSSL uprobes on %d libraries", len(self.tls.libraries))
        # Probes attached: give up what is not needed any more, before any thread of ours (or
        # of the store engine) starts, so that every thread runs with the smaller set.
        self._drop_capabilities()
        self._open_store()
        if self.profiler is not None:
            self.profiler.start()
        if self.logs is not None:
            self.logs.start()

        for c in (NodeCollector(const, self.cfg.procfs_root), CgroupCollector(self.registry, const),
                  TcpCollector(self.tcp, const), SelfCollector(self, const)):
            self.metrics.register(c)
        if self.sink is not None:
            self.metrics.register(SinkCollector(self.sink, const))
        if self.logs is not None:
            self.metrics.register(self.logs)
        if self.l7 is not None:
            self.metrics.register(L7Collector(self.l7, const))
        self.metrics.register(self.api.collector())
        self._start_metrics_shipping(const)
        self.api.start()
        self._poller = threading.Thread(target=self._poll_loop, name="bpf-poll", daemon=True)
        self._poller.start()
        self.started_at = time.monotonic()
        shown = f"[{host}]" if ":" in host else host
        log.info("ready in %.1fs: serving /metrics on http://%s:%d", self.started_at - t0, shown, self.api.port)

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
        sink.start()

    def _start_metrics_shipping(self, const: dict[str, str]) -> None:
        cfg = self.cfg
        instance = socket.gethostname()
        if cfg.metrics_endpoint:
            spool = Spool(os.path.join(cfg.wal_dir, "remote_write"), cfg.max_spool_size)
            self.writer = RemoteWriter(
                cfg.metrics_endpoint, self.metrics, spool, interval=cfg.scrape_interval,
                user=cfg.prometheus_user, password=cfg.prometheus_password,
                headers=cfg.prometheus_custom_headers, api_key=cfg.api_key,
                skip_verify=cfg.insecure_skip_verify, ca_file=cfg.ca_file, instance=instance,
            )
            self.metrics.register(WriterCollector(self.writer, const))
            self.writer.start()
            log.info("remote_write to %s every %gs", cfg.metrics_endpoint, cfg.scrape_interval)
        elif self.store is not None and self.store.embedded and self.sink is not None:
            self.history = MetricHistory(self.metrics, self.sink, cfg.scrape_interval, instance)
            self.history.start()
            log.info("no remote_write URL: metric history goes to the store's metrics table every %gs",
                     cfg.scrape_interval)

    def _api_processes(self, query: str, _body: bytes) -> Response:
        """Every process the registry knows: pid, comm, container and opt-outs (?pid=N for one)."""
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
        return Response(200, json.dumps(out).encode() + b"\n")

    def _health(self) -> tuple[bool, str]:
        if self._poller is None or not self._poller.is_alive():
            return False, "event polling is not running"
        return True, "ok"

    def _poll_loop(self) -> None:
        assert self.bpf is not None
        next_housekeeping = next_resync = time.monotonic()
        while not self._stop.is_set():
            try:
                self.bpf.poll(POLL_MS)
                now = time.monotonic()
                if now >= next_housekeeping:
                    gone = self.registry.housekeeping()
                    self.tcp.forget_containers(gone)
                    self.tcp.resolve_pending()
                    if self.l7 is not None:
                        self.l7.forget_containers(gone)
                        self.l7.retry_deferred()
                        self.l7.fold_closed()
                    if self.tls is not None:
                        self.tls.tick()
                    next_housekeeping = now + HOUSEKEEPING_SECONDS
                if now >= next_resync:
                    self.registry.scan()
                    next_resync = now + RESYNC_SECONDS
            except Exception:  # noqa: BLE001 - one bad event must not stop the agent
                log.exception("event loop")
                time.sleep(0.1)

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Detach probes, stop serving. Safe to call twice."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=3)
            self._poller = None
        if self.profiler is not None:
            self.profiler.close()  # its last drain needs the BPF maps
            self.profiler = None
        if self.logs is not None:
            self.logs.close()
            self.logs = None
        # The last scrape (remote_write, metric history) still reads the live BPF counters...
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.history is not None:
            self.history.close()
            self.history = None
        # ...and nothing reads the maps once they are freed.
        if self.l7 is not None:
            self.l7.attach(None, None)
        self.tcp.attach(None)
        if self.bpf is not None:
            self.bpf.close()
            self.bpf = None
        if self.sink is not None:
            self.sink.close()
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
        log.info("stopped")
