"""Our schema against the Coroot server's own DDL, compared by the ClickHouse engine itself.

The server's statements below are written from coroot/coroot `ch/client.go` (the `tables` and
`distributedTables` lists and `Migrate`) at commit 370a33fd4fd3a9fff4433ded83de335df64ecd2f
(2026-08-18; the file last changed in 22dbb5a). Both schemas are created in one in-memory chDB
engine, in two databases, and what the engine reports about them (system.tables, system.columns,
system.data_skipping_indices) must be equal, but for the differences listed in ALLOWED.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from agent.sinks import schema

TTLS = {"traces": 604800, "logs": 259200, "profiles": 129600, "metrics": 2592000}

# The server's CREATE statements, in its order, for one node: `@on_cluster` is empty, and
# `@merge_tree`/`@replacing_merge_tree`/`@summing_merge_tree` are MergeTree(), ... as Migrate()
# puts them; {traces} etc. are its TTLs in seconds. Run with the server's database as current.
SERVER_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS otel_logs (
        Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
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
    ) ENGINE MergeTree()
    TTL toDateTime(Timestamp) + toIntervalSecond({logs})
    PARTITION BY toDate(Timestamp)
    ORDER BY (ServiceName, SeverityText, toUnixTimestamp(Timestamp), TraceId)
    SETTINGS index_granularity=8192, ttl_only_drop_parts = 1""",

    """CREATE TABLE IF NOT EXISTS otel_logs_service_name_severity_text (
        ServiceName LowCardinality(String) CODEC(ZSTD(1)),
        SeverityText LowCardinality(String) CODEC(ZSTD(1)),
        LastSeen DateTime64(9) CODEC(Delta, ZSTD(1))
    ) ENGINE ReplacingMergeTree()
    PRIMARY KEY (ServiceName, SeverityText)
    TTL toDateTime(LastSeen) + toIntervalSecond({logs})
    PARTITION BY toDate(LastSeen)""",

    """CREATE MATERIALIZED VIEW IF NOT EXISTS otel_logs_service_name_severity_text_mv
    TO otel_logs_service_name_severity_text AS
    SELECT ServiceName, SeverityText, max(Timestamp) AS LastSeen FROM otel_logs
    group by ServiceName, SeverityText""",

    """CREATE TABLE IF NOT EXISTS otel_traces (
        Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
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
        Events Nested (
            Timestamp DateTime64(9),
            Name LowCardinality(String),
            Attributes Map(LowCardinality(String), String)
        ) CODEC(ZSTD(1)),
        Links Nested (
            TraceId String,
            SpanId String,
            TraceState String,
            Attributes Map(LowCardinality(String), String)
        ) CODEC(ZSTD(1)),
        INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
        INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
        INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
        INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
        INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
        INDEX idx_duration Duration TYPE minmax GRANULARITY 1
    ) ENGINE MergeTree()
    TTL toDateTime(Timestamp) + toIntervalSecond({traces})
    PARTITION BY toDate(Timestamp)
    ORDER BY (ServiceName, SpanName, toUnixTimestamp(Timestamp), TraceId)
    SETTINGS index_granularity=8192, ttl_only_drop_parts = 1""",

    """ALTER TABLE otel_traces ADD COLUMN IF NOT EXISTS NetSockPeerAddr LowCardinality(String)
    MATERIALIZED SpanAttributes['net.sock.peer.addr'] CODEC(ZSTD(1))""",

    """ALTER TABLE otel_traces ADD INDEX IF NOT EXISTS idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1""",

    """CREATE TABLE IF NOT EXISTS otel_traces_histogram (
        ServiceName LowCardinality(String) CODEC(ZSTD(1)),
        SpanName LowCardinality(String) CODEC(ZSTD(1)),
        SpanKind LowCardinality(String) CODEC(ZSTD(1)),
        Root UInt8 CODEC(ZSTD(1)),
        NetSockPeerAddr LowCardinality(String) CODEC(ZSTD(1)),
        NetPeerName LowCardinality(String) CODEC(ZSTD(1)),
        NetPeerPort LowCardinality(String) CODEC(ZSTD(1)),
        Timestamp DateTime CODEC(Delta, ZSTD(1)),
        Bucket Float64 CODEC(ZSTD(1)),
        Total UInt64 CODEC(ZSTD(1)),
        Failed UInt64 CODEC(ZSTD(1))
    ) ENGINE SummingMergeTree()
    TTL Timestamp + toIntervalSecond({traces})
    PARTITION BY toDate(Timestamp)
    ORDER BY (ServiceName, SpanName, SpanKind, Root, Timestamp, NetSockPeerAddr, NetPeerName, NetPeerPort, Bucket)
    SETTINGS index_granularity=8192, ttl_only_drop_parts = 1""",

    """CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_histogram_mv TO otel_traces_histogram AS
    SELECT
        ServiceName, SpanName, SpanKind,
        ParentSpanId = '' AS Root,
        NetSockPeerAddr,
        SpanAttributes['net.peer.name'] AS NetPeerName,
        SpanAttributes['net.peer.port'] AS NetPeerPort,
        toDateTime(toStartOfMinute(Timestamp)) AS Timestamp,
        roundDown(Duration/1000000, [0,5,10,25,50,100,250,500,1000,2500,5000,10000]) AS Bucket,
        count(1) AS Total,
        countIf(StatusCode = 'STATUS_CODE_ERROR') AS Failed
    FROM otel_traces
    GROUP BY ServiceName, SpanName, SpanKind, Root, NetSockPeerAddr, NetPeerName, NetPeerPort, Timestamp, Bucket""",

    """CREATE TABLE IF NOT EXISTS otel_traces_trace_id_ts (
        TraceId String CODEC(ZSTD(1)),
        Start DateTime64(9) CODEC(Delta, ZSTD(1)),
        End DateTime64(9) CODEC(Delta, ZSTD(1)),
        INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
    ) ENGINE MergeTree()
    TTL toDateTime(Start) + toIntervalSecond({traces})
    PARTITION BY toDate(Start)
    ORDER BY (TraceId, toUnixTimestamp(Start))
    SETTINGS index_granularity=8192, ttl_only_drop_parts = 1""",

    """CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_trace_id_ts_mv TO otel_traces_trace_id_ts AS
    SELECT TraceId, min(Timestamp) as Start, max(Timestamp) as End
    FROM otel_traces WHERE TraceId!='' GROUP BY TraceId""",

    """CREATE TABLE IF NOT EXISTS otel_traces_service_name (
        ServiceName LowCardinality(String) CODEC(ZSTD(1)),
        LastSeen DateTime64(9) CODEC(Delta, ZSTD(1))
    ) ENGINE ReplacingMergeTree()
    PRIMARY KEY (ServiceName)
    TTL toDateTime(LastSeen) + toIntervalSecond({traces})
    PARTITION BY toDate(LastSeen)""",

    """CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_service_name_mv TO otel_traces_service_name AS
    SELECT ServiceName, max(Timestamp) AS LastSeen FROM otel_traces group by ServiceName""",

    """CREATE TABLE IF NOT EXISTS profiling_stacks (
        ServiceName LowCardinality(String) CODEC(ZSTD(1)),
        Hash UInt64 CODEC(ZSTD(1)),
        LastSeen DateTime64(9) CODEC(Delta, ZSTD(1)),
        Stack Array(String) CODEC(ZSTD(1))
    ) ENGINE ReplacingMergeTree()
    PRIMARY KEY (ServiceName, Hash)
    TTL toDateTime(LastSeen) + toIntervalSecond({profiles})
    PARTITION BY toDate(LastSeen)
    ORDER BY (ServiceName, Hash)""",

    """CREATE TABLE IF NOT EXISTS profiling_samples (
        ServiceName LowCardinality(String) CODEC(ZSTD(1)),
        Type LowCardinality(String) CODEC(ZSTD(1)),
        Start DateTime64(9) CODEC(Delta, ZSTD(1)),
        End DateTime64(9) CODEC(Delta, ZSTD(1)),
        Labels Map(LowCardinality(String), String) CODEC(ZSTD(1)),
        StackHash UInt64 CODEC(ZSTD(1)),
        Value Int64 CODEC(ZSTD(1))
    ) ENGINE MergeTree()
    TTL toDateTime(Start) + toIntervalSecond({profiles})
    PARTITION BY toDate(Start)
    ORDER BY (ServiceName, Type, toUnixTimestamp(Start), toUnixTimestamp(End))""",

    """CREATE TABLE IF NOT EXISTS profiling_profiles (
        ServiceName LowCardinality(String) CODEC(ZSTD(1)),
        Type LowCardinality(String) CODEC(ZSTD(1)),
        LastSeen DateTime64(9) CODEC(Delta, ZSTD(1))
    ) ENGINE ReplacingMergeTree()
    PRIMARY KEY (ServiceName, Type)
    TTL toDateTime(LastSeen) + toIntervalSecond({profiles})
    PARTITION BY toDate(LastSeen)""",

    """CREATE MATERIALIZED VIEW IF NOT EXISTS profiling_profiles_mv TO profiling_profiles AS
    SELECT ServiceName, Type, max(End) AS LastSeen FROM profiling_samples group by ServiceName, Type""",

    """CREATE TABLE IF NOT EXISTS metrics (
        Timestamp DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
        MetricHash UInt64 CODEC(ZSTD(1)),
        MetricName LowCardinality(String) CODEC(ZSTD(1)),
        Labels Map(LowCardinality(String), String) CODEC(ZSTD(1)),
        Value Float64 CODEC(ZSTD(1)),
        INDEX idx_metric_name MetricName TYPE bloom_filter(0.001) GRANULARITY 1,
        INDEX idx_labels_key mapKeys(Labels) TYPE bloom_filter(0.01) GRANULARITY 1,
        INDEX idx_labels_value mapValues(Labels) TYPE bloom_filter(0.01) GRANULARITY 1
    ) ENGINE MergeTree()
    PARTITION BY toDate(Timestamp)
    ORDER BY (MetricName, MetricHash, toUnixTimestamp(Timestamp))
    TTL toDateTime(Timestamp) + toIntervalSecond({metrics})
    SETTINGS index_granularity = 8192""",

    """CREATE TABLE IF NOT EXISTS metrics_metadata (
        MetricFamilyName LowCardinality(String) CODEC(ZSTD(1)),
        Type LowCardinality(String) CODEC(ZSTD(1)),
        Help String CODEC(ZSTD(1)),
        Unit LowCardinality(String) CODEC(ZSTD(1)),
    ) ENGINE ReplacingMergeTree()
    ORDER BY MetricFamilyName
    SETTINGS index_granularity = 8192""",
)

