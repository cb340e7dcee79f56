"""The batch path without a kernel: packed l7_event records read from a ring laid out as the
kernel lays it out (agent/ebpf/ringbuf.py with a Batched handler) into the tracer's
handle_events, its spans handed to the sink as columns (agent/sinks/batcher.py add_columns) and
to the store as columns, spooled as columns when the store fails. Every figure is compared with
the one-record-at-a-time path on the same records. tests/system/test_l7.py runs the batch path
against the kernel."""

from __future__ import annotations

import logging
import marshal
from pathlib import Path
from typing import Any

import pytest

from agent.ebpf.ringbuf import Batched, Ring
from agent.l7 import contract, http
from agent.l7.contract import F_COUNTED, F_INBOUND, F_OUTBOUND, F_TLS
from agent.l7.protocol import Settings
from agent.l7.tracer import L7Tracer
from agent.sinks import schema
from agent.sinks.batcher import Sink
from agent.sinks.spool import Spool
from agent.sinks.store import StoreError
from tests.unit.l7_helpers import Connections, Containers, Rows, paired, samples
from tests.unit.test_ringbuf import records

COLUMNS = schema.TABLES_BY_NAME["otel_traces"].insert_columns
GET = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
HTTP_REQ = b"GET /api/v1/items?id=7 HTTP/1.1\r\nHost: shop\r\n\r\n"
PG_Q = b"Q\0\0\0\x0eSELECT 1;\0"
PG_OK = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I"


def mixed() -> list[bytes]:
    """HTTP span events (counted in the kernel, one TLS, one a 500), pipelined Redis, inbound
    Postgres, a request on a connection not known yet (fd 9), an unknown protocol and garbage."""
    out = []
    for i in range(30):
        status = b"HTTP/1.1 500 Oops\r\n\r\n" if i == 7 else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        flags = F_OUTBOUND | F_COUNTED | (F_TLS if i == 3 else 0)
        out.append(paired(contract.HTTP, flags, HTTP_REQ, status, fd=8, ms=1 + i % 4))
        if i % 5 == 0:
            out.append(paired(contract.REDIS, F_OUTBOUND, GET + GET, b"$1\r\nv\r\n-ERR no\r\n"))
        if i % 6 == 0:
            out.append(paired(contract.POSTGRES, F_INBOUND, PG_Q, PG_OK, pid=200))
    out.insert(10, paired(contract.REDIS, F_OUTBOUND, GET, b"$-1\r\n", fd=9))
    out.insert(20, paired(99, F_OUTBOUND, GET, b"+OK\r\n"))
    out.insert(25, b"\x01\x02")  # a record too short for the header: it fails, alone
    return out


class ColumnSink(Rows):
    """A sink that takes columns (as agent/sinks/batcher.py Sink does): each call is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[list[Any]]] = []

    def add_columns(self, table: str, columns: list[list[Any]]) -> None:
        assert table == "otel_traces"
        self.calls.append(columns)
        for row in zip(*columns, strict=True):
            self.add(table, row)


def tracer(sink: Rows) -> tuple[L7Tracer, Connections]:
    conns = Connections()
    conns.add(100, 7, 55, "10.0.0.9", 6379, actual="10.0.0.10:6379")
    conns.add(100, 8, 55, "10.0.0.5", 80, actual="10.0.0.6:8080")
    return L7Tracer(Containers(), conns, sink, hostname="h", host_id="m"), conns


def comparable(rows: list[dict[str, Any]], t: L7Tracer) -> list[dict[str, Any]]:
    """Span rows without their random ids (checked on their own), their time as the kernel's."""
    return [{k: v - t._clock_offset if k == "Timestamp" else v for k, v in r.items() if k not in ("TraceId", "SpanId")}
            for r in rows]


