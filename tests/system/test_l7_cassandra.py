"""Cassandra through the real client library, cassandra-driver's Cluster and Session
(tests/system/workloads/cassandra_client.py), against a stand-in node
(tests/system/workloads/cassandra_responder.py) that answers the CQL native protocol by its
specification, v4 and v5 (v5's segment framing after the handshake): no Debian package ships
Cassandra and a JVM node cannot be installed here. The node runs once per module in its own test
cgroup; each client runs in its own.

The agent counts every QUERY, EXECUTE and BATCH the driver sent and the node answered (the
driver's control connection's reads of system.local and system.peers_v2 included; PREPARE,
OPTIONS, STARTUP and REGISTER not), on both sides, as the node agent names it:
container_cassandra_queries_total{status} for the client's container and its destination,
container_cassandra_inbound_queries_total{status} for the node's; RESULT is "ok", ERROR
"failed". The node's log of what it answered is the expected count. Requests multiplexed on one
connection and answered out of order are each counted once with their own status (the agent
pairs them by stream id). One span per client request, named "query", db.system "cassandra",
the statement with its literals masked (an EXECUTE's is its PREPARE's), an ERROR's code as the
error message."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

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
from tests.system.l7helpers import by_status, delta, wait_counts

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

OUT, IN = "container_cassandra_queries_total", "container_cassandra_inbound_queries_total"
RESPONDER = [sys.executable, "-m", "tests.system.workloads.cassandra_responder"]
CLIENT = [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "tests.system.workloads.cassandra_client"]
DELAY_MS = 400  # multiplexed SELECTs are answered up to this late, the later ids first
COUNTED = {"QUERY", "EXECUTE", "BATCH"}


@dataclass
class Server:
    port: int
    cid: str
    out: IO[str]  # its answers, a JSON line each

    @property
    def dest(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answers(self) -> list[dict[str, Any]]:
        self.out.seek(0)
        return [json.loads(line) for line in self.out.read().splitlines() if line]


@pytest.fixture(scope="module")
def server(agent: AgentProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cg = TestCgroups()
    cid = cg.create("cassandra")
    port = free_port()
    out = open(tmp_path_factory.mktemp("cassandra") / "answers.jsonl", "w+")  # noqa: SIM115 - closed below
    try:
        p = cg.spawn(cid, [*RESPONDER, str(port), str(DELAY_MS)], stdout=out, cwd=REPO)
        wait_port("127.0.0.1", port, timeout=30, proc=p)
        yield Server(port, cid, out)
        p.terminate()
        p.wait(10)
    finally:
        cg.cleanup()
        out.close()


def diagnosis(agent: AgentProcess, name: str) -> list[tuple[str, dict[str, str], float]]:
    """The family's series and the agent's L7 and loss counters: a missing request must be a drop
    the agent counted."""
    return [(n, lb, v) for n, lb, v in agent.metrics()
            if n == name or n.startswith("coroot_agent_l7") or "lost" in n or "dropped" in n]


def histogram_count(agent: AgentProcess, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in agent.metrics() if n == name + "_count" and labels.items() <= lb.items())


def spans(agent: AgentProcess, cid: str, n: int) -> list[dict[str, Any]]:
    sql = ("SELECT SpanName, SpanKind, SpanAttributes, StatusCode, StatusMessage, Duration FROM otel_traces "
           f"WHERE ServiceName = '{cid}'")
    wait_for(lambda: len(rows(agent, sql)) >= n, 30, interval=0.5)
    time.sleep(1.5)  # and nothing more comes (the store is written every second)
    return rows(agent, sql)


def run_client(cgroups: TestCgroups, cid: str, port: int, version: int,
               *specs: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = cast("subprocess.Popen[str]", cgroups.spawn(cid, [*CLIENT, str(port), str(version), *specs],
                                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                                     cwd=REPO))
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the Cassandra client failed (exit {p.wait(10)})"
    return p, json.loads(line)


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(20)


def check(agent: AgentProcess, cgroups: TestCgroups, server: Server, name: str, version: int, *specs: str,
          want: dict[str, int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the client; the counts on both sides are the node's answers by status. Returns the
    node's counted answers and the client's spans."""
    before = by_status(agent, IN, container_id=server.cid)
    before_hist = histogram_count(agent, "container_cassandra_inbound_queries_duration_seconds_total",
                                  container_id=server.cid)
    seen = len(server.answers())
    cid = cgroups.create(name)
    p, result = run_client(cgroups, cid, server.port, version, *specs)
    try:
        assert result["counts"] == want
        answers = [a for a in server.answers()[seen:] if a["op"] in COUNTED]
        assert {a["version"] for a in answers} == {version}
        expected = dict(Counter(a["status"] for a in answers))
        total = len(answers)
        got_in = wait_counts(agent, IN, settle=1, total=sum(before.values()) + total, container_id=server.cid)
        assert delta(got_in, before) == expected, (answers, diagnosis(agent, IN))
        got_out = wait_counts(agent, OUT, settle=1, total=total, container_id=cid, destination=server.dest,
                              actual_destination=server.dest)
        assert got_out == expected, (answers, diagnosis(agent, OUT))
        assert histogram_count(agent, "container_cassandra_queries_duration_seconds_total", container_id=cid) == total
        assert histogram_count(agent, "container_cassandra_inbound_queries_duration_seconds_total",
                               container_id=server.cid) - before_hist == total
        got = spans(agent, cid, total)
    finally:
        finish(p)
    assert len(got) == total
    for s in got:
        a = s["SpanAttributes"]
        assert s["SpanName"] == "query" and s["SpanKind"] == "SPAN_KIND_CLIENT" and a["db.system"] == "cassandra"
        assert a["net.peer.port"] == str(server.port) and s["Duration"] > 0
        assert "secret" not in a["db.statement"]
    return answers, got


