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

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest

from tests.system.helpers import (
    REPO,
    AgentFactory,
    AgentProcess,
    TestCgroups,
    free_port,
    rows,
    wait_for,
    wait_port,
)

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


@dataclass
class MariaDB:
    port: int
    cid: str  # the server's container
    dir: str

    @property
    def dest(self) -> str:
        return f"127.0.0.1:{self.port}"


def by_status(agent: AgentProcess, name: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, lb, v in agent.metrics():
        if n == name and labels.items() <= lb.items():
            out[lb["status"]] = out.get(lb["status"], 0) + v
    return out


def wait_counts(agent: AgentProcess, name: str, total: float, **labels: str) -> dict[str, float]:
    got: dict[str, float] = {}

    def done() -> bool:
        nonlocal got
        got = by_status(agent, name, **labels)
        return sum(got.values()) >= total

    wait_for(done, 30, interval=0.2)
    time.sleep(1)  # and nothing more comes
    return by_status(agent, name, **labels)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def histogram_count(agent: AgentProcess, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in agent.metrics() if n == name + "_count" and labels.items() <= lb.items())


def spans(agent: AgentProcess, cid: str, n: int) -> list[dict[str, Any]]:
    sql = ("SELECT SpanName, SpanKind, SpanAttributes, StatusCode, StatusMessage, Duration FROM otel_traces "
           f"WHERE ServiceName = '{cid}'")
    got: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal got
        got = rows(agent, sql)
        return len(got) >= n

    wait_for(enough, 30, interval=0.5)
    time.sleep(1.5)  # and nothing more comes (the store is written every second)
    return rows(agent, sql)


@pytest.fixture(scope="module")
def mariadb(agent: AgentProcess) -> Iterator[MariaDB]:
    """mariadbd on loopback in its own cgroup, its datadir made by mariadb-install-db."""
    for tool in ("mariadbd", "mariadb-install-db", "mariadb"):
        assert shutil.which(tool), f"{tool} is missing: apt-get install mariadb-server mariadb-client"
    cg = TestCgroups()
    cid = cg.create("mariadb")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ca-mysql-")
    data = os.path.join(workdir, "data")
    common = ["--no-defaults", f"--datadir={data}", "--user=root", "--skip-log-bin", "--innodb-buffer-pool-size=16M"]
    try:
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=180)
        subprocess.run(["mariadbd", *common, "--bootstrap"], input=SETUP.encode(), check=True,
                       capture_output=True, timeout=120)
        log = open(os.path.join(workdir, "server.log"), "wb")  # noqa: SIM115 - the child owns it
        p = cg.spawn(cid, ["mariadbd", *common, f"--socket={workdir}/mysqld.sock", f"--port={port}",
                           "--bind-address=127.0.0.1", "--skip-name-resolve", f"--pid-file={workdir}/mysqld.pid"],
                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_port("127.0.0.1", port, timeout=60, proc=p)
        yield MariaDB(port, cid, workdir)
        p.terminate()  # a clean shutdown; the cgroup's cleanup kills what is left
        p.wait(30)
    finally:
        cg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def run(cgroups: TestCgroups, cid: str, port: int, *specs: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = cast("subprocess.Popen[str]", cgroups.spawn(
        cid, [*CLIENT, "run", str(port), USER, PASSWORD, DB, *specs], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=REPO))
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the MySQL client failed (exit {p.wait(10)})"
    return p, json.loads(line)


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(10)


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
    assert got_out == want, ([(lb, v) for n, lb, v in agent.metrics() if n == OUT],
                             {n: v for n, _, v in agent.metrics() if n.startswith(("coroot_agent_l7", "coroot_agent_lost"))})
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
