"""Helpers for custom prometheus-client collectors: build metric families at scrape time, with
the labels every series carries (machine_id, system_uuid) added in one place.

Collectors read current state (a BPF map, a cgroup file) in `collect()`; nothing is copied into
global counters on the hot path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol, TypeVar

from prometheus_client import exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = logging.getLogger(__name__)


class ExactCounterMetricFamily(Metric):
    """A counter exposed under exactly the name it is given, no `_total` appended.

    prometheus_client names every counter's series NAME_total (OpenMetrics' rule); the Coroot
    node agent (Go client, Prometheus text format) has counters without it, e.g.
    container_jvm_gc_time_seconds, and the Coroot server queries those names. Such a family is
    typed counter in the text exposition (`generate_latest` here) and in metric metadata
    (`exposed_family`), with samples named NAME.
    """

    def __init__(self, name: str, documentation: str, labels: Iterable[str]) -> None:
        super().__init__(name, documentation, "counter")
        self._labelnames = tuple(labels)

    def add_metric(self, labels: Iterable[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(self._labelnames, labels, strict=True)), value)


def exposed_family(fam: Metric) -> tuple[str, str]:
    """(the family name a Prometheus scrape of the text exposition sees, the remote_write
    metadata type: prompb.MetricMetadata.MetricType) of a collected family."""
    if isinstance(fam, ExactCounterMetricFamily):
        return fam.name, "COUNTER"
    suffix, type_ = _META_TYPES.get(fam.type, ("", "UNKNOWN"))
    return fam.name + suffix, type_


# prometheus_client family type -> (suffix of the family name in the text exposition, metadata type)
_META_TYPES = {
    "counter": ("_total", "COUNTER"), "gauge": ("", "GAUGE"), "histogram": ("", "HISTOGRAM"),
    "gaugehistogram": ("", "GAUGEHISTOGRAM"), "summary": ("", "SUMMARY"), "info": ("_info", "GAUGE"),
    "stateset": ("", "GAUGE"), "unknown": ("", "UNKNOWN"),
}


class _One:
    """One family as a collector, for prometheus_client's exposition."""

    def __init__(self, fam: Metric) -> None:
        self.fam = fam

    def collect(self) -> list[Metric]:
        return [self.fam]


class _Collectable(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def generate_latest(registry: _Collectable) -> bytes:
    """The Prometheus text exposition of `registry`, as prometheus_client writes it, except that
    an ExactCounterMetricFamily keeps its name: `# TYPE NAME counter` and NAME samples."""
    out: list[bytes] = []
    for fam in registry.collect():
        if not isinstance(fam, ExactCounterMetricFamily):
            out.append(exposition.generate_latest(_One(fam)))
            continue
        # The same lines prometheus_client writes for a gauge (escaping, value and timestamp
        # formats), the TYPE line saying counter.
        as_gauge = Metric(fam.name, fam.documentation, "gauge")
        as_gauge.samples = fam.samples
        text = exposition.generate_latest(_One(as_gauge))
        type_line = b"# TYPE " + fam.name.encode() + b" gauge\n"
        out.append(text.replace(type_line, b"# TYPE " + fam.name.encode() + b" counter\n", 1))
    return b"".join(out)


_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                  ExactCounterMetricFamily)


class Histogram(Protocol):
    sum: float

    def cumulative(self) -> list[tuple[str, float]]: ...


