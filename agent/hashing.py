"""FNV-1a 64, the hash Coroot uses for stacks; also used for metric series hashes."""

from __future__ import annotations

from collections.abc import Iterable

_OFFSET = 0xCBF29CE484222325
_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def fnv1a64(parts: Iterable[bytes]) -> int:
    """FNV-1a 64 over the concatenation of `parts`."""
    h = _OFFSET
    for part in parts:
        for b in part:
            h = ((h ^ b) * _PRIME) & _MASK
    return h
