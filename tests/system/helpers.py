"""What system tests share, and the only place they share it from (with conftest.py's
fixtures): the agent as a real subprocess, the CLI, test cgroups ("containers"), reading
/metrics and the store, the clients tests drive traffic and attacks with, and CPU load.
Test files import from here, never from each other."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.containers.cgroup import detect_layout

REPO = Path(__file__).resolve().parents[2]
NOBODY_UID = 65534
NOBODY = ("setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups")
L7_CLIENT = (sys.executable, "-m", "tests.system.workloads.l7_client")
LOG_WRITER = (sys.executable, "-m", "tests.system.workloads.log_writer")
# What every agent of the tests runs with unless a test says otherwise: containers reported at
# once, and the store written every second (tests read it back).
AGENT_DEFAULTS = ("--min-container-age", "0s", "--store-batch-age", "1s")


def metric_families(text: str) -> list[Metric]:
    """The families of a text exposition with their samples named as it names them: the Python
    client's parser renames the samples of a counter declared without `_total` (`# TYPE X
    counter`, as the node agent's container_jvm_gc_time_seconds) to X_total; Prometheus does not."""
    exact = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"] and parts[3] == "counter" and not parts[2].endswith("_total"):
            exact.add(parts[2])
    fams = list(text_string_to_metric_families(text))
    for fam in fams:
        if fam.type == "counter" and fam.name in exact:
            fam.samples = [s._replace(name=fam.name) if s.name == fam.name + "_total" else s for s in fam.samples]
    return fams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The agents' logs: kept after a test for its failure's message and for reading, in one
# directory per test run (the pytest process's pid); conftest.py removes those of runs that
# are over when a new one starts, so /tmp keeps one run's worth, not a file per agent started.
def setpriv(names: Sequence[str]) -> list[str]:
    """A command prefix that runs the command with only `names` in its capability bounding set."""
    bset = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in names)])
    return ["setpriv", f"--bounding-set={bset}", "--inh-caps=-all", "--"]


def releasers_of(pid: int) -> list[psutil.Process]:
    """The agent.ebpf.release processes an agent started at its stop (they detach its probes
    after it has exited)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "agent.ebpf.release" in cmd and "--agent-pid" in cmd and cmd[cmd.index("--agent-pid") + 1] == str(pid):
            out.append(p)
    return out


AGENT_LOGS = "/tmp/coroot-agent-test-logs"
AGENT_LOG_DIR = f"{AGENT_LOGS}/{os.getpid()}"
# The agents' stores, likewise one directory per run, and a name no other agent of the run had:
# a store left by an agent that was killed (or by an earlier run whose ports repeat) must never
# be opened by a later agent, which would read the old run's rows as its own.
AGENT_STORES = "/tmp/coroot-agent-test-stores"
AGENT_STORE_DIR = f"{AGENT_STORES}/{os.getpid()}"
_store_ids = itertools.count(1)


class AgentProcess:
    """`python -m agent run` with a private port and storage; logs kept for failure messages.
    `args` come after the listen and storage flags (AGENT_DEFAULTS are not added here: the
    fixtures in conftest.py add them)."""

    def __init__(self, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = (), listen_host: str = "127.0.0.1") -> None:
        """`prefix`: a command the agent runs under (e.g. setpriv and its options);
        `listen_host`: 0.0.0.0 for an agent other hosts reach."""
        self.prefix = list(prefix)
        self.port = free_port()
        self.storage = f"{AGENT_STORE_DIR}/{self.port}-{next(_store_ids)}"
        self.args = ["--listen", f"{listen_host}:{self.port}", "--storage-path", self.storage,
                     "--wal-dir", f"{self.storage}/wal", *args]
        self.env = {k: v for k, v in os.environ.items() if k != "CONFIG"} | dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(AGENT_LOG_DIR, exist_ok=True)
        self.log_path = f"{AGENT_LOG_DIR}/{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the agent was not started"
        return self.proc.pid

    def start(self, timeout: float = 120) -> float:
        """Start and wait for the first /metrics answer; returns seconds it took."""
        t0 = time.monotonic()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "agent", "run", *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/metrics")
                return time.monotonic() - t0
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"agent did not answer in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    @property
    def socket(self) -> str:
        """The agent's unix socket: local /api/* without a key, for root."""
        return f"{self.storage}/api.sock"

    def api(self, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """/api/* over the unix socket: (status, body)."""
        from agent.query import call_agent

        return call_agent(self.socket, "POST" if body is not None else "GET", path, body, timeout=30)

    def processes(self, pid: int | None = None) -> list[dict]:
        status, data = self.api("/api/processes" + (f"?pid={pid}" if pid else ""))
        assert status == 200, data
        return json.loads(data)

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        out = []
        for fam in metric_families(self.get("/metrics")):
            for s in fam.samples:
                out.append((s.name, dict(s.labels), s.value))
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample of `name` whose labels include `labels`, or None."""
        found = [v for n, lb, v in self.metrics() if n == name and labels.items() <= lb.items()]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
        return found[0] if found else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal, wait up to `timeout`, then kill; the exit code. Safe to call twice. (How
        fast the agent stops is test_lifecycle's to measure: here a slow stop on a loaded
        machine must not become a kill that loses what the test reads from the store.)"""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def cleanup(self) -> None:
        """Stop if running and remove the storage (the log stays, for a failure's message)."""
        if self.proc is not None:
            self.stop()
        shutil.rmtree(self.storage, ignore_errors=True)


# What conftest.py's `agent_factory` fixture gives a test: agent_factory(*args, **AgentProcess kw).
AgentFactory = Callable[..., AgentProcess]


def coroot_agent(*args: str, prefix: Sequence[str] = (), cwd: str | Path = REPO,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI, `python -m agent ARGS`, as a user would run it (under `prefix`, e.g. NOBODY)."""
    return subprocess.run([*prefix, sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def cli_query(store: AgentProcess | str, *args: str, prefix: Sequence[str] = (),
              cwd: str | Path = REPO) -> subprocess.CompletedProcess[str]:
    """`coroot-agent query --storage-path STORE ARGS` (options, then the SQL): through the
    running agent's socket when one holds the store, from the store itself when none does."""
    storage = store.storage if isinstance(store, AgentProcess) else store
    return coroot_agent("query", "--storage-path", storage, *args, prefix=prefix, cwd=cwd)


def rows(store: AgentProcess | str, sql: str) -> list[dict]:
    """The rows of a query that must succeed, as dicts."""
    r = cli_query(store, "--format", "json", sql)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def profile_stacks(storage: str, service: str) -> list[tuple[list[str], int]]:
    """A service's stored CPU profile: (stack, leaf first, as stored; its summed value) pairs."""
    found = rows(storage, (
        "SELECT s.Stack AS stack, sum(p.Value) AS value FROM profiling_samples p "
        "JOIN (SELECT ServiceName, Hash, any(Stack) AS Stack FROM profiling_stacks GROUP BY ServiceName, Hash) s "
        "ON s.ServiceName = p.ServiceName AND s.Hash = p.StackHash "
        f"WHERE p.Type = 'ebpf:cpu:nanoseconds' AND p.ServiceName = '{service}' GROUP BY stack"))
    return [(list(r["stack"]), int(r["value"])) for r in found]


class TestCgroups:
    """Containers without a runtime: cgroups under system.slice in the v2 hierarchy."""

    __test__ = False  # not a test class

    def __init__(self) -> None:
        layout = detect_layout()
        assert layout.unified, "the tests need a cgroup v2 (or hybrid) hierarchy"
        self.base = os.path.join(layout.unified, "system.slice")
        os.makedirs(self.base, exist_ok=True)
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def create(self, prefix: str = "catest") -> str:
        """A new cgroup; returns its container_id (/system.slice/<name>.service)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}.service"
        os.mkdir(os.path.join(self.base, name))
        self.made.append(name)
        return f"/system.slice/{name}"

    def spawn(self, container_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              **kw: object) -> subprocess.Popen[bytes]:
        """Start argv inside the cgroup: the shell joins it, then execs argv."""
        procs = os.path.join(self.base, os.path.basename(container_id), "cgroup.procs")
        p = subprocess.Popen(["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv],
                             env=dict(env) if env is not None else None, **kw)  # type: ignore[arg-type]
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for name in self.made:
            path = os.path.join(self.base, name)
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def wait_for(pred, timeout: float, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Poll pred() until it returns something truthy; returns it, or the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def wait_port(host: str, port: int, timeout: float = 30, proc: subprocess.Popen | None = None) -> None:
    """Until something accepts on host:port; fails early if `proc` (the server) exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


# ------------------------------------------------------------------------ workloads ---


class LogWriter:
    """tests/system/workloads/log_writer.py in a test cgroup: `w("lines 10 ERROR x {i}")` runs
    one command and waits for its "ok"."""

    def __init__(self, cgroups: TestCgroups, cid: str, env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.p = cgroups.spawn(cid, [*prefix, *LOG_WRITER], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=REPO)

    def __call__(self, cmd: str) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "ok"

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.communicate("exit\n", timeout=10)


def log_counts(agent: AgentProcess, cid: str) -> dict[tuple[str, str], float]:
    """container_log_messages_total of one container: (level, pattern_hash) -> count."""
    return {(lb["level"], lb["pattern_hash"]): v for n, lb, v in agent.metrics()
            if n == "container_log_messages_total" and lb.get("container_id") == cid}


@dataclass
class Client:
    """A running tests/system/workloads/l7_client.py and the JSON line it printed."""

    proc: subprocess.Popen[str]
    result: dict

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def run_client(cgroups: TestCgroups, cid: str, *args: str, argv_prefix: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> Client:
    """Run the L7 client in a test cgroup and wait for its result line (it then waits for
    finish(), so the agent sees the process alive while it handles the events)."""
    p = cgroups.spawn(cid, [*argv_prefix, *L7_CLIENT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      text=True, cwd=REPO, env={**os.environ, **(env or {})})
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"client {args[0]} failed (exit {p.wait()})"
    return Client(p, json.loads(line))  # type: ignore[arg-type]


# ----------------------------------------------------------- clients of the agent ---

# One HTTP request, made by whoever runs it (another host, user nobody), so self-contained:
# prints the status, then the body.
HTTP_REQUEST = """
import sys, urllib.request, urllib.error
url, key, body = sys.argv[1], sys.argv[2], (sys.argv[3].encode() if len(sys.argv) > 3 else None)
req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
if key:
    req.add_header("X-Api-Key", key)
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        print(r.status); sys.stdout.write(r.read().decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.code); sys.stdout.write(e.read().decode(errors="replace"))
"""


def http_request(url: str, body: str | None = None, key: str = "",
                 prefix: Sequence[str] = ()) -> tuple[int, str]:
    """GET (or POST `body`) `url` from a client run under `prefix` (`ip netns exec NS`,
    NOBODY, or nothing); the API key in X-Api-Key when given. (status, body)."""
    r = subprocess.run([*prefix, sys.executable, "-c", HTTP_REQUEST, url, key, *([body] if body is not None else [])],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    status, _, text = r.stdout.partition("\n")
    return int(status), text


# Claims a body of Content-Length CLAIM on POST /api/query and sends up to SEND bytes of it
# while watching for an answer; prints the status line and the bytes it got to send.
BODY_FLOOD = """
import socket, sys, time
host, port, claim, send = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port), timeout=10)
s.sendall(f"POST /api/query HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: {claim}\\r\\n\\r\\n".encode())
chunk = b"A" * 65536
sent = 0
answer = b""
s.setblocking(False)
t = time.monotonic()
while sent < send and time.monotonic() - t < 30:
    try:
        answer += s.recv(4096)
        if answer:
            break
    except BlockingIOError:
        pass
    except OSError:
        break
    try:
        sent += s.send(chunk)
    except BlockingIOError:
        time.sleep(0.001)
    except OSError:
        break
s.setblocking(True)
s.settimeout(5)
try:
    while b"\\r\\n" not in answer:
        more = s.recv(4096)
        if not more:
            break
        answer += more
except OSError:
    pass
print(answer.split(b"\\r\\n", 1)[0].decode(errors="replace"), sent, flush=True)
"""


def body_flood(host: str, port: int, claim: str, send: int, prefix: Sequence[str] = ()) -> tuple[str, int]:
    """A request claiming a body of Content-Length `claim` that sends up to `send` bytes of it:
    (the status line the agent answered, the bytes the client got to send before it)."""
    r = subprocess.run([*prefix, sys.executable, "-c", BODY_FLOOD, host, str(port), claim, str(send)],
                       capture_output=True, text=True, timeout=90)
    line, _, sent = r.stdout.strip().rpartition(" ")
    assert sent.isdigit(), r.stdout + r.stderr
    return line, int(sent)


def hang_up_mid_response(port: int, path: str = "/metrics", n: int = 20) -> None:
    """`n` clients that send a request and reset the connection (SO_LINGER 0) without reading
    the answer, as a scraper that timed out does: every other one once the answer has begun
    (a small receive buffer keeps the rest of it in flight), the others at once. The agent's
    write, or its read of the next request, meets a reset connection."""
    for i in range(n):
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if i % 2:
                s.recv(1)
        finally:
            s.close()


@dataclass
class Responsiveness:
    """Samples /healthz (every 0.1 s) and /metrics (every 5th time) in the background while
    something happens to the agent; on exit, asserts it always answered, the median and 90th
    percentile of /healthz under 100 ms and every /metrics under 1 s. One slow /healthz can be
    the machine (2 cores, the attack itself, other tests' load); the median and p90 cannot."""

    port: int
    host: str = "127.0.0.1"
    health: list[float] = field(default_factory=list)
    metrics: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _get(self, path: str, timeout: float) -> float:
        t = time.monotonic()
        with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=timeout) as r:
            assert r.status == 200
            r.read()
        return time.monotonic() - t

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.health.append(self._get("/healthz", 5))
                if n % 5 == 0:
                    self.metrics.append(self._get("/metrics", 10))
            except OSError as e:
                self.failures.append(str(e))
            n += 1
            self._stop.wait(0.1)

    def __enter__(self) -> Responsiveness:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if exc[0] is not None:
            return  # the body's own failure says more
        assert not self.failures, f"the agent did not answer: {self.failures[:3]}"
        assert self.health and self.metrics
        hs = sorted(self.health)
        assert hs[len(hs) // 2] < 0.1 and hs[int(len(hs) * 0.9)] < 0.1, f"/healthz took {hs[-5:]}"
        assert max(self.metrics) < 1.0, f"/metrics took {sorted(self.metrics)[-3:]}"


# ------------------------------------------------------------------------- CPU load ---


@contextmanager
def cpu_burners(n: int, cpu: int | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`n` busy processes (a `while 1: pass` each), all pinned to `cpu` when given."""
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        if cpu is not None:
            for p in procs:
                os.sched_setaffinity(p.pid, {cpu})
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ----------------------------------------------------------------- a bare Debian ---

DEBIAN_CACHE = Path("/var/cache/coroot-agent-test")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DAY = 86400


def minbase_rootfs(dest: Path) -> None:
    """A fresh `debootstrap --variant=minbase bookworm` root at `dest`, from a tarball cached
    for a day under DEBIAN_CACHE (built under a per-process name, so parallel runs do not
    collide)."""
    DEBIAN_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = DEBIAN_CACHE / "bookworm-minbase.tar"
    if not tarball.exists() or time.time() - tarball.stat().st_mtime > DAY:
        tmp = DEBIAN_CACHE / f"bookworm-minbase.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(tmp), DEBIAN_MIRROR], check=True,
                       capture_output=True, timeout=900)
        part = DEBIAN_CACHE / f"bookworm-minbase.{os.getpid()}.part"
        with tarfile.open(part, "w") as t:
            t.add(tmp, arcname=".")
        os.replace(part, tarball)
        shutil.rmtree(tmp, ignore_errors=True)
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True)


# ----------------------------------------------------------------- other servers ---


class ClickHouseFront:
    """The test-only ClickHouse HTTP(S) front (tests/system/chfront.py) in a subprocess."""

    def __init__(self, data: str, user: str = "coroot", password: str = "secret",
                 cert: tuple[str, str] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.data, self.user, self.password, self.cert = data, user, password, cert
        self.env = dict(os.environ) | dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "tests.system.chfront", "--port", str(self.port),
                "--data", self.data, "--user", self.user, "--password", self.password]
        if self.cert:
            args += ["--certfile", self.cert[0], "--keyfile", self.cert[1]]
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"listening" not in line:
            raise RuntimeError(f"chfront did not start: {line!r}")

    def stop(self) -> None:
        """SIGTERM: the front closes its engine (which waits for its merges) and exits. Under a
        loaded machine that took over 10 s once; after 60 s the stand-in is killed (it is not
        what is tested)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def make_test_ca(directory: str, name: str = "ca") -> tuple[str, str, str]:
    """A CA and a server certificate for localhost/127.0.0.1, made with openssl.
    Returns (ca.pem, server.pem, server.key)."""
    d = directory
    ca, ca_key = f"{d}/{name}.pem", f"{d}/{name}.key"
    srv, srv_key, csr, ext = f"{d}/{name}-server.pem", f"{d}/{name}-server.key", f"{d}/{name}.csr", f"{d}/{name}.ext"
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
        "-days", "2", "-subj", f"/CN=coroot-agent test {name}")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", srv_key, "-out", csr, "-subj", "/CN=localhost")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", srv, "-days", "2", "-extfile", ext)
    return ca, srv, srv_key


class PrometheusServer:
    """Debian's Prometheus with the remote-write receiver, on a private port and data dir."""

    def __init__(self, data: str, basic_auth: tuple[str, str] | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.data = data
        self.basic_auth = basic_auth
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(data, exist_ok=True)
        self.config = os.path.join(data, "prometheus.yml")
        with open(self.config, "w") as f:
            f.write("global: {scrape_interval: 1h}\nscrape_configs: []\n")
        self.web_config = None
        self.tls = tls
        web = ""
        if basic_auth:
            import bcrypt

            hashed = bcrypt.hashpw(basic_auth[1].encode(), bcrypt.gensalt(rounds=4)).decode()
            web += f"basic_auth_users:\n  {basic_auth[0]}: '{hashed}'\n"
        if tls:
            web += f"tls_server_config:\n  cert_file: {tls[0]}\n  key_file: {tls[1]}\n"
        if web:
            self.web_config = os.path.join(data, "web.yml")
            with open(self.web_config, "w") as f:
                f.write(web)

    @property
    def write_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/api/v1/write"

    def start(self, timeout: float = 30) -> None:
        args = ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={self.data}/tsdb",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-remote-write-receiver",
                "--log.level=warn"]
        if self.web_config:
            args.append(f"--web.config.file={self.web_config}")
        self.log = open(os.path.join(self.data, "prometheus.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._get("/-/ready")
                return
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("prometheus did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
            self.log.close()
        self.proc = None

    def _get(self, path: str) -> bytes:
        req = urllib.request.Request(f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}")
        if self.basic_auth:
            import base64

            token = base64.b64encode(f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        import ssl

        ctx = ssl._create_unverified_context() if self.tls else None
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.read()

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        from urllib.parse import urlencode

        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        data = json.loads(self._get("/api/v1/query?" + urlencode(params)))
        assert data["status"] == "success", data
        return data["data"]["result"]


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


class RemoteHost:
    """A network namespace joined to this host by a veth pair: this host at 10.<net>.K.1, the
    namespace at 10.<net>.K.2. For tests of what another host can do to the agent."""

    def __init__(self, net: int) -> None:
        tag = uuid.uuid4().hex[:6]
        k = int(tag[:2], 16) % 250 + 1
        self.ns, self.tag = f"ca-rh-{tag}", tag
        self.host_ip, self.ip = f"10.{net}.{k}.1", f"10.{net}.{k}.2"
        self._host_if, ns_if = f"vh{tag}", f"vn{tag}"
        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "link", "add", self._host_if, "type", "veth", "peer", "name", ns_if, "netns", self.ns)
            sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self._host_if)
            sh("ip", "link", "set", self._host_if, "up")
            sh("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.ip}/24", "dev", ns_if)
            sh("ip", "netns", "exec", self.ns, "ip", "link", "set", ns_if, "up")
        except BaseException:
            self.cleanup()
            raise

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def cleanup(self) -> None:
        sh("ip", "link", "del", self._host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


class TwoHosts:
    """Two network namespaces ("hosts") joined by a veth pair: cli at 10.201.K.1, srv at
    10.201.K.2 (and any extra addresses given, routed from cli). Offloads are off and
    gso_max_segs is 1, so one retransmitted skb (what tcp:tcp_retransmit_skb reports) is one
    segment (what the kernel's RetransSegs counts)."""

    def __init__(self, extra_srv_addrs: Sequence[str] = ()) -> None:
        tag = uuid.uuid4().hex[:6]
        self.k = int(tag[:2], 16) % 250 + 1
        self.cli, self.srv = f"ca-cli-{tag}", f"ca-srv-{tag}"
        self.cli_ip, self.srv_ip = f"10.201.{self.k}.1", f"10.201.{self.k}.2"
        vc, vs = f"vc{tag}", f"vs{tag}"
        sh("ip", "netns", "add", self.cli)
        sh("ip", "netns", "add", self.srv)
        sh("ip", "link", "add", vc, "netns", self.cli, "type", "veth", "peer", "name", vs, "netns", self.srv)
        for ns, dev, ip in ((self.cli, vc, self.cli_ip), (self.srv, vs, self.srv_ip)):
            self.run(ns, "ip", "link", "set", "lo", "up")
            self.run(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            self.run(ns, "ip", "link", "set", dev, "up")
            self.run(ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off")
            self.run(ns, "ip", "link", "set", "dev", dev, "gso_max_segs", "1")
        for addr in extra_srv_addrs:
            self.run(self.srv, "ip", "addr", "add", f"{addr}/32", "dev", vs)
            self.run(self.cli, "ip", "route", "add", f"{addr}/32", "dev", vc)

    def run(self, ns: str, *args: str) -> str:
        return sh("ip", "netns", "exec", ns, *args)

    def argv(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def snmp(self, ns: str, field: str) -> int:
        lines = [ln.split() for ln in self.run(ns, "cat", "/proc/net/snmp").splitlines() if ln.startswith("Tcp:")]
        return int(lines[1][lines[0].index(field)])

    def cleanup(self) -> None:
        for ns in (self.cli, self.srv):
            sh("ip", "netns", "del", ns, check=False)


def bpf_programs(pid: int) -> dict[str, dict[str, int]]:
    """The BPF programs a process holds, from its fds' fdinfo: prog_id -> {prog_type,
    run_time_ns, run_cnt, recursion_misses} (run_* need kernel.bpf_stats_enabled=1)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if "prog_id" in info:
            out[info["prog_id"].strip()] = {k: int(info[k]) for k in
                                             ("prog_type", "run_time_ns", "run_cnt", "recursion_misses") if k in info}
    return out


def span(i: int, base_ns: int) -> tuple[Any, ...]:
    """A span row in otel_traces insert-column order; every 10th has an event and a link."""
    ev = i % 10 == 0
    return (
        base_ns + i, f"{i:032x}", f"{i:016x}", "" if i % 2 == 0 else f"{i - 1:016x}", "",
        "GET" if i % 3 else "query", "SPAN_KIND_CLIENT", f"/system.slice/svc{i % 7}.service",
        {"host.name": "node-1", "container.id": f"/system.slice/svc{i % 7}.service"},
        {"http.url": f"http://10.0.0.1:80/p/{i}", "http.status_code": str(200 + i % 3)},
        1_000_000 + i, "STATUS_CODE_ERROR" if i % 50 == 0 else "STATUS_CODE_UNSET", "",
        [base_ns + i + 5] if ev else [], ["exception"] if ev else [], [{"k": f"v{i}"}] if ev else [],
        [f"{i:032x}"] if ev else [], ["0"] if ev else [], [""] if ev else [], [{}] if ev else [],
    )
