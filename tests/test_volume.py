"""The volume shell with both sites in one process, joined by trio memory
streams: completion rules, peer loss policies, timeouts and store failures
exercised through the real ReplicatedVolume (real files, real worker threads)."""

from __future__ import annotations

import os

import pytest
import trio
import trio.lowlevel
import trio.testing

from geoclus.errors import NotPrimaryError, ProtocolError, StoreError
from replicator.frames import Mode, Role
from replicator.meta import MetaFile
from replicator.session import ReplicationPolicy
from replicator.volume import FrameChannel, LinkTimers, ReplicatedVolume, VolumeSpec

SIZE = 1 << 20
VID = b"\x07" * 16


def spec(
    tmp_path, name: str, role: Role, policy: ReplicationPolicy, timers: LinkTimers | None = None
) -> VolumeSpec:
    return VolumeSpec(
        name="v",
        volume_id=VID,
        size_bytes=SIZE,
        block_size=512,
        store_path=str(tmp_path / f"{name}.img"),
        meta_path=str(tmp_path / f"{name}.img.meta"),
        role=role,
        policy=policy,
        node=name,
        timers=timers
        or LinkTimers(
            peer_timeout_s=2.0, keepalive_interval_s=0.1, reconnect_min_s=0.01, reconnect_max_s=0.05
        ),
    )


class Link:
    """Hands the primary a fresh in-memory connection to the secondary per dial,
    while ``up``; refuses dials while down."""

    def __init__(self, nursery: trio.Nursery, secondary: ReplicatedVolume) -> None:
        self.nursery = nursery
        self.secondary = secondary
        self.up = True
        self.streams: list[trio.abc.Stream] = []

    async def connect(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise OSError("link down")
        left, right = trio.testing.memory_stream_pair()
        self.streams.append(left)
        self.nursery.start_soon(self.secondary.handle_connection, right, "primary")
        return left

    async def cut(self) -> None:
        self.up = False
        for s in self.streams:
            await trio.aclose_forcefully(s)
        self.streams.clear()


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


async def open_pair(tmp_path, nursery, policy, timers=None):
    a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy, timers))
    b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy, timers))
    link = Link(nursery, b)
    nursery.start_soon(a.run_primary_link, link.connect, "b")
    await wait_for(lambda: a.connected_peer is not None and b.connected_peer is not None)
    return a, b, link


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def test_sync_write_is_on_the_secondary_when_it_returns(tmp_path) -> None:
    async with trio.open_nursery() as n:
        a, b, _ = await open_pair(tmp_path, n, ReplicationPolicy(mode=Mode.SYNC))
        for i in range(20):
            data = bytes([i + 1]) * 4096
            await a.write(i * 4096, data, fua=(i % 5 == 0))
            # Returned => the secondary's store holds it (read the file itself).
            assert read_file(b.spec.store_path, i * 4096, 4096) == data
        await a.flush()
        assert b.secondary is not None and b.secondary.durable_seq == 20
        assert MetaFile(b.spec.meta_path).open().seq == 20  # persisted before acked
        with pytest.raises(NotPrimaryError):
            await b.write(0, b"x" * 512)
        assert await b.read(0, 4096) == b"\x01" * 4096
        n.cancel_scope.cancel()


async def test_suspend_blocks_until_allow_degraded(tmp_path) -> None:
    async with trio.open_nursery() as n:
        a, b, link = await open_pair(tmp_path, n, ReplicationPolicy(mode=Mode.SYNC))
        await link.cut()
        await wait_for(lambda: a.connected_peer is None)
        done = trio.Event()

        async def writer() -> None:
            await a.write(0, b"\xaa" * 512)
            done.set()

        n.start_soon(writer)
        core = a.primary
        assert core is not None
        # Applied locally, then nothing left to happen but the peer's ack.
        await wait_for(lambda: core.pending_writes == 1 and core.stats.writes == 1)
        await wait_for(lambda: all(e.local_done for e in core._pending.values()))
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # suspended: the peer is gone
        assert a.status()["suspended"] is True
        assert a.allow_degraded() == 1
        await wait_for(done.is_set)
        st = a.status()
        assert st["dirty_bytes"] > 0 and st["lag_writes"] == 1
        # The peer comes back: the write is resent and the bitmap cleared.
        link.up = True
        await wait_for(lambda: a.status()["lag_writes"] == 0)
        assert a.status()["dirty_bytes"] == 0 and a.status()["degraded_allowed"] is False
        assert read_file(b.spec.store_path, 0, 512) == b"\xaa" * 512
        n.cancel_scope.cancel()


async def test_continue_policy_completes_locally_and_tracks_dirty(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.SYNC, on_peer_loss="continue", region_bytes=65536)
    async with trio.open_nursery() as n:
        a, _b, link = await open_pair(tmp_path, n, policy)
        await link.cut()
        await wait_for(lambda: a.connected_peer is None)
        with trio.fail_after(5):
            await a.write(3 * 65536, b"\x01" * 512)
            await a.write(3 * 65536 + 512, b"\x02" * 512)
            await a.write(9 * 65536, b"\x03" * 512)
        assert a.status()["dirty_bytes"] == 2 * 65536
        n.cancel_scope.cancel()


