"""One crash trial of the campaign (bench/crash.py) inside `make test`: SQLite
on ext4 on the replicated volume, the primary killed, the secondary promoted
and checked. The full campaign (50 trials per mode) is `make crash`."""

from __future__ import annotations

import pytest

from geoclus.testing.dbcrash import missing_requirements, transfers, trial

pytestmark = [pytest.mark.process, pytest.mark.interop]


async def test_one_sync_trial_loses_nothing_and_checks_clean() -> None:
    why = missing_requirements()
    if why is not None:
        pytest.skip(why)
    t = await trial("sync", 7)
    assert t.problems == [] and t.clean
    assert t.acked > 0 and t.found >= t.acked  # every acknowledged transaction is there
    assert t.how in ("kill", "cut+kill")


def test_balances_follow_the_driver_and_keep_the_total() -> None:
    """The checker's model of the workload: same generator, invariant total."""
    bal = transfers(3, 500)
    assert sum(bal) == 100 * 1000
    assert bal != transfers(3, 499)  # every transfer moves money
