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

An executable that defines SSL_write and SSL_read itself (OpenSSL or BoringSSL linked
statically: Node.js builds that bundle OpenSSL, Envoy) gets the libssl uprobes at those symbols'
addresses (agent/l7/tlsbin.py finds them), once per file, at most MAX_STATIC_SSL files. rustls
is found the same way (its Writer::write and Reader::read) and gets uprobes and uretprobes on both
(bpf/include/rustls.h), once per file, at most MAX_RUSTLS files; each process found running such a
file is entered in the kernel's rustls_tgids, so that its socket reads leave their fd for its
Reader::read from its first request on.

What was found and attached for each process, or why not, is kept per file and per process
(`describe`: /api/processes and `coroot-agent check` show it).

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
from agent.l7 import gotls, tlsbin
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
MAX_STATIC_SSL = 64  # executables with OpenSSL linked in that get uprobes (each: up to 8 probes)
MAX_PROCESSES = 16384  # processes whose TLS libraries are remembered for describe()
MAX_RUSTLS = 64  # executables with rustls that get uprobes (each: 4 probes)
# (rustls function in tlsbin.Linked.rustls, program prefix in bpf/rustls.c)
RUSTLS_PROBES = (("write", "rustls_write"), ("read", "rustls_read"))

# Found.library values
OPENSSL, OPENSSL_STATIC, GO, RUSTLS = "openssl", "openssl-static", "go", "rustls"


@dataclass
class Library:
    path: str
    probes: int
    missing: list[str] = field(default_factory=list)


