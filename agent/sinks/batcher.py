"""Batching between producers (spans, logs, profiles, metrics) and the ClickHouse store.

Rows go into a per-table batch; a batch is sealed at `max_rows` or `max_age` and written by a
background thread. Producers never wait on the store: while it fails, sealed batches go to the
disk spool (bounded; the oldest are dropped and counted by table) and are retried, oldest
first, with exponential backoff. Each batch carries a deduplication token, so a batch retried
after an ambiguous failure is stored once. close() writes everything, spooled batches included,
or spools what it cannot write; while the store is failing (its backoff has not run out) it
spools at once, without waiting for the store again.

Rows are tuples in the table's insert order: producers build them by column name with
agent/sinks/schema.py `row()`. A producer of many rows at once hands them as columns
(`add_columns`, built with schema.py `columns()`): the batch then stays columns, and the store
takes them as they are. A component (agent/component.py): started, self-metrics, closed.
"""

from __future__ import annotations

import logging
import marshal
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.component import Component
from agent.metrics import Families
from agent.sinks import schema
from agent.sinks.spool import Spool
from agent.sinks.store import Store, StoreError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Rows of one table: as tuples (`rows`), or as columns (`columns`, one list per insert
    column) once a producer handed columns."""

    table: str
    created: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    rows: list[Sequence[Any]] = field(default_factory=list)
    columns: list[list[Any]] | None = None

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns is not None else len(self.rows)


@dataclass
class SinkStats:
    written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dropped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    spooled: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: int = 0
    last_error: str = ""
    last_success: float = 0.0


class Sink(Component):
    name = "sink"

    def __init__(
        self,
        store: Store,
        spool: Spool,
        max_rows: int = 10_000,
        max_age: float = 5.0,
        max_pending: int = 4,
        max_pending_rows: int = 100_000,
        backoff: tuple[float, float] = (1.0, 30.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.spool = spool
        self.max_rows = max_rows
        self.max_age = max_age
        self.max_pending = max_pending
        self.max_pending_rows = max_pending_rows
        self.backoff_min, self.backoff_max = backoff
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, Batch] = {}
        self._ready: deque[Batch] = deque()
        self._delay = 0.0
        self._next_try = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._columns = {t: schema.TABLES_BY_NAME[t].insert_columns for t in schema.WRITTEN}
        self.stats = SinkStats()

    def columns(self, table: str) -> list[str]:
        return self._columns[table]

    # ---------------------------------------------------------- producers --

    def add(self, table: str, row: Sequence[Any]) -> None:
        """Queue one row (a tuple in `columns(table)` order). Never blocks on the store."""
        with self._lock:
            b = self._open.get(table)
            if b is None:
                b = self._open[table] = Batch(table, self._clock())
            if b.columns is not None:
                for col, v in zip(b.columns, row, strict=True):
                    col.append(v)
            else:
                b.rows.append(row)
            if len(b) >= self.max_rows:
                self._seal_locked(b)

    def add_many(self, table: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self.add(table, row)

    def add_columns(self, table: str, columns: Sequence[list[Any]]) -> None:
        """Queue rows given as columns (one list per column, in `columns(table)` order, all as
        long). Never blocks on the store; a batch is still sealed at `max_rows` (it may pass it
        by the rows of this call)."""
        if len(columns) != len(self._columns[table]):
            raise ValueError(f"{table}: {len(columns)} columns, expected {len(self._columns[table])}")
        if not columns[0]:
            return
        with self._lock:
            b = self._open.get(table)
            if b is None:
                b = self._open[table] = Batch(table, self._clock(), columns=[list(c) for c in columns])
            else:
                if b.columns is None:  # rows so far: the batch becomes columns
                    b.columns = [list(c) for c in zip(*b.rows, strict=True)] if b.rows else [[] for _ in columns]
                    b.rows = []
                for have, more in zip(b.columns, columns, strict=True):
                    have.extend(more)
            if len(b) >= self.max_rows:
                self._seal_locked(b)

    def _seal_locked(self, b: Batch) -> None:
        del self._open[b.table]
        self._ready.append(b)
        # memory stays bounded while the store lags: at most max_pending sealed batches, and
        # beyond the newest one at most max_pending_rows rows in them (batches of 50,000 rows)
        while len(self._ready) > self.max_pending or (
                len(self._ready) > 1 and sum(len(r) for r in self._ready) > self.max_pending_rows):
            self._to_spool(self._ready.popleft())

    # ------------------------------------------------------------ flusher --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="store-sink", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self._warm_up()
        while not self._stop.wait(0.2):
            try:
                self.flush_once()
            except Exception:  # noqa: BLE001 - keep flushing whatever happens
                log.exception("store sink")

    def _warm_up(self) -> None:
        """The embedded engine's first insert of a process takes 0.3-1 s (measured; its insert
        path starts up), the next ones milliseconds: an empty insert pays that now, on this
        thread, rather than the first batch or, when the agent stops soon after it started,
        the last flush."""
        if not self.store.embedded:
            return
        try:
            self.store.insert("metrics", self._columns["metrics"], [], uuid.uuid4().hex)
        except StoreError as e:
            log.debug("store: warming up the insert path: %s", e)

    def flush_once(self, force: bool = False) -> None:
        """Seal aged batches and write what can be written now."""
        now = self._clock()
        with self._lock:
            for b in list(self._open.values()):
                if force or now - b.created >= self.max_age:
                    self._seal_locked(b)
        if not force and now < self._next_try:
            return
        while (item := self.spool.oldest()) is not None:
            entry, payload = item
            try:
                data = marshal.loads(payload)
            except (ValueError, EOFError, TypeError):
                log.error("store spool: unreadable entry %s dropped", entry.path)
                self.stats.dropped[entry.tag] += entry.count
                self.spool.remove(entry)
                continue
            if not self._write(data["table"], data["columns"], data.get("rows"), data["token"], data.get("data")):
                self._spool_ready()
                return
            self.spool.remove(entry)
        self._write_ready()

    def _seal_all(self) -> None:
        """At close: every open batch becomes ready (one per table; memory is no longer the
        concern, and a batch spooled now would wait for the next start)."""
        with self._lock:
            self._ready.extend(self._open.values())
            self._open.clear()

    def _write_ready(self) -> None:
        """Write sealed batches, oldest first; on the first failure spool them all."""
        while True:
            with self._lock:
                if not self._ready:
                    return
                b = self._ready.popleft()
            if not self._write(b.table, self._columns[b.table], b.rows, b.token, b.columns):
                with self._lock:
                    self._ready.appendleft(b)
                self._spool_ready()
                return

    def _write(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]] | None, token: str,
               data: Sequence[Sequence[Any]] | None = None) -> bool:
        """Insert rows, or columns (`data`) when given."""
        try:
            if data is not None:
                self.store.insert_columns(table, columns, data, token)
                n = len(data[0]) if data else 0
            else:
                assert rows is not None
                self.store.insert(table, columns, rows, token)
                n = len(rows)
        except StoreError as e:
            self.stats.errors += 1
            if str(e) != self.stats.last_error:
                log.warning("store: %s; spooling to %s and retrying", e, self.spool.dir)
            self.stats.last_error = str(e)
            self._delay = min(self.backoff_max, max(self.backoff_min, self._delay * 2))
            self._next_try = self._clock() + self._delay
            return False
        if self._delay:
            log.info("store: writing again after %s", self.stats.last_error or "an error")
        self._delay = 0.0
        self.stats.last_error = ""
        self.stats.written[table] += n
        self.stats.last_success = time.time()
        return True

    def _spool_ready(self) -> None:
        with self._lock:
            batches = list(self._ready)
            self._ready.clear()
        for b in batches:
            self._to_spool(b)

    def _to_spool(self, b: Batch) -> None:
        # marshal: several times faster than JSON for rows of tuples, dicts and lists, and it
        # builds plain data only (never arbitrary objects, unlike pickle). A batch of columns
        # is spooled as columns ("data"), one of rows as rows.
        entry: dict[str, Any] = {"table": b.table, "columns": self._columns[b.table], "token": b.token}
        if b.columns is not None:
            entry["data"] = b.columns
        else:
            entry["rows"] = b.rows
        n = len(b)
        payload = marshal.dumps(entry, 4)
        for dropped in self.spool.push(b.table, n, payload):
            self.stats.dropped[dropped.tag] += dropped.count
            log.warning("store spool full (%d bytes): dropped a batch of %d %s rows",
                        self.spool.max_bytes, dropped.count, dropped.tag)
        self.stats.spooled[b.table] += n

    def close(self) -> None:
        """Stop the thread and write everything (or spool it for the next start): without
        trying when the store failed last time and its backoff has not run out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._seal_all()
        if self._clock() >= self._next_try:
            self.flush_once(force=True)
        self._spool_ready()

    def pending_rows(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._open.values()) + sum(len(b) for b in self._ready)

    def self_metrics(self, f: Families) -> None:
        s = self.stats
        for table in schema.WRITTEN:
            f.counter("coroot_agent_store_rows_written_total", "rows written to ClickHouse", s.written[table], table=table)
            f.counter("coroot_agent_store_dropped_rows_total", "rows dropped because the spool was full", s.dropped[table], table=table)
            f.counter("coroot_agent_store_spooled_rows_total", "rows that went through the disk spool", s.spooled[table], table=table)
        f.counter("coroot_agent_store_errors_total", "failed writes to ClickHouse", s.errors)
        f.gauge("coroot_agent_store_spool_bytes", "bytes waiting in the store spool", self.spool.bytes)
        f.gauge("coroot_agent_store_pending_rows", "rows batched in memory", self.pending_rows())
        if s.last_success:
            f.gauge("coroot_agent_store_last_success_timestamp_seconds", "time of the last successful write", s.last_success)
