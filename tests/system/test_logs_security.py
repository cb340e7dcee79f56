"""Log discovery follows only real log files: attacks by a local user (nobody, in a test cgroup
"container") that name a root-only file or a FIFO through /var/log. The agent is the real one
with real BPF; the root-only file is one the test makes, with a marker no other file holds.
Each attack asserts the refusal (counted by reason, exactly), that the marker is nowhere (not in
otel_logs, not in the metrics table, not in /metrics), and that a log line a normal container
writes afterwards is still counted exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.ebpf import headers, loader, tracefs
from agent.logs import safeopen
from agent.logs.collector import LogOpen, decode_open
from tests.system.helpers import (
    NOBODY,
    NOBODY_UID,
    AgentProcess,
    LogWriter,
    Responsiveness,
    TestCgroups,
    log_counts,
    rows,
    wait_for,
)

pytestmark = [pytest.mark.agent_args("--scrape-interval", "1s"), pytest.mark.agent_without("profiling", "l7")]

# The attacker: JSON commands on stdin, one JSON answer per line ({"errno": N} when refused).
ATTACKER = r"""
import json, os, sys, threading
held, blocked = {}, []
def bg_open(path, flags):
    blocked.append(path)
    os.open(path, flags)
    blocked.remove(path)
for line in sys.stdin:
    c = json.loads(line)
    op, out = c["op"], {}
    try:
        if op == "open":
            out["fd"] = held[c["path"]] = os.open(c["path"], c["flags"], 0o644)
        elif op == "open_blocking":
            threading.Thread(target=bg_open, args=(c["path"], c["flags"]), daemon=True).start()
        elif op == "blocked":
            out["blocked"] = list(blocked)
        elif op == "write":
            os.write(held[c["path"]], c["text"].encode())
        elif op == "symlink":
            os.symlink(c["target"], c["path"])
        elif op == "mkfifo":
            os.mkfifo(c["path"])
        elif op == "rename":
            os.rename(c["path"], c["to"])
        elif op == "unlink":
            os.unlink(c["path"])
    except OSError as e:
        out["errno"] = e.errno
    print(json.dumps(out), flush=True)
"""


class Attacker:
    """A process of user nobody inside a test cgroup."""

    def __init__(self, cgroups: TestCgroups, cid: str) -> None:
        self.p = cgroups.spawn(cid, [*NOBODY, sys.executable, "-c", ATTACKER],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, op: str, **kw: object) -> dict:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"the attacker exited with {self.p.poll()}"
        return json.loads(line)


@dataclass
class Scene:
    marker: str  # in the root-only file only
    secret: str  # /root/ca-secret-<uuid>, 0600 root
    logdir: str  # /var/log/ca-sec-<uuid>, owned by nobody
    outside: str  # a file nobody owns outside /var/log, holding a second marker
    outside_marker: str


@pytest.fixture
def scene() -> Iterator[Scene]:
    tag = uuid.uuid4().hex
    marker, outside_marker = f"camarker{tag}", f"caoutside{tag}"
    secret = f"/root/ca-secret-{tag}"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, "".join(f"ERROR {marker} line {i}\n" for i in range(5)).encode())
    os.close(fd)
    logdir = f"/var/log/ca-sec-{tag[:12]}"
    os.mkdir(logdir, 0o755)
    os.chown(logdir, NOBODY_UID, NOBODY_UID)
    outdir = f"/tmp/ca-sec-{tag[:12]}"
    os.mkdir(outdir, 0o755)
    outside = f"{outdir}/own.log"
    with open(outside, "w") as f:
        f.write(f"ERROR {outside_marker} before\n")
    for p in (outdir, outside):
        os.chown(p, NOBODY_UID, NOBODY_UID)
    yield Scene(marker, secret, logdir, outside, outside_marker)
    os.unlink(secret)
    shutil.rmtree(logdir)
    shutil.rmtree(outdir)


def refused(agent: AgentProcess) -> dict[str, float]:
    return {lb["reason"]: v for n, lb, v in agent.metrics() if n == "coroot_agent_log_files_refused_total"}


def assert_nowhere(agent: AgentProcess, *markers: str) -> None:
    """Not in otel_logs, not in the metrics table, not in /metrics. The store's checks are not
    vacuous: the legitimate container's rows and metric history are there (checked by callers)."""
    text = agent.get("/metrics")
    for m in markers:
        assert m not in text
        assert rows(agent, f"SELECT count() AS c FROM otel_logs WHERE position(Body, '{m}') > 0") == [{"c": 0}]
        assert rows(agent, f"SELECT count() AS c FROM metrics WHERE position(toString(Labels), '{m}') > 0") == [{"c": 0}]


