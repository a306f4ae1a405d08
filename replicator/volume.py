"""The volume shell: one site's copy of a replicated volume, on trio.

:class:`ReplicatedVolume` is a :class:`~replicator.device.BlockDevice` (the NBD
export serves it) and runs the replication link. All decisions live in the
sans-I/O cores (:class:`~replicator.session.PrimaryCore`,
:class:`~replicator.session.SecondaryCore`); this module moves bytes, time and
store I/O in and out of them:

* primary: sequence each write, wait for earlier overlapping writes, apply it
  locally in a worker thread while the sender ships it, and complete it when the
  core says so; a dial loop keeps one connection to the secondary.
* secondary: accept one connection at a time from the primary, apply batches
  strictly in order, sync on FLUSH/FUA and every ``secondary_sync_interval_s``,
  persist the durable sequence number, acknowledge cumulatively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from geoclus.errors import (
    GeoclusError,
    HandshakeRefused,
    NotPrimaryError,
    ProtocolError,
    StoreError,
)
from replicator.activitylog import ActivityLog, ActivityLogFile, AlBlocked, AlChange
from replicator.bitmap import DirtyBitmap
from replicator.bitmapfile import BitmapFile
from replicator.events import EventLog
from replicator.frames import (
    ENTRY_HEADER_BYTES,
    HELLO_FLAG_CLEAN,
    MAX_BITMAP_RUNS,
    WELCOME_FLAG_RESYNC,
    WELCOME_FLAG_SEND_BITMAP,
    Ack,
    Bye,
    Differs,
    Flush,
    FrameDecoder,
    FrameEncoder,
    Hello,
    Message,
    Mode,
    PeerBitmap,
    Ping,
    Pong,
    Refuse,
    ResyncDone,
    Role,
    Welcome,
    WriteEntry,
    WriteKind,
    Writes,
    entry_data_bytes,
)
from replicator.generations import (
    Action,
    Cause,
    Decision,
    Generation,
    GenState,
    SplitBrainPolicy,
    after_resync,
    decide,
    fresh,
    may_catch_up,
    on_crash_restart,
    on_crash_restart_logged,
    on_promote,
    on_resolve_discard,
    on_write_unreplicated,
    unknown_copy,
)
from replicator.genfile import GenFile, decode_genstate, encode_genstate
from replicator.handshake import check_hello, make_hello, negotiate_version
from replicator.latency import LatencyRecorder
from replicator.meta import ROLE_PRIMARY, ROLE_SECONDARY, MetaFile, VolumeMeta
from replicator.ordering import OverlapTracker
from replicator.ratecontrol import RateConfig, RateController
from replicator.session import PrimaryCore, ReplicationPolicy, SecondaryCore
from replicator.store import AsyncStore, FileStore, StoreOp, check_range
from replicator.undolog import UndoFull, UndoLog

log = logging.getLogger("geoclus.volume")

# The longest single operation sequenced: NBD's largest write; longer trims and
# zeroings are split (the activity log bounds the extents one operation spans).
_MAX_OP_BYTES = 16 * 1024 * 1024
# Test-only fault ``secondary-out-of-order``: writes held back, applied later
# in a random order.
_FAULT_BUFFER_WRITES = 256
# How much the receive loop asks the kernel for at once.
_RECEIVE_BYTES = 256 * 1024
# Batches queued between the secondary's receiver and applier: with frames of
# at most DEFAULT_MAX_PAYLOAD_BYTES this bounds the queue to a few tens of MiB.
_APPLY_QUEUE_BATCHES = 4


@dataclass(frozen=True)
class LinkTimers:
    """Timers of the replication link, in seconds.

    * ``keepalive_interval_s``: PING period (also measures the round trip).
    * ``peer_timeout_s``: no frame for this long means the peer is lost.
    * ``connect_timeout_s``: bound on TCP connect plus TLS and HELLO exchange.
    * ``reconnect_min_s`` / ``reconnect_max_s``: dial back-off range.
    * ``secondary_sync_interval_s``: the secondary syncs applied writes at least
      this often, so the primary can trim its retained log.
    * ``drain_timeout_s``: on shutdown, how long the primary waits for the
      peer to catch up before stopping anyway.
    * ``async_coalesce_s``: in async mode, how long the sender gathers writes
      before shipping them as one batch (0 ships each write at once).
    """

    keepalive_interval_s: float = 0.5
    peer_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 2.0
    secondary_sync_interval_s: float = 1.0
    drain_timeout_s: float = 10.0
    async_coalesce_s: float = 0.002


@dataclass(frozen=True)
class VolumeSpec:
    """Everything one site needs to run its copy of a volume."""

    name: str
    volume_id: bytes
    size_bytes: int
    block_size: int
    store_path: str
    meta_path: str
    role: Role
    policy: ReplicationPolicy
    node: str
    timers: LinkTimers = field(default_factory=LinkTimers)
    # Test-only faults (see TEST_FAULTS); empty in production.
    faults: frozenset[str] = frozenset()
    # The persisted dirty bitmap (docs/format.md); default: STORE.bitmap.
    bitmap_path: str | None = None
    # What to do with a split brain nobody resolved (docs/generations.md).
    split_brain_policy: SplitBrainPolicy = SplitBrainPolicy.NONE
    # Bound of the resync undo log (STORE.undo): None holds the whole volume,
    # 0 disables it (a resync target is then inconsistent until it completes).
    undo_max_bytes: int | None = None
    # Activity log (STORE.al): hot extents recorded before writing into them.
    al_extents: int = 1024
    al_extent_bytes: int = 4 * 1024 * 1024
    # Optional hard cap of resync traffic; None lets the controller adapt.
    resync_max_rate_bytes_s: int | None = None

    @property
    def bitmap_file_path(self) -> str:
        return self.bitmap_path or self.store_path + ".bitmap"

    @property
    def undo_file_path(self) -> str:
        """The resync undo log (docs/format.md): STORE.undo."""
        return self.store_path + ".undo"

    @property
    def al_file_path(self) -> str:
        """The activity log (docs/format.md): STORE.al."""
        return self.store_path + ".al"

    @property
    def undo_bytes(self) -> int:
        """The undo log's bound: explicit, or room for every region."""
        if self.undo_max_bytes is not None:
            return self.undo_max_bytes
        regions = -(-self.size_bytes // self.policy.region_bytes)
        return 8192 + regions * (64 + self.policy.region_bytes)

    @property
    def gens_file_path(self) -> str:
        """The generation lineage (docs/generations.md): STORE.gens."""
        return self.store_path + ".gens"


# The BYE reason a primary sends when it demotes itself (a switchover).
DEMOTED_BYE = "demoted"

# Faults a test may switch on to show that a check catches a broken rule.
TEST_FAULTS = frozenset({"secondary-out-of-order", "primary-ignore-overlaps"})


Connector = Callable[[], Awaitable[trio.abc.Stream]]


class FrameChannel:
    """A framed, checksummed, numbered message stream over a trio stream."""

    def __init__(self, stream: trio.abc.Stream, max_payload_bytes: int | None = None) -> None:
        self.stream = stream
        self._enc = FrameEncoder()
        self._dec = FrameDecoder() if max_payload_bytes is None else FrameDecoder(max_payload_bytes)
        self._send_lock = trio.Lock()
        self.last_receive_s = trio.current_time()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, msg: Message) -> None:
        async with self._send_lock:
            data = self._enc.encode(msg)
            await self.stream.send_all(data)
            self.bytes_sent += len(data)

    async def receive(self) -> Message:
        """Return the next message; raise ProtocolError on bad bytes or EOF."""
        while True:
            msg = self._dec.next_message()
            if msg is not None:
                self.last_receive_s = trio.current_time()
                return msg
            data = await self.stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise ProtocolError("peer closed the connection")
            # Any bytes prove the peer alive: a large frame on a slow link may
            # take longer than the timeout to arrive whole.
            self.last_receive_s = trio.current_time()
            self.bytes_received += len(data)
            self._dec.receive_data(data)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.aclose()


_STORE_KIND = {WriteKind.WRITE: "write", WriteKind.ZEROES: "zeroes", WriteKind.TRIM: "trim"}

# What the secondary's receiver hands its applier: a validated batch in the
# order the core says to apply it, with its last sequence number; or a FLUSH.
_ApplyItem = tuple[tuple[WriteEntry, ...], int] | Flush | ResyncDone | Bye


