"""container_application_type{application_type}: what a container runs (postgres, redis, nginx,
java, ...), guessed from each process's command line and binary by the Coroot node agent's
rules, one series of value 1 per type found among the container's processes.

The command's first word (argv[0] up to the first blank, one trailing ':' dropped, so the
process titles "postgres: checkpointer" and "nginx: worker process" count) is matched first;
an interpreter's binary path (php, python, node, ruby) is the fallback. Besides those, like the
node agent: "golang" for a Go binary (an ELF .go.buildinfo section), "rust" for one built by
rustc (its .comment section), when `runtimes` is on (the node agent looks at them while it
instruments TLS, so only with L7 tracing on); "dotnet" for `dotnet App.dll` or an apphost
binary (RPATH $ORIGIN/netcoredeps).

Processes are read on the poll thread: those the registry reported since the last tick, and
all of them again every `refresh` seconds (a process may retitle itself after exec). A
scrape reads the last result. Binaries are read once per file (bounded cache).
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

from agent.component import Component
from agent.containers.registry import Process, Registry
from agent.metrics import Families

log = logging.getLogger(__name__)

CMDLINE_MAX = 1 << 20  # a JVM's class path can be long; the main class comes after it
BINARY_CACHE = 4096
GO_BUILDINFO_MAGIC = b"\xff Go buildinf:"

_PHP = re.compile(rb"php(-fpm|-cgi)?\d*\.?\d*\Z")
_PYTHON = re.compile(rb"python\d*\.?\d*\Z")
_RUBY = re.compile(rb"ruby\d*\.?\d*\Z")
_NODEJS = re.compile(rb"node(js)?\d*\.?\d*\Z")
_INTERPRETERS = (("php", _PHP), ("python", _PYTHON), ("nodejs", _NODEJS), ("ruby", _RUBY))


@dataclass(frozen=True)
class Rule:
    """Matches when every condition given holds; each condition is satisfied by any of its
    alternatives. `suffix`/`within`: the command's first word ends with / contains one;
    `cmdline`: the whole command line (NUL-separated arguments) contains one."""

    app: str
    suffix: tuple[bytes, ...] = ()
    within: tuple[bytes, ...] = ()
    cmdline: tuple[bytes, ...] = ()

    def match(self, cmd: bytes, cmdline: bytes) -> bool:
        if self.suffix and not cmd.endswith(self.suffix):
            return False
        if self.within and not any(w in cmd for w in self.within):
            return False
        return not self.cmdline or any(w in cmdline for w in self.cmdline)


def _s(app: str, *suffixes: str) -> Rule:
    return Rule(app, suffix=tuple(s.encode() for s in suffixes))


def _c(app: str, *needles: str) -> Rule:
    return Rule(app, cmdline=tuple(s.encode() for s in needles))


# In the node agent's order (apptype/apptype.go, commit 89a16af8): the first match wins.
RULES: tuple[Rule, ...] = (
    _s("coroot-community-edition", "coroot"),
    _s("coroot-enterprise-edition", "coroot-ee"),
    _s("coroot-node-agent", "coroot-node-agent"),
    _s("coroot-cluster-agent", "coroot-cluster-agent"),
    _s("coroot-operator", "coroot-operator"),
    _s("memcached", "memcached"),
    _s("envoy", "envoy"),
    _c("elasticsearch", "org.elasticsearch.bootstrap"),
    _c("opensearch", "org.opensearch.bootstrap"),
    _c("kafka", "kafka.Kafka", "io.confluent.support.metrics.SupportedKafka"),
    _s("mongodb", "mongod"),
    _s("mongos", "mongos"),
    _s("mysql", "mysqld", "mariadbd"),
    _s("mssql", "sqlservr"),
    _c("zookeeper", "org.apache.zookeeper.server.quorum.QuorumPeerMain"),
    _s("redis", "redis-server"),
    _s("redis-sentinel", "redis-sentinel"),
    _s("keydb", "keydb-server"),
    _s("valkey", "valkey-server"),
    _s("dragonfly", "dragonfly"),
    Rule("rabbitmq", suffix=(b"beam.smp",), cmdline=(b"rabbit",)),
    Rule("couchbase", suffix=(b"beam.smp",), cmdline=(b"couch",)),
    _s("pgbouncer", "pgbouncer"),
    _s("postgres", "postgres"),
    _s("haproxy", "haproxy"),
    _s("nginx", "nginx"),
    _s("dotnet", "w3wp"),
    _s("kubelet", "kubelet"),
    _s("kube-apiserver", "kube-apiserver"),
    _s("kube-controller-manager", "kube-controller-manager"),
    _s("kube-scheduler", "kube-scheduler"),
    _s("k3s", "k3s"),
    _s("etcd", "etcd"),
    _s("dockerd", "dockerd"),
    _s("consul", "consul"),
    _c("cassandra", "org.apache.cassandra.service.CassandraDaemon"),
    _s("clickhouse", "clickhouse-server"),
    _s("traefik", "traefik"),
    _s("aerospike", "asd"),
    _s("httpd", "httpd", "apache"),
    _s("influxdb", "influxd"),
    _c("tomcat", "org.apache.catalina.startup.Bootstrap"),
    _s("vault", "vault"),
    _s("proxysql", "proxysql"),
    _s("cockroach", "cockroach"),
    _s("prometheus", "prometheus"),
    _s("ceph", "ceph-mon", "ceph-mgr", "ceph-osd", "cephcsi"),
    _s("rook", "rook"),
    _s("nats", "nats-server"),
    _s("java", "java"),
    _s("ollama", "ollama"),
    _s("foundationdb", "fdbserver"),
    Rule("victoria-metrics", within=(b"victoria-metrics", b"vmstorage", b"vminsert", b"vmselect")),
    Rule("victoria-logs", within=(b"victoria-logs",)),
)


def command(cmdline: bytes) -> bytes:
    """The command's first word: argv[0] up to the first blank, one trailing ':' dropped."""
    argv0 = cmdline.split(b"\0", 1)[0]
    words = argv0.split()
    if not words:
        return b""
    cmd = words[0]
    return cmd[:-1] if cmd.endswith(b":") else cmd


