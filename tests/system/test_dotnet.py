""".NET runtime counters, end to end: the agent as a real process reading the System.Runtime
EventCounters of a real .NET Core 3.1.23 runtime (PyPI dotnetcore2, hosted in Python by
pythonnet: tests/system/workloads/dotnet_counters.py) over its diagnostics IPC socket, in a
test cgroup. The agent asks for a report every second (--dotnet-counter-interval 1). The
runtime's increments count from the session's start, so the workload works only once
/api/processes says the agent is attached: it allocates 40 x 1 MB, calls GC.Collect() 6 times
and throws and catches 9 exceptions, and prints the runtime's own numbers (gen-2 collections,
bytes allocated, first-chance exceptions: the runtime's exception-count counts those, and each
exception thrown through pythonnet's call is two). The runtime's first report of exception-count
sometimes holds every exception since it started and sometimes starts from the session (both
seen, run to run), so the agent's total must lie between the first-chance exceptions of the work
(18: 9 thrown, two each) and the runtime's own count since it started (the internal
Exception.GetExceptionCount() the counter reads; 22: 4 more from pythonnet's start and a warm-up),
gen-2 collections at least the induced ones and the runtime's own count, bytes allocated at
least the arrays'. A process as nobody that poses as .NET and serves garbage, or nothing, on its
diagnostics socket is dropped, counted and explained in /api/processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.system.helpers import NOBODY, REPO, AgentProcess, TestCgroups, wait_for

pytestmark = pytest.mark.agent_args("--dotnet-counter-interval", "1", "--disable-l7-tracing", "--disable-profiling")

SCRIPT = REPO / "tests" / "system" / "workloads" / "dotnet_counters.py"
ARRAYS, ARRAY_BYTES, COLLECTS, EXCEPTIONS = 40, 1_000_000, 6, 9


def _need_runtime() -> None:
    try:
        import dotnetcore2  # noqa: F401
        import pythonnet  # noqa: F401
    except ImportError:
        pytest.fail("no .NET runtime: pip install dotnetcore2==3.1.23 pythonnet==3.2.1 (the test extras)")


def test_counters_of_a_real_dotnet_runtime(agent: AgentProcess, cgroups: TestCgroups) -> None:
    _need_runtime()
    cid = cgroups.create("dotnet")
    p = cgroups.spawn(cid, [sys.executable, str(SCRIPT), str(ARRAYS), str(ARRAY_BYTES), str(COLLECTS),
                            str(EXCEPTIONS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdin is not None and p.stdout is not None
    try:
        ready = json.loads(p.stdout.readline())
        assert ready["version"] == "3.1.23", ready
        pid = ready["pid"]

        def attached() -> dict | None:
            ps = agent.processes(pid)
            d = ps[0].get("dotnet") if ps else None
            return d if d and d["status"] == "attached" else None

        d = wait_for(attached, 30, interval=0.2)
        assert d, f"{agent.processes(pid)}\n{agent.log()[-3000:]}"
        assert d["runtime_version"] == "3.1.23" and str(d["socket"]).startswith("/tmp/dotnet-diagnostic-"), d
        assert wait_for(lambda: agent.value("container_dotnet_info", container_id=cid, runtime_version="3.1.23"), 10)
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert line, f"the workload exited with {p.wait()}"
        done = json.loads(line)
        assert done["thrown"] == EXCEPTIONS and done["gen2"] >= COLLECTS, done

        def totals() -> tuple[float, float, float]:
            return (agent.value("container_dotnet_exceptions_total", container_id=cid) or 0.0,
                    agent.value("container_dotnet_gc_count_total", container_id=cid, generation="Gen2") or 0.0,
                    agent.value("container_dotnet_memory_allocated_bytes_total", container_id=cid) or 0.0)

        wait_for(lambda: totals()[0] >= done["first_chance"] and totals()[1] >= done["gen2"]
                 and totals()[2] >= ARRAYS * ARRAY_BYTES, 15, interval=0.3)
        exc, gen2, alloc = totals()
        print(f".NET 3.1.23: agent exceptions {exc:g} (runtime since start {done['exceptions_total']}, "
              f"thrown {EXCEPTIONS}, first-chance {done['first_chance']}), "
              f"gen2 {gen2:g} (runtime {done['gen2']}, induced {COLLECTS}), allocated {alloc:g} B "
              f"(runtime {done['allocated']}, arrays {ARRAYS * ARRAY_BYTES})")
        assert done["first_chance"] <= exc <= done["exceptions_total"], (exc, done)
        assert done["first_chance"] >= EXCEPTIONS, done
        assert gen2 >= done["gen2"] >= COLLECTS, (gen2, done)
        assert alloc >= ARRAYS * ARRAY_BYTES, (alloc, done)
        for name in ("container_dotnet_memory_heap_size_bytes", "container_dotnet_thread_pool_size",
                     "container_dotnet_thread_pool_completed_items_total"):
            assert agent.value(name, container_id=cid, **({"generation": "LOH"} if "heap" in name else {})) \
                is not None, name
    finally:
        if p.poll() is None:
            p.stdin.close()
            p.wait(10)


@pytest.mark.parametrize("mode", ["garbage", "silent"])
def test_a_hostile_diagnostics_socket_is_dropped_and_counted(agent: AgentProcess, cgroups: TestCgroups,
                                                            mode: str) -> None:
    """A process as nobody that maps a libcoreclr.so and serves its diagnostics socket with garbage
    (a well-formed OK header and a session id, then random bytes where the nettrace stream is) or
    with nothing at all: the agent drops the session (invalid stream, or no answer in time),
    counts it, says why in /api/processes, exports nothing for it, and keeps working."""
    cid = cgroups.create(f"dotnet-{mode}")
    script = REPO / "tests" / "system" / "workloads" / "dotnet_impostor.py"
    p = cgroups.spawn(cid, [*NOBODY, sys.executable, str(script), mode], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True, cwd="/")
    assert p.stdin is not None and p.stdout is not None
    try:
        pid = json.loads(p.stdout.readline())["pid"]

        def dropped() -> dict | None:
            ps = agent.processes(pid)
            d = ps[0].get("dotnet") if ps else None
            return d if d and d["status"] == "error" else None

        d = wait_for(dropped, 20, interval=0.2)
        assert d, f"{agent.processes(pid)}\n{agent.log()[-3000:]}"
        want = "invalid: nettrace" if mode == "garbage" else "ipc_error: no answer in time"
        assert str(d["detail"]).startswith(want), d["detail"]
        result = "invalid" if mode == "garbage" else "ipc_error"
        assert (agent.value("coroot_agent_dotnet_sessions_total", result=result) or 0) >= 1
        assert agent.value("container_dotnet_info", container_id=cid) is None
        assert p.poll() is None
    finally:
        p.stdin.close()
        p.wait(10)
