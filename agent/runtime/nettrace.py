"""A reader of the .NET runtime's EventPipe stream (the "nettrace" format, version 4 and its
compressed event headers, what .NET Core 3.0 and later send over the diagnostics IPC socket),
as much of it as the System.Runtime EventCounters need.

The stream: "Nettrace", the FastSerialization header, then objects, each a tag (5), a type
(5, 1, version, min reader version, name, 6), a payload and an end tag (6); a null tag (1)
ends the stream. The first object is the Trace (fixed fields); the others are blocks: an int32
size, padding to a multiple of 4 (from the stream's first byte), then that many bytes.
EventBlock and MetadataBlock hold events: a header (its size, flags: bit 0 = compressed event
headers), then events. A metadata event's payload describes an event (provider, id, name, its
fields by type code); an event's payload is decoded by its metadata.

Bounded and strict: a block larger than MAX_BLOCK, more than MAX_METADATA descriptions, a
field list deeper or longer than allowed, a string longer than MAX_STRING_CHARS, or anything
that does not fit raises Invalid, and nothing else is raised for any input (the source's own
OSError excepted). Unknown blocks (stacks, sequence points) are skipped by their size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

MAX_BLOCK = 4 << 20
MAX_METADATA = 4096
MAX_FIELDS = 64
MAX_DEPTH = 4
MAX_STRING_CHARS = 4096
MAX_NAME = 64

MAGIC = b"Nettrace"
SERIALIZATION = b"!FastSerialization.1"
TAG_NULL, TAG_BEGIN, TAG_END = 1, 5, 6

# type codes of event fields (System.TypeCode, plus 19 for arrays)
OBJECT, BOOLEAN, CHAR, SBYTE, BYTE, INT16, UINT16, INT32, UINT32, INT64, UINT64 = 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
SINGLE, DOUBLE, DECIMAL, DATETIME, GUID, STRING, ARRAY = 13, 14, 15, 16, 17, 18, 19
_FIXED = {BOOLEAN: "<i", CHAR: "<H", SBYTE: "<b", BYTE: "<B", INT16: "<h", UINT16: "<H", INT32: "<i",
          UINT32: "<I", INT64: "<q", UINT64: "<Q", SINGLE: "<f", DOUBLE: "<d", DATETIME: "<q"}


class Invalid(Exception):
    """The bytes are not a nettrace stream this reader understands (or break a bound)."""


@dataclass(frozen=True)
class Field:
    type_code: int
    name: str
    fields: tuple[Field, ...] = ()  # of an object


@dataclass(frozen=True)
class Metadata:
    id: int
    provider: str
    event_id: int
    event_name: str
    fields: tuple[Field, ...]


@dataclass
class Event:
    metadata: Metadata
    values: dict[str, object] = field(default_factory=dict)  # field name -> value, objects flattened


class _Buf:
    """Reads from bytes; every shortfall is Invalid."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Invalid(f"{n} bytes wanted at {self.pos} of {len(self.data)}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str) -> int | float:
        v: int | float = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return v

    def int32(self) -> int:
        return int(self.unpack("<i"))

    def varint(self, max_bytes: int = 10) -> int:
        v = shift = 0
        for _ in range(max_bytes):
            b = self.take(1)[0]
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7
        raise Invalid("varint too long")

    def utf16z(self) -> str:
        """A NUL-terminated UTF-16LE string."""
        end = self.pos
        while True:
            if end + 2 > len(self.data):
                raise Invalid("unterminated string")
            if self.data[end:end + 2] == b"\0\0":
                break
            end += 2
            if (end - self.pos) // 2 > MAX_STRING_CHARS:
                raise Invalid("string too long")
        s = self.data[self.pos:end].decode("utf-16-le", errors="replace")
        self.pos = end + 2
        return s


def _fields(b: _Buf, depth: int) -> tuple[Field, ...]:
    if depth > MAX_DEPTH:
        raise Invalid("fields nested too deep")
    n = b.int32()
    if not 0 <= n <= MAX_FIELDS:
        raise Invalid(f"{n} fields")
    out = []
    for _ in range(n):
        tc = b.int32()
        sub: tuple[Field, ...] = ()
        if tc == OBJECT:
            sub = _fields(b, depth + 1)
        elif tc == ARRAY:
            raise Invalid("array fields are not read")
        out.append(Field(tc, b.utf16z(), sub))
    return tuple(out)


def parse_metadata(payload: bytes) -> Metadata:
    b = _Buf(payload)
    mid = b.int32()
    provider = b.utf16z()
    event_id = b.int32()
    name = b.utf16z()
    b.take(8 + 4 + 4)  # keywords, version, level
    fields = _fields(b, 0) if b.pos < len(payload) else ()
    return Metadata(mid, provider, event_id, name, fields)


def decode(md: Metadata, payload: bytes) -> Event:
    """An event's fields by its metadata; objects' fields land in the same dict."""
    ev = Event(md)
    b = _Buf(payload)

    def walk(fields: tuple[Field, ...]) -> None:
        for f in fields:
            if f.type_code == OBJECT:
                walk(f.fields)
            elif f.type_code == STRING:
                ev.values[f.name] = b.utf16z()
            elif f.type_code in _FIXED:
                ev.values[f.name] = b.unpack(_FIXED[f.type_code])
            elif f.type_code == GUID:
                ev.values[f.name] = b.take(16)
            elif f.type_code == DECIMAL:
                ev.values[f.name] = b.take(16)
            else:
                raise Invalid(f"field type {f.type_code}")

    walk(md.fields)
    return ev


