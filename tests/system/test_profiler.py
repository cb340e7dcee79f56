"""The CPU profiler on real workloads compiled by the test (with frame pointers), in test
cgroups; profiles read back from the store."""

from __future__ import annotations

import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.profiling.profiler import frame_name
from tests.system.helpers import AgentProcess, TestCgroups, coroot_agent, rows, wait_for

pytestmark = pytest.mark.agent_args("--profiling-interval", "3s")

SRC = Path(__file__).parent / "workloads" / "burn.c"


@pytest.fixture(scope="module")
def burn(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("bin") / "burn")
    # -O0: GCC 12 drops the frame of a leaf function at -O1 even with -mno-omit-leaf-frame-pointer
    subprocess.run(["gcc", "-O0", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer", "-fno-inline",
                    "-o", out, str(SRC)], check=True)
    return out


def frames_by_service(storage: str) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks by service, frames as function names: each stored frame must be in the server's
    form ("<function> <file>:<line>": ":0" for the node agent's name-only native frames, a
    file and line for Python frames of Python processes in other test cgroups)."""
    found = rows(storage, (
        "SELECT p.ServiceName AS service, s.Stack AS stack, sum(p.Value) AS value FROM profiling_samples p "
        "JOIN (SELECT ServiceName, Hash, any(Stack) AS Stack FROM profiling_stacks GROUP BY ServiceName, Hash) s "
        "ON s.ServiceName = p.ServiceName AND s.Hash = p.StackHash "
        "WHERE p.Type = 'ebpf:cpu:nanoseconds' GROUP BY service, stack"))
    out: dict[str, list[tuple[list[str], int]]] = {}
    for r in found:
        assert all(re.fullmatch(r".+ \S*:\d+", f) for f in r["stack"]), r["stack"]
        out.setdefault(r["service"], []).append(([frame_name(f) for f in r["stack"]], int(r["value"])))
    return out


# The main workload's CPU seconds: 99 Hz gives ~790 samples, whatever the machine's load
# (the workload burns CPU time, not wall time).
MAIN_CPU_SECONDS = 8


@pytest.fixture(scope="module")
def profiled(burn: str, agent: AgentProcess) -> Iterator[dict]:
    """The module's agent with every workload side by side; the store is read after it stopped."""
    cg = TestCgroups()
    try:
        main, off, sys_cid, jit_cid, churn = (cg.create(n) for n in ("prof-main", "prof-off", "prof-sys", "prof-jit", "prof-churn"))
        env = dict(os.environ)
        p_main = cg.spawn(main, [burn, "burn", str(MAIN_CPU_SECONDS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        p_off = cg.spawn(off, [burn, "burn", "1.5"], env=env | {"COROOT_EBPF_PROFILING": "disabled"},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        p_sys = cg.spawn(sys_cid, [burn, "syscalls", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        p_jit = cg.spawn(jit_cid, [burn, "jit"], stdout=subprocess.PIPE)
        assert p_jit.stdout is not None and p_jit.stdout.readline().strip() == b"ready"
        # Alive until its frames are symbolized and stored: a frame in an anonymous mapping is
        # named from /tmp/perf-PID.map only while the process lives (a fixed 3 s was too short
        # for a loaded machine). The test below still fails if that never happens.
        wait_for(lambda: rows(agent, f"SELECT count() AS n FROM profiling_stacks WHERE ServiceName = '{jit_cid}' "
                                     "AND has(Stack, 'jitted_spin_loop :0')") != [{"n": 0}], 60, interval=1)
        p_jit.kill()
        p_jit.wait()
        if os.path.exists(f"/tmp/perf-{p_jit.pid}.map"):  # the "JIT" leaves its map, as a killed one would
            os.unlink(f"/tmp/perf-{p_jit.pid}.map")
        # 500 short-lived processes: the symbol caches must not keep them
        for _ in range(50):
            batch = [cg.spawn(churn, [burn, "burn", "0.01"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                     for _ in range(10)]
            for b in batch:
                b.wait()
        cpu = {}
        for name, p in (("main", p_main), ("off", p_off), ("sys", p_sys)):
            assert p.stdout is not None
            cpu[name] = float(p.stdout.readline())
        time.sleep(4)  # one more profiling interval, so the caches saw the churn go
        caches = {lb["cache"]: v for n, lb, v in agent.metrics() if n == "coroot_agent_profiler_symbol_cache_entries"}
        for p in (p_main, p_off, p_sys):
            p.communicate(b"\n")
    finally:
        code = agent.stop()
        cg.cleanup()
    assert code == 0, agent.log()[-3000:]
    yield {"storage": agent.storage, "cpu": cpu, "caches": caches, "main": main, "off": off, "sys": sys_cid,
           "jit": jit_cid, "profiles": frames_by_service(agent.storage)}


def test_cpu_splits_3_to_1_and_totals_the_processes_cpu_time(profiled: dict) -> None:
    """burn_alpha does three times burn_beta's iterations of the same loop, aligned alike: 3:1 of
    the CPU in one process, whatever the scheduler does. The ~790 samples are independent draws
    (short rounds of random length: nothing a 99 Hz sampler can lock onto), so alpha's share
    has a standard deviation of sqrt(0.75 * 0.25 / n) = 0.015. Measured on this 2-core machine
    with a burner pinned to CPU 0 and other tests running: 10 runs, 753-830 samples, shares
    0.731-0.767 (at most 1.2 standard deviations off). The tolerance, 0.07, is 4.5 of them,
    and still fails a 2:1 split (0.667), an even one, or leaf frames put on the wrong function.
    (Before: 10 s of wall time gave 100-535 samples under load, and the two loops' placement in
    memory alone moved the share to 0.77 on an idle machine: 0.65 was reported, 0.81 seen here.)"""
    stacks = profiled["profiles"][profiled["main"]]
    total = sum(v for _, v in stacks)
    alpha = sum(v for s, v in stacks if s and s[0] == "burn_alpha")
    beta = sum(v for s, v in stacks if s and s[0] == "burn_beta")
    samples = (alpha + beta) // (1_000_000_000 // 99)  # value = samples x the sampling period
    share = alpha / (alpha + beta)
    # enough samples for the tolerance to be 4 standard deviations at least
    assert samples >= 0.8 * 99 * MAIN_CPU_SECONDS, (samples, total / 1e9)
    assert abs(share - 0.75) <= 0.07, (share, samples)
    assert (alpha + beta) / total >= 0.95, (alpha / total, beta / total)  # the rest: kernel entry, the loop's tail
    own = profiled["cpu"]["main"]
    assert abs(total / 1e9 - own) <= 0.15 * own, (total / 1e9, own)
    # leaf first: the caller is below the hot function
    assert any(s[:2] == ["burn_alpha", "main"] for s, _ in stacks), sorted(stacks, key=lambda x: -x[1])[:3]


def test_the_outermost_frame_is_the_command_name_as_in_the_node_agents_profiles(profiled: dict) -> None:
    for key in ("main", "sys", "jit"):
        roots = {s[-1] for s, _ in profiled["profiles"][profiled[key]]}
        assert roots <= {"burn", "sh"} and "burn" in roots, (key, roots)  # sh: before its exec


def test_an_opted_out_process_is_never_sampled(profiled: dict) -> None:
    assert profiled["off"] not in profiled["profiles"]
    assert profiled["cpu"]["off"] >= 1.5  # it did burn CPU


def test_kernel_frames_appear_for_a_syscall_heavy_workload(profiled: dict) -> None:
    frames = {f for s, _ in profiled["profiles"][profiled["sys"]] for f in s}
    assert frames & {"ksys_read", "__x64_sys_read", "vfs_read", "read_zero", "iov_iter_zero"}, sorted(frames)[:40]


def test_a_perf_map_names_jit_frames(profiled: dict) -> None:
    frames = [s[0] for s, _ in profiled["profiles"][profiled["jit"]]]
    assert "jitted_spin_loop" in frames, frames


def test_symbol_caches_stay_bounded_after_500_short_processes(profiled: dict) -> None:
    caches = profiled["caches"]
    assert caches["processes"] <= 10, caches  # exited processes are forgotten
    assert caches["binaries"] <= 256, caches


def test_flamegraph_svg_names_the_hot_function(profiled: dict, tmp_path: Path) -> None:
    out = tmp_path / "main.svg"
    r = coroot_agent("flamegraph", "--storage-path", profiled["storage"], "--service", profiled["main"],
                     "--since", "1h", "-o", str(out))
    assert r.returncode == 0, r.stderr
    root = ET.parse(out).getroot()
    texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}title"))
    assert "burn_alpha" in texts and "burn_beta" in texts
    r = coroot_agent("flamegraph", "--storage-path", profiled["storage"], "--service", profiled["main"],
                     "--since", "1h", "--format", "folded")
    assert any(line.rsplit(" ", 1)[0].endswith(";main;burn_alpha") for line in r.stdout.splitlines()), r.stdout[:500]
    r = coroot_agent("flamegraph", "--storage-path", profiled["storage"], "--service", "/system.slice/none.service")
    assert r.returncode == 1 and "no CPU samples for service /system.slice/none.service" in r.stderr
