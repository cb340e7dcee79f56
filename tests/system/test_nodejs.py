"""Node.js event-loop blocked time, end to end: the agent as a real process with its uprobes on
the node binary's libuv (uv__io_poll and the I/O callbacks, the node agent's method), Debian's
`nodejs` running tests/system/workloads/event_loop.js in test cgroups. The script blocks its
event loop 3 x 200 ms in timer callbacks (100 ms of waiting for I/O between them) and measures
its own spin; container_nodejs_event_loop_blocked_time_seconds_total must be 0.6 s +- 0.1 (the
issue's bound) and within 0.1 s of what the script measured. The same script told to spin
0 ms leaves its loop waiting all the time: the agent reports ~0 (under 50 ms). The workload
starts only once the agent follows the process (its series is there). The node here must have
libuv's symbols: this machine's nodejs 20 has libuv linked in with its symbol table; Debian 12's
own nodejs 18 links the system libuv1, which is stripped, and neither the node agent nor this
agent can find uv__io_poll there (tests/unit/test_nodejs.py says so first)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.system.helpers import REPO, AgentProcess, TestCgroups, wait_for

pytestmark = pytest.mark.agent_args("--enable-nodejs-monitoring", "--disable-l7-tracing", "--disable-profiling")

METRIC = "container_nodejs_event_loop_blocked_time_seconds_total"
SCRIPT = REPO / "tests" / "system" / "workloads" / "event_loop.js"
NODE = shutil.which("node") or shutil.which("nodejs") or "node"


class EventLoopWorkload:
    def __init__(self, cgroups: TestCgroups, cid: str, blocks: int, ms: float) -> None:
        if not shutil.which(NODE):
            pytest.fail("no node: apt-get install nodejs (scripts/setup.sh installs it)")
        self.p = cgroups.spawn(cid, [NODE, str(SCRIPT), str(blocks), str(ms)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
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


def measure(agent: AgentProcess, cgroups: TestCgroups, blocks: int, ms: float) -> tuple[float, dict]:
    cid = cgroups.create("nodejs")
    w = EventLoopWorkload(cgroups, cid, blocks, ms)
    try:
        followed = wait_for(lambda: agent.value(METRIC, container_id=cid) is not None, 30, interval=0.2)
        assert followed, f"the agent does not follow pid {w.ready['pid']}:\n{agent.log()[-3000:]}"
        before = agent.value(METRIC, container_id=cid)
        done = w.run()
        # The last block ends before the script prints; the next uv__io_poll entry adds it.
        want = done["blocked"] * 0.9
        wait_for(lambda: (agent.value(METRIC, container_id=cid) or 0.0) >= want, 5, interval=0.2)
        got = float(agent.value(METRIC, container_id=cid) or 0.0)
        print(f"event loop blocked, {blocks} x {ms:g} ms: agent {got:.4f} s (before go: {before:.4f} s); "
              f"the script: {done['blocked']:.4f} s")
        return got, done
    finally:
        w.close()


def test_three_blocks_of_200ms_are_600ms_of_blocked_time(agent: AgentProcess, cgroups: TestCgroups) -> None:
    got, done = measure(agent, cgroups, 3, 200)
    assert 0.6 <= done["blocked"] < 0.65, done
    assert 0.5 <= got <= 0.7, (got, done)
    assert abs(got - done["blocked"]) <= 0.1, (got, done)


def test_a_loop_that_only_waits_is_not_blocked(agent: AgentProcess, cgroups: TestCgroups) -> None:
    got, done = measure(agent, cgroups, 3, 0)
    assert got < 0.05, (got, done)
