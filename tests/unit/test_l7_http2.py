"""HTTP/2 and gRPC: frames built with a real HPACK encoder, fed as the kernel hands them over
(calls in order, each with its first bytes and its full size); multiplexed streams, frames split
between calls, calls cut short by the capture limit, and garbage."""

from __future__ import annotations

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract
from agent.l7.contract import F_OUTBOUND, F_WRITE, Event, pack
from agent.l7.http2 import PREFACE, Http2, status_label
from agent.l7.protocol import Masks, Settings
from agent.l7.tracer import L7Tracer
from tests.unit.l7_helpers import CID, Connections, Containers, Rows, value

K = (1, 5, 9)
SETTINGS = b"\0\0\0\x04\0\0\0\0\0"


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


class Peer:
    """One side's frames, HPACK-encoded with a dynamic table like a real endpoint's."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()

    def headers(self, sid: int, headers: list[tuple[str, str]], end_stream: bool = False) -> bytes:
        return frame(1, 0x4 | (0x1 if end_stream else 0), sid, self.enc.encode(headers))


def grpc_request(c: Peer, sid: int, path: str = "/pkg.Svc/Get") -> bytes:
    h = c.headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                        (":authority", "svc:50051"), ("content-type", "application/grpc"), ("te", "trailers")])
    return h + frame(0, 0x1, sid, b"\0\0\0\0\x02hi")


def grpc_response(s: Peer, sid: int, status: int = 0, messages: int = 1) -> bytes:
    out = s.headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    for _ in range(messages):
        out += frame(0, 0, sid, b"\0\0\0\0\x02ok")
    return out + s.headers(sid, [("grpc-status", str(status)), ("grpc-message", "")], end_stream=True)


def test_unary_grpc_calls_multiplexed_on_one_connection() -> None:
    h, c, s = Http2(Settings()), Peer(), Peer()
    assert h.feed(K, True, 1000, PREFACE + SETTINGS + grpc_request(c, 1), 0) == []
    assert h.feed(K, True, 2000, grpc_request(c, 3, "/pkg.Svc/Put"), 0) == []
    assert h.feed(K, False, 3000, SETTINGS, 0) == []
    done = h.feed(K, False, 5000, grpc_response(s, 3, status=5) + grpc_response(s, 1), 0)
    assert [(r.path, r.status, r.code, r.grpc, r.start_ns) for r in done] == [
        ("/pkg.Svc/Put", "grpc:NOT_FOUND", 200, 5, 2000), ("/pkg.Svc/Get", "grpc:OK", 200, 0, 1000)]
    assert done[1].duration == 4000 / 1e9 and done[1].method == "POST"
    # the dynamic tables carry on: later requests reuse indexed headers
    h.feed(K, True, 6000, grpc_request(c, 5), 0)
    assert [r.status for r in h.feed(K, False, 7000, grpc_response(s, 5, messages=3), 0)] == ["grpc:OK"]


def test_plain_http2_status_classes_and_masked_paths() -> None:
    h, c, s = Http2(Settings()), Peer(), Peer()
    h.feed(K, True, 0, PREFACE + c.headers(1, [(":method", "GET"), (":scheme", "https"),
                                               (":path", "/u/0123456789abcdef0123?token=x")], end_stream=True), 0)
    r = h.feed(K, False, 10, s.headers(1, [(":status", "404")], end_stream=True), 0)
    assert [(x.status, x.path, x.grpc) for x in r] == [("4xx", "/u/*?token=*", -1)]
    h2 = Http2(Settings(masks=Masks(url_query=False, url_path=False)))
    c, s = Peer(), Peer()
    h2.feed(K, True, 0, PREFACE + c.headers(1, [(":method", "GET"), (":path", "/a?b=c")], end_stream=True), 0)
    assert h2.feed(K, False, 1, s.headers(1, [(":status", "200")]) + frame(0, 1, 1, b"x"), 0)[0].path == "/a?b=c"


def test_a_read_that_ends_mid_frame_is_joined_with_the_next() -> None:
    h, c, s = Http2(Settings()), Peer(), Peer()
    h.feed(K, True, 0, PREFACE + grpc_request(c, 1), 0)
    resp = grpc_response(s, 1)
    for cut in (3, 12, len(resp) - 4):
        h2, c2, s2 = Http2(Settings()), Peer(), Peer()
        h2.feed(K, True, 0, PREFACE + grpc_request(c2, 1), 0)
        r2 = grpc_response(s2, 1)
        assert h2.feed(K, False, 1, r2[:cut], cut) == []
        assert [x.status for x in h2.feed(K, False, 2, r2[cut:], len(r2) - cut)] == ["grpc:OK"], cut


def test_a_call_cut_by_the_capture_limit_is_skipped_by_frame_length() -> None:
    h, c, s = Http2(Settings()), Peer(), Peer()
    h.feed(K, True, 0, PREFACE + grpc_request(c, 1) + grpc_request(c, 3), 0)
    big = s.headers(1, [(":status", "200")]) + frame(0, 0, 1, b"\0" * 5000)
    tail = s.headers(1, [("grpc-status", "0")], end_stream=True)
    # the kernel captured 1024 bytes of a 5000+ byte call; the trailers come in the next call
    assert h.feed(K, False, 1, big[:1024], len(big)) == []
    assert [x.status for x in h.feed(K, False, 2, tail, len(tail))] == ["grpc:OK"]
    # a call whose data frame continues into the next call, captured short both times
    data = frame(0, 0, 3, b"\1" * 3000)
    first, rest = s.headers(3, [(":status", "200")]) + data[:1500], data[1500:]
    h.feed(K, False, 3, first[:1024], len(first))
    assert h.feed(K, False, 4, rest[:1024], len(rest)) == []
    done = h.feed(K, False, 5, s.headers(3, [("grpc-status", "13")], end_stream=True), 0)
    assert [x.status for x in done] == ["grpc:INTERNAL"]


def test_reset_streams_and_responses_without_requests_make_nothing() -> None:
    h, c, s = Http2(Settings()), Peer(), Peer()
    h.feed(K, True, 0, PREFACE + grpc_request(c, 1), 0)
    h.feed(K, True, 1, frame(3, 0, 1, b"\0\0\0\x08"), 0)  # RST_STREAM CANCEL
    assert h.feed(K, False, 2, grpc_response(s, 1), 0) == []
    assert h.feed(K, False, 3, Peer().headers(7, [(":status", "200")], end_stream=True), 0) == []


def test_status_labels_are_the_node_agents() -> None:
    assert status_label(200, 0) == "grpc:OK" and status_label(200, 16) == "grpc:UNAUTHENTICATED"
    assert status_label(200, 99) == "grpc:UNKNOWN" and status_label(503, -1) == "5xx"
    assert status_label(0, -1) == "unknown"


def test_through_the_tracer_outbound_counts_merge_with_http_and_spans_carry_grpc() -> None:
    conns, rows = Connections(), Rows()
    t = L7Tracer(Containers(), conns, rows, hostname="h")
    conns.add(100, 7, 55, "10.0.0.9", 50051, actual="10.0.0.9:50051")
    c, s = Peer(), Peer()

    def ev(written: bool, data: bytes, ts: int) -> bytes:
        flags = F_OUTBOUND | (F_WRITE if written else 0)
        return pack(Event(ts, 0, 55, 100, 7, contract.HTTP2, flags, data, b""))

    t.handle_event(ev(True, PREFACE + grpc_request(c, 1) + grpc_request(c, 3, "/pkg.Svc/Put"), 1_000_000))
    t.handle_event(ev(False, grpc_response(s, 1) + grpc_response(s, 3, status=14), 4_000_000))
    t.handle_event(pack(Event(0, 1_000_000, 55, 100, 7, contract.HTTP, F_OUTBOUND,
                              b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n")))
    lbl = {"container_id": CID, "destination": "10.0.0.9:50051"}
    assert value(t, "container_http_requests_total", status="grpc:OK", **lbl) == 1
    assert value(t, "container_http_requests_total", status="grpc:UNAVAILABLE", **lbl) == 1
    assert value(t, "container_http_requests_total", status="2xx", **lbl) == 1
    assert value(t, "container_http_requests_duration_seconds_total_count", **lbl) == 3
    spans = {r["SpanAttributes"]["http.url"]: r for r in rows.rows if r["SpanName"] == "POST"}
    r = spans["http://10.0.0.9:50051/pkg.Svc/Get"]
    assert r["SpanAttributes"]["rpc.grpc.status_code"] == "0" and r["StatusCode"] == "STATUS_CODE_UNSET"
    assert r["Duration"] == 3_000_000
    assert [x["StatusCode"] for x in rows.rows if x["SpanName"] == "POST"].count("STATUS_CODE_ERROR") == 1


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300), st.integers(0, 5000)), max_size=8))
def test_any_bytes_in_any_order_never_raise(calls: list[tuple[bool, bytes, int]]) -> None:
    h = Http2(Settings())
    for client, data, size in calls:
        for r in h.feed(K, client, 1, data, size):
            assert r.status in ("1xx", "2xx", "3xx", "4xx", "5xx", "unknown") or r.status.startswith("grpc:")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(0, 3))
def test_truncated_real_frames_never_raise(cut: int, which: int) -> None:
    c, s = Peer(), Peer()
    stream = [PREFACE + grpc_request(c, 1), grpc_response(s, 1), grpc_request(c, 3), grpc_response(s, 3, 2)]
    h = Http2(Settings())
    for i, data in enumerate(stream):
        part = data[:cut] if i == which else data
        h.feed(K, i % 2 == 0, i, part, len(data))
