"""Standalone metric history: with no remote_write URL and the embedded store, every scrape
interval the agent's registry is written to the store's `metrics` table (Coroot's schema), so
`coroot-agent query` can answer "what was the connect rate an hour ago". A component
(agent/component.py): its thread scrapes; `close()` scrapes a last time (the other components
have closed and flushed by then)."""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry

from agent.component import Component
from agent.hashing import fnv1a64
from agent.sinks import schema
from agent.sinks.batcher import Sink
from agent.sinks.remote_write import gather

log = logging.getLogger(__name__)


def series_hash(labels: list[tuple[str, str]]) -> int:
    """FNV-1a 64 of the sorted labels (name included), `k=v` joined by NUL."""
    return fnv1a64(f"{k}={v}\0".encode() for k, v in labels)


class MetricHistory(Component):
    name = "history"

    def __init__(self, registry: CollectorRegistry, sink: Sink, interval: float, instance: str) -> None:
        self.registry = registry
        self.sink = sink
        self.interval = interval
        self.extra = {"instance": instance, "job": "coroot-node-agent"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape(self, ts_ms: int | None = None) -> int:
        ts_ms = ts_ms if ts_ms is not None else int(time.time() * 1000)
        n = 0
        for labels, samples in gather(self.registry, self.extra, ts_ms):
            name = dict(labels)["__name__"]
            rest = {k: v for k, v in labels if k != "__name__"}
            h = series_hash(list(labels))
            for value, ts in samples:
                self.sink.add("metrics", schema.row("metrics", {
                    "Timestamp": ts, "MetricHash": h, "MetricName": name, "Labels": rest, "Value": value}))
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