def legit_lines_are_counted_exactly(agent: AgentProcess, cgroups: TestCgroups) -> None:
    """After an attack: a normal container's 10 ERROR lines are 10, in /metrics, the store and
    the metrics table."""
    cid = cgroups.create("sec-legit")
    path = f"/var/log/ca-legit-{uuid.uuid4().hex[:8]}.log"
    w = LogWriter(cgroups, cid)
    try:
        w(f"open {path}")
        w("lines 10 ERROR legit request {i} failed")
        assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 10, 10), log_counts(agent, cid)
        time.sleep(0.5)
        assert sum(log_counts(agent, cid).values()) == 10
        assert wait_for(lambda: rows(agent, f"SELECT count() AS c FROM otel_logs WHERE ResourceAttributes"
                                            f"['container.id'] = '{cid}'") == [{"c": 10}], 10)
        assert wait_for(lambda: rows(agent, "SELECT count() > 0 AS c FROM metrics WHERE MetricName = "
                                            f"'container_log_messages_total' AND Labels['container_id'] = '{cid}'")
                        == [{"c": 1}], 10)
    finally:
        w.close()
        os.unlink(path)


def test_a_refused_open_through_dotdot_is_not_followed(agent: AgentProcess, cgroups: TestCgroups, scene: Scene) -> None:
    before = refused(agent)
    a = Attacker(cgroups, cgroups.create("sec-dotdot"))
    via = "/var/log/../.." + scene.secret
    for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDWR):
        assert a("open", path=via, flags=flags) == {"errno": 13}  # EACCES: nothing was opened
    time.sleep(1)
    assert_nowhere(agent, scene.marker)
    legit_lines_are_counted_exactly(agent, cgroups)
    assert refused(agent) == before  # no event at all: the kernel side reports successful opens only
    assert_nowhere(agent, scene.marker)


def test_a_successful_open_through_dotdot_is_refused_by_the_event_path(
        agent: AgentProcess, cgroups: TestCgroups, scene: Scene) -> None:
    """A path with `..` is refused before it is resolved, even when it names a real log file;
    the file itself is still found by the rescan of open descriptors, by its real path."""
    before = refused(agent)
    cid = cgroups.create("sec-dotdot-ok")
    a = Attacker(cgroups, cid)
    real = f"{scene.logdir}/app.log"
    via = f"/var/log/../log/{os.path.basename(scene.logdir)}/app.log"
    assert "fd" in a("open", path=via, flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert wait_for(lambda: refused(agent).get("dotdot", 0) == before.get("dotdot", 0) + 1, 5), refused(agent)
    a("write", path=via, text="".join(f"ERROR app line {i}\n" for i in range(7)))
    # The rescan (every 5 s) finds the descriptor; its path from the kernel has no `..`.
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 7, 15), log_counts(agent, cid)
    assert {lb["source"] for n, lb, _ in agent.metrics()
            if n == "container_log_messages_total" and lb.get("container_id") == cid} == {real}
    legit_lines_are_counted_exactly(agent, cgroups)


def test_a_symlink_under_var_log_to_a_file_outside_is_not_followed(
        agent: AgentProcess, cgroups: TestCgroups, scene: Scene) -> None:
    before = refused(agent)
    cid = cgroups.create("sec-symlink")
    a = Attacker(cgroups, cid)
    evil, out = f"{scene.logdir}/evil.log", f"{scene.logdir}/out.log"
    assert a("symlink", target=scene.secret, path=evil) == {}
    assert a("open", path=evil, flags=os.O_WRONLY | os.O_APPEND) == {"errno": 13}
    # A file the attacker may open (its own, outside /var/log): the open succeeds, the kernel's
    # path of the descriptor is outside /var/log, refused.
    assert a("symlink", target=scene.outside, path=out) == {}
    assert "fd" in a("open", path=out, flags=os.O_WRONLY | os.O_APPEND)
    a("write", path=out, text=f"ERROR {scene.outside_marker} after\n")
    assert wait_for(lambda: refused(agent).get("outside", 0) == before.get("outside", 0) + 1, 5), refused(agent)
    time.sleep(6)  # past a rescan of open descriptors: still nothing from this container
    assert log_counts(agent, cid) == {}
    assert refused(agent).get("outside", 0) == before.get("outside", 0) + 1
    legit_lines_are_counted_exactly(agent, cgroups)
    assert_nowhere(agent, scene.marker, scene.outside_marker)


