"""The cluster's stream frames, the node's state directory and the witness's
saved state: round trips, and bad input refused with a clear error while
nothing changes."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geoclus.cluster import wire
from geoclus.cluster.messages import Append, Entry, NewView, Promise, Snapshot, Submit
from geoclus.cluster.node import Disk
from geoclus.cluster.state import StateDir, StateError
from geoclus.cluster.witnessd import restore_witness, witness_state
from quorum.witness import VoteRequest, WitnessCore

views = st.tuples(st.integers(0, 2**40), st.integers(-1, 63))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
entries = st.builds(Entry, views, st.integers(1, 10**6), st.text(max_size=12), json_values)
snapshots = st.builds(
    Snapshot,
    st.integers(0, 10**6),
    json_values,
    st.lists(st.text(max_size=8), max_size=3).map(tuple),
)
messages = st.one_of(
    st.builds(
        Promise,
        views,
        views,
        st.lists(entries, max_size=4).map(tuple),
        st.integers(0, 100),
        st.floats(0, 100),
        st.floats(0, 100),
        snapshots,
    ),
    st.builds(
        Append,
        views,
        st.integers(0, 100),
        st.lists(entries, max_size=4).map(tuple),
        st.integers(0, 100),
        st.none() | snapshots,
    ),
    st.builds(
        NewView,
        views,
        st.frozensets(st.integers(0, 63), max_size=5),
        st.lists(entries, max_size=4).map(tuple),
        st.integers(0, 100),
        st.floats(0, 100),
        st.booleans(),
        snapshots,
    ),
    st.builds(Submit, st.text(max_size=10), json_values),
    st.builds(
        VoteRequest,
        views,
        st.frozensets(st.integers(0, 63), max_size=5),
        st.tuples(views, st.integers(0, 100)),
        st.booleans(),
        st.floats(0, 1e6),
    ),
)


@given(messages)
def test_every_message_survives_the_wire(msg) -> None:
    frame = wire.encode(msg)
    assert wire.FrameReader().feed(frame) == [msg]


@given(messages, st.integers(1, 64))
def test_frames_split_anywhere_reassemble(msg, cut) -> None:
    frame = wire.encode(msg) * 2
    reader = wire.FrameReader()
    got = reader.feed(frame[:cut]) + reader.feed(frame[cut:])
    assert got == [msg, msg]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "not JSON"),
        (b'{"t": "Promise"}', '{"t": TYPE'),
        (b'{"t": "Nope", "m": {}}', "unknown message type"),
        (b'{"t": "Installed", "m": {"view": [1, 2]}}', "missing field 'length'"),
        (b'{"t": "Installed", "m": {"view": [1, 2], "length": 1, "x": 0}}', "unknown field"),
        (b'{"t": "Installed", "m": {"view": [1, "a"], "length": 1}}', "Installed.view[1]"),
        (b'{"t": "Installed", "m": {"view": [1, 2, 3], "length": 1}}', "expected 2 items"),
        (b'{"t": "Installed", "m": {"view": [1, 2], "length": true}}', "expected an integer"),
        (b'{"t": "Pong", "m": {"view": [1, 2], "ping_sent_at": 1e999, "witness_s": 0}}', "finite"),
    ],
)
def test_bad_frames_are_refused_naming_the_problem(body: bytes, problem: str) -> None:
    with pytest.raises(wire.WireError, match=problem.replace("[", r"\[").replace("(", r"\(")):
        wire.decode_body(body)


def test_an_over_long_frame_is_refused_before_it_is_buffered() -> None:
    reader = wire.FrameReader(max_frame_bytes=100)
    with pytest.raises(wire.WireError, match="over the 100 limit"):
        reader.feed((10_000).to_bytes(4, "big") + b"x" * 10)


def test_disk_state_round_trips_and_damage_is_refused(tmp_path) -> None:
    sd = StateDir(str(tmp_path / "s"))
    assert sd.load_disk() is None
    disk = Disk(
        promised=(5, 1),
        normal_view=(4, 0),
        members=frozenset({0, 1}),
        log=[Entry((4, 0), 8, "u8", {"op": "set", "key": "k", "value": [1, {"a": None}]})],
        commit=8,
        forced=True,
        base=Snapshot(7, {"cluster": "c", "version": 7}, ("u6", "u7"), frozenset({3})),
        voters=frozenset({0, 1, 2}),
    )
    sd.save_disk(disk)
    assert sd.load_disk() == disk
    path = os.path.join(sd.path, "cluster-state.json")
    good = pathlib.Path(path).read_bytes()
    doc = json.loads(good)
    doc["body"] = doc["body"].replace('"commit":8', '"commit":0')
    pathlib.Path(path).write_text(json.dumps(doc))
    with pytest.raises(StateError, match="checksum mismatch"):
        sd.load_disk()
    pathlib.Path(path).write_bytes(good[: len(good) // 2])
    with pytest.raises(StateError, match="truncated"):
        sd.load_disk()
    # Nothing was rewritten by the failed loads.
    assert pathlib.Path(path).read_bytes() == good[: len(good) // 2]


def test_a_state_file_from_before_log_compaction_loads_with_an_empty_snapshot(tmp_path) -> None:
    sd = StateDir(str(tmp_path / "s"))
    sd.save_disk(Disk(promised=(2, 0), log=[Entry((1, 0), 1, "u1", None)], commit=1))
    path = os.path.join(sd.path, "cluster-state.json")
    doc = json.loads(pathlib.Path(path).read_bytes())
    body = json.loads(doc["body"])
    del body["base"]
    del body["voters"]
    sd.save_json("cluster-state.json", body)
    loaded = sd.load_disk()
    assert loaded is not None and loaded.base.index == 0 and loaded.length == 1
    assert loaded.voters is None and loaded.base.removed == frozenset()


def test_epochs_rise_across_starts_and_a_damaged_epoch_file_is_refused(tmp_path) -> None:
    sd = StateDir(str(tmp_path / "s"))
    assert [sd.next_epoch() for _ in range(3)] == [1, 2, 3]
    pathlib.Path(sd.path, "epoch").write_text("garbage")
    with pytest.raises(StateError, match="not an epoch number"):
        sd.next_epoch()


def test_witness_state_survives_a_restart_conservatively() -> None:
    core = WitnessCore(lease_s=10.0, collect_s=1.0)
    req = VoteRequest((3, 1), frozenset({0, 1}), ((3, 1), 4), record=True)
    core.on_request(req, 0.0)
    core.on_request(req, 1.5)  # the vote is free: collected, then granted
    assert core.holder is not None and core.holder.view == (3, 1)
    saved = json.loads(json.dumps(witness_state(core, 2.0)))
    again = restore_witness(saved, 10.0, 1.0, now=500.0)  # another clock after the restart
    assert again.holder is not None and again.holder.view == (3, 1)
    assert again.recorded == ((3, 1), 4)
    # The old holder's lease counts again in full: a rival is refused.
    rival = VoteRequest((9, 2), frozenset({2, 3}), ((3, 1), 4))
    assert not again.on_request(rival, 509.0).granted
    # A view behind the recorded log is refused even after the lease.
    behind = VoteRequest((10, 2), frozenset({2, 3}), ((2, 0), 1))
    assert "behind" in again.on_request(behind, 520.0).reason
