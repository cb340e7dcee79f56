"""RabbitMQ (AMQP 0-9-1, the specification's "General Frame Format"): frames of a type (1
byte), a channel (2), a payload size (4, big-endian), the payload and the frame end 0xCE; a
method frame's payload starts with its class and method ids. Basic.Publish (60, 40) carries a
client's message to the broker, Basic.Deliver (60, 60) one to a consumer. One-way messages:
nothing answers them, so nothing is paired and there is no duration.

Counted as the node agent counts them: a Publish a client writes is method "produce", a
Deliver it reads "consume", status "ok"; the client's view only (no inbound family) and no
spans. The kernel (bpf/include/l7/rabbitmq.h) sends every call whose first frame is a Publish,
a Deliver or a Consume-Ok; each Publish or Deliver frame whose ids are in the call's captured
bytes is one (clients write a message's method, header and body frames at once, and read
several deliveries at once)."""

from __future__ import annotations

import struct

from agent.l7 import contract
from agent.l7 import protocol as p

PRODUCE, CONSUME = "produce", "consume"

FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
METHOD, CONTENT_HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
BASIC, CONSUME_OK, PUBLISH, DELIVER = 60, 21, 40, 60


def frames(data: bytes) -> list[tuple[int, int]]:
    """(class id, method id) of each method frame in one call's bytes, in order, up to the first
    thing that is not AMQP (a frame of no known type, or a frame end that is not 0xCE)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos + FRAME_HEADER.size <= len(data):
        kind, _channel, size = FRAME_HEADER.unpack_from(data, pos)
        if kind not in (METHOD, CONTENT_HEADER, BODY, HEARTBEAT):
            break
        start = pos + FRAME_HEADER.size
        end = start + size
        if end < len(data) and data[end] != FRAME_END:
            break
        if kind == METHOD:
            if size < 4 or start + 4 > len(data):
                break
            out.append((int.from_bytes(data[start:start + 2], "big"), int.from_bytes(data[start + 2:start + 4], "big")))
        pos = end + 1
    return out


class Rabbitmq(p.Protocol):
    id = contract.RABBITMQ
    name = "rabbitmq"
    stem = p.Stem("rabbitmq", "messages", histogram=False, method=True, inbound=False)
    streaming = True  # one-way messages: every call that carries one comes to feed
    # captured from librabbitmq (amqp-publish, amqp-consume) and rabbitmq-server 3.10
    kernel_messages = (
        bytes.fromhex("0100010000000b003c002800000002747100ce"),  # Basic.Publish to queue "tq"
        bytes.fromhex("0100010000000b003c002800000002747100ce0200010000000f003c00000000000000000002100001ce"
                      "03000100000002610ace"),  # with its header and body frames
        bytes.fromhex("01000100000031003c003c1f616d712e637461672d6975567a4e2d4b776a484667385a7330445a666c7651"
                      "00000000000000020000027471ce0200010000000f003c00000000000000000002100001ce"
                      "03000100000002610ace"),  # Basic.Deliver, header, body
        bytes.fromhex("01000100000024003c00151f616d712e637461672d6975567a4e2d4b776a484667385a7330445a666c7651ce"
                      "01000100000031003c003c1f616d712e637461672d6975567a4e2d4b776a484667385a7330445a666c7651"
                      "00000000000000010000027471ce"),  # Consume-Ok, then the first delivery
    )
    kernel_non_requests = (
        bytes.fromhex("414d515000000901"),  # the protocol header
        bytes.fromhex("0100010000000d003c0050000000000000000100ce"),  # Basic.Ack
        bytes.fromhex("0200010000000f003c00000000000000000002100001ce"),  # a content header
        bytes.fromhex("03000100000002610ace"),  # a body
        bytes.fromhex("08000000000000ce"),  # a heartbeat
        bytes.fromhex("0100010000000b003c002800000002747100cf"),  # no frame end
        bytes.fromhex("0100010000000b003c0028000000027471"),  # the frame is cut off
        bytes.fromhex("01000100000024003c0015"),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUB orders.new 5\r\nhello\r\n",
    )

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        return []  # one-way messages come to feed

    def feed(self, conn: p.ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[p.Request]:
        want, method = ((BASIC, PUBLISH), PRODUCE) if client else ((BASIC, DELIVER), CONSUME)
        try:
            n = sum(1 for f in frames(data) if f == want)
        except Exception:  # noqa: BLE001 - garbage in: nothing out
            return []
        return [p.Request(self.id, "ok", 0.0, method=method, start_ns=ts_ns) for _ in range(n)]
