"""Crash-safe metadata (replicator/meta.py): two 4 KiB slots, newest valid wins,
a torn write falls back to the previous state. Slots are inspected with
os-level reads and the documented layout."""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import replace

import hypothesis.strategies as st
import pytest
import xxhash
from hypothesis import given, settings

from geoclus.errors import StoreError
from replicator.meta import MetaFile, VolumeMeta

SLOT = 4096
# magic u32, version u16, pad 2, counter u64, volume_id 16s, size u64,
# block_size u32, generation u64, role u8, clean u8, outdated u8, pad 1,
# seq u64, created_ns u64, then an xxh3-64 checksum of all that.
LAYOUT = ">IHxxQ16sQIQBBBxQQ"
RECORD = struct.calcsize(LAYOUT) + 8  # the bytes the checksum protects (80)


def state(seq: int, **over) -> VolumeMeta:
    fields = dict(
        volume_id=bytes(range(16)),
        size_bytes=1 << 30,
        block_size=4096,
        generation=0x1234_5678_9ABC_DEF1,
        role=1,
        clean=False,
        outdated=False,
        seq=seq,
        created_ns=1_700_000_000_000_000_000,
    )
    fields.update(over)
    return VolumeMeta(**fields)


def same_state(got: VolumeMeta | None, want: VolumeMeta, counter: int) -> bool:
    return got is not None and got == replace(want, counter=counter)


