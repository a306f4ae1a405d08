"""Mutual TLS for replication links on a C-level ``ssl.SSLSocket``.

``trio.SSLStream`` does its record handling in Python around ``ssl.MemoryBIO``;
on the replication link that cost about 0.2-0.3 ms per round trip and capped
bulk transfer (one 16 KiB record per Python-level read). :class:`TlsSocketStream`
drives a non-blocking ``ssl.SSLSocket`` instead: OpenSSL reads and writes the
kernel socket itself, and trio only waits for readiness. Same certificates,
same contexts (:mod:`geoclus.ca`), same verification; only the plumbing differs.

Guarantees: ``receive_some`` never waits while OpenSSL holds decrypted bytes;
one task may send while another receives (trio's usual stream contract); any
TLS or socket failure becomes ``trio.BrokenResourceError`` (its ``__cause__``
is the original error); ``aclose`` wakes anyone waiting on the socket.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

# Bound on what one receive_some asks OpenSSL for (it returns at most what is
# decrypted and ready, usually one 16 KiB record).
DEFAULT_RECEIVE_BYTES = 256 * 1024


class _OneAtATime:
    """Raises trio.BusyResourceError if two tasks use one direction at once."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class TlsSocketStream(trio.abc.Stream):
    """A trio stream over a connected, non-blocking ``ssl.SSLSocket``.

    Build with :func:`wrap_client` / :func:`wrap_server` (they run the handshake).
    """

    def __init__(self, sslsock: ssl.SSLSocket) -> None:
        self._sock = sslsock
        self._send_conflict = _OneAtATime("another task is already sending on this stream")
        self._recv_conflict = _OneAtATime("another task is already receiving on this stream")
        self._closed = False

    @property
    def ssl_object(self) -> ssl.SSLSocket:
        """The underlying socket (for ``getpeercert`` / :func:`geoclus.ca.peer_node_name`)."""
        return self._sock

    @property
    def context(self) -> ssl.SSLContext:
        return self._sock.context

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._sock.getpeercert(binary_form)

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")

    async def do_handshake(self) -> None:
        """Run the TLS handshake; raise BrokenResourceError if it fails."""
        while True:
            self._check_open()
            try:
                self._sock.do_handshake()
                await trio.lowlevel.checkpoint()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._sock)
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._recv_conflict:
            n = DEFAULT_RECEIVE_BYTES if max_bytes is None else max_bytes
            if n < 1:
                raise ValueError("max_bytes must be >= 1")
            while True:
                self._check_open()
                try:
                    data = self._sock.recv(n)
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(self._sock)
                    continue
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(self._sock)
                    continue
                except ssl.SSLZeroReturnError:
                    data = b""  # the peer closed TLS cleanly
                except (ssl.SSLError, OSError) as exc:
                    if self._closed:
                        raise trio.ClosedResourceError("the TLS stream was closed") from None
                    raise trio.BrokenResourceError(f"TLS receive failed: {exc}") from exc
                await trio.lowlevel.checkpoint()
                return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            view = memoryview(data)
            if not view:
                await trio.lowlevel.checkpoint()
                return
            while view:
                self._check_open()
                try:
                    sent = self._sock.send(view)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(self._sock)
                    continue
                except ssl.SSLWantReadError:
                    # Only a renegotiation or post-handshake message needs this;
                    # TLS 1.3 without post-handshake auth never asks. The
                    # receiving task reads; we just retry after yielding.
                    await trio.sleep(0.001)
                    continue
                except (ssl.SSLError, OSError) as exc:
                    if self._closed:
                        raise trio.ClosedResourceError("the TLS stream was closed") from None
                    raise trio.BrokenResourceError(f"TLS send failed: {exc}") from exc
                view = view[sent:]
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            await trio.lowlevel.wait_writable(self._sock)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


def _detach(stream: trio.SocketStream) -> socket.socket:
    """Take the OS socket out of a trio SocketStream (which is left empty)."""
    fd = stream.socket.detach()
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def wrap_client(stream: trio.SocketStream, context: ssl.SSLContext) -> TlsSocketStream:
    """Run the client side of a TLS handshake over ``stream``'s socket."""
    sslsock = context.wrap_socket(
        _detach(stream), server_side=False, do_handshake_on_connect=False, server_hostname=None
    )
    tls = TlsSocketStream(sslsock)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def wrap_server(stream: trio.SocketStream, context: ssl.SSLContext) -> TlsSocketStream:
    """Run the server side of a TLS handshake over ``stream``'s socket."""
    sslsock = context.wrap_socket(_detach(stream), server_side=True, do_handshake_on_connect=False)
    tls = TlsSocketStream(sslsock)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls
