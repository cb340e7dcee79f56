"""DNS over UDP and TCP (RFC 1035): query type and name, response code, and the A/AAAA answers
that feed ip_to_fqdn; a DNS server's queries counted by the answer's response code."""

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

TYPES = {1: "TypeA", 2: "TypeNS", 5: "TypeCNAME", 6: "TypeSOA", 12: "TypePTR", 15: "TypeMX",
         16: "TypeTXT", 28: "TypeAAAA", 33: "TypeSRV", 65: "TypeHTTPS", 255: "TypeANY"}
RCODES = {0: "ok", 1: "format_error", 2: "servfail", 3: "nxdomain", 4: "not_implemented", 5: "refused"}
_HEADER = struct.Struct("!HHHHHH")


@dataclass(frozen=True)
class Message:
    id: int
    response: bool
    rcode: str
    qtype: str
    domain: str
    answers: tuple[tuple[str, str], ...]  # (ip, name) from A/AAAA records


def _name(data: bytes, pos: int, depth: int = 0) -> tuple[str, int]:
    labels = []
    end = -1
    while True:
        if depth > 16 or pos >= len(data):
            raise ValueError("bad name")
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:  # compression pointer
            ptr = ((n & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            pos, depth = ptr, depth + 1
            continue
        labels.append(data[pos + 1:pos + 1 + n].decode("ascii", errors="replace"))
        pos += 1 + n
    return ".".join(labels).lower(), (end if end >= 0 else pos)


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


def parse(data: bytes, tcp: bool = False) -> Message | None:
    try:
        if tcp:
            (length,) = struct.unpack_from("!H", data, 0)
            data = data[2:2 + length]
        ident, flags, qd, an, _ns, _ar = _HEADER.unpack_from(data, 0)
        if qd != 1 or flags & 0x7800:  # one question, standard query
            return None
        name, pos = _name(data, 12)
        qtype, _qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        answers = []
        for _ in range(min(an, 64)):
            rname, pos = _name(data, pos)
            rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
            pos += 10
            rdata = data[pos:pos + rdlen]
            pos += rdlen
            if rtype == 1 and rdlen == 4:
                answers.append((str(ipaddress.IPv4Address(rdata)), name))
            elif rtype == 28 and rdlen == 16:
                answers.append((str(ipaddress.IPv6Address(rdata)), name))
        return Message(ident, bool(flags & 0x8000), RCODES.get(flags & 0xF, "unknown"),
                       TYPES.get(qtype, f"Type{qtype}"), name, tuple(answers))
    except (ValueError, struct.error, IndexError):
        return None


@dataclass
class DnsRequest(p.Request):
    answers: tuple[tuple[str, str], ...] = ()  # (ip, name): ip_to_fqdn, from a client's answers only


OTHER_DOMAIN = "other"  # requests for domains beyond a container's cap are counted here
MAX_FQDNS = 10_000  # ip -> name entries kept from answers (LRU)


class Dns(p.Protocol):
    """DNS clients: container_dns_requests_total by query type, domain and response code (the
    domains of a container capped), its histogram, and ip_to_fqdn from the answers, which also
    names span peers. DNS servers: container_dns_inbound_requests_total by status (see
    inbound_status) and its histogram, as the node agent counts them. Recognised in the kernel
    by the socket (connected to port 53: a client; bound to it: a server), not by bytes:
    bpf/include/l7/dns.h only tells queries from answers."""

    id = contract.DNS
    name = "dns"
    stem = None

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._hist: dict[str, Hist] = defaultdict(Hist)
        self._domains: dict[str, set[str]] = defaultdict(set)
        self.fqdn: OrderedDict[str, str] = OrderedDict()  # ip -> name, from answers
        self._in_counts: dict[tuple[str, str], int] = defaultdict(int)  # (container, status)
        self._in_hist: dict[str, Hist] = defaultdict(Hist)

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        """One request; its `code` is the answer's response code by the header checks alone
        (-1: not a pair the node agent counts), its `method` empty when the query does not
        parse (a server counts it, a client does not)."""
        rcode = header_rcode(request, response)
        q = parse(request)
        if q is None:
            return [DnsRequest(self.id, "unknown", seconds, code=rcode)] if rcode >= 0 else []
        r = parse(response)
        if r is None:
            return [DnsRequest(self.id, "unknown", seconds, q.qtype, q.domain, code=rcode)]
        return [DnsRequest(self.id, r.rcode, seconds, q.qtype, q.domain, code=rcode, answers=r.answers)]

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
            if not r.method:  # the query did not parse
                continue
            if isinstance(r, DnsRequest):
                for ip, name in r.answers:
                    self.fqdn[ip] = name
                    self.fqdn.move_to_end(ip)
                while len(self.fqdn) > MAX_FQDNS:
                    self.fqdn.popitem(last=False)
            domain = r.path
            if domain not in domains:
                if len(domains) >= self.settings.max_fqdns:
                    domain = OTHER_DOMAIN
                else:
                    domains.add(domain)
            self._counts[(container_id, r.method, domain, r.status)] += 1
            self._hist[container_id].observe(r.duration)

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
            f.gauge("ip_to_fqdn", "an IP address and the name a DNS answer gave it", 1, ip=ip, fqdn=name)

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
