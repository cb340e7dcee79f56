"""Opening a log file inside a process's root without being led out of it.

The agent runs as root and opens files that other (possibly hostile) processes name: a path a
process opened, or a file a runtime wrote. Whatever those processes control (symlinks, `..`,
FIFOs, sockets, devices, /proc magic links) must not make the agent read anything but a regular
file whose resolved path lies under the allowed prefix, within that process's root.

`open_in_root` resolves with openat2(2) (RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_SYMLINKS: a path without symlinks is its own resolved path); a path with a symlink,
or a kernel without openat2 (before 5.6, or a seccomp filter), goes through a walk, one
component at a time with O_PATH | O_NOFOLLOW, where symlinks are read as text and resolved
again inside the root (bounded count), so neither `..` nor an absolute target nor a magic link
can leave it. The final file is only ever opened by re-opening its O_PATH descriptor, after it
was checked to be a regular file, with O_NONBLOCK: a FIFO or device is never opened for reading.
`open_proc_fd` does the same for /proc/PID/fd/N (the very file a process holds).

Resolves and opens; reads nothing, and never blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import stat
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_SYMLINKS = 40  # as the kernel's own limit on a path walk
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
# /var/log is often a mount of its own (a volume, a tmpfs): crossing mounts is allowed.
_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())


class Refused(OSError):
    """The path resolves to something the agent must not read. `reason` is a short word for a
    metric label (relative, dotdot, outside, not_regular, changed); `detail` says more."""

    def __init__(self, reason: str, path: str, detail: str = "") -> None:
        super().__init__(errno.EPERM, f"{path}: {detail or reason}")
        self.reason = reason
        self.path = path
        self.detail = detail or reason


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall: Callable[..., int] | None
try:
    _syscall = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):
    _syscall = None


class _Openat2:
    """openat2(2) through libc's syscall(); switched off for good once the kernel says ENOSYS."""

    def __init__(self) -> None:
        self.available = _syscall is not None and _SYS_OPENAT2 is not None

    def __call__(self, dirfd: int, path: str, flags: int, resolve: int) -> int:
        if _syscall is None or _SYS_OPENAT2 is None:  # never when `available` was checked
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)
        how = _OpenHow(flags, 0, resolve)
        fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM):  # too old, or filtered out
                self.available = False
            raise OSError(err, os.strerror(err), path)
        return int(fd)


_openat2 = _Openat2()


