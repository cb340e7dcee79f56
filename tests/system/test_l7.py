"""L7 tracing against real servers from Debian (nginx plain and TLS, PostgreSQL, Redis, dnsmasq)
with clients in test cgroups: exact request counts by status on both sides, spans with what
the client sent, secrets masked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.helpers import (
    L7_CLIENT,
    REPO,
    AgentProcess,
    TestCgroups,
    TwoHosts,
    bpf_programs,
    rows,
    run_client,
    wait_for,
)
from tests.system.l7helpers import by_status, nginx_in, spans, wait_counts
from tests.system.servers import Dnsmasq, Nginx, Postgres, Redis

pytestmark = [pytest.mark.agent_args("--max-fqdns-per-container", "2", "--exclude-http-requests-by-path", "/excluded"), pytest.mark.agent_without("profiling")]
BEARER = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu"


def span_drops(agent: AgentProcess) -> float:
    """Requests whose span the agent could not make, as it counts them: kernel events lost to a
    full buffer, outbound requests whose connection was never seen, deferred events dropped."""
    return sum(v for n, lb, v in agent.metrics()
               if (n == "coroot_agent_lost_events_total" and lb.get("what") == "l7_events")
               or n in ("coroot_agent_l7_unattributed_total", "coroot_agent_l7_deferred_dropped_total"))


@pytest.fixture
def nginx(cgroups: TestCgroups) -> Iterator[tuple[Nginx, str]]:
    with nginx_in(cgroups, "nginx") as server:
        yield server


def test_a_client_gone_before_the_agent_read_it_is_counted_in_its_container(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str]) -> None:
    """A short-lived client (a curl in a script) that has exited when a busy agent reads its
    events, so /proc no longer has it: its exec event's cgroup places it. The agent is stopped
    (SIGSTOP) while the client runs, so all its events wait in the buffers until it is gone."""
    server, _ = nginx
    cid = cgroups.create("gone-client")
    base = f"http://127.0.0.1:{server.port}"
    placed = agent.value("coroot_agent_processes_placed_from_events_total") or 0
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        p = cgroups.spawn(cid, ["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                                f"{base}/ok", f"{base}/ok", f"{base}/missing"])
        assert p.wait(30) == 0
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    want = {"2xx": 2, "4xx": 1}
    assert wait_counts(agent, "container_http_requests_total", want, container_id=cid) == want
    assert (agent.value("coroot_agent_processes_placed_from_events_total") or 0) > placed


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_nginx_requests_by_status_on_both_sides_and_one_span_each(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], tls: bool) -> None:
    server, server_cid = nginx
    if tls:  # the OpenSSL uprobes are attached (kprobe-type programs), which --disable-l7-tracing must not do
        assert 2 in {p.get("prog_type") for p in bpf_programs(agent.proc.pid).values()}  # type: ignore[union-attr]
        assert agent.value("coroot_agent_tls_libraries") >= 1
    drops_before = span_drops(agent)
    cid = cgroups.create("http-client")
    port = server.tls_port if tls else server.port
    args = ["http", "127.0.0.1", str(port), *(["--ca", server.ca] if tls else []),
            "--header", f"Authorization:Bearer {BEARER}", "--header", f"Cookie:session={BEARER}",
            "/ok?token=s3cret:100", "/missing:30", "/fail:20"]
    client = run_client(cgroups, cid, *args)
    assert client.result["statuses"] == {"200": 100, "404": 30, "500": 20}
    want = {"2xx": 100, "4xx": 30, "5xx": 20}
    dest = f"127.0.0.1:{port}"
    assert wait_counts(agent, "container_http_requests_total", want, container_id=cid) == want
    assert by_status(agent, "container_http_requests_total", container_id=cid, destination=dest,
                     actual_destination=dest) == want
    assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want
    # the histogram carries the node agent's labels: no status
    hist = [(lb, v) for n, lb, v in agent.metrics()
            if n == "container_http_requests_duration_seconds_total_count" and lb.get("container_id") == cid]
    assert [v for _, v in hist] == [150]
    assert set(hist[0][0]) == {"container_id", "app_id", "destination", "actual_destination", "machine_id",
                               "system_uuid"}

    got = spans(agent, cid, 150)
    client.finish()
    # Every request a span, unless the agent dropped its event and counted the drop (a full
    # buffer on a loaded machine): a span missing without a counted drop fails.
    dropped = span_drops(agent) - drops_before
    assert len(got) == 150 or 150 - len(got) <= dropped, "\n".join(
        [f"{len(got)} spans, {dropped:.0f} drops counted"] + [f"{n} {lb} {v}" for n, lb, v in agent.metrics() if n.startswith(
            ("coroot_agent_l7", "coroot_agent_lost", "coroot_agent_store", "coroot_agent_tls"))])
    scheme = "https" if tls else "http"
    urls: dict[tuple[str, str], int] = {}
    for s in got:
        attrs = s["SpanAttributes"]
        assert s["SpanName"] == "GET" and s["SpanKind"] == "SPAN_KIND_CLIENT"
        assert attrs["http.method"] == "GET" and attrs["net.peer.port"] == str(port)
        assert attrs["net.peer.name"] == "127.0.0.1" and attrs["net.sock.peer.addr"] == "127.0.0.1"
        assert (attrs.get("tls") == "true") is tls
        assert s["ResourceAttributes"]["container.id"] == cid and s["ResourceAttributes"]["service.name"] == cid
        key = (attrs["http.url"], attrs["http.status_code"])
        urls[key] = urls.get(key, 0) + 1
        assert s["StatusCode"] == ("STATUS_CODE_UNSET" if attrs["http.status_code"] == "200" else "STATUS_CODE_ERROR")
    sent = {(f"{scheme}://{dest}/ok?token=*", "200"): 100, (f"{scheme}://{dest}/missing", "404"): 30,
            (f"{scheme}://{dest}/fail", "500"): 20}
    if len(got) == 150:
        assert urls == sent
    else:  # the counted drops above: what is there is what was sent
        assert set(urls) <= set(sent) and all(urls[k] <= sent[k] for k in urls), urls
    # The secrets the client sent reach no column of any stored span (the store itself is asked).
    for secret in ("s3cret", BEARER, "Bearer"):
        found = rows(agent, "SELECT count() AS n FROM otel_traces WHERE position(concat(toString(SpanAttributes), "
                            f"toString(ResourceAttributes), SpanName, StatusMessage), '{secret}') > 0")
        assert found == [{"n": 0}], secret
    # The kernel measures from the request's write to the response's read; the client adds its
    # own work around both, so each of its figures is larger: the k-th shortest span is no longer
    # than the client's k-th shortest request (by how much depends on the machine's load).
    kernel = sum(int(s["Duration"]) for s in got) / 1e9
    measured = sum(client.result["durations"])
    assert 0 < kernel <= measured
    if len(got) == 150:
        pairs = zip(sorted(int(s["Duration"]) / 1e9 for s in got), sorted(client.result["durations"]), strict=True)
        assert all(0 < k <= m for k, m in pairs), (kernel, measured)
    # Inbound HTTP is counted in the kernel per process: the counts outlive nginx's workers.
    server.stop()
    wait_for(lambda: not any(p["comm"] == "nginx" for p in agent.processes()
                             if p["container_id"] == server_cid), 10)
    assert by_status(agent, "container_http_inbound_requests_total", container_id=server_cid) == want


def test_a_libssl_copy_mapped_after_the_agent_started_gets_its_own_uprobes(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], tmp_path: Path) -> None:
    server, _ = nginx
    system = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    if not os.path.exists(system):
        system = subprocess.run(["sh", "-c", "ldconfig -p | awk '/libssl.so.3 /{print $NF; exit}'"],
                                capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(system, tmp_path / "libssl.so.3")  # another file (inode): not attached yet
    before = agent.value("coroot_agent_tls_libraries")
    cid = cgroups.create("tls-late")
    client = run_client(cgroups, cid, "wait", "http", "127.0.0.1", str(server.tls_port), "--ca", server.ca, "/late:5",
                        env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert client.result == {"ready": True}
    maps = open(f"/proc/{client.proc.pid}/maps").read()
    assert str(tmp_path / "libssl.so.3") in maps
    wait_for(lambda: agent.value("coroot_agent_tls_libraries") == before + 1, 15)
    assert client.proc.stdin is not None and client.proc.stdout is not None
    client.proc.stdin.write("go\n")
    client.proc.stdin.flush()
    assert json.loads(client.proc.stdout.readline())["statuses"] == {"200": 5}
    got = spans(agent, cid, 5)
    client.finish()
    assert [s["SpanAttributes"]["tls"] for s in got] == ["true"] * 5
    assert {s["SpanAttributes"]["http.url"] for s in got} == {f"https://127.0.0.1:{server.tls_port}/late"}


def test_excluded_path_and_opted_out_container_have_metrics_but_no_spans(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str]) -> None:
    server, _ = nginx
    cid, quiet = cgroups.create("http-excl"), cgroups.create("http-optout")
    a = run_client(cgroups, cid, "http", "127.0.0.1", str(server.port), "/excluded:7", "/kept:3")
    b = run_client(cgroups, quiet, "http", "127.0.0.1", str(server.port), "/kept:4",
                   env={"COROOT_EBPF_TRACES": "disabled"})
    assert wait_counts(agent, "container_http_requests_total", {"2xx": 10}, container_id=cid) == {"2xx": 10}
    assert wait_counts(agent, "container_http_requests_total", {"2xx": 4}, container_id=quiet) == {"2xx": 4}
    got = spans(agent, cid, 3)
    assert sorted(s["SpanAttributes"]["http.url"].rsplit("/", 1)[1] for s in got) == ["kept"] * 3
    assert rows(agent, f"SELECT count() AS n FROM otel_traces WHERE ServiceName = '{quiet}'") == [{"n": 0}]
    a.finish()
    b.finish()


def test_sampling_a_tenth_counts_every_request_and_spans_about_a_tenth(cgroups: TestCgroups) -> None:
    """Also: an agent started while connections come and go loses no hand-off to the L7
    program (its syscall probes attach only once what they tail-call is loaded; before, ~230
    calls of such a client were lost while the verifier ran)."""
    n = Nginx()
    sampled = AgentProcess(["--min-container-age", "0s", "--traces-sampling", "0.1", "--store-batch-age", "1s"])
    churn = None
    try:
        n.start(cgroups, cgroups.create("nginx-sampled"))
        churn = cgroups.spawn(cgroups.create("http-churn"), [*L7_CLIENT, "http", "127.0.0.1", str(n.port), "--reconnect",
                                                            "/churn:1000000"],
                              env=os.environ | {"COROOT_EBPF_TRACES": "disabled"}, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, cwd=REPO)
        sampled.start()
        assert sampled.value("coroot_agent_l7_kernel_total", what="requests") > 0  # the churn was seen
        assert sampled.value("coroot_agent_l7_kernel_total", what="handoff_lost") == 0
        churn.kill()
        cid = cgroups.create("http-sampled")
        c = run_client(cgroups, cid, "http", "127.0.0.1", str(n.port), "/s:1000")
        assert wait_counts(sampled, "container_http_requests_total", {"2xx": 1000}, container_id=cid) == {"2xx": 1000}
        sql = f"SELECT count() AS n FROM otel_traces WHERE ServiceName = '{cid}'"
        seen: list[int] = []

        def settled() -> bool:  # the same count twice, 2 s apart (the sink writes every 1 s)
            seen.append(rows(sampled, sql)[0]["n"])
            return len(seen) > 1 and seen[-1] == seen[-2] > 0

        wait_for(settled, 30, interval=2)
        assert 60 <= seen[-1] <= 140, seen  # binomial(1000, 0.1): mean 100, sd 9.5
        c.finish()
    finally:
        if churn is not None:
            churn.kill()
        sampled.stop()
        shutil.rmtree(sampled.storage, ignore_errors=True)
        n.stop()


def test_postgres_queries_ok_and_failed_with_literals_masked(agent: AgentProcess, cgroups: TestCgroups) -> None:
    server_cid, cid = cgroups.create("postgres"), cgroups.create("pg-client")
    pg = Postgres()
    try:
        pg.start(cgroups, server_cid)
        client = run_client(cgroups, cid, "pg", pg.dsn)
        assert client.result == {"ok": 50, "failed": 5}
        want = {"ok": 50, "failed": 5}
        assert wait_counts(agent, "container_postgres_queries_total", want, container_id=cid) == want
        assert wait_counts(agent, "container_postgres_inbound_queries_total", want, container_id=server_cid) == want
        got = spans(agent, cid, 55)
        client.finish()
        assert len(got) == 55
        statements: dict[str, int] = {}
        for s in got:
            a = s["SpanAttributes"]
            assert s["SpanName"] == "query" and a["db.system"] == "postgresql"
            statements[a["db.statement"]] = statements.get(a["db.statement"], 0) + 1
        assert statements == {
            "SELECT ? AS n, ? AS s": 20,
            "SELECT $1::int + ?, $2::text": 15,
            "SELECT $1::int * ?": 15,
            "SELECT * FROM missing_table_0": 1, "SELECT * FROM missing_table_2": 1, "SELECT * FROM missing_table_4": 1,
            "SELECT ? / ?": 2,
        }
        errors = sorted(s["StatusMessage"] for s in got if s["StatusCode"] == "STATUS_CODE_ERROR")
        assert errors == ["22012", "22012", "42P01", "42P01", "42P01"]  # SQLSTATE only: messages can hold values
        assert not any("secret" in json.dumps(s) or "hunter2" in json.dumps(s) for s in got)
    finally:
        pg.stop()


def test_redis_commands_errors_pipeline_and_auth_masked(agent: AgentProcess, cgroups: TestCgroups) -> None:
    server_cid, cid = cgroups.create("redis"), cgroups.create("redis-client")
    r = Redis(password="redis-pass-secret")
    try:
        r.start(cgroups, server_cid)
        client = run_client(cgroups, cid, "redis", "127.0.0.1", str(r.port), r.password)
        assert client.result == {"set": 40, "get": 60, "errors": 5}
        want = {"ok": 101, "failed": 5}  # 40 SET + 40 GET + a pipeline of 20 GET + AUTH; 5 WRONGTYPE
        assert wait_counts(agent, "container_redis_queries_total", want, container_id=cid) == want
        assert wait_counts(agent, "container_redis_inbound_queries_total", want, container_id=server_cid) == want
        got = spans(agent, cid, 106)
        client.finish()
        names: dict[tuple[str, str], int] = {}
        for s in got:
            names[(s["SpanName"], s["StatusCode"])] = names.get((s["SpanName"], s["StatusCode"]), 0) + 1
            assert s["SpanAttributes"]["db.system"] == "redis"
        assert names == {("SET", "STATUS_CODE_UNSET"): 40, ("GET", "STATUS_CODE_UNSET"): 60, ("AUTH", "STATUS_CODE_UNSET"): 1,
                         ("LPUSH", "STATUS_CODE_ERROR"): 5}
        statements = {s["SpanAttributes"]["db.statement"] for s in got}
        assert "AUTH ?" in statements and "SET key:7 ?" in statements and "GET key:3" in statements
        assert not any("secret" in json.dumps(s) for s in got)
    finally:
        r.stop()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dns_requests_by_type_domain_and_rcode_with_fqdn_cap(agent: AgentProcess, cgroups: TestCgroups,
                                                            transport: str) -> None:
    hosts = TwoHosts()
    netns_etc = f"/etc/netns/{hosts.cli}"
    dnsmasq = Dnsmasq(hosts.srv_ip, {"svc1.test": ("10.9.0.1", "fd00::9:1"), "svc2.test": ("10.9.0.2",)}, nxdomain=["gone.test"])
    try:
        os.makedirs(netns_etc)
        with open(f"{netns_etc}/resolv.conf", "w") as f:  # `ip netns exec` binds it over /etc/resolv.conf
            # use-vc: glibc asks over TCP (each query after its length, in one writev)
            f.write(f"nameserver {hosts.srv_ip}\noptions attempts:1 timeout:2{' use-vc' if transport == 'tcp' else ''}\n")
        server_cid = cgroups.create(f"dns-server-{transport}")
        dnsmasq.start(hosts.argv(hosts.srv), cgroups, server_cid)
        cid = cgroups.create("dns-client")
        client = run_client(cgroups, cid, "dns", "svc1.test", "svc1.test", "svc1.test", "svc2.test", "svc2.test",
                            "gone.test", argv_prefix=tuple(hosts.argv(hosts.cli)))
        assert client.result["svc1.test"] == ["10.9.0.1", "fd00::9:1"] and client.result["svc2.test"] == ["10.9.0.2"]
        want = {
            ("TypeA", "svc1.test", "ok"): 3, ("TypeAAAA", "svc1.test", "ok"): 3,
            ("TypeA", "svc2.test", "ok"): 2, ("TypeAAAA", "svc2.test", "refused"): 2,  # no IPv6 address
            # the cap is 2 domains per container: the third is counted under "~other"
            ("TypeA", "~other", "nxdomain"): 1, ("TypeAAAA", "~other", "nxdomain"): 1,
        }
        got: dict[tuple[str, str, str], float] = {}

        def done() -> bool:
            got.clear()
            for n, lb, v in agent.metrics():
                if n == "container_dns_requests_total" and lb.get("container_id") == cid:
                    got[(lb["request_type"], lb["domain"], lb["status"])] = v
            return sum(got.values()) >= sum(want.values())

        wait_for(done, 20)
        assert got == want
        assert agent.value("ip_to_fqdn", ip="10.9.0.1") == 1 and agent.value("ip_to_fqdn", ip="fd00::9:1") == 1
        assert agent.value("ip_to_fqdn", fqdn="svc2.test") == 1
        # The server's side, as the node agent counts it: the answer's response code as a generic
        # L7 status (NOERROR "unknown", NXDOMAIN "3", REFUSED "5"), over UDP; DNS over TCP is not
        # recognised on an accepted connection (nor by the node agent: its header check sees the
        # length prefix).
        inbound = {"unknown": 8, "5": 2, "3": 2} if transport == "udp" else {}
        if inbound:
            assert wait_counts(agent, "container_dns_inbound_requests_total", inbound, container_id=server_cid) == inbound
            assert agent.value("container_dns_inbound_requests_duration_seconds_total_count",
                               container_id=server_cid) == 12
        assert by_status(agent, "container_dns_inbound_requests_total", container_id=server_cid) == inbound
        assert by_status(agent, "container_dns_inbound_requests_total", container_id=cid) == {}
        assert not [lb for n, lb, _ in agent.metrics()
                    if n == "container_dns_requests_total" and lb.get("container_id") == server_cid]
        client.finish()
    finally:
        dnsmasq.stop()
        shutil.rmtree(netns_etc, ignore_errors=True)
        hosts.cleanup()


def test_dns_request_types_domains_and_empty_answers_as_the_node_agent_counts_them(
        agent: AgentProcess, cgroups: TestCgroups) -> None:
    """dnsmasq answering raw queries from UDP sockets connected to it, one client container per
    two domains (the module's cap): request types by dnsmessage's names or the type's number,
    the domain as the answer's question spells it (case kept), normalised (PTR, a "com" label
    followed by a search suffix), NOERROR AAAA answers without an address not counted
    (--filter-AAAA makes them), REFUSED counted, the third domain of a container "~other"."""
    hosts = TwoHosts()
    dnsmasq = Dnsmasq(hosts.srv_ip, {"db.example.com.test": ("10.9.0.4",)}, nxdomain=["gone.test"], options=[
        "--host-record=v4only.test,10.9.0.3", "--srv-host=_pg._tcp.svc.test,db1.svc.test,5432",
        "--txt-record=txt.test,hello", "--filter-AAAA"])
    try:
        server_cid = cgroups.create("dnsq-server")
        dnsmasq.start(hosts.argv(hosts.srv), cgroups, server_cid)
        plan = {
            "dnsq-case-srv": ["1:V4Only.Test", "1:V4Only.Test", "33:_pg._tcp.svc.test"],
            "dnsq-empty-txt-ptr": ["28:v4only.test", "28:v4only.test", "28:v4only.test", "16:txt.test",
                                   "12:3.0.9.10.in-addr.arpa"],
            "dnsq-suffix-refused-cap": ["1:db.example.com.test", "65:txt.test", "1:gone.test"],
        }
        want = {
            "dnsq-case-srv": {("TypeA", "V4Only.Test", "ok"): 2, ("TypeSRV", "_pg._tcp.svc.test", "ok"): 1},
            "dnsq-empty-txt-ptr": {("TypeTXT", "txt.test", "ok"): 1, ("TypePTR", "IP.in-addr.arpa", "ok"): 1},
            "dnsq-suffix-refused-cap": {("TypeA", "db.example.com.search_path_suffix", "ok"): 1,
                                        ("65", "txt.test", "refused"): 1, ("TypeA", "~other", "nxdomain"): 1},
        }
        cids = {name: cgroups.create(name) for name in plan}
        clients = []
        for name, queries in plan.items():
            c = run_client(cgroups, cids[name], "dnsq", hosts.srv_ip, *queries, argv_prefix=tuple(hosts.argv(hosts.cli)))
            clients.append(c)
            assert c.result["rcodes"] == {"dnsq-case-srv": [0, 0, 0], "dnsq-empty-txt-ptr": [0, 0, 0, 0, 0],
                                          "dnsq-suffix-refused-cap": [0, 5, 3]}[name]
        inbound = {"unknown": 9, "5": 1, "3": 1}  # every query the server answered, the empty AAAA ones too
        assert wait_counts(agent, "container_dns_inbound_requests_total", inbound, container_id=server_cid) == inbound

        def counted(cid: str) -> dict[tuple[str, str, str], float]:
            return {(lb["request_type"], lb["domain"], lb["status"]): v for n, lb, v in agent.metrics()
                    if n == "container_dns_requests_total" and lb.get("container_id") == cid}

        wait_for(lambda: all(counted(cids[n]) == w for n, w in want.items()), 20)
        for name, w in want.items():
            assert counted(cids[name]) == w, name
            assert agent.value("container_dns_requests_duration_seconds_total_count",
                               container_id=cids[name]) == sum(w.values()), name  # no empty AAAA observed
        assert agent.value("ip_to_fqdn", ip="10.9.0.3", fqdn="V4Only.Test") == 1
        assert agent.value("ip_to_fqdn", ip="10.9.0.4", fqdn="db.example.com.search_path_suffix") == 1
        for c in clients:
            c.finish()
    finally:
        dnsmasq.stop()
        hosts.cleanup()


def test_disabled_l7_tracing_attaches_nothing_and_no_spans_keeps_metrics(cgroups: TestCgroups) -> None:
    server_cid = cgroups.create("nginx-off")
    n = Nginx().start(cgroups, server_cid)
    try:
        off = AgentProcess(["--min-container-age", "0s", "--disable-l7-tracing"])
        off.start()
        try:
            progs = bpf_programs(off.proc.pid)  # type: ignore[union-attr]
            types = {p.get("prog_type") for p in progs.values()}
            assert 5 in types and 2 not in types  # tracepoints, and no kprobe-type (uprobe) programs
            assert "coroot_agent_tls_libraries" not in off.get("/metrics")
            cid = cgroups.create("http-off")
            c = run_client(cgroups, cid, "http", "127.0.0.1", str(n.port), "/ok:5")
            wait_for(lambda: off.value("container_net_tcp_successful_connects_total", container_id=cid) == 1, 20)
            assert not any(name.startswith("container_http") for name, _, _ in off.metrics())
            c.finish()
        finally:
            off.stop()
            shutil.rmtree(off.storage, ignore_errors=True)

        for flags in (["--traces-sampling", "0"], ["--disable-traces"]):  # metrics either way, no spans
            quiet = AgentProcess(["--min-container-age", "0s", *flags])
            quiet.start()
            try:
                cid = cgroups.create("http-nospans")
                c = run_client(cgroups, cid, "http", "127.0.0.1", str(n.port), "/ok:25")
                assert wait_counts(quiet, "container_http_requests_total", {"2xx": 25}, container_id=cid) == {"2xx": 25}
                assert quiet.value("coroot_agent_l7_spans_total") == 0, flags
                c.finish()
            finally:
                quiet.stop()
                shutil.rmtree(quiet.storage, ignore_errors=True)
    finally:
        n.stop()


def test_a_forking_server_serves_its_connections_from_the_child_that_reads_them(
        agent: AgentProcess, cgroups: TestCgroups) -> None:
    """Postgres's postmaster accepts, may fork another child (an autovacuum worker) before the
    backend, then forks the backend and closes its copy: each accepted connection is the
    server-side connection of every child forked until the accepting process closes it, so the
    one that reads the requests is counted (the first child alone got it before, and under load
    a whole Postgres connection's server side went uncounted)."""
    server_cid = cgroups.create("forking-server")
    srv = cgroups.spawn(server_cid, [sys.executable, "-m", "tests.system.workloads.forking_server"],
                        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert srv.stdout is not None
        ready = srv.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        cid = cgroups.create("forking-client")
        clients = [run_client(cgroups, cid, "http", "127.0.0.1", ready[1], "/a:4") for _ in range(3)]
        for c in clients:
            assert c.result["statuses"] == {"200": 4}
        want = {"2xx": 12}
        assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want
        assert wait_counts(agent, "container_http_requests_total", want, container_id=cid) == want
        for c in clients:
            c.finish()
    finally:
        srv.kill()
        srv.wait()


def test_spans_through_dnat_show_the_backend_that_answered(
        agent: AgentProcess, cgroups: TestCgroups, tmp_path: Path) -> None:
    """A client that dials a virtual address DNATed to a backend (as a Kubernetes Service is):
    its TCP and HTTP series keep destination=<virtual> and actual_destination=<backend>, and its
    spans show the backend, as the node agent's NewTrace(ActualDestinationIfKnown()) does:
    net.peer.name/net.peer.port and http.url's host. The Coroot server finds a service's client
    spans by net.peer.name among its instances' listen addresses (inboundSpansFilter)."""
    hosts = TwoHosts()
    vip, port = f"10.201.{hosts.k}.100", "8000"  # on the veth's subnet: routed, then DNATed
    try:
        server_cid = cgroups.create("dnat-server")
        cgroups.spawn(server_cid, hosts.argv(hosts.srv, sys.executable, "-m", "http.server", port, "--bind",
                                             "0.0.0.0", "--directory", str(tmp_path)),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: f":{port} " in hosts.run(hosts.srv, "ss", "-tlnH"), 10)
        nft = hosts.argv(hosts.cli, "nft")
        subprocess.run([*nft, "add table ip cadnat"], check=True)
        subprocess.run([*nft, "add chain ip cadnat out { type nat hook output priority -100 ; }"], check=True)
        subprocess.run([*nft, f"add rule ip cadnat out ip daddr {vip} tcp dport 80 dnat to {hosts.srv_ip}:{port}"],
                       check=True)
        cid = cgroups.create("dnat-client")
        c = run_client(cgroups, cid, "http", vip, "80", "/:4", argv_prefix=tuple(hosts.argv(hosts.cli)))
        assert c.result["statuses"] == {"200": 4}
        lbl = {"destination": f"{vip}:80", "actual_destination": f"{hosts.srv_ip}:{port}"}
        assert wait_counts(agent, "container_http_requests_total", {"2xx": 4}, container_id=cid, **lbl) == {"2xx": 4}
        got = spans(agent, cid, 4)
        peers = {(s["SpanAttributes"]["net.peer.name"], s["SpanAttributes"]["net.peer.port"],
                  s["SpanAttributes"]["http.url"]) for s in got}
        assert peers == {(hosts.srv_ip, port, f"http://{hosts.srv_ip}:{port}/")}, peers
        assert len(got) == 4
        c.finish()
    finally:
        hosts.cleanup()


def test_a_destination_from_an_answer_of_several_public_addresses_is_folded_into_its_domain(
        agent: AgentProcess, cgroups: TestCgroups, tmp_path: Path) -> None:
    """As the node agent labels it (common.NewDestinationKey, common/net.go:261-271): a client
    that dialled an address of a DNS answer with several addresses, all public (documentation
    addresses, only inside the test's namespaces; the module's agent tracks every public IPv4),
    gets destination="<domain>:<port>" and an empty actual_destination on its TCP and HTTP
    series, and its spans net.peer.name=<domain>; an address of a one-address answer keeps its
    address. Private addresses, never folded, are every other test's."""
    folded_ip, other_ip, single_ip, port = "203.0.113.7", "203.0.113.9", "203.0.113.8", "8000"
    hosts = TwoHosts(extra_srv_addrs=(folded_ip, single_ip))
    dnsmasq = Dnsmasq(hosts.srv_ip, {"api.fold.test": (folded_ip, other_ip), "one.fold.test": (single_ip,)})
    try:
        server_cid = cgroups.create("fold-server")
        dnsmasq.start(hosts.argv(hosts.srv), cgroups, server_cid)
        cgroups.spawn(server_cid, hosts.argv(hosts.srv, sys.executable, "-m", "http.server", port, "--bind",
                                             "0.0.0.0", "--directory", str(tmp_path)),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: f":{port} " in hosts.run(hosts.srv, "ss", "-tlnH"), 10)
        resolver = cgroups.create("fold-resolver")  # the address -> domain map is the agent's, not a container's
        dns = run_client(cgroups, resolver, "dnsq", hosts.srv_ip, "1:api.fold.test", "1:one.fold.test",
                         argv_prefix=tuple(hosts.argv(hosts.cli)))
        assert dns.result["rcodes"] == [0, 0]
        assert wait_for(lambda: agent.value("ip_to_fqdn", ip=single_ip, fqdn="one.fold.test") == 1, 10)
        assert agent.value("ip_to_fqdn", ip=folded_ip) is None  # several public addresses: not shown
        cid, cid1 = cgroups.create("fold-client"), cgroups.create("fold-client-single")
        c = run_client(cgroups, cid, "http", folded_ip, port, "/:3", argv_prefix=tuple(hosts.argv(hosts.cli)))
        c1 = run_client(cgroups, cid1, "http", single_ip, port, "/:2", argv_prefix=tuple(hosts.argv(hosts.cli)))
        assert c.result["statuses"] == {"200": 3} and c1.result["statuses"] == {"200": 2}
        folded = {"destination": f"api.fold.test:{port}", "actual_destination": ""}
        single = {"destination": f"{single_ip}:{port}", "actual_destination": f"{single_ip}:{port}"}
        assert wait_counts(agent, "container_http_requests_total", {"2xx": 3}, container_id=cid, **folded) == {"2xx": 3}
        assert wait_counts(agent, "container_http_requests_total", {"2xx": 2}, container_id=cid1, **single) == {"2xx": 2}
        for client, lbl in ((cid, folded), (cid1, single)):
            got = {(n, lb["destination"], lb["actual_destination"]) for n, lb, _ in agent.metrics()
                   if lb.get("container_id") == client and n.startswith(("container_net_tcp", "container_http"))}
            assert {(d, a) for _, d, a in got} == {(lbl["destination"], lbl["actual_destination"])}, got
        # http.server answers HTTP/1.0 and closes: one connect per request
        assert agent.value("container_net_tcp_successful_connects_total", container_id=cid, **folded) == 3
        assert agent.value("container_net_tcp_successful_connects_total", container_id=cid1, **single) == 2
        peers = {(s["SpanAttributes"]["net.peer.name"], s["SpanAttributes"]["net.peer.port"],
                  s["SpanAttributes"]["http.url"]) for s in spans(agent, cid, 3) + spans(agent, cid1, 2)}
        assert peers == {("api.fold.test", port, f"http://api.fold.test:{port}/"),
                         (single_ip, port, f"http://{single_ip}:{port}/")}
        for client in (dns, c, c1):
            client.finish()
    finally:
        dnsmasq.stop()
        hosts.cleanup()
