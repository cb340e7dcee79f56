"""gRPC over TLS: a Go gRPC server and client (Debian's grpc-go, built here in GOPATH mode from
tests/system/workloads/grpctls/peer.go), each in a test cgroup, on one TLS connection that
multiplexes a server-streaming call and good and failing unary calls (three grpc codes), eight
in flight at a time. The
agent reads the plaintext through its Go crypto/tls uprobes and parses it as HTTP/2: exact
counts by `grpc:<CODE>` status on the client's and the server's side, one client span per call
with `rpc.grpc.status_code` and tls="true".

(grpcio, the Python gRPC of test_l7_http2.py, links a stripped BoringSSL of its own: no
symbols, nothing to put a uprobe on; its TLS is not traced.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gobuild import go_build
from tests.system.helpers import AgentProcess, TestCgroups, make_test_ca, wait_for
from tests.system.l7helpers import (
    CgroupServer,
    cgroup_server,
    diagnosis,
    finish,
    spans,
    start_client,
    wait_counts,
)

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

SOURCE = Path(__file__).parent / "workloads" / "grpctls" / "peer.go"
GOCODE = "/usr/share/gocode"  # golang-google-grpc-dev's sources
OK = 30
FAILS = {"NOT_FOUND": (5, 6), "PERMISSION_DENIED": (7, 4), "INVALID_ARGUMENT": (3, 2)}  # name: (code, calls)


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not Path(GOCODE, "src/google.golang.org/grpc").is_dir():
        pytest.fail("grpc-go is not installed: apt-get install golang-google-grpc-dev")
    work = tmp_path_factory.mktemp("grpcbuild")
    return go_build(SOURCE, work / "peer", work, gopath=[GOCODE])


def attached(agent: AgentProcess, binary: str) -> None:
    """Wait until the agent has put its Go crypto/tls uprobes on `binary`."""
    ok = wait_for(lambda: f"Go crypto/tls uprobes on {binary} " in agent.log(), 20)
    assert ok, "\n".join(line for line in agent.log().splitlines() if "TLS" in line or "ERROR" in line)


@pytest.fixture(scope="module")
def server(agent: AgentProcess, peer: str) -> Iterator[CgroupServer]:
    def argv(port: int, workdir: str) -> list[str]:
        _, cert, key = make_test_ca(workdir, "grpc")
        return [peer, "server", "-cert", cert, "-key", key, f"127.0.0.1:{port}"]

    with cgroup_server("grpctls-server", argv) as s:
        attached(agent, peer)  # before the client connects: the HTTP/2 preface must be seen
        yield s


def test_go_grpc_over_tls_by_status_on_both_sides_and_spans(
        agent: AgentProcess, cgroups: TestCgroups, peer: str, server: CgroupServer) -> None:
    cid = cgroups.create("grpctls-client")
    specs = [f"{code}:{n}" for code, n in FAILS.values()]
    p, ready = start_client(cgroups, cid, [peer, "client", "-ca", f"{server.dir}/grpc.pem", server.dest, str(OK),
                                           *specs], "Go gRPC")
    assert ready == {"ready": True}
    assert p.stdin is not None and p.stdout is not None
    try:
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert line, f"the Go gRPC client failed (exit {p.wait(10)})"
        assert json.loads(line) == {"codes": {"OK": OK, **{k: n for k, (_, n) in FAILS.items()}}, "stream_items": 3}
        calls = OK + sum(n for _, n in FAILS.values()) + 1
        want = {"grpc:OK": OK + 1, **{f"grpc:{k}": n for k, (_, n) in FAILS.items()}}
        out = wait_counts(agent, "container_http_requests_total", want, settle=1, container_id=cid,
                          destination=server.dest, actual_destination=server.dest)
        assert out == want, diagnosis(agent)
        inbound = wait_counts(agent, "container_http_inbound_requests_total", want, settle=1,
                              container_id=server.cid)
        assert inbound == want, diagnosis(agent)
        connects = [v for n, lb, v in agent.metrics()
                    if n == "container_net_tcp_successful_connects_total" and lb.get("container_id") == cid]
        assert connects == [1]  # all of it on one connection
        got = spans(agent, cid, calls, settle=1, where=f"ResourceAttributes['container.id'] = '{cid}'")
        by: dict[tuple[str, ...], int] = {}
        for s in got:
            a = s["SpanAttributes"]
            assert s["SpanKind"] == "SPAN_KIND_CLIENT" and a["tls"] == "true", s
            key = (s["SpanName"], a["http.url"], a.get("rpc.grpc.status_code"), a.get("http.status_code"),
                   s["StatusCode"])
            by[key] = by.get(key, 0) + 1
        unary = f"https://{server.dest}/test.Svc/Unary"
        assert by == {
            ("POST", unary, "0", "200", "STATUS_CODE_UNSET"): OK,
            **{("POST", unary, str(code), "200", "STATUS_CODE_ERROR"): n for code, n in FAILS.values()},
            ("POST", f"https://{server.dest}/test.Svc/Stream", "0", "200", "STATUS_CODE_UNSET"): 1,
        }
    finally:
        finish(p)
