"""Memcached: the bytes memcached 1.6.18 (Debian's) and a client exchanged on loopback, text and
binary, paired as the kernel hands them over — a request's first bytes with its response's, or a
one-way call (noreply, quiet opcodes) alone — with the node agent's status values (a miss is
"ok"), spans that carry the command and its keys and never a value, and the kernel detectors
(compiled natively from bpf/include/l7/) on the same bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract
from agent.l7.contract import F_INBOUND, F_OUTBOUND, F_WRITE, Event, pack
from agent.l7.memcached import Memcached, Request, pair, parse_commands
from agent.l7.protocol import Peer, Settings
from agent.l7.protocols import PLUGINS
from tests.unit.l7_helpers import (
    CID,
    detector_lines,
    paired,
    tracer,
    value,
)

K = (1, 5, 9)
H = struct.Struct("!BBHBBHIIQ")

# ---- captured: text ----
SET, STORED = b"set k1 0 0 5\r\nhello\r\n", b"STORED\r\n"
GET, HIT, MISS = b"get k1\r\n", b"VALUE k1 0 5\r\nhello\r\nEND\r\n", b"END\r\n"
MULTI, MULTI_REPLY = b"get k1 nope k1\r\n", b"VALUE k1 0 5\r\nhello\r\nVALUE k1 0 5\r\nhello\r\nEND\r\n"
PIPE = (b"set n 0 0 1\r\n5\r\nincr n 3\r\ndecr n 1\r\ndelete n\r\ndelete n\r\ntouch k1 10\r\n"
        b"add k1 0 0 1\r\nx\r\ngets k1\r\n")
PIPE_REPLY = (b"STORED\r\n8\r\n7\r\nDELETED\r\nNOT_FOUND\r\nTOUCHED\r\nNOT_STORED\r\n"
              b"VALUE k1 0 5 7\r\nhello\r\nEND\r\n")
INCR_TEXT, NON_NUMERIC = b"incr k1 1\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
BAD_CHUNK, BAD_CHUNK_REPLY = b"set k 0 0 3\r\nabcdef\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
ADD_NOREPLY = b"add k1 0 0 1 noreply\r\nx\r\nadd k1 0 0 1\r\ny\r\n"  # answered: NOT_STORED, for the second
CAS, EXISTS = b"cas k1 0 0 1 999\r\nz\r\n", b"EXISTS\r\n"
GATS, GATS_REPLY = b"gats 100 k1 missing\r\n", b"VALUE k1 0 1 14\r\nx\r\nEND\r\n"
NOREPLY = b"set k 0 0 5 noreply\r\nhello\r\n"  # pymemcache's set (noreply is its default)


def frame(magic: int, op: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0,
          status: int = 0, cas: int = 0) -> bytes:
    return H.pack(magic, op, len(key), len(extras), 0, status, len(key) + len(extras) + len(value), opaque,
                  cas) + extras + key + value


# ---- captured: binary (the requests our clients wrote, the server's answers) ----
B_SET = frame(0x80, 0x01, b"bk", bytes(8), b"VALUE1", 1)
B_SET_OK = b"\x81\x01" + bytes(13) + b"\x01" + bytes(7) + b"\x0b"
B_GET = frame(0x80, 0x00, b"bk", opaque=2)
B_GET_HIT = (b"\x81\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\n\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x0b"
             b"\x00\x00\x00\x00VALUE1")
B_GET_MISS = (b"\x81\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\t\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00"
              b"Not found")
B_MULTI = frame(0x80, 0x0D, b"nokey", opaque=4) + frame(0x80, 0x0D, b"bk", opaque=5) + frame(0x80, 0x0A, opaque=6)
B_MULTI_REPLY = (b"\x81\r\x00\x02\x04\x00\x00\x00\x00\x00\x00\x0c\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x0b"
                 b"\x00\x00\x00\x00bkVALUE1"
                 b"\x81\n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00\x00")
B_INCR = frame(0x80, 0x05, b"bk", struct.pack("!QQI", 1, 0, 0), opaque=7)
B_INCR_FAILED = (b"\x81\x05\x00\x00\x00\x00\x00\x06\x00\x00\x00.\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x00"
                 b"Non-numeric server-side value for incr or decr")
B_SETQ = frame(0x80, 0x11, b"bq", bytes(8), b"v1", 1)  # no answer
B_ADDQ = frame(0x80, 0x12, b"bq", bytes(8), b"v2", 2)
B_ADDQ_EXISTS = (b"\x81\x12\x00\x00\x00\x00\x00\x02\x00\x00\x00\x14\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00"
                 b"\x00Data exists for key.")
B_GAT = frame(0x80, 0x1D, b"bq", struct.pack("!I", 100), opaque=3)
B_GAT_HIT = (b"\x81\x1d\x00\x00\x04\x00\x00\x00\x00\x00\x00\x06\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x11"
             b"\x00\x00\x00\x00v1")
B_FLUSH, B_FLUSH_OK = frame(0x80, 0x08, opaque=5), frame(0x81, 0x08, opaque=5)

VALUES = (b"hello", b"VALUE1", b"v1", b"v2", b"abcdef")


def parsed(req: bytes, resp: bytes, seconds: float = 0.002) -> list[tuple[str, str, str]]:
    return [(r.method, r.status, r.statement) for r in Memcached(Settings()).parse(K, req, resp, seconds)]


def statuses(req: bytes, resp: bytes) -> list[str]:
    return [s for _, s, _ in parsed(req, resp)]


def one_way(data: bytes) -> tuple[bytes, bytes]:
    """A one-way call as the tracer gives it to parse: (request, response) = (the bytes after
    the first CA_L7_RESP, the first CA_L7_RESP)."""
    kept = data[:contract.PAYLOAD_DEFAULT]
    return kept[contract.RESP_MAX:], kept[:contract.RESP_MAX]


# ------------------------------------------------------------------------- the parser --

def test_text_commands_pair_with_their_replies_and_a_miss_is_ok() -> None:
    assert parsed(SET, STORED) == [("set", "ok", "set k1")]
    assert parsed(GET, HIT) == [("get", "ok", "get k1")]
    assert parsed(b"get nope\r\n", MISS) == [("get", "ok", "get nope")]
    assert parsed(MULTI, MULTI_REPLY) == [("get", "ok", "get k1 nope k1")]
    assert parsed(PIPE, PIPE_REPLY) == [
        ("set", "ok", "set n"), ("incr", "ok", "incr n"), ("decr", "ok", "decr n"), ("delete", "ok", "delete n"),
        ("delete", "ok", "delete n"), ("touch", "ok", "touch k1"), ("add", "ok", "add k1"), ("gets", "ok", "gets k1")]
    assert parsed(CAS, EXISTS) == [("cas", "ok", "cas k1")]
    assert parsed(GATS, GATS_REPLY) == [("gats", "ok", "gats k1 missing")]  # gat's exptime is not a key
    assert parsed(b"flush_all\r\n", b"OK\r\n") == [("flush_all", "ok", "flush_all")]
    assert parsed(b"touch k1 10\r\n", b"NOT_FOUND\r\n") == [("touch", "ok", "touch k1")]


def test_error_replies_are_failed_with_the_servers_line() -> None:
    ms = Memcached(Settings())
    r = ms.parse(K, INCR_TEXT, NON_NUMERIC, 0.001)
    assert [(x.status, x.error) for x in r] == [
        ("failed", "CLIENT_ERROR cannot increment or decrement non-numeric value")]
    assert statuses(b"set big 0 0 2000000\r\nxxxx", TOO_LARGE) == ["failed"]  # the request cut by the capture
    assert statuses(BAD_CHUNK, BAD_CHUNK_REPLY) == ["failed"]
    assert statuses(b"get k\r\n", b"ERROR\r\n") == ["failed"]
    assert statuses(b"get k\r\nget j\r\n", b"SERVER_ERROR out of memory\r\nEND\r\n") == ["failed", "ok"]


def test_noreply_commands_are_ok_and_take_no_reply() -> None:
    assert statuses(ADD_NOREPLY, b"NOT_STORED\r\n") == ["ok", "ok"]
    assert statuses(b"delete a noreply\r\nget a\r\n", b"VALUE a 0 1\r\nx\r\nEND\r\n") == ["ok", "ok"]
    assert statuses(b"get a\r\nincr n 1 noreply\r\nget b\r\n", b"END\r\nEND\r\n") == ["ok", "ok", "ok"]


def test_a_one_way_call_comes_alone_and_counts_each_command() -> None:
    assert parsed(*one_way(NOREPLY), 0.0) == [("set", "ok", "set k")]
    many = b"".join(b"set key%d 0 0 5 noreply\r\nhello\r\n" % i for i in range(40))  # 1,270 bytes, 1,024 kept
    got = parsed(*one_way(many), 0.0)
    # 32 whole commands in 1,014 bytes, then "set key32 " whose line the capture cut: counted, but
    # whether it asked for no reply is not seen
    assert got[:32] == [("set", "ok", f"set key{i}") for i in range(32)]
    assert got[32:] == [("set", "unknown", "set key32")]
    assert parsed(*one_way(b"delete a noreply\r\nflush_all 0 noreply\r\n")) == [
        ("delete", "ok", "delete a"), ("flush_all", "ok", "flush_all")]
    # a command that wants a reply, after one that does not: its reply comes unpaired
    assert statuses(*one_way(NOREPLY + GET)) == ["ok", "unknown"]
    assert statuses(*one_way(B_SETQ + B_ADDQ)) == ["ok", "ok"]


def test_binary_requests_pair_by_opcode_and_opaque_and_quiet_ones_may_go_unanswered() -> None:
    assert parsed(B_SET, B_SET_OK) == [("set", "ok", "set bk")]
    assert parsed(B_GET, B_GET_HIT) == [("get", "ok", "get bk")]
    assert parsed(frame(0x80, 0x00, b"nokey", opaque=3), B_GET_MISS) == [("get", "ok", "get nokey")]
    # GetKQ nokey (a miss: no answer), GetKQ bk (a hit), no-op (not counted) in one write
    assert parsed(B_MULTI, B_MULTI_REPLY) == [("get", "ok", "get nokey"), ("get", "ok", "get bk")]
    assert statuses(B_ADDQ, B_ADDQ_EXISTS) == ["ok"]  # key exists: not a failure
    assert parsed(B_GAT, B_GAT_HIT) == [("gat", "ok", "gat bq")]
    assert parsed(B_FLUSH, B_FLUSH_OK) == [("flush_all", "ok", "flush_all")]
    assert parsed(frame(0x80, 0x01, b"k", bytes(8), b"x", 9, cas=77), frame(0x81, 0x01, opaque=9, status=2)) == [
        ("cas", "ok", "cas k")]
    r = Memcached(Settings()).parse(K, B_INCR, B_INCR_FAILED, 0.001)
    assert [(x.method, x.status, x.error) for x in r] == [("incr", "failed", "non-numeric value")]
    assert statuses(B_GET, frame(0x81, 0x00, opaque=2, status=0x81)) == ["failed"]
    assert statuses(B_GET, frame(0x81, 0x00, opaque=2, status=0x86)) == ["failed"]


def test_replies_the_capture_does_not_show_are_unknown() -> None:
    # a server writes its replies with sendmsg; the kernel keeps the first iovec: one reply
    assert statuses(PIPE, STORED) == ["ok"] + ["unknown"] * 7
    big = b"VALUE k1 0 2000\r\n" + b"x" * 2000 + b"\r\nEND\r\n"
    assert statuses(GET + GET, big[:512]) == ["ok", "unknown"]
    assert statuses(B_GET + B_GET, B_GET_HIT) == ["ok", "unknown"]
    assert statuses(GET, b"") == ["unknown"]


def test_a_reply_that_is_not_memcached_means_the_request_was_not_either() -> None:
    assert parsed(b"get /x\r\n", b"HTTP/1.1 200 OK\r\n\r\n") == []
    assert parsed(b"set a b c d\r\n", b"+OK\r\n") == []
    assert parsed(b"GET / HTTP/1.1\r\n\r\n", STORED) == []
    assert parsed(b"stats\r\n", b"STAT pid 1\r\nEND\r\n") == []


def test_requests_cut_by_the_capture() -> None:
    keys = b" ".join(b"key%03d" % i for i in range(200))
    cut = (b"get " + keys + b"\r\n")[:1024]
    (r,) = Memcached(Settings()).parse(K, cut, HIT, 0.001)
    assert isinstance(r, Request) and len(r.keys) == 100 and r.keys[-1] == "key099"  # at most MAX_KEYS
    assert statuses((b"set a 0 0 2000\r\n" + b"x" * 2000 + b"\r\n" + GET)[:1024], STORED) == ["ok"]
    assert statuses(b"set a 0 0 2000\r\n", STORED) == ["ok"]
    assert statuses(b"delete", b"DELETED\r\n") == []  # no key yet
    assert statuses(b"delete abc", b"DELETED\r\n") == []  # its key may be cut
    assert parse_commands(B_SET[:30]) != [] and parse_commands(B_SET[:20]) == []


def test_garbage() -> None:
    for req in (b"", b"\r\n", b" get k\r\n", b"set k 0 0 x\r\nab\r\n", b"set k 0 0\r\n", b"getx k\r\n",
                b"\x80\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00\x02", b"\x80\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00"
                b"\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00bk"):
        assert parsed(req, STORED) == [], req
    assert parsed(SET + b"junk\r\n" + GET, STORED) == [("set", "ok", "set k1")]


def test_keys_are_shown_escaped_and_values_never() -> None:
    miss = frame(0x81, 0x00, opaque=1, status=1)
    (r,) = Memcached(Settings()).parse(K, frame(0x80, 0x00, b"a b\x00\xff", opaque=1), miss, 0.001)
    assert r.statement == "get a\\x20b\\x00\\xff"
    ms = Memcached(Settings())
    for req, resp in ((SET, STORED), (GET, HIT), (MULTI, MULTI_REPLY), (PIPE, PIPE_REPLY), (BAD_CHUNK, BAD_CHUNK_REPLY),
                      (B_SET, B_SET_OK), (B_GET, B_GET_HIT), (B_MULTI, B_MULTI_REPLY), (B_GAT, B_GAT_HIT),
                      (B_ADDQ, B_ADDQ_EXISTS), one_way(NOREPLY)):
        for x in ms.parse(K, req, resp, 0.001):
            span = ms.span(x, Peer("10.0.0.9:11211", "10.0.0.9", 11211, "10.0.0.9"), False)
            assert span is not None
            shown = json.dumps([span.name, span.attributes, span.message, x.statement, x.error])
            for v in VALUES:
                assert v.decode() not in shown, (req, shown)


# ------------------------------------------------------------------------------ spans --

def test_spans_as_the_node_agent_makes_them() -> None:
    ms = Memcached(Settings())
    peer = Peer("10.0.0.9:11211", "cache", 11211, "10.0.0.9")
    (multi,) = ms.parse(K, MULTI, MULTI_REPLY, 0.001)
    s = ms.span(multi, peer, False)
    assert s is not None and s.name == "get" and s.status == "STATUS_CODE_UNSET"
    assert s.attributes == {"db.system": "memcached", "db.operation": "get", "db.statement": "get k1 nope k1",
                            "db.memcached.item": '["k1", "nope", "k1"]'}
    (one,) = ms.parse(K, SET, STORED, 0.001)
    s = ms.span(one, peer, False)
    assert s is not None and s.attributes["db.memcached.item"] == "k1" and s.name == "set"
    (bad,) = ms.parse(K, INCR_TEXT, NON_NUMERIC, 0.001)
    s = ms.span(bad, peer, False)
    assert s is not None and (s.status, s.message) == (
        "STATUS_CODE_ERROR", "CLIENT_ERROR cannot increment or decrement non-numeric value")
    (flush,) = ms.parse(K, b"flush_all\r\n", b"OK\r\n", 0.001)
    s = ms.span(flush, peer, False)
    assert s is not None and "db.memcached.item" not in s.attributes


# --------------------------------------------------------------------------- fuzzing --

CAPTURED = [(SET, STORED), (GET, HIT), (MULTI, MULTI_REPLY), (PIPE, PIPE_REPLY), (BAD_CHUNK, BAD_CHUNK_REPLY),
            (ADD_NOREPLY, b"NOT_STORED\r\n"), (GATS, GATS_REPLY), (B_SET, B_SET_OK), (B_GET, B_GET_HIT),
            (B_MULTI, B_MULTI_REPLY), (B_INCR, B_INCR_FAILED), (B_ADDQ, B_ADDQ_EXISTS), (B_GAT, B_GAT_HIT)]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_random_bytes_never_raise(req: bytes, resp: bytes) -> None:
    for r in Memcached(Settings()).parse(K, req, resp, 0.001):
        assert r.status in ("ok", "failed", "unknown")


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(CAPTURED), st.integers(0, 200), st.integers(0, 200), st.binary(max_size=8))
def test_truncated_and_damaged_real_frames_never_raise(pair_: tuple[bytes, bytes], cut: int, cut2: int,
                                                       noise: bytes) -> None:
    req, resp = pair_
    ms = Memcached(Settings())
    for a, b in ((req[:cut], resp[:cut2]), (req[:cut] + noise, resp), (req, resp[:cut2] + noise),
                 (req[cut:], resp[cut2:])):
        got = ms.parse(K, a, b, 0.001)
        assert len(got) <= len(parse_commands(req)) + len(noise) + 1
    assert len(pair(req[:cut], None)) <= len(parse_commands(req))


# ------------------------------------------------------------------- through the tracer --

def ev(req: bytes, resp: bytes, flags: int, fd: int = 7, pid: int = 100, ms: int = 2) -> bytes:
    return paired(contract.MEMCACHED, flags, req, resp, fd=fd, pid=pid, ms=ms)


def message(data: bytes, flags: int, fd: int = 7, pid: int = 100) -> bytes:
    """A one-way call as the kernel sends it (contract.h): its first bytes fill resp[], then req[]."""
    req, resp = one_way(data)
    return pack(Event(1_000, 0, 55, pid, fd, contract.MEMCACHED, flags, req, resp, len(data)))


def test_the_tracer_counts_sets_and_gets_by_status_both_ways_and_spans_show_no_value() -> None:
    t, conns, rows = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 11211, actual="10.0.0.10:11211")
    out = F_OUTBOUND
    for _ in range(3):
        t.handle_event(ev(SET, STORED, out))
    t.handle_event(message(NOREPLY, out | F_WRITE))
    t.handle_event(ev(GET, HIT, out))
    t.handle_event(ev(b"get nope\r\n", MISS, out))
    t.handle_event(ev(INCR_TEXT, NON_NUMERIC, out))
    t.handle_event(ev(B_MULTI, B_MULTI_REPLY, out))
    for _ in range(2):  # the server's side: its reads and the first iovec of its replies
        t.handle_event(ev(SET, STORED, F_INBOUND, pid=200, fd=3))
    t.handle_event(message(NOREPLY, F_INBOUND, pid=200, fd=3))
    t.handle_event(ev(INCR_TEXT, NON_NUMERIC, F_INBOUND, pid=200, fd=3))
    lbl = {"container_id": CID, "destination": "10.0.0.9:11211", "actual_destination": "10.0.0.10:11211"}
    assert value(t, "container_memcached_queries_total", status="ok", **lbl) == 3 + 1 + 1 + 1 + 2
    assert value(t, "container_memcached_queries_total", status="failed", **lbl) == 1
    assert value(t, "container_memcached_queries_duration_seconds_total_count", **lbl) == 9
    assert value(t, "container_memcached_inbound_queries_total", status="ok") == 3
    assert value(t, "container_memcached_inbound_queries_total", status="failed") == 1
    assert len(rows.rows) == 9
    names = sorted(r["SpanName"] for r in rows.rows)
    assert names == ["get", "get", "get", "get", "incr", "set", "set", "set", "set"]
    noreply = [r for r in rows.rows if r["Duration"] == 0]
    assert len(noreply) == 1 and noreply[0]["SpanAttributes"]["db.statement"] == "set k"
    for r in rows.rows:
        assert r["SpanAttributes"]["db.system"] == "memcached"
        assert not any(v.decode() in json.dumps(r, default=str) for v in VALUES)


# -------------------------------------------------------------- the kernel's detectors --

def detect(exe: Path, payloads: list[bytes]) -> list[tuple[int, int]]:
    """(l7_detect, l7_message) of each payload."""
    return [(line[0], line[4]) for line in detector_lines(exe, payloads)]


MC = contract.MEMCACHED
ONE_WAY = [NOREPLY, b"set k 0 0 5 noreply\r\nhello\r\nset j 0 0 1 noreply\r\nx\r\n", b"delete k noreply\r\n",
           b"incr n 5 noreply\r\n", b"decr n 5 noreply\r\n", b"touch k 10 noreply\r\n", b"flush_all noreply\r\n",
           b"flush_all 0 noreply\r\n", b"cas k 0 0 1 99 noreply\r\nx\r\n", b"append k 0 0 1 noreply\r\nx\r\n",
           b"prepend k 0 0 1 noreply\r\nx\r\n", b"replace k 0 0 1 noreply\r\nx\r\n", b"add k 0 0 1 noreply\r\nx\r\n",
           b"set " + b"k" * 120 + b" 4294967295 2592000 1048576 noreply\r\n" + b"x" * 64,  # a 161-byte line
           B_SETQ, B_SETQ + B_ADDQ, frame(0x80, 0x0D, b"a") + frame(0x80, 0x0D, b"b"), frame(0x80, 0x14, b"k"),
           frame(0x80, 0x18)]


def test_noreply_calls_are_one_way_messages_and_the_rest_requests(detector: Path) -> None:
    assert detect(detector, ONE_WAY) == [(MC, MC)] * len(ONE_WAY)  # l7_message is tried first in the kernel
    # a call whose first command is noreply is one-way even when a later one wants a reply: that
    # reply then comes unpaired (the parser counts the command "unknown")
    assert detect(detector, [ADD_NOREPLY]) == [(MC, MC)]
    reqs = [*Memcached.kernel_requests, SET, GET, MULTI, PIPE, INCR_TEXT, BAD_CHUNK, CAS, GATS,
            B_SET, B_GET, B_MULTI, B_INCR, B_GAT, B_FLUSH,
            b"set k 0 0 9\r\nx noreply\r\n",  # "noreply" in the data, not on the line
            b"get k noreply\r\n",  # retrieval has no noreply
            b"set " + b"k" * 180 + b" 0 0 1 noreply\r\nx\r\n",  # the line ends past the 192 bytes looked at
            B_SETQ * 5,  # more quiet frames than walked
            B_SETQ + B_GET]  # the get is answered
    assert detect(detector, reqs) == [(MC, 0)] * len(reqs)
    # the line's end is looked for in the call's first 192 bytes (L7_MC_LINE_CHUNKS of 32)
    edge = [b"set " + b"k" * n + b" 0 0 1 noreply\r\nx\r\n" for n in (172, 173)]  # lines of 192 and 193 bytes
    assert detect(detector, edge) == [(MC, MC), (MC, 0)]
    # the server reads a big set in pieces: the first read is the line and part of the data
    assert detect(detector, [(NOREPLY[:-2] + b"x" * 5000)[:4000], (SET[:-2] + b"x" * 5000)[:4000]]) == [
        (MC, MC), (MC, 0)]


def test_replies_and_other_protocols_are_not_memcached(detector: Path) -> None:
    others = [s for cls in PLUGINS if cls is not Memcached for s in (*cls.kernel_requests, *cls.kernel_messages)]
    replies = [STORED, HIT, MISS, MULTI_REPLY, PIPE_REPLY, NON_NUMERIC, TOO_LARGE, BAD_CHUNK_REPLY, EXISTS, b"OK\r\n",
               B_SET_OK, B_GET_HIT, B_GET_MISS, B_MULTI_REPLY, B_INCR_FAILED, B_ADDQ_EXISTS, B_FLUSH_OK]
    words = [b"gets\r\n", b"get \r\n", b"set  k\r\n", b"delete\tk\r\n", b"Set k 0 0 1\r\nx\r\n", b"sets k\r\n",
             b"flush_all\n", b"flush_alls\r\n", b"touc k 1\r\n", b"getk k\r\n", b"version\r\n", b"verbosity 1\r\n",
             b"mn\r\n", b"ms k 1 T0\r\nx\r\n", b"\x80\x0a" + bytes(22), b"\x80\x07" + bytes(22),
             b"\x80\x00\x00\x02" + bytes(20)]
    samples = others + replies + words
    for sample, (req, msg) in zip(samples, detect(detector, samples), strict=True):
        assert MC not in (req, msg), sample
    # what other plug-ins call not theirs may be memcached's syntax ("get / HTTP/1.1" is a get of
    # two keys): claimed only then
    loose = [s for cls in PLUGINS if cls is not Memcached for s in cls.kernel_non_requests]
    for sample, (req, msg) in zip(loose, detect(detector, loose), strict=True):
        assert MC not in (req, msg) or parse_commands(sample), sample


def test_the_kernel_and_the_parser_agree_on_command_words(detector: Path) -> None:
    words = ["get", "gets", "gat", "gats", "set", "add", "replace", "append", "prepend", "cas", "delete", "incr",
             "decr", "touch", "flush_all", "stats", "version", "quit", "verbosity", "mg", "ms", "GET", "Set", "getx",
             "inc", "dec", "touches", "flush"]
    lines = [f"{w} key1 0 0 1{' 7' if w == 'cas' else ''}\r\nx\r\n".encode() for w in words]
    lines += [f"{w}\r\n".encode() for w in words]
    kernel = [r == MC for r, _ in detect(detector, lines)]
    parser = [bool(Memcached(Settings()).parse(K, line, STORED, 0.001)) for line in lines]
    assert kernel == parser, [(line, k, p) for line, k, p in zip(lines, kernel, parser, strict=True) if k != p]
