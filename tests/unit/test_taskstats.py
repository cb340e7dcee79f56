"""Taskstats: decoding the kernel's answer (struct taskstats as laid out in linux/taskstats.h)
and how per-process readings add up to a container's counters. The readings here come from a
scripted stand-in for the netlink client, because unit tests run without CAP_NET_ADMIN; the
real kernel answers in tests/system/test_container_metrics.py."""

from __future__ import annotations

import errno
import shutil
import struct
from pathlib import Path

from agent.containers.registry import Registry
from agent.containers.taskstats import (
    TASKSTATS_TYPE_AGGR_TGID,
    TASKSTATS_TYPE_STATS,
    TASKSTATS_TYPE_TGID,
    DelayCollector,
    Delays,
    TaskstatsClient,
    TaskstatsError,
    parse_attrs,
    parse_stats,
)
from agent.metrics import Families

UNIT = "/system.slice/app.service"


def taskstats_struct(cpu_delay: int, blkio_delay: int, version: int = 16) -> bytes:
    """The head of struct taskstats as the kernel fills it (then padding to its full size)."""
    head = struct.pack("=HxxIBBxxxxxx", version, 0, 0, 0)  # version, ac_exitcode, ac_flag, ac_nice
    head += struct.pack("=QQQQ", 7, cpu_delay, 3, blkio_delay)  # cpu_count, cpu_delay_total, ...
    return head + b"\xee" * (448 - len(head))


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_struct_offsets_of_the_delays() -> None:
    assert len(taskstats_struct(0, 0)[:48]) == 48
    assert parse_stats(taskstats_struct(123_456_789, 42)) == Delays(123_456_789, 42)
    assert parse_stats(taskstats_struct(5, 6, version=8)) == Delays(5, 6)
    assert parse_stats(b"\0" * 47) is None


def test_nested_answer_is_walked_and_a_truncated_attribute_ends_it() -> None:
    inner = nla(TASKSTATS_TYPE_TGID, struct.pack("=I", 99)) + nla(TASKSTATS_TYPE_STATS, taskstats_struct(10, 20))
    answer = nla(TASKSTATS_TYPE_AGGR_TGID | (1 << 15), inner)
    attrs = parse_attrs(answer)
    assert set(attrs) == {TASKSTATS_TYPE_AGGR_TGID}
    nested = parse_attrs(attrs[TASKSTATS_TYPE_AGGR_TGID])
    assert struct.unpack("=I", nested[TASKSTATS_TYPE_TGID]) == (99,)
    assert parse_stats(nested[TASKSTATS_TYPE_STATS]) == Delays(10, 20)
    assert parse_attrs(answer[:-10]) == {}  # its length runs past the data
    assert parse_attrs(b"\x02\x00\x01\x00") == {}  # a length shorter than the header


