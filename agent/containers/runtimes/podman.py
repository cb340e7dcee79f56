"""Podman: its libpod REST API (GET /v4.0.0/libpod/containers/<id>/json) on the service socket
(`podman system service`, or the podman.socket unit).

Ids are `/podman/<name>` (the form of the node agent's Podman support, proposed upstream as
coroot-node-agent pull request 251 and not in its releases), or the Kubernetes/Nomad forms when
labels or variables say so. A pod's infra container is its sandbox. Podman's `k8s-file`
log driver (and `json-file`, an alias of it in Podman) writes the CRI line format, not
Docker's JSON.
"""

from __future__ import annotations

import time

from agent.containers.runtimes import (
    LOG_CRI,
    LOG_JOURNALD,
    POD_UID,
    BadAnswer,
    ContainerMetadata,
    ContainerNotFound,
    RuntimeClient,
    RuntimeUnavailable,
    as_count,
    as_obj,
    as_str,
    check_runtime_id,
    container_id,
    is_sandbox,
    nomad_env,
    str_map,
    unixhttp,
)

API = "/v4.0.0/libpod"  # the oldest libpod API version Podman 4 and 5 serve


class PodmanClient(RuntimeClient):
    name = "podman"
    sockets = ("/run/podman/podman.sock", "/var/run/podman/podman.sock")

    def inspect(self, runtime_id: str) -> ContainerMetadata:
        check_runtime_id(runtime_id)
        path = self._require_socket()
        resp = unixhttp.get(path, f"{API}/containers/{runtime_id}/json", self.timeout, "podman")
        if resp.status == 404:
            raise ContainerNotFound(f"podman: no container {runtime_id}")
        if resp.status >= 500:
            raise RuntimeUnavailable(f"podman: inspect {runtime_id}: HTTP {resp.status}")
        if resp.status != 200:
            raise BadAnswer(f"podman: inspect {runtime_id}: HTTP {resp.status}")
        doc = resp.json("podman: inspect")
        if not isinstance(doc, dict):
            raise BadAnswer("podman: inspect: not a JSON object")
        return parse_inspect(runtime_id, doc)

    def version(self) -> str:
        resp = unixhttp.get(self._require_socket(), f"{API}/version", self.timeout, "podman")
        if resp.status != 200:
            raise BadAnswer(f"podman: version: HTTP {resp.status}")
        doc = resp.json("podman: version")
        return as_str(doc.get("Version")) if isinstance(doc, dict) else ""


def parse_inspect(runtime_id: str, doc: dict[str, object]) -> ContainerMetadata:
    """A libpod inspect document -> ContainerMetadata."""
    config, host = as_obj(doc.get("Config")), as_obj(doc.get("HostConfig"))
    labels = str_map(config.get("Labels"))
    name = as_str(doc.get("Name")).lstrip("/")
    log_cfg = as_obj(host.get("LogConfig"))
    log_type = as_str(log_cfg.get("Type"))
    log_path: str | None = None
    log_format: str | None = None
    if log_type in ("k8s-file", "json-file"):
        log_path = as_str(log_cfg.get("Path")) or as_str(doc.get("LogPath")) or None
        log_format = LOG_CRI if log_path else None
    elif log_type == "journald":
        log_format = LOG_JOURNALD
    sandbox = is_sandbox(labels, doc.get("IsInfra") is True)
    cid = None if sandbox else container_id("podman", labels, name, nomad_env(config.get("Env")), now=time.time())
    return ContainerMetadata(
        runtime="podman",
        runtime_id=runtime_id,
        id=cid,
        name=name,
        image=as_str(doc.get("ImageName")) or as_str(config.get("Image")),
        labels=labels,
        log_path=log_path,
        log_format=log_format,
        restart_count=as_count(doc.get("RestartCount")),
        sandbox=sandbox,
        pod_uid=labels.get(POD_UID, ""),
    )
