"""The cluster service's node core (sans-I/O): heartbeats and failure
detection, regroup (view change), the global update manager, and the quorum
lease that decides whether this node may run resources.

``NodeCore`` takes messages and the time, and returns :class:`Send` actions
(plus :class:`Persist` whenever :attr:`NodeCore.disk` changed; the shell must
make it durable *before* sending what follows it in the same list). It never
reads a clock, a socket or a random number. docs/cluster.md describes the
protocol; in short:

* **Heartbeats.** Every ``heartbeat_interval_s`` a node pings every configured
  node; the Pong says which view the answerer is installed in. A peer not
  heard for its ``missed_heartbeats`` intervals (same-site and cross-site
  thresholds differ) is *suspected*.
* **Votes are leases.** A member's vote for view V counts at a node until
  ``lease_s`` after that node *sent* the ping the member answered in V. A
  member that promises a new view stops answering in V, and tells the new
  coordinator how long its last V answer can still count (``release_s``).
* **Acting.** A node may run resources ("acts") only while it is installed in
  a view, the view's ``act_after`` has passed, and its fresh votes (itself,
  members' leases, the witness's lease) make quorum (quorum/votes.py). A node
  cut off from a quorum therefore stops within ``lease_s`` of its last
  answered ping, with no message needed.
* **Regroup.** The locker (the view's coordinator) regroups when a member is
  suspected or fails to apply an update, or a configured non-member answers
  pings; a member regroups when it suspects the locker; a node in no view or
  without quorum retries. The coordinator sends ``Prepare(v')`` with a view
  above any it has seen; acceptors promise (they refuse while they still hear
  a live locker that is not the preparer, so a node on the far side of an
  asymmetric cut cannot disrupt a working view); after every reachable node
  answered, or ``regroup_answer_timeout_s``, the promisers are the new
  members. With quorum (and, for ``majority+witness`` when the nodes alone
  are short, the witness's grant), the coordinator picks the log with the
  highest ``(normal_view, length)``, installs, and sends ``NewView`` with
  ``act_wait_s`` = the longest remaining release of any promiser and the
  witness's hand-over wait. Members install it and answer ``Installed``.
* **Global updates.** Only the locker of an acting view appends. An update is
  durable on a member when it answers ``Appended``; it is *committed* when
  durable on ``commit_needed`` votes (members that acknowledged it in this
  view, plus the witness if it recorded the log position), and applied by
  every member in log order once the locker's commit index (sent in Appends
  and Pings) covers it. A member that has not acknowledged an update within
  ``update_timeout_s`` is dropped by a regroup (the seeds' GUM rule).

* **Changing the voters (evict).** Quorum counts the votes of a view's
  *voter set*, fixed when the view forms: every configured node that the
  chosen log (snapshot and entries, committed or not) does not evict. An
  eviction is an ordinary update that the locker appends one at a time: only
  while no other eviction is in its log beyond its view's voter set, and only
  once the log it started the view with is committed in its view. While it
  is pending, commits need a quorum of the view's voters (the old, larger
  set) and of the voters left, and once it commits the locker regroups
  so that the next view counts the new set: the promisers must make a quorum
  of the voter set the chosen log defines, and the members are the promisers
  in it. These are the single-server-change rules of Raft (one change at a
  time, and none before the view has committed its starting log): two voter
  sets in use then differ by at most one node, so their quorums intersect,
  and a stale node that missed two evictions cannot gather a quorum even
  with the evicted nodes still running (any quorum of its old set holds a
  node with the later log, which the view change then picks). A node that
  finds its own eviction committed stops (like a planned leave).

Safety (checked by geoclus/cluster/sim.py after every step): at any moment
every acting node is in the same view; a node cut off from quorum stops within
``stop_bound_s``; committed updates are never lost and are applied in one
order everywhere; members of a view agree on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from geoclus.cluster.messages import (
    NO_SNAPSHOT,
    NO_VIEW,
    Append,
    Appended,
    Entry,
    Installed,
    Message,
    NewView,
    Ping,
    Pong,
    Prepare,
    Promise,
    Reject,
    Snapshot,
    Submit,
    View,
    log_length,
)
from quorum.arbitration import Arbiter, ArbitrationTimers, Phase, ReadDisk, Reservation, WriteDisk
from quorum.votes import QuorumDecision, QuorumKind, commit_needed, decide
from quorum.witness import VoteReply, VoteRequest

WITNESS = -2  # the witness's address in Send actions
LOCKER_ALIVE = "the locker is alive"  # a Reject's reason: the acceptor's view is acting


@dataclass(frozen=True)
class ClusterTimers:
    """Timers of the node core (config keys of the same names)."""

    heartbeat_interval_s: float = 1.2
    missed_heartbeats_same_site: int = 5
    missed_heartbeats_cross_site: int = 8
    regroup_answer_timeout_s: float = 4.0
    update_timeout_s: float = 8.0

    def lease_s(self, same_site: bool) -> float:
        n = self.missed_heartbeats_same_site if same_site else self.missed_heartbeats_cross_site
        return self.heartbeat_interval_s * n


def no_removal(payload: Any) -> int | None:
    """The default :attr:`ClusterSpec.removal`: no update evicts a node."""
    return None


@dataclass(frozen=True)
class ClusterSpec:
    """The static part of the configuration the core needs."""

    nodes: tuple[int, ...]
    sites: dict[int, str]
    kind: QuorumKind
    timers: ClusterTimers = ClusterTimers()
    max_log_entries: int = 100_000
    max_pending_submits: int = 1024
    # Log reset: once this many committed entries follow the last snapshot,
    # the shell folds them into a new one (compaction_due / compact).
    log_compact_entries: int = 1000
    dedupe_uids: int = 4096  # compacted update ids still recognised as resubmissions
    arbitration: ArbitrationTimers = field(default_factory=ArbitrationTimers)
    # Which node a configuration update evicts (None: none). The payload is
    # opaque to the core otherwise; the shell says which updates are
    # evictions. See "Changing the voters" in the module docstring.
    removal: Callable[[Any], int | None] = no_removal

    def voters(self, base: Snapshot, entries: Iterable[Entry]) -> frozenset[int]:
        """The voter set a log (``base`` plus ``entries``) defines: every
        configured node that neither the snapshot nor an entry evicted."""
        removed = set(base.removed)
        for e in entries:
            gone = self.removal(e.payload)
            if gone is not None:
                removed.add(gone)
        return frozenset(n for n in self.nodes if n not in removed)

    def lease_s(self, a: int, b: int) -> float:
        return self.timers.lease_s(self.sites.get(a) == self.sites.get(b))

    @property
    def max_lease_s(self) -> float:
        return max(self.timers.lease_s(True), self.timers.lease_s(False))

    @property
    def stop_bound_s(self) -> float:
        """Longest a node cut off from quorum may still act: its last counted
        vote was answered to a ping sent at most this long before the cut
        could be noticed (one interval of ping spacing plus the longest lease).
        With the ``disk`` quorum a locker cut off from the disk owns it until
        ``hold_s`` after the start of its last renewal, and its members count
        it no longer than that."""
        bound = self.max_lease_s + self.timers.heartbeat_interval_s
        if self.kind is QuorumKind.DISK:
            bound = max(bound, self.arbitration.hold_s + self.arbitration.max_io_s)
        return bound


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to node ``to`` (or to the witness, ``WITNESS``)."""

    to: int
    msg: Message | VoteRequest


