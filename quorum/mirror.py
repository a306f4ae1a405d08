"""The witness's second decision (sans-I/O): which mirror of a synchronously
replicated volume may run *alone*, without its peer.

This is the degraded-mirror decision of the ``disk`` quorum. The quorum disk is
a ``sync``, ``on_peer_loss = "suspend"`` volume. While its two mirrors can reach
each other, the primary completes a write only once both hold it, so there is
one sequence of completed writes. When they cannot, writes block, and one of
two things must happen for the cluster to go on:

* the **primary** completes writes without its peer (``allow-degraded``): the
  secondary falls behind;
* the **secondary** becomes primary (a forced promotion): the old primary must
  never complete a write again without it.

The witness grants that right, the *alone ticket*, to at most one mirror at a
time, and never to a mirror that lacks writes another mirror completed alone.
So the completed writes stay one sequence, as if the disk were one disk, and
the arbitration on top of it (quorum/arbitration.py) keeps its guarantees.

Rules (docs/cluster.md, "The witness decides the degraded mirror"):

1. **A lease.** A grant counts for ``lease_s`` from the time the mirror *sent*
   its claim; the witness counts it as held for ``lease_s`` from the time it
   *received* it (later). The holder renews it while it runs alone. Only
   durations cross the wire.
2. **Exclusive.** While the holder's lease runs, every other mirror is refused.
3. **Never an outdated mirror.** From a grant on, the other mirror lacks the
   writes the holder may complete alone. The witness refuses it until the
   *holder* reports, with the current ``epoch``, that its peer is connected
   and in sync again. Only the holder can say so: only it knows what it wrote
   alone. The epoch counts the alone periods; a report from an older period
   (a delayed message) changes nothing.
4. **The primary first.** A free ticket goes to the primary at once. A
   secondary gets it only after it has asked for ``prefer_primary_s`` with no
   claim from a primary in that time, so a cut between the mirrors leaves the
   volume where it was, and only a primary that is really gone is replaced.

A mirror that is refused keeps its writes blocked (fails closed); an operator
can still decide (``geoclus volume allow-degraded``, a forced promotion,
``geoclus witness release-mirror``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PRIMARY = "primary"
SECONDARY = "secondary"


@dataclass(frozen=True, slots=True)
class MirrorClaim:
    """From a mirror to the witness.

    ``alone`` true: the mirror asks for (or renews) the right to run without
    its peer. ``alone`` false: the mirror reports that its peer is connected
    and in sync (it holds every write this mirror completed). ``epoch`` is the
    last epoch the mirror learned from a reply (0 before any)."""

    volume: str
    mirror: str
    role: str
    alone: bool
    epoch: int
    echo: float = 0.0  # opaque to the witness, returned in the reply (the send time)


@dataclass(frozen=True, slots=True)
class MirrorReply:
    """The witness's answer. A grant counts for ``lease_s`` from the claim's
    send time; a refusal has ``lease_s`` 0 and ``retry_s`` says when asking
    again may help (0: not before something changes)."""

    volume: str
    granted: bool
    lease_s: float
    retry_s: float
    epoch: int
    holder: str
    alone: bool  # the holder may have completed writes its peer lacks
    reason: str
    echo: float = 0.0


@dataclass
class MirrorTicket:
    """One volume's ticket at the witness. ``alone``: the holder may have
    completed writes its peer lacks (since epoch ``epoch``)."""

    holder: str = ""
    lease_until: float = 0.0
    epoch: int = 0
    alone: bool = False
    secondary_since: float | None = None  # first secondary claim while free
    primary_seen: float = float("-inf")  # last claim from a primary
    grants: int = 0
    refusals: int = 0


@dataclass
class MirrorArbiter:
    """The witness's tickets, one per volume (at most ``max_volumes``)."""

    lease_s: float
    prefer_primary_s: float
    max_volumes: int = 16
    tickets: dict[str, MirrorTicket] | None = None

    def __post_init__(self) -> None:
        if self.tickets is None:
            self.tickets = {}

    def on_claim(self, c: MirrorClaim, now: float) -> MirrorReply:
        """Decide one claim at witness time ``now``."""
        assert self.tickets is not None
        t = self.tickets.get(c.volume)
        if t is None:
            if len(self.tickets) >= self.max_volumes:
                return _reply(
                    c,
                    MirrorTicket(),
                    False,
                    f"this witness arbitrates at most {self.max_volumes} volumes",
                )
            t = self.tickets[c.volume] = MirrorTicket()
        if c.role not in (PRIMARY, SECONDARY):
            t.refusals += 1
            return _reply(c, t, False, f"role {c.role!r} is neither primary nor secondary")
        if not c.alone:
            if c.mirror == t.holder and c.epoch == t.epoch and t.alone:
                t.alone = False
                return _reply(c, t, False, "in sync again: the other mirror is no longer outdated")
            return _reply(c, t, False, "noted")
        if c.role == PRIMARY:
            t.primary_seen = now
        if t.holder == c.mirror:
            return self._grant(c, t, now)
        if self._lacks_alone_writes(t, c):
            t.refusals += 1
            return _reply(
                c,
                t,
                False,
                f"outdated: {t.holder} may have completed writes alone since epoch {t.epoch}; "
                f"this mirror must resync from it first",
            )
        if now < t.lease_until:
            t.refusals += 1
            return _reply(
                c, t, False, f"held by {t.holder} until its lease ends", retry=t.lease_until - now
            )
        if c.role == SECONDARY:
            if t.secondary_since is None:
                t.secondary_since = now
            waited = now - max(t.secondary_since, t.primary_seen)
            if waited < self.prefer_primary_s:
                return _reply(
                    c,
                    t,
                    False,
                    f"waiting {self.prefer_primary_s:g}s for a claim from the primary",
                    retry=self.prefer_primary_s - waited,
                )
        return self._grant(c, t, now)

    def _lacks_alone_writes(self, t: MirrorTicket, c: MirrorClaim) -> bool:
        """Rule 3: may another mirror (the holder) have completed writes alone?"""
        return t.alone and t.holder != c.mirror

    def _grant(self, c: MirrorClaim, t: MirrorTicket, now: float) -> MirrorReply:
        if t.holder != c.mirror or not t.alone:
            t.epoch += 1  # a new alone period: the other mirror is outdated from here
        t.holder, t.alone = c.mirror, True
        t.lease_until = now + self.lease_s
        t.secondary_since = None
        t.grants += 1
        return _reply(c, t, True, "granted", lease_s=self.lease_s)

    def release(self, volume: str) -> bool:
        """Operator override: forget the volume's holder and its outdated mark
        (the operator has checked which copy is current). False if unknown."""
        assert self.tickets is not None
        t = self.tickets.get(volume)
        if t is None:
            return False
        self.tickets[volume] = MirrorTicket(epoch=t.epoch + 1)
        return True


