"""Container runtime clients: ask containerd, CRI-O, Docker or Podman what a container is.

A cgroup names a container only by the runtime's 64-hex id. The runtime knows the rest: the
Kubernetes labels (pod, namespace, container name), the Docker or Podman name, the image, the
log file and the restart count. Each client here answers one question, `inspect(runtime_id)`,
with a `ContainerMetadata` whose `id` is the Coroot node agent's container id:
`/k8s/<ns>/<pod>/<container>`, `/k8s-cronjob/<ns>/<job>/<container>`, `/swarm/...`,
`/nomad/...`, `/docker/<name>`, `/podman/<name>`.

Clients do blocking I/O on a unix socket and keep no cache: they are driven by the resolver
(resolver.py) on its own thread, never on the event path. Nothing here renames containers;
the registry does that when the resolver's listener tells it.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# How the logs of a container are framed: what agent/logs must use to read `log_path`.
LOG_CRI = "cri"  # "<RFC3339Nano> <stream> <P|F> <message>" (kubelet, CRI-O, Podman's k8s-file)
LOG_DOCKER_JSON = "docker-json"  # {"log": ..., "stream": ..., "time": ...} per line
LOG_JOURNALD = "journald"  # no file: the runtime writes to the journal

DEFAULT_TIMEOUT = 5.0  # seconds for one request to a runtime
MAX_RESPONSE = 8 << 20  # bytes of one runtime answer; an OCI spec is rarely above 100 KiB

# A runtime id goes into a URL path or a protobuf string: only the characters runtimes use.
_RUNTIME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Kubernetes labels the kubelet puts on every container and sandbox it asks a runtime for.
POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"
RESTART_COUNT = "io.kubernetes.container.restartCount"  # an annotation, not a label

_CRONJOB_POD = re.compile(r"([a-z0-9-]+)-([0-9]{8})-[bcdfghjklmnpqrstvwxz2456789]{5}")
CRONJOB_WINDOW = 7 * 24 * 3600.0  # a pod name's schedule time must be this close to now
_NOMAD_VARS = ("NOMAD_ALLOC_ID", "NOMAD_GROUP_NAME", "NOMAD_JOB_NAME", "NOMAD_NAMESPACE", "NOMAD_TASK_NAME")


class RuntimeLookupError(Exception):
    """Base of the errors a client raises; the resolver decides what each means."""


class RuntimeUnavailable(RuntimeLookupError):
    """The runtime could not be asked: no socket, connection refused, timeout, or a broken
    answer from the transport. The resolver backs off and asks again later."""


class RuntimeAbsent(RuntimeUnavailable):
    """No socket at any of the runtime's paths: most likely it does not run on this node."""


class ContainerNotFound(RuntimeLookupError):
    """The runtime answered: it has no container with this id."""


class BadAnswer(RuntimeLookupError):
    """The runtime answered something that is not what its API documents."""


@dataclass(frozen=True)
class ContainerMetadata:
    """What a runtime says about one container. `id` is None when the runtime gives nothing
    to name it by (a pod sandbox, a bare containerd record): keep the cgroup-derived id."""

    runtime: str  # containerd | docker | crio | podman
    runtime_id: str  # the id that was looked up (from the cgroup path)
    id: str | None
    name: str = ""  # the runtime's own name (Docker/Podman name; "" for containerd and CRI)
    image: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    log_path: str | None = None  # as the host sees it
    log_format: str | None = None  # LOG_CRI | LOG_DOCKER_JSON | LOG_JOURNALD
    restart_count: int | None = None  # None: the runtime does not say
    sandbox: bool = False  # a pod's sandbox (pause/infra): never reported as a container
    namespace: str = ""  # containerd namespace it was found in
    pod_uid: str = ""


@dataclass(frozen=True)
class RuntimeStatus:
    """One row of `coroot-agent check`."""

    runtime: str
    state: str  # reachable | unreachable | absent | disabled
    socket: str | None = None
    version: str | None = None
    detail: str = ""


REACHABLE, UNREACHABLE, ABSENT, DISABLED = "reachable", "unreachable", "absent", "disabled"


def check_runtime_id(runtime_id: str) -> str:
    if not isinstance(runtime_id, str) or not _RUNTIME_ID.match(runtime_id):
        raise ValueError(f"not a container id: {runtime_id!r}")
    return runtime_id


