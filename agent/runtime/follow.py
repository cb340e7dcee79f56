"""The shape the per-process runtime probes share (agent/runtime/python.py, nodejs.py): the
registry's listener queues processes of containers (bounded, the latest news per pid), and the
component's ticks look at them a batch at a time, off the event path; the first tick queues the
processes the registry already knew. What looking at a process means is the subclass's."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from agent.component import Component
from agent.containers.registry import Process, Registry
from agent.ebpf.maps import Programs

log = logging.getLogger(__name__)

MAX_QUEUED = 8192  # processes waiting to be looked at; more are dropped (and counted)
MAX_CLASSIFY_PER_TICK = 512


class ProcessFollower(Component):
    def __init__(self, registry: Registry, procfs: str = "/proc") -> None:
        self.registry = registry
        self.procfs = procfs
        self.programs: Programs | None = None
        self._lock = threading.Lock()
        self._queue: OrderedDict[int, str] = OrderedDict()  # pid -> "added" | "removed"
        self._retired: dict[str, int] = {}  # container -> what its exited processes counted
        self._synced = False
        self.dropped = 0

    def on_process(self, what: str, proc: Process) -> None:
        with self._lock:
            if what == "added" and proc.container_id is None:
                return
            if len(self._queue) >= MAX_QUEUED and proc.pid not in self._queue:
                self.dropped += 1
                return
            self._queue[proc.pid] = what
            self._queue.move_to_end(proc.pid)

    def tick(self, now: float, gone: list[str]) -> None:
        if self.programs is None:
            return
        if not self._synced:
            self._synced = True
            with self._lock:
                for pid in self.registry.pids():
                    self._queue.setdefault(pid, "added")
        with self._lock:
            batch: list[tuple[int, str]] = []
            while self._queue and len(batch) < MAX_CLASSIFY_PER_TICK:
                batch.append(self._queue.popitem(last=False))
        for pid, what in batch:
            if what == "removed":
                self._untrack(pid)
            else:
                self._look_at(pid)
        if gone:
            with self._lock:
                for cid in gone:
                    self._retired.pop(cid, None)

    def _look_at(self, pid: int) -> None:
        """A process was added or exec'ed: follow it if it runs the runtime, else stop."""
        raise NotImplementedError

    def _untrack(self, pid: int) -> None:
        """Stop following a process (gone, or no longer the runtime)."""
        raise NotImplementedError


class RoundThread(Component):
    """The shape of a runtime reader with a thread of its own (agent/runtime/jvm.py, dotnet.py):
    `round()` about every `every` seconds until `close`; a round that raises is logged and the
    next one tries again. `_sync_pending` queues, once, the processes the registry already knew."""

    every = 1.0
    _pending: dict[int, None]
    _lock: threading.Lock
    registry: Registry

    def _init_thread(self) -> None:
        self._synced = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("%s: a round failed", self.name)
            self._stop.wait(self.every)

    def round(self) -> None:
        raise NotImplementedError

    def _sync_pending(self) -> None:
        if not self._synced:
            self._synced = True
            with self._lock:
                for pid in self.registry.pids():
                    self._pending[pid] = None

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
