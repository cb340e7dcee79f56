"""CPython processes for the profiler's in-kernel Python frame walk (bpf/include/pyframes.h).

At a process's start the agent looks for an interpreter among its mapped files (the python
executable or a libpython): the ELF's dynamic symbols give `_PyRuntime` (its address in the
process, once the file's load address is known from the memory map) and `Py_Version` (the
PY_VERSION_HEX the interpreter was built as, read from the file). The version picks the
structure offsets the kernel needs; they are per version because CPython moves its thread
state and frame fields between minor releases. Offsets of 3.11 are measured on Debian 12's
python3.11 (tests/unit/test_python_offsets.py checks them against the running interpreter
through ctypes); 3.13+ interpreters carry their own (`_Py_DebugOffsets`, the start of
`_PyRuntime`'s initialised data, read from the file; tests/system/test_profiler_python_versions.py
walks Debian 13's python3.13 with them). Before 3.11 the version comes from the file's name and
is refused (UNSUPPORTED says why), as is 3.12. ELF facts are cached per file (device, inode).

Frames: a Python frame is stored as the server stores any frame, "<qualname> <file>:<line>"
(line: the code object's first line); the interpreter's native frames from the first
`_PyEval_EvalFrameDefault` outwards are replaced by the Python frames.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from agent.logs import safeopen

log = logging.getLogger(__name__)

EVAL_FRAME = "_PyEval_EvalFrameDefault"
_CANDIDATE = re.compile(r"(^|/)(lib)?python\d(\.\d+)?[^/]*$")


@dataclass(frozen=True)
class Offsets:
    """Byte offsets bpf/include/pyframes.h's struct py_proc carries (same names)."""

    interp_head: int
    threads_head: int
    tstate_next: int
    tstate_native_tid: int
    tstate_cframe: int  # 0xffff: the current frame is a field of the thread state
    cframe_frame: int
    frame_code: int
    frame_previous: int
    code_name: int
    code_file: int
    code_line: int
    str_state: int
    str_ascii: int
    str_compact: int
    frame_owner: int = 0  # _PyInterpreterFrame.owner (3.13): entry frames (owned by the C stack) skipped


NO_CFRAME = 0xFFFF  # tstate_cframe: the current frame is a field of the thread state

OFFSETS: dict[tuple[int, int], Offsets] = {
    # CPython 3.11 on x86-64 (Include/internal/pycore_runtime.h, pycore_interp.h, cpython/pystate.h,
    # pycore_frame.h, cpython/code.h, cpython/unicodeobject.h)
    (3, 11): Offsets(interp_head=40, threads_head=16, tstate_next=8, tstate_native_tid=160, tstate_cframe=56,
                     cframe_frame=8, frame_code=32, frame_previous=48, code_name=128, code_file=112,
                     code_line=72, str_state=32, str_ascii=48, str_compact=72),
}
# Versions the walk has no tested offsets for, and why they are refused rather than guessed.
UNSUPPORTED = {
    (3, 9): "no native thread id in PyThreadState before 3.11 (only pthread_self), which the kernel does not match yet",
    (3, 8): "no native thread id in PyThreadState before 3.11; no 3.8 interpreter runs in the tests",
    (3, 10): "no native thread id in PyThreadState before 3.11; no 3.10 interpreter runs in the tests",
    (3, 12): "untested: no 3.12 interpreter runs in the tests (Debian ships none); its entry frames need skipping",
}
DEBUG_COOKIE = b"xdebugpy"

_PROC = struct.Struct("<QQQ16H")


@dataclass(frozen=True)
class Interpreter:
    """What one interpreter file tells: `_PyRuntime`'s virtual address and the version."""

    runtime_vaddr: int
    version: tuple[int, int]
    segments: tuple[tuple[int, int, int], ...]  # (p_offset, p_filesz, p_vaddr) of PT_LOAD
    debug: Offsets | None = None  # 3.13+: from the _Py_DebugOffsets at the start of _PyRuntime


@dataclass(frozen=True)
class PyProc:
    pid: int
    runtime: int  # _PyRuntime's address in the process
    version: tuple[int, int]
    offsets: Offsets
    pidns: tuple[int, int]  # (dev, inode) of its pid namespace

    def fields(self) -> tuple[int, ...]:
        """struct py_proc's fields in declaration order (its padding left out)."""
        o = self.offsets
        return (self.runtime, self.pidns[0], self.pidns[1], o.interp_head, o.threads_head, o.tstate_next,
                o.tstate_native_tid, o.tstate_cframe, o.cframe_frame, o.frame_code, o.frame_previous,
                o.code_name, o.code_file, o.code_line, o.str_state, o.str_ascii, o.str_compact, o.frame_owner)

    def pack(self) -> bytes:
        return _PROC.pack(*self.fields(), 0)


