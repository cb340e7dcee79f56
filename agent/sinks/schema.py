"""The ClickHouse schema of the Coroot server: tables, columns, codecs, keys, indexes, settings
and materialized views as the server creates them (coroot/coroot, ch/client.go), so that the
server's own queries run unchanged on what the agent writes. One deliberate difference: span
time (otel_traces.Timestamp) is DoubleDelta+ZSTD, as the seed's security model asks; and tables
this agent creates on one node keep a deduplication window for retried batches.

Generates DDL for one node or a cluster (ON CLUSTER, Replicated engines, `_distributed` tables),
the TTL expressions that the store keeps in line with the configuration, and the plan that
brings a table made by an earlier version of the agent to this shape. Pure: builds strings,
runs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SIGNALS = ("traces", "logs", "profiles", "metrics")
SPAN_TIME_CODEC = "CODEC(DoubleDelta, ZSTD(1))"  # the seed asks DoubleDelta+ZSTD for span time
TIME_CODEC = "CODEC(Delta, ZSTD(1))"  # every other time column, as the server has it
MAP = "Map(LowCardinality(String), String)"
LC = "LowCardinality(String)"
# Latency buckets of otel_traces_histogram, in milliseconds.
HISTOGRAM_BUCKETS_MS = (0, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
DEFAULT_SETTINGS = "index_granularity = 8192, ttl_only_drop_parts = 1"
# A table being rebuilt by the start-up migration is filled under this suffix, then exchanged.
REBUILD_SUFFIX = "__new"


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
    order_by: str  # "" when PRIMARY KEY alone orders the table (the server writes it so)
    ttl_column: str  # "" for a table without TTL
    partition_by: str = ""
    primary_key: str = ""
    indexes: tuple[str, ...] = ()
    settings: str = DEFAULT_SETTINGS
    sharding_key: str = "rand()"
    engine_args: str = ""
    # Values for columns that an older table lacks, when its rows are carried into this shape.
    carried: tuple[tuple[str, str], ...] = ()

    @property
    def insert_columns(self) -> list[str]:
        """Columns a writer supplies, Nested ones flattened (Events.Timestamp, ...)."""
        out: list[str] = []
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
        """`DateTime64` time is cast (toDateTime(x)); a `DateTime` column is used as it is."""
        if not self.ttl_column:
            raise ValueError(f"{self.name} has no TTL")
        col = next(c for c in self.columns if c.name == self.ttl_column)
        base = f"toDateTime({col.name})" if col.type.startswith("DateTime64") else col.name
        return f"{base} + toIntervalSecond({int(seconds)})"


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


def _t(name: str, type_: str = "DateTime64(9)") -> Column:
    return Column(name, type_, TIME_CODEC)


_BLOOM_MAPS = (
    "INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
)

TABLES: tuple[Table, ...] = (
    Table(
        "otel_traces", "traces",
        (
            Column("Timestamp", "DateTime64(9)", SPAN_TIME_CODEC), _c("TraceId", "String"),
            _c("SpanId", "String"), _c("ParentSpanId", "String"), _c("TraceState", "String"),
            _c("SpanName", LC), _c("SpanKind", LC), _c("ServiceName", LC),
            _c("ResourceAttributes", MAP), _c("SpanAttributes", MAP), _c("Duration", "Int64"),
            _c("StatusCode", LC), _c("StatusMessage", "String"),
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
        partition_by="toDate(Start)",
        indexes=("INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1",),
        sharding_key="",
    ),
    Table(
        "otel_traces_service_name", "traces",
        (_c("ServiceName", LC), _t("LastSeen")),
        "ReplacingMergeTree", "", "LastSeen", partition_by="toDate(LastSeen)",
        primary_key="(ServiceName)", settings="", sharding_key="",
    ),
    Table(
        # Every span, by its kind, root flag and peer: the server filters on these.
        "otel_traces_histogram", "traces",
        (
            _c("ServiceName", LC), _c("SpanName", LC), _c("SpanKind", LC), _c("Root", "UInt8"),
            _c("NetSockPeerAddr", LC), _c("NetPeerName", LC), _c("NetPeerPort", LC),
            _t("Timestamp", "DateTime"), _c("Bucket", "Float64"), _c("Total", "UInt64"),
            _c("Failed", "UInt64"),
        ),
        "SummingMergeTree",
        "(ServiceName, SpanName, SpanKind, Root, Timestamp, NetSockPeerAddr, NetPeerName, NetPeerPort, Bucket)",
        "Timestamp", partition_by="toDate(Timestamp)",
        # The previous version's histogram counted root spans only.
        carried=(("Root", "1"),),
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
            _t("Timestamp", "DateTime64(3, 'UTC')"), _c("MetricHash", "UInt64"),
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
    Table(
        # One row per metric family (Type as remote_write names it: COUNTER, GAUGE, ...).
        # The server gives it no TTL.
        "metrics_metadata", "metrics",
        (_c("MetricFamilyName", LC), _c("Type", LC), _c("Help", "String"), _c("Unit", LC)),
        "ReplacingMergeTree", "MetricFamilyName", "",
        settings="index_granularity = 8192", sharding_key="sipHash64(MetricFamilyName)",
    ),
)

_buckets = ",".join(str(b) for b in HISTOGRAM_BUCKETS_MS)
VIEWS: tuple[View, ...] = (
    View("otel_traces_trace_id_ts_mv", "otel_traces_trace_id_ts",
         "SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End FROM {db}.otel_traces "
         "WHERE TraceId != '' GROUP BY TraceId"),
    View("otel_traces_service_name_mv", "otel_traces_service_name",
         "SELECT ServiceName, max(Timestamp) AS LastSeen FROM {db}.otel_traces GROUP BY ServiceName"),
    View("otel_traces_histogram_mv", "otel_traces_histogram",
         "SELECT ServiceName, SpanName, SpanKind, ParentSpanId = '' AS Root, NetSockPeerAddr, "
         "SpanAttributes['net.peer.name'] AS NetPeerName, SpanAttributes['net.peer.port'] AS NetPeerPort, "
         "toDateTime(toStartOfMinute(Timestamp)) AS Timestamp, "
         f"roundDown(Duration / 1000000, [{_buckets}]) AS Bucket, count(1) AS Total, "
         "countIf(StatusCode = 'STATUS_CODE_ERROR') AS Failed FROM {db}.otel_traces "
         "GROUP BY ServiceName, SpanName, SpanKind, Root, NetSockPeerAddr, NetPeerName, NetPeerPort, "
         "Timestamp, Bucket"),
    View("otel_logs_service_name_severity_text_mv", "otel_logs_service_name_severity_text",
         "SELECT ServiceName, SeverityText, max(Timestamp) AS LastSeen FROM {db}.otel_logs "
         "GROUP BY ServiceName, SeverityText"),
    View("profiling_profiles_mv", "profiling_profiles",
         "SELECT ServiceName, Type, max(End) AS LastSeen FROM {db}.profiling_samples "
         "GROUP BY ServiceName, Type"),
)

TABLES_BY_NAME = {t.name: t for t in TABLES}
# The tables the agent writes to; the others are fed by materialized views.
WRITTEN = ("otel_traces", "otel_logs", "profiling_stacks", "profiling_samples", "metrics",
           "metrics_metadata")
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
        # positions whose default is a list or dict: each row gets its own (measured: checking
        # every column's default per row was most of a span row's cost)
        self._mutable = tuple((i, type(d)) for i, d in enumerate(self._defaults) if isinstance(d, (list, dict)))

    def __call__(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        row = list(self._defaults)
        index = self._index
        try:
            for name, v in values.items():
                row[index[name]] = v
        except KeyError as e:
            raise KeyError(f"{self.table} has no column {e.args[0]!r}") from None
        defaults = self._defaults
        for i, make in self._mutable:  # mutable defaults are not shared between rows
            if row[i] is defaults[i]:
                row[i] = make()
        return tuple(row)


_BUILDERS: dict[str, RowBuilder] = {}


def row(table: str, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """One row of `table` (one of WRITTEN) in insert order, from values named by column."""
    b = _BUILDERS.get(table)
    if b is None:
        b = _BUILDERS[table] = RowBuilder(table)
    return b(values)


def columns(table: str, values: Mapping[str, list[Any]], n: int) -> list[list[Any]]:
    """`n` rows of `table` (one of WRITTEN) as columns in insert order, from lists named by
    column. A column left out holds its type's default in every row: one object, shared (the
    store only reads them). A name the table does not have, or a list of another length, is an
    error."""
    b = _BUILDERS.get(table)
    if b is None:
        b = _BUILDERS[table] = RowBuilder(table)
    for name, col in values.items():
        if name not in b._index:
            raise KeyError(f"{table} has no column {name!r}")
        if len(col) != n:
            raise ValueError(f"{table}.{name}: {len(col)} values for {n} rows")
    return [values[name] if name in values else [d] * n for name, d in zip(b.columns, b._defaults, strict=True)]


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"not a plain ClickHouse identifier: {name!r}")
    return name


def _on(cluster: str) -> str:
    return f" ON CLUSTER {_ident(cluster)}" if cluster else ""


def engine(table: Table, cluster: str) -> str:
    if cluster:
        path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
        args = table.engine_args[1:-1] if table.engine_args else ""
        return f"Replicated{table.engine}({path}{', ' + args if args else ''})"
    return f"{table.engine}{table.engine_args or '()'}"


def settings_of(table: Table, cluster: str) -> str:
    """The SETTINGS clause's content for a table this agent creates."""
    settings = [table.settings] if table.settings else []
    if not cluster:
        # A batch retried after an ambiguous failure carries the same insert_deduplication_token:
        # the store keeps it once, and so do the views' target tables (which is why every table
        # has the window). Replicated tables deduplicate by default.
        settings.append(f"non_replicated_deduplication_window = {DEDUP_WINDOW}")
    return ", ".join(settings)