# The server's `_distributed` tables (cluster mode): table -> sharding key ("" for none).
SERVER_SHARDING = {
    "otel_logs": "rand()",
    "otel_logs_service_name_severity_text": "",
    "otel_traces": "cityHash64(TraceId)",
    "otel_traces_trace_id_ts": "",
    "otel_traces_histogram": "rand()",
    "otel_traces_service_name": "",
    "profiling_stacks": "Hash",
    "profiling_samples": "StackHash",
    "profiling_profiles": "",
    "metrics": "MetricHash",
    "metrics_metadata": "sipHash64(MetricFamilyName)",
}
REPLICA_PATH = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"

# Where ours differs from the server's, on purpose:
# - span time is DoubleDelta+ZSTD, as the seed's security model asks;
# - every table created on one node has a deduplication window, so that a batch retried after
#   an ambiguous failure (same insert_deduplication_token) is stored once.
SPAN_TIME = ("otel_traces", "Timestamp")
ALLOWED_SETTING = ("non_replicated_deduplication_window", str(schema.DEDUP_WINDOW))


def server_statements(ttls: dict[str, int]) -> list[str]:
    return [s.replace("{traces}", str(ttls["traces"])).replace("{logs}", str(ttls["logs"]))
            .replace("{profiles}", str(ttls["profiles"])).replace("{metrics}", str(ttls["metrics"]))
            for s in SERVER_DDL]


