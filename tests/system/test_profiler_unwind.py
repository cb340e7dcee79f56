"""Native stacks without frame pointers: a C program the test builds with
`gcc -O2 -fomit-frame-pointer -fno-inline` (tests/system/workloads/unwind.c) in a test cgroup
burns CPU in main -> a -> b -> c and in main -> sort_it -> libc's qsort -> by_weight (the
comparison). Debian's libc has no frame pointers either. The stored profile must have the
whole chains, which only the unwind tables the agent builds from the files' .eh_frame give
(walked by frame pointers, a stack ends after the leaf or in garbage: run with the tables off,
this module fails)."""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.profiling.profiler import frame_name
from tests.system.helpers import AgentProcess, TestCgroups, profile_stacks, wait_for

pytestmark = pytest.mark.agent_args("--enable-native-unwinding", "--profiling-interval", "2s", "--disable-l7-tracing",
                                    "--disable-log-parsing",
                                    "--disable-log-entries", "--disable-pinger", "--disable-jvm-monitoring")

SRC = Path(__file__).parent / "workloads" / "unwind.c"
EXEC_SRC = Path(__file__).parent / "workloads" / "unwind_exec.c"
CPU_SECONDS = 5  # ~495 samples at 99 Hz, whatever the machine's load
EXEC_SECONDS = 2  # each of the two programs of the exec test


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("bin") / "unwind")
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-fno-inline", "-o", out, str(SRC)], check=True)
    return out


def stacks_of(storage: str, service: str) -> list[tuple[list[str], int]]:
    return [([frame_name(f) for f in stack], value) for stack, value in profile_stacks(storage, service)]


@pytest.fixture(scope="module")
def exec_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """unwind_exec.c twice: the same code at the same addresses, frames of 64 and 512 words."""
    d = tmp_path_factory.mktemp("bin")
    out = []
    for tag, pad in (("_x", 64), ("_y", 512)):
        out.append(str(d / f"unwind_exec{tag}"))
        subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-fno-inline", f"-DTAG={tag}", f"-DPAD={pad}",
                        "-o", out[-1], str(EXEC_SRC)], check=True)
    syms = [{n.removesuffix(tag): a for a, _, n in (ln.split() for ln in subprocess.run(
        ["nm", f], capture_output=True, text=True, check=True).stdout.splitlines() if ln.count(" ") == 2)}
        for f, tag in zip(out, ("_x", "_y"), strict=True)]
    for fn in ("main", "top", "mid", "leaf"):  # the premise: the same addresses
        assert syms[0][fn] == syms[1][fn], (fn, syms)
    return out[0], out[1]


