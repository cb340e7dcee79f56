"""Container filesystems: mountinfo and diskstats as the kernel writes them, and which open
files name a filesystem the container writes to (a procfs laid out in a temporary directory)."""

from __future__ import annotations

import os
from pathlib import Path

from agent.containers.disk import Mount, parent_devices, parse_mountinfo, writable_mount_ids

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 27 0:26 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
31 27 0:45 / /var/lib/docker/overlay2/abc/merged rw,relatime - overlay overlay rw,lowerdir=/x
40 27 0:50 / /tank rw,relatime shared:9 - zfs tank rw,xattr
41 27 259:3 /data /mnt/my\\040disk rw,relatime - xfs /dev/nvme0n1p3 rw
42 27 7:1 / /var/tmp/img rw - ext4 /dev/loop1 rw
bad line
"""

DISKSTATS = """\
   7       1 loop1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       1 vda1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 259       0 nvme0n1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 259       3 nvme0n1p3 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 253       0 dm-0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
   8      17 sdb1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 179       0 mmcblk0 1 0 0 0 0 0 0 0 0 0 0 0 0 0
 179       1 mmcblk0p1 1 0 0 0 0 0 0 0 0 0 0 0 0 0
   9       0 md0 1 0 0 0
"""


def test_mountinfo_keeps_block_filesystems_and_zfs() -> None:
    m = parse_mountinfo(MOUNTINFO)
    assert m == {
        "27": Mount("27", "254:0", "/"),
        "40": Mount("40", "0:50", "/tank"),
        "41": Mount("41", "259:3", "/mnt/my\\040disk"),
        "42": Mount("42", "7:1", "/var/tmp/img"),
    }


def test_whole_block_device_of_each_device_number() -> None:
    assert parent_devices(DISKSTATS) == {
        "254:0": "vda", "254:1": "vda",
        "259:0": "nvme0n1", "259:3": "nvme0n1",
        "253:0": "dm-0",
        "179:0": "mmcblk0", "179:1": "mmcblk0",
    }  # loop1: no disk; sdb1: its disk is not listed; md0: a short line


def make_fds(root: Path, pid: int, fds: dict[int, tuple[str, str, str]]) -> None:
    """fd -> (target, flags in octal, mnt_id)."""
    (root / str(pid) / "fd").mkdir(parents=True)
    (root / str(pid) / "fdinfo").mkdir()
    for fd, (target, flags, mnt) in fds.items():
        os.symlink(target, root / str(pid) / "fd" / str(fd))
        (root / str(pid) / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t{flags}\nmnt_id:\t{mnt}\nino:\t1\n")


def test_only_files_open_for_writing_outside_pseudo_trees_count(tmp_path: Path) -> None:
    make_fds(tmp_path, 7, {
        0: ("/dev/null", "0100002", "5"),
        1: ("pipe:[123]", "01", "14"),
        3: ("/var/lib/postgresql/base/1", "02100002", "27"),  # O_RDWR
        4: ("/var/log/app.log", "0102001", "28"),  # O_WRONLY|O_APPEND
        5: ("/etc/hosts", "0100000", "29"),  # read-only
        6: ("/proc/7/status", "0100002", "30"),
        7: ("/sys/fs/cgroup/x", "0100001", "31"),
        8: ("/tmp/gone (deleted)", "0100002", "32"),
        9: ("socket:[99]", "02", "8"),
        10: ("/data/x", "garbage", "33"),
    })
    assert writable_mount_ids(str(tmp_path), 7) == {"27", "28"}
    assert writable_mount_ids(str(tmp_path), 8) == set()  # no such process
