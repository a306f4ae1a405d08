"""Checksum-skipping resync and online verify through the real volume shell
(both sites in one process, real files): digests are compared by the peer at
the same point of the write sequence, so only regions that really differ are
copied or reported, even with writes in flight."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.lowlevel

from geoclus.errors import GeoclusError, NotPrimaryError
from replicator.frames import Mode, Role
from replicator.session import ReplicationPolicy
from replicator.volume import ReplicatedVolume
from tests.test_volume import SIZE, Link, open_pair, read_file, spec, wait_for

REGION = 64 * 1024


def pattern(region: int, salt: int = 0) -> bytes:
    return bytes([(region * 7 + salt) % 251 + 1]) * REGION


def poke(path: str, offset: int, data: bytes) -> None:
    """Change a store file behind its volume's back (silent corruption)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


async def _writer(vol: ReplicatedVolume, stop: trio.Event, seed: int) -> int:
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        block = rng.randrange(SIZE // 4096)
        await vol.write(block * 4096, bytes([rng.randrange(1, 256)]) * 4096)
        n += 1
        await trio.lowlevel.checkpoint()
    return n


@pytest.mark.parametrize("mode", [Mode.SYNC, Mode.ASYNC])
async def test_verify_under_load_reports_no_false_mismatch(tmp_path, mode) -> None:
    policy = ReplicationPolicy(mode=mode)
    async with trio.open_nursery() as n:
        a, _b, _link = await open_pair(tmp_path, n, policy)
        stop = trio.Event()
        counts: list[int] = []

        async def run_writer() -> None:
            counts.append(await _writer(a, stop, 1))

        n.start_soon(run_writer)
        await trio.sleep(0.05)
        assert a.primary is not None
        st = a.start_verify()
        writes_before = a.primary.stats.writes
        assert st["state"] == "running" and st["total_bytes"] == SIZE
        await wait_for(lambda: a.verify_status()["state"] != "running", 30)
        writes_during = a.primary.stats.writes - writes_before
        stop.set()
        await wait_for(lambda: bool(counts))
        v = a.verify_status()
        assert v["state"] == "done" and v["done_bytes"] == SIZE
        assert v["differ_regions"] == 0, v
        assert writes_during > 0  # writes really were in flight during the verify
        assert any(e.kind == "verify" and "identical" in e.message for e in a.events.since(0)[0])
        n.cancel_scope.cancel()


async def test_verify_finds_exactly_the_corrupted_regions_and_resync_repairs_them(
    tmp_path,
) -> None:
    policy = ReplicationPolicy(mode=Mode.SYNC)
    async with trio.open_nursery() as n:
        a, b, _link = await open_pair(tmp_path, n, policy)
        for r in range(SIZE // REGION):
            await a.write(r * REGION, pattern(r))
        await a.flush()
        # Silent corruption of two regions of the secondary's store.
        poke(b.spec.store_path, 3 * REGION + 512, b"\xee" * 512)
        poke(b.spec.store_path, 11 * REGION, b"\xdd" * 4096)
        a.start_verify()
        await wait_for(lambda: a.verify_status()["state"] != "running", 30)
        v = a.verify_status()
        assert v["state"] == "done"
        assert v["differ_offsets"] == [3 * REGION, 11 * REGION]
        assert v["differ_bytes"] == 2 * REGION
        # Still different: a plain verify only reports.
        assert read_file(b.spec.store_path, 11 * REGION, 16) == b"\xdd" * 16
        a.start_verify()
        with pytest.raises(GeoclusError, match="already running"):
            a.start_verify()
        await wait_for(lambda: a.verify_status()["state"] != "running", 30)
        # Repair: a verify with resync copies what differs, in order.
        a.start_verify(resync=True)
        await wait_for(lambda: a.verify_status()["state"] != "running", 30)
        v = a.verify_status()
        assert v["differ_regions"] == 2 and v["resynced_regions"] == 2
        await a.flush()
        await wait_for(
            lambda: read_file(a.spec.store_path, 0, SIZE) == read_file(b.spec.store_path, 0, SIZE)
        )
        a.start_verify()
        await wait_for(lambda: a.verify_status()["state"] != "running", 30)
        assert a.verify_status()["differ_regions"] == 0
        n.cancel_scope.cancel()


async def test_verify_needs_the_primary_and_a_connected_peer(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    async with trio.open_nursery() as n:
        a, b, link = await open_pair(tmp_path, n, policy)
        with pytest.raises(NotPrimaryError, match="run verify on the primary"):
            b.start_verify()
        await link.cut()
        await wait_for(lambda: a.connected_peer is None)
        with pytest.raises(GeoclusError, match="not connected"):
            a.start_verify()
        assert a.verify_status() == {"state": "none"}
        n.cancel_scope.cancel()


async def test_verify_cut_off_by_the_link_is_reported_aborted(tmp_path) -> None:
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    async with trio.open_nursery() as n:
        a, _b, link = await open_pair(tmp_path, n, policy)
        a.start_verify()
        await link.cut()
        await wait_for(lambda: a.verify_status()["state"] != "running")
        v = a.verify_status()
        if v["state"] == "done":
            pytest.fail("the verify finished before the cut; make the volume larger")
        assert v["state"] == "aborted" and "lost" in v["aborted"]
        assert any("aborted" in e.message for e in a.events.since(0)[0])
        n.cancel_scope.cancel()


async def test_full_sync_copies_only_the_regions_that_differ(tmp_path) -> None:
    """Seeding from an old copy: a store of unknown history (no metadata) joins
    the primary; the full sync compares digests and sends only what differs."""
    policy = ReplicationPolicy(mode=Mode.ASYNC)
    s_a = spec(tmp_path, "a", Role.PRIMARY, policy)
    a = await ReplicatedVolume.open(s_a)
    for r in range(8):
        await a.write(r * REGION, pattern(r))
    await a.flush()
    # The secondary's store: an old copy holding regions 0-3, not 4-7.
    s_b = spec(tmp_path, "b", Role.SECONDARY, policy)
    seed = bytearray(SIZE)
    for r in range(8):
        seed[r * REGION : (r + 1) * REGION] = pattern(r, salt=0 if r < 4 else 99)
    with open(s_b.store_path, "wb") as f:
        f.write(seed)
    b = await ReplicatedVolume.open(s_b)
    assert b.gens.unknown
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: a.resyncs_completed == 1 and b.resyncs_completed == 1, 30)
        assert a.last_decision is not None and a.last_decision.full
        p = a.primary
        assert p is not None
        assert p.peer.resync_copied_bytes == 4 * REGION  # only regions 4-7
        assert p.peer.resync_identical_bytes == SIZE - 4 * REGION
        assert read_file(s_a.store_path, 0, SIZE) == read_file(b.spec.store_path, 0, SIZE)
        assert b.consistency == "consistent"
        n.cancel_scope.cancel()


async def test_crashed_primary_resyncs_only_its_hot_extents(tmp_path) -> None:
    """The activity log: after a crash of the primary only the extents it was
    writing are resynced (here 1 of 4 MiB extents), not the whole volume."""
    from dataclasses import replace

    policy = ReplicationPolicy(mode=Mode.SYNC)
    big = 16 * 1024 * 1024
    s_a = replace(spec(tmp_path, "a", Role.PRIMARY, policy), size_bytes=big)
    s_b = replace(spec(tmp_path, "b", Role.SECONDARY, policy), size_bytes=big)
    a = await ReplicatedVolume.open(s_a)
    b = await ReplicatedVolume.open(s_b)
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: a.connected_peer is not None)
        for i in range(32):  # extent 2 only (8-12 MiB)
            await a.write(8 * 1024 * 1024 + i * 4096, os.urandom(4096))
        assert a.al is not None and a.al.hot_extents() == frozenset({2})
        await link.cut()
        n.cancel_scope.cancel()
    # The primary "crashes": files closed without the clean-shutdown record.
    for f in (a.meta, a.store, a.bitmap_file, a.genfile, a.al_file, a.undo):
        if f is not None:
            f.close()
    a = await ReplicatedVolume.open(s_a)
    async with trio.open_nursery() as n:
        link = Link(n, b)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: b.resyncs_completed == 1, 30)
        d = a.last_decision
        assert d is not None and not d.full
        starts = [e.message for e in a.events.since(0)[0] if "resync of" in e.message]
        # Exactly the hot extent, not the 16 MiB volume.
        assert starts == [f"delta resync of b starts: {4 * 1024 * 1024} bytes to copy"]
        assert read_file(s_a.store_path, 0, big) == read_file(s_b.store_path, 0, big)
        n.cancel_scope.cancel()
