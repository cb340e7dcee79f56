"""MongoDB through the real driver, pymongo (tests/system/workloads/mongo_client.py), against a
stand-in server (tests/system/workloads/mongo_responder.py) that answers the wire protocol by its
specification: no Debian package ships a MongoDB server and MongoDB's own builds cannot be
installed here. The server runs once per module in its own test cgroup; each client runs in its
own.

The agent counts what the driver sent and the server answered, on both sides, as the node agent
names it: container_mongo_queries_total{status} for the client's container and its destination,
container_mongo_inbound_queries_total{status} for the server's; the driver's handshakes and its
monitor's `hello`s are not queries. A reply with ok 0 or a writeError is "failed", ok 1 "ok".
The driver reads a reply's 16-byte header alone before its body: the kernel leaves the request
waiting through that read and pairs it with the body's, so the client's side has the reply
document and its status too; the server's side writes the whole reply at once. One span per client
query, named "query", with db.system "mongodb" and the command as its statement with the filter
values masked."""

from __future__ import annotations

import json
import re
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

OUT, IN = "container_mongo_queries_total", "container_mongo_inbound_queries_total"
RESPONDER = [sys.executable, "-m", "tests.system.workloads.mongo_responder"]
CLIENT = [sys.executable, "-m", "tests.system.workloads.mongo_client"]


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
    cid = cg.create("mongo")
    port = free_port()
    out = open(tmp_path_factory.mktemp("mongo") / "answers.jsonl", "w+")  # noqa: SIM115 - closed below
    try:
        p = cg.spawn(cid, [*RESPONDER, str(port)], stdout=out, cwd=REPO)
        wait_port("127.0.0.1", port, timeout=30, proc=p)
        yield Server(port, cid, out)
        p.terminate()
        p.wait(10)
    finally:
        cg.cleanup()
        out.close()


def histogram_count(agent: AgentProcess, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in agent.metrics() if n == name + "_count" and labels.items() <= lb.items())


def spans(agent: AgentProcess, cid: str, n: int) -> list[dict[str, Any]]:
    sql = ("SELECT SpanName, SpanKind, SpanAttributes, StatusCode, StatusMessage, Duration FROM otel_traces "
           f"WHERE ServiceName = '{cid}'")
    wait_for(lambda: len(rows(agent, sql)) >= n, 30, interval=0.5)
    time.sleep(1.5)  # and nothing more comes (the store is written every second)
    return rows(agent, sql)


def run_client(cgroups: TestCgroups, cid: str, port: int, *specs: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = cast("subprocess.Popen[str]", cgroups.spawn(cid, [*CLIENT, str(port), *specs], stdin=subprocess.PIPE,
                                                     stdout=subprocess.PIPE, text=True, cwd=REPO))
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the MongoDB client failed (exit {p.wait(10)})"
    return p, json.loads(line)


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(20)


def test_queries_by_status_on_both_sides_handshakes_left_out_and_a_masked_span_each(
        agent: AgentProcess, cgroups: TestCgroups, server: Server) -> None:
    before = by_status(agent, IN, container_id=server.cid)
    before_hist = histogram_count(agent, "container_mongo_inbound_queries_duration_seconds_total",
                                  container_id=server.cid)
    seen = len(server.answers())
    cid = cgroups.create("mongo-client")
    p, result = run_client(cgroups, cid, server.port, "find:7", "find-fail:3", "insert:4", "insert-dup:2")
    try:
        assert result["counts"] == {"ok": 11, "failed": 5}
        answers = server.answers()[seen:]
        queries = [a for a in answers if a["command"] != "handshake"]
        assert Counter((a["command"], a["status"]) for a in queries) == {
            ("find", "ok"): 7, ("find", "failed"): 3, ("insert", "ok"): 4, ("insert", "failed"): 2}
        assert any(a["command"] == "handshake" for a in answers)  # the driver's, not counted below
        want_in = {"ok": 11, "failed": 5}
        got_in = wait_counts(agent, IN, settle=1, total=sum(before.values()) + 16, container_id=server.cid)
        assert delta(got_in, before) == want_in, [(lb, v) for n, lb, v in agent.metrics() if n == IN]
        # every query once on the client's side too, with the status of the reply's body
        got_out = wait_counts(agent, OUT, settle=1, total=16, container_id=cid, destination=server.dest,
                              actual_destination=server.dest)
        assert got_out == want_in, [(lb, v) for n, lb, v in agent.metrics() if n == OUT]
        assert histogram_count(agent, "container_mongo_queries_duration_seconds_total", container_id=cid) == 16
        assert histogram_count(agent, "container_mongo_inbound_queries_duration_seconds_total",
                               container_id=server.cid) - before_hist == 16
        got = spans(agent, cid, 16)
    finally:
        finish(p)
    seen_spans: Counter[tuple[str, str]] = Counter()
    for s in got:
        a = s["SpanAttributes"]
        assert s["SpanKind"] == "SPAN_KIND_CLIENT" and a["db.system"] == "mongodb" and s["Duration"] > 0
        assert a["net.peer.port"] == str(server.port)
        seen_spans[(s["SpanName"], a["db.statement"])] += 1
    assert seen_spans == {
        ("query", '{"find": "people", "filter": {"name": ?, "age": {"$gt": ?}}, "$db": "ca"}'): 7,
        ("query", '{"find": "people", "filter": {"fail": ?}, "$db": "ca"}'): 3,
        ("query", '{"insert": "people", "ordered": ?, "$db": "ca"}'): 6,
    }
    assert not any(re.search(r"secret-", s["SpanAttributes"]["db.statement"]) for s in got)
    assert rows(agent, f"SELECT count() AS n FROM otel_traces WHERE ServiceName = '{server.cid}'") == [{"n": 0}]


def test_the_client_side_status_comes_from_the_reply_body(agent: AgentProcess, cgroups: TestCgroups,
                                                           server: Server) -> None:
    cid = cgroups.create("mongo-status")
    p, result = run_client(cgroups, cid, server.port, "find:4", "find-fail:2", "insert-dup:1")
    try:
        assert result["counts"] == {"ok": 4, "failed": 3}
        got_out = wait_counts(agent, OUT, settle=1, total=7, container_id=cid, destination=server.dest)
        got = spans(agent, cid, 7)
    finally:
        finish(p)
    assert got_out == {"ok": 4, "failed": 3}, [(lb, v) for n, lb, v in agent.metrics() if n == OUT]
    assert Counter((s["StatusCode"], s["StatusMessage"]) for s in got) == {
        ("STATUS_CODE_UNSET", ""): 4, ("STATUS_CODE_ERROR", "2"): 2, ("STATUS_CODE_ERROR", "11000"): 1}
