"""The one place that touches BCC objects after loading: a BPF map as domain code sees it, and
the loaded programs as the few operations components need (a map by name, uprobes).

Keys and values are the ctypes structures BCC builds from the C declarations (plain data,
read field by field); domain code gets and passes them, never a BCC table or the BPF object.
Every read tolerates a map being freed at shutdown (KeyError/OSError → nothing), so a last
scrape racing `close()` sees empty maps, not a traceback.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any, Protocol


class BpfMap:
    """A hash, LRU, array or per-CPU map of the loaded programs."""

    def __init__(self, table: Any, name: str = "") -> None:
        self._t = table
        self.name = name

    def key(self, *fields: Any) -> Any:
        """A key built from the C struct's fields in declaration order (or the scalar)."""
        return self._t.Key(*fields)

    def leaf(self, *fields: Any) -> Any:
        return self._t.Leaf(*fields)

    def get(self, key: Any) -> Any | None:
        try:
            return self._t[key]
        except (KeyError, OSError):
            return None

    def set(self, key: Any, value: Any) -> bool:
        try:
            self._t[key] = value
        except (KeyError, OSError):  # full, or being freed
            return False
        return True

    def delete(self, key: Any) -> bool:
        try:
            del self._t[key]
        except (KeyError, OSError):
            return False
        return True

    def items(self) -> list[tuple[Any, Any]]:
        """A snapshot of the entries (the kernel keeps writing while this runs)."""
        try:
            return list(self._t.items())
        except (KeyError, OSError):
            return []

    def keys(self) -> list[Any]:
        try:
            return list(self._t.keys())
        except (KeyError, OSError):
            return []

    def clear(self) -> None:
        try:
            self._t.clear()
        except (KeyError, OSError):
            pass

    def percpu_sum(self, index: int) -> int:
        """A per-CPU array's slot `index`, summed over CPUs (0 if the map is gone)."""
        try:
            return sum(int(v) for v in self._t[self._t.Key(index)])
        except (KeyError, OSError, IndexError):
            return 0

    def array_get(self, index: int) -> int:
        """A plain array's u32/u64 slot as an int (0 if the map is gone)."""
        try:
            return int(self._t[ctypes.c_int(index)].value)
        except (KeyError, OSError, IndexError):
            return 0

    def array_set(self, index: int, value: int) -> None:
        try:
            self._t[ctypes.c_int(index)] = ctypes.c_uint32(value)
        except (KeyError, OSError, IndexError):
            pass

    def array_write(self, start: int, leaves: bytes) -> bool:
        """Slots start, start + 1, ... of an array map set from `leaves` (packed values, each the
        map's value size), in one batch where the kernel has them (5.6+), else one by one."""
        leaf = self._t.Leaf
        n = len(leaves) // ctypes.sizeof(leaf)
        if n == 0:
            return True
        keys = (self._t.Key * n)(*range(start, start + n))
        values = (leaf * n).from_buffer_copy(leaves[:n * ctypes.sizeof(leaf)])
        try:
            self._t.items_update_batch(keys, values)
            return True
        except Exception:  # noqa: BLE001 - BCC raises bare Exception; no batch ops on this kernel
            pass
        try:
            for i in range(n):
                self._t[keys[i]] = values[i]
        except (KeyError, OSError, IndexError):
            return False
        return True

    def walk_stack(self, stack_id: int) -> list[int]:
        """A stack-trace map's addresses for one id (leaf first), zeros left out."""
        try:
            return [a for a in self._t.walk(stack_id) if a]
        except (KeyError, OSError):
            return []

    def delete_stack(self, stack_id: int) -> None:
        try:
            del self._t[ctypes.c_int(stack_id)]
        except (KeyError, OSError):
            pass

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())


class AttachError(Exception):
    """A probe did not attach or detach; the message names the program, file and symbol."""


class ProgramsClosing(AttachError):
    """The programs are being detached (the agent stops): nothing attaches any more."""


class Programs(Protocol):
    """The loaded programs as components use them (agent/ebpf/loader.py Loaded implements it)."""

    def map(self, name: str) -> BpfMap:
        """The map `name` declares in bpf/; KeyError when none does."""
        ...

    def attach_uprobe(self, path: str, symbol: str, fn_name: str, *, ret: bool = False,
                      addr: int | None = None, pid: int = -1) -> None:
        """Attach program `fn_name` at `symbol` of the file `path` (at its return with `ret`);
        with `addr`, at that address of the file instead (for a symbol with several versions,
        which a lookup by name may resolve to the wrong one); with `pid`, for that process only
        (the kernel plants the breakpoint in no other); AttachError when the file has no such
        symbol or the kernel refuses, ProgramsClosing once the agent has begun to stop."""
        ...

    def detach_uprobe(self, path: str, symbol: str, *, ret: bool = False, addr: int | None = None,
                      pid: int = -1) -> None:
        """Undo attach_uprobe; AttachError when nothing was attached there."""
        ...
