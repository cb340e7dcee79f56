"""agent.yaml, flags and environment are untrusted input to a root process: a YAML bomb, a
binary file, a FIFO or a 10 MB value is refused quickly with exit 2 and a message naming the
problem; URLs keep no credentials, and no password reaches a log line, an error or redacted()."""

from __future__ import annotations

import base64
import grp
import http.server
import logging
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from agent import cli, config, units
from agent.sinks.remote_write import RemoteWriter
from agent.sinks.spool import Spool

ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/opt/coroot-agent/venv/bin/python"
SNIPPETS = sorted((Path(__file__).parent / "seed_snippets").glob("*.yaml"))


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": 9 levels of 9 aliases each is 9**9 (387 million) strings once expanded."""
    lines = ["container_allowlist:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, content: str | bytes, name: str = "agent.yaml") -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def run_cli(config_path: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh interpreter. Every config here is invalid, so `check`
    exits 2 before it looks at the host."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    return subprocess.run(
        [PYTHON, "-m", "agent", "check", "--no-probe", "--config", config_path, *extra],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=30,
    )


# ------------------------------------------------------------- the YAML bomb ---


def test_alias_bomb_is_refused_in_milliseconds_and_without_memory(tmp_path: Path) -> None:
    path = write(tmp_path, alias_bomb())
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(config.ConfigError) as e:
            config.load({}, {}, path)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(e.value) == "agent.yaml:2: YAML anchors (&a0) are not supported; write the value out"
    assert elapsed < 1.0, elapsed
    assert peak < 50 * 1024 * 1024, peak


def test_an_alias_is_refused_by_name_before_its_anchor_is_looked_up() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse_yaml("auth: {}\ncontainer_allowlist: *x\n")
    assert str(e.value) == "agent.yaml:2: YAML aliases (*x) are not supported; write the value out"


def test_alias_bomb_through_the_cli_exits_2_fast(tmp_path: Path) -> None:
    path = write(tmp_path, alias_bomb())
    t0 = time.perf_counter()
    r = run_cli(path)
    assert time.perf_counter() - t0 < 10  # an interpreter start; the bomb itself took > 60 s before
    assert r.returncode == 2
    assert r.stderr == "coroot-agent: config error: agent.yaml:2: YAML anchors (&a0) are not supported; write the value out\n"


# ----------------------------------------------------------- malformed files ---

