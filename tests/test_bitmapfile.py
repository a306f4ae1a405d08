"""The persisted dirty bitmap: crash-safe pages, and the write-ahead rule in the volume."""

from __future__ import annotations

import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from geoclus.errors import StoreError
from replicator.bitmap import DirtyBitmap
from replicator.bitmapfile import PAGE_BITS, SLOT_BYTES, BitmapFile
from replicator.frames import Mode, Role
from replicator.session import ReplicationPolicy
from replicator.volume import LinkTimers, ReplicatedVolume, VolumeSpec

REGION = 64 * 1024
SIZE = 3 * PAGE_BITS * REGION  # three pages of bits


def regions_of(path, size=SIZE, region=REGION) -> set[int]:
    bf = BitmapFile(str(path), size, region)
    try:
        return set(bf.open())
    finally:
        bf.close()


def store_marks(path, marks: list[list[int]]) -> list[bytes]:
    """Persist a sequence of states (each a list of dirty regions); return the
    file's bytes after each."""
    bf = BitmapFile(str(path), SIZE, REGION)
    bm = bf.open()
    images = []
    for regions in marks:
        for r in regions:
            bm.mark(r * REGION, 1)
        pages = bf.pages_of(regions) or {0}
        bf.persist(bm.raw_bits(), pages)
        with open(path, "rb") as f:
            images.append(f.read())
    bf.close()
    return images


def test_round_trip_across_pages(tmp_path) -> None:
    path = tmp_path / "b"
    marks = [0, 5, PAGE_BITS - 1, PAGE_BITS, 2 * PAGE_BITS + 7]
    store_marks(path, [marks])
    assert regions_of(path) == set(marks)


def test_new_file_is_clear_and_cost_is_small(tmp_path) -> None:
    assert regions_of(tmp_path / "new") == set()
    tib = BitmapFile(str(tmp_path / "x"), 1 << 40, REGION)
    assert tib.regions == 16 * 1024 * 1024 and tib.pages == 512  # 2 MiB of bits


@given(cut=st.integers(0, SLOT_BYTES - 1), flip=st.booleans())
@settings(max_examples=60, deadline=None)
def test_torn_update_leaves_previous_or_next_state(tmp_path_factory, cut: int, flip: bool) -> None:
    path = tmp_path_factory.mktemp("torn") / "b"
    before, after = store_marks(path, [[3], [4]])[:2]
    # The second update went to slot 1 of page 0; tear it at `cut` (or corrupt
    # that byte) by mixing the old and new file images.
    torn = bytearray(after)
    start = SLOT_BYTES  # page 0, slot 1
    if flip:
        torn[start + cut] ^= 0xFF
    else:
        torn[start + cut : start + SLOT_BYTES] = before[start + cut : start + SLOT_BYTES]
    path.write_bytes(bytes(torn))
    got = regions_of(path)
    assert got in ({3}, {3, 4})  # the previous or the next state, never garbage


