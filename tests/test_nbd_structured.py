"""Sans-I/O tests of the NBD codec's negotiated extensions: structured replies,
metadata contexts (``base:allocation``) and ``NBD_CMD_BLOCK_STATUS``.

Every decoder test runs the same frames fed whole, one byte at a time and with
trailing bytes, like ``tests/test_nbd_codec.py`` (whose helpers it reuses).
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geoclus.nbd import proto as p
from geoclus.nbd.codec import (
    MAX_BLOCK_STATUS_DESCRIPTORS,
    BlockStatusRequest,
    ClientClosed,
    DisconnectRequest,
    Event,
    ExportSelected,
    FlushRequest,
    NbdServerCodec,
    OptionHandled,
    ReadRequest,
    RejectedRequest,
    WriteRequest,
    block_status_descriptors,
    encode_block_status_chunk,
    encode_error_chunk,
    encode_none_chunk,
    encode_offset_data_chunk,
    encode_offset_hole_chunk,
)
from tests.test_nbd_codec import (
    EXPORTS,
    FUZZ,
    RW_FLAGS,
    MiB,
    client_flags,
    drive,
    info_data,
    new_codec,
    option,
    parse_option_replies,
    request,
)

SR_FLAGS = RW_FLAGS | p.NBD_FLAG_SEND_DF
HOLE = p.NBD_STATE_HOLE
ZERO = p.NBD_STATE_ZERO
ALLOCATION_ID = 1  # the id SET_META_CONTEXT gives base:allocation

# --- frame builders and parsers --------------------------------------------------------


def meta_data(name: str, queries: list[str] | list[bytes]) -> bytes:
    """The data of NBD_OPT_{LIST,SET}_META_CONTEXT."""
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        qb = q if isinstance(q, bytes) else q.encode()
        out += struct.pack(">I", len(qb)) + qb
    return out


def parse_chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split structured reply chunks: (flags, type, cookie, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, rtype, cookie, length = p.STRUCTURED_REPLY_HEADER.unpack_from(data, pos)
        assert magic == p.NBD_STRUCTURED_REPLY_MAGIC
        pos += p.STRUCTURED_REPLY_HEADER.size
        out.append((flags, rtype, cookie, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def parse_descriptors(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    (context_id,) = struct.unpack_from(">I", payload, 0)
    body = payload[4:]
    assert len(body) % 8 == 0 and body
    return context_id, [p.BLOCK_DESCRIPTOR.unpack_from(body, i) for i in range(0, len(body), 8)]


def parse_error(payload: bytes, with_offset: bool = False) -> tuple[int, str, int | None]:
    error, n = p.ERROR_CHUNK_START.unpack_from(payload, 0)
    message = payload[6 : 6 + n].decode()
    rest = payload[6 + n :]
    if with_offset:
        (offset,) = struct.unpack(">Q", rest)
        return error, message, offset
    assert rest == b""
    return error, message, None


def as_feeds(stream: bytes) -> list[list[bytes]]:
    """The same bytes fed whole and one byte at a time."""
    return [[stream], [stream[i : i + 1] for i in range(len(stream))]]


FEEDS = pytest.mark.parametrize("how", ["whole", "bytewise"])


def feed(stream: bytes, how: str) -> list[bytes]:
    return [stream] if how == "whole" else [stream[i : i + 1] for i in range(len(stream))]


def handshake(
    *opts: bytes, export: str = "vol", go: bool = True
) -> tuple[NbdServerCodec, list[Event], list[tuple[int, int, bytes]]]:
    """Run the given options (then NBD_OPT_GO unless ``go`` is false) whole."""
    codec = new_codec()
    stream = client_flags() + b"".join(opts)
    if go:
        stream += option(p.NBD_OPT_GO, info_data(export))
    events, err, out = drive(codec, [stream])
    assert err is None
    return codec, events, parse_option_replies(out)


SR = option(p.NBD_OPT_STRUCTURED_REPLY)
SET_ALLOCATION = option(
    p.NBD_OPT_SET_META_CONTEXT, meta_data("vol", [p.NBD_CONTEXT_BASE_ALLOCATION])
)


# --- NBD_OPT_STRUCTURED_REPLY ------------------------------------------------------------


@FEEDS
def test_structured_reply_is_acked_and_advertises_df(how: str) -> None:
    codec = new_codec()
    stream = client_flags() + SR + option(p.NBD_OPT_GO, info_data("vol"))
    events, err, out = drive(codec, feed(stream, how))
    assert err is None
    assert events == [
        OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK),
        ExportSelected("vol", EXPORTS["vol"]),
    ]
    replies = parse_option_replies(out)
    assert replies[0] == (p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK, b"")
    assert replies[1][2] == p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, 4 * MiB, SR_FLAGS)
    assert codec.structured_replies


def test_structured_reply_requested_twice_is_invalid_and_stays_on() -> None:
    codec, events, replies = handshake(SR, SR)
    assert events[:2] == [
        OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK),
        OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ERR_INVALID),
    ]
    assert replies[1] == (
        p.NBD_OPT_STRUCTURED_REPLY,
        p.NBD_REP_ERR_INVALID,
        b"structured replies are already negotiated",
    )
    assert codec.structured_replies  # the first ACK still holds


def test_structured_reply_with_data_is_invalid() -> None:
    codec, events, replies = handshake(option(p.NBD_OPT_STRUCTURED_REPLY, b"x"))
    assert events[0] == OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ERR_INVALID)
    assert replies[0][2] == b"NBD_OPT_STRUCTURED_REPLY takes no data"
    assert not codec.structured_replies
    # and the export is advertised without DF
    assert replies[1][2] == p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, 4 * MiB, RW_FLAGS)


def test_export_name_reply_carries_df_after_structured_replies() -> None:
    codec = new_codec()
    events, _, out = drive(codec, [client_flags() + SR + option(p.NBD_OPT_EXPORT_NAME, b"vol")])
    assert events[-1] == ExportSelected("vol", EXPORTS["vol"])
    (sr_reply,) = parse_option_replies(out[:20])
    assert sr_reply[1] == p.NBD_REP_ACK
    assert out[20:] == struct.pack(">QH", 4 * MiB, SR_FLAGS)


def test_structured_read_reply_is_one_data_chunk_with_done() -> None:
    codec, _, _ = handshake(SR)
    read = ReadRequest(0xABCDEF, 4096, 3)
    header, data = codec.encode_reply(read, p.NBD_SUCCESS, b"xyz")
    assert data == b"xyz"
    ((flags, rtype, cookie, payload),) = parse_chunks(header + data)
    assert (flags, rtype, cookie) == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_OFFSET_DATA, 0xABCDEF)
    assert payload == struct.pack(">Q", 4096) + b"xyz"


def test_structured_replies_for_other_commands_errors_and_empty_reads() -> None:
    codec, _, _ = handshake(SR)
    done = p.NBD_REPLY_FLAG_DONE
    # success without payload: NONE + DONE
    for req in (FlushRequest(7), WriteRequest(7, 0, b"a" * 512, fua=False), ReadRequest(7, 0, 0)):
        (chunk,) = parse_chunks(b"".join(codec.encode_reply(req)))
        assert chunk == (done, p.NBD_REPLY_TYPE_NONE, 7, b"")
    # a device error on a read: ERROR + DONE, with the message
    (chunk,) = parse_chunks(
        b"".join(codec.encode_reply(ReadRequest(8, 0, 512), p.NBD_EIO, None, "disk"))
    )
    assert chunk[:3] == (done, p.NBD_REPLY_TYPE_ERROR, 8)
    assert parse_error(chunk[3]) == (p.NBD_EIO, "disk", None)
    # a refusal by the codec carries its reason
    rejected = RejectedRequest(p.NBD_CMD_READ, 9, p.NBD_EINVAL, "read past the end")
    (chunk,) = parse_chunks(b"".join(codec.encode_reply(rejected, rejected.error)))
    assert chunk[:3] == (done, p.NBD_REPLY_TYPE_ERROR, 9)
    assert parse_error(chunk[3]) == (p.NBD_EINVAL, "read past the end", None)


def test_without_structured_replies_everything_stays_simple() -> None:
    codec, _, _ = handshake()
    read = ReadRequest(3, 0, 3)
    assert codec.encode_reply(read, 0, b"abc") == (
        p.SIMPLE_REPLY_HEADER.pack(p.NBD_SIMPLE_REPLY_MAGIC, 0, 3),
        b"abc",
    )
    rejected = RejectedRequest(p.NBD_CMD_BLOCK_STATUS, 4, p.NBD_EINVAL, "no context")
    assert codec.encode_reply(rejected, rejected.error) == (
        p.SIMPLE_REPLY_HEADER.pack(p.NBD_SIMPLE_REPLY_MAGIC, p.NBD_EINVAL, 4),
    )


@pytest.mark.parametrize("negotiated", [True, False])
def test_read_df_flag_only_with_structured_replies(negotiated: bool) -> None:
    codec, _, _ = handshake(*([SR] if negotiated else []))
    events, err, _ = drive(codec, [request(p.NBD_CMD_READ, 1, 0, 512, p.NBD_CMD_FLAG_DF)])
    assert err is None
    if negotiated:
        assert events == [ReadRequest(1, 0, 512)]
    else:
        assert isinstance(events[0], RejectedRequest) and events[0].error == p.NBD_EINVAL


def test_chunk_encoders() -> None:
    done = p.NBD_REPLY_FLAG_DONE
    assert parse_chunks(encode_none_chunk(5)) == [(done, p.NBD_REPLY_TYPE_NONE, 5, b"")]
    header, data = encode_offset_data_chunk(5, 512, b"ab", done=False)
    assert parse_chunks(header + data) == [
        (0, p.NBD_REPLY_TYPE_OFFSET_DATA, 5, struct.pack(">Q", 512) + b"ab")
    ]
    assert parse_chunks(encode_offset_hole_chunk(5, 1024, 4096)) == [
        (done, p.NBD_REPLY_TYPE_OFFSET_HOLE, 5, struct.pack(">QI", 1024, 4096))
    ]
    (chunk,) = parse_chunks(encode_error_chunk(5, p.NBD_EIO, "bad sector", offset=8192))
    assert chunk[:3] == (done, p.NBD_REPLY_TYPE_ERROR_OFFSET, 5)
    assert parse_error(chunk[3], with_offset=True) == (p.NBD_EIO, "bad sector", 8192)
    (chunk,) = parse_chunks(encode_block_status_chunk(5, 1, [(512, HOLE | ZERO), (1024, 0)]))
    assert chunk[:3] == (done, p.NBD_REPLY_TYPE_BLOCK_STATUS, 5)
    assert parse_descriptors(chunk[3]) == (1, [(512, HOLE | ZERO), (1024, 0)])


def test_error_message_is_cut_to_the_string_limit_on_a_character_boundary() -> None:
    message = "é" * 3000  # 6000 bytes of UTF-8
    (chunk,) = parse_chunks(encode_error_chunk(1, p.NBD_EIO, message))
    error, got, _ = parse_error(chunk[3])
    assert error == p.NBD_EIO
    assert got == "é" * 2048  # 4096 bytes exactly


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_offset_data_chunk(1, 0, b""),
        lambda: encode_offset_hole_chunk(1, 0, 0),
        lambda: encode_offset_hole_chunk(1, 0, 1 << 32),
        lambda: encode_error_chunk(1, 0),
        lambda: encode_block_status_chunk(1, 1, []),
        lambda: encode_block_status_chunk(1, 1, [(0, 0)]),
        lambda: encode_block_status_chunk(1, 1, [(1 << 32, 0)]),
        lambda: encode_block_status_chunk(1, 1, [(512, -1)]),
    ],
)
def test_chunk_encoders_refuse_what_the_spec_forbids(call) -> None:
    with pytest.raises(ValueError):
        call()


# --- NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT ------------------------------------


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ([], [p.NBD_CONTEXT_BASE_ALLOCATION]),  # no query: everything
        (["base:"], [p.NBD_CONTEXT_BASE_ALLOCATION]),  # namespace wildcard
        (["base:allocation"], [p.NBD_CONTEXT_BASE_ALLOCATION]),
        (["base:allocation", "base:", "base:allocation"], [p.NBD_CONTEXT_BASE_ALLOCATION]),
        (["base:nosuchleaf"], []),  # unknown leaf: ignored
        (["qemu:dirty-bitmap:b0"], []),  # unknown namespace: ignored
        (["x-other:", "qemu:allocation-depth"], []),
    ],
)
@FEEDS
def test_list_meta_context(how: str, queries: list[str], listed: list[str]) -> None:
    codec = new_codec()
    stream = client_flags() + SR + option(p.NBD_OPT_LIST_META_CONTEXT, meta_data("vol", queries))
    events, err, out = drive(codec, feed(stream, how))
    assert err is None
    assert events[-1] == OptionHandled(p.NBD_OPT_LIST_META_CONTEXT, p.NBD_REP_ACK)
    replies = parse_option_replies(out)[1:]
    assert replies == [
        *[
            (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_REP_META_CONTEXT, struct.pack(">I", 0) + n.encode())
            for n in listed
        ],
        (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_REP_ACK, b""),
    ]
    assert codec.meta_contexts == ()  # listing selects nothing


@FEEDS
def test_set_meta_context_selects_base_allocation(how: str) -> None:
    codec = new_codec()
    stream = client_flags() + SR + SET_ALLOCATION + option(p.NBD_OPT_GO, info_data("vol"))
    events, err, out = drive(codec, feed(stream, how))
    assert err is None
    assert events == [
        OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK),
        OptionHandled(p.NBD_OPT_SET_META_CONTEXT, p.NBD_REP_ACK),
        ExportSelected("vol", EXPORTS["vol"]),
    ]
    replies = parse_option_replies(out)
    assert replies[1:3] == [
        (
            p.NBD_OPT_SET_META_CONTEXT,
            p.NBD_REP_META_CONTEXT,
            struct.pack(">I", ALLOCATION_ID) + b"base:allocation",
        ),
        (p.NBD_OPT_SET_META_CONTEXT, p.NBD_REP_ACK, b""),
    ]
    assert codec.meta_contexts == (ALLOCATION_ID,)


@pytest.mark.parametrize(
    "queries",
    [
        [],  # zero queries select nothing
        ["base:"],  # the wildcard is ignored by SET
        ["base:nosuchleaf"],
        ["qemu:dirty-bitmap:b0", "x-mine:thing"],
    ],
)
def test_set_meta_context_that_selects_nothing(queries: list[str]) -> None:
    codec, events, replies = handshake(
        SR, option(p.NBD_OPT_SET_META_CONTEXT, meta_data("vol", queries))
    )
    assert events[1] == OptionHandled(p.NBD_OPT_SET_META_CONTEXT, p.NBD_REP_ACK)
    assert replies[1] == (p.NBD_OPT_SET_META_CONTEXT, p.NBD_REP_ACK, b"")
    assert codec.meta_contexts == ()


def test_set_meta_context_with_duplicates_selects_once() -> None:
    data = meta_data("vol", ["base:allocation", "qemu:x", "base:allocation"])
    codec, _, replies = handshake(SR, option(p.NBD_OPT_SET_META_CONTEXT, data))
    kinds = [r[1] for r in replies if r[0] == p.NBD_OPT_SET_META_CONTEXT]
    assert kinds == [p.NBD_REP_META_CONTEXT, p.NBD_REP_ACK]
    assert codec.meta_contexts == (ALLOCATION_ID,)


@pytest.mark.parametrize("opt", [p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT])
@FEEDS
def test_meta_context_before_structured_replies_is_invalid(how: str, opt: int) -> None:
    codec = new_codec()
    stream = (
        client_flags()
        + option(opt, meta_data("vol", ["base:allocation"]))
        + option(p.NBD_OPT_GO, info_data("vol"))
    )
    events, err, out = drive(codec, feed(stream, how))
    assert err is None
    assert events[0] == OptionHandled(opt, p.NBD_REP_ERR_INVALID)
    assert b"needs NBD_OPT_STRUCTURED_REPLY first" in parse_option_replies(out)[0][2]
    assert codec.meta_contexts == ()


def _query(q: bytes) -> bytes:
    return struct.pack(">I", len(q)) + q


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "too short"),
        (b"\0\0\0\x03vo", "too short"),
        (struct.pack(">I", 50) + b"vol" + bytes(4), "overruns"),  # name length
        (struct.pack(">I", 3) + b"vol" + struct.pack(">I", 5) + _query(b"base:"), "do not fit"),
        (
            struct.pack(">I", 3) + b"vol" + struct.pack(">I", 1) + struct.pack(">I", 99) + b"base:",
            "overruns",
        ),
        (meta_data("vol", ["base:allocation"]) + b"\0", "after the last query"),
        (meta_data("vol", ["allocation"]), "namespace and a colon"),
        (meta_data("vol", [":allocation"]), "namespace and a colon"),
        (meta_data("vol", [b"base:\xff"]), "not a valid string"),
        (meta_data("vol", [b"base:a\0b"]), "not a valid string"),
        (struct.pack(">I", 2) + b"\xff\xfe" + bytes(4), "export name invalid"),
    ],
)
@pytest.mark.parametrize("opt", [p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT])
def test_meta_context_malformed_is_invalid(opt: int, data: bytes, why: str) -> None:
    for how in ("whole", "bytewise"):
        codec = new_codec()
        stream = client_flags() + SR + option(opt, data) + option(p.NBD_OPT_GO, info_data("vol"))
        events, err, out = drive(codec, feed(stream, how))
        assert err is None
        assert events[1] == OptionHandled(opt, p.NBD_REP_ERR_INVALID)
        reply = parse_option_replies(out)[1]
        assert reply[1] == p.NBD_REP_ERR_INVALID and why in reply[2].decode(), reply
        assert isinstance(events[2], ExportSelected)  # haggling went on
        assert codec.meta_contexts == ()


@pytest.mark.parametrize("opt", [p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT])
def test_meta_context_unknown_export(opt: int) -> None:
    codec, events, replies = handshake(SR, option(opt, meta_data("nope", ["base:allocation"])))
    assert events[1] == OptionHandled(opt, p.NBD_REP_ERR_UNKNOWN)
    assert replies[1] == (opt, p.NBD_REP_ERR_UNKNOWN, b"export 'nope' does not exist")
    assert codec.meta_contexts == ()


def test_failed_set_meta_context_clears_the_selection() -> None:
    bad = option(p.NBD_OPT_SET_META_CONTEXT, meta_data("vol", ["nocolon"]))
    codec, events, _ = handshake(SR, SET_ALLOCATION, bad)
    assert [e.reply_type for e in events[:3]] == [  # type: ignore[union-attr]
        p.NBD_REP_ACK,
        p.NBD_REP_ACK,
        p.NBD_REP_ERR_INVALID,
    ]
    assert codec.meta_contexts == ()


def test_later_set_meta_context_replaces_the_selection() -> None:
    none = option(p.NBD_OPT_SET_META_CONTEXT, meta_data("vol", []))
    codec, _, _ = handshake(SR, SET_ALLOCATION, none)
    assert codec.meta_contexts == ()
    codec, _, _ = handshake(SR, none, SET_ALLOCATION)
    assert codec.meta_contexts == (ALLOCATION_ID,)


def test_contexts_apply_only_to_the_export_they_named() -> None:
    on_ro = option(p.NBD_OPT_SET_META_CONTEXT, meta_data("ro", ["base:allocation"]))
    codec, _, _ = handshake(SR, on_ro, export="vol")
    assert codec.meta_contexts == ()
    codec, _, _ = handshake(SR, on_ro, export="ro")
    assert codec.meta_contexts == (ALLOCATION_ID,)
    # "" and "vol" name the same export (the default): the contexts apply
    on_default = option(p.NBD_OPT_SET_META_CONTEXT, meta_data("", ["base:allocation"]))
    codec, _, _ = handshake(SR, on_default, export="vol")
    assert codec.meta_contexts == (ALLOCATION_ID,)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_meta_context_data_is_answered_never_crashes(data: bytes) -> None:
    for opt in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
        codec = new_codec()
        events, err, _ = drive(codec, [client_flags() + SR + option(opt, data)])
        assert err is None
        assert isinstance(events[-1], OptionHandled)
        assert events[-1].reply_type in (
            p.NBD_REP_ACK,
            p.NBD_REP_ERR_INVALID,
            p.NBD_REP_ERR_UNKNOWN,
        )


# --- NBD_CMD_BLOCK_STATUS ---------------------------------------------------------------------


def with_allocation(export: str = "vol") -> NbdServerCodec:
    codec, events, _ = handshake(
        SR,
        option(p.NBD_OPT_SET_META_CONTEXT, meta_data(export, ["base:allocation"])),
        export=export,
    )
    assert isinstance(events[-1], ExportSelected)
    return codec


@FEEDS
def test_block_status_requests(how: str) -> None:
    codec = with_allocation()
    stream = (
        request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 4 * MiB)
        + request(p.NBD_CMD_BLOCK_STATUS, 2, 4096, 512, p.NBD_CMD_FLAG_REQ_ONE)
        + request(p.NBD_CMD_BLOCK_STATUS, 3, 0, 512, p.NBD_CMD_FLAG_FUA)
        + request(p.NBD_CMD_DISC, 4)
    )
    events, err, _ = drive(codec, feed(stream, how), eof=True)
    assert err is None
    assert events == [
        BlockStatusRequest(1, 0, 4 * MiB, req_one=False),
        BlockStatusRequest(2, 4096, 512, req_one=True),
        BlockStatusRequest(3, 0, 512, req_one=False),
        DisconnectRequest(4),
        ClientClosed(),
    ]


def test_block_status_with_trailing_partial_request() -> None:
    codec = with_allocation()
    frame = request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512)
    events, err, _ = drive(codec, [frame + frame[:5]])
    assert err is None and events == [BlockStatusRequest(1, 0, 512, req_one=False)]
    events, _, _ = drive(codec, [frame[5:]])
    assert events == [BlockStatusRequest(1, 0, 512, req_one=False)]


@pytest.mark.parametrize(
    ("opts", "frame", "reason", "structured"),
    [
        # no context: structured replies only
        ([SR], request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512), "metadata context", True),
        # no structured replies at all: the refusal must be a simple reply
        ([], request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512), "metadata context", False),
        # a context for another export
        (
            [SR, option(p.NBD_OPT_SET_META_CONTEXT, meta_data("ro", ["base:allocation"]))],
            request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512),
            "metadata context",
            True,
        ),
        ([SR, SET_ALLOCATION], request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 0), "0 bytes", True),
        (
            [SR, SET_ALLOCATION],
            request(p.NBD_CMD_BLOCK_STATUS, 1, 4 * MiB - 512, 1024),
            "past the export",
            True,
        ),
        ([SR, SET_ALLOCATION], request(p.NBD_CMD_BLOCK_STATUS, 1, 2**63, 512), "past the", True),
        (
            [SR, SET_ALLOCATION],
            request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512, p.NBD_CMD_FLAG_NO_HOLE),
            "not valid for NBD_CMD_BLOCK_STATUS",
            True,
        ),
        (
            [SR, SET_ALLOCATION],
            request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512, p.NBD_CMD_FLAG_DF),
            "not valid for NBD_CMD_BLOCK_STATUS",
            True,
        ),
    ],
)
def test_block_status_refusals(
    opts: list[bytes], frame: bytes, reason: str, structured: bool
) -> None:
    for how in ("whole", "bytewise"):
        codec, _, _ = handshake(*opts)
        events, err, _ = drive(codec, feed(frame + request(p.NBD_CMD_FLUSH, 2), how))
        assert err is None
        rejected, flush = events
        assert isinstance(rejected, RejectedRequest)
        assert (rejected.command, rejected.cookie, rejected.error) == (
            p.NBD_CMD_BLOCK_STATUS,
            1,
            p.NBD_EINVAL,
        )
        assert reason in rejected.reason
        assert flush == FlushRequest(2)
        reply = b"".join(codec.encode_reply(rejected, rejected.error))
        if structured:
            (chunk,) = parse_chunks(reply)
            assert chunk[:3] == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_ERROR, 1)
            assert parse_error(chunk[3])[:2] == (p.NBD_EINVAL, rejected.reason)
        else:
            assert reply == p.SIMPLE_REPLY_HEADER.pack(p.NBD_SIMPLE_REPLY_MAGIC, p.NBD_EINVAL, 1)


def test_block_status_on_a_read_only_export_is_fine() -> None:
    codec = with_allocation("ro")
    events, _, _ = drive(codec, [request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 4096)])
    assert events == [BlockStatusRequest(1, 0, 4096, req_one=False)]


@pytest.mark.parametrize(
    ("extents", "length", "req_one", "descriptors"),
    [
        # one extent, exactly the request
        ([(4096, 0)], 4096, False, [(4096, 0)]),
        # longer than the request: clipped
        ([(1 << 20, HOLE | ZERO)], 4096, False, [(4096, HOLE | ZERO)]),
        # equal neighbours merged; unknown flag bits dropped
        ([(512, ZERO), (512, ZERO | 0x100), (1024, 0)], 2048, False, [(1024, ZERO), (1024, 0)]),
        # a prefix is fine (the device stopped early)
        ([(512, HOLE | ZERO)], 4096, False, [(512, HOLE | ZERO)]),
        # REQ_ONE: exactly one, never longer than the request
        ([(512, 0), (512, HOLE | ZERO)], 4096, True, [(512, 0)]),
        ([(8192, HOLE | ZERO)], 4096, True, [(4096, HOLE | ZERO)]),
        # REQ_ONE still merges what reads the same
        ([(512, 0), (512, 0), (512, HOLE)], 4096, True, [(1024, 0)]),
        # extents after the request ends are ignored
        ([(4096, 0), (4096, HOLE | ZERO)], 4096, False, [(4096, 0)]),
    ],
)
def test_block_status_descriptors(
    extents: list[tuple[int, int]], length: int, req_one: bool, descriptors: list[tuple[int, int]]
) -> None:
    assert block_status_descriptors(extents, length, req_one=req_one) == descriptors


def test_block_status_descriptors_are_bounded() -> None:
    alternating = [(512, (i % 2) * (HOLE | ZERO)) for i in range(3 * MAX_BLOCK_STATUS_DESCRIPTORS)]
    out = block_status_descriptors(alternating, 512 * len(alternating))
    assert len(out) == MAX_BLOCK_STATUS_DESCRIPTORS
    assert out == alternating[:MAX_BLOCK_STATUS_DESCRIPTORS]
    assert block_status_descriptors(alternating, 1 << 30, max_descriptors=3) == alternating[:3]


@pytest.mark.parametrize(
    ("extents", "length"),
    [([], 512), ([(0, 0)], 512), ([(-512, 0)], 512), ([(512, 0)], 0)],
)
def test_block_status_descriptors_refuse_device_bugs(
    extents: list[tuple[int, int]], length: int
) -> None:
    with pytest.raises(ValueError):
        block_status_descriptors(extents, length)


@FUZZ
@given(
    extents=st.lists(
        st.tuples(st.integers(1, 1 << 20), st.integers(0, 0xFFFFFFFF)), min_size=1, max_size=40
    ),
    length=st.integers(1, 0xFFFFFFFF),
    req_one=st.booleans(),
    bound=st.integers(1, 8),
)
def test_block_status_descriptors_obey_the_spec(
    extents: list[tuple[int, int]], length: int, req_one: bool, bound: int
) -> None:
    out = block_status_descriptors(extents, length, req_one=req_one, max_descriptors=bound)
    assert 1 <= len(out) <= (1 if req_one else bound)
    assert all(n > 0 and flags & ~(HOLE | ZERO) == 0 for n, flags in out)
    assert sum(n for n, _ in out) <= length  # never past the request
    assert sum(n for n, _ in out[:-1]) < length
    assert all(a[1] != b[1] for a, b in itertools.pairwise(out))  # merged
    # the descriptors describe the device's extents from the start
    pos = 0
    for n, flags in out:
        for offset in (pos, pos + n - 1):
            covered = 0
            for ext_len, ext_flags in extents:
                if offset < covered + ext_len:
                    assert ext_flags & (HOLE | ZERO) == flags
                    break
                covered += ext_len
        pos += n


def test_encode_block_status_reply() -> None:
    codec = with_allocation()
    request_ = BlockStatusRequest(0x77, 0, 8192, req_one=False)
    (chunk,) = codec.encode_block_status_reply(request_, [(4096, 0), (1 << 20, HOLE | ZERO)])
    ((flags, rtype, cookie, payload),) = parse_chunks(chunk)
    assert (flags, rtype, cookie) == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_BLOCK_STATUS, 0x77)
    assert parse_descriptors(payload) == (ALLOCATION_ID, [(4096, 0), (4096, HOLE | ZERO)])
    one = BlockStatusRequest(0x78, 0, 8192, req_one=True)
    (chunk,) = codec.encode_block_status_reply(one, [(4096, 0), (4096, HOLE | ZERO)])
    assert parse_descriptors(parse_chunks(chunk)[0][3]) == (ALLOCATION_ID, [(4096, 0)])
    with pytest.raises(ValueError):
        codec.encode_block_status_reply(request_, [])
    with pytest.raises(ValueError, match="encode_block_status_reply"):
        codec.encode_reply(request_)
    # errors from the device go through encode_reply as usual
    (chunk,) = parse_chunks(b"".join(codec.encode_reply(request_, p.NBD_EIO, None, "lseek")))
    assert chunk[:3] == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_ERROR, 0x77)


# A full session using every extension: frames and the events they produce.
SESSION_FRAMES = [
    client_flags(),
    SR,
    option(p.NBD_OPT_LIST_META_CONTEXT, meta_data("vol", ["base:"])),
    SET_ALLOCATION,
    option(p.NBD_OPT_GO, info_data("vol")),
    request(p.NBD_CMD_WRITE, 1, 0, 512, 0, b"w" * 512),
    request(p.NBD_CMD_BLOCK_STATUS, 2, 0, 65536),
    request(p.NBD_CMD_READ, 3, 0, 512, p.NBD_CMD_FLAG_DF),
    request(p.NBD_CMD_BLOCK_STATUS, 4, 512, 512, p.NBD_CMD_FLAG_REQ_ONE),
    request(p.NBD_CMD_DISC, 5),
]
SESSION_EVENTS: list[Event] = [
    OptionHandled(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK),
    OptionHandled(p.NBD_OPT_LIST_META_CONTEXT, p.NBD_REP_ACK),
    OptionHandled(p.NBD_OPT_SET_META_CONTEXT, p.NBD_REP_ACK),
    ExportSelected("vol", EXPORTS["vol"]),
    WriteRequest(1, 0, b"w" * 512, fua=False),
    BlockStatusRequest(2, 0, 65536, req_one=False),
    ReadRequest(3, 0, 512),
    BlockStatusRequest(4, 512, 512, req_one=True),
    DisconnectRequest(5),
]
SESSION = b"".join(SESSION_FRAMES)


@pytest.mark.parametrize("chunks", as_feeds(SESSION), ids=["whole", "bytewise"])
def test_full_extended_session(chunks: list[bytes]) -> None:
    codec = new_codec()
    events, err, _ = drive(codec, chunks, eof=True)
    assert err is None
    assert events == [*SESSION_EVENTS, ClientClosed()]
    assert codec.meta_contexts == (ALLOCATION_ID,)


def test_full_extended_session_with_trailing_bytes() -> None:
    codec = new_codec()
    events, err, _ = drive(codec, [SESSION + b"more"])
    assert events == SESSION_EVENTS
    assert err is not None and "after ending the session" in err.reason


@FUZZ
@given(cut=st.integers(0, len(SESSION)), value=st.integers(0, 255))
def test_corrupted_extended_session_only_raises_protocol_error(cut: int, value: int) -> None:
    corrupted = bytearray(SESSION)
    if cut < len(SESSION):
        corrupted[cut] = value
    codec = new_codec()
    _events, err, _ = drive(codec, [bytes(corrupted)], eof=True)
    if bytes(corrupted) == SESSION:
        assert err is None
