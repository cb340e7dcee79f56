"""One validated, typed configuration from agent.yaml + environment + flags.

Precedence: command-line flag > environment variable > agent.yaml > default.
Every option is declared once, as a field of `Config` with its flag, environment name,
YAML key, default and help; the CLI, the loader and the README's options table are all
derived from those declarations. This module reads and validates; it starts nothing.

agent.yaml is untrusted input to a process that runs as root, so reading it is bounded: only a
regular file (never blocking on a FIFO), at most 1 MiB, strict UTF-8 without NUL bytes, one YAML
document checked event by event before anything is built (no anchors or aliases, no tags but
the standard scalar and collection ones, no `<<` merge keys, nesting at most 32 deep, at most
50,000 values). Every problem is a ConfigError naming the file, the line and the problem; the
CLI turns it into exit code 2. URLs keep no credentials: a user and password in a URL become
the matching user/password options, and nothing here ever prints a password.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import grp
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from agent import units

DEFAULT_CONFIG_PATH = "/etc/coroot-agent/agent.yaml"
API_SOCKET_NAME = "api.sock"

# Bounds on untrusted input (the file, each value from it, from the environment or a flag).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 50_000
MAX_VALUE_LENGTH = 65_536  # characters of one value (a flag, an environment variable, a YAML scalar)
MAX_EXPANSION = 1 << 20  # characters ${VAR} references may add to the whole file
MAX_LIST_ITEMS = 1024
MAX_REGEX_LENGTH = 4096
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with the terminating NUL


class ConfigError(Exception):
    """A bad configuration input. The message names the key (and the line, for YAML)."""


@dataclass(frozen=True)
class Option:
    field: str
    kind: str
    default: Any
    help: str
    flag: str | None = None
    env: str | None = None
    yaml: str | None = None
    invert: bool = False  # the flag/env is `--disable-X` for a YAML `enabled: true` key
    secret: bool = False
    check: Callable[[Any], None] | None = None

    @property
    def env_name(self) -> str | None:
        if self.env:
            return self.env
        if self.flag:
            return self.flag.lstrip("-").upper().replace("-", "_")
        return None


def _opt(default: Any, kind: str, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"option": (kind, help, kw)})


def _between(lo: float, hi: float) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}, got {v:g}")

    return check


def _power_of_two(lo: int, hi: int) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not lo <= v <= hi or v & (v - 1):
            raise ValueError(f"must be a power of two between {lo} and {hi}, got {v}")

    return check


def _positive(v: Any) -> None:
    if v <= 0:
        raise ValueError(f"must be greater than 0, got {v}")


def _socket_path(v: str) -> None:
    if v and not v.startswith("/"):
        raise ValueError(f"must be an absolute path, got {_show(v)}")
    if len(v.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"a unix socket path holds at most {MAX_SOCKET_PATH} bytes, got {len(v.encode())}")


def _group(v: str) -> None:
    if not v:
        return
    try:
        grp.getgrgid(int(v)) if v.isdigit() else grp.getgrnam(v)
    except (KeyError, OverflowError):
        raise ValueError(f"no such group {_show(v)} on this host") from None


def _runtime_names(v: tuple[str, ...]) -> None:
    known = ("containerd", "crio", "docker", "podman")
    bad = [n for n in v if n not in known]
    if bad:
        raise ValueError(f"unknown container runtime {_show(bad[0])}; known: {', '.join(known)}")


def _log_level(v: str) -> None:
    if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be one of debug, info, warning, error; got {_show(v)}")


@dataclass(frozen=True)
class Config:
    # --- agent process ---
    listen: str = _opt("127.0.0.1:8080", "hostport", "address of the agent HTTP API (/metrics, /healthz, /api/*)", flag="--listen", yaml="listen")
    api_key: str = _opt("", "str", "project API key: sent as X-Api-Key; /api/* over TCP requires it from every client, loopback included (local use without it goes through api_socket)", flag="--api-key", yaml="api_key", secret=True)
    log_level: str = _opt("info", "str", "log level: debug, info, warning, error", flag="--log-level", yaml="log_level", check=_log_level)
    cgroupfs_root: str = _opt("/sys/fs/cgroup", "str", "where the cgroup filesystem is mounted", flag="--cgroupfs-root", yaml="cgroupfs_root")
    drop_capabilities: bool = _opt(True, "bool", "after attaching the probes, drop every capability not needed any more and set no_new_privs", flag="--keep-capabilities", yaml="drop_capabilities", invert=True)
    procfs_root: str = _opt("/proc", "str", "where the host's procfs is mounted", flag="--procfs-root", yaml="procfs_root")
    api_socket: str = _opt("", "str", "unix socket for local /api/* access (coroot-agent query); empty = api.sock in storage.path", flag="--api-socket", yaml="api_socket", check=_socket_path)
    api_socket_group: str = _opt("", "str", "a group whose members may use the API socket (name or gid); empty = root only", flag="--api-socket-group", yaml="api_socket_group", check=_group)
    # --- what is collected ---
    tracer_enabled: bool = _opt(True, "bool", "produce spans for traced requests (metrics are counted either way)", flag="--disable-traces", yaml="nodeAgent.ebpfTracer.enabled", invert=True)
    traces_sampling: float = _opt(1.0, "float", "fraction of requests that become spans, 0.0-1.0 (never applied to metrics)", flag="--traces-sampling", yaml="nodeAgent.ebpfTracer.sampling", check=_between(0.0, 1.0))
    l7_tracing: bool = _opt(True, "bool", "attach the L7 (request) probes at all", flag="--disable-l7-tracing", yaml="l7_tracing", invert=True)
    l7_payload_size: int = _opt(1024, "int", "request bytes captured per L7 request: 64-4096, a power of two", flag="--l7-payload-size", yaml="nodeAgent.ebpfTracer.payloadSize", check=_power_of_two(64, 4096))
    mask_url_query: bool = _opt(True, "bool", "mask URL query-string values before they are stored (HTTP headers are never stored)", flag="--disable-url-query-masking", yaml="privacy.mask_url_query", invert=True)
    mask_url_path: bool = _opt(True, "bool", "mask URL path segments that look like secrets (long hex/base64/JWT-shaped tokens, ;jsessionid=-style parameters) before they are stored", flag="--disable-url-path-masking", yaml="privacy.mask_url_path", invert=True)
    mask_sql_literals: bool = _opt(True, "bool", "mask SQL string and number literals (Postgres and MySQL statements) before they are stored", flag="--disable-sql-literal-masking", yaml="privacy.mask_sql_literals", invert=True)
    mask_redis_values: bool = _opt(True, "bool", "mask Redis arguments other than the key (AUTH passwords, SET values) before they are stored", flag="--disable-redis-value-masking", yaml="privacy.mask_redis_values", invert=True)
    exclude_http_requests_by_path: tuple[str, ...] = _opt((), "list", "HTTP paths that produce no spans (repeatable)", flag="--exclude-http-requests-by-path", yaml="exclude_http_requests_by_path")
    profiler_enabled: bool = _opt(True, "bool", "run the CPU profiler", flag="--disable-profiling", yaml="nodeAgent.ebpfProfiler.enabled", invert=True)
    profiling_frequency: int = _opt(99, "int", "CPU profiler sampling frequency in Hz (1-1000)", flag="--profiling-frequency", yaml="nodeAgent.ebpfProfiler.frequency", check=_between(1, 1000))
    native_unwinding: bool = _opt(False, "bool", "unwind native stacks without frame pointers from each mapped file's .eh_frame/.debug_frame tables, built in the agent and walked in the kernel (off by default: building the tables of a host's processes costs seconds of CPU at start, ~0.8 s per MB of CFI, and walking them ~5-9 µs per sample; without it native stacks are walked by frame pointers)", flag="--enable-native-unwinding", yaml="native_unwinding")
    profiling_interval: float = _opt(60.0, "duration", "how often profiles are written to the store", flag="--profiling-interval", yaml="nodeAgent.ebpfProfiler.interval", check=_positive)
    log_metrics_enabled: bool = _opt(True, "bool", "count log messages by level and pattern (container_log_messages_total)", flag="--disable-log-parsing", yaml="nodeAgent.logCollector.collectLogBasedMetrics", invert=True)
    log_entries_enabled: bool = _opt(True, "bool", "store log records in otel_logs", flag="--disable-log-entries", yaml="nodeAgent.logCollector.collectLogEntries", invert=True)
    log_mask_emails: bool = _opt(True, "bool", "mask e-mail addresses in log records before they are stored", flag="--disable-log-email-masking", yaml="privacy.logs.emails", invert=True)
    log_mask_cards: bool = _opt(True, "bool", "mask card numbers (Luhn-checked, any separator) in log records before they are stored", flag="--disable-log-card-masking", yaml="privacy.logs.cards", invert=True)
    log_mask_tokens: bool = _opt(True, "bool", "mask bearer tokens and JWTs in log records before they are stored", flag="--disable-log-token-masking", yaml="privacy.logs.tokens", invert=True)
    log_mask_secrets: bool = _opt(True, "bool", "mask password=/secret=/token=-style values (URL-encoded too) in log records before they are stored", flag="--disable-log-secret-masking", yaml="privacy.logs.secrets", invert=True)
    log_mask_headers: bool = _opt(True, "bool", "mask Authorization (Basic too), Cookie and Set-Cookie header values in log records before they are stored", flag="--disable-log-header-masking", yaml="privacy.logs.headers", invert=True)
    log_mask_cloud_keys: bool = _opt(True, "bool", "mask AWS, GCP and GitHub-style keys in log records before they are stored", flag="--disable-log-cloud-key-masking", yaml="privacy.logs.cloud_keys", invert=True)
    log_mask_ipv4: bool = _opt(False, "bool", "mask IPv4 addresses in log records before they are stored", flag="--enable-log-ipv4-masking", yaml="privacy.logs.ipv4")
    log_patterns_per_container: int = _opt(256, "int", "distinct log patterns kept per container", flag="--log-patterns-per-container", yaml="log_patterns_per_container", check=_positive)
    track_public_networks: tuple[str, ...] = _opt(("0.0.0.0/0",), "cidrs", "public destinations inside these prefixes are labelled (repeatable; private, CGNAT and loopback always are)", flag="--track-public-network", yaml="nodeAgent.trackPublicNetworks")
    ephemeral_port_range: str = _opt("32768-60999", "portrange", "listen sockets on ports in this range are not reported", flag="--ephemeral-port-range", yaml="ephemeral_port_range")
    max_fqdns_per_container: int = _opt(50, "int", "distinct DNS domains kept per container", flag="--max-fqdns-per-container", yaml="max_fqdns_per_container", check=_positive)
    pinger_enabled: bool = _opt(True, "bool", "ping (ICMP echo) the peers of containers' open TCP connections every scrape interval: container_net_latency_seconds", flag="--disable-pinger", yaml="pinger", invert=True)
    tcp_events_pages: int = _opt(0, "int", "size of the TCP event buffer in pages, a power of two up to 4096 (ring buffer kernels, 5.8+); 0 = the default (64). Connect counts stay exact when it overflows; tests shrink it to prove that", flag="--tcp-events-pages", check=lambda v: v == 0 or _power_of_two(1, 4096)(v))
    max_label_length: int = _opt(4096, "int", "longer label values are truncated", flag="--max-label-length", yaml="max_label_length", check=_positive)
    jvm_enabled: bool = _opt(True, "bool", "read JVM performance counters (hsperfdata) for container_jvm_* metrics", flag="--disable-jvm-monitoring", yaml="runtime_metrics.jvm", invert=True)
    python_gil_enabled: bool = _opt(False, "bool", "uprobes on the C library's pthread_cond_timedwait of each Python process for container_python_thread_lock_wait_time_seconds (off by default: two uprobes per Python process, each ~40-80 ms of the kernel's detach after the agent's stop)", flag="--enable-python-gil-monitoring", yaml="runtime_metrics.python")
    nodejs_enabled: bool = _opt(False, "bool", "uprobes on libuv's uv__io_poll and I/O callbacks in each Node.js binary (or libuv) for container_nodejs_event_loop_blocked_time_seconds_total (off by default, as the Python GIL probes: 12 uprobes per file, detached at the agent's stop)", flag="--enable-nodejs-monitoring", yaml="runtime_metrics.nodejs")
    dotnet_enabled: bool = _opt(True, "bool", "read .NET runtime counters (EventCounters of System.Runtime) over each .NET process's diagnostics IPC socket for container_dotnet_* metrics", flag="--disable-dotnet-monitoring", yaml="runtime_metrics.dotnet", invert=True)
    dotnet_interval: int = _opt(5, "int", "EventCounterIntervalSec asked of .NET processes: seconds between their counter reports", flag="--dotnet-counter-interval", yaml="runtime_metrics.dotnet_interval", check=_positive)
    # --- containers ---
    container_allowlist: tuple[str, ...] = _opt((), "regexes", "only containers whose id matches one of these regexes (repeatable)", flag="--container-allowlist", yaml="container_allowlist")
    container_denylist: tuple[str, ...] = _opt((), "regexes", "containers whose id matches one of these regexes are ignored (repeatable)", flag="--container-denylist", yaml="container_denylist")
    min_container_age: float = _opt(30.0, "duration", "containers younger than this are not reported yet (0s disables)", flag="--min-container-age", yaml="min_container_age")
    dead_container_ttl: float = _opt(60.0, "duration", "a container whose last process exited is forgotten after this", flag="--dead-container-ttl", yaml="dead_container_ttl")
    containerd_socket: str = _opt("", "str", "containerd's gRPC socket; empty = the first found of /var/snap/microk8s/common/run/containerd.sock, /run/k0s/containerd.sock, /run/k3s/containerd/containerd.sock, /run/containerd/containerd.sock (as mounted, then under /proc/1/root)", flag="--containerd-socket", yaml="runtimes.containerd_socket", check=_socket_path)
    crio_socket: str = _opt("", "str", "CRI-O's socket; empty = /var/run/crio/crio.sock or /run/crio/crio.sock", flag="--crio-socket", yaml="runtimes.crio_socket", check=_socket_path)
    docker_socket: str = _opt("", "str", "the Docker Engine API socket; empty = /run/docker.sock or /var/run/docker.sock", flag="--docker-socket", yaml="runtimes.docker_socket", check=_socket_path)
    podman_socket: str = _opt("", "str", "Podman's API socket; empty = /run/podman/podman.sock or /var/run/podman/podman.sock", flag="--podman-socket", yaml="runtimes.podman_socket", check=_socket_path)
    disabled_runtimes: tuple[str, ...] = _opt((), "list", "container runtimes never asked for container names (repeatable): containerd, crio, docker, podman", flag="--disable-runtime", yaml="runtimes.disabled", check=_runtime_names)
    runtime_cache_size: int = _opt(4096, "int", "containers whose runtime answer is kept (least recently used go first)", flag="--runtime-cache-size", yaml="runtimes.cache_size", check=_positive)
    # --- metrics shipping ---
    metrics_endpoint: str = _opt("", "str", "Prometheus remote_write URL, http:// or https:// (alias --remote-write-url); a user:password@ in it becomes basic auth", flag="--metrics-endpoint", yaml="global_prometheus.remote_write_url")
    prometheus_url: str = _opt("", "str", "Prometheus query URL, http:// or https:// (informational; the agent only writes)", yaml="global_prometheus.url")
    prometheus_refresh_interval: float = _opt(15.0, "duration", "Coroot server setting, accepted and unused by the agent", yaml="global_prometheus.refresh_interval")
    prometheus_user: str = _opt("", "str", "basic-auth user for remote_write", flag="--prometheus-user", yaml="global_prometheus.user")
    prometheus_password: str = _opt("", "str", "basic-auth password for remote_write", flag="--prometheus-password", yaml="global_prometheus.password", secret=True)
    prometheus_custom_headers: tuple[tuple[str, str], ...] = _opt((), "map", "extra HTTP headers on remote_write requests", yaml="global_prometheus.custom_headers")
    insecure_skip_verify: bool = _opt(False, "bool", "skip TLS verification for remote_write", flag="--insecure-skip-verify", yaml="global_prometheus.tls_skip_verify")
    ca_file: str = _opt("", "str", "CA bundle for remote_write TLS", flag="--ca-file", yaml="global_prometheus.ca_file")
    scrape_interval: float = _opt(15.0, "duration", "how often metrics are gathered and sent", flag="--scrape-interval", yaml="scrape_interval", check=_positive)
    wal_dir: str = _opt("/var/lib/coroot-agent/wal", "str", "remote_write spool directory", flag="--wal-dir", yaml="wal_dir")
    max_spool_size: int = _opt(500_000_000, "size", "disk bound of each spool; the oldest is dropped beyond it", flag="--max-spool-size", yaml="max_spool_size")
    # --- store (ClickHouse) ---
    storage_path: str = _opt("/var/lib/coroot-agent", "str", "embedded store directory (used when no ClickHouse address is set)", flag="--storage-path", yaml="storage.path")
    clickhouse_address: str = _opt("", "str", "remote ClickHouse host:port (or http(s):// URL) over HTTP(S); empty = embedded store; a user:password@ in it becomes the user and password", flag="--clickhouse-address", yaml="global_clickhouse.address")
    clickhouse_user: str = _opt("default", "str", "ClickHouse user", flag="--clickhouse-user", yaml="global_clickhouse.user")
    clickhouse_password: str = _opt("", "str", "ClickHouse password", flag="--clickhouse-password", yaml="global_clickhouse.password", secret=True)
    clickhouse_database: str = _opt("coroot", "str", "ClickHouse database", flag="--clickhouse-database", yaml="global_clickhouse.database")
    clickhouse_tls: bool = _opt(False, "bool", "use HTTPS to reach ClickHouse", flag="--clickhouse-tls", yaml="global_clickhouse.tls_enable")
    clickhouse_tls_skip_verify: bool = _opt(False, "bool", "skip ClickHouse TLS verification", flag="--clickhouse-tls-skip-verify", yaml="global_clickhouse.tls_skip_verify")
    clickhouse_ca_file: str = _opt("", "str", "CA bundle for ClickHouse TLS", flag="--clickhouse-ca-file", yaml="global_clickhouse.ca_file")
    clickhouse_cluster: str = _opt("", "str", "ClickHouse cluster name: ON CLUSTER DDL, replicated and distributed tables", flag="--clickhouse-cluster", yaml="global_clickhouse.cluster")
    store_spool_size: int = _opt(500_000_000, "size", "disk bound of the store spool (batches waiting while ClickHouse is down)", flag="--store-spool-size", yaml="storage.spool_size")
    store_batch_rows: int = _opt(50_000, "int", "rows per ClickHouse insert (a batch is written when full or old)", flag="--store-batch-rows", yaml="storage.batch_rows", check=_positive)
    store_batch_age: float = _opt(5.0, "duration", "a batch is written at the latest this long after its first row", flag="--store-batch-age", yaml="storage.batch_age", check=_positive)
    traces_ttl: float = _opt(7 * 86400.0, "duration", "how long spans are kept", flag="--traces-ttl", yaml="storage.traces_ttl", check=_positive)
    logs_ttl: float = _opt(7 * 86400.0, "duration", "how long log records are kept", flag="--logs-ttl", yaml="storage.logs_ttl", check=_positive)
    profiles_ttl: float = _opt(7 * 86400.0, "duration", "how long profiles are kept", flag="--profiles-ttl", yaml="storage.profiles_ttl", check=_positive)
    metrics_ttl: float = _opt(7 * 86400.0, "duration", "how long metric history is kept in the store's metrics table", flag="--metrics-ttl", yaml="storage.metrics_ttl", check=_positive)

    @property
    def listen_address(self) -> tuple[str, int]:
        return units.parse_host_port(self.listen)

    @property
    def probe_families(self) -> list[str]:
        """The BPF probe families (agent/ebpf/loader.py FAMILIES) this configuration runs."""
        fams = ["proc", "tcp"]
        if self.l7_tracing:
            fams.append("l7")
        if self.log_metrics_enabled or self.log_entries_enabled:
            fams.append("logs")
        if self.profiler_enabled:
            fams.append("profiler")
        if self.python_gil_enabled:
            fams.append("python")
        if self.nodejs_enabled:
            fams.append("nodejs")
        return fams

    @property
    def embedded_store(self) -> bool:
        return not self.clickhouse_address

    @property
    def api_socket_path(self) -> str:
        return self.api_socket or os.path.join(self.storage_path, API_SOCKET_NAME)

    def redacted(self) -> dict[str, Any]:
        """Field values with secrets masked: safe to log or print. URLs lose any user:password@
        (load() has moved them out already; a Config built by hand may still carry one) and
        custom headers that carry credentials show <set>."""
        out: dict[str, Any] = {}
        for opt in OPTIONS:
            v = getattr(self, opt.field)
            if opt.secret and v:
                v = "<set>"
            elif opt.field in URL_FIELDS and v:
                v = units.redact_url(v)
            elif opt.kind == "map":
                v = tuple((k, "<set>" if _SECRET_HEADER.search(k) else x) for k, x in v)
            out[opt.field] = v
        return out


# Options that hold a URL (or, for ClickHouse, an address that may be one).
URL_FIELDS = ("metrics_endpoint", "prometheus_url", "clickhouse_address")
_SECRET_HEADER = re.compile(r"(?i)auth|cookie|token|secret|pass|key|credential|session")

# Sections that belong to the Coroot server or the operator: the seed's snippets carry them,
# so they load, but the agent reads nothing from them.
IGNORED_SUBTREES = ("auth", "projects", "nodeAgent.resources")


def _collect_options() -> tuple[Option, ...]:
    out = []
    for f in dataclasses.fields(Config):
        kind, help_, kw = f.metadata["option"]
        out.append(Option(field=f.name, kind=kind, default=f.default, help=help_, **kw))
    return tuple(out)


OPTIONS: tuple[Option, ...] = _collect_options()
OPTIONS_BY_FIELD = {o.field: o for o in OPTIONS}
_BY_YAML = {o.yaml: o for o in OPTIONS if o.yaml}
# Extra flag spellings: Coroot's and ours name the same thing.
FLAG_ALIASES = {"metrics_endpoint": ("--remote-write-url",)}
ENV_ALIASES = {"metrics_endpoint": ("REMOTE_WRITE_URL",)}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_HEADER_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _convert(opt: Option, value: Any, *, from_text: bool) -> Any:
    """Turn a raw value (YAML-typed, or text from env/flags) into the option's type."""
    k = opt.kind
    if isinstance(value, str) and len(value) > MAX_VALUE_LENGTH:
        raise ValueError(f"the value is {len(value)} characters long; the limit is {MAX_VALUE_LENGTH}")
    if k == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {_show(value)}")
    if k == "str" or k == "hostport" or k == "portrange":
        if isinstance(value, bool) or isinstance(value, list | dict) or value is None:
            raise ValueError("expected a string" + ("" if opt.secret else f", got {_show(value)}"))
        s = str(value)
        if k == "hostport":
            units.parse_host_port(s)
        if k == "portrange":
            units.parse_port_range(s)
        return s
    if k == "int":
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {_show(value)}")
        try:
            return int(str(value).strip()) if isinstance(value, str) else _int_exact(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {_show(value)}") from None
    if k == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {_show(value)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {_show(value)}") from None
    if k == "duration":
        return units.parse_duration(value)
    if k == "size":
        return units.parse_size(value)
    if k in ("list", "cidrs", "regexes"):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and from_text:
            for v in value:
                if len(str(v)) > MAX_VALUE_LENGTH:
                    raise ValueError(f"the value is {len(str(v))} characters long; the limit is {MAX_VALUE_LENGTH}")
            items = [x for v in value for x in re.split(r"[,\s]+", str(v)) if x]
        elif isinstance(value, list):
            items = value
        else:
            raise ValueError(f"expected a list, got {_show(value)}")
        if len(items) > MAX_LIST_ITEMS:
            raise ValueError(f"{len(items)} items; the limit is {MAX_LIST_ITEMS}")
        out = []
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"expected a list of strings, got item {_show(item)}")
            if len(item) > MAX_VALUE_LENGTH:
                raise ValueError(f"an item is {len(item)} characters long; the limit is {MAX_VALUE_LENGTH}")
            if k == "cidrs":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"expected a network prefix like 10.0.0.0/8, got {_show(item)}") from None
            if k == "regexes":
                if len(item) > MAX_REGEX_LENGTH:
                    raise ValueError(f"a regular expression is {len(item)} characters long; the limit is {MAX_REGEX_LENGTH}")
                try:
                    re.compile(item)
                except re.error as e:
                    raise ValueError(f"bad regular expression {_show(item)}: {e}") from None
                except (RecursionError, OverflowError, MemoryError):
                    raise ValueError(f"regular expression {_show(item)} is nested or repeated too deeply to compile") from None
            out.append(item)
        return tuple(out)
    if k == "map":
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of names to strings, got {_show(value)}")
        if len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"{len(value)} entries; the limit is {MAX_LIST_ITEMS}")
        pairs = []
        for key, v in value.items():
            if not isinstance(key, str) or isinstance(v, list | dict) or v is None:
                raise ValueError(f"expected string values, got {_show(key)}: {_show(v)}")
            if not _HEADER_NAME.fullmatch(key):
                raise ValueError(f"{_show(key)} is not a valid HTTP header name")
            text = str(v)
            if len(text) > MAX_VALUE_LENGTH or _HEADER_BAD_VALUE.search(text):
                raise ValueError(f"the value of {_show(key)} holds a line break or control character, or is too long")
            pairs.append((key, text))
        return tuple(pairs)
    raise AssertionError(f"unknown option kind {k}")


