"""Deterministic simulation of a primary and a secondary joined by a faulty link.

The simulation drives the *production* pieces (:class:`PrimaryCore`,
:class:`SecondaryCore`, :class:`OverlapTracker`, the frame codec and the
handshake checks) with simulated disks and a simulated link, one event at a
time. Every step is chosen by the caller (hypothesis rules) or by a seeded
random generator (:func:`run_random`), so any failure replays exactly.

Faults it can inject: link cuts at any point (frames in flight are lost),
corrupted bytes on the link, frames split at arbitrary byte boundaries, a
secondary crash that loses a random subset of what it had not synced, local
writes completing in any order the overlap rule allows. Role changes: a
planned switchover (the next connect must need no resync) and a forced
promotion of the secondary (rolled back through its undo log if it was a
cut-off resync target), after which the old primary returns as secondary
with a history of its own that the resync must roll back (the union of both
bitmaps). The primary's own disk is not crashed here (its activity log is
tested in the volume shell).

:meth:`Simulation.check` asserts the safety properties after every step:

1. sync mode: every write acknowledged while the peer was required is applied
   on the secondary; every FUA write or flush acknowledged is durable there;
2. the secondary's image always equals the primary's history after exactly its
   ``applied_seq`` writes (a prefix), except while it replays after a crash;
3. the primary's own image equals its history once no local write is pending
   (overlapping writes applied in sequence order);
6. a corrupted frame is refused before anything in it is applied (follows
   from 2: a partially applied frame would not be a prefix);
7. a resync target's undo log restores its pre-resync image, now and after a
   crash; a forced promotion never loses a write acknowledged in sync mode
   while the peer was required, except what a rolled-back resync brought
   (recorded in ``forced_lost``); after quiescing, both copies are equal.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field, replace

from geoclus.errors import ProtocolError
from replicator.bitmap import DirtyBitmap
from replicator.frames import (
    WELCOME_FLAG_SEND_BITMAP,
    Ack,
    Differs,
    Flush,
    FrameDecoder,
    FrameEncoder,
    Hello,
    Message,
    Mode,
    PeerBitmap,
    Refuse,
    ResyncDone,
    Role,
    Welcome,
    WriteEntry,
    WriteKind,
    Writes,
)
from replicator.generations import (
    FRESH,
    Action,
    GenState,
    after_resync,
    decide,
    fresh,
    may_catch_up,
    on_promote,
    on_write_unreplicated,
)
from replicator.genfile import decode_genstate, encode_genstate
from replicator.handshake import check_hello, make_hello, negotiate_version
from replicator.ordering import OverlapTracker
from replicator.session import PrimaryCore, ReplicationPolicy, SecondaryCore

BLOCK = 512
VOLUME_ID = b"\x01" * 16


class SimDisk:
    """A disk with a volatile cache: writes land in the cache; ``flush`` makes
    them durable; ``crash`` keeps a random subset of the cached writes, applied
    in order (what a power cut does to a page cache)."""

    def __init__(self, size_bytes: int) -> None:
        self.durable = bytearray(size_bytes)
        self.cache: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes) -> None:
        self.cache.append((offset, data))

    def image(self) -> bytearray:
        img = bytearray(self.durable)
        for offset, data in self.cache:
            img[offset : offset + len(data)] = data
        return img

    def flush(self) -> None:
        for offset, data in self.cache:
            self.durable[offset : offset + len(data)] = data
        self.cache.clear()

    def crash(self, rng: random.Random) -> int:
        kept = 0
        for offset, data in self.cache:
            if rng.random() < 0.5:
                self.durable[offset : offset + len(data)] = data
                kept += 1
        self.cache.clear()
        return kept


def payload(seq: int, length: int) -> bytes:
    """Distinct, recognisable content for write ``seq``."""
    return struct.pack(">Q", seq) * (length // 8)


@dataclass
class PendingLocal:
    seq: int
    kind: WriteKind
    offset: int
    length: int
    data: bytes
    fua: bool
    blockers: set[int]
    resync: bool = False  # a resync copy: "applying" it means reading the region


@dataclass
class PendingFlush:
    upto: int
    covers: int  # highest write completed before the flush was issued
    peer_required: bool


@dataclass
class SimStats:
    writes: int = 0
    acked: int = 0
    flushes_acked: int = 0
    cuts: int = 0
    corruptions: int = 0
    crashes: int = 0
    protocol_errors: list[str] = field(default_factory=list)
    batches_applied: int = 0
    resyncs_started: int = 0
    resyncs_completed: int = 0
    catch_ups: int = 0
    switchovers: int = 0
    forced_promotions: int = 0


class Simulation:
    """A primary, a secondary and the link between them, stepped by hand."""

    def __init__(
        self,
        policy: ReplicationPolicy,
        *,
        blocks: int = 32,
        seed: int = 0,
        fault_secondary_out_of_order: bool = False,
        fault_primary_ignore_overlaps: bool = False,
        fault_resync_ignores_overlaps: bool = False,
        fault_resync_target_not_marked: bool = False,
        fault_ignore_differs: bool = False,
        fault_undo_skip_save: bool = False,
    ) -> None:
        # Test-only: the resync target writes a region without saving its old
        # content in the undo log first (a broken write-ahead rule).
        self.fault_undo_skip_save = fault_undo_skip_save
        # The resync target's undo log (durable as soon as saved, as the
        # shell fsyncs it before writing): region -> pre-resync content, and
        # the history prefix that pre-resync image was.
        self.undo: dict[int, bytes] | None = None
        self.undo_base: bytes = b""
        self.undo_base_k = 0
        # Role swaps: the secondary's own bitmap (what it changed while it was
        # primary), whether it holds a history of its own (a returning old
        # primary, until it is resynced), and what forced promotions lost.
        self.s_own_bitmap = DirtyBitmap(blocks * BLOCK, policy.region_bytes)
        self.diverged = False
        self.expect_in_sync = False
        self.forced_lost: list[int] = []
        self.fault_resync_ignores_overlaps = fault_resync_ignores_overlaps
        # Test-only: the primary drops DIFFERS, so a region whose digest did
        # not match is taken as identical (a broken checksum-skip rule).
        self.fault_ignore_differs = fault_ignore_differs
        self.fault_resync_target_not_marked = fault_resync_target_not_marked
        self.policy = policy
        self.size_bytes = blocks * BLOCK
        self.rng = random.Random(seed)
        self.now_s = 0.0
        self.history: list[tuple[WriteKind, int, int, bytes]] = []  # index = seq - 1
        self._prefix_cache: dict[int, bytes] = {0: bytes(self.size_bytes)}
        self.primary = PrimaryCore(policy, self.size_bytes)
        self.overlap = OverlapTracker(fault_ignore_overlaps=fault_primary_ignore_overlaps)
        self.primary_disk = bytearray(self.size_bytes)
        self.pending_local: dict[int, PendingLocal] = {}
        self.pending_flushes: list[PendingFlush] = []
        self.acked: set[int] = set()
        self.fua_writes: set[int] = set()
        self.fault_out_of_order = fault_secondary_out_of_order
        self.sec_disk = SimDisk(self.size_bytes)
        self.sec_meta_durable = 0
        self.secondary = self._new_secondary(0)
        # Validated batches (in the order the core says to apply) and flushes.
        self.sec_queue: list[tuple[tuple[WriteEntry, ...], int] | Flush | ResyncDone] = []
        self.replaying_until: int | None = None
        self.replaying = False
        # After a crash the durable image holds a torn mix until the next sync.
        self.durable_torn = False
        # Safety obligations.
        self.must_be_applied = 0  # sync writes acknowledged with the peer required
        self.must_be_durable = 0  # FUA writes / flushes acknowledged with the peer required
        self.connected = False
        # Lineages (docs/generations.md), as each side would persist them.
        self.p_gens: GenState = fresh(primary=True)
        self.s_gens: GenState = fresh(primary=False)
        self._next_gen = 1000
        self._resync_lineage: bytes | None = None
        self._shared_gen: int | None = FRESH
        self.to_secondary: list[bytes] = []
        self.to_primary: list[bytes] = []
        self._reset_codecs()
        self.stats = SimStats()

    def _new_secondary(self, durable: int) -> SecondaryCore:
        return SecondaryCore(
            self.size_bytes,
            BLOCK,
            durable_seq=durable,
            fault_apply_out_of_order=self.fault_out_of_order,
        )

    def _reset_codecs(self) -> None:
        self.p_enc, self.s_enc = FrameEncoder(), FrameEncoder()
        self.p_dec, self.s_dec = FrameDecoder(), FrameDecoder()

    # ------------------------------------------------------------ reference

    def prefix_image(self, k: int) -> bytes:
        """The primary's image after its first ``k`` writes, in sequence order."""
        if k in self._prefix_cache:
            return self._prefix_cache[k]
        base_k = max(j for j in self._prefix_cache if j <= k)
        img = bytearray(self._prefix_cache[base_k])
        for kind, offset, length, data in self.history[base_k:k]:
            if kind == WriteKind.DIGEST:
                continue  # a comparison, not a write
            img[offset : offset + length] = data if kind == WriteKind.WRITE else bytes(length)
        self._prefix_cache[k] = bytes(img)
        return self._prefix_cache[k]

    # --------------------------------------------------------- application

    def tick(self, dt_s: float) -> None:
        self.now_s += dt_s

    def app_write(
        self, block: int, nblocks: int, fua: bool, kind: WriteKind = WriteKind.WRITE
    ) -> int | None:
        """The application issues a write; returns its sequence number, or None
        if admission made it wait (the write is simply not issued yet)."""
        block = block % (self.size_bytes // BLOCK)
        nblocks = max(1, min(nblocks, self.size_bytes // BLOCK - block))
        offset, length = block * BLOCK, nblocks * BLOCK
        verdict = self.primary.admission(length, kind)
        if verdict == "wait":
            return None
        if verdict == "overflow":
            self.primary.go_outdated()
        seq = self.primary.last_seq + 1
        data = payload(seq, length) if kind == WriteKind.WRITE else b""
        got = self.primary.submit(kind, offset, length, data, fua, self.now_s)
        assert got == seq
        if not self.connected or self.primary.outdated:
            # As the shell: writing without the peer starts a generation.
            self._next_gen += 1
            self.p_gens = on_write_unreplicated(
                self.p_gens,
                self._next_gen,
                int(self.now_s),
                shared=self.p_gens.current.id == self._shared_gen,
            )
        self.history.append((kind, offset, length, data))
        blockers = set(self.overlap.add(seq, offset, length))
        self.pending_local[seq] = PendingLocal(seq, kind, offset, length, data, fua, blockers)
        if fua:
            self.fua_writes.add(seq)
        self.stats.writes += 1
        self._note_core()
        return seq

    def resync_step(self) -> bool:
        """The primary's resync task runs once: sequence the next region's copy
        (its read waits, like a write, for earlier overlapping writes), or, all
        regions sequenced, announce RESYNC_DONE and ask for a flush."""
        core = self.primary
        if not self.connected or not core.peer.resyncing:
            return False
        step = core.next_resync_step()
        if step is None:
            last = core.announce_resync_done()
            if last is None:
                return False
            self._shared_gen = self.p_gens.current.id
            self.to_secondary.append(
                self.p_enc.encode(ResyncDone(last, encode_genstate(self.p_gens, 0)))
            )
            core.request_peer_flush()
            return True
        offset, length = step.offset, step.length
        if not core.resync_admission(length):
            return False  # waits for room in its half of the log
        seq = core.submit_resync(self.now_s)
        self.history.append((step.kind, offset, length, b""))  # filled at the read
        blockers = set(self.overlap.add(seq, offset, length))
        if self.fault_resync_ignores_overlaps:
            blockers = set()  # test-only fault: read without waiting for earlier writes
        self.pending_local[seq] = PendingLocal(
            seq, step.kind, offset, length, b"", False, blockers, resync=True
        )
        return True

    def local_ready(self) -> list[int]:
        """Local writes whose earlier overlapping writes have all been applied."""
        return [
            s for s, p in self.pending_local.items() if not (p.blockers & self.pending_local.keys())
        ]

    def complete_local(self, pick: int) -> bool:
        ready = self.local_ready()
        if not ready:
            return False
        seq = ready[pick % len(ready)]
        p = self.pending_local.pop(seq)
        if p.resync:
            # Read the region as it is now: every earlier overlapping write has
            # been applied and no later one yet (the overlap rule).
            data = bytes(self.primary_disk[p.offset : p.offset + p.length])
            self.history[seq - 1] = (p.kind, p.offset, p.length, data)
            self.overlap.remove(seq)
            self._completed(self.primary.fill_resync(seq, data))
            return True
        self.primary_disk[p.offset : p.offset + p.length] = (
            p.data if p.kind == WriteKind.WRITE else bytes(p.length)
        )
        self.overlap.remove(seq)
        self._completed(self.primary.local_done(seq))
        return True

    def _completed(self, seqs: list[int]) -> None:
        required = self.primary.peer_required()
        for seq in seqs:
            self.acked.add(seq)
            self.stats.acked += 1
            if required and self.policy.mode == Mode.SYNC:
                self.must_be_applied = max(self.must_be_applied, seq)
                if seq in self.fua_writes:
                    self.must_be_durable = max(self.must_be_durable, seq)
        self._check_flushes()

    def app_flush(self) -> None:
        """The application issues a flush (covers every write completed so far)."""
        core = self.primary
        covers = max(self.acked, default=0)
        required = core.peer_required()
        upto = core.request_peer_flush() if required else 0
        self.pending_flushes.append(PendingFlush(upto, covers, required))
        self._check_flushes()

    def _check_flushes(self) -> None:
        still = []
        for f in self.pending_flushes:
            if self.primary.peer_flush_satisfied(f.upto):
                self.stats.flushes_acked += 1
                if f.peer_required and self.primary.peer_required():
                    self.must_be_durable = max(self.must_be_durable, f.covers)
            else:
                still.append(f)
        self.pending_flushes = still

    # ------------------------------------------------------------------ link

    def _hello(self, role: Role, applied: int, durable: int, node: str) -> Hello:
        gens = self.p_gens if role == Role.PRIMARY else self.s_gens
        return make_hello(
            role=role,
            mode=self.policy.mode,
            flags=0,
            block_size=BLOCK,
            size_bytes=self.size_bytes,
            volume_id=VOLUME_ID,
            generation=0,
            applied_seq=applied,
            durable_seq=durable,
            node=node,
            lineage=encode_genstate(gens, 0),
        )

    def _note_core(self) -> None:
        """Carry the core's generation events into the primary's lineage, as
        the volume shell does."""
        core = self.primary
        core.take_new_dirty()
        if core.take_went_outdated():
            # The log overflowed (later writes, not the switchover): a resync
            # is legitimate from here on.
            self.expect_in_sync = False
            self._next_gen += 1
            self.p_gens = on_write_unreplicated(
                self.p_gens,
                self._next_gen,
                int(self.now_s),
                shared=self.p_gens.current.id == self._shared_gen,
            )
        if core.take_resync_completed():
            self.stats.resyncs_completed += 1
        if core.take_cleared() and self.p_gens.bitmap_base is not None and not core.outdated:
            self.p_gens = replace(self.p_gens, bitmap_base=None, changes=0)

    def connect(self) -> bool:
        """Run the handshake if the link is down; True if it came up."""
        if self.connected:
            return False
        self._reset_codecs()
        self.to_primary.clear()
        self.to_secondary.clear()
        core = self.primary
        sec = self.secondary
        p_hello = self._hello(Role.PRIMARY, core.last_seq, core.last_seq, "a")
        s_hello = self._hello(Role.SECONDARY, sec.applied_seq, sec.durable_seq, "b")
        # Through the codec, as on the wire.
        self.s_dec.receive_data(self.p_enc.encode(p_hello))
        got = self.s_dec.next_message()
        assert got == p_hello and check_hello(s_hello, p_hello) is None
        self.p_dec.receive_data(self.s_enc.encode(s_hello))
        got2 = self.p_dec.next_message()
        assert got2 == s_hello and check_hello(p_hello, s_hello) is None
        version = negotiate_version(p_hello, s_hello)
        assert version is not None
        decoded = decode_genstate(s_hello.lineage)
        assert decoded is not None
        decision = decide(self.p_gens, decoded[1])
        after_switchover, self.expect_in_sync = self.expect_in_sync, False
        answer: Welcome | Refuse
        adopt_upto = None
        if decision.action is Action.IN_SYNC:
            answer = core.peer_connected(s_hello, version)
            self._shared_gen = self.p_gens.current.id
        elif may_catch_up(decision, decoded[1]) and core.can_resume(s_hello):
            # Catch up through the log, then adopt our lineage (as the shell).
            # Never for an inconsistent peer: regions its cut-off resync did
            # not reach are in no log.
            answer = core.peer_connected(s_hello, version)
            adopt_upto = core.last_seq
        elif decision.action is Action.RESYNC:
            # A planned switchover between copies in sync never needs one
            # (writes since then catch up through the log).
            assert not after_switchover, f"resync after a switchover: {decision}"
            # Only the primary writes here, so it is always the source.
            assert decision.source == "local", decision
            answer = core.start_resync(
                s_hello, version, full=decision.full, with_peer_bitmap="peer" in decision.bitmaps
            )
            self.stats.resyncs_started += 1
        else:
            raise AssertionError(f"unexpected decision with one writer: {decision}")
        self._note_core()
        if isinstance(answer, Refuse):
            self.stats.protocol_errors.append(answer.reason)
            return False
        assert isinstance(answer, Welcome)
        if (
            answer.flags
            and self.undo is None
            and not self.replaying
            and not self.s_gens.inconsistent
        ):
            # As the shell: a consistent target flushes and starts its undo log.
            self.sec_disk.flush()
            self.undo = {}
            self.undo_base = bytes(self.sec_disk.image())
            self.undo_base_k = -1 if self.diverged else sec.applied_seq
        sec.on_welcome(answer)
        if answer.flags:
            # Rebased resync target: inconsistent (persisted) until done.
            if not self.fault_resync_target_not_marked:
                self.s_gens = replace(self.s_gens, inconsistent=True)
            self.sec_meta_durable = sec.durable_seq
            self.durable_torn = True
            self.replaying_until = None
        elif self.replaying:
            self.replaying_until = answer.primary_seq
        if answer.flags & WELCOME_FLAG_SEND_BITMAP:
            # The target sends its own changes, to be rolled back too.
            runs = list(self.s_own_bitmap.runs())
            self.to_primary.append(self.s_enc.encode(PeerBitmap(tuple(runs), True)))
        if adopt_upto is not None:
            self._shared_gen = self.p_gens.current.id
            self.connected = True  # the announcement goes on the wire now
            self.to_secondary.append(
                self.p_enc.encode(ResyncDone(adopt_upto, encode_genstate(self.p_gens, 0)))
            )
            core.request_peer_flush()
            self.stats.catch_ups += 1
        self.connected = True
        self._completed(core._collect())
        return True

    def cut(self) -> None:
        """The link fails: frames in flight are lost, both sides see it."""
        if not self.connected:
            return
        self.stats.cuts += 1
        self.connected = False
        self.to_primary.clear()
        self.to_secondary.clear()
        self.sec_queue.clear()
        self.secondary.reset_link()
        self._completed(self.primary.peer_lost())
        if self.primary.lag_writes:
            # As the shell: the peer lacks writes, our history diverges.
            self._next_gen += 1
            self.p_gens = on_write_unreplicated(
                self.p_gens,
                self._next_gen,
                int(self.now_s),
                shared=self.p_gens.current.id == self._shared_gen,
            )
        self._note_core()

    def ship(self) -> bool:
        """The primary's sender runs once: a batch and/or a flush go on the wire.

        Like the shell's sender, it drops the link on purpose when the peer went
        outdated while connected, so the next connect resyncs it."""
        if not self.connected:
            return False
        if self.primary.outdated:
            self.cut()
            return True
        sent = False
        batch = self.primary.next_batch()
        if batch is not None:
            self.to_secondary.append(self.p_enc.encode(batch))
            sent = True
        flush = self.primary.next_flush(self.now_s)
        if flush is not None:
            self.to_secondary.append(self.p_enc.encode(flush))
            sent = True
        return sent

    def corrupt(self, frame: int, byte: int) -> bool:
        """Flip one byte of a frame in flight to the secondary."""
        if not self.to_secondary:
            return False
        i = frame % len(self.to_secondary)
        raw = bytearray(self.to_secondary[i])
        raw[byte % len(raw)] ^= 0x5A
        self.to_secondary[i] = bytes(raw)
        self.stats.corruptions += 1
        return True

    def _protocol_failure(self, exc: ProtocolError) -> None:
        self.stats.protocol_errors.append(exc.reason)
        self.cut()

    def deliver_to_secondary(self, split: int = 0) -> bool:
        """Deliver the next frame (or, with ``split``, only part of it)."""
        if not self.connected or not self.to_secondary:
            return False
        raw = self.to_secondary.pop(0)
        if split and split % len(raw) > 0:
            cut = split % len(raw)
            self.to_secondary.insert(0, raw[cut:])
            raw = raw[:cut]
        try:
            self.s_dec.receive_data(raw)
            while True:
                msg = self.s_dec.next_message()
                if msg is None:
                    break
                self._secondary_receive(msg)
        except ProtocolError as exc:
            self._protocol_failure(exc)
        return True

    def _secondary_receive(self, msg: Message) -> None:
        if isinstance(msg, Writes):
            ordered = self.secondary.on_writes(msg)
            self.sec_queue.append((ordered, msg.entries[-1].seq))
        elif isinstance(msg, (Flush, ResyncDone)):
            self.sec_queue.append(msg)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__}")

    def secondary_apply(self) -> bool:
        """The secondary's applier processes one queued item, then acks."""
        if not self.connected or not self.sec_queue:
            return False
        item = self.sec_queue.pop(0)
        sec = self.secondary
        if isinstance(item, tuple):
            # The core decides the order; the shell (and we) apply in that order.
            ordered, last_seq = item
            if self.undo is not None and not self.fault_undo_skip_save:
                region = self.policy.region_bytes
                image = self.sec_disk.image()
                for e in ordered:
                    if e.kind == WriteKind.DIGEST or not e.length:
                        continue
                    for r in range(e.offset // region, (e.offset + e.length - 1) // region + 1):
                        if r not in self.undo:
                            self.undo[r] = bytes(image[r * region : (r + 1) * region])
            for e in ordered:
                if e.kind == WriteKind.DIGEST:
                    img = bytes(self.sec_disk.image()[e.offset : e.offset + e.length])
                    sec.digest_differs(e, img)
                    continue
                data = e.data if e.kind == WriteKind.WRITE else bytes(e.length)
                self.sec_disk.write(e.offset, data)
            sec.applied(last_seq)
            self.stats.batches_applied += 1
            if self.replaying_until is not None and sec.applied_seq >= self.replaying_until:
                self.replaying = False
                self.replaying_until = None
        elif isinstance(item, ResyncDone):
            sec.on_resync_done(item.upto_seq)
            self._resync_lineage = item.lineage
        else:
            sec.on_flush(item)
        if sec.sync_needed():
            self.secondary_sync()
        self._maybe_resync_complete()
        differs = sec.take_differs()
        if differs is not None:
            self.to_primary.append(self.s_enc.encode(differs))
        self.to_primary.append(self.s_enc.encode(sec.ack()))
        return True

    def _maybe_resync_complete(self) -> None:
        if self.secondary.resync_complete():
            assert self._resync_lineage is not None
            decoded = decode_genstate(self._resync_lineage)
            assert decoded is not None
            self.undo = None  # discarded before the lineage is adopted
            self.diverged = False  # it now holds the primary's history
            self.s_own_bitmap.clear()
            self.s_gens, _ = after_resync(self.s_gens, decoded[1])
            self.s_gens = replace(self.s_gens, primary=False)
            # The sync that completed it flushed everything: durable is a prefix.
            self.replaying = False
            self.durable_torn = False

    def secondary_sync(self) -> bool:
        """The secondary syncs its store and persists its durable point."""
        sec = self.secondary
        if sec.durable_seq >= sec.applied_seq:
            return False
        seq = sec.applied_seq
        self.sec_disk.flush()
        self.sec_meta_durable = seq
        if not self.replaying and not self.s_gens.inconsistent:
            self.durable_torn = False
        sec.synced(seq)
        self._maybe_resync_complete()
        if self.connected:
            self.to_primary.append(self.s_enc.encode(sec.ack()))
        return True

    def deliver_to_primary(self) -> bool:
        if not self.connected or not self.to_primary:
            return False
        raw = self.to_primary.pop(0)
        try:
            self.p_dec.receive_data(raw)
            while True:
                msg = self.p_dec.next_message()
                if msg is None:
                    break
                if isinstance(msg, Differs):
                    if not self.fault_ignore_differs:
                        self.primary.on_differs(msg, self.now_s)
                    continue
                if isinstance(msg, PeerBitmap):
                    self.primary.on_peer_bitmap(msg, self.now_s)
                    continue
                if not isinstance(msg, Ack):
                    raise ProtocolError(f"unexpected {type(msg).__name__}")
                self._completed(self.primary.on_ack(msg, now_s=self.now_s))
                self._note_core()
        except ProtocolError as exc:
            self._protocol_failure(exc)
        return True

    def crash_secondary(self) -> None:
        """The secondary loses power: unsynced writes partly survive, the
        process restarts from its persisted durable point."""
        self.cut()
        self.stats.crashes += 1
        self.sec_disk.crash(self.rng)
        self.durable_torn = True
        self.secondary = self._new_secondary(self.sec_meta_durable)
        self.replaying = True
        self.replaying_until = None

    # ------------------------------------------------------------ role swaps

    def _swap_sites(self, new_primary_image: bytes, k: int) -> None:
        """The secondary's site becomes primary with ``new_primary_image`` (the
        history's first ``k`` writes); the old primary's site becomes its
        secondary, holding what the old primary's disk holds."""
        old_core = self.primary
        old_image = bytes(self.primary_disk)
        self.primary = PrimaryCore(
            self.policy, self.size_bytes, last_seq=k, bitmaps={"peer": self.s_own_bitmap}
        )
        self.s_own_bitmap = old_core.peer.bitmap
        self.primary_disk = bytearray(new_primary_image)
        self.sec_disk = SimDisk(self.size_bytes)
        self.sec_disk.durable[:] = old_image
        self.sec_meta_durable = old_core.last_seq
        self.secondary = self._new_secondary(old_core.last_seq)
        self.overlap = OverlapTracker()
        self.replaying = False
        self.replaying_until = None
        self.undo = None
        self.pending_flushes = []  # the old primary's application is gone

    def switchover(self) -> bool:
        """A planned switchover: only between copies in sync (everything
        applied and durable on the secondary); the roles swap with no
        generation change, and the next connect must find them in sync."""
        # The demotion drains the peer: everything in flight reaches it and
        # is applied and synced (a lineage announcement included) first.
        while self.connected and (self.to_secondary or self.sec_queue):
            while self.deliver_to_secondary():
                pass
            while self.secondary_apply():
                pass
        self.secondary_sync()
        while self.deliver_to_primary():
            pass
        core, sec = self.primary, self.secondary
        k = core.last_seq
        if (
            not self.connected
            or sec.resync_upto is not None
            or self.pending_local
            or core.outdated
            or core.peer.resyncing
            or self.replaying
            or self.s_gens.inconsistent
            or self.diverged
            or sec.applied_seq != k
            or sec.durable_seq != k
            or core.peer_durable != k
        ):
            return False
        self.cut()
        image = bytes(self.sec_disk.image())
        assert image == self.prefix_image(k), "switchover onto a copy that is not the history"
        p_gens, s_gens = self.p_gens, self.s_gens
        self._swap_sites(image, k)
        self.p_gens = on_promote(s_gens, 0, int(self.now_s), connected_in_sync=True, forced=False)
        self.s_gens = replace(p_gens, primary=False)
        self._shared_gen = self.p_gens.current.id
        self.durable_torn = False  # its disk holds exactly the first k writes
        self.expect_in_sync = True
        self.stats.switchovers += 1
        return True

    def force_promote(self) -> bool:
        """The primary's site is lost: the disconnected secondary is promoted
        by force (a cut-off resync target rolls back through its undo log).
        Writes past its image are lost, and reported; sync mode must not lose
        a write acknowledged while the peer was required. The old primary
        returns as secondary with a history of its own, to be rolled back."""
        if self.connected:
            self.cut()
        while self.complete_local(0):
            pass
        if self.diverged:
            return False  # its own old history: not what this test promotes
        if self.undo is not None:
            image = bytearray(self.sec_disk.image())
            region = self.policy.region_bytes
            for r, old in self.undo.items():
                image[r * region : r * region + len(old)] = old
            base, k = bytes(image), self.undo_base_k
        elif self.replaying or self.s_gens.inconsistent:
            return False  # not promotable without salvage; the test does not do that
        else:
            base, k = bytes(self.sec_disk.image()), self.secondary.applied_seq
        assert k >= 0 and self.prefix_image(k) == base, (
            "a promotable copy that is no prefix of the history"
        )
        lost = sorted(s for s in self.acked if s > k)
        # A copy rolled back from a cut-off resync loses what the resync and the
        # writes shipped during it brought (reported); any other must hold every
        # write acknowledged while the peer was required.
        assert (
            self.undo is not None or self.policy.mode != Mode.SYNC or (self.must_be_applied <= k)
        ), (
            f"forced promotion at write {k} loses write {self.must_be_applied}, acknowledged "
            "while the peer was required"
        )
        self.forced_lost.extend(lost)
        p_gens, s_gens = self.p_gens, self.s_gens
        self._swap_sites(base, k)
        self._next_gen += 1
        self.p_gens = on_promote(
            replace(s_gens, inconsistent=False),
            self._next_gen,
            int(self.now_s),
            connected_in_sync=False,
            forced=True,
        )
        self.s_gens = replace(p_gens, primary=False)
        self._shared_gen = None
        self.diverged = True
        self.durable_torn = True
        self.expect_in_sync = False
        # The history is now the promoted copy's: its first k writes, then its own.
        del self.history[k:]
        self._prefix_cache = {j: img for j, img in self._prefix_cache.items() if j <= k}
        self.acked = {s for s in self.acked if s <= k}
        self.fua_writes = {s for s in self.fua_writes if s <= k}
        self.must_be_applied = min(self.must_be_applied, k)
        self.must_be_durable = min(self.must_be_durable, k)
        self.stats.forced_promotions += 1
        return True

    def allow_degraded(self) -> None:
        self._completed(self.primary.allow_degraded())

    # ------------------------------------------------------------ invariants

    def check(self) -> None:
        """Assert every safety property that must hold right now."""
        core, sec = self.primary, self.secondary
        # Bounded queues.
        largest = max((ln for _, _, ln, _ in self.history), default=0) + 24
        assert core.log_bytes <= max(self.policy.max_lag_bytes, largest), (
            f"retained log {core.log_bytes} exceeds bound {self.policy.max_lag_bytes}"
        )
        assert 0 <= core.peer_durable <= core.peer_applied <= core.last_seq
        # Property 2: the secondary is a prefix of the primary's history.
        if not self.replaying and not self.s_gens.inconsistent and not self.diverged:
            image = self.sec_disk.image()
            assert image == self.prefix_image(sec.applied_seq), (
                f"secondary image is not the primary's history after {sec.applied_seq} writes"
            )
        # Property 8: a resync target with an undo log can always go back to
        # its consistent pre-resync image, now and after a crash (what is
        # durable, with the log applied).
        if self.undo is not None:
            base = self.undo_base
            region = self.policy.region_bytes
            for img, what in (
                (self.sec_disk.image(), "now"),
                (self.sec_disk.durable, "after a crash"),
            ):
                rolled = bytearray(img)
                for r, old in self.undo.items():
                    rolled[r * region : r * region + len(old)] = old
                assert rolled == base, (
                    f"the undo log would not restore the pre-resync image ({what})"
                )
        # Its durable part is a prefix too (what survives a crash), except for
        # the torn window after a crash, until the next sync.
        assert sec.durable_seq == self.sec_meta_durable
        if not self.durable_torn:
            assert bytes(self.sec_disk.durable) == self.prefix_image(self.sec_meta_durable), (
                "durable image is not a prefix"
            )
        # Property 1 (sync): acknowledged writes are on the peer.
        if self.policy.mode == Mode.SYNC:
            assert self.sec_meta_durable >= self.must_be_durable, (
                f"write/flush up to {self.must_be_durable} acknowledged as durable but the "
                f"secondary's durable point is {self.sec_meta_durable}"
            )
            if not self.replaying and not self.s_gens.inconsistent:
                assert sec.applied_seq >= self.must_be_applied, (
                    f"write {self.must_be_applied} acknowledged in sync mode but the secondary "
                    f"applied only {sec.applied_seq}"
                )
        # Async: completion never waited for the peer.
        # Property 3 on the primary side: overlapping writes in sequence order.
        if not self.pending_local:
            assert bytes(self.primary_disk) == self.prefix_image(core.last_seq), (
                "primary image differs from its own write history (overlap order broken)"
            )

    def quiesce(self, max_steps: int = 10_000) -> None:
        """Heal the link and run every pending action to completion."""
        for _ in range(max_steps):
            progressed = False
            while self.complete_local(0):
                progressed = True
            if not self.connected:
                progressed |= self.connect()
            while self.resync_step():
                progressed = True
            while self.complete_local(0):
                progressed = True
            progressed |= self.ship()
            while self.deliver_to_secondary():
                progressed = True
            while self.secondary_apply():
                progressed = True
            progressed |= self.secondary_sync()
            while self.deliver_to_primary():
                progressed = True
            if (
                not progressed
                and self.connected
                and (self.s_dec.buffered_bytes or self.p_dec.buffered_bytes)
                and not (self.to_secondary or self.to_primary)
            ):
                # A corrupted length field leaves a receiver waiting for bytes
                # that never come; the shell's keepalive watchdog ends such a
                # silent session, and so do we.
                self.cut()
                progressed = True
            self.tick(self.policy.peer_flush_interval_s)
            self.check()
            if not progressed:
                return
        raise AssertionError("simulation did not quiesce")

    def check_converged(self) -> None:
        """After :meth:`quiesce`: the peer is back (resynced if it had to be),
        consistent, and both copies hold the same image."""
        assert not self.primary.outdated, "the peer is still outdated after quiescing"
        assert not self.s_gens.inconsistent, "the peer is still inconsistent after quiescing"
        assert self.s_gens.current.id == self.p_gens.current.id
        assert self.secondary.applied_seq == self.primary.last_seq
        assert bytes(self.sec_disk.image()) == bytes(self.primary_disk)
        assert not self.pending_flushes or not self.primary.peer_required()


def run_random(
    policy: ReplicationPolicy, seed: int, steps: int = 400, **faults: bool
) -> Simulation:
    """Run a seeded random schedule of writes, flushes and faults; check after
    every step and at the end. Raises AssertionError on any violation."""
    sim = Simulation(policy, seed=seed, **faults)
    rng = random.Random(seed ^ 0x5EED)
    # Cumulative weights: the link and the appliers run about as often as the
    # application writes, faults are rare but every run sees several.
    actions = [
        (
            0.14,
            lambda: sim.app_write(
                rng.randrange(32), rng.choice([1, 1, 2, 4, 8]), rng.random() < 0.1
            ),
        ),
        (
            0.16,
            lambda: sim.app_write(
                rng.randrange(32),
                rng.choice([1, 4]),
                False,
                rng.choice([WriteKind.TRIM, WriteKind.ZEROES]),
            ),
        ),
        (0.30, lambda: sim.complete_local(rng.randrange(1 << 16))),
        (0.34, sim.app_flush),
        (0.43, sim.ship),
        (0.46, sim.resync_step),
        (0.60, lambda: sim.deliver_to_secondary(rng.choice([0, 0, 0, rng.randrange(1, 4096)]))),
        (0.74, sim.secondary_apply),
        (0.87, sim.deliver_to_primary),
        (0.90, sim.secondary_sync),
        (0.915, sim.cut),
        (0.96, sim.connect),
        (0.967, lambda: sim.corrupt(rng.randrange(8), rng.randrange(1 << 16))),
        (0.972, sim.crash_secondary),
        (0.975, sim.allow_degraded),
        (0.978, sim.switchover),
        (0.980, sim.force_promote),
        (1.0, lambda: sim.tick(rng.random())),
    ]
    for _ in range(steps):
        r = rng.random()
        for bound, action in actions:
            if r < bound:
                action()
                break
        sim.check()
    sim.quiesce()
    sim.check_converged()
    return sim
