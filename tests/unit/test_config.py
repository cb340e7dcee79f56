"""Configuration: precedence, ${VAR} expansion, typed validation, errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import cli, config

SNIPPETS = sorted((Path(__file__).parent / "seed_snippets").glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_match_coroot() -> None:
    cfg = config.load({}, {}, None)
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.traces_sampling == 1.0
    assert cfg.min_container_age == 30.0
    assert cfg.scrape_interval == 15.0
    assert cfg.max_spool_size == 500_000_000
    assert cfg.track_public_networks == ("0.0.0.0/0",)
    assert cfg.ephemeral_port_range == "32768-60999"
    assert cfg.traces_ttl == cfg.logs_ttl == cfg.profiles_ttl == 7 * 86400
    assert cfg.profiling_frequency == 99
    assert cfg.embedded_store


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_every_seed_snippet_loads_unchanged(path: Path) -> None:
    env = {"CLICKHOUSE_PASSWORD": "ch-secret", "PROM_PASSWORD": "prom-secret"}
    config.load({}, env, str(path))


def test_seed_snippets_give_their_values() -> None:
    env = {"CLICKHOUSE_PASSWORD": "ch-secret", "PROM_PASSWORD": "prom-secret"}
    by_name = {p.name: p for p in SNIPPETS}
    ch = config.load({}, env, str(by_name["03_global_clickhouse.yaml"]))
    assert (ch.clickhouse_address, ch.clickhouse_user, ch.clickhouse_password) == (
        "clickhouse.coroot.svc:9000", "coroot", "ch-secret")
    assert ch.clickhouse_database == "coroot" and ch.clickhouse_tls and not ch.clickhouse_tls_skip_verify
    na = config.load({}, env, str(by_name["02_node_agent.yaml"]))
    assert na.traces_sampling == 1.0 and na.tracer_enabled and na.profiler_enabled
    assert na.log_metrics_enabled and na.log_entries_enabled
    prom = config.load({}, env, str(by_name["06_global_prometheus.yaml"]))
    assert prom.prometheus_password == "prom-secret"
    assert prom.prometheus_custom_headers == (("X-Custom-Header", "value"),)
    assert prom.prometheus_refresh_interval == 15.0


def test_precedence_flag_over_env_over_yaml_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1111\nscrape_interval: 20s\nmin_container_age: 5s\n")
    env = {"LISTEN": "127.0.0.1:2222", "SCRAPE_INTERVAL": "25s"}
    cfg = config.load({"listen": "127.0.0.1:3333"}, env, path)
    assert cfg.listen == "127.0.0.1:3333"  # flag
    assert cfg.scrape_interval == 25.0  # env over yaml
    assert cfg.min_container_age == 5.0  # yaml over default
    assert cfg.wal_dir == "/var/lib/coroot-agent/wal"  # default


def test_disable_flag_and_env_override_yaml_enabled(tmp_path: Path) -> None:
    path = write(tmp_path, "nodeAgent:\n  ebpfProfiler:\n    enabled: true\n")
    assert config.load({}, {}, path).profiler_enabled
    assert not config.load({}, {"DISABLE_PROFILING": "true"}, path).profiler_enabled
    assert not config.load({"profiler_enabled": "true"}, {}, path).profiler_enabled  # --disable-profiling
    assert config.load({}, {"DISABLE_PROFILING": "false"}, path).profiler_enabled


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:4444\n")
    assert config.load({}, {"CONFIG": path}, None).listen == "127.0.0.1:4444"


def test_remote_write_url_is_an_alias_of_metrics_endpoint() -> None:
    ns = cli._parser().parse_args(["run", "--remote-write-url", "http://p:9090/api/v1/write"])
    assert config.from_namespace(ns, {}).metrics_endpoint == "http://p:9090/api/v1/write"
    assert config.load({}, {"REMOTE_WRITE_URL": "http://x/w"}, None).metrics_endpoint == "http://x/w"


def test_repeatable_and_comma_separated_lists() -> None:
    ns = cli._parser().parse_args(
        ["run", "--track-public-network", "10.0.0.0/8,8.8.8.0/24", "--track-public-network", "1.1.1.1/32"])
    assert config.from_namespace(ns, {}).track_public_networks == ("10.0.0.0/8", "8.8.8.0/24", "1.1.1.1/32")
    env = {"CONTAINER_DENYLIST": "^/system.slice/a.*,^/k8s/kube-system/"}
    assert config.load({}, env, None).container_denylist == ("^/system.slice/a.*", "^/k8s/kube-system/")


def test_var_expansion_in_yaml_strings(tmp_path: Path) -> None:
    path = write(tmp_path, "api_key: ${KEY}\nglobal_clickhouse:\n  address: ${CH_HOST}:8123\n")
    cfg = config.load({}, {"KEY": "k-123", "CH_HOST": "ch.local"}, path)
    assert cfg.api_key == "k-123" and cfg.clickhouse_address == "ch.local:8123"


def test_secrets_are_masked_in_redacted_view(tmp_path: Path) -> None:
    cfg = config.load({"api_key": "top-secret", "clickhouse_password": "pw"}, {}, None)
    red = cfg.redacted()
    assert red["api_key"] == "<set>" and red["clickhouse_password"] == "<set>"
    assert "top-secret" not in repr(red)


# ------------------------------------------------------------------ errors ---


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.delenv("CONFIG", raising=False)
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("listen: 127.0.0.1:8080\nnodeAgent:\n  ebpfTracr:\n    enabled: true\n",
         r"agent\.yaml:3: unknown key 'nodeAgent\.ebpfTracr' \(did you mean 'nodeAgent\.ebpfTracer\.enabled'\?\)"),
        ("nodeAgent:\n  ebpfTracer:\n    sampling: lots\n",
         r"agent\.yaml:3: nodeAgent\.ebpfTracer\.sampling: expected a number, got 'lots'"),
        ("nodeAgent:\n  ebpfTracer:\n    sampling: 1.5\n",
         r"nodeAgent\.ebpfTracer\.sampling / --traces-sampling: must be between 0 and 1, got 1\.5"),
        ("nodeAgent:\n  ebpfProfiler:\n    enabled: maybe\n",
         r"agent\.yaml:3: nodeAgent\.ebpfProfiler\.enabled: expected true or false, got 'maybe'"),
        ("global_clickhouse:\n  password: ${SURELY_UNSET_VAR}\n",
         r"agent\.yaml:2: global_clickhouse\.password: environment variable SURELY_UNSET_VAR is not set"),
        ("storage:\n  traces_ttl: 7 days\n",
         r"agent\.yaml:2: storage\.traces_ttl: expected a duration like 30s, 36h or 7d, got '7 days'"),
        ("listen: 8080\n", r"agent\.yaml:1: listen: expected host:port like 127\.0\.0\.1:8080, got '8080'"),
        ("listen: a\nlisten: b\n", r"agent\.yaml:2: duplicate key 'listen'"),
        ("nodeAgent: [1, 2]\n", r"agent\.yaml:1: 'nodeAgent' must be a mapping"),
        ("listen: [unclosed\n", r"agent\.yaml: not valid YAML"),
        ("nodeAgent:\n  trackPublicNetworks: [\"10.0.0.0/33\"]\n",
         r"expected a network prefix like 10\.0\.0\.0/8, got '10\.0\.0\.0/33'"),
        ("nodeAgent:\n  ebpfTracer:\n    payloadSize: 1000\n",
         r"nodeAgent\.ebpfTracer\.payloadSize / --l7-payload-size: must be a power of two between 64 and 4096, got 1000"),
        ("privacy:\n  mask_sql_literals: sometimes\n",
         r"agent\.yaml:2: privacy\.mask_sql_literals: expected true or false, got 'sometimes'"),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "bad-bool", "unset-var", "bad-duration",
         "bad-listen", "duplicate", "not-a-mapping", "bad-yaml", "bad-cidr", "payload-not-power-of-two",
         "bad-mask-switch"],
)
def test_bad_yaml_exits_2_naming_the_key(
    tmp_path: Path, yaml_text: str, expected: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SURELY_UNSET_VAR", raising=False)
    code, err = run_cli(["check", "--no-probe", "--config", write(tmp_path, yaml_text)], capsys, monkeypatch)
    assert code == 2
    assert re.search(expected, err), err


def test_bad_flag_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_cli(["run", "--min-container-age", "soon"], capsys, monkeypatch)
    assert code == 2
    assert "flag --min-container-age: expected a duration like 30s, 36h or 7d, got 'soon'" in err


def test_bad_env_value_exits_2_naming_the_variable(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILING_FREQUENCY", "fast")
    code, err = run_cli(["check", "--no-probe"], capsys, monkeypatch)
    assert code == 2
    assert "environment PROFILING_FREQUENCY: expected a whole number, got 'fast'" in err


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_cli(["check", "--no-probe", "--config", "/nonexistent/agent.yaml"], capsys, monkeypatch)
    assert code == 2
    assert "cannot read config file /nonexistent/agent.yaml: No such file or directory" in err


def test_example_agent_yaml_loads() -> None:
    env = {"COROOT_API_KEY": "k", "CLICKHOUSE_PASSWORD": "c", "PROM_PASSWORD": "p"}
    cfg = config.load({}, env, str(ROOT / "agent.yaml"))
    assert cfg.api_key == "k"


def test_example_agent_yaml_names_every_yaml_key() -> None:
    text = (ROOT / "agent.yaml").read_text()
    for opt in config.OPTIONS:
        if opt.yaml:
            leaf = opt.yaml.split(".")[-1]
            assert re.search(rf"^\s*#?\s*{re.escape(leaf)}:", text, re.M), f"agent.yaml lacks {opt.yaml}"


def test_readme_options_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config.options_table() in readme, "regenerate it with: python scripts/options_table.py --write"


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["check", "--help"], ["query", "--help"], ["flamegraph", "--help"]])
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(command)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: coroot-agent" in out
    if command[0] != "--help":
        assert "--min-container-age" in out and "[env MIN_CONTAINER_AGE]" in out


def test_flamegraph_bad_since_exits_2_naming_the_option(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_cli(["flamegraph", "--since", "a while"], capsys, monkeypatch)
    assert code == 2
    assert err.strip() == "coroot-agent flamegraph: --since: expected a duration like 30s, 36h or 7d, got 'a while'"


def test_query_refuses_writes_before_touching_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_cli(["query", "--storage-path", str(tmp_path / "none"), "DELETE FROM otel_logs WHERE 1"],
                        capsys, monkeypatch)
    assert code == 2
    assert "refused DELETE" in err
    assert not (tmp_path / "none").exists()
