"""Lineages in the volume shell: persisted, carried in HELLO, decided at connect."""

from __future__ import annotations

import os
from dataclasses import replace

import trio

from replicator.frames import Mode, Role
from replicator.generations import FRESH, Action, Cause, Generation, GenState
from replicator.genfile import GenFile
from replicator.meta import MetaFile
from replicator.session import ReplicationPolicy
from replicator.volume import ReplicatedVolume
from tests.test_volume import Link, read_file, spec, wait_for


def stored(path: str) -> GenState | None:
    f = GenFile(path)
    try:
        return f.open()
    finally:
        f.close()


async def test_new_volumes_start_fresh_and_in_sync(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.SYNC)
    async with trio.open_nursery() as n:
        a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
        b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
        assert a.gens.current.id == b.gens.current.id == FRESH
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: a.connected_peer is not None)
        assert a.last_decision is not None and a.last_decision.action is Action.IN_SYNC
        n.cancel_scope.cancel()


async def test_pull_ahead_starts_a_generation_and_reconnect_decides_delta(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.ASYNC, on_congestion="pull-ahead", max_lag_bytes=16 * 1024)
    async with trio.open_nursery() as n:
        a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
        b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
        link = Link(n, b)
        link.up = False
        n.start_soon(a.run_primary_link, link.connect, "b")
        for i in range(10):  # overflows the 16 KiB log: the peer goes outdated
            await a.write(i * 4096, b"\x07" * 4096)
        on_disk = stored(a.spec.gens_file_path)
        assert on_disk is not None
        assert on_disk.current.id != FRESH and on_disk.current.cause is Cause.DIVERGE
        assert on_disk.bitmap_base == FRESH and on_disk.changes > 0  # written ahead
        link.up = True
        await wait_for(lambda: a.connected_peer is not None)
        d = a.last_decision
        assert d is not None and d.action is Action.RESYNC and d.source == "local"
        assert not d.full and d.bitmaps == frozenset({"local"})
        n.cancel_scope.cancel()


async def test_crashed_primary_without_activity_log_needs_a_full_resync(tmp_path) -> None:
    """Without its activity log (lost, or written by a version without one)
    nothing says which regions a crashed primary was writing: a full sync."""
    # Async: the write before the "crash" completes without a peer.
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    s_a = spec(tmp_path, "a", Role.PRIMARY, policy)
    a = await ReplicatedVolume.open(s_a)
    await a.write(0, b"\x01" * 512)
    # "Crash": close the files without the clean-shutdown record.
    a.meta.close()
    a.store.close()
    assert a.bitmap_file is not None and a.genfile is not None
    a.bitmap_file.close()
    a.genfile.close()
    m = MetaFile(s_a.meta_path)
    assert m.open().clean is False  # the metadata still says "running"
    m.close()
    assert a.al_file is not None
    a.al_file.close()
    os.remove(s_a.al_file_path)
    a2 = await ReplicatedVolume.open(s_a)
    assert a2.gens.current.id != FRESH and FRESH in [g.id for g in a2.gens.history]
    b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a2.run_primary_link, link.connect, "b")
        await wait_for(lambda: a2.last_decision is not None)
        d = a2.last_decision
        assert d.action is Action.RESYNC and d.full  # nothing says which regions differ
        n.cancel_scope.cancel()


async def test_split_brain_is_refused_with_its_reason(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
    b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
    # Both changed data on their own since FRESH (as after a promotion of b
    # while a kept writing): give each its own divergent generation.
    fresh_gen = Generation(FRESH, 0, Cause.CREATE)
    a.gens = GenState(
        Generation(111, 5, Cause.DIVERGE), (fresh_gen,), bitmap_base=FRESH, changes=3, primary=True
    )
    b.gens = GenState(Generation(222, 6, Cause.PROMOTE), (fresh_gen,), bitmap_base=FRESH, changes=2)
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: "split" in (a.last_error or ""))
        assert a.last_decision is not None and a.last_decision.action is Action.SPLIT_BRAIN
        assert "resolve --discard-local" in a.last_error
        assert a.connected_peer is None and b.secondary is not None
        assert b.secondary.applied_seq == 0  # nothing was applied
        n.cancel_scope.cancel()
    # Resolved by the operator on b: the next decision rolls b back.
    b.gens = replace(b.gens, discard=True)
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: a.connected_peer is not None)
        d = a.last_decision
        assert d is not None and d.action is Action.RESYNC and d.resolved_by == "operator"
        n.cancel_scope.cancel()


