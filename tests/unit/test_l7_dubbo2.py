"""The Dubbo2 plug-in (agent/l7/dubbo2.py) on wire bytes dubbo-ssl-python 0.9.6's DubboClient wrote
and the test's provider (tests/system/workloads/dubbo2_responder.py) answered, captured through
a proxy, one line per recv() with its direction (tests/unit/data/dubbo2.jsonl: three sayHello
calls, two SERVICE_ERRORs, two SERVICE_NOT_FOUNDs, six calls in flight together answered in
reverse order); built messages for what the client did not send (heartbeats, one-way requests,
other serializations, other status codes, long and chunked strings); random and truncated calls
under hypothesis; the plug-in through the tracer with packed stream events."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract
from agent.l7 import dubbo2 as d
from agent.l7.contract import F_INBOUND, F_OUTBOUND, F_WRITE, Event, pack
from agent.l7.protocol import Peer, Request, Settings
from agent.l7.tracer import L7Tracer
from agent.metrics import Families
from tests.unit.l7_helpers import CID, Connections, Containers, Rows, value
from tests.unit.nodeagent_families import CONST_LABELS, FAMILIES, L7_STATUS

DATA = Path(__file__).parent / "data"
C = (1, 2, 3)
GREETING = "org.apache.dubbo.demo.GreetingService"
MISSING = "org.apache.dubbo.demo.MissingService"
PEER = Peer("10.0.0.9:20880", "10.0.0.9", 20880, "10.0.0.9")


def capture() -> list[tuple[bool, bytes]]:
    lines = (DATA / "dubbo2.jsonl").read_text().splitlines()
    return [(r["client"], bytes.fromhex(r["hex"])) for r in map(json.loads, lines)]


def replay(calls: list[tuple[bool, bytes]], plugin: d.Dubbo2 | None = None,
           keep: int = 1024) -> list[Request]:
    k = plugin or d.Dubbo2(Settings())
    out: list[Request] = []
    for ts, (client, data) in enumerate(calls):
        out += k.feed(C, client, ts * 1000, data[:keep], len(data))
    return out


def test_the_client_s_calls_each_counted_once_with_status_service_and_method() -> None:
    got = [(r.path, r.method, r.status, r.error, r.code) for r in replay(capture())]
    assert got == [
        (GREETING, "sayHello", "ok", "", 20)] * 3 + [
        (GREETING, "fail", "failed", "SERVICE_ERROR", 70)] * 2 + [
        (MISSING, "sayHello", "failed", "SERVICE_NOT_FOUND", 60)] * 2 + [
        (GREETING, "slow", "ok", "", 20)] * 6


def test_calls_in_flight_together_pair_by_request_id_answered_in_reverse() -> None:
    calls = capture()
    answers = b"".join(data for client, data in calls[14:] if not client)
    ids = []
    while answers:
        h = d.header(answers)
        assert h is not None
        ids.append(h.request_id)
        answers = answers[d.HEADER + h.length:]
    assert ids == [12, 11, 7, 10, 9, 8]  # the provider's log's order
    assert len([data for client, data in calls[14:] if client]) == 2  # five of the six requests came in one read
    got = replay(calls)[-6:]
    # replayed at 1 us a line: id 7 written at line 14, 8-12 at line 15; answered at lines 16-18
    assert [(r.start_ns, round(r.duration * 1e6)) for r in got] == [
        (15_000, 1), (15_000, 2), (14_000, 3), (15_000, 2), (15_000, 2), (15_000, 3)]


def test_a_response_pairs_only_with_its_own_id_and_once() -> None:
    k = d.Dubbo2(Settings())
    q1, q2 = d.request(7, GREETING, "a"), d.request(8, GREETING, "b")
    k.feed(C, True, 10, q1 + q2, len(q1 + q2))  # written at once
    assert k.feed(C, False, 20, d.response(9), 27) == []  # nobody asked
    [r2] = k.feed(C, False, 30, d.response(8, 80, d.hessian("x")), 19)
    [r1] = k.feed(C, False, 40, d.response(7), 27)
    assert (r2.method, r2.status, r2.error, r2.duration) == ("b", "failed", "SERVER_ERROR", 20e-9)
    assert (r1.method, r1.status, r1.duration) == ("a", "ok", 30e-9)
    assert k.feed(C, False, 50, d.response(7), 27) == []  # answered already


def test_status_codes_as_the_node_agent_reads_them() -> None:
    codes = {20: "ok", 30: "failed", 31: "failed", 40: "failed", 50: "failed", 60: "failed", 70: "failed",
             80: "failed", 90: "failed", 100: "failed", 0: "unknown", 21: "unknown", 255: "unknown"}
    assert {c: d.status_of(c) for c in codes} == codes
    assert set(codes.values()) <= set(L7_STATUS["dubbo"])


def test_heartbeats_one_way_requests_and_the_server_s_own_requests_are_not_counted() -> None:
    k = d.Dubbo2(Settings())
    beat = d.message(d.F_REQUEST | d.F_TWO_WAY | d.F_EVENT | d.HESSIAN2, 5, b"N")
    beat_reply = d.message(d.F_EVENT | d.HESSIAN2, 5, b"N", status=20)
    oneway = d.request(6, GREETING, "notify", flags=d.F_REQUEST | d.HESSIAN2)
    assert k.feed(C, True, 1, beat + oneway, len(beat + oneway)) == []
    assert k.feed(C, False, 2, beat_reply, len(beat_reply)) == []
    assert k.feed(C, False, 3, d.response(6), 27) == []  # no one-way request waits
    server_beat = d.message(d.F_REQUEST | d.F_TWO_WAY | d.F_EVENT | d.HESSIAN2, 9, b"N")
    assert k.feed(C, False, 4, server_beat, len(server_beat)) == []
    assert k.feed(C, True, 5, d.message(d.F_EVENT | d.HESSIAN2, 9, b"N", 20), 17) == []
    q = d.request(10, GREETING, "sayHello")
    k.feed(C, True, 6, q, len(q))
    [r] = k.feed(C, False, 7, d.response(10), 27)
    assert (r.method, r.status) == ("sayHello", "ok")


def test_other_serializations_count_without_a_span() -> None:
    k = d.Dubbo2(Settings())
    q = d.message(d.F_REQUEST | d.F_TWO_WAY | 23, 3, b'"2.0.2"\n"a.B"\n"0.0.0"\n"c"\n')  # fastjson2
    k.feed(C, True, 1, q, len(q))
    [r] = k.feed(C, False, 2, d.message(23, 3, b"1", 20), 17)
    assert (r.status, r.path, r.method) == ("ok", "", "")
    assert k.span(r, PEER, False) is None


def test_hessian2_strings_short_medium_chunked_null_and_not_ascii() -> None:
    long = "x" * 40
    chunked = b"R\x00\x03abc" + b"\x02de"  # a non-final chunk, then a short final one
    for raw, want in ((d.hessian("abc"), "abc"), (d.hessian(long), long), (d.hessian("y" * 2000), "y" * 2000),
                      (b"N", None), (chunked, "abcde"), (b"\x03h\xc3\xa9\xe2\x82\xac", "hé€"),
                      (b"\x02\xf0\x9f\x98\x80", "😀")):  # a supplementary character counts as 2 units
        assert d.hessian_string(raw + b"tail", 0) == (want, len(raw)), raw
    for bad in (b"\x05abc", b"\x31", b"S\x00", b"\x02\xe2\x82"):
        try:
            d.hessian_string(bad, 0)
        except d.Short:
            continue
        raise AssertionError(bad)
    assert d.parse_call(d.header(d.request(1, "a", "b")), b"\x91")  # type: ignore[arg-type]


def test_a_body_past_the_captured_bytes_keeps_its_names_and_the_next_message_is_found() -> None:
    k = d.Dubbo2(Settings())
    big = d.request(1, GREETING, "upload", args=d.hessian("z" * 5000))
    k.feed(C, True, 1, big[:1024], len(big))  # only 1024 bytes of the write captured
    q = d.request(2, GREETING, "sayHello")
    k.feed(C, True, 2, q, len(q))
    both = d.response(2) + d.response(1)
    got = k.feed(C, False, 3, both[:16], 16)  # the client reads the header alone, then the rest
    got += k.feed(C, False, 4, both[16:], len(both) - 16)
    assert [(r.method, r.status, r.start_ns) for r in got] == [("sayHello", "ok", 2), ("upload", "ok", 1)]


def test_the_span_names_service_and_method_and_failures_are_errors() -> None:
    k = d.Dubbo2(Settings())
    ok = Request(d.Dubbo2.id, "ok", 0.01, "sayHello", path=GREETING, code=20)
    s = k.span(ok, PEER, False)
    assert s is not None and (s.name, s.attributes, s.status, s.message) == (
        f"{GREETING}/sayHello", {"rpc.system": "apache_dubbo", "rpc.service": GREETING, "rpc.method": "sayHello"},
        "STATUS_CODE_UNSET", "")
    bad = Request(d.Dubbo2.id, "failed", 0.01, "fail", path=GREETING, error="SERVICE_ERROR", code=70)
    s = k.span(bad, PEER, False)
    assert s is not None and (s.status, s.message) == ("STATUS_CODE_ERROR", "SERVICE_ERROR")
    odd = Request(d.Dubbo2.id, "unknown", 0.01, "x", path=GREETING, code=21)
    s = k.span(odd, PEER, False)
    assert s is not None and s.status == "STATUS_CODE_UNSET"


def test_connections_and_waiting_requests_are_bounded() -> None:
    k = d.Dubbo2(Settings())
    for i in range(d.MAX_PENDING + 10):
        q = d.request(i, GREETING, "m")
        k.feed(C, True, i, q, len(q))
    assert k.feed(C, False, 1, d.response(0), 27) == []  # the oldest went first
    assert len(k.feed(C, False, 1, d.response(d.MAX_PENDING + 9), 27)) == 1
    for i in range(d.MAX_CONNECTIONS + 5):
        k.feed((9, i, 0), True, 1, b"", 0)
    assert len(k._conns) == d.MAX_CONNECTIONS


def ev(written: bool, data: bytes, ts: int, *, inbound: bool = False) -> bytes:
    flags = (F_INBOUND if inbound else F_OUTBOUND) | (F_WRITE if written else 0)
    return pack(Event(ts, 0, 55, 200 if inbound else 100, 7, contract.DUBBO2, flags, data[512:1024], data[:512],
                      len(data)))


def test_through_the_tracer_counts_both_sides_and_spans_the_client_s() -> None:
    conns, rows = Connections(), Rows()
    t = L7Tracer(Containers(), conns, rows, hostname="h", host_id="m")
    conns.add(100, 7, 55, "10.0.0.9", 20880, actual="10.0.0.9:20880")
    for i, (client, data) in enumerate(capture()):
        t.handle_event(ev(client, data, (i + 1) * 1_000_000))  # the client writes what the client sends
        t.handle_event(ev(not client, data, (i + 1) * 1_000_000, inbound=True))  # the provider reads it
    lbl = {"container_id": CID, "destination": "10.0.0.9:20880"}
    assert value(t, "container_dubbo_requests_total", status="ok", **lbl) == 9
    assert value(t, "container_dubbo_requests_total", status="failed", **lbl) == 4
    assert value(t, "container_dubbo_requests_duration_seconds_total_count", **lbl) == 13
    assert value(t, "container_dubbo_inbound_requests_total", status="ok") == 9
    assert value(t, "container_dubbo_inbound_requests_total", status="failed") == 4
    spans = [r for r in rows.rows if r["ResourceAttributes"]["container.id"] == CID]
    assert sorted((s["SpanName"], s["StatusCode"], s["StatusMessage"]) for s in spans) == sorted(
        [(f"{GREETING}/sayHello", "STATUS_CODE_UNSET", "")] * 3 + [
            (f"{GREETING}/fail", "STATUS_CODE_ERROR", "SERVICE_ERROR")] * 2 + [
            (f"{MISSING}/sayHello", "STATUS_CODE_ERROR", "SERVICE_NOT_FOUND")] * 2 + [
            (f"{GREETING}/slow", "STATUS_CODE_UNSET", "")] * 6)
    assert {s["SpanAttributes"]["rpc.system"] for s in spans} == {"apache_dubbo"}
    assert {s["SpanAttributes"]["net.peer.port"] for s in spans} == {"20880"}
    # the families are the node agent's: names, types, labels, status values
    f = Families({"machine_id": "m", "system_uuid": "u"})
    t.collect(f)
    got = {fam.name + ("_total" if fam.type == "counter" else ""): fam for fam in f
           if fam.name.startswith("container_dubbo")}
    assert set(got) == {"container_dubbo_requests_total", "container_dubbo_requests_duration_seconds_total",
                        "container_dubbo_inbound_requests_total",
                        "container_dubbo_inbound_requests_duration_seconds_total"}
    for name, fam in got.items():
        kind, labels = FAMILIES[name]
        assert fam.type == kind, name
        assert {frozenset(s.labels) - {"le"} for s in fam.samples} == {labels | CONST_LABELS}, name
        assert {s.labels["status"] for s in fam.samples if "status" in s.labels} <= set(L7_STATUS["dubbo"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200), st.integers(0, 3000)), max_size=10))
def test_any_calls_in_any_order_never_raise(calls: list[tuple[bool, bytes, int]]) -> None:
    k = d.Dubbo2(Settings())
    for client, data, size in calls:
        for r in k.feed(C, client, 1, data, size):
            assert r.status in ("ok", "failed", "unknown")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_any_body_and_any_string_never_raise_but_short(body: bytes, pos: int) -> None:
    h = d.header(d.request(1, "a", "b"))
    assert h is not None
    call = d.parse_call(h, body)
    assert isinstance(call.service, str) and len(call.method) <= d.MAX_NAME
    try:
        d.hessian_string(body, pos)
    except (d.Short, ValueError):
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 18), st.integers(0, 300), st.integers(0, 300), st.integers(0, 255), st.integers(1, 1024))
def test_real_calls_cut_or_corrupted_anywhere_never_raise(which: int, cut: int, at: int, byte: int,
                                                          keep: int) -> None:
    calls = capture()
    client, data = calls[which]
    bad = data[:at] + bytes([byte]) + data[at + 1:] if at < len(data) else data
    for r in replay(calls[:which] + [(client, data[:cut])] + calls[which + 1:]):
        assert r.status in ("ok", "failed")
    replay(calls[:which] + [(client, bad)] + calls[which + 1:])
    replay(calls, keep=keep)
