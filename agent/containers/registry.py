"""The process and container registry: pid -> container, and what each process opted out of.

Fed by a /proc scan at start (and a periodic resync that repairs anything a lost event
missed), then by process events from bpf/proc.c. Answers "which container is pid P" and
"did P opt out of X" for the other modules; notifies listeners of processes coming and going.
Holds no BPF objects and ships nothing.

Runtime names: a container whose cgroup names only a runtime's 64-hex id (Docker, containerd,
CRI-O, Podman) starts under the id derived from its cgroup path and is looked up once, when it
is first seen, by the runtime resolver (agent/containers/runtimes/resolver.py), which asks on
its own thread. The answer is queued and applied on the poll thread at the next housekeeping:
the container is renamed to the runtime's id (`/k8s/<ns>/<pod>/<container>`, `/docker/<name>`,
...) and rename listeners move what they counted under the old id to the new one (adding to
what the new id has, when another container already holds it: a Kubernetes container
restarted in a new cgroup under the same name). A pod's sandbox is hidden for good.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from agent.containers import cgroup as cg

if TYPE_CHECKING:
    from agent.containers.runtimes import ContainerMetadata

log = logging.getLogger(__name__)

# Mirror of struct proc_event in bpf/proc.c: type, pid, ppid, pad, cgroup id, comm.
PROC_EVENT = struct.Struct("<IIIIQ16s")
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
    # placed by a fork event's cgroup, the process already gone: its parent's, which a child
    # may leave before it execs (`echo $$ > cgroup.procs; exec`); its exec event may place it again
    provisional: bool = False


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
    runtime_id: str | None = None  # the runtime's id, when the cgroup names one (64-hex)
    metadata: ContainerMetadata | None = None  # what the runtime said, once it answered
    sandbox: bool = False  # a pod's sandbox (pause): never reported

    @property
    def image(self) -> str:
        return self.metadata.image if self.metadata is not None else ""


K = TypeVar("K")
V = TypeVar("V")


def rekey(d: MutableMapping[K, V], old: str, new: str, merge: Callable[[V, V], V] | None = None) -> None:
    """For rename listeners: move the entries of container `old` to `new` in a dict keyed by
    a container id, or by a tuple whose first item is one. `merge(kept, moved)` combines the
    values of a key both have (by default the moved value replaces the kept one)."""
    for k in [k for k in d if (k[0] if isinstance(k, tuple) else k) == old]:
        v = d.pop(k)
        nk: K = (new, *k[1:]) if isinstance(k, tuple) else new  # type: ignore[assignment]
        if merge is not None and nk in d:
            d[nk] = merge(d[nk], v)
        else:
            d[nk] = v


def read_environ_opt_outs(environ: bytes) -> frozenset[str]:
    out = set()
    for m in _OPT_OUT_RE.finditer(environ):
        if b"disabled" in m.group(2):
            out.add(OPT_OUT_VARS[m.group(1).decode()])
    return frozenset(out)


Listener = Callable[[str, Process], None]  # ("added" | "removed", process)
RenameListener = Callable[[str, str], None]  # (old id, new id)

# Cgroup kinds whose id is the runtime's to give (cgroup.ContainerRef.kind).
RUNTIME_KINDS = frozenset({"docker", "cri-containerd", "crio", "podman"})
MAX_PENDING_ANSWERS = 65536  # runtime answers waiting for the poll thread; beyond it the oldest go


class Resolver(Protocol):
    """What the registry needs of agent/containers/runtimes/resolver.py's RuntimeResolver."""

    def request(self, runtime_id: str, runtime_hint: str | None = None) -> None: ...

    def get(self, runtime_id: str) -> ContainerMetadata | None: ...

    def forget(self, runtime_id: str) -> None: ...

    def subscribe(self, listener: Callable[[str, ContainerMetadata], None]) -> None: ...


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
        self._cgroup_ids = cg.CgroupIds(self.layout.unified)
        self.from_event = 0  # processes gone before they were read, placed by their event's cgroup
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
        self._resolver: Resolver | None = None
        self._rename_listeners: list[RenameListener] = []
        self._by_runtime: dict[str, Container] = {}  # runtime id -> the container it is part of
        self._answers: deque[tuple[str, ContainerMetadata]] = deque(maxlen=MAX_PENDING_ANSWERS)
        self.renames = 0

    # ----------------------------------------------------------- queries ---

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def subscribe_renames(self, listener: RenameListener) -> None:
        """`listener(old, new)` on the poll thread when a container takes its runtime's id:
        move what was counted under `old` to `new`, adding to what `new` has already."""
        self._rename_listeners.append(listener)

    def use_resolver(self, resolver: Resolver) -> None:
        """Ask `resolver` for the runtime's name of every container whose cgroup names only
        a runtime id (those known now, and each new one once); its answers are applied by
        `housekeeping`."""
        self._resolver = resolver
        resolver.subscribe(self._runtime_answer)
        with self._lock:
            known = [c for c in self._containers.values() if c.runtime_id and c.metadata is None]
        for c in known:
            self._request(c)

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
        if c.sandbox:
            return False
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
        kind, pid, _ppid, _, cgroup, comm = PROC_EVENT.unpack_from(raw)
        self.events_seen += 1
        if kind in (EVENT_FORK, EVENT_EXEC):
            self.add(pid, cgroup, comm, provisional=kind == EVENT_FORK)
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

    def add(self, pid: int, cgroup: int = 0, comm: bytes = b"", provisional: bool = False) -> Process | None:
        """(Re)read a process: on fork, exec, or when first seen. `cgroup` and `comm`, from a
        fork or exec event, place a process that is gone before it could be read (its
        connections and requests, in other buffers, are still to be attributed)."""
        read = self._read_process(pid)
        if read is None and cgroup:
            read = self._from_event(pid, cgroup, comm, provisional)
        if read is None:
            return None
        proc, subsystems, runtime_id = read
        new: Container | None = None
        with self._lock:
            old = self._procs.get(pid)
            if old is not None:
                self._detach(old)
            self._procs[pid] = proc
            if proc.container_id is not None:
                c = self._containers.get(proc.container_id)
                if c is None:
                    rc = self._by_runtime.get(runtime_id) if runtime_id else None
                    if rc is not None and self._containers.get(rc.id) is rc:
                        c = rc  # renamed already: the process joins it under the runtime's id
                        proc = replace(proc, container_id=c.id)
                        self._procs[pid] = proc
                    else:
                        c = self._new_container(proc, subsystems, runtime_id)
                        self._containers[c.id] = c
                        new = c
                c.pids.add(pid)
                c.dead_since = None
                c.opt_out = c.opt_out | proc.opt_out
        if new is not None and new.runtime_id is not None:
            self._request(new)
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
        """Apply the runtimes' answers (renames), then forget containers dead for longer than
        the bound. Returns the ids forgotten. The poll thread's."""
        self.apply_runtime_answers()
        now = self._clock()
        gone = []
        runtime_ids: list[str] = []
        with self._lock:
            for cid, c in list(self._containers.items()):
                if c.dead_since is not None and now - c.dead_since >= self.dead_ttl:
                    del self._containers[cid]
                    gone.append(cid)
                    for rid in [r for r, rc in self._by_runtime.items() if rc is c]:
                        del self._by_runtime[rid]
                        runtime_ids.append(rid)
        if self._resolver is not None:
            for rid in runtime_ids:
                self._resolver.forget(rid)
        for cid in gone:
            log.debug("container %s forgotten", cid)
        return gone

    # ----------------------------------------------------------- runtimes ---

    def _request(self, c: Container) -> None:
        """Ask the resolver (a queue insert: it never waits for a runtime)."""
        if self._resolver is None or c.runtime_id is None:
            return
        known = self._resolver.get(c.runtime_id)
        if known is not None:  # answered before (another cgroup of the same container)
            self._answers.append((c.runtime_id, known))
            return
        self._resolver.request(c.runtime_id, c.kind)

    def _runtime_answer(self, runtime_id: str, meta: ContainerMetadata) -> None:
        """The resolver's listener, on its thread: queued for the poll thread."""
        self._answers.append((runtime_id, meta))

    def apply_runtime_answers(self) -> list[tuple[str, str]]:
        """Rename the containers the runtimes have answered for; the rename listeners hear
        each (old, new). Returns them."""
        renamed: list[tuple[str, str]] = []
        while True:
            try:
                runtime_id, meta = self._answers.popleft()
            except IndexError:
                break
            with self._lock:
                c = self._by_runtime.get(runtime_id)
                if c is None or self._containers.get(c.id) is not c:
                    continue  # forgotten meanwhile
                pair = self._apply_locked(c, meta)
            if pair is not None:
                renamed.append(pair)
                for cb in self._rename_listeners:
                    try:
                        cb(*pair)
                    except Exception:
                        log.exception("rename listener failed for %s -> %s", *pair)
        return renamed

    def _apply_locked(self, c: Container, meta: ContainerMetadata) -> tuple[str, str] | None:
        c.metadata = meta
        if meta.sandbox:
            c.sandbox = True
            log.debug("container %s is a pod sandbox: not reported", c.id)
            return None
        new = meta.id
        if not new or new == c.id:
            return None
        old = c.id
        pids = set(c.pids)
        into = self._containers.get(new)
        if into is not None and into is not c:
            # Another cgroup under the same name (the previous run of a restarted Kubernetes
            # container): one container, as the node agent keeps it, on the newer cgroup.
            into.pids |= c.pids
            into.oom_kills += c.oom_kills
            into.opt_out |= c.opt_out
            if c.pids:
                into.dead_since = None
            if c.created_at >= into.created_at:
                # the newer cgroup's counters; the container stays as old as its first run (a
                # younger created_at would hide it again for min_container_age)
                into.cgroup_path, into.subsystems = c.cgroup_path, c.subsystems
                into.metadata, into.runtime_id = meta, c.runtime_id
            for rid, rc in list(self._by_runtime.items()):
                if rc is c:
                    self._by_runtime[rid] = into
            del self._containers[old]
        else:
            del self._containers[old]
            c.id, c.app_id = new, cg.app_id(new)
            self._containers[new] = c
        for pid in pids:
            p = self._procs.get(pid)
            if p is not None and p.container_id == old:
                self._procs[pid] = replace(p, container_id=new)
        for pid, cid in list(self._exited.items()):
            if cid == old:
                self._exited[pid] = new
        self.renames += 1
        log.info("container %s is %s (%s)", old, new, meta.runtime)
        return old, new

    # ----------------------------------------------------------- reading ---

    def _read_process(self, pid: int) -> tuple[Process, dict[str, str], str | None] | None:
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
        return self._identify(pid, start_ticks, comm, cg.parse_proc_cgroup(cgroup_text),
                              read_environ_opt_outs(environ))

    def _from_event(self, pid: int, cgroup: int, comm: bytes,
                    provisional: bool) -> tuple[Process, dict[str, str], str | None] | None:
        """A process already gone, from its event: the v2 cgroup it was in (opt-outs unknown:
        its environment went with it)."""
        path = self._cgroup_ids.path(cgroup)
        if path is None:
            return None
        self.from_event += 1
        name = comm.split(b"\0", 1)[0].decode(errors="replace")
        proc, subsystems, runtime_id = self._identify(pid, 0, name, cg.parse_proc_cgroup(f"0::{path}\n"), frozenset())
        return replace(proc, provisional=provisional), subsystems, runtime_id

    def _identify(self, pid: int, start_ticks: int, comm: str, subsystems: dict[str, str],
                  opt_out: frozenset[str]) -> tuple[Process, dict[str, str], str | None]:
        path = cg.cgroup_id(subsystems)
        ref = cg.classify(path)
        cid = cg.container_id(ref) if ref else None
        runtime_id = ref.runtime_id if ref is not None and ref.kind in RUNTIME_KINDS else None
        if runtime_id is not None:
            c = self._by_runtime.get(runtime_id)
            if c is not None:
                cid = c.id  # its runtime's name, known already
        proc = Process(pid, start_ticks, comm, path, cid, opt_out)
        return proc, subsystems, runtime_id

    def _new_container(self, proc: Process, subsystems: dict[str, str], runtime_id: str | None) -> Container:
        """(Lock held.)"""
        ref = cg.classify(proc.cgroup_path)
        assert ref is not None and proc.container_id is not None
        c = Container(
            id=proc.container_id,
            app_id=cg.app_id(proc.container_id),
            kind=ref.kind,
            cgroup_path=proc.cgroup_path,
            subsystems=subsystems,
            created_at=self._cgroup_created(proc.cgroup_path, subsystems),
            runtime_id=runtime_id,
        )
        if runtime_id is not None:
            self._by_runtime[runtime_id] = c
        return c

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
