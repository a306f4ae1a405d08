"""Quorum decisions as pure functions (docs/cluster.md has their tables).

Three kinds, as in the seeds and their anchors (MSCS majority node set, Corosync
votequorum with qdevice, the mirrored quorum disk):

* ``majority``: every configured node holds one vote; a partition has quorum
  with more than half of the configured votes (``n // 2 + 1``). Two partitions
  can never both have that many, so at most one has quorum.
* ``majority+witness``: a third-site witness adds one vote, which it gives to
  at most one partition at a time (quorum/witness.py); the total is ``n + 1``.
  In a two-site cluster with equal halves the witness decides, with no
  operator.
* ``disk``: whoever holds the quorum disk's reservation has quorum, whatever
  the node count (quorum/arbitration.py decides who holds it).

An operator override (``force-quorum``) makes a partition's decision true
whatever the votes; it is recorded in the reason so status shows it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class QuorumKind(enum.Enum):
    """How a partition proves it may act."""

    MAJORITY = "majority"
    MAJORITY_WITNESS = "majority+witness"
    DISK = "disk"


@dataclass(frozen=True, slots=True)
class QuorumDecision:
    """The outcome and the arithmetic behind it (shown in status and events)."""

    has_quorum: bool
    votes: int
    needed: int
    total: int
    reason: str


def needed_votes(total_votes: int) -> int:
    """More than half: the smallest count two disjoint partitions cannot both reach."""
    if total_votes < 1:
        raise ValueError(f"a cluster needs at least one vote, not {total_votes}")
    return total_votes // 2 + 1


def total_votes(kind: QuorumKind, configured_nodes: int) -> int:
    """All votes the cluster has (the witness counts as one)."""
    if kind is QuorumKind.MAJORITY_WITNESS:
        return configured_nodes + 1
    if kind is QuorumKind.DISK:
        return 1
    return configured_nodes


def decide(
    kind: QuorumKind,
    configured: Iterable[int],
    present: Iterable[int],
    *,
    witness_vote: bool = False,
    disk_owned: bool = False,
    forced: bool = False,
) -> QuorumDecision:
    """Does a partition whose live members are ``present`` have quorum?

    ``present`` outside ``configured`` never counts (an evicted or unknown node
    has no vote). ``witness_vote``: the witness currently gives its vote to
    this partition (only for ``majority+witness``). ``disk_owned``: a member
    holds the quorum disk reservation (only for ``disk``). ``forced``: the
    operator overrode the decision for this partition.
    """
    conf = frozenset(configured)
    votes_nodes = len(conf & frozenset(present))
    total = total_votes(kind, len(conf))
    need = needed_votes(total)
    if kind is QuorumKind.DISK:
        votes = 1 if disk_owned else 0
        why = "holds the quorum disk" if disk_owned else "does not hold the quorum disk"
    elif kind is QuorumKind.MAJORITY_WITNESS:
        votes = votes_nodes + (1 if witness_vote else 0)
        why = (
            f"{votes_nodes} node vote(s)"
            + (" + the witness" if witness_vote else ", no witness vote")
            + f" of {total}"
        )
    else:
        votes = votes_nodes
        why = f"{votes_nodes} of {total} node votes"
    has = votes >= need
    if forced and not has:
        return QuorumDecision(True, votes, need, total, f"FORCED by the operator ({why})")
    return QuorumDecision(has, votes, need, total, why + (f", needs {need}" if not has else ""))


def commit_needed(kind: QuorumKind, configured_nodes: int) -> int:
    """Votes a configuration update must be durable on before it counts as
    committed: a quorum of all votes (for ``majority`` that is the seeds'
    ``(n/2)+1`` of the configured nodes; the witness's vote counts when it
    recorded the update's log position; for ``disk`` the quorum log lives on
    the disk, so the locker alone suffices once the disk write is durable)."""
    return needed_votes(total_votes(kind, configured_nodes))
