"""The ClickHouse schema of the Coroot server (reference §5): table and column names and types
are the compatibility surface and stay exact. Generates DDL for one node or a cluster
(ON CLUSTER, Replicated engines, `_distributed` tables) and the TTL expressions that the
store keeps in line with the configuration. Pure: builds strings, runs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SIGNALS = ("traces", "logs", "profiles", "metrics")
TIME_CODEC = "CODEC(DoubleDelta, ZSTD(1))"  # the seed asks DoubleDelta+ZSTD for span time
MAP = "Map(LowCardinality(String), String)"
LC = "LowCardinality(String)"
# Latency buckets of otel_traces_histogram, in milliseconds.
HISTOGRAM_BUCKETS_MS = (0, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    codec: str = "CODEC(ZSTD(1))"
    materialized: str = ""  # an expression: not inserted, computed by ClickHouse

    def ddl(self) -> str:
        mat = f" MATERIALIZED {self.materialized}" if self.materialized else ""
        return f"{self.name} {self.type}{mat} {self.codec}".rstrip()


@dataclass(frozen=True)
class Table:
    name: str
    signal: str
    columns: tuple[Column, ...]
    engine: str  # MergeTree | ReplacingMergeTree | SummingMergeTree
    order_by: str
    ttl_column: str
    partition_by: str = ""
    primary_key: str = ""
    indexes: tuple[str, ...] = ()
    settings: str = "index_granularity = 8192, ttl_only_drop_parts = 1"
    sharding_key: str = "rand()"
    engine_args: str = ""

    @property
    def insert_columns(self) -> list[str]:
        """Columns a writer supplies, Nested ones flattened (Events.Timestamp, ...)."""
        out = []
        for c in self.columns:
            if c.materialized:
                continue
            m = re.fullmatch(r"Nested\((.*)\)", c.type, re.S)
            if m:
                out.extend(f"{c.name}.{part.strip().split()[0]}" for part in _split_top(m.group(1)))
            else:
                out.append(c.name)
        return out

    def ttl_expr(self, seconds: int) -> str:
        return f"toDateTime({self.ttl_column}) + toIntervalSecond({int(seconds)})"


@dataclass(frozen=True)
class View:
    name: str
    target: str
    select: str


def _split_top(s: str) -> list[str]:
    """Split on commas not inside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _c(name: str, type_: str, codec: str = "CODEC(ZSTD(1))") -> Column:
    return Column(name, type_, codec)


def _t(name: str) -> Column:
    return Column(name, "DateTime64(9)", TIME_CODEC)


_BLOOM_MAPS = (
    "INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
)