def _show(value: Any, limit: int = 100) -> str:
    """repr() for an error message, cut so a 64 KiB value does not become a 64 KiB message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _int_exact(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


# ---------------------------------------------------------------- YAML -----


@dataclass
class _Leaf:
    value: Any
    line: int


class _Budget:
    """Characters that ${VAR} references may still add to the file (an environment variable
    repeated a million times must not become gigabytes)."""

    def __init__(self, left: int = MAX_EXPANSION) -> None:
        self.left = left

    def spend(self, n: int, where: str) -> None:
        self.left -= n
        if self.left < 0:
            raise ConfigError(f"{where}: ${{VAR}} references expand to more than {MAX_EXPANSION} characters")


def _expand(value: Any, environ: Mapping[str, str], where: str, budget: _Budget | None = None) -> Any:
    budget = budget if budget is not None else _Budget()
    if isinstance(value, str):
        if "${" not in value:
            return value
        parts: list[str] = []
        pos = 0
        for m in _VAR_RE.finditer(value):
            name = m.group(1)
            if name not in environ:
                raise ConfigError(
                    f"{where}: environment variable {name} is not set "
                    f"(referenced as ${{{name}}}); export it or remove the reference"
                )
            budget.spend(len(environ[name]), where)
            parts += (value[pos:m.start()], environ[name])
            pos = m.end()
        parts.append(value[pos:])
        return "".join(parts)
    if isinstance(value, list):
        return [_expand(v, environ, where, budget) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, environ, where, budget) for k, v in value.items()}
    return value


# libyaml when built with it
_Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = {"!", _STD + "str", _STD + "int", _STD + "float", _STD + "bool", _STD + "null"}
_COLLECTION_TAGS = {"!", _STD + "seq", _STD + "map"}


def _check_events(text: str, src: str) -> None:
    """Walk the parser's events and refuse, before any node exists, what could make building
    the document expensive or unsafe: anchors and aliases (the "billion laughs"), tags other than
    the standard ones (`!!python/...`, `!custom`), `<<` merge keys, nesting deeper than
    MAX_YAML_DEPTH, more than MAX_YAML_NODES values, more than one document."""
    loader = _Loader(text)
    # One entry per open collection: [is_mapping, children seen so far].
    stack: list[list[Any]] = []
    nodes = 0
    documents = 0
    try:
        while loader.check_event():
            ev = loader.get_event()
            if ev is None:  # never after check_event() said there is one
                break
            line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
            where = f"{src}:{line}"
            if isinstance(ev, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ConfigError(f"{where}: more than one YAML document (---); agent.yaml holds one")
                continue
            if isinstance(ev, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                stack.pop()
                continue
            if not isinstance(ev, yaml.NodeEvent):
                continue
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise ConfigError(f"{where}: more than {MAX_YAML_NODES} values; this is not an agent configuration")
            if isinstance(ev, yaml.AliasEvent):
                raise ConfigError(f"{where}: YAML aliases (*{ev.anchor}) are not supported; write the value out")
            if ev.anchor is not None:
                raise ConfigError(f"{where}: YAML anchors (&{ev.anchor}) are not supported; write the value out")
            is_key = bool(stack) and stack[-1][0] and stack[-1][1] % 2 == 0
            if stack:
                stack[-1][1] += 1
            if isinstance(ev, yaml.ScalarEvent):
                if ev.tag is not None and ev.tag not in _SCALAR_TAGS:
                    raise ConfigError(f"{where}: the YAML tag {ev.tag!r} is not supported (only plain values)")
                if is_key and ev.value == "<<" and ev.tag is None and ev.implicit[0]:  # plain, untagged
                    raise ConfigError(f"{where}: YAML merge keys (<<) are not supported; write the keys out")
                continue
            if not isinstance(ev, yaml.CollectionStartEvent):
                continue  # never: a node event is an alias, a scalar or a collection start
            if ev.tag is not None and ev.tag not in _COLLECTION_TAGS:
                raise ConfigError(f"{where}: the YAML tag {ev.tag!r} is not supported (only plain values)")
            if len(stack) >= MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep")
            stack.append([isinstance(ev, yaml.MappingStartEvent), 0])
    finally:
        loader.dispose()


def _construct(node: yaml.Node, src: str) -> Any:
    """A node's Python value; what the constructor cannot build (`!!int x`, `2024-13-45`) is a
    ConfigError naming the line, never an exception from the YAML library."""
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
        where = f"{src}:{node.start_mark.line + 1}"
        kind = str(node.tag).rsplit(":", 1)[-1]
        if isinstance(node, yaml.ScalarNode):
            raise ConfigError(f"{where}: cannot read {node.value[:100]!r} as !!{kind}{_reason(e)}") from None
        raise ConfigError(f"{where}: cannot read the !!{kind}{_reason(e)}") from None


def _reason(e: Exception) -> str:
    if isinstance(e, KeyError):
        return ""
    text = str(e).strip()
    return f" ({text.splitlines()[0][:200]})" if text else ""


def _walk(node: yaml.Node, prefix: str, src: str, out: dict[str, _Leaf]) -> None:
    """Flatten a YAML mapping into dotted keys, keeping line numbers and refusing duplicates."""
    seen: set[str] = set()
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{src}:{line}: keys must be strings")
        key = _construct(key_node, src)
        if not isinstance(key, str):
            raise ConfigError(f"{src}:{line}: keys must be strings, got {key!r}")
        path = f"{prefix}.{key}" if prefix else key
        if key in seen:
            raise ConfigError(f"{src}:{line}: duplicate key '{path}'")
        seen.add(key)
        if any(path == s or path.startswith(s + ".") for s in IGNORED_SUBTREES):
            continue
        if path in _BY_YAML:
            out[path] = _Leaf(_construct(value_node, src), line)
        elif _is_section(path):
            if isinstance(value_node, yaml.MappingNode):
                _walk(value_node, path, src, out)
            elif value_node.tag != "tag:yaml.org,2002:null":
                raise ConfigError(f"{src}:{line}: '{path}' must be a mapping")
            # else: an empty section, e.g. `global_clickhouse:` with nothing under it
        else:
            known = sorted(_BY_YAML) + list(IGNORED_SUBTREES)
            hint = difflib.get_close_matches(path[:200], known, n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{src}:{line}: unknown key '{path[:200]}'{more}")


def _is_section(path: str) -> bool:
    below = path + "."
    return any(k.startswith(below) for k in _BY_YAML) or any(
        s.startswith(below) for s in IGNORED_SUBTREES
    )


def parse_yaml(text: str, src: str = "agent.yaml") -> dict[str, _Leaf]:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{src}: {len(text)} characters; a config file holds at most {MAX_CONFIG_BYTES} bytes (1 MiB)")
    if "\0" in text:
        raise ConfigError(f"{src}:{text.count(chr(10), 0, text.index(chr(0))) + 1}: a NUL character; this is not a text file")
    try:
        _check_events(text, src)
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {str(e).replace('<unicode string>', src)}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{src}: the top level must be a mapping of keys")
    out: dict[str, _Leaf] = {}
    _walk(root, "", src, out)
    return out


def read_config_file(path: str) -> str:
    """The text of agent.yaml: a regular file of at most MAX_CONFIG_BYTES, strict UTF-8, no NUL.
    Never blocks: a FIFO, socket or device is refused from its stat before it is opened, and the
    open itself is non-blocking in case the path is swapped in between."""
    where = f"config file {path}"
    try:
        st = os.stat(path)
        _check_file_kind(st, where)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        _check_file_kind(st, where)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is {st.st_size} bytes; the limit is {MAX_CONFIG_BYTES} bytes (1 MiB)")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than the limit of {MAX_CONFIG_BYTES} bytes (1 MiB)")
    return decode_config(data, os.path.basename(path))


def decode_config(data: bytes, src: str) -> str:
    """Strict UTF-8 without NUL bytes; an error names the byte offset and its line."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{src}:{_line_at(data, nul)}: a NUL byte at offset {nul}; "
                          "this is a binary file, not YAML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}:{_line_at(data, e.start)}: not UTF-8 text: byte 0x{data[e.start]:02x} "
                          f"at offset {e.start} ({e.reason})") from None


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _check_file_kind(st: os.stat_result, where: str) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    raise ConfigError(f"{where} is {kind}; it must be a regular file")