def guess_by_cmdline(cmdline: bytes) -> str:
    """The type for a /proc/PID/cmdline (NUL-separated; a trailing NUL is ignored); "" if none."""
    if cmdline.endswith(b"\0"):
        cmdline = cmdline[:-1]
    cmd = command(cmdline)
    if not cmd:
        return ""
    for rule in RULES:
        if rule.match(cmd, cmdline):
            return rule.app
    for app, rx in _INTERPRETERS:
        if rx.search(cmd):
            return app
    return ""


def guess_by_exe(exe: str) -> str:
    """The interpreter type for a binary's path ("/usr/bin/python3.11" -> python); "" if none."""
    raw = exe.encode(errors="surrogateescape")
    for app, rx in _INTERPRETERS:
        if rx.search(raw):
            return app
    return ""


def is_dotnet_command(cmdline: bytes) -> bool:
    """`dotnet App.dll ...`"""
    parts = cmdline.split(b"\0")
    return len(parts) >= 2 and parts[0].endswith(b"dotnet") and parts[1].endswith(b".dll")


@dataclass(frozen=True)
class BinaryKinds:
    golang: bool = False
    rust: bool = False
    dotnet_apphost: bool = False


def inspect_binary(path: str) -> BinaryKinds:
    """What the ELF file at `path` was built with; all False when it is not a readable ELF."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            golang = rust = apphost = False
            sec = elf.get_section_by_name(".go.buildinfo")
            if sec is not None:
                fh.seek(sec["sh_offset"])
                golang = fh.read(len(GO_BUILDINFO_MAGIC)) == GO_BUILDINFO_MAGIC
            sec = elf.get_section_by_name(".comment")
            if sec is not None and sec["sh_size"] <= 1 << 16:
                rust = b"rustc version" in sec.data()
            dyn = elf.get_section_by_name(".dynamic")
            if isinstance(dyn, DynamicSection):
                # pyelftools sets the decoded string as an attribute named after the tag
                paths = [getattr(t, "rpath", "") for t in dyn.iter_tags("DT_RPATH")] or \
                        [getattr(t, "runpath", "") for t in dyn.iter_tags("DT_RUNPATH")]
                apphost = paths == ["$ORIGIN/netcoredeps"]
            return BinaryKinds(golang, rust, apphost)
    except (OSError, ELFError, ValueError, KeyError, AssertionError, UnicodeDecodeError):
        return BinaryKinds()


def read_cmdline(procfs: str, pid: int) -> bytes:
    try:
        with open(f"{procfs}/{pid}/cmdline", "rb") as f:
            return f.read(CMDLINE_MAX)
    except OSError:
        return b""


class AppTypeCollector(Component):
    """container_application_type, one series per type per container."""

    name = "apptype"

    def __init__(self, registry: Registry, procfs: str = "/proc", runtimes: bool = True,
                 refresh: float = 30.0) -> None:
        self.registry = registry
        self.procfs = procfs
        self.runtimes = runtimes
        self.refresh = refresh
        self._pending: set[int] = set()
        self._types: dict[int, frozenset[str]] = {}
        self._binaries: OrderedDict[tuple[int, int, int, int], BinaryKinds] = OrderedDict()
        self._last_refresh: float | None = None
        self._synced = False
        self._dirty = False
        self._published: dict[str, frozenset[str]] = {}

    def on_process(self, what: str, proc: Process) -> None:
        if what == "added" and proc.container_id is not None:
            self._pending.add(proc.pid)
        elif what == "removed":
            self._pending.discard(proc.pid)
            if self._types.pop(proc.pid, None):
                self._dirty = True

    def on_rename(self, old: str, new: str) -> None:
        """Published again from the processes, which the registry has moved to `new`."""
        self._dirty = True

    def tick(self, now: float, gone: list[str]) -> None:
        if not self._synced:  # processes the registry knew before this component listened
            self._synced = True
            self._pending.update(self.registry.pids())
        if self._last_refresh is None or now - self._last_refresh >= self.refresh:
            self._last_refresh = now
            self._pending.update(self._types)
        for pid in self._pending:
            p = self.registry.process(pid)
            if p is None or p.container_id is None:
                self._types.pop(pid, None)
            else:
                self._types[pid] = self.classify(pid)
            self._dirty = True
        self._pending.clear()
        if self._dirty:
            self._dirty = False
            self._publish()

    def _publish(self) -> None:
        found: dict[str, set[str]] = {}
        for pid, types in self._types.items():
            p = self.registry.process(pid)
            if types and p is not None and p.container_id is not None:
                found.setdefault(p.container_id, set()).update(types)
        # Replaced whole: a scrape sees one state or the next.
        self._published = {cid: frozenset(t) for cid, t in found.items()}

    def classify(self, pid: int) -> frozenset[str]:
        """The types one process shows: from its command line or binary path, and the runtime
        of its binary."""
        cmdline = read_cmdline(self.procfs, pid)
        if cmdline.endswith(b"\0"):
            cmdline = cmdline[:-1]
        if not cmdline:
            return frozenset()  # a kernel thread or a zombie
        exe_link = f"{self.procfs}/{pid}/exe"
        try:
            exe = os.readlink(exe_link)
        except OSError:
            exe = ""
        out = set()
        app = guess_by_cmdline(cmdline) or (guess_by_exe(exe) if exe else "")
        if app:
            out.add(app)
        if exe and exe != "/":
            kinds = self._binary(exe_link)
            if self.runtimes and kinds.golang:
                out.add("golang")
            if self.runtimes and kinds.rust:
                out.add("rust")
            if is_dotnet_command(cmdline) or kinds.dotnet_apphost:
                out.add("dotnet")
        return frozenset(out)

    def _binary(self, exe_link: str) -> BinaryKinds:
        try:
            st = os.stat(exe_link)
        except OSError:
            return BinaryKinds()
        key = (st.st_dev, st.st_ino, st.st_size, int(st.st_mtime))
        kinds = self._binaries.get(key)
        if kinds is None:
            kinds = inspect_binary(exe_link)
            self._binaries[key] = kinds
            if len(self._binaries) > BINARY_CACHE:
                self._binaries.popitem(last=False)
        else:
            self._binaries.move_to_end(key)
        return kinds

    def collect(self, f: Families) -> None:
        published = self._published
        for c in self.registry.containers():
            for app in sorted(published.get(c.id, ())):
                f.gauge("container_application_type",
                        "Type of the application running in the container (e.g. memcached, "
                        "postgres, mysql)", 1, container_id=c.id, app_id=c.app_id, application_type=app)
