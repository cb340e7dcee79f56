"""`coroot-agent query` while an agent holds the embedded store, and after it stopped; and the
agent's refusal of a native-protocol ClickHouse address."""

from __future__ import annotations

import json
import re
import time

import pytest

from agent.sinks import schema
from tests.system.helpers import AgentFactory, cli_query, coroot_agent, free_port

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read

N_OBJECTS = len(schema.TABLES) + len(schema.VIEWS)
SQL = "SELECT count() AS n FROM system.tables WHERE database = 'coroot'"


def test_query_answers_through_the_running_agent_and_after_it_stopped(agent_factory: AgentFactory) -> None:
    a = agent_factory()
    r = cli_query(a, SQL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"n\n{N_OBJECTS}\n"
    r = cli_query(a, "--format", "json", "SELECT name FROM system.tables WHERE database = 'coroot' AND name LIKE 'otel_traces%' ORDER BY name")
    assert r.returncode == 0, r.stderr
    names = [json.loads(line)["name"] for line in r.stdout.splitlines()]
    assert names == sorted(["otel_traces", "otel_traces_trace_id_ts", "otel_traces_trace_id_ts_mv",
                            "otel_traces_service_name", "otel_traces_service_name_mv",
                            "otel_traces_histogram", "otel_traces_histogram_mv"])
    for bad, word in (("DROP TABLE otel_traces", "DROP"), ("INSERT INTO otel_logs SELECT * FROM otel_logs", "INSERT")):
        r = cli_query(a, bad)
        assert r.returncode == 2
        assert r.stderr.strip() == (f"coroot-agent query: refused: only read queries are allowed (SELECT, SHOW, "
                                    f"DESCRIBE, EXPLAIN, WITH, EXISTS); refused {word}")
    assert a.stop() == 0
    r = cli_query(a, SQL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"n\n{N_OBJECTS}\n"


def test_the_agent_refuses_the_native_clickhouse_port_and_names_the_http_one(agent_factory: AgentFactory) -> None:
    a = agent_factory("--clickhouse-address", "127.0.0.1:9000", defaults=False, start=False)
    with pytest.raises(RuntimeError, match="agent exited with"):
        a.start(timeout=30)
    assert ("cannot start: global_clickhouse.address '127.0.0.1:9000': port 9000 is ClickHouse's native TCP "
            "protocol, and coroot-agent talks to ClickHouse over HTTP(S). Use 127.0.0.1:8123") in a.log()
    r = coroot_agent("check", "--no-probe", "--listen", f"127.0.0.1:{free_port()}", "--clickhouse-address",
                     "ch.example:9440")
    assert r.returncode == 1
    assert re.search(r"^store\s+FAIL\s+global_clickhouse.address 'ch.example:9440': port 9440", r.stdout, re.M), r.stdout


def test_without_remote_write_metric_history_goes_to_the_store(agent_factory: AgentFactory) -> None:
    a = agent_factory("--scrape-interval", "1s", "--store-batch-age", "1s", defaults=False)
    time.sleep(3.5)
    assert a.stop() == 0
    r = cli_query(a, "SELECT count(), uniqExact(Timestamp), any(Labels['job']), min(Value), max(Value) "
                     "FROM metrics WHERE MetricName = 'node_agent_info'")
    assert r.returncode == 0, r.stderr
    count, stamps, job, lo, hi = r.stdout.splitlines()[1].split("\t")
    assert int(count) == int(stamps) >= 3  # one row per scrape, the last one at shutdown
    assert (job, lo, hi) == ("coroot-node-agent", "1", "1")
    r = cli_query(a, "SELECT count() FROM metrics WHERE MetricName = 'node_resources_cpu_usage_seconds_total' "
                     "AND Labels['mode'] = 'idle'")
    assert int(r.stdout.splitlines()[1]) == int(count)
