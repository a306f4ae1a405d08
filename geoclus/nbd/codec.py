"""Sans-I/O server side of the NBD protocol (fixed newstyle).

:class:`NbdServerCodec` is a pure state machine: the shell feeds it the bytes it
received (:meth:`~NbdServerCodec.receive_data`), pulls typed events one at a
time (:meth:`~NbdServerCodec.next_event`), sends whatever
:meth:`~NbdServerCodec.data_to_send` returns, and turns the outcome of each
request into bytes with :meth:`~NbdServerCodec.encode_reply` (or
:meth:`~NbdServerCodec.encode_block_status_reply`). It never touches a socket,
a clock or a device.

Option haggling is answered entirely inside the codec (it only needs the export
catalogue, :class:`ExportInfo`); the shell sees one event per option so it can
flush the reply before the next option is parsed. In the transmission phase each
complete request header (plus payload, for ``NBD_CMD_WRITE``) becomes one
request event. Requests the codec can refuse on its own (unknown command,
invalid flags, read-only export, too long, out of range, block status without a
metadata context) become :class:`RejectedRequest` events carrying the NBD error
to reply with.

Negotiated extensions:

* ``NBD_OPT_STRUCTURED_REPLY``: afterwards every reply is structured (reads as
  one ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk, errors as ``NBD_REPLY_TYPE_ERROR``
  with a message, everything else ``NBD_REPLY_TYPE_NONE``), all with
  ``NBD_REPLY_FLAG_DONE``; without it, simple replies.
* ``NBD_OPT_LIST_META_CONTEXT`` / ``NBD_OPT_SET_META_CONTEXT`` with the one
  context we serve, ``base:allocation``; ``NBD_CMD_BLOCK_STATUS`` then becomes a
  :class:`BlockStatusRequest`.
* ``NBD_OPT_STARTTLS`` when the codec is built with ``tls=True`` (the spec's
  FORCEDTLS mode): every other option except ``NBD_OPT_ABORT`` is refused with
  ``NBD_REP_ERR_TLS_REQD`` until the client upgrades; the codec emits
  :class:`StartTls` and the shell runs the TLS handshake before feeding it any
  more (decrypted) bytes.

Bytes that break the protocol raise :class:`~geoclus.errors.ProtocolError`
naming what was wrong; after that the codec is dead (every further call raises
the same error) and nothing from the offending frame has been emitted.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from geoclus.errors import ProtocolError
from geoclus.nbd import proto as p

# --- Limits --------------------------------------------------------------------

# Longest option payload we buffer during haggling. Real options are tiny (an export
# name of at most 4096 bytes plus a few fields); this guards against a client that
# announces a huge option to make us buffer it. Longer options drop the connection
# (the spec allows a hard disconnect for denial of service).
MAX_OPTION_BYTES: Final = 64 * 1024

# Options accepted per handshake. Guards against a client that haggles forever
# (e.g. an endless stream of NBD_OPT_LIST) instead of entering transmission.
MAX_OPTIONS_PER_HANDSHAKE: Final = 1024

# Default largest READ/WRITE payload accepted. The spec's interoperable maximum
# (2^25); bounds the memory one request can make us hold.
DEFAULT_MAX_PAYLOAD_BYTES: Final = p.NBD_DEFAULT_MAX_PAYLOAD_BYTES

# Preferred block size we advertise (NBD_INFO_BLOCK_SIZE), unless the device's
# minimum is larger.
PREFERRED_BLOCK_BYTES: Final = 4096

# Descriptors in one NBD_REPLY_TYPE_BLOCK_STATUS chunk at most (the spec's ceiling is
# 2^20). Bounds the reply (8 bytes each: 32 KiB) and the work one request can ask
# of the device on a badly fragmented store; the spec lets the server cover only a
# prefix of the range, and clients ask again from where the reply stopped.
MAX_BLOCK_STATUS_DESCRIPTORS: Final = 4096

# Longest message carried in a structured error chunk: the spec's string limit.
MAX_ERROR_MESSAGE_BYTES: Final = p.NBD_MAX_STRING_BYTES

# Metadata contexts we serve, by name, with the id NBD_OPT_SET_META_CONTEXT gives
# them (ids are per connection; a constant is allowed). Only base:allocation.
META_CONTEXT_IDS: Final[Mapping[str, int]] = {p.NBD_CONTEXT_BASE_ALLOCATION: 1}

_U64_LIMIT: Final = 1 << 64

_OPT_REPLY_MAGIC_BYTES: Final = struct.pack(">Q", p.NBD_OPT_REPLY_MAGIC)


# --- Export description -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export.

    ``block_size_bytes`` is the device's minimum I/O size (advertised as the
    minimum block size). Raises ``ValueError`` if the size is negative or does not
    fit 64 bits, or the block size is not a power of two in ``[1, 65536]``.
    """

    size_bytes: int
    block_size_bytes: int = 512
    read_only: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.size_bytes < _U64_LIMIT:
            raise ValueError(f"export size {self.size_bytes} does not fit in 64 bits")
        bs = self.block_size_bytes
        if bs < 1 or bs & (bs - 1) or bs > p.NBD_MAX_MINIMUM_BLOCK_BYTES:
            raise ValueError(
                f"block size {bs} must be a power of two between 1 and "
                f"{p.NBD_MAX_MINIMUM_BLOCK_BYTES} bytes"
            )

    @property
    def transmission_flags(self) -> int:
        """The 16-bit transmission flags advertised for this export (before any
        negotiated extension: see :meth:`NbdServerCodec.transmission_flags`).

        ``NBD_FLAG_CAN_MULTI_CONN`` is always set: a
        :class:`~replicator.device.BlockDevice`'s flush covers every write
        completed before it on any connection, and it has no per-connection
        cache, so a client may spread its requests over several connections.
        """
        flags = (
            p.NBD_FLAG_HAS_FLAGS
            | p.NBD_FLAG_SEND_FLUSH
            | p.NBD_FLAG_SEND_FUA
            | p.NBD_FLAG_SEND_TRIM
            | p.NBD_FLAG_SEND_WRITE_ZEROES
            | p.NBD_FLAG_CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= p.NBD_FLAG_READ_ONLY
        return flags


# --- Events -----------------------------------------------------------------------


class NeedData:
    """Sentinel type: the codec needs more bytes before it can emit an event."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was answered inside the codec; flush :meth:`data_to_send` now.

    ``reply_type`` is the final reply sent (``NBD_REP_ACK`` or an error).
    """

    option: int
    reply_type: int


@dataclass(frozen=True, slots=True)
class ExportSelected:
    """The handshake ended; transmission on export ``name`` starts after the bytes
    in :meth:`data_to_send` (the final handshake reply) are sent."""

    name: str
    export: ExportInfo


@dataclass(frozen=True, slots=True)
class HandshakeAborted:
    """The client sent ``NBD_OPT_ABORT``; send the ACK, then close."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """The client sent ``NBD_OPT_STARTTLS`` and the codec acknowledged it: send
    :meth:`NbdServerCodec.data_to_send` (the ACK) in clear text, then run the
    server side of the TLS handshake. Every later byte in both directions is TLS
    application data: feed the codec the decrypted bytes. If the handshake fails,
    close the connection (the spec allows no way back to clear text)."""


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client closed its side at a message boundary (no partial frame)."""


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """``NBD_CMD_READ`` that passed the codec's checks (flags, range, payload limit)."""

    command: ClassVar[int] = p.NBD_CMD_READ
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """``NBD_CMD_WRITE`` with its complete payload, checks passed."""

    command: ClassVar[int] = p.NBD_CMD_WRITE
    cookie: int
    offset: int
    data: bytes
    fua: bool


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """``NBD_CMD_FLUSH``."""

    command: ClassVar[int] = p.NBD_CMD_FLUSH
    cookie: int


@dataclass(frozen=True, slots=True)
class TrimRequest:
    """``NBD_CMD_TRIM`` that passed the codec's checks."""

    command: ClassVar[int] = p.NBD_CMD_TRIM
    cookie: int
    offset: int
    length: int
    fua: bool


@dataclass(frozen=True, slots=True)
class WriteZeroesRequest:
    """``NBD_CMD_WRITE_ZEROES`` that passed the codec's checks."""

    command: ClassVar[int] = p.NBD_CMD_WRITE_ZEROES
    cookie: int
    offset: int
    length: int
    fua: bool
    no_hole: bool


@dataclass(frozen=True, slots=True)
class BlockStatusRequest:
    """``NBD_CMD_BLOCK_STATUS`` on a connection with a metadata context selected,
    checks passed (``length`` is positive and the range lies inside the export).

    Answer with :meth:`NbdServerCodec.encode_block_status_reply`. ``req_one``
    is ``NBD_CMD_FLAG_REQ_ONE``: the reply then carries exactly one extent.
    """

    command: ClassVar[int] = p.NBD_CMD_BLOCK_STATUS
    cookie: int
    offset: int
    length: int
    req_one: bool


@dataclass(frozen=True, slots=True)
class DisconnectRequest:
    """``NBD_CMD_DISC``: finish in-flight requests, then close. No reply."""

    command: ClassVar[int] = p.NBD_CMD_DISC
    cookie: int


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    """A well-framed request the codec refuses; reply ``error`` (an ``NBD_E*`` value)
    without touching the device. ``reason`` is for logs."""

    command: int
    cookie: int
    error: int
    reason: str


DeviceRequest = (
    ReadRequest
    | WriteRequest
    | FlushRequest
    | TrimRequest
    | WriteZeroesRequest
    | BlockStatusRequest
)
RequestEvent = DeviceRequest | DisconnectRequest | RejectedRequest
HandshakeEvent = OptionHandled | ExportSelected | HandshakeAborted | StartTls
Event = HandshakeEvent | RequestEvent | ClientClosed


class Phase(enum.Enum):
    """Where the codec is in the connection's life."""

    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    DONE = "done"
    ERROR = "error"


# Command flags each supported command accepts. FUA is valid on every command once
# NBD_FLAG_SEND_FUA is advertised (the spec says the server MUST accept it).
# NBD_CMD_FLAG_DF on reads is added once structured replies are negotiated (we
# always answer a read with one data chunk, so "don't fragment" holds anyway).
_ALLOWED_FLAGS: Final[dict[int, int]] = {
    p.NBD_CMD_READ: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_FLUSH: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_TRIM: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_NO_HOLE,
    p.NBD_CMD_BLOCK_STATUS: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_REQ_ONE,
}
_MODIFYING: Final = frozenset({p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES})
# The only options FORCEDTLS accepts before the upgrade (spec, "FORCEDTLS mode").
_OPTIONS_BEFORE_TLS: Final = frozenset({p.NBD_OPT_STARTTLS, p.NBD_OPT_ABORT})
# Past-the-end writes answer ENOSPC, past-the-end reads/trims EINVAL (spec, "Error values").
_PAST_END_ERROR: Final[dict[int, int]] = {
    p.NBD_CMD_READ: p.NBD_EINVAL,
    p.NBD_CMD_TRIM: p.NBD_EINVAL,
    p.NBD_CMD_BLOCK_STATUS: p.NBD_EINVAL,
    p.NBD_CMD_WRITE: p.NBD_ENOSPC,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_ENOSPC,
}

_REQ_SIZE: Final = p.REQUEST_HEADER.size
_OPT_HEADER_SIZE: Final = p.OPTION_HEADER.size


def _command_name(command: int) -> str:
    return p.COMMAND_NAMES.get(command, f"command {command}")


def _option_name(option: int) -> str:
    return p.OPTION_NAMES.get(option, f"option {option}")


def encode_simple_reply(cookie: int, error: int = p.NBD_SUCCESS) -> bytes:
    """Encode a 16-byte simple reply header. Raises ``struct.error`` only for
    out-of-range arguments (a caller bug, never client input)."""
    return p.SIMPLE_REPLY_HEADER.pack(p.NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """Encode one option-haggling reply (header + data)."""
    return p.OPTION_REPLY_HEADER.pack(p.NBD_OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


def _chunk_header(cookie: int, reply_type: int, payload_bytes: int, done: bool) -> bytes:
    flags = p.NBD_REPLY_FLAG_DONE if done else 0
    return p.STRUCTURED_REPLY_HEADER.pack(
        p.NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, payload_bytes
    )


def encode_none_chunk(cookie: int) -> bytes:
    """Encode ``NBD_REPLY_TYPE_NONE``: the final chunk of a successful reply
    with no payload (it always carries ``NBD_REPLY_FLAG_DONE``)."""
    return _chunk_header(cookie, p.NBD_REPLY_TYPE_NONE, 0, done=True)


def encode_offset_data_chunk(
    cookie: int, offset: int, data: bytes | bytearray, *, done: bool = True
) -> tuple[bytes, bytes | bytearray]:
    """Encode ``NBD_REPLY_TYPE_OFFSET_DATA`` for ``data`` read at ``offset``.

    Returns the buffers to send in order: the header with the offset, then
    ``data`` itself (not copied). Raises ``ValueError`` for empty data (the spec
    requires at least one byte; answer an empty read with
    :func:`encode_none_chunk`) or data whose chunk length does not fit 32 bits.
    """
    n = len(data)
    if not 0 < n <= 0xFFFFFFFF - 8:
        raise ValueError(f"an OFFSET_DATA chunk carries 1 to 2^32-9 bytes, not {n}")
    header = _chunk_header(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, 8 + n, done)
    return header + struct.pack(">Q", offset), data


def encode_offset_hole_chunk(
    cookie: int, offset: int, hole_bytes: int, *, done: bool = True
) -> bytes:
    """Encode ``NBD_REPLY_TYPE_OFFSET_HOLE``: ``hole_bytes`` at ``offset`` read
    as zeros. Raises ``ValueError`` unless ``hole_bytes`` is in ``[1, 2^32)``."""
    if not 0 < hole_bytes <= 0xFFFFFFFF:
        raise ValueError(f"a hole chunk covers 1 to 2^32-1 bytes, not {hole_bytes}")
    header = _chunk_header(cookie, p.NBD_REPLY_TYPE_OFFSET_HOLE, 12, done)
    return header + struct.pack(">QI", offset, hole_bytes)


def _message_bytes(message: str) -> bytes:
    """``message`` as UTF-8, cut to the spec's string limit on a character boundary."""
    raw = message.encode("utf-8", errors="replace")
    if len(raw) <= MAX_ERROR_MESSAGE_BYTES:
        return raw
    return raw[:MAX_ERROR_MESSAGE_BYTES].decode("utf-8", errors="ignore").encode("utf-8")


def encode_error_chunk(
    cookie: int, error: int, message: str = "", *, offset: int | None = None, done: bool = True
) -> bytes:
    """Encode an error chunk: ``NBD_REPLY_TYPE_ERROR``, or
    ``NBD_REPLY_TYPE_ERROR_OFFSET`` when ``offset`` (inside the request) is given.

    ``message`` is for a human; it is cut to 4096 bytes. Raises ``ValueError``
    for ``error == 0`` (an error chunk must carry an error).
    """
    if not 0 < error <= 0xFFFFFFFF:
        raise ValueError(f"an error chunk needs a nonzero 32-bit error, not {error}")
    raw = _message_bytes(message)
    payload = p.ERROR_CHUNK_START.pack(error, len(raw)) + raw
    if offset is None:
        reply_type = p.NBD_REPLY_TYPE_ERROR
    else:
        reply_type = p.NBD_REPLY_TYPE_ERROR_OFFSET
        payload += struct.pack(">Q", offset)
    return _chunk_header(cookie, reply_type, len(payload), done) + payload


def encode_block_status_chunk(
    cookie: int, context_id: int, descriptors: list[tuple[int, int]], *, done: bool = True
) -> bytes:
    """Encode ``NBD_REPLY_TYPE_BLOCK_STATUS`` for one metadata context.

    ``descriptors`` are ``(length, flags)`` pairs, consecutive from the request's
    offset. Raises ``ValueError`` if there are none or more than the spec's 2^20,
    or a length is not in ``[1, 2^32)``, or flags do not fit 32 bits.
    """
    if not 0 < len(descriptors) <= p.NBD_MAX_BLOCK_STATUS_DESCRIPTORS:
        raise ValueError(
            f"a block status chunk carries 1 to 2^20 descriptors, not {len(descriptors)}"
        )
    parts = [struct.pack(">I", context_id)]
    pack = p.BLOCK_DESCRIPTOR.pack
    for length, flags in descriptors:
        if not 0 < length <= 0xFFFFFFFF or not 0 <= flags <= 0xFFFFFFFF:
            raise ValueError(f"invalid block status descriptor ({length}, {flags})")
        parts.append(pack(length, flags))
    payload = b"".join(parts)
    return _chunk_header(cookie, p.NBD_REPLY_TYPE_BLOCK_STATUS, len(payload), done) + payload


def block_status_descriptors(
    extents: list[tuple[int, int]],
    length: int,
    *,
    req_one: bool = False,
    max_descriptors: int = MAX_BLOCK_STATUS_DESCRIPTORS,
) -> list[tuple[int, int]]:
    """Turn a device's extents into ``base:allocation`` descriptors for a request
    of ``length`` bytes.

    Extents are ``(length, flags)`` from the request's offset (see
    :class:`~replicator.device.SupportsBlockStatus`). The result covers a prefix
    of the request (never beyond it): flags are masked to ``NBD_STATE_HOLE |
    NBD_STATE_ZERO``, neighbours with equal flags are merged, at most
    ``max_descriptors`` are kept (exactly one with ``req_one``). Raises
    ``ValueError`` if ``length`` is not positive or the extents are empty or hold
    a length that is not positive (a device bug; the shell answers ``NBD_EIO``).
    """
    if length <= 0:
        raise ValueError(f"block status of {length} bytes")
    if max_descriptors < 1:
        raise ValueError("max_descriptors must be at least 1")
    if req_one:
        max_descriptors = 1
    out: list[tuple[int, int]] = []
    covered = 0
    mask = p.NBD_STATE_HOLE | p.NBD_STATE_ZERO
    for extent_length, flags in extents:
        if extent_length <= 0:
            raise ValueError(f"device reported an extent of {extent_length} bytes")
        n = min(extent_length, length - covered)
        flags &= mask
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        elif len(out) == max_descriptors:
            break
        else:
            out.append((n, flags))
        covered += n
        if covered == length:
            break
    if not out:
        raise ValueError("device reported no extents")
    return out


def _quote(name: str) -> str:
    """``repr`` of a client-chosen name, cut so error messages stay short."""
    return repr(name) if len(name) <= 64 else repr(name[:64]) + "..."


def _decode_name(raw: bytes) -> str | None:
    """Return ``raw`` as an NBD string, or None if it is not one (too long, not
    UTF-8, contains NUL)."""
    if len(raw) > p.NBD_MAX_STRING_BYTES or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_meta_context_option(data: bytes) -> tuple[str, list[str]] | str:
    """Parse the data of NBD_OPT_{LIST,SET}_META_CONTEXT: export name, then
    queries. Returns ``(name, queries)`` or, if the data is malformed, a string
    saying what is wrong (the option is then refused with NBD_REP_ERR_INVALID).
    The loop is bounded by the option's length (every query takes 4+ bytes)."""
    size = len(data)
    if size < 8:
        return "data is too short"
    (name_len,) = struct.unpack_from(">I", data, 0)
    if name_len > size - 8:
        return f"name length {name_len} overruns the option"
    name = _decode_name(data[4 : 4 + name_len])
    if name is None:
        return "export name invalid"
    pos = 4 + name_len
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if count > (size - pos) // 4:
        return f"{count} queries do not fit in the option"
    queries = []
    for _ in range(count):
        if size - pos < 4:
            return "query length overruns the option"
        (query_len,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if query_len > size - pos:
            return f"query length {query_len} overruns the option"
        query = _decode_name(data[pos : pos + query_len])
        pos += query_len
        if query is None:
            return "query is not a valid string"
        namespace, colon, _leaf = query.partition(":")
        if not colon or not namespace:
            return f"query {_quote(query)} does not start with a namespace and a colon"
        queries.append(query)
    if pos != size:
        return f"{size - pos} bytes after the last query"
    return name, queries


def _match_meta_query(query: str, *, listing: bool) -> list[str]:
    """Context names a well-formed query selects. Only the ``base`` namespace is
    ours; queries in other namespaces match nothing (the spec: ignore them).
    ``base:`` alone is a wildcard when listing and selects nothing when setting;
    an unknown leaf name is ignored."""
    namespace, _colon, leaf = query.partition(":")
    if namespace != p.NBD_META_NS_BASE:
        return []
    if not leaf:
        return list(META_CONTEXT_IDS) if listing else []
    return [query] if query in META_CONTEXT_IDS else []


class NbdServerCodec:
    """Server side of one NBD connection, from greeting to disconnect.

    Usage: send :meth:`data_to_send` (the greeting is queued at construction);
    loop on :meth:`next_event`; on :data:`NEED_DATA` receive bytes and pass them to
    :meth:`receive_data` (``b""`` for end of stream); after every handshake event
    send :meth:`data_to_send` again.

    ``exports`` is the catalogue offered (an empty name from the client selects
    ``default_export``); ``max_payload_bytes`` bounds READ/WRITE payloads and is
    advertised; ``max_option_bytes`` and ``max_options`` bound option haggling
    (see the module constants). With ``tls`` the connection runs in the spec's
    FORCEDTLS mode: nothing but ``NBD_OPT_STARTTLS`` and ``NBD_OPT_ABORT`` is
    accepted before the client upgrades (the shell must then handle
    :class:`StartTls`); without it ``NBD_OPT_STARTTLS`` is refused with
    ``NBD_REP_ERR_POLICY``.

    Guarantees: events are emitted only for complete, validated frames; the codec
    buffers at most one frame (option data up to ``max_option_bytes``, or one WRITE
    payload up to ``max_payload_bytes``) plus the bytes of one ``receive_data``
    call, provided the shell calls ``receive_data`` only after ``NEED_DATA``.

    Raises :class:`~geoclus.errors.ProtocolError` (from ``next_event`` or
    ``receive_data``) when the client breaks the protocol; ``ValueError`` at
    construction for a bad configuration.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        default_export: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_option_bytes: int = MAX_OPTION_BYTES,
        max_options: int = MAX_OPTIONS_PER_HANDSHAKE,
        tls: bool = False,
    ) -> None:
        if default_export is not None and default_export not in exports:
            raise ValueError(f"default export {default_export!r} is not one of the exports")
        if not PREFERRED_BLOCK_BYTES <= max_payload_bytes <= 0xFFFFFFFF:
            raise ValueError(
                f"max_payload_bytes {max_payload_bytes} must be between "
                f"{PREFERRED_BLOCK_BYTES} and 2^32-1"
            )
        for name, export in exports.items():
            if max_payload_bytes < export.block_size_bytes:
                raise ValueError(
                    f"max_payload_bytes {max_payload_bytes} is smaller than the block size "
                    f"{export.block_size_bytes} of export {name!r}"
                )
        if max_option_bytes < p.NBD_MAX_STRING_BYTES + 6:
            raise ValueError(f"max_option_bytes {max_option_bytes} is too small for a name")
        self._exports = dict(exports)
        self._default_export = default_export
        self._max_payload_bytes = max_payload_bytes
        self._max_option_bytes = max_option_bytes
        self._max_options = max_options
        # Writes larger than the advertised maximum but within the spec's "never a
        # DoS" bound are skipped (not buffered) and answered EINVAL; anything larger
        # drops the connection.
        self._max_skippable_bytes = max(max_payload_bytes, p.NBD_DEFAULT_MAX_PAYLOAD_BYTES)

        self._phase = Phase.CLIENT_FLAGS
        self._error: str | None = None
        self._buf = bytearray()
        self._eof = False
        self._out = bytearray(
            p.GREETING.pack(
                p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
            )
        )
        self._no_zeroes = False
        self._options_seen = 0
        self._export_name: str | None = None
        self._export: ExportInfo | None = None
        # FORCEDTLS: offered at all, and upgraded on this connection yet.
        self._tls_offered = tls
        self._tls_active = False
        self._structured_replies = False  # negotiated by NBD_OPT_STRUCTURED_REPLY
        # The last NBD_OPT_SET_META_CONTEXT: the canonical export it named and the
        # context ids it selected. It applies only if the same export is entered.
        self._meta_export: str | None = None
        self._meta_ids: tuple[int, ...] = ()
        # Context ids in force during transmission (empty: BLOCK_STATUS refused).
        self._active_ids: tuple[int, ...] = ()

        # A WRITE whose header was parsed but whose payload is still arriving.
        # _pending is (cookie, offset, length, flags, rejection-or-None).
        self._pending: tuple[int, int, int, int, tuple[int, str] | None] | None = None
        self._payload_chunks: list[bytes] = []
        self._payload_remaining = 0

        # Every option we answer; anything else gets NBD_REP_ERR_UNSUP.
        self._option_handlers: dict[int, Callable[[int, bytes], Event]] = {
            p.NBD_OPT_EXPORT_NAME: self._opt_export_name,
            p.NBD_OPT_ABORT: self._opt_abort,
            p.NBD_OPT_LIST: self._opt_list,
            p.NBD_OPT_STARTTLS: self._opt_starttls,
            p.NBD_OPT_INFO: self._opt_info_or_go,
            p.NBD_OPT_GO: self._opt_info_or_go,
            p.NBD_OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            p.NBD_OPT_LIST_META_CONTEXT: self._opt_meta_context,
            p.NBD_OPT_SET_META_CONTEXT: self._opt_meta_context,
        }

    # --- public state ----------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """Current phase."""
        return self._phase

    @property
    def export_name(self) -> str | None:
        """Canonical name of the selected export once transmission started."""
        return self._export_name

    @property
    def export(self) -> ExportInfo | None:
        """The selected export once transmission started."""
        return self._export

    @property
    def max_payload_bytes(self) -> int:
        """Largest READ/WRITE payload accepted (advertised in NBD_INFO_BLOCK_SIZE)."""
        return self._max_payload_bytes

    @property
    def tls_active(self) -> bool:
        """True once ``NBD_OPT_STARTTLS`` was acknowledged on this connection."""
        return self._tls_active

    @property
    def structured_replies(self) -> bool:
        """True once ``NBD_OPT_STRUCTURED_REPLY`` was acknowledged (and not reset
        by a later ``NBD_OPT_STARTTLS``)."""
        return self._structured_replies

    @property
    def meta_contexts(self) -> tuple[int, ...]:
        """Metadata context ids in force for ``NBD_CMD_BLOCK_STATUS`` (empty until
        transmission starts on the export the last ``NBD_OPT_SET_META_CONTEXT``
        named)."""
        return self._active_ids

    def transmission_flags(self, export: ExportInfo) -> int:
        """The transmission flags sent for ``export`` on this connection: the
        export's own, plus ``NBD_FLAG_SEND_DF`` once structured replies are
        negotiated (the spec forbids it before)."""
        flags = export.transmission_flags
        if self._structured_replies:
            flags |= p.NBD_FLAG_SEND_DF
        return flags

    # --- I/O-facing API ----------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return (and forget) the handshake bytes queued for the client."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client; ``b""`` means end of stream.

        Raises ``ProtocolError`` if the codec already failed, ``RuntimeError`` if
        data arrives after end of stream (a shell bug).
        """
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._eof:
            raise RuntimeError("receive_data called after end of stream")
        if not data:
            self._eof = True
            return
        if self._payload_remaining:
            # Route payload straight into the pending WRITE: no copy for a chunk
            # that is entirely payload.
            n = len(data)
            need = self._payload_remaining
            if n <= need:
                if self._pending is not None and self._pending[4] is None:
                    self._payload_chunks.append(data if type(data) is bytes else bytes(data))
                self._payload_remaining = need - n
                return
            with memoryview(data) as mv:
                if self._pending is not None and self._pending[4] is None:
                    self._payload_chunks.append(bytes(mv[:need]))
                self._payload_remaining = 0
                self._buf += mv[need:]
            return
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """Parse the next event from buffered bytes, or return :data:`NEED_DATA`.

        Raises ``ProtocolError`` if the buffered bytes break the protocol.
        """
        if self._error is not None:
            raise ProtocolError(self._error)
        try:
            while True:
                phase = self._phase
                if phase is Phase.TRANSMISSION:
                    return self._next_request()
                if phase is Phase.CLIENT_FLAGS or phase is Phase.OPTIONS:
                    event = self._next_handshake_step()
                    if event is not None:
                        return event
                    continue
                return self._next_after_done()
        except ProtocolError as exc:
            self._fail(exc.reason)
            raise

    def encode_reply(
        self,
        request: RequestEvent,
        error: int = p.NBD_SUCCESS,
        data: bytes | bytearray | None = None,
        message: str = "",
    ) -> tuple[bytes | bytearray, ...]:
        """Return the buffers that answer ``request``; send them in order with no
        other bytes in between.

        Simple replies (header, then data for a successful READ) unless structured
        replies were negotiated; then a successful READ is one
        ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk (header, data), an error is one
        ``NBD_REPLY_TYPE_ERROR`` chunk carrying ``message`` (by default a
        :class:`RejectedRequest`'s reason), anything else ``NBD_REPLY_TYPE_NONE``;
        every chunk has ``NBD_REPLY_FLAG_DONE``.

        The caller guarantees a successful READ's ``data`` is exactly the requested
        length; it is one of the buffers returned, not copied (a bytearray must
        not change until it is sent). Raises ``ValueError`` for a reply to
        ``NBD_CMD_DISC`` (it has none) and for a successful
        :class:`BlockStatusRequest` (use :meth:`encode_block_status_reply`).
        """
        command = request.command
        if command == p.NBD_CMD_DISC:
            raise ValueError("NBD_CMD_DISC has no reply")
        if not error and isinstance(request, BlockStatusRequest):
            raise ValueError("a successful block status reply needs encode_block_status_reply")
        cookie = request.cookie
        if not self._structured_replies:
            header = p.SIMPLE_REPLY_HEADER.pack(p.NBD_SIMPLE_REPLY_MAGIC, error, cookie)
            if error or data is None:
                return (header,)
            return (header, data)
        if error:
            if not message and isinstance(request, RejectedRequest):
                message = request.reason
            return (encode_error_chunk(cookie, error, message),)
        if data and isinstance(request, ReadRequest):
            return encode_offset_data_chunk(cookie, request.offset, data)
        return (encode_none_chunk(cookie),)

    def encode_block_status_reply(
        self, request: BlockStatusRequest, extents: list[tuple[int, int]]
    ) -> tuple[bytes, ...]:
        """Return the structured reply to a successful ``NBD_CMD_BLOCK_STATUS``:
        one ``NBD_REPLY_TYPE_BLOCK_STATUS`` chunk per selected context (the last
        with ``NBD_REPLY_FLAG_DONE``), built from the device's ``extents`` by
        :func:`block_status_descriptors` (a prefix of the request, at most
        :data:`MAX_BLOCK_STATUS_DESCRIPTORS`, one with ``NBD_CMD_FLAG_REQ_ONE``).

        Raises ``ValueError`` if the extents are invalid (see
        :func:`block_status_descriptors`).
        """
        descriptors = block_status_descriptors(extents, request.length, req_one=request.req_one)
        ids = self._active_ids
        assert ids, "BlockStatusRequest is only emitted with a context selected"
        return tuple(
            encode_block_status_chunk(
                request.cookie, context_id, descriptors, done=i == len(ids) - 1
            )
            for i, context_id in enumerate(ids)
        )

    # --- internals -----------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self._phase = Phase.ERROR
        self._error = reason
        self._buf = bytearray()
        self._payload_chunks = []
        self._payload_remaining = 0
        self._pending = None

    def _take(self, n: int) -> bytes:
        """Remove and return the first ``n`` buffered bytes (one copy)."""
        with memoryview(self._buf) as mv:
            out = bytes(mv[:n])
        del self._buf[:n]
        return out

    def _short(self, needed: int, what: str) -> NeedData | ClientClosed:
        """Fewer than ``needed`` bytes are buffered for ``what``: wait, report a clean
        close, or fail on a stream cut mid-frame."""
        if not self._eof:
            return NEED_DATA
        if not self._buf:
            self._phase = Phase.DONE
            return ClientClosed()
        raise ProtocolError(
            f"connection closed in the middle of {what} ({len(self._buf)} of {needed} bytes)"
        )

    def _next_after_done(self) -> NeedData | ClientClosed:
        if self._buf:
            raise ProtocolError(
                f"client sent {len(self._buf)} bytes after ending the session "
                "(NBD_OPT_ABORT or NBD_CMD_DISC)"
            )
        if self._eof:
            return ClientClosed()
        return NEED_DATA

    # handshake ------------------------------------------------------------------

    def _next_handshake_step(self) -> Event | NeedData | None:
        """One handshake step: an event, NEED_DATA, or None to keep going."""
        buf = self._buf
        if self._phase is Phase.CLIENT_FLAGS:
            if len(buf) < 4:
                return self._short(4, "the client flags")
            (flags,) = p.CLIENT_FLAGS.unpack_from(buf, 0)
            known = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES
            if flags & ~known:
                raise ProtocolError(
                    f"client flags 0x{flags:08x} set bits this server never offered"
                )
            if not flags & p.NBD_FLAG_C_FIXED_NEWSTYLE:
                raise ProtocolError(
                    "client did not set NBD_FLAG_C_FIXED_NEWSTYLE; only fixed newstyle "
                    "negotiation is supported"
                )
            del buf[:4]
            self._no_zeroes = bool(flags & p.NBD_FLAG_C_NO_ZEROES)
            self._phase = Phase.OPTIONS
            return None

        if len(buf) < _OPT_HEADER_SIZE:
            return self._short(_OPT_HEADER_SIZE, "an option header")
        magic, option, length = p.OPTION_HEADER.unpack_from(buf, 0)
        if magic != p.IHAVEOPT:
            raise ProtocolError(f"option magic 0x{magic:016x} is not IHAVEOPT")
        if length > self._max_option_bytes:
            raise ProtocolError(
                f"{_option_name(option)} carries {length} bytes of data, more than the "
                f"{self._max_option_bytes}-byte limit"
            )
        if len(buf) < _OPT_HEADER_SIZE + length:
            if self._eof:
                raise ProtocolError(
                    f"connection closed in the middle of {_option_name(option)} "
                    f"({len(buf)} of {_OPT_HEADER_SIZE + length} bytes)"
                )
            return NEED_DATA
        self._options_seen += 1
        if self._options_seen > self._max_options:
            raise ProtocolError(f"client sent more than {self._max_options} options")
        del buf[:_OPT_HEADER_SIZE]
        data = self._take(length)
        if self._tls_offered and not self._tls_active and option not in _OPTIONS_BEFORE_TLS:
            return self._opt_before_tls(option, data)
        handler = self._option_handlers.get(option, self._opt_unsupported)
        return handler(option, data)

    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        out = self._out
        out += _OPT_REPLY_MAGIC_BYTES
        out += struct.pack(">III", option, reply_type, len(data))
        out += data

    def _error_reply(self, option: int, reply_type: int, message: str) -> OptionHandled:
        self._reply(option, reply_type, message.encode("utf-8"))
        return OptionHandled(option, reply_type)

    def _resolve(self, name: str) -> tuple[str, ExportInfo] | None:
        if name == "" and self._default_export is not None:
            name = self._default_export
        export = self._exports.get(name)
        if export is None:
            return None
        return name, export

    def _opt_unsupported(self, option: int, data: bytes) -> Event:
        return self._error_reply(
            option, p.NBD_REP_ERR_UNSUP, f"{_option_name(option)} is not supported by this server"
        )

    def _opt_before_tls(self, option: int, data: bytes) -> Event:
        """FORCEDTLS: any option but STARTTLS/ABORT before the upgrade."""
        if option == p.NBD_OPT_EXPORT_NAME:
            # It cannot be refused, so the spec says terminate the session.
            raise ProtocolError(
                "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on an export that requires TLS"
            )
        return self._error_reply(
            option,
            p.NBD_REP_ERR_TLS_REQD,
            f"this server requires TLS: send NBD_OPT_STARTTLS before {_option_name(option)}",
        )

    def _opt_starttls(self, option: int, data: bytes) -> Event:
        if not self._tls_offered:
            return self._error_reply(
                option, p.NBD_REP_ERR_POLICY, "TLS is not enabled on this export (export.tls)"
            )
        if data:
            return self._error_reply(
                option, p.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"
            )
        if self._tls_active:
            return self._error_reply(option, p.NBD_REP_ERR_INVALID, "TLS is already active")
        if self._buf:
            # The client must wait for our ACK before its TLS handshake; bytes
            # already here are neither NBD options nor ours to hand to TLS.
            raise ProtocolError(
                f"client sent {len(self._buf)} bytes after NBD_OPT_STARTTLS before the reply"
            )
        # The spec: nothing negotiated before STARTTLS survives it. In FORCEDTLS
        # nothing else was accepted before, so there is nothing to drop.
        assert not self._structured_replies and self._meta_export is None
        self._reply(option, p.NBD_REP_ACK)
        self._tls_active = True
        return StartTls()

    def _opt_structured_reply(self, option: int, data: bytes) -> Event:
        if data:
            return self._error_reply(
                option, p.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"
            )
        if self._structured_replies:
            return self._error_reply(
                option, p.NBD_REP_ERR_INVALID, "structured replies are already negotiated"
            )
        self._structured_replies = True
        self._reply(option, p.NBD_REP_ACK)
        return OptionHandled(option, p.NBD_REP_ACK)

    def _opt_meta_context(self, option: int, data: bytes) -> Event:
        """NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT (same format)."""
        setting = option == p.NBD_OPT_SET_META_CONTEXT
        if setting:
            # The spec: SET replaces the selection even when it fails.
            self._meta_export = None
            self._meta_ids = ()
        what = _option_name(option)
        if not self._structured_replies:
            return self._error_reply(
                option, p.NBD_REP_ERR_INVALID, f"{what} needs NBD_OPT_STRUCTURED_REPLY first"
            )
        parsed = _parse_meta_context_option(data)
        if isinstance(parsed, str):
            return self._error_reply(option, p.NBD_REP_ERR_INVALID, f"{what}: {parsed}")
        name, queries = parsed
        found = self._resolve(name)
        if found is None:
            return self._error_reply(
                option, p.NBD_REP_ERR_UNKNOWN, f"export {_quote(name)} does not exist"
            )
        canonical = found[0]
        if queries:
            selected: dict[str, None] = {}  # ordered, without duplicates
            for query in queries:
                selected.update(dict.fromkeys(_match_meta_query(query, listing=not setting)))
            names = list(selected)
        else:
            # No query: LIST returns everything, SET selects nothing.
            names = [] if setting else list(META_CONTEXT_IDS)
        for context in names:
            # LIST replies carry id 0 (the spec reserves it there).
            context_id = META_CONTEXT_IDS[context] if setting else 0
            self._reply(
                option, p.NBD_REP_META_CONTEXT, struct.pack(">I", context_id) + context.encode()
            )
        if setting:
            self._meta_export = canonical
            self._meta_ids = tuple(META_CONTEXT_IDS[c] for c in names)
        self._reply(option, p.NBD_REP_ACK)
        return OptionHandled(option, p.NBD_REP_ACK)

    def _opt_export_name(self, option: int, data: bytes) -> Event:
        name = _decode_name(data)
        if name is None:
            raise ProtocolError("NBD_OPT_EXPORT_NAME carries an invalid export name")
        found = self._resolve(name)
        if found is None:
            # The spec leaves no way to refuse NBD_OPT_EXPORT_NAME but to close.
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME asked for unknown export {_quote(name)}")
        canonical, export = found
        self._out += p.EXPORT_NAME_REPLY.pack(export.size_bytes, self.transmission_flags(export))
        if not self._no_zeroes:
            self._out += bytes(p.NBD_EXPORT_NAME_ZEROES)
        return self._enter_transmission(canonical, export)

    def _opt_abort(self, option: int, data: bytes) -> Event:
        # The spec: reply ACK; ignore any data the client sent with it.
        self._reply(option, p.NBD_REP_ACK)
        self._phase = Phase.DONE
        return HandshakeAborted()

    def _opt_list(self, option: int, data: bytes) -> Event:
        if data:
            return self._error_reply(option, p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        for name in self._exports:
            raw = name.encode("utf-8")
            self._reply(option, p.NBD_REP_SERVER, struct.pack(">I", len(raw)) + raw)
        self._reply(option, p.NBD_REP_ACK)
        return OptionHandled(option, p.NBD_REP_ACK)

    def _opt_info_or_go(self, option: int, data: bytes) -> Event:
        what = _option_name(option)
        if len(data) < 6:
            return self._error_reply(option, p.NBD_REP_ERR_INVALID, f"{what} data is too short")
        (name_len,) = struct.unpack_from(">I", data, 0)
        if name_len > len(data) - 6:
            return self._error_reply(
                option, p.NBD_REP_ERR_INVALID, f"{what} name length {name_len} overruns the option"
            )
        (n_requests,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * n_requests:
            return self._error_reply(
                option,
                p.NBD_REP_ERR_INVALID,
                f"{what} length {len(data)} does not match {n_requests} information requests",
            )
        requests = struct.unpack_from(f">{n_requests}H", data, 6 + name_len)
        name = _decode_name(data[4 : 4 + name_len])
        if name is None:
            return self._error_reply(option, p.NBD_REP_ERR_INVALID, f"{what} export name invalid")
        found = self._resolve(name)
        if found is None:
            return self._error_reply(
                option, p.NBD_REP_ERR_UNKNOWN, f"export {_quote(name)} does not exist"
            )
        canonical, export = found
        self._reply(
            option,
            p.NBD_REP_INFO,
            p.INFO_EXPORT.pack(
                p.NBD_INFO_EXPORT, export.size_bytes, self.transmission_flags(export)
            ),
        )
        self._reply(
            option,
            p.NBD_REP_INFO,
            p.INFO_BLOCK_SIZE.pack(
                p.NBD_INFO_BLOCK_SIZE,
                export.block_size_bytes,
                max(PREFERRED_BLOCK_BYTES, export.block_size_bytes),
                self._max_payload_bytes,
            ),
        )
        if p.NBD_INFO_NAME in requests:
            self._reply(
                option,
                p.NBD_REP_INFO,
                struct.pack(">H", p.NBD_INFO_NAME) + canonical.encode("utf-8"),
            )
        self._reply(option, p.NBD_REP_ACK)
        if option == p.NBD_OPT_GO:
            return self._enter_transmission(canonical, export)
        return OptionHandled(option, p.NBD_REP_ACK)

    def _enter_transmission(self, name: str, export: ExportInfo) -> ExportSelected:
        self._phase = Phase.TRANSMISSION
        self._export_name = name
        self._export = export
        # Contexts count only if the last SET_META_CONTEXT named this export.
        self._active_ids = self._meta_ids if self._meta_export == name else ()
        return ExportSelected(name, export)

    # transmission ---------------------------------------------------------------

    def _next_request(self) -> RequestEvent | ClientClosed | NeedData:
        if self._pending is not None:
            if self._payload_remaining:
                if self._eof:
                    raise ProtocolError(
                        f"connection closed in the middle of an NBD_CMD_WRITE payload "
                        f"({self._payload_remaining} of {self._pending[2]} bytes missing)"
                    )
                return NEED_DATA
            return self._finish_write()

        buf = self._buf
        if len(buf) < _REQ_SIZE:
            return self._short(_REQ_SIZE, "a request header")
        magic, flags, command, cookie, offset, length = p.REQUEST_HEADER.unpack_from(buf, 0)
        if magic != p.NBD_REQUEST_MAGIC:
            raise ProtocolError(f"request magic 0x{magic:08x} is not NBD_REQUEST_MAGIC")

        if command == p.NBD_CMD_WRITE:
            if length > self._max_payload_bytes and length > self._max_skippable_bytes:
                raise ProtocolError(
                    f"NBD_CMD_WRITE payload of {length} bytes exceeds the "
                    f"{self._max_skippable_bytes}-byte limit; cannot resynchronise"
                )
            del buf[:_REQ_SIZE]
            rejection = self._check(command, flags, offset, length)
            self._pending = (cookie, offset, length, flags, rejection)
            self._payload_chunks = []
            n = min(len(buf), length)
            if n:
                if rejection is None:
                    self._payload_chunks.append(self._take(n))
                else:
                    del buf[:n]
            self._payload_remaining = length - n
            return self._next_request()

        del buf[:_REQ_SIZE]
        if command == p.NBD_CMD_DISC:
            # Flags, offset and length are ignored: the client is leaving either way.
            self._phase = Phase.DONE
            return DisconnectRequest(cookie)
        rejection = self._check(command, flags, offset, length)
        if rejection is not None:
            return RejectedRequest(command, cookie, rejection[0], rejection[1])
        if command == p.NBD_CMD_READ:
            return ReadRequest(cookie, offset, length)
        if command == p.NBD_CMD_FLUSH:
            return FlushRequest(cookie)
        if command == p.NBD_CMD_BLOCK_STATUS:
            return BlockStatusRequest(cookie, offset, length, bool(flags & p.NBD_CMD_FLAG_REQ_ONE))
        fua = bool(flags & p.NBD_CMD_FLAG_FUA)
        if command == p.NBD_CMD_TRIM:
            return TrimRequest(cookie, offset, length, fua)
        return WriteZeroesRequest(cookie, offset, length, fua, bool(flags & p.NBD_CMD_FLAG_NO_HOLE))

    def _finish_write(self) -> WriteRequest | RejectedRequest:
        assert self._pending is not None
        cookie, offset, _length, flags, rejection = self._pending
        chunks = self._payload_chunks
        self._pending = None
        self._payload_chunks = []
        if rejection is not None:
            return RejectedRequest(p.NBD_CMD_WRITE, cookie, rejection[0], rejection[1])
        if len(chunks) == 1:
            data = chunks[0]
        else:
            data = b"".join(chunks)
        return WriteRequest(cookie, offset, data, bool(flags & p.NBD_CMD_FLAG_FUA))

    def _check(self, command: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """Return ``(error, reason)`` if the request must be refused, else None."""
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return p.NBD_EINVAL, f"{_command_name(command)} is not supported"
        if command == p.NBD_CMD_READ and self._structured_replies:
            allowed |= p.NBD_CMD_FLAG_DF
        if flags & ~allowed:
            return p.NBD_EINVAL, (
                f"command flags 0x{flags:04x} are not valid for {_command_name(command)}"
            )
        export = self._export
        assert export is not None
        if command == p.NBD_CMD_BLOCK_STATUS:
            if not self._active_ids:
                return p.NBD_EINVAL, (
                    "NBD_CMD_BLOCK_STATUS without a metadata context selected for this "
                    "export (NBD_OPT_SET_META_CONTEXT)"
                )
            if length == 0:
                return p.NBD_EINVAL, "NBD_CMD_BLOCK_STATUS of 0 bytes"
        if export.read_only and command in _MODIFYING:
            return p.NBD_EPERM, (
                f"{_command_name(command)} on read-only export {self._export_name!r}"
            )
        if length > self._max_payload_bytes and (
            command == p.NBD_CMD_READ or command == p.NBD_CMD_WRITE
        ):
            return p.NBD_EINVAL, (
                f"{_command_name(command)} of {length} bytes exceeds the "
                f"{self._max_payload_bytes}-byte maximum"
            )
        if offset + length > export.size_bytes and command != p.NBD_CMD_FLUSH:
            return _PAST_END_ERROR[command], (
                f"{_command_name(command)} range {offset}+{length} ends past the export "
                f"size {export.size_bytes}"
            )
        return None
