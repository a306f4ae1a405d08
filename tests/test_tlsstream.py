"""TlsSocketStream: mutual TLS over a C-level SSLSocket, on loopback."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from geoclus.ca import (
    client_ssl_context,
    init_ca,
    issue_node_cert,
    peer_node_name,
    server_ssl_context,
)
from geoclus.tlsstream import TlsSocketStream, wrap_client, wrap_server


@pytest.fixture
def ca(tmp_path):
    d = tmp_path / "ca"
    init_ca(str(d), "test")
    for node in ("site-a", "site-b"):
        issue_node_cert(str(d), node)
    return d


def contexts(ca, node: str):
    files = (f"{ca}/ca.crt", f"{ca}/{node}.crt", f"{ca}/{node}.key")
    return server_ssl_context(*files), client_ssl_context(*files)


async def tls_pair(ca, client_ca=None, client_node="site-a"):
    """A connected (client, server) pair of TlsSocketStreams."""
    server_ctx, _ = contexts(ca, "site-b")
    _, client_ctx = contexts(client_ca or ca, client_node)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    result: dict[str, object] = {}

    async def accept() -> None:
        stream = await listeners[0].accept()
        try:
            result["server"] = await wrap_server(stream, server_ctx)
        except trio.BrokenResourceError as exc:
            result["server_error"] = exc

    async with trio.open_nursery() as n:
        n.start_soon(accept)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            result["client"] = await wrap_client(tcp, client_ctx)
        except trio.BrokenResourceError as exc:
            result["client_error"] = exc
    await listeners[0].aclose()
    return result


async def test_mutual_tls_round_trip_and_identities(ca) -> None:
    r = await tls_pair(ca)
    client, server = r["client"], r["server"]
    assert isinstance(client, TlsSocketStream) and isinstance(server, TlsSocketStream)
    assert peer_node_name(client) == "site-b"
    assert peer_node_name(server) == "site-a"
    assert client.ssl_object.version() == "TLSv1.3"
    await client.send_all(b"hello")
    got = b""
    while len(got) < 5:
        got += await server.receive_some(100)
    assert got == b"hello"
    await client.aclose()
    assert await server.receive_some(10) == b""  # peer closed: end of stream
    await server.aclose()


async def test_bulk_transfer_both_ways_at_once(ca) -> None:
    r = await tls_pair(ca)
    client, server = r["client"], r["server"]
    up, down = os.urandom(8 << 20), os.urandom(3 << 20)

    async def pump(src: TlsSocketStream, data: bytes) -> None:
        for i in range(0, len(data), 1 << 20):
            await src.send_all(data[i : i + (1 << 20)])

    async def drain(dst: TlsSocketStream, n: int, out: list[bytes]) -> None:
        got = 0
        while got < n:
            chunk = await dst.receive_some()
            assert chunk
            out.append(chunk)
            got += len(chunk)

    got_up: list[bytes] = []
    got_down: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(pump, client, up)
        n.start_soon(pump, server, down)
        n.start_soon(drain, server, len(up), got_up)
        n.start_soon(drain, client, len(down), got_down)
    assert b"".join(got_up) == up and b"".join(got_down) == down
    await client.aclose()
    await server.aclose()


async def test_certificate_from_another_ca_is_refused(ca, tmp_path) -> None:
    other = tmp_path / "other"
    init_ca(str(other), "intruders")
    issue_node_cert(str(other), "site-a")
    r = await tls_pair(ca, client_ca=other)
    assert "server_error" in r  # the server refused the foreign client
    assert "client" not in r or "server" not in r


async def test_close_wakes_a_blocked_receiver(ca) -> None:
    r = await tls_pair(ca)
    client, server = r["client"], r["server"]
    outcome: list[str] = []

    async def receiver() -> None:
        try:
            await server.receive_some(10)
        except trio.ClosedResourceError:
            outcome.append("closed")

    async with trio.open_nursery() as n:
        n.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        await server.aclose()
    assert outcome == ["closed"]
    await client.aclose()


async def test_two_concurrent_senders_are_refused(ca) -> None:
    r = await tls_pair(ca)
    client, server = r["client"], r["server"]
    big = os.urandom(32 << 20)  # larger than the socket buffers: the first send blocks
    async with trio.open_nursery() as n:
        n.start_soon(client.send_all, big)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await client.send_all(b"x")
        n.cancel_scope.cancel()
    await client.aclose()
    await server.aclose()
