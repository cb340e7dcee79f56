"""The FoundationDB plug-in (agent/l7/foundationdb.py) on wire bytes of the FoundationDB tests'
client and server stand-in (tests/system/workloads/fdb_client.py, fdb_responder.py: the flow
transport written from FoundationDB's sources; no real client or server can run here), captured
through a proxy, one line per recv() with its direction (tests/unit/data/foundationdb.jsonl: both
ConnectPackets, GetValue, GetReadVersion and Commit requests, transaction_too_old and
not_committed errors, five requests in flight together answered out of order); built packets
for the rest (TLS connections without checksums, connections seen from their middle, unknown
types); random and truncated calls under hypothesis; the plug-in through the tracer with packed
stream events."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract
from agent.l7 import foundationdb as f
from agent.l7.contract import F_INBOUND, F_OUTBOUND, F_WRITE, Event, pack
from agent.l7.protocol import Request, Settings
from agent.l7.tracer import L7Tracer
from tests.unit.l7_helpers import CID, Connections, Containers, Rows, value
from tests.unit.nodeagent_families import L7_STATUS

DATA = Path(__file__).parent / "data"
C = (1, 2, 3)


def capture() -> list[tuple[bool, bytes]]:
    lines = (DATA / "foundationdb.jsonl").read_text().splitlines()
    return [(r["client"], bytes.fromhex(r["hex"])) for r in map(json.loads, lines)]


def replay(calls: list[tuple[bool, bytes]], plugin: f.FoundationDB | None = None, keep: int = 1024) -> list[Request]:
    k = plugin or f.FoundationDB(Settings())
    out: list[Request] = []
    for ts, (client, data) in enumerate(calls):
        out += k.feed(C, client, ts * 1000, data[:keep], len(data))
    return out


def test_the_client_s_requests_each_counted_once_with_their_status() -> None:
    got = [(r.method, r.status, r.error) for r in replay(capture())]
    assert got == [("GetValueRequest", "ok", "")] * 3 + [("GetValueRequest", "failed", "1007")] * 2 + [
        ("GetReadVersionRequest", "ok", "")] * 2 + [("CommitTransactionRequest", "ok", "")] * 2 + [
        ("CommitTransactionRequest", "failed", "1020")] + [("GetValueRequest", "ok", "")] * 5
    assert set(r[1] for r in got) <= set(L7_STATUS["foundationdb"])


def test_requests_in_flight_together_pair_by_their_reply_token() -> None:
    got = replay(capture())[-5:]
    # replayed at 1 us a line: slow/0..2 written in line 21, slow/3 and 4 in line 22 (five requests
    # in two reads of the proxy); the server answered slow/4 (line 23) first, then the rest (line 24)
    assert [(r.start_ns, round(r.duration * 1e6)) for r in got] == [
        (22_000, 1), (22_000, 2), (21_000, 3), (22_000, 2), (22_000, 2)]
    assert sum(1 for r in got if r.start_ns == 21_000) == 1


def test_the_capture_is_what_the_transport_writes() -> None:
    calls = capture()
    assert f.connect_length(calls[0][1]) == 44 and len(calls[0][1]) > 44  # ConnectPacket + the first request
    assert f.connect_length(calls[1][1]) == 44  # the server's, on its own
    assert f.packet_layout(calls[2][1][:36]) is True  # checksums: not TLS


def test_a_reply_pairs_only_with_the_request_carrying_its_token_and_once() -> None:
    k = f.FoundationDB(Settings())
    q1, q2 = f.request(f.GET_VALUE, f.T1), f.request(f.COMMIT, f.T2)
    k.feed(C, True, 10, q1 + q2, len(q1 + q2))
    assert k.feed(C, False, 20, f.reply(b"\x09" * 16, f.VOID), 100) == []  # nobody's token
    [r2] = k.feed(C, False, 30, f.reply(f.T2, f.VOID, error=1020), 100)
    [r1] = k.feed(C, False, 40, f.reply(f.T1, f.GET_VALUE_REPLY), 100)
    assert (r2.method, r2.status, r2.error, r2.code, r2.duration) == ("CommitTransactionRequest", "failed", "1020",
                                                                       1020, 20e-9)
    assert (r1.method, r1.status, r1.duration) == ("GetValueRequest", "ok", 30e-9)
    assert k.feed(C, False, 50, f.reply(f.T1, f.GET_VALUE_REPLY), 100) == []  # answered already


def test_tls_connections_have_no_checksum_and_a_connection_seen_from_its_middle_is_read() -> None:
    k = f.FoundationDB(Settings())
    q = f.request(f.GET_READ_VERSION, f.T1, checksum=False)
    k.feed(C, True, 1, q, len(q))
    a = f.reply(f.T1, f.GET_READ_VERSION_REPLY, checksum=False)
    [r] = k.feed(C, False, 2, a, len(a))
    assert (r.method, r.status) == ("GetReadVersionRequest", "ok")


def test_unknown_types_and_replies_that_are_no_error_or_are_not_counted() -> None:
    k = f.FoundationDB(Settings())
    q = f.request(1234567, f.T1)  # not a request the node agent knows
    k.feed(C, True, 1, q, len(q))
    assert k.feed(C, False, 2, f.reply(f.T1, f.VOID), 100) == []
    q = f.request(f.GET_VALUE, f.T2)
    k.feed(C, True, 3, q, len(q))
    not_error_or = f.packet(f.T2, f.message(f.GET_VALUE_REPLY, [[("u64", 1)]]))
    assert k.feed(C, False, 4, not_error_or, len(not_error_or)) == []
    [r] = k.feed(C, False, 5, f.reply(f.T2, f.GET_VALUE_REPLY), 100)
    assert r.status == "ok"


def test_an_error_or_whose_union_cannot_be_read_is_ok_as_the_node_agent_counts_it() -> None:
    good = f.reply(f.T1, f.VOID, error=2000)[28:]
    assert f.reply_error(good) == 2000
    assert f.reply_error(f.reply(f.T1, f.VOID)[28:]) is None
    assert f.reply_error(good[:20]) is None  # cut
    assert f.reply_error(struct.pack("<II", 9999, f.ERROR_OR << 24)) is None  # the root past the end


def test_a_large_request_split_over_calls_and_past_the_captured_bytes() -> None:
    k = f.FoundationDB(Settings())
    q = f.packet(b"\x01" * 16, f.request(f.COMMIT, f.T1)[28:] + bytes(6000))  # a 6 KB commit
    k.feed(C, True, 1, q[:1024], 3000)  # 1024 bytes of a 3000-byte write captured
    k.feed(C, True, 2, q[3000:4024], len(q) - 3000)
    q2 = f.request(f.GET_VALUE, f.T2)
    k.feed(C, True, 3, q2, len(q2))
    both = f.reply(f.T2, f.GET_VALUE_REPLY) + f.reply(f.T1, f.VOID)
    got = k.feed(C, False, 4, both[:10], 10)
    got += k.feed(C, False, 5, both[10:], len(both) - 10)
    assert [(r.method, r.start_ns) for r in got] == [("GetValueRequest", 3), ("CommitTransactionRequest", 1)]


def test_connections_and_waiting_requests_are_bounded() -> None:
    k = f.FoundationDB(Settings())
    tokens = [hashlib.md5(bytes([i])).digest() for i in range(f.MAX_PENDING + 5)]  # random, as real ones
    for i, t in enumerate(tokens):
        q = f.request(f.GET_VALUE, t)
        k.feed(C, True, i, q, len(q))
    assert k.feed(C, False, 1, f.reply(tokens[0], f.VOID), 100) == []  # the oldest went first
    assert len(k.feed(C, False, 1, f.reply(tokens[-1], f.VOID), 100)) == 1
    for i in range(f.MAX_CONNECTIONS + 5):
        k.feed((9, i, 0), True, 1, b"", 0)
    assert len(k._conns) == f.MAX_CONNECTIONS


def ev(written: bool, data: bytes, ts: int, *, inbound: bool = False) -> bytes:
    flags = (F_INBOUND if inbound else F_OUTBOUND) | (F_WRITE if written else 0)
    return pack(Event(ts, 0, 55, 200 if inbound else 100, 7, contract.FOUNDATIONDB, flags, data[512:1024],
                      data[:512], len(data)))


def test_through_the_tracer_counts_both_sides_and_makes_no_span() -> None:
    conns, rows = Connections(), Rows()
    t = L7Tracer(Containers(), conns, rows, hostname="h", host_id="m")
    conns.add(100, 7, 55, "10.0.0.9", 4500, actual="10.0.0.9:4500")
    for i, (client, data) in enumerate(capture()):
        t.handle_event(ev(client, data, (i + 1) * 1_000_000))
        t.handle_event(ev(not client, data, (i + 1) * 1_000_000, inbound=True))
    lbl = {"container_id": CID, "destination": "10.0.0.9:4500"}
    assert value(t, "container_foundationdb_requests_total", status="ok", **lbl) == 12
    assert value(t, "container_foundationdb_requests_total", status="failed", **lbl) == 3
    assert value(t, "container_foundationdb_requests_duration_seconds_total_count", **lbl) == 15
    assert value(t, "container_foundationdb_inbound_requests_total", status="ok") == 12
    assert value(t, "container_foundationdb_inbound_requests_total", status="failed") == 3
    assert rows.rows == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200), st.integers(0, 3000)), max_size=10))
def test_any_calls_in_any_order_never_raise(calls: list[tuple[bool, bytes, int]]) -> None:
    k = f.FoundationDB(Settings())
    for client, data, size in calls:
        for r in k.feed(C, client, 1, data, size):
            assert r.status in ("ok", "failed")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_reply_message_never_raises(message: bytes) -> None:
    code = f.reply_error(message)
    assert code is None or 0 <= code < 65536


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 24), st.integers(0, 300), st.integers(0, 300), st.integers(0, 255), st.integers(1, 1024))
def test_real_calls_cut_or_corrupted_anywhere_never_raise(which: int, cut: int, at: int, byte: int,
                                                          keep: int) -> None:
    calls = capture()
    client, data = calls[which]
    bad = data[:at] + bytes([byte]) + data[at + 1:] if at < len(data) else data
    replay(calls[:which] + [(client, data[:cut])] + calls[which + 1:])
    replay(calls[:which] + [(client, bad)] + calls[which + 1:])
    replay(calls, keep=keep)
