"""Python frames of other CPython versions: Debian 13's python3.13 (offsets from its own
_Py_DebugOffsets; entry frames skipped by their owner), in a small root of its release (`debootstrap --variant=minbase --include=python3`, cached
as a tarball for a day under /var/cache/coroot-agent-test) run with chroot: a host process
whose interpreter file the agent reads through /proc/PID/map_files or, a chroot's map showing
the path outside its root, the same file (device, inode) as the agent sees it. One agent per module;
RELEASES takes more releases (each runs alongside the others).

Each runs tests/system/workloads/py_burn.py (main -> handler -> burn_alpha / burn_beta, 3:1 of
CPU) in a test cgroup; the profile read back from the store names both functions under their
Python callers in that ratio. Besides, the offsets the agent chose for each interpreter
walk that interpreter's own frames through ctypes (workloads/py_offsets_walk.py), so a wrong
table shows as a wrong offset, not only as a missing profile."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.profiling.python import PythonFinder
from tests.system.helpers import (
    DAY,
    DEBIAN_CACHE,
    DEBIAN_MIRROR,
    AgentProcess,
    TestCgroups,
    profile_stacks,
)

pytestmark = pytest.mark.agent_args("--profiling-interval", "3s", "--disable-l7-tracing", "--disable-log-parsing",
                                    "--disable-log-entries", "--disable-pinger", "--disable-jvm-monitoring")

WORKLOADS = Path(__file__).parent / "workloads"
BURN = "/opt/work/py_burn.py"  # inside each root
WALK = "/opt/work/py_offsets_walk.py"
RELEASES = {"trixie": ((3, 13), "/usr/bin/python3.13")}
CPU_SECONDS = 6


def release_root(release: str, dest: Path) -> None:
    """A `debootstrap --variant=minbase --include=python3 <release>` root at dest, from a
    tarball cached for a day (built under a per-process name, so parallel runs do not collide)."""
    DEBIAN_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = DEBIAN_CACHE / f"{release}-python3.tar"
    if not tarball.exists() or time.time() - tarball.stat().st_mtime > DAY:
        tmp = DEBIAN_CACHE / f"{release}-python3.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", release, str(tmp), DEBIAN_MIRROR],
                       check=True, capture_output=True, timeout=900)
        part = DEBIAN_CACHE / f"{release}-python3.{os.getpid()}.part"
        subprocess.run(["tar", "-cf", str(part), "-C", str(tmp), "."], check=True)
        os.replace(part, tarball)
        shutil.rmtree(tmp, ignore_errors=True)
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True)
    (dest / "opt/work").mkdir(parents=True, exist_ok=True)
    for f in ("py_burn.py", "py_offsets_walk.py"):
        shutil.copy(WORKLOADS / f, dest / "opt/work" / f)


@pytest.fixture(scope="module")
def roots() -> Iterator[dict[str, Path]]:
    base = Path(tempfile.mkdtemp(prefix="ca-pyver-"))
    try:
        out = {}
        for release in RELEASES:
            release_root(release, base / release)
            out[release] = base / release
        yield out
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def profiled(agent: AgentProcess, roots: dict[str, Path]) -> Iterator[dict[str, dict]]:
    cg = TestCgroups()
    out: dict[str, dict] = {}
    try:
        procs = {}
        for release, (_, python) in RELEASES.items():
            cid = cg.create(f"prof-{release}")
            procs[release] = (cid, cg.spawn(cid, ["chroot", str(roots[release]), python, BURN, str(CPU_SECONDS)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for release, (cid, p) in procs.items():
            assert p.stdout is not None
            out[release] = {"cid": cid, "cpu": float(p.stdout.readline())}
        for _, p in procs.values():
            p.communicate(b"\n")  # the last samples are written at the next profile flush
    finally:
        code = agent.stop()
        cg.cleanup()
    assert code == 0, agent.log()[-3000:]
    log = agent.log()
    for release in out:
        out[release]["log"] = log
        out[release]["stacks"] = profile_stacks(agent.storage, out[release]["cid"])
    yield out


def first_line(name: str) -> int:
    for i, text in enumerate((WORKLOADS / "py_burn.py").read_text().splitlines(), 1):
        if text.startswith(f"def {name}("):
            return i
    raise AssertionError(name)


@pytest.mark.parametrize("release", list(RELEASES))
def test_the_chosen_offsets_walk_the_interpreters_own_frames(roots: dict[str, Path], release: str) -> None:
    """The agent's finder on a running interpreter of the release: its version, its _PyRuntime
    as the interpreter's ctypes sees it, and the offsets walking from there to the calling
    functions with their files, first lines and compact-ASCII str states."""
    version, python = RELEASES[release]
    p = subprocess.Popen(["chroot", str(roots[release]), python, "-c",
                          "import sys, runpy; sys.argv = [sys.argv[0], sys.stdin.readline()]; "
                          f"runpy.run_path('{WALK}', run_name='__main__')"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        found = None
        deadline = time.monotonic() + 10
        while found is None and time.monotonic() < deadline:
            found = PythonFinder().find(p.pid)
            time.sleep(0.05)
        assert found is not None and found.version == version
        given = dataclasses.asdict(found.offsets) | {"runtime": found.runtime}
        out, _ = p.communicate(json.dumps(given) + "\n", timeout=20)
    finally:
        p.kill()
        p.wait()
    seen = json.loads(out)
    assert seen["runtime"] == found.runtime
    frames = [tuple(f) for f in seen["frames"]]
    names = [f[0] for f in frames]
    walk_line = next(i for i, t in enumerate((WORKLOADS / "py_offsets_walk.py").read_text().splitlines(), 1)
                     if t.startswith("def walk("))
    i = names.index("walk")
    assert frames[i][1:3] == (WALK, walk_line)
    assert frames[i + 1][:3] == ("outer", WALK, walk_line + 19)
    assert frames[i + 2][:3] == ("<module>", WALK, 1)
    for f in frames[i:i + 3]:
        assert (f[3] >> 2) & 7 == 1 and (f[3] >> 5) & 3 == 3, f  # compact ASCII, one byte a character


@pytest.mark.parametrize("release", list(RELEASES))
def test_python_functions_split_3_to_1_under_their_python_callers(profiled: dict[str, dict], release: str) -> None:
    """As tests/system/test_profiler_python.py for 3.11: ~590 samples, a share's standard
    deviation of 0.018, a tolerance of 0.07."""
    stacks = profiled[release]["stacks"]

    def py(name: str) -> str:
        return f"{name} {BURN}:{first_line(name)}"

    def python_part(s: list[str]) -> list[str]:
        return [f for f in s if f" {BURN}:" in f]

    alpha_f, beta_f = py("burn_alpha"), py("burn_beta")
    callers = [py("handler"), py("main")]
    alpha = sum(v for s, v in stacks if python_part(s)[:1] == [alpha_f])
    beta = sum(v for s, v in stacks if python_part(s)[:1] == [beta_f])
    total = sum(v for _, v in stacks)
    samples = (alpha + beta) // (1_000_000_000 // 99)
    assert samples >= 0.6 * 99 * CPU_SECONDS, (samples, total / 1e9, sorted(stacks, key=lambda x: -x[1])[:3],
                                               profiled[release]["log"][-3000:])
    share = alpha / (alpha + beta)
    print(f"{release} python split: {share:.3f} of {samples} samples; own CPU {profiled[release]['cpu']:.2f} s, "
          f"stored {total / 1e9:.2f} s")
    assert abs(share - 0.75) <= 0.07, (share, samples)
    for f in (alpha_f, beta_f):
        under = [python_part(s) for s, _ in stacks if python_part(s)[:1] == [f]]
        assert under and all(u[1:4] == [*callers, f"<module> {BURN}:1"] for u in under), (f, under[:3])
    assert (alpha + beta) / total >= 0.8, (alpha / total, beta / total)
    # no unnamed Python frame (3.13's entry frames are skipped in the kernel)
    assert not [s for s, _ in stacks if "[unknown python] :0" in s], [s for s, _ in stacks if "[unknown python] :0" in s][:3]
