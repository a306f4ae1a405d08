"""The undo log of a resync target: save before the first write into a region,
roll back to exactly the pre-resync image, survive torn saves and cut-off rollbacks."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from geoclus.errors import IOAlignmentError, StoreError
from replicator.store import FileStore
from replicator.undolog import (
    HEADER_AREA_BYTES,
    HEADER_SLOT_BYTES,
    RECORD_HEADER_BYTES,
    UndoFull,
    UndoLog,
)

REGION = 1024
SIZE = 10 * REGION + 300  # the last region is short
RECORD = RECORD_HEADER_BYTES + REGION
ROOMY = HEADER_AREA_BYTES + 16 * RECORD  # holds every region of SIZE


class CrashNow(Exception):
    """A simulated crash of the process (the store write never returns)."""


class MemStore:
    """A volume image in memory; ``crash_after`` makes the n+1-th write crash."""

    def __init__(self, image: bytes) -> None:
        self.image = bytearray(image)
        self.syncs = 0
        self.writes = 0
        self.crash_after: int | None = None

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(self.image)
        return bytes(self.image[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        assert offset >= 0 and offset + len(data) <= len(self.image)
        if self.crash_after is not None and self.writes >= self.crash_after:
            raise CrashNow(f"crash before store write {self.writes}")
        self.image[offset : offset + len(data)] = data
        self.writes += 1

    def sync(self) -> None:
        self.syncs += 1


def image_of(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def protocol_write(log: UndoLog, store: MemStore, offset: int, data: bytes) -> None:
    """What the secondary does for every write during a resync."""
    log.save(log.needs_save(offset, len(data)), store.read)
    store.write(offset, data)


def fresh_log(path: Path, size: int = SIZE, region: int = REGION, max_bytes: int = ROOMY):
    log = UndoLog(str(path), size, region, max_bytes)
    log.open()
    return log


def reopen(log: UndoLog):
    """Close without any cleanup (a crash: every call so far returned) and reopen."""
    log.close()
    again = UndoLog(log.path, log.size_bytes, log.region_bytes, log.max_bytes)
    return again, again.open()


def differing_regions(a: bytes, b: bytes, region: int) -> set[int]:
    return {i // region for i in range(0, len(a), region) if a[i : i + region] != b[i : i + region]}


writes_st = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * REGION), st.integers(0, 255)),
    max_size=25,
)


def clip(offset: int, length: int, size: int = SIZE) -> int:
    return min(length, size - offset)


# ---- the main property -------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    region=st.sampled_from([512, 1024, 4096]),
    size=st.integers(1, 12 * 1024),
    writes=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 9000), st.integers(0, 255))),
)
def test_rollback_restores_the_original_image(seed, region, size, writes):
    original = image_of(seed, size)
    store = MemStore(original)
    with tempfile.TemporaryDirectory() as d:
        max_bytes = HEADER_AREA_BYTES + (size // region + 1) * (RECORD_HEADER_BYTES + region)
        log = fresh_log(Path(d) / "undo", size, region, max_bytes)
        log.begin(1)
        for offset, length, fill in writes:
            offset %= size
            data = bytes([fill]) * clip(offset, length, size)
            protocol_write(log, store, offset, data)
            # Every region that differs from the original is saved (write-ahead).
            assert differing_regions(bytes(store.image), original, region) <= set(
                log.state().saved_regions
            )
        saved = len(log.state().saved_regions)
        syncs = store.syncs
        assert log.rollback(store.write, store.sync) == saved
        assert store.syncs == syncs + 1
        assert bytes(store.image) == original
        state = log.state()
        assert not state.active and state.saved_regions == frozenset()
        assert os.path.getsize(log.path) == HEADER_AREA_BYTES
        log.close()


def test_forgetting_to_save_is_caught(tmp_path):
    """The check above has teeth: one write without its save, and the rollback
    no longer gives the original image (while the protocol-keeping twin does)."""
    original = image_of(7)
    for keep_protocol in (True, False):
        store = MemStore(original)
        log = fresh_log(tmp_path / f"undo-{keep_protocol}")
        log.begin(1)
        protocol_write(log, store, 100, b"\x01" * 200)
        if keep_protocol:
            protocol_write(log, store, 5 * REGION, b"\x02" * 10)
        else:
            store.write(5 * REGION, b"\x02" * 10)  # the forgotten save
        log.rollback(store.write, store.sync)
        assert (bytes(store.image) == original) is keep_protocol
        log.close()


def test_works_with_a_filestore(tmp_path):
    """FileStore's read, write and fdatasync plug in as they are."""
    size = 16 * 4096
    store = FileStore(str(tmp_path / "store"), size)
    original = image_of(3, size)
    store.write(0, original)
    log = fresh_log(tmp_path / "undo", size, 4096, HEADER_AREA_BYTES + 20 * (64 + 4096))
    log.begin(5)
    for offset in (0, 4096 * 3 + 512, size - 1024):
        log.save(log.needs_save(offset, 4096 if offset < size - 4096 else 1024), store.read)
        store.write(offset, b"\xaa" * (4096 if offset < size - 4096 else 1024))
    assert log.rollback(store.write, store.fdatasync) == 4
    assert store.read(0, size) == original
    log.close()
    store.close()