class ReplicatedVolume:
    """One site's copy of a replicated volume (a :class:`BlockDevice`).

    Create with :meth:`open`; run the link with :meth:`run_primary_link`
    (primary) or :meth:`handle_connection` per accepted connection (secondary);
    stop with :meth:`close`.
    """

    def __init__(
        self,
        spec: VolumeSpec,
        store: AsyncStore,
        meta: MetaFile,
        state: VolumeMeta,
        *,
        replaying: bool,
        bitmap_file: BitmapFile | None = None,
        bitmap: DirtyBitmap | None = None,
        genfile: GenFile | None = None,
        gens: GenState | None = None,
        undo: UndoLog | None = None,
        undo_active: bool = False,
        al_file: ActivityLogFile | None = None,
        al_hot: frozenset[int] = frozenset(),
    ) -> None:
        self.spec = spec
        # The activity log (docs/format.md): extents that may hold writes not
        # yet durable on both sides; a crashed primary resyncs only those.
        self.al_file = al_file
        self.al: ActivityLog | None = None
        if al_file is not None:
            self.al = ActivityLog(
                spec.size_bytes,
                spec.al_extent_bytes,
                spec.al_extents,
                hot=al_hot,
                generation=al_file.counter,
            )
        # Sequencing and activity-log touches happen in one order.
        self._seq_lock = trio.Lock()
        # The resync undo log (docs/format.md): while active, this copy's
        # pre-resync image can be restored, so it stays promotable.
        self.undo = undo
        self._undo_active = undo_active
        self._undo_base_seq: int | None = None  # unknown after a restart
        self.undo_rollbacks = 0
        self.bitmap_file = bitmap_file
        self._loaded_bitmap = bitmap
        self._primary_channel: FrameChannel | None = None
        self._demoting = False
        self.genfile = genfile
        self.gens = gens or fresh(spec.role == Role.PRIMARY)
        self._gens_pending = False
        self.last_decision: Decision | None = None
        self._resync_lineage: bytes | None = None
        self.resyncs_completed = 0
        self._resync_started_s: float | None = None
        # Role changes at run time: the volume owns its dial task.
        self._link_nursery: trio.Nursery | None = None
        self._link_connect: Connector | None = None
        self._link_label = "peer"
        self._link_scope: trio.CancelScope | None = None
        self._peer_demoted = False  # the old primary announced a clean demotion
        self._adopt_announcement: int | None = None
        self._last_peer_gens: GenState | None = None
        # The newest generation the peer may hold (in sync at connect, or
        # announced for adoption): diverging from it needs a new generation.
        self._shared_gen: int | None = None
        self._role_lock = trio.Lock()
        self.events = EventLog()
        self.events.add(
            "open",
            f"{spec.role.name.lower()} copy of {spec.name} opened, generation "
            f"{self.gens.current.id:#x}"
            + (" (inconsistent: a resync was cut off)" if self.gens.inconsistent else ""),
        )
        # Write-ahead barrier for the bitmap: pages waiting to be made durable,
        # and whether a persist is running (writers wait while it is).
        self._bitmap_pending: set[int] = set()
        self._bitmap_busy = False
        self._bitmap_idle = trio.Event()
        self.store = store
        self.meta = meta
        self.state = state
        self._role = spec.role
        self._closing = False
        self._closed = False
        self._changed = trio.Event()
        self._overlap = OverlapTracker(
            fault_ignore_overlaps="primary-ignore-overlaps" in spec.faults
        )
        self._fault_out_of_order = "secondary-out-of-order" in spec.faults
        self._fault_buffer: list[WriteEntry] = []
        self._local_done_events: dict[int, trio.Event] = {}
        self._completion_events: dict[int, trio.Event] = {}
        # Sizes the resync's in-flight window from measured application write
        # latency and resync throughput (no knob but an optional hard cap).
        self.rate = RateController(
            RateConfig(
                max_rate_bytes_s=spec.resync_max_rate_bytes_s,
                region_bytes=spec.policy.region_bytes,
                # One region in flight keeps a resync moving on any link; the
                # controller starts at sixteen and grows only while application
                # writes stay as fast as without a resync.
                min_window_bytes=spec.policy.region_bytes,
                initial_window_bytes=16 * spec.policy.region_bytes,
                # Long enough for a p99 over tens of writes at QD1, not max().
                interval_s=0.25,
                latency_factor=1.8,
            )
        )
        self.write_latency = LatencyRecorder()
        self.rtt = LatencyRecorder(1024)
        self.connected_peer: str | None = None
        self.last_error: str | None = None
        self.in_flight_writes = 0
        self._session_scope: trio.CancelScope | None = None
        self._session_done: trio.Event | None = None
        self.primary: PrimaryCore | None = None
        self.secondary: SecondaryCore | None = None
        # A secondary that crashed may hold a torn mix of writes it applied but
        # had not synced; it is consistent again once it has re-applied up to
        # the primary's position at reconnect.
        self._replaying = replaying
        self._replay_until: int | None = None
        # Whether the previous run of this copy ended with a clean shutdown.
        self.was_clean = False
        if spec.role == Role.PRIMARY:
            self.primary = PrimaryCore(
                spec.policy,
                spec.size_bytes,
                last_seq=state.seq,
                peer_outdated=state.outdated,
                bitmaps={"peer": bitmap} if bitmap is not None else None,
            )
        else:
            self.secondary = SecondaryCore(
                spec.size_bytes,
                spec.block_size,
                durable_seq=state.seq,
                fault_apply_out_of_order="secondary-out-of-order" in spec.faults,
            )

    # ------------------------------------------------------------------ open

    @classmethod
    async def open(cls, spec: VolumeSpec) -> ReplicatedVolume:
        """Open (creating if needed) the store and metadata of ``spec``.

        Raises StoreError if the store cannot be opened or the metadata belongs
        to a different volume.
        """
        return await trio.to_thread.run_sync(cls._open_sync, spec)

    @classmethod
    def _open_sync(cls, spec: VolumeSpec) -> ReplicatedVolume:
        meta = MetaFile(spec.meta_path)
        prev = meta.open()
        if prev is not None and not os.path.exists(spec.store_path):
            meta.close()
            raise StoreError(
                f"metadata {spec.meta_path} says this copy holds data, but the store "
                f"{spec.store_path} is missing; restore it, or remove the metadata file to "
                "start this copy empty (it will then need a full sync)"
            )
        try:
            fstore = FileStore(spec.store_path, spec.size_bytes, spec.block_size)
        except BaseException:
            meta.close()
            raise
        bitmap_file = None
        genfile = None
        undo: UndoLog | None = None
        al_file: ActivityLogFile | None = None
        try:
            role_code = ROLE_PRIMARY if spec.role == Role.PRIMARY else ROLE_SECONDARY
            replaying = False
            if prev is None:
                # A store we just created is all zeros: generation 0, the same on
                # every site. Existing data of unknown history gets a fresh
                # generation, so it never silently passes as in sync.
                generation = 0 if fstore.info.created else _new_generation()
                if not fstore.info.created:
                    log.warning(
                        "store %s existed without metadata: its content has an unknown "
                        "history (generation %#x); it needs a full sync before it can "
                        "replicate",
                        spec.store_path,
                        generation,
                    )
                state = VolumeMeta(
                    spec.volume_id,
                    spec.size_bytes,
                    spec.block_size,
                    generation,
                    role_code,
                    False,
                    False,
                    0,
                    time.time_ns(),
                )
            else:
                if prev.volume_id != spec.volume_id:
                    raise StoreError(
                        f"metadata {spec.meta_path} belongs to volume {prev.volume_id.hex()}, "
                        f"not {spec.volume_id.hex()}; point [volume] store at the right file"
                    )
                if prev.size_bytes != spec.size_bytes or prev.block_size != spec.block_size:
                    raise StoreError(
                        f"metadata {spec.meta_path} records size {prev.size_bytes} / block "
                        f"{prev.block_size}, the config says {spec.size_bytes} / "
                        f"{spec.block_size}"
                    )
                state = replace(prev, role=role_code, clean=False)
                if spec.role == Role.SECONDARY:
                    # ``outdated`` records that a primary's *peer* was behind;
                    # it means nothing for a copy that is now secondary.
                    state = replace(state, outdated=False)
                if not prev.clean:
                    if spec.role == Role.PRIMARY:
                        # The primary crashed: writes it shipped may not be on its
                        # own disk and vice versa. The history forks here; the
                        # activity log says which regions (else: a full sync).
                        # The peer needs a resync (of the activity log's
                        # extents and the bitmap): it is outdated until then.
                        state = replace(state, generation=_new_generation(), seq=0, outdated=True)
                        log.warning(
                            "primary %s was not shut down cleanly: new generation %#x; "
                            "the peer needs a resync before replicating again",
                            spec.name,
                            state.generation,
                        )
                    else:
                        replaying = True
                        log.warning(
                            "secondary %s was not shut down cleanly: it resumes from durable "
                            "write %d and is inconsistent until it has caught up",
                            spec.name,
                            prev.seq,
                        )
            was_clean = prev is not None and prev.clean
            bitmap_file = BitmapFile(
                spec.bitmap_file_path, spec.size_bytes, spec.policy.region_bytes
            )
            bitmap = bitmap_file.open()
            genfile = GenFile(spec.gens_file_path)
            gens = genfile.open()
            is_primary = spec.role == Role.PRIMARY
            if gens is None:
                if prev is None:
                    gens = (
                        fresh(is_primary)
                        if fstore.info.created
                        else unknown_copy(state.generation, time.time_ns(), is_primary)
                    )
                else:  # metadata written before lineages were kept
                    gens = GenState(
                        Generation(prev.generation, prev.created_ns, Cause.CREATE),
                        primary=is_primary,
                    )
            undo_active = False
            if spec.undo_bytes > 0:
                undo = UndoLog(
                    spec.undo_file_path, spec.size_bytes, spec.policy.region_bytes, spec.undo_bytes
                )
                ustate = undo.open()
                if ustate.active and not (
                    gens.inconsistent and ustate.base_generation == gens.current.id
                ):
                    log.warning(
                        "volume %s: dropping an undo log that no longer belongs to this "
                        "image (generation %#x)",
                        spec.name,
                        ustate.base_generation,
                    )
                    undo.discard()
                elif ustate.active and is_primary:
                    # A cut-off resync target now configured as primary: back to
                    # its last consistent image before it serves anything.
                    restored = undo.rollback(fstore.write, fstore.fdatasync)
                    gens = replace(gens, inconsistent=False)
                    log.warning(
                        "volume %s: rolled back %d regions of a cut-off resync: the image "
                        "is the consistent pre-resync one (generation %#x)",
                        spec.name,
                        restored,
                        gens.current.id,
                    )
                else:
                    undo_active = ustate.active
            al_existed = os.path.exists(spec.al_file_path)
            al_file = ActivityLogFile(
                spec.al_file_path, spec.size_bytes, spec.al_extent_bytes, spec.al_extents
            )
            al_hot = al_file.open()
            logged = False
            # Writes that may not be on both sides are in the hot extents:
            # mark them durably in the bitmap before anything else.
            if prev is not None and is_primary and not prev.clean and al_existed:
                regions = ActivityLog(
                    spec.size_bytes, spec.al_extent_bytes, spec.al_extents, hot=al_hot
                ).regions_of_hot(spec.policy.region_bytes)
                for r in regions:
                    bitmap.mark(r * spec.policy.region_bytes, 1)
                bitmap_file.persist(bitmap.raw_bits(), bitmap_file.pages_of(regions))
                logged = True
                if regions:
                    log.warning(
                        "volume %s: %d hot extents of the activity log marked for resync",
                        spec.name,
                        len(al_hot),
                    )
            if prev is not None and not prev.clean and is_primary:
                if logged:
                    gens = on_crash_restart_logged(gens, state.generation, time.time_ns())
                else:
                    gens = on_crash_restart(gens, state.generation, time.time_ns())
            gens = replace(gens, primary=is_primary)
            genfile.write(gens)
            state = replace(state, generation=gens.current.id)
            state = meta.write(state)
        except BaseException:
            fstore.close()
            meta.close()
            if bitmap_file is not None:
                bitmap_file.close()
            if genfile is not None:
                genfile.close()
            if undo is not None:
                undo.close()
            if al_file is not None:
                al_file.close()
            raise
        vol = cls(
            spec,
            AsyncStore(fstore),
            meta,
            state,
            replaying=replaying,
            bitmap_file=bitmap_file,
            bitmap=bitmap,
            genfile=genfile,
            gens=gens,
            undo=undo,
            undo_active=undo_active,
            al_file=al_file,
            al_hot=al_hot,
        )
        vol.was_clean = was_clean
        return vol

    # ------------------------------------------------------------ BlockDevice

    @property
    def size_bytes(self) -> int:
        return self.spec.size_bytes

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def read_only(self) -> bool:
        return self._role != Role.PRIMARY

    @property
    def role(self) -> Role:
        return self._role

    async def read(self, offset: int, length: int) -> bytes:
        return await self.store.read(offset, length)

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        """The data at ``[offset, offset + length)`` (a new bytearray the caller
        owns) if the store can serve it without blocking (page cache), else
        None: the NBD export's fast path for reads (:meth:`read` is the general
        one; both see every completed write). Raises :class:`IOAlignmentError`
        for a bad range."""
        return self.store.read_nowait(offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents (length, flags) of this copy's store from ``offset``: holes
        (trimmed or never written) and data (NBD ``base:allocation``)."""
        return await self.store.extents(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._submit(WriteKind.WRITE, offset, len(data), bytes(data), fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._submit_split(WriteKind.TRIM, offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        await self._submit_split(WriteKind.ZEROES, offset, length, fua)

    async def _submit_split(self, kind: WriteKind, offset: int, length: int, fua: bool) -> None:
        """Trims and zeroings of any length, as operations of at most
        ``_MAX_OP_BYTES`` (each one activity-log touch), in order."""
        check_range(offset, length, self.spec.size_bytes, self.spec.block_size)
        end = offset + length
        while True:
            n = min(end - offset, _MAX_OP_BYTES)
            await self._submit(kind, offset, n, b"", fua and offset + n == end)
            offset += n
            if offset >= end:
                return

    async def flush(self) -> None:
        """Durable locally (group commit) and, in sync mode, on the peer."""
        core = self.primary
        if core is None:
            await self.store.flush()
            return
        upto = core.request_peer_flush() if core.peer_required() else 0
        self._notify()
        await self.store.flush()
        while not core.peer_flush_satisfied(upto):
            if self._closing:
                raise GeoclusError("volume is shutting down; flush not confirmed by the peer")
            await self._wait_changed()

    # -------------------------------------------------------------- internals

    def _notify(self) -> None:
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    async def _wait_changed(self, timeout_s: float | None = None) -> None:
        ev = self._changed
        if timeout_s is None:
            await ev.wait()
        else:
            with trio.move_on_after(timeout_s):
                await ev.wait()

    def _complete(self, seqs: list[int]) -> None:
        for seq in seqs:
            ev = self._completion_events.pop(seq, None)
            if ev is not None:
                ev.set()

    async def _submit(
        self, kind: WriteKind, offset: int, length: int, data: bytes, fua: bool
    ) -> None:
        core = self.primary
        if core is None or self._role != Role.PRIMARY:
            raise NotPrimaryError(
                f"volume {self.spec.name} is secondary on this site: it serves reads only; "
                "write through the primary's export"
            )
        check_range(offset, length, self.spec.size_bytes, self.spec.block_size)
        if self._demoting:
            raise NotPrimaryError(
                f"volume {self.spec.name} is being demoted on this site; write through the "
                "new primary"
            )
        if self._closing:
            raise GeoclusError(f"volume {self.spec.name} is shutting down; write refused")
        start = trio.current_time()
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            # Uncontended (the common case): no scheduler round trip.
            self._seq_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._seq_lock.acquire()
        try:
            seq = await self._sequence(core, kind, offset, length, data, fua, start)
        except BaseException:
            self._seq_lock.release()
            raise
        blockers = self._overlap.add(seq, offset, length)
        local_done = trio.Event()
        self._local_done_events[seq] = local_done
        # A write completes at its own local_done() at the earliest (then or
        # later, on a peer's ack): its completion event is only made if it
        # is not complete right then.
        self.in_flight_writes += 1
        self._notify()
        try:
            # From here the write is sequenced and may already be shipped; the
            # local apply must run to its end even if the requester goes away,
            # or later overlapping writes would wait forever.
            with trio.CancelScope(shield=True):
                try:
                    if self.al is not None:
                        await self._al_admit(core, seq, offset, length)
                finally:
                    self._seq_lock.release()
                # Write-ahead: a region's dirty bit (and a new generation) is
                # durable before data lands.
                if self._bitmap_pending or self._gens_pending or self._bitmap_busy:
                    await self._flush_bitmap()
                for b in blockers:
                    ev = self._local_done_events.get(b)
                    if ev is not None:
                        await ev.wait()
                try:
                    await self.store.apply(StoreOp(_STORE_KIND[kind], offset, length, data, fua))
                except BaseException:
                    core.local_failed(seq)
                    raise
                finally:
                    self._overlap.remove(seq)
                    del self._local_done_events[seq]
                    local_done.set()
                completed = core.local_done(seq)
                self._complete(completed)
                if not core.is_complete(seq):
                    done = trio.Event()
                    self._completion_events[seq] = done
                else:
                    done = None
            if done is not None:
                await done.wait()
            now = trio.current_time()
            self.write_latency.add(now - start)
            self.rate.on_app_write(now - start, now)
        finally:
            self.in_flight_writes -= 1

    async def _sequence(
        self,
        core: PrimaryCore,
        kind: WriteKind,
        offset: int,
        length: int,
        data: bytes,
        fua: bool,
        start: float,
    ) -> int:
        """Admission and sequencing of one write (under ``_seq_lock``)."""
        while True:
            verdict = core.admission(length, kind)
            if verdict == "admit":
                break
            if verdict == "overflow":
                log.warning(
                    "volume %s: replication log full (%d bytes); the peer is now outdated "
                    "and changed regions are tracked in the dirty bitmap until a resync",
                    self.spec.name,
                    core.log_bytes,
                )
                core.go_outdated()
                break
            if self._closing:
                raise GeoclusError(f"volume {self.spec.name} is shutting down; write refused")
            await self._wait_changed()
        seq = core.submit(kind, offset, length, data, fua, start, held=self.al is not None)
        if (not core.peer.connected or core.outdated) and (
            self.gens.bitmap_base is None or self.gens.current.id == self._shared_gen
        ):
            # Our data history leaves the peer's with this write: a new
            # generation (written ahead of the data by the barrier), or a
            # forced promotion of the peer would not roll it back later.
            # (Only then: drawing an id costs more than the write's bookkeeping.)
            before = self.gens
            self.gens = on_write_unreplicated(
                self.gens,
                _new_generation(),
                time.time_ns(),
                shared=self.gens.current.id == self._shared_gen,
            )
            if self.gens is not before:
                self._gens_pending = True
                self.events.add(
                    "diverged",
                    f"writing without the peer: new generation {self.gens.current.id:#x}",
                )
        self._note_bitmap_changes()
        return seq

    async def _al_admit(self, core: PrimaryCore, seq: int, offset: int, length: int) -> None:
        """Write-ahead for the activity log: the write ``seq`` (held, not
        shipped) is released once a hot set holding its extents is durable.
        When no hot extent may leave yet, the writes before it are made
        stable first: durable here, and durable on the peer or marked in the
        persisted bitmap."""
        al, al_file = self.al, self.al_file
        assert al is not None and al_file is not None
        try:
            result = al.touch(offset, length, seq)
            while isinstance(result, AlBlocked):
                await self._al_make_stable(core, result.need_stable_seq)
                al.set_stable(result.need_stable_seq)
                result = al.touch(offset, length, seq)
            if isinstance(result, AlChange):
                await self.store.run_blocking(al_file.persist, result.hot, result.generation)
        finally:
            core.release(seq)
            self._notify()

    async def _al_make_stable(self, core: PrimaryCore, upto: int) -> None:
        """Every write up to ``upto`` durable here, and on the peer or covered
        by the durable bitmap (so its extent may leave the activity log)."""
        while any(s <= upto for s in self._local_done_events):
            await self._wait_changed(0.05)
        await self.store.flush()
        p = core.peer
        if p.connected and not p.outdated and p.durable < upto:
            core.request_peer_flush()
            self._notify()
            while p.connected and not p.outdated and p.durable < upto:
                await self._wait_changed(0.05)
        # A peer that is gone or outdated has those writes in its bitmap.
        self._note_bitmap_changes()
        await self._flush_bitmap()

    def _decide(self, remote: Hello) -> Decision:
        """The generation decision for this peer (docs/generations.md)."""
        self._last_peer_gens = None
        if not remote.lineage:
            # An older peer: only the current generation can be compared.
            same = remote.generation == self.gens.current.id
            return Decision(
                Action.IN_SYNC if same else Action.UNRELATED,
                "same generation"
                if same
                else "the peer sent no lineage and its generation differs",
            )
        decoded = decode_genstate(remote.lineage)
        if decoded is None:
            raise ProtocolError("HELLO carries a lineage that does not decode")
        self._last_peer_gens = decoded[1]
        return decide(self.gens, decoded[1], self.spec.split_brain_policy)

    async def _resync_task(self, ch: FrameChannel) -> None:
        """Background work toward the peer for the whole session: resync and
        verify. Each step (a region's copy, or its DIGEST) is sequenced in
        order with the application's writes (so no resync data ever
        overwrites a newer write, and a digest is compared at the same point
        on both sides), bounded by its half of the retained log. A finished
        resync is announced with RESYNC_DONE."""
        core = self.primary
        assert core is not None
        rate = self.rate
        try:
            await self._background_steps(ch, core, rate)
        finally:
            rate.stop()

    async def _background_steps(
        self, ch: FrameChannel, core: PrimaryCore, rate: RateController
    ) -> None:
        while True:
            step = core.next_resync_step()
            busy = core.peer.resyncing or (
                core.peer.verify is not None and core.peer.verify.running
            )
            now = trio.current_time()
            if busy and not rate.active:
                rate.start(now)
            elif not busy and rate.active:
                rate.stop()
            if step is not None:
                # The adaptive window: resync bytes in flight stay within what
                # the link carries without delaying application writes.
                in_flight = core.resync_in_flight_bytes()
                rate.on_in_flight(in_flight, now)
                wire = ENTRY_HEADER_BYTES + entry_data_bytes(step.kind, step.length)
                if in_flight and in_flight + wire > rate.window_bytes(now):
                    deadline = rate.next_deadline_s()
                    await self._wait_changed(
                        None if deadline is None else max(0.001, deadline - now)
                    )
                    continue
                delay_s = rate.admit(wire, now)
                if delay_s > 0:
                    await trio.sleep(delay_s)  # the operator's hard cap
                    continue
            if step is None:
                last = core.announce_resync_done()
                if last is not None:
                    self._shared_gen = self.gens.current.id
                    await ch.send(ResyncDone(last, encode_genstate(self.gens, 0)))
                    core.request_peer_flush()
                    self._notify()
                await self._wait_changed()
                continue
            # Resync copies wait for room in the retained log, whatever the
            # congestion policy: only application writes may pull ahead (a
            # resync that pulled itself ahead would start over forever).
            if not core.resync_admission(step.length):
                await self._wait_changed()
                continue
            seq = core.submit_resync(trio.current_time())
            blockers = self._overlap.add(seq, step.offset, step.length)
            local_done = trio.Event()
            self._local_done_events[seq] = local_done
            try:
                with trio.CancelScope(shield=True):
                    for b in blockers:
                        ev = self._local_done_events.get(b)
                        if ev is not None:
                            await ev.wait()
                    try:
                        data = await self.store.read(step.offset, step.length)
                    except StoreError as exc:
                        log.error("volume %s: resync read failed: %s", self.spec.name, exc)
                        core.go_outdated()
                        self._note_bitmap_changes()
                        return
                    self._complete(core.fill_resync(seq, data))
            finally:
                self._overlap.remove(seq)
                self._local_done_events.pop(seq, None)
                local_done.set()
            self._notify()

    # ------------------------------------------------------------------ bitmap

    def _diverge_if_peer_lacks_writes(self) -> None:
        """The link is gone and the peer lacks some of our writes: our data
        history now differs from anything the peer could be promoted with, so
        start a new generation (its bitmap holds those writes' regions). A
        reconnect still catches the peer up through the log when it can."""
        core = self.primary
        if core is None or not core.lag_writes:
            return
        before = self.gens
        self.gens = on_write_unreplicated(
            self.gens,
            _new_generation(),
            time.time_ns(),
            shared=self.gens.current.id == self._shared_gen,
        )
        if self.gens is before:
            return
        self._gens_pending = True
        self.events.add(
            "diverged",
            f"the link dropped with {core.lag_writes} writes the peer "
            f"lacks: new generation {self.gens.current.id:#x}",
        )

    def _note_bitmap_changes(self) -> None:
        """Queue the bitmap pages the core changed (synchronous, so a writer that
        comes next sees the barrier before anything yields)."""
        core, bf = self.primary, self.bitmap_file
        if core is None or bf is None:
            return
        for regions in core.take_new_dirty().values():
            self._bitmap_pending |= bf.pages_of(regions)
        if core.take_went_outdated():
            self.events.add(
                "outdated",
                "the peer fell out of the retained log: it is outdated, changed regions "
                "are tracked until a resync",
            )
            # The peer can no longer follow through the log: our data history
            # diverges from its from here on (a new generation, written ahead).
            before = self.gens
            self.gens = on_write_unreplicated(
                self.gens,
                _new_generation(),
                time.time_ns(),
                shared=self.gens.current.id == self._shared_gen,
            )
            self._gens_pending |= self.gens is not before
        if core.take_cleared():
            self._bitmap_pending |= set(bf.pages_with_bits)
            if self.gens.bitmap_base is not None and not core.outdated:
                self.gens = replace(self.gens, bitmap_base=None, changes=0)
                self._gens_pending = True

    async def _flush_bitmap(self) -> None:
        """Make every queued bitmap page durable (group commit: one fdatasync
        for all pages queued when it starts); waits for a running one first."""
        core, bf = self.primary, self.bitmap_file
        if core is None or bf is None:
            self._bitmap_pending.clear()
            return
        while self._bitmap_pending or self._gens_pending or self._bitmap_busy:
            if self._bitmap_busy:
                await self._bitmap_idle.wait()
                continue
            self._bitmap_busy = True
            pages, self._bitmap_pending = self._bitmap_pending, set()
            bits = core.peer.bitmap.raw_bits()  # snapshot on the loop thread
            gens = None
            if self._gens_pending:
                self._gens_pending = False
                gens = replace(self.gens, changes=core.peer.bitmap.dirty_regions)
            try:
                if pages:
                    await self.store.run_blocking(bf.persist, bits, pages)
                if gens is not None and self.genfile is not None:
                    await self.store.run_blocking(self.genfile.write, gens)
            finally:
                self._bitmap_busy = False
                idle, self._bitmap_idle = self._bitmap_idle, trio.Event()
                idle.set()

    # ----------------------------------------------------------- primary link

    def _hello(self) -> Hello:
        if self._role == Role.PRIMARY:
            assert self.primary is not None
            applied = durable = self.primary.last_seq
        else:
            assert self.secondary is not None
            applied, durable = self.secondary.applied_seq, self.secondary.durable_seq
        return make_hello(
            role=self._role,
            mode=self.spec.policy.mode,
            flags=HELLO_FLAG_CLEAN if self.was_clean else 0,
            block_size=self.spec.block_size,
            size_bytes=self.spec.size_bytes,
            volume_id=self.spec.volume_id,
            generation=self.state.generation,
            applied_seq=applied,
            durable_seq=durable,
            node=self.spec.node,
            lineage=encode_genstate(self.gens, 0),
        )

    async def run_primary_link(self, connect: Connector, peer_label: str = "peer") -> None:
        """Keep one replication connection to the secondary, forever.

        Reconnects with back-off after any failure; runs until cancelled.
        """
        timers = self.spec.timers
        backoff = timers.reconnect_min_s
        while not self._closing:
            channel: FrameChannel | None = None
            try:
                with trio.fail_after(timers.connect_timeout_s):
                    stream = await connect()
                    channel = FrameChannel(stream)
                    await self._primary_handshake(channel)
                backoff = timers.reconnect_min_s
                self.connected_peer = peer_label
                self.last_error = None
                log.info("volume %s: replicating to %s", self.spec.name, peer_label)
                self.events.add("connected", f"replicating to {peer_label}")
                await self._primary_session(channel)
            except HandshakeRefused as exc:
                self._link_error(f"handshake refused: {exc.reason}")
                backoff = timers.reconnect_max_s
            except _TRANSPORT_ERRORS as exc:
                self._link_error(_describe(exc))
            finally:
                self.connected_peer = None
                if self.primary is not None:
                    self._complete(self.primary.peer_lost())
                    self._report_verify()
                    self._diverge_if_peer_lacks_writes()
                    self._note_bitmap_changes()
                    if not self._closed:  # close() persisted what it had to
                        with trio.CancelScope(shield=True):
                            await self._flush_bitmap()
                self._notify()
                if channel is not None:
                    await channel.aclose()
            if self._closing:
                break
            await trio.sleep(backoff)
            backoff = min(backoff * 2, timers.reconnect_max_s)

    def _link_error(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("volume %s: replication link: %s", self.spec.name, reason)
            self.events.add("link", reason)
        self.last_error = reason

    async def _primary_handshake(self, ch: FrameChannel) -> None:
        core = self.primary
        assert core is not None
        local = self._hello()
        await ch.send(local)
        remote = await ch.receive()
        if isinstance(remote, Refuse):
            raise HandshakeRefused(f"the peer refused: {remote.reason}")
        if not isinstance(remote, Hello):
            raise ProtocolError(f"expected HELLO, got {type(remote).__name__}")
        reason = check_hello(local, remote)
        if reason is not None:
            await ch.send(Refuse(reason))
            raise HandshakeRefused(reason)
        version = negotiate_version(local, remote)
        assert version is not None
        answer: Welcome | Refuse
        decision = self._decide(remote)
        self.last_decision = decision
        self.events.add(
            "decision",
            f"{decision.action.value}: {decision.reason}",
            source=decision.source,
            full=decision.full,
            resolved_by=decision.resolved_by,
        )
        if decision.action is Action.IN_SYNC:
            answer = core.peer_connected(remote, version)
            self._shared_gen = self.gens.current.id
        elif (
            self._last_peer_gens is not None
            and may_catch_up(decision, self._last_peer_gens)
            and core.can_resume(remote)
        ):
            # The peer only lacks writes still in our log: it catches up in
            # order (staying a prefix) and then adopts our lineage.
            answer = core.peer_connected(remote, version)
            self._adopt_announcement = core.last_seq
            self.events.add(
                "catch-up",
                f"peer catches up through the log to {core.last_seq}, then adopts our lineage",
            )
        elif decision.action is Action.RESYNC and decision.source == "local":
            # Rolling back the peer's own changes needs its bitmap too: it
            # sends it (PEER_BITMAP) and the resync covers the union.
            full = decision.full
            answer = core.start_resync(
                remote, version, full=full, with_peer_bitmap="peer" in decision.bitmaps
            )
            kind = "full" if full else "delta"
            self._resync_started_s = trio.current_time()
            log.warning(
                "volume %s: %s resync of peer %s starts (%s): %d bytes to copy",
                self.spec.name,
                kind,
                remote.node,
                decision.reason,
                core.peer.resync_total_bytes,
            )
            self.events.add(
                "resync",
                f"{kind} resync of {remote.node} starts: "
                f"{core.peer.resync_total_bytes} bytes to copy",
            )
        else:
            answer = Refuse(f"{decision.action.value}: {decision.reason}")
        await ch.send(answer)
        if isinstance(answer, Refuse):
            raise HandshakeRefused(answer.reason)
        self._note_bitmap_changes()
        if self._bitmap_pending or self._gens_pending:
            with trio.CancelScope(shield=True):
                await self._flush_bitmap()
        if core.outdated:
            log.warning(
                "volume %s: peer %s is outdated (needs resync); not shipping writes",
                self.spec.name,
                remote.node,
            )

    async def _primary_session(self, ch: FrameChannel) -> None:
        self._primary_channel = ch
        try:
            with _unwrap_link_errors():
                await self._primary_session_tasks(ch)
        finally:
            self._primary_channel = None

    async def _primary_session_tasks(self, ch: FrameChannel) -> None:
        if self._adopt_announcement is not None:
            upto, self._adopt_announcement = self._adopt_announcement, None
            self._shared_gen = self.gens.current.id
            await ch.send(ResyncDone(upto, encode_genstate(self.gens, 0)))
            if self.primary is not None:
                self.primary.request_peer_flush()
        async with trio.open_nursery() as nursery:
            if self.primary is not None:
                nursery.start_soon(self._resync_task, ch)
            nursery.start_soon(self._primary_sender, ch)
            nursery.start_soon(self._keepalive, ch)
            await self._primary_receiver(ch)
            nursery.cancel_scope.cancel()

    async def _primary_sender(self, ch: FrameChannel) -> None:
        core = self.primary
        assert core is not None
        coalesce_s = self.spec.timers.async_coalesce_s if core.policy.mode == Mode.ASYNC else 0.0
        while True:
            if core.outdated and core.connected:
                # The peer fell behind what we retain (pull-ahead): reconnect,
                # and the generation decision starts a resync.
                raise ProtocolError("peer outdated: reconnecting to resync it")
            batch = core.next_batch()
            flush = core.next_flush(trio.current_time())
            if batch is None and flush is None:
                await self._wait_changed(self.spec.policy.peer_flush_interval_s)
                if coalesce_s:
                    # Async: nobody waits for the peer, so gather the writes of
                    # the next moment into one frame (fewer frames, TLS records
                    # and acks per write; the lag grows by at most this much).
                    await trio.sleep(coalesce_s)
                continue
            if batch is not None:
                await ch.send(batch)
            if flush is not None:
                await ch.send(flush)

    async def _primary_receiver(self, ch: FrameChannel) -> None:
        core = self.primary
        assert core is not None
        while True:
            msg = await ch.receive()
            if isinstance(msg, Differs):
                core.on_differs(msg, trio.current_time())
                self._notify()
            elif isinstance(msg, PeerBitmap):
                core.on_peer_bitmap(msg, trio.current_time())
                self._note_bitmap_changes()
                if msg.last:
                    self.events.add(
                        "resync",
                        "the peer's own changes join the resync: "
                        f"{core.peer.resync_total_bytes} bytes to copy in all",
                    )
                self._notify()
            elif isinstance(msg, Ack):
                before = core.resync_in_flight_bytes()
                self._complete(core.on_ack(msg, now_s=trio.current_time()))
                acked = before - core.resync_in_flight_bytes()
                if acked > 0 and self.rate.active:
                    self.rate.on_resync_acked(acked, trio.current_time())
                self._report_verify()
                if core.take_resync_completed():
                    self.resyncs_completed += 1
                    self.events.add("resync", "resync complete: the peer is consistent again")
                    log.info(
                        "volume %s: resync complete; the peer is consistent again", self.spec.name
                    )
                self._note_bitmap_changes()
                if self._bitmap_pending or self._gens_pending:
                    await self._flush_bitmap()
                self._notify()
            elif isinstance(msg, Pong):
                self.rtt.add(max(0.0, (time.monotonic_ns() - msg.sent_ns) / 1e9))
            elif isinstance(msg, Ping):
                await ch.send(Pong(msg.nonce, msg.sent_ns))
            elif isinstance(msg, Bye):
                raise ProtocolError(f"peer said goodbye: {msg.reason}")
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} from the secondary")

    async def _keepalive(self, ch: FrameChannel) -> None:
        """PING every ``keepalive_interval_s``; fail the session when nothing has
        arrived for ``peer_timeout_s``. The silence check runs in its own task:
        a PING can block behind a data frame stuck in a clogged link, and that
        must not stop the peer from being declared lost."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pinger, ch)
            await self._watchdog(ch)
            nursery.cancel_scope.cancel()

    async def _pinger(self, ch: FrameChannel) -> None:
        nonce = 0
        while True:
            nonce += 1
            await ch.send(Ping(nonce, time.monotonic_ns()))
            await trio.sleep(self.spec.timers.keepalive_interval_s)

    async def _watchdog(self, ch: FrameChannel) -> None:
        timers = self.spec.timers
        while True:
            await trio.sleep(min(timers.keepalive_interval_s, timers.peer_timeout_s / 4))
            silent_s = trio.current_time() - ch.last_receive_s
            if silent_s > timers.peer_timeout_s:
                raise ProtocolError(f"peer silent for {silent_s:.1f} s (timeout)")

    # --------------------------------------------------------- secondary link

    async def handle_connection(self, stream: trio.abc.Stream, peer_label: str = "peer") -> None:
        """Serve one incoming replication connection (secondary side).

        A newer connection replaces an older one: the old session is stopped
        (its in-progress apply finishes first) before the new handshake starts.
        """
        # Become the current session at once; the previous one (if any) is
        # cancelled and must be fully gone before we touch the core. A newer
        # connection arriving meanwhile cancels us the same way, and our exit
        # waits for our predecessor, so two sessions never overlap.
        scope = trio.CancelScope()
        done = trio.Event()
        prev_scope, prev_done = self._session_scope, self._session_done
        self._session_scope, self._session_done = scope, done
        if prev_scope is not None:
            prev_scope.cancel()
        ch = FrameChannel(stream)
        try:
            with scope:
                if prev_done is not None:
                    await prev_done.wait()
                with trio.fail_after(self.spec.timers.connect_timeout_s):
                    await self._secondary_handshake(ch)
                self.connected_peer = peer_label
                self.last_error = None
                log.info("volume %s: receiving from %s", self.spec.name, peer_label)
                self.events.add("connected", f"receiving from {peer_label}")
                await self._secondary_session(ch)
        except HandshakeRefused as exc:
            self._link_error(f"handshake refused: {exc.reason}")
        except StoreError as exc:
            log.error(
                "volume %s: the store failed while applying replicated writes: %s; "
                "this copy stops receiving (stop the daemon and check the disk)",
                self.spec.name,
                exc,
            )
            self.last_error = f"store failed: {exc}"
            self.events.add("store", f"store failed while applying replicated writes: {exc}")
        except _TRANSPORT_ERRORS as exc:
            self._link_error(_describe(exc))
        finally:
            if prev_done is not None and not prev_done.is_set():
                with trio.CancelScope(shield=True):
                    await prev_done.wait()
            if self.secondary is not None and self._session_scope is scope:
                self.secondary.reset_link()
            if self._session_scope is scope:
                self.connected_peer = None
                self._session_scope = None
            done.set()
            await ch.aclose()

    async def _secondary_handshake(self, ch: FrameChannel) -> None:
        core = self.secondary
        if core is None or self._role != Role.SECONDARY:
            await ch.send(
                Refuse(
                    f"{self.spec.node} is primary for {self.spec.name}; "
                    "two primaries cannot replicate (split brain)"
                )
            )
            raise HandshakeRefused("a peer connected to us, but we are primary")
        remote = await ch.receive()
        if not isinstance(remote, Hello):
            raise ProtocolError(f"expected HELLO, got {type(remote).__name__}")
        local = self._hello()
        reason = check_hello(local, remote)
        if reason is not None:
            await ch.send(Refuse(reason))
            raise HandshakeRefused(reason)
        await ch.send(local)
        answer = await ch.receive()
        if isinstance(answer, Refuse):
            raise HandshakeRefused(f"the primary refused: {answer.reason}")
        if not isinstance(answer, Welcome):
            raise ProtocolError(f"expected WELCOME, got {type(answer).__name__}")
        core.on_welcome(answer)
        if answer.flags & WELCOME_FLAG_RESYNC:
            with trio.CancelScope(shield=True):
                await self._begin_resync_target(remote.node)
        if answer.flags & WELCOME_FLAG_SEND_BITMAP:
            await self._send_own_bitmap(ch)
        if self._replaying:
            if core.applied_seq >= answer.primary_seq:
                # Nothing was written after our durable point: nothing is torn.
                self._replaying = False
            else:
                self._replay_until = answer.primary_seq

    async def _send_own_bitmap(self, ch: FrameChannel) -> None:
        """The regions this copy changed on its own (its persisted bitmap),
        for the primary to roll back; in frames of at most MAX_BITMAP_RUNS."""
        runs = list(self._own_bitmap().runs())
        for i in range(0, max(1, len(runs)), MAX_BITMAP_RUNS):
            chunk = tuple(runs[i : i + MAX_BITMAP_RUNS])
            await ch.send(PeerBitmap(chunk, i + MAX_BITMAP_RUNS >= len(runs)))
        self.events.add(
            "resync",
            f"sent our own {sum(n for _, n in runs)} changed regions to be rolled back",
        )

    async def _begin_resync_target(self, source: str) -> None:
        """We are a resync target: ahead of anything the resync writes, mark
        the lineage inconsistent (so no reconnect can mistake this mix for a
        prefix) and, when this image is consistent now, start (or continue)
        the undo log that keeps it restorable."""
        core = self.secondary
        assert core is not None
        undo = self.undo
        base = self.gens.current.id
        if undo is not None and not self._undo_active:
            if self._replaying or self.gens.inconsistent:
                undo = None  # a torn or mixed image is not worth restoring
            else:
                await self.store.flush()  # the image to restore is the durable one
        if undo is not None:
            await self.store.run_blocking(undo.begin, base)
            if not self._undo_active:
                # The primary's position when the pre-resync image was kept.
                self._undo_base_seq = core.durable_seq
            self._undo_active = True
        self.gens = replace(self.gens, inconsistent=True)
        self.state = replace(self.state, seq=core.durable_seq)
        if self.genfile is not None:
            await trio.to_thread.run_sync(self.genfile.write, self.gens)
        self.state = await trio.to_thread.run_sync(self.meta.write, self.state)
        if self._undo_active:
            self.events.add(
                "resync",
                f"resync target from {source}: the undo log keeps the pre-resync image "
                f"(generation {base:#x}) restorable; this copy stays promotable",
            )
        else:
            log.warning(
                "volume %s: resync target from %s: inconsistent until it completes",
                self.spec.name,
                source,
            )
            self.events.add(
                "resync", f"resync target from {source}: inconsistent until it completes"
            )

    async def _undo_save(self, entries: tuple[WriteEntry, ...]) -> None:
        """Write-ahead for the undo log: the old content of every region this
        batch changes for the first time is durable before the batch lands."""
        undo = self.undo
        if undo is None or not self._undo_active:
            return
        regions: set[int] = set()
        for e in entries:
            if e.kind != WriteKind.DIGEST:
                regions.update(undo.needs_save(e.offset, e.length))
        if not regions:
            return
        try:
            await self.store.run_blocking(undo.save, sorted(regions), self.store.store.read)
        except UndoFull as exc:
            # Past its bound the log cannot restore the image any more: drop
            # it; the copy is inconsistent (it already says so) until the end.
            log.warning(
                "volume %s: %s; this copy is inconsistent until the resync ends",
                self.spec.name,
                exc,
            )
            self.events.add(
                "resync",
                f"undo log full ({exc}): this copy is inconsistent until the resync completes; "
                "raise volume.undo_max_bytes to keep it promotable",
            )
            self._undo_active = False
            await self.store.run_blocking(undo.discard)

    async def _rollback_undo(self) -> int:
        """Restore the pre-resync image of a cut-off resync target."""
        undo = self.undo
        if undo is None or not self._undo_active:
            return 0
        fstore = self.store.store
        restored = await self.store.run_blocking(undo.rollback, fstore.write, fstore.fdatasync)
        self._undo_active = False
        self.undo_rollbacks += 1
        self.gens = replace(self.gens, inconsistent=False)
        if self.genfile is not None:
            await trio.to_thread.run_sync(self.genfile.write, self.gens)
        self.events.add(
            "rollback",
            f"rolled back {restored} regions of the cut-off resync: this copy holds its "
            f"consistent pre-resync image (generation {self.gens.current.id:#x})",
            regions=restored,
        )
        log.warning(
            "volume %s: rolled back %d regions of a cut-off resync", self.spec.name, restored
        )
        return restored

    async def _secondary_session(self, ch: FrameChannel) -> None:
        with _unwrap_link_errors():
            await self._secondary_session_tasks(ch)

    async def _secondary_session_tasks(self, ch: FrameChannel) -> None:
        send_q, recv_q = trio.open_memory_channel[_ApplyItem](_APPLY_QUEUE_BATCHES)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._secondary_applier, ch, recv_q)
            nursery.start_soon(self._keepalive, ch)
            async with send_q:
                await self._secondary_receiver(ch, send_q)
            nursery.cancel_scope.cancel()

    async def _secondary_receiver(
        self, ch: FrameChannel, queue: trio.MemorySendChannel[_ApplyItem]
    ) -> None:
        core = self.secondary
        assert core is not None
        while True:
            msg = await ch.receive()
            if isinstance(msg, Writes):
                # Validates the whole batch before anything is queued, and says
                # in which order to apply it.
                ordered = core.on_writes(msg)
                await queue.send((ordered, msg.entries[-1].seq))
            elif isinstance(msg, (Flush, ResyncDone)):
                await queue.send(msg)
            elif isinstance(msg, Ping):
                await ch.send(Pong(msg.nonce, msg.sent_ns))
            elif isinstance(msg, Pong):
                self.rtt.add(max(0.0, (time.monotonic_ns() - msg.sent_ns) / 1e9))
            elif isinstance(msg, Bye):
                if msg.reason.startswith(DEMOTED_BYE):
                    # Everything before the BYE (a lineage announcement
                    # above all) is applied and synced first: the applier ends
                    # the session when it reaches the BYE.
                    await queue.send(msg)
                    await trio.sleep_forever()
                raise ProtocolError(f"primary said goodbye: {msg.reason}")
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} from the primary")

    async def _secondary_applier(
        self, ch: FrameChannel, queue: trio.MemoryReceiveChannel[_ApplyItem]
    ) -> None:
        core = self.secondary
        assert core is not None
        interval = self.spec.timers.secondary_sync_interval_s
        last_sync = trio.current_time()
        while True:
            item: _ApplyItem | None = None
            with trio.move_on_after(interval):
                try:
                    item = await queue.receive()
                except trio.EndOfChannel:
                    return
            if isinstance(item, tuple):
                ordered, last_seq = item
                # Shielded: applied_seq must match what is in the store.
                with trio.CancelScope(shield=True):
                    await self._undo_save(ordered)
                    if self._fault_out_of_order:
                        await self._fault_apply_unordered(ordered)
                    else:
                        await self._apply_batch(ordered)
                    core.applied(last_seq)
                    if self._replay_until is not None and core.applied_seq >= self._replay_until:
                        self._replaying = False
                        self._replay_until = None
            elif isinstance(item, Flush):
                core.on_flush(item)
            elif isinstance(item, ResyncDone):
                core.on_resync_done(item.upto_seq)
                self._resync_lineage = item.lineage
            elif isinstance(item, Bye):
                # The primary demoted itself after draining us: make what we
                # applied durable (adopting an announced lineage), then end.
                with trio.CancelScope(shield=True):
                    if core.durable_seq < core.applied_seq:
                        await self._secondary_sync()
                    if core.resync_complete():
                        await self._adopt_resynced_lineage()
                # Only a drained demotion lets us take over without loss.
                self._peer_demoted = item.reason.endswith("peer in sync: True")
                self.events.add("peer", f"the primary demoted itself: {item.reason}")
                raise ProtocolError(f"primary said goodbye: {item.reason}")
            now = trio.current_time()
            periodic = core.durable_seq < core.applied_seq and now - last_sync >= interval
            if core.sync_needed() or periodic:
                with trio.CancelScope(shield=True):
                    await self._secondary_sync()
                last_sync = now
            if core.resync_complete():
                with trio.CancelScope(shield=True):
                    await self._adopt_resynced_lineage()
            differs = core.take_differs()
            if differs is not None:
                await ch.send(differs)  # ahead of the ACK that covers them
            await ch.send(core.ack())

    async def _fault_apply_unordered(self, entries: tuple[WriteEntry, ...]) -> None:
        """Test-only (``secondary-out-of-order``): a replicator that does not
        keep write order. Received writes join a buffer, and a random half of
        the buffer is applied now, the rest later (at most
        ``_FAULT_BUFFER_WRITES`` wait): at any moment some later writes have
        landed while earlier ones have not. Never in production."""
        rng = secrets.SystemRandom()
        buf = self._fault_buffer
        buf.extend(entries)
        rng.shuffle(buf)
        keep = min(len(buf) // 2, _FAULT_BUFFER_WRITES)
        now, self._fault_buffer = buf[keep:], buf[:keep]
        for e in now:
            await self._apply_batch((e,))

    async def _apply_batch(self, entries: tuple[WriteEntry, ...]) -> None:
        core = self.secondary
        assert core is not None
        run: list[tuple[int, bytes]] = []
        for e in entries:
            if e.kind == WriteKind.WRITE:
                run.append((e.offset, e.data))
                continue
            if run:
                await self.store.write_many(run)
                run = []
            if e.kind == WriteKind.DIGEST:
                # Compared at exactly this point of the sequence: every earlier
                # write is applied here, as it was on the primary when it read.
                core.digest_differs(e, await self.store.read(e.offset, e.length))
                continue
            await self.store.write_zeroes(e.offset, e.length, e.kind == WriteKind.TRIM)
        if run:
            await self.store.write_many(run)

    async def _adopt_resynced_lineage(self) -> None:
        """The resync is durable here: take the primary's lineage, be consistent."""
        decoded = decode_genstate(self._resync_lineage) if self._resync_lineage else None
        if decoded is None:
            raise ProtocolError("RESYNC_DONE carried no valid lineage")
        if self.undo is not None and self._undo_active:
            # The resync is durable: the pre-resync image is not needed any
            # more (dropped before the lineage changes: a crash in between
            # leaves an inconsistent mark, never a stale undo under new data).
            await self.store.run_blocking(self.undo.discard)
            self._undo_active = False
        self.gens, _ = after_resync(self.gens, decoded[1])
        self.gens = replace(self.gens, primary=False)
        own = self._loaded_bitmap
        if own is not None and own.dirty_regions and self.bitmap_file is not None:
            # Our own changes were rolled back by this resync.
            pages = self.bitmap_file.pages_with_bits
            own.clear()
            await self.store.run_blocking(self.bitmap_file.persist, own.raw_bits(), set(pages))
        if self.genfile is not None:
            await trio.to_thread.run_sync(self.genfile.write, self.gens)
        self.resyncs_completed += 1
        self.events.add(
            "resync", f"resync complete: consistent, generation {self.gens.current.id:#x}"
        )
        log.info(
            "volume %s: resync complete: consistent, generation %#x",
            self.spec.name,
            self.gens.current.id,
        )

    async def _secondary_sync(self) -> None:
        core = self.secondary
        assert core is not None
        seq = core.applied_seq
        await self.store.flush()
        # Persist before acknowledging: the primary trims its log on this number.
        self.state = await trio.to_thread.run_sync(self.meta.write, replace(self.state, seq=seq))
        core.synced(seq)

    # ---------------------------------------------------------------- control

    def attach_link(
        self, nursery: trio.Nursery, connect: Connector | None, peer_label: str = "peer"
    ) -> None:
        """Give the volume what it needs to dial its peer whenever it is primary
        (now or after a promotion); starts the dial task if it is primary."""
        self._link_nursery = nursery
        self._link_connect = connect
        self._link_label = peer_label
        if self._role == Role.PRIMARY:
            self._start_link()

    def _start_link(self) -> None:
        if self._link_nursery is None or self._link_connect is None:
            return
        scope = trio.CancelScope()
        self._link_scope = scope
        connect, label = self._link_connect, self._link_label

        async def run() -> None:
            with scope:
                await self.run_primary_link(connect, label)

        self._link_nursery.start_soon(run)

    async def demote(self, drain_timeout_s: float | None = None) -> dict[str, Any]:
        """Primary -> secondary at run time (the first half of a switchover).

        New writes are refused, writes in flight finish, the peer is drained
        (until it has applied and synced everything, at most ``drain_timeout_s``),
        it is told with a BYE that we demoted, and this copy continues as a
        secondary. Raises NotPrimaryError if it is not primary.
        """
        async with self._role_lock:
            core = self.primary
            if core is None or self._role != Role.PRIMARY:
                raise NotPrimaryError(f"{self.spec.node} is not primary for {self.spec.name}")
            timeout = (
                self.spec.timers.drain_timeout_s if drain_timeout_s is None else (drain_timeout_s)
            )
            self._demoting = True
            self._notify()
            drained = False
            with trio.move_on_after(timeout):
                while self.in_flight_writes:
                    await self._wait_changed(0.05)
                upto = core.request_peer_flush()
                self._notify()
                while (
                    core.connected
                    and not core.outdated
                    and (core.lag_writes or core.peer_durable < upto)
                ):
                    await self._wait_changed(0.05)
                drained = core.connected and not core.outdated and not core.lag_writes
            ch = self._primary_channel
            if ch is not None:
                with contextlib.suppress(*_TRANSPORT_ERRORS):
                    await ch.send(Bye(f"{DEMOTED_BYE}; peer in sync: {drained}"))
            if self._link_scope is not None:
                self._link_scope.cancel()
                self._link_scope = None
            if not drained and core.lag_writes:
                core.peer_lost()
                self._diverge_if_peer_lacks_writes()
                self._note_bitmap_changes()
                await self._flush_bitmap()
            await self.store.flush()
            last = core.last_seq
            self.secondary = SecondaryCore(
                self.spec.size_bytes,
                self.spec.block_size,
                durable_seq=last,
                fault_apply_out_of_order="secondary-out-of-order" in self.spec.faults,
            )
            self.primary = None
            self._role = Role.SECONDARY
            self._demoting = False
            self.gens = replace(self.gens, primary=False)
            await self._persist_role(last)
            self.events.add("role", f"demoted to secondary (peer drained: {drained})")
            log.warning(
                "volume %s: demoted to secondary (peer drained: %s)", self.spec.name, drained
            )
            self._notify()
            return {"role": "secondary", "peer_drained": drained, "last_seq": last}

    async def promote(self, *, force: bool = False) -> dict[str, Any]:
        """Secondary -> primary at run time.

        Without ``force``: only after the old primary announced its demotion
        (switchover) and while this copy is consistent; the generation stays, so
        the old primary rejoins as secondary without a resync. With ``force``
        (the old primary is gone): a new generation; in async mode writes the
        old primary acknowledged but never shipped are lost, and the answer says
        what is known about them. Raises GeoclusError when not allowed.
        """
        async with self._role_lock:
            sec = self.secondary
            if sec is None or self._role != Role.SECONDARY:
                raise GeoclusError(f"{self.spec.node} is already primary for {self.spec.name}")
            inconsistent = self.consistency == "inconsistent"
            if inconsistent and not force:
                raise GeoclusError(
                    "this copy is inconsistent (a resync or replay is unfinished): promoting "
                    "it would serve a mix of old and new data; use --force only to salvage"
                )
            if not force and not self._peer_demoted:
                raise GeoclusError(
                    "the primary has not demoted itself; if it is really gone, use "
                    "`geoclus volume promote --force` (writes it acknowledged that never "
                    "arrived here are lost)"
                )
            if self._session_scope is not None and self._session_done is not None:
                self._session_scope.cancel()
                await self._session_done.wait()
            rolled_back = await self._rollback_undo()
            applied = sec.applied_seq
            if self.al_file is not None and self.al is not None:
                # Sequence numbers start over from this copy's position.
                self.al = ActivityLog(
                    self.spec.size_bytes,
                    self.spec.al_extent_bytes,
                    self.spec.al_extents,
                    hot=self.al.hot_extents(),
                    generation=self.al_file.counter,
                )
            known_primary = sec.primary_seq
            await self.store.flush()
            self.primary = PrimaryCore(
                self.spec.policy,
                self.spec.size_bytes,
                last_seq=applied,
                bitmaps={"peer": self._own_bitmap()},
            )
            self.secondary = None
            self._role = Role.PRIMARY
            self.gens = on_promote(
                replace(self.gens, inconsistent=False),
                _new_generation(),
                time.time_ns(),
                connected_in_sync=not force,
                forced=force,
            )
            self._gens_pending = True
            await self._persist_role(applied)
            self._peer_demoted = False
            # Rolled back to the pre-resync image: everything the primary
            # sequenced since the resync began is missing (and the regions the
            # resync was bringing: older writes, not counted).
            since = self._undo_base_seq if rolled_back else applied
            missing: int | None = None if since is None else max(0, known_primary - since)
            what = "forced promotion" if force else "promoted after the primary demoted"
            if rolled_back:
                what += " (rolled back to the pre-resync image: at least these writes missing)"
            report = {
                "role": "primary",
                "forced": force,
                "applied_seq": applied,
                "generation": f"{self.gens.current.id:#x}",
                "known_missing_writes": missing if force else 0,
                "was_inconsistent": inconsistent,
                "rolled_back_regions": rolled_back,
            }
            count = "an unknown number of" if missing is None else str(missing)
            self.events.add(
                "role", f"{what}; {count} writes known to be missing" if force else what, **report
            )
            log.warning(
                "volume %s: %s (applied %d, %s writes known missing)",
                self.spec.name,
                what,
                applied,
                count if force else "0",
            )
            self._start_link()
            self._notify()
            return report

    def _own_bitmap(self) -> DirtyBitmap:
        """This copy's bitmap of its own changes (from the bitmap file)."""
        if self.bitmap_file is not None and self._loaded_bitmap is not None:
            return self._loaded_bitmap
        return DirtyBitmap(self.spec.size_bytes, self.spec.policy.region_bytes)

    async def _persist_role(self, seq: int) -> None:
        role_code = ROLE_PRIMARY if self._role == Role.PRIMARY else ROLE_SECONDARY
        self.state = replace(self.state, role=role_code, seq=seq, generation=self.gens.current.id)
        with trio.CancelScope(shield=True):
            self.state = await self.store.run_blocking(self.meta.write, self.state)
            if self.genfile is not None:
                await self.store.run_blocking(self.genfile.write, self.gens)
            self._gens_pending = False

    async def resolve(self, *, discard_local: bool) -> GenState:
        """Operator decision for a split brain: mark (or unmark) this copy to be
        rolled back to its peer at the next connect. Persisted before it returns.

        Raises NotPrimaryError for a primary: its data is never rolled back
        under its users; demote it first (restart it as secondary).
        """
        if discard_local and self._role == Role.PRIMARY:
            raise NotPrimaryError(
                f"{self.spec.node} is primary for {self.spec.name}: demote it (restart it "
                'with role = "secondary") before discarding its data'
            )
        self.gens = (
            on_resolve_discard(self.gens) if discard_local else replace(self.gens, discard=False)
        )
        self.events.add(
            "resolve",
            "operator: this copy's own changes will be discarded at the next connect"
            if discard_local
            else "operator: this copy keeps its data",
        )
        if self.genfile is not None:
            await self.store.run_blocking(self.genfile.write, self.gens)
        log.warning(
            "volume %s: operator %s this copy's own changes",
            self.spec.name,
            "chose to DISCARD" if discard_local else "chose to KEEP",
        )
        return self.gens

    def allow_degraded(self, by: str = "operator") -> int:
        """Override (sync, suspend): complete writes without the peer, until
        the peer is back in sync or :meth:`revoke_degraded`. ``by`` names who
        decided (the operator, or the witness's grant).

        Returns how many blocked writes were released.
        """
        if self.primary is None:
            raise NotPrimaryError("allow-degraded applies to the primary only")
        released = self.primary.allow_degraded()
        self.events.add(
            "degraded",
            f"{by} allowed degraded running ({len(released)} blocked writes released)",
        )
        self._complete(released)
        self._notify()
        log.warning(
            "volume %s: %s allowed degraded running (%d writes released)",
            self.spec.name,
            by,
            len(released),
        )
        return len(released)

    def revoke_degraded(self, why: str) -> None:
        """End degraded running: writes wait for the peer again (fail closed)."""
        if self.primary is None or not self.primary.degraded_allowed:
            return
        self.primary.revoke_degraded()
        self.events.add("degraded", f"degraded running ended: {why}")
        self._notify()
        log.warning("volume %s: degraded running ended: %s", self.spec.name, why)

    def start_verify(self, *, resync: bool = False) -> dict[str, Any]:
        """Begin an online verify of the peer (primary only): every region's
        digest is compared by the peer at the same point of the write
        sequence, so writes in flight never cause false mismatches. With
        ``resync`` the regions that differ are copied as they are found.
        Returns the verify status; raises NotPrimaryError on a secondary and
        GeoclusError if the peer is not replicating normally."""
        core = self.primary
        if core is None or self._role != Role.PRIMARY:
            raise NotPrimaryError(
                f"volume {self.spec.name} is secondary on this site: run verify on the primary"
            )
        try:
            core.start_verify(trio.current_time(), resync=resync)
        except ValueError as exc:
            raise GeoclusError(f"cannot verify {self.spec.name}: {exc}") from None
        self.events.add(
            "verify",
            f"online verify of {self.connected_peer or 'the peer'} starts"
            + (" (regions that differ will be resynced)" if resync else ""),
        )
        self._notify()
        return self.verify_status()

    def verify_status(self) -> dict[str, Any]:
        """The last (or running) verify, JSON-ready; ``state`` is ``none``,
        ``running``, ``done`` or ``aborted``."""
        core = self.primary
        v = core.peer.verify if core is not None else None
        if v is None:
            return {"state": "none"}
        region_bytes = self.spec.policy.region_bytes
        state = "running" if v.running else ("aborted" if v.aborted else "done")
        now = trio.current_time()
        elapsed = max(1e-6, (v.finished_s or now) - v.started_s)
        rate = v.done_bytes / elapsed
        return {
            "state": state,
            "resync": v.resync,
            "done_bytes": v.done_bytes,
            "total_bytes": v.total_bytes,
            "rate_bytes_per_s": rate,
            "eta_s": (v.total_bytes - v.done_bytes) / rate if state == "running" and rate else None,
            "differ_regions": len(v.differ),
            "differ_bytes": len(v.differ) * region_bytes,
            "differ_offsets": [r * region_bytes for r in v.differ[:64]],
            "resynced_regions": v.copied,
            "aborted": v.aborted,
        }

    def _report_verify(self) -> None:
        core = self.primary
        if core is None or not core.take_verify_finished():
            return
        st = self.verify_status()
        if st["state"] == "aborted":
            text = f"verify aborted after {st['done_bytes']} bytes: {st['aborted']}; run it again"
        elif st["differ_regions"] == 0:
            text = f"verify done: all {st['total_bytes']} bytes identical on both sides"
        else:
            text = (
                f"verify done: {st['differ_regions']} regions ({st['differ_bytes']} bytes) "
                "differ"
                + (
                    f", {st['resynced_regions']} resynced"
                    if st["resync"]
                    else "; run `geoclus volume verify --resync` to repair them"
                )
            )
        log.warning("volume %s: %s", self.spec.name, text)
        self.events.add("verify", text, differ_regions=st["differ_regions"])

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has finished."""
        return self._closed

    @property
    def consistency(self) -> str:
        """``consistent`` or ``inconsistent`` (a secondary replaying after a
        crash). Whether a peer is outdated is the primary's knowledge and shows
        in its status as ``peer_outdated``."""
        if self._undo_active:
            # Mid-resync, but the undo log restores the consistent pre-resync
            # image (a promotion does so): older, not broken.
            return "outdated"
        if self._replaying or self.gens.inconsistent:
            return "inconsistent"
        return "consistent"

    def _resync_rate(self, now: float) -> dict[str, float | None]:
        """Copy rate (bytes/s, since the resync started) and time to go (s)."""
        core = self.primary
        if core is None or not core.peer.resyncing or self._resync_started_s is None:
            return {"resync_rate_bytes_per_s": None, "resync_eta_s": None}
        elapsed = max(1e-6, now - self._resync_started_s)
        done = core.peer.resync_done_bytes
        rate = done / elapsed
        left = core.peer.resync_total_bytes - done
        return {
            "resync_rate_bytes_per_s": rate,
            "resync_eta_s": (left / rate) if rate > 0 else None,
        }

    def status(self) -> dict[str, Any]:
        """Everything ``geoclus volume status`` shows, JSON-ready."""
        now = trio.current_time()
        p50 = self.write_latency.percentile(50)
        p99 = self.write_latency.percentile(99)
        rtt = self.rtt.percentile(50)
        out: dict[str, Any] = {
            "volume": self.spec.name,
            "node": self.spec.node,
            "role": self._role.name.lower(),
            "mode": self.spec.policy.mode.name.lower(),
            "connected": self.connected_peer is not None,
            "peer": self.connected_peer,
            "generation": f"{self.state.generation:#018x}",
            "consistency": self.consistency,
            "last_error": self.last_error,
            "size_bytes": self.spec.size_bytes,
            "rtt_p50_ms": None if rtt is None else rtt * 1e3,
            "store": self.store.statistics(),
            "lineage": {
                "current": f"{self.gens.current.id:#x}",
                "cause": self.gens.current.cause.value,
                "history": [f"{g.id:#x}" for g in self.gens.history],
                "bitmap_base": None
                if self.gens.bitmap_base is None
                else f"{self.gens.bitmap_base:#x}",
                "inconsistent": self.gens.inconsistent,
                "discard": self.gens.discard,
            },
            "last_decision": None
            if self.last_decision is None
            else {
                "action": self.last_decision.action.value,
                "reason": self.last_decision.reason,
                "full": self.last_decision.full,
            },
            "resyncs_completed": self.resyncs_completed,
        }
        core = self.primary
        if core is not None:
            out.update(
                in_flight_writes=self.in_flight_writes,
                last_seq=core.last_seq,
                peer_applied_seq=core.peer_applied,
                peer_durable_seq=core.peer_durable,
                lag_bytes=core.lag_bytes,
                lag_writes=core.lag_writes,
                lag_seconds=core.lag_seconds(now),
                max_lag_bytes_seen=core.stats.max_lag_bytes_seen,
                dirty_bytes=core.bitmap.dirty_bytes,
                peer_outdated=core.outdated,
                suspended=core.suspended,
                degraded_allowed=core.degraded_allowed,
                retained_log_bytes=core.log_bytes,
                in_flight_bytes=core.in_flight_bytes,
                writes=core.stats.writes,
                bytes_written=core.stats.bytes_written,
                write_latency_p50_ms=None if p50 is None else p50 * 1e3,
                write_latency_p99_ms=None if p99 is None else p99 * 1e3,
                resync_active=core.peer.resyncing,
                resync_full=core.peer.resync_full if core.peer.resyncing else None,
                resync_done_bytes=core.peer.resync_done_bytes if core.peer.resyncing else 0,
                resync_total_bytes=core.peer.resync_total_bytes if core.peer.resyncing else 0,
                resync_identical_bytes=core.peer.resync_identical_bytes,
                resync_copied_bytes=core.peer.resync_copied_bytes,
                verify=self.verify_status(),
                resync_rate_control=dataclasses.asdict(self.rate.statistics()),
                **self._resync_rate(now),
            )
        else:
            sec = self.secondary
            assert sec is not None
            out.update(
                in_flight_writes=0,
                applied_seq=sec.applied_seq,
                durable_seq=sec.durable_seq,
                primary_seq_at_connect=sec.primary_seq,
                lag_bytes=0,
                lag_writes=max(0, sec.primary_seq - sec.applied_seq),
                lag_seconds=0.0,
                dirty_bytes=0,
                write_latency_p50_ms=None,
                write_latency_p99_ms=None,
                resync_target=sec.resync_target,
            )
        return out

    async def close(self, *, drain: bool = True) -> None:
        """Stop: refuse new writes, let writes in flight finish, drain the peer
        (bounded by ``drain_timeout_s``), sync the store and record a clean
        shutdown in the metadata."""
        if self._closed:
            return
        self._closing = True
        self._notify()
        core = self.primary
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.spec.timers.drain_timeout_s):
                while self.in_flight_writes:
                    await self._wait_changed(0.05)
                if drain and core is not None:
                    # Until the peer has every write durably: a restarted
                    # primary has no log to replay from.
                    upto = core.request_peer_flush()
                    self._notify()
                    while core.connected and not core.outdated and core.peer_durable < upto:
                        await self._wait_changed(0.05)
            try:
                await self.store.flush()
            except StoreError as exc:
                log.error("volume %s: final sync failed: %s", self.spec.name, exc)
                self.store.close()
                self.meta.close()
                if self.bitmap_file is not None:
                    self.bitmap_file.close()
                self._closed = True
                return
            if core is not None:
                new = replace(
                    self.state,
                    clean=True,
                    seq=core.last_seq,
                    outdated=core.outdated or core.peer_durable < core.last_seq,
                )
            else:
                assert self.secondary is not None
                new = replace(self.state, clean=not self._replaying, seq=self.secondary.applied_seq)
            if core is not None:
                # Writes the peer may not hold durably go to the persisted
                # bitmap: the retained log does not survive this stop.
                core.mark_undurable()
            self._note_bitmap_changes()
            await self._flush_bitmap()
            if (
                core is not None
                and self.al_file is not None
                and core.peer_durable >= core.last_seq
                and not core.outdated
            ):
                # Every write is durable on both sides: nothing is hot.
                await self.store.run_blocking(self.al_file.clear)
            self.state = await trio.to_thread.run_sync(self.meta.write, new)
            self.store.close()
            self.meta.close()
            if self.bitmap_file is not None:
                self.bitmap_file.close()
            if self.genfile is not None:
                self.genfile.close()
            if self.al_file is not None:
                self.al_file.close()
            if self.undo is not None:
                self.undo.close()
            self._closed = True


# Failures of the connection itself: the session ends and the link retries.
_TRANSPORT_ERRORS = (
    ProtocolError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)
# Failures that end a session (as opposed to bugs): the connection, or the
# store under the secondary's applier.
_LINK_ERRORS = (*_TRANSPORT_ERRORS, StoreError)


@contextlib.contextmanager
def _unwrap_link_errors() -> Iterator[None]:
    """Turn a nursery's group of link failures into its first link failure.

    Cancellation and any other exception (a bug) propagate untouched.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        cancelled, rest = group.split(trio.Cancelled)
        link, other = rest.split(_LINK_ERRORS) if rest is not None else (None, None)
        if other is not None:
            raise  # a bug: propagate everything
        if cancelled is not None:
            # Being cancelled anyway: a link failure at the same moment is moot,
            # and must not escape the cancel scope that owns the Cancelled.
            raise cancelled from None
        if link is None:
            raise
        store, _ = link.split(StoreError)
        first: BaseException = store if store is not None else link
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _new_generation() -> int:
    return secrets.randbits(63) | 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return exc.reason
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}"
    return str(exc) or type(exc).__name__


__all__ = ["Connector", "FrameChannel", "LinkTimers", "ReplicatedVolume", "VolumeSpec"]
