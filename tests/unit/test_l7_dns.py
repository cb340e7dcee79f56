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
from agent.l7 import tracer as tracer_mod
from agent.l7.contract import F_INBOUND, F_OUTBOUND
from agent.metrics import Families
from tests.unit.l7_helpers import CID, paired, samples, tracer, value
from tests.unit.nodeagent_families import (
    CONST_LABELS,
    DNS_OVERFLOW_DOMAIN,
    DNS_REQUEST_TYPES,
    FAMILIES,
    L7_STATUS,
)

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
    # a client's is judged by its answer alone (the node agent's ParseDns reads the response)
    t.handle_event(paired(contract.DNS, F_OUTBOUND, bad_name, answer(q, 3)))
    assert value(t, "container_dns_requests_total", request_type="TypeA", domain="x.test", status="nxdomain") == 1
    t.handle_event(paired(contract.DNS, F_OUTBOUND, q, answer(q, 3)[:-3]))  # an answer that does not unpack
    assert value(t, "container_dns_requests_total") == 1


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


# --------------------------------------------------------------------------------- clients --
# Outbound requests as coroot-node-agent counts them (containers/container.go onDNSRequest,
# ebpftracer/l7/dns.go ParseDns over golang.org/x/net/dns/dnsmessage, common/net.go
# NormalizeFQDN/NewDomain, containers/registry.go:150-157 for ip_to_fqdn). Messages are built
# per RFC 1035 section 4 below; tests/system/test_l7.py checks the same cases against dnsmasq.


def wire_name(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return b"".join(bytes([len(p)]) + p for p in raw.split(b".") if p) + b"\0"


def rr(name: bytes, rtype: int, rdata: bytes, ttl: int = 60) -> bytes:
    """A resource record (RFC 1035 4.1.3); `name` already in wire form (a pointer: b"\\xc0\\x0c")."""
    return name + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def response(name: str | bytes, qtype: int, rcode: int = 0, answers: tuple[bytes, ...] = (),
             authority: tuple[bytes, ...] = (), additional: tuple[bytes, ...] = (), ident: int = 0x4242) -> bytes:
    """A recursive resolver's answer to `query(name, qtype)`: QR, RD, RA and the RCODE."""
    head = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(answers), len(authority), len(additional))
    return head + wire_name(name) + struct.pack("!HH", qtype, 1) + b"".join(answers + authority + additional)


def a(ip: str) -> bytes:
    return rr(b"\xc0\x0c", 1, bytes(map(int, ip.split("."))))


def aaaa(packed: bytes) -> bytes:
    return rr(b"\xc0\x0c", 28, packed)


SOA = rr(b"\xc0\x0c", 6, wire_name("ns.test") + wire_name("hostmaster.test") + struct.pack("!IIIII", 1, 2, 3, 4, 5))
OPT = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)  # EDNS0 (RFC 6891), no options


def asked(t: object, name: str | bytes, qtype: int, resp: bytes, ms: int = 2) -> None:
    q = query(name.decode("latin-1") if isinstance(name, bytes) else name, qtype)
    t.handle_event(paired(contract.DNS, F_OUTBOUND, q, resp, ms=ms))  # type: ignore[attr-defined]


def outbound(t: object) -> dict[tuple[str, str, str], float]:
    return {(d["request_type"], d["domain"], d["status"]): v
            for (n, lb), v in samples(t).items() if n == "container_dns_requests_total"  # type: ignore[arg-type]
            for d in [dict(lb)]}


def fqdns(t: object) -> dict[str, str]:
    return {d["ip"]: d["fqdn"] for (n, lb), _ in samples(t).items() if n == "ip_to_fqdn"  # type: ignore[arg-type]
            for d in [dict(lb)]}


