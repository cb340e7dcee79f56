"""Length-prefixed frames from a stream connection's calls (contract.h's stream events): each
event carries a read's or a write's first bytes and the call's size, so a frame may start in one
call and end in another, several may share a call, and bytes past what the kernel captured are
known only by their count. A `Framer` follows one direction of one connection and returns each
frame once its first `keep` bytes (or all of it) are in, with the time of the call it began in.

When a frame's size cannot be read (its header lies past the captured bytes, or the bytes are
no frame of the protocol), the rest of that call is dropped and the next call is taken to begin
a frame: a lost position costs the frames of one call, never the connection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

KEEP = 1024  # bytes kept of a frame: what the parsers read status and statements from


@dataclass(frozen=True)
class Frame:
    data: bytes  # its first bytes: all of it when complete, else up to `keep` or what was captured
    size: int  # its size on the wire
    ts_ns: int  # the time of the call it began in

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.size


class Framer:
    """`head`: the bytes that tell a frame's size; `size(first head bytes)`: the frame's whole
    size, or None when they are not a frame's beginning."""

    def __init__(self, head: int, size: Callable[[bytes], int | None], keep: int = KEEP) -> None:
        self.head = head
        self.size_of = size
        self.keep = keep
        self._reset()
        self.skip = 0  # bytes of an emitted frame still to come

    def _reset(self) -> None:
        self.cur = b""  # kept bytes of the frame in progress
        self.seen = 0  # its bytes gone by (kept or not)
        self.total: int | None = None  # its size, once its head is in
        self.ts = 0

    def feed(self, data: bytes, size: int, ts_ns: int) -> list[Frame]:
        """One call's captured bytes `data` of its `size` bytes."""
        out: list[Frame] = []
        size = max(size, len(data))
        pos = 0
        while pos < size:
            if self.skip:
                n = min(self.skip, size - pos)
                self.skip -= n
                pos += n
                continue
            if self.seen == 0:
                self.ts = ts_ns
            if pos >= len(data):  # the rest of the call was not captured
                if self.total is None:  # no frame size known: lost until the next call
                    self._reset()
                    return out
                self._emit(out)
                continue
            if self.total is None:
                chunk = data[pos:pos + self.head - self.seen]
                self.cur += chunk
                self.seen += len(chunk)
                pos += len(chunk)
                if self.seen < self.head:
                    continue
                total = self.size_of(self.cur)
                if total is None or total < self.head:
                    self._reset()
                    return out
                self.total = total
            want = min(self.total, self.keep) - len(self.cur)
            if want > 0:
                chunk = data[pos:pos + want]
                self.cur += chunk
                self.seen += len(chunk)
                pos += len(chunk)
            if len(self.cur) >= min(self.total, self.keep):
                self._emit(out)
        return out

    def _emit(self, out: list[Frame]) -> None:
        assert self.total is not None
        out.append(Frame(self.cur, self.total, self.ts))
        self.skip = self.total - self.seen
        self._reset()
