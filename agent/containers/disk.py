"""container_resources_disk_{size,used,reserved}_bytes{mount_point,device,volume}: the
capacity of the filesystems a container writes to, as the Coroot node agent reports them.

Which filesystems: those holding a file a process of the container has open for writing (an
absolute path outside /proc, /dev and /sys, not deleted), found by reading the processes'
/proc/PID/fd and fdinfo every `interval` seconds on the poll thread. (The node agent learns
them from every writable open the kernel reports; a scan sees only files held open, which is
what a database, a queue or a log writer does.) A filesystem once seen stays the container's
while it is still mounted in the container's view.

Each is named by the container's /proc/PID/mountinfo: its mount point inside the container and
its device number; pseudo filesystems (device major 0, except zfs) are left out. `device` is
the whole block device holding it (vda for vda1, nvme0n1 for nvme0n1p2, dm-0, md0, ...), from
/proc/diskstats, or "" when it is none of those (a loop device). `volume` would come from
container runtime metadata, which the agent does not read yet: "".

Sizes are read at scrape time with statfs through /proc/PID/root/<mount point>, in the units of
the node agent: size = blocks x bsize, used = (blocks - free) x bsize, reserved = (free -
available) x bsize.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from agent.component import Component
from agent.containers.registry import Registry
from agent.metrics import Families

log = logging.getLogger(__name__)

_BLOCK_DEVICE = re.compile(r"^(dm-\d+|(s|h|xv|v)d[a-z]|md\d+|mmcblk\d+|nvme\d+n\d+|rbd\d+)")
_SKIPPED_PREFIXES = ("/proc/", "/dev/", "/sys/")
MAX_MOUNTS_PER_CONTAINER = 256


@dataclass(frozen=True)
class Mount:
    mount_id: str
    major_minor: str
    mount_point: str  # as the container sees it


def parse_mountinfo(text: str) -> dict[str, Mount]:
    """/proc/PID/mountinfo -> mount id -> Mount, without pseudo filesystems (major 0) other
    than zfs. Mount points keep the kernel's octal escapes (\\040 for a space)."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        if fields[2].startswith("0:") and _fs_type(fields) != "zfs":
            continue
        out[fields[0]] = Mount(fields[0], fields[2], fields[4])
    return out


def _fs_type(fields: list[str]) -> str:
    try:
        sep = fields.index("-", 6)
    except ValueError:
        return ""
    return fields[sep + 1] if sep + 1 < len(fields) else ""


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parent_devices(diskstats: str) -> dict[str, str]:
    """/proc/diskstats -> "major:minor" -> the whole block device's name, for the devices whose
    name starts with one (vda1 -> vda) that diskstats also lists."""
    names: dict[str, str] = {}
    for line in diskstats.splitlines():
        f = line.split()
        if len(f) >= 14:
            names[f"{f[0]}:{f[1]}"] = f[2]
    known = set(names.values())
    out = {}
    for majmin, name in names.items():
        m = _BLOCK_DEVICE.match(name)
        if m and m.group(1) in known:
            out[majmin] = m.group(1)
    return out


def writable_mount_ids(procfs: str, pid: int) -> set[str]:
    """Mount ids of the files `pid` holds open for writing (O_WRONLY or O_RDWR), with an
    absolute path outside /proc, /dev and /sys that is not deleted."""
    base = f"{procfs}/{pid}"
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        return set()
    out = set()
    for fd in fds:
        try:
            dest = os.readlink(f"{base}/fd/{fd}")
        except OSError:
            continue
        if not dest.startswith("/") or dest.startswith(_SKIPPED_PREFIXES) or dest.endswith("(deleted)"):
            continue
        try:
            with open(f"{base}/fdinfo/{fd}") as f:
                info = f.read(4096)
        except OSError:
            continue
        flags, mnt = -1, ""
        for line in info.splitlines():
            if line.startswith("flags:"):
                try:
                    flags = int(line[6:].strip(), 8)
                except ValueError:
                    break
            elif line.startswith("mnt_id:"):
                mnt = line[7:].strip()
        if mnt and flags >= 0 and flags & (os.O_WRONLY | os.O_RDWR):
            out.add(mnt)
    return out


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


