"""The cluster CA and mutual TLS between nodes.

One directory holds the cluster CA (``ca.crt``, ``ca.key``) and the node
certificates it issued (``NODE.crt``, ``NODE.key``). Every node gets ``ca.crt``
and its own pair; the CA key stays where it was created.

* :func:`init_ca` creates the CA (ECDSA P-256, self-signed);
* :func:`issue_node_cert` issues a node certificate (CN and SAN DNS name = the
  node name, usable as TLS server and client);
* :func:`server_ssl_context` / :func:`client_ssl_context` build contexts for
  *mutual* TLS 1.3 that trust only the cluster CA; the client does not match
  the server's name against the address it dialled (nodes are addressed by IP)
  but the peer must present a certificate chaining to the cluster CA;
* :func:`peer_node_name` gives the node name of the authenticated peer, which
  the caller checks against whom it expected.

Private keys are written unencrypted with mode 0600 (protected by file
permissions, like an SSH host key). Every failure raises :class:`CaError` with a
message naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geoclus.errors import GeoclusError

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "CaError",
    "CaPaths",
    "NodeCertPaths",
    "client_ssl_context",
    "init_ca",
    "issue_node_cert",
    "peer_node_name",
    "server_ssl_context",
    "validate_node_name",
]

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
MAX_VALID_DAYS = 36500
# Certificates start being valid a little in the past so a peer whose clock is
# slightly behind still accepts a freshly issued one.
_BACKDATE = datetime.timedelta(minutes=5)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_RESERVED_NAMES = frozenset({"ca"})


class CaError(GeoclusError):
    """The CA or a certificate cannot be created, found, read or used.

    The message names the file or value and says what to do next.
    """


@dataclass(frozen=True)
class CaPaths:
    """Files of a cluster CA: ``cert`` (give to every node) and ``key`` (keep)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeCertPaths:
    """Files a node needs for mutual TLS: the CA certificate and its own pair."""

    ca_cert: Path
    cert: Path
    key: Path


