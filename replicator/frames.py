"""Sans-I/O codec for the replication wire protocol (see docs/protocol.md).

Every frame is a 28-byte header plus a payload::

    magic u32 | version u8 | type u8 | flags u16 | length u32 | frame_no u64 | checksum u64

all big-endian. ``checksum`` is xxh3-64 over the header (checksum field zeroed)
and the payload. ``frame_no`` starts at 1 on each connection and goes up by one
per frame in each direction, so a replayed, dropped or reordered frame is
detected. :class:`FrameDecoder` takes bytes and returns typed messages or raises
:class:`~geoclus.errors.ProtocolError`; once it has raised it stays broken, so a
caller cannot apply anything after a bad frame. :class:`FrameEncoder` turns
messages into bytes.
"""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass

import xxhash

from geoclus.errors import ProtocolError

MAGIC = 0x47434C52  # "GCLR"
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1

_HEADER = struct.Struct(">IBBHIQQ")
HEADER_BYTES = _HEADER.size  # 28
_CHECKSUM_OFFSET = HEADER_BYTES - 8

# Frame payload cap. A peer could otherwise make us buffer an arbitrary amount
# before the checksum can even be verified. Large enough for a batch of 16 MiB
# of writes plus entry headers; the sender batches below it.
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024 + 256 * 1024
# Entries per WRITES frame: bounds per-frame decode work and allocations.
MAX_BATCH_ENTRIES = 8192
# Names and reasons are for humans; no legitimate one is long.
MAX_NAME_BYTES = 255
# A lineage (docs/generations.md) is at most 33 generations of 17 bytes plus a
# small header; anything longer is not one.
MAX_LINEAGE_BYTES = 1024
MAX_REASON_BYTES = 1024


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    WRITES = 4
    FLUSH = 5
    ACK = 6
    PING = 7
    PONG = 8
    BYE = 9
    RESYNC_DONE = 10
    DIFFERS = 11
    PEER_BITMAP = 12


class Role(enum.IntEnum):
    PRIMARY = 1
    SECONDARY = 2


class Mode(enum.IntEnum):
    SYNC = 1
    ASYNC = 2


class WriteKind(enum.IntEnum):
    WRITE = 0
    ZEROES = 1
    TRIM = 2
    # Not a write: the sender's xxh3-64 digest of [offset, offset+length) at
    # this point of the sequence (8 bytes of data). The receiver compares it
    # with its own image at the same point and reports a mismatch in DIFFERS.
    # Checksum-skipping resync and online verify are built on it.
    DIGEST = 3


# Bytes of data a DIGEST entry carries (an xxh3-64, big-endian).
DIGEST_BYTES = 8


def entry_data_bytes(kind: WriteKind, length: int) -> int:
    """Bytes of data an entry of ``kind`` covering ``length`` bytes carries."""
    if kind == WriteKind.WRITE:
        return length
    if kind == WriteKind.DIGEST:
        return DIGEST_BYTES
    return 0


HELLO_FLAG_CLEAN = 0x01  # the sender's copy was shut down cleanly
HELLO_FLAG_OUTDATED = 0x02  # the sender's copy is known to be behind (needs resync)
ENTRY_FLAG_FUA = 0x01


@dataclass(frozen=True)
class Hello:
    """First frame each side sends: who I am and where my copy stands."""

    proto_min: int
    proto_max: int
    role: Role
    mode: Mode
    flags: int
    block_size: int
    size_bytes: int
    volume_id: bytes  # 16 bytes
    generation: int
    applied_seq: int
    durable_seq: int
    node: str
    # The sender's encoded generation lineage (replicator.genfile); empty when
    # the sender has none to offer.
    lineage: bytes = b""

    def __post_init__(self) -> None:
        if len(self.volume_id) != 16:
            raise ValueError("volume_id must be 16 bytes")
        if len(self.node.encode()) > MAX_NAME_BYTES:
            raise ValueError("node name too long")
        if len(self.lineage) > MAX_LINEAGE_BYTES:
            raise ValueError("lineage too long")


WELCOME_FLAG_RESYNC = 0x01  # the peer is a resync target: rebase and mark inconsistent
# With RESYNC: send your dirty bitmap (PEER_BITMAP frames) so the resync also
# rolls back what you changed on your own (the union of both bitmaps).
WELCOME_FLAG_SEND_BITMAP = 0x02
# Runs per PEER_BITMAP frame: 12 bytes each, under 1 MiB per frame.
MAX_BITMAP_RUNS = 65536


