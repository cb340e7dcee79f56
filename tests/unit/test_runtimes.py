"""Runtime clients and the resolver without runtimes: the node agent's id rules, the protobuf
wire codec, each runtime's answer format, the HTTP and gRPC transports against servers run in
the test (unix sockets in tmp_path), and the resolver's caching, ordering and backoff with
clients whose answers the test controls."""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from agent.containers.runtimes import (
    ABSENT,
    DISABLED,
    LOG_CRI,
    LOG_DOCKER_JSON,
    LOG_JOURNALD,
    MAX_RESPONSE,
    REACHABLE,
    UNREACHABLE,
    BadAnswer,
    ContainerMetadata,
    ContainerNotFound,
    RuntimeAbsent,
    RuntimeClient,
    RuntimeUnavailable,
    check_runtime_id,
    container_id,
    find_socket,
    nomad_env,
    unixhttp,
)
from agent.containers.runtimes import protowire as pw
from agent.containers.runtimes.containerd import ContainerdClient, parse_container
from agent.containers.runtimes.crio import parse_container_info
from agent.containers.runtimes.docker import parse_inspect as docker_parse
from agent.containers.runtimes.podman import parse_inspect as podman_parse
from agent.containers.runtimes.resolver import (
    FOUND,
    MISSING,
    WAITING,
    RuntimeResolver,
    build_clients,
)
from agent.metrics import Families

ID1, ID2, ID3 = "a" * 64, "b" * 64, "c" * 64
K8S = {"io.kubernetes.pod.name": "web-7d9f8b6c5d-x2k4p", "io.kubernetes.pod.namespace": "shop",
       "io.kubernetes.container.name": "web", "io.kubernetes.pod.uid": "u-1"}


# ------------------------------------------------------------------- ids ---


def test_kubernetes_labels_give_pod_container_ids_and_sandboxes_none() -> None:
    assert container_id("containerd", K8S) == "/k8s/shop/web-7d9f8b6c5d-x2k4p/web"
    assert container_id("docker", K8S, name="k8s_web_x") == "/k8s/shop/web-7d9f8b6c5d-x2k4p/web"
    no_name = {k: v for k, v in K8S.items() if k != "io.kubernetes.container.name"}
    assert container_id("containerd", no_name) is None
    assert container_id("docker", {**K8S, "io.kubernetes.container.name": "POD"}, name="k8s_POD") is None


def test_cronjob_pods_are_named_by_their_job_only_near_their_schedule() -> None:
    scheduled_minutes = 28_500_000  # a CronJob pod name carries its schedule in minutes
    labels = {**K8S, "io.kubernetes.pod.name": f"backup-{scheduled_minutes}-x2k4p"}
    at = scheduled_minutes * 60.0
    assert container_id("containerd", labels, now=at + 3600) == "/k8s-cronjob/shop/backup/web"
    assert container_id("containerd", labels, now=at + 8 * 86400) == f"/k8s/shop/backup-{scheduled_minutes}-x2k4p/web"


def test_swarm_nomad_docker_and_podman_ids() -> None:
    swarm = {"com.docker.swarm.task.name": "stack_web.2.q1w2e3", "com.docker.swarm.service.name": "stack_web",
             "com.docker.stack.namespace": "stack"}
    assert container_id("docker", swarm, name="stack_web.2.q1w2e3") == "/swarm/stack/web/2"
    bare = {"com.docker.swarm.task.name": "web.1.abc", "com.docker.swarm.service.name": "web"}
    assert container_id("docker", bare, name="x") == "/swarm/_/web/1"
    env = {"NOMAD_ALLOC_ID": "5c3b", "NOMAD_GROUP_NAME": "g", "NOMAD_JOB_NAME": "api",
           "NOMAD_NAMESPACE": "prod", "NOMAD_TASK_NAME": "server"}
    assert container_id("docker", {}, name="api", env=env) == "/nomad/prod/api/g/5c3b/server"
    partial = {k: v for k, v in env.items() if k != "NOMAD_TASK_NAME"}
    assert container_id("docker", {}, name="api", env=partial) == "/docker/api"
    assert container_id("podman", {}, name="pweb") == "/podman/pweb"
    assert container_id("containerd", {"app": "x"}) is None