# ---- crashes -----------------------------------------------------------------


def run_prefix(log: UndoLog, store: MemStore, writes) -> None:
    for offset, length, fill in writes:
        protocol_write(log, store, offset, bytes([fill]) * clip(offset, length))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), writes=writes_st, data=st.data())
def test_torn_last_save_is_ignored(seed, writes, data):
    """A crash inside save: the file is cut anywhere in the last batch (its data
    write never happened). open works and the rollback gives the original."""
    original = image_of(seed)
    store = MemStore(original)
    with tempfile.TemporaryDirectory() as d:
        log = fresh_log(Path(d) / "undo")
        log.begin(9)
        run_prefix(log, store, writes)
        before = log.state().saved_regions
        unsaved = sorted(set(range(log.regions)) - before)
        assume(unsaved)
        batch = data.draw(st.lists(st.sampled_from(unsaved), min_size=1, unique=True))
        start = os.path.getsize(log.path)
        log.save(batch, store.read)  # ... and the crash comes before the store write
        end = os.path.getsize(log.path)
        assert end == start + len(batch) * RECORD
        cut = data.draw(st.integers(start, end))
        note(f"batch {batch}, cut at {cut} of {start}..{end}")
        os.truncate(log.path, cut)
        log, state = reopen(log)
        assert state.active and state.base_generation == 9
        expected = before | set(batch) if cut == end else before
        assert state.saved_regions == expected
        assert os.path.getsize(log.path) == state.used_bytes
        log.rollback(store.write, store.sync)
        assert bytes(store.image) == original
        log.close()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), writes=writes_st, data=st.data())
def test_last_batch_written_back_out_of_order(seed, writes, data):
    """Page writeback has no order: a crash inside save can leave a later record
    of the batch on disk and an earlier one not. Not damage; the batch is dropped."""
    original = image_of(seed)
    store = MemStore(original)
    with tempfile.TemporaryDirectory() as d:
        log = fresh_log(Path(d) / "undo")
        log.begin(2)
        run_prefix(log, store, writes)
        before = log.state().saved_regions
        unsaved = sorted(set(range(log.regions)) - before)
        assume(len(unsaved) >= 2)
        batch = data.draw(st.lists(st.sampled_from(unsaved), min_size=2, unique=True))
        start = os.path.getsize(log.path)
        log.save(batch, store.read)
        lost = data.draw(st.integers(0, len(batch) - 1))
        with open(log.path, "r+b") as f:
            f.seek(start + lost * RECORD)
            f.write(bytes(RECORD))  # never reached the disk
        log, state = reopen(log)
        assert state.saved_regions == before
        assert os.path.getsize(log.path) == start
        log.rollback(store.write, store.sync)
        assert bytes(store.image) == original
        log.close()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    writes=writes_st,
    k=st.integers(0, 20),
    crash_in_sync=st.booleans(),
)
def test_crash_during_rollback_then_rollback_again(seed, writes, k, crash_in_sync):
    original = image_of(seed)
    store = MemStore(original)
    with tempfile.TemporaryDirectory() as d:
        log = fresh_log(Path(d) / "undo")
        log.begin(4)
        run_prefix(log, store, writes)
        saved = log.state().saved_regions

        def crashing_sync() -> None:
            raise CrashNow("crash in sync")

        store.writes = 0
        if crash_in_sync:
            with pytest.raises(CrashNow):
                log.rollback(store.write, crashing_sync)
        else:
            store.crash_after = k
            try:
                log.rollback(store.write, store.sync)
            except CrashNow:
                pass
            else:
                assert k >= len(saved)  # only then may it finish
            store.crash_after = None
        log, state = reopen(log)
        if crash_in_sync or k < len(saved):
            assert state.active and state.saved_regions == saved
        assert log.rollback(store.write, store.sync) == (len(saved) if state.active else 0)
        assert bytes(store.image) == original
        assert not log.state().active
        log.close()


