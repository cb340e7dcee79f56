"""container_python_thread_lock_wait_time_seconds: the time a container's Python threads waited
for the GIL, by the Coroot node agent's method: uprobes on pthread_cond_timedwait of the C
library a Python process maps (bpf/python.c says why that is the GIL wait, for CPython 3.8
to 3.13, whether libpython is a shared library or linked into a static `python3`).

Which processes: those of a container whose command's first word looks like a Python
interpreter (the node agent's rule, `python`, `python3`, `python3.11`, any path). For each,
the C library files it maps (glibc's libc.so.6, libpthread, musl's ld-musl) are found in
/proc/PID/maps and probed for that process only: the node agent puts its probes on the file,
which makes every process using it (the host's libc: nearly all) take the uprobe trap on each
call (tens of microseconds on this project's test VM) to be filtered out in BPF; with the
process given, the kernel plants the breakpoint in that process alone. The file is read once
(device and inode; a container's own copy is another file, reached through /proc/PID/root).
glibc exports two pthread_cond_timedwait symbols: the current one and a compatibility version
kept for programs linked before 2.3.2, which a lookup by name may pick (BCC does); the probe
goes on the default version's address, read from the library's own symbol versions. The
process is also marked in the kernel's python_pids map (a pid reused by another program does
not count). When it exits, its probes are detached on the component's own thread (each detach
waits for the kernel, ~0.1 s).

A process's total lives in the kernel map until it exits; then it is added to its container's
retired total and its entries are deleted. The metric of a container is the retired total plus
its live processes' totals; it is there (0 when nothing waited) for every container with a
Python process probed. Like the node agent's, it is a counter named without `_total` (an
agent.metrics exact counter).

Work is done on ticks (the poll thread): reading /proc/PID/cmdline and maps of new processes,
once per new C library file its ELF symbols, and two uprobes per Python process (the TLS
attacher attaches on ticks too); process events only queue pids.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

from agent.containers.registry import Registry
from agent.ebpf import tracefs
from agent.ebpf.maps import AttachError, BpfMap, Programs, ProgramsClosing
from agent.logs import safeopen
from agent.metrics import Families
from agent.runtime.follow import ProcessFollower

log = logging.getLogger(__name__)

SYMBOL = "pthread_cond_timedwait"
ENTER, EXIT = "python_cond_wait_enter", "python_cond_wait_exit"
MAX_PROCESSES = 4096  # CA_PYTHON_PROCESSES in bpf/python.c
STALE_TRIES = 30  # seconds a left-behind probe definition is tried again
MAX_LIBRARIES = 256  # C library files remembered (a descriptor each for those probed)
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


def _event_names(target: str, addr: int, pid: int) -> list[str]:
    """The names BCC gives a process's uprobe and uretprobe when it defines them through
    tracing/uprobe_events (libbcc appends its own pid)."""
    base = f"{re.sub(r'[^a-zA-Z0-9_]', '_', target)}_0x{addr:x}_{pid}_bcc_{os.getpid()}"
    return [f"p_{base}", f"r_{base}"]


@dataclass
class _Tracked:
    pid: int
    start_ticks: int
    container_id: str
    probes: list[tuple[str, int]]  # (attach path, address) probed for this process


@dataclass
class _Library:
    path: str  # as the first process that mapped it sees it
    address: int | None
    target: str = ""  # the path the probes are attached by
    fd: int = -1  # kept open while the agent runs (target names it)
    error: str = ""


class PythonGilMetrics(ProcessFollower):
    """container_python_thread_lock_wait_time_seconds for containers running CPython."""

    name = "python"

    def __init__(self, registry: Registry, procfs: str = "/proc") -> None:
        super().__init__(registry, procfs)  # self._retired: container -> ns waited by its exited processes
        self._pids: BpfMap | None = None
        self._waits: BpfMap | None = None
        self._tracked: dict[int, _Tracked] = {}
        self.libraries: dict[tuple[int, int], _Library] = {}
        self._detach: queue.SimpleQueue[tuple[str, int, int] | None] = queue.SimpleQueue()
        self._detacher: threading.Thread | None = None
        self.detached = 0

    # ------------------------------------------------------------ component --

    def attach(self, programs: Programs | None) -> None:
        if programs is None:
            return
        self.programs = programs
        self._pids = programs.map("python_pids")
        self._waits = programs.map("python_wait_ns")

    def start(self) -> None:
        self._detacher = threading.Thread(target=self._detach_loop, name="python-detach", daemon=True)
        self._detacher.start()

    def close(self) -> None:
        """The probes left stay until the programs are freed (all probes are detached together)."""
        self.programs = None
        if self._detacher is not None:
            self._detach.put(None)
            self._detacher.join(timeout=1.0)
            self._detacher = None
        # The descriptors stay open: the loader detaches the probes named by them after this.

    def _detach_loop(self) -> None:
        stale: dict[str, int] = {}  # probe definitions left behind -> tries left
        while True:
            job: tuple[str, int, int] | None | bool
            try:
                job = self._detach.get(timeout=1.0)
            except queue.Empty:
                job = False  # nothing to detach: only the sweep below
            programs = self.programs
            if job is None or programs is None:
                return
            if job:
                assert isinstance(job, tuple)
                target, addr, pid = job
                for ret in (False, True):
                    try:
                        programs.detach_uprobe(target, SYMBOL, ret=ret, addr=addr, pid=pid)
                    except ProgramsClosing:
                        return  # the agent stops: the loader detaches what is left
                    except AttachError as e:
                        log.debug("python: detaching pid %d's probe: %s", pid, e)
                self.detached += 1
                for name in _event_names(target, addr, pid):
                    stale[name] = STALE_TRIES
            if stale:
                tracefs.remove_uprobe_events(stale)

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
        assert self._pids is not None
        if not self._pids.set(self._pids.key(pid), self._pids.leaf(1)):
            self.dropped += 1
            return
        probes = self._probe_process(pid)
        if not probes:
            self._pids.delete(self._pids.key(pid))
            return
        with self._lock:
            self._tracked[pid] = _Tracked(pid, proc.start_ticks, proc.container_id, probes)
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
        for target, addr in t.probes:
            self._detach.put((target, addr, pid))

    # -------------------------------------------------------------- probes --

    def _probe_process(self, pid: int) -> list[tuple[str, int]]:
        """Probe the C libraries `pid` maps, for that process. The probes attached."""
        try:
            with open(f"{self.procfs}/{pid}/maps", "rb") as f:
                maps = f.read(MAPS_MAX)
        except OSError:
            return []
        out = []
        root = f"{self.procfs}/{pid}/root"
        for path in c_libraries(maps):
            try:
                fd = safeopen.open_in_root(root, path)
            except OSError as e:  # Refused among them
                log.debug("python: pid %d: %s: %s", pid, path, e)
                continue
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            lib = self.libraries.get(key)
            if lib is None:
                lib = self._library(key, fd, path)  # keeps fd when it probes the file
            else:
                os.close(fd)
            if lib.address is not None and self._attach(lib, pid):
                out.append((lib.target, lib.address))
        return out

    def _library(self, key: tuple[int, int], fd: int, path: str) -> _Library:
        """A C library file seen for the first time: its symbol's address, and the path the
        probes are attached by: /proc/self/fd/N of a descriptor kept open, which names the very
        file for as long as the agent runs (the process it was found through may exit), is
        short (BCC names the probe's event after it, and through uprobe_events such a name must
        stay under 64 characters) and starts with /proc (BCC would otherwise look for it under
        /proc/PID/root of the process probed)."""
        try:
            addr = default_symbol_address(fd)
        except (ELFError, OSError, ValueError) as e:
            addr, err = None, f"not an ELF file this reads: {e}"
        else:
            err = "" if addr is not None else f"no {SYMBOL}"
        lib = _Library(path, addr, error=err)
        if addr is not None and len(self.libraries) >= MAX_LIBRARIES:
            lib.address, lib.error = None, f"more than {MAX_LIBRARIES} C library files"
        if lib.address is None:
            os.close(fd)
            log.info("python: %s: %s; GIL waits of the processes using it are not seen", path, lib.error)
        else:
            lib.fd, lib.target = fd, f"/proc/self/fd/{fd}"
            log.info("python: %s: %s at %#x", path, SYMBOL, addr)
        if len(self.libraries) < MAX_LIBRARIES:
            self.libraries[key] = lib
        return lib

    def _attach(self, lib: _Library, pid: int) -> bool:
        programs = self.programs
        assert programs is not None and lib.address is not None
        try:
            programs.attach_uprobe(lib.target, SYMBOL, ENTER, addr=lib.address, pid=pid)
        except AttachError as e:  # ProgramsClosing among them
            self._attach_failed(e, lib, pid, "p")
            return False
        try:
            programs.attach_uprobe(lib.target, SYMBOL, EXIT, ret=True, addr=lib.address, pid=pid)
        except AttachError as e:
            self._attach_failed(e, lib, pid, "r")
            try:  # an entry without its exit would only fill the start map
                programs.detach_uprobe(lib.target, SYMBOL, addr=lib.address, pid=pid)
            except AttachError:
                pass
            return False
        return True

    def _attach_failed(self, e: AttachError, lib: _Library, pid: int, kind: str) -> None:
        if isinstance(e, ProgramsClosing):
            return
        if os.path.exists(f"{self.procfs}/{pid}"):
            log.warning("python: %s; pid %d's GIL waits in %s are not seen", e, pid, lib.path)
        else:
            log.debug("python: pid %d exited before its probes were attached", pid)
        # Through uprobe_events, BCC defines the probe before it opens it for the process, and
        # leaves the definition behind when that fails (the process has exited): remove it.
        assert lib.address is not None
        tracefs.remove_uprobe_events({n: 1 for n in _event_names(lib.target, lib.address, pid) if n.startswith(kind)})

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
            f.exact_counter("container_python_thread_lock_wait_time_seconds", "Time spent waiting acquiring GIL in seconds",
                            secs, container_id=cid, app_id=c.app_id)

    def self_metrics(self, f: Families) -> None:
        with self._lock:
            n = len(self._tracked)
        f.gauge("coroot_agent_python_processes", "Python processes whose GIL waits are counted", n)
        f.gauge("coroot_agent_python_libraries", "C library files with pthread_cond_timedwait found",
                sum(1 for lib in self.libraries.values() if lib.address is not None))
        f.counter("coroot_agent_python_dropped_total", "Python processes not followed: a bound was reached",
                  self.dropped)
