"""Registry rules on a procfs and cgroupfs laid out in a temporary directory, with the clocks
under the test's control: min container age, allow/deny, dead-container bound, opt-outs."""

from __future__ import annotations

import os
from pathlib import Path

from agent.containers.cgroup import CgroupIds
from agent.containers.registry import (
    EVENT_EXEC,
    EVENT_EXIT,
    EVENT_FORK,
    EVENT_OOM_KILL,
    PROC_EVENT,
    Registry,
    read_environ_opt_outs,
    rekey,
)
from agent.containers.runtimes import ContainerMetadata


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


def event(kind: int, pid: int, cgroup: int = 0, comm: bytes = b"") -> bytes:
    return PROC_EVENT.pack(kind, pid, 1, 0, cgroup, comm)


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


# ------------------------------------------------------------ runtime names ---

WEB = "a" * 64
WEB2 = "b" * 64
PAUSE = "c" * 64
POD_UID = "8712f785-1a3e-41ec-a00b-e2dcc77431cb"


def make_k8s_proc(root: Path, pid: int, runtime_id: str, start: int = 4242) -> str:
    """A process in the cgroup kubelet's systemd driver makes for a containerd container."""
    u = POD_UID.replace("-", "_")
    path = (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/"
            f"cri-containerd-{runtime_id}.scope")
    d = root / "proc" / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 20
    (d / "stat").write_text(f"{pid} (app) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(f"0::{path}\n")
    (d / "environ").write_bytes(b"")
    cg = root / "cgroup" / "unified" / path.lstrip("/")
    cg.mkdir(parents=True, exist_ok=True)
    os.utime(cg, (1000.0 + start, 1000.0 + start))
    return f"/k8s-cgroup/{POD_UID}/{runtime_id[:12]}"


class FakeResolver:
    """Stands in for RuntimeResolver (its own tests, unit and against real runtimes, are in
    test_runtimes.py): records requests; the test plays the runtime's answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.forgotten: list[str] = []
        self.cache: dict[str, ContainerMetadata] = {}
        self.listeners: list = []

    def request(self, runtime_id: str, runtime_hint: str | None = None) -> None:
        self.requests.append((runtime_id, runtime_hint))

    def get(self, runtime_id: str) -> ContainerMetadata | None:
        return self.cache.get(runtime_id)

    def forget(self, runtime_id: str) -> None:
        self.forgotten.append(runtime_id)

    def subscribe(self, listener) -> None:  # noqa: ANN001
        self.listeners.append(listener)

    def answer(self, runtime_id: str, cid: str | None, sandbox: bool = False, image: str = "") -> None:
        md = ContainerMetadata(runtime="containerd", runtime_id=runtime_id, id=cid, sandbox=sandbox, image=image)
        self.cache[runtime_id] = md
        for cb in self.listeners:
            cb(runtime_id, md)


def test_a_runtime_container_is_asked_for_once_and_renamed_at_housekeeping(tmp_path: Path) -> None:
    derived = make_k8s_proc(tmp_path, 10, WEB)
    make_k8s_proc(tmp_path, 11, WEB)
    r, _, _ = registry(tmp_path, min_container_age=0)
    res = FakeResolver()
    r.use_resolver(res)
    renames: list[tuple[str, str]] = []
    r.subscribe_renames(lambda old, new: renames.append((old, new)))
    r.scan()
    r.scan()
    assert res.requests == [(WEB, "cri-containerd")]
    assert r.container_of(10).id == derived  # type: ignore[union-attr]
    res.answer(WEB, "/k8s/shop/web-7d9f8b6c5d-x2k4p/web", image="nginx:1.25")
    assert r.container_of(10).id == derived, "renamed on the poll thread only"  # type: ignore[union-attr]
    assert r.housekeeping() == []
    c = r.container_of(10)
    assert c is not None and (c.id, c.app_id, c.image) == ("/k8s/shop/web-7d9f8b6c5d-x2k4p/web", "/k8s/shop/web", "nginx:1.25")
    assert r.process(11).container_id == c.id and c.pids == {10, 11}  # type: ignore[union-attr]
    assert renames == [(derived, c.id)] and r.container(derived) is None
    make_k8s_proc(tmp_path, 12, WEB)  # a new process of the renamed container
    r.handle_event(event(EVENT_FORK, 12))
    assert r.process(12).container_id == c.id and c.pids == {10, 11, 12}  # type: ignore[union-attr]
    assert res.requests == [(WEB, "cri-containerd")]


def test_a_pod_sandbox_is_never_reported_once_the_runtime_says_so(tmp_path: Path) -> None:
    make_k8s_proc(tmp_path, 10, PAUSE)
    r, _, _ = registry(tmp_path, min_container_age=0)
    res = FakeResolver()
    r.use_resolver(res)
    r.scan()
    res.answer(PAUSE, None, sandbox=True)
    r.housekeeping()
    assert r.containers() == [] and r.container_of(10) is None


def test_no_answer_keeps_the_cgroup_derived_id_and_a_forgotten_container_is_forgotten_by_the_resolver(
        tmp_path: Path) -> None:
    derived = make_k8s_proc(tmp_path, 10, WEB)
    r, mono, _ = registry(tmp_path, min_container_age=0, dead_container_ttl=60)
    res = FakeResolver()
    r.use_resolver(res)
    r.scan()
    r.housekeeping()
    assert [c.id for c in r.containers()] == [derived]
    r.handle_event(event(EVENT_EXIT, 10))
    mono.t = 60
    assert r.housekeeping() == [derived] and res.forgotten == [WEB]


def test_a_restarted_kubernetes_container_joins_its_previous_run_under_one_id(tmp_path: Path) -> None:
    make_k8s_proc(tmp_path, 10, WEB, start=100)
    r, _, _ = registry(tmp_path, min_container_age=0)
    res = FakeResolver()
    r.use_resolver(res)
    renames: list[tuple[str, str]] = []
    r.subscribe_renames(lambda old, new: renames.append((old, new)))
    r.scan()
    res.answer(WEB, "/k8s/shop/db-0/postgres")
    r.housekeeping()
    r.handle_event(event(EVENT_OOM_KILL, 10))
    r.handle_event(event(EVENT_EXIT, 10))
    derived2 = make_k8s_proc(tmp_path, 20, WEB2, start=200)  # the kubelet's next attempt: a new cgroup
    r.handle_event(event(EVENT_FORK, 20))
    assert r.container_of(20).id == derived2  # type: ignore[union-attr]
    res.answer(WEB2, "/k8s/shop/db-0/postgres")
    r.housekeeping()
    [c] = r.containers()
    assert (c.id, c.pids, c.oom_kills, c.dead_since, c.runtime_id) == ("/k8s/shop/db-0/postgres", {20}, 1, None, WEB2)
    assert c.cgroup_path.endswith(f"cri-containerd-{WEB2}.scope")  # the newer cgroup's counters
    assert c.created_at == 1100.0  # as old as its first run: min_container_age does not hide it again
    assert renames[-1] == (derived2, "/k8s/shop/db-0/postgres")


def test_rekey_moves_and_merges_entries_of_one_container() -> None:
    d = {("/a", "x"): 1, ("/b", "x"): 2, ("/a", "y"): 3}
    rekey(d, "/a", "/b", lambda kept, moved: kept + moved)
    assert d == {("/b", "x"): 3, ("/b", "y"): 3}
    s = {"/a": 1, "/c": 5}
    rekey(s, "/a", "/c")
    assert s == {"/c": 1}


def test_components_re_key_what_they_counted_adding_to_the_new_ids_counts(tmp_path: Path) -> None:
    """TCP totals, open connections and L7/DNS counts of the old id move to the new one and add
    up with what the new id had: nothing lost, nothing counted twice."""
    from agent.l7 import contract
    from agent.l7.dns import Dns
    from agent.l7.hist import Hist
    from agent.l7.tracer import L7Tracer
    from agent.net.public import PublicFilter
    from agent.net.tcp import Conn, TcpTracker

    r, _, _ = registry(tmp_path, min_container_age=0)
    tcp = TcpTracker(r, PublicFilter(["0.0.0.0/0"]), (32768, 60999), procfs=str(tmp_path / "proc"))
    key_old, key_new = ("/k8s-cgroup/u/aaaa", "10.0.0.1:80", "10.0.0.1:80"), ("/k8s/ns/p/c", "10.0.0.1:80", "10.0.0.1:80")
    tcp._connects[key_old] = [5, 0.5]
    tcp._connects[key_new] = [2, 0.25]
    tcp._failed[("/k8s-cgroup/u/aaaa", "10.0.0.2:80")] = 1
    conn = Conn(10, 3, "/k8s-cgroup/u/aaaa", "10.0.0.9", 40000, "10.0.0.1", 80, "10.0.0.1:80")
    tcp._conns[(10, 3)] = conn
    tcp._pending_connects.append((conn, 0.1, 0))
    tcp.on_rename("/k8s-cgroup/u/aaaa", "/k8s/ns/p/c")
    assert dict(tcp._connects) == {key_new: [7, 0.75]}
    assert dict(tcp._failed) == {("/k8s/ns/p/c", "10.0.0.2:80"): 1}
    assert conn.container_id == "/k8s/ns/p/c"
    tcp.resolve_pending()  # the pending connect is counted under the new id
    assert tcp._connects[key_new][0] == 8

    l7 = L7Tracer(r, tcp, None)
    h = Hist()
    h.observe(0.01)
    l7._in[("/k8s-cgroup/u/aaaa", 1, "200")] = h
    h2 = Hist()
    h2.observe(0.02)
    l7._in[("/k8s/ns/p/c", 1, "200")] = h2
    dns = l7.plugins[contract.DNS]
    assert isinstance(dns, Dns)
    dns._counts[("/k8s-cgroup/u/aaaa", "TypeA", "db", "ok")] = 3
    l7.on_rename("/k8s-cgroup/u/aaaa", "/k8s/ns/p/c")
    assert list(l7._in) == [("/k8s/ns/p/c", 1, "200")] and l7._in[("/k8s/ns/p/c", 1, "200")].count == 2
    assert dict(dns._counts) == {("/k8s/ns/p/c", "TypeA", "db", "ok"): 3}


def test_a_restarted_container_joining_its_previous_run_counts_one_restart(tmp_path: Path) -> None:
    from agent.containers.registry import Process
    from agent.containers.restarts import RestartCounter

    r, _, _ = registry(tmp_path, min_container_age=0)
    rc = RestartCounter(r)
    rc.on_process("added", Process(10, 100, "pg", "/a", "/k8s/ns/db-0/pg", frozenset()))
    rc.on_process("removed", Process(10, 100, "pg", "/a", "/k8s/ns/db-0/pg", frozenset()))
    rc.on_process("added", Process(20, 200, "pg", "/b", "/k8s-cgroup/u/bbbb", frozenset()))
    rc.on_rename("/k8s-cgroup/u/bbbb", "/k8s/ns/db-0/pg")
    assert rc.restarts("/k8s/ns/db-0/pg") == 1 and rc.restarts("/k8s-cgroup/u/bbbb") == 0


def test_logs_follow_a_renamed_container_without_a_second_tailer_or_a_lost_count(tmp_path: Path) -> None:
    import json

    from agent.logs.collector import LogCollector

    r, _, _ = registry(tmp_path, min_container_age=0)
    docker_dir = tmp_path / "docker"
    cid = "d" * 64
    (docker_dir / cid).mkdir(parents=True)
    log_file = docker_dir / cid / f"{cid}-json.log"
    log_file.write_text("")
    logs = LogCollector(r, None, pods_dir=str(tmp_path / "pods"), docker_dir=str(docker_dir), journald=False)

    def line(text: str) -> None:
        with open(log_file, "a") as f:
            f.write(json.dumps({"log": text + "\n", "stream": "stdout", "time": "2026-12-04T10:00:00.000000001Z"}) + "\n")

    logs.scan()
    line("ERROR one")
    logs.pump()
    logs.flush()
    assert [(k[0], v[0][0]) for k, v in logs._counts.items()] == [(f"/docker/{cid[:12]}", 1)]
    logs.on_rename(f"/docker/{cid[:12]}", "/docker/shop-api")
    logs._apply_renames()
    logs.scan()  # the walk finds the file again: followed already, under the new id
    assert [s.container_id for s in logs._sources.values()] == ["/docker/shop-api"]
    line("ERROR one")
    logs.pump()
    logs.flush()
    assert [(k[0], v[0][0]) for k, v in logs._counts.items()] == [("/docker/shop-api", 2)]
    logs.close()


def test_a_process_gone_before_it_was_read_gets_its_container_from_its_event(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, "web.service")  # makes the cgroup directory
    r, _, wall = registry(tmp_path)
    wall.t += 60
    cg = tmp_path / "cgroup" / "unified" / "system.slice" / "web.service"
    # pid 77 forked and exec'd curl in web.service and exited before the events were read
    r.handle_event(event(EVENT_FORK, 77, cg.stat().st_ino, b"sh"))
    p = r.process(77)
    assert p is not None and p.provisional  # a fork's cgroup is its parent's: an exec may move it
    r.handle_event(event(EVENT_EXEC, 77, cg.stat().st_ino, b"curl\0\0\0"))
    p = r.process(77)
    assert p is not None and (p.comm, p.container_id, p.opt_out, p.provisional) == (
        "curl", "/system.slice/web.service", frozenset(), False)
    r.handle_event(event(EVENT_EXIT, 77))
    c = r.container_of_recent(77)
    assert c is not None and c.id == "/system.slice/web.service" and r.from_event == 2
    # an id no cgroup directory has (or 0, a kernel without cgroup v2): nothing is made up
    r.handle_event(event(EVENT_EXEC, 78, 999_999_999, b"x"))
    r.handle_event(event(EVENT_EXEC, 79, 0, b"x"))
    assert r.process(78) is None and r.process(79) is None and r.from_event == 2


def test_cgroup_ids_walk_again_for_an_id_asked_after_the_last_walk_then_every_rescan(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    clock = Clock(0.0)
    ids = CgroupIds(str(tmp_path), rescan=1.0, clock=clock, burst=3)
    assert ids.path((tmp_path / "a" / "b").stat().st_ino) == "/a/b" and ids.walks == 1
    assert ids.path((tmp_path / "a").stat().st_ino) == "/a" and ids.walks == 1  # a hit: no walk
    # a cgroup made after the last walk (a new container's client), asked for within the
    # second: its first ask walks again
    (tmp_path / "c").mkdir()
    c = (tmp_path / "c").stat().st_ino
    clock.t = 0.1
    assert ids.path(c) == "/c" and ids.walks == 2
    # an id no directory has: one walk for its first ask, none for the next ones until rescan
    clock.t = 0.2
    assert ids.path(999_999_999) is None and ids.walks == 3
    clock.t = 0.3
    assert ids.path(999_999_999) is None and ids.walks == 3
    # at most `burst` walks a second: a fourth within it waits for rescan
    (tmp_path / "d").mkdir()
    d = (tmp_path / "d").stat().st_ino
    assert ids.path(d) is None and ids.walks == 3
    clock.t = 1.2
    assert ids.path(d) == "/d" and ids.walks == 4
    assert CgroupIds(None).path(c) is None and ids.path(0) is None
    small = CgroupIds(str(tmp_path), limit=1, clock=clock)
    assert small.path((tmp_path / "c").stat().st_ino) in ("/c", None) and len(small._paths) == 1