def create_server_schema(client: Any, db: str, ttls: dict[str, int]) -> None:
    """The server's schema in `db`, statement by statement, as its Migrate() runs them."""
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    client.command(f"USE {db}")
    for stmt in server_statements(ttls):
        client.command(stmt)


def describe(client: Any, db: str) -> dict[str, dict[str, Any]]:
    """What the engine reports about every table and view in `db`, the database's own name
    taken out of expressions."""
    def q(sql: str) -> list[tuple[Any, ...]]:
        return client.query(sql).result_rows

    def strip_db(text: str) -> str:
        return re.sub(rf"\b{db}\.", "", text)

    columns: dict[str, list[tuple[Any, ...]]] = {}
    for row in q("SELECT table, name, type, default_kind, default_expression, compression_codec "
                 f"FROM system.columns WHERE database = '{db}' ORDER BY table, position"):
        columns.setdefault(row[0], []).append(row[1:])
    indexes: dict[str, set[tuple[Any, ...]]] = {}
    for row in q("SELECT table, name, type_full, expr, granularity FROM system.data_skipping_indices "
                 f"WHERE database = '{db}'"):
        indexes.setdefault(row[0], set()).add(row[1:])
    out: dict[str, dict[str, Any]] = {}
    for name, engine, pkey, skey, prim, create, as_select in q(
            "SELECT name, engine, partition_key, sorting_key, primary_key, create_table_query, as_select "
            f"FROM system.tables WHERE database = '{db}'"):
        create = strip_db(create)
        if engine == "MaterializedView":
            target = re.search(r"\bTO (\w+)", create)
            out[name] = {"engine": engine, "target": target.group(1) if target else "",
                         "select": strip_db(as_select), "columns": columns.get(name, [])}
            continue
        ttl = re.search(r"\bTTL (.+?)(?: SETTINGS |$)", create)
        settings = re.search(r"\bSETTINGS (.+)$", create)
        out[name] = {
            "engine": engine, "partition_key": pkey, "sorting_key": skey, "primary_key": prim,
            "ttl": ttl.group(1) if ttl else "",
            "settings": dict(p.split(" = ") for p in settings.group(1).split(", ")) if settings else {},
            "columns": columns.get(name, []), "indexes": indexes.get(name, set()),
        }
    return out


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn="chdb://:memory:")
    create_server_schema(client, "server_db", TTLS)
    for stmt in schema.migration("agent_db", TTLS):
        client.command(stmt)
    try:
        yield client
    finally:
        client.close()


