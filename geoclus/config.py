"""Configuration of one site's copy of a volume (``geoclus volume serve --config``).

The TOML file is parsed once into frozen dataclasses. Every problem raises
:class:`~geoclus.errors.ConfigError` naming the file, the dotted key and what
is wrong; unknown keys are refused too, so a typo never silently falls back to
a default. Relative paths are taken relative to the config file's directory.

Example::

    [volume]
    name = "db"
    size = "256MiB"
    store = "db-a.img"
    mode = "sync"            # or "async"
    role = "primary"         # or "secondary"

    [replication]
    listen = "127.0.0.1:7790"
    peer = "127.0.0.1:7791"
    tls = { ca = "ca/ca.crt", cert = "ca/site-a.crt", key = "ca/site-a.key" }

    [export]
    nbd = "db-a.nbd"         # a Unix socket path, or "tcp://127.0.0.1:10809"
    # NBD over TLS (STARTTLS, client certificates from the cluster CA required);
    # default false. A TCP export without it is plain text (a warning is logged).
    tls = { ca = "ca/ca.crt", cert = "ca/site-a.crt", key = "ca/site-a.key" }

    [control]
    socket = "db-a.ctl"
"""

from __future__ import annotations

import os
import socket
import tomllib
import uuid
from dataclasses import dataclass
from typing import Any

from geoclus.errors import ConfigError
from replicator.frames import Mode, Role
from replicator.generations import SplitBrainPolicy
from replicator.session import ReplicationPolicy
from replicator.units import parse_size
from replicator.volume import LinkTimers, VolumeSpec

