"""RuntimeResolver: cgroup-derived container ids -> what the container runtime says, looked up
once per container on the resolver's own thread and kept in a bounded LRU cache.

The poll loop (or whoever finds a new container) calls `request(runtime_id, runtime_hint)` and goes
on: it never waits for a runtime. `get(runtime_id)` answers from the cache, None until the
runtime has answered. When an answer arrives the listeners are called (on the resolver's
thread) so the registry can rename the container from its cgroup-derived id to the
runtime's. A runtime that is down is asked again with exponential backoff; while it is in
backoff no lookup tries it, so a dead socket costs one connection attempt per backoff period,
not one per container. A container no runtime knows is asked again a few times (a runtime
may record it a moment after its cgroup appears), then left alone until `forget`.

Does I/O only on its own thread; ships nothing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.component import Component
from agent.containers.runtimes import (
    DEFAULT_TIMEOUT,
    DISABLED,
    BadAnswer,
    ContainerMetadata,
    ContainerNotFound,
    RuntimeAbsent,
    RuntimeClient,
    RuntimeStatus,
    RuntimeUnavailable,
    check_runtime_id,
)
from agent.containers.runtimes.containerd import ContainerdClient
from agent.containers.runtimes.crio import CrioClient
from agent.containers.runtimes.docker import DockerClient
from agent.containers.runtimes.podman import PodmanClient

if TYPE_CHECKING:
    from agent.config import Config
    from agent.metrics import Families

log = logging.getLogger(__name__)

Listener = Callable[[str, ContainerMetadata], None]  # (runtime id, what the runtime said)

# Which runtimes may know a container, by the kind its cgroup path shows (cgroup.classify),
# in the order they are asked. A bare 64-hex id under kubepods (kubelet's cgroupfs driver) or
# /docker is Docker's or containerd's, as in the node agent.
RUNTIMES_BY_KIND: dict[str, tuple[str, ...]] = {
    "cri-containerd": ("containerd",),
    "containerd": ("containerd",),
    "crio": ("crio",),
    "podman": ("podman",),
    "docker": ("docker", "containerd"),
}
ALL_RUNTIMES = ("docker", "containerd", "crio", "podman")

CLOSE_WAIT = 1.0  # seconds close() waits for a lookup in flight

# Entry states.
QUEUED, RUNNING, WAITING, FOUND, MISSING = "queued", "running", "waiting", "found", "missing"

CLIENTS: dict[str, type[RuntimeClient]] = {
    "containerd": ContainerdClient,
    "docker": DockerClient,
    "crio": CrioClient,
    "podman": PodmanClient,
}


def build_clients(
    sockets: dict[str, str] | None = None,
    disabled: Iterable[str] = (),
    host_root: str | None = "/proc/1/root",
    timeout: float = DEFAULT_TIMEOUT,
) -> list[RuntimeClient]:
    """One client per runtime not disabled. `sockets`: {runtime: socket path} overrides (an
    empty path keeps the usual places); `host_root`: where the host's / is seen (the node
    agent's /proc/1/root), tried after the paths as mounted."""
    off = set(disabled)
    unknown = (off | set(sockets or {})) - set(CLIENTS)
    if unknown:
        raise ValueError(f"unknown container runtime(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(CLIENTS)}")
    return [cls(socket=(sockets or {}).get(name) or None, host_root=host_root, timeout=timeout)
            for name, cls in CLIENTS.items() if name not in off]


def runtime_resolver(cfg: Config, timeout: float = DEFAULT_TIMEOUT) -> RuntimeResolver:
    """The clients the configuration leaves on (--containerd-socket, --crio-socket,
    --docker-socket, --podman-socket, --disable-runtime), behind one resolver; the host's root
    is the configured procfs's /1/root."""
    sockets = {"containerd": cfg.containerd_socket, "crio": cfg.crio_socket,
               "docker": cfg.docker_socket, "podman": cfg.podman_socket}
    clients = build_clients(sockets, disabled=cfg.disabled_runtimes,
                            host_root=os.path.join(cfg.procfs_root, "1", "root"), timeout=timeout)
    return RuntimeResolver(clients, cache_size=cfg.runtime_cache_size, disabled=cfg.disabled_runtimes)


@dataclass
class _Entry:
    hint: str | None
    state: str = QUEUED
    meta: ContainerMetadata | None = None
    not_found: int = 0  # "no such container" answers so far
    due: float = 0.0  # when a WAITING entry is asked again


