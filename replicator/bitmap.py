"""Dirty-region bitmap: which regions of a volume the peer may be missing.

One bit per region (default 64 KiB), so a 1 TiB volume costs 2 MiB. Held in
memory here; persisting it with the metadata is the resync issue's work.
"""

from __future__ import annotations

from collections.abc import Iterator

DEFAULT_REGION_BYTES = 64 * 1024


class DirtyBitmap:
    """Marks regions touched by writes the peer has not received.

    ``mark`` is idempotent; ``dirty_bytes`` counts whole regions (the last may be
    shorter than ``region_bytes``).
    """

    def __init__(self, size_bytes: int, region_bytes: int = DEFAULT_REGION_BYTES) -> None:
        if region_bytes <= 0 or region_bytes & (region_bytes - 1):
            raise ValueError(f"region size {region_bytes} must be a power of two")
        self.size_bytes = size_bytes
        self.region_bytes = region_bytes
        self.regions = (size_bytes + region_bytes - 1) // region_bytes
        self._bits = bytearray((self.regions + 7) // 8)
        self._count = 0

    def mark(self, offset: int, length: int) -> list[int]:
        """Mark every region that ``[offset, offset+length)`` touches; return the
        regions that were clean before (the ones to persist write-ahead)."""
        if length <= 0 or offset < 0:
            return []
        first = offset // self.region_bytes
        last = min((offset + length - 1) // self.region_bytes, self.regions - 1)
        newly = []
        for r in range(first, last + 1):
            byte, bit = divmod(r, 8)
            if not self._bits[byte] & (1 << bit):
                self._bits[byte] |= 1 << bit
                self._count += 1
                newly.append(r)
        return newly

    def raw_bits(self) -> bytes:
        """The bits, region 0 in bit 0 of byte 0 (the persisted layout)."""
        return bytes(self._bits)

    def load_bits(self, bits: bytes) -> None:
        """Replace the bits (from :meth:`raw_bits` of the same geometry)."""
        if len(bits) != len(self._bits):
            raise ValueError(f"bitmap of {len(bits)} bytes, expected {len(self._bits)}")
        self._bits = bytearray(bits)
        # Bits past the last region must be zero.
        extra = len(self._bits) * 8 - self.regions
        if extra:
            self._bits[-1] &= (1 << (8 - extra)) - 1
        self._count = sum(bin(b).count("1") for b in self._bits)

    def is_dirty(self, region: int) -> bool:
        byte, bit = divmod(region, 8)
        return bool(self._bits[byte] & (1 << bit))

    @property
    def dirty_regions(self) -> int:
        return self._count

    @property
    def dirty_bytes(self) -> int:
        if self._count == 0:
            return 0
        total = self._count * self.region_bytes
        last = self.regions - 1
        if self.is_dirty(last):
            total -= self.regions * self.region_bytes - self.size_bytes
        return total

    def __iter__(self) -> Iterator[int]:
        """Yield the dirty region numbers in ascending order."""
        for byte_index, value in enumerate(self._bits):
            if value:
                for bit in range(8):
                    if value & (1 << bit):
                        yield byte_index * 8 + bit

    def runs(self) -> Iterator[tuple[int, int]]:
        """Yield the dirty regions as runs (first region, count), ascending."""
        start = prev = None
        for r in self:
            if prev is not None and r == prev + 1:
                prev = r
                continue
            if start is not None and prev is not None:
                yield start, prev - start + 1
            start = prev = r
        if start is not None and prev is not None:
            yield start, prev - start + 1

    def clear(self) -> None:
        self._bits = bytearray(len(self._bits))
        self._count = 0
