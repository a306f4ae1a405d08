"""geoclus/cluster/configdb.py: the configuration database applies updates in
log order, refuses bad ones without changing, and a checkpoint plus the log
after it gives exactly the same database as the whole log."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geoclus.cluster.configdb import ConfigDb, ConfigDbError

keys = st.sampled_from(["group.db.owner", "group.db.preferred", "res.ip", "timers.x"])
updates = st.one_of(
    st.builds(lambda k, v: {"op": "set", "key": k, "value": v}, keys, st.integers() | st.text()),
    st.builds(lambda k: {"op": "delete", "key": k}, keys),
    st.builds(lambda n: {"op": "pause", "node": n}, st.sampled_from(["a1", "b1"])),
    st.builds(lambda n: {"op": "resume", "node": n}, st.sampled_from(["a1", "b1"])),
    st.builds(lambda n: {"op": "evict", "node": n}, st.sampled_from(["a1", "b1"])),
)


@given(st.lists(updates, max_size=40), st.data())
def test_checkpoint_plus_replay_equals_the_whole_log(log: list, data: st.DataObject) -> None:
    whole = ConfigDb("prod")
    for i, u in enumerate(log, 1):
        whole.apply(i, u)
    k = data.draw(st.integers(0, len(log)))
    part = ConfigDb("prod")
    for i, u in enumerate(log[:k], 1):
        part.apply(i, u)
    restored = ConfigDb.from_checkpoint(part.checkpoint(), cluster="prod")
    for i, u in enumerate(log[k:], k + 1):
        restored.apply(i, u)
    assert restored.state() == whole.state()
    assert restored.version == len(log)


def test_updates_apply_in_order_only() -> None:
    db = ConfigDb("prod")
    db.apply(1, {"op": "set", "key": "a", "value": 1})
    with pytest.raises(ConfigDbError, match="out of order"):
        db.apply(3, {"op": "set", "key": "a", "value": 2})
    with pytest.raises(ConfigDbError, match="out of order"):
        db.apply(1, {"op": "set", "key": "a", "value": 2})  # a replay
    assert db.values == {"a": 1} and db.version == 1


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ({"op": "grow"}, "unknown update op"),
        ({"op": "set", "key": "a"}, "takes exactly"),
        ({"op": "set", "key": "a", "value": 1, "x": 2}, "takes exactly"),
        ({"op": "set", "key": "", "value": 1}, "non-empty string"),
        ({"op": "set", "key": "a", "value": float("nan")}, "not JSON"),
        ({"op": "set", "key": "a", "value": "x" * 70000}, "over"),
        ({"op": "evict", "node": ""}, "node name"),
        (["set", "a", 1], "must be a table"),
    ],
)
def test_bad_updates_change_nothing(update: object, problem: str) -> None:
    db = ConfigDb("prod")
    db.apply(1, {"op": "set", "key": "a", "value": 1})
    before = db.state()
    with pytest.raises(ConfigDbError, match=problem):
        db.apply(2, update)
    assert db.state() == before


def test_evict_pause_resume() -> None:
    db = ConfigDb("prod")
    db.apply(1, {"op": "pause", "node": "b1"})
    assert db.paused == {"b1"}
    db.apply(2, {"op": "evict", "node": "b1"})
    assert db.evicted == {"b1"} and db.paused == set()


def test_corrupt_truncated_and_foreign_backups_are_refused() -> None:
    db = ConfigDb("prod")
    db.apply(1, {"op": "set", "key": "a", "value": [1, 2]})
    good = db.checkpoint()
    assert ConfigDb.from_checkpoint(good).state() == db.state()
    with pytest.raises(ConfigDbError, match="truncated"):
        ConfigDb.from_checkpoint(good[: len(good) // 2])
    corrupt = good.replace(b"[1,2]", b"[1,3]")
    with pytest.raises(ConfigDbError, match="checksum mismatch"):
        ConfigDb.from_checkpoint(corrupt)
    with pytest.raises(ConfigDbError, match="cluster 'prod', this is cluster 'test'"):
        ConfigDb.from_checkpoint(good, cluster="test")
    with pytest.raises(ConfigDbError, match="no geoclus-configdb header"):
        ConfigDb.from_checkpoint(b'{"format": "other"}')


def test_restore_replaces_the_whole_database_in_one_update() -> None:
    db = ConfigDb("c")
    db.apply(1, {"op": "set", "key": "a", "value": 1})
    db.apply(2, {"op": "evict", "node": "n9"})
    backup = ConfigDb.from_checkpoint(db.checkpoint(), "c")
    db.apply(3, {"op": "set", "key": "b", "value": 2})
    db.apply(4, {"op": "delete", "key": "a"})
    restore = {
        "op": "restore",
        "values": backup.values,
        "evicted": sorted(backup.evicted),
        "paused": [],
        "from_version": backup.version,
    }
    db.apply(5, restore)
    assert (db.values, db.evicted, db.version) == ({"a": 1}, {"n9"}, 5)


def test_a_restore_neither_undoes_nor_adds_evictions() -> None:
    """Evictions change the vote total one at a time (through the log's
    voter rules), so a restore cannot bring an evicted node back or evict
    several at once: it keeps the evicted set in force."""
    db = ConfigDb("c")
    db.apply(1, {"op": "evict", "node": "n1"})
    restore = {
        "op": "restore",
        "values": {"k": 1},
        "evicted": ["n2", "n3"],
        "paused": ["n1", "n4"],
        "from_version": 0,
    }
    db.apply(2, restore)
    assert (db.values, db.evicted, db.paused) == ({"k": 1}, {"n1"}, {"n4"})


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"values": [], "evicted": [], "paused": [], "from_version": 1}, "values must be a table"),
        ({"values": {"": 1}, "evicted": [], "paused": [], "from_version": 1}, "key must be"),
        ({"values": {}, "evicted": [3], "paused": [], "from_version": 1}, "evicted must be"),
        ({"values": {}, "evicted": [], "paused": [], "from_version": -1}, "from_version"),
        ({"values": {}, "evicted": [], "paused": []}, "takes exactly"),
    ],
)
def test_a_bad_restore_is_refused_and_changes_nothing(bad: dict, problem: str) -> None:
    db = ConfigDb("c")
    db.apply(1, {"op": "set", "key": "a", "value": 1})
    before = db.checkpoint()
    with pytest.raises(ConfigDbError, match=problem):
        db.apply(2, {"op": "restore", **bad})
    assert db.checkpoint() == before


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ("nope", "not a configuration state"),
        ({"cluster": "c", "version": 1}, "not a configuration state"),
        (
            {"cluster": "other", "version": 1, "values": {}, "evicted": [], "paused": []},
            "cluster 'other'",
        ),
        ({"cluster": "c", "version": -1, "values": {}, "evicted": [], "paused": []}, "version"),
        ({"cluster": "c", "version": True, "values": {}, "evicted": [], "paused": []}, "version"),
        ({"cluster": "c", "version": 1, "values": {"": 1}, "evicted": [], "paused": []}, "key"),
        ({"cluster": "c", "version": 1, "values": {}, "evicted": [3], "paused": []}, "evicted"),
    ],
)
def test_a_bad_snapshot_state_is_refused_naming_the_problem(state: object, problem: str) -> None:
    with pytest.raises(ConfigDbError, match=problem):
        ConfigDb.from_state(state, "c")


def test_a_state_round_trips() -> None:
    db = ConfigDb("c")
    db.apply(1, {"op": "set", "key": "k", "value": [1, 2]})
    db.apply(2, {"op": "evict", "node": "n3"})
    again = ConfigDb.from_state(json.loads(json.dumps(db.state())), "c")
    assert again == db
