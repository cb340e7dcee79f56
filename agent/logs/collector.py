"""Container logs: sources, pipeline, log metrics and log records.

Sources, each attributed to a container: the log file its runtime names (Docker's json-file
LogPath, the CRI log path containerd and CRI-O keep: under the container's id, the same as its
cgroup's), CRI files (/var/log/pods/<ns>_<pod>_<uid>/<c>/*.log ->
/k8s/<ns>/<pod>/<c>), Docker json-file logs (/var/lib/docker/containers/<id>/<id>-json.log ->
/docker/<id12>), journald (by _SYSTEMD_UNIT), and files under /var/log that a container's
processes have opened for writing (bpf/logs.c, successful opens only; at start-up and on every
rescan from /proc/PID/fd). Files found at start-up are read from their end (no backfill); a file
opened later is read from its start when small (<= 256 KiB: most likely new), else from its end.

What a process opened is taken from the kernel, not from the path it passed: /proc/PID/fd/N is
looked at with stat (never opened unless a regular file), its path as the process sees it must
lie under /var/log/, and the file is opened through agent.logs.safeopen (non-blocking, inside
the process's root); a path with a `..` component is refused before anything else. The
event-poll thread only decodes and queues (bounded, oldest dropped and counted): every file
operation happens on this collector's own thread.

Pipeline per record: partial-line joining, multi-line joining, PII scrubbing, level, pattern;
then `container_log_messages_total{source,level,pattern_hash,sample}` (unless log parsing is
off) and an otel_logs row (unless log entries are off) with LogAttributes['pattern.hash'] equal
to that pattern_hash, and TraceId/SpanId from JSON fields named as the node agent reads them. COROOT_LOG_MONITORING=disabled in a
container's processes: nothing for that container.

A component (agent/component.py): its thread reads, a scrape only reads the counts, and a tick
only hands over the containers the registry forgot (their counts and patterns go on this
collector's thread).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from agent.component import Component
from agent.containers.cgroup import app_id, service_name
from agent.containers.procfs import fd_targets
from agent.containers.registry import Registry, rekey
from agent.containers.runtimes import LOG_CRI, LOG_DOCKER_JSON
from agent.logs.birth import birth_time
from agent.logs.formats import Line, MultilineJoiner, PartialJoiner
from agent.logs.journald import JournalEntry, JournalFollower
from agent.logs.patterns import SEVERITY_NUMBER, PatternSet, detect_level, level_of_word
from agent.logs.pii import Scrubber
from agent.logs.safeopen import Refused, open_in_root, open_proc_fd
from agent.logs.tailer import Tailer
from agent.metrics import Families
from agent.sinks import schema
from agent.sinks.batcher import Sink

log = logging.getLogger(__name__)

LOG_OPEN_EVENT = struct.Struct("<IiI256s")  # mirror of struct log_open_event in bpf/logs.c
NEW_FILE_MAX = 256 * 1024
MAX_SOURCES = 4096
MAX_PENDING_OPENS = 4096  # open events waiting for the logs thread; beyond it the oldest go
LOG_DIR = "/var/log/"
RUNTIME_FORMATS = {LOG_CRI: "cri", LOG_DOCKER_JSON: "docker"}  # a runtime's log framing -> ours
_POD_DIR = re.compile(r"^([^_]+)_([^_]+)_[^/]+/([^/]+)/[^/]+\.log$")


@dataclass(frozen=True)
class LogOpen:
    """bpf/logs.c: process `pid` holds descriptor `fd`, opened for writing as `path` (a hint)."""

    pid: int
    fd: int
    path: str


def decode_open(raw: bytes) -> LogOpen | None:
    """One log_open_event, or None for a malformed one."""
    if len(raw) < LOG_OPEN_EVENT.size:
        return None
    pid, fd, _flags, path_b = LOG_OPEN_EVENT.unpack_from(raw)
    if pid <= 0 or fd < 0:
        return None
    return LogOpen(pid, fd, path_b.split(b"\0", 1)[0].decode(errors="replace"))


_TRACE_KEYS = ("traceid", "trace_id", "trace-id", "trace.id")
_SPAN_KEYS = ("spanid", "span_id", "span-id", "span.id")
_HEX = re.compile(r"[0-9a-f]+")


def _context_key(key: str) -> str:
    """'trace', 'span' or '': what a JSON field names, by the node agent's rule (logs/otel.go):
    case-insensitive, a dotted path's last part counts, `@tr`/`@sp` too, `parent` never."""
    k = key.lower()
    if k in ("@tr", "@sp"):
        return "trace" if k == "@tr" else "span"
    if "parent" in k:
        return ""
    if any(k == s or k.endswith("." + s) for s in _TRACE_KEYS):
        return "trace"
    if any(k == s or k.endswith("." + s) for s in _SPAN_KEYS):
        return "span"
    return ""


