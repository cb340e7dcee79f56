"""Small readers of /proc shared by the modules that look at a process's open files."""

from __future__ import annotations

import os


def fd_targets(procfs: str, pid: int) -> dict[int, str]:
    """fd -> what it points at (a path, 'socket:[inode]', ...); empty when the process is gone."""
    base = f"{procfs}/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except (OSError, ValueError):
            continue
    return out
