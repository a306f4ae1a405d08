"""The third-site witness's decision core (sans-I/O): one vote, given to at most
one partition at a time.

A view coordinator asks for the vote with a :class:`VoteRequest` (its view,
the view's members, and the best configuration-log position the view holds)
and renews it every heartbeat; the witness answers with a :class:`VoteReply`.

Rules (docs/cluster.md, "Witness"):

1. A grant is a lease: the requester counts the vote for ``lease_s`` from the
   time it *sent* the request; the witness counts it as held for ``lease_s``
   from the time it *received* it (later, so the witness never frees a vote the
   holder may still count). It is renewed only for the view that holds it.
   Only durations cross the wire, never timestamps, so clock offsets between
   sites do not matter (rate drift is covered by ``lease_s`` margins).
2. **Sticky.** While a grant is valid, another view gets the vote only if it
   *succeeds* the holder: a higher view that contains the holder's
   coordinator (the same partition regrouping, or the healed cluster). A view
   of the other side of a partition is refused until the holder's lease has
   run out, so a partition that heals does not move the vote.
3. **Deterministic ties.** When the vote is free, requests are collected for
   ``collect_s`` from the first one; the best then wins: more members, then
   the lowest node id among the members. A request that is not the best is
   refused, naming the winner.
4. **Hand-over fence.** A grant to a view other than the previous holder
   carries ``wait_s``, the rest of the previous holder's lease in witness time:
   the new holder does not act before ``wait_s`` after it received the reply,
   so never while the old one may still count the vote.
5. **Log guard.** The witness records the log position the holder reports
   (it counts as one vote towards committing configuration updates). A view
   whose best log is behind the recorded position is refused: it lacks updates
   that were committed with the witness's vote, and granting would lose them.
   Only an operator (force-quorum) can override that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A log position: (the view the log was last installed in, its length).
LogPos = tuple[tuple[int, int], int]
View = tuple[int, int]  # (counter, coordinator): totally ordered, unique per coordinator


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """A coordinator asks for (or renews) the vote for ``view``."""

    view: View
    members: frozenset[int]
    log_pos: LogPos
    record: bool = False  # also record ``log_pos`` (the view needs the witness to commit)
    echo: float = 0.0  # opaque to the witness, returned in the reply (the sender's send time)


@dataclass(frozen=True, slots=True)
class VoteReply:
    """The witness's answer: the vote for ``view`` counts for ``lease_s`` from
    the request's send time, and not before ``wait_s`` after this reply
    arrives. A refusal has ``lease_s`` 0; its ``wait_s`` is 0 for a no, and
    for "collecting requests" it says when to ask again (the witness decides
    only on a request that arrives after its collect window)."""

    view: View
    granted: bool
    lease_s: float
    wait_s: float
    recorded: LogPos
    reason: str
    echo: float = 0.0


@dataclass
class _Holder:
    view: View
    members: frozenset[int]
    lease_until: float
    act_from: float = 0.0  # witness time before which this holder must not count the vote


@dataclass
class WitnessCore:
    """The witness's state; persisted by the shell after every change
    (``state_dict``) so a restarted witness keeps its guard and holder."""

    lease_s: float
    collect_s: float
    holder: _Holder | None = None
    recorded: LogPos = ((0, 0), 0)
    highest_view: View = (0, 0)
    _pending: dict[View, tuple[VoteRequest, float]] = field(default_factory=dict)
    _collect_until: float | None = None
    grants: int = 0
    refusals: int = 0

    def on_request(self, req: VoteRequest, now: float) -> VoteReply:
        """Decide one request at witness time ``now``."""
        h = self.holder
        if h is not None and req.view == h.view:
            return self._grant(req, now, handover_from=None)
        if req.view < self.highest_view:
            return self._refuse(req, f"view {req.view} is older than {self.highest_view}")
        if req.log_pos < self.recorded:
            return self._refuse(
                req,
                f"its configuration log {req.log_pos} is behind {self.recorded}, which "
                "was committed with the witness's vote",
            )
        if h is not None and now < h.lease_until:
            if h.view[1] in req.members and req.view > h.view:
                return self._grant(req, now, handover_from=h)
            return self._refuse(
                req,
                f"held by view {h.view} (members {sorted(h.members)}) until its lease ends",
            )
        # The vote is free: collect competing requests briefly, then pick the best.
        self._pending = {
            v: (r, t) for v, (r, t) in self._pending.items() if now - t <= self.collect_s * 2
        }
        self._pending[req.view] = (req, now)
        if self._collect_until is None or now > self._collect_until + self.collect_s:
            self._collect_until = now + self.collect_s
        if now < self._collect_until:
            return self._refuse(req, "collecting requests before deciding", wait=True, now=now)
        best = min(
            (r for r, _ in self._pending.values()),
            key=lambda r: (-len(r.members), min(r.members, default=1 << 30), r.view),
        )
        if best.view != req.view:
            return self._refuse(req, f"view {best.view} with {sorted(best.members)} is preferred")
        self._pending.clear()
        self._collect_until = None
        return self._grant(req, now, handover_from=h)

    def _grant(self, req: VoteRequest, now: float, handover_from: _Holder | None) -> VoteReply:
        if self.holder is None or self.holder.view != req.view:
            act_from = now
            if handover_from is not None:
                act_from = max(now, handover_from.lease_until)
            self.holder = _Holder(req.view, req.members, now + self.lease_s, act_from)
        else:
            self.holder.lease_until = now + self.lease_s
        wait_s = max(0.0, self.holder.act_from - now)  # renewals keep the hand-over wait
        self.highest_view = max(self.highest_view, req.view)
        if req.record and req.log_pos > self.recorded:
            self.recorded = req.log_pos
        self.grants += 1
        return VoteReply(req.view, True, self.lease_s, wait_s, self.recorded, "granted", req.echo)

    def _refuse(
        self, req: VoteRequest, reason: str, wait: bool = False, now: float = 0.0
    ) -> VoteReply:
        retry_s = 0.0
        if wait:
            # Not a no: ask again once the collect window has closed.
            assert self._collect_until is not None
            retry_s = max(0.0, self._collect_until - now) + self.collect_s / 10
        else:
            self.refusals += 1
        return VoteReply(req.view, False, 0.0, retry_s, self.recorded, reason, req.echo)

    def force_release(self) -> None:
        """Operator override: forget the holder (the next request may win)."""
        self.holder = None
