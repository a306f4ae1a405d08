"""Resync rate controller (replicator/ratecontrol.py): AIMD decisions fed by hand,
a closed-loop link simulation, the hard cap, config validation and window bounds."""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from replicator.ratecontrol import (
    BASELINE_MIN_SAMPLES,
    RateConfig,
    RateController,
)

KiB = 1024
MiB = 1024 * 1024
BASE_S = 0.010  # app write latency on an idle link (a synchronous geo write)


def learned(config: RateConfig | None = None, base_s: float = BASE_S) -> RateController:
    """A controller that saw 200 idle writes at ``base_s`` and starts a resync at t=1."""
    ctl = RateController(config)
    for i in range(200):
        ctl.on_app_write(base_s, i * 0.005)
    ctl.start(1.0)
    return ctl


def run_interval(
    ctl: RateController, t0: float, latency_s: float | None, used: bool = True
) -> float:
    """Feed one 0.1 s interval starting at ``t0``: 100 writes at ``latency_s`` (or none),
    in flight at the window (or none), 1 MiB acked. Returns the next interval's start."""
    window = ctl.window_bytes(t0)
    ctl.on_in_flight(window if used else 0, t0)
    for i in range(100):
        t = t0 + i * 0.001
        if latency_s is not None:
            ctl.on_app_write(latency_s, t)
    ctl.on_resync_acked(MiB, t0 + 0.099)
    return t0 + 0.1


# ------------------------------------------------------------------ decisions


def test_baseline_learned_from_idle_writes_only() -> None:
    ctl = learned()
    assert ctl.statistics().baseline_p99_s == pytest.approx(BASE_S)
    run_interval(ctl, 1.0, latency_s=1.0)  # writes during the resync: judged, not learned
    ctl.window_bytes(1.1)
    assert ctl.statistics().baseline_p99_s == pytest.approx(BASE_S)
    assert ctl.statistics().app_p99_s == pytest.approx(1.0)


