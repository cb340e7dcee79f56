"""The Kafka plug-in (agent/l7/kafka.py): its parser on wire bytes kafka-python 3.0.12 wrote and
the test's stand-in broker (tests/system/workloads/kafka_responder.py) answered, captured through
a proxy (ApiVersions v4, Metadata v9, Produce v9: flexible versions); older, non-flexible
versions and Fetch built from the specification; random and truncated frames under hypothesis;
and the plug-in through the tracer with packed stream events (requests in flight together,
answered out of order, split and joined across calls)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract, kafka
from agent.l7.contract import F_INBOUND, F_OUTBOUND, F_WRITE, Event, pack
from agent.l7.protocol import Settings
from agent.l7.tracer import L7Tracer
from tests.unit.l7_helpers import CID, Connections, Containers, Rows, value

API_VERSIONS = bytes.fromhex(
    "00000037001200040000000100176b61666b612d707974686f6e2d70726f64756365722d31000d6b61666b612d707974"
    "686f6e07332e302e313200"
)
API_VERSIONS_RESP = bytes.fromhex(
    "00000021000000010000040000000900090000030009000900001200000004000000000000"
)
METADATA = bytes.fromhex(
    "00000027000300090000000200176b61666b612d707974686f6e2d70726f64756365722d31000101000000"
)
METADATA_RESP = bytes.fromhex(
    "0000003300000002000000000002000000000a3132372e302e302e310000ba9700000b63612d636c7573746572000000"
    "00018000000000"
)
METADATA_TOPIC = bytes.fromhex(
    "00000031000300090000000200176b61666b612d707974686f6e2d70726f64756365722d310002096f6b2d746f706963"
    "0001000000"
)
METADATA_TOPIC_RESP = bytes.fromhex(
    "0000005f00000002000000000002000000000a3132372e302e302e310000ba9700000b63612d636c7573746572000000"
    "00020000096f6b2d746f7069630002000000000000000000000000000002000000000200000000010080000000008000"
    "000000"
)
PRODUCE = bytes.fromhex(
    "00000088000000090000000300176b61666b612d707974686f6e2d70726f64756365722d310000000100004e2002096f"
    "6b2d746f70696302000000004d0000000000000000000000400000000002576a993f000000000000000001a2408b2f52"
    "000001a2408b2f52ffffffffffffffffffffffffffff000000011c00000001107365637265742d3000000000"
)
PRODUCE_RESP = bytes.fromhex(
    "00000037000000030002096f6b2d746f706963020000000000000000000000000000ffffffffffffffff000000000000"
    "0000010000000000000000"
)
PRODUCE_BAD = bytes.fromhex(
    "00000089000000090000000500176b61666b612d707974686f6e2d70726f64756365722d310000000100004e20020a62"
    "61642d746f70696302000000004d000000000000000000000040000000000228e1e6b4000000000000000001a2408b30"
    "42000001a2408b3042ffffffffffffffffffffffffffff000000011c00000001107365637265742d3000000000"
)
PRODUCE_BAD_RESP = bytes.fromhex(
    "000000410000000500020a6261642d746f7069630200000000000affffffffffffffffffffffffffffffff0000000000"
    "000000010a746f6f206c6172676500000000000000"
)
PIPE1 = bytes.fromhex(
    "00000088000000090000000600176b61666b612d707974686f6e2d70726f64756365722d310000000100004e2002096f"
    "6b2d746f70696302000000004d00000000000000000000004000000000026edc9160000000000000000001a2408b311b"
    "000001a2408b311bffffffffffffffffffffffffffff000000011c00000001107365637265742d3000000000"
)
PIPE2 = bytes.fromhex(
    "00000088000000090000000700176b61666b612d707974686f6e2d70726f64756365722d310000000100004e2002096f"
    "6b2d746f70696302000000004d00000000000000000000004000000000020f17b597000000000000000001a2408b313a"
    "000001a2408b313affffffffffffffffffffffffffff000000011c00000001107365637265742d3100000000"
)
PIPE3 = bytes.fromhex(
    "00000088000000090000000800176b61666b612d707974686f6e2d70726f64756365722d310000000100004e2002096f"
    "6b2d746f70696302000000004d00000000000000000000004000000000022069d5cf000000000000000001a2408b3158"
    "000001a2408b3158ffffffffffffffffffffffffffff000000011c00000001107365637265742d3200000000"
)
PIPE1_RESP = bytes.fromhex(
    "00000037000000060002096f6b2d746f706963020000000000000000000000000000ffffffffffffffff000000000000"
    "0000010000000000000000"
)
PIPE2_RESP = bytes.fromhex(
    "00000037000000070002096f6b2d746f706963020000000000000000000000000000ffffffffffffffff000000000000"
    "0000010000000000000000"
)
PIPE3_RESP = bytes.fromhex(
    "00000037000000080002096f6b2d746f706963020000000000000000000000000000ffffffffffffffff000000000000"
    "0000010000000000000000"
)

PAIRS = [(API_VERSIONS, API_VERSIONS_RESP), (METADATA, METADATA_RESP), (METADATA_TOPIC, METADATA_TOPIC_RESP),
         (PRODUCE, PRODUCE_RESP), (PRODUCE_BAD, PRODUCE_BAD_RESP), (PIPE1, PIPE1_RESP)]
K = kafka.Kafka(Settings())
C = (1, 2, 3)


def parse(req: bytes, resp: bytes) -> list[tuple[str, str, str]]:
    return [(r.method, r.status, r.error) for r in K.parse(C, req, resp, 0.001)]


def test_kafka_python_requests_and_their_status() -> None:
    assert [parse(q, a) for q, a in PAIRS] == [
        [("ApiVersions", "ok", "")], [("Metadata", "ok", "")], [("Metadata", "ok", "")], [("Produce", "ok", "")],
        [("Produce", "failed", "10")], [("Produce", "ok", "")]]
    h = kafka.parse_requests(PRODUCE)[0]
    assert (h.key, h.version, h.correlation_id, h.client_id) == (0, 9, 3, "kafka-python-producer-1")


def test_pipelined_requests_pair_by_correlation_id() -> None:
    # written at once (or read at once by a server): each counted, each with its own response
    assert parse(PIPE1 + PIPE2 + PIPE3, PIPE1_RESP + PIPE2_RESP + PIPE3_RESP) == [("Produce", "ok", "")] * 3
    assert parse(PIPE1 + PRODUCE_BAD, PIPE1_RESP) == [("Produce", "ok", ""), ("Produce", "unknown", "")]
    # a response that answers another request leaves the status unknown, the request counted once
    assert parse(PIPE3, PIPE1_RESP) == [("Produce", "unknown", "")]
    assert parse(PIPE1, b"") == [("Produce", "unknown", "")]


def fetch_response(version: int, top: int, partition: int) -> bytes:
    """A non-flexible Fetch response (v7-v11) with one topic and one partition."""
    body = struct.pack(">ihi", 0, top, 1)  # throttle, error code, session id
    body += struct.pack(">i", 1) + struct.pack(">h", 1) + b"t" + struct.pack(">i", 1)
    body += struct.pack(">ihqqq", 0, partition, 10, 10, 0) + struct.pack(">i", 0)  # no aborted transactions
    if version >= 11:
        body += struct.pack(">i", -1)
    body += struct.pack(">i", 0)  # records
    msg = struct.pack(">i", 5) + body
    return struct.pack(">i", len(msg)) + msg


def test_fetch_and_top_level_error_codes_of_older_versions() -> None:
    req = kafka.request(kafka.FETCH, 11, 5, b"\0" * 20)
    assert parse(req, fetch_response(11, 0, 0)) == [("Fetch", "ok", "")]
    assert parse(req, fetch_response(11, 0, 1)) == [("Fetch", "failed", "1")]
    assert parse(req, fetch_response(11, 15, 0)) == [("Fetch", "failed", "15")]
    hb = kafka.request(12, 2, 6, b"g")  # Heartbeat v2: throttle time, then the error code
    assert parse(hb, struct.pack(">iiih", 10, 6, 0, 27)) == [("Heartbeat", "failed", "27")]
    assert parse(hb, struct.pack(">iiih", 10, 6, 0, 0)) == [("Heartbeat", "ok", "")]
    legacy = kafka.request(kafka.API_VERSIONS, 0, 7, client="c")
    assert parse(legacy, struct.pack(">iihi", 10, 7, 35, 0)) == [("ApiVersions", "failed", "35")]
    offsets = kafka.request(2, 1, 8)  # ListOffsets: not read here
    assert parse(offsets, struct.pack(">iii", 8, 8, 0)) == [("ListOffsets", "unknown", "")]


def test_responses_and_what_the_kernel_does_not_take_for_requests_are_none() -> None:
    for data in (*[a for _, a in PAIRS], *K.kernel_non_requests[:4], b"", b"\0\0\0\x01"):
        assert parse(data, b"") == [], data


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_never_raise(req: bytes, resp: bytes) -> None:
    K.parse(C, req, resp, 0.001)
    K.parse(C, PRODUCE, PRODUCE_RESP[:8] + resp, 0.001)
    K.parse(C, METADATA, METADATA_RESP[:8] + resp, 0.001)
    K.parse(C, kafka.request(kafka.FETCH, 12, 3), PRODUCE_RESP[:8] + resp, 0.001)
    K.parse(C, kafka.request(kafka.FETCH, 4, 3), PRODUCE_RESP[:8] + resp, 0.001)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(PAIRS), st.integers(0, 200), st.integers(0, 200), st.integers(0, 200), st.integers(0, 255))
def test_truncated_and_corrupted_frames_never_raise(pair: tuple[bytes, bytes], cut: int, rcut: int, at: int,
                                                    byte: int) -> None:
    req, resp = pair
    K.parse(C, req[:cut], resp[:rcut], 0.001)
    if at < len(req):
        K.parse(C, req[:at] + bytes([byte]) + req[at + 1:], resp, 0.001)
    if at < len(resp):
        K.parse(C, req, resp[:at] + bytes([byte]) + resp[at + 1:], 0.001)


def ev(written: bool, data: bytes, ts: int, *, inbound: bool = False, size: int = -1) -> bytes:
    """A stream event (contract.h): one call's first bytes, resp[] first."""
    flags = (F_INBOUND if inbound else F_OUTBOUND) | (F_WRITE if written else 0)
    return pack(Event(ts, 0, 55, 200 if inbound else 100, 7, contract.KAFKA, flags, data[512:], data[:512], size))


