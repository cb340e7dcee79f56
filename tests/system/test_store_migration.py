"""A store made by the previous schema version (the agent before the server's schema was taken
whole) is migrated at start-up: its tables altered or rebuilt, its views recreated, no row lost;
rows written before and after are read by queries of the Coroot server's shapes with exact
counts. A schema the server created is accepted as it is. On the real engine (chDB) at a
store path, as the agent runs it.
"""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from agent import config
from agent.sinks import schema
from agent.sinks.store import Store, StoreError
from tests.system.helpers import ClickHouseFront
from tests.system.serverquery import Q_PROFILE, DateNamed, bind
from tests.unit.test_server_ddl import create_server_schema, describe

# The previous version's DDL for one node, frozen: the statements that `migration("coroot", ttls)`
# of agent/sinks/schema.py produced at commit 5d982482c0ed324c40b5df90fe4738c33d1963c4 (the last
# before the server's schema was taken whole), with the TTLs as {traces}, {logs}, {profiles},
# {metrics}.
PREVIOUS_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS coroot.otel_traces (
    Timestamp DateTime64(9) CODEC(DoubleDelta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration Int64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested(Timestamp DateTime64(9), Name LowCardinality(String), Attributes Map(LowCardinality(String), String)) CODEC(ZSTD(1)),
    Links Nested(TraceId String, SpanId String, TraceState String, Attributes Map(LowCardinality(String), String)) CODEC(ZSTD(1)),
    NetSockPeerAddr LowCardinality(String) MATERIALIZED SpanAttributes['net.sock.peer.addr'] CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
)
ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toUnixTimestamp(Timestamp), TraceId)
TTL toDateTime(Timestamp) + toIntervalSecond({traces})
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.otel_traces_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start DateTime64(9) CODEC(DoubleDelta, ZSTD(1)),
    End DateTime64(9) CODEC(DoubleDelta, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = MergeTree()
ORDER BY (TraceId, toUnixTimestamp(Start))
TTL toDateTime(Start) + toIntervalSecond({traces})
SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.otel_traces_service_name (
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    LastSeen DateTime64(9) CODEC(DoubleDelta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(LastSeen)
PRIMARY KEY (ServiceName)
ORDER BY (ServiceName)
TTL toDateTime(LastSeen) + toIntervalSecond({traces})
SETTINGS non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.otel_traces_histogram (
    Timestamp DateTime CODEC(DoubleDelta, ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    Bucket Float64 CODEC(ZSTD(1)),
    Total UInt64 CODEC(ZSTD(1)),
    Failed UInt64 CODEC(ZSTD(1))
)
ENGINE = SummingMergeTree((Total, Failed))
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, Timestamp, Bucket)
TTL toDateTime(Timestamp) + toIntervalSecond({traces})
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.otel_logs (
    Timestamp DateTime64(9) CODEC(DoubleDelta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    TraceFlags UInt32 CODEC(ZSTD(1)),
    SeverityText LowCardinality(String) CODEC(ZSTD(1)),
    SeverityNumber Int32 CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Body String CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    LogAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_key mapKeys(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_value mapValues(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 1
)
ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SeverityText, toUnixTimestamp(Timestamp), TraceId)
TTL toDateTime(Timestamp) + toIntervalSecond({logs})
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.otel_logs_service_name_severity_text (
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    SeverityText LowCardinality(String) CODEC(ZSTD(1)),
    LastSeen DateTime64(9) CODEC(DoubleDelta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(LastSeen)
PRIMARY KEY (ServiceName, SeverityText)
ORDER BY (ServiceName, SeverityText)
TTL toDateTime(LastSeen) + toIntervalSecond({logs})
SETTINGS non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.profiling_stacks (
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Hash UInt64 CODEC(ZSTD(1)),
    LastSeen DateTime64(9) CODEC(DoubleDelta, ZSTD(1)),
    Stack Array(String) CODEC(ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(LastSeen)
PRIMARY KEY (ServiceName, Hash)
ORDER BY (ServiceName, Hash)
TTL toDateTime(LastSeen) + toIntervalSecond({profiles})
SETTINGS non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.profiling_samples (
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Type LowCardinality(String) CODEC(ZSTD(1)),
    Start DateTime64(9) CODEC(DoubleDelta, ZSTD(1)),
    End DateTime64(9) CODEC(DoubleDelta, ZSTD(1)),
    Labels Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    StackHash UInt64 CODEC(ZSTD(1)),
    Value Int64 CODEC(ZSTD(1))
)
ENGINE = MergeTree()
PARTITION BY toDate(Start)
ORDER BY (ServiceName, Type, toUnixTimestamp(Start), toUnixTimestamp(End))
TTL toDateTime(Start) + toIntervalSecond({profiles})
SETTINGS non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.profiling_profiles (
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Type LowCardinality(String) CODEC(ZSTD(1)),
    LastSeen DateTime64(9) CODEC(DoubleDelta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(LastSeen)
PRIMARY KEY (ServiceName, Type)
ORDER BY (ServiceName, Type)
TTL toDateTime(LastSeen) + toIntervalSecond({profiles})
SETTINGS non_replicated_deduplication_window = 1000""",
    """CREATE TABLE IF NOT EXISTS coroot.metrics (
    Timestamp DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    MetricHash UInt64 CODEC(ZSTD(1)),
    MetricName LowCardinality(String) CODEC(ZSTD(1)),
    Labels Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Value Float64 CODEC(ZSTD(1)),
    INDEX idx_metric_name MetricName TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_labels_key mapKeys(Labels) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_labels_value mapValues(Labels) TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
ORDER BY (MetricName, MetricHash, toUnixTimestamp(Timestamp))
TTL toDateTime(Timestamp) + toIntervalSecond({metrics})
SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 1000""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS coroot.otel_traces_trace_id_ts_mv TO coroot.otel_traces_trace_id_ts AS
SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM coroot.otel_traces WHERE TraceId != '' GROUP BY TraceId""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS coroot.otel_traces_service_name_mv TO coroot.otel_traces_service_name AS
SELECT ServiceName, max(Timestamp) AS LastSeen
FROM coroot.otel_traces GROUP BY ServiceName""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS coroot.otel_traces_histogram_mv TO coroot.otel_traces_histogram AS
SELECT toStartOfMinute(Timestamp) AS Timestamp, ServiceName, SpanName, roundDown(Duration / 1000000, [0, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]) AS Bucket, count() AS Total, countIf(StatusCode = 'STATUS_CODE_ERROR') AS Failed
FROM coroot.otel_traces WHERE ParentSpanId = '' GROUP BY Timestamp, ServiceName, SpanName, Bucket""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS coroot.otel_logs_service_name_severity_text_mv TO coroot.otel_logs_service_name_severity_text AS
SELECT ServiceName, SeverityText, max(Timestamp) AS LastSeen
FROM coroot.otel_logs GROUP BY ServiceName, SeverityText""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS coroot.profiling_profiles_mv TO coroot.profiling_profiles AS
SELECT ServiceName, Type, max(End) AS LastSeen
FROM coroot.profiling_samples GROUP BY ServiceName, Type""",
)

TTL_ARGS = {"traces_ttl": "7d", "logs_ttl": "3d", "profiles_ttl": "36h", "metrics_ttl": "30d"}
TTLS = {"traces": 604800, "logs": 259200, "profiles": 129600, "metrics": 2592000}
N_BEFORE, N_AFTER = 12, 8  # traces of three spans each; every 4th root span fails
PEER = ("10.0.0.5", "5432")
PROFILE = "ebpf:cpu:nanoseconds"
CONTAINER = "/k8s/shop/front"
S = 10**9


def previous_statements() -> list[str]:
    return [s.replace("{traces}", str(TTLS["traces"])).replace("{logs}", str(TTLS["logs"]))
            .replace("{profiles}", str(TTLS["profiles"])).replace("{metrics}", str(TTLS["metrics"]))
            for s in PREVIOUS_DDL]


# ------------------------------------------------------------------ the server's query shapes


BUCKETS = [0.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]


def root_spans_filter(service: str, from_mv: bool) -> tuple[list[str], dict[str, Any]]:
    """SpanQuery.RootSpansFilter with one ServiceName filter (clickhouse/traces.go)."""
    return (["ServiceName = @filter_0", "Root = 1" if from_mv else "ParentSpanId = ''",
             "NOT startsWith(ServiceName, '/')"], {"filter_0": service})


def spans_by_service_filter(service: str, from_mv: bool) -> tuple[list[str], dict[str, Any]]:
    root = "Root = 1" if from_mv else "ParentSpanId = ''"
    return (["ServiceName = @filter_0",
             f"(SpanKind = 'SPAN_KIND_SERVER' OR SpanKind = 'SPAN_KIND_CONSUMER' OR (SpanKind = 'SPAN_KIND_INTERNAL' AND {root}))"],
            {"filter_0": service})


def inbound_filter(clients: list[str], listens: list[tuple[str, str]], from_mv: bool) -> tuple[list[str], dict[str, Any]]:
    name, port = ("NetPeerName", "NetPeerPort") if from_mv else ("SpanAttributes['net.peer.name']", "SpanAttributes['net.peer.port']")
    ips = [ip for ip, p in listens if p == "0"]
    return ([ "ServiceName IN (@services)", f"({name} IN (@ips) OR ({name}, {port}) IN (@addrs))"],
            {"services": clients, "ips": ips, "addrs": listens})


class Server:
    """The Coroot server's reads, on a connection to the store's database."""

    def __init__(self, client: Any) -> None:
        self.c = client

    def rows(self, query: str, **params: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.c.query(bind(query, **params)).result_rows]

    def histogram_created_at(self) -> int:
        [(t,)] = self.rows("SELECT metadata_modification_time FROM system.tables WHERE database = currentDatabase() "
                           "AND name = 'otel_traces_histogram_mv'")
        return unix(t)

    def use_histogram(self, from_s: int) -> bool:
        """useTracesHistogram: only for a range that starts after the view was (re)created."""
        return from_s > self.histogram_created_at()

    def spans_histogram(self, filters: list[str], args: dict[str, Any], from_s: int, to_s: int, from_mv: bool,
                        step: int = 60) -> list[tuple[Any, ...]]:
        """getSpansHistogram: (interval start, bucket, total, failed) rows."""
        filters = [*filters, "Timestamp BETWEEN @from AND @to"]
        args = args | {"step": step, "from": DateNamed(from_s * S), "to": DateNamed((to_s + step) * S)}
        if from_mv:
            q = "SELECT toStartOfInterval(Timestamp, INTERVAL @step second), Bucket, sum(Total), sum(Failed)"
            q += " FROM @@table_otel_traces_histogram@@"
        else:
            args["buckets"] = BUCKETS
            q = ("SELECT toStartOfInterval(Timestamp, INTERVAL @step second), roundDown(Duration/1000000, @buckets), "
                 "count(1), countIf(StatusCode = 'STATUS_CODE_ERROR')")
            q += " FROM @@table_otel_traces@@"
        q += " WHERE " + " AND ".join(filters) + " GROUP BY 1, 2"
        return sorted(self.rows(q, **args))

    def span_stats(self, from_s: int, to_s: int, from_mv: bool) -> list[tuple[Any, ...]]:
        """getTraceSpanStats over root spans: (service, span, bucket, total, failed)."""
        filters = ["Root = 1" if from_mv else "ParentSpanId = ''", "NOT startsWith(ServiceName, '/')"]
        filters.append("Timestamp >= @tsFrom AND Timestamp < @tsTo" if from_mv else "Timestamp BETWEEN @tsFrom AND @tsTo")
        args: dict[str, Any] = {"tsFrom": DateNamed(from_s * S), "tsTo": DateNamed(to_s * S)}
        if from_mv:
            q = "SELECT ServiceName, SpanName, Bucket, sum(Total), sum(Failed) FROM @@table_otel_traces_histogram@@"
        else:
            args["buckets"] = BUCKETS
            q = ("SELECT ServiceName, SpanName, roundDown(Duration/1000000, @buckets), count(1), "
                 "countIf(StatusCode = 'STATUS_CODE_ERROR') FROM @@table_otel_traces@@")
        return sorted(self.rows(q + " WHERE " + " AND ".join(filters) + " GROUP BY 1, 2, 3", **args))

    SPAN_COLUMNS = ("SELECT Timestamp, TraceId, SpanId, ParentSpanId, SpanName, ServiceName, Duration, StatusCode, "
                    "StatusMessage, ResourceAttributes, SpanAttributes, Events.Timestamp, Events.Name, Events.Attributes")

    def trace_range(self, where: str, **args: Any) -> tuple[int, int]:
        """min(Start), max(End)+1 of otel_traces_trace_id_ts, in the server's whole seconds."""
        [(lo, hi)] = self.rows(f"SELECT min(Start), max(End)+1 FROM @@table_otel_traces_trace_id_ts@@ WHERE {where}", **args)
        return unix(lo), unix(hi)

    def spans_by_trace_id(self, trace_id: str) -> list[tuple[str, str, str]]:
        """GetSpansByTraceId: (SpanId, ParentSpanId, ServiceName) in time order."""
        lo, hi = self.trace_range("TraceId = @traceId", traceId=trace_id)
        q = (self.SPAN_COLUMNS + " FROM @@table_otel_traces@@ WHERE TraceId = @traceId AND "
             "Timestamp >= @tsFrom AND Timestamp < @tsTo ORDER BY Timestamp")
        return [(r[2], r[3], r[5]) for r in self.rows(q, traceId=trace_id, tsFrom=DateNamed(lo * S), tsTo=DateNamed(hi * S))]

    def parent_spans(self, spans: list[tuple[str, str]]) -> list[str]:
        """GetParentSpans: the spans named by the (TraceId, ParentSpanId) of their children."""
        trace_ids = sorted({t for t, _ in spans})
        lo, hi = self.trace_range("TraceId IN (@traceIds)", traceIds=trace_ids)
        q = (self.SPAN_COLUMNS + " FROM @@table_otel_traces@@ WHERE TraceId IN (@traceIds) AND (TraceId, SpanId) IN (@ids) "
             "AND Timestamp >= @tsFrom AND Timestamp < @tsTo")
        return sorted(r[2] for r in self.rows(q, traceIds=trace_ids, ids=spans, tsFrom=DateNamed(lo * S), tsTo=DateNamed(hi * S)))


# ------------------------------------------------------------------ the workload


def trace_id(era: str, i: int) -> str:
    return f"{era}{i:030x}"


def spans(era: str, base_ns: int, n: int) -> list[dict[str, Any]]:
    """n traces: a root server span of `front` (20 ms; every 4th fails), its client span to the
    database (3 ms) and the database's server span (2 ms)."""
    out = []
    for i in range(n):
        tid, t = trace_id(era, i), base_ns + i * 1_000_000
        root, client, db = f"{era}{i:012x}01", f"{era}{i:012x}02", f"{era}{i:012x}03"
        out += [
            {"Timestamp": t, "TraceId": tid, "SpanId": root, "SpanName": "GET /api", "SpanKind": "SPAN_KIND_SERVER",
             "ServiceName": "front", "Duration": 20_000_000,
             "StatusCode": "STATUS_CODE_ERROR" if i % 4 == 0 else "STATUS_CODE_UNSET",
             "ResourceAttributes": {"container.id": CONTAINER}},
            {"Timestamp": t + 100, "TraceId": tid, "SpanId": client, "ParentSpanId": root, "SpanName": "SELECT",
             "SpanKind": "SPAN_KIND_CLIENT", "ServiceName": "front", "Duration": 3_000_000,
             "StatusCode": "STATUS_CODE_UNSET",
             "SpanAttributes": {"net.peer.name": PEER[0], "net.peer.port": PEER[1], "net.sock.peer.addr": PEER[0]}},
            {"Timestamp": t + 200, "TraceId": tid, "SpanId": db, "ParentSpanId": client, "SpanName": "query",
             "SpanKind": "SPAN_KIND_SERVER", "ServiceName": "db", "Duration": 2_000_000,
             "StatusCode": "STATUS_CODE_UNSET"},
        ]
    return out


def logs(base_ns: int, front: int, db: int) -> list[dict[str, Any]]:
    return ([{"Timestamp": base_ns + i, "SeverityText": "ERROR", "SeverityNumber": 17, "ServiceName": "front",
              "Body": f"failed {i}"} for i in range(front)]
            + [{"Timestamp": base_ns + 1000 + i, "SeverityText": "INFO", "SeverityNumber": 9, "ServiceName": "db",
                "Body": f"checkpoint {i}"} for i in range(db)])


def profile(base_ns: int, samples: dict[int, int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stacks and samples of one 10 s CPU profile of `front`: stack hash -> value."""
    stacks = [{"ServiceName": "front", "Hash": h, "LastSeen": base_ns, "Stack": [f"main.f{h}", "main.main"]}
              for h in samples]
    rows = [{"ServiceName": "front", "Type": PROFILE, "Start": base_ns, "End": base_ns + 10 * S,
             "Labels": {"container.id": CONTAINER}, "StackHash": h, "Value": v} for h, v in samples.items()]
    return stacks, rows


def metrics(base_ms: int, n: int) -> list[dict[str, Any]]:
    return [{"Timestamp": base_ms + i * 15_000, "MetricHash": 7, "MetricName": "container_cpu_usage_seconds_total",
             "Labels": {"container_id": CONTAINER}, "Value": float(i)} for i in range(n)]


def write_previous(client: Any, table: str, rows: list[dict[str, Any]]) -> None:
    """Rows as the previous version wrote them: the same insert columns, by name."""
    client.insert(f"coroot.{table}", [schema.row(table, r) for r in rows],
                  column_names=schema.TABLES_BY_NAME[table].insert_columns)


def write(store: Store, table: str, rows: list[dict[str, Any]], token: str) -> None:
    store.insert(table, schema.TABLES_BY_NAME[table].insert_columns, [schema.row(table, r) for r in rows], token)


# ------------------------------------------------------------------ tests


@pytest.fixture
def path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "store")


class Backend:
    """The store the agent uses: the embedded engine at a path, or a remote ClickHouse (the
    test-only HTTP front over chDB, tests/system/helpers.py)."""

    def __init__(self, path: str, front: ClickHouseFront | None = None) -> None:
        self.path, self.front = path, front

    def store(self, database: str = "coroot") -> Store:
        args = {"storage_path": self.path, "clickhouse_database": database, **TTL_ARGS}
        if self.front is not None:
            args |= {"clickhouse_address": f"127.0.0.1:{self.front.port}", "clickhouse_user": self.front.user,
                     "clickhouse_password": self.front.password}
        return Store(config.load(args, {}, None))

    def connect(self, database: str = "coroot") -> Any:
        """A connection of its own to the store's engine, as the server would have."""
        if self.front is None:
            client = clickhouse_connect.get_client(dsn=f"chdb://{os.path.join(self.path, 'chdb')}")
            client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            client.command(f"USE {database}")
            return client
        client = clickhouse_connect.get_client(host="127.0.0.1", port=self.front.port, username=self.front.user,
                                               password=self.front.password)
        client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        client.close()
        return clickhouse_connect.get_client(host="127.0.0.1", port=self.front.port, username=self.front.user,
                                             password=self.front.password, database=database)


@pytest.fixture(params=["embedded", "remote"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        yield Backend(str(tmp_path / "store"))
        return
    front = ClickHouseFront(str(tmp_path / "front-data"))
    front.start()
    try:
        yield Backend(str(tmp_path / "store"), front)
    finally:
        front.stop()


def make_store(path: str, database: str = "coroot") -> Store:
    return Backend(path).store(database)


def connect(store: Store, database: str = "coroot") -> Any:
    return Backend(store.cfg.storage_path).connect(database)


def unix(t: Any) -> int:
    """A DateTime the driver returned, as unix seconds (a naive one is UTC)."""
    return int(t.timestamp()) if t.tzinfo is not None else calendar.timegm(t.timetuple())


def minute(client: Any, ns: int) -> Any:
    """The engine's toStartOfInterval(t, 60 s) for a time: compared as the engine returns it."""
    return client.query(f"SELECT toStartOfInterval(toDateTime64('{ns}', 9), INTERVAL 60 second)").result_rows[0][0]


def test_a_previous_version_store_is_migrated_with_every_row_readable_by_the_server(backend: Backend) -> None:
    store = backend.store()
    now = int(time.time())
    before_s = now // 60 * 60 - 3600  # a minute an hour ago
    before_ns = before_s * S + 5 * S

    # --- the previous version's store, with its rows
    old = backend.connect()
    for stmt in previous_statements():
        old.command(stmt)
    write_previous(old, "otel_traces", spans("b0", before_ns, N_BEFORE))
    write_previous(old, "otel_logs", logs(before_ns, 5, 2))
    stacks, samples = profile(before_ns, {1: 100, 2: 50})
    write_previous(old, "profiling_stacks", stacks)
    write_previous(old, "profiling_samples", samples)
    write_previous(old, "metrics", metrics(before_s * 1000, 4))
    old_histogram = sorted(old.query(
        "SELECT Timestamp, ServiceName, SpanName, Bucket, sum(Total), sum(Failed) FROM otel_traces_histogram "
        "GROUP BY 1, 2, 3, 4").result_rows)
    assert [r[1:] for r in old_histogram] == [(  "front", "GET /api", 10.0, N_BEFORE, 3)]  # roots only
    old_trace_ids = sorted(old.query("SELECT TraceId, Start, End FROM otel_traces_trace_id_ts").result_rows)
    assert len(old_trace_ids) == N_BEFORE
    # a rebuild cut short by an earlier start: its copy is dropped and the rebuild done again
    old.command("CREATE TABLE coroot.otel_traces_histogram__new (x UInt8) ENGINE = MergeTree ORDER BY x")
    old.command("INSERT INTO coroot.otel_traces_histogram__new VALUES (1)")
    old.close()

    # --- the new version starts
    store.open()
    assert store.migrate() == []  # the TTLs were already the configured ones
    codec = "codec CODEC(DoubleDelta, ZSTD(1)) -> CODEC(Delta, ZSTD(1))"
    assert store.schema_changes == [
        "otel_traces_trace_id_ts: rebuilt (partition key 'none', expected 'toDate(Start)')",
        "otel_traces_trace_id_ts_mv: recreated (its table was rebuilt)",
        f"otel_traces_service_name.LastSeen: {codec}",
        "otel_traces_histogram: rebuilt (sorting key 'ServiceName, SpanName, Timestamp, Bucket', expected "
        "'(ServiceName, SpanName, SpanKind, Root, Timestamp, NetSockPeerAddr, NetPeerName, NetPeerPort, Bucket)'; "
        "primary key 'ServiceName, SpanName, Timestamp, Bucket', expected '(ServiceName, SpanName, SpanKind, Root, "
        "Timestamp, NetSockPeerAddr, NetPeerName, NetPeerPort, Bucket)')",
        "otel_traces_histogram_mv: recreated (its table was rebuilt)",
        f"otel_logs.Timestamp: {codec}",
        f"otel_logs_service_name_severity_text.LastSeen: {codec}",
        f"profiling_stacks.LastSeen: {codec}",
        f"profiling_samples.Start: {codec}",
        f"profiling_samples.End: {codec}",
        f"profiling_profiles.LastSeen: {codec}",
        f"metrics.Timestamp: {codec}",
    ]

    # the migrated schema is the one a new store gets, as the engine reports both
    fresh = backend.store("fresh")
    fresh.open()
    assert fresh.migrate() == [] and fresh.schema_changes == []
    fresh.close()
    check = backend.connect()
    try:
        migrated, new = describe(check, "coroot"), describe(check, "fresh")
        assert sorted(migrated) == sorted(new)
        for name in sorted(new):
            assert migrated[name] == new[name], name
        assert check.query("EXISTS TABLE coroot.otel_traces_histogram__new").result_rows == [(0,)]
        # rows kept: every trace id row, and the histogram's rows as root spans
        assert sorted(check.query("SELECT TraceId, Start, End FROM otel_traces_trace_id_ts").result_rows) == old_trace_ids
        assert sorted(check.query(
            "SELECT Timestamp, ServiceName, SpanName, Bucket, sum(Total), sum(Failed) FROM otel_traces_histogram "
            "WHERE Root = 1 AND SpanKind = '' GROUP BY 1, 2, 3, 4").result_rows) == old_histogram
    finally:
        check.close()

    # --- the new version writes
    server = Server(backend.connect())
    try:
        created = server.histogram_created_at()
        assert before_s + 120 < created <= int(time.time())
        after_s = (created // 60 + 2) * 60
        after_ns = after_s * S + 5 * S
        write(store, "otel_traces", spans("a0", after_ns, N_AFTER), "t1")
        write(store, "otel_logs", logs(after_ns, 3, 1), "l1")
        stacks, samples = profile(after_ns, {1: 30, 3: 20})
        write(store, "profiling_stacks", stacks, "s1")
        write(store, "profiling_samples", samples, "p1")
        write(store, "metrics", metrics(after_s * 1000, 2), "m1")
        write(store, "metrics_metadata", [{"MetricFamilyName": "container_cpu_usage_seconds_total", "Type": "COUNTER",
                                           "Help": "CPU time", "Unit": ""}], "mm1")

        # --- read as the server reads: each window the way the server chooses for it
        windows = {"before": (before_s - 60, before_s + 120, N_BEFORE, 3, before_ns),
                   "after": (created + 1, after_s + 120, N_AFTER, 2, after_ns)}
        for era, (lo, hi, n, failed, base) in windows.items():
            mv = server.use_histogram(lo)
            assert mv == (era == "after"), era
            m = minute(server.c, base)
            f, a = root_spans_filter("front", mv)
            assert server.spans_histogram(f, a, lo, hi, mv) == [(m, 10.0, n, failed)], era
            f, a = spans_by_service_filter("db", mv)
            assert server.spans_histogram(f, a, lo, hi, mv) == [(m, 0.0, n, 0)], era
            f, a = inbound_filter(["front"], [PEER], mv)
            assert server.spans_histogram(f, a, lo, hi, mv) == [(m, 0.0, n, 0)], era
            assert server.span_stats(lo, hi, mv) == [("front", "GET /api", 10.0, n, failed)], era
        # the histogram also answers for the hour before the migration, from the rows it kept
        lo, hi = windows["before"][:2]
        f, a = root_spans_filter("front", True)
        assert server.spans_histogram(f, a, lo, hi, True) == [(minute(server.c, before_ns), 10.0, N_BEFORE, 3)]
        # and over both: every root span, before and after
        assert server.span_stats(before_s - 60, after_s + 120, True) == [
            ("front", "GET /api", 10.0, N_BEFORE + N_AFTER, 5)]

        services = "SELECT DISTINCT ServiceName FROM @@table_otel_traces_service_name@@ WHERE LastSeen >= @from"
        assert sorted(server.rows(services, **{"from": DateNamed((before_s - 60) * S)})) == [("db",), ("front",)]
        assert sorted(server.rows(services, **{"from": DateNamed((after_s - 60) * S)})) == [("db",), ("front",)]
        assert server.rows("SELECT count() FROM @@table_otel_traces_trace_id_ts@@") == [(N_BEFORE + N_AFTER,)]
        for era, i in (("b0", 5), ("a0", 3)):
            p = f"{era}{i:012x}"
            assert server.spans_by_trace_id(trace_id(era, i)) == [
                (f"{p}01", "", "front"), (f"{p}02", f"{p}01", "front"), (f"{p}03", f"{p}02", "db")]
        # the parents of a client span from before and of a database span from after
        assert server.parent_spans([(trace_id("b0", 7), f"b0{7:012x}01"), (trace_id("a0", 1), f"a0{1:012x}02")]) == [
            f"a0{1:012x}02", f"b0{7:012x}01"]

        # logs (clickhouse/logs.go): services, and the severity histogram of one service
        assert sorted(server.rows(
            "SELECT DISTINCT ServiceName FROM @@table_otel_logs_service_name_severity_text@@ WHERE LastSeen >= @from",
            **{"from": DateNamed((before_s - 60) * S)})) == [("db",), ("front",)]
        log_histogram = ("SELECT multiIf(SeverityNumber=0, 0, intDiv(SeverityNumber, 4)+1), "
                         "toStartOfInterval(Timestamp, INTERVAL 60 second), count(1) FROM @@table_otel_logs@@ "
                         "WHERE ServiceName = @serviceName AND Timestamp BETWEEN @from AND @to GROUP BY 1, 2")
        assert sorted(server.rows(log_histogram, serviceName="front", **{"from": DateNamed((before_s - 60) * S)},
                                  to=DateNamed((after_s + 120) * S))) == [
            (5, minute(server.c, before_ns), 5), (5, minute(server.c, after_ns), 3)]

        # profiles (clickhouse/queries.go): the types, and the flame graph's stacks over both profiles
        assert server.rows("SELECT DISTINCT ServiceName, Type FROM @@table_profiling_profiles@@ WHERE LastSeen >= @from",
                           **{"from": DateNamed((before_s - 60) * S)}) == [("front", PROFILE)]
        assert sorted(server.rows(Q_PROFILE, services=["front"], type=PROFILE, containers=[CONTAINER], namespace="",
                                  pod="", **{"from": DateNamed((before_s - 60) * S)}, to=DateNamed((after_s + 120) * S))) == [
            (20, ["main.f3", "main.main"]), (50, ["main.f2", "main.main"]), (130, ["main.f1", "main.main"])]

        # metrics and their metadata (prom/clickhouse.go)
        assert server.rows("SELECT MetricName, count(), sum(Value) FROM @@table_metrics@@ GROUP BY MetricName") == [
            ("container_cpu_usage_seconds_total", 6, 7.0)]
        assert server.rows("SELECT DISTINCT lower(MetricFamilyName) as MetricFamilyName, lower(Type) as Type, Help, Unit "
                           "FROM @@table_metrics_metadata@@") == [("container_cpu_usage_seconds_total", "counter", "CPU time", "")]
    finally:
        server.c.close()
    store.close()

    # the next start has nothing to do
    again = backend.store()
    again.open()
    assert again.migrate() == [] and again.schema_changes == []
    again.close()


def test_a_schema_the_server_created_is_accepted_as_it_is(path: str) -> None:
    store = make_store(path)
    client = connect(store)
    create_server_schema(client, "coroot", TTLS)
    snapshot = ("SELECT name, create_table_query, metadata_modification_time FROM system.tables "
                "WHERE database = 'coroot' ORDER BY name")
    before = client.query(snapshot).result_rows
    codecs = client.query("SELECT table, name, compression_codec FROM system.columns WHERE database = 'coroot' "
                          "ORDER BY table, name").result_rows
    assert len(before) == len(schema.TABLES) + len(schema.VIEWS)
    client.close()

    store.open()
    assert store.migrate() == [] and store.schema_changes == []
    base_s = int(time.time()) // 60 * 60 - 600
    write(store, "otel_traces", spans("c0", base_s * S, 4), "t1")
    write(store, "otel_logs", logs(base_s * S, 2, 0), "l1")
    server = Server(connect(store))
    try:
        assert server.c.query(snapshot).result_rows == before  # nothing altered, nothing recreated
        assert server.c.query("SELECT table, name, compression_codec FROM system.columns WHERE database = 'coroot' "
                              "ORDER BY table, name").result_rows == codecs
        f, a = root_spans_filter("front", True)
        m = minute(server.c, base_s * S)
        assert server.spans_histogram(f, a, base_s - 60, base_s + 120, True) == [(m, 10.0, 4, 1)]
        f, a = inbound_filter(["front"], [PEER], True)
        assert server.spans_histogram(f, a, base_s - 60, base_s + 120, True) == [(m, 0.0, 4, 0)]
        assert server.spans_by_trace_id(trace_id("c0", 2)) == [
            (f"c0{2:012x}01", "", "front"), (f"c0{2:012x}02", f"c0{2:012x}01", "front"),
            (f"c0{2:012x}03", f"c0{2:012x}02", "db")]
        assert server.rows("SELECT count() FROM @@table_otel_logs@@ WHERE ServiceName = @s", s="front") == [(2,)]
    finally:
        server.c.close()
        store.close()


def test_a_rebuild_that_fails_leaves_the_table_and_its_view_as_they_were(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy into the histogram's new table fails (as with a full disk): the old table and its
    view are kept and keep counting; the next start rebuilds it with every row."""
    store = make_store(path)
    base_s = int(time.time()) // 60 * 60 - 600
    old = connect(store)
    for stmt in previous_statements():
        old.command(stmt)
    write_previous(old, "otel_traces", spans("b0", base_s * S, N_BEFORE))
    view = "SELECT create_table_query FROM system.tables WHERE database = 'coroot' AND name = 'otel_traces_histogram_mv'"
    old_view = old.query(view).result_rows
    old.close()

    run = Store._run

    def failing(self: Store, client: Any, stmt: str, what: str, settings: dict[str, Any] | None = None) -> None:
        if stmt.startswith("INSERT INTO coroot.otel_traces_histogram__new "):
            raise StoreError(f"{what}: Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space")
        run(self, client, stmt, what, settings)

    monkeypatch.setattr(Store, "_run", failing)
    store.open()
    assert store.migrate() == []
    assert [c for c in store.schema_changes if "histogram" in c] == []
    assert "otel_traces_trace_id_ts: rebuilt (partition key 'none', expected 'toDate(Start)')" in store.schema_changes
    write(store, "otel_traces", spans("a0", base_s * S + 30 * S, N_AFTER), "t1")
    check = connect(store)
    try:
        assert check.query(view).result_rows == old_view
        assert check.query("SELECT sorting_key FROM system.tables WHERE database = 'coroot' AND "
                           "name = 'otel_traces_histogram'").result_rows == [("ServiceName, SpanName, Timestamp, Bucket",)]
        assert check.query("EXISTS TABLE coroot.otel_traces_histogram__new").result_rows == [(0,)]
        # the earlier view still counts root spans into the earlier table
        assert check.query("SELECT sum(Total), sum(Failed) FROM otel_traces_histogram").result_rows == [
            (N_BEFORE + N_AFTER, 5)]
    finally:
        check.close()
    store.close()
    monkeypatch.setattr(Store, "_run", run)

    again = make_store(path)
    again.open()
    assert again.migrate() == []
    assert [c.split(" (")[0] for c in again.schema_changes] == [
        "otel_traces_histogram: rebuilt", "otel_traces_histogram_mv: recreated"]
    server = Server(connect(again))
    try:
        f, a = root_spans_filter("front", True)
        assert server.spans_histogram(f, a, base_s - 60, base_s + 120, True) == [
            (minute(server.c, base_s * S), 10.0, N_BEFORE + N_AFTER, 5)]
    finally:
        server.c.close()
        again.close()
