"""Sans-I/O replication cores: what the primary ships and when a write completes,
what the secondary applies and acknowledges.

Neither class does I/O or reads a clock; time comes in as ``now_s``. The volume
shell (:mod:`replicator.volume`) feeds them events and carries out what they say,
and the deterministic simulation (:mod:`replicator.simulation`) drives the very
same classes through every interleaving hypothesis can find.

Primary guarantees:

* Every write gets the next sequence number; batches go out in sequence order.
* Sync mode: a write completes when the local store holds it and the peer has
  applied it (FUA: durable on both). Async mode: when the local store holds it.
* The retained log keeps every write the peer has not made durable, bounded by
  ``max_lag_bytes``, so after a link cut or a secondary crash the peer resumes
  from its own durable point with no gap. Past the bound the policy blocks
  writers or (pull-ahead) switches to dirty-region tracking and marks the peer
  outdated; an outdated peer is sent nothing more, so it keeps a consistent,
  if older, image.

Secondary guarantees:

* Applies writes strictly in sequence order, refusing (``ProtocolError``) any
  batch that does not continue exactly where the previous one ended, and any
  entry out of range, before applying anything from it.
* Acknowledges cumulatively; ``durable_seq`` never exceeds what it has synced.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import xxhash

from geoclus.errors import ProtocolError
from replicator.bitmap import DEFAULT_REGION_BYTES, DirtyBitmap
from replicator.frames import (
    DIGEST_BYTES,
    ENTRY_HEADER_BYTES,
    WELCOME_FLAG_RESYNC,
    WELCOME_FLAG_SEND_BITMAP,
    Ack,
    Differs,
    Flush,
    Hello,
    Mode,
    PeerBitmap,
    Refuse,
    Welcome,
    WriteEntry,
    WriteKind,
    Writes,
    entry_data_bytes,
)

PeerLossPolicy = Literal["suspend", "continue"]
CongestionPolicy = Literal["block", "pull-ahead"]


@dataclass(frozen=True)
class ReplicationPolicy:
    """How a volume replicates. Sizes in bytes, intervals in seconds.

    * ``mode``: ``Mode.SYNC`` or ``Mode.ASYNC``.
    * ``on_peer_loss`` (sync): ``suspend`` blocks writes until the peer is back
      or an operator allows degraded running; ``continue`` completes writes
      locally and tracks dirty regions.
    * ``on_congestion`` (async): when the retained log would pass
      ``max_lag_bytes``, ``block`` throttles writers, ``pull-ahead`` switches to
      dirty-region tracking and marks the peer outdated.
    * ``max_lag_bytes``: bound of the retained log (writes the peer has not made
      durable), in wire bytes (data plus a 24-byte entry header).
    * ``max_in_flight_bytes``: bound of bytes sent but not yet acknowledged.
    * ``max_batch_bytes`` / ``max_batch_entries``: bound of one WRITES frame.
    * ``region_bytes``: dirty-bitmap granularity.
    * ``peer_flush_interval_s``: how often the primary asks the peer to make
      applied writes durable so the retained log can be trimmed.
    * ``resync_checksum``: a resync first compares xxh3 digests of each region
      (DIGEST entries, compared by the target at the same point of the
      sequence) and copies only the regions that differ.
    """

    mode: Mode = Mode.SYNC
    on_peer_loss: PeerLossPolicy = "suspend"
    on_congestion: CongestionPolicy = "block"
    max_lag_bytes: int = 256 * 1024 * 1024
    max_in_flight_bytes: int = 32 * 1024 * 1024
    max_batch_bytes: int = 4 * 1024 * 1024
    max_batch_entries: int = 1024
    region_bytes: int = DEFAULT_REGION_BYTES
    peer_flush_interval_s: float = 1.0
    resync_checksum: bool = True

    def __post_init__(self) -> None:
        if self.on_peer_loss not in ("suspend", "continue"):
            raise ValueError(
                f"on_peer_loss must be 'suspend' or 'continue', not {self.on_peer_loss!r}"
            )
        if self.on_congestion not in ("block", "pull-ahead"):
            raise ValueError(
                f"on_congestion must be 'block' or 'pull-ahead', not {self.on_congestion!r}"
            )
        for name in (
            "max_lag_bytes",
            "max_in_flight_bytes",
            "max_batch_bytes",
            "max_batch_entries",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass
class LogEntry:
    """A write the primary has sequenced. ``cum_bytes``: wire bytes of all writes
    up to and including this one (for lag and in-flight accounting)."""

    seq: int
    kind: WriteKind
    offset: int
    length: int
    fua: bool
    data: bytes
    submit_s: float
    cum_bytes: int
    local_done: bool = False
    completed: bool = False
    in_log: bool = True
    # A resync entry is sequenced before its data is read; it is shipped only
    # once ``ready`` (entries go out strictly in order, so later ones wait).
    ready: bool = True
    resync: bool = False

    @property
    def wire_bytes(self) -> int:
        return ENTRY_HEADER_BYTES + entry_data_bytes(self.kind, self.length)

    def to_wire(self) -> WriteEntry:
        return WriteEntry(self.seq, self.kind, self.offset, self.length, self.fua, self.data)


Admission = Literal["admit", "wait", "overflow"]


@dataclass
class PrimaryStats:
    writes: int = 0
    bytes_written: int = 0
    batches_sent: int = 0
    entries_sent: int = 0
    resends: int = 0
    went_outdated: int = 0
    resync_writes: int = 0
    max_lag_bytes_seen: int = 0
    max_lag_writes_seen: int = 0
    connects: int = 0
    disconnects: int = 0
    refusals: list[str] = field(default_factory=list)


@dataclass
class VerifyRun:
    """One online verify toward a peer: every region's digest is compared by
    the peer at the same point of the write sequence, so a write in flight can
    never cause a false mismatch. ``differ``: regions that really differ;
    ``resync``: copy them as they are found."""

    resync: bool
    started_s: float
    total_bytes: int
    regions: int
    next_region: int = 0
    done_bytes: int = 0
    differ: list[int] = field(default_factory=list)
    copied: int = 0
    finished_s: float | None = None
    aborted: str | None = None

    @property
    def running(self) -> bool:
        return self.finished_s is None and self.aborted is None


@dataclass(frozen=True)
class BackgroundStep:
    """The next piece of background work toward a peer: copy a region (a WRITE
    of its current content) or compare it (a DIGEST of its current content)."""

    kind: WriteKind
    region: int
    offset: int
    length: int
    purpose: str  # "resync" or "verify"


@dataclass
class PeerState:
    """What the primary knows about one secondary (one connection at a time).

    ``applied``/``durable``: the peer's cumulative acknowledgements.
    ``sent``: highest sequence number shipped on the current connection.
    ``cum_applied``/``cum_sent``: wire bytes up to those points (lag and
    in-flight accounting). ``outdated``: the peer is missing writes that are no
    longer in the retained log; they are recorded in ``bitmap`` and nothing
    more is shipped to it until a resync.
    """

    name: str
    bitmap: DirtyBitmap
    connected: bool = False
    applied: int = 0
    durable: int = 0
    sent: int = 0
    cum_applied: int = 0
    cum_sent: int = 0
    outdated: bool = False
    flush_wanted: int = 0
    flush_sent: int = 0
    next_flush_id: int = 1
    last_flush_sent_s: float = 0.0
    # Resync toward this peer: the regions to copy, how many are sequenced,
    # and the sequence number after which it is consistent (set once all are).
    resyncing: bool = False
    resync_full: bool = False
    resync_regions: list[int] = field(default_factory=list)
    resync_next: int = 0
    resync_total_bytes: int = 0
    resync_done_bytes: int = 0
    resync_last_seq: int | None = None
    resync_max_seq: int = 0
    resync_announced: bool = False
    # The peer's own dirty bitmap is still arriving (PEER_BITMAP): its regions
    # join the resync, which cannot end before the last frame.
    awaiting_peer_bitmap: bool = False
    resync_region_set: set[int] = field(default_factory=set)
    resync_checksum: bool = False
    resync_identical_bytes: int = 0
    resync_copied_bytes: int = 0
    # Background work in flight: DIGEST entries awaiting the peer's verdict
    # (seq -> region, purpose), regions to copy (region, purpose), and resync
    # entries sent but not yet applied (seq, wire bytes) for rate control.
    digests_out: dict[int, tuple[int, str]] = field(default_factory=dict)
    copy_queue: deque[tuple[int, str]] = field(default_factory=deque)
    resync_unacked: deque[tuple[int, int]] = field(default_factory=deque)
    resync_unacked_bytes: int = 0
    # Online verify (docs/protocol.md, "Verify").
    verify: VerifyRun | None = None
    # The peer has applied everything (last reported transition).
    caught_up: bool = False


class PrimaryCore:
    """Replication state of the primary copy of one volume.

    The write sequence and the retained log are shared; each secondary has its
    own :class:`PeerState` (``peers``), so more secondaries are more peers and
    more connections, not a different core. Methods that concern one peer take
    ``peer`` (its name); ``None`` means the only peer, which is all this
    version configures.
    """

    def __init__(
        self,
        policy: ReplicationPolicy,
        size_bytes: int,
        *,
        last_seq: int = 0,
        peer_outdated: bool = False,
        peers: tuple[str, ...] = ("peer",),
        bitmaps: dict[str, DirtyBitmap] | None = None,
    ) -> None:
        if not peers or len(set(peers)) != len(peers):
            raise ValueError("peers must be a non-empty tuple of distinct names")
        self.policy = policy
        self.size_bytes = size_bytes
        self.last_seq = last_seq
        # Retained log: seq -> entry for log_first <= seq <= last_seq
        # (contiguous); empty while every peer is outdated.
        self._log: dict[int, LogEntry] = {}
        self._log_first = last_seq + 1
        self.log_bytes = 0
        self._cum_total = 0
        self._cum_before_first = 0
        self._pending: dict[int, LogEntry] = {}
        loaded = bitmaps or {}
        self.peers: dict[str, PeerState] = {
            name: PeerState(
                name,
                loaded.get(name) or DirtyBitmap(size_bytes, policy.region_bytes),
                applied=last_seq,
                durable=last_seq,
                sent=last_seq,
                outdated=peer_outdated,
            )
            for name in peers
        }
        self.degraded_allowed = False
        self.stats = PrimaryStats()
        # Regions that became dirty since the shell last asked (it persists
        # them write-ahead), and peers whose bitmap was cleared since.
        self._new_dirty: dict[str, list[int]] = {name: [] for name in peers}
        self._cleared: set[str] = set()
        self._went_outdated: set[str] = set()
        self._verify_finished: set[str] = set()

    def _mark(self, p: PeerState, offset: int, length: int) -> None:
        self._new_dirty[p.name].extend(p.bitmap.mark(offset, length))

    def take_new_dirty(self) -> dict[str, list[int]]:
        """Regions newly marked dirty per peer since the last call (to persist
        before the write that dirtied them is applied locally)."""
        out = {name: regions for name, regions in self._new_dirty.items() if regions}
        for name in out:
            self._new_dirty[name] = []
        return out

    def take_went_outdated(self) -> set[str]:
        """Peers that went outdated since the last call (their data history
        now diverges from ours: the shell starts a new generation)."""
        out, self._went_outdated = self._went_outdated, set()
        return out

    def can_resume(self, remote: Hello, peer: str | None = None) -> bool:
        """True if the retained log holds every write ``remote`` lacks (so it
        can catch up in order instead of by a resync)."""
        p = self._peer(peer)
        applied = remote.applied_seq
        return not p.outdated and applied <= self.last_seq and applied + 1 >= self._log_first

    def start_resync(
        self,
        remote: Hello,
        version: int,
        *,
        full: bool,
        peer: str | None = None,
        with_peer_bitmap: bool = False,
    ) -> Welcome:
        """Begin a resync of ``peer`` from this copy.

        The peer is rebased: it continues at our next sequence number, every
        region that may differ (its bitmap, or every region for ``full``) is
        re-sequenced by the shell (:meth:`next_resync_step`,
        :meth:`submit_resync`, :meth:`fill_resync`) as a copy of its current
        content, or first as a DIGEST when ``policy.resync_checksum`` (only the
        regions the peer reports different are then copied), and new
        application writes are shipped in order around them. The peer is
        inconsistent until it has applied and made durable everything up to
        ``resync_last_seq``. ``with_peer_bitmap``: the peer is asked for its own
        dirty bitmap (:meth:`on_peer_bitmap`), whose regions join the resync
        (so what it changed on its own is rolled back too).
        """
        p = self._peer(peer)
        p.connected = True
        self.stats.connects += 1
        p.flush_sent = 0
        p.outdated = False
        p.applied = p.sent = p.durable = self.last_seq
        p.cum_applied = p.cum_sent = self._cum_total
        self._trim()
        regions = list(range(p.bitmap.regions)) if full else list(p.bitmap)
        p.resyncing = True
        p.resync_full = full
        p.resync_checksum = self.policy.resync_checksum
        p.resync_regions = regions
        p.resync_next = 0
        p.resync_done_bytes = 0
        p.resync_identical_bytes = p.resync_copied_bytes = 0
        p.digests_out.clear()
        p.copy_queue.clear()
        p.resync_unacked.clear()
        p.resync_unacked_bytes = 0
        p.verify = None
        p.resync_total_bytes = sum(self._region_span(r)[1] for r in regions)
        p.resync_max_seq = self.last_seq
        p.resync_announced = False
        p.resync_region_set = set(regions)
        p.awaiting_peer_bitmap = with_peer_bitmap and not full
        p.resync_last_seq = None if regions or p.awaiting_peer_bitmap else self.last_seq
        flags = WELCOME_FLAG_RESYNC | (WELCOME_FLAG_SEND_BITMAP if p.awaiting_peer_bitmap else 0)
        return Welcome(version, self.last_seq + 1, self.last_seq, flags)

    def on_peer_bitmap(self, msg: PeerBitmap, now_s: float = 0.0, peer: str | None = None) -> None:
        """Regions the peer changed on its own join the resync (and our bitmap,
        until the resync completes). Raises ProtocolError, changing nothing,
        for a frame nobody asked for or a run outside the volume."""
        p = self._peer(peer)
        if not (p.connected and p.resyncing and p.awaiting_peer_bitmap):
            raise ProtocolError("PEER_BITMAP that was not asked for")
        regions = p.bitmap.regions
        for first, count in msg.runs:
            if first + count > regions:
                raise ProtocolError(
                    f"PEER_BITMAP run {first}+{count} is outside the volume's {regions} regions"
                )
        for first, count in msg.runs:
            for r in range(first, first + count):
                offset, length = self._region_span(r)
                self._mark(p, offset, length)
                if r not in p.resync_region_set:
                    p.resync_region_set.add(r)
                    p.resync_regions.append(r)
                    p.resync_total_bytes += length
        if msg.last:
            p.awaiting_peer_bitmap = False
            self._settle(p, now_s)

    def _region_span(self, region: int) -> tuple[int, int]:
        offset = region * self.policy.region_bytes
        return offset, min(self.policy.region_bytes, self.size_bytes - offset)

    def next_resync_step(self, peer: str | None = None) -> BackgroundStep | None:
        """The next background step toward ``peer``: copies of regions found
        different first, then the next region of the resync (a digest or a
        copy), then the next region of a running verify; None when nothing is
        to be sequenced now (work may still await the peer's verdicts)."""
        p = self._peer(peer)
        if not p.connected or p.outdated:
            return None
        if p.copy_queue:
            region, purpose = p.copy_queue[0]
            return BackgroundStep(WriteKind.WRITE, region, *self._region_span(region), purpose)
        if p.resyncing and p.resync_next < len(p.resync_regions):
            region = p.resync_regions[p.resync_next]
            kind = WriteKind.DIGEST if p.resync_checksum else WriteKind.WRITE
            return BackgroundStep(kind, region, *self._region_span(region), "resync")
        v = p.verify
        if v is not None and v.running and not p.resyncing and v.next_region < v.regions:
            region = v.next_region
            return BackgroundStep(WriteKind.DIGEST, region, *self._region_span(region), "verify")
        return None

    def next_resync_region(self, peer: str | None = None) -> tuple[int, int] | None:
        """(offset, length) of the next background step, or None."""
        step = self.next_resync_step(peer)
        return None if step is None else (step.offset, step.length)

    def submit_resync(self, now_s: float, peer: str | None = None) -> int:
        """Sequence the next background step (data to follow in
        :meth:`fill_resync`); return its seq."""
        p = self._peer(peer)
        step = self.next_resync_step(peer)
        if step is None:
            raise AssertionError("no background step to submit")
        seq = self.submit(step.kind, step.offset, step.length, b"", False, now_s, resync=True)
        e = self._log.get(seq) or self._pending[seq]
        p.resync_unacked.append((seq, e.wire_bytes))
        p.resync_unacked_bytes += e.wire_bytes
        if p.copy_queue and step.kind == WriteKind.WRITE and p.copy_queue[0][0] == step.region:
            p.copy_queue.popleft()
            if step.purpose == "resync":
                p.resync_done_bytes += step.length
                p.resync_copied_bytes += step.length
            elif p.verify is not None:
                p.verify.copied += 1
        elif step.purpose == "resync":
            p.resync_next += 1
            if step.kind == WriteKind.DIGEST:
                p.digests_out[seq] = (step.region, "resync")
            else:
                p.resync_done_bytes += step.length
                p.resync_copied_bytes += step.length
        else:
            assert p.verify is not None
            p.verify.next_region += 1
            p.digests_out[seq] = (step.region, "verify")
        if step.purpose == "resync":
            self.stats.resync_writes += 1
        p.resync_max_seq = seq
        self._settle(p, now_s)
        return seq

    def fill_resync(self, seq: int, data: bytes) -> list[int]:
        """The region of background entry ``seq`` was read (its content at
        this point of the sequence): it may be shipped now. A DIGEST entry
        carries the xxh3-64 of ``data`` instead of ``data``."""
        e = self._pending.get(seq) or self._log.get(seq)
        if e is None:
            return []
        if len(data) != e.length:
            raise AssertionError(f"resync data of {len(data)} bytes for a {e.length}-byte entry")
        e.data = region_digest(data) if e.kind == WriteKind.DIGEST else data
        e.ready = True
        return self.local_done(seq)

    def on_differs(self, msg: Differs, now_s: float = 0.0, peer: str | None = None) -> None:
        """The peer found the DIGEST entries ``msg.seqs`` different from its
        image: copy those regions (resync, or a verify with resync), or record
        them (verify). Raises ProtocolError for a seq that is not an
        outstanding DIGEST (nothing changes then)."""
        p = self._peer(peer)
        if not p.connected:
            raise ProtocolError("DIFFERS before the handshake completed")
        unknown = [seq for seq in msg.seqs if seq not in p.digests_out or seq > p.sent]
        if unknown:
            raise ProtocolError(
                f"DIFFERS names {unknown[0]}, which is no DIGEST awaiting a verdict"
            )
        for seq in msg.seqs:
            region, purpose = p.digests_out.pop(seq)
            if purpose == "resync":
                p.copy_queue.append((region, "resync"))
            elif p.verify is not None:
                p.verify.differ.append(region)
                p.verify.done_bytes += self._region_span(region)[1]
                if p.verify.resync:
                    p.copy_queue.append((region, "verify"))
        self._settle(p, now_s)

    def _settle(self, p: PeerState, now_s: float) -> None:
        """Digests the peer has applied without reporting them are identical;
        the resync and verify end once nothing of them is outstanding."""
        for seq in [s for s in p.digests_out if s <= p.applied]:
            region, purpose = p.digests_out.pop(seq)
            length = self._region_span(region)[1]
            if purpose == "resync":
                p.resync_done_bytes += length
                p.resync_identical_bytes += length
            elif p.verify is not None:
                p.verify.done_bytes += length
        while p.resync_unacked and p.resync_unacked[0][0] <= p.applied:
            p.resync_unacked_bytes -= p.resync_unacked.popleft()[1]
        outstanding = {purpose for _, purpose in p.digests_out.values()}
        outstanding |= {purpose for _, purpose in p.copy_queue}
        if (
            p.resyncing
            and p.resync_last_seq is None
            and not p.awaiting_peer_bitmap
            and p.resync_next >= len(p.resync_regions)
            and "resync" not in outstanding
        ):
            p.resync_last_seq = p.resync_max_seq
        v = p.verify
        if (
            v is not None
            and v.running
            and v.next_region >= v.regions
            and "verify" not in outstanding
        ):
            v.finished_s = now_s
            self._verify_finished.add(p.name)

    def start_verify(self, now_s: float, *, resync: bool, peer: str | None = None) -> VerifyRun:
        """Begin an online verify of ``peer``: every region is compared at the
        same point of the sequence on both sides. Raises ValueError (saying
        what to do) if the peer is not replicating normally."""
        p = self._peer(peer)
        if not p.connected:
            raise ValueError("the peer is not connected: verify needs it; check the link first")
        if p.outdated or p.resyncing:
            raise ValueError(
                "the peer is being resynchronised (or needs to be): verify after the resync"
            )
        if p.verify is not None and p.verify.running:
            raise ValueError("a verify is already running; watch it with `geoclus volume status`")
        regions = p.bitmap.regions
        p.verify = VerifyRun(resync, now_s, self.size_bytes, regions)
        return p.verify

    def _end_background(self, p: PeerState, why: str) -> None:
        p.digests_out.clear()
        p.copy_queue.clear()
        p.resync_unacked.clear()
        p.resync_unacked_bytes = 0
        if p.verify is not None and p.verify.running:
            p.verify.aborted = why
            self._verify_finished.add(p.name)

    def take_verify_finished(self) -> set[str]:
        """Peers whose verify finished since the last call."""
        out, self._verify_finished = self._verify_finished, set()
        return out

    def resync_in_flight_bytes(self, peer: str | None = None) -> int:
        """Wire bytes of background entries sequenced but not yet applied by the peer."""
        return self._peer(peer).resync_unacked_bytes

    def announce_resync_done(self, peer: str | None = None) -> int | None:
        """If every region of the resync is sequenced and settled and the end
        was not announced yet: the sequence number to announce in RESYNC_DONE
        (the caller sends it now); else None. A resync completes only after
        its end was announced."""
        p = self._peer(peer)
        if not p.resyncing or p.resync_last_seq is None or p.resync_announced:
            return None
        p.resync_announced = True
        return p.resync_last_seq

    def take_resync_completed(self) -> set[str]:
        """Peers whose resync just completed (its end announced, and
        everything up to its last entry durable there); their bitmaps are
        cleared."""
        done = set()
        for p in self.peers.values():
            if (
                p.resyncing
                and p.connected
                and p.resync_announced
                and p.resync_last_seq is not None
                and p.durable >= p.resync_last_seq
            ):
                p.resyncing = False
                p.resync_last_seq = None
                p.bitmap.clear()
                self._new_dirty[p.name] = []
                self._cleared.add(p.name)
                done.add(p.name)
        return done

    def take_cleared(self) -> set[str]:
        """Peers whose bitmap was cleared (caught up) since the last call."""
        out, self._cleared = self._cleared, set()
        return out

    # ------------------------------------------------------------ peer access

    def _peer(self, name: str | None) -> PeerState:
        if name is None:
            if len(self.peers) != 1:
                raise ValueError("several peers: name the one meant")
            return next(iter(self.peers.values()))
        return self.peers[name]

    @property
    def peer(self) -> PeerState:
        """The only peer (this version replicates to one secondary)."""
        return self._peer(None)

    # Single-peer views, for status and for callers that know there is one.
    @property
    def connected(self) -> bool:
        return self.peer.connected

    @property
    def peer_applied(self) -> int:
        return self.peer.applied

    @property
    def peer_durable(self) -> int:
        return self.peer.durable

    @property
    def outdated(self) -> bool:
        return self.peer.outdated

    @property
    def bitmap(self) -> DirtyBitmap:
        return self.peer.bitmap

    # ----------------------------------------------------------------- queries

    def _required(self, p: PeerState) -> bool:
        if self.policy.mode == Mode.ASYNC or self.degraded_allowed:
            return False
        if self.policy.on_peer_loss == "continue":
            return p.connected and not p.outdated
        return True

    def peer_required(self) -> bool:
        """True if completing a write needs a peer (sync mode, not degraded)."""
        return any(self._required(p) for p in self.peers.values())

    @property
    def suspended(self) -> bool:
        """Sync writes are blocked waiting for a peer that is not replicating."""
        return any(
            self._required(p) and (not p.connected or p.outdated) for p in self.peers.values()
        )

    def _complete(self, e: LogEntry) -> bool:
        if not e.local_done:
            return False
        for p in self.peers.values():
            if not self._required(p):
                continue
            if p.outdated or p.applied < e.seq:
                return False
            if e.fua and p.durable < e.seq:
                return False
        return True

    def is_complete(self, seq: int) -> bool:
        """True once write ``seq`` may be acknowledged to the application."""
        e = self._pending.get(seq)
        return e is None or e.completed

    def _all_outdated(self) -> bool:
        return all(p.outdated for p in self.peers.values())

    def admission(self, length: int, kind: WriteKind = WriteKind.WRITE) -> Admission:
        """May a write of ``length`` bytes be sequenced now?

        ``admit``: yes. ``wait``: not until the log drains (block policy, or sync
        mode). ``overflow``: yes, but only by switching the lagging peers to
        dirty-region tracking (call :meth:`go_outdated` first).
        """
        if self._all_outdated():
            return "admit"
        wire = ENTRY_HEADER_BYTES + entry_data_bytes(kind, length)
        if self.log_bytes == 0 or self.log_bytes + wire <= self.policy.max_lag_bytes:
            return "admit"
        if self.policy.mode == Mode.SYNC:
            return "wait" if self.peer_required() else "overflow"
        if any(p.resyncing for p in self.peers.values()):
            # Pulling ahead now would abandon the resync, which would start
            # over and fill the log again: a livelock. Back-pressure instead,
            # until the resync is through.
            return "wait"
        return "wait" if self.policy.on_congestion == "block" else "overflow"

    def resync_admission(self, length: int) -> bool:
        """May the next resync copy (``length`` bytes) be sequenced now? Resync
        copies take at most half the retained log, leaving the other half to
        application writes."""
        wire = ENTRY_HEADER_BYTES + length
        return self.log_bytes == 0 or self.log_bytes + wire <= self.policy.max_lag_bytes // 2

    def _cum_at(self, seq: int) -> int:
        if seq < self._log_first:
            return self._cum_before_first
        return self._log[seq].cum_bytes

    def _lag_writes(self, p: PeerState) -> int:
        return self.last_seq - p.applied

    def _lag_bytes(self, p: PeerState) -> int:
        if p.outdated:
            return p.bitmap.dirty_bytes
        return self._cum_total - p.cum_applied

    @property
    def lag_writes(self) -> int:
        """Writes the furthest-behind peer has not applied."""
        return max(self._lag_writes(p) for p in self.peers.values())

    @property
    def lag_bytes(self) -> int:
        """Bytes of sequenced writes the furthest-behind peer has not applied
        (an outdated peer: its dirty bytes)."""
        return max(self._lag_bytes(p) for p in self.peers.values())

    def lag_seconds(self, now_s: float) -> float:
        """Age of the oldest write some peer has not applied."""
        worst = 0.0
        for p in self.peers.values():
            e = self._log.get(p.applied + 1)
            if e is None:
                if p.outdated and self._lag_writes(p):
                    return float("inf")
                continue
            worst = max(worst, now_s - e.submit_s)
        return worst

    @property
    def in_flight_bytes(self) -> int:
        return sum(p.cum_sent - p.cum_applied for p in self.peers.values() if p.connected)

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ writes

    def go_outdated(self, peer: str | None = None) -> None:
        """Stop replicating to ``peer`` (``None``: every peer still missing
        writes): what it may lack goes to its bitmap, nothing more is shipped."""
        if peer is None:
            targets = [
                p for p in self.peers.values() if not p.outdated and p.durable < self.last_seq
            ]
            if not targets:
                targets = [p for p in self.peers.values() if not p.outdated]
        else:
            targets = [self._peer(peer)]
        for p in targets:
            if p.outdated:
                continue
            for seq in range(max(p.durable + 1, self._log_first), self.last_seq + 1):
                e = self._log.get(seq)
                if e is not None:
                    self._mark(p, e.offset, e.length)
            p.outdated = True
            p.resyncing = False  # a resync cut short starts over later
            p.resync_last_seq = None
            self._end_background(p, "the peer went outdated")
            p.cum_applied = p.cum_sent = self._cum_total
            self.stats.went_outdated += 1
            self._went_outdated.add(p.name)
        self._trim()

    def submit(
        self,
        kind: WriteKind,
        offset: int,
        length: int,
        data: bytes,
        fua: bool,
        now_s: float,
        *,
        resync: bool = False,
        held: bool = False,
    ) -> int:
        """Sequence a write the caller has admitted; return its sequence number.

        ``resync``: a copy of a region for a resync (data filled in later by
        :meth:`fill_resync`); it marks no bitmap and counts as no application write.
        ``held``: not shipped (nor anything after it) until :meth:`release`
        (the shell first makes the write's activity-log record durable).
        """
        seq = self.last_seq + 1
        self.last_seq = seq
        wire = ENTRY_HEADER_BYTES + entry_data_bytes(kind, length)
        self._cum_total += wire
        e = LogEntry(seq, kind, offset, length, fua, data, now_s, self._cum_total)
        if resync:
            e.ready = False
            e.resync = True
        if held:
            e.ready = False
        for p in self.peers.values():
            # A resync target may roll back to its pre-resync image (its undo
            # log): every write shipped to it during the resync stays marked
            # until the resync completes.
            if (p.outdated or not p.connected or p.resyncing) and not resync:
                self._mark(p, offset, length)
            if p.outdated:
                p.cum_applied = p.cum_sent = self._cum_total
        if self._all_outdated():
            e.in_log = False
            self._log_first = seq + 1
            self._cum_before_first = self._cum_total
        else:
            self._log[seq] = e
            self.log_bytes += wire
        self._pending[seq] = e
        if resync:
            return seq
        self.stats.writes += 1
        self.stats.bytes_written += length
        self.stats.max_lag_bytes_seen = max(self.stats.max_lag_bytes_seen, self.lag_bytes)
        self.stats.max_lag_writes_seen = max(self.stats.max_lag_writes_seen, self.lag_writes)
        return seq

    def release(self, seq: int) -> None:
        """A write sequenced with ``held`` may be shipped now."""
        e = self._pending.get(seq) or self._log.get(seq)
        if e is not None:
            e.ready = True

    def local_done(self, seq: int) -> list[int]:
        """The local store holds write ``seq``; return writes now complete."""
        e = self._pending.get(seq)
        if e is None:
            return []
        e.local_done = True
        return self._collect([e])

    def local_failed(self, seq: int) -> None:
        """The local store refused write ``seq``: the application gets an error.

        The write may already have been shipped. The store shell treats a
        failed write as a failed disk (it refuses all further I/O), so the
        region is only marked dirty here for the record.
        """
        e = self._pending.pop(seq, None)
        if e is not None:
            for p in self.peers.values():
                self._mark(p, e.offset, e.length)

    def _collect(self, candidates: list[LogEntry] | None = None) -> list[int]:
        done = []
        for e in list(self._pending.values()) if candidates is None else candidates:
            if not e.completed and self._complete(e):
                e.completed = True
                done.append(e.seq)
                del self._pending[e.seq]
        return done

    def allow_degraded(self) -> list[int]:
        """Operator override: complete sync writes without the peers until they are back."""
        self.degraded_allowed = True
        return self._collect()

    def revoke_degraded(self) -> None:
        """End :meth:`allow_degraded`: from now on sync writes wait for the
        peers again (writes already completed stay completed)."""
        self.degraded_allowed = False

    # -------------------------------------------------------------------- peer

    def peer_connected(
        self, remote: Hello, version: int, peer: str | None = None
    ) -> Welcome | Refuse:
        """The peer's HELLO passed :func:`check_hello`; decide where it resumes.

        Returns the WELCOME to send (and starts replicating) or a REFUSE.
        """
        p = self._peer(peer)
        applied = remote.applied_seq
        if applied > self.last_seq:
            reason = (
                f"the secondary has applied write {applied} but the primary's newest is "
                f"{self.last_seq}: the primary lost writes; the copies need a resync"
            )
            self.stats.refusals.append(reason)
            return Refuse(reason)
        p.connected = True
        self.stats.connects += 1
        p.flush_sent = 0
        if not p.outdated and applied + 1 < self._log_first:
            # The peer is behind what we retained (it lost more than we kept).
            p.applied = p.durable = applied
            self.go_outdated(p.name)
        if p.outdated:
            # Nothing will be shipped; remember where the peer stands so its
            # (unchanging) acknowledgements are accepted.
            p.applied = p.sent = applied
            p.durable = min(remote.durable_seq, applied)
            return Welcome(version, applied + 1, self.last_seq)
        if applied < p.applied:
            self.stats.resends += p.applied - applied
        p.applied = applied
        p.durable = min(remote.durable_seq, applied)
        p.sent = applied
        p.cum_applied = p.cum_sent = self._cum_at(applied)
        if all(q.connected and not q.outdated for q in self.peers.values()):
            # Every peer is back: sync writes wait for the peers again.
            self.degraded_allowed = False
        self._maybe_clear_bitmap(p)
        return Welcome(version, applied + 1, self.last_seq)

    def mark_undurable(self) -> None:
        """Mark in each replicating peer's bitmap every write it has not made
        durable (the retained log is about to be lost: a clean stop)."""
        for p in self.peers.values():
            if p.outdated:
                continue
            for seq in range(max(p.durable + 1, self._log_first), self.last_seq + 1):
                e = self._log.get(seq)
                if e is not None and not e.resync:
                    self._mark(p, e.offset, e.length)

    def peer_lost(self, peer: str | None = None) -> list[int]:
        """The connection ended; return writes that now complete (continue mode)."""
        p = self._peer(peer)
        if p.connected:
            self.stats.disconnects += 1
        p.connected = False
        if p.resyncing:
            # The resync starts over at the next connect (the decision will
            # say so again: the target has not adopted our lineage).
            p.resyncing = False
            p.resync_last_seq = None
        self._end_background(p, "the link to the peer was lost")
        p.sent = p.applied
        p.cum_sent = p.cum_applied
        if not p.outdated:
            # From its durable point: what it applied but had not synced may
            # be lost if it crashes too (the activity log counts on this).
            for seq in range(max(p.durable + 1, self._log_first), self.last_seq + 1):
                e = self._log[seq]
                self._mark(p, e.offset, e.length)
        return self._collect()

    def next_batch(self, peer: str | None = None) -> Writes | None:
        """The next WRITES frame for ``peer``, or None (nothing to send or window full)."""
        p = self._peer(peer)
        if not p.connected or p.outdated or p.sent >= self.last_seq:
            return None
        budget_inflight = self.policy.max_in_flight_bytes - (p.cum_sent - p.cum_applied)
        budget = min(self.policy.max_batch_bytes, budget_inflight)
        entries: list[WriteEntry] = []
        size = 0
        seq = p.sent + 1
        while seq <= self.last_seq and len(entries) < self.policy.max_batch_entries:
            e = self._log[seq]
            if not e.ready:
                break  # a resync entry whose data is still being read
            # Always allow one entry if nothing is in flight, so a write larger
            # than the window still goes out.
            if (entries or p.cum_sent != p.cum_applied) and size + e.wire_bytes > budget:
                break
            entries.append(e.to_wire())
            size += e.wire_bytes
            seq += 1
        if not entries:
            return None
        p.sent = entries[-1].seq
        p.cum_sent = self._cum_at(p.sent)
        self.stats.batches_sent += 1
        self.stats.entries_sent += len(entries)
        return Writes(tuple(entries))

    def on_ack(self, ack: Ack, peer: str | None = None, now_s: float = 0.0) -> list[int]:
        """Apply a cumulative ACK from ``peer``; return writes that now complete.

        Raises ProtocolError for an ACK that goes backwards or covers writes
        never sent (nothing changes then).
        """
        p = self._peer(peer)
        if not p.connected:
            raise ProtocolError("ACK before the handshake completed")
        if ack.applied_seq > p.sent:
            raise ProtocolError(f"ACK for write {ack.applied_seq} but only {p.sent} were sent")
        if ack.durable_seq > ack.applied_seq:
            raise ProtocolError(f"ACK says durable {ack.durable_seq} > applied {ack.applied_seq}")
        if ack.applied_seq < p.applied or ack.durable_seq < p.durable:
            raise ProtocolError(
                f"ACK goes backwards (applied {ack.applied_seq} < {p.applied} "
                f"or durable {ack.durable_seq} < {p.durable})"
            )
        if p.outdated:
            # Keep track (for status) but nothing completes or trims through it.
            p.applied, p.durable = ack.applied_seq, ack.durable_seq
            return []
        if ack.applied_seq > p.applied:
            p.applied = ack.applied_seq
            p.cum_applied = self._cum_at(ack.applied_seq)
            if p.resyncing:
                self._trim()
        if ack.durable_seq > p.durable:
            p.durable = ack.durable_seq
            self._trim()
        self._settle(p, now_s)
        self._maybe_clear_bitmap(p)
        return self._collect()

    def _trim(self) -> None:
        """Drop log entries every peer still replicating has made durable."""
        # A peer being resynced is inconsistent until the end, and a crash of
        # it restarts the resync: nothing needs keeping past what it applied.
        live = [
            p.applied if p.resyncing else p.durable for p in self.peers.values() if not p.outdated
        ]
        floor = min(live) if live else self.last_seq
        while self._log_first <= floor:
            e = self._log.pop(self._log_first, None)
            if e is not None:
                self.log_bytes -= e.wire_bytes
                e.in_log = False
                self._cum_before_first = e.cum_bytes
            self._log_first += 1
        if not live:
            self._cum_before_first = self._cum_total

    def _maybe_clear_bitmap(self, p: PeerState) -> None:
        # Every write went through the log in order and the peer applied them
        # all, so the regions marked while it was away are no longer dirty.
        caught_up = (
            not p.outdated and not p.resyncing and p.connected and p.applied == self.last_seq
        )
        if caught_up and not p.caught_up:
            # Reported on every transition, bits or not: the shell also ends
            # its divergence (bitmap base) here, which must not depend on
            # whether any region happened to be marked.
            p.bitmap.clear()
            self._new_dirty[p.name] = []
            self._cleared.add(p.name)
        p.caught_up = caught_up

    # ------------------------------------------------------------------- flush

    def request_peer_flush(self) -> int:
        """Ask the peers to make every write sequenced so far durable; return the
        sequence number the caller must see durable on them."""
        for p in self.peers.values():
            p.flush_wanted = max(p.flush_wanted, self.last_seq)
        return self.last_seq

    def peer_flush_satisfied(self, upto_seq: int) -> bool:
        """True once a peer flush up to ``upto_seq`` is done or no longer needed."""
        return all(
            not self._required(p) or (not p.outdated and p.durable >= upto_seq)
            for p in self.peers.values()
        )

    def next_flush(self, now_s: float, peer: str | None = None) -> Flush | None:
        """The FLUSH frame to send ``peer`` now, if any (requested, or to let
        the retained log be trimmed)."""
        p = self._peer(peer)
        if not p.connected or p.outdated:
            return None
        background = (
            p.durable < p.applied
            and (
                now_s - p.last_flush_sent_s >= self.policy.peer_flush_interval_s
                or self.log_bytes * 2 > self.policy.max_lag_bytes
            )
            and p.flush_sent < p.applied
        )
        if background:
            p.flush_wanted = max(p.flush_wanted, p.applied)
        if p.flush_wanted <= p.flush_sent or p.flush_wanted <= p.durable:
            return None
        p.flush_sent = p.flush_wanted
        p.last_flush_sent_s = now_s
        fid = p.next_flush_id
        p.next_flush_id += 1
        return Flush(p.flush_wanted, fid)


def region_digest(data: bytes) -> bytes:
    """The digest a DIGEST entry carries: xxh3-64 of the region, big-endian."""
    return xxhash.xxh3_64_digest(data)


class SecondaryCore:
    """Replication state of a secondary copy receiving from one primary."""

    def __init__(
        self,
        size_bytes: int,
        block_size: int,
        *,
        durable_seq: int,
        applied_seq: int | None = None,
        fault_apply_out_of_order: bool = False,
    ) -> None:
        """``fault_apply_out_of_order`` is a test-only fault: it breaks the
        ordering rule (each batch is applied in reverse) so the property tests
        and the crash campaign can show that they catch it. Never set it in
        production."""
        self._fault_out_of_order = fault_apply_out_of_order
        self.resync_target = False
        self.resync_upto: int | None = None
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.durable_seq = durable_seq
        self.applied_seq = durable_seq if applied_seq is None else applied_seq
        self.received_seq = self.applied_seq
        self.welcomed = False
        self._flush_upto = 0
        self._flush_id = 0
        self._fua_upto = 0
        self.primary_seq = 0
        self._differs: list[int] = []

    def on_welcome(self, welcome: Welcome) -> None:
        """The primary accepted us and resumes at ``resume_seq``.

        With the resync flag we are a resync target: our position is rebased to
        the primary's (our image is covered by the resync, not by the sequence),
        and we are inconsistent until :meth:`resync_complete`.
        """
        if welcome.flags & WELCOME_FLAG_RESYNC:
            if welcome.resume_seq < 1:
                raise ProtocolError(f"resync WELCOME resumes at {welcome.resume_seq}")
            base = welcome.resume_seq - 1
            self.applied_seq = self.received_seq = self.durable_seq = base
            self._flush_upto = self._fua_upto = 0
            self.resync_target = True
            self.resync_upto = None
            self.welcomed = True
            self.primary_seq = welcome.primary_seq
            return
        if welcome.resume_seq != self.applied_seq + 1:
            raise ProtocolError(
                f"primary resumes at {welcome.resume_seq} but we applied {self.applied_seq}"
            )
        self.received_seq = self.applied_seq
        self.welcomed = True
        self.primary_seq = welcome.primary_seq

    def on_writes(self, batch: Writes) -> tuple[WriteEntry, ...]:
        """Validate a batch; return its entries to apply, in order.

        Raises ProtocolError (nothing to apply) if the batch does not continue
        exactly after the last one received, or any entry is misaligned or
        outside the volume.
        """
        if not self.welcomed:
            raise ProtocolError("WRITES before WELCOME")
        if not batch.entries:
            raise ProtocolError("empty WRITES batch")
        first = batch.entries[0].seq
        if first != self.received_seq + 1:
            what = "replayed" if first <= self.received_seq else "out-of-order (gap)"
            raise ProtocolError(
                f"{what} batch: starts at write {first}, expected {self.received_seq + 1}"
            )
        for e in batch.entries:
            if (
                e.offset % self.block_size
                or e.length % self.block_size
                or e.offset + e.length > self.size_bytes
            ):
                raise ProtocolError(
                    f"write {e.seq} at {e.offset}+{e.length} is misaligned or outside the "
                    f"{self.size_bytes}-byte volume"
                )
            if e.kind == WriteKind.WRITE and len(e.data) != e.length:
                raise ProtocolError(f"write {e.seq} carries {len(e.data)} bytes, says {e.length}")
            if e.kind == WriteKind.DIGEST and len(e.data) != DIGEST_BYTES:
                raise ProtocolError(f"digest {e.seq} carries {len(e.data)} bytes, not 8")
            if e.fua:
                self._fua_upto = e.seq
        self.received_seq = batch.entries[-1].seq
        if self._fault_out_of_order:
            return tuple(reversed(batch.entries))
        return batch.entries

    def digest_differs(self, entry: WriteEntry, region: bytes) -> bool:
        """Compare DIGEST ``entry`` with ``region`` (our image of its span,
        read after every earlier entry was applied); a mismatch is reported in
        the next :meth:`take_differs`. Returns True if they differ."""
        if entry.kind != WriteKind.DIGEST or len(region) != entry.length:
            raise AssertionError(f"entry {entry.seq} is no DIGEST of {len(region)} bytes")
        differs = region_digest(region) != entry.data
        if differs:
            self._differs.append(entry.seq)
        return differs

    def take_differs(self) -> Differs | None:
        """The DIFFERS frame to send before the next ACK, if any."""
        if not self._differs:
            return None
        seqs, self._differs = sorted(self._differs), []
        return Differs(tuple(seqs))

    def applied(self, seq: int) -> None:
        """Writes up to ``seq`` are in the store."""
        if seq > self.received_seq or seq < self.applied_seq:
            raise AssertionError(f"applied {seq} outside ({self.applied_seq}, {self.received_seq}]")
        self.applied_seq = seq

    def reset_link(self) -> None:
        """The connection ended: forget what was received but not applied."""
        self.welcomed = False
        self.received_seq = self.applied_seq
        self._differs = []
        self._flush_upto = 0
        self._fua_upto = min(self._fua_upto, self.applied_seq)

    def on_flush(self, flush: Flush) -> None:
        if not self.welcomed:
            raise ProtocolError("FLUSH before WELCOME")
        self._flush_upto = max(self._flush_upto, flush.upto_seq)
        self._flush_id = max(self._flush_id, flush.flush_id)

    def on_resync_done(self, upto_seq: int) -> None:
        """Once everything up to ``upto_seq`` is applied and durable here we
        hold the primary's data (after a resync, or after catching up through
        the log on a diverged primary) and adopt its lineage."""
        if not self.welcomed:
            raise ProtocolError("RESYNC_DONE before WELCOME")
        self.resync_upto = upto_seq

    def resync_complete(self) -> bool:
        """True once (then reset) when the announced point is durable here."""
        done = self.resync_upto is not None and self.durable_seq >= self.resync_upto
        if done:
            self.resync_target = False
            self.resync_upto = None
        return done

    def sync_needed(self) -> bool:
        """True if a store sync must run now: a FUA write, a FLUSH or the end of
        a resync waits on it and every write it covers has been applied."""
        resync = self.resync_upto or 0
        for target in (self._fua_upto, self._flush_upto, resync):
            if self.durable_seq < target <= self.applied_seq:
                return True
        return False

    def flush_blocked(self) -> bool:
        """True if a FLUSH waits for writes not yet applied."""
        return self._flush_upto > self.applied_seq

    def synced(self, seq: int) -> None:
        """A store sync that started when ``applied_seq`` was ``seq`` completed."""
        self.durable_seq = max(self.durable_seq, seq)

    def ack(self) -> Ack:
        done = self._flush_id if self.durable_seq >= self._flush_upto else 0
        return Ack(self.applied_seq, self.durable_seq, done)