def test_only_nomad_variables_are_kept_from_a_container_environment() -> None:
    env = ["NOMAD_JOB_NAME=api", "NOMAD_OTHER=1", "DB_PASSWORD=hunter2", "PATH=/bin", 7, "NOMAD_TASK_NAME"]
    assert nomad_env(env) == {"NOMAD_JOB_NAME": "api"}
    assert nomad_env("NOMAD_JOB_NAME=api") == {}


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "a/b", "a?b", "a b", "-x", "x" * 129, None, 7])
def test_runtime_ids_that_could_escape_a_url_path_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        check_runtime_id(bad)  # type: ignore[arg-type]
    assert check_runtime_id(ID1) == ID1 and check_runtime_id("web-1.x_2") == "web-1.x_2"


# ------------------------------------------------------------- protowire ---


def test_protobuf_messages_round_trip_and_malformed_ones_raise_value_error() -> None:
    msg = (pw.field_str(1, "id") + pw.field_str_map(2, {"k": "v", "a": "b"})
           + pw.field_bytes(4, pw.field_str(1, "runc")) + bytes([0x28, 0x96, 0x01])  # field 5 varint 150
           + bytes([0x35]) + (7).to_bytes(4, "little") + bytes([0x39]) + (9).to_bytes(8, "little"))
    d = pw.decode(msg)
    assert pw.text(d, 1) == "id" and pw.entries(d, 2) == [(b"k", b"v"), (b"a", b"b")]
    assert pw.text(pw.decode(pw.first_bytes(d, 4)), 1) == "runc"
    assert d[5] == [150] and d[6] == [7] and d[7] == [9]
    assert pw.text(d, 99) == "" and pw.field_str(3, "") == b""
    for bad in (b"\x0a\x05ab", b"\x08\x80", b"\x0b", b"\x00\x01", b"\x0a" + b"\xff" * 11, b"\x35\x01", b"\x39\x01"):
        with pytest.raises(ValueError):
            pw.decode(bad)


# ------------------------------------------------------- runtime formats ---


def _container(labels: dict[str, str], image: str = "", extensions: dict[str, bytes] | None = None) -> bytes:
    exts = {k: pw.field_str(1, "t") + pw.field_bytes(2, v) for k, v in (extensions or {}).items()}
    return (pw.field_str(1, ID1) + pw.field_str_map(2, labels) + pw.field_str(3, image)
            + pw.field_map(10, exts))


def test_containerd_cri_extension_gives_log_path_and_attempt() -> None:
    ext = {"Version": "v1", "Metadata": {"LogPath": "/var/log/pods/shop_web_u-1/web/0.log",
                                         "Config": {"metadata": {"name": "web"}}}}
    md = parse_container(ID1, "k8s.io", pw.decode(_container(
        K8S, "nginx:1", {"io.cri-containerd.container.metadata": json.dumps(ext).encode()})))
    assert md == ContainerMetadata(runtime="containerd", runtime_id=ID1, id="/k8s/shop/web-7d9f8b6c5d-x2k4p/web",
                                   image="nginx:1", labels=K8S, log_path="/var/log/pods/shop_web_u-1/web/0.log",
                                   log_format=LOG_CRI, restart_count=0, namespace="k8s.io", pod_uid="u-1")
    ext2 = {"Metadata": {"Config": {"annotations": {"io.kubernetes.container.restartCount": "4"}, "metadata": "x"}}}
    md = parse_container(ID1, "k8s.io", pw.decode(_container(
        K8S, extensions={"io.cri-containerd.container.metadata": json.dumps(ext2).encode()})))
    assert (md.restart_count, md.log_path) == (4, None)
    md = parse_container(ID1, "k8s.io", pw.decode(_container(
        K8S, extensions={"io.cri-containerd.container.metadata": b"{not json"})))
    assert (md.restart_count, md.log_path, md.id) == (None, None, "/k8s/shop/web-7d9f8b6c5d-x2k4p/web")