# ------------------------------------------------------------------ URLs ---


def _split_urls(values: dict[str, Any]) -> None:
    """Take user:password@ out of the URL options into the matching user/password options,
    and accept only http(s). `values` holds only what was set somewhere (no defaults)."""
    prom_creds: tuple[str, str, str] | None = None  # (field it came from, user, password)
    for fname in ("metrics_endpoint", "prometheus_url"):
        opt = OPTIONS_BY_FIELD[fname]
        if not values.get(fname):
            continue
        try:
            u = units.parse_http_url(values[fname])
        except ValueError as e:
            raise ConfigError(f"{_describe(opt)}: {e}") from None
        values[fname] = u.url
        if not u.has_credentials:
            continue
        if values.get("prometheus_user") or values.get("prometheus_password"):
            raise ConfigError(
                f"{_describe(opt)}: the URL carries a user and password, and global_prometheus.user / "
                "password (--prometheus-user, --prometheus-password) are set too; use one of the two")
        if prom_creds is not None and prom_creds[1:] != (u.user, u.password):
            raise ConfigError(
                f"{_describe(opt)}: the URL carries a user and password different from those in "
                f"{_describe(OPTIONS_BY_FIELD[prom_creds[0]])}; set global_prometheus.user and password once")
        prom_creds = (fname, u.user, u.password)
    if prom_creds is not None:
        values["prometheus_user"], values["prometheus_password"] = prom_creds[1], prom_creds[2]

    address = values.get("clickhouse_address", "")
    if address and ("@" in address or "://" in address):
        opt = OPTIONS_BY_FIELD["clickhouse_address"]
        has_scheme = "://" in address
        try:
            u = units.parse_http_url(address if has_scheme else f"http://{address.strip()}")
        except ValueError as e:
            raise ConfigError(f"{_describe(opt)}: {e}") from None
        values["clickhouse_address"] = u.url if has_scheme else u.url.removeprefix("http://")
        if u.has_credentials:
            if "clickhouse_user" in values or values.get("clickhouse_password"):
                raise ConfigError(
                    f"{_describe(opt)}: the address carries a user and password, and global_clickhouse.user / "
                    "password (--clickhouse-user, --clickhouse-password) are set too; use one of the two")
            values["clickhouse_user"] = u.user or "default"
            values["clickhouse_password"] = u.password


