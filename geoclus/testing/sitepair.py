"""Two real site daemons joined through the link emulator, on one machine.

Shared by the demo, the end-to-end tests and the benchmarks. :class:`SitePair`
writes a cluster CA and certificates (when TLS is on), two configs, starts the
link emulator in this process and the two daemons as real processes
(``python -m geoclus volume serve``), waits until they replicate, and stops and
reaps them (SIGTERM, then SIGKILL after a bound) however the caller exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio

from geoclus.control import request
from geoclus.errors import ControlError, GeoclusError
from geoclus.linkemu import LinkEmulator, LinkEmulatorConfig, LinkSettings

# How long a daemon may take to start answering its control socket.
START_TIMEOUT_S = 20.0
# How long a daemon may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SiteOptions:
    """Knobs of the pair: mode, policies, link delay and timers."""

    mode: str = "sync"
    size: str = "64MiB"
    tls: bool = True
    one_way_delay_s: float = 0.00025
    jitter_s: float = 0.0
    rate_bps: float | None = None
    on_peer_loss: str = "suspend"
    on_congestion: str = "block"
    max_lag_bytes: str = "256MiB"
    keepalive_interval_s: float = 0.2
    peer_timeout_s: float = 1.0
    drain_timeout_s: float = 10.0
    secondary_fault_out_of_order: bool = False
    # False: the primary connects straight to the secondary (no emulator).
    use_link_emulator: bool = True
    # False: start only the primary (no link emulator, no secondary); its peer
    # address is a port nobody listens on, so it runs without a peer.
    with_secondary: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Site:
    """One site: its config, files and process."""

    name: str
    role: str
    config: str
    store: str
    nbd: str
    control: str
    log: str
    process: trio.Process | None = None

    def status(self) -> dict[str, Any]:
        """The daemon's status (blocking; call from a thread or a sync context)."""
        return request(self.control, "status", timeout_s=5.0)["status"]


