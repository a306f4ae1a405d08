"""Generation identifiers and the connect-time sync decision (pure).

Every copy of a volume carries a *lineage*: the generation its data belongs to
(``current``) and the generations before it (``history``, newest first). A new
generation starts whenever a copy begins to change data on its own: the first
write of a primary that is not replicating, a promotion while disconnected, a
forced promotion. The copy then also records ``bitmap_base``, the generation at
which its dirty bitmap started, so the bitmap holds every region it changed
since.

When two copies connect, :func:`decide` compares their lineages and returns
one :class:`Decision`: in sync, resync one way (delta from the bitmaps, or full),
split brain (both changed data independently since a common generation), or
unrelated. Split brain is never merged: it is refused unless an operator marked
one side for discard (``geoclus volume resolve --discard-local``), a forced
promotion already chose the winner, or a configured policy picks the loser. The
table in docs/generations.md lists every case.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

# Generations kept per copy. A copy further behind than this many divergences
# can no longer be matched by lineage: the decision then says "unrelated" and an
# operator chooses (never a wrong automatic sync). 32 x 17 bytes fits a HELLO.
MAX_HISTORY = 32

FRESH = 0  # the generation of a new all-zero volume, the same on every site


class Cause(enum.Enum):
    """Why a generation was started."""

    CREATE = "create"  # a new volume (FRESH) or data of unknown history
    DIVERGE = "diverge"  # a primary wrote while not replicating
    PROMOTE = "promote"  # promoted while disconnected
    FORCE = "force"  # forced promotion (operator accepted possible loss)


@dataclass(frozen=True)
class Generation:
    """One generation: a random 63-bit id (0 = FRESH), when and why it began."""

    id: int
    created_ns: int
    cause: Cause


@dataclass(frozen=True)
class GenState:
    """What one copy knows about its own data history (persisted with the metadata).

    * ``bitmap_base``: the generation id at which this copy's dirty bitmap
      started (None: it tracks nothing; it has not changed data on its own).
    * ``changes``: how many regions its bitmap marks (for split-brain policies).
    * ``discard``: an operator said to roll this copy back to its peer.
    * ``unknown``: the copy's data has no known history (a store found without
      metadata, a seed from a backup): it may only be a full-sync target.
    * ``primary``: the copy's current role.
    * ``inconsistent``: a resync into this copy is under way (or was cut off).
    """

    current: Generation
    history: tuple[Generation, ...] = ()
    bitmap_base: int | None = None
    changes: int = 0
    discard: bool = False
    unknown: bool = False
    primary: bool = False
    # A resync into this copy started and has not finished: its image is a mix
    # of old and new regions. It may only be a resync target.
    inconsistent: bool = False

    @property
    def lineage(self) -> tuple[int, ...]:
        """Generation ids, newest first: current, then history."""
        return (self.current.id, *(g.id for g in self.history))


def fresh(primary: bool, created_ns: int = 0) -> GenState:
    """A new all-zero copy (the same generation on every site)."""
    return GenState(Generation(FRESH, created_ns, Cause.CREATE), primary=primary)


def unknown_copy(new_id: int, created_ns: int, primary: bool = False) -> GenState:
    """A copy whose data has no known history (full-sync target only)."""
    return GenState(Generation(new_id, created_ns, Cause.CREATE), unknown=True, primary=primary)


def _start_generation(s: GenState, new_id: int, now_ns: int, cause: Cause) -> GenState:
    history = (s.current, *s.history)[:MAX_HISTORY]
    base = s.current.id if s.bitmap_base is None else s.bitmap_base
    return replace(s, current=Generation(new_id, now_ns, cause), history=history, bitmap_base=base)


def on_write_unreplicated(
    s: GenState, new_id: int, now_ns: int, *, shared: bool = False
) -> GenState:
    """A primary's data history leaves its peer's (the peer went outdated, or
    lost the link while lacking writes). This starts a generation, unless the
    copy is already diverging in a generation the peer cannot hold. ``shared``:
    the current generation was announced to the peer (it may have adopted it),
    so a new one is needed even while diverging; the bitmap keeps
    accumulating from the older base, a superset of what differs."""
    if s.bitmap_base is not None and not shared:
        return s  # already diverging in a generation of our own
    return _start_generation(s, new_id, now_ns, Cause.DIVERGE)


def on_promote(
    s: GenState, new_id: int, now_ns: int, *, connected_in_sync: bool, forced: bool
) -> GenState:
    """Promotion to primary. A planned switchover between copies in sync keeps
    the generation; a promotion while disconnected starts one (``FORCE`` when
    the operator forced it past a possibly newer peer)."""
    if connected_in_sync and not forced:
        return replace(s, primary=True)
    return replace(
        _start_generation(s, new_id, now_ns, Cause.FORCE if forced else Cause.PROMOTE),
        primary=True,
    )


def on_crash_restart(s: GenState, new_id: int, now_ns: int) -> GenState:
    """A primary restarts after a crash: writes it shipped may be missing from
    its own disk and the other way round, and nothing records which regions.
    A new generation whose bitmap covers only what comes after it, so the
    decision asks for a full sync, never a wrong delta."""
    history = (s.current, *s.history)[:MAX_HISTORY]
    return replace(
        s, current=Generation(new_id, now_ns, Cause.DIVERGE), history=history, bitmap_base=new_id
    )


def on_crash_restart_logged(s: GenState, new_id: int, now_ns: int) -> GenState:
    """A primary restarts after a crash, and its activity log's hot extents are
    now durably marked in its bitmap: with the bitmap's earlier content, that
    covers every region where the copies may differ since the current
    generation (writes in flight at the crash were all in hot extents). A new
    generation whose bitmap counts from the old one (or from where the bitmap
    already counted), so the decision asks for a delta resync."""
    history = (s.current, *s.history)[:MAX_HISTORY]
    base = s.bitmap_base if s.bitmap_base is not None else s.current.id
    return replace(
        s, current=Generation(new_id, now_ns, Cause.DIVERGE), history=history, bitmap_base=base
    )


def on_demote(s: GenState) -> GenState:
    return replace(s, primary=False)


def on_resolve_discard(s: GenState) -> GenState:
    """Operator: roll this copy back to its peer at the next connect."""
    return replace(s, discard=True)


def after_resync(target: GenState, source: GenState) -> tuple[GenState, GenState]:
    """A resync completed: the target now holds the source's data and lineage;
    the source's bitmap is spent. Returns (target, source)."""
    new_target = replace(
        target,
        current=source.current,
        history=source.history,
        bitmap_base=None,
        changes=0,
        discard=False,
        unknown=False,
        inconsistent=False,
    )
    new_source = replace(source, bitmap_base=None, changes=0)
    return new_target, new_source


