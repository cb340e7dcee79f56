"""DNS over UDP and TCP (RFC 1035), counted as the Go node agent counts it.

A client's request is judged by its answer alone, as the node agent's ParseDns
(ebpftracer/l7/dns.go) reads it with golang.org/x/net/dns/dnsmessage (v0.46.0): the whole
message must unpack (header, every question, every record of every section); the first
question gives the request type (dnsmessage's Type.String(): "TypeA", ..., "TypeALL", or the
bare number of a type it has no name for, "65" for HTTPS) and the domain (the name as sent,
case kept, without its trailing dot), normalised by common.NormalizeFQDN (common/net.go:273).
containers/container.go onDNSRequest (755-808) then drops a response code above 5 (its status
would be ""), an answer that does not unpack, and a NOERROR AAAA answer without addresses;
the rest count as container_dns_requests_total{request_type, domain, status}, a container's
domains beyond --max-fqdns-per-container as "~other" (an empty domain is never capped), and
every non-zero duration goes to the histogram. The A/AAAA answers map each address to the
normalised domain (common.NewDomain): ip_to_fqdn shows the addresses of a domain unless it
answered with several addresses that are all public (registry.go:150-157).
A DNS server's queries count by the answer's response code alone (inbound_status).
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from agent.containers.registry import rekey
from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.hist import Hist
from agent.metrics import Families

# dnsmessage's typeNames (message.go:45-61); any other type prints as its number
TYPES = {1: "TypeA", 2: "TypeNS", 5: "TypeCNAME", 6: "TypeSOA", 12: "TypePTR", 15: "TypeMX", 16: "TypeTXT",
         28: "TypeAAAA", 33: "TypeSRV", 41: "TypeOPT", 11: "TypeWKS", 13: "TypeHINFO", 14: "TypeMINFO",
         252: "TypeAXFR", 255: "TypeALL"}
# l7.Status.DNS() (ebpftracer/l7/l7.go:135-151): any other response code is "" and not counted
RCODES = {0: "ok", 1: "format_error", 2: "servfail", 3: "nxdomain", 4: "not_implemented", 5: "refused"}
OTHER_DOMAIN = "~other"  # containers/container.go:753 fqdnOverflowLabel
MAX_FQDNS = 10_000  # ip -> name entries kept from answers (LRU)
NAME_MAX = 254  # dnsmessage nonEncodedNameMax: the dotted name, trailing dot included
_SUFFIXES = frozenset({"com", "net", "org", "io"})
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                                               "127.0.0.0/8", "::1/128", "fc00::/7")]


def type_name(qtype: int) -> str:
    return TYPES.get(qtype, str(qtype))


class _Short(Exception):
    """The message goes on past the bytes there are."""


class _Bad(Exception):
    """The message is malformed where it is."""


@dataclass(frozen=True)
class Message:
    id: int
    response: bool
    rcode: int  # the header's RCODE
    qtype: str  # the first question's type, as the node agent names it
    name: str  # the first question's name without its trailing dot, bytes as sent (undecodable ones escaped)
    ips: tuple[str, ...] = ()  # addresses of the A and AAAA records of the answer section, in order
    complete: bool = True  # False: cut at the kernel's response bytes (see parse)


def _u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise _Short
    return (data[pos] << 8) | data[pos + 1]


def _name(data: bytes, pos: int) -> tuple[bytes, int]:
    """A name as dnsmessage's Name.unpack reads it: labels joined with their dots, at most 10
    compression pointers (anywhere in the message), no label holding a dot, no 0x40/0x80 prefix."""
    out = bytearray()
    cur, after, pointers = pos, -1, 0
    while True:
        if cur >= len(data):
            raise _Short
        c = data[cur]
        cur += 1
        if c == 0:
            break
        kind = c & 0xC0
        if kind == 0:
            end = cur + c
            if end > len(data):
                raise _Short
            label = data[cur:end]
            if b"." in label:
                raise _Bad
            out += label
            out += b"."
            cur = end
        elif kind == 0xC0:
            if cur >= len(data):
                raise _Short
            target = ((c & 0x3F) << 8) | data[cur]
            cur += 1
            if pointers == 0:
                after = cur
            pointers += 1
            if pointers > 10:
                raise _Bad
            cur = target
        else:
            raise _Bad
    if not out:
        out += b"."
    if len(out) > NAME_MAX:
        raise _Bad
    return bytes(out), (after if pointers else cur)


def _ip(raw: bytes) -> str:
    """An address as the node agent prints it (netaddr): an IPv4-mapped IPv6 one keeps its
    dotted tail."""
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    a = ipaddress.IPv6Address(raw)
    return f"::ffff:{a.ipv4_mapped}" if a.ipv4_mapped is not None else str(a)


def _body(data: bytes, pos: int, rtype: int, length: int) -> None:
    """Checks a record's data as dnsmessage's unpackResourceBody does (it reads the known types'
    fields from the message, not bounded by the record's length)."""
    if rtype in (2, 5, 12):  # NS, CNAME, PTR
        _name(data, pos)
    elif rtype == 6:  # SOA: two names, five 32-bit numbers
        pos = _name(data, pos)[1]
        pos = _name(data, pos)[1]
        if pos + 20 > len(data):
            raise _Short
    elif rtype in (15, 33):  # MX: preference, name; SRV: priority, weight, port, name
        pos += 2 if rtype == 15 else 6
        if pos > len(data):
            raise _Short
        _name(data, pos)
    elif rtype == 16:  # TXT: strings filling the record exactly
        n = 0
        while n < length:
            if pos >= len(data):
                raise _Short
            size = data[pos]
            if pos + 1 + size > len(data):
                raise _Short
            if length - n < size + 1:
                raise _Bad
            n += size + 1
            pos += 1 + size
    elif rtype == 41:  # OPT: options filling the record
        end = pos + length
        while pos < end:
            _u16(data, pos)  # code
            olen = _u16(data, pos + 2)
            pos += 4
            if pos + olen > len(data):
                raise _Short
            pos += olen
    else:
        size = {1: 4, 28: 16}.get(rtype, length)
        if pos + size > len(data):
            raise _Short


def parse(data: bytes, tcp: bool = False) -> Message | None:
    """The message as the node agent takes it (None: dnsmessage would not unpack it). A message
    of exactly contract.RESP_MAX bytes that runs past them is the kernel's cut, not the
    sender's: its question and the addresses before the cut are taken (complete=False), as the
    node agent, which keeps 1023 bytes of a response, reads the whole of most such answers."""
    try:
        if tcp:
            length = _u16(data, 0)
            data = data[2:2 + length]
        if len(data) < 12:
            return None
        ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data, 0)
    except (_Short, struct.error):
        return None
    question: tuple[str, str] | None = None
    ips: list[str] = []
    try:
        pos = 12
        for _ in range(qd):
            raw, pos = _name(data, pos)
            qtype = _u16(data, pos)
            _u16(data, pos + 2)
            pos += 4
            if question is None:
                question = (type_name(qtype), raw[:-1].decode("utf-8", "surrogateescape"))
        for i in range(an + ns + ar):
            pos = _name(data, pos)[1]
            if pos + 10 > len(data):
                raise _Short
            rtype, _cls, _ttl, length = struct.unpack_from("!HHIH", data, pos)
            pos += 10
            _body(data, pos, rtype, length)
            if i < an and rtype in (1, 28):
                ips.append(_ip(data[pos:pos + (4 if rtype == 1 else 16)]))
            pos += length
    except _Bad:
        return None
    except _Short:
        if question is None or len(data) != contract.RESP_MAX:
            return None
        return Message(ident, bool(flags & 0x8000), flags & 0xF, question[0], question[1], tuple(ips), False)
    if question is None:
        return None  # no question: ParseDns returns nothing
    return Message(ident, bool(flags & 0x8000), flags & 0xF, question[0], question[1], tuple(ips))


