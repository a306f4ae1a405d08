"""The undo log of a resync target: keeps a secondary promotable during a resync.

During a resync the secondary receives region copies and application writes in
sequence order, so its image is a mix of old and new content (not crash
consistent) until the resync completes. The undo log keeps the pre-resync image
recoverable throughout:

* **Write-ahead rule (kept by the caller):** before the first write, zeroing or
  trim into any region since the resync began, the caller calls :meth:`UndoLog.save`
  for that region; ``save`` appends the region's current (old) content and
  ``fdatasync``\\s before it returns. Only then is the new data written. Each
  region is saved once, at its first touch, so the log holds exactly the
  pre-resync content of every region the resync has changed.
* **Cut off** (link loss, crash, promotion): :meth:`UndoLog.rollback` writes
  every saved region back, syncs the store, then marks the log inactive: the
  image is exactly the pre-resync image again (consistent).
* **Completed** (and durable): :meth:`UndoLog.discard` drops the log.

Layout: the file (``STORE.undo``) starts with two 4,096-byte header slots at
bytes 0 and 4,096, written alternately (slot = counter mod 2) like the metadata
sidecar: u32 magic ``0x4743554E`` ("GCUN"), u16 version 1, u8 active flag, a
pad byte, u64 counter (higher is newer), u64 volume size, u64 region size, u64
base generation (opaque, from ``begin``), u64 epoch (one more at every ``begin``
that starts a new log), u64 xxh3-64 of the 48 bytes before it; big-endian, the
rest zero. Records follow in fixed-size slots, record ``k`` at byte
``8192 + k * (64 + region size)``: u32 magic ``0x47435552`` ("GCUR"), u32 data
length, u64 epoch, u64 ``k``, u64 region index, u64 first record and u32 record
count of its batch (one ``save`` call, one ``fdatasync``), u32 zero, u64
xxh3-64 of the data, u64 xxh3-64 of the 56 bytes before it; then the region's
old content (the last region may be short), zero-padded to the region size.

Reading: a record counts only if its whole slot is in the file, both checksums
match, and its epoch and ``k`` are the header's and its position; the log is
the longest run of *complete* batches from record 0. Where the run stops is a
torn tail (a crash inside ``save``, whose data writes never happened, can leave
any mix of its records): ``open`` cuts it off. But if a valid record past that
point belongs to a batch that starts after it, that batch was written only once
the damaged record had been synced: that is damage, not a crash, and ``open``
refuses the file. ``begin``, ``rollback`` and ``discard`` write the header
first and then truncate the file to 8,192 bytes; records of an older epoch left
by a crash in between are never read as current.

Costs: disk, 64 + region bytes per saved region, bounded by ``max_bytes``
(64 KiB regions: 1 GiB of log holds 16,367 regions, about 1 GiB of changed
volume); memory, one bit per region of the volume for the saved set (2 MiB per
TiB at 64 KiB regions), whatever the log holds; ``open`` and ``rollback`` read
the whole log once, one record at a time.

Caveat: damage to the *last* batch after its ``fdatasync`` looks exactly like a
torn tail, so it is dropped without an error and those regions are not restored
by a rollback. Every earlier record is covered by the check above.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from geoclus.errors import IOAlignmentError, StoreError

HEADER_SLOT_BYTES = 4096
HEADER_AREA_BYTES = 2 * HEADER_SLOT_BYTES  # records start here
UNDO_MAGIC = 0x4743554E  # "GCUN"
UNDO_VERSION = 1
RECORD_MAGIC = 0x47435552  # "GCUR"
_HEAD = struct.Struct(">IHBxQQQQQ")
# magic, version, active, counter, size_bytes, region_bytes, base_generation, epoch
_REC = struct.Struct(">IIQQQQIIQ")
# magic, length, epoch, record index, region, batch first, batch count, zero, data xxh3
_SUM = struct.Struct(">Q")
RECORD_HEADER_BYTES = 64
_U64_MAX = (1 << 64) - 1
if _REC.size + _SUM.size != RECORD_HEADER_BYTES:  # pragma: no cover - layout guard
    raise AssertionError("record header layout changed without RECORD_HEADER_BYTES")


class UndoFull(StoreError):
    """Saving would make the undo log larger than its ``max_bytes``; nothing was
    appended and the log is unchanged (still active, still restorable).

    A subclass of :class:`StoreError` on purpose: a caller that does not handle
    it specially treats it as a store failure and stops writing, which is safe.
    A caller that does handle it writes the data anyway and marks the copy
    inconsistent (the log can then no longer restore the pre-resync image, so
    it should be discarded). ``needed_bytes`` is the size the log would have had.
    """

    def __init__(self, message: str, needed_bytes: int, max_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class UndoState:
    """What the undo log holds.

    ``active``: a resync began and has neither completed (``discard``) nor been
    rolled back. ``base_generation``: the value given to :meth:`UndoLog.begin`
    (meaningful only when active; the caller compares it with its lineage to
    tell whether the log belongs to the image). ``epoch``: how many logs were
    begun in this file. ``saved_regions``: region indexes whose pre-resync
    content is in the log. ``used_bytes``: file size in bytes (headers and
    records); ``max_bytes``: its bound.
    """

    active: bool
    base_generation: int
    epoch: int
    saved_regions: frozenset[int]
    used_bytes: int
    max_bytes: int


@dataclass(frozen=True)
class _Header:
    counter: int
    size_bytes: int
    region_bytes: int
    active: bool
    base_generation: int
    epoch: int

    def encode(self) -> bytes:
        body = _HEAD.pack(
            UNDO_MAGIC,
            UNDO_VERSION,
            int(self.active),
            self.counter,
            self.size_bytes,
            self.region_bytes,
            self.base_generation,
            self.epoch,
        )
        slot = body + _SUM.pack(xxhash.xxh3_64_intdigest(body))
        return slot.ljust(HEADER_SLOT_BYTES, b"\0")

    @classmethod
    def decode(cls, slot: bytes) -> _Header | None:
        if len(slot) < _HEAD.size + _SUM.size:
            return None
        body = slot[: _HEAD.size]
        (checksum,) = _SUM.unpack_from(slot, _HEAD.size)
        if xxhash.xxh3_64_intdigest(body) != checksum:
            return None
        magic, version, active, counter, size, region, base, epoch = _HEAD.unpack(body)
        if magic != UNDO_MAGIC or version != UNDO_VERSION or active > 1:
            return None
        return cls(counter, size, region, bool(active), base, epoch)


@dataclass(frozen=True)
class _Record:
    length: int
    epoch: int
    index: int
    region: int
    batch_first: int
    batch_count: int
    data: bytes


def _encode_record(
    region_bytes: int,
    epoch: int,
    index: int,
    region: int,
    batch_first: int,
    batch_count: int,
    data: bytes,
) -> bytes:
    head = _REC.pack(
        RECORD_MAGIC,
        len(data),
        epoch,
        index,
        region,
        batch_first,
        batch_count,
        0,
        xxhash.xxh3_64_intdigest(data),
    )
    head += _SUM.pack(xxhash.xxh3_64_intdigest(head))
    return head + data + bytes(region_bytes - len(data))


def _decode_record(chunk: bytes, region_bytes: int) -> _Record | None:
    """The record in ``chunk`` (one record slot), or None unless the whole slot
    is there (padding included: the file then ends on a slot boundary) and both
    checksums match."""
    if len(chunk) != RECORD_HEADER_BYTES + region_bytes:
        return None
    head = chunk[: _REC.size]
    (checksum,) = _SUM.unpack_from(chunk, _REC.size)
    if xxhash.xxh3_64_intdigest(head) != checksum:
        return None
    magic, length, epoch, index, region, first, count, zero, data_sum = _REC.unpack(head)
    if magic != RECORD_MAGIC or zero != 0 or length > region_bytes:
        return None
    data = chunk[RECORD_HEADER_BYTES : RECORD_HEADER_BYTES + length]
    if len(data) != length or xxhash.xxh3_64_intdigest(data) != data_sum:
        return None
    return _Record(length, epoch, index, region, first, count, bytes(data))


class UndoLog:
    """The undo log file of one resync target. Blocking: call from a worker
    thread; not thread-safe (one caller at a time).

    ``size_bytes`` is the volume size, ``region_bytes`` the save granularity (a
    power of two; 64 KiB by default in the volume), ``max_bytes`` the largest
    the file may grow to (headers included); it must hold at least one record.
    Raises ValueError for a bad geometry.
    """

    def __init__(self, path: str, size_bytes: int, region_bytes: int, max_bytes: int) -> None:
        if size_bytes <= 0:
            raise ValueError(f"volume size {size_bytes} must be positive")
        if region_bytes <= 0 or region_bytes & (region_bytes - 1):
            raise ValueError(f"region size {region_bytes} must be a power of two")
        self.path = path
        self.size_bytes = size_bytes
        self.region_bytes = region_bytes
        self.record_bytes = RECORD_HEADER_BYTES + region_bytes
        if max_bytes < HEADER_AREA_BYTES + self.record_bytes:
            raise ValueError(
                f"undo log bound {max_bytes} bytes cannot hold even one region: it "
                f"needs at least {HEADER_AREA_BYTES + self.record_bytes} bytes"
            )
        self.max_bytes = max_bytes
        self.regions = (size_bytes + region_bytes - 1) // region_bytes
        self._fd: int | None = None
        self._header: _Header | None = None  # None: nothing stored yet
        self._saved = bytearray((self.regions + 7) // 8)
        self._saved_count = 0
        self._records = 0  # valid records, all in complete batches
        self._failed: StoreError | None = None
        self.fdatasyncs = 0

    # ---- state -------------------------------------------------------------

    @property
    def active(self) -> bool:
        """A resync's log is open for saves (begun, not rolled back or discarded)."""
        return self._header is not None and self._header.active

    @property
    def used_bytes(self) -> int:
        """File size in bytes once the current log is durable."""
        if self._header is None:
            return 0
        return HEADER_AREA_BYTES + self._records * self.record_bytes

    def is_saved(self, region: int) -> bool:
        """Whether ``region``'s pre-resync content is in the log."""
        return bool(self._saved[region >> 3] & (1 << (region & 7)))

    def state(self) -> UndoState:
        """A snapshot of what the log holds (cost: one pass over the saved bits)."""
        header = self._header
        return UndoState(
            active=self.active,
            base_generation=header.base_generation if header else 0,
            epoch=header.epoch if header else 0,
            saved_regions=frozenset(self._saved_list()),
            used_bytes=self.used_bytes,
            max_bytes=self.max_bytes,
        )

    def _saved_list(self) -> list[int]:
        out: list[int] = []
        if not self._saved_count:
            return out
        for i, byte in enumerate(self._saved):
            if byte:
                out.extend(i * 8 + b for b in range(8) if byte & (1 << b))
        return out

    def _region_length(self, region: int) -> int:
        return min(self.region_bytes, self.size_bytes - region * self.region_bytes)

    def _mark(self, region: int) -> None:
        self._saved[region >> 3] |= 1 << (region & 7)
        self._saved_count += 1

    def _reset_saved(self) -> None:
        self._saved = bytearray(len(self._saved))
        self._saved_count = 0
        self._records = 0

    def _require_open(self) -> int:
        if self._fd is None:
            raise StoreError(f"undo log {self.path} is not open")
        return self._fd

    def _require_active(self) -> int:
        fd = self._require_open()
        if not self.active:
            raise StoreError(f"undo log {self.path} is not active (no resync was begun)")
        return fd

    # ---- file primitives ---------------------------------------------------

    def _pwrite_all(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def _pread_exact(self, fd: int, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
        parts: list[bytes] = []
        got = 0
        while got < length:
            chunk = os.pread(fd, length - got, offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _sync(self, fd: int) -> None:
        os.fdatasync(fd)
        self.fdatasyncs += 1

    def _write_header(self, fd: int, active: bool, base_generation: int, epoch: int) -> None:
        """Durably store a new header in the slot not holding the newest one."""
        counter = (self._header.counter + 1) if self._header else 1
        header = _Header(
            counter, self.size_bytes, self.region_bytes, active, base_generation, epoch
        )
        try:
            self._pwrite_all(fd, header.encode(), (counter % 2) * HEADER_SLOT_BYTES)
            self._sync(fd)
        except OSError as exc:
            raise StoreError(f"cannot write undo log header {self.path}: {exc}") from exc
        self._header = header

    def _truncate(self, fd: int, length: int) -> None:
        try:
            os.ftruncate(fd, length)
            os.fsync(fd)  # a size change: fsync, not fdatasync
        except OSError as exc:
            raise StoreError(f"cannot truncate undo log {self.path}: {exc}") from exc

    # ---- open --------------------------------------------------------------

    def open(self) -> UndoState:
        """Open (creating if missing) and return what the log holds.

        A torn tail (a crash inside :meth:`save`: its data writes never
        happened) is cut off durably. Raises StoreError if the header is not an
        undo log header, an active log was written for another geometry, or a
        record before the tail is damaged.
        """
        if self._fd is not None:
            raise StoreError(f"undo log {self.path} is already open")
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                created = False
        except OSError as exc:
            raise StoreError(f"cannot open undo log {self.path}: {exc.strerror}") from exc
        try:
            if created:
                self._sync_parent_dir()
            self._load(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self.state()

    def _sync_parent_dir(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise StoreError(f"cannot sync directory {parent}: {exc.strerror}") from exc

    def _load(self, fd: int) -> None:
        try:
            file_bytes = os.fstat(fd).st_size
            raw = self._pread_exact(fd, HEADER_AREA_BYTES, 0)
        except OSError as exc:
            raise StoreError(f"cannot read undo log {self.path}: {exc}") from exc
        slots = [
            _Header.decode(raw[i * HEADER_SLOT_BYTES : (i + 1) * HEADER_SLOT_BYTES]) for i in (0, 1)
        ]
        valid = [h for h in slots if h is not None]
        self._header = max(valid, key=lambda h: h.counter) if valid else None
        self._reset_saved()
        if self._header is None:
            # The first header goes to slot 1 and slot 0 is written only after
            # it: slot 0 never written means nothing was ever stored (an empty
            # file, or a torn first header), and no record was written either.
            if any(raw[:HEADER_SLOT_BYTES]):
                raise StoreError(
                    f"undo log {self.path} has no valid header (both checksums fail): it "
                    "is not a geoclus undo log or both copies are damaged. If a resync "
                    "was cut off, this copy's pre-resync image cannot be restored: do not "
                    "promote it; resync it fully from its peer, then remove the file"
                )
            return
        header = self._header
        if not header.active:
            if file_bytes > HEADER_AREA_BYTES:  # a crash between header and truncate
                self._truncate(fd, HEADER_AREA_BYTES)
            return
        if header.size_bytes != self.size_bytes or header.region_bytes != self.region_bytes:
            raise StoreError(
                f"undo log {self.path} holds a cut-off resync of a {header.size_bytes}-byte "
                f"volume with {header.region_bytes}-byte regions, not this "
                f"{self.size_bytes}-byte one with {self.region_bytes}-byte regions; start "
                "with the old volume.size and region_size so it can be rolled back"
            )
        end = self._scan(fd, file_bytes, header.epoch)
        if file_bytes > end:
            self._truncate(fd, end)

    def _read_record(self, fd: int, index: int) -> _Record | None:
        """Record ``index`` if it is valid and belongs to the current epoch."""
        assert self._header is not None
        offset = HEADER_AREA_BYTES + index * self.record_bytes
        try:
            chunk = self._pread_exact(fd, self.record_bytes, offset)
        except OSError as exc:
            raise StoreError(f"cannot read undo log {self.path}: {exc}") from exc
        record = _decode_record(chunk, self.region_bytes)
        if record is None or record.epoch != self._header.epoch or record.index != index:
            return None
        return record

    def _scan(self, fd: int, file_bytes: int, epoch: int) -> int:
        """Load the saved set from the records; return where the log ends (bytes)."""
        slots = -(-(file_bytes - HEADER_AREA_BYTES) // self.record_bytes)
        k = 0
        while k < slots:
            first = self._read_record(fd, k)
            if first is None or first.batch_first != k or first.batch_count < 1:
                break
            batch = [first]
            for j in range(k + 1, k + first.batch_count):
                rec = self._read_record(fd, j) if j < slots else None
                if rec is None or rec.batch_first != k or rec.batch_count != first.batch_count:
                    break
                batch.append(rec)
            if len(batch) != first.batch_count:
                break  # a torn batch: none of its data writes happened
            for rec in batch:
                self._check_record(rec)
                self._mark(rec.region)
            k += first.batch_count
            self._records = k
        # Everything from record k on is a torn tail unless a valid record
        # belongs to a batch that started after k: such a batch was written
        # only after the one holding record k had been synced.
        for j in range(k + 1, slots):
            rec = self._read_record(fd, j)
            if rec is not None and k < rec.batch_first <= j:
                raise StoreError(
                    f"undo log {self.path}: record {k} is damaged but later records are "
                    "intact, so it was damaged after it was synced (a disk fault, not a "
                    "crash). The pre-resync image cannot be restored: do not promote this "
                    "copy; resync it fully from its peer, then remove the file"
                )
        return HEADER_AREA_BYTES + k * self.record_bytes

    def _check_record(self, rec: _Record) -> None:
        if rec.region >= self.regions or rec.length != self._region_length(rec.region):
            raise StoreError(
                f"undo log {self.path}: record {rec.index} holds {rec.length} bytes of "
                f"region {rec.region}, which does not fit this {self.size_bytes}-byte "
                "volume; the file does not belong to this volume. Do not promote this "
                "copy; resync it fully from its peer, then remove the file"
            )
        if self.is_saved(rec.region):
            raise StoreError(
                f"undo log {self.path}: region {rec.region} is saved twice (record "
                f"{rec.index}); the log is not trustworthy. Do not promote this copy; "
                "resync it fully from its peer, then remove the file"
            )

    # ---- a resync ----------------------------------------------------------

    def begin(self, base_generation: int) -> None:
        """Start the undo log of a resync whose image is ``base_generation``
        (an opaque u64), durably, with no region saved.

        If a log is already active with the same ``base_generation``, it is
        kept unchanged: a resync that restarts after a link loss or a restart
        continues into the same log. Its saved regions hold the *pre-resync*
        content and must not be overwritten by the newer content the first
        attempt wrote (saving them again would lose the only copy of the old
        image). If a log is active with another base, it is dropped: the caller
        must already have rolled it back, or decided it does not belong to this
        image.
        """
        if not 0 <= base_generation <= _U64_MAX:
            raise ValueError(f"base generation {base_generation} is not a u64")
        fd = self._require_open()
        header = self._header
        if header is not None and header.active and header.base_generation == base_generation:
            return
        epoch = (header.epoch + 1) if header else 1
        # Header first: from here on, records left by an older epoch are ignored
        # even if the truncate below does not happen (a crash).
        self._write_header(fd, True, base_generation, epoch)
        self._reset_saved()
        self._truncate(fd, HEADER_AREA_BYTES)

    def needs_save(self, offset: int, length: int) -> list[int]:
        """The regions touched by a write of ``length`` bytes at ``offset`` that
        are not saved yet, in ascending order (empty for a zero length).

        Raises IOAlignmentError if the range leaves the volume, StoreError if
        the log is not active.
        """
        self._require_active()
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise IOAlignmentError(
                f"range {offset}+{length} is outside the {self.size_bytes}-byte volume"
            )
        if length == 0:
            return []
        first = offset // self.region_bytes
        last = (offset + length - 1) // self.region_bytes
        return [r for r in range(first, last + 1) if not self.is_saved(r)]

    def save(self, regions: list[int], read_region: Callable[[int, int], bytes]) -> None:
        """Durably save the current content of ``regions`` (already saved ones
        and repeats are skipped), one record each and one ``fdatasync`` for the
        whole call. ``read_region(offset, length)`` returns ``length`` bytes of
        the store at byte ``offset`` (``FileStore.read`` fits).

        Only after this returns may the caller write into those regions. Raises
        :class:`UndoFull` (nothing appended) if the log would pass
        ``max_bytes``; ValueError for a region outside the volume; StoreError
        if the log file fails (then every later ``save`` fails too) or a read
        returns the wrong length.
        """
        fd = self._require_active()
        if self._failed is not None:
            raise StoreError(
                f"undo log {self.path} failed earlier and is no longer trusted "
                f"({self._failed}); stop the resync and check the disk"
            )
        todo: list[int] = []
        seen: set[int] = set()
        for r in regions:
            if not 0 <= r < self.regions:
                raise ValueError(f"region {r} is outside the volume (0..{self.regions - 1})")
            if not self.is_saved(r) and r not in seen:
                seen.add(r)
                todo.append(r)
        if not todo:
            return
        needed = self.used_bytes + len(todo) * self.record_bytes
        if needed > self.max_bytes:
            raise UndoFull(
                f"undo log {self.path} would grow to {needed} bytes, past its bound of "
                f"{self.max_bytes} bytes ({self._saved_count} regions saved); the copy "
                "cannot be kept restorable for this resync (raise the undo log bound "
                "to keep it restorable next time)",
                needed,
                self.max_bytes,
            )
        assert self._header is not None
        first = self._records
        for i, r in enumerate(todo):
            length = self._region_length(r)
            data = read_region(r * self.region_bytes, length)
            if len(data) != length:
                raise StoreError(
                    f"reading region {r} for the undo log returned {len(data)} bytes, not {length}"
                )
            record = _encode_record(
                self.region_bytes, self._header.epoch, first + i, r, first, len(todo), data
            )
            # A failed read above leaves a partial batch past the end: harmless,
            # the next batch starts at the same record and overwrites it, and a
            # leftover record names a batch start at or before the end of the log.
            try:
                self._pwrite_all(fd, record, HEADER_AREA_BYTES + (first + i) * self.record_bytes)
            except OSError as exc:
                self._failed = StoreError(f"cannot write undo log {self.path}: {exc}")
                raise self._failed from exc
        try:
            self._sync(fd)
        except OSError as exc:
            # Linux may drop the dirty pages and report success next time:
            # nothing written from now on can be trusted to be durable.
            self._failed = StoreError(f"cannot sync undo log {self.path}: {exc}")
            raise self._failed from exc
        for r in todo:
            self._mark(r)
        self._records = first + len(todo)

    def rollback(self, write_region: Callable[[int, bytes], None], sync: Callable[[], None]) -> int:
        """Restore the pre-resync image: write every saved region back with
        ``write_region(offset, data)`` (``FileStore.write`` fits), call
        ``sync()`` (``FileStore.fdatasync``), then mark the log inactive durably
        and empty it. Returns the number of regions restored (0 if no log is
        active).

        Idempotent across crashes: until the final header write the log stays
        active, and a second rollback writes the same content again. If
        ``write_region`` or ``sync`` raises, the exception propagates and the
        log stays active. Raises StoreError if a record no longer reads back
        intact (the pre-resync image cannot be restored).
        """
        fd = self._require_open()
        header = self._header
        if header is None or not header.active:
            return 0
        restored = 0
        for k in range(self._records):
            rec = self._read_record(fd, k)  # checked again: read back, not trusted
            if rec is None:
                raise StoreError(
                    f"undo log {self.path}: record {k} no longer reads back intact, so "
                    f"region content saved before the resync is lost ({restored} regions "
                    "restored so far). Do not promote this copy; resync it fully from its "
                    "peer, then remove the file"
                )
            write_region(rec.region * self.region_bytes, rec.data)
            restored += 1
        sync()
        self._write_header(fd, False, header.base_generation, header.epoch)
        self._reset_saved()
        self._truncate(fd, HEADER_AREA_BYTES)
        return restored

    def discard(self) -> None:
        """The resync completed and is durable: mark the log inactive durably,
        then empty it. Does nothing more if no log is active."""
        fd = self._require_open()
        header = self._header
        if header is not None and header.active:
            self._write_header(fd, False, header.base_generation, header.epoch)
        self._reset_saved()
        if header is not None:
            self._truncate(fd, HEADER_AREA_BYTES)

    def close(self) -> None:
        """Close the file (idempotent). Nothing is written."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
