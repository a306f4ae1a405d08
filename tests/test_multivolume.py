"""Several volumes in one daemon: ``[[volume]]`` configuration (each volume its
own replication port, store and export name), one NBD server exporting every
volume by name, and control requests that name their volume.

The end-to-end test runs two real site daemons in this process (their stores
are real files, their links real TCP on loopback) and checks that each export
reaches its own volume on the other site, that the volumes change roles
independently, and that the CLI addresses one volume with ``--volume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from geoclus.config import parse_config
from geoclus.control import request
from geoclus.daemon import Daemon, DaemonAddresses
from geoclus.errors import ConfigError, ControlError
from geoclus.nbd.client import NbdClient, NbdClientError
from replicator.frames import Mode, Role

MiB = 1024 * 1024


def two_volumes(role: str, peers: dict[str, str] | None = None) -> dict[str, Any]:
    """A site config serving ``db`` (sync) and ``logs`` (async)."""
    vols = []
    for name, mode, size in (("db", "sync", "8MiB"), ("logs", "async", "4MiB")):
        vol: dict[str, Any] = {
            "name": name,
            "size": size,
            "store": f"{name}-{role}.img",
            "mode": mode,
            "role": role,
            "listen": "127.0.0.1:0",
        }
        if peers is not None:
            vol["peer"] = peers[name]
        vols.append(vol)
    return {
        "volume": vols,
        "node": {"name": f"site-{role}"},
        "replication": {"tls": False, "keepalive_interval_s": 0.2, "peer_timeout_s": 2},
        "export": {"nbd": f"{role}.nbd"},
        "control": {"socket": f"{role}.ctl"},
    }


def test_volume_array_gives_each_volume_its_own_settings() -> None:
    doc = two_volumes("primary", {"db": "127.0.0.1:7791", "logs": "127.0.0.1:7793"})
    doc["volume"][0]["listen"] = "127.0.0.1:7790"
    doc["volume"][1]["listen"] = "127.0.0.1:7792"
    cfg = parse_config(doc, "/etc/geoclus/site.toml")
    assert cfg.names == ("db", "logs")
    db, logs = cfg.volumes
    assert (db.spec.policy.mode, logs.spec.policy.mode) == (Mode.SYNC, Mode.ASYNC)
    assert db.spec.role == logs.spec.role == Role.PRIMARY
    assert (db.listen.port, logs.listen.port) == (7790, 7792)
    assert (db.peer and db.peer.port, logs.peer and logs.peer.port) == (7791, 7793)
    assert (db.export_name, logs.export_name) == ("db", "logs")
    assert db.spec.store_path == "/etc/geoclus/db-primary.img"
    assert db.spec.volume_id != logs.spec.volume_id
    # shared settings reach every volume
    assert db.spec.timers == logs.spec.timers and db.spec.timers.peer_timeout_s == 2
    assert db.spec.node == logs.spec.node == "site-primary"
    assert cfg.volume("logs") is logs
    with pytest.raises(ConfigError, match="name one with --volume"):
        cfg.volume()
    with pytest.raises(ConfigError, match=r"no volume 'nope' here \(volumes: db, logs\)"):
        cfg.volume("nope")


def test_single_volume_form_may_give_listen_in_the_volume_table() -> None:
    doc = two_volumes("secondary")
    doc["volume"] = doc["volume"][0]
    cfg = parse_config(doc)
    assert cfg.volume().listen.port == 0 and cfg.volume().export_name == "db"
    doc["replication"]["listen"] = "127.0.0.1:1"
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert info.value.key == "volume.listen" and "in one place only" in info.value.problem


def _with(doc: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """``doc`` with ``path`` (``volume.1.store`` style) set, or deleted for None."""
    parts = path.split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is None:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "key", "problem"),
    [
        ("replication.listen", "127.0.0.1:7790", "replication.listen", "own listen"),
        ("replication.peer", "127.0.0.1:7791", "replication.peer", "own peer"),
        ("export.name", "x", "export.name", "its own name"),
        ("volume.1.name", "db", "volume[1].name", "the same name as volume[0].name"),
        ("volume.1.store", "db-primary.img", "volume[1].store", "the same file"),
        ("volume.1.meta", "db-primary.img.meta", "volume[1].meta", "the same file"),
        ("volume.1.listen", "127.0.0.1:7790", "volume[1].listen", "the same listen"),
        ("volume.1.listen", None, "volume[1].listen", "missing"),
        ("volume.1.peer", None, "volume[1].peer", "a primary must know"),
        ("volume.1.sise", "1MiB", "volume[1].sise", "unknown key"),
        ("volume.1.size", "3", "volume[1].size", "multiple of 512"),
        ("volume", [], "volume", "one or more [[volume]] tables"),
        ("volume", "db", "volume", "must be a table"),
    ],
)
def test_bad_volume_arrays_are_refused_naming_the_key(
    path: str, value: object, key: str, problem: str
) -> None:
    doc = two_volumes("primary", {"db": "127.0.0.1:7791", "logs": "127.0.0.1:7793"})
    doc["volume"][0]["listen"] = "127.0.0.1:7790"
    doc["volume"][1]["listen"] = "127.0.0.1:7792"
    parse_config(doc)  # the base document is good
    with pytest.raises(ConfigError) as info:
        parse_config(_with(doc, path, value))
    assert info.value.key == key
    assert problem in info.value.problem


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="gc-mv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _start(
    nursery: trio.Nursery, doc: dict[str, Any], base: Path
) -> tuple[Daemon, DaemonAddresses]:
    daemon = Daemon(parse_config(doc, str(base / "site.toml")))
    addresses: DaemonAddresses = await nursery.start(
        lambda task_status: daemon.run(task_status=task_status, handle_signals=False)
    )
    return daemon, addresses


async def _ask(ctl: str, cmd: str, **args: Any) -> dict[str, Any]:
    return await trio.to_thread.run_sync(lambda: request(ctl, cmd, **args))


async def _caught_up(ctl: str, volume: str) -> dict[str, Any]:
    with trio.fail_after(30):
        while True:
            st = (await _ask(ctl, "status", volume=volume))["status"]
            if st["connected"] and st["peer_durable_seq"] == st["last_seq"] > 0:
                return st
            await trio.sleep(0.02)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _geoclus(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "geoclus", "volume", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.mark.process
async def test_two_volumes_in_one_daemon_replicate_separately(short_dir: Path) -> None:
    a_dir, b_dir = short_dir / "a", short_dir / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    async with trio.open_nursery() as nursery:
        site_b, b_addr = await _start(nursery, two_volumes("secondary"), b_dir)
        peers = {
            name: f"127.0.0.1:{port}" for name, (_, port) in b_addr.replication_by_volume.items()
        }
        assert set(peers) == {"db", "logs"} and len(set(peers.values())) == 2
        _, a_addr = await _start(nursery, two_volumes("primary", peers), a_dir)
        assert a_addr.nbd_unix is not None

        # Each export, by name, is its own volume.
        patterns = {"db": b"D" * 4096, "logs": b"L" * 4096}
        for name, data in patterns.items():
            client = await NbdClient.connect_unix(a_addr.nbd_unix, name)
            async with trio.open_nursery() as n:
                await n.start(client.run)
                for i in range(16):
                    await client.write(i * 65536, data)
                await client.flush()
                assert await client.read(65536, 4096) == data
                await client.aclose()
                n.cancel_scope.cancel()
        with pytest.raises(NbdClientError):
            await NbdClient.connect_unix(a_addr.nbd_unix, "nope")

        # A real client lists both exports with their sizes.
        nbdinfo = shutil.which("nbdinfo")
        assert nbdinfo is not None, "nbdinfo missing: `make` installs Debian's libnbd-bin"
        listed = await trio.run_process(
            [nbdinfo, "--list", "--json", f"nbd+unix:///?socket={a_addr.nbd_unix}"],
            capture_stdout=True,
        )
        sizes = {e["export-name"]: e["export-size"] for e in json.loads(listed.stdout)["exports"]}
        assert sizes == {"db": 8 * MiB, "logs": 4 * MiB}

        st_db = await _caught_up(a_addr.control, "db")
        st_logs = await _caught_up(a_addr.control, "logs")
        assert (st_db["mode"], st_logs["mode"]) == ("sync", "async")
        assert (st_db["export"], st_logs["export"]) == ("db", "logs")

        # status without a name answers for every volume; other commands need one
        every = await _ask(a_addr.control, "status")
        assert [s["volume"] for s in every["volumes"]] == ["db", "logs"]
        assert "status" not in every
        with pytest.raises(ControlError, match="name one"):
            await _ask(a_addr.control, "demote")
        with pytest.raises(ControlError, match=r"no volume 'nope'.*db, logs"):
            await _ask(a_addr.control, "status", volume="nope")

        # The CLI: --volume picks one; without it, status prints both.
        a_cfg = a_dir / "site.toml"
        _write_toml(a_cfg, two_volumes("primary", peers))
        out = await _geoclus("status", "--config", str(a_cfg), "--volume", "logs", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["volume"] == "logs"
        out = await _geoclus("status", "--config", str(a_cfg))
        text = out.stdout.decode()
        assert out.returncode == 0 and "volume db " in text and "volume logs " in text
        out = await _geoclus("status", "--config", str(a_cfg), "--volume", "nope")
        assert out.returncode != 0 and b"no volume 'nope'" in out.stderr

        # Roles change per volume: hand "logs" over to site B, "db" stays on A.
        b_cfg = b_dir / "site.toml"
        _write_toml(b_cfg, two_volumes("secondary"))
        out = await _geoclus(
            "switchover", "--config", str(a_cfg), "--to", str(b_cfg), "--volume", "logs"
        )
        assert out.returncode == 0, out.stderr
        roles_a = {
            s["volume"]: s["role"] for s in (await _ask(a_addr.control, "status"))["volumes"]
        }
        roles_b = {
            s["volume"]: s["role"] for s in (await _ask(b_addr.control, "status"))["volumes"]
        }
        assert roles_a == {"db": "primary", "logs": "secondary"}
        assert roles_b == {"db": "secondary", "logs": "primary"}

        await _ask(a_addr.control, "shutdown")
        site_b.request_shutdown()
    for name in ("db", "logs"):
        a_img = a_dir / f"{name}-primary.img"
        b_img = b_dir / f"{name}-secondary.img"
        assert _digest(a_img) == _digest(b_img)
        with open(b_img, "rb") as f:
            f.seek(65536)
            assert f.read(4096) == patterns[name]
    assert os.path.getsize(a_dir / "db-primary.img") == 8 * MiB


def _write_toml(path: Path, doc: dict[str, Any]) -> None:
    """The few TOML shapes the configs above use."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(v)

    lines = []
    for name, table in doc.items():
        if isinstance(table, list):
            for entry in table:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