def test_request_types_are_dnsmessages_names_or_the_types_number() -> None:
    t, _, _ = tracer()
    srv = rr(b"\xc0\x0c", 33, struct.pack("!HHH", 0, 5, 5432) + wire_name("db1.svc.test"))
    asked(t, "_pg._tcp.svc.test", 33, response("_pg._tcp.svc.test", 33, answers=(srv,)))
    txt = rr(b"\xc0\x0c", 16, b"\x05hello\x05world")
    asked(t, "txt.test", 16, response("txt.test", 16, answers=(txt, OPT)))
    asked(t, "mx.test", 15, response("mx.test", 15, answers=(rr(b"\xc0\x0c", 15, b"\0\x0a" + wire_name("m.test")),)))
    asked(t, "https.test", 65, response("https.test", 65, authority=(SOA,)))  # HTTPS: no name in v0.46.0
    asked(t, "caa.test", 257, response("caa.test", 257, rcode=3, authority=(SOA,)))
    asked(t, "any.test", 255, response("any.test", 255, rcode=4))
    assert outbound(t) == {("TypeSRV", "_pg._tcp.svc.test", "ok"): 1, ("TypeTXT", "txt.test", "ok"): 1,
                           ("TypeMX", "mx.test", "ok"): 1, ("65", "https.test", "ok"): 1,
                           ("257", "caa.test", "nxdomain"): 1, ("TypeALL", "any.test", "not_implemented"): 1}
    assert fqdns(t) == {}  # no A or AAAA record: no address
    assert {dns.type_name(n) for n in DNS_REQUEST_TYPES} == set(DNS_REQUEST_TYPES.values())


def test_the_domain_is_the_answers_question_as_sent_without_its_trailing_dot() -> None:
    t, _, _ = tracer()
    # the query asked in lower case, the answer's question (what the node agent reads) in mixed case
    t.handle_event(paired(contract.DNS, F_OUTBOUND, query("svc1.test"),
                          response("SVC1.Test", 1, answers=(a("10.9.0.1"),))))
    asked(t, "", 2, response("", 2, answers=(rr(b"\xc0\x0c", 2, wire_name("a.root-servers.net")),)))  # the root
    assert outbound(t) == {("TypeA", "SVC1.Test", "ok"): 1, ("TypeNS", "", "ok"): 1}
    assert fqdns(t) == {"10.9.0.1": "SVC1.Test"}


def test_domains_are_normalised_as_the_node_agent_does() -> None:
    t, _, _ = tracer()
    asked(t, "1.0.9.10.in-addr.arpa", 12,
          response("1.0.9.10.in-addr.arpa", 12, answers=(rr(b"\xc0\x0c", 12, wire_name("svc1.test")),)))
    asked(t, "ip-10-0-0-1.ec2.internal", 1, response("ip-10-0-0-1.ec2.internal", 1, answers=(a("10.0.0.1"),)))
    asked(t, "db.example.com.svc.cluster.local", 1,
          response("db.example.com.svc.cluster.local", 1, rcode=3, authority=(SOA,)))
    asked(t, "api.example.com", 1, response("api.example.com", 1, answers=(a("10.0.0.2"),)))
    asked(t, "io.test.io.x", 1, response("io.test.io.x", 1, answers=(a("10.0.0.3"),)))
    assert outbound(t) == {("TypePTR", "IP.in-addr.arpa", "ok"): 1, ("TypeA", "IP.ec2.internal", "ok"): 1,
                           ("TypeA", "db.example.com.search_path_suffix", "nxdomain"): 1,
                           ("TypeA", "api.example.com", "ok"): 1, ("TypeA", "io.test.io.search_path_suffix", "ok"): 1}
    assert fqdns(t) == {"10.0.0.1": "IP.ec2.internal", "10.0.0.2": "api.example.com",
                        "10.0.0.3": "io.test.io.search_path_suffix"}
    assert [dns.normalize_fqdn(n, "TypeA") for n in ("com.x", ".com.x", "a.net.b", "ip-1.ec2", "ip-1.eu.x", "x.org")] \
        == ["com.x", ".com.search_path_suffix", "a.net.search_path_suffix", "IP.ec2", "ip-1.eu.x", "x.org"]


def test_empty_aaaa_answers_are_skipped_and_other_empty_answers_count() -> None:
    t, _, _ = tracer()
    asked(t, "v4only.test", 28, response("v4only.test", 28, authority=(SOA,)))  # NOERROR, no data
    cname_only = rr(b"\xc0\x0c", 5, wire_name("v4only.test"))
    asked(t, "alias.test", 28, response("alias.test", 28, answers=(cname_only,)))  # a CNAME, no address
    asked(t, "gone.test", 28, response("gone.test", 28, rcode=3, authority=(SOA,)))  # NXDOMAIN counts
    asked(t, "v6.test", 28, response("v6.test", 28, answers=(aaaa(bytes(15) + b"\x01"),)))
    asked(t, "none.test", 1, response("none.test", 1, authority=(SOA,)))  # an empty A answer counts
    assert outbound(t) == {("TypeAAAA", "gone.test", "nxdomain"): 1, ("TypeAAAA", "v6.test", "ok"): 1,
                           ("TypeA", "none.test", "ok"): 1}
    assert value(t, "container_dns_requests_duration_seconds_total_count") == 3
    assert fqdns(t) == {"::1": "v6.test"}


