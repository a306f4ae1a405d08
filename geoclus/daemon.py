"""The site daemon: one site's copies of one or more volumes, each with its own
replication link, all exported by one NBD server under their names, and one
control socket (``geoclus volume serve --config FILE``).

Control requests name the volume they are about (``"volume": NAME``); a daemon
with a single volume also takes requests that name none. ``status`` without a
name answers for every volume.

Shutdown (SIGTERM, SIGINT or the ``shutdown`` control command) is orderly: new
writes are refused, writes in flight complete or fail, the peer is drained for
at most ``drain_timeout_s``, the store is synced and the metadata records a
clean stop. Nothing is half-applied: a write that was sequenced is applied
locally to its end even while the daemon stops.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import ssl
from dataclasses import dataclass
from typing import Any

import trio

from geoclus.config import DaemonConfig, VolumeConfig
from geoclus.control import serve_control
from geoclus.errors import ControlError, GeoclusError, HandshakeRefused
from geoclus.nbd.server import NbdServer
from geoclus.tlsstream import TlsSocketStream, wrap_client, wrap_server
from geoclus.witnesslink import MirrorWitness
from replicator.volume import TEST_FAULTS, ReplicatedVolume

log = logging.getLogger("geoclus.daemon")

# Bound on the TLS handshake of an incoming replication connection, so a
# client that connects and says nothing cannot hold a task forever.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# Largest single write the export accepts (advertised in NBD_INFO_BLOCK_SIZE):
# it must fit, with its entry header, in one replication frame.
MAX_WRITE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class DaemonAddresses:
    """Where a started daemon listens (ports resolved when 0 was configured):
    ``replication`` is the first volume's link, ``replication_by_volume`` all."""

    replication: tuple[str, int]
    nbd_unix: str | None
    nbd_tcp: tuple[tuple[str, int], ...]
    control: str
    replication_by_volume: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)


def _tls_contexts(cfg: DaemonConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    if cfg.tls is None:
        return None, None
    from geoclus.ca import client_ssl_context, server_ssl_context

    return (
        server_ssl_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key),
        client_ssl_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key),
    )


def _export_tls_context(cfg: DaemonConfig) -> ssl.SSLContext | None:
    """The NBD export's server-side context (mutual TLS with the cluster CA), or
    None. Raises CaError if the files cannot be used."""
    tls = cfg.export.tls
    if tls is None:
        return None
    from geoclus.ca import server_ssl_context

    return server_ssl_context(tls.ca, tls.cert, tls.key)


def _check_peer_name(cfg: DaemonConfig, stream: TlsSocketStream) -> str:
    from geoclus.ca import peer_node_name

    name = peer_node_name(stream)
    if cfg.tls is not None and cfg.tls.peer_node is not None and name != cfg.tls.peer_node:
        raise GeoclusError(
            f"peer presented a certificate for {name!r}, expected {cfg.tls.peer_node!r} "
            "(replication.tls.peer_node)"
        )
    return name


