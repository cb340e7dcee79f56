"""The process and container registry: pid -> container, and what each process opted out of.

Fed by a /proc scan at start (and a periodic resync that repairs anything a lost event
missed), then by process events from bpf/proc.c. Answers "which container is pid P" and
"did P opt out of X" for the other modules; notifies listeners of processes coming and going.
Holds no BPF objects and ships nothing.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.containers import cgroup as cg

log = logging.getLogger(__name__)

# Mirror of struct proc_event in bpf/proc.c.
PROC_EVENT = struct.Struct("<IIII")
RECENT_EXITS = 4096  # exited processes whose container is remembered for late events
EVENT_FORK, EVENT_EXEC, EVENT_EXIT, EVENT_OOM_KILL = 1, 2, 3, 4

# Per-process opt-outs (reference §3): a value containing "disabled" opts out.
OPT_OUT_VARS = {
    "COROOT_EBPF_PROFILING": "profiling",
    "COROOT_EBPF_TRACES": "traces",
    "COROOT_LOG_MONITORING": "logs",
}
_OPT_OUT_RE = re.compile(rb"(?:^|\x00)(" + b"|".join(v.encode() for v in OPT_OUT_VARS) + rb")=([^\x00]*)")


@dataclass(frozen=True)
class Process:
    pid: int
    start_ticks: int
    comm: str
    cgroup_path: str
    container_id: str | None
    opt_out: frozenset[str]


@dataclass
class Container:
    id: str
    app_id: str
    kind: str
    cgroup_path: str
    subsystems: dict[str, str]
    created_at: float  # wall clock, from the cgroup directory
    pids: set[int] = field(default_factory=set)
    dead_since: float | None = None  # monotonic
    oom_kills: int = 0
    opt_out: frozenset[str] = frozenset()  # union over its processes


def read_environ_opt_outs(environ: bytes) -> frozenset[str]:
    out = set()
    for m in _OPT_OUT_RE.finditer(environ):
        if b"disabled" in m.group(2):
            out.add(OPT_OUT_VARS[m.group(1).decode()])
    return frozenset(out)


Listener = Callable[[str, Process], None]  # ("added" | "removed", process)


class Registry:
    def __init__(
        self,
        procfs: str = "/proc",
        cgroupfs: str = "/sys/fs/cgroup",
        min_container_age: float = 30.0,
        dead_container_ttl: float = 60.0,
        allowlist: Iterable[str] = (),
        denylist: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.procfs = procfs
        self.layout = cg.detect_layout(cgroupfs)
        self.min_age = min_container_age
        self.dead_ttl = dead_container_ttl
        self._allow = [re.compile(p) for p in allowlist]
        self._deny = [re.compile(p) for p in denylist]
        self._clock = clock
        self._wall = wall
        self._lock = threading.RLock()
        self._procs: dict[int, Process] = {}
        self._containers: dict[str, Container] = {}
        self._listeners: list[Listener] = []
        self._exited: OrderedDict[int, str] = OrderedDict()  # pid -> container id, recent exits
        self.events_seen = 0

    # ----------------------------------------------------------- queries ---

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def process(self, pid: int) -> Process | None:
        return self._procs.get(pid)

    def container_of(self, pid: int) -> Container | None:
        p = self._procs.get(pid)
        if p is None or p.container_id is None:
            return None
        c = self._containers.get(p.container_id)
        return c if c is not None and self._visible(c) else None

    def container_of_recent(self, pid: int) -> Container | None:
        """container_of, also for a process that exited moments ago (its events may arrive
        after its exit event)."""
        c = self.container_of(pid)
        if c is None and pid not in self._procs:
            cid = self._exited.get(pid)
            if cid is not None:
                return self.container(cid)
        return c

    def container(self, cid: str) -> Container | None:
        """A reported container by id."""
        c = self._containers.get(cid)
        return c if c is not None and self._visible(c) else None

    def opted_out(self, pid: int, what: str) -> bool:
        p = self._procs.get(pid)
        return p is not None and what in p.opt_out

    def containers(self) -> list[Container]:
        """Containers that are old enough, allowed, and not yet forgotten."""
        with self._lock:
            return [c for c in self._containers.values() if self._visible(c)]

    def pids(self) -> list[int]:
        return list(self._procs)

    def _visible(self, c: Container) -> bool:
        if self.min_age > 0 and self._wall() - c.created_at < self.min_age:
            return False
        if self._deny and any(r.search(c.id) for r in self._deny):
            return False
        if self._allow and not any(r.search(c.id) for r in self._allow):
            return False
        return True

    # ----------------------------------------------------------- updates ---

    def handle_event(self, raw: bytes) -> None:
        """A raw proc_event from the kernel."""
        kind, pid, _ppid, _ = PROC_EVENT.unpack_from(raw)
        self.events_seen += 1
        if kind in (EVENT_FORK, EVENT_EXEC):
            self.add(pid)
        elif kind == EVENT_EXIT:
            self.remove(pid)
        elif kind == EVENT_OOM_KILL:
            with self._lock:
                p = self._procs.get(pid)
                c = self._containers.get(p.container_id) if p and p.container_id else None
                if c is not None:
                    c.oom_kills += 1

    def scan(self) -> int:
        """Sync with /proc: add what is there, remove what is gone. Returns processes known."""
        live = set()
        for name in os.listdir(self.procfs):
            if name.isdigit():
                live.add(int(name))
        for pid in list(self._procs):
            if pid not in live:
                self.remove(pid)
        for pid in live:
            if pid not in self._procs:
                self.add(pid)
        return len(self._procs)

    def add(self, pid: int) -> Process | None:
        """(Re)read a process: on fork, exec, or when first seen."""
        read = self._read_process(pid)
        if read is None:
            return None
        proc, subsystems = read
        with self._lock:
            old = self._procs.get(pid)
            if old is not None:
                self._detach(old)
            self._procs[pid] = proc
            if proc.container_id is not None:
                c = self._containers.get(proc.container_id)
                if c is None:
                    c = self._new_container(proc, subsystems)
                    self._containers[c.id] = c
                c.pids.add(pid)
                c.dead_since = None
                c.opt_out = c.opt_out | proc.opt_out
        for cb in self._listeners:
            cb("added", proc)
        return proc

    def remove(self, pid: int) -> None:
        with self._lock:
            proc = self._procs.pop(pid, None)
            if proc is None:
                return
            self._detach(proc)
            if proc.container_id is not None:
                self._exited[pid] = proc.container_id
                if len(self._exited) > RECENT_EXITS:
                    self._exited.popitem(last=False)
        for cb in self._listeners:
            cb("removed", proc)

    def _detach(self, proc: Process) -> None:
        if proc.container_id is None:
            return
        c = self._containers.get(proc.container_id)
        if c is None:
            return
        c.pids.discard(proc.pid)
        if not c.pids:
            c.dead_since = self._clock()

    def housekeeping(self) -> list[str]:
        """Forget containers dead for longer than the bound. Returns the ids forgotten."""
        now = self._clock()
        gone = []
        with self._lock:
            for cid, c in list(self._containers.items()):
                if c.dead_since is not None and now - c.dead_since >= self.dead_ttl:
                    del self._containers[cid]
                    gone.append(cid)
        for cid in gone:
            log.debug("container %s forgotten", cid)
        return gone

    # ----------------------------------------------------------- reading ---

    def _read_process(self, pid: int) -> tuple[Process, dict[str, str]] | None:
        base = f"{self.procfs}/{pid}"
        try:
            with open(f"{base}/stat", "rb") as f:
                stat = f.read()
            with open(f"{base}/cgroup") as f:
                cgroup_text = f.read()
        except OSError:
            return None  # already gone
        try:
            with open(f"{base}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            environ = b""  # kernel threads, or not permitted
        rparen = stat.rfind(b")")
        comm = stat[stat.find(b"(") + 1 : rparen].decode(errors="replace")
        fields = stat[rparen + 2 :].split()
        start_ticks = int(fields[19]) if len(fields) > 19 else 0
        subsystems = cg.parse_proc_cgroup(cgroup_text)
        path = cg.cgroup_id(subsystems)
        ref = cg.classify(path)
        cid = cg.container_id(ref) if ref else None
        proc = Process(pid, start_ticks, comm, path, cid, read_environ_opt_outs(environ))
        return proc, subsystems

    def _new_container(self, proc: Process, subsystems: dict[str, str]) -> Container:
        ref = cg.classify(proc.cgroup_path)
        assert ref is not None and proc.container_id is not None
        return Container(
            id=proc.container_id,
            app_id=cg.app_id(proc.container_id),
            kind=ref.kind,
            cgroup_path=proc.cgroup_path,
            subsystems=subsystems,
            created_at=self._cgroup_created(proc.cgroup_path, subsystems),
        )

    def _cgroup_created(self, path: str, subsystems: dict[str, str]) -> float:
        candidates = []
        if subsystems.get("") == path and self.layout.unified:
            candidates.append(self.layout.v2_path(path))
        for ctl in ("cpu", "memory"):
            if subsystems.get(ctl) == path:
                candidates.append(self.layout.v1_path(ctl, path))
        for p in candidates:
            if p:
                try:
                    return os.stat(p).st_mtime
                except OSError:
                    continue
        return self._wall()
