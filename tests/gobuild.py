"""Go builds for the tests (Debian's golang-go): the standard library's packages are compiled
once into a build cache that outlives the run, so only the first run on a machine pays for them
(a cold -buildmode=pie build compiles the whole library again; measured here at up to 3 minutes
under load, warm the four system-test builds took 10 s). Go's cache is safe for concurrent
builds; it trims what has not been used for days."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

CACHE = Path(os.environ.get("COROOT_AGENT_TEST_GOCACHE", "/var/cache/coroot-agent-test/go-build"))


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


def go_build(source: Path, out: Path, work: Path, *flags: str, cgo: bool = False, gopath: Sequence[str] = ()) -> str:
    """`go build flags -o out source` in `work`; the path of the binary. With `gopath` (e.g.
    /usr/share/gocode, where Debian's golang-*-dev packages put their sources) the build is in
    GOPATH mode (no module proxy is needed) with those directories after the build's own."""
    env = {**go_env(work), "CGO_ENABLED": "1" if cgo else "0"}
    if gopath:
        env.update(GO111MODULE="off", GOPATH=os.pathsep.join([env["GOPATH"], *gopath]))
    subprocess.run(["go", "build", *flags, "-o", str(out), str(source)], cwd=work, env=env, check=True,
                   capture_output=True, timeout=300)
    return str(out)
