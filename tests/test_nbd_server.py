"""Tests of the trio NBD server over real Unix sockets, with in-memory devices."""

from __future__ import annotations

import logging
import os
import ssl
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from geoclus.errors import (
    ConfigError,
    IOAlignmentError,
    NotPrimaryError,
    ReadOnlyError,
    StoreError,
)
from geoclus.nbd import NbdAddresses, NbdServer, nbd_error_for
from geoclus.nbd import proto as p
from replicator.memory import MemoryDevice
from replicator.store import AsyncStore, FileStore

MiB = 1024 * 1024


# --- a tiny NBD client ----------------------------------------------------------------


class Client:
    """Just enough of an NBD client to drive the server from tests."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self.size_bytes = 0
        self.flags = 0

    @classmethod
    async def connect(cls, path: str) -> Client:
        return cls(await trio.open_unix_socket(path))

    async def recv_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError(f"server closed with {len(self._buf)} of {n} bytes")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def at_eof(self) -> bool:
        """True if the server closed the connection with nothing more to read."""
        if self._buf:
            return False
        return await self.stream.receive_some(1) == b""

    async def greet(self) -> None:
        magic, opt_magic, flags = p.GREETING.unpack(await self.recv_exactly(18))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        assert flags == p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
        await self.stream.send_all(
            struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES)
        )

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its replies up to and including the final one."""
        await self.stream.send_all(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, length = p.OPTION_REPLY_HEADER.unpack(await self.recv_exactly(20))
            assert (magic, ropt) == (p.NBD_OPT_REPLY_MAGIC, opt)
            replies.append((rtype, await self.recv_exactly(length)))
            if rtype not in (p.NBD_REP_INFO, p.NBD_REP_SERVER):
                return replies

    async def go(self, name: str) -> int:
        """NBD_OPT_GO; returns the final reply type (ACK on success)."""
        raw = name.encode()
        replies = await self.option(
            p.NBD_OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        )
        for rtype, data in replies:
            if rtype == p.NBD_REP_INFO and data[:2] == b"\0\0":
                _, self.size_bytes, self.flags = p.INFO_EXPORT.unpack(data)
        return replies[-1][0]

    async def send(
        self,
        cmd: int,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        header = p.REQUEST_HEADER.pack(p.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        await self.stream.send_all(header + payload)

    async def reply(self, read_lengths: dict[int, int] | None = None) -> tuple[int, int, bytes]:
        """Read one simple reply: (cookie, error, data). ``read_lengths`` maps the
        cookies of pending reads to their lengths."""
        magic, error, cookie = p.SIMPLE_REPLY_HEADER.unpack(await self.recv_exactly(16))
        assert magic == p.NBD_SIMPLE_REPLY_MAGIC
        data = b""
        if read_lengths and cookie in read_lengths and error == 0:
            data = await self.recv_exactly(read_lengths[cookie])
        return cookie, error, data

    async def call(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> tuple[int, bytes]:
        """One request, one reply: (error, data)."""
        await self.send(cmd, 1, offset, length, flags, payload)
        cookie, error, data = await self.reply({1: length} if cmd == p.NBD_CMD_READ else None)
        assert cookie == 1
        return error, data

    async def aclose(self) -> None:
        await self.stream.aclose()

    # negotiated extensions ------------------------------------------------------------

    async def starttls(self, context: ssl.SSLContext) -> int:
        """NBD_OPT_STARTTLS; on ACK, run the client side of TLS over the stream
        (trio.SSLStream works over any stream, Unix sockets included). Returns the
        reply type."""
        ((rtype, _),) = await self.option(p.NBD_OPT_STARTTLS)
        if rtype == p.NBD_REP_ACK:
            assert not self._buf, "server sent bytes after the STARTTLS ACK"
            tls = trio.SSLStream(self.stream, context, server_hostname=None)
            await tls.do_handshake()
            self.stream = tls
        return rtype

    async def meta_context(
        self, opt: int, export: str, queries: list[str]
    ) -> list[tuple[int, bytes]]:
        raw = export.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q.encode())) + q.encode()
        await self.stream.send_all(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, length = p.OPTION_REPLY_HEADER.unpack(await self.recv_exactly(20))
            assert (magic, ropt) == (p.NBD_OPT_REPLY_MAGIC, opt)
            replies.append((rtype, await self.recv_exactly(length)))
            if rtype != p.NBD_REP_META_CONTEXT:
                return replies

    async def structured(self) -> tuple[int, list[tuple[int, bytes]]]:
        """Read one structured reply, up to the chunk flagged DONE: the cookie and
        its chunks as (type, payload)."""
        chunks = []
        while True:
            magic, flags, rtype, cookie, length = p.STRUCTURED_REPLY_HEADER.unpack(
                await self.recv_exactly(20)
            )
            assert magic == p.NBD_STRUCTURED_REPLY_MAGIC
            chunks.append((rtype, await self.recv_exactly(length)))
            if flags & p.NBD_REPLY_FLAG_DONE:
                return cookie, chunks


async def open_extended(path: str, export: str = "vol", contexts: bool = True) -> Client:
    """A client with structured replies and (optionally) base:allocation selected."""
    client = await Client.connect(path)
    await client.greet()
    assert await client.option(p.NBD_OPT_STRUCTURED_REPLY) == [(p.NBD_REP_ACK, b"")]
    if contexts:
        replies = await client.meta_context(p.NBD_OPT_SET_META_CONTEXT, export, ["base:allocation"])
        assert [r[0] for r in replies] == [p.NBD_REP_META_CONTEXT, p.NBD_REP_ACK]
    assert await client.go(export) == p.NBD_REP_ACK
    return client


def descriptors(payload: bytes) -> list[tuple[int, int]]:
    """The (length, flags) descriptors of a BLOCK_STATUS chunk (after the id)."""
    return [p.BLOCK_DESCRIPTOR.unpack_from(payload, i) for i in range(4, len(payload), 8)]


# --- devices with behaviour -------------------------------------------------------------


class GatedDevice(MemoryDevice):
    """A MemoryDevice whose reads and writes wait for ``gate`` and count concurrency."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(size_bytes)
        self.gate = trio.Event()
        self.active = 0
        self.max_active = 0
        self.started = 0

    async def _enter(self) -> None:
        self.started += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
        finally:
            self.active -= 1

    async def read(self, offset: int, length: int) -> bytes:
        await self._enter()
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._enter()
        await super().write(offset, data, fua)


class FaultyDevice(MemoryDevice):
    """Raises ``exc`` from every read."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(MiB)
        self.exc = exc

    async def read(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        raise self.exc


class ShortReadDevice(MemoryDevice):
    async def read(self, offset: int, length: int) -> bytes:
        return (await super().read(offset, length))[:-1]


class StoreDevice:
    """A thin BlockDevice over an AsyncStore (a sparse file), with block status:
    TRIM punches holes, WRITE_ZEROES zeroes a range, flush is the store's group
    commit."""

    def __init__(self, path: str, size_bytes: int, block_size: int = 512) -> None:
        self.store = AsyncStore(FileStore(path, size_bytes, block_size))

    @property
    def size_bytes(self) -> int:
        return self.store.size_bytes

    @property
    def block_size(self) -> int:
        return self.store.block_size

    @property
    def read_only(self) -> bool:
        return False

    async def read(self, offset: int, length: int) -> bytes:
        return await self.store.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self.store.write(offset, data, fua)

    async def flush(self) -> None:
        await self.store.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.store.write_zeroes(offset, length, punch=True)
        if fua:
            await self.store.flush()

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        await self.store.write_zeroes(offset, length)
        if fua:
            await self.store.flush()

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.store.extents(offset, length)

    def close(self) -> None:
        self.store.close()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "nbd.sock")


async def start(nursery: trio.Nursery, server: NbdServer) -> NbdAddresses:
    addresses: NbdAddresses = await nursery.start(server.serve)
    return addresses


@pytest.fixture
async def served(
    nursery: trio.Nursery, sock_path: str
) -> AsyncIterator[tuple[NbdServer, dict[str, MemoryDevice]]]:
    devices = {
        "vol": MemoryDevice(4 * MiB),
        "small": MemoryDevice(64 * 1024, block_size=4096),
        "ro": MemoryDevice(MiB, read_only=True),
    }
    server = NbdServer(devices, unix_path=sock_path, default_export="vol")
    await start(nursery, server)
    yield server, devices


async def open_client(path: str, export: str = "vol") -> Client:
    client = await Client.connect(path)
    await client.greet()
    assert await client.go(export) == p.NBD_REP_ACK
    return client


# --- tests --------------------------------------------------------------------------------


async def test_write_read_flush_trim_zeroes_roundtrip(served, sock_path: str) -> None:
    server, devices = served
    c = await open_client(sock_path)
    assert c.size_bytes == 4 * MiB
    data = os.urandom(8192)
    assert await c.call(p.NBD_CMD_WRITE, 4096, 8192, p.NBD_CMD_FLAG_FUA, data) == (0, b"")
    assert await c.call(p.NBD_CMD_READ, 4096, 8192) == (0, data)
    assert await c.call(p.NBD_CMD_FLUSH) == (0, b"")
    assert devices["vol"].flushes == 1
    assert await c.call(p.NBD_CMD_TRIM, 4096, 512) == (0, b"")
    assert await c.call(p.NBD_CMD_WRITE_ZEROES, 8192, 512, p.NBD_CMD_FLAG_NO_HOLE) == (0, b"")
    error, back = await c.call(p.NBD_CMD_READ, 4096, 8192)
    assert error == 0
    assert back == bytes(512) + data[512:4096] + bytes(512) + data[4608:]
    stats = server.statistics()
    assert stats.bytes_written == 8192 and stats.bytes_read == 16384
    assert stats.requests_completed == 6 and stats.connections_active == 1
    await c.aclose()


async def test_errors_map_to_the_right_errno(served, sock_path: str) -> None:
    c = await open_client(sock_path)
    cases = [
        ((p.NBD_CMD_READ, 100, 512), p.NBD_EINVAL),  # misaligned
        ((p.NBD_CMD_READ, 4 * MiB - 512, 1024), p.NBD_EINVAL),  # read past end
        ((p.NBD_CMD_TRIM, 4 * MiB, 512), p.NBD_EINVAL),  # trim past end
        ((p.NBD_CMD_WRITE_ZEROES, 4 * MiB, 512), p.NBD_ENOSPC),  # zeroes past end
        ((p.NBD_CMD_WRITE_ZEROES, 3, 512), p.NBD_EINVAL),  # misaligned
        ((p.NBD_CMD_CACHE, 0, 512), p.NBD_EINVAL),  # unsupported command
        ((77, 0, 0), p.NBD_EINVAL),  # unknown command
        ((p.NBD_CMD_READ, 0, 33 * MiB), p.NBD_EINVAL),  # over the payload limit
    ]
    for (cmd, offset, length), expected in cases:
        assert await c.call(cmd, offset, length) == (expected, b""), (cmd, offset, length)
    assert await c.call(p.NBD_CMD_WRITE, 4 * MiB, 512, payload=bytes(512)) == (p.NBD_ENOSPC, b"")
    assert await c.call(p.NBD_CMD_WRITE, 1, 512, payload=bytes(512)) == (p.NBD_EINVAL, b"")
    # and the connection still works
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    await c.aclose()


async def test_read_only_export_refuses_writes(served, sock_path: str) -> None:
    c = await open_client(sock_path, "ro")
    assert c.flags & p.NBD_FLAG_READ_ONLY
    assert await c.call(p.NBD_CMD_WRITE, 0, 512, payload=b"x" * 512) == (p.NBD_EPERM, b"")
    assert await c.call(p.NBD_CMD_TRIM, 0, 512) == (p.NBD_EPERM, b"")
    assert await c.call(p.NBD_CMD_WRITE_ZEROES, 0, 512) == (p.NBD_EPERM, b"")
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    await c.aclose()


async def test_several_exports_by_name_and_default(served, sock_path: str) -> None:
    _, devices = served
    small = await open_client(sock_path, "small")
    assert small.size_bytes == 64 * 1024
    assert await small.call(p.NBD_CMD_WRITE, 4096, 4096, payload=b"s" * 4096) == (0, b"")
    assert await small.call(p.NBD_CMD_WRITE, 512, 512, payload=b"s" * 512) == (p.NBD_EINVAL, b"")
    default = await open_client(sock_path, "")
    assert default.size_bytes == 4 * MiB
    assert await default.call(p.NBD_CMD_READ, 4096, 4096) == (0, bytes(4096))
    assert await devices["small"].read(4096, 4096) == b"s" * 4096

    c = await Client.connect(sock_path)
    await c.greet()
    assert await c.go("nope") == p.NBD_REP_ERR_UNKNOWN
    listed = await c.option(p.NBD_OPT_LIST)
    names = sorted(data[4:].decode() for rtype, data in listed if rtype == p.NBD_REP_SERVER)
    assert names == ["ro", "small", "vol"]
    assert await c.option(p.NBD_OPT_ABORT) == [(p.NBD_REP_ACK, b"")]
    assert await c.at_eof()
    for client in (small, default, c):
        await client.aclose()


async def test_concurrent_requests_reply_out_of_order(nursery, sock_path: str) -> None:
    device = GatedDevice(MiB)
    await start(nursery, NbdServer({"g": device}, unix_path=sock_path))
    c = await open_client(sock_path, "g")
    await c.send(p.NBD_CMD_READ, 1, 0, 4096)  # blocks on the gate
    await c.send(p.NBD_CMD_FLUSH, 2)  # does not
    assert await c.reply() == (2, 0, b"")  # the later request answers first
    await c.send(p.NBD_CMD_WRITE, 3, 4096, 4096, payload=b"w" * 4096)
    await trio.testing.wait_all_tasks_blocked()
    assert device.active == 2
    device.gate.set()
    replies = {(await c.reply({1: 4096}))[0] for _ in range(2)}
    assert replies == {1, 3}
    await c.aclose()


async def test_many_pipelined_requests(served, sock_path: str) -> None:
    c = await open_client(sock_path)
    blocks = {i: os.urandom(4096) for i in range(200)}
    for i, block in blocks.items():
        await c.send(p.NBD_CMD_WRITE, i, i * 4096, 4096, payload=block)
    assert sorted([(await c.reply())[:2] for _ in blocks]) == [(i, 0) for i in blocks]
    for i in blocks:
        await c.send(p.NBD_CMD_READ, 1000 + i, i * 4096, 4096)
    lengths = {1000 + i: 4096 for i in blocks}
    got = {}
    for _ in blocks:
        cookie, error, data = await c.reply(lengths)
        assert error == 0
        got[cookie - 1000] = data
    assert got == blocks
    await c.aclose()


async def test_in_flight_bound_stops_the_reader(nursery, sock_path: str) -> None:
    device = GatedDevice(MiB)
    server = NbdServer({"g": device}, unix_path=sock_path, max_in_flight_requests=2)
    await start(nursery, server)
    c = await open_client(sock_path, "g")
    for i in range(6):
        await c.send(p.NBD_CMD_READ, i, 0, 512)
    await trio.testing.wait_all_tasks_blocked()
    assert device.started == 2 and device.active == 2
    device.gate.set()
    cookies = sorted([(await c.reply(dict.fromkeys(range(6), 512)))[0] for _ in range(6)])
    assert cookies == list(range(6))
    assert device.max_active == 2
    await c.aclose()


async def test_in_flight_byte_bound(nursery, sock_path: str) -> None:
    device = GatedDevice(MiB)
    server = NbdServer({"g": device}, unix_path=sock_path, max_in_flight_bytes=10_000)
    await start(nursery, server)
    c = await open_client(sock_path, "g")
    for i in range(4):
        await c.send(p.NBD_CMD_READ, i, 0, 4096)
    await c.send(p.NBD_CMD_READ, 9, 0, 65536)  # bigger than the bound: runs alone later
    await trio.testing.wait_all_tasks_blocked()
    assert device.started == 2  # 2 * 4096 fits in 10_000, a third does not
    device.gate.set()
    lengths = {0: 4096, 1: 4096, 2: 4096, 3: 4096, 9: 65536}
    assert sorted([(await c.reply(lengths))[0] for _ in range(5)]) == [0, 1, 2, 3, 9]
    await c.aclose()


async def test_disc_waits_for_in_flight_requests(nursery, sock_path: str) -> None:
    device = GatedDevice(MiB)
    await start(nursery, NbdServer({"g": device}, unix_path=sock_path))
    c = await open_client(sock_path, "g")
    await c.send(p.NBD_CMD_WRITE, 1, 0, 512, payload=b"d" * 512)
    await c.send(p.NBD_CMD_DISC, 2)
    await trio.testing.wait_all_tasks_blocked()
    device.gate.set()
    assert await c.reply() == (1, 0, b"")
    assert await c.at_eof()
    assert await MemoryDevice.read(device, 0, 512) == b"d" * 512
    await c.aclose()


@pytest.mark.parametrize(
    ("exc", "errno_"),
    [
        (StoreError("disk on fire"), p.NBD_EIO),
        (NotPrimaryError("secondary"), p.NBD_EPERM),
        (ReadOnlyError("ro"), p.NBD_EPERM),
        (IOAlignmentError("bad"), p.NBD_EINVAL),
        (RuntimeError("bug"), p.NBD_EIO),
    ],
)
async def test_device_exceptions_become_errors(
    nursery, sock_path: str, caplog: pytest.LogCaptureFixture, exc: Exception, errno_: int
) -> None:
    await start(nursery, NbdServer({"f": FaultyDevice(exc)}, unix_path=sock_path))
    c = await open_client(sock_path, "f")
    with caplog.at_level(logging.DEBUG, logger="geoclus.nbd"):
        assert await c.call(p.NBD_CMD_READ, 0, 512) == (errno_, b"")
    assert await c.call(p.NBD_CMD_WRITE, 0, 512, payload=bytes(512)) == (0, b"")
    if isinstance(exc, RuntimeError):
        (record,) = [r for r in caplog.records if r.exc_info]
        assert record.name == "geoclus.nbd" and "unexpected" in record.getMessage()
    await c.aclose()


async def test_short_device_read_is_eio(nursery, sock_path: str) -> None:
    await start(nursery, NbdServer({"s": ShortReadDevice(MiB)}, unix_path=sock_path))
    c = await open_client(sock_path, "s")
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (p.NBD_EIO, b"")
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (p.NBD_EIO, b"")
    await c.aclose()


def test_nbd_error_for() -> None:
    assert nbd_error_for(IOAlignmentError("x"), p.NBD_CMD_WRITE, past_end=True) == p.NBD_ENOSPC
    assert nbd_error_for(IOAlignmentError("x"), p.NBD_CMD_WRITE, past_end=False) == p.NBD_EINVAL
    assert nbd_error_for(IOAlignmentError("x"), p.NBD_CMD_READ, past_end=True) == p.NBD_EINVAL
    assert nbd_error_for(IOAlignmentError("x"), p.NBD_CMD_TRIM, past_end=True) == p.NBD_EINVAL
    assert nbd_error_for(ReadOnlyError("x"), p.NBD_CMD_WRITE, past_end=False) == p.NBD_EPERM
    assert nbd_error_for(StoreError("x"), p.NBD_CMD_FLUSH, past_end=False) == p.NBD_EIO
    assert nbd_error_for(ValueError("x"), p.NBD_CMD_READ, past_end=False) == p.NBD_EIO


async def test_protocol_error_closes_only_that_connection(
    served, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = served
    good = await open_client(sock_path)
    bad = await open_client(sock_path)
    with caplog.at_level(logging.WARNING, logger="geoclus.nbd"):
        await bad.stream.send_all(b"\xde\xad\xbe\xef" + bytes(24))
        assert await bad.at_eof()
    assert any(
        "protocol error" in r.getMessage() and "magic" in r.getMessage() for r in caplog.records
    )
    assert await good.call(p.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    assert server.statistics().protocol_errors == 1
    for c in (good, bad):
        await c.aclose()


async def test_handshake_protocol_error(served, sock_path: str) -> None:
    c = await Client.connect(sock_path)
    await c.recv_exactly(18)
    await c.stream.send_all(struct.pack(">I", 0))  # no FIXED_NEWSTYLE
    assert await c.at_eof()
    await c.aclose()


async def test_client_vanishing_mid_request_is_harmless(served, sock_path: str) -> None:
    server, _ = served
    c = await open_client(sock_path)
    await c.stream.send_all(p.REQUEST_HEADER.pack(p.NBD_REQUEST_MAGIC, 0, 1, 1, 0, 4096) + b"x")
    await c.aclose()
    c2 = await open_client(sock_path)
    assert await c2.call(p.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    await c2.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().connections_active == 0


async def test_handshake_timeout(
    nursery, sock_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    await start(
        nursery,
        NbdServer({"v": MemoryDevice(MiB)}, unix_path=sock_path, handshake_timeout_s=5),
    )
    c = await Client.connect(sock_path)
    await c.recv_exactly(18)
    start_time = trio.current_time()
    assert await c.at_eof()  # the server gave up on us
    assert trio.current_time() - start_time == pytest.approx(5, abs=0.5)
    await c.aclose()


async def test_max_connections(nursery, sock_path: str) -> None:
    server = NbdServer({"v": MemoryDevice(MiB)}, unix_path=sock_path, max_connections=1)
    await start(nursery, server)
    first = await open_client(sock_path, "v")
    second = await Client.connect(sock_path)
    with pytest.raises(EOFError):
        await second.greet()
    assert server.statistics().connections_refused == 1
    assert await first.call(p.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    await first.aclose()
    await second.aclose()


async def test_unix_socket_mode_stale_file_and_cleanup(sock_path: str) -> None:
    # A stale socket file (nobody listening) is replaced.
    stale = trio.socket.socket(trio.socket.AF_UNIX)
    await stale.bind(sock_path)
    stale.close()
    server = NbdServer({"v": MemoryDevice(MiB)}, unix_path=sock_path)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.serve)
        assert addresses == NbdAddresses(sock_path, ())
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        # A second server on the same live path is refused.
        with pytest.raises(ConfigError, match="in use"):
            await NbdServer({"v": MemoryDevice(MiB)}, unix_path=sock_path).serve()
        c = await open_client(sock_path, "v")
        await c.aclose()
        nursery.cancel_scope.cancel()
    assert not await trio.Path(sock_path).exists()


async def test_unix_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await NbdServer({"v": MemoryDevice(MiB)}, unix_path=str(path)).serve()
    assert path.read_text() == "precious"


async def test_tcp_listener_on_port_zero(nursery) -> None:
    server = NbdServer({"v": MemoryDevice(MiB)}, tcp_port=0)
    addresses = await start(nursery, server)
    ((host, port),) = addresses.tcp
    assert host == "127.0.0.1" and port > 0
    stream = await trio.open_tcp_stream(host, port)
    c = Client(stream)
    await c.greet()
    assert await c.go("v") == p.NBD_REP_ACK
    assert await c.call(p.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    await c.aclose()


def test_configuration_errors(tmp_path: Path) -> None:
    dev = MemoryDevice(MiB)
    with pytest.raises(ConfigError, match="unix_path and/or tcp_port"):
        NbdServer({"v": dev})
    with pytest.raises(ConfigError, match="default_export"):
        NbdServer({"v": dev}, tcp_port=0, default_export="x")
    with pytest.raises(ConfigError, match="max_in_flight_requests"):
        NbdServer({"v": dev}, tcp_port=0, max_in_flight_requests=0)
    with pytest.raises(ConfigError, match="block size"):
        NbdServer({"v": MemoryDevice(MiB, block_size=1000)}, tcp_port=0)
    with pytest.raises(ConfigError, match="not a valid NBD string"):
        NbdServer({"a\0b": dev}, tcp_port=0)
