"""Allocation reporting end to end: FileStore/AsyncStore ``extents`` (lseek
SEEK_DATA/SEEK_HOLE on a real sparse file), MemoryDevice ``block_status``, the
server's NBD_CMD_BLOCK_STATUS and structured replies over a real socket, and real
clients reading the map (``nbdinfo --map``, ``qemu-img map``)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import trio

from geoclus.errors import IOAlignmentError, StoreError
from geoclus.nbd import NbdServer
from geoclus.nbd import proto as p
from replicator.device import EXTENT_HOLE, EXTENT_ZERO, SupportsBlockStatus
from replicator.memory import MemoryDevice
from replicator.store import AsyncStore, FileStore
from tests.test_nbd_interop import need, run
from tests.test_nbd_server import (
    Client,
    FaultyDevice,
    StoreDevice,
    descriptors,
    open_client,
    open_extended,
    start,
)

KiB = 1024
MiB = 1024 * KiB
HOLE = EXTENT_HOLE | EXTENT_ZERO  # how a sparse store reports a hole
DATA = 0


@pytest.fixture
def store(tmp_path: Path):
    s = FileStore(str(tmp_path / "vol.img"), 8 * MiB, 512)
    yield s
    s.close()


# --- FileStore.extents -----------------------------------------------------------------------


def test_new_store_is_one_hole(store: FileStore) -> None:
    assert store.extents(0, 8 * MiB) == [(8 * MiB, HOLE)]
    assert store.extents(4096, 512) == [(512, HOLE)]
    assert store.extents(0, 0) == []


def test_written_trimmed_and_zeroed_ranges(store: FileStore) -> None:
    store.write(MiB, b"d" * (256 * KiB))
    store.write(3 * MiB, b"t" * (512 * KiB))
    store.write_zeroes(3 * MiB, 512 * KiB, punch=True)  # what TRIM does
    assert store.extents(0, 8 * MiB) == [
        (MiB, HOLE),
        (256 * KiB, DATA),
        (8 * MiB - MiB - 256 * KiB, HOLE),
    ]
    # A sub-range starts at its own offset and stops at its own end.
    assert store.extents(MiB + 128 * KiB, 256 * KiB) == [(128 * KiB, DATA), (128 * KiB, HOLE)]
    assert store.read(3 * MiB, 512 * KiB) == bytes(512 * KiB)


def test_zeroed_range_is_a_hole_or_its_own_data_extent(store: FileStore) -> None:
    store.write(2 * MiB, b"z" * (64 * KiB))
    store.write_zeroes(2 * MiB, 64 * KiB)  # WRITE_ZEROES (no punch)
    (extent,) = [e for e in store.extents(0, 8 * MiB) if e[1] == DATA] or [(0, HOLE)]
    # Filesystems differ: ext4/xfs leave unwritten extents (a hole to SEEK_DATA),
    # others write zeros (data). Either way the bytes are zeros.
    assert extent[0] in (0, 64 * KiB)
    assert store.read(2 * MiB, 64 * KiB) == bytes(64 * KiB)


def test_partly_allocated_blocks_count_as_data(tmp_path: Path) -> None:
    # A 16 KiB block size larger than the filesystem's 4 KiB blocks: one 4 KiB
    # block of data inside the second store block makes that whole block data.
    s = FileStore(str(tmp_path / "big.img"), 64 * KiB, 16 * KiB)
    try:
        fd = os.open(s.info.path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 16 * KiB + 8 * KiB)
        finally:
            os.close(fd)
        assert s.extents(0, 64 * KiB) == [(16 * KiB, HOLE), (16 * KiB, DATA), (32 * KiB, HOLE)]
    finally:
        s.close()


def test_extents_are_bounded(store: FileStore) -> None:
    for i in range(8):
        store.write(i * 128 * KiB, b"x" * (64 * KiB))
    out = store.extents(0, 8 * MiB, max_extents=3)
    assert out == [(64 * KiB, DATA), (64 * KiB, HOLE), (64 * KiB, DATA)]
    full = store.extents(0, 8 * MiB)
    assert len(full) == 16 and sum(n for n, _ in full) == 8 * MiB


def test_block_device_store_reports_all_data(store: FileStore) -> None:
    store.info = dataclasses.replace(store.info, is_block_device=True)
    assert store.extents(4096, 8192) == [(8192, DATA)]


@pytest.mark.parametrize(("offset", "length"), [(100, 512), (0, 100), (8 * MiB, 512), (-512, 512)])
def test_extents_check_the_range(store: FileStore, offset: int, length: int) -> None:
    with pytest.raises(IOAlignmentError):
        store.extents(offset, length)


def test_lseek_failure_is_a_store_error(store: FileStore, monkeypatch) -> None:
    def broken(fd: int, pos: int, how: int) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "lseek", broken)
    with pytest.raises(StoreError, match="cannot probe allocation"):
        store.extents(0, 4096)


class ThreadRecordingStore(FileStore):
    """Records the thread each ``extents`` call ran on."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.threads: list[int] = []

    def extents(self, offset: int, length: int, max_extents: int = 1024) -> list[tuple[int, int]]:
        self.threads.append(threading.get_ident())
        return super().extents(offset, length, max_extents)


