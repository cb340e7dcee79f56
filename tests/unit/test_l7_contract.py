"""The L7 kernel/user contract has one definition per side and they agree: the constants and
layouts of bpf/include/l7/contract.h against agent/l7/contract.py, the histogram bounds in
bpf/l7.c, one detector header and one plug-in per protocol, and the detectors themselves —
compiled natively from the same headers the kernel gets — recognise exactly the wire samples
each plug-in declares."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from agent.ebpf.loader import BPF_DIR
from agent.l7 import contract, dns, http
from agent.l7.protocol import Settings
from agent.l7.protocols import PLUGINS
from tests.unit.l7_helpers import detector_lines

INCLUDE = BPF_DIR / "include"
CONTRACT_H = (INCLUDE / "l7" / "contract.h").read_text()
PROTOCOLS_H = (INCLUDE / "l7" / "protocols.h").read_text()
C_TYPES = {"u64": "Q", "u32": "I", "u16": "H", "u8": "B"}


def defines(text: str) -> dict[str, int]:
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^#define (\w+) (\d+|0x[0-9a-fA-F]+)\b", text, re.M)}


def struct_fields(text: str, name: str) -> list[tuple[str, str, str]]:
    """(type, field, array length or '') of a C struct, in order."""
    body = re.search(rf"struct {name} {{(.*?)\n}};", text, re.S)
    assert body, f"struct {name} not found"
    code = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    return re.findall(r"(u64|u32|u16|u8) (\w+)(?:\[(\w+)\])?;", code)


D = defines(CONTRACT_H)


def test_protocol_ids_and_flags_are_the_same_numbers_on_both_sides() -> None:
    ids = {k: v for k, v in D.items() if k.startswith("L7_") and k.removeprefix("L7_").lower()
           in {cls.name for cls in PLUGINS}}
    assert ids == {f"L7_{cls.name.upper()}": cls.id for cls in PLUGINS}
    assert [D["L7_OUTBOUND"], D["L7_INBOUND"], D["L7_TLS"], D["L7_COUNTED"]] == [
        contract.F_OUTBOUND, contract.F_INBOUND, contract.F_TLS, contract.F_COUNTED]
    assert len({cls.id for cls in PLUGINS}) == len(PLUGINS)


def test_every_protocol_has_a_detector_header_and_a_plugin() -> None:
    headers = {p.stem for p in (INCLUDE / "l7").glob("*.h")} - {"contract", "protocols"}
    assert headers == {cls.name for cls in PLUGINS}
    for name in headers:
        assert f'#include "l7/{name}.h"' in PROTOCOLS_H
    for cls in PLUGINS:
        if cls.name != "dns":  # DNS is recognised by its socket
            assert f"return L7_{cls.name.upper()};" in PROTOCOLS_H


def test_event_layout() -> None:
    fields = struct_fields(CONTRACT_H, "l7_event")
    scalars = [(t, n) for t, n, arr in fields if not arr]
    assert tuple(n for _, n in scalars) == contract.EVENT_FIELDS[:3] + ("tgid",) + contract.EVENT_FIELDS[4:]
    assert "<" + "".join(C_TYPES[t] for t, _ in scalars) == contract.EVENT_HEADER.format
    arrays = [(n, arr) for _, n, arr in fields if arr]
    assert arrays == [("resp", "CA_L7_RESP"), ("req", "CA_L7_PAYLOAD")]
    assert fields[-2:] == [("u8", "resp", "CA_L7_RESP"), ("u8", "req", "CA_L7_PAYLOAD")]
    assert D["CA_L7_RESP"] == contract.RESP_MAX and D["CA_L7_PAYLOAD"] == contract.PAYLOAD_DEFAULT
    # the header is naturally aligned: no padding before resp[]
    assert contract.EVENT_HEADER.size == struct.calcsize("=" + contract.EVENT_HEADER.format[1:])


def test_http_map_layout_status_classes_and_kernel_counters() -> None:
    assert tuple(n for _, n, _ in struct_fields(CONTRACT_H, "l7_http_key")) == contract.HTTP_KEY_FIELDS
    assert [(t, n, a) for t, n, a in struct_fields(CONTRACT_H, "l7_hist")] == [
        ("u64", "count", ""), ("u64", "sum_ns", ""), ("u64", "buckets", "L7_BUCKETS")]
    assert D["L7_HTTP_STATUS_CLASSES"] == len(contract.HTTP_STATUS)
    assert D["L7_BUCKETS"] == len(contract.BUCKETS)
    stats = sorted((v, k) for k, v in D.items() if k.startswith("L7_STAT_"))
    assert [v for v, _ in stats] == list(range(D["L7_STATS"])) and D["L7_STATS"] == len(contract.KERNEL_STATS)
    names = {"L7_STAT_REQUESTS": "requests", "L7_STAT_REPLACED": "replaced_unanswered",
             "L7_STAT_PAIRED": "paired", "L7_STAT_HTTP_FULL": "http_counted_in_user_space",
             "L7_STAT_HANDOFF_LOST": "handoff_lost"}
    assert [names[k] for _, k in stats] == list(contract.KERNEL_STATS)


def test_kernel_bucket_bounds_are_the_metric_buckets() -> None:
    body = re.search(r"u32 l7_bucket\(u64 ns\) \{(.*?)\n\}", (BPF_DIR / "l7.c").read_text(), re.S)
    assert body
    bounds = [int(n) for n in re.findall(r"ns <= (\d+)ULL", body.group(1))]
    assert bounds == [round(b * 1e9) for b in contract.BUCKETS]


def test_l7_c_defines_nothing_the_contract_owns() -> None:
    l7c = defines((BPF_DIR / "l7.c").read_text())
    assert not set(l7c) & set(D), "bpf/l7.c redefines contract constants"


def test_pack_and_unpack_are_inverse() -> None:
    e = contract.Event(1, 2, 3, 4, 5, contract.REDIS, contract.F_OUTBOUND | contract.F_TLS, b"*1\r\n", b"+OK\r\n", 4)
    assert contract.unpack(contract.pack(e)) == e
    assert contract.unpack(contract.pack(e, payload_max=2)).request == b"*1"


# ------------------------------------------------------------ the detectors, run natively --

def run(exe: Path, payloads: list[bytes]) -> list[tuple[int, int, int, int, int]]:
    return [tuple(line) for line in detector_lines(exe, payloads)]  # type: ignore[misc]


def test_one_way_message_detectors_recognise_their_plugins_samples(detector: Path) -> None:
    for cls in PLUGINS:
        if not cls.kernel_messages:
            continue
        assert cls.streaming, f"{cls.name}: one-way messages come to feed()"
        assert [r[4] for r in run(detector, list(cls.kernel_messages))] == [cls.id] * len(cls.kernel_messages)
        assert cls.id not in [r[4] for r in run(detector, list(cls.kernel_non_requests))], cls.name
    others = [s for cls in PLUGINS for s in cls.kernel_requests]
    assert [r[4] for r in run(detector, others)] == [0] * len(others), "a message detector claims requests"


def test_each_detector_recognises_its_plugins_samples_and_no_others(detector: Path) -> None:
    for cls in PLUGINS:
        if cls.name == "dns" or (cls.kernel_messages and not cls.kernel_requests):
            continue
        assert cls.kernel_requests and cls.kernel_non_requests, cls.name
        got = [r[0] for r in run(detector, list(cls.kernel_requests))]
        assert got == [cls.id] * len(cls.kernel_requests), cls.name
        got = [r[0] for r in run(detector, list(cls.kernel_non_requests))]
        assert cls.id not in got, cls.name
        plugin = cls(Settings())
        if cls.streaming:  # recognition starts a stream; its requests are paired in feed()
            continue
        for sample in cls.kernel_requests:  # what the kernel sends up, the plug-in reads
            assert plugin.parse((1, 2, 3), sample, plugin.sample_response(sample), 0.001), (cls.name, sample)


def test_the_kernel_and_the_parser_agree_on_http_methods_and_status_lines(detector: Path) -> None:
    words = [m.encode() for m in http.METHODS] + [b"PRI", b"GETS", b"COPY", b"get"]
    reqs = [w + b" /p HTTP/1.1\r\n\r\n" for w in words]
    kernel = [r[0] == contract.HTTP for r in run(detector, reqs)]
    assert kernel == [bool(http.parse_requests(q)) for q in reqs]
    lines = [f"HTTP/1.1 {c} X\r\n\r\n".encode() for c in (100, 204, 302, 404, 503, 600, 99)]
    lines += [b"HTTP/1.0 200 OK\r\n\r\n", b"HTTP/2 200\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n"]
    classes = [r[3] for r in run(detector, lines)]
    expect = []
    for line in lines:
        parsed = http.parse_responses(line)
        cls = parsed[0].status_class if parsed else "unknown"
        expect.append(contract.HTTP_STATUS.index(cls) if cls in contract.HTTP_STATUS else 0)
    assert classes == expect


def test_dns_queries_and_answers_are_told_apart_as_the_parser_does(detector: Path) -> None:
    query = bytes.fromhex("12340100000100000000000003777777076578616d706c6503636f6d0000010001")
    answer = bytes.fromhex("12348180000100010000000003777777076578616d706c6503636f6d0000010001"
                           "c00c000100010000003c00045db8d822")
    got = run(detector, [query, answer, query[:11]])
    assert [(r[1], r[2]) for r in got] == [(1, 0), (0, 1), (0, 0)]
    q, a = dns.parse(query), dns.parse(answer)
    assert q is not None and not q.response and a is not None and a.response
    assert (a.name, a.ips) == ("www.example.com", ("93.184.216.34",))