def test_containerd_sandboxes_by_kind_label_or_sandbox_extension() -> None:
    pod = {k: v for k, v in K8S.items() if k != "io.kubernetes.container.name"}
    for labels, exts in (({**K8S, "io.cri-containerd.kind": "sandbox"}, {}),
                         (K8S, {"io.cri-containerd.sandbox.metadata": b"{}"}),
                         (pod, {})):
        md = parse_container(ID1, "k8s.io", pw.decode(_container(labels, extensions=exts)))
        assert (md.sandbox, md.id) == (True, None)


def test_docker_inspect_formats() -> None:
    doc = {"Name": "/web-1", "RestartCount": 2, "LogPath": "/var/lib/docker/containers/x/x-json.log",
           "Config": {"Image": "nginx:1", "Labels": {"a": "b", "n": 1}, "Env": ["SECRET=1"]},
           "HostConfig": {"LogConfig": {"Type": "json-file"}}}
    assert docker_parse(ID1, doc) == ContainerMetadata(
        runtime="docker", runtime_id=ID1, id="/docker/web-1", name="web-1", image="nginx:1", labels={"a": "b"},
        log_path="/var/lib/docker/containers/x/x-json.log", log_format=LOG_DOCKER_JSON, restart_count=2)
    journald = {**doc, "HostConfig": {"LogConfig": {"Type": "journald"}}}
    assert (docker_parse(ID1, journald).log_path, docker_parse(ID1, journald).log_format) == (None, None)
    shim = {"Name": "/k8s_web_x", "RestartCount": 0, "Config": {"Labels": {
        **K8S, "annotation.io.kubernetes.container.restartCount": "5"}}}
    md = docker_parse(ID1, shim)
    assert (md.id, md.restart_count) == ("/k8s/shop/web-7d9f8b6c5d-x2k4p/web", 5)
    pause = {"Name": "/k8s_POD_x", "Config": {"Labels": {**K8S, "io.kubernetes.docker.type": "podsandbox"}}}
    assert (docker_parse(ID1, pause).sandbox, docker_parse(ID1, pause).id) == (True, None)
    assert docker_parse(ID1, {"Config": "nonsense", "HostConfig": []}).id is None


def test_podman_inspect_formats() -> None:
    doc = {"Name": "pweb", "ImageName": "localhost/img:1", "RestartCount": 1, "IsInfra": False,
           "Config": {"Labels": {"x": "y"}, "Image": "ignored"},
           "HostConfig": {"LogConfig": {"Type": "k8s-file", "Path": "/var/lib/containers/x/ctr.log"}}}
    assert podman_parse(ID1, doc) == ContainerMetadata(
        runtime="podman", runtime_id=ID1, id="/podman/pweb", name="pweb", image="localhost/img:1",
        labels={"x": "y"}, log_path="/var/lib/containers/x/ctr.log", log_format=LOG_CRI, restart_count=1)
    journald = {**doc, "HostConfig": {"LogConfig": {"Type": "journald", "Path": ""}}}
    assert (podman_parse(ID1, journald).log_path, podman_parse(ID1, journald).log_format) == (None, LOG_JOURNALD)
    infra = {**doc, "IsInfra": True, "Name": "abc-infra"}
    assert (podman_parse(ID1, infra).sandbox, podman_parse(ID1, infra).id) == (True, None)