def normalize_fqdn(fqdn: str, qtype: str) -> str:
    """common.NormalizeFQDN: every PTR lookup is one domain, EC2 host names lose their address,
    and a name that goes on past a "com", "net", "org" or "io" label (not its first) is cut
    there: "api.example.com.svc.cluster.local" is "api.example.com.search_path_suffix"."""
    if qtype == "TypePTR":
        return "IP.in-addr.arpa"
    if fqdn.startswith("ip-"):
        dot = fqdn.find(".")
        if dot > 0 and fqdn[dot + 1:].startswith("ec2"):
            return "IP.ec2" + fqdn[dot + 4:]
    labels = fqdn.split(".")
    end = 0
    for i, label in enumerate(labels[:-1]):
        end += len(label)
        if i > 0 and label in _SUFFIXES:
            return fqdn[:end] + ".search_path_suffix"
        end += 1
    return fqdn


def is_external(ip: str) -> bool:
    """common.IsIpExternal: neither loopback nor private (RFC 1918, 100.64/10, fc00::/7)."""
    a = ipaddress.ip_address(ip)
    return not any(a.version == n.version and a in n for n in _PRIVATE)


def specify_ip(ips: tuple[str, ...]) -> bool:
    """common.NewDomain's SpecifyIP: False when the answer had several addresses, all external."""
    return not (len(ips) > 1 and all(is_external(ip) for ip in ips))


