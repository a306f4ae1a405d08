"""``geoclus node run``: one node's cluster service, the trio shell around
:class:`~geoclus.cluster.node.NodeCore`.

What the shell adds to the core (docs/cluster.md, "The node daemon"):

* **Heartbeats** are UDP datagrams (geoclus/cluster/heartbeat.py) sent on
  every configured private network from this node's address on it; a pong
  goes back on the network its ping came in on. A peer is reachable while
  any network delivers; a network that stops delivering to a peer is an
  event, not a failover. Every pong measures the round trip on its network
  (quorum/rtt.py keeps the window and raises the budget events).
* **Everything else** travels over mutual TLS (geoclus/cluster/wire.py): one
  outgoing connection per peer (and one to the witness) carries this node's
  messages; incoming connections carry the peers'. A certificate that is not
  a configured node of this cluster, or names an evicted node, is refused.
  The first frame each way is a Hello carrying the heartbeat key, so a node
  that joins receives the key over mutual TLS; evicting a node rotates it.
* **Durability**: a ``Persist`` action is made durable (StateDir.save_disk,
  fsync) before any message after it is sent.
* **The configuration database** applies every committed log entry in order;
  a checkpoint is written every ``snapshot_interval_s``.
* **Events** (the core's, plus networks, round-trip budget and key changes)
  are logged locally and pushed in batches to every peer, which acknowledge
  them; every node thus holds the cluster-wide history.
* **Control socket** (``state_dir/control.sock``): status, events, submit,
  backup, restore, evict, leave, force-quorum, check-latency.

Every queue is bounded: the inbox (``max_inbox``), each peer's outbox
(``max_outbox``); a full queue drops the message and counts it (the core
resends what matters).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import math
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from geoclus.ca import client_ssl_context, peer_node_name, server_ssl_context
from geoclus.cluster import wire
from geoclus.cluster.config import ClusterConfig
from geoclus.cluster.configdb import ConfigDb, ConfigDbError, validate_update
from geoclus.cluster.heartbeat import DATAGRAM_BYTES, HeartbeatCodec
from geoclus.cluster.messages import Ping, Pong, Snapshot
from geoclus.cluster.node import (
    WITNESS,
    Event,
    ForceRefused,
    NodeCore,
    Persist,
    ReadLog,
    Send,
    WriteLog,
)
from geoclus.cluster.qdisk import Mirror, QuorumDisk, probe_mirrors
from geoclus.cluster.state import StateDir
from geoclus.config import Endpoint
from geoclus.control import serve_control
from geoclus.errors import GeoclusError
from geoclus.tlsstream import TlsSocketStream, wrap_client, wrap_server
from quorum.arbitration import ReadDisk, WriteDisk
from quorum.rtt import RttWindow, verdict
from quorum.votes import QuorumKind
from quorum.witness import VoteReply, VoteRequest

log = logging.getLogger("geoclus.cluster")

CONNECT_TIMEOUT_S = 2.0
HELLO_TIMEOUT_S = 5.0
RECONNECT_S = 0.5
EVENT_BATCH_MAX = 256
WITNESS_NAME = "witness"
_LINK_ERRORS = (trio.BrokenResourceError, trio.TooSlowError, wire.WireError, GeoclusError)


@dataclass
class _Peer:
    id: int
    name: str
    site: str
    addresses: tuple[Endpoint, ...]
    outbox_send: trio.MemorySendChannel[Any]
    outbox_recv: trio.MemoryReceiveChannel[Any]
    connected: bool = False
    pong_at: dict[int, float] = field(default_factory=dict)  # network -> last pong (trio time)
    net_up: dict[int, bool] = field(default_factory=dict)
    rtt: dict[int, RttWindow] = field(default_factory=dict)
    events_acked: tuple[int, int] = (0, 0)
    epoch: int = 0
    left_epoch: int = -1  # the epoch in which it announced a planned leave
    probes: dict[float, int] | None = None  # check-latency: ping sent_at -> network
    probe_rtts: dict[int, list[float]] = field(default_factory=dict)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


_DISK = object()  # inbox source of quorum disk results


class NodeDaemon:
    """One node's cluster service; see the module docstring."""

    def __init__(
        self,
        cfg: ClusterConfig,
        *,
        control_path: str | None = None,
        max_inbox: int = 4096,
        max_outbox: int = 1024,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.cfg = cfg
        self.spec = cfg.spec()
        self.ids = cfg.node_ids
        self.names = {i: n for n, i in self.ids.items()}
        self.me = self.ids[cfg.node]
        self.entry = cfg.nodes[self.me]
        self.state = StateDir(cfg.state_dir)
        self.control_path = control_path or os.path.join(cfg.state_dir, "control.sock")
        self.max_frame_bytes = max_frame_bytes
        self.server_ctx = server_ssl_context(cfg.ca, cfg.cert, cfg.key)
        self.client_ctx = client_ssl_context(cfg.ca, cfg.cert, cfg.key)
        # The quorum disk's exports: NBD STARTTLS with this node's certificate.
        self._disk_tls = self.client_ctx if cfg.quorum_disk_tls else None
        self.epoch = self.state.next_epoch()
        disk = self.state.load_disk()
        self.core = NodeCore(self.me, self.spec, disk, 0.0)  # rebuilt on trio's clock in run()
        self.db = ConfigDb(cfg.name)
        # The last applied updates' ids -> index (bounded): what waiting
        # submitters look for, as entries may be compacted on commit.
        self._applied_uids: collections.OrderedDict[str, int] = collections.OrderedDict()
        key = self.state.load_key()
        if key is None:
            key = (0, StateDir.new_key())  # provisional until a view forms or a peer's wins
            self.state.save_key(*key)
        self.key_generation, self.key = key
        self.codec = HeartbeatCodec(self.me, frozenset(self.ids.values()), self.key, self.epoch)
        self._old_codec: HeartbeatCodec | None = None
        self._old_codec_until = 0.0
        self.peers: dict[int, _Peer] = {}
        for n in cfg.nodes:
            i = self.ids[n.name]
            if i == self.me:
                continue
            s, r = trio.open_memory_channel[Any](max_outbox)
            self.peers[i] = _Peer(i, n.name, n.site, n.addresses, s, r)
        self.witness_out_send, self.witness_out_recv = trio.open_memory_channel[Any](max_outbox)
        self.witness_connected = False
        self.inbox_send, self.inbox_recv = trio.open_memory_channel[Any](max_inbox)
        self.dropped: Counter[str] = Counter()
        self._lock = trio.Lock()
        self._udp: list[trio.socket.SocketType] = []
        self.events: list[wire.EventRecord] = self.state.load_events()
        self._event_keys = {(e.origin, e.epoch, e.seq) for e in self.events}
        self._event_seq = itertools.count(1)
        self._new_events = trio.Event()
        self._uid = itertools.count(1)
        self._committed = trio.Event()
        self._stopping = False
        self._cancel: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.started_at = 0.0
        self._last_checkpoint = 0.0
        self._was_acting = False
        self._ip_of = {(a.host, a.port): i for i, a in enumerate(self.entry.addresses)}
        self.qdisk: QuorumDisk | None = None
        self.mirror_rtt_s: dict[str, float | None] = {}
        self.mirrors = tuple(Mirror(e.host, e.port) for e in cfg.quorum_disk_mirrors)
        self._apply_committed()  # rebuild the database: the snapshot, then the log after it

    # --- startup -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or told to leave."""
        if self.cfg.quorum is QuorumKind.DISK:
            await self._check_mirrors()
        self.core = NodeCore(self.me, self.spec, self.core.disk, trio.current_time())
        self.started_at = trio.current_time()
        self._last_checkpoint = self.started_at
        listeners = []
        for net, addr in enumerate(self.entry.addresses):
            udp = trio.socket.socket(_family(addr.host), socket.SOCK_DGRAM)
            try:
                await udp.bind((addr.host, addr.port))
            except OSError as exc:
                raise GeoclusError(
                    f"cannot bind heartbeats to {addr} (network {net}): {exc.strerror}; "
                    "is another node using it, or is the address not on this host?"
                ) from None
            self._udp.append(udp)
            tcp = trio.socket.socket(_family(addr.host), socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                await tcp.bind((addr.host, addr.port))
            except OSError as exc:
                raise GeoclusError(f"cannot listen on {addr}: {exc.strerror}") from None
            tcp.listen(64)
            listeners.append(trio.SocketListener(tcp))
        self._event("node", f"node {self.cfg.node} starts (epoch {self.epoch})")
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self._nursery = nursery
            if self.cfg.quorum is QuorumKind.DISK:
                assert self.cfg.quorum_disk_volume is not None
                self.qdisk = QuorumDisk(
                    self.mirrors,
                    self.cfg.quorum_disk_volume,
                    self.spec.arbitration.max_io_s,
                    nursery,
                    local_address=self.entry.addresses[0].host,
                    tls_context=self._disk_tls,
                )
            nursery.start_soon(self._core_loop)
            for net, udp in enumerate(self._udp):
                nursery.start_soon(self._udp_loop, net, udp)
            nursery.start_soon(trio.serve_listeners, self._serve_conn, listeners)
            for peer in self.peers.values():
                nursery.start_soon(self._link, peer)
            if self.cfg.witness is not None:
                nursery.start_soon(self._witness_link)
            nursery.start_soon(self._housekeeping)
            await nursery.start(serve_control, self.control_path, self._control)
            task_status.started()

    async def _check_mirrors(self) -> None:
        """Measure the round trip to the quorum disk's mirrors and refuse to
        start over ``rtt_budget_us`` unless the operator allowed it."""
        assert self.cfg.quorum_disk_volume is not None
        if self._disk_tls is None:
            self._event(
                "arbitration",
                "the quorum disk is reached over plain TCP: set [quorum_disk] tls = true and "
                "give the quorum volume's exports a tls table from the cluster CA",
            )
        self.mirror_rtt_s = await probe_mirrors(
            self.mirrors,
            self.cfg.quorum_disk_volume,
            local_address=self.entry.addresses[0].host,
            tls_context=self._disk_tls,
        )
        measured = {m: v for m, v in self.mirror_rtt_s.items() if v is not None}
        budget_us = self.cfg.timers.rtt_budget_us
        text = ", ".join(f"{m} {v * 1e6:.0f} us" for m, v in measured.items()) or "none"
        unreachable = sorted(m for m, v in self.mirror_rtt_s.items() if v is None)
        if unreachable:
            self._event(
                "arbitration",
                f"quorum disk mirror(s) {unreachable} unreachable at start: the disk fails "
                "closed until both answer (or an operator decides)",
            )
        over = {m: v for m, v in measured.items() if v * 1e6 > budget_us}
        if not over:
            self._event("rtt", f"quorum disk mirrors within rtt_budget_us = {budget_us:g}: {text}")
            return
        if not self.cfg.allow_over_budget:
            raise GeoclusError(
                f"the quorum disk's mirrors answer in {text}, over rtt_budget_us = "
                f"{budget_us:g} (a disk quorum is only as fast and as safe as its slowest "
                "mirror): bring the mirrors closer, raise [timers] rtt_budget_us, or set "
                "[quorum_disk] allow_over_budget = true to start anyway"
            )
        self._event(
            "rtt",
            f"quorum disk mirrors OVER rtt_budget_us = {budget_us:g} ({text}); starting "
            "because quorum_disk.allow_over_budget = true",
        )

    async def _disk_io(self, op: ReadDisk | WriteDisk | ReadLog | WriteLog) -> None:
        """Carry out one quorum disk operation and hand its result to the core
        (through the inbox, so the core loop re-reads its deadlines)."""
        disk = self.qdisk
        assert disk is not None
        started = trio.current_time()
        core = self.core
        result: Callable[[float], list[Any]]
        if isinstance(op, ReadDisk):
            rec = await disk.read_record()
            result = lambda now: core.on_disk_read(op.tag, rec, started, now)  # noqa: E731
        elif isinstance(op, WriteDisk):
            ok = await disk.write_record(op.record)
            result = lambda now: core.on_disk_written(op.tag, ok, started, now)  # noqa: E731
        elif isinstance(op, ReadLog):
            image = await disk.read_log()
            problem = check_snapshot(image, self.cfg.name, self.ids) if image is not None else ""
            if problem:
                self._event("arbitration", f"the quorum disk's log is refused: {problem}")
                image = None  # a failed read: the view change fails, nothing is adopted
            result = lambda now: core.on_log_read(image, now)  # noqa: E731
        else:
            ok = await disk.write_log(op.image)
            result = lambda now: core.on_log_written(op.image, ok, started, now)  # noqa: E731
        await self.inbox_send.send((_DISK, result, None))

    # --- the core ------------------------------------------------------------------

    async def _core_loop(self) -> None:
        while True:
            item = None
            with trio.move_on_at(self.core.next_deadline()):
                item = await self.inbox_recv.receive()
            async with self._lock:
                now = trio.current_time()
                if item is None:
                    actions = self.core.on_tick(now)
                    net = None
                else:
                    src, msg, net = item
                    if src is _DISK:
                        actions = msg(now)
                    else:
                        actions = self.core.on_message(src, msg, now)
                await self._run(actions, net)

    async def _run(self, actions: list[Any], reply_net: int | None) -> None:
        """Carry out the core's actions in order (under ``_lock``)."""
        dirty = False
        for a in actions:
            if isinstance(a, Persist):
                dirty = True
            elif isinstance(a, Send):
                if dirty:
                    await self._persist()
                    dirty = False
                await self._send(a.to, a.msg, reply_net)
            elif isinstance(a, Event):
                self._event(a.kind, self._names_in(a.message))
            elif isinstance(a, ReadDisk | WriteDisk | ReadLog | WriteLog):
                if dirty:
                    await self._persist()
                    dirty = False
                if self._nursery is not None and self.qdisk is not None:
                    self._nursery.start_soon(self._disk_io, a)
        if dirty:
            await self._persist()
        self._apply_committed()
        if self.core.compaction_due():
            await self._compact(f"{self.spec.log_compact_entries} committed entries gathered")
        if self.core.evicted and not self._stopping and self._nursery is not None:
            self._stopping = True
            self._event("membership", f"node {self.cfg.node} is evicted: the service stops")
            self._nursery.start_soon(self._announce_exit)
        acting = self.core.acting(trio.current_time())
        if acting and self.key_generation == 0 and self.core.is_locker:
            self._set_key(1, self.key, "the first view formed: key generation 1")

    async def _persist(self) -> None:
        disk = self.core.disk.copy()
        await trio.to_thread.run_sync(self.state.save_disk, disk)

    def _apply_committed(self) -> None:
        d = self.core.disk
        changed = False
        if self.db.version < d.base.index:
            # Behind the log's snapshot (a joiner, or a node back from a long
            # absence): take the checkpoint, then replay the entries after it.
            # Incoming snapshots were checked on arrival (check_snapshot).
            self.db = ConfigDb.from_state(d.base.state, self.cfg.name)
            self._event(
                "config",
                f"configuration version {self.db.version} taken from the log's snapshot",
            )
            changed = True
        while self.db.version < d.commit:
            entry = d.log[self.db.version - d.base.index]
            try:
                self.db.apply(entry.index, entry.payload)
            except ConfigDbError as exc:
                # Every node refuses the same committed update the same way.
                self.db.version = entry.index
                self._event("config", f"update {entry.index} ({entry.uid}) refused: {exc}")
            else:
                self._on_applied(entry.payload)
            self._applied_uids[entry.uid] = entry.index
            while len(self._applied_uids) > self.spec.dedupe_uids:
                self._applied_uids.popitem(last=False)
            changed = True
        if changed:
            self._committed.set()
            self._committed = trio.Event()

    def _on_applied(self, update: Any) -> None:
        op = update.get("op") if isinstance(update, dict) else None
        if op == "evict":
            name = update["node"]
            self._event("membership", f"node {name} evicted: its certificate is refused")
            if self.core.is_locker and self.started_at > 0:
                self._set_key(self.key_generation + 1, StateDir.new_key(), f"{name} evicted")

    # --- sending ---------------------------------------------------------------------

    async def _send(self, to: int, msg: Any, reply_net: int | None) -> None:
        if to == WITNESS:
            self._enqueue(self.witness_out_send, msg, "witness outbox full")
            return
        peer = self.peers.get(to)
        if peer is None or self.names[to] in self.db.evicted:
            return
        if isinstance(msg, Ping | Pong):
            nets = [reply_net] if isinstance(msg, Pong) and reply_net is not None else None
            await self._send_heartbeat(peer, msg, nets)
            return
        self._enqueue(peer.outbox_send, msg, f"outbox to {peer.name} full")

    def _enqueue(self, channel: trio.MemorySendChannel[Any], msg: Any, why: str) -> None:
        try:
            channel.send_nowait(msg)
        except trio.WouldBlock:
            self.dropped[why] += 1

    async def _send_heartbeat(self, peer: _Peer, msg: Ping | Pong, nets: list[int] | None) -> None:
        for net in nets if nets is not None else range(len(self._udp)):
            addr = peer.addresses[net]
            try:
                await self._udp[net].sendto(self.codec.seal(peer.id, msg), (addr.host, addr.port))
            except OSError as exc:
                self.dropped[f"udp send: {errno.errorcode.get(exc.errno or 0, exc)}"] += 1

    # --- heartbeats in -----------------------------------------------------------------

    async def _udp_loop(self, net: int, udp: trio.socket.SocketType) -> None:
        while True:
            try:
                data, _ = await udp.recvfrom(DATAGRAM_BYTES + 1)
            except OSError:
                continue
            hb = self.codec.open(data)
            old = self._old_codec
            if hb is None and old is not None and trio.current_time() < self._old_codec_until:
                hb = old.open(data)
                if hb is not None:
                    self.codec.dropped["mac"] -= 1  # accepted under the previous key
            if hb is None:
                continue
            peer = self.peers.get(hb.sender)
            if peer is None or peer.name in self.db.evicted:
                self.codec.dropped["evicted"] += 1
                continue
            if hb.epoch <= peer.left_epoch:
                continue  # it left on purpose; it is back only with a new epoch
            now = trio.current_time()
            if isinstance(hb.msg, Pong):
                self._on_pong(peer, net, hb.msg, now)
                if peer.probes is not None and hb.msg.ping_sent_at in peer.probes:
                    continue  # a check-latency probe: measured, not a heartbeat
            if self._lock.locked():
                self._enqueue(self.inbox_send, (hb.sender, hb.msg, net), "inbox full")
                continue
            # The core is idle: answer here, without a trip through the inbox,
            # so the round trips we measure are the network's, not our queue's.
            async with self._lock:
                now = trio.current_time()
                await self._run(self.core.on_message(hb.sender, hb.msg, now), net)

    def _on_pong(self, peer: _Peer, net: int, pong: Pong, now: float) -> None:
        rtt_us = (now - pong.ping_sent_at) * 1e6
        if not 0 <= rtt_us < 600e6:
            return
        if peer.probes is not None and pong.ping_sent_at in peer.probes:
            peer.probe_rtts.setdefault(net, []).append(rtt_us)
            return
        peer.pong_at[net] = now
        if not peer.net_up.get(net, False):
            peer.net_up[net] = True
            if len(self.entry.addresses) > 1 or now - self.started_at > 5:
                self._event("network", f"network {net} to {peer.name} is up")
        window = peer.rtt.get(net)
        if window is None:
            t = self.cfg.timers
            window = peer.rtt[net] = RttWindow(t.rtt_budget_us, 60.0, t.rtt_sustained_s)
        change = window.add(rtt_us, now)
        if change is not None:
            s = window.stats()
            self._event(
                "rtt",
                f"round trip to {peer.name} on network {net}: {change} "
                f"(p99 {s.p99_us:.0f} us, budget {t_budget(self.cfg):.0f} us)",
            )

    # --- TLS links -------------------------------------------------------------------

    def _hello(self) -> wire.Hello:
        return wire.Hello(
            self.cfg.name, self.cfg.node, self.epoch, self.key_generation, self.key.hex()
        )

    def _set_key(self, generation: int, key: bytes, why: str) -> None:
        if (generation, key) == (self.key_generation, self.key):
            return
        self._old_codec = self.codec
        self._old_codec_until = trio.current_time() + 3 * self.cfg.timers.heartbeat_interval_s
        self.key_generation, self.key = generation, key
        self.state.save_key(generation, key)
        codec = HeartbeatCodec(self.me, frozenset(self.ids.values()), key, self.epoch)
        codec._seq = self.codec._seq  # keep the sequence rising within the epoch
        codec._windows = self.codec._windows
        codec.dropped = self.codec.dropped
        codec.accepted = self.codec.accepted
        self.codec = codec
        self._event("key", f"heartbeat key generation {generation} ({why})")
        for peer in self.peers.values():
            if peer.connected:
                self._enqueue(peer.outbox_send, self._hello(), f"outbox to {peer.name} full")

    def _adopt_key(self, hello: wire.Hello) -> None:
        if hello.key_generation < 0 or not hello.key_hex:
            return
        try:
            key = bytes.fromhex(hello.key_hex)
        except ValueError:
            return
        if len(key) >= 16 and (hello.key_generation, key) > (self.key_generation, self.key):
            self._set_key(hello.key_generation, key, f"received from {hello.node}")

    def _check_hello(self, hello: Any, expected: str) -> wire.Hello:
        if not isinstance(hello, wire.Hello):
            raise GeoclusError(f"{expected} did not start with a Hello")
        if hello.cluster != self.cfg.name:
            raise GeoclusError(
                f"{expected} belongs to cluster {hello.cluster!r}, not {self.cfg.name!r}"
            )
        if hello.node != expected:
            raise GeoclusError(f"the peer says it is {hello.node!r}, its certificate {expected!r}")
        return hello

    async def _open(self, addresses: tuple[Endpoint, ...], expected: str) -> TlsSocketStream:
        """A mutual-TLS connection to ``expected``, trying each network in turn."""
        last: Exception | None = None
        for net, addr in enumerate(addresses):
            local = self.entry.addresses[min(net, len(self.entry.addresses) - 1)].host
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    tcp = await trio.open_tcp_stream(addr.host, addr.port, local_address=local)
                    tls = await wrap_client(tcp, self.client_ctx)
                name = peer_node_name(tls.ssl_object)
                if name != expected:
                    await tls.aclose()
                    raise GeoclusError(f"{addr} presented {name!r}, expected {expected!r}")
                return tls
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, GeoclusError) as exc:
                last = exc
        raise GeoclusError(f"cannot reach {expected}: {last}")

    async def _outgoing(
        self,
        expected: str,
        addresses: tuple[Endpoint, ...],
        outbox: trio.MemoryReceiveChannel[Any],
        on_hello: Callable[[Any], None],
        on_frame: Callable[[Any], None],
        set_connected: Callable[[bool], None],
    ) -> None:
        """One outgoing link kept open: connect (each network in turn),
        exchange Hellos (``on_hello`` raises GeoclusError to refuse the
        answer), send the outbox, hand every frame received back to
        ``on_frame``; on any link failure reconnect after ``RECONNECT_S``
        (what was queued meanwhile is dropped: the core resends)."""
        while True:
            if expected in self.db.evicted:
                await trio.sleep(RECONNECT_S * 4)
                continue
            try:
                tls = await self._open(addresses, expected)
            except GeoclusError:
                await self._drain(outbox)
                await trio.sleep(RECONNECT_S)
                continue
            try:
                async with tls:
                    await tls.send_all(wire.encode(self._hello()))
                    reader = wire.FrameReader(self.max_frame_bytes)
                    with trio.fail_after(HELLO_TIMEOUT_S):
                        first = await reader.next(tls)
                    if isinstance(first, wire.Refused):
                        raise GeoclusError(f"{expected} refused us: {first.reason}")
                    on_hello(first)
                    set_connected(True)
                    async with trio.open_nursery() as n:
                        n.start_soon(self._receive_replies, tls, reader, on_frame, n.cancel_scope)
                        async for msg in outbox:
                            await tls.send_all(wire.encode(msg))
            except (*_LINK_ERRORS, ExceptionGroup) as exc:
                _only_link_errors(exc)
                log.debug("link to %s: %s", expected, exc)
            finally:
                set_connected(False)
            await trio.sleep(RECONNECT_S)

    @staticmethod
    async def _receive_replies(
        tls: TlsSocketStream,
        reader: wire.FrameReader,
        on_frame: Callable[[Any], None],
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                on_frame(await reader.next(tls))
        except (trio.BrokenResourceError, wire.WireError, GeoclusError):
            pass
        scope.cancel()

    async def _link(self, peer: _Peer) -> None:
        """The outgoing connection to ``peer``: carries this node's messages."""

        def on_hello(first: Any) -> None:
            hello = self._check_hello(first, peer.name)
            self._adopt_key(hello)
            if hello.epoch != peer.epoch:
                peer.epoch = hello.epoch
                peer.events_acked = (0, 0)  # a restarted peer gets the history again
            self._new_events.set()

        def on_frame(msg: Any) -> None:
            if isinstance(msg, wire.EventAck):
                peer.events_acked = max(peer.events_acked, (msg.epoch, msg.seq))
            elif isinstance(msg, wire.Hello):
                self._adopt_key(msg)

        def set_connected(up: bool) -> None:
            peer.connected = up

        await self._outgoing(
            peer.name, peer.addresses, peer.outbox_recv, on_hello, on_frame, set_connected
        )

    async def _witness_link(self) -> None:
        """The outgoing connection to the witness: vote requests out, replies in."""
        assert self.cfg.witness is not None

        def on_hello(first: Any) -> None:
            if not isinstance(first, wire.Hello) or first.cluster != self.cfg.name:
                raise GeoclusError("the witness serves another cluster")

        def on_frame(reply: Any) -> None:
            if isinstance(reply, VoteReply):
                self._enqueue(self.inbox_send, (WITNESS, reply, None), "inbox full")

        def set_connected(up: bool) -> None:
            self.witness_connected = up

        await self._outgoing(
            WITNESS_NAME,
            (self.cfg.witness,),
            self.witness_out_recv,
            on_hello,
            on_frame,
            set_connected,
        )

    @staticmethod
    async def _drain(channel: trio.MemoryReceiveChannel[Any]) -> None:
        """Messages for an unreachable peer are dropped (the core resends)."""
        with contextlib.suppress(trio.WouldBlock):
            while True:
                channel.receive_nowait()

    async def _serve_conn(self, tcp: trio.SocketStream) -> None:
        """An incoming connection: a peer's messages to this node."""
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                tls = await wrap_server(tcp, self.server_ctx)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError):
            await tcp.aclose()
            return
        async with tls:
            try:
                name = peer_node_name(tls.ssl_object)
                src = self.ids.get(name)
                if src is None or src == self.me or name in self.db.evicted:
                    why = "evicted" if name in self.db.evicted else "not a node of this cluster"
                    self.dropped[f"refused connection ({why})"] += 1
                    await tls.send_all(wire.encode(wire.Refused(f"{name}: {why}")))
                    return
                reader = wire.FrameReader(self.max_frame_bytes)
                with trio.fail_after(HELLO_TIMEOUT_S):
                    hello = self._check_hello(await reader.next(tls), name)
                self._adopt_key(hello)
                await tls.send_all(wire.encode(self._hello()))
                while True:
                    msg = await reader.next(tls)
                    if name in self.db.evicted:
                        self.dropped["refused connection (evicted)"] += 1
                        await tls.send_all(wire.encode(wire.Refused(f"{name}: evicted")))
                        return
                    await self._incoming(src, name, msg, tls, hello.epoch)
            except (*_LINK_ERRORS, ExceptionGroup) as exc:
                _only_link_errors(exc)
                log.debug("connection from peer: %s", exc)

    async def _incoming(
        self, src: int, name: str, msg: Any, tls: TlsSocketStream, epoch: int
    ) -> None:
        if isinstance(msg, wire.EventBatch):
            top = (0, 0)
            fresh = []
            for e in msg.events:
                if e.origin != name:
                    continue
                top = max(top, (e.epoch, e.seq))
                k = (e.origin, e.epoch, e.seq)
                if k not in self._event_keys:
                    self._event_keys.add(k)
                    fresh.append(e)
            self._store_events(fresh)
            await tls.send_all(wire.encode(wire.EventAck(*top)))
        elif isinstance(msg, wire.Hello):
            self._adopt_key(msg)
        elif isinstance(msg, wire.Leave):
            self.peers[src].left_epoch = epoch
            async with self._lock:
                now = trio.current_time()
                self._event("membership", f"node {name} leaves the cluster (planned)")
                await self._run(self.core.node_left(src, now), None)
        elif isinstance(msg, Ping | Pong | VoteReply | VoteRequest):
            self.dropped["unexpected message on a link"] += 1
        else:
            problem = check_snapshot(msg, self.cfg.name, self.ids)
            if problem:
                self.dropped["bad snapshot"] += 1
                self._event("config", f"message from {name} dropped: {problem}")
                return
            self._enqueue(self.inbox_send, (src, msg, None), "inbox full")

    # --- events ----------------------------------------------------------------------

    def _names_in(self, text: str) -> str:
        """The core speaks in node ids; operators read names."""

        def name(i: str) -> str:
            return self.names.get(int(i), i)

        text = re.sub(r"\((\d+), (-?\d+)\)", lambda m: f"({m[1]}, {name(m[2])})", text)
        text = re.sub(r"\b(node|by) (\d+)", lambda m: f"{m[1]} {name(m[2])}", text)
        return re.sub(
            r"\[(\d+(?:, \d+)*)\]",
            lambda m: "[" + ", ".join(name(i) for i in m[1].split(", ")) + "]",
            text,
        )

    def _event(self, kind: str, message: str) -> None:
        rec = wire.EventRecord(
            self.cfg.node, self.epoch, next(self._event_seq), time.time(), kind, message
        )
        self._event_keys.add((rec.origin, rec.epoch, rec.seq))
        log.info("%s: %s", kind, message)
        self._store_events([rec])
        self._new_events.set()

    def _store_events(self, fresh: list[wire.EventRecord]) -> None:
        if not fresh:
            return
        self.events.extend(fresh)
        self.state.append_events(fresh, self.events)
        if len(self.events) >= self.state.max_events:
            self.events = self.events[-self.state.max_events // 2 :]
            self._event_keys = {(e.origin, e.epoch, e.seq) for e in self.events}

    async def _housekeeping(self) -> None:
        """Every heartbeat interval: push events, watch networks, checkpoint."""
        t = self.cfg.timers
        while True:
            with trio.move_on_after(t.heartbeat_interval_s):
                await self._new_events.wait()
            self._new_events = trio.Event()
            now = trio.current_time()
            mine = [e for e in self.events if e.origin == self.cfg.node]
            for peer in self.peers.values():
                if peer.connected:
                    batch = tuple(e for e in mine if (e.epoch, e.seq) > peer.events_acked)
                    if batch:
                        self._enqueue(
                            peer.outbox_send,
                            wire.EventBatch(batch[:EVENT_BATCH_MAX]),
                            f"outbox to {peer.name} full",
                        )
                lease = self.spec.lease_s(self.me, peer.id)
                for net, up in list(peer.net_up.items()):
                    if up and now - peer.pong_at.get(net, -math.inf) > lease:
                        peer.net_up[net] = False
                        still = [n for n, u in peer.net_up.items() if u]
                        self._event(
                            "network",
                            f"network {net} to {peer.name} is down"
                            + (f" (still reachable on network {still})" if still else ""),
                        )
            acting = self.core.acting(now)
            if acting != self._was_acting:
                self._was_acting = acting
            if now - self._last_checkpoint >= t.snapshot_interval_s:
                await self._checkpoint()

    async def _checkpoint(self) -> str:
        """Write the checkpoint file and reset the log to it (every
        ``snapshot_interval_s``, and on ``geoclus cluster checkpoint``)."""
        self._last_checkpoint = trio.current_time()
        data = self.db.checkpoint()
        await trio.to_thread.run_sync(self.state.save_checkpoint, data)
        self._event("config", f"checkpoint of configuration version {self.db.version}")
        async with self._lock:
            if self.db.version > self.core.disk.base.index:
                await self._compact("checkpoint")
        return os.path.join(self.state.path, "configdb.checkpoint")

    async def _compact(self, why: str) -> None:
        """Log reset: fold the applied entries into a snapshot of the
        database (made durable before anything else is sent), and write the
        checkpoint file of the same version (the snapshot on log reset)."""
        version = self.db.version
        if version > self.core.disk.commit or version <= self.core.disk.base.index:
            return
        folded = version - self.core.disk.base.index
        await self._run_compaction(self.core.compact(version, self.db.state()))
        data = self.db.checkpoint()
        await trio.to_thread.run_sync(self.state.save_checkpoint, data)
        self._event(
            "config",
            f"log reset ({why}): {folded} entries folded into the snapshot at version {version}",
        )

    async def _run_compaction(self, actions: list[Any]) -> None:
        if any(isinstance(a, Persist) for a in actions):
            await self._persist()

    # --- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``geoclus cluster status`` shows (JSON-ready)."""
        now = trio.current_time()
        core = self.core
        q = core.quorum(now)
        reach = core.reachable(now)
        view = core.view
        nodes = []
        for n in self.cfg.nodes:
            i = self.ids[n.name]
            if n.name in self.db.evicted:
                state = "evicted"
            elif i in core.members and core.installed and i in reach:
                state = "paused" if n.name in self.db.paused else "online"
            elif i in reach:
                state = "joining"
            else:
                state = "offline"
            row: dict[str, Any] = {"name": n.name, "site": n.site, "state": state}
            if i == self.me:
                row["networks_up"] = list(range(len(n.addresses)))
                row["self"] = True
            else:
                peer = self.peers[i]
                row["networks_up"] = sorted(k for k, up in peer.net_up.items() if up)
                row["rtt_us"] = {
                    str(net): dict(
                        zip(("samples", "p50", "p99", "max"), _stats_tuple(w), strict=True)
                    )
                    for net, w in sorted(peer.rtt.items())
                }
            nodes.append(row)
        locker = self.names.get(view[1]) if core.installed else None
        return {
            "cluster": self.cfg.name,
            "node": self.cfg.node,
            "site": self.entry.site,
            "epoch": self.epoch,
            "quorum_kind": self.cfg.quorum.value,
            "installed": core.installed,
            "acting": core.acting(now),
            "quorum": {
                "has": q.has_quorum,
                "votes": q.votes,
                "needed": q.needed,
                "total": q.total,
                "reason": q.reason,
            },
            "forced": core.disk.forced,
            "view": [view[0], self.names.get(view[1], "-")],
            "locker": locker,
            "members": sorted(self.names[m] for m in core.members) if core.installed else [],
            # The voter set quorum counts (the view's), and the one the
            # committed log defines (they differ until the next view forms).
            "voters": sorted(self.names[m] for m in core.view_voters),
            "voters_committed": sorted(self.names[m] for m in core.committed_voters()),
            "nodes": nodes,
            "config_version": self.db.version,
            "log_length": core.disk.length,
            "snapshot_index": core.disk.base.index,
            "commit": core.disk.commit,
            "witness": (
                {
                    "address": str(self.cfg.witness),
                    "connected": self.witness_connected,
                    "vote_s": round(core.witness_vote_s(now), 3),
                }
                if self.cfg.witness is not None
                else None
            ),
            "quorum_disk": self._disk_status(now),
            "heartbeats": {"accepted": self.codec.accepted, "dropped": dict(self.codec.dropped)},
            "dropped": dict(self.dropped),
            "regroups_started": core.regroups_started,
            "stop_bound_s": self.spec.stop_bound_s,
            "key_generation": self.key_generation,
        }

    def _disk_status(self, now: float) -> dict[str, Any] | None:
        core, disk = self.core, self.qdisk
        if core.arbiter is None:
            return None
        arb = core.arbiter
        return {
            "volume": self.cfg.quorum_disk_volume,
            "mirrors": [str(m) for m in self.mirrors],
            "using": str(disk.using) if disk is not None and disk.using else None,
            "owner_here": arb.owns(now),
            "view_holds_s": round(core.disk_owner_s(now), 3),
            "phase": arb.phase.value,
            "last_error": (disk.last_error if disk is not None else "") or arb.last_error,
            "failed_operations": disk.failures if disk is not None else 0,
            "mirror_rtt_us": {
                m: None if v is None else round(v * 1e6) for m, v in self.mirror_rtt_s.items()
            },
            "allow_over_budget": self.cfg.allow_over_budget,
            "tls": self.cfg.quorum_disk_tls,
        }

    # --- control ---------------------------------------------------------------------

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "status":
            return {"status": self.status()}
        if cmd == "events":
            since = req.get("since", 0)
            evs = sorted(self.events, key=lambda e: (e.wall_time, e.origin, e.seq))
            if isinstance(since, int | float):
                evs = [e for e in evs if e.wall_time > since]
            return {"events": [wire.to_json(e) for e in evs]}
        if cmd == "submit":
            return await self._submit(req.get("update"), float(req.get("wait_s", 30)))
        if cmd == "log":
            return {
                "snapshot_index": self.core.disk.base.index,
                "entries": [
                    {"index": e.index, "uid": e.uid, "view": list(e.view), "update": e.payload}
                    for e in self.core.committed()
                ],
            }
        if cmd == "backup":
            return {"checkpoint": self.db.checkpoint().decode(), "version": self.db.version}
        if cmd == "checkpoint":
            return {"path": await self._checkpoint(), "version": self.db.version}
        if cmd == "restore":
            data = req.get("checkpoint")
            if not isinstance(data, str):
                raise GeoclusError("restore needs the backup's contents")
            restored = ConfigDb.from_checkpoint(data.encode(), self.cfg.name)
            update = {
                "op": "restore",
                "values": restored.values,
                "evicted": sorted(restored.evicted),
                "paused": sorted(restored.paused),
                "from_version": restored.version,
            }
            result = await self._submit(update, float(req.get("wait_s", 30)))
            back = sorted(restored.evicted - self.db.evicted)
            kept = sorted(self.db.evicted - restored.evicted)
            if back:
                result["note"] = (
                    f"the backup lists evicted node(s) {back} that are not evicted now: a "
                    "restore does not change the voters; run `geoclus cluster evict` for each"
                )
            elif kept:
                result["note"] = f"node(s) {kept} stay evicted (evictions are never undone)"
            return result
        if cmd == "force_quorum":
            site = req.get("site")
            if not isinstance(site, str):
                raise GeoclusError("force_quorum needs a site")
            async with self._lock:
                try:
                    actions = self.core.force_quorum(site, trio.current_time())
                except ForceRefused as exc:
                    raise GeoclusError(
                        f"force-quorum refused: {self._names_in(str(exc))}"
                    ) from None
                await self._run(actions, None)
            return {"forced": site}
        if cmd == "leave":
            assert self._nursery is not None
            self._nursery.start_soon(self.leave)  # answer first, then stop
            return {"left": self.cfg.node}
        if cmd == "check_latency":
            count = int(req.get("count", 200))
            interval_s = float(req.get("interval_s", 0.002))
            return {"links": await self.check_latency(count, interval_s)}
        raise GeoclusError(f"unknown command {cmd!r}")

    async def _submit(self, update: Any, timeout_s: float) -> dict[str, Any]:
        try:
            validate_update(update)
        except ConfigDbError as exc:
            raise GeoclusError(f"update refused: {exc}") from None
        if update.get("op") == "evict":
            node = update["node"]
            if node not in self.ids:
                raise GeoclusError(f"{node!r} is not a configured node")
            if node == self.cfg.node:
                raise GeoclusError("a node cannot evict itself: run evict on another node")
        uid = f"{self.cfg.node}-{self.epoch}-{next(self._uid)}"
        async with self._lock:
            await self._run(self.core.submit(uid, update, trio.current_time()), None)
        with trio.move_on_after(timeout_s):
            while True:
                index = self._applied_uids.get(uid)
                if index is None and uid in self.core.disk.base.uids:
                    index = self.db.version  # arrived folded into a snapshot
                if index is not None:
                    return {"uid": uid, "index": index, "version": self.db.version}
                await self._committed.wait()
        raise GeoclusError(
            f"update {uid} not committed within {timeout_s:g} s: the cluster has no quorum or "
            "no locker (see `geoclus cluster status`); it is applied if it commits later"
        )

    async def leave(self) -> None:
        """Planned exit: tell every peer, then stop."""
        async with self._lock:
            await self._run(self.core.leave(trio.current_time()), None)
        self._event("membership", f"node {self.cfg.node} leaves the cluster (planned)")
        await self._announce_exit()

    async def _announce_exit(self) -> None:
        """Tell every peer this node stops (a Leave), then stop the service."""
        for peer in self.peers.values():
            self._enqueue(
                peer.outbox_send, wire.Leave(self.cfg.node), f"outbox to {peer.name} full"
            )
        await trio.sleep(0.3)  # let the links flush (and the control answer go out)
        if self._cancel is not None:
            self._cancel.cancel()

    async def check_latency(self, count: int, interval_s: float) -> list[dict[str, Any]]:
        """A burst of ``count`` probes to every peer on every network; a verdict per link."""
        if not 1 <= count <= 10_000 or not 0 <= interval_s <= 1:
            raise GeoclusError("count must be 1..10000 and interval_s 0..1")
        for peer in self.peers.values():
            peer.probes, peer.probe_rtts = {}, {}
        view = self.core.view if self.core.installed else (0, -1)
        sent: Counter[tuple[int, int]] = Counter()
        for _ in range(count):
            for peer in self.peers.values():
                for net in range(len(self._udp)):
                    at = trio.current_time()
                    assert peer.probes is not None
                    peer.probes[at] = net
                    await self._send_heartbeat(peer, Ping(view, at, 0), [net])
                    sent[(peer.id, net)] += 1
            await trio.sleep(interval_s)
        await trio.sleep(0.5)
        out = []
        for peer in self.peers.values():
            for net in range(len(self._udp)):
                rtts = peer.probe_rtts.get(net, [])
                lost = max(0, sent[(peer.id, net)] - len(rtts))
                v = verdict(
                    f"{self.cfg.node} -> {peer.name} (network {net})",
                    rtts,
                    lost,
                    t_budget(self.cfg),
                )
                out.append(
                    {
                        "peer": peer.name,
                        "network": net,
                        "ok": v.ok,
                        "line": v.line(),
                        "samples": v.stats.samples,
                        "lost": lost,
                        "p50_us": v.stats.p50_us,
                        "p99_us": v.stats.p99_us,
                        "max_us": v.stats.max_us,
                        "budget_us": v.budget_us,
                    }
                )
            peer.probes = None
        return out


def _only_link_errors(exc: BaseException) -> None:
    """Re-raise ``exc`` unless it is (a group of) link failures, which only
    end one connection."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(_LINK_ERRORS)
        if rest is not None:
            raise rest


def t_budget(cfg: ClusterConfig) -> float:
    return cfg.timers.rtt_budget_us


def _stats_tuple(w: RttWindow) -> tuple[int, float, float, float]:
    s = w.stats()
    return s.samples, round(s.p50_us, 1), round(s.p99_us, 1), round(s.max_us, 1)


def check_snapshot(msg: Any, cluster: str, ids: dict[str, int] | None = None) -> str:
    """Why the log snapshot in ``msg`` (Promise, NewView, Append, a quorum
    disk's LogImage) must not reach the core (its state is not a configuration database of this
    cluster at the snapshot's index, or, given the node ``ids``, the nodes it
    says were evicted are not those its database evicted), or "" if it may."""
    base = getattr(msg, "base", None)
    if not isinstance(base, Snapshot) or base.index == 0:
        return ""
    try:
        db = ConfigDb.from_state(base.state, cluster)
    except ConfigDbError as exc:
        return f"its log snapshot is not valid: {exc}"
    if db.version != base.index:
        return f"its log snapshot is at index {base.index} but holds version {db.version}"
    if ids is not None:
        evicted = {ids[n] for n in db.evicted if n in ids}
        if base.removed != evicted:
            names = {i: n for n, i in ids.items()}
            said = sorted(names.get(i, str(i)) for i in base.removed)
            return (
                f"its log snapshot removes node(s) {said} from the voters, but its database "
                f"evicted {sorted(db.evicted)}"
            )
    return ""
