"""The agent is root on the node: its query API, socket and HTTP server tried as an attacker would.
Local-user attacks run as `nobody` (setpriv); remote ones from a network namespace joined by veth.
After every attack the agent must still answer /healthz within 100 ms and /metrics within 1 s
(sampled throughout the attack), and an HTTP request count and a log line made afterwards must
still be counted exactly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.system.helpers import (
    NOBODY,
    AgentProcess,
    LogWriter,
    RemoteHost,
    Responsiveness,
    TestCgroups,
    body_flood,
    cli_query,
    free_port,
    http_request,
    log_counts,
    run_client,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

UNIX_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Witness:
    """A container that makes HTTP requests and one that writes error lines: after each attack,
    `check()` makes more of both and asserts the totals exactly."""

    def __init__(self, agent: AgentProcess, cgroups: TestCgroups) -> None:
        self.agent, self.cgroups = agent, cgroups
        self.www = tempfile.mkdtemp(prefix="ca-sec-www-")
        with open(os.path.join(self.www, "index.html"), "w") as f:
            f.write("ok\n")
        self.port = free_port()
        self.server_cid = cgroups.create("casec-srv")
        server = cgroups.spawn(self.server_cid, [sys.executable, "-m", "http.server", str(self.port), "--bind",
                                                 "127.0.0.1", "--directory", self.www],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, 10, server)
        self.client_cid = cgroups.create("casec-cli")
        self.log_cid = cgroups.create("casec-log")
        self.logfile = f"/var/log/casec-{uuid.uuid4().hex[:8]}.log"
        self.writer = LogWriter(cgroups, self.log_cid)
        self.writer(f"open {self.logfile}")
        self.requests = 0
        self.lines = 0

    def check(self, n_requests: int = 5, n_lines: int = 3) -> None:
        client = run_client(self.cgroups, self.client_cid, "http", "127.0.0.1", str(self.port), f"/:{n_requests}")
        assert client.result["statuses"] == {"200": n_requests}
        self.requests += n_requests
        tag = uuid.uuid4().hex[:6]
        self.writer(f"lines {n_lines} ERROR witness {tag} failure number {{i}}")
        self.lines += n_lines

        def http_count() -> float:
            return sum(v for n, lb, v in self.agent.metrics() if n == "container_http_requests_total"
                       and lb.get("container_id") == self.client_cid)

        def log_count() -> float:
            return sum(v for (level, _), v in log_counts(self.agent, self.log_cid).items() if level == "error")

        try:
            wait_for(lambda: http_count() == self.requests and log_count() == self.lines, 30, 0.3)
        finally:
            client.finish()
        assert http_count() == self.requests
        assert log_count() == self.lines

    def close(self) -> None:
        self.writer.close()
        if os.path.exists(self.logfile):
            os.unlink(self.logfile)
        shutil.rmtree(self.www, ignore_errors=True)


@pytest.fixture(scope="module")
def witness(agent: AgentProcess) -> Iterator[Witness]:
    cg = TestCgroups()
    w = Witness(agent, cg)
    try:
        w.check()  # the baseline: counting works before any attack
        yield w
    finally:
        w.close()
        cg.cleanup()


@pytest.fixture(scope="module")
def secret() -> Iterator[tuple[str, str]]:
    """A root-only file with a marker: what an attacker wants to read."""
    marker = f"ca-secret-{uuid.uuid4().hex}"
    fd, path = tempfile.mkstemp(prefix="ca-secret-", dir="/root")
    os.write(fd, (marker + "\n").encode())
    os.close(fd)
    os.chmod(path, 0o600)
    yield path, marker
    os.unlink(path)


@pytest.fixture(scope="module")
def nobody_tree() -> Iterator[str]:
    """A copy of the agent package that user nobody can import (the checkout may sit in a
    directory only root can read)."""
    d = tempfile.mkdtemp(prefix="ca-nobody-")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "..", "agent"), os.path.join(d, "agent"))
    os.chmod(d, 0o755)
    for root, dirs, files in os.walk(d):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def post_as_nobody(agent: AgentProcess, body: str) -> tuple[int, str]:
    return http_request(f"http://127.0.0.1:{agent.port}/api/query", body, prefix=NOBODY)


def attack(agent: AgentProcess, witness: Witness, run: Callable[[], None]) -> None:
    with Responsiveness(agent.port):
        run()
    witness.check()


# ------------------------------------------------------------------- attacks ---


def test_1_nobody_cannot_read_files_through_the_query_api(agent: AgentProcess, witness: Witness,
                                                          secret: tuple[str, str], nobody_tree: str) -> None:
    path, marker = secret

    def run() -> None:
        status, text = post_as_nobody(agent, f"SELECT * FROM file('{path}', 'LineAsString')")
        assert status == 403 and marker not in text  # loopback is not trust: no key, no API
        # The unix socket is root's: nobody cannot even connect.
        r = subprocess.run([*NOBODY, sys.executable, "-c", UNIX_CONNECT, agent.socket], capture_output=True,
                           text=True, timeout=30, cwd="/")
        assert r.stdout.strip() == "PermissionError"
        # The CLI as nobody says so in one line, without a traceback.
        q = cli_query(agent, "SELECT 1", prefix=NOBODY, cwd=nobody_tree)
        assert q.returncode != 0 and "permission denied" in q.stderr and "Traceback" not in q.stderr
        assert len(q.stderr.strip().splitlines()) == 1, q.stderr
        # Root, through the socket: refused by the validator, the file never read.
        q = cli_query(agent, f"SELECT * FROM file('{path}', 'LineAsString')")
        assert q.returncode == 2 and "table function file" in q.stderr and marker not in q.stdout + q.stderr
        q = cli_query(agent, f"SELECT file('{path}')")
        assert q.returncode == 2 and "function file" in q.stderr and marker not in q.stdout + q.stderr

    attack(agent, witness, run)


def test_2_no_query_writes_a_file(agent: AgentProcess, witness: Witness) -> None:
    target = f"/root/ca-outfile-{uuid.uuid4().hex[:8]}"

    def run() -> None:
        for sql in (f"SELECT 'x' AS x INTO # c\nOUTFILE '{target}'",
                    f"SELECT 'x' AS x INTO /* c */ OUTFILE '{target}' APPEND",
                    f"SELECT 'x' INTO OUTFILE '{target}'"):
            status, _ = post_as_nobody(agent, sql)
            assert status == 403
            q = cli_query(agent, sql)
            assert q.returncode == 2 and "INTO OUTFILE" in q.stderr, q.stderr
        assert not os.path.exists(target)

    attack(agent, witness, run)


def test_3_hidden_statements_do_not_run(agent: AgentProcess, witness: Witness) -> None:
    def tables() -> str:
        q = cli_query(agent, "SELECT name FROM system.tables WHERE database = 'coroot' ORDER BY name")
        assert q.returncode == 0, q.stderr
        return q.stdout

    before = tables()
    assert "otel_traces" in before

    def run() -> None:
        for sql in ('SELECT 1 AS "a\'"; CREATE TABLE ca_evil (a Int8) ENGINE = Memory; SELECT \'\'',
                    'SELECT 1 AS "a\'"; DROP TABLE otel_traces; SELECT \'\''):
            q = cli_query(agent, sql)
            assert q.returncode == 2 and "one statement" in q.stderr, q.stderr

    attack(agent, witness, run)
    assert tables() == before


def test_4_table_functions_connect_nowhere(agent: AgentProcess, witness: Witness) -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.settimeout(0.5)
    port = lsock.getsockname()[1]

    def run() -> None:
        for sql in (f"SELECT * FROM url('http://127.0.0.1:{port}/x', 'LineAsString')",
                    f"SELECT * FROM s3('http://127.0.0.1:{port}/b/k', 'LineAsString')",
                    f"SELECT * FROM remote('127.0.0.1:{port}', system.one)",
                    f"SELECT * FROM mysql('127.0.0.1:{port}', 'd', 't', 'u', 'p')",
                    f"SELECT * FROM postgresql('127.0.0.1:{port}', 'd', 't', 'u', 'p')"):
            q = cli_query(agent, sql)
            assert q.returncode == 2 and "table function" in q.stderr, q.stderr

    try:
        attack(agent, witness, run)
        with pytest.raises(TimeoutError):
            lsock.accept()  # nothing ever connected
    finally:
        lsock.close()


def test_8_quote_bomb_is_answered_at_once(agent: AgentProcess, witness: Witness) -> None:
    body = "'\\'" * 40_000  # 120 KB: the old guard's regex took 58 s with the GIL held

    def run() -> None:
        t = time.monotonic()
        status, _ = agent.api("/api/query", body.encode())
        assert status in (400, 413)
        assert time.monotonic() - t < 2

    attack(agent, witness, run)


def test_9_a_long_query_is_cut_and_never_holds_inserts(agent: AgentProcess, witness: Witness) -> None:
    q = cli_query(agent, "SELECT sleepEachRow(1) FROM numbers(100)")
    assert q.returncode == 2 and "function sleepEachRow" in q.stderr

    def rows_written() -> float:
        return sum(v for n, lb, v in agent.metrics() if n == "coroot_agent_store_rows_written_total")

    result: dict[str, object] = {}

    def long_query() -> None:
        t = time.monotonic()
        result["q"] = cli_query(agent, "SELECT count() FROM numbers(900000000) WHERE sipHash64(repeat(toString(number), 40)) = 7")
        result["took"] = time.monotonic() - t

    def run() -> None:
        th = threading.Thread(target=long_query)
        th.start()
        time.sleep(1)
        before = rows_written()
        witness.check()  # the log line and requests are stored while the query runs
        assert wait_for(lambda: rows_written() > before, 8, 0.2)
        assert th.is_alive(), "the query ended early: the test proves nothing"
        th.join(60)

    attack(agent, witness, run)
    proc = result["q"]
    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode == 1 and ("TIMEOUT_EXCEEDED" in proc.stderr or "Timeout exceeded" in proc.stderr), proc.stderr
    assert float(result["took"]) < 20  # type: ignore[arg-type]


# ---------------------------------------------------------- from another host ---


@pytest.fixture(scope="module")
def remote(agent: AgentProcess) -> Iterator[tuple[str, AgentProcess, str]]:
    """A second agent listening on every address with a key, and a namespace to attack it from."""
    peer = RemoteHost(203)
    a = AgentProcess(["--api-key", "k-" + peer.tag, "--disable-profiling", "--disable-l7-tracing"],
                     listen_host="0.0.0.0")
    try:
        a.start()
        yield peer.ns, a, peer.host_ip
    finally:
        a.cleanup()
        peer.cleanup()


HALF_OPEN = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nX-Slow: ")
    socks.append(s)
print("holding", len(socks), flush=True)
sys.stdin.readline()
"""


