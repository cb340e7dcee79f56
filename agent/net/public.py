"""Which destinations get labelled (Coroot's --track-public-network semantics): private,
CGNAT and loopback addresses always; link-local never; a public address only inside one of
the configured prefixes. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

_ALWAYS = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private
    "100.64.0.0/10",  # CGNAT
    "127.0.0.0/8", "::1/128",  # loopback
    "fc00::/7",  # unique local
)]
_NEVER = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10")]


def normalize(ip: IP) -> IP:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_external(ip: str) -> bool:
    """common.IsIpExternal (common/net.go:50-63): neither loopback nor private (RFC 1918,
    100.64/10, fc00::/7): the ranges that are always tracked. Link-local counts as external
    there too."""
    a = ipaddress.ip_address(ip)
    return not any(a.version == n.version and a in n for n in _ALWAYS)


class PublicFilter:
    def __init__(self, tracked: Iterable[str]) -> None:
        self.tracked = [ipaddress.ip_network(n, strict=False) for n in tracked]

    def should_track(self, ip: IP) -> bool:
        ip = normalize(ip)
        if any(ip.version == n.version and ip in n for n in _NEVER):
            return False
        if any(ip.version == n.version and ip in n for n in _ALWAYS):
            return True
        return any(ip.version == n.version and ip in n for n in self.tracked)
