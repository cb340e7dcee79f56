"""A BPF ring buffer read in bulk from its memory mapping, without a C callback per record.

BCC's consumer (libbpf's ring_buffer__poll) calls back into Python through ctypes once per
record, and the callback copies the record with ctypes.string_at: three Python calls per event
before the handler runs. Here the ring is mapped into the agent as the kernel lays it out (one
read-write page holding the consumer position; one read-only page holding the producer position,
followed by the data area mapped twice in a row, so a record that wraps is still contiguous) and
a drain walks every committed record with a slice of the mapping each.

Record layout (kernel/bpf/ringbuf.c): an 8-byte header, a u32 length whose top bit marks a
record still being written (BUSY) and next bit one the producer discarded, then a u32 page
offset; the data follows, and the next record starts at the next 8-byte boundary. The consumer
position is published after a drain and the producer position read again, so a record
committed meanwhile is read now (the kernel only wakes a consumer that had caught up).

The reads rely on x86's ordering of plain loads (the kernel publishes the header with a release
store after the data); other architectures keep BCC's consumer (`supported()`).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

Handler = Callable[[bytes], None]


@dataclass(frozen=True)
class Batched:
    """A handler of many records a call: a drain hands it every record it read in one pass,
    in order (one Python call for a wake-up's records instead of one each). Called with one
    record, it handles a list of one (BCC's and the perf buffer's callbacks). It should not
    raise for one bad record: an exception loses the rest of that call's records (logged)."""

    handle: Callable[[list[bytes]], None]

    def __call__(self, raw: bytes) -> None:
        self.handle([raw])


def supported(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in ("x86_64", "AMD64")


@dataclass
class Ring:
    """One ring: `consumer` holds the consumer position at offset 0; `producer` the producer
    position at 0 and, from `data_offset`, the data area twice (`size` bytes, a power of two)."""

    consumer: mmap.mmap | bytearray
    producer: mmap.mmap | bytes
    size: int
    handler: Handler | Batched
    data_offset: int = mmap.PAGESIZE
    maps: list[mmap.mmap] = field(default_factory=list)
    # The consumer position as one aligned 64-bit word: a single store publishes it (the kernel
    # reads it concurrently to know the free space; a byte-wise copy could be read torn).
    _position: ctypes.c_uint64 | None = None

    def __post_init__(self) -> None:
        self._position = ctypes.c_uint64.from_buffer(self.consumer)

    @classmethod
    def open(cls, fd: int, size: int, handler: Handler | Batched) -> Ring:
        page = mmap.PAGESIZE
        consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            consumer.close()
            raise
        return cls(consumer, producer, size, handler, page, [consumer, producer])

    def drain(self) -> int:
        """Hand every committed record to the handler, in order; the number handed."""
        if isinstance(self.handler, Batched):
            return self._drain_batched(self.handler.handle)
        consumer, producer, handler = self.consumer, self.producer, self.handler
        mask, base = self.size - 1, self.data_offset
        u64, u32 = _U64.unpack_from, _U32.unpack_from
        cons = u64(consumer, 0)[0]
        handed = 0
        while True:
            prod = u64(producer, 0)[0]
            start = cons
            while cons < prod:
                at = base + (cons & mask)
                length = u32(producer, at)[0]
                if length & BUSY:
                    break
                size = length & ~(BUSY | DISCARD)
                if not length & DISCARD:
                    try:
                        handler(producer[at + HEADER:at + HEADER + size])
                    except Exception:  # noqa: BLE001 - one bad event must not stop the others (nor be read again)
                        log.exception("handling a ring buffer record")
                    handed += 1
                cons += (size + HEADER + 7) & ~7
            if cons == start:
                return handed
            self._position.value = cons  # type: ignore[union-attr]  # the kernel may reuse the space from here on

    def _drain_batched(self, handle: Callable[[list[bytes]], None]) -> int:
        """`drain` for a Batched handler: the records of each pass are copied out, the space
        given back to the kernel, then handed in one call."""
        consumer, producer = self.consumer, self.producer
        mask, base = self.size - 1, self.data_offset
        u64, u32 = _U64.unpack_from, _U32.unpack_from
        cons = u64(consumer, 0)[0]
        handed = 0
        while True:
            prod = u64(producer, 0)[0]
            start = cons
            batch: list[bytes] = []
            append = batch.append
            while cons < prod:
                at = base + (cons & mask)
                length = u32(producer, at)[0]
                if length & BUSY:
                    break
                size = length & ~(BUSY | DISCARD)
                if not length & DISCARD:
                    append(producer[at + HEADER:at + HEADER + size])
                cons += (size + HEADER + 7) & ~7
            if cons == start:
                return handed
            self._position.value = cons  # type: ignore[union-attr]  # copied: the kernel may reuse the space
            if batch:
                handed += len(batch)
                try:
                    handle(batch)
                except Exception:  # noqa: BLE001 - the next records must still be read (these never again)
                    log.exception("handling %d ring buffer records", len(batch))

    def close(self) -> None:
        self._position = None  # the mapping cannot close while a ctypes view exports it
        for m in self.maps:
            m.close()
        self.maps.clear()


@dataclass
class RingSet:
    """The rings of the loaded programs and one epoll over them."""

    rings: list[Ring] = field(default_factory=list)
    _by_fd: dict[int, Ring] = field(default_factory=dict)
    _epoll: select.epoll | None = None

    def add(self, fd: int, ring: Ring) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = ring
        self.rings.append(ring)

    def poll(self, timeout_ms: int) -> int:
        """Wait at most `timeout_ms` for a wake-up; drain the rings that woke us, in the order
        they did (as libbpf does), then every ring (a ring written without wake-ups is read on
        any wake-up and at least every `timeout_ms`). The number of records handed."""
        if self._epoll is None:
            return 0
        handed = 0
        for fd, _ in self._epoll.poll(timeout_ms / 1000):
            handed += self._by_fd[fd].drain()
        for ring in self.rings:
            handed += ring.drain()
        return handed

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for ring in self.rings:
            ring.close()
        self.rings.clear()
        self._by_fd.clear()