def create_table(table: Table, db: str, ttl_seconds: int, cluster: str = "", name: str = "") -> str:
    """CREATE TABLE IF NOT EXISTS for `table`, under `name` when given (a rebuild's copy)."""
    db = _ident(db)
    body = ",\n    ".join([c.ddl() for c in table.columns] + list(table.indexes))
    parts = [f"CREATE TABLE IF NOT EXISTS {db}.{_ident(name or table.name)}{_on(cluster)} (\n    {body}\n)",
             f"ENGINE = {engine(table, cluster)}"]
    if table.partition_by:
        parts.append(f"PARTITION BY {table.partition_by}")
    if table.primary_key:
        parts.append(f"PRIMARY KEY {table.primary_key}")
    if table.order_by:
        parts.append(f"ORDER BY {table.order_by}")
    if table.ttl_column:
        parts.append(f"TTL {table.ttl_expr(ttl_seconds)}")
    settings = settings_of(table, cluster)
    if settings:
        parts.append("SETTINGS " + settings)
    return "\n".join(parts)


def create_view(view: View, db: str, cluster: str = "") -> str:
    db = _ident(db)
    return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{view.name}{_on(cluster)} TO {db}.{view.target} AS "
            + view.select.format(db=db))


def drop_view(view: View, db: str, cluster: str = "") -> str:
    return f"DROP VIEW IF EXISTS {_ident(db)}.{view.name}{_on(cluster)}"


