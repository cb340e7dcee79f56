"""A DNS server's requests (the kernel pairs the query it reads with the answer it writes on a
socket bound to port 53) counted as the node agent counts them: container_dns_inbound_requests_total
by the answer's response code taken as a generic L7 status (NOERROR is "unknown", NXDOMAIN "3":
coroot-node-agent containers/container.go observeInboundL7, ebpftracer/l7/l7.go Status.String),
and its histogram with no label of its own. Packed events through the tracer, no kernel; the
real server is in tests/system/test_l7.py."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract, dns
from agent.l7.contract import F_INBOUND, F_OUTBOUND
from agent.metrics import Families
from tests.unit.l7_helpers import CID, paired, samples, tracer, value
from tests.unit.nodeagent_families import CONST_LABELS, FAMILIES

SERVER_PID = 200  # the stand-in registry's second process of CID


def query(name: str, qtype: int = 1, ident: int = 0x4242, flags: int = 0x0100, qd: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, flags, qd, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def answer(q: bytes, rcode: int, ip: bytes = b"") -> bytes:
    ident, flags = struct.unpack_from("!HH", q)
    an = 1 if ip else 0
    head = struct.pack("!HHHHHH", ident, flags | 0x8080 | rcode, 1, an, 0, 0)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, len(ip)) + ip if ip else b""
    return head + q[12:] + rr


def served(t: object, q: bytes, a: bytes) -> None:
    t.handle_event(paired(contract.DNS, F_INBOUND, q, a, pid=SERVER_PID, fd=5))  # type: ignore[attr-defined]


def test_a_servers_requests_count_by_response_code_as_the_node_agent_labels_them() -> None:
    t, _, rows = tracer()
    ok = query("svc.test")
    for _ in range(3):
        served(t, ok, answer(ok, 0, bytes([10, 9, 0, 1])))
    nx = query("gone.test", 28)
    for _ in range(2):
        served(t, nx, answer(nx, 3))
    refused = query("svc.test", 28)
    served(t, refused, answer(refused, 5))
    served(t, refused, answer(refused, 2))
    got = {dict(lb)["status"]: v for (n, lb), v in samples(t).items() if n == "container_dns_inbound_requests_total"}
    assert got == {"unknown": 3, "3": 2, "5": 1, "2": 1}
    assert value(t, "container_dns_inbound_requests_duration_seconds_total_count", container_id=CID) == 7
    assert value(t, "container_dns_inbound_requests_duration_seconds_total_sum") == 7 * 0.002
    # a server's answers are not the container's lookups: no outbound series, no ip_to_fqdn
    assert value(t, "container_dns_requests_total") == 0
    assert value(t, "container_dns_requests_duration_seconds_total_count") == 0
    assert value(t, "ip_to_fqdn") == 0
    assert rows.rows == []


def test_a_client_and_a_server_in_one_container_count_apart() -> None:
    t, _, _ = tracer()
    q = query("api.example.com")
    a = answer(q, 0, bytes([10, 0, 0, 7]))
    t.handle_event(paired(contract.DNS, F_OUTBOUND, q, a))
    served(t, q, a)
    assert value(t, "container_dns_requests_total", request_type="TypeA", domain="api.example.com", status="ok") == 1
    assert value(t, "container_dns_inbound_requests_total", status="unknown") == 1
    assert value(t, "ip_to_fqdn", ip="10.0.0.7", fqdn="api.example.com") == 1


def test_only_pairs_the_node_agents_kernel_side_takes_for_dns_are_counted() -> None:
    """Query and answer headers as its is_dns_request/is_dns_response check them: QR 0 then 1,
    opcode QUERY, exactly one question; the question itself is not parsed for a server."""
    t, _, _ = tracer()
    q = query("x.test")
    served(t, q, answer(q, 0))
    notify = query("x.test", flags=0x2000)  # opcode NOTIFY
    served(t, notify, answer(notify, 0))
    two = query("x.test", qd=2)
    served(t, two, answer(two, 0))
    served(t, answer(q, 0), answer(q, 0))  # an answer read, not a query
    served(t, q, q)  # a query written back, not an answer
    served(t, q[:5], answer(q, 0))  # too short for a header
    bad_name = q[:12] + b"\x3fabc"  # header fine, question truncated: counted all the same
    served(t, bad_name, answer(q, 3))
    got = {dict(lb)["status"]: v for (n, lb), v in samples(t).items() if n == "container_dns_inbound_requests_total"}
    assert got == {"unknown": 1, "3": 1}
    t.handle_event(paired(contract.DNS, F_OUTBOUND, bad_name, answer(q, 3)))  # a client's needs its question
    assert value(t, "container_dns_requests_total") == 0


def test_header_rcode_and_inbound_status() -> None:
    q = query("a.b")
    assert [dns.header_rcode(q, answer(q, rc)) for rc in (0, 1, 3, 5, 15)] == [0, 1, 3, 5, 15]
    assert dns.header_rcode(q, q) == -1 and dns.header_rcode(b"", b"") == -1
    assert [dns.inbound_status(rc) for rc in (0, 1, 2, 3, 4, 5, 9)] == ["unknown", "1", "2", "3", "4", "5", "9"]


def test_inbound_families_are_the_node_agents() -> None:
    t, _, _ = tracer()
    q = query("svc.test")
    served(t, q, answer(q, 3))
    f = Families(dict.fromkeys(CONST_LABELS, "x"))
    t.collect(f)
    got = {}
    for fam in f:
        if "dns_inbound" in fam.name:
            name = fam.name + "_total" if fam.type == "counter" else fam.name
            got[name] = (fam.type, {frozenset(s.labels) - {"le"} for s in fam.samples})
    assert set(got) == {"container_dns_inbound_requests_total", "container_dns_inbound_requests_duration_seconds_total"}
    for name, (kind, sets) in got.items():
        want_kind, want_labels = FAMILIES[name]
        assert kind == want_kind and sets == {want_labels | CONST_LABELS}, name


def test_inbound_counts_follow_a_rename_and_are_forgotten_with_their_container() -> None:
    t, _, _ = tracer()
    q = query("svc.test")
    served(t, q, answer(q, 0))
    plugin = t.plugins[contract.DNS]
    plugin.rename(CID, "/docker/dns")
    plugin.rename("/docker/dns", CID)
    assert value(t, "container_dns_inbound_requests_total", status="unknown") == 1
    t.tick(0.0, [CID])
    assert value(t, "container_dns_inbound_requests_total") == 0
    assert value(t, "container_dns_inbound_requests_duration_seconds_total_count") == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80), st.booleans())
def test_random_pairs_never_raise(req: bytes, resp: bytes, outbound: bool) -> None:
    t, _, _ = tracer()
    t.handle_event(paired(contract.DNS, F_OUTBOUND if outbound else F_INBOUND, req, resp, pid=SERVER_PID))
    samples(t)
