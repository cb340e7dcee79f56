"""Coroot's container rules for cgroup paths, and /proc/PID/cgroup parsing on v1, v2, hybrid."""

import pytest

from agent.containers import cgroup as cg

HYBRID = """9:name=systemd:/
8:pids:/
4:memory:/process_api/bdb6fa56ca7f1535e551b06b65f49a5a
2:cpuacct:/
1:cpu:/
0::/system.slice/demo.service
"""
V1_DOCKER = """12:cpu,cpuacct:/docker/b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3f
11:memory:/docker/b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3f
1:name=systemd:/docker/b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3f
"""
V2_K8S = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8712f785_1a3e_41ec_a00b_e2dcc77431cb.slice/cri-containerd-73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd.scope\n"


def test_hybrid_prefers_the_unified_path() -> None:
    subs = cg.parse_proc_cgroup(HYBRID)
    assert subs[""] == "/system.slice/demo.service"
    assert "cpu" not in subs  # root paths are no container
    assert cg.cgroup_id(subs) == "/system.slice/demo.service"


def test_v1_docker() -> None:
    subs = cg.parse_proc_cgroup(V1_DOCKER)
    ref = cg.classify(cg.cgroup_id(subs))
    assert ref is not None and ref.kind == "docker"
    assert cg.container_id(ref) == "/docker/b43d92bf1e5c"


def test_v2_kubernetes_containerd_falls_back_to_a_cgroup_derived_id() -> None:
    ref = cg.classify(cg.cgroup_id(cg.parse_proc_cgroup(V2_K8S)))
    assert ref is not None and ref.kind == "cri-containerd"
    assert ref.runtime_id.startswith("73051af27110")
    assert cg.container_id(ref) == "/k8s-cgroup/8712f785-1a3e-41ec-a00b-e2dcc77431cb/73051af27110"


@pytest.mark.parametrize(("path", "cid"), [
    ("/system.slice/nginx.service", "/system.slice/nginx.service"),
    ("/system.slice/postgresql@15-main.service", "/system.slice/postgresql@15-main.service"),
    ("/system.slice/foo\\x2dbar.service", "/system.slice/foo-bar.service"),
    ("/runtime.slice/kubelet.service", "/runtime.slice/kubelet.service"),
    ("/system.slice/nginx.service/worker", "/system.slice/nginx.service"),
    ("/lxc/web1", "/lxc/web1"),
    ("/lxc.payload.web2", "/lxc/web2"),
    ("/system/etcd", "/talos/etcd"),
])
def test_containers(path: str, cid: str) -> None:
    ref = cg.classify(path)
    assert ref is not None
    assert cg.container_id(ref) == cid


@pytest.mark.parametrize("path", [
    "/user.slice/user-1000.slice/session-2.scope", "/init.scope", "/", "",
    "/system.slice/session-1.scope", "/process_api/bdb6fa56", "/kubepods/besteffort/pod1234",
])
def test_not_containers(path: str) -> None:
    assert cg.classify(path) is None


@pytest.mark.parametrize(("cid", "app"), [
    ("/k8s/default/api-7d9f8c6b5-x2x7k/api", "/k8s/default/api"),  # Deployment
    ("/k8s/kube-system/node-exporter-4lz9q/exporter", "/k8s/kube-system/node-exporter"),  # DaemonSet
    ("/k8s/db/postgres-0/postgres", "/k8s/db/postgres"),  # StatefulSet
    ("/k8s/db/pg-main-11/postgres", "/k8s/db/pg-main"),
    ("/k8s/batch/report-29011440-7bq4r/report", "/k8s/batch/report"),  # a CronJob's Job's pod
    ("/k8s/ops/migrate-x8w2n/migrate", "/k8s/ops/migrate"),  # a Job
    ("/k8s/default/standalone/app", ""),  # a bare pod: no workload
    ("/k8s/default/api-7d9f8c6b5-aaaaa/api", ""),  # vowels: not a generated suffix
    ("/system.slice/nginx.service", ""),
    ("/docker/web", ""),
    ("/k8s-cgroup/8e9b1c2a-0000-4000-8000-000000000000/0123456789ab", ""),
])
def test_app_id_is_the_workload_of_a_kubernetes_container_only(cid: str, app: str) -> None:
    assert cg.app_id(cid) == app
    assert cg.service_name(cid) == (app or cid)


