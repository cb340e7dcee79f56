""".NET runtime metrics from the runtime's own EventCounters (provider System.Runtime), read over
its diagnostics IPC socket as the Coroot node agent does (containers/dotnet.go):
container_dotnet_info{runtime_version}, container_dotnet_memory_allocated_bytes_total,
container_dotnet_exceptions_total, container_dotnet_memory_heap_size_bytes{generation},
container_dotnet_gc_count_total{generation}, container_dotnet_heap_fragmentation_percent,
container_dotnet_monitor_lock_contentions_total, container_dotnet_thread_pool_completed_items_total,
container_dotnet_thread_pool_queue_length and container_dotnet_thread_pool_size, each with the
container's labels and `application`.

Which processes: those of a container that map libcoreclr.so (every .NET Core process does:
`dotnet app.dll`, an apphost, a self-contained app, a runtime hosted by another program). The
host loads it after exec: a process without it is looked at again 1, 2, 4, 8 and 16 s later. The
application's name is the node agent's: `app` of `dotnet app.dll`, else the executable's name.
The runtime version: ProcessInfo2's product version (.NET 5+), else the name of the directory
libcoreclr.so is in (shared/Microsoft.NETCore.App/<version>/).

Where: the runtime listens on <TMPDIR or /tmp>/dotnet-diagnostic-<pid>-<key>-socket of its own
mount namespace, with its pid as that namespace numbers it. The directory is resolved inside
/proc/PID/root with agent/logs/safeopen.py (no link leads out), only a socket entry is taken,
and once connected the peer must be the process itself (SO_PEERCRED): a process that swaps the
entry for something else reaches nothing but itself.

The protocol (dotnet/diagnostics ipc-protocol.md): a 20-byte header ("DOTNET_IPC_V1\\0", size,
command set, command, reserved), then the command's payload; EventPipe CollectTracing with
System.Runtime and EventCounterIntervalSec; the answer is the session id, then the nettrace
stream on the same connection (agent/runtime/nettrace.py). Every socket operation has a
timeout: a process that answers garbage or nothing is dropped, counted, and tried again later
(1 s doubling to 60 s). One thread per followed process (at most MAX_PROCESSES).

Counter semantics: "Sum" counters (alloc-rate, exception-count, gen-N-gc-count,
monitor-lock-contention-count, threadpool-completed-items-count) report the increment of an
interval and are added up into counters; "Mean" counters are the last value. The node agent
keeps container_dotnet_exceptions_total as the last interval's count; here it is the total,
which is what its name says (the runtime's first report may hold the exceptions since it
started, or only the session's: both were seen with .NET Core 3.1). Sizes in MB are in bytes (x 1e6, as the runtime divides).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.containers.registry import Process, Registry
from agent.logs import safeopen
from agent.metrics import Families
from agent.runtime import nettrace
from agent.runtime.follow import RoundThread
from agent.runtime.jvm import ns_pid

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 5  # EventCounterIntervalSec, as the node agent's
IO_TIMEOUT = 0.5  # connect and each command's answer (the node agent's dial timeout)
MAX_PROCESSES = 64
MAX_CLASSIFY_PER_ROUND = 1024
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
MAPS_MAX = 4 << 20
CMDLINE_MAX = 64 << 10
ENVIRON_MAX = 256 << 10
MAX_TMP_ENTRIES = 10_000
PROVIDER = "System.Runtime"
RELOOK_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)  # a process not .NET yet is looked at again (the runtime loads after exec)
MAX_RELOOK = 8192

MAGIC = b"DOTNET_IPC_V1\0"
HEADER = struct.Struct("<14sHBBH")
EVENTPIPE, PROCESS, SERVER = 0x02, 0x04, 0xFF
COLLECT_TRACING, PROCESS_INFO2 = 0x02, 0x04
OK = 0x00

_CORECLR = re.compile(rb"\s(/\S*/)?libcoreclr\.so\s*\Z")
_VERSION = re.compile(r"/(\d+\.\d+\.\d+[^/]*)/libcoreclr\.so\Z")

# counter name -> (metric, kind, generation label)
_SUMS = {"alloc-rate": "alloc", "exception-count": "exceptions", "monitor-lock-contention-count": "contentions",
         "threadpool-completed-items-count": "completed", "gen-0-gc-count": "Gen0", "gen-1-gc-count": "Gen1",
         "gen-2-gc-count": "Gen2"}
_GAUGES = {"gen-0-size": "Gen0", "gen-1-size": "Gen1", "gen-2-size": "Gen2", "loh-size": "LOH", "poh-size": "POH",
           "gc-fragmentation": "fragmentation", "threadpool-queue-length": "queue",
           "threadpool-thread-count": "threads"}


class IpcError(Exception):
    """The diagnostics socket cannot be reached, or answered what this does not understand."""


def coreclr_path(maps: bytes) -> str | None:
    """The path of the libcoreclr.so a process maps, or None: not .NET Core."""
    for line in maps.splitlines():
        if line.endswith(b"libcoreclr.so") and _CORECLR.search(line):
            return line.split(None, 5)[-1].strip().decode(errors="replace")
    return None


def version_from_path(path: str) -> str:
    m = _VERSION.search(path)
    return m.group(1) if m else ""


def app_name(cmdline: bytes, exe: str) -> str:
    parts = cmdline.split(b"\0")
    if len(parts) >= 2 and parts[0].endswith(b"dotnet") and parts[1].endswith(b".dll"):
        return os.path.basename(parts[1][:-4].decode(errors="replace"))
    return os.path.basename(exe.removesuffix(" (deleted)"))


def tmpdir(environ: bytes) -> str:
    """Where the runtime puts its socket: $TMPDIR (an absolute path) or /tmp."""
    for item in environ.split(b"\0"):
        if item.startswith(b"TMPDIR="):
            v = item[7:].decode(errors="replace").rstrip("/")
            if v.startswith("/") and "\0" not in v:
                return v
    return "/tmp"


def _string(s: str) -> bytes:
    """An IPC string: its length in UTF-16 units with the NUL, then UTF-16LE with the NUL."""
    if not s:
        return struct.pack("<I", 0)
    b = (s + "\0").encode("utf-16-le")
    return struct.pack("<I", len(b) // 2) + b


def message(command_set: int, command: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, HEADER.size + len(payload), command_set, command, 0) + payload


def collect_tracing_payload(interval: int = INTERVAL_SECONDS, buffer_mb: int = 10) -> bytes:
    """CollectTracing: buffer size, format 1 (nettrace), one provider: all keywords, level 5
    (verbose), EventCounterIntervalSec=interval."""
    provider = struct.pack("<QI", 0x7FFF_FFFF_FFFF_FFFF, 5) + _string(PROVIDER) + \
        _string(f"EventCounterIntervalSec={interval}")
    return struct.pack("<III", buffer_mb, 1, 1) + provider


def parse_header(b: bytes) -> tuple[int, int, int]:
    """(size, command set, command) of an answer's header. Raises IpcError."""
    if len(b) != HEADER.size:
        raise IpcError("short header")
    magic, size, cs, cmd, _ = HEADER.unpack(b)
    if magic != MAGIC or size < HEADER.size:
        raise IpcError("not a diagnostics IPC answer")
    return size, cs, cmd


