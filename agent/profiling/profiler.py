"""Continuous CPU profiling: drains the kernel's sample counts every `interval`, symbolizes the
stacks and writes one profile per container to `profiling_stacks` / `profiling_samples` in
Coroot's format (type ebpf:cpu:nanoseconds, frames leaf first, FNV-1a 64 stack hash, value =
samples x sampling period in ns, service name = the container's workload or id, as for spans).
Rows are what the server writes for a profile the node agent sends (coroot: collector/profiles.go;
node agent: profiling/profiling.go): Labels `container.id`, `host.name`, `host.id`; each frame
`"<function> <file>:<line>"`, which for the node agent's eBPF frames (a name only) is
`"<function> :0"`; the process's command name is the outermost frame.

CPython processes (agent/profiling/python.py) also get their Python frames walked in the kernel:
those frames ("<qualname> <file>:<first line>") stand in place of the interpreter's eval loop.
Native stacks are walked in the kernel by the unwind tables of the processes' files
(agent/profiling/native.py), with frame pointers where a file has none.

Keeps the kernel's `profile_pids` map equal to the processes that may be sampled: in a
reported container, not opted out with COROOT_EBPF_PROFILING=disabled.

A component (agent/component.py) with its own thread; `close()` drains the kernel's counts a
last time and hands the last profile to the sink.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from agent.component import Component
from agent.containers.cgroup import service_name
from agent.containers.registry import Process, Registry
from agent.ebpf.maps import BpfMap, Programs
from agent.hashing import fnv1a64
from agent.metrics import Families
from agent.profiling.native import NativeMaps, NativeUnwinder
from agent.profiling.python import PythonFinder, decode_str, interleave, python_frame
from agent.profiling.symbols import Symbolizer
from agent.sinks import schema
from agent.sinks.batcher import Sink

log = logging.getLogger(__name__)

PROFILE_TYPE = "ebpf:cpu:nanoseconds"
Stack = tuple[str, ...]


def stack_hash(frames: Stack) -> int:
    return fnv1a64(f.encode() for f in frames)


def frame(name: str) -> str:
    """A frame as the server stores a pprof line ("%s %s:%d" of function, file, line), for a
    frame known by its name only, as the node agent's eBPF frames are."""
    return f"{name} :0"


def frame_name(text: str) -> str:
    """The function of a stored frame (its " <file>:<line>" tail removed)."""
    head, sep, tail = text.rpartition(" ")
    if sep and ":" in tail and tail.rsplit(":", 1)[1].isdigit():
        return head
    return text


@dataclass(frozen=True)
class Maps:
    """bpf/profiler.c's maps."""

    pids: BpfMap  # pid -> 1: processes that may be sampled
    active: BpfMap  # which of the two count maps the programs write now
    counts: tuple[BpfMap, BpfMap]
    stacks: BpfMap
    dropped: BpfMap  # per-CPU: samples the count map had no room for
    py_procs: BpfMap  # pid -> the interpreter's _PyRuntime address and offsets
    py_stacks: BpfMap  # hash -> a Python stack's code objects (leaf first)
    py_symbols: BpfMap  # (pid, code object) -> name, file, first line
    native: NativeMaps  # unwind tables and the stacks walked by them

    @classmethod
    def of(cls, programs: Programs) -> Maps:
        m = programs.map
        return cls(m("profile_pids"), m("profile_active"), (m("profile_counts0"), m("profile_counts1")),
                   m("profile_stacks"), m("profile_dropped"), m("py_procs"), m("py_stacks"), m("py_symbols"),
                   NativeMaps(m("unwind_rows"), m("unwind_procs"), m("unwind_maps"), m("native_stacks"),
                              m("native_stats")))


