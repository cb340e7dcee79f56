"""ZooKeeper against a real server (Debian's zookeeperd: its jar, started by the module with its
own config, data directory and port under /tmp, in a test cgroup): jute clients on the wire
(tests/system/workloads/zookeeper_client.py) in test cgroups open a session and send creates,
getData and exists requests (some answered NoNode, some BadArguments) and pings; the agent
counts exactly what each sent and the server answered, on both sides, as the node agent does:
container_zookeeper_requests_total{status} for the client's container and its destination,
container_zookeeper_inbound_requests_total{status} for the server's, "failed" for system errors
(BadArguments) and "ok" for the rest (NoNode included); the session's ConnectRequest is not a
request. One span per client request, named after the op, with its path and err."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.system.helpers import (
    REPO,
    AgentProcess,
    TestCgroups,
    free_port,
    rows,
    wait_for,
    wait_port,
)
from tests.system.workloads.zookeeper_client import Session

CLIENT = [sys.executable, "-m", "tests.system.workloads.zookeeper_client"]
JAR = "/usr/share/java/zookeeper.jar"  # Debian's zookeeper package (zookeeperd depends on it)
OUT, IN = "container_zookeeper_requests_total", "container_zookeeper_inbound_requests_total"


def by_status(agent: AgentProcess, name: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, lb, v in agent.metrics():
        if n == name and labels.items() <= lb.items():
            out[lb["status"]] = out.get(lb["status"], 0) + v
    return out


def wait_counts(agent: AgentProcess, name: str, total: int, **labels: str) -> dict[str, float]:
    got: dict[str, float] = {}

    def done() -> bool:
        nonlocal got
        got = by_status(agent, name, **labels)
        return sum(got.values()) >= total

    wait_for(done, 30, interval=0.2)
    time.sleep(1)  # and nothing more comes
    return by_status(agent, name, **labels)


def diagnosis(agent: AgentProcess) -> dict[str, float]:
    """The agent's own L7 counters (kernel pairs, replaced requests, lost events), for a failure's message."""
    return {f"{n}{{{lb.get('what', '')}}}": v for n, lb, v in agent.metrics()
            if n.startswith("coroot_agent_l7_") or n == "coroot_agent_lost_events_total"}


def histogram_count(agent: AgentProcess, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in agent.metrics() if n == name + "_count" and labels.items() <= lb.items())


@pytest.fixture(scope="module")
def zookeeper(agent: AgentProcess) -> Iterator[tuple[int, str]]:
    """ZooKeeper standalone on loopback in its own cgroup, as Debian's init script runs it
    (QuorumPeerMain): (port, container id)."""
    assert os.path.exists(JAR), f"{JAR} is missing: apt-get install zookeeperd"
    cg = TestCgroups()
    cid = cg.create("zookeeper")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ca-zk-")
    os.mkdir(os.path.join(workdir, "data"))
    cfg = os.path.join(workdir, "zoo.cfg")
    with open(cfg, "w") as f:
        f.write(f"tickTime=2000\ndataDir={workdir}/data\nclientPort={port}\nclientPortAddress=127.0.0.1\n"
                "admin.enableServer=false\n4lw.commands.whitelist=\n")
    log = open(os.path.join(workdir, "server.log"), "wb")  # noqa: SIM115 - the child owns it
    p = cg.spawn(cid, ["java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Dzookeeper.log.dir=" + workdir, "-cp", JAR,
                       "org.apache.zookeeper.server.quorum.QuorumPeerMain", cfg], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_port("127.0.0.1", port, timeout=60, proc=p)
        wait_for(lambda: _session(port), 60, interval=0.2)  # serving sessions, not only listening
        assert _session(port), "ZooKeeper listens but opens no session"
        yield port, cid
    finally:
        cg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _session(port: int) -> bool:
    """A session opens (a ConnectRequest: not a request the agent counts)."""
    try:
        Session(port).s.close()
        return True
    except (OSError, EOFError):
        return False


def run(cgroups: TestCgroups, cid: str, port: int, prefix: str, *specs: str,
        mode: str = "run") -> tuple[subprocess.Popen[str], dict]:
    p = cgroups.spawn(cid, [*CLIENT, mode, str(port), prefix, *specs], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the ZooKeeper client failed (exit {p.wait(10)})"
    return p, json.loads(line)


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(10)


def test_requests_by_status_on_both_sides_and_a_span_each(agent: AgentProcess, cgroups: TestCgroups,
                                                          zookeeper: tuple[int, str]) -> None:
    port, server_cid = zookeeper
    cid = cgroups.create("zk-client")
    prefix = f"/ca-zk-{uuid.uuid4().hex[:8]}"
    specs = ["create:10", "get:10", "exists:5", "get-missing:6", "exists-missing:4", "create-bad:3", "ping:2"]
    p, result = run(cgroups, cid, port, prefix, *specs)
    assert result["errors"] == {"0": 27, "-101": 10, "-8": 3}  # what the server answered
    want = {"ok": 37, "failed": 3}  # NoNode is "ok" (an API error), BadArguments "failed" (a system error)
    dest = f"127.0.0.1:{port}"
    got_out = wait_counts(agent, OUT, 40, container_id=cid, destination=dest, actual_destination=dest)
    assert got_out == want, diagnosis(agent)
    assert wait_counts(agent, IN, 40, container_id=server_cid) == want, diagnosis(agent)
    assert histogram_count(agent, "container_zookeeper_requests_duration_seconds_total", container_id=cid) == 40
    assert histogram_count(agent, "container_zookeeper_inbound_requests_duration_seconds_total",
                           container_id=server_cid) == 40
    sql = ("SELECT SpanName, SpanKind, SpanAttributes, StatusCode, StatusMessage, Duration FROM otel_traces "
           f"WHERE ServiceName = '{cid}'")
    got: list[dict] = []

    def enough() -> bool:
        nonlocal got
        got = rows(agent, sql)
        return len(got) >= 40

    wait_for(enough, 30, interval=0.5)
    finish(p)
    assert len(got) == 40, diagnosis(agent)
    seen: dict[tuple[str, str, str, str, str], int] = {}
    for s in got:
        a = s["SpanAttributes"]
        assert s["SpanKind"] == "SPAN_KIND_CLIENT" and a["db.system"] == "zookeeper" and s["Duration"] > 0
        assert a["db.operation"] == s["SpanName"] and a["net.peer.port"] == str(port)
        statement = a["db.statement"].replace(prefix, "P")
        key = (s["SpanName"], statement, a["zookeeper.status_code"], s["StatusCode"], s["StatusMessage"])
        seen[key] = seen.get(key, 0) + 1
    want_spans: dict[tuple[str, str, str, str, str], int] = {}
    for i in range(10):
        want_spans[("create", f"create P-{i}", "0", "STATUS_CODE_UNSET", "")] = 1
        want_spans[("getData", f"getData P-{i}", "0", "STATUS_CODE_UNSET", "")] = 1
    for i in range(5):
        want_spans[("exists", f"exists P-{i}", "0", "STATUS_CODE_UNSET", "")] = 1
    for i in range(6):
        want_spans[("getData", f"getData P-missing-{i}", "-101", "STATUS_CODE_UNSET", "")] = 1
    for i in range(4):
        want_spans[("exists", f"exists P-missing-{i}", "-101", "STATUS_CODE_UNSET", "")] = 1
    want_spans[("create", "create /.", "-8", "STATUS_CODE_ERROR", "BadArguments")] = 3
    want_spans[("ping", "ping", "0", "STATUS_CODE_UNSET", "")] = 2
    assert seen == want_spans
    assert rows(agent, f"SELECT count() AS n FROM otel_traces WHERE ServiceName = '{server_cid}'") == [{"n": 0}]


def test_two_clients_at_once_count_apart(agent: AgentProcess, cgroups: TestCgroups,
                                         zookeeper: tuple[int, str]) -> None:
    port, server_cid = zookeeper
    before = by_status(agent, IN, container_id=server_cid)
    a, b = cgroups.create("zk-a"), cgroups.create("zk-b")
    pa, ra = run(cgroups, a, port, f"/ca-zk-{uuid.uuid4().hex[:8]}", "create:7", "get:7", "get-missing:5")
    pb, rb = run(cgroups, b, port, f"/ca-zk-{uuid.uuid4().hex[:8]}", "exists-missing:9", "create-bad:4")
    assert ra["errors"] == {"0": 14, "-101": 5} and rb["errors"] == {"-101": 9, "-8": 4}
    dest = f"127.0.0.1:{port}"
    assert wait_counts(agent, OUT, 19, container_id=a, destination=dest) == {"ok": 19}, diagnosis(agent)
    assert wait_counts(agent, OUT, 13, container_id=b, destination=dest) == {"ok": 9, "failed": 4}, diagnosis(agent)
    after = wait_counts(agent, IN, sum(before.values()) + 32, container_id=server_cid)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("ok", "failed")}
    assert delta == {"ok": 28, "failed": 4}, diagnosis(agent)
    for p in (pa, pb):
        finish(p)


def test_lengths_written_and_read_on_their_own_count_the_same(agent: AgentProcess, cgroups: TestCgroups,
                                                              zookeeper: tuple[int, str]) -> None:
    """ZooKeeper's C client writes a message's length and its body apart, and the Java and C
    clients read a reply's length on its own before its body: the kernel takes the body as the
    request, waits past the length read alone, and reads the reply's status from the body."""
    port, server_cid = zookeeper
    before = by_status(agent, IN, container_id=server_cid)
    cid = cgroups.create("zk-split")
    prefix = f"/ca-zk-{uuid.uuid4().hex[:8]}"
    p, result = run(cgroups, cid, port, prefix, "create:6", "get:6", "exists-missing:5", "create-bad:2", "ping:1",
                    mode="split")
    assert result["errors"] == {"0": 13, "-101": 5, "-8": 2}
    dest = f"127.0.0.1:{port}"
    want = {"ok": 18, "failed": 2}
    assert wait_counts(agent, OUT, 20, container_id=cid, destination=dest) == want, diagnosis(agent)
    after = wait_counts(agent, IN, sum(before.values()) + 20, container_id=server_cid)
    assert {k: after.get(k, 0) - before.get(k, 0) for k in ("ok", "failed")} == want, diagnosis(agent)
    got: list[dict] = []

    def enough() -> bool:
        nonlocal got
        got = rows(agent, f"SELECT SpanName, SpanAttributes, StatusCode FROM otel_traces WHERE ServiceName = '{cid}'")
        return len(got) >= 20

    wait_for(enough, 30, interval=0.5)
    finish(p)
    seen: dict[tuple[str, str, str], int] = {}
    for s in got:
        key = (s["SpanName"], s["SpanAttributes"]["zookeeper.status_code"], s["StatusCode"])
        seen[key] = seen.get(key, 0) + 1
    assert seen == {("create", "0", "STATUS_CODE_UNSET"): 6, ("getData", "0", "STATUS_CODE_UNSET"): 6,
                    ("exists", "-101", "STATUS_CODE_UNSET"): 5, ("create", "-8", "STATUS_CODE_ERROR"): 2,
                    ("ping", "0", "STATUS_CODE_UNSET"): 1}
