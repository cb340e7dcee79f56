"""Counters the node agent names without `_total` (container_jvm_gc_time_seconds,
container_python_thread_lock_wait_time_seconds, ...): agent.metrics exact counters keep the name
and are typed counter in the text exposition, as a Prometheus parser reads it, and in the
metric history's metadata (remote_write's MetricMetadata types)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from agent.metrics import ExactCounterMetricFamily, Families, exposed_family, generate_latest
from agent.sinks import schema
from agent.sinks.history import MetricHistory
from tests.system.helpers import metric_families
from tests.unit.nodeagent_families import FAMILIES
from tests.unit.test_families import CONST, exported, mismatches

RUNTIME_COUNTERS = ("container_jvm_gc_time_seconds", "container_jvm_safepoint_time_seconds",
                    "container_jvm_safepoint_sync_time_seconds", "container_python_thread_lock_wait_time_seconds")


class Collected:
    def __init__(self, f: Families) -> None:
        self.f = f

    def collect(self) -> list[object]:
        return list(self.f)


def families() -> Families:
    f = Families(CONST)
    ct = {"container_id": "/system.slice/app.service", "app_id": ""}
    f.exact_counter("container_jvm_gc_time_seconds", "GC time", 1.5, **ct, jvm="App", gc="G1 Young Generation")
    f.exact_counter("container_jvm_gc_time_seconds", "GC time", 0.25, **ct, jvm="App", gc="G1 Old Generation")
    f.exact_counter("container_jvm_safepoint_time_seconds", "safepoints", 2.0, **ct, jvm="App")
    f.exact_counter("container_jvm_safepoint_sync_time_seconds", "sync", 0.5, **ct, jvm="App")
    f.exact_counter("container_python_thread_lock_wait_time_seconds", "GIL", 3.0, **ct)
    f.counter("container_restarts_total", "restarts", 2, **ct)
    f.gauge("container_jvm_heap_used_bytes", "heap", 10, **ct, jvm="App")
    return f


def test_the_runtime_counters_are_the_node_agents_counters_by_name() -> None:
    for name in RUNTIME_COUNTERS:
        assert FAMILIES[name][0] == "counter" and not name.endswith("_total"), name


def test_an_exact_counter_keeps_its_name_and_is_typed_counter_in_the_exposition() -> None:
    text = generate_latest(Collected(families())).decode()  # type: ignore[arg-type]
    lines = text.splitlines()
    assert "# TYPE container_jvm_gc_time_seconds counter" in lines
    assert "# HELP container_jvm_gc_time_seconds GC time" in lines
    assert "# TYPE container_jvm_gc_time_seconds_total counter" not in text
    assert ('container_jvm_gc_time_seconds{app_id="",container_id="/system.slice/app.service",gc="G1 Young Generation",'
            'jvm="App",machine_id="' + CONST["machine_id"] + '",system_uuid="u"} 1.5') in lines
    assert "# TYPE container_python_thread_lock_wait_time_seconds counter" in lines
    # The other families are written as prometheus_client writes them.
    assert "# TYPE container_restarts_total counter" in lines
    assert "# TYPE container_jvm_heap_used_bytes gauge" in lines
    # Read as Prometheus reads it (the Python client's parser would add _total to the samples
    # of a counter declared without it: tests/system/helpers.py undoes that), every family has
    # the node agent's name and type.
    got: dict[str, tuple[str, set[str]]] = {}
    for fam in metric_families(text):
        for s in fam.samples:
            got.setdefault(s.name, (fam.type, set()))[1].update(s.labels)
    assert set(got) == {*RUNTIME_COUNTERS, "container_restarts_total", "container_jvm_heap_used_bytes"}
    assert mismatches({n: (t, frozenset(lb)) for n, (t, lb) in got.items()}) == {}


def test_the_collected_families_match_the_node_agents_table() -> None:
    got = exported(list(families()))
    assert mismatches(got) == {}
    assert {n: t for n, (t, _) in got.items() if n in RUNTIME_COUNTERS} == dict.fromkeys(RUNTIME_COUNTERS, "counter")


def test_the_metadata_of_an_exact_counter_names_it_as_exposed_and_counter() -> None:
    fam = ExactCounterMetricFamily("container_jvm_safepoint_time_seconds", "x", labels=[])
    assert exposed_family(fam) == ("container_jvm_safepoint_time_seconds", "COUNTER")
    reg = CollectorRegistry()
    Counter("plain_events", "events", registry=reg).inc()
    (plain,) = [m for m in reg.collect() if m.name == "plain_events"]
    assert exposed_family(plain) == ("plain_events_total", "COUNTER")

    class Sink:
        def __init__(self) -> None:
            self.rows: dict[str, list[dict[str, object]]] = {}

        def add(self, table: str, row: tuple[object, ...]) -> None:
            cols = schema.TABLES_BY_NAME[table].insert_columns
            self.rows.setdefault(table, []).append(dict(zip(cols, row, strict=True)))

    reg.register(Collected(families()))  # type: ignore[arg-type]
    sink = Sink()
    MetricHistory(reg, sink, 15, "node-1").scrape(ts_ms=1000)  # type: ignore[arg-type]
    meta = {r["MetricFamilyName"]: r["Type"] for r in sink.rows["metrics_metadata"]}
    for name in RUNTIME_COUNTERS:
        assert meta[name] == "COUNTER", name
        assert f"{name}_total" not in meta
    assert meta["container_restarts_total"] == "COUNTER" and meta["container_jvm_heap_used_bytes"] == "GAUGE"
    rows = {r["MetricName"] for r in sink.rows["metrics"]}
    assert set(RUNTIME_COUNTERS) <= rows


def test_a_name_used_as_two_types_is_refused() -> None:
    f = Families({})
    f.exact_counter("x_seconds", "x", 1)
    try:
        f.gauge("x_seconds", "x", 1)
    except TypeError as e:
        assert "ExactCounterMetricFamily" in str(e)
    else:
        raise AssertionError("a gauge of an exact counter's name was accepted")