def test_a_ring_of_records_through_the_batch_path_equals_them_one_at_a_time(caplog: pytest.LogCaptureFixture) -> None:
    one, one_conns = tracer(one_rows := Rows())
    for raw in mixed():
        try:
            one.handle_event(raw)
        except Exception:  # noqa: BLE001 - the short record raises on this path (the ring reader logs it)
            pass
    sink = ColumnSink()
    many, conns = tracer(sink)
    ring = Ring(*records(mixed(), size=1 << 16), 1 << 16, Batched(many.handle_events))
    with caplog.at_level(logging.ERROR):
        assert ring.drain() == len(mixed())
    assert "handling an L7 event" in caplog.text  # the short record, logged; the rest handled
    assert len(sink.calls) == 1  # one pass over the ring: one call, one batch of columns
    for t, c in ((one, one_conns), (many, conns)):
        c.add(100, 9, 55, "10.0.0.9", 6379, actual="10.0.0.9:6379")  # the late connection
        t.tick(0.0, [])
    assert samples(many) == samples(one)
    by = {k: v for k, v in samples(many).items() if k[0].endswith("_total")}
    http_out = [v for (n, lbl), v in by.items() if n == "container_http_requests_total"]
    assert http_out == []  # counted in the kernel: the events are for spans only
    assert sum(v for (n, _), v in by.items() if n == "container_redis_queries_total") == 2 * 6 + 1
    assert sum(v for (n, _), v in by.items() if n == "container_postgres_inbound_queries_total") == 5
    assert comparable(sink.rows, many) == comparable(one_rows.rows, one)
    assert len(sink.rows) == 30 + 2 * 6 + 1 == many.spans_written
    assert len(sink.calls) == 2  # the deferred request's span: its own hand-over, at the tick
    https = [r for r in sink.rows if r["SpanAttributes"].get("tls") == "true"]
    assert [r["SpanAttributes"]["http.url"] for r in https] == ["https://10.0.0.5:80/api/v1/items?id=*"]
    [err] = [r for r in sink.rows if r["SpanAttributes"].get("http.status_code") == "500"]
    assert err["StatusCode"] == "STATUS_CODE_ERROR" and err["Duration"] == 4_000_000
    ok = sink.rows[0]
    assert ok["SpanName"] == "GET" and ok["ServiceName"] == Containers().c.id
    assert ok["ResourceAttributes"] == {"host.name": "h", "host.id": "m", "service.name": ok["ServiceName"],
                                        "container.id": Containers().c.id}
    assert ok["SpanAttributes"] == {"net.peer.name": "10.0.0.5", "net.peer.port": "80",
                                    "net.sock.peer.addr": "10.0.0.6", "http.url": "http://10.0.0.5:80/api/v1/items?id=*",
                                    "http.method": "GET", "http.status_code": "200"}
    assert ok["Timestamp"] - 1_000 == many._clock_offset and ok["Events.Name"] == [] and ok["ParentSpanId"] == ""
    ids = [(r["TraceId"], r["SpanId"]) for r in sink.rows]
    assert len(set(ids)) == len(ids)
    assert all(len(t) == 32 and len(s) == 16 and int(t, 16) >= 0 and int(s, 16) >= 0 for t, s in ids)


def test_columns_of_a_batch_are_in_insert_order_and_as_long() -> None:
    sink = ColumnSink()
    t, _ = tracer(sink)
    t.handle_events([paired(contract.HTTP, F_OUTBOUND | F_COUNTED, HTTP_REQ, b"HTTP/1.1 204 No\r\n\r\n", fd=8)] * 5)
    [cols] = sink.calls
    assert len(cols) == len(COLUMNS) and {len(c) for c in cols} == {5}
    by = dict(zip(COLUMNS, cols, strict=True))
    assert by["SpanKind"] == ["SPAN_KIND_CLIENT"] * 5 and by["Duration"] == [2_000_000] * 5
    assert by["Links.TraceId"] == [[]] * 5 and by["TraceState"] == [""] * 5


def test_a_batch_handler_gets_a_pass_of_records_and_a_failure_loses_only_that_call(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[bytes]] = []

    def handle(batch: list[bytes]) -> None:
        calls.append(batch)
        raise RuntimeError("broken handler")

    ring = Ring(*records([b"one", None, b"two", b"three"], size=256), 256, Batched(handle))
    with caplog.at_level(logging.ERROR):
        assert ring.drain() == 3
    assert calls == [[b"one", b"two", b"three"]] and "handling 3 ring buffer records" in caplog.text
    assert ring.drain() == 0 and len(calls) == 1  # never read again
    got: list[list[bytes]] = []
    busy = Ring(*records([b"a", b"BUSY", b"c"], size=256), 256, Batched(got.append))
    assert busy.drain() == 1 and got == [[b"a"]]  # a record still being written ends the pass
    Batched(got.append)(b"single")  # BCC's or the perf buffer's one-record callback
    assert got[-1] == [b"single"]


