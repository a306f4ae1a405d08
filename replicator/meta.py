"""Crash-safe volume metadata in a sidecar file (layout in docs/format.md).

The file holds two 4 KiB slots. Each update writes the *other* slot with a
counter one higher, then ``fdatasync``s; a slot is valid only if its magic,
version and xxh3-64 checksum are right. Reading takes the valid slot with the
highest counter, so a write torn at any byte leaves either the previous or the
next state, never garbage.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace

import xxhash

from geoclus.errors import StoreError

SLOT_BYTES = 4096
META_MAGIC = 0x47434D44  # "GCMD"
META_VERSION = 1
_SLOT = struct.Struct(">IHxxQ16sQIQBBBxQQ")
# magic, version, counter, volume_id, size_bytes, block_size, generation,
# role, clean, outdated, seq, created_ns
ROLE_PRIMARY = 1
ROLE_SECONDARY = 2


@dataclass(frozen=True)
class VolumeMeta:
    """What a copy knows about itself across restarts.

    ``seq``: for a primary, the last sequence number it assigned (valid when
    ``clean``); for a secondary, the last sequence number durable in its store.
    ``generation`` names the history the data belongs to (0 = never written, a
    fresh all-zero store). ``clean`` is false while the daemon runs and true
    after a clean shutdown. ``outdated`` marks a copy known to be behind its peer.
    """

    volume_id: bytes
    size_bytes: int
    block_size: int
    generation: int
    role: int
    clean: bool
    outdated: bool
    seq: int
    created_ns: int
    counter: int = 0

    def encode(self) -> bytes:
        body = _SLOT.pack(
            META_MAGIC,
            META_VERSION,
            self.counter,
            self.volume_id,
            self.size_bytes,
            self.block_size,
            self.generation,
            self.role,
            int(self.clean),
            int(self.outdated),
            self.seq,
            self.created_ns,
        )
        return body + struct.pack(">Q", xxhash.xxh3_64_intdigest(body))

    @classmethod
    def decode(cls, slot: bytes) -> VolumeMeta | None:
        """Return the metadata in ``slot``, or None if the slot is not valid."""
        if len(slot) < _SLOT.size + 8:
            return None
        body = slot[: _SLOT.size]
        (checksum,) = struct.unpack_from(">Q", slot, _SLOT.size)
        if xxhash.xxh3_64_intdigest(body) != checksum:
            return None
        (magic, version, counter, vid, size, bsize, gen, role, clean, outdated, seq, created) = (
            _SLOT.unpack(body)
        )
        if magic != META_MAGIC or version != META_VERSION:
            return None
        return cls(vid, size, bsize, gen, role, bool(clean), bool(outdated), seq, created, counter)


class MetaFile:
    """The sidecar file. Blocking; the volume shell calls it from a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self.current: VolumeMeta | None = None

    def open(self) -> VolumeMeta | None:
        """Open (creating if missing) and return the newest valid state, or None
        for a fresh file (empty, or whose first write was torn)."""
        if self._fd is not None:
            raise StoreError(f"metadata file {self.path} is already open")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            raw = os.pread(self._fd, 2 * SLOT_BYTES, 0)
        except OSError as exc:
            raise StoreError(f"cannot open metadata file {self.path}: {exc.strerror}") from exc
        slots = [VolumeMeta.decode(raw[i * SLOT_BYTES : (i + 1) * SLOT_BYTES]) for i in (0, 1)]
        valid = [s for s in slots if s is not None]
        self.current = max(valid, key=lambda m: m.counter) if valid else None
        # The first write goes to slot 1 and slot 0 is written only after it;
        # so both slots invalid with slot 0 never written means the very first
        # write was torn: nothing was ever stored, the copy is fresh.
        if raw and not valid and not any(raw[:SLOT_BYTES]):
            return None
        if raw and not valid:
            raise StoreError(
                f"metadata file {self.path} has no valid slot (both checksums fail); "
                "it is not a geoclus metadata file or both copies are damaged"
            )
        return self.current

    def write(self, meta: VolumeMeta) -> VolumeMeta:
        """Durably store ``meta`` (its counter is set here) and return what was stored."""
        if self._fd is None:
            raise StoreError(f"metadata file {self.path} is not open")
        counter = (self.current.counter + 1) if self.current else 1
        stored = replace(meta, counter=counter)
        slot = stored.encode().ljust(SLOT_BYTES, b"\0")
        try:
            os.pwrite(self._fd, slot, (counter % 2) * SLOT_BYTES)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError(f"cannot write metadata file {self.path}: {exc}") from exc
        self.current = stored
        return stored

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
