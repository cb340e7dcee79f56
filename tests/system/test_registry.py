"""The process and container registry against real processes in real cgroups."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.system.helpers import AgentFactory, AgentProcess, TestCgroups, wait_for

pytestmark = [pytest.mark.agent_args("--dead-container-ttl", "3s"), pytest.mark.agent_without("profiling", "l7")]

BURN = """
import resource, time
end = time.process_time() + 1.5
while time.process_time() < end:
    pass
r = resource.getrusage(resource.RUSAGE_SELF)
print(r.ru_utime + r.ru_stime, flush=True)
time.sleep(60)
"""


def test_process_in_a_test_cgroup_appears_within_2s_and_is_forgotten_after_the_bound(
    agent: AgentProcess, cgroups: TestCgroups,
) -> None:
    cid = cgroups.create("appear")
    t0 = time.monotonic()
    p = cgroups.spawn(cid, ["sleep", "60"])
    seen = wait_for(lambda: agent.value("container_info", container_id=cid), timeout=2.0)
    took = time.monotonic() - t0
    assert seen == 1.0, f"container {cid} not reported within 2s"
    assert took < 2.0
    [proc] = agent.processes(p.pid)
    assert proc["container_id"] == cid and proc["comm"] == "sleep"
    assert agent.value("container_info", container_id=cid, app_id="") == 1.0  # app_id: Kubernetes workloads only

    p.kill()
    p.wait()
    exited = time.monotonic()
    time.sleep(0.5)
    assert agent.value("container_info", container_id=cid) == 1.0, "forgotten before the 3s bound"
    gone = wait_for(lambda: agent.value("container_info", container_id=cid) is None, timeout=6.0)
    assert gone, "dead container still reported after the bound"
    assert time.monotonic() - exited >= 3.0
    assert agent.processes(p.pid) == []


def test_processes_outside_containers_have_no_container(agent: AgentProcess) -> None:
    [me] = agent.processes(os.getpid())
    assert me["container_id"] is None


def test_opt_out_variables_are_read_for_processes_started_before_and_after_the_agent(
    cgroups: TestCgroups, agent_factory: AgentFactory,
) -> None:
    cid = cgroups.create("optout")
    env = dict(os.environ)
    before = cgroups.spawn(cid, ["sleep", "60"], env=env | {"COROOT_EBPF_PROFILING": "disabled"})
    time.sleep(0.2)
    a = agent_factory()
    after_off = cgroups.spawn(cid, ["sleep", "60"], env=env | {"COROOT_EBPF_PROFILING": "disabled"})
    after_on = cgroups.spawn(cid, ["sleep", "60"], env={k: v for k, v in env.items() if not k.startswith("COROOT_")})
    traces_logs = cgroups.spawn(cid, ["sleep", "60"], env=env | {
        "COROOT_EBPF_TRACES": "disabled", "COROOT_LOG_MONITORING": "disabled,really"})
    not_disabled = cgroups.spawn(cid, ["sleep", "60"], env=env | {"COROOT_EBPF_PROFILING": "enabled"})

    def flags(pid: int) -> list[str] | None:
        found = a.processes(pid)
        return found[0]["opt_out"] if found else None

    assert wait_for(lambda: flags(after_on.pid) is not None, 2.0)
    assert flags(before.pid) == ["profiling"]
    assert flags(after_off.pid) == ["profiling"]
    assert flags(after_on.pid) == []
    assert wait_for(lambda: flags(traces_logs.pid), 2.0) == ["logs", "traces"]
    assert wait_for(lambda: flags(not_disabled.pid) is not None, 2.0)
    assert flags(not_disabled.pid) == []
    assert a.stop() == 0


def test_container_cpu_usage_grows_by_the_cpu_time_burned_inside_it(
    agent: AgentProcess, cgroups: TestCgroups,
) -> None:
    cid = cgroups.create("cpu")
    p = cgroups.spawn(cid, ["/usr/bin/python3", "-c", BURN], stdout=subprocess.PIPE)
    assert p.stdout is not None
    own_cpu = float(p.stdout.readline())
    used = wait_for(lambda: agent.value("container_resources_cpu_usage_seconds_total", container_id=cid), 2.0)
    assert used is not None, "no CPU usage reported for the test container"
    assert own_cpu >= 1.5
    assert abs(used - own_cpu) <= 0.10 * own_cpu, f"cgroup says {used:.3f}s, rusage says {own_cpu:.3f}s"


def test_no_process_events_are_lost_in_a_fork_storm(agent: AgentProcess) -> None:
    before = agent.value("coroot_agent_process_events_total")
    assert before is not None
    for _ in range(300):
        subprocess.run(["true"], check=True)
    # each `true` is a fork, an exec and an exit: at least 900 events
    grown = wait_for(lambda: (agent.value("coroot_agent_process_events_total") or 0) - before >= 900, 3.0)
    assert grown
    assert agent.value("coroot_agent_lost_events_total", what="proc_events") == 0
