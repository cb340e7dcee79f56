"""The Cassandra plug-in (agent/l7/cassandra.py) on wire bytes cassandra-driver 3.30.1 wrote and
the test's stand-in node (tests/system/workloads/cassandra_responder.py) answered, captured
through a proxy, one line per recv() with its direction (tests/unit/data/cassandra_v4.jsonl and
_v5.jsonl: the driver's control connection and its session's connection; QUERY, PREPARE,
EXECUTE, BATCH, errors, four requests multiplexed and answered out of order; v5 after its
handshake in segments; _v5_lz4.jsonl: the same at v5 with the driver's LZ4 compression, its
segments compressed both ways, by the driver's `lz4` package and the node's); built messages for what the driver did not send; random and truncated
calls under hypothesis; the plug-in through the tracer with packed stream events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import cassandra as cql
from agent.l7 import contract
from agent.l7.protocol import Masks, Settings
from tests.unit.l7_helpers import (
    CID,
    RANDOM_CALLS,
    assert_node_agent_families,
    captured,
    feed_both_sides,
    feed_random,
    spoiled,
    stream_tracer,
    value,
)

C = (1, 2, 3)


def capture(version: int | str) -> list[tuple[int, bool, bytes]]:
    return [(d["conn"], d["client"], d["data"]) for d in captured(f"cassandra_v{version}")]


def replay(calls: list[tuple[int, bool, bytes]], plugin: cql.Cassandra | None = None,
           keep: int = 1024) -> list[tuple[int, str, str, str, str]]:
    k = plugin or cql.Cassandra(Settings())
    out = []
    for ts, (conn, client, data) in enumerate(calls):
        for r in k.feed((1, conn, 0), client, ts, data[:keep], len(data)):
            out.append((conn, r.method, r.status, r.error, r.statement))
    return out


EXPECTED = [
    (1, "QUERY", "ok", "", "SELECT host_id, peer, peer_port, data_center, rack, native_address, native_port, "
     "release_version, schema_version FROM system.peers_v2"),
    (1, "QUERY", "ok", "", "SELECT host_id, cluster_name, data_center, rack, partitioner, release_version, "
     "schema_version FROM system.local WHERE key=?"),
    (2, "QUERY", "ok", "", "SELECT name FROM ca.people WHERE id = ? AND age > ?"),
    (2, "QUERY", "failed", "2200", "SELECT name FROM ca.missing WHERE id = ?"),
    (2, "EXECUTE", "ok", "", "INSERT INTO ca.people (id, name) VALUES (?, ?)"),
    (2, "EXECUTE", "failed", "2200", "INSERT INTO ca.missing_people (id, name) VALUES (?, ?)"),
    (2, "BATCH", "ok", "", "INSERT INTO ca.people (id, name) VALUES (?, ?); INSERT INTO ca.people (id, age) "
     "VALUES (?, ?)"),
    (2, "BATCH", "failed", "2200", "INSERT INTO ca.people (id, name) VALUES (?, ?); INSERT INTO ca.missing (id, age) "
     "VALUES (?, ?)"),
]
# the four multiplexed SELECTs, as the node answered them (ids 3, 0, 2, 1)
MULTIPLEXED = [(2, "QUERY", "failed", "2200", "SELECT name FROM ca.missing_slow WHERE id = ?"),
               (2, "QUERY", "ok", "", "SELECT name FROM ca.slow WHERE id = ?"),
               (2, "QUERY", "ok", "", "SELECT name FROM ca.slow WHERE id = ?"),
               (2, "QUERY", "failed", "2200", "SELECT name FROM ca.missing_slow WHERE id = ?")]


def test_the_driver_s_v4_and_v5_sessions_each_request_once_with_its_status_and_masked_statement() -> None:
    for version in (4, 5):
        got = replay(capture(version))
        assert got == EXPECTED + MULTIPLEXED, version
        assert not any("secret" in r[4] for r in got)


def test_the_driver_s_lz4_compressed_v5_session_each_request_once_with_its_status_and_masked_statement() -> None:
    calls = capture("5_lz4")
    heads = [(client, cql.segment_header(data[:9])) for _, client, data in calls]
    # LZ4 made some segments smaller both ways (those it did not are stored as is, as the spec says)
    assert {client for client, h in heads if h is not None and h.uncompressed} == {True, False}
    assert all(cql.segment_payload(data[:6]) is None for _, _, data in calls if data[:1] != b"\x05")
    got = replay(calls)
    assert got[:len(EXPECTED)] == EXPECTED
    assert sorted(got[len(EXPECTED):]) == sorted(MULTIPLEXED)
    assert not any("secret" in r[4] for r in got)


def test_a_compressed_segment_is_read_only_whole_and_only_to_its_declared_length() -> None:
    q = cql.query(9, "SELECT name FROM ks.people WHERE id = 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'", version=5)
    seg = cql.compressed_segment(q)
    h = cql.segment_header(seg[:9])
    assert h is not None and (h.uncompressed, h.size) == (len(q), 8) and h.length < len(q)
    block = seg[8:8 + h.length]
    assert cql.decompress(block, len(q)) == q
    assert cql.decompress(block, len(q) - 1) is None  # it would decode to more than the header says
    assert cql.decompress(block, len(q) + 1) is None  # or to less
    assert cql.decompress(block, cql.MAX_SEGMENT + 1) is None and cql.decompress(block[:-4], len(q)) is None
    k = cql.Cassandra(Settings())
    assert k.feed(C, True, 1, seg[:40], len(seg)) == []  # cut by the capture: not read, nothing raised
    k.feed(C, True, 2, seg, len(seg))
    done = k.feed(C, False, 3, cql.compressed_segment(cql.message(cql.RESULT, 9, b"\0\0\0\x01", version=0x85)), 21)
    assert [(r.method, r.status, r.statement) for r in done] == [
        ("QUERY", "ok", "SELECT name FROM ks.people WHERE id = ?")]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, cql.MAX_SEGMENT), st.integers(0, cql.MAX_SEGMENT), st.booleans(), st.binary(max_size=300),
       st.integers(0, 400))
def test_any_compressed_segment_header_over_any_payload_never_raises(length: int, uncompressed: int, whole: bool,
                                                                     payload: bytes, size: int) -> None:
    value = length | uncompressed << 17 | int(whole) << 34
    seg = value.to_bytes(5, "little") + cql.crc24(value, 5).to_bytes(3, "little") + payload
    h = cql.segment_header(seg[:9])
    assert h is not None and (h.length, h.uncompressed, h.self_contained) == (length, uncompressed, whole)
    k = cql.Cassandra(Settings())
    k.feed(C, True, 1, cql.query(1, "SELECT 1", version=5), 0)
    for client in (True, False):
        for r in k.feed(C, client, 2, seg, max(size, len(seg))):
            assert r.status in ("ok", "failed")


def test_v5_after_the_handshake_is_in_segments_and_v4_is_not() -> None:
    v5 = [data for conn, client, data in capture(5) if conn == 2]
    assert cql.envelope_size(v5[0][:9]) == len(v5[0])  # OPTIONS, in the legacy framing
    assert cql.segment_payload(v5[-1][:6]) is not None  # a response after READY
    assert all(cql.segment_payload(data[:6]) is None for _, _, data in capture(4))


def test_masking_off_keeps_literals_and_prepared_statements_name_executes() -> None:
    k = cql.Cassandra(Settings(masks=Masks(sql_literals=False)))
    got = replay(capture(4), k)
    assert got[2][4] == "SELECT name FROM ca.people WHERE id = 'secret-0' AND age > 40"
    assert cql.mask("SELECT * FROM t WHERE u = 123e4567-e89b-12d3-a456-426614174000 AND b = 0xcafe "
                    "AND s = 'it''s' AND f = -1.5e3") == "SELECT * FROM t WHERE u = ? AND b = ? AND s = ? AND f = ?"


def test_prepare_is_not_counted_and_an_execute_of_an_unseen_prepare_has_no_statement() -> None:
    calls = [(c, cl, d) for c, cl, d in capture(4) if c == 2]
    k = cql.Cassandra(Settings())
    ids = [r.method for ts, (c, cl, d) in enumerate(calls) for r in k.feed((1, c, 0), cl, ts, d, len(d))]
    assert "PREPARE" not in ids and ids.count("EXECUTE") == 2
    execute = cql.message(cql.EXECUTE, 40, b"\0\x04abcd\0\x01\0")
    result = cql.message(cql.RESULT, 40, b"\0\0\0\x01", version=0x84)
    k.feed(C, True, 1, execute, len(execute))
    [r] = k.feed(C, False, 2, result, len(result))
    assert (r.method, r.status, r.statement) == ("EXECUTE", "ok", "")
    assert k.span(r, None, False) is None  # type: ignore[arg-type]


def test_responses_split_joined_and_past_the_captured_bytes() -> None:
    k = cql.Cassandra(Settings())
    q1, q2, q3 = (cql.query(s, f"SELECT {s} FROM t") for s in (1, 2, 3))
    big = cql.message(cql.RESULT, 1, b"\0\0\0\x02" + b"\0" * 4900, version=0x84)
    err = cql.message(cql.ERROR, 2, b"\0\0\x10\0\0\x02to", version=0x84)
    ok = cql.message(cql.RESULT, 3, b"\0\0\0\x01", version=0x84)
    k.feed(C, True, 1, q1 + q2 + q3, len(q1 + q2 + q3))
    both = big + err
    got = k.feed(C, False, 5, both[:1024], 4000)  # 1024 of a 4000-byte read captured
    got += k.feed(C, False, 6, both[4000:5024], len(both) - 4000)
    got += k.feed(C, False, 7, ok[:4], 4)
    got += k.feed(C, False, 9, ok[4:], len(ok) - 4)
    assert [(r.statement, r.status, r.error, r.duration) for r in got] == [
        ("SELECT ? FROM t", "ok", "", 4e-9), ("SELECT ? FROM t", "failed", "1000", 5e-9),
        ("SELECT ? FROM t", "ok", "", 6e-9)]


def test_the_crc24_is_the_driver_s() -> None:
    from cassandra.segment import compute_crc24

    for v in (0, 1, 9, 0x1FFFF, 0x20000 | 77, 0x3FFFF):
        assert cql.crc24(v) == compute_crc24(v, 3)


def test_through_the_tracer_counts_both_sides_and_spans_the_client_s() -> None:
    t, rows = stream_tracer("10.0.0.9", 9042)
    feed_both_sides(t, contract.CASSANDRA, [(cl, d) for c, cl, d in capture(5) if c == 2])
    lbl = {"container_id": CID, "destination": "10.0.0.9:9042"}
    assert value(t, "container_cassandra_queries_total", status="ok", **lbl) == 5
    assert value(t, "container_cassandra_queries_total", status="failed", **lbl) == 5
    assert value(t, "container_cassandra_queries_duration_seconds_total_count", **lbl) == 10
    assert value(t, "container_cassandra_inbound_queries_total", status="ok") == 5
    assert value(t, "container_cassandra_inbound_queries_total", status="failed") == 5
    spans = [r for r in rows.rows if r["ResourceAttributes"]["container.id"] == CID]
    assert len(spans) == 10
    assert {(s["SpanName"], s["SpanAttributes"]["db.system"]) for s in spans} == {("query", "cassandra")}
    assert sorted(s["StatusMessage"] for s in spans if s["StatusCode"] == "STATUS_CODE_ERROR") == ["2200"] * 5
    assert not any("secret" in s["SpanAttributes"]["db.statement"] for s in spans)
    assert_node_agent_families(t, "cassandra", "queries")


@settings(max_examples=300, deadline=None)
@given(RANDOM_CALLS)
def test_any_calls_in_any_order_never_raise(calls: list[tuple[bool, bytes, int]]) -> None:
    feed_random(cql.Cassandra(Settings()), calls, ("ok", "failed"))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 5, "5_lz4"]), st.integers(0, 35), st.integers(0, 300), st.integers(0, 300),
       st.integers(0, 255))
def test_real_calls_cut_or_corrupted_anywhere_never_raise(version: int | str, which: int, cut: int, at: int,
                                                          byte: int) -> None:
    calls = capture(version)
    for spoilt in spoiled(calls, which, cut, at, byte, lambda c: c[2], lambda c, b: (c[0], c[1], b)):
        replay(spoilt)
