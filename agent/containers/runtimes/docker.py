"""Docker Engine: GET /containers/<id>/json and /version over its unix socket.

Ids are `/docker/<name>`, or the Kubernetes/Swarm/Nomad forms when the labels (or the NOMAD_*
variables) say so. The log file is Docker's LogPath when the json-file driver writes one.
"""

from __future__ import annotations

import time

from agent.containers.runtimes import (
    LOG_DOCKER_JSON,
    POD_UID,
    RESTART_COUNT,
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

# dockershim kept a Kubernetes container's annotations as labels with this prefix, and marked
# the pause container with a type label.
DOCKERSHIM_ANNOTATION = "annotation."
DOCKERSHIM_TYPE = "io.kubernetes.docker.type"


class DockerClient(RuntimeClient):
    name = "docker"
    sockets = ("/run/docker.sock", "/var/run/docker.sock")

    def inspect(self, runtime_id: str) -> ContainerMetadata:
        check_runtime_id(runtime_id)
        path = self._require_socket()
        resp = unixhttp.get(path, f"/containers/{runtime_id}/json", self.timeout, "docker")
        if resp.status == 404:
            raise ContainerNotFound(f"docker: no container {runtime_id}")
        if resp.status >= 500:
            raise RuntimeUnavailable(f"docker: inspect {runtime_id}: HTTP {resp.status}")
        if resp.status != 200:
            raise BadAnswer(f"docker: inspect {runtime_id}: HTTP {resp.status}")
        doc = resp.json("docker: inspect")
        if not isinstance(doc, dict):
            raise BadAnswer("docker: inspect: not a JSON object")
        return parse_inspect(runtime_id, doc)

    def version(self) -> str:
        resp = unixhttp.get(self._require_socket(), "/version", self.timeout, "docker")
        if resp.status != 200:
            raise BadAnswer(f"docker: /version: HTTP {resp.status}")
        doc = resp.json("docker: /version")
        return as_str(doc.get("Version")) if isinstance(doc, dict) else ""


def parse_inspect(runtime_id: str, doc: dict[str, object], runtime: str = "docker") -> ContainerMetadata:
    """A Docker Engine (or Podman's Docker-compatible) inspect document -> ContainerMetadata."""
    config, host = as_obj(doc.get("Config")), as_obj(doc.get("HostConfig"))
    labels = str_map(config.get("Labels"))
    name = as_str(doc.get("Name")).lstrip("/")
    log_type = as_str(as_obj(host.get("LogConfig")).get("Type"))
    log_path = as_str(doc.get("LogPath")) if log_type == "json-file" else ""
    if labels.get(POD_UID) or labels.get("io.kubernetes.pod.name"):
        restarts = as_count(labels.get(DOCKERSHIM_ANNOTATION + RESTART_COUNT))
    else:
        restarts = as_count(doc.get("RestartCount"))
    sandbox = is_sandbox(labels, labels.get(DOCKERSHIM_TYPE) == "podsandbox")
    cid = None if sandbox else container_id(runtime, labels, name, nomad_env(config.get("Env")), now=time.time())
    return ContainerMetadata(
        runtime=runtime,
        runtime_id=runtime_id,
        id=cid,
        name=name,
        image=as_str(config.get("Image")),
        labels=labels,
        log_path=log_path or None,
        log_format=LOG_DOCKER_JSON if log_path else None,
        restart_count=restarts,
        sandbox=sandbox,
        pod_uid=labels.get(POD_UID, ""),
    )
