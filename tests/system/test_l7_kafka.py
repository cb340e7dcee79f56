"""Kafka through the real client library, kafka-python's KafkaProducer
(tests/system/workloads/kafka_client.py), against a stand-in broker
(tests/system/workloads/kafka_responder.py) that answers the wire protocol by its specification
(ApiVersions, Metadata and Produce in their flexible versions): no Debian package ships Kafka
and a JVM broker cannot be installed here. The broker runs once per module in its own test
cgroup; each client runs in its own.

The agent counts every request the client sent and the broker answered, on both sides, as the
node agent names it: container_kafka_requests_total{status} for the client's container and its
destination, container_kafka_inbound_requests_total{status} for the broker's; a response with an
error code is "failed", one without "ok". The broker's log of what it answered is the expected
count (the client's own set-up requests, ApiVersions and Metadata, included). Kafka requests
make no spans (the node agent makes none). Pipelined requests (several Produce requests in
flight on one connection, each written on its own) are each counted once with their response's
status: the kernel makes every call on a Kafka connection an event and the agent pairs them by
correlation id."""

from __future__ import annotations

import json
import subprocess
import sys
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
    wait_port,
)
from tests.system.l7helpers import by_status, delta, wait_counts

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

OUT, IN = "container_kafka_requests_total", "container_kafka_inbound_requests_total"
RESPONDER = [sys.executable, "-m", "tests.system.workloads.kafka_responder"]
CLIENT = [sys.executable, "-m", "tests.system.workloads.kafka_client"]
DELAY_MS = 300  # Produce responses leave this late: the client has several in flight


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
    cid = cg.create("kafka")
    port = free_port()
    out = open(tmp_path_factory.mktemp("kafka") / "answers.jsonl", "w+")  # noqa: SIM115 - closed below
    try:
        p = cg.spawn(cid, [*RESPONDER, str(port), str(DELAY_MS)], stdout=out, cwd=REPO)
        wait_port("127.0.0.1", port, timeout=30, proc=p)
        yield Server(port, cid, out)
        p.terminate()
        p.wait(10)
    finally:
        cg.cleanup()
        out.close()


def histogram_count(agent: AgentProcess, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in agent.metrics() if n == name + "_count" and labels.items() <= lb.items())


def run_client(cgroups: TestCgroups, cid: str, port: int, *specs: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = cast("subprocess.Popen[str]", cgroups.spawn(cid, [*CLIENT, str(port), *specs], stdin=subprocess.PIPE,
                                                     stdout=subprocess.PIPE, text=True, cwd=REPO))
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the Kafka client failed (exit {p.wait(10)})"
    return p, json.loads(line)


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(20)


def check(agent: AgentProcess, cgroups: TestCgroups, server: Server, name: str, *specs: str,
          want: dict[str, int]) -> None:
    """Run the client with `specs`; the counts on both sides are the broker's answers by status."""
    before = by_status(agent, IN, container_id=server.cid)
    before_hist = histogram_count(agent, "container_kafka_inbound_requests_duration_seconds_total",
                                  container_id=server.cid)
    seen = len(server.answers())
    cid = cgroups.create(name)
    p, result = run_client(cgroups, cid, server.port, *specs)
    try:
        assert result["counts"] == want
        answers = server.answers()[seen:]
        expected = dict(Counter(a["status"] for a in answers))
        total = len(answers)
        got_in = wait_counts(agent, IN, settle=1, total=sum(before.values()) + total, container_id=server.cid)
        assert delta(got_in, before) == expected, [(lb, v) for n, lb, v in agent.metrics() if n == IN]
        got_out = wait_counts(agent, OUT, settle=1, total=total, container_id=cid, destination=server.dest,
                              actual_destination=server.dest)
        assert got_out == expected, [(lb, v) for n, lb, v in agent.metrics() if n == OUT]
        assert histogram_count(agent, "container_kafka_requests_duration_seconds_total", container_id=cid) == total
        assert histogram_count(agent, "container_kafka_inbound_requests_duration_seconds_total",
                               container_id=server.cid) - before_hist == total
    finally:
        finish(p)
    assert rows(agent, f"SELECT count() AS n FROM otel_traces WHERE ServiceName = '{cid}'") == [{"n": 0}]


def test_requests_one_at_a_time_by_status_on_both_sides(agent: AgentProcess, cgroups: TestCgroups,
                                                         server: Server) -> None:
    seen = len(server.answers())
    check(agent, cgroups, server, "kafka-client", "ok:7", "bad:3", want={"ok": 7, "failed": 3})
    produce = Counter(a["status"] for a in server.answers()[seen:] if a["api"] == 0)
    assert produce == {"ok": 7, "failed": 3}


def test_pipelined_requests_each_counted_once(agent: AgentProcess, cgroups: TestCgroups, server: Server) -> None:
    seen = len(server.answers())
    check(agent, cgroups, server, "kafka-pipeline", "pipeline:8", want={"ok": 8})
    produce = [a for a in server.answers()[seen:] if a["api"] == 0]
    # the client batches what waits: fewer requests than messages, several of them in flight at once
    assert {a["status"] for a in produce} == {"ok"} and 2 <= len(produce) <= 8
    assert max(a["in_flight"] for a in produce) >= 2
