"""The HotSpot performance data file (hsperfdata): decoding its bytes, and nothing else.

A JVM started without -XX:-UsePerfData maps a file, /tmp/hsperfdata_<user>/<pid> (its own pid,
as its namespace sees it), and keeps its counters in it: what jstat and jcmd read. The layout
(version 2.0; HotSpot's runtime/perfMemory.hpp, PerfDataPrologue and PerfDataEntry, and the
JDK's own reader, sun.jvmstat.perfdata.monitor.v2_0):

    prologue, 32 bytes
      magic           4  CA FE C0 C0, always in this byte order
      byte_order      1  0 big-endian, 1 little-endian: the order of every field after it
      major, minor    1+1  2 and 0
      accessible      1  1 once the JVM has initialised the region
      used            4  bytes of the region in use (entries lie below it)
      overflow        4
      mod_time_stamp  8  ticks of the last structural change (an entry added)
      entry_offset    4  where the first entry starts
      num_entries     4
    each entry, at entry_offset and then every entry_length bytes
      entry_length    4  header, name and data, padded
      name_offset     4  from the entry's start; the name ends with a NUL
      vector_length   4  0 for a scalar, else the number of elements
      data_type       1  a JNI type letter: 'J' a 64-bit long, 'B' a byte (vectors: strings)
      flags           1  bit 0: supported (an interface jstat relies on)
      data_units      1  1 none, 2 bytes, 3 ticks, 4 events, 5 string, 6 hertz
      data_variability 1  1 constant, 2 monotonic, 3 variable
      data_offset     4  from the entry's start

Times are in ticks of the high-resolution clock, `sun.os.hrt.frequency` per second (1e9 on
Linux). The JVM writes the region while it runs: a reader sees values of different moments,
and may see an entry count that lags the entries written; an entry that does not fit inside
the used region ends the parse, and what came before stands.

Every bound is checked before a byte is read: the file is someone else's, and may be anything.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

MAGIC = b"\xca\xfe\xc0\xc0"
PROLOGUE_SIZE = 32
ENTRY_HEADER_SIZE = 20
MAX_ENTRIES = 16384  # a JDK 17 JVM has ~190 (G1) to ~300; a bound, not an expectation
MAX_NAME = 1024

UNITS = {1: "none", 2: "bytes", 3: "ticks", 4: "events", 5: "string", 6: "hertz"}
VARIABILITY = {1: "constant", 2: "monotonic", 3: "variable"}
U_STRING = 5

_PROLOGUE = {o: struct.Struct(o + "IIqII") for o in "<>"}  # used, overflow, mod_time_stamp, entry_offset, num_entries
_ENTRY = {o: struct.Struct(o + "iiiBBBBi") for o in "<>"}
_LONG = {o: struct.Struct(o + "q") for o in "<>"}


class Invalid(ValueError):
    """Not a perf data region this parser reads (bad magic, version, or bounds)."""


class NotReady(Invalid):
    """A perf data region the JVM has not finished initialising (accessible = 0)."""


Value = int | str | bytes | tuple[int, ...] | None


@dataclass(frozen=True)
class Entry:
    name: str
    type: str  # the JNI letter: "J", "B", ...
    units: int
    variability: int
    value: Value  # int for a long, str for a string, bytes for other byte vectors, a tuple for
    # a long vector; None for a type HotSpot does not write
    offset: int = 0  # of the data, from the start of the region
    vector_length: int = 0


@dataclass
class PerfData:
    byte_order: str  # "<" or ">"
    major: int
    minor: int
    used: int
    mod_time_stamp: int
    num_entries: int  # as the prologue says
    entries: dict[str, Entry] = field(default_factory=dict)
    truncated: bool = False  # an entry ran past the used region: the rest was not read

    def refresh(self, data: bytes | bytearray | memoryview) -> bool:
        """Read the values again from a newer copy of the same region, when no entry was added
        since (the same count and structural time stamp): a few unpacks instead of a parse.
        False when the structure changed; then parse it again."""
        buf = memoryview(data)
        if len(buf) < PROLOGUE_SIZE or bytes(buf[:4]) != MAGIC or not buf[7] \
                or buf[4] != (1 if self.byte_order == "<" else 0):
            return False
        used, _overflow, mod_ts, _eo, num_entries = _PROLOGUE[self.byte_order].unpack_from(buf, 8)
        if (mod_ts, num_entries) != (self.mod_time_stamp, self.num_entries) or min(used, len(buf)) < self.used:
            return False
        for name, e in self.entries.items():
            if e.variability != 1:
                self.entries[name] = Entry(name, e.type, e.units, e.variability,
                                           _value(buf, self.byte_order, e.type, e.units, e.offset, e.vector_length),
                                           e.offset, e.vector_length)
        return True

    def get(self, name: str) -> Value:
        e = self.entries.get(name)
        return e.value if e is not None else None

    def integer(self, name: str) -> int | None:
        v = self.get(name)
        return v if isinstance(v, int) else None

    def string(self, name: str) -> str:
        v = self.get(name)
        return v if isinstance(v, str) else ""

    @property
    def tick_frequency(self) -> int:
        f = self.integer("sun.os.hrt.frequency")
        return f if f is not None and f > 0 else 1_000_000_000

    def seconds(self, name: str) -> float | None:
        """A ticks counter in seconds."""
        v = self.integer(name)
        return v / self.tick_frequency if v is not None else None


def parse(data: bytes | bytearray | memoryview, want: Callable[[str], bool] | None = None,
          max_entries: int = MAX_ENTRIES) -> PerfData:
    """Decode a perf data region; with `want`, only the entries it accepts are kept (the
    others' values are not decoded). Raises Invalid (or NotReady)."""
    buf = memoryview(data)
    if len(buf) < PROLOGUE_SIZE:
        raise Invalid(f"{len(buf)} bytes: shorter than the prologue")
    if bytes(buf[:4]) != MAGIC:
        raise Invalid(f"bad magic {bytes(buf[:4]).hex()}")
    bo, major, minor, accessible = buf[4], buf[5], buf[6], buf[7]
    if bo not in (0, 1):
        raise Invalid(f"bad byte order {bo}")
    if major != 2:
        raise Invalid(f"version {major}.{minor}, not 2.x")
    order = "<" if bo == 1 else ">"
    used, _overflow, mod_ts, entry_offset, num_entries = _PROLOGUE[order].unpack_from(buf, 8)
    if not accessible:
        raise NotReady("the JVM has not finished initialising it")
    end = min(used, len(buf))
    if not PROLOGUE_SIZE <= entry_offset <= end:
        raise Invalid(f"entry offset {entry_offset} outside 32..{end}")
    if num_entries < 0:
        raise Invalid(f"negative entry count {num_entries}")
    pd = PerfData(order, major, minor, used, mod_ts, num_entries)
    hdr = _ENTRY[order]
    off = entry_offset
    for _ in range(min(num_entries, max_entries)):
        if off + ENTRY_HEADER_SIZE > end:
            pd.truncated = True
            break
        length, name_off, vlen, dtype, _flags, units, var, data_off = hdr.unpack_from(buf, off)
        if length < ENTRY_HEADER_SIZE or off + length > end or vlen < 0 \
                or not ENTRY_HEADER_SIZE <= name_off < length or not ENTRY_HEADER_SIZE <= data_off <= length:
            pd.truncated = True
            break
        name_end = _nul(buf, off + name_off, min(off + length, off + name_off + MAX_NAME))
        if name_end < 0:
            pd.truncated = True
            break
        name = bytes(buf[off + name_off:name_end]).decode("utf-8", "replace")
        kind = chr(dtype)
        start = off + data_off
        size = (8 if kind == "J" else 1) * max(vlen, 1)
        if start + size > off + length:
            pd.truncated = True
            break
        if want is None or want(name):
            value = _value(buf, order, kind, units, start, vlen)
            pd.entries[name] = Entry(name, kind, units, var, value, start, vlen)
        off += length
    return pd


def _value(buf: memoryview, order: str, kind: str, units: int, start: int, vlen: int) -> Value:
    """An entry's value; its bounds were checked when the entry was parsed."""
    if kind == "J":
        if vlen == 0:
            return int(_LONG[order].unpack_from(buf, start)[0])
        return struct.unpack_from(f"{order}{vlen}q", buf, start)
    if kind == "B":
        if vlen == 0:
            return buf[start]
        if units == U_STRING:
            stop = _nul(buf, start, start + vlen)
            return bytes(buf[start:stop if stop >= 0 else start + vlen]).decode("utf-8", "replace")
        return bytes(buf[start:start + vlen])
    return None


def _nul(buf: memoryview, start: int, stop: int) -> int:
    """The offset of the first NUL in buf[start:stop], or -1."""
    i = bytes(buf[start:stop]).find(b"\0")
    return start + i if i >= 0 else -1
