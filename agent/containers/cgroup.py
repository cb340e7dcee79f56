"""cgroups: which hierarchy layout the host has (v1, v2, hybrid), which cgroup a process is in,
what container that cgroup is (Coroot's rules), and reading a cgroup's resource files.

Reads files only; keeps no state but CgroupIds' map of cgroup ids to paths.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

V1 = "v1"
V2 = "v2"
HYBRID = "hybrid"
MAX_ASKED = 4096  # ids that missed, remembered with when they were first asked for

_DOCKER_ID = re.compile(r"([a-z0-9]{64})")
_CRIO_ID = re.compile(r"crio-([a-z0-9]{64})")
_CONTAINERD_ID = re.compile(r"cri-containerd[-:]([a-z0-9]{64})")
_POD_UID = re.compile(r"pod([0-9a-f_-]{36})")
_SYSTEMD_UNIT = re.compile(r"/(system|runtime|reserved|kube|azure|podruntime)\.slice/([^/]+)")
_TALOS = re.compile(r"/(system|podruntime)/([^/]+)")
_LXC = re.compile(r"/lxc/([^/]+)")
_LXC_PAYLOAD = re.compile(r"/lxc\.payload\.([^/]+)")
_LIBPOD_SCOPE = re.compile(r"libpod-([a-z0-9]{64})\.scope$")
_LIBPOD_PAYLOAD = re.compile(r"libpod-payload-([a-z0-9]{64})")
_SYSTEMD_SLICES = {"system.slice", "runtime.slice", "reserved.slice", "kube.slice", "azure.slice", "podruntime.slice"}


@dataclass(frozen=True)
class Layout:
    """Where each hierarchy lives under the cgroupfs root."""

    root: str
    mode: str  # v1 | v2 | hybrid

    @property
    def unified(self) -> str | None:
        if self.mode == V2:
            return self.root
        if self.mode == HYBRID:
            return os.path.join(self.root, "unified")
        return None

    def v2_path(self, cgroup_path: str) -> str | None:
        base = self.unified
        return os.path.join(base, cgroup_path.lstrip("/")) if base else None

    def v1_path(self, controller: str, cgroup_path: str) -> str | None:
        if self.mode == V2:
            return None
        return os.path.join(self.root, controller, cgroup_path.lstrip("/"))


def detect_layout(root: str = "/sys/fs/cgroup") -> Layout:
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return Layout(root, V2)
    if os.path.exists(os.path.join(root, "unified", "cgroup.controllers")):
        return Layout(root, HYBRID)
    return Layout(root, V1)


class CgroupIds:
    """cgroup v2 ids -> cgroup paths ("/system.slice/x.service"). A v2 cgroup's id, what
    bpf_get_current_cgroup_id() returns, is its directory's inode number: found by walking the
    unified hierarchy, at most `limit` directories (a node's cgroups number in the thousands).

    A miss walks again when no walk has begun since that id was first asked for (its cgroup
    may be newer than the last walk: a client started in a new container a moment ago), at
    most `burst` such walks a second; otherwise at most every `rescan` seconds (an id whose
    cgroup is gone stays unknown without a walk each time)."""

    def __init__(self, root: str | None, rescan: float = 1.0, limit: int = 65536,
                 clock: Callable[[], float] = time.monotonic, burst: int = 10) -> None:
        self.root, self.rescan, self.limit, self._clock = root, rescan, limit, clock
        self._paths: dict[int, str] = {}
        self._walked = -rescan
        self._asked: OrderedDict[int, float] = OrderedDict()  # ids that missed: when first asked
        self._recent: deque[float] = deque(maxlen=max(1, burst))  # when the last walks began
        self.walks = 0

    def path(self, cgid: int) -> str | None:
        if not self.root or cgid == 0:
            return None
        p = self._paths.get(cgid)
        if p is not None:
            return p
        now = self._clock()
        first = self._asked.setdefault(cgid, now)
        if len(self._asked) > MAX_ASKED:
            self._asked.popitem(last=False)
        fresh = self._walked < first and (
            len(self._recent) < (self._recent.maxlen or 1) or now - self._recent[0] >= 1.0)
        if fresh or now - self._walked >= self.rescan:
            self._walk()
            p = self._paths.get(cgid)
            if p is not None:
                self._asked.pop(cgid, None)
        return p

    def _walk(self) -> None:
        assert self.root
        self._walked = self._clock()
        self._recent.append(self._walked)
        self.walks += 1
        paths: dict[int, str] = {}
        todo = [(self.root, "")]
        while todo and len(paths) < self.limit:
            d, rel = todo.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if len(paths) >= self.limit:
                            break
                        if e.is_dir(follow_symlinks=False):
                            sub = f"{rel}/{e.name}"
                            paths[e.inode()] = sub
                            todo.append((e.path, sub))
            except OSError:
                continue  # removed while walking
        self._paths = paths


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {controller: path}; the v2 hierarchy is under key ''.

    Root and init.scope paths are left out: a process there is in no container."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        path = parts[2]
        if path.startswith("/lxc.payload."):
            path = "/" + path.split("/")[1]
        path = os.path.normpath(path) if path else path
        if path in ("/", "/init.scope", ""):
            continue
        for controller in parts[1].split(","):
            out[controller] = path
    return out


def cgroup_id(subsystems: dict[str, str]) -> str:
    """The path that names the process's cgroup: kubepods paths from v1 win, then v2, cpu,
    memory, and systemd's named hierarchy."""
    for c in ("cpu", "memory"):
        if subsystems.get(c, "").startswith("/kubepods"):
            return subsystems[c]
    for c in ("", "cpu", "memory", "name=systemd"):
        if subsystems.get(c):
            return subsystems[c]
    return ""


@dataclass(frozen=True)
class ContainerRef:
    kind: str  # docker | crio | cri-containerd | podman | systemd | lxc | talos
    runtime_id: str  # what the runtime calls it (64-hex id, unit path, lxc name)
    cgroup: str  # the cgroup path


def classify(path: str) -> ContainerRef | None:
    """Coroot's container rules for a cgroup path; None for no container (user sessions,
    init, scopes, roots, or anything not recognised)."""
    if not path or path == "/":
        return None
    parts = path.strip("/").split("/")
    first = parts[0]
    if path == "/init":
        return ContainerRef("talos", "/talos/init", path)
    if "libpod-conmon-" in path:
        return None  # Podman's monitor process, as crio-conmon
    if first in ("user.slice", "machine.slice"):
        # Podman: rootful containers in machine.slice, rootless ones in the user's slice
        # (the node agent's Podman support, coroot-node-agent pull request 251).
        m = _LIBPOD_SCOPE.search(path)
        return ContainerRef("podman", m.group(1), path) if m else None
    if first in ("init.scope", "systemd"):
        return None
    if first == "docker" or (first == "system.slice" and len(parts) > 1 and parts[1].startswith("docker-")):
        m = _DOCKER_ID.search(path)
        return ContainerRef("docker", m.group(1), path) if m else None
    if "kubepods" in path:
        if m := _CRIO_ID.search(path):
            return ContainerRef("crio", m.group(1), path)
        if "crio-conmon-" in path:
            return None
        if m := _CONTAINERD_ID.search(path):
            return ContainerRef("cri-containerd", m.group(1), path)
        if m := _DOCKER_ID.search(path):
            return ContainerRef("docker", m.group(1), path)
        return None  # the pod's sandbox
    if first in ("system", "podruntime"):
        m = _TALOS.search(path)
        return ContainerRef("talos", "/talos/" + m.group(2), path) if m else None
    if first in _SYSTEMD_SLICES:
        if m := _LIBPOD_PAYLOAD.search(path):
            return ContainerRef("podman", m.group(1), path)  # podman --cgroups=split
        if path.endswith(".scope"):
            return None
        m = _SYSTEMD_UNIT.search(path)
        if not m:
            return None
        unit_path = f"/{m.group(1)}.slice/{m.group(2)}".replace("\\x2d", "-")
        return ContainerRef("systemd", unit_path, path)
    if first == "lxc":
        m = _LXC.search(path)
        return ContainerRef("lxc", m.group(1), path) if m else None
    if first.startswith("lxc.payload."):
        m = _LXC_PAYLOAD.search(path)
        return ContainerRef("lxc", "/lxc/" + m.group(1), path) if m else None
    return None


def container_id(ref: ContainerRef) -> str:
    """The id derived from the cgroup path. Docker, Podman and Kubernetes containers are
    renamed to their runtime's id (`/docker/<name>`, `/podman/<name>`, `/k8s/<ns>/<pod>/<c>`)
    when the runtime answers (registry.py); until then, or when no runtime answers, this id
    stands (`/docker/<id12>`, `/podman/<id12>`, `/k8s-cgroup/<pod-uid>/<id12>`)."""
    if ref.kind in ("systemd", "talos"):
        return ref.runtime_id
    if ref.kind == "lxc":
        return ref.runtime_id if ref.runtime_id.startswith("/lxc/") else "/lxc/" + ref.runtime_id
    if ref.kind == "docker" and "kubepods" not in ref.cgroup:
        return "/docker/" + ref.runtime_id[:12]
    if ref.kind == "podman":
        return "/podman/" + ref.runtime_id[:12]
    pod = _POD_UID.search(ref.cgroup)
    pod_uid = pod.group(1).replace("_", "-") if pod else "unknown"
    return f"/k8s-cgroup/{pod_uid}/{ref.runtime_id[:12]}"


# The node agent's workload rules (common/otel.go), tried in order on a Kubernetes id: the
# pod name's ReplicaSet hash and suffix (a Deployment; also a CronJob's Job, whose number the
# hash class takes), a DaemonSet's or Job's suffix (consonants and digits without vowels or
# look-alikes), a StatefulSet's ordinal. Unanchored, as Go's FindStringSubmatch is.
_WORKLOAD_SUFFIX = "[bcdfghjklmnpqrstvwxz2456789]{5}"
_K8S_WORKLOADS = (
    re.compile(rf"(/k8s/[a-z0-9-]+/[a-z0-9-]+)-[0-9a-f]{{1,10}}-{_WORKLOAD_SUFFIX}/.+"),
    re.compile(rf"(/k8s/[a-z0-9-]+/[a-z0-9-]+)-{_WORKLOAD_SUFFIX}/.+"),
    re.compile(r"(/k8s/[a-z0-9-]+/[a-z0-9-]+)-\d+/.+"),
)


def service_name(cid: str) -> str:
    """`service.name` of spans, logs and profiles: a Kubernetes container's workload
    (/k8s/<ns>/<pod>/<c> -> /k8s/<ns>/<workload>), else the container id itself."""
    if not cid.startswith("/k8s/"):
        return cid
    for rx in _K8S_WORKLOADS:
        if m := rx.search(cid):
            return m.group(1)
    return cid


def app_id(cid: str) -> str:
    """The `app_id` label: the workload of a Kubernetes container, empty for anything else (and
    for a pod whose name follows no workload rule), as the node agent sets it."""
    name = service_name(cid)
    return "" if name == cid else name


# ----------------------------------------------------------- file reading ---


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def read_kv(path: str) -> dict[str, int]:
    """'key value' lines (cpu.stat, memory.stat, memory.events) -> {key: int}."""
    text = read_text(path)
    out: dict[str, int] = {}
    if text is None:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def read_pressure(path: str) -> dict[str, float]:
    """A *.pressure file -> {'some': seconds, 'full': seconds} of total stall time."""
    text = read_text(path)
    out: dict[str, float] = {}
    if text is None:
        return out
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        for p in parts[1:]:
            if p.startswith("total="):
                out[parts[0]] = int(p[6:]) / 1e6
    return out


def read_io_stat(path: str) -> dict[str, dict[str, int]]:
    """v2 io.stat -> {'MAJ:MIN': {'rbytes':…, 'wbytes':…, 'rios':…, 'wios':…}}."""
    text = read_text(path)
    out: dict[str, dict[str, int]] = {}
    if text is None:
        return out
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        stats = {}
        for p in parts[1:]:
            k, _, v = p.partition("=")
            if v.isdigit():
                stats[k] = int(v)
        out[parts[0]] = stats
    return out


def read_blkio(path_bytes: str, path_ops: str) -> dict[str, dict[str, int]]:
    """v1 blkio.throttle.io_service_bytes + io_serviced -> the io.stat shape."""
    out: dict[str, dict[str, int]] = {}
    for path, r, w in ((path_bytes, "rbytes", "wbytes"), (path_ops, "rios", "wios")):
        text = read_text(path) or ""
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3 or not parts[2].isdigit():
                continue
            if parts[1] == "Read":
                out.setdefault(parts[0], {})[r] = int(parts[2])
            elif parts[1] == "Write":
                out.setdefault(parts[0], {})[w] = int(parts[2])
    return out
