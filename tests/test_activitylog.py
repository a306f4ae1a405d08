"""The primary's activity log (replicator/activitylog.py): the in-memory hot set,
its safety property under random writes, and the crash-safe file."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
import xxhash
from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from geoclus.errors import StoreError
from replicator.activitylog import (
    DEFAULT_EXTENT_BYTES,
    DEFAULT_MAX_EXTENTS,
    ActivityLog,
    ActivityLogFile,
    AlBlocked,
    AlChange,
    AlStats,
    slot_bytes,
)

E = 4096  # the smallest extent keeps the numbers readable
MIB = 1024 * 1024


def log(extents: int = 64, max_extents: int = 16, **kw) -> ActivityLog:
    return ActivityLog(extents * E, E, max_extents, max_write_bytes=4 * E, **kw)


def fill(al: ActivityLog, extents: list[int], first_seq: int = 1) -> int:
    """Touch one block in each of ``extents`` in order; return the next seq."""
    seq = first_seq
    for e in extents:
        assert isinstance(al.touch(e * E, 512, seq), AlChange | None)
        seq += 1
    return seq


# ------------------------------------------------------------------ in memory


def test_cold_touch_is_a_change_and_a_hot_touch_is_free() -> None:
    al = log()
    change = al.touch(3 * E + 100, 200, 1)
    assert change == AlChange(hot=frozenset({3}), added=(3,), evicted=(), generation=1)
    assert al.touch(3 * E, E, 2) is None  # the same extent, hot already
    assert al.generation == 1
    assert al.stats == AlStats(touches=2, persists=1, evictions=0, blocked=0)


def test_a_write_spanning_extents_makes_all_of_them_hot() -> None:
    al = ActivityLog(64 * MIB)  # 4 MiB extents, 1024 of them, 16 MiB writes
    assert al.extent_bytes == DEFAULT_EXTENT_BYTES and al.max_extents == DEFAULT_MAX_EXTENTS
    change = al.touch(4 * MIB - 512, 16 * MIB, 1)  # unaligned: 5 extents
    assert isinstance(change, AlChange)
    assert change.added == (0, 1, 2, 3, 4) and change.hot == frozenset(range(5))
    # Partly hot: only the cold part is added, one change.
    change = al.touch(16 * MIB, 8 * MIB, 2)
    assert isinstance(change, AlChange) and change.added == (5,)
    assert al.touch(8 * MIB, 16 * MIB, 3) is None


def test_least_recently_used_stable_extent_leaves() -> None:
    al = log()
    seq = fill(al, list(range(16)))  # extents 0..15 by seqs 1..16, full
    assert al.touch(0, 512, seq) is None  # extent 0 is now the most recent
    al.set_stable(seq)
    change = al.touch(16 * E, 512, seq + 1)
    assert isinstance(change, AlChange) and change.evicted == (1,) and change.added == (16,)
    assert al.hot_extents() == (frozenset(range(17)) - {1})


def test_eviction_skips_the_writes_own_extents() -> None:
    al = log()
    seq = fill(al, [0, *range(2, 17)])  # 16 hot; extent 0 least recently used
    al.set_stable(seq - 1)
    change = al.touch(E - 512, 1024, seq)  # extents 0 (hot) and 1 (cold)
    assert isinstance(change, AlChange)
    assert change.added == (1,) and change.evicted == (2,)  # not 0: this write needs it


def test_blocked_until_the_caller_makes_writes_stable() -> None:
    al = log()
    seq = fill(al, list(range(16)))
    before = al.hot_extents()
    # Two cold extents need two places: the writes 1 and 2 must be stable.
    blocked = al.touch(16 * E, 2 * E, seq)
    assert blocked == AlBlocked(need_stable_seq=2, seq=seq)
    assert al.hot_extents() == before and al.generation == 16  # nothing changed
    al.set_stable(1)
    assert al.touch(16 * E, 2 * E, seq) == blocked  # still one short
    al.set_stable(2)
    change = al.touch(16 * E, 2 * E, seq)
    assert isinstance(change, AlChange) and change.evicted == (0, 1)
    assert al.stats == AlStats(touches=19, persists=17, evictions=2, blocked=2)


def test_extents_stay_hot_until_their_place_is_needed() -> None:
    al = log()
    seq = fill(al, list(range(10)))
    al.set_stable(seq - 1)
    change = al.touch(10 * E, 512, seq)  # room left: nothing leaves though all are stable
    assert isinstance(change, AlChange) and change.evicted == ()
    assert len(al.hot_extents()) == 11


def test_loaded_hot_set_counts_as_stable() -> None:
    al = log(hot={3, 5}, generation=7)
    assert al.touch(3 * E, 1, 1) is None
    assert al.regions_of_hot(E) == [3, 5]
    fill(al, list(range(20, 34)), first_seq=2)  # 16 hot now, 5 the oldest
    change = al.touch(40 * E, 1, 16)
    assert isinstance(change, AlChange) and change.evicted == (5,)  # seq 0: stable
    assert change.generation == 7 + 15


def test_regions_of_hot() -> None:
    al = ActivityLog(10 * MIB, 4 * MIB, 16)  # the last extent is 2 MiB
    for seq, e in enumerate((0, 2), start=1):
        al.touch(e * 4 * MIB, 1, seq)
    region = 64 * 1024
    assert al.regions_of_hot(region) == [*range(64), *range(128, 160)]
    assert al.regions_of_hot(16 * MIB) == [0]
    with pytest.raises(ValueError, match="power of two"):
        al.regions_of_hot(3000)


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        ActivityLog(MIB, 6144, 16)
    with pytest.raises(ValueError, match="power of two"):
        ActivityLog(MIB, 2048, 16)
    with pytest.raises(ValueError, match="max_extents"):
        ActivityLog(MIB, E, 15)
    with pytest.raises(ValueError, match="span 4097 extents"):
        ActivityLog(1 << 30, E, 1024)  # 16 MiB writes at 4 KiB extents
    with pytest.raises(ValueError, match="hot extents"):
        log(hot={64})
    al = log()
    with pytest.raises(ValueError, match="inside"):
        al.touch(63 * E, 2 * E, 1)
    with pytest.raises(ValueError, match="split it"):
        al.touch(0, 5 * E, 1)
    al.touch(0, 1, 5)
    with pytest.raises(ValueError, match="seq order"):
        al.touch(E, 1, 5)
    al.set_stable(8)  # seqs 6..8 wrote nothing locally
    with pytest.raises(ValueError, match="already stable"):
        al.touch(E, 1, 8)
    with pytest.raises(ValueError, match="below the current"):
        al.set_stable(7)
    assert isinstance(al.touch(E, 1, 9), AlChange)


# ------------------------------------------- the safety property, stateful


def trace(text: str) -> None:
    """``note`` under hypothesis; nothing when a test drives the machine by hand."""
    with contextlib.suppress(InvalidArgument):
        note(text)


class ActivityLogMachine(RuleBasedStateMachine):
    """Random writes, stability, blocking and crashes against a plain model.

    The model is what the caller would have on disk: ``persisted`` (the last
    hot set it persisted, always before applying the write) and ``written``
    (extent -> seq of the last applied write into it). The property: every
    extent holding a write that is not stable is in the persisted hot set, so a
    crash of the primary loses no difference.
    """

    fault = False

    @initialize(
        max_extents=st.integers(16, 18),
        spare=st.integers(1, 8),
        extent_shift=st.sampled_from([12, 13]),
        tail=st.integers(0, 4095),
    )
    def setup(self, max_extents: int, spare: int, extent_shift: int, tail: int) -> None:
        # A volume a few extents larger than the log: evictions come early.
        self.extent = 1 << extent_shift
        self.size = (max_extents + spare) * self.extent - tail
        self.max_extents = max_extents
        self.max_write = 3 * self.extent
        self.al = self.new_log(hot=(), stable=0, generation=0)
        self.seq = 0  # the last seq assigned
        self.applied = 0  # the last seq applied (writes apply in seq order)
        self.stable = 0
        self.written: dict[int, int] = {}
        self.persisted: frozenset[int] = frozenset()
        self.blocked: tuple[int, int, int, int] | None = None  # offset, length, seq, need
        trace(f"volume {self.size} bytes, extents of {self.extent}, max {max_extents}")

    def new_log(self, hot: frozenset[int] | tuple[()], stable: int, generation: int):
        return ActivityLog(
            self.size,
            self.extent,
            self.max_extents,
            hot,
            stable_seq=stable,
            generation=generation,
            max_write_bytes=self.max_write,
            fault_evict_unstable=self.fault,
        )

    def touch(self, offset: int, length: int, seq: int) -> AlChange | AlBlocked | None:
        generation = self.al.generation
        result = self.al.touch(offset, length, seq)
        if isinstance(result, AlBlocked):
            assert self.stable < result.need_stable_seq < seq
            assert self.al.generation == generation
            self.blocked = (offset, length, seq, result.need_stable_seq)
            return result
        if result is not None:
            assert result.generation == generation + 1
            self.persisted = result.hot  # persisted before the write applies
        for e in range(offset // self.extent, (offset + length - 1) // self.extent + 1):
            self.written[e] = seq
        self.applied = seq
        return result

    @precondition(lambda self: self.blocked is None)
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        extent = data.draw(st.integers(0, (self.size - 1) // self.extent), label="extent")
        within = data.draw(st.integers(0, self.extent - 1), label="within")
        offset = min(extent * self.extent + within, self.size - 1)
        length = data.draw(st.integers(1, min(self.max_write, self.size - offset)), label="length")
        self.do_write(offset, length)

    def do_write(self, offset: int, length: int) -> None:
        self.seq += 1
        trace(f"write [{offset}, {offset + length}) seq {self.seq}")
        self.touch(offset, length, self.seq)

    @precondition(lambda self: self.blocked is None)
    @rule()
    def op_writing_nothing_locally(self) -> None:
        # A seq the log never sees (a resync read): done, so it may become stable.
        self.seq += 1
        self.applied = self.seq
        trace(f"seq {self.seq} writes nothing locally")

    @precondition(lambda self: self.blocked is not None)
    @rule()
    def retry(self) -> None:
        assert self.blocked is not None
        offset, length, seq, need = self.blocked
        self.blocked = None
        result = self.touch(offset, length, seq)
        # Nothing changed but the watermark: blocked exactly while it is short.
        if self.stable >= need:
            assert not isinstance(result, AlBlocked)
        else:
            assert result == AlBlocked(need, seq)

    @rule(pick=st.integers(0, 1 << 20))
    def make_stable(self, pick: int) -> None:
        # The caller flushes and collects peer acks up to some applied write.
        upto = self.stable + pick % (self.applied - self.stable + 1)
        trace(f"stable up to {upto}")
        self.al.set_stable(upto)
        self.stable = upto

    @precondition(lambda self: self.blocked is not None)
    @rule()
    def make_stable_as_asked(self) -> None:
        assert self.blocked is not None
        need = self.blocked[3]
        assert need <= self.applied  # only writes past the log: no deadlock
        self.al.set_stable(need)
        self.stable = need

    @rule()
    def crash_and_restart(self) -> None:
        self.unstable_extents_are_persisted()
        # On restart the caller marks the stored extents in the dirty bitmap
        # (covered: stable) and continues from the file's counter.
        trace("crash; restart from the persisted hot set")
        self.al = self.new_log(self.persisted, stable=self.seq, generation=self.al.generation)
        self.stable = self.applied = self.seq
        self.written = {}
        self.blocked = None

    @invariant()
    def unstable_extents_are_persisted(self) -> None:
        unstable = {e for e, s in self.written.items() if s > self.stable}
        assert unstable <= self.persisted, f"unstable extents {unstable - self.persisted} lost"
        assert unstable <= self.al.hot_extents()

    @invariant()
    def bounded(self) -> None:
        assert len(self.al.hot_extents()) <= self.max_extents
        assert len(self.persisted) <= self.max_extents


class FaultyActivityLogMachine(ActivityLogMachine):
    fault = True


MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_hot_set_covers_every_unstable_write() -> None:
    run_state_machine_as_test(ActivityLogMachine, settings=MACHINE_SETTINGS)


def test_the_property_catches_evicting_unstable_extents() -> None:
    # The same machine with the fault on: hypothesis must find a counterexample.
    with pytest.raises(AssertionError, match="lost"):
        run_state_machine_as_test(
            FaultyActivityLogMachine,
            # It stops at the first counterexample (typically within a few dozen
            # examples); no shrinking, a fixed seed, so it cannot flake.
            settings=settings(
                MACHINE_SETTINGS,
                max_examples=1000,
                database=None,
                derandomize=True,
                phases=[Phase.generate],
            ),
        )


@pytest.mark.parametrize("fault", [False, True])
def test_a_full_log_with_nothing_stable(fault: bool) -> None:
    # The deterministic counterexample: 17 extents written, none stable.
    machine = FaultyActivityLogMachine() if fault else ActivityLogMachine()
    machine.setup(max_extents=16, spare=1, extent_shift=12, tail=0)
    for e in range(17):
        machine.do_write(e * E, 1)
    if fault:
        with pytest.raises(AssertionError, match="lost"):
            machine.unstable_extents_are_persisted()
    else:
        machine.unstable_extents_are_persisted()
        assert machine.blocked == (16 * E, 1, 17, 1)


# ------------------------------------------------------------------ the file

SMALL = 16  # max_extents for the file tests: 168-byte slots, every byte is tried
SLOT = slot_bytes(SMALL)
SIZE = 64 * MIB
EXT = 4 * MIB


def alfile(path, size=SIZE, extent=EXT, max_extents=SMALL) -> ActivityLogFile:
    return ActivityLogFile(str(path), size, extent, max_extents)


def stored(path, **kw) -> frozenset[int]:
    f = alfile(path, **kw)
    try:
        return f.open()
    finally:
        f.close()


def store_sets(path, sets: list[set[int]]) -> list[bytes]:
    """Persist the hot sets in order; return the file's bytes after each."""
    f = alfile(path)
    f.open()
    images = []
    for hot in sets:
        f.persist(frozenset(hot), f.counter + 1)
        images.append(path.read_bytes())
    f.close()
    return images