async def test_delta_resync_brings_an_outdated_peer_back_while_writes_continue(tmp_path) -> None:
    """Pull-ahead leaves the peer outdated; at reconnect the decision says delta
    resync; the resync copies the dirty regions in order with application
    writes into the same regions; at the end both images are identical, the
    peer adopted our lineage and is consistent, and the bitmap is empty."""
    import random

    region = 64 * 1024
    policy = ReplicationPolicy(
        mode=Mode.ASYNC,
        on_congestion="pull-ahead",
        max_lag_bytes=256 * 1024,
        region_bytes=region,
    )
    rng = random.Random(3)
    async with trio.open_nursery() as n:
        a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
        b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: a.connected_peer is not None)
        for _ in range(20):
            await a.write(rng.randrange(16) * 4096, rng.randbytes(4096))
        await wait_for(lambda: a.status()["lag_writes"] == 0)
        await link.cut()
        await wait_for(lambda: a.connected_peer is None)
        for _ in range(100):  # overflows the log: pull-ahead, the peer is outdated
            await a.write(rng.randrange(256) * 4096, rng.randbytes(4096))
        assert a.status()["peer_outdated"] and a.status()["dirty_bytes"] > 0
        link.up = True

        writer_done = trio.Event()

        async def keep_writing() -> None:
            for _ in range(80):  # into the very regions being resynced
                await a.write(rng.randrange(256) * 4096, rng.randbytes(4096))
            writer_done.set()

        n.start_soon(keep_writing)
        await wait_for(lambda: a.resyncs_completed >= 1 and b.resyncs_completed >= 1, timeout_s=20)
        await writer_done.wait()
        # The small log may have overflowed again under the writer: wait until
        # everything has settled (any later resync finished too).
        await wait_for(
            lambda: (
                a.connected_peer is not None
                and not a.status()["resync_active"]
                and a.status()["lag_writes"] == 0
                and b.consistency == "consistent"
            ),
            timeout_s=20,
        )
        await a.flush()
        d = a.last_decision
        assert d is not None and d.action is Action.RESYNC and not d.full
        assert b.consistency == "consistent" and not b.gens.inconsistent
        assert b.gens.current.id == a.gens.current.id != FRESH
        assert a.status()["dirty_bytes"] == 0 and a.gens.bitmap_base is None
        kinds = [e.kind for e in a.events.since(0)[0]]
        assert "outdated" in kinds and "decision" in kinds and "resync" in kinds
        n.cancel_scope.cancel()
    with open(a.spec.store_path, "rb") as fa, open(b.spec.store_path, "rb") as fb:
        assert fa.read() == fb.read()


async def test_resolve_is_refused_on_a_primary_and_persisted_on_a_secondary(tmp_path) -> None:
    import pytest

    from geoclus.errors import NotPrimaryError

    policy = ReplicationPolicy(mode=Mode.ASYNC)
    a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
    b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
    with pytest.raises(NotPrimaryError, match="demote it"):
        await a.resolve(discard_local=True)
    assert not a.gens.discard
    await b.resolve(discard_local=True)
    await b.close()
    on_disk = stored(b.spec.gens_file_path)
    assert on_disk is not None and on_disk.discard  # survives the restart
    b2 = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
    assert b2.gens.discard
    kinds = [e.kind for e in b.events.since(0)[0]]
    assert kinds[0] == "open" and "resolve" in kinds


def test_event_log_is_bounded_and_reports_what_was_missed() -> None:
    from replicator.events import EventLog

    log = EventLog(capacity=3)
    for i in range(5):
        log.add("k", f"event {i}")
    events, missed = log.since(0)
    assert [e.message for e in events] == ["event 2", "event 3", "event 4"]
    assert missed == 2 and log.last_seq == 5
    events, missed = log.since(4)
    assert [e.seq for e in events] == [5] and missed == 0


