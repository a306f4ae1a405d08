"""The replication wire codec (replicator/frames.py), checked against frames
built by hand with ``struct`` and ``xxhash`` rather than against itself."""

from __future__ import annotations

import struct

import hypothesis.strategies as st
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings

from geoclus.errors import ProtocolError
from replicator.frames import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_BATCH_ENTRIES,
    Ack,
    Bye,
    Differs,
    Flush,
    FrameDecoder,
    FrameEncoder,
    Hello,
    Mode,
    PeerBitmap,
    Ping,
    Pong,
    Refuse,
    Role,
    Welcome,
    WriteEntry,
    WriteKind,
    Writes,
)

MAGIC = 0x47434C52
HEADER = ">IBBHIQQ"  # magic, version, type, flags, length, frame_no, checksum
HEADER_LEN = 28
T_HELLO, T_WELCOME, T_REFUSE, T_WRITES, T_FLUSH, T_ACK, T_PING, T_PONG, T_BYE = range(1, 10)

VID = bytes(range(16))


# --------------------------------------------------------------- hand builders


def frame(
    ftype: int,
    payload: bytes,
    frame_no: int = 1,
    *,
    magic: int = MAGIC,
    version: int = 1,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    """One frame with a correct checksum, built from the documented layout."""
    n = len(payload) if length is None else length
    zeroed = struct.pack(HEADER, magic, version, ftype, flags, n, frame_no, 0)
    checksum = xxhash.xxh3_64_intdigest(zeroed + payload)
    return zeroed[:20] + struct.pack(">Q", checksum) + payload


def hstr(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def hello_payload(node: str = "site-a", **over: int) -> bytes:
    f = dict(pmin=1, pmax=1, role=1, mode=1, flags=0, bsize=512, size=1 << 20, gen=7, app=3, dur=2)
    f.update(over)
    head = struct.pack(
        ">HHBBBxIQ16sQQQ",
        f["pmin"],
        f["pmax"],
        f["role"],
        f["mode"],
        f["flags"],
        f["bsize"],
        f["size"],
        VID,
        f["gen"],
        f["app"],
        f["dur"],
    )
    return head + hstr(node)


def entry(seq: int, kind: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">QQIBBxx", seq, offset, length, kind, flags)


def writes_payload(*entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + b"".join(entries)


HELLO_MSG = Hello(1, 1, Role.PRIMARY, Mode.SYNC, 0, 512, 1 << 20, VID, 7, 3, 2, "site-a")
WRITES_MSG = Writes(
    (
        WriteEntry(10, WriteKind.WRITE, 4096, 4, True, b"abcd"),
        WriteEntry(11, WriteKind.ZEROES, 0, 8192, False),
        WriteEntry(12, WriteKind.TRIM, 512, 512, False),
    )
)
WRITES_BYTES = writes_payload(
    entry(10, 0, 4096, 4, 1) + b"abcd", entry(11, 1, 0, 8192), entry(12, 2, 512, 512)
)

# (message, frame type, payload built by hand)
CASES = [
    (HELLO_MSG, T_HELLO, hello_payload()),
    (Welcome(1, 5, 9), T_WELCOME, struct.pack(">HxxQQ", 1, 5, 9)),
    (Refuse("no thanks"), T_REFUSE, hstr("no thanks")),
    (WRITES_MSG, T_WRITES, WRITES_BYTES),
    (Flush(12, 3), T_FLUSH, struct.pack(">QQ", 12, 3)),
    (Ack(12, 11, 3), T_ACK, struct.pack(">QQQ", 12, 11, 3)),
    (Ping(1, 2), T_PING, struct.pack(">QQ", 1, 2)),
    (Pong(3, 4), T_PONG, struct.pack(">QQ", 3, 4)),
    (Bye("shutting down"), T_BYE, hstr("shutting down")),
]
CASE_IDS = [type(c[0]).__name__ for c in CASES]
NAMES = {
    T_HELLO: "HELLO",
    T_WELCOME: "WELCOME",
    T_REFUSE: "REFUSE",
    T_WRITES: "WRITES",
    T_FLUSH: "FLUSH",
    T_ACK: "ACK",
    T_PING: "PING",
    T_PONG: "PONG",
    T_BYE: "BYE",
}


def decode_all(data: bytes, decoder: FrameDecoder | None = None) -> list:
    dec = decoder or FrameDecoder()
    dec.receive_data(data)
    out = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    return out


def refused(data: bytes, decoder: FrameDecoder | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_all(data, decoder)
    return info.value


# ------------------------------------------------------------------ strategies

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def _short_text(limit: int) -> st.SearchStrategy[str]:
    return st.text(max_size=limit // 4)


hellos = st.builds(
    Hello,
    u16,
    u16,
    st.sampled_from(Role),
    st.sampled_from(Mode),
    u8,
    u32,
    u64,
    st.binary(min_size=16, max_size=16),
    u64,
    u64,
    u64,
    _short_text(255),
)


@st.composite
def writes_batches(draw: st.DrawFn) -> Writes:
    n = draw(st.integers(1, 5))
    first = draw(st.integers(0, 2**64 - 1 - n))
    entries = []
    for i in range(n):
        kind = draw(st.sampled_from(WriteKind))
        if kind == WriteKind.WRITE:
            data = draw(st.binary(max_size=64))
            length = len(data)
        elif kind == WriteKind.DIGEST:
            data, length = draw(st.binary(min_size=8, max_size=8)), draw(u32)
        else:
            data, length = b"", draw(u32)
        entries.append(WriteEntry(first + i, kind, draw(u64), length, draw(st.booleans()), data))
    return Writes(tuple(entries))


messages = st.one_of(
    hellos,
    st.builds(Welcome, u16, u64, u64),
    st.builds(Refuse, _short_text(1024)),
    writes_batches(),
    st.builds(Flush, u64, u64),
    st.builds(Ack, u64, u64, u64),
    st.lists(u64, max_size=20, unique=True).map(lambda xs: Differs(tuple(sorted(xs)))),
    st.builds(
        PeerBitmap,
        st.lists(st.tuples(u64, st.integers(1, 2**32 - 1)), max_size=10).map(tuple),
        st.booleans(),
    ),
    st.builds(Ping, u64, u64),
    st.builds(Pong, u64, u64),
    st.builds(Bye, _short_text(1024)),
)


# ------------------------------------------------------------- layout & trips


@pytest.mark.parametrize(("msg", "ftype", "payload"), CASES, ids=CASE_IDS)
def test_encoder_output_matches_hand_built_frame(msg, ftype, payload) -> None:
    enc = FrameEncoder()
    assert enc.encode(msg) == frame(ftype, payload, 1)
    # The second frame on the connection is number 2.
    assert enc.encode(msg) == frame(ftype, payload, 2)


def test_header_fields_at_documented_offsets() -> None:
    data = FrameEncoder().encode(Ping(5, 6))
    magic, version, ftype, flags, length, frame_no, checksum = struct.unpack_from(HEADER, data)
    assert (magic, version, ftype, flags, length, frame_no) == (0x47434C52, 1, 7, 0, 16, 1)
    assert data[:4] == b"GCLR"
    assert len(data) == HEADER_LEN + 16
    zeroed = data[:20] + bytes(8) + data[28:]
    assert checksum == xxhash.xxh3_64_intdigest(zeroed)


@pytest.mark.parametrize(("msg", "ftype", "payload"), CASES, ids=CASE_IDS)
def test_decoder_reads_hand_built_frame(msg, ftype, payload) -> None:
    assert decode_all(frame(ftype, payload, 1)) == [msg]


@pytest.mark.parametrize(("msg", "ftype", "payload"), CASES, ids=CASE_IDS)
def test_one_byte_at_a_time(msg, ftype, payload) -> None:
    data = frame(ftype, payload, 1)
    dec = FrameDecoder()
    for i, b in enumerate(data):
        dec.receive_data(bytes([b]))
        got = dec.next_message()
        if i < len(data) - 1:
            assert got is None
            assert dec.want_more()
            assert dec.buffered_bytes == i + 1
        else:
            assert got == msg
    assert dec.buffered_bytes == 0
    assert dec.next_message() is None


def test_every_type_concatenated_in_one_buffer() -> None:
    data = b"".join(frame(ftype, payload, i + 1) for i, (_, ftype, payload) in enumerate(CASES))
    dec = FrameDecoder()
    assert decode_all(data, dec) == [c[0] for c in CASES]
    assert dec.frames == len(CASES)


@given(msgs=st.lists(messages, min_size=1, max_size=6), data=st.data())
@settings(max_examples=150, deadline=None)
def test_round_trip_any_chunking(msgs, data) -> None:
    enc = FrameEncoder()
    stream = b"".join(enc.encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec = FrameDecoder()
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        dec.receive_data(stream[a:b])
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == msgs


@given(msg=messages)
@settings(max_examples=100, deadline=None)
def test_round_trip_whole_and_bytewise(msg) -> None:
    wire = FrameEncoder().encode(msg)
    assert decode_all(wire) == [msg]
    dec = FrameDecoder()
    got = []
    for b in wire:
        dec.receive_data(bytes([b]))
        if (m := dec.next_message()) is not None:
            got.append(m)
    assert got == [msg]


def test_long_reason_is_cut_at_a_character_boundary() -> None:
    # 1 + 2*600 bytes of UTF-8; the 1024-byte cut falls inside a 2-byte character.
    reason = "a" + "é" * 600
    [got] = decode_all(FrameEncoder().encode(Refuse(reason)))
    assert reason.startswith(got.reason)
    assert len(got.reason.encode()) == 1023
    [got] = decode_all(FrameEncoder().encode(Bye("x" * 5000)))
    assert got.reason == "x" * 1024


# --------------------------------------------------------------- header errors


@pytest.mark.parametrize("magic", [0, 0x47434C53, 0x524C4347, 0xFFFFFFFF])
def test_bad_magic(magic) -> None:
    err = refused(frame(T_PING, bytes(16), magic=magic))
    assert "magic" in err.reason


@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version(version) -> None:
    err = refused(frame(T_PING, bytes(16), version=version))
    assert "version" in err.reason


@pytest.mark.parametrize("ftype", [0, 13, 42, 255])
def test_unknown_type(ftype) -> None:
    err = refused(frame(ftype, bytes(16)))
    assert "type" in err.reason and str(ftype) in err.reason


@pytest.mark.parametrize("flags", [1, 0x8000, 0xFFFF])
def test_nonzero_frame_flags(flags) -> None:
    err = refused(frame(T_PING, bytes(16), flags=flags))
    assert "flags" in err.reason


def test_oversized_length_refused_from_the_header_alone() -> None:
    header = frame(T_WRITES, b"", length=DEFAULT_MAX_PAYLOAD_BYTES + 1)[:HEADER_LEN]
    dec = FrameDecoder()
    dec.receive_data(header)
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert "exceeds" in info.value.reason and str(DEFAULT_MAX_PAYLOAD_BYTES) in info.value.reason


def test_length_at_the_limit_waits_for_the_payload() -> None:
    dec = FrameDecoder(max_payload_bytes=100)
    dec.receive_data(frame(T_WRITES, b"", length=100)[:HEADER_LEN])
    assert dec.next_message() is None
    dec2 = FrameDecoder(max_payload_bytes=100)
    dec2.receive_data(frame(T_WRITES, b"", length=101)[:HEADER_LEN])
    with pytest.raises(ProtocolError, match="exceeds"):
        dec2.next_message()


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_any_flipped_byte_is_refused(data) -> None:
    _msg, ftype, payload = data.draw(st.sampled_from(CASES))
    good = frame(ftype, payload, 1)
    pos = data.draw(st.integers(0, len(good) - 1))
    mask = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[pos] ^= mask
    # Small payload cap plus padding: a corrupted length either exceeds the cap
    # or is satisfied by the padding, so the decoder always reaches a verdict.
    dec = FrameDecoder(max_payload_bytes=4096)
    err = refused(bytes(bad) + bytes(4096), dec)
    if pos < 4:
        assert "magic" in err.reason
    elif pos == 4:
        assert "version" in err.reason
    elif pos in (6, 7):
        assert "flags" in err.reason
    elif 8 <= pos < 12:
        assert "checksum" in err.reason or "exceeds" in err.reason
    else:  # type, frame number, checksum, payload
        assert "checksum" in err.reason


# ----------------------------------------------------------- frame numbering


def test_replayed_frame() -> None:
    f1 = frame(T_PING, struct.pack(">QQ", 1, 1), 1)
    dec = FrameDecoder()
    dec.receive_data(f1 + f1)
    assert dec.next_message() == Ping(1, 1)
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert "frame number 1, expected 2" in info.value.reason


def test_reordered_frames() -> None:
    enc = FrameEncoder()
    f1, f2 = enc.encode(Ping(1, 0)), enc.encode(Ping(2, 0))
    err = refused(f2 + f1)
    assert "frame number 2, expected 1" in err.reason


def test_dropped_frame() -> None:
    enc = FrameEncoder()
    f1, _f2, f3 = (enc.encode(Ping(i, 0)) for i in (1, 2, 3))
    dec = FrameDecoder()
    dec.receive_data(f1 + f3)
    assert dec.next_message() == Ping(1, 0)
    with pytest.raises(ProtocolError, match="frame number 3, expected 2"):
        dec.next_message()


# ------------------------------------------------------------ payload errors


@pytest.mark.parametrize(("msg", "ftype", "payload"), CASES, ids=CASE_IDS)
def test_every_truncated_payload_is_refused(msg, ftype, payload) -> None:
    for cut in range(len(payload)):
        err = refused(frame(ftype, payload[:cut]))
        assert NAMES[ftype] in err.reason, (cut, err.reason)


@pytest.mark.parametrize(("msg", "ftype", "payload"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("extra", [b"\0", b"xyz", bytes(24)])
def test_trailing_bytes_are_refused(msg, ftype, payload, extra) -> None:
    err = refused(frame(ftype, payload + extra))
    assert NAMES[ftype] in err.reason


def test_hello_unknown_role_or_mode() -> None:
    assert "role" in refused(frame(T_HELLO, hello_payload(role=3))).reason
    assert "mode" in refused(frame(T_HELLO, hello_payload(mode=0))).reason


def test_string_not_utf8_or_too_long() -> None:
    assert "UTF-8" in refused(frame(T_REFUSE, struct.pack(">H", 2) + b"\xc3\x28")).reason
    too_long = struct.pack(">H", 1025) + b"x" * 1025
    assert "limit" in refused(frame(T_BYE, too_long)).reason
    node = struct.pack(">H", 256) + b"n" * 256
    assert "limit" in refused(frame(T_HELLO, hello_payload()[:-8] + node)).reason


def test_writes_empty_batch() -> None:
    assert "empty" in refused(frame(T_WRITES, struct.pack(">I", 0))).reason


def test_writes_too_many_entries() -> None:
    err = refused(frame(T_WRITES, struct.pack(">I", MAX_BATCH_ENTRIES + 1)))
    assert "exceeds" in err.reason and str(MAX_BATCH_ENTRIES) in err.reason
    three = writes_payload(entry(1, 1, 0, 512), entry(2, 1, 0, 512), entry(3, 1, 0, 512))
    assert "exceeds" in refused(frame(T_WRITES, three), FrameDecoder(max_entries=2)).reason
    assert len(decode_all(frame(T_WRITES, three), FrameDecoder(max_entries=3))[0].entries) == 3


@pytest.mark.parametrize("second", [5, 7, 4, 0])
def test_writes_non_consecutive_seqs(second) -> None:
    err = refused(frame(T_WRITES, writes_payload(entry(5, 1, 0, 512), entry(second, 1, 0, 512))))
    assert "does not follow" in err.reason


@pytest.mark.parametrize("kind", [4, 5, 255])
def test_writes_unknown_kind(kind) -> None:
    err = refused(frame(T_WRITES, writes_payload(entry(1, kind, 0, 512))))
    assert "kind" in err.reason


@pytest.mark.parametrize("flags", [0x02, 0x80, 0x03, 0xFF])
def test_writes_unknown_entry_flags(flags) -> None:
    err = refused(frame(T_WRITES, writes_payload(entry(1, 1, 0, 512, flags))))
    assert "flags" in err.reason


def test_writes_data_length_mismatch() -> None:
    # Header says 512 bytes, only 100 follow.
    err = refused(frame(T_WRITES, writes_payload(entry(1, 0, 0, 512) + b"x" * 100)))
    assert "WRITES" in err.reason and "truncated" in err.reason
    # Header says 10 bytes, 20 follow.
    err = refused(frame(T_WRITES, writes_payload(entry(1, 0, 0, 10) + b"x" * 20)))
    assert "trailing" in err.reason
    # ZEROES carries no data.
    err = refused(frame(T_WRITES, writes_payload(entry(1, 1, 0, 512) + b"x" * 512)))
    assert "trailing" in err.reason


# -------------------------------------------------------------- stays broken


def test_decoder_stays_broken_after_an_error() -> None:
    dec = FrameDecoder()
    dec.receive_data(frame(T_PING, bytes(16), magic=0))
    with pytest.raises(ProtocolError) as first:
        dec.next_message()
    for _ in range(3):
        with pytest.raises(ProtocolError) as again:
            dec.next_message()
        assert again.value.reason == first.value.reason
        with pytest.raises(ProtocolError):
            dec.receive_data(FrameEncoder().encode(Ping(1, 1)))
    assert dec.buffered_bytes == 0


def test_decoder_broken_by_a_bad_payload_refuses_later_good_frames() -> None:
    enc = FrameEncoder()
    good1 = enc.encode(Ping(1, 1))
    bad2 = frame(T_ACK, bytes(5), 2)
    dec = FrameDecoder()
    dec.receive_data(good1 + bad2)
    assert dec.next_message() == Ping(1, 1)
    with pytest.raises(ProtocolError):
        dec.next_message()
    with pytest.raises(ProtocolError):
        dec.receive_data(frame(T_PING, bytes(16), 3))
    with pytest.raises(ProtocolError):
        dec.next_message()


# --------------------------------------------------------------------- fuzz


MESSAGE_CLASSES = (Hello, Welcome, Refuse, Writes, Flush, Ack, Ping, Pong, Bye)


@given(prefix=st.sampled_from([b"", b"GCLR", b"GCLR\x01"]), data=st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_fuzz_random_bytes(prefix, data) -> None:
    dec = FrameDecoder()
    dec.receive_data(prefix + data)
    try:
        while (msg := dec.next_message()) is not None:
            assert isinstance(msg, MESSAGE_CLASSES)
    except ProtocolError as exc:
        assert exc.reason
        with pytest.raises(ProtocolError):
            dec.next_message()
    else:
        assert dec.want_more()


@given(ftype=st.integers(0, 12), payload=st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_fuzz_checksummed_random_payloads(ftype, payload) -> None:
    """Frames that pass the header and checksum checks but carry random payloads
    reach the payload decoders: a message of the frame's type or ProtocolError."""
    classes = {
        T_HELLO: Hello,
        T_WELCOME: Welcome,
        T_REFUSE: Refuse,
        T_WRITES: Writes,
        T_FLUSH: Flush,
        T_ACK: Ack,
        T_PING: Ping,
        T_PONG: Pong,
        T_BYE: Bye,
    }
    try:
        got = decode_all(frame(ftype, payload))
    except ProtocolError:
        return
    assert len(got) == 1
    assert isinstance(got[0], classes[ftype])


@given(
    msgs=st.lists(messages, min_size=1, max_size=5),
    data=st.data(),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_corrupted_stream_never_yields_a_wrong_message(msgs, data) -> None:
    enc = FrameEncoder()
    stream = bytearray(b"".join(enc.encode(m) for m in msgs))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "duplicate", "truncate"]))
        a = data.draw(st.integers(0, len(stream)))
        b = data.draw(st.integers(a, min(len(stream), a + 40)))
        if op == "flip" and a < len(stream):
            stream[a] ^= data.draw(st.integers(1, 255))
        elif op == "delete":
            del stream[a:b]
        elif op == "insert":
            stream[a:a] = data.draw(st.binary(min_size=1, max_size=30))
        elif op == "duplicate":
            stream[a:a] = stream[a:b]
        elif op == "truncate":
            del stream[a:]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    dec = FrameDecoder()
    got: list = []
    try:
        for x, y in zip([0, *cuts], [*cuts, len(stream)]):
            dec.receive_data(bytes(stream[x:y]))
            while (m := dec.next_message()) is not None:
                got.append(m)
    except ProtocolError:
        pass
    assert got == msgs[: len(got)]


def test_welcome_flags_and_resync_done_round_trip() -> None:
    from replicator.frames import WELCOME_FLAG_RESYNC, ResyncDone

    msgs = [Welcome(1, 501, 900, WELCOME_FLAG_RESYNC), ResyncDone(1234, b"\x01" * 40)]
    enc, dec = FrameEncoder(), FrameDecoder()
    for m in msgs:
        dec.receive_data(enc.encode(m))
    assert [dec.next_message(), dec.next_message()] == msgs


def test_welcome_with_unknown_flags_is_refused() -> None:
    dec = FrameDecoder()
    dec.receive_data(frame(2, struct.pack(">HHQQ", 1, 0x80, 1, 1)))  # 2 = WELCOME
    with pytest.raises(ProtocolError, match="unknown flags"):
        dec.next_message()


def test_differs_round_trip_and_bounds() -> None:
    """DIFFERS carries strictly increasing seqs; anything else is refused."""
    msg = Differs((3, 9, 40))
    dec = FrameDecoder()
    dec.receive_data(FrameEncoder().encode(msg))
    assert dec.next_message() == msg
    bad = struct.pack(">I", 2) + struct.pack(">QQ", 9, 3)
    assert "increasing" in refused(frame(11, bad)).reason
    short = struct.pack(">I", 3) + struct.pack(">Q", 1)
    assert "count" in refused(frame(11, short)).reason


def test_digest_entry_carries_eight_bytes() -> None:
    """A DIGEST entry's data is exactly its 8-byte digest, whatever its length."""
    e = WriteEntry(5, WriteKind.DIGEST, 65536, 65536, False, b"12345678")
    dec = FrameDecoder()
    dec.receive_data(FrameEncoder().encode(Writes((e,))))
    got = dec.next_message()
    assert got == Writes((e,))
    assert e.wire_bytes == 24 + 8


def test_peer_bitmap_bounds() -> None:
    """PEER_BITMAP: empty runs, unknown flags and bad lengths are refused."""
    head = struct.pack(">BI", 0, 1)
    assert "empty run" in refused(frame(12, head + struct.pack(">QI", 5, 0))).reason
    assert "flags" in refused(frame(12, struct.pack(">BI", 2, 0))).reason
    assert "length" in refused(frame(12, head)).reason
