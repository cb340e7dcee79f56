"""containerd: its gRPC API on the unix socket, containers.v1 Get in the namespaces Kubernetes
(k8s.io), Docker (moby) and ctr (default) use.

The few messages needed are read and written with protowire.py; grpcio carries them as bytes.
grpcio is imported on the first call (it costs ~20 MB of RSS), so a node without containerd or
CRI-O never loads it.
A container created by containerd's CRI plugin (kubelet) carries the kubelet's labels and an
extension, `io.cri-containerd.container.metadata`, whose JSON has the CRI log path and the
container's attempt number (its restart count).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.containers.runtimes import (
    LOG_CRI,
    MAX_RESPONSE,
    POD_UID,
    RESTART_COUNT,
    BadAnswer,
    ContainerMetadata,
    ContainerNotFound,
    RuntimeClient,
    RuntimeUnavailable,
    as_count,
    as_str,
    check_runtime_id,
    container_id,
    is_sandbox,
    str_map,
)
from agent.containers.runtimes import protowire as pw

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

GET_CONTAINER = "/containerd.services.containers.v1.Containers/Get"
VERSION = "/containerd.services.version.v1.Version/Version"
CRI_VERSION = ("/runtime.v1.RuntimeService/Version", "/runtime.v1alpha2.RuntimeService/Version")
NAMESPACE_HEADER = "containerd-namespace"
NAMESPACES = ("k8s.io", "moby", "default")

CRI_CONTAINER_EXTENSION = "io.cri-containerd.container.metadata"
CRI_SANDBOX_EXTENSION = "io.cri-containerd.sandbox.metadata"
CRI_KIND_LABEL = "io.cri-containerd.kind"  # "container" | "sandbox"

# Container message fields (containerd api/services/containers/v1/containers.proto).
_C_ID, _C_LABELS, _C_IMAGE, _C_EXTENSIONS = 1, 2, 3, 10
_ANY_TYPE_URL, _ANY_VALUE = 1, 2

# Status codes that mean "could not ask" (transport, overload, timeout), not an answer.
_UNAVAILABLE_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"}


class RpcFailed(Exception):
    """A call answered with a status: `code` is its name (NOT_FOUND, UNIMPLEMENTED, ...)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class GrpcUnix:
    """A gRPC channel to a unix socket, made on first use and dropped after a transport
    failure, so that a runtime that restarts is reached again at once (grpcio's own reconnect
    backoff would keep failing calls for up to two minutes)."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._path: str | None = None

    def call(self, path: str, method: str, payload: bytes,
             metadata: Sequence[tuple[str, str]] = (), timeout: float | None = None) -> bytes:
        """Raises RpcFailed for an answer with a status (NOT_FOUND, UNIMPLEMENTED, ...) and
        RuntimeUnavailable when the runtime could not be asked."""
        import grpc  # here, not at module level: see the module docstring

        with self._lock:
            if self._channel is None or self._path != path:
                self._close_locked()
                self._channel = grpc.insecure_channel(
                    "unix://" + path,
                    options=[("grpc.max_receive_message_length", MAX_RESPONSE),
                             ("grpc.enable_retries", 0)])
                self._path = path
            channel = self._channel
        rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        try:
            out = rpc(payload, metadata=tuple(metadata), timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = (e.details() if hasattr(e, "details") else "") or ""
            if code in _UNAVAILABLE_CODES:
                self.close()
                raise RuntimeUnavailable(f"{self.name}: {path}: {code}: {details}") from None
            raise RpcFailed(code, details) from None
        except ValueError as e:  # e.g. the channel was closed by another thread
            self.close()
            raise RuntimeUnavailable(f"{self.name}: {path}: {e}") from None
        if not isinstance(out, bytes):
            raise BadAnswer(f"{self.name}: {method}: not a message")
        return out

    def _close_locked(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._path = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()


def cri_version(conn: GrpcUnix, path: str) -> str:
    """`<runtime name> <runtime version>` from the CRI RuntimeService.Version (v1, then
    v1alpha2) of the server on `path`."""
    for method in CRI_VERSION:
        try:
            raw = conn.call(path, method, b"")
        except RpcFailed as e:
            if e.code == "UNIMPLEMENTED":
                continue
            raise BadAnswer(f"{conn.name}: {method}: {e}") from None
        try:
            msg = pw.decode(raw)
        except ValueError as e:
            raise BadAnswer(f"{conn.name}: {method}: {e}") from None
        name, version = pw.text(msg, 2), pw.text(msg, 3)
        return f"{name} {version}".strip()
    raise BadAnswer(f"{conn.name}: the CRI RuntimeService is not served on {path}")


class ContainerdClient(RuntimeClient):
    name = "containerd"
    # Where the node agent looks, in its order (MicroK8s, k0s, k3s, then stock containerd).
    sockets = (
        "/var/snap/microk8s/common/run/containerd.sock",
        "/run/k0s/containerd.sock",
        "/run/k3s/containerd/containerd.sock",
        "/run/containerd/containerd.sock",
    )

    def __init__(self, socket: str | None = None, host_root: str | None = "/proc/1/root",
                 timeout: float = 5.0, namespaces: Sequence[str] = NAMESPACES) -> None:
        super().__init__(socket, host_root, timeout)
        self.namespaces = tuple(namespaces)
        self._conn = GrpcUnix(self.name, timeout)

    def inspect(self, runtime_id: str) -> ContainerMetadata:
        check_runtime_id(runtime_id)
        path = self._require_socket()
        request = pw.field_str(1, runtime_id)
        for ns in self.namespaces:
            try:
                raw = self._conn.call(path, GET_CONTAINER, request, [(NAMESPACE_HEADER, ns)])
            except RpcFailed as e:
                if e.code == "NOT_FOUND":
                    continue
                raise BadAnswer(f"containerd: Get {runtime_id} in {ns}: {e}") from None
            try:
                container = pw.decode(pw.first_bytes(pw.decode(raw), 1))
            except ValueError as e:
                raise BadAnswer(f"containerd: Get {runtime_id} in {ns}: {e}") from None
            return parse_container(runtime_id, ns, container)
        raise ContainerNotFound(f"containerd: {runtime_id} not in namespaces {', '.join(self.namespaces)}")

    def version(self) -> str:
        path = self._require_socket()
        try:
            raw = self._conn.call(path, VERSION, b"")
            return pw.text(pw.decode(raw), 1)
        except RpcFailed as e:
            raise BadAnswer(f"containerd: version: {e}") from None
        except ValueError as e:
            raise BadAnswer(f"containerd: version: {e}") from None

    def close(self) -> None:
        self._conn.close()


def parse_container(runtime_id: str, namespace: str, c: dict[int, list[int | bytes]]) -> ContainerMetadata:
    """A decoded containers.v1.Container -> ContainerMetadata."""
    labels = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pw.entries(c, _C_LABELS)}
    extensions = {}
    for key, any_msg in pw.entries(c, _C_EXTENSIONS):
        try:
            extensions[key.decode(errors="replace")] = pw.first_bytes(pw.decode(any_msg), _ANY_VALUE)
        except ValueError:
            continue
    log_path: str | None = None
    restarts: int | None = None
    cri = _cri_metadata(extensions.get(CRI_CONTAINER_EXTENSION))
    if cri is not None:
        log_path = as_str(cri.get("LogPath")) or None
        config = cri.get("Config")
        if isinstance(config, dict):
            meta = config.get("metadata")
            if isinstance(meta, dict):
                restarts = as_count(meta.get("attempt", 0))
            if restarts is None:
                restarts = as_count(str_map(config.get("annotations")).get(RESTART_COUNT))
    sandbox = is_sandbox(labels, labels.get(CRI_KIND_LABEL) == "sandbox",
                         CRI_SANDBOX_EXTENSION in extensions)
    return ContainerMetadata(
        runtime="containerd",
        runtime_id=runtime_id,
        id=None if sandbox else container_id("containerd", labels, now=time.time()),
        image=pw.text(c, _C_IMAGE),
        labels=labels,
        log_path=log_path,
        log_format=LOG_CRI if log_path else None,
        restart_count=restarts,
        sandbox=sandbox,
        namespace=namespace,
        pod_uid=labels.get(POD_UID, ""),
    )


def _cri_metadata(raw: bytes | None) -> dict[str, object] | None:
    """The CRI plugin's versioned JSON: {"Version": "v1", "Metadata": {...}}."""
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        log.debug("containerd: CRI metadata extension is not JSON")
        return None
    meta = doc.get("Metadata") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else None