class Action(enum.Enum):
    IN_SYNC = "in-sync"
    RESYNC = "resync"
    SPLIT_BRAIN = "split-brain"
    UNRELATED = "unrelated"
    REFUSE = "refuse"


class SplitBrainPolicy(enum.Enum):
    """What to do with a split brain nobody resolved by hand. ``NONE`` refuses."""

    NONE = "none"
    DISCARD_ZERO_CHANGES = "discard-zero-changes"
    DISCARD_YOUNGER_PRIMARY = "discard-younger-primary"
    DISCARD_FEWER_CHANGES = "discard-fewer-changes"


@dataclass(frozen=True)
class Decision:
    """The outcome of comparing two copies at connect time.

    For ``RESYNC``: ``source`` is ``"local"`` or ``"peer"``; ``full`` says a
    full sync (with checksum skip) is needed; otherwise ``bitmaps`` names whose
    dirty bitmaps to merge (the source's, plus the target's when the target's
    own changes must be rolled back). ``resolved_by`` is set when data of the
    target is being discarded on purpose (operator, forced promotion, policy).
    """

    action: Action
    reason: str
    source: str | None = None
    full: bool = False
    bitmaps: frozenset[str] = field(default_factory=frozenset)
    common: int | None = None
    resolved_by: str | None = None


def _other(side: str) -> str:
    return "peer" if side == "local" else "local"


def _covers(s: GenState, since: int) -> bool:
    """True if ``s``'s bitmap holds every change it made after generation ``since``."""
    if s.bitmap_base is None:
        # It tracks nothing, which is right only if it changed nothing since.
        return s.current.id == since
    lineage = s.lineage
    if since not in lineage or s.bitmap_base not in lineage:
        return False
    return lineage.index(s.bitmap_base) >= lineage.index(since)


def _resync(
    source: str,
    s_state: GenState,
    t_state: GenState,
    common: int | None,
    reason: str,
    resolved_by: str | None = None,
) -> Decision:
    """Resync ``source`` -> other, delta when the bitmaps cover everything both
    sides changed since ``common``."""
    target = _other(source)
    if t_state.primary:
        return Decision(
            Action.REFUSE,
            f"{reason}; but the {target} copy is primary: demote it "
            "first (a primary's data is never overwritten under its users)",
            common=common,
        )
    if common is None or not _covers(s_state, common):
        return Decision(
            Action.RESYNC, reason, source=source, full=True, common=common, resolved_by=resolved_by
        )
    bitmaps = {source}
    if t_state.current.id != common:
        if not _covers(t_state, common):
            return Decision(
                Action.RESYNC,
                reason,
                source=source,
                full=True,
                common=common,
                resolved_by=resolved_by,
            )
        bitmaps.add(target)  # roll back what the target changed on its own
    return Decision(
        Action.RESYNC,
        reason,
        source=source,
        bitmaps=frozenset(bitmaps),
        common=common,
        resolved_by=resolved_by,
    )


def _first_common(a: GenState, b: GenState) -> int | None:
    theirs = set(b.lineage)
    return next((g for g in a.lineage if g in theirs), None)


def _divergence(s: GenState, common: int) -> Generation | None:
    """The first generation ``s`` started after ``common`` (oldest after it)."""
    lineage = (s.current, *s.history)
    ids = [g.id for g in lineage]
    if common not in ids:
        return None
    i = ids.index(common)
    return lineage[i - 1] if i > 0 else None


