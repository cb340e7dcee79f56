"""DDL generation for one node and for a cluster, TTL parsing, the start-up migration's plan for a
table found in the database, rows by column name, address rules."""

import pytest

from agent.sinks import schema
from agent.sinks.store import StoreError, parse_address

TTLS = {"traces": 604800, "logs": 86400, "profiles": 129600, "metrics": 604800}


def test_single_node_ddl() -> None:
    stmts = schema.migration("coroot", TTLS)
    assert stmts[0] == "CREATE DATABASE IF NOT EXISTS coroot"
    traces = next(s for s in stmts if s.startswith("CREATE TABLE IF NOT EXISTS coroot.otel_traces ("))
    assert "Timestamp DateTime64(9) CODEC(DoubleDelta, ZSTD(1))" in traces
    assert "ENGINE = MergeTree()" in traces
    assert "PARTITION BY toDate(Timestamp)" in traces
    assert "ORDER BY (ServiceName, SpanName, toUnixTimestamp(Timestamp), TraceId)" in traces
    assert "TTL toDateTime(Timestamp) + toIntervalSecond(604800)" in traces
    assert "SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000" in traces
    logs = next(s for s in stmts if "coroot.otel_logs (" in s)
    assert "toIntervalSecond(86400)" in logs and "INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 1" in logs
    assert not any("ON CLUSTER" in s or "_distributed" in s for s in stmts)
    hist = next(s for s in stmts if "coroot.otel_traces_histogram (" in s)
    assert "ENGINE = SummingMergeTree()" in hist
    assert "TTL Timestamp + toIntervalSecond(604800)" in hist  # a DateTime column: no cast
    assert ("ORDER BY (ServiceName, SpanName, SpanKind, Root, Timestamp, NetSockPeerAddr, NetPeerName, "
            "NetPeerPort, Bucket)") in hist
    meta = next(s for s in stmts if "coroot.metrics_metadata (" in s)
    assert "TTL" not in meta and "ORDER BY MetricFamilyName" in meta
    names = next(s for s in stmts if "coroot.otel_traces_service_name (" in s)
    assert "PRIMARY KEY (ServiceName)" in names and "ORDER BY" not in names
    assert "LastSeen DateTime64(9) CODEC(Delta, ZSTD(1))" in names


def test_cluster_ddl_is_replicated_and_distributed() -> None:
    stmts = schema.migration("coroot", TTLS, cluster="coroot")
    assert stmts[0] == "CREATE DATABASE IF NOT EXISTS coroot ON CLUSTER coroot"
    tables = [s for s in stmts if s.startswith("CREATE TABLE") and "_distributed" not in s]
    assert len(tables) == len(schema.TABLES)
    for s in tables:
        assert " ON CLUSTER coroot (" in s
        assert "Replicated" in s and "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'" in s
        assert "non_replicated_deduplication_window" not in s
    hist = next(s for s in tables if "otel_traces_histogram" in s)
    assert "ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')\n" in hist
    stacks = next(s for s in tables if "profiling_stacks" in s)
    assert "ENGINE = ReplicatedReplacingMergeTree(" in stacks
    dist = {s.split()[5]: s for s in stmts if "_distributed" in s}
    assert set(dist) == {f"coroot.{t.name}_distributed" for t in schema.TABLES}
    assert dist["coroot.otel_traces_distributed"].endswith("ENGINE = Distributed(coroot, coroot, otel_traces, cityHash64(TraceId))")
    assert dist["coroot.otel_logs_distributed"].endswith("Distributed(coroot, coroot, otel_logs, rand())")
    assert dist["coroot.profiling_samples_distributed"].endswith("Distributed(coroot, coroot, profiling_samples, StackHash)")
    assert dist["coroot.metrics_distributed"].endswith("Distributed(coroot, coroot, metrics, MetricHash)")
    assert dist["coroot.otel_traces_histogram_distributed"].endswith("Distributed(coroot, coroot, otel_traces_histogram, rand())")
    assert dist["coroot.metrics_metadata_distributed"].endswith(
        "Distributed(coroot, coroot, metrics_metadata, sipHash64(MetricFamilyName))")
    views = [s for s in stmts if "MATERIALIZED VIEW" in s]
    assert len(views) == len(schema.VIEWS) and all("ON CLUSTER coroot TO" in v for v in views)


