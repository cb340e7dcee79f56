"""The L7 kernel/user contract, mirrored from bpf/include/l7/contract.h: protocol ids, event
flags, the event layout, the duration buckets, the kernel's counters. Nothing else in agent/
spells these numbers; tests/unit/test_l7_contract.py reads the C header and fails on drift.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# Protocol ids (event.protocol)
HTTP, POSTGRES, REDIS, DNS = 1, 2, 3, 4
HTTP2 = 7
NATS, RABBITMQ = 8, 9
ZOOKEEPER = 10
MYSQL = 5
MEMCACHED = 6
MONGO = 11
KAFKA = 12
CASSANDRA = 13
CLICKHOUSE = 14
DUBBO2 = 15
FOUNDATIONDB = 16

# Event flags (event.flags)
F_OUTBOUND, F_INBOUND, F_TLS, F_COUNTED = 1, 2, 4, 8
F_WRITE = 16  # a stream event: the process wrote these bytes (else it read them)

PAYLOAD_DEFAULT = 1024  # CA_L7_PAYLOAD unless the loader sets it (l7_payload_size)
RESP_MAX = 512  # CA_L7_RESP

# struct l7_event up to resp[]: start_ns, duration_ns, conn_start, tgid, fd, protocol, flags,
# req_len, req_size, resp_len, payload_max; then resp[RESP_MAX], then req_len request bytes.
EVENT_HEADER = struct.Struct("<QQQIIIIIIII")
EVENT_FIELDS = ("start_ns", "duration_ns", "conn_start", "tgid", "fd", "protocol", "flags",
                "req_len", "req_size", "resp_len", "payload_max")

# struct l7_http_key / struct l7_hist (map l7_http)
HTTP_KEY_FIELDS = ("tgid", "fd", "conn_start", "status", "outbound")
HTTP_STATUS = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")  # by the key's status index
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds; Coroot's L7 buckets

# map l7_stats, by index (L7_STAT_*)
KERNEL_STATS = ("requests", "replaced_unanswered", "paired", "http_counted_in_user_space", "handoff_lost")


class Event(NamedTuple):
    """One request/response pair from the kernel (a tuple: made for every event, it must be cheap)."""

    start_ns: int
    duration_ns: int
    conn_start: int
    pid: int
    fd: int
    protocol: int
    flags: int
    request: bytes
    response: bytes
    size: int = -1  # bytes the call carried (request holds the first of them); -1: len(request)

    @property
    def outbound(self) -> bool:
        return bool(self.flags & F_OUTBOUND)

    @property
    def tls(self) -> bool:
        return bool(self.flags & F_TLS)

    @property
    def counted(self) -> bool:
        return bool(self.flags & F_COUNTED)

    @property
    def written(self) -> bool:
        return bool(self.flags & F_WRITE)

    @property
    def call_size(self) -> int:
        return len(self.request) if self.size < 0 else self.size


_HEADER = EVENT_HEADER.unpack_from
_RESP_AT = EVENT_HEADER.size
_REQ_AT = EVENT_HEADER.size + RESP_MAX


def unpack(raw: bytes) -> Event:
    """The event in one record of the kernel's buffer (bytes: its slices are the payloads)."""
    (start, duration, conn_start, pid, fd, proto, flags, req_len, req_size, resp_len,
     _pmax) = _HEADER(raw)
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    return Event(start, duration, conn_start, pid, fd, proto, flags, raw[_REQ_AT:_REQ_AT + req_len],
                 raw[_RESP_AT:_RESP_AT + min(resp_len, RESP_MAX)], req_size)


def pack(e: Event, payload_max: int = PAYLOAD_DEFAULT) -> bytes:
    """The bytes the kernel sends for `e` (tests feed these to the tracer)."""
    req = e.request[:payload_max]
    resp = e.response[:RESP_MAX]
    head = EVENT_HEADER.pack(e.start_ns, e.duration_ns, e.conn_start, e.pid, e.fd, e.protocol, e.flags,
                             len(req), e.call_size, len(resp), payload_max)
    return head + resp.ljust(RESP_MAX, b"\0") + req
