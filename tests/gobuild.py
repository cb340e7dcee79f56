"""Go builds for the tests (Debian's golang-go): the standard library's packages are compiled
once into a build cache that outlives the run, so only the first run on a machine pays for them
(a cold -buildmode=pie build compiles the whole library again; measured here at up to 3 minutes
under load, warm the four system-test builds took 10 s). Go's cache is safe for concurrent
builds; it trims what has not been used for days."""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CACHE = Path(os.environ.get("COROOT_AGENT_TEST_GOCACHE", "/var/cache/coroot-agent-test/go-build"))

# Go 1.15 (the stack ABI, before 1.17's register ABI): Debian bullseye's golang-1.15 packages,
# fetched once by the tests that need them and unpacked (not installed: a Go toolchain is static
# binaries and its sources) into TOOLCHAINS, checked against the suite's Packages index.
TOOLCHAINS = Path(os.environ.get("COROOT_AGENT_TEST_GOROOTS", "/var/cache/coroot-agent-test"))
DEBIAN = os.environ.get("COROOT_AGENT_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
OLD_GO = {"1.15": ("bullseye", ("golang-1.15-go", "golang-1.15-src"))}


def go_env(work: Path) -> dict[str, str]:
    """The environment of a build in `work`: the shared cache (or one in `work` where it cannot
    be made), its own GOPATH and HOME, no GOFLAGS from outside, cgo off."""
    cache = CACHE
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = work / "cache"
    return {**os.environ, "GOCACHE": str(cache), "GOPATH": str(work / "gopath"), "GOFLAGS": "", "CGO_ENABLED": "0",
            "HOME": str(work)}


def _packages(suite: str, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """name -> (pool path, sha256) from the suite's amd64 Packages index."""
    with urllib.request.urlopen(f"{DEBIAN}/dists/{suite}/main/binary-amd64/Packages.xz", timeout=60) as r:
        index = lzma.decompress(r.read()).decode(errors="replace")
    out: dict[str, tuple[str, str]] = {}
    for para in index.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Package") in names and "Filename" in fields and "SHA256" in fields:
            out[fields["Package"]] = (fields["Filename"], fields["SHA256"])
    missing = set(names) - set(out)
    if missing:
        raise RuntimeError(f"{suite}: no {sorted(missing)} in its Packages index")
    return out


def old_go(version: str = "1.15") -> str:
    """The `go` command of an old Go release (OLD_GO), downloaded and unpacked on first use
    (~60 MB; one process at a time: a lock file beside the cache)."""
    suite, names = OLD_GO[version]
    root = TOOLCHAINS / f"go-{version}"
    go = root / "usr" / "lib" / f"go-{version}" / "bin" / "go"
    if go.exists():
        return str(go)
    TOOLCHAINS.mkdir(parents=True, exist_ok=True)
    with open(TOOLCHAINS / f"go-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if go.exists():
            return str(go)
        with tempfile.TemporaryDirectory(dir=TOOLCHAINS) as tmp:
            unpacked = Path(tmp) / "root"
            for name, (path, sha256) in _packages(suite, names).items():
                deb = Path(tmp) / f"{name}.deb"
                with urllib.request.urlopen(f"{DEBIAN}/{path}", timeout=300) as r, open(deb, "wb") as f:
                    shutil.copyfileobj(r, f)
                if hashlib.sha256(deb.read_bytes()).hexdigest() != sha256:
                    raise RuntimeError(f"{path}: SHA256 differs from the {suite} index")
                subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, capture_output=True)
            if root.exists():
                shutil.rmtree(root)
            unpacked.rename(root)
    return str(go)


def go_build(source: Path, out: Path, work: Path, *flags: str, cgo: bool = False, gopath: Sequence[str] = (),
             go: str = "go") -> str:
    """`go build flags -o out source` in `work`; the path of the binary. With `gopath` (e.g.
    /usr/share/gocode, where Debian's golang-*-dev packages put their sources) the build is in
    GOPATH mode (no module proxy is needed) with those directories after the build's own. `go`:
    another toolchain's command (old_go()), with its own GOROOT and build cache."""
    env = {**go_env(work), "CGO_ENABLED": "1" if cgo else "0"}
    if go != "go":
        goroot = Path(go).parent.parent
        env.update(GOROOT=str(goroot), GOCACHE=f"{env['GOCACHE']}-{goroot.name}")
    if gopath:
        env.update(GO111MODULE="off", GOPATH=os.pathsep.join([env["GOPATH"], *gopath]))
    subprocess.run([go, "build", *flags, "-o", str(out), str(source)], cwd=work, env=env, check=True,
                   capture_output=True, timeout=300)
    return str(out)
