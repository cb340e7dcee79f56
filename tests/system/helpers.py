"""What system tests share: the agent as a real subprocess, test cgroups ("containers"),
and reading its /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

from agent.containers.cgroup import detect_layout

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """`python -m agent run` with a private port; logs kept for failure messages."""

    def __init__(self, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        """`prefix`: a command the agent runs under (e.g. setpriv and its options)."""
        self.prefix = list(prefix)
        self.port = free_port()
        self.storage = f"/tmp/coroot-agent-test-{self.port}"
        self.args = ["--listen", f"127.0.0.1:{self.port}", "--storage-path", self.storage,
                     "--wal-dir", f"{self.storage}/wal", *args]
        self.env = {k: v for k, v in os.environ.items() if k != "CONFIG"} | dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = f"/tmp/coroot-agent-test-{self.port}.log"

    def start(self, timeout: float = 60) -> float:
        """Start and wait for the first /metrics answer; returns seconds it took."""
        t0 = time.monotonic()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "agent", "run", *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
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
        for fam in text_string_to_metric_families(self.get("/metrics")):
            for s in fam.samples:
                out.append((s.name, dict(s.labels), s.value))
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample of `name` whose labels include `labels`, or None."""
        found = [v for n, lb, v in self.metrics() if n == name and labels.items() <= lb.items()]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
        return found[0] if found else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
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
