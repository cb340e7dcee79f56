"""Following one log file: from its end (no backfill) or from a given offset, across
rename-and-create rotation (the old file is read to its end, then the new one from its start)
and copytruncate (a shrunk file, or one whose bytes before our position changed, is read again
from its start). Lines longer than `max_line` are cut there, the rest of them skipped; lines
with NUL bytes are binary garbage and skipped (counted). Reads only; parses nothing.

Every open, the first and each one after a rotation, goes through agent.logs.safeopen: `path`
is resolved inside `root` (the writing process's root, or / for runtime files) and must stay
under `prefix` and be a regular file, so a rotated path swapped for a symlink to a secret or
for a FIFO is not followed. Regular files only: a read never blocks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from agent.logs import safeopen

log = logging.getLogger(__name__)

FINGERPRINT = 64  # bytes just before our position, to notice a file rewritten in place


@dataclass
class Tailer:
    path: str
    root: str = "/"  # the path is resolved inside this directory (a process's /proc/PID/root)
    prefix: str = "/"  # ... and must stay under this one there
    max_line: int = 64 * 1024
    chunk: int = 1 << 20
    fd: int = -1
    inode: tuple[int, int] = (0, 0)
    offset: int = 0
    partial: bytes = b""
    skipping: bool = False  # inside an over-long line
    fingerprint: bytes = b""
    binary_lines: int = 0
    truncated_lines: int = 0
    rotations: int = 0
    pending: list[bytes] = field(default_factory=list)
    refused: int = 0  # reopens refused by safeopen (a path swapped for a symlink, FIFO, ...)
    refused_file: tuple[int, int, int] = (0, 0, 0)  # (dev, ino, ctime) of the path when refused: not tried again

    def open(self, from_end: bool) -> bool:
        fd = self._open_safely()
        if fd < 0:
            return False
        self.adopt(fd, from_end)
        return True

    def _open_safely(self) -> int:
        try:
            return safeopen.open_in_root(self.root, self.path, self.prefix)
        except safeopen.Refused as e:
            self.refused += 1
            log.warning("logs: not following %r: %r", self.path, e.detail)
        except OSError:
            pass
        return -1

    def adopt(self, fd: int, from_end: bool) -> None:
        """Follow an already opened (regular, non-blocking) descriptor, which this takes over."""
        st = os.fstat(fd)
        self.close()
        self.fd, self.inode = fd, (st.st_dev, st.st_ino)
        self.offset = st.st_size if from_end else 0
        self.partial, self.skipping = b"", False
        self._remember()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _remember(self) -> None:
        start = max(0, self.offset - FINGERPRINT)
        self.fingerprint = os.pread(self.fd, self.offset - start, start) if self.offset else b""

    def poll(self) -> list[str]:
        """New complete lines since the last call."""
        if self.fd < 0 and not self.open(from_end=False):
            return []
        lines = self._read_to_end()
        if self._still_ours():
            return lines
        try:
            opath = safeopen.resolve_in_root(self.root, self.path, self.prefix)
        except OSError:
            return lines  # rotated away and not recreated yet (or refused): keep the old fd
        try:
            st = os.fstat(opath)
        finally:
            os.close(opath)
        # ctime too: an inode number is reused at once by the next file made there
        seen = (st.st_dev, st.st_ino, st.st_ctime_ns)
        if (st.st_dev, st.st_ino) != self.inode and seen != self.refused_file:
            lines += self._read_to_end()  # the rest of the rotated file
            fd = self._open_safely()
            if fd < 0:
                self.refused_file = seen  # keep reading the old fd; try again when the path changes
                return lines
            self.rotations += 1
            self.adopt(fd, from_end=False)
            lines += self._read_to_end()
        return lines

    def _still_ours(self) -> bool:
        """The cheap test on every poll: the path still names the file we read. A stat (it
        opens nothing); what it follows does not matter, since only a match is trusted, and any
        change goes through safeopen before anything is opened."""
        try:
            st = os.stat(self.path if self.root == "/" else self.root.rstrip("/") + self.path)
        except (OSError, ValueError):
            return False
        return (st.st_dev, st.st_ino) == self.inode

    def _truncated(self) -> bool:
        size = os.fstat(self.fd).st_size
        if size < self.offset:
            return True
        if self.fingerprint:
            start = self.offset - len(self.fingerprint)
            return os.pread(self.fd, len(self.fingerprint), start) != self.fingerprint
        return False

    def _read_to_end(self) -> list[str]:
        if self._truncated():
            self.rotations += 1
            self.offset, self.partial, self.skipping, self.fingerprint = 0, b"", False, b""
        out: list[str] = []
        while True:
            data = os.pread(self.fd, self.chunk, self.offset)
            if not data:
                break
            self.offset += len(data)
            out += self._split(data)
        self._remember()
        return out

    def _split(self, data: bytes) -> list[str]:
        out = []
        buf = self.partial + data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if self.skipping:
                self.skipping = False
                continue
            out += self._emit(line)
        rest = buf[start:]
        if len(rest) > self.max_line:
            if not self.skipping:
                out += self._emit(rest[: self.max_line])
                self.truncated_lines += 1
            self.skipping, rest = True, b""
        self.partial = rest
        return out

    def _emit(self, line: bytes) -> list[str]:
        if len(line) > self.max_line:
            line = line[: self.max_line]
            self.truncated_lines += 1
        if b"\x00" in line:
            self.binary_lines += 1
            return []
        return [line.decode("utf-8", errors="replace").rstrip("\r")]
