"""MySQL/MariaDB against a real server (Debian's mariadb-server: mariadbd started by the module
with its own datadir, socket and TCP port under /tmp, in a test cgroup; its users and tables made
in bootstrap mode, so no connection the agent sees sets it up). Clients in test cgroups: a wire
client (tests/system/workloads/mysql_client.py) runs text queries (ok and failing) and prepared
statements over the binary protocol (COM_STMT_PREPARE/EXECUTE, failing prepares and executes,
COM_STMT_CLOSE, which has no answer and is not a request); Debian's `mariadb` CLI runs queries
and SQL PREPARE/EXECUTE. The agent counts exactly what each sent and the server answered, on
both sides, as the node agent does: container_mysql_queries_total{status} for the client's
container and its destination, container_mysql_inbound_queries_total{status} for the server's,
"failed" for an ERR answer, "ok" for the rest. One span per client request, named "query",
with db.system "mysql", the statement with its literals masked (an execute shows the text its
statement was prepared with) and the error code as the message of a failed one; with
--disable-sql-literal-masking the literals stay."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import pytest

from tests.system.helpers import AgentFactory, AgentProcess, TestCgroups, rows
from tests.system.l7helpers import (
    CgroupServer,
    by_status,
    cgroup_server,
    delta,
    diagnosis,
    finish,
    histogram_count,
    start_client,
)
from tests.system.l7helpers import spans as stored_spans
from tests.system.l7helpers import wait_counts as wait_all

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

CLIENT = [sys.executable, "-m", "tests.system.workloads.mysql_client"]
OUT, IN = "container_mysql_queries_total", "container_mysql_inbound_queries_total"
USER, PASSWORD, DB = "ca", "ca-secret-pw", "ca"
SETUP = f"""FLUSH PRIVILEGES;
CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';
GRANT ALL ON *.* TO '{USER}'@'127.0.0.1';
CREATE DATABASE {DB};
CREATE TABLE {DB}.ca_kv (k INT, v VARCHAR(20));
CREATE TABLE {DB}.ca_dup (id INT PRIMARY KEY, v VARCHAR(10));
"""
OK, ERROR = "STATUS_CODE_UNSET", "STATUS_CODE_ERROR"
MariaDB = CgroupServer
# counts and spans read again a second later: what came, and nothing more
wait_counts = partial(wait_all, settle=1)
spans = partial(stored_spans, settle=1.5)  # the store is written every second


def _common(workdir: str) -> list[str]:
    return ["--no-defaults", f"--datadir={workdir}/data", "--user=root", "--skip-log-bin",
            "--innodb-buffer-pool-size=16M"]


def _bootstrap(port: int, workdir: str) -> None:
    """The datadir made by mariadb-install-db, the users and tables in bootstrap mode."""
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={workdir}/data", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True, timeout=180)
    subprocess.run(["mariadbd", *_common(workdir), "--bootstrap"], input=SETUP.encode(), check=True,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def mariadb(agent: AgentProcess) -> Iterator[MariaDB]:
    """mariadbd on loopback in its own cgroup, its datadir made by mariadb-install-db."""
    for tool in ("mariadbd", "mariadb-install-db", "mariadb"):
        assert shutil.which(tool), f"{tool} is missing: apt-get install mariadb-server mariadb-client"
    with cgroup_server("mariadb", lambda port, workdir: [
            "mariadbd", *_common(workdir), f"--socket={workdir}/mysqld.sock", f"--port={port}",
            "--bind-address=127.0.0.1", "--skip-name-resolve", f"--pid-file={workdir}/mysqld.pid"],
            timeout=60, prepare=_bootstrap) as server:
        yield server
        server.proc.terminate()  # a clean shutdown; the cgroup's cleanup kills what is left
        server.proc.wait(30)


def run(cgroups: TestCgroups, cid: str, port: int, *specs: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    return start_client(cgroups, cid, [*CLIENT, "run", str(port), USER, PASSWORD, DB, *specs], "MySQL")


def wire_spans(got: list[dict[str, Any]], port: int) -> Counter[tuple[str, str, str, str]]:
    seen: Counter[tuple[str, str, str, str]] = Counter()
    for s in got:
        a = s["SpanAttributes"]
        assert s["SpanKind"] == "SPAN_KIND_CLIENT" and a["db.system"] == "mysql" and s["Duration"] > 0
        assert a["net.peer.port"] == str(port) and "db.operation" not in a
        seen[(s["SpanName"], a["db.statement"], s["StatusCode"], s["StatusMessage"])] += 1
    return seen


def test_queries_and_prepared_statements_by_status_on_both_sides_and_a_masked_span_each(
        agent: AgentProcess, cgroups: TestCgroups, mariadb: MariaDB) -> None:
    before = by_status(agent, IN, container_id=mariadb.cid)
    before_hist = histogram_count(agent, "container_mysql_inbound_queries_duration_seconds_total",
                                  container_id=mariadb.cid)
    cid = cgroups.create("mysql-client")
    p, result = run(cgroups, cid, mariadb.port, "ok:12", "fail:5", "long:2", "insert:3", "prep:6",
                    "prep-bad:2", "exec-dup:3")
    # what the server answered: 12 + 2 + 3 queries, 2 prepares and 6 + 1 executes ok; 5 queries
    # (no such table), 2 prepares (syntax) and 3 executes (duplicate key) failed
    assert result["counts"] == {"ok": 26, "failed": 10}
    assert Counter(code for _, _, code in result["answers"]) == {0: 26, 1146: 5, 1064: 2, 1062: 3}
    want = {"ok": 26, "failed": 10}
    got_out = wait_counts(agent, OUT, 36, container_id=cid, destination=mariadb.dest,
                          actual_destination=mariadb.dest)
    assert got_out == want, ([(lb, v) for n, lb, v in agent.metrics() if n == OUT], diagnosis(agent))
    after = wait_counts(agent, IN, sum(before.values()) + 36, container_id=mariadb.cid)
    assert delta(after, before) == want
    assert histogram_count(agent, "container_mysql_queries_duration_seconds_total", container_id=cid) == 36
    assert histogram_count(agent, "container_mysql_inbound_queries_duration_seconds_total",
                           container_id=mariadb.cid) - before_hist == 36
    got = spans(agent, cid, 36)
    finish(p)
    select, insert = result["prepared"]
    want_spans: Counter[tuple[str, str, str, str]] = Counter()
    want_spans[("query", "SELECT ? + ?, ?", OK, "")] = 12
    for i in range(5):
        want_spans[("query", f"SELECT * FROM ca_missing_{i} WHERE secret = ?", ERROR, "1146")] = 1
    want_spans[("query", "SELECT ? AS n, ?...", OK, "")] = 2  # cut inside the string: masked to the end
    want_spans[("query", "INSERT INTO ca_kv VALUES (?, ?)", OK, "")] = 3
    want_spans[("query", f"PREPARE {select} FROM SELECT ? + ?, ? AS s", OK, "")] = 1
    want_spans[("query", "SELECT ? + ?, ? AS s", OK, "")] = 6  # the executes
    want_spans[("query", "PREPARE FROM SELEKT ? FROM nowhere WHERE x = ?", ERROR, "1064")] = 2
    want_spans[("query", f"PREPARE {insert} FROM INSERT INTO ca_dup VALUES (?, ?)", OK, "")] = 1
    want_spans[("query", "INSERT INTO ca_dup VALUES (?, ?)", OK, "")] = 1
    want_spans[("query", "INSERT INTO ca_dup VALUES (?, ?)", ERROR, "1062")] = 3
    assert wire_spans(got, mariadb.port) == want_spans
    assert not any(re.search(r"secret-|'x|v-\d", s["SpanAttributes"]["db.statement"]) for s in got)
    assert rows(agent, f"SELECT count() AS n FROM otel_traces WHERE ServiceName = '{mariadb.cid}'") == [{"n": 0}]


def test_the_mariadb_cli_with_sql_prepared_statements(agent: AgentProcess, cgroups: TestCgroups,
                                                       mariadb: MariaDB) -> None:
    """Debian's client (libmariadb): its result sets carry MariaDB's metadata byte; PREPARE and
    EXECUTE in SQL are queries. It runs each statement as its line arrives and stays connected
    until its stdin closes."""
    before = by_status(agent, IN, container_id=mariadb.cid)
    cid = cgroups.create("mariadb-cli")
    out = open(os.path.join(mariadb.dir, "cli.out"), "w+")  # noqa: SIM115 - closed below
    p = cast("subprocess.Popen[str]", cgroups.spawn(
        cid, ["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{mariadb.port}", f"-u{USER}", f"-p{PASSWORD}", DB,
              "--force"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True))
    script = [f"SELECT {i} AS n, 'pw-{i}' AS secret;" for i in range(4)]  # ok
    script += ["SELECT nope FROM ca_kv;"] * 2  # 1054: unknown column
    script += ["PREPARE s FROM 'SELECT ? * 2';"]  # ok
    script += [f"EXECUTE s USING {i};" for i in range(3)]  # ok
    script += ["EXECUTE never_prepared;"]  # 1243: unknown prepared statement handler
    script += ["DEALLOCATE PREPARE s;"]  # ok
    assert p.stdin is not None
    p.stdin.write("\n".join(script) + "\n")
    p.stdin.flush()
    want = {"ok": 9, "failed": 3}
    try:
        assert wait_counts(agent, OUT, 12, container_id=cid, destination=mariadb.dest) == want
        assert delta(wait_counts(agent, IN, sum(before.values()) + 12, container_id=mariadb.cid), before) == want
        got = spans(agent, cid, 12)
    finally:
        p.stdin.close()
        p.wait(10)
        out.seek(0)
        text = out.read()
        out.close()
    assert text.count("ERROR 1054") == 2 and text.count("ERROR 1243") == 1, text
    seen = wire_spans(got, mariadb.port)
    assert seen == {
        ("query", "SELECT ? AS n, ? AS secret", OK, ""): 4,
        ("query", "SELECT nope FROM ca_kv", ERROR, "1054"): 2,
        ("query", "PREPARE s FROM ?", OK, ""): 1,
        ("query", "EXECUTE s USING ?", OK, ""): 3,
        ("query", "EXECUTE never_prepared", ERROR, "1243"): 1,
        ("query", "DEALLOCATE PREPARE s", OK, ""): 1,
    }


def test_two_clients_at_once_count_apart(agent: AgentProcess, cgroups: TestCgroups, mariadb: MariaDB) -> None:
    before = by_status(agent, IN, container_id=mariadb.cid)
    a, b = cgroups.create("mysql-a"), cgroups.create("mysql-b")
    pa, ra = run(cgroups, a, mariadb.port, "ok:7", "prep:5", "fail:2")
    pb, rb = run(cgroups, b, mariadb.port, "fail:4", "prep-bad:3", "insert:2")
    assert ra["counts"] == {"ok": 13, "failed": 2} and rb["counts"] == {"ok": 2, "failed": 7}
    assert wait_counts(agent, OUT, 15, container_id=a, destination=mariadb.dest) == {"ok": 13, "failed": 2}
    assert wait_counts(agent, OUT, 9, container_id=b, destination=mariadb.dest) == {"ok": 2, "failed": 7}
    after = wait_counts(agent, IN, sum(before.values()) + 24, container_id=mariadb.cid)
    assert delta(after, before) == {"ok": 15, "failed": 9}
    for p in (pa, pb):
        finish(p)


def test_literals_stay_when_masking_is_off(agent_factory: AgentFactory, cgroups: TestCgroups,
                                           mariadb: MariaDB) -> None:
    plain = agent_factory("--disable-sql-literal-masking")
    cid = cgroups.create("mysql-plain")
    p, result = run(cgroups, cid, mariadb.port, "ok:2", "prep:1", "fail:1")
    assert result["counts"] == {"ok": 4, "failed": 1}
    got = spans(plain, cid, 5)
    finish(p)
    (select,) = result["prepared"]
    assert wire_spans(got, mariadb.port) == {
        ("query", "SELECT 0 + 1, 'secret-0'", OK, ""): 1,
        ("query", "SELECT 1 + 1, 'secret-1'", OK, ""): 1,
        ("query", f"PREPARE {select} FROM SELECT ? + 1, 'abc' AS s", OK, ""): 1,
        ("query", "SELECT ? + 1, 'abc' AS s", OK, ""): 1,
        ("query", "SELECT * FROM ca_missing_0 WHERE secret = 'x0'", ERROR, "1146"): 1,
    }
