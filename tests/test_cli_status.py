"""Text rendering of `geoclus volume status` (progress bar, decision, lineage)."""

from __future__ import annotations

from geoclus.cli import _fmt_status, _progress_bar


def base_status(**over) -> dict:
    s = {
        "volume": "db",
        "node": "site-a",
        "role": "primary",
        "mode": "async",
        "generation": "0x0",
        "connected": True,
        "peer": "10.0.0.2:7790",
        "last_error": None,
        "consistency": "consistent",
        "in_flight_writes": 0,
        "lag_bytes": 0,
        "lag_writes": 0,
        "lag_seconds": 0.0,
        "max_lag_bytes_seen": 0,
        "dirty_bytes": 0,
        "writes": 0,
        "bytes_written": 0,
        "write_latency_p50_ms": None,
        "write_latency_p99_ms": None,
        "last_seq": 0,
        "peer_applied_seq": 0,
        "peer_durable_seq": 0,
        "rtt_p50_ms": 0.5,
    }
    s.update(over)
    return s


def test_progress_bar_shows_fraction_sizes_rate_and_eta() -> None:
    bar = _progress_bar(
        {
            "resync_total_bytes": 4 << 20,
            "resync_done_bytes": 1 << 20,
            "resync_rate_bytes_per_s": 512 * 1024,
            "resync_eta_s": 6.0,
            "resync_full": False,
        },
        width=20,
    )
    assert bar.startswith("[#####...............]")  # 25 % of 20 cells
    assert " 25.0% delta" in bar
    assert "1.0 MiB / 4.0 MiB" in bar and "512.0 KiB/s" in bar and "6 s left" in bar


def test_status_text_shows_resync_decision_and_lineage() -> None:
    text = _fmt_status(
        base_status(
            resync_active=True,
            resync_total_bytes=100,
            resync_done_bytes=100,
            resync_rate_bytes_per_s=None,
            resync_eta_s=None,
            resync_full=True,
            last_decision={"action": "resync", "reason": "the peer copy is an older state"},
            lineage={
                "current": "0x2a",
                "cause": "diverge",
                "history": ["0x0"],
                "inconsistent": False,
                "discard": True,
            },
        )
    )
    assert "resync:         [" in text and "100.0% full" in text
    assert "last decision:  resync: the peer copy is an older state" in text
    assert "lineage:        0x2a (diverge), 1 before it; DISCARD" in text


def test_status_text_without_resync_has_no_bar() -> None:
    text = _fmt_status(base_status())
    assert "resync:" not in text and "connected to 10.0.0.2:7790" in text