class Families:
    """Accumulates samples by metric name; yields one family per name."""

    def __init__(self, const_labels: Mapping[str, str]) -> None:
        self._const = dict(const_labels)
        self._fams: dict[str, Metric] = {}
        self._label_names: dict[str, list[str]] = {}

    def _family(self, cls: type[_Family], name: str, help_: str,
                labels: Mapping[str, str]) -> _Family:
        fam = self._fams.get(name)
        if fam is None:
            names = list(self._const) + list(labels)
            new = cls(name, help_, labels=names)
            self._fams[name] = new
            self._label_names[name] = names
            return new
        if not isinstance(fam, cls):
            raise TypeError(f"metric {name} is a {type(fam).__name__}, not a {cls.__name__}")
        return fam

    def gauge(self, name: str, help_: str, value: float, **labels: str) -> None:
        self._family(GaugeMetricFamily, name, help_, labels).add_metric(self._values(labels), value)

    def counter(self, name: str, help_: str, value: float, **labels: str) -> None:
        self._family(CounterMetricFamily, name, help_, labels).add_metric(self._values(labels), value)

    def exact_counter(self, name: str, help_: str, value: float, **labels: str) -> None:
        """A counter the node agent names without `_total`: exposed as `name` exactly."""
        self._family(ExactCounterMetricFamily, name, help_, labels).add_metric(self._values(labels), value)

    def histogram(self, name: str, help_: str, hist: Histogram, **labels: str) -> None:
        """`hist.cumulative()`: (upper bound, cumulative count) pairs ending with +Inf."""
        self._family(HistogramMetricFamily, name, help_, labels).add_metric(
            self._values(labels), buckets=hist.cumulative(), sum_value=hist.sum)

    def _values(self, labels: Mapping[str, str]) -> list[str]:
        return [*self._const.values(), *(str(v) for v in labels.values())]

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._fams.values())


MACHINE_ID_NAME = "machine-id"
_DMI_UUID = "/sys/class/dmi/id/product_uuid"
_NO_UUID = {"", "00000000000000000000000000000000", "ffffffffffffffffffffffffffffffff"}


def _read_first_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read(256).strip().split("\n", 1)[0].strip()
    except (OSError, ValueError):
        return ""


def _is_hex_id(v: str) -> bool:
    return len(v) == 32 and all(c in "0123456789abcdef" for c in v) and v not in _NO_UUID


def _dmi_uuid(root: str) -> str:
    """DMI product_uuid, lowercase with dashes; "" when absent, unreadable or a placeholder."""
    v = _read_first_line(os.path.join(root, _DMI_UUID.lstrip("/"))).lower()
    return "" if v.replace("-", "") in _NO_UUID else v


def _stored_id(state_dir: str | None) -> str:
    """A random id kept in `<state_dir>/machine-id` (created 0644 once, reused); when the
    directory cannot be written, a random id for this process, with a warning."""
    if state_dir:
        path = os.path.join(state_dir, MACHINE_ID_NAME)
        v = _read_first_line(path).lower()
        if _is_hex_id(v):
            return v
        new = uuid.uuid4().hex
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(state_dir, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, (new + "\n").encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
            log.info("no machine-id or DMI product_uuid: using %s, kept in %s", new, path)
            return new
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning("cannot keep a machine id in %s (%s): this run uses %s", path, e, new)
            return new
    new = uuid.uuid4().hex
    log.warning("no machine-id or DMI product_uuid and no state directory: this run uses %s", new)
    return new


def host_labels(procfs: str = "/proc", state_dir: str | None = None, root: str = "/") -> dict[str, str]:
    """machine_id and system_uuid, as Coroot puts on every series; never empty.

    machine_id: /etc/machine-id, /var/lib/dbus/machine-id, the DMI product_uuid (lowercase,
    dashes removed), then a random id kept in `state_dir`. system_uuid: the DMI product_uuid
    (lowercase), else the same kept id. `root` prefixes every path (tests use a fake root).
    """
    del procfs  # kept for callers; the identity files are not under /proc
    def first(*paths: str) -> str:
        for p in paths:
            v = _read_first_line(os.path.join(root, p.lstrip("/"))).lower()
            if _is_hex_id(v):  # not "", not systemd's "uninitialized"
                return v
        return ""

    dmi = _dmi_uuid(root)
    machine_id = first("/etc/machine-id", "/var/lib/dbus/machine-id") or dmi.replace("-", "")
    stored = "" if machine_id and dmi else _stored_id(state_dir)
    return {"machine_id": machine_id or stored, "system_uuid": dmi or stored}
