"""The Kafka plug-in (agent/l7/kafka.py): its parser on wire bytes kafka-python 3.0.12 wrote and
the test's stand-in broker (tests/system/workloads/kafka_responder.py) answered, captured through
a proxy (ApiVersions v4, Metadata v9, Produce v9: flexible versions); older, non-flexible
versions and Fetch built from the specification; random and truncated frames under hypothesis;
and the plug-in through the tracer with packed kernel events."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ebpf.loader import BPF_DIR
from agent.l7 import contract, kafka
from agent.l7.contract import F_INBOUND, F_OUTBOUND, Event, pack
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


def ev(flags: int, req: bytes, resp: bytes, pid: int = 100) -> bytes:
    return pack(Event(1_000, 2_000_000, 55, pid, 7, contract.KAFKA, flags, req, resp))


def test_through_the_tracer_counts_both_sides_and_makes_no_spans() -> None:
    conns, rows = Connections(), Rows()
    t = L7Tracer(Containers(), conns, rows, hostname="h", host_id="m")
    conns.add(100, 7, 55, "10.0.0.9", 9092, actual="10.0.0.9:9092")
    for req, resp in PAIRS:
        t.handle_event(ev(F_OUTBOUND, req, resp))
    t.handle_event(ev(F_OUTBOUND, PIPE1 + PIPE2 + PIPE3, PIPE1_RESP + PIPE2_RESP))
    t.handle_event(ev(F_INBOUND, PIPE1 + PIPE2, PIPE1_RESP, pid=200))
    lbl = {"container_id": CID, "destination": "10.0.0.9:9092"}
    assert value(t, "container_kafka_requests_total", status="ok", **lbl) == 7
    assert value(t, "container_kafka_requests_total", status="failed", **lbl) == 1
    assert value(t, "container_kafka_requests_total", status="unknown", **lbl) == 1
    assert value(t, "container_kafka_requests_duration_seconds_total_count", **lbl) == 9
    assert value(t, "container_kafka_inbound_requests_total", status="ok") == 1
    assert value(t, "container_kafka_inbound_requests_total", status="unknown") == 1
    assert rows.rows == []


NATIVE = r"""
#include <stdint.h>
#include <stdio.h>
typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#include "l7/kafka.h"
static int unhex(int c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; }
int main(void) {
    static char line[4096];
    while (fgets(line, sizeof(line), stdin)) {
        u8 b[16] = {0}; u32 n = 0;
        for (char *p = line; p[0] && p[0] != '\n' && p[1] && n < 16; p += 2)
            b[n++] = (u8)(unhex(p[0]) << 4 | unhex(p[1]));
        printf("%u %u\n", n >= 12 ? l7_kafka_request_stream(b, n) : 0, l7_kafka_response_stream(b, n));
    }
    return 0;
}
"""


def test_the_kernel_reads_the_correlation_ids_the_parser_pairs_by(tmp_path: Path) -> None:
    """kafka.h's stream helpers (for pairing pipelined requests in the kernel), run natively."""
    src, exe = tmp_path / "k.c", tmp_path / "k"
    src.write_text(NATIVE)
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-I", str(BPF_DIR / "include"), "-o", str(exe), str(src)],
                   check=True)
    frames = [PIPE1, PIPE2, PRODUCE_BAD, PIPE1_RESP, PIPE3_RESP, API_VERSIONS_RESP, b"\x01" + PIPE1_RESP[1:], b"\0\0"]
    out = subprocess.run([str(exe)], input="".join(f[:16].hex() + "\n" for f in frames), check=True,
                         capture_output=True, text=True).stdout.split("\n")
    got = [tuple(int(x) for x in line.split()) for line in out if line]
    corr = [kafka.parse_requests(f)[0].correlation_id for f in (PIPE1, PIPE2, PRODUCE_BAD)]
    assert [g[0] for g in got[:3]] == corr == [6, 7, 5]
    assert [g[1] for g in got[3:]] == [6, 8, 1, 0, 0]  # a size of 16 MB or more, or 2 bytes: no response
