"""CRI-O: its inspect HTTP API (GET /containers/<id>, GET /info) on crio.sock, which also
serves the CRI gRPC API (used here only for the version).

A lookup of a sandbox id answers with the sandbox's infra container, which CRI-O names "POD"
and marks `io.kubernetes.cri-o.ContainerType: sandbox`.
"""

from __future__ import annotations

import time

from agent.containers.runtimes import (
    ABSENT,
    LOG_CRI,
    POD_UID,
    REACHABLE,
    RESTART_COUNT,
    UNREACHABLE,
    BadAnswer,
    ContainerMetadata,
    ContainerNotFound,
    RuntimeClient,
    RuntimeLookupError,
    RuntimeStatus,
    RuntimeUnavailable,
    as_count,
    as_str,
    check_runtime_id,
    container_id,
    is_sandbox,
    str_map,
    unixhttp,
)
from agent.containers.runtimes.containerd import GrpcUnix, cri_version

CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"  # "container" | "sandbox"


class CrioClient(RuntimeClient):
    name = "crio"
    sockets = ("/var/run/crio/crio.sock", "/run/crio/crio.sock")

    def __init__(self, socket: str | None = None, host_root: str | None = "/proc/1/root",
                 timeout: float = 5.0) -> None:
        super().__init__(socket, host_root, timeout)
        self._grpc = GrpcUnix(self.name, timeout)

    def inspect(self, runtime_id: str) -> ContainerMetadata:
        check_runtime_id(runtime_id)
        path = self._require_socket()
        resp = unixhttp.get(path, f"/containers/{runtime_id}", self.timeout, "crio")
        if resp.status == 404:
            raise ContainerNotFound(f"crio: no container {runtime_id}")
        if resp.status >= 500:
            raise RuntimeUnavailable(f"crio: inspect {runtime_id}: HTTP {resp.status}")
        if resp.status != 200:
            raise BadAnswer(f"crio: inspect {runtime_id}: HTTP {resp.status}")
        doc = resp.json("crio: inspect")
        if not isinstance(doc, dict):
            raise BadAnswer("crio: inspect: not a JSON object")
        return parse_container_info(runtime_id, doc)

    def info(self) -> dict[str, object]:
        """GET /info: storage and cgroup driver; answers when the daemon is up."""
        resp = unixhttp.get(self._require_socket(), "/info", self.timeout, "crio")
        if resp.status != 200:
            raise BadAnswer(f"crio: /info: HTTP {resp.status}")
        doc = resp.json("crio: /info")
        if not isinstance(doc, dict):
            raise BadAnswer("crio: /info: not a JSON object")
        return doc

    def version(self) -> str:
        """From the CRI gRPC API on the same socket: "cri-o 1.30.2"."""
        return cri_version(self._grpc, self._require_socket())

    def status(self) -> RuntimeStatus:
        path = self.socket_path()
        if path is None:
            return RuntimeStatus(self.name, ABSENT, None, None, f"no socket at {self.override or ', '.join(self.sockets)}")
        try:
            info = self.info()
        except RuntimeLookupError as e:
            return RuntimeStatus(self.name, UNREACHABLE, path, None, str(e))
        try:
            version: str | None = self.version()
        except RuntimeLookupError:
            version = None
        detail = f"cgroup driver {as_str(info.get('cgroup_driver')) or '?'}"
        return RuntimeStatus(self.name, REACHABLE, path, version, detail)

    def close(self) -> None:
        self._grpc.close()


def parse_container_info(runtime_id: str, doc: dict[str, object]) -> ContainerMetadata:
    """CRI-O's ContainerInfo (pkg/types: name, image, labels, annotations, crio_annotations,
    log_path, sandbox, ...) -> ContainerMetadata."""
    labels = str_map(doc.get("labels"))
    annotations = str_map(doc.get("annotations"))
    crio_annotations = str_map(doc.get("crio_annotations"))
    sandbox = is_sandbox(labels, crio_annotations.get(CONTAINER_TYPE) == "sandbox",
                         annotations.get(CONTAINER_TYPE) == "sandbox")
    log_path = as_str(doc.get("log_path")) or None
    return ContainerMetadata(
        runtime="crio",
        runtime_id=runtime_id,
        id=None if sandbox else container_id("crio", labels, now=time.time()),
        image=as_str(doc.get("image")),
        labels=labels,
        log_path=log_path,
        log_format=LOG_CRI if log_path else None,
        restart_count=as_count(annotations.get(RESTART_COUNT)),
        sandbox=sandbox,
        pod_uid=labels.get(POD_UID, ""),
    )
