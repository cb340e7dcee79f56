"""The ClickHouse store behind one clickhouse-connect Client: the embedded engine (chDB) at
`storage.path` when no address is configured, otherwise a remote ClickHouse over HTTP(S).

Opens the connection with errors that say what to fix, creates the schema, keeps each table's
TTL equal to the configuration, inserts batches and runs read-only queries. Batching and
spooling live in agent/sinks/batcher.py; this module only talks to ClickHouse.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent import units
from agent.config import Config
from agent.sinks import schema

log = logging.getLogger(__name__)

NATIVE_PORTS = {9000: 8123, 9440: 8443}
CHDB_SUBDIR = "chdb"
# Limits of the read session (set before readonly, which then freezes them).
READ_SETTINGS = {
    "max_execution_time": "10",
    "timeout_overflow_mode": "throw",
    "max_result_rows": "1000000",
    "max_result_bytes": str(64 << 20),
    "result_overflow_mode": "throw",
    "max_memory_usage": str(1 << 30),
    "max_rows_to_read": "1000000000",
    "max_bytes_to_read": str(64 << 30),
    "read_overflow_mode": "throw",
}

# The embedded engine's server settings, sized for an agent (ClickHouse's defaults are for a
# database server: 5 GB mark and index caches, a 128 MB compiled-expression cache). Given as
# start-up options of the engine in its connection string; the first client's start it.
ENGINE_SETTINGS = {
    "mark_cache_size": str(32 << 20),
    "index_mark_cache_size": str(8 << 20),
    "primary_index_cache_size": str(32 << 20),
    "uncompressed_cache_size": "0",
    "index_uncompressed_cache_size": "0",
    "compiled_expression_cache_size": str(8 << 20),
    "query_condition_cache_size": str(8 << 20),
    "mmap_cache_size": "64",
}
# The engine's allocator keeps freed pages for seconds (dirty_decay_ms 5000) and purges them
# only under memory pressure relative to a server's budget. After an insert, at most this
# often, the writer has it give them back (SYSTEM JEMALLOC PURGE, ~1 ms): measured with
# 50,000-row span batches, anonymous memory 147-155 MB instead of 201-232 MB.
PURGE_EVERY = 1.0


class StoreError(Exception):
    """The store cannot be used; the message names the setting to fix."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    secure: bool

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}"


def parse_address(address: str, tls: bool) -> Endpoint:
    """'host:port' (or a URL) -> Endpoint. The native-protocol ports get a clear refusal."""
    text = address.strip()
    m = re.fullmatch(r"(?:(https?)://)?(\[[^\]]+\]|[^:/\s]+)(?::(\d+))?/?", text)
    if not m:
        raise StoreError(f"global_clickhouse.address: expected host:port like clickhouse:8123, got {units.redact_url(address)!r}")
    scheme, host, port_s = m.groups()
    secure = tls or scheme == "https"
    port = int(port_s) if port_s else (8443 if secure else 8123)
    if port in NATIVE_PORTS:
        http_port = 8443 if (secure or port == 9440) else NATIVE_PORTS[port]
        raise StoreError(
            f"global_clickhouse.address {units.redact_url(address)!r}: port {port} is ClickHouse's native TCP protocol, "
            f"and coroot-agent talks to ClickHouse over HTTP(S). Use {host.strip('[]')}:{http_port}"
            + (" (HTTPS)" if http_port == 8443 else " (HTTP; or :8443 with tls_enable: true)")
        )
    return Endpoint(host.strip("[]"), port, secure)


def explain(err: Exception, where: str) -> str:
    """A connection or query failure, as a sentence with the fix."""
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (f"{where}: TLS certificate verification failed; set global_clickhouse.ca_file "
                "(--clickhouse-ca-file) to the CA that signed the server's certificate, or "
                "tls_skip_verify: true to skip verification")
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return f"{where}: the server does not speak TLS on this port; turn tls_enable off or use the HTTPS port"
    if "AUTHENTICATION_FAILED" in text or "Code: 516" in text or "Authentication failed" in text:
        return (f"{where}: authentication failed: check global_clickhouse.user and password "
                "(--clickhouse-user, --clickhouse-password)")
    if "ACCESS_DENIED" in text or "Code: 497" in text:
        return f"{where}: access denied: the ClickHouse user lacks a grant (see deploy/clickhouse/)"
    if any(s in text for s in ("Connection refused", "Max retries exceeded", "timed out", "Name or service not known")):
        first = text.splitlines()[0][:200]
        return f"{where}: cannot reach ClickHouse ({first})"
    return f"{where}: {text.splitlines()[0][:300] if text else type(err).__name__}"


