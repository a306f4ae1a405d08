"""Tests for the cluster CA and mutual TLS over real loopback TCP."""

from __future__ import annotations

import datetime
import ssl
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geoclus.ca import (
    CaError,
    NodeCertPaths,
    client_ssl_context,
    init_ca,
    issue_node_cert,
    peer_node_name,
    server_ssl_context,
    validate_node_name,
)
from geoclus.ca_cli import ca
from geoclus.errors import GeoclusError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeCertPaths]:
    """Our cluster CA with nodes alpha and beta; a foreign CA with node mallory."""
    ours = tmp_path_factory.mktemp("pki") / "ca"
    foreign = tmp_path_factory.mktemp("foreign")
    init_ca(ours, "prod")
    init_ca(foreign, "evil")
    return {
        "alpha": issue_node_cert(ours, "alpha"),
        "beta": issue_node_cert(ours, "beta"),
        "mallory": issue_node_cert(foreign, "mallory"),
    }


def _server_ctx(p: NodeCertPaths) -> ssl.SSLContext:
    return server_ssl_context(p.ca_cert, p.cert, p.key)


def _client_ctx(p: NodeCertPaths) -> ssl.SSLContext:
    return client_ssl_context(p.ca_cert, p.cert, p.key)


def _raw_ctx(purpose: int, ca_file: Path, pair: NodeCertPaths | None) -> ssl.SSLContext:
    """A context built by hand, e.g. a peer presenting a foreign or no certificate."""
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_file)
    if pair is not None:
        ctx.load_cert_chain(pair.cert, pair.key)
    return ctx


Outcome = dict[str, object]


