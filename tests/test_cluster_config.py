"""geoclus/cluster/config.py and `geoclus cluster init`: the starter files are
valid, and every bad key is refused naming it."""

from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from geoclus.cli import main
from geoclus.cluster.config import load_cluster_config, parse_cluster_config
from geoclus.errors import ConfigError
from quorum.votes import QuorumKind


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cluster")
    result = CliRunner().invoke(
        main,
        [
            "cluster", "init", "--dir", str(d), "--name", "prod",
            "--node", "a1@A=10.0.0.1:7800", "--node", "a2@A=10.0.0.2:7800",
            "--node", "b1@B=10.0.1.1:7800", "--witness", "10.0.2.1:7850",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return d


def test_init_writes_a_valid_config_per_node_and_the_certificates(initialised: Path) -> None:
    for name in ("a1", "a2", "b1"):
        cfg = load_cluster_config(str(initialised / f"{name}.toml"))
        assert cfg.node == name and cfg.name == "prod"
        assert cfg.quorum is QuorumKind.MAJORITY_WITNESS
        assert [n.name for n in cfg.nodes] == ["a1", "a2", "b1"]
        assert cfg.witness is not None and cfg.witness.port == 7850
        assert os.path.isfile(cfg.cert) and os.path.isfile(cfg.key)
    assert (initialised / "ca" / "witness.crt").is_file()
    spec = load_cluster_config(str(initialised / "a1.toml")).spec()
    assert spec.nodes == (0, 1, 2) and spec.sites == {0: "A", 1: "A", 2: "B"}
    assert spec.timers.heartbeat_interval_s == 1.2 and spec.timers.regroup_answer_timeout_s == 4
    # a second init into the same directory refuses to overwrite anything
    again = CliRunner().invoke(
        main, ["cluster", "init", "--dir", str(initialised), "--name", "x", "--node", "a@A=h:1"]
    )
    assert again.exit_code != 0 and "exists" in again.output


def _doc(initialised: Path) -> dict:
    with open(initialised / "a1.toml", "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (("cluster", "quorum", "most"), "cluster.quorum", "is not one of"),
        (("cluster", "colour", 1), "cluster.colour", "unknown key"),
        (("node", "name", "zz"), "node.name", "not one of the [[nodes]]"),
        (("node", "cert", "ca/nope.crt"), "node.cert", "does not exist"),
        (("timers", "heartbeat_interval_s", 0), "timers.heartbeat_interval_s", "greater than 0"),
        (
            ("timers", "missed_heartbeats_same_site", 2.5),
            "timers.missed_heartbeats_same_site",
            "integer",
        ),
        (("timers", "max_arbitration_s", 5), "timers.max_arbitration_s", "longer than min"),
        (("timers", "regroup_answer_timeout_s", 1), "timers.regroup_answer_timeout_s", "outlast"),
        (("witness", "address", "nowhere"), "witness.address", "HOST:PORT"),
        (("log", "compact_entries", 0), "log.compact_entries", "greater than 0"),
        (("log", "compact_entries", 1.5), "log.compact_entries", "integer"),
        (("log", "max_entries", 1000), "log.max_entries", "larger than compact_entries"),
        (("log", "keep", 1), "log.keep", "unknown key"),
        (("nodes", 1, "site", "a b"), "nodes[1].site", "letters, digits"),
        (("nodes", 1, "addresses", ["10.0.0.1:7800"]), "nodes[1].addresses", "the same address"),
        (("nodes", 1, "addresses", ["h:1", "h:2"]), "nodes[1].addresses", "every private network"),
        (("nodes", 2, "name", "a1"), "nodes[2].name", "the same name"),
    ],
)
def test_bad_keys_are_refused_naming_them(
    initialised: Path, change: tuple, key: str, problem: str
) -> None:
    doc = copy.deepcopy(_doc(initialised))
    *where, last, value = change
    node = doc
    for part in where:
        node = node[part]
    node[last] = value
    with pytest.raises(ConfigError) as info:
        parse_cluster_config(doc, str(initialised / "a1.toml"))
    assert info.value.key == key and problem in info.value.problem


def test_quorum_kind_rules(initialised: Path) -> None:
    doc = copy.deepcopy(_doc(initialised))
    del doc["witness"]
    with pytest.raises(ConfigError, match="needs the witness"):
        parse_cluster_config(doc, str(initialised / "a1.toml"))
    doc["cluster"]["quorum"] = "majority"
    doc["nodes"] = doc["nodes"][:2]
    with pytest.raises(ConfigError, match="two nodes stops"):
        parse_cluster_config(doc, str(initialised / "a1.toml"))
    doc["cluster"]["quorum"] = "disk"
    with pytest.raises(ConfigError, match="needs a mirrored volume"):
        parse_cluster_config(doc, str(initialised / "a1.toml"))


def test_disk_quorum_needs_its_mirrors_and_sane_timers(initialised: Path) -> None:
    doc = copy.deepcopy(_doc(initialised))
    del doc["witness"]
    doc["cluster"]["quorum"] = "disk"
    doc["quorum_disk"] = {"volume": "quorum"}
    with pytest.raises(ConfigError, match=r"quorum_disk\.mirrors"):
        parse_cluster_config(doc, str(initialised / "a1.toml"))
    doc["quorum_disk"]["mirrors"] = ["127.0.0.1:10809", "nonsense"]
    with pytest.raises(ConfigError, match=r"quorum_disk\.mirrors"):
        parse_cluster_config(doc, str(initialised / "a1.toml"))
    doc["quorum_disk"]["mirrors"] = ["127.0.0.1:10809", "127.0.0.2:10809"]
    cfg = parse_cluster_config(doc, str(initialised / "a1.toml"))
    assert [str(m) for m in cfg.quorum_disk_mirrors] == ["127.0.0.1:10809", "127.0.0.2:10809"]
    assert not cfg.quorum_disk_tls
    doc["quorum_disk"]["tls"] = "yes"
    with pytest.raises(ConfigError, match=r"quorum_disk\.tls"):
        parse_cluster_config(doc, str(initialised / "a1.toml"))
    doc["quorum_disk"]["tls"] = True
    assert parse_cluster_config(doc, str(initialised / "a1.toml")).quorum_disk_tls
    assert cfg.spec().arbitration.hold_s == cfg.timers.quorum_disk_hold_s
    doc["timers"]["quorum_disk_hold_s"] = 2.0  # renewals every 2 s could not keep it
    with pytest.raises(ConfigError, match=r"quorum_disk_hold_s.*renew_interval_s"):
        parse_cluster_config(doc, str(initialised / "a1.toml"))
