"""A latency histogram on the L7 buckets (agent/l7/contract.py BUCKETS): what the kernel keeps
per HTTP connection (struct l7_hist) and what user space keeps per series."""

from __future__ import annotations

import bisect
from typing import Any

from agent.l7.contract import BUCKETS


class Hist:
    __slots__ = ("count", "sum", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * len(BUCKETS)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        i = bisect.bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            self.buckets[i] += 1

    def add(self, count: int, sum_seconds: float, buckets: list[int]) -> None:
        self.count += count
        self.sum += sum_seconds
        for i, n in enumerate(buckets):
            self.buckets[i] += n

    def merge(self, other: Hist) -> None:
        self.add(other.count, other.sum, other.buckets)

    @classmethod
    def of_kernel(cls, v: Any) -> Hist:
        """From a `struct l7_hist` value (count, sum_ns, buckets) read from the l7_http map."""
        h = cls()
        h.add(int(v.count), v.sum_ns / 1e9, [int(b) for b in v.buckets])
        return h

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for le, n in zip(BUCKETS, self.buckets, strict=True):
            acc += n
            out.append((repr(le), acc))
        out.append(("+Inf", self.count))
        return out
