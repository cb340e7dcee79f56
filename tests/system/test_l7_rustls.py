"""rustls: an HTTPS client and server written against the real rustls crate (0.20, Debian's
librust-rustls-dev), built here offline with Debian's cargo and rustc (tests/rustbuild.py,
tests/system/workloads/rustls/), traced through uprobes and uretprobes on
`<rustls::conn::Writer as std::io::Write>::write` and `<rustls::conn::Reader as
std::io::Read>::read`, whose plaintext joins the program's own socket calls
(bpf/include/rustls.h). Exact request counts by status on both sides of each connection, one
span per request with tls="true", and /api/processes saying rustls is attached."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rustbuild import cargo_build
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

PROJECT = Path(__file__).parent / "workloads" / "rustls"
OK, MISSING = 40, 15


@pytest.fixture(scope="module")
def peer() -> str:
    """The rustls client/server, built once per source (cached across runs)."""
    return str(cargo_build(PROJECT, "rustls-peer"))


@pytest.fixture
def nginx(cgroups: TestCgroups) -> Iterator[tuple[Nginx, str]]:
    with nginx_in(cgroups, "rustls-nginx") as server:
        yield server


def tls_of(agent: AgentProcess, pid: int) -> list[dict] | None:
    """/api/processes' `tls` of a process: None until the registry has it and it was looked at."""
    found = agent.processes(pid)
    return found[0].get("tls") if found else None  # type: ignore[no-any-return]


def attached(agent: AgentProcess, pid: int, binary: str) -> None:
    """Wait until the agent has looked at the process (1 s after its exec) and says its rustls
    is traced."""
    ok = wait_for(lambda: tls_of(agent, pid), 20)
    got = tls_of(agent, pid)
    assert ok and got is not None and [(t["library"], t["attached"]) for t in got] == [("rustls", True)], \
        (got, [line for line in agent.log().splitlines() if "TLS" in line or "ERROR" in line])
    assert got[0]["path"] == binary and got[0]["detail"].endswith(": 4 uprobes"), got


def test_rustls_client_to_nginx_counted_exactly_with_tls_spans(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], peer: str) -> None:
    server, server_cid = nginx
    cid = cgroups.create("rustls-client")
    client = ReadyClient(cgroups, cid, [peer, "client", "--wait", server.ca, f"127.0.0.1:{server.tls_port}", "localhost",
                         f"/ok:{OK}", f"/missing:{MISSING}"], "rustls")
    try:
        attached(agent, client.proc.pid, peer)
        assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
        check_tls_client_side(agent, cid, server.tls_port, OK, MISSING)
        # nginx (OpenSSL) saw the same requests
        want = {"2xx": OK, "4xx": MISSING}
        assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want
    finally:
        client.finish()
    assert agent.value("coroot_agent_tls_rustls_executables") == 1


def test_rustls_server_inbound_counts_exact(
        agent: AgentProcess, cgroups: TestCgroups, peer: str, tmp_path: Path) -> None:
    ca, cert, key = make_test_ca(str(tmp_path), "rustls")
    port = free_port()
    server_cid = cgroups.create("rustls-server")
    server = cgroups.spawn(server_cid, [peer, "server", cert, key, f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc=server)
        attached(agent, server.pid, peer)
        cid = cgroups.create("rustls-server-client")
        client = ReadyClient(cgroups, cid, [peer, "client", "--wait", ca, f"127.0.0.1:{port}", "localhost",
                         f"/ok:{OK}", f"/missing:{MISSING}"], "rustls")
        try:
            attached(agent, client.proc.pid, peer)
            assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
            want = {"2xx": OK, "4xx": MISSING}
            assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want, \
                tls_diagnostics(agent, server_cid)
            check_tls_client_side(agent, cid, port, OK, MISSING)
        finally:
            client.finish()
    finally:
        server.kill()
        server.wait()