class SitePair:
    """Primary ``a`` and secondary ``b`` in ``workdir``; see the module docstring."""

    def __init__(self, workdir: str, options: SiteOptions | None = None) -> None:
        self.workdir = os.path.abspath(workdir)
        self.options = options or SiteOptions()
        self.link: LinkEmulator | None = None  # a -> b
        self.link_back: LinkEmulator | None = None  # b -> a (after a role swap)
        self.a = self._site("a", "primary")
        self.b = self._site("b", "secondary")

    def _site(self, name: str, role: str) -> Site:
        w = self.workdir
        return Site(
            name,
            role,
            f"{w}/{name}.toml",
            f"{w}/{name}.img",
            f"{w}/{name}.nbd",
            f"{w}/{name}.ctl",
            f"{w}/{name}.log",
        )

    def cut(self) -> None:
        """Cut both directions of the inter-site link."""
        for link in (self.link, self.link_back):
            if link is not None:
                link.cut()

    def restore(self) -> None:
        for link in (self.link, self.link_back):
            if link is not None:
                link.restore()

    def _write_configs(
        self, b_port: int, link_port: int, a_port: int = 0, back_port: int | None = None
    ) -> None:
        o = self.options
        if o.tls:
            from geoclus.ca import init_ca, issue_node_cert

            ca_dir = f"{self.workdir}/ca"
            if not os.path.exists(f"{ca_dir}/ca.crt"):
                init_ca(ca_dir, "demo")
                issue_node_cert(ca_dir, "site-a")
                issue_node_cert(ca_dir, "site-b")
        for site, listen, peer, node, peer_node in (
            (self.a, a_port or free_port(), link_port, "site-a", "site-b"),
            (self.b, b_port, back_port, "site-b", "site-a"),
        ):
            tls = (
                f'{{ ca = "ca/ca.crt", cert = "ca/{node}.crt", key = "ca/{node}.key", '
                f'peer_node = "{peer_node}" }}'
                if o.tls
                else "false"
            )
            peer_line = f'peer = "127.0.0.1:{peer}"\n' if peer else ""
            text = (
                f'[volume]\nname = "demo"\nsize = "{o.size}"\nstore = "{site.name}.img"\n'
                f'mode = "{o.mode}"\nrole = "{site.role}"\non_peer_loss = "{o.on_peer_loss}"\n'
                f'on_congestion = "{o.on_congestion}"\nmax_lag_bytes = "{o.max_lag_bytes}"\n'
                f'[node]\nname = "{node}"\n'
                f'[replication]\nlisten = "127.0.0.1:{listen}"\n{peer_line}tls = {tls}\n'
                f"keepalive_interval_s = {o.keepalive_interval_s}\n"
                f"peer_timeout_s = {o.peer_timeout_s}\n"
                f"connect_timeout_s = {max(1.0, o.peer_timeout_s)}\n"
                f"drain_timeout_s = {o.drain_timeout_s}\n"
                f'[export]\nnbd = "{site.name}.nbd"\n'
                f'[control]\nsocket = "{site.name}.ctl"\n'
            )
            with open(site.config, "w") as f:
                f.write(text)

    async def _start_site(self, site: Site) -> None:
        env = dict(os.environ)
        env.update(self.options.extra_env)
        if site.role == "secondary" and self.options.secondary_fault_out_of_order:
            env["GEOCLUS_TEST_FAULTS"] = "secondary-out-of-order"
        logf = open(site.log, "ab")  # noqa: SIM115, ASYNC230 - handed to the child
        try:
            site.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "geoclus", "volume", "serve", "--config", site.config],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=self.workdir,
            )
        finally:
            logf.close()
        with trio.move_on_after(START_TIMEOUT_S):
            while True:
                if site.process.returncode is not None:
                    raise GeoclusError(
                        f"site {site.name} exited at start (code {site.process.returncode}); "
                        f"see {site.log}:\n{self.tail(site)}"
                    )
                try:
                    await trio.to_thread.run_sync(site.status)
                    return
                except ControlError:
                    await trio.sleep(0.05)
        raise GeoclusError(f"site {site.name} did not start in {START_TIMEOUT_S} s; see {site.log}")

    def tail(self, site: Site, lines: int = 20) -> str:
        try:
            with open(site.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the link emulator (in ``nursery``) and both daemons; wait until
        the primary reports a connected peer (only the primary, not waiting,
        without ``with_secondary``)."""
        os.makedirs(self.workdir, exist_ok=True)
        b_port = free_port()
        o = self.options
        if not o.with_secondary:
            self._write_configs(b_port, free_port())
            await self._start_site(self.a)
            return
        self.link = LinkEmulator(
            LinkEmulatorConfig(
                target_host="127.0.0.1",
                target_port=b_port,
                settings=LinkSettings(o.one_way_delay_s, o.jitter_s, o.rate_bps),
                seed=1,
            )
        )
        link_port = await nursery.start(self.link.serve)
        a_port = free_port()
        self.link_back = LinkEmulator(
            LinkEmulatorConfig(
                target_host="127.0.0.1",
                target_port=a_port,
                settings=LinkSettings(o.one_way_delay_s, o.jitter_s, o.rate_bps),
                seed=2,
            )
        )
        back_port = await nursery.start(self.link_back.serve)
        self._write_configs(
            b_port,
            link_port if o.use_link_emulator else b_port,
            a_port,
            back_port if o.use_link_emulator else a_port,
        )
        await self._start_site(self.b)
        await self._start_site(self.a)
        await self.wait_connected()

    async def wait_connected(self, timeout_s: float = 20.0) -> None:
        with trio.move_on_after(timeout_s):
            while not (await trio.to_thread.run_sync(self.a.status))["connected"]:
                await trio.sleep(0.05)
            return
        raise GeoclusError(
            f"primary did not connect to the secondary in {timeout_s} s:\n{self.tail(self.a)}"
        )

    async def stop_site(self, site: Site, sig: int = signal.SIGTERM) -> int | None:
        """Signal a site and reap it (SIGKILL after STOP_TIMEOUT_S); return its exit code."""
        proc = site.process
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with trio.move_on_after(STOP_TIMEOUT_S) as scope:
                scope.shield = True
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        site.process = None
        return proc.returncode

    async def stop(self) -> tuple[int | None, int | None]:
        """Stop the primary, then the secondary; return their exit codes."""
        return await self.stop_site(self.a), await self.stop_site(self.b)


@contextlib.asynccontextmanager
async def running_pair(workdir: str, options: SiteOptions | None = None) -> AsyncIterator[SitePair]:
    """Start a :class:`SitePair` and always stop it (and the link) on exit."""
    pair = SitePair(workdir, options)
    async with trio.open_nursery() as nursery:
        try:
            await pair.start(nursery)
            yield pair
        finally:
            with trio.CancelScope(shield=True):
                await pair.stop()
            nursery.cancel_scope.cancel()
