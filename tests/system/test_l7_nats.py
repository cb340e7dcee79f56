"""NATS against a real nats-server (Debian's, started by the module on its own port in a test
cgroup): a publisher and a subscriber on the wire (tests/system/workloads/nats_client.py) in
test cgroups; the agent counts exactly what each published and was given, by method, as the node
agent does: container_nats_messages_total{method="produce"|"consume", status="ok"} for the
client's container and its destination, no duration histogram, nothing for the server (the
node agent has no inbound NATS family), no spans."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.system.helpers import AgentProcess, TestCgroups
from tests.system.l7helpers import (
    CgroupServer,
    assert_messages_only,
    cgroup_server,
    finish,
    start_client,
    wait_methods,
)

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

CLIENT = [sys.executable, "-m", "tests.system.workloads.nats_client"]
FAMILY = "container_nats_messages_total"


@pytest.fixture(scope="module")
def nats_server(agent: AgentProcess) -> Iterator[CgroupServer]:
    """nats-server on loopback in its own cgroup."""
    with cgroup_server("nats-server", lambda port, workdir: ["nats-server", "-a", "127.0.0.1", "-p", str(port),
                                                             "-P", f"{workdir}/pid"]) as server:
        yield server


def next_result(p: subprocess.Popen[str]) -> dict:
    """The client's next JSON line (the subscriber prints one when ready, one when done)."""
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the NATS client failed (exit {p.wait(10)})"
    return json.loads(line)  # type: ignore[no-any-return]


def test_published_and_consumed_messages_by_method(agent: AgentProcess, cgroups: TestCgroups,
                                                   nats_server: CgroupServer) -> None:
    port, server_cid = nats_server.port, nats_server.cid
    sub_cid, pub_cid = cgroups.create("nats-sub"), cgroups.create("nats-pub")
    # 12 single PUBs, 5 PUBs in one write, 3 HPUBs in one write, 1 HPUB: 21 messages in 15 writes
    specs = ["1"] * 12 + ["5", "3:h", "1:h"]
    sub, ready = start_client(cgroups, sub_cid, [*CLIENT, "sub", str(port), "orders.new", "21"], "NATS")
    assert ready == {"ready": True}
    pub, published = start_client(cgroups, pub_cid, [*CLIENT, "pub", str(port), "orders.new", *specs], "NATS")
    assert published == {"published": 21}
    assert next_result(sub) == {"received": 21, "headers": 4}
    dest = nats_server.dest
    produced = wait_methods(agent, FAMILY, 21, container_id=pub_cid, destination=dest)
    consumed = wait_methods(agent, FAMILY, 21, container_id=sub_cid, destination=dest)
    for p in (pub, sub):
        finish(p)
    assert produced == {("produce", "ok"): 21}
    assert consumed == {("consume", "ok"): 21}
    # no histogram, no other protocol, nothing for the server's side, no spans
    assert_messages_only(agent, FAMILY, (pub_cid, sub_cid), server_cid)
