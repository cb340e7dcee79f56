"""The restart rule (the node agent's Container.onProcessStart) on a registry over a procfs laid
out in a temporary directory, with process start times under the test's control."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.containers.registry import Registry
from agent.containers.restarts import RestartCounter
from agent.metrics import Families

UNIT = "/system.slice/app.service"


class Procfs:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "cgroup" / "unified").mkdir(parents=True)
        (root / "cgroup" / "unified" / "cgroup.controllers").write_text("")
        (root / "proc").mkdir()

    def add(self, pid: int, start_ticks: int, path: str = UNIT) -> None:
        d = self.root / "proc" / str(pid)
        d.mkdir()
        fields = ["S"] + ["0"] * 18 + [str(start_ticks)] + ["0"] * 20
        (d / "stat").write_text(f"{pid} (app) " + " ".join(fields) + "\n")
        (d / "cgroup").write_text(f"0::{path}\n")
        (d / "environ").write_bytes(b"")
        (self.root / "cgroup" / "unified" / path.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / "proc" / str(pid))


def setup(tmp_path: Path, **kw: float) -> tuple[Procfs, Registry, RestartCounter]:
    fs = Procfs(tmp_path)
    reg = Registry(procfs=str(tmp_path / "proc"), cgroupfs=str(tmp_path / "cgroup"), min_container_age=0, **kw)  # type: ignore[arg-type]
    counter = RestartCounter(reg)
    reg.subscribe(counter.on_process)
    return fs, reg, counter


def restarts(counter: RestartCounter) -> dict[str, float]:
    f = Families({"machine_id": "m"})
    counter.collect(f)
    out = {}
    for fam in f:
        assert fam.type == "counter"
        for s in fam.samples:
            assert s.name == "container_restarts_total"
            assert set(s.labels) == {"machine_id", "container_id", "app_id"}
            out[s.labels["container_id"]] = s.value
    return out


def test_a_fork_is_no_restart_but_a_newcomer_after_the_oldest_process_left_is(tmp_path: Path) -> None:
    fs, reg, counter = setup(tmp_path)
    fs.add(10, 1000)
    reg.add(10)
    assert restarts(counter) == {UNIT: 0}
    fs.add(11, 1500)  # a child while the parent lives
    reg.add(11)
    assert restarts(counter) == {UNIT: 0}
    fs.remove(10)  # the parent goes, the child stays: nothing is decided yet
    reg.remove(10)
    assert restarts(counter) == {UNIT: 0}
    fs.add(12, 1600)  # the next process to join finds the oldest live one newer than the start
    reg.add(12)
    assert restarts(counter) == {UNIT: 1}
    fs.add(13, 1700)  # the start is now 1500: more children are no restart
    reg.add(13)
    assert restarts(counter) == {UNIT: 1}


def test_every_replacement_of_all_processes_counts_once(tmp_path: Path) -> None:
    fs, reg, counter = setup(tmp_path)
    fs.add(10, 1000)
    reg.add(10)
    for n, (pid, start) in enumerate(((20, 2000), (30, 3000), (40, 4000)), start=1):
        prev = pid - 10
        fs.remove(prev)
        reg.remove(prev)
        fs.add(pid, start)
        reg.add(pid)
        assert restarts(counter) == {UNIT: n}
        fs.add(pid + 1, start + 5)  # it forks: no restart
        reg.add(pid + 1)
        fs.remove(pid + 1)
        reg.remove(pid + 1)
        assert restarts(counter) == {UNIT: n}


def test_exec_and_resync_of_a_known_process_are_not_restarts(tmp_path: Path) -> None:
    fs, reg, counter = setup(tmp_path)
    fs.add(10, 1000)
    reg.add(10)
    reg.add(10)  # exec
    reg.scan()
    assert restarts(counter) == {UNIT: 0}


def test_a_replacement_in_the_same_clock_tick_is_not_seen(tmp_path: Path) -> None:
    """Start times are clock ticks (the node agent's are whole seconds): equal is not later."""
    fs, reg, counter = setup(tmp_path)
    fs.add(10, 1000)
    reg.add(10)
    fs.remove(10)
    reg.remove(10)
    fs.add(11, 1000)
    reg.add(11)
    assert restarts(counter) == {UNIT: 0}


def test_processes_known_before_the_counter_listened_are_caught_up_oldest_first(tmp_path: Path) -> None:
    fs = Procfs(tmp_path)
    fs.add(30, 3000)  # a child listed before its parent
    fs.add(10, 1000)
    reg = Registry(procfs=str(tmp_path / "proc"), cgroupfs=str(tmp_path / "cgroup"), min_container_age=0)
    reg.scan()
    counter = RestartCounter(reg)
    reg.subscribe(counter.on_process)
    counter.tick(0.0, [])
    assert restarts(counter) == {UNIT: 0}
    fs.remove(30)
    reg.remove(30)
    fs.add(31, 3100)  # the parent (1000) still lives
    reg.add(31)
    assert restarts(counter) == {UNIT: 0}


def test_containers_are_counted_apart_and_forgotten_with_the_registry(tmp_path: Path) -> None:
    other = "/system.slice/other.service"
    fs, reg, counter = setup(tmp_path, dead_container_ttl=0)
    fs.add(10, 1000)
    fs.add(20, 1000, other)
    reg.scan()
    fs.remove(10)
    reg.remove(10)
    fs.add(11, 1100)
    reg.add(11)
    assert restarts(counter) == {UNIT: 1, other: 0}
    fs.remove(20)
    reg.remove(20)
    gone = reg.housekeeping()
    assert gone == [other]
    counter.tick(1.0, gone)
    assert restarts(counter) == {UNIT: 1}
    fs.add(21, 2000, other)  # the id comes back: a new container, from zero
    reg.add(21)
    assert restarts(counter) == {UNIT: 1, other: 0}
