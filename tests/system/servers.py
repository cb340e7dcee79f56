"""Real servers from Debian, started by the tests in a temporary directory on loopback (or in a
network namespace), each inside a test cgroup when one is given: nginx (plain and TLS),
PostgreSQL (initdb into the directory), Redis, dnsmasq."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

from tests.system.helpers import TestCgroups, free_port, make_test_ca, sh, wait_port


class Server:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"ca-{type(self).__name__.lower()}-")
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: Sequence[str], cgroups: TestCgroups | None, cid: str | None, **kw: object) -> None:
        log = open(os.path.join(self.dir, "server.log"), "wb")  # noqa: SIM115 - the child owns it
        if cgroups is not None and cid is not None:
            self.proc = cgroups.spawn(cid, argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        else:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
        log.close()

    def log(self) -> str:
        with open(os.path.join(self.dir, "server.log"), errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


NGINX_CONF = """
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    server {{
        listen {host}:{port};
        listen {host}:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = /missing {{ return 404; }}
        location = /fail {{ return 500; }}
        location / {{ return 200 "hello\\n"; }}
    }}
}}
"""


class Nginx(Server):
    """`GET /missing` → 404, `GET /fail` → 500, anything else → 200 "hello\\n"; plain on
    `port`, TLS (certificate from a test CA, `ca` is its file) on `tls_port`."""

    def __init__(self, host: str = "127.0.0.1", workers: int = 1) -> None:
        super().__init__()
        self.host = host
        self.port, self.tls_port = free_port(), free_port()
        self.ca, cert, key = make_test_ca(self.dir, "nginx")
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(dir=self.dir, host=host, port=self.port, tls_port=self.tls_port,
                                      cert=cert, key=key, workers=workers))

    def start(self, cgroups: TestCgroups | None = None, cid: str | None = None) -> Nginx:
        self._spawn(["nginx", "-c", os.path.join(self.dir, "nginx.conf"), "-e", os.path.join(self.dir, "error.log")],
                    cgroups, cid)
        wait_port(self.host, self.port, proc=self.proc)
        wait_port(self.host, self.tls_port, proc=self.proc)
        return self


class Postgres(Server):
    """A cluster initdb'ed into a temp dir, trust auth over TCP on loopback, run as `postgres`."""

    BIN = "/usr/lib/postgresql/15/bin"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.host = host
        self.port = free_port()
        self.data = os.path.join(self.dir, "data")
        shutil.chown(self.dir, "postgres")
        os.chmod(self.dir, 0o755)
        subprocess.run(["runuser", "-u", "postgres", "--", f"{self.BIN}/initdb", "-D", self.data, "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True)

    def start(self, cgroups: TestCgroups | None = None, cid: str | None = None) -> Postgres:
        self._spawn(["runuser", "-u", "postgres", "--", f"{self.BIN}/postgres", "-D", self.data,
                     "-c", f"listen_addresses={self.host}", "-p", str(self.port), "-c", "unix_socket_directories=",
                     "-c", "fsync=off", "-c", "logging_collector=off"], cgroups, cid)
        wait_port(self.host, self.port, proc=self.proc)
        return self

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user=postgres dbname=postgres"


class Redis(Server):
    def __init__(self, host: str = "127.0.0.1", password: str = "") -> None:
        super().__init__()
        self.host = host
        self.port = free_port()
        self.password = password

    def start(self, cgroups: TestCgroups | None = None, cid: str | None = None) -> Redis:
        argv = ["redis-server", "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", self.dir]
        if self.password:
            argv += ["--requirepass", self.password]
        self._spawn(argv, cgroups, cid)
        wait_port(self.host, self.port, proc=self.proc)
        return self


class Dnsmasq(Server):
    """An authoritative-only dnsmasq on `host`:53 (run it inside a network namespace): each
    name in `records` answers with its addresses (A and AAAA); names in `nxdomain` answer
    NXDOMAIN; a type a name has no address of is REFUSED (there is no upstream)."""

    def __init__(self, host: str, records: dict[str, Sequence[str]], nxdomain: Sequence[str] = (),
                 options: Sequence[str] = ()) -> None:
        super().__init__()
        self.host = host
        self.records = records
        self.nxdomain = nxdomain
        self.options = options  # more dnsmasq options (--host-record, --srv-host, --filter-AAAA, ...)

    def start(self, netns_argv: Sequence[str] = (), cgroups: TestCgroups | None = None,
              cid: str | None = None) -> Dnsmasq:
        argv = [*netns_argv, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-daemon",
                f"--listen-address={self.host}", "--bind-interfaces", "--port=53", "--user=root",
                f"--pid-file={self.dir}/dnsmasq.pid", "--log-facility=-"]
        argv += [f"--address=/{name}/{ip}" for name, ips in self.records.items() for ip in ips]
        argv += [f"--address=/{name}/" for name in self.nxdomain]
        argv += self.options
        self._spawn(argv, cgroups, cid)
        time.sleep(0.3)
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {self.log()}")
        return self


def have(*binaries: str) -> bool:
    return all(shutil.which(b) for b in binaries)


__all__ = ["Nginx", "Postgres", "Redis", "Dnsmasq", "have", "sh"]
