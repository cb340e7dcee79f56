"""Symbolization of sampled addresses: kernel symbols from /proc/kallsyms, user frames from the
ELF .symtab/.dynsym of the mapped file (pyelftools), JIT frames from /tmp/perf-PID.map.

Caches are bounded: ELF symbol tables are kept per binary (device + inode, never per pid) in an
LRU of `max_binaries`; a process's memory map is kept until it execs or exits
(`forget(pid)`), at most `max_processes` of them. An address nothing explains is named as the
node agent's profiler names it (grafana/pyroscope ebpf, with module offsets on):
`<file path>+<hex offset>` inside a mapped file, `[unknown]` elsewhere, never dropped. Reads files; holds no BPF objects.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

from agent.logs import safeopen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    dev: str
    inode: int
    path: str


@dataclass
class SymbolTable:
    addrs: list[int]
    ends: list[int]
    names: list[str]
    segments: list[tuple[int, int, int]]  # (p_offset, p_filesz, p_vaddr) of PT_LOAD

    def lookup(self, vaddr: int) -> str | None:
        i = bisect.bisect_right(self.addrs, vaddr) - 1
        if i >= 0 and (vaddr < self.ends[i] or self.ends[i] == self.addrs[i]):
            return self.names[i]
        return None

    def vaddr(self, file_offset: int) -> int | None:
        for off, size, va in self.segments:
            if off <= file_offset < off + max(size, 1):
                return file_offset - off + va
        return None


def _load_elf(path: str) -> SymbolTable | None:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            segments = [(s["p_offset"], s["p_filesz"], s["p_vaddr"]) for s in elf.iter_segments()
                        if s["p_type"] == "PT_LOAD"]
            syms: dict[int, tuple[int, str]] = {}
            for name in (".symtab", ".dynsym"):
                sec = elf.get_section_by_name(name)
                if not isinstance(sec, SymbolTableSection):
                    continue
                for sym in sec.iter_symbols():
                    if sym["st_info"]["type"] not in ("STT_FUNC", "STT_GNU_IFUNC") or not sym["st_value"]:
                        continue
                    if sym["st_value"] not in syms or syms[sym["st_value"]][0] < sym["st_size"]:
                        syms[sym["st_value"]] = (sym["st_size"], sym.name)
    except (OSError, ELFError, ValueError) as e:
        log.debug("no symbols from %s: %s", path, e)
        return None
    addrs = sorted(syms)
    return SymbolTable(addrs, [a + syms[a][0] for a in addrs], [syms[a][1] for a in addrs], segments)


def read_maps(procfs: str, pid: int) -> list[Mapping]:
    out = []
    try:
        with open(f"{procfs}/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 5 or "x" not in parts[1]:
                    continue  # only executable mappings hold code
                start, end = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5].strip() if len(parts) > 5 else ""
                out.append(Mapping(start, end, int(parts[2], 16), parts[3], int(parts[4]), path))
    except OSError:
        pass
    return out


def read_perf_map(path: str) -> tuple[list[int], list[int], list[str]]:
    """/tmp/perf-PID.map lines: 'START SIZE name' (hex start and size)."""
    entries = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 2)
                if len(parts) == 3:
                    try:
                        entries.append((int(parts[0], 16), int(parts[1], 16), parts[2]))
                    except ValueError:
                        continue
    except OSError:
        pass
    entries.sort()
    return [e[0] for e in entries], [e[0] + e[1] for e in entries], [e[2] for e in entries]


class KernelSymbols:
    def __init__(self, path: str = "/proc/kallsyms") -> None:
        addrs, names = [], []
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        addrs.append(int(parts[0], 16))
                        names.append(parts[2])
        except OSError:
            pass
        order = sorted(range(len(addrs)), key=addrs.__getitem__)
        self.addrs = [addrs[i] for i in order]
        self.names = [names[i] for i in order]

    def lookup(self, addr: int) -> str:
        i = bisect.bisect_right(self.addrs, addr) - 1
        return self.names[i] if i >= 0 and self.addrs[i] else "[unknown]"


class Symbolizer:
    def __init__(self, procfs: str = "/proc", max_binaries: int = 256, max_processes: int = 4096) -> None:
        self.procfs = procfs
        self.max_binaries = max_binaries
        self.max_processes = max_processes
        self._binaries: OrderedDict[tuple[str, int], SymbolTable | None] = OrderedDict()
        self._maps: OrderedDict[int, tuple[list[int], list[Mapping]]] = OrderedDict()
        # pid (-1: kernel) -> address -> frame name; bounded, dropped with the pid
        self._memo: dict[int, dict[int, str]] = {}
        self._perf_maps: dict[int, tuple[float, tuple[list[int], list[int], list[str]]]] = {}
        self._kernel: KernelSymbols | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {"binaries": len(self._binaries), "processes": len(self._maps), "perf_maps": len(self._perf_maps),
                "memo": sum(len(m) for m in list(self._memo.values()))}  # list(): one step, while the profiler adds

    def forget(self, pid: int) -> None:
        """The process exec'd or exited: its map (and perf map) no longer apply."""
        self._maps.pop(pid, None)
        self._perf_maps.pop(pid, None)
        self._memo.pop(pid, None)

    def kernel(self, addr: int) -> str:
        memo = self._memo.setdefault(-1, {})
        name = memo.get(addr)
        if name is None:
            if self._kernel is None:
                self._kernel = KernelSymbols(f"{self.procfs}/kallsyms")
            name = self._remember(memo, addr, self._kernel.lookup(addr))
        return name

    def _remember(self, memo: dict[int, str], addr: int, name: str) -> str:
        if len(memo) >= 50_000:
            memo.clear()
        if len(self._memo) > self.max_processes:
            self._memo.clear()
        memo[addr] = name
        return name

    def _process_maps(self, pid: int) -> tuple[list[int], list[Mapping]]:
        entry = self._maps.get(pid)
        if entry is None:
            maps = read_maps(self.procfs, pid)
            entry = self._maps[pid] = ([m.start for m in maps], maps)
            if len(self._maps) > self.max_processes:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(pid)
        return entry

    def _binary(self, pid: int, m: Mapping) -> SymbolTable | None:
        key = (m.dev, m.inode)
        if key in self._binaries:
            self._binaries.move_to_end(key)
            return self._binaries[key]
        try:  # the path is the traced process's: resolved inside its root, the mapped file only
            fd = safeopen.open_mapped(self.procfs, pid, m.path, m.dev, m.inode)
        except OSError as e:
            log.debug("pid %d: %s not read: %s", pid, m.path, e)
            return None  # not remembered: another process mapping the file may open it
        try:
            table = _load_elf(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._binaries[key] = table
        if len(self._binaries) > self.max_binaries:
            self._binaries.popitem(last=False)
        return table

    def _perf_map(self, pid: int) -> tuple[list[int], list[int], list[str]] | None:
        try:  # the process's own /tmp, never led out of its root; a regular file, not blocking
            fd = safeopen.open_in_root(f"{self.procfs}/{pid}/root", f"/tmp/perf-{pid}.map", prefix="/tmp")
        except OSError:
            return None
        try:
            mtime = os.fstat(fd).st_mtime
            cached = self._perf_maps.get(pid)
            if cached is None or cached[0] != mtime:
                cached = (mtime, read_perf_map(f"/proc/self/fd/{fd}"))
                self._perf_maps[pid] = cached
        finally:
            os.close(fd)
        return cached[1]

    def user(self, pid: int, addr: int) -> str:
        memo = self._memo.setdefault(pid, {})
        name = memo.get(addr)
        if name is None:
            name = self._remember(memo, addr, self._user(pid, addr))
        return name

    def _user(self, pid: int, addr: int) -> str:
        starts, maps = self._process_maps(pid)
        i = bisect.bisect_right(starts, addr) - 1
        m = maps[i] if i >= 0 and addr < maps[i].end else None
        if m is not None and m.path.startswith("/") and m.inode:
            table = self._binary(pid, m)
            if table is not None:
                file_offset = addr - m.start + m.offset
                va = table.vaddr(file_offset)
                name = table.lookup(va) if va is not None else None
                if name:
                    return name
            return f"{m.path}+{addr - m.start + m.offset:x}"
        perf = self._perf_map(pid)
        if perf is not None:
            j = bisect.bisect_right(perf[0], addr) - 1
            if j >= 0 and addr < perf[1][j]:
                return perf[2][j]
        return "[unknown]"
