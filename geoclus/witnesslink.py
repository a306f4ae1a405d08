"""The volume daemon's link to the third-site witness (``[witness]`` in the
volume's TOML): the mirror's side of the alone ticket (quorum/mirror.py).

For each volume it runs a :class:`~quorum.mirror.MirrorGuard` and applies what
the witness granted:

* a **primary** whose peer is lost (or not in sync) asks to run alone; with a
  grant it completes writes without the peer (``allow_degraded``, by the
  witness) for as long as the lease holds, renewing it; when the lease runs
  out unrenewed, writes wait for the peer again (fail closed);
* a **secondary** whose primary is lost asks too; with a grant it promotes
  itself (a forced promotion: a new generation) and runs alone;
* a primary that the witness calls *outdated* (the other mirror ran alone)
  never runs alone; it keeps its writes blocked and says so in an event and
  the status: the operator demotes it (it then resynchronises from the mirror
  that holds the ticket).

Every decision is an event in the volume's history. One connection at a time,
frames as in the cluster service (geoclus/cluster/wire.py); the witness's
certificate must carry the name ``witness``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import trio

from geoclus.ca import client_ssl_context, peer_node_name
from geoclus.cluster import wire
from geoclus.config import WitnessLink
from geoclus.errors import GeoclusError
from geoclus.tlsstream import wrap_client
from quorum.mirror import PRIMARY, SECONDARY, MirrorGuard, MirrorReply
from replicator.volume import ReplicatedVolume

log = logging.getLogger("geoclus.witnesslink")
WITNESS_NAME = "witness"
_ERRORS = (OSError, trio.BrokenResourceError, trio.TooSlowError, wire.WireError, GeoclusError)


class MirrorWitness:
    """The witness link of one volume daemon; see the module docstring."""

    def __init__(self, cfg: WitnessLink, node: str, volumes: dict[str, ReplicatedVolume]) -> None:
        self.cfg = cfg
        self.node = node
        self.volumes = volumes
        self.guards = {name: MirrorGuard(name, node, cfg.renew_s) for name in volumes}
        self.ctx = client_ssl_context(cfg.ca, cfg.cert, cfg.key)
        self.by_witness: set[str] = set()  # volumes running alone on the witness's grant
        self.connected = False
        self.last_error = ""
        self._said: dict[str, str] = {}
        self._unsynced_since: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._send, self._recv = trio.open_memory_channel[Any](4 * len(volumes) + 4)

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self._link)
            while True:
                for name, vol in self.volumes.items():
                    await self._step(name, vol)
                await trio.sleep(min(0.1, self.cfg.renew_s / 4))

    def _state(self, vol: ReplicatedVolume) -> tuple[str, bool, bool]:
        """(role, peer link up, in sync with the peer)."""
        connected = vol.connected_peer is not None
        core = vol.primary
        if core is not None:
            in_sync = connected and not core.outdated and not core.peer.resyncing
            return PRIMARY, connected, in_sync
        return SECONDARY, connected, connected and vol.consistency == "consistent"

    async def _step(self, name: str, vol: ReplicatedVolume) -> None:
        if vol.closed:
            return
        g = self.guards[name]
        now = trio.current_time()
        role, peer_ok, in_sync = self._state(vol)
        if name in self.by_witness and (vol.primary is None or not vol.primary.degraded_allowed):
            self.by_witness.discard(name)  # ended by the resync (or a demotion)
        if in_sync and name in self.by_witness:
            vol.revoke_degraded("in sync with the peer again (the witness's grant ends)")
            self.by_witness.discard(name)
        if in_sync:
            self._unsynced_since.pop(name, None)
        since = self._unsynced_since.setdefault(name, now) if not in_sync else now
        # Not in sync for a moment (a reconnect), or just started (the link
        # gets connect_timeout_s to come up): no claim yet.
        started = self._started.setdefault(name, now)
        settled = now - started >= vol.spec.timers.connect_timeout_s
        claim = None
        if role == SECONDARY and not peer_ok and vol.consistency == "inconsistent":
            # A half-replayed copy is never a candidate to run alone.
            self._say(
                vol, "inconsistent", "this copy is inconsistent: it does not ask to run alone"
            )
        elif in_sync or (settled and now - since >= self.cfg.renew_s):
            claim = g.poll(now, role, peer_ok, in_sync)
        if claim is not None:
            # The link is down or slow when full: the next poll sends a fresh claim.
            with contextlib.suppress(trio.WouldBlock):
                self._send.send_nowait(claim)
        allowed = g.alone_allowed(now)
        if role == SECONDARY and allowed and not peer_ok:
            self._event(vol, "the witness granted this mirror the volume: promoting it (forced)")
            try:
                await vol.promote(force=True)
            except GeoclusError as exc:
                self._say(vol, "promote", f"promotion failed: {exc}")
                return
            role = PRIMARY
        core = vol.primary
        if role == PRIMARY and core is not None:
            if allowed and not in_sync and not core.degraded_allowed:
                vol.allow_degraded(by="the witness")
                self.by_witness.add(name)
            elif name in self.by_witness and not allowed:
                vol.revoke_degraded("the witness's lease ran out (writes wait for the peer again)")
                self.by_witness.discard(name)
            if g.outdated and not allowed:
                self._say(
                    vol,
                    "outdated",
                    f"the witness says {g.holder} may have completed writes alone: this copy "
                    "must not run alone; demote it (`geoclus volume demote`) so it "
                    f"resynchronises from {g.holder}",
                )

    def _event(self, vol: ReplicatedVolume, text: str) -> None:
        vol.events.add("witness", text)
        log.warning("volume %s: %s", vol.spec.name, text)

    def _say(self, vol: ReplicatedVolume, key: str, text: str) -> None:
        """An event once per distinct message (not every poll)."""
        k = f"{vol.spec.name}:{key}"
        if self._said.get(k) != text:
            self._said[k] = text
            self._event(vol, text)

    def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, MirrorReply):
            raise wire.WireError(f"expected a MirrorReply, got {type(reply).__name__}")
        g = self.guards.get(reply.volume)
        if g is None:
            raise wire.WireError(f"a reply about volume {reply.volume!r}, which is not here")
        g.on_reply(reply)
        if not reply.granted and reply.retry_s > 0:
            g.retry_soon()
        vol = self.volumes[reply.volume]
        verdict = "granted" if reply.granted else f"refused: {reply.reason}"
        self._say(vol, "reply", f"witness: running alone {verdict}")

    async def _link(self) -> None:
        while True:
            try:
                await self._session()
            except _ERRORS as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.debug("witness link: %s", self.last_error)
            self.connected = False
            await trio.sleep(self.cfg.renew_s)

    async def _session(self) -> None:
        a = self.cfg.address
        timeout_s = max(2.0, 2 * self.cfg.renew_s)
        with trio.fail_after(timeout_s):
            tcp = await trio.open_tcp_stream(a.host, a.port)
            tls = await wrap_client(tcp, self.ctx)
        async with tls:
            name = peer_node_name(tls.ssl_object)
            if name != WITNESS_NAME:
                raise GeoclusError(f"{a} presented certificate {name!r}, not the witness's")
            reader = wire.FrameReader()
            await tls.send_all(wire.encode(wire.Hello(self.cfg.cluster, self.node, 0, -1, "")))
            with trio.fail_after(timeout_s):
                hello = await reader.next(tls)
            if isinstance(hello, wire.Refused):
                raise GeoclusError(f"the witness refused this mirror: {hello.reason}")
            if not isinstance(hello, wire.Hello) or hello.cluster != self.cfg.cluster:
                raise GeoclusError(f"the witness at {a} serves another cluster")
            self.connected, self.last_error = True, ""
            async with trio.open_nursery() as n:

                async def receive() -> None:
                    while True:
                        self._on_reply(await reader.next(tls))

                n.start_soon(receive)
                async for claim in self._recv:
                    await tls.send_all(wire.encode(claim))

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "address": str(self.cfg.address),
            "connected": self.connected,
            "last_error": self.last_error,
            "volumes": {
                name: {
                    "alone_allowed": g.alone_allowed(now),
                    "lease_left_s": round(max(0.0, g.lease_until - now), 3),
                    "by_witness": name in self.by_witness,
                    "holder": g.holder,
                    "outdated": g.outdated,
                    "epoch": g.epoch,
                    "reason": g.reason,
                }
                for name, g in self.guards.items()
            },
        }