def create_distributed(table: Table, db: str, cluster: str) -> str:
    db, cluster = _ident(db), _ident(cluster)
    key = f", {table.sharding_key}" if table.sharding_key else ""
    return (f"CREATE TABLE IF NOT EXISTS {db}.{table.name}_distributed ON CLUSTER {cluster} "
            f"AS {db}.{table.name} ENGINE = Distributed({cluster}, {db}, {table.name}{key})")


def migration(db: str, ttls: dict[str, int], cluster: str = "") -> list[str]:
    """Every statement, in order, to create the schema (idempotent)."""
    out = [f"CREATE DATABASE IF NOT EXISTS {_ident(db)}{_on(cluster)}"]
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
    return f"ALTER TABLE {_ident(db)}.{table.name}{_on(cluster)} MODIFY TTL {table.ttl_expr(seconds)}"


# ------------------------------------------------------------------ migration of an existing table


@dataclass(frozen=True)
class ExistingColumn:
    type: str
    default_kind: str  # '', DEFAULT, MATERIALIZED, ALIAS
    codec: str  # as system.columns reports it: 'CODEC(Delta(8), ZSTD(1))'


@dataclass(frozen=True)
class ExistingTable:
    """A table as the engine reports it (system.tables, system.columns, system.data_skipping_indices)."""

    name: str
    engine: str
    partition_key: str
    sorting_key: str
    primary_key: str
    create_query: str
    columns: Mapping[str, ExistingColumn] = field(default_factory=dict)
    indexes: frozenset[str] = frozenset()


