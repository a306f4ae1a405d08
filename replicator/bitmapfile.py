"""Crash-safe persistence of the dirty-region bitmap (layout in docs/format.md).

The bitmap is stored in pages of ``PAGE_BITS`` bits (4 KiB of bits, 32,768
regions, 2 GiB of volume at 64 KiB regions). Each page has two slots; an update
writes the page to the slot not holding its newest copy, with a counter one
higher and an xxh3-64 checksum, then ``fdatasync``s. Reading a page takes the
valid slot with the highest counter, so a write torn at any byte leaves the
previous or the next state of that page, never garbage.

Write-ahead rule (kept by the caller, :class:`~replicator.volume.ReplicatedVolume`):
a region's bit is made durable *before* the first write into that region while
the peer is not receiving. So after a crash the bitmap holds every region that
may differ from the peer; a bit cleared lazily can only cause extra resync, never
a missed one. Each region goes dirty once per divergence, so the cost is one
small synchronous page write per newly dirty region, amortised over the rest.

Cost: 1 TiB at 64 KiB regions = 16 Mi bits = 2 MiB, stored as 512 pages of two
slots each (4 MiB + headers on disk).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import xxhash

from geoclus.errors import StoreError
from replicator.bitmap import DirtyBitmap

PAGE_DATA_BYTES = 4096
PAGE_BITS = PAGE_DATA_BYTES * 8
_HEADER = struct.Struct(">IHHQQQ")  # magic, version, region shift, size, page index, counter
_CHECKSUM = struct.Struct(">Q")
SLOT_BYTES = _HEADER.size + PAGE_DATA_BYTES + _CHECKSUM.size  # 4136
FILE_MAGIC = 0x47434250  # "GCBP"
FILE_VERSION = 1


def _slot_offset(page: int, slot: int) -> int:
    return (2 * page + slot) * SLOT_BYTES


class BitmapFile:
    """The on-disk bitmap of one volume. Blocking: call from a worker thread.

    ``open`` returns the stored bitmap (all clear for a new file); ``persist``
    makes the given pages durable with the bitmap's current bits.
    """

    def __init__(self, path: str, size_bytes: int, region_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.region_bytes = region_bytes
        self.regions = (size_bytes + region_bytes - 1) // region_bytes
        self.pages = (self.regions + PAGE_BITS - 1) // PAGE_BITS
        self._counters = [0] * self.pages
        self._newest_slot = [1] * self.pages  # so the first write goes to slot 0
        self._fd: int | None = None
        self.page_writes = 0
        self._region_shift = region_bytes.bit_length() - 1
        # Pages whose newest stored copy has any bit set (to clear them later).
        self.pages_with_bits: set[int] = set()

    def open(self) -> DirtyBitmap:
        """Open (creating if missing) and return the stored bitmap.

        Raises StoreError if a page has no valid slot but was written before
        (damage beyond a torn write) or the file belongs to another geometry.
        """
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            raw = os.pread(self._fd, 2 * self.pages * SLOT_BYTES, 0)
        except OSError as exc:
            raise StoreError(f"cannot open bitmap file {self.path}: {exc.strerror}") from exc
        bitmap = DirtyBitmap(self.size_bytes, self.region_bytes)
        bits = bytearray(len(bitmap._bits))
        for page in range(self.pages):
            best: tuple[int, int, bytes] | None = None
            blank = True
            for slot in (0, 1):
                off = _slot_offset(page, slot)
                chunk = raw[off : off + SLOT_BYTES]
                if any(chunk):
                    blank = False
                decoded = self._decode(chunk, page)
                if decoded is not None and (best is None or decoded[0] > best[0]):
                    best = (decoded[0], slot, decoded[1])
            if best is None:
                if not blank and self._written_before(raw, page):
                    raise StoreError(
                        f"bitmap file {self.path}: page {page} has no valid copy; the "
                        "changed-region record is lost, so the peer needs a full sync"
                    )
                continue
            counter, slot, data = best
            self._counters[page] = counter
            self._newest_slot[page] = slot
            if any(data):
                self.pages_with_bits.add(page)
            start = page * PAGE_DATA_BYTES
            end = min(start + PAGE_DATA_BYTES, len(bits))
            bits[start:end] = data[: end - start]
        bitmap.load_bits(bytes(bits))
        return bitmap

    def _written_before(self, raw: bytes, page: int) -> bool:
        # A first write goes to slot 0 and slot 1 stays all zeros: a torn first
        # write is "nothing stored yet". Anything in slot 1 means it was written.
        off = _slot_offset(page, 1)
        return any(raw[off : off + SLOT_BYTES])

    def _decode(self, chunk: bytes, page: int) -> tuple[int, bytes] | None:
        if len(chunk) < SLOT_BYTES:
            return None
        body = chunk[: _HEADER.size + PAGE_DATA_BYTES]
        (checksum,) = _CHECKSUM.unpack_from(chunk, _HEADER.size + PAGE_DATA_BYTES)
        if xxhash.xxh3_64_intdigest(body) != checksum:
            return None
        magic, version, shift, size, index, counter = _HEADER.unpack_from(chunk)
        if magic != FILE_MAGIC or version != FILE_VERSION:
            return None
        if size != self.size_bytes or index != page or shift != self._region_shift:
            raise StoreError(
                f"bitmap file {self.path} was written for a {size}-byte volume with "
                f"{1 << shift}-byte regions (page {index}), not this {self.size_bytes}-byte "
                f"one with {self.region_bytes}-byte regions; keep the old region_size, or "
                "remove the file only after a full resync"
            )
        return counter, bytes(chunk[_HEADER.size : _HEADER.size + PAGE_DATA_BYTES])

    def pages_of(self, regions: Iterable[int]) -> set[int]:
        """The pages holding ``regions``."""
        return {r // PAGE_BITS for r in regions}

    def persist(self, bits: bytes, pages: Iterable[int]) -> None:
        """Make ``pages`` of the bitmap whose bits are ``bits`` (a snapshot from
        :meth:`DirtyBitmap.raw_bits`) durable, with one fdatasync for all."""
        if self._fd is None:
            raise StoreError(f"bitmap file {self.path} is not open")
        wrote = False
        for page in sorted(set(pages)):
            data = bits[page * PAGE_DATA_BYTES : (page + 1) * PAGE_DATA_BYTES]
            data = data.ljust(PAGE_DATA_BYTES, b"\0")
            counter = self._counters[page] + 1
            slot = 1 - self._newest_slot[page]
            header = _HEADER.pack(
                FILE_MAGIC, FILE_VERSION, self._region_shift, self.size_bytes, page, counter
            )
            body = header + data
            try:
                os.pwrite(
                    self._fd,
                    body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body)),
                    _slot_offset(page, slot),
                )
            except OSError as exc:
                raise StoreError(f"cannot write bitmap file {self.path}: {exc}") from exc
            self._counters[page] = counter
            self._newest_slot[page] = slot
            self.page_writes += 1
            wrote = True
            if any(data):
                self.pages_with_bits.add(page)
            else:
                self.pages_with_bits.discard(page)
        if wrote:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise StoreError(f"cannot sync bitmap file {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
