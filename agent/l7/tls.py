"""OpenSSL uprobes: find each libssl that processes map, attach bpf/l7.c's SSL_write/SSL_read
(and their _ex variants) once per library file (device, inode), also for processes started
after the agent.

A uprobe on a file applies to every process that maps it, so one attach covers all users of
the host's libssl; a container's own copy is another file, found through /proc/PID/root. New
processes are looked at twice (1 s and 5 s after their exec), because the dynamic loader — or a
program's own dlopen — maps libssl after the exec event.

Each library is attached through a short symlink (`LINK_DIR/<dev>-<inode>`) to its path under
/proc/PID/root: the kernel's uprobe perf PMU needs CAP_SYS_ADMIN, and without it BCC defines
the probes in tracing/uprobe_events, whose event names (made from the path) must stay under 64
characters. The kernel resolves the link once; the probe stays on the file's inode.

Go programs do not use OpenSSL: each process's executable (/proc/PID/exe) that is a Go binary
using crypto/tls gets uprobes on `crypto/tls.(*Conn).Write`, `.Read` and each of Read's RET
instructions (bpf/include/gotls.h), at the addresses agent/l7/gotls.py reads from the file,
once per file (device, inode), at most MAX_GO_BINARIES files. Every executable is looked at once:
what it is (Go or not, and why not traced) is remembered per file, at most MAX_SEEN of them.

A component (agent/component.py): attaches at start for the processes the registry knows, then
on its ticks for the new ones. Its probes are detached with all the others when the programs
are freed (agent/ebpf/loader.py, side by side: one by one they would take ~130 ms each).
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.component import Component
from agent.containers.registry import Process
from agent.ebpf.maps import AttachError, Programs, ProgramsClosing
from agent.l7 import gotls
from agent.metrics import Families

log = logging.getLogger(__name__)

# (library symbol, program prefix in bpf/l7.c)
SYMBOLS = (("SSL_write", "ssl_write"), ("SSL_read", "ssl_read"),
           ("SSL_write_ex", "ssl_write_ex"), ("SSL_read_ex", "ssl_read_ex"))
RECHECK_AFTER = (1.0, 5.0)
LINK_DIR = "/run/coroot-agent/tls"
MAX_QUEUED = 4096
MAX_GO_BINARIES = 64  # Go executables with uprobes (each: Write, Read and Read's RETs, ~9 probes)
MAX_SEEN = 8192  # executables remembered as not traced (not Go, no crypto/tls, ...), oldest forgotten first


@dataclass
class Library:
    path: str
    probes: int
    missing: list[str] = field(default_factory=list)


@dataclass
class GoBinary:
    path: str  # as the first process seen running it sees it
    version: str
    probes: int
    source: str  # "symtab" or "pclntab" (a stripped binary)


def ssl_libraries(procfs: str, pid: int) -> list[str]:
    """Paths (as the process sees them) of the libssl files a process maps."""
    out: list[str] = []
    try:
        with open(f"{procfs}/{pid}/maps", "rb") as f:
            for line in f:
                if b"libssl.so" not in line:
                    continue
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip().decode(errors="replace")
                    if path.startswith("/") and path not in out:
                        out.append(path)
    except OSError:
        pass
    return out


class TlsAttacher(Component):
    name = "tls"

    def __init__(self, programs: Programs | None = None, procfs: str = "/proc", link_dir: str = LINK_DIR,
                 pids: Callable[[], Iterable[int]] | None = None) -> None:
        """`pids`: the processes to look at when attached (the registry's)."""
        self.programs = programs
        self.procfs = procfs
        self.link_dir = link_dir
        self.pids = pids
        self.libraries: dict[tuple[int, int], Library] = {}
        self.failed: set[tuple[int, int]] = set()
        self.go_binaries: dict[tuple[int, int], GoBinary] = {}
        self.go_skipped: dict[tuple[int, int], str] = {}  # executables not traced, and why
        self._queue: list[tuple[float, int]] = []
        self._queue_lock = threading.Lock()  # listeners run on the poll thread and the logs thread

    # ------------------------------------------------------------ component --

    def attach(self, programs: Programs | None) -> None:
        self.programs = programs
        if programs is not None and self.pids is not None:
            self.scan(self.pids())
            log.info("TLS: OpenSSL uprobes on %d libraries, Go crypto/tls uprobes on %d executables",
                     len(self.libraries), len(self.go_binaries))

    def on_process(self, what: str, proc: Process) -> None:
        """Registry listener: look at a new process's libraries a little later."""
        if what != "added":
            return
        now = time.monotonic()
        with self._queue_lock:
            if len(self._queue) >= MAX_QUEUED:
                return
            for delay in RECHECK_AFTER:
                heapq.heappush(self._queue, (now + delay, proc.pid))

    def tick(self, now: float, gone: list[str]) -> None:
        """Processes whose time to be looked at has come (`now`: time.monotonic())."""
        while True:
            with self._queue_lock:
                if not self._queue or self._queue[0][0] > now:
                    return
                _, pid = heapq.heappop(self._queue)
            self.scan_pid(pid)

    def self_metrics(self, f: Families) -> None:
        f.gauge("coroot_agent_tls_libraries", "OpenSSL libraries with uprobes attached", len(self.libraries))
        f.gauge("coroot_agent_tls_go_binaries", "Go executables with crypto/tls uprobes attached",
                len(self.go_binaries))

    def close(self) -> None:
        """The probes stay until the programs are freed (all probes are detached together)."""
        self.programs = None

    # -------------------------------------------------------------- probes --

    def scan(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self.scan_pid(pid)

    def scan_pid(self, pid: int) -> None:
        if self.programs is None:
            return
        for path in ssl_libraries(self.procfs, pid):
            host_path = f"{self.procfs}/{pid}/root{path}"
            try:
                st = os.stat(host_path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in self.libraries or key in self.failed:
                continue
            self._attach(key, host_path, path)
        self.scan_go(pid)

    def scan_go(self, pid: int) -> None:
        """Attach the Go crypto/tls probes to the process's executable if it needs them."""
        if self.programs is None:
            return
        exe = f"{self.procfs}/{pid}/exe"
        try:
            st = os.stat(exe)
        except OSError:  # gone already, or a kernel thread
            return
        key = (st.st_dev, st.st_ino)
        if key in self.go_binaries or key in self.go_skipped:
            return
        try:
            path = os.readlink(exe)
        except OSError:
            return
        if len(self.go_binaries) >= MAX_GO_BINARIES:
            self._skip_go(key, f"already {MAX_GO_BINARIES} Go executables traced", path)
            return
        try:
            found = gotls.inspect_path(exe)
        except OSError:  # the process is gone: the file may be traced with the next one
            return
        except gotls.GoBinaryError as e:
            self._skip_go(key, str(e), path)
            return
        self._attach_go(key, exe, path, found)

    def _skip_go(self, key: tuple[int, int], why: str, path: str) -> None:
        while len(self.go_skipped) >= MAX_SEEN:
            del self.go_skipped[next(iter(self.go_skipped))]
        self.go_skipped[key] = why
        if not why.startswith("not a") and "does not use crypto/tls" not in why:
            log.info("TLS: Go crypto/tls in %s is not traced: %s", path, why)

    def _attach_go(self, key: tuple[int, int], exe: str, path: str, found: gotls.GoTls) -> None:
        programs = self.programs
        assert programs is not None
        target = self._short_path(key, exe)
        probes = [(found.write.name, found.write.entry, "go_tls_write_enter"),
                  (found.read.name, found.read.entry, "go_tls_read_enter")]
        probes += [(found.read.name, ret, "go_tls_read_return") for ret in found.read.returns]
        done: list[tuple[str, int]] = []
        for name, addr, fn in probes:
            try:
                programs.attach_uprobe(target, name, fn, addr=addr)
            except ProgramsClosing:
                return  # the agent stops: neither attached nor skipped
            except AttachError as e:
                # All or nothing: a Read entry without its returns would leave calls open.
                log.warning("TLS: %s; Go crypto/tls in %s is not traced", e, path)
                for n, a in done:
                    try:
                        programs.detach_uprobe(target, n, addr=a)
                    except AttachError:
                        pass
                if os.path.exists(exe):  # else the process is gone: another may run the file
                    self._skip_go(key, f"attach failed: {e}", path)
                return
            done.append((name, addr))
        self.go_binaries[key] = GoBinary(path, found.version, len(done), found.source)
        log.info("TLS: %d Go crypto/tls uprobes on %s (%s, functions from %s, offsets from %s)",
                 len(done), path, found.version, found.source, found.offsets_from)

    def _short_path(self, key: tuple[int, int], host_path: str) -> str:
        link = os.path.join(self.link_dir, f"{key[0]}-{key[1]}")
        try:
            os.makedirs(self.link_dir, exist_ok=True)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(host_path, link)
            return link
        except OSError as e:
            log.debug("TLS: no link in %s (%s): attaching by the full path", self.link_dir, e)
            return host_path

    def _attach(self, key: tuple[int, int], host_path: str, path: str) -> None:
        programs = self.programs
        assert programs is not None
        lib = Library(path, 0)
        target = self._short_path(key, host_path)
        for sym, prefix in SYMBOLS:
            try:
                programs.attach_uprobe(target, sym, f"{prefix}_enter")
            except ProgramsClosing:
                return  # the agent stops: the library is neither attached nor failed
            except AttachError:  # OpenSSL 1.0 has no SSL_*_ex; a stripped copy has none
                lib.missing.append(sym)
                continue
            lib.probes += 1
            try:
                programs.attach_uprobe(target, sym, f"{prefix}_exit", ret=True)
            except ProgramsClosing:
                return
            except AttachError as e:
                # An entry without its exit would leave calls open in the kernel's map: undo it.
                log.warning("TLS: %s; %s is not traced in %s", e, sym, path)
                try:
                    programs.detach_uprobe(target, sym)
                    lib.probes -= 1
                except AttachError:
                    pass
                lib.missing.append(sym)
                continue
            lib.probes += 1
        if lib.probes:
            self.libraries[key] = lib
            log.info("TLS: %d uprobes on %s%s", lib.probes, path,
                     f" (no {', '.join(lib.missing)})" if lib.missing else "")
        else:
            self.failed.add(key)
            log.warning("TLS: no OpenSSL symbols found in %s: its plaintext is not traced", path)