def test_through_the_tracer_pipelined_requests_pair_by_correlation_id_on_both_sides() -> None:
    conns, rows = Connections(), Rows()
    t = L7Tracer(Containers(), conns, rows, hostname="h", host_id="m")
    conns.add(100, 7, 55, "10.0.0.9", 9092, actual="10.0.0.9:9092")
    ms = 1_000_000
    # the client: set-up requests one at a time, then three Produce requests in flight together,
    # answered in another order, two responses in one read and one split across two reads
    calls = [(True, API_VERSIONS, 1), (False, API_VERSIONS_RESP, 2), (True, METADATA_TOPIC, 3),
             (False, METADATA_TOPIC_RESP, 4), (True, PRODUCE_BAD, 5), (False, PRODUCE_BAD_RESP, 7),
             (True, PIPE1, 10), (True, PIPE2, 11), (True, PIPE3, 12), (False, PIPE2_RESP + PIPE1_RESP, 20),
             (False, PIPE3_RESP[:6], 30), (False, PIPE3_RESP[6:], 31)]
    for written, data, at in calls:
        t.handle_event(ev(written, data, at * ms))
    lbl = {"container_id": CID, "destination": "10.0.0.9:9092"}
    assert value(t, "container_kafka_requests_total", status="ok", **lbl) == 5
    assert value(t, "container_kafka_requests_total", status="failed", **lbl) == 1
    assert value(t, "container_kafka_requests_duration_seconds_total_count", **lbl) == 6
    # 1 + 1 + 2 ms, then 10, 9 and 18 ms: each request timed to its own response
    assert abs(value(t, "container_kafka_requests_duration_seconds_total_sum", **lbl) - 0.041) < 1e-9
    # the broker: two requests in one read, their responses written one by one
    for written, data, at in [(False, PIPE1 + PIPE2, 10), (True, PIPE1_RESP, 12), (True, PIPE2_RESP, 15)]:
        t.handle_event(ev(written, data, at * ms, inbound=True))
    assert value(t, "container_kafka_inbound_requests_total", status="ok") == 2
    assert rows.rows == []


