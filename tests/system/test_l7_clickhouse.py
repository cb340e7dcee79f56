"""ClickHouse's native protocol through the real client library, clickhouse-driver's Client
(tests/system/workloads/clickhouse_client.py), against the real server: Debian's clickhouse-server
18.16.1 (`apt-get install clickhouse-server`), with its own configuration, data directory and
port under /tmp, started once for the module in its own test cgroup. A current ClickHouse server
is not installable here (Debian ships 18.16 only; PyPI's chdb embeds the engine without a TCP
server), so the layout a client writes to a current server — the start time in the client info,
settings as strings, parameters after the text, the addendum clickhouse-driver writes with the
first Query of each connection — comes from a stand-in (tests/system/workloads/
clickhouse_responder.py) that announces revision 54460 and answers by the protocol's
specification; it also runs once for the module, in its own cgroup. Each client runs in its own.

The agent counts every Query the client sent and the server answered, on both sides, as the
node agent names it: container_clickhouse_queries_total{status} for the client's container and
its destination, container_clickhouse_inbound_queries_total{status} for the server's; an
Exception is "failed", a Data block (the first packet of a SELECT's answer) "ok". The driver's
Hello, pings and empty Data blocks are not queries. One span per client query, named "query",
db.system "clickhouse", the statement with its literals masked, an Exception's code as its
message."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.helpers import REPO, AgentProcess, TestCgroups
from tests.system.l7helpers import (
    CgroupServer,
    by_status,
    cgroup_server,
    delta,
    diagnosis,
    finish,
    histogram_count,
    spans,
    start_client,
    wait_counts,
)

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

OUT, IN = "container_clickhouse_queries_total", "container_clickhouse_inbound_queries_total"
HIST_OUT = "container_clickhouse_queries_duration_seconds_total"
HIST_IN = "container_clickhouse_inbound_queries_duration_seconds_total"
SERVER = "/usr/sbin/clickhouse-server"
RESPONDER = [sys.executable, "-m", "tests.system.workloads.clickhouse_responder"]
CLIENT = [sys.executable, "-m", "tests.system.workloads.clickhouse_client"]
UNKNOWN_TABLE = 60

CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><console>1</console></logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>{port}</tcp_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>67108864</mark_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"""
USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default></default></quotas>
</yandex>
"""


def _configure(port: int, workdir: str) -> None:
    Path(workdir, "config.xml").write_text(CONFIG.format(port=port, dir=workdir))
    Path(workdir, "users.xml").write_text(USERS)


@pytest.fixture(scope="module")
def server(agent: AgentProcess) -> Iterator[CgroupServer]:
    if not os.access(SERVER, os.X_OK):
        pytest.fail(f"{SERVER} is missing: apt-get install clickhouse-server")
    with cgroup_server("clickhouse", lambda port, d: [SERVER, f"--config-file={d}/config.xml"],
                       prepare=_configure) as s:
        yield s


@pytest.fixture(scope="module")
def standin(agent: AgentProcess) -> Iterator[CgroupServer]:
    def argv(port: int, _dir: str) -> list[str]:
        return ["env", f"PYTHONPATH={REPO}", *RESPONDER, str(port), "54460"]

    with cgroup_server("clickhouse-standin", argv) as s:
        yield s


def check(agent: AgentProcess, cgroups: TestCgroups, server: CgroupServer, name: str, ok: int, failed: int) -> None:
    """Run the client: exact counts by status on both sides, a duration for each query, and one
    span for each with its masked statement."""
    before = by_status(agent, IN, container_id=server.cid)
    before_hist = histogram_count(agent, HIST_IN, container_id=server.cid)
    cid = cgroups.create(name)
    p, result = start_client(cgroups, cid, [*CLIENT, str(server.port), str(ok), str(failed)], "ClickHouse")
    try:
        want = {"ok": ok, "failed": failed}
        assert result == {"counts": want, "codes": [UNKNOWN_TABLE] * failed}
        got_in = wait_counts(agent, IN, settle=1, total=sum(before.values()) + ok + failed, container_id=server.cid)
        assert delta(got_in, before) == want, diagnosis(agent)
        got_out = wait_counts(agent, OUT, settle=1, total=ok + failed, container_id=cid, destination=server.dest,
                              actual_destination=server.dest)
        assert got_out == want, diagnosis(agent)
        assert histogram_count(agent, HIST_OUT, container_id=cid) == ok + failed
        assert histogram_count(agent, HIST_IN, container_id=server.cid) - before_hist == ok + failed
        got = spans(agent, cid, ok + failed, settle=1)
    finally:
        finish(p)
    for s in got:
        a = s["SpanAttributes"]
        assert (s["SpanName"], s["SpanKind"], a["db.system"]) == ("query", "SPAN_KIND_CLIENT", "clickhouse")
        assert a["net.peer.port"] == str(server.port) and s["Duration"] > 0
    statements = Counter((s["SpanAttributes"]["db.statement"], s["StatusCode"], s["StatusMessage"]) for s in got)
    assert statements == {
        ("SELECT ? + ? AS n, ? AS s", "STATUS_CODE_UNSET", ""): ok,
        ("SELECT * FROM missing_t WHERE secret = ?", "STATUS_CODE_ERROR", str(UNKNOWN_TABLE)): failed,
    }


def test_queries_and_exceptions_of_the_real_server_by_status_on_both_sides_with_masked_spans(
        agent: AgentProcess, cgroups: TestCgroups, server: CgroupServer) -> None:
    check(agent, cgroups, server, "ch-client", ok=7, failed=4)


def test_a_current_revisions_layout_and_the_first_query_after_the_addendum(
        agent: AgentProcess, cgroups: TestCgroups, standin: CgroupServer) -> None:
    # the driver reconnects after each Exception: every SELECT that succeeds is the first Query
    # of its connection, written after the addendum; every failing one is the second
    check(agent, cgroups, standin, "ch-client-new", ok=4, failed=3)

