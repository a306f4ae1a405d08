"""``linkemu``: run the link emulator, or control a running one over its Unix socket.

``linkemu run`` serves until SIGINT/SIGTERM and prints ``listening on HOST:PORT ...``
on one line once bound. ``cut``, ``restore``, ``reset``, ``set`` and ``stats`` talk
to a running emulator through ``--control PATH``. Every operating error is printed
as one line and exits non-zero (:class:`click.ClickException`), never a traceback.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from typing import Any

import click
import trio

from geoclus.errors import GeoclusError
from geoclus.linkemu import (
    MAX_DELAY_S,
    LinkEmulator,
    LinkEmulatorConfig,
    LinkSettings,
    control_request,
    format_hostport,
    parse_hostport,
)

__all__ = ["linkemu"]


def _geoclus_error_in(exc: BaseException) -> GeoclusError | None:
    """The first GeoclusError in ``exc`` (looking inside exception groups), if any."""
    if isinstance(exc, GeoclusError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _geoclus_error_in(inner)
            if found is not None:
                return found
    return None


def _hostport(value: str, what: str) -> tuple[str, int]:
    try:
        return parse_hostport(value)
    except GeoclusError as err:
        raise click.BadParameter(str(err), param_hint=what) from None


def _describe_rate(rate_bps: float | None) -> str:
    return "unlimited" if rate_bps is None else f"{rate_bps / 1e6:g} Mbit/s"


@click.group(name="linkemu")
def linkemu() -> None:
    """Emulate a WAN link (delay, jitter, bandwidth, cuts) with a TCP proxy."""


@linkemu.command("run")
@click.option("--listen", "listen", required=True, help="HOST:PORT to listen on (port 0 = any).")
@click.option("--target", "target", required=True, help="HOST:PORT to forward connections to.")
@click.option("--delay-ms", type=float, default=0.25, show_default=True, help="One-way delay.")
@click.option("--jitter-ms", type=float, default=0.0, show_default=True, help="Extra 0..J ms.")
@click.option(
    "--rate-mbit", type=float, default=0.0, show_default=True, help="Bandwidth; 0 = unlimited."
)
@click.option("--control", "control", default=None, help="Unix socket path for control commands.")
@click.option("--seed", type=int, default=None, help="Seed for the jitter (default: random).")
@click.option(
    "--max-buffer-mib",
    type=int,
    default=64,
    show_default=True,
    help="Bytes held per connection direction before reading stops.",
)
@click.option(
    "--timer-spin-us",
    type=float,
    default=500.0,
    show_default=True,
    help="Busy-wait this long before each delivery for sub-ms precision (0 = never; less CPU).",
)
def run_cmd(
    listen: str,
    target: str,
    delay_ms: float,
    jitter_ms: float,
    rate_mbit: float,
    control: str | None,
    seed: int | None,
    max_buffer_mib: int,
    timer_spin_us: float,
) -> None:
    """Run the emulator until SIGINT/SIGTERM."""
    listen_host, listen_port = _hostport(listen, "--listen")
    target_host, target_port = _hostport(target, "--target")
    for hint, value in (("--delay-ms", delay_ms), ("--jitter-ms", jitter_ms)):
        if not 0 <= value <= MAX_DELAY_S * 1000:
            raise click.BadParameter(f"must be 0..{MAX_DELAY_S * 1000:g}", param_hint=hint)
    if not 0 <= rate_mbit < math.inf:
        raise click.BadParameter("must be a finite number >= 0", param_hint="--rate-mbit")
    try:
        settings = LinkSettings(
            delay_s=delay_ms / 1000,
            jitter_s=jitter_ms / 1000,
            rate_bps=rate_mbit * 1e6 if rate_mbit > 0 else None,
        )
        config = LinkEmulatorConfig(
            target_host=target_host,
            target_port=target_port,
            listen_host=listen_host,
            listen_port=listen_port,
            settings=settings,
            max_buffer_bytes=max_buffer_mib * 1024 * 1024,
            control_path=control,
            seed=seed,
            timer_spin_s=timer_spin_us / 1e6,
        )
    except GeoclusError as err:
        raise click.ClickException(str(err)) from None
    try:
        trio.run(_serve_until_signal, LinkEmulator(config))
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:
        found = _geoclus_error_in(exc)
        if found is None:
            raise
        raise click.ClickException(str(found)) from None


async def _serve_until_signal(emulator: LinkEmulator) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(emulator.serve)
            host, port = emulator.bound_address
            cfg = emulator.config
            s = emulator.settings
            click.echo(
                f"listening on {format_hostport(host, port)}"
                f" -> {format_hostport(cfg.target_host, cfg.target_port)}"
                f" (delay {s.delay_s * 1000:g} ms, jitter {s.jitter_s * 1000:g} ms,"
                f" rate {_describe_rate(s.rate_bps)}"
                + (f", control {cfg.control_path}" if cfg.control_path else "")
                + ")"
            )
            sys.stdout.flush()
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def _request(control: str, request: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = control_request(control, request)
    except GeoclusError as err:
        raise click.ClickException(str(err)) from None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error", "request failed")))
    return reply


_control_option = click.option(
    "--control", "control", required=True, help="The emulator's control socket path."
)


@linkemu.command("cut")
@_control_option
def cut_cmd(control: str) -> None:
    """Take the link down: nothing is delivered, new connections are closed."""
    _request(control, {"cmd": "cut"})
    click.echo("link cut")


@linkemu.command("restore")
@_control_option
def restore_cmd(control: str) -> None:
    """Bring the link back up; held bytes flow again in order."""
    _request(control, {"cmd": "restore"})
    click.echo("link restored")


@linkemu.command("reset")
@_control_option
def reset_cmd(control: str) -> None:
    """Reset every proxied connection at both ends (the link stays up)."""
    reply = _request(control, {"cmd": "reset"})
    click.echo(f"reset {reply.get('aborted', 0)} connection(s)")


@linkemu.command("set")
@_control_option
@click.option("--delay-ms", type=float, default=None, help="One-way delay.")
@click.option("--jitter-ms", type=float, default=None, help="Extra uniform 0..J ms.")
@click.option("--rate-mbit", type=float, default=None, help="Bandwidth; 0 = unlimited.")
def set_cmd(
    control: str, delay_ms: float | None, jitter_ms: float | None, rate_mbit: float | None
) -> None:
    """Change the link settings; options left out keep their value."""
    request: dict[str, Any] = {"cmd": "set"}
    for key, value in (("delay_ms", delay_ms), ("jitter_ms", jitter_ms), ("rate_mbit", rate_mbit)):
        if value is not None:
            request[key] = value
    if len(request) == 1:
        raise click.UsageError("give at least one of --delay-ms, --jitter-ms, --rate-mbit")
    stats = _request(control, request)["stats"]
    click.echo(
        f"delay {stats['delay_s'] * 1000:g} ms, jitter {stats['jitter_s'] * 1000:g} ms,"
        f" rate {_describe_rate(stats['rate_bps'])}"
    )


@linkemu.command("stats")
@_control_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw statistics as JSON.")
def stats_cmd(control: str, as_json: bool) -> None:
    """Show connections, byte counters, cut state and settings."""
    stats = _request(control, {"cmd": "stats"})["stats"]
    if as_json:
        click.echo(json.dumps(stats, sort_keys=True))
        return
    click.echo(f"link: {'CUT' if stats['cut'] else 'up'}")
    click.echo(
        f"delay: {stats['delay_s'] * 1000:g} ms, jitter: {stats['jitter_s'] * 1000:g} ms,"
        f" rate: {_describe_rate(stats['rate_bps'])}"
    )
    click.echo(
        f"connections: {stats['connections_open']} open, {stats['connections_total']} total,"
        f" {stats['connections_refused']} refused"
    )
    click.echo(
        f"bytes: {stats['bytes_to_target']} to target, {stats['bytes_to_client']} to client,"
        f" {stats['bytes_held']} held"
    )


if __name__ == "__main__":  # pragma: no cover
    linkemu()
