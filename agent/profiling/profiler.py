"""Continuous CPU profiling: drains the kernel's sample counts every `interval`, symbolizes the
stacks and writes one profile per container to `profiling_stacks` / `profiling_samples` in
Coroot's format (type ebpf:cpu:nanoseconds, frames leaf first, FNV-1a 64 stack hash, value =
samples x sampling period in ns, service name = the container's app_id).

Keeps the kernel's `profile_pids` map equal to the processes that may be sampled: in a
reported container, not opted out with COROOT_EBPF_PROFILING=disabled.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

from agent.containers.registry import Process, Registry
from agent.hashing import fnv1a64
from agent.profiling.symbols import Symbolizer
from agent.sinks.batcher import Sink

log = logging.getLogger(__name__)

PROFILE_TYPE = "ebpf:cpu:nanoseconds"
Stack = tuple[str, ...]


def stack_hash(frames: Stack) -> int:
    return fnv1a64(f.encode() for f in frames)


class Profiler:
    def __init__(self, registry: Registry, sink: Sink | None, frequency: int, interval: float,
                 symbolizer: Symbolizer | None = None, wall: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.sink = sink
        self.frequency = frequency
        self.period_ns = 1_000_000_000 // frequency
        self.interval = interval
        self.symbols = symbolizer or Symbolizer(registry.procfs)
        self._wall = wall
        self._lock = threading.Lock()
        self._bpf = None
        self._allowed: dict[int, str] = {}  # pid -> container_id, mirrored in profile_pids
        # Exited since the last drain: their samples still count, and their memory maps stay
        # cached until that drain has symbolized them.
        self._exited: dict[int, str] = {}
        self._pending: dict[str, Counter[Stack]] = defaultdict(Counter)
        self.drain_every = min(interval, 1.0)
        self._last_flush_ns = int(wall() * 1e9)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples_written = 0
        self.drops = 0

    def attach(self, bpf: object) -> None:
        self._bpf = bpf
        self.sync()

    # ----------------------------------------------------------- pid map ---

    def on_process(self, what: str, proc: Process) -> None:
        """Registry listener: an exec invalidates the pid's symbol caches at once; an exit after
        the next drain (which still has its samples to symbolize)."""
        with self._lock:
            if what == "removed":
                cid = self._allowed.pop(proc.pid, None)
                if cid is not None:
                    self._set_pid(proc.pid, False)
                    self._exited[proc.pid] = cid
                else:
                    self.symbols.forget(proc.pid)
            else:
                self.symbols.forget(proc.pid)
                self._sync_one(proc.pid)

    def _sync_one(self, pid: int) -> None:
        c = self.registry.container_of(pid)
        ok = c is not None and not self.registry.opted_out(pid, "profiling")
        if ok and pid not in self._allowed:
            self._allowed[pid] = c.id  # type: ignore[union-attr]
            self._set_pid(pid, True)
        elif not ok and pid in self._allowed:
            del self._allowed[pid]
            self._set_pid(pid, False)

    def sync(self) -> None:
        """Bring profile_pids in line with the registry (containers become reportable with age)."""
        with self._lock:
            live = set(self.registry.pids())
            for pid in list(self._allowed):
                if pid not in live:
                    del self._allowed[pid]
                    self._set_pid(pid, False)
            for pid in live:
                self._sync_one(pid)

    def _set_pid(self, pid: int, on: bool) -> None:
        if self._bpf is None:
            return
        t = self._bpf["profile_pids"]  # type: ignore[index]
        try:
            if on:
                t[t.Key(pid)] = t.Leaf(1)
            else:
                del t[t.Key(pid)]
        except KeyError:
            pass

    # ------------------------------------------------------------- drain ---

    def drain(self) -> dict[str, Counter[Stack]]:
        """Samples since the last drain, per container, as symbolized stacks (leaf first)."""
        if self._bpf is None:
            return {}
        b = self._bpf
        active_t = b["profile_active"]  # type: ignore[index]
        cur = int(active_t[ctypes.c_int(0)].value)
        active_t[ctypes.c_int(0)] = ctypes.c_uint32(1 - cur)
        time.sleep(0.005)  # let programs that read the old index finish
        counts_t = b[f"profile_counts{cur}"]  # type: ignore[index]
        items = [(k.pid, k.user_stack, k.kernel_stack, v.value) for k, v in counts_t.items()]
        counts_t.clear()
        stacks_t = b["profile_stacks"]  # type: ignore[index]
        out: dict[str, Counter[Stack]] = defaultdict(Counter)
        used: set[int] = set()
        with self._lock:
            exited, self._exited = self._exited, {}
        for pid, ustack, kstack, n in items:
            cid = self._allowed.get(pid) or exited.get(pid)
            if cid is None:
                c = self.registry.container_of(pid)
                if c is None:
                    continue
                cid = c.id
            frames: list[str] = []
            if kstack >= 0:
                frames += [self.symbols.kernel(a) for a in self._walk(stacks_t, kstack)]
                used.add(kstack)
            if ustack >= 0:
                frames += [self.symbols.user(pid, a) for a in self._walk(stacks_t, ustack)]
                used.add(ustack)
            if not frames:
                frames = ["[unknown]"]
            out[cid][tuple(frames)] += n
        # Stack ids still referenced by the other (now active) map must survive.
        other = b[f"profile_counts{1 - cur}"]  # type: ignore[index]
        keep = {k.user_stack for k in other.keys()} | {k.kernel_stack for k in other.keys()}
        for sid in used - keep:
            try:
                del stacks_t[ctypes.c_int(sid)]
            except KeyError:
                pass
        for pid in exited:
            self.symbols.forget(pid)
        dropped_t = b["profile_dropped"]  # type: ignore[index]
        self.drops = sum(int(v) for v in dropped_t[dropped_t.Key(0)])
        return out

    @staticmethod
    def _walk(stacks_t: object, sid: int) -> list[int]:
        try:
            return [a for a in stacks_t.walk(sid) if a]  # type: ignore[attr-defined]
        except KeyError:
            return []

    # -------------------------------------------------------------- write ---

    def flush(self) -> int:
        """Drain and write one profile per container; returns samples written."""
        now_ns = int(self._wall() * 1e9)
        start_ns, self._last_flush_ns = self._last_flush_ns, now_ns
        self.collect()
        profiles, self._pending = self._pending, defaultdict(Counter)
        if self.sink is None:
            return 0
        apps = {c.id: c.app_id for c in self.registry.containers()}
        n = 0
        for cid, stacks in profiles.items():
            service = apps.get(cid, cid)
            for frames, count in stacks.items():
                h = stack_hash(frames)
                self.sink.add("profiling_stacks", (service, h, now_ns, list(frames)))
                self.sink.add("profiling_samples", (service, PROFILE_TYPE, start_ns, now_ns,
                                                    {"container_id": cid}, h, count * self.period_ns))
                n += count
        self.samples_written += n
        return n

    def collect(self) -> None:
        """Drain the kernel's counts into the pending profile (often, so that short-lived
        processes are symbolized while their memory maps can still be read)."""
        for cid, stacks in self.drain().items():
            self._pending[cid].update(stacks)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="profiler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_flush = time.monotonic() + self.interval
        while not self._stop.wait(self.drain_every):
            try:
                self.sync()
                if time.monotonic() >= next_flush:
                    self.flush()
                    next_flush = time.monotonic() + self.interval
                else:
                    self.collect()
            except Exception:  # noqa: BLE001 - keep profiling
                log.exception("profiler")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            log.exception("profiler: last flush")
