"""Size parsing (replicator/units.py) and the dirty-region bitmap
(replicator/bitmap.py), the bitmap checked against a set-of-regions model."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from replicator.bitmap import DirtyBitmap
from replicator.units import format_size, parse_size

# ------------------------------------------------------------------- units

MULTIPLIERS = {
    "": 1,
    "b": 1,
    "B": 1,
    "k": 1024,
    "K": 1024,
    "KiB": 1024,
    "kib": 1024,
    "kB": 1000,
    "KB": 1000,
    "m": 1048576,
    "M": 1048576,
    "MiB": 1048576,
    "MB": 1000000,
    "g": 1073741824,
    "G": 1073741824,
    "GiB": 1073741824,
    "GB": 1000000000,
    "t": 1099511627776,
    "T": 1099511627776,
    "TiB": 1099511627776,
    "TB": 1000000000000,
}


@pytest.mark.parametrize(("suffix", "mult"), MULTIPLIERS.items())
def test_every_suffix(suffix, mult) -> None:
    assert parse_size(f"3{suffix}") == 3 * mult
    assert parse_size(f" 3 {suffix} ") == 3 * mult
    assert parse_size(f"0{suffix}") == 0


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("256MiB", 268435456),
        ("4 KiB", 4096),
        ("1G", 1073741824),
        ("1.5KiB", 1536),
        ("0.5kB", 500),
        ("2.25MiB", 2359296),
        ("16TiB", 17592186044416),
        ("007", 7),
        ("9007199254740993", 9007199254740993),  # above 2**53: exact, not rounded
        (4096, 4096),
        (0, 0),
    ],
)
def test_values(text, want) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "abc",
        "MiB",
        "-1",
        "-1KiB",
        "1.5",  # 1.5 bytes
        "1.1KiB",  # 1126.4 bytes
        "1.0000000000000001KiB",  # not whole, however close
        "10 XB",
        "5 PiB",
        "1e3",
        "0x10",
        "1,5MiB",
        "1 2",
        ".5KiB",
        "5.KiB",
        -5,
        True,
        False,
        None,
        1.5,
        b"4096",
        [4096],
    ],
)
def test_bad_sizes_raise_value_error(text) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(n=st.integers(0, 2**50), suffix=st.sampled_from(sorted(MULTIPLIERS)))
def test_any_whole_number_with_any_suffix(n, suffix) -> None:
    assert parse_size(f"{n}{suffix}") == n * MULTIPLIERS[suffix]


@given(whole=st.integers(0, 10**6), frac=st.integers(0, 999))
def test_decimal_fractions_exact(whole, frac) -> None:
    text = f"{whole}.{frac:03d}"
    thousandths = whole * 1000 + frac
    # "x.yyy kB" is exactly x*1000 + yyy bytes.
    assert parse_size(text + "kB") == thousandths
    # With KiB it is whole only when 1024 * thousandths / 1000 is an integer.
    if thousandths * 1024 % 1000 == 0:
        assert parse_size(text + "KiB") == thousandths * 1024 // 1000
    else:
        with pytest.raises(ValueError):
            parse_size(text + "KiB")


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(268435456) == "256.0 MiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"
    assert format_size(2048 * 1024**4) == "2048.0 TiB"


# ------------------------------------------------------------------ bitmap

R = 64 * 1024


@pytest.mark.parametrize("region", [0, -4096, 3, 1000, 65535, 3 * 4096])
def test_bad_region_sizes(region) -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(1 << 20, region)


def test_mark_count_and_idempotence() -> None:
    bm = DirtyBitmap(16 * R)
    assert bm.regions == 16
    assert (bm.dirty_regions, bm.dirty_bytes, list(bm)) == (0, 0, [])
    bm.mark(0, 1)
    bm.mark(R - 1, 1)
    assert bm.dirty_regions == 1
    bm.mark(R - 512, 1024)  # straddles regions 0 and 1
    assert list(bm) == [0, 1]
    bm.mark(5 * R, 3 * R)  # exactly regions 5, 6, 7
    assert list(bm) == [0, 1, 5, 6, 7]
    bm.mark(5 * R, 3 * R)
    assert bm.dirty_regions == 5
    assert bm.dirty_bytes == 5 * R
    assert bm.is_dirty(6) and not bm.is_dirty(8) and not bm.is_dirty(4)
    bm.mark(9 * R, 0)  # empty: nothing
    bm.mark(9 * R, -5)
    assert bm.dirty_regions == 5
    bm.clear()
    assert (bm.dirty_regions, bm.dirty_bytes, list(bm)) == (0, 0, [])
    assert not bm.is_dirty(0)


def test_dirty_bytes_with_a_short_last_region() -> None:
    size = 3 * R + 4096  # four regions, the last only 4 KiB
    bm = DirtyBitmap(size)
    assert bm.regions == 4
    bm.mark(size - 512, 512)
    assert bm.dirty_bytes == 4096
    bm.mark(0, 1)
    assert bm.dirty_bytes == R + 4096
    bm.mark(0, size)
    assert bm.dirty_bytes == size
    assert bm.dirty_regions == 4


def test_marks_past_the_end_are_clipped() -> None:
    bm = DirtyBitmap(2 * R)
    bm.mark(R, 10 * R)
    assert list(bm) == [1]
    bm.mark(5 * R, R)
    assert list(bm) == [1]
    assert bm.dirty_bytes == R


def test_iteration_is_ascending_whatever_the_mark_order() -> None:
    bm = DirtyBitmap(100 * R)
    for r in (99, 3, 64, 0, 8, 7, 63, 17):
        bm.mark(r * R, 1)
    assert list(bm) == [0, 3, 7, 8, 17, 63, 64, 99]


def test_one_tib_at_64_kib_costs_two_mib() -> None:
    bm = DirtyBitmap(1 << 40)
    assert bm.regions == 1 << 24
    assert len(bm._bits) == 2 * 1024 * 1024
    bm.mark((1 << 40) - 1, 1)
    bm.mark(0, 1)
    assert list(bm) == [0, (1 << 24) - 1]
    assert bm.dirty_bytes == 2 * R


@given(
    region_shift=st.integers(9, 16),
    nregions=st.integers(1, 40),
    short=st.integers(0, 511),
    marks=st.lists(
        st.tuples(
            st.integers(0, 3 << 16),
            st.one_of(st.integers(-2, 2), st.integers(0, 4096), st.integers(0, 1 << 17)),
        ),
        max_size=12,
    ),
)
@settings(max_examples=200, deadline=None)
def test_bitmap_matches_a_model(region_shift, nregions, short, marks) -> None:
    region = 1 << region_shift
    size = nregions * region - (short if short < region else 0)
    bm = DirtyBitmap(size, region)
    model: set[int] = set()
    for offset, length in marks:
        bm.mark(offset, length)
        if length <= 0:
            continue  # an empty range touches nothing
        # Region r covers [r*region, (r+1)*region); regions past the last do not exist.
        end = offset + length
        model |= {r for r in range(nregions) if r * region < end and (r + 1) * region > offset}
    assert list(bm) == sorted(model)
    assert bm.dirty_regions == len(model)
    assert bm.dirty_bytes == sum(min((r + 1) * region, size) - r * region for r in model)
    assert all(bm.is_dirty(r) == (r in model) for r in range(nregions))
