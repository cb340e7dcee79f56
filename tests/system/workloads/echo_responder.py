"""An ICMP echo responder that answers after a fixed delay, for the pinger's tests: run it in a
network namespace whose kernel does not answer echo requests itself
(net.ipv4.icmp_echo_ignore_all=1, which this sets), so every reply there is this one's. It
stands in for a network delay because this machine's kernel has no netem.

    echo_responder DELAY_SECONDS

Prints "ready" once listening. Run it under a real-time policy (chrt) on a loaded machine: the
reply leaves when the process wakes.
"""

from __future__ import annotations

import heapq
import select
import socket
import struct
import subprocess
import sys
import time

SO_TIMESTAMPNS = 35


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def main() -> None:
    delay = float(sys.argv[1])
    subprocess.run(["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"], check=True)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    pending: list[tuple[float, bytes, str]] = []  # (when to send, reply, peer): a heap
    print("ready", flush=True)
    while True:
        wait = max(0.0, pending[0][0] - time.time()) if pending else None
        if select.select([s], [], [], wait)[0]:
            data, anc, _, (peer, _) = s.recvmsg(2048, socket.CMSG_SPACE(16))
            icmp = data[(data[0] & 0x0F) * 4:]
            if len(icmp) < 8 or icmp[0] != 8:  # echo requests only (our own replies come back too)
                continue
            # the delay counts from the kernel's arrival time, not from when this process woke
            arrived = next((sec + nsec / 1e9 for level, kind, d in anc
                            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS
                            for sec, nsec in [struct.unpack_from("@qq", d)]), time.time())
            _, _, _, ident, seq = struct.unpack_from("!BBHHH", icmp)
            head = struct.pack("!BBHHH", 0, 0, 0, ident, seq)
            reply = struct.pack("!BBHHH", 0, 0, checksum(head + icmp[8:]), ident, seq) + icmp[8:]
            heapq.heappush(pending, (arrived + delay, reply, peer))
        while pending and pending[0][0] <= time.time():
            _, reply, peer = heapq.heappop(pending)
            s.sendto(reply, (peer, 0))


if __name__ == "__main__":
    main()