async def test_async_store_extents_run_on_a_worker(tmp_path: Path) -> None:
    fs = ThreadRecordingStore(str(tmp_path / "a.img"), MiB, 512)
    s = AsyncStore(fs)
    try:
        await s.write(64 * KiB, b"a" * (64 * KiB))
        assert await s.extents(0, MiB) == [(64 * KiB, HOLE), (64 * KiB, DATA), (896 * KiB, HOLE)]
        assert len(fs.threads) == 1 and fs.threads[0] != threading.get_ident()
        with pytest.raises(IOAlignmentError):
            await s.extents(1, 512)
        assert len(fs.threads) == 1  # refused before any thread hop
    finally:
        s.close()


# --- MemoryDevice.block_status ---------------------------------------------------------------


async def test_memory_device_reports_zero_blocks_as_holes() -> None:
    dev = MemoryDevice(64 * KiB)
    assert isinstance(dev, SupportsBlockStatus)
    assert await dev.block_status(0, 64 * KiB) == [(64 * KiB, HOLE)]
    await dev.write(8 * KiB, b"m" * 1024)
    await dev.write(9 * KiB, bytes(512))
    assert await dev.block_status(0, 64 * KiB) == [
        (8 * KiB, HOLE),
        (KiB, DATA),
        (55 * KiB, HOLE),
    ]
    with pytest.raises(IOAlignmentError):
        await dev.block_status(100, 512)


async def test_memory_device_block_status_is_bounded() -> None:
    dev = MemoryDevice(4 * MiB)
    for i in range(0, 4 * MiB, 1024):
        await dev.write(i, b"x" * 512)
    out = await dev.block_status(0, 4 * MiB)
    assert len(out) == MemoryDevice.MAX_EXTENTS
    assert out[:2] == [(512, DATA), (512, HOLE)]


# --- through the server -------------------------------------------------------------------------


class PlainDevice:
    """A BlockDevice without block_status (delegates to a MemoryDevice)."""

    def __init__(self, size_bytes: int) -> None:
        self._dev = MemoryDevice(size_bytes)
        self.size_bytes = size_bytes
        self.block_size = 512
        self.read_only = False

    async def read(self, offset: int, length: int) -> bytes:
        return await self._dev.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._dev.write(offset, data, fua)

    async def flush(self) -> None:
        await self._dev.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._dev.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        await self._dev.write_zeroes(offset, length, fua)


class FaultyStatusDevice(MemoryDevice):
    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        await trio.lowlevel.checkpoint()
        raise StoreError("lseek failed on /secret/path")


class EmptyStatusDevice(MemoryDevice):
    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        await trio.lowlevel.checkpoint()
        return []


@pytest.fixture
async def store_served(nursery: trio.Nursery, tmp_path: Path):
    device = StoreDevice(str(tmp_path / "export.img"), 8 * MiB)
    sock = str(tmp_path / "nbd.sock")
    server = NbdServer({"vol": device}, unix_path=sock)
    await start(nursery, server)
    yield sock, device, server
    device.close()


def error_of(chunk: tuple[int, bytes]) -> tuple[int, str]:
    rtype, payload = chunk
    assert rtype == p.NBD_REPLY_TYPE_ERROR
    error, n = p.ERROR_CHUNK_START.unpack_from(payload)
    return error, payload[6 : 6 + n].decode()