def raw(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def slot_header(data: bytes, index: int) -> tuple[int, int, int]:
    """(magic, version, counter) of slot ``index``, read by hand."""
    magic, version = struct.unpack_from(">IH", data, index * SLOT)
    (counter,) = struct.unpack_from(">Q", data, index * SLOT + 8)
    return magic, version, counter


def reopen(path) -> VolumeMeta | None:
    m = MetaFile(str(path))
    try:
        return m.open()
    finally:
        m.close()


def test_missing_file_is_created_empty_and_private(tmp_path) -> None:
    path = tmp_path / "v.meta"
    m = MetaFile(str(path))
    assert m.open() is None
    m.close()
    st_ = os.stat(path)
    assert st_.st_size == 0
    assert stat.S_IMODE(st_.st_mode) == 0o600


def test_existing_empty_file_is_fresh(tmp_path) -> None:
    path = tmp_path / "v.meta"
    path.write_bytes(b"")
    assert reopen(path) is None


def test_write_then_read_back(tmp_path) -> None:
    path = tmp_path / "v.meta"
    want = state(42, clean=True, outdated=True, role=2)
    m = MetaFile(str(path))
    m.open()
    stored = m.write(want)
    m.close()
    assert stored.counter == 1
    assert same_state(stored, want, 1)
    got = reopen(path)
    assert same_state(got, want, 1)
    assert (got.clean, got.outdated, got.role, got.seq) == (True, True, 2, 42)
    data = raw(path)
    assert slot_header(data, 1) == (0x47434D44, 1, 1)
    (size,) = struct.unpack_from(">Q", data, SLOT + 32)
    assert size == 1 << 30
    assert data[SLOT + 16 : SLOT + 32] == bytes(range(16))


def test_write_before_open_is_refused(tmp_path) -> None:
    with pytest.raises(StoreError, match="not open"):
        MetaFile(str(tmp_path / "v.meta")).write(state(1))


def test_updates_alternate_slots(tmp_path) -> None:
    path = tmp_path / "v.meta"
    m = MetaFile(str(path))
    m.open()
    previous = raw(path)
    for n in range(1, 7):
        m.write(state(n))
        data = raw(path)
        assert len(data) == 2 * SLOT
        newest, other = n % 2, 1 - n % 2
        assert slot_header(data, newest) == (0x47434D44, 1, n)
        # The other slot still holds the previous state, byte for byte.
        if n > 1:
            assert (
                data[other * SLOT : (other + 1) * SLOT]
                == previous[other * SLOT : (other + 1) * SLOT]
            )
            assert slot_header(data, other)[2] == n - 1
        previous = data
        assert same_state(reopen(path), state(n), n)
    m.close()


def _three_states(path) -> tuple[bytes, bytes]:
    """Write states 1, 2, 3; return the file before and after write 3."""
    m = MetaFile(str(path))
    m.open()
    m.write(state(101))
    m.write(state(102))
    before = raw(path)
    m.write(state(103))
    m.close()
    return before, raw(path)


@given(cut=st.integers(0, SLOT))
@settings(max_examples=60, deadline=None)
def test_torn_write_falls_back_to_previous_state(tmp_path_factory, cut) -> None:
    """Write 3 (to slot 1) torn after ``cut`` bytes: new prefix, old suffix."""
    path = tmp_path_factory.mktemp("torn") / "v.meta"
    before, after = _three_states(path)
    torn = after[: SLOT + cut] + before[SLOT + cut :]
    path.write_bytes(torn)
    got = reopen(path)
    if cut >= RECORD:
        assert same_state(got, state(103), 3)  # the whole record made it
    else:
        assert same_state(got, state(102), 2)


@given(pos=st.integers(0, SLOT - 1), mask=st.integers(1, 255), newest_slot=st.sampled_from([0, 1]))
@settings(max_examples=150, deadline=None)
def test_corrupt_byte_in_newest_slot(tmp_path_factory, pos, mask, newest_slot) -> None:
    path = tmp_path_factory.mktemp("corrupt") / "v.meta"
    m = MetaFile(str(path))
    m.open()
    writes = 3 if newest_slot == 1 else 4
    for n in range(1, writes + 1):
        m.write(state(200 + n))
    m.close()
    data = bytearray(raw(path))
    data[newest_slot * SLOT + pos] ^= mask
    path.write_bytes(bytes(data))
    got = reopen(path)
    if pos < RECORD:
        assert same_state(got, state(200 + writes - 1), writes - 1)
    else:  # padding after the record is not part of the state
        assert same_state(got, state(200 + writes), writes)


@pytest.mark.parametrize("length", [SLOT, SLOT + 1, SLOT + RECORD - 1])
def test_truncated_newest_slot_falls_back(tmp_path, length) -> None:
    path = tmp_path / "v.meta"
    _three_states(path)  # newest (counter 3) is slot 1
    os.truncate(path, length)
    assert same_state(reopen(path), state(102), 2)


def test_write_after_fallback_overwrites_the_bad_slot(tmp_path) -> None:
    path = tmp_path / "v.meta"
    _three_states(path)
    data = bytearray(raw(path))
    data[SLOT + 20] ^= 0xFF  # spoil state 3 in slot 1
    path.write_bytes(bytes(data))
    m = MetaFile(str(path))
    assert same_state(m.open(), state(102), 2)
    m.write(state(104))  # counter 3 again: goes to slot 1, keeps slot 0
    m.close()
    out = raw(path)
    assert slot_header(out, 1)[2] == 3
    assert out[:SLOT] == bytes(data[:SLOT])
    assert same_state(reopen(path), state(104), 3)


def test_both_slots_bad_is_an_error(tmp_path) -> None:
    path = tmp_path / "v.meta"
    _three_states(path)
    data = bytearray(raw(path))
    data[5] ^= 1
    data[SLOT + 5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="no valid slot"):
        reopen(path)


@pytest.mark.parametrize("content", [b"x", b"not a metadata file\n" * 500])
def test_foreign_content_is_an_error(tmp_path, content) -> None:
    path = tmp_path / "v.meta"
    path.write_bytes(content)
    with pytest.raises(StoreError):
        reopen(path)
    assert raw(path) == content


def test_wrong_magic_or_version_with_a_good_checksum_is_invalid() -> None:
    good = state(1).encode()
    assert VolumeMeta.decode(good) == state(1)
    for offset, fmt, value in ((0, ">I", 0x47434D45), (4, ">H", 2)):
        body = bytearray(good[:-8])
        struct.pack_into(fmt, body, offset, value)
        forged = bytes(body) + struct.pack(">Q", xxhash.xxh3_64_intdigest(bytes(body)))
        assert VolumeMeta.decode(forged) is None
    assert VolumeMeta.decode(good[:-1]) is None


@pytest.mark.parametrize("cut", [0, 1, 7, 40, 100, SLOT - 1])
def test_torn_first_write_is_fresh(tmp_path, cut) -> None:
    """A crash in the very first write (slot 1, slot 0 never written) leaves a
    copy that never stored anything: it opens as fresh, not as damaged."""
    path = tmp_path / "v.meta"
    m = MetaFile(str(path))
    assert m.open() is None
    m.write(state(7))
    m.close()
    full = raw(path)
    assert not any(full[:SLOT])  # slot 0 untouched by the first write
    torn = bytearray(SLOT) + bytearray(full[SLOT : SLOT + cut])
    path.write_bytes(bytes(torn))
    body_bytes = len(state(7).encode())
    if cut < body_bytes:
        assert reopen(path) is None  # the previous state: nothing
    else:
        assert same_state(reopen(path), state(7), 1)  # the next state, complete