class Profiler(Component):
    name = "profiler"

    def __init__(self, registry: Registry, sink: Sink | None, frequency: int, interval: float,
                 symbolizer: Symbolizer | None = None, wall: Callable[[], float] = time.time,
                 host_id: str = "", native_unwinding: bool = True) -> None:
        self.registry = registry
        self.host_labels = {"host.name": socket.gethostname(), "host.id": host_id}
        self.sink = sink
        self.frequency = frequency
        self.period_ns = 1_000_000_000 // frequency
        self.interval = interval
        self.symbols = symbolizer or Symbolizer(registry.procfs)
        self._wall = wall
        self._lock = threading.Lock()
        self._maps: Maps | None = None
        self._allowed: dict[int, str] = {}  # pid -> container_id, mirrored in profile_pids
        self._comm: dict[int, str] = {}  # pid -> command name: the root frame of its stacks
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
        self.python = PythonFinder(registry.procfs)
        # allowed pids looked at for an interpreter -> their command name then (an exec the
        # registry reports late still changes it: looked at again)
        self._py_checked: dict[int, str] = {}
        self._py_pids: set[int] = set()  # ... and found to be one: in py_procs
        self._py_names: dict[tuple[int, int], str] = {}  # (pid, code object) -> frame
        self.native = NativeUnwinder(registry.procfs, enabled=native_unwinding)
        self.native_stats = (0, 0, 0, 0, 0)  # bpf/include/unwind.h NATIVE_*

    def attach(self, programs: Programs | None) -> None:
        self._maps = Maps.of(programs) if programs is not None else None
        self.native.attach(self._maps.native if self._maps is not None else None)
        self.sync()

    # ----------------------------------------------------------- pid map ---

    def on_process(self, what: str, proc: Process) -> None:
        """Registry listener: an exec invalidates the pid's symbol caches at once; an exit after
        the next drain (which still has its samples to symbolize)."""
        with self._lock:
            if what == "removed":
                cid = self._allowed.pop(proc.pid, None)
                self._forget_python(proc.pid)
                self.native.untrack(proc.pid)
                if cid is not None:
                    self._set_pid(proc.pid, False)
                    self._exited[proc.pid] = cid
                    self._comm.setdefault(proc.pid, proc.comm)
                else:
                    self.symbols.forget(proc.pid)
                    self._comm.pop(proc.pid, None)
            else:
                self.symbols.forget(proc.pid)
                self._forget_python(proc.pid)
                self._comm[proc.pid] = proc.comm
                if proc.pid in self._allowed:
                    self.native.track(proc.pid)  # an exec: new mappings
                self._sync_one(proc.pid)

    def on_rename(self, old: str, new: str) -> None:
        """Samples from now on go to `new`; those drained already keep the id they were taken
        under (a profile covers its own interval)."""
        with self._lock:
            for table in (self._allowed, self._exited):
                for pid, cid in table.items():
                    if cid == old:
                        table[pid] = new

    def _sync_one(self, pid: int) -> None:
        c = self.registry.container_of(pid)
        ok = c is not None and not self.registry.opted_out(pid, "profiling")
        if c is not None and ok and pid not in self._allowed:
            self._allowed[pid] = c.id
            self._set_pid(pid, True)
            self.native.track(pid)
            p = self.registry.process(pid)
            if p is not None:
                self._comm[pid] = p.comm
        elif not ok and pid in self._allowed:
            del self._allowed[pid]
            self._set_pid(pid, False)
            self._forget_python(pid)
            self.native.untrack(pid)
        p = self.registry.process(pid) if pid in self._allowed else None
        if p is not None and self._py_checked.get(pid) != p.comm and self._maps is not None:
            self._forget_python(pid)
            self._py_checked[pid] = p.comm
            found = self.python.find(pid)
            if found is not None:
                t = self._maps.py_procs
                t.set(t.key(pid), t.leaf(*found.fields()))
                self._py_pids.add(pid)
                log.debug("pid %d: CPython %d.%d, Python frames on", pid, *found.version)

    def _forget_python(self, pid: int) -> None:
        """An exec or exit: look again after an exec; the kernel stops walking it meanwhile."""
        self._py_checked.pop(pid, None)
        if pid in self._py_pids:
            self._py_pids.discard(pid)
            if self._maps is not None:
                self._maps.py_procs.delete(self._maps.py_procs.key(pid))

    def sync(self) -> None:
        """Bring profile_pids in line with the registry (containers become reportable with age)."""
        with self._lock:
            live = set(self.registry.pids())
            for pid in list(self._allowed):
                if pid not in live:
                    del self._allowed[pid]
                    self._set_pid(pid, False)
                    self._forget_python(pid)
                    self.native.untrack(pid)
            for pid in [p for p in self._comm if p not in live and p not in self._exited]:
                del self._comm[pid]
            for pid in live:
                self._sync_one(pid)

    def _set_pid(self, pid: int, on: bool) -> None:
        if self._maps is None:
            return
        t = self._maps.pids
        if on:
            t.set(t.key(pid), t.leaf(1))
        else:
            t.delete(t.key(pid))

    # ------------------------------------------------------------- drain ---

    def drain(self) -> dict[str, Counter[Stack]]:
        """Samples since the last drain, per container, as symbolized stacks (leaf first)."""
        m = self._maps
        if m is None:
            return {}
        cur = m.active.array_get(0) & 1
        m.active.array_set(0, 1 - cur)
        time.sleep(0.005)  # let programs that read the old index finish
        counts_t = m.counts[cur]
        items = [(int(k.pid), int(k.user_stack), int(k.kernel_stack), int(k.py_stack), int(k.native_stack),
                  int(v.value)) for k, v in counts_t.items()]
        counts_t.clear()
        stacks_t = m.stacks
        out: dict[str, Counter[Stack]] = defaultdict(Counter)
        used: set[int] = set()
        with self._lock:
            exited, self._exited = self._exited, {}
        py_used: set[int] = set()
        native_used: set[int] = set()
        for pid, ustack, kstack, pystack, nstack, n in items:
            cid = self._allowed.get(pid) or exited.get(pid)
            if cid is None:
                c = self.registry.container_of(pid)
                if c is None:
                    continue
                cid = c.id
            frames: list[str] = []
            if kstack >= 0:
                frames += [frame(self.symbols.kernel(a)) for a in stacks_t.walk_stack(kstack)]
                used.add(kstack)
            native: list[str] = []
            if ustack >= 0:
                native = [frame(self.symbols.user(pid, a)) for a in stacks_t.walk_stack(ustack)]
                used.add(ustack)
            elif nstack:
                native = self._native_frames(pid, nstack)
                native_used.add(nstack)
            if pystack:
                native = interleave(native, self._python_frames(pid, pystack))
                py_used.add(pystack)
            frames += native
            if not frames:
                frames = [frame("[unknown]")]
            comm = self._comm.get(pid)
            if comm is None:
                p = self.registry.process(pid)
                comm = p.comm if p is not None else ""
            if comm:
                frames.append(frame(comm))  # outermost, as the node agent's profiles have it
            out[cid][tuple(frames)] += n
        # Stack ids still referenced by the other (now active) map must survive.
        other = m.counts[1 - cur].keys()
        keep = {int(k.user_stack) for k in other} | {int(k.kernel_stack) for k in other}
        for sid in used - keep:
            stacks_t.delete_stack(sid)
        py_keep = {int(k.py_stack) for k in other}
        for h in py_used - py_keep:
            m.py_stacks.delete(m.py_stacks.key(h))
        native_keep = {int(k.native_stack) for k in other}
        for h in native_used - native_keep:
            m.native.stacks.delete(m.native.stacks.key(h))
        self.native_stats = tuple(m.native.stats.percpu_sum(i) for i in range(5))  # type: ignore[assignment]
        for pid in exited:
            self.symbols.forget(pid)
            for k in [k for k in self._py_names if k[0] == pid]:
                del self._py_names[k]
            with self._lock:
                if pid not in self._allowed:
                    self._comm.pop(pid, None)
        self.drops = m.dropped.percpu_sum(0)
        return out

    def _native_frames(self, pid: int, stack_hash_: int) -> list[str]:
        """A stack the kernel walked by unwind tables, leaf first; a caller's frame is named by
        the byte before its return address (its call: the return address may be the first byte
        of the next function after a call that does not return)."""
        assert self._maps is not None
        st = self._maps.native.stacks.get(self._maps.native.stacks.key(stack_hash_))
        if st is None:
            return [frame("[unknown]")]
        pcs = [int(st.pc[i]) for i in range(min(int(st.depth), len(st.pc)))]
        out = [frame(self.symbols.user(pid, pc if i == 0 else pc - 1)) for i, pc in enumerate(pcs)]
        if st.truncated:
            out.append(frame("[truncated stack]"))
        return out

    def _python_frames(self, pid: int, stack_hash_: int) -> list[str]:
        """A Python stack's frames, leaf first; a code object the kernel could not name (its
        symbol evicted, a str it cannot read) is "[unknown python]"."""
        assert self._maps is not None
        st = self._maps.py_stacks.get(self._maps.py_stacks.key(stack_hash_))
        if st is None:
            return []
        out = []
        for i in range(min(int(st.depth), len(st.code))):
            code = int(st.code[i])
            if not code:
                continue
            name = self._py_names.get((pid, code))
            if name is None:
                sym = self._maps.py_symbols.get(self._maps.py_symbols.key(pid, 0, code))
                if sym is None:
                    out.append(frame("[unknown python]"))
                    continue
                fn = decode_str(bytes(sym.name), int(sym.name_state))
                file = decode_str(bytes(sym.file), int(sym.file_state)) or ""
                name = python_frame(fn or "[unknown python]", file, int(sym.line))
                if len(self._py_names) >= 100_000:
                    self._py_names.clear()
                self._py_names[(pid, code)] = name
            out.append(name)
        if st.truncated:
            out.append(frame("[truncated python stack]"))
        return out

    # -------------------------------------------------------------- write ---

    def flush(self) -> int:
        """Drain and write one profile per container; returns samples written."""
        now_ns = int(self._wall() * 1e9)
        start_ns, self._last_flush_ns = self._last_flush_ns, now_ns
        self.gather()
        profiles, self._pending = self._pending, defaultdict(Counter)
        if self.sink is None:
            return 0
        n = 0
        for cid, stacks in profiles.items():
            service = service_name(cid)
            for frames, count in stacks.items():
                h = stack_hash(frames)
                self.sink.add("profiling_stacks", schema.row("profiling_stacks", {
                    "ServiceName": service, "Hash": h, "LastSeen": now_ns, "Stack": list(frames)}))
                self.sink.add("profiling_samples", schema.row("profiling_samples", {
                    "ServiceName": service, "Type": PROFILE_TYPE, "Start": start_ns, "End": now_ns,
                    "Labels": {"container.id": cid, **self.host_labels}, "StackHash": h,
                    "Value": count * self.period_ns}))
                n += count
        self.samples_written += n
        return n

    def gather(self) -> None:
        """Drain the kernel's counts into the pending profile (often, so that short-lived
        processes are symbolized while their memory maps can still be read)."""
        for cid, stacks in self.drain().items():
            self._pending[cid].update(stacks)

    def self_metrics(self, f: Families) -> None:
        f.counter("coroot_agent_profiler_samples_total", "CPU samples written to the store", self.samples_written)
        f.counter("coroot_agent_profiler_dropped_samples_total", "samples not counted: the kernel's count map was full", self.drops)
        for cache, n in self.symbols.sizes.items():
            f.gauge("coroot_agent_profiler_symbol_cache_entries", "entries in the symbolizer's caches", n, cache=cache)
        nat = self.native
        for what, n in nat.sizes().items():
            f.gauge("coroot_agent_profiler_unwind_tables", "unwind tables: built (user space) and loaded (kernel)", n, what=what)
        f.counter("coroot_agent_profiler_unwind_tables_built_total", "files whose unwind table was built", nat.built)
        f.counter("coroot_agent_profiler_unwind_build_seconds_total", "time spent building unwind tables", nat.build_seconds)
        f.counter("coroot_agent_profiler_unwind_cfi_bytes_total", "bytes of .eh_frame/.debug_frame read to build them", nat.cfi_bytes)
        for what, n in sorted(nat.dropped.items()):
            f.counter("coroot_agent_profiler_unwind_dropped_total", "files or mappings left without a table (no CFI, "
                      "over a cap, evicted)", n, what=what)
        for i, what in enumerate(("table", "frame_pointer")):
            f.counter("coroot_agent_profiler_native_frames_total", "user frames the kernel stepped, by how", self.native_stats[i], by=what)
        f.counter("coroot_agent_profiler_native_stacks_total", "user stacks walked by unwind tables", self.native_stats[2])
        f.counter("coroot_agent_profiler_native_tail_call_failures_total", "native walks cut short: a tail call failed", self.native_stats[3])
        f.counter("coroot_agent_profiler_native_cached_frames_total", "user frames whose rule the kernel's per-CPU cache "
                  "had (no search)", self.native_stats[4])

    def start(self) -> None:
        self.native.start()
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
                    self.gather()
            except Exception:  # noqa: BLE001 - keep profiling
                log.exception("profiler")

    def close(self) -> None:
        """Stop the thread, write the last profile, and leave the kernel's maps alone after."""
        self._stop.set()
        self.native.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            log.exception("profiler: last flush")
        self._maps = None
