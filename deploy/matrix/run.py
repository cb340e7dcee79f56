"""The kernel matrix on this machine: boot Debian's 5.10, 6.1 and 6.12 kernels under qemu (TCG;
`--accel kvm` where nested KVM really works) with the host's own userland — its root shared
read-only over 9p, writable tmpfs where the agent writes — and each kernel's own modules and
headers, run deploy/matrix/smoke.py inside, and print a table kernel × probe family and check.

Kernels and headers come from Debian's archive through a private apt configuration (nothing
is installed on the host): bullseye (5.10), bookworm (6.1), bookworm-backports (6.12).
Everything is cached under /var/cache/coroot-agent-matrix.

Run as root: `python deploy/matrix/run.py [--kernels 5.10 6.1 6.12] [--accel tcg]`.
Needs qemu-system-x86 and busybox-static (`apt-get install qemu-system-x86 busybox-static`).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/coroot-agent-matrix")
SOURCES = """\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
"""
NINEP_MODULES = ("9pnet_virtio", "9p", "virtio_pci", "virtio_blk", "overlay")
FAMILIES = ("proc", "tcp", "l7", "logs", "profiler")
CHECKS = ("tcp connect counted", "http span stored", "cpu samples stored")


def say(msg: str) -> None:
    print(f"matrix: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- packages ---

def _apt_options() -> list[str]:
    d = CACHE / "apt"
    return ["-o", f"Dir::State={d}/state", "-o", f"Dir::Cache={d}/cache", "-o", f"Dir::Etc::SourceList={d}/sources.list",
            "-o", "Dir::Etc::SourceParts=/dev/null", "-o", "Dir::State::status=/var/lib/dpkg/status"]


def apt(*args: str) -> str:
    return subprocess.run([args[0], *_apt_options(), *args[1:]], check=True, capture_output=True, text=True).stdout


def apt_update() -> None:
    d = CACHE / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "sources.list").write_text(SOURCES)
    lists = d / "state" / "lists"
    fresh = [p for p in lists.glob("*Packages*") if time.time() - p.stat().st_mtime < 86400]
    if not fresh:
        say("apt update (private lists under /var/cache/coroot-agent-matrix/apt)")
        apt("apt-get", "update", "-qq")


def newest(meta: str, series: str) -> str:
    versions = [line.split("|")[1].strip() for line in apt("apt-cache", "madison", meta).splitlines()]
    mine = [v for v in versions if v.startswith(series + ".")]
    if not mine:
        raise SystemExit(f"no {meta} for kernel {series} in bullseye, bookworm or bookworm-backports")
    return mine[0]  # madison lists the newest first


def depends(pkg: str) -> list[str]:
    out = []
    for line in apt("apt-cache", "depends", pkg).splitlines():
        m = re.match(r"\s+(?:\|)?Depends: (\S+)", line)
        if m and not m.group(1).startswith("<"):
            out.append(m.group(1))
    return out


def fetch(series: str) -> Path:
    """The kernel image, modules and headers of the newest `series` kernel, unpacked."""
    root = CACHE / series / "root"
    if (root / ".done").exists():
        for rel in (root / "lib" / "modules").iterdir():
            if not (rel / "modules.dep").exists():
                subprocess.run(["depmod", "-b", str(root), rel.name], check=True)
        return root
    version = newest("linux-image-amd64", series)
    image = [d for d in depends(f"linux-image-amd64={version}") if d.startswith("linux-image-")][0]
    headers = [d for d in depends(f"linux-headers-amd64={version}") if d.startswith("linux-headers-")][0]
    pkgs = [image, headers] + [d for d in depends(headers) if d.startswith(("linux-headers-", "linux-kbuild-"))]
    debs = CACHE / series / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    say(f"{series}: downloading {', '.join(pkgs)}")
    for p in pkgs:
        apt_download(p, debs)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    for rel in (root / "lib" / "modules").iterdir():  # what the package's postinst would run
        subprocess.run(["depmod", "-b", str(root), rel.name], check=True)
    (root / ".done").write_text(version)
    return root


def apt_download(pkg: str, dest: Path) -> None:
    subprocess.run(["apt-get", *_apt_options(), "download", pkg], cwd=dest, check=True, capture_output=True)


# ------------------------------------------------------------------------ initramfs ---

def _cpio_entry(out: io.BytesIO, name: str, mode: int, data: bytes = b"", ino: int = 1) -> None:
    namez = name.encode() + b"\0"
    header = "070701" + "".join(f"{v:08x}" for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0))
    out.write(header.encode() + namez)
    out.write(b"\0" * ((4 - (110 + len(namez)) % 4) % 4))
    out.write(data)
    out.write(b"\0" * ((4 - len(data) % 4) % 4))


def _module_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return raw


def modules_for(root: Path, release: str, wanted: tuple[str, ...]) -> list[Path]:
    """The module files for `wanted` and their dependencies, dependencies first; built-ins skipped."""
    base = root / "lib" / "modules" / release
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", Path(m).name).replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return [base / m for m in order]


def initramfs(root: Path, release: str) -> Path:
    out_path = CACHE / f"initramfs-{release}.cpio"
    buf = io.BytesIO()
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "modules", "host", "kernel", "out"):
        _cpio_entry(buf, d, stat.S_IFDIR | 0o755, ino=ino)
        ino += 1
    _cpio_entry(buf, "bin/busybox", stat.S_IFREG | 0o755, Path("/usr/bin/busybox").read_bytes(), ino)
    ino += 1
    init = (REPO / "deploy" / "matrix" / "init.sh").read_text().replace("@REPO@", str(REPO))
    _cpio_entry(buf, "init", stat.S_IFREG | 0o755, init.encode(), ino)
    ino += 1
    order = []
    for mod in modules_for(root, release, NINEP_MODULES):
        name = re.sub(r"\.(xz|zst)$", "", mod.name)
        _cpio_entry(buf, f"modules/{name}", stat.S_IFREG | 0o644, _module_bytes(mod), ino)
        ino += 1
        order.append(name)
    _cpio_entry(buf, "modules.order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode(), ino)
    _cpio_entry(buf, "TRAILER!!!", 0, ino=0)
    out_path.write_bytes(buf.getvalue())
    return out_path


# --------------------------------------------------------------------------- boot ---

def boot(series: str, accel: str, timeout: float) -> dict:
    root = fetch(series)
    release = next(p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir())
    kernel = next((root / "boot").glob("vmlinuz-*"))
    ramfs = initramfs(root, release)
    out = CACHE / series / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    console = CACHE / series / "console.log"
    cmd = [
        "qemu-system-x86_64", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host", "-smp", "2",
        "-m", "4096", "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(ramfs),
        "-append", "console=ttyS0 panic=-1 quiet",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={root},mount_tag=kernel,security_model=none,readonly=on",
        "-virtfs", f"local,path={out},mount_tag=out,security_model=none",
    ]
    say(f"{series}: booting {release} ({accel})")
    t0 = time.monotonic()
    with open(console, "wb") as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            say(f"{series}: no result after {timeout:.0f} s")
    took = time.monotonic() - t0
    result_file = out / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        tail = console.read_text(errors="replace")[-1500:]
        smoke = (out / "smoke.log").read_text(errors="replace")[-1500:] if (out / "smoke.log").exists() else ""
        result = {"kernel": release, "families": {}, "checks": {}, "error": (smoke or tail)[-600:]}
    result["minutes"] = round(took / 60, 1)
    return result


def table(results: list[dict]) -> str:
    cols = [*FAMILIES, *CHECKS]
    lines = ["| kernel | " + " | ".join(cols) + " | minutes |", "|---" * (len(cols) + 2) + "|"]
    for r in results:
        cells = []
        for c in FAMILIES:
            v = r.get("families", {}).get(c, "-")
            cells.append("ok" if v == "ok" else f"FAIL: {v}"[:60] if v != "-" else "-")
        for c in CHECKS:
            v = r.get("checks", {}).get(c, "-")
            cells.append("ok" if v == "ok" else f"FAIL: {v}"[:60] if v != "-" else "-")
        lines.append(f"| {r['kernel']} | " + " | ".join(cells) + f" | {r.get('minutes', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", nargs="+", default=["5.10", "6.1", "6.12"])
    ap.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per kernel")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (9p shares of / and the guest's mounts)")
    for tool in ("qemu-system-x86_64", "busybox", "dpkg-deb"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install qemu-system-x86 busybox-static")
    apt_update()
    t0 = time.monotonic()
    results = [boot(k, args.accel, args.timeout) for k in args.kernels]
    print(table(results))
    for r in results:
        if "error" in r:
            print(f"\n{r['kernel']}: {r['error']}")
    print(f"\n{len(results)} kernels in {(time.monotonic() - t0) / 60:.1f} minutes")
    (CACHE / "last-table.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
