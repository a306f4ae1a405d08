"""Write ordering on the primary: overlapping writes are applied in sequence order.

:class:`OverlapTracker` is pure bookkeeping. The primary registers each write
the moment it gets its sequence number; ``add`` returns the earlier writes still
being applied that overlap it, and the shell waits for those before applying.
Non-overlapping writes proceed in parallel. The secondary needs none of this:
it applies strictly in sequence order.
"""

from __future__ import annotations


class OverlapTracker:
    """In-flight byte ranges keyed by sequence number.

    Bounded by the number of writes in flight, which the export bounds.
    """

    def __init__(self, *, fault_ignore_overlaps: bool = False) -> None:
        """``fault_ignore_overlaps`` is a test-only fault that breaks the rule
        (no write ever waits), so tests can show they catch it."""
        self._ranges: dict[int, tuple[int, int]] = {}
        self._fault = fault_ignore_overlaps

    def add(self, seq: int, offset: int, length: int) -> list[int]:
        """Register write ``seq`` and return the in-flight earlier writes it overlaps.

        Sequence numbers must be added in increasing order.
        """
        end = offset + length
        blockers = [
            other
            for other, (o_start, o_end) in self._ranges.items()
            if other < seq and o_start < end and offset < o_end
        ]
        self._ranges[seq] = (offset, end)
        return [] if self._fault else blockers

    def remove(self, seq: int) -> None:
        """Forget write ``seq`` (applied or failed)."""
        self._ranges.pop(seq, None)

    def __len__(self) -> int:
        return len(self._ranges)
