"""Go crypto/tls in Go's older stack ABI (ABI0: Go before 1.17 on amd64): the HTTPS client and
server of tests/system/workloads/gotls/ built here with Go 1.15 (Debian bullseye's golang-1.15,
fetched once and cached by tests.gobuild.old_go), traced through the stack-ABI programs of
bpf/l7.c (arguments and results read from the goroutine's stack, a Read keyed by its
*tls.Conn). A normal build, a stripped one (`-ldflags="-s -w"`) and the server:
exact request counts by status on both sides and one span per request with tls="true"."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.l7 import gotls
from tests.gobuild import go_build, old_go
from tests.system.helpers import (
    AgentProcess,
    TestCgroups,
    free_port,
    make_test_ca,
    wait_for,
    wait_port,
)
from tests.system.l7helpers import (
    ReadyClient,
    check_tls_client_side,
    nginx_in,
    tls_diagnostics,
    wait_counts,
)
from tests.system.servers import Nginx

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

WORKLOADS = Path(__file__).parent / "workloads" / "gotls"
OK, MISSING = 60, 25


@dataclass
class GoBuilds:
    client: str
    stripped: str
    server: str


@pytest.fixture(scope="module")
def go(tmp_path_factory: pytest.TempPathFactory) -> GoBuilds:
    work = tmp_path_factory.mktemp("gobuild115")
    toolchain = old_go("1.15")
    client = WORKLOADS / "client.go"
    builds = GoBuilds(client=go_build(client, work / "client", work, go=toolchain),
                      stripped=go_build(client, work / "client-stripped", work, "-ldflags=-s -w", go=toolchain),
                      server=go_build(WORKLOADS / "server.go", work / "server", work, go=toolchain))
    for binary in (builds.client, builds.stripped, builds.server):
        found = gotls.inspect_path(binary)
        assert (gotls.parse_version(found.version), found.abi) == ((1, 15), gotls.STACK), found
    return builds


@pytest.fixture
def nginx(cgroups: TestCgroups) -> Iterator[tuple[Nginx, str]]:
    with nginx_in(cgroups, "gotls0-nginx") as server:
        yield server


def attached(agent: AgentProcess, binary: str) -> str:
    """The agent's log line on the Go TLS probes of `binary`, once they are attached."""
    ok = wait_for(lambda: f"Go crypto/tls uprobes on {binary} " in agent.log(), 20)
    assert ok, "\n".join(line for line in agent.log().splitlines() if "TLS" in line or "ERROR" in line)
    return agent.log().split(f"Go crypto/tls uprobes on {binary} ")[1].split("\n")[0]


@pytest.mark.parametrize("build", ["normal", "stripped"])
def test_go115_https_client_to_nginx_counted_exactly_with_tls_spans(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], go: GoBuilds, build: str) -> None:
    server, server_cid = nginx
    binary = {"normal": go.client, "stripped": go.stripped}[build]
    cid = cgroups.create(f"gotls0-{build}")
    client = ReadyClient(cgroups, cid, [binary, "-wait", "-ca", server.ca, f"https://127.0.0.1:{server.tls_port}",
                         f"/ok:{OK}", f"/missing:{MISSING}"], "Go")
    line = attached(agent, binary)
    assert "stack ABI" in line and "go1.15" in line, line
    assert ("functions from symtab" if build == "normal" else "functions from pclntab") in line, line
    assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
    try:
        check_tls_client_side(agent, cid, server.tls_port, OK, MISSING)
        want = {"2xx": OK, "4xx": MISSING}  # nginx (OpenSSL) saw the same requests
        assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want
        details = [f["detail"] for p in agent.processes() for f in p.get("tls", []) if f.get("path") == binary]
        assert details and all("Go crypto/tls (stack ABI): attached" in d for d in details), details
    finally:
        client.finish()


def test_go115_https_server_inbound_counts_exact(
        agent: AgentProcess, cgroups: TestCgroups, go: GoBuilds, tmp_path: Path) -> None:
    ca, cert, key = make_test_ca(str(tmp_path), "goserver115")
    port = free_port()
    server_cid = cgroups.create("gotls0-server")
    server = cgroups.spawn(server_cid, [go.server, "-cert", cert, "-key", key, f"127.0.0.1:{port}"])
    try:
        wait_port("127.0.0.1", port, proc=server)
        assert "stack ABI" in attached(agent, go.server)
        cid = cgroups.create("gotls0-server-client")
        client = ReadyClient(cgroups, cid, [go.client, "-wait", "-ca", ca, f"https://127.0.0.1:{port}",
                             f"/ok:{OK}", f"/missing:{MISSING}"], "Go")
        attached(agent, go.client)
        assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
        try:
            want = {"2xx": OK, "4xx": MISSING}
            assert wait_counts(agent, "container_http_inbound_requests_total", want,
                               container_id=server_cid) == want, tls_diagnostics(agent, server_cid)
            check_tls_client_side(agent, cid, port, OK, MISSING)
        finally:
            client.finish()
    finally:
        server.kill()
        server.wait()
