"""A small async NBD client (fixed newstyle, NBD_OPT_GO, simple replies,
and ``NBD_OPT_STARTTLS`` when given a TLS context).

Used by the demo, the end-to-end tests and the benchmarks to drive an export
from Python with exact per-request timing. Requests may be pipelined: each call
waits only for its own reply, matched by cookie.
"""

from __future__ import annotations

import errno
import ssl
import struct
from dataclasses import dataclass
from typing import Any

import trio

from geoclus.errors import GeoclusError
from geoclus.nbd import proto as p
from geoclus.tlsstream import wrap_client

_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
# Bound on requests in flight per client: callers pipelining more wait.
MAX_IN_FLIGHT = 256


class NbdClientError(GeoclusError):
    """The server refused a request (``errno`` holds the NBD error) or broke the protocol."""

    def __init__(self, message: str, error: int = 0) -> None:
        self.error = error
        super().__init__(message)


@dataclass(frozen=True)
class ExportDetails:
    size_bytes: int
    flags: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.NBD_FLAG_READ_ONLY)


class NbdClient:
    """One NBD connection. Create with :meth:`connect_unix` or :meth:`connect_tcp`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._next_cookie = 1
        self._waiters: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._reads: dict[int, int] = {}
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._broken: BaseException | None = None
        self.export: ExportDetails | None = None

    @classmethod
    async def connect_unix(cls, path: str, export: str = "") -> NbdClient:
        return await cls._start(await trio.open_unix_socket(path), export)

    @classmethod
    async def connect_tcp(
        cls,
        host: str,
        port: int,
        export: str = "",
        local_address: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> NbdClient:
        """Connect over TCP (from ``local_address``, if given). With
        ``tls_context`` the connection upgrades with ``NBD_OPT_STARTTLS``
        before anything else is said (the server's certificate is checked
        against the context's CA; a server that will not upgrade is refused)."""
        stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        return await cls._start(stream, export, tls_context)

    @classmethod
    async def _start(
        cls, stream: trio.abc.Stream, export: str, tls_context: ssl.SSLContext | None = None
    ) -> NbdClient:
        client = cls(stream)
        try:
            await client._handshake(export, tls_context)
        except BaseException:
            await client._stream.aclose()
            raise
        return client

    async def _recv_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = await self._stream.receive_some(max(65536, n - len(self._buf)))
            if not data:
                raise NbdClientError("server closed the connection")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _starttls(self, context: ssl.SSLContext) -> None:
        await self._stream.send_all(struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_STARTTLS, 0))
        magic, opt, rtype, length = struct.unpack(">QIII", await self._recv_exact(20))
        body = await self._recv_exact(length)
        if magic != p.NBD_OPT_REPLY_MAGIC or opt != p.NBD_OPT_STARTTLS:
            raise NbdClientError("bad reply to NBD_OPT_STARTTLS")
        if rtype != p.NBD_REP_ACK:
            raise NbdClientError(
                f"server refused NBD_OPT_STARTTLS ({p.REPLY_NAMES.get(rtype, hex(rtype))} "
                f"{body[4:].decode(errors='replace')}): the export has no TLS; "
                "connect without TLS or give the export a tls table"
            )
        if self._buf or not isinstance(self._stream, trio.SocketStream):
            raise NbdClientError("NBD_OPT_STARTTLS: bytes arrived before the TLS handshake")
        try:
            self._stream = await wrap_client(self._stream, context)
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            raise NbdClientError(f"TLS handshake with the NBD server failed: {exc}") from None

    async def _handshake(self, export: str, tls_context: ssl.SSLContext | None = None) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", await self._recv_exact(18))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NbdClientError("not a newstyle NBD server")
        cflags = p.NBD_FLAG_C_FIXED_NEWSTYLE | (flags & p.NBD_FLAG_C_NO_ZEROES)
        await self._stream.send_all(struct.pack(">I", cflags))
        if tls_context is not None:
            await self._starttls(tls_context)
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        await self._stream.send_all(struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_GO, len(data)) + data)
        while True:
            _magic, _opt, rtype, length = struct.unpack(">QIII", await self._recv_exact(20))
            body = await self._recv_exact(length)
            if rtype == p.NBD_REP_ACK:
                break
            if rtype == p.NBD_REP_ERR_TLS_REQD:
                raise NbdClientError(
                    f"export {export!r} requires TLS: connect with the cluster's certificate"
                )
            if rtype & p.NBD_REP_FLAG_ERROR:
                raise NbdClientError(
                    f"server refused export {export!r}: reply {rtype:#x} "
                    f"{body[4:].decode(errors='replace') if body else ''}"
                )
            if rtype == p.NBD_REP_INFO and len(body) >= 12:
                (info,) = struct.unpack_from(">H", body)
                if info == p.NBD_INFO_EXPORT:
                    size, tflags = struct.unpack_from(">QH", body, 2)
                    self.export = ExportDetails(size, tflags)
        if self.export is None:
            raise NbdClientError("server did not send NBD_INFO_EXPORT")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive replies until the connection closes; run in a nursery."""
        task_status.started()
        try:
            while True:
                magic, error, cookie = _REPLY.unpack(await self._recv_exact(_REPLY.size))
                if magic != p.NBD_SIMPLE_REPLY_MAGIC:
                    raise NbdClientError(f"bad reply magic {magic:#x}")
                length = self._reads.pop(cookie, 0)
                data = await self._recv_exact(length) if length and not error else b""
                waiter = self._waiters.pop(cookie, None)
                if waiter is None:
                    raise NbdClientError(f"reply for unknown cookie {cookie}")
                waiter[1].extend([error, data])
                waiter[0].set()
        except (NbdClientError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken = exc
            for ev, out in self._waiters.values():
                out.extend([errno.EIO, b""])
                ev.set()
            self._waiters.clear()

    async def _request(
        self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0
    ) -> bytes:
        if self._broken is not None:
            raise NbdClientError(f"connection broken: {self._broken}")
        async with self._slots:
            cookie = self._next_cookie
            self._next_cookie += 1
            ev: trio.Event = trio.Event()
            out: list[Any] = []
            self._waiters[cookie] = (ev, out)
            if cmd == p.NBD_CMD_READ:
                self._reads[cookie] = length
            async with self._send_lock:
                await self._stream.send_all(
                    _REQ.pack(p.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
                )
            await ev.wait()
        error, data = out
        if error:
            raise NbdClientError(
                f"{p.COMMAND_NAMES.get(cmd, cmd)} at {offset}+{length} failed: "
                f"{errno.errorcode.get(int(error), error)}",
                int(error),
            )
        return data

    async def read(self, offset: int, length: int) -> bytes:
        return await self._request(p.NBD_CMD_READ, offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._request(
            p.NBD_CMD_WRITE, offset, len(data), data, p.NBD_CMD_FLAG_FUA if fua else 0
        )

    async def flush(self) -> None:
        await self._request(p.NBD_CMD_FLUSH, 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._request(p.NBD_CMD_TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._request(p.NBD_CMD_WRITE_ZEROES, offset, length)

    async def aclose(self) -> None:
        """Send DISC (best effort) and close."""
        try:
            async with self._send_lock:
                await self._stream.send_all(
                    _REQ.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_DISC, 0, 0, 0)
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await self._stream.aclose()
