"""Group commit for writes: AsyncStore.apply batches concurrent writes."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from geoclus.errors import StoreError
from replicator.store import AsyncStore, FileStore, StoreOp


def make_store(tmp_path, size: int = 1 << 20) -> AsyncStore:
    return AsyncStore(FileStore(str(tmp_path / "s.img"), size))


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
