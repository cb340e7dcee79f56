"""Memcached against a real memcached (Debian's, started once for the module on its own port in
a test cgroup): clients on the wire, text and binary (tests/system/workloads/memcached_client.py),
in test cgroups; the agent counts every set and get exactly by status, as the node agent's
values go (a miss is "ok", an error reply "failed"), for the client's container and its
destination and for the server's container; one span per client request with the command and
its keys; the values stored never reach the store."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.system.helpers import AgentProcess, TestCgroups, rows
from tests.system.l7helpers import (
    CgroupServer,
    by_status,
    cgroup_server,
    finish,
    spans,
    start_client,
    wait_counts,
)

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

CLIENT = [sys.executable, "-m", "tests.system.workloads.memcached_client"]
OUT, IN = "container_memcached_queries_total", "container_memcached_inbound_queries_total"


@pytest.fixture(scope="module")
def memcached(agent: AgentProcess) -> Iterator[CgroupServer]:
    """memcached on loopback in its own cgroup."""
    with cgroup_server("memcached", lambda port, workdir: [
            "memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "2", "-m", "64", "-u", "nobody",
            "-P", f"{workdir}/pid"]) as server:
        yield server


def run(cgroups: TestCgroups, cid: str, *args: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    return start_client(cgroups, cid, [*CLIENT, *args], "memcached")


def stored(agent: AgentProcess, text: str) -> int:
    """Span and log rows holding `text` in any of their text columns (the store itself is asked)."""
    n = 0
    for sql in ("SELECT count() AS n FROM otel_traces WHERE position(concat(SpanName, toString(SpanAttributes), "
                "StatusMessage, toString(ResourceAttributes), toString(Events.Attributes)), '{}') > 0",
                "SELECT count() AS n FROM otel_logs WHERE position(concat(Body, toString(LogAttributes)), '{}') > 0"):
        n += int(rows(agent, sql.format(text))[0]["n"])
    return n


def test_text_sets_and_gets_by_status_on_both_sides(agent: AgentProcess, cgroups: TestCgroups,
                                                    memcached: CgroupServer) -> None:
    port, server_cid = memcached.port, memcached.cid
    cid = cgroups.create("mc-text")
    value = f"mcv{uuid.uuid4().hex[:12]}"
    inbound_before = by_status(agent, IN, container_id=server_cid)
    # 20 sets, 15 hits, 10 misses, 5 incr of a text value; one write of set, touch, delete,
    # delete (not found), get (a miss); 5 sets with noreply (nothing answers them)
    client, seen = run(cgroups, cid, "text", str(port), value, "set:20", "get:15", "miss:10", "fail:5", "pipe",
                       "noreply:5")
    assert seen == {"STORED": 21, "HIT": 15, "END": 11, "CLIENT_ERROR": 5, "TOUCHED": 1, "DELETED": 1,
                    "NOT_FOUND": 1}
    dest = f"127.0.0.1:{port}"
    want_out = {"ok": 20 + 15 + 10 + 5 + 5, "failed": 5}
    assert wait_counts(agent, OUT, 60, container_id=cid) == want_out
    assert by_status(agent, OUT, container_id=cid, destination=dest, actual_destination=dest) == want_out
    hist = [v for n, lb, v in agent.metrics()
            if n == "container_memcached_queries_duration_seconds_total_count" and lb.get("container_id") == cid]
    assert hist == [60]
    # The server writes the pipeline's replies with one sendmsg, an iovec each (a hit's VALUE
    # line, data and END too): the kernel gathers them, so its side counts the same.
    assert wait_counts(agent, IN, 60, before=inbound_before, container_id=server_cid) == want_out

    got = spans(agent, cid, 60)
    finish(client)
    assert len(got) == 60
    kinds = Counter((s["SpanName"], s["StatusCode"]) for s in got)
    assert kinds == {("set", "STATUS_CODE_UNSET"): 26, ("get", "STATUS_CODE_UNSET"): 26, ("incr", "STATUS_CODE_ERROR"): 5,
                     ("touch", "STATUS_CODE_UNSET"): 1, ("delete", "STATUS_CODE_UNSET"): 2}
    statements: Counter[str] = Counter()
    for s in got:
        a = s["SpanAttributes"]
        assert a["db.system"] == "memcached" and a["db.operation"] == s["SpanName"]
        assert a["net.peer.port"] == str(port) and a["net.sock.peer.addr"] == "127.0.0.1"
        assert a["db.statement"] == f"{s['SpanName']} {a['db.memcached.item']}"
        statements[a["db.statement"]] += 1
        if s["SpanName"] == "incr":
            assert s["StatusMessage"] == "CLIENT_ERROR cannot increment or decrement non-numeric value"
    assert statements["set t19"] == 1 and statements["get t0"] == 1 and statements["get missing9"] == 1
    assert statements["set p"] == statements["touch p"] == statements["get p"] == 1 and statements["delete p"] == 2
    assert sorted(s["SpanAttributes"]["db.statement"] for s in got if int(s["Duration"]) == 0) == [
        f"set q{i}" for i in range(5)]  # noreply: no response, so no duration
    assert stored(agent, value) == 0
    assert stored(agent, "get missing9") == 1  # what is kept is found


def test_binary_sets_and_gets_by_status_on_both_sides(agent: AgentProcess, cgroups: TestCgroups,
                                                      memcached: CgroupServer) -> None:
    port, server_cid = memcached.port, memcached.cid
    cid = cgroups.create("mc-binary")
    value = f"mcv{uuid.uuid4().hex[:12]}"
    inbound_before = by_status(agent, IN, container_id=server_cid)
    # 12 sets, 8 hits, 6 misses (status 1: not found), 3 incr of a text value (status 6), 2
    # writes of getkq (a miss, unanswered), getkq (a hit) and a no-op, 4 setq (unanswered)
    client, seen = run(cgroups, cid, "binary", str(port), value, "set:12", "get:8", "miss:6", "fail:3", "multi:2",
                       "noreply:4")
    assert seen == {"0x01:0": 12, "0x00:0": 8, "0x00:1": 6, "0x05:6": 3, "0x0d:0": 2, "0x0a:0": 2}
    want = {"ok": 12 + 8 + 6 + 2 * 2 + 4, "failed": 3}
    dest = f"127.0.0.1:{port}"
    assert wait_counts(agent, OUT, 37, container_id=cid) == want
    assert by_status(agent, OUT, container_id=cid, destination=dest, actual_destination=dest) == want
    assert wait_counts(agent, IN, 37, before=inbound_before, container_id=server_cid) == want

    got = spans(agent, cid, 37)
    finish(client)
    assert len(got) == 37
    kinds = Counter((s["SpanName"], s["StatusCode"]) for s in got)
    assert kinds == {("set", "STATUS_CODE_UNSET"): 16, ("get", "STATUS_CODE_UNSET"): 18, ("incr", "STATUS_CODE_ERROR"): 3}
    for s in got:
        a = s["SpanAttributes"]
        assert a["db.system"] == "memcached" and a["db.operation"] == s["SpanName"]
        assert a["db.statement"] == f"{s['SpanName']} {a['db.memcached.item']}"
        if s["SpanName"] == "incr":
            assert s["StatusMessage"] == "non-numeric value"
    quiet = sorted(s["SpanAttributes"]["db.statement"] for s in got if int(s["Duration"]) == 0)
    assert quiet == [f"set q{i}" for i in range(4)]
    assert stored(agent, value) == 0