_KINDS: dict[str, str] = {}  # field name -> _context_key(name): log records repeat their keys


def _kind(key: str) -> str:
    kind = _KINDS.get(key)
    if kind is None:
        if len(_KINDS) >= 4096:
            _KINDS.clear()
        kind = _KINDS[key] = _context_key(key)
    return kind


def trace_context(obj: dict[str, object], _prefix: str = "", _depth: int = 0) -> tuple[str, str]:
    """(TraceId, SpanId) of a JSON log record: the first field of each kind (nested objects by
    their dotted path) whose value is a valid id (32 or 16 hex digits, not all zero),
    lower-cased; '' where there is none."""
    trace_id = span_id = ""
    for key, value in obj.items():
        if isinstance(value, str):
            n = len(value)
            if (n != 32 or trace_id) and (n != 16 or span_id):
                continue  # not the length of an id still wanted: the common case, decided first
            kind = _kind(_prefix + key if _prefix else key)
            if not kind:
                continue
            v = value.lower()
            if not _HEX.fullmatch(v) or not v.strip("0"):
                continue
            if kind == "trace" and n == 32 and not trace_id:
                trace_id = v
            elif kind == "span" and n == 16 and not span_id:
                span_id = v
        elif isinstance(value, dict) and _depth < 4:
            t, sp = trace_context(value, f"{_prefix}{key}.", _depth + 1)
            trace_id, span_id = trace_id or t, span_id or sp
    return trace_id, span_id


@dataclass
class Source:
    container_id: str
    label: str  # the metric's `source`: stdout/stderr, journald, or the file path
    tailer: Tailer | None
    fmt: str  # plain | cri | docker | journald
    partial: PartialJoiner = field(default_factory=PartialJoiner)
    joiner: MultilineJoiner | None = None


