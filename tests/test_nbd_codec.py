"""Tests of the sans-I/O NBD server codec (no sockets, no trio)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoclus.errors import ProtocolError
from geoclus.nbd import proto as p
from geoclus.nbd.codec import (
    NEED_DATA,
    ClientClosed,
    DisconnectRequest,
    Event,
    ExportInfo,
    ExportSelected,
    FlushRequest,
    HandshakeAborted,
    NbdServerCodec,
    OptionHandled,
    Phase,
    ReadRequest,
    RejectedRequest,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
    encode_simple_reply,
)

MiB = 1024 * 1024
EXPORTS = {
    "vol": ExportInfo(size_bytes=4 * MiB, block_size_bytes=512),
    "ro": ExportInfo(size_bytes=1 * MiB, block_size_bytes=4096, read_only=True),
}
RW_FLAGS = (
    p.NBD_FLAG_HAS_FLAGS
    | p.NBD_FLAG_SEND_FLUSH
    | p.NBD_FLAG_SEND_FUA
    | p.NBD_FLAG_SEND_TRIM
    | p.NBD_FLAG_SEND_WRITE_ZEROES
    | p.NBD_FLAG_CAN_MULTI_CONN
)
# Once structured replies are negotiated, "don't fragment" is advertised too.
SR_FLAGS = RW_FLAGS | p.NBD_FLAG_SEND_DF

# --- client-side frame builders ---------------------------------------------------


def client_flags(flags: int = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data


def info_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(requests))
        + struct.pack(f">{len(requests)}H", *requests)
    )


def request(
    cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
) -> bytes:
    return p.REQUEST_HEADER.pack(p.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = p.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == p.NBD_OPT_REPLY_MAGIC
        pos += p.OPTION_REPLY_HEADER.size
        out.append((opt, rtype, data[pos : pos + length]))
        pos += length
    return out


def new_codec(**kwargs: object) -> NbdServerCodec:
    codec = NbdServerCodec(EXPORTS, default_export="vol", **kwargs)  # type: ignore[arg-type]
    codec.data_to_send()  # drop the greeting
    return codec


def assert_broken_after(codec: NbdServerCodec, err: ProtocolError | None) -> None:
    """Only ProtocolError may stop decoding (anything else already failed the
    test), and after one the codec stays broken: nothing more is decoded."""
    if err is not None:
        assert err.reason
        with pytest.raises(ProtocolError):
            codec.next_event()


def drive(
    codec: NbdServerCodec, chunks: list[bytes], eof: bool = False
) -> tuple[list[Event], ProtocolError | None, bytes]:
    """Feed ``chunks`` (draining events before each), then optionally EOF.

    Returns the events, the ProtocolError that stopped decoding (if any), and
    everything the codec queued to send.
    """
    events: list[Event] = []
    out = bytearray()

    def drain() -> bool:
        while True:
            ev = codec.next_event()
            out.extend(codec.data_to_send())
            if ev is NEED_DATA:
                return True
            events.append(ev)  # type: ignore[arg-type]
            if isinstance(ev, ClientClosed):
                return False

    try:
        for chunk in chunks:
            if not drain():
                return events, None, bytes(out)
            codec.receive_data(chunk)
        if eof:
            if not drain():
                return events, None, bytes(out)
            codec.receive_data(b"")
        drain()
    except ProtocolError as exc:
        # Nothing more comes out of a failed codec.
        with pytest.raises(ProtocolError):
            codec.next_event()
        with pytest.raises(ProtocolError):
            codec.receive_data(b"x")
        assert codec.phase is Phase.ERROR
        return events, exc, bytes(out)
    return events, None, bytes(out)


def enter_transmission(codec: NbdServerCodec, export: str = "vol") -> None:
    events, err, _ = drive(codec, [client_flags() + option(p.NBD_OPT_GO, info_data(export))])
    assert err is None
    assert isinstance(events[-1], ExportSelected)


# A complete valid session: frames (for boundaries) and the events they produce.
SESSION_FRAMES = [
    client_flags(),
    option(p.NBD_OPT_LIST),
    option(p.NBD_OPT_STRUCTURED_REPLY),
    option(p.NBD_OPT_INFO, info_data("ro", (p.NBD_INFO_BLOCK_SIZE,))),
    option(p.NBD_OPT_GO, info_data("", (p.NBD_INFO_NAME, p.NBD_INFO_BLOCK_SIZE))),
    request(p.NBD_CMD_WRITE, 1, 4096, 1024, p.NBD_CMD_FLAG_FUA, bytes(range(256)) * 4),
    request(p.NBD_CMD_READ, 2, 0, 8192),
    request(p.NBD_CMD_FLUSH, 3),
    request(p.NBD_CMD_TRIM, 4, 8192, 4096, p.NBD_CMD_FLAG_FUA),
    request(p.NBD_CMD_WRITE_ZEROES, 5, 0, 512, p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_NO_HOLE),
    request(p.NBD_CMD_CACHE, 6, 0, 512),
    request(p.NBD_CMD_WRITE, 7, 0, 3, 0, b"abc"),
    request(p.NBD_CMD_DISC, 8),
]
SESSION = b"".join(SESSION_FRAMES)
SESSION_EVENTS: list[Event] = [
    OptionHandled(p.NBD_OPT_LIST, p.NBD_REP_ACK),
    OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK),
    OptionHandled(p.NBD_OPT_INFO, p.NBD_REP_ACK),
    ExportSelected("vol", EXPORTS["vol"]),
    WriteRequest(1, 4096, bytes(range(256)) * 4, fua=True),
    ReadRequest(2, 0, 8192),
    FlushRequest(3),
    TrimRequest(4, 8192, 4096, fua=True),
    WriteZeroesRequest(5, 0, 512, fua=True, no_hole=True),
    RejectedRequest(p.NBD_CMD_CACHE, 6, p.NBD_EINVAL, "NBD_CMD_CACHE is not supported"),
    WriteRequest(7, 0, b"abc", fua=False),
    DisconnectRequest(8),
]


def _frame_ends() -> list[int]:
    ends = []
    pos = 0
    for frame in SESSION_FRAMES:
        pos += len(frame)
        ends.append(pos)
    return ends


# Byte offset at which each SESSION_EVENTS entry is complete (frame 0 has no event).
EVENT_ENDS = _frame_ends()[1:]
BOUNDARIES = {0, *_frame_ends()}


# --- basics -------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    codec = NbdServerCodec(EXPORTS)
    assert codec.data_to_send() == (b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 0b11))
    assert codec.data_to_send() == b""
    assert codec.phase is Phase.CLIENT_FLAGS


def test_full_session_fed_whole() -> None:
    codec = new_codec()
    events, err, out = drive(codec, [SESSION], eof=True)
    assert err is None
    assert events == [*SESSION_EVENTS, ClientClosed()]
    replies = parse_option_replies(out)
    # LIST: one SERVER per export then ACK
    assert replies[0][:2] == (p.NBD_OPT_LIST, p.NBD_REP_SERVER)
    assert replies[0][2] == struct.pack(">I", 3) + b"vol"
    assert replies[1][2] == struct.pack(">I", 2) + b"ro"
    assert replies[2][:2] == (p.NBD_OPT_LIST, p.NBD_REP_ACK)
    assert replies[3] == (p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK, b"")
    # INFO on "ro": export info with READ_ONLY (and DF: structured replies are on),
    # block size 4096/4096/32MiB, ACK
    info = [r for r in replies if r[0] == p.NBD_OPT_INFO]
    assert info[0][1:] == (
        p.NBD_REP_INFO,
        p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, MiB, SR_FLAGS | p.NBD_FLAG_READ_ONLY),
    )
    assert info[1][1:] == (
        p.NBD_REP_INFO,
        p.INFO_BLOCK_SIZE.pack(p.NBD_INFO_BLOCK_SIZE, 4096, 4096, 32 * MiB),
    )
    assert info[2][1] == p.NBD_REP_ACK
    go = [r for r in replies if r[0] == p.NBD_OPT_GO]
    assert go[0][2] == p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, 4 * MiB, SR_FLAGS)
    assert go[1][2] == p.INFO_BLOCK_SIZE.pack(p.NBD_INFO_BLOCK_SIZE, 512, 4096, 32 * MiB)
    assert go[2][2] == struct.pack(">H", p.NBD_INFO_NAME) + b"vol"  # canonical name of ""
    assert go[3][1] == p.NBD_REP_ACK
    assert codec.export_name == "vol"


def test_full_session_fed_one_byte_at_a_time() -> None:
    codec = new_codec()
    events, err, _ = drive(codec, [SESSION[i : i + 1] for i in range(len(SESSION))], eof=True)
    assert err is None
    assert events == [*SESSION_EVENTS, ClientClosed()]


def test_trailing_partial_frame_is_kept_until_completed() -> None:
    codec = new_codec()
    frames = SESSION_FRAMES[:-1]  # without DISC
    tail = request(p.NBD_CMD_READ, 99, 512, 512)
    events, err, _ = drive(codec, [b"".join(frames) + tail[:10]])
    assert err is None
    assert events == SESSION_EVENTS[:-1]
    events, err, _ = drive(codec, [tail[10:]])
    assert events == [ReadRequest(99, 512, 512)]


def test_bytes_after_disc_are_a_protocol_error() -> None:
    codec = new_codec()
    events, err, _ = drive(codec, [SESSION + b"junk"])
    assert events == SESSION_EVENTS
    assert err is not None and "after ending the session" in err.reason


def test_write_payload_chunk_is_not_copied() -> None:
    codec = new_codec()
    enter_transmission(codec)
    payload = bytes(64 * 1024)
    events, err, _ = drive(codec, [request(p.NBD_CMD_WRITE, 1, 0, len(payload)), payload])
    assert err is None
    assert len(events) == 1 and isinstance(events[0], WriteRequest)
    assert events[0].data is payload


def test_write_payload_split_across_many_chunks() -> None:
    codec = new_codec()
    enter_transmission(codec)
    payload = bytes(range(256)) * 64
    frame = request(p.NBD_CMD_WRITE, 1, 512, len(payload), payload=payload)
    frame += request(p.NBD_CMD_FLUSH, 2)
    chunks = [frame[i : i + 1000] for i in range(0, len(frame), 1000)]
    events, err, _ = drive(codec, [bytearray(c) for c in chunks])
    assert err is None
    assert events == [WriteRequest(1, 512, payload, fua=False), FlushRequest(2)]


def test_zero_length_requests_are_passed_through() -> None:
    codec = new_codec()
    enter_transmission(codec)
    events, _, _ = drive(codec, [request(p.NBD_CMD_WRITE, 1, 0, 0) + request(p.NBD_CMD_READ, 2)])
    assert events == [WriteRequest(1, 0, b"", fua=False), ReadRequest(2, 0, 0)]


# --- handshake options -------------------------------------------------------------------


def test_export_name_old_style_without_no_zeroes_sends_124_zeroes() -> None:
    codec = new_codec()
    events, err, out = drive(
        codec,
        [
            client_flags(p.NBD_FLAG_C_FIXED_NEWSTYLE)
            + option(p.NBD_OPT_EXPORT_NAME, b"ro")
            + request(p.NBD_CMD_READ, 1, 0, 4096)
        ],
    )
    assert err is None
    assert events == [ExportSelected("ro", EXPORTS["ro"]), ReadRequest(1, 0, 4096)]
    assert out == struct.pack(">QH", MiB, RW_FLAGS | p.NBD_FLAG_READ_ONLY) + bytes(124)


def test_export_name_with_no_zeroes_and_default_export() -> None:
    codec = new_codec()
    events, _, out = drive(codec, [client_flags() + option(p.NBD_OPT_EXPORT_NAME, b"")])
    assert events == [ExportSelected("vol", EXPORTS["vol"])]
    assert out == struct.pack(">QH", 4 * MiB, RW_FLAGS)


def test_export_name_unknown_drops_the_connection() -> None:
    codec = new_codec()
    events, err, out = drive(codec, [client_flags() + option(p.NBD_OPT_EXPORT_NAME, b"nope")])
    assert events == [] and out == b""
    assert err is not None and "unknown export 'nope'" in err.reason


def test_empty_name_without_default_export_is_unknown() -> None:
    codec = NbdServerCodec(EXPORTS)
    codec.data_to_send()
    events, _, out = drive(codec, [client_flags() + option(p.NBD_OPT_GO, info_data(""))])
    assert events == [OptionHandled(p.NBD_OPT_GO, p.NBD_REP_ERR_UNKNOWN)]
    assert parse_option_replies(out)[0][1] == p.NBD_REP_ERR_UNKNOWN


def test_abort_is_acked() -> None:
    codec = new_codec()
    events, err, out = drive(codec, [client_flags() + option(p.NBD_OPT_ABORT, b"ignored")], True)
    assert err is None
    assert events == [HandshakeAborted(), ClientClosed()]
    assert parse_option_replies(out) == [(p.NBD_OPT_ABORT, p.NBD_REP_ACK, b"")]


def test_list_with_data_is_invalid() -> None:
    codec = new_codec()
    events, _, out = drive(codec, [client_flags() + option(p.NBD_OPT_LIST, b"x")])
    assert events == [OptionHandled(p.NBD_OPT_LIST, p.NBD_REP_ERR_INVALID)]
    assert parse_option_replies(out)[0][2] == b"NBD_OPT_LIST takes no data"


@pytest.mark.parametrize("opt", [p.NBD_OPT_INFO, p.NBD_OPT_GO])
def test_info_and_go_unknown_export(opt: int) -> None:
    codec = new_codec()
    events, _, out = drive(codec, [client_flags() + option(opt, info_data("missing"))])
    assert events == [OptionHandled(opt, p.NBD_REP_ERR_UNKNOWN)]
    (reply,) = parse_option_replies(out)
    assert reply == (opt, p.NBD_REP_ERR_UNKNOWN, b"export 'missing' does not exist")
    assert codec.phase is Phase.OPTIONS  # the client may try again


@pytest.mark.parametrize(
    "data",
    [
        b"",  # shorter than the fixed fields
        b"\0\0\0\x09vol\0\0",  # name length overruns the option
        info_data("vol") + b"\0",  # trailing byte
        info_data("vol", (1, 3))[:-2],  # request count says 2, one present
        struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",  # not UTF-8
        struct.pack(">I", 2) + b"a\0" + b"\0\0",  # NUL inside
    ],
)
def test_info_malformed_is_invalid(data: bytes) -> None:
    codec = new_codec()
    events, err, out = drive(codec, [client_flags() + option(p.NBD_OPT_INFO, data)])
    assert err is None
    assert events == [OptionHandled(p.NBD_OPT_INFO, p.NBD_REP_ERR_INVALID)]
    assert parse_option_replies(out)[0][1] == p.NBD_REP_ERR_INVALID


@pytest.mark.parametrize(
    "opt",
    [
        p.NBD_OPT_EXTENDED_HEADERS,
        p.NBD_OPT_PEEK_EXPORT,
        0,
        12345,
        0xFFFFFFFF,
    ],
)
def test_other_options_are_unsupported_and_haggling_continues(opt: int) -> None:
    codec = new_codec()
    stream = client_flags() + option(opt, b"some data") + option(p.NBD_OPT_GO, info_data("vol"))
    events, err, out = drive(codec, [stream])
    assert err is None
    assert events == [
        OptionHandled(opt, p.NBD_REP_ERR_UNSUP),
        ExportSelected("vol", EXPORTS["vol"]),
    ]
    assert parse_option_replies(out)[0][:2] == (opt, p.NBD_REP_ERR_UNSUP)


def test_client_without_fixed_newstyle_is_refused() -> None:
    codec = new_codec()
    _, err, _ = drive(codec, [client_flags(p.NBD_FLAG_C_NO_ZEROES)])
    assert err is not None and "NBD_FLAG_C_FIXED_NEWSTYLE" in err.reason


def test_client_with_unknown_flags_is_refused() -> None:
    codec = new_codec()
    _, err, _ = drive(codec, [client_flags(p.NBD_FLAG_C_FIXED_NEWSTYLE | 0x100)])
    assert err is not None and "client flags 0x00000101" in err.reason


def test_bad_option_magic() -> None:
    codec = new_codec()
    _, err, _ = drive(codec, [client_flags() + b"NOTMAGIC" + bytes(8)])
    assert err is not None and "is not IHAVEOPT" in err.reason


def test_option_longer_than_limit_drops_before_buffering() -> None:
    codec = new_codec()
    header = p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, 64 * 1024 + 1)
    _, err, _ = drive(codec, [client_flags() + header])
    assert err is not None and "more than the 65536-byte limit" in err.reason


def test_too_many_options() -> None:
    codec = new_codec(max_options=3)
    events, err, _ = drive(codec, [client_flags() + option(p.NBD_OPT_LIST) * 4])
    assert len(events) == 3
    assert err is not None and "more than 3 options" in err.reason


def test_eof_in_the_middle_of_an_option() -> None:
    codec = new_codec()
    _, err, _ = drive(codec, [client_flags() + option(p.NBD_OPT_GO, info_data("vol"))[:-1]], True)
    assert err is not None and "in the middle of NBD_OPT_GO" in err.reason


def test_eof_right_after_greeting_is_a_clean_close() -> None:
    codec = new_codec()
    events, err, _ = drive(codec, [], eof=True)
    assert err is None and events == [ClientClosed()]


# --- transmission ---------------------------------------------------------------------------


def test_bad_request_magic() -> None:
    codec = new_codec()
    enter_transmission(codec)
    _, err, _ = drive(codec, [struct.pack(">I", 0x25609514) + bytes(24)])
    assert err is not None and "0x25609514 is not NBD_REQUEST_MAGIC" in err.reason


@pytest.mark.parametrize(
    ("frame", "error", "reason"),
    [
        (request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512), p.NBD_EINVAL, "metadata context"),
        (request(99, 1, 0, 512), p.NBD_EINVAL, "command 99 is not supported"),
        (request(p.NBD_CMD_READ, 1, 0, 512, p.NBD_CMD_FLAG_DF), p.NBD_EINVAL, "not valid for"),
        (request(p.NBD_CMD_TRIM, 1, 0, 512, p.NBD_CMD_FLAG_NO_HOLE), p.NBD_EINVAL, "not valid"),
        (
            request(p.NBD_CMD_WRITE_ZEROES, 1, 0, 512, p.NBD_CMD_FLAG_FAST_ZERO),
            p.NBD_EINVAL,
            "not valid",
        ),
        (request(p.NBD_CMD_READ, 1, 0, 32 * MiB + 512), p.NBD_EINVAL, "exceeds the"),
        (request(p.NBD_CMD_READ, 1, 4 * MiB - 512, 1024), p.NBD_EINVAL, "past the export"),
        (request(p.NBD_CMD_TRIM, 1, 4 * MiB, 512), p.NBD_EINVAL, "past the export"),
        (request(p.NBD_CMD_WRITE_ZEROES, 1, 2**63, 512), p.NBD_ENOSPC, "past the export"),
        (
            request(p.NBD_CMD_WRITE, 1, 4 * MiB, 512, payload=bytes(512)),
            p.NBD_ENOSPC,
            "past the export",
        ),
    ],
)
def test_rejected_requests_do_not_break_the_stream(frame: bytes, error: int, reason: str) -> None:
    codec = new_codec()
    enter_transmission(codec)
    events, err, _ = drive(codec, [frame + request(p.NBD_CMD_FLUSH, 2)])
    assert err is None
    assert len(events) == 2
    rejected = events[0]
    assert isinstance(rejected, RejectedRequest)
    assert (rejected.cookie, rejected.error) == (1, error)
    assert reason in rejected.reason
    assert events[1] == FlushRequest(2)


@pytest.mark.parametrize("cmd", [p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES])
def test_read_only_export_refuses_modifications(cmd: int) -> None:
    codec = new_codec()
    enter_transmission(codec, "ro")
    payload = bytes(4096) if cmd == p.NBD_CMD_WRITE else b""
    frame = request(cmd, 7, 0, 4096, payload=payload) + request(p.NBD_CMD_READ, 8, 0, 4096)
    events, err, _ = drive(codec, [frame])
    assert err is None
    assert isinstance(events[0], RejectedRequest) and events[0].error == p.NBD_EPERM
    assert events[1] == ReadRequest(8, 0, 4096)


def test_fua_is_accepted_on_every_command() -> None:
    codec = new_codec()
    enter_transmission(codec)
    fua = p.NBD_CMD_FLAG_FUA
    events, _, _ = drive(
        codec, [request(p.NBD_CMD_READ, 1, 0, 512, fua) + request(p.NBD_CMD_FLUSH, 2, 0, 0, fua)]
    )
    assert events == [ReadRequest(1, 0, 512), FlushRequest(2)]


def test_oversized_write_within_spec_limit_is_skipped_and_refused() -> None:
    codec = new_codec(max_payload_bytes=64 * 1024)
    enter_transmission(codec)
    payload = b"x" * (128 * 1024)
    frame = request(p.NBD_CMD_WRITE, 1, 0, len(payload), payload=payload)
    events, err, _ = drive(
        codec, [frame[:1000], frame[1000:100_000], frame[100_000:] + request(p.NBD_CMD_FLUSH, 2)]
    )
    assert err is None
    assert isinstance(events[0], RejectedRequest) and events[0].error == p.NBD_EINVAL
    assert events[1] == FlushRequest(2)


def test_write_beyond_spec_limit_drops_the_connection() -> None:
    codec = new_codec()
    enter_transmission(codec)
    _, err, _ = drive(codec, [request(p.NBD_CMD_WRITE, 1, 0, 32 * MiB + 1)])
    assert err is not None and "cannot resynchronise" in err.reason


def test_eof_mid_header_and_mid_payload() -> None:
    codec = new_codec()
    enter_transmission(codec)
    _, err, _ = drive(codec, [request(p.NBD_CMD_READ, 1, 0, 512)[:27]], eof=True)
    assert err is not None and "middle of a request header (27 of 28 bytes)" in err.reason

    codec = new_codec()
    enter_transmission(codec)
    _, err, _ = drive(codec, [request(p.NBD_CMD_WRITE, 1, 0, 512, payload=bytes(100))], eof=True)
    assert err is not None and "412 of 512 bytes missing" in err.reason


def test_encode_reply() -> None:
    codec = new_codec()
    enter_transmission(codec)
    read = ReadRequest(0xDEADBEEF, 0, 3)
    header = struct.pack(">IIQ", p.NBD_SIMPLE_REPLY_MAGIC, 0, 0xDEADBEEF)
    assert codec.encode_reply(read, 0, b"abc") == (header, b"abc")
    assert codec.encode_reply(read, p.NBD_EIO, b"abc") == (
        struct.pack(">IIQ", p.NBD_SIMPLE_REPLY_MAGIC, p.NBD_EIO, 0xDEADBEEF),
    )
    assert codec.encode_reply(FlushRequest(5)) == (encode_simple_reply(5),)
    with pytest.raises(ValueError):
        codec.encode_reply(DisconnectRequest(1))


def test_export_info_validation() -> None:
    with pytest.raises(ValueError):
        ExportInfo(size_bytes=-1)
    with pytest.raises(ValueError):
        ExportInfo(size_bytes=1 << 64)
    for bad in (0, 3, 1 << 17):
        with pytest.raises(ValueError):
            ExportInfo(size_bytes=MiB, block_size_bytes=bad)
    assert ExportInfo(MiB, 1).transmission_flags == RW_FLAGS
    with pytest.raises(ValueError):
        NbdServerCodec(EXPORTS, default_export="nope")
    with pytest.raises(ValueError):
        NbdServerCodec(EXPORTS, max_payload_bytes=1024)
    with pytest.raises(ValueError, match="smaller than the block size"):
        NbdServerCodec({"big": ExportInfo(MiB, 65536)}, max_payload_bytes=8192)


# --- property tests -------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    prev = 0
    for c in [*points, len(data)]:
        if c > prev:
            pieces.append(data[prev:c])
            prev = c
    return pieces


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_random_bytes_to_handshake_only_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    codec = new_codec()
    _events, err, _ = drive(codec, _split(client_flags() + data, cuts), eof=True)
    assert_broken_after(codec, err)


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_random_bytes_to_first_handshake_bytes(data: bytes, cuts: list[int]) -> None:
    codec = new_codec()
    _events, err, _ = drive(codec, _split(data, cuts), eof=True)
    assert_broken_after(codec, err)


@FUZZ
@given(
    data=st.binary(max_size=800),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    export=st.sampled_from(["vol", "ro"]),
)
def test_random_bytes_to_transmission_only_raise_protocol_error(
    data: bytes, cuts: list[int], export: str
) -> None:
    codec = new_codec(max_payload_bytes=4096)
    enter_transmission(codec, export)
    events, _, _ = drive(codec, _split(data, cuts), eof=True)
    for ev in events:
        if isinstance(ev, WriteRequest):
            assert len(ev.data) <= 4096


# Request headers with the magic right, so fuzzing reaches the field checks.
header_st = st.builds(
    request,
    cmd=st.integers(0, 10),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.one_of(st.integers(0, 8 * MiB), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 9000), st.integers(0, 2**32 - 1)),
    flags=st.integers(0, 0xFFFF),
)


@FUZZ
@given(
    frames=st.lists(st.one_of(header_st, st.binary(max_size=64)), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_plausible_request_streams_only_raise_protocol_error(
    frames: list[bytes], cuts: list[int]
) -> None:
    codec = new_codec(max_payload_bytes=8192)
    enter_transmission(codec)
    _events, err, _ = drive(codec, _split(b"".join(frames), cuts), eof=True)
    assert_broken_after(codec, err)


@FUZZ
@given(
    pos=st.integers(0, len(SESSION) - 1),
    value=st.integers(0, 255),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_corrupted_session_keeps_events_before_the_corruption(
    pos: int, value: int, cuts: list[int]
) -> None:
    corrupted = bytearray(SESSION)
    corrupted[pos] = value
    codec = new_codec()
    events, err, _ = drive(codec, _split(bytes(corrupted), cuts), eof=True)
    # Every frame that ends before the corrupted byte decodes exactly as before.
    intact = [ev for ev, end in zip(SESSION_EVENTS, EVENT_ENDS) if end <= pos]
    assert events[: len(intact)] == intact
    if bytes(corrupted) == SESSION:
        assert err is None


@FUZZ
@given(cut=st.integers(0, len(SESSION)), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_truncated_session(cut: int, cuts: list[int]) -> None:
    codec = new_codec()
    events, err, _ = drive(codec, _split(SESSION[:cut], cuts), eof=True)
    intact = [ev for ev, end in zip(SESSION_EVENTS, EVENT_ENDS) if end <= cut]
    if cut in BOUNDARIES:
        assert err is None
        assert events == [*intact, ClientClosed()]
    else:
        assert err is not None
        assert events == intact