def test_ttl_is_read_back_from_create_statements() -> None:
    q = ("CREATE TABLE coroot.otel_traces (...) ENGINE = MergeTree PARTITION BY toDate(Timestamp) ORDER BY x "
         "TTL toDateTime(Timestamp) + toIntervalSecond(129600) SETTINGS index_granularity = 8192")
    assert schema.ttl_seconds_of(q) == 129600
    assert schema.ttl_seconds_of("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a") is None
    assert schema.modify_ttl(schema.TABLES_BY_NAME["otel_logs"], "coroot", 3600) == (
        "ALTER TABLE coroot.otel_logs MODIFY TTL toDateTime(Timestamp) + toIntervalSecond(3600)")


def test_nested_columns_are_flattened_for_inserts() -> None:
    cols = schema.TABLES_BY_NAME["otel_traces"].insert_columns
    assert cols[-7:] == ["Events.Timestamp", "Events.Name", "Events.Attributes",
                         "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes"]
    assert "NetSockPeerAddr" not in cols  # materialized


def test_rows_by_column_name_for_every_written_table() -> None:
    assert schema.row("metrics_metadata", {"MetricFamilyName": "node_info", "Type": "GAUGE"}) == (
        "node_info", "GAUGE", "", "")
    r = schema.row("otel_traces", {"SpanName": "GET", "Duration": 5})
    cols = schema.TABLES_BY_NAME["otel_traces"].insert_columns
    assert len(r) == len(cols) == 20 and r[cols.index("SpanName")] == "GET" and r[cols.index("Duration")] == 5
    assert r[cols.index("Events.Timestamp")] == [] and r[cols.index("SpanAttributes")] == {}
    with pytest.raises(KeyError, match="otel_traces has no column 'Root'"):
        schema.row("otel_traces", {"Root": 1})
    assert set(schema.WRITTEN) <= set(schema.TABLES_BY_NAME)


def test_identifiers_are_checked() -> None:
    with pytest.raises(ValueError, match="not a plain ClickHouse identifier"):
        schema.migration("coroot; DROP DATABASE x", TTLS)


@pytest.mark.parametrize(("address", "tls", "url"), [
    ("clickhouse:8123", False, "http://clickhouse:8123"),
    ("clickhouse", False, "http://clickhouse:8123"),
    ("clickhouse", True, "https://clickhouse:8443"),
    ("https://ch.example:8443", False, "https://ch.example:8443"),
    ("[::1]:8123", False, "http://::1:8123"),
])
def test_addresses(address: str, tls: bool, url: str) -> None:
    assert parse_address(address, tls).url == url


def test_native_port_is_refused_with_the_http_port_to_use() -> None:
    with pytest.raises(StoreError) as e:
        parse_address("clickhouse.coroot.svc:9000", True)
    assert str(e.value) == (
        "global_clickhouse.address 'clickhouse.coroot.svc:9000': port 9000 is ClickHouse's native TCP "
        "protocol, and coroot-agent talks to ClickHouse over HTTP(S). Use clickhouse.coroot.svc:8443 (HTTPS)")
    with pytest.raises(StoreError, match=r"Use ch:8123 \(HTTP; or :8443 with tls_enable: true\)"):
        parse_address("ch:9000", False)
    with pytest.raises(StoreError, match="port 9440 .* Use ch:8443"):
        parse_address("ch:9440", False)


# ------------------------------------------------------------------ migration plans

LC = "LowCardinality(String)"
ZSTD = "CODEC(ZSTD(1))"
DD = "CODEC(DoubleDelta, ZSTD(1))"
OLD_WINDOW = "SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000"


def existing(table: str, columns: dict[str, tuple[str, str]], *, sorting: str, partition: str = "",
             primary: str = "", engine: str = "MergeTree", settings: str = OLD_WINDOW,
             indexes: tuple[str, ...] = ()) -> schema.ExistingTable:
    """A table as system.tables/system.columns report it."""
    codecs = " ".join(c for _, c in columns.values())
    create = f"CREATE TABLE coroot.{table} (... {codecs}) ENGINE = {engine} ORDER BY ({sorting}) {settings}"
    return schema.ExistingTable(
        table, engine, partition, sorting, primary or sorting, create,
        {n: schema.ExistingColumn(t, "", c) for n, (t, c) in columns.items()}, frozenset(indexes))


OLD_HISTOGRAM = existing(
    "otel_traces_histogram",
    {"Timestamp": ("DateTime", DD), "ServiceName": (LC, ZSTD), "SpanName": (LC, ZSTD),
     "Bucket": ("Float64", ZSTD), "Total": ("UInt64", ZSTD), "Failed": ("UInt64", ZSTD)},
    sorting="ServiceName, SpanName, Timestamp, Bucket", partition="toDate(Timestamp)",
    engine="SummingMergeTree")


