"""Log reset (compaction) in the node core: the log is a snapshot plus the
entries after it. Run on the simulator's clock and network with no faults
but the ones each test makes; the simulator's checker runs after every step
(one history, snapshots equal to the history, nothing committed twice)."""

from __future__ import annotations

import pytest

from geoclus.cluster.messages import NO_SNAPSHOT, Append, Entry, NewView, Snapshot
from geoclus.cluster.node import ClusterSpec, Disk, NodeCore, Persist
from geoclus.cluster.sim import SimSettings, Simulation
from quorum.votes import QuorumKind


def _sim(compact: int = 3) -> Simulation:
    s = SimSettings(
        nodes=3,
        kind=QuorumKind.MAJORITY,
        drop_p=0.0,
        dup_p=0.0,
        slow_p=0.0,
        log_compact_entries=compact,
        checkpoint_p=0.0,
    )
    return Simulation(3, s)


def _run_until(sim: Simulation, t: float) -> None:
    sim.run_until(t)


def _locker(sim: Simulation) -> NodeCore:
    core = next(c for c in sim.cores.values() if c is not None and c.is_locker)
    return core


def _submit(sim: Simulation, n: int, uid: str) -> None:
    core = sim.cores[n]
    assert core is not None
    sim._run_actions(n, core.submit(uid, {"set": uid}, sim.now))


def test_the_log_resets_every_compact_entries_and_keeps_one_history() -> None:
    sim = _sim(compact=3)
    _run_until(sim, 15)
    for i in range(10):
        _submit(sim, i % 3, f"u{i}")
        _run_until(sim, sim.now + 0.5)
    for n in range(3):
        core = sim.cores[n]
        assert core is not None
        assert core.disk.commit == 10
        assert core.disk.base.index == 9  # reset at 3, 6, 9
        assert [e.index for e in core.disk.log] == [10]
        assert sim.applied_uids(n) == [f"u{i}" for i in range(10)]


def test_a_member_behind_the_snapshot_catches_up_from_it() -> None:
    """Node 2 misses the locker's Appends while the locker resets its log
    past node 2's end: the locker must send the snapshot, not the entries."""
    sim = _sim(compact=3)
    _run_until(sim, 15)
    locker = _locker(sim)
    member = next(n for n in range(3) if n != locker.id)
    sim.cut.add((locker.id, member))  # Appends and Pings to it are lost; it still answers
    for i in range(8):
        _submit(sim, locker.id, f"u{i}")
        _run_until(sim, sim.now + 0.2)
    lagging = sim.cores[member]
    assert lagging is not None
    assert lagging.disk.length == 0 and locker.disk.base.index >= 6
    view = locker.view
    sim.cut.clear()
    _submit(sim, locker.id, "u8")  # its Append shows the gap; the answer brings the snapshot
    _run_until(sim, sim.now + 2)
    assert lagging.view == locker.view == view  # no regroup was needed
    assert lagging.disk.base.index >= 6
    assert lagging.disk.commit == 9
    assert sim.applied_uids(member) == [f"u{i}" for i in range(9)]
    assert sim.snapshots_adopted >= 1


def test_a_restarted_node_rejoins_with_the_snapshot_plus_the_tail() -> None:
    sim = _sim(compact=3)
    _run_until(sim, 15)
    locker = _locker(sim)
    gone = next(n for n in range(3) if n != locker.id)
    sim.cores[gone] = None
    sim.incarnation[gone] += 1
    for i in range(7):
        _submit(sim, locker.id, f"u{i}")
        _run_until(sim, sim.now + 0.3)
    sim._restart(gone)
    _run_until(sim, sim.now + 20)
    back = sim.cores[gone]
    assert back is not None and back.installed and back.view == _locker(sim).view
    assert sim.applied_uids(gone) == [f"u{i}" for i in range(7)]
    assert back.disk.base.index == 6


def test_a_resubmission_after_its_entry_was_compacted_is_not_applied_twice() -> None:
    sim = _sim(compact=3)
    _run_until(sim, 15)
    locker = _locker(sim)
    for i in range(4):
        _submit(sim, locker.id, f"u{i}")
        _run_until(sim, sim.now + 0.5)
    assert locker.disk.base.index == 3 and "u0" in locker.disk.base.uids
    _submit(sim, locker.id, "u0")  # e.g. a duplicated Submit arriving late
    _run_until(sim, sim.now + 1)
    assert locker.disk.length == 4
    assert sim.applied_uids(locker.id) == ["u0", "u1", "u2", "u3"]


def _lone_core(commit: int = 5, length: int = 5) -> NodeCore:
    spec = ClusterSpec(nodes=(0, 1, 2), sites={0: "A", 1: "A", 2: "B"}, kind=QuorumKind.MAJORITY)
    log = [Entry((1, 0), i, f"u{i}", None) for i in range(1, length + 1)]
    return NodeCore(0, spec, Disk(promised=(1, 0), normal_view=(1, 0), log=log, commit=commit), 0.0)


