"""quorum/mirror.py: the witness decides which mirror of the quorum volume may
run alone. Unit tests of the arbiter's rules, then a rule-based model of two
mirrors, a witness and lossy, delaying links, checking that completed writes
stay one sequence whatever the cuts, crashes and restarts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from quorum.mirror import (
    PRIMARY,
    SECONDARY,
    MirrorArbiter,
    MirrorClaim,
    MirrorGuard,
    arbiter_state,
    restore_arbiter,
)

LEASE = 3.0
PREFER = 2.0


def claim(m, role=PRIMARY, alone=True, epoch=0, echo=0.0) -> MirrorClaim:
    return MirrorClaim("quorum", m, role, alone, epoch, echo)


def test_the_primary_gets_a_free_ticket_at_once_and_renews_it() -> None:
    a = MirrorArbiter(LEASE, PREFER)
    r = a.on_claim(claim("A"), 0.0)
    assert r.granted and r.lease_s == LEASE and r.holder == "A" and r.alone and r.epoch == 1
    assert a.on_claim(claim("A", epoch=1), 2.0).granted
    assert a.tickets["quorum"].epoch == 1  # a renewal is the same alone period


def test_the_secondary_waits_for_the_primary_and_never_takes_an_outdated_copy() -> None:
    a = MirrorArbiter(LEASE, PREFER)
    first = a.on_claim(claim("B", SECONDARY), 0.0)
    assert not first.granted and "waiting" in first.reason and first.retry_s == PREFER
    # the primary claims meanwhile: it wins; the secondary is now outdated
    assert a.on_claim(claim("A"), 1.0).granted
    late = a.on_claim(claim("B", SECONDARY), 9.0)  # even after A's lease ran out
    assert not late.granted and late.alone and late.holder == "A" and "outdated" in late.reason


def test_a_secondary_takes_over_a_primary_that_never_claimed() -> None:
    a = MirrorArbiter(LEASE, PREFER)
    assert not a.on_claim(claim("B", SECONDARY), 0.0).granted
    assert not a.on_claim(claim("B", SECONDARY), 1.9).granted
    r = a.on_claim(claim("B", SECONDARY), 2.0)
    assert r.granted and r.holder == "B" and r.epoch == 1
    # the old primary, back, is refused: B may have written alone
    back = a.on_claim(claim("A"), 2.5)
    assert not back.granted and "outdated" in back.reason


def test_only_the_holders_report_with_the_current_epoch_clears_the_outdated_mark() -> None:
    a = MirrorArbiter(LEASE, PREFER)
    assert a.on_claim(claim("A"), 0.0).epoch == 1
    # the outdated mirror cannot clear its own mark, nor can an old report
    assert not a.on_claim(claim("B", SECONDARY, alone=False, epoch=1), 1.0).granted
    assert a.tickets["quorum"].alone
    a.on_claim(claim("A", alone=False, epoch=0), 1.5)
    assert a.tickets["quorum"].alone
    r = a.on_claim(claim("A", alone=False, epoch=1), 2.0)
    assert not r.alone and "in sync again" in r.reason
    # B may now have it, but only once A's lease (from its last grant) is over
    held = a.on_claim(claim("B", SECONDARY), 2.5)
    assert not held.granted and "held by A" in held.reason and held.retry_s == pytest.approx(0.5)
    assert not a.on_claim(claim("B", SECONDARY), 3.5).granted  # the primary preference
    r = a.on_claim(claim("B", SECONDARY), 5.5)
    assert r.granted and r.epoch == 2


def test_restart_keeps_holder_epoch_and_mark_and_renews_the_lease() -> None:
    a = MirrorArbiter(LEASE, PREFER)
    a.on_claim(claim("A"), 0.0)
    saved = arbiter_state(a)
    b = restore_arbiter(saved, LEASE, PREFER, now=100.0)
    assert not b.on_claim(claim("B", SECONDARY), 102.9).granted  # lease counted from 100
    assert b.on_claim(claim("A", epoch=1), 101.0).epoch == 1
    with pytest.raises(ValueError, match="malformed"):
        restore_arbiter({"quorum": {"holder": "A", "epoch": -1, "alone": True}}, 1, 1, 0)


def test_bounded_volumes_and_roles_are_checked() -> None:
    a = MirrorArbiter(LEASE, PREFER, max_volumes=1)
    a.on_claim(claim("A"), 0.0)
    r = a.on_claim(MirrorClaim("other", "A", PRIMARY, True, 0), 0.0)
    assert not r.granted and "at most 1 volumes" in r.reason
    r = a.on_claim(MirrorClaim("quorum", "A", "boss", True, 0), 0.0)
    assert not r.granted and "neither primary nor secondary" in r.reason


def test_the_guard_drops_its_lease_at_sync_and_ignores_replies_to_older_claims() -> None:
    g = MirrorGuard("quorum", "A", renew_s=1.0)
    c = g.poll(0.0, PRIMARY, peer_ok=False, in_sync=False)
    assert c is not None and c.alone
    assert g.poll(0.5, PRIMARY, peer_ok=False, in_sync=False) is None  # not before renew_s
    c2 = g.poll(1.0, PRIMARY, peer_ok=False, in_sync=False)
    a = MirrorArbiter(LEASE, PREFER)
    g.on_reply(a.on_claim(c, 0.1))
    assert g.alone_allowed(2.9) and not g.alone_allowed(3.0)  # from the send time
    report = g.poll(1.5, PRIMARY, peer_ok=True, in_sync=True)
    assert not g.alone_allowed(1.5)
    assert report is not None and not report.alone and report.epoch == 1
    g.on_reply(a.on_claim(c2, 1.6))  # a grant for a claim sent before the sync
    assert not g.alone_allowed(1.7)
    g.on_reply(a.on_claim(report, 1.7))
    assert not a.tickets["quorum"].alone
    assert g.poll(5.0, PRIMARY, peer_ok=True, in_sync=True) is None  # reported
    assert g.poll(5.0, SECONDARY, peer_ok=True, in_sync=False) is None


# --- the model ---------------------------------------------------------------------


@dataclass
class Mirror:
    name: str
    role: str
    guard: MirrorGuard
    data: list[int] = field(default_factory=list)
    up: bool = True
    promoted: int = 0


class MirrorTicketMachine(RuleBasedStateMachine):
    """Two mirrors A (primary) and B (secondary), the witness, and their links.

    Every message between a mirror and the witness is delayed (0 to 2 s, now
    and then longer than a lease) or lost, in order per direction as on one
    TLS connection. The replication link between the mirrors is cut and
    healed; mirrors crash (stop, keep their data) and come back; the witness
    restarts from its saved state. Each mirror runs :class:`MirrorGuard` like
    the volume daemon does: a primary runs alone while its lease holds, a
    secondary with a grant promotes itself, a primary told that it is outdated
    demotes itself. Writes complete replicated (both copies, in sync) or alone
    (the writer's copy, within a lease).

    Checked at every write: the writer holds every write completed so far
    (completed writes are one sequence, none lost); at every instant: at most
    one mirror may complete writes alone."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.completed: list[int] = []
        self.in_flight: list[tuple[float, int, str, object]] = []  # (at, seq, to, msg)
        self.last_at: dict[str, float] = {}
        self.link_up = True
        self.witness_cut: set[str] = set()
        self.seq = 0
        self.witness_up = True
        self.arbiter = MirrorArbiter(LEASE, PREFER)
        self.saved = arbiter_state(self.arbiter)
        self.m: dict[str, Mirror] = {}
        self.rng = random.Random(0)

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        self.rng = random.Random(seed)
        for name, role in (("A", PRIMARY), ("B", SECONDARY)):
            self.m[name] = Mirror(name, role, MirrorGuard("quorum", name, renew_s=LEASE / 3))

    # --- plumbing ------------------------------------------------------------------

    def _send(self, frm: str, to: str, msg: object) -> None:
        if frm in self.witness_cut or to in self.witness_cut:
            return
        if self.rng.random() < 0.05:
            return
        delay = self.rng.uniform(0.0, 0.5) if self.rng.random() < 0.9 else self.rng.uniform(0, 4)
        channel = f"{frm}>{to}"
        at = max(self.now + delay, self.last_at.get(channel, 0.0))
        self.last_at[channel] = at
        self.seq += 1
        self.in_flight.append((at, self.seq, to, msg))

    def _other(self, name: str) -> Mirror:
        return self.m["B" if name == "A" else "A"]

    def _replicating(self, mirror: Mirror) -> bool:
        """Both up, the link up, one primary and one secondary."""
        other = self._other(mirror.name)
        return (
            self.link_up
            and mirror.up
            and other.up
            and {mirror.role, other.role}
            == {
                PRIMARY,
                SECONDARY,
            }
        )

    def _in_sync(self, mirror: Mirror) -> bool:
        return self._replicating(mirror) and mirror.data == self._other(mirror.name).data

    def _poll(self, mirror: Mirror) -> None:
        if not mirror.up:
            return
        g = mirror.guard
        c = g.poll(self.now, mirror.role, self._replicating(mirror), self._in_sync(mirror))
        if c is not None:
            self._send(mirror.name, "W", c)
        if mirror.role == SECONDARY and g.alone_allowed(self.now):
            mirror.role = PRIMARY  # a forced promotion under the witness's grant
            mirror.promoted += 1
        if mirror.role == PRIMARY and g.outdated and not g.alone_allowed(self.now):
            mirror.role = SECONDARY  # the other mirror holds the ticket: demote

    def _deliver(self, to: str, msg: object) -> None:
        if to == "W":
            if not self.witness_up:
                return
            assert isinstance(msg, MirrorClaim)
            reply = self.arbiter.on_claim(msg, self.now)
            self.saved = arbiter_state(self.arbiter)  # durable before the reply leaves
            self._send("W", msg.mirror, reply)
        else:
            mirror = self.m[to]
            if mirror.up:
                mirror.guard.on_reply(msg)  # type: ignore[arg-type]

    def _resync(self) -> None:
        for mirror in self.m.values():
            if mirror.role == PRIMARY and self._replicating(mirror):
                self._other(mirror.name).data = list(mirror.data)

    # --- rules ---------------------------------------------------------------------

    @rule(dt=st.floats(0.01, 3.0))
    def advance(self, dt: float) -> None:
        end = self.now + dt
        while True:
            due = [x for x in self.in_flight if x[0] <= end]
            step = min(due)[0] if due else end
            step = min(step, self.now + 0.25)
            self.now = max(self.now, step)
            for x in sorted(x for x in self.in_flight if x[0] <= self.now):
                self.in_flight.remove(x)
                self._deliver(x[2], x[3])
            for mirror in self.m.values():
                self._poll(mirror)
            self._one_alone()
            if self.now >= end:
                return

    @rule()
    def wait_out_a_lease(self) -> None:
        """Long enough for a lease and the primary preference to run out."""
        self.advance(LEASE + PREFER + 0.1)

    @rule(name=st.sampled_from("AB"))
    def write(self, name: str) -> None:
        mirror = self.m[name]
        if not mirror.up or mirror.role != PRIMARY:
            return
        w = len(self.completed) + 1
        if self._in_sync(mirror):
            assert mirror.data == self.completed, (name, mirror.data, self.completed)
            mirror.data.append(w)
            self._other(name).data.append(w)
        elif mirror.guard.alone_allowed(self.now):
            assert mirror.data == self.completed, (
                f"{name} completes write {w} alone without writes "
                f"{sorted(set(self.completed) - set(mirror.data))}"
            )
            mirror.data.append(w)
        else:
            return
        self.completed.append(w)

    @rule()
    def resync(self) -> None:
        self._resync()

    @rule()
    def cut_link(self) -> None:
        self.link_up = False

    @rule()
    def heal_link(self) -> None:
        self.link_up = True

    @rule(name=st.sampled_from("AB"))
    def cut_from_witness(self, name: str) -> None:
        self.witness_cut.add(name)

    @rule()
    def heal_witness_links(self) -> None:
        self.witness_cut.clear()

    @rule(name=st.sampled_from("AB"))
    def crash(self, name: str) -> None:
        """The mirror stops; its guard's lease is lost with it (the daemon
        does not keep leases across a restart)."""
        mirror = self.m[name]
        mirror.up = False
        mirror.guard = MirrorGuard("quorum", name, renew_s=LEASE / 3)

    @rule(name=st.sampled_from("AB"))
    def restart(self, name: str) -> None:
        self.m[name].up = True

    @rule()
    def restart_witness(self) -> None:
        self.arbiter = restore_arbiter(self.saved, LEASE, PREFER, self.now)
        self.in_flight = [x for x in self.in_flight if x[2] != "W"]

    # --- checks --------------------------------------------------------------------

    @invariant()
    def _one_alone(self) -> None:
        alone = [n for n, x in self.m.items() if x.up and x.guard.alone_allowed(self.now)]
        assert len(alone) <= 1, f"{alone} may both complete writes alone at {self.now:.2f}"


TestMirrorTicket = MirrorTicketMachine.TestCase
TestMirrorTicket.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def run_seed(seed: int, steps: int = 300) -> tuple[int, int]:
    """One deterministic run of the model with random operations; raises
    AssertionError on a violation. Returns (promotions, writes completed alone)."""
    mm = MirrorTicketMachine()
    mm.setup(seed)
    rng = random.Random(seed)
    alone = 0
    for _ in range(steps):
        op = rng.random()
        if op < 0.25:
            mm.advance(rng.uniform(0.1, 3.0))
        elif op < 0.5:
            name = rng.choice("AB")
            before, in_sync = len(mm.completed), mm._in_sync(mm.m[name])
            mm.write(name)
            alone += len(mm.completed) > before and not in_sync
        elif op < 0.6:
            mm.resync()
        elif op < 0.66:
            mm.cut_link()
        elif op < 0.72:
            mm.heal_link()
        elif op < 0.76:
            mm.cut_from_witness(rng.choice("AB"))
        elif op < 0.8:
            mm.heal_witness_links()
        elif op < 0.83:
            mm.crash(rng.choice("AB"))
        elif op < 0.87:
            mm.restart(rng.choice("AB"))
        elif op < 0.89:
            mm.restart_witness()
        else:
            mm.wait_out_a_lease()
    return sum(x.promoted for x in mm.m.values()), alone


def sweep(seeds: range) -> list[tuple[int, str]]:
    failures = []
    for seed in seeds:
        try:
            run_seed(seed)
        except AssertionError as e:
            failures.append((seed, str(e)))
    return failures


def test_a_thousand_seeds_keep_one_sequence_and_really_take_over() -> None:
    """The model is not vacuous: secondaries are promoted by the witness and
    mirrors complete writes alone, and no seed breaks a rule."""
    promoted = alone = 0
    for seed in range(1000):
        p, a = run_seed(seed)
        promoted, alone = promoted + p, alone + a
    assert promoted > 300 and alone > 2000, (promoted, alone)


def test_the_model_catches_a_witness_that_hands_an_outdated_mirror_the_ticket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(MirrorArbiter, "_lacks_alone_writes", lambda self, t, c: False)
    failures = sweep(range(100))
    assert failures and "alone without writes" in failures[0][1], failures[:1]


def test_the_model_catches_a_mirror_that_keeps_its_lease_after_the_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def keep_lease(self: MirrorGuard, now: float) -> None:
        self._valid_after, self._report = now, True  # reports, but still counts the lease
        self._last_sent = float("-inf")

    monkeypatch.setattr(MirrorGuard, "_end_alone", keep_lease)
    failures = sweep(range(1000))
    assert failures and "alone without writes" in failures[0][1], failures[:1]