def test_the_previous_histogram_is_rebuilt_with_its_rows_carried_as_root_spans() -> None:
    table = schema.TABLES_BY_NAME["otel_traces_histogram"]
    plan = schema.plan_table(table, OLD_HISTOGRAM, "coroot")
    assert plan.rebuild == [
        "sorting key 'ServiceName, SpanName, Timestamp, Bucket', expected '(ServiceName, SpanName, SpanKind, "
        "Root, Timestamp, NetSockPeerAddr, NetPeerName, NetPeerPort, Bucket)'",
        "primary key 'ServiceName, SpanName, Timestamp, Bucket', expected '(ServiceName, SpanName, SpanKind, "
        "Root, Timestamp, NetSockPeerAddr, NetPeerName, NetPeerPort, Bucket)'"]
    assert plan.alters == [] and plan.kept == []
    stmts = schema.rebuild_statements(table, OLD_HISTOGRAM, "coroot", 3600)
    assert stmts[0] == "DROP TABLE IF EXISTS coroot.otel_traces_histogram__new"
    assert stmts[1].startswith("CREATE TABLE IF NOT EXISTS coroot.otel_traces_histogram__new (\n")
    assert "TTL Timestamp + toIntervalSecond(3600)" in stmts[1]
    assert stmts[2:] == [
        "INSERT INTO coroot.otel_traces_histogram__new (`ServiceName`, `SpanName`, `Root`, `Timestamp`, `Bucket`, "
        "`Total`, `Failed`) SELECT `ServiceName`, `SpanName`, 1 AS `Root`, `Timestamp`, `Bucket`, `Total`, `Failed` "
        "FROM coroot.otel_traces_histogram",
        "EXCHANGE TABLES coroot.otel_traces_histogram AND coroot.otel_traces_histogram__new",
        "DROP TABLE coroot.otel_traces_histogram__new",
    ]


def test_an_unpartitioned_trace_id_table_is_rebuilt_if_ours_and_kept_if_the_servers() -> None:
    table = schema.TABLES_BY_NAME["otel_traces_trace_id_ts"]
    cols = {"TraceId": ("String", ZSTD), "Start": ("DateTime64(9)", DD), "End": ("DateTime64(9)", DD)}
    ours = existing(table.name, cols, sorting="TraceId, toUnixTimestamp(Start)", indexes=("idx_trace_id",),
                    settings="SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 1000")
    assert schema.plan_table(table, ours, "coroot").rebuild == ["partition key 'none', expected 'toDate(Start)'"]
    # the same table as an older Coroot server made it (Delta codecs, no window): left as it is
    delta = "CODEC(Delta(8), ZSTD(1))"
    theirs = existing(table.name, cols | {"Start": ("DateTime64(9)", delta), "End": ("DateTime64(9)", delta)},
                      sorting="TraceId, toUnixTimestamp(Start)", indexes=("idx_trace_id",),
                      settings="SETTINGS index_granularity = 8192")
    plan = schema.plan_table(table, theirs, "coroot")
    assert (plan.rebuild, plan.alters) == ([], [])
    assert plan.kept == ["partition key 'none', expected 'toDate(Start)'"]


def test_codecs_and_settings_of_our_earlier_tables_are_altered_and_missing_parts_added() -> None:
    table = schema.TABLES_BY_NAME["otel_traces_service_name"]
    old = existing(table.name, {"ServiceName": (LC, ZSTD), "LastSeen": ("DateTime64(9)", DD)},
                   sorting="ServiceName", partition="toDate(LastSeen)", engine="ReplacingMergeTree",
                   settings="SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 1000")
    plan = schema.plan_table(table, old, "coroot")
    assert plan.alters == ["ALTER TABLE coroot.otel_traces_service_name MODIFY COLUMN LastSeen CODEC(Delta, ZSTD(1))"]
    assert plan.changes == [
        "otel_traces_service_name.LastSeen: codec CODEC(DoubleDelta, ZSTD(1)) -> CODEC(Delta, ZSTD(1))"]
    # an otel_traces without the materialized peer column and the trace id index gets them
    traces = schema.TABLES_BY_NAME["otel_traces"]
    want = schema.wanted_columns(traces)
    cols = {n: (t, DD if n == "Timestamp" else ZSTD) for n, (_c, t, _k) in want.items() if n != "NetSockPeerAddr"}
    idx = tuple(i.split()[1] for i in traces.indexes if "idx_trace_id" not in i)
    old = existing("otel_traces", cols, sorting="ServiceName, SpanName, toUnixTimestamp(Timestamp), TraceId",
                   partition="toDate(Timestamp)", indexes=idx)
    plan = schema.plan_table(traces, old, "coroot", cluster="main")
    assert plan.alters == [
        "ALTER TABLE coroot.otel_traces ON CLUSTER main ADD COLUMN IF NOT EXISTS NetSockPeerAddr "
        "LowCardinality(String) MATERIALIZED SpanAttributes['net.sock.peer.addr'] CODEC(ZSTD(1))",
        "ALTER TABLE coroot.otel_traces ON CLUSTER main ADD INDEX IF NOT EXISTS idx_trace_id TraceId "
        "TYPE bloom_filter(0.001) GRANULARITY 1",
        # span time keeps DoubleDelta and the settings are already this schema's: nothing more
    ]
    assert plan.rebuild == [] and plan.conflicts == []