# ----------------------------------------------------------------- the sink --

class ColumnStore:
    """Inserts of rows and of columns, kept as the rows they make; fails when told."""

    embedded = False

    def __init__(self) -> None:
        self.fail = False
        self.inserts: list[tuple[str, str, list[tuple[Any, ...]]]] = []

    def insert(self, table: str, columns: list[str], rows: list[tuple[Any, ...]], token: str) -> None:
        if self.fail:
            raise StoreError("down")
        self.inserts.append(("rows", table, [tuple(r) for r in rows]))

    def insert_columns(self, table: str, columns: list[str], data: list[list[Any]], token: str) -> None:
        if self.fail:
            raise StoreError("down")
        assert list(columns) == schema.TABLES_BY_NAME[table].insert_columns
        self.inserts.append(("columns", table, list(zip(*data, strict=True))))


def span_columns(n: int, first: int = 0) -> list[list[Any]]:
    return schema.columns("otel_traces", {"Timestamp": list(range(first, first + n)),
                                          "SpanName": [f"s{i}" for i in range(first, first + n)]}, n)


def test_the_sink_keeps_columns_as_columns_and_rows_added_after_join_them(tmp_path: Path) -> None:
    store = ColumnStore()
    sink = Sink(store, Spool(str(tmp_path), 1 << 20), max_rows=10)  # type: ignore[arg-type]
    sink.add_columns("otel_traces", span_columns(3))
    sink.add("otel_traces", schema.row("otel_traces", {"Timestamp": 3, "SpanName": "s3"}))
    sink.add_columns("otel_traces", span_columns(2, first=4))
    assert sink.pending_rows() == 6
    sink.add("otel_logs", schema.row("otel_logs", {"Body": "x"}))
    sink.flush_once(force=True)
    kinds = {(kind, table): rows for kind, table, rows in store.inserts}
    spans = kinds[("columns", "otel_traces")]
    assert [(r[0], r[5]) for r in spans] == [(i, f"s{i}") for i in range(6)]
    assert len(kinds[("rows", "otel_logs")]) == 1
    assert sink.stats.written["otel_traces"] == 6 and sink.pending_rows() == 0


def test_rows_then_columns_make_one_batch_and_max_rows_seals_it(tmp_path: Path) -> None:
    store = ColumnStore()
    sink = Sink(store, Spool(str(tmp_path), 1 << 20), max_rows=4)  # type: ignore[arg-type]
    sink.add("otel_traces", schema.row("otel_traces", {"Timestamp": 0, "SpanName": "s0"}))
    sink.add_columns("otel_traces", span_columns(4, first=1))  # 5 rows: sealed, past max_rows
    sink.add_columns("otel_traces", span_columns(0))  # nothing: no batch
    sink.flush_once()  # sealed batches only
    assert [(kind, [r[0] for r in rows]) for kind, _, rows in store.inserts] == [("columns", [0, 1, 2, 3, 4])]
    with pytest.raises(ValueError):
        sink.add_columns("otel_traces", span_columns(2)[:-1])


def test_a_batch_of_columns_is_spooled_as_columns_and_inserted_from_the_spool(tmp_path: Path) -> None:
    store = ColumnStore()
    store.fail = True
    spool = Spool(str(tmp_path), 1 << 20)
    sink = Sink(store, spool, backoff=(0.0, 0.0))  # type: ignore[arg-type]
    sink.add_columns("otel_traces", span_columns(3))
    sink.flush_once(force=True)
    assert sink.stats.spooled["otel_traces"] == 3 and len(spool) == 1
    entry, payload = spool.oldest()  # type: ignore[misc]
    data = marshal.loads(payload)
    assert entry.count == 3 and "rows" not in data and [len(c) for c in data["data"]] == [3] * len(COLUMNS)
    store.fail = False
    sink.flush_once()
    assert [(kind, [r[0] for r in rows]) for kind, _, rows in store.inserts] == [("columns", [0, 1, 2])]
    assert len(spool) == 0 and sink.stats.written["otel_traces"] == 3


