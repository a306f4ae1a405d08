"""Heartbeat datagrams: encoding, authentication and replay protection (sans-I/O).

A heartbeat is one UDP datagram, sent on every configured private network::

    magic    4  b"GCHB"
    version  1  1
    kind     1  1 = ping, 2 = pong
    sender   2  node id
    receiver 2  node id
    epoch    8  the sender's boot epoch (strictly larger after every restart)
    seq      8  per-sender sequence number within the epoch, from 1
    view     16 (counter u64, coordinator i64)
    stamp    8  ping: the sender's send time (float64), echoed by the pong
    extra    8  ping: commit index (u64); pong: witness lease left (float64)
    mac      16 HMAC-SHA256 over everything before it, truncated, keyed with
                the cluster heartbeat key (handed out over mutual TLS at join)

:class:`HeartbeatCodec` seals outgoing datagrams and opens incoming ones. A
datagram that is too short or too long, has a wrong magic, version or kind,
is addressed to another node or comes from an unknown one, fails the MAC, or
repeats or predates a (sender, epoch, seq) already accepted (a 64-entry
sliding window per sender, as IPsec's) is dropped and counted in
:attr:`HeartbeatCodec.dropped` by reason; nothing else changes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import Counter
from dataclasses import dataclass

from geoclus.cluster.messages import Ping, Pong, View

MAGIC = b"GCHB"
VERSION = 1
KIND_PING = 1
KIND_PONG = 2
KIND_PONG_FORCED = 3  # a Pong whose sender comes from an operator-forced view
MAC_BYTES = 16
REPLAY_WINDOW = 64
_BODY = struct.Struct(">4sBBHHQQQqdQ")
_PONG_EXTRA = struct.Struct(">d")
DATAGRAM_BYTES = _BODY.size + MAC_BYTES


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """An opened datagram: who sent it, on which epoch, and the message."""

    sender: int
    epoch: int
    seq: int
    msg: Ping | Pong


@dataclass
class _Window:
    epoch: int
    top: int  # highest seq accepted
    seen: int  # bit i set: seq top - i accepted


class HeartbeatCodec:
    """One node's heartbeat sealing and opening (see the module docstring)."""

    def __init__(self, node_id: int, nodes: frozenset[int], key: bytes, epoch: int) -> None:
        if len(key) < 16:
            raise ValueError("the heartbeat key must be at least 16 bytes")
        self.node_id = node_id
        self.nodes = nodes
        self._key = key
        self.epoch = epoch
        self._seq = 0
        self._windows: dict[int, _Window] = {}
        self.dropped: Counter[str] = Counter()
        self.accepted = 0

    def seal(self, receiver: int, msg: Ping | Pong) -> bytes:
        """The datagram carrying ``msg`` to ``receiver``."""
        self._seq += 1
        if isinstance(msg, Ping):
            kind, stamp, extra = KIND_PING, msg.sent_at, msg.commit
        else:
            kind, stamp = (KIND_PONG_FORCED if msg.forced else KIND_PONG), msg.ping_sent_at
            extra = int.from_bytes(_PONG_EXTRA.pack(msg.witness_s), "big")
        body = _BODY.pack(
            MAGIC,
            VERSION,
            kind,
            self.node_id,
            receiver,
            self.epoch,
            self._seq,
            msg.view[0],
            msg.view[1],
            stamp,
            extra,
        )
        return body + hmac.new(self._key, body, hashlib.sha256).digest()[:MAC_BYTES]

    def open(self, data: bytes) -> Heartbeat | None:
        """The heartbeat in ``data``, or None (dropped and counted) if it is
        malformed, forged, misaddressed or replayed."""
        if len(data) != DATAGRAM_BYTES:
            return self._drop("length")
        body, mac = data[: _BODY.size], data[_BODY.size :]
        magic, version, kind, sender, receiver, epoch, seq, vc, vn, stamp, extra = _BODY.unpack(
            body
        )
        if magic != MAGIC:
            return self._drop("magic")
        if version != VERSION:
            return self._drop("version")
        expected = hmac.new(self._key, body, hashlib.sha256).digest()[:MAC_BYTES]
        if not hmac.compare_digest(mac, expected):
            return self._drop("mac")
        if kind not in (KIND_PING, KIND_PONG, KIND_PONG_FORCED):
            return self._drop("kind")
        if receiver != self.node_id or sender not in self.nodes or sender == self.node_id:
            return self._drop("address")
        if seq < 1 or not self._admit(sender, epoch, seq):
            return self._drop("replay")
        view: View = (vc, vn)
        msg: Ping | Pong
        if kind == KIND_PING:
            msg = Ping(view, stamp, extra)
        else:
            (witness_s,) = _PONG_EXTRA.unpack(extra.to_bytes(8, "big"))
            msg = Pong(view, stamp, witness_s, kind == KIND_PONG_FORCED)
        self.accepted += 1
        return Heartbeat(sender, epoch, seq, msg)

    def _admit(self, sender: int, epoch: int, seq: int) -> bool:
        w = self._windows.get(sender)
        if w is None or epoch > w.epoch:
            self._windows[sender] = _Window(epoch, seq, 1)
            return True
        if epoch < w.epoch:
            return False  # from before the sender's restart
        if seq > w.top:
            shift = seq - w.top
            w.seen = ((w.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            w.top = seq
            return True
        age = w.top - seq
        if age >= REPLAY_WINDOW or w.seen >> age & 1:
            return False
        w.seen |= 1 << age
        return True

    def _drop(self, reason: str) -> Heartbeat | None:
        self.dropped[reason] += 1
        return None
