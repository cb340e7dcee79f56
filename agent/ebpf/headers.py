"""Find kernel headers for BCC's compiler, in the order the design fixes:

1. /lib/modules/$(uname -r)/build (with its include/ directory): BCC finds it itself;
2. /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS): BCC unpacks it itself;
3. the closest installed Debian `linux-headers-*`: Debian splits them into an arch part
   (`-amd64`: generated headers, config) and a common part; BCC wants one tree, so we build a
   tree of symbolic links merging both under a run directory and point BCC_KERNEL_SOURCE at it.
   This never touches /lib/modules. It is sound because our programs read only tracepoint
   arguments and helper results, never kernel struct fields through header layouts.

Decides and prepares; compiles nothing.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

RUN_DIR = "/run/coroot-agent"


@dataclass(frozen=True)
class HeadersSource:
    kind: str  # "modules" | "kheaders" | "closest" | "none"
    path: str  # what BCC will read
    detail: str  # one line for `check` and the start-up log
    env: tuple[tuple[str, str], ...] = ()  # environment BCC needs to find it

    @property
    def found(self) -> bool:
        return self.kind != "none"


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release.split("-")[0])[:3])


def _usr_src_candidates(usr_src: str) -> list[tuple[str, str, str]]:
    """(name, arch dir, common dir) for each installed Debian linux-headers package."""
    try:
        names = sorted(os.listdir(usr_src))
    except OSError:
        return []
    out = []
    for name in names:
        # 6.1.0-56-amd64, 5.10.0-46-cloud-amd64, and backports' 6.12.95+deb12-amd64
        if name.endswith("-common"):
            continue
        m = re.fullmatch(r"linux-headers-(\d+\.\d+\.\d+(?:\+[\w.~]+)?(?:-\d+)?)-([\w-]+)", name)
        if not m:
            continue
        arch_dir = os.path.join(usr_src, name)
        common = os.path.join(usr_src, f"linux-headers-{m.group(1)}-common")
        if os.path.isdir(os.path.join(arch_dir, "include")) and os.path.isdir(common):
            out.append((name, arch_dir, common))
        elif os.path.isdir(os.path.join(arch_dir, "include", "linux")):
            out.append((name, arch_dir, ""))  # an unsplit tree
    return out


def closest(release: str, usr_src: str = "/usr/src") -> tuple[str, str, str] | None:
    """The installed headers whose version is nearest the running kernel's (newest on ties)."""
    want = _version_key(release)
    cands = _usr_src_candidates(usr_src)
    if not cands:
        return None

    def distance(c: tuple[str, str, str]) -> tuple[int, tuple[int, ...]]:
        have = _version_key(c[0].removeprefix("linux-headers-"))
        d = sum(abs(a - b) * w for a, b, w in zip(want, have, (1_000_000, 1000, 1), strict=False))
        return d, tuple(-x for x in have)

    return min(cands, key=distance)


def merge_trees(dst: str, sources: list[str]) -> int:
    """Make `dst` a directory whose entries link into `sources`; where more than one source
    has a directory of the same name, recurse. Returns the number of links made."""
    os.makedirs(dst, exist_ok=True)
    entries: dict[str, list[str]] = {}
    for src in sources:
        for name in os.listdir(src):
            entries.setdefault(name, []).append(os.path.join(src, name))
    made = 0
    for name, paths in entries.items():
        target = os.path.join(dst, name)
        dirs = [p for p in paths if os.path.isdir(p)]
        if len(dirs) > 1:
            made += merge_trees(target, dirs)
            continue
        if os.path.lexists(target):
            continue
        os.symlink(os.path.realpath(dirs[0] if dirs else paths[-1]), target)
        made += 1
    return made


def resolve(
    release: str | None = None,
    modules_dir: str = "/lib/modules",
    kheaders: str = "/sys/kernel/kheaders.tar.xz",
    usr_src: str = "/usr/src",
    run_dir: str = RUN_DIR,
    prepare: bool = True,
) -> HeadersSource:
    """Pick the headers BCC will use; with `prepare`, build the merged tree if needed."""
    release = release or os.uname().release
    build = os.path.join(modules_dir, release, "build")
    if os.path.isdir(os.path.join(build, "include")):
        return HeadersSource("modules", build, f"{build} (headers of the running kernel)")
    if os.path.exists(kheaders):
        return HeadersSource("kheaders", kheaders, f"{kheaders} (built into the kernel)")
    pick = closest(release, usr_src)
    if pick is None:
        return HeadersSource(
            "none", "",
            f"no headers for {release}: none in {build}, no {kheaders}, no linux-headers-* "
            f"in {usr_src}; install them with `apt-get install linux-headers-$(dpkg "
            f"--print-architecture)` (or run `make setup`)",
        )
    name, arch_dir, common = pick
    tree = os.path.join(run_dir, "kernel-headers", name)
    if prepare and not os.path.isdir(os.path.join(tree, "include", "linux")):
        sources = [s for s in (common, arch_dir) if s]
        n = merge_trees(tree, sources)
        log.info("kernel headers: linked %s into %s (%d links)", " + ".join(sources), tree, n)
    return HeadersSource(
        "closest", tree,
        f"{arch_dir} (closest installed to {release}; merged tree {tree})",
        env=(("BCC_KERNEL_SOURCE", tree),),
    )
