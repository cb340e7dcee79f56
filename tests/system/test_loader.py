"""The BPF loader on the real kernel: both event buffer kinds deliver, nothing is lost."""

from __future__ import annotations

import subprocess
import time

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