def decide(
    local: GenState, peer: GenState, policy: SplitBrainPolicy = SplitBrainPolicy.NONE
) -> Decision:
    """Decide how ``local`` and ``peer`` become one mirror again (pure).

    Never returns IN_SYNC or a one-way RESYNC that would silently drop writes
    one side has and the other lacks, unless ``resolved_by`` says who decided
    that (operator discard, forced promotion, or ``policy``).
    """
    sides = {"local": local, "peer": peer}
    if local.unknown and peer.unknown:
        return Decision(
            Action.UNRELATED,
            "neither copy has a known history; choose the one "
            "to keep and run `geoclus volume resolve --discard-local` on the other",
        )
    for side, s in sides.items():
        other = _other(side)
        if s.unknown and not sides[other].unknown:
            return _resync(
                other,
                sides[other],
                s,
                None,
                f"the {side} copy has no known history: full sync from the {other}",
            )
    if local.inconsistent and peer.inconsistent:
        return Decision(
            Action.REFUSE,
            "both copies are in the middle of a resync (neither holds a consistent "
            "image); restore one from a backup",
        )
    for side, s in sides.items():
        other = _other(side)
        if s.inconsistent:
            return _resync(
                other,
                sides[other],
                s,
                _first_common(local, peer),
                f"the {side} copy was cut off in the middle of a resync: it resumes "
                f"from the {other}",
            )
    if local.discard and peer.discard:
        return Decision(
            Action.REFUSE,
            "both copies are marked for discard; clear one with "
            "`geoclus volume resolve --keep-local`",
        )
    for side, s in sides.items():
        other = _other(side)
        if s.discard:
            return _resync(
                other,
                sides[other],
                s,
                _first_common(local, peer),
                f"the operator chose to roll the {side} copy back to the {other}",
                resolved_by="operator",
            )
    if local.current.id == peer.current.id:
        return Decision(
            Action.IN_SYNC,
            "same generation: the copies hold the same data",
            common=local.current.id,
        )
    for side, s in sides.items():
        other = _other(side)
        o = sides[other]
        if o.current.id in s.lineage[1:]:
            # ``o`` has not changed since (a change would have started a new
            # generation), so it is an older state of ``s``.
            return _resync(
                side, s, o, o.current.id, f"the {other} copy is an older state of the {side} copy"
            )
    common = _first_common(local, peer)
    if common is None:
        return Decision(
            Action.UNRELATED,
            "the copies share no generation (different data "
            "histories); choose one with `geoclus volume resolve --discard-local`",
        )
    # Both changed data on their own since `common`: split brain.
    for side, s in sides.items():
        other = _other(side)
        o = sides[other]
        div = _divergence(s, common)
        if (
            s.primary
            and not o.primary
            and div is not None
            and any(
                g.cause is Cause.FORCE for g in (s.current, *s.history)[: s.lineage.index(common)]
            )
        ):
            return _resync(
                side,
                s,
                o,
                common,
                f"split brain after a forced promotion of the {side} copy: the "
                f"{other} copy's divergent writes are rolled back",
                resolved_by="forced-promotion",
            )
    loser = _policy_loser(local, peer, common, policy)
    if loser is not None:
        winner = _other(loser)
        return _resync(
            winner,
            sides[winner],
            sides[loser],
            common,
            f"split brain resolved by policy {policy.value}: the {loser} copy's "
            "changes are discarded",
            resolved_by=f"policy:{policy.value}",
        )
    return Decision(
        Action.SPLIT_BRAIN,
        "split brain: both copies changed data independently since generation "
        f"{common:#x}; nothing is merged. Run `geoclus volume resolve "
        "--discard-local` on the copy whose changes are to be thrown away",
        common=common,
    )


def may_catch_up(decision: Decision, peer: GenState) -> bool:
    """True if a peer that ``decision`` says to resync from us may instead catch
    up through our retained log (when the log still covers it) and then adopt
    our lineage: a delta from our bitmap alone, to a peer that is not the
    target of a cut-off resync (regions that resync did not reach are in no
    log). The caller also checks that the log covers the peer."""
    return (
        decision.action is Action.RESYNC
        and decision.source == "local"
        and not decision.full
        and "peer" not in decision.bitmaps
        and not peer.inconsistent
    )


def _policy_loser(
    local: GenState, peer: GenState, common: int, policy: SplitBrainPolicy
) -> str | None:
    if policy is SplitBrainPolicy.NONE:
        return None
    if policy is SplitBrainPolicy.DISCARD_ZERO_CHANGES:
        zero = [side for side, s in (("local", local), ("peer", peer)) if s.changes == 0]
        return zero[0] if len(zero) == 1 else None
    if policy is SplitBrainPolicy.DISCARD_FEWER_CHANGES:
        if local.changes == peer.changes:
            return None
        return "local" if local.changes < peer.changes else "peer"
    if policy is SplitBrainPolicy.DISCARD_YOUNGER_PRIMARY:
        dl, dp = _divergence(local, common), _divergence(peer, common)
        if dl is None or dp is None or dl.created_ns == dp.created_ns:
            return None
        return "local" if dl.created_ns > dp.created_ns else "peer"
    raise AssertionError(f"unknown policy {policy}")