def read_interpreter(path: str, name: str | None = None) -> Interpreter | None:
    """`_PyRuntime` and the version from an ELF's symbols (`Py_Version`, 3.11+) or, before 3.11,
    from the file's name (python3.9, libpython3.9.so.1.0); on 3.13+ the `_Py_DebugOffsets` that
    `_PyRuntime` starts with, read from the file's initialised data. None if it is no CPython."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            segments = tuple((s["p_offset"], s["p_filesz"], s["p_vaddr"]) for s in elf.iter_segments()
                             if s["p_type"] == "PT_LOAD")
            found: dict[str, int] = {}
            for section in (".dynsym", ".symtab"):
                sec = elf.get_section_by_name(section)
                if not isinstance(sec, SymbolTableSection):
                    continue
                for want in ("_PyRuntime", "Py_Version"):
                    if want not in found:
                        syms = sec.get_symbol_by_name(want)
                        if syms and syms[0]["st_value"]:
                            found[want] = syms[0]["st_value"]
            if "_PyRuntime" not in found:
                return None
            version: tuple[int, int] | None = None
            version_at = _file_offset(segments, found["Py_Version"]) if "Py_Version" in found else None
            if version_at is not None:
                f.seek(version_at)
                hexversion = int.from_bytes(f.read(4), "little")
                version = ((hexversion >> 24) & 0xFF, (hexversion >> 16) & 0xFF)
            elif "Py_Version" not in found:
                m = _NAMED_VERSION.search(os.path.basename(name or path))
                if m:
                    version = (int(m.group(1)), int(m.group(2)))
            if version is None:
                return None
            debug = None
            if version >= (3, 13):
                runtime_at = _file_offset(segments, found["_PyRuntime"])
                if runtime_at is None:
                    return None
                f.seek(runtime_at)
                debug = parse_debug_offsets(f.read(DEBUG_OFFSETS_SIZE))
    except (OSError, ELFError, ValueError) as e:
        log.debug("no interpreter in %s: %s", path, e)
        return None
    return Interpreter(found["_PyRuntime"], version, segments, debug)


_NAMED_VERSION = re.compile(r"python(\d)\.(\d+)")

# _Py_DebugOffsets (Include/internal/pycore_debug_offsets.h, 3.13): a cookie, the version,
# then sections of u64 offsets, each section starting with the structure's size. Indexes of
# the u64 words the walk needs.
_DEBUG_WORDS = {
    "version": 1, "interp_head": 5, "threads_head": 9, "tstate_next": 21, "tstate_native_tid": 25,
    "tstate_frame": 23, "frame_previous": 29, "frame_code": 30, "frame_owner": 33, "code_file": 35,
    "code_qualname": 37, "code_line": 39, "str_state": 68, "str_ascii_size": 70,
}
DEBUG_OFFSETS_SIZE = 8 * 80


def parse_debug_offsets(raw: bytes) -> Offsets | None:
    """The walk's offsets from a 3.13+ interpreter's `_Py_DebugOffsets`; None without its cookie
    or with an offset that does not fit the kernel's u16."""
    if len(raw) < DEBUG_OFFSETS_SIZE or raw[:8] != DEBUG_COOKIE:
        return None
    w = {k: int.from_bytes(raw[8 * i:8 * i + 8], "little") for k, i in _DEBUG_WORDS.items()}
    ascii_size = w["str_ascii_size"]
    out = Offsets(interp_head=w["interp_head"], threads_head=w["threads_head"], tstate_next=w["tstate_next"],
                  tstate_native_tid=w["tstate_native_tid"], tstate_cframe=NO_CFRAME, cframe_frame=w["tstate_frame"],
                  frame_code=w["frame_code"], frame_previous=w["frame_previous"], code_name=w["code_qualname"],
                  code_file=w["code_file"], code_line=w["code_line"], str_state=w["str_state"],
                  str_ascii=ascii_size, str_compact=ascii_size + 16,  # + utf8_length, utf8
                  frame_owner=w["frame_owner"])
    if not out.frame_owner or any(v >= NO_CFRAME for v in (out.interp_head, out.frame_owner, out.threads_head, out.tstate_next, out.tstate_native_tid,
                                    out.cframe_frame, out.frame_code, out.frame_previous, out.code_name,
                                    out.code_file, out.code_line, out.str_state, out.str_compact)):
        return None
    return out


def _file_offset(segments: tuple[tuple[int, int, int], ...], vaddr: int) -> int | None:
    for off, size, va in segments:
        if va <= vaddr < va + size:
            return vaddr - va + off
    return None


