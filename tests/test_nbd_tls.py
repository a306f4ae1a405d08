"""NBD over TLS (NBD_OPT_STARTTLS, the spec's FORCEDTLS mode) with the cluster CA:
the codec's option gate (sans-I/O, fed whole and byte by byte), the server's
upgrade of Unix and TCP connections (mutual TLS: client certificates from the
cluster CA are required), real clients (``nbdinfo`` with ``nbds://`` URIs and
``tls-certificates=DIR``, ``qemu-img`` with ``tls-creds-x509``), the
``[export] tls`` configuration and the daemon that serves it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from geoclus.ca import NodeCertPaths, client_ssl_context, init_ca, issue_node_cert
from geoclus.ca import server_ssl_context as make_server_context
from geoclus.config import TlsConfig, parse_config
from geoclus.daemon import Daemon, DaemonAddresses
from geoclus.errors import ConfigError
from geoclus.nbd import NbdServer, StartTls
from geoclus.nbd import proto as p
from geoclus.nbd.codec import (
    ClientClosed,
    ExportSelected,
    HandshakeAborted,
    NbdServerCodec,
    OptionHandled,
    Phase,
)
from replicator.memory import MemoryDevice
from tests.test_nbd_codec import (
    EXPORTS,
    client_flags,
    drive,
    info_data,
    option,
    parse_option_replies,
    request,
)
from tests.test_nbd_interop import need, run
from tests.test_nbd_server import Client, descriptors, start

KiB = 1024
MiB = 1024 * KiB

# --- codec: the FORCEDTLS option gate ------------------------------------------------------------


def tls_codec() -> NbdServerCodec:
    codec = NbdServerCodec(EXPORTS, default_export="vol", tls=True)
    codec.data_to_send()
    return codec


def chunks_for(how: str, *parts: bytes) -> list[bytes]:
    """Each part is what one side sends before waiting for the other: fed as is
    ("whole") or one byte at a time."""
    if how == "whole":
        return list(parts)
    return [b[i : i + 1] for b in parts for i in range(len(b))]


FEEDS = pytest.mark.parametrize("how", ["whole", "bytewise"])

BEFORE_TLS = [
    p.NBD_OPT_LIST,
    p.NBD_OPT_INFO,
    p.NBD_OPT_GO,
    p.NBD_OPT_STRUCTURED_REPLY,
    p.NBD_OPT_LIST_META_CONTEXT,
    p.NBD_OPT_SET_META_CONTEXT,
    p.NBD_OPT_EXTENDED_HEADERS,
    99,
]


@FEEDS
def test_every_option_but_starttls_and_abort_needs_tls_first(how: str) -> None:
    codec = tls_codec()
    refused = b"".join(
        option(o, info_data("vol") if o in (p.NBD_OPT_INFO, p.NBD_OPT_GO) else b"")
        for o in BEFORE_TLS
    )
    before = client_flags() + refused + option(p.NBD_OPT_STARTTLS)
    # after the ACK the client runs TLS; the codec sees the decrypted bytes
    after = option(p.NBD_OPT_STRUCTURED_REPLY) + option(p.NBD_OPT_GO, info_data("vol"))
    events, err, out = drive(codec, chunks_for(how, before, after))
    assert err is None
    assert events == [
        *[OptionHandled(o, p.NBD_REP_ERR_TLS_REQD) for o in BEFORE_TLS],
        StartTls(),
        OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK),
        ExportSelected("vol", EXPORTS["vol"]),
    ]
    replies = parse_option_replies(out)
    # TLS_REQD replies carry no NBD_REP_INFO (the spec: reveal nothing)
    assert [r[1] for r in replies[: len(BEFORE_TLS)]] == [p.NBD_REP_ERR_TLS_REQD] * len(BEFORE_TLS)
    assert b"NBD_OPT_STARTTLS" in replies[0][2]
    assert replies[len(BEFORE_TLS)] == (p.NBD_OPT_STARTTLS, p.NBD_REP_ACK, b"")
    assert codec.tls_active and codec.structured_replies


def test_abort_before_tls_is_acked() -> None:
    codec = tls_codec()
    events, err, out = drive(codec, [client_flags() + option(p.NBD_OPT_ABORT)], eof=True)
    assert err is None
    assert events == [HandshakeAborted(), ClientClosed()]
    assert parse_option_replies(out) == [(p.NBD_OPT_ABORT, p.NBD_REP_ACK, b"")]
    assert not codec.tls_active


@FEEDS
def test_export_name_before_tls_terminates_the_session(how: str) -> None:
    codec = tls_codec()
    events, err, out = drive(
        codec, chunks_for(how, client_flags() + option(p.NBD_OPT_EXPORT_NAME, b"vol"))
    )
    assert events == [] and out == b""
    assert err is not None and "requires TLS" in err.reason
    assert codec.phase is Phase.ERROR


def test_export_name_after_tls_works() -> None:
    codec = tls_codec()
    events, err, out = drive(
        codec,
        [client_flags() + option(p.NBD_OPT_STARTTLS), option(p.NBD_OPT_EXPORT_NAME, b"vol")],
    )
    assert err is None
    assert events == [StartTls(), ExportSelected("vol", EXPORTS["vol"])]
    assert out[20:] == struct.pack(">QH", 4 * MiB, EXPORTS["vol"].transmission_flags)


@FEEDS
def test_starttls_refusals(how: str) -> None:
    codec = tls_codec()
    before = client_flags() + option(p.NBD_OPT_STARTTLS, b"junk") + option(p.NBD_OPT_STARTTLS)
    after = option(p.NBD_OPT_STARTTLS) + option(p.NBD_OPT_GO, info_data("vol"))
    events, err, out = drive(codec, chunks_for(how, before, after))
    assert err is None
    assert events == [
        OptionHandled(p.NBD_OPT_STARTTLS, p.NBD_REP_ERR_INVALID),  # data with it
        StartTls(),
        OptionHandled(p.NBD_OPT_STARTTLS, p.NBD_REP_ERR_INVALID),  # already on
        ExportSelected("vol", EXPORTS["vol"]),
    ]
    replies = parse_option_replies(out)
    assert replies[0][2] == b"NBD_OPT_STARTTLS takes no data"
    assert replies[2][2] == b"TLS is already active"


def test_starttls_without_tls_configured_is_policy() -> None:
    codec = NbdServerCodec(EXPORTS, default_export="vol")
    codec.data_to_send()
    stream = client_flags() + option(p.NBD_OPT_STARTTLS) + option(p.NBD_OPT_GO, info_data("vol"))
    events, err, out = drive(codec, [stream])
    assert err is None
    assert events == [
        OptionHandled(p.NBD_OPT_STARTTLS, p.NBD_REP_ERR_POLICY),
        ExportSelected("vol", EXPORTS["vol"]),
    ]
    assert parse_option_replies(out)[0][1] == p.NBD_REP_ERR_POLICY
    assert not codec.tls_active


def test_bytes_pipelined_after_starttls_are_a_protocol_error() -> None:
    codec = tls_codec()
    stream = client_flags() + option(p.NBD_OPT_STARTTLS) + b"\x16\x03\x01"  # a ClientHello start
    events, err, out = drive(codec, [stream])
    assert events == [] and out == b""
    assert err is not None and "after NBD_OPT_STARTTLS" in err.reason


def test_no_tls_required_replies_once_tls_is_on() -> None:
    codec = tls_codec()
    events, err, out = drive(
        codec,
        [
            client_flags() + option(p.NBD_OPT_STARTTLS),
            option(99) + option(p.NBD_OPT_INFO, info_data("missing")) + option(p.NBD_OPT_LIST),
        ],
    )
    assert err is None
    assert [e.reply_type for e in events[1:]] == [  # type: ignore[union-attr]
        p.NBD_REP_ERR_UNSUP,
        p.NBD_REP_ERR_UNKNOWN,
        p.NBD_REP_ACK,
    ]
    assert p.NBD_REP_ERR_TLS_REQD not in [r[1] for r in parse_option_replies(out)]


def test_transmission_after_tls_is_unchanged() -> None:
    codec = tls_codec()
    events, err, _ = drive(
        codec,
        [
            client_flags() + option(p.NBD_OPT_STARTTLS),
            option(p.NBD_OPT_GO, info_data("vol")) + request(p.NBD_CMD_FLUSH, 1),
        ],
    )
    assert err is None and len(events) == 3
    assert codec.tls_active and codec.phase is Phase.TRANSMISSION


# --- certificates -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeCertPaths]:
    """The cluster CA with a server node "localhost" (so libnbd's name check on
    nbds://localhost passes) and a client; a foreign CA with its own client."""
    ours = tmp_path_factory.mktemp("pki") / "ca"
    foreign = tmp_path_factory.mktemp("foreign") / "ca"
    init_ca(ours, "prod")
    init_ca(foreign, "evil")
    return {
        "server": issue_node_cert(ours, "localhost"),
        "client": issue_node_cert(ours, "nbd-client"),
        "mallory": issue_node_cert(foreign, "mallory"),
    }


def server_context(pki: dict[str, NodeCertPaths]) -> ssl.SSLContext:
    s = pki["server"]
    return make_server_context(s.ca_cert, s.cert, s.key)


def client_context(pki: dict[str, NodeCertPaths], who: str = "client") -> ssl.SSLContext:
    c = pki[who]
    return client_ssl_context(c.ca_cert, c.cert, c.key)


def libnbd_certificates(pki: dict[str, NodeCertPaths], where: Path, who: str = "client") -> Path:
    """The directory layout libnbd (and qemu's tls-creds-x509) read: ca-cert.pem,
    client-cert.pem, client-key.pem."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki["server"].ca_cert, where / "ca-cert.pem")
    shutil.copy(pki[who].cert, where / "client-cert.pem")
    shutil.copy(pki[who].key, where / "client-key.pem")
    return where


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="gt") as d:
        yield Path(d)


@pytest.fixture
async def tls_served(nursery: trio.Nursery, short_dir: Path, pki):
    device = MemoryDevice(4 * MiB)
    await device.write(MiB, b"t" * (64 * KiB))
    sock = str(short_dir / "nbd.sock")
    server = NbdServer(
        {"demo": device}, unix_path=sock, tcp_port=0, tls_context=server_context(pki)
    )
    addresses = await start(nursery, server)
    yield sock, addresses.tcp[0][1], server, device


# --- the server, with our client ---------------------------------------------------------------


async def test_options_before_starttls_are_refused_on_the_wire(tls_served) -> None:
    sock, _, server, _ = tls_served
    c = await Client.connect(sock)
    await c.greet()
    assert [r[0] for r in await c.option(p.NBD_OPT_LIST)] == [p.NBD_REP_ERR_TLS_REQD]
    assert await c.go("demo") == p.NBD_REP_ERR_TLS_REQD
    assert await c.option(p.NBD_OPT_ABORT) == [(p.NBD_REP_ACK, b"")]
    assert await c.at_eof()
    assert server.statistics().tls_sessions == 0
    await c.aclose()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_starttls_then_everything_inside_tls(tls_served, pki, transport: str) -> None:
    sock, port, server, device = tls_served
    if transport == "unix":
        c = await Client.connect(sock)
    else:
        c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.greet()
    assert await c.starttls(client_context(pki)) == p.NBD_REP_ACK
    assert isinstance(c.stream, trio.SSLStream)
    assert c.stream.version() == "TLSv1.3"
    assert await c.option(p.NBD_OPT_STRUCTURED_REPLY) == [(p.NBD_REP_ACK, b"")]
    replies = await c.meta_context(p.NBD_OPT_SET_META_CONTEXT, "demo", ["base:allocation"])
    assert replies[-1] == (p.NBD_REP_ACK, b"")
    assert [r[0] for r in await c.option(p.NBD_OPT_STARTTLS)] == [p.NBD_REP_ERR_INVALID]
    assert await c.go("demo") == p.NBD_REP_ACK
    data = os.urandom(128 * KiB)  # large enough for several TLS records
    await c.send(p.NBD_CMD_WRITE, 1, 2 * MiB, len(data), payload=data)
    assert await c.structured() == (1, [(p.NBD_REPLY_TYPE_NONE, b"")])
    await c.send(p.NBD_CMD_READ, 2, 2 * MiB, len(data))
    cookie, ((rtype, payload),) = await c.structured()
    assert (cookie, rtype) == (2, p.NBD_REPLY_TYPE_OFFSET_DATA)
    assert payload[8:] == data
    await c.send(p.NBD_CMD_BLOCK_STATUS, 3, MiB, MiB)
    _, ((_, payload),) = await c.structured()
    assert descriptors(payload) == [(64 * KiB, 0), (MiB - 64 * KiB, 3)]
    await c.send(p.NBD_CMD_DISC, 4)
    assert await c.stream.receive_some(1) == b""
    assert await device.read(2 * MiB, len(data)) == data
    stats = server.statistics()
    assert stats.tls_sessions == 1 and stats.tls_failures == 0 and stats.protocol_errors == 0
    await c.aclose()


@pytest.mark.parametrize("who", ["mallory", None])
async def test_client_without_a_cluster_certificate_is_refused(tls_served, pki, who) -> None:
    sock, _, server, _ = tls_served
    c = await Client.connect(sock)
    await c.greet()
    if who is None:  # no certificate at all
        ctx = ssl.create_default_context(cafile=str(pki["server"].ca_cert))
        ctx.check_hostname = False
    else:  # a certificate from a foreign CA
        ctx = client_context(pki, who)
        ctx.load_verify_locations(cafile=str(pki["server"].ca_cert))
    with pytest.raises(trio.BrokenResourceError):
        await c.starttls(ctx)
        # TLS 1.3: the server's verdict on our certificate arrives after our
        # side of the handshake finished; the first read sees it.
        await c.go("demo")
    with trio.fail_after(5):
        while server.statistics().tls_failures == 0:
            await trio.testing.wait_all_tasks_blocked()
            await trio.lowlevel.checkpoint()
    assert server.statistics().tls_sessions == 0
    await trio.aclose_forcefully(c.stream)


async def test_garbage_instead_of_a_handshake_closes_the_connection(tls_served) -> None:
    sock, _, server, _ = tls_served
    c = await Client.connect(sock)
    await c.greet()
    assert await c.option(p.NBD_OPT_STARTTLS) == [(p.NBD_REP_ACK, b"")]
    await c.stream.send_all(b"this is not a TLS record\r\n" * 4)
    try:
        closed = await c.at_eof()
    except trio.BrokenResourceError:
        closed = True  # reset, because our bytes were left unread: closed too
    assert closed
    assert server.statistics().tls_failures == 1
    await c.aclose()


async def test_silent_client_after_starttls_times_out(
    nursery: trio.Nursery, short_dir: Path, pki, autojump_clock: trio.testing.MockClock
) -> None:
    sock = str(short_dir / "nbd.sock")
    server = NbdServer(
        {"demo": MemoryDevice(MiB)},
        unix_path=sock,
        tls_context=server_context(pki),
        handshake_timeout_s=5,
    )
    await start(nursery, server)
    c = await Client.connect(sock)
    await c.greet()
    started = trio.current_time()
    assert await c.option(p.NBD_OPT_STARTTLS) == [(p.NBD_REP_ACK, b"")]
    assert await c.at_eof()  # the TLS handshake counts against the handshake timeout
    assert trio.current_time() - started == pytest.approx(5, abs=0.5)
    await c.aclose()


def test_server_refuses_a_client_context(pki) -> None:
    with pytest.raises(ConfigError, match="server-side"):
        NbdServer({"v": MemoryDevice(MiB)}, tcp_port=0, tls_context=client_context(pki))


# --- real clients ----------------------------------------------------------------------------


@pytest.mark.interop
async def test_nbdinfo_over_tls_unix_and_tcp(tls_served, pki, short_dir: Path) -> None:
    nbdinfo = need("nbdinfo")
    sock, port, server, _ = tls_served
    certs = libnbd_certificates(pki, short_dir / "certs")
    for uri in (
        f"nbds+unix:///demo?socket={sock}&tls-certificates={certs}",
        # libnbd checks the server's name on TCP: our server node is "localhost"
        f"nbds://localhost:{port}/demo?tls-certificates={certs}",
    ):
        info = json.loads(await run(nbdinfo, "--json", uri))
        assert info["TLS"] is True and info["structured"] is True
        (export,) = info["exports"]
        assert export["export-size"] == 4 * MiB
        assert export["contexts"] == ["base:allocation"]
        assert export["can_multi_conn"] is True
    extents = json.loads(
        await run(
            nbdinfo, "--map", "--json", f"nbds+unix:///demo?socket={sock}&tls-certificates={certs}"
        )
    )
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, MiB, 3),
        (MiB, 64 * KiB, 0),
        (MiB + 64 * KiB, 3 * MiB - 64 * KiB, 3),
    ]
    stats = server.statistics()
    assert stats.tls_sessions >= 3 and stats.tls_failures == 0 and stats.protocol_errors == 0


async def failing(*argv: str) -> str:
    with trio.fail_after(60):
        result = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode != 0, result.stdout
    return result.stderr.decode()


@pytest.mark.interop
async def test_nbdinfo_without_tls_or_with_a_foreign_certificate_fails(
    tls_served, pki, short_dir: Path
) -> None:
    nbdinfo = need("nbdinfo")
    sock, _, server, _ = tls_served
    await failing(nbdinfo, "--json", f"nbd+unix:///demo?socket={sock}")
    foreign = libnbd_certificates(pki, short_dir / "foreign", who="mallory")
    await failing(nbdinfo, "--json", f"nbds+unix:///demo?socket={sock}&tls-certificates={foreign}")
    assert server.statistics().tls_sessions == 0


@pytest.mark.interop
async def test_qemu_img_over_tls(tls_served, pki, short_dir: Path) -> None:
    qemu_img = need("qemu-img")
    sock, _, _, _ = tls_served
    certs = libnbd_certificates(pki, short_dir / "qcerts")
    out = await run(
        qemu_img,
        "map",
        "--output=json",
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
        "--image-opts",
        # qemu checks the server's name on Unix sockets too
        f"driver=nbd,path={sock},export=demo,tls-creds=tls0,tls-hostname=localhost",
    )
    assert [(e["start"], e["length"], e["data"]) for e in json.loads(out)] == [
        (0, MiB, False),
        (MiB, 64 * KiB, True),
        (MiB + 64 * KiB, 3 * MiB - 64 * KiB, False),
    ]


# --- configuration and the daemon -------------------------------------------------------------


def site_config(base: Path, pki, export: dict[str, object]) -> dict[str, object]:
    s = pki["server"]
    for name, src in (("ca.crt", s.ca_cert), ("node.crt", s.cert), ("node.key", s.key)):
        shutil.copy(src, base / name)
    return {
        "volume": {
            "name": "demo",
            "size": "4MiB",
            "store": "demo.img",
            "mode": "sync",
            "role": "secondary",
        },
        "node": {"name": "localhost"},
        "replication": {"listen": "127.0.0.1:0", "tls": False},
        "export": export,
        "control": {"socket": "demo.ctl"},
    }


TLS_FILES = {"ca": "ca.crt", "cert": "node.crt", "key": "node.key"}


def test_export_tls_config(short_dir: Path, pki) -> None:
    path = str(short_dir / "site.toml")
    cfg = parse_config(site_config(short_dir, pki, {"nbd": "d.nbd", "tls": TLS_FILES}), path)
    assert cfg.export.tls == TlsConfig(
        str(short_dir / "ca.crt"), str(short_dir / "node.crt"), str(short_dir / "node.key")
    )
    assert not cfg.export.plain_tcp
    # default: no TLS; a TCP export without it is plain TCP (the daemon warns)
    cfg = parse_config(site_config(short_dir, pki, {"nbd": "tcp://127.0.0.1:0"}), path)
    assert cfg.export.tls is None and cfg.export.plain_tcp
    cfg = parse_config(site_config(short_dir, pki, {"nbd": "d.nbd", "tls": False}), path)
    assert cfg.export.tls is None and not cfg.export.plain_tcp


@pytest.mark.parametrize(
    ("tls", "key", "problem"),
    [
        (True, "export.tls", "must be a table"),
        ("yes", "export.tls", "must be a table"),
        ({**TLS_FILES, "peer_node": "x"}, "export.tls.peer_node", "unknown key"),
        ({"ca": "ca.crt", "cert": "node.crt"}, "export.tls.key", "missing"),
        ({**TLS_FILES, "key": "nope.key"}, "export.tls.key", "does not exist"),
    ],
)
def test_bad_export_tls_config(short_dir: Path, pki, tls: object, key: str, problem: str) -> None:
    doc = site_config(short_dir, pki, {"nbd": "d.nbd", "tls": tls})
    with pytest.raises(ConfigError) as info:
        parse_config(doc, str(short_dir / "site.toml"))
    assert info.value.key == key and problem in info.value.problem


async def run_daemon(
    nursery: trio.Nursery, doc: dict[str, object], base: Path
) -> tuple[Daemon, DaemonAddresses]:
    daemon = Daemon(parse_config(doc, str(base / "site.toml")))
    addresses: DaemonAddresses = await nursery.start(
        lambda task_status: daemon.run(task_status=task_status, handle_signals=False)
    )
    return daemon, addresses


@pytest.mark.interop
async def test_daemon_serves_its_export_over_tls(
    short_dir: Path, pki, caplog: pytest.LogCaptureFixture
) -> None:
    nbdinfo = need("nbdinfo")
    certs = libnbd_certificates(pki, short_dir / "certs")
    doc = site_config(short_dir, pki, {"nbd": "tcp://127.0.0.1:0", "tls": TLS_FILES})
    with caplog.at_level(logging.WARNING, logger="geoclus.daemon"):
        async with trio.open_nursery() as nursery:
            daemon, addresses = await run_daemon(nursery, doc, short_dir)
            ((_, port),) = addresses.nbd_tcp
            info = json.loads(
                await run(
                    nbdinfo, "--json", f"nbds://localhost:{port}/demo?tls-certificates={certs}"
                )
            )
            assert info["TLS"] is True
            (export,) = info["exports"]
            assert export["is_read_only"] is True  # a secondary serves reads only
            assert export["can_multi_conn"] is True
            await failing(nbdinfo, "--json", f"nbd://127.0.0.1:{port}/demo")
            assert daemon.nbd is not None and daemon.nbd.statistics().tls_sessions >= 1
            daemon.request_shutdown()
    assert not [r for r in caplog.records if "plain TCP" in r.getMessage()]


async def test_daemon_warns_about_a_plain_tcp_export(
    short_dir: Path, pki, caplog: pytest.LogCaptureFixture
) -> None:
    doc = site_config(short_dir, pki, {"nbd": "tcp://127.0.0.1:0"})
    with caplog.at_level(logging.WARNING, logger="geoclus.daemon"):
        async with trio.open_nursery() as nursery:
            daemon, addresses = await run_daemon(nursery, doc, short_dir)
            ((_, port),) = addresses.nbd_tcp
            c = Client(await trio.open_tcp_stream("127.0.0.1", port))
            await c.greet()
            assert await c.go("demo") == p.NBD_REP_ACK  # no TLS asked for
            await c.aclose()
            daemon.request_shutdown()
    (warning,) = [r for r in caplog.records if "plain TCP" in r.getMessage()]
    assert "export.tls" in warning.getMessage()


# --- our NbdClient (used by the cluster's quorum disk) over STARTTLS -------------------------


async def test_our_client_upgrades_with_starttls_and_reads_and_writes(tls_served, pki) -> None:
    from geoclus.nbd.client import NbdClient

    _, port, server, device = tls_served
    c = await NbdClient.connect_tcp("127.0.0.1", port, "demo", tls_context=client_context(pki))
    async with trio.open_nursery() as n:
        n.start_soon(c.run)
        assert c.export is not None and c.export.size_bytes == 4 * MiB
        data = os.urandom(64 * KiB)
        await c.write(3 * MiB, data, fua=True)
        assert await c.read(3 * MiB, len(data)) == data
        assert await c.read(MiB, 4 * KiB) == b"t" * (4 * KiB)
        await c.aclose()
    assert await device.read(3 * MiB, len(data)) == data
    assert server.statistics().tls_sessions >= 1


async def test_our_client_without_tls_is_told_the_export_needs_it(tls_served) -> None:
    from geoclus.nbd.client import NbdClient, NbdClientError

    _, port, _, _ = tls_served
    with pytest.raises(NbdClientError, match="requires TLS"):
        await NbdClient.connect_tcp("127.0.0.1", port, "demo")


async def test_our_client_refuses_a_server_without_tls_or_from_another_ca(
    nursery: trio.Nursery, tls_served, pki
) -> None:
    from geoclus.nbd.client import NbdClient, NbdClientError

    plain = NbdServer({"demo": MemoryDevice(MiB)}, tcp_port=0)
    addresses = await start(nursery, plain)
    with pytest.raises(NbdClientError, match="export has no TLS"):
        await NbdClient.connect_tcp(
            "127.0.0.1", addresses.tcp[0][1], "demo", tls_context=client_context(pki)
        )
    _, port, _, _ = tls_served  # a server whose certificate our foreign CA does not know
    with pytest.raises(NbdClientError, match="TLS handshake"):
        await NbdClient.connect_tcp(
            "127.0.0.1", port, "demo", tls_context=client_context(pki, "mallory")
        )
