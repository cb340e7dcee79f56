"""container_nodejs_event_loop_blocked_time_seconds_total: the time a container's Node.js event
loops spent running code instead of waiting for I/O, by the Coroot node agent's method
(bpf/nodejs.c: from each return of libuv's uv__io_poll to the next entry, plus the I/O
callbacks uv__io_poll calls).

Which processes: those of a container whose executable's name looks like Node.js (the node
agent's rule: `node`, `nodejs`, `node18`, any path). Where: the first file of a process with
libuv's functions — a libuv*.so it maps (Debian's own node links the system libuv), then its
executable (node builds with libuv linked in) — found by the symbols uv__io_poll and the five
I/O callbacks in the file's symbol table (.symtab, else .dynsym). The probes go on the file
once (device and inode), as the node agent does: only Node.js runs that code, so no other
process takes the trap; the kernel counts only the processes marked in nodejs_pids. A file
without uv__io_poll (stripped) is logged once and its processes are not counted.

A process's total lives in the kernel map until it exits; then it is added to its container's
retired total and its entries are deleted. The metric of a container is the retired total plus
its live processes' totals; it is there (0 while nothing blocked) for every container with a
Node.js process followed. Work is done on ticks (the poll thread); process events only queue
pids. The probes stay attached until the agent stops (the loader detaches them then).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.containers.registry import Registry
from agent.ebpf.maps import AttachError, BpfMap, Programs, ProgramsClosing
from agent.logs import safeopen
from agent.metrics import Families
from agent.runtime.follow import ProcessFollower

log = logging.getLogger(__name__)

POLL = "uv__io_poll"
IO_CALLBACKS = ("uv__stream_io", "uv__async_io", "uv__poll_io", "uv__server_io", "uv__udp_io")
POLL_ENTER, POLL_EXIT = "nodejs_poll_enter", "nodejs_poll_exit"
CB_ENTER, CB_EXIT = "nodejs_io_cb_enter", "nodejs_io_cb_exit"
MAX_PROCESSES = 4096  # CA_NODEJS_PROCESSES in bpf/nodejs.c
MAX_FILES = 64  # files with libuv remembered (a descriptor each for those probed)
MAPS_MAX = 4 << 20

_NODE = re.compile(r"node(js)?\d*\.?\d*\Z")
_LIBUV = re.compile(rb"/libuv[^/]*\Z")


def is_nodejs(exe: str) -> bool:
    """The node agent's rule (apptype.IsNodejs on the executable's path)."""
    return bool(_NODE.search(exe.removesuffix(" (deleted)")))


def libuv_libraries(maps: bytes) -> list[str]:
    """Paths (as the process sees them) of the libuv files a process maps."""
    out: list[str] = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and _LIBUV.search(parts[5].strip()):
            path = parts[5].strip().decode(errors="replace")
            if path.startswith("/") and path not in out:
                out.append(path)
    return out


def function_addresses(fd: int, names: tuple[str, ...] = (POLL, *IO_CALLBACKS)) -> dict[str, int]:
    """name -> address of each of these functions the file defines (.symtab, else .dynsym:
    libuv's internal functions are local symbols, in the symbol table of an unstripped file)."""
    out: dict[str, int] = {}
    want = set(names)
    with os.fdopen(os.dup(fd), "rb") as f:
        elf = ELFFile(f)
        for section in (".symtab", ".dynsym"):
            table = elf.get_section_by_name(section)
            if not isinstance(table, SymbolTableSection):
                continue
            for sym in table.iter_symbols():
                if sym.name in want and sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"]:
                    out.setdefault(sym.name, int(sym["st_value"]))
            if POLL in out:
                break
    return out


@dataclass
class _File:
    path: str  # as the first process that had it sees it
    addresses: dict[str, int]
    target: str = ""  # the path the probes are attached by
    fd: int = -1  # kept open while the agent runs (target names it)
    error: str = ""
    probes: list[tuple[str, int, bool]] = field(default_factory=list)  # (symbol, address, ret) attached


@dataclass
class _Tracked:
    pid: int
    start_ticks: int
    container_id: str


class NodejsMetrics(ProcessFollower):
    """container_nodejs_event_loop_blocked_time_seconds_total for containers running Node.js."""

    name = "nodejs"

    def __init__(self, registry: Registry, procfs: str = "/proc") -> None:
        super().__init__(registry, procfs)  # self._retired: container -> ns blocked in its exited processes
        self._pids: BpfMap | None = None
        self._blocked: BpfMap | None = None
        self._other_maps: list[BpfMap] = []
        self._tracked: dict[int, _Tracked] = {}
        self.files: dict[tuple[int, int], _File] = {}

    # ------------------------------------------------------------ component --

    def attach(self, programs: Programs | None) -> None:
        if programs is None:
            return
        self.programs = programs
        self._pids = programs.map("nodejs_pids")
        self._blocked = programs.map("nodejs_blocked_ns")
        self._other_maps = [programs.map("nodejs_poll_end"), programs.map("nodejs_cb_start")]

    def close(self) -> None:
        """The probes stay until the programs are freed (the loader detaches them all); the
        descriptors stay open until then too (they name the files probed)."""
        self.programs = None

    # ------------------------------------------------------------ processes --

    def _look_at(self, pid: int) -> None:
        proc = self.registry.process(pid)
        try:
            exe = os.readlink(f"{self.procfs}/{pid}/exe")
        except OSError:
            exe = ""
        if proc is None or proc.container_id is None or not is_nodejs(exe):
            self._untrack(pid)  # an exec into something else, or not Node.js at all
            return
        old = self._tracked.get(pid)
        if old is not None and old.start_ticks == proc.start_ticks:
            return
        if old is not None:
            self._untrack(pid)
        if len(self._tracked) >= MAX_PROCESSES:
            self.dropped += 1
            return
        if self._probe_file_of(pid) is None:
            return
        assert self._pids is not None
        if not self._pids.set(self._pids.key(pid), self._pids.leaf(1)):
            self.dropped += 1
            return
        with self._lock:
            self._tracked[pid] = _Tracked(pid, proc.start_ticks, proc.container_id)
        log.debug("nodejs: pid %d (%s): event loop blocked time counted", pid, proc.container_id)

    def _untrack(self, pid: int) -> None:
        t = self._tracked.get(pid)
        if t is None:
            return
        assert self._pids is not None and self._blocked is not None
        key = self._blocked.key(pid)
        v = self._blocked.get(key)
        with self._lock:
            del self._tracked[pid]
            self._retired[t.container_id] = self._retired.get(t.container_id, 0) + (int(v.value) if v else 0)
        self._pids.delete(self._pids.key(pid))
        self._blocked.delete(key)
        for m in self._other_maps:
            m.delete(m.key(pid))

    # -------------------------------------------------------------- probes --

    def _candidates(self, pid: int) -> list[int]:
        """Descriptors of the files that may hold libuv: the libuv files mapped, the executable."""
        fds = []
        try:
            with open(f"{self.procfs}/{pid}/maps", "rb") as f:
                maps = f.read(MAPS_MAX)
        except OSError:
            maps = b""
        for path in libuv_libraries(maps):
            try:
                fds.append(safeopen.open_in_root(f"{self.procfs}/{pid}/root", path))
            except OSError as e:
                log.debug("nodejs: pid %d: %s: %s", pid, path, e)
        try:  # the kernel's own link to the file the process runs
            fds.append(os.open(f"{self.procfs}/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            log.debug("nodejs: pid %d: its executable: %s", pid, e)
        return fds

    def _probe_file_of(self, pid: int) -> _File | None:
        """The first file of `pid` with libuv's functions, probed (once per file), or None."""
        found = None
        for fd in self._candidates(pid):
            if found is not None:
                os.close(fd)
                continue
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            file = self.files.get(key)
            if file is None:
                file = self._file(key, fd, pid)  # keeps fd when it probes the file
            else:
                os.close(fd)
            if file.probes:
                found = file
        return found

    def _file(self, key: tuple[int, int], fd: int, pid: int) -> _File:
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else "?"
        try:
            addrs = function_addresses(fd)
        except (ELFError, OSError, ValueError) as e:
            addrs, err = {}, f"not an ELF file this reads: {e}"
        else:
            err = "" if POLL in addrs else f"no {POLL} (stripped, or no libuv)"
        file = _File(path, addrs, error=err)
        if not err and len(self.files) >= MAX_FILES:
            file.error = f"more than {MAX_FILES} files with libuv"
        if file.error:
            os.close(fd)
            log.debug("nodejs: pid %d: %s: %s", pid, path, file.error)
        else:
            file.fd, file.target = fd, f"/proc/self/fd/{fd}"
            self._attach(file)
            if not file.probes:
                os.close(file.fd)
                file.fd, file.target = -1, ""
        if len(self.files) < MAX_FILES:
            self.files[key] = file
        return file

    def _attach(self, file: _File) -> None:
        """uv__io_poll's entry and return, then each I/O callback's (as the node agent, the
        callbacks found up to the first missing one); none unless uv__io_poll's both attach."""
        programs = self.programs
        assert programs is not None
        plan = [(POLL, POLL_ENTER, False), (POLL, POLL_EXIT, True)]
        for cb in IO_CALLBACKS:
            if cb not in file.addresses:
                break
            plan += [(cb, CB_ENTER, False), (cb, CB_EXIT, True)]
        for symbol, fn, ret in plan:
            addr = file.addresses[symbol]
            try:
                programs.attach_uprobe(file.target, symbol, fn, ret=ret, addr=addr)
            except AttachError as e:
                if not isinstance(e, ProgramsClosing):
                    log.warning("nodejs: %s; %s", e, file.path)
                if len(file.probes) < 2:  # without uv__io_poll's pair nothing is measured
                    file.error = str(e)
                    for s, a, r in file.probes:
                        try:
                            programs.detach_uprobe(file.target, s, ret=r, addr=a)
                        except AttachError:
                            pass
                    file.probes = []
                    return
                break
            file.probes.append((symbol, addr, ret))
        log.info("nodejs: %s: %d uprobes on %s and the I/O callbacks", file.path, len(file.probes), POLL)

    # -------------------------------------------------------------- answers --

    def blocked_seconds(self) -> dict[str, float]:
        """Container -> seconds its Node.js event loops were blocked."""
        got = {int(k.value): int(v.value) for k, v in self._blocked.items()} if self._blocked is not None else {}
        with self._lock:
            total = dict(self._retired)
            for pid, t in self._tracked.items():
                total[t.container_id] = total.get(t.container_id, 0) + got.get(pid, 0)
        return {cid: ns / 1e9 for cid, ns in total.items()}

    def collect(self, f: Families) -> None:
        for cid, secs in sorted(self.blocked_seconds().items()):
            c = self.registry.container(cid)
            if c is None:
                continue
            f.counter("container_nodejs_event_loop_blocked_time_seconds_total",
                      "Total time the Node.js event loop spent blocked", secs, container_id=cid, app_id=c.app_id)

    def self_metrics(self, f: Families) -> None:
        with self._lock:
            n = len(self._tracked)
        f.gauge("coroot_agent_nodejs_processes", "Node.js processes whose event loop blocked time is counted", n)
        f.gauge("coroot_agent_nodejs_files", "files with libuv's event loop probed",
                sum(1 for file in self.files.values() if file.probes))
        f.counter("coroot_agent_nodejs_dropped_total", "Node.js processes not followed: a bound was reached",
                  self.dropped)
