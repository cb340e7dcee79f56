"""Helpers for custom prometheus-client collectors: build metric families at scrape time, with
the labels every series carries (machine_id, system_uuid) added in one place.

Collectors read current state (a BPF map, a cgroup file) in `collect()`; nothing is copied into
global counters on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


class Histogram(Protocol):
    sum: float

    def cumulative(self) -> list[tuple[str, float]]: ...


class Families:
    """Accumulates samples by metric name; yields one family per name."""

    def __init__(self, const_labels: Mapping[str, str]) -> None:
        self._const = dict(const_labels)
        self._fams: dict[str, Metric] = {}
        self._label_names: dict[str, list[str]] = {}

    def _family(self, kind: str, name: str, help_: str, labels: Mapping[str, str]) -> Metric:
        fam = self._fams.get(name)
        if fam is None:
            names = list(self._const) + list(labels)
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                   "histogram": HistogramMetricFamily}[kind]
            fam = cls(name, help_, labels=names)
            self._fams[name] = fam
            self._label_names[name] = names
        return fam

    def gauge(self, name: str, help_: str, value: float, **labels: str) -> None:
        self._family("gauge", name, help_, labels).add_metric(self._values(labels), value)

    def counter(self, name: str, help_: str, value: float, **labels: str) -> None:
        self._family("counter", name, help_, labels).add_metric(self._values(labels), value)

    def histogram(self, name: str, help_: str, hist: Histogram, **labels: str) -> None:
        """`hist.cumulative()`: (upper bound, cumulative count) pairs ending with +Inf."""
        self._family("histogram", name, help_, labels).add_metric(  # type: ignore[call-arg]
            self._values(labels), buckets=hist.cumulative(), sum_value=hist.sum)

    def _values(self, labels: Mapping[str, str]) -> list[str]:
        return [*self._const.values(), *(str(v) for v in labels.values())]

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._fams.values())


def host_labels(procfs: str = "/proc") -> dict[str, str]:
    """machine_id and system_uuid, as Coroot puts on every series."""
    def first(*paths: str) -> str:
        for p in paths:
            try:
                with open(p) as f:
                    v = f.read().strip()
                if v:
                    return v
            except OSError:
                continue
        return ""

    return {
        "machine_id": first("/etc/machine-id", "/var/lib/dbus/machine-id"),
        "system_uuid": first("/sys/class/dmi/id/product_uuid").lower(),
    }
