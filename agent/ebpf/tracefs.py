"""Make sure tracefs and debugfs are mounted: BCC reads tracepoint formats from them.

Mounts what is missing (needs CAP_SYS_ADMIN) and says what it did; mounts nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

TRACEFS = "/sys/kernel/tracing"
DEBUGFS = "/sys/kernel/debug"


@dataclass(frozen=True)
class MountState:
    tracefs: bool
    debugfs: bool
    mounted_now: tuple[str, ...]
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.tracefs


def _is_mounted(path: str, fstype: str, mounts: str = "/proc/self/mounts") -> bool:
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] == path and parts[2] == fstype:
                    return True
    except OSError:
        pass
    return False


def _mount(fstype: str, target: str) -> str:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(fstype.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        return f"mount -t {fstype} {target}: {os.strerror(err)}"
    return ""


def tracefs_events_dir() -> str | None:
    for d in (os.path.join(TRACEFS, "events"), os.path.join(DEBUGFS, "tracing", "events")):
        if os.path.isdir(d):
            return d
    return None


def ensure_mounted() -> MountState:
    mounted_now = []
    errors = []
    for fstype, path in (("debugfs", DEBUGFS), ("tracefs", TRACEFS)):
        if _is_mounted(path, fstype):
            continue
        err = _mount(fstype, path)
        if err:
            errors.append(err)
        else:
            mounted_now.append(path)
            log.info("mounted %s at %s", fstype, path)
    state = MountState(
        tracefs=tracefs_events_dir() is not None,
        debugfs=_is_mounted(DEBUGFS, "debugfs"),
        mounted_now=tuple(mounted_now),
        error="; ".join(errors),
    )
    if errors and not state.tracefs:
        log.error("tracefs is not available: %s", state.error)
    return state


def remove_uprobe_events(names: dict[str, int]) -> None:
    """Remove these probe definitions of this agent from tracing/uprobe_events where they are
    still there: a detach of a probe whose process has exited can leave its definition behind
    (busy at that moment), and BCC forgets it either way. `names`: name -> tries left; a name
    is dropped once gone or out of tries."""
    events = tracefs_events_dir()
    path = os.path.join(os.path.dirname(events), "uprobe_events") if events else ""
    try:
        with open(path) as f:
            defined = {line.split()[0].split("/", 1)[-1] for line in f if line.strip()}
    except OSError:
        names.clear()  # no uprobe_events: BCC used the perf PMU, which leaves nothing behind
        return
    for name in list(names):
        if name not in defined:
            del names[name]
            continue
        try:  # one write(2) (a buffered file in append mode seeks first, which tracefs refuses)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                os.write(fd, f"-:uprobes/{name}\n".encode())
            finally:
                os.close(fd)
            del names[name]
        except OSError:
            names[name] -= 1
            if names[name] <= 0:
                log.debug("could not remove the uprobe definition %s", name)
                del names[name]
