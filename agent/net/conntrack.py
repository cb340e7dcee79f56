"""actual_destination: where a connection really goes after NAT, from the connecting process's
network namespace's conntrack table (/proc/PID/net/nf_conntrack). Reads only."""

from __future__ import annotations

import ipaddress
import os

Tuple = tuple[str, int, str, int]  # src, sport, dst, dport


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def parse(text: str) -> dict[Tuple, tuple[str, int]]:
    """TCP entries: original (src, sport, dst, dport) -> the reply's source (ip, port), which is
    the real peer when a DNAT rewrote the destination."""
    out: dict[Tuple, tuple[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[2] != "tcp":
            continue
        kv = [p.partition("=") for p in parts if "=" in p]
        src = [v for k, _, v in kv if k == "src"]
        dst = [v for k, _, v in kv if k == "dst"]
        sport = [v for k, _, v in kv if k == "sport"]
        dport = [v for k, _, v in kv if k == "dport"]
        if len(src) < 2 or len(sport) < 2:
            continue
        try:
            out[(_ip(src[0]), int(sport[0]), _ip(dst[0]), int(dport[0]))] = (_ip(src[1]), int(sport[1]))
        except ValueError:
            continue
    return out


class Conntrack:
    """Per network namespace, an open handle on its conntrack table: opened through a process
    of that namespace when its first connection is seen (the process may be gone by the time
    the connection is resolved; the handle still reads its namespace). Tables are read in
    batches: one read per namespace however many connections wait (a connect storm costs one
    read per housekeeping tick). At most `max_namespaces` handles are kept."""

    def __init__(self, procfs: str = "/proc", max_namespaces: int = 256) -> None:
        self.procfs = procfs
        self.max_namespaces = max_namespaces
        self._files: dict[int, int] = {}  # netns inode -> fd
        self.reads = 0

    def netns_of(self, pid: int) -> int | None:
        """The namespace of pid, with its conntrack table opened if it was not yet."""
        try:
            netns = os.stat(f"{self.procfs}/{pid}/ns/net").st_ino
        except OSError:
            return None
        if netns not in self._files:
            if len(self._files) >= self.max_namespaces:
                self.close()
            try:
                self._files[netns] = os.open(f"{self.procfs}/{pid}/net/nf_conntrack", os.O_RDONLY)
            except OSError:
                self._files[netns] = -1  # conntrack not available there
        return netns

    def _read(self, fd: int) -> str:
        chunks: list[bytes] = []
        offset = 0
        while True:
            b = os.pread(fd, 1 << 16, offset)
            if not b:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(b)
            offset += len(b)

    def resolve(self, items: list[tuple[int | None, Tuple]]) -> list[tuple[str, int] | None]:
        """For each (netns, original tuple): the post-NAT peer, or None when conntrack has no
        entry for it (no NAT involved, or conntrack not loaded)."""
        tables: dict[int, dict[Tuple, tuple[str, int]]] = {}
        out: list[tuple[str, int] | None] = []
        for netns, key in items:
            fd = self._files.get(netns, -1) if netns is not None else -1
            if netns is None or fd < 0:
                out.append(None)
                continue
            table = tables.get(netns)
            if table is None:
                try:
                    table = parse(self._read(fd))
                    self.reads += 1
                except OSError:
                    table = {}
                tables[netns] = table
            out.append(table.get(key))
        return out

    def close(self) -> None:
        for fd in self._files.values():
            if fd >= 0:
                os.close(fd)
        self._files.clear()
