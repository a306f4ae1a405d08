"""Quorum-disk arbitration by challenge and defense (sans-I/O).

The quorum disk is a small synchronously mirrored volume (one mirror per
site) holding the reservation record ``(owner, ballot, counter)``. Every
read and write must reach **both** mirrors; an operation that cannot is a
failure (*fail closed*): with every inter-site link cut nobody can renew or
take the disk, so the owner's hold runs out and nobody acts until the witness
or an operator decides. This is how the SCSI reservation's guarantee ("if a
node at site A holds it, nodes at site B cannot use it") survives the
mirroring.

:class:`Arbiter` is one node's state machine. It asks for :class:`ReadDisk`
and :class:`WriteDisk` operations and is told their results with their start
time; it never reads a clock.

* **Owner (defense).** The owner writes its record again every
  ``renew_interval_s``, without reading first: a challenger's claim is simply
  overwritten. It owns the disk until ``hold_s`` after the *start* of its last
  successful write.
* **Challenger.** Reads the record. If another node's record is there, it
  waits ``min_arbitration_s`` and reads again: a changed record means the
  owner defended, and the challenger backs off. Otherwise (or if the disk
  is free) it writes its claim (a higher ballot), waits ``settle_s`` and
  reads: if its claim still stands, no owner renewed in between, so any
  previous owner's hold has run out (``settle_s >= hold_s``); it renews at
  once and owns the disk from the start of that write. An arbitration that has not succeeded within
  ``max_arbitration_s`` gives up (another node may try).

Safety: an owner renews every ``renew_interval_s``, and a renewal that
started before the challenger's claim but completed after it would show in
the challenger's second read; so a challenger only wins after every previous
owner's hold has ended. :func:`check_timers` refuses timers that break that
argument.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Reservation:
    """The record on the disk (``owner`` -1: free)."""

    ballot: int
    owner: int
    counter: int


FREE = Reservation(0, -1, 0)


@dataclass(frozen=True, slots=True)
class ArbitrationTimers:
    renew_interval_s: float = 2.0
    hold_s: float = 6.0
    min_arbitration_s: float = 7.0
    max_arbitration_s: float = 60.0
    max_io_s: float = 1.0  # a disk operation slower than this counts as failed

    @property
    def settle_s(self) -> float:
        return self.hold_s + self.max_io_s


def check_timers(t: ArbitrationTimers) -> None:
    """Raise ValueError naming the rule a set of timers breaks."""
    if not t.renew_interval_s + t.max_io_s < t.hold_s:
        raise ValueError(
            "renew_interval_s + max_io_s must be below hold_s, or a live owner "
            "could lose the disk between two renewals"
        )
    if not t.min_arbitration_s >= t.hold_s:
        raise ValueError("min_arbitration_s must be at least hold_s (a defense must be seen)")
    if not t.max_arbitration_s > t.min_arbitration_s + t.settle_s:
        raise ValueError("max_arbitration_s must leave room for a challenge and its settle wait")


@dataclass(frozen=True, slots=True)
class ReadDisk:
    tag: str


@dataclass(frozen=True, slots=True)
class WriteDisk:
    tag: str
    record: Reservation


class Phase(enum.Enum):
    IDLE = "idle"
    OWNER = "owner"
    CHALLENGE_READ = "challenge-read"
    CHALLENGE_WAIT = "challenge-wait"
    CLAIM_WRITE = "claim-write"
    SETTLE_WAIT = "settle-wait"
    SETTLE_READ = "settle-read"


class Arbiter:
    """One node's quorum-disk arbitration; see the module docstring."""

    def __init__(self, node: int, timers: ArbitrationTimers | None = None) -> None:
        self.node = node
        self.t = timers or ArbitrationTimers()
        check_timers(self.t)
        self.phase = Phase.IDLE
        self._busy = False  # an operation is outstanding
        self._started = 0.0  # arbitration start
        self._wake = 0.0
        self._seen: Reservation | None = None
        self._claim: Reservation | None = None
        self._held_from = -1.0  # start of the last successful owner write
        self._won_at = 0.0
        self._counter = 0
        self.gave_up = 0
        self.last_error = ""
        self.defended_by: int | None = None  # who held the disk when we last gave up

    @property
    def busy(self) -> bool:
        """An operation is outstanding (its result has not been fed back)."""
        return self._busy

    def held_until(self, now: float) -> float:
        """Until when this node owns the disk (``now`` or earlier: it does not)."""
        if not self.owns(now):
            return now
        return self._held_from + self.t.hold_s

    def owns(self, now: float) -> bool:
        """True while this node may act as the disk's owner: from the start of
        its first successful renewal after winning, until ``hold_s`` after the
        start of its latest one."""
        return (
            self.phase is Phase.OWNER
            and self._held_from >= self._won_at
            and now < self._held_from + self.t.hold_s
        )

    def arbitrate(self, now: float) -> list[ReadDisk | WriteDisk]:
        """Start an arbitration (a node that needs quorum and lacks it)."""
        if self.phase is not Phase.IDLE or self._busy:
            return []
        self.phase = Phase.CHALLENGE_READ
        self._started = now
        self._busy = True
        self.defended_by = None
        return [ReadDisk("challenge")]

    def release(self) -> None:
        """Stop defending (planned shutdown); the record lapses after hold_s."""
        self.phase = Phase.IDLE

    def on_tick(self, now: float) -> list[ReadDisk | WriteDisk]:
        if self._busy:
            return []
        if self.phase is Phase.OWNER:
            if now >= max(self._held_from, self._won_at) + self.t.hold_s:
                self.phase = Phase.IDLE  # could not renew in time: fail closed
                self.last_error = "hold expired: renewals did not reach both mirrors"
                return []
            if now >= self._wake:
                return self._renew(now)
            return []
        if self.phase in (Phase.CHALLENGE_WAIT, Phase.SETTLE_WAIT) and now >= self._wake:
            if now - self._started > self.t.max_arbitration_s:
                return self._give_up("arbitration took longer than max_arbitration_s")
            self._busy = True
            if self.phase is Phase.CHALLENGE_WAIT:
                self.phase = Phase.CHALLENGE_READ
                return [ReadDisk("recheck")]
            self.phase = Phase.SETTLE_READ
            return [ReadDisk("settle")]
        return []

    def next_deadline(self) -> float | None:
        if self._busy or self.phase is Phase.IDLE:
            return None
        if self.phase is Phase.OWNER:
            return min(self._wake, self._held_from + self.t.hold_s)
        return self._wake

    def _renew(self, now: float) -> list[ReadDisk | WriteDisk]:
        self._counter += 1
        ballot = self._claim.ballot if self._claim else 1
        self._claim = Reservation(ballot, self.node, self._counter)
        self._busy = True
        return [WriteDisk("renew", self._claim)]

    def _give_up(self, why: str, holder: int | None = None) -> list[ReadDisk | WriteDisk]:
        self.defended_by = holder
        self.phase = Phase.IDLE
        self._busy = False
        self.gave_up += 1
        self.last_error = why
        return []

    def on_read(
        self, tag: str, record: Reservation | None, started: float, now: float
    ) -> list[ReadDisk | WriteDisk]:
        """A read finished (``record`` None: it failed, e.g. a mirror unreachable)."""
        self._busy = False
        if record is None or now - started > self.t.max_io_s:
            return self._give_up(f"{tag} read failed: the quorum disk needs both mirrors")
        if self.phase is Phase.CHALLENGE_READ:
            if record.owner in (-1, self.node) or (
                self._seen is not None and record == self._seen and tag == "recheck"
            ):
                return self._write_claim(record)
            if tag == "recheck":
                # the owner renewed while we waited: it defended
                self._seen = None
                return self._give_up(f"node {record.owner} defended the disk", record.owner)
            self._seen = record
            self.phase = Phase.CHALLENGE_WAIT
            self._wake = now + self.t.min_arbitration_s
            return []
        if self.phase is Phase.SETTLE_READ:
            if record == self._claim:
                # Won: no owner renewed for settle_s, so every earlier hold has
                # ended. The hold starts with the next write (at once).
                self.phase = Phase.OWNER
                self._won_at = now
                self._wake = now
                return self.on_tick(now)
            return self._give_up(f"node {record.owner} holds the disk", record.owner)
        return []

    def _write_claim(self, seen: Reservation) -> list[ReadDisk | WriteDisk]:
        self._counter += 1
        self._claim = Reservation(seen.ballot + 1, self.node, self._counter)
        self.phase = Phase.CLAIM_WRITE
        self._busy = True
        return [WriteDisk("claim", self._claim)]

    def on_write(
        self, tag: str, ok: bool, started: float, now: float
    ) -> list[ReadDisk | WriteDisk]:
        """A write finished (``ok`` False: it did not reach both mirrors)."""
        self._busy = False
        slow = now - started > self.t.max_io_s
        if tag == "renew":
            if ok and not slow and self.phase is Phase.OWNER:
                self._held_from = max(self._held_from, started)
            self._wake = now + self.t.renew_interval_s
            return self.on_tick(now)
        if tag == "claim" and self.phase is Phase.CLAIM_WRITE:
            if not ok or slow:
                return self._give_up("claim write failed: the quorum disk needs both mirrors")
            self.phase = Phase.SETTLE_WAIT
            self._wake = now + self.t.settle_s
        return []