class LogCollector(Component):
    name = "logs"

    def __init__(self, registry: Registry, sink: Sink | None, metrics: bool = True, entries: bool = True,
                 patterns_per_container: int = 256, scrubber: Scrubber | None = None,
                 pods_dir: str = "/var/log/pods", docker_dir: str = "/var/lib/docker/containers",
                 journald: bool = True, host_id: str = "") -> None:
        self.registry = registry
        self.sink = sink if entries else None
        self.metrics = metrics
        self.cap = patterns_per_container
        self.scrub = scrubber or Scrubber()
        self.pods_dir, self.docker_dir = pods_dir, docker_dir
        self.hostname = socket.gethostname()
        self.host_id = host_id
        self._lock = threading.Lock()
        self._sources: dict[tuple[str, str], Source] = {}
        self._by_path: dict[str, Source] = {}  # runtime files (not plain): one source per file
        self._patterns: dict[str, PatternSet] = {}
        self._counts: dict[tuple[str, str, str, str], tuple[list[int], str]] = {}  # -> ([count], sample)
        self._journal = JournalFollower(self._journal_entry) if journald else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.records = 0
        self.started_wall = time.time()
        # Filled by the event-poll thread, drained by ours: deque appends and pops are atomic.
        self._opens: deque[LogOpen] = deque(maxlen=MAX_PENDING_OPENS)
        self.dropped_opens = 0
        self.refused: Counter[str] = Counter()  # reason -> files not followed
        self._refused_fds: set[tuple[int, int, str]] = set()  # (pid, fd, path): the rescan skips them
        self._refused_files: dict[str, tuple[int, int, int]] = {}  # runtime file -> lstat when refused
        self._gone: deque[list[str]] = deque(maxlen=1024)  # containers forgotten, from the poll thread
        self._renames: deque[tuple[str, str]] = deque()  # (old, new) from the poll thread, in order

    # ------------------------------------------------------------- sources --

    def _add_source(self, cid: str, label: str, tailer: Tailer, fmt: str) -> None:
        src = Source(cid, label, tailer, fmt)
        src.joiner = MultilineJoiner(functools.partial(self._record, src))
        self._sources[(cid, label if fmt == "plain" else tailer.path)] = src
        if fmt != "plain":
            self._by_path[tailer.path] = src
        log.info("logs: following %s for %s", tailer.path, cid)

    def _has_source(self, cid: str, label: str, path: str, fmt: str) -> bool:
        # One tailer per container and file: a plain file is named by its path in the
        # container (two processes writing it are one source), a runtime file by its own path.
        key = (cid, label if fmt == "plain" else path)
        if fmt != "plain" and path in self._by_path:
            return True  # followed already, maybe under the id the runtime gave its container
        return key in self._sources or len(self._sources) >= MAX_SOURCES

    def _add_file(self, cid: str, label: str, path: str, fmt: str, from_end: bool, prefix: str,
                  root: str = "/") -> None:
        """A runtime's file (found by our own walk, or named by the runtime): resolved under
        `prefix` inside `root` (the host's root when it is not mounted where we run)."""
        if self._has_source(cid, label, path, fmt):
            return
        try:
            st = os.lstat(os.path.join(root, path.lstrip("/")))
        except OSError:
            return
        seen = (st.st_dev, st.st_ino, st.st_ctime_ns)
        if self._refused_files.get(path) == seen:
            return  # refused before, unchanged since: not counted again on every scan
        t = Tailer(path, root=root, prefix=prefix)
        if not t.open(from_end=from_end):
            if t.refused:
                self.refused["runtime_file"] += t.refused
                if len(self._refused_files) >= MAX_SOURCES:
                    self._refused_files.clear()
                self._refused_files[path] = seen
            return
        self._add_source(cid, label, t, fmt)

    def handle_event(self, raw: bytes) -> None:
        """bpf/logs.c, on the event-poll thread: queue it and return. No I/O, no lock."""
        ev = decode_open(raw)
        if ev is None:
            return
        if len(self._opens) == MAX_PENDING_OPENS:
            self.dropped_opens += 1  # the deque drops the oldest
        self._opens.append(ev)

    def _drain_opens(self) -> None:
        """On the logs thread: follow what the queued open events name, if it is a log file."""
        while True:
            try:
                ev = self._opens.popleft()
            except IndexError:
                return
            c = self.registry.container_of(ev.pid)
            if c is None:
                # The exec that put it in its container may wait in the other event buffer: read it now.
                self.registry.add(ev.pid)
                c = self.registry.container_of(ev.pid)
            if c is None or "logs" in c.opt_out:
                continue
            with self._lock:
                self._follow(c.id, ev.pid, ev.fd, ev.path, startup=False)

    def _follow(self, cid: str, pid: int, fd: int, path: str, startup: bool) -> None:
        """Follow the file `pid` holds as `fd` (opened as `path`), or, when that descriptor is
        gone already, `path` resolved inside the process's root. Only regular files under
        /var/log/ are followed, whatever the process named; each refusal is counted."""
        try:
            if ".." in path.split("/"):
                raise Refused("dotdot", path, "a `..` component")  # before anything is looked at
            if path and self._has_source(cid, path, path, "plain"):
                return
            try:
                opened, seen = open_proc_fd(self.registry.procfs, pid, fd, LOG_DIR)
            except FileNotFoundError:  # closed already (or the process is gone): use the path
                if not path:
                    return
                opened, seen = open_in_root(f"{self.registry.procfs}/{pid}/root", path, LOG_DIR), path
        except Refused as e:
            self.refused[e.reason] += 1
            if len(self._refused_fds) >= MAX_SOURCES:
                self._refused_fds.clear()
            self._refused_fds.add((pid, fd, path))
            n = self.refused[e.reason]
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, ...: a process opening FIFOs in a loop cannot flood the log
                log.warning("logs: not following %r opened by pid %d: %r (%d so far)", path, pid, e.detail, n)
            return
        except OSError:
            return  # the process exited, or its fd changed under us
        st = os.fstat(opened)
        if self._has_source(cid, seen, seen, "plain") or any(
                s.container_id == cid and s.tailer is not None and s.tailer.inode == (st.st_dev, st.st_ino)
                for s in self._sources.values()):
            os.close(opened)  # followed already, maybe by its name before a rename
            return
        t = Tailer(seen, root=f"{self.registry.procfs}/{pid}/root", prefix=LOG_DIR)
        t.adopt(opened, from_end=startup or not self._is_new(opened))
        self._add_source(cid, seen, t, "plain")

    def _is_new(self, fd: int) -> bool:
        """Created after the agent started (read it whole), or older (read from its end).
        Where the filesystem keeps no creation time, a small file counts as new."""
        born = birth_time(f"/proc/self/fd/{fd}")  # the file we hold, not a path anyone can change
        if born is not None:
            return born >= self.started_wall - 1.0
        try:
            return os.fstat(fd).st_size <= NEW_FILE_MAX
        except OSError:
            return True

    def scan(self, startup: bool = False) -> None:
        """Find runtime log files, and (at start-up) files container processes hold open."""
        with self._lock:
            # The files the runtimes name, under the container's own id, before the directory
            # walks below name them by their path (which then find them followed already).
            for rc in self.registry.containers():
                md = rc.metadata
                if md is None or not md.log_path or "logs" in rc.opt_out:
                    continue
                fmt = RUNTIME_FORMATS.get(md.log_format or "")
                if fmt is None:
                    continue
                src = self._by_path.get(md.log_path)
                if src is None:
                    # The path is the host's: as mounted (/var/log), else inside the host's root
                    # (Docker's /var/lib/docker/containers), as the node agent reads it.
                    root = "/"
                    if not os.path.lexists(md.log_path):
                        root = os.path.join(self.registry.procfs, "1", "root")
                    self._add_file(rc.id, "stdout/stderr", md.log_path, fmt, from_end=startup,
                                   prefix=os.path.dirname(md.log_path) + "/", root=root)
                elif src.container_id != rc.id:  # found by a walk before the runtime answered
                    self._move_source(src, rc.id)
            for root, _dirs, files in os.walk(self.pods_dir):
                for name in files:
                    full = os.path.join(root, name)
                    m = _POD_DIR.match(os.path.relpath(full, self.pods_dir))
                    if m and name.endswith(".log"):
                        self._add_file(f"/k8s/{m.group(1)}/{m.group(2)}/{m.group(3)}", "stdout/stderr", full, "cri",
                                       from_end=startup, prefix=self.pods_dir)
            try:
                ids = os.listdir(self.docker_dir)
            except OSError:
                ids = []
            for cid in ids:
                full = os.path.join(self.docker_dir, cid, f"{cid}-json.log")
                if os.path.lexists(full):
                    self._add_file(f"/docker/{cid[:12]}", "stdout/stderr", full, "docker", from_end=startup,
                                   prefix=self.docker_dir)
            # Files container processes hold open for writing: at start-up (read from their end),
            # and on every scan after, in case an open event was missed (read like an event's).
            for pid in self.registry.pids():
                c = self.registry.container_of(pid)
                if c is None or "logs" in c.opt_out:
                    continue
                for fd, path in _open_log_files(self.registry.procfs, pid):
                    if (c.id, path) in self._sources or (pid, fd, path) in self._refused_fds:
                        continue  # already followed, or refused
                    self._follow(c.id, pid, fd, path, startup=startup)

    def _move_source(self, src: Source, cid: str) -> None:
        """(Lock held.) A source's lines go to `cid` from now on."""
        for k, s in list(self._sources.items()):
            if s is src:
                del self._sources[k]
                nk = (cid, k[1])
                if nk in self._sources:  # the same file twice: keep the one the new id has
                    kept = self._sources[nk]
                    if src.tailer is not None:
                        src.tailer.close()
                    for p, s in list(self._by_path.items()):
                        if s is src:
                            self._by_path[p] = kept
                    return
                self._sources[nk] = src
        log.info("logs: %s is %s's", src.tailer.path if src.tailer else src.label, cid)
        src.container_id = cid

    def on_rename(self, old: str, new: str) -> None:
        """On the poll thread: no I/O, no lock; the logs thread applies it."""
        self._renames.append((old, new))

    def _apply_renames(self) -> None:
        """Sources, counts and patterns of a renamed container are its new id's (counts added
        to what the new id has). The logs thread's."""
        while True:
            try:
                old, new = self._renames.popleft()
            except IndexError:
                return
            self._rename(old, new)

    def _rename(self, old: str, new: str) -> None:
        def add(kept: tuple[list[int], str], moved: tuple[list[int], str]) -> tuple[list[int], str]:
            kept[0][0] += moved[0][0]
            return kept

        with self._lock:
            for src in [s for s in self._sources.values() if s.container_id == old]:
                self._move_source(src, new)
            rekey(self._counts, old, new, add)
            rekey(self._patterns, old, new, lambda kept, _moved: kept)

    def _journal_entry(self, e: JournalEntry) -> None:
        with self._lock:
            self._process(e.container_id, "journald", e.message, e.ts_ns, e.level)

    # ------------------------------------------------------------ pipeline --

    def pump(self, now: float | None = None) -> None:
        """Read what every followed file has new, through the pipeline (the logs thread)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for src in list(self._sources.values()):
                assert src.tailer is not None and src.joiner is not None
                for raw in src.tailer.poll():
                    if src.fmt == "cri":
                        line = src.partial.cri(raw)
                    elif src.fmt == "docker":
                        line = src.partial.docker(raw)
                    else:
                        line = Line(raw)
                    if line is not None:
                        src.joiner.feed(line, now)
                src.joiner.tick(now)

    def flush(self) -> None:
        with self._lock:
            for src in self._sources.values():
                if src.joiner is not None:
                    src.joiner.flush()

    def _record(self, src: Source, line: Line) -> None:
        self._process(src.container_id, src.label, line.text, line.ts_ns, None)

    def _process(self, cid: str, source: str, text: str, ts_ns: int | None, level: str | None) -> None:
        c = self.registry.container(cid)
        if c is not None and "logs" in c.opt_out:
            return
        body = self.scrub(text)
        trace_id = span_id = ""
        if body.startswith("{"):
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                for k in ("level", "severity", "lvl", "loglevel", "log.level"):
                    if isinstance(obj.get(k), str):
                        level = level or level_of_word(obj[k])
                        break
                trace_id, span_id = trace_context(obj)
        level = level or detect_level(body)
        self.records += 1
        pattern = None
        if self.metrics or self.sink is not None:
            ps = self._patterns.get(cid)
            if ps is None:
                ps = self._patterns[cid] = PatternSet(cap=self.cap)
            pattern = ps.match(body, level)
        if self.metrics and pattern is not None:
            key = (cid, source, level, pattern.hash)
            entry = self._counts.get(key)
            if entry is None:
                entry = self._counts[key] = ([0], pattern.sample)
            entry[0][0] += 1
        if self.sink is not None and pattern is not None:
            app = service_name(cid)
            # As the node agent sends a record (logs/otel.go): the resource names the host and
            # the container; the record carries `pattern.hash`, equal to the `pattern_hash`
            # label of container_log_messages_total (the server filters a pattern's entries by it).
            self.sink.add("otel_logs", schema.row("otel_logs", {
                "Timestamp": ts_ns or time.time_ns(), "TraceId": trace_id, "SpanId": span_id,
                "SeverityText": level, "SeverityNumber": SEVERITY_NUMBER[level], "ServiceName": app,
                "Body": body,
                "ResourceAttributes": {"host.name": self.hostname, "host.id": self.host_id,
                                       "container.id": cid, "service.name": app},
                "LogAttributes": {"pattern.hash": pattern.hash},
            }))

    def _forget_gone(self) -> None:
        """Counts and patterns of containers the registry forgot (bounded memory; logs thread)."""
        dead: set[str] = set()
        while True:
            try:
                dead.update(self._gone.popleft())
            except IndexError:
                break
        if not dead:
            return
        with self._lock:
            for key in [k for k in self._counts if k[0] in dead]:
                del self._counts[key]
            for cid in dead:
                self._patterns.pop(cid, None)

    # ------------------------------------------------------------- metrics --

    def tick(self, now: float, gone: list[str]) -> None:
        """On the poll thread: no I/O, no lock; the logs thread forgets them."""
        if gone:
            self._gone.append(gone)

    def collect(self, f: Families) -> None:
        with self._lock:
            apps = {c.id: c.app_id for c in self.registry.containers()}
            for (cid, source, level, h), (n, sample) in self._counts.items():
                f.counter("container_log_messages_total", "log messages by level and pattern", n[0],
                          container_id=cid, app_id=apps.get(cid, app_id(cid)), source=source, level=level,
                          pattern_hash=h, sample=sample)

    def self_metrics(self, f: Families) -> None:
        with self._lock:
            refused = dict(self.refused)
            rotated = sum(s.tailer.refused for s in self._sources.values() if s.tailer is not None)
        if rotated:
            refused["rotation"] = refused.get("rotation", 0) + rotated
        f.counter("coroot_agent_dropped_events_total", "events dropped in user space: the queue to their "
                  "consumer was full (the oldest go)", self.dropped_opens, what="log_open")
        for reason, n in sorted(refused.items()):
            f.counter("coroot_agent_log_files_refused_total", "files a process opened under /var/log that are "
                      "not followed (not a regular file, resolves outside /var/log, `..`, a rotated path swapped for one)", n, reason=reason)

    # ------------------------------------------------------------- running --

    def start(self) -> None:
        self.scan(startup=True)
        if self._journal is not None:
            self._journal.start()
        self._thread = threading.Thread(target=self._loop, name="logs", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_scan = time.monotonic() + 5
        while not self._stop.wait(0.2):
            try:
                self._apply_renames()
                self._drain_opens()
                self.pump()
                self._forget_gone()
                if time.monotonic() >= next_scan:
                    self.scan()
                    next_scan = time.monotonic() + 5
            except Exception:  # noqa: BLE001
                log.exception("logs")

    def close(self) -> None:
        """Stop the thread, read and write what the files have left. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._journal is not None:
            self._journal.stop()
        self._apply_renames()
        self._drain_opens()
        self.pump()
        self.flush()
        with self._lock:
            for src in self._sources.values():
                if src.tailer is not None:
                    src.tailer.close()


def _open_log_files(procfs: str, pid: int) -> list[tuple[int, str]]:
    """(fd, path) of files under /var/log that pid holds open for writing (O_WRONLY or O_RDWR).
    Only a first cut: _follow checks each as it does an open event."""
    out = []
    for fd, target in fd_targets(procfs, pid).items():
        if not target.startswith(LOG_DIR):
            continue
        try:
            with open(f"{procfs}/{pid}/fdinfo/{fd}") as f:
                flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
        except (OSError, ValueError):
            continue
        if flags & 3:
            out.append((fd, target))
    return out
