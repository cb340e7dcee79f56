"""The ClickHouse native-protocol plug-in (agent/l7/clickhouse.py) on wire bytes clickhouse-driver
0.2.11 (client revision 54468) exchanged with Debian's clickhouse-server 18.16.1 (revision 54412)
and with the stand-in server of tests/system/workloads/clickhouse_responder.py announcing
revisions 54460 and 54468, captured through a proxy, one line per recv() with its direction and
connection (tests/unit/data/clickhouse_18.16.jsonl, _54460.jsonl, _54468.jsonl): queries with
and without a query id, settings, parameters, an OpenTelemetry context; Exceptions (an unknown
table, a syntax error), an INSERT, a CREATE, a query longer than the capture; the addendum the
driver writes with its first Query of a connection from revision 54458. Built packets for the
rest; random, cut and flipped bytes under hypothesis; the kernel's detector (compiled natively
from bpf/include/l7/) against the parser; the plug-in through the tracer with packed events."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import clickhouse as ch
from agent.l7 import contract
from agent.l7.contract import F_INBOUND, F_OUTBOUND
from agent.l7.protocol import Masks, Peer, Settings
from tests.unit.l7_helpers import CID, detector_lines, paired, tracer, value
from tests.unit.nodeagent_families import FAMILIES

DATA = Path(__file__).parent / "data"
K = (1, 5, 9)
PAYLOAD, RESP = contract.PAYLOAD_DEFAULT, contract.RESP_MAX
PEER = Peer("127.0.0.1:9000", "127.0.0.1", 9000, "127.0.0.1")


def capture(name: str) -> list[tuple[int, bool, bytes]]:
    lines = (DATA / f"clickhouse_{name}.jsonl").read_text().splitlines()
    return [(d["conn"], d["client"], bytes.fromhex(d["hex"])) for d in map(json.loads, lines)]


def pairs(name: str) -> list[tuple[bytes, bytes]]:
    """(the call that carried a Query, the first reply read after it), as the kernel pairs them:
    the client's call is what the server read too (the proxy's recv)."""
    pending: dict[int, bytes] = {}
    out = []
    for conn, client, data in capture(name):
        if client:
            if ch.parse_query(data) is not None:
                pending[conn] = data
        elif conn in pending:
            out.append((pending.pop(conn)[:PAYLOAD], data[:RESP]))
    return out


EXPECT = {
    "18.16": [
        ("SELECT ?, ?", "ok", ""),
        ("SELECT * FROM missing_t WHERE x = ?", "failed", "60"),
        ("SELECT ?", "ok", ""),  # with a query id
        ("SELECT ?", "ok", ""),  # with max_threads = 2 in the binary settings format
        ("SELECT number FROM system.numbers LIMIT ?", "ok", ""),
        ("CREATE TABLE IF NOT EXISTS t (a UInt32, s String) ENGINE = Memory", "ok", ""),  # EndOfStream
        ("INSERT INTO t (a, s) VALUES", "ok", ""),  # the table's header block
        ("SELECT count() FROM t WHERE s = ?", "ok", ""),
        ("SELECT length(?" + ch.TRUNCATED, "ok", ""),  # 1,236 bytes of text: the capture keeps 1,024
        ("SELECT ?    \n, ?, ?, ?", "ok", ""),  # comments, hex, a float, an escaped quote
        ("SELEC ?", "failed", "62"),  # a syntax error
    ],
    "54460": [
        ("SELECT ?, ?", "ok", ""),  # after the addendum
        ("SELECT * FROM missing_t WHERE x = ?", "failed", "60"),
        ("SELECT ?", "ok", ""),  # a query id, after the addendum (the driver reconnected)
        ("SELECT ?", "ok", ""),  # a setting, as strings
        ("SELECT {n:UInt8} AS x, ? AS s", "ok", ""),  # a parameter after the text
        ("SELECT ?", "ok", ""),  # an OpenTelemetry context
    ],
}
EXPECT["54468"] = EXPECT["54460"]


def test_captured_queries_and_replies_as_the_node_agent_counts_them() -> None:
    for name, want in EXPECT.items():
        c = ch.Clickhouse(Settings())
        got = [(r.statement, r.status, r.error) for q, a in pairs(name) for r in c.parse(K, q, a, 0.001)]
        assert got == want, name


def texts(name: str) -> list[str]:
    return [q.text for q in map(ch.parse_query, (q for q, _ in pairs(name))) if q is not None]


def test_texts_as_sent_in_each_layout() -> None:
    old = texts("18.16")
    assert old[:4] == ["SELECT 1, 'abc'", "SELECT * FROM missing_t WHERE x = 'secret'", "SELECT 2", "SELECT 3"]
    assert old[8].startswith("SELECT length('éé") and len(old[8].encode()) < 1024
    assert old[9] == "SELECT 1 /* note */ -- tail\n, 0x1F, 1e3, 'it\\'s'"
    for name in ("54460", "54468"):
        assert texts(name) == ["SELECT 1, 'abc'", "SELECT * FROM missing_t WHERE x = 'secret'", "SELECT 2",
                               "SELECT 3", "SELECT {n:UInt8} AS x, 'été' AS s", "SELECT 4"]


def test_nothing_else_the_client_or_server_sends_is_a_query() -> None:
    for name in EXPECT:
        calls = capture(name)
        queries = [d for _, client, d in calls if client and ch.parse_query(d) is not None]
        assert len(queries) == len(EXPECT[name])
        for _, client, data in calls:
            if not client:
                assert ch.parse_query(data) is None, data.hex()
        others = [d for _, client, d in calls if client and d not in queries]
        assert {d[0] for d in others} <= {0, 2, 4}  # Hello, Data, Ping
    assert ch.parse_query(b"") is None and ch.parse_query(b"\x01") is None


def test_replies_by_their_first_packet() -> None:
    replies = [a for name in EXPECT for _, a in pairs(name)]
    assert {ch.parse_reply(a).status for a in replies} == {"ok", "failed"}
    exc = next(a for a in replies if a[0] == 2)
    assert ch.parse_reply(exc) == ch.Reply("failed", 60)
    assert ch.parse_reply(b"\x05") == ch.parse_reply(b"\x03\x01\x01\x00\x00\x00") == ch.Reply("ok")  # EndOfStream, Progress
    assert ch.parse_reply(bytes.fromhex("06010108000001030214000100010002ffffffff000000")) == ch.Reply("ok")  # ProfileInfo
    for kind in (7, 8, 10, 11, 14):  # Totals, Extremes, Log, TableColumns, ProfileEvents
        assert ch.parse_reply(bytes([kind, 0])).status == "ok"
    for data in (b"", b"\x04", bytes.fromhex("000a436c69636b486f757365"), b"\x02\x00\x00\x00\x00", b"\x02\xff\xff\xff\xff",
                 b"\x02\x01\x10\x00\x00", b"\x02\x3c", b"\x09", b"\x7f", b"HTTP/1.1 200 OK\r\n"):
        assert ch.parse_reply(data).status == "unknown", data.hex()


def test_a_query_cut_by_the_capture_ends_marked_and_never_in_half_a_character() -> None:
    long_query = pairs("18.16")[8][0]
    c = ch.Clickhouse(Settings(masks=Masks(sql_literals=False)))
    for cut in range(95, 140):
        q = ch.parse_query(long_query[:cut])
        assert q is not None and q.truncated
        assert "\ufffd" not in q.text and q.text.startswith("SELECT length('"[:len(q.text)])
        stmt = c.parse(K, long_query[:cut], b"\x05", 0.001)[0].statement
        assert stmt.endswith(ch.TRUNCATED) or stmt == ""
    masked = ch.Clickhouse(Settings()).parse(K, long_query[:300], b"\x05", 0.001)[0].statement
    assert masked == "SELECT length(?" + ch.TRUNCATED


def test_masks_off_keeps_the_text_and_spans_are_queries_with_the_error_code() -> None:
    q, a = pairs("18.16")[1]
    raw = ch.Clickhouse(Settings(masks=Masks(sql_literals=False))).parse(K, q, a, 0.001)[0]
    assert raw.statement == "SELECT * FROM missing_t WHERE x = 'secret'"
    c = ch.Clickhouse(Settings())
    s = c.span(c.parse(K, q, a, 0.001)[0], PEER, False)
    assert s is not None and (s.name, s.status, s.message) == ("query", "STATUS_CODE_ERROR", "60")
    assert s.attributes == {"db.system": "clickhouse", "db.statement": "SELECT * FROM missing_t WHERE x = ?"}
    q, a = pairs("54468")[0]
    s = c.span(c.parse(K, q, a, 0.001)[0], PEER, False)
    assert s is not None and (s.name, s.status, s.message) == ("query", "STATUS_CODE_UNSET", "")
    assert s.attributes == {"db.system": "clickhouse", "db.statement": "SELECT ?, ?"}


def _query(text: bytes, rev: int, settings_: bytes = b"\x00", client_rev: int = 54492, interface: int = 1) -> bytes:
    """A Query as a client of `client_rev` writes it to a server of revision `rev`."""
    def s(b: bytes) -> bytes:
        return bytes([len(b)]) + b

    def v(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    out = b"\x01" + s(b"") + b"\x01" + s(b"") + s(b"") + s(b"127.0.0.1:5000")
    if rev >= ch.START_TIME:
        out += (1_700_000_000_000_000).to_bytes(8, "little")
    out += bytes([interface]) + s(b"u") + s(b"host") + s(b"ClickHouse client") + v(25) + v(8) + v(client_rev)
    out += s(b"") + (v(0) if rev >= ch.DISTRIBUTED_DEPTH else b"") + v(3)
    out += b"\x00" if rev >= ch.OPENTELEMETRY else b""
    out += v(0) * 3 if rev >= ch.PARALLEL_REPLICAS else b""
    out += v(1) + v(1) if rev >= ch.SCRIPT_LINE else b""
    out += b"\x00" if rev >= ch.JWT else b""
    out += s(b"clickhouse-client") if rev >= ch.CLIENT_AGENT else b""
    out += settings_ + (s(b"") if rev >= ch.INTERSERVER_SECRET else b"") + v(2) + v(0) + v(len(text)) + text
    return out + (b"\x00" if rev >= ch.PARAMETERS else b"")


def test_every_layout_from_revision_54060_to_54492() -> None:
    strings = b"\x0bmax_threads\x02\x012\x00"
    binary = b"\x0bmax_threads\x02\x14format_csv_delimiter\x01;\x00"
    for rev in (54060, 54401, 54412, 54429, 54441, 54442, 54448, 54449, 54453, 54459, 54460, 54468, 54475, 54476,
                54485, 54492):
        for sets in (b"\x00", strings if rev >= ch.SETTINGS_AS_STRINGS else binary):
            data = _query(b"SELECT 42 WHERE x = 'a'", rev, sets)
            assert ch.parse_query(data) == ch.Query("SELECT 42 WHERE x = 'a'"), (rev, sets)
            assert ch.parse_query(data + bytes.fromhex("0200010002ffffffff000000")) == ch.Query(
                "SELECT 42 WHERE x = 'a'"), rev  # what a server reads: the empty Data block after it
    # a client of an older revision than the layout: not read as it
    assert ch.parse_query(_query(b"SELECT 1", 54476, client_rev=54468)) == ch.Query("")
    # an HTTP interface (a secondary query of one that came by HTTP): counted, text not read
    assert ch.parse_query(_query(b"SELECT 1", 54460, interface=2)) == ch.Query("")


ALL_QUERIES = [q for name in EXPECT for q, _ in pairs(name)]
ALL_CALLS = [d[:PAYLOAD] for name in EXPECT for _, _, d in capture(name)]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=100))
def test_random_bytes_never_raise(req: bytes, rep: bytes) -> None:
    c = ch.Clickhouse(Settings())
    for data in (req, b"\x01" + req, b"\x00\x01" + req):
        for r in c.parse(K, data, rep, 0.001):
            assert r.status in ("ok", "failed", "unknown")
            assert c.span(r, PEER, False) is not None
    ch.parse_reply(req)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(ALL_CALLS), st.sampled_from(ALL_CALLS), st.integers(0, 1100), st.integers(0, 600))
def test_cut_real_calls_never_raise(req: bytes, rep: bytes, cut: int, cut2: int) -> None:
    c = ch.Clickhouse(Settings())
    assert len(c.parse(K, req[:cut], rep[:cut2], 0.001)) <= 1
    assert len(c.parse(K, req[cut:], rep[cut2:], 0.001)) <= 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_QUERIES), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4))
def test_flipped_real_queries_never_raise(req: bytes, flips: list[tuple[int, int]]) -> None:
    b = bytearray(req)
    for pos, byte in flips:
        b[pos % len(b)] = byte
    assert len(ch.Clickhouse(Settings()).parse(K, bytes(b), b"\x05", 0.001)) <= 1


# ---------------------------------------------------------- the kernel's detector, natively --

def detected(exe: Path, payloads: list[bytes]) -> list[int]:
    return [line[0] for line in detector_lines(exe, payloads)]


def test_the_kernel_claims_every_query_and_nothing_else_of_the_captures(detector: Path) -> None:
    calls = [d for name in EXPECT for _, _, d in capture(name)]
    got = detected(detector, calls)
    assert [g == contract.CLICKHOUSE for g in got] == [ch.parse_query(d) is not None for d in calls]
    assert got.count(contract.CLICKHOUSE) == sum(len(w) for w in EXPECT.values())
    layouts = [_query(b"SELECT 1", rev) for rev in (54060, 54412, 54449, 54460, 54492)]
    assert detected(detector, layouts) == [contract.CLICKHOUSE] * len(layouts)


def test_the_kernel_and_the_parser_agree_on_cut_and_flipped_queries(detector: Path) -> None:
    """Real Queries cut and with bytes flipped: the parser counts exactly what the detector claims."""
    rnd = random.Random(14)
    cases = []
    for q in ALL_QUERIES[:12]:
        cases += [q[:n] for n in range(0, min(len(q), 140) + 1)]
        for _ in range(150):
            b = bytearray(q)
            for _ in range(rnd.randint(1, 3)):
                b[rnd.randrange(min(len(b), 120))] = rnd.randrange(256)
            cases.append(bytes(b))
    claims = [d == contract.CLICKHOUSE for d in detected(detector, cases)]
    assert sum(claims) > len(cases) // 4
    assert claims == [ch.parse_query(c) is not None for c in cases]


def test_no_other_protocols_bytes_are_claimed(detector: Path) -> None:
    from agent.l7.protocols import PLUGINS

    others = [s for cls in PLUGINS if cls is not ch.Clickhouse for s in (*cls.kernel_requests, *cls.kernel_non_requests)]
    assert contract.CLICKHOUSE not in detected(detector, others)
    assert all(ch.parse_query(s) is None for s in others)


# ------------------------------------------------------------------- through the tracer --

ev = partial(paired, contract.CLICKHOUSE)


def test_the_tracer_counts_clients_and_servers_by_status_with_spans_for_clients() -> None:
    assert {"container_clickhouse_queries_total", "container_clickhouse_inbound_queries_total",
            "container_clickhouse_queries_duration_seconds_total",
            "container_clickhouse_inbound_queries_duration_seconds_total"} <= set(FAMILIES)
    t, conns, rows = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 9000, actual="10.0.0.10:9000")
    all_pairs = [p for name in EXPECT for p in pairs(name)]
    for q, a in all_pairs:
        t.handle_event(ev(F_OUTBOUND, q, a))
        t.handle_event(ev(F_INBOUND, q, a, pid=200))  # the server's view
    failed = sum(1 for _, a in all_pairs if a[0] == 2)
    ok = len(all_pairs) - failed
    assert (ok, failed) == (19, 4)
    lbl = {"container_id": CID, "destination": "10.0.0.9:9000", "actual_destination": "10.0.0.10:9000"}
    assert value(t, "container_clickhouse_queries_total", status="ok", **lbl) == ok
    assert value(t, "container_clickhouse_queries_total", status="failed", **lbl) == failed
    assert value(t, "container_clickhouse_queries_duration_seconds_total_count", **lbl) == len(all_pairs)
    assert value(t, "container_clickhouse_inbound_queries_total", status="ok", container_id=CID) == ok
    assert value(t, "container_clickhouse_inbound_queries_total", status="failed", container_id=CID) == failed
    assert value(t, "container_clickhouse_inbound_queries_duration_seconds_total_count") == len(all_pairs)
    got = [(r["SpanName"], r["SpanAttributes"]["db.statement"], r["StatusCode"], r["StatusMessage"])
           for r in rows.rows]
    code = {"ok": "STATUS_CODE_UNSET", "failed": "STATUS_CODE_ERROR"}
    assert got == [("query", stmt, code[status], err) for name in EXPECT for stmt, status, err in EXPECT[name]]
    assert all(r["Duration"] == 2_000_000 and r["SpanAttributes"]["db.system"] == "clickhouse"
               and r["SpanKind"] == "SPAN_KIND_CLIENT" for r in rows.rows)
