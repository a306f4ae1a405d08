"""Parsing of sizes with units (``"256MiB"``, ``"4 KiB"``, ``"1G"``).

Binary suffixes (KiB, MiB, GiB, TiB) are powers of 1024; decimal suffixes
(kB/KB, MB, GB, TB) are powers of 1000; a bare number is bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SUFFIX = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Return the number of bytes ``text`` names; raise ``ValueError`` naming the
    problem if it is not a non-negative size with a known unit."""
    if isinstance(text, bool):
        raise ValueError("a size must be a number of bytes or a string like '256MiB'")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    if not isinstance(text, str):
        raise ValueError("a size must be a number of bytes or a string like '256MiB'")
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (expected e.g. '256MiB', '4KiB', '1GiB')")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _SUFFIX:
        raise ValueError(f"{text!r} has an unknown unit {m.group(2)!r} (use KiB, MiB, GiB, TiB)")
    # Exact arithmetic: a float loses whole bytes above 2**53 and rounds
    # fractions such as "1.0000000000000001KiB" to a whole number.
    value = Fraction(number) * _SUFFIX[unit]
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(n_bytes: int) -> str:
    """Render a byte count with a binary unit, e.g. ``268435456 -> '256.0 MiB'``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