def test_slot_size_as_documented() -> None:
    assert SLOT == 168
    assert slot_bytes(DEFAULT_MAX_EXTENTS) == 8232  # the file is 16,464 bytes


def test_new_file_is_empty_and_round_trips(tmp_path) -> None:
    path = tmp_path / "al"
    assert stored(path) == frozenset() and path.exists()
    images = store_sets(path, [{1, 5}, {1, 5, 9}, {15}])
    assert [len(i) for i in images] == [SLOT, 2 * SLOT, 2 * SLOT]
    f = alfile(path)
    assert f.open() == {15} and f.counter == 3
    f.close()


def test_layout_read_by_hand(tmp_path) -> None:
    path = tmp_path / "al"
    raw = store_sets(path, [{2, 7}])[0]
    # magic u32, version u16, extent shift u16, size u64, max_extents u32,
    # count u32, counter u64, 16 extents u64, xxh3-64 of all that.
    head = struct.unpack_from(">4sHHQIIQ", raw, 0)
    assert head == (b"GCAL", 1, 22, SIZE, SMALL, 2, 1)
    table = struct.unpack_from(f">{SMALL}Q", raw, 32)
    assert table == (2, 7) + (0,) * (SMALL - 2)
    (checksum,) = struct.unpack_from(">Q", raw, SLOT - 8)
    assert checksum == xxhash.xxh3_64_intdigest(raw[: SLOT - 8])


