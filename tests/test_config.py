"""Config parsing (geoclus/config.py): real TOML files on disk; every bad input
must give a ConfigError whose ``key`` names the offending dotted key."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import tempfile
import uuid

import pytest

from geoclus.config import Endpoint, load_config, parse_endpoint
from geoclus.errors import ConfigError
from replicator.frames import Mode, Role

MiB = 1024 * 1024
DELETE = object()

BASE = {
    "volume": {
        "name": "db",
        "size": "256MiB",
        "store": "db-a.img",
        "mode": "sync",
        "role": "primary",
    },
    "node": {"name": "site-a"},
    "replication": {"listen": "127.0.0.1:7790", "peer": "127.0.0.1:7791", "tls": False},
    "export": {"nbd": "db-a.nbd"},
    "control": {"socket": "db-a.ctl"},
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def dump(doc: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def with_changes(*changes: tuple[str, object], base: dict = BASE) -> dict:
    doc = copy.deepcopy(base)
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


@pytest.fixture
def cfgdir():
    # A short directory: socket paths in the config must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="gc") as d:
        yield d


def write(cfgdir: str, doc: dict | str, name: str = "site.toml") -> str:
    path = os.path.join(cfgdir, name)
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else dump(doc))
    return path


def load(cfgdir: str, doc: dict | str):
    return load_config(write(cfgdir, doc))


def bad(cfgdir: str, doc: dict | str) -> ConfigError:
    path = write(cfgdir, doc)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.path == path
    assert str(err).startswith(f"{path}: {err.key}: ")
    assert err.problem
    return err


def make_tls_files(cfgdir: str) -> dict:
    os.makedirs(os.path.join(cfgdir, "ca"))
    for name in ("ca.crt", "a.crt", "a.key"):
        with open(os.path.join(cfgdir, "ca", name), "w") as f:
            f.write("dummy\n")
    return {"ca": "ca/ca.crt", "cert": "ca/a.crt", "key": "ca/a.key"}


# ------------------------------------------------------------------- valid


def test_minimal_config_values_and_defaults(cfgdir) -> None:
    cfg = load(cfgdir, BASE)
    spec = cfg.volume().spec
    assert cfg.path == os.path.join(cfgdir, "site.toml")
    assert spec.name == "db"
    assert spec.size_bytes == 256 * MiB
    assert spec.block_size == 512
    assert spec.store_path == os.path.join(cfgdir, "db-a.img")
    assert spec.meta_path == os.path.join(cfgdir, "db-a.img") + ".meta"
    assert spec.role == Role.PRIMARY
    assert spec.node == "site-a"
    assert len(spec.volume_id) == 16
    p = spec.policy
    assert p.mode == Mode.SYNC
    assert (p.on_peer_loss, p.on_congestion) == ("suspend", "block")
    assert p.max_lag_bytes == 256 * MiB
    assert p.max_in_flight_bytes == 32 * MiB
    assert p.max_batch_bytes == 4 * MiB
    assert p.region_bytes == 64 * 1024
    assert p.peer_flush_interval_s == 1.0
    t = spec.timers
    assert (t.keepalive_interval_s, t.peer_timeout_s, t.connect_timeout_s) == (0.5, 5.0, 5.0)
    assert (t.secondary_sync_interval_s, t.drain_timeout_s) == (1.0, 10.0)
    assert cfg.volume().listen == Endpoint("127.0.0.1", 7790)
    assert cfg.volume().peer == Endpoint("127.0.0.1", 7791)
    assert cfg.tls is None
    assert cfg.export.unix_path == os.path.join(cfgdir, "db-a.nbd")
    assert cfg.export.tcp is None
    assert cfg.volume().export_name == "db"
    assert cfg.control_socket == os.path.join(cfgdir, "db-a.ctl")


def test_every_key_set(cfgdir) -> None:
    tls = make_tls_files(cfgdir)
    os.makedirs(os.path.join(cfgdir, "conf"))
    doc = {
        "volume": {
            "name": "db.v2_x-1",
            "id": "12345678-1234-5678-1234-567812345678",
            "size": "1GiB",
            "block_size": 4096,
            "store": "../data/db.img",
            "meta": "/var/lib/x.meta",
            "mode": "async",
            "role": "secondary",
            "on_peer_loss": "continue",
            "on_congestion": "pull-ahead",
            "max_lag_bytes": "8 MiB",
            "max_in_flight_bytes": 1048576,
            "region_size": "1MiB",
        },
        "node": {"name": "site-b"},
        "replication": {
            "listen": "[::1]:7790",
            "tls": {**{k: "../" + v for k, v in tls.items()}, "peer_node": "site-a"},
            "keepalive_interval_s": 1,
            "peer_timeout_s": 2.5,
            "connect_timeout_s": 3,
            "secondary_sync_interval_s": 0.25,
            "drain_timeout_s": 60,
            "max_batch_bytes": "16MiB",
            "peer_flush_interval_s": 0.5,
        },
        "export": {"nbd": "tcp://0.0.0.0:10809", "name": "dbexp"},
        "control": {"socket": "run/db.ctl"},
    }
    path = write(os.path.join(cfgdir, "conf"), doc)
    cfg = load_config(path)
    spec = cfg.volume().spec
    assert spec.name == "db.v2_x-1"
    assert spec.volume_id == bytes.fromhex("12345678123456781234567812345678")
    assert spec.size_bytes == 1024 * MiB
    assert spec.block_size == 4096
    # Relative to the config file's directory (cfgdir/conf), not the cwd.
    assert os.path.normpath(spec.store_path) == os.path.join(cfgdir, "data", "db.img")
    assert spec.meta_path == "/var/lib/x.meta"
    assert spec.role == Role.SECONDARY
    assert spec.node == "site-b"
    p = spec.policy
    assert p.mode == Mode.ASYNC
    assert (p.on_peer_loss, p.on_congestion) == ("continue", "pull-ahead")
    assert (p.max_lag_bytes, p.max_in_flight_bytes) == (8 * MiB, MiB)
    assert (p.region_bytes, p.max_batch_bytes, p.peer_flush_interval_s) == (MiB, 16 * MiB, 0.5)
    t = spec.timers
    assert (t.keepalive_interval_s, t.peer_timeout_s, t.connect_timeout_s) == (1.0, 2.5, 3.0)
    assert (t.secondary_sync_interval_s, t.drain_timeout_s) == (0.25, 60.0)
    assert isinstance(t.keepalive_interval_s, float)
    assert cfg.volume().listen == Endpoint("::1", 7790)
    assert cfg.volume().peer is None  # a secondary need not know the primary
    assert cfg.tls is not None
    assert os.path.normpath(cfg.tls.ca) == os.path.join(cfgdir, "ca", "ca.crt")
    assert os.path.normpath(cfg.tls.cert) == os.path.join(cfgdir, "ca", "a.crt")
    assert os.path.normpath(cfg.tls.key) == os.path.join(cfgdir, "ca", "a.key")
    assert cfg.tls.peer_node == "site-a"
    assert cfg.export.tcp == Endpoint("0.0.0.0", 10809)
    assert cfg.export.unix_path is None
    assert cfg.volume().export_name == "dbexp"
    assert cfg.control_socket == os.path.join(cfgdir, "conf", "run", "db.ctl")


def test_volume_id_from_name_agrees_across_files(cfgdir) -> None:
    os.makedirs(os.path.join(cfgdir, "a"))
    os.makedirs(os.path.join(cfgdir, "b"))
    site_a = with_changes(("volume.store", "a.img"), ("node.name", "a"))
    site_b = with_changes(
        ("volume.store", "b.img"),
        ("node.name", "b"),
        ("volume.role", "secondary"),
        ("volume.size", 256 * MiB),
    )
    id_a = load_config(write(os.path.join(cfgdir, "a"), site_a)).volume().spec.volume_id
    id_b = load_config(write(os.path.join(cfgdir, "b"), site_b)).volume().spec.volume_id
    assert id_a == id_b
    assert len(id_a) == 16
    other = load_config(write(cfgdir, with_changes(("volume.name", "db2")), "other.toml"))
    assert other.volume().spec.volume_id != id_a
    # An explicit id wins over the derived one.
    explicit = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")
    cfg = load(cfgdir, with_changes(("volume.id", str(explicit))))
    assert cfg.volume().spec.volume_id == bytes(range(15, -1, -1))


def test_node_defaults_to_hostname(cfgdir) -> None:
    cfg = load(cfgdir, with_changes(("node", DELETE)))
    assert cfg.volume().spec.node == socket.gethostname()


@pytest.mark.parametrize(
    ("size", "want"),
    [
        ("4096", 4096),
        (1048576, MiB),
        ("1 MiB", MiB),
        ("1M", MiB),
        ("2GiB", 2 * 1024 * MiB),
        ("512kB", 512_000),
        ("1.5MiB", 3 * MiB // 2),
    ],
)
def test_size_forms(cfgdir, size, want) -> None:
    cfg = load(cfgdir, with_changes(("volume.size", size)))
    assert cfg.volume().spec.size_bytes == want


def test_tcp_export_and_long_unix_paths(cfgdir) -> None:
    cfg = load(cfgdir, with_changes(("export.nbd", "tcp://[::]:10809")))
    assert cfg.export.tcp == Endpoint("::", 10809)
    err = bad(cfgdir, with_changes(("export.nbd", "s" * 120)))
    assert err.key == "export.nbd"
    err = bad(cfgdir, with_changes(("control.socket", "c" * 120)))
    assert err.key == "control.socket"


# --------------------------------------------------------------------- bad

BAD = [
    # missing tables and keys
    (("volume", DELETE), "volume"),
    (("replication", DELETE), "replication"),
    (("export", DELETE), "export"),
    (("control", DELETE), "control"),
    (("volume.name", DELETE), "volume.name"),
    (("volume.size", DELETE), "volume.size"),
    (("volume.store", DELETE), "volume.store"),
    (("volume.mode", DELETE), "volume.mode"),
    (("volume.role", DELETE), "volume.role"),
    (("replication.listen", DELETE), "replication.listen"),
    (("export.nbd", DELETE), "export.nbd"),
    (("control.socket", DELETE), "control.socket"),
    # unknown keys and tables (typos)
    (("volume.sise", "1MiB"), "volume.sise"),
    (("replication.peeer", "h:1"), "replication.peeer"),
    (("node.nmae", "x"), "node.nmae"),
    (("export.socket", "x"), "export.socket"),
    (("control.path", "x"), "control.path"),
    (("volumes", {"name": "x"}), "volumes"),
    # wrong types
    (("volume", 5), "volume"),
    (("volume.name", 5), "volume.name"),
    (("volume.size", 1.5), "volume.size"),
    (("volume.size", True), "volume.size"),
    (("volume.block_size", "4096"), "volume.block_size"),
    (("volume.block_size", 4096.0), "volume.block_size"),
    (("volume.store", 7), "volume.store"),
    (("volume.mode", 1), "volume.mode"),
    (("volume.id", 1234), "volume.id"),
    (("replication.listen", 7790), "replication.listen"),
    (("replication.keepalive_interval_s", "1"), "replication.keepalive_interval_s"),
    (("replication.peer_timeout_s", True), "replication.peer_timeout_s"),
    (("export.nbd", ["a"]), "export.nbd"),
    (("node.name", 3), "node.name"),
    # bad sizes
    (("volume.size", "256 MeB"), "volume.size"),
    (("volume.size", "lots"), "volume.size"),
    (("volume.size", "-1MiB"), "volume.size"),
    (("volume.size", -4096), "volume.size"),
    (("volume.size", "0"), "volume.size"),
    (("volume.size", "1000"), "volume.size"),
    (("volume.size", "1.5"), "volume.size"),
    (("volume.max_lag_bytes", "1XB"), "volume.max_lag_bytes"),
    (("volume.max_lag_bytes", "1KiB"), "volume.max_lag_bytes"),
    (("volume.max_in_flight_bytes", 1000), "volume.max_in_flight_bytes"),
    (("volume.region_size", "3KiB"), "volume.region_size"),
    (("volume.region_size", 256), "volume.region_size"),
    (("replication.max_batch_bytes", "32MiB"), "replication.max_batch_bytes"),
    (("replication.max_batch_bytes", "1KiB"), "replication.max_batch_bytes"),
    # block size
    (("volume.block_size", 1000), "volume.block_size"),
    (("volume.block_size", 256), "volume.block_size"),
    (("volume.block_size", 131072), "volume.block_size"),
    # bad choices
    (("volume.mode", "semi-sync"), "volume.mode"),
    (("volume.mode", "SYNC"), "volume.mode"),
    (("volume.role", "master"), "volume.role"),
    (("volume.on_peer_loss", "panic"), "volume.on_peer_loss"),
    (("volume.on_congestion", "drop"), "volume.on_congestion"),
    # names and ids
    (("volume.name", ""), "volume.name"),
    (("volume.name", "my volume"), "volume.name"),
    (("volume.name", "a/b"), "volume.name"),
    (("volume.name", "v" * 65), "volume.name"),
    (("volume.id", "not-a-uuid"), "volume.id"),
    (("node.name", "n" * 256), "node.name"),
    (("volume.store", ""), "volume.store"),
    # endpoints
    (("replication.listen", "localhost"), "replication.listen"),
    (("replication.listen", ":7790"), "replication.listen"),
    (("replication.peer", "host:port"), "replication.peer"),
    (("replication.peer", "host:70000"), "replication.peer"),
    (("replication.peer", "host:-1"), "replication.peer"),
    (("export.nbd", "tcp://nohost"), "export.nbd"),
    # tls must be explicit
    (("replication.tls", DELETE), "replication.tls"),
    (("replication.tls", True), "replication.tls"),
    (("replication.tls", "yes"), "replication.tls"),
    (("replication.tls", {"cert": "a", "key": "b"}), "replication.tls.ca"),
    (
        ("replication.tls", {"ca": "x", "cert": "a", "key": "b", "cafile": "c"}),
        "replication.tls.cafile",
    ),
    # timers
    (("replication.keepalive_interval_s", 0), "replication.keepalive_interval_s"),
    (("replication.connect_timeout_s", -1.0), "replication.connect_timeout_s"),
    (("replication.drain_timeout_s", float("nan")), "replication.drain_timeout_s"),
    (("replication.peer_timeout_s", 0.5), "replication.peer_timeout_s"),
    (
        [("replication.keepalive_interval_s", 2), ("replication.peer_timeout_s", 1)],
        "replication.peer_timeout_s",
    ),
    # a primary must know its peer
    (("replication.peer", DELETE), "replication.peer"),
]


@pytest.mark.parametrize(("change", "key"), BAD, ids=[f"{i}-{k}" for i, (_, k) in enumerate(BAD)])
def test_bad_input_names_the_key(cfgdir, change, key) -> None:
    changes = change if isinstance(change, list) else [change]
    err = bad(cfgdir, with_changes(*changes))
    assert err.key == key, err


@pytest.mark.parametrize("missing", ["ca", "cert", "key"])
def test_tls_files_must_exist(cfgdir, missing) -> None:
    tls = make_tls_files(cfgdir)
    assert load(cfgdir, with_changes(("replication.tls", tls))).tls is not None
    os.remove(os.path.join(cfgdir, tls[missing]))
    err = bad(cfgdir, with_changes(("replication.tls", tls)))
    assert err.key == f"replication.tls.{missing}"
    assert "does not exist" in err.problem


def test_tls_path_that_is_a_directory_is_refused(cfgdir) -> None:
    tls = make_tls_files(cfgdir)
    err = bad(cfgdir, with_changes(("replication.tls", {**tls, "key": "ca"})))
    assert err.key == "replication.tls.key"


def test_invalid_toml(cfgdir) -> None:
    err = bad(cfgdir, "[volume\nname = 'db'\n")
    assert err.key == "-"
    assert "TOML" in err.problem


def test_missing_file(cfgdir) -> None:
    path = os.path.join(cfgdir, "absent.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, info.value.key) == (path, "-")
    assert "not found" in info.value.problem


def test_parse_endpoint() -> None:
    assert parse_endpoint("h:1") == Endpoint("h", 1)
    assert parse_endpoint("tcp://10.0.0.1:65535") == Endpoint("10.0.0.1", 65535)
    assert parse_endpoint("[fe80::1]:80") == Endpoint("fe80::1", 80)
    assert str(Endpoint("fe80::1", 80)) == "[fe80::1]:80"
    assert str(Endpoint("h", 1)) == "h:1"
    for text in ("h", "h:", ":1", "h:x", "h:65536"):
        with pytest.raises(ValueError):
            parse_endpoint(text)
