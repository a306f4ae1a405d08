"""The round-trip budget (sans-I/O): the seeds require an inter-node round
trip of at most 500 µs, well below what causes spurious regroups.

:class:`RttWindow` keeps the round trips measured to one peer over a sliding
window (bounded by ``window_s`` and ``max_samples``) and reports p50, p99 and
max. The budget counts as *broken* when the window's p99 exceeds
``budget_us`` continuously for ``sustained_s`` and at least two samples in
the window are over it (one slow sample is never an event, even where the
window is small enough for it to be the p99); :meth:`RttWindow.add` then
returns a ``"breach"`` transition once, and ``"recovered"`` once the p99 is
back within the budget. :func:`verdict` turns a burst of probes into the
per-link line of ``geoclus cluster check-latency``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 100)))
    return sorted_values[int(rank) - 1]


@dataclass(frozen=True, slots=True)
class RttStats:
    samples: int
    p50_us: float
    p99_us: float
    max_us: float


class RttWindow:
    """Round trips to one peer; see the module docstring."""

    def __init__(
        self,
        budget_us: float = 500.0,
        window_s: float = 60.0,
        sustained_s: float = 10.0,
        max_samples: int = 4096,
    ) -> None:
        if budget_us <= 0 or window_s <= 0 or sustained_s < 0 or max_samples < 1:
            raise ValueError("budget, window and sample bound must be positive")
        self.budget_us = budget_us
        self.window_s = window_s
        self.sustained_s = sustained_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._over_since: float | None = None
        self.breached = False

    def add(self, rtt_us: float, now: float) -> str | None:
        """Record one round trip measured at ``now``; returns ``"breach"`` or
        ``"recovered"`` when the budget state changes, else None."""
        if rtt_us < 0:
            raise ValueError(f"a round trip cannot be negative ({rtt_us} us)")
        self._samples.append((now, rtt_us))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        slow = sum(1 for _, v in self._samples if v > self.budget_us)
        over = slow >= 2 and self.stats().p99_us > self.budget_us
        if not over:
            self._over_since = None
            if self.breached:
                self.breached = False
                return "recovered"
            return None
        if self._over_since is None:
            self._over_since = now
        if not self.breached and now - self._over_since >= self.sustained_s:
            self.breached = True
            return "breach"
        return None

    def stats(self) -> RttStats:
        values = sorted(v for _, v in self._samples)
        if not values:
            return RttStats(0, 0.0, 0.0, 0.0)
        return RttStats(len(values), percentile(values, 50), percentile(values, 99), values[-1])


@dataclass(frozen=True, slots=True)
class LinkVerdict:
    """One link's result of an on-demand probe burst."""

    peer: str
    stats: RttStats
    lost: int
    budget_us: float

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.stats.samples > 0 and self.stats.p99_us <= self.budget_us

    def line(self) -> str:
        s = self.stats
        if s.samples == 0:
            return f"FAIL {self.peer}: no answer to {self.lost} probes"
        head = "PASS" if self.ok else "FAIL"
        why = ""
        if s.p99_us > self.budget_us:
            why = f"; p99 is {s.p99_us / self.budget_us:.1f}x the {self.budget_us:.0f} us budget"
        if self.lost:
            why += f"; {self.lost} probes lost"
        return (
            f"{head} {self.peer}: p50 {s.p50_us:.0f} us, p99 {s.p99_us:.0f} us, "
            f"max {s.max_us:.0f} us over {s.samples} probes{why}"
        )


def verdict(peer: str, rtts_us: list[float], lost: int, budget_us: float) -> LinkVerdict:
    """The verdict for one link from a probe burst's round trips."""
    values = sorted(rtts_us)
    if values:
        stats = RttStats(len(values), percentile(values, 50), percentile(values, 99), values[-1])
    else:
        stats = RttStats(0, 0.0, 0.0, 0.0)
    return LinkVerdict(peer, stats, lost, budget_us)