def _events(block: bytes) -> Iterator[tuple[int, bytes]]:
    """(metadata id, payload) of each event of an EventBlock or MetadataBlock."""
    b = _Buf(block)
    header_size = int(b.unpack("<H"))
    flags = int(b.unpack("<H"))
    if header_size < 4:
        raise Invalid(f"block header of {header_size} bytes")
    b.take(header_size - 4)
    compressed = bool(flags & 1)
    mid = 0
    payload_size = 0
    while b.pos < len(block):
        if compressed:
            f = b.take(1)[0]
            if f & 1:
                mid = b.varint(5)
            if f & 2:
                b.varint(5)  # sequence number delta
                b.varint(10)  # capture thread
                b.varint(5)  # processor
            if f & 4:
                b.varint(10)  # thread
            if f & 8:
                b.varint(5)  # stack
            b.varint(10)  # timestamp delta
            if f & 16:
                b.take(16)
            if f & 32:
                b.take(16)
            if f & 128:
                payload_size = b.varint(5)
            yield mid & 0x7FFFFFFF, b.take(payload_size)
        else:
            start = b.pos
            b.int32()  # event size
            mid = b.int32() & 0x7FFFFFFF
            b.take(4 + 8 + 8 + 4 + 4 + 8 + 16 + 16)
            n = b.int32()
            yield mid, b.take(n)
            b.take((4 - (b.pos - start) % 4) % 4 if b.pos < len(block) else 0)


class Reader:
    """Pulls objects from `read(n)` (exactly n bytes, or an exception of the source's) and
    calls on_event for each event of a known provider's metadata."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.pos = 0
        self.metadata: dict[int, Metadata] = {}
        self.ended = False

    def _take(self, n: int) -> bytes:
        b = self._read(n)
        if len(b) != n:
            raise Invalid(f"stream ended: {len(b)} of {n} bytes")
        self.pos += n
        return b

    def _int32(self) -> int:
        return int(struct.unpack("<i", self._take(4))[0])

    def _tag(self, want: int) -> None:
        t = self._take(1)[0]
        if t != want:
            raise Invalid(f"tag {t}, {want} expected at {self.pos - 1}")

    def open(self) -> None:
        """The magic, the serialization header and the Trace object."""
        if self._take(8) != MAGIC:
            raise Invalid("not a nettrace stream")
        n = self._int32()
        if n != len(SERIALIZATION) or self._take(n) != SERIALIZATION:
            raise Invalid("unknown serialization")
        name = self._begin()
        if name != "Trace":
            raise Invalid(f"first object {name!r}")
        self._take(16 + 8 + 8 + 4 + 4 + 4 + 4)
        self._tag(TAG_END)

    def _begin(self) -> str | None:
        """An object's opening and its type's name; None at the end of the stream."""
        t = self._take(1)[0]
        if t == TAG_NULL:
            self.ended = True
            return None
        if t != TAG_BEGIN:
            raise Invalid(f"tag {t} where an object begins")
        self._tag(TAG_BEGIN)
        self._tag(TAG_NULL)
        self._take(8)  # version, minimum reader version
        n = self._int32()
        if not 0 < n <= MAX_NAME:
            raise Invalid(f"type name of {n} bytes")
        name = self._take(n).decode("ascii", errors="replace")
        self._tag(TAG_END)
        return name

    def next_block(self) -> list[Event]:
        """Reads one block; the events it holds (none for metadata and other blocks, or at
        the end: then `ended`)."""
        name = self._begin()
        if name is None:
            return []
        size = self._int32()
        if not 0 <= size <= MAX_BLOCK:
            raise Invalid(f"block of {size} bytes")
        self._take((4 - self.pos % 4) % 4)
        data = self._take(size)
        self._tag(TAG_END)
        out: list[Event] = []
        try:
            if name == "MetadataBlock":
                for _, payload in _events(data):
                    md = parse_metadata(payload)
                    if md.id not in self.metadata and len(self.metadata) >= MAX_METADATA:
                        raise Invalid(f"more than {MAX_METADATA} event descriptions")
                    self.metadata[md.id] = md
            elif name == "EventBlock":
                for mid, payload in _events(data):
                    known = self.metadata.get(mid)
                    if known is None:
                        raise Invalid(f"event of unknown metadata {mid}")
                    if known.fields:
                        out.append(decode(known, payload))
        except (struct.error, ValueError, OverflowError) as e:  # ValueError: not Invalid, by construction
            if isinstance(e, Invalid):
                raise
            raise Invalid(str(e)) from e
        return out


def read_all(data: bytes) -> list[Event]:
    """Every event of a recorded stream (tests, tools). Raises Invalid."""
    b = _Buf(data)
    r = Reader(lambda n: b.take(n))
    r.open()
    out: list[Event] = []
    while not r.ended:
        out += r.next_block()
    return out