def read_utf16_string(b: bytes, pos: int) -> tuple[str, int]:
    if pos + 4 > len(b):
        raise IpcError("short string")
    (n,) = struct.unpack_from("<I", b, pos)
    pos += 4
    if pos + 2 * n > len(b):
        raise IpcError("short string")
    return b[pos:pos + 2 * n].decode("utf-16-le", errors="replace").rstrip("\0"), pos + 2 * n


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            b = sock.recv(min(n - got, 1 << 16))
        except TimeoutError as e:
            raise IpcError("no answer in time") from e
        except OSError as e:
            raise IpcError(str(e)) from e
        if not b:
            raise IpcError("connection closed")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def find_socket(root: str, tmp: str, nspid: int) -> tuple[int, str]:
    """An O_PATH descriptor of `tmp` inside `root` and the name of the process's socket there.
    Raises IpcError or OSError."""
    dfd = safeopen.resolve_in_root(root, tmp, prefix="/")
    try:
        if not stat.S_ISDIR(os.fstat(dfd).st_mode):
            raise IpcError(f"{tmp} is not a directory")
        prefix = f"dotnet-diagnostic-{nspid}-"
        rfd = os.open(f"/proc/self/fd/{dfd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
        found = []
        try:
            with os.scandir(rfd) as it:
                for n, e in enumerate(it):
                    if n >= MAX_TMP_ENTRIES:
                        break
                    if e.name.startswith(prefix) and e.name.endswith("-socket"):
                        found.append(e.name)
        finally:
            os.close(rfd)
        for name in sorted(found, reverse=True):  # the newest key (start time) first
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISSOCK(st.st_mode):
                return dfd, name
        raise IpcError(f"no {tmp}/{prefix}*-socket")
    except BaseException:
        os.close(dfd)
        raise


def connect(procfs: str, pid: int, tmp: str, timeout: float = IO_TIMEOUT) -> tuple[socket.socket, str]:
    """A connection to the process's diagnostics socket, checked to be the process's own."""
    nspid = ns_pid(procfs, pid)
    dfd, name = find_socket(f"{procfs}/{pid}/root", tmp, nspid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            s.connect(f"/proc/self/fd/{dfd}/{name}")
        except OSError as e:
            raise IpcError(f"connect {tmp}/{name}: {e}") from e
        peer_pid = struct.unpack("<iII", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        if peer_pid != pid:
            raise IpcError(f"{tmp}/{name} is served by pid {peer_pid}, not {pid}")
        return s, f"{tmp}/{name}"
    except BaseException:
        s.close()
        raise
    finally:
        os.close(dfd)


def request(s: socket.socket, command_set: int, command: int, payload: bytes = b"", limit: int = 1 << 16) -> bytes:
    """Sends a command; the OK answer's payload. Raises IpcError (an error answer included)."""
    try:
        s.sendall(message(command_set, command, payload))
    except OSError as e:
        raise IpcError(f"send: {e}") from e
    size, cs, cmd = parse_header(recv_exact(s, HEADER.size))
    if size - HEADER.size > limit:
        raise IpcError(f"answer of {size} bytes")
    body = recv_exact(s, size - HEADER.size)
    if cs != SERVER or cmd != OK:
        code = struct.unpack_from("<I", body)[0] if len(body) >= 4 else 0
        raise IpcError(f"error answer {cs:#x}/{cmd:#x} {code:#x}")
    return body


def product_version(s: socket.socket) -> str:
    """ProcessInfo2's CLR product version (.NET 5+). Raises IpcError."""
    body = request(s, PROCESS, PROCESS_INFO2)
    pos = 8 + 0  # process id
    for _ in range(3):  # command line, OS, architecture
        _, pos = read_utf16_string(body, pos)
    pos += 16  # runtime cookie
    _, pos = read_utf16_string(body, pos)  # managed entrypoint assembly
    v, _ = read_utf16_string(body, pos)
    return v.split("+")[0].split("-")[0] if v else ""


@dataclass
class Counters:
    """The counters of one process, as the node agent exports them."""

    sums: dict[str, float] = field(default_factory=dict)  # alloc, exceptions, contentions, completed, Gen0..2
    gauges: dict[str, float] = field(default_factory=dict)
    updated: float = 0.0

    def add(self, values: dict[str, object]) -> None:
        name = values.get("Name")
        kind = values.get("CounterType")
        units = values.get("DisplayUnits")
        if not isinstance(name, str):
            return
        raw = values.get("Increment") if kind == "Sum" else values.get("Mean") if kind == "Mean" else None
        if not isinstance(raw, (int, float)) or raw != raw:  # missing or NaN
            return
        v = float(raw) * (1e6 if units == "MB" else 1.0)
        if name in _SUMS and kind == "Sum":
            key = _SUMS[name]
            self.sums[key] = self.sums.get(key, 0.0) + v
        elif name in _GAUGES:
            self.gauges[_GAUGES[name]] = v


@dataclass
class _DotNet:
    pid: int
    start_ticks: int
    container_id: str
    app: str
    tmp: str
    version: str
    status: str = "pending"  # pending, attached, error
    detail: str = ""
    socket_path: str = ""
    counters: Counters = field(default_factory=Counters)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    sock: socket.socket | None = None


class DotNetMetrics(RoundThread):
    """container_dotnet_* for the .NET processes of every reported container."""

    name = "dotnet"

    def __init__(self, registry: Registry, procfs: str = "/proc", interval: int = INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.procfs = procfs
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, None] = {}
        self._procs: dict[int, _DotNet] = {}
        self._relook: dict[int, tuple[float, int]] = {}  # pid -> (when, looks so far)
        self._init_thread()
        self.sessions: dict[str, int] = {}  # result -> count
        self.dropped = 0

    # ------------------------------------------------------------ events ---

    def on_process(self, what: str, proc: Process) -> None:
        with self._lock:
            if what == "added":
                if proc.container_id is not None:
                    self._pending[proc.pid] = None
            elif what == "removed":
                self._pending.pop(proc.pid, None)
                self._relook.pop(proc.pid, None)
                d = self._procs.get(proc.pid)
                if d is not None and d.start_ticks == proc.start_ticks:
                    self._forget(d)

    def _forget(self, d: _DotNet) -> None:
        """Under the lock."""
        self._procs.pop(d.pid, None)
        d.stop.set()
        s = d.sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------ thread ---

    def round(self) -> None:
        self._sync_pending()
        now = self._clock()
        with self._lock:
            for pid, (when, _) in list(self._relook.items()):
                if when <= now:
                    self._pending[pid] = None
            batch = list(self._pending)[:MAX_CLASSIFY_PER_ROUND]
            for pid in batch:
                del self._pending[pid]
        for pid in batch:
            self._classify(pid)

    def _read(self, pid: int, name: str, limit: int) -> bytes:
        try:
            with open(f"{self.procfs}/{pid}/{name}", "rb") as f:
                return f.read(limit)
        except OSError:
            return b""

    def _classify(self, pid: int) -> None:
        proc = self.registry.process(pid)
        if proc is None or proc.container_id is None:
            return
        lib = coreclr_path(self._read(pid, "maps", MAPS_MAX))
        with self._lock:
            old = self._procs.get(pid)
            if old is not None and (lib is None or old.start_ticks != proc.start_ticks):
                self._forget(old)
            elif old is not None:
                return
        if lib is None:
            with self._lock:
                _, looks = self._relook.pop(pid, (0.0, 0))
                if looks < len(RELOOK_SECONDS) and len(self._relook) < MAX_RELOOK:
                    self._relook[pid] = (self._clock() + RELOOK_SECONDS[looks], looks + 1)
            return
        with self._lock:
            self._relook.pop(pid, None)
        try:
            exe = os.readlink(f"{self.procfs}/{pid}/exe")
        except OSError:
            exe = ""
        d = _DotNet(pid, proc.start_ticks, proc.container_id, app_name(self._read(pid, "cmdline", CMDLINE_MAX), exe),
                    tmpdir(self._read(pid, "environ", ENVIRON_MAX)), version_from_path(lib))
        with self._lock:
            if self._stop.is_set():
                return
            if len(self._procs) >= MAX_PROCESSES:
                self.dropped += 1
                return
            self._procs[pid] = d
        d.thread = threading.Thread(target=self._follow, args=(d,), name=f"dotnet-{pid}", daemon=True)
        d.thread.start()

    def _follow(self, d: _DotNet) -> None:
        backoff = BACKOFF_MIN
        while not d.stop.is_set():
            try:
                self._session(d)
                result, detail = "closed", "the runtime ended the session"
            except nettrace.Invalid as e:
                result, detail = "invalid", f"nettrace: {e}"
            except IpcError as e:
                result, detail = "ipc_error", str(e)
            except safeopen.Refused as e:
                result, detail = "refused", str(e)
            except OSError as e:
                result, detail = "error", str(e)
            with self._lock:
                d.sock = None
                self.sessions[result] = self.sessions.get(result, 0) + 1
                if d.status == "attached":
                    backoff = BACKOFF_MIN
                d.status, d.detail = "error", f"{result}: {detail}"
            if not d.stop.is_set():
                log.debug("dotnet: pid %d (%s): %s: %s; again in %gs", d.pid, d.container_id, result, detail, backoff)
            d.stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _session(self, d: _DotNet) -> None:
        if not d.version:
            try:
                s, _ = connect(self.procfs, d.pid, d.tmp)
                try:
                    d.version = product_version(s)
                finally:
                    s.close()
            except IpcError:
                pass
        s, path = connect(self.procfs, d.pid, d.tmp)
        with self._lock:
            if d.stop.is_set():
                s.close()
                return
            d.sock, d.socket_path = s, path
        try:
            request(s, EVENTPIPE, COLLECT_TRACING, collect_tracing_payload(self.interval))
            # the stream: a block at least every interval (the counters), so silence is an error
            s.settimeout(self.interval * 2 + 5)
            reader = nettrace.Reader(lambda n: recv_exact(s, n))
            reader.open()
            with self._lock:
                d.status, d.detail = "attached", ""
            log.debug("dotnet: pid %d (%s): EventCounters from %s", d.pid, d.container_id, path)
            while not d.stop.is_set() and not reader.ended:
                for ev in reader.next_block():
                    if ev.metadata.provider == PROVIDER:
                        with self._lock:
                            d.counters.add(ev.values)
                            d.counters.updated = self._clock()
        finally:
            s.close()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            procs = list(self._procs.values())
            for d in procs:
                self._forget(d)
        self._stop_thread()
        for d in procs:
            if d.thread is not None:
                d.thread.join(timeout=1.0)

    # ----------------------------------------------------------- answers ---

    def describe(self, pid: int) -> dict[str, object] | None:
        """What /api/processes says of a .NET process: its socket and state, or why not."""
        with self._lock:
            d = self._procs.get(pid)
            if d is None:
                return None
            out: dict[str, object] = {"status": d.status, "socket": d.socket_path or None,
                                      "application": d.app, "runtime_version": d.version or "unknown"}
            if d.detail:
                out["detail"] = d.detail
            return out

    def collect(self, f: Families) -> None:
        now = self._clock()
        with self._lock:
            snap = sorted((d.container_id, d.pid, d.app, d.version, Counters(dict(d.counters.sums),
                           dict(d.counters.gauges), d.counters.updated)) for d in self._procs.values()
                          if d.counters.updated and now - d.counters.updated <= 2 * self.interval + 5)
        seen: set[tuple[str, str]] = set()
        for cid, _pid, app, version, c in snap:
            ctr = self.registry.container(cid)
            if ctr is None or (cid, app) in seen:
                continue
            seen.add((cid, app))
            lb = {"container_id": cid, "app_id": ctr.app_id, "application": app}
            f.gauge("container_dotnet_info", "Meta information about the Common Language Runtime (CLR)", 1, **lb,
                    runtime_version=version or "unknown")
            f.counter("container_dotnet_memory_allocated_bytes_total", "The number of bytes allocated",
                      c.sums.get("alloc", 0.0), **lb)
            f.counter("container_dotnet_exceptions_total", "The number of exceptions that have occurred",
                      c.sums.get("exceptions", 0.0), **lb)
            for gen in ("Gen0", "Gen1", "Gen2", "LOH", "POH"):
                if gen in c.gauges:
                    f.gauge("container_dotnet_memory_heap_size_bytes", "Total size of the heap generation in bytes",
                            c.gauges[gen], **lb, generation=gen)
            for gen in ("Gen0", "Gen1", "Gen2"):
                f.counter("container_dotnet_gc_count_total", "The number of times GC has occurred for the generation",
                          c.sums.get(gen, 0.0), **lb, generation=gen)
            if "fragmentation" in c.gauges:
                f.gauge("container_dotnet_heap_fragmentation_percent", "The heap fragmentation",
                        c.gauges["fragmentation"], **lb)
            f.counter("container_dotnet_monitor_lock_contentions_total",
                      "The number of times there was contention when trying to take the monitor's lock",
                      c.sums.get("contentions", 0.0), **lb)
            f.counter("container_dotnet_thread_pool_completed_items_total",
                      "The number of work items that have been processed in the ThreadPool",
                      c.sums.get("completed", 0.0), **lb)
            if "queue" in c.gauges:
                f.gauge("container_dotnet_thread_pool_queue_length",
                        "The number of work items that are currently queued to be processed in the ThreadPool",
                        c.gauges["queue"], **lb)
            if "threads" in c.gauges:
                f.gauge("container_dotnet_thread_pool_size",
                        "The number of thread pool threads that currently exist in the ThreadPool",
                        c.gauges["threads"], **lb)

    def self_metrics(self, f: Families) -> None:
        with self._lock:
            n = len(self._procs)
            sessions = dict(self.sessions)
        f.gauge("coroot_agent_dotnet_processes", ".NET processes the agent follows", n)
        for result, count in sorted(sessions.items()):
            f.counter("coroot_agent_dotnet_sessions_total", "ended EventPipe sessions with .NET processes by result",
                      count, result=result)
        f.counter("coroot_agent_dotnet_dropped_total", f".NET processes not followed: more than {MAX_PROCESSES} were",
                  self.dropped)