def check_path(path: str, prefix: str) -> list[str]:
    """The components of an absolute `path` that lexically lies under `prefix`; refuses `..`,
    NUL bytes and relative paths before anything touches the filesystem."""
    if not path.startswith("/") or "\0" in path:
        raise Refused("relative", path, "not an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused("dotdot", path, "a `..` component")
    if not _under("/" + "/".join(parts), prefix):
        raise Refused("outside", path, f"not under {prefix}")
    return parts


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def resolve_in_root(root: str, path: str, prefix: str = "/", use_openat2: bool = True) -> int:
    """An O_PATH descriptor of `path` resolved inside `root` (a directory, e.g. /proc/PID/root),
    whose resolved path lies under `prefix`. Raises Refused or OSError."""
    parts = check_path(path, prefix)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if use_openat2 and _openat2.available:
            try:
                # Without O_NOFOLLOW: a trailing symlink is then ELOOP too, not the link itself.
                return _openat2(rootfd, "/".join(parts) or ".", os.O_PATH | os.O_CLOEXEC, _RESOLVE)
            except OSError as e:
                # ELOOP: a symlink on the way (the walk resolves it and checks where it leads);
                # EAGAIN: a rename raced the lookup; ENOSYS/EPERM: no openat2 here.
                if e.errno not in (errno.ELOOP, errno.EAGAIN, errno.ENOSYS, errno.EPERM, errno.EXDEV):
                    raise
        return _walk(rootfd, parts, path, prefix)
    finally:
        os.close(rootfd)


def _walk(rootfd: int, parts: list[str], path: str, prefix: str) -> int:
    """Component by component from rootfd; symlinks read as text and resolved again from the
    root (absolute) or the current directory (relative), `..` never above the root."""
    stack: list[tuple[str, int]] = []  # the directories (and at last the file) below the root
    todo = deque(parts)
    links = 0
    try:
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if stack:
                    os.close(stack.pop()[1])
                continue
            if stack and not stat.S_ISDIR(os.fstat(stack[-1][1]).st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            cur = stack[-1][1] if stack else rootfd
            fd = os.open(name, _PATH_FLAGS, dir_fd=cur)
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(name, dir_fd=cur)
                if target.startswith("/"):
                    while stack:
                        os.close(stack.pop()[1])
                todo.extendleft(reversed(target.split("/")))
                continue
            stack.append((name, fd))
        resolved = "/" + "/".join(n for n, _ in stack)
        if not stack or not _under(resolved, prefix):
            raise Refused("outside", path, f"resolves to {resolved}, not under {prefix}")
        return stack.pop()[1]
    finally:
        for _, fd in stack:
            os.close(fd)


def reopen_regular(opath: int, path: str) -> int:
    """Open the file behind an O_PATH descriptor for reading, if it is a regular file: checked
    before (nothing else is ever opened) and after (the same inode). Closes `opath`."""
    try:
        st = os.fstat(opath)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not_regular", path, f"not a regular file ({_kind(st.st_mode)})")
        fd = os.open(f"/proc/self/fd/{opath}", READ_FLAGS)
    finally:
        os.close(opath)
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise Refused("changed", path, "changed while being opened")
    return fd


def open_in_root(root: str, path: str, prefix: str = "/", use_openat2: bool = True) -> int:
    """A read-only, non-blocking descriptor of the regular file `path` inside `root`, resolved
    under `prefix`. Raises Refused (what it is not allowed to be) or OSError (not there)."""
    return reopen_regular(resolve_in_root(root, path, prefix, use_openat2), path)


def open_mapped(procfs: str, pid: int, path: str, dev: str, inode: int) -> int:
    """A read-only, non-blocking descriptor of a file process `pid` maps, named by its maps
    line (`path`, and `dev` as "MAJOR:MINOR" in hex with `inode`): resolved inside the
    process's root (never led out of it), and only if it is the very file mapped. The path is
    the process's to change after it mapped the file: a symlink, FIFO or other file put there
    is refused. Raises Refused or OSError."""
    fd = open_in_root(f"{procfs}/{pid}/root", path)
    st = os.fstat(fd)
    major, minor = (int(x, 16) for x in dev.split(":"))
    if st.st_ino != inode or (os.major(st.st_dev), os.minor(st.st_dev)) != (major, minor):
        os.close(fd)
        raise Refused("changed", path, "not the file the process maps")
    return fd


def open_proc_fd(procfs: str, pid: int, fd: int, prefix: str) -> tuple[int, str]:
    """The file a process holds as descriptor `fd`, opened for reading, and its path as the
    process sees it. The path is taken from the kernel (readlink of /proc/PID/fd/N), not from
    what the process asked for; it must lie under `prefix` and the file must be regular.
    stat, not open, looks at it first: a FIFO or device is never opened."""
    link = f"{procfs}/{pid}/fd/{fd}"
    st = os.stat(link)  # follows the magic link without opening the file
    if not stat.S_ISREG(st.st_mode):
        raise Refused("not_regular", link, f"not a regular file ({_kind(st.st_mode)})")
    seen = os.readlink(link)
    check_path(seen, prefix)  # " (deleted)" files and paths outside prefix alike
    if os.path.normpath(seen) != seen or seen.endswith(" (deleted)"):
        raise Refused("outside", seen, "not a plain path")
    opath = os.open(link, os.O_PATH | os.O_CLOEXEC)  # the process's own file: the link is followed
    now = os.fstat(opath)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(opath)
        raise Refused("changed", seen, "changed while being opened")
    return reopen_regular(opath, seen), seen


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "other"