@dataclass
class Found:
    """One TLS library a process uses, as /api/processes and `check` show it."""

    library: str  # OPENSSL (a shared libssl), OPENSSL_STATIC, GO (crypto/tls) or RUSTLS
    path: str  # the file, as the first process seen using it sees it
    attached: bool
    detail: str  # what is probed (and how it was found), or why nothing is

    def as_dict(self) -> dict[str, object]:
        return {"library": self.library, "path": self.path, "attached": self.attached, "detail": self.detail}


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
        self.static_ssl: dict[tuple[int, int], Library] = {}  # executables with OpenSSL linked in, attached
        self.rustls: dict[tuple[int, int], Library] = {}  # executables with rustls, attached
        self.files: dict[tuple[int, int], list[Found]] = {}  # per file: what was found (MAX_SEEN, oldest out)
        self.processes: dict[int, list[tuple[int, int]]] = {}  # pid -> its libssl files and executable
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
        if what == "removed":
            keys = self.processes.pop(proc.pid, None)
            if keys and any(k in self.rustls for k in keys):
                self._rustls_tgid(proc.pid, False)
            return
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
        f.gauge("coroot_agent_tls_static_executables", "Executables with OpenSSL linked in with uprobes attached",
                len(self.static_ssl))
        f.gauge("coroot_agent_tls_rustls_executables", "Executables with rustls with uprobes attached",
                len(self.rustls))

    def describe(self, pid: int) -> list[dict[str, object]] | None:
        """The TLS libraries found in a process and whether they are traced, or why not (one
        dict per library, [] when it uses none the agent knows); None when the process has not
        been looked at (yet)."""
        keys = self.processes.get(pid)
        if keys is None:
            return None
        return [found.as_dict() for key in keys for found in self.files.get(key, [])]

    def _found(self, key: tuple[int, int], found: Found) -> None:
        entries = self.files.get(key)
        if entries is None:
            while len(self.files) >= MAX_SEEN:
                del self.files[next(iter(self.files))]
            entries = self.files[key] = []
        entries[:] = [e for e in entries if e.library != found.library] + [found]

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
        keys: list[tuple[int, int]] = []
        for path in ssl_libraries(self.procfs, pid):
            host_path = f"{self.procfs}/{pid}/root{path}"
            try:
                st = os.stat(host_path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            keys.append(key)
            if key in self.libraries or key in self.failed:
                continue
            self._attach(key, host_path, path)
        exe = self.scan_exe(pid)
        if exe is not None:
            keys.append(exe)
            if exe in self.rustls:
                self._rustls_tgid(pid, True)
        if self.programs is None:
            return  # the agent stops
        if pid not in self.processes:
            while len(self.processes) >= MAX_PROCESSES:
                del self.processes[next(iter(self.processes))]
        self.processes[pid] = keys

    def scan_exe(self, pid: int) -> tuple[int, int] | None:
        """Look at the process's executable: OpenSSL linked in, rustls, Go crypto/tls. Its
        (device, inode), None when it cannot be read."""
        exe = f"{self.procfs}/{pid}/exe"
        try:
            st = os.stat(exe)
            path = os.readlink(exe)
        except OSError:  # gone already, or a kernel thread
            return None
        key = (st.st_dev, st.st_ino)
        if key not in self.files and key not in self.static_ssl and key not in self.rustls:
            try:
                linked = tlsbin.inspect_path(exe)
            except OSError:  # the process is gone: the file may be looked at with the next one
                return None
            except tlsbin.NotElf:
                linked = tlsbin.Linked()
            self._found_nothing(key)
            if linked.static_openssl:
                self._attach_static(key, exe, path, linked)
            if linked.rustls:
                self._attach_rustls(key, exe, path, linked)
        self.scan_go(pid, key, exe, path)
        return key

    def _found_nothing(self, key: tuple[int, int]) -> None:
        """Remember that the file was looked at (nothing found so far)."""
        if key not in self.files:
            while len(self.files) >= MAX_SEEN:
                del self.files[next(iter(self.files))]
            self.files[key] = []

    def _attach_static(self, key: tuple[int, int], exe: str, path: str, linked: tlsbin.Linked) -> None:
        if len(self.static_ssl) >= MAX_STATIC_SSL:
            why = f"not traced: already {MAX_STATIC_SSL} executables with OpenSSL linked in traced"
            log.info("TLS: OpenSSL linked into %s is %s", path, why)
            self._found(key, Found(OPENSSL_STATIC, path, False, why))
            return
        lib = self._attach(key, exe, path, linked.openssl, static=True)
        if lib is not None:
            self.static_ssl[key] = lib
        elif not os.path.exists(exe):  # the process is gone: another may run the file
            self.files.pop(key, None)

    def _attach_rustls(self, key: tuple[int, int], exe: str, path: str, linked: tlsbin.Linked) -> None:
        """Uprobes and uretprobes on rustls's Writer::write and Reader::read, all or none."""
        programs = self.programs
        assert programs is not None
        found = f"rustls Writer::write and Reader::read found ({', '.join(sorted(linked.rustls))}) in " \
                f"{'/'.join(linked.tables)}"
        missing = [name for name, _ in RUSTLS_PROBES if name not in linked.rustls]
        if missing:
            self._found(key, Found(RUSTLS, path, False, f"{found}; not traced: no {', '.join(missing)}"))
            return
        if len(self.rustls) >= MAX_RUSTLS:
            why = f"not traced: already {MAX_RUSTLS} executables with rustls traced"
            log.info("TLS: rustls in %s is %s", path, why)
            self._found(key, Found(RUSTLS, path, False, f"{found}; {why}"))
            return
        target = self._short_path(key, exe)
        done: list[tuple[str, int, bool]] = []
        for name, prefix in RUSTLS_PROBES:
            addr = linked.rustls[name]
            symbol = f"rustls_{name}"
            for ret in (False, True):
                try:
                    programs.attach_uprobe(target, symbol, f"{prefix}_{'exit' if ret else 'enter'}", ret=ret,
                                           addr=addr)
                except ProgramsClosing:
                    return  # the agent stops: neither attached nor failed
                except AttachError as e:
                    log.warning("TLS: %s; rustls in %s is not traced", e, path)
                    for sym, a, r in done:  # an entry without its return would leave calls open
                        try:
                            programs.detach_uprobe(target, sym, ret=r, addr=a)
                        except AttachError:
                            pass
                    if os.path.exists(exe):  # else the process is gone: another may run the file
                        self._found(key, Found(RUSTLS, path, False, f"{found}; not traced: attach refused: {e}"))
                    else:
                        self.files.pop(key, None)
                    return
                done.append((symbol, addr, ret))
        self.rustls[key] = Library(path, len(done))
        self._found(key, Found(RUSTLS, path, True, f"{found}: {len(done)} uprobes"))
        log.info("TLS: %d rustls uprobes on %s", len(done), path)

    def _rustls_tgid(self, pid: int, add: bool) -> None:
        """Enter a process running a traced rustls executable in the kernel's rustls_tgids (or
        take it out): its socket reads then leave their fd for its Reader::read."""
        if self.programs is None:
            return
        try:
            m = self.programs.map("rustls_tgids")
            key = m.key(pid)
            if add:
                m.set(key, m.leaf(1))
            else:
                m.delete(key)
        except (KeyError, AttributeError) as e:  # the l7 family is not loaded (or a stand-in)
            log.debug("TLS: rustls_tgids: %s", e)

    def scan_go(self, pid: int, key: tuple[int, int], exe: str, path: str) -> None:
        """Attach the Go crypto/tls probes to the process's executable if it needs them."""
        if self.programs is None:
            return
        if key in self.go_binaries or key in self.go_skipped:
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
            self._found(key, Found(GO, path, False, f"not traced: {why}"))

    def _attach_go(self, key: tuple[int, int], exe: str, path: str, found: gotls.GoTls) -> None:
        programs = self.programs
        assert programs is not None
        target = self._short_path(key, exe)
        sfx = "_stack" if found.abi == gotls.STACK else ""  # bpf/l7.c: the stack ABI's programs
        probes = [(found.write.name, found.write.entry, f"go_tls_write_enter{sfx}"),
                  (found.read.name, found.read.entry, f"go_tls_read_enter{sfx}")]
        probes += [(found.read.name, ret, f"go_tls_read_return{sfx}") for ret in found.read.returns]
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
        self._found(key, Found(GO, path, True, f"Go crypto/tls ({found.abi} ABI): attached, {found.version}: "
                               f"{len(done)} uprobes, functions from {found.source}, offsets from "
                               f"{found.offsets_from}"))
        log.info("TLS: %d Go crypto/tls uprobes on %s (%s, functions from %s, offsets from %s, %s ABI)",
                 len(done), path, found.version, found.source, found.offsets_from, found.abi)

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

    def _uprobe(self, target: str, sym: str, fn: str, ret: bool, addr: int | None) -> None:
        """Attach by symbol name (a libssl), or at `addr` (an executable's own OpenSSL)."""
        assert self.programs is not None
        if addr is None:
            self.programs.attach_uprobe(target, sym, fn, ret=ret)
        else:
            self.programs.attach_uprobe(target, sym, fn, ret=ret, addr=addr)

    def _attach(self, key: tuple[int, int], host_path: str, path: str, addrs: dict[str, int] | None = None,
                static: bool = False) -> Library | None:
        """The OpenSSL uprobes on a libssl (by symbol name) or on an executable with OpenSSL
        linked in (`static`: at the addresses `addrs` its symbol tables give)."""
        programs = self.programs
        assert programs is not None
        lib = Library(path, 0)
        target = self._short_path(key, host_path)
        refused = ""
        for sym, prefix in SYMBOLS:
            addr = addrs.get(sym) if addrs is not None else None  # by name in a libssl
            if addrs is not None and addr is None:
                lib.missing.append(sym)
                continue
            try:
                self._uprobe(target, sym, f"{prefix}_enter", False, addr)
            except ProgramsClosing:
                return None  # the agent stops: the library is neither attached nor failed
            except AttachError as e:  # OpenSSL 1.0 has no SSL_*_ex; a stripped copy has none
                lib.missing.append(sym)
                refused = refused or str(e)
                continue
            lib.probes += 1
            try:
                self._uprobe(target, sym, f"{prefix}_exit", True, addr)
            except ProgramsClosing:
                return None
            except AttachError as e:
                # An entry without its exit would leave calls open in the kernel's map: undo it.
                log.warning("TLS: %s; %s is not traced in %s", e, sym, path)
                refused = refused or str(e)
                try:
                    if addr is None:
                        programs.detach_uprobe(target, sym)
                    else:
                        programs.detach_uprobe(target, sym, addr=addr)
                    lib.probes -= 1
                except AttachError:
                    pass
                lib.missing.append(sym)
                continue
            lib.probes += 1
        kind = OPENSSL_STATIC if static else OPENSSL
        where = " (OpenSSL linked into the executable)" if static else ""
        no = f" (no {', '.join(lib.missing)})" if lib.missing else ""
        if lib.probes:
            if not static:
                self.libraries[key] = lib
            log.info("TLS: %d uprobes on %s%s%s", lib.probes, path, where, no)
            self._found(key, Found(kind, path, True, f"{lib.probes} uprobes{no}"))
            return lib
        if not static:
            self.failed.add(key)
        why = f"attach refused: {refused}" if refused else "no OpenSSL symbols"
        log.warning("TLS: %s in %s: its plaintext is not traced", why, path)
        self._found(key, Found(kind, path, False, f"not traced: {why}"))
        return None