async def test_async_pull_ahead_marks_outdated_and_keeps_the_old_image(tmp_path) -> None:
    """Past max_lag_bytes, pull-ahead marks the peer outdated and tracks the
    regions; the cut-off secondary keeps its older, consistent image (the resync
    that brings it back is tested in test_volume_generations.py)."""
    policy = ReplicationPolicy(mode=Mode.ASYNC, on_congestion="pull-ahead", max_lag_bytes=64 * 1024)
    async with trio.open_nursery() as n:
        a, b, link = await open_pair(tmp_path, n, policy)
        await a.write(0, b"\x01" * 4096)
        await wait_for(lambda: a.status()["lag_writes"] == 0)
        await link.cut()
        await wait_for(lambda: a.connected_peer is None)
        for i in range(40):  # 40 x 4 KiB > 64 KiB: the log overflows
            await a.write(i * 4096, b"\x02" * 4096)
        st = a.status()
        assert st["peer_outdated"] is True and st["dirty_bytes"] > 0
        assert a.primary is not None and a.primary.log_bytes == 0  # nothing retained
        assert read_file(b.spec.store_path, 0, 4096) == b"\x01" * 4096
        assert b.secondary is not None and b.secondary.applied_seq == 1
        n.cancel_scope.cancel()


async def test_async_block_policy_throttles_writers(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.ASYNC, on_congestion="block", max_lag_bytes=16 * 1024)
    async with trio.open_nursery() as n:
        a, _b, link = await open_pair(tmp_path, n, policy)
        await link.cut()
        await wait_for(lambda: a.connected_peer is None)
        await a.write(0, b"\x01" * 8192)
        blocked = trio.Event()

        async def writer() -> None:
            await a.write(8192, b"\x02" * 16384)
            blocked.set()

        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert not blocked.is_set()  # would pass max_lag_bytes: the writer waits
        assert a.primary is not None and a.primary.last_seq == 1  # not even sequenced
        link.up = True
        await wait_for(blocked.is_set)  # the log drained once the peer returned
        n.cancel_scope.cancel()


async def test_secondary_store_failure_ends_the_session_cleanly(tmp_path, monkeypatch) -> None:
    async with trio.open_nursery() as n:
        a, b, _ = await open_pair(tmp_path, n, ReplicationPolicy(mode=Mode.ASYNC))

        def broken(writes):
            raise StoreError("injected EIO")

        monkeypatch.setattr(b.store.store, "write_many", broken)
        await a.write(0, b"\x01" * 512)
        await wait_for(lambda: (b.last_error or "").startswith("store failed"))
        assert "injected EIO" in b.last_error
        n.cancel_scope.cancel()


async def test_silent_peer_is_dropped_after_the_timeout(tmp_path, autojump_clock) -> None:
    """A peer that stops talking (link stalls, nothing closes) is declared lost
    after peer_timeout_s of silence, measured in (mock) time."""
    timers = LinkTimers(peer_timeout_s=3.0, keepalive_interval_s=0.5)
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy, timers))

    class Stalled(trio.abc.Stream):
        async def send_all(self, data) -> None:
            await trio.lowlevel.checkpoint()

        async def wait_send_all_might_not_block(self) -> None:
            await trio.lowlevel.checkpoint()

        async def receive_some(self, max_bytes=None) -> bytes:
            await trio.sleep_forever()
            raise AssertionError

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    ch = FrameChannel(Stalled())
    start = trio.current_time()
    with pytest.raises(ProtocolError, match="silent"):
        await a._primary_session(ch)
    lost_at = trio.current_time() - start
    # Declared lost after more than 3 s and within one check interval more.
    assert 3.0 < lost_at <= 3.0 + 0.5 + 1e-9


async def test_clean_close_records_clean_state(tmp_path) -> None:
    async with trio.open_nursery() as n:
        a, b, _ = await open_pair(tmp_path, n, ReplicationPolicy(mode=Mode.SYNC))
        await a.write(4096, os.urandom(4096))
        await a.close()
        await b.close()
        n.cancel_scope.cancel()
    for path, seq in ((a.spec.meta_path, 1), (b.spec.meta_path, 1)):
        m = MetaFile(path)
        st = m.open()
        m.close()
        assert st is not None and st.clean and st.seq == seq


async def _nursery_with(*tasks) -> None:
    async with trio.open_nursery() as n:
        for t in tasks:
            n.start_soon(t)


async def _sleeper() -> None:
    await trio.sleep_forever()


async def _dies_when_cancelled() -> None:
    try:
        await trio.sleep_forever()
    finally:
        raise ProtocolError("link died at the same moment")


