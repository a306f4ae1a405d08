"""The block-device interface an export serves.

:class:`BlockDevice` is what the NBD server (and any other front end) sees: a
replicated volume, a plain store, or an in-memory device in tests all provide it.
Offsets and lengths are bytes; the caller has already checked nothing, so the
device checks alignment and range itself and raises :class:`IOAlignmentError`.

:class:`SupportsBlockStatus` is an optional extra: a device that can tell which
ranges are unallocated or read as zeros (a sparse store) provides
``block_status``; front ends find it with ``getattr(device, "block_status",
None)`` and treat a device without it as allocated data everywhere.
"""

from __future__ import annotations

from typing import Final, Protocol, runtime_checkable

# Extent flags returned by SupportsBlockStatus.block_status. The values are the
# NBD base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO) so an NBD front end
# passes them through unchanged; 0 means "allocated, contents unknown".
EXTENT_HOLE: Final = 1 << 0  # not allocated in the backing storage
EXTENT_ZERO: Final = 1 << 1  # reads as zeros
EXTENT_FLAGS: Final = EXTENT_HOLE | EXTENT_ZERO


@runtime_checkable
class BlockDevice(Protocol):
    """An async block device.

    Guarantees a front end may rely on:

    * ``write``/``trim``/``write_zeroes`` return only once the data is held by
      the device (in replicated sync mode: by every copy); with ``fua=True``
      once it is durable.
    * ``flush`` returns once every write that completed before ``flush`` was
      called is durable, whoever issued it: the guarantee is device-wide, not
      per caller or per connection (this is what lets the NBD export advertise
      ``NBD_FLAG_CAN_MULTI_CONN``).
    * A ``read`` started after a write completed returns that write's data,
      whoever issued either of them (there is no per-caller cache).
    * Misaligned or out-of-range requests raise ``IOAlignmentError`` and change
      nothing; writes to a read-only device raise ``ReadOnlyError``.
    """

    @property
    def size_bytes(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None: ...


@runtime_checkable
class SupportsBlockStatus(Protocol):
    """A device that reports the allocation of its ranges (optional capability).

    ``block_status(offset, length)`` returns extents ``(length_bytes, flags)``
    that are consecutive from ``offset``: every length is positive, ``flags``
    is a combination of :data:`EXTENT_HOLE` and :data:`EXTENT_ZERO`, and the
    lengths add up to at most ``length``. The list may stop early (cover only
    a prefix of the range, to bound the work per call) but is never empty for
    a positive ``length``. A hole is reported with both flags (a sparse store's
    hole reads as zeros). The answer is a snapshot: a write racing the call may
    or may not be reflected. Misaligned or out-of-range requests raise
    ``IOAlignmentError``, like reads.
    """

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]: ...