@dataclass
class TablePlan:
    """What start-up does to one existing table: ALTER statements, or a rebuild (a new table in
    this shape, filled from the old one, then exchanged with it) when a key must change."""

    table: Table
    alters: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # what the alters change, for the log
    rebuild: list[str] = field(default_factory=list)  # why a rebuild is needed
    kept: list[str] = field(default_factory=list)  # differences left as found (not ours to change)
    conflicts: list[str] = field(default_factory=list)  # columns of another type: cannot write


def _norm_expr(expr: str) -> str:
    """A key expression without spaces and without one pair of parentheses around it all."""
    e = re.sub(r"\s+", "", expr)
    if e.startswith("(") and e.endswith(")"):
        depth = 0
        for i, ch in enumerate(e):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(e) - 1:
                return e
        return e[1:-1]
    return e


def _norm_codec(codec: str) -> str:
    """CODEC(Delta(8), ZSTD(1)) and CODEC(Delta, ZSTD(1)) are one codec: the engine fills in
    the width from the type."""
    c = re.sub(r"\s+", "", codec)
    return re.sub(r"\b(Delta|DoubleDelta|Gorilla|T64)\(\d+\)", r"\1", c)


def _split_settings(text: str) -> dict[str, str]:
    out = {}
    for part in _split_top(text):
        k, _, v = part.partition("=")
        if k.strip():
            out[k.strip()] = v.strip()
    return out


def settings_in(create_query: str) -> dict[str, str]:
    """The SETTINGS of a CREATE TABLE statement as ClickHouse reports it."""
    m = re.search(r"\bSETTINGS\s+(.*)$", create_query, re.S)
    return _split_settings(m.group(1)) if m else {}


def wanted_columns(table: Table) -> dict[str, tuple[Column, str, str]]:
    """Every column the engine will report for `table`: name -> (the Column it comes from, type,
    default kind). Nested columns appear flattened, as arrays."""
    out: dict[str, tuple[Column, str, str]] = {}
    for c in table.columns:
        m = re.fullmatch(r"Nested\((.*)\)", c.type, re.S)
        if m:
            for part in _split_top(m.group(1)):
                name, _, type_ = part.strip().partition(" ")
                out[f"{c.name}.{name}"] = (c, f"Array({type_.strip()})", "")
        else:
            out[c.name] = (c, c.type, "MATERIALIZED" if c.materialized else "")
    return out


def made_by_agent(existing: ExistingTable) -> bool:
    """Whether coroot-agent created this table (an earlier version included): only it writes
    DoubleDelta codecs or a non-replicated deduplication window. The server does neither, and
    a table it created is left as it is."""
    return ("DoubleDelta" in existing.create_query
            or "non_replicated_deduplication_window" in existing.create_query)


