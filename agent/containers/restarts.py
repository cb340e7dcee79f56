"""container_restarts_total: how many times a container's processes were replaced, by the
Coroot node agent's rule.

A container has a start: the start time of its oldest process when it was first seen. When a
process joins, the oldest start among the live processes (the newcomer included) is taken; if
it is later than the recorded start, the process the container ran since then has gone and
this counts as a restart (a systemd unit restarted, a container's entry process exited and
its runtime started it again), and that becomes the start. A fork while the oldest process
lives is no restart, and an exit alone decides nothing until the next process joins.

Start times are the kernel's (/proc/PID/stat starttime, clock ticks since boot), carried on
the registry's Process. The count lives as long as the registry keeps the container: a
container it forgot (dead for longer than its bound) starts again from zero, as it does in
the node agent once a dead container is collected.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from agent.component import Component
from agent.containers.registry import Process, Registry
from agent.metrics import Families


@dataclass
class _State:
    started: int  # start ticks of the oldest live process when the current run began
    restarts: int = 0
    live: dict[int, int] = field(default_factory=dict)  # pid -> start ticks


class RestartCounter(Component):
    """container_restarts_total for every reported container (0 until it restarts)."""

    name = "restarts"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._state: dict[str, _State] = {}
        self._synced = False

    def on_process(self, what: str, proc: Process) -> None:
        cid = proc.container_id
        if cid is None:
            return
        with self._lock:
            if what == "added":
                self._joined(cid, proc.pid, proc.start_ticks)
            elif what == "removed":
                st = self._state.get(cid)
                if st is not None and st.live.get(proc.pid) == proc.start_ticks:
                    del st.live[proc.pid]

    def _joined(self, cid: str, pid: int, start: int) -> None:
        st = self._state.get(cid)
        if st is None:
            self._state[cid] = _State(started=start, live={pid: start})
            return
        if st.live.get(pid) == start:
            return  # an exec, or seen again by a resync
        st.live[pid] = start
        oldest = min(st.live.values())
        if oldest > st.started:
            st.restarts += 1
            st.started = oldest

    def on_rename(self, old: str, new: str) -> None:
        """`old`'s processes join `new`: a container that ran under `new` before (a Kubernetes
        container restarted in a new cgroup) counts a restart by the same rule as any join."""
        with self._lock:
            st = self._state.pop(old, None)
            if st is None:
                return
            if new not in self._state:
                self._state[new] = st
                return
            for pid, start in sorted(st.live.items(), key=lambda kv: kv[1]):
                self._joined(new, pid, start)

    def tick(self, now: float, gone: list[str]) -> None:
        if not self._synced:
            # Processes the registry found before this component listened, oldest first so
            # that a container's start is its oldest process's.
            self._synced = True
            procs = [p for p in map(self.registry.process, self.registry.pids())
                     if p is not None and p.container_id is not None]
            for p in sorted(procs, key=lambda p: p.start_ticks):
                self.on_process("added", p)
        if gone:
            with self._lock:
                for cid in gone:
                    self._state.pop(cid, None)

    def restarts(self, cid: str) -> int:
        with self._lock:
            st = self._state.get(cid)
            return st.restarts if st is not None else 0

    def collect(self, f: Families) -> None:
        with self._lock:
            counts = {cid: st.restarts for cid, st in self._state.items()}
        for c in self.registry.containers():
            f.counter("container_restarts_total", "Number of times the container was restarted",
                      counts.get(c.id, 0), container_id=c.id, app_id=c.app_id)