def test_the_same_tables_and_views_as_the_server() -> None:
    names = set()
    for stmt in SERVER_DDL:
        m = re.match(r"CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS (\w+)", stmt)
        if m:
            names.add(m.group(1))
    assert {t.name for t in schema.TABLES} | {v.name for v in schema.VIEWS} == names
    assert len(names) == 16


def test_every_table_view_column_index_and_setting_matches_the_server(engine: Any) -> None:
    server, ours = describe(engine, "server_db"), describe(engine, "agent_db")
    assert sorted(ours) == sorted(server)
    # The allowed differences, checked to be exactly what they are, then taken out.
    codec = {t: {c[0]: c[4] for c in d["columns"]} for t, d in ours.items()}
    assert codec["otel_traces"]["Timestamp"] == "CODEC(DoubleDelta, ZSTD(1))"
    assert {c[0]: c[4] for c in server["otel_traces"]["columns"]}["Timestamp"] == "CODEC(Delta(8), ZSTD(1))"
    ours["otel_traces"]["columns"] = [
        (*c[:4], "CODEC(Delta(8), ZSTD(1))") if c[0] == SPAN_TIME[1] else c for c in ours["otel_traces"]["columns"]]
    for name, d in ours.items():
        if d["engine"] != "MaterializedView":
            assert d["settings"].pop(ALLOWED_SETTING[0]) == ALLOWED_SETTING[1], name
    for name in sorted(server):
        for key in server[name]:
            assert ours[name][key] == server[name][key], (name, key)
    assert ours == server


