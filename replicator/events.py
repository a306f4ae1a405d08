"""A bounded log of state changes, for ``geoclus volume events``.

Every event has a sequence number (so a follower asks for what is new), a wall
clock timestamp, a kind and a message; details are JSON-ready. The ring keeps
the newest ``capacity`` events; a follower that falls further behind is told
how many it missed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CAPACITY = 1000


@dataclass(frozen=True)
class Event:
    seq: int
    time_s: float
    kind: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time_s,
            "kind": self.kind,
            "message": self.message,
            **({"details": self.details} if self.details else {}),
        }


class EventLog:
    """The newest ``capacity`` events, numbered from 1."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._events: deque[Event] = deque(maxlen=capacity)
        self._next = 1

    def add(self, kind: str, message: str, **details: Any) -> Event:
        event = Event(self._next, time.time(), kind, message, details)
        self._next += 1
        self._events.append(event)
        return event

    def since(self, seq: int, limit: int = DEFAULT_CAPACITY) -> tuple[list[Event], int]:
        """Events after ``seq`` (at most ``limit``) and how many were lost to
        the ring's bound since then."""
        oldest = self._events[0].seq if self._events else self._next
        missed = max(0, oldest - seq - 1)
        out = [e for e in self._events if e.seq > seq][:limit]
        return out, missed

    @property
    def last_seq(self) -> int:
        return self._next - 1
