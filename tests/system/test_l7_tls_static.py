"""OpenSSL linked into the executable (no libssl.so mapped): an HTTPS client built here with
gcc against Debian's libssl.a and libcrypto.a (libssl-dev), talking to nginx over one
keep-alive connection — the agent finds SSL_write/SSL_read(_ex) in the binary's own symbol
tables, attaches the libssl uprobes there once per file, and counts every request exactly on
both sides, with one span each (tls="true"). /api/processes says per process which TLS library
was found and attached: the static client, nginx's shared libssl, none for a process without
TLS (the limit and a refused attach are unit-tested: tests/unit/test_tlsbin.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.helpers import AgentProcess, TestCgroups, wait_for
from tests.system.l7helpers import by_status, spans, wait_counts
from tests.system.servers import Nginx

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

WORKLOAD = Path(__file__).parent / "workloads" / "ssl_static_client.c"
OK, MISSING = 40, 15


@pytest.fixture(scope="module")
def client_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("sslstatic") / "ssl-static-client"
    subprocess.run(["gcc", "-O1", "-Wall", "-o", str(out), str(WORKLOAD), "-Wl,-Bstatic", "-lssl", "-lcrypto",
                    "-Wl,-Bdynamic", "-lpthread", "-ldl"], check=True, capture_output=True, timeout=120)
    return str(out)


@pytest.fixture(scope="module")
def nginx() -> Iterator[tuple[Nginx, str]]:
    cgroups = TestCgroups()
    cid = cgroups.create("tls-static-nginx")
    n = Nginx()
    try:
        n.start(cgroups, cid)
        yield n, cid
    finally:
        n.stop()
        cgroups.cleanup()


def diagnostics(agent: AgentProcess, cid: str) -> str:
    lines = [f"{n}{lb} {v}" for n, lb, v in agent.metrics()
             if lb.get("container_id") == cid or n.startswith(("coroot_agent_l7", "coroot_agent_lost", "coroot_agent_tls"))]
    return "\n".join(lines + [line for line in agent.log().splitlines() if "TLS" in line or "ERROR" in line])


def tls_of(agent: AgentProcess, pid: int) -> list[dict] | None:
    """/api/processes' `tls` of a process: None until the registry has it and it was looked at."""
    found = agent.processes(pid)
    return found[0].get("tls") if found else None  # type: ignore[no-any-return]


