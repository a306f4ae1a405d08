"""Backing stores: a file (created and sized if missing) or an existing block device.

:class:`FileStore` does blocking system calls and is meant to be called from a
worker thread. :class:`AsyncStore` is its trio shell: every system call runs in a
worker thread (never on the event-loop thread), and :meth:`AsyncStore.flush`
is a *group commit*: one ``fdatasync`` covers every write completed before it
was requested, however many flushes were waiting.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from geoclus.errors import IOAlignmentError, StoreError
from replicator.worker import BlockingWorkers

T = TypeVar("T")

# Keep in step with the kernel's UAPI; Python exposes no constants for these.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKGETSIZE64 = 0x80081272

# Zero-filling falls back to plain writes in chunks of this size, so a huge
# WRITE_ZEROES on a filesystem without fallocate never allocates a huge buffer.
_ZERO_CHUNK_BYTES = 1024 * 1024


def check_range(offset: int, length: int, size_bytes: int, block_size: int) -> None:
    """Raise :class:`IOAlignmentError` unless ``[offset, offset+length)`` is aligned
    to ``block_size`` and lies inside ``[0, size_bytes)``. A zero length is allowed."""
    if offset < 0 or length < 0:
        raise IOAlignmentError(f"negative offset {offset} or length {length}")
    if offset % block_size or length % block_size:
        raise IOAlignmentError(
            f"offset {offset} and length {length} must be multiples of the "
            f"{block_size}-byte block size"
        )
    if offset + length > size_bytes:
        raise IOAlignmentError(
            f"range {offset}+{length} ends past the end of the volume ({size_bytes} bytes)"
        )


@dataclass
class StoreOp:
    """One write for :meth:`AsyncStore.apply`: ``kind`` is ``write`` (with
    ``data``), ``zeroes`` or ``trim``; ``fua`` makes it durable before it
    completes."""

    kind: str
    offset: int
    length: int
    data: bytes = b""
    fua: bool = False
    done: trio.Event | None = None
    lead: bool = False
    error: BaseException | None = None


# Writes applied by one worker call at most (bounds a batch's time and size).
MAX_WRITE_BATCH = 64

# Plain (non-FUA) writes up to this size are applied by :meth:`AsyncStore.apply`
# on the event loop itself, a buffered pwrite() into the page cache: a thread
# hop costs several times what such a write does. 0 turns this off.
INLINE_WRITE_MAX_BYTES = 64 * 1024
# A buffered write can still block (dirty-page throttling, a page under
# writeback, block allocation): an inline write that took longer than this
# sends every write through the worker threads for INLINE_BACKOFF_S.
INLINE_WRITE_SLOW_S = 0.002
INLINE_BACKOFF_S = 1.0


@dataclass(frozen=True)
class StoreInfo:
    """What a store is: its path, size in bytes, block size, and whether it is a
    block device and whether this open created it (a new file is all zeros)."""

    path: str
    size_bytes: int
    block_size: int
    is_block_device: bool
    created: bool


class FileStore:
    """A volume image on a file or block device. Blocking; call from a thread.

    Guarantees: every read/write is range- and alignment-checked before any
    system call (a refused request changes nothing); ``write(..., fua=True)``
    returns only once that data is durable (``RWF_DSYNC``); ``fdatasync``
    makes every write that returned before it durable.
    """

    def __init__(self, path: str, size_bytes: int, block_size: int = 512) -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise StoreError(f"block size {block_size} must be a power of two >= 512")
        if size_bytes <= 0 or size_bytes % block_size:
            raise StoreError(
                f"volume size {size_bytes} must be a positive multiple of {block_size} bytes"
            )
        created = False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise StoreError(f"cannot stat store {path}: {exc.strerror}") from exc
        is_bdev = st is not None and stat.S_ISBLK(st.st_mode)
        if st is not None and not is_bdev and not stat.S_ISREG(st.st_mode):
            raise StoreError(f"store {path} is neither a regular file nor a block device")
        try:
            if st is None:
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    raise StoreError(
                        f"cannot create store {path}: directory {parent} does not exist"
                    )
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created = True
                os.ftruncate(fd, size_bytes)
                os.fsync(fd)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot open store {path}: {exc.strerror}") from exc
        self._fd = fd
        try:
            actual = self._device_size() if is_bdev else os.fstat(fd).st_size
            if actual < size_bytes:
                if is_bdev:
                    raise StoreError(
                        f"block device {path} holds {actual} bytes, "
                        f"less than the configured {size_bytes}"
                    )
                raise StoreError(
                    f"store file {path} holds {actual} bytes but the volume is {size_bytes}; "
                    "refusing to grow an existing store (fix the configured size or the file)"
                )
            if not is_bdev and actual > size_bytes:
                raise StoreError(
                    f"store file {path} holds {actual} bytes, more than the configured "
                    f"{size_bytes}; refusing to shrink it (fix the configured size)"
                )
        except BaseException:
            os.close(fd)
            raise
        self.info = StoreInfo(path, size_bytes, block_size, is_bdev, created)
        self._closed = False
        self._nowait_ok = hasattr(os, "RWF_NOWAIT")

    def _device_size(self) -> int:
        import fcntl
        import struct

        buf = fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])

    @property
    def size_bytes(self) -> int:
        return self.info.size_bytes

    @property
    def block_size(self) -> int:
        return self.info.block_size

    def check(self, offset: int, length: int) -> None:
        """Raise :class:`IOAlignmentError` if the range is misaligned or out of range."""
        check_range(offset, length, self.info.size_bytes, self.info.block_size)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` (short reads are retried)."""
        self.check(offset, length)
        try:
            data = os.pread(self._fd, length, offset)
            if len(data) == length:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    raise StoreError(f"short read at {offset + got} in {self.info.path}")
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise StoreError(f"read failed at {offset} in {self.info.path}: {exc}") from exc

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """Read from the page cache without ever blocking (``RWF_NOWAIT``).

        Returns None if the data is not all cached (or the kernel cannot tell);
        the caller then reads from a worker thread. Safe on the event loop.
        """
        buf = self.read_nowait_buffer(offset, length)
        return None if buf is None else bytes(buf)

    def read_nowait_buffer(self, offset: int, length: int) -> bytearray | None:
        """:meth:`read_nowait` into a new bytearray the caller owns (no copy
        to ``bytes``, which costs as much as the read for large ranges)."""
        if not self._nowait_ok:
            return None
        self.check(offset, length)
        buf = bytearray(length)
        try:
            n = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait_ok = False
                return None
            raise StoreError(f"read failed at {offset} in {self.info.path}: {exc}") from exc
        return buf if n == length else None

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` durable before returning."""
        self.check(offset, len(data))
        self._pwrite_all(offset, data, os.RWF_DSYNC if fua else 0)

    def _pwrite_all(self, offset: int, data: bytes | memoryview, flags: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = (
                    os.pwritev(self._fd, [view], offset, flags)
                    if flags
                    else os.pwrite(self._fd, view, offset)
                )
                view = view[n:]
                offset += n
        except OSError as exc:
            raise StoreError(f"write failed at {offset} in {self.info.path}: {exc}") from exc

    def write_many(self, writes: Sequence[tuple[int, bytes | memoryview]]) -> None:
        """Apply ``writes`` strictly in the given order (used by the secondary).

        Every range is checked first: if any is bad, nothing is written.
        """
        for offset, data in writes:
            self.check(offset, len(data))
        for offset, data in writes:
            self._pwrite_all(offset, data, 0)

    def apply_ops(self, ops: Sequence[StoreOp]) -> None:
        """Apply independent writes in order in one call (one thread hop for a
        whole batch). Every range is checked first; an I/O error stops the
        batch and is raised (the caller treats the store as failed)."""
        for op in ops:
            self.check(op.offset, op.length)
        for op in ops:
            if op.kind == "write":
                self._pwrite_all(op.offset, op.data, os.RWF_DSYNC if op.fua else 0)
            else:
                self.write_zeroes(op.offset, op.length, punch=op.kind == "trim")
                if op.fua:
                    self.fdatasync()

    def write_zeroes(self, offset: int, length: int, punch: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeros; with ``punch`` (TRIM) a
        regular file's blocks are deallocated."""
        self.check(offset, length)
        if length == 0:
            return
        if not self.info.is_block_device:
            mode = (
                (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE) if punch else _FALLOC_FL_ZERO_RANGE
            )
            if _fallocate(self._fd, mode, offset, length):
                return
        zero = bytes(min(length, _ZERO_CHUNK_BYTES))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self._pwrite_all(offset, memoryview(zero)[:n], 0)
            offset += n

    def extents(self, offset: int, length: int, max_extents: int = 1024) -> list[tuple[int, int]]:
        """Allocation of ``[offset, offset+length)``: consecutive ``(length,
        flags)`` extents from ``offset``, flags ``EXTENT_HOLE | EXTENT_ZERO`` for
        holes and 0 for data (see :class:`~replicator.device.SupportsBlockStatus`).

        A regular file is probed with ``lseek(SEEK_DATA/SEEK_HOLE)``, so TRIM
        (punched holes) and WRITE_ZEROES (on filesystems that leave unwritten
        extents) show as holes; boundaries are rounded to the block size with
        any partly allocated block counted as data. A block device, or a
        filesystem that cannot tell, reports everything as data. At most
        ``max_extents`` extents are returned (each costs two ``lseek`` calls;
        the bound keeps one call on a fragmented file short), covering a prefix
        of the range. Raises :class:`IOAlignmentError` for a bad range and
        :class:`StoreError` if ``lseek`` fails for another reason.
        """
        from replicator.device import EXTENT_HOLE, EXTENT_ZERO

        self.check(offset, length)
        if length == 0:
            return []
        if self.info.is_block_device:
            return [(length, 0)]
        block = self.info.block_size
        end = offset + length
        hole_flags = EXTENT_HOLE | EXTENT_ZERO
        out: list[tuple[int, int]] = []

        def add(n: int, flags: int) -> None:
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))

        def seek(pos: int, whence: int) -> int:
            """The next data (hole) start at or after ``pos``; ``end`` if none."""
            try:
                return min(os.lseek(self._fd, pos, whence), end)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data between pos and end of file
                    return end
                raise StoreError(
                    f"cannot probe allocation at {pos} in {self.info.path}: {exc}"
                ) from exc

        pos = offset
        while pos < end and len(out) < max_extents:
            data = seek(pos, os.SEEK_DATA)
            data -= (data - offset) % block  # a partly allocated block is data
            if data > pos:
                add(data - pos, hole_flags)
                pos = data
                if pos == end:
                    break
            hole = seek(pos, os.SEEK_HOLE)
            hole = min(end, hole + (-(hole - offset)) % block)
            hole = max(hole, pos + block)  # always progress, even on odd answers
            add(hole - pos, 0)
            pos = hole
        return out

    def fdatasync(self) -> None:
        """Make every write that returned before this call durable."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError(f"fdatasync failed on {self.info.path}: {exc}") from exc

    def close(self) -> None:
        """Close the store (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Call fallocate(2) through libc; return False where unsupported."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise StoreError(f"fallocate failed at {offset}: {os.strerror(err)}")


_libc: Any = None


class AsyncStore:
    """Trio shell over a :class:`FileStore`.

    Every blocking system call runs in a worker thread (a dedicated
    :class:`~replicator.worker.BlockingWorkers` pool, created on first use),
    except ``RWF_NOWAIT`` reads, which cannot block, and small non-FUA writes
    of :meth:`apply` (up to ``inline_write_max_bytes``), buffered writes into
    the page cache that are cheaper than the thread hop; ``fdatasync``, FUA
    writes, zeroing and large writes always run in a worker. An inline write
    that turns out slow (``INLINE_WRITE_SLOW_S``: the kernel throttled or
    waited) switches inline writes off for ``INLINE_BACKOFF_S``, so a
    congested disk stalls the event loop at most once per period.
    :meth:`flush` is a group commit:
    a flush waits for the next ``fdatasync`` that *starts* after it was
    requested, and one ``fdatasync`` serves every flush waiting at that moment.

    A failed ``fdatasync`` poisons the store: Linux may drop the dirty pages and
    report success on the next call, so no later flush can be trusted. A failed
    write does too (the range's content is unknown). Every flush and write
    after that raises :class:`StoreError`.
    """

    def __init__(
        self,
        store: FileStore,
        io_threads: int = 4,
        inline_write_max_bytes: int = INLINE_WRITE_MAX_BYTES,
    ) -> None:
        self.store = store
        self.inline_write_max_bytes = inline_write_max_bytes
        self._inline_off_until = -math.inf
        self.inline_writes = 0
        self.inline_backoffs = 0
        self._sync_started = 0  # number of fdatasyncs started
        self._sync_done = 0  # number of fdatasyncs completed successfully
        self._syncing = False
        self._sync_finished = trio.Event()
        self._failed: StoreError | None = None
        self.flush_requests = 0
        self._workers: BlockingWorkers | None = None
        self.io_threads = io_threads
        self._ops: list[StoreOp] = []
        self._ops_busy = False

    def _run(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        if self._workers is None:
            self._workers = BlockingWorkers(self.io_threads, name="store")
        return self._workers.run(fn, *args)

    @property
    def size_bytes(self) -> int:
        return self.store.size_bytes

    @property
    def block_size(self) -> int:
        return self.store.block_size

    def _check_healthy(self) -> None:
        if self._failed is not None:
            raise StoreError(
                f"store {self.store.info.path} failed earlier and is no longer trusted "
                f"({self._failed}); stop the daemon and check the disk"
            )

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run another blocking call (metadata, bitmap) on the store's workers."""
        return await self._run(fn, *args)

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        """:meth:`FileStore.read_nowait_buffer`: the data (a new bytearray the
        caller owns) if it is all in the page cache, else None; never blocks
        (safe on the event loop). Raises :class:`IOAlignmentError` for a bad
        range."""
        return self.store.read_nowait_buffer(offset, length)

    async def read(self, offset: int, length: int) -> bytes:
        cached = self.store.read_nowait(offset, length)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached
        return await self._run(self.store.read, offset, length)

    async def _write_op(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a write; an I/O error poisons the store like a failed sync (the
        content of the range is unknown, so nothing after it can be trusted)."""
        self._check_healthy()
        try:
            await self._run(fn, *args)
        except StoreError as exc:
            self._failed = exc
            raise

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.store.check(offset, len(data))
        await self._write_op(self.store.write, offset, data, fua)

    async def apply(self, op: StoreOp) -> None:
        """Apply one independent write, batched with the writes that are ready
        at the same moment (group commit for writes: one worker call, one
        thread hop, for up to MAX_WRITE_BATCH of them).

        Leader/follower: a caller that finds no batch running applies the
        queue itself; when its batch completes it hands the lead to the next
        waiting caller, so nobody waits for more than one batch after its own.
        Callers must not submit overlapping writes concurrently (the volume's
        overlap rule already orders them).

        A non-FUA write of at most ``inline_write_max_bytes`` is written on the
        event loop instead (see the class docstring) and has completed when
        this returns, without a checkpoint; like any other, it may complete
        before writes submitted earlier that are still in a batch (they do not
        overlap it).
        """
        self._check_healthy()
        self.store.check(op.offset, op.length)
        if (
            op.length <= self.inline_write_max_bytes
            and op.kind == "write"
            and not op.fua
            and self._inline_allowed()
        ):
            self._write_inline(op)
            return
        op.done = trio.Event()
        self._ops.append(op)
        if self._ops_busy:
            await op.done.wait()
            if not op.lead:
                if op.error is not None:
                    raise op.error
                return
        await self._lead_batch(op)

    def _inline_allowed(self) -> bool:
        if self._inline_off_until < 0:
            return True
        if time.monotonic() < self._inline_off_until:
            return False
        self._inline_off_until = -math.inf
        return True

    def _write_inline(self, op: StoreOp) -> None:
        """Apply ``op`` (a small non-FUA write) on the calling thread; poison
        the store on an I/O error, back off from inline writes if it was slow."""
        t0 = time.monotonic()
        try:
            self.store._pwrite_all(op.offset, op.data, 0)
        except StoreError as exc:
            self._failed = exc
            raise
        self.inline_writes += 1
        t1 = time.monotonic()
        if t1 - t0 > INLINE_WRITE_SLOW_S:
            self.inline_backoffs += 1
            self._inline_off_until = t1 + INLINE_BACKOFF_S

    async def _lead_batch(self, own: StoreOp) -> None:
        self._ops_busy = True
        batch = self._ops[:MAX_WRITE_BATCH]
        del self._ops[:MAX_WRITE_BATCH]
        if not any(op is own for op in batch):  # a leader's op is first in line
            raise AssertionError("leader's write is not in its batch")
        error: BaseException | None = None
        try:
            await self._run(self.store.apply_ops, batch)
        except StoreError as exc:
            self._failed = exc
            error = exc
        finally:
            for op in batch:
                op.error = error
                op.lead = False
                if op is not own and op.done is not None:
                    op.done.set()
            if self._ops:
                nxt = self._ops[0]
                nxt.lead = True
                if nxt.done is not None:
                    nxt.done.set()
            else:
                self._ops_busy = False
        if error is not None:
            raise error

    async def write_many(self, writes: Sequence[tuple[int, bytes | memoryview]]) -> None:
        for offset, data in writes:
            self.store.check(offset, len(data))
        await self._write_op(self.store.write_many, writes)

    async def write_zeroes(self, offset: int, length: int, punch: bool = False) -> None:
        self.store.check(offset, length)
        await self._write_op(self.store.write_zeroes, offset, length, punch)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """:meth:`FileStore.extents` on a worker thread (range checked first,
        without a thread hop). Raises like it."""
        self.store.check(offset, length)
        return await self._run(self.store.extents, offset, length)

    async def flush(self) -> None:
        """Return once every write completed before this call is durable.

        Raises :class:`StoreError` if the ``fdatasync`` fails (then and forever after).
        """
        self.flush_requests += 1
        # A sync already running may have started before our writes completed,
        # so we need one that starts after now: number ``_sync_started + 1``.
        target = self._sync_started + 1
        while self._sync_done < target:
            self._check_healthy()
            if self._syncing:
                await self._sync_finished.wait()
                continue
            self._syncing = True
            self._sync_started += 1
            number = self._sync_started
            try:
                await self._run(self.store.fdatasync)
            except StoreError as exc:
                self._failed = exc
                raise
            else:
                self._sync_done = number
            finally:
                self._syncing = False
                finished, self._sync_finished = self._sync_finished, trio.Event()
                finished.set()
        self._check_healthy()

    def statistics(self) -> dict[str, int]:
        """``fdatasyncs`` run and ``flush_requests`` served (group commit ratio)."""
        return {"fdatasyncs": self._sync_done, "flush_requests": self.flush_requests}

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
        self.store.close()
