"""The Dockerfile's install steps, run for real without a container engine: a clean Debian
bookworm (debootstrap, the distribution debian:bookworm-slim is built from) gets the
Dockerfile's COPY and RUN instructions in order, in a chroot; the last RUN step itself runs
`coroot-agent --version` inside it. Then the installed agent imports BCC and builds its probe
program text there. (The linter half is tests/unit/test_dockerfile.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.helpers import REPO, minbase_rootfs


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, argument) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture
def rootfs(tmp_path: Path):  # noqa: ANN201
    root = tmp_path / "root"
    minbase_rootfs(root)
    mounts = []
    try:
        for src, target in (("/proc", "proc"), ("/dev", "dev")):
            subprocess.run(["mount", "--rbind", src, str(root / target)], check=True)
            subprocess.run(["mount", "--make-rslave", str(root / target)], check=True)
            mounts.append(root / target)
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        # This machine reaches the internet through its own CA bundle; the chroot gets it too.
        (root / "etc" / "ssl" / "certs").mkdir(parents=True, exist_ok=True)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc" / "ssl" / "certs" / "host-ca.crt")
        yield root
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-R", "-l", str(m)], check=False)


# apt and pip in a chroot: each step has its own bound; the whole is minutes on a loaded machine
@pytest.mark.timeout(1800)
def test_dockerfile_install_steps_in_a_clean_debian_chroot(rootfs: Path) -> None:
    steps = instructions(REPO / "Dockerfile")
    assert steps[0] == ("FROM", "debian:bookworm-slim")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "PIP_CERT": "/etc/ssl/certs/host-ca.crt", "PIP_DEFAULT_TIMEOUT": "180"}
    ran = 0
    for word, arg in steps[1:]:
        if word == "COPY":
            *sources, dest = arg.split()
            target = rootfs / dest.lstrip("/")
            for src in sources:
                path = REPO / src
                if dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target / path.name)
                else:
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif word == "RUN":
            r = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", arg], env=env, capture_output=True,
                               text=True, timeout=1800)
            assert r.returncode == 0, f"RUN {arg[:80]}...\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            ran += 1
            if "--version" in arg:
                assert re.search(r"coroot-agent \d+\.\d+", r.stdout + r.stderr)
        else:
            assert word in ("USER", "EXPOSE", "ENTRYPOINT", "CMD", "ENV", "LABEL", "WORKDIR"), word
    assert ran == 2
    # The installed agent finds BCC and its programs inside the image's filesystem.
    probe = ("import bcc; from agent.ebpf import loader; "
             "t = loader.program_text(list(loader.FAMILIES)); print(len(t), bcc.__file__)")
    r = subprocess.run(["chroot", str(rootfs), "/opt/coroot-agent/venv/bin/python", "-c", probe], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    size, bcc_path = r.stdout.split()
    assert int(size) > 10_000 and bcc_path.startswith("/usr/lib/python3/dist-packages/bcc")
    r = subprocess.run(["chroot", str(rootfs), "coroot-agent", "--help"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout
