"""Configuration of one site's daemon and the volumes it serves
(``geoclus volume serve --config``).

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

A daemon may serve several volumes: write ``[[volume]]`` (an array of tables)
instead of ``[volume]``, and give each volume its own replication ``listen``
and ``peer`` (each volume has its own replication port, as each DRBD resource
does). The NBD server exports every volume under its name on the one
``[export] nbd`` socket, and the control socket takes a volume name
(``geoclus volume status --config FILE --volume NAME``)::

    [[volume]]
    name = "db"
    size = "256MiB"
    store = "db-a.img"
    mode = "sync"
    role = "primary"
    listen = "127.0.0.1:7790"
    peer = "127.0.0.1:7791"

    [[volume]]
    name = "logs"
    size = "64MiB"
    store = "logs-a.img"
    mode = "async"
    role = "primary"
    listen = "127.0.0.1:7792"
    peer = "127.0.0.1:7793"

``[replication]`` then holds what the volumes share (``tls``, the timers,
``max_batch_bytes``, the resync settings) and no ``listen``/``peer``.
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
    """Where the NBD server listens: a Unix socket and/or TCP. Every volume of
    the daemon is an export of this server, under its own export name.

    ``tls``, if set, makes every NBD connection upgrade with ``NBD_OPT_STARTTLS``
    before anything else and present a client certificate issued by the
    cluster CA (``tls.peer_node`` is not used: any such certificate is accepted).
    """

    unix_path: str | None
    tcp: Endpoint | None
    tls: TlsConfig | None = None

    @property
    def plain_tcp(self) -> bool:
        """True for a TCP export without TLS (data and writes travel in clear
        text, and anyone who can reach the port can use the volume)."""
        return self.tcp is not None and self.tls is None


@dataclass(frozen=True)
class VolumeConfig:
    """One volume of the daemon: its spec, where its replication link listens,
    the peer it dials when primary, and its NBD export name."""

    spec: VolumeSpec
    listen: Endpoint
    peer: Endpoint | None
    export_name: str

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class WitnessLink:
    """``[witness]``: the third-site witness that decides which mirror may run
    alone (quorum/mirror.py). Mutual TLS with the cluster CA; this daemon's
    certificate name must be its ``[node] name``."""

    address: Endpoint
    cluster: str
    ca: str
    cert: str
    key: str
    renew_s: float


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``geoclus volume serve`` needs: one or more volumes (names,
    ids, stores, listen ports and export names all distinct), the replication
    TLS they share, the NBD server and the control socket."""

    path: str
    volumes: tuple[VolumeConfig, ...]
    tls: TlsConfig | None
    export: ExportConfig
    control_socket: str
    witness: WitnessLink | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.volumes)

    def volume(self, name: str | None = None) -> VolumeConfig:
        """The volume called ``name``; with ``None``, the daemon's only volume.
        Raises ConfigError naming the choices otherwise."""
        if name is None:
            if len(self.volumes) == 1:
                return self.volumes[0]
            raise ConfigError(
                self.path,
                "volume",
                f"this daemon serves {len(self.volumes)} volumes "
                f"({', '.join(self.names)}): name one with --volume",
            )
        for v in self.volumes:
            if v.name == name:
                return v
        raise ConfigError(
            self.path, "volume", f"no volume {name!r} here (volumes: {', '.join(self.names)})"
        )


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
        "listen",
        "peer",
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
    "witness": {"address", "cluster", "ca", "cert", "key", "renew_s"},
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