def test_7_body_and_connection_floods_from_another_host(remote: tuple[str, AgentProcess, str],
                                                        agent: AgentProcess, witness: Witness) -> None:
    ns, a, host = remote
    assert a.proc is not None
    before = rss_kb(a.proc.pid)

    def run() -> None:
        for claim, send in (("-1", 64 << 20), ("1500000000", 64 << 20), ("abc", 64 << 20)):
            line, sent = body_flood(host, a.port, claim, send, prefix=("ip", "netns", "exec", ns))
            assert line.split()[1] in ("400", "401", "411", "413"), (line, sent)
            assert sent < send, "the agent kept reading the body it was going to refuse"
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", HALF_OPEN, host, str(a.port), "1000"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None and p.stdout.readline().startswith("holding")
            with Responsiveness(a.port):
                time.sleep(3)  # the half-open connections held while /healthz is sampled
            assert rss_kb(a.proc.pid) - before < 50 * 1024  # type: ignore[union-attr]
        finally:
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
            p.wait(30)

    attack(agent, witness, run)  # the module's agent keeps counting meanwhile
    assert rss_kb(a.proc.pid) - before < 50 * 1024
    # And the attacked agent still serves its API to a caller with the key.
    status, text = http_request(f"http://{host}:{a.port}/api/query", "SELECT 41 + 1", key="k-" + ns.rsplit("-", 1)[1],
                                prefix=("ip", "netns", "exec", ns))
    assert status == 200 and text.strip().splitlines()[-1] == "42", (status, text)
