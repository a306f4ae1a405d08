"""Backing stores (replicator/store.py): FileStore checked with os-level reads
of the file, AsyncStore's group commit and poisoning with a blocking
``fdatasync`` stand-in."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import trio
import trio.testing

from geoclus.errors import IOAlignmentError, StoreError
from replicator import store as store_mod
from replicator.store import AsyncStore, FileStore

BS = 4096
SIZE = 64 * BS


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


@pytest.fixture
def store(tmp_path):
    s = FileStore(str(tmp_path / "vol.img"), SIZE, BS)
    yield s
    s.close()


# ------------------------------------------------------------------- opening


def test_creates_missing_file_sized_and_private(tmp_path) -> None:
    path = tmp_path / "new.img"
    s = FileStore(str(path), SIZE, BS)
    try:
        st = os.stat(path)
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == SIZE
        assert file_bytes(path) == bytes(SIZE)
        assert s.info.created is True
        assert s.info.is_block_device is False
        assert (s.size_bytes, s.block_size) == (SIZE, BS)
    finally:
        s.close()


def test_opens_existing_file_of_the_right_size(tmp_path) -> None:
    path = tmp_path / "old.img"
    content = pattern(SIZE)
    path.write_bytes(content)
    s = FileStore(str(path), SIZE, BS)
    try:
        assert s.info.created is False
        assert s.read(0, SIZE) == content
    finally:
        s.close()


@pytest.mark.parametrize("actual", [SIZE - BS, SIZE + BS, 0])
def test_refuses_to_resize_an_existing_file(tmp_path, actual) -> None:
    path = tmp_path / "old.img"
    content = pattern(actual)
    path.write_bytes(content)
    with pytest.raises(StoreError) as info:
        FileStore(str(path), SIZE, BS)
    assert "refusing" in str(info.value)
    assert file_bytes(path) == content


@pytest.mark.parametrize("block_size", [0, 256, 511, 513, 1000, 4095, -4096])
def test_refuses_bad_block_sizes(tmp_path, block_size) -> None:
    with pytest.raises(StoreError, match="block size"):
        FileStore(str(tmp_path / "v.img"), SIZE, block_size)
    assert not (tmp_path / "v.img").exists()


@pytest.mark.parametrize("size", [0, -BS, BS + 512])
def test_refuses_bad_sizes(tmp_path, size) -> None:
    with pytest.raises(StoreError, match="size"):
        FileStore(str(tmp_path / "v.img"), size, BS)
    assert not (tmp_path / "v.img").exists()


def test_refuses_missing_parent_directory(tmp_path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        FileStore(str(tmp_path / "nope" / "v.img"), SIZE, BS)
    assert not (tmp_path / "nope").exists()


def test_refuses_a_directory(tmp_path) -> None:
    with pytest.raises(StoreError, match="neither a regular file"):
        FileStore(str(tmp_path), SIZE, BS)


# ---------------------------------------------------------------- read/write


def test_write_read_round_trip(store) -> None:
    a, b = pattern(BS, 3), pattern(3 * BS, 5)
    store.write(BS, a)
    store.write(10 * BS, memoryview(b))
    assert store.read(BS, BS) == a
    assert store.read(10 * BS, 3 * BS) == b
    raw = file_bytes(store.info.path)
    assert raw[BS : 2 * BS] == a
    assert raw[10 * BS : 13 * BS] == b
    assert raw[:BS] == bytes(BS)
    assert raw[2 * BS : 10 * BS] == bytes(8 * BS)
    assert store.read(0, 0) == b""


def test_fua_write_lands_in_the_file(store) -> None:
    data = pattern(2 * BS, 9)
    store.write(4 * BS, data, fua=True)
    assert file_bytes(store.info.path)[4 * BS : 6 * BS] == data
    assert store.read(4 * BS, 2 * BS) == data


BAD_RANGES = [
    (1, BS),  # misaligned offset
    (BS, 100),  # misaligned length
    (512, BS),  # 512-aligned, but the block size is 4096
    (SIZE, BS),  # starts at the end
    (SIZE - BS, 2 * BS),  # runs past the end
    (-BS, BS),  # negative offset
]


@pytest.mark.parametrize(("offset", "length"), BAD_RANGES)
def test_bad_ranges_change_nothing(store, offset, length) -> None:
    store.write(0, pattern(SIZE, 2))
    before = file_bytes(store.info.path)
    with pytest.raises(IOAlignmentError):
        store.write(offset, b"\xff" * length)
    with pytest.raises(IOAlignmentError):
        store.write(offset, b"\xff" * length, fua=True)
    with pytest.raises(IOAlignmentError):
        store.read(offset, length)
    with pytest.raises(IOAlignmentError):
        store.write_zeroes(offset, length)
    with pytest.raises(IOAlignmentError):
        store.write_zeroes(offset, length, punch=True)
    assert file_bytes(store.info.path) == before


def test_negative_length_refused(store) -> None:
    with pytest.raises(IOAlignmentError):
        store.read(0, -BS)


def test_write_many_applies_in_order(store) -> None:
    a, b, c = (bytes([x]) * BS for x in (1, 2, 3))
    store.write_many([(0, a), (BS, b), (0, c)])
    raw = file_bytes(store.info.path)
    assert raw[:BS] == c  # the later write to block 0 wins
    assert raw[BS : 2 * BS] == b


@pytest.mark.parametrize("bad_index", [0, 1, 2])
def test_write_many_with_one_bad_range_writes_nothing(store, bad_index) -> None:
    before = file_bytes(store.info.path)
    writes = [(0, b"\x01" * BS), (2 * BS, b"\x02" * BS), (5 * BS, b"\x03" * BS)]
    writes[bad_index] = (SIZE, b"\x04" * BS)
    with pytest.raises(IOAlignmentError):
        store.write_many(writes)
    assert file_bytes(store.info.path) == before


@pytest.mark.parametrize("punch", [False, True])
def test_write_zeroes_reads_back_zeros(store, punch) -> None:
    full = pattern(SIZE, 4)
    store.write(0, full)
    store.write_zeroes(3 * BS, 5 * BS, punch=punch)
    raw = file_bytes(store.info.path)
    assert len(raw) == SIZE
    assert raw[3 * BS : 8 * BS] == bytes(5 * BS)
    assert raw[: 3 * BS] == full[: 3 * BS]
    assert raw[8 * BS :] == full[8 * BS :]
    assert store.read(3 * BS, 5 * BS) == bytes(5 * BS)
    store.write_zeroes(0, 0, punch=punch)  # empty range: nothing happens
    assert file_bytes(store.info.path) == raw


def test_punch_deallocates_blocks(store, monkeypatch) -> None:
    results = []
    real = store_mod._fallocate

    def spy(fd, mode, offset, length):
        results.append(real(fd, mode, offset, length))
        return results[-1]

    monkeypatch.setattr(store_mod, "_fallocate", spy)
    store.write(0, pattern(SIZE, 6))
    store.fdatasync()
    allocated = os.stat(store.info.path).st_blocks
    assert allocated * 512 >= SIZE
    store.write_zeroes(0, 32 * BS, punch=True)
    if results != [True]:
        pytest.skip("this filesystem cannot punch holes (zeros were written instead)")
    after = os.stat(store.info.path).st_blocks
    assert after * 512 <= allocated * 512 - 32 * BS
    assert os.stat(store.info.path).st_size == SIZE


def test_write_zeroes_without_fallocate_writes_zero_chunks(store, monkeypatch) -> None:
    calls = []

    def no_fallocate(fd, mode, offset, length):
        calls.append((mode, offset, length))
        return False

    monkeypatch.setattr(store_mod, "_fallocate", no_fallocate)
    monkeypatch.setattr(store_mod, "_ZERO_CHUNK_BYTES", 3 * BS)  # several chunks, a short last
    full = pattern(SIZE, 8)
    store.write(0, full)
    store.write_zeroes(BS, 10 * BS, punch=True)
    raw = file_bytes(store.info.path)
    assert calls == [(0x02 | 0x01, BS, 10 * BS)]
    assert raw[BS : 11 * BS] == bytes(10 * BS)
    assert raw[:BS] == full[:BS]
    assert raw[11 * BS :] == full[11 * BS :]


def test_fdatasync_os_error_becomes_store_error(store, monkeypatch) -> None:
    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_mod.os, "fdatasync", failing)
    with pytest.raises(StoreError, match="fdatasync failed"):
        store.fdatasync()


def test_close_is_idempotent(tmp_path) -> None:
    s = FileStore(str(tmp_path / "v.img"), SIZE, BS)
    fd = s._fd
    s.close()
    s.close()  # a second close neither raises nor closes someone else's fd
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor really is closed


# ---------------------------------------------------------------- AsyncStore


class BlockingSync:
    """Stands in for FileStore.fdatasync: counts calls, records events, and
    blocks the worker thread until the test opens that call's gate."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.calls = 0
        self.events: list[str] = []
        self.entered = [threading.Event() for _ in range(10)]
        self.gates = [threading.Event() for _ in range(10)]
        self.fail_on = fail_on or set()
        self.lock = threading.Lock()

    def __call__(self, _store: FileStore) -> None:
        with self.lock:
            self.calls += 1
            n = self.calls
        self.events.append(f"sync{n} start")
        self.entered[n].set()
        assert self.gates[n].wait(10), "test never released the sync"
        self.events.append(f"sync{n} end")
        if n in self.fail_on:
            raise StoreError(f"injected failure of sync {n}")

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(FileStore, "fdatasync", lambda store: self(store))

    async def wait_entered(self, n: int) -> None:
        assert await trio.to_thread.run_sync(self.entered[n].wait, 10)


@pytest.fixture
def astore(tmp_path):
    s = AsyncStore(FileStore(str(tmp_path / "vol.img"), SIZE, BS))
    yield s
    s.close()


async def test_async_read_write_round_trip(astore) -> None:
    data = pattern(2 * BS, 11)
    await astore.write(2 * BS, data)
    await astore.write_many([(6 * BS, b"\x05" * BS)])
    await astore.write_zeroes(3 * BS, BS)
    await astore.flush()
    assert await astore.read(2 * BS, BS) == data[:BS]
    raw = file_bytes(astore.store.info.path)
    assert raw[3 * BS : 4 * BS] == bytes(BS)
    assert raw[6 * BS : 7 * BS] == b"\x05" * BS
    with pytest.raises(IOAlignmentError):
        await astore.write(1, b"x" * BS)
    with pytest.raises(IOAlignmentError):
        await astore.read(SIZE, BS)
    with pytest.raises(IOAlignmentError):
        await astore.write_zeroes(0, 1)


async def test_sequential_flushes_each_run_a_sync(astore, monkeypatch) -> None:
    count = 0
    real = FileStore.fdatasync

    def counting(self):
        nonlocal count
        count += 1
        real(self)

    monkeypatch.setattr(FileStore, "fdatasync", counting)
    for _ in range(3):
        await astore.flush()
    assert count == 3
    assert astore.statistics() == {"fdatasyncs": 3, "flush_requests": 3}


