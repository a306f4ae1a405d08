"""quorum/votes.py: the quorum decision table, and the property that makes it
safe: two disjoint partitions never both have quorum (the witness votes for at
most one of them)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quorum.votes import QuorumKind, commit_needed, decide, needed_votes, total_votes


@pytest.mark.parametrize(
    ("kind", "nodes", "present", "witness", "expected"),
    [
        # majority node set: more than half of the configured nodes
        (QuorumKind.MAJORITY, 3, {0, 1}, False, True),
        (QuorumKind.MAJORITY, 3, {2}, False, False),
        (QuorumKind.MAJORITY, 4, {0, 1}, False, False),  # exactly half is not enough
        (QuorumKind.MAJORITY, 4, {0, 1, 2}, False, True),
        (QuorumKind.MAJORITY, 2, {0}, False, False),  # two nodes cannot lose one
        (QuorumKind.MAJORITY, 5, {0, 1, 2}, False, True),
        # the witness breaks the tie of equal halves
        (QuorumKind.MAJORITY_WITNESS, 2, {0}, True, True),
        (QuorumKind.MAJORITY_WITNESS, 2, {1}, False, False),
        (QuorumKind.MAJORITY_WITNESS, 4, {0, 1}, True, True),
        (QuorumKind.MAJORITY_WITNESS, 4, {2, 3}, False, False),
        (QuorumKind.MAJORITY_WITNESS, 4, {0, 1, 2}, False, True),
        (QuorumKind.MAJORITY_WITNESS, 4, {0}, True, False),
    ],
)
def test_decision_table(
    kind: QuorumKind, nodes: int, present: set[int], witness: bool, expected: bool
) -> None:
    d = decide(kind, range(nodes), present, witness_vote=witness)
    assert d.has_quorum is expected
    assert d.total == total_votes(kind, nodes)
    assert d.needed == d.total // 2 + 1
    assert (d.votes >= d.needed) is expected


def test_unknown_nodes_have_no_vote_and_force_is_recorded() -> None:
    assert not decide(QuorumKind.MAJORITY, [0, 1, 2], {0, 7, 8}).has_quorum
    forced = decide(QuorumKind.MAJORITY, [0, 1], {0}, forced=True)
    assert forced.has_quorum and "FORCED" in forced.reason
    disk = decide(QuorumKind.DISK, [0, 1], {1}, disk_owned=True)
    assert disk.has_quorum and not decide(QuorumKind.DISK, [0, 1], {0, 1}).has_quorum


def test_commit_needs_the_seeds_majority() -> None:
    # (n/2)+1 of the configured nodes for majority node set
    assert [commit_needed(QuorumKind.MAJORITY, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert commit_needed(QuorumKind.MAJORITY_WITNESS, 2) == 2
    with pytest.raises(ValueError):
        needed_votes(0)


@given(
    n=st.integers(1, 9),
    kind=st.sampled_from([QuorumKind.MAJORITY, QuorumKind.MAJORITY_WITNESS]),
    data=st.data(),
)
def test_two_disjoint_partitions_never_both_have_quorum(
    n: int, kind: QuorumKind, data: st.DataObject
) -> None:
    side = data.draw(st.sets(st.integers(0, n - 1)))
    other = set(range(n)) - side
    witness_to_side = data.draw(st.booleans())  # the witness votes for one side at most
    a = decide(kind, range(n), side, witness_vote=witness_to_side)
    b = decide(kind, range(n), other, witness_vote=not witness_to_side)
    assert not (a.has_quorum and b.has_quorum)