@dataclass(frozen=True, slots=True)
class Persist:
    """Make :attr:`NodeCore.disk` durable before the actions after this one."""


@dataclass(frozen=True, slots=True)
class Event:
    """Something an operator should see (membership, quorum, arbitration)."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class LogImage:
    """The quorum log as the ``disk`` quorum keeps it on the quorum disk:
    the log of ``view``, a snapshot (``base``) and the entries after it
    (every entry durable on the disk once written)."""

    view: View
    log: tuple[Entry, ...]
    base: Snapshot = NO_SNAPSHOT

    @property
    def length(self) -> int:
        return log_length(self.base, self.log)


@dataclass(frozen=True, slots=True)
class ReadLog:
    """Read the quorum log from the quorum disk; answer with :meth:`NodeCore.on_log_read`."""


@dataclass(frozen=True, slots=True)
class WriteLog:
    """Write ``image`` to the quorum disk (both mirrors); answer with
    :meth:`NodeCore.on_log_written`."""

    image: LogImage


DiskAction = ReadDisk | WriteDisk | ReadLog | WriteLog
Action = Send | Persist | Event | ReadDisk | WriteDisk | ReadLog | WriteLog


@dataclass
class Disk:
    """What a node keeps across a crash."""

    promised: View = NO_VIEW
    normal_view: View = NO_VIEW
    members: frozenset[int] = frozenset()
    log: list[Entry] = field(default_factory=list)  # the entries after ``base``
    commit: int = 0
    forced: bool = False  # an operator forced quorum (force-quorum); cleared by a natural quorum
    base: Snapshot = NO_SNAPSHOT  # the compacted prefix (entries 1..base.index)
    # The installed view's voter set, fixed when the view formed (None: a
    # state from before voter changes, every configured node not in the snapshot's removed).
    voters: frozenset[int] | None = None

    @property
    def length(self) -> int:
        """The log's length, compacted prefix included."""
        return log_length(self.base, self.log)

    def copy(self) -> Disk:
        return dataclasses.replace(self, log=list(self.log))


@dataclass
class _ViewChange:
    view: View
    started_at: float
    deadline: float
    expected: frozenset[int]
    promises: dict[int, Promise] = field(default_factory=dict)
    rejected: set[int] = field(default_factory=set)
    witness_asked_at: float | None = None
    witness_reply: VoteReply | None = None
    witness_reply_at: float = 0.0
    witness_request: VoteRequest | None = None
    witness_retry_at: float | None = None
    # disk quorum: "arbitrate", "read-log", "write-view" (or "skipped": forced)
    disk_phase: str | None = None
    disk_started: bool = False
    disk_image: LogImage | None = None  # the new view's image, written before install
    acting_elsewhere: set[int] = field(default_factory=set)  # rejected: "locker is alive"


class ForceRefused(Exception):
    """force-quorum was refused; the message says why and what to do."""