class Store:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.database = cfg.clickhouse_database
        self.cluster = cfg.clickhouse_cluster
        self.embedded = cfg.embedded_store
        self.endpoint = None if self.embedded else parse_address(cfg.clickhouse_address, cfg.clickhouse_tls)
        self._client: Any = None
        self._reader: Any = None
        self._migrated = False
        self.schema_changes: list[str] = []  # what the last migrate() altered, rebuilt or recreated
        self._lock = threading.Lock()  # the writer client: schema and inserts
        self._read_lock = threading.Lock()  # the read session: queries, never in the writer's way
        self._purged = 0.0  # monotonic time of the last allocator purge

    @property
    def chdb_path(self) -> str:
        return os.path.join(self.cfg.storage_path, CHDB_SUBDIR)

    def describe(self) -> str:
        if self.embedded:
            return f"embedded ClickHouse engine (chDB) at {self.chdb_path}, database {self.database}"
        assert self.endpoint is not None
        return f"ClickHouse at {self.endpoint.url}, database {self.database}"

    # ------------------------------------------------------------ connect --

    def open(self) -> None:
        self._client = self._connect()

    def _connect(self, settings: dict[str, str] | None = None) -> Any:
        """A new client, with session settings (a remote store's reads get readonly=1)."""
        import clickhouse_connect
        from clickhouse_connect.driver import options

        # The agent inserts Python columns, never DataFrames: without this the first insert
        # imports pandas to ask whether the data is one (+29 MB anonymous, +14 MB of files).
        options.pd = None
        options.pd_time_test = None
        where = self.describe()
        try:
            if self.embedded:
                os.makedirs(self.chdb_path, exist_ok=True)
                client = clickhouse_connect.get_client(dsn=f"chdb://{self.chdb_path}", settings=settings,
                                                       chdb_options=ENGINE_SETTINGS)
            else:
                assert self.endpoint is not None
                kw: dict[str, Any] = {
                    "host": self.endpoint.host, "port": self.endpoint.port,
                    "username": self.cfg.clickhouse_user, "password": self.cfg.clickhouse_password,
                    "secure": self.endpoint.secure, "connect_timeout": 5, "send_receive_timeout": 30,
                }
                if self.endpoint.secure:
                    kw["verify"] = not self.cfg.clickhouse_tls_skip_verify
                    if self.cfg.clickhouse_ca_file:
                        kw["ca_cert"] = self.cfg.clickhouse_ca_file
                client = clickhouse_connect.get_client(**kw, settings=settings)
        except Exception as e:  # noqa: BLE001 - the driver raises many kinds
            raise StoreError(explain(e, where)) from e
        return client

    def close(self) -> None:
        with self._read_lock, self._lock:
            for attr in ("_reader", "_client"):
                client = getattr(self, attr)
                setattr(self, attr, None)
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # noqa: BLE001
                        log.debug("closing the store client", exc_info=True)

    def _need(self) -> Any:
        if self._client is None:
            self.open()
        return self._client

    # ------------------------------------------------------------- schema --

    def ttls(self) -> dict[str, int]:
        c = self.cfg
        return {"traces": int(c.traces_ttl), "logs": int(c.logs_ttl), "profiles": int(c.profiles_ttl),
                "metrics": int(c.metrics_ttl)}

    def migrate(self) -> list[str]:
        """Bring the database to this schema: tables made by an earlier version of the agent are
        altered (or rebuilt with every row when a key changes) and their views recreated; a
        schema the Coroot server created is accepted as it is; what is missing is created. Then
        every table's TTL is brought to the configured value. Returns the TTL changes made, as
        'table: old -> new' lines; the other changes are in `schema_changes`."""
        ttls = self.ttls()
        with self._lock:
            client = self._need()
            create_db = schema.migration(self.database, ttls, self.cluster)[0]
            try:
                client.command(create_db)
            except Exception as e:  # noqa: BLE001
                # Without CREATE DATABASE the database must already exist (deploy/clickhouse/).
                log.warning("%s; assuming database %s exists", explain(e, "CREATE DATABASE"), self.database)
            held = self._upgrade(client, ttls)
            for table in schema.TABLES:
                self._run(client, schema.create_table(table, self.database, ttls[table.signal], self.cluster),
                          "creating the schema")
            for view in schema.VIEWS:
                # A table left in an earlier shape keeps its earlier view (the engine checks a
                # view's columns against its table even when the view exists).
                if view.target not in held:
                    self._run(client, schema.create_view(view, self.database, self.cluster), "creating the schema")
            if self.cluster:
                for table in schema.TABLES:
                    self._run(client, schema.create_distributed(table, self.database, self.cluster),
                              "creating the schema")
            client.database = self.database
            changes = self._sync_ttls(client, ttls)
            self._migrated = True
            return changes

    def _run(self, client: Any, stmt: str, what: str, settings: dict[str, Any] | None = None) -> None:
        try:
            client.command(stmt, settings=settings)
        except Exception as e:  # noqa: BLE001
            raise StoreError(explain(e, f"{what} ({stmt.split('(')[0].strip()[:120]})")) from e

    def _existing(self, client: Any) -> tuple[dict[str, schema.ExistingTable], dict[str, tuple[set[str], str]]]:
        """The database's tables as the engine reports them, and each view's column names and
        CREATE statement."""
        db = schema._ident(self.database)  # a plain identifier: safe to inline
        cols: dict[str, dict[str, schema.ExistingColumn]] = {}
        for table, name, type_, kind, codec in client.query(
            "SELECT table, name, type, default_kind, compression_codec FROM system.columns "
            f"WHERE database = '{db}' ORDER BY table, position"
        ).result_rows:
            cols.setdefault(table, {})[name] = schema.ExistingColumn(type_, kind, codec)
        indexes: dict[str, set[str]] = {}
        for table, name in client.query(
            f"SELECT table, name FROM system.data_skipping_indices WHERE database = '{db}'"
        ).result_rows:
            indexes.setdefault(table, set()).add(name)
        tables: dict[str, schema.ExistingTable] = {}
        views: dict[str, tuple[set[str], str]] = {}
        for name, engine, pkey, skey, prim, query in client.query(
            "SELECT name, engine, partition_key, sorting_key, primary_key, create_table_query "
            f"FROM system.tables WHERE database = '{db}'"
        ).result_rows:
            if engine == "MaterializedView":
                views[name] = (set(cols.get(name, {})), query)
            else:
                tables[name] = schema.ExistingTable(name, engine, pkey, skey, prim, query,
                                                    cols.get(name, {}), frozenset(indexes.get(name, ())))
        return tables, views

    def _upgrade(self, client: Any, ttls: dict[str, int]) -> set[str]:
        """Alter or rebuild the tables that exist and differ from this schema; drop the views
        that no longer match their tables (they are created again after). What changed goes to
        `schema_changes`; returns the tables that keep an earlier shape.

        A missing column that cannot be added stops the start (the agent could not write); a
        codec, setting or index that cannot be changed, or a rebuild that fails (a grant the
        ClickHouse user lacks, a full disk), leaves the table as it was, with a warning."""
        db = self.database
        tables, views = self._existing(client)
        done: list[str] = []
        held: set[str] = set()
        self.schema_changes = done
        for name in list(tables):
            if name.endswith(schema.REBUILD_SUFFIX) and name.removesuffix(schema.REBUILD_SUFFIX) in schema.TABLES_BY_NAME:
                # An interrupted rebuild: the original still has every row (or, after the
                # exchange, the rebuilt copy has them all).
                self._run(client, f"DROP TABLE IF EXISTS {db}.{name}{self._on()}", "dropping an unfinished rebuild")
                del tables[name]
        plans = [schema.plan_table(t, tables[t.name], db, self.cluster) for t in schema.TABLES if t.name in tables]
        conflicts = [c for p in plans for c in p.conflicts]
        if conflicts:
            raise StoreError(f"the tables in database {db} cannot take the agent's rows: " + "; ".join(conflicts)
                             + ". Point the agent at another database (global_clickhouse.database) or drop these tables")
        for plan in plans:
            t = plan.table
            for kept in plan.kept:
                log.info("%s: kept as the Coroot server created it (%s)", t.name, kept)
            if plan.rebuild and self.cluster:
                log.warning(
                    "%s was created by an earlier coroot-agent (%s) and is not rebuilt on a cluster: the "
                    "Coroot server's queries of it may fail. To recreate it, drop %s, its _mv view and its "
                    "_distributed table ON CLUSTER %s (its rows are lost) and restart the agent",
                    t.name, "; ".join(plan.rebuild), t.name, self.cluster)
                held.add(t.name)
                continue
            for stmt, change in zip(plan.alters, plan.changes, strict=True):
                try:
                    self._run(client, stmt, "altering the schema")
                except StoreError as e:
                    if " ADD COLUMN " in stmt:
                        raise
                    log.warning("schema: not changed: %s (%s)", change, e)
                    continue
                log.info("schema: %s", change)
                done.append(change)
            if plan.rebuild:
                try:
                    dropped = self._rebuild(client, t, tables[t.name], ttls[t.signal], views)
                except StoreError as e:
                    log.warning("schema: %s keeps the shape an earlier version gave it (%s): %s",
                                t.name, "; ".join(plan.rebuild), e)
                    held.add(t.name)
                    continue
                lines = [f"{t.name}: rebuilt ({'; '.join(plan.rebuild)})"]
                lines += [f"{v}: recreated (its table was rebuilt)" for v in dropped]
                for line in lines:
                    log.info("schema: %s", line)
                done += lines
        tables, views = self._existing(client)
        for view in schema.VIEWS:
            target = tables.get(view.target)
            if view.name not in views or target is None or view.target in held:
                continue
            have = views[view.name][0]
            # The columns of the target that this schema's view writes: a view that leaves one
            # out is an earlier version's, made for an earlier shape of the table.
            feeds = {c for c in schema.TABLES_BY_NAME[view.target].insert_columns if c in target.columns}
            if not feeds <= have:
                self._run(client, schema.drop_view(view, db, self.cluster), "dropping a view")
                line = f"{view.name}: recreated (it did not write {', '.join(sorted(feeds - have))})"
                log.info("schema: %s", line)
                done.append(line)
        return held

    def _rebuild(self, client: Any, table: schema.Table, existing: schema.ExistingTable, ttl: int,
                 views: dict[str, tuple[set[str], str]]) -> list[str]:
        """Rebuild one table on one node. The views that write into it are dropped once the new
        table exists, and created again by the caller (the agent writes nothing before its
        migration is done); if the copy fails they are put back as they were and the old table
        stays. Returns the views dropped."""
        db = self.database
        drop_tmp, create_tmp, insert, exchange, drop_old = schema.rebuild_statements(table, existing, db, ttl)
        what = f"rebuilding {table.name}"
        self._run(client, drop_tmp, what)
        self._run(client, create_tmp, what)
        saved = [(v, views[v.name][1]) for v in schema.VIEWS if v.target == table.name and v.name in views]
        dropped: list[str] = []
        try:
            for view, _ in saved:
                self._run(client, schema.drop_view(view, db), what)
                dropped.append(view.name)
            # Every row is copied: identical blocks are not duplicates here.
            self._run(client, insert, what, {"insert_deduplicate": 0})
            if table.engine == "MergeTree":  # no rows merge away: the copy has exactly as many
                old = int(client.command(f"SELECT count() FROM {db}.{table.name}"))
                new = int(client.command(f"SELECT count() FROM {db}.{table.name}{schema.REBUILD_SUFFIX}"))
                if old != new:
                    raise StoreError(f"{what}: copied {new} of {old} rows")
            self._run(client, exchange, what)
        except StoreError:
            for view, create in saved:
                if view.name in dropped:
                    self._run(client, create, f"putting back {view.name}")
            try:
                self._run(client, drop_tmp, what)
            except StoreError as e:
                log.warning("%s (dropped at the next start)", e)
            raise
        try:
            self._run(client, drop_old, what)
        except StoreError as e:
            log.warning("%s (dropped at the next start)", e)
        return dropped

    def _on(self) -> str:
        return f" ON CLUSTER {schema._ident(self.cluster)}" if self.cluster else ""

    def _sync_ttls(self, client: Any, ttls: dict[str, int]) -> list[str]:
        db = schema._ident(self.database)  # a plain identifier: safe to inline
        rows = client.query(
            f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}'"
        ).result_rows
        existing = dict(rows)
        changes = []
        for table in schema.TABLES:
            query = existing.get(table.name)
            if query is None or not table.ttl_column:
                continue
            want = ttls[table.signal]
            have = schema.ttl_seconds_of(query)
            if have == want:
                continue
            try:
                client.command(schema.modify_ttl(table, self.database, want, self.cluster))
            except Exception as e:  # noqa: BLE001
                raise StoreError(explain(e, f"ALTER TABLE {table.name} MODIFY TTL")) from e
            line = f"{table.name}: {_fmt_ttl(have)} -> {_fmt_ttl(want)}"
            log.info("TTL changed on %s", line)
            changes.append(line)
        return changes

    # -------------------------------------------------------------- data ---

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], token: str) -> None:
        """Insert one batch. `token` makes a retried batch count once. A store that was not
        reachable at start-up gets its schema first."""
        # column-oriented: measured ~15% faster than row-oriented for span batches; the
        # columns are zip's tuples, not copied again into lists
        data: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [[] for _ in columns]
        self.insert_columns(table, columns, data, token)

    def insert_columns(self, table: str, columns: Sequence[str], data: Sequence[Sequence[Any]], token: str) -> None:
        """`insert` of a batch given as columns: one sequence of values per column."""
        if not self._migrated:
            self.migrate()
        with self._lock:
            client = self._need()
            ctx = None
            try:
                ctx = client.create_insert_context(
                    f"{self.database}.{table}", column_names=list(columns), data=data, column_oriented=True,
                    settings={"insert_deduplication_token": token,
                              "deduplicate_blocks_in_dependent_materialized_views": 1})
                client.data_insert(ctx)
            except Exception as e:  # noqa: BLE001
                # A broken connection is rebuilt on the next try.
                if not self.embedded:
                    self._drop_client()
                raise StoreError(explain(e, f"insert into {table}")) from e
            finally:
                _release(ctx)
            if self.embedded and time.monotonic() - self._purged >= PURGE_EVERY:
                self._purged = time.monotonic()
                try:
                    client.command("SYSTEM JEMALLOC PURGE")
                except Exception:  # noqa: BLE001 - an engine built without jemalloc
                    log.debug("SYSTEM JEMALLOC PURGE", exc_info=True)

    def _drop_client(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass
        self._client = None

    def query(self, sql: str, fmt: str = "TSVWithNames") -> bytes:
        """Run one read of the agent's data (agent/query.py decides what that is, with the
        engine's own parser) and return its result in `fmt`.

        Queries run on their own client, a session of their own: with the embedded engine, a
        second chDB client has its own settings and runs beside the writer (measured: 40 s of
        concurrent inserts and reads, no stall), so a query never holds the lock inserts take.
        That session has the limits of READ_SETTINGS and then readonly=1 set once, for good:
        nothing a query says can change them. A remote store gets readonly=2 with the same
        limits on every request. One query at a time."""
        from agent.query import EngineError, validate

        with self._read_lock:
            reader = self._need_reader()

            def engine(stmt: str) -> str:
                try:
                    return bytes(reader.raw_query(stmt, fmt="TSVRaw")).decode(errors="replace")
                except Exception as e:  # noqa: BLE001 - the driver raises many kinds
                    raise EngineError(str(e)) from None

            stmt = validate(sql, engine, self.database)
            try:
                return bytes(reader.raw_query(stmt, fmt=fmt))
            except Exception as e:  # noqa: BLE001
                if not self.embedded:
                    self._reader = None
                raise StoreError(explain(e, "query")) from e

    def _need_reader(self) -> Any:
        if self._reader is None:
            settings = dict(READ_SETTINGS)
            settings["readonly"] = "1" if self.embedded else "2"  # last: after it, nothing changes
            reader = self._connect(settings)
            reader.database = self.database
            self._reader = reader
        return self._reader

    def engine_resident(self) -> int | None:
        """Bytes of the embedded engine's heap: its allocator's active pages and metadata
        (jemalloc's `resident` is an upper bound that counts pages never touched, seen above the
        process's whole anonymous memory); None for a remote store or when not known."""
        if not self.embedded or self._client is None:
            return None
        with self._read_lock:
            try:
                text = bytes(self._need_reader().raw_query("SELECT stats FROM system.jemalloc_stats", fmt="TSVRaw"))
            except Exception:  # noqa: BLE001 - an engine without jemalloc, or closing
                log.debug("jemalloc_stats", exc_info=True)
                return None
        m = re.search(rb"Allocated: \d+, active: (\d+), metadata: (\d+)", text)
        return int(m.group(1)) + int(m.group(2)) if m else None

    def ping(self) -> bool:
        with self._lock:
            try:
                self._need().command("SELECT 1")
                return True
            except Exception:  # noqa: BLE001
                if not self.embedded:
                    self._client = None
                return False


def _fmt_ttl(seconds: int | None) -> str:
    if seconds is None:
        return "none"
    from agent.units import format_duration

    return format_duration(seconds)


def _release(ctx: Any) -> None:
    """Let an insert's columns go as soon as it is done. clickhouse-connect's insert context
    keeps a bound method of itself (a reference cycle) and, through it, the batch's columns
    and the per-block lists it made: without this they wait for the cyclic collector's oldest
    generation, seen here as ~65 MB of garbage after a few 50,000-row span batches."""
    if ctx is None:
        return
    ctx.data = None
    for attr in ("_next_block_data", "_block_columns", "_block_rows"):
        vars(ctx).pop(attr, None)