class Daemon:
    """Runs one site's volumes: see the module docstring."""

    def __init__(self, cfg: DaemonConfig) -> None:
        faults = os.environ.get("GEOCLUS_TEST_FAULTS", "")
        if faults:
            wanted = frozenset(f.strip() for f in faults.split(",") if f.strip())
            unknown = wanted - TEST_FAULTS
            if unknown:
                raise GeoclusError(
                    f"GEOCLUS_TEST_FAULTS: unknown fault(s) {sorted(unknown)}; "
                    f"known: {sorted(TEST_FAULTS)}"
                )
            log.warning(
                "TEST FAULTS ENABLED (%s): this daemon breaks its own safety rules "
                "on purpose; never use it for real data",
                ", ".join(sorted(wanted)),
            )
            cfg = dataclasses.replace(
                cfg,
                volumes=tuple(
                    dataclasses.replace(v, spec=dataclasses.replace(v.spec, faults=wanted))
                    for v in cfg.volumes
                ),
            )
        self.cfg = cfg
        self.volumes: dict[str, ReplicatedVolume] = {}
        self._export_names = {v.name: v.export_name for v in cfg.volumes}
        self._shutdown = trio.Event()
        self._server_ctx, self._client_ctx = _tls_contexts(cfg)
        self._export_ctx = _export_tls_context(cfg)
        self.nbd: NbdServer | None = None
        self.witness: MirrorWitness | None = None

    @property
    def volume(self) -> ReplicatedVolume | None:
        """The first volume (the only one of a single-volume daemon), once open."""
        if not self.cfg.volumes:
            return None
        return self.volumes.get(self.cfg.volumes[0].name)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def _connector(self, vc: VolumeConfig) -> Any:
        async def connect() -> trio.abc.Stream:
            peer = vc.peer
            assert peer is not None
            # Leave from the address the link listens on (when it names one),
            # so the link uses the network it is configured on, both ways.
            local = vc.listen.host if vc.listen.host not in ("0.0.0.0", "::", "") else None
            tcp = await trio.open_tcp_stream(peer.host, peer.port, local_address=local)
            if self._client_ctx is None:
                return tcp
            tls = await wrap_client(tcp, self._client_ctx)
            try:
                _check_peer_name(self.cfg, tls)
            except GeoclusError as exc:
                await trio.aclose_forcefully(tls)
                raise HandshakeRefused(str(exc)) from None
            return tls

        return connect

    async def _incoming(self, vol: ReplicatedVolume, stream: trio.SocketStream) -> None:
        try:
            label = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            label = "peer"
        conn: trio.abc.Stream = stream
        if self._server_ctx is not None:
            tls: TlsSocketStream | None = None
            try:
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT_S):
                    tls = await wrap_server(stream, self._server_ctx)
                label = f"{_check_peer_name(self.cfg, tls)}@{label}"
            except (trio.BrokenResourceError, trio.TooSlowError, GeoclusError) as exc:
                cause = exc.__cause__ or exc
                log.warning(
                    "volume %s: refused replication connection from %s: %s",
                    vol.spec.name,
                    label,
                    cause if str(cause) else type(cause).__name__,
                )
                await trio.aclose_forcefully(tls if tls is not None else stream)
                return
            conn = tls
        try:
            await vol.handle_connection(conn, label)
        except Exception:
            # A bug in one session must not take down the export and the
            # daemon; it is logged with its traceback and the peer reconnects.
            log.exception(
                "volume %s: replication session with %s failed unexpectedly",
                vol.spec.name,
                label,
            )

    def _chosen(self, req: dict[str, Any]) -> ReplicatedVolume:
        """The volume a control request names (or the only one)."""
        name = req.get("volume")
        if name is not None and not isinstance(name, str):
            raise ControlError('"volume" must be a volume name')
        if name is None:
            if len(self.volumes) == 1:
                return next(iter(self.volumes.values()))
            raise ControlError(
                f"this daemon serves volumes {', '.join(self.volumes)}: name one (--volume NAME)"
            )
        vol = self.volumes.get(name)
        if vol is None:
            raise ControlError(
                f"no volume {name!r} in this daemon (volumes: {', '.join(self.volumes)})"
            )
        return vol

    def _witness_status(self, name: str) -> dict[str, Any] | None:
        if self.witness is None:
            return None
        st = self.witness.status()
        return {
            "address": st["address"],
            "connected": st["connected"],
            "last_error": st["last_error"],
            **st["volumes"][name],
        }

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "shutdown":
            self._shutdown.set()
            return {}
        if cmd == "status" and req.get("volume") is None:
            nbd = dataclasses.asdict(self.nbd.statistics()) if self.nbd is not None else None
            every = []
            for name, v in self.volumes.items():
                status = v.status()
                status["export"] = self._export_names[name]
                status["witness"] = self._witness_status(name)
                if nbd is not None:
                    status["nbd"] = nbd
                every.append(status)
            answer: dict[str, Any] = {"volumes": every}
            if len(every) == 1:
                answer["status"] = every[0]
            return answer
        vol = self._chosen(req)
        if cmd == "status":
            status = vol.status()
            status["export"] = self._export_names[vol.spec.name]
            status["witness"] = self._witness_status(vol.spec.name)
            if self.nbd is not None:
                status["nbd"] = dataclasses.asdict(self.nbd.statistics())
            return {"status": status}
        if cmd == "allow-degraded":
            return {"released_writes": vol.allow_degraded()}
        if cmd == "events":
            since = req.get("since", 0)
            if not isinstance(since, int) or isinstance(since, bool) or since < 0:
                raise ControlError('events needs "since": a non-negative integer')
            events, missed = vol.events.since(since)
            return {
                "events": [e.to_json() for e in events],
                "missed": missed,
                "last_seq": vol.events.last_seq,
            }
        if cmd == "promote":
            force = req.get("force", False)
            if not isinstance(force, bool):
                raise ControlError('promote takes "force": true or false')
            if self.cfg.volume(vol.spec.name).peer is None:
                log.warning(
                    "volume %s: promoting without a peer address configured: no peer to dial",
                    vol.spec.name,
                )
            return await vol.promote(force=force)
        if cmd == "demote":
            return await vol.demote()
        if cmd == "resolve":
            discard = req.get("discard_local")
            if not isinstance(discard, bool):
                raise ControlError('resolve needs "discard_local": true or false')
            gens = await vol.resolve(discard_local=discard)
            return {"discard": gens.discard}
        if cmd == "verify":
            resync = req.get("resync", False)
            if not isinstance(resync, bool):
                raise ControlError('verify takes "resync": true or false')
            return {"verify": vol.start_verify(resync=resync)}
        raise ControlError(
            f"unknown command {cmd!r} (status, allow-degraded, promote, demote, resolve, "
            "verify, events, shutdown)"
        )

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for signum in sigs:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self._shutdown.set()
                return

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[DaemonAddresses] = trio.TASK_STATUS_IGNORED,
        handle_signals: bool = True,
    ) -> None:
        """Run until shutdown is requested; ``task_status`` gets the bound addresses.

        Every volume is opened before anything listens; if one cannot be opened
        the ones already open are closed and the error is raised (the daemon
        serves all its volumes or none)."""
        cfg = self.cfg
        try:
            for vc in cfg.volumes:
                self.volumes[vc.name] = await ReplicatedVolume.open(vc.spec)
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(self._signals)
                rep_addrs: dict[str, tuple[str, int]] = {}
                for vc in cfg.volumes:
                    vol = self.volumes[vc.name]
                    listeners = await trio.open_tcp_listeners(vc.listen.port, host=vc.listen.host)
                    addr = listeners[0].socket.getsockname()[:2]
                    rep_addrs[vc.name] = (addr[0], addr[1])
                    nursery.start_soon(
                        trio.serve_listeners, functools.partial(self._incoming, vol), listeners
                    )
                    # The volume dials its peer whenever it is primary (now, or
                    # after a promotion) and stops when demoted.
                    vol.attach_link(
                        nursery,
                        self._connector(vc) if vc.peer is not None else None,
                        str(vc.peer),
                    )
                self.nbd = NbdServer(
                    {vc.export_name: self.volumes[vc.name] for vc in cfg.volumes},
                    unix_path=cfg.export.unix_path,
                    tcp_host=cfg.export.tcp.host if cfg.export.tcp else None,
                    tcp_port=cfg.export.tcp.port if cfg.export.tcp else None,
                    # A client that names no export gets the first volume.
                    default_export=cfg.volumes[0].export_name,
                    # One write must fit in one replication frame.
                    max_payload_bytes=MAX_WRITE_BYTES,
                    tls_context=self._export_ctx,
                )
                if cfg.export.plain_tcp:
                    log.warning(
                        "the NBD export on %s (volumes %s) is plain TCP: anyone who can "
                        "reach it can read and write the volumes; set export.tls to "
                        "require TLS with cluster certificates",
                        cfg.export.tcp,
                        ", ".join(cfg.names),
                    )
                if cfg.witness is not None:
                    node = cfg.volumes[0].spec.node
                    self.witness = MirrorWitness(cfg.witness, node, self.volumes)
                    nursery.start_soon(self.witness.run)
                    log.info(
                        "the witness at %s decides when %s may run without the peer",
                        cfg.witness.address,
                        ", ".join(cfg.names),
                    )
                nbd_addr = await nursery.start(self.nbd.serve)
                await nursery.start(serve_control, cfg.control_socket, self._control)
                for vc in cfg.volumes:
                    vol = self.volumes[vc.name]
                    host, port = rep_addrs[vc.name]
                    log.info(
                        "volume %s: %s, %s mode, generation %#x; replication on %s:%d; "
                        "NBD export %r on %s",
                        vc.name,
                        vc.spec.role.name.lower(),
                        vc.spec.policy.mode.name.lower(),
                        vol.state.generation,
                        host,
                        port,
                        vc.export_name,
                        nbd_addr.unix_path or nbd_addr.tcp,
                    )
                task_status.started(
                    DaemonAddresses(
                        rep_addrs[cfg.volumes[0].name],
                        nbd_addr.unix_path,
                        nbd_addr.tcp,
                        cfg.control_socket,
                        rep_addrs,
                    )
                )
                await self._shutdown.wait()
                log.info("stopping %s (draining writes in flight)", ", ".join(cfg.names))
                # Each volume drains its own peer; they close side by side, so
                # the stop takes one drain_timeout_s at most, not one per volume.
                async with trio.open_nursery() as closing:
                    for vol in self.volumes.values():
                        closing.start_soon(vol.close)
                nursery.cancel_scope.cancel()
        finally:
            for vol in self.volumes.values():
                if not vol.closed:
                    with trio.CancelScope(shield=True):
                        await vol.close(drain=False)
        for name in cfg.names:
            log.info("volume %s: stopped cleanly", name)
