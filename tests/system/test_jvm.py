"""JVM metrics from hsperfdata, end to end: the agent as a real process, OpenJDK from Debian
(default-jdk-headless) running tests/system/workloads/GcLoop.java (compiled here by javac) in
a test cgroup, the way a container runs it: in its own mount namespace with a private /tmp
(a tmpfs the host cannot see) and its own pid namespace (the JVM is pid 1 there, so its file is
/tmp/hsperfdata_nobody/1), as the user nobody. The program allocates and calls System.gc() in a
loop, then prints what its own GarbageCollectorMXBeans say; the agent's GC time must be at
least that and within 10% of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.helpers import NOBODY, REPO, AgentFactory, AgentProcess, TestCgroups, wait_for

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read

GC_LOOP = REPO / "tests" / "system" / "workloads" / "GcLoop.java"
LOOP_SECONDS = 15.0


@pytest.fixture(scope="module")
def classes() -> Iterator[Path]:
    """GcLoop compiled into a directory the user nobody can read, outside /tmp (which the JVM's
    mount namespace replaces)."""
    if shutil.which("javac") is None:
        pytest.fail("javac is missing: `scripts/setup.sh --test` installs default-jdk-headless")
    d = Path(tempfile.mkdtemp(prefix="coroot-agent-jvm-", dir="/var/tmp"))
    try:
        os.chmod(d, 0o755)
        subprocess.run(["javac", "-d", str(d), str(GC_LOOP)], check=True, timeout=120)
        for f in d.iterdir():
            os.chmod(f, 0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Jvm:
    """GcLoop in a test cgroup, in new mount and pid namespaces with a private /tmp, as nobody.
    Its JSON lines are read by a thread; closing stdin ends it."""

    def __init__(self, cgroups: TestCgroups, cid: str, classes: Path, seconds: float, *jvm_args: str) -> None:
        java = " ".join(["exec", *NOBODY, "java", *jvm_args, "-cp", str(classes), "GcLoop", str(seconds)])
        self.p = cgroups.spawn(cid, ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c",
                                     f"mount -t tmpfs -o mode=1777 tmpfs /tmp && {java}"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(json.loads(line))

    def event(self, name: str, timeout: float) -> dict:
        found = wait_for(lambda: [e for e in self.lines if e["event"] == name], timeout)
        assert found, f"GcLoop printed no {name!r} line in {timeout}s (exit {self.p.poll()}): {self.lines}"
        return found[0]

    def java_pid(self) -> int:
        """The JVM's pid as the host numbers it (the child of unshare's forked init)."""
        def find() -> int | None:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                ppid = int(status.split("\nPPid:")[1].split()[0])
                if cmd[0].endswith(b"java") and ppid == self.p.pid:
                    return int(pid)
            return None

        pid = wait_for(find, 10)
        assert pid, "no JVM process found"
        return pid

    def close(self) -> None:
        if self.p.poll() is None:
            assert self.p.stdin is not None
            self.p.stdin.close()
            self.p.wait(30)


def jvm_series(agent: AgentProcess, cid: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for n, lb, v in agent.metrics():
        if n.startswith("container_jvm_") and lb.get("container_id") == cid:
            out.setdefault(n, []).append((lb, v))
    return out


def test_a_jvm_in_its_own_namespaces_reports_version_heap_and_gc_time_as_its_mxbeans_do(
        agent: AgentProcess, cgroups: TestCgroups, classes: Path) -> None:
    cid = cgroups.create("jvm")
    j = Jvm(cgroups, cid, classes, LOOP_SECONDS)
    try:
        started = j.event("started", 60)
        assert started["pid"] == 1  # the file is /tmp/hsperfdata_nobody/1 in the JVM's own /tmp
        host_pid = j.java_pid()
        assert not list(Path("/tmp").glob(f"hsperfdata_*/{host_pid}")), "the JVM's /tmp is not the host's"
        jvm_name = f"GcLoop {LOOP_SECONDS}"
        info = wait_for(lambda: agent.value("container_jvm_info", container_id=cid), 30)
        assert info == 1.0, agent.log()[-3000:]
        [(labels, _)] = jvm_series(agent, cid)["container_jvm_info"]
        assert labels["jvm"] == jvm_name and labels["java_version"] == started["java_version"]
        assert labels["app_id"] == ""  # a systemd-style container, not a Kubernetes one
        # heap used moves while the program allocates and collects
        used = set()
        while not [e for e in j.lines if e["event"] == "done"]:
            v = agent.value("container_jvm_heap_used_bytes", container_id=cid, jvm=jvm_name)
            if v is not None:
                used.add(v)
            time.sleep(0.5)
        assert len(used) >= 2, used
        size = agent.value("container_jvm_heap_size_bytes", container_id=cid, jvm=jvm_name)
        assert size is not None and size >= max(used)
        done = j.event("done", 60)
        want = done["gc_total_ms"] / 1000
        assert done["gc_count"] > 100 and want > 0.05, done

        def gc_total() -> float:
            return sum(v for _, v in jvm_series(agent, cid).get("container_jvm_gc_time_seconds", []))

        got = wait_for(lambda: gc_total() >= want and gc_total(), 30, interval=0.5)
        print(f"GC time: agent {got:.4f} s, the program's MXBeans {want:.3f} s ({done['gc_count']} collections); "
              f"heap used seen: {sorted(used)}")
        assert want <= got <= want * 1.1, (got, want, jvm_series(agent, cid)["container_jvm_gc_time_seconds"])
        gcs = {lb["gc"] for lb, _ in jvm_series(agent, cid)["container_jvm_gc_time_seconds"]}
        assert gcs == {"G1 young collection pauses", "G1 full collection pauses", "G1 concurrent cycle pauses"}
        safepoint = agent.value("container_jvm_safepoint_time_seconds", container_id=cid)
        assert safepoint is not None and safepoint >= got * 0.9  # every G1 pause is a safepoint
        [p] = agent.processes(host_pid)
        assert p["jvm"] == {"status": "ok", "hsperfdata": "/tmp/hsperfdata_nobody/1", "jvm": jvm_name,
                            "java_version": started["java_version"]}
    finally:
        j.close()


def test_a_jvm_without_perf_data_exports_nothing_and_the_api_says_why(
        agent: AgentProcess, cgroups: TestCgroups, classes: Path) -> None:
    cid = cgroups.create("jvm-noperf")
    j = Jvm(cgroups, cid, classes, 0.5, "-XX:-UsePerfData")
    try:
        j.event("done", 60)
        host_pid = j.java_pid()

        def described() -> dict | None:
            ps = agent.processes(host_pid)
            return ps[0].get("jvm") if ps else None

        d = wait_for(described, 30, interval=0.5)
        assert d == {"status": "disabled", "hsperfdata": None,
                     "detail": "perf data disabled (-XX:-UsePerfData in command line)"}, d
        assert jvm_series(agent, cid) == {}
    finally:
        j.close()


def test_disable_jvm_monitoring_switches_it_off(agent_factory: AgentFactory, cgroups: TestCgroups,
                                                  classes: Path) -> None:
    a = agent_factory("--disable-jvm-monitoring", "--disable-l7-tracing", "--disable-profiling")
    cid = cgroups.create("jvm-off")
    j = Jvm(cgroups, cid, classes, 0.5)
    try:
        j.event("done", 60)
        host_pid = j.java_pid()
        # what the agent with JVM monitoring on would have reported by now (it reads new JVMs within ~1 s)
        assert wait_for(lambda: a.processes(host_pid), 10)
        time.sleep(3)
        assert jvm_series(a, cid) == {}
        assert "jvm" not in a.processes(host_pid)[0]
        assert not [n for n, _, _ in a.metrics() if n == "coroot_agent_tracked_jvms"]
    finally:
        j.close()