def validate_node_name(name: str, what: str = "node name") -> str:
    """Return ``name`` if it is a valid node (or cluster) name, else raise :class:`CaError`.

    Valid: 1..63 ASCII letters, digits, ``-``, ``_``, ``.``, starting with a
    letter or digit (so it is never an option, a hidden file or a path), and not
    ``ca`` (the CA's own file names).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CaError(
            f"invalid {what} {name!r}: use 1..63 ASCII letters, digits, '-', '_' or '.',"
            " starting with a letter or digit"
        )
    if name.lower() in _RESERVED_NAMES:
        raise CaError(f"invalid {what} {name!r}: the name is reserved for the CA's files")
    return name


def _check_valid_days(valid_days: int) -> int:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int):
        raise CaError(f"valid_days must be an integer, got {valid_days!r}")
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise CaError(f"valid_days must be 1..{MAX_VALID_DAYS}, got {valid_days}")
    return valid_days


# ------------------------------------------------------------------ file output


def _ensure_directory(directory: Path) -> None:
    if directory.exists():
        if not directory.is_dir():
            raise CaError(f"{directory} exists and is not a directory")
        return
    try:
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    except OSError as err:
        raise CaError(f"cannot create directory {directory}: {err.strerror or err}") from err


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically with exactly ``mode``.

    The file never exists with other permissions or partial contents. Without
    ``overwrite`` an existing ``path`` is never replaced (raises :class:`CaError`).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: never replaces a file
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise CaError(f"{path} already exists; not overwriting it") from None
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                if path.exists():  # filesystem without hard links
                    raise CaError(f"{path} already exists; not overwriting it") from None
                os.replace(tmp, path)
    except OSError as err:
        raise CaError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(
    cert_path: Path, cert_pem: bytes, key_path: Path, key_pem: bytes, *, force: bool
) -> None:
    """Write a key (0600) then its certificate (0644); without ``force`` either
    existing is refused and nothing is left behind."""
    _write_file(key_path, key_pem, 0o600, overwrite=force)
    try:
        _write_file(cert_path, cert_pem, 0o644, overwrite=force)
    except CaError:
        if not force:  # the key was created by us just now: don't leave half a pair
            with contextlib.suppress(OSError):
                key_path.unlink()
        raise
    _fsync_directory(cert_path.parent)


# ----------------------------------------------------------------------- issue


def init_ca(
    directory: str | os.PathLike[str],
    cluster_name: str,
    *,
    valid_days: int = 3650,
    force: bool = False,
) -> CaPaths:
    """Create the cluster CA in ``directory``: ``ca.crt`` (0644) and ``ca.key`` (0600).

    The key is ECDSA P-256; the certificate is self-signed, a CA restricted to
    signing end-entity certificates (path length 0), valid ``valid_days``.
    ``directory`` is created with mode 0700 if missing. Raises :class:`CaError`
    if a CA (either file) already exists and ``force`` is false, on an invalid
    cluster name or validity, or if the files cannot be written. With ``force``
    the old CA is replaced and every certificate it issued stops being trusted.
    """
    validate_node_name(cluster_name, "cluster name")
    _check_valid_days(valid_days)
    directory = Path(directory)
    paths = CaPaths(cert=directory / CA_CERT_NAME, key=directory / CA_KEY_NAME)
    if not force:
        for existing in (paths.cert, paths.key):
            if existing.exists():
                raise CaError(
                    f"a CA already exists in {directory} ({existing.name}); refusing to"
                    " overwrite it (use --force to replace it: every node certificate it"
                    " issued will stop working)"
                )
    _ensure_directory(directory)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"geoclus cluster CA {cluster_name}"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(paths.cert, _cert_pem(cert), paths.key, _key_pem(key), force=force)
    return paths


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    hint = f"run `geoclus ca init --dir {directory}` first"
    cert_pem = _read(directory / CA_CERT_NAME, hint)
    key_pem = _read(directory / CA_KEY_NAME, f"{hint}, or issue from the directory holding ca.key")
    cert = _parse_cert(directory / CA_CERT_NAME, cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise CaError(f"{directory / CA_KEY_NAME} is not an unencrypted PEM private key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{directory / CA_KEY_NAME} is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CaError(f"{directory / CA_KEY_NAME} does not belong to {directory / CA_CERT_NAME}")
    return cert, key


def issue_node_cert(
    directory: str | os.PathLike[str],
    node_name: str,
    *,
    valid_days: int = 825,
    force: bool = False,
) -> NodeCertPaths:
    """Issue ``NODE.crt`` (0644) and ``NODE.key`` (0600) in ``directory``, signed by its CA.

    The certificate has CN = ``node_name`` and a SAN DNS name = ``node_name``,
    extended key usage serverAuth + clientAuth, an ECDSA P-256 key, and is valid
    ``valid_days`` but never beyond the CA's own expiry. Raises :class:`CaError`
    on an invalid node name (see :func:`validate_node_name`), if the CA is
    missing or unreadable, or if the node's files exist and ``force`` is false.
    """
    validate_node_name(node_name)
    _check_valid_days(valid_days)
    directory = Path(directory)
    paths = NodeCertPaths(
        ca_cert=directory / CA_CERT_NAME,
        cert=directory / f"{node_name}.crt",
        key=directory / f"{node_name}.key",
    )
    ca_cert, ca_key = _load_ca(directory)
    if not force:
        for existing in (paths.cert, paths.key):
            if existing.exists():
                raise CaError(
                    f"{existing} already exists; refusing to overwrite it"
                    " (use --force to issue a new certificate for this node)"
                )

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, node_name)]
    cluster = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if cluster:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(cluster[0].value)))
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(paths.cert, _cert_pem(cert), paths.key, _key_pem(key), force=force)
    return paths


# ------------------------------------------------------------------ TLS contexts


def _read(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaError(f"{path} not found: {hint}") from None
    except OSError as err:
        raise CaError(f"cannot read {path}: {err.strerror or err} ({hint})") from None


def _parse_cert(path: Path, pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CaError(f"{path} is not a PEM certificate") from None


def _node_hint(cert_file: Path) -> str:
    node = cert_file.stem if _NAME_RE.fullmatch(cert_file.stem) else "NODE"
    return (
        f"run `geoclus ca issue {node} --dir CA_DIR` where the CA key is and copy"
        f" {node}.crt and {node}.key to {cert_file.parent}"
    )


def _tls_context(
    purpose: int,
    ca_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
) -> ssl.SSLContext:
    ca_path, cert_path, key_path = Path(ca_file), Path(cert_file), Path(key_file)
    ca_hint = (
        "run `geoclus ca init --dir CA_DIR` once for the cluster and copy its ca.crt"
        f" to {ca_path.parent}"
    )
    node_hint = _node_hint(cert_path)
    ca_pem = _read(ca_path, ca_hint)
    cert_pem = _read(cert_path, node_hint)
    _read(key_path, node_hint)
    ca_cert = _parse_cert(ca_path, ca_pem)
    cert = _parse_cert(cert_path, cert_pem)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CaError(
            f"{cert_path} was not issued by the cluster CA {ca_path}: {node_hint}"
        ) from None
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise CaError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: {node_hint}")

    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # nodes are dialled by IP; the chain is still verified
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))  # the cluster CA only
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as err:
        raise CaError(f"{ca_path} cannot be used as a CA certificate: {err}") from None
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as err:
        raise CaError(
            f"{key_path} cannot be used with {cert_path} (wrong or unreadable key: {err.reason})"
        ) from None
    except OSError as err:
        raise CaError(f"cannot load {cert_path} / {key_path}: {err.strerror or err}") from None
    return ctx


def server_ssl_context(
    ca_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
) -> ssl.SSLContext:
    """A server-side context for mutual TLS inside the cluster.

    Guarantees: TLS 1.3 or newer; the client must present a certificate that
    chains to the CA in ``ca_file`` (no system CAs are trusted), otherwise the
    handshake fails; this node presents ``cert_file``/``key_file``. No session
    tickets are sent. Raises :class:`CaError` if a file is missing or unreadable
    (naming the file and what to run), if the certificate was not issued by that
    CA or has expired, or if the key does not match the certificate.
    """
    ctx = _tls_context(ssl.PROTOCOL_TLS_SERVER, ca_file, cert_file, key_file)
    ctx.num_tickets = 0  # no resumption between nodes: nothing sent after the handshake
    return ctx


def client_ssl_context(
    ca_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
) -> ssl.SSLContext:
    """A client-side context for mutual TLS inside the cluster.

    Guarantees: TLS 1.3 or newer; the server must present a certificate that
    chains to the CA in ``ca_file`` (no system CAs); its name is *not* matched
    against the dialled address (check :func:`peer_node_name` instead); this node
    presents ``cert_file``/``key_file``. Raises :class:`CaError` like
    :func:`server_ssl_context`.
    """
    return _tls_context(ssl.PROTOCOL_TLS_CLIENT, ca_file, cert_file, key_file)


def peer_node_name(ssl_object_or_stream: Any) -> str:
    """The node name (certificate CN) of the authenticated TLS peer.

    Accepts a ``trio.SSLStream``, ``ssl.SSLObject`` or ``ssl.SSLSocket`` after a
    completed handshake on a context that required a verified certificate (as
    :func:`server_ssl_context` and :func:`client_ssl_context` do). Raises
    :class:`CaError` if the handshake is not done, the context did not require
    verification, the peer sent no certificate, or its CN is not a valid node name.
    """
    obj = ssl_object_or_stream
    context = getattr(obj, "context", None)
    if not isinstance(context, ssl.SSLContext) or context.verify_mode != ssl.CERT_REQUIRED:
        raise CaError("peer_node_name needs a TLS connection whose context requires certificates")
    try:
        der = obj.getpeercert(binary_form=True)
    except (ValueError, trio.NeedHandshakeError):
        raise CaError("the TLS handshake is not done yet; call do_handshake() first") from None
    if not der:
        raise CaError("the TLS peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CaError("the TLS peer's certificate has no single common name")
    name = str(names[0].value)
    try:
        return validate_node_name(name)
    except CaError:
        raise CaError(f"the TLS peer's certificate names an invalid node {name!r}") from None