def container_id(
    runtime: str,
    labels: Mapping[str, str],
    name: str = "",
    env: Mapping[str, str] | None = None,
    now: float | None = None,
) -> str | None:
    """The node agent's container id for what a runtime said; None for a pod sandbox, or when
    there is no name to use."""
    pod = labels.get(POD_NAME, "")
    if pod:
        namespace = labels.get(POD_NAMESPACE, "")
        cname = labels.get(CONTAINER_NAME, "")
        if cname in ("", "POD"):
            return None  # the pod's sandbox
        if m := _CRONJOB_POD.search(pod):
            scheduled = int(m.group(2)) * 60
            t = time.time() if now is None else now
            if t - CRONJOB_WINDOW < scheduled < t + CRONJOB_WINDOW:
                return f"/k8s-cronjob/{namespace}/{m.group(1)}/{cname}"
        return f"/k8s/{namespace}/{pod}/{cname}"
    task = labels.get("com.docker.swarm.task.name", "").split(".", 2)
    if len(task) == 3:
        namespace = labels.get("com.docker.stack.namespace", "")
        service = labels.get("com.docker.swarm.service.name", "")
        if namespace:
            service = service.removeprefix(namespace + "_")
        return f"/swarm/{namespace or '_'}/{service}/{task[1]}"
    if env:
        alloc, group, job, ns, task_name = (env.get(k, "") for k in _NOMAD_VARS)
        if alloc and group and job and ns and task_name:
            return f"/nomad/{ns}/{job}/{group}/{alloc}/{task_name}"
    if not name:
        return None
    return f"/podman/{name}" if runtime == "podman" else f"/docker/{name}"


def is_sandbox(labels: Mapping[str, str], *markers: bool) -> bool:
    """A pod's sandbox: Kubernetes labels without a container name, the dockershim/CRI-O "POD"
    name, or a runtime's own marker."""
    if any(markers):
        return True
    return bool(labels.get(POD_NAME)) and labels.get(CONTAINER_NAME, "") in ("", "POD")


def nomad_env(env: object) -> dict[str, str]:
    """Only the NOMAD_* variables the id needs, from a Docker/Podman "K=V" list: the rest of a
    container's environment (secrets, often) is never kept."""
    out: dict[str, str] = {}
    if isinstance(env, list):
        for item in env:
            if isinstance(item, str) and item.startswith("NOMAD_"):
                k, sep, v = item.partition("=")
                if sep and k in _NOMAD_VARS:
                    out[k] = v
    return out


def str_map(value: object) -> dict[str, str]:
    """A JSON object of strings (labels, annotations); anything else is dropped."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def as_obj(value: object) -> dict[str, object]:
    """A JSON object, or an empty one for anything else."""
    return value if isinstance(value, dict) else {}


def as_str(value: object) -> str:
    return value if isinstance(value, str) else ""


def as_count(value: object) -> int | None:
    """A restart count from JSON (an int, or an annotation's text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def find_socket(override: str | None, candidates: Sequence[str], host_root: str | None) -> str | None:
    """The runtime's socket: the override alone when one is set; otherwise the first candidate
    that exists as a socket, as mounted into the agent, then under the host's root (the node
    agent reaches host paths through /proc/1/root)."""
    paths = [override] if override else list(candidates)
    tries = list(paths)
    if host_root and not override:
        tries += [os.path.join(host_root, p.lstrip("/")) for p in paths]
    for p in tries:
        try:
            if stat.S_ISSOCK(os.stat(p).st_mode):
                return p
        except OSError:
            continue
    return None


class RuntimeClient:
    """One runtime. `inspect` and `version` block on the socket (bounded by `timeout`); they
    raise RuntimeUnavailable, ContainerNotFound or BadAnswer, never anything else."""

    name = "runtime"
    sockets: tuple[str, ...] = ()

    def __init__(self, socket: str | None = None, host_root: str | None = "/proc/1/root",
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.override = socket or None
        self.host_root = host_root
        self.timeout = timeout

    def socket_path(self) -> str | None:
        """Looked up on every connection: a runtime that starts after the agent is found."""
        return find_socket(self.override, self.sockets, self.host_root)

    def _require_socket(self) -> str:
        path = self.socket_path()
        if path is None:
            where = self.override or ", ".join(self.sockets)
            raise RuntimeAbsent(f"{self.name}: no socket at {where}")
        return path

    def inspect(self, runtime_id: str) -> ContainerMetadata:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def status(self) -> RuntimeStatus:
        """Reachable (with version), unreachable (socket there, no answer) or absent."""
        path = self.socket_path()
        if path is None:
            return RuntimeStatus(self.name, ABSENT, None, None,
                                 f"no socket at {self.override or ', '.join(self.sockets)}")
        try:
            return RuntimeStatus(self.name, REACHABLE, path, self.version())
        except RuntimeLookupError as e:
            return RuntimeStatus(self.name, UNREACHABLE, path, None, str(e))

    def close(self) -> None:
        """Release connections; the client may be used again afterwards."""