MALFORMED: list[tuple[str, bytes, str]] = [
    ("binary", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)),
     "agent.yaml:1: a NUL byte at offset 7; this is a binary file, not YAML"),
    ("nul-later", b"listen: 127.0.0.1:1\napi_key: a\x00b\n",
     "agent.yaml:2: a NUL byte at offset 30; this is a binary file, not YAML"),
    ("bad-utf8", b"listen: 127.0.0.1:8080\napi_key: \xff\xfe\n",
     "agent.yaml:2: not UTF-8 text: byte 0xff at offset 32 (invalid start byte)"),
    ("truncated-utf8", b"api_key: caf\xc3",
     "agent.yaml:1: not UTF-8 text: byte 0xc3 at offset 12 (unexpected end of data)"),
    ("utf16", "listen: 127.0.0.1:1\n".encode("utf-16"),
     "agent.yaml:1: a NUL byte at offset 3; this is a binary file, not YAML"),
    ("python-object", b"listen: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
     "agent.yaml:1: the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not supported (only plain values)"),
    ("python-name", b"api_key: !!python/name:os.system\n",
     "agent.yaml:1: the YAML tag 'tag:yaml.org,2002:python/name:os.system' is not supported (only plain values)"),
    ("custom-tag", b"listen: !custom 127.0.0.1:1\n",
     "agent.yaml:1: the YAML tag '!custom' is not supported (only plain values)"),
    ("tag-directive", b"%TAG !p! tag:yaml.org,2002:python/\n---\nlisten: !p!object:os.system x\n",
     "agent.yaml:3: the YAML tag 'tag:yaml.org,2002:python/object:os.system' is not supported (only plain values)"),
    ("tagged-mapping", b"nodeAgent: !!python/object:agent.config.Config {}\n",
     "agent.yaml:1: the YAML tag 'tag:yaml.org,2002:python/object:agent.config.Config' is not supported (only plain values)"),
    ("binary-tag", b"api_key: !!binary aGVsbG8=\n",
     "agent.yaml:1: the YAML tag 'tag:yaml.org,2002:binary' is not supported (only plain values)"),
    ("merge-key", b"privacy:\n  mask_url_query: true\nnodeAgent:\n  <<: {l7_tracing: false}\n",
     "agent.yaml:4: YAML merge keys (<<) are not supported; write the keys out"),
    ("merge-key-flow", b'{"listen": "127.0.0.1:1", <<: {a: 1}}\n',
     "agent.yaml:1: YAML merge keys (<<) are not supported; write the keys out"),
    ("merge-tag", b"listen: !!merge x\n",
     "agent.yaml:1: the YAML tag 'tag:yaml.org,2002:merge' is not supported (only plain values)"),
    ("anchor-alias", b"listen: &l 127.0.0.1:1\napi_key: *l\n",
     "agent.yaml:1: YAML anchors (&l) are not supported; write the value out"),
    ("deep-flow", b"container_allowlist: " + b"[" * 20_000 + b"]" * 20_000 + b"\n",
     "agent.yaml:1: nested more than 32 levels deep"),
    ("deep-block", "".join(f"{' ' * i}k{i}:\n" for i in range(40)).encode(),
     "agent.yaml:33: nested more than 32 levels deep"),
    ("two-documents", b"listen: 127.0.0.1:1\n---\nlisten: 127.0.0.1:2\n",
     "agent.yaml:2: more than one YAML document (---); agent.yaml holds one"),
    ("too-many-values", b"auth: [" + b"1," * 50_001 + b"1]\n",
     "agent.yaml:1: more than 50000 values; this is not an agent configuration"),
    ("bad-int-tag", b"nodeAgent:\n  ebpfProfiler:\n    frequency: !!int abc\n",
     "agent.yaml:3: cannot read 'abc' as !!int (invalid literal for int() with base 10: 'abc')"),
    ("bad-bool-tag", b"l7_tracing: !!bool maybe\n", "agent.yaml:1: cannot read 'maybe' as !!bool"),
    ("bad-date", b"listen: 2024-13-45\n", "agent.yaml:1: cannot read '2024-13-45' as !!timestamp (month must be in 1..12)"),
    ("complex-key", b"? [a, b]\n: 1\n", "agent.yaml:1: keys must be strings"),
    ("header-injection", b'global_prometheus:\n  custom_headers:\n    X-A: "a\\r\\nX-Evil: 1"\n',
     "agent.yaml:2: global_prometheus.custom_headers: the value of 'X-A' holds a line break or control character, or is too long"),
    ("bad-header-name", b'global_prometheus:\n  custom_headers:\n    "X A": b\n',
     "agent.yaml:2: global_prometheus.custom_headers: 'X A' is not a valid HTTP header name"),
]