def test_a_request_without_a_response_waits_and_responses_without_a_request_count_nothing() -> None:
    k = kafka.Kafka(Settings())
    assert k.feed(C, False, 1, PIPE1_RESP, len(PIPE1_RESP)) == []  # nothing asked it
    assert k.feed(C, True, 2, PIPE1, len(PIPE1)) == []
    assert k.feed(C, False, 3, PIPE2_RESP, len(PIPE2_RESP)) == []  # answers another
    got = k.feed(C, False, 4, PIPE1_RESP, len(PIPE1_RESP))
    assert [(r.method, r.status, r.start_ns) for r in got] == [("Produce", "ok", 2)]
    assert k.feed(C, False, 5, PIPE1_RESP, len(PIPE1_RESP)) == []  # counted once


def test_a_large_response_past_the_captured_bytes_keeps_the_frames_after_it() -> None:
    k = kafka.Kafka(Settings())
    fetch = kafka.request(kafka.FETCH, 11, 5, b"\0" * 20)
    resp = fetch_response(11, 0, 0)
    big = (len(resp) - 4 + 5000).to_bytes(4, "big") + resp[4:] + b"\0" * 5000  # records 5000 bytes longer
    k.feed(C, True, 1, fetch + PIPE1, len(fetch) + len(PIPE1))
    # the kernel captured 1024 bytes of a 4096-byte read, then of the read of the rest
    got = k.feed(C, False, 2, big[:1024], 4096)
    got += k.feed(C, False, 3, big[4096:4096 + 1024], len(big) - 4096)
    got += k.feed(C, False, 4, PIPE1_RESP, len(PIPE1_RESP))
    assert [(r.method, r.status) for r in got] == [("Fetch", "ok"), ("Produce", "ok")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200), st.integers(0, 3000)), max_size=10))
def test_any_calls_in_any_order_never_raise(calls: list[tuple[bool, bytes, int]]) -> None:
    k = kafka.Kafka(Settings())
    for client, data, size in calls:
        for r in k.feed(C, client, 1, data, size):
            assert r.status in ("ok", "failed", "unknown")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 150), st.integers(0, 5))
def test_real_calls_cut_anywhere_never_raise(cut: int, which: int) -> None:
    k = kafka.Kafka(Settings())
    stream = [API_VERSIONS, API_VERSIONS_RESP, PIPE1 + PIPE2, PIPE2_RESP, PIPE1_RESP, PRODUCE_BAD]
    for i, data in enumerate(stream):
        k.feed(C, i % 2 == 0 or i == 5, i, data[:cut] if i == which else data, len(data))
