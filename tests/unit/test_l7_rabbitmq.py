"""RabbitMQ (AMQP 0-9-1): frames librabbitmq 0.11 (amqp-publish, amqp-consume) and
rabbitmq-server 3.10 exchanged (captured on loopback), counted as the kernel hands them over (one
call's first bytes and its full size, in the direction it went): a message's frames written at
once, several deliveries in one read, the first delivery behind Consume-Ok, calls cut short by
the capture limit, garbage; and through the tracer from packed events."""

from __future__ import annotations

from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract
from agent.l7.contract import F_INBOUND, F_OUTBOUND, F_WRITE
from agent.l7.protocol import Settings
from agent.l7.rabbitmq import Rabbitmq, frames
from tests.unit.l7_helpers import (
    CID,
    one_way_event,
    samples,
    tracer,
    value,
)

K = (1, 5, 9)
TAG = bytes.fromhex("1f616d712e637461672d6975567a4e2d4b776a484667385a7330445a666c7651")  # the consumer tag
PUBLISH = bytes.fromhex("0100010000000b003c002800000002747100ce")  # Basic.Publish, routing key "tq"
HEADER = bytes.fromhex("0200010000000f003c00000000000000000002100001ce")  # body size 2, delivery mode 1
BODY = bytes.fromhex("03000100000002610ace")  # "a\n"
ACK = bytes.fromhex("0100010000000d003c0050000000000000000100ce")
CONSUME_OK = bytes.fromhex("01000100000024003c0015") + TAG + b"\xce"
CHANNEL_CLOSE = bytes.fromhex("0100010000000e0014002800c80332303000000000ce")
HEARTBEAT = bytes.fromhex("08000000000000ce")


def deliver(tag: int) -> bytes:
    """Basic.Deliver of delivery `tag` from queue "tq", with its header and body frames."""
    method = (bytes.fromhex("01000100000031003c003c") + TAG + tag.to_bytes(8, "big")
              + bytes.fromhex("0000027471ce"))
    return method + HEADER + BODY


MESSAGE = PUBLISH + HEADER + BODY


def methods(r: Rabbitmq, client: bool, data: bytes, size: int = 0) -> list[str]:
    return [q.method for q in r.feed(K, client, 1000, data, max(size, len(data)))]


def test_published_and_delivered_messages_are_counted_each() -> None:
    r = Rabbitmq(Settings())
    assert methods(r, True, PUBLISH) == ["produce"]  # librabbitmq: each frame its own send()
    assert methods(r, True, HEADER) == methods(r, True, BODY) == []
    assert methods(r, True, MESSAGE * 3 + CHANNEL_CLOSE) == ["produce"] * 3
    assert methods(r, False, deliver(1)) == ["consume"]
    assert methods(r, False, CONSUME_OK + deliver(1) + deliver(2)) == ["consume"] * 2
    assert methods(r, False, deliver(3) + HEARTBEAT + deliver(4)) == ["consume"] * 2
    q = r.feed(K, True, 1234, PUBLISH, len(PUBLISH))[0]
    assert (q.protocol, q.status, q.duration, q.start_ns) == (contract.RABBITMQ, "ok", 0.0, 1234)
    assert frames(MESSAGE + ACK) == [(60, 40), (60, 80)]


def test_a_message_counts_only_in_the_direction_it_travels() -> None:
    r = Rabbitmq(Settings())
    assert methods(r, False, MESSAGE) == []  # the broker reads a publish
    assert methods(r, True, deliver(1)) == []  # and writes a delivery
    assert methods(r, True, ACK) == []


def test_a_call_cut_off_by_the_capture_counts_the_frames_whose_ids_it_holds() -> None:
    r = Rabbitmq(Settings())
    burst = b"".join(deliver(i) for i in range(1, 21))  # 90 bytes each
    assert len(deliver(1)) == 90
    assert methods(r, False, burst[:1024], len(burst)) == ["consume"] * 12  # the 12th begins at 990
    assert methods(r, False, burst[:990 + 10], len(burst)) == ["consume"] * 11  # its ids are cut off
    big = PUBLISH + HEADER + b"\x03\x00\x01\x00\x01\x00\x00" + b"x" * 65536 + b"\xce" + MESSAGE
    assert methods(r, True, big[:1024], len(big)) == ["produce"]


