"""The agent's resident memory, by part, and the code pages that start-up touched given back.

Most of the agent's RSS right after start is not memory it keeps using: it is the pages of
shared libraries that start-up read once. Compiling the BPF programs runs LLVM and clang
(~80 MB of their code pages stay mapped after the compile), and opening the embedded store
runs the engine's static initialisers across its 550 MB library (~170 MB of pages). These are
clean file pages: the kernel can drop them at any time and read them again from the file if
they are touched. `page_out` asks it to do so now (`MADV_PAGEOUT`, Linux 5.4+): a hint that
loses no data, also for private pages a library wrote (relocations), which it leaves alone
unless there is swap. The pages the agent does use come back on their first touch, so RSS
after that is what the agent needs.

`MemoryMetrics` reports RSS split by what the mapping holds (`coroot_agent_memory_bytes`),
read from the agent's own /proc/self/smaps (not the host's procfs root) on the poll thread every `interval` seconds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Iterable

from agent.component import Component
from agent.metrics import Families

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21
PAGE = os.sysconf("SC_PAGE_SIZE")

# Mapping file names -> part. The first part whose marker is in the file's base name wins.
ENGINE_FILES = ("_chdb", "libchdb")
COMPILER_FILES = ("libLLVM", "libclang", "libbcc")
PARTS = ("engine_code", "compiler_code", "bpf_maps", "other_files", "anonymous")


def part_of(name: str) -> str:
    """The part a mapping's path (or pseudo-name from smaps) belongs to."""
    if not name or name.startswith("[") or name == "/dev/zero (deleted)" or name.startswith("/memfd:"):
        return "anonymous"  # [heap], [stack], [anon:…], unnamed mappings
    if name.startswith("anon_inode:"):
        return "bpf_maps" if "bpf" in name else "anonymous"
    base = os.path.basename(name)
    if any(m in base for m in ENGINE_FILES):
        return "engine_code"
    if any(m in base for m in COMPILER_FILES):
        return "compiler_code"
    return "other_files"


def rss_parts(smaps: Iterable[str]) -> dict[str, int]:
    """Resident bytes by part from the lines of a /proc/PID/smaps."""
    out = dict.fromkeys(PARTS, 0)
    part = "anonymous"
    for line in smaps:
        head, _, rest = line.partition(" ")
        if head == "Rss:":
            out[part] += int(rest.split()[0]) * 1024
        elif "-" in head and not head.endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
            fields = line.split(None, 5)
            part = part_of(fields[5].strip() if len(fields) > 5 else "")
    return out


def read_parts(pid: int | str = "self") -> dict[str, int]:
    with open(f"/proc/{pid}/smaps") as f:
        return rss_parts(f)


def page_out(markers: Iterable[str] | None) -> int:
    """Ask the kernel to reclaim the resident pages of this process's file mappings whose base
    name contains one of `markers` (None: every file mapping). Returns the bytes of RSS this
    gave back (0 where the kernel has no MADV_PAGEOUT)."""
    marks = tuple(markers) if markers is not None else ("",)
    ranges: list[tuple[int, int]] = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            if any(m in os.path.basename(fields[5].strip()) for m in marks):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    if not ranges:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    before = _rss()
    for lo, hi in ranges:
        if madvise(lo, hi - lo, MADV_PAGEOUT) != 0:
            err = ctypes.get_errno()
            log.debug("madvise(MADV_PAGEOUT) on %x-%x: %s", lo, hi, os.strerror(err))
            if err == 22:  # EINVAL: a kernel before 5.4
                return 0
    return max(0, before - _rss())


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> bool:
    """glibc's allocator, set for a long-running process with a few busy threads: at most two
    arenas (one per thread by default, each keeping what it freed), large blocks (an insert's
    buffers) always from mmap and so returned at free (the threshold otherwise grows to the
    largest block freed so far, up to 32 MB, and later ones stay in the heap), and free memory
    at the top of the heap returned beyond 1 MB. False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_ARENA_MAX, 2) == 1
    ok &= mallopt(M_MMAP_THRESHOLD, 256 << 10) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 20) == 1
    return bool(ok)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class MemoryMetrics(Component):
    """coroot_agent_memory_bytes{part}: the agent's RSS by what it holds, refreshed on the poll
    thread (reading smaps takes a few milliseconds), read by scrapes."""

    name = "memory"

    def __init__(self, interval: float = 15.0, engine_resident: Callable[[], int | None] | None = None) -> None:
        self.interval = interval
        self.engine_resident = engine_resident
        self._parts: dict[str, int] = {}
        self._at = 0.0
        self.paged_out = 0

    def start(self) -> None:
        # Everything that compiles or initialises has run: the start-up pages of every file
        # mapped (LLVM's, the engine's, pyarrow's, ...) go back to the kernel before the first
        # reading; what is used comes back.
        t = time.monotonic()
        self.paged_out = page_out(None)
        log.info("memory: %d MB of start-up code pages given back in %.2fs", self.paged_out >> 20,
                 time.monotonic() - t)
        self._refresh(time.monotonic())

    def tick(self, now: float, gone: list[str]) -> None:
        if now - self._at >= self.interval:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        self._at = now
        try:
            parts = read_parts()
        except OSError as e:
            log.debug("smaps: %s", e)
            return
        engine = self.engine_resident() if self.engine_resident is not None else None
        if engine is not None:  # the engine's heap, out of the anonymous memory
            parts["engine_heap"] = min(engine, parts["anonymous"])
            parts["anonymous"] -= parts["engine_heap"]
        self._parts = parts

    def self_metrics(self, f: Families) -> None:
        for part, value in self._parts.items():
            f.gauge("coroot_agent_memory_bytes", "resident memory of the agent by part: the store engine's "
                    "and the BPF compiler's code pages, BPF maps mapped into the agent, other files' pages, "
                    "the embedded engine's heap (its allocator's resident bytes), and the other anonymous "
                    "memory (Python's objects, BCC's and the C libraries' allocations)", value, part=part)
        f.gauge("coroot_agent_memory_paged_out_bytes", "start-up code pages given back to the kernel at start",
                self.paged_out)
