"""Messages of the cluster service's node core (docs/cluster.md, "Protocol").

Frozen dataclasses; the shell encodes and authenticates them (heartbeats as
MAC'd datagrams, the rest over mutual TLS). Times never cross the wire as
timestamps to be compared with another node's clock: a ping's ``sent_at`` is
echoed back to its sender only, and leases travel as durations.

Views are ``(counter, coordinator)`` pairs: totally ordered, and two
coordinators never propose the same view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

View = tuple[int, int]
NO_VIEW: View = (0, -1)


@dataclass(frozen=True, slots=True)
class Entry:
    """One configuration update in the log: appended by the locker of ``view``
    at position ``index`` (1-based); ``uid`` makes a resubmission a no-op."""

    view: View
    index: int
    uid: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The log's compacted prefix (the checkpoint a log reset leaves):
    entries ``1..index`` are folded into ``state``, the configuration
    database as it stood after applying them (opaque to the core; the shell
    makes and checks it). Only committed entries are ever compacted, so two
    snapshots at one index hold the same state. ``uids`` are the last
    compacted updates' ids (bounded), so a resubmission that arrives after
    its entry was compacted is still recognised. ``removed``: the nodes the
    compacted entries evicted (they no longer count in the vote total; the
    core needs them without reading the opaque ``state``)."""

    index: int = 0
    state: Any = None
    uids: tuple[str, ...] = ()
    removed: frozenset[int] = frozenset()


NO_SNAPSHOT = Snapshot()


def log_length(base: Snapshot, tail: tuple[Entry, ...] | list[Entry]) -> int:
    """Length of a log kept as a snapshot plus the entries after it."""
    return base.index + len(tail)


@dataclass(frozen=True, slots=True)
class Ping:
    """Heartbeat, to every configured node every ``heartbeat_interval_s``."""

    view: View
    sent_at: float  # the sender's clock, echoed in the Pong
    commit: int  # the locker's commit index (0 from others)


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping. ``view`` is the answerer's installed view (NO_VIEW if
    none): only a Pong in the pinger's own view counts as that member's vote.
    ``witness_s``: if the answerer is its view's locker, how much longer it
    holds the witness's vote (else 0)."""

    view: View
    ping_sent_at: float
    witness_s: float
    forced: bool = False  # the answerer's last view was forced by the operator (not yet undone)


@dataclass(frozen=True, slots=True)
class Prepare:
    """A coordinator starts a view change to ``view``."""

    view: View


@dataclass(frozen=True, slots=True)
class Promise:
    """The acceptor will take no view below ``view`` and has stopped answering
    pings in its old view. ``release_s``: after this long, no node can still
    count this acceptor's vote for the old view. Carries its log (``base``
    plus the entries after it, ``log``) so the coordinator can pick the most
    recent one."""

    view: View
    normal_view: View
    log: tuple[Entry, ...]
    commit: int
    release_s: float
    fence_s: float = 0.0  # how long the acceptor's current view must still wait before acting
    base: Snapshot = NO_SNAPSHOT

    @property
    def length(self) -> int:
        return log_length(self.base, self.log)


@dataclass(frozen=True, slots=True)
class Reject:
    """A Prepare refused: ``promised`` is at least as high (the coordinator
    retries above it), or ``reason`` says why (a live locker exists)."""

    view: View
    promised: View
    reason: str


@dataclass(frozen=True, slots=True)
class NewView:
    """The coordinator installs ``view`` with ``members`` and the chosen log
    (``base``, the checkpoint, plus the entries after it: what a joiner
    receives); no member acts in it before ``act_wait_s`` after receiving this."""

    view: View
    members: frozenset[int]
    log: tuple[Entry, ...]
    commit: int
    act_wait_s: float
    forced: bool = False  # the view exists by force-quorum (members keep the override)
    base: Snapshot = NO_SNAPSHOT


@dataclass(frozen=True, slots=True)
class Installed:
    """A member installed ``view``; its log (durable) has ``length`` entries."""

    view: View
    length: int


@dataclass(frozen=True, slots=True)
class Append:
    """The locker appends ``entries`` after position ``after`` (durably, before
    the member answers). With ``base`` (a member behind the locker's
    compacted prefix), ``after`` is ``base.index`` and the member replaces its
    log with the snapshot and ``entries``."""

    view: View
    after: int
    entries: tuple[Entry, ...]
    commit: int
    base: Snapshot | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """A member's durable log length in ``view`` (also its answer to a gap)."""

    view: View
    length: int


@dataclass(frozen=True, slots=True)
class Submit:
    """A configuration update for the locker (forwarded by a non-locker)."""

    uid: str
    payload: Any


Message = (
    Ping | Pong | Prepare | Promise | Reject | NewView | Installed | Append | Appended | Submit
)
