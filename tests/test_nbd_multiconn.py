"""NBD_FLAG_CAN_MULTI_CONN: several connections to one export share one device,
so a flush on any connection covers writes completed on every connection, and a
read on one connection sees writes completed on another. Checked on a store whose
``fdatasync`` records what the file held when it ran, and on a real replicated
volume pair in sync mode (the flush also covers the peer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from geoclus.nbd import NbdServer
from geoclus.nbd import proto as p
from replicator.frames import Mode
from replicator.memory import MemoryDevice
from replicator.session import ReplicationPolicy
from replicator.store import AsyncStore, FileStore
from tests.test_nbd_server import StoreDevice, open_client, open_extended, start
from tests.test_volume import open_pair

KiB = 1024
MiB = 1024 * KiB


class RecordingStore(FileStore):
    """A FileStore whose fdatasync snapshots ``watch`` (offset, length) first:
    what the file held when the sync started is what that sync made durable."""

    watch = (0, 4096)

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.synced: list[bytes] = []

    def fdatasync(self) -> None:
        offset, length = self.watch
        self.synced.append(self.read(offset, length))
        super().fdatasync()


@pytest.fixture
async def recorded(nursery: trio.Nursery, tmp_path: Path):
    device = StoreDevice(str(tmp_path / "unused.img"), MiB)
    device.store.close()
    store = RecordingStore(str(tmp_path / "export.img"), 4 * MiB, 512)
    store.watch = (64 * KiB, 64 * KiB)
    device.store = AsyncStore(store)
    sock = str(tmp_path / "nbd.sock")
    await start(nursery, NbdServer({"vol": device}, unix_path=sock))
    yield sock, store
    device.close()


async def test_multi_conn_is_advertised_for_writable_and_read_only_exports(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sock = str(tmp_path / "nbd.sock")
    devices = {"vol": MemoryDevice(MiB), "ro": MemoryDevice(MiB, read_only=True)}
    await start(nursery, NbdServer(devices, unix_path=sock))
    for export in ("vol", "ro"):
        c = await open_client(sock, export)
        assert c.flags & p.NBD_FLAG_CAN_MULTI_CONN
        assert bool(c.flags & p.NBD_FLAG_READ_ONLY) == (export == "ro")
        await c.aclose()


async def test_flush_on_one_connection_covers_writes_of_another(recorded) -> None:
    sock, store = recorded
    writer = await open_client(sock)
    flusher = await open_extended(sock, contexts=False)  # and a structured client
    data = os.urandom(64 * KiB)
    assert await writer.call(p.NBD_CMD_WRITE, 64 * KiB, len(data), payload=data) == (0, b"")
    assert store.synced == []  # no flush yet: nothing promised durable
    await flusher.send(p.NBD_CMD_FLUSH, 7)
    assert await flusher.structured() == (7, [(p.NBD_REPLY_TYPE_NONE, b"")])
    # The sync that answered the other connection's flush started after the
    # write completed, so it covered it.
    assert store.synced == [data]
    await flusher.send(p.NBD_CMD_READ, 8, 64 * KiB, len(data))
    assert await flusher.structured() == (
        8,
        [(p.NBD_REPLY_TYPE_OFFSET_DATA, (64 * KiB).to_bytes(8, "big") + data)],
    )
    for c in (writer, flusher):
        await c.aclose()


async def test_pipelined_writes_then_flush_elsewhere(recorded) -> None:
    sock, store = recorded
    a = await open_client(sock)
    b = await open_client(sock)
    blocks = {i: os.urandom(4096) for i in range(16)}
    for i, block in blocks.items():
        await a.send(p.NBD_CMD_WRITE, i, 64 * KiB + i * 4096, 4096, payload=block)
    assert sorted([(await a.reply())[:2] for _ in blocks]) == [(i, 0) for i in blocks]
    assert await b.call(p.NBD_CMD_FLUSH) == (0, b"")
    assert store.synced[-1] == b"".join(blocks[i] for i in range(16))
    assert await b.call(p.NBD_CMD_READ, 64 * KiB, 64 * KiB) == (0, store.synced[-1])
    for c in (a, b):
        await c.aclose()


async def test_replicated_volume_two_connections(tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    async with trio.open_nursery() as nursery:
        a, b, _ = await open_pair(tmp_path, nursery, ReplicationPolicy(mode=Mode.SYNC))
        await start(nursery, NbdServer({"v": a}, unix_path=sock))
        one = await open_client(sock, "v")
        two = await open_client(sock, "v")
        assert one.flags & two.flags & p.NBD_FLAG_CAN_MULTI_CONN
        data = os.urandom(32 * KiB)
        assert await one.call(p.NBD_CMD_WRITE, 128 * KiB, len(data), payload=data) == (0, b"")
        assert await two.call(p.NBD_CMD_FLUSH) == (0, b"")
        # The flush on the second connection made the first one's write durable
        # here and on the peer (sync mode: the flush waits for the peer's sync).
        assert b.secondary is not None
        assert a.primary is not None and b.secondary.durable_seq == a.primary.last_seq >= 1
        assert await two.call(p.NBD_CMD_READ, 128 * KiB, len(data)) == (0, data)
        # and the other way round
        other = os.urandom(4096)
        assert await two.call(p.NBD_CMD_WRITE, 0, 4096, payload=other) == (0, b"")
        assert await one.call(p.NBD_CMD_READ, 0, 4096) == (0, other)
        assert await one.call(p.NBD_CMD_FLUSH) == (0, b"")
        assert b.secondary.durable_seq == a.primary.last_seq
        for c in (one, two):
            await c.aclose()
        nursery.cancel_scope.cancel()