def test_the_histogram_is_over_all_spans_with_the_servers_dimensions(engine: Any) -> None:
    ours = describe(engine, "agent_db")
    hist = ours["otel_traces_histogram"]
    assert [c[0] for c in hist["columns"]] == [
        "ServiceName", "SpanName", "SpanKind", "Root", "NetSockPeerAddr", "NetPeerName", "NetPeerPort",
        "Timestamp", "Bucket", "Total", "Failed"]
    assert hist["sorting_key"] == (
        "ServiceName, SpanName, SpanKind, Root, Timestamp, NetSockPeerAddr, NetPeerName, NetPeerPort, Bucket")
    assert hist["engine"] == "SummingMergeTree" and hist["ttl"] == "Timestamp + toIntervalSecond(604800)"
    assert "WHERE" not in ours["otel_traces_histogram_mv"]["select"]  # every span, not roots only
    assert ours["otel_traces_trace_id_ts"]["partition_key"] == "toDate(Start)"
    assert ours["metrics_metadata"]["ttl"] == ""  # the server gives it none


def test_cluster_engines_and_distributed_tables_are_the_servers() -> None:
    ddl = schema.migration("coroot", TTLS, cluster="main")
    for table in schema.TABLES:
        stmt = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS coroot.{table.name} ON CLUSTER main ("))
        assert f"ENGINE = Replicated{table.engine}({REPLICA_PATH})\n" in stmt, table.name
        dist = next(s for s in ddl if f"coroot.{table.name}_distributed " in s)
        key = SERVER_SHARDING[table.name]
        # The server names the database with currentDatabase(), the agent by name: the same one.
        assert dist == (f"CREATE TABLE IF NOT EXISTS coroot.{table.name}_distributed ON CLUSTER main AS "
                        f"coroot.{table.name} ENGINE = Distributed(main, coroot, {table.name}{', ' + key if key else ''})")
    assert set(SERVER_SHARDING) == {t.name for t in schema.TABLES}
    assert sum("_distributed" in s for s in ddl) == len(schema.TABLES)


def test_a_server_made_schema_needs_no_change(engine: Any) -> None:
    """plan_table() over the server's tables, as the engine reports them: nothing to alter or
    rebuild, and no difference to report but the codec the seed asks (which stays the server's)."""
    server = existing_tables(engine, "server_db")
    for table in schema.TABLES:
        plan = schema.plan_table(table, server[table.name], "server_db")
        assert (plan.alters, plan.rebuild, plan.kept, plan.conflicts) == ([], [], [], []), table.name
        assert not schema.made_by_agent(server[table.name])


def existing_tables(client: Any, db: str) -> dict[str, schema.ExistingTable]:
    cols: dict[str, dict[str, schema.ExistingColumn]] = {}
    for table, name, type_, kind, codec in client.query(
            "SELECT table, name, type, default_kind, compression_codec FROM system.columns "
            f"WHERE database = '{db}' ORDER BY table, position").result_rows:
        cols.setdefault(table, {})[name] = schema.ExistingColumn(type_, kind, codec)
    idx: dict[str, set[str]] = {}
    for table, name in client.query(
            f"SELECT table, name FROM system.data_skipping_indices WHERE database = '{db}'").result_rows:
        idx.setdefault(table, set()).add(name)
    return {name: schema.ExistingTable(name, engine, p, s, k, q, cols.get(name, {}), frozenset(idx.get(name, ())))
            for name, engine, p, s, k, q in client.query(
                "SELECT name, engine, partition_key, sorting_key, primary_key, create_table_query "
                f"FROM system.tables WHERE database = '{db}' AND engine != 'MaterializedView'").result_rows}
