"""One exception hierarchy for every geoclus package.

Operating errors (a lost peer, a bad frame, a misaligned request, a bad config
file) are subclasses of :class:`GeoclusError` and carry a message that says what
is wrong and, where it helps, what to do next. The CLI prints ``str(err)`` on one
line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class GeoclusError(Exception):
    """Root of every error geoclus raises on purpose."""


class ConfigError(GeoclusError):
    """A configuration file or value is invalid.

    ``path`` is the file (or ``"<memory>"``), ``key`` the dotted key, ``problem``
    a sentence saying what is wrong with it.
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{path}: {key}: {problem}")


class ProtocolError(GeoclusError):
    """The peer sent bytes that break the protocol; the connection is dropped.

    Raised by the sans-I/O codecs. Nothing from the offending frame is applied.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class HandshakeRefused(ProtocolError):
    """The two sides are not allowed to replicate to each other (volume, size,
    role, generation or version mismatch). ``reason`` says which and why."""


class IOAlignmentError(GeoclusError):
    """A read or write was not aligned to the block size or fell outside the volume.

    Nothing was read or written.
    """


class StoreError(GeoclusError):
    """The backing store failed (open, size, I/O error from the OS)."""


class NotPrimaryError(GeoclusError):
    """A write reached a copy that is not the primary; it was refused, nothing written."""


class ReadOnlyError(NotPrimaryError):
    """A write reached a read-only export."""


class SuspendedError(GeoclusError):
    """Writes are suspended (synchronous mode, peer lost, policy ``suspend``)."""


class SplitBrainError(GeoclusError):
    """Both copies were primary independently; an operator must choose."""


class NoQuorumError(GeoclusError):
    """This partition has no quorum and may not act."""


class ControlError(GeoclusError):
    """A control-socket request failed (daemon not running, bad request)."""
