"""Unwind tables of the profiled processes' executable files, kept in the kernel's maps for
bpf/profiler.c's native walk (bpf/include/unwind.h).

The profiler tells it which processes may be sampled (`track`, `untrack`); its own thread does
the rest, off the profiler's thread:

- reads the process's executable file mappings (again 2 s, 6 s and 20 s after it was first
  seen, for libraries loaded late, then every `rescan` seconds), builds each file's table once
  per (device, inode) (agent/profiling/unwind.py) and keeps the built tables in an LRU bounded
  by `max_tables` files and `max_table_bytes` bytes (a dropped one is built again when needed;
  each drop counted);
- loads each file's rows into `unwind_rows` once, at a range it allocates there (first fit),
  shared by every process that maps the file; a file no process maps stays loaded until its
  room is needed; a file that does not fit is left out (counted), and its processes fall back
  to frame pointers in its code;
- writes each process's mappings (start, end, load bias, the file's rows) to `unwind_maps` and
  their number to `unwind_procs`, which the kernel tests to walk the process at all, with a new
  generation each time (never reused): the kernel's per-CPU cache of the rules it found is keyed
  by (pid, generation, address), so no entry of an exec'd or remapped process is used again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.ebpf.maps import BpfMap
from agent.logs import safeopen
from agent.profiling.symbols import Mapping, read_maps
from agent.profiling.unwind import ROW, TableError, UnwindTable, build

log = logging.getLogger(__name__)

KERNEL_ROWS = 1 << 20  # bpf/include/unwind.h CA_UNWIND_ROWS
KERNEL_MAPS = 64  # CA_UNWIND_MAPS
RESCAN_AFTER = (2.0, 6.0, 20.0)  # seconds after a process is first seen


@dataclass(frozen=True)
class NativeMaps:
    rows: BpfMap  # index -> row
    procs: BpfMap  # pid -> (number of mappings, generation)
    maps: BpfMap  # (pid, index) -> mapping
    stacks: BpfMap  # hash -> native stack
    stats: BpfMap  # per-CPU counters (bpf/include/unwind.h NATIVE_*)


class RowSpace:
    """First-fit allocation of `size` rows in [0, capacity)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)]  # (start, size), sorted, never adjacent

    def alloc(self, n: int) -> int | None:
        for i, (start, size) in enumerate(self.free):
            if size >= n:
                if size == n:
                    del self.free[i]
                else:
                    self.free[i] = (start + n, size - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        import bisect

        i = bisect.bisect_left(self.free, (start, n))
        self.free.insert(i, (start, n))
        # merge with the neighbours
        if i + 1 < len(self.free) and start + n == self.free[i + 1][0]:
            self.free[i] = (start, n + self.free[i + 1][1])
            del self.free[i + 1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == self.free[i][0]:
            self.free[i - 1] = (self.free[i - 1][0], self.free[i - 1][1] + self.free[i][1])
            del self.free[i]

    @property
    def used(self) -> int:
        return self.capacity - sum(size for _, size in self.free)


FileKey = tuple[str, int]  # (device "maj:min" as in /proc/PID/maps, inode)


@dataclass
class Loaded:
    start: int
    count: int
    users: set[int] = field(default_factory=set)


@dataclass
class Tracked:
    seen: float
    scans: int = 0
    next_scan: float = 0.0
    files: set[FileKey] = field(default_factory=set)
    written: tuple[tuple[int, int, int, int, int], ...] = ()  # what unwind_maps has for it
    layout: tuple[tuple[int, int, int], ...] = ()  # (start, end, inode) last read


class NativeUnwinder:
    def __init__(self, procfs: str = "/proc", kernel_rows: int = KERNEL_ROWS, max_tables: int = 64,
                 max_table_bytes: int = 64 << 20, rescan: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True) -> None:
        """`enabled` False (--enable-native-unwinding not given): no table is built, and the
        kernel walks every native stack by frame pointers."""
        self.enabled = enabled
        self.procfs = procfs
        self.rescan = rescan
        self.max_tables = max_tables
        self.max_table_bytes = max_table_bytes
        self._clock = clock
        self._maps: NativeMaps | None = None
        self.space = RowSpace(kernel_rows)
        self._tables: OrderedDict[FileKey, UnwindTable | None] = OrderedDict()  # None: it has none
        self._table_bytes = 0
        self._loaded: OrderedDict[FileKey, Loaded] = OrderedDict()  # in unwind_rows, LRU first
        self._tracked: dict[int, Tracked] = {}
        self._pending: dict[int, bool] = {}  # pid -> track (True) or untrack (False); under _lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped: Counter[str] = Counter()
        self.built = 0
        self.build_seconds = 0.0
        self.cfi_bytes = 0
        self._generation = 0  # of the last write of a process's mappings

    def attach(self, maps: NativeMaps | None) -> None:
        self._maps = maps

    # --------------------------------------------------- the profiler's side --

    def track(self, pid: int) -> None:
        """`pid` may be sampled (or exec'd: its mappings are new)."""
        if not self.enabled:
            return
        with self._lock:
            self._pending[pid] = True
        self._wake.set()

    def untrack(self, pid: int) -> None:
        with self._lock:
            self._pending[pid] = False
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="unwind-tables", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------- its own thread --

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self.step()
            except Exception:  # noqa: BLE001 - keep unwinding
                log.exception("unwind tables")

    def step(self) -> None:
        """Apply what the profiler asked, then rescan the processes due."""
        with self._lock:
            pending, self._pending = self._pending, {}
        now = self._clock()
        for pid, on in pending.items():
            if self._stop.is_set():
                return
            if on:
                t = self._tracked.get(pid)
                if t is None:
                    t = self._tracked[pid] = Tracked(seen=now)
                t.layout = ()  # exec'd or new: read again
                t.scans = 0
                self._scan(pid, t)
            else:
                self._forget(pid)
        for pid, t in list(self._tracked.items()):
            if self._stop.is_set():
                return
            if now >= t.next_scan:
                self._scan(pid, t)

    def _scan(self, pid: int, t: Tracked) -> None:
        t.scans += 1
        now = self._clock()
        t.next_scan = t.seen + RESCAN_AFTER[t.scans - 1] if t.scans <= len(RESCAN_AFTER) else now + self.rescan
        maps = [m for m in read_maps(self.procfs, pid) if m.path.startswith("/") and m.inode]
        if not maps:
            return  # gone (its exit untracks it) or nothing to unwind
        layout = tuple((m.start, m.end, m.inode) for m in maps)
        if layout == t.layout:
            return
        t.layout = layout
        entries: list[tuple[int, int, int, int, int]] = []
        files: set[FileKey] = set()
        for m in maps[:KERNEL_MAPS]:
            key = (m.dev, m.inode)
            table = self._table(pid, m, key)
            if table is None:
                continue
            bias = table.bias(m.start, m.offset)
            loaded = self._load(key, table)
            if bias is None or loaded is None:
                continue
            loaded.users.add(pid)
            files.add(key)
            entries.append((m.start, m.end, bias, loaded.start, loaded.count))
        if len(maps) > KERNEL_MAPS:
            self.dropped["mappings"] += len(maps) - KERNEL_MAPS
        for key in t.files - files:
            self._release(key, pid)
        t.files = files
        self._write(pid, t, tuple(entries))

    def _table(self, pid: int, m: Mapping, key: FileKey) -> UnwindTable | None:
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        try:  # the path is the traced process's: resolved inside its root, the mapped file only
            fd = safeopen.open_mapped(self.procfs, pid, m.path, m.dev, m.inode)
        except OSError as e:
            log.debug("pid %d: %s not read: %s", pid, m.path, e)
            self.dropped["not_opened"] += 1
            return None  # not remembered: another process mapping the file may open it
        try:
            table: UnwindTable | None = build(f"/proc/self/fd/{fd}")
        except TableError as e:
            log.debug("no unwind table: %s", e)
            self.dropped["no_table" if "rows, more than" not in str(e) else "rows"] += 1
            table = None
        finally:
            os.close(fd)
        if table is not None:
            self.built += 1
            self.build_seconds += table.build_seconds
            self.cfi_bytes += table.cfi_bytes
            self._table_bytes += len(table.rows)
        self._tables[key] = table
        while len(self._tables) > self.max_tables or self._table_bytes > self.max_table_bytes:
            _, old = self._tables.popitem(last=False)
            if old is not None:
                self._table_bytes -= len(old.rows)
            self.dropped["table_evicted"] += 1
        return table

    def _load(self, key: FileKey, table: UnwindTable) -> Loaded | None:
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            return loaded
        n = len(table)
        start = self.space.alloc(n)
        while start is None:
            # make room: the least recently loaded file no process maps
            idle = next((k for k, v in self._loaded.items() if not v.users), None)
            if idle is None:
                self.dropped["rows_full"] += 1
                return None
            old = self._loaded.pop(idle)
            self.space.release(old.start, old.count)
            start = self.space.alloc(n)
        if self._maps is not None and not self._maps.rows.array_write(start, table.rows):
            self.space.release(start, n)
            self.dropped["rows_write"] += 1
            return None
        loaded = self._loaded[key] = Loaded(start, n)
        return loaded

    def _write(self, pid: int, t: Tracked, entries: tuple[tuple[int, int, int, int, int], ...]) -> None:
        if entries == t.written or self._maps is None:
            t.written = entries
            return
        m = self._maps
        # A new layout (an exec, a library loaded) replaces the old one whole: the count goes
        # first, so that no sample walks a mix of the two (the binary's new mapping found, then
        # the old libc's, at another address: such stacks ended in the first library frame);
        # meanwhile the kernel walks the process by frame pointers. Then the entries, the count.
        if t.written:
            m.procs.delete(m.procs.key(pid))
        for i, (start, end, bias, rows_start, rows_count) in enumerate(entries):
            m.maps.set(m.maps.key(pid, i), m.maps.leaf(start, end, bias & (2**64 - 1), rows_start, rows_count))
        for i in range(len(entries), len(t.written)):
            m.maps.delete(m.maps.key(pid, i))
        if entries:
            self._generation = self._generation % 0xFFFFFFFF + 1  # never 0; 2^32 writes before a reuse
            m.procs.set(m.procs.key(pid), m.procs.leaf(len(entries), self._generation))
        else:
            m.procs.delete(m.procs.key(pid))
        t.written = entries

    def _release(self, key: FileKey, pid: int) -> None:
        loaded = self._loaded.get(key)
        if loaded is not None:
            loaded.users.discard(pid)

    def _forget(self, pid: int) -> None:
        t = self._tracked.pop(pid, None)
        if t is None:
            return
        if self._maps is not None:
            self._maps.procs.delete(self._maps.procs.key(pid))
            for i in range(len(t.written)):
                self._maps.maps.delete(self._maps.maps.key(pid, i))
        for key in t.files:
            self._release(key, pid)

    # ------------------------------------------------------------ metrics --

    @property
    def tracked(self) -> int:
        return len(self._tracked)

    def sizes(self) -> dict[str, int]:
        loaded = list(self._loaded.values())
        return {
            "tables": sum(1 for t in list(self._tables.values()) if t is not None),
            "table_bytes": self._table_bytes,
            "loaded_files": len(loaded),
            "kernel_rows": self.space.used,
            "kernel_row_bytes": self.space.used * ROW.size,
            "kernel_rows_capacity": self.space.capacity,
            "processes": len(self._tracked),
        }