def _reply(
    c: MirrorClaim,
    t: MirrorTicket,
    granted: bool,
    reason: str,
    *,
    lease_s: float = 0.0,
    retry: float = 0.0,
) -> MirrorReply:
    return MirrorReply(
        c.volume, granted, lease_s, max(0.0, retry), t.epoch, t.holder, t.alone, reason, c.echo
    )


def arbiter_state(a: MirrorArbiter) -> dict[str, Any]:
    """What survives a witness restart: per volume the holder, the epoch and
    the alone mark (durations and claim times are not kept)."""
    assert a.tickets is not None
    return {
        v: {"holder": t.holder, "epoch": t.epoch, "alone": t.alone}
        for v, t in sorted(a.tickets.items())
    }


def restore_arbiter(
    state: dict[str, Any], lease_s: float, prefer_primary_s: float, now: float
) -> MirrorArbiter:
    """The arbiter after a restart at ``now``: a saved holder counts as renewed
    at the restart (its lease runs a full ``lease_s`` again), which can only
    delay another mirror. Raises ValueError naming a malformed entry."""
    a = MirrorArbiter(lease_s, prefer_primary_s)
    assert a.tickets is not None
    for volume, t in state.items():
        holder, epoch, alone = t.get("holder"), t.get("epoch"), t.get("alone")
        if (
            not isinstance(holder, str)
            or not isinstance(epoch, int)
            or isinstance(epoch, bool)
            or epoch < 0
            or not isinstance(alone, bool)
        ):
            raise ValueError(f"mirror ticket of volume {volume!r} is malformed: {t!r}")
        a.tickets[volume] = MirrorTicket(
            holder=holder, lease_until=now + lease_s if holder else 0.0, epoch=epoch, alone=alone
        )
    return a