def load_bias(segments: tuple[tuple[int, int, int], ...], map_start: int, map_offset: int) -> int | None:
    """The file's load address from one of its mappings: the PT_LOAD holding the mapped file
    offset was placed at its p_vaddr plus the bias (p_vaddr and p_offset agree modulo the page)."""
    for off, size, va in segments:
        if off - (off % 4096) <= map_offset < off + max(size, 1):
            return map_start - map_offset - (va - off)
    return None


def offsets_for(interp: Interpreter) -> Offsets | None:
    """3.13+: the interpreter's own debug offsets; earlier: the measured table."""
    if interp.version >= (3, 13):
        return interp.debug
    return OFFSETS.get(interp.version)


class PythonFinder:
    """Interpreter facts per file (device, inode), an LRU of `max_files`."""

    def __init__(self, procfs: str = "/proc", max_files: int = 64) -> None:
        self.procfs = procfs
        self.max_files = max_files
        self._files: OrderedDict[tuple[str, int], Interpreter | None] = OrderedDict()

    def find(self, pid: int) -> PyProc | None:
        """The process's interpreter, if it is a CPython whose offsets are known."""
        try:
            with open(f"{self.procfs}/{pid}/maps") as f:
                lines = f.readlines()
        except OSError:
            return None
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6 or not _CANDIDATE.search(parts[5].strip()) or not int(parts[4]):
                continue
            path = parts[5].strip()
            key = (parts[3], int(parts[4]))
            if key not in self._files:
                self._files[key] = self._read(pid, parts[0], parts[3], int(parts[4]), path)
                if len(self._files) > self.max_files:
                    self._files.popitem(last=False)
            interp = self._files[key]
            if interp is None:
                continue
            offsets = offsets_for(interp)
            if offsets is None:
                log.debug("pid %d: CPython %d.%d, no frame offsets for it: %s", pid, *interp.version,
                          UNSUPPORTED.get(interp.version, "not a supported version"))
                return None
            start = int(parts[0].split("-")[0], 16)
            bias = load_bias(interp.segments, start, int(parts[2], 16))
            if bias is None:
                continue
            try:
                st = os.stat(f"{self.procfs}/{pid}/ns/pid")
                pidns = (st.st_dev, st.st_ino)
            except OSError:
                pidns = (0, 0)
            return PyProc(pid, bias + interp.runtime_vaddr, interp.version, offsets, pidns)
        return None


    def _read(self, pid: int, span: str, dev: str, inode: int, path: str) -> Interpreter | None:
        """The mapped file itself: through map_files (where the agent may read it), else the
        path resolved inside the process's root (never led out of it: safeopen), else the path
        as the agent sees it (a chrooted process's map shows the path outside its root). The
        path is the traced process's to change: whatever is opened is a regular file, opened
        without blocking, and read only if it is the very file mapped (device, inode)."""
        start, end = (int(x, 16) for x in span.split("-"))
        major, minor = (int(x, 16) for x in dev.split(":"))
        opens: list[Callable[[], int]] = [
            lambda: os.open(f"{self.procfs}/{pid}/map_files/{start:x}-{end:x}", safeopen.READ_FLAGS),
            lambda: safeopen.open_in_root(f"{self.procfs}/{pid}/root", path),
            lambda: os.open(path, safeopen.READ_FLAGS | os.O_NOFOLLOW),
        ]
        for opener in opens:
            try:
                fd = opener()
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (not stat.S_ISREG(st.st_mode) or st.st_ino != inode
                        or (os.major(st.st_dev), os.minor(st.st_dev)) != (major, minor)):
                    continue
                found = read_interpreter(f"/proc/self/fd/{fd}", path)
            finally:
                os.close(fd)
            if found is not None:
                return found
        return None


def python_frame(name: str, file: str, line: int) -> str:
    """A Python frame as the server stores a pprof line: "<function> <file>:<line>"."""
    return f"{name or '[unknown]'} {file}:{line}"


def decode_str(raw: bytes, state: int) -> str | None:
    """A str read by the kernel: compact (bit 5) and one byte per character (kind 1, bits 2-4);
    ASCII or Latin-1 by bit 6. Anything else (a wider str, an unreadable object) is None."""
    if not (state >> 5) & 1 or (state >> 2) & 7 != 1:
        return None
    text = raw.split(b"\0", 1)[0]
    return text.decode("ascii" if (state >> 6) & 1 else "latin-1", errors="replace")


def interleave(native: list[str], python: list[str]) -> list[str]:
    """Native user frames (leaf first) with the Python frames in place of the eval loop: the
    native frames up to the first `_PyEval_EvalFrameDefault`, then the Python frames. Without an
    eval-loop frame (an interpreter without frame pointers leaves the native stack unreliable
    past its first frame) the native leaf alone stands before them."""
    if not python:
        return native
    names = [f.rsplit(" ", 1)[0] for f in native]
    cut = names.index(EVAL_FRAME) if EVAL_FRAME in names else min(1, len(native))
    return native[:cut] + python
