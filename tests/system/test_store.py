"""The store on the real ClickHouse engine: embedded chDB in this process, and a remote store
behind the test-only HTTP(S) front (tests/system/chfront.py, a stand-in for a ClickHouse server,
which cannot be installed here)."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.query import QueryRefused
from agent.sinks import schema
from agent.sinks.batcher import Sink
from agent.sinks.spool import Spool
from agent.sinks.store import Store, StoreError
from tests.system.helpers import ClickHouseFront, free_port, make_test_ca, span

LC, MAP = "LowCardinality(String)", "Map(LowCardinality(String), String)"
# Reference §5, with Nested columns as ClickHouse reports them (flattened to arrays).
REFERENCE = {
    "otel_traces": [
        ("Timestamp", "DateTime64(9)"), ("TraceId", "String"), ("SpanId", "String"),
        ("ParentSpanId", "String"), ("TraceState", "String"), ("SpanName", LC), ("SpanKind", LC),
        ("ServiceName", LC), ("ResourceAttributes", MAP), ("SpanAttributes", MAP),
        ("Duration", "Int64"), ("StatusCode", LC), ("StatusMessage", "String"),
        ("Events.Timestamp", "Array(DateTime64(9))"), ("Events.Name", f"Array({LC})"),
        ("Events.Attributes", f"Array({MAP})"), ("Links.TraceId", "Array(String)"),
        ("Links.SpanId", "Array(String)"), ("Links.TraceState", "Array(String)"),
        ("Links.Attributes", f"Array({MAP})"),
    ],
    "otel_logs": [
        ("Timestamp", "DateTime64(9)"), ("TraceId", "String"), ("SpanId", "String"),
        ("TraceFlags", "UInt32"), ("SeverityText", LC), ("SeverityNumber", "Int32"),
        ("ServiceName", LC), ("Body", "String"), ("ResourceAttributes", MAP), ("LogAttributes", MAP),
    ],
    "profiling_stacks": [("ServiceName", LC), ("Hash", "UInt64"), ("LastSeen", "DateTime64(9)"),
                         ("Stack", "Array(String)")],
    "profiling_samples": [("ServiceName", LC), ("Type", LC), ("Start", "DateTime64(9)"),
                          ("End", "DateTime64(9)"), ("Labels", MAP), ("StackHash", "UInt64"),
                          ("Value", "Int64")],
    "profiling_profiles": [("ServiceName", LC), ("Type", LC), ("LastSeen", "DateTime64(9)")],
    "metrics": [("Timestamp", "DateTime64(3, 'UTC')"), ("MetricHash", "UInt64"), ("MetricName", LC),
                ("Labels", MAP), ("Value", "Float64")],
    "otel_traces_trace_id_ts": [("TraceId", "String"), ("Start", "DateTime64(9)"), ("End", "DateTime64(9)")],
    "otel_traces_service_name": [("ServiceName", LC), ("LastSeen", "DateTime64(9)")],
    "otel_logs_service_name_severity_text": [("ServiceName", LC), ("SeverityText", LC), ("LastSeen", "DateTime64(9)")],
}

StoreFactory = Callable[..., Store]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[StoreFactory]:
    made: list[Store] = []

    def make(**overrides: Any) -> Store:
        args = {"storage_path": str(tmp_path / "store")} | overrides
        s = Store(config.load(args, {}, None))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def rows_of(store: Store, sql: str) -> list[list[str]]:
    return [line.split("\t") for line in store.query(sql, "TSVRaw").decode().splitlines()]


def test_describe_matches_the_reference_and_show_create_has_codecs_and_ttl(make_store: StoreFactory) -> None:
    store = make_store()
    store.open()
    store.migrate()
    for table, expected in REFERENCE.items():
        got = [(r[0], r[1]) for r in rows_of(store, f"DESCRIBE TABLE {table}") if r[2] == ""]
        assert got == expected, table
    mat = [r for r in rows_of(store, "DESCRIBE TABLE otel_traces") if r[2] == "MATERIALIZED"]
    assert [(r[0], r[1]) for r in mat] == [("NetSockPeerAddr", LC)]
    create = store.query("SHOW CREATE TABLE otel_traces", "TSVRaw").decode()
    assert "`Timestamp` DateTime64(9) CODEC(DoubleDelta, ZSTD(1))" in create
    assert "TTL toDateTime(Timestamp) + toIntervalSecond(604800)" in create
    assert "ttl_only_drop_parts = 1" in create
    views = {r[0] for r in rows_of(store, "SELECT name FROM system.tables WHERE engine = 'MaterializedView' AND database = 'coroot'")}
    assert views == {v.name for v in schema.VIEWS}


def test_a_ttl_changed_between_starts_is_altered_and_data_survives(make_store: StoreFactory) -> None:
    first = make_store(traces_ttl="7d")
    first.open()
    assert first.migrate() == []
    base = time.time_ns()
    first.insert("otel_traces", schema.TABLES_BY_NAME["otel_traces"].insert_columns,
                 [span(i, base) for i in range(10)], "batch-1")
    first.close()

    second = make_store(traces_ttl="36h", logs_ttl="1d")
    second.open()
    changes = second.migrate()
    assert sorted(changes) == sorted([
        "otel_traces: 7d -> 36h", "otel_traces_trace_id_ts: 7d -> 36h",
        "otel_traces_service_name: 7d -> 36h", "otel_traces_histogram: 7d -> 36h",
        "otel_logs: 7d -> 1d", "otel_logs_service_name_severity_text: 7d -> 1d",
    ])
    assert "toIntervalSecond(129600)" in second.query("SHOW CREATE TABLE otel_traces", "TSVRaw").decode()
    assert "toIntervalSecond(86400)" in second.query("SHOW CREATE TABLE otel_logs", "TSVRaw").decode()
    assert "toIntervalSecond(604800)" in second.query("SHOW CREATE TABLE profiling_samples", "TSVRaw").decode()
    assert rows_of(second, "SELECT count() FROM otel_traces") == [["10"]]
    assert second.migrate() == []  # and nothing more to do on the next start


def test_100k_spans_round_trip_through_the_sink(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store()
    store.open()
    store.migrate()
    sink = Sink(store, Spool(str(tmp_path / "spool"), 50_000_000), max_rows=10_000, max_age=60)
    base = time.time_ns() // 10**9 * 10**9 + 123_456_789  # recent: older rows expire by TTL
    t0 = time.monotonic()
    for i in range(100_000):
        sink.add("otel_traces", span(i, base))
    sink.close()
    took = time.monotonic() - t0
    print(f"100000 spans through the sink into chDB in {took:.2f}s ({100_000 / took:,.0f} spans/s)")
    assert sink.stats.written["otel_traces"] == 100_000 and sink.stats.errors == 0
    assert rows_of(store, "SELECT count(), uniqExact(TraceId) FROM otel_traces") == [["100000", "100000"]]
    [row] = rows_of(store, (
        "SELECT toUnixTimestamp64Nano(Timestamp), SpanId, ParentSpanId, SpanName, ServiceName, "
        "SpanAttributes['http.url'], ResourceAttributes['host.name'], Duration, StatusCode, "
        "arrayMap(t -> toUnixTimestamp64Nano(t), Events.Timestamp), Events.Name, "
        "Events.Attributes[1]['k'], Links.TraceId FROM otel_traces WHERE TraceId = '" + f"{12340:032x}'"))
    assert row == [str(base + 12340), f"{12340:016x}", "", "GET", "/system.slice/svc6.service",
                   "http://10.0.0.1:80/p/12340", "node-1", "1012340", "STATUS_CODE_UNSET",
                   f"[{base + 12345}]", "['exception']", "v12340", f"['{12340:032x}']"]
    assert rows_of(store, "SELECT count() FROM otel_traces WHERE StatusCode = 'STATUS_CODE_ERROR'") == [["2000"]]
    assert rows_of(store, "SELECT count() FROM otel_traces_trace_id_ts") == [["100000"]]
    # the histogram view counts every span, as the server's does (Root = 1 marks the even ones)
    assert rows_of(store, "SELECT sum(Total), sum(Failed) FROM otel_traces_histogram") == [["100000", "2000"]]
    assert rows_of(store, "SELECT sumIf(Total, Root = 1) FROM otel_traces_histogram") == [["50000"]]


def test_inserts_leave_no_garbage_and_the_engine_has_an_agents_caches(make_store: StoreFactory) -> None:
    """An insert's columns are freed when it returns (clickhouse-connect's insert context is a
    reference cycle that held them until a full collection), and the embedded engine starts
    with the agent's cache sizes, not a database server's 5 GB."""
    store = make_store()
    store.open()
    store.migrate()
    base = time.time_ns() // 10**9 * 10**9
    columns = schema.TABLES_BY_NAME["otel_traces"].insert_columns
    had_pandas = "pandas" in sys.modules  # another test's import
    store.insert("otel_traces", columns, [span(i, base) for i in range(100)], "warm-up")  # one-time set-up garbage
    rows = [span(i, base) for i in range(100, 5_100)]
    gc.collect()
    gc.disable()
    try:
        store.insert("otel_traces", columns, rows, "gc-probe")
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0, unreachable  # 26 before: the insert context and its per-block lists, holding the columns
    assert rows_of(store, "SELECT count() FROM otel_traces") == [["5100"]]
    settings = dict(store._need().query(
        "SELECT name, value FROM system.server_settings WHERE name IN "
        "('mark_cache_size', 'primary_index_cache_size', 'uncompressed_cache_size')").result_rows)
    assert settings == {"mark_cache_size": str(32 << 20), "primary_index_cache_size": str(32 << 20),
                        "uncompressed_cache_size": "0"}
    assert had_pandas or "pandas" not in sys.modules  # the driver's DataFrame check no longer imports it
    resident = store.engine_resident()  # coroot_agent_memory_bytes{part="engine_heap"}
    assert resident is not None and 1 << 20 < resident < 1 << 30, resident


def test_spool_bound_holds_while_the_store_is_down(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store(clickhouse_address=f"127.0.0.1:{free_port()}")  # nothing listens there
    spool = Spool(str(tmp_path / "spool"), 40_000)
    sink = Sink(store, spool, max_rows=100, max_age=60, max_pending=2, backoff=(0.0, 0.0))
    row = (time.time_ns(), "", "", 0, "ERROR", 17, "/system.slice/a.service", "x" * 100, {}, {})
    for i in range(5_000):
        sink.add("otel_logs", row)
        if i % 100 == 99:
            sink.flush_once()
        assert sink.pending_rows() <= 300  # memory stays flat: at most max_pending + 1 batches
    assert spool.bytes <= 40_000
    on_disk = sum(p.stat().st_size for p in (tmp_path / "spool").iterdir())
    assert on_disk == spool.bytes
    spooled_rows = sum(e.count for e in spool._entries)
    dropped = sink.stats.dropped["otel_logs"]
    assert dropped > 0 and dropped % 100 == 0
    assert dropped + spooled_rows + sink.pending_rows() == 5_000
    assert "cannot reach ClickHouse" in sink.stats.last_error


# -------------------------------------------------------------- remote ------


@pytest.fixture
def front(tmp_path: Path) -> Iterator[ClickHouseFront]:
    f = ClickHouseFront(str(tmp_path / "front-data"))
    f.start()
    yield f
    f.stop()


def test_remote_endpoint_down_then_back_gets_every_row_exactly_once(
    make_store: StoreFactory, front: ClickHouseFront, tmp_path: Path,
) -> None:
    store = make_store(clickhouse_address=f"127.0.0.1:{front.port}", clickhouse_user="coroot",
                       clickhouse_password="secret")
    store.open()
    store.migrate()
    sink = Sink(store, Spool(str(tmp_path / "spool"), 50_000_000), max_rows=500, max_age=60,
                backoff=(0.05, 0.2))
    base = time.time_ns()
    n = 0

    def add(count: int) -> None:
        nonlocal n
        for _ in range(count):
            sink.add("otel_traces", span(n, base))
            n += 1
        sink.flush_once()

    add(1500)  # written while up
    front.stop()
    for _ in range(4):
        add(500)  # spooled while down
    assert len(sink.spool) >= 1 and sink.stats.errors >= 1
    front.start()
    deadline = time.monotonic() + 30
    while (len(sink.spool) or sink.pending_rows()) and time.monotonic() < deadline:
        time.sleep(0.1)
        sink.flush_once(force=True)
    sink.close()
    assert rows_of(store, "SELECT count(), uniqExact(SpanId) FROM otel_traces") == [["3500", "3500"]]


def test_a_batch_whose_reply_was_lost_is_stored_once(make_store: StoreFactory, tmp_path: Path) -> None:
    front = ClickHouseFront(str(tmp_path / "front-data"), env={"CHFRONT_LOSE_REPLIES": "3"})
    front.start()
    try:
        store = make_store(clickhouse_address=f"127.0.0.1:{front.port}", clickhouse_user="coroot",
                           clickhouse_password="secret")
        store.open()
        store.migrate()
        sink = Sink(store, Spool(str(tmp_path / "spool"), 50_000_000), max_rows=1000, max_age=60,
                    backoff=(0.0, 0.0))
        base = time.time_ns()
        for i in range(3000):
            sink.add("otel_traces", span(i, base))
        for _ in range(10):
            sink.flush_once(force=True)
        sink.close()
        # Three replies lost after the insert ran: the driver's own retry and the sink's retry
        # both re-send the same batch with its token; the store keeps one copy.
        assert sink.stats.errors >= 1
        assert rows_of(store, "SELECT count(), uniqExact(SpanId) FROM otel_traces") == [["3000", "3000"]]
        assert rows_of(store, "SELECT sumIf(Total, Root = 1) FROM otel_traces_histogram") == [["1500"]]
    finally:
        front.stop()


def test_tls_verification_wrong_ca_skip_verify_and_wrong_password(make_store: StoreFactory, tmp_path: Path) -> None:
    ca, cert, key = make_test_ca(str(tmp_path), "ca")
    other_ca, _, _ = make_test_ca(str(tmp_path), "other")
    front = ClickHouseFront(str(tmp_path / "front-data"), cert=(cert, key))
    front.start()
    try:
        addr = {"clickhouse_address": f"127.0.0.1:{front.port}", "clickhouse_user": "coroot",
                "clickhouse_password": "secret", "clickhouse_tls": "true"}
        good = make_store(**addr, clickhouse_ca_file=ca)
        good.open()
        good.migrate()
        assert rows_of(good, "SELECT 1") == [["1"]]
        good.close()

        with pytest.raises(StoreError) as e:
            make_store(**addr, clickhouse_ca_file=other_ca).open()
        assert str(e.value) == (
            f"ClickHouse at https://127.0.0.1:{front.port}, database coroot: TLS certificate verification "
            "failed; set global_clickhouse.ca_file (--clickhouse-ca-file) to the CA that signed the "
            "server's certificate, or tls_skip_verify: true to skip verification")

        skip = make_store(**addr, clickhouse_ca_file=other_ca, clickhouse_tls_skip_verify="true")
        skip.open()
        assert rows_of(skip, "SELECT 2") == [["2"]]
        skip.close()

        with pytest.raises(StoreError, match="authentication failed: check global_clickhouse.user and password"):
            make_store(**(addr | {"clickhouse_password": "wrong"}), clickhouse_ca_file=ca).open()
    finally:
        front.stop()


def test_queries_are_read_only_and_do_not_make_writes_read_only(make_store: StoreFactory) -> None:
    store = make_store()
    store.open()
    store.migrate()
    with pytest.raises(QueryRefused, match="refused DROP"):
        store.query("DROP TABLE otel_traces")
    assert rows_of(store, "EXISTS TABLE otel_traces") == [["1"]]
    # reads and writes share the embedded engine: a read must leave writes possible
    store.insert("otel_traces", schema.TABLES_BY_NAME["otel_traces"].insert_columns, [span(1, time.time_ns())], "t1")
    assert rows_of(store, "SELECT count() FROM otel_traces") == [["1"]]
