"""HTTP/2 and gRPC against real servers: a grpcio server and client (cleartext HTTP/2, one
connection multiplexing unary and server-streaming calls) and nginx serving h2c to curl; clients
and servers in test cgroups, exact counts by status on both sides, spans with gRPC status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.system.helpers import REPO, AgentProcess, TestCgroups, free_port, wait_port
from tests.system.l7helpers import spans, wait_counts
from tests.system.servers import Nginx

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

PEER = [sys.executable, "-m", "tests.system.workloads.grpc_peer"]


@pytest.fixture(scope="module")
def grpc_server(agent: AgentProcess) -> Iterator[tuple[int, str]]:
    cg = TestCgroups()
    cid = cg.create("grpc-server")
    port = free_port()
    p = cg.spawn(cid, [*PEER, "server", str(port)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert p.stdout is not None and json.loads(p.stdout.readline())["port"] == port
        wait_port("127.0.0.1", port)
        yield port, cid
    finally:
        cg.cleanup()


def test_grpc_calls_by_status_on_both_sides_and_spans(agent: AgentProcess, cgroups: TestCgroups,
                                                      grpc_server: tuple[int, str]) -> None:
    port, server_cid = grpc_server
    ok, fail = 25, 7
    cid = cgroups.create("grpc-client")
    p = cgroups.spawn(cid, [*PEER, "client", str(port), str(ok), str(fail)], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, cwd=REPO)
    assert p.stdout is not None and p.stdin is not None
    result = json.loads(p.stdout.readline())
    assert result == {"codes": {"OK": ok, "NOT_FOUND": fail}, "stream_items": 3}
    want = {"grpc:OK": ok + 1, "grpc:NOT_FOUND": fail}
    dest = f"127.0.0.1:{port}"
    out = wait_counts(agent, "container_http_requests_total", ok + fail + 1, container_id=cid, destination=dest)
    inbound = wait_counts(agent, "container_http_inbound_requests_total", ok + fail + 1, container_id=server_cid)
    p.stdin.close()
    p.wait(10)
    assert out == want
    assert inbound == want
    got = spans(agent, cid, ok + fail + 1, where=f"ResourceAttributes['container.id'] = '{cid}'")
    assert len(got) == ok + fail + 1
    by = {}
    for s in got:
        a = s["SpanAttributes"]
        key = (s["SpanName"], a["http.url"], a.get("rpc.grpc.status_code"), a.get("http.status_code"), s["StatusCode"])
        by[key] = by.get(key, 0) + 1
    assert by == {
        ("POST", f"http://{dest}/test.Svc/Unary", "0", "200", "STATUS_CODE_UNSET"): ok,
        ("POST", f"http://{dest}/test.Svc/Unary", "5", "200", "STATUS_CODE_ERROR"): fail,
        ("POST", f"http://{dest}/test.Svc/Stream", "0", "200", "STATUS_CODE_UNSET"): 1,
    }


class H2cNginx(Nginx):
    """nginx whose plain port speaks HTTP/2 with prior knowledge (h2c)."""

    def __init__(self) -> None:
        super().__init__()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace(f"listen {self.host}:{self.port};", f"listen {self.host}:{self.port} http2;"))


def test_http2_through_nginx_by_status_on_both_sides(agent: AgentProcess, cgroups: TestCgroups) -> None:
    server_cid = cgroups.create("nginx-h2")
    n = H2cNginx()
    try:
        n.start(cgroups, server_cid)
        cid = cgroups.create("h2-client")
        base = f"http://127.0.0.1:{n.port}"
        urls = [f"{base}/ok"] * 12 + [f"{base}/missing"] * 5 + [f"{base}/fail"] * 3
        # one connection per request: curl 7.88 fails a second h2c transfer on a reused connection
        loop = 'for u in "$@"; do curl -s --http2-prior-knowledge -o /dev/null -w "%{http_code}\\n" "$u"; done'
        p = cgroups.spawn(cid, ["sh", "-c", loop, "sh", *urls], stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=30)
        assert out.decode().split() == ["200"] * 12 + ["404"] * 5 + ["500"] * 3
        want = {"2xx": 12, "4xx": 5, "5xx": 3}
        got = wait_counts(agent, "container_http_requests_total", 20, container_id=cid,
                          destination=f"127.0.0.1:{n.port}")
        assert got == want
        assert wait_counts(agent, "container_http_inbound_requests_total", 20, container_id=server_cid) == want
    finally:
        n.stop()
