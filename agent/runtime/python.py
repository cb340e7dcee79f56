"""container_python_thread_lock_wait_time_seconds: the time a container's Python threads waited
for the GIL, by the Coroot node agent's method: uprobes on pthread_cond_timedwait of the C
library a Python process maps (bpf/python.c says why that is the GIL wait, for CPython 3.8
to 3.13, whether libpython is a shared library or linked into a static `python3`).

Which processes: those of a container whose command's first word looks like a Python
interpreter (the node agent's rule, `python`, `python3`, `python3.11`, any path). For each,
the C library files it maps (glibc's libc.so.6, libpthread, musl's ld-musl) are found in
/proc/PID/maps and probed once per file (device and inode: the host's libc once for every
process that uses it; a container's own copy is another file, reached through /proc/PID/root).
glibc exports two pthread_cond_timedwait symbols: the current one and a compatibility version
kept for programs linked before 2.3.2, which a lookup by name may pick (BCC does); the probe
goes on the default version's address, read from the library's own symbol versions. The
process is then marked in the kernel's python_pids map: only marked processes' waits count.

A process's total lives in the kernel map until it exits; then it is added to its container's
retired total and its entries are deleted. The metric of a container is the retired total plus
its live processes' totals; it is there (0 when nothing waited) for every container with a
Python process probed. Like the node agent's, it is a counter; like container_jvm_*'s times it
is exposed as a gauge of the exact name (the Prometheus client would name a counter NAME_total).

Work is done on ticks (the poll thread): reading /proc/PID/cmdline and maps of new processes,
and, once per new C library file, its ELF symbols and two uprobes (the TLS attacher does the
same); process events only queue pids.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

from agent.component import Component
from agent.containers.registry import Process, Registry
from agent.ebpf.maps import AttachError, BpfMap, Programs, ProgramsClosing
from agent.logs import safeopen
from agent.metrics import Families

log = logging.getLogger(__name__)

SYMBOL = "pthread_cond_timedwait"
ENTER, EXIT = "python_cond_wait_enter", "python_cond_wait_exit"
LINK_DIR = "/run/coroot-agent/python"
MAX_PROCESSES = 4096  # CA_PYTHON_PROCESSES in bpf/python.c
MAX_QUEUED = 8192
MAX_CLASSIFY_PER_TICK = 512
CMDLINE_MAX = 4096  # the first word is all that is needed
MAPS_MAX = 4 << 20
VERSYM_HIDDEN = 0x8000

_PYTHON = re.compile(rb"python\d*\.?\d*\Z")
_LIBC = re.compile(rb"/(libc[.-][^/]*|ld-musl[.-][^/]*|libpthread[.-][^/]*)\Z")


def is_python(cmdline: bytes) -> bool:
    """The node agent's rule (apptype.IsPython on the command's first word)."""
    return bool(_PYTHON.search(cmdline.split(b"\0", 1)[0]))


def c_libraries(maps: bytes) -> list[str]:
    """Paths (as the process sees them) of the C library files a process maps."""
    out: list[str] = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and _LIBC.search(parts[5].strip()):
            path = parts[5].strip().decode(errors="replace")
            if path.startswith("/") and path not in out:
                out.append(path)
    return out


def default_symbol_address(fd: int, name: str = SYMBOL) -> int | None:
    """The address of the default version of a dynamic symbol (the one `name@@VERSION` that new
    links bind to; a symbol without versions is its own default), or None."""
    with os.fdopen(os.dup(fd), "rb") as f:
        elf = ELFFile(f)
        dynsym = elf.get_section_by_name(".dynsym")
        if not isinstance(dynsym, SymbolTableSection):
            return None
        versym = elf.get_section_by_name(".gnu.version")
        if not isinstance(versym, GNUVerSymSection):
            versym = None
        found = None
        for i, sym in enumerate(dynsym.iter_symbols()):
            if sym.name != name or sym["st_info"]["type"] != "STT_FUNC" or not sym["st_value"]:
                continue
            ndx = versym.get_symbol(i).entry["ndx"] if versym is not None else 0
            if isinstance(ndx, int) and ndx & VERSYM_HIDDEN:
                continue  # name@VERSION: a compatibility version
            found = int(sym["st_value"])
        return found


@dataclass
class _Tracked:
    pid: int
    start_ticks: int
    container_id: str


@dataclass
class _Library:
    path: str  # as the first process that mapped it sees it
    address: int | None
    probes: int = 0
    error: str = ""


class PythonGilMetrics(Component):
    """container_python_thread_lock_wait_time_seconds for containers running CPython."""

    name = "python"

    def __init__(self, registry: Registry, procfs: str = "/proc", link_dir: str = LINK_DIR) -> None:
        self.registry = registry
        self.procfs = procfs
        self.link_dir = link_dir
        self.programs: Programs | None = None
        self._pids: BpfMap | None = None
        self._waits: BpfMap | None = None
        self._lock = threading.Lock()
        self._queue: OrderedDict[int, str] = OrderedDict()  # pid -> "added" | "removed"
        self._tracked: dict[int, _Tracked] = {}
        self._retired: dict[str, int] = {}  # container -> ns waited by its exited processes
        self.libraries: dict[tuple[int, int], _Library] = {}
        self._synced = False
        self.dropped = 0

    # ------------------------------------------------------------ component --

    def attach(self, programs: Programs | None) -> None:
        if programs is None:
            return
        self.programs = programs
        self._pids = programs.map("python_pids")
        self._waits = programs.map("python_wait_ns")

    def on_process(self, what: str, proc: Process) -> None:
        with self._lock:
            if what == "added" and proc.container_id is None:
                return
            if len(self._queue) >= MAX_QUEUED and proc.pid not in self._queue:
                self.dropped += 1
                return
            self._queue[proc.pid] = what
            self._queue.move_to_end(proc.pid)

    def tick(self, now: float, gone: list[str]) -> None:
        if self.programs is None:
            return
        if not self._synced:
            self._synced = True
            with self._lock:
                for pid in self.registry.pids():
                    self._queue.setdefault(pid, "added")
        with self._lock:
            batch: list[tuple[int, str]] = []
            while self._queue and len(batch) < MAX_CLASSIFY_PER_TICK:
                batch.append(self._queue.popitem(last=False))
        for pid, what in batch:
            if what == "removed":
                self._untrack(pid)
            else:
                self._look_at(pid)
        if gone:
            with self._lock:
                for cid in gone:
                    self._retired.pop(cid, None)

    def close(self) -> None:
        """The probes stay until the programs are freed (all probes are detached together)."""
        self.programs = None

    # ------------------------------------------------------------ processes --

    def _look_at(self, pid: int) -> None:
        proc = self.registry.process(pid)
        try:
            with open(f"{self.procfs}/{pid}/cmdline", "rb") as f:
                cmdline = f.read(CMDLINE_MAX)
        except OSError:
            cmdline = b""
        python = proc is not None and proc.container_id is not None and is_python(cmdline)
        if not python or proc is None or proc.container_id is None:
            self._untrack(pid)  # an exec into something else, or not Python at all
            return
        old = self._tracked.get(pid)
        if old is not None and old.start_ticks == proc.start_ticks:
            return  # an exec into Python again (or a resync): the probes and the mark stand
        if old is not None:
            self._untrack(pid)
        if len(self._tracked) >= MAX_PROCESSES:
            self.dropped += 1
            return
        if not self._probe_libraries(pid):
            return
        assert self._pids is not None
        if self._pids.set(self._pids.key(pid), self._pids.leaf(1)):
            with self._lock:
                self._tracked[pid] = _Tracked(pid, proc.start_ticks, proc.container_id)
            log.debug("python: pid %d (%s): GIL waits counted", pid, proc.container_id)

    def _untrack(self, pid: int) -> None:
        t = self._tracked.get(pid)
        if t is None:
            return
        assert self._pids is not None and self._waits is not None
        key = self._waits.key(pid)
        v = self._waits.get(key)
        with self._lock:
            del self._tracked[pid]
            if v is not None:
                self._retired[t.container_id] = self._retired.get(t.container_id, 0) + int(v.value)
            elif t.container_id not in self._retired:
                self._retired[t.container_id] = 0  # the container keeps its series
        self._pids.delete(self._pids.key(pid))
        self._waits.delete(key)

    # -------------------------------------------------------------- probes --

    def _probe_libraries(self, pid: int) -> bool:
        """Probe the C libraries `pid` maps (those not probed yet). True when one of them is."""
        try:
            with open(f"{self.procfs}/{pid}/maps", "rb") as f:
                maps = f.read(MAPS_MAX)
        except OSError:
            return False
        ok = False
        root = f"{self.procfs}/{pid}/root"
        for path in c_libraries(maps):
            try:
                fd = safeopen.open_in_root(root, path)
            except OSError as e:  # Refused among them
                log.debug("python: pid %d: %s: %s", pid, path, e)
                continue
            try:
                st = os.fstat(fd)
                key = (st.st_dev, st.st_ino)
                lib = self.libraries.get(key)
                if lib is None:
                    lib = self._attach(key, fd, f"{root}{path}", path)
            finally:
                os.close(fd)
            ok = ok or lib.probes == 2
        return ok

    def _attach(self, key: tuple[int, int], fd: int, host_path: str, path: str) -> _Library:
        try:
            addr = default_symbol_address(fd)
        except (ELFError, OSError, ValueError) as e:
            addr, err = None, f"not an ELF file this reads: {e}"
        else:
            err = "" if addr is not None else f"no {SYMBOL}"
        lib = _Library(path, addr, error=err)
        self.libraries[key] = lib
        if addr is None:
            log.info("python: %s: %s; GIL waits of the processes using it are not seen", path, err)
            return lib
        programs = self.programs
        assert programs is not None
        target = self._short_path(key, host_path)
        try:
            programs.attach_uprobe(target, SYMBOL, ENTER, addr=addr)
            lib.probes += 1
            programs.attach_uprobe(target, SYMBOL, EXIT, ret=True, addr=addr)
            lib.probes += 1
        except ProgramsClosing:
            del self.libraries[key]
        except AttachError as e:
            lib.error = str(e)
            log.warning("python: %s; GIL waits of the processes using %s are not seen", e, path)
            if lib.probes == 1:  # an entry without its exit would only fill the start map
                try:
                    programs.detach_uprobe(target, SYMBOL, addr=addr)
                    lib.probes = 0
                except AttachError:
                    pass
        else:
            log.info("python: GIL wait uprobes on %s:%s at %#x", path, SYMBOL, addr)
        return lib

    def _short_path(self, key: tuple[int, int], host_path: str) -> str:
        """A short link to the library: BCC names the probe's event after the path, and such a
        name must stay under 64 characters when the probe goes through uprobe_events."""
        link = os.path.join(self.link_dir, f"{key[0]}-{key[1]}")
        try:
            os.makedirs(self.link_dir, exist_ok=True)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(host_path, link)
            return link
        except OSError as e:
            log.debug("python: no link in %s (%s): attaching by the full path", self.link_dir, e)
            return host_path

    # -------------------------------------------------------------- answers --

    def wait_seconds(self) -> dict[str, float]:
        """Container -> seconds its Python threads waited for the GIL."""
        waits = {int(k.value): int(v.value) for k, v in self._waits.items()} if self._waits is not None else {}
        with self._lock:
            total = dict(self._retired)
            for pid, t in self._tracked.items():
                total[t.container_id] = total.get(t.container_id, 0) + waits.get(pid, 0)
        return {cid: ns / 1e9 for cid, ns in total.items()}

    def collect(self, f: Families) -> None:
        for cid, secs in sorted(self.wait_seconds().items()):
            c = self.registry.container(cid)
            if c is None:
                continue
            f.gauge("container_python_thread_lock_wait_time_seconds", "Time spent waiting acquiring GIL in seconds",
                    secs, container_id=cid, app_id=c.app_id)

    def self_metrics(self, f: Families) -> None:
        with self._lock:
            n = len(self._tracked)
        f.gauge("coroot_agent_python_processes", "Python processes whose GIL waits are counted", n)
        f.gauge("coroot_agent_python_libraries", "C library files with GIL wait uprobes attached",
                sum(1 for lib in self.libraries.values() if lib.probes == 2))
        f.counter("coroot_agent_python_dropped_total", "Python processes not followed: a bound was reached",
                  self.dropped)
