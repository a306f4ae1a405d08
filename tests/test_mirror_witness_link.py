"""The witness deciding for the quorum volume's mirrors, outside the decision
core: `cluster init` for disk quorum with a witness, the witness's and the
volume daemon's configuration, and the witness process answering mirror
claims over real mutual TLS (names checked, state durable, kept across a
restart)."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from geoclus.ca import client_ssl_context, init_ca, issue_node_cert
from geoclus.cli import main
from geoclus.cluster import wire
from geoclus.cluster.witnessd import STATE_FILE, WitnessDaemon, load_witness_config
from geoclus.config import parse_config
from geoclus.errors import ConfigError, GeoclusError
from geoclus.tlsstream import wrap_client
from quorum.mirror import MirrorClaim, MirrorReply
from tests.test_config import BASE


@pytest.fixture(scope="module")
def disk_cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("diskw")
    r = CliRunner().invoke(
        main,
        [
            "cluster", "init", "--dir", str(d), "--name", "prod", "--quorum", "disk",
            "--node", "a1@A=127.0.0.1:7800", "--node", "b1@B=127.0.0.2:7800",
            "--witness", "127.0.0.3:7850",
            "--mirror", "127.0.0.1:10809", "--mirror", "127.0.0.2:10809",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return d


def test_init_for_disk_with_a_witness_names_the_mirrors_not_the_nodes(disk_cluster: Path) -> None:
    cfg = load_witness_config(str(disk_cluster / "witness.toml"))
    assert cfg.mirrors == ("qvol-1", "qvol-2") and cfg.nodes == ("a1", "b1")
    assert cfg.prefer_primary_s == cfg.lease_s
    for name in ("qvol-1", "qvol-2"):
        assert (disk_cluster / "ca" / f"{name}.crt").is_file()
    # The nodes do not ask this witness for votes: the disk is their tie-breaker.
    assert "[witness]" not in (disk_cluster / "a1.toml").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mirror-name", "only-one"], "one --mirror-name per --mirror"),
        (["--quorum", "majority+witness", "--mirror-name", "x"], "--quorum disk with --witness"),
    ],
)
def test_init_refuses_mirror_names_that_do_not_fit(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    args = [
        "cluster", "init", "--dir", str(tmp_path), "--name", "prod",
        "--node", "a1@A=127.0.0.1:7800", "--node", "b1@B=127.0.0.2:7800",
        "--witness", "127.0.0.3:7850",
        "--mirror", "127.0.0.1:10809", "--mirror", "127.0.0.2:10809",
    ]  # fmt: skip
    if "--quorum" not in extra:
        args += ["--quorum", "disk"]
    r = CliRunner().invoke(main, args + extra)
    assert r.exit_code != 0 and message in r.output, r.output


def test_witness_config_refuses_a_mirror_named_like_a_node(disk_cluster: Path, tmp_path) -> None:
    text = (disk_cluster / "witness.toml").read_text().replace('"qvol-2"', '"b1"')
    bad = disk_cluster / "bad-witness.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"witness\.mirrors.*differ"):
        load_witness_config(str(bad))


def _volume_doc(ca_dir: Path, **witness: object) -> dict:
    doc = copy.deepcopy(BASE)  # a valid sync volume
    doc["volume"].update(name="quorum", size="4MiB", on_peer_loss="suspend")
    doc["node"]["name"] = "qvol-1"
    doc["witness"] = {
        "address": "127.0.0.3:7850",
        "cluster": "prod",
        "ca": str(ca_dir / "ca.crt"),
        "cert": str(ca_dir / "qvol-1.crt"),
        "key": str(ca_dir / "qvol-1.key"),
        **witness,
    }
    return doc


def test_volume_witness_table_is_checked_naming_the_key(disk_cluster: Path) -> None:
    ca = disk_cluster / "ca"
    path = str(disk_cluster / "qvol-1.toml")
    cfg = parse_config(_volume_doc(ca), path)
    assert cfg.witness is not None and str(cfg.witness.address) == "127.0.0.3:7850"
    assert cfg.witness.renew_s == 1.0
    cases = [
        (_volume_doc(ca, renew_s=0), r"witness\.renew_s"),
        (_volume_doc(ca, cert=str(ca / "nobody.crt")), r"witness\.cert"),
        (_volume_doc(ca, lease_s=3), r"witness\.lease_s"),
        (_volume_doc(ca, address="nowhere"), r"witness\.address"),
    ]
    no_cluster = _volume_doc(ca)
    del no_cluster["witness"]["cluster"]
    cases.append((no_cluster, r"witness\.cluster"))
    asynchronous = _volume_doc(ca)
    asynchronous["volume"]["mode"] = "async"
    cases.append((asynchronous, r"witness.*only for volumes whose writes wait for both"))
    for doc, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            parse_config(doc, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_witness_process_answers_mirror_claims_over_mutual_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    init_ca(str(ca), "prod")
    for name in ("witness", "a1", "qvol-1", "qvol-2"):
        issue_node_cert(str(ca), name)
    port = _free_port()
    (tmp_path / "witness.toml").write_text(
        '[witness]\ncluster = "prod"\n'
        f'listen = "127.0.0.1:{port}"\n'
        'ca = "ca/ca.crt"\ncert = "ca/witness.crt"\nkey = "ca/witness.key"\n'
        'nodes = ["a1"]\nmirrors = ["qvol-1", "qvol-2"]\nlease_s = 30\ncollect_s = 1\n'
    )
    cfg = load_witness_config(str(tmp_path / "witness.toml"))

    async def exchange(name: str, claims: list[MirrorClaim]) -> list[object]:
        ctx = client_ssl_context(
            str(ca / "ca.crt"), str(ca / f"{name}.crt"), str(ca / f"{name}.key")
        )
        tls = await wrap_client(await trio.open_tcp_stream("127.0.0.1", port), ctx)
        out: list[object] = []
        async with tls:
            reader = wire.FrameReader()
            await tls.send_all(wire.encode(wire.Hello("prod", name, 0, -1, "")))
            out.append(await reader.next(tls))
            for c in claims:
                await tls.send_all(wire.encode(c))
                try:
                    out.append(await reader.next(tls))
                except (trio.BrokenResourceError, wire.WireError):
                    out.append(None)  # the witness closed the connection
                    break
        return out

    def claim(mirror: str, role: str = "primary") -> MirrorClaim:
        return MirrorClaim("quorum", mirror, role, True, 0, 1.0)

    async def first_run() -> None:
        d = WitnessDaemon(cfg, control_path=str(tmp_path / "w1.sock"))
        async with trio.open_nursery() as n:
            await n.start(d.run)
            # a mirror claiming for the other one is cut off, and nothing changes
            forged = await exchange("qvol-2", [claim("qvol-1")])
            assert forged[-1] is None and not d.mirrors.tickets
            got = await exchange("qvol-1", [claim("qvol-1")])
            reply = got[-1]
            assert isinstance(reply, MirrorReply) and reply.granted and reply.echo == 1.0
            assert reply.lease_s == 30 and reply.holder == "qvol-1"
            refused = (await exchange("qvol-2", [claim("qvol-2", "secondary")]))[-1]
            assert isinstance(refused, MirrorReply) and not refused.granted
            assert "outdated" in refused.reason
            st = d.status()["mirrors"]["quorum"]
            assert st["holder"] == "qvol-1" and st["alone"] and st["epoch"] == 1
            n.cancel_scope.cancel()

    trio.run(first_run)
    assert os.path.exists(os.path.join(cfg.state_dir, STATE_FILE))

    async def after_restart() -> None:
        d = WitnessDaemon(cfg, control_path=str(tmp_path / "w2.sock"))
        async with trio.open_nursery() as n:
            await n.start(d.run)
            st = d.status()["mirrors"]["quorum"]
            assert st["holder"] == "qvol-1" and st["alone"] and st["lease_left_s"] > 29
            still = (await exchange("qvol-2", [claim("qvol-2", "secondary")]))[-1]
            assert isinstance(still, MirrorReply) and "outdated" in still.reason
            # the operator's override: the outdated mark is gone (the next
            # secondary claim waits only for the primary preference)
            assert await d._control({"cmd": "release-mirror", "volume": "quorum"})
            freed = (await exchange("qvol-2", [claim("qvol-2", "secondary")]))[-1]
            assert isinstance(freed, MirrorReply) and "waiting" in freed.reason, freed
            with pytest.raises(GeoclusError, match="no mirror of volume 'other'"):
                await d._control({"cmd": "release-mirror", "volume": "other"})
            n.cancel_scope.cancel()

    trio.run(after_restart)
