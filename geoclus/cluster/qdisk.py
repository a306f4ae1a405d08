"""The mirrored quorum disk as the node daemon reaches it (``disk`` quorum).

The quorum disk is a small replicated volume (``geoclus volume serve``) in
``sync`` mode with ``on_peer_loss = "suspend"``: its primary completes a
write only once both mirrors hold it, and blocks writes while the other
mirror cannot be reached. Every node reaches it through the NBD export of
the mirror that is currently primary (the secondary's export is read-only).
So a write that cannot reach both mirrors does not complete, the node's
``max_io_s`` runs out, and the operation fails: the disk *fails closed*
(quorum/arbitration.py). An operator lifts that for the surviving mirror with
``geoclus volume allow-degraded`` (the degraded-mirror decision), or forces
quorum without the disk (``geoclus cluster force-quorum``).

Layout (4 KiB blocks; docs/cluster.md, "The quorum disk"):

* block 0: the reservation record ``(ballot, owner, counter)``, with a magic
  and a SHA-256; an all-zero block is the free record (a new volume);
* the rest is two log slots of equal size. A log image (the view and its
  quorum log, JSON) goes into the slot that does not hold the newest valid
  image, header first in the same write: a write torn by a crash leaves the
  other slot intact. A reader takes the valid image with the highest
  ``(view, length)``.

A damaged block (magic present, checksum wrong) is a failed read, named in
the error, never taken for a free disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from geoclus.cluster import wire
from geoclus.cluster.messages import NO_VIEW, Entry, Snapshot
from geoclus.cluster.node import LogImage
from geoclus.errors import GeoclusError
from geoclus.nbd.client import NbdClient, NbdClientError
from quorum.arbitration import FREE, Reservation

log = logging.getLogger("geoclus.qdisk")

BLOCK = 4096
RES_MAGIC = b"GCQDRES1"
LOG_MAGIC = b"GCQDLOG1"
_RES = struct.Struct(">8sQqQ")  # magic, ballot, owner, counter
_LOG = struct.Struct(">8sQI32s")  # magic, sequence, payload bytes, sha256(payload)
MIN_SIZE_BYTES = BLOCK * 4
HEADER_BYTES = _LOG.size  # a log slot header


class QuorumDiskError(GeoclusError):
    """The quorum disk's contents are damaged or its layout does not fit."""


def encode_record(rec: Reservation) -> bytes:
    """Block 0 for ``rec`` (magic, fields, SHA-256 of them, zero padding)."""
    body = _RES.pack(RES_MAGIC, rec.ballot, rec.owner, rec.counter)
    return (body + hashlib.sha256(body).digest()).ljust(BLOCK, b"\0")


def decode_record(block: bytes) -> Reservation:
    """The record in block 0; all zeroes is :data:`FREE`. Raises
    :class:`QuorumDiskError` naming the problem for anything else."""
    if len(block) < _RES.size + 32:
        raise QuorumDiskError(f"reservation block is {len(block)} bytes")
    if not any(block):
        return FREE
    body = block[: _RES.size]
    magic, ballot, owner, counter = _RES.unpack(body)
    if magic != RES_MAGIC:
        raise QuorumDiskError(
            f"block 0 is not a reservation record (magic {magic!r}): is this the quorum volume?"
        )
    if hashlib.sha256(body).digest() != block[_RES.size : _RES.size + 32]:
        raise QuorumDiskError("reservation record checksum mismatch: block 0 is damaged")
    if owner < -1:
        raise QuorumDiskError(f"reservation record names owner {owner}")
    return Reservation(ballot, owner, counter)


def slot_bytes(size_bytes: int) -> int:
    """Size of each of the two log slots on a volume of ``size_bytes``."""
    if size_bytes < MIN_SIZE_BYTES:
        raise QuorumDiskError(
            f"the quorum volume has {size_bytes} bytes: it needs at least {MIN_SIZE_BYTES}"
        )
    return (size_bytes - BLOCK) // 2 // BLOCK * BLOCK