@dataclass(frozen=True)
class Welcome:
    """The primary accepts the secondary's HELLO: it will send writes from
    ``resume_seq`` on; its newest sequence number is ``primary_seq``. With
    ``WELCOME_FLAG_RESYNC`` the secondary is a resync target: it continues at
    ``resume_seq`` whatever it applied before, and is inconsistent until the
    resync is done."""

    version: int
    resume_seq: int
    primary_seq: int
    flags: int = 0


@dataclass(frozen=True)
class ResyncDone:
    """Every dirty region has been sequenced: the target is consistent again
    once it has applied (and made durable) every write up to ``upto_seq``, and
    then holds the data of ``lineage`` (the primary's encoded lineage)."""

    upto_seq: int
    lineage: bytes


@dataclass(frozen=True)
class Refuse:
    """The sender will not replicate with us; ``reason`` says why and what to do."""

    reason: str


@dataclass(frozen=True)
class WriteEntry:
    """One write in a batch. ``data`` is present only for ``WriteKind.WRITE``."""

    seq: int
    kind: WriteKind
    offset: int
    length: int
    fua: bool
    data: bytes = b""

    @property
    def wire_bytes(self) -> int:
        return _ENTRY.size + entry_data_bytes(self.kind, self.length)


@dataclass(frozen=True)
class Writes:
    """A batch of consecutive writes, in sequence order."""

    entries: tuple[WriteEntry, ...]


@dataclass(frozen=True)
class Flush:
    """Make every write with ``seq <= upto_seq`` durable, then acknowledge ``flush_id``."""

    upto_seq: int
    flush_id: int


@dataclass(frozen=True)
class Ack:
    """Cumulative acknowledgement: all writes ``<= applied_seq`` are applied and
    all ``<= durable_seq`` are durable. ``flush_id`` is the newest FLUSH done
    (0 while a newer one is pending); informational, completion uses
    ``durable_seq``."""

    applied_seq: int
    durable_seq: int
    flush_id: int


@dataclass(frozen=True)
class Ping:
    nonce: int
    sent_ns: int


@dataclass(frozen=True)
class Pong:
    nonce: int
    sent_ns: int


@dataclass(frozen=True)
class Bye:
    reason: str


@dataclass(frozen=True)
class Differs:
    """The DIGEST entries ``seqs`` did not match the receiver's image at their
    point of the sequence (sent before the ACK that covers them)."""

    seqs: tuple[int, ...]


@dataclass(frozen=True)
class PeerBitmap:
    """Part of the sender's dirty bitmap, as runs (first region, count);
    ``last`` marks the final frame."""

    runs: tuple[tuple[int, int], ...]
    last: bool


Message = (
    Hello
    | Welcome
    | Refuse
    | Writes
    | Flush
    | Ack
    | Ping
    | Pong
    | Bye
    | ResyncDone
    | Differs
    | PeerBitmap
)

_HELLO = struct.Struct(">HHBBBxIQ16sQQQ")
_WELCOME = struct.Struct(">HHQQ")
_RESYNC_DONE = struct.Struct(">Q")
_ENTRY = struct.Struct(">QQIBBxx")
_COUNT = struct.Struct(">I")
_FLUSH = struct.Struct(">QQ")
_ACK = struct.Struct(">QQQ")
_PING = struct.Struct(">QQ")
_STRLEN = struct.Struct(">H")
_SEQ = struct.Struct(">Q")
_BITMAP_HEAD = struct.Struct(">BI")
_RUN = struct.Struct(">QI")

ENTRY_HEADER_BYTES = _ENTRY.size


def _encode_str(text: str, limit: int) -> bytes:
    # Cut at a character boundary: a split UTF-8 sequence would make the peer's
    # decoder refuse the whole frame.
    raw = text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")
    return _STRLEN.pack(len(raw)) + raw