def test_window_grows_while_latency_at_baseline_and_window_used() -> None:
    ctl = learned()
    t, previous = 1.0, ctl.window_bytes(1.0)
    for _ in range(10):
        t = run_interval(ctl, t, latency_s=BASE_S)
        now = ctl.window_bytes(t)
        assert now == min(64 * MiB, previous + max(64 * KiB, previous // 8))
        previous = now
    stats = ctl.statistics()
    assert stats.increases == 10
    assert stats.decreases == 0
    assert stats.throughput_bytes_s == pytest.approx(MiB / 0.1)
    assert 0 < stats.throughput_ewma_bytes_s < stats.throughput_bytes_s


def test_window_holds_when_not_used() -> None:
    ctl = learned()
    t = run_interval(ctl, 1.0, latency_s=BASE_S, used=False)
    assert ctl.window_bytes(t) == 4 * MiB
    assert ctl.statistics().increases == 0


def test_window_grows_without_app_writes() -> None:
    ctl = learned()
    t = run_interval(ctl, 1.0, latency_s=None)
    assert ctl.window_bytes(t) == 4 * MiB + 512 * KiB
    assert ctl.statistics().app_p99_s is None


def test_window_shrinks_above_factor_and_stops_at_min() -> None:
    ctl = learned()
    t = run_interval(ctl, 1.0, latency_s=1.5 * BASE_S)  # at the limit: not above it
    assert ctl.window_bytes(t) > 4 * MiB
    previous = ctl.window_bytes(t)
    t = run_interval(ctl, t, latency_s=1.6 * BASE_S)
    assert ctl.window_bytes(t) == int(previous * 0.7)
    for _ in range(30):
        t = run_interval(ctl, t, latency_s=3 * BASE_S)
        assert ctl.window_bytes(t) >= 256 * KiB
    assert ctl.window_bytes(t) == 256 * KiB
    assert ctl.statistics().decreases == 31


def test_window_stops_at_max() -> None:
    ctl = learned(RateConfig(max_window_bytes=8 * MiB))
    t = 1.0
    for _ in range(20):
        t = run_interval(ctl, t, latency_s=BASE_S)
        assert ctl.window_bytes(t) <= 8 * MiB
    assert ctl.window_bytes(t) == 8 * MiB


def test_p99_ignores_one_outlier_in_a_hundred() -> None:
    ctl = learned()
    ctl.on_in_flight(4 * MiB, 1.0)
    for i in range(100):
        ctl.on_app_write(1.0 if i == 50 else BASE_S, 1.0 + i * 0.001)
    assert ctl.window_bytes(1.1) > 4 * MiB  # p99 of 100 = second largest
    assert ctl.statistics().app_p99_s == pytest.approx(BASE_S)


def test_sub_floor_noise_does_not_throttle() -> None:
    ctl = learned(base_s=50e-6)  # fast local disk: 1.5 x 50 us would be 75 us
    t = run_interval(ctl, 1.0, latency_s=250e-6)  # under 1.5 x the 200 us floor
    assert ctl.window_bytes(t) > 4 * MiB
    t = run_interval(ctl, t, latency_s=350e-6)
    ctl.window_bytes(t)
    assert ctl.statistics().decreases == 1


def test_without_baseline_app_writes_hold_window_at_initial() -> None:
    ctl = RateController()
    for i in range(BASELINE_MIN_SAMPLES - 1):
        ctl.on_app_write(BASE_S, i * 0.001)
    ctl.start(1.0)
    t = run_interval(ctl, 1.0, latency_s=None)  # nothing to protect: grows
    assert ctl.window_bytes(t) > 4 * MiB
    t = run_interval(ctl, t, latency_s=BASE_S)
    assert ctl.window_bytes(t) == 4 * MiB
    assert ctl.statistics().baseline_p99_s is None


def test_writes_right_after_stop_do_not_pollute_baseline() -> None:
    ctl = learned()
    t = run_interval(ctl, 1.0, latency_s=BASE_S)
    ctl.on_in_flight(4 * MiB, t)
    ctl.stop()
    assert ctl.window_bytes(t) == 0
    ctl.on_app_write(5.0, t + 0.01)  # still queued behind resync bytes
    assert ctl.statistics().baseline_p99_s == pytest.approx(BASE_S)
    for i in range(50):
        ctl.on_app_write(2 * BASE_S, t + 2 + i * 0.001)
    assert ctl.statistics().baseline_p99_s == pytest.approx(2 * BASE_S)


def test_start_resets_window_and_deadline() -> None:
    ctl = learned()
    assert ctl.next_deadline_s() == pytest.approx(1.1)
    t = run_interval(ctl, 1.0, latency_s=BASE_S)
    ctl.stop()
    assert ctl.next_deadline_s() is None
    ctl.start(t + 5)
    assert ctl.window_bytes(t + 5) == 4 * MiB


def test_time_going_backwards_is_refused() -> None:
    ctl = learned()
    with pytest.raises(ValueError, match="backwards"):
        ctl.window_bytes(0.5)


# ------------------------------------------------------------------ closed loop


@dataclass
class LinkSim:
    """A link of ``capacity_bytes_s`` with a FIFO queue and ``rtt_s`` until the ack.

    Resync bytes wait in the queue; an app write issued now waits behind them, so its
    latency is base (with up to 5 % jitter) + queued bytes / capacity.
    """

    ctl: RateController
    capacity_bytes_s: int = 100 * MiB
    rtt_s: float = 0.010
    region_bytes: int = 64 * KiB
    dt_s: float = 0.001
    now_s: float = 0.0
    queued_bytes: int = 0
    in_flight_bytes: int = 0
    acked_bytes: int = 0
    app_latencies_s: list[float] = field(default_factory=list)
    pipe: deque[tuple[float, int]] = field(default_factory=deque)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def app_write(self, resync: bool) -> None:
        queue_s = self.queued_bytes / self.capacity_bytes_s if resync else 0.0
        latency_s = BASE_S * (1 + 0.05 * self.rng.random()) + queue_s
        self.app_latencies_s.append(latency_s)
        self.ctl.on_app_write(latency_s, self.now_s)

    def step(self) -> None:
        self.now_s += self.dt_s
        ctl, region = self.ctl, self.region_bytes
        while self.in_flight_bytes + region <= ctl.window_bytes(self.now_s):
            if ctl.admit(region, self.now_s) > 0:
                break
            self.queued_bytes += region
            self.in_flight_bytes += region
            ctl.on_in_flight(self.in_flight_bytes, self.now_s)
        sent = min(self.queued_bytes, int(self.capacity_bytes_s * self.dt_s))
        self.queued_bytes -= sent
        self.pipe.append((self.now_s + self.rtt_s, sent))
        while self.pipe and self.pipe[0][0] <= self.now_s + 1e-9:
            nbytes = self.pipe.popleft()[1]
            self.in_flight_bytes -= nbytes
            self.acked_bytes += nbytes
            ctl.on_resync_acked(nbytes, self.now_s)
            ctl.on_in_flight(self.in_flight_bytes, self.now_s)
        self.app_write(resync=True)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / self.dt_s)):
            self.step()


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def simulate(config: RateConfig) -> tuple[float, float, LinkSim]:
    """Idle second (baseline), resync with 2 s warm-up, 8 s measured.
    Returns (throughput / capacity, app p99 / base) over the measured span."""
    sim = LinkSim(RateController(config))
    for _ in range(1000):
        sim.now_s += sim.dt_s
        sim.app_write(resync=False)
    sim.ctl.start(sim.now_s)
    sim.run(2.0)
    sim.app_latencies_s.clear()
    acked_before = sim.acked_bytes
    sim.run(8.0)
    throughput = (sim.acked_bytes - acked_before) / 8.0
    return throughput / sim.capacity_bytes_s, p99(sim.app_latencies_s) / BASE_S, sim


