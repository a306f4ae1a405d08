"""Trio shell around :class:`~geoclus.nbd.codec.NbdServerCodec`: an NBD server.

:class:`NbdServer` listens on a Unix socket and/or TCP, runs the handshake of each
connection through the codec, then serves requests against the chosen
:class:`~replicator.device.BlockDevice`:

* one reader per connection parses requests and starts a task per request, but
  only while the connection holds fewer than ``max_in_flight_requests`` requests
  and ``max_in_flight_bytes`` of payload and reply data; at the bound it stops
  reading the socket (TCP back-pressure does the rest);
* a READ is first offered to the device's optional ``read_nowait(offset,
  length)``: a synchronous call that never blocks (e.g. an ``RWF_NOWAIT`` read
  of the page cache) and returns the data (bytes, or a bytearray it gives up)
  or None. When it answers, the reader queues the reply itself, without a
  task; when it returns None or raises, the read runs as a task like any
  other request;
* requests run concurrently and may complete out of order;
* one writer per connection sends replies, several per ``sendmsg`` when they are
  ready together, header and data as separate iovecs (no concatenation copy);
* device exceptions become NBD errors (:func:`nbd_error_for`), never a crash;
* ``NBD_CMD_DISC``, end of stream or a protocol error stop the reader; in-flight
  requests still finish and are answered before the connection closes;
* ``NBD_CMD_BLOCK_STATUS`` asks the device's optional ``block_status``
  (:class:`~replicator.device.SupportsBlockStatus`); a device without it is
  reported as allocated data everywhere;
* with ``tls_context`` every connection must upgrade with ``NBD_OPT_STARTTLS``
  first (the spec's FORCEDTLS mode): after the acknowledgement the socket is
  wrapped in TLS (:class:`~geoclus.tlsstream.TlsSocketStream`, server side) and
  haggling goes on inside it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import trio

from geoclus.errors import (
    ConfigError,
    GeoclusError,
    IOAlignmentError,
    NotPrimaryError,
    ProtocolError,
    StoreError,
)
from geoclus.nbd import proto as p
from geoclus.nbd.codec import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    NEED_DATA,
    BlockStatusRequest,
    ClientClosed,
    DeviceRequest,
    DisconnectRequest,
    ExportInfo,
    ExportSelected,
    FlushRequest,
    HandshakeAborted,
    NbdServerCodec,
    ReadRequest,
    RejectedRequest,
    StartTls,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)
from geoclus.tlsstream import TlsSocketStream
from replicator.device import BlockDevice

log = logging.getLogger("geoclus.nbd")

# --- Limits (each a default for an NbdServer parameter unless noted) ---------------

# Requests one connection may have in flight (started, not yet answered). Guards
# against a client queueing an unbounded number of tasks.
DEFAULT_MAX_IN_FLIGHT_REQUESTS: Final = 64
# Payload + reply bytes one connection may hold in flight. Guards against a client
# pinning unbounded memory with large reads/writes. A single request larger than
# this still runs, alone.
DEFAULT_MAX_IN_FLIGHT_BYTES: Final = 64 * 1024 * 1024
# Simultaneous connections; more are closed at once. Guards against connection floods
# (each connection may hold up to max_in_flight_bytes).
DEFAULT_MAX_CONNECTIONS: Final = 128
# Time a client has to finish option haggling. Guards against idle half-open
# handshakes holding connection slots.
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 30.0
# Bytes asked of each recv(). Larger means fewer syscalls for big writes; it is also
# the most the codec buffers beyond one frame.
DEFAULT_RECEIVE_BYTES: Final = 256 * 1024
# Buffers gathered into one sendmsg() (Linux IOV_MAX is 1024).
MAX_SEND_BUFFERS: Final = 512
# Unexpected-error tracebacks logged per connection; later ones are only counted.
# Guards against a failing device flooding the log at request rate.
MAX_TRACEBACKS_PER_CONNECTION: Final = 8
# Pending connections the kernel queues on the Unix listener.
UNIX_LISTEN_BACKLOG: Final = 128
# Over TLS, reply buffers smaller than this are joined before sending (one TLS
# record instead of one per header); larger ones are sent as they are, not copied.
TLS_COALESCE_BYTES: Final = 64 * 1024
# A plain connection's receive yields to the scheduler at least this often even
# when data is always ready (it yields anyway whenever it has to wait).
_RECEIVE_YIELD_EVERY: Final = 16

_MODIFYING: Final = frozenset({p.NBD_CMD_WRITE, p.NBD_CMD_WRITE_ZEROES})


@dataclass(frozen=True, slots=True)
class NbdAddresses:
    """Where a started server listens: the Unix socket path and the bound TCP
    ``(host, port)`` pairs (real ports, also when 0 was asked for)."""

    unix_path: str | None
    tcp: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class NbdStatistics:
    """Counters since the server started (a snapshot)."""

    connections_accepted: int
    connections_active: int
    connections_refused: int
    protocol_errors: int
    requests_completed: int
    requests_failed: int
    bytes_read: int
    bytes_written: int
    tls_sessions: int
    tls_failures: int


def nbd_error_for(exc: Exception, command: int, *, past_end: bool) -> int:
    """Map a device exception to the NBD error a reply carries.

    ``IOAlignmentError`` → ``NBD_EINVAL`` (``NBD_ENOSPC`` for a write or
    write-zeroes whose range ends past the device, ``past_end``);
    ``NotPrimaryError``/``ReadOnlyError`` → ``NBD_EPERM``; any other exception →
    ``NBD_EIO``. Never raises.
    """
    if isinstance(exc, IOAlignmentError):
        if past_end and command in _MODIFYING:
            return p.NBD_ENOSPC
        return p.NBD_EINVAL
    if isinstance(exc, NotPrimaryError):
        return p.NBD_EPERM
    return p.NBD_EIO


def _check_export_name(name: str) -> None:
    raw = name.encode("utf-8")
    if len(raw) > p.NBD_MAX_STRING_BYTES or "\0" in name:
        raise ConfigError(
            "<nbd>", "exports", f"export name {name[:64]!r} is not a valid NBD string"
        )


def export_info_for(device: BlockDevice) -> ExportInfo:
    """Describe ``device`` for the handshake. Raises ``ConfigError`` if its size or
    block size cannot be advertised over NBD."""
    try:
        return ExportInfo(
            size_bytes=device.size_bytes,
            block_size_bytes=device.block_size,
            read_only=device.read_only,
        )
    except ValueError as exc:
        raise ConfigError("<nbd>", "exports", str(exc)) from None


class _PlainTransport:
    """The connection's own socket: ``recv`` and gathered ``sendmsg``.

    The system calls are made directly on the (non-blocking) descriptor, and the
    task waits for readiness only when one would block: trio's socket wrapper
    yields to the scheduler after every call, which cost more than the system
    call itself on this path. Cancellation is still seen before every call, and
    :meth:`receive` yields at least every :data:`_RECEIVE_YIELD_EVERY` calls so
    that a client that always has data ready cannot starve the other tasks.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._unyielded = 0

    async def receive(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                self._unyielded = 0
                await trio.lowlevel.wait_readable(self._sock)
                continue
            self._unyielded += 1
            if self._unyielded >= _RECEIVE_YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        """Send ``buffers`` in order with as few ``writev`` calls as the kernel
        allows (at most ``MAX_SEND_BUFFERS`` + 1 of them, under Linux's IOV_MAX)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self._fd
        while buffers:
            try:
                sent = os.writev(fd, buffers)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            i = 0
            n = len(buffers)
            while i < n:
                size = len(buffers[i])
                if sent < size:
                    break
                sent -= size
                i += 1
            if i == n:
                return
            buffers = buffers[i:]
            if sent:
                buffers[0] = memoryview(buffers[0])[sent:]

    async def aclose(self) -> None:
        """Nothing to do: the listener's stream owns and closes the socket."""
        await trio.lowlevel.checkpoint()


class _TlsTransport:
    """The connection after ``NBD_OPT_STARTTLS``: a TLS stream over its socket."""

    def __init__(self, tls: TlsSocketStream) -> None:
        self.tls = tls

    async def receive(self, max_bytes: int) -> bytes:
        return await self.tls.receive_some(max_bytes)

    async def send(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        small = bytearray()
        for buf in buffers:
            if len(buf) < TLS_COALESCE_BYTES:
                small += buf
                continue
            if small:
                await self.tls.send_all(small)
                small = bytearray()
            await self.tls.send_all(buf)
        if small:
            await self.tls.send_all(small)

    async def aclose(self) -> None:
        """Close the TLS session (send close_notify, as the spec asks before the
        connection closes; best effort, never waits for the peer), then the socket."""
        # SSLWantReadError: ours was sent and the peer's has not come; fine.
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self.tls.ssl_object.unwrap()
        await self.tls.aclose()


_Transport = _PlainTransport | _TlsTransport
# What a closed or failed transport raises (plain sockets: OSError; TLS: trio's).
_TRANSPORT_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def _wrap_server_side(stream: trio.SocketStream, context: ssl.SSLContext) -> TlsSocketStream:
    """Take the socket out of ``stream`` (TCP or Unix) into a server-side TLS
    stream whose handshake has not run yet; the caller owns it from here."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    try:
        sslsock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    return TlsSocketStream(sslsock)


class _InFlightBudget:
    """Per-connection admission control on requests and bytes in flight."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, cost_bytes: int) -> int:
        """Wait until one more request of ``cost_bytes`` fits; return the cost to
        release later (clamped so a single huge request can still run alone)."""
        cost = min(cost_bytes, self.max_bytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.requests and (
            self.requests >= self.max_requests or self.bytes + cost > self.max_bytes
        ):
            await self._lot.park()
        self.requests += 1
        self.bytes += cost
        return cost

    def release(self, requests: int, cost_bytes: int) -> None:
        self.requests -= requests
        self.bytes -= cost_bytes
        self._lot.unpark_all()


@dataclass(slots=True)
class _Reply:
    buffers: tuple[bytes | bytearray, ...]
    cost_bytes: int


class NbdServer:
    """An NBD server for a set of named block devices.

    ``exports`` maps export names to devices; an empty name from a client selects
    ``default_export``. It listens on ``unix_path`` (a socket file created mode
    0600; a stale one is replaced, a live one or a non-socket file is refused) and/or
    TCP ``tcp_host:tcp_port`` (``tcp_host`` None means loopback only; port 0 picks
    a free port). With ``tls_context`` (a server-side context, e.g.
    :func:`geoclus.ca.server_ssl_context` for mutual TLS with the cluster CA)
    every connection on every listener must upgrade with ``NBD_OPT_STARTTLS``
    before any other option. Other parameters are the limits described by the
    module constants of the same name.

    The constructor raises ``ConfigError`` for an invalid configuration (no
    listener, unknown default export, export that cannot be advertised).
    """

    def __init__(
        self,
        exports: Mapping[str, BlockDevice],
        *,
        unix_path: str | None = None,
        tcp_host: str | None = None,
        tcp_port: int | None = None,
        default_export: str | None = None,
        max_in_flight_requests: int = DEFAULT_MAX_IN_FLIGHT_REQUESTS,
        max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        receive_bytes: int = DEFAULT_RECEIVE_BYTES,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if unix_path is None and tcp_port is None:
            raise ConfigError("<nbd>", "listen", "give unix_path and/or tcp_port")
        if tcp_host is not None and tcp_port is None:
            raise ConfigError("<nbd>", "tcp_port", "tcp_host given without tcp_port")
        if default_export is not None and default_export not in exports:
            raise ConfigError(
                "<nbd>", "default_export", f"{default_export!r} is not one of the exports"
            )
        for key, value in (
            ("max_in_flight_requests", max_in_flight_requests),
            ("max_in_flight_bytes", max_in_flight_bytes),
            ("max_connections", max_connections),
            ("receive_bytes", receive_bytes),
        ):
            if value < 1:
                raise ConfigError("<nbd>", key, f"must be at least 1, not {value}")
        if handshake_timeout_s <= 0:
            raise ConfigError("<nbd>", "handshake_timeout_s", "must be positive")
        if tls_context is not None and tls_context.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise ConfigError("<nbd>", "tls_context", "needs a server-side SSL context")
        infos = {}
        for name, device in exports.items():
            _check_export_name(name)
            infos[name] = export_info_for(device)
        try:
            # Validates max_payload_bytes the same way every connection will.
            NbdServerCodec(infos, max_payload_bytes=max_payload_bytes)
        except ValueError as exc:
            raise ConfigError("<nbd>", "max_payload_bytes", str(exc)) from None

        self._exports = dict(exports)
        self._unix_path = unix_path
        self._tcp_host = "127.0.0.1" if tcp_host is None else tcp_host
        self._tcp_port = tcp_port
        self._default_export = default_export
        self.max_in_flight_requests = max_in_flight_requests
        self.max_in_flight_bytes = max_in_flight_bytes
        self.max_payload_bytes = max_payload_bytes
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.receive_bytes = receive_bytes
        self.tls_context = tls_context

        self._next_connection_id = 0
        self._accepted = 0
        self._active = 0
        self._refused = 0
        self._protocol_errors = 0
        self._completed = 0
        self._failed = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._tls_sessions = 0
        self._tls_failures = 0

    def statistics(self) -> NbdStatistics:
        """A snapshot of the server's counters. Never raises."""
        return NbdStatistics(
            connections_accepted=self._accepted,
            connections_active=self._active,
            connections_refused=self._refused,
            protocol_errors=self._protocol_errors,
            requests_completed=self._completed,
            requests_failed=self._failed,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            tls_sessions=self._tls_sessions,
            tls_failures=self._tls_failures,
        )

    async def serve(
        self, *, task_status: trio.TaskStatus[NbdAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; ``task_status.started`` gets the bound
        :class:`NbdAddresses`. The Unix socket file is removed on exit.

        Raises ``ConfigError`` if the Unix path is held by a live server or is not a
        socket, ``OSError`` if binding fails. Errors on one connection never end
        the server.
        """
        listeners: list[trio.SocketListener] = []
        unix_inode: int | None = None
        try:
            tcp: list[tuple[str, int]] = []
            if self._unix_path is not None:
                listener, unix_inode = await _open_unix_listener(self._unix_path)
                listeners.append(listener)
            if self._tcp_port is not None:
                for tcp_listener in await trio.open_tcp_listeners(
                    self._tcp_port, host=self._tcp_host
                ):
                    listeners.append(tcp_listener)
                    sockname = tcp_listener.socket.getsockname()
                    tcp.append((sockname[0], sockname[1]))
            addresses = NbdAddresses(self._unix_path, tuple(tcp))
            log.info("NBD server listening on %s (exports: %s)", addresses, sorted(self._exports))
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle_stream, listeners)
                task_status.started(addresses)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            if self._unix_path is not None and unix_inode is not None:
                _remove_socket_if_ours(self._unix_path, unix_inode)

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        self._accepted += 1
        self._next_connection_id += 1
        name = f"nbd#{self._next_connection_id}"
        if self._active >= self.max_connections:
            self._refused += 1
            log.warning("%s: refused, %d connections already open", name, self._active)
            await stream.aclose()
            return
        self._active += 1
        connection = _Connection(self, stream, name)
        try:
            await connection.run()
        except _TRANSPORT_ERRORS as exc:
            log.debug("%s: connection lost: %s", name, exc)
        except Exception:
            log.exception("%s: unexpected error; closing this connection", name)
        finally:
            self._active -= 1
            with trio.CancelScope(shield=True):
                await connection.transport.aclose()
                await stream.aclose()


class _Connection:
    """One client connection: handshake, then concurrent request handling."""

    def __init__(self, server: NbdServer, stream: trio.SocketStream, name: str) -> None:
        self._server = server
        self._stream = stream
        self.transport: _Transport = _PlainTransport(stream.socket)
        self._name = name
        self._tracebacks = 0
        self._send_failed = False
        self._reader_scope = trio.CancelScope()

    async def run(self) -> None:
        server = self._server
        infos = {name: export_info_for(dev) for name, dev in server._exports.items()}
        codec = NbdServerCodec(
            infos,
            default_export=server._default_export,
            max_payload_bytes=server.max_payload_bytes,
            tls=server.tls_context is not None,
        )
        try:
            selected: ExportSelected | None = None
            with trio.move_on_after(server.handshake_timeout_s) as scope:
                selected = await self._handshake(codec)
            if scope.cancelled_caught:
                log.info(
                    "%s: handshake not finished within %gs; closing",
                    self._name,
                    server.handshake_timeout_s,
                )
                return
            if selected is None:
                return
            log.debug("%s: serving export %r", self._name, selected.name)
            await self._transmission(codec, server._exports[selected.name])
        except ProtocolError as exc:
            self._protocol_error(exc)

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._server._protocol_errors += 1
        log.warning("%s: protocol error: %s; closing this connection", self._name, exc.reason)

    async def _handshake(self, codec: NbdServerCodec) -> ExportSelected | None:
        await self.transport.send([codec.data_to_send()])
        receive_bytes = self._server.receive_bytes
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                codec.receive_data(await self.transport.receive(receive_bytes))
                continue
            out = codec.data_to_send()
            if out:
                await self.transport.send([out])
            if isinstance(event, ExportSelected):
                return event
            if isinstance(event, HandshakeAborted | ClientClosed):
                return None
            if isinstance(event, StartTls) and not await self._upgrade():
                return None

    async def _upgrade(self) -> bool:
        """Run the TLS handshake after STARTTLS was acknowledged; False (and the
        connection should close) if it failed."""
        context = self._server.tls_context
        assert context is not None, "the codec offers STARTTLS only with a context"
        tls = _wrap_server_side(self._stream, context)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            # Counted and logged before the close the client will see.
            self._server._tls_failures += 1
            cause = exc.__cause__ or exc
            log.warning("%s: TLS handshake failed: %s; closing", self._name, cause)
            await trio.aclose_forcefully(tls)
            return False
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        self.transport = _TlsTransport(tls)
        self._server._tls_sessions += 1
        log.debug("%s: TLS established (%s)", self._name, tls.ssl_object.version())
        return True

    async def _transmission(self, codec: NbdServerCodec, device: BlockDevice) -> None:
        server = self._server
        budget = _InFlightBudget(server.max_in_flight_requests, server.max_in_flight_bytes)
        reply_send, reply_recv = trio.open_memory_channel[_Reply](server.max_in_flight_requests)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, reply_recv, budget)
            async with reply_send, trio.open_nursery() as requests:
                with self._reader_scope:
                    await self._reader(codec, device, requests, reply_send, budget)
            # Leaving `async with reply_send` after every request task finished ends
            # the writer once it has sent the last reply.

    async def _reader(
        self,
        codec: NbdServerCodec,
        device: BlockDevice,
        requests: trio.Nursery,
        reply_send: trio.MemorySendChannel[_Reply],
        budget: _InFlightBudget,
    ) -> None:
        transport = self.transport
        server = self._server
        receive_bytes = server.receive_bytes
        read_nowait: Callable[[int, int], bytes | bytearray | None] | None
        read_nowait = getattr(device, "read_nowait", None)
        try:
            while True:
                event = codec.next_event()
                kind = type(event)
                if event is NEED_DATA:
                    try:
                        data = await transport.receive(receive_bytes)
                    except _TRANSPORT_ERRORS as exc:
                        log.debug("%s: receive failed: %s", self._name, exc)
                        return
                    codec.receive_data(data)
                elif kind is ReadRequest:
                    assert isinstance(event, ReadRequest)
                    cost = await budget.acquire(event.length)
                    data = None
                    if read_nowait is not None:
                        try:
                            data = read_nowait(event.offset, event.length)
                        except Exception:
                            data = None  # the task path reports it
                    if data is not None and len(data) == event.length:
                        server._bytes_read += event.length
                        server._completed += 1
                        reply = _Reply(codec.encode_reply(event, p.NBD_SUCCESS, data), cost)
                        reply_send.send_nowait(reply)
                    else:
                        requests.start_soon(
                            self._run_request, codec, device, event, cost, reply_send
                        )
                elif kind is WriteRequest:
                    assert isinstance(event, WriteRequest)
                    cost = await budget.acquire(len(event.data))
                    requests.start_soon(self._run_request, codec, device, event, cost, reply_send)
                elif kind is RejectedRequest:
                    assert isinstance(event, RejectedRequest)
                    log.debug("%s: rejected request: %s", self._name, event.reason)
                    cost = await budget.acquire(0)
                    server._failed += 1
                    reply_send.send_nowait(_Reply(codec.encode_reply(event, event.error), cost))
                elif kind is DisconnectRequest or kind is ClientClosed:
                    return
                else:
                    assert isinstance(
                        event, FlushRequest | TrimRequest | WriteZeroesRequest | BlockStatusRequest
                    )
                    cost = await budget.acquire(0)
                    requests.start_soon(self._run_request, codec, device, event, cost, reply_send)
        except ProtocolError as exc:
            self._protocol_error(exc)

    async def _run_request(
        self,
        codec: NbdServerCodec,
        device: BlockDevice,
        request: DeviceRequest,
        cost: int,
        reply_send: trio.MemorySendChannel[_Reply],
    ) -> None:
        server = self._server
        message = ""
        try:
            kind = type(request)
            if kind is ReadRequest:
                assert isinstance(request, ReadRequest)
                data = await device.read(request.offset, request.length)
                if len(data) != request.length:
                    raise StoreError(
                        f"device returned {len(data)} bytes for a {request.length}-byte read"
                    )
                buffers = codec.encode_reply(request, p.NBD_SUCCESS, data)
                server._bytes_read += request.length
            elif kind is WriteRequest:
                assert isinstance(request, WriteRequest)
                await device.write(request.offset, request.data, request.fua)
                buffers = codec.encode_reply(request)
                server._bytes_written += len(request.data)
            elif kind is FlushRequest:
                await device.flush()
                buffers = codec.encode_reply(request)
            elif kind is TrimRequest:
                assert isinstance(request, TrimRequest)
                await device.trim(request.offset, request.length, request.fua)
                buffers = codec.encode_reply(request)
            elif kind is BlockStatusRequest:
                assert isinstance(request, BlockStatusRequest)
                probe: Callable[[int, int], Awaitable[list[tuple[int, int]]]] | None
                probe = getattr(device, "block_status", None)
                if probe is None:
                    # No allocation information: all data, contents unknown.
                    await trio.lowlevel.checkpoint()
                    extents = [(request.length, 0)]
                else:
                    extents = await probe(request.offset, request.length)
                buffers = codec.encode_block_status_reply(request, extents)
            else:
                assert isinstance(request, WriteZeroesRequest)
                await device.write_zeroes(request.offset, request.length, request.fua)
                buffers = codec.encode_reply(request)
            server._completed += 1
        except Exception as exc:
            error = self._error_for(exc, request, device)
            server._failed += 1
            if isinstance(exc, IOAlignmentError | NotPrimaryError):
                # Written for the client (misuse, or "write through the primary");
                # other errors may name server paths and go to the log only.
                message = str(exc)
            buffers = codec.encode_reply(request, error, message=message)
        reply_send.send_nowait(_Reply(buffers, cost))

    def _error_for(self, exc: Exception, request: DeviceRequest, device: BlockDevice) -> int:
        command = request.command
        if isinstance(request, WriteRequest):
            end = request.offset + len(request.data)
        elif isinstance(request, FlushRequest):
            end = 0
        else:
            end = request.offset + request.length
        try:
            past_end = end > device.size_bytes
        except Exception:
            past_end = False
        error = nbd_error_for(exc, command, past_end=past_end)
        what = p.COMMAND_NAMES.get(command, str(command))
        if isinstance(exc, IOAlignmentError | NotPrimaryError):
            log.debug("%s: %s failed: %s", self._name, what, exc)
        elif self._tracebacks < MAX_TRACEBACKS_PER_CONNECTION:
            self._tracebacks += 1
            if isinstance(exc, GeoclusError):
                log.warning("%s: %s failed: %s", self._name, what, exc)
            else:
                log.error(
                    "%s: %s raised an unexpected error; replying %s",
                    self._name,
                    what,
                    p.ERROR_NAMES.get(error, error),
                    exc_info=exc,
                )
        return error

    async def _writer(
        self, reply_recv: trio.MemoryReceiveChannel[_Reply], budget: _InFlightBudget
    ) -> None:
        transport = self.transport
        async with reply_recv:
            async for first in reply_recv:
                batch = [first]
                n_buffers = len(first.buffers)
                while n_buffers < MAX_SEND_BUFFERS:
                    try:
                        reply = reply_recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(reply)
                    n_buffers += len(reply.buffers)
                if not self._send_failed:
                    buffers: list[bytes | bytearray | memoryview] = [
                        b for r in batch for b in r.buffers
                    ]
                    try:
                        await transport.send(buffers)
                    except _TRANSPORT_ERRORS as exc:
                        # The client is gone: stop reading, let in-flight requests
                        # finish, drop their replies.
                        log.debug("%s: send failed: %s", self._name, exc)
                        self._send_failed = True
                        self._reader_scope.cancel()
                budget.release(len(batch), sum(r.cost_bytes for r in batch))


async def _open_unix_listener(path: str) -> tuple[trio.SocketListener, int]:
    """Bind a mode-0600 Unix listener at ``path``, replacing a stale socket file.

    Returns the listener and the socket file's inode (to remove only our own file
    later). Raises ``ConfigError`` if a live server holds the path or it is not a
    socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError("<nbd>", "unix_path", f"{path} exists and is not a socket")
        probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
        else:
            raise ConfigError("<nbd>", "unix_path", f"{path} is in use by a running server")
        finally:
            probe.close()
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        # umask makes the file 0600 from creation (no window where others could
        # connect); chmod states it explicitly.
        old_umask = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(UNIX_LISTEN_BACKLOG)
        inode = os.stat(path).st_ino
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock), inode


def _remove_socket_if_ours(path: str, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove NBD socket %s: %s", path, exc)


async def serve_nbd(
    exports: Mapping[str, BlockDevice],
    *,
    unix_path: str | None = None,
    tcp_host: str | None = None,
    tcp_port: int | None = None,
    default_export: str | None = None,
    max_in_flight_requests: int = DEFAULT_MAX_IN_FLIGHT_REQUESTS,
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
    tls_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[NbdAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``exports`` over NBD until cancelled (see :class:`NbdServer`).

    ``task_status.started`` receives the bound :class:`NbdAddresses`. Raises
    ``ConfigError`` for an invalid configuration or an occupied Unix path,
    ``OSError`` if a listener cannot be bound.
    """
    server = NbdServer(
        exports,
        unix_path=unix_path,
        tcp_host=tcp_host,
        tcp_port=tcp_port,
        default_export=default_export,
        max_in_flight_requests=max_in_flight_requests,
        max_in_flight_bytes=max_in_flight_bytes,
        max_payload_bytes=max_payload_bytes,
        max_connections=max_connections,
        handshake_timeout_s=handshake_timeout_s,
        tls_context=tls_context,
    )
    await server.serve(task_status=task_status)


__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IN_FLIGHT_BYTES",
    "DEFAULT_MAX_IN_FLIGHT_REQUESTS",
    "NbdAddresses",
    "NbdServer",
    "NbdStatistics",
    "export_info_for",
    "nbd_error_for",
    "serve_nbd",
]
