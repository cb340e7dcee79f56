"""JVM metrics from the JVM's own performance counters (hsperfdata), as the Coroot node agent
exports them: container_jvm_info{jvm,java_version}, container_jvm_heap_{size,used,max_size}_bytes,
container_jvm_gc_time_seconds{gc}, container_jvm_safepoint_time_seconds and
container_jvm_safepoint_sync_time_seconds, each with the container's labels and `jvm`.

Which processes: those of a container whose command's first word ends with "java" (the node
agent's rule). Where: the JVM keeps its counters in /tmp/hsperfdata_<user>/<pid> of its own
mount namespace, under its own pid as that namespace numbers it (NSpid in /proc/PID/status);
the file is found through /proc/PID/root, in whichever hsperfdata_* directory holds it (the
user name is the container's, not the host's). The path is under the control of the process
that owns it, so it is resolved with agent/logs/safeopen.py: inside that root, under /tmp,
never through a link that leads out, and only a regular file is opened.

What the numbers are (hsperf/hsperf.go in the node agent): `jvm` is sun.rt.javaCommand (the
main class or jar and its arguments); heap size, used and maximum are the sums of the
capacity, used and maxCapacity of every space of generations 0 and 1 (eden, survivors, old);
GC time is each of sun.gc.collector.{0,1,2}.time by its name; safepoint and sync time are
sun.rt.safepointTime and sun.rt.safepointSyncTime. Times are ticks over sun.os.hrt.frequency.
Two processes of one container with the same `jvm` report once, the lower pid's.

The three times are counters in the node agent, exposed there under these very names (no
`_total`), which the Coroot server queries: here they are agent.metrics exact counters.

A JVM run with -XX:-UsePerfData keeps no counters, and one with -XX:+PerfDisableSharedMem keeps
them in memory only: nothing to read, nothing exported; the options are read from the command
line and JAVA_TOOL_OPTIONS / JDK_JAVA_OPTIONS / _JAVA_OPTIONS, the reason goes to a debug log
and to /api/processes (`describe`). A JVM whose file is not there (yet) is looked for again,
less and less often.

All file work happens on the component's own thread (a container's /tmp may be any
filesystem, a FUSE one that never answers included), never on the poll thread: process events
only queue pids. Bounded: JVMs tracked, files read per round, bytes per file, /tmp entries
looked at. A scrape reads the last result.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.containers.registry import Process, Registry
from agent.logs import safeopen
from agent.metrics import Families
from agent.runtime import hsperfdata
from agent.runtime.follow import RoundThread

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0  # a JVM's counters are read again after this
MAX_JVMS = 4096
MAX_READS_PER_ROUND = 64
MAX_CLASSIFY_PER_ROUND = 1024
MAX_FILE_BYTES = 1 << 20  # PerfDataMemorySize is 64 KiB by default (32 KiB seen on JDK 17); 1 MiB is plenty
MAX_TMP_ENTRIES = 10_000  # entries of a container's /tmp looked at for hsperfdata_* directories
MAX_USER_DIRS = 16
CMDLINE_MAX = 256 << 10
ENVIRON_MAX = 256 << 10
MISSING_BACKOFF_MAX = 60.0
HSPERFDATA_PREFIX = "hsperfdata_"

# Launcher options whose value is the next argument: they do not end the JVM's options.
_VALUE_OPTIONS = frozenset({
    b"-cp", b"-classpath", b"--class-path", b"-p", b"--module-path", b"--upgrade-module-path",
    b"--add-modules", b"--limit-modules", b"--add-reads", b"--add-exports", b"--add-opens",
    b"--patch-module", b"--enable-native-access", b"--source",
})
_OPTION_ENVS = (b"JAVA_TOOL_OPTIONS", b"JDK_JAVA_OPTIONS")  # before the command line's options
_OVERRIDE_ENV = b"_JAVA_OPTIONS"  # after them

# The entries the metrics need (the rest of the ~190 are not decoded).
_WANTED_PREFIXES = ("sun.gc.generation.", "sun.gc.collector.")
_WANTED = frozenset({"sun.rt.javaCommand", "java.property.java.version", "sun.rt.safepointTime",
                     "sun.rt.safepointSyncTime", "sun.os.hrt.frequency"})


def _wanted(name: str) -> bool:
    if name in _WANTED:
        return True
    if not name.startswith(_WANTED_PREFIXES):
        return False
    # generation/space capacities and names, collector names and times; not the age tables
    return name.endswith((".spaces", ".capacity", ".used", ".maxCapacity", ".name", ".time")) \
        and ".agetable." not in name


def is_jvm(cmdline: bytes) -> bool:
    """The node agent's rule: the command's first word ends with "java"."""
    i = cmdline.find(b"\0")
    return i > 0 and cmdline[:i].endswith(b"java")


def jvm_options(args: list[bytes]) -> list[bytes]:
    """The options a `java` command line gives the JVM: its arguments up to the main class,
    the -jar file or the module (the program's own arguments come after)."""
    out = []
    i = 1
    while i < len(args):
        a = args[i]
        if not a.startswith(b"-") or a in (b"-jar", b"-m", b"--module") or a.startswith(b"--module="):
            break
        out.append(a)
        if a in _VALUE_OPTIONS:
            i += 1
        i += 1
    return out


@dataclass(frozen=True)
class PerfSetting:
    enabled: bool = True  # -XX:+UsePerfData (the default)
    shared: bool = True  # not -XX:+PerfDisableSharedMem (the default)
    reason: str = ""  # why there is nothing to read, when there is not


def perf_setting(cmdline: bytes, environ: bytes) -> PerfSetting:
    """Whether the JVM keeps its counters in a file, from its options in the order HotSpot
    reads them (the last one wins): JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS, the command line,
    _JAVA_OPTIONS."""
    env = {}
    for item in environ.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k in (*_OPTION_ENVS, _OVERRIDE_ENV):
            env[k] = v
    opts: list[tuple[bytes, str]] = []
    for k in _OPTION_ENVS:
        opts += [(o, k.decode()) for o in env.get(k, b"").split()]
    opts += [(o, "command line") for o in jvm_options(cmdline.split(b"\0"))]
    opts += [(o, _OVERRIDE_ENV.decode()) for o in env.get(_OVERRIDE_ENV, b"").split()]
    enabled, shared, where_e, where_s = True, True, "", ""
    for o, where in opts:
        if o in (b"-XX:+UsePerfData", b"-XX:-UsePerfData"):
            enabled, where_e = o == b"-XX:+UsePerfData", where
        elif o in (b"-XX:+PerfDisableSharedMem", b"-XX:-PerfDisableSharedMem"):
            shared, where_s = o == b"-XX:-PerfDisableSharedMem", where
    if not enabled:
        return PerfSetting(False, shared, f"perf data disabled (-XX:-UsePerfData in {where_e})")
    if not shared:
        return PerfSetting(True, False, f"perf data not in a file (-XX:+PerfDisableSharedMem in {where_s})")
    return PerfSetting()


@dataclass(frozen=True)
class JvmStats:
    """What one read of a JVM's counters gives, in the node agent's units."""

    jvm: str
    java_version: str
    heap_size: float
    heap_used: float
    heap_max: float  # 0: not known
    gc_time: tuple[tuple[str, float], ...]  # (collector name, seconds)
    safepoint_time: float
    safepoint_sync_time: float

    @classmethod
    def from_perf(cls, pd: hsperfdata.PerfData) -> JvmStats:
        size = used = max_size = 0
        for gen in (0, 1):
            spaces = pd.integer(f"sun.gc.generation.{gen}.spaces") or 0
            for s in range(min(spaces, 64)):
                p = f"sun.gc.generation.{gen}.space.{s}."
                size += pd.integer(p + "capacity") or 0
                used += pd.integer(p + "used") or 0
                max_size += pd.integer(p + "maxCapacity") or 0
        gcs = []
        for c in range(3):
            name = pd.string(f"sun.gc.collector.{c}.name")
            if name:
                gcs.append((name, pd.seconds(f"sun.gc.collector.{c}.time") or 0.0))
        return cls(jvm=pd.string("sun.rt.javaCommand"), java_version=pd.string("java.property.java.version"),
                   heap_size=float(size), heap_used=float(used), heap_max=float(max_size), gc_time=tuple(gcs),
                   safepoint_time=pd.seconds("sun.rt.safepointTime") or 0.0,
                   safepoint_sync_time=pd.seconds("sun.rt.safepointSyncTime") or 0.0)


class NotFound(Exception):
    """No hsperfdata file for the process."""


def ns_pid(procfs: str, pid: int) -> int:
    """The process's pid in its own pid namespace (the last NSpid field)."""
    with open(f"{procfs}/{pid}/status", "rb") as f:
        for line in f.read(8192).splitlines():
            if line.startswith(b"NSpid:"):
                return int(line.split()[-1])
    return pid  # a kernel before 4.1: no NSpid line, and then no pid namespaces to speak of


def hsperfdata_dirs(root: str) -> list[str]:
    """The hsperfdata_* directory names in the /tmp of `root` (at most MAX_USER_DIRS, of the
    first MAX_TMP_ENTRIES entries). Only names are taken from here: each file is then opened
    under /tmp itself, so a /tmp that leads elsewhere yields names and no file."""
    opath = safeopen.resolve_in_root(root, "/tmp", prefix="/")
    try:
        if not stat.S_ISDIR(os.fstat(opath).st_mode):
            return []
        dfd = os.open(f"/proc/self/fd/{opath}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    finally:
        os.close(opath)
    names: list[str] = []
    try:
        with os.scandir(dfd) as it:
            for n, e in enumerate(it):
                if n >= MAX_TMP_ENTRIES or len(names) >= MAX_USER_DIRS:
                    break
                if e.name.startswith(HSPERFDATA_PREFIX) and "\0" not in e.name:
                    names.append(e.name)
    finally:
        os.close(dfd)
    return sorted(names)


def open_hsperfdata(root: str, nspid: int, known: str | None = None) -> tuple[int, str]:
    """A read-only descriptor of the JVM's file under `root` and its path there; `known`, the
    path found before, is tried first. Raises NotFound, safeopen.Refused or OSError."""
    if known:
        try:
            return safeopen.open_in_root(root, known, prefix="/tmp"), known
        except FileNotFoundError:
            pass
    for d in hsperfdata_dirs(root):
        path = f"/tmp/{d}/{nspid}"
        if path == known:
            continue
        try:
            return safeopen.open_in_root(root, path, prefix="/tmp"), path
        except FileNotFoundError:
            continue
    raise NotFound(f"no /tmp/hsperfdata_*/{nspid}")


def read_bounded(fd: int, limit: int = MAX_FILE_BYTES) -> bytes:
    """The whole file, if it is at most `limit` bytes. Raises ValueError beyond that."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise ValueError(f"{size} bytes, more than {limit}")
    chunks, got = [], 0
    while got < size:
        b = os.pread(fd, size - got, got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


@dataclass
class _Jvm:
    pid: int
    start_ticks: int
    container_id: str
    setting: PerfSetting
    status: str = "pending"  # ok, pending, disabled, not_shared, missing, not_ready, invalid, refused, too_large, error
    detail: str = ""
    path: str | None = None  # inside the process's root
    perf: hsperfdata.PerfData | None = None
    stats: JvmStats | None = None
    next_read: float = 0.0
    backoff: float = REFRESH_SECONDS


class JvmMetrics(RoundThread):
    """container_jvm_* for the JVMs of every reported container."""

    name = "jvm"

    def __init__(self, registry: Registry, procfs: str = "/proc", refresh: float = REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.procfs = procfs
        self.refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, None] = {}  # pids to look at, in arrival order
        self._jvms: dict[int, _Jvm] = {}
        self._init_thread()
        self.reads: dict[str, int] = {}  # result -> count
        self.dropped = 0

    # ------------------------------------------------------------ events ---

    def on_process(self, what: str, proc: Process) -> None:
        with self._lock:
            if what == "added":
                if proc.container_id is not None:
                    self._pending[proc.pid] = None
            elif what == "removed":
                self._pending.pop(proc.pid, None)
                j = self._jvms.get(proc.pid)
                if j is not None and j.start_ticks == proc.start_ticks:
                    del self._jvms[proc.pid]

    # ------------------------------------------------------------ thread ---

    def round(self) -> None:
        """Look at the processes that came, then read the JVMs that are due (bounded)."""
        self._sync_pending()
        with self._lock:
            batch = list(self._pending)[:MAX_CLASSIFY_PER_ROUND]
            for pid in batch:
                del self._pending[pid]
        for pid in batch:
            self._classify(pid)
        now = self._clock()
        with self._lock:
            due = sorted((j for j in self._jvms.values() if j.next_read <= now), key=lambda j: j.next_read)
        for j in due[:MAX_READS_PER_ROUND]:
            self._read(j, now)

    def _classify(self, pid: int) -> None:
        proc = self.registry.process(pid)
        if proc is None or proc.container_id is None:
            return
        try:
            with open(f"{self.procfs}/{pid}/cmdline", "rb") as f:
                cmdline = f.read(CMDLINE_MAX)
        except OSError:
            return
        if not is_jvm(cmdline):
            with self._lock:
                self._jvms.pop(pid, None)  # an exec into something else
            return
        try:
            with open(f"{self.procfs}/{pid}/environ", "rb") as f:
                environ = f.read(ENVIRON_MAX)
        except OSError:
            environ = b""
        setting = perf_setting(cmdline, environ)
        j = _Jvm(pid, proc.start_ticks, proc.container_id, setting, next_read=self._clock())
        if not setting.enabled or not setting.shared:
            j.status = "disabled" if not setting.enabled else "not_shared"
            j.detail = setting.reason
            j.next_read = float("inf")
            log.debug("jvm: pid %d (%s): %s; no JVM metrics for it", pid, proc.container_id, setting.reason)
        with self._lock:
            if pid not in self._jvms and len(self._jvms) >= MAX_JVMS:
                self.dropped += 1
                return
            self._jvms[pid] = j

    def _read(self, j: _Jvm, now: float) -> None:
        status, detail = "ok", ""
        stats = None
        try:
            nspid = ns_pid(self.procfs, j.pid)
            fd, path = open_hsperfdata(f"{self.procfs}/{j.pid}/root", nspid, j.path)
            try:
                data = read_bounded(fd)
            finally:
                os.close(fd)
            j.path = path
            if j.perf is None or not j.perf.refresh(data):
                j.perf = hsperfdata.parse(data, want=_wanted)
            stats = JvmStats.from_perf(j.perf)
        except NotFound as e:
            status, detail = "missing", f"{e}: started with -XX:-UsePerfData or -XX:+PerfDisableSharedMem " \
                                        "(in a way not on its command line), or not created yet"
        except safeopen.Refused as e:
            status, detail = "refused", str(e)
        except ValueError as e:  # read_bounded's size bound, or hsperfdata.Invalid
            status = "not_ready" if isinstance(e, hsperfdata.NotReady) else \
                "invalid" if isinstance(e, hsperfdata.Invalid) else "too_large"
            detail = str(e)
            j.perf = None
        except OSError as e:
            status, detail = "error", str(e)
        if status != j.status and status != "ok":
            log.debug("jvm: pid %d (%s): %s: %s", j.pid, j.container_id, status, detail)
        with self._lock:
            self.reads[status] = self.reads.get(status, 0) + 1
            j.status, j.detail = status, detail
            if stats is not None:
                j.stats = stats
                j.backoff = self.refresh
                j.next_read = now + self.refresh
            else:
                j.stats = None
                j.next_read = now + j.backoff
                j.backoff = min(j.backoff * 2, MISSING_BACKOFF_MAX)

    def close(self) -> None:
        self._stop_thread()

    # ----------------------------------------------------------- answers ---

    def describe(self, pid: int) -> dict[str, object] | None:
        """What /api/processes says of a JVM: where its counters are, or why there are none."""
        with self._lock:
            j = self._jvms.get(pid)
            if j is None:
                return None
            out: dict[str, object] = {"status": j.status, "hsperfdata": j.path}
            if j.detail:
                out["detail"] = j.detail
            if j.stats is not None:
                out["jvm"] = j.stats.jvm
                out["java_version"] = j.stats.java_version
            return out

    def collect(self, f: Families) -> None:
        with self._lock:
            snap = sorted((j.container_id, j.pid, j.stats) for j in self._jvms.values() if j.stats is not None)
        seen: set[tuple[str, str]] = set()
        for cid, _pid, s in snap:
            assert s is not None
            c = self.registry.container(cid)
            if c is None or (cid, s.jvm) in seen:
                continue
            seen.add((cid, s.jvm))
            ct = {"container_id": cid, "app_id": c.app_id}
            f.gauge("container_jvm_info", "Meta information about the JVM", 1, **ct, jvm=s.jvm,
                    java_version=s.java_version)
            f.gauge("container_jvm_heap_size_bytes", "Total heap size in bytes", s.heap_size, **ct, jvm=s.jvm)
            f.gauge("container_jvm_heap_used_bytes", "Used heap size in bytes", s.heap_used, **ct, jvm=s.jvm)
            if s.heap_max > 0:
                f.gauge("container_jvm_heap_max_size_bytes", "Maximum heap size in bytes (-Xmx)", s.heap_max,
                        **ct, jvm=s.jvm)
            for gc, secs in s.gc_time:
                f.exact_counter("container_jvm_gc_time_seconds", "Time spent in the given JVM garbage collector in seconds",
                                secs, **ct, jvm=s.jvm, gc=gc)
            f.exact_counter("container_jvm_safepoint_time_seconds",
                            "Time the application has been stopped for safepoint operations in seconds",
                            s.safepoint_time, **ct, jvm=s.jvm)
            f.exact_counter("container_jvm_safepoint_sync_time_seconds", "Time spent getting to safepoints in seconds",
                            s.safepoint_sync_time, **ct, jvm=s.jvm)

    def self_metrics(self, f: Families) -> None:
        with self._lock:
            n = len(self._jvms)
            reads = dict(self.reads)
        f.gauge("coroot_agent_tracked_jvms", "JVM processes the agent follows", n)
        for result, count in sorted(reads.items()):
            f.counter("coroot_agent_jvm_reads_total", "reads of JVM perf data files by result", count, result=result)
        f.counter("coroot_agent_jvms_dropped_total", f"JVM processes not followed: more than {MAX_JVMS} were",
                  self.dropped)