def test_closed_loop_fills_link_and_keeps_app_latency() -> None:
    utilisation, latency_ratio, sim = simulate(RateConfig())
    stats = sim.ctl.statistics()
    assert utilisation >= 0.8, stats
    assert latency_ratio <= 2.0, stats
    assert stats.decreases > 0
    assert stats.throughput_ewma_bytes_s >= 0.8 * sim.capacity_bytes_s


def test_closed_loop_without_decrease_breaks_latency_bound() -> None:
    utilisation, latency_ratio, sim = simulate(RateConfig(latency_factor=1e9))
    assert utilisation >= 0.8
    assert latency_ratio > 2.0
    assert sim.ctl.statistics().window_bytes == 64 * MiB


# ------------------------------------------------------------------ hard cap


@pytest.mark.parametrize("cap_bytes_s", [1 * MiB, 10 * MiB, 50 * MiB])
def test_hard_cap_bounds_sent_bytes(cap_bytes_s: int) -> None:
    config = RateConfig(max_rate_bytes_s=cap_bytes_s)
    sim = LinkSim(RateController(config))  # 100 MiB/s link: the window allows more
    sim.ctl.start(0.0)
    sim.run(10.0)
    sent = sim.acked_bytes + sim.in_flight_bytes
    assert sent <= cap_bytes_s * 10 + config.burst_bytes
    assert sent >= 0.9 * cap_bytes_s * 10


def test_admit_returns_exact_wait_and_charges_only_when_admitted() -> None:
    ctl = RateController(RateConfig(max_rate_bytes_s=1 * MiB))  # burst 0.1 MiB
    region = 64 * KiB
    assert ctl.admit(region, 0.0) == 0.0
    wait_s = ctl.admit(region, 0.0)
    assert wait_s == pytest.approx((2 * region - 0.1 * MiB) / MiB)
    assert ctl.admit(region, 0.0) == pytest.approx(wait_s)  # asking again charges nothing
    assert ctl.admit(region, wait_s) == 0.0
    assert RateController().admit(10 * MiB, 0.0) == 0.0


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"interval_s": 0}, "interval_s"),
        ({"interval_s": math.nan}, "interval_s"),
        ({"latency_factor": 1.0}, "latency_factor"),
        ({"latency_factor": math.inf}, "latency_factor"),
        ({"min_latency_s": -1e-6}, "min_latency_s"),
        ({"region_bytes": 0}, "region_bytes"),
        ({"min_window_bytes": 1024}, "min_window_bytes"),
        ({"max_window_bytes": 128 * KiB}, "max_window_bytes"),
        ({"initial_window_bytes": 128 * MiB}, "initial_window_bytes"),
        ({"max_rate_bytes_s": 0}, "max_rate_bytes_s"),
    ],
)
def test_bad_config_names_field(changes: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=rf"RateConfig\.{name}="):
        RateConfig(**changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------ property

OPS = st.one_of(
    st.tuples(st.just("write"), st.floats(0, 10, allow_nan=False)),
    st.tuples(st.just("ack"), st.integers(0, 256 * MiB)),
    st.tuples(st.just("in_flight"), st.integers(0, 256 * MiB)),
    st.tuples(st.just("window"), st.just(0)),
    st.tuples(st.just("start"), st.just(0)),
    st.tuples(st.just("stop"), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(
    min_regions=st.integers(1, 64),
    span_regions=st.integers(0, 1024),
    steps=st.lists(st.tuples(OPS, st.floats(0, 0.3, allow_nan=False)), max_size=300),
)
def test_window_stays_in_bounds(
    min_regions: int, span_regions: int, steps: list[tuple[tuple[str, float], float]]
) -> None:
    region = 64 * KiB
    lo, hi = min_regions * region, (min_regions + span_regions) * region
    ctl = RateController(
        RateConfig(min_window_bytes=lo, max_window_bytes=hi, initial_window_bytes=lo)
    )
    now_s = 0.0
    for (kind, value), dt_s in steps:
        now_s += dt_s
        if kind == "write":
            ctl.on_app_write(value, now_s)
        elif kind == "ack":
            ctl.on_resync_acked(int(value), now_s)
        elif kind == "in_flight":
            ctl.on_in_flight(int(value), now_s)
        elif kind == "start":
            ctl.start(now_s)
        elif kind == "stop":
            ctl.stop()
        window = ctl.window_bytes(now_s)
        assert window == 0 if not ctl.active else lo <= window <= hi
        assert lo <= ctl.statistics().window_bytes <= hi
