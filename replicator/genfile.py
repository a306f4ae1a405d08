"""Crash-safe persistence of a copy's generation lineage (docs/generations.md).

``STORE.gens`` holds two 4 KiB slots, updated alternately with a counter one
higher and an xxh3-64 checksum, then ``fdatasync``ed: a torn write leaves the
previous or the next lineage, never garbage (the same scheme as the metadata
sidecar). A torn *first* write (slot 1 never written) reads as "no lineage yet".
"""

from __future__ import annotations

import os
import struct

import xxhash

from geoclus.errors import StoreError
from replicator.generations import MAX_HISTORY, Cause, Generation, GenState

SLOT_BYTES = 4096
GEN_MAGIC = 0x4743474E  # "GCGN"
GEN_VERSION = 1
_HEAD = struct.Struct(">IHHQ")  # magic, version, flags, counter
_GEN = struct.Struct(">QQB")  # id, created_ns, cause
_TAIL = struct.Struct(">QQB")  # bitmap_base, changes, history count
_SUM = struct.Struct(">Q")

_FLAG_DISCARD = 0x1
_FLAG_UNKNOWN = 0x2
_FLAG_PRIMARY = 0x4
_FLAG_BASE = 0x8  # bitmap_base is set
_FLAG_INCONSISTENT = 0x10

_CAUSE_CODE = {Cause.CREATE: 0, Cause.DIVERGE: 1, Cause.PROMOTE: 2, Cause.FORCE: 3}
_CODE_CAUSE = {v: k for k, v in _CAUSE_CODE.items()}


def encode_genstate(s: GenState, counter: int) -> bytes:
    """The slot bytes for ``s`` (without padding)."""
    flags = (
        (_FLAG_DISCARD if s.discard else 0)
        | (_FLAG_UNKNOWN if s.unknown else 0)
        | (_FLAG_PRIMARY if s.primary else 0)
        | (_FLAG_BASE if s.bitmap_base is not None else 0)
        | (_FLAG_INCONSISTENT if s.inconsistent else 0)
    )
    parts = [
        _HEAD.pack(GEN_MAGIC, GEN_VERSION, flags, counter),
        _GEN.pack(s.current.id, s.current.created_ns, _CAUSE_CODE[s.current.cause]),
        _TAIL.pack(s.bitmap_base or 0, s.changes, len(s.history)),
    ]
    parts += [_GEN.pack(g.id, g.created_ns, _CAUSE_CODE[g.cause]) for g in s.history]
    body = b"".join(parts)
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def decode_genstate(slot: bytes) -> tuple[int, GenState] | None:
    """(counter, state) stored in ``slot``, or None if the slot is not valid."""
    fixed = _HEAD.size + _GEN.size + _TAIL.size
    if len(slot) < fixed + _SUM.size:
        return None
    magic, version, flags, counter = _HEAD.unpack_from(slot, 0)
    if magic != GEN_MAGIC or version != GEN_VERSION:
        return None
    base, changes, count = _TAIL.unpack_from(slot, _HEAD.size + _GEN.size)
    if count > MAX_HISTORY:
        return None
    end = fixed + count * _GEN.size
    if len(slot) < end + _SUM.size:
        return None
    (checksum,) = _SUM.unpack_from(slot, end)
    if xxhash.xxh3_64_intdigest(slot[:end]) != checksum:
        return None
    try:
        cid, cns, ccause = _GEN.unpack_from(slot, _HEAD.size)
        current = Generation(cid, cns, _CODE_CAUSE[ccause])
        history = tuple(
            Generation(i, n, _CODE_CAUSE[c])
            for i, n, c in (_GEN.unpack_from(slot, fixed + k * _GEN.size) for k in range(count))
        )
    except KeyError:
        return None
    state = GenState(
        current=current,
        history=history,
        bitmap_base=base if flags & _FLAG_BASE else None,
        changes=changes,
        discard=bool(flags & _FLAG_DISCARD),
        unknown=bool(flags & _FLAG_UNKNOWN),
        primary=bool(flags & _FLAG_PRIMARY),
        inconsistent=bool(flags & _FLAG_INCONSISTENT),
    )
    return counter, state


class GenFile:
    """The lineage sidecar. Blocking: call from a worker thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._counter = 0
        self.current: GenState | None = None

    def open(self) -> GenState | None:
        """Open (creating if missing); return the stored lineage, or None if none."""
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            raw = os.pread(self._fd, 2 * SLOT_BYTES, 0)
        except OSError as exc:
            raise StoreError(f"cannot open lineage file {self.path}: {exc.strerror}") from exc
        found = [decode_genstate(raw[i * SLOT_BYTES : (i + 1) * SLOT_BYTES]) for i in (0, 1)]
        valid = [f for f in found if f is not None]
        if not valid:
            # Slot 1 is written only after slot 0 was: with it empty, the first
            # write was torn and nothing was ever stored.
            if any(raw[SLOT_BYTES : 2 * SLOT_BYTES]):
                raise StoreError(
                    f"lineage file {self.path} has no valid copy; the copy's history is "
                    "unknown: treat it as a full-sync target (remove the file to do so)"
                )
            return None
        self._counter, self.current = max(valid, key=lambda f: f[0])
        return self.current

    def write(self, state: GenState) -> None:
        """Durably store ``state``."""
        if self._fd is None:
            raise StoreError(f"lineage file {self.path} is not open")
        counter = self._counter + 1
        # Counter 1 goes to slot 0, 2 to slot 1, alternating.
        slot = (counter - 1) % 2
        data = encode_genstate(state, counter).ljust(SLOT_BYTES, b"\0")
        try:
            os.pwrite(self._fd, data, slot * SLOT_BYTES)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError(f"cannot write lineage file {self.path}: {exc}") from exc
        self._counter = counter
        self.current = state

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