def label_ok(value: str) -> bool:
    """Prometheus takes a label value only as valid UTF-8 (the node agent's counter is not
    incremented for a domain that is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def header_rcode(query: bytes, answer: bytes) -> int:
    """The answer's response code when both headers are what the node agent's kernel side takes
    for a DNS pair (a query, then an answer: opcode QUERY and one question each), else -1. A
    server's requests are counted on this alone: the node agent never parses their bodies."""
    if len(query) < 6 or len(answer) < 6:
        return -1
    if query[2] & 0x80 or not answer[2] & 0x80 or (query[2] | answer[2]) & 0x78:
        return -1
    if query[4:6] != b"\0\1" or answer[4:6] != b"\0\1":
        return -1
    return answer[3] & 0xF


def inbound_status(rcode: int) -> str:
    """The node agent's status label of a server's DNS request: the response code taken as its
    generic L7 status (l7.Status.String()), so NOERROR (0) is "unknown" and any other code its
    number ("3" for NXDOMAIN); not the outbound family's names."""
    return "unknown" if rcode == 0 else str(rcode)


@dataclass
class DnsRequest(p.Request):
    ips: tuple[str, ...] = ()  # the answer's A and AAAA addresses


class Dns(p.Protocol):
    """DNS clients: container_dns_requests_total by request type, domain and status, its
    histogram, and ip_to_fqdn, all as the module's docstring says. DNS servers:
    container_dns_inbound_requests_total by status (see inbound_status) and its histogram, as
    the node agent counts them. Recognised in the kernel by the socket (connected to port 53: a
    client; bound to it: a server), not by bytes: bpf/include/l7/dns.h only tells queries from
    answers."""

    id = contract.DNS
    name = "dns"
    stem = None

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._hist: dict[str, Hist] = defaultdict(Hist)
        self._domains: dict[str, set[str]] = defaultdict(set)
        self.fqdn: OrderedDict[str, str] = OrderedDict()  # ip -> normalised domain, from answers
        self._unshown: set[str] = set()  # addresses of domains ip_to_fqdn does not show (specify_ip)
        self._in_counts: dict[tuple[str, str], int] = defaultdict(int)  # (container, status)
        self._in_hist: dict[str, Hist] = defaultdict(Hist)

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        """One request; its `code` is the answer's response code by the header checks alone
        (-1: not a pair the node agent's kernel side takes), its `method` empty when the answer
        does not unpack (a server counts it, a client does not)."""
        rcode = header_rcode(request, response)
        if rcode < 0:
            return []
        m = parse(response)
        if m is None:
            return [DnsRequest(self.id, "", seconds, code=rcode)]
        return [DnsRequest(self.id, RCODES.get(rcode, ""), seconds, m.qtype, normalize_fqdn(m.name, m.qtype),
                           code=rcode, ips=m.ips)]

    def record(self, container_id: str, requests: list[p.Request], outbound: bool = True) -> None:
        if not outbound:
            for r in requests:
                if r.code < 0:
                    continue
                self._in_counts[(container_id, inbound_status(r.code))] += 1
                if r.duration > 0:  # the node agent observes non-zero durations only
                    self._in_hist[container_id].observe(r.duration)
            return
        domains = self._domains[container_id]
        for r in requests:
            if not r.method or not r.status or not isinstance(r, DnsRequest):
                continue  # the answer did not unpack, or its response code is above 5
            if r.method == "TypeAAAA" and r.code == 0 and not r.ips:
                continue  # an empty AAAA answer: the node agent skips it (container.go:766-771)
            domain = label = r.path
            if domain and domain not in domains:
                if len(domains) < self.settings.max_fqdns:
                    domains.add(domain)
                else:
                    label = OTHER_DOMAIN
            if label_ok(label):
                self._counts[(container_id, r.method, label, r.status)] += 1
            if r.duration > 0:
                self._hist[container_id].observe(r.duration)
            if domain and r.ips:
                shown = specify_ip(r.ips)
                for ip in r.ips:
                    self.fqdn[ip] = domain
                    self.fqdn.move_to_end(ip)
                    if shown:
                        self._unshown.discard(ip)
                    else:
                        self._unshown.add(ip)
                while len(self.fqdn) > MAX_FQDNS:
                    self._unshown.discard(self.fqdn.popitem(last=False)[0])

    def collect(self, f: Families, apps: dict[str, str]) -> None:
        for (cid, qtype, domain, status), n in self._counts.items():
            if cid in apps:
                f.counter("container_dns_requests_total", "DNS requests", n, container_id=cid,
                          app_id=apps[cid], request_type=qtype, domain=domain, status=status)
        for cid, h in self._hist.items():
            if cid in apps:
                f.histogram("container_dns_requests_duration_seconds_total", "DNS requests by duration", h,
                            container_id=cid, app_id=apps[cid])
        for (cid, status), n in self._in_counts.items():
            if cid in apps:
                f.counter("container_dns_inbound_requests_total", "inbound DNS requests", n, container_id=cid,
                          app_id=apps[cid], status=status)
        for cid, h in self._in_hist.items():
            if cid in apps:
                f.histogram("container_dns_inbound_requests_duration_seconds_total", "inbound DNS requests by duration",
                            h, container_id=cid, app_id=apps[cid])
        for ip, name in self.fqdn.items():
            if ip not in self._unshown and label_ok(name):
                f.gauge("ip_to_fqdn", "an IP address and the name a DNS answer gave it", 1, ip=ip, fqdn=name)

    def gc(self, active: set[str]) -> None:
        """Forget the addresses no container connected to lately (`active`: the TCP tracker's
        destination_ips), as the node agent's registry does every gcInterval."""
        for ip in [ip for ip in self.fqdn if ip not in active]:
            del self.fqdn[ip]
            self._unshown.discard(ip)

    def rename(self, old: str, new: str) -> None:
        def hist(kept: Hist, moved: Hist) -> Hist:
            kept.merge(moved)
            return kept

        rekey(self._counts, old, new, lambda a, b: a + b)
        rekey(self._hist, old, new, hist)
        rekey(self._domains, old, new, lambda a, b: a | b)
        rekey(self._in_counts, old, new, lambda a, b: a + b)
        rekey(self._in_hist, old, new, hist)

    def forget(self, containers: set[str]) -> None:
        for k in [k for k in self._counts if k[0] in containers]:
            del self._counts[k]
        for k2 in [k for k in self._in_counts if k[0] in containers]:
            del self._in_counts[k2]
        for cid in containers:
            self._domains.pop(cid, None)
            self._hist.pop(cid, None)
            self._in_hist.pop(cid, None)
