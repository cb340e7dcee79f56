"""The tracer reuses an HTTP span's attributes for the same request (method, path, code) to the
same peer over the same transport (Http.span_by_path): packed span events through the tracer,
compared row by row with a tracer that builds every span afresh."""

from __future__ import annotations

from typing import Any

from agent.l7 import contract
from agent.l7.contract import F_COUNTED, F_OUTBOUND, F_TLS
from agent.l7.tracer import L7Tracer
from tests.unit.l7_helpers import Connections, Containers, Rows, paired

OUT = F_OUTBOUND | F_COUNTED
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\n\r\n"
FAIL = b"HTTP/1.1 503 Unavailable\r\n\r\n"


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: shop\r\n\r\n".encode()


def events() -> list[bytes]:
    """Repeats of a few requests, each repeat another duration; the same request on two
    connections to different peers, over TLS and not; a masked query; an excluded path."""
    out = []
    for i in range(12):
        out.append(paired(contract.HTTP, OUT, get("/api/items"), OK, fd=8, ms=1 + i))
        out.append(paired(contract.HTTP, OUT, get("/api/items"), NOT_FOUND if i % 3 else FAIL, fd=8, ms=2))
        out.append(paired(contract.HTTP, OUT | (F_TLS if i % 2 else 0), get("/api/items"), OK, fd=9, ms=3))
        out.append(paired(contract.HTTP, OUT, get("/api/items", "POST"), OK, fd=9, ms=4))
        out.append(paired(contract.HTTP, OUT, get(f"/search?q=secret{i}"), OK, fd=8, ms=5))
        out.append(paired(contract.HTTP, OUT, get("/healthz"), OK, fd=8, ms=6))
    return out


def run(cache: bool) -> tuple[L7Tracer, list[dict[str, Any]]]:
    conns, rows = Connections(), Rows()
    conns.add(100, 8, 55, "10.0.0.5", 80, actual="10.0.0.6:8080")
    conns.add(100, 9, 55, "10.0.0.7", 443, actual="10.0.0.7:443")
    t = L7Tracer(Containers(), conns, rows, hostname="h", host_id="m", exclude_paths=("/healthz",))
    if not cache:
        t.plugins[contract.HTTP].span_by_path = False  # type: ignore[misc]  # the reference: every span built
    t.handle_events(events())
    return t, [{k: v for k, v in r.items() if k not in ("TraceId", "SpanId")} for r in rows.rows]


def test_reused_span_attributes_make_the_same_rows_as_spans_built_each_time() -> None:
    cached, rows = run(cache=True)
    built, want = run(cache=False)
    assert len(rows) == 12 * 5  # the excluded path makes none
    assert [{k: v - cached._clock_offset if k == "Timestamp" else v for k, v in r.items()} for r in rows] == \
        [{k: v - built._clock_offset if k == "Timestamp" else v for k, v in r.items()} for r in want]
    assert {r["SpanAttributes"]["http.url"] for r in rows} == {
        "http://10.0.0.6:8080/api/items", "http://10.0.0.7:443/api/items", "https://10.0.0.7:443/api/items",
        "http://10.0.0.6:8080/search?q=*"}
    assert [r["Duration"] for r in rows[:6:5]] == [1_000_000, 2_000_000]
    assert {r["StatusCode"] for r in rows if r["SpanAttributes"]["http.status_code"] == "503"} == {"STATUS_CODE_ERROR"}
    tls = [r for r in rows if r["SpanAttributes"].get("tls")]
    assert len(tls) == 6 and all(r["SpanAttributes"]["http.url"].startswith("https://") for r in tls)
    # 6 distinct spans (GET 200, 404, 503 on fd 8; GET plain, GET TLS, POST on fd 9), the masked
    # query one and the excluded path: built once each
    assert len(cached._made) == 8


def test_a_full_cache_is_emptied_and_keeps_making_the_same_spans(monkeypatch: Any) -> None:
    monkeypatch.setattr("agent.l7.tracer.MAX_CACHED", 2)
    cached, rows = run(cache=True)
    _, want = run(cache=False)
    assert len(cached._made) <= 2
    assert [{k: v for k, v in r.items() if k != "Timestamp"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "Timestamp"} for r in want]
