"""CPU and disk delay through the running agent (taskstats over netlink, as the node agent reads
them): two processes that really wait for one CPU and one that really waits for the disk, in
test cgroups; the agent's counters are compared with the kernel's own per-process fields for
the same waits (/proc/PID/schedstat run-queue time, /proc/PID/stat delayacct_blkio_ticks),
and with the wait the test induced. The processes are stopped (SIGSTOP) once they have waited,
so their totals no longer move while the agent's reading catches up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.system.helpers import AgentProcess, TestCgroups, wait_for

# Delays need no probe: the module's agent runs without the costly families, to start sooner.
pytestmark = pytest.mark.agent_args("--scrape-interval", "1s", "--disable-l7-tracing", "--disable-profiling",
                                    "--disable-log-parsing", "--disable-log-entries", "--disable-pinger")

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU = "container_resources_cpu_delay_seconds_total"
DISK = "container_resources_disk_delay_seconds_total"


def run_delay(pid: int) -> float:
    """Seconds the process was runnable but not running (the kernel's sched_info.run_delay,
    which taskstats reports as cpu_delay_total)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def stopped(pid: int) -> bool:
    return stat_fields(pid)[0] == b"T"


def test_cpu_delay_of_two_processes_sharing_one_cpu(agent: AgentProcess, cgroups: TestCgroups) -> None:
    cid = cgroups.create("delay-cpu")
    cpu = max(os.sched_getaffinity(0))
    t0 = time.monotonic()
    procs = [cgroups.spawn(cid, ["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
             for _ in range(2)]
    try:
        time.sleep(2.0)
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        lived = time.monotonic() - t0
        assert wait_for(lambda: all(stopped(p.pid) for p in procs), 5)
        kernel = sum(run_delay(p.pid) for p in procs)
        ran = sum((int(stat_fields(p.pid)[11]) + int(stat_fields(p.pid)[12])) / CLK_TCK for p in procs)
        # Each was runnable from its start to its stop: what of that it did not run, it waited.
        induced = 2 * lived - ran
        assert induced >= 1.5, f"the processes did not contend: {induced:.2f}s waited"
        assert abs(kernel - induced) <= 0.2 * induced, (kernel, induced)
        got: list[float | None] = [None]

        def caught_up() -> bool:
            got[0] = agent.value(CPU, container_id=cid)
            return got[0] is not None and abs(got[0] - kernel) <= 0.005 * kernel
        assert wait_for(caught_up, 20), f"agent {got[0]}, kernel {kernel:.3f}s, induced {induced:.3f}s"
        assert agent.value(DISK, container_id=cid) is not None
        print(f"cpu delay: agent {got[0]:.3f}s, kernel {kernel:.3f}s, induced {induced:.3f}s")
    finally:
        for p in procs:
            p.kill()
            p.wait()


READER = r"""
import mmap, os, random, signal, sys

def blkio_ticks():
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[39])

path, want = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
blocks = os.fstat(fd).st_size // 4096
rand = random.Random(7)
rounds = 0
# Direct reads (no page cache) until the kernel has counted `want` ticks of waiting for them,
# at most 2,000 rounds of 500.
while blkio_ticks() < want and rounds < 2000:
    for b in rand.choices(range(blocks), k=500):
        os.preadv(fd, [buf], b * 4096)
    rounds += 1
os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.fixture
def delayacct() -> Iterator[None]:
    """Block I/O delay is recorded only with kernel.task_delayacct=1 (off by default since
    5.14): on for the test, then back to what it was."""
    path = "/proc/sys/kernel/task_delayacct"
    with open(path) as f:
        before = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    yield
    with open(path, "w") as f:
        f.write(before)


def test_disk_delay_of_a_process_waiting_for_direct_reads(
        agent: AgentProcess, cgroups: TestCgroups, delayacct: None) -> None:
    d = tempfile.mkdtemp(prefix="ca-delay-", dir="/var/tmp")
    p = None
    try:
        data = os.path.join(d, "data")
        with open(data, "wb") as f:
            for _ in range(32):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        cid = cgroups.create("delay-disk")
        want = int(0.3 * CLK_TCK)
        p = cgroups.spawn(cid, [sys.executable, "-c", READER, data, str(want)], stdout=subprocess.PIPE)
        assert wait_for(lambda: stopped(p.pid), 45), "the reader did not finish"
        kernel = int(stat_fields(p.pid)[39]) / CLK_TCK
        assert kernel >= 0.3, f"the reads hardly waited ({kernel:.3f}s)"
        got: list[float | None] = [None]

        def caught_up() -> bool:
            got[0] = agent.value(DISK, container_id=cid)
            # The kernel's field is the same total in clock ticks.
            return got[0] is not None and abs(got[0] - kernel) <= 1.0 / CLK_TCK
        assert wait_for(caught_up, 20), f"agent {got[0]}, kernel {kernel:.3f}s"
        print(f"disk delay: agent {got[0]:.3f}s, kernel {kernel:.3f}s")
    finally:
        if p is not None:
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)
