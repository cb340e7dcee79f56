"""Go crypto/tls: an HTTPS client and server built here with Debian's Go (standard library
only, tests/system/workloads/gotls/), traced through the uprobes on crypto/tls.(*Conn).Write
and .Read and Read's RET instructions — a normal build, a stripped one (`-ldflags="-s -w"`:
no .symtab, the functions come from .gopclntab) and a stripped position-independent one. Exact request counts by status on both sides
of each connection and one span per request with tls="true"."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.l7 import gotls
from tests.gobuild import go_build
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
    pie: str  # position-independent and stripped: the function table in .data.rel.ro.gopclntab
    server: str


@pytest.fixture(scope="module")
def go(tmp_path_factory: pytest.TempPathFactory) -> GoBuilds:
    """The client (normal and stripped) and the server, built once for the module."""
    work = tmp_path_factory.mktemp("gobuild")
    client = WORKLOADS / "client.go"
    return GoBuilds(client=go_build(client, work / "client", work),
                    stripped=go_build(client, work / "client-stripped", work, "-ldflags=-s -w"),
                    pie=go_build(client, work / "client-pie", work, "-buildmode=pie", "-ldflags=-s -w"),
                    server=go_build(WORKLOADS / "server.go", work / "server", work))


@pytest.fixture
def nginx(cgroups: TestCgroups) -> Iterator[tuple[Nginx, str]]:
    with nginx_in(cgroups, "gotls-nginx") as server:
        yield server


def attached(agent: AgentProcess, binary: str) -> None:
    """Wait until the agent has attached the Go TLS probes to `binary` (looked at 1 s after the
    process's exec)."""
    ok = wait_for(lambda: f"Go crypto/tls uprobes on {binary} " in agent.log(), 20)
    assert ok, "\n".join(line for line in agent.log().splitlines() if "TLS" in line or "ERROR" in line)


@pytest.mark.parametrize("build", ["normal", "stripped", "pie"])
def test_go_https_client_to_nginx_counted_exactly_with_tls_spans(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], go: GoBuilds, build: str) -> None:
    server, server_cid = nginx
    binary = {"normal": go.client, "stripped": go.stripped, "pie": go.pie}[build]
    cid = cgroups.create(f"gotls-{build}")
    client = ReadyClient(cgroups, cid, [binary, "-wait", "-ca", server.ca, f"https://127.0.0.1:{server.tls_port}",
                         f"/ok:{OK}", f"/missing:{MISSING}"], "Go")
    attached(agent, binary)
    line = agent.log().split(f"Go crypto/tls uprobes on {binary} ")[1].split("\n")[0]
    assert ("functions from symtab" if build == "normal" else "functions from pclntab") in line, line
    assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
    try:
        check_tls_client_side(agent, cid, server.tls_port, OK, MISSING)
        # nginx (OpenSSL) saw the same requests
        want = {"2xx": OK, "4xx": MISSING}
        assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want
    finally:
        client.finish()
    assert agent.value("coroot_agent_tls_go_binaries") >= 1


def test_go_https_server_inbound_counts_exact(
        agent: AgentProcess, cgroups: TestCgroups, go: GoBuilds, tmp_path: Path) -> None:
    ca, cert, key = make_test_ca(str(tmp_path), "goserver")
    port = free_port()
    server_cid = cgroups.create("gotls-server")
    server = cgroups.spawn(server_cid, [go.server, "-cert", cert, "-key", key, f"127.0.0.1:{port}"])
    wait_port("127.0.0.1", port, proc=server)
    attached(agent, go.server)
    cid = cgroups.create("gotls-server-client")
    client = ReadyClient(cgroups, cid, [go.client, "-wait", "-ca", ca, f"https://127.0.0.1:{port}",
                         f"/ok:{OK}", f"/missing:{MISSING}"], "Go")
    attached(agent, go.client)
    assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
    try:
        want = {"2xx": OK, "4xx": MISSING}
        assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want, \
            tls_diagnostics(agent, server_cid)
        check_tls_client_side(agent, cid, port, OK, MISSING)
    finally:
        client.finish()
        server.kill()
        server.wait()


def perf_events(pid: int) -> int:
    """The perf event fds a process holds: each uprobe BCC attaches is one (through the perf
    PMU or a tracefs-defined event alike)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            continue
    return n


def probes_logged(log: str) -> int:
    """Uprobes the agent says it attached in this part of its log (OpenSSL and Go)."""
    return sum(int(n) for n in re.findall(r"TLS: (\d+) (?:Go crypto/tls )?uprobes on ", log))


def test_short_lived_go_processes_leak_no_probes_and_an_early_exit_hides_nothing(
        agent: AgentProcess, cgroups: TestCgroups, go: GoBuilds, tmp_path: Path) -> None:
    """200 processes of one Go binary, each gone in milliseconds (no CA file: it exits at once),
    give at most one set of probes; a binary whose first process exited before the agent looked
    is still traced when it runs again."""
    early, many = tmp_path / "early", tmp_path / "many"
    shutil.copy(go.client, early)  # new files (inodes): neither is attached yet
    shutil.copy(go.client, many)
    cid = cgroups.create("gotls-short")
    before, logged = perf_events(agent.pid), len(agent.log())
    p = cgroups.spawn(cid, [str(early), "-ca", str(tmp_path / "absent"), "https://127.0.0.1:1"],
                      stderr=subprocess.DEVNULL)
    assert p.wait(10) == 1
    for _ in range(200):
        q = cgroups.spawn(cid, [str(many), "-ca", str(tmp_path / "absent"), "https://127.0.0.1:1"],
                          stderr=subprocess.DEVNULL)
        assert q.wait(10) == 1
    time.sleep(7)  # past both of the agent's looks at each process (1 s and 5 s after its exec)
    assert agent.proc is not None and agent.proc.poll() is None
    # Every one of the 200 may have exited before the agent looked: one set of probes or none.
    # (The agent attaches to whatever else starts on this shared machine meanwhile: the probes
    # it logged are what its perf events must add up to.)
    new = agent.log()[logged:]
    assert new.count(f"Go crypto/tls uprobes on {many} ") <= 1 and f"uprobes on {early} " not in new
    m = re.search(rf"TLS: (\d+) Go crypto/tls uprobes on {re.escape(str(many))} ", new)
    assert m is None or int(m.group(1)) == 2 + len(gotls.inspect_path(str(many)).read.returns)
    assert perf_events(agent.pid) - before == probes_logged(new), new
    # the early one's file runs again, long enough this time
    server = Nginx()
    try:
        server.start(cgroups, cgroups.create("gotls-short-nginx"))
        client = ReadyClient(cgroups, cid, [str(early), "-wait", "-ca", server.ca, f"https://127.0.0.1:{server.tls_port}",
                         f"/ok:{OK}", f"/missing:{MISSING}"], "Go")
        attached(agent, str(early))
        assert client.run() == {"statuses": {"200": OK, "404": MISSING}}
        client.finish()
        assert agent.log()[logged:].count(f"Go crypto/tls uprobes on {early} ") == 1
        assert perf_events(agent.pid) - before == probes_logged(agent.log()[logged:])
    finally:
        server.stop()
