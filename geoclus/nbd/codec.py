"""Sans-I/O server side of the NBD protocol (fixed newstyle, simple replies).

:class:`NbdServerCodec` is a pure state machine: the shell feeds it the bytes it
received (:meth:`~NbdServerCodec.receive_data`), pulls typed events one at a
time (:meth:`~NbdServerCodec.next_event`), sends whatever
:meth:`~NbdServerCodec.data_to_send` returns, and turns the outcome of each
request into bytes with :meth:`~NbdServerCodec.encode_reply`. It never touches a
socket, a clock or a device.

Option haggling is answered entirely inside the codec (it only needs the export
catalogue, :class:`ExportInfo`); the shell sees one event per option so it can
flush the reply before the next option is parsed. In the transmission phase each
complete request header (plus payload, for ``NBD_CMD_WRITE``) becomes one
request event. Requests the codec can refuse on its own (unknown command,
invalid flags, read-only export, too long, out of range) become
:class:`RejectedRequest` events carrying the NBD error to reply with.

Bytes that break the protocol raise :class:`~geoclus.errors.ProtocolError`
naming what was wrong; after that the codec is dead (every further call raises
the same error) and nothing from the offending frame has been emitted.

Extension points: STARTTLS and structured replies are refused with
``NBD_REP_ERR_UNSUP`` today. Both hook in at ``NbdServerCodec._option_handlers``
(a per-option table) and :meth:`NbdServerCodec.encode_reply` (which already
receives the request, so it can choose a structured reply for reads).
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
        """The 16-bit transmission flags advertised for this export."""
        flags = (
            p.NBD_FLAG_HAS_FLAGS
            | p.NBD_FLAG_SEND_FLUSH
            | p.NBD_FLAG_SEND_FUA
            | p.NBD_FLAG_SEND_TRIM
            | p.NBD_FLAG_SEND_WRITE_ZEROES
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


DeviceRequest = ReadRequest | WriteRequest | FlushRequest | TrimRequest | WriteZeroesRequest
RequestEvent = DeviceRequest | DisconnectRequest | RejectedRequest
HandshakeEvent = OptionHandled | ExportSelected | HandshakeAborted
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
_ALLOWED_FLAGS: Final[dict[int, int]] = {
    p.NBD_CMD_READ: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_FLUSH: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_TRIM: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_NO_HOLE,
}
_MODIFYING: Final = frozenset({p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES})
# Past-the-end writes answer ENOSPC, past-the-end reads/trims EINVAL (spec, "Error values").
_PAST_END_ERROR: Final[dict[int, int]] = {
    p.NBD_CMD_READ: p.NBD_EINVAL,
    p.NBD_CMD_TRIM: p.NBD_EINVAL,
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


class NbdServerCodec:
    """Server side of one NBD connection, from greeting to disconnect.

    Usage: send :meth:`data_to_send` (the greeting is queued at construction);
    loop on :meth:`next_event`; on :data:`NEED_DATA` receive bytes and pass them to
    :meth:`receive_data` (``b""`` for end of stream); after every handshake event
    send :meth:`data_to_send` again.

    ``exports`` is the catalogue offered (an empty name from the client selects
    ``default_export``); ``max_payload_bytes`` bounds READ/WRITE payloads and is
    advertised; ``max_option_bytes`` and ``max_options`` bound option haggling
    (see the module constants).

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
        self._structured_replies = False  # negotiated by NBD_OPT_STRUCTURED_REPLY (later)

        # A WRITE whose header was parsed but whose payload is still arriving.
        # _pending is (cookie, offset, length, flags, rejection-or-None).
        self._pending: tuple[int, int, int, int, tuple[int, str] | None] | None = None
        self._payload_chunks: list[bytes] = []
        self._payload_remaining = 0

        self._option_handlers: dict[int, Callable[[int, bytes], Event | None]] = {
            p.NBD_OPT_EXPORT_NAME: self._opt_export_name,
            p.NBD_OPT_ABORT: self._opt_abort,
            p.NBD_OPT_LIST: self._opt_list,
            p.NBD_OPT_INFO: self._opt_info_or_go,
            p.NBD_OPT_GO: self._opt_info_or_go,
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
        self, request: RequestEvent, error: int = p.NBD_SUCCESS, data: bytes | None = None
    ) -> tuple[bytes, ...]:
        """Return the buffers (header, then data for a successful READ) that answer
        ``request``; send them in order with no other bytes in between.

        The caller guarantees a successful READ's ``data`` is exactly the requested
        length. Raises ``ValueError`` for a reply to ``NBD_CMD_DISC`` (it has none).
        """
        if request.command == p.NBD_CMD_DISC:
            raise ValueError("NBD_CMD_DISC has no reply")
        header = p.SIMPLE_REPLY_HEADER.pack(p.NBD_SIMPLE_REPLY_MAGIC, error, request.cookie)
        if error or data is None:
            return (header,)
        return (header, data)

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

    def _opt_export_name(self, option: int, data: bytes) -> Event:
        name = _decode_name(data)
        if name is None:
            raise ProtocolError("NBD_OPT_EXPORT_NAME carries an invalid export name")
        found = self._resolve(name)
        if found is None:
            # The spec leaves no way to refuse NBD_OPT_EXPORT_NAME but to close.
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME asked for unknown export {_quote(name)}")
        canonical, export = found
        self._out += p.EXPORT_NAME_REPLY.pack(export.size_bytes, export.transmission_flags)
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
            p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, export.size_bytes, export.transmission_flags),
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
        if flags & ~allowed:
            return p.NBD_EINVAL, (
                f"command flags 0x{flags:04x} are not valid for {_command_name(command)}"
            )
        export = self._export
        assert export is not None
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
