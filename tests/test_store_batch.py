"""Group commit for writes: AsyncStore.apply batches concurrent writes."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from geoclus.errors import StoreError
from replicator.store import AsyncStore, FileStore, StoreOp


def make_store(tmp_path, size: int = 1 << 20, inline_write_max_bytes: int = 0) -> AsyncStore:
    # Inline writes off by default: these tests are about the worker batches.
    return AsyncStore(
        FileStore(str(tmp_path / "s.img"), size), inline_write_max_bytes=inline_write_max_bytes
    )


async def test_concurrent_writes_share_worker_calls(tmp_path, monkeypatch) -> None:
    store = make_store(tmp_path)
    gate = threading.Event()
    calls: list[int] = []
    real = store.store.apply_ops

    def counting(ops):
        calls.append(len(ops))
        gate.wait(10)  # hold the first batch so the others queue up
        real(ops)

    monkeypatch.setattr(store.store, "apply_ops", counting)
    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(store.apply, StoreOp("write", i * 4096, 4096, bytes([i + 1]) * 4096))
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert sum(calls) == 40
    assert len(calls) < 40  # batched: fewer worker calls than writes
    assert calls[0] == 1 and max(calls) > 1
    for i in range(40):  # every write landed where it was meant to
        assert store.store.read(i * 4096, 4096) == bytes([i + 1]) * 4096
    store.close()


async def test_batch_error_reaches_every_write_and_poisons(tmp_path, monkeypatch) -> None:
    store = make_store(tmp_path)
    gate = threading.Event()
    n_calls = 0

    def failing(ops):
        nonlocal n_calls
        n_calls += 1
        gate.wait(10)
        raise StoreError("injected EIO")

    monkeypatch.setattr(store.store, "apply_ops", failing)
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            await store.apply(StoreOp("write", i * 512, 512, b"x" * 512))
        except StoreError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert len(errors) == 8  # nobody is told its write succeeded
    with pytest.raises(StoreError, match="no longer trusted"):
        await store.apply(StoreOp("write", 0, 512, b"y" * 512))
    store.close()


async def test_zeroes_trim_and_fua_in_a_batch(tmp_path) -> None:
    store = make_store(tmp_path)
    await store.apply(StoreOp("write", 0, 8192, b"\xff" * 8192))
    async with trio.open_nursery() as n:
        n.start_soon(store.apply, StoreOp("zeroes", 0, 4096, fua=True))
        n.start_soon(store.apply, StoreOp("trim", 4096, 4096))
        n.start_soon(store.apply, StoreOp("write", 65536, 512, b"\x01" * 512, fua=True))
    assert store.store.read(0, 8192) == bytes(8192)
    assert store.store.read(65536, 512) == b"\x01" * 512
    store.close()


# --- inline writes: small non-FUA writes on the event loop ----------------------------


def _no_worker(ops):
    raise AssertionError(f"worker call for {[(op.kind, op.length, op.fua) for op in ops]}")


async def test_small_plain_write_is_inline_and_complete_on_return(tmp_path, monkeypatch) -> None:
    store = make_store(tmp_path, inline_write_max_bytes=8192)
    monkeypatch.setattr(store.store, "apply_ops", _no_worker)
    await store.apply(StoreOp("write", 4096, 8192, b"\x07" * 8192))
    # Complete when apply returned: in the file, with no worker involved.
    assert store.store.read(4096, 8192) == b"\x07" * 8192
    assert store.inline_writes == 1
    assert store._workers is None
    store.close()


async def test_fua_large_zeroes_and_trim_never_inline(tmp_path, monkeypatch) -> None:
    store = make_store(tmp_path, inline_write_max_bytes=8192)
    calls: list[tuple[str, int, bool]] = []
    real = store.store.apply_ops

    def recording(ops):
        calls.extend((op.kind, op.length, op.fua) for op in ops)
        real(ops)

    monkeypatch.setattr(store.store, "apply_ops", recording)
    await store.apply(StoreOp("write", 0, 4096, b"\x01" * 4096, fua=True))
    await store.apply(StoreOp("write", 0, 16384, b"\x02" * 16384))
    await store.apply(StoreOp("zeroes", 0, 4096))
    await store.apply(StoreOp("trim", 4096, 4096))
    assert calls == [
        ("write", 4096, True),
        ("write", 16384, False),
        ("zeroes", 4096, False),
        ("trim", 4096, False),
    ]
    assert store.inline_writes == 0
    assert store.store.read(0, 8192) == bytes(8192)
    assert store.store.read(8192, 8192) == b"\x02" * 8192
    store.close()


async def test_failed_inline_write_poisons_the_store(tmp_path, monkeypatch) -> None:
    store = make_store(tmp_path, inline_write_max_bytes=4096)

    def eio(*args):
        raise StoreError("injected EIO")

    monkeypatch.setattr(store.store, "_pwrite_all", eio)
    with pytest.raises(StoreError, match="injected"):
        await store.apply(StoreOp("write", 0, 512, b"x" * 512))
    monkeypatch.undo()
    with pytest.raises(StoreError, match="no longer trusted"):
        await store.apply(StoreOp("write", 512, 512, b"y" * 512))
    with pytest.raises(StoreError, match="no longer trusted"):
        await store.flush()
    store.close()


async def test_slow_inline_write_backs_off_to_the_workers(tmp_path, monkeypatch) -> None:
    import replicator.store as store_module

    store = make_store(tmp_path, inline_write_max_bytes=4096)
    worker_calls: list[int] = []
    real = store.store.apply_ops

    def recording(ops):
        worker_calls.append(len(ops))
        real(ops)

    monkeypatch.setattr(store.store, "apply_ops", recording)
    monkeypatch.setattr(store_module, "INLINE_WRITE_SLOW_S", -1.0)  # every write is "slow"
    await store.apply(StoreOp("write", 0, 512, b"a" * 512))
    assert (store.inline_writes, store.inline_backoffs, worker_calls) == (1, 1, [])
    # Backing off: the next writes go through the workers.
    await store.apply(StoreOp("write", 512, 512, b"b" * 512))
    await store.apply(StoreOp("write", 1024, 512, b"c" * 512))
    assert (store.inline_writes, worker_calls) == (1, [1, 1])
    # Once the period is over, inline again.
    store._inline_off_until = 0.0
    await store.apply(StoreOp("write", 1536, 512, b"d" * 512))
    assert (store.inline_writes, worker_calls) == (2, [1, 1])
    assert store.store.read(0, 2048) == b"a" * 512 + b"b" * 512 + b"c" * 512 + b"d" * 512
    store.close()


async def test_flush_after_an_inline_write_syncs_after_it(tmp_path, monkeypatch) -> None:
    """Group commit with inline writes: a flush requested after an inline write
    completed waits for an fdatasync that started after that write, even when
    one was already running (it may have started before the write)."""
    store = make_store(tmp_path, inline_write_max_bytes=4096)
    events: list[str] = []
    gate = threading.Event()
    real_write, real_sync = store.store._pwrite_all, store.store.fdatasync

    def write(*args):
        events.append("write")
        real_write(*args)

    def sync():
        events.append("sync-start")
        if events.count("sync-start") == 1:
            gate.wait(10)  # the first sync is running while the write happens
        real_sync()
        events.append("sync-done")

    monkeypatch.setattr(store.store, "_pwrite_all", write)
    monkeypatch.setattr(store.store, "fdatasync", sync)
    flushed: list[str] = []

    async def flush(tag: str) -> None:
        await store.flush()
        flushed.append(tag)

    async with trio.open_nursery() as n:
        n.start_soon(flush, "early")
        with trio.fail_after(10):
            while not events:  # the worker thread has started the first sync
                await trio.sleep(0.001)
        assert events == ["sync-start"]
        await store.apply(StoreOp("write", 0, 4096, b"z" * 4096))
        n.start_soon(flush, "late")
        await trio.testing.wait_all_tasks_blocked()
        assert flushed == []
        gate.set()
    assert flushed == ["early", "late"]
    # The late flush was served by a sync that started after the write.
    assert events == ["sync-start", "write", "sync-done", "sync-start", "sync-done"]
    store.close()
