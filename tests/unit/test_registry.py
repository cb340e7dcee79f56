"""Registry rules on a procfs and cgroupfs laid out in a temporary directory, with the clocks
under the test's control: min container age, allow/deny, dead-container bound, opt-outs."""

from __future__ import annotations

import os
from pathlib import Path

from agent.containers.registry import (
    EVENT_EXEC,
    EVENT_EXIT,
    EVENT_FORK,
    EVENT_OOM_KILL,
    PROC_EVENT,
    Registry,
    read_environ_opt_outs,
)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_proc(root: Path, pid: int, unit: str | None, env: dict[str, str] | None = None, comm: str = "app") -> None:
    d = root / "proc" / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + ["4242"] + ["0"] * 20
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    path = f"/system.slice/{unit}" if unit else "/user.slice/user-0.slice/session-1.scope"
    (d / "cgroup").write_text(f"1:cpu:/\n0::{path}\n")
    (d / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in (env or {}).items()))
    cg = root / "cgroup" / "unified" / path.lstrip("/")
    cg.mkdir(parents=True, exist_ok=True)
    os.utime(cg, (1000.0, 1000.0))


def registry(root: Path, **kw: object) -> tuple[Registry, Clock, Clock]:
    (root / "cgroup" / "unified").mkdir(parents=True, exist_ok=True)
    (root / "cgroup" / "unified" / "cgroup.controllers").write_text("")
    (root / "proc").mkdir(exist_ok=True)
    mono, wall = Clock(0.0), Clock(1000.0)
    r = Registry(procfs=str(root / "proc"), cgroupfs=str(root / "cgroup"), clock=mono, wall=wall, **kw)  # type: ignore[arg-type]
    return r, mono, wall


def event(kind: int, pid: int) -> bytes:
    return PROC_EVENT.pack(kind, pid, 1, 0)


def test_min_container_age_hides_young_containers(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, _, wall = registry(tmp_path, min_container_age=30.0)
    r.scan()
    assert r.containers() == [] and r.container_of(10) is None
    wall.t = 1029.9
    assert r.containers() == []
    wall.t = 1030.0
    assert [c.id for c in r.containers()] == ["/system.slice/web.service"]


def test_zero_min_age_reports_at_once(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, _, _ = registry(tmp_path, min_container_age=0)
    r.scan()
    assert r.container_of(10).id == "/system.slice/web.service"  # type: ignore[union-attr]


def test_deny_wins_over_allow(tmp_path: Path) -> None:
    for pid, unit in ((10, "web.service"), (11, "db.service"), (12, "cron.service")):
        make_proc(tmp_path, pid, unit)
    r, _, _ = registry(tmp_path, min_container_age=0, allowlist=["web|db"], denylist=["db"])
    r.scan()
    assert [c.id for c in r.containers()] == ["/system.slice/web.service"]


def test_dead_container_is_forgotten_after_the_bound(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, mono, _ = registry(tmp_path, min_container_age=0, dead_container_ttl=60)
    r.scan()
    r.handle_event(event(EVENT_EXIT, 10))
    assert r.process(10) is None
    mono.t = 59.9
    assert r.housekeeping() == [] and len(r.containers()) == 1
    mono.t = 60.0
    assert r.housekeeping() == ["/system.slice/web.service"] and r.containers() == []


def test_a_new_process_revives_a_dying_container(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, mono, _ = registry(tmp_path, min_container_age=0, dead_container_ttl=60)
    r.scan()
    r.handle_event(event(EVENT_EXIT, 10))
    mono.t = 30
    make_proc(tmp_path, 11, "web.service")
    r.handle_event(event(EVENT_FORK, 11))
    mono.t = 100
    assert r.housekeeping() == []
    assert r.container_of(11).pids == {11}  # type: ignore[union-attr]


def test_exec_rereads_the_environment(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, _, _ = registry(tmp_path, min_container_age=0)
    r.scan()
    assert not r.opted_out(10, "profiling")
    make_proc(tmp_path, 10, "web.service", env={"COROOT_EBPF_PROFILING": "disabled"})
    r.handle_event(event(EVENT_EXEC, 10))
    assert r.opted_out(10, "profiling") and not r.opted_out(10, "traces")


def test_oom_kill_is_counted_on_the_container(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, _, _ = registry(tmp_path, min_container_age=0)
    r.scan()
    r.handle_event(event(EVENT_OOM_KILL, 10))
    r.handle_event(event(EVENT_OOM_KILL, 10))
    r.handle_event(event(EVENT_OOM_KILL, 999))  # unknown pid: ignored
    assert r.container_of(10).oom_kills == 2  # type: ignore[union-attr]


def test_scan_repairs_missed_events(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, _, _ = registry(tmp_path, min_container_age=0)
    r.scan()
    make_proc(tmp_path, 11, None)
    (tmp_path / "proc" / "10" / "stat").unlink()
    for f in (tmp_path / "proc" / "10").iterdir():
        f.unlink()
    (tmp_path / "proc" / "10").rmdir()
    assert r.scan() == 1
    assert r.process(10) is None and r.process(11) is not None
    assert r.process(11).container_id is None  # type: ignore[union-attr]


def test_listeners_hear_processes_come_and_go(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")
    r, _, _ = registry(tmp_path, min_container_age=0)
    heard: list[tuple[str, int]] = []
    r.subscribe(lambda what, p: heard.append((what, p.pid)))
    r.scan()
    r.handle_event(event(EVENT_EXIT, 10))
    assert heard == [("added", 10), ("removed", 10)]


def test_opt_out_parsing() -> None:
    env = b"PATH=/bin\0COROOT_EBPF_PROFILING=disabled\0COROOT_LOG_MONITORING=enabled\0"
    assert read_environ_opt_outs(env) == frozenset({"profiling"})
    assert read_environ_opt_outs(b"XCOROOT_EBPF_TRACES=disabled\0") == frozenset()
    assert read_environ_opt_outs(b"COROOT_EBPF_TRACES=disabled") == frozenset({"traces"})
    assert read_environ_opt_outs(b"") == frozenset()