def test_torn_first_write_is_a_clear_bitmap(tmp_path) -> None:
    path = tmp_path / "b"
    (first,) = store_marks(path, [[9]])
    path.write_bytes(first[: SLOT_BYTES // 2])  # the first write never completed
    assert regions_of(path) == set()


def test_both_copies_damaged_is_an_error(tmp_path) -> None:
    path = tmp_path / "b"
    images = store_marks(path, [[1], [2]])
    raw = bytearray(images[-1])
    raw[10] ^= 1
    raw[SLOT_BYTES + 10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="page 0 has no valid copy"):
        regions_of(path)


def test_other_geometry_is_refused(tmp_path) -> None:
    path = tmp_path / "b"
    store_marks(path, [[1]])
    with pytest.raises(StoreError, match="regions"):
        regions_of(path, region=2 * REGION)
    with pytest.raises(StoreError, match="volume"):
        regions_of(path, size=SIZE * 2)


def test_cleared_pages_are_tracked(tmp_path) -> None:
    path = tmp_path / "b"
    bf = BitmapFile(str(path), SIZE, REGION)
    bm = bf.open()
    bm.mark(PAGE_BITS * REGION, 1)
    bf.persist(bm.raw_bits(), {1})
    assert bf.pages_with_bits == {1}
    bm.clear()
    bf.persist(bm.raw_bits(), bf.pages_with_bits)
    assert bf.pages_with_bits == set()
    bf.close()
    assert regions_of(path) == set()


def test_load_bits_ignores_bits_past_the_last_region() -> None:
    bm = DirtyBitmap(10 * REGION, REGION)  # 10 regions in 2 bytes
    bm.load_bits(b"\xff\xff")
    assert bm.dirty_regions == 10 and list(bm) == list(range(10))


# ------------------------------------------------------------ in the volume


def spec(tmp_path, role: Role, policy: ReplicationPolicy) -> VolumeSpec:
    name = "a" if role == Role.PRIMARY else "b"
    return VolumeSpec(
        name="v",
        volume_id=b"\x09" * 16,
        size_bytes=4 << 20,
        block_size=512,
        store_path=str(tmp_path / f"{name}.img"),
        meta_path=str(tmp_path / f"{name}.meta"),
        role=role,
        policy=policy,
        node=name,
        timers=LinkTimers(
            peer_timeout_s=2.0, keepalive_interval_s=0.1, reconnect_min_s=0.01, reconnect_max_s=0.05
        ),
    )


async def test_dirty_bit_is_durable_before_the_data_lands(tmp_path, monkeypatch) -> None:
    policy = ReplicationPolicy(mode=Mode.SYNC, on_peer_loss="continue", region_bytes=REGION)
    s = spec(tmp_path, Role.PRIMARY, policy)
    vol = await ReplicatedVolume.open(s)  # never connected: writes are unreplicated
    seen: list[tuple[int, set[int]]] = []
    real = vol.store.store._pwrite_all

    def checking(offset, data, flags):
        # At the moment data reaches the store (inline or in a worker batch:
        # both write through _pwrite_all), read the bitmap file afresh.
        seen.append((offset // REGION, regions_of(s.bitmap_file_path, 4 << 20)))
        real(offset, data, flags)

    monkeypatch.setattr(vol.store.store, "_pwrite_all", checking)
    async with trio.open_nursery() as n:
        for i in (0, 5, 5, 17, 63):
            n.start_soon(vol.write, i * REGION + 512, b"\x01" * 512)
    assert len(seen) == 5
    for region, on_disk in seen:
        assert region in on_disk, f"region {region} written before its bit was durable"
    await vol.close()
    # The marks survive a restart.
    vol2 = await ReplicatedVolume.open(s)
    assert vol2.status()["dirty_bytes"] == 4 * REGION
    await vol2.close()


async def test_catch_up_clears_the_persisted_bits(tmp_path) -> None:
    from tests.test_volume import Link, wait_for

    policy = ReplicationPolicy(mode=Mode.ASYNC, region_bytes=REGION)
    a = await ReplicatedVolume.open(spec(tmp_path, Role.PRIMARY, policy))
    b = await ReplicatedVolume.open(spec(tmp_path, Role.SECONDARY, policy))
    async with trio.open_nursery() as n:
        link = Link(n, b)
        link.up = False
        n.start_soon(a.run_primary_link, link.connect, "b")
        for i in range(3):
            await a.write(i * REGION, os.urandom(4096))
        assert regions_of(a.spec.bitmap_file_path, 4 << 20) == {0, 1, 2}
        link.up = True
        await wait_for(lambda: a.status()["lag_writes"] == 0 and a.connected_peer is not None)
        await wait_for(lambda: regions_of(a.spec.bitmap_file_path, 4 << 20) == set())
        assert a.status()["dirty_bytes"] == 0
        n.cancel_scope.cancel()
