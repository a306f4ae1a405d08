"""Evict changes the vote total: the voter set lives in the log, one
eviction takes effect at a time, and a view counts the voter set of the log
it chose. Run on the simulator's clock and network with only the faults each
test makes; the simulator's checker runs after every step (one acting view,
one history, members of a view within its voters)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from geoclus.cluster.node import Event, NodeCore
from geoclus.cluster.sim import SafetyViolation, SimSettings, Simulation
from quorum.votes import QuorumKind


def _sim(nodes: int, kind: QuorumKind = QuorumKind.MAJORITY, **fixed: Any) -> Simulation:
    s = SimSettings(
        nodes=nodes,
        kind=kind,
        **fixed,
        drop_p=0.0,
        dup_p=0.0,
        slow_p=0.0,
        checkpoint_p=0.0,
        evict_p=0.0,
        log_compact_entries=1000,
    )
    return Simulation(7, s, trace=True)


def _run_until(sim: Simulation, t: float) -> None:
    sim.run_until(t)


def _core(sim: Simulation, n: int) -> NodeCore:
    core = sim.cores[n]
    assert core is not None
    return core


def _locker(sim: Simulation) -> NodeCore:
    return next(c for c in sim.cores.values() if c is not None and c.is_locker and not c.evicted)


def _submit(sim: Simulation, n: int, uid: str, payload: dict) -> None:
    sim.payloads[uid] = payload
    sim._run_actions(n, _core(sim, n).submit(uid, payload, sim.now))


def _crash(sim: Simulation, n: int) -> None:
    sim.cores[n] = None
    sim.incarnation[n] += 1


def _partition(sim: Simulation, side: set[int]) -> None:
    for a in sim.spec.nodes:
        for b in sim.spec.nodes:
            if (a in side) != (b in side):
                sim.cut.add((a, b))


def _acting(sim: Simulation) -> list[int]:
    return sorted(n for n, c in sim.cores.items() if c is not None and c.acting(sim.now))


def test_evicting_a_dead_node_shrinks_the_vote_total() -> None:
    """Four nodes need three votes. With one dead and evicted, the three
    left need two: one more failure no longer stops the cluster (with the
    dead node still counted, two of four would have no quorum)."""
    sim = _sim(4)
    _run_until(sim, 20)
    locker = _locker(sim)
    dead, other = [n for n in range(4) if n != locker.id][:2]
    _crash(sim, dead)
    _run_until(sim, 40)
    assert len(_acting(sim)) == 3
    assert locker.quorum(sim.now).total == 4
    _submit(sim, locker.id, "e1", {"evict": dead})
    _run_until(sim, 60)
    locker = _locker(sim)
    assert locker.view_voters == frozenset(range(4)) - {dead}
    assert locker.quorum(sim.now).total == 3
    assert dead not in locker.members
    _crash(sim, other if other != locker.id else next(iter(locker.members - {locker.id})))
    _run_until(sim, 90)
    acting = _acting(sim)
    assert len(acting) == 2, acting
    q = _locker(sim).quorum(sim.now)
    assert (q.votes, q.needed, q.total) == (2, 2, 3)


def test_evictions_take_effect_one_at_a_time() -> None:
    """Two evictions submitted together: the second waits until a view
    counting the first has formed and committed its log. Every change of
    the voter set seen in an installed view removes exactly one node."""
    sim = _sim(5)
    _run_until(sim, 20)
    locker = _locker(sim)
    a, b = [n for n in range(5) if n != locker.id][:2]
    seen: list[frozenset[int]] = [locker.view_voters]
    waits: list[str] = []
    _submit(sim, locker.id, "e1", {"evict": a})
    out = locker.submit("e2", {"evict": b}, sim.now)
    sim.payloads["e2"] = {"evict": b}
    waits += [x.message for x in out if isinstance(x, Event) and "waits" in x.message]
    sim._run_actions(locker.id, out)
    assert waits and f"eviction of node {b} waits" in waits[0], waits
    assert [e.uid for e in locker.disk.log][-1] == "e1"  # e2 is not in the log yet
    t = sim.now
    while t < 80:
        t += 0.05
        _run_until(sim, t)
        for c in sim.cores.values():
            if c is not None and c.installed and (not seen or seen[-1] != c.view_voters):
                seen.append(c.view_voters)
    everyone = frozenset(range(5))
    assert seen[0] == everyone
    assert seen[-1] == everyone - {a, b}
    for before, after in itertools.pairwise(seen):
        assert after < before and len(before - after) == 1, seen
    assert sim.history_at["e1"] < sim.history_at["e2"]
    for n in (a, b):
        core = sim.cores[n]
        assert core is None or core.evicted  # both learnt it and stopped
    assert len(_acting(sim)) == 3


def test_the_locker_can_evict_itself_and_the_rest_re_form() -> None:
    sim = _sim(3)
    _run_until(sim, 20)
    locker = _locker(sim)
    _submit(sim, locker.id, "e1", {"evict": locker.id})
    _run_until(sim, 45)
    assert locker.evicted and not locker.acting(sim.now)
    rest = sorted(set(range(3)) - {locker.id})
    assert _acting(sim) == rest
    new = _locker(sim)
    assert new.view_voters == frozenset(rest) and new.members == frozenset(rest)
    assert any(f"node {locker.id} is evicted: it stops" in line for line in sim.trace or [])
    # Its exit was announced: the others re-formed without waiting out its
    # missed-heartbeat threshold.
    _submit(sim, rest[0], "u1", {"set": 1})
    _run_until(sim, 50)
    assert "u1" in sim.history_at


def test_an_evicted_node_that_was_away_stops_when_it_returns() -> None:
    """A node evicted while it was down restarts with a stale log; it must
    not disrupt the others, and stops once it learns of its eviction."""
    sim = _sim(4)
    _run_until(sim, 20)
    locker = _locker(sim)
    gone = next(n for n in range(4) if n != locker.id)
    _crash(sim, gone)
    _run_until(sim, 30)
    _submit(sim, locker.id, "e1", {"evict": gone})
    _run_until(sim, 50)
    assert _locker(sim).view_voters == frozenset(range(4)) - {gone}
    sim._restart(gone)
    _run_until(sim, 90)
    returned = sim.cores[gone]
    assert returned is not None and not returned.acting(sim.now)
    assert len(_acting(sim)) == 3
    assert gone not in _locker(sim).members


def test_a_forced_site_evicts_the_lost_site_and_regains_a_natural_quorum() -> None:
    """Two sites of two, no witness, site A lost for good: force-quorum on
    B, evict A's nodes one by one, and B's two nodes have a natural majority
    of the two voters left: the override ends."""
    sim = _sim(4)
    _run_until(sim, 20)
    a_nodes = [n for n in range(4) if sim.spec.sites[n] == "A"]
    b_nodes = [n for n in range(4) if sim.spec.sites[n] == "B"]
    for n in a_nodes:
        _crash(sim, n)
    _run_until(sim, 45)
    assert _acting(sim) == []
    sim._run_actions(b_nodes[0], _core(sim, b_nodes[0]).force_quorum("B", sim.now))
    _run_until(sim, 70)
    assert _acting(sim) == b_nodes
    assert _locker(sim).disk.forced
    for i, n in enumerate(a_nodes):
        _submit(sim, b_nodes[0], f"e{i}", {"evict": n})
    _run_until(sim, 130)
    new = _locker(sim)
    assert new.view_voters == frozenset(b_nodes)
    assert not new.disk.forced  # a natural quorum again: the override ended
    assert _acting(sim) == b_nodes
    q = new.quorum(sim.now)
    assert (q.votes, q.total, q.has_quorum) == (2, 2, True) and "FORCED" not in q.reason


def test_the_last_voter_cannot_be_evicted() -> None:
    sim = _sim(2)
    _run_until(sim, 20)
    locker = _locker(sim)
    other = next(n for n in range(2) if n != locker.id)
    _submit(sim, locker.id, "e1", {"evict": other})
    _run_until(sim, 40)
    locker = _locker(sim)
    assert locker.view_voters == frozenset({locker.id})
    out = locker.submit("e2", {"evict": locker.id}, sim.now)
    assert any("would evict the last voter" in getattr(a, "message", "") for a in out)
    assert all(e.uid != "e2" for e in locker.disk.log)


def _two_evictions_then_a_cut(sim: Simulation) -> tuple[int, int, int, int, int]:
    """Five nodes. The locker gets two evictions (of x and y) and, in the
    same instant, one more update that only x and y receive: the locker's
    links to a and b go dead one way just before it. With one eviction at a
    time, a and b (two of the four voters their log defines) can never form
    a view of their own; with both evictions in one view they could (two of
    the three voters left), without the update the locker committed with the
    votes of x and y (three of the five voters of its view). Every message
    takes the same time, so the locker counts the acks of all three updates
    before x and y learn their evictions committed (and stop)."""
    _run_until(sim, 20)
    locker = _locker(sim)
    x, y, a, b = [n for n in range(5) if n != locker.id]
    _submit(sim, locker.id, "ex", {"evict": x})
    _submit(sim, locker.id, "ey", {"evict": y})
    sim.cut |= {(locker.id, a), (locker.id, b)}
    _submit(sim, locker.id, "u1", {"set": 1})
    _run_until(sim, 80)
    return locker.id, x, y, a, b


# Every message takes the same time, and the shells do not drop what evicted
# nodes send: the core alone must keep the rules.
_FIXED_DELAY = {"min_delay_s": 0.01, "max_delay_s": 0.01, "shell_refuses_evicted": False}


def test_one_eviction_at_a_time_keeps_the_quorums_intersecting() -> None:
    sim = _sim(5, **_FIXED_DELAY)
    _locker, x, _y, a, b = _two_evictions_then_a_cut(sim)  # the checker ran after every step
    # u1 committed with x's and y's votes and survived: a and b formed a view
    # only with y (three of the four voters after x), from y's log.
    assert sim.history_at["ex"] < sim.history_at["u1"]
    assert "ey" not in sim.history_at or sim.history_at["ey"] > sim.history_at["u1"]
    assert _core(sim, x).evicted
    for n in (a, b):
        core = _core(sim, n)
        assert any(e.uid == "u1" for e in core.disk.log) or core.disk.base.index >= 2


def test_the_checker_catches_two_evictions_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the rules on purpose: the locker appends every eviction at once,
    and counts commits over its view's voters only (with the voters left
    counted too, this cut cannot commit u1 and the scenario stays safe: the
    two rules back each other up)."""
    monkeypatch.setattr(NodeCore, "_defer_eviction", lambda self, sub, out: False)
    monkeypatch.setattr(NodeCore, "_voters_after", lambda self: self.view_voters)
    sim = _sim(5, **_FIXED_DELAY)
    with pytest.raises(SafetyViolation, match="lost committed update u1"):
        _two_evictions_then_a_cut(sim)


def test_two_evictions_at_once_still_commit_only_with_the_voters_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the one-at-a-time rule broken: commits still need a quorum of
    the voters left, so u1 (which a and b never got) does not commit, and
    the checker finds nothing wrong."""
    monkeypatch.setattr(NodeCore, "_defer_eviction", lambda self, sub, out: False)
    sim = _sim(5, **_FIXED_DELAY)
    _two_evictions_then_a_cut(sim)
    assert "u1" not in sim.history_at


def test_the_checker_catches_commits_stranded_on_an_evicted_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Break the rule on purpose: commits count the view's voters only. In
    majority+witness seed 40071 an eviction of the locker commits with its
    own vote and the witness's; it stops, the update lives nowhere else,
    the witness (which recorded it) refuses every view without it, and the
    cluster never re-forms."""
    from geoclus.cluster.sim import settings_for_seed

    monkeypatch.setattr(NodeCore, "_voters_after", lambda self: self.view_voters)
    kind = QuorumKind.MAJORITY_WITNESS
    settings = settings_for_seed(40071, kind, duration_s=240.0, settle_s=60.0)
    with pytest.raises(SafetyViolation, match="after 60s healed"):
        Simulation(40071, settings).run()
