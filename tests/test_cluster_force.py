"""force-quorum and planned leave in the node core, on the simulator's clock
and network (no faults but the ones each test makes)."""

from __future__ import annotations

import pytest

from geoclus.cluster.node import ForceRefused
from geoclus.cluster.sim import SimSettings, Simulation
from quorum.votes import QuorumKind

A, B = [0, 1], [2, 3]


def _sim(kind: QuorumKind = QuorumKind.MAJORITY) -> Simulation:
    s = SimSettings(nodes=4, kind=kind, drop_p=0.0, dup_p=0.0, slow_p=0.0)
    return Simulation(7, s)


def _run_until(sim: Simulation, t: float) -> None:
    sim.run_until(t, check=False)


def _cut(sim: Simulation, left: list[int], right: list[int]) -> None:
    for a in left:
        for b in right:
            sim.cut |= {(a, b), (b, a)}


def _force(sim: Simulation, node: int, site: str) -> None:
    core = sim.cores[node]
    assert core is not None
    sim._run_actions(node, core.force_quorum(site, sim.now))


def _acting(sim: Simulation) -> dict[int, bool]:
    return {n: c.acting(sim.now) for n, c in sim.cores.items() if c is not None}


def _one_view(sim: Simulation, nodes: list[int]) -> bool:
    cores = [sim.cores[n] for n in nodes]
    return (
        all(c is not None and c.acting(sim.now) for c in cores)
        and len({c.view for c in cores if c}) == 1
        and all(c is not None and c.members == frozenset(nodes) for c in cores)
    )


def test_force_is_refused_while_the_other_site_answers() -> None:
    sim = _sim()
    _run_until(sim, 20)
    assert _one_view(sim, A + B)
    core = sim.cores[2]
    assert core is not None
    with pytest.raises(ForceRefused, match="still answer heartbeats"):
        core.force_quorum("B", sim.now)
    with pytest.raises(ForceRefused, match="not A"):
        core.force_quorum("A", sim.now)
    assert not core.disk.forced


def test_forced_site_acts_alone_and_the_override_ends_when_the_cluster_heals() -> None:
    sim = _sim()
    _run_until(sim, 20)
    _cut(sim, A, B)
    _run_until(sim, 20 + sim.spec.stop_bound_s + 0.01)
    assert not any(_acting(sim).values()), "half of a majority cluster must stop"
    _force(sim, 2, "B")
    _run_until(sim, sim.now + 10)
    assert _one_view(sim, B)
    assert all(sim.cores[n].disk.forced for n in B)  # type: ignore[union-attr]
    assert not any(_acting(sim)[n] for n in A)
    locker = sim.cores[sim.cores[2].view[1]]  # type: ignore[union-attr,index]
    assert locker is not None
    sim._run_actions(locker.id, locker.submit("forced-update", {"op": "set"}, sim.now))
    _run_until(sim, sim.now + 3)
    assert sim.applied_uids(locker.id) == ["forced-update"]

    sim.cut.clear()
    _run_until(sim, sim.now + 30)
    assert _one_view(sim, A + B)
    for n in A + B:
        core = sim.cores[n]
        assert core is not None and not core.disk.forced
        assert "forced-update" in sim.applied_uids(n)


def test_forced_flag_survives_a_restart_of_a_forced_node() -> None:
    sim = _sim()
    _run_until(sim, 20)
    _cut(sim, A, B)
    _run_until(sim, 20 + sim.spec.stop_bound_s + 0.01)
    _force(sim, 3, "B")
    _run_until(sim, sim.now + 10)
    assert sim.persisted[3].forced
    sim._restart(3)
    _run_until(sim, sim.now + 15)
    assert _one_view(sim, B)


def test_a_planned_leave_re_forms_without_waiting_for_missed_heartbeats() -> None:
    sim = _sim()
    _run_until(sim, 20)
    assert _one_view(sim, A + B)
    view = sim.cores[0].view  # type: ignore[union-attr]
    leaver = next(n for n in A + B if n != view[1])
    sim.cores[leaver] = None  # it stops after telling everyone
    for n in A + B:
        core = sim.cores[n]
        if core is not None:
            sim._run_actions(n, core.node_left(leaver, sim.now))
    rest = [n for n in A + B if n != leaver]
    # Well under the missed-heartbeat threshold (lease) the others are a view again.
    _run_until(sim, sim.now + sim.spec.timers.regroup_answer_timeout_s + 1.0)
    assert sim.spec.timers.regroup_answer_timeout_s + 1.0 < sim.spec.max_lease_s
    assert _one_view(sim, rest)


def test_a_leaving_locker_is_not_taken_into_the_next_view() -> None:
    sim = _sim()
    _run_until(sim, 20)
    view = sim.cores[0].view  # type: ignore[union-attr]
    locker = sim.cores[view[1]]
    assert locker is not None
    sim._run_actions(locker.id, locker.leave(sim.now))  # silent from now on, still running
    for n in A + B:
        core = sim.cores[n]
        if core is not None and n != locker.id:
            sim._run_actions(n, core.node_left(locker.id, sim.now))
    rest = [n for n in A + B if n != locker.id]
    _run_until(sim, sim.now + sim.spec.timers.regroup_answer_timeout_s + 1.0)
    assert _one_view(sim, rest)
    assert not locker.acting(sim.now)


def test_disk_quorum_forced_updates_survive_the_return_of_the_disk() -> None:
    """``disk`` quorum, every link between the sites cut (the quorum disk's
    primary mirror is at site A, so site B cannot reach it, and A's writes
    are suspended without B's mirror): both sides stop; site B is forced and
    commits; when everything heals, the forced site's update is in the one
    history and the view holds the disk again (the override ends)."""
    from geoclus.cluster.sim import QDISK

    sim = _sim(QuorumKind.DISK)
    _run_until(sim, 30)
    assert _one_view(sim, A + B)
    _cut(sim, A, B)
    _cut(sim, B, [QDISK])
    sim.mirror_cut = True
    _run_until(sim, sim.now + sim.spec.stop_bound_s + 0.5)
    assert not any(_acting(sim).values()), "without the disk neither side may act"
    _run_until(sim, sim.now + 20)  # longer than a whole challenge: nobody takes it
    assert not any(_acting(sim).values())

    _force(sim, 2, "B")
    _run_until(sim, sim.now + 15)
    assert _one_view(sim, B)
    locker = sim.cores[sim.cores[2].view[1]]  # type: ignore[union-attr,index]
    assert locker is not None
    sim._run_actions(locker.id, locker.submit("forced-update", {"op": "set"}, sim.now))
    _run_until(sim, sim.now + 3)
    assert "forced-update" in sim.applied_uids(locker.id)

    sim.cut.clear()
    sim.mirror_cut = False
    _run_until(sim, sim.now + 60)
    assert _one_view(sim, A + B)
    for n in A + B:
        core = sim.cores[n]
        assert core is not None and not core.disk.forced
        assert "forced-update" in sim.applied_uids(n), n
    assert sum(1 for c in sim.cores.values() if c and c.arbiter and c.arbiter.owns(sim.now)) == 1
