"""agent/ebpf/ringbuf.py: records read from a ring laid out as the kernel lays it out (no
kernel here: the mappings are byte arrays; tests/system/test_loader.py reads real rings)."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

from agent.ebpf.ringbuf import _U32, _U64, BUSY, DISCARD, Ring, supported


def records(payloads: Sequence[bytes | None], size: int, start: int = 0) -> tuple[bytearray, bytes]:
    """A ring's two mappings laid out as the kernel would with `payloads` written from position
    `start` (None: a discarded record; the last may be b"BUSY" for one still being written):
    (consumer page, producer page + data twice). For tests of `Ring` without a kernel."""
    data = bytearray(size)
    pos = start
    for p in payloads:
        body = p if p is not None else b"x" * 5
        length = len(body)
        if p is None:
            length |= DISCARD
        if p == b"BUSY":
            length |= BUSY
        rec = _U32.pack(length) + _U32.pack(0) + body
        rec += b"\0" * (-len(rec) % 8)
        for i, b in enumerate(rec):
            data[(pos + i) % size] = b
        pos += len(rec)
    consumer = bytearray(mmap.PAGESIZE)
    _U64.pack_into(consumer, 0, start)
    producer = bytearray(mmap.PAGESIZE)
    _U64.pack_into(producer, 0, pos)
    return consumer, bytes(producer + data + data)


def ring(payloads: Sequence[bytes | None], size: int = 64, start: int = 0) -> tuple[Ring, list[bytes]]:
    consumer, producer = records(payloads, size, start)
    got: list[bytes] = []
    return Ring(consumer, producer, size, got.append), got


def test_reads_every_committed_record_in_order_and_moves_the_consumer() -> None:
    r, got = ring([b"one", b"second record", b""])
    assert r.drain() == 3
    assert got == [b"one", b"second record", b""]
    assert _U64.unpack_from(r.consumer, 0)[0] == 16 + 24 + 8
    assert r.drain() == 0 and len(got) == 3


def test_a_record_that_wraps_is_read_whole() -> None:
    r, got = ring([b"abcdefghijklmnopqrstuvwxyz"], size=64, start=48)
    assert r.drain() == 1
    assert got == [b"abcdefghijklmnopqrstuvwxyz"]
    assert _U64.unpack_from(r.consumer, 0)[0] == 48 + 40


def test_discarded_records_are_skipped_and_a_busy_one_stops_the_drain() -> None:
    r, got = ring([b"a", None, b"b", b"BUSY", b"c"], size=128)
    assert r.drain() == 2
    assert got == [b"a", b"b"]
    assert _U64.unpack_from(r.consumer, 0)[0] == 16 + 16 + 16  # up to the busy record


def test_positions_past_the_ring_size_keep_counting() -> None:
    r, got = ring([b"x" * 10, b"y" * 3], size=64, start=64 * 1000 + 40)
    assert r.drain() == 2
    assert got == [b"x" * 10, b"y" * 3]


def test_only_x86_reads_in_bulk() -> None:
    assert supported("x86_64") and not supported("aarch64")
    assert BUSY >> 31 == 1 and DISCARD >> 30 == 1 and mmap.PAGESIZE > 0 and _U32.size == 4


def test_a_handler_that_raises_loses_only_its_record() -> None:
    consumer, producer = records([b"bad", b"good"], 64)
    got: list[bytes] = []

    def handler(b: bytes) -> None:
        if b == b"bad":
            raise ValueError(b)
        got.append(b)

    r = Ring(consumer, producer, 64, handler)
    assert r.drain() == 2 and got == [b"good"]
    assert r.drain() == 0
