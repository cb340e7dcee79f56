"""Following one log file: from its end (no backfill) or from a given offset, across
rename-and-create rotation (the old file is read to its end, then the new one from its start)
and copytruncate (a shrunk file, or one whose bytes before our position changed, is read again
from its start). Lines longer than `max_line` are cut there, the rest of them skipped; lines
with NUL bytes are binary garbage and skipped (counted). Reads only; parses nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

FINGERPRINT = 64  # bytes just before our position, to notice a file rewritten in place


@dataclass
class Tailer:
    path: str
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

    def open(self, from_end: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        st = os.fstat(fd)
        self.close()
        self.fd, self.inode = fd, (st.st_dev, st.st_ino)
        self.offset = st.st_size if from_end else 0
        self.partial, self.skipping = b"", False
        self._remember()
        return True

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
        try:
            st = os.stat(self.path)
        except OSError:
            return lines  # rotated away and not recreated yet: keep the old fd
        if (st.st_dev, st.st_ino) != self.inode:
            lines += self._read_to_end()  # the rest of the rotated file
            self.rotations += 1
            if self.open(from_end=False):
                lines += self._read_to_end()
        return lines

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
