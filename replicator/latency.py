"""Bounded latency recorder: the last N samples, percentiles on demand."""

from __future__ import annotations

import math


class LatencyRecorder:
    """Keeps the most recent ``capacity`` samples (seconds) in a ring buffer.

    Memory is fixed; ``percentile`` sorts a copy (status calls are rare).
    """

    def __init__(self, capacity: int = 8192) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._buf: list[float] = []
        self._capacity = capacity
        self._next = 0
        self.count = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        if len(self._buf) < self._capacity:
            self._buf.append(seconds)
        else:
            self._buf[self._next] = seconds
            self._next = (self._next + 1) % self._capacity

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (0..100, nearest rank) of the kept samples, or None."""
        if not self._buf:
            return None
        ordered = sorted(self._buf)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def reset(self) -> None:
        self._buf.clear()
        self._next = 0
        self.count = 0