def test_pressure_and_kv_files(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "cpu.pressure").write_text(
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=250\n")
    assert cg.read_pressure(str(tmp_path / "cpu.pressure")) == {"some": 1.5, "full": 0.00025}
    (tmp_path / "cpu.stat").write_text("usage_usec 123\nuser_usec 100\nbroken line here\n")
    assert cg.read_kv(str(tmp_path / "cpu.stat")) == {"usage_usec": 123, "user_usec": 100}
    assert cg.read_kv(str(tmp_path / "missing")) == {}


def test_layout_detection(tmp_path) -> None:  # noqa: ANN001
    assert cg.detect_layout(str(tmp_path)).mode == cg.V1
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    assert cg.detect_layout(str(tmp_path)).mode == cg.HYBRID
    (tmp_path / "cgroup.controllers").write_text("")
    assert cg.detect_layout(str(tmp_path)).mode == cg.V2


PODMAN_ID = "4" * 64


@pytest.mark.parametrize(("path", "kind", "cid"), [
    (f"/machine.slice/libpod-{PODMAN_ID}.scope", "podman", f"/podman/{PODMAN_ID[:12]}"),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{PODMAN_ID}.scope", "podman",
     f"/podman/{PODMAN_ID[:12]}"),
    (f"/system.slice/web.service/libpod-payload-{PODMAN_ID}", "podman", f"/podman/{PODMAN_ID[:12]}"),
    (f"/kubepods/burstable/pod8712f785-1a3e-41ec-a00b-e2dcc77431cb/{PODMAN_ID}", "docker",
     f"/k8s-cgroup/8712f785-1a3e-41ec-a00b-e2dcc77431cb/{PODMAN_ID[:12]}"),
    (f"/kubepods.slice/kubepods-pod8712f785_1a3e_41ec_a00b_e2dcc77431cb.slice/crio-{PODMAN_ID}.scope", "crio",
     f"/k8s-cgroup/8712f785-1a3e-41ec-a00b-e2dcc77431cb/{PODMAN_ID[:12]}"),
    (f"/system.slice/docker-{PODMAN_ID}.scope", "docker", f"/docker/{PODMAN_ID[:12]}"),
])
def test_runtime_containers_keep_the_runtime_id_and_get_a_derived_one(path: str, kind: str, cid: str) -> None:
    ref = cg.classify(path)
    assert ref is not None and (ref.kind, ref.runtime_id, cg.container_id(ref)) == (kind, PODMAN_ID, cid)


@pytest.mark.parametrize("path", [
    f"/machine.slice/libpod-conmon-{PODMAN_ID}.scope", "/machine.slice/machine-qemu.scope",
    "/user.slice/user-1000.slice/session-2.scope",
])
def test_podman_monitors_and_other_scopes_are_no_containers(path: str) -> None:
    assert cg.classify(path) is None


def test_v1_kubepods_cgroupfs_driver_wins_over_the_unified_path() -> None:
    text = (f"12:cpu,cpuacct:/kubepods/besteffort/pod8712f785-1a3e-41ec-a00b-e2dcc77431cb/{PODMAN_ID}\n"
            f"11:memory:/kubepods/besteffort/pod8712f785-1a3e-41ec-a00b-e2dcc77431cb/{PODMAN_ID}\n"
            "0::/system.slice/containerd.service\n")
    ref = cg.classify(cg.cgroup_id(cg.parse_proc_cgroup(text)))
    assert ref is not None and (ref.kind, ref.runtime_id) == ("docker", PODMAN_ID)
