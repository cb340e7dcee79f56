"""The BPF loader on the real kernel: both event buffer kinds deliver, nothing is lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent.containers.registry import EVENT_EXEC, EVENT_EXIT, EVENT_FORK, PROC_EVENT
from agent.ebpf import headers, loader, tracefs


@pytest.mark.parametrize("ringbuf", [True, False], ids=["ring-buffer", "perf-buffer"])
def test_process_events_arrive_through_either_buffer(ringbuf: bool) -> None:
    assert tracefs.ensure_mounted().ok
    events: list[tuple[int, int, int]] = []
    loaded = loader.load(["proc"], {"proc_events": lambda raw: events.append(PROC_EVENT.unpack_from(raw)[:3])},
                         headers.resolve(), ringbuf=ringbuf)
    try:
        assert loaded.ringbuf is ringbuf
        assert loaded.tracepoints == ["oom:mark_victim", "sched:sched_process_exec", "sched:sched_process_exit",
                                      "task:task_newtask"]
        p = subprocess.Popen(["/bin/true"])
        p.wait()
        deadline = time.monotonic() + 3
        mine: list[int] = []
        while time.monotonic() < deadline and len(mine) < 3:
            loaded.poll(100)
            mine = [kind for kind, pid, _ in events if pid == p.pid]
        if ringbuf:
            assert mine == [EVENT_FORK, EVENT_EXEC, EVENT_EXIT]  # one buffer: kernel order
        else:
            # per-CPU perf buffers: the fork (on the parent's CPU) may be read after the exec and
            # exit (on the child's); the registry re-reads /proc, so order does not matter there
            assert sorted(mine) == [EVENT_FORK, EVENT_EXEC, EVENT_EXIT]
        fork = next(e for e in events if e[1] == p.pid and e[0] == EVENT_FORK)
        assert fork[2] > 0  # the parent's pid (a thread of this test process)
        assert loaded.lost() == {"proc_events": 0}
    finally:
        loaded.close()


def test_uprobes_carry_no_usdt_reference_counter(tmp_path: Path) -> None:
    """BCC 0.26's Python binding calls bpf_attach_uprobe with six of its seven arguments, so the
    uprobe's USDT reference-counter offset is whatever the stack holds (seen: 6): the kernel then
    writes a counter into that offset of every process mapping the file, refuses any other
    tracer's uprobe at the same place ("ref_ctr_offset mismatch", EINVAL) and, when it cannot
    decrement the counter, leaks the uprobe until reboot. The loader attaches with offset 0:
    after it, a plain uprobe (no counter) at the very same place of the same file is enabled."""
    assert tracefs.ensure_mounted().ok
    libc = next(p for p in ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6")
                if os.path.exists(p))
    lib = tmp_path / "libc.so.6"
    shutil.copy(libc, lib)  # a file (inode) of its own: no other tracer has uprobes on it
    loaded = loader.load(["python"], {}, headers.resolve())
    events_dir = tracefs.tracefs_events_dir()
    assert events_dir is not None
    events = Path(events_dir).parent
    name = f"ca_refctr_{os.getpid()}"
    defined = False
    try:
        loaded.attach_uprobe(str(lib), "pthread_cond_timedwait", "python_cond_wait_enter")
        ours = list(loaded.bpf.uprobe_fds)
        assert len(ours) == 1, ours
        offset = int(ours[0].rsplit(b"_0x", 1)[1], 16)  # BCC's event name ends with the file offset
        _append(events / "uprobe_events", f"p:uprobes/{name} {lib}:{offset:#x}\n")
        defined = True
        enable = events / "events" / "uprobes" / name / "enable"
        enable.write_text("1\n")  # EINVAL here: our uprobe carries a reference counter
        assert enable.read_text().strip() == "1"
        enable.write_text("0\n")
    finally:
        if defined:
            _append(events / "uprobe_events", f"-:uprobes/{name}\n")
        loaded.close()
    assert f"{lib}:" not in (events / "uprobe_events").read_text()


def _append(path: Path, line: str) -> None:
    """Write to a tracefs control file (Python's append mode seeks, which tracefs refuses)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