async def test_returning_old_primary_is_rolled_back_by_the_union_of_both_bitmaps(
    tmp_path,
) -> None:
    """Split brain resolved by discarding the old primary's changes: the resync
    copies the new primary's changed regions *and* the regions the old primary
    changed on its own (its bitmap, sent as PEER_BITMAP), and nothing else."""
    region = 64 * 1024
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
    b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: a.connected_peer is not None)
        for r in range(16):
            await a.write(r * region, bytes([r + 1]) * region)
        await a.flush()
        await wait_for(lambda: a.primary is not None and a.primary.peer_durable == 16)
        await link.cut()
        await wait_for(lambda: a.connected_peer is None and b.connected_peer is None)
        n.cancel_scope.cancel()
    # Apart: b is promoted and writes regions 1 and 2; a keeps writing 9 and 10.
    await b.promote(force=True)
    for r in (1, 2):
        await b.write(r * region, b"\xbb" * region)
    for r in (9, 10):
        await a.write(r * region + 4096, b"\xaa" * 4096)
    # a steps down and the operator discards its changes.
    await a.demote(drain_timeout_s=0.1)
    await a.resolve(discard_local=True)
    async with trio.open_nursery() as n:
        link = Link(n, a)
        n.start_soon(b.run_primary_link, link.connect, "a")
        await wait_for(lambda: a.resyncs_completed == 1, 30)
        d = b.last_decision
        assert d is not None and d.action is Action.RESYNC and not d.full
        assert d.bitmaps == frozenset({"local", "peer"})
        starts = [e.message for e in b.events.since(0)[0] if "in all" in e.message]
        assert starts == [
            f"the peer's own changes join the resync: {4 * region} bytes to copy in all"
        ]
        n.cancel_scope.cancel()
    img_a = read_file(a.spec.store_path, 0, 1 << 20)
    img_b = read_file(b.spec.store_path, 0, 1 << 20)
    assert img_a == img_b
    assert img_a[9 * region + 4096 : 9 * region + 8192] == bytes([10]) * 4096  # rolled back
    assert a.status()["consistency"] == "consistent"


async def test_writes_after_a_clean_cut_start_a_generation_so_a_forced_promotion_rolls_them_back(
    tmp_path,
) -> None:
    """The link drops with nothing in flight; the primary then writes on its
    own while the secondary is promoted by force. Those writes must start a
    new generation (written ahead), or the returning old primary would look
    like an older state of the new one and keep its writes (found by the
    simulation with forced promotions)."""
    region = 64 * 1024
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    a = await ReplicatedVolume.open(spec(tmp_path, "a", Role.PRIMARY, policy))
    b = await ReplicatedVolume.open(spec(tmp_path, "b", Role.SECONDARY, policy))
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: a.connected_peer is not None)
        await a.write(0, b"\x01" * region)
        await a.flush()
        await wait_for(lambda: a.primary is not None and a.primary.peer_durable == 1)
        await link.cut()
        await wait_for(lambda: a.connected_peer is None and b.connected_peer is None)
        n.cancel_scope.cancel()
    shared = a.gens.current.id
    await a.write(5 * region, b"\xaa" * 4096)  # nothing was in flight at the cut
    assert a.gens.current.id != shared and a.gens.bitmap_base == shared
    on_disk = stored(a.spec.gens_file_path)
    assert on_disk is not None and on_disk.current.id == a.gens.current.id  # written ahead
    await b.promote(force=True)
    await b.write(2 * region, b"\xbb" * region)
    await a.demote(drain_timeout_s=0.1)
    async with trio.open_nursery() as n:
        link = Link(n, a)
        n.start_soon(b.run_primary_link, link.connect, "a")
        await wait_for(lambda: a.resyncs_completed == 1, 30)
        d = b.last_decision
        assert d is not None and d.resolved_by == "forced-promotion"
        n.cancel_scope.cancel()
    assert read_file(a.spec.store_path, 0, 1 << 20) == read_file(b.spec.store_path, 0, 1 << 20)