async def test_link_error_during_cancellation_stays_inside_the_scope() -> None:
    from replicator.volume import _unwrap_link_errors

    with trio.CancelScope() as cs, _unwrap_link_errors():
        async with trio.open_nursery() as n:
            n.start_soon(_dies_when_cancelled)
            n.start_soon(_sleeper)
            await trio.lowlevel.checkpoint()
            cs.cancel()
    assert cs.cancelled_caught  # nothing escaped the cancelled scope


async def test_link_error_group_becomes_its_first_error() -> None:
    from replicator.volume import _unwrap_link_errors

    async def fail() -> None:
        await trio.lowlevel.checkpoint()
        raise ProtocolError("checksum mismatch")

    with pytest.raises(ProtocolError, match="checksum"), _unwrap_link_errors():
        await _nursery_with(fail, _sleeper)


async def test_a_bug_next_to_a_link_error_is_not_hidden() -> None:
    from replicator.volume import _unwrap_link_errors

    # Both raise in their first step, before any checkpoint, so neither can be
    # cancelled by the other's failure: the group always holds both.
    async def bug() -> None:
        raise KeyError("bug")

    async def link() -> None:
        raise ProtocolError("closed")

    with pytest.raises(BaseExceptionGroup) as info, _unwrap_link_errors():
        await _nursery_with(bug, link)
    assert info.value.subgroup(KeyError) is not None
    assert info.value.subgroup(ProtocolError) is not None


async def test_missing_store_with_metadata_is_refused(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.SYNC)
    s = spec(tmp_path, "a", Role.PRIMARY, policy)
    vol = await ReplicatedVolume.open(s)
    await vol.close()
    os.unlink(s.store_path)
    with pytest.raises(StoreError, match=r"store .* is missing"):
        await ReplicatedVolume.open(s)
    assert not os.path.exists(s.store_path)  # nothing was recreated


async def test_crashed_secondary_with_nothing_to_replay_is_consistent_at_once(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.SYNC)
    async with trio.open_nursery() as n:
        a, b, link = await open_pair(tmp_path, n, policy)
        await a.write(0, b"\x01" * 512)
        await a.flush()
        await link.cut()
        # The secondary "crashes": its metadata still says running (not clean).
        b.meta.close()
        b.store.close()
        n.cancel_scope.cancel()
    policy_b = spec(tmp_path, "b", Role.SECONDARY, policy)
    b2 = await ReplicatedVolume.open(policy_b)
    assert b2.consistency == "inconsistent"  # until it knows nothing is torn
    async with trio.open_nursery() as n:
        link2 = Link(n, b2)
        n.start_soon(a.run_primary_link, link2.connect, "b")
        await wait_for(lambda: b2.connected_peer is not None)
        await wait_for(lambda: b2.consistency == "consistent", timeout_s=2)
        assert b2.secondary is not None and b2.secondary.applied_seq == 1
        n.cancel_scope.cancel()


async def test_a_failed_local_write_poisons_the_store(tmp_path, monkeypatch) -> None:
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    vol = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))

    def eio(*args):
        raise StoreError("injected EIO")

    # Both paths (inline and worker batch) write through _pwrite_all.
    monkeypatch.setattr(vol.store.store, "_pwrite_all", eio)
    with pytest.raises(StoreError, match="injected"):
        await vol.write(0, b"\x01" * 512)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="no longer trusted"):
        await vol.write(512, b"\x02" * 512)


async def test_inline_write_waits_for_an_earlier_overlapping_batched_write(
    tmp_path, monkeypatch
) -> None:
    """A small write (applied inline on the event loop) that overlaps an earlier
    write still in a worker batch waits for it: the later data wins, and the
    later write is not acknowledged first."""
    import threading

    policy = ReplicationPolicy(mode=Mode.ASYNC)
    vol = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
    assert vol.store.inline_write_max_bytes >= 4096
    gate = threading.Event()
    real = vol.store.store.apply_ops

    def gated(ops):
        gate.wait(10)
        real(ops)

    monkeypatch.setattr(vol.store.store, "apply_ops", gated)
    big = vol.store.inline_write_max_bytes * 2  # goes to a worker batch
    done: list[str] = []

    async def write(tag: str, offset: int, data: bytes) -> None:
        await vol.write(offset, data)
        done.append(tag)

    async with trio.open_nursery() as n:
        n.start_soon(write, "big", 0, b"\x01" * big)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(write, "small", 4096, b"\x02" * 4096)
        n.start_soon(write, "apart", big, b"\x03" * 4096)  # no overlap: not held back
        await wait_for(lambda: done == ["apart"])
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["apart"]
        assert vol.store.store.read(4096, 4096) == bytes(4096)  # nothing overtook
        gate.set()
    assert done == ["apart", "big", "small"]
    assert vol.store.store.read(0, 4096) == b"\x01" * 4096
    assert vol.store.store.read(4096, 4096) == b"\x02" * 4096
    assert vol.store.store.read(8192, big - 8192) == b"\x01" * (big - 8192)
    assert vol.store.store.read(big, 4096) == b"\x03" * 4096
    await vol.close()
