"""The resync undo log in the volume shell: a resync target cut off in the
middle (link loss, crash, promotion) keeps its consistent pre-resync image
restorable, so it stays promotable throughout (real files, both sites in one
process)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio
import trio.testing

from geoclus.errors import GeoclusError
from replicator.frames import Mode, Role
from replicator.meta import MetaFile
from replicator.session import ReplicationPolicy
from replicator.volume import ReplicatedVolume, VolumeSpec
from tests.test_volume import SIZE, read_file, spec, wait_for

REGION = 64 * 1024


class GatedStream(trio.abc.Stream):
    """A stream that stops delivering once ``limit`` bytes have been received
    (until the gate opens); cancellable, so a cut still ends the session."""

    def __init__(self, inner: trio.abc.Stream, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.received = 0
        self.gate = trio.Event()
        self.reached = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.received >= self.limit:
            self.reached.set()
            await self.gate.wait()
        want = max_bytes or 65536
        if not self.gate.is_set():
            want = max(1, min(want, self.limit - self.received))
        data = await self.inner.receive_some(want)
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class GatedLink:
    def __init__(self, nursery: trio.Nursery, secondary: ReplicatedVolume, limit: int) -> None:
        self.nursery = nursery
        self.secondary = secondary
        self.limit = limit
        self.up = True
        self.streams: list[trio.abc.Stream] = []
        self.gates: list[GatedStream] = []

    async def connect(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise OSError("link down")
        left, right = trio.testing.memory_stream_pair()
        gated = GatedStream(right, self.limit)
        self.gates.append(gated)
        self.streams += [left, right]
        self.nursery.start_soon(self.secondary.handle_connection, gated, "primary")
        return left

    async def cut(self) -> None:
        self.up = False
        for s in self.streams:
            await trio.aclose_forcefully(s)
        self.streams.clear()


def pattern(region: int, salt: int) -> bytes:
    return bytes([(region * 13 + salt) % 251 + 1]) * REGION


async def crashed_primary_and_old_secondary(
    tmp_path, policy: ReplicationPolicy, **b_spec
) -> tuple[ReplicatedVolume, VolumeSpec, bytes]:
    """A primary that crashed after writing new data everywhere (so it needs a
    full resync) and a secondary holding an older, different image. Returns
    the reopened primary, the secondary's spec and its pre-resync image."""
    s_a = spec(tmp_path, "a", Role.PRIMARY, policy)
    a = await ReplicatedVolume.open(s_a)
    for r in range(SIZE // REGION):
        await a.write(r * REGION, pattern(r, 1))
    await a.flush()
    a.meta.close()
    a.store.close()
    assert a.bitmap_file is not None and a.genfile is not None
    a.bitmap_file.close()
    a.genfile.close()
    s_b = replace(spec(tmp_path, "b", Role.SECONDARY, policy), **b_spec)
    b = await ReplicatedVolume.open(s_b)
    for r in range(SIZE // REGION):
        await b.store.write(r * REGION, pattern(r, 2))
    await b.close()
    return await ReplicatedVolume.open(s_a), s_b, read_file(s_b.store_path, 0, SIZE)


async def _cut_mid_resync(tmp_path, **b_spec):
    policy = ReplicationPolicy(mode=Mode.ASYNC, max_batch_bytes=REGION + 64)
    a, s_b, before = await crashed_primary_and_old_secondary(tmp_path, policy, **b_spec)
    b = await ReplicatedVolume.open(s_b)
    return a, b, before


async def test_cut_off_resync_target_is_outdated_and_promotion_restores_its_image(
    tmp_path,
) -> None:
    a, b, before = await _cut_mid_resync(tmp_path)
    async with trio.open_nursery() as n:
        link = GatedLink(n, b, limit=5 * REGION)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: bool(link.gates))
        with trio.fail_after(10):
            await link.gates[0].reached.wait()
        # Some regions already hold resync data.
        await wait_for(lambda: read_file(b.spec.store_path, 0, SIZE) != before)
        assert b.undo is not None and b.undo.used_bytes > 0
        assert b.consistency == "outdated"  # not broken: restorable
        assert b.status()["consistency"] == "outdated"
        await link.cut()
        await wait_for(lambda: b.connected_peer is None)
        assert b.consistency == "outdated"
        report = await b.promote(force=True)
        assert report["rolled_back_regions"] > 0
        assert b.consistency == "consistent"
        assert read_file(b.spec.store_path, 0, SIZE) == before
        assert any(e.kind == "rollback" for e in b.events.since(0)[0])
        n.cancel_scope.cancel()
    await b.close(drain=False)


async def _resync_then_cut(a: ReplicatedVolume, b: ReplicatedVolume) -> None:
    """Let the resync from ``a`` land a few regions on ``b`` (its undo log
    holding their old content), then cut the link and wait until both see it."""
    async with trio.open_nursery() as n:
        link = GatedLink(n, b, limit=5 * REGION)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: bool(link.gates))
        with trio.fail_after(10):
            await link.gates[0].reached.wait()
        await wait_for(lambda: b.undo is not None and b.undo.used_bytes > 0)
        await link.cut()
        await wait_for(lambda: b.connected_peer is None and a.connected_peer is None)
        n.cancel_scope.cancel()


