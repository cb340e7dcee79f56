"""A file's creation time (statx STATX_BTIME through libc), where the filesystem records it."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

_AT_FDCWD = -100
_STATX_BTIME = 0x800


class _Timestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32), ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32), ("stx_uid", ctypes.c_uint32), ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16), ("_spare0", ctypes.c_uint16), ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64), ("stx_blocks", ctypes.c_uint64), ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _Timestamp), ("stx_btime", _Timestamp), ("stx_ctime", _Timestamp), ("stx_mtime", _Timestamp),
        # the kernel fills 256 bytes; keep room to spare, never less
        ("_rest", ctypes.c_uint64 * 40),
    ]


_statx: Callable[..., int] | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _statx = _libc.statx
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]
except (OSError, AttributeError):
    _statx = None


def birth_time(path: str) -> float | None:
    """Seconds since the epoch when the file was created, or None when unknown."""
    if _statx is None:
        return None
    buf = _Statx()
    if _statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, ctypes.byref(buf)) != 0:
        return None
    if not buf.stx_mask & _STATX_BTIME:
        return None
    if buf.stx_btime.tv_sec <= 0:
        return None
    return float(buf.stx_btime.tv_sec + buf.stx_btime.tv_nsec / 1e9)
