"""FoundationDB: a client and a server stand-in both written to the flow transport as
FoundationDB's own sources define it (tests/system/workloads/fdb_wire.py, fdb_client.py,
fdb_responder.py: ConnectPacket, packets with their XXH3 checksum, flatbuffers messages, replies
to the request's reply token, ErrorOr replies). No real client can run here: the foundationdb
package on PyPI is a binding to libfdb_c, which no Debian package ships (and nothing outside the
package registries can be fetched), and there is no FoundationDB server to talk to either. The
server runs once per module in its own test cgroup; each client runs in its own.

The agent counts every request the client sent and the server answered, on both sides, as the
node agent names it: container_foundationdb_requests_total{status} for the client's container
and its destination, container_foundationdb_inbound_requests_total{status} for the server's; a
reply that is an Error (transaction_too_old, not_committed) is "failed" (the node agent counts
every reply "ok"), any other "ok". The server's log of what it answered is the expected count.
Requests in flight together on one connection and answered out of order are each counted once
(the agent pairs a reply with the request that carries its token). FoundationDB requests make
no spans (the node agent makes none)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.helpers import AgentProcess, TestCgroups
from tests.system.l7helpers import (
    CgroupServer,
    by_status,
    cgroup_server,
    delta,
    diagnosis,
    finish,
    histogram_count,
    span_count,
    start_client,
    wait_counts,
)

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

OUT, IN = "container_foundationdb_requests_total", "container_foundationdb_inbound_requests_total"
HIST_OUT = "container_foundationdb_requests_duration_seconds_total"
HIST_IN = "container_foundationdb_inbound_requests_duration_seconds_total"
RESPONDER = [sys.executable, "-m", "tests.system.workloads.fdb_responder"]
CLIENT = [sys.executable, "-m", "tests.system.workloads.fdb_client"]
DELAY_MS = 400  # keys slow/<j> are answered (20 - j) * DELAY_MS / 20 ms late: the later ones first


@pytest.fixture(scope="module")
def server(agent: AgentProcess) -> Iterator[CgroupServer]:
    with cgroup_server("foundationdb", lambda port, _: [*RESPONDER, str(port), str(DELAY_MS)]) as s:
        yield s


def answers(s: CgroupServer) -> list[dict[str, Any]]:
    with open(f"{s.dir}/server.log") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.startswith("{")]


def check(agent: AgentProcess, cgroups: TestCgroups, server: CgroupServer, name: str, *specs: str,
          want: dict[str, int]) -> list[dict[str, Any]]:
    """Run the client; the counts on both sides are the server's answers by status."""
    before = by_status(agent, IN, container_id=server.cid)
    before_hist = histogram_count(agent, HIST_IN, container_id=server.cid)
    seen = len(answers(server))
    cid = cgroups.create(name)
    p, result = start_client(cgroups, cid, [*CLIENT, str(server.port), *specs], "FoundationDB")
    try:
        assert result["counts"] == want
        mine = answers(server)[seen:]
        expected = dict(Counter("ok" if a["error"] is None else "failed" for a in mine))
        assert expected == want
        total = len(mine)
        got_in = wait_counts(agent, IN, settle=1, total=sum(before.values()) + total, container_id=server.cid)
        assert delta(got_in, before) == expected, (mine, diagnosis(agent))
        got_out = wait_counts(agent, OUT, settle=1, total=total, container_id=cid, destination=server.dest,
                              actual_destination=server.dest)
        assert got_out == expected, (mine, diagnosis(agent))
        assert histogram_count(agent, HIST_OUT, container_id=cid, destination=server.dest) == total
        assert histogram_count(agent, HIST_IN, container_id=server.cid) - before_hist == total
        assert span_count(agent, cid) == 0
    finally:
        finish(p)
    return mine


def test_requests_by_status_on_both_sides(agent: AgentProcess, cgroups: TestCgroups, server: CgroupServer) -> None:
    mine = check(agent, cgroups, server, "fdb-client", "get:4", "get-old:2", "grv:3", "commit:2", "conflict:1",
                 want={"ok": 9, "failed": 3})
    assert Counter((a["type"], a["error"]) for a in mine) == {
        ("GetValueRequest", None): 4, ("GetValueRequest", 1007): 2, ("GetReadVersionRequest", None): 3,
        ("CommitTransactionRequest", None): 2, ("CommitTransactionRequest", 1020): 1}


def test_requests_in_flight_together_answered_out_of_order_each_counted_once(
        agent: AgentProcess, cgroups: TestCgroups, server: CgroupServer) -> None:
    mine = check(agent, cgroups, server, "fdb-multiplex", "multiplex:8", want={"ok": 8})
    keys = [a["key"] for a in mine]
    assert keys != sorted(keys)  # answered out of order