def test_persist_writes_then_syncs(tmp_path, monkeypatch) -> None:
    calls: list[str] = []
    real_pwrite, real_sync = os.pwrite, os.fdatasync
    monkeypatch.setattr(os, "pwrite", lambda *a: calls.append("pwrite") or real_pwrite(*a))
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync") or real_sync(fd))
    store_sets(tmp_path / "al", [{1}, {2}])
    assert calls == ["pwrite", "fdatasync"] * 2


@pytest.mark.parametrize("update", [1, 2])  # the newer slot is 1, then 0
@pytest.mark.parametrize("how", ["torn", "flip"])
def test_torn_update_at_every_byte_leaves_old_or_new(tmp_path, update: int, how: str) -> None:
    path = tmp_path / "al"
    sets = [{1, 2}, {3}, {4, 5, 6}]
    images = store_sets(path, sets)
    before, after = images[update - 1], images[update]
    start = (update % 2) * SLOT  # update 1 went to slot 1, update 2 to slot 0
    for cut in range(SLOT):
        image = bytearray(after)
        if how == "flip":
            image[start + cut] ^= 0xFF
        else:  # the bytes from `cut` on never landed (missing if the file grew)
            image[start + cut : start + SLOT] = before[start + cut : start + SLOT]
        path.write_bytes(bytes(image))
        got = stored(path)
        assert got in (sets[update - 1], sets[update]), f"{how} at byte {cut}: {got}"


