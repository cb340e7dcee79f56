"""The README's set-up on a bare Debian 12: a fresh `debootstrap --variant=minbase bookworm`
root (the cached tarball tests/system/helpers.py keeps, as for test_image.py), a copy of this checkout, and in a
chroot the README's first command, `scripts/bootstrap.sh run`; the agent it starts answers
/healthz and a /metrics scrape (with a non-empty machine_id: minbase has no /etc/machine-id),
`coroot-agent check` beside it exits 0, and the test set-up (`scripts/bootstrap.sh setup-test`)
gets far enough to compile and run a C workload. Also: `check` beside a running agent on the
host, and its failure for a foreign process on the port.

Downloaded .deb files and pip wheels are cached under /var/cache/coroot-agent-test for a day,
so that a repeated run installs without downloading. COROOT_TEST_FIRST_COMMAND overrides the
command taken from the README (to try a new first line before the README shows it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.helpers import (
    DAY,
    DEBIAN_CACHE,
    REPO,
    AgentFactory,
    coroot_agent,
    free_port,
    minbase_rootfs,
)

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
       "LANG": "C.UTF-8", "PIP_CERT": "/etc/ssl/certs/host-ca.crt", "PIP_DEFAULT_TIMEOUT": "180"}


def _day_cache(name: str) -> Path:
    """A cache directory emptied when its stamp is more than a day old."""
    d = DEBIAN_CACHE / name
    stamp = DEBIAN_CACHE / f"{name}.stamp"
    if not stamp.exists() or time.time() - stamp.stat().st_mtime > DAY:
        shutil.rmtree(d, ignore_errors=True)
        stamp.touch()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _link_debs(src: Path, dest: Path) -> None:
    """Every .deb of `src` into `dest` that is not there yet (a hard link, or a copy across
    file systems)."""
    for deb in src.glob("*.deb"):
        target = dest / deb.name
        if target.exists():
            continue
        try:
            os.link(deb, target)
        except FileExistsError:
            pass
        except OSError:
            shutil.copy(deb, target)


def _mount(args: list[str], mounts: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(target)], check=True)
    mounts.append(target)


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Path]:
    """A fresh minbase root with /proc, /sys (cgroup, tracefs, debugfs, BTF, DMI under it) and
    /dev from the host, the host's network, and a copy of this checkout in /src."""
    root = tmp_path / "root"
    minbase_rootfs(root)
    assert not (root / "usr/bin/make").exists() and not (root / "usr/bin/gcc").exists()
    mounts: list[Path] = []
    try:
        for src in ("/proc", "/sys", "/dev"):
            _mount(["--rbind", src], mounts, root / src.lstrip("/"))
            subprocess.run(["mount", "--make-rslave", str(root / src.lstrip("/"))], check=True)
        # downloads survive the chroot: the .debs of earlier runs are linked in (apt's own
        # archives directory, and its lock, stay this run's: another run on this machine at the
        # same time would hold the lock of a shared one), new ones are linked back at the end;
        # pip's cache is shared (pip writes it atomically)
        debs = _day_cache("apt-archives")
        archives = root / "var/cache/apt/archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        _link_debs(debs, archives)
        _mount(["--bind", str(_day_cache("pip"))], mounts, root / "root/.cache/pip")
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/host-ca.crt")
        shutil.copytree(REPO, root / "src", symlinks=True, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache"))
        yield root
        _link_debs(archives, debs)
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-R", "-l", str(m)], check=False)


def _chroot(root: Path, cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), "/bin/sh", "-c", cmd], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def readme_first_command(readme: str) -> str:
    """The first command of the first sh block under "## Set up and run", comment dropped."""
    section = readme.split("## Set up and run", 1)[-1]
    block = section.split("```sh", 1)[-1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return next((line for line in lines if line), "")


def _kill_rooted_in(root: Path) -> None:
    """Every process whose root directory is `root` (the chroot), whatever its session."""
    for _ in range(50):
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/root").startswith(str(root)):
                    left.append(int(pid))
            except OSError:
                continue
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes still running in {root}")


# apt and pip in a chroot: each step has its own bound; the whole is minutes on a loaded machine
@pytest.mark.timeout(1800)
def test_readme_commands_on_bare_debian(bare: Path) -> None:
    first = os.environ.get("COROOT_TEST_FIRST_COMMAND") or readme_first_command((REPO / "README.md").read_text())
    assert first.endswith(" run"), f"the README's first command should end in `run`: {first!r}"
    port = free_port()
    log_path = bare / "bootstrap-run.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["chroot", str(bare), "/bin/sh", "-c",
             f'cd /src && {first} ARGS="--listen 127.0.0.1:{port}"'],
            env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = ""
        while time.monotonic() - t0 < 900:
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            try:
                if _get(port, "/healthz"):
                    metrics = _get(port, "/metrics")
                    break
            except OSError:
                time.sleep(0.5)
        run_s = time.monotonic() - t0
        assert metrics, f"no /healthz in 900 s:\n{log_path.read_text()[-4000:]}"
        ids = set(re.findall(r'machine_id="([^"]*)"', metrics))
        assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", next(iter(ids))), ids
        if not os.access("/sys/class/dmi/id/product_uuid", os.R_OK):
            # no machine-id in minbase and no DMI here: the id the agent keeps in storage.path
            kept = bare / "var/lib/coroot-agent/machine-id"
            assert kept.exists() and kept.read_text().strip() == ids.pop()
        assert "# TYPE " in metrics

        # the preflight beside the running agent: the port is ours, not a conflict
        r = _chroot(bare, f"coroot-agent check --no-probe --listen 127.0.0.1:{port}", 120)
        listen = [line for line in r.stdout.splitlines() if line.lstrip().startswith("listen")]
        assert listen and "held by the running coroot-agent, pid" in listen[0], r.stdout + r.stderr
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_rooted_in(bare)  # an agent left running would keep its uprobes on the host's libssl

    # the test set-up, then one workload compiled with the installed gcc and run
    t1 = time.monotonic()
    # without the single modules' heavy servers and toolchains (setup.sh's COROOT_AGENT_SETUP_SERVERS)
    r = _chroot(bare, f"cd /src && COROOT_AGENT_SETUP_SERVERS=0 {first[:-len(' run')]} setup-test", 1200)
    setup_s = time.monotonic() - t1
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    r = _chroot(bare, "gcc -O0 -fno-omit-frame-pointer -o /tmp/burn /src/tests/system/workloads/burn.c"
                      " && echo | /tmp/burn burn 0.2", 120)
    assert r.returncode == 0, r.stderr
    assert 0.1 <= float(_first_line(r.stdout)) < 5, r.stdout
    print(f"bare Debian: bootstrap.sh run to /metrics {run_s:.0f} s, setup-test {setup_s:.0f} s",
          file=sys.stderr)


def test_check_beside_running_agent_and_a_foreign_holder(tmp_path: Path, agent_factory: AgentFactory) -> None:
    agent = agent_factory(defaults=False)
    r = coroot_agent("check", "--no-probe", "--listen", f"127.0.0.1:{agent.port}", "--storage-path", agent.storage)
    listen = [line for line in r.stdout.splitlines() if line.lstrip().startswith("listen")]
    assert listen and f"held by the running coroot-agent, pid {agent.pid}" in listen[0], r.stdout
    assert r.returncode == 0, r.stdout + r.stderr
    agent.stop()

    foreign = socket.socket()
    foreign.bind(("127.0.0.1", 0))
    foreign.listen()
    port = foreign.getsockname()[1]
    try:
        r = coroot_agent("check", "--no-probe", "--listen", f"127.0.0.1:{port}", "--storage-path",
                         str(tmp_path / "store"))
    finally:
        foreign.close()
    listen = [line for line in r.stdout.splitlines() if line.lstrip().startswith("listen")]
    assert listen and "in use by another process" in listen[0] and "FAIL" in listen[0], r.stdout
    assert r.returncode != 0
