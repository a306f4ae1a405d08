"""An in-memory :class:`~replicator.device.BlockDevice` for tests of front ends."""

from __future__ import annotations

import trio

from geoclus.errors import ReadOnlyError
from replicator.device import EXTENT_HOLE, EXTENT_ZERO
from replicator.store import check_range

__all__ = ["MemoryDevice", "check_range"]


class MemoryDevice:
    """A zero-filled device held in a ``bytearray``; durable == written.

    It supports :class:`~replicator.device.SupportsBlockStatus` like a sparse
    store: a block that is all zeros is reported as a hole.
    """

    # Extents one block_status call returns at most (bounds the scan's output).
    MAX_EXTENTS = 1024

    def __init__(self, size_bytes: int, block_size: int = 512, read_only: bool = False) -> None:
        self._buf = bytearray(size_bytes)
        self._block_size = block_size
        self._read_only = read_only
        self.flushes = 0

    @property
    def size_bytes(self) -> int:
        return len(self._buf)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _check_write(self, offset: int, length: int) -> None:
        if self._read_only:
            raise ReadOnlyError("this device is read-only")
        check_range(offset, length, self.size_bytes, self._block_size)

    async def read(self, offset: int, length: int) -> bytes:
        check_range(offset, length, self.size_bytes, self._block_size)
        await trio.lowlevel.checkpoint()
        return bytes(self._buf[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._check_write(offset, len(data))
        await trio.lowlevel.checkpoint()
        self._buf[offset : offset + len(data)] = data

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self.flushes += 1

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_write(offset, length)
        await trio.lowlevel.checkpoint()
        self._buf[offset : offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs of all-zero blocks as ``EXTENT_HOLE | EXTENT_ZERO``, others as
        data (0), from ``offset``; at most :attr:`MAX_EXTENTS` extents."""
        check_range(offset, length, self.size_bytes, self._block_size)
        await trio.lowlevel.checkpoint()
        bs = self._block_size
        zero = bytes(bs)
        out: list[tuple[int, int]] = []
        with memoryview(self._buf) as view:
            for pos in range(offset, offset + length, bs):
                flags = EXTENT_HOLE | EXTENT_ZERO if view[pos : pos + bs] == zero else 0
                if out and out[-1][1] == flags:
                    out[-1] = (out[-1][0] + bs, flags)
                elif len(out) == self.MAX_EXTENTS:
                    break
                else:
                    out.append((bs, flags))
        return out