TABLES: tuple[Table, ...] = (
    Table(
        "otel_traces", "traces",
        (
            _t("Timestamp"), _c("TraceId", "String"), _c("SpanId", "String"),
            _c("ParentSpanId", "String"), _c("TraceState", "String"), _c("SpanName", LC),
            _c("SpanKind", LC), _c("ServiceName", LC), _c("ResourceAttributes", MAP),
            _c("SpanAttributes", MAP), _c("Duration", "Int64"), _c("StatusCode", LC),
            _c("StatusMessage", "String"),
            _c("Events", f"Nested(Timestamp DateTime64(9), Name {LC}, Attributes {MAP})"),
            _c("Links", f"Nested(TraceId String, SpanId String, TraceState String, Attributes {MAP})"),
            Column("NetSockPeerAddr", LC, materialized="SpanAttributes['net.sock.peer.addr']"),
        ),
        "MergeTree", "(ServiceName, SpanName, toUnixTimestamp(Timestamp), TraceId)", "Timestamp",
        partition_by="toDate(Timestamp)",
        indexes=(
            "INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1",
            *_BLOOM_MAPS,
            "INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
            "INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
            "INDEX idx_duration Duration TYPE minmax GRANULARITY 1",
        ),
        sharding_key="cityHash64(TraceId)",
    ),
    Table(
        "otel_traces_trace_id_ts", "traces",
        (_c("TraceId", "String"), _t("Start"), _t("End")),
        "MergeTree", "(TraceId, toUnixTimestamp(Start))", "Start",
        indexes=("INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1",),
        settings="index_granularity = 8192", sharding_key="",
    ),
    Table(
        "otel_traces_service_name", "traces",
        (_c("ServiceName", LC), _t("LastSeen")),
        "ReplacingMergeTree", "", "LastSeen", partition_by="toDate(LastSeen)",
        primary_key="(ServiceName)", settings="", sharding_key="",
    ),
    Table(
        "otel_traces_histogram", "traces",
        (
            Column("Timestamp", "DateTime", "CODEC(DoubleDelta, ZSTD(1))"), _c("ServiceName", LC),
            _c("SpanName", LC), _c("Bucket", "Float64"), _c("Total", "UInt64"), _c("Failed", "UInt64"),
        ),
        "SummingMergeTree", "(ServiceName, SpanName, Timestamp, Bucket)", "Timestamp",
        partition_by="toDate(Timestamp)", engine_args="((Total, Failed))", sharding_key="",
    ),
    Table(
        "otel_logs", "logs",
        (
            _t("Timestamp"), _c("TraceId", "String"), _c("SpanId", "String"),
            _c("TraceFlags", "UInt32"), _c("SeverityText", LC), _c("SeverityNumber", "Int32"),
            _c("ServiceName", LC), _c("Body", "String"), _c("ResourceAttributes", MAP),
            _c("LogAttributes", MAP),
        ),
        "MergeTree", "(ServiceName, SeverityText, toUnixTimestamp(Timestamp), TraceId)", "Timestamp",
        partition_by="toDate(Timestamp)",
        indexes=(
            "INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1",
            *_BLOOM_MAPS,
            "INDEX idx_log_attr_key mapKeys(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
            "INDEX idx_log_attr_value mapValues(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
            "INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 1",
        ),
    ),
    Table(
        "otel_logs_service_name_severity_text", "logs",
        (_c("ServiceName", LC), _c("SeverityText", LC), _t("LastSeen")),
        "ReplacingMergeTree", "", "LastSeen", partition_by="toDate(LastSeen)",
        primary_key="(ServiceName, SeverityText)", settings="", sharding_key="",
    ),
    Table(
        "profiling_stacks", "profiles",
        (_c("ServiceName", LC), _c("Hash", "UInt64"), _t("LastSeen"), _c("Stack", "Array(String)")),
        "ReplacingMergeTree", "(ServiceName, Hash)", "LastSeen", partition_by="toDate(LastSeen)",
        primary_key="(ServiceName, Hash)", settings="", sharding_key="Hash",
    ),
    Table(
        "profiling_samples", "profiles",
        (
            _c("ServiceName", LC), _c("Type", LC), _t("Start"), _t("End"), _c("Labels", MAP),
            _c("StackHash", "UInt64"), _c("Value", "Int64"),
        ),
        "MergeTree", "(ServiceName, Type, toUnixTimestamp(Start), toUnixTimestamp(End))", "Start",
        partition_by="toDate(Start)", settings="", sharding_key="StackHash",
    ),
    Table(
        "profiling_profiles", "profiles",
        (_c("ServiceName", LC), _c("Type", LC), _t("LastSeen")),
        "ReplacingMergeTree", "", "LastSeen", partition_by="toDate(LastSeen)",
        primary_key="(ServiceName, Type)", settings="", sharding_key="",
    ),
    Table(
        "metrics", "metrics",
        (
            Column("Timestamp", "DateTime64(3, 'UTC')", TIME_CODEC), _c("MetricHash", "UInt64"),
            _c("MetricName", LC), _c("Labels", MAP), _c("Value", "Float64"),
        ),
        "MergeTree", "(MetricName, MetricHash, toUnixTimestamp(Timestamp))", "Timestamp",
        partition_by="toDate(Timestamp)",
        indexes=(
            "INDEX idx_metric_name MetricName TYPE bloom_filter(0.001) GRANULARITY 1",
            "INDEX idx_labels_key mapKeys(Labels) TYPE bloom_filter(0.01) GRANULARITY 1",
            "INDEX idx_labels_value mapValues(Labels) TYPE bloom_filter(0.01) GRANULARITY 1",
        ),
        settings="index_granularity = 8192", sharding_key="MetricHash",
    ),
)