def test_torn_first_write_is_an_empty_log(tmp_path) -> None:
    path = tmp_path / "al"
    (first,) = store_sets(path, [{9}])
    for cut in range(SLOT):
        path.write_bytes(first[:cut])
        assert stored(path) == frozenset()


def test_garbage_is_refused_with_advice(tmp_path) -> None:
    path = tmp_path / "al"
    path.write_bytes(b"not an activity log")
    with pytest.raises(StoreError, match=r"al holds no valid copy.*Remove it.*full resync"):
        stored(path)
    path.write_bytes(os.urandom(2 * SLOT))
    with pytest.raises(StoreError, match="no valid copy"):
        stored(path)


def test_both_slots_damaged_is_refused(tmp_path) -> None:
    path = tmp_path / "al"
    raw = bytearray(store_sets(path, [{1}, {2}])[-1])
    raw[40] ^= 1
    raw[SLOT + 40] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="no valid copy"):
        stored(path)


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"extent": 2 * EXT}, "extent size 4194304 bytes \\(now 8388608\\)"),
        ({"size": 2 * SIZE}, "volume size 67108864 bytes"),
        ({"max_extents": 32}, "max_extents 16 \\(now 32\\)"),
        ({"max_extents": 1024}, "max_extents 16"),
    ],
)
def test_other_geometry_with_hot_extents_is_refused(tmp_path, kw, named: str) -> None:
    path = tmp_path / "al"
    store_sets(path, [{1}, {2, 3}])
    with pytest.raises(StoreError, match=f"{named}.*2 hot extents.*stop the primary cleanly"):
        stored(path, **kw)
    assert stored(path) == {2, 3}  # untouched