class Script(TaskstatsClient):
    """Answers from a table the test changes: pid -> Delays, or an errno to raise."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[int, Delays | int] = {}
        self.opened = self.closed = 0

    def open(self) -> None:
        self.opened += 1

    def close(self) -> None:
        self.closed += 1

    def tgid(self, pid: int) -> Delays | None:
        a = self.answers.get(pid)
        if isinstance(a, int):
            raise TaskstatsError(a, "scripted")
        return a


def make_proc(root: Path, pid: int, start: int, path: str = UNIT) -> None:
    d = root / "proc" / str(pid)
    d.mkdir(parents=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 20
    (d / "stat").write_text(f"{pid} (app) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(f"0::{path}\n")
    (root / "cgroup" / "unified" / path.lstrip("/")).mkdir(parents=True, exist_ok=True)


def setup(tmp_path: Path) -> tuple[Registry, Script, DelayCollector]:
    (tmp_path / "cgroup" / "unified").mkdir(parents=True)
    (tmp_path / "cgroup" / "unified" / "cgroup.controllers").write_text("")
    (tmp_path / "proc").mkdir()
    reg = Registry(procfs=str(tmp_path / "proc"), cgroupfs=str(tmp_path / "cgroup"), min_container_age=0,
                   dead_container_ttl=0)
    client = Script()
    c = DelayCollector(reg, interval=5.0, client=client)
    c.attach(None)
    return reg, client, c


def sums(c: DelayCollector) -> dict[str, tuple[float, float]]:
    f = Families({"machine_id": "m"})
    c.collect(f)
    got: dict[str, dict[str, float]] = {}
    for fam in f:
        assert fam.type == "counter"
        for s in fam.samples:
            assert set(s.labels) == {"machine_id", "container_id", "app_id"}
            got.setdefault(s.labels["container_id"], {})[s.name] = s.value
    return {cid: (v["container_resources_cpu_delay_seconds_total"], v["container_resources_disk_delay_seconds_total"])
            for cid, v in got.items()}


def test_container_counter_adds_each_process_growth_and_keeps_what_exited_processes_gave(tmp_path: Path) -> None:
    reg, client, c = setup(tmp_path)
    make_proc(tmp_path, 10, 100)
    make_proc(tmp_path, 11, 200)
    reg.scan()
    assert sums(c) == {}  # no reading yet: no series
    client.answers = {10: Delays(1_000_000_000, 0), 11: Delays(500_000_000, 250_000_000)}
    c.tick(0.0, [])
    assert sums(c) == {UNIT: (1.5, 0.25)}
    client.answers = {10: Delays(1_200_000_000, 0), 11: Delays(600_000_000, 250_000_000)}
    c.tick(4.9, [])  # before the interval: no reading
    assert sums(c) == {UNIT: (1.5, 0.25)}
    c.tick(5.0, [])
    assert sums(c) == {UNIT: (1.8, 0.25)}
    # 11 exits: what it gave stays. 10 is gone before the kernel answers: no change from it.
    shutil.rmtree(tmp_path / "proc" / "11")
    reg.remove(11)
    client.answers = {10: None}  # type: ignore[dict-item]
    c.tick(10.0, [])
    assert sums(c) == {UNIT: (1.8, 0.25)}
    # The pid comes back as a new process (another start time): all of its delay is new.
    shutil.rmtree(tmp_path / "proc" / "10")
    reg.remove(10)
    make_proc(tmp_path, 10, 900)
    reg.add(10)
    client.answers = {10: Delays(100_000_000, 0)}
    c.tick(15.0, [])
    assert sums(c) == {UNIT: (1.9, 0.25)}
    assert c.queries == 6 and c.errors == 0


def test_forgotten_containers_lose_their_series(tmp_path: Path) -> None:
    reg, client, c = setup(tmp_path)
    make_proc(tmp_path, 10, 100)
    reg.scan()
    client.answers = {10: Delays(1, 2)}
    c.tick(0.0, [])
    assert set(sums(c)) == {UNIT}
    shutil.rmtree(tmp_path / "proc" / "10")
    reg.remove(10)
    c.tick(1.0, reg.housekeeping())
    assert sums(c) == {}


def test_a_refusal_stops_the_readings_and_other_errors_skip_one_process(tmp_path: Path) -> None:
    reg, client, c = setup(tmp_path)
    make_proc(tmp_path, 10, 100)
    make_proc(tmp_path, 11, 100)
    reg.scan()
    client.answers = {10: errno.EINVAL, 11: Delays(2_000_000_000, 0)}
    c.tick(0.0, [])
    assert sums(c) == {UNIT: (2.0, 0.0)} and c.errors == 1
    client.answers = {10: errno.EPERM, 11: errno.EPERM}
    c.tick(5.0, [])
    assert c.errors == 2 and client.closed == 1
    assert sums(c) == {UNIT: (2.0, 0.0)}
    queries = c.queries
    c.tick(10.0, [])
    assert c.queries == queries  # stopped


def test_a_kernel_without_taskstats_gives_no_series(tmp_path: Path) -> None:
    class Missing(Script):
        def open(self) -> None:
            raise TaskstatsError(errno.ENOENT, "no TASKSTATS family")

    (tmp_path / "cgroup" / "unified").mkdir(parents=True)
    (tmp_path / "cgroup" / "unified" / "cgroup.controllers").write_text("")
    (tmp_path / "proc").mkdir()
    make_proc(tmp_path, 10, 100)
    reg = Registry(procfs=str(tmp_path / "proc"), cgroupfs=str(tmp_path / "cgroup"), min_container_age=0)
    reg.scan()
    client = Missing()
    c = DelayCollector(reg, interval=0, client=client)
    c.attach(None)
    c.tick(0.0, [])
    assert sums(c) == {} and c.queries == 0