def test_schema_columns_fill_defaults_and_refuse_what_the_table_lacks() -> None:
    cols = span_columns(2)
    by = dict(zip(COLUMNS, cols, strict=True))
    assert by["Timestamp"] == [0, 1] and by["SpanAttributes"] == [{}, {}] and by["Duration"] == [0, 0]
    assert list(zip(*cols, strict=True))[1] == schema.row("otel_traces", {"Timestamp": 1, "SpanName": "s1"})
    with pytest.raises(KeyError):
        schema.columns("otel_traces", {"Nope": [1]}, 1)
    with pytest.raises(ValueError):
        schema.columns("otel_traces", {"Timestamp": [1, 2]}, 1)


# ------------------------------------------------------------ HTTP/1 parsing --

def test_a_body_that_reads_like_a_message_is_skipped_by_its_length() -> None:
    body = b"GET /not-a-request HTTP/1.1\r\n\r\n"
    reqs = (b"POST /a HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)) + body + b"GET /b HTTP/1.1\r\n\r\n"
    assert http.parse_requests(reqs) == [http.Request("POST", "/a", "1.1"), http.Request("GET", "/b", "1.1")]
    text = b"HTTP/1.1 200 OK\r\n"
    resps = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text)) + text + b"HTTP/1.1 404 No\r\n\r\n"
    assert [r.status for r in http.parse_responses(resps)] == [200, 404]
    assert http.status_codes(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") == [200]


def test_plain_paths_are_remembered_and_masked_ones_never() -> None:
    http._PLAIN_PATHS.clear()
    secret = b"/reset/Xk9fQ2aZ7bLm3nP0qR8sT1uV"
    for _ in range(2):
        assert http.request_lines(b"GET " + secret + b"?k=v HTTP/1.1\r\n\r\n") == [("GET", "/reset/*?k=*", "1.1")]
        assert http.request_lines(b"GET /health HTTP/1.0\r\n\r\n") == [("GET", "/health", "1.0")]
    assert list(http._PLAIN_PATHS) == [(b"/health", True, True)]
    for i in range(http.PLAIN_PATHS_MAX + 1):
        http.request_lines(b"GET /p%d HTTP/1.1\r\n\r\n" % i)
    assert len(http._PLAIN_PATHS) <= http.PLAIN_PATHS_MAX


def reference(req: bytes, resp: bytes) -> list[tuple[str, str, str, int]]:
    """What the HTTP plug-in made of a pair before its one-request shortcut: every request,
    paired in order with the responses (parse_requests and parse_responses)."""
    reqs, resps = http.parse_requests(req), http.parse_responses(resp)
    return [(resps[i].status_class if i < len(resps) else "unknown", q.method if q else "", q.path if q else "",
             resps[i].status if i < len(resps) else 0) for i, q in enumerate(reqs or [None])]


@pytest.mark.parametrize(("req", "resp"), [
    (HTTP_REQ, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    (b"POST /a HTTP/1.1\r\nContent-Length: 29\r\n\r\nGET /not-a-request HTTP/1.1\r\n", b"HTTP/1.1 201 Created\r\n\r\n"),
    (b"GET /a HTTP/1.1\r\n\r\nGET /b?x=1 HTTP/1.0\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 503 No\r\n\r\n"),
    (b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 No\r\n\r\n"),
    (b"GET /a HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nHTTP/1.1 500 X\r\n\r\n"),
    (b"GET /trunc HTTP/1.1\r\nHost: a", b"HTTP/1.1 204 No Content\r\nDa"),
    (b"GET /x HTTP/1.1\r\n\r\n", b"HTTP/1.1 999 Odd\r\n\r\n"),
    (b"GET /x HTTP/1.1\r\n\r\n", b"garbage"),
    (b"garbage", b"HTTP/1.1 200 OK\r\n\r\n"),
    (b"GET /Xk9fQ2aZ7bLm3nP0qR8sT1uV HTTP/1.1\r\n\r\n", b"HTTP/1.0 302 Found\r\n\r\n"),
])
def test_the_one_request_shortcut_makes_what_the_full_parse_makes(req: bytes, resp: bytes) -> None:
    plugin = http.Http(Settings())
    got = [(r.status, r.method, r.path, r.code) for r in plugin.parse((1, 2, 3), req, resp, 0.5)]
    assert got == reference(req, resp)
    assert all(r.duration == 0.5 and r.protocol == contract.HTTP for r in plugin.parse((1, 2, 3), req, resp, 0.5))
