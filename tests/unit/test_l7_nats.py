"""NATS: the bytes nats-server 2.9 and a client exchanged (captured on loopback), counted as the
kernel hands them over (one call's first bytes and its full size, in the direction it went):
several messages in one call, headers (HPUB/HMSG), reply subjects, lines around the messages,
calls cut short by the capture limit, garbage; and through the tracer from packed events."""

from __future__ import annotations

from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract
from agent.l7.contract import F_INBOUND, F_OUTBOUND, F_WRITE
from agent.l7.nats import Nats, messages
from agent.l7.protocol import Settings
from tests.unit.l7_helpers import (
    CID,
    one_way_event,
    samples,
    tracer,
    value,
)

K = (1, 5, 9)
# a client's writes
PUB = b"PUB orders.new 5\r\nhello\r\n"
HPUB = b"HPUB orders.new 18 23\r\nNATS/1.0\r\nk: v\r\n\r\nhello\r\n"
PUB2 = b"PUB orders.a reply.1 2\r\nhi\r\nPUB orders.b 0\r\n\r\n"
# what the subscriber read: the four messages above in one call
DELIVERED = (b"MSG orders.new 1 5\r\nhello\r\nHMSG orders.new 1 18 23\r\nNATS/1.0\r\nk: v\r\n\r\nhello\r\n"
             b"MSG orders.a 1 reply.1 2\r\nhi\r\nMSG orders.b 1 0\r\n\r\n")


def methods(n: Nats, client: bool, data: bytes, size: int = 0) -> list[str]:
    return [r.method for r in n.feed(K, client, 1000, data, max(size, len(data)))]


def test_published_and_delivered_messages_are_counted_each() -> None:
    n = Nats(Settings())
    assert methods(n, True, PUB) == ["produce"]
    assert methods(n, True, HPUB + PUB2 + b"PING\r\n") == ["produce"] * 3
    assert methods(n, False, DELIVERED) == ["consume"] * 4
    assert messages(DELIVERED) == ["MSG", "HMSG", "MSG", "MSG"]
    r = n.feed(K, True, 1234, PUB, len(PUB))[0]
    assert (r.protocol, r.status, r.duration, r.start_ns) == (contract.NATS, "ok", 0.0, 1234)


def test_a_message_counts_only_in_the_direction_it_travels() -> None:
    n = Nats(Settings())
    # the server reads a publish (client -> server) and writes a delivery: the same directions
    assert methods(n, False, PUB) == []
    assert methods(n, True, DELIVERED) == []


def test_control_lines_around_messages() -> None:
    n = Nats(Settings())
    assert methods(n, False, b"PONG\r\n" + DELIVERED + b"PING\r\n") == ["consume"] * 4
    assert methods(n, False, b"+OK\r\nMSG a 1 2\r\nhi\r\n") == ["consume"]
    assert methods(n, True, b"pub a 2\r\nhi\r\nsub b 1\r\nunsub 1\r\nhpub c 12 12\r\nNATS/1.0\r\n\r\n\r\n") == [
        "produce", "produce"]
    assert methods(n, False, b"-ERR 'Unknown Protocol Operation'\r\n") == []


def test_a_payload_holding_crlf_and_protocol_words_is_skipped_by_its_size() -> None:
    n = Nats(Settings())
    body = b"x\r\nMSG fake 1 1\r\ny\r\n"
    assert methods(n, False, b"MSG a 1 %d\r\n%s\r\nMSG b 1 0\r\n\r\n" % (len(body), body)) == ["consume"] * 2


def test_a_call_cut_off_by_the_capture_counts_the_header_lines_it_holds() -> None:
    n = Nats(Settings())
    big = b"MSG a.b 1 2000\r\n" + b"x" * 2000 + b"\r\nMSG a.b 1 2\r\nhi\r\n"
    assert methods(n, False, big[:1024], len(big)) == ["consume"]
    burst = b"MSG a.b 1 2\r\nhi\r\n" * 100  # 17 bytes each: 60 whole ones in 1024, and one begun
    assert methods(n, False, burst[:1024], len(burst)) == ["consume"] * 61
    assert methods(n, False, burst[:1020], 1020) == ["consume"] * 60  # the call ended there
    assert methods(n, True, PUB[:10], 100) == ["produce"]
    assert methods(n, True, b"PUB", 100) == []


