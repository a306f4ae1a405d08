"""Deterministic simulation of the cluster cores (geoclus/cluster/sim.py):
heartbeats, regroup, global updates and quorum on a simulated clock and a
simulated network that delays, drops, duplicates, reorders and partitions
(symmetric and one-way), with node and witness crashes, all from one seed.
After every step the checker asserts: never two acting views; a node cut off
from quorum stops within the bound; committed updates are one history, never
lost; members of a view agree on it. After healing, one view, everyone acting.

``pytest tests/test_cluster_sim.py --sim-seed N`` replays one seed (with its
event trace on failure); ``--sim-seeds N`` runs more; ``make sim`` runs many.

The last tests break one rule of the protocol on purpose each and show that
the checker catches it within a few seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import quorum.votes
from geoclus.cluster import node as node_mod
from geoclus.cluster.sim import SafetyViolation, SimSettings, Simulation, settings_for_seed
from quorum.votes import QuorumKind

KINDS = [QuorumKind.MAJORITY, QuorumKind.MAJORITY_WITNESS, QuorumKind.DISK]


def _seeds(config: pytest.Config) -> list[int]:
    one = config.getoption("--sim-seed")
    if one is not None:
        return [one]
    return list(range(config.getoption("--sim-seeds") or 120))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_seeded_cluster_simulation_keeps_every_safety_property(
    kind: QuorumKind, pytestconfig: pytest.Config
) -> None:
    seeds = _seeds(pytestconfig)
    committed = regroups = 0
    for seed in seeds:
        sim = Simulation(seed, settings_for_seed(seed, kind), trace=len(seeds) == 1)
        try:
            result = sim.run()
        except SafetyViolation:
            if sim.trace is not None:
                print("\n".join(sim.trace[-200:]))
            raise
        committed += result.committed
        regroups += result.regroups
    # the runs did real work: updates committed, regroups happened under faults
    assert committed > 20 * len(seeds)
    assert regroups > len(seeds)


def test_the_same_seed_replays_the_same_run() -> None:
    a = Simulation(7, settings_for_seed(7, QuorumKind.MAJORITY_WITNESS)).run()
    b = Simulation(7, settings_for_seed(7, QuorumKind.MAJORITY_WITNESS)).run()
    assert a == b
    assert a.faults  # faults were injected


def test_settings_vary_with_the_seed() -> None:
    sizes = {settings_for_seed(s, QuorumKind.MAJORITY).nodes for s in range(8)}
    assert sizes == {2, 3, 4, 5}


def _first_violation(kind: QuorumKind, max_seeds: int, **overrides: Any) -> tuple[int, str] | None:
    for seed in range(max_seeds):
        try:
            Simulation(seed, settings_for_seed(seed, kind, **overrides)).run()
        except SafetyViolation as exc:
            return seed, str(exc)
    return None


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    yield monkeypatch


def test_checker_catches_quorum_at_exactly_half(broken: pytest.MonkeyPatch) -> None:
    broken.setattr(quorum.votes, "needed_votes", lambda total: max(1, total // 2))
    found = _first_violation(QuorumKind.MAJORITY, 30)
    assert found is not None, "quorum at half was not caught in 30 seeds"
    assert "two views act at once" in found[1] or "lost committed update" in found[1]


def test_checker_catches_a_missing_release_fence(broken: pytest.MonkeyPatch) -> None:
    """An acceptor that forgets it answered pings in its old view lets a new
    view act while the old one still counts its vote."""
    prepare = node_mod.NodeCore._on_prepare

    def forgetful(self, src, msg, now, out):  # type: ignore[no-untyped-def]
        self._last_pong_sent_in_view = -1e18
        return prepare(self, src, msg, now, out)

    broken.setattr(node_mod.NodeCore, "_on_prepare", forgetful)
    found = _first_violation(QuorumKind.MAJORITY, 60)
    assert found is not None, "a missing release fence was not caught in 60 seeds"
    assert "two views act at once" in found[1] or "lost committed update" in found[1]


def test_checker_catches_a_view_change_that_picks_the_wrong_log(
    broken: pytest.MonkeyPatch,
) -> None:
    broken.setattr(node_mod.NodeCore, "_best", lambda self, vc: next(iter(vc.promises.values())))
    found = _first_violation(QuorumKind.MAJORITY, 30)
    assert found is not None, "a wrong log choice was not caught in 30 seeds"
    assert "committed update" in found[1] or "committed" in found[1]


def test_checker_catches_votes_that_never_expire(broken: pytest.MonkeyPatch) -> None:
    broken.setattr(node_mod.ClusterSpec, "lease_s", lambda self, a, b: 1e9)
    found = _first_violation(QuorumKind.MAJORITY, 30)
    assert found is not None, "eternal votes were not caught in 30 seeds"


def test_default_settings_are_the_seeds_timers() -> None:
    t = SimSettings().timers
    assert t.heartbeat_interval_s == 1.2 and t.regroup_answer_timeout_s == 4.0


@pytest.mark.parametrize("seed", [1214, 1378])
def test_regression_seeds_from_long_runs(seed: int) -> None:
    """Seeds a long `make sim` run found: a coordinator of one node in a
    four-node cluster installed a view with the witness's grant although one
    node and the witness are 2 of 5 votes; that view then lacked committed
    updates. It must now refuse to form the view."""
    settings = settings_for_seed(seed, QuorumKind.MAJORITY_WITNESS, duration_s=240.0, settle_s=90.0)
    result = Simulation(seed, settings).run()  # raises SafetyViolation on a broken property
    assert result.committed > 0 and result.regroups > 0


def test_checker_catches_a_dropped_start_fence(broken: pytest.MonkeyPatch) -> None:
    """When every old member promised, the new view skips the release wait but
    must keep the old view's own start fence (older views may still act): an
    acceptor that reports no fence is caught (seed 8 found it first)."""
    prepare = node_mod.NodeCore._on_prepare

    def no_fence(self, src, msg, now, out):  # type: ignore[no-untyped-def]
        self._fence_until = -1e18
        return prepare(self, src, msg, now, out)

    broken.setattr(node_mod.NodeCore, "_on_prepare", no_fence)
    found = _first_violation(QuorumKind.MAJORITY, 30)
    assert found is not None, "a dropped start fence was not caught in 30 seeds"
    assert "two views act at once" in found[1]


def test_checker_catches_a_coordinator_that_ignores_the_quorum_log(
    broken: pytest.MonkeyPatch,
) -> None:
    """With the ``disk`` quorum an update is committed once the locker wrote
    it to the quorum disk, so a new coordinator must take the log it finds
    there: one that reads an empty log instead loses committed updates."""
    read = node_mod.NodeCore.on_log_read

    def blind(self, image, now):  # type: ignore[no-untyped-def]
        empty = None if image is None else node_mod.LogImage(node_mod.NO_VIEW, ())
        return read(self, empty, now)

    broken.setattr(node_mod.NodeCore, "on_log_read", blind)
    found = _first_violation(QuorumKind.DISK, 60)
    assert found is not None, "an ignored quorum log was not caught in 60 seeds"
    assert "committed" in found[1]


def test_checker_catches_members_that_outlive_the_disk_owner(
    broken: pytest.MonkeyPatch,
) -> None:
    """Members count the quorum disk only as long as their locker holds it;
    members that count it 30 s longer keep acting after their side lost the
    disk, and the checker sees it (two views, or a node past the stop bound)."""
    until = node_mod.NodeCore._tiebreak_until

    def sticky(self, now):  # type: ignore[no-untyped-def]
        return until(self, now) + (0.0 if self.is_locker else 30.0)

    broken.setattr(node_mod.NodeCore, "_tiebreak_until", sticky)
    found = _first_violation(QuorumKind.DISK, 120)
    assert found is not None, "members outliving the disk owner were not caught in 120 seeds"
    assert "two views act at once" in found[1] or "after losing every path" in found[1]


# --- log compaction (snapshot on log reset) ------------------------------------------
# These break tests run without evictions (NO_EVICTIONS): they target the
# snapshot rules, and their seeds were found before evictions were simulated.
NO_EVICTIONS = {"evict_p": 0.0}


def test_checker_catches_a_log_choice_that_ignores_the_snapshot(
    broken: pytest.MonkeyPatch,
) -> None:
    """A log is its snapshot plus the entries after it: a coordinator that
    compares promisers by the entries alone (the rule from before compaction)
    picks a log with more entries over a longer one with a bigger snapshot,
    and loses committed updates. The checker sees the lost update."""
    broken.setattr(
        node_mod.NodeCore,
        "_best",
        lambda self, vc: max(vc.promises.values(), key=lambda p: (p.normal_view, len(p.log))),
    )
    found = _first_violation(QuorumKind.MAJORITY_WITNESS, 60, **NO_EVICTIONS)
    assert found is not None, "a log choice blind to snapshots was not caught in 60 seeds"
    assert "committed" in found[1]


def test_checker_catches_a_snapshot_that_forgets_its_update_ids(
    broken: pytest.MonkeyPatch,
) -> None:
    """A resubmitted (duplicated) update whose entry was already compacted
    must still be recognised; a snapshot without the compacted ids lets the
    locker commit it a second time, and the checker sees the double commit."""
    compact = node_mod.NodeCore.compact

    def forgetful(self, index, state):  # type: ignore[no-untyped-def]
        out = compact(self, index, state)
        base = self.disk.base
        self.disk.base = node_mod.Snapshot(base.index, base.state, (), base.removed)
        return out

    broken.setattr(node_mod.NodeCore, "compact", forgetful)
    found = _first_violation(QuorumKind.MAJORITY, 60, **NO_EVICTIONS)
    assert found is not None, "forgotten update ids were not caught in 60 seeds"
    assert "committed twice" in found[1]


def test_checker_catches_a_locker_that_never_sends_its_snapshot(
    broken: pytest.MonkeyPatch,
) -> None:
    """A member behind the locker's snapshot can only catch up from the
    snapshot; a locker that resends only the entries after it leaves the
    member stuck, and after healing the nodes' states differ."""
    acked = node_mod.NodeCore._on_acked

    def tail_only(self, src, view, length, now, out):  # type: ignore[no-untyped-def]
        if self.is_locker and view == self.view and length < self.disk.base.index:
            length = self.disk.base.index  # as if it had the snapshot
        return acked(self, src, view, length, now, out)

    broken.setattr(node_mod.NodeCore, "_on_acked", tail_only)
    found = _first_violation(QuorumKind.MAJORITY, 60, **NO_EVICTIONS)
    assert found is not None, "a locker that never sends its snapshot was not caught in 60 seeds"
    assert "applied states differ" in found[1]


def test_every_kind_resets_the_log_and_members_catch_up_from_snapshots() -> None:
    """The runs above really exercise compaction: logs are reset, and nodes
    (joiners, restarted or lagging members) catch up from a snapshot."""
    for kind in KINDS:
        resets = adopted = 0
        for seed in range(12):
            r = Simulation(seed, settings_for_seed(seed, kind)).run()
            resets += r.snapshots
            adopted += r.adopted
        assert resets > 100, (kind, resets)
        assert adopted > 5, (kind, adopted)


def test_every_kind_evicts_nodes_live_dead_and_lockers() -> None:
    """The runs above really exercise voter changes: evictions commit in
    every kind, and some evicted nodes learn it and stop."""
    for kind in KINDS:
        evicted = stopped = 0
        for seed in range(12):
            sim = Simulation(seed, settings_for_seed(seed, kind))
            r = sim.run()
            evicted += len(r.evicted)
            stopped += sum(1 for c in sim.cores.values() if c is not None and c.evicted)
        assert evicted > 5, (kind, evicted)
        assert stopped > 2, (kind, stopped)
