"""rustls: an HTTPS client and server written against the real rustls crate (0.20, Debian's
librust-rustls-dev), built here offline with Debian's cargo and rustc (tests/rustbuild.py,
tests/system/workloads/rustls/), traced through uprobes and uretprobes on
`<rustls::conn::Writer as std::io::Write>::write` and `<rustls::conn::Reader as
std::io::Read>::read`, whose plaintext joins the program's own socket calls
(bpf/include/rustls.h). Exact request counts by status on both sides of each connection, one
span per request with tls="true", and /api/processes saying rustls is attached."""

from __future__ import annotations

import json
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
from tests.system.l7helpers import by_status, nginx_in, spans, wait_counts
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


class RustClient:
    def __init__(self, cgroups: TestCgroups, cid: str, binary: str, ca: str, port: int) -> None:
        self.proc = cgroups.spawn(cid, [binary, "client", "--wait", ca, f"127.0.0.1:{port}", "localhost",
                                        f"/ok:{OK}", f"/missing:{MISSING}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self) -> dict:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the rustls client failed (exit {self.proc.wait()})"
        return json.loads(line)  # type: ignore[no-any-return]

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        self.proc.wait(10)


def diagnostics(agent: AgentProcess, cid: str) -> str:
    lines = [f"{n}{lb} {v}" for n, lb, v in agent.metrics()
             if lb.get("container_id") == cid or n.startswith(("coroot_agent_l7", "coroot_agent_lost", "coroot_agent_tls"))]
    return "\n".join(lines + [line for line in agent.log().splitlines() if "WARNING" in line or "ERROR" in line])


def check_client_side(agent: AgentProcess, cid: str, port: int) -> None:
    want = {"2xx": OK, "4xx": MISSING}
    dest = f"127.0.0.1:{port}"
    assert wait_counts(agent, "container_http_requests_total", want, container_id=cid) == want, diagnostics(agent, cid)
    assert by_status(agent, "container_http_requests_total", container_id=cid, destination=dest,
                     actual_destination=dest) == want
    got = spans(agent, cid, OK + MISSING)
    assert len(got) == OK + MISSING, diagnostics(agent, cid)
    urls: dict[tuple[str, str], int] = {}
    for s in got:
        attrs = s["SpanAttributes"]
        assert s["SpanName"] == "GET" and s["SpanKind"] == "SPAN_KIND_CLIENT"
        assert attrs["tls"] == "true" and attrs["net.peer.port"] == str(port)
        key = (attrs["http.url"], attrs["http.status_code"])
        urls[key] = urls.get(key, 0) + 1
    assert urls == {(f"https://{dest}/ok", "200"): OK, (f"https://{dest}/missing", "404"): MISSING}


def test_rustls_client_to_nginx_counted_exactly_with_tls_spans(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], peer: str) -> None:
    server, server_cid = nginx
    cid = cgroups.create("rustls-client")
    client = RustClient(cgroups, cid, peer, server.ca, server.tls_port)
    try:
        attached(agent, client.proc.pid, peer)
        assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
        check_client_side(agent, cid, server.tls_port)
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
        client = RustClient(cgroups, cid, peer, ca, port)
        try:
            attached(agent, client.proc.pid, peer)
            assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
            want = {"2xx": OK, "4xx": MISSING}
            assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want, \
                diagnostics(agent, server_cid)
            check_client_side(agent, cid, port)
        finally:
            client.finish()
    finally:
        server.kill()
        server.wait()
