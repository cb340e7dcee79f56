"""deploy/kubernetes: every manifest is valid against the Kubernetes OpenAPI schemas, the
DaemonSet grants exactly the capabilities the agent says it needs, and each row of the seed's
hardening checklist is met by the manifests and the agent's defaults (one test per row)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent import caps, config

DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"
ENV = {"API_KEY": "k" * 32, "CLICKHOUSE_PASSWORD": "ch-secret", "PROMETHEUS_PASSWORD": "prom-secret"}


def docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out.append((path.name, doc))
    return out


def one(kind: str, file: str | None = None) -> dict[str, Any]:
    found = [d for f, d in docs() if d["kind"] == kind and (file is None or f == file)]
    assert len(found) == 1, (kind, file, len(found))
    return found[0]


def container(file: str = "daemonset.yaml") -> dict[str, Any]:
    return one("DaemonSet", file)["spec"]["template"]["spec"]["containers"][0]


def agent_config() -> config.Config:
    """The ConfigMap's agent.yaml as the agent loads it, with the Secret's values in the env."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(one("ConfigMap")["data"]["agent.yaml"])
        f.flush()
        return config.load({}, ENV, f.name)


@pytest.mark.parametrize("name,doc", docs(), ids=lambda v: v if isinstance(v, str) else v.get("kind", ""))
def test_manifest_is_schema_valid(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_the_capabilities_variant_and_not_the_privileged_one() -> None:
    resources = yaml.safe_load((DIR / "kustomization.yaml").read_text())["resources"]
    assert "daemonset.yaml" in resources and "daemonset-privileged.yaml" not in resources
    assert all((DIR / r).exists() for r in resources)


def test_daemonset_capabilities_are_the_agents_own_list() -> None:
    sc = container()["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["capabilities"]["add"] == [c.removeprefix("CAP_") for c in caps.REQUIRED_NAMES]
    text = (DIR / "daemonset.yaml").read_text()
    assert re.search(r"capabilities:begin.*\n.*add:.*\n.*capabilities:end", text)


def test_daemonset_mounts_and_host_pid() -> None:
    spec = one("DaemonSet", "daemonset.yaml")["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    for ro in ("/sys/kernel/tracing", "/host/sys/fs/cgroup", "/lib/modules", "/usr/src", "/var/log"):
        assert mounts[ro].get("readOnly") is True, ro
    # uprobes without CAP_SYS_ADMIN are defined through debugfs's tracing/uprobe_events (measured:
    # tests/system/test_least_privilege.py); that one mount is writable, and says why
    assert not mounts["/sys/kernel/debug"].get("readOnly")
    assert "uprobe_events" in (DIR / "daemonset.yaml").read_text()
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[mounts["/var/lib/coroot-agent"]["name"]]["hostPath"]["path"] == "/var/lib/coroot-agent"
    cfg = agent_config()
    assert cfg.cgroupfs_root == "/host/sys/fs/cgroup" and cfg.wal_dir.startswith("/var/lib/coroot-agent")


def test_the_two_variants_differ_only_in_privilege() -> None:
    a, b = one("DaemonSet", "daemonset.yaml"), one("DaemonSet", "daemonset-privileged.yaml")
    ca, cb = a["spec"]["template"]["spec"]["containers"][0], b["spec"]["template"]["spec"]["containers"][0]
    assert cb["securityContext"]["privileged"] is True and ca["securityContext"]["privileged"] is False
    for key in ("volumeMounts", "env", "resources", "args", "image"):
        assert ca[key] == cb[key], key


# ----------------------------------------------------- the seed's hardening checklist ---

def test_checklist_clickhouse_tls() -> None:
    cfg = agent_config()
    assert cfg.clickhouse_tls and not cfg.clickhouse_tls_skip_verify and cfg.clickhouse_address.endswith(":8443")


def test_checklist_clickhouse_auth_dedicated_least_privilege_user() -> None:
    cfg = agent_config()
    assert cfg.clickhouse_user not in ("default", "admin") and cfg.clickhouse_password == ENV["CLICKHOUSE_PASSWORD"]
    sql = (DIR.parent / "clickhouse" / "project.sql").read_text()
    grants = [ln for ln in sql.splitlines() if ln.startswith("GRANT")]
    assert grants and all("ON coroot_${PROJECT}.*" in g for g in grants)
    # DROP TABLE/VIEW on the project's database are the start-up migration's (test_deploy_clickhouse
    # derives the grant from its statements); nothing wider.
    assert not re.search(r"\b(ALL|DROP DATABASE|DROP USER|DROP ROLE|TRUNCATE|CREATE USER|ACCESS MANAGEMENT)\b",
                         " ".join(grants))


def test_checklist_agent_resources() -> None:
    res = container()["resources"]
    assert res == {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": "500m", "memory": "1Gi"}}


def test_checklist_data_retention_ttl_per_signal() -> None:
    raw = yaml.safe_load(one("ConfigMap")["data"]["agent.yaml"])["storage"]
    assert {"traces_ttl", "logs_ttl", "profiles_ttl", "metrics_ttl"} <= set(raw)
    cfg = agent_config()
    assert cfg.logs_ttl == 3 * 86400 and cfg.traces_ttl == 7 * 86400


def test_checklist_authentication_no_anonymous_api() -> None:
    cfg = agent_config()
    assert cfg.listen == "0.0.0.0:8080" and cfg.api_key == ENV["API_KEY"]  # /api/* needs X-Api-Key off-host


def test_checklist_api_key_isolation_per_project_secret() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "coroot-agent", "key": "api-key"}
    cfg = agent_config()
    assert cfg.clickhouse_database == "coroot_production" and cfg.clickhouse_user == "coroot_agent_production"


def test_checklist_network_policies_egress_only_to_clickhouse_prometheus_and_dns() -> None:
    np = one("NetworkPolicy")["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"]
    assert np["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "coroot-agent"}
    (ingress,) = np["ingress"]
    assert ingress["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "coroot"}}}]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
    targets = []
    for rule in np["egress"]:
        (peer,) = rule["to"]
        assert "ipBlock" not in peer  # no open-ended egress
        targets.append((peer["podSelector"]["matchLabels"], sorted((p["protocol"], p["port"]) for p in rule["ports"])))
    assert targets == [
        ({"app.kubernetes.io/name": "clickhouse"}, [("TCP", 8123), ("TCP", 8443)]),
        ({"app.kubernetes.io/name": "prometheus"}, [("TCP", 9090)]),
        ({"k8s-app": "kube-dns"}, [("TCP", 53), ("UDP", 53)]),
    ]


def test_checklist_privacy_masks_on_and_log_entries_switchable() -> None:
    cfg = agent_config()
    assert cfg.mask_url_query and cfg.mask_sql_literals and cfg.mask_redis_values
    defaults = config.load({}, {}, None)
    assert defaults.mask_url_query and defaults.mask_sql_literals and defaults.mask_redis_values
    assert "collectLogEntries" in one("ConfigMap")["data"]["agent.yaml"]  # the switch for PII nodes


def test_checklist_privileged_pods_only_where_needed() -> None:
    sc = container()["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
    assert "SYS_ADMIN" not in sc["capabilities"]["add"]
    assert "before 5.8" in (DIR / "daemonset-privileged.yaml").read_text().splitlines()[0]
    assert agent_config().drop_capabilities


def test_checklist_secrets_only_from_kubernetes_secrets() -> None:
    text = one("ConfigMap")["data"]["agent.yaml"]
    for key in ("api_key", "password"):
        for line in text.splitlines():
            if line.strip().startswith(f"{key}:"):
                assert "${" in line, line  # a reference, never a value
    env = container()["env"]
    assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in env)
    assert "ch-secret" not in (DIR / "configmap.yaml").read_text()