def test_v4_queries_prepared_statements_and_batches_by_status_on_both_sides_with_masked_spans(
        agent: AgentProcess, cgroups: TestCgroups, server: Server) -> None:
    answers, got = check(agent, cgroups, server, "cql-v4", 4, "query:5", "query-fail:2", "syntax:1", "prepared:3",
                         "prepared-fail:2", "batch:2", "batch-fail:1", want={"ok": 10, "failed": 6})
    mine = Counter((a["op"], a["status"]) for a in answers if "ca." in a["statement"] or "SELEC " in a["statement"])
    assert mine == {("QUERY", "ok"): 5, ("QUERY", "failed"): 3, ("EXECUTE", "ok"): 3, ("EXECUTE", "failed"): 2,
                    ("BATCH", "ok"): 2, ("BATCH", "failed"): 1}
    statements = Counter((s["SpanAttributes"]["db.statement"], s["StatusCode"], s["StatusMessage"]) for s in got
                         if "ca." in s["SpanAttributes"]["db.statement"])
    unset, error = "STATUS_CODE_UNSET", "STATUS_CODE_ERROR"
    assert statements == {
        ("SELECT name FROM ca.people WHERE id = ? AND age > ?", unset, ""): 5,
        ("SELECT name FROM ca.missing WHERE id = ?", error, "2200"): 2,
        ("SELEC name FROM ca.people WHERE id = ?", error, "2000"): 1,
        ("INSERT INTO ca.people (id, name) VALUES (?, ?)", unset, ""): 3,
        ("INSERT INTO ca.missing_people (id, name) VALUES (?, ?)", error, "2200"): 2,
        ("INSERT INTO ca.people (id, name) VALUES (?, ?); INSERT INTO ca.people (id, age) VALUES (?, ?)",
         unset, ""): 2,
        ("INSERT INTO ca.people (id, name) VALUES (?, ?); INSERT INTO ca.missing (id, age) VALUES (?, ?)",
         error, "2200"): 1,
    }


def test_v5_multiplexed_requests_answered_out_of_order_each_counted_once_with_its_status(
        agent: AgentProcess, cgroups: TestCgroups, server: Server) -> None:
    answers, got = check(agent, cgroups, server, "cql-v5", 5, "query:2", "multiplex:8", "prepared:2",
                         want={"ok": 8, "failed": 4})
    slow = [a for a in answers if "slow" in a["statement"]]
    assert Counter(a["status"] for a in slow) == {"ok": 4, "failed": 4}
    assert [a["stream"] for a in slow] != sorted(a["stream"] for a in slow)  # answered out of order
    assert Counter((s["SpanAttributes"]["db.statement"], s["StatusCode"]) for s in got if "slow" in
                   s["SpanAttributes"]["db.statement"]) == {
        ("SELECT name FROM ca.slow WHERE id = ?", "STATUS_CODE_UNSET"): 4,
        ("SELECT name FROM ca.missing_slow WHERE id = ?", "STATUS_CODE_ERROR"): 4}
