"""quorum/witness.py: one vote, to at most one view at a time; sticky to the
active partition; deterministic ties; a hand-over wait; the log guard."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quorum.witness import VoteRequest, WitnessCore

LEASE = 10.0
COLLECT = 1.0


def req(view, members, pos=((0, 0), 0), record=False) -> VoteRequest:
    return VoteRequest(view, frozenset(members), pos, record=record)


def grant_after_collect(w: WitnessCore, r: VoteRequest, now: float):
    first = w.on_request(r, now)
    assert not first.granted and "collecting" in first.reason
    return w.on_request(r, now + COLLECT)


def test_free_vote_goes_to_the_best_request_after_collecting() -> None:
    w = WitnessCore(LEASE, COLLECT)
    small = req((1, 3), {3})
    big = req((1, 0), {0, 1})
    assert not w.on_request(small, 0.0).granted
    assert not w.on_request(big, 0.2).granted
    late_small = w.on_request(small, 1.1)
    assert not late_small.granted and "(1, 0)" in late_small.reason  # names the winner
    won = w.on_request(big, 1.2)
    assert won.granted and won.lease_s == LEASE and won.wait_s == 0.0


def test_sticky_while_the_lease_runs_and_successors_take_over_with_a_wait() -> None:
    w = WitnessCore(LEASE, COLLECT)
    assert grant_after_collect(w, req((1, 0), {0, 1}), 0.0).granted
    # the other side of a partition is refused while the holder renews
    other = w.on_request(req((2, 2), {2, 3}), 3.0)
    assert not other.granted and "held by view (1, 0)" in other.reason
    assert w.on_request(req((1, 0), {0, 1}), 4.0).granted  # renewal
    assert not w.on_request(req((3, 2), {2, 3}), 13.0).granted  # lease from 4.0 runs to 14
    # the holder's own partition regrouping (contains its coordinator) succeeds it,
    # but must wait for the rest of the old lease
    succ = w.on_request(req((4, 1), {0, 1, 2}), 5.0)
    assert succ.granted and succ.wait_s == 9.0


def test_after_the_lease_runs_out_the_other_side_may_win() -> None:
    w = WitnessCore(LEASE, COLLECT)
    grant_after_collect(w, req((1, 0), {0, 1}), 0.0)
    r = req((2, 2), {2, 3})
    assert "held by" in w.on_request(r, 10.5).reason  # the lease runs to 11.0
    assert "collecting" in w.on_request(r, 11.1).reason
    assert w.on_request(r, 12.1).granted


def test_log_guard_refuses_a_view_that_lacks_what_the_witness_recorded() -> None:
    w = WitnessCore(LEASE, COLLECT)
    grant_after_collect(w, req((1, 0), {0}, pos=((1, 0), 5), record=True), 0.0)
    assert w.recorded == ((1, 0), 5)
    stale = w.on_request(req((2, 1), {1}, pos=((1, 0), 4)), 20.0)
    assert not stale.granted and "behind" in stale.reason
    assert not w.on_request(req((3, 1), {1}, pos=((1, 0), 5)), 20.0).granted  # collecting
    assert w.on_request(req((3, 1), {1}, pos=((1, 0), 5)), 21.0).granted


def test_older_views_are_refused() -> None:
    w = WitnessCore(LEASE, COLLECT)
    grant_after_collect(w, req((5, 0), {0, 1}), 0.0)
    assert not w.on_request(req((4, 2), {2, 3}), 30.0).granted


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 6),  # view counter
            st.sampled_from([frozenset({0, 1}), frozenset({2, 3}), frozenset({0, 1, 2})]),
            st.floats(0, 4),  # time step
        ),
        max_size=40,
    )
)
def test_at_most_one_view_holds_the_vote_at_any_time(steps) -> None:
    """Whatever the requests, the witness-time intervals in which different
    views may count the vote never overlap (a grant's wait covers the rest of
    the previous holder's lease)."""
    w = WitnessCore(LEASE, COLLECT)
    now = 0.0
    intervals: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for counter, members, dt in steps:
        now += dt
        view = (counter, min(members))
        reply = w.on_request(req(view, members), now)
        if reply.granted:
            intervals.setdefault(view, []).append((now + reply.wait_s, now + reply.lease_s))
    spans = [
        (start, end, view) for view, ivs in intervals.items() for start, end in ivs if end > start
    ]
    for i, (s1, e1, v1) in enumerate(spans):
        for s2, e2, v2 in spans[i + 1 :]:
            if v1 != v2:
                assert e1 <= s2 + 1e-9 or e2 <= s1 + 1e-9, (
                    f"{v1} [{s1}, {e1}) and {v2} [{s2}, {e2})"
                )


def test_a_lone_requester_told_to_wait_is_granted_when_it_asks_again() -> None:
    """ "Collecting" is not a no: the reply says when to ask again, and a
    request at that time wins (a coordinator that only retried on its own
    back-off, seconds apart, would start a new window every time)."""
    w = WitnessCore(LEASE, COLLECT)
    r = req((4, 1), {1, 2})
    first = w.on_request(r, 100.0)
    assert not first.granted and first.wait_s > 0
    assert w.refusals == 0  # not counted as a refusal
    again = w.on_request(r, 100.0 + first.wait_s)
    assert again.granted
    # Retrying only on a slow back-off (past the next window) never wins.
    slow = WitnessCore(LEASE, COLLECT)
    t = 0.0
    for _ in range(5):
        assert not slow.on_request(r, t).granted
        t += COLLECT * 3