async def test_structured_replies_through_the_server(store_served) -> None:
    sock, _, _ = store_served
    c = await open_extended(sock, contexts=False)
    assert c.flags & p.NBD_FLAG_SEND_DF and c.flags & p.NBD_FLAG_CAN_MULTI_CONN
    await c.send(p.NBD_CMD_WRITE, 1, 4096, 4096, payload=b"s" * 4096)
    assert await c.structured() == (1, [(p.NBD_REPLY_TYPE_NONE, b"")])
    await c.send(p.NBD_CMD_READ, 2, 4096, 4096, p.NBD_CMD_FLAG_DF)
    cookie, ((rtype, payload),) = await c.structured()
    assert (cookie, rtype) == (2, p.NBD_REPLY_TYPE_OFFSET_DATA)
    assert payload == struct.pack(">Q", 4096) + b"s" * 4096
    # A refusal by the codec and one by the device both carry a message.
    await c.send(p.NBD_CMD_READ, 3, 8 * MiB, 512)
    cookie, (chunk,) = await c.structured()
    assert cookie == 3
    error, message = error_of(chunk)
    assert error == p.NBD_EINVAL and "past the export size" in message
    await c.send(p.NBD_CMD_READ, 4, 100, 512)
    cookie, (chunk,) = await c.structured()
    assert error_of(chunk)[0] == p.NBD_EINVAL and "multiples" in error_of(chunk)[1]
    # Without a context, block status is refused.
    await c.send(p.NBD_CMD_BLOCK_STATUS, 5, 0, 4096)
    cookie, (chunk,) = await c.structured()
    assert cookie == 5 and error_of(chunk)[0] == p.NBD_EINVAL
    await c.aclose()


async def test_block_status_through_the_server(store_served) -> None:
    sock, device, _ = store_served
    c = await open_extended(sock)
    await c.send(p.NBD_CMD_WRITE, 1, MiB, 256 * KiB, payload=b"w" * (256 * KiB))
    await c.send(p.NBD_CMD_WRITE, 2, 3 * MiB, 128 * KiB, payload=b"t" * (128 * KiB))
    assert {(await c.structured())[0] for _ in range(2)} == {1, 2}
    await c.send(p.NBD_CMD_TRIM, 3, 3 * MiB, 128 * KiB)
    assert await c.structured() == (3, [(p.NBD_REPLY_TYPE_NONE, b"")])

    await c.send(p.NBD_CMD_BLOCK_STATUS, 4, 0, 8 * MiB)
    cookie, ((rtype, payload),) = await c.structured()
    assert (cookie, rtype) == (4, p.NBD_REPLY_TYPE_BLOCK_STATUS)
    assert struct.unpack_from(">I", payload)[0] == 1  # the id SET_META_CONTEXT gave
    assert descriptors(payload) == [(MiB, HOLE), (256 * KiB, DATA), (6 * MiB + 768 * KiB, HOLE)]
    # REQ_ONE: one extent, no longer than asked
    await c.send(p.NBD_CMD_BLOCK_STATUS, 5, MiB - 4096, 64 * KiB, p.NBD_CMD_FLAG_REQ_ONE)
    _, ((_, payload),) = await c.structured()
    assert descriptors(payload) == [(4096, HOLE)]
    await c.send(p.NBD_CMD_BLOCK_STATUS, 6, MiB, 64 * KiB, p.NBD_CMD_FLAG_REQ_ONE)
    _, ((_, payload),) = await c.structured()
    assert descriptors(payload) == [(64 * KiB, DATA)]
    # Misaligned: the store refuses, the client gets EINVAL and a reason.
    await c.send(p.NBD_CMD_BLOCK_STATUS, 7, 100, 512)
    _, (chunk,) = await c.structured()
    assert error_of(chunk)[0] == p.NBD_EINVAL
    assert await device.read(MiB, 512) == b"w" * 512
    await c.aclose()