def _decode_str(payload: memoryview, offset: int, limit: int, what: str) -> tuple[str, int]:
    if offset + 2 > len(payload):
        raise ProtocolError(f"{what}: truncated string length")
    (n,) = _STRLEN.unpack_from(payload, offset)
    offset += 2
    if n > limit:
        raise ProtocolError(f"{what}: string of {n} bytes exceeds the {limit}-byte limit")
    if offset + n > len(payload):
        raise ProtocolError(f"{what}: truncated string")
    try:
        text = bytes(payload[offset : offset + n]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: string is not UTF-8") from exc
    return text, offset + n


def encode_payload(msg: Message) -> tuple[FrameType, list[bytes | memoryview]]:
    """Return the frame type and payload pieces for ``msg``."""
    if isinstance(msg, Writes):
        parts: list[bytes | memoryview] = [_COUNT.pack(len(msg.entries))]
        for e in msg.entries:
            flags = ENTRY_FLAG_FUA if e.fua else 0
            parts.append(_ENTRY.pack(e.seq, e.offset, e.length, e.kind, flags))
            if e.kind in (WriteKind.WRITE, WriteKind.DIGEST):
                parts.append(e.data)
        return FrameType.WRITES, parts
    if isinstance(msg, PeerBitmap):
        return FrameType.PEER_BITMAP, [
            _BITMAP_HEAD.pack(1 if msg.last else 0, len(msg.runs)),
            *(_RUN.pack(first, count) for first, count in msg.runs),
        ]
    if isinstance(msg, Differs):
        return FrameType.DIFFERS, [
            _COUNT.pack(len(msg.seqs)),
            *(_SEQ.pack(seq) for seq in msg.seqs),
        ]
    if isinstance(msg, Ack):
        return FrameType.ACK, [_ACK.pack(msg.applied_seq, msg.durable_seq, msg.flush_id)]
    if isinstance(msg, Flush):
        return FrameType.FLUSH, [_FLUSH.pack(msg.upto_seq, msg.flush_id)]
    if isinstance(msg, Ping):
        return FrameType.PING, [_PING.pack(msg.nonce, msg.sent_ns)]
    if isinstance(msg, Pong):
        return FrameType.PONG, [_PING.pack(msg.nonce, msg.sent_ns)]
    if isinstance(msg, Hello):
        head = _HELLO.pack(
            msg.proto_min,
            msg.proto_max,
            msg.role,
            msg.mode,
            msg.flags,
            msg.block_size,
            msg.size_bytes,
            msg.volume_id,
            msg.generation,
            msg.applied_seq,
            msg.durable_seq,
        )
        tail = _STRLEN.pack(len(msg.lineage)) + msg.lineage if msg.lineage else b""
        return FrameType.HELLO, [head + _encode_str(msg.node, MAX_NAME_BYTES) + tail]
    if isinstance(msg, Welcome):
        return FrameType.WELCOME, [
            _WELCOME.pack(msg.version, msg.flags, msg.resume_seq, msg.primary_seq)
        ]
    if isinstance(msg, ResyncDone):
        return FrameType.RESYNC_DONE, [
            _RESYNC_DONE.pack(msg.upto_seq) + _STRLEN.pack(len(msg.lineage)) + msg.lineage
        ]
    if isinstance(msg, Refuse):
        return FrameType.REFUSE, [_encode_str(msg.reason, MAX_REASON_BYTES)]
    if isinstance(msg, Bye):
        return FrameType.BYE, [_encode_str(msg.reason, MAX_REASON_BYTES)]
    raise TypeError(f"not a replication message: {msg!r}")


class FrameEncoder:
    """Numbers and checksums outgoing frames. One per connection direction."""

    def __init__(self) -> None:
        self._next_frame_no = 1

    def encode(self, msg: Message) -> bytes:
        """Return the bytes of one frame carrying ``msg``."""
        ftype, parts = encode_payload(msg)
        length = sum(len(p) for p in parts)
        header = bytearray(
            _HEADER.pack(MAGIC, PROTOCOL_VERSION, ftype, 0, length, self._next_frame_no, 0)
        )
        h = xxhash.xxh3_64()
        h.update(header)
        for p in parts:
            h.update(p)
        struct.pack_into(">Q", header, _CHECKSUM_OFFSET, h.intdigest())
        self._next_frame_no += 1
        return b"".join([bytes(header), *parts])


def _decode_writes(payload: memoryview, max_entries: int) -> Writes:
    if len(payload) < 4:
        raise ProtocolError("WRITES: truncated entry count")
    (count,) = _COUNT.unpack_from(payload, 0)
    if count == 0:
        raise ProtocolError("WRITES: empty batch")
    if count > max_entries:
        raise ProtocolError(f"WRITES: {count} entries exceeds the limit of {max_entries}")
    pos = 4
    entries = []
    prev_seq = None
    for _ in range(count):
        if pos + _ENTRY.size > len(payload):
            raise ProtocolError("WRITES: truncated entry header")
        seq, offset, length, kind, flags = _ENTRY.unpack_from(payload, pos)
        pos += _ENTRY.size
        try:
            wkind = WriteKind(kind)
        except ValueError:
            raise ProtocolError(f"WRITES: unknown write kind {kind}") from None
        if flags & ~ENTRY_FLAG_FUA:
            raise ProtocolError(f"WRITES: unknown entry flags {flags:#x}")
        if prev_seq is not None and seq != prev_seq + 1:
            raise ProtocolError(f"WRITES: sequence {seq} does not follow {prev_seq}")
        prev_seq = seq
        data = b""
        nbytes = entry_data_bytes(wkind, length)
        if nbytes:
            if pos + nbytes > len(payload):
                raise ProtocolError("WRITES: truncated write data")
            data = bytes(payload[pos : pos + nbytes])
            pos += nbytes
        entries.append(WriteEntry(seq, wkind, offset, length, bool(flags & ENTRY_FLAG_FUA), data))
    if pos != len(payload):
        raise ProtocolError(f"WRITES: {len(payload) - pos} trailing bytes after the entries")
    return Writes(tuple(entries))


def _exact(payload: memoryview, st: struct.Struct, what: str) -> tuple:
    if len(payload) != st.size:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, expected {st.size}")
    return st.unpack_from(payload, 0)


def decode_payload(
    ftype: int, payload: memoryview, max_entries: int = MAX_BATCH_ENTRIES
) -> Message:
    """Decode one checked payload into a message; raise ProtocolError if malformed."""
    if ftype == FrameType.WRITES:
        return _decode_writes(payload, max_entries)
    if ftype == FrameType.ACK:
        return Ack(*_exact(payload, _ACK, "ACK"))
    if ftype == FrameType.FLUSH:
        return Flush(*_exact(payload, _FLUSH, "FLUSH"))
    if ftype == FrameType.PING:
        return Ping(*_exact(payload, _PING, "PING"))
    if ftype == FrameType.PONG:
        return Pong(*_exact(payload, _PING, "PONG"))
    if ftype == FrameType.HELLO:
        if len(payload) < _HELLO.size:
            raise ProtocolError("HELLO: truncated")
        (pmin, pmax, role, mode, flags, bsize, size, vid, gen, applied, durable) = (
            _HELLO.unpack_from(payload, 0)
        )
        node, end = _decode_str(payload, _HELLO.size, MAX_NAME_BYTES, "HELLO node")
        lineage = b""
        if end != len(payload):
            if end + 2 > len(payload):
                raise ProtocolError("HELLO: truncated lineage length")
            (n,) = _STRLEN.unpack_from(payload, end)
            if n == 0 or n > MAX_LINEAGE_BYTES:
                raise ProtocolError(f"HELLO: lineage of {n} bytes (1..{MAX_LINEAGE_BYTES})")
            if end + 2 + n != len(payload):
                raise ProtocolError("HELLO: truncated lineage or trailing bytes")
            lineage = bytes(payload[end + 2 : end + 2 + n])
        try:
            role_e, mode_e = Role(role), Mode(mode)
        except ValueError:
            raise ProtocolError(f"HELLO: unknown role {role} or mode {mode}") from None
        return Hello(
            pmin,
            pmax,
            role_e,
            mode_e,
            flags,
            bsize,
            size,
            vid,
            gen,
            applied,
            durable,
            node,
            lineage,
        )
    if ftype == FrameType.WELCOME:
        version, flags, resume, primary_seq = _exact(payload, _WELCOME, "WELCOME")
        if flags & ~(WELCOME_FLAG_RESYNC | WELCOME_FLAG_SEND_BITMAP):
            raise ProtocolError(f"WELCOME: unknown flags {flags:#x}")
        return Welcome(version, resume, primary_seq, flags)
    if ftype == FrameType.RESYNC_DONE:
        if len(payload) < _RESYNC_DONE.size + 2:
            raise ProtocolError("RESYNC_DONE: truncated")
        (upto,) = _RESYNC_DONE.unpack_from(payload, 0)
        (n,) = _STRLEN.unpack_from(payload, _RESYNC_DONE.size)
        if n > MAX_LINEAGE_BYTES or _RESYNC_DONE.size + 2 + n != len(payload):
            raise ProtocolError("RESYNC_DONE: bad lineage length")
        return ResyncDone(upto, bytes(payload[_RESYNC_DONE.size + 2 :]))
    if ftype == FrameType.PEER_BITMAP:
        if len(payload) < _BITMAP_HEAD.size:
            raise ProtocolError("PEER_BITMAP: truncated")
        last, count = _BITMAP_HEAD.unpack_from(payload, 0)
        if last > 1:
            raise ProtocolError(f"PEER_BITMAP: unknown flags {last:#x}")
        if count > MAX_BITMAP_RUNS:
            raise ProtocolError(f"PEER_BITMAP: {count} runs exceeds {MAX_BITMAP_RUNS}")
        if len(payload) != _BITMAP_HEAD.size + count * _RUN.size:
            raise ProtocolError("PEER_BITMAP: payload length does not match the count")
        runs = tuple(
            _RUN.unpack_from(payload, _BITMAP_HEAD.size + i * _RUN.size) for i in range(count)
        )
        if any(n == 0 for _, n in runs):
            raise ProtocolError("PEER_BITMAP: empty run")
        return PeerBitmap(runs, bool(last))
    if ftype == FrameType.DIFFERS:
        if len(payload) < _COUNT.size:
            raise ProtocolError("DIFFERS: truncated count")
        (count,) = _COUNT.unpack_from(payload, 0)
        if count > max_entries:
            raise ProtocolError(f"DIFFERS: {count} entries exceeds the limit of {max_entries}")
        if len(payload) != _COUNT.size + count * _SEQ.size:
            raise ProtocolError("DIFFERS: payload length does not match the count")
        seqs = tuple(
            _SEQ.unpack_from(payload, _COUNT.size + i * _SEQ.size)[0] for i in range(count)
        )
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ProtocolError("DIFFERS: sequence numbers not strictly increasing")
        return Differs(seqs)
    if ftype in (FrameType.REFUSE, FrameType.BYE):
        what = FrameType(ftype).name
        reason, end = _decode_str(payload, 0, MAX_REASON_BYTES, what)
        if end != len(payload):
            raise ProtocolError(f"{what}: trailing bytes")
        return Refuse(reason) if ftype == FrameType.REFUSE else Bye(reason)
    raise ProtocolError(f"unknown frame type {ftype}")


class FrameDecoder:
    """Incremental decoder for one connection direction.

    ``receive_data(data)`` buffers bytes (at most one maximal frame plus one
    read), ``next_message()`` returns the next message or ``None`` if more bytes
    are needed. Any violation raises :class:`ProtocolError` and leaves the
    decoder broken: every later call raises the same error.
    """

    def __init__(
        self,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_entries: int = MAX_BATCH_ENTRIES,
    ) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload_bytes
        self._max_entries = max_entries
        self._expected_frame_no = 1
        self._error: ProtocolError | None = None
        self.frames = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def want_more(self) -> bool:
        """True when the buffer holds no complete frame (reading more is safe)."""
        if len(self._buf) < HEADER_BYTES:
            return True
        length = struct.unpack_from(">I", self._buf, 8)[0]
        return len(self._buf) < HEADER_BYTES + length

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def _fail(self, reason: str) -> ProtocolError:
        self._error = ProtocolError(reason)
        self._buf = bytearray()
        return self._error

    def next_message(self) -> Message | None:
        if self._error is not None:
            raise self._error
        if len(self._buf) < HEADER_BYTES:
            return None
        magic, version, ftype, flags, length, frame_no, checksum = _HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise self._fail(f"bad frame magic {magic:#010x} (not a geoclus replication peer?)")
        if version != PROTOCOL_VERSION:
            raise self._fail(f"frame version {version} is not supported (want {PROTOCOL_VERSION})")
        if length > self._max_payload:
            raise self._fail(f"frame of {length} bytes exceeds the {self._max_payload}-byte limit")
        if flags:
            raise self._fail(f"unknown frame flags {flags:#x}")
        if len(self._buf) < HEADER_BYTES + length:
            return None
        view = memoryview(self._buf)
        try:
            h = xxhash.xxh3_64()
            h.update(view[:_CHECKSUM_OFFSET])
            h.update(b"\0" * 8)
            h.update(view[HEADER_BYTES : HEADER_BYTES + length])
            if h.intdigest() != checksum:
                raise self._fail(f"checksum mismatch on frame {frame_no} (corrupted in transit)")
            if frame_no != self._expected_frame_no:
                raise self._fail(
                    f"frame number {frame_no}, expected {self._expected_frame_no} "
                    "(replayed, dropped or reordered frame)"
                )
            try:
                msg = decode_payload(
                    ftype, view[HEADER_BYTES : HEADER_BYTES + length], self._max_entries
                )
            except ProtocolError as exc:
                raise self._fail(exc.reason) from None
        finally:
            view.release()
        del self._buf[: HEADER_BYTES + length]
        self._expected_frame_no += 1
        self.frames += 1
        return msg