class NodeCore:
    """One node's cluster state machine; see the module docstring."""

    def __init__(self, node_id: int, spec: ClusterSpec, disk: Disk | None, now: float) -> None:
        if node_id not in spec.nodes:
            raise ValueError(f"node {node_id} is not configured")
        self.id = node_id
        self.spec = spec
        self.disk = disk.copy() if disk is not None else Disk()
        self.installed = False
        self.act_after = 0.0
        self._wake_at_act: float | None = None
        self.applied = self.disk.commit  # entries applied (replayed from the log at start)
        self._next_ping = now
        self._heard: dict[int, float] = {}  # peer -> send time of my last ping it answered
        self._heard_view: dict[int, View] = {}
        self._vote_until: dict[int, float] = {}  # member -> my lease on its vote
        self._witness_until = 0.0
        self._witness_wait_until = 0.0
        # When I last answered a ping in my view. After a restart I may have
        # answered one just before the crash: count the restart as that moment.
        self._last_pong_sent_in_view = now if self.disk.normal_view != NO_VIEW else -1e18
        self._vc: _ViewChange | None = None
        self._next_regroup = now + self._stagger()
        self._regroup_attempts = 0
        self._acked: dict[int, int] = {}  # locker: member -> durable length in this view
        self._append_time: dict[int, float] = {}  # locker: index -> time appended
        self._pending: list[Submit] = []
        self._highest_seen: View = max(self.disk.promised, self.disk.normal_view)
        self._witness_recorded = ((0, 0), 0)
        self._was_acting = False
        self.regroups_started = 0
        self._now = now
        self._left: set[int] = set()  # announced a planned exit (and are stopped)
        self._leaving = False  # I am leaving: silent from now on
        # Until when my installed view's start fence runs (it protects against
        # older views still acting). After a restart it is unknown: assume the
        # longest a fence can be.
        self._fence_until = (
            now + self.spec.stop_bound_s if self.disk.normal_view != NO_VIEW else -1e18
        )
        # The latest moment a member may count the tie-breaker (witness or
        # quorum disk) vote I passed on in my Pongs as the locker.
        self._tiebreak_given_until = (
            now + self.spec.stop_bound_s
            if self.disk.normal_view != NO_VIEW and spec.kind is not QuorumKind.MAJORITY
            else -1e18
        )
        self.arbiter: Arbiter | None = None
        if spec.kind is QuorumKind.DISK:
            self.arbiter = Arbiter(node_id, spec.arbitration)
        self._log_writing: tuple[View, int] | None = None  # the log image being written
        self._forced_tried = False
        self._forced_peers: set[int] = set()  # their last view was forced by the operator
        self._forced_retry_at = now
        self._forced_reason = ""
        self._log_on_disk = 0  # length of my view's log durable on the quorum disk
        self._view_start_length = 0  # locker: the log's length when my view formed
        self._committed_voters: tuple[tuple[int, frozenset[int], int], frozenset[int]] | None = None
        self._deferred_said: set[str] = set()  # evictions whose wait was reported
        self.evicted = False  # my own eviction is committed: I stopped

    # --- queries ---------------------------------------------------------------------

    @property
    def view(self) -> View:
        return self.disk.normal_view

    @property
    def members(self) -> frozenset[int]:
        return self.disk.members

    @property
    def is_locker(self) -> bool:
        return self.installed and self.disk.normal_view[1] == self.id

    @property
    def view_voters(self) -> frozenset[int]:
        """The voter set of my view (what quorum and commits count)."""
        d = self.disk
        if d.voters is not None:
            return d.voters
        return frozenset(self.spec.nodes) - d.base.removed

    def log_voters(self) -> frozenset[int]:
        """The voter set my whole log defines (a pending eviction included)."""
        return self.spec.voters(self.disk.base, self.disk.log)

    def committed_voters(self) -> frozenset[int]:
        """The voter set my committed log defines."""
        d = self.disk
        key = (d.base.index, d.base.removed, d.commit)
        if self._committed_voters is None or self._committed_voters[0] != key:
            self._committed_voters = (key, self.spec.voters(d.base, self.committed()))
        return self._committed_voters[1]

    def fresh_voters(self, now: float) -> frozenset[int]:
        """Members whose vote for my view still counts here (myself included)."""
        if not self.installed:
            return frozenset()
        return frozenset(
            m for m in self.disk.members if m == self.id or self._vote_until.get(m, -1.0) > now
        )

    def acting(self, now: float) -> bool:
        """May this node run resources now?"""
        if not self.installed or now < self.act_after:
            return False
        return self.quorum(now).has_quorum

    def quorum(self, now: float) -> QuorumDecision:
        """The quorum decision for my view now (what status shows)."""
        return decide(
            self.spec.kind,
            self.view_voters,
            self.fresh_voters(now),
            witness_vote=self._witness_until > now,
            disk_owned=self.installed and self._tiebreak_until(now) > now,
            forced=self.disk.forced,
        )

    def _tiebreak_until(self, now: float) -> float:
        """Until when my view holds the witness's vote or the quorum disk, as
        far as I know (the locker knows; members count what it passed on)."""
        if self.arbiter is not None and self.is_locker:
            return self.arbiter.held_until(now)
        return self._witness_until

    def disk_owner_s(self, now: float) -> float:
        """How much longer my view holds the quorum disk (``disk`` quorum)."""
        if self.arbiter is None or not self.installed:
            return 0.0
        return max(0.0, self._tiebreak_until(now) - now)

    def witness_vote_s(self, now: float) -> float:
        """How much longer this node counts the witness's vote for its view."""
        return max(0.0, self._witness_until - now) if self.installed else 0.0

    def committed(self) -> list[Entry]:
        """The committed entries still in the log (those after the snapshot)."""
        return self.disk.log[: max(0, self.disk.commit - self.disk.base.index)]

    def _after(self, index: int) -> tuple[Entry, ...]:
        """The entries after position ``index`` (not inside the snapshot)."""
        return tuple(self.disk.log[index - self.disk.base.index :])

    def compaction_due(self) -> bool:
        """True when ``log_compact_entries`` committed entries follow the last
        snapshot: the shell should :meth:`compact` at its applied index."""
        return self.disk.commit - self.disk.base.index >= self.spec.log_compact_entries

    def compact(self, index: int, state: Any) -> list[Action]:
        """Log reset: the shell's database ``state``, as it stands after
        applying entries ``1..index``, replaces them. Only committed entries
        can be folded (ValueError otherwise: nothing changes). Members that
        are behind the snapshot receive it in place of the entries; a joiner
        receives it plus the entries after it."""
        d = self.disk
        if index <= d.base.index:
            return []
        if index > d.commit:
            raise ValueError(f"cannot compact to {index}: only {d.commit} entries are committed")
        folded = d.log[: index - d.base.index]
        uids = (d.base.uids + tuple(e.uid for e in folded))[-self.spec.dedupe_uids :]
        removed = frozenset(self.spec.nodes) - self.spec.voters(d.base, folded)
        d.log = d.log[index - d.base.index :]
        d.base = Snapshot(index, state, uids, removed)
        return [Persist()]

    # --- inputs ----------------------------------------------------------------------

    def submit(self, uid: str, payload: Any, now: float) -> list[Action]:
        """A configuration update from an operator or a resource manager. The
        locker of an acting view appends it; another node forwards it to its
        locker; a node in no view queues it (bounded) until it has one."""
        return self._submit(Submit(uid, payload), now)

    def force_quorum(self, site: str, now: float) -> list[Action]:
        """Operator override (``geoclus cluster force-quorum --site S``) for a
        cluster that cannot reach quorum, e.g. two sites with no witness after
        losing one. Raises :class:`ForceRefused` (nothing changes) unless this
        node is at ``site``, is not acting already, and hears no node of any
        other site: the guard against forcing while the other side may still
        run. Otherwise the partition forms a view whatever its votes; the
        flag travels with its views and clears as soon as a view forms with a
        natural quorum (the other site rejoining)."""
        mine = self.spec.sites.get(self.id)
        if site != mine:
            raise ForceRefused(
                f"this node is at site {mine}, not {site}: run it on a node of {site}"
            )
        seen = sorted(n for n in self.reachable(now) if self.spec.sites.get(n) != site)
        if seen:
            raise ForceRefused(
                f"node(s) {seen} of another site still answer heartbeats: forcing now could "
                "give both sites quorum; stop them or cut them off first"
            )
        if self.acting(now):
            raise ForceRefused(f"this node has quorum already ({self.quorum(now).reason})")
        out: list[Action] = [Event("quorum", f"node {self.id}: quorum FORCED for site {site}")]
        self.disk.forced = True
        out.append(Persist())
        if self._vc is not None:
            self._vc = None
        self._start_view_change(now, "quorum forced by the operator", out)
        return out

    def node_left(self, node: int, now: float) -> list[Action]:
        """``node`` announced a planned exit: stop counting it at once (its
        vote included) instead of waiting out its missed-heartbeat threshold;
        the locker (or, if the leaver was the locker, a member) forms the next
        view on this tick."""
        if node == self.id or node not in self.spec.nodes:
            return []
        self._heard.pop(node, None)
        self._heard_view.pop(node, None)
        self._vote_until.pop(node, None)
        self._left.add(node)
        if self._vc is None and self.is_locker:
            self._next_regroup = now
        elif self._vc is None and node == self.view[1]:
            # The locker left: members take turns (lower ids first) instead
            # of all starting rival view changes on the same tick.
            self._next_regroup = now + self._stagger()
        elif self._vc is None and not self.installed and node == self.disk.promised[1]:
            # The coordinator I promised (and wait for) left: stop waiting.
            self._next_regroup = min(self._next_regroup, now + self._stagger())
        return self._tick(now)

    def leave(self, now: float) -> list[Action]:
        """This node exits on purpose: it stops acting and answering in its
        view now (before its Leave message goes out) and starts no regroup."""
        out: list[Action] = []
        if self.installed:
            out.append(Event("membership", f"node {self.id} leaves view {self.view}"))
        self.installed = False
        self._was_acting = False
        self._vc = None
        self._next_regroup = float("inf")
        self._leaving = True
        if self.arbiter is not None:
            self.arbiter.release()  # stop defending: the next owner waits out the hold
        return out

    # --- the quorum disk (``disk`` quorum) -------------------------------------------

    def on_disk_read(
        self, tag: str, record: Reservation | None, started: float, now: float
    ) -> list[Action]:
        """A :class:`ReadDisk` finished (``record`` None: it failed)."""
        if self.arbiter is None or self._leaving:
            return []
        out: list[Action] = list(self.arbiter.on_read(tag, record, started, now))
        out += self._tick(now)
        return out

    def on_disk_written(self, tag: str, ok: bool, started: float, now: float) -> list[Action]:
        """A :class:`WriteDisk` finished (``ok`` False: it did not reach both mirrors)."""
        if self.arbiter is None or self._leaving:
            return []
        out: list[Action] = list(self.arbiter.on_write(tag, ok, started, now))
        out += self._tick(now)
        return out

    def on_log_read(self, image: LogImage | None, now: float) -> list[Action]:
        """A :class:`ReadLog` finished (``image`` None: it failed; an empty
        disk is an empty image, not a failure)."""
        out: list[Action] = []
        vc = self._vc
        if vc is None or vc.disk_phase != "read-log" or self._leaving:
            return out
        if image is None:
            self._disk_failed(now, "the quorum log could not be read from both mirrors", out)
        elif unheard := self._forced_unheard(now, vc):
            self._fail_view_change(now, unheard, out)
        elif image.view >= vc.view:
            # A view I never heard of was recorded on the disk: a view change
            # must go above every view that may have formed.
            self._highest_seen = max(self._highest_seen, image.view)
            self._fail_view_change(now, f"the quorum disk records view {image.view}", out)
            self._next_regroup = now
        else:
            best = self._best(vc)
            log, base = best.log, best.base
            if (image.view, image.length) > (best.normal_view, best.length):
                # The disk holds a later log than any promiser (its locker is
                # gone): every entry on it is durable there, hence committed.
                log, base = image.log, image.base
            # Record the new view on the disk before anyone installs it, so
            # every later coordinator (which reads the disk) learns of it.
            vc.disk_image = LogImage(vc.view, log, base)
            vc.disk_phase = "write-view"
            out.append(WriteLog(vc.disk_image))
        out += self._tick(now)
        return out

    def on_log_written(self, image: LogImage, ok: bool, started: float, now: float) -> list[Action]:
        """The :class:`WriteLog` of ``image`` finished (``ok`` False: it did
        not reach both mirrors)."""
        out: list[Action] = []
        length = image.length
        vc = self._vc
        if vc is not None and vc.disk_phase == "write-view" and image == vc.disk_image:
            slow = now - started > self.spec.arbitration.max_io_s
            if not ok or slow:
                self._disk_failed(now, "the new view could not be written to both mirrors", out)
            else:
                self._install_as_coordinator(now, out)
            out += self._tick(now)
            return out
        if self._log_writing != (image.view, length) or self.view != image.view:
            return out
        self._log_writing = None
        assert self.arbiter is not None
        slow = now - started > self.spec.arbitration.max_io_s
        if ok and not slow and self.is_locker:
            self._log_on_disk = max(self._log_on_disk, length)
            self._try_commit(out)
        out += self._tick(now)
        return out

    def _write_log(self, now: float, out: list[Action]) -> None:
        """Locker (``disk`` quorum): put the log on the quorum disk, one write
        at a time, only while it owns the disk."""
        arb = self.arbiter
        if arb is None or not self.is_locker or self._log_writing is not None:
            return
        if self.disk.forced or not arb.owns(now) or self._log_on_disk >= self.disk.length:
            return
        self._log_writing = (self.view, self.disk.length)
        out.append(WriteLog(LogImage(self.view, tuple(self.disk.log), self.disk.base)))

    def _disk_drive(self, now: float, out: list[Action]) -> None:
        """Move a view change's disk step on: arbitrate, then read the log."""
        vc = self._vc
        arb = self.arbiter
        if vc is None or arb is None or vc.disk_phase != "arbitrate":
            return
        if arb.owns(now):
            vc.disk_phase = "read-log"
            out.append(ReadLog())
            return
        if arb.phase is Phase.IDLE and not arb.busy:
            if vc.disk_started:
                holder = arb.defended_by
                self._disk_failed(now, arb.last_error, out, defended=holder is not None)
                return
            vc.disk_started = True
            out.append(Event("arbitration", f"node {self.id} challenges for the quorum disk"))
            out.extend(arb.arbitrate(now))

    def _forced_unheard(self, now: float, vc: _ViewChange) -> str:
        """``disk`` quorum: the updates an operator-forced view committed live
        only on its members until that view takes the disk back, so a view
        may not form on the disk while such a node is heard but has not
        promised (its log would be left out). Empty if none."""
        heard = (self._forced_peers & self.reachable(now)) - set(vc.promises)
        if not heard:
            return ""
        return f"node(s) {sorted(heard)} come from an operator-forced view: they must join"

    def _forced_disk(self, now: float, out: list[Action]) -> None:
        """The locker of an operator-forced view takes the quorum disk as soon
        as it can reach it, so the other site cannot take it when the links
        come back; holding it, it re-forms the view with a natural quorum
        (the override ends). If a live owner defends the disk, the other site
        is running: the override ends at once and this view stops."""
        arb = self.arbiter
        if arb is None or not self.is_locker or not self.disk.forced or self._vc is not None:
            return
        if arb.owns(now):
            if self._next_regroup > now:
                self._next_regroup = now
                self._forced_reason = "holds the quorum disk: the override can end"
            return
        if arb.phase is not Phase.IDLE or arb.busy:
            return
        if self._forced_tried and arb.defended_by is not None:
            self.disk.forced = False
            out.append(Persist())
            out.append(
                Event(
                    "quorum",
                    f"node {arb.defended_by} holds the quorum disk and renews it: the other "
                    "site is running, so the override ends and this view stops",
                )
            )
            self._forced_tried = False
            return
        if now >= self._forced_retry_at:
            self._forced_tried = True
            self._forced_retry_at = now + self.spec.arbitration.min_arbitration_s
            out.extend(arb.arbitrate(now))

    def _disk_failed(
        self, now: float, why: str, out: list[Action], *, defended: bool = False
    ) -> None:
        """The disk step failed. An operator-forced partition still forms its
        view, unless a live owner defended the disk (then the other side is
        running: forcing would give both sides quorum)."""
        vc = self._vc
        assert vc is not None
        out.append(Event("arbitration", f"node {self.id}: quorum disk not taken ({why})"))
        if self.disk.forced and not defended:
            vc.disk_phase = "skipped"
            self._install_as_coordinator(now, out)
            return
        if self.disk.forced:
            self.disk.forced = False
            out.append(Persist())
            out.append(Event("quorum", "the override ends: the quorum disk's owner is alive"))
        self._fail_view_change(now, f"no quorum: {why}", out)

    def on_message(self, src: int, msg: Message | VoteReply, now: float) -> list[Action]:
        """Handle one message from node ``src`` (or the witness)."""
        if self._leaving:
            return []  # leaving: no answers, no promises
        out: list[Action] = []
        if isinstance(msg, Ping):
            self._on_ping(src, msg, now, out)
        elif isinstance(msg, Pong):
            self._on_pong(src, msg, now)
        elif isinstance(msg, Prepare):
            self._on_prepare(src, msg, now, out)
        elif isinstance(msg, Promise):
            self._on_promise(src, msg, now, out)
        elif isinstance(msg, Reject):
            self._on_reject(src, msg, now, out)
        elif isinstance(msg, NewView):
            self._on_new_view(src, msg, now, out)
        elif isinstance(msg, Installed | Appended):
            self._on_acked(src, msg.view, msg.length, now, out)
        elif isinstance(msg, Append):
            self._on_append(src, msg, out)
        elif isinstance(msg, Submit):
            out += self._submit(msg, now)
        elif isinstance(msg, VoteReply):
            self._on_witness(msg, now, out)
        out += self._tick(now)
        return out

    def on_tick(self, now: float) -> list[Action]:
        """Let time pass (the shell calls this at :meth:`next_deadline`)."""
        return self._tick(now)

    def next_deadline(self) -> float:
        """The latest time :meth:`on_tick` must be called by."""
        if self._leaving:
            return float("inf")  # silent for good: nothing to wake for
        deadlines = [self._next_ping]
        if self._vc is not None:
            deadlines.append(self._vc.deadline)
            if self._vc.witness_retry_at is not None:
                deadlines.append(self._vc.witness_retry_at)
        else:
            deadlines.append(self._next_regroup)
        if self._wake_at_act is not None:
            deadlines.append(self._wake_at_act)
        if self.arbiter is not None:
            arb_deadline = self.arbiter.next_deadline()
            if arb_deadline is not None:
                deadlines.append(arb_deadline)
        # Wake when a vote lease runs out, so losing quorum is noticed (and
        # reported) at that moment rather than at the next ping.
        leases = [*self._vote_until.values(), self._witness_until]
        future = [t for t in leases if t > self._now]
        if self.installed and future:
            deadlines.append(min(future))
        return min(deadlines)

    # --- heartbeats ------------------------------------------------------------------

    def _on_ping(self, src: int, msg: Ping, now: float, out: list[Action]) -> None:
        my_view = self.disk.normal_view if self.installed else NO_VIEW
        if self.installed and msg.view == my_view:
            self._last_pong_sent_in_view = now
            if src == my_view[1] and msg.commit > self.disk.commit:
                self._advance_commit(min(msg.commit, self.disk.length), out)
        witness_s = max(0.0, self._tiebreak_until(now) - now) if self.is_locker else 0.0
        if witness_s > 0:
            self._tiebreak_given_until = max(self._tiebreak_given_until, now + witness_s)
        out.append(Send(src, Pong(my_view, msg.sent_at, witness_s, self.disk.forced)))

    def _on_pong(self, src: int, msg: Pong, now: float) -> None:
        sent = msg.ping_sent_at
        if sent > now:
            return  # not a ping of mine: ignore
        self._heard[src] = max(self._heard.get(src, -1e18), sent)
        self._heard_view[src] = msg.view
        if msg.forced:
            self._forced_peers.add(src)
        else:
            self._forced_peers.discard(src)
        self._left.discard(src)
        self._highest_seen = max(self._highest_seen, msg.view)
        if self.installed and msg.view == self.disk.normal_view:
            until = sent + self.spec.lease_s(self.id, src)
            if until > self._vote_until.get(src, -1.0):
                self._vote_until[src] = until
            if src == self.disk.normal_view[1] and msg.witness_s > 0:
                self._witness_until = max(self._witness_until, sent + msg.witness_s)

    def reachable(self, now: float) -> frozenset[int]:
        """Configured nodes that answered a ping within their threshold, and me."""
        return frozenset(
            n
            for n in self.spec.nodes
            if n == self.id or self._heard.get(n, -1e18) + self.spec.lease_s(self.id, n) > now
        )

    # --- regroup ---------------------------------------------------------------------

    def _stagger(self) -> float:
        """Deterministic spread of regroup starts: lower ids go first."""
        return (1 + self.spec.nodes.index(self.id)) * self.spec.timers.heartbeat_interval_s * 0.5

    def _want_regroup(self, now: float) -> str | None:
        if not self.installed and self.id not in self.log_voters():
            # My log evicts me (not committed yet, or I would have stopped)
            # and I am in no view: I start no view change, which could only
            # disrupt the others' (theirs takes me in if the eviction is lost).
            return None
        reach = self.reachable(now)
        if not self.installed:
            return "in no view"
        if now >= self.act_after and not self.acting(now):
            return "view lost quorum"
        locker = self.disk.normal_view[1]
        if self.is_locker:
            if self._forced_reason and self.disk.forced:
                why, self._forced_reason = self._forced_reason, ""
                return why
            gone = self.disk.members - reach
            if gone:
                return f"member(s) {sorted(gone)} not heard"
            if self.committed_voters() != self.view_voters:
                out_ = sorted(self.view_voters - self.committed_voters())
                return f"node(s) {out_} evicted: the next view counts the voters left"
            # A reachable voter answering in another view: a new or restarted
            # node (member or not) that wants to (re)join.
            voters = self.log_voters()
            joiners = {
                n for n in reach - {self.id} if n in voters and self._heard_view.get(n) != self.view
            }
            if joiners:
                return f"node(s) {sorted(joiners)} want to join"
            slow = self._slow_members(now)
            if slow:
                return f"member(s) {sorted(slow)} did not apply an update in time"
            return None
        if locker not in reach:
            return f"locker {locker} not heard"
        return None

    def _slow_members(self, now: float) -> set[int]:
        slow = set()
        for index, t in self._append_time.items():
            if now - t > self.spec.timers.update_timeout_s:
                slow |= {m for m in self.disk.members if self._acked.get(m, 0) < index}
        return slow - {self.id}

    def _start_view_change(self, now: float, why: str, out: list[Action]) -> None:
        view = (max(self._highest_seen[0], self.disk.promised[0]) + 1, self.id)
        self._highest_seen = view
        reach = self.reachable(now)
        if self.is_locker:
            reach -= self._slow_members(now)
        self._vc = _ViewChange(
            view=view,
            started_at=now,
            deadline=now + self.spec.timers.regroup_answer_timeout_s,
            expected=reach,
        )
        self.regroups_started += 1
        out.append(Event("regroup", f"node {self.id} starts view {view}: {why}"))
        for n in self.spec.nodes:
            if n == self.id:
                self._on_prepare(self.id, Prepare(view), now, out)
            else:
                out.append(Send(n, Prepare(view)))

    def _on_prepare(self, src: int, msg: Prepare, now: float, out: list[Action]) -> None:
        d = self.disk
        self._highest_seen = max(self._highest_seen, msg.view)
        if msg.view <= d.promised:
            if src != self.id:
                out.append(Send(src, Reject(msg.view, d.promised, "promised a higher view")))
            return
        if (
            src != self.id
            and self.installed
            and src != d.normal_view[1]
            and self.acting(now)
            and d.normal_view[1] in self.reachable(now)
        ):
            # Stickiness: a working view's members do not follow a stranger
            # while they hear their locker; the locker will take it in.
            out.append(Send(src, Reject(msg.view, d.promised, LOCKER_ALIVE)))
            return
        if self._was_acting or self.installed:
            out.append(Event("view", f"node {self.id} leaves view {d.normal_view} for {msg.view}"))
        d.promised = msg.view
        self.installed = False
        self._was_acting = False
        out.append(Persist())
        if self.arbiter is not None and src != self.id:
            # Another coordinator takes the disk (seconds: a challenge and its
            # settle wait): stop my own attempt and let it finish, instead of
            # killing each other's arbitration with ever higher views.
            self.arbiter.release()
            self._vc = None
            a = self.spec.arbitration
            # challenge read, wait, read, claim, settle wait, read, then the
            # log read and the new view's write: six disk operations in all
            patience = a.min_arbitration_s + a.settle_s + 6 * a.max_io_s
            patience += self.spec.timers.regroup_answer_timeout_s + self._stagger()
            self._next_regroup = max(self._next_regroup, now + patience)
        release_s = max(0.0, self._last_pong_sent_in_view + self.spec.max_lease_s - now)
        # Members may count the tie-breaker vote I passed on as locker until then.
        release_s = max(release_s, self._tiebreak_given_until - now)
        fence_s = max(0.0, self._fence_until - now)
        promise = Promise(
            msg.view, d.normal_view, tuple(d.log), d.commit, release_s, fence_s, d.base
        )
        if src == self.id:
            if self._vc is not None and self._vc.view == msg.view:
                self._vc.promises[self.id] = promise
        else:
            out.append(Send(src, promise))

    def _on_promise(self, src: int, msg: Promise, now: float, out: list[Action]) -> None:
        vc = self._vc
        if vc is None or msg.view != vc.view or vc.witness_asked_at is not None:
            return
        vc.promises[src] = msg
        if vc.disk_phase is not None:
            return  # taking the disk: a late promiser joins the view it forms
        if vc.expected <= set(vc.promises) | vc.rejected:
            self._conclude(now, out)

    def _on_reject(self, src: int, msg: Reject, now: float, out: list[Action]) -> None:
        self._highest_seen = max(self._highest_seen, msg.promised)
        vc = self._vc
        if vc is None or msg.view != vc.view or vc.witness_asked_at is not None:
            return
        vc.rejected.add(src)
        if msg.reason == LOCKER_ALIVE:
            vc.acting_elsewhere.add(src)
        if vc.expected <= set(vc.promises) | vc.rejected and vc.disk_phase is None:
            self._conclude(now, out)

    def _best(self, vc: _ViewChange) -> Promise:
        return max(vc.promises.values(), key=lambda p: (p.normal_view, p.length))

    def _formation(self, vc: _ViewChange, *, witness_vote: bool = False) -> QuorumDecision:
        """May the promisers form the new view? They must make a quorum of
        the new view's voter set: the one the chosen log defines."""
        best = self._best(vc)
        return decide(
            self.spec.kind,
            self.spec.voters(best.base, best.log),
            frozenset(vc.promises),
            witness_vote=witness_vote,
            forced=self.disk.forced,
        )

    def _conclude(self, now: float, out: list[Action]) -> None:
        vc = self._vc
        assert vc is not None
        members = frozenset(vc.promises)
        known = max(p.commit for p in vc.promises.values())
        if vc.disk_phase is None and self._evicted_by(self._best(vc), known, now, out):
            return
        unheard = self._forced_unheard(now, vc)
        if self.spec.kind is QuorumKind.DISK and vc.disk_phase is None and unheard:
            self._fail_view_change(now, unheard, out)
            return
        if self.spec.kind is QuorumKind.DISK and vc.disk_phase is None and vc.acting_elsewhere:
            # Another view is acting (it holds the disk, or the operator forced
            # it): challenging for the disk now could only end its reign
            # behind its back. Its locker will take these nodes in.
            who = sorted(vc.acting_elsewhere)
            self._fail_view_change(now, f"node(s) {who} act in a view with a live locker", out)
            return
        if self.spec.kind is QuorumKind.DISK and vc.disk_phase is None:
            # Whoever holds the disk has quorum: take it (or keep it), then
            # read the quorum log it holds before installing.
            vc.disk_phase = "arbitrate"
            a = self.spec.arbitration
            vc.deadline = now + a.max_arbitration_s + a.settle_s + 2 * a.max_io_s
            self._disk_drive(now, out)
            return
        nodes_only = self._formation(vc)
        if nodes_only.has_quorum:
            self._install_as_coordinator(now, out)
            return
        if self.spec.kind is QuorumKind.MAJORITY_WITNESS and vc.witness_asked_at is None:
            best = self._best(vc)
            vc.witness_asked_at = now
            vc.deadline = now + self.spec.timers.regroup_answer_timeout_s
            vc.witness_request = VoteRequest(
                vc.view,
                members & self.spec.voters(best.base, best.log),
                (best.normal_view, best.length),
                record=False,
                echo=now,
            )
            out.append(Send(WITNESS, vc.witness_request))
            return
        self._fail_view_change(now, f"no quorum: {nodes_only.reason}", out)

    def _evicted_by(self, best: Promise, known_commit: int, now: float, out: list[Action]) -> bool:
        """Does the log a view change chose evict me? Then I do not form the
        view: if the eviction is committed (within ``known_commit``; I was
        away when it committed) I stop, else another node forms it."""
        if self.id in self.spec.voters(best.base, best.log):
            return False
        done = best.log[: max(0, known_commit - best.base.index)]
        if self.id not in self.spec.voters(best.base, done):
            self._vc = None
            self._stop_evicted(now, out)
        else:
            self._fail_view_change(now, "the chosen log evicts this node", out)
        return True

    def _fail_view_change(self, now: float, why: str, out: list[Action]) -> None:
        vc = self._vc
        assert vc is not None
        out.append(Event("regroup", f"node {self.id}: view {vc.view} not formed ({why})"))
        self._vc = None
        self._regroup_attempts += 1
        backoff = min(self._regroup_attempts, 8) * self.spec.timers.regroup_answer_timeout_s / 2
        self._next_regroup = now + backoff + self._stagger()

    def _install_as_coordinator(self, now: float, out: list[Action]) -> None:
        vc = self._vc
        assert vc is not None
        if self.disk.promised != vc.view:
            self._vc = None  # I promised a higher view meanwhile
            return
        best = self._best(vc)
        image = vc.disk_image
        if image is not None:
            # Written to the quorum disk with this view: all of it is durable.
            best = Promise(vc.view, vc.view, image.log, image.length, 0.0, 0.0, image.base)
        known = max(p.commit for p in vc.promises.values())
        if image is not None:
            known = image.length  # on the quorum disk: committed
        if self._evicted_by(best, known, now, out):
            return
        voters = self.spec.voters(best.base, best.log)
        members = frozenset(vc.promises) & voters
        wait_s = max(p.release_s for p in vc.promises.values())
        old = self.disk.normal_view
        if (
            old != NO_VIEW
            and all(p.normal_view == old for p in vc.promises.values())
            and self.disk.members <= set(vc.promises) | self._left
        ):
            # Every member of the old view promised (so stopped acting in it)
            # or left on purpose (stopped first): nobody can still act in it,
            # and only the old view's own start fence (against still older
            # views) must be kept.
            wait_s = max(p.fence_s for p in vc.promises.values())
        if vc.witness_reply is not None:
            wait_s = max(wait_s, vc.witness_reply_at + vc.witness_reply.wait_s - now)
        commit = max(p.commit for p in vc.promises.values())
        if image is not None:
            commit = image.length
        commit = min(commit, best.length)
        d = self.disk
        d.normal_view = vc.view
        d.members = members
        d.voters = voters
        self._adopt(best.base, best.log)
        self._view_start_length = d.length
        natural = decide(self.spec.kind, voters, members).has_quorum
        if self.spec.kind is QuorumKind.DISK:
            natural = image is not None  # it holds the disk
        if d.forced and (natural or vc.witness_reply is not None):
            d.forced = False
            out.append(Event("quorum", f"view {vc.view} has quorum again: the override ends"))
        out.append(Persist())
        self._enter_view(now, wait_s, out)
        self._advance_commit(commit, out)
        self._acked = {self.id: d.length}
        self._append_time = {}
        msg = NewView(vc.view, members, tuple(d.log), commit, wait_s, d.forced, d.base)
        for m in members - {self.id}:
            out.append(Send(m, msg))
        out.append(Event("view", f"view {vc.view} formed by {self.id}: members {sorted(members)}"))
        self._vc = None
        self._regroup_attempts = 0
        if image is not None:
            self._log_on_disk = image.length

    def _enter_view(self, now: float, wait_s: float, out: list[Action]) -> None:
        self._log_on_disk = 0
        self._log_writing = None
        self.installed = True
        self.act_after = now + wait_s
        self._fence_until = self.act_after
        self._wake_at_act = self.act_after if wait_s > 0 else None
        self._vote_until = {}
        if self._vc is None or self._vc.witness_reply is None:
            self._witness_until = 0.0
        self._next_regroup = now + self.spec.timers.regroup_answer_timeout_s + self._stagger()
        self._next_ping = now  # ping at once: the view's votes start counting

    def _on_new_view(self, src: int, msg: NewView, now: float, out: list[Action]) -> None:
        d = self.disk
        if msg.view != d.promised or src != msg.view[1] or self.id not in msg.members:
            return
        if not _contiguous(msg.base, msg.log):
            return  # not a log: drop it (the coordinator resends or times out)
        d.normal_view = msg.view
        d.members = msg.members
        d.voters = self.spec.voters(msg.base, msg.log)
        self._adopt(msg.base, msg.log)
        d.forced = msg.forced
        out.append(Persist())
        self._enter_view(now, msg.act_wait_s, out)
        self._witness_until = 0.0
        self._advance_commit(min(msg.commit, d.length), out)
        out.append(Send(src, Installed(msg.view, d.length)))

    def _adopt(self, base: Snapshot, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Take the log ``base`` + ``entries`` as mine. My commit index never
        goes back: a snapshot beyond it means those entries are committed."""
        d = self.disk
        d.base = base
        d.log = list(entries)
        if base.index > d.commit:
            d.commit = base.index
            self.applied = base.index

    def _on_witness(self, msg: VoteReply, now: float, out: list[Action]) -> None:
        vc = self._vc
        if vc is not None and msg.view == vc.view and vc.witness_asked_at is not None:
            if not msg.granted and msg.wait_s > 0 and now + msg.wait_s < vc.deadline:
                vc.witness_retry_at = now + msg.wait_s  # it is still collecting: ask again
                return
            if not msg.granted:
                self._fail_view_change(now, f"witness refused: {msg.reason}", out)
                return
            with_witness = self._formation(vc, witness_vote=True)
            if not with_witness.has_quorum:
                self._fail_view_change(now, f"no quorum: {with_witness.reason}", out)
                return
            vc.witness_reply = msg
            vc.witness_reply_at = now
            self._witness_until = msg.echo + msg.lease_s
            self._witness_recorded = msg.recorded
            self._install_as_coordinator(now, out)
            return
        if self.is_locker and msg.view == self.view and msg.granted:
            self._witness_until = max(self._witness_until, msg.echo + msg.lease_s)
            self._witness_recorded = max(self._witness_recorded, msg.recorded)
            self._try_commit(out)

    # --- global updates --------------------------------------------------------------

    def _submit(self, sub: Submit, now: float) -> list[Action]:
        out: list[Action] = []
        if self.is_locker and self.acting(now):
            if sub.uid in self.disk.base.uids or any(e.uid == sub.uid for e in self.disk.log):
                return out  # a resubmission: already in the log
            if self._defer_eviction(sub, out):
                return out
            if len(self.disk.log) >= self.spec.max_log_entries:
                out.append(
                    Event(
                        "update",
                        f"log full ({len(self.disk.log)} entries after the snapshot): refused",
                    )
                )
                return out
            entry = Entry(self.view, self.disk.length + 1, sub.uid, sub.payload)
            self.disk.log.append(entry)
            out.append(Persist())
            self._acked[self.id] = self.disk.length
            self._append_time[entry.index] = now
            for m in self.disk.members - {self.id}:
                out.append(Send(m, Append(self.view, entry.index - 1, (entry,), self.disk.commit)))
            self._write_log(now, out)
            self._try_commit(out)
            return out
        if self.installed and not self.is_locker:
            out.append(Send(self.view[1], sub))
            return out
        if len(self._pending) < self.spec.max_pending_submits:
            self._pending.append(sub)
        else:
            out.append(Event("update", f"update {sub.uid} dropped: {len(self._pending)} queued"))
        return out

    def _defer_eviction(self, sub: Submit, out: list[Action]) -> bool:
        """Locker: an eviction waits (queued, bounded) while another eviction
        is in the log beyond my view's voters, or while the log my view
        started with is not committed in it; it is refused if it would evict
        the last voter. True if ``sub`` was not appended."""
        node = self.spec.removal(sub.payload)
        voters = self.log_voters()
        if node is None or node not in voters:
            return False  # not an eviction, or of a node already out: appended as is
        why = ""
        if len(voters) <= 1:
            out.append(Event("update", f"update {sub.uid} refused: it would evict the last voter"))
            return True
        if voters != self.view_voters:
            gone = sorted(self.view_voters - voters)
            why = f"the eviction of node(s) {gone} must take effect first"
        elif self.disk.commit < self._view_start_length:
            why = "the view's log is not committed yet"
        if not why:
            self._deferred_said.discard(sub.uid)
            return False
        if sub.uid not in self._deferred_said:
            if len(self._deferred_said) >= self.spec.max_pending_submits:
                self._deferred_said.clear()  # bounded: at worst a wait is reported again
            self._deferred_said.add(sub.uid)
            out.append(Event("update", f"eviction of node {node} waits: {why}"))
        if len(self._pending) < self.spec.max_pending_submits:
            self._pending.append(sub)
        else:
            out.append(Event("update", f"update {sub.uid} dropped: {len(self._pending)} queued"))
        return True

    def _stop_evicted(self, now: float, out: list[Action]) -> None:
        """My eviction is committed: stop, as a planned leave does (the
        shell announces the exit and ends the service)."""
        self.evicted = True
        out.extend(self.leave(now))
        out.append(Event("membership", f"node {self.id} is evicted: it stops"))

    def _on_append(self, src: int, msg: Append, out: list[Action]) -> None:
        d = self.disk
        if not self.installed or msg.view != d.normal_view or src != msg.view[1]:
            return
        if msg.base is not None:
            # I am behind the locker's snapshot: take it and what follows.
            if msg.base.index > d.length and _contiguous(msg.base, msg.entries):
                self._adopt(msg.base, msg.entries)
                out.append(Persist())
        elif msg.after <= d.length:
            new = [e for e in msg.entries if e.index > d.length]
            if new and new[0].index == d.length + 1 and _contiguous(Snapshot(d.length), new):
                d.log.extend(new)
                out.append(Persist())
        out.append(Send(src, Appended(msg.view, d.length)))
        if msg.commit > d.commit:
            self._advance_commit(min(msg.commit, d.length), out)

    def _on_acked(self, src: int, view: View, length: int, now: float, out: list[Action]) -> None:
        if not self.is_locker or view != self.view:
            return
        prev = self._acked.get(src, 0)
        self._acked[src] = max(prev, length)
        d = self.disk
        if length < d.length and length <= prev:
            # No progress since the last answer: it missed an Append; resend
            # (the snapshot too if it is behind it).
            if length < d.base.index:
                msg = Append(self.view, d.base.index, tuple(d.log), d.commit, d.base)
            else:
                msg = Append(self.view, length, self._after(length), d.commit)
            out.append(Send(src, msg))
        self._try_commit(out)

    def _voters_after(self) -> frozenset[int]:
        """The voter set my log leads to (my view's, or less a pending
        eviction): commits need a quorum of it too."""
        return self.log_voters()

    def _try_commit(self, out: list[Action]) -> None:
        d = self.disk
        need = commit_needed(self.spec.kind, len(self.view_voters))
        # An eviction in the log beyond my view's voters: commits also need a
        # quorum of the voters left, so the next view's voters hold them
        # even when the evicted node, which may have voted, stops.
        after = self._voters_after()
        need_after = 0
        if after != self.view_voters:
            need_after = commit_needed(self.spec.kind, len(after))
        if d.forced:
            need = min(need, len(d.members))  # the operator's partition: every member
            need_after = 0  # every member acknowledges: the voters left among them too
            if self.spec.kind is QuorumKind.DISK:
                need = len(d.members)  # no disk to hold the log: every member must
        index = d.length
        while index > d.commit:
            if self.spec.kind is QuorumKind.DISK and not d.forced:
                # The quorum log lives on the disk: durable there is committed.
                if index <= self._log_on_disk:
                    break
                index -= 1
                continue
            durable = {m for m in d.members if self._acked.get(m, 0) >= index}
            witness = int(
                self.spec.kind is QuorumKind.MAJORITY_WITNESS
                and self._witness_recorded >= (self.view, index)
            )
            if len(durable) + witness >= need and len(durable & after) + witness >= need_after:
                break
            index -= 1
        if index > d.commit:
            for i in list(self._append_time):
                if i <= index:
                    del self._append_time[i]
            self._advance_commit(index, out)
            for m in d.members - {self.id}:
                out.append(Send(m, Append(self.view, d.length, (), d.commit)))

    def _advance_commit(self, index: int, out: list[Action]) -> None:
        d = self.disk
        if index <= d.commit:
            return
        d.commit = index
        out.append(Persist())
        self.applied = index

    # --- time ------------------------------------------------------------------------

    def _tick(self, now: float) -> list[Action]:
        self._now = max(self._now, now)
        out: list[Action] = []
        if self._leaving:
            return out  # silent: no pings, no regroups
        if self.id not in self.committed_voters():
            self._stop_evicted(now, out)
            return out
        if self._wake_at_act is not None and now >= self._wake_at_act:
            self._wake_at_act = None
        acting = self.acting(now)
        if acting != self._was_acting:
            out.append(
                Event(
                    "quorum",
                    f"node {self.id} {'gains' if acting else 'loses'} quorum in view {self.view}",
                )
            )
            self._was_acting = acting
        if self.arbiter is not None:
            out.extend(self.arbiter.on_tick(now))
            self._disk_drive(now, out)
            self._write_log(now, out)
            self._forced_disk(now, out)
        if now >= self._next_ping:
            self._next_ping = now + self.spec.timers.heartbeat_interval_s
            view = self.disk.normal_view if self.installed else NO_VIEW
            commit = self.disk.commit if self.is_locker else 0
            voters = self.committed_voters() | self.view_voters
            for n in self.spec.nodes:
                if n != self.id and n in voters:
                    out.append(Send(n, Ping(view, now, commit)))
            if self.is_locker and self.spec.kind is QuorumKind.MAJORITY_WITNESS:
                after = self._voters_after()
                record = len(self.disk.members) < commit_needed(
                    self.spec.kind, len(self.view_voters)
                ) or len(self.disk.members & after) < commit_needed(self.spec.kind, len(after))
                out.append(
                    Send(
                        WITNESS,
                        VoteRequest(
                            self.view,
                            self.disk.members,
                            (self.view, self.disk.length),
                            record=record,
                            echo=now,
                        ),
                    )
                )
        vc = self._vc
        if vc is not None and vc.witness_retry_at is not None and now >= vc.witness_retry_at:
            assert vc.witness_request is not None
            vc.witness_retry_at = None
            vc.witness_request = dataclasses.replace(vc.witness_request, echo=now)
            out.append(Send(WITNESS, vc.witness_request))
        if vc is not None and now >= vc.deadline:
            if vc.witness_asked_at is not None:
                self._fail_view_change(now, "the witness did not answer", out)
            elif vc.promises:
                self._conclude(now, out)
            else:
                self._fail_view_change(now, "no answers", out)
        if self._vc is None and now >= self._next_regroup:
            why = self._want_regroup(now)
            if why is not None:
                self._start_view_change(now, why, out)
            else:
                self._next_regroup = now + self.spec.timers.heartbeat_interval_s
        if self._pending and self.installed and acting:
            pending, self._pending = self._pending, []
            for sub in pending:
                out += self._submit(sub, now)
        return out


def _contiguous(base: Snapshot, entries: tuple[Entry, ...] | list[Entry]) -> bool:
    """Do ``entries`` follow ``base`` without a gap (indices base.index+1, ...)?"""
    return all(e.index == base.index + i for i, e in enumerate(entries, start=1))
