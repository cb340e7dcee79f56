"""DDL generation for one node and for a cluster, TTL parsing, address rules."""

import pytest

from agent.sinks import schema
from agent.sinks.store import StoreError, parse_address

TTLS = {"traces": 604800, "logs": 86400, "profiles": 129600, "metrics": 604800}


def test_single_node_ddl() -> None:
    stmts = schema.migration("coroot", TTLS)
    assert stmts[0] == "CREATE DATABASE IF NOT EXISTS coroot"
    traces = next(s for s in stmts if s.startswith("CREATE TABLE IF NOT EXISTS coroot.otel_traces ("))
    assert "Timestamp DateTime64(9) CODEC(DoubleDelta, ZSTD(1))" in traces
    assert "ENGINE = MergeTree()" in traces
    assert "PARTITION BY toDate(Timestamp)" in traces
    assert "ORDER BY (ServiceName, SpanName, toUnixTimestamp(Timestamp), TraceId)" in traces
    assert "TTL toDateTime(Timestamp) + toIntervalSecond(604800)" in traces
    assert "SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000" in traces
    logs = next(s for s in stmts if "coroot.otel_logs (" in s)
    assert "toIntervalSecond(86400)" in logs and "INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 1" in logs
    assert not any("ON CLUSTER" in s or "_distributed" in s for s in stmts)
    hist = next(s for s in stmts if "coroot.otel_traces_histogram (" in s)
    assert "ENGINE = SummingMergeTree((Total, Failed))" in hist


def test_cluster_ddl_is_replicated_and_distributed() -> None:
    stmts = schema.migration("coroot", TTLS, cluster="coroot")
    assert stmts[0] == "CREATE DATABASE IF NOT EXISTS coroot ON CLUSTER coroot"
    tables = [s for s in stmts if s.startswith("CREATE TABLE") and "_distributed" not in s]
    assert len(tables) == len(schema.TABLES)
    for s in tables:
        assert " ON CLUSTER coroot (" in s
        assert "Replicated" in s and "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'" in s
        assert "non_replicated_deduplication_window" not in s
    hist = next(s for s in tables if "otel_traces_histogram" in s)
    assert "ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', (Total, Failed))" in hist
    stacks = next(s for s in tables if "profiling_stacks" in s)
    assert "ENGINE = ReplicatedReplacingMergeTree(" in stacks
    dist = {s.split()[5]: s for s in stmts if "_distributed" in s}
    assert set(dist) == {f"coroot.{t.name}_distributed" for t in schema.TABLES}
    assert dist["coroot.otel_traces_distributed"].endswith("ENGINE = Distributed(coroot, coroot, otel_traces, cityHash64(TraceId))")
    assert dist["coroot.otel_logs_distributed"].endswith("Distributed(coroot, coroot, otel_logs, rand())")
    assert dist["coroot.profiling_samples_distributed"].endswith("Distributed(coroot, coroot, profiling_samples, StackHash)")
    assert dist["coroot.metrics_distributed"].endswith("Distributed(coroot, coroot, metrics, MetricHash)")
    views = [s for s in stmts if "MATERIALIZED VIEW" in s]
    assert len(views) == len(schema.VIEWS) and all("ON CLUSTER coroot TO" in v for v in views)


def test_ttl_is_read_back_from_create_statements() -> None:
    q = ("CREATE TABLE coroot.otel_traces (...) ENGINE = MergeTree PARTITION BY toDate(Timestamp) ORDER BY x "
         "TTL toDateTime(Timestamp) + toIntervalSecond(129600) SETTINGS index_granularity = 8192")
    assert schema.ttl_seconds_of(q) == 129600
    assert schema.ttl_seconds_of("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a") is None
    assert schema.modify_ttl(schema.TABLES_BY_NAME["otel_logs"], "coroot", 3600) == (
        "ALTER TABLE coroot.otel_logs MODIFY TTL toDateTime(Timestamp) + toIntervalSecond(3600)")


def test_nested_columns_are_flattened_for_inserts() -> None:
    cols = schema.TABLES_BY_NAME["otel_traces"].insert_columns
    assert cols[-7:] == ["Events.Timestamp", "Events.Name", "Events.Attributes",
                         "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes"]
    assert "NetSockPeerAddr" not in cols  # materialized


def test_identifiers_are_checked() -> None:
    with pytest.raises(ValueError, match="not a plain ClickHouse identifier"):
        schema.migration("coroot; DROP DATABASE x", TTLS)


@pytest.mark.parametrize(("address", "tls", "url"), [
    ("clickhouse:8123", False, "http://clickhouse:8123"),
    ("clickhouse", False, "http://clickhouse:8123"),
    ("clickhouse", True, "https://clickhouse:8443"),
    ("https://ch.example:8443", False, "https://ch.example:8443"),
    ("[::1]:8123", False, "http://::1:8123"),
])
def test_addresses(address: str, tls: bool, url: str) -> None:
    assert parse_address(address, tls).url == url


def test_native_port_is_refused_with_the_http_port_to_use() -> None:
    with pytest.raises(StoreError) as e:
        parse_address("clickhouse.coroot.svc:9000", True)
    assert str(e.value) == (
        "global_clickhouse.address 'clickhouse.coroot.svc:9000': port 9000 is ClickHouse's native TCP "
        "protocol, and coroot-agent talks to ClickHouse over HTTP(S). Use clickhouse.coroot.svc:8443 (HTTPS)")
    with pytest.raises(StoreError, match=r"Use ch:8123 \(HTTP; or :8443 with tls_enable: true\)"):
        parse_address("ch:9000", False)
    with pytest.raises(StoreError, match="port 9440 .* Use ch:8443"):
        parse_address("ch:9440", False)