def test_garbage_stops_the_count_where_it_starts() -> None:
    r = Rabbitmq(Settings())
    assert methods(r, True, PUBLISH[:-1] + b"\xcf" + MESSAGE) == []  # no frame end
    assert methods(r, True, MESSAGE + b"\x09garbage" + MESSAGE) == ["produce"]
    assert methods(r, True, bytes.fromhex("0100010000000200ce")) == []  # a method frame too short
    assert methods(r, True, b"AMQP\x00\x00\x09\x01") == []
    assert methods(r, False, b"") == []


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.binary(max_size=400), st.integers(0, 5000))
def test_random_bytes_never_raise(client: bool, data: bytes, size: int) -> None:
    for q in Rabbitmq(Settings()).feed(K, client, 1, data, size):
        assert q.method in ("produce", "consume") and q.status == "ok"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3 * 90 + len(CONSUME_OK)), st.integers(0, 3 * len(MESSAGE)))
def test_truncated_real_calls_never_raise_and_never_count_more(cut: int, cut2: int) -> None:
    r = Rabbitmq(Settings())
    read = CONSUME_OK + deliver(1) + deliver(2) + deliver(3)
    assert len(methods(r, False, read[:cut], len(read))) <= 3
    assert len(methods(r, False, read[cut:])) <= 3
    assert len(methods(r, True, (MESSAGE * 3)[:cut2], 3 * len(MESSAGE))) <= 3


# ------------------------------------------------------------------- through the tracer --

message_event = partial(one_way_event, contract.RABBITMQ)


def test_the_tracer_counts_a_clients_messages_by_destination() -> None:
    t, conns, rows = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 5672, actual="10.0.0.10:5672")  # the publisher's connection
    conns.add(100, 8, 55, "10.0.0.11", 5672, actual="10.0.0.11:5672")  # the consumer's
    for _ in range(4):
        t.handle_event(message_event(PUBLISH, F_OUTBOUND | F_WRITE, fd=7))
    t.handle_event(message_event(MESSAGE * 2, F_OUTBOUND | F_WRITE, fd=7))
    t.handle_event(message_event(CONSUME_OK + deliver(1), F_OUTBOUND, fd=8))
    t.handle_event(message_event(b"".join(deliver(i) for i in range(2, 22)), F_OUTBOUND, fd=8))
    pub = {"container_id": CID, "destination": "10.0.0.9:5672", "actual_destination": "10.0.0.10:5672"}
    sub = {"container_id": CID, "destination": "10.0.0.11:5672", "actual_destination": "10.0.0.11:5672"}
    assert value(t, "container_rabbitmq_messages_total", status="ok", **pub) == 6
    assert value(t, "container_rabbitmq_messages_total", status="ok", **sub) == 1 + 12
    assert value(t, "coroot_agent_l7_spans_total") == 0 and rows.rows == []  # no spans, as the node agent


def test_the_tracer_labels_each_message_with_its_method_and_drops_the_servers_side() -> None:
    t, conns, _ = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 5672, actual="10.0.0.9:5672")  # publishes and consumes
    t.handle_event(message_event(MESSAGE * 3, F_OUTBOUND | F_WRITE, fd=7))
    t.handle_event(message_event(CONSUME_OK + deliver(1) + deliver(2), F_OUTBOUND, fd=7))
    t.handle_event(message_event(MESSAGE, F_INBOUND, fd=3, pid=200))  # the broker reads a publish
    t.handle_event(message_event(deliver(3), F_INBOUND | F_WRITE, fd=4, pid=200))  # and delivers
    lbl = {"container_id": CID, "app_id": CID, "destination": "10.0.0.9:5672", "actual_destination": "10.0.0.9:5672"}
    rabbit = {k: v for k, v in samples(t).items() if "rabbitmq" in k[0]}
    assert rabbit == {  # one counter by method; no histogram, no inbound family
        ("container_rabbitmq_messages_total", tuple(sorted({**lbl, "status": "ok", "method": "produce"}.items()))): 3,
        ("container_rabbitmq_messages_total", tuple(sorted({**lbl, "status": "ok", "method": "consume"}.items()))): 2,
    }
    assert value(t, "coroot_agent_l7_requests_total") == 5