def encode_image(image: LogImage, seq: int, slot_size: int) -> bytes:
    """A slot's bytes (header and JSON payload, padded to whole blocks).
    Raises :class:`QuorumDiskError` if the image does not fit the slot."""
    payload = json.dumps(
        {
            "view": list(image.view),
            "base": wire.to_json(image.base),
            "log": wire.to_json(list(image.log)),
        },
        separators=(",", ":"),
    ).encode()
    head = _LOG.pack(LOG_MAGIC, seq, len(payload), hashlib.sha256(payload).digest())
    data = head + payload
    if len(data) > slot_size:
        raise QuorumDiskError(
            f"the quorum log needs {len(data)} bytes, a slot holds {slot_size}: "
            "use a larger quorum volume or a lower [log] compact_entries"
        )
    padded = -(-len(data) // BLOCK) * BLOCK
    return data.ljust(padded, b"\0")


@dataclass(frozen=True)
class SlotHeader:
    seq: int
    length: int
    digest: bytes


def decode_header(block: bytes, slot_size: int) -> SlotHeader | None:
    """A slot's header, or None for an empty slot. Raises
    :class:`QuorumDiskError` for a header that cannot be right."""
    if not any(block[: _LOG.size]):
        return None
    magic, seq, length, digest = _LOG.unpack_from(block)
    if magic != LOG_MAGIC:
        raise QuorumDiskError(f"log slot has magic {magic!r}: is this the quorum volume?")
    if length > slot_size - _LOG.size:
        raise QuorumDiskError(f"log slot header claims {length} bytes (slot {slot_size})")
    return SlotHeader(seq, length, digest)


def decode_image(header: SlotHeader, payload: bytes) -> LogImage | None:
    """The image in a slot, or None if its payload does not match the header
    (a write torn by a crash: the other slot holds the previous image)."""
    if len(payload) != header.length or hashlib.sha256(payload).digest() != header.digest:
        return None
    try:
        doc = json.loads(payload)
        view = wire.from_json(tuple[int, int], doc["view"], "view")
        base = wire.from_json(Snapshot, doc["base"], "base")
        entries = wire.from_json(tuple[Entry, ...], doc["log"], "log")
    except (ValueError, KeyError, TypeError, wire.WireError) as exc:
        raise QuorumDiskError(f"log slot payload is not a quorum log: {exc}") from None
    if base.index < 0:
        raise QuorumDiskError(f"log slot snapshot has index {base.index}")
    for i, e in enumerate(entries, start=base.index + 1):
        if e.index != i:
            raise QuorumDiskError(f"log slot entry {i} has index {e.index}")
    return LogImage(view, tuple(entries), base)


@dataclass(frozen=True)
class Mirror:
    """One mirror's NBD export (``host``, ``port``; export ``name``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class QuorumDisk:
    """The daemon's handle on the quorum disk: each operation is bounded by
    ``max_io_s`` and returns its result or None (failed); a failed or timed
    out operation closes the connection abortively (so a request still in the
    socket is discarded, not delivered late) and the next one reconnects,
    to whichever export is writable (the primary's)."""

    def __init__(
        self,
        mirrors: tuple[Mirror, ...],
        export: str,
        max_io_s: float,
        nursery: trio.Nursery,
        local_address: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.mirrors = mirrors
        self.tls_context = tls_context
        self.local_address = local_address
        self.export = export
        self.max_io_s = max_io_s
        self._nursery = nursery
        self._client: NbdClient | None = None
        self.using: Mirror | None = None
        self.size_bytes = 0
        self.last_error = ""
        self.failures = 0
        self._newest_slot: int | None = None
        self._seq = 0
        self._lock = trio.Lock()

    async def _connect(self) -> NbdClient:
        if self._client is not None:
            return self._client
        problems = []
        for m in self.mirrors:
            try:
                c = await NbdClient.connect_tcp(
                    m.host, m.port, self.export, self.local_address, self.tls_context
                )
            except (OSError, NbdClientError) as exc:
                problems.append(f"{m}: {exc}")
                continue
            assert c.export is not None
            if c.export.read_only:
                problems.append(f"{m}: read-only (a secondary)")
                await c.aclose()
                continue
            slot_bytes(c.export.size_bytes)  # raises if the volume is too small
            self._nursery.start_soon(c.run)
            self._client, self.using, self.size_bytes = c, m, c.export.size_bytes
            return c
        raise NbdClientError("no writable mirror: " + "; ".join(problems))

    async def _abort(self) -> None:
        c, self._client, self.using = self._client, None, None
        if c is None:
            return
        stream = c._stream
        sock = getattr(stream, "socket", None) or getattr(stream, "ssl_object", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with trio.CancelScope(shield=True):
            await stream.aclose()

    async def _op(self, what: str, fn: Callable[[NbdClient], Awaitable[Any]]) -> Any:
        """Run ``fn`` on a connection within ``max_io_s``; its result, or None."""
        async with self._lock:
            with trio.move_on_after(self.max_io_s) as scope:
                try:
                    client = await self._connect()
                    result = await fn(client)
                except (OSError, NbdClientError, trio.BrokenResourceError) as exc:
                    self.last_error = f"{what}: {exc}"
                except QuorumDiskError as exc:
                    self.last_error = f"{what}: {exc}"
                    log.error("quorum disk: %s", self.last_error)
                else:
                    return result
            if scope.cancelled_caught:
                self.last_error = (
                    f"{what}: no answer within {self.max_io_s:g}s (a mirror unreachable: "
                    "writes wait for both)"
                )
            self.failures += 1
            await self._abort()
            return None

    async def read_record(self) -> Reservation | None:
        async def go(c: NbdClient) -> Reservation:
            return decode_record(await c.read(0, BLOCK))

        result: Reservation | None = await self._op("read reservation", go)
        return result

    async def write_record(self, rec: Reservation) -> bool:
        async def go(c: NbdClient) -> bool:
            await c.write(0, encode_record(rec), fua=True)
            return True

        return bool(await self._op("write reservation", go))

    async def _read_slots(self, c: NbdClient) -> tuple[int | None, LogImage]:
        size = slot_bytes(self.size_bytes)
        best: tuple[tuple[tuple[int, int], int], int, LogImage] | None = None
        for slot in (0, 1):
            base = BLOCK + slot * size
            head_block = await c.read(base, BLOCK)
            header = decode_header(head_block, size)
            if header is None:
                continue
            self._seq = max(self._seq, header.seq)
            total = _LOG.size + header.length
            data = head_block if total <= BLOCK else await c.read(base, -(-total // BLOCK) * BLOCK)
            image = decode_image(header, data[_LOG.size : total])
            if image is None:
                log.warning("quorum disk: log slot %d is torn (an interrupted write)", slot)
                continue
            key = ((image.view[0], image.view[1]), image.length)
            if best is None or key > best[0]:
                best = (key, slot, image)
        if best is None:
            return None, LogImage(NO_VIEW, ())
        return best[1], best[2]

    async def read_log(self) -> LogImage | None:
        async def go(c: NbdClient) -> LogImage:
            slot, image = await self._read_slots(c)
            self._newest_slot = slot
            return image

        result: LogImage | None = await self._op("read quorum log", go)
        return result

    async def write_log(self, image: LogImage) -> bool:
        async def go(c: NbdClient) -> bool:
            if self._newest_slot is None and self._seq == 0:
                self._newest_slot, _ = await self._read_slots(c)
            slot = 1 if self._newest_slot == 0 else 0
            self._seq += 1
            data = encode_image(image, self._seq, slot_bytes(self.size_bytes))
            await c.write(BLOCK + slot * slot_bytes(self.size_bytes), data, fua=True)
            self._newest_slot = slot
            return True

        return bool(await self._op("write quorum log", go))

    async def aclose(self) -> None:
        await self._abort()


async def probe_mirrors(
    mirrors: tuple[Mirror, ...],
    export: str,
    probes: int = 20,
    timeout_s: float = 5.0,
    local_address: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> dict[str, float | None]:
    """Round trip (seconds, the median of ``probes`` 4 KiB reads) to every
    mirror's export; None where it cannot be reached within ``timeout_s``."""
    out: dict[str, float | None] = {}
    for m in mirrors:
        samples: list[float] = []
        try:
            with trio.fail_after(timeout_s):
                c = await NbdClient.connect_tcp(m.host, m.port, export, local_address, tls_context)
                async with trio.open_nursery() as n:
                    n.start_soon(c.run)
                    for _ in range(probes):
                        t0 = time.perf_counter()
                        await c.read(0, BLOCK)
                        samples.append(time.perf_counter() - t0)
                    await c.aclose()
        except (OSError, NbdClientError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("quorum disk: cannot probe mirror %s: %s", m, exc)
        samples.sort()
        out[str(m)] = samples[len(samples) // 2] if samples else None
    return out