def test_a_column_of_another_type_is_a_conflict() -> None:
    table = schema.TABLES_BY_NAME["profiling_profiles"]
    old = existing(table.name, {"ServiceName": ("String", ZSTD), "Type": (LC, ZSTD), "LastSeen": ("DateTime", ZSTD)},
                   sorting="ServiceName, Type", partition="toDate(LastSeen)", engine="ReplacingMergeTree")
    plan = schema.plan_table(table, old, "coroot")
    assert plan.conflicts == ["profiling_profiles.ServiceName is String, expected LowCardinality(String)",
                              "profiling_profiles.LastSeen is DateTime, expected DateTime64(9)"]
    assert plan.alters == [] and plan.rebuild == []


def test_metric_history_rows_are_those_the_servers_collector_writes() -> None:
    """coroot/coroot collector/metrics.go: Labels without __name__ and sorted (the server's
    PromQL reader groups by the map), MetricHash = prometheus/common LabelsToSignature; one
    metrics_metadata row per family, typed as remote_write metadata."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

    from agent.sinks.history import MetricHistory, series_hash

    # LabelsToSignature's own test vectors (prometheus/common model/signature_test.go)
    assert series_hash([("name", "garland, briggs"), ("fear", "love is not enough")]) == 5799056148416392346
    assert series_hash([]) == 14695981039346656037

    class Sink:
        def __init__(self) -> None:
            self.rows: dict[str, list[dict[str, object]]] = {}

        def add(self, table: str, row: tuple[object, ...]) -> None:
            cols = schema.TABLES_BY_NAME[table].insert_columns
            self.rows.setdefault(table, []).append(dict(zip(cols, row, strict=True)))

    reg = CollectorRegistry()
    Counter("hist_events", "events", ["zone", "app"], registry=reg).labels("b", "a").inc(2)
    Gauge("hist_level", "level", unit="bytes", registry=reg).set(3)
    Histogram("hist_wait_seconds", "wait", buckets=(1,), registry=reg).observe(0.5)
    Info("hist_build", "build", registry=reg).info({"version": "1"})
    sink = Sink()
    h = MetricHistory(reg, sink, 15, "node-1")  # type: ignore[arg-type]
    assert h.scrape(ts_ms=1234) > 0
    [ev] = [r for r in sink.rows["metrics"] if r["MetricName"] == "hist_events_total"]
    assert list(ev["Labels"].items()) == [("app", "a"), ("instance", "node-1"), ("job", "coroot-node-agent"),  # type: ignore[attr-defined]
                                          ("zone", "b")]
    assert ev["MetricHash"] == series_hash([("__name__", "hist_events_total"), *ev["Labels"].items()])  # type: ignore[attr-defined]
    assert ev["Timestamp"] == 1234 and ev["Value"] == 2.0
    meta = {r["MetricFamilyName"]: (r["Type"], r["Help"], r["Unit"]) for r in sink.rows["metrics_metadata"]}
    assert meta["hist_events_total"] == ("COUNTER", "events", "")
    assert meta["hist_level_bytes"] == ("GAUGE", "level", "bytes")
    assert meta["hist_wait_seconds"] == ("HISTOGRAM", "wait", "")
    assert meta["hist_build_info"] == ("GAUGE", "build", "")
    n = len(sink.rows["metrics_metadata"])
    h.scrape(ts_ms=2234)  # a family is described once
    assert len(sink.rows["metrics_metadata"]) == n and len(sink.rows["metrics"]) > n
