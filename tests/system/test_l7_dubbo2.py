"""Dubbo2 through a real client library, dubbo-ssl-python's DubboClient (the Dubbo2 protocol with
Hessian2 serialization; tests/system/workloads/dubbo2_client.py), against a stand-in provider
(tests/system/workloads/dubbo2_responder.py) that answers the protocol by its specification: no
Debian package ships Apache Dubbo and a Java provider (the Dubbo jars come from Maven) cannot be
installed here. The provider runs once per module in its own test cgroup; each client runs in
its own.

The agent counts every two-way call the client made and the provider answered, on both sides, as
the node agent names it: container_dubbo_requests_total{status} for the client's container and
its destination, container_dubbo_inbound_requests_total{status} for the provider's; status 20 is
"ok", SERVICE_ERROR (70) and SERVICE_NOT_FOUND (60) are "failed". The provider's log of what it
answered is the expected count. Calls in flight together on the client's one connection and
answered out of order are each counted once (the agent pairs them by request id). One span per
client call, named "<service>/<method>", rpc.system "apache_dubbo", rpc.service, rpc.method; a
failure's status name is the error message."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.helpers import AgentProcess, TestCgroups
from tests.system.l7helpers import (
    CgroupServer,
    RequestFamilies,
    answered_client,
    cgroup_server,
    spans,
)

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

FAMILIES = RequestFamilies("dubbo")
RESPONDER = [sys.executable, "-m", "tests.system.workloads.dubbo2_responder"]
CLIENT = [sys.executable, "-m", "tests.system.workloads.dubbo2_client"]
DELAY_MS = 400  # slow(j) is answered (20 - j) * DELAY_MS / 20 ms late: the later calls first
GREETING = "org.apache.dubbo.demo.GreetingService"
MISSING = "org.apache.dubbo.demo.MissingService"
STATUS = {20: "ok", 60: "failed", 70: "failed"}
UNSET, ERROR = "STATUS_CODE_UNSET", "STATUS_CODE_ERROR"


@pytest.fixture(scope="module")
def provider(agent: AgentProcess) -> Iterator[CgroupServer]:
    with cgroup_server("dubbo2", lambda port, _: [*RESPONDER, str(port), str(DELAY_MS)]) as s:
        yield s


def check(agent: AgentProcess, cgroups: TestCgroups, provider: CgroupServer, name: str, *specs: str,
          want: dict[str, int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the client; the counts on both sides are the provider's answers by status. Returns
    those answers and the client's spans."""
    with answered_client(agent, cgroups, provider, FAMILIES, name, [*CLIENT, str(provider.port), *specs], "Dubbo2",
                         lambda a: STATUS[a["status"]], want) as (cid, mine):
        got = spans(agent, cid, len(mine), settle=1.5)
    assert len(got) == len(mine)
    for s in got:
        a = s["SpanAttributes"]
        assert s["SpanKind"] == "SPAN_KIND_CLIENT" and a["rpc.system"] == "apache_dubbo", s
        assert s["SpanName"] == f"{a['rpc.service']}/{a['rpc.method']}"
        assert a["net.peer.port"] == str(provider.port) and a["net.sock.peer.addr"] == "127.0.0.1"
        assert s["Duration"] > 0
        assert s["ResourceAttributes"]["container.id"] == cid
    return mine, got


def test_calls_by_status_on_both_sides_with_a_span_each(agent: AgentProcess, cgroups: TestCgroups,
                                                        provider: CgroupServer) -> None:
    mine, got = check(agent, cgroups, provider, "dubbo2-client", "ok:5", "fail:3", "missing:2",
                      want={"ok": 5, "failed": 5})
    assert Counter((a["service"], a["method"], a["status"]) for a in mine) == {
        (GREETING, "sayHello", 20): 5, (GREETING, "fail", 70): 3, (MISSING, "sayHello", 60): 2}
    assert Counter((s["SpanName"], s["StatusCode"], s["StatusMessage"]) for s in got) == {
        (f"{GREETING}/sayHello", UNSET, ""): 5,
        (f"{GREETING}/fail", ERROR, "SERVICE_ERROR"): 3,
        (f"{MISSING}/sayHello", ERROR, "SERVICE_NOT_FOUND"): 2}


def test_calls_in_flight_together_answered_out_of_order_each_counted_once(
        agent: AgentProcess, cgroups: TestCgroups, provider: CgroupServer) -> None:
    mine, got = check(agent, cgroups, provider, "dubbo2-multiplex", "multiplex:8", want={"ok": 8})
    ids = [a["id"] for a in mine]
    assert ids != sorted(ids)  # answered out of order
    assert Counter((s["SpanName"], s["StatusCode"]) for s in got) == {(f"{GREETING}/slow", UNSET): 8}
    # each call's duration is its own, not one for all: 140 ms apart at most from the responder's
    # delays (400 to 260 ms); 77 ms was seen on a machine at load 9-16, hence the bound of 50
    assert max(s["Duration"] for s in got) - min(s["Duration"] for s in got) > DELAY_MS / 8 * 1e6