def test_static_openssl_client_counted_exactly_with_tls_spans_and_described(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], client_binary: str) -> None:
    server, server_cid = nginx
    cid = cgroups.create("tls-static")
    proc = cgroups.spawn(cid, [client_binary, "127.0.0.1", str(server.tls_port), server.ca, f"/ok:{OK}",
                               f"/missing:{MISSING}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "libssl" not in f.read()  # OpenSSL is in the executable itself
        logged = f"TLS: 8 uprobes on {client_binary} (OpenSSL linked into the executable)"
        assert wait_for(lambda: logged in agent.log(), 20), diagnostics(agent, cid)
        assert wait_for(lambda: tls_of(agent, proc.pid) is not None, 20)
        assert tls_of(agent, proc.pid) == [{"library": "openssl-static", "path": client_binary, "attached": True,
                                            "detail": "8 uprobes"}]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"200": OK, "404": MISSING}
        want = {"2xx": OK, "4xx": MISSING}
        dest = f"127.0.0.1:{server.tls_port}"
        assert wait_counts(agent, "container_http_requests_total", want, container_id=cid) == want, \
            diagnostics(agent, cid)
        assert by_status(agent, "container_http_requests_total", container_id=cid, destination=dest,
                         actual_destination=dest) == want
        assert wait_counts(agent, "container_http_inbound_requests_total", want, container_id=server_cid) == want
        got = spans(agent, cid, OK + MISSING)
        assert len(got) == OK + MISSING, diagnostics(agent, cid)
        urls: dict[tuple[str, str], int] = {}
        for s in got:
            attrs = s["SpanAttributes"]
            assert s["SpanName"] == "GET" and s["SpanKind"] == "SPAN_KIND_CLIENT" and attrs["tls"] == "true"
            key = (attrs["http.url"], attrs["http.status_code"])
            urls[key] = urls.get(key, 0) + 1
        assert urls == {(f"https://{dest}/ok", "200"): OK, (f"https://{dest}/missing", "404"): MISSING}
        # nginx: its libssl (the private copy the tests load), attached
        [master] = [p for p in agent.processes() if p["comm"] == "nginx" and p.get("container_id") == server_cid][:1]
        nginx_tls = tls_of(agent, master["pid"])
        assert nginx_tls is not None and [(t["library"], t["attached"]) for t in nginx_tls] == [("openssl", True)]
        assert nginx_tls[0]["path"].endswith("/libssl.so.3") and "uprobes" in nginx_tls[0]["detail"]
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert agent.value("coroot_agent_tls_static_executables") == 1


def test_a_second_static_openssl_file_gets_its_own_probes_and_a_process_without_tls_says_so(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], client_binary: str,
        tmp_path: Path) -> None:
    """A second file with OpenSSL linked in while the agent runs: attached as well (its own
    inode); /api/processes of a process whose executable has no TLS says so with []."""
    server, _ = nginx
    other = tmp_path / "ssl-static-client-2"
    shutil.copy(client_binary, other)
    cid = cgroups.create("tls-static-2")
    proc = cgroups.spawn(cid, [str(other), "127.0.0.1", str(server.tls_port), server.ca, "/ok:1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sleeper = cgroups.spawn(cid, ["sleep", "30"])
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        assert wait_for(lambda: tls_of(agent, proc.pid) is not None and tls_of(agent, sleeper.pid) is not None, 20)
        assert tls_of(agent, proc.pid) == [{"library": "openssl-static", "path": str(other), "attached": True,
                                            "detail": "8 uprobes"}]
        assert tls_of(agent, sleeper.pid) == []
        assert agent.value("coroot_agent_tls_static_executables") == 2
    finally:
        proc.stdin.close()
        proc.wait(10)
        sleeper.kill()
        sleeper.wait()
    os.unlink(other)


NODE_SCRIPT = Path(__file__).parent / "workloads" / "https_get.js"


def test_node_with_bundled_openssl_is_found_attached_and_counted(
        agent: AgentProcess, cgroups: TestCgroups, nginx: tuple[Nginx, str], tmp_path: Path) -> None:
    """Node.js (the nodejs package here bundles OpenSSL: its executable defines SSL_write and
    maps no libssl): an https.get loop over one keep-alive connection. Node's SSL objects use
    memory BIOs (libuv does the socket I/O), so their fd is the thread's last socket outside an
    SSL call (bpf/l7.c ssl_guess_fd)."""
    node = shutil.which("node")
    assert node is not None, "apt-get install nodejs"
    server, _ = nginx
    copy = tmp_path / "node"  # a file of the test's own: the host's node gets no probes
    shutil.copy(node, copy)
    cid = cgroups.create("tls-node")
    proc = cgroups.spawn(cid, [str(copy), str(NODE_SCRIPT), f"https://127.0.0.1:{server.tls_port}", server.ca,
                               f"/ok:{OK}", f"/missing:{MISSING}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "libssl" not in f.read()
        assert wait_for(lambda: f"uprobes on {copy} (OpenSSL linked into the executable)" in agent.log(), 30), \
            diagnostics(agent, cid)
        assert wait_for(lambda: tls_of(agent, proc.pid) is not None, 20)
        assert tls_of(agent, proc.pid) == [{"library": "openssl-static", "path": str(copy), "attached": True,
                                            "detail": "8 uprobes"}]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"200": OK, "404": MISSING}
        # Node reads until SSL_read fails with WANT_READ (-1, an int in a 64-bit register): such a
        # read pairs nothing, so each response gets its own request's status
        want = {"2xx": OK, "4xx": MISSING}
        dest = f"127.0.0.1:{server.tls_port}"
        assert wait_counts(agent, "container_http_requests_total", want, container_id=cid) == want, \
            diagnostics(agent, cid)
        assert by_status(agent, "container_http_requests_total", container_id=cid, destination=dest,
                         actual_destination=dest) == want
        got = spans(agent, cid, OK + MISSING)
        assert len(got) == OK + MISSING, diagnostics(agent, cid)
        urls: dict[tuple[str, str], int] = {}
        for s in got:
            attrs = s["SpanAttributes"]
            assert s["SpanName"] == "GET" and s["SpanKind"] == "SPAN_KIND_CLIENT" and attrs["tls"] == "true"
            key = (attrs["http.url"], attrs["http.status_code"])
            urls[key] = urls.get(key, 0) + 1
        assert urls == {(f"https://{dest}/ok", "200"): OK, (f"https://{dest}/missing", "404"): MISSING}
    finally:
        proc.stdin.close()
        proc.wait(10)