def test_response_codes_above_five_are_not_counted_and_the_rest_by_name() -> None:
    t, _, _ = tracer()
    for rcode in range(16):
        asked(t, f"r{rcode}.test", 1, response(f"r{rcode}.test", 1, rcode=rcode))
    got = outbound(t)
    assert got == {("TypeA", f"r{rc}.test", name): 1 for rc, name in dns.RCODES.items()}
    assert set(s for _, _, s in got) == set(L7_STATUS["dns"])
    assert value(t, "container_dns_requests_duration_seconds_total_count") == 6


def test_answers_that_dnsmessage_would_not_unpack_are_not_counted() -> None:
    t, _, _ = tracer()
    good = response("ok.test", 1, answers=(a("10.0.0.1"),), additional=(OPT,))
    for bad in (
        good[:-1],  # cut in the OPT record (the additional section must unpack too)
        response("ok.test", 1, answers=(a("10.0.0.1"),))[:-2],  # cut in the A record's address
        struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 0, 0, 0) + b"\x03o.k\x04test\0\0\1\0\1",  # a label holding a dot
        response("ok.test", 1, answers=(rr(b"\xc0\x0c", 16, b"\x09hello"),)),  # TXT string past its record
        response("ok.test", 1, answers=(rr(b"\xc0\x40", 1, b"\x0a\0\0\x01"),)),  # a pointer past the message
        struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 0, 0, 0) + b"\x40abc\0" + b"\0\1\0\1",  # reserved label type
    ):
        asked(t, "ok.test", 1, bad)
    assert outbound(t) == {} and value(t, "container_dns_requests_duration_seconds_total_count") == 0
    asked(t, "ok.test", 1, good + b"\0\0")  # bytes after the last record: dnsmessage does not look
    assert outbound(t) == {("TypeA", "ok.test", "ok"): 1}


