"""Container logs: sources, pipeline, log metrics and log records.

Sources, each attributed to a container: CRI files (/var/log/pods/<ns>_<pod>_<uid>/<c>/*.log ->
/k8s/<ns>/<pod>/<c>), Docker json-file logs (/var/lib/docker/containers/<id>/<id>-json.log ->
/docker/<id12>), journald (by _SYSTEMD_UNIT), and files under /var/log that a container's
processes open for writing (bpf/logs.c; at start-up from /proc/PID/fd). Files found at start-up
are read from their end (no backfill); a file opened later is read from its start when small
(<= 256 KiB: most likely new), else from its end.

Pipeline per record: partial-line joining, multi-line joining, PII scrubbing, level, pattern;
then `container_log_messages_total{source,level,pattern_hash,sample}` (unless log parsing is
off) and an otel_logs row (unless log entries are off). COROOT_LOG_MONITORING=disabled in a
container's processes: nothing for that container.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import Metric

from agent.containers.procfs import fd_targets
from agent.containers.registry import Registry
from agent.logs.birth import birth_time
from agent.logs.formats import Line, MultilineJoiner, PartialJoiner
from agent.logs.journald import JournalEntry, JournalFollower
from agent.logs.patterns import SEVERITY_NUMBER, PatternSet, detect_level, level_of_word
from agent.logs.pii import Scrubber
from agent.logs.tailer import Tailer
from agent.metrics import Families
from agent.sinks.batcher import Sink

log = logging.getLogger(__name__)

LOG_OPEN_EVENT = struct.Struct("<II256s")  # mirror of struct log_open_event in bpf/logs.c
NEW_FILE_MAX = 256 * 1024
MAX_SOURCES = 4096
_POD_DIR = re.compile(r"^([^_]+)_([^_]+)_[^/]+/([^/]+)/[^/]+\.log$")


@dataclass
class Source:
    container_id: str
    label: str  # the metric's `source`: stdout/stderr, journald, or the file path
    tailer: Tailer | None
    fmt: str  # plain | cri | docker | journald
    partial: PartialJoiner = field(default_factory=PartialJoiner)
    joiner: MultilineJoiner | None = None


class LogCollector:
    def __init__(self, registry: Registry, sink: Sink | None, metrics: bool = True, entries: bool = True,
                 patterns_per_container: int = 256, scrubber: Scrubber | None = None,
                 pods_dir: str = "/var/log/pods", docker_dir: str = "/var/lib/docker/containers",
                 journald: bool = True, const_labels: dict[str, str] | None = None) -> None:
        self.registry = registry
        self.const = dict(const_labels or {})
        self.sink = sink if entries else None
        self.metrics = metrics
        self.cap = patterns_per_container
        self.scrub = scrubber or Scrubber()
        self.pods_dir, self.docker_dir = pods_dir, docker_dir
        self.hostname = socket.gethostname()
        self._lock = threading.Lock()
        self._sources: dict[tuple[str, str], Source] = {}
        self._patterns: dict[str, PatternSet] = {}
        self._counts: dict[tuple[str, str, str, str], list] = {}  # -> [count, sample]
        self._journal = JournalFollower(self._journal_entry) if journald else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.records = 0
        self.started_wall = time.time()

    # ------------------------------------------------------------- sources --

    def _add_file(self, cid: str, label: str, path: str, fmt: str, from_end: bool) -> None:
        # One tailer per container and file: a plain file is named by its path in the
        # container (two processes writing it are one source), a runtime file by its own path.
        key = (cid, label if fmt == "plain" else path)
        if key in self._sources or len(self._sources) >= MAX_SOURCES:
            return
        t = Tailer(path)
        if not t.open(from_end=from_end):
            return
        src = Source(cid, label, t, fmt)
        src.joiner = MultilineJoiner(lambda line, s=src: self._record(s, line))
        self._sources[key] = src
        log.info("logs: following %s for %s", path, cid)

    def handle_event(self, raw: bytes) -> None:
        """bpf/logs.c: a process opened a file under /var/log for writing."""
        pid, _flags, path_b = LOG_OPEN_EVENT.unpack_from(raw)
        path = path_b.split(b"\0", 1)[0].decode(errors="replace")
        c = self.registry.container_of(pid)
        if c is None:
            # The exec that put it in its container may wait in the other event buffer: read it now.
            self.registry.add(pid)
            c = self.registry.container_of(pid)
        if c is None or "logs" in c.opt_out:
            return
        real = f"{self.registry.procfs}/{pid}/root{path}"
        with self._lock:
            self._add_file(c.id, path, real, "plain", from_end=not self._is_new(real))

    def _is_new(self, path: str) -> bool:
        """Created after the agent started (read it whole), or older (read from its end).
        Where the filesystem keeps no creation time, a small file counts as new."""
        born = birth_time(path)
        if born is not None:
            return born >= self.started_wall - 1.0
        try:
            return os.stat(path).st_size <= NEW_FILE_MAX
        except OSError:
            return True

    def scan(self, startup: bool = False) -> None:
        """Find runtime log files, and (at start-up) files container processes hold open."""
        with self._lock:
            for root, _dirs, files in os.walk(self.pods_dir):
                for name in files:
                    full = os.path.join(root, name)
                    m = _POD_DIR.match(os.path.relpath(full, self.pods_dir))
                    if m and name.endswith(".log"):
                        self._add_file(f"/k8s/{m.group(1)}/{m.group(2)}/{m.group(3)}", "stdout/stderr", full, "cri",
                                       from_end=startup)
            try:
                ids = os.listdir(self.docker_dir)
            except OSError:
                ids = []
            for cid in ids:
                full = os.path.join(self.docker_dir, cid, f"{cid}-json.log")
                if os.path.exists(full):
                    self._add_file(f"/docker/{cid[:12]}", "stdout/stderr", full, "docker", from_end=startup)
            # Files container processes hold open for writing: at start-up (read from their end),
            # and on every scan after, in case an open event was missed (read like an event's).
            for pid in self.registry.pids():
                c = self.registry.container_of(pid)
                if c is None or "logs" in c.opt_out:
                    continue
                for path in _open_log_files(self.registry.procfs, pid):
                    if (c.id, path) in self._sources:
                        continue  # already followed
                    real = f"{self.registry.procfs}/{pid}/root{path}"
                    self._add_file(c.id, path, real, "plain", from_end=startup or not self._is_new(real))

    def _journal_entry(self, e: JournalEntry) -> None:
        with self._lock:
            self._process(e.container_id, "journald", e.message, e.ts_ns, e.level)

    # ------------------------------------------------------------ pipeline --

    def tick(self, now: float | None = None) -> None:
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
                trace_id = str(obj.get("trace_id") or obj.get("traceId") or obj.get("trace.id") or "")
                span_id = str(obj.get("span_id") or obj.get("spanId") or obj.get("span.id") or "")
        level = level or detect_level(body)
        self.records += 1
        if self.metrics:
            ps = self._patterns.get(cid)
            if ps is None:
                ps = self._patterns[cid] = PatternSet(cap=self.cap)
            p = ps.match(body)
            key = (cid, source, level, p.hash)
            entry = self._counts.get(key)
            if entry is None:
                entry = self._counts[key] = [0, p.sample]
            entry[0] += 1
        if self.sink is not None:
            app = c.app_id if c is not None else cid
            self.sink.add("otel_logs", (
                ts_ns or time.time_ns(), trace_id, span_id, 0, level, SEVERITY_NUMBER[level], app, body,
                {"host.name": self.hostname, "container.id": cid, "service.name": app},
                {"log.source": source},
            ))

    # ------------------------------------------------------------- metrics --

    def collect(self) -> Iterator[Metric]:
        f = Families(self.const)
        with self._lock:
            apps = {c.id: c.app_id for c in self.registry.containers()}
            for (cid, source, level, h), (n, sample) in self._counts.items():
                f.counter("container_log_messages_total", "log messages by level and pattern", n,
                          container_id=cid, app_id=apps.get(cid, cid), source=source, level=level,
                          pattern_hash=h, sample=sample)
        yield from f

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
                self.tick()
                if time.monotonic() >= next_scan:
                    self.scan()
                    next_scan = time.monotonic() + 5
            except Exception:  # noqa: BLE001
                log.exception("logs")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._journal is not None:
            self._journal.stop()
        self.tick()
        self.flush()
        with self._lock:
            for src in self._sources.values():
                if src.tailer is not None:
                    src.tailer.close()


def _open_log_files(procfs: str, pid: int) -> list[str]:
    """Paths under /var/log that pid holds open for writing (O_WRONLY or O_RDWR)."""
    out = []
    for fd, target in fd_targets(procfs, pid).items():
        if not target.startswith("/var/log/"):
            continue
        try:
            with open(f"{procfs}/{pid}/fdinfo/{fd}") as f:
                flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
        except (OSError, ValueError):
            continue
        if flags & 3:
            out.append(target)
    return out
