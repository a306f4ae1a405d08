"""``geoclus witness run``: the third-site witness process, the trio shell
around :class:`~quorum.witness.WitnessCore`.

It listens for mutual TLS from the cluster's nodes (a certificate issued by
the cluster CA whose name is one of ``nodes``; anything else is refused with
a reason), answers each :class:`VoteRequest` with the core's
:class:`VoteReply`, and makes every decision that changed its state durable
(``state_dir/witness-state.json``, fsync) *before* the reply leaves, so a
restarted witness still knows which view holds its vote, the log position it
recorded, and the highest view it saw.

Times are local to the witness's monotonic clock and are not saved: after a
restart the saved holder counts as renewed at the restart (its lease runs a
full ``lease_s`` again) and a pending hand-over wait is kept whole, both of
which only delay a new holder, never let two count the vote at once.

Config (written by ``geoclus cluster init --witness``)::

    [witness]
    cluster = "prod"
    listen = "10.0.2.1:7850"
    ca = "ca/ca.crt"
    cert = "ca/witness.crt"
    key = "ca/witness.key"
    state_dir = "witness-state"
    nodes = ["a1", "a2", "b1", "b2"]
    lease_s = 9.6          # the nodes' longest missed-heartbeat time
    collect_s = 1.2        # one heartbeat interval
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import trio

from geoclus.ca import peer_node_name, server_ssl_context
from geoclus.cluster import wire
from geoclus.cluster.state import StateDir
from geoclus.config import Endpoint, parse_endpoint, read_toml
from geoclus.control import serve_control
from geoclus.errors import ConfigError, GeoclusError
from geoclus.tlsstream import wrap_server
from quorum.mirror import MirrorArbiter, MirrorClaim, arbiter_state, restore_arbiter
from quorum.witness import VoteRequest, WitnessCore, _Holder

log = logging.getLogger("geoclus.witness")
STATE_FILE = "witness-state.json"
_ALLOWED = {
    "cluster",
    "listen",
    "ca",
    "cert",
    "key",
    "state_dir",
    "nodes",
    "lease_s",
    "collect_s",
    "mirrors",
    "prefer_primary_s",
}


@dataclass(frozen=True)
class WitnessConfig:
    """What ``geoclus witness run`` needs."""

    path: str
    cluster: str
    listen: Endpoint
    ca: str
    cert: str
    key: str
    state_dir: str
    nodes: tuple[str, ...]
    lease_s: float
    collect_s: float
    mirrors: tuple[str, ...] = ()
    prefer_primary_s: float = 9.6


def load_witness_config(path: str) -> WitnessConfig:
    """Read and check ``path``; ConfigError names the key and the problem."""
    data = read_toml(path)
    base = os.path.dirname(os.path.abspath(path))
    if set(data) != {"witness"} or not isinstance(data["witness"], dict):
        raise ConfigError(path, "witness", "the file holds exactly one [witness] table")
    w = data["witness"]
    unknown = set(w) - _ALLOWED
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(path, f"witness.{key}", f"unknown key (allowed: {sorted(_ALLOWED)})")

    def text(key: str) -> str:
        value = w.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"witness.{key}", "missing or not a string")
        return value

    def file(key: str) -> str:
        full = os.path.join(base, text(key))
        if not os.path.isfile(full):
            raise ConfigError(path, f"witness.{key}", f"{full} does not exist")
        return full

    def seconds(key: str, default: float) -> float:
        value = w.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(path, f"witness.{key}", "must be a positive number of seconds")
        return float(value)

    nodes = w.get("nodes")
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
        raise ConfigError(path, "witness.nodes", "must list the cluster's node names")
    mirrors = w.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(n, str) and n for n in mirrors):
        raise ConfigError(
            path, "witness.mirrors", "must list the quorum volume mirrors' certificate names"
        )
    if set(mirrors) & set(nodes):
        raise ConfigError(
            path, "witness.mirrors", "a mirror's name must differ from every node's name"
        )
    listen = parse_endpoint(text("listen"), lambda p: ConfigError(path, "witness.listen", p))
    lease_s = seconds("lease_s", 9.6)
    collect_s = seconds("collect_s", 1.2)
    if collect_s >= lease_s:
        raise ConfigError(path, "witness.collect_s", "must be shorter than lease_s")
    return WitnessConfig(
        path=path,
        cluster=text("cluster"),
        listen=listen,
        ca=file("ca"),
        cert=file("cert"),
        key=file("key"),
        state_dir=os.path.join(base, w.get("state_dir", "witness-state")),
        nodes=tuple(nodes),
        lease_s=lease_s,
        collect_s=collect_s,
        mirrors=tuple(mirrors),
        prefer_primary_s=seconds("prefer_primary_s", lease_s),
    )


def witness_state(core: WitnessCore, now: float) -> dict[str, Any]:
    """What survives a restart (durations, not times)."""
    h = core.holder
    return {
        "holder": None
        if h is None
        else {
            "view": list(h.view),
            "members": sorted(h.members),
            "act_wait_s": max(0.0, h.act_from - now),
        },
        "recorded": wire.to_json(core.recorded),
        "highest_view": list(core.highest_view),
    }


def restore_witness(
    state: dict[str, Any], lease_s: float, collect_s: float, now: float
) -> WitnessCore:
    """The core after a restart at ``now`` (see the module docstring)."""
    core = WitnessCore(lease_s=lease_s, collect_s=collect_s)
    core.recorded = wire.from_json(tuple[tuple[int, int], int], state["recorded"], "recorded")
    core.highest_view = wire.from_json(tuple[int, int], state["highest_view"], "highest_view")
    h = state.get("holder")
    if h is not None:
        core.holder = _Holder(
            view=wire.from_json(tuple[int, int], h["view"], "holder.view"),
            members=wire.from_json(frozenset[int], h["members"], "holder.members"),
            lease_until=now + lease_s,
            act_from=now + float(h["act_wait_s"]),
        )
    return core


class WitnessDaemon:
    """The witness process; see the module docstring."""

    def __init__(self, cfg: WitnessConfig, control_path: str | None = None) -> None:
        self.cfg = cfg
        self.ctx = server_ssl_context(cfg.ca, cfg.cert, cfg.key)
        self.state = StateDir(cfg.state_dir)
        self.control_path = control_path or os.path.join(cfg.state_dir, "control.sock")
        self._saved = self.state.load_json(STATE_FILE)
        self.core = WitnessCore(lease_s=cfg.lease_s, collect_s=cfg.collect_s)
        self._lock = trio.Lock()
        self.refused_connections = 0
        self.connected: set[str] = set()
        self.mirrors = MirrorArbiter(cfg.lease_s, cfg.prefer_primary_s)
        self._mirror_conns: dict[str, trio.CancelScope] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        now = trio.current_time()
        if self._saved is not None:
            self.core = restore_witness(self._saved, self.cfg.lease_s, self.cfg.collect_s, now)
            try:
                self.mirrors = restore_arbiter(
                    self._saved.get("mirrors", {}), self.cfg.lease_s, self.cfg.prefer_primary_s, now
                )
            except ValueError as exc:
                raise GeoclusError(f"{self.state._file(STATE_FILE)}: {exc}") from None
        listeners = await trio.open_tcp_listeners(self.cfg.listen.port, host=self.cfg.listen.host)
        async with trio.open_nursery() as n:
            n.start_soon(trio.serve_listeners, self._serve, listeners)
            await n.start(serve_control, self.control_path, self._control)
            log.info("witness for cluster %s listening on %s", self.cfg.cluster, self.cfg.listen)
            task_status.started()

    async def _serve(self, tcp: trio.SocketStream) -> None:
        try:
            with trio.fail_after(5):
                tls = await wrap_server(tcp, self.ctx)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError):
            await tcp.aclose()
            return
        async with tls:
            name = "?"
            try:
                name = peer_node_name(tls.ssl_object)
                reader = wire.FrameReader()
                with trio.fail_after(5):
                    hello = await reader.next(tls)
                why = None
                if name not in self.cfg.nodes and name not in self.cfg.mirrors:
                    why = f"{name} is not a node or a mirror of cluster {self.cfg.cluster}"
                elif not isinstance(hello, wire.Hello) or hello.cluster != self.cfg.cluster:
                    why = f"this witness serves cluster {self.cfg.cluster}"
                if why is not None:
                    self.refused_connections += 1
                    await tls.send_all(wire.encode(wire.Refused(why)))
                    return
                await tls.send_all(wire.encode(wire.Hello(self.cfg.cluster, "witness", 0, -1, "")))
                self.connected.add(name)
                if name in self.cfg.mirrors:
                    await self._serve_mirror(name, tls, reader)
                    return
                while True:
                    req = await reader.next(tls)
                    if not isinstance(req, VoteRequest):
                        raise wire.WireError(f"expected a VoteRequest, got {type(req).__name__}")
                    async with self._lock:
                        before = self._state(trio.current_time())
                        now = trio.current_time()
                        reply = self.core.on_request(req, now)
                        after = self._state(now)
                        if _changed(before, after):
                            await trio.to_thread.run_sync(self.state.save_json, STATE_FILE, after)
                    await tls.send_all(wire.encode(reply))
            except (trio.BrokenResourceError, trio.TooSlowError, wire.WireError, GeoclusError) as e:
                log.debug("connection from %s: %s", name, e)
            finally:
                self.connected.discard(name)

    def _state(self, now: float) -> dict[str, Any]:
        return {**witness_state(self.core, now), "mirrors": arbiter_state(self.mirrors)}

    async def _serve_mirror(self, name: str, tls: Any, reader: wire.FrameReader) -> None:
        """A quorum-volume mirror's claims, in order. A newer connection from
        the same mirror ends this one first, so claims are decided in the
        order the mirror sent them (nothing left in an old connection is
        decided after a newer claim)."""
        old = self._mirror_conns.pop(name, None)
        if old is not None:
            old.cancel()
        with trio.CancelScope() as scope:
            self._mirror_conns[name] = scope
            try:
                while True:
                    claim = await reader.next(tls)
                    if not isinstance(claim, MirrorClaim):
                        raise wire.WireError(f"expected a MirrorClaim, got {type(claim).__name__}")
                    if claim.mirror != name:
                        raise wire.WireError(
                            f"{name} claims for mirror {claim.mirror!r}: a mirror claims "
                            "only for itself"
                        )
                    async with self._lock:
                        now = trio.current_time()
                        before = self._state(now)
                        reply = self.mirrors.on_claim(claim, now)
                        after = self._state(now)
                        if _changed(before, after):
                            await trio.to_thread.run_sync(self.state.save_json, STATE_FILE, after)
                    await tls.send_all(wire.encode(reply))
            finally:
                if self._mirror_conns.get(name) is scope:
                    del self._mirror_conns[name]

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        h = self.core.holder
        return {
            "cluster": self.cfg.cluster,
            "listen": str(self.cfg.listen),
            "holder": None
            if h is None
            else {
                "view": list(h.view),
                "members": [
                    self.cfg.nodes[m] if 0 <= m < len(self.cfg.nodes) else m
                    for m in sorted(h.members)
                ],
                "lease_left_s": round(max(0.0, h.lease_until - now), 3),
            },
            "recorded": wire.to_json(self.core.recorded),
            "highest_view": list(self.core.highest_view),
            "grants": self.core.grants,
            "refusals": self.core.refusals,
            "refused_connections": self.refused_connections,
            "connected": sorted(self.connected),
            "lease_s": self.cfg.lease_s,
            "mirrors": {
                volume: {
                    "holder": t.holder or None,
                    "epoch": t.epoch,
                    "alone": t.alone,
                    "lease_left_s": round(max(0.0, t.lease_until - now), 3),
                    "grants": t.grants,
                    "refusals": t.refusals,
                }
                for volume, t in sorted((self.mirrors.tickets or {}).items())
            },
        }

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        if req["cmd"] == "status":
            return {"status": self.status()}
        if req["cmd"] == "release":
            async with self._lock:
                self.core.force_release()
                await trio.to_thread.run_sync(
                    self.state.save_json, STATE_FILE, self._state(trio.current_time())
                )
            return {"released": True}
        if req["cmd"] == "release-mirror":
            volume = req.get("volume")
            if not isinstance(volume, str):
                raise GeoclusError('release-mirror needs "volume": the volume\'s name')
            async with self._lock:
                if not self.mirrors.release(volume):
                    raise GeoclusError(f"no mirror of volume {volume!r} ever asked this witness")
                await trio.to_thread.run_sync(
                    self.state.save_json, STATE_FILE, self._state(trio.current_time())
                )
            return {"released": volume}
        raise GeoclusError(f"unknown command {req['cmd']!r}")


def _changed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Did anything but the hand-over wait's countdown change?"""
    if (a["holder"] is None) != (b["holder"] is None):
        return True
    if a["holder"] is not None and (
        a["holder"]["view"] != b["holder"]["view"]
        or a["holder"]["members"] != b["holder"]["members"]
    ):
        return True
    return (
        a["recorded"] != b["recorded"]
        or a["highest_view"] != b["highest_view"]
        or a.get("mirrors") != b.get("mirrors")
    )
