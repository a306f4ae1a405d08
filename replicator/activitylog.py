"""The primary's activity log: the extents that may hold writes the peer lacks.

Like DRBD's activity log. Before the primary writes into an extent (default
4 MiB) that is not *hot*, it durably records the new hot set; after a crash of
the primary only the hot extents need resync, not the whole volume. The hot set
is bounded (default 1,024 extents: 4 GiB to resync at most), and an extent stays
hot until its place is needed, so a working set that fits costs no I/O at all.

Two layers:

* :class:`ActivityLog` decides, in memory: no I/O, no clock.
* :class:`ActivityLogFile` is the crash-safe file: blocking, so the caller runs
  it in a worker thread.

Safety rule (kept by the caller): a write is applied locally only after a hot set
holding all its extents is durable, and an extent leaves the hot set only when
every write into it is *stable*: durable locally and on the peer, or covered
otherwise (its regions durably marked in the dirty bitmap). So after a crash of
the primary, every extent where the copies may differ through a write that is
not stable is in the stored hot set.

The caller's loop, one write at a time through the log in sequence order (a
write that is blocked holds the ones after it back; this is what makes
``need_stable_seq`` always lower than the blocked write's own seq, so waiting
for it cannot deadlock)::

    result = log.touch(offset, length, seq)
    while isinstance(result, AlBlocked):
        stable = await make_stable(result.need_stable_seq)  # flush + peer acks
        log.set_stable(stable)  # stable >= need_stable_seq
        result = log.touch(offset, length, seq)
    if result is not None:
        await trio.to_thread.run_sync(log_file.persist, result.hot, result.generation)
    # only now may the write reach the local store

After a restart, :meth:`ActivityLogFile.open` returns the stored hot set. The
caller marks its regions (:meth:`ActivityLog.regions_of_hot`) durably in the
dirty bitmap, then builds ``ActivityLog(..., hot=stored,
generation=log_file.counter)``; the loaded extents count as stable from then on.

Layout (big-endian). The file holds two slots of ``40 + 8 * max_extents`` bytes
each (8,232 bytes at the default 1,024 extents; the file is then 16,464 bytes),
slot 0 at offset 0 and slot 1 right after it. A slot is: magic ``"GCAL"`` (u32),
version 1 (u16), log2 of the extent size in bytes (u16), volume size in bytes
(u64), ``max_extents`` (u32), count of hot extents (u32), counter (u64), then
``max_extents`` extent numbers (u64 each: the ``count`` hot ones ascending, the
rest zero), then the xxh3-64 of all the slot's preceding bytes (u64). Extent
``e`` covers volume bytes ``[e * extent_bytes, (e + 1) * extent_bytes)``. An
update writes the whole hot set into the slot not holding the newest valid
copy, with a higher counter, then ``fdatasync``s. Reading takes the valid slot
(magic, version, checksum) with the highest counter, so a write torn at any byte
leaves the previous or the next hot set. The first write goes to slot 0: no
valid slot with slot 1 never written (all zero) is an empty log whose first
write was torn. A file written with another extent size, volume size or
``max_extents`` is refused unless its newest hot set is empty.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Set
from dataclasses import dataclass

import xxhash

from geoclus.errors import StoreError

DEFAULT_EXTENT_BYTES = 4 * 1024 * 1024  # DRBD's extent size: 1,024 of them bound a resync at 4 GiB
DEFAULT_MAX_EXTENTS = 1024
EXTENT_BYTES_MIN = 4096  # the largest block size we export; smaller extents only cost persists
# Below 16 hot extents a handful of concurrent writers evict each other and
# nearly every write costs a synchronous persist.
MAX_EXTENTS_MIN = 16
# Each change writes a whole slot: 65,536 extents are 512 KiB per persist, which
# is where a bigger log stops being cheaper than a resync of what it saves.
MAX_EXTENTS_MAX = 65536
# The longest operation one touch may cover: geoclus.daemon.MAX_WRITE_BYTES (the
# NBD payload limit). Longer trims and write-zeroes are split by the caller.
DEFAULT_MAX_WRITE_BYTES = 16 * 1024 * 1024

AL_MAGIC = 0x4743414C  # "GCAL"
AL_VERSION = 1
_HEADER = struct.Struct(">IHHQIIQ")
# magic, version, extent shift, volume size, max_extents, count, counter
_EXTENT = struct.Struct(">Q")
_CHECKSUM = struct.Struct(">Q")
_MAGIC_BYTES = struct.pack(">I", AL_MAGIC)


def slot_bytes(max_extents: int) -> int:
    """The size of one slot of the file, in bytes (40 + 8 per extent)."""
    return _HEADER.size + _EXTENT.size * max_extents + _CHECKSUM.size


# open() reads at most this much: enough for two slots of the largest geometry,
# so a file written with another max_extents is still recognised and named.
_READ_BYTES_MAX = 2 * slot_bytes(MAX_EXTENTS_MAX)


def _check_geometry(size_bytes: int, extent_bytes: int, max_extents: int) -> None:
    if size_bytes <= 0:
        raise ValueError(f"volume size {size_bytes} must be positive")
    if extent_bytes < EXTENT_BYTES_MIN or extent_bytes & (extent_bytes - 1):
        raise ValueError(
            f"activity log extent size {extent_bytes} must be a power of two of at least "
            f"{EXTENT_BYTES_MIN} bytes"
        )
    if not MAX_EXTENTS_MIN <= max_extents <= MAX_EXTENTS_MAX:
        raise ValueError(
            f"activity log max_extents {max_extents} must be between {MAX_EXTENTS_MIN} "
            f"and {MAX_EXTENTS_MAX}"
        )


def _extent_count(size_bytes: int, extent_bytes: int) -> int:
    return (size_bytes + extent_bytes - 1) // extent_bytes


@dataclass(frozen=True)
class AlChange:
    """A new hot set that must be durable before the touching write is applied.

    ``hot``: the whole new hot set (extent numbers). ``added``: the extents that
    became hot; ``evicted``: those that left (every write into them is stable).
    ``generation``: the log's generation after the change, strictly increasing;
    pass it to :meth:`ActivityLogFile.persist` as the counter.
    """

    hot: frozenset[int]
    added: tuple[int, ...]
    evicted: tuple[int, ...]
    generation: int

    def __post_init__(self) -> None:
        if not self.added:
            raise ValueError("an activity log change adds at least one extent")
        if not set(self.added) <= self.hot:
            raise ValueError("added extents must be in the hot set")
        if self.hot.intersection(self.evicted):
            raise ValueError("evicted extents cannot be in the hot set")
        if self.generation < 1:
            raise ValueError(f"generation {self.generation} must be at least 1")


@dataclass(frozen=True)
class AlBlocked:
    """The write ``seq`` needs a cold extent and no hot extent may leave yet.

    Make every write up to ``need_stable_seq`` stable, call
    :meth:`ActivityLog.set_stable`, then touch again. Nothing changed.
    ``need_stable_seq`` is always lower than ``seq`` (writes touch in order), so
    it names only writes that are already past the log.
    """

    need_stable_seq: int
    seq: int

    def __post_init__(self) -> None:
        if not 0 <= self.need_stable_seq < self.seq:
            raise ValueError(
                f"need_stable_seq {self.need_stable_seq} must be below the blocked seq {self.seq}"
            )


@dataclass(frozen=True)
class AlStats:
    """Counters since construction: ``touches`` (calls of touch), ``persists``
    (changes returned), ``evictions`` (extents that left), ``blocked`` (touches
    that returned :class:`AlBlocked`)."""

    touches: int
    persists: int
    evictions: int
    blocked: int


class ActivityLog:
    """The hot set of a primary's volume, in memory (no I/O, no clock).

    ``size_bytes``: the volume size. ``extent_bytes``: a power of two of at least
    4096. ``max_extents``: the bound on the hot set, 16 to 65,536.
    ``hot``: extents hot from the start (what :meth:`ActivityLogFile.open`
    returned); they count as written at seq 0, stable from the start, so the
    caller must have covered them (their regions durably in the dirty bitmap)
    before any touch evicts them. ``stable_seq``: the initial stable watermark.
    ``generation``: the generation to continue from (the file's counter).
    ``max_write_bytes``: the longest operation one touch may cover; a write that
    long must fit in the log with room to spare, so raises ValueError unless
    ``(max_write_bytes - 1) // extent_bytes + 2 <= max_extents``.
    ``fault_evict_unstable``: test only, evicts the least recently used extent
    even when it holds unstable writes (breaks the safety rule on purpose, to
    show the property tests catch it).

    Raises ValueError for an invalid geometry or ``hot`` set.
    """

    def __init__(
        self,
        size_bytes: int,
        extent_bytes: int = DEFAULT_EXTENT_BYTES,
        max_extents: int = DEFAULT_MAX_EXTENTS,
        hot: Iterable[int] = (),
        *,
        stable_seq: int = 0,
        generation: int = 0,
        max_write_bytes: int = DEFAULT_MAX_WRITE_BYTES,
        fault_evict_unstable: bool = False,
    ) -> None:
        _check_geometry(size_bytes, extent_bytes, max_extents)
        if max_write_bytes < 1:
            raise ValueError(f"max_write_bytes {max_write_bytes} must be positive")
        span_max = (max_write_bytes - 1) // extent_bytes + 2
        if span_max > max_extents:
            raise ValueError(
                f"a {max_write_bytes}-byte write can span {span_max} extents of "
                f"{extent_bytes} bytes, more than max_extents {max_extents}; raise "
                "max_extents or the extent size"
            )
        if stable_seq < 0 or generation < 0:
            raise ValueError("stable_seq and generation must not be negative")
        self.size_bytes = size_bytes
        self.extent_bytes = extent_bytes
        self.max_extents = max_extents
        self.max_write_bytes = max_write_bytes
        self.extents = _extent_count(size_bytes, extent_bytes)
        self._shift = extent_bytes.bit_length() - 1
        self._fault_evict_unstable = fault_evict_unstable
        loaded = sorted(set(hot))
        if len(loaded) > max_extents:
            raise ValueError(f"{len(loaded)} hot extents, more than max_extents {max_extents}")
        if loaded and not (loaded[0] >= 0 and loaded[-1] < self.extents):
            raise ValueError(f"hot extents must be in 0..{self.extents - 1}")
        # extent -> seq of its last write, least recently used first. Seqs only
        # grow along this order (touches come in seq order, loaded extents are 0),
        # so the evictable extents are always a prefix of it.
        self._hot: OrderedDict[int, int] = OrderedDict((e, 0) for e in loaded)
        self._stable_seq = stable_seq
        self._last_seq = stable_seq  # the last seq that touched successfully
        self._generation = generation
        self._touches = 0
        self._persists = 0
        self._evictions = 0
        self._blocked = 0

    @property
    def generation(self) -> int:
        """Increases by one on every change returned by :meth:`touch`."""
        return self._generation

    @property
    def stable_seq(self) -> int:
        """Every write up to this seq is stable (the caller said so)."""
        return self._stable_seq

    @property
    def stats(self) -> AlStats:
        """A snapshot of the counters."""
        return AlStats(self._touches, self._persists, self._evictions, self._blocked)

    def hot_extents(self) -> frozenset[int]:
        """The current hot set (extent numbers)."""
        return frozenset(self._hot)

    def extents_of(self, offset: int, length: int) -> range:
        """The extents that ``[offset, offset + length)`` touches (length >= 1)."""
        return range(offset >> self._shift, ((offset + length - 1) >> self._shift) + 1)

    def regions_of_hot(self, region_bytes: int) -> list[int]:
        """The dirty-bitmap regions of ``region_bytes`` (a power of two) that the
        hot extents cover, ascending: the ones to mark after a crash."""
        if region_bytes <= 0 or region_bytes & (region_bytes - 1):
            raise ValueError(f"region size {region_bytes} must be a power of two")
        regions: set[int] = set()
        for e in self._hot:
            start = e * self.extent_bytes
            end = min(start + self.extent_bytes, self.size_bytes)
            regions.update(range(start // region_bytes, (end - 1) // region_bytes + 1))
        return sorted(regions)

    def set_stable(self, seq: int) -> None:
        """Every write up to ``seq`` is now stable: durable locally and on the
        peer, or covered otherwise. Extents whose last write is at most ``seq``
        may leave the hot set. ``seq`` may pass the last write that touched
        (sequence numbers of operations that write nothing locally); later
        touches must then use higher seqs. Raises ValueError if ``seq`` is lower
        than the current watermark."""
        if seq < self._stable_seq:
            raise ValueError(f"stable seq {seq} is below the current {self._stable_seq}")
        self._stable_seq = seq

    def touch(self, offset: int, length: int, seq: int) -> AlChange | AlBlocked | None:
        """A write with sequence number ``seq`` covers ``[offset, offset + length)``.

        Returns None if all its extents are hot (the write may go ahead), an
        :class:`AlChange` to persist before the write is applied (the extents
        are now hot, last written by ``seq``), or :class:`AlBlocked` when least
        recently used extents must leave to make room and not enough of them
        are stable (nothing changed; make writes stable and touch again).

        Raises ValueError if the range is empty, outside the volume or longer
        than ``max_write_bytes``, or if ``seq`` is not above every seq that
        touched before (and above the stable watermark).
        """
        if offset < 0 or length < 1 or offset + length > self.size_bytes:
            raise ValueError(
                f"write [{offset}, {offset + length}) is not inside the "
                f"{self.size_bytes}-byte volume"
            )
        if length > self.max_write_bytes:
            raise ValueError(
                f"write of {length} bytes is longer than max_write_bytes "
                f"{self.max_write_bytes}; split it"
            )
        if seq <= self._last_seq:
            raise ValueError(
                f"seq {seq} touches after seq {self._last_seq}: touches must come in seq order"
            )
        if seq <= self._stable_seq:
            raise ValueError(f"seq {seq} touches but is already stable ({self._stable_seq})")
        self._touches += 1
        needed = self.extents_of(offset, length)
        cold = [e for e in needed if e not in self._hot]
        victims: list[int] = []
        excess = len(self._hot) + len(cold) - self.max_extents
        if cold and excess > 0:
            # Least recently used first, skipping this write's own extents. The
            # seqs grow along the order, so the last victim's seq is the lowest
            # stable watermark that frees `excess` extents.
            need = 0
            for e, last in self._hot.items():
                if e in needed:
                    continue
                victims.append(e)
                need = max(need, last)
                if len(victims) == excess:
                    break
            assert len(victims) == excess  # needed fits: max_extents >= span_max
            if need > self._stable_seq and not self._fault_evict_unstable:
                self._blocked += 1
                return AlBlocked(need, seq)
        self._last_seq = seq
        for e in victims:
            del self._hot[e]
        for e in needed:
            self._hot[e] = seq
            self._hot.move_to_end(e)
        if not cold:
            return None
        self._generation += 1
        self._persists += 1
        self._evictions += len(victims)
        return AlChange(
            hot=frozenset(self._hot),
            added=tuple(cold),
            evicted=tuple(victims),
            generation=self._generation,
        )


@dataclass(frozen=True)
class _Slot:
    index: int
    counter: int
    extent_shift: int
    size_bytes: int
    max_extents: int
    extents: tuple[int, ...]


class ActivityLogFile:
    """The on-disk hot set of one primary volume. Blocking: call from a worker thread.

    Two slots of :func:`slot_bytes` ``(max_extents)`` bytes; see the module
    docstring for the layout. ``open`` returns the stored hot set; ``persist``
    makes a new one durable. Raises StoreError for I/O errors, a damaged or
    foreign file, or a file of another geometry holding hot extents.
    """

    def __init__(
        self,
        path: str,
        size_bytes: int,
        extent_bytes: int = DEFAULT_EXTENT_BYTES,
        max_extents: int = DEFAULT_MAX_EXTENTS,
    ) -> None:
        _check_geometry(size_bytes, extent_bytes, max_extents)
        self.path = path
        self.size_bytes = size_bytes
        self.extent_bytes = extent_bytes
        self.max_extents = max_extents
        self.extents = _extent_count(size_bytes, extent_bytes)
        self.slot_bytes = slot_bytes(max_extents)
        self.writes = 0
        self._shift = extent_bytes.bit_length() - 1
        self._counter = 0
        self._newest_slot = 1  # so the first write goes to slot 0
        self._fd: int | None = None

    @property
    def counter(self) -> int:
        """The counter of the newest stored hot set (0 for a new file)."""
        return self._counter

    def open(self) -> frozenset[int]:
        """Open (creating if missing) and return the stored hot set, empty for a
        new file, one whose first write was torn, or one of another geometry
        whose newest hot set is empty (that file is emptied here).

        Raises StoreError if no slot is valid but the file was written (damage
        beyond a torn write, or not an activity log), or if the file holds hot
        extents for another extent size, volume size or max_extents.
        """
        if self._fd is not None:
            raise StoreError(f"activity log file {self.path} is already open")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            raw = os.pread(self._fd, _READ_BYTES_MAX, 0)
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot open activity log file {self.path}: {exc.strerror}") from exc
        try:
            return self._load(raw)
        except BaseException:
            self.close()
            raise

    def _load(self, raw: bytes) -> frozenset[int]:
        offsets = {0, self.slot_bytes}
        if len(raw) >= _HEADER.size:
            # Slot 1 of a file written with another max_extents starts elsewhere.
            magic, _v, _s, _z, other_max, _n, _c = _HEADER.unpack_from(raw, 0)
            if magic == AL_MAGIC and MAX_EXTENTS_MIN <= other_max <= MAX_EXTENTS_MAX:
                offsets.add(slot_bytes(other_max))
        valid = [s for off in sorted(offsets) if (s := self._decode(raw, off)) is not None]
        if not valid:
            if self._fresh(raw):
                return frozenset()
            raise StoreError(
                f"activity log file {self.path} holds no valid copy of the hot set (both "
                "slots fail their checksum): it is damaged or not an activity log. Remove "
                "it to start with an empty activity log; the extents written just before "
                "the primary stopped are then unknown, so run a full resync of the peer"
            )
        newest = max(valid, key=lambda s: s.counter)
        self._counter = newest.counter
        mismatch = self._mismatch(newest)
        if mismatch:
            if newest.extents:
                raise StoreError(
                    f"activity log file {self.path} was written with {mismatch}, and holds "
                    f"{len(newest.extents)} hot extents that would be lost. To change "
                    "this, stop the primary cleanly first with the old setting (that "
                    "empties the log), or remove the file and run a full resync of the peer"
                )
            # Nothing to lose: start over in this geometry, from an empty file.
            try:
                assert self._fd is not None
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
            except OSError as exc:
                raise StoreError(
                    f"cannot empty activity log file {self.path}: {exc.strerror}"
                ) from exc
            self._newest_slot = 1
            return frozenset()
        self._newest_slot = newest.index
        return frozenset(newest.extents)

    def _mismatch(self, slot: _Slot) -> str:
        parts = []
        if slot.extent_shift != self._shift:
            parts.append(f"extent size {1 << slot.extent_shift} bytes (now {self.extent_bytes})")
        if slot.size_bytes != self.size_bytes:
            parts.append(f"volume size {slot.size_bytes} bytes (now {self.size_bytes})")
        if slot.max_extents != self.max_extents:
            parts.append(f"max_extents {slot.max_extents} (now {self.max_extents})")
        return ", ".join(parts)

    def _fresh(self, raw: bytes) -> bool:
        # The first write goes to slot 0; slot 1 stays all zero until the second.
        # A first write torn at any byte leaves a prefix of our magic (or nothing)
        # at the start, which tells a torn first write from a foreign file.
        if any(raw[self.slot_bytes : 2 * self.slot_bytes]):
            return False
        head = raw[: len(_MAGIC_BYTES)].ljust(len(_MAGIC_BYTES), b"\0")
        return any(head == _MAGIC_BYTES[:i].ljust(4, b"\0") for i in range(5))

    def _decode(self, raw: bytes, off: int) -> _Slot | None:
        if len(raw) < off + _HEADER.size:
            return None
        magic, version, shift, size, max_ext, count, counter = _HEADER.unpack_from(raw, off)
        if magic != AL_MAGIC or version != AL_VERSION:
            return None
        if not MAX_EXTENTS_MIN <= max_ext <= MAX_EXTENTS_MAX:
            return None
        end = off + slot_bytes(max_ext) - _CHECKSUM.size
        if len(raw) < end + _CHECKSUM.size:
            return None
        (checksum,) = _CHECKSUM.unpack_from(raw, end)
        if xxhash.xxh3_64_intdigest(raw[off:end]) != checksum:
            return None
        # The checksum holds, so these bytes are what some writer meant.
        extents = tuple(
            _EXTENT.unpack_from(raw, off + _HEADER.size + i * _EXTENT.size)[0]
            for i in range(min(count, max_ext))
        )
        limit = _extent_count(size, 1 << shift) if 0 < shift < 64 and size > 0 else 0
        ascending = all(a < b for a, b in itertools.pairwise(extents))
        if count > max_ext or not ascending or (extents and extents[-1] >= limit):
            raise StoreError(
                f"activity log file {self.path}: slot {0 if off == 0 else 1} passes its "
                "checksum but its extent list is invalid, so it was not written by this "
                "program; remove the file and run a full resync of the peer"
            )
        return _Slot(0 if off == 0 else 1, counter, shift, size, max_ext, extents)

    def persist(self, hot: Set[int], counter: int) -> None:
        """Make ``hot`` the stored hot set, durably (one write, one fdatasync).

        ``counter`` must be above :attr:`counter` (use :attr:`AlChange.generation`):
        a lower one would be a stale hot set overwriting a newer one, so it raises
        ValueError, as do more than ``max_extents`` extents or one outside the
        volume. Raises StoreError if the file is not open or the write fails.
        """
        if self._fd is None:
            raise StoreError(f"activity log file {self.path} is not open")
        if counter <= self._counter:
            raise ValueError(
                f"activity log counter {counter} is not above the stored {self._counter}"
            )
        extents = sorted(hot)
        if len(extents) > self.max_extents:
            raise ValueError(f"{len(extents)} hot extents, more than {self.max_extents}")
        if extents and not (extents[0] >= 0 and extents[-1] < self.extents):
            raise ValueError(f"hot extents must be in 0..{self.extents - 1}")
        header = _HEADER.pack(
            AL_MAGIC,
            AL_VERSION,
            self._shift,
            self.size_bytes,
            self.max_extents,
            len(extents),
            counter,
        )
        table = b"".join(_EXTENT.pack(e) for e in extents)
        body = header + table.ljust(_EXTENT.size * self.max_extents, b"\0")
        data = body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))
        slot = 1 - self._newest_slot
        try:
            written = os.pwrite(self._fd, data, slot * self.slot_bytes)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError(f"cannot write activity log file {self.path}: {exc}") from exc
        self._counter = counter
        self._newest_slot = slot
        self.writes += 1

    def clear(self) -> int:
        """Store an empty hot set (after a clean stop or a full resync); returns
        the counter used, to continue an :class:`ActivityLog` from."""
        counter = self._counter + 1
        self.persist(frozenset(), counter)
        return counter

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
