"""NATS against a real nats-server (Debian's, started by the module on its own port in a test
cgroup): a publisher and a subscriber on the wire (tests/system/workloads/nats_client.py) in
test cgroups; the agent counts exactly what each published and was given, by method, as the node
agent does: container_nats_messages_total{method="produce"|"consume", status="ok"} for the
client's container and its destination, no duration histogram, nothing for the server (the
node agent has no inbound NATS family), no spans."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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

CLIENT = [sys.executable, "-m", "tests.system.workloads.nats_client"]
FAMILY = "container_nats_messages_total"
L7_FAMILY = re.compile(r"container_\w+_(requests|queries|messages)_")


def by_method(agent: AgentProcess, **labels: str) -> dict[tuple[str, str], float]:
    """container_nats_messages_total of the series with `labels`: (method, status) -> count."""
    out: dict[tuple[str, str], float] = {}
    for n, lb, v in agent.metrics():
        if n == FAMILY and labels.items() <= lb.items():
            key = (lb.get("method", ""), lb["status"])
            out[key] = out.get(key, 0) + v
    return out


def wait_total(agent: AgentProcess, total: int, **labels: str) -> dict[tuple[str, str], float]:
    got: dict[tuple[str, str], float] = {}

    def done() -> bool:
        nonlocal got
        got = by_method(agent, **labels)
        return sum(got.values()) >= total

    wait_for(done, 30, interval=0.2)
    return got


@pytest.fixture(scope="module")
def nats_server(agent: AgentProcess) -> Iterator[tuple[int, str]]:
    """nats-server on loopback in its own cgroup: (port, container id)."""
    cg = TestCgroups()
    cid = cg.create("nats-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ca-nats-")
    log = open(os.path.join(workdir, "server.log"), "wb")  # noqa: SIM115 - the child owns it
    p = cg.spawn(cid, ["nats-server", "-a", "127.0.0.1", "-p", str(port), "-P", os.path.join(workdir, "pid")],
                 stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_port("127.0.0.1", port, proc=p)
        yield port, cid
    finally:
        cg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def spawn(cgroups: TestCgroups, cid: str, *args: str) -> subprocess.Popen[str]:
    return cgroups.spawn(cid, [*CLIENT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=REPO)


def result(p: subprocess.Popen[str]) -> dict:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the NATS client failed (exit {p.wait(10)})"
    return json.loads(line)


def test_published_and_consumed_messages_by_method(agent: AgentProcess, cgroups: TestCgroups,
                                                   nats_server: tuple[int, str]) -> None:
    port, server_cid = nats_server
    sub_cid, pub_cid = cgroups.create("nats-sub"), cgroups.create("nats-pub")
    # 12 single PUBs, 5 PUBs in one write, 3 HPUBs in one write, 1 HPUB: 21 messages in 15 writes
    specs = ["1"] * 12 + ["5", "3:h", "1:h"]
    sub = spawn(cgroups, sub_cid, "sub", str(port), "orders.new", "21")
    assert result(sub) == {"ready": True}
    pub = spawn(cgroups, pub_cid, "pub", str(port), "orders.new", *specs)
    assert result(pub) == {"published": 21}
    assert result(sub) == {"received": 21, "headers": 4}
    dest = f"127.0.0.1:{port}"
    produced = wait_total(agent, 21, container_id=pub_cid, destination=dest)
    consumed = wait_total(agent, 21, container_id=sub_cid, destination=dest)
    for p in (pub, sub):
        assert p.stdin is not None
        p.stdin.close()
        p.wait(10)
    assert produced == {("produce", "ok"): 21}
    assert consumed == {("consume", "ok"): 21}
    names = {n for n, lb, _ in agent.metrics() if lb.get("container_id") in (pub_cid, sub_cid, server_cid)}
    assert {n for n in names if L7_FAMILY.match(n)} <= {FAMILY}, names  # no histogram, no other protocol
    assert by_method(agent, container_id=server_cid) == {}  # the server's side is not counted
    spans = rows(agent, "SELECT count() AS n FROM otel_traces WHERE ResourceAttributes['container.id'] "
                        f"IN ('{pub_cid}', '{sub_cid}')")
    assert spans == [{"n": 0}]
