"""The tracer without a kernel: packed l7_event bytes (agent/l7/contract.py pack, the layout
the contract test holds to bpf/) go in; exact metrics and span rows come out. Its neighbours are
in-memory stand-ins (tests/unit/l7_helpers.py); the real ones are exercised by
tests/system/test_l7.py."""

from __future__ import annotations

import time
from functools import partial

import pytest

import agent.l7.tracer as tracer_module
from agent.l7 import contract
from agent.l7.contract import F_COUNTED, F_INBOUND, F_OUTBOUND, F_TLS
from agent.l7.tracer import DEFER_GRACE, L7Tracer
from tests.unit.l7_helpers import CID, Connections, Containers, Rows, paired, samples, tracer, value

setup = tracer
ev = partial(paired, ms=3)


SET = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n"
GET = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


def test_outbound_redis_pairs_become_exact_counts_and_spans() -> None:
    t, conns, rows = setup()
    conns.add(100, 7, 55, "10.0.0.9", 6379, actual="10.0.0.10:6379")
    for _ in range(3):
        t.handle_event(ev(contract.REDIS, F_OUTBOUND, SET, b"+OK\r\n"))
    t.handle_event(ev(contract.REDIS, F_OUTBOUND, SET + GET, b"+OK\r\n-ERR wrong\r\n"))  # pipelined
    lbl = {"container_id": CID, "destination": "10.0.0.9:6379", "actual_destination": "10.0.0.10:6379"}
    assert value(t, "container_redis_queries_total", status="ok", **lbl) == 4
    assert value(t, "container_redis_queries_total", status="failed", **lbl) == 1
    assert value(t, "container_redis_queries_duration_seconds_total_count", **lbl) == 5
    assert len(rows.rows) == 5
    r = rows.rows[0]
    assert r["SpanName"] == "SET" and r["SpanKind"] == "SPAN_KIND_CLIENT" and r["Duration"] == 3_000_000
    assert r["SpanAttributes"]["db.statement"] == "SET k ?" and r["SpanAttributes"]["db.system"] == "redis"
    assert r["SpanAttributes"]["net.sock.peer.addr"] == "10.0.0.10" and r["StatusCode"] == "STATUS_CODE_UNSET"
    assert rows.rows[-1]["StatusCode"] == "STATUS_CODE_ERROR"
    assert value(t, "coroot_agent_l7_requests_total") == 5 and value(t, "coroot_agent_l7_spans_total") == 5


def test_inbound_postgres_counts_by_status_without_spans() -> None:
    t, _, rows = setup()
    q = b"Q\0\0\0\x0eSELECT 1;\0"
    ok = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I"
    err = b"E\0\0\0\x1dSERROR\0C42601\0Msyntax\0\0"
    for resp in (ok, ok, err):
        t.handle_event(ev(contract.POSTGRES, F_INBOUND, q, resp, pid=200))
    assert value(t, "container_postgres_inbound_queries_total", status="ok") == 2
    assert value(t, "container_postgres_inbound_queries_total", status="failed") == 1
    assert rows.rows == []


def test_an_event_waits_for_its_connection_over_ticks_then_counts_or_is_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(tracer_module.time, "monotonic", lambda: now[0])
    t, conns, _ = setup()
    t.handle_event(ev(contract.REDIS, F_OUTBOUND, GET, b"$-1\r\n", fd=8))
    t.handle_event(ev(contract.REDIS, F_OUTBOUND, GET, b"$-1\r\n", fd=9))
    t.tick(0.0, [])  # a tick before the connect events were read: both keep waiting
    assert value(t, "container_redis_queries_total") == 0
    assert value(t, "coroot_agent_l7_unattributed_total") == 0
    conns.add(100, 8, 55, "10.0.0.9", 6379, actual="10.0.0.9:6379")
    now[0] += 1.0
    t.tick(0.0, [])
    assert value(t, "container_redis_queries_total", status="ok") == 1
    assert value(t, "coroot_agent_l7_unattributed_total") == 0  # fd 9 may still come
    now[0] += DEFER_GRACE
    t.tick(0.0, [])
    t.tick(0.0, [])
    assert value(t, "container_redis_queries_total", status="ok") == 1
    assert value(t, "coroot_agent_l7_unattributed_total") == 1  # fd 9 never appeared: dropped once


