"""Crash trials of the campaign (bench/crash.py) inside `make test`: SQLite, and
a PostgreSQL server, on ext4 on the replicated volume, the primary killed, the
secondary promoted and checked. The full campaign (50 trials per database and
mode) is `make crash`."""

from __future__ import annotations

import os
import tempfile

import pytest

from geoclus.testing.dbcrash import missing_requirements, transfers, trial

pytestmark = [pytest.mark.process, pytest.mark.interop]


def _left_over() -> list[str]:
    """Mounts, loop devices and work directories a trial may have left."""
    with open("/proc/mounts") as f:
        mounts = [ln for ln in f if "geoclus-crash-" in ln]
    loops = []
    for dev in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{dev}/loop/backing_file") as f:
                if "geoclus-crash-" in f.read():
                    loops.append(dev)
        except OSError:
            pass
    dirs = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("geoclus-crash-")]
    return mounts + loops + dirs


async def test_one_sync_trial_loses_nothing_and_checks_clean() -> None:
    why = missing_requirements()
    if why is not None:
        pytest.skip(why)
    t = await trial("sync", 7)
    assert t.problems == [] and t.clean
    assert t.acked > 0 and t.found >= t.acked  # every acknowledged transaction is there
    assert t.how in ("kill", "cut+kill")


async def test_one_postgresql_sync_trial_loses_nothing_and_checks_clean() -> None:
    """PostgreSQL with its data directory on the volume: after the kill and the
    promotion, crash recovery on the copy, pg_amcheck clean, the log a prefix
    covering every acknowledged transaction; nothing left running or mounted."""
    why = missing_requirements("postgresql")
    if why is not None:
        pytest.skip(why)
    before = _left_over()
    t = await trial("sync", 3, database="postgresql")
    assert t.database == "postgresql"
    assert t.problems == [] and t.clean
    assert t.acked > 0 and t.found >= t.acked  # every acknowledged transaction is there
    assert t.found <= t.acked + 1  # at most the one in flight at the kill
    assert t.how in ("kill", "cut+kill")
    assert _left_over() == before


def test_balances_follow_the_driver_and_keep_the_total() -> None:
    """The checker's model of the workload: same generator, invariant total."""
    bal = transfers(3, 500)
    assert sum(bal) == 100 * 1000
    assert bal != transfers(3, 499)  # every transfer moves money