_buckets = ", ".join(str(b) for b in HISTOGRAM_BUCKETS_MS)
VIEWS: tuple[View, ...] = (
    View("otel_traces_trace_id_ts_mv", "otel_traces_trace_id_ts",
         "SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End FROM {db}.otel_traces "
         "WHERE TraceId != '' GROUP BY TraceId"),
    View("otel_traces_service_name_mv", "otel_traces_service_name",
         "SELECT ServiceName, max(Timestamp) AS LastSeen FROM {db}.otel_traces GROUP BY ServiceName"),
    View("otel_traces_histogram_mv", "otel_traces_histogram",
         "SELECT toStartOfMinute(Timestamp) AS Timestamp, ServiceName, SpanName, "
         f"roundDown(Duration / 1000000, [{_buckets}]) AS Bucket, count() AS Total, "
         "countIf(StatusCode = 'STATUS_CODE_ERROR') AS Failed FROM {db}.otel_traces "
         "WHERE ParentSpanId = '' GROUP BY Timestamp, ServiceName, SpanName, Bucket"),
    View("otel_logs_service_name_severity_text_mv", "otel_logs_service_name_severity_text",
         "SELECT ServiceName, SeverityText, max(Timestamp) AS LastSeen FROM {db}.otel_logs "
         "GROUP BY ServiceName, SeverityText"),
    View("profiling_profiles_mv", "profiling_profiles",
         "SELECT ServiceName, Type, max(End) AS LastSeen FROM {db}.profiling_samples "
         "GROUP BY ServiceName, Type"),
)

TABLES_BY_NAME = {t.name: t for t in TABLES}
# The tables the agent writes to; the others are fed by materialized views.
WRITTEN = ("otel_traces", "otel_logs", "profiling_stacks", "profiling_samples", "metrics")
DEDUP_WINDOW = 1000


def _default(type_: str) -> Any:
    """The value a column gets when a writer leaves it out (ClickHouse's own default)."""
    t = type_.removeprefix("LowCardinality(").rstrip(")") if type_.startswith("LowCardinality(") else type_
    if t.startswith("Map("):
        return {}
    if t.startswith("Array("):
        return []
    if t.startswith(("Int", "UInt", "Float")):
        return 0
    if t.startswith("DateTime"):
        return 0
    return ""


def _column_types(table: Table) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in table.columns:
        if c.materialized:
            continue
        m = re.fullmatch(r"Nested\((.*)\)", c.type, re.S)
        if m:
            for part in _split_top(m.group(1)):
                name, _, type_ = part.strip().partition(" ")
                out[f"{c.name}.{name}"] = f"Array({type_.strip()})"
        else:
            out[c.name] = c.type
    return out


