"""remote_write into a real Prometheus (Debian's, with --web.enable-remote-write-receiver)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.sinks.remote_write import RemoteWriter
from agent.sinks.spool import Spool
from tests.system.helpers import AgentFactory, PrometheusServer, free_port, make_test_ca, wait_for

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read


@pytest.fixture
def prom(tmp_path: Path) -> Iterator[PrometheusServer]:
    p = PrometheusServer(str(tmp_path / "prom"))
    p.start()
    yield p
    p.stop()


def registry_with_counter() -> tuple[CollectorRegistry, Counter]:
    reg = CollectorRegistry()
    c = Counter("rwtest_events", "events", ["kind"], registry=reg)
    return reg, c


def value(prom: PrometheusServer, promql: str) -> float | None:
    res = prom.query(promql)
    assert len(res) <= 1, res
    return float(res[0]["value"][1]) if res else None


def test_series_arrive_with_exact_values_and_labels(prom: PrometheusServer, tmp_path: Path) -> None:
    reg, c = registry_with_counter()
    g = Gauge("rwtest_temperature", "t", ["room"], registry=reg)
    h = Histogram("rwtest_latency_seconds", "l", buckets=(0.1, 1.0), registry=reg)
    for _ in range(7):
        c.labels(kind="a").inc()
    g.labels(room="lab").set(-12.5)
    for v in (0.05, 0.5, 0.5, 5):
        h.observe(v)
    w = RemoteWriter(prom.write_url, reg, Spool(str(tmp_path / "spool"), 10_000_000), instance="node-7")
    n = w.scrape()
    w.send_pending()
    assert w.stats.last_error == "" and len(w.spool) == 0
    [series] = prom.query('rwtest_events_total{kind="a"}')
    assert series["metric"] == {"__name__": "rwtest_events_total", "kind": "a", "instance": "node-7",
                                "job": "coroot-node-agent"}
    assert float(series["value"][1]) == 7.0
    assert value(prom, 'rwtest_temperature{room="lab"}') == -12.5
    assert value(prom, 'rwtest_latency_seconds_bucket{le="0.1"}') == 1
    assert value(prom, 'rwtest_latency_seconds_bucket{le="1.0"}') == 3
    assert value(prom, 'rwtest_latency_seconds_bucket{le="+Inf"}') == 4
    assert value(prom, "rwtest_latency_seconds_count") == 4
    assert value(prom, "rwtest_latency_seconds_sum") == 6.05
    # counter: _total and _created; gauge: 1; histogram: 3 buckets, count, sum, created
    assert n == 2 + 1 + 6
    assert w.stats.requests == 1 and w.stats.sent == n


def test_the_agent_ships_its_metrics(prom: PrometheusServer, agent_factory: AgentFactory) -> None:
    a = agent_factory("--remote-write-url", prom.write_url, "--scrape-interval", "1s", defaults=False)
    found = wait_for(lambda: prom.query('node_agent_info{job="coroot-node-agent"}'), 15, 0.5)
    assert found and found[0]["metric"]["machine_id"]
    assert wait_for(lambda: value(prom, "coroot_agent_remote_write_samples_sent_total") or 0, 15, 0.5) > 0
    assert a.stop() == 0


def test_basic_auth_wrong_password_is_reported_and_nothing_is_lost_once_fixed(tmp_path: Path) -> None:
    prom = PrometheusServer(str(tmp_path / "prom"), basic_auth=("coroot", "s3cret"))
    prom.start()
    try:
        reg, c = registry_with_counter()
        spool_dir = str(tmp_path / "spool")
        wrong = RemoteWriter(prom.write_url, reg, Spool(spool_dir, 10_000_000), user="coroot",
                             password="wrong", backoff=(0, 0))
        base = int(time.time() * 1000) - 10_000
        for i in range(5):
            c.labels(kind="auth").inc()
            wrong.scrape(base + i * 1000)
            wrong.send_pending()
        assert wrong.stats.last_error == (
            f"remote_write to {prom.write_url}: 401 Unauthorized: check global_prometheus.user and password "
            "(--prometheus-user, --prometheus-password); requests stay spooled")
        assert len(wrong.spool) == 5 and wrong.stats.sent == 0
        # fixed: a new writer (as after a restart with the right password) on the same spool
        right = RemoteWriter(prom.write_url, reg, Spool(spool_dir, 10_000_000), user="coroot", password="s3cret")
        right.send_pending()
        assert len(right.spool) == 0
        res = prom.query('count_over_time(rwtest_events_total{kind="auth"}[1m])')
        assert float(res[0]["value"][1]) == 5
        assert float(prom.query('max_over_time(rwtest_events_total{kind="auth"}[1m])')[0]["value"][1]) == 5
    finally:
        prom.stop()


def test_every_scrape_during_a_60s_outage_arrives_in_order(prom: PrometheusServer, tmp_path: Path) -> None:
    reg, c = registry_with_counter()
    w = RemoteWriter(prom.write_url, reg, Spool(str(tmp_path / "spool"), 100_000_000), interval=1.0)
    c.labels(kind="outage").inc(0)

    scrapes: list[float] = []
    # Count each scrape in the counter itself: sample i has value i.
    original = w.scrape

    def counting_scrape(ts_ms: int | None = None) -> int:
        c.labels(kind="outage").inc()
        scrapes.append(time.time())
        return original(ts_ms)

    w.scrape = counting_scrape  # type: ignore[method-assign]
    t0 = time.time()
    w.start()
    time.sleep(5)
    prom.stop()
    time.sleep(60)
    during = len(scrapes)
    prom.start()
    assert wait_for(lambda: len(w.spool) == 0, 90, 0.5), "spool not drained after the outage"
    w._stop.set()
    w._thread.join()  # type: ignore[union-attr]
    n = len(scrapes)
    assert during >= 60 and w.stats.failed > 0
    window = int(time.time() - t0) + 5
    res = prom.query(f'count_over_time(rwtest_events_total{{kind="outage"}}[{window}s])')
    assert float(res[0]["value"][1]) == n
    # in order: the counter went up by exactly one per sample, never down
    assert float(prom.query(f'resets(rwtest_events_total{{kind="outage"}}[{window}s])')[0]["value"][1]) == 0
    assert float(prom.query(f'changes(rwtest_events_total{{kind="outage"}}[{window}s])')[0]["value"][1]) == n - 1


def test_a_tiny_spool_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    reg, c = registry_with_counter()
    c.labels(kind="x").inc()
    spool = Spool(str(tmp_path / "spool"), 10_000_000)
    w = RemoteWriter(f"http://127.0.0.1:{free_port()}/api/v1/write", reg, spool, backoff=(0, 0))
    n = w.scrape()
    one = spool.bytes
    spool.max_bytes = 3 * one + one // 2  # room for three requests
    for _ in range(9):
        w.scrape()
        w.send_pending()
    assert len(spool) == 3
    assert spool.bytes <= spool.max_bytes
    assert sum(p.stat().st_size for p in (tmp_path / "spool").iterdir()) == spool.bytes
    assert w.stats.dropped["spool_full"] == 7 * n
    assert "Connection refused" in w.stats.last_error


def test_a_400_answer_is_dropped_not_retried_forever(prom: PrometheusServer, tmp_path: Path) -> None:
    reg, c = registry_with_counter()
    c.labels(kind="old").inc()
    w = RemoteWriter(prom.write_url, reg, Spool(str(tmp_path / "spool"), 10_000_000), backoff=(0, 0))
    n = w.scrape()  # a current sample first: it opens Prometheus' head block
    w.send_pending()
    assert w.stats.requests == 1 and w.stats.sent == n
    w.scrape(int(time.time() * 1000) - 3 * 24 * 3600 * 1000)  # 3 days old: out of bounds, 400
    w.send_pending()
    w.send_pending()
    assert w.stats.requests == 2 and len(w.spool) == 0
    assert w.stats.dropped["rejected"] == n
    c.labels(kind="old").inc()
    w.scrape()  # and a good one still goes through
    w.send_pending()
    assert w.stats.requests == 3 and value(prom, 'rwtest_events_total{kind="old"}') == 2


def test_tls_with_the_test_ca_a_wrong_ca_and_skip_verify(tmp_path: Path) -> None:
    ca, cert, key = make_test_ca(str(tmp_path), "ca")
    other, _, _ = make_test_ca(str(tmp_path), "other")
    prom = PrometheusServer(str(tmp_path / "prom"), tls=(cert, key))
    prom.start()
    try:
        reg, c = registry_with_counter()
        c.labels(kind="tls").inc(3)
        wrong = RemoteWriter(prom.write_url, reg, Spool(str(tmp_path / "s1"), 10_000_000), ca_file=other)
        wrong.scrape()
        wrong.send_pending()
        assert len(wrong.spool) == 1 and "CERTIFICATE_VERIFY_FAILED" in wrong.stats.last_error
        right = RemoteWriter(prom.write_url, reg, Spool(str(tmp_path / "s1"), 10_000_000), ca_file=ca)
        right.send_pending()  # the request spooled under the wrong CA, now delivered
        assert len(right.spool) == 0 and right.stats.sent > 0
        c.labels(kind="tls").inc(2)
        skip = RemoteWriter(prom.write_url, reg, Spool(str(tmp_path / "s2"), 10_000_000), ca_file=other,
                            skip_verify=True)
        skip.scrape()
        skip.send_pending()
        assert len(skip.spool) == 0 and skip.stats.last_error == ""
        assert value(prom, 'rwtest_events_total{kind="tls"}') == 5
    finally:
        prom.stop()
