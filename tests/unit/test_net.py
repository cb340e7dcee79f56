"""Public-network filter, conntrack parsing, /proc/net/tcp address decoding."""

import ipaddress

import pytest

from agent.net.conntrack import parse
from agent.net.public import PublicFilter
from agent.net.tcp import _hex_addr, endpoint


@pytest.mark.parametrize(("ip", "tracked"), [
    ("10.1.2.3", True), ("172.20.0.1", True), ("192.168.1.1", True), ("100.64.0.1", True),
    ("127.0.0.1", True), ("::1", True), ("fd00::1", True),
    ("169.254.169.254", False), ("fe80::1", False),
    ("203.0.113.5", True), ("198.51.100.5", False), ("8.8.8.8", False),
    ("::ffff:203.0.113.9", True), ("::ffff:10.0.0.1", True), ("2001:db8::1", False),
])
def test_only_private_or_listed_destinations_are_tracked(ip: str, tracked: bool) -> None:
    f = PublicFilter(["203.0.113.0/24"])
    assert f.should_track(ipaddress.ip_address(ip)) is tracked


def test_default_tracks_every_public_ipv4() -> None:
    f = PublicFilter(["0.0.0.0/0"])
    assert f.should_track(ipaddress.ip_address("8.8.8.8"))
    assert not f.should_track(ipaddress.ip_address("169.254.1.1"))
    assert not f.should_track(ipaddress.ip_address("2001:4860::8888"))


def test_conntrack_reply_source_is_the_real_peer() -> None:
    text = (
        "ipv4     2 tcp      6 117 TIME_WAIT src=10.201.5.1 dst=10.201.5.100 sport=40000 dport=80 "
        "src=10.201.5.2 dst=10.201.5.1 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2\n"
        "ipv4     2 udp      17 20 src=10.0.0.1 dst=10.0.0.53 sport=5353 dport=53 src=10.0.0.53 dst=10.0.0.1 sport=53 dport=5353 mark=0 use=1\n"
        "ipv6     10 tcp      6 431999 ESTABLISHED src=fd00:0:0:0:0:0:0:1 dst=fd00::2 sport=1 dport=2 "
        "src=fd00::2 dst=fd00::1 sport=2 dport=1 [ASSURED] mark=0 use=2\n"
        "garbage line\n"
    )
    table = parse(text)
    assert table == {
        ("10.201.5.1", 40000, "10.201.5.100", 80): ("10.201.5.2", 8080),
        ("fd00::1", 1, "fd00::2", 2): ("fd00::2", 2),
    }


def test_proc_net_tcp_addresses() -> None:
    assert _hex_addr("0100007F:1F90") == ("127.0.0.1", 8080)
    assert _hex_addr("00000000000000000000000001000000:0050") == ("::1", 80)
    assert _hex_addr("0000000000000000FFFF00000201A8C0:01BB") == ("192.168.1.2", 443)
    assert endpoint("::1", 80) == "[::1]:80" and endpoint("10.0.0.1", 5432) == "10.0.0.1:5432"