# -------------------------------------------------------------- loading ----


def load(
    args: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Config:
    """Build the Config. `args` holds values given as flags (field name -> raw value)."""
    args = dict(args or {})
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}

    path = config_path or environ.get("CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path:
        text = read_config_file(path)
        src = os.path.basename(path)
        budget = _Budget()
        for ykey, leaf in parse_yaml(text, src).items():
            opt = _BY_YAML[ykey]
            where = f"{src}:{leaf.line}: {ykey}"
            raw = _expand(leaf.value, environ, where, budget)
            try:
                values[opt.field] = _convert(opt, raw, from_text=False)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None

    for opt in OPTIONS:
        names = [opt.env_name] if opt.env_name else []
        names += list(ENV_ALIASES.get(opt.field, ()))
        for name in names:
            if name in environ:
                try:
                    v = _convert(opt, environ[name], from_text=True)
                except ValueError as e:
                    raise ConfigError(f"environment {name}: {e}") from None
                values[opt.field] = (not v) if opt.invert else v
                break

    for fname, raw in args.items():
        opt = OPTIONS_BY_FIELD[fname]
        try:
            v = _convert(opt, raw, from_text=True)
        except ValueError as e:
            raise ConfigError(f"flag {opt.flag}: {e}") from None
        values[fname] = (not v) if opt.invert else v

    for fname, v in values.items():
        opt = OPTIONS_BY_FIELD[fname]
        if opt.check:
            try:
                opt.check(v)
            except ValueError as e:
                raise ConfigError(f"{_describe(opt)}: {e}") from None
    _split_urls(values)
    cfg = Config(**values)
    if not cfg.api_socket and len(cfg.api_socket_path.encode()) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"storage.path / --storage-path: {cfg.api_socket_path} is longer than a unix socket path "
            f"may be ({MAX_SOCKET_PATH} bytes); set api_socket (--api-socket) to a shorter path")
    return cfg


