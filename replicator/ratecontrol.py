"""Adaptive rate control for background resync traffic (sans-I/O).

Resync copies dirty regions over the replication link while the application keeps
writing through the same link. The controller sizes the resync's *in-flight window*
(bytes sequenced but not yet acknowledged by the peer) so that the resync fills the
link while application write latency stays near its idle level. It reads no clock:
every call that depends on time takes ``now_s`` (seconds, monotonic).

Algorithm: AIMD on the window, evaluated once per control interval (``interval_s``).

* Baseline. App writes completed while no resync runs feed a ring of the last
  :data:`BASELINE_SAMPLES_MAX` latencies; its p99 is the baseline. The ring forgets old
  load levels, so the baseline follows the workload. Writes that complete within a
  drain estimate after :meth:`RateController.stop` are not fed (they may still have
  queued behind resync bytes). Writes during a resync never feed it: they are what we
  judge, not the reference.
* Per interval we measure resync throughput (acked bytes / elapsed) and the p99 of the
  app writes that completed in it.
* Decrease: if that p99 exceeds ``latency_factor`` x max(baseline p99,
  ``min_latency_s``), the window is multiplied by 0.7 (not below
  ``min_window_bytes``). Resync bytes in the link queue in front of app writes, so
  latency above baseline means the window overfills the link; a multiplicative cut
  drains that queue within a few intervals. The floor keeps sub-millisecond noise on
  fast disks from throttling.
* Increase: otherwise, if the resync actually used the window (in flight reached 80 %
  of it), the window grows by max(one region, window / 8), up to ``max_window_bytes``.
  Growing an unused window would only buy a burst later. Growth by a fraction of the
  window (not a constant) finds a large bandwidth-delay product in tens of intervals;
  the cap on the step keeps the overshoot before the next cut to about 12 %.
* An interval without app writes follows the increase rule (nothing to protect).
* Without a baseline (fewer than :data:`BASELINE_MIN_SAMPLES` idle writes seen) an
  interval with app writes holds the window at most ``initial_window_bytes``: we cannot
  tell resync-caused latency from normal latency, so we neither grow into the
  application's way nor shrink on noise.

The optional hard cap ``max_rate_bytes_s`` is a token bucket consulted by
:meth:`RateController.admit`, independent of the window.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from replicator.latency import LatencyRecorder

# Idle app writes kept for the baseline. p99 of 1024 samples rests on the ~11 largest,
# so one outlier does not set it; sorting 1024 floats when it changes is cheap.
BASELINE_SAMPLES_MAX = 1024
# Below this many idle samples a p99 is just "the maximum": the baseline is unknown.
BASELINE_MIN_SAMPLES = 20
# Largest app latencies kept per interval (a min-heap). The p99 is exact up to
# 100 x this many writes per interval (102,400 writes in 0.1 s); beyond, it reports
# the smallest kept sample, which is >= the true p99 (errs towards throttling).
INTERVAL_TOP_SAMPLES_MAX = 1024
# Upper bound on the settle time after stop(): a drain estimate from a stale
# throughput must not blind the baseline for long.
SETTLE_MAX_S = 1.0
DECREASE_FACTOR = 0.7
USED_FRACTION = 0.8
INCREASE_DIVISOR = 8
# Weight of the newest interval in the throughput EWMA (about 5 intervals of memory).
THROUGHPUT_EWMA_WEIGHT = 0.2
# Float slack when comparing tokens (bytes): a caller that waited exactly the time
# admit() returned must be admitted.
_TOKEN_SLACK_BYTES = 1e-6


@dataclass(frozen=True)
class RateConfig:
    """Controller parameters; ``__post_init__`` raises ValueError naming a bad field.

    ``interval_s``: control interval (s). ``latency_factor``: app p99 above this
    multiple of the baseline p99 cuts the window (> 1). ``min_latency_s``: floor on the
    baseline in that comparison (s). ``min_window_bytes`` / ``max_window_bytes`` /
    ``initial_window_bytes``: window bounds and start (bytes; min >= one region).
    ``max_rate_bytes_s``: optional hard cap (bytes/s). ``region_bytes``: one copy.
    """

    interval_s: float = 0.1
    latency_factor: float = 1.5
    min_latency_s: float = 200e-6
    min_window_bytes: int = 256 * 1024
    max_window_bytes: int = 64 * 1024 * 1024
    initial_window_bytes: int = 4 * 1024 * 1024
    max_rate_bytes_s: int | None = None
    region_bytes: int = 65536

    def __post_init__(self) -> None:
        def bad(name: str, problem: str) -> ValueError:
            return ValueError(f"RateConfig.{name}={getattr(self, name)!r}: {problem}")

        if not (0 < self.interval_s < math.inf):
            raise bad("interval_s", "must be a positive finite number of seconds")
        if not (1 < self.latency_factor < math.inf):
            raise bad("latency_factor", "must be finite and > 1")
        if not (0 <= self.min_latency_s < math.inf):
            raise bad("min_latency_s", "must be a finite number of seconds >= 0")
        if self.region_bytes <= 0:
            raise bad("region_bytes", "must be > 0")
        if self.min_window_bytes < self.region_bytes:
            raise bad("min_window_bytes", "must hold at least one region")
        if self.max_window_bytes < self.min_window_bytes:
            raise bad("max_window_bytes", "must be >= min_window_bytes")
        if not self.min_window_bytes <= self.initial_window_bytes <= self.max_window_bytes:
            raise bad("initial_window_bytes", "must lie in [min_window_bytes, max_window_bytes]")
        if self.max_rate_bytes_s is not None and self.max_rate_bytes_s <= 0:
            raise bad("max_rate_bytes_s", "must be None or > 0")

    @property
    def burst_bytes(self) -> float:
        """Token-bucket depth: max(one region, 0.1 s at the cap); 0 without a cap."""
        if self.max_rate_bytes_s is None:
            return 0.0
        return max(float(self.region_bytes), 0.1 * self.max_rate_bytes_s)


@dataclass(frozen=True)
class RateStatistics:
    """A read-only snapshot. Throughputs in bytes/s, latencies in seconds; ``None``
    where nothing was measured (no app write last interval, no baseline yet).
    ``decreases`` / ``increases`` count decisions; one taken at a bound leaves the
    window unchanged."""

    active: bool
    window_bytes: int
    throughput_bytes_s: float
    throughput_ewma_bytes_s: float
    app_p99_s: float | None
    baseline_p99_s: float | None
    decreases: int
    increases: int


class RateController:
    """Sizes the resync in-flight window (AIMD on app write latency) and enforces the
    optional hard cap. Every ``now_s`` must be >= the previous one (ValueError)."""

    def __init__(self, config: RateConfig | None = None) -> None:
        self.config = config or RateConfig()
        self.active = False
        self._window = self.config.initial_window_bytes
        self._now_s = -math.inf
        self._baseline = LatencyRecorder(BASELINE_SAMPLES_MAX)
        self._baseline_p99: float | None = None
        self._baseline_stale = False
        self._settle_until_s = -math.inf
        # Current interval.
        self._interval_start_s = 0.0
        self._acked_bytes = 0
        self._top: list[float] = []
        self._writes = 0
        self._in_flight = 0
        self._max_in_flight = 0
        # Results.
        self._throughput = 0.0
        self._ewma = 0.0
        self._app_p99: float | None = None
        self.decreases = 0
        self.increases = 0
        # Token bucket (hard cap).
        self._tokens = self.config.burst_bytes
        self._tokens_at_s: float | None = None

    # ------------------------------------------------------------ shell events

    def start(self, now_s: float) -> None:
        """A resync begins: the window restarts at ``initial_window_bytes``."""
        self._advance(now_s)
        self.active = True
        self._window = self.config.initial_window_bytes
        self._in_flight = 0
        self._begin_interval(now_s)

    def stop(self) -> None:
        """The resync ended. Idle writes feed the baseline again once the bytes still
        queued have drained (estimate, at most :data:`SETTLE_MAX_S`)."""
        if not self.active:
            return
        drain_s = self._in_flight / self._ewma if self._ewma > 0 else 0.0
        self._settle_until_s = self._now_s + self.config.interval_s + min(drain_s, SETTLE_MAX_S)
        self.active = False

    def on_app_write(self, latency_s: float, now_s: float) -> None:
        """One application write completed after ``latency_s`` seconds."""
        self._advance(now_s)
        if not self.active:
            if now_s >= self._settle_until_s:
                self._baseline.add(latency_s)
                self._baseline_stale = True
            return
        self._writes += 1
        if len(self._top) < INTERVAL_TOP_SAMPLES_MAX:
            heapq.heappush(self._top, latency_s)
        elif latency_s > self._top[0]:
            heapq.heapreplace(self._top, latency_s)

    def on_resync_acked(self, nbytes: int, now_s: float) -> None:
        """The peer applied ``nbytes`` of resync data."""
        self._advance(now_s)
        if self.active:
            self._acked_bytes += nbytes

    def on_in_flight(self, nbytes: int, now_s: float) -> None:
        """Resync bytes now in flight (report after sequencing and after acks)."""
        self._advance(now_s)
        self._in_flight = nbytes
        self._max_in_flight = max(self._max_in_flight, nbytes)

    # ------------------------------------------------------------ shell queries

    def window_bytes(self, now_s: float) -> int:
        """Resync bytes that may be in flight now: in [min_window_bytes,
        max_window_bytes] while active, 0 when no resync runs."""
        self._advance(now_s)
        return self._window if self.active else 0

    def admit(self, nbytes: int, now_s: float) -> float:
        """Seconds to wait before a copy of ``nbytes`` may be sequenced (0.0: go now,
        and the bytes are charged). Over any span T, admitted bytes stay <= cap x T +
        max(burst, largest copy). Always 0.0 without ``max_rate_bytes_s``."""
        self._advance(now_s)
        rate = self.config.max_rate_bytes_s
        if rate is None:
            return 0.0
        burst = self.config.burst_bytes
        if self._tokens_at_s is not None:
            self._tokens = min(burst, self._tokens + (now_s - self._tokens_at_s) * rate)
        self._tokens_at_s = now_s
        need = min(float(nbytes), burst)  # a copy larger than the bucket waits for a full one
        if self._tokens + _TOKEN_SLACK_BYTES >= need:
            self._tokens -= nbytes
            return 0.0
        return (need - self._tokens) / rate

    def next_deadline_s(self) -> float | None:
        """When the current interval closes (a shell may arm a timer), or None."""
        return self._interval_start_s + self.config.interval_s if self.active else None

    def statistics(self) -> RateStatistics:
        """Snapshot of the window, last-interval measures and decision counts."""
        return RateStatistics(
            active=self.active,
            window_bytes=self._window,
            throughput_bytes_s=self._throughput,
            throughput_ewma_bytes_s=self._ewma,
            app_p99_s=self._app_p99,
            baseline_p99_s=self._baseline_p99_now(),
            decreases=self.decreases,
            increases=self.increases,
        )

    # ------------------------------------------------------------ internals

    def _advance(self, now_s: float) -> None:
        if now_s < self._now_s:
            raise ValueError(f"now_s went backwards: {now_s} < {self._now_s}")
        self._now_s = now_s
        if self.active and now_s >= self._interval_start_s + self.config.interval_s:
            self._evaluate(now_s)
            self._begin_interval(now_s)

    def _begin_interval(self, now_s: float) -> None:
        self._interval_start_s = now_s
        self._acked_bytes = 0
        self._top.clear()
        self._writes = 0
        self._max_in_flight = self._in_flight

    def _baseline_p99_now(self) -> float | None:
        if self._baseline_stale:
            self._baseline_stale = False
            if self._baseline.count >= BASELINE_MIN_SAMPLES:
                self._baseline_p99 = self._baseline.percentile(99)
        return self._baseline_p99

    def _interval_p99(self) -> float | None:
        if self._writes == 0:
            return None
        rank_from_top = self._writes - (99 * self._writes + 99) // 100 + 1
        if rank_from_top > len(self._top):
            return self._top[0]
        return heapq.nlargest(rank_from_top, self._top)[-1]

    def _evaluate(self, now_s: float) -> None:
        cfg = self.config
        self._throughput = self._acked_bytes / (now_s - self._interval_start_s)
        self._ewma += THROUGHPUT_EWMA_WEIGHT * (self._throughput - self._ewma)
        self._app_p99 = self._interval_p99()
        baseline = self._baseline_p99_now()
        if self._app_p99 is not None and baseline is None:
            self._window = min(self._window, cfg.initial_window_bytes)
            return
        if self._app_p99 is not None and baseline is not None:
            limit_s = cfg.latency_factor * max(baseline, cfg.min_latency_s)
            if self._app_p99 > limit_s:
                self._window = max(cfg.min_window_bytes, int(self._window * DECREASE_FACTOR))
                self.decreases += 1
                return
        if self._max_in_flight >= USED_FRACTION * self._window:
            step = max(cfg.region_bytes, self._window // INCREASE_DIVISOR)
            self._window = min(cfg.max_window_bytes, self._window + step)
            self.increases += 1
