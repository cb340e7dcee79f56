"""Why stopping takes the time it takes: what the kernel does when probes are detached, and what
the cheaper-to-detach alternative would cost every process on the node.

Loads bench/probes/detach.c two ways, with empty programs: 26 perf-event syscall tracepoints
(enter and exit of the 13 syscalls the agent hooks: its way) and the two raw_syscalls
tracepoints with a switch on the syscall number. For each: the time to detach them one after
the other and from one thread each, and the added cost of an untraced syscall (getppid in a
loop) while they are attached. Prints; asserts nothing. Run as root: `python bench/detach.py`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bcc import BPF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.ebpf import headers  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "probes" / "detach.c"
CALLS = 1_000_000


def syscall_ns() -> float:
    """ns per getppid() through ctypes, best of three loops."""
    getppid = ctypes.CDLL(None).getppid
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for _ in range(CALLS):
            getppid()
        best = min(best, (time.perf_counter_ns() - t0) / CALLS)
    return best


def load(kind: str) -> BPF:
    return BPF(src_file=str(SOURCE).encode(), cflags=[f"-DPROBES_{kind}"])


def detach_all(b: BPF, threads: int) -> float:
    jobs = [lambda k=k: b.detach_tracepoint(k) for k in list(b.tracepoint_fds)]
    jobs += [lambda k=k: b.detach_raw_tracepoint(k) for k in list(b.raw_tracepoint_fds)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max(1, threads)) as ex:
        list(ex.map(lambda j: j(), jobs))
    return time.monotonic() - t0


def main() -> None:
    src = headers.resolve()
    for k, v in src.env:
        os.environ[k] = v
    base = syscall_ns()
    print(f"untraced syscall (getppid via ctypes): {base:.0f} ns with nothing attached")
    for kind in ("TRACEPOINTS", "RAW"):
        b = load(kind)
        n = len(b.tracepoint_fds) + len(b.raw_tracepoint_fds)
        extra = syscall_ns() - base
        serial = detach_all(b, 1)
        b.cleanup()
        b = load(kind)
        parallel = detach_all(b, n)
        b.cleanup()
        print(f"{kind.lower():12s} {n:2d} probes: +{extra:4.0f} ns per untraced syscall; detach "
              f"{serial:.3f} s one by one, {parallel:.3f} s from {n} threads")


if __name__ == "__main__":
    main()
