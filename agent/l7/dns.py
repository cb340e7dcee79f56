"""DNS over UDP and TCP (RFC 1035): query type and name, response code, and the A/AAAA answers
that feed ip_to_fqdn."""

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


OTHER_DOMAIN = "other"  # requests for domains beyond a container's cap are counted here
MAX_FQDNS = 10_000  # ip -> name entries kept from answers (LRU)


class Dns(p.Protocol):
    """DNS clients: container_dns_requests_total by query type, domain and response code (the
    domains of a container capped), its histogram, and ip_to_fqdn from the answers, which also
    names span peers. Recognised in the kernel by the socket (connected to port 53), not by
    bytes: bpf/include/l7/dns.h only tells queries from answers."""

    id = contract.DNS
    name = "dns"
    stem = None

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._hist: dict[str, Hist] = defaultdict(Hist)
        self._domains: dict[str, set[str]] = defaultdict(set)
        self.fqdn: OrderedDict[str, str] = OrderedDict()  # ip -> name, from answers

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        q = parse(request)
        if q is None:
            return []
        r = parse(response)
        if r is not None:
            for ip, name in r.answers:
                self.fqdn[ip] = name
                self.fqdn.move_to_end(ip)
            while len(self.fqdn) > MAX_FQDNS:
                self.fqdn.popitem(last=False)
        return [p.Request(self.id, r.rcode if r is not None else "unknown", seconds, q.qtype, q.domain)]

    def record(self, container_id: str, requests: list[p.Request]) -> None:
        domains = self._domains[container_id]
        for r in requests:
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
        for ip, name in self.fqdn.items():
            f.gauge("ip_to_fqdn", "an IP address and the name a DNS answer gave it", 1, ip=ip, fqdn=name)

    def rename(self, old: str, new: str) -> None:
        def hist(kept: Hist, moved: Hist) -> Hist:
            kept.merge(moved)
            return kept

        rekey(self._counts, old, new, lambda a, b: a + b)
        rekey(self._hist, old, new, hist)
        rekey(self._domains, old, new, lambda a, b: a | b)

    def forget(self, containers: set[str]) -> None:
        for k in [k for k in self._counts if k[0] in containers]:
            del self._counts[k]
        for cid in containers:
            self._domains.pop(cid, None)
            self._hist.pop(cid, None)