def test_a_fifo_under_var_log_is_never_opened_and_the_agent_keeps_answering(
        agent: AgentProcess, cgroups: TestCgroups, scene: Scene) -> None:
    before = refused(agent)
    cid = cgroups.create("sec-fifo")
    a = Attacker(cgroups, cid)
    lone, waited, held = (f"{scene.logdir}/{n}.log" for n in ("lone", "waited", "held"))
    assert [a("mkfifo", path=p) for p in (lone, waited, held)] == [{}, {}, {}]
    # No writer will ever come to `lone`: an agent that opened it for reading would hang there.
    assert a("open", path=lone, flags=os.O_WRONLY | os.O_NONBLOCK) == {"errno": 6}  # ENXIO: no reader
    a("open_blocking", path=waited, flags=os.O_WRONLY)  # waits for a reader: the agent must not be one
    assert "fd" in a("open", path=held, flags=os.O_RDWR)  # succeeds: an event with a FIFO's descriptor
    # Through the attack, past a rescan of open descriptors: the agent answers /healthz and
    # /metrics in time (an agent blocked on a FIFO's open would answer neither).
    with Responsiveness(agent.port):
        time.sleep(7)
    assert a("blocked") == {"blocked": [waited]}  # nobody opened the FIFO's read end
    assert refused(agent).get("not_regular", 0) == before.get("not_regular", 0) + 1  # the event, once
    legit_lines_are_counted_exactly(agent, cgroups)
    assert log_counts(agent, cid) == {}


def test_a_rotated_path_swapped_for_a_symlink_or_a_fifo_is_not_followed(
        agent: AgentProcess, cgroups: TestCgroups, scene: Scene) -> None:
    before = refused(agent)
    cid = cgroups.create("sec-rotate")
    a = Attacker(cgroups, cid)
    log = f"{scene.logdir}/rot.log"
    assert "fd" in a("open", path=log, flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    a("write", path=log, text="".join(f"ERROR rot first {i}\n" for i in range(5)))
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 5, 10), log_counts(agent, cid)
    # "Rotation": the path now names the root-only file; the old file keeps being written.
    assert a("rename", path=log, to=log + ".1") == {}
    assert a("symlink", target=scene.secret, path=log) == {}
    a("write", path=log, text="".join(f"ERROR rot old file {i}\n" for i in range(3)))
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 8, 10), log_counts(agent, cid)
    time.sleep(1)
    # ... then a FIFO.
    assert a("unlink", path=log) == {}
    assert a("mkfifo", path=log) == {}
    a("write", path=log, text="".join(f"ERROR rot old file again {i}\n" for i in range(2)))
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 10, 10), log_counts(agent, cid)
    assert wait_for(lambda: refused(agent).get("rotation", 0) == before.get("rotation", 0) + 1, 5), refused(agent)
    time.sleep(1)
    assert sum(log_counts(agent, cid).values()) == 10
    assert refused(agent).get("rotation", 0) == before.get("rotation", 0) + 1  # refused once, not on every poll
    legit_lines_are_counted_exactly(agent, cgroups)
    assert_nowhere(agent, scene.marker)


def test_the_open_event_queue_drops_nothing_under_normal_load(agent: AgentProcess) -> None:
    dropped = agent.value("coroot_agent_dropped_events_total", what="log_open")
    assert dropped == 0


def test_the_kernel_side_reports_successful_opens_for_writing_under_var_log_only(scene: Scene) -> None:
    """bpf/logs.c on its own: the fd the call returned, nothing for a refused, read-only or
    elsewhere open; no call left behind in the in-flight map. openat2 too (CA_LOGS_OPENAT2,
    which the loader sets where the tracepoint exists, as it does on this kernel)."""
    assert tracefs.ensure_mounted().ok
    assert os.path.isdir(f"{tracefs.TRACEFS}/events/syscalls/sys_enter_openat2")  # this kernel has it
    assert loader.feature_defines().get("CA_LOGS_OPENAT2") == 1
    events: list[LogOpen] = []
    loaded = loader.load(["logs"], {"log_events": lambda raw: events.append(decode_open(raw))}, headers.resolve())
    me = os.getpid()
    fds = []
    try:
        path = f"{scene.logdir}/kernel.log"
        fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        fds.append(os.open(path, os.O_RDONLY))  # read only: nothing
        with pytest.raises(FileNotFoundError):  # refused: nothing
            os.open(f"/var/log/../../root/ca-missing-{uuid.uuid4().hex}", os.O_WRONLY)
        fds.append(os.open(f"{scene.outside}", os.O_WRONLY | os.O_APPEND))  # not under /var/log: nothing
        fds.append(safeopen._openat2(-100, path, os.O_RDWR, 0))  # AT_FDCWD; an event only with openat2
        # EACCES, from a process of user nobody: nothing either
        r = subprocess.run([*NOBODY, sys.executable, "-c", f"import os; os.open('/var/log/../..{scene.secret}', 1)"],
                           capture_output=True, text=True)
        assert "PermissionError" in r.stderr
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            loaded.poll(100)
        want = [LogOpen(me, fds[0], path), LogOpen(me, fds[3], path)]
        assert [e for e in events if e is not None and e.pid == me] == want
        assert not any(e is not None and scene.secret in e.path for e in events)
        calls = loaded.map("log_open_calls")
        assert [k.value for k in calls.keys() if k.value >> 32 == me] == []
        assert loaded.lost() == {"log_events": 0}
    finally:
        for fd in fds:
            os.close(fd)
        loaded.close()
