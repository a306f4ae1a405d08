"""Deterministic simulation of the cluster service's cores (``geoclus sim``).

N :class:`~geoclus.cluster.node.NodeCore` nodes on two sites and, for
``majority+witness``, a :class:`~quorum.witness.WitnessCore` on a third (for
``disk``, the mirrored quorum disk: one record and one log image, reached
over links that are cut like any other, and whose writes fail while its two
mirrors are cut from each other), in one process, on a simulated clock, over
a simulated network that delays, drops, duplicates and reorders messages and
is cut symmetrically and asymmetrically; nodes and the witness crash (losing
everything but what they persisted) and restart. Operators submit
configuration updates to random nodes throughout. Each node's shell applies
committed updates to a state (a hash chain of the updates, standing in for
the configuration database) and resets the log to a snapshot of it when the
core says so and at random moments (the periodic checkpoint), so joiners
and lagging members catch up from snapshots. Everything follows from one
seed.

After every step the checker asserts the safety properties (MISSION.md §3,
4 and 5):

* **one acting view**: every node that may run resources is in the same view;
* **bounded stop**: a node that has had no working two-way path (direct or
  through other nodes) to a quorum of votes for longer than ``stop_bound_s``
  (plus the network's worst delay) is not acting;
* **one history**: no two nodes ever commit different updates at one index,
  an update is committed at one index only, a locker's log (its snapshot and
  the entries after it) always holds every update committed so far, every
  node's applied updates are a prefix of that one history, and every log
  snapshot holds exactly the history up to its index;
* **one membership per view**: nodes installed in the same view agree on
  its members;
* **one disk owner**: at most one node owns the quorum disk at a time.

At the end the network heals, every node restarts, and after a quiet period
every node must be in one view, acting, with the same committed log
(liveness after healing: no flapping, no stuck view).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from geoclus.cluster.messages import NO_VIEW, Entry, View
from geoclus.cluster.node import (
    WITNESS,
    ClusterSpec,
    ClusterTimers,
    Disk,
    Event,
    LogImage,
    NodeCore,
    Persist,
    ReadLog,
    Send,
    WriteLog,
)
from quorum.arbitration import FREE, ReadDisk, Reservation, WriteDisk
from quorum.votes import QuorumKind, decide
from quorum.witness import VoteRequest, WitnessCore

_GENESIS = "0" * 16


def _link(chain: str, uid: str) -> str:
    """The shell state after applying ``uid`` to ``chain``."""
    return hashlib.sha256(f"{chain}:{uid}".encode()).hexdigest()[:16]


class SafetyViolation(AssertionError):
    """A safety property failed; the message names it, the time and the seed."""


@dataclass
class SimSettings:
    """What one simulated run looks like (all drawn from the seed by default)."""

    nodes: int = 4
    kind: QuorumKind = QuorumKind.MAJORITY
    duration_s: float = 240.0
    settle_s: float = 90.0
    min_delay_s: float = 0.0002
    max_delay_s: float = 0.02
    slow_delay_s: float = 3.0  # rare long delays (reordering across heartbeats)
    slow_p: float = 0.01
    drop_p: float = 0.02
    dup_p: float = 0.02
    fault_every_s: float = 12.0
    submit_every_s: float = 2.0
    timers: ClusterTimers = field(default_factory=ClusterTimers)
    log_compact_entries: int = 10  # log reset after this many committed entries
    checkpoint_p: float = 0.02  # chance, per apply, of an extra (periodic) log reset
    evict_p: float = 0.04  # chance that an update evicts a node (live, crashed or the locker)
    min_voters: int = 2  # no eviction is submitted that would leave fewer voters than this
    # A shell drops what an evicted node sends once it has applied the
    # eviction (as the daemon does); off, the core alone keeps the rules.
    shell_refuses_evicted: bool = True


def settings_for_seed(seed: int, kind: QuorumKind, **overrides: Any) -> SimSettings:
    """The settings a seed runs with: the node count (2 to 5) follows the seed
    so every size is covered; shorter runs than the default keep CI fast."""
    sizes = (3, 4, 5, 2) if kind is QuorumKind.MAJORITY else (2, 3, 4, 5)
    base: dict[str, Any] = {
        "nodes": sizes[seed % 4],
        "kind": kind,
        "duration_s": 150.0,
        "settle_s": 60.0,
        "log_compact_entries": (3, 10, 40)[seed // 4 % 3],
        # Half the seeds without the shells' refusal of evicted nodes: the
        # core's voter rules alone must keep the properties.
        "shell_refuses_evicted": seed // 12 % 2 == 0,
    }
    base.update(overrides)
    return SimSettings(**base)


@dataclass
class SimResult:
    seed: int
    steps: int
    committed: int
    views_formed: int
    regroups: int
    faults: list[str]
    events: int
    final_view: View
    snapshots: int = 0  # log resets taken by the nodes' shells
    adopted: int = 0  # times a shell caught up from a snapshot it received
    evicted: tuple[int, ...] = ()  # nodes whose eviction committed


_WITNESS_SITE = "witness"
_LEAVE = "leave"  # a node's shell announces a planned exit (the daemon's Leave)
QDISK = -3  # the quorum disk's end in the simulated network


class Simulation:
    """One seeded run; :meth:`run` returns a :class:`SimResult` or raises
    :class:`SafetyViolation`."""

    def __init__(
        self, seed: int, settings: SimSettings | None = None, *, trace: bool = False
    ) -> None:
        self.seed = seed
        self.trace: list[str] | None = [] if trace else None
        self.rng = random.Random(seed)
        s = self.s = settings or SimSettings()
        ids = tuple(range(s.nodes))
        sites = {n: ("A" if n < (s.nodes + 1) // 2 else "B") for n in ids}
        self.spec = ClusterSpec(
            nodes=ids,
            sites=sites,
            kind=s.kind,
            timers=s.timers,
            log_compact_entries=s.log_compact_entries,
            removal=evicts,
        )
        self.now = 0.0
        self._queue: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.cores: dict[int, NodeCore | None] = {n: NodeCore(n, self.spec, None, 0.0) for n in ids}
        self.persisted: dict[int, Disk] = {n: Disk() for n in ids}
        self.witness: WitnessCore | None = None
        self.witness_saved: WitnessCore | None = None
        if s.kind is QuorumKind.MAJORITY_WITNESS:
            self.witness = WitnessCore(
                lease_s=self.spec.max_lease_s, collect_s=s.timers.heartbeat_interval_s
            )
        self.ends = [*ids, WITNESS]
        if s.kind is QuorumKind.DISK:
            self.ends = [*ids, QDISK]
        self.record: Reservation = FREE
        self.log_image = LogImage(NO_VIEW, ())
        self.mirror_cut = False  # the quorum disk's two mirrors cannot reach each other
        self.incarnation: dict[int, int] = dict.fromkeys(ids, 0)
        self._op_seq = 0
        self._read_value: dict[int, Any] = {}
        self.cut: set[tuple[int, int]] = set()  # directed links that drop everything
        self._tick_at: dict[int, float] = {}
        self.history: dict[int, str] = {}  # index -> uid of every committed update
        self.history_at: dict[str, int] = {}  # uid -> its index (committed once only)
        self.chain: list[str] = [_GENESIS]  # chain[i]: the state after history 1..i
        self.evicted: list[frozenset[int]] = [frozenset()]  # evicted[i]: after history 1..i
        self.payloads: dict[str, Any] = {}  # uid -> the update submitted
        self.applied: dict[int, tuple[int, str]] = dict.fromkeys(ids, (0, _GENESIS))
        self.snapshots_taken = 0
        self.snapshots_adopted = 0  # a shell caught up from a snapshot, not entries
        self.view_members: dict[View, frozenset[int]] = {}
        self.view_voters: dict[View, frozenset[int]] = {}
        self.last_quorum_path: dict[int, float] = dict.fromkeys(ids, 0.0)
        self.faults: list[str] = []
        self.steps = 0
        self.events = 0
        self.end = s.duration_s
        self.announced: set[int] = set()  # evicted nodes whose shells announced their exit
        self._uid = 0
        self.settling = False
        for n in ids:
            self._schedule_tick(n, 0.0)

    # --- plumbing ----------------------------------------------------------------------

    def _push(self, at: float, kind: str, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, data))

    def _schedule_tick(self, n: int, at: float) -> None:
        if self._tick_at.get(n, float("inf")) <= at and self._tick_at.get(n, -1.0) > self.now:
            return
        self._tick_at[n] = at
        self._push(at, "tick", n)

    def _delay(self) -> float:
        if not self.settling and self.rng.random() < self.s.slow_p:
            return self.rng.uniform(self.s.max_delay_s, self.s.slow_delay_s)
        return self.rng.uniform(self.s.min_delay_s, self.s.max_delay_s)

    def _send(self, src: int, dst: int, msg: Any) -> None:
        if (src, dst) in self.cut:
            return
        if not self.settling and self.rng.random() < self.s.drop_p:
            return
        copies = 2 if not self.settling and self.rng.random() < self.s.dup_p else 1
        for _ in range(copies):
            self._push(self.now + self._delay(), "deliver", (src, dst, msg))

    def _run_actions(self, n: int, actions: list[Any]) -> None:
        core = self.cores[n]
        assert core is not None
        for a in actions:
            if isinstance(a, Persist):
                self.persisted[n] = core.disk.copy()
            elif isinstance(a, Send):
                self._send(n, a.to, a.msg)
            elif isinstance(a, ReadDisk | WriteDisk | ReadLog | WriteLog):
                self._disk_op(n, a)
            elif isinstance(a, Event):
                self.events += 1
                if self.trace is not None:
                    self.trace.append(f"{self.now:9.3f} [{n}] {a.kind}: {a.message}")
        self._apply(n, core)
        if core.evicted and n not in self.announced:
            # Its shell announces the exit, as the daemon does (a Leave).
            self.announced.add(n)
            for m in self.spec.nodes:
                if m != n:
                    self._send(n, m, _LEAVE)
        self._schedule_tick(n, max(core.next_deadline(), self.now + 0.001))

    # --- the shell's state machine ---------------------------------------------------------

    def _record(self, n: int, index: int, uid: str) -> None:
        """``uid`` is committed at ``index`` (seen at node ``n``)."""
        known = self.history.setdefault(index, uid)
        if known != uid:
            raise self._fail(f"node {n} committed {uid} at index {index}, another node {known}")
        at = self.history_at.setdefault(uid, index)
        if at != index:
            raise self._fail(f"update {uid} committed twice: at index {at} and at {index}")
        if index == len(self.chain):
            self.chain.append(_link(self.chain[-1], uid))
            gone = evicts(self.payloads.get(uid))
            self.evicted.append(self.evicted[-1] | ({gone} if gone is not None else set()))
            if gone is not None and self.settling:
                # A membership change during the quiet period (an eviction
                # queued before it): the cluster gets time to re-form after it.
                self.end = max(self.end, self.now + self.s.settle_s)
        elif index > len(self.chain):
            raise self._fail(f"node {n} committed index {index} before index {len(self.chain)}")

    def applied_uids(self, n: int) -> list[str]:
        """The updates node ``n``'s shell has applied, in order (its state is
        checked to be that prefix of the one history)."""
        index, chain = self.applied[n]
        if chain != self.chain[index]:
            raise self._fail(f"node {n}'s applied state is not the history up to {index}")
        return [self.history[i] for i in range(1, index + 1)]

    def _check_snapshot(self, n: int, base: Any, what: str) -> None:
        if base.index == 0:
            return
        if base.index >= len(self.chain):
            raise self._fail(
                f"node {n} {what} a snapshot at index {base.index}: only "
                f"{len(self.chain) - 1} updates were ever committed"
            )
        if base.state != {"index": base.index, "chain": self.chain[base.index]}:
            raise self._fail(
                f"node {n} {what} a snapshot at index {base.index} that is not the history"
            )

    def _apply(self, n: int, core: NodeCore) -> None:
        """Apply what ``n`` has committed, as the daemon does: take the log's
        snapshot when behind it, then the entries after it; reset the log
        when the core says so (and now and then, like a periodic checkpoint)."""
        d = core.disk
        index, chain = self.applied[n]
        if index < d.base.index:
            self._check_snapshot(n, d.base, "adopted")
            index, chain = d.base.index, d.base.state["chain"]
            self.snapshots_adopted += 1
        while index < min(d.commit, d.length):
            e = d.log[index - d.base.index]
            self._record(n, e.index, e.uid)
            index, chain = e.index, _link(chain, e.uid)
        self.applied[n] = (index, chain)
        due = core.compaction_due()
        if index > d.base.index and (due or self.rng.random() < self.s.checkpoint_p):
            core.compact(index, {"index": index, "chain": chain})
            self.persisted[n] = core.disk.copy()
            self.snapshots_taken += 1

    # --- the quorum disk -----------------------------------------------------------------

    def _disk_reach(self, n: int) -> bool:
        return (n, QDISK) not in self.cut and (QDISK, n) not in self.cut

    def _disk_op(self, n: int, op: Any) -> None:
        """Start ``op``: it takes random time below ``max_io_s``; a write
        lands at a random moment inside it (or, if it fails, maybe not at
        all); a read returns the value at such a moment. An op whose node
        cannot reach the disk, or a write while the mirrors are cut from each
        other (the replicated volume suspends writes), fails after
        ``max_io_s``; a reply lost to a cut arriving mid-operation is a
        failure too, though the write may have landed."""
        self._op_seq += 1
        op_id = self._op_seq
        max_io = self.spec.arbitration.max_io_s
        write = isinstance(op, WriteDisk | WriteLog)
        data = (n, self.incarnation[n], op, self.now, op_id)
        if not self._disk_reach(n) or (write and self.mirror_cut):
            self._push(self.now + max_io * 1.05, "disk-done", data)
            self._read_value[op_id] = None
            return
        took = self.rng.uniform(0.001, max_io * 0.9)
        self._push(self.now + self.rng.uniform(0, took), "disk-land", data)
        self._push(self.now + took, "disk-done", data)

    def _disk_land(self, data: Any) -> None:
        op, op_id = data[2], data[4]
        if isinstance(op, WriteDisk | WriteLog) and self.mirror_cut:
            self._read_value[op_id] = None  # suspended: it does not land
            return
        if isinstance(op, WriteDisk):
            self.record = op.record
        elif isinstance(op, WriteLog):
            self.log_image = op.image
        elif isinstance(op, ReadDisk):
            self._read_value[op_id] = self.record
        else:
            self._read_value[op_id] = self.log_image
        self._read_value.setdefault(op_id, True)

    def _disk_done(self, data: Any) -> None:
        n, inc, op, started, op_id = data
        value = self._read_value.pop(op_id, None)
        core = self.cores.get(n)
        if core is None or self.incarnation[n] != inc:
            return  # the node crashed meanwhile: nobody waits for this answer
        if not self._disk_reach(n):
            value = None  # the answer is lost
        if isinstance(op, ReadDisk):
            self._run_actions(n, core.on_disk_read(op.tag, value, started, self.now))
        elif isinstance(op, WriteDisk):
            self._run_actions(n, core.on_disk_written(op.tag, value is not None, started, self.now))
        elif isinstance(op, ReadLog):
            self._run_actions(n, core.on_log_read(value, self.now))
        else:
            ok = value is not None
            self._run_actions(n, core.on_log_written(op.image, ok, started, self.now))

    # --- faults ------------------------------------------------------------------------

    def _alive(self, end: int) -> bool:
        if end == WITNESS:
            return self.witness is not None
        return self.cores.get(end) is not None

    def _fault(self) -> None:
        r = self.rng.random()
        ids = list(self.spec.nodes)
        if r < 0.25:
            side = set(self.rng.sample(self.ends, self.rng.randint(1, len(self.ends) - 1)))
            for a in self.ends:
                for b in self.ends:
                    if (a in side) != (b in side):
                        self.cut.add((a, b))
            self.faults.append(f"{self.now:.1f}s partition {sorted(side)} | rest")

        elif r < 0.38:
            a, b = self.rng.sample(self.ends, 2)
            self.cut.add((a, b))
            self.faults.append(f"{self.now:.1f}s one-way cut {a}->{b}")
        elif r < 0.6:
            self.cut.clear()
            self.mirror_cut = False
            self.faults.append(f"{self.now:.1f}s heal")
        elif r < 0.75:
            live = [n for n in ids if self.cores[n] is not None]
            if live:
                n = self.rng.choice(live)
                self.cores[n] = None
                self.incarnation[n] += 1
                self.faults.append(f"{self.now:.1f}s crash node {n}")
        elif r < 0.9:
            dead = [n for n in ids if self.cores[n] is None]
            if dead:
                self._restart(self.rng.choice(dead))
        elif self.s.kind is QuorumKind.DISK:
            self.mirror_cut = not self.mirror_cut
            self.faults.append(
                f"{self.now:.1f}s quorum disk mirrors {'cut' if self.mirror_cut else 'rejoined'}"
            )
        elif self.s.kind is QuorumKind.MAJORITY_WITNESS:
            if self.witness is not None:
                self.witness_saved, self.witness = self.witness, None
                self.faults.append(f"{self.now:.1f}s crash witness")
            elif self.witness_saved is not None:
                self.witness, self.witness_saved = self.witness_saved, None
                self.faults.append(f"{self.now:.1f}s restart witness")

    def _note(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.now:9.3f} FAULT {text}")

    def _restart(self, n: int) -> None:
        self.cores[n] = NodeCore(n, self.spec, self.persisted[n], self.now)
        base = self.persisted[n].base
        # The shell rebuilds its state from the snapshot and replays the log.
        self.applied[n] = (base.index, base.state["chain"]) if base.index else (0, _GENESIS)
        self.faults.append(f"{self.now:.1f}s restart node {n}")
        self._tick_at.pop(n, None)
        self._schedule_tick(n, self.now)

    # --- the checker -------------------------------------------------------------------

    def _fail(self, what: str) -> SafetyViolation:
        recent = "; ".join(self.faults[-6:])
        if self.trace is not None:
            self.trace.append(f"{self.now:9.3f} VIOLATION {what}")
        return SafetyViolation(
            f"seed {self.seed}, t={self.now:.3f}s: {what} (recent faults: {recent})"
        )

    def _linked(self, a: int, b: int) -> bool:
        return self._alive(b) and (a, b) not in self.cut and (b, a) not in self.cut

    def _quorum_path(self, n: int, voters: frozenset[int]) -> bool:
        """Can node ``n`` reach a quorum of ``voters`` (its view's voter set)
        over working two-way links (through other nodes too; the witness's
        vote reaches the members through whichever of them talks to it)?"""
        component = {n}
        todo = [n]
        while todo:
            a = todo.pop()
            for b in self.spec.nodes:
                if b not in component and self._linked(a, b):
                    component.add(b)
                    todo.append(b)
        witness = self.s.kind is QuorumKind.MAJORITY_WITNESS and any(
            self._linked(m, WITNESS) for m in component
        )
        disk = (
            self.s.kind is QuorumKind.DISK
            and not self.mirror_cut
            and any(self._disk_reach(m) for m in component)
        )
        return decide(
            self.s.kind, voters, component, witness_vote=witness, disk_owned=disk
        ).has_quorum

    def check(self) -> None:
        now = self.now
        acting_views: dict[View, list[int]] = {}
        lockers = []
        for n, core in self.cores.items():
            if core is None:
                continue
            if self._quorum_path(n, core.view_voters):
                self.last_quorum_path[n] = now
            if core.acting(now):
                acting_views.setdefault(core.view, []).append(n)
                cut_for = now - self.last_quorum_path[n]
                bound = self.spec.stop_bound_s + self.s.slow_delay_s
                if cut_for > bound and not core.disk.forced:  # forcing overrides quorum
                    raise self._fail(
                        f"node {n} still acts {cut_for:.2f}s after losing every path to a "
                        f"quorum (bound {bound:.2f}s)"
                    )
            if core.installed:
                known = self.view_members.setdefault(core.view, core.members)
                if known != core.members:
                    raise self._fail(
                        f"node {n} has view {core.view} with members {sorted(core.members)}, "
                        f"another node with {sorted(known)}"
                    )
                voters = self.view_voters.setdefault(core.view, core.view_voters)
                if voters != core.view_voters or not core.members <= voters:
                    raise self._fail(
                        f"node {n} has view {core.view} with voters {sorted(core.view_voters)} "
                        f"and members {sorted(core.members)}; another node has voters "
                        f"{sorted(voters)}"
                    )
                if core.is_locker:
                    lockers.append(core)
            for e in core.committed():
                self._record(n, e.index, e.uid)
        if len(acting_views) > 1:
            raise self._fail(f"two views act at once: {acting_views}")
        owners = [
            n
            for n, c in self.cores.items()
            if c is not None and c.arbiter is not None and c.arbiter.owns(now)
        ]
        if len(owners) > 1:
            raise self._fail(f"nodes {owners} own the quorum disk at once")
        latest = max(self.view_members, default=NO_VIEW)
        for core in lockers:
            if core.view != latest:
                continue  # a superseded locker cannot commit; its view's log is stale
            d = core.disk
            self._check_snapshot(core.id, d.base, "as locker holds")
            for index, uid in self.history.items():
                if index <= d.base.index:
                    continue  # in the snapshot, checked above
                if index > d.length or d.log[index - d.base.index - 1].uid != uid:
                    raise self._fail(
                        f"locker {core.id} of view {core.view} lost committed update "
                        f"{uid} at index {index} (its log has {d.length})"
                    )

    # --- the run -----------------------------------------------------------------------

    def _submit(self) -> None:
        live = [n for n in self.spec.nodes if self.cores[n] is not None]
        if not live:
            return
        n = self.rng.choice(live)
        self._uid += 1
        core = self.cores[n]
        assert core is not None
        uid = f"u{self._uid}"
        payload: dict[str, int] = {"set": self._uid}
        voters = [v for v in self.spec.nodes if v not in self.evicted[-1]]
        evicting = not self.settling and len(voters) > self.s.min_voters and self.s.evict_p > 0
        if evicting and self.rng.random() < self.s.evict_p:
            # An operator evicts a node: maybe a dead one, maybe the locker,
            # maybe one that is running and cut off (it will not know).
            payload = {"evict": self.rng.choice(voters)}
            self.faults.append(f"{self.now:.1f}s submit evict node {payload['evict']}")
        self.payloads[uid] = payload
        self._run_actions(n, core.submit(uid, payload, self.now))

    def _step(self, kind: str, data: Any) -> None:
        if kind == "tick":
            n = data
            core = self.cores.get(n)
            if core is None or self._tick_at.get(n) != self.now:
                return
            self._run_actions(n, core.on_tick(self.now))
        elif kind == "deliver":
            src, dst, msg = data
            if dst == WITNESS:
                if self.witness is None:
                    return
                assert isinstance(msg, VoteRequest)
                self._send(WITNESS, src, self.witness.on_request(msg, self.now))
                return
            core = self.cores.get(dst)
            if core is None:
                return
            if msg is _LEAVE:
                self._run_actions(dst, core.node_left(src, self.now))
                return
            if self.s.shell_refuses_evicted and src in self.evicted[self.applied[dst][0]]:
                return  # its shell refuses an evicted node, as the daemon does
            self._run_actions(dst, core.on_message(src, msg, self.now))
        elif kind == "disk-land":
            self._disk_land(data)
        elif kind == "disk-done":
            self._disk_done(data)
        elif kind == "fault":
            if not self.settling:
                before = len(self.faults)
                self._fault()
                for text in self.faults[before:]:
                    self._note(text)
                self._push(self.now + self.rng.expovariate(1 / self.s.fault_every_s), "fault", None)
        elif kind == "submit":
            if self.now < self.s.duration_s - self.s.settle_s / 3:  # then let it converge
                self._submit()
            self._push(self.now + self.rng.expovariate(1 / self.s.submit_every_s), "submit", None)

    def run_until(self, t: float, *, check: bool = True) -> None:
        """Step the simulation (no scheduled faults or submits unless the
        caller queued them) up to time ``t``, checking after every step
        unless ``check`` is False (the scripted tests drive faults by hand)."""
        while self._queue and self._queue[0][0] <= t:
            at, _, kind, data = heapq.heappop(self._queue)
            self.now = at
            self._step(kind, data)
            if check:
                self.check()
        self.now = t

    def run(self, on_step: Callable[[Simulation], None] | None = None) -> SimResult:
        self._push(self.rng.expovariate(1 / self.s.fault_every_s), "fault", None)
        self._push(self.rng.uniform(0, self.s.submit_every_s), "submit", None)
        settle_at = self.end - self.s.settle_s
        while self._queue:
            at, _, kind, data = heapq.heappop(self._queue)
            if at > self.end:
                break
            if not self.settling and at >= settle_at:
                self._settle()
            self.now = at
            self._step(kind, data)
            self.steps += 1
            self.check()
            if on_step is not None:
                on_step(self)
        self.now = self.end
        self.check()
        self._check_settled()
        return SimResult(
            seed=self.seed,
            steps=self.steps,
            committed=len(self.history),
            views_formed=len(self.view_members),
            regroups=sum(c.regroups_started for c in self.cores.values() if c is not None),
            faults=self.faults,
            events=self.events,
            final_view=next(c.view for c in self._voters_running()),
            snapshots=self.snapshots_taken,
            adopted=self.snapshots_adopted,
            evicted=tuple(sorted(self.evicted[-1])),
        )

    def _voters_running(self) -> list[NodeCore]:
        """The running nodes the one history has not evicted."""
        gone = self.evicted[-1]
        return [c for c in self.cores.values() if c is not None and c.id not in gone]

    def _settle(self) -> None:
        self.settling = True
        self.cut.clear()
        self.mirror_cut = False
        self.faults.append(f"{self.now:.1f}s settle: heal, restart everything")
        for n in self.spec.nodes:
            if self.cores[n] is None:
                self._restart(n)
        if self.s.kind is QuorumKind.MAJORITY_WITNESS and self.witness is None:
            self.witness, self.witness_saved = self.witness_saved, None

    def _check_settled(self) -> None:
        for c in self.cores.values():
            if c is not None:
                self.applied_uids(c.id)  # every node's state is a prefix of the history
        cores = self._voters_running()
        views = {c.view for c in cores}
        not_acting = [c.id for c in cores if not c.acting(self.now)]
        if len(views) != 1 or not_acting or NO_VIEW in views:
            raise self._fail(
                f"after {self.s.settle_s:.0f}s healed: views {sorted(views)}, "
                f"not acting {not_acting}"
            )
        states = {self.applied[c.id] for c in cores}
        if len(states) != 1:
            raise self._fail(f"after healing the nodes' applied states differ: {sorted(states)}")
        if states != {(len(self.chain) - 1, self.chain[-1])}:
            raise self._fail("after healing the applied state is not the one history")


def evicts(payload: Any) -> int | None:
    """The simulated updates' eviction: ``{"evict": node}``."""
    if isinstance(payload, dict) and "evict" in payload:
        node = payload["evict"]
        return node if isinstance(node, int) else None
    return None


def committed_entries(sim: Simulation) -> list[Entry]:
    """The committed log of the first live node (for reports)."""
    for c in sim.cores.values():
        if c is not None:
            return c.committed()
    return []
