"""Container runtime clients and the resolver against real runtimes from Debian, started by the
tests in temporary directories: containerd (its own --root/--state/--address), dockerd
(`--iptables=false --bridge=none`, its own data root, exec root and socket) and Podman's API
service (its own storage). No container process is ever run by a runtime: containerd records
are made with `ctr c create` or the containers API, Docker and Podman containers with
`create`; the processes the cgroup tests place are the tests' own.

CRI-O is not packaged in Debian: its inspect API is served here from recorded answers in the
format CRI-O documents (pkg/types ContainerInfo, GET /containers/<id> and /info), by a
test-only server on a unix socket. Said again at those tests.

Requests are counted at the runtime: an HTTP/2 proxy in front of containerd counts the gRPC
calls (one HEADERS frame each), dockerd's debug log counts its API calls.

The agent tests at the end run a real agent (tests/system/conftest.py's `agent_factory`) with
the runtimes' sockets, and processes of the tests' own placed in v2 cgroups at the paths
kubelet (both cgroup drivers), Docker and Podman make for those container ids: the ids, app_id,
image, TCP connect and HTTP counts, spans and log lines come out under the runtime's id; a
runtime down at start then up renames the container without losing or doubling a count.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.containers import cgroup as cg
from agent.containers.runtimes import (
    ABSENT,
    LOG_CRI,
    LOG_DOCKER_JSON,
    REACHABLE,
    UNREACHABLE,
    ContainerMetadata,
    ContainerNotFound,
)
from agent.containers.runtimes import protowire as pw
from agent.containers.runtimes.containerd import ContainerdClient, GrpcUnix, cri_version
from agent.containers.runtimes.crio import CrioClient
from agent.containers.runtimes.docker import DockerClient
from agent.containers.runtimes.podman import PodmanClient
from agent.containers.runtimes.resolver import FOUND, WAITING, RuntimeResolver
from tests.system.helpers import (
    L7_CLIENT,
    REPO,
    AgentFactory,
    AgentProcess,
    coroot_agent,
    rows,
    wait_for,
)

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # not whatever `docker` is first on PATH
PODMAN = "/usr/bin/podman"

NS, DEPLOY_POD, STS_POD = "shop", "web-7d9f8b6c5d-x2k4p", "db-0"
WEB_UID, DB_UID = "3f1c2a4e-8b6d-4c1a-9e2f-5a7b8c9d0e1f", "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"


def _need(path: str, package: str) -> None:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: apt-get install {package} (scripts/setup.sh)")


def _hexid() -> str:
    return (uuid.uuid4().hex + uuid.uuid4().hex)[:64]


def _run(*argv: str, **kw: object) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]
    assert p.returncode == 0, f"{' '.join(argv)}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return str(p.stdout)


def _wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if os.path.exists(path):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.05)
    pytest.fail(f"{path} not there after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------- containerd ---


class Containerd:
    """containerd with its own root, state and socket; stop() and start() keep its records."""

    def __init__(self, base: str) -> None:
        _need(CONTAINERD, "containerd")
        _need(CTR, "containerd")
        self.base = base
        self.address = os.path.join(base, "c.sock")
        self.rootfs = os.path.join(base, "rootfs")
        os.makedirs(self.rootfs, exist_ok=True)
        with open(os.path.join(base, "config.toml"), "w") as f:
            f.write("version = 2\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(base, "containerd.log")

    def start(self) -> None:
        b = self.base
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [CONTAINERD, "--root", f"{b}/root", "--state", f"{b}/state", "--address", self.address,
                 "--config", f"{b}/config.toml"], stdout=out, stderr=out)
        _wait_socket(self.address, self.proc, 30, self.log)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        try:
            os.unlink(self.address)  # a killed daemon may leave it
        except FileNotFoundError:
            pass

    def ctr_create(self, cid: str, labels: dict[str, str], namespace: str = "k8s.io") -> None:
        args = [CTR, "--address", self.address, "-n", namespace, "c", "create"]
        for k, v in labels.items():
            args += ["--label", f"{k}={v}"]
        _run(*args, "--rootfs", self.rootfs, cid, "/bin/true")

    def api_create(self, cid: str, labels: dict[str, str], image: str = "",
                   extensions: dict[str, tuple[str, bytes]] | None = None, namespace: str = "k8s.io",
                   channel: grpc.Channel | None = None) -> None:
        """A record made through containers.v1 Create, as containerd's CRI plugin makes one:
        labels, image, and typed extensions ({key: (type_url, value)})."""
        any_spec = pw.field_str(1, "types.containerd.io/opencontainers/runtime-spec/1/Spec") + pw.field_bytes(2, b"{}")
        exts = {k: pw.field_str(1, t) + pw.field_bytes(2, v) for k, (t, v) in (extensions or {}).items()}
        container = (pw.field_str(1, cid) + pw.field_str_map(2, labels) + pw.field_str(3, image)
                     + pw.field_bytes(4, pw.field_str(1, "io.containerd.runc.v2"))
                     + pw.field_bytes(5, any_spec) + pw.field_map(10, exts))
        own = channel is None
        ch = channel or grpc.insecure_channel("unix://" + self.address)
        try:
            ch.unary_unary("/containerd.services.containers.v1.Containers/Create")(
                pw.field_bytes(1, container), metadata=(("containerd-namespace", namespace),), timeout=10)
        finally:
            if own:
                ch.close()


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    base = tempfile.mkdtemp(prefix="rt-ctd-", dir="/tmp")
    c = Containerd(base)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def _k8s_labels(pod: str, uid: str, container: str | None) -> dict[str, str]:
    labels = {"io.kubernetes.pod.name": pod, "io.kubernetes.pod.namespace": NS, "io.kubernetes.pod.uid": uid}
    if container is not None:
        labels["io.kubernetes.container.name"] = container
    return labels


def test_containerd_records_of_a_deployment_a_statefulset_and_a_sandbox(containerd: Containerd) -> None:
    web, db, sandbox = _hexid(), _hexid(), _hexid()
    containerd.ctr_create(web, _k8s_labels(DEPLOY_POD, WEB_UID, "web"))
    containerd.ctr_create(db, _k8s_labels(STS_POD, DB_UID, "postgres"))
    containerd.ctr_create(sandbox, {**_k8s_labels(DEPLOY_POD, WEB_UID, None), "io.cri-containerd.kind": "sandbox"})
    client = ContainerdClient(socket=containerd.address)
    try:
        assert client.inspect(web) == ContainerMetadata(
            runtime="containerd", runtime_id=web, id=f"/k8s/{NS}/{DEPLOY_POD}/web",
            labels=_k8s_labels(DEPLOY_POD, WEB_UID, "web"), namespace="k8s.io", pod_uid=WEB_UID)
        assert client.inspect(db) == ContainerMetadata(
            runtime="containerd", runtime_id=db, id=f"/k8s/{NS}/{STS_POD}/postgres",
            labels=_k8s_labels(STS_POD, DB_UID, "postgres"), namespace="k8s.io", pod_uid=DB_UID)
        assert client.inspect(sandbox) == ContainerMetadata(
            runtime="containerd", runtime_id=sandbox, id=None,
            labels={**_k8s_labels(DEPLOY_POD, WEB_UID, None), "io.cri-containerd.kind": "sandbox"},
            sandbox=True, namespace="k8s.io", pod_uid=WEB_UID)
        assert cg.app_id(f"/k8s/{NS}/{DEPLOY_POD}/web") == f"/k8s/{NS}/web"
        assert cg.app_id(f"/k8s/{NS}/{STS_POD}/postgres") == f"/k8s/{NS}/db"
    finally:
        client.close()


def test_containerd_cri_plugin_record_gives_log_path_image_and_restart_count(containerd: Containerd) -> None:
    # The record's shape is the one containerd's CRI plugin stores for a kubelet container:
    # kind label, image name, and the versioned JSON metadata extension with the CRI config.
    cid = _hexid()
    log_path = f"/var/log/pods/{NS}_{DEPLOY_POD}_{WEB_UID}/web/2.log"
    meta = {"Version": "v1", "Metadata": {
        "ID": cid, "Name": f"web_{DEPLOY_POD}_{NS}_{WEB_UID}_2", "SandboxID": _hexid(),
        "Config": {"metadata": {"name": "web", "attempt": 2}, "image": {"image": "nginx:1.25"},
                   "labels": _k8s_labels(DEPLOY_POD, WEB_UID, "web"),
                   "annotations": {"io.kubernetes.container.restartCount": "2"}, "log_path": "web/2.log"},
        "ImageRef": "sha256:" + "e" * 64, "LogPath": log_path, "StopSignal": "SIGQUIT"}}
    labels = {**_k8s_labels(DEPLOY_POD, WEB_UID, "web"), "io.cri-containerd.kind": "container"}
    containerd.api_create(cid, labels, image="docker.io/library/nginx:1.25", extensions={
        "io.cri-containerd.container.metadata":
            ("github.com/containerd/cri/pkg/store/container/Metadata", json.dumps(meta).encode())})
    client = ContainerdClient(socket=containerd.address)
    try:
        assert client.inspect(cid) == ContainerMetadata(
            runtime="containerd", runtime_id=cid, id=f"/k8s/{NS}/{DEPLOY_POD}/web",
            image="docker.io/library/nginx:1.25", labels=labels, log_path=log_path, log_format=LOG_CRI,
            restart_count=2, namespace="k8s.io", pod_uid=WEB_UID)
    finally:
        client.close()


def test_containerd_is_asked_in_k8s_io_then_moby_then_default(containerd: Containerd) -> None:
    in_default, in_moby, nowhere = _hexid(), _hexid(), _hexid()
    containerd.ctr_create(in_default, {"app": "batch"}, namespace="default")
    containerd.ctr_create(in_moby, {"com.docker.compose.service": "api"}, namespace="moby")
    client = ContainerdClient(socket=containerd.address)
    try:
        md = client.inspect(in_default)
        assert (md.namespace, md.labels, md.id, md.sandbox) == ("default", {"app": "batch"}, None, False)
        md = client.inspect(in_moby)
        assert (md.namespace, md.id) == ("moby", None)  # Docker's record: no name; Docker has it
        with pytest.raises(ContainerNotFound):
            client.inspect(nowhere)
        only_k8s = ContainerdClient(socket=containerd.address, namespaces=("k8s.io",))
        with pytest.raises(ContainerNotFound):
            only_k8s.inspect(in_default)
        only_k8s.close()
    finally:
        client.close()


def test_containerd_status_and_the_cri_version_call(containerd: Containerd) -> None:
    expected = _run(CONTAINERD, "--version").split()[2]  # "containerd <pkg> <version> <revision>"
    client = ContainerdClient(socket=containerd.address)
    st = client.status()
    assert (st.runtime, st.state, st.socket, st.version) == ("containerd", REACHABLE, containerd.address, expected)
    client.close()
    gone = ContainerdClient(socket=os.path.join(containerd.base, "nothing.sock"))
    assert gone.status().state == ABSENT
    # The CRI RuntimeService.Version call (what the CRI-O client asks for its version), on the
    # real CRI server containerd's CRI plugin runs on the same socket.
    conn = GrpcUnix("cri", 5)
    assert cri_version(conn, containerd.address) == f"containerd {expected}"
    conn.close()


# -------------------------------------------- cgroups at kubelet's paths -> ids ---


class KubeletCgroups:
    """v2 cgroups at the paths kubelet makes for a container id, under both cgroup drivers,
    each holding a process of the test's own."""

    def __init__(self) -> None:
        layout = cg.detect_layout()
        assert layout.unified, "needs a cgroup v2 (or hybrid) hierarchy"
        self.root = layout.unified
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def _makedirs(self, rel: str) -> str:
        path = self.root
        for part in rel.strip("/").split("/"):
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path)
                self.made.append(path)
        return path

    def cgroupfs(self, pod_uid: str, cid: str) -> str:
        return f"/kubepods/besteffort/pod{pod_uid}/{cid}"

    def systemd(self, pod_uid: str, cid: str) -> str:
        u = pod_uid.replace("-", "_")
        return (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/"
                f"cri-containerd-{cid}.scope")

    def spawn(self, rel: str) -> int:
        return self.start(rel, ["sleep", "120"]).pid

    def start(self, rel: str, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        """argv in the cgroup at `rel` (made if need be): the shell joins it, then execs argv."""
        procs = os.path.join(self._makedirs(rel), "cgroup.procs")
        p = subprocess.Popen(["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv], **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        assert wait_for(lambda: f"0::{rel}\n" in Path(f"/proc/{p.pid}/cgroup").read_text(), 5)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for path in reversed(self.made):
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def test_processes_in_kubelet_cgroups_of_both_drivers_resolve_to_pod_ids(containerd: Containerd) -> None:
    web, db, sandbox = _hexid(), _hexid(), _hexid()
    containerd.ctr_create(web, _k8s_labels(DEPLOY_POD, WEB_UID, "web"))
    containerd.ctr_create(db, _k8s_labels(STS_POD, DB_UID, "postgres"))
    containerd.ctr_create(sandbox, {**_k8s_labels(DEPLOY_POD, WEB_UID, None), "io.cri-containerd.kind": "sandbox"})
    cgs = KubeletCgroups()
    heard: list[tuple[str, str | None]] = []
    resolver = RuntimeResolver([ContainerdClient(socket=containerd.address),
                                DockerClient(socket="/nonexistent/docker.sock")],
                               lambda rid, md: heard.append((rid, md.id)))
    resolver.start()
    try:
        pids = {
            "web": cgs.spawn(cgs.systemd(WEB_UID, web)),  # systemd driver
            "db": cgs.spawn(cgs.cgroupfs(DB_UID, db)),  # cgroupfs driver
            "sandbox": cgs.spawn(cgs.cgroupfs(WEB_UID, sandbox)),
        }
        refs = {}
        for name, pid in pids.items():
            text = Path(f"/proc/{pid}/cgroup").read_text()
            ref = cg.classify(cg.cgroup_id(cg.parse_proc_cgroup(text)))
            assert ref is not None
            refs[name] = ref
            resolver.request(ref.runtime_id, ref.kind)
        assert (refs["web"].kind, refs["db"].kind, refs["sandbox"].kind) == ("cri-containerd", "docker", "docker")
        assert [r.runtime_id for r in refs.values()] == [web, db, sandbox]
        assert resolver.wait_idle(20)
        assert sorted(heard, key=str) == sorted([(web, f"/k8s/{NS}/{DEPLOY_POD}/web"),
                                                 (db, f"/k8s/{NS}/{STS_POD}/postgres"), (sandbox, None)], key=str)
        sb = resolver.get(sandbox)
        assert sb is not None and sb.sandbox and sb.id is None
        for rid, want in ((web, f"/k8s/{NS}/web"), (db, f"/k8s/{NS}/db")):
            md = resolver.get(rid)
            assert md is not None and md.id is not None and cg.app_id(md.id) == want
    finally:
        resolver.close()
        cgs.cleanup()


# ------------------------------------------------------ down, then up; counts ---


class Http2CountingProxy:
    """A unix socket in front of a gRPC server: forwards bytes both ways and counts the
    HEADERS frames clients send, one per call. `hold()` stops forwarding client bytes (the
    runtime seems to hang) until `release()`."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, listen: str, target: str) -> None:
        self.listen, self.target = listen, target
        self.calls = 0
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._srv = socket.socket(socket.AF_UNIX)
        self._srv.bind(listen)
        self._srv.listen(16)
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.target)
            self._conns += [c, s]
            threading.Thread(target=self._client_to_server, args=(c, s), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _client_to_server(self, src: socket.socket, dst: socket.socket) -> None:
        buf, preface = b"", False
        try:
            while data := src.recv(65536):
                buf += data
                out = b""
                if not preface:
                    if len(buf) < len(self.PREFACE):
                        continue
                    out, buf, preface = buf[:24], buf[24:], True
                while len(buf) >= 9:
                    n = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + n:
                        break
                    if buf[3] == 0x1:  # HEADERS: a new call
                        with self._lock:
                            self.calls += 1
                        self._open.wait()
                    out, buf = out + buf[: 9 + n], buf[9 + n :]
                dst.sendall(out)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._open.set()
        self._srv.close()
        for s in self._conns:
            s.close()


def test_containerd_down_at_start_then_up_gives_none_then_the_answer_once(containerd: Containerd) -> None:
    cid = _hexid()
    containerd.ctr_create(cid, _k8s_labels(DEPLOY_POD, WEB_UID, "web"))
    heard: list[tuple[str, str | None]] = []
    resolver = RuntimeResolver([ContainerdClient(socket=containerd.address)],
                               lambda rid, md: heard.append((rid, md.id)), backoff=0.1, max_backoff=0.4)
    containerd.stop()
    assert not os.path.exists(containerd.address)
    resolver.start()
    try:
        resolver.request(cid, "cri-containerd")
        assert wait_for(lambda: resolver.state(cid) == WAITING, 5)
        time.sleep(1.0)  # several backoff periods with the runtime down
        assert resolver.get(cid) is None and heard == []
        assert ContainerdClient(socket=containerd.address).status().state == ABSENT
        containerd.start()
        md = wait_for(lambda: resolver.get(cid), 10)
        assert md is not None and md.id == f"/k8s/{NS}/{DEPLOY_POD}/web"
        for _ in range(20):
            resolver.request(cid, "cri-containerd")
        time.sleep(0.5)
        assert heard == [(cid, f"/k8s/{NS}/{DEPLOY_POD}/web")]
    finally:
        resolver.close()
        if containerd.proc is None:
            containerd.start()


def test_containerd_refusing_then_answering_is_asked_again_with_backoff(containerd: Containerd) -> None:
    # The socket is there but nothing listens (the runtime restarts): "unreachable", then found.
    cid = _hexid()
    containerd.ctr_create(cid, _k8s_labels(STS_POD, DB_UID, "postgres"))
    containerd.stop()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(containerd.address)  # bound, never listening: connect() is refused
    heard: list[str] = []
    client = ContainerdClient(socket=containerd.address)
    resolver = RuntimeResolver([client], lambda rid, md: heard.append(rid), backoff=0.1, max_backoff=0.4)
    resolver.start()
    try:
        assert client.status().state == UNREACHABLE
        resolver.request(cid, "cri-containerd")
        assert wait_for(lambda: resolver.state(cid) == WAITING, 5)
        assert resolver.get(cid) is None
        dead.close()
        os.unlink(containerd.address)
        containerd.start()
        assert wait_for(lambda: resolver.get(cid), 10) is not None
        assert heard == [cid]
    finally:
        resolver.close()
        dead.close()
        if containerd.proc is None:
            containerd.start()


def test_thousand_lookups_one_request_each_bounded_cache_and_the_caller_never_waits(containerd: Containerd) -> None:
    ids = [_hexid() for _ in range(1000)]
    ch = grpc.insecure_channel("unix://" + containerd.address)
    for i, cid in enumerate(ids):
        containerd.api_create(cid, _k8s_labels(f"web-7d9f8b6c5d-{i:05d}", WEB_UID, "web"), channel=ch)
    ch.close()
    proxy_path = os.path.join(containerd.base, "count.sock")
    proxy = Http2CountingProxy(proxy_path, containerd.address)
    heard = []
    resolver = RuntimeResolver([ContainerdClient(socket=proxy_path, timeout=30)],
                               lambda rid, md: heard.append(rid), cache_size=1000)
    resolver.start()
    try:
        proxy.hold()  # the runtime hangs on the first lookup while the loop keeps calling
        latencies = []
        for _round in range(3):
            for cid in ids:
                t0 = time.perf_counter()
                resolver.request(cid, "cri-containerd")
                resolver.get(cid)
                latencies.append(time.perf_counter() - t0)
        latencies.sort()
        p50, p99, worst = (latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)], latencies[-1])
        print(f"\nrequest()+get() while the runtime hangs, 3000 calls: p50 {p50 * 1e6:.1f} µs, "
              f"p99 {p99 * 1e6:.1f} µs, max {worst * 1e6:.1f} µs")
        assert worst < 0.05, f"the caller waited {worst * 1e3:.1f} ms"
        assert proxy.calls <= 1 and all(resolver.get(c) is None for c in ids)
        proxy.release()
        assert resolver.wait_idle(60)
        print(f"1000 lookups: {proxy.calls} gRPC calls reached containerd")
        assert proxy.calls == 1000
        assert len(heard) == 1000 and set(heard) == set(ids)
        assert all(resolver.state(c) == FOUND for c in ids) and len(resolver) == 1000
        assert resolver.get(ids[7]).id == f"/k8s/{NS}/web-7d9f8b6c5d-00007/web"  # type: ignore[union-attr]
    finally:
        resolver.close()

    # A smaller cache: the oldest answers go, the cache never holds more than its bound, and
    # each container is still asked for once.
    before = proxy.calls
    small = RuntimeResolver([ContainerdClient(socket=proxy_path)], cache_size=100)
    small.start()
    try:
        for i in range(0, 1000, 100):
            for cid in ids[i : i + 100]:
                small.request(cid, "cri-containerd")
            assert small.wait_idle(30)
            assert len(small) <= 100
        assert proxy.calls - before == 1000
        assert (len(small), small.evictions, small.dropped) == (100, 900, 0)
        assert small.get(ids[0]) is None and small.get(ids[-1]) is not None
    finally:
        small.close()
        proxy.close()


# --------------------------------------------------------------------- Docker ---


class Dockerd:
    def __init__(self, base: str) -> None:
        _need(DOCKERD, "docker.io")
        _need(DOCKER, "docker.io")
        self.base = base
        self.sock = os.path.join(base, "d.sock")
        self.data = os.path.join(base, "data")
        self.log = Path(base, "dockerd.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        b = self.base
        with open(self.log, "ab") as out:
            # `fake` is an OCI runtime that always fails: `docker start` with it sets up the
            # json-file logger (so Docker records LogPath) and never makes a cgroup or process.
            self.proc = subprocess.Popen(
                [DOCKERD, "--iptables=false", "--bridge=none", "--data-root", self.data,
                 "--exec-root", f"{b}/exec", "--pidfile", f"{b}/d.pid", "-H", f"unix://{self.sock}",
                 "--debug", "--add-runtime", "fake=/bin/false"], stdout=out, stderr=out)
        _wait_socket(self.sock, self.proc, 60, self.log)

    def docker(self, *args: str, check: bool = True) -> str:
        if check:
            return _run(DOCKER, "-H", f"unix://{self.sock}", *args).strip()
        p = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], capture_output=True, text=True, timeout=60)
        return p.stdout.strip()

    def api_calls(self, url: str) -> int:
        return self.log.read_text().count(f'msg="Calling GET {url}"')

    def stop(self) -> None:
        _stop(self.proc)


def _rootfs_tar(path: str) -> None:
    with tarfile.open(path, "w") as tar:
        tar.add("/bin/true", arcname="bin/true")
        info = tarfile.TarInfo("etc/hostname")
        data = b"test\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    base = tempfile.mkdtemp(prefix="rt-dk-", dir="/tmp")
    d = Dockerd(base)
    try:
        d.start()
        _rootfs_tar(os.path.join(base, "rootfs.tar"))
        d.docker("import", os.path.join(base, "rootfs.tar"), "testimg:1")
        yield d
    finally:
        d.stop()
        subprocess.run(["umount", "-R", d.data], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_docker_containers_named_image_logpath_and_restart_count(dockerd: Dockerd) -> None:
    cid = dockerd.docker("create", "--name", "web-1", "--label", "tier=front", "testimg:1", "/bin/true")
    client = DockerClient(socket=dockerd.sock)
    md = client.inspect(cid)
    assert md == ContainerMetadata(runtime="docker", runtime_id=cid, id="/docker/web-1", name="web-1",
                                   image="testimg:1", labels={"tier": "front"}, restart_count=0)
    # Never started: Docker has no log file for it yet. After a start (refused by the failing
    # runtime, no process made) Docker has set its json-file LogPath.
    dockerd.docker("create", "--name", "web-2", "--runtime", "fake", "testimg:1", "/bin/true")
    cid2 = dockerd.docker("inspect", "-f", "{{.Id}}", "web-2")
    dockerd.docker("start", "web-2", check=False)
    docker_says = dockerd.docker("inspect", "-f", "{{.LogPath}}", "web-2")
    assert docker_says == os.path.join(dockerd.data, "containers", cid2, f"{cid2}-json.log")
    md2 = client.inspect(cid2)
    assert (md2.id, md2.image, md2.log_path, md2.log_format) == ("/docker/web-2", "testimg:1", docker_says, LOG_DOCKER_JSON)
    assert md2.restart_count == 0
    with pytest.raises(ContainerNotFound):
        client.inspect(_hexid())
    st = client.status()
    assert (st.state, st.version) == (REACHABLE, dockerd.docker("version", "--format", "{{.Server.Version}}"))


def test_docker_kubernetes_sandbox_and_nomad_containers(dockerd: Dockerd) -> None:
    k8s = dockerd.docker(
        "create", "--name", f"k8s_web_{DEPLOY_POD}_{NS}_{WEB_UID}_3",
        "--label", f"io.kubernetes.pod.name={DEPLOY_POD}", "--label", f"io.kubernetes.pod.namespace={NS}",
        "--label", f"io.kubernetes.pod.uid={WEB_UID}", "--label", "io.kubernetes.container.name=web",
        "--label", "annotation.io.kubernetes.container.restartCount=3", "testimg:1", "/bin/true")
    pause = dockerd.docker(
        "create", "--name", f"k8s_POD_{DEPLOY_POD}_{NS}_{WEB_UID}_0",
        "--label", f"io.kubernetes.pod.name={DEPLOY_POD}", "--label", f"io.kubernetes.pod.namespace={NS}",
        "--label", "io.kubernetes.container.name=POD", "--label", "io.kubernetes.docker.type=podsandbox",
        "testimg:1", "/bin/true")
    nomad = dockerd.docker(
        "create", "--name", "api-5c3b", "-e", "NOMAD_ALLOC_ID=5c3b", "-e", "NOMAD_GROUP_NAME=g",
        "-e", "NOMAD_JOB_NAME=api", "-e", "NOMAD_NAMESPACE=prod", "-e", "NOMAD_TASK_NAME=server",
        "-e", "DB_PASSWORD=hunter2", "testimg:1", "/bin/true")
    client = DockerClient(socket=dockerd.sock)
    md = client.inspect(k8s)
    assert (md.id, md.restart_count, md.sandbox, md.pod_uid) == (f"/k8s/{NS}/{DEPLOY_POD}/web", 3, False, WEB_UID)
    md = client.inspect(pause)
    assert (md.id, md.sandbox) == (None, True)
    md = client.inspect(nomad)
    assert md.id == "/nomad/prod/api/g/5c3b/server"
    assert "hunter2" not in repr(md)


def test_docker_resolver_asks_docker_once_per_container(dockerd: Dockerd) -> None:
    ids = [dockerd.docker("create", "--name", f"batch-{i}", "testimg:1", "/bin/true") for i in range(20)]
    before = {cid: dockerd.api_calls(f"/containers/{cid}/json") for cid in ids}
    resolver = RuntimeResolver([DockerClient(socket=dockerd.sock),
                                ContainerdClient(socket="/nonexistent/containerd.sock")])
    resolver.start()
    try:
        for _ in range(5):
            for cid in ids:
                resolver.request(cid, "docker")
        assert resolver.wait_idle(30)
        assert [resolver.get(c).id for c in ids] == [f"/docker/batch-{i}" for i in range(20)]  # type: ignore[union-attr]
        time.sleep(0.2)
        assert {cid: dockerd.api_calls(f"/containers/{cid}/json") - before[cid] for cid in ids} == dict.fromkeys(ids, 1)
    finally:
        resolver.close()


# --------------------------------------------------------------------- Podman ---


class PodmanService:
    def __init__(self, base: str) -> None:
        _need(PODMAN, "podman")
        self.base = base
        self.sock = os.path.join(base, "p.sock")
        self.log = Path(base, "podman.log")
        self.global_args = ["--root", f"{base}/root", "--runroot", f"{base}/run", "--storage-driver", "vfs",
                            "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--tmpdir", f"{base}/tmp"]
        self.proc: subprocess.Popen[bytes] | None = None

    def podman(self, *args: str) -> str:
        return _run(PODMAN, *self.global_args, *args).strip()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([PODMAN, *self.global_args, "system", "service", "--time=0",
                                          f"unix://{self.sock}"], stdout=out, stderr=out)
        _wait_socket(self.sock, self.proc, 30, self.log)

    def stop(self) -> None:
        _stop(self.proc)


@pytest.fixture(scope="module")
def podman() -> Iterator[PodmanService]:
    base = tempfile.mkdtemp(prefix="rt-pm-", dir="/tmp")
    p = PodmanService(base)
    try:
        _rootfs_tar(os.path.join(base, "rootfs.tar"))
        p.podman("import", os.path.join(base, "rootfs.tar"), "localhost/testimg:1")
        p.start()
        yield p
    finally:
        p.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_podman_container_pod_member_and_infra(podman: PodmanService) -> None:
    cid = podman.podman("create", "--name", "pweb", "--label", "tier=front", "localhost/testimg:1", "/bin/true")
    podman.podman("pod", "create", "--name", "shop", "--infra-image", "localhost/testimg:1",
                  "--infra-command", "/bin/true")
    member = podman.podman("create", "--pod", "shop", "--name", "shop-api", "localhost/testimg:1", "/bin/true")
    infra = podman.podman("pod", "inspect", "shop", "--format", "{{.InfraContainerID}}")
    log_path = podman.podman("inspect", "--format", "{{.HostConfig.LogConfig.Path}}", cid)
    assert podman.podman("inspect", "--format", "{{.HostConfig.LogConfig.Type}}", cid) == "k8s-file"
    client = PodmanClient(socket=podman.sock)
    assert client.inspect(cid) == ContainerMetadata(
        runtime="podman", runtime_id=cid, id="/podman/pweb", name="pweb", image="localhost/testimg:1",
        labels={"tier": "front"}, log_path=log_path, log_format=LOG_CRI, restart_count=0)
    md = client.inspect(member)
    assert (md.id, md.sandbox) == ("/podman/shop-api", False)
    md = client.inspect(infra)
    assert (md.id, md.sandbox) == (None, True)
    with pytest.raises(ContainerNotFound):
        client.inspect(_hexid())
    st = client.status()
    assert (st.state, st.version) == (REACHABLE, _run(PODMAN, "--version").split()[-1])


# ------------------------------------------------ CRI-O (recorded answers) ---

# CRI-O is not packaged in Debian. These are its inspect API's answers in the format CRI-O
# documents (pkg/types.ContainerInfo / CrioInfo), served by a test-only server on a unix
# socket: a Deployment pod's container, its infra (sandbox) container, and /info.
CRIO_WEB = "1" * 64
CRIO_SANDBOX = "2" * 64
CRIO_LOG = f"/var/log/pods/{NS}_{DEPLOY_POD}_{WEB_UID}/web/1.log"
CRIO_ANSWERS = {
    f"/containers/{CRIO_WEB}": {
        "name": f"k8s_web_{DEPLOY_POD}_{NS}_{WEB_UID}_1", "pid": 4242,
        "image": "docker.io/library/nginx:1.25", "image_ref": "docker.io/library/nginx@sha256:" + "a" * 64,
        "created_time": 1718000000000000000,
        "labels": {"io.kubernetes.container.name": "web", "io.kubernetes.pod.name": DEPLOY_POD,
                   "io.kubernetes.pod.namespace": NS, "io.kubernetes.pod.uid": WEB_UID},
        "annotations": {"io.kubernetes.container.hash": "5e0b5c2a", "io.kubernetes.container.restartCount": "1",
                        "io.kubernetes.container.terminationMessagePath": "/dev/termination-log"},
        "crio_annotations": {"io.kubernetes.cri-o.ContainerType": "container",
                             "io.kubernetes.cri-o.Volumes": "[]", "io.kubernetes.cri-o.LogPath": CRIO_LOG},
        "log_path": CRIO_LOG, "root": "/var/lib/containers/storage/overlay/" + "b" * 64 + "/merged",
        "sandbox": CRIO_SANDBOX, "ip_addresses": ["10.85.0.12"]},
    f"/containers/{CRIO_SANDBOX}": {
        "name": f"k8s_POD_{DEPLOY_POD}_{NS}_{WEB_UID}_0", "pid": 4200, "image": "registry.k8s.io/pause:3.9",
        "created_time": 1717999990000000000,
        "labels": {"io.kubernetes.container.name": "POD", "io.kubernetes.pod.name": DEPLOY_POD,
                   "io.kubernetes.pod.namespace": NS, "io.kubernetes.pod.uid": WEB_UID},
        "annotations": {}, "crio_annotations": {"io.kubernetes.cri-o.ContainerType": "sandbox"},
        "log_path": "", "root": "", "sandbox": CRIO_SANDBOX, "ip_addresses": ["10.85.0.12"]},
    "/info": {"storage_driver": "overlay", "storage_root": "/var/lib/containers/storage",
              "cgroup_driver": "systemd", "default_id_mappings": {"uids": None, "gids": None}},
}


class _RecordedCrio(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    hits: list[str]


class _CrioHandler(http.server.BaseHTTPRequestHandler):
    def address_string(self) -> str:
        return "crio"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        doc = CRIO_ANSWERS.get(self.path)
        if doc is None:
            body = f"can't find the container with id {self.path.rsplit('/', 1)[-1]}\n".encode()
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        else:
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def recorded_crio() -> Iterator[_RecordedCrio]:
    base = tempfile.mkdtemp(prefix="rt-crio-", dir="/tmp")
    srv = _RecordedCrio(os.path.join(base, "crio.sock"), _CrioHandler)
    srv.hits = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        shutil.rmtree(base, ignore_errors=True)


def test_crio_recorded_answers_container_sandbox_and_status(recorded_crio: _RecordedCrio) -> None:
    sock = str(recorded_crio.server_address)
    client = CrioClient(socket=sock, timeout=2)
    assert client.inspect(CRIO_WEB) == ContainerMetadata(
        runtime="crio", runtime_id=CRIO_WEB, id=f"/k8s/{NS}/{DEPLOY_POD}/web",
        image="docker.io/library/nginx:1.25", labels=CRIO_ANSWERS[f"/containers/{CRIO_WEB}"]["labels"],
        log_path=CRIO_LOG, log_format=LOG_CRI, restart_count=1, pod_uid=WEB_UID)
    md = client.inspect(CRIO_SANDBOX)
    assert (md.id, md.sandbox, md.image) == (None, True, "registry.k8s.io/pause:3.9")
    with pytest.raises(ContainerNotFound):
        client.inspect("3" * 64)
    st = client.status()
    # /info answers; the recorded server does not speak the CRI gRPC API, so no version.
    assert (st.state, st.socket, st.version, st.detail) == (REACHABLE, sock, None, "cgroup driver systemd")
    resolver = RuntimeResolver([client])
    resolver.start()
    try:
        for _ in range(3):
            resolver.request(CRIO_WEB, "crio")
        assert resolver.wait_idle(10)
        assert resolver.get(CRIO_WEB).id == f"/k8s/{NS}/{DEPLOY_POD}/web"  # type: ignore[union-attr]
        assert recorded_crio.hits.count(f"/containers/{CRIO_WEB}") == 2  # one inspect above, one lookup
    finally:
        resolver.close()


# ------------------------------------------- the agent: one id across signals ---

# A process of the test's own in a container's cgroup: on each "HOST PORT N" line from the
# test it makes N TCP connections, then answers "ok".
CONNECTOR = (sys.executable, "-c", """
import socket, sys
for line in sys.stdin:
    host, port, n = line.split()
    for _ in range(int(n)):
        socket.create_connection((host, int(port))).close()
    print("ok", flush=True)
""")
ONLY = ("--disable-runtime", "crio", "--disable-runtime", "podman")  # asked: containerd and Docker


class Listener:
    """A TCP server on loopback that accepts and closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.close()

    def close(self) -> None:
        self.sock.close()


class Connector:
    def __init__(self, cgs: KubeletCgroups, rel: str) -> None:
        self.p = cgs.start(rel, list(CONNECTOR), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def connect(self, port: int, n: int) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(f"127.0.0.1 {port} {n}\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "ok"


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _spans_to(agent: AgentProcess, dest: str, want: int) -> list[dict] | None:
    """The spans of HTTP requests to `dest` (service, container.id, URL), once `want` are stored."""
    got = rows(agent, "SELECT ServiceName AS s, ResourceAttributes['container.id'] AS c, SpanAttributes['http.url'] AS u "
                      f"FROM otel_traces WHERE startsWith(SpanAttributes['http.url'], 'http://{dest}/')")
    return got if len(got) >= want else None


def _now_rfc3339() -> str:
    """Now, as runtimes stamp log lines (a line older than the logs' TTL would not be kept)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000000001Z"


def _container_of(agent: AgentProcess, pid: int) -> str | None:
    found = agent.processes(pid)
    return found[0]["container_id"] if found else None


def _connects(agent: AgentProcess, cid: str, port: int) -> float | None:
    return agent.value("container_net_tcp_successful_connects_total", container_id=cid,
                       destination=f"127.0.0.1:{port}")


def _ids(agent: AgentProcess) -> set[str]:
    return {lb["container_id"] for n, lb, _ in agent.metrics() if n == "container_info"}


@pytest.mark.agent_without("profiling")  # its HTTP counts and spans need L7
def test_agent_names_kubelet_containers_by_containerd_and_never_reports_the_sandbox(
        containerd: Containerd, dockerd: Dockerd, agent_factory: AgentFactory) -> None:
    web, db, sandbox = _hexid(), _hexid(), _hexid()
    web_id, db_id = f"/k8s/{NS}/{DEPLOY_POD}/web", f"/k8s/{NS}/{STS_POD}/postgres"
    # The web container's record as containerd's CRI plugin keeps it, with the CRI log path:
    # in a temporary directory here, where no directory walk of the agent looks, so a line
    # read from it can only come through containerd's answer.
    log_path = os.path.join(containerd.base, "pods", f"{NS}_{DEPLOY_POD}_{WEB_UID}", "web", "0.log")
    os.makedirs(os.path.dirname(log_path))
    meta = {"Version": "v1", "Metadata": {"ID": web, "LogPath": log_path,
                                          "Config": {"metadata": {"name": "web", "attempt": 0}}}}
    containerd.api_create(web, {**_k8s_labels(DEPLOY_POD, WEB_UID, "web"), "io.cri-containerd.kind": "container"},
                          image="docker.io/library/nginx:1.25", extensions={
                              "io.cri-containerd.container.metadata":
                                  ("github.com/containerd/cri/pkg/store/container/Metadata", json.dumps(meta).encode())})
    containerd.ctr_create(db, _k8s_labels(STS_POD, DB_UID, "postgres"))
    containerd.ctr_create(sandbox, {**_k8s_labels(DEPLOY_POD, WEB_UID, None), "io.cri-containerd.kind": "sandbox"})
    cgs, server = KubeletCgroups(), Listener()
    try:
        w = Connector(cgs, cgs.systemd(WEB_UID, web))  # systemd driver: cri-containerd-<id>.scope
        d = Connector(cgs, cgs.cgroupfs(DB_UID, db))  # cgroupfs driver: a bare id (Docker is asked first)
        pause = cgs.spawn(cgs.cgroupfs(WEB_UID, sandbox))
        sandbox_derived = f"/k8s-cgroup/{WEB_UID}/{sandbox[:12]}"
        # The cgroups exist before the agent starts: start-up waits (up to 2 s) for the
        # runtimes' answers before the first scrape, so the sandbox is never reported, not even
        # under its cgroup-derived id, and neither id of the others is a cgroup-derived one.
        agent = agent_factory("--containerd-socket", containerd.address, "--docker-socket", dockerd.sock, *ONLY,
                              "--min-container-age", "5s")
        t0, seen = time.monotonic(), set()
        while time.monotonic() - t0 < 10:
            seen |= _ids(agent)
            time.sleep(0.2)
        assert {web_id, db_id} <= seen
        assert sandbox_derived not in seen and not [i for i in seen if i.startswith("/k8s-cgroup/")], seen
        assert _container_of(agent, pause) is None
        assert (_container_of(agent, w.pid), _container_of(agent, d.pid)) == (web_id, db_id)
        assert agent.value("container_info", container_id=web_id, app_id=f"/k8s/{NS}/web",
                           image="docker.io/library/nginx:1.25") == 1
        assert agent.value("container_info", container_id=db_id, app_id=f"/k8s/{NS}/db", image="") == 1
        w.connect(server.port, 7)
        d.connect(server.port, 3)
        assert wait_for(lambda: _connects(agent, web_id, server.port) == 7, 15), agent.log()[-3000:]
        assert wait_for(lambda: _connects(agent, db_id, server.port) == 3, 15)
        time.sleep(1.5)
        assert (_connects(agent, web_id, server.port), _connects(agent, db_id, server.port)) == (7, 3)
        assert agent.value("container_net_tcp_successful_connects_total", app_id=f"/k8s/{NS}/web",
                           destination=f"127.0.0.1:{server.port}") == 7
        # An HTTP request from a new process of the web container: counted and traced under
        # the same id, its span's service the workload.
        http_srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
        threading.Thread(target=http_srv.serve_forever, daemon=True).start()
        try:
            client = cgs.start(cgs.systemd(WEB_UID, web), [*L7_CLIENT, "wait", "http", "127.0.0.1",
                               str(http_srv.server_port), "/orders:3"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
            assert client.stdout is not None and client.stdin is not None
            assert json.loads(client.stdout.readline()) == {"ready": True}
            # its requests once the agent has it in the container (on a loaded machine its exec
            # event may otherwise come after its connect's)
            assert wait_for(lambda: _container_of(agent, client.pid) == web_id, 15)
            client.stdin.write("go\n")
            client.stdin.flush()
            assert json.loads(client.stdout.readline())
            dest = f"127.0.0.1:{http_srv.server_port}"
            assert wait_for(lambda: agent.value("container_http_requests_total", container_id=web_id,
                                                app_id=f"/k8s/{NS}/web", destination=dest) == 3, 20), agent.log()[-3000:]
            got = wait_for(lambda: _spans_to(agent, dest, 3), 30)
            assert got == [{"s": f"/k8s/{NS}/web", "c": web_id, "u": f"http://{dest}/orders"}] * 3
        finally:
            http_srv.shutdown()
            http_srv.server_close()
        # The runtime writes the container's output to its CRI log file; the agent follows
        # the path containerd named, under the container's one id.
        with open(log_path, "a") as f:
            f.write(f"{_now_rfc3339()} stdout F ERROR payment failed for order 42\n")
        lbl = {"container_id": web_id, "app_id": f"/k8s/{NS}/web", "source": "stdout/stderr", "level": "error"}
        assert wait_for(lambda: agent.value("container_log_messages_total", **lbl) == 1, 20), agent.log()[-3000:]
        stored = wait_for(lambda: rows(agent, "SELECT ServiceName AS s, Body AS b FROM otel_logs "
                                              f"WHERE ResourceAttributes['container.id'] = '{web_id}'"), 15)
        assert stored == [{"s": f"/k8s/{NS}/web", "b": "ERROR payment failed for order 42"}]
        assert not [i for i in _ids(agent) if i.startswith("/k8s-cgroup/")]
        assert agent.value("coroot_agent_runtime_lookups_total", runtime="containerd", result="found") == 3
    finally:
        server.close()
        cgs.cleanup()


def test_agent_with_containerd_down_at_start_renames_when_it_comes_up_and_loses_no_count(
        containerd: Containerd, agent_factory: AgentFactory) -> None:
    cid = _hexid()
    new_id, derived = f"/k8s/{NS}/{STS_POD}/postgres", f"/k8s-cgroup/{DB_UID}/{cid[:12]}"
    containerd.ctr_create(cid, _k8s_labels(STS_POD, DB_UID, "postgres"))
    cgs, server = KubeletCgroups(), Listener()
    containerd.stop()
    try:
        c = Connector(cgs, cgs.systemd(DB_UID, cid))
        agent = agent_factory("--containerd-socket", containerd.address, "--disable-runtime", "docker", *ONLY)
        assert wait_for(lambda: _container_of(agent, c.pid) == derived, 10)
        c.connect(server.port, 5)
        assert wait_for(lambda: _connects(agent, derived, server.port) == 5, 15), agent.log()[-3000:]
        assert agent.value("container_info", container_id=derived, app_id="") == 1
        containerd.start()
        t0 = time.monotonic()
        assert wait_for(lambda: _container_of(agent, c.pid) == new_id, 45), agent.log()[-3000:]
        print(f"\nrenamed {time.monotonic() - t0:.1f}s after containerd came up (the resolver's backoff)")
        assert wait_for(lambda: _connects(agent, new_id, server.port) == 5, 5)
        assert _connects(agent, derived, server.port) is None and derived not in _ids(agent)
        c.connect(server.port, 4)
        assert wait_for(lambda: _connects(agent, new_id, server.port) == 9, 15)
        time.sleep(1.5)
        assert _connects(agent, new_id, server.port) == 9
        assert agent.value("container_info", container_id=new_id, app_id=f"/k8s/{NS}/db") == 1
    finally:
        server.close()
        cgs.cleanup()
        if containerd.proc is None:
            containerd.start()


def test_agent_names_docker_containers_with_their_image_and_json_file_log(
        dockerd: Dockerd, agent_factory: AgentFactory) -> None:
    cid = dockerd.docker("create", "--name", "shop-api", "--runtime", "fake", "testimg:1", "/bin/true")
    dockerd.docker("start", "shop-api", check=False)  # refused by the failing runtime; LogPath is set
    log_path = dockerd.docker("inspect", "-f", "{{.LogPath}}", "shop-api")
    assert log_path.startswith(dockerd.data)
    cgs, server = KubeletCgroups(), Listener()
    try:
        c = Connector(cgs, f"/system.slice/docker-{cid}.scope")  # Docker's systemd cgroup driver
        agent = agent_factory("--docker-socket", dockerd.sock, "--disable-runtime", "containerd", *ONLY)
        assert wait_for(lambda: _container_of(agent, c.pid) == "/docker/shop-api", 20), agent.log()[-3000:]
        assert agent.value("container_info", container_id="/docker/shop-api", app_id="", image="testimg:1") == 1
        c.connect(server.port, 6)
        assert wait_for(lambda: _connects(agent, "/docker/shop-api", server.port) == 6, 15)
        with open(log_path, "a") as f:
            f.write(json.dumps({"log": "WARNING low stock for item 7\n", "stream": "stderr",
                                "time": _now_rfc3339()}) + "\n")
        lbl = {"container_id": "/docker/shop-api", "source": "stdout/stderr", "level": "warning"}
        assert wait_for(lambda: agent.value("container_log_messages_total", **lbl) == 1, 20), agent.log()[-3000:]
        assert f"/docker/{cid[:12]}" not in _ids(agent)
    finally:
        server.close()
        cgs.cleanup()


def test_check_has_a_row_per_runtime_reachable_unreachable_absent_disabled(
        containerd: Containerd, dockerd: Dockerd) -> None:
    base = tempfile.mkdtemp(prefix="rt-chk-", dir="/tmp")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(os.path.join(base, "crio.sock"))  # a socket nothing listens on: connect() is refused
    try:
        r = coroot_agent("check", "--no-probe", "--containerd-socket", containerd.address,
                         "--docker-socket", dockerd.sock, "--crio-socket", os.path.join(base, "crio.sock"),
                         "--podman-socket", os.path.join(base, "none.sock"), "--storage-path", base)
        rows = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines() if line.startswith("runtime: ")}
        ctd = _run(CONTAINERD, "--version").split()[2]
        dk = dockerd.docker("version", "--format", "{{.Server.Version}}")
        assert rows["runtime: containerd"].split() == ["runtime:", "containerd", "ok", ctd, "at", containerd.address]
        assert rows["runtime: docker"].split() == ["runtime:", "docker", "ok", dk, "at", dockerd.sock]
        assert rows["runtime: crio"].split()[2:4] == ["warn", "unreachable"]
        assert rows["runtime: podman"].split()[2:4] == ["ok", "absent"]
        assert "fix: is crio running?" in r.stdout
        r = coroot_agent("check", "--no-probe", "--disable-runtime", "docker", "--storage-path", base)
        assert "runtime: docker      ok    disabled (--disable-runtime)" in r.stdout
    finally:
        dead.close()
        shutil.rmtree(base, ignore_errors=True)


def _pod_suffix(i: int) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # what the ReplicaSet controller draws from
    out = ""
    for _ in range(5):
        i, r = divmod(i, len(alphabet))
        out += alphabet[r]
    return out


def test_thousand_new_containers_one_lookup_each_and_the_poll_thread_never_waits(
        containerd: Containerd, tmp_path: Path) -> None:
    """The registry and resolver as the agent wires them, with containerd behind a counting
    proxy; the 1,000 processes are files of a procfs laid out in a temporary directory (1,000
    real processes in 1,000 cgroups would be the test's load, not the agent's)."""
    from agent.containers.registry import Registry
    from agent.containers.restarts import RestartCounter
    from agent.net.public import PublicFilter
    from agent.net.tcp import TcpTracker

    ids = [_hexid() for _ in range(1000)]
    pods = [f"api-7d9f8b6c5d-{_pod_suffix(i)}" for i in range(1000)]  # a ReplicaSet's pod names
    ch = grpc.insecure_channel("unix://" + containerd.address)
    for pod, cid in zip(pods, ids, strict=True):
        containerd.api_create(cid, _k8s_labels(pod, WEB_UID, "api"), channel=ch)
    ch.close()
    unified = tmp_path / "cgroup"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("")
    cgs = KubeletCgroups.__new__(KubeletCgroups)
    for i, cid in enumerate(ids):
        rel = cgs.systemd(WEB_UID, cid)
        d = tmp_path / "proc" / str(100000 + i)
        d.mkdir(parents=True)
        (d / "stat").write_text(f"{100000 + i} (api) S " + " ".join(["0"] * 17 + ["4242"] + ["0"] * 20) + "\n")
        (d / "cgroup").write_text(f"0::{rel}\n")
        (d / "environ").write_bytes(b"")
    proxy_path = os.path.join(containerd.base, "count1k.sock")
    proxy = Http2CountingProxy(proxy_path, containerd.address)
    resolver = RuntimeResolver([ContainerdClient(socket=proxy_path, timeout=30)], cache_size=1000)
    reg = Registry(procfs=str(tmp_path / "proc"), cgroupfs=str(unified), min_container_age=0)
    reg.use_resolver(resolver)
    restarts = RestartCounter(reg)
    tcp = TcpTracker(reg, PublicFilter(["0.0.0.0/0"]), (32768, 60999), procfs=str(tmp_path / "proc"))
    reg.subscribe(restarts.on_process)
    reg.subscribe_renames(restarts.on_rename)
    reg.subscribe_renames(tcp.on_rename)
    resolver.start()
    try:
        proxy.hold()  # containerd hangs while the 1,000 containers appear
        t0 = time.perf_counter()
        assert reg.scan() == 1000
        scan = time.perf_counter() - t0
        assert len(reg.containers()) == 1000 and all(c.id.startswith("/k8s-cgroup/") for c in reg.containers())
        proxy.release()
        ticks, t0 = [], time.monotonic()
        while time.monotonic() - t0 < 60:
            t = time.perf_counter()
            reg.housekeeping()  # what the poll thread does once a second; here every 50 ms
            ticks.append(time.perf_counter() - t)
            if reg.renames == 1000:
                break
            time.sleep(0.05)
        took = time.monotonic() - t0
        print(f"\n1,000 new containers: scan (1,000 requests queued, containerd hanging) {scan * 1e3:.1f} ms; "
              f"named in {took:.1f} s by {proxy.calls} gRPC calls; {len(ticks)} housekeeping ticks, "
              f"longest {max(ticks) * 1e3:.1f} ms (renames applied with the TCP and restart listeners), "
              f"cache {len(resolver)} of {resolver.cache_size}")
        assert reg.renames == 1000 and proxy.calls == 1000
        assert sorted(c.id for c in reg.containers()) == sorted(f"/k8s/{NS}/{pod}/api" for pod in pods)
        assert {c.app_id for c in reg.containers()} == {f"/k8s/{NS}/api"}
        assert len(resolver) == 1000 and resolver.evictions == 0
        assert scan < 5, "the scan waited for the runtime"
    finally:
        resolver.close()
        proxy.close()


def test_agent_names_podman_containers_and_crio_pods_from_recorded_answers(
        podman: PodmanService, recorded_crio: _RecordedCrio, agent_factory: AgentFactory) -> None:
    # Podman: a real container record (never started); the test's process sits in the cgroup
    # rootful Podman makes for it. CRI-O: its recorded answers (CRI-O is not packaged in
    # Debian), for a process in the cgroup kubelet's systemd driver makes for a CRI-O container.
    pid_ = podman.podman("create", "--name", "shop-worker", "localhost/testimg:1", "/bin/true")
    log_path = podman.podman("inspect", "--format", "{{.HostConfig.LogConfig.Path}}", pid_)
    cgs, server = KubeletCgroups(), Listener()
    u = WEB_UID.replace("-", "_")
    crio_web = (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/"
                f"crio-{CRIO_WEB}.scope")
    crio_pause = crio_web.replace(CRIO_WEB, CRIO_SANDBOX)
    try:
        p = Connector(cgs, f"/machine.slice/libpod-{pid_}.scope")
        c = Connector(cgs, crio_web)
        pause = cgs.spawn(crio_pause)
        agent = agent_factory("--podman-socket", podman.sock, "--crio-socket", str(recorded_crio.server_address),
                              "--disable-runtime", "docker", "--disable-runtime", "containerd")
        crio_id = f"/k8s/{NS}/{DEPLOY_POD}/web"
        assert wait_for(lambda: _container_of(agent, p.pid) == "/podman/shop-worker", 20), agent.log()[-3000:]
        assert wait_for(lambda: _container_of(agent, c.pid) == crio_id, 20), agent.log()[-3000:]
        assert wait_for(lambda: _container_of(agent, pause) is None, 10)
        assert agent.value("container_info", container_id="/podman/shop-worker", app_id="",
                           image="localhost/testimg:1") == 1
        assert agent.value("container_info", container_id=crio_id, app_id=f"/k8s/{NS}/web",
                           image="docker.io/library/nginx:1.25") == 1
        p.connect(server.port, 2)
        c.connect(server.port, 4)
        assert wait_for(lambda: _connects(agent, "/podman/shop-worker", server.port) == 2, 15)
        assert wait_for(lambda: _connects(agent, crio_id, server.port) == 4, 15)
        # Podman's k8s-file log driver writes the CRI line format
        with open(log_path, "a") as f:
            f.write(f"{_now_rfc3339()} stdout F ERROR queue stalled\n")
        lbl = {"container_id": "/podman/shop-worker", "source": "stdout/stderr", "level": "error"}
        assert wait_for(lambda: agent.value("container_log_messages_total", **lbl) == 1, 20), agent.log()[-3000:]
        ids = _ids(agent)
        assert not [i for i in ids if i.startswith(("/k8s-cgroup/", "/podman/" + pid_[:12]))], ids
        assert recorded_crio.hits.count(f"/containers/{CRIO_WEB}") == 1  # one lookup
    finally:
        server.close()
        cgs.cleanup()


def test_agent_with_a_hanging_containerd_keeps_derived_ids_answers_and_stops_in_time(
        containerd: Containerd, agent_factory: AgentFactory) -> None:
    cid = _hexid()
    derived = f"/k8s-cgroup/{WEB_UID}/{cid[:12]}"
    containerd.ctr_create(cid, _k8s_labels(DEPLOY_POD, WEB_UID, "web"))
    proxy_path = os.path.join(containerd.base, "hang.sock")
    proxy = Http2CountingProxy(proxy_path, containerd.address)
    proxy.hold()  # every call reaches the proxy and waits there: a runtime that hangs
    cgs, server = KubeletCgroups(), Listener()
    try:
        c = Connector(cgs, cgs.systemd(WEB_UID, cid))
        agent = agent_factory("--containerd-socket", proxy_path, "--disable-runtime", "docker", *ONLY)
        assert "container runtimes: lookups still running after 2s" in agent.log()
        assert _container_of(agent, c.pid) == derived
        c.connect(server.port, 3)
        t0 = time.monotonic()
        assert wait_for(lambda: _connects(agent, derived, server.port) == 3, 15)
        print(f"\nconnects counted {time.monotonic() - t0:.1f}s after they were made, containerd hanging")
        assert proxy.calls >= 1
        t0 = time.monotonic()
        assert agent.stop() == 0
        took = time.monotonic() - t0
        print(f"stopped in {took:.1f}s with a lookup hanging")
        assert took < 6, agent.log()[-3000:]
    finally:
        proxy.close()
        server.close()
        cgs.cleanup()


def test_agent_keeps_one_container_across_a_kubernetes_restart_in_a_new_cgroup(
        containerd: Containerd, agent_factory: AgentFactory) -> None:
    """kubelet restarts a container as a new one (a new id, a new cgroup) under the same pod and
    name: one container for the agent, as for the node agent, whose counts go on and whose
    restart is counted."""
    first, second = _hexid(), _hexid()
    name = f"/k8s/{NS}/{STS_POD}/postgres"
    for cid in (first, second):
        containerd.ctr_create(cid, _k8s_labels(STS_POD, DB_UID, "postgres"))
    cgs, server = KubeletCgroups(), Listener()
    try:
        a = Connector(cgs, cgs.cgroupfs(DB_UID, first))
        agent = agent_factory("--containerd-socket", containerd.address, "--disable-runtime", "docker", *ONLY)
        assert wait_for(lambda: _container_of(agent, a.pid) == name, 15), agent.log()[-3000:]
        a.connect(server.port, 4)
        assert wait_for(lambda: _connects(agent, name, server.port) == 4, 15)
        assert agent.value("container_restarts_total", container_id=name) == 0
        a.p.kill()
        a.p.wait()
        b = Connector(cgs, cgs.cgroupfs(DB_UID, second))  # the next attempt
        assert wait_for(lambda: _container_of(agent, b.pid) == name, 15), agent.log()[-3000:]
        b.connect(server.port, 2)
        assert wait_for(lambda: _connects(agent, name, server.port) == 6, 15), agent.log()[-3000:]
        time.sleep(1.5)
        assert _connects(agent, name, server.port) == 6
        assert agent.value("container_restarts_total", container_id=name) == 1
        assert [i for i in _ids(agent) if DB_UID in i or STS_POD in i] == [name]
    finally:
        server.close()
        cgs.cleanup()
