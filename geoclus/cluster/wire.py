"""The cluster service's stream messages on the wire (sans-I/O).

Everything but heartbeats travels over mutual TLS as frames::

    length  4   big-endian byte count of the body (at most ``max_frame_bytes``)
    body        UTF-8 JSON: {"t": TYPE, "m": {FIELD: VALUE, ...}}

``TYPE`` is the class name of a node-core message (geoclus/cluster/messages.py),
a witness message (quorum/witness.py) or one of the shell messages below.
Fields are decoded against the dataclass's type hints: views are ``[counter,
node]``, node sets are lists of ints, log entries are objects. Decoding is
strict: an unknown type, a missing or extra field, a value of the wrong type,
bad JSON or an over-long frame raises :class:`WireError` naming what is wrong,
and nothing reaches a core. (Integrity and authenticity come from TLS.)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import struct
import types
import typing
from dataclasses import dataclass
from typing import Any

import trio

from geoclus.cluster import messages as m
from geoclus.errors import GeoclusError
from quorum.mirror import MirrorClaim, MirrorReply
from quorum.witness import VoteReply, VoteRequest

DEFAULT_MAX_FRAME_BYTES = 32 * 1024 * 1024
_LEN = struct.Struct(">I")


class WireError(GeoclusError):
    """A frame could not be decoded; the message names the problem."""


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame each way on a node-to-node or node-to-witness connection:
    who I am (the certificate already proved it), my boot epoch, and my
    heartbeat key (generation, hex). Each side adopts the key with the higher
    ``(generation, key)``, so a joining node receives the cluster's key over
    mutual TLS and every node converges on one key."""

    cluster: str
    node: str
    epoch: int
    key_generation: int
    key_hex: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The last frame before a close: why the peer is refused (evicted,
    unknown, another cluster)."""

    reason: str


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event as logged by ``origin`` (``seq`` from 1 per origin and boot
    epoch; ``wall_time`` is the origin's clock, for people only)."""

    origin: str
    epoch: int
    seq: int
    wall_time: float
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events of the sender, in order, for the receiver's cluster-wide log."""

    events: tuple[EventRecord, ...]


@dataclass(frozen=True, slots=True)
class EventAck:
    """The receiver holds the sender's events up to ``(epoch, seq)``."""

    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class Leave:
    """A planned exit: the sender stops; the locker takes it out of the view
    without waiting for missed heartbeats."""

    node: str


TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        m.Prepare,
        m.Promise,
        m.Reject,
        m.NewView,
        m.Installed,
        m.Append,
        m.Appended,
        m.Submit,
        m.Ping,
        m.Pong,
        VoteRequest,
        VoteReply,
        MirrorClaim,
        MirrorReply,
        Hello,
        Refused,
        EventBatch,
        EventAck,
        Leave,
    )
}


def to_json(value: Any) -> Any:
    """Plain JSON values for a message (views and sets become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, frozenset | set):
        return sorted(to_json(v) for v in value)
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    return value


def encode(msg: Any) -> bytes:
    """The frame carrying ``msg``."""
    name = type(msg).__name__
    if TYPES.get(name) is not type(msg):
        raise WireError(f"{name} is not a wire message")
    body = json.dumps(
        {"t": name, "m": to_json(msg)}, separators=(",", ":"), allow_nan=False
    ).encode()
    return _LEN.pack(len(body)) + body


def _hints(cls: type) -> dict[str, Any]:
    cached = _HINTS.get(cls)
    if cached is None:
        cached = _HINTS[cls] = typing.get_type_hints(cls)
    return cached


_HINTS: dict[type, dict[str, Any]] = {}


def from_json(tp: Any, value: Any, where: str) -> Any:
    """Strictly decode ``value`` as type ``tp``; WireError names ``where``."""
    if tp is Any:
        return value
    if tp is types.NoneType:
        if value is not None:
            raise WireError(f"{where}: expected null")
        return None
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise WireError(f"{where}: expected true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"{where}: expected an integer")
        return value
    if tp is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise WireError(f"{where}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise WireError(f"{where}: expected a string")
        return value
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return from_json(alt, value, where)
            except WireError:
                continue
        raise WireError(f"{where}: matches none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise WireError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is frozenset:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list")
        return frozenset(from_json(arg, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, where)
    raise WireError(f"{where}: cannot decode {tp}")  # pragma: no cover - a schema bug


def _dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected an object")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(value) - set(fields)
    if extra:
        raise WireError(f"{where}: unknown field {sorted(extra)[0]!r}")
    kwargs = {}
    for name, f in fields.items():
        if name not in value:
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if has_default:
                continue
            raise WireError(f"{where}: missing field {name!r}")
        kwargs[name] = from_json(hints[name], value[name], f"{where}.{name}")
    return cls(**kwargs)


def decode_body(body: bytes) -> Any:
    """The message in one frame body (without its length prefix)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WireError("frame body is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"t", "m"} or not isinstance(doc["t"], str):
        raise WireError('frame body must be {"t": TYPE, "m": {...}}')
    cls = TYPES.get(doc["t"])
    if cls is None:
        raise WireError(f"unknown message type {doc['t'][:40]!r}")
    return _dataclass(cls, doc["m"], doc["t"])


class FrameReader:
    """Splits a byte stream into decoded messages; bounded by ``max_frame_bytes``."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._ready: collections.deque[Any] = collections.deque()

    async def next(self, stream: Any, receive_bytes: int = 65536) -> Any:
        """The next message from a trio stream; ``trio.BrokenResourceError``
        when the peer closed, WireError on a bad frame."""
        while not self._ready:
            data = await stream.receive_some(receive_bytes)
            if not data:
                raise trio.BrokenResourceError("the peer closed the connection")
            self._ready.extend(self.feed(data))
        return self._ready.popleft()

    def feed(self, data: bytes) -> list[Any]:
        """Messages completed by ``data``; raises WireError on the first bad
        frame (the connection must then be closed: the stream is out of step)."""
        self._buf += data
        out = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self.max_frame_bytes:
                raise WireError(f"frame of {n} bytes is over the {self.max_frame_bytes} limit")
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size : _LEN.size + n])
            del self._buf[: _LEN.size + n]
            out.append(decode_body(body))
        return out

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)