def test_other_geometry_with_an_empty_log_starts_over(tmp_path) -> None:
    path = tmp_path / "al"
    store_sets(path, [{1}, set()])
    f = alfile(path, extent=2 * EXT, max_extents=32)
    assert f.open() == frozenset()
    assert path.stat().st_size == 0
    f.persist(frozenset({7}), f.counter + 1)
    f.close()
    assert stored(path, extent=2 * EXT, max_extents=32) == {7}


def test_clear_and_misuse(tmp_path) -> None:
    path = tmp_path / "al"
    f = alfile(path)
    with pytest.raises(StoreError, match="not open"):
        f.persist(frozenset(), 1)
    f.open()
    with pytest.raises(StoreError, match="already open"):
        f.open()
    f.persist(frozenset({1, 2}), 5)
    with pytest.raises(ValueError, match="not above"):
        f.persist(frozenset({1}), 5)  # a stale hot set must not win
    with pytest.raises(ValueError, match="more than 16"):
        f.persist(frozenset(range(17)), 6)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        f.persist(frozenset({16}), 6)
    assert f.clear() == 6
    f.close()
    assert stored(path) == frozenset()


def test_log_and_file_together(tmp_path) -> None:
    # The caller's loop, with a fresh reopen after every persist.
    path = tmp_path / "al"
    f = alfile(path)
    al = ActivityLog(SIZE, EXT, SMALL, f.open(), generation=f.counter)
    for seq in range(1, 61):
        i = seq - 1
        offset = (i * 7 % 16) * EXT + (i % 3) * MIB
        result = al.touch(offset, 2 * MIB, seq)
        while isinstance(result, AlBlocked):
            al.set_stable(result.need_stable_seq)
            result = al.touch(offset, 2 * MIB, seq)
        if result is not None:
            f.persist(result.hot, result.generation)
            assert stored(path) == al.hot_extents()
    f.close()
    g = alfile(path)
    again = ActivityLog(SIZE, EXT, SMALL, g.open(), generation=g.counter)
    assert again.hot_extents() == al.hot_extents() and g.counter == al.generation
    g.close()
