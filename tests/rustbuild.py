"""Rust builds for the tests, offline, with Debian's toolchain (`cargo`, `rustc`) against the
crates Debian packages (librust-rustls-dev, librust-rustls-pemfile-dev: their sources in
/usr/share/cargo/registry, used as cargo's crates.io through a directory source; nothing is
fetched). A build is cached under CACHE, keyed by the hash of the project's files, the
toolchain's versions and the registry's crate directories: a cold build of the rustls peer
(ring's C and assembly included) took ~2 min here on 2 busy cores; a cached one is a file copy.
Cargo's own target directory is kept next to it, so a changed source rebuilds only its crate."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("COROOT_AGENT_TEST_RUSTCACHE", "/var/cache/coroot-agent-test/rust-build"))
REGISTRY = Path("/usr/share/cargo/registry")
CARGO_CONFIG = f"""[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "{REGISTRY}"

[net]
offline = true
"""


def _version(tool: str) -> str:
    return subprocess.run([tool, "--version"], check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def build_key(project: Path) -> str:
    """The hash a build of `project` is cached under."""
    h = hashlib.sha256()
    for path in sorted(p for p in project.rglob("*") if p.is_file() and "target" not in p.parts):
        h.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(_version("/usr/bin/cargo").encode() + _version("/usr/bin/rustc").encode())
    h.update("\n".join(sorted(os.listdir(REGISTRY))).encode())
    return h.hexdigest()[:16]


def cargo_build(project: Path, binary: str, *, rustflags: str = "") -> Path:
    """`cargo build --release` of `project` (a directory with Cargo.toml), offline; the path of
    the cached `binary` it makes."""
    if not (REGISTRY / "rustls-0.20.8").is_dir() and not any(REGISTRY.glob("rustls-*")):
        raise RuntimeError("apt-get install cargo rustc librust-rustls-dev librust-rustls-pemfile-dev")
    key = build_key(project) + (hashlib.sha256(rustflags.encode()).hexdigest()[:8] if rustflags else "")
    cache = CACHE
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "coroot-agent-test-rust-build"
        cache.mkdir(parents=True, exist_ok=True)
    out = cache / key / binary
    if out.exists():
        return out
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (concurrent test runs share the cache)
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(dir=cache) as work:
            src = Path(work) / "src"
            shutil.copytree(project, src, ignore=shutil.ignore_patterns("target", "Cargo.lock"))
            home = Path(work) / "cargo-home"
            home.mkdir()
            (home / "config.toml").write_text(CARGO_CONFIG)
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "CARGO_HOME": str(home), "RUSTC": "/usr/bin/rustc",
                   "CARGO_TARGET_DIR": str(cache / ("target-" + key[-8:] if rustflags else "target")),
                   "RUSTFLAGS": rustflags}
            r = subprocess.run(["/usr/bin/cargo", "build", "--release", "--offline"], cwd=src, env=env,
                               capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"cargo build of {project} failed:\n{r.stderr[-4000:]}")
            built = Path(env["CARGO_TARGET_DIR"]) / "release" / binary
            (cache / key).mkdir(exist_ok=True)
            tmp = cache / key / f".{binary}.tmp"
            shutil.copy2(built, tmp)
            os.replace(tmp, out)
    return out