def plan_table(table: Table, existing: ExistingTable, db: str, cluster: str = "") -> TablePlan:
    """Compare a table in the database with this schema's and say what to do about it.

    Missing columns and indexes are added, as the server itself does. A table this agent made
    also gets this schema's codecs and settings, and is rebuilt when its engine, partitioning or
    sorting key differ; one the server made keeps them (and its differences are reported)."""
    plan = TablePlan(table)
    ours = made_by_agent(existing)
    name = f"{_ident(db)}.{table.name}{_on(cluster)}"
    want = wanted_columns(table)
    for col, (_col, type_, _kind) in want.items():
        have = existing.columns.get(col)
        if have is not None and have.type != type_:
            plan.conflicts.append(f"{table.name}.{col} is {have.type}, expected {type_}")
    if plan.conflicts:
        return plan

    base = existing.engine.removeprefix("Replicated")
    keys = [("engine", base, table.engine),
            ("partition key", existing.partition_key, table.partition_by),
            ("sorting key", existing.sorting_key, table.order_by or table.primary_key),
            ("primary key", existing.primary_key, table.primary_key or table.order_by)]
    for what, have_key, wanted in keys:
        if _norm_expr(have_key) != _norm_expr(wanted):
            (plan.rebuild if ours else plan.kept).append(
                f"{what} {have_key or 'none'!r}, expected {wanted or 'none'!r}")
    have_settings = settings_in(existing.create_query)
    wanted_settings = _split_settings(settings_of(table, cluster))
    if ours and have_settings.get("index_granularity", "8192") != wanted_settings.get("index_granularity", "8192"):
        plan.rebuild.append("index_granularity differs")  # fixed when the table is created
    if plan.rebuild:
        return plan

    added: set[str] = set()
    for col, (c, _type, _kind) in want.items():
        if col not in existing.columns and c.name not in added:
            added.add(c.name)
            plan.alters.append(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {c.ddl()}")
            plan.changes.append(f"{table.name}: column {c.name} added")
    for index in table.indexes:
        idx_name = index.split()[1]
        if idx_name not in existing.indexes:
            plan.alters.append(f"ALTER TABLE {name} ADD {index.replace('INDEX ', 'INDEX IF NOT EXISTS ', 1)}")
            plan.changes.append(f"{table.name}: index {idx_name} added")
    if not ours:
        return plan
    for col, (c, _type, _kind) in want.items():
        have = existing.columns.get(col)
        if have is None or c.name != col or c.materialized:
            continue  # added above, a Nested part, or computed
        if _norm_codec(have.codec) != _norm_codec(c.codec):
            plan.alters.append(f"ALTER TABLE {name} MODIFY COLUMN {col} {c.codec}")
            plan.changes.append(f"{table.name}.{col}: codec {have.codec} -> {c.codec}")
    for key, value in wanted_settings.items():
        if key != "index_granularity" and have_settings.get(key) != value:
            plan.alters.append(f"ALTER TABLE {name} MODIFY SETTING {key} = {value}")
            plan.changes.append(f"{table.name}: setting {key} = {value}")
    return plan


def rebuild_statements(table: Table, existing: ExistingTable, db: str, ttl_seconds: int) -> list[str]:
    """One node: a table in this shape under a temporary name, filled with every row of the
    old one (columns it lacks get `carried` values or their defaults), then exchanged with it
    and the old one dropped. The caller drops the views that write into the table first, runs
    the INSERT without block deduplication, and recreates the views after."""
    db = _ident(db)
    tmp = table.name + REBUILD_SUFFIX
    carried = dict(table.carried)
    names, exprs = [], []
    for col in table.insert_columns:
        if col in existing.columns:
            names.append(f"`{col}`")
            exprs.append(f"`{col}`")
        elif col in carried:
            names.append(f"`{col}`")
            exprs.append(f"{carried[col]} AS `{col}`")
    return [
        f"DROP TABLE IF EXISTS {db}.{tmp}",
        create_table(table, db, ttl_seconds, name=tmp),
        f"INSERT INTO {db}.{tmp} ({', '.join(names)}) SELECT {', '.join(exprs)} FROM {db}.{table.name}",
        f"EXCHANGE TABLES {db}.{table.name} AND {db}.{tmp}",
        f"DROP TABLE {db}.{tmp}",
    ]
