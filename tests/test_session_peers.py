"""PrimaryCore with two secondaries: per-peer state, shared log."""

from __future__ import annotations

from replicator.frames import Ack, Mode, Role, WriteKind
from replicator.handshake import make_hello
from replicator.session import PrimaryCore, ReplicationPolicy


def hello(applied: int = 0, durable: int = 0):
    return make_hello(
        role=Role.SECONDARY,
        mode=Mode.SYNC,
        flags=0,
        block_size=512,
        size_bytes=1 << 20,
        volume_id=b"\x01" * 16,
        generation=0,
        applied_seq=applied,
        durable_seq=durable,
        node="b",
    )


def two_peer_core(**policy) -> PrimaryCore:
    core = PrimaryCore(ReplicationPolicy(**policy), 1 << 20, peers=("b", "c"))
    for name in ("b", "c"):
        core.peer_connected(hello(), 1, name)
    return core


def test_sync_write_completes_only_when_every_peer_applied_it() -> None:
    core = two_peer_core(mode=Mode.SYNC)
    seq = core.submit(WriteKind.WRITE, 0, 512, b"x" * 512, False, 0.0)
    assert core.local_done(seq) == []
    for name in ("b", "c"):
        batch = core.next_batch(name)
        assert batch is not None and batch.entries[0].seq == seq
    assert core.on_ack(Ack(seq, 0, 0), "b") == []  # one peer is not enough
    assert core.on_ack(Ack(seq, 0, 0), "c") == [seq]


def test_log_is_trimmed_at_the_slowest_live_peer() -> None:
    core = two_peer_core(mode=Mode.ASYNC)
    for i in range(3):
        core.submit(WriteKind.WRITE, i * 512, 512, b"y" * 512, False, 0.0)
        core.local_done(i + 1)
    for name in ("b", "c"):
        core.next_batch(name)
    log_full = core.log_bytes
    core.on_ack(Ack(3, 3, 0), "b")
    assert core.log_bytes == log_full  # c has made nothing durable yet
    core.on_ack(Ack(3, 1, 0), "c")
    assert core.log_bytes == 2 * (24 + 512)  # writes 2 and 3 still needed by c
    assert core.lag_writes == 0 and core.peers["c"].durable == 1


def test_an_outdated_peer_does_not_hold_back_the_other() -> None:
    core = two_peer_core(mode=Mode.ASYNC, on_congestion="pull-ahead", max_lag_bytes=4096)
    core.peer_lost("c")
    for i in range(20):
        verdict = core.admission(512)
        if verdict == "overflow":
            core.go_outdated("c")
        seq = core.submit(WriteKind.WRITE, i * 512, 512, b"z" * 512, False, 0.0)
        core.local_done(seq)
        batch = core.next_batch("b")
        assert batch is not None
        core.on_ack(Ack(seq, seq, 0), "b")
    assert core.peers["c"].outdated and not core.peers["b"].outdated
    assert core.peers["c"].bitmap.dirty_bytes > 0
    assert core.log_bytes == 0  # b made everything durable; c no longer counts
    assert core.next_batch("c") is None


def test_outdated_peer_reconnecting_after_primary_restart_acks_cleanly() -> None:
    """The primary restarted knowing its peer is outdated (last_seq 10, peer at
    4): the peer's acknowledgements of where it stands must be accepted, or the
    link would drop and re-dial forever."""
    core = PrimaryCore(ReplicationPolicy(mode=Mode.ASYNC), 1 << 20, last_seq=10, peer_outdated=True)
    core.peer_connected(hello(applied=4, durable=4), 1)
    assert core.next_batch() is None  # nothing is shipped to an outdated peer
    for _ in range(3):
        assert core.on_ack(Ack(4, 4, 0)) == []  # must not raise ProtocolError
    assert core.peer.applied == 4 and core.outdated