def test_compact_folds_only_committed_entries() -> None:
    core = _lone_core(commit=3, length=5)
    with pytest.raises(ValueError, match="only 3 entries are committed"):
        core.compact(4, {"state": 4})
    assert core.disk.base == NO_SNAPSHOT and len(core.disk.log) == 5  # nothing changed
    assert core.compact(3, {"state": 3}) == [Persist()]
    assert core.disk.base == Snapshot(3, {"state": 3}, ("u1", "u2", "u3"))
    assert [e.index for e in core.disk.log] == [4, 5]
    assert [e.index for e in core.committed()] == []
    assert core.compact(2, {"state": 2}) == []  # older than the snapshot: a no-op
    assert core.disk.length == 5


def test_compacted_update_ids_are_bounded() -> None:
    core = _lone_core(commit=5, length=5)
    core.spec = ClusterSpec(
        nodes=core.spec.nodes, sites=core.spec.sites, kind=core.spec.kind, dedupe_uids=2
    )
    core.compact(5, "s")
    assert core.disk.base.uids == ("u4", "u5")


def test_a_log_with_a_gap_is_refused() -> None:
    """A NewView or Append whose entries do not follow its snapshot (or the
    member's log) is dropped: the member's log is unchanged."""
    core = NodeCore(1, _lone_core().spec, Disk(promised=(2, 0)), 0.0)
    gap = (Entry((2, 0), 5, "u5", None),)
    out = core.on_message(
        0, NewView((2, 0), frozenset({0, 1}), gap, 5, 0.0, False, Snapshot(3, "s")), 0.0
    )
    assert not core.installed and core.disk.length == 0
    assert not any(isinstance(a, Persist) for a in out)
    ok = (Entry((2, 0), 4, "u4", None),)
    core.on_message(0, NewView((2, 0), frozenset({0, 1}), ok, 4, 0.0, False, Snapshot(3, "s")), 0.0)
    assert core.installed and core.disk.length == 4 and core.disk.commit == 4
    core.on_message(0, Append((2, 0), 4, (Entry((2, 0), 6, "u6", None),), 4), 0.0)
    assert core.disk.length == 4  # 5 is missing
    core.on_message(0, Append((2, 0), 9, (Entry((2, 0), 8, "u8", None),), 4, Snapshot(9, "t")), 0.0)
    assert core.disk.length == 4  # entries do not follow the snapshot
    core.on_message(
        0, Append((2, 0), 9, (Entry((2, 0), 10, "u10", None),), 4, Snapshot(9, "t")), 0.0
    )
    assert core.disk.length == 10 and core.disk.base.index == 9 and core.disk.commit == 9


def _state(version: int) -> dict:
    return {"cluster": "lab", "version": version, "values": {}, "evicted": [], "paused": []}


@pytest.mark.parametrize(
    ("base", "problem"),
    [
        (Snapshot(3, "garbage"), "not a configuration state"),
        (Snapshot(3, {**_state(3), "cluster": "other"}), "cluster 'other'"),
        (Snapshot(3, _state(2)), "at index 3 but holds version 2"),
    ],
)
def test_a_message_with_a_bad_snapshot_never_reaches_the_core(base: Snapshot, problem: str) -> None:
    from geoclus.cluster.daemon import check_snapshot

    msg = NewView((2, 0), frozenset({0, 1}), (), 3, 0.0, False, base)
    assert problem in check_snapshot(msg, "lab")
    assert check_snapshot(Append((2, 0), 3, (), 3, base), "lab")
    good = NewView((2, 0), frozenset({0, 1}), (), 3, 0.0, False, Snapshot(3, _state(3)))
    assert check_snapshot(good, "lab") == ""
    assert check_snapshot(Append((2, 0), 3, (), 3), "lab") == ""


def test_a_snapshot_whose_voters_disagree_with_its_database_is_refused() -> None:
    """The core counts votes over the snapshot's ``removed``; the shell
    checks it names exactly the nodes the snapshot's database evicted."""
    from geoclus.cluster.daemon import check_snapshot

    ids = {"a1": 0, "a2": 1, "b1": 2}
    evicted = {**_state(3), "evicted": ["a2"]}
    good = Snapshot(3, evicted, (), frozenset({1}))
    assert check_snapshot(Append((2, 0), 3, (), 3, good), "lab", ids) == ""
    for removed in (frozenset(), frozenset({1, 2}), frozenset({2})):
        bad = Snapshot(3, evicted, (), removed)
        problem = check_snapshot(Append((2, 0), 3, (), 3, bad), "lab", ids)
        assert "removes node(s)" in problem and "evicted ['a2']" in problem
