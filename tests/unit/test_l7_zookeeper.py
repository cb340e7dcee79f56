"""ZooKeeper (jute): requests and replies captured between a jute client and ZooKeeper 3.8's
server (Debian's zookeeperd) on loopback, as the kernel hands them over — a client's framed
write and its reply; the bare body the server reads after the length and the reply it writes —
with the node agent's statuses; garbage, random and truncated bytes; the kernel's detector
(compiled natively from bpf/include/l7/) against the parser; and through the tracer."""

from __future__ import annotations

import random
import struct
from functools import partial
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract
from agent.l7.contract import F_INBOUND, F_OUTBOUND
from agent.l7.protocol import Peer, Settings
from agent.l7.zookeeper import (
    CONNECT,
    MULTI,
    NOTIFICATION,
    PATH_OPS,
    Zookeeper,
    parse_replies,
    parse_request,
    status_of,
)
from tests.unit.l7_helpers import (
    CID,
    detector_lines,
    paired,
    tracer,
    value,
)
from tests.unit.nodeagent_families import L7_STATUS

K = (1, 5, 9)
ACL = "000000010000001f00000005776f726c6400000006616e796f6e65"  # world:anyone, all permissions

# (request as the client wrote it, the server's reply): captured
PAIRS = {
    "create": ("000000380000000100000001000000082f63612d7a6b2d300000000176" + ACL + "00000000",
               "0000001c00000001000000000000002000000000000000082f63612d7a6b2d30"),
    "create-exists": ("000000380000000200000001000000082f63612d7a6b2d300000000176" + ACL + "00000000",
                      "00000010000000020000000000000021ffffff92"),
    "getData": ("000000150000000300000004000000082f63612d7a6b2d3000",
                "0000005900000003000000000000002100000000000000017600000000000000200000000000000020000001"
                "a23fd98e82000001a23fd98e82000000000000000000000000000000000000000000000001000000000000000000"
                "000020"),
    "getData-missing": ("0000001b00000004000000040000000e2f63612d7a6b2d6d697373696e6700",
                        "00000010000000040000000000000021ffffff9b"),
    "exists-missing": ("0000001b00000005000000030000000e2f63612d7a6b2d6d697373696e6700",
                       "00000010000000050000000000000021ffffff9b"),
    "create-bad": ("000000320000000600000001000000022f2e0000000176" + ACL + "00000000",
                   "00000010000000060000000000000022fffffff8"),
    "ping": ("00000008fffffffe0000000b", "00000010fffffffe000000000000002200000000"),
    "multi": ("0000004a000000070000000e0000000100ffffffff000000082f63612d7a6b2d6d0000000176" + ACL
              + "00000000ffffffff01ffffffff",
              "0000002e00000007000000000000002300000000000000010000000000000000082f63612d7a6b2d6d"
              "ffffffff01ffffffff"),
    "exists-watch": ("000000150000000800000003000000082f63612d7a6b2d7701", "00000010000000080000000000000023ffffff9b"),
    "close": ("0000000800000009fffffff5", "0000001000000009000000000000002500000000"),
}
# (method, statement, status, err) of each pair
EXPECT = {
    "create": ("create", "create /ca-zk-0", "ok", 0),
    "create-exists": ("create", "create /ca-zk-0", "ok", -110),  # NodeExists: an API error, "ok" as the node agent
    "getData": ("getData", "getData /ca-zk-0", "ok", 0),
    "getData-missing": ("getData", "getData /ca-zk-missing", "ok", -101),  # NoNode
    "exists-missing": ("exists", "exists /ca-zk-missing", "ok", -101),
    "create-bad": ("create", "create /.", "failed", -8),  # BadArguments: a system error
    "ping": ("ping", "ping", "ok", 0),
    "multi": ("multi(create, ...)", "multi(create, ...) /ca-zk-m", "ok", 0),
    "exists-watch": ("exists", "exists /ca-zk-w", "ok", -101),
    "close": ("close", "close", "ok", 0),
}
CONNECT_REPLY = bytes.fromhex("00000025000000000000753001" "0000e8ad51000200000010" "6f5b71b7be900a201181ee77d0b19eef00")


def pair(name: str) -> tuple[bytes, bytes]:
    req, rep = PAIRS[name]
    return bytes.fromhex(req), bytes.fromhex(rep)


def parsed(req: bytes, rep: bytes) -> list[tuple[str, str, str, int]]:
    return [(r.method, r.statement, r.status, r.code) for r in Zookeeper(Settings()).parse(K, req, rep, 0.002)]


def test_captured_requests_as_the_client_writes_them_and_the_server_reads_them() -> None:
    for name, want in EXPECT.items():
        req, rep = pair(name)
        assert parsed(req, rep) == [want], name
        assert parsed(req[4:], rep) == [want], name  # the server's read: the body after the length
    assert [r.xid for r in parse_replies(bytes.fromhex(PAIRS["getData"][1]))] == [3]