# Derives a volume id from its name when the config gives none, so both sites
# agree without coordination.
VOLUME_NAMESPACE = uuid.UUID("6d1f3c7e-5b0a-4c1e-9a61-2f1d1e9b7c40")


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS files; ``peer_node``, if set, is the only certificate name accepted."""

    ca: str
    cert: str
    key: str
    peer_node: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """A TCP host and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ExportConfig:
    """Where the NBD export listens: a Unix socket and/or TCP.

    ``tls``, if set, makes every NBD connection upgrade with ``NBD_OPT_STARTTLS``
    before anything else and present a client certificate issued by the
    cluster CA (``tls.peer_node`` is not used: any such certificate is accepted).
    """

    unix_path: str | None
    tcp: Endpoint | None
    name: str
    tls: TlsConfig | None = None

    @property
    def plain_tcp(self) -> bool:
        """True for a TCP export without TLS (data and writes travel in clear
        text, and anyone who can reach the port can use the volume)."""
        return self.tcp is not None and self.tls is None


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``geoclus volume serve`` needs."""

    path: str
    spec: VolumeSpec
    listen: Endpoint
    peer: Endpoint | None
    tls: TlsConfig | None
    export: ExportConfig
    control_socket: str


_ALLOWED = {
    "volume": {
        "name",
        "id",
        "size",
        "block_size",
        "store",
        "meta",
        "mode",
        "role",
        "on_peer_loss",
        "on_congestion",
        "max_lag_bytes",
        "max_in_flight_bytes",
        "region_size",
        "bitmap",
        "after_split_brain",
        "undo_max_bytes",
        "activity_log_extents",
        "activity_log_extent_size",
    },
    "node": {"name"},
    "replication": {
        "listen",
        "peer",
        "tls",
        "keepalive_interval_s",
        "peer_timeout_s",
        "connect_timeout_s",
        "secondary_sync_interval_s",
        "drain_timeout_s",
        "max_batch_bytes",
        "peer_flush_interval_s",
        "async_coalesce_s",
        "resync_checksum",
        "resync_max_rate",
    },
    "export": {"nbd", "name", "tls"},
    "control": {"socket"},
}


class _Reader:
    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.base = os.path.dirname(os.path.abspath(path))

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    def table(self, name: str, required: bool = True) -> dict[str, Any]:
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.fail(name, f"missing table [{name}]")
            return {}
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table [{name}], not a {type(value).__name__}")
        unknown = set(value) - _ALLOWED[name]
        if unknown:
            key = sorted(unknown)[0]
            raise self.fail(
                f"{name}.{key}",
                f"unknown key (allowed: {', '.join(sorted(_ALLOWED[name]))})",
            )
        return value

    def get(
        self,
        table: dict[str, Any],
        tname: str,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        if key not in table:
            if default is ...:
                raise self.fail(f"{tname}.{key}", "missing (required)")
            return default
        value = table[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(f"{tname}.{key}", f"must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise self.fail(
                f"{tname}.{key}", f"must be {_kind_name(kind)}, not {type(value).__name__}"
            )
        return value

    def choice(
        self,
        table: dict[str, Any],
        tname: str,
        key: str,
        options: tuple[str, ...],
        default: Any = ...,
    ) -> str:
        value = self.get(table, tname, key, str, default)
        if value not in options:
            raise self.fail(
                f"{tname}.{key}", f"{value!r} is not one of {', '.join(map(repr, options))}"
            )
        return str(value)

    def size(self, table: dict[str, Any], tname: str, key: str, default: Any = ...) -> int:
        value = self.get(table, tname, key, (str, int), default)
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.fail(f"{tname}.{key}", str(exc)) from None

    def seconds(self, table: dict[str, Any], tname: str, key: str, default: float) -> float:
        value = self.get(table, tname, key, (int, float), default)
        if not value > 0:  # also refuses nan, which TOML allows
            raise self.fail(f"{tname}.{key}", f"must be a positive number of seconds, not {value}")
        return float(value)

    def path_of(self, table: dict[str, Any], tname: str, key: str, default: Any = ...) -> Any:
        value = self.get(table, tname, key, str, default)
        if value is None:
            return None
        if not value:
            raise self.fail(f"{tname}.{key}", "must not be empty")
        return os.path.join(self.base, os.path.expanduser(value))

    def endpoint(self, text: str, key: str) -> Endpoint:
        return parse_endpoint(text, lambda problem: self.fail(key, problem))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_endpoint(text: str, fail: Any = None) -> Endpoint:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); ``fail(problem)`` builds the error."""

    def bad(problem: str) -> Exception:
        return fail(problem) if fail else ValueError(problem)

    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise bad(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise bad(f"port {port_text!r} in {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise bad(f"port {port} in {text!r} is out of range 0..65535")
    return Endpoint(host, port)


def _coalesce(r: _Reader, rep: dict[str, Any]) -> float:
    value = r.get(rep, "replication", "async_coalesce_s", (int, float), 0.002)
    if not 0 <= value <= 0.1:
        raise r.fail("replication.async_coalesce_s", f"{value} must be between 0 and 0.1 seconds")
    return float(value)


def _export_tls(r: _Reader, exp: dict[str, Any]) -> TlsConfig | None:
    """``export.tls``: absent or false for none, or a table {ca, cert, key} of
    existing files (the node's own pair and the cluster CA, as for replication)."""
    value = exp.get("tls", False)
    if value is False:
        return None
    if not isinstance(value, dict):
        raise r.fail("export.tls", "must be a table {ca, cert, key} or false")
    unknown = set(value) - {"ca", "cert", "key"}
    if unknown:
        raise r.fail(f"export.tls.{sorted(unknown)[0]}", "unknown key (allowed: ca, cert, key)")
    files = {}
    for key in ("ca", "cert", "key"):
        path = r.path_of(value, "export.tls", key)
        if not os.path.isfile(path):
            raise r.fail(
                f"export.tls.{key}",
                f"{path} does not exist (create it with `geoclus ca init` / "
                "`geoclus ca issue NODE`)",
            )
        files[key] = path
    return TlsConfig(files["ca"], files["cert"], files["key"])


def load_config(path: str) -> DaemonConfig:
    """Read and validate ``path``; raise ConfigError naming the key on any problem."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "-", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML: {exc}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: str = "<memory>") -> DaemonConfig:
    """Validate an already-parsed TOML document (see :func:`load_config`)."""
    r = _Reader(path, data)
    unknown = set(data) - set(_ALLOWED)
    if unknown:
        raise r.fail(sorted(unknown)[0], f"unknown table (allowed: {', '.join(sorted(_ALLOWED))})")
    vol = r.table("volume")
    node_t = r.table("node", required=False)
    rep = r.table("replication")
    exp = r.table("export")
    ctl = r.table("control")

    name = r.get(vol, "volume", "name", str)
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise r.fail("volume.name", f"{name!r} must be 1-64 letters, digits, '-', '_' or '.'")
    id_text = r.get(vol, "volume", "id", str, None)
    if id_text is None:
        volume_id = uuid.uuid5(VOLUME_NAMESPACE, name).bytes
    else:
        try:
            volume_id = uuid.UUID(id_text).bytes
        except ValueError:
            raise r.fail("volume.id", f"{id_text!r} is not a UUID") from None
    block_size = r.get(vol, "volume", "block_size", int, 512)
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise r.fail("volume.block_size", f"{block_size} must be a power of two in 512..65536")
    size = r.size(vol, "volume", "size")
    if size <= 0 or size % block_size:
        raise r.fail("volume.size", f"{size} bytes must be a positive multiple of {block_size}")
    store = r.path_of(vol, "volume", "store")
    meta = r.path_of(vol, "volume", "meta", None) or store + ".meta"
    bitmap_path = r.path_of(vol, "volume", "bitmap", None) or store + ".bitmap"
    mode = Mode.SYNC if r.choice(vol, "volume", "mode", ("sync", "async")) == "sync" else Mode.ASYNC
    role = (
        Role.PRIMARY
        if r.choice(vol, "volume", "role", ("primary", "secondary")) == "primary"
        else Role.SECONDARY
    )
    region = r.size(vol, "volume", "region_size", 64 * 1024)
    if region < block_size or region & (region - 1):
        raise r.fail(
            "volume.region_size", f"{region} must be a power of two no smaller than the block size"
        )
    max_lag = r.size(vol, "volume", "max_lag_bytes", "256MiB")
    max_inflight = r.size(vol, "volume", "max_in_flight_bytes", "32MiB")
    max_batch = r.size(rep, "replication", "max_batch_bytes", "4MiB")
    for key, value, low in (
        ("volume.max_lag_bytes", max_lag, 1024 * 1024),
        ("volume.max_in_flight_bytes", max_inflight, 64 * 1024),
        ("replication.max_batch_bytes", max_batch, 64 * 1024),
    ):
        if value < low:
            raise r.fail(key, f"{value} bytes is below the minimum of {low}")
    if max_batch > 16 * 1024 * 1024:
        raise r.fail("replication.max_batch_bytes", "must be at most 16MiB (the frame limit)")
    policy = ReplicationPolicy(
        mode=mode,
        on_peer_loss=r.choice(vol, "volume", "on_peer_loss", ("suspend", "continue"), "suspend"),  # type: ignore[arg-type]
        on_congestion=r.choice(vol, "volume", "on_congestion", ("block", "pull-ahead"), "block"),  # type: ignore[arg-type]
        max_lag_bytes=max_lag,
        max_in_flight_bytes=max_inflight,
        max_batch_bytes=max_batch,
        region_bytes=region,
        peer_flush_interval_s=r.seconds(rep, "replication", "peer_flush_interval_s", 1.0),
        resync_checksum=r.get(rep, "replication", "resync_checksum", bool, True),
    )
    # The undo log of a resync target (docs/format.md): "auto" holds the whole
    # volume, so the copy stays promotable through any resync; 0 disables it.
    undo_text = vol.get("undo_max_bytes", "auto")
    undo_max: int | None = None
    if undo_text != "auto":
        undo_max = r.size(vol, "volume", "undo_max_bytes")
        if 0 < undo_max < 1024 * 1024:
            raise r.fail(
                "volume.undo_max_bytes", f"{undo_max} bytes: use 0 (off), auto, or at least 1MiB"
            )
    al_extents = r.get(vol, "volume", "activity_log_extents", int, 1024)
    if not 16 <= al_extents <= 65536:
        raise r.fail("volume.activity_log_extents", f"{al_extents} must be in 16..65536")
    al_extent = r.size(vol, "volume", "activity_log_extent_size", "4MiB")
    if al_extent < region or al_extent & (al_extent - 1):
        raise r.fail(
            "volume.activity_log_extent_size",
            f"{al_extent} must be a power of two no smaller than region_size ({region})",
        )
    rate_text = rep.get("resync_max_rate")
    max_rate = None
    if rate_text is not None:
        max_rate = r.size(rep, "replication", "resync_max_rate")
        if max_rate < 1024 * 1024:
            raise r.fail(
                "replication.resync_max_rate",
                f"{max_rate} bytes/s is below 1MiB/s; leave it out to let the resync adapt",
            )
    timers = LinkTimers(
        keepalive_interval_s=r.seconds(rep, "replication", "keepalive_interval_s", 0.5),
        peer_timeout_s=r.seconds(rep, "replication", "peer_timeout_s", 5.0),
        connect_timeout_s=r.seconds(rep, "replication", "connect_timeout_s", 5.0),
        secondary_sync_interval_s=r.seconds(rep, "replication", "secondary_sync_interval_s", 1.0),
        drain_timeout_s=r.seconds(rep, "replication", "drain_timeout_s", 10.0),
        async_coalesce_s=_coalesce(r, rep),
    )
    if timers.peer_timeout_s <= timers.keepalive_interval_s:
        raise r.fail(
            "replication.peer_timeout_s",
            "must be longer than keepalive_interval_s, or every link looks dead",
        )
    node = r.get(node_t, "node", "name", str, None) or socket.gethostname()
    if len(node.encode()) > 255:
        raise r.fail("node.name", "must be at most 255 bytes (it is sent in HELLO)")

    listen = r.endpoint(r.get(rep, "replication", "listen", str), "replication.listen")
    peer_text = r.get(rep, "replication", "peer", str, None)
    peer = None if peer_text is None else r.endpoint(peer_text, "replication.peer")
    if role == Role.PRIMARY and peer is None:
        raise r.fail("replication.peer", "missing: a primary must know its secondary's address")
    tls_value = rep.get("tls")
    if tls_value is None:
        raise r.fail(
            "replication.tls",
            "missing: give a table {ca, cert, key} for mutual TLS, or false to run "
            "plain TCP on purpose",
        )
    tls: TlsConfig | None
    if tls_value is False:
        tls = None
    elif isinstance(tls_value, dict):
        unknown = set(tls_value) - {"ca", "cert", "key", "peer_node"}
        if unknown:
            raise r.fail(
                f"replication.tls.{sorted(unknown)[0]}",
                "unknown key (allowed: ca, cert, key, peer_node)",
            )
        files = {}
        for key in ("ca", "cert", "key"):
            p = r.path_of(tls_value, "replication.tls", key)
            if not os.path.isfile(p):
                raise r.fail(
                    f"replication.tls.{key}",
                    f"{p} does not exist (create it with `geoclus ca init` / "
                    "`geoclus ca issue NODE`)",
                )
            files[key] = p
        tls = TlsConfig(
            files["ca"],
            files["cert"],
            files["key"],
            r.get(tls_value, "replication.tls", "peer_node", str, None),
        )
    else:
        raise r.fail("replication.tls", "must be a table {ca, cert, key} or false")

    nbd = r.get(exp, "export", "nbd", str)
    unix_path: str | None = None
    tcp: Endpoint | None = None
    if nbd.startswith("tcp://"):
        tcp = r.endpoint(nbd, "export.nbd")
    else:
        unix_path = r.path_of(exp, "export", "nbd")
        if len(unix_path.encode()) > 107:
            raise r.fail("export.nbd", f"socket path {unix_path} is longer than 107 bytes")
    export = ExportConfig(
        unix_path, tcp, r.get(exp, "export", "name", str, name), _export_tls(r, exp)
    )
    control = r.path_of(ctl, "control", "socket")
    if len(control.encode()) > 107:
        raise r.fail("control.socket", f"socket path {control} is longer than 107 bytes")

    spec = VolumeSpec(
        name=name,
        volume_id=volume_id,
        size_bytes=size,
        block_size=block_size,
        store_path=store,
        meta_path=meta,
        role=role,
        policy=policy,
        node=node,
        timers=timers,
        bitmap_path=bitmap_path,
        undo_max_bytes=undo_max,
        al_extents=al_extents,
        al_extent_bytes=al_extent,
        resync_max_rate_bytes_s=max_rate,
        split_brain_policy=SplitBrainPolicy(
            r.choice(
                vol, "volume", "after_split_brain", tuple(p.value for p in SplitBrainPolicy), "none"
            )
        ),
    )
    return DaemonConfig(path, spec, listen, peer, tls, export, control)
