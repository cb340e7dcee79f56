"""Python GIL wait, end to end: the agent as a real process with its uprobes on the host's C
library, Debian's python3 running tests/system/workloads/gil.py in test cgroups. Two threads
spin for 5 s, contending for the GIL the whole time; the program measures its own wait with
tests/system/workloads/condwait_timer.c preloaded (its clock around every call of the
function where CPython waits for the GIL, compiled here by gcc), and the agent's
container_python_thread_lock_wait_time_seconds must be within 25% of that. The program's
second measure, the time its threads slept (from their run and run-queue times), is printed
as a cross-check. One thread alone waits for nothing, and the agent reports ~0 for it. The
workload starts spinning only once the agent follows the process (its series is there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.helpers import REPO, AgentFactory, AgentProcess, TestCgroups, wait_for

pytestmark = [pytest.mark.agent_args("--enable-python-gil-monitoring"),  # off by default
              pytest.mark.agent_without("profiling", "l7")]

METRIC = "container_python_thread_lock_wait_time_seconds"
SECONDS = 5.0
TIMER_SRC = REPO / "tests" / "system" / "workloads" / "condwait_timer.c"


@pytest.fixture(scope="module")
def timer() -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="coroot-agent-gil-"))
    try:
        lib = d / "condwait_timer.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(TIMER_SRC), "-ldl"], check=True,
                       timeout=60)
        yield str(lib)
    finally:
        shutil.rmtree(d, ignore_errors=True)


class GilWorkload:
    def __init__(self, cgroups: TestCgroups, cid: str, threads: int, timer: str | None = None) -> None:
        env = {**os.environ, "LD_PRELOAD": timer} if timer else None
        self.p = cgroups.spawn(cid, ["/usr/bin/python3", "-m", "tests.system.workloads.gil", str(threads),
                                     str(SECONDS)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=REPO)
        assert self.p.stdout is not None
        self.ready = json.loads(self.p.stdout.readline())

    def run(self) -> dict:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"the workload exited with {self.p.wait()}"
        return json.loads(line)

    def close(self) -> None:
        if self.p.poll() is None:
            assert self.p.stdin is not None
            self.p.stdin.close()
            self.p.wait(10)


def agent_value(agent: AgentProcess, cid: str) -> float | None:
    return agent.value(METRIC, container_id=cid)


def measure(agent: AgentProcess, cgroups: TestCgroups, threads: int, timer: str) -> tuple[float, dict]:
    cid = cgroups.create("gil")
    w = GilWorkload(cgroups, cid, threads, timer)
    try:
        followed = wait_for(lambda: agent_value(agent, cid) is not None, 30, interval=0.2)
        assert followed, f"the agent does not follow pid {w.ready['pid']}:\n{agent.log()[-3000:]}"
        assert agent_value(agent, cid) == 0.0
        done = w.run()
        # the last waits end with the threads; a scrape after that sees them all
        got = wait_for(lambda: (v := agent_value(agent, cid)) is not None and v, 5, interval=0.2)
        print(f"GIL wait, {threads} thread(s) for {SECONDS:g} s: agent {got:.3f} s; the program: "
              f"{done['condwait']:.3f} s in {done['condwait_calls']} timed waits, {done['slept']:.3f} s asleep")
        return float(got or 0.0), done
    finally:
        w.close()


def test_two_threads_contending_for_5s_wait_as_long_as_the_program_measures(
        agent: AgentProcess, cgroups: TestCgroups, timer: str) -> None:
    got, done = measure(agent, cgroups, 2, timer)
    want = done["condwait"]
    assert want is not None, "the timer library was not loaded"
    assert want > 1.0, done  # two spinning threads: each waits while the other holds the GIL
    assert want * 0.75 <= got <= want * 1.25, (got, done)


def test_a_single_thread_waits_for_nothing(agent: AgentProcess, cgroups: TestCgroups, timer: str) -> None:
    got, done = measure(agent, cgroups, 1, timer)
    # ~0: what remains is the main thread handing the GIL to the new one as it starts
    assert got < 0.2 and done["condwait"] < 0.2, (got, done)
    assert abs(got - done["condwait"]) <= 0.01 + 0.25 * done["condwait"], (got, done)


def test_an_exited_process_keeps_its_wait_in_the_containers_total(agent: AgentProcess, cgroups: TestCgroups) -> None:
    cid = cgroups.create("gil-exit")
    w = GilWorkload(cgroups, cid, 2)
    try:
        assert wait_for(lambda: agent_value(agent, cid) is not None, 30, interval=0.2)
        w.run()
        before = wait_for(lambda: agent_value(agent, cid), 5, interval=0.2)
        assert before and before > 0.5
    finally:
        w.close()
    pid = w.ready["pid"]
    assert wait_for(lambda: not agent.processes(pid), 40, interval=0.5), "the agent still lists the process"
    after = agent_value(agent, cid)
    assert after == pytest.approx(before, rel=0.02), (before, after)


def test_without_enable_python_gil_monitoring_no_probe_is_loaded(agent_factory: AgentFactory, cgroups: TestCgroups) -> None:
    a = agent_factory("--disable-l7-tracing", "--disable-profiling")  # off by default
    cid = cgroups.create("gil-off")
    w = GilWorkload(cgroups, cid, 2)
    try:
        assert wait_for(lambda: a.processes(w.ready["pid"]), 10)
        w.run()
        names = {n for n, _, _ in a.metrics()}
        assert METRIC not in names and "coroot_agent_python_processes" not in names
        assert "python" not in a.log().split("BPF compiled and attached", 1)[1].split("\n", 1)[0]
    finally:
        w.close()



def test_a_probe_definition_left_behind_is_removed_from_uprobe_events() -> None:
    """What the component does when BCC leaves a definition behind (an attach to a process that
    has just exited, a detach while busy): the names it computes are BCC's, and removing them
    works through tracefs (a buffered append, which seeks first, does not)."""
    from agent.ebpf import tracefs
    from agent.runtime import python as gil

    events = tracefs.tracefs_events_dir()
    assert events is not None
    path = os.path.join(os.path.dirname(events), "uprobe_events")
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    names = gil._event_names("/proc/self/fd/999", 0x886A0, 4_000_000)
    assert names[0].startswith("p__proc_self_fd_999_0x886a0_4000000_bcc_")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for kind, name in zip("pr", names, strict=True):
            os.write(fd, f"{kind}:uprobes/{name} {libc}:0x886a0\n".encode())
    finally:
        os.close(fd)
    defined = Path(path).read_text()
    assert all(n in defined for n in names)
    left = dict.fromkeys(names, 3)
    tracefs.remove_uprobe_events(left)
    assert left == {}
    defined = Path(path).read_text()
    assert not any(n in defined for n in names)