def test_status_is_failed_for_system_errors_and_reconfig_disabled_only() -> None:
    assert [status_of(e) for e in (0, -1, -4, -9, -10, -13, -101, -110, -112, -122, -123, -124)] == [
        "ok", "failed", "failed", "failed", "ok", "ok", "ok", "ok", "ok", "ok", "failed", "ok"]
    req, _ = pair("getData")
    for err, status in ((-7, "failed"), (-102, "ok"), (-123, "failed")):
        rep = struct.pack("!iiqi", 16, 3, 9, err)
        assert parsed(req, rep) == [("getData", "getData /ca-zk-0", status, err)]


def test_the_session_handshake_and_what_the_server_writes_are_not_requests() -> None:
    assert parse_request(CONNECT) == [] and parse_request(CONNECT[4:]) == []
    assert parsed(CONNECT, CONNECT_REPLY) == []
    assert parse_request(NOTIFICATION) == [] and parse_request(bytes.fromhex(PAIRS["getData"][1])) == []
    setwatches = bytes.fromhex("0000001cfffffff800000065" + "00" * 20)  # xid -8
    auth = bytes.fromhex("0000001dfffffffc00000064000000000000000664696765737400000003613a62")  # xid -4
    assert parse_request(setwatches) == parse_request(auth) == []


def test_a_reply_that_is_not_the_requests_and_replies_it_cannot_see() -> None:
    req, rep = pair("getData-missing")
    want = ("getData", "getData /ca-zk-missing", "ok", -101)
    assert parsed(req, NOTIFICATION + rep) == [want]  # a notification read with the reply
    # in its place: it answers with its err (0), as the node agent takes it
    assert parsed(req, NOTIFICATION) == [("getData", "getData /ca-zk-missing", "ok", 0)]
    assert parsed(req, rep[4:]) == [want]  # the header after the length (the kernel waits past a length read alone)
    assert parsed(req, rep[:4]) == []  # the length alone (the kernel does not pair it): no reply, not counted
    assert parsed(req, bytes.fromhex(PAIRS["getData"][1])) == []  # xid 3's reply: not this pair
    assert parsed(req, b"+OK\r\n") == parsed(req, b"") == []
    assert parsed(b"GET / HTTP/1.1\r\n\r\n", rep) == []


def test_paths_cut_off_long_or_missing() -> None:
    req, rep = pair("create")
    assert parsed(req[:20], rep) == [("create", "create /ca-...<TRUNCATED>", "ok", 0)]
    long = b"/" + b"x" * 2000
    big = struct.pack("!iiii", 12 + len(long) + 1, 3, 4, len(long)) + long + b"\0"
    assert parsed(big[:1024], struct.pack("!iiqi", 16, 3, 9, -101)) == [("getData", "getData", "ok", -101)]
    no_slash = struct.pack("!iiii", 12 + 3 + 1, 3, 4, 3) + b"abc\0"
    assert parse_request(no_slash) == parse_request(no_slash[4:]) == []
    assert parse_request(struct.pack("!iiii", 13, 3, 4, 9) + b"/x\0") == []  # the path passes the frame's end


def test_spans_show_the_op_the_path_and_the_err() -> None:
    z = Zookeeper(Settings())
    peer = Peer("127.0.0.1:2181", "127.0.0.1", 2181, "127.0.0.1")
    s = z.span(z.parse(K, *pair("getData-missing"), 0.001)[0], peer, False)
    assert s is not None and (s.name, s.status, s.message) == ("getData", "STATUS_CODE_UNSET", "")
    assert s.attributes == {"db.system": "zookeeper", "db.operation": "getData",
                            "db.statement": "getData /ca-zk-missing", "zookeeper.status_code": "-101"}
    s = z.span(z.parse(K, *pair("create-bad"), 0.001)[0], peer, False)
    assert s is not None and (s.name, s.status, s.message) == ("create", "STATUS_CODE_ERROR", "BadArguments")
    assert s.attributes["zookeeper.status_code"] == "-8"
    req, rep = pair("ping")
    s = z.span(z.parse(K, req, rep[4:], 0.001)[0], peer, False)
    assert s is not None and s.status == "STATUS_CODE_UNSET" and s.attributes["zookeeper.status_code"] == "0"


ALL_REQUESTS = [bytes.fromhex(r) for r, _ in PAIRS.values()]
ALL_REPLIES = [bytes.fromhex(r) for _, r in PAIRS.values()] + [CONNECT_REPLY, NOTIFICATION]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_random_bytes_never_raise(req: bytes, rep: bytes) -> None:
    for r in Zookeeper(Settings()).parse(K, req, rep, 0.001):
        assert r.status in L7_STATUS["zookeeper"]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(ALL_REQUESTS), st.sampled_from(ALL_REPLIES), st.integers(0, 120), st.integers(0, 120),
       st.booleans())
