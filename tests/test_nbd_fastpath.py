"""The NBD server's fast paths: reads answered by the device's ``read_nowait``
without a task, and the plain transport's direct system calls (partial sends,
a client that always has data ready)."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from geoclus.errors import IOAlignmentError
from geoclus.nbd import NbdServer
from geoclus.nbd import proto as p
from replicator.memory import MemoryDevice
from tests.test_nbd_server import GatedDevice, open_client, start

MiB = 1024 * 1024


@pytest.fixture
def sock_path(tmp_path) -> str:
    return str(tmp_path / "nbd.sock")


class NowaitDevice(MemoryDevice):
    """A MemoryDevice with ``read_nowait``; ``answer`` chooses what it does:
    ``"data"`` (a bytearray), ``"none"`` (falls back) or ``"raise"``."""

    def __init__(self, size_bytes: int, answer: str = "data") -> None:
        super().__init__(size_bytes)
        self.answer = answer
        self.nowait_calls = 0
        self.read_calls = 0

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        self.nowait_calls += 1
        if self.answer == "raise":
            raise IOAlignmentError("bad range")
        if self.answer == "none":
            return None
        return bytearray(self._buf[offset : offset + length])

    async def read(self, offset: int, length: int) -> bytes:
        self.read_calls += 1
        return await super().read(offset, length)


async def test_read_served_by_read_nowait_without_device_read(nursery, sock_path) -> None:
    device = NowaitDevice(MiB)
    server = NbdServer({"d": device}, unix_path=sock_path)
    await start(nursery, server)
    c = await open_client(sock_path, "d")
    data = os.urandom(8192)
    assert await c.call(p.NBD_CMD_WRITE, 4096, 8192, payload=data) == (0, b"")
    # A read after a completed write sees it.
    assert await c.call(p.NBD_CMD_READ, 4096, 8192) == (0, data)
    assert (device.nowait_calls, device.read_calls) == (1, 0)
    stats = server.statistics()
    assert stats.requests_completed == 2 and stats.bytes_read == 8192
    await c.aclose()


async def test_read_nowait_none_or_error_falls_back_to_read(nursery, sock_path) -> None:
    none_dev, raising = NowaitDevice(MiB, "none"), NowaitDevice(MiB, "raise")
    await start(nursery, NbdServer({"n": none_dev, "r": raising}, unix_path=sock_path))
    c = await open_client(sock_path, "n")
    assert await c.call(p.NBD_CMD_WRITE, 0, 512, payload=b"a" * 512) == (0, b"")
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (0, b"a" * 512)
    assert (none_dev.nowait_calls, none_dev.read_calls) == (1, 1)
    await c.aclose()
    c = await open_client(sock_path, "r")
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    assert (raising.nowait_calls, raising.read_calls) == (1, 1)
    await c.aclose()


class GatedNowaitDevice(GatedDevice):
    def read_nowait(self, offset: int, length: int) -> bytes:
        return bytes(self._buf[offset : offset + length])


async def test_fast_reads_count_against_the_in_flight_bound(nursery, sock_path) -> None:
    device = GatedNowaitDevice(MiB)
    server = NbdServer({"g": device}, unix_path=sock_path, max_in_flight_requests=2)
    await start(nursery, server)
    c = await open_client(sock_path, "g")
    await c.send(p.NBD_CMD_WRITE, 1, 0, 512, payload=b"w" * 512)  # held by the gate
    await c.send(p.NBD_CMD_READ, 2, 0, 512)  # answered at once, before the write
    assert await c.reply({2: 512}) == (2, 0, bytes(512))
    await c.send(p.NBD_CMD_WRITE, 3, 512, 512, payload=b"x" * 512)  # held too: 2 in flight
    await c.send(p.NBD_CMD_READ, 4, 0, 512)  # must wait for a slot
    await trio.testing.wait_all_tasks_blocked()
    assert device.started == 2
    with trio.move_on_after(0.05):
        await c.reply({4: 512})
        raise AssertionError("a read was answered beyond the in-flight bound")
    device.gate.set()
    got = {}
    for _ in range(3):
        cookie, error, data = await c.reply({4: 512})
        got[cookie] = (error, data)
    assert got[1] == (0, b"") and got[3] == (0, b"")
    assert got[4][0] == 0  # before or after the write: both are allowed
    await c.aclose()


async def test_large_replies_survive_partial_sends(nursery, sock_path) -> None:
    """Replies far larger than the socket buffer: writev sends part, the
    transport waits for room and goes on from the right byte."""
    device = NowaitDevice(32 * MiB)
    await start(nursery, NbdServer({"d": device}, unix_path=sock_path))
    c = await open_client(sock_path, "d")
    blobs = {i: os.urandom(4 * MiB) for i in range(3)}
    for i, blob in blobs.items():
        assert await c.call(p.NBD_CMD_WRITE, i * 4 * MiB, 4 * MiB, payload=blob) == (0, b"")
    for i in blobs:  # pipelined: replies queue up behind the slow reader
        await c.send(p.NBD_CMD_READ, 10 + i, i * 4 * MiB, 4 * MiB)
    await trio.sleep(0.05)
    got = {}
    for _ in blobs:
        cookie, error, data = await c.reply({10 + i: 4 * MiB for i in blobs})
        assert error == 0
        got[cookie - 10] = data
    assert got == blobs
    await c.aclose()


async def test_reader_yields_while_data_keeps_coming(nursery, sock_path) -> None:
    """Hundreds of pipelined writes sent in one go (data always ready for the
    reader): requests still run and are answered while the reader goes on."""
    device = MemoryDevice(4 * MiB)
    await start(nursery, NbdServer({"d": device}, unix_path=sock_path))
    c = await open_client(sock_path, "d")
    frames = b"".join(
        p.REQUEST_HEADER.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, i, i * 512, 512)
        + bytes([i % 251]) * 512
        for i in range(1000)
    )
    async with trio.open_nursery() as n:
        n.start_soon(c.stream.send_all, frames)
        cookies = sorted([(await c.reply())[0] for _ in range(1000)])
    assert cookies == list(range(1000))
    assert await MemoryDevice.read(device, 999 * 512, 512) == bytes([999 % 251]) * 512
    await c.aclose()
