"""agent/l7/framing.py: length-prefixed frames from calls' first bytes — joined in one call,
split over several, past the captured bytes, and a lost position regained at the next call."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7.framing import Framer


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def size(head: bytes) -> int | None:
    n = int.from_bytes(head[:4], "big")
    return n + 4 if n < 1 << 20 else None


def test_frames_joined_and_split_keep_the_time_of_their_first_call() -> None:
    f = Framer(4, size)
    a, b, c = frame(b"a" * 10), frame(b"b" * 3), frame(b"c" * 20)
    out = f.feed(a + b + c[:2], len(a + b) + 2, 1)
    out += f.feed(c[2:9], 7, 2)
    out += f.feed(c[9:], len(c) - 9, 3)
    assert [(x.data, x.size, x.ts_ns, x.complete) for x in out] == [
        (a, 14, 1, True), (b, 7, 1, True), (c, 24, 1, True)]


def test_bytes_past_the_capture_are_skipped_by_count_and_a_frame_is_kept_up_to_keep() -> None:
    f = Framer(4, size, keep=16)
    big, small = frame(b"x" * 100), frame(b"yz")
    out = f.feed(big[:50], 60, 1)  # 50 of the call's 60 bytes captured
    out += f.feed(big[60:], 44, 2)
    out += f.feed(small, len(small), 3)
    assert [(x.data, x.size, x.ts_ns) for x in out] == [(big[:16], 104, 1), (small, 6, 3)]


def test_a_header_past_the_capture_or_garbage_loses_the_rest_of_that_call_only() -> None:
    f = Framer(4, size)
    a = frame(b"a" * 10)
    assert f.feed(a, len(a) + 500, 1)[0].data == a  # the next frame's header was not captured
    assert f.feed(b"\xff\xff\xff\xff garbage", 13, 2) == []
    assert [x.data for x in f.feed(a, len(a), 3)] == [a]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=64), st.integers(0, 200)), max_size=12))
def test_any_calls_never_raise_and_frames_are_never_longer_than_kept(calls: list[tuple[bytes, int]]) -> None:
    f = Framer(4, size, keep=32)
    for data, n in calls:
        for x in f.feed(data, n, 0):
            assert len(x.data) <= min(x.size, 32)