@pytest.mark.parametrize(("content", "message"), [(c, m) for _, c, m in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_file_is_a_config_error_naming_the_problem(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {}, write(tmp_path, content))
    assert str(e.value) == message


@pytest.mark.parametrize(("content", "message"), [(c, m) for _, c, m in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_file_through_the_cli_exits_2_without_a_traceback(tmp_path: Path, content: bytes, message: str) -> None:
    r = run_cli(write(tmp_path, content))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr == f"coroot-agent: config error: {message}\n"


def test_python_tag_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"listen: !!python/object/apply:os.system ['touch {marker}']\n")
    assert run_cli(path).returncode == 2
    assert not marker.exists()


def _nested(depth: int) -> str:
    """`auth:` (an ignored subtree) holding lists nested so that the document is `depth` deep."""
    return "auth: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


def test_nesting_up_to_the_limit_loads_and_one_more_is_refused() -> None:
    assert config.parse_yaml(_nested(config.MAX_YAML_DEPTH)) == {}
    with pytest.raises(config.ConfigError, match=r"^agent\.yaml:1: nested more than 32 levels deep$"):
        config.parse_yaml(_nested(config.MAX_YAML_DEPTH + 1))


def test_quoted_merge_key_is_an_ordinary_unknown_key() -> None:
    with pytest.raises(config.ConfigError, match=r"^agent\.yaml:1: unknown key '<<'$"):
        config.parse_yaml('"<<": 1\n')


def test_size_cap_exactly_at_the_limit_loads_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    head = "listen: 127.0.0.1:9999\n# "
    at_limit = head + "x" * (config.MAX_CONFIG_BYTES - len(head) - 1) + "\n"
    assert len(at_limit.encode()) == config.MAX_CONFIG_BYTES
    assert config.load({}, {}, write(tmp_path, at_limit)).listen == "127.0.0.1:9999"
    path = write(tmp_path, at_limit + "#")
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {}, path)
    assert str(e.value) == f"config file {path} is 1048577 bytes; the limit is 1048576 bytes (1 MiB)"


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    assert config.load({}, {}, write(tmp_path, b"\xef\xbb\xbflisten: 127.0.0.1:7\n")).listen == "127.0.0.1:7"


def test_env_expansion_cannot_inflate_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "auth:\n  x: 1\nexclude_http_requests_by_path: [" + ", ".join(["'${A}'"] * 20) + "]\n")
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {"A": "y" * 60_000}, path)
    assert str(e.value) == ("agent.yaml:3: exclude_http_requests_by_path: ${VAR} references expand to more than "
                            "1048576 characters")
    # Within the budget it works: 10 references of 60,000 characters.
    path = write(tmp_path, "exclude_http_requests_by_path: [" + ", ".join(["'${A}'"] * 10) + "]\n")
    assert config.load({}, {"A": "y" * 60_000}, path).exclude_http_requests_by_path == ("y" * 60_000,) * 10


# -------------------------------------------------------------- file kinds ---


