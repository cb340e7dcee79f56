"""Container logs end to end: real files written by processes in test cgroups, fake CRI and
Docker runtime files, rotation, flags, opt-out and PII masking; counted exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.system.helpers import (
    AgentFactory,
    AgentProcess,
    LogWriter,
    TestCgroups,
    log_counts,
    rows,
    wait_for,
)

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read


@pytest.fixture
def logfile() -> Iterator[str]:
    path = f"/var/log/catest-{uuid.uuid4().hex[:8]}.log"
    yield path
    for p in (path, path + ".1"):
        if os.path.exists(p):
            os.unlink(p)


def test_a_file_under_var_log_is_counted_by_level_and_pattern_and_stored(
        agent: AgentProcess, cgroups: TestCgroups, logfile: str) -> None:
    cid = cgroups.create("logs-file")
    w = LogWriter(cgroups, cid)
    w(f"open {logfile}")
    w("lines 10 2024-05-01 10:00:0{i} ERROR failed to connect to db-{i}:5432 after 30{i} ms")
    w("lines 10 ERROR user {i} not found in tenant t{i}")
    w("lines 10 ERROR payment declined: card expired")
    w("lines 10 INFO request {i} served in {i} ms")
    got = wait_for(lambda: sum(log_counts(agent, cid).values()) == 40 and log_counts(agent, cid), 10)
    assert got, log_counts(agent, cid)
    errors = sorted(v for (lvl, _), v in got.items() if lvl == "error")
    assert errors == [10, 10, 10]
    assert [v for (lvl, _), v in got.items() if lvl == "info"] == [10]
    # as logparser: a pattern hash for errors, none for info messages (one series, empty hash)
    assert got[("info", "")] == 10 and all(len(h) == 32 for lvl, h in got if lvl == "error")
    source = {lb["source"] for n, lb, _ in agent.metrics() if n == "container_log_messages_total" and lb.get("container_id") == cid}
    assert source == {logfile}
    stored = wait_for(lambda: rows(agent, f"SELECT SeverityText AS s, SeverityNumber AS n, "
                                          f"length(LogAttributes['pattern.hash']) AS h, count() AS c FROM otel_logs "
                                          f"WHERE ResourceAttributes['container.id'] = '{cid}' GROUP BY s, n, h ORDER BY s"), 5)
    assert stored == [{"s": "error", "n": 17, "h": 32, "c": 30}, {"s": "info", "n": 9, "h": 0, "c": 10}]
    w.close()


def test_a_file_opened_through_a_symlink_within_var_log_is_followed_by_its_real_path(
        agent: AgentProcess, cgroups: TestCgroups, logfile: str) -> None:
    link = logfile.replace(".log", "-current.log")
    os.symlink(os.path.basename(logfile), link)
    try:
        cid = cgroups.create("logs-link")
        w = LogWriter(cgroups, cid)
        w(f"open {link}")
        w("lines 6 ERROR through a link {i}")
        assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 6, 10), log_counts(agent, cid)
        time.sleep(0.5)
        assert sum(log_counts(agent, cid).values()) == 6
        source = {lb["source"] for n, lb, _ in agent.metrics()
                  if n == "container_log_messages_total" and lb.get("container_id") == cid}
        assert source == {logfile}  # what the kernel opened, not the name the process used
        w.close()
    finally:
        os.unlink(link)


def test_a_file_opened_read_only_is_not_followed(agent: AgentProcess, cgroups: TestCgroups, logfile: str) -> None:
    with open(logfile, "w") as f:
        f.write("".join(f"ERROR already there {i}\n" for i in range(4)))
    cid = cgroups.create("logs-readonly")
    p = cgroups.spawn(cid, [sys.executable, "-c", f"import sys; f = open({logfile!r}); f.read(); sys.stdin.read()"],
                      stdin=subprocess.PIPE)
    time.sleep(6)  # past a rescan of open descriptors
    assert log_counts(agent, cid) == {}
    p.communicate(b"")


def test_cri_and_docker_files_are_attributed_and_partial_lines_joined(agent: AgentProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    pod_dir = f"/var/log/pods/catest_web-{tag}_{uuid.uuid4()}/app"
    docker_id = uuid.uuid4().hex + uuid.uuid4().hex
    docker_dir = f"/var/lib/docker/containers/{docker_id}"
    os.makedirs(pod_dir)
    os.makedirs(docker_dir)
    try:
        with open(f"{pod_dir}/0.log", "a") as cri, open(f"{docker_dir}/{docker_id}-json.log", "a") as dj:
            now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())  # recent: older rows expire by TTL
            for i in range(7):
                cri.write(f"{now}.00000000{i}Z stdout P WARN disk {i} is \n")
                cri.write(f"{now}.10000000{i}Z stdout F almost full\n")
                dj.write(json.dumps({"log": f"ERROR job {i} crashed", "stream": "stderr", "time": f"{now}Z"}) + "\n")
                dj.write(json.dumps({"log": " with code 137\n", "stream": "stderr", "time": f"{now}Z"}) + "\n")
        pod_cid, docker_cid = f"/k8s/catest/web-{tag}/app", f"/docker/{docker_id[:12]}"
        assert wait_for(lambda: sum(log_counts(agent, pod_cid).values()) == 7, 10), log_counts(agent, pod_cid)
        assert wait_for(lambda: sum(log_counts(agent, docker_cid).values()) == 7, 10), log_counts(agent, docker_cid)
        assert {lvl for lvl, _ in log_counts(agent, pod_cid)} == {"warning"}
        assert {lvl for lvl, _ in log_counts(agent, docker_cid)} == {"error"}
        bodies = wait_for(lambda: rows(agent, f"SELECT DISTINCT Body AS b FROM otel_logs WHERE ResourceAttributes['container.id'] = '{pod_cid}' ORDER BY b"), 5)
        assert [r["b"] for r in bodies] == [f"WARN disk {i} is almost full" for i in range(7)]
    finally:
        shutil.rmtree(os.path.dirname(pod_dir))
        shutil.rmtree(docker_dir)


@pytest.mark.parametrize("how", ["rename", "copytruncate"])
def test_rotation_in_the_middle_loses_and_repeats_nothing(agent: AgentProcess, cgroups: TestCgroups,
                                                         logfile: str, how: str) -> None:
    cid = cgroups.create(f"logs-{how}")
    w = LogWriter(cgroups, cid)
    w(f"open {logfile}")
    w("lines 5000 rotation line {i} of the first half")
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 5000, 10)
    if how == "rename":
        os.rename(logfile, logfile + ".1")
        w("lines 100 rotation line {i} still in the old file")
        w(f"open {logfile}")  # the application reopens its log, as after a SIGHUP
    else:
        shutil.copyfile(logfile, logfile + ".1")
        with open(logfile, "r+") as f:
            f.truncate(0)
        w("lines 100 rotation line {i} after the truncate")
    w("lines 4900 rotation line {i} of the second half")
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) >= 10_000, 10)
    time.sleep(0.5)
    assert sum(log_counts(agent, cid).values()) == 10_000
    stored = wait_for(lambda: rows(agent, f"SELECT count() AS c, uniqExact(Body) AS u FROM otel_logs "
                                          f"WHERE ResourceAttributes['container.id'] = '{cid}'") == [{"c": 10000, "u": 10000}], 10)
    assert stored
    w.close()


def test_a_java_stack_trace_is_one_record(agent: AgentProcess, cgroups: TestCgroups, logfile: str) -> None:
    cid = cgroups.create("logs-java")
    w = LogWriter(cgroups, cid)
    w(f"open {logfile}")
    w("raw ERROR request failed\\njava.lang.IllegalStateException: boom\\n\\tat com.example.Foo.bar(Foo.java:10)\\n"
      "\\tat com.example.Main.main(Main.java:3)\\nCaused by: java.io.IOException: eof\\n\\t... 2 more\\nINFO next\\n")
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) == 3, 5), log_counts(agent, cid)
    got = wait_for(lambda: rows(agent, f"SELECT Body AS b FROM otel_logs WHERE ResourceAttributes['container.id'] = '{cid}' "
                                       "AND Body LIKE 'java.lang%'"), 5)
    assert len(got) == 1 and got[0]["b"].count("\n") == 4 and got[0]["b"].endswith("\t... 2 more")
    w.close()


def test_pii_is_masked_before_it_is_stored(agent: AgentProcess, cgroups: TestCgroups, logfile: str) -> None:
    cid = cgroups.create("logs-pii")
    w = LogWriter(cgroups, cid)
    w(f"open {logfile}")
    w("write WARN charge for jane.doe@example.com card 4111 1111 1111 1111 auth Bearer s3cr3tT0kenValue123")
    got = wait_for(lambda: rows(agent, f"SELECT Body AS b FROM otel_logs WHERE ResourceAttributes['container.id'] = '{cid}'"), 5)
    assert got == [{"b": "WARN charge for <email> card <card> auth Bearer <token>"}]
    for raw in ("jane.doe@example.com", "4111 1111 1111 1111", "s3cr3tT0kenValue123"):
        assert rows(agent, f"SELECT count() AS c FROM otel_logs WHERE Body LIKE '%{raw}%'") == [{"c": 0}]
        assert raw not in agent.get("/metrics")
    w.close()


@pytest.mark.parametrize(("flag", "metrics", "entries"), [
    ("--disable-log-parsing", False, True), ("--disable-log-entries", True, False)])
def test_each_flag_turns_off_exactly_its_part(cgroups: TestCgroups, agent_factory: AgentFactory, logfile: str,
                                              flag: str, metrics: bool, entries: bool) -> None:
    a = agent_factory(flag)
    cid = cgroups.create("logs-flag")
    w = LogWriter(cgroups, cid)
    w(f"open {logfile}")
    w("lines 5 ERROR flag test {i}")

    def stored() -> int:
        return int(rows(a, f"SELECT count() AS c FROM otel_logs WHERE ResourceAttributes['container.id'] = '{cid}'")[0]["c"])

    # the part that stays on shows up first; then the other part must still be nothing
    if metrics:
        assert wait_for(lambda: sum(log_counts(a, cid).values()) == 5, 10)
    else:
        assert wait_for(lambda: stored() == 5, 10)
    time.sleep(2)
    assert sum(log_counts(a, cid).values()) == (5 if metrics else 0)
    assert stored() == (5 if entries else 0)
    w.close()


def test_log_monitoring_opt_out_means_nothing_for_that_container(agent: AgentProcess, cgroups: TestCgroups, logfile: str) -> None:
    cid = cgroups.create("logs-optout")
    w = LogWriter(cgroups, cid, env=dict(os.environ) | {"COROOT_LOG_MONITORING": "disabled"})
    w(f"open {logfile}")
    w("lines 5 ERROR opted out {i}")
    time.sleep(6)  # longer than the collector's rescan of open files
    assert log_counts(agent, cid) == {}
    assert rows(agent, f"SELECT count() AS c FROM otel_logs WHERE ResourceAttributes['container.id'] = '{cid}'") == [{"c": 0}]
    w.close()


def test_a_new_file_filled_before_the_agent_sees_its_open_is_read_whole(
        agent: AgentProcess, cgroups: TestCgroups, logfile: str) -> None:
    cid = cgroups.create("logs-burst")
    w = LogWriter(cgroups, cid)
    w(f"open {logfile}")
    w("lines 50000 burst line {i} written at once")  # ~2 MB before the open event is handled
    assert wait_for(lambda: sum(log_counts(agent, cid).values()) >= 50_000, 20)
    time.sleep(0.5)
    assert sum(log_counts(agent, cid).values()) == 50_000
    w.close()


def test_a_file_open_before_the_agent_started_is_followed_from_its_end(
        cgroups: TestCgroups, agent_factory: AgentFactory, logfile: str) -> None:
    cid = cgroups.create("logs-before")
    w = LogWriter(cgroups, cid)
    w(f"open {logfile}")
    w("lines 3 ERROR written before the agent {i}")
    a = agent_factory()
    w("lines 4 ERROR written after the agent {i}")
    assert wait_for(lambda: sum(log_counts(a, cid).values()) >= 4, 5)
    time.sleep(0.5)
    assert sum(log_counts(a, cid).values()) == 4  # no backfill
    w.close()