def _describe(opt: Option) -> str:
    names = [n for n in (opt.yaml, opt.flag) if n]
    return " / ".join(names) or opt.field


# ------------------------------------------------------------ argparse -----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option as a flag. Unset flags stay absent from the namespace."""
    parser.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS,
        help=f"agent.yaml to read (env CONFIG; default {DEFAULT_CONFIG_PATH} when it exists)",
    )
    for opt in OPTIONS:
        if not opt.flag:
            continue
        flags = [opt.flag, *FLAG_ALIASES.get(opt.field, ())]
        env = f" [env {opt.env_name}]"
        if opt.kind == "bool":
            # A flag given at all means the word in its name: --disable-x, --clickhouse-tls.
            parser.add_argument(
                *flags, dest=opt.field, action="store_const", const="true",
                default=argparse.SUPPRESS, help=opt.help + env,
            )
        elif opt.kind in ("list", "cidrs", "regexes"):
            parser.add_argument(
                *flags, dest=opt.field, action="append", metavar="VALUE",
                default=argparse.SUPPRESS, help=opt.help + env,
            )
        else:
            parser.add_argument(
                *flags, dest=opt.field, metavar=opt.kind.upper(),
                default=argparse.SUPPRESS, help=f"{opt.help} (default {_show_default(opt)})" + env,
            )


