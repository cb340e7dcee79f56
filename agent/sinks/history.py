"""Standalone metric history: with no remote_write URL and the embedded store, every scrape
interval the agent's registry is written to the store's `metrics` table (Coroot's schema), so
`coroot-agent query` can answer "what was the connect rate an hour ago". Rows are those the
Coroot server's collector writes for a remote_write request (coroot: collector/metrics.go), which
its PromQL engine reads back (prom/clickhouse*.go): Labels without `__name__`, keys sorted (it
groups series by the Labels map), MetricHash the Prometheus label-set signature, and one
`metrics_metadata` row per metric family (name and type as a Prometheus scraping /metrics would
send them) the first time the family is seen. A component (agent/component.py): its thread
scrapes; `close()` scrapes a last time (the other components have closed and flushed by then)."""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry

from agent.component import Component
from agent.hashing import fnv1a64
from agent.metrics import exposed_family
from agent.sinks import schema
from agent.sinks.batcher import Sink

log = logging.getLogger(__name__)

_SEP = b"\xff"


def series_hash(labels: list[tuple[str, str]]) -> int:
    """The Prometheus signature of a label set (`__name__` included), as the server's collector
    computes MetricHash (prometheus/common model.LabelsToSignature): FNV-1a 64 over each label,
    by name, as name 0xff value 0xff."""
    return fnv1a64(part for k, v in sorted(labels) for part in (k.encode(), _SEP, v.encode(), _SEP))


class MetricHistory(Component):
    name = "history"

    def __init__(self, registry: CollectorRegistry, sink: Sink, interval: float, instance: str) -> None:
        self.registry = registry
        self.sink = sink
        self.interval = interval
        self.extra = {"instance": instance, "job": "coroot-node-agent"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._described: set[str] = set()  # families with a metrics_metadata row

    def scrape(self, ts_ms: int | None = None) -> int:
        """One pass over the registry: a metrics row per sample (returns how many) and a
        metrics_metadata row per family not described before."""
        ts_ms = ts_ms if ts_ms is not None else int(time.time() * 1000)
        n = 0
        for fam in self.registry.collect():
            family, type_ = exposed_family(fam)
            if family not in self._described:
                self._described.add(family)
                self.sink.add("metrics_metadata", schema.row("metrics_metadata", {
                    "MetricFamilyName": family, "Type": type_, "Help": fam.documentation, "Unit": fam.unit}))
            for smp in fam.samples:
                labels = dict(self.extra)
                labels.update(smp.labels)
                labels["__name__"] = smp.name
                ts = int(float(smp.timestamp) * 1000) if smp.timestamp is not None else ts_ms
                ordered = sorted(labels.items())
                self.sink.add("metrics", schema.row("metrics", {
                    "Timestamp": ts, "MetricHash": series_hash(ordered), "MetricName": smp.name,
                    "Labels": {k: v for k, v in ordered if k != "__name__"}, "Value": float(smp.value)}))
                n += 1
        return n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="metric-history", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scrape()
            except Exception:  # noqa: BLE001
                log.exception("metric history")

    def close(self) -> None:
        """A last scrape; safe to call twice (the second does nothing)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.scrape()