async def _connect(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Outcome:
    """Run one TLS connection over 127.0.0.1; record what each side saw."""
    outcome: Outcome = {}
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server_done = trio.Event()

    async def server() -> None:
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            outcome["server_peer"] = peer_node_name(stream)
            outcome["server_got"] = await stream.receive_some(100)
            await stream.send_all(b"pong")
            await stream.aclose()
        except trio.BrokenResourceError as err:
            outcome["server_error"] = err.__cause__
        finally:
            await trio.aclose_forcefully(stream)
            server_done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            try:
                client = await trio.open_ssl_over_tcp_stream(
                    "127.0.0.1", port, ssl_context=client_ctx
                )
                try:
                    await client.do_handshake()
                    outcome["client_peer"] = peer_node_name(client)
                    outcome["version"] = client.version()
                    await client.send_all(b"ping")
                    outcome["client_got"] = await client.receive_some(100)
                except trio.BrokenResourceError as err:
                    outcome["client_error"] = err.__cause__
                finally:
                    await trio.aclose_forcefully(client)
            except OSError as err:
                outcome["client_error"] = err
            await server_done.wait()
        for listener in listeners:
            await listener.aclose()
    return outcome


async def test_mutual_tls_both_sides_see_the_peer_name(pki: dict[str, NodeCertPaths]) -> None:
    outcome = await _connect(_server_ctx(pki["alpha"]), _client_ctx(pki["beta"]))
    assert outcome == {
        "server_peer": "beta",
        "client_peer": "alpha",
        "version": "TLSv1.3",
        "server_got": b"ping",
        "client_got": b"pong",
    }


async def test_client_with_foreign_certificate_is_refused(pki: dict[str, NodeCertPaths]) -> None:
    # mallory trusts our CA (so it would accept our server) but its cert is foreign
    mallory = _raw_ctx(ssl.PROTOCOL_TLS_CLIENT, pki["alpha"].ca_cert, pki["mallory"])
    outcome = await _connect(_server_ctx(pki["alpha"]), mallory)
    assert isinstance(outcome.get("server_error"), ssl.SSLCertVerificationError), outcome
    assert "server_peer" not in outcome and "server_got" not in outcome
    # TLS 1.3: the client's handshake completes; it learns of the refusal on its first read
    assert "client_got" not in outcome and "client_error" in outcome


async def test_server_with_foreign_certificate_is_refused(pki: dict[str, NodeCertPaths]) -> None:
    mallory = _raw_ctx(ssl.PROTOCOL_TLS_SERVER, pki["alpha"].ca_cert, pki["mallory"])
    outcome = await _connect(mallory, _client_ctx(pki["beta"]))
    err = outcome.get("client_error")
    assert isinstance(err, ssl.SSLCertVerificationError), outcome
    assert "client_peer" not in outcome
    assert "server_peer" not in outcome


async def test_client_without_certificate_is_refused(pki: dict[str, NodeCertPaths]) -> None:
    anonymous = _raw_ctx(ssl.PROTOCOL_TLS_CLIENT, pki["alpha"].ca_cert, None)
    outcome = await _connect(_server_ctx(pki["alpha"]), anonymous)
    err = outcome.get("server_error")
    assert isinstance(err, ssl.SSLError) and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(err)
    assert "server_peer" not in outcome
    assert "client_got" not in outcome and "client_error" in outcome


async def test_peer_node_name_before_handshake_and_unverified(
    pki: dict[str, NodeCertPaths],
) -> None:
    a, b = trio.testing.memory_stream_pair()
    stream = trio.SSLStream(a, _client_ctx(pki["alpha"]))
    with pytest.raises(CaError, match="handshake"):
        peer_node_name(stream)
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    with pytest.raises(CaError, match="requires certificates"):
        peer_node_name(trio.SSLStream(b, unverified))


def test_contexts_are_tls13_mutual_and_trust_only_the_cluster_ca(
    pki: dict[str, NodeCertPaths],
) -> None:
    for ctx in (_server_ctx(pki["alpha"]), _client_ctx(pki["alpha"])):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        subjects = [dict(rdn[0] for rdn in c["subject"]) for c in ctx.get_ca_certs()]  # type: ignore[misc]
        assert subjects == [{"organizationName": "prod", "commonName": "geoclus cluster CA prod"}]


def test_certificate_contents(pki: dict[str, NodeCertPaths]) -> None:
    ca_cert = x509.load_pem_x509_certificate(pki["alpha"].ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki["alpha"].cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alpha"
    assert cert.issuer == ca_cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alpha"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for c in (cert, ca_cert):
        key = c.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(ca_cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=825) <= lifetime <= datetime.timedelta(days=826)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_file_modes(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "ca"
    paths = init_ca(directory, "prod")
    node = issue_node_cert(directory, "n1")
    assert _mode(directory) == 0o700
    assert _mode(paths.key) == 0o600 and _mode(node.key) == 0o600
    assert _mode(paths.cert) == 0o644 and _mode(node.cert) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key", "n1.crt", "n1.key"]


def test_overwrite_is_refused_unless_forced(tmp_path: Path) -> None:
    paths = init_ca(tmp_path, "prod")
    old_cert = paths.cert.read_bytes()
    with pytest.raises(CaError, match="already exists"):
        init_ca(tmp_path, "prod")
    assert paths.cert.read_bytes() == old_cert
    paths.cert.unlink()  # half a CA still counts as a CA
    with pytest.raises(CaError, match="already exists"):
        init_ca(tmp_path, "prod")
    init_ca(tmp_path, "prod", force=True)
    assert paths.cert.read_bytes() != old_cert and _mode(paths.key) == 0o600

    node = issue_node_cert(tmp_path, "n1")
    old_node = node.cert.read_bytes()
    with pytest.raises(CaError, match="already exists"):
        issue_node_cert(tmp_path, "n1")
    assert node.cert.read_bytes() == old_node
    issue_node_cert(tmp_path, "n1", force=True)
    assert node.cert.read_bytes() != old_node
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "name",
    ["", "a" * 64, "bad name", "ünï", "-lead", ".hidden", "a/b", "..", "ca", "CA", "x\n", "a:b"],
)
def test_bad_node_names_are_refused(tmp_path: Path, name: str) -> None:
    init_ca(tmp_path, "prod")
    with pytest.raises(CaError, match="invalid node name"):
        issue_node_cert(tmp_path, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]


def test_good_node_names(tmp_path: Path) -> None:
    for name in ("a", "node-1", "n.example_2", "A" * 63, "10.0.0.1"):
        assert validate_node_name(name) == name
    with pytest.raises(CaError, match="cluster name"):
        init_ca(tmp_path / "never-created", "bad name")
    assert not (tmp_path / "never-created").exists()


def test_issue_without_ca_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CaError, match=r"not found: run `geoclus ca init --dir"):
        issue_node_cert(tmp_path, "n1")


@pytest.mark.parametrize("missing", ["ca_cert", "cert", "key"])
@pytest.mark.parametrize("factory", [server_ssl_context, client_ssl_context])
def test_missing_files_name_the_file_and_the_fix(
    tmp_path: Path,
    pki: dict[str, NodeCertPaths],
    missing: str,
    factory: Callable[..., ssl.SSLContext],
) -> None:
    files = {k: getattr(pki["alpha"], k) for k in ("ca_cert", "cert", "key")}
    files[missing] = tmp_path / f"alpha.{missing}"
    with pytest.raises(CaError) as info:
        factory(files["ca_cert"], files["cert"], files["key"])
    message = str(info.value)
    assert str(files[missing]) in message and "not found" in message
    assert ("geoclus ca init" if missing == "ca_cert" else "geoclus ca issue") in message
    assert isinstance(info.value, GeoclusError)


def test_mismatched_or_foreign_files_are_refused(pki: dict[str, NodeCertPaths]) -> None:
    alpha, beta, mallory = pki["alpha"], pki["beta"], pki["mallory"]
    with pytest.raises(CaError, match="cannot be used with"):
        server_ssl_context(alpha.ca_cert, alpha.cert, beta.key)
    with pytest.raises(CaError, match="not issued by the cluster CA"):
        client_ssl_context(alpha.ca_cert, mallory.cert, mallory.key)
    with pytest.raises(CaError, match="not a PEM certificate"):
        client_ssl_context(alpha.key, alpha.cert, alpha.key)


# -------------------------------------------------------------------------- CLI


def test_cli_init_and_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "pki"
    result = runner.invoke(ca, ["init", "--dir", str(directory), "--cluster", "prod"])
    assert result.exit_code == 0, result.output
    assert f"wrote {directory / 'ca.crt'}" in result.output
    assert f"wrote {directory / 'ca.key'}" in result.output

    result = runner.invoke(ca, ["init", "--dir", str(directory)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: a CA already exists")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output

    result = runner.invoke(ca, ["issue", "node1", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert f"wrote {directory / 'node1.crt'}" in result.output
    assert _mode(directory / "node1.key") == 0o600

    result = runner.invoke(ca, ["issue", "bad name", "--dir", str(directory)])
    assert result.exit_code == 1 and result.output.startswith("Error: invalid node name")

    result = runner.invoke(ca, ["issue", "node2", "--dir", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "geoclus ca init" in result.output

    result = runner.invoke(ca, ["init", "--dir", str(directory), "--force"])
    assert result.exit_code == 0, result.output