def test_crio_container_info_formats() -> None:
    doc = {"name": "k8s_web", "image": "nginx:1", "labels": K8S, "log_path": "/var/log/pods/a/web/3.log",
           "annotations": {"io.kubernetes.container.restartCount": "3"},
           "crio_annotations": {"io.kubernetes.cri-o.ContainerType": "container"}}
    assert parse_container_info(ID1, doc) == ContainerMetadata(
        runtime="crio", runtime_id=ID1, id="/k8s/shop/web-7d9f8b6c5d-x2k4p/web", image="nginx:1", labels=K8S,
        log_path="/var/log/pods/a/web/3.log", log_format=LOG_CRI, restart_count=3, pod_uid="u-1")
    infra = {**doc, "labels": {**K8S, "io.kubernetes.container.name": "POD"}, "log_path": "",
             "crio_annotations": {"io.kubernetes.cri-o.ContainerType": "sandbox"}}
    md = parse_container_info(ID1, infra)
    assert (md.sandbox, md.id, md.log_path) == (True, None, None)


# ------------------------------------------------------------- transports ---


def test_socket_lookup_override_then_candidates_then_host_root(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "run").mkdir(parents=True)
    s1 = socket.socket(socket.AF_UNIX)
    s1.bind(str(host / "run" / "rt.sock"))
    (tmp_path / "file.sock").write_text("not a socket")
    try:
        cands = [str(tmp_path / "file.sock"), "/run/rt.sock"]
        assert find_socket(None, cands, str(host)) == str(host / "run" / "rt.sock")
        assert find_socket(None, cands, None) is None
        assert find_socket(str(tmp_path / "other.sock"), cands, str(host)) is None  # an override is the only place
        assert find_socket(str(host / "run" / "rt.sock"), [], None) == str(host / "run" / "rt.sock")
    finally:
        s1.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def address_string(self) -> str:
        return "test"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/slow":
            time.sleep(3)
        body = b"x" * (MAX_RESPONSE + 10) if self.path == "/huge" else b'{"ok": 1}'
        try:
            self.send_response(404 if self.path == "/missing" else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout, size bound)