def test_crash_between_inactive_header_and_truncate(tmp_path):
    """rollback/discard write the header, then truncate: records left behind by
    a crash in between are dropped at open, never rolled back again."""
    store = MemStore(image_of(1))
    log = fresh_log(tmp_path / "undo")
    log.begin(3)
    protocol_write(log, store, 0, b"x" * 3000)
    records = Path(log.path).read_bytes()[HEADER_AREA_BYTES:]
    log.discard()
    with open(log.path, "r+b") as f:
        f.seek(HEADER_AREA_BYTES)
        f.write(records)
    log, state = reopen(log)
    assert not state.active and state.saved_regions == frozenset()
    assert os.path.getsize(log.path) == HEADER_AREA_BYTES
    assert log.rollback(store.write, store.sync) == 0
    log.close()


# ---- begin and the epoch -----------------------------------------------------


def test_begin_with_the_same_base_keeps_the_log(tmp_path):
    original = image_of(5)
    store = MemStore(original)
    log = fresh_log(tmp_path / "undo")
    log.begin(11)
    protocol_write(log, store, 0, b"a" * 2500)
    saved = log.state().saved_regions
    assert saved == {0, 1, 2}
    log, state = reopen(log)  # a link loss and a restart
    assert state.active and state.base_generation == 11 and state.saved_regions == saved
    epoch = state.epoch
    log.begin(11)  # the resync restarts: the old content of 0..2 must stay
    assert log.state().saved_regions == saved and log.state().epoch == epoch
    assert log.needs_save(0, 3 * REGION) == []
    protocol_write(log, store, 0, b"b" * 4000)  # only region 3 is new
    assert log.state().saved_regions == {0, 1, 2, 3}
    log.rollback(store.write, store.sync)
    assert bytes(store.image) == original
    log.close()


def test_begin_with_another_base_starts_empty_and_ignores_old_epochs(tmp_path):
    store = MemStore(image_of(6))
    log = fresh_log(tmp_path / "undo")
    log.begin(1)
    protocol_write(log, store, 0, b"a" * (6 * REGION))
    old_epoch = log.state().epoch
    old_records = Path(log.path).read_bytes()[HEADER_AREA_BYTES:]
    assert len(old_records) == 6 * RECORD
    log.begin(2)
    state = log.state()
    assert state.active and state.base_generation == 2 and state.epoch == old_epoch + 1
    assert state.saved_regions == frozenset()
    assert os.path.getsize(log.path) == HEADER_AREA_BYTES
    # A crash right after the header write: the truncate never happened.
    with open(log.path, "r+b") as f:
        f.seek(HEADER_AREA_BYTES)
        f.write(old_records)
    log, state = reopen(log)
    assert state.saved_regions == frozenset() and state.base_generation == 2
    # The new epoch's records overwrite old ones in place; the rest stay ignored.
    with open(log.path, "r+b") as f:
        f.seek(HEADER_AREA_BYTES)
        f.write(old_records)
    before = bytes(store.image)
    protocol_write(log, store, 9 * REGION, b"c" * 10)
    log, state = reopen(log)
    assert state.saved_regions == {9}
    log.rollback(store.write, store.sync)
    assert bytes(store.image) == before
    log.close()