@dataclass(frozen=True)
class FsStat:
    size: int
    used: int
    reserved: int


def stat_fs(path: str) -> FsStat | None:
    try:
        s = os.statvfs(path)
    except OSError:
        return None
    return FsStat(s.f_blocks * s.f_bsize, (s.f_blocks - s.f_bfree) * s.f_bsize, (s.f_bfree - s.f_bavail) * s.f_bsize)


class DiskCollector(Component):
    """Capacity of the filesystems each container writes to."""

    name = "disk"

    def __init__(self, registry: Registry, procfs: str = "/proc", interval: float = 30.0) -> None:
        self.registry = registry
        self.procfs = procfs
        self.interval = interval
        self._last: float | None = None
        self._mounts: dict[str, dict[str, Mount]] = {}  # container id -> mount id -> Mount
        self._devices: dict[str, str] = {}
        # What a scrape reads, replaced whole by a tick.
        self._published: dict[str, tuple[Mount, ...]] = {}

    def on_rename(self, old: str, new: str) -> None:
        """Mounts found for `old` are `new`'s (both on the poll thread; a scrape reads the
        published copy, re-keyed whole)."""
        known = self._mounts.pop(old, None)
        if known is not None:
            self._mounts.setdefault(new, {}).update(known)
        published = dict(self._published)
        mounts = published.pop(old, None)
        if mounts is not None:
            published[new] = tuple(sorted({*published.get(new, ()), *mounts},
                                          key=lambda m: (m.mount_point, m.major_minor)))
            self._published = published

    def tick(self, now: float, gone: list[str]) -> None:
        for cid in gone:
            self._mounts.pop(cid, None)
        if self._last is not None and now - self._last < self.interval:
            if gone:
                self._published = {k: v for k, v in self._published.items() if k not in gone}
            return
        self._last = now
        self.update()

    def update(self) -> None:
        """Scan the containers' open files and mount tables."""
        self._devices = parent_devices(read_text(f"{self.procfs}/diskstats"))
        published: dict[str, tuple[Mount, ...]] = {}
        for c in self.registry.containers():
            pids = sorted(c.pids)
            if not pids:
                continue
            known = self._mounts.setdefault(c.id, {})
            table: dict[str, Mount] | None = None
            for pid in pids:
                if table is None:
                    table = parse_mountinfo(read_text(f"{self.procfs}/{pid}/mountinfo")) or None
                for mnt in writable_mount_ids(self.procfs, pid) - known.keys():
                    if table is not None and mnt in table and len(known) < MAX_MOUNTS_PER_CONTAINER:
                        known[mnt] = table[mnt]
            if table is not None:  # follow remounts; forget what is no longer mounted
                for mnt in list(known):
                    if mnt in table:
                        known[mnt] = table[mnt]
                    else:
                        del known[mnt]
            if known:
                published[c.id] = tuple(sorted(known.values(), key=lambda m: (m.mount_point, m.major_minor)))
        self._published = published

    def collect(self, f: Families) -> None:
        published, devices = self._published, self._devices
        for c in self.registry.containers():
            mounts = published.get(c.id)
            if not mounts:
                continue
            pids = sorted(c.pids)
            lbl = {"container_id": c.id, "app_id": c.app_id}
            seen = set()
            for m in mounts:
                device = devices.get(m.major_minor, "")
                if (m.mount_point, device) in seen:
                    continue
                seen.add((m.mount_point, device))
                st = None
                for pid in pids:
                    st = stat_fs(f"{self.procfs}/{pid}/root{_unescape(m.mount_point)}")
                    if st is not None:
                        break
                if st is None:
                    continue
                dls = {"mount_point": m.mount_point, "device": device, "volume": ""}
                f.gauge("container_resources_disk_size_bytes", "Total capacity of the volume", st.size, **lbl, **dls)
                f.gauge("container_resources_disk_used_bytes", "Used capacity of the volume", st.used, **lbl, **dls)
                f.gauge("container_resources_disk_reserved_bytes", "Reserved capacity of the volume",
                        st.reserved, **lbl, **dls)