class RowBuilder:
    """Rows of one written table from values named by column: the order comes from the table's
    definition here, so a writer cannot put a value in the wrong column. Columns left out get
    their type's default; a name the table does not have is an error."""

    def __init__(self, table: str) -> None:
        t = TABLES_BY_NAME[table]
        self.table = table
        self.columns = t.insert_columns
        types = _column_types(t)
        self._index = {name: i for i, name in enumerate(self.columns)}
        self._defaults = tuple(_default(types[name]) for name in self.columns)

    def __call__(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        row = list(self._defaults)
        for name, v in values.items():
            try:
                row[self._index[name]] = v
            except KeyError:
                raise KeyError(f"{self.table} has no column {name!r}") from None
        for i, d in enumerate(self._defaults):  # mutable defaults are not shared between rows
            if row[i] is d and isinstance(d, (list, dict)):
                row[i] = type(d)()
        return tuple(row)


_BUILDERS: dict[str, RowBuilder] = {}


def row(table: str, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """One row of `table` (one of WRITTEN) in insert order, from values named by column."""
    b = _BUILDERS.get(table)
    if b is None:
        b = _BUILDERS[table] = RowBuilder(table)
    return b(values)


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"not a plain ClickHouse identifier: {name!r}")
    return name


def engine(table: Table, cluster: str) -> str:
    if cluster:
        path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
        args = table.engine_args[1:-1] if table.engine_args else ""
        return f"Replicated{table.engine}({path}{', ' + args if args else ''})"
    return f"{table.engine}{table.engine_args or '()'}"


def create_table(table: Table, db: str, ttl_seconds: int, cluster: str = "") -> str:
    db = _ident(db)
    on = f" ON CLUSTER {_ident(cluster)}" if cluster else ""
    body = ",\n    ".join([c.ddl() for c in table.columns] + list(table.indexes))
    parts = [f"CREATE TABLE IF NOT EXISTS {db}.{table.name}{on} (\n    {body}\n)",
             f"ENGINE = {engine(table, cluster)}"]
    if table.partition_by:
        parts.append(f"PARTITION BY {table.partition_by}")
    if table.primary_key:
        parts.append(f"PRIMARY KEY {table.primary_key}")
    parts.append(f"ORDER BY {table.order_by or table.primary_key}")
    parts.append(f"TTL {table.ttl_expr(ttl_seconds)}")
    settings = [table.settings] if table.settings else []
    if not cluster:
        # A batch retried after an ambiguous failure carries the same insert_deduplication_token:
        # the store keeps it once, and so do the views' target tables (which is why every table
        # has the window). Replicated tables deduplicate by default.
        settings.append(f"non_replicated_deduplication_window = {DEDUP_WINDOW}")
    if settings:
        parts.append("SETTINGS " + ", ".join(settings))
    return "\n".join(parts)


def create_view(view: View, db: str, cluster: str = "") -> str:
    db = _ident(db)
    on = f" ON CLUSTER {_ident(cluster)}" if cluster else ""
    return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{view.name}{on} TO {db}.{view.target} AS "
            + view.select.format(db=db))


def create_distributed(table: Table, db: str, cluster: str) -> str:
    db, cluster = _ident(db), _ident(cluster)
    key = f", {table.sharding_key}" if table.sharding_key else ""
    return (f"CREATE TABLE IF NOT EXISTS {db}.{table.name}_distributed ON CLUSTER {cluster} "
            f"AS {db}.{table.name} ENGINE = Distributed({cluster}, {db}, {table.name}{key})")


def migration(db: str, ttls: dict[str, int], cluster: str = "") -> list[str]:
    """Every statement, in order, to create the schema (idempotent)."""
    on = f" ON CLUSTER {_ident(cluster)}" if cluster else ""
    out = [f"CREATE DATABASE IF NOT EXISTS {_ident(db)}{on}"]
    out += [create_table(t, db, ttls[t.signal], cluster) for t in TABLES]
    out += [create_view(v, db, cluster) for v in VIEWS]
    if cluster:
        out += [create_distributed(t, db, cluster) for t in TABLES]
    return out


_TTL_RE = re.compile(r"\bTTL\s+(.+?)(?:\s+SETTINGS\s|\s*$)", re.S)
_TTL_SECONDS_RE = re.compile(r"toIntervalSecond\((\d+)\)")


def ttl_seconds_of(create_query: str) -> int | None:
    """The TTL interval in a table's CREATE statement (as ClickHouse reports it), if it has
    the form this schema writes; None otherwise."""
    m = _TTL_RE.search(create_query)
    if not m:
        return None
    s = _TTL_SECONDS_RE.search(m.group(1))
    return int(s.group(1)) if s else None


def modify_ttl(table: Table, db: str, seconds: int, cluster: str = "") -> str:
    on = f" ON CLUSTER {_ident(cluster)}" if cluster else ""
    return f"ALTER TABLE {_ident(db)}.{table.name}{on} MODIFY TTL {table.ttl_expr(seconds)}"