def test_begin_after_discard_or_rollback_starts_a_new_epoch(tmp_path):
    store = MemStore(image_of(8))
    log = fresh_log(tmp_path / "undo")
    log.begin(1)
    protocol_write(log, store, 0, b"a")
    log.discard()
    assert not log.state().active
    log.begin(1)  # same base, but no log is active: a new, empty one
    assert log.state().saved_regions == frozenset() and log.state().epoch == 2
    log.close()


# ---- bounds and the group commit ---------------------------------------------


def test_full_log_appends_nothing(tmp_path):
    store = MemStore(image_of(9))
    log = fresh_log(tmp_path / "undo", max_bytes=HEADER_AREA_BYTES + 2 * RECORD)
    log.begin(1)
    with pytest.raises(UndoFull) as info:
        log.save([0, 1, 2], store.read)
    assert isinstance(info.value, StoreError)
    assert info.value.needed_bytes == HEADER_AREA_BYTES + 3 * RECORD
    assert "past its bound" in str(info.value)
    assert os.path.getsize(log.path) == HEADER_AREA_BYTES
    log.save([0, 1], store.read)
    image = Path(log.path).read_bytes()
    with pytest.raises(UndoFull):
        log.save([5], store.read)
    assert Path(log.path).read_bytes() == image
    assert log.state().saved_regions == {0, 1}
    log.save([0, 1], store.read)  # already saved: no room needed
    log, state = reopen(log)
    assert state.saved_regions == {0, 1} and state.used_bytes == state.max_bytes
    log.close()


def test_one_fdatasync_per_save(tmp_path):
    store = MemStore(image_of(10))
    log = fresh_log(tmp_path / "undo")
    log.begin(1)
    syncs = log.fdatasyncs
    log.save([3, 1, 3, 2], store.read)
    assert log.fdatasyncs == syncs + 1
    assert log.state().saved_regions == {1, 2, 3}
    log.save([1, 2], store.read)  # nothing new: no write, no sync
    assert log.fdatasyncs == syncs + 1
    assert os.path.getsize(log.path) == HEADER_AREA_BYTES + 3 * RECORD
    log.close()


def test_needs_save_lists_untouched_regions(tmp_path):
    store = MemStore(image_of(11))
    log = fresh_log(tmp_path / "undo")
    log.begin(1)
    assert log.needs_save(REGION - 1, 2) == [0, 1]
    assert log.needs_save(0, 0) == []
    assert log.needs_save(SIZE - 1, 1) == [10]
    log.save([1], store.read)
    assert log.needs_save(0, 3 * REGION) == [0, 2]
    with pytest.raises(IOAlignmentError):
        log.needs_save(SIZE - 1, 2)
    with pytest.raises(ValueError):
        log.save([11], store.read)
    log.close()


def test_misuse_is_refused(tmp_path):
    store = MemStore(image_of(12))
    with pytest.raises(ValueError, match="power of two"):
        UndoLog(str(tmp_path / "u"), SIZE, 1000, ROOMY)
    with pytest.raises(ValueError, match="even one region"):
        UndoLog(str(tmp_path / "u"), SIZE, REGION, HEADER_AREA_BYTES + RECORD - 1)
    log = UndoLog(str(tmp_path / "undo"), SIZE, REGION, ROOMY)
    with pytest.raises(StoreError, match="not open"):
        log.begin(1)
    log.open()
    with pytest.raises(StoreError, match="already open"):
        log.open()
    with pytest.raises(StoreError, match="not active"):
        log.save([0], store.read)
    with pytest.raises(ValueError):
        log.begin(-1)
    assert log.rollback(store.write, store.sync) == 0
    log.discard()  # nothing active: nothing happens
    log.close()
    log.close()


def test_failed_sync_poisons_saves(tmp_path, monkeypatch):
    """After a failed fdatasync Linux may report success on the next one, so the
    log refuses every later save (rollback of what was synced before still works)."""
    original = image_of(13)
    store = MemStore(original)
    log = fresh_log(tmp_path / "undo")
    log.begin(1)
    protocol_write(log, store, 0, b"a" * 10)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr("replicator.undolog.os.fdatasync", failing)
        with pytest.raises(StoreError, match="cannot sync"):
            log.save([4], store.read)
    assert log.state().saved_regions == {0}
    with pytest.raises(StoreError, match="failed earlier"):
        log.save([5], store.read)
    assert log.rollback(store.write, store.sync) == 1
    assert bytes(store.image) == original
    log.close()


