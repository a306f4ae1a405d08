"""Shared pytest options: ``--sim-seed N`` replays one cluster simulation seed,
``--sim-seeds N`` sets how many seeds the seeded cluster simulation runs."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("geoclus simulation")
    group.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="run the cluster simulation with only this seed (reproduce a failure)",
    )
    group.addoption(
        "--sim-seeds",
        type=int,
        default=None,
        help="how many seeds per quorum kind the cluster simulation runs (default 120)",
    )
