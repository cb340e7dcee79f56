"""deploy/matrix/run.py's own pieces: the newc cpio it writes for the initramfs reads back with
the kernel's format rules, module dependencies come first, and the table names failures."""

from __future__ import annotations

import io
import stat
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "matrix"))
import run  # noqa: E402


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_newc_round_trip() -> None:
    buf = io.BytesIO()
    run._cpio_entry(buf, "bin", stat.S_IFDIR | 0o755, ino=1)
    run._cpio_entry(buf, "init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n", 2)
    run._cpio_entry(buf, "odd", stat.S_IFREG | 0o644, b"x" * 5, 3)
    run._cpio_entry(buf, "TRAILER!!!", 0, ino=0)
    got = read_newc(buf.getvalue())
    assert got["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    assert got["odd"][1] == b"xxxxx" and stat.S_ISDIR(got["bin"][0])


def test_modules_come_after_their_dependencies(tmp_path: Path) -> None:
    base = tmp_path / "lib" / "modules" / "6.1.0-1-amd64"
    base.mkdir(parents=True)
    (base / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz:\nkernel/fs/netfs/netfs.ko.xz:\nkernel/fs/overlayfs/overlay.ko.xz:\n")
    mods = [p.name for p in run.modules_for(tmp_path, "6.1.0-1-amd64", ("9pnet_virtio", "9p", "virtio_pci"))]
    assert mods == ["9pnet.ko.xz", "9pnet_virtio.ko.xz", "netfs.ko.xz", "9p.ko.xz"]  # virtio_pci: built in


def test_table_marks_failures_and_missing_results() -> None:
    ok = {"kernel": "6.1.0-56-amd64", "families": dict.fromkeys(run.FAMILIES, "ok"),
          "checks": dict.fromkeys(run.CHECKS, "ok"), "minutes": 2.4}
    bad = {"kernel": "5.10.0-46-amd64", "families": {"proc": "ok", "l7": "cannot load"}, "checks": {}, "minutes": 3}
    lines = run.table([ok, bad]).splitlines()
    assert lines[2].count("| ok ") == len(run.FAMILIES) + len(run.CHECKS)
    assert "FAIL: cannot load" in lines[3] and "| - |" in lines[3]
