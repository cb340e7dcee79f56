"""The MongoDB plug-in (agent/l7/mongo.py): its parser on wire bytes pymongo 4.20 wrote and the
test's stand-in server (tests/system/workloads/mongo_responder.py) answered, captured through a
proxy; the legacy OP_QUERY/OP_REPLY and OP_COMPRESSED from the wire specification (no current
driver writes them); random and truncated frames under hypothesis; and the plug-in through the
tracer with packed kernel events."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ebpf.loader import BPF_DIR
from agent.l7 import contract, mongo
from agent.l7.contract import F_INBOUND, F_OUTBOUND, Event, pack
from agent.l7.protocol import Masks, Settings
from agent.l7.tracer import L7Tracer
from tests.unit.l7_helpers import CID, Connections, Containers, Rows, value

HELLO = bytes.fromhex(
    "4b01000067458b6b00000000dd0700000000000000360100001069736d617374657200010000000868656c6c6f4f6b00"
    "01026261636b70726573737572650002000000320003636c69656e7400ee00000003647269766572002e000000026e61"
    "6d65000a00000050794d6f6e676f7c63000276657273696f6e0008000000342e32302e317c0000036f73005c00000002"
    "7479706500060000004c696e757800026e616d6500060000004c696e7578000261726368697465637475726500070000"
    "007838365f3634000276657273696f6e0011000000362e31382e34342d66632d7631313437000002706c6174666f726d"
    "001700000043507974686f6e20332e31312e322e66696e616c2e300003656e76002900000003636f6e7461696e657200"
    "190000000272756e74696d650007000000646f636b65720000000002246462000600000061646d696e0000"
)
HELLO_REPLY = bytes.fromhex(
    "ee000000e903000067458b6bdd0700000000000000d90000000869736d617374657200010869735772697461626c6550"
    "72696d61727900010868656c6c6f4f6b0001106d617842736f6e4f626a65637453697a650000000001106d61784d6573"
    "7361676553697a65427974657300006cdc02106d61785772697465426174636853697a6500a0860100096c6f63616c54"
    "696d6500f7df8a40a2010000106d696e5769726556657273696f6e0000000000106d61785769726556657273696f6e00"
    "1500000008726561644f6e6c79000010636f6e6e656374696f6e49640001000000016f6b00000000000000f03f00"
)
FIND = bytes.fromhex(
    "6a00000069983c6400000000dd0700000000000000550000000266696e64000700000070656f706c65000366696c7465"
    "72002b000000026e616d6500090000007365637265742d300003616765000e0000001024677400000000000000022464"
    "62000300000063610000"
)
FIND_REPLY = bytes.fromhex(
    "62000000eb03000069983c64dd07000000000000004d00000003637572736f7200340000000466697273744261746368"
    "000500000000126964000000000000000000026e73000a00000063612e70656f706c650000016f6b00000000000000f0"
    "3f00"
)
FIND_FAIL = bytes.fromhex(
    "570000007348336600000000dd0700000000000000420000000266696e64000700000070656f706c65000366696c7465"
    "720018000000026661696c00090000007365637265742d30000002246462000300000063610000"
)
FIND_FAIL_REPLY = bytes.fromhex(
    "6b000000ec03000073483366dd070000000000000056000000016f6b000000000000000000026572726d736700180000"
    "00756e6b6e6f776e206f70657261746f723a20246661696c0010636f6465000200000002636f64654e616d6500090000"
    "0042616456616c75650000"
)
INSERT = bytes.fromhex(
    "7500000051dcb07400000000dd07000000000000002e00000002696e73657274000700000070656f706c6500086f7264"
    "657265640001022464620003000000636100000131000000646f63756d656e74730023000000025f696400040000006b"
    "2d300002707700090000007365637265742d300000"
)
INSERT_REPLY = bytes.fromhex(
    "2d000000ed03000051dcb074dd070000000000000018000000106e0001000000016f6b00000000000000f03f00"
)
INSERT_DUP = bytes.fromhex(
    "64000000ff5c491900000000dd07000000000000002e00000002696e73657274000700000070656f706c6500086f7264"
    "657265640001022464620003000000636100000120000000646f63756d656e74730012000000025f6964000400000064"
    "75700000"
)
INSERT_DUP_REPLY = bytes.fromhex(
    "83000000ee030000ff5c4919dd07000000000000006e000000106e0000000000016f6b00000000000000f03f04777269"
    "74654572726f727300490000000330004100000010696e646578000000000010636f646500f82a0000026572726d7367"
    "001b000000453131303030206475706c6963617465206b6579206572726f7200000000"
)

PAIRS = [(HELLO, HELLO_REPLY), (FIND, FIND_REPLY), (FIND_FAIL, FIND_FAIL_REPLY), (INSERT, INSERT_REPLY),
         (INSERT_DUP, INSERT_DUP_REPLY)]
M = mongo.Mongo(Settings())
C = (1, 2, 3)


def parse(req: bytes, resp: bytes, plugin: mongo.Mongo = M) -> list[tuple[str, str, str, str]]:
    return [(r.method, r.status, r.statement, r.error) for r in plugin.parse(C, req, resp, 0.001)]


def test_pymongo_queries_their_status_and_masked_statements() -> None:
    assert parse(FIND, FIND_REPLY) == [
        ("find", "ok", '{"find": "people", "filter": {"name": ?, "age": {"$gt": ?}}, "$db": "ca"}', "")]
    assert parse(FIND_FAIL, FIND_FAIL_REPLY) == [
        ("find", "failed", '{"find": "people", "filter": {"fail": ?}, "$db": "ca"}', "2")]
    assert parse(INSERT, INSERT_REPLY) == [("insert", "ok", '{"insert": "people", "ordered": ?, "$db": "ca"}', "")]
    assert parse(INSERT_DUP, INSERT_DUP_REPLY) == [
        ("insert", "failed", '{"insert": "people", "ordered": ?, "$db": "ca"}', "11000")]


def test_unmasked_statements_keep_the_values() -> None:
    plain = mongo.Mongo(Settings(masks=Masks(sql_literals=False)))
    assert parse(FIND, FIND_REPLY, plain)[0][2] == (
        '{"find": "people", "filter": {"name": "secret-0", "age": {"$gt": 0}}, "$db": "ca"}')


def test_the_handshake_is_not_a_query() -> None:
    assert mongo.parse_request(HELLO) is not None and mongo.parse_request(HELLO).name == "ismaster"  # type: ignore[union-attr]
    assert parse(HELLO, HELLO_REPLY) == []
    hello = mongo.op_msg(5, mongo.bson(("hello", 1), ("$db", "admin")))
    assert parse(hello, b"") == []
    legacy = mongo.op_query(6, "admin.$cmd", mongo.bson(("isMaster", 1)))
    assert parse(legacy, b"") == []


def test_a_reply_seen_as_its_header_alone_leaves_the_status_unknown() -> None:
    assert parse(FIND_FAIL, FIND_FAIL_REPLY[:16]) == [
        ("find", "unknown", '{"find": "people", "filter": {"fail": ?}, "$db": "ca"}', "")]


def test_a_reply_seen_as_its_body_alone_has_its_status() -> None:
    assert parse(FIND_FAIL, FIND_FAIL_REPLY[16:]) == [
        ("find", "failed", '{"find": "people", "filter": {"fail": ?}, "$db": "ca"}', "2")]
    assert parse(INSERT, INSERT_REPLY[16:])[0][1] == "ok"
    cmd = mongo.op_query(9, "ca.$cmd", mongo.bson(("count", "people")))
    assert parse(cmd, op_reply(9, mongo.bson(("ok", 0)))[16:])[0][1] == "failed"


def test_a_server_reading_the_header_alone_counts_a_query_without_its_statement() -> None:
    assert parse(FIND[:16], FIND_REPLY) == [("", "ok", "", "")]


def op_reply(to: int, doc: bytes, flags: int = 0) -> bytes:
    body = struct.pack("<iqii", flags, 0, 0, 1) + doc
    return mongo.HEADER.pack(16 + len(body), 77, to, mongo.OP_REPLY) + body


def test_legacy_op_query_commands_and_collection_queries() -> None:
    cmd = mongo.op_query(9, "ca.$cmd", mongo.bson(("count", "people"), ("query", "secret")))
    assert parse(cmd, op_reply(9, mongo.bson(("n", 0), ("ok", 1)))) == [
        ("count", "ok", '{"count": "people", "query": ?}', "")]
    assert parse(cmd, op_reply(9, mongo.bson(("ok", 0), ("errmsg", "no"), ("code", 26)))) == [
        ("count", "failed", '{"count": "people", "query": ?}', "26")]
    q = mongo.op_query(10, "ca.people", mongo.bson(("name", "secret")))
    assert parse(q, op_reply(10, mongo.bson(("$err", "bad"), ("code", 17)), flags=2)) == [
        ("find", "failed", '{"find": "ca.people", "filter": {"name": ?}}', "")]
    assert parse(q, op_reply(10, mongo.bson(("name", "x")))) == [
        ("find", "unknown", '{"find": "ca.people", "filter": {"name": ?}}', "")]


def test_compressed_and_truncated_requests() -> None:
    compressed = mongo.HEADER.pack(40, 3, 0, mongo.OP_COMPRESSED) + struct.pack("<iiB", 2013, 30, 1) + bytes(15)
    assert parse(compressed, b"") == [("", "unknown", "", "")]
    # the kernel keeps the first bytes of a long command: what is there is shown, then "..."
    long = mongo.op_msg(4, mongo.bson(("find", "people"), ("filter", "x" * 3000), ("$db", "ca")))
    assert parse(long[:1024], b"")[0][2] == '{"find": "people", ...}'


def test_replies_and_other_opcodes_are_not_requests() -> None:
    for sample in M.kernel_non_requests:
        assert parse(sample, b"") == []
    assert parse(FIND_REPLY, b"") == []


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_never_raise(req: bytes, resp: bytes) -> None:
    M.parse(C, req, resp, 0.001)
    M.parse(C, FIND[:16] + req, FIND_REPLY[:16] + resp, 0.001)
    M.parse(C, FIND[:21] + req, FIND_REPLY[:21] + resp, 0.001)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(PAIRS), st.integers(0, 400), st.integers(0, 400), st.integers(0, 400), st.integers(0, 255))
def test_truncated_and_corrupted_frames_never_raise(pair: tuple[bytes, bytes], cut: int, rcut: int, at: int,
                                                    byte: int) -> None:
    req, resp = pair
    M.parse(C, req[:cut], resp[:rcut], 0.001)
    if at < len(req):
        M.parse(C, req[:at] + bytes([byte]) + req[at + 1:], resp, 0.001)
    if at < len(resp):
        M.parse(C, req, resp[:at] + bytes([byte]) + resp[at + 1:], 0.001)


def ev(flags: int, req: bytes, resp: bytes, pid: int = 100) -> bytes:
    return pack(Event(1_000, 2_000_000, 55, pid, 7, contract.MONGO, flags, req, resp))


def test_through_the_tracer_counts_both_sides_and_a_span_per_outbound_query() -> None:
    conns, rows = Connections(), Rows()
    t = L7Tracer(Containers(), conns, rows, hostname="h", host_id="m")
    conns.add(100, 7, 55, "10.0.0.9", 27017, actual="10.0.0.9:27017")
    for req, resp in PAIRS:
        t.handle_event(ev(F_OUTBOUND, req, resp))
        t.handle_event(ev(F_INBOUND, req, resp, pid=200))
    lbl = {"container_id": CID, "destination": "10.0.0.9:27017"}
    assert value(t, "container_mongo_queries_total", status="ok", **lbl) == 2
    assert value(t, "container_mongo_queries_total", status="failed", **lbl) == 2
    assert value(t, "container_mongo_queries_duration_seconds_total_count", **lbl) == 4
    assert value(t, "container_mongo_inbound_queries_total", status="ok") == 2
    assert value(t, "container_mongo_inbound_queries_total", status="failed") == 2
    assert [(r["SpanName"], r["SpanAttributes"]["db.system"], r["StatusCode"], r["StatusMessage"])
            for r in rows.rows] == [("query", "mongodb", "STATUS_CODE_UNSET", ""),
                                    ("query", "mongodb", "STATUS_CODE_ERROR", "2"),
                                    ("query", "mongodb", "STATUS_CODE_UNSET", ""),
                                    ("query", "mongodb", "STATUS_CODE_ERROR", "11000")]
    assert rows.rows[1]["SpanAttributes"]["db.statement"] == '{"find": "people", "filter": {"fail": ?}, "$db": "ca"}'


NATIVE = r"""
#include <stdint.h>
#include <stdio.h>
typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#include "l7/mongo.h"
static int unhex(int c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; }
int main(void) {
    static char line[4096];
    unsigned long size;
    while (scanf("%lu %4095s", &size, line) == 2) {
        u8 b[16] = {0}; u32 n = 0;
        for (char *p = line; p[0] && p[1] && n < 16; p += 2)
            b[n++] = (u8)(unhex(p[0]) << 4 | unhex(p[1]));
        printf("%d %d\n", l7_mongo_request(b, n, size, 0), l7_mongo_response_header(b, n, size));
    }
    return 0;
}
"""


def test_the_kernel_tells_a_replys_header_read_alone(tmp_path: Path) -> None:
    """mongo.h, run natively: a request whole or as a server's 16-byte header read, and a reply's
    header read alone (for the kernel to let its request wait for the body)."""
    src, exe = tmp_path / "m.c", tmp_path / "m"
    src.write_text(NATIVE)
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-I", str(BPF_DIR / "include"), "-o", str(exe), str(src)],
                   check=True)
    calls = [(len(FIND), FIND), (16, FIND), (len(FIND) - 1, FIND), (16, FIND_REPLY), (len(FIND_REPLY), FIND_REPLY),
             (16, op_reply(3, b"")), (16, mongo.HEADER.pack(16, 1, 2, 2010))]
    out = subprocess.run([str(exe)], input="".join(f"{size} {data[:16].hex()}\n" for size, data in calls),
                         check=True, capture_output=True, text=True).stdout
    assert [tuple(int(x) for x in line.split()) for line in out.splitlines()] == [
        (1, 0), (1, 0), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0)]