async def test_block_status_on_a_device_without_it(nursery, tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    await start(nursery, NbdServer({"vol": PlainDevice(MiB)}, unix_path=sock))
    c = await open_extended(sock)
    await c.send(p.NBD_CMD_BLOCK_STATUS, 1, 4096, 64 * KiB)
    _, ((rtype, payload),) = await c.structured()
    assert rtype == p.NBD_REPLY_TYPE_BLOCK_STATUS
    assert descriptors(payload) == [(64 * KiB, DATA)]  # allocated, contents unknown
    await c.aclose()


@pytest.mark.parametrize(
    ("device", "error"),
    [(FaultyStatusDevice(MiB), p.NBD_EIO), (EmptyStatusDevice(MiB), p.NBD_EIO)],
)
async def test_block_status_device_failures(nursery, tmp_path: Path, device, error: int) -> None:
    sock = str(tmp_path / "nbd.sock")
    server = NbdServer({"vol": device}, unix_path=sock)
    await start(nursery, server)
    c = await open_extended(sock)
    await c.send(p.NBD_CMD_BLOCK_STATUS, 1, 0, 4096)
    _, (chunk,) = await c.structured()
    got, message = error_of(chunk)
    assert got == error
    assert "secret" not in message  # server paths stay in the server's log
    # the connection goes on
    await c.send(p.NBD_CMD_READ, 2, 0, 512)
    assert (await c.structured())[1][0][0] == p.NBD_REPLY_TYPE_OFFSET_DATA
    assert server.statistics().requests_failed == 1
    await c.aclose()


async def test_simple_client_still_gets_simple_replies(nursery, tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    await start(nursery, NbdServer({"f": FaultyDevice(IOAlignmentError("bad"))}, unix_path=sock))
    c = await open_client(sock, "f")
    assert not c.flags & p.NBD_FLAG_SEND_DF
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (p.NBD_EINVAL, b"")
    assert await c.call(p.NBD_CMD_BLOCK_STATUS, 0, 512) == (p.NBD_EINVAL, b"")
    await c.aclose()


async def test_list_meta_context_through_the_server(store_served) -> None:
    sock, _, _ = store_served
    c = await Client.connect(sock)
    await c.greet()
    assert (await c.meta_context(p.NBD_OPT_LIST_META_CONTEXT, "vol", []))[0][0] == (
        p.NBD_REP_ERR_INVALID  # structured replies first
    )
    assert await c.option(p.NBD_OPT_STRUCTURED_REPLY) == [(p.NBD_REP_ACK, b"")]
    assert await c.meta_context(p.NBD_OPT_LIST_META_CONTEXT, "vol", ["base:"]) == [
        (p.NBD_REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
        (p.NBD_REP_ACK, b""),
    ]
    assert await c.meta_context(p.NBD_OPT_SET_META_CONTEXT, "vol", ["qemu:dirty-bitmap:x"]) == [
        (p.NBD_REP_ACK, b"")
    ]
    await c.aclose()


# --- real clients ---------------------------------------------------------------------------


async def prepare_map(sock: str) -> None:
    """Through NBD: data at 1 MiB (256 KiB), data at 3 MiB (512 KiB) then trimmed;
    everything else never touched."""
    c = await open_client(sock)
    for offset, size in ((MiB, 256 * KiB), (3 * MiB, 512 * KiB)):
        assert await c.call(p.NBD_CMD_WRITE, offset, size, payload=b"\x5a" * size) == (0, b"")
    assert await c.call(p.NBD_CMD_TRIM, 3 * MiB, 512 * KiB) == (0, b"")
    assert await c.call(p.NBD_CMD_FLUSH) == (0, b"")
    await c.aclose()


@pytest.mark.interop
async def test_nbdinfo_map(store_served) -> None:
    nbdinfo = need("nbdinfo")
    sock, _, server = store_served
    await prepare_map(sock)
    uri = f"nbd+unix:///vol?socket={sock}"
    extents = json.loads(await run(nbdinfo, "--map", "--json", uri))
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, MiB, HOLE),  # untouched hole
        (MiB, 256 * KiB, DATA),  # written
        (MiB + 256 * KiB, 8 * MiB - MiB - 256 * KiB, HOLE),  # hole, with the trimmed range
    ]
    assert extents[0]["description"] == "hole,zero" and extents[1]["description"] == "data"
    # A sub-range map (libnbd issues block status from the range's start).
    sub = json.loads(await run(nbdinfo, "--map", "--json", "--totals", uri))
    assert {(t["type"], t["size"]) for t in sub} == {
        (DATA, 256 * KiB),
        (HOLE, 8 * MiB - 256 * KiB),
    }
    info = json.loads(await run(nbdinfo, "--json", uri))
    (export,) = info["exports"]
    assert info["structured"] is True
    assert export["contexts"] == ["base:allocation"]
    assert export["can_multi_conn"] is True and export["can_df"] is True
    assert server.statistics().protocol_errors == 0


@pytest.mark.interop
async def test_qemu_img_map(store_served) -> None:
    qemu_img = need("qemu-img")
    sock, _, _ = store_served
    await prepare_map(sock)
    extents = json.loads(
        await run(qemu_img, "map", "--output=json", "-f", "raw", f"nbd+unix:///vol?socket={sock}")
    )
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in extents] == [
        (0, MiB, False, True),
        (MiB, 256 * KiB, True, False),
        (MiB + 256 * KiB, 8 * MiB - MiB - 256 * KiB, False, True),
    ]


@pytest.mark.interop
async def test_nbdcopy_skips_holes(store_served, tmp_path: Path) -> None:
    nbdcopy = need("nbdcopy")
    sock, _, _ = store_served
    await prepare_map(sock)
    out = tmp_path / "copy.img"
    await run(nbdcopy, f"nbd+unix:///vol?socket={sock}", str(out))
    data = out.read_bytes()
    assert data[MiB : MiB + 256 * KiB] == b"\x5a" * (256 * KiB)
    assert data.count(0) == len(data) - 256 * KiB
    # nbdcopy wrote only the data extent: the copy is sparse too
    assert os.stat(out).st_blocks * 512 < 2 * MiB