async def test_group_commit_serves_many_flushes_with_few_syncs(astore, monkeypatch) -> None:
    sync = BlockingSync()
    sync.install(monkeypatch)
    done = []

    async def flusher(i: int) -> None:
        await astore.flush()
        done.append(i)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher, 0)
            await sync.wait_entered(1)
            for i in range(1, 20):
                nursery.start_soon(flusher, i)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []
            sync.gates[1].set()
            await sync.wait_entered(2)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [0]  # only the flush that was waiting before sync 1 started
            sync.gates[2].set()
    assert sorted(done) == list(range(20))
    assert sync.calls == 2  # 20 flushes, 2 fdatasyncs
    assert astore.statistics() == {"fdatasyncs": 2, "flush_requests": 20}


async def test_flush_requested_during_a_sync_waits_for_a_later_one(astore, monkeypatch) -> None:
    sync = BlockingSync()
    sync.install(monkeypatch)
    log = sync.events

    async def flusher(name: str) -> None:
        await astore.flush()
        log.append(f"{name} done")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher, "A")
            await sync.wait_entered(1)
            # The write completes while sync 1 runs; sync 1 may not cover it.
            await astore.write(0, b"\x07" * BS)
            nursery.start_soon(flusher, "B")
            await trio.testing.wait_all_tasks_blocked()
            sync.gates[1].set()
            await sync.wait_entered(2)
            await trio.testing.wait_all_tasks_blocked()
            assert "B done" not in log
            sync.gates[2].set()
    assert log == ["sync1 start", "sync1 end", "A done", "sync2 start", "sync2 end", "B done"]


async def test_failed_sync_poisons_the_store(astore, monkeypatch) -> None:
    sync = BlockingSync(fail_on={1})
    sync.install(monkeypatch)
    results: dict[str, BaseException | None] = {}

    async def flusher(name: str) -> None:
        try:
            await astore.flush()
            results[name] = None
        except StoreError as exc:
            results[name] = exc

    await astore.write(0, b"\x01" * BS)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher, "first")
            await sync.wait_entered(1)
            nursery.start_soon(flusher, "waiting")
            await trio.testing.wait_all_tasks_blocked()
            sync.gates[1].set()
    assert isinstance(results["first"], StoreError)
    assert "injected" in str(results["first"])
    assert isinstance(results["waiting"], StoreError)
    assert sync.calls == 1  # the waiting flush did not trust a new sync

    before = file_bytes(astore.store.info.path)
    for _ in range(2):
        with pytest.raises(StoreError, match="no longer trusted"):
            await astore.flush()
    with pytest.raises(StoreError):
        await astore.write(BS, b"\x02" * BS)
    with pytest.raises(StoreError):
        await astore.write(BS, b"\x02" * BS, fua=True)
    with pytest.raises(StoreError):
        await astore.write_many([(BS, b"\x02" * BS)])
    with pytest.raises(StoreError):
        await astore.write_zeroes(0, BS)
    assert sync.calls == 1
    assert file_bytes(astore.store.info.path) == before