def _exec_workload(agent: AgentProcess, cg: TestCgroups, pair: tuple[str, str]) -> str:
    """One process, pid and addresses kept (no ASLR), runs unwind_exec_x, then execs
    unwind_exec_y: each burns EXEC_SECONDS once the kernel has the agent's tables of it (for
    the second: the new file's rows at the same mapping address)."""
    cid = cg.create("prof-unwind-exec")
    p = cg.spawn(cid, ["setarch", "-R", pair[0], str(EXEC_SECONDS), pair[1]], stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    try:
        assert p.stdout.readline().strip() == b"ready"
        assert wait_for(lambda: kernel_has_tables(p.pid), 60, interval=0.2), agent.log()[-3000:]
        first = kernel_maps(p.pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == b"ready"  # exec'd: the same pid
        # the binary's mapping (the lowest address) now with the second file's rows
        low = min(first)
        assert wait_for(lambda: kernel_has_tables(p.pid) and kernel_maps(p.pid).get(low, first[low]) != first[low],
                        60, interval=0.2), agent.log()[-3000:]
        assert min(kernel_maps(p.pid)) == low  # the same addresses: only the generation tells them apart
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline().startswith(b"done")
        p.communicate(b"\n")
    finally:
        p.kill()
    return cid


@pytest.fixture(scope="module")
def profiled(binary: str, exec_pair: tuple[str, str], agent: AgentProcess) -> Iterator[dict]:
    cg = TestCgroups()
    t0 = time.monotonic()
    took = {}
    try:
        cid = cg.create("prof-unwind")
        p = cg.spawn(cid, [binary, "unwind", str(CPU_SECONDS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == b"ready"
        # burn only once the agent's tables for it are in the kernel (before, its samples would
        # be walked by frame pointers: a test of that start-up window is not this one's)
        assert wait_for(lambda: kernel_has_tables(p.pid), 60, interval=0.2), agent.log()[-3000:]
        took["tables"] = time.monotonic() - t0
        p.stdin.write(b"go\n")
        p.stdin.flush()
        cpu = float(p.stdout.readline().split()[0])
        took["burn"] = time.monotonic() - t0
        # the tables' metrics while the process lives
        wait_for(lambda: _metric(agent, "coroot_agent_profiler_native_stacks_total") > 0, 30, interval=0.5)
        metrics = {n + str({k: v for k, v in sorted(lb.items()) if k in ("what", "by")}): v
                   for n, lb, v in agent.metrics() if n.startswith("coroot_agent_profiler_")}
        p.communicate(b"\n")
        exec_cid = _exec_workload(agent, cg, exec_pair)
        took["exec"] = time.monotonic() - t0
    finally:
        code = agent.stop()
        took["stop"] = time.monotonic() - t0
        cg.cleanup()
    assert code == 0, agent.log()[-3000:]
    stacks = stacks_of(agent.storage, cid)
    took["read"] = time.monotonic() - t0
    print("seconds since the agent started:", {k: round(v, 1) for k, v in took.items()})
    yield {"cpu": cpu, "stacks": stacks, "metrics": metrics, "exec_stacks": stacks_of(agent.storage, exec_cid)}


def kernel_has_tables(pid: int) -> bool:
    """Some agent's unwind_maps has, for the process, exactly the executable file mappings its
    /proc/PID/maps has now (bpftool; pids are unique, so another agent's maps on this shared
    machine cannot hold it): the exec'd program's, not those of the shell the spawn began in."""
    now = {int(line.split("-")[0], 16) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
           if len(f := line.split()) > 5 and "x" in f[1] and f[5].startswith("/")}
    return bool(now) and set(kernel_maps(pid)) == now


def kernel_maps(pid: int) -> dict[int, tuple[int, int]]:
    """The process's mappings in unwind_maps: start -> (rows_start, rows_count)."""
    r = subprocess.run(["bpftool", "-j", "map", "dump", "name", "unwind_maps"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return {}
    kernel = {}
    todo = [json.loads(r.stdout)]
    while todo:
        x = todo.pop()
        if isinstance(x, list):
            todo += x
        elif isinstance(x, dict):
            f = x.get("formatted", {})
            if isinstance(f.get("key"), dict) and f["key"].get("pid") == pid:
                v = f["value"]
                kernel[int(v["start"])] = (int(v["rows_start"]), int(v["rows_count"]))
            todo += [v for v in x.values() if isinstance(v, list | dict)]
    return kernel


def _metric(agent: AgentProcess, name: str) -> float:
    return sum(v for n, _, v in agent.metrics() if n == name)


def _share(stacks: list[tuple[list[str], int]], pred: object) -> tuple[int, int]:
    hit = sum(v for s, v in stacks if pred(s))  # type: ignore[operator]
    return hit, sum(v for _, v in stacks)


def test_every_sample_in_c_has_the_whole_chain(profiled: dict) -> None:
    stacks = profiled["stacks"]
    in_c = [(s, v) for s, v in stacks if s and s[0] == "c"]
    assert in_c, sorted(stacks, key=lambda x: -x[1])[:5]
    # leaf first: c, b, a, main, then libc's start-up (__libc_start_call_main, static: file
    # and offset), _start and the command name
    bad = [s for s, _ in in_c if s[:4] != ["c", "b", "a", "main"] or len(s) != 8
           or s[5:] != ["__libc_start_main", "_start", "unwind"] or _libc_frame(s[4]) is None]
    assert not bad, bad[:5]
    c_total = sum(v for _, v in in_c)
    period = 1_000_000_000 // 99
    assert c_total // period >= 0.4 * 99 * CPU_SECONDS, (c_total // period, profiled["cpu"])


def test_through_libcs_qsort_to_the_callback(profiled: dict) -> None:
    """Every sample of by_weight has the whole chain, frame by frame: the comparison's call
    site in libc's merge sort (msort_with_tmp, static in libc: named by file and offset, as
    Debian's libc has no .symtab), 0 to 5 of its recursive calls (64 items: halves of 32, 16,
    8, 4, 2, all merged), qsort_r (qsort jumps to it), sort_it, main, then libc's start-up."""
    stacks = profiled["stacks"]
    in_cmp = [s for s, _ in stacks if s and s[0] == "by_weight"]
    assert in_cmp, sorted(stacks, key=lambda x: -x[1])[:5]
    libc = _libc_frame(in_cmp[0][-4])
    assert libc is not None, in_cmp[0]
    start_fn = _function_of(libc[0], libc[1])  # __libc_start_call_main: not the sort
    sites: set[int] = set()
    recursion: set[int] = set()
    for s in in_cmp:
        assert s[-7:] == ["qsort_r", "sort_it", "main", s[-4], "__libc_start_main", "_start", "unwind"], s
        assert _libc_frame(s[-4]) == libc, s  # one call site of main, always the same
        inner = [_libc_frame(f) for f in s[1:-7]]
        assert 1 <= len(inner) <= 6 and all(f is not None and f[0] == libc[0] for f in inner), s
        offsets = [f[1] for f in inner if f is not None]
        fn = _function_of(libc[0], offsets[0])
        assert fn != start_fn and all(_function_of(libc[0], o) == fn for o in offsets), s  # one function
        sites.add(offsets[0])
        recursion.update(offsets[1:])
    assert len(sites) == 1 and len(recursion) <= 2 and not sites & recursion, (sites, recursion)


def _libc_frame(name: str) -> tuple[str, int] | None:
    """('/…/libc.so.6', file offset) of a frame named by file and offset."""
    path, plus, off = name.rpartition("+")
    if not plus or "/libc.so" not in path:
        return None
    try:
        return path, int(off, 16)
    except ValueError:
        return None


def _function_of(path: str, address: int) -> tuple[int, int]:
    """The range of the function (FDE) holding `address` in the file."""
    for start, end in _fdes(path):
        if start <= address < end:
            return start, end
    raise AssertionError(f"{path}+{address:x}: in no function")


@functools.cache
def _fdes(path: str) -> list[tuple[int, int]]:
    from elftools.dwarf.callframe import FDE
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return [(e["initial_location"], e["initial_location"] + e["address_range"])
                for e in ELFFile(f).get_dwarf_info().EH_CFI_entries() if isinstance(e, FDE)]


def test_samples_reach_main_and_the_split_follows_the_work(profiled: dict) -> None:
    stacks = profiled["stacks"]
    mine = [(s, v) for s, v in stacks if s and s[0] in ("c", "by_weight")]
    total = sum(v for s, v in stacks)
    assert sum(v for _, v in mine) >= 0.9 * total, sorted(stacks, key=lambda x: -x[1])[:5]
    assert all("main" in s for s, _ in mine)
    # the stored CPU is the process's own
    assert abs(total / 1e9 - profiled["cpu"]) <= 0.2 * profiled["cpu"], (total / 1e9, profiled["cpu"])


def test_an_exec_at_the_same_addresses_is_walked_by_the_new_files_rules(profiled: dict) -> None:
    """The kernel's cache of rules (bpf/include/unwind.h unwind_cache) must not give the
    exec'd program the first program's rules: the same pid, the same addresses, frames 8x
    bigger. Every sample of each leaf has its own program's whole chain; with a stale rule the
    second's stacks end in garbage after the leaf."""
    stacks = profiled["exec_stacks"]
    period = 1_000_000_000 // 99
    for tag in ("_x", "_y"):
        mine = [s for s, _ in stacks if s and s[0] == "leaf" + tag]
        assert mine, sorted(stacks, key=lambda x: -x[1])[:5]
        bad = [s for s in mine if s[:4] != ["leaf" + tag, "mid" + tag, "top" + tag, "main"]]
        assert not bad, (tag, bad[:5])
        n = sum(v for s, v in stacks if s and s[0] == "leaf" + tag) // period
        assert n >= 0.4 * 99 * EXEC_SECONDS, (tag, n)


def test_tables_are_reported(profiled: dict) -> None:
    m = profiled["metrics"]
    assert m["coroot_agent_profiler_unwind_tables_built_total{}"] >= 2  # the binary and libc at least
    assert m["coroot_agent_profiler_unwind_tables{'what': 'loaded_files'}"] >= 2
    assert 0 < m["coroot_agent_profiler_unwind_tables{'what': 'kernel_row_bytes'}"] <= 8 << 20
    by_table = m["coroot_agent_profiler_native_frames_total{'by': 'table'}"]
    assert by_table > 0
    assert m["coroot_agent_profiler_native_tail_call_failures_total{}"] == 0
    # the busy loops' callers come from the kernel's cache of rules, most of their frames
    assert m["coroot_agent_profiler_native_cached_frames_total{}"] >= 0.5 * by_table