@dataclass
class _Runtime:
    client: RuntimeClient
    down_until: float = 0.0
    backoff: float = 0.0
    up: bool | None = None  # None until first asked
    absent: bool = False  # down because it has no socket
    last_error: str = ""
    results: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class RuntimeResolver(Component):
    """See the module docstring. Thread-safe; `request`, `get`, `state` and `forget` take one
    lock that the resolver's thread holds only between lookups, never during one."""

    name = "runtimes"

    def __init__(
        self,
        clients: Sequence[RuntimeClient],
        listener: Listener | None = None,
        *,
        cache_size: int = 4096,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        not_found_retries: int = 3,
        disabled: Iterable[str] = (),
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._runtimes = {c.name: _Runtime(c) for c in clients}
        self._disabled = tuple(disabled)
        self._listeners: list[Listener] = [listener] if listener else []
        self.cache_size = cache_size
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.not_found_retries = not_found_retries
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU: oldest first
        self._queue: OrderedDict[str, None] = OrderedDict()  # QUEUED ids, FIFO
        self._waiting: list[tuple[float, int, str]] = []  # heap of (due, seq, id)
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._running = 0
        self.requests = 0  # request() calls that started a lookup
        self.evictions = 0
        self.dropped = 0  # evicted before the runtime answered
        self.invalid = 0

    # ------------------------------------------------------------ callers ---

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def request(self, runtime_id: str, runtime_hint: str | None = None) -> None:
        """Look `runtime_id` (the id in the cgroup path) up unless it is cached or on its way.
        Never blocks on a runtime. `runtime_hint`: the cgroup's container kind
        (cgroup.ContainerRef.kind: cri-containerd, crio, docker, podman) or a runtime name;
        it chooses which runtimes are asked (RUNTIMES_BY_KIND), None asks all."""
        try:
            check_runtime_id(runtime_id)
        except ValueError:
            self.invalid += 1
            return
        with self._cond:
            e = self._entries.get(runtime_id)
            if e is not None:
                self._entries.move_to_end(runtime_id)
                return
            self._entries[runtime_id] = _Entry(runtime_hint)
            self._queue[runtime_id] = None
            self.requests += 1
            while len(self._entries) > self.cache_size:
                old_id, old = self._entries.popitem(last=False)
                self._queue.pop(old_id, None)
                self.evictions += 1
                if old.state in (QUEUED, RUNNING, WAITING):
                    self.dropped += 1
            self._cond.notify_all()  # the worker, and any wait_idle

    def get(self, runtime_id: str) -> ContainerMetadata | None:
        """The runtime's answer, or None (not asked yet, on its way, or no runtime knows it)."""
        with self._lock:
            e = self._entries.get(runtime_id)
            if e is None or e.state != FOUND:
                return None
            self._entries.move_to_end(runtime_id)
            return e.meta

    def state(self, runtime_id: str) -> str | None:
        """queued | running | waiting | found | missing, or None when not in the cache."""
        with self._lock:
            e = self._entries.get(runtime_id)
            return e.state if e is not None else None

    def forget(self, runtime_id: str) -> None:
        """The container is gone: drop its answer (a later request asks again)."""
        with self._lock:
            self._entries.pop(runtime_id, None)
            self._queue.pop(runtime_id, None)

    def __len__(self) -> int:
        return len(self._entries)

    def status(self) -> list[RuntimeStatus]:
        """Ask every runtime now (blocking, bounded by each client's timeout): for
        `coroot-agent check`, never for the event path."""
        rows = [rt.client.status() for rt in self._runtimes.values()]
        rows += [RuntimeStatus(name, DISABLED, detail="disabled by configuration") for name in self._disabled]
        return rows

    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is queued or being looked up (WAITING entries may remain)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    # --------------------------------------------------------- component ---

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="runtime-resolver", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            t, self._thread = self._thread, None
        if t is not None:
            # A lookup in flight ends within its client's timeout; the agent's stop does not
            # wait that long for it (the thread is a daemon, and its answer would go unused).
            t.join(timeout=CLOSE_WAIT)
            if t.is_alive():
                log.info("runtime resolver: a lookup still in flight at close")
        for rt in self._runtimes.values():
            rt.client.close()

    def self_metrics(self, f: Families) -> None:
        with self._lock:
            entries = len(self._entries)
            runtimes = [(name, rt.up, dict(rt.results)) for name, rt in self._runtimes.items()]
        for name, up, results in runtimes:
            if up is not None:
                f.gauge("coroot_agent_runtime_up", "1 when the container runtime answered its last request",
                        1.0 if up else 0.0, runtime=name)
            for result, n in sorted(results.items()):
                f.counter("coroot_agent_runtime_lookups_total", "container lookups by runtime and result",
                          n, runtime=name, result=result)
        f.gauge("coroot_agent_runtime_cache_entries", "containers in the runtime metadata cache", entries)
        f.counter("coroot_agent_runtime_cache_evictions_total", "entries evicted from the runtime metadata cache",
                  self.evictions)
        f.counter("coroot_agent_runtime_lookups_dropped_total",
                  "lookups evicted from the cache before a runtime answered", self.dropped)

    # ------------------------------------------------------------ worker ---

    def _run(self) -> None:
        while True:
            with self._cond:
                self._running = 0
                item = self._next_locked()
                if item is None:
                    return
                runtime_id, entry = item
                entry.state = RUNNING
                self._running = 1
            try:
                outcome, value = self._lookup(runtime_id, entry.hint)
            except Exception:  # a bug must not stop every later lookup
                log.exception("runtime lookup of %s failed", runtime_id)
                outcome, value = MISSING, None
            self._settle(runtime_id, entry, outcome, value)

    def _next_locked(self) -> tuple[str, _Entry] | None:
        while True:
            if self._closing:
                return None
            now = time.monotonic()
            while self._waiting and self._waiting[0][0] <= now:
                due, _, rid = heapq.heappop(self._waiting)
                e = self._entries.get(rid)
                if e is not None and e.state == WAITING and e.due == due:
                    e.state = QUEUED
                    self._queue[rid] = None
            while self._queue:
                rid, _ = self._queue.popitem(last=False)
                e = self._entries.get(rid)
                if e is not None and e.state == QUEUED:
                    return rid, e
            self._cond.notify_all()  # wait_idle
            timeout = self._waiting[0][0] - now if self._waiting else None
            self._cond.wait(timeout)

    def _settle(self, runtime_id: str, entry: _Entry, outcome: str, value: object) -> None:
        notify: ContainerMetadata | None = None
        with self._cond:
            if self._entries.get(runtime_id) is not entry:
                return  # forgotten or evicted meanwhile
            if outcome == FOUND:
                assert isinstance(value, ContainerMetadata)
                entry.state, entry.meta = FOUND, value
                notify = value
            elif outcome == WAITING:
                assert isinstance(value, float)
                self._park_locked(runtime_id, entry, value)
            else:
                entry.not_found += 1
                if entry.not_found <= self.not_found_retries:
                    delay = min(self.backoff * 2 ** (entry.not_found - 1), self.max_backoff)
                    self._park_locked(runtime_id, entry, time.monotonic() + delay)
                else:
                    entry.state = MISSING
        if notify is not None:
            log.debug("runtime %s: %s is %s", notify.runtime, runtime_id, notify.id)
            for cb in list(self._listeners):
                try:
                    cb(runtime_id, notify)
                except Exception:
                    log.exception("runtime listener failed for %s", runtime_id)

    def _park_locked(self, runtime_id: str, entry: _Entry, due: float) -> None:
        entry.state, entry.due = WAITING, due
        heapq.heappush(self._waiting, (due, next(self._seq), runtime_id))

    def _lookup(self, runtime_id: str, hint: str | None) -> tuple[str, object]:
        """Ask the runtimes that may know this container, in order. FOUND with the answer;
        WAITING with when to ask again (a runtime that may know it is down); MISSING when the
        runtimes that could be asked said they have no such container. A runtime with no
        socket at all makes the lookup wait only when no other runtime answered: it is most
        likely not installed on this node."""
        names = RUNTIMES_BY_KIND.get(hint or "", ALL_RUNTIMES)
        down: float | None = None  # earliest retry of a runtime whose socket is there
        absent: float | None = None  # earliest retry of a runtime with no socket
        answered = False
        for name in names:
            rt = self._runtimes.get(name)
            if rt is None:
                continue
            now = time.monotonic()
            if rt.down_until > now:
                if rt.absent:
                    absent = min(absent or rt.down_until, rt.down_until)
                else:
                    down = min(down or rt.down_until, rt.down_until)
                continue
            try:
                meta = rt.client.inspect(runtime_id)
            except ContainerNotFound:
                self._mark_up(rt, "not_found")
                answered = True
                continue
            except RuntimeAbsent as e:
                self._mark_down(rt, str(e), absent=True)
                absent = min(absent or rt.down_until, rt.down_until)
                continue
            except RuntimeUnavailable as e:
                self._mark_down(rt, str(e), absent=False)
                down = min(down or rt.down_until, rt.down_until)
                continue
            except (BadAnswer, ValueError) as e:
                log.warning("%s: %s", name, e)
                self._mark_up(rt, "error")
                answered = True
                continue
            self._mark_up(rt, "found")
            return FOUND, meta
        if down is not None:
            return WAITING, min(down, absent) if absent is not None else down
        if absent is not None and not answered:
            return WAITING, absent
        return MISSING, None

    def _mark_up(self, rt: _Runtime, result: str) -> None:
        with self._lock:
            if rt.up is False:
                log.info("container runtime %s is reachable again", rt.client.name)
            rt.up, rt.absent, rt.backoff, rt.down_until, rt.last_error = True, False, 0.0, 0.0, ""
            rt.results[result] += 1

    def _mark_down(self, rt: _Runtime, error: str, absent: bool) -> None:
        now = time.monotonic()  # after the failed attempt, which may have taken its timeout
        with self._lock:
            rt.absent = absent
            rt.backoff = min(rt.backoff * 2, self.max_backoff) if rt.backoff else self.backoff
            rt.down_until = now + rt.backoff
            if rt.up is not False or rt.last_error != error:
                log.info("container runtime %s: %s (asking again in %.1fs)", rt.client.name, error, rt.backoff)
            rt.up, rt.last_error = False, error
            rt.results["absent" if absent else "unavailable"] += 1
