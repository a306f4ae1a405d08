"""geoclus/cluster/heartbeat.py: heartbeat datagrams are authenticated and
replay-protected; every bad datagram is dropped, counted by reason, and
changes nothing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geoclus.cluster.heartbeat import DATAGRAM_BYTES, REPLAY_WINDOW, HeartbeatCodec
from geoclus.cluster.messages import NO_VIEW, Ping, Pong

KEY = b"k" * 32
NODES = frozenset({0, 1, 2})


def pair(epoch: int = 1) -> tuple[HeartbeatCodec, HeartbeatCodec]:
    return HeartbeatCodec(0, NODES, KEY, epoch), HeartbeatCodec(1, NODES, KEY, 7)


def test_ping_and_pong_round_trip() -> None:
    a, b = pair()
    hb = b.open(a.seal(1, Ping((3, 2), 12.5, 9)))
    assert hb is not None and hb.sender == 0 and hb.epoch == 1 and hb.seq == 1
    assert hb.msg == Ping((3, 2), 12.5, 9)
    hb = a.open(b.seal(0, Pong(NO_VIEW, 12.5, 4.25)))
    assert hb is not None and hb.msg == Pong(NO_VIEW, 12.5, 4.25)
    assert not hb.msg.forced
    hb = a.open(b.seal(0, Pong((4, 1), 13.0, 0.0, forced=True)))
    assert hb is not None and hb.msg == Pong((4, 1), 13.0, 0.0, True)
    assert len(a.seal(1, Ping(NO_VIEW, 0.0, 0))) == DATAGRAM_BYTES


def test_forged_misaddressed_and_truncated_datagrams_are_dropped() -> None:
    a, b = pair()
    mallory = HeartbeatCodec(0, NODES, b"m" * 32, 1)
    assert b.open(mallory.seal(1, Ping(NO_VIEW, 1.0, 0))) is None
    assert b.open(a.seal(2, Ping(NO_VIEW, 1.0, 0))) is None  # for node 2
    good = a.seal(1, Ping(NO_VIEW, 1.0, 0))
    assert b.open(good[:-1]) is None and b.open(good + b"x") is None
    stranger = HeartbeatCodec(5, frozenset({5, 1}), KEY, 1)
    assert b.open(stranger.seal(1, Ping(NO_VIEW, 1.0, 0))) is None  # not configured
    assert dict(b.dropped) == {"mac": 1, "address": 2, "length": 2}
    assert b.accepted == 0
    assert b.open(good) is not None  # the bad ones changed nothing


def test_replays_are_dropped_and_reordering_within_the_window_is_not() -> None:
    a, b = pair()
    grams = [a.seal(1, Ping(NO_VIEW, float(i), 0)) for i in range(REPLAY_WINDOW + 10)]
    assert b.open(grams[5]) is not None
    assert b.open(grams[5]) is None  # exact replay
    assert b.open(grams[3]) is not None  # late but new, within the window
    assert b.open(grams[3]) is None
    assert b.open(grams[-1]) is not None
    assert b.open(grams[4]) is None  # now older than the window
    assert b.dropped["replay"] == 3


def test_a_restarted_sender_starts_a_new_epoch_and_old_epochs_are_dead() -> None:
    a, b = pair(epoch=1)
    old = [a.seal(1, Ping(NO_VIEW, 0.0, 0)) for _ in range(3)]
    assert b.open(old[0]) is not None
    restarted = HeartbeatCodec(0, NODES, KEY, 2)
    assert b.open(restarted.seal(1, Ping(NO_VIEW, 0.0, 0))) is not None  # seq 1 again
    assert b.open(old[1]) is None  # the previous life's datagrams are replays
    assert b.dropped["replay"] == 1


@given(st.integers(0, DATAGRAM_BYTES - 1), st.integers(1, 255))
def test_any_corrupted_byte_is_dropped(position: int, flip: int) -> None:
    a, b = pair()
    data = bytearray(a.seal(1, Pong((1, 0), 2.0, 1.0)))
    data[position] ^= flip
    assert b.open(bytes(data)) is None
    assert sum(b.dropped.values()) == 1 and b.accepted == 0


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        HeartbeatCodec(0, NODES, b"short", 1)