async def test_crash_mid_resync_keeps_the_undo_log_and_the_resync_completes(tmp_path) -> None:
    a, b, before = await _cut_mid_resync(tmp_path)
    await _resync_then_cut(a, b)
    # The secondary "crashes": its files are closed without a clean record.
    for f in (b.meta, b.store, b.bitmap_file, b.genfile, b.undo):
        assert f is not None
        f.close()
    b2 = await ReplicatedVolume.open(b.spec)
    assert b2.consistency == "outdated"  # the undo log survived the crash
    async with trio.open_nursery() as n:
        link2 = GatedLink(n, b2, limit=1 << 40)
        n.start_soon(a.run_primary_link, link2.connect, "b")
        await wait_for(lambda: b2.resyncs_completed == 1, 30)
        await wait_for(lambda: b2.consistency == "consistent")
        assert b2.undo is not None and not b2.undo.active
        assert read_file(b2.spec.store_path, 0, SIZE) == read_file(a.spec.store_path, 0, SIZE)
        n.cancel_scope.cancel()
    # Nothing is left to roll back: a promotion now keeps the resynced data.
    report = await b2.promote(force=True)
    assert report["rolled_back_regions"] == 0
    assert read_file(b2.spec.store_path, 0, SIZE) == read_file(a.spec.store_path, 0, SIZE)
    assert before != read_file(b2.spec.store_path, 0, SIZE)


async def test_cut_off_target_reopened_as_primary_is_rolled_back_at_open(tmp_path) -> None:
    a, b, before = await _cut_mid_resync(tmp_path)
    await _resync_then_cut(a, b)
    await b.close(drain=False)
    b2 = await ReplicatedVolume.open(replace(b.spec, role=Role.PRIMARY))
    assert read_file(b.spec.store_path, 0, SIZE) == before
    assert not b2.gens.inconsistent
    await b2.close(drain=False)


async def test_a_full_undo_log_falls_back_to_inconsistent(tmp_path) -> None:
    a, b, _before = await _cut_mid_resync(tmp_path, undo_max_bytes=8192 + 2 * (64 + REGION))
    async with trio.open_nursery() as n:
        link = GatedLink(n, b, limit=6 * REGION)
        n.start_soon(a.run_primary_link, link.connect, "b")
        await wait_for(lambda: bool(link.gates))
        with trio.fail_after(10):
            await link.gates[0].reached.wait()
        await wait_for(lambda: b.consistency == "inconsistent")
        assert any("undo log full" in e.message for e in b.events.since(0)[0])
        await link.cut()
        await wait_for(lambda: b.connected_peer is None)
        with pytest.raises(GeoclusError, match="inconsistent"):
            await b.promote()
        n.cancel_scope.cancel()
    await b.close(drain=False)
    m = MetaFile(b.spec.meta_path)
    assert m.open() is not None
    m.close()
