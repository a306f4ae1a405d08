"""geoclus/cluster/qdisk.py: the quorum disk's on-disk layout. A damaged
record or log slot is a named error (never a free disk); a torn log write
leaves the previous image readable."""

from __future__ import annotations

import pytest

from geoclus.cluster.messages import Entry, Snapshot
from geoclus.cluster.node import LogImage
from geoclus.cluster.qdisk import (
    BLOCK,
    HEADER_BYTES,
    QuorumDiskError,
    decode_header,
    decode_image,
    decode_record,
    encode_image,
    encode_record,
    slot_bytes,
)
from quorum.arbitration import FREE, Reservation


def test_a_new_volume_is_a_free_record() -> None:
    assert decode_record(bytes(BLOCK)) == FREE


def test_a_record_round_trips_and_any_flipped_bit_is_refused() -> None:
    rec = Reservation(7, 3, 41)
    block = encode_record(rec)
    assert len(block) == BLOCK
    assert decode_record(block) == rec
    for pos in (0, 9, 17, 30, 40, 60):
        bad = bytearray(block)
        bad[pos] ^= 0x10
        with pytest.raises(QuorumDiskError):
            decode_record(bytes(bad))


def test_a_foreign_volume_is_named() -> None:
    with pytest.raises(QuorumDiskError, match="not a reservation record"):
        decode_record(b"EXT4" + bytes(BLOCK - 4))


def _image(n: int) -> LogImage:
    entries = tuple(Entry((3, 1), i, f"u{i}", {"set": {"k": i}}) for i in range(1, n + 1))
    return LogImage((3, 1), entries)


def _read(data: bytes, size: int) -> LogImage | None:
    header = decode_header(data[:BLOCK], size)
    assert header is not None
    return decode_image(header, data[HEADER_BYTES : HEADER_BYTES + header.length])


def test_a_log_image_round_trips() -> None:
    size = slot_bytes(1 << 20)
    img = _image(40)
    data = encode_image(img, 5, size)
    assert len(data) % BLOCK == 0
    assert _read(data, size) == img


def test_an_image_with_a_snapshot_round_trips_and_a_gap_after_it_is_refused() -> None:
    size = slot_bytes(1 << 20)
    base = Snapshot(30, {"version": 30, "values": {"k": 1}}, ("u29", "u30"))
    tail = tuple(Entry((3, 1), i, f"u{i}", None) for i in (31, 32))
    img = LogImage((3, 1), tail, base)
    assert img.length == 32
    assert _read(encode_image(img, 2, size), size) == img
    gap = LogImage((3, 1), tail[1:], base)
    with pytest.raises(QuorumDiskError, match="entry 31 has index 32"):
        _read(encode_image(gap, 3, size), size)


def test_a_torn_image_reads_as_absent_not_as_another_log() -> None:
    size = slot_bytes(1 << 20)
    data = bytearray(encode_image(_image(40), 5, size))
    data[200] ^= 1  # the payload changed after the header was written
    assert _read(bytes(data), size) is None


def test_an_image_larger_than_a_slot_is_refused_naming_the_remedy() -> None:
    size = slot_bytes(4 * BLOCK)
    with pytest.raises(QuorumDiskError, match="larger quorum volume or a lower"):
        encode_image(_image(200), 1, size)


def test_a_too_small_volume_is_refused() -> None:
    with pytest.raises(QuorumDiskError, match="at least"):
        slot_bytes(2 * BLOCK)


def test_a_header_claiming_more_than_the_slot_is_refused() -> None:
    size = slot_bytes(1 << 20)
    data = bytearray(encode_image(_image(1), 1, size))
    data[16:20] = (size * 2).to_bytes(4, "big")
    with pytest.raises(QuorumDiskError, match="claims"):
        decode_header(bytes(data[:BLOCK]), size)