def test_failed_read_leaves_a_partial_batch_that_never_counts(tmp_path):
    """A store read failing inside save leaves unsynced records past the end of
    the log; the next save writes over them and open never counts the rest."""
    original = image_of(16)
    store = MemStore(original)
    log = fresh_log(tmp_path / "undo")
    log.begin(1)
    log.save([0], store.read)
    calls = []

    def failing_read(offset: int, length: int) -> bytes:
        calls.append(offset)
        if len(calls) == 4:
            raise StoreError("read failed")
        return store.read(offset, length)

    with pytest.raises(StoreError, match="read failed"):
        log.save([1, 2, 3, 4, 5], failing_read)
    assert os.path.getsize(log.path) == HEADER_AREA_BYTES + 4 * RECORD  # 3 records left
    assert log.state().saved_regions == {0}
    protocol_write(log, store, 6 * REGION, b"z" * 10)  # one record over record 1
    log, state = reopen(log)
    assert state.saved_regions == {0, 6}
    assert os.path.getsize(log.path) == HEADER_AREA_BYTES + 2 * RECORD
    log.rollback(store.write, store.sync)
    assert bytes(store.image) == original
    log.close()


# ---- damage ------------------------------------------------------------------


def saved_three_times(path: Path) -> UndoLog:
    store = MemStore(image_of(14))
    log = fresh_log(path)
    log.begin(1)
    for region in (4, 7, 2):  # three batches
        log.save([region], store.read)
    log.close()
    return log


@pytest.mark.parametrize("where", [0, 20, RECORD_HEADER_BYTES + 5, RECORD - 1])
def test_damaged_middle_record_is_refused(tmp_path, where):
    log = saved_three_times(tmp_path / "undo")
    with open(log.path, "r+b") as f:
        f.seek(HEADER_AREA_BYTES + where)  # record 0; records 1 and 2 intact
        byte = f.read(1)
        f.seek(HEADER_AREA_BYTES + where)
        f.write(bytes([byte[0] ^ 0x40]))
    again = UndoLog(log.path, SIZE, REGION, ROOMY)
    with pytest.raises(StoreError, match=r"record 0 is damaged.*do not promote"):
        again.open()


def test_damaged_last_record_reads_as_a_torn_tail(tmp_path):
    """The documented limit: the last batch cannot be told from a torn save."""
    log = saved_three_times(tmp_path / "undo")
    with open(log.path, "r+b") as f:
        f.seek(HEADER_AREA_BYTES + 2 * RECORD + 100)
        f.write(b"\xff")
    log, state = reopen(log)
    assert state.saved_regions == {4, 7}
    log.close()


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "undo"
    path.write_bytes(random.Random(1).randbytes(HEADER_AREA_BYTES + 100))
    log = UndoLog(str(path), SIZE, REGION, ROOMY)
    with pytest.raises(StoreError, match=r"no valid header.*do not promote"):
        log.open()


def test_torn_first_header_is_a_fresh_file(tmp_path):
    path = tmp_path / "undo"
    path.write_bytes(bytes(HEADER_SLOT_BYTES) + b"\x55" * 100)  # slot 1 torn
    log = UndoLog(str(path), SIZE, REGION, ROOMY)
    state = log.open()
    assert not state.active and state.epoch == 0
    log.close()


def test_torn_header_rewrite_keeps_the_previous_header(tmp_path):
    store = MemStore(image_of(15))
    log = fresh_log(tmp_path / "undo")
    log.begin(21)  # counter 1, slot 1
    log.save([3], store.read)
    log.close()
    records = Path(log.path).read_bytes()[HEADER_AREA_BYTES:]
    log = UndoLog(log.path, SIZE, REGION, ROOMY)
    log.open()
    log.begin(22)  # counter 2, slot 0: a crash tears it, before the truncate
    log.close()
    with open(log.path, "r+b") as f:
        f.write(b"\0" * 20)
        f.seek(HEADER_AREA_BYTES)
        f.write(records)
    log, state = reopen(log)
    assert state.active and state.base_generation == 21 and state.saved_regions == {3}
    log.close()


