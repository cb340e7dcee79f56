"""DNS over UDP and TCP (RFC 1035): query type and name, response code, and the A/AAAA answers
that feed ip_to_fqdn."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

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