def _load_in_thread(path: str) -> BaseException | None:
    """load() in a daemon thread: a FIFO that blocked the open would hang it, not the test run."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            config.load({}, {}, path)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(5)
    assert result, "load() blocked on the config file"
    return result[0]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.yaml"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    err = _load_in_thread(str(fifo))
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(err, config.ConfigError)
    assert str(err) == f"config file {fifo} is a FIFO (named pipe); it must be a regular file"


def test_a_symlink_to_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "agent.yaml"
    link.symlink_to(fifo)
    err = _load_in_thread(str(link))
    assert str(err) == f"config file {link} is a FIFO (named pipe); it must be a regular file"


def test_a_directory_a_device_and_a_socket_are_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=rf"^config file {tmp_path} is a directory; it must be a regular file$"):
        config.load({}, {}, str(tmp_path))
    with pytest.raises(config.ConfigError, match=r"^config file /dev/zero is a device; it must be a regular file$"):
        config.load({}, {}, "/dev/zero")
    sock_path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(sock_path)
        with pytest.raises(config.ConfigError, match=r"is a socket; it must be a regular file$"):
            config.load({}, {}, sock_path)


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_file_kinds_through_the_cli_exit_2(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        path, what = str(tmp_path), "a directory"
    elif kind == "fifo":
        path, what = str(tmp_path / "agent.yaml"), "a FIFO (named pipe)"
        os.mkfifo(path)
    else:
        path, what = "/dev/zero", "a device"
    r = run_cli(path)
    assert r.returncode == 2
    assert r.stderr == f"coroot-agent: config error: config file {path} is {what}; it must be a regular file\n"


def test_an_unreadable_file_exits_2_for_a_user_who_cannot_read_it() -> None:
    """Run as nobody: root reads any file, so only another user shows the refusal."""
    d = tempfile.mkdtemp(prefix="cfg-unreadable-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "agent.yaml")
        Path(path).write_text("listen: 127.0.0.1:1\n")
        os.chmod(path, 0o000)
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             PYTHON, "-m", "agent", "check", "--no-probe", "--config", path],
            cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30,
        )
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"coroot-agent: config error: cannot read config file {path}: Permission denied\n"


# ------------------------------------------------------------ value bounds ---


def test_a_10_mb_value_is_refused_from_a_flag_and_from_the_environment() -> None:
    huge = "a" * 10_000_000
    with pytest.raises(config.ConfigError) as e:
        config.load({"container_allowlist": [huge]}, {}, None)
    assert str(e.value) == "flag --container-allowlist: the value is 10000000 characters long; the limit is 65536"
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {"CONTAINER_ALLOWLIST": huge}, None)
    assert str(e.value) == "environment CONTAINER_ALLOWLIST: the value is 10000000 characters long; the limit is 65536"
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {"API_KEY": huge}, None)
    assert str(e.value) == "environment API_KEY: the value is 10000000 characters long; the limit is 65536"


def test_regex_lists_are_capped_in_length_and_count(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load({"container_denylist": ["x" * 5000]}, {}, None)
    assert str(e.value) == "flag --container-denylist: a regular expression is 5000 characters long; the limit is 4096"
    many = ",".join(f"^/c{i}$" for i in range(1025))
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {"CONTAINER_ALLOWLIST": many}, None)
    assert str(e.value) == "environment CONTAINER_ALLOWLIST: 1025 items; the limit is 1024"
    path = write(tmp_path, "container_allowlist:\n" + "".join(f"  - '^/c{i}$'\n" for i in range(1024)))
    assert len(config.load({}, {}, path).container_allowlist) == 1024


def test_the_longest_allowed_regexes_compile_quickly() -> None:
    nasty = "(a*)*" * (config.MAX_REGEX_LENGTH // 5)  # 4095 characters of nested repetition
    t0 = time.perf_counter()
    cfg = config.load({"container_allowlist": [nasty] * 50}, {}, None)
    assert time.perf_counter() - t0 < 2.0
    assert cfg.container_allowlist == (nasty,) * 50
    with pytest.raises(config.ConfigError) as e:
        config.load({"container_allowlist": ["(" * 4000]}, {}, None)
    assert str(e.value) == ("flag --container-allowlist: regular expression '" + "(" * 99 + "... (4002 characters) "
                            "is nested or repeated too deeply to compile")
    with pytest.raises(config.ConfigError) as e:
        config.load({"container_allowlist": ["(" * 50]}, {}, None)
    assert str(e.value) == ("flag --container-allowlist: bad regular expression '" + "(" * 50 + "': "
                            "missing ), unterminated subpattern at position 49")


# -------------------------------------------------------------- seed files ---


@pytest.mark.parametrize("path", [*SNIPPETS, ROOT / "agent.yaml"], ids=lambda p: p.name)
def test_seed_snippets_and_the_example_still_load(path: Path) -> None:
    env = {"CLICKHOUSE_PASSWORD": "ch-secret", "PROM_PASSWORD": "prom-secret", "COROOT_API_KEY": "k"}
    config.load({}, env, str(path))


def test_no_seed_snippet_uses_anchors_aliases_or_tags() -> None:
    for path in SNIPPETS:
        assert not re.search(r"(^|\s)[&*!][A-Za-z]|<<", path.read_text()), path.name


# -------------------------------------------------------------- new options ---


def test_api_socket_options() -> None:
    cfg = config.load({}, {}, None)
    assert (cfg.api_socket, cfg.api_socket_group) == ("", "")
    assert cfg.api_socket_path == "/var/lib/coroot-agent/api.sock"
    assert config.load({"storage_path": "/srv/a"}, {}, None).api_socket_path == "/srv/a/api.sock"
    cfg = config.load({"api_socket": "/run/coroot.sock"}, {}, None)
    assert cfg.api_socket_path == "/run/coroot.sock"
    assert config.load({}, {"API_SOCKET": "/run/x.sock"}, None).api_socket == "/run/x.sock"
    root_group = grp.getgrgid(0).gr_name
    assert config.load({"api_socket_group": root_group}, {}, None).api_socket_group == root_group
    assert config.load({"api_socket_group": "0"}, {}, None).api_socket_group == "0"


def test_api_socket_group_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, "api_socket_group: no-such-group-here\n")
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {}, path)
    assert str(e.value) == "api_socket_group / --api-socket-group: no such group 'no-such-group-here' on this host"
    with pytest.raises(config.ConfigError, match=r"^api_socket_group / --api-socket-group: no such group '4242424'"):
        config.load({}, {"API_SOCKET_GROUP": "4242424"}, None)


def test_api_socket_path_must_be_absolute_and_short_enough() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load({"api_socket": "api.sock"}, {}, None)
    assert str(e.value) == "api_socket / --api-socket: must be an absolute path, got 'api.sock'"
    with pytest.raises(config.ConfigError) as e:
        config.load({"api_socket": "/" + "s" * 107}, {}, None)
    assert str(e.value) == "api_socket / --api-socket: a unix socket path holds at most 107 bytes, got 108"
    long_storage = "/" + "d" * 100
    with pytest.raises(config.ConfigError, match=r"^storage\.path / --storage-path: .* set api_socket \(--api-socket\)"):
        config.load({"storage_path": long_storage}, {}, None)
    assert config.load({"storage_path": long_storage, "api_socket": "/run/a.sock"}, {}, None).api_socket == "/run/a.sock"


PRIVACY = [
    ("mask_url_path", "privacy.mask_url_path", "--disable-url-path-masking", True),
    ("log_mask_emails", "privacy.logs.emails", "--disable-log-email-masking", True),
    ("log_mask_cards", "privacy.logs.cards", "--disable-log-card-masking", True),
    ("log_mask_tokens", "privacy.logs.tokens", "--disable-log-token-masking", True),
    ("log_mask_secrets", "privacy.logs.secrets", "--disable-log-secret-masking", True),
    ("log_mask_headers", "privacy.logs.headers", "--disable-log-header-masking", True),
    ("log_mask_cloud_keys", "privacy.logs.cloud_keys", "--disable-log-cloud-key-masking", True),
    ("log_mask_ipv4", "privacy.logs.ipv4", "--enable-log-ipv4-masking", False),
]


@pytest.mark.parametrize(("field", "ykey", "flag", "default"), PRIVACY, ids=[p[0] for p in PRIVACY])
def test_privacy_switches(tmp_path: Path, field: str, ykey: str, flag: str, default: bool) -> None:
    opt = config.OPTIONS_BY_FIELD[field]
    assert (opt.yaml, opt.flag, opt.default, opt.invert) == (ykey, flag, default, default)
    assert getattr(config.load({}, {}, None), field) is default
    # YAML: the key says what it is.
    *sections, leaf = ykey.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {str(not default).lower()}\n"
    path = write(tmp_path, text)
    assert getattr(config.load({}, {}, path), field) is (not default)
    # The flag (and its environment twin) flips the default, whatever YAML said.
    ns = cli._parser().parse_args(["run", flag])
    assert getattr(config.from_namespace(ns, {}), field) is (not default)
    env_name = flag.lstrip("-").upper().replace("-", "_")
    assert getattr(config.load({}, {env_name: "true"}, None), field) is (not default)
    assert getattr(config.load({}, {env_name: "false"}, None), field) is default


def test_privacy_logs_section_rejects_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {}, write(tmp_path, "privacy:\n  logs:\n    email: false\n"))
    assert str(e.value) == "agent.yaml:3: unknown key 'privacy.logs.email' (did you mean 'privacy.logs.emails'?)"


# ------------------------------------------------------- URL credentials ---

PROM = "global_prometheus.remote_write_url / --metrics-endpoint"


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://u:hunter2secret@prom:21/w", f"{PROM}: only http:// and https:// URLs are accepted, got 'ftp://<redacted>@prom:21/w'"),
    ("file:///etc/shadow", f"{PROM}: only http:// and https:// URLs are accepted, got 'file:///etc/shadow'"),
    ("prom:9090/api/v1/write", f"{PROM}: only http:// and https:// URLs are accepted, got 'prom:9090/api/v1/write'"),
    ("http://u:hunter2/secret@prom/w", f"{PROM}: an '@' after the host in 'http://<redacted>@prom/w': if it belongs to a "
     "user or password, percent-encode it ('@' as %40, '/' as %2F, '?' as %3F, '#' as %23)"),
    ("http://prom:99999/w", f"{PROM}: expected a URL like https://host:port/path, got 'http://prom:99999/w'"),
    ("http:///w", f"{PROM}: the URL has no host, got 'http:///w'"),
    ("http://pr om/w", f"{PROM}: a URL cannot contain spaces or control characters, got 'http://pr om/w'"),
])
def test_remote_write_url_must_be_http_and_errors_never_show_the_password(url: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load({"metrics_endpoint": url}, {}, None)
    assert str(e.value) == message
    assert "hunter2" not in str(e.value)


def test_userinfo_in_the_remote_write_url_becomes_basic_auth(tmp_path: Path) -> None:
    path = write(tmp_path, "global_prometheus:\n  remote_write_url: https://writer:p%40ss%2Fw0rd@prom:9090/api/v1/write?x=1\n")
    cfg = config.load({}, {}, path)
    assert cfg.metrics_endpoint == "https://prom:9090/api/v1/write?x=1"
    assert (cfg.prometheus_user, cfg.prometheus_password) == ("writer", "p@ss/w0rd")
    red = cfg.redacted()
    assert red["metrics_endpoint"] == "https://prom:9090/api/v1/write?x=1"
    assert red["prometheus_password"] == "<set>" and red["prometheus_user"] == "writer"
    assert "p@ss" not in repr(red) and "p%40ss" not in repr(red)


def test_userinfo_and_a_configured_user_or_password_is_refused() -> None:
    url = "http://u:hunter2secret@prom/w"
    expected = (f"{PROM}: the URL carries a user and password, and global_prometheus.user / password "
                "(--prometheus-user, --prometheus-password) are set too; use one of the two")
    for extra in ({"prometheus_user": "x"}, {"prometheus_password": "y"}):
        with pytest.raises(config.ConfigError) as e:
            config.load({"metrics_endpoint": url, **extra}, {}, None)
        assert str(e.value) == expected


def test_prometheus_url_gets_the_same_checks(tmp_path: Path) -> None:
    def _yaml_file(text: str) -> str:
        return write(tmp_path, text)

    with pytest.raises(config.ConfigError) as e:
        config.load({}, {}, _yaml_file("global_prometheus:\n  url: gopher://u:hunter2secret@prom/\n"))
    assert str(e.value) == "global_prometheus.url: only http:// and https:// URLs are accepted, got 'gopher://<redacted>@prom/'"
    cfg = config.load({}, {}, _yaml_file("global_prometheus:\n  url: https://reader:hunter2secret@prom:9090\n"))
    assert cfg.prometheus_url == "https://prom:9090"
    assert (cfg.prometheus_user, cfg.prometheus_password) == ("reader", "hunter2secret")
    # The same credentials in both URLs are one setting; different ones are a contradiction.
    same = "global_prometheus:\n  url: https://a:b@prom:9090\n  remote_write_url: https://a:b@prom:9090/api/v1/write\n"
    assert config.load({}, {}, _yaml_file(same)).prometheus_password == "b"
    diff = "global_prometheus:\n  url: https://a:b@prom:9090\n  remote_write_url: https://a:hunter2secret@prom:9090/w\n"
    with pytest.raises(config.ConfigError) as e:
        config.load({}, {}, _yaml_file(diff))
    assert str(e.value) == ("global_prometheus.url: the URL carries a user and password different from those in "
                            f"{PROM}; set global_prometheus.user and password once")


@pytest.mark.parametrize(("address", "expected"), [
    ("ch:hunter2secret@clickhouse:8123", "clickhouse:8123"),
    ("https://ch:hunter2secret@clickhouse:8443", "https://clickhouse:8443"),
    ("http://ch:hunter2secret@[fd00::1]:8123/", "http://[fd00::1]:8123/"),
])
def test_userinfo_in_the_clickhouse_address_becomes_user_and_password(address: str, expected: str) -> None:
    from agent.sinks.store import parse_address

    cfg = config.load({"clickhouse_address": address}, {}, None)
    assert cfg.clickhouse_address == expected
    assert (cfg.clickhouse_user, cfg.clickhouse_password) == ("ch", "hunter2secret")
    assert "hunter2secret" not in repr(cfg.redacted())
    parse_address(cfg.clickhouse_address, cfg.clickhouse_tls)  # the store accepts what is left


def test_clickhouse_address_checks() -> None:
    where = "global_clickhouse.address / --clickhouse-address"
    with pytest.raises(config.ConfigError) as e:
        config.load({"clickhouse_address": "ftp://ch:hunter2secret@clickhouse:21"}, {}, None)
    assert str(e.value) == f"{where}: only http:// and https:// URLs are accepted, got 'ftp://<redacted>@clickhouse:21'"
    with pytest.raises(config.ConfigError) as e:
        config.load({"clickhouse_address": "ch:hunter2secret@clickhouse:8123", "clickhouse_user": "other"}, {}, None)
    assert str(e.value) == (f"{where}: the address carries a user and password, and global_clickhouse.user / password "
                            "(--clickhouse-user, --clickhouse-password) are set too; use one of the two")
    plain = config.load({"clickhouse_address": "clickhouse:8123"}, {}, None)
    assert (plain.clickhouse_address, plain.clickhouse_user, plain.clickhouse_password) == ("clickhouse:8123", "default", "")


def test_redacted_has_no_secret_even_for_a_hand_built_config() -> None:
    cfg = config.Config(
        api_key="key-hunter2secret", metrics_endpoint="https://u:hunter2secret@prom/w",
        prometheus_url="http://u:hunter2secret@prom", clickhouse_address="u:hunter2secret@ch:8123",
        prometheus_password="hunter2secret", clickhouse_password="hunter2secret",
        prometheus_custom_headers=(("Authorization", "Bearer hunter2secret"), ("X-Scope-OrgID", "tenant-1")),
    )
    red = cfg.redacted()
    assert "hunter2secret" not in repr(red)
    assert red["metrics_endpoint"] == "https://<redacted>@prom/w"
    assert red["clickhouse_address"] == "<redacted>@ch:8123"
    assert red["prometheus_custom_headers"] == (("Authorization", "<set>"), ("X-Scope-OrgID", "tenant-1"))


def test_cli_refuses_ftp_and_userinfo_conflicts_without_echoing_the_password() -> None:
    r = subprocess.run(
        [PYTHON, "-m", "agent", "check", "--no-probe", "--metrics-endpoint", "ftp://u:hunter2secret@prom/w"],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "CONFIG": ""}, capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr == (f"coroot-agent: config error: {PROM}: only http:// and https:// URLs are accepted, "
                        "got 'ftp://<redacted>@prom/w'\n")
    r = subprocess.run(
        [PYTHON, "-m", "agent", "check", "--no-probe", "--remote-write-url", "http://u:hunter2secret@prom/w",
         "--prometheus-user", "x"],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "CONFIG": ""}, capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert "use one of the two" in r.stderr and "hunter2secret" not in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------- remote_write ---


class _Recorder(http.server.BaseHTTPRequestHandler):
    status = 204
    body = b""
    seen: list[tuple[str, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append((self.path, dict(self.headers)))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[type[_Recorder], int]]:
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield handler, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _writer(url: str, tmp_path: Path, **kw: object) -> RemoteWriter:
    reg = CollectorRegistry()
    Gauge("hardening_test", "a gauge", registry=reg).set(3)
    return RemoteWriter(url, reg, Spool(str(tmp_path / "spool"), 10_000_000), backoff=(0.0, 0.0),
                        instance="node-1", timeout=2.0, **kw)  # type: ignore[arg-type]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_remote_writer_refuses_other_schemes(tmp_path: Path) -> None:
    for url in ("ftp://u:hunter2secret@prom/w", "file:///etc/shadow", "prom:9090/w"):
        with pytest.raises(ValueError, match=r"^only http:// and https:// URLs are accepted") as e:
            _writer(url, tmp_path)
        assert "hunter2secret" not in str(e.value)
    with pytest.raises(ValueError, match="use one of the two") as e:
        _writer("http://u:hunter2secret@prom/w", tmp_path, user="other")
    assert "hunter2secret" not in str(e.value)


def test_userinfo_becomes_the_authorization_header_on_the_wire(
    tmp_path: Path, recorder: tuple[type[_Recorder], int],
) -> None:
    handler, port = recorder
    w = _writer(f"http://writer:p%40ss%20w0rd@127.0.0.1:{port}/api/v1/write", tmp_path)
    assert w.url == f"http://127.0.0.1:{port}/api/v1/write"
    assert w.scrape(ts_ms=1) == 1
    w.send_pending()
    assert w.stats.sent == 1
    (path, headers), = handler.seen
    assert path == "/api/v1/write"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"writer:p@ss w0rd").decode()
    assert headers["Authorization"] == "Basic d3JpdGVyOnBAc3MgdzByZA=="
    assert headers["Host"] == f"127.0.0.1:{port}"


def test_no_password_in_the_log_after_a_failed_send_to_a_closed_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    port = _closed_port()
    caplog.set_level(logging.DEBUG, logger="agent.sinks.remote_write")
    w = _writer(f"http://writer:hunter2secret@127.0.0.1:{port}/api/v1/write", tmp_path)
    w.scrape(ts_ms=1)
    w.send_pending()
    assert w.stats.failed == 1 and w.stats.sent == 0
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        f"remote_write to http://127.0.0.1:{port}/api/v1/write: [Errno 111] Connection refused; retrying")
    token = base64.b64encode(b"writer:hunter2secret").decode()
    for text in (caplog.text, w.stats.last_error, w.url, repr(vars(w).get("url"))):
        assert "hunter2secret" not in text and token not in text


def test_an_endpoint_that_echoes_the_credentials_is_redacted_in_the_log(
    tmp_path: Path, recorder: tuple[type[_Recorder], int], caplog: pytest.LogCaptureFixture,
) -> None:
    handler, port = recorder
    token = base64.b64encode(b"writer:hunter2secret").decode()
    handler.status = 500
    handler.body = f"bad auth Basic {token} for writer:hunter2secret at http://writer:hunter2secret@x/".encode()
    caplog.set_level(logging.DEBUG, logger="agent.sinks.remote_write")
    w = _writer(f"http://writer:hunter2secret@127.0.0.1:{port}/w", tmp_path)
    w.scrape(ts_ms=1)
    w.send_pending()
    assert caplog.records[0].getMessage() == (
        f"remote_write to http://127.0.0.1:{port}/w: 500 Internal Server Error bad auth Basic <redacted> for "
        "writer:<redacted> at http://<redacted>@x/; retrying")
    assert "hunter2secret" not in caplog.text and token not in caplog.text


def test_redact_text_keeps_short_secrets_from_garbling_messages() -> None:
    assert units.redact_text("keep key k here", ["k"]) == "keep key <redacted> here"
    assert units.redact_text("user:pw@host said pw", ["pw"]) == "user:<redacted>@host said <redacted>"



def test_api_key_help_says_every_tcp_client_needs_it() -> None:
    help_text = config.OPTIONS_BY_FIELD["api_key"].help
    assert "every client, loopback included" in help_text
    assert "non-loopback" not in help_text
    assert "non-loopback" not in (ROOT / "agent.yaml").read_text()