def test_truncated_real_frames_never_raise(req: bytes, rep: bytes, cut: int, cut2: int, bare: bool) -> None:
    req = req[4:] if bare else req
    assert len(Zookeeper(Settings()).parse(K, req[:cut], rep[:cut2], 0.001)) <= 1
    assert len(Zookeeper(Settings()).parse(K, req[cut:], rep[cut2:], 0.001)) <= 1


# ---------------------------------------------------------- the kernel's detector, natively --

def detected(exe: Path, payloads: list[bytes]) -> list[bool]:
    return [line[0] == contract.ZOOKEEPER for line in detector_lines(exe, payloads)]


def test_the_kernel_and_the_parser_agree_on_which_ops_carry_a_path(detector: Path) -> None:
    ops = list(range(-20, 130))
    bodies = [struct.pack("!iii", 3, op, 8) + b"/ca-zk-0\0" for op in ops]
    framed = [struct.pack("!i", len(b)) + b for b in bodies]
    want = [op in PATH_OPS for op in ops]
    assert detected(detector, framed) == want
    assert detected(detector, bodies) == want
    assert [bool(parse_request(f)) for f in framed] == want


def test_every_request_the_kernel_claims_the_parser_reads(detector: Path) -> None:
    """Real requests, framed and bare, cut and with bytes flipped: what the detector claims,
    the parser reads (the parser may read more: it does not know a bare body's size)."""
    rnd = random.Random(7)
    cases = []
    for req in ALL_REQUESTS:
        for data in (req, req[4:]):
            cases += [data[:n] for n in range(len(data) + 1)]
            for _ in range(200):
                b = bytearray(data)
                for _ in range(rnd.randint(1, 3)):
                    b[rnd.randrange(len(b))] = rnd.randrange(256)
                cases.append(bytes(b))
    claims = detected(detector, cases)
    assert sum(claims) > len(ALL_REQUESTS) * 2
    missed = [c.hex() for c, k in zip(cases, claims, strict=True) if k and not parse_request(c)]
    assert missed == []
    assert detected(detector, [MULTI, MULTI[4:], MULTI[:16]]) == [True, True, False]



def test_a_body_whose_xid_reads_as_its_length(detector: Path) -> None:
    """The server reads exists /ca-zk-1 (21 bytes) of xid 17: its first int is 17, the length a
    frame of 21 bytes would start with. It is still a request, and its reply pairs it."""
    body = struct.pack("!iii", 17, 3, 8) + b"/ca-zk-1\0"
    assert len(body) == 17 + 4
    assert detected(detector, [body]) == [True]
    assert parsed(body, struct.pack("!iiqi", 16, 17, 9, -101)) == [("exists", "exists /ca-zk-1", "ok", -101)]

# ------------------------------------------------------------------- through the tracer --

ev = partial(paired, contract.ZOOKEEPER)


def test_the_tracer_counts_clients_and_servers_by_status_with_spans_for_clients() -> None:
    t, conns, rows = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 2181, actual="10.0.0.10:2181")
    for name in ("create", "getData", "getData-missing", "exists-missing", "create-bad", "ping"):
        t.handle_event(ev(F_OUTBOUND, *pair(name)))
        req, rep = pair(name)
        t.handle_event(ev(F_INBOUND, req[4:], rep, pid=200))  # the server's view
    t.handle_event(ev(F_OUTBOUND, CONNECT, CONNECT_REPLY))
    lbl = {"container_id": CID, "destination": "10.0.0.9:2181", "actual_destination": "10.0.0.10:2181"}
    assert value(t, "container_zookeeper_requests_total", status="ok", **lbl) == 5
    assert value(t, "container_zookeeper_requests_total", status="failed", **lbl) == 1
    assert value(t, "container_zookeeper_requests_duration_seconds_total_count", **lbl) == 6
    assert value(t, "container_zookeeper_inbound_requests_total", status="ok", container_id=CID) == 5
    assert value(t, "container_zookeeper_inbound_requests_total", status="failed", container_id=CID) == 1
    assert value(t, "container_zookeeper_inbound_requests_duration_seconds_total_count") == 6
    names = [(r["SpanName"], r["SpanAttributes"]["db.statement"], r["SpanAttributes"]["zookeeper.status_code"],
              r["StatusCode"]) for r in rows.rows]
    assert names == [("create", "create /ca-zk-0", "0", "STATUS_CODE_UNSET"),
                     ("getData", "getData /ca-zk-0", "0", "STATUS_CODE_UNSET"),
                     ("getData", "getData /ca-zk-missing", "-101", "STATUS_CODE_UNSET"),
                     ("exists", "exists /ca-zk-missing", "-101", "STATUS_CODE_UNSET"),
                     ("create", "create /.", "-8", "STATUS_CODE_ERROR"),
                     ("ping", "ping", "0", "STATUS_CODE_UNSET")]
    assert all(r["Duration"] == 2_000_000 and r["SpanAttributes"]["db.system"] == "zookeeper" for r in rows.rows)