@dataclass
class MirrorGuard:
    """A mirror's side of the alone ticket (sans-I/O; the volume daemon's
    shell calls :meth:`poll` regularly and :meth:`on_reply` for each reply).

    Guarantees, given the witness's rules: :meth:`alone_allowed` is true only
    within a lease the witness granted, counted from the claim's send time;
    once the mirror is in sync with its peer again it stops counting any lease
    it held (a reply to a claim sent before that is ignored), so the next
    alone period needs a fresh grant and starts a new epoch at the witness;
    and the holder reports the sync, with its epoch, until the witness has
    cleared the other mirror's outdated mark."""

    volume: str
    mirror: str
    renew_s: float
    epoch: int = 0
    lease_until: float = 0.0
    holder: str = ""
    witness_alone: bool = False
    reason: str = ""
    _valid_after: float = float("-inf")
    _last_sent: float = float("-inf")
    _report: bool = False
    replies: int = 0
    grants: int = field(default=0)

    def alone_allowed(self, now: float) -> bool:
        """May this mirror complete writes without its peer at ``now``?"""
        return now < self.lease_until

    @property
    def outdated(self) -> bool:
        """The witness's last word: another mirror may have completed writes alone."""
        return self.witness_alone and self.holder != self.mirror

    def poll(self, now: float, role: str, peer_ok: bool, in_sync: bool) -> MirrorClaim | None:
        """The claim to send at ``now``, if any. ``in_sync``: connected, and
        the peer holds every write this mirror completed. ``peer_ok``: the
        replication link is up (a secondary asks only when it is down)."""
        if in_sync:
            if self.lease_until > 0.0:
                self._end_alone(now)
            if not self._report or now - self._last_sent < self.renew_s:
                return None
            self._last_sent = now
            return MirrorClaim(self.volume, self.mirror, role, False, self.epoch, now)
        if role == SECONDARY and peer_ok:
            return None
        # Renew early enough that a lease never lapses while claims get through.
        if now - self._last_sent < self.renew_s:
            return None
        self._last_sent = now
        return MirrorClaim(self.volume, self.mirror, role, True, self.epoch, now)

    def _end_alone(self, now: float) -> None:
        """In sync again: stop counting the lease, ignore replies to earlier
        claims, and report the sync to the witness at once."""
        self.lease_until = 0.0
        self._valid_after = now
        self._report = True
        self._last_sent = float("-inf")

    def on_reply(self, r: MirrorReply) -> None:
        """Take the witness's reply into account."""
        if r.volume != self.volume or r.echo < self._valid_after:
            return  # another volume's, or about a claim sent before the sync
        self.replies += 1
        self.epoch = max(self.epoch, r.epoch)
        self.holder, self.witness_alone, self.reason = r.holder, r.alone, r.reason
        if r.granted:
            self.grants += 1
            self.lease_until = max(self.lease_until, r.echo + r.lease_s)
        if not (r.holder == self.mirror and r.alone):
            self._report = False

    def retry_soon(self) -> None:
        """Send the next claim at the next poll (a refusal said when)."""
        self._last_sent = float("-inf")
