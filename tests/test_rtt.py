"""quorum/rtt.py: the 500 us round-trip budget over a sliding window."""

from __future__ import annotations

import pytest

from quorum.rtt import RttWindow, percentile, verdict


def test_percentiles_are_nearest_rank() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_one_slow_sample_is_not_a_breach_a_sustained_one_is() -> None:
    w = RttWindow(budget_us=500, window_s=5, sustained_s=3)
    t = 0.0
    for _ in range(50):
        assert w.add(200, t) is None
        t += 0.1
    assert w.add(5000, t) is None  # one spike: the p99 of 51 samples, but alone
    for _ in range(60):  # longer than sustained_s with the spike in the window
        t += 0.1
        assert w.add(200, t) is None
    assert not w.breached
    events = []
    for _ in range(80):  # the link gets slow for good
        t += 0.1
        e = w.add(900, t)
        if e:
            events.append((e, round(t, 1)))
    assert events and events[0][0] == "breach"
    assert len(events) == 1  # reported once, not every sample
    s = w.stats()
    assert s.p50_us == 900 and s.max_us >= 900
    for _ in range(100):  # recovers once the slow samples leave the window
        t += 0.1
        e = w.add(150, t)
        if e:
            events.append((e, round(t, 1)))
    assert [e for e, _ in events] == ["breach", "recovered"]


def test_window_is_bounded() -> None:
    w = RttWindow(max_samples=10)
    for i in range(100):
        w.add(100.0 + i, float(i) * 0.01)
    assert w.stats().samples == 10


def test_verdict_lines() -> None:
    good = verdict("site-b", [100.0, 120.0, 130.0], lost=0, budget_us=500)
    assert good.ok and good.line().startswith("PASS site-b: p50 120 us")
    slow = verdict("site-c", [900.0, 1000.0], lost=1, budget_us=500)
    assert (
        not slow.ok and "2.0x the 500 us budget" in slow.line() and "1 probes lost" in slow.line()
    )
    dead = verdict("site-d", [], lost=20, budget_us=500)
    assert not dead.ok and "no answer to 20 probes" in dead.line()
