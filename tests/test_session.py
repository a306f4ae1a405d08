"""The pure replication cores (replicator/session.py) and the handshake checks
(replicator/handshake.py). Expected values are worked out by hand from the
documented rules: wire bytes of an entry = 24-byte header + data (WRITE only)."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from geoclus.errors import ProtocolError
from replicator.frames import (
    Ack,
    Flush,
    Hello,
    Mode,
    Refuse,
    Role,
    Welcome,
    WriteEntry,
    WriteKind,
    Writes,
)
from replicator.handshake import check_hello, make_hello, negotiate_version
from replicator.session import PrimaryCore, ReplicationPolicy, SecondaryCore

KiB = 1024
SIZE = 1024 * KiB
REGION = 64 * KiB
HDR = 24  # entry header bytes on the wire
W = WriteKind.WRITE
Z = WriteKind.ZEROES
T = WriteKind.TRIM


def policy(**kw) -> ReplicationPolicy:
    return ReplicationPolicy(region_bytes=REGION, **kw)


def peer_hello(applied: int = 0, durable: int | None = None) -> Hello:
    return make_hello(
        role=Role.SECONDARY,
        mode=Mode.SYNC,
        flags=0,
        block_size=512,
        size_bytes=SIZE,
        volume_id=bytes(16),
        generation=1,
        applied_seq=applied,
        durable_seq=applied if durable is None else durable,
        node="b",
    )


def connected(pol: ReplicationPolicy, **kw) -> PrimaryCore:
    p = PrimaryCore(pol, SIZE, **kw)
    assert p.peer_connected(peer_hello(p.last_seq), 1) == Welcome(1, p.last_seq + 1, p.last_seq)
    return p


def write(p: PrimaryCore, offset: int, length: int = 4 * KiB, *, fua=False, now=0.0, kind=W):
    data = bytes([offset // 4096 % 256]) * length if kind == W else b""
    return p.submit(kind, offset, length, data, fua, now)


def seqs(batch: Writes | None) -> list[int]:
    return [] if batch is None else [e.seq for e in batch.entries]


def snapshot(p: PrimaryCore) -> tuple:
    return (
        p.peer_applied,
        p.peer_durable,
        p.lag_bytes,
        p.lag_writes,
        p.in_flight_bytes,
        p.pending_writes,
        p.log_bytes,
        p.outdated,
        p.connected,
        list(p.bitmap),
    )


# ------------------------------------------------------------ completion


def test_sync_write_needs_local_done_and_ack() -> None:
    p = connected(policy(mode=Mode.SYNC))
    s = write(p, 0)
    assert s == 1
    assert p.local_done(s) == []
    assert not p.is_complete(s)
    assert seqs(p.next_batch()) == [1]
    assert p.on_ack(Ack(1, 0, 0)) == [1]
    assert p.is_complete(s)
    # The other order: ack first, then the local store.
    s2 = write(p, 8192)
    assert seqs(p.next_batch()) == [2]
    assert p.on_ack(Ack(2, 0, 0)) == []
    assert not p.is_complete(s2)
    assert p.local_done(s2) == [2]
    assert p.pending_writes == 0


def test_sync_fua_write_waits_for_durable() -> None:
    p = connected(policy(mode=Mode.SYNC))
    s = write(p, 0, fua=True)
    p.next_batch()
    assert p.local_done(s) == []
    assert p.on_ack(Ack(1, 0, 0)) == []  # applied, not durable
    assert not p.is_complete(s)
    assert p.on_ack(Ack(1, 1, 0)) == [1]


def test_async_write_completes_on_local_done_alone() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    s = write(p, 0, fua=True)
    assert p.local_done(s) == [s]
    assert seqs(p.next_batch()) == [1]  # still shipped
    q = PrimaryCore(policy(mode=Mode.ASYNC), SIZE)  # never connected
    assert q.local_done(write(q, 0)) == [1]


def test_local_done_unknown_seq_is_ignored() -> None:
    p = connected(policy())
    assert p.local_done(99) == []


# -------------------------------------------------------------- admission


def fill(p: PrimaryCore, n: int) -> None:
    for i in range(n):
        write(p, i * 4 * KiB)


ONE = HDR + 4 * KiB  # wire bytes of one 4 KiB write


@pytest.mark.parametrize(
    ("kw", "connect", "degraded", "want"),
    [
        (dict(mode=Mode.ASYNC, on_congestion="block"), True, False, "wait"),
        (dict(mode=Mode.ASYNC, on_congestion="pull-ahead"), True, False, "overflow"),
        (dict(mode=Mode.ASYNC, on_congestion="block"), False, False, "wait"),
        (dict(mode=Mode.SYNC, on_peer_loss="suspend"), True, False, "wait"),
        (dict(mode=Mode.SYNC, on_peer_loss="suspend"), False, False, "wait"),
        (dict(mode=Mode.SYNC, on_peer_loss="continue"), True, False, "wait"),
        (dict(mode=Mode.SYNC, on_peer_loss="continue"), False, False, "overflow"),
        (dict(mode=Mode.SYNC, on_peer_loss="suspend"), False, True, "overflow"),
    ],
)
def test_admission_per_policy(kw, connect, degraded, want) -> None:
    pol = policy(max_lag_bytes=2 * ONE, **kw)
    p = connected(pol) if connect else PrimaryCore(pol, SIZE)
    if degraded:
        p.allow_degraded()
    assert p.admission(4 * KiB) == "admit"  # empty log
    fill(p, 2)
    assert p.log_bytes == 2 * ONE
    assert p.admission(4 * KiB) == want
    # A ZEROES entry costs only its header, but the log is exactly full.
    assert p.admission(4 * KiB, Z) == want


def test_admission_edges() -> None:
    p = connected(policy(mode=Mode.ASYNC, max_lag_bytes=2 * ONE + HDR))
    fill(p, 2)
    assert p.admission(4 * KiB) == "wait"
    assert p.admission(64 * KiB, Z) == "admit"  # 24 more bytes fit exactly
    q = connected(policy(mode=Mode.ASYNC, max_lag_bytes=100))
    assert q.admission(SIZE) == "admit"  # an empty log admits anything
    q.go_outdated()
    fill(q, 3)
    assert q.admission(SIZE) == "admit"  # outdated: the log is not used


def test_admission_drains_after_durable_ack() -> None:
    p = connected(policy(mode=Mode.ASYNC, max_lag_bytes=2 * ONE))
    fill(p, 2)
    p.next_batch()
    assert p.admission(4 * KiB) == "wait"
    p.on_ack(Ack(2, 0, 0))  # applied only: still retained
    assert p.admission(4 * KiB) == "wait"
    p.on_ack(Ack(2, 1, 0))
    assert p.log_bytes == ONE
    assert p.admission(4 * KiB) == "admit"


# ---------------------------------------------------------------- outdated


def test_go_outdated_moves_unacked_writes_to_the_bitmap() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    write(p, 0 * REGION)
    write(p, 2 * REGION)
    write(p, 5 * REGION + 4096, 8 * KiB)
    assert seqs(p.next_batch()) == [1, 2, 3]
    p.on_ack(Ack(1, 1, 0))
    p.go_outdated()
    assert p.outdated
    assert list(p.bitmap) == [2, 5]
    assert p.log_bytes == 0
    assert p.lag_bytes == 2 * REGION
    assert p.next_batch() is None
    # Later writes go to the bitmap, never on the wire.
    write(p, 9 * REGION)
    assert list(p.bitmap) == [2, 5, 9]
    assert p.next_batch() is None
    assert p.next_flush(100.0) is None
    assert p.on_ack(Ack(3, 3, 0)) == []
    assert p.lag_bytes == 3 * REGION


def test_go_outdated_marks_applied_but_not_durable_writes() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    write(p, 0)
    write(p, 3 * REGION)
    p.next_batch()
    p.on_ack(Ack(2, 0, 0))  # applied, not durable: a crash could still lose them
    p.go_outdated()
    assert list(p.bitmap) == [0, 3]


# --------------------------------------------------------------- batching


def test_batches_respect_max_batch_entries() -> None:
    p = connected(policy(mode=Mode.ASYNC, max_batch_entries=2))
    fill(p, 5)
    assert [seqs(p.next_batch()) for _ in range(4)] == [[1, 2], [3, 4], [5], []]


def test_batches_respect_max_batch_bytes() -> None:
    p = connected(policy(mode=Mode.ASYNC, max_batch_bytes=2 * ONE + ONE // 2))
    fill(p, 5)
    assert [seqs(p.next_batch()) for _ in range(3)] == [[1, 2], [3, 4], [5]]
    q = connected(policy(mode=Mode.ASYNC, max_batch_bytes=3 * ONE))
    fill(q, 4)
    assert seqs(q.next_batch()) == [1, 2, 3]


def test_batches_respect_max_in_flight_bytes() -> None:
    p = connected(policy(mode=Mode.ASYNC, max_in_flight_bytes=2 * ONE + 100))
    fill(p, 5)
    assert seqs(p.next_batch()) == [1, 2]
    assert p.in_flight_bytes == 2 * ONE
    assert p.next_batch() is None  # window full
    p.on_ack(Ack(1, 0, 0))
    assert p.in_flight_bytes == ONE
    assert seqs(p.next_batch()) == [3]
    assert p.next_batch() is None
    p.on_ack(Ack(3, 0, 0))
    assert seqs(p.next_batch()) == [4, 5]


def test_oversized_entry_goes_alone_when_nothing_is_in_flight() -> None:
    p = connected(policy(mode=Mode.ASYNC, max_in_flight_bytes=1000, max_batch_bytes=1000))
    fill(p, 3)  # each 4120 wire bytes: larger than both limits
    assert seqs(p.next_batch()) == [1]
    assert p.next_batch() is None  # something in flight: no second oversized entry
    p.on_ack(Ack(1, 0, 0))
    assert seqs(p.next_batch()) == [2]


def test_zeroes_entries_cost_only_their_header() -> None:
    p = connected(policy(mode=Mode.ASYNC, max_batch_bytes=3 * HDR))
    for i in range(4):
        write(p, i * REGION, REGION, kind=Z if i % 2 else T)
    batch = p.next_batch()
    assert seqs(batch) == [1, 2, 3]
    assert all(e.data == b"" for e in batch.entries)
    assert p.lag_bytes == 4 * HDR


def test_batch_entries_carry_the_write() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    p.submit(W, 8192, 1024, b"q" * 1024, True, 0.0)
    p.submit(Z, 0, 4096, b"", False, 0.0)
    batch = p.next_batch()
    assert batch == Writes(
        (WriteEntry(1, W, 8192, 1024, True, b"q" * 1024), WriteEntry(2, Z, 0, 4096, False))
    )


# ------------------------------------------------------------------- acks


def test_bad_acks_are_refused_and_change_nothing() -> None:
    p = connected(policy(mode=Mode.SYNC))
    for i in range(3):
        write(p, i * REGION)
        p.local_done(i + 1)
    assert seqs(p.next_batch()) == [1, 2, 3]
    write(p, 4 * REGION)  # sequenced, not sent
    assert p.on_ack(Ack(2, 1, 0)) == [1, 2]
    before = snapshot(p)
    for ack, words in [
        (Ack(4, 0, 0), "only 3 were sent"),  # beyond what was sent
        (Ack(3, 3 + 1, 0), "durable"),  # durable > applied
        (Ack(2, 2 + 1, 0), "durable"),
        (Ack(1, 1, 0), "backwards"),  # applied goes back
        (Ack(3, 0, 0), "backwards"),  # durable goes back
    ]:
        with pytest.raises(ProtocolError, match=words):
            p.on_ack(ack)
        assert snapshot(p) == before
    assert p.on_ack(Ack(2, 1, 0)) == []  # a repeat is fine


def test_ack_before_handshake_is_refused() -> None:
    p = PrimaryCore(policy(), SIZE)
    with pytest.raises(ProtocolError):
        p.on_ack(Ack(0, 0, 0))


# -------------------------------------------------------------- reconnect


def test_reconnect_resumes_from_the_peers_applied_seq() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    fill(p, 3)
    assert seqs(p.next_batch()) == [1, 2, 3]
    p.on_ack(Ack(1, 1, 0))
    p.peer_lost()
    assert not p.connected
    assert p.next_batch() is None
    assert p.peer_connected(peer_hello(1), 1) == Welcome(1, 2, 3)
    assert seqs(p.next_batch()) == [2, 3]  # resent


def test_reconnect_after_peer_lost_applied_writes_resends_them() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    fill(p, 4)
    p.next_batch()
    p.on_ack(Ack(3, 1, 0))
    p.peer_lost()
    # The secondary crashed and came back with only what was durable.
    assert p.peer_connected(peer_hello(1), 1) == Welcome(1, 2, 4)
    assert p.stats.resends == 2
    assert p.lag_writes == 3
    assert seqs(p.next_batch()) == [2, 3, 4]


def test_peer_ahead_of_primary_is_refused() -> None:
    p = PrimaryCore(policy(), SIZE, last_seq=5)
    answer = p.peer_connected(peer_hello(6), 1)
    assert isinstance(answer, Refuse)
    assert "6" in answer.reason and "5" in answer.reason
    assert not p.connected
    assert p.stats.refusals == [answer.reason]


def test_peer_behind_the_retained_log_becomes_outdated() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    for i in range(3):
        write(p, i * REGION)
    p.next_batch()
    p.on_ack(Ack(3, 2, 0))  # writes 1 and 2 are trimmed from the log
    assert p.log_bytes == ONE
    p.peer_lost()
    answer = p.peer_connected(peer_hello(0), 1)  # the peer lost everything
    assert isinstance(answer, Welcome)
    assert p.outdated
    assert p.next_batch() is None
    assert 2 in list(p.bitmap)  # write 3 is tracked for the resync


def test_resume_from_durable_seq_after_trim_is_not_outdated() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    fill(p, 3)
    p.next_batch()
    p.on_ack(Ack(3, 2, 0))
    p.peer_lost()
    assert p.peer_connected(peer_hello(2), 1) == Welcome(1, 3, 3)
    assert not p.outdated
    assert seqs(p.next_batch()) == [3]


def test_primary_restarted_with_last_seq() -> None:
    p = PrimaryCore(policy(mode=Mode.ASYNC), SIZE, last_seq=10)
    assert p.peer_connected(peer_hello(10), 1) == Welcome(1, 11, 10)
    assert write(p, 0) == 11
    assert seqs(p.next_batch()) == [11]
    q = PrimaryCore(policy(mode=Mode.ASYNC), SIZE, last_seq=10)
    q.peer_connected(peer_hello(9), 1)  # behind what a restarted primary holds
    assert q.outdated


# ------------------------------------------------------------------- lag


def test_lag_values_by_hand() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    assert (p.lag_bytes, p.lag_writes, p.lag_seconds(0.0)) == (0, 0, 0.0)
    p.submit(W, 0, 4096, b"a" * 4096, False, 10.0)  # 4120 wire bytes
    p.submit(Z, 0, 8192, b"", False, 12.0)  # 24
    p.submit(W, 8192, 512, b"b" * 512, False, 15.0)  # 536
    assert p.lag_bytes == 4120 + 24 + 536
    assert p.lag_writes == 3
    assert p.lag_seconds(20.0) == 10.0
    assert p.lag_seconds(5.0) == 0.0  # never negative
    p.next_batch()
    p.on_ack(Ack(1, 0, 0))
    assert (p.lag_bytes, p.lag_writes, p.lag_seconds(20.0)) == (560, 2, 8.0)
    p.on_ack(Ack(2, 2, 0))
    assert (p.lag_bytes, p.lag_writes, p.lag_seconds(20.0)) == (536, 1, 5.0)
    p.on_ack(Ack(3, 3, 0))
    assert (p.lag_bytes, p.lag_writes, p.lag_seconds(20.0)) == (0, 0, 0.0)


def test_lag_when_outdated() -> None:
    p = PrimaryCore(policy(mode=Mode.ASYNC), SIZE - 4096)  # last region 60 KiB
    write(p, 0)
    write(p, SIZE - 8192)
    p.go_outdated()
    assert p.lag_bytes == REGION + (REGION - 4096)
    assert p.lag_writes == 2
    assert p.lag_seconds(1.0) == float("inf")


# -------------------------------------------------------------- peer loss


def test_suspend_on_peer_loss_blocks_until_degraded_allowed() -> None:
    p = connected(policy(mode=Mode.SYNC, on_peer_loss="suspend"))
    write(p, 0)
    p.local_done(1)
    p.next_batch()
    assert p.peer_lost() == []
    assert p.suspended
    write(p, REGION)
    assert p.local_done(2) == []
    assert not p.is_complete(1) and not p.is_complete(2)
    assert list(p.bitmap) == [0, 1]
    assert p.allow_degraded() == [1, 2]
    assert not p.suspended
    write(p, 2 * REGION)
    assert p.local_done(3) == [3]
    assert list(p.bitmap) == [0, 1, 2]


def test_continue_on_peer_loss_completes_locally() -> None:
    p = connected(policy(mode=Mode.SYNC, on_peer_loss="continue"))
    write(p, 0)
    p.local_done(1)
    assert seqs(p.next_batch()) == [1]
    assert p.peer_lost() == [1]
    assert not p.suspended
    write(p, REGION)
    assert p.local_done(2) == [2]
    assert list(p.bitmap) == [0, 1]


def test_not_yet_local_writes_stay_pending_after_degraded() -> None:
    p = connected(policy(mode=Mode.SYNC))
    write(p, 0)
    p.peer_lost()
    assert p.allow_degraded() == []  # the local store does not hold it yet
    assert p.local_done(1) == [1]


def test_bitmap_cleared_once_peer_caught_up_after_reconnect() -> None:
    p = connected(policy(mode=Mode.ASYNC))
    p.peer_lost()
    write(p, 0)
    write(p, 3 * REGION)
    assert list(p.bitmap) == [0, 3]
    p.peer_connected(peer_hello(0), 1)
    assert seqs(p.next_batch()) == [1, 2]
    p.on_ack(Ack(1, 0, 0))
    assert list(p.bitmap) == [0, 3]
    p.on_ack(Ack(2, 0, 0))
    assert list(p.bitmap) == []


def test_reconnect_ends_degraded_running() -> None:
    p = connected(policy(mode=Mode.SYNC))
    p.peer_lost()
    p.allow_degraded()
    p.peer_connected(peer_hello(0), 1)
    write(p, 0)
    assert p.local_done(1) == []  # sync again: needs the ack


# ----------------------------------------------------------------- flushes


def test_requested_peer_flush() -> None:
    p = connected(policy(mode=Mode.SYNC, peer_flush_interval_s=100.0))
    fill(p, 2)
    p.next_batch()
    upto = p.request_peer_flush()
    assert upto == 2
    assert not p.peer_flush_satisfied(2)
    assert p.next_flush(0.0) == Flush(2, 1)
    assert p.next_flush(0.0) is None  # already sent
    p.on_ack(Ack(2, 2, 1))
    assert p.peer_flush_satisfied(2)


def test_background_flush_after_interval() -> None:
    p = connected(policy(mode=Mode.ASYNC, peer_flush_interval_s=1.0))
    fill(p, 2)
    p.next_batch()
    p.on_ack(Ack(2, 0, 0))
    assert p.next_flush(0.5) is None
    assert p.next_flush(1.0) == Flush(2, 1)


# ---------------------------------------------------------------- secondary


def entries(first: int, n: int, *, offset=0, length=4096, fua=False) -> Writes:
    return Writes(
        tuple(
            WriteEntry(first + i, W, offset + i * length, length, fua, b"d" * length)
            for i in range(n)
        )
    )


def welcomed(applied: int = 0) -> SecondaryCore:
    s = SecondaryCore(SIZE, 4096, durable_seq=applied)
    s.on_welcome(Welcome(1, applied + 1, applied + 5))
    return s


def test_secondary_refuses_writes_and_flush_before_welcome() -> None:
    s = SecondaryCore(SIZE, 4096, durable_seq=0)
    with pytest.raises(ProtocolError, match="WELCOME"):
        s.on_writes(entries(1, 1))
    with pytest.raises(ProtocolError, match="WELCOME"):
        s.on_flush(Flush(1, 1))
    assert s.received_seq == 0


def test_secondary_refuses_a_welcome_that_skips() -> None:
    s = SecondaryCore(SIZE, 4096, durable_seq=3)
    with pytest.raises(ProtocolError):
        s.on_welcome(Welcome(1, 6, 9))
    assert not s.welcomed


def test_secondary_accepts_in_order_and_acks() -> None:
    s = welcomed()
    batch = entries(1, 3)
    assert s.on_writes(batch) == batch.entries
    assert s.ack() == Ack(0, 0, 0)
    s.applied(2)
    assert s.ack() == Ack(2, 0, 0)
    s.applied(3)
    s.synced(3)
    assert s.ack() == Ack(3, 3, 0)
    assert s.on_writes(entries(4, 1)) == entries(4, 1).entries


@pytest.mark.parametrize(
    ("first", "word"), [(4, "gap"), (9, "gap"), (1, "replayed"), (2, "replayed")]
)
def test_secondary_refuses_gap_and_replay(first, word) -> None:
    s = welcomed()
    s.on_writes(entries(1, 2))
    with pytest.raises(ProtocolError, match=word):
        s.on_writes(entries(first, 1))
    assert s.received_seq == 2
    assert s.on_writes(entries(3, 1))[0].seq == 3


BAD_ENTRIES = [
    WriteEntry(2, W, 512, 4096, False, b"x" * 4096),  # misaligned offset
    WriteEntry(2, Z, 0, 1000, False),  # misaligned length
    WriteEntry(2, W, SIZE, 4096, False, b"x" * 4096),  # starts at the end
    WriteEntry(2, T, SIZE - 4096, 8192, False),  # runs past the end
    WriteEntry(2, W, 0, 4096, False, b"x" * 100),  # data length mismatch
]


@pytest.mark.parametrize("bad_entry", BAD_ENTRIES)
def test_secondary_refuses_a_bad_entry_and_returns_nothing(bad_entry) -> None:
    s = welcomed()
    good = WriteEntry(1, W, 0, 4096, True, b"g" * 4096)
    with pytest.raises(ProtocolError):
        s.on_writes(Writes((good, bad_entry)))
    assert s.received_seq == 0
    assert s.ack() == Ack(0, 0, 0)
    # The same good entry is still expected next.
    assert s.on_writes(Writes((good,))) == (good,)


def test_secondary_refuses_an_empty_batch() -> None:
    s = welcomed()
    with pytest.raises(ProtocolError):
        s.on_writes(Writes(()))


def test_secondary_sync_needed_for_fua() -> None:
    s = welcomed()
    s.on_writes(Writes((WriteEntry(1, W, 0, 4096, False, b"a" * 4096),)))
    s.on_writes(Writes((WriteEntry(2, W, 4096, 4096, True, b"b" * 4096),)))
    s.applied(1)
    assert not s.sync_needed()  # the FUA write is not applied yet
    s.applied(2)
    assert s.sync_needed()
    s.synced(2)
    assert not s.sync_needed()
    assert s.ack() == Ack(2, 2, 0)


def test_secondary_flush() -> None:
    s = welcomed()
    s.on_writes(entries(1, 2))
    s.applied(1)
    s.on_flush(Flush(2, 7))
    assert s.flush_blocked()
    assert not s.sync_needed()
    s.applied(2)
    assert not s.flush_blocked()
    assert s.sync_needed()
    assert s.ack() == Ack(2, 0, 0)  # flush not done yet
    s.synced(2)
    assert not s.sync_needed()
    assert s.ack() == Ack(2, 2, 7)


def test_secondary_durable_never_goes_back() -> None:
    s = welcomed(5)
    s.synced(3)
    assert s.ack() == Ack(5, 5, 0)


def test_secondary_reset_link_forgets_unapplied() -> None:
    s = welcomed()
    s.on_writes(entries(1, 3))
    s.applied(1)
    s.reset_link()
    assert not s.welcomed
    with pytest.raises(ProtocolError):
        s.on_writes(entries(2, 1))
    s.on_welcome(Welcome(1, 2, 3))
    assert s.on_writes(entries(2, 2))[0].seq == 2


# --------------------------------------------------------------- handshake


def base_hello(**over) -> Hello:
    h = Hello(1, 1, Role.PRIMARY, Mode.SYNC, 0, 512, SIZE, bytes(16), 42, 0, 0, "a")
    return dataclasses.replace(h, **over)


def test_matching_hellos_pass() -> None:
    assert check_hello(base_hello(), base_hello(role=Role.SECONDARY, node="b")) is None
    # Different positions and flags are no reason to refuse.
    assert check_hello(base_hello(), base_hello(role=Role.SECONDARY, applied_seq=9)) is None


@pytest.mark.parametrize(
    ("remote", "words"),
    [
        (dict(proto_min=2, proto_max=3), "protocol version"),
        (dict(volume_id=b"\x01" * 16), "volume id"),
        (dict(size_bytes=2 * SIZE), "volume size"),
        (dict(block_size=4096), "block size"),
        (dict(role=Role.PRIMARY), "both copies are primary"),
        (dict(mode=Mode.ASYNC), "mode"),
        (dict(generation=43), "generation"),
    ],
)
def test_each_mismatch_is_named(remote, words) -> None:
    over = {"role": Role.SECONDARY, **remote}
    reason = check_hello(base_hello(), base_hello(**over))
    assert reason is not None and words in reason


def test_both_secondary_is_named() -> None:
    local = base_hello(role=Role.SECONDARY)
    reason = check_hello(local, base_hello(role=Role.SECONDARY))
    assert reason is not None and "both copies are secondary" in reason


def test_negotiate_version() -> None:
    assert negotiate_version(base_hello(proto_max=3), base_hello(proto_min=1, proto_max=2)) == 2
    assert negotiate_version(base_hello(proto_max=1), base_hello(proto_min=2, proto_max=2)) is None
    h = make_hello(
        role=Role.PRIMARY,
        mode=2,
        flags=1,
        block_size=512,
        size_bytes=SIZE,
        volume_id=bytes(16),
        generation=5,
        applied_seq=7,
        durable_seq=6,
        node="n",
    )
    assert (h.proto_min, h.proto_max, h.mode, h.applied_seq, h.durable_seq) == (1, 1, 2, 7, 6)


# ------------------------------------------------------- batching property


@given(
    max_batch=st.integers(100, 20_000),
    max_inflight=st.integers(100, 30_000),
    max_entries=st.integers(1, 6),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_batching_limits_property(max_batch, max_inflight, max_entries, data) -> None:
    """Against a model: batches are consecutive, within every limit unless a
    single entry goes out with nothing in flight, and as large as allowed."""
    pol = policy(
        mode=Mode.ASYNC,
        max_batch_bytes=max_batch,
        max_in_flight_bytes=max_inflight,
        max_batch_entries=max_entries,
    )
    p = connected(pol)
    wire = {}  # seq -> wire bytes, computed here
    sent = applied = 0
    for _ in range(data.draw(st.integers(1, 30))):
        op = data.draw(st.sampled_from(["write", "zeroes", "send", "send", "ack"]))
        if op == "write":
            n = data.draw(st.integers(0, 8)) * 512
            wire[p.submit(W, 0, n, b"w" * n, False, 0.0)] = HDR + n
        elif op == "zeroes":
            wire[p.submit(Z, 0, 4096, b"", False, 0.0)] = HDR
        elif op == "ack":
            applied = data.draw(st.integers(applied, sent))
            p.on_ack(Ack(applied, 0, 0))
        else:
            in_flight = sum(wire[s] for s in range(applied + 1, sent + 1))
            assert p.in_flight_bytes == in_flight
            budget = min(max_batch, max_inflight - in_flight)
            batch = p.next_batch()
            got = seqs(batch)
            if not got:
                assert sent == len(wire) or (in_flight > 0 and wire[sent + 1] > budget)
                continue
            assert got == list(range(sent + 1, sent + 1 + len(got)))
            assert len(got) <= max_entries
            size = sum(wire[s] for s in got)
            if len(got) > 1 or in_flight > 0:
                assert size <= budget
            nxt = got[-1] + 1
            if nxt in wire and len(got) < max_entries:
                assert size + wire[nxt] > budget  # nothing more would have fit
            sent = got[-1]
    assert p.lag_writes == len(wire) - applied
    assert p.lag_bytes == sum(wire[s] for s in range(applied + 1, len(wire) + 1))