def test_http_counted_in_the_kernel_makes_a_span_but_no_second_count() -> None:
    t, conns, rows = setup()
    conns.add(100, 7, 55, "10.0.0.9", 443, actual="10.0.0.9:443")
    req = b"GET /users/42?token=abc HTTP/1.1\r\nHost: x\r\n\r\n"
    t.handle_event(ev(contract.HTTP, F_OUTBOUND | F_TLS | F_COUNTED, req, b"HTTP/1.1 503 Busy\r\n\r\n"))
    t.handle_event(ev(contract.HTTP, F_OUTBOUND, req, b"HTTP/1.1 200 OK\r\n\r\n"))  # map full: count here
    assert value(t, "container_http_requests_total", status="5xx") == 0
    assert value(t, "container_http_requests_total", status="2xx") == 1
    assert [r["SpanName"] for r in rows.rows] == ["GET", "GET"]
    a = rows.rows[0]["SpanAttributes"]
    assert a["http.url"] == "https://10.0.0.9:443/users/42?token=*" and a["tls"] == "true"
    assert a["http.status_code"] == "503" and rows.rows[0]["StatusCode"] == "STATUS_CODE_ERROR"


def test_dns_answers_count_by_domain_and_span_peers_keep_their_address() -> None:
    t, conns, rows = setup()
    query = bytes.fromhex("12340100000100000000000003777777076578616d706c6503636f6d0000010001")
    answer = bytes.fromhex("12348180000100010000000003777777076578616d706c6503636f6d0000010001"
                           "c00c000100010000003c00045db8d822")
    t.handle_event(ev(contract.DNS, F_OUTBOUND, query, answer))
    assert value(t, "container_dns_requests_total", request_type="TypeA", domain="www.example.com",
                 status="ok") == 1
    assert value(t, "ip_to_fqdn", ip="93.184.216.34", fqdn="www.example.com") == 1
    conns.add(100, 7, 55, "93.184.216.34", 6379, actual="93.184.216.34:6379")
    t.handle_event(ev(contract.REDIS, F_OUTBOUND, GET, b"$1\r\nv\r\n"))
    assert rows.rows[0]["SpanAttributes"]["net.peer.name"] == "93.184.216.34"  # as the node agent's spans


def test_garbage_an_unknown_protocol_and_a_forgotten_container_leave_nothing() -> None:
    t, conns, rows = setup()
    conns.add(100, 7, 55, "10.0.0.9", 6379, actual="10.0.0.9:6379")
    t.handle_event(ev(99, F_OUTBOUND, GET, b"+OK\r\n"))
    t.handle_event(ev(contract.REDIS, F_OUTBOUND, b"\xff" * 40, b"\x00" * 10))
    assert value(t, "coroot_agent_l7_requests_total") == 0 and rows.rows == []
    t.handle_event(ev(contract.REDIS, F_OUTBOUND, GET, b"+OK\r\n"))
    assert value(t, "container_redis_queries_total") == 1
    t.tick(0.0, [CID])
    assert value(t, "container_redis_queries_total") == 0


class Resolving(Connections):
    """Resolves as agent/net/tcp.py does: every pending connection gets its actual destination."""

    def resolve_pending(self) -> None:
        super().resolve_pending()
        for c in self.conns.values():
            c.actual = c.actual or c.destination


def test_a_deferred_request_on_a_connection_resolved_after_it_arrived_is_counted() -> None:
    conns, rows = Resolving(), Rows()
    t = L7Tracer(Containers(), conns, rows, hostname="h", host_id="m")
    conns.add(100, 7, 55, "10.0.0.9", 6379, actual=None)
    t._last_resolve = time.monotonic() + 60  # a resolution just ran: this event waits for the tick
    t.handle_event(ev(contract.REDIS, F_OUTBOUND, GET, b"$-1\r\n"))
    assert value(t, "container_redis_queries_total") == 0
    t.tick(0.0, [])  # the retry resolves the connection first, then counts
    assert value(t, "container_redis_queries_total", status="ok", actual_destination="10.0.0.9:6379") == 1


def test_collect_only_reads() -> None:
    t, conns, _ = setup()
    conns.add(100, 7, 55, "10.0.0.9", 6379, actual=None)
    before = conns.resolved
    samples(t)
    assert conns.resolved == before
