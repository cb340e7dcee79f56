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

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from functools import partial

import pytest

from tests.system.helpers import AgentProcess, TestCgroups, rows, wait_for
from tests.system.l7helpers import (
    by_status,
    cgroup_server,
    diagnosis,
    finish,
    histogram_count,
    spans,
    start_client,
)
from tests.system.l7helpers import wait_counts as wait_all
from tests.system.workloads.zookeeper_client import Session

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

CLIENT = [sys.executable, "-m", "tests.system.workloads.zookeeper_client"]
JAR = "/usr/share/java/zookeeper.jar"  # Debian's zookeeper package (zookeeperd depends on it)
OUT, IN = "container_zookeeper_requests_total", "container_zookeeper_inbound_requests_total"
wait_counts = partial(wait_all, settle=1)  # and read again a second later: nothing more comes


def _config(port: int, workdir: str) -> None:
    os.mkdir(os.path.join(workdir, "data"))
    with open(os.path.join(workdir, "zoo.cfg"), "w") as f:
        f.write(f"tickTime=2000\ndataDir={workdir}/data\nclientPort={port}\nclientPortAddress=127.0.0.1\n"
                "admin.enableServer=false\n4lw.commands.whitelist=\n")


@pytest.fixture(scope="module")
def zookeeper(agent: AgentProcess) -> Iterator[tuple[int, str]]:
    """ZooKeeper standalone on loopback in its own cgroup, as Debian's init script runs it
    (QuorumPeerMain): (port, container id)."""
    assert os.path.exists(JAR), f"{JAR} is missing: apt-get install zookeeperd"
    with cgroup_server("zookeeper", lambda port, workdir: [
            "java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Dzookeeper.log.dir=" + workdir,
            "-cp", JAR, "org.apache.zookeeper.server.quorum.QuorumPeerMain", f"{workdir}/zoo.cfg"],
            timeout=60, prepare=_config) as server:
        wait_for(lambda: _session(server.port), 60, interval=0.2)  # serving sessions, not only listening
        assert _session(server.port), "ZooKeeper listens but opens no session"
        yield server.port, server.cid


def _session(port: int) -> bool:
    """A session opens (a ConnectRequest: not a request the agent counts)."""
    try:
        Session(port).s.close()
        return True
    except (OSError, EOFError):
        return False


def run(cgroups: TestCgroups, cid: str, port: int, prefix: str, *specs: str,
        mode: str = "run") -> tuple[subprocess.Popen[str], dict]:
    return start_client(cgroups, cid, [*CLIENT, mode, str(port), prefix, *specs], "ZooKeeper")


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
    got = spans(agent, cid, 40)
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
    got = spans(agent, cid, 20)
    finish(p)
    seen: dict[tuple[str, str, str], int] = {}
    for s in got:
        key = (s["SpanName"], s["SpanAttributes"]["zookeeper.status_code"], s["StatusCode"])
        seen[key] = seen.get(key, 0) + 1
    assert seen == {("create", "0", "STATUS_CODE_UNSET"): 6, ("getData", "0", "STATUS_CODE_UNSET"): 6,
                    ("exists", "-101", "STATUS_CODE_UNSET"): 5, ("create", "-8", "STATUS_CODE_ERROR"): 2,
                    ("ping", "0", "STATUS_CODE_UNSET"): 1}