def test_an_answer_cut_at_the_kernels_response_bytes_keeps_its_question_and_leading_addresses() -> None:
    """The kernel keeps contract.RESP_MAX bytes of an answer; the node agent keeps 1023 and
    reads all of an answer this long, so its question and the addresses we have count."""
    t, _, _ = tracer()
    many = tuple(a(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(40))  # 12 + 13 + 40 * 16 bytes
    full = response("many.test", 1, answers=many)
    assert len(full) > contract.RESP_MAX
    asked(t, "many.test", 1, full[:contract.RESP_MAX])
    assert outbound(t) == {("TypeA", "many.test", "ok"): 1}
    assert len(fqdns(t)) == (contract.RESP_MAX - 12 - 15) // 16
    m = dns.parse(full[:contract.RESP_MAX])
    assert m is not None and not m.complete
    assert dns.parse(full[:contract.RESP_MAX - 1]) is None  # shorter than the kernel's cut: the sender's
    assert dns.parse(full[:contract.RESP_MAX + 1]) is None  # longer: not the kernel's cut either


def test_domains_past_the_cap_count_as_tilde_other_and_the_empty_domain_is_never_capped() -> None:
    t, _, _ = tracer()  # Settings().max_fqdns: 50, the node agent's --max-fqdns-per-container default
    for i in range(52):
        asked(t, f"d{i}.test", 1, response(f"d{i}.test", 1, answers=(a(f"10.2.0.{i + 1}"),)))
    asked(t, "", 1, response("", 1, rcode=3))
    asked(t, "d0.test", 1, response("d0.test", 1, rcode=2))
    got = outbound(t)
    assert got[("TypeA", DNS_OVERFLOW_DOMAIN, "ok")] == 2 and got[("TypeA", "", "nxdomain")] == 1
    assert got[("TypeA", "d0.test", "servfail")] == 1
    assert len([k for k in got if k[1] not in ("", DNS_OVERFLOW_DOMAIN)]) == 51  # 50 domains: ok, d0 servfail
    assert fqdns(t)["10.2.0.52"] == "d51.test"  # the address still maps to its own domain


def test_ip_to_fqdn_hides_domains_answering_with_several_public_addresses() -> None:
    t, _, _ = tracer()
    asked(t, "cdn.example", 1, response("cdn.example", 1, answers=(a("93.184.216.34"), a("93.184.216.35"))))
    asked(t, "one.example", 1, response("one.example", 1, answers=(a("93.184.216.36"),)))
    asked(t, "mixed.example", 1, response("mixed.example", 1, answers=(a("93.184.216.37"), a("10.3.0.1"))))
    mapped = bytes(10) + b"\xff\xff" + bytes([1, 2, 3, 4])
    asked(t, "mapped.example", 28, response("mapped.example", 28, answers=(aaaa(mapped),)))
    assert fqdns(t) == {"93.184.216.36": "one.example", "93.184.216.37": "mixed.example", "10.3.0.1": "mixed.example",
                        "::ffff:1.2.3.4": "mapped.example"}
    # a later answer with one address shows it again
    asked(t, "cdn.example", 1, response("cdn.example", 1, answers=(a("93.184.216.34"),)))
    assert fqdns(t)["93.184.216.34"] == "cdn.example" and "93.184.216.35" not in fqdns(t)


def test_zero_durations_count_but_are_not_observed() -> None:
    t, _, _ = tracer()
    asked(t, "z.test", 1, response("z.test", 1, answers=(a("10.0.0.1"),)), ms=0)
    assert outbound(t) == {("TypeA", "z.test", "ok"): 1}
    assert value(t, "container_dns_requests_duration_seconds_total_count") == 0


def test_outbound_families_are_the_node_agents() -> None:
    t, _, _ = tracer()
    asked(t, "svc.test", 1, response("svc.test", 1, answers=(a("10.0.0.1"),)))
    f = Families(dict.fromkeys(CONST_LABELS, "x"))
    t.collect(f)
    got = {}
    for fam in f:
        if fam.name.startswith("container_dns_requests") or fam.name == "ip_to_fqdn":
            name = fam.name + "_total" if fam.type == "counter" else fam.name
            got[name] = (fam.type, {frozenset(s.labels) - {"le"} for s in fam.samples})
    assert set(got) == {"container_dns_requests_total", "container_dns_requests_duration_seconds_total", "ip_to_fqdn"}
    for name, (kind, sets) in got.items():
        want_kind, want_labels = FAMILIES[name]
        assert kind == want_kind and sets == {want_labels | CONST_LABELS}, name


REAL = (response("svc1.test", 1, answers=(a("10.9.0.1"),), additional=(OPT,)),
        response("_pg._tcp.svc.test", 33, answers=(rr(b"\xc0\x0c", 33, struct.pack("!HHH", 0, 5, 5432)
                                                        + wire_name("db1.svc.test")),)),
        response("gone.test", 28, rcode=3, authority=(SOA,)))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REAL), st.integers(0, 120), st.binary(max_size=8))
def test_truncated_and_mangled_real_answers_never_raise(resp: bytes, cut: int, tail: bytes) -> None:
    t, _, _ = tracer()
    for data in (resp[:cut], resp[:cut] + tail, tail + resp[cut:]):
        dns.parse(data)
        asked(t, "svc1.test", 1, data)
    assert all(s in L7_STATUS["dns"] for _, _, s in outbound(t))


def test_ip_to_fqdn_forgets_addresses_no_container_connected_to_every_gc_interval() -> None:
    """containers/registry.go:194-226: every gcInterval (10 minutes, containers/container.go:32)
    the entries of addresses outside every container's recent connection attempts go."""
    t, conns, _ = tracer()
    asked(t, "a.test", 1, response("a.test", 1, answers=(a("10.4.0.1"), a("10.4.0.2"))))
    asked(t, "b.test", 28, response("b.test", 28, answers=(aaaa(bytes(15) + b"\x02"),)))
    conns.add(100, 9, 77, "10.4.0.2", 443, actual="10.4.0.2:443")
    t.tick(1000.0, [])  # the first tick starts the clock
    assert set(fqdns(t)) == {"10.4.0.1", "10.4.0.2", "::2"}
    t.tick(1000.0 + tracer_mod.FQDN_GC_SECONDS - 1, [])
    assert set(fqdns(t)) == {"10.4.0.1", "10.4.0.2", "::2"}
    t.tick(1000.0 + tracer_mod.FQDN_GC_SECONDS, [])
    assert fqdns(t) == {"10.4.0.2": "a.test"}
    assert outbound(t) == {("TypeA", "a.test", "ok"): 1, ("TypeAAAA", "b.test", "ok"): 1}  # counts stay