def from_namespace(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    given = {o.field: getattr(ns, o.field) for o in OPTIONS if hasattr(ns, o.field)}
    # A `--disable-x` flag carries "true" meaning disabled; `load` inverts it.
    return load(given, environ, getattr(ns, "config", None))


def _show_default(opt: Option) -> str:
    d = opt.default
    if opt.kind == "duration":
        return units.format_duration(d)
    if opt.kind == "size":
        return f"{d // 1_000_000}MB" if d % 1_000_000 == 0 else str(d)
    if isinstance(d, tuple):
        return ",".join(d) if d and isinstance(d[0], str) else "none"
    if isinstance(d, bool):
        if opt.invert:
            return "enabled" if d else "disabled"
        return "true" if d else "false"
    return str(d) if d != "" else "unset"


def options_table() -> str:
    """The README's options table, generated from the declarations."""
    rows = ["| flag | env | agent.yaml key | default | meaning |", "|---|---|---|---|---|"]
    rows.append(f"| `--config` | `CONFIG` | | `{DEFAULT_CONFIG_PATH}` if present | the YAML file to read |")
    for opt in OPTIONS:
        flags = ", ".join(f"`{f}`" for f in [opt.flag, *FLAG_ALIASES.get(opt.field, ())] if f)
        envs = ", ".join(f"`{e}`" for e in [opt.env_name, *ENV_ALIASES.get(opt.field, ())] if e)
        ykey = f"`{opt.yaml}`" if opt.yaml else ""
        if opt.invert:
            ykey += " (flag/env disable it)"
        rows.append(f"| {flags} | {envs} | {ykey} | `{_show_default(opt)}` | {opt.help} |")
    return "\n".join(rows)


def option_names(opts: Sequence[Option] = OPTIONS) -> list[str]:
    return [o.field for o in opts]
