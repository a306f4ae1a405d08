"""The generation-id decision, checked against the truth of what each copy holds.

A model of two copies tracks, besides their generation state, the exact
sequence of writes each one holds and the writes each dirty bitmap covers.
Every sequence of events up to a depth is enumerated (writes, link cuts,
reconnects, switchovers, promotions, forced promotions, demotions, operator
discards), and at every reconnect the decision must be true to the data:

* IN_SYNC only when both hold the same writes;
* a RESYNC never drops a write the target has and the source lacks unless the
  decision says who chose to (operator, forced promotion, policy);
* a delta RESYNC's bitmaps cover every write on which the two differ;
* whenever both hold writes the other lacks, the answer is SPLIT_BRAIN or a
  resolution someone explicitly chose, never a silent merge or overwrite;
* a primary is never a resync target; the decision is the same seen from
  either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.generations import (
    FRESH,
    Action,
    Cause,
    Decision,
    Generation,
    GenState,
    SplitBrainPolicy,
    after_resync,
    decide,
    fresh,
    on_demote,
    on_promote,
    on_resolve_discard,
    on_write_unreplicated,
    unknown_copy,
)


@dataclass
class Copy:
    gen: GenState
    hist: tuple[int, ...] = ()
    bitmap: set[int] = field(default_factory=set)  # writes made while tracking


@dataclass
class World:
    a: Copy
    b: Copy
    connected: bool = True
    next_id: int = 1
    now_ns: int = 0
    log: list[str] = field(default_factory=list)

    def copy(self, name: str) -> Copy:
        return self.a if name == "A" else self.b

    def other(self, name: str) -> Copy:
        return self.b if name == "A" else self.a

    def tick(self) -> int:
        self.now_ns += 1
        self.next_id += 1
        return self.next_id

    def clone(self) -> World:
        return World(
            Copy(self.a.gen, self.a.hist, set(self.a.bitmap)),
            Copy(self.b.gen, self.b.hist, set(self.b.bitmap)),
            self.connected,
            self.next_id,
            self.now_ns,
            list(self.log),
        )


def start() -> World:
    return World(Copy(fresh(primary=True)), Copy(fresh(primary=False)))


EVENTS = ("wA", "wB", "cut", "join", "fpA", "fpB", "pA", "pB", "dA", "dB", "xA", "xB")


def enabled(w: World, ev: str) -> bool:
    if ev == "cut":
        return w.connected
    if ev == "join":
        return not w.connected
    name = ev[-1]
    me, other = w.copy(name), w.other(name)
    kind = ev[:-1]
    if kind == "w":
        return me.gen.primary
    if kind == "fp":
        return not w.connected and not me.gen.primary
    if kind == "p":  # planned switchover, connected and in sync
        return w.connected and not me.gen.primary and other.gen.primary
    if kind == "d":
        return me.gen.primary and not w.connected
    if kind == "x":
        return not w.connected and not me.gen.discard
    raise AssertionError(ev)


def apply(w: World, ev: str, policy: SplitBrainPolicy, decide_fn=decide) -> Decision | None:
    w.log.append(ev)
    if ev == "cut":
        w.connected = False
        return None
    if ev == "join":
        return join(w, policy, decide_fn)
    name = ev[-1]
    me, other = w.copy(name), w.other(name)
    kind = ev[:-1]
    if kind == "w":
        wid = w.tick()
        if w.connected:
            assert not other.gen.primary
            me.hist += (wid,)
            other.hist += (wid,)
        else:
            me.gen = on_write_unreplicated(me.gen, w.next_id * 1000 + 7, w.now_ns)
            me.hist += (wid,)
            me.bitmap.add(wid)
            me.gen = replace(me.gen, changes=len(me.bitmap))
    elif kind == "fp":
        w.tick()
        me.gen = on_promote(
            me.gen, w.next_id * 1000 + 3, w.now_ns, connected_in_sync=False, forced=True
        )
    elif kind == "p":
        w.tick()
        me.gen = on_promote(
            me.gen, w.next_id * 1000 + 5, w.now_ns, connected_in_sync=True, forced=False
        )
        other.gen = on_demote(other.gen)
    elif kind == "d":
        me.gen = on_demote(me.gen)
    elif kind == "x":
        me.gen = on_resolve_discard(me.gen)
    return None


def mirrored(d: Decision) -> tuple:
    flip = {"local": "peer", "peer": "local", None: None}
    return (d.action, flip[d.source], d.full, frozenset(flip[b] for b in d.bitmaps), d.resolved_by)


def join(w: World, policy: SplitBrainPolicy, decide_fn=decide) -> Decision:
    a, b = w.a, w.b
    d = decide_fn(a.gen, b.gen, policy)
    d2 = decide_fn(b.gen, a.gen, policy)
    assert mirrored(d) == (d2.action, d2.source, d2.full, d2.bitmaps, d2.resolved_by), (
        w.log,
        d,
        d2,
    )
    a_only = set(a.hist) - set(b.hist)
    b_only = set(b.hist) - set(a.hist)
    if a.gen.primary and b.gen.primary:
        # Two primaries: the handshake refuses before any decision is acted on.
        assert d.action is not Action.IN_SYNC or a.hist == b.hist
        return d
    if d.action is Action.IN_SYNC:
        assert a.hist == b.hist, (w.log, "IN_SYNC but the data differ")
        w.connected = True
    elif d.action is Action.RESYNC:
        src, tgt = (a, b) if d.source == "local" else (b, a)
        assert not tgt.gen.primary, (w.log, "a primary chosen as resync target")
        lost = set(tgt.hist) - set(src.hist)
        if d.resolved_by is None:
            assert not lost, (w.log, f"resync would silently drop {lost}")
            assert src.hist[: len(tgt.hist)] == tgt.hist, (w.log, "target not a prefix")
        if not d.full:
            covered = set()
            if "local" in d.bitmaps:
                covered |= a.bitmap
            if "peer" in d.bitmaps:
                covered |= b.bitmap
            differ = a_only | b_only
            assert differ <= covered, (w.log, f"delta resync misses {differ - covered}")
        tgt.hist = src.hist
        tgt.gen, src.gen = after_resync(tgt.gen, src.gen)
        tgt.bitmap, src.bitmap = set(), set()
        w.connected = True
    else:
        # Refused (split brain, unrelated, refuse): nothing changes.
        if d.action is Action.SPLIT_BRAIN:
            assert d.common is not None
    # The safety rule: both hold writes the other lacks -> never silently chosen.
    if a_only and b_only:
        assert d.action in (Action.SPLIT_BRAIN, Action.REFUSE, Action.UNRELATED) or (
            d.action is Action.RESYNC and d.resolved_by is not None
        ), (w.log, d)
    return d


def walk(depth: int, policy: SplitBrainPolicy, decide_fn=decide) -> tuple[int, dict[Action, int]]:
    seen = 0
    outcomes: dict[Action, int] = dict.fromkeys(Action, 0)

    def rec(w: World, level: int) -> None:
        nonlocal seen
        if level == depth:
            return
        for ev in EVENTS:
            if enabled(w, ev):
                w2 = w.clone()
                d = apply(w2, ev, policy, decide_fn)
                seen += 1
                if d is not None:
                    outcomes[d.action] += 1
                rec(w2, level + 1)

    rec(start(), 0)
    return seen, outcomes


@pytest.mark.parametrize("policy", list(SplitBrainPolicy))
def test_every_history_up_to_depth_8(policy: SplitBrainPolicy) -> None:
    seen, outcomes = walk(8, policy)
    assert seen > 200_000
    # The walk reaches every kind of outcome, not just the easy ones.
    assert outcomes[Action.IN_SYNC] and outcomes[Action.RESYNC]
    assert outcomes[Action.REFUSE]
    if policy is SplitBrainPolicy.NONE:
        assert outcomes[Action.SPLIT_BRAIN]


event_lists = st.lists(st.sampled_from(EVENTS), min_size=1, max_size=40)


@given(events=event_lists, policy=st.sampled_from(list(SplitBrainPolicy)))
@settings(max_examples=400, deadline=None)
def test_long_random_histories(events: list[str], policy: SplitBrainPolicy) -> None:
    w = start()
    for ev in events:
        if enabled(w, ev):
            apply(w, ev, policy)  # every join checks the decision against the data
        if w.connected:
            # Replicating copies hold exactly the same writes.
            assert w.a.hist == w.b.hist, w.log


def test_old_primary_returning_after_forced_promotion_is_rolled_back() -> None:
    w = start()
    for ev in ("wA", "cut", "wA", "wA", "fpB", "wB", "dA"):
        apply(w, ev, SplitBrainPolicy.NONE)
    d = join(w, SplitBrainPolicy.NONE)
    assert d.action is Action.RESYNC and d.source == "peer"
    assert d.resolved_by == "forced-promotion"
    assert d.bitmaps == frozenset({"local", "peer"})  # the union rolls A back
    assert w.a.hist == w.b.hist


def test_split_brain_is_refused_until_an_operator_chooses() -> None:
    w = start()
    for ev in ("cut", "wA", "fpB", "wB"):
        apply(w, ev, SplitBrainPolicy.NONE)
    apply(w, "dA", SplitBrainPolicy.NONE)
    apply(w, "dB", SplitBrainPolicy.NONE)  # both demoted: no forced winner any more
    d = decide(w.a.gen, w.b.gen)
    assert d.action is Action.SPLIT_BRAIN and "resolve --discard-local" in d.reason
    apply(w, "xA", SplitBrainPolicy.NONE)  # operator: A's changes go
    d = join(w, SplitBrainPolicy.NONE)
    assert d.action is Action.RESYNC and d.source == "peer" and d.resolved_by == "operator"
    assert w.a.hist == w.b.hist


def test_policies_pick_the_loser() -> None:
    def split(changes_a: int, changes_b: int) -> World:
        w = start()
        apply(w, "cut", SplitBrainPolicy.NONE)
        for _ in range(changes_a):
            apply(w, "wA", SplitBrainPolicy.NONE)
        apply(w, "dA", SplitBrainPolicy.NONE)
        apply(w, "fpB", SplitBrainPolicy.NONE)
        for _ in range(changes_b):
            apply(w, "wB", SplitBrainPolicy.NONE)
        apply(w, "dB", SplitBrainPolicy.NONE)
        return w

    w = split(3, 1)
    d = decide(w.a.gen, w.b.gen, SplitBrainPolicy.DISCARD_FEWER_CHANGES)
    assert d.action is Action.RESYNC and d.source == "local"
    d = decide(w.a.gen, w.b.gen, SplitBrainPolicy.DISCARD_YOUNGER_PRIMARY)
    assert d.source == "local"  # B's divergence (its forced promotion) came later
    w = split(2, 0)
    d = decide(w.a.gen, w.b.gen, SplitBrainPolicy.DISCARD_ZERO_CHANGES)
    assert d.action is Action.RESYNC and d.source == "local"
    assert decide(w.a.gen, w.b.gen).action is Action.SPLIT_BRAIN


def test_unknown_history_gets_a_full_sync_and_two_unknowns_are_refused() -> None:
    primary = on_write_unreplicated(fresh(primary=True), 77, 1)
    seed = unknown_copy(99, 2)
    d = decide(primary, seed)
    assert d.action is Action.RESYNC and d.source == "local" and d.full
    assert decide(unknown_copy(1, 0), unknown_copy(2, 0)).action is Action.UNRELATED


def test_history_beyond_the_bound_falls_back_to_full_sync_never_wrong() -> None:
    a = fresh(primary=True)
    b = fresh(primary=False)
    for i in range(12):  # many divergences and re-syncs on A's side, B away
        a = on_write_unreplicated(a, 1000 + i, i)
        a = replace(a, bitmap_base=None)  # as if each were resynced to a third copy
    d = decide(a, b)
    assert d.action in (Action.RESYNC, Action.UNRELATED)
    if d.action is Action.RESYNC:
        assert d.source == "local" and d.full


def test_same_generation_is_in_sync() -> None:
    g = Generation(FRESH, 0, Cause.CREATE)
    assert decide(GenState(g, primary=True), GenState(g)).action is Action.IN_SYNC


def test_unrelated_lineages_are_refused() -> None:
    a = GenState(Generation(5, 0, Cause.DIVERGE), (Generation(4, 0, Cause.CREATE),))
    b = GenState(Generation(9, 0, Cause.DIVERGE), (Generation(8, 0, Cause.CREATE),))
    assert decide(a, b).action is Action.UNRELATED


# ------------------------------------------------------------- can it fail?


def _silently_overwrite(local, peer, policy):
    """Broken rule: a split brain is 'resolved' by overwriting the peer, unannounced."""
    d = decide(local, peer, policy)
    if d.action is Action.SPLIT_BRAIN:
        # Symmetric on purpose (the newer generation wins), so only the data
        # check, not the symmetry check, can object.
        if local.primary != peer.primary:
            source = "local" if local.primary else "peer"  # never a primary target
        else:
            source = "local" if local.current.id > peer.current.id else "peer"
        return Decision(Action.RESYNC, "broken", source=source, full=True, common=d.common)
    return d


def _common_ancestor_means_in_sync(local, peer, policy):
    """Broken rule: copies that share any generation are called in sync."""
    d = decide(local, peer, policy)
    if d.action in (Action.RESYNC, Action.SPLIT_BRAIN) and d.resolved_by is None:
        return Decision(Action.IN_SYNC, "broken")
    return d


def _source_bitmap_only(local, peer, policy):
    """Broken rule: a delta resync uses only the source's bitmap (the target's own
    divergent writes would never be rolled back)."""
    d = decide(local, peer, policy)
    if d.action is Action.RESYNC and not d.full and len(d.bitmaps) == 2:
        return replace(d, bitmaps=frozenset({d.source}))
    return d


@pytest.mark.parametrize(
    "broken,expected",
    [
        (_silently_overwrite, "silently drop"),
        (_common_ancestor_means_in_sync, "IN_SYNC but the data differ"),
        (_source_bitmap_only, "delta resync misses"),
    ],
)
def test_the_walk_catches_a_broken_decision_rule(broken, expected) -> None:
    with pytest.raises(AssertionError, match=expected):
        for policy in SplitBrainPolicy:
            walk(7, policy, broken)