def read_toml(path: str) -> dict[str, Any]:
    """The TOML document in ``path``; ConfigError (key ``-``) if it cannot be
    read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "-", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML: {exc}") from None


def load_config(path: str) -> DaemonConfig:
    """Read and validate ``path``; raise ConfigError naming the key on any problem."""
    return parse_config(read_toml(path), path)


def _volume_tables(r: _Reader) -> list[tuple[str, dict[str, Any]]]:
    """``[volume]`` as one (``"volume"``, table), or ``[[volume]]`` as
    (``"volume[i]"``, table) for each entry, unknown keys refused."""
    value = r.data.get("volume")
    if value is None:
        raise r.fail("volume", "missing table [volume] (or [[volume]] tables for several)")
    if isinstance(value, dict):
        return [("volume", r.table("volume"))]
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise r.fail("volume", "must be a table [volume] or one or more [[volume]] tables")
    tables = []
    for i, table in enumerate(value):
        tname = f"volume[{i}]"
        unknown = set(table) - _ALLOWED["volume"]
        if unknown:
            raise r.fail(
                f"{tname}.{sorted(unknown)[0]}",
                f"unknown key (allowed: {', '.join(sorted(_ALLOWED['volume']))})",
            )
        tables.append((tname, table))
    return tables


def _replication_tls(r: _Reader, rep: dict[str, Any]) -> TlsConfig | None:
    tls_value = rep.get("tls")
    if tls_value is None:
        raise r.fail(
            "replication.tls",
            "missing: give a table {ca, cert, key} for mutual TLS, or false to run "
            "plain TCP on purpose",
        )
    if tls_value is False:
        return None
    if not isinstance(tls_value, dict):
        raise r.fail("replication.tls", "must be a table {ca, cert, key} or false")
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
                f"{p} does not exist (create it with `geoclus ca init` / `geoclus ca issue NODE`)",
            )
        files[key] = p
    return TlsConfig(
        files["ca"],
        files["cert"],
        files["key"],
        r.get(tls_value, "replication.tls", "peer_node", str, None),
    )


@dataclass(frozen=True)
class _Shared:
    """What every volume of the daemon takes from [node] and [replication]."""

    node: str
    timers: LinkTimers
    max_batch: int
    flush_interval_s: float
    resync_checksum: bool
    max_rate: int | None


def _shared(r: _Reader, rep: dict[str, Any], node_t: dict[str, Any]) -> _Shared:
    max_batch = r.size(rep, "replication", "max_batch_bytes", "4MiB")
    if max_batch < 64 * 1024:
        raise r.fail(
            "replication.max_batch_bytes", f"{max_batch} bytes is below the minimum of 65536"
        )
    if max_batch > 16 * 1024 * 1024:
        raise r.fail("replication.max_batch_bytes", "must be at most 16MiB (the frame limit)")
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
    return _Shared(
        node=node,
        timers=timers,
        max_batch=max_batch,
        flush_interval_s=r.seconds(rep, "replication", "peer_flush_interval_s", 1.0),
        resync_checksum=r.get(rep, "replication", "resync_checksum", bool, True),
        max_rate=max_rate,
    )


def _volume(
    r: _Reader,
    tname: str,
    vol: dict[str, Any],
    rep: dict[str, Any],
    shared: _Shared,
    export_name: Any,
) -> VolumeConfig:
    """One volume table; ``listen``/``peer`` come from it or, in the
    single-volume form, from [replication]."""
    name = r.get(vol, tname, "name", str)
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise r.fail(f"{tname}.name", f"{name!r} must be 1-64 letters, digits, '-', '_' or '.'")
    id_text = r.get(vol, tname, "id", str, None)
    if id_text is None:
        volume_id = uuid.uuid5(VOLUME_NAMESPACE, name).bytes
    else:
        try:
            volume_id = uuid.UUID(id_text).bytes
        except ValueError:
            raise r.fail(f"{tname}.id", f"{id_text!r} is not a UUID") from None
    block_size = r.get(vol, tname, "block_size", int, 512)
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise r.fail(f"{tname}.block_size", f"{block_size} must be a power of two in 512..65536")
    size = r.size(vol, tname, "size")
    if size <= 0 or size % block_size:
        raise r.fail(f"{tname}.size", f"{size} bytes must be a positive multiple of {block_size}")
    store = r.path_of(vol, tname, "store")
    meta = r.path_of(vol, tname, "meta", None) or store + ".meta"
    bitmap_path = r.path_of(vol, tname, "bitmap", None) or store + ".bitmap"
    mode = Mode.SYNC if r.choice(vol, tname, "mode", ("sync", "async")) == "sync" else Mode.ASYNC
    role = (
        Role.PRIMARY
        if r.choice(vol, tname, "role", ("primary", "secondary")) == "primary"
        else Role.SECONDARY
    )
    region = r.size(vol, tname, "region_size", 64 * 1024)
    if region < block_size or region & (region - 1):
        raise r.fail(
            f"{tname}.region_size",
            f"{region} must be a power of two no smaller than the block size",
        )
    max_lag = r.size(vol, tname, "max_lag_bytes", "256MiB")
    max_inflight = r.size(vol, tname, "max_in_flight_bytes", "32MiB")
    for key, value, low in (
        (f"{tname}.max_lag_bytes", max_lag, 1024 * 1024),
        (f"{tname}.max_in_flight_bytes", max_inflight, 64 * 1024),
    ):
        if value < low:
            raise r.fail(key, f"{value} bytes is below the minimum of {low}")
    policy = ReplicationPolicy(
        mode=mode,
        on_peer_loss=r.choice(vol, tname, "on_peer_loss", ("suspend", "continue"), "suspend"),  # type: ignore[arg-type]
        on_congestion=r.choice(vol, tname, "on_congestion", ("block", "pull-ahead"), "block"),  # type: ignore[arg-type]
        max_lag_bytes=max_lag,
        max_in_flight_bytes=max_inflight,
        max_batch_bytes=shared.max_batch,
        region_bytes=region,
        peer_flush_interval_s=shared.flush_interval_s,
        resync_checksum=shared.resync_checksum,
    )
    # The undo log of a resync target (docs/format.md): "auto" holds the whole
    # volume, so the copy stays promotable through any resync; 0 disables it.
    undo_text = vol.get("undo_max_bytes", "auto")
    undo_max: int | None = None
    if undo_text != "auto":
        undo_max = r.size(vol, tname, "undo_max_bytes")
        if 0 < undo_max < 1024 * 1024:
            raise r.fail(
                f"{tname}.undo_max_bytes", f"{undo_max} bytes: use 0 (off), auto, or at least 1MiB"
            )
    al_extents = r.get(vol, tname, "activity_log_extents", int, 1024)
    if not 16 <= al_extents <= 65536:
        raise r.fail(f"{tname}.activity_log_extents", f"{al_extents} must be in 16..65536")
    al_extent = r.size(vol, tname, "activity_log_extent_size", "4MiB")
    if al_extent < region or al_extent & (al_extent - 1):
        raise r.fail(
            f"{tname}.activity_log_extent_size",
            f"{al_extent} must be a power of two no smaller than region_size ({region})",
        )
    single = tname == "volume"
    for key in ("listen", "peer"):
        if single and key in vol and key in rep:
            raise r.fail(
                f"volume.{key}", f"also given as replication.{key}: give it in one place only"
            )
    where = rep if single and "listen" not in vol else vol
    where_name = "replication" if where is rep else tname
    if "listen" not in where:
        raise r.fail(
            f"{where_name}.listen",
            "missing (required): the address this volume's replication link listens on",
        )
    listen = r.endpoint(r.get(where, where_name, "listen", str), f"{where_name}.listen")
    where = rep if single and "peer" not in vol else vol
    where_name = "replication" if where is rep else tname
    peer_text = r.get(where, where_name, "peer", str, None)
    peer = None if peer_text is None else r.endpoint(peer_text, f"{where_name}.peer")
    if role == Role.PRIMARY and peer is None:
        raise r.fail(f"{where_name}.peer", "missing: a primary must know its secondary's address")
    spec = VolumeSpec(
        name=name,
        volume_id=volume_id,
        size_bytes=size,
        block_size=block_size,
        store_path=store,
        meta_path=meta,
        role=role,
        policy=policy,
        node=shared.node,
        timers=shared.timers,
        bitmap_path=bitmap_path,
        undo_max_bytes=undo_max,
        al_extents=al_extents,
        al_extent_bytes=al_extent,
        resync_max_rate_bytes_s=shared.max_rate,
        split_brain_policy=SplitBrainPolicy(
            r.choice(
                vol, tname, "after_split_brain", tuple(p.value for p in SplitBrainPolicy), "none"
            )
        ),
    )
    return VolumeConfig(spec, listen, peer, name if export_name is None else export_name)


def _check_distinct(
    r: _Reader, tables: list[tuple[str, dict[str, Any]]], vols: list[VolumeConfig]
) -> None:
    """Two volumes of one daemon never share a name, id, file, port or export."""
    seen: dict[tuple[str, object], str] = {}
    for (tname, _), v in zip(tables, vols, strict=True):
        s = v.spec
        items: list[tuple[str, str, object]] = [
            ("name", "name", s.name),
            ("id", "id", s.volume_id),
            ("store", "file", s.store_path),
            ("meta", "file", s.meta_path),
            ("bitmap", "file", s.bitmap_path),
            ("listen", "listen", (v.listen.host, v.listen.port) if v.listen.port else None),
        ]
        for key, kind, value in items:
            if value is None:
                continue
            other = seen.get((kind, value))
            if other is not None:
                raise r.fail(
                    f"{tname}.{key}", f"the same {kind} as {other}: each volume needs its own"
                )
            seen[(kind, value)] = f"{tname}.{key}"


def parse_config(data: dict[str, Any], path: str = "<memory>") -> DaemonConfig:
    """Validate an already-parsed TOML document (see :func:`load_config`)."""
    r = _Reader(path, data)
    unknown = set(data) - set(_ALLOWED)
    if unknown:
        raise r.fail(sorted(unknown)[0], f"unknown table (allowed: {', '.join(sorted(_ALLOWED))})")
    tables = _volume_tables(r)
    node_t = r.table("node", required=False)
    rep = r.table("replication")
    exp = r.table("export")
    ctl = r.table("control")
    single = len(tables) == 1 and tables[0][0] == "volume"
    if not single:
        for key in ("listen", "peer"):
            if key in rep:
                raise r.fail(
                    f"replication.{key}",
                    "not allowed with [[volume]] tables: give each volume its own "
                    f"{key} (volume[i].{key})",
                )
        if "name" in exp:
            raise r.fail(
                "export.name",
                "not allowed with [[volume]] tables: each volume is exported under its own name",
            )
    shared = _shared(r, rep, node_t)
    export_name = r.get(exp, "export", "name", str, None)
    vols = [_volume(r, tname, vol, rep, shared, export_name) for tname, vol in tables]
    _check_distinct(r, tables, vols)
    tls = _replication_tls(r, rep)

    nbd = r.get(exp, "export", "nbd", str)
    unix_path: str | None = None
    tcp: Endpoint | None = None
    if nbd.startswith("tcp://"):
        tcp = r.endpoint(nbd, "export.nbd")
    else:
        unix_path = r.path_of(exp, "export", "nbd")
        if len(unix_path.encode()) > 107:
            raise r.fail("export.nbd", f"socket path {unix_path} is longer than 107 bytes")
    export = ExportConfig(unix_path, tcp, _export_tls(r, exp))
    control = r.path_of(ctl, "control", "socket")
    if len(control.encode()) > 107:
        raise r.fail("control.socket", f"socket path {control} is longer than 107 bytes")
    witness = _witness_link(r, vols)
    return DaemonConfig(path, tuple(vols), tls, export, control, witness)


def _witness_link(r: _Reader, vols: list[VolumeConfig]) -> WitnessLink | None:
    """``[witness]``, only for sync volumes that suspend on peer loss (the
    witness decides when such a volume may run without its peer)."""
    wt = r.table("witness", required=False)
    if not wt:
        return None
    for v in vols:
        p = v.spec.policy
        if p.mode is not Mode.SYNC or p.on_peer_loss != "suspend":
            raise r.fail(
                "witness",
                f'volume {v.name} is not mode = "sync" with on_peer_loss = "suspend": '
                "the witness decides only for volumes whose writes wait for both mirrors",
            )
    files = {}
    for key in ("ca", "cert", "key"):
        full = r.path_of(wt, "witness", key)
        if not os.path.isfile(full):
            raise r.fail(f"witness.{key}", f"{full} does not exist (`geoclus ca issue NAME`)")
        files[key] = full
    renew_s = r.get(wt, "witness", "renew_s", (int, float), 1.0)
    if not 0.05 <= renew_s <= 60:
        raise r.fail("witness.renew_s", f"{renew_s} must be between 0.05 and 60 seconds")
    return WitnessLink(
        address=r.endpoint(r.get(wt, "witness", "address", str), "witness.address"),
        cluster=r.get(wt, "witness", "cluster", str),
        ca=files["ca"],
        cert=files["cert"],
        key=files["key"],
        renew_s=float(renew_s),
    )