class _UnixHTTP(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def http_sock(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "h.sock")
    srv = _UnixHTTP(path, _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield path
    srv.shutdown()
    srv.server_close()


def test_http_over_unix_socket_answers_bounds_and_failures(http_sock: str, tmp_path: Path) -> None:
    r = unixhttp.get(http_sock, "/x", 2, "t")
    assert (r.status, r.json("t")) == (200, {"ok": 1})
    assert unixhttp.get(http_sock, "/missing", 2, "t").status == 404
    with pytest.raises(BadAnswer):
        unixhttp.get(http_sock, "/huge", 5, "t")
    t0 = time.monotonic()
    with pytest.raises(RuntimeUnavailable):
        unixhttp.get(http_sock, "/slow", 0.3, "t")
    assert time.monotonic() - t0 < 2
    with pytest.raises(RuntimeUnavailable):
        unixhttp.get(str(tmp_path / "nothing.sock"), "/", 1, "t")
    with pytest.raises(BadAnswer):
        unixhttp.Response(200, b"<html>").json("t")


class _FakeContainerd:
    """An in-process gRPC server with containerd's method names: Get answers from `records`
    ({namespace: {id: Container bytes}}), NOT_FOUND otherwise."""

    def __init__(self, path: str, records: dict[str, dict[str, bytes]]) -> None:
        self.path, self.records = path, records
        self.calls: list[tuple[str, str]] = []
        self.server: grpc.Server | None = None

    def _get(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        ns = dict(context.invocation_metadata()).get("containerd-namespace", "")
        cid = pw.text(pw.decode(request), 1)
        self.calls.append((ns, cid))
        rec = self.records.get(str(ns), {}).get(cid)
        if rec is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"container {cid!r} in namespace {ns!r}: not found")
        return pw.field_bytes(1, rec)

    def _version(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return pw.field_str(1, "1.7.0-test") + pw.field_str(2, "abc")

    def start(self) -> None:
        handlers = {
            "Get": grpc.unary_unary_rpc_method_handler(self._get),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("containerd.services.containers.v1.Containers", handlers),
            grpc.method_handlers_generic_handler("containerd.services.version.v1.Version",
                                                 {"Version": grpc.unary_unary_rpc_method_handler(self._version)}),
        ))
        self.server.add_insecure_port("unix://" + self.path)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait()
            self.server = None


def test_containerd_client_namespaces_version_and_a_restarting_server(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    srv = _FakeContainerd(path, {"moby": {ID1: _container({"a": "b"}, "img")}})
    srv.start()
    client = ContainerdClient(socket=path, timeout=2)
    try:
        md = client.inspect(ID1)
        assert (md.namespace, md.image, md.labels) == ("moby", "img", {"a": "b"})
        assert srv.calls == [("k8s.io", ID1), ("moby", ID1)]
        with pytest.raises(ContainerNotFound):
            client.inspect(ID2)
        st = client.status()
        assert (st.state, st.version) == (REACHABLE, "1.7.0-test")
        srv.stop()
        with pytest.raises(RuntimeUnavailable):
            client.inspect(ID1)
        assert client.status().state in (UNREACHABLE, ABSENT)
        srv = _FakeContainerd(path, {"k8s.io": {ID1: _container(K8S)}})
        srv.start()
        assert client.inspect(ID1).id == "/k8s/shop/web-7d9f8b6c5d-x2k4p/web"  # reconnects at once
    finally:
        client.close()
        srv.stop()
    with pytest.raises(RuntimeAbsent):
        ContainerdClient(socket=str(tmp_path / "none.sock")).inspect(ID1)
    with pytest.raises(ValueError):
        client.inspect("../x")


# -------------------------------------------------------------- resolver ---


class FakeClient(RuntimeClient):
    """Answers from `known`; `down` makes it unavailable; `absent` socketless; `gate` holds
    every inspect until set."""

    def __init__(self, name: str, known: dict[str, str | None] | None = None) -> None:
        super().__init__(socket="/dev/null", host_root=None)
        self.name = name
        self.known = known or {}
        self.down = False
        self.absent = False
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def inspect(self, runtime_id: str) -> ContainerMetadata:
        self.gate.wait()
        with self.lock:
            self.calls.append(runtime_id)
        if self.absent:
            raise RuntimeAbsent(f"{self.name}: no socket")
        if self.down:
            raise RuntimeUnavailable(f"{self.name}: refused")
        if runtime_id not in self.known:
            raise ContainerNotFound(runtime_id)
        return ContainerMetadata(self.name, runtime_id, self.known[runtime_id])

    def socket_path(self) -> str | None:
        return None if self.absent else f"/fake/{self.name}.sock"

    def version(self) -> str:
        if self.down:
            raise RuntimeUnavailable("refused")
        return "9.9"


def _resolver(*clients: RuntimeClient, **kw: object) -> tuple[RuntimeResolver, list[tuple[str, str | None]]]:
    heard: list[tuple[str, str | None]] = []
    r = RuntimeResolver(list(clients), lambda rid, md: heard.append((rid, md.id)), **kw)  # type: ignore[arg-type]
    r.start()
    return r, heard


def _until(pred, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def test_one_lookup_per_container_however_often_it_is_requested() -> None:
    c = FakeClient("containerd", {ID1: "/k8s/a/b/c"})
    r, heard = _resolver(c)
    try:
        for _ in range(50):
            r.request(ID1, "cri-containerd")
        assert r.wait_idle(5)
        for _ in range(50):
            r.request(ID1, "cri-containerd")
        assert r.wait_idle(5)
        assert c.calls == [ID1] and heard == [(ID1, "/k8s/a/b/c")] and r.requests == 1
        assert r.get(ID1) == ContainerMetadata("containerd", ID1, "/k8s/a/b/c") and r.state(ID1) == FOUND
    finally:
        r.close()


def test_the_caller_never_waits_for_a_hanging_runtime() -> None:
    c = FakeClient("containerd", {ID1: "/k8s/a/b/c"})
    c.gate.clear()
    r, heard = _resolver(c)
    try:
        # The runtime's gate stays closed: a caller that waited for it would hang here (and the
        # test's timeout would fail it); none of the 2,000 requests may have been answered.
        for i in range(2000):
            rid = f"{i:064x}"
            r.request(rid, "cri-containerd")
            assert r.get(rid) is None
        assert heard == []
    finally:
        c.gate.set()
        r.close()


def test_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    c = FakeClient("docker", {i: f"/docker/{i[:3]}" for i in (ID1, ID2, ID3, "d" * 64)})
    r, _ = _resolver(c, cache_size=3)
    try:
        for rid in (ID1, ID2, ID3):
            r.request(rid, "docker")
        assert r.wait_idle(5)
        assert r.get(ID1) is not None  # ID1 is now the most recent; ID2 the oldest
        r.request("d" * 64, "docker")
        assert r.wait_idle(5)
        assert len(r) == 3 and r.get(ID2) is None and r.get(ID1) is not None
        assert (r.evictions, r.dropped) == (1, 0)
    finally:
        r.close()


def test_lookups_evicted_before_an_answer_are_counted_as_dropped_and_never_asked() -> None:
    c = FakeClient("docker", {})
    c.gate.clear()
    r, _ = _resolver(c, cache_size=10)
    try:
        ids = [f"{i:064x}" for i in range(30)]
        for rid in ids:
            r.request(rid, "docker")
        assert _until(lambda: r.state(ids[0]) is None)
        c.gate.set()
        assert r.wait_idle(5)
        assert len(r) == 10 and r.evictions == 20 and r.dropped == 20
        assert set(c.calls) <= {ids[0], *ids[20:]}  # the first was already being asked
        f = Families({})
        r.self_metrics(f)
        assert {m.name for m in f} >= {"coroot_agent_runtime_cache_entries",
                                       "coroot_agent_runtime_lookups_dropped",
                                       "coroot_agent_runtime_lookups"}
    finally:
        c.gate.set()
        r.close()


def test_a_down_runtime_is_tried_once_per_backoff_period_not_once_per_container() -> None:
    c = FakeClient("containerd", {f"{i:064x}": f"/k8s/n/p{i}/c" for i in range(40)})
    c.down = True
    r, heard = _resolver(c, backoff=0.2, max_backoff=0.4)
    try:
        for i in range(40):
            r.request(f"{i:064x}", "cri-containerd")
        time.sleep(1.0)
        attempts = len(c.calls)
        assert 2 <= attempts <= 6, attempts  # ~0, 0.2, 0.6, 1.0 s
        assert heard == [] and r.state(f"{0:064x}") == WAITING and r.get(f"{0:064x}") is None
        c.down = False
        assert _until(lambda: len(heard) == 40)
        assert r.wait_idle(5)
        assert sorted(h[1] for h in heard) == sorted(f"/k8s/n/p{i}/c" for i in range(40))  # type: ignore[type-var]
    finally:
        r.close()


def test_docker_kind_asks_docker_then_containerd_and_others_ask_their_own() -> None:
    docker = FakeClient("docker", {ID1: "/docker/x"})
    ctd = FakeClient("containerd", {ID2: "/k8s/a/b/c"})
    crio = FakeClient("crio", {ID3: "/k8s/a/b/d"})
    r, _ = _resolver(docker, ctd, crio)
    try:
        r.request(ID1, "docker")
        r.request(ID2, "docker")
        r.request(ID3, "crio")
        r.request("e" * 64, "cri-containerd")
        assert r.wait_idle(5)
        assert docker.calls == [ID1, ID2] and ctd.calls == [ID2, "e" * 64] and crio.calls == [ID3]
        assert [r.state(x) for x in (ID1, ID2, ID3)] == [FOUND] * 3
    finally:
        r.close()


def test_not_found_is_asked_again_a_few_times_then_left_alone() -> None:
    c = FakeClient("containerd", {})
    r, heard = _resolver(c, backoff=0.05, not_found_retries=2)
    try:
        r.request(ID1, "cri-containerd")
        assert _until(lambda: r.state(ID1) == MISSING)
        time.sleep(0.3)
        assert c.calls == [ID1] * 3 and heard == [] and r.get(ID1) is None
        r.request(ID1, "cri-containerd")  # still cached as missing
        assert r.wait_idle(2) and len(c.calls) == 3
        r.forget(ID1)
        c.known[ID1] = "/k8s/a/b/c"
        r.request(ID1, "cri-containerd")
        assert _until(lambda: r.get(ID1) is not None) and heard == [(ID1, "/k8s/a/b/c")]
    finally:
        r.close()


def test_an_absent_runtime_waits_alone_but_not_when_another_answered() -> None:
    docker, ctd = FakeClient("docker"), FakeClient("containerd", {})
    docker.absent = True
    r, _ = _resolver(docker, ctd, backoff=0.05, not_found_retries=0)
    try:
        r.request(ID1, "docker")  # docker absent, containerd: no such container
        assert _until(lambda: r.state(ID1) == MISSING)
        ctd.absent = True
        r.request(ID2, "cri-containerd")  # nobody to ask: wait for containerd to appear
        assert _until(lambda: r.state(ID2) == WAITING)
        ctd.known[ID2] = "/k8s/a/b/c"
        ctd.absent = False
        assert _until(lambda: r.get(ID2) is not None)
    finally:
        r.close()


def test_a_failing_listener_or_bad_answer_does_not_stop_the_resolver() -> None:
    class Bad(FakeClient):
        def inspect(self, runtime_id: str) -> ContainerMetadata:
            if runtime_id == ID1:
                raise BadAnswer("garbage")
            if runtime_id == ID2:
                raise KeyError("a bug")
            return super().inspect(runtime_id)

    c = Bad("podman", {ID3: "/podman/x"})
    r = RuntimeResolver([c], not_found_retries=0)

    def boom(rid: str, md: ContainerMetadata) -> None:
        raise RuntimeError("listener bug")

    heard: list[str] = []
    r.subscribe(boom)
    r.subscribe(lambda rid, md: heard.append(rid))
    r.start()
    try:
        for rid in (ID1, ID2, ID3):
            r.request(rid, "podman")
        assert r.wait_idle(5)
        assert [r.state(x) for x in (ID1, ID2, ID3)] == [MISSING, MISSING, FOUND] and heard == [ID3]
        r.request("../../x", "podman")
        assert r.invalid == 1 and len(r) == 3
    finally:
        r.close()


def test_status_rows_and_building_clients() -> None:
    up, down = FakeClient("containerd"), FakeClient("docker")
    down.down = True
    r = RuntimeResolver([up, down], disabled=["podman"])
    rows = {s.runtime: (s.state, s.version) for s in r.status()}
    assert rows == {"containerd": (REACHABLE, "9.9"), "docker": (UNREACHABLE, None), "podman": (DISABLED, None)}
    clients = build_clients({"docker": "/x/docker.sock", "crio": ""}, disabled=["podman"], host_root=None)
    assert [c.name for c in clients] == ["containerd", "docker", "crio"]
    assert clients[1].override == "/x/docker.sock" and clients[2].override is None
    assert clients[1].socket_path() is None and clients[1].status().state == ABSENT
    with pytest.raises(ValueError, match="unknown container runtime"):
        build_clients(disabled=["rkt"])
    assert os.path.basename(clients[0].sockets[-1]) == "containerd.sock"


def test_grpcio_is_not_loaded_until_a_grpc_runtime_is_asked() -> None:
    code = ("import sys, agent.containers.runtimes.resolver as r; "
            "r.RuntimeResolver(r.build_clients(host_root=None)); assert 'grpc' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