def test_active_log_of_another_geometry_is_refused(tmp_path):
    log = saved_three_times(tmp_path / "undo")
    for size, region in ((SIZE + REGION, REGION), (SIZE, 2 * REGION)):
        other = UndoLog(log.path, size, region, ROOMY * 2)
        with pytest.raises(StoreError, match=r"old volume\.size and region_size"):
            other.open()
    log = UndoLog(log.path, SIZE, REGION, ROOMY)
    log.open()
    log.discard()
    log.close()
    other = UndoLog(log.path, SIZE, 2 * REGION, ROOMY * 2)
    assert not other.open().active  # an inactive log holds nothing: any geometry
    other.close()


@settings(max_examples=200, deadline=None)
@given(
    tail=st.binary(max_size=3 * RECORD),
    header_ok=st.booleans(),
    flips=st.lists(st.integers(0, HEADER_AREA_BYTES + 4 * RECORD), max_size=4),
)
def test_open_never_fails_with_anything_but_store_error(tail, header_ok, flips):
    """Fuzz: whatever the file holds, open returns a state or raises StoreError."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "undo"
        if header_ok:
            log = fresh_log(path)
            log.begin(1)
            log.save([0, 1], MemStore(image_of(0)).read)
            log.save([5], MemStore(image_of(0)).read)
            log.close()
            raw = bytearray(path.read_bytes() + tail)
        else:
            raw = bytearray(tail)
        for at in flips:
            if at < len(raw):
                raw[at] ^= 0x01
        path.write_bytes(bytes(raw))
        log = UndoLog(str(path), SIZE, REGION, ROOMY)
        try:
            state = log.open()
        except StoreError:
            return
        assert state.used_bytes in (0, *(HEADER_AREA_BYTES + k * RECORD for k in range(4)))
        assert len(state.saved_regions) * RECORD <= max(0, state.used_bytes - HEADER_AREA_BYTES)
        log.close()


# ---- everything at once --------------------------------------------------------


class UndoMachine(RuleBasedStateMachine):
    """Writes, torn saves, cut-off rollbacks and restarts in any order. Model: the
    original image; invariant: every region that differs from it is saved."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.original = image_of(99)
        self.store = MemStore(self.original)
        self.log = fresh_log(Path(self.dir) / "undo")
        self.log.begin(1)

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * REGION), fill=st.integers())
    def write(self, offset, length, fill):
        protocol_write(self.log, self.store, offset, bytes([fill % 256]) * clip(offset, length))

    @precondition(lambda self: self.log.active)
    @rule(data=st.data())
    def crash_inside_save(self, data):
        unsaved = sorted(set(range(self.log.regions)) - self.log.state().saved_regions)
        if not unsaved:
            return
        batch = data.draw(st.lists(st.sampled_from(unsaved), min_size=1, unique=True))
        start = os.path.getsize(self.log.path)
        self.log.save(batch, self.store.read)
        cut = data.draw(st.integers(start, os.path.getsize(self.log.path)))
        os.truncate(self.log.path, cut)
        self.restart()

    @rule(k=st.integers(0, 12))
    def crash_inside_rollback(self, k):
        self.store.writes, self.store.crash_after = 0, k
        with contextlib.suppress(CrashNow):
            self.log.rollback(self.store.write, self.store.sync)
        self.store.crash_after = None
        self.restart()

    @rule()
    def restart(self):
        self.log, state = reopen(self.log)
        note(f"restart: {sorted(state.saved_regions)} saved, active {state.active}")
        self.log.begin(1)  # the resync starts again (a new log if it was rolled back)

    @invariant()
    def differing_regions_are_saved(self):
        changed = differing_regions(bytes(self.store.image), self.original, REGION)
        assert changed <= self.log.state().saved_regions

    def teardown(self) -> None:
        try:
            self.log.rollback(self.store.write, self.store.sync)
            assert bytes(self.store.image) == self.original
        finally:
            self.log.close()
            shutil.rmtree(self.dir)


TestUndoMachine = UndoMachine.TestCase
TestUndoMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