def test_garbage_stops_the_count_where_it_starts() -> None:
    n = Nats(Settings())
    assert methods(n, False, b"MSG a 1 5\r\nhelloXXMSG b 1 0\r\n\r\n") == []  # the payload's size lies
    assert methods(n, False, b"MSG a 1 2\r\nhi\r\nGARBAGE\r\nMSG b 1 0\r\n\r\n") == ["consume"]
    assert methods(n, False, b"MSG a 1 x\r\nhi\r\n") == []
    assert methods(n, False, b"MSG a 2\r\nhi\r\n") == []  # no sid
    assert methods(n, False, b"HMSG a 1 9 5\r\nhello\r\n") == []  # headers longer than the message
    assert methods(n, False, b"MSG a 1 99999999999\r\n") == []
    assert methods(n, False, b" MSG a 1 2\r\nhi\r\n") == []
    assert methods(n, False, b"") == []


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.binary(max_size=400), st.integers(0, 5000))
def test_random_bytes_never_raise(client: bool, data: bytes, size: int) -> None:
    for r in Nats(Settings()).feed(K, client, 1, data, size):
        assert r.method in ("produce", "consume") and r.status == "ok"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(DELIVERED)), st.integers(0, len(HPUB + PUB2)))
def test_truncated_real_calls_never_raise_and_never_count_more(cut: int, cut2: int) -> None:
    n = Nats(Settings())
    assert len(methods(n, False, DELIVERED[:cut], len(DELIVERED))) <= 4
    assert len(methods(n, True, (HPUB + PUB2)[:cut2], len(HPUB + PUB2))) <= 3
    assert len(methods(n, False, DELIVERED[cut:])) <= 4


# ------------------------------------------------------------------- through the tracer --

message_event = partial(one_way_event, contract.NATS)


def test_the_tracer_counts_a_clients_messages_by_destination() -> None:
    t, conns, rows = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 4222, actual="10.0.0.10:4222")  # the publisher's connection
    conns.add(100, 8, 55, "10.0.0.11", 4222, actual="10.0.0.11:4222")  # the subscriber's
    for _ in range(3):
        t.handle_event(message_event(PUB, F_OUTBOUND | F_WRITE, fd=7))
    t.handle_event(message_event(HPUB + PUB2, F_OUTBOUND | F_WRITE, fd=7))
    t.handle_event(message_event(DELIVERED * 20, F_OUTBOUND, fd=8))  # 2,540 bytes, 1,024 of them kept
    pub = {"container_id": CID, "destination": "10.0.0.9:4222", "actual_destination": "10.0.0.10:4222"}
    sub = {"container_id": CID, "destination": "10.0.0.11:4222", "actual_destination": "10.0.0.11:4222"}
    assert value(t, "container_nats_messages_total", status="ok", **pub) == 6
    want = 4 * 8 + 1  # DELIVERED is 127 bytes: 8 whole, and the header of the 9th begun
    assert value(t, "container_nats_messages_total", status="ok", **sub) == want
    assert value(t, "coroot_agent_l7_requests_total") == 6 + want
    assert value(t, "coroot_agent_l7_spans_total") == 0 and rows.rows == []  # no spans, as the node agent


def test_the_tracer_labels_each_message_with_its_method_and_drops_the_servers_side() -> None:
    t, conns, _ = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 4222, actual="10.0.0.9:4222")  # publishes and subscribes
    t.handle_event(message_event(PUB + HPUB, F_OUTBOUND | F_WRITE, fd=7))
    t.handle_event(message_event(DELIVERED, F_OUTBOUND, fd=7))
    t.handle_event(message_event(PUB, F_INBOUND, fd=3, pid=200))  # the server reads a publish
    t.handle_event(message_event(DELIVERED, F_INBOUND | F_WRITE, fd=4, pid=200))  # and delivers
    lbl = {"container_id": CID, "app_id": CID, "destination": "10.0.0.9:4222", "actual_destination": "10.0.0.9:4222"}
    nats = {k: v for k, v in samples(t).items() if "nats" in k[0]}
    assert nats == {  # one counter by method; no histogram, no inbound family
        ("container_nats_messages_total", tuple(sorted({**lbl, "status": "ok", "method": "produce"}.items()))): 2,
        ("container_nats_messages_total", tuple(sorted({**lbl, "status": "ok", "method": "consume"}.items()))): 4,
    }
    assert value(t, "coroot_agent_l7_requests_total") == 6
