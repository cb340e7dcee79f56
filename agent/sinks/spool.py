"""A bounded on-disk queue of opaque payloads, oldest first, that survives restarts.

Each entry is one file `<seq>.<tag>.<count>.spool`, written to a temporary name and renamed,
so a crash leaves whole entries only. When an entry would take the directory past its byte
bound, the oldest entries are dropped and reported to the caller (who counts them). Used by
the ClickHouse sink and by remote_write; knows nothing of what the payloads are.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

_NAME = re.compile(r"(\d{12})\.([A-Za-z0-9_]+)\.(\d+)\.spool")


@dataclass(frozen=True)
class Entry:
    path: str
    seq: int
    tag: str  # e.g. the table name
    count: int  # rows or samples inside, for counting drops
    size: int


class Spool:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self._entries: list[Entry] = []
        for name in sorted(os.listdir(directory)):
            m = _NAME.fullmatch(name)
            path = os.path.join(directory, name)
            if m:
                self._entries.append(Entry(path, int(m.group(1)), m.group(2), int(m.group(3)),
                                           os.path.getsize(path)))
            elif name.endswith(".tmp"):
                os.unlink(path)  # an interrupted write
        self._bytes = sum(e.size for e in self._entries)
        self._seq = self._entries[-1].seq + 1 if self._entries else 0
        if self._entries:
            log.info("spool %s: %d entries (%d bytes) left from before", directory, len(self._entries), self.bytes)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # builtins.bytes: inside the class, `bytes` is the property above.
    def push(self, tag: str, count: int, payload: builtins.bytes) -> list[Entry]:
        """Append an entry; returns the entries dropped to stay within the bound (the new one
        itself when it alone is larger than the bound)."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", tag):
            raise ValueError(f"bad spool tag {tag!r}")
        with self._lock:
            if len(payload) > self.max_bytes:
                return [Entry("", -1, tag, count, len(payload))]
            dropped = []
            while self._entries and self.bytes + len(payload) > self.max_bytes:
                dropped.append(self._remove_locked(self._entries[0]))
            seq = self._seq
            self._seq += 1
            name = f"{seq:012d}.{tag}.{count}.spool"
            path = os.path.join(self.dir, name)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.rename(tmp, path)
            self._entries.append(Entry(path, seq, tag, count, len(payload)))
            self._bytes += len(payload)
            return dropped

    def oldest(self) -> tuple[Entry, builtins.bytes] | None:
        with self._lock:
            while self._entries:
                e = self._entries[0]
                try:
                    with open(e.path, "rb") as f:
                        return e, f.read()
                except OSError:
                    self._bytes -= self._entries.pop(0).size  # removed behind our back
            return None

    def remove(self, entry: Entry) -> None:
        with self._lock:
            if entry in self._entries:
                self._remove_locked(entry)

    def _remove_locked(self, entry: Entry) -> Entry:
        self._entries.remove(entry)
        self._bytes -= entry.size
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        return entry
