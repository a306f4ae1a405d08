"""The block-device interface an export serves.

:class:`BlockDevice` is what the NBD server (and any other front end) sees: a
replicated volume, a plain store, or an in-memory device in tests all provide it.
Offsets and lengths are bytes; the caller has already checked nothing, so the
device checks alignment and range itself and raises :class:`IOAlignmentError`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockDevice(Protocol):
    """An async block device.

    Guarantees a front end may rely on:

    * ``write``/``trim``/``write_zeroes`` return only once the data is held by
      the device (in replicated sync mode: by every copy); with ``fua=True``
      once it is durable.
    * ``flush`` returns once every write that completed before ``flush`` was
      called is durable.
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
