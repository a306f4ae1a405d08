"""The ``geoclus`` command line: a thin client of the library and the daemon.

Every command that prints state has ``--json``. Errors print one line and exit
non-zero; a :class:`~geoclus.errors.GeoclusError` never shows a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from geoclus.errors import GeoclusError


class _Group(click.Group):
    """A click group that turns GeoclusError into one readable line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GeoclusError as exc:
            raise click.ClickException(str(exc)) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


@click.group(cls=_Group)
@click.version_option(package_name="geoclus")
def main() -> None:
    """geoclus: geo-cluster block replication (sync and ordered async) with an NBD export."""


@main.group(cls=_Group)
def volume() -> None:
    """Run and inspect one site's copy of a replicated volume."""


@volume.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The site's TOML configuration file.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def serve(config_path: str, verbose: bool) -> None:
    """Run this site's copies of the configured volumes until SIGTERM/SIGINT."""
    import trio

    from geoclus.config import load_config
    from geoclus.daemon import Daemon

    cfg = load_config(config_path)
    _setup_logging(verbose)
    trio.run(Daemon(cfg).run)


def _volume_option(f: Any) -> Any:
    return click.option(
        "--volume",
        "volume_name",
        default=None,
        metavar="NAME",
        help="The volume, when the daemon serves several (its [[volume]] name).",
    )(f)


def _target(config_path: str, volume_name: str | None) -> tuple[str, dict[str, Any]]:
    """The control socket of ``config_path`` and the request fields naming the
    volume; a name the config does not hold is refused before anything is sent."""
    from geoclus.config import load_config

    cfg = load_config(config_path)
    if volume_name is None:
        return cfg.control_socket, {}
    cfg.volume(volume_name)
    return cfg.control_socket, {"volume": volume_name}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _fmt_status(s: dict[str, Any]) -> str:
    from replicator.units import format_size

    lines = [
        f"volume {s['volume']} (node {s['node']}): {s['role']}, {s['mode']} mode, "
        f"generation {s['generation']}",
    ]
    if s["connected"]:
        lines.append(f"  connection:     connected to {s['peer']}")
    else:
        err = f" (last error: {s['last_error']})" if s.get("last_error") else ""
        lines.append(f"  connection:     disconnected{err}")
    lines.append(f"  consistency:    {s['consistency']}")
    wit = s.get("witness")
    if wit:
        link = "connected" if wit["connected"] else f"unreachable ({wit['last_error'] or '-'})"
        alone = (
            f"may run alone for {wit['lease_left_s']:.1f} s more"
            if wit["alone_allowed"]
            else "does not run alone"
        )
        holder = f"; ticket held by {wit['holder']}" if wit["holder"] else ""
        lines.append(f"  witness:        {wit['address']} {link}; {alone}{holder}")
        if wit["outdated"]:
            lines.append(
                f"  OUTDATED per the witness: {wit['holder']} may have written alone; demote "
                "this copy (`geoclus volume demote`) to resynchronise from it"
            )
    if s["role"] == "primary":
        if s.get("suspended"):
            lines.append(
                "  WRITES SUSPENDED: sync mode and the peer is not replicating; restore the "
                "link or run `geoclus volume allow-degraded`"
            )
        if s.get("peer_outdated"):
            lines.append(
                "  peer:           OUTDATED (changes tracked in the dirty bitmap; needs a resync)"
            )
        w = s.get("witness")
        if s.get("degraded_allowed"):
            who = "the witness" if w and w.get("by_witness") else "the operator"
            lines.append(f"  degraded:       allowed by {who} (writes complete locally)")
        lines.append(f"  in flight:      {s['in_flight_writes']} writes")
        lines.append(
            f"  lag:            {format_size(s['lag_bytes'])}, {s['lag_writes']} writes, "
            f"{s['lag_seconds']:.3f} s (largest seen {format_size(s['max_lag_bytes_seen'])})"
        )
        lines.append(f"  dirty:          {format_size(s['dirty_bytes'])}")
        lines.append(
            f"  writes:         {s['writes']} ({format_size(s['bytes_written'])}); latency "
            f"p50 {_ms(s['write_latency_p50_ms'])}, p99 {_ms(s['write_latency_p99_ms'])}"
        )
        lines.append(
            f"  sequence:       last {s['last_seq']}, peer applied "
            f"{s['peer_applied_seq']}, peer durable {s['peer_durable_seq']}"
        )
    else:
        lines.append(f"  sequence:       applied {s['applied_seq']}, durable {s['durable_seq']}")
    if s.get("resync_active"):
        lines.append("  resync:         " + _progress_bar(s))
        if s.get("resync_identical_bytes"):
            lines.append(
                f"                  {format_size(s['resync_identical_bytes'])} found identical "
                f"(not sent), {format_size(s.get('resync_copied_bytes') or 0)} copied"
            )
    v = s.get("verify") or {}
    if v.get("state", "none") != "none":
        lines.append("  verify:         " + _fmt_verify(v))
    if s.get("last_decision"):
        d = s["last_decision"]
        lines.append(f"  last decision:  {d['action']}: {d['reason']}")
    lin = s.get("lineage") or {}
    if lin:
        flags = [f for f in ("inconsistent", "discard") if lin.get(f)]
        lines.append(
            f"  lineage:        {lin['current']} ({lin['cause']}), "
            f"{len(lin.get('history', []))} before it"
            + (f"; {', '.join(flags).upper()}" if flags else "")
        )
    lines.append(f"  round trip:     {_ms(s.get('rtt_p50_ms'))} (p50)")
    return "\n".join(lines)


def _progress_bar(s: dict[str, Any], width: int = 30) -> str:
    from replicator.units import format_size

    total = s.get("resync_total_bytes") or 0
    done = s.get("resync_done_bytes") or 0
    frac = done / total if total else 1.0
    filled = int(frac * width)
    rate = s.get("resync_rate_bytes_per_s")
    eta = s.get("resync_eta_s")
    kind = "full" if s.get("resync_full") else "delta"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% {kind} "
        f"{format_size(done)} / {format_size(total)}"
        + (f", {format_size(int(rate))}/s" if rate else "")
        + (f", {eta:.0f} s left" if eta is not None else "")
    )


def _fmt_verify(v: dict[str, Any], width: int = 30) -> str:
    from replicator.units import format_size

    total = v.get("total_bytes") or 0
    done = v.get("done_bytes") or 0
    frac = done / total if total else 1.0
    filled = int(frac * width)
    head = f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% {v['state']}"
    differ = v.get("differ_regions") or 0
    text = f"{head}, {format_size(done)} / {format_size(total)}, {differ} regions differ"
    if v.get("resync"):
        text += f" ({v.get('resynced_regions', 0)} resynced)"
    if v.get("state") == "running" and v.get("eta_s") is not None:
        text += f", {v['eta_s']:.0f} s left"
    if v.get("aborted"):
        text += f" ({v['aborted']})"
    return text


@volume.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--resync", is_flag=True, help="Copy the regions that differ from this primary to its peer."
)
@click.option("--json", "as_json", is_flag=True, help="Print the final result as JSON.")
@click.option("--no-wait", is_flag=True, help="Start the verify and return at once.")
@_volume_option
def verify(
    config_path: str, resync: bool, as_json: bool, no_wait: bool, volume_name: str | None
) -> None:
    """Compare every region of the primary with its peer, online.

    Run it on the primary. Each region's digest is compared by the peer at the
    same point of the write sequence, so writes in flight never cause false
    mismatches; the regions that really differ are listed (and, with
    --resync, copied). Exits 0 if the copies are identical (or were repaired),
    3 if regions differ, 1 if the verify was aborted.
    """
    import time

    from geoclus.control import request

    path, which = _target(config_path, volume_name)
    answer = request(path, "verify", resync=resync, **which)
    v = answer["verify"]
    if no_wait:
        text = json.dumps(v, sort_keys=True) if as_json else "verify started: " + _fmt_verify(v)
        click.echo(text)
        return
    tty = sys.stderr.isatty()
    while v.get("state") == "running":
        if tty:
            click.echo("\r" + _fmt_verify(v), nl=False, err=True)
        time.sleep(0.5)
        v = request(path, "status", **which)["status"].get("verify") or {"state": "none"}
    if tty:
        click.echo("", err=True)
    if as_json:
        click.echo(json.dumps(v, sort_keys=True, indent=2))
    else:
        click.echo("verify " + _fmt_verify(v))
        for off in v.get("differ_offsets") or []:
            click.echo(f"  differs: offset {off}")
        if v.get("differ_regions") and not v.get("resync"):
            click.echo(
                "repair with: geoclus volume verify --resync --config "
                + config_path
                + (f" --volume {volume_name}" if volume_name else "")
            )
    if v.get("state") != "done":
        sys.exit(1)
    if v.get("differ_regions") and not v.get("resync"):
        sys.exit(3)


@volume.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--watch", is_flag=True, help="Refresh every half second until interrupted.")
@_volume_option
def status(config_path: str, as_json: bool, watch: bool, volume_name: str | None) -> None:
    """Show role, mode, connection, lag, dirty bytes, write latency and resync progress."""
    import time

    from geoclus.control import request

    path, which = _target(config_path, volume_name)
    while True:
        answer = request(path, "status", **which)
        # One volume (named, or the daemon's only one): its object, as always;
        # a daemon with several and none named: every volume.
        every = [answer["status"]] if "status" in answer else answer["volumes"]
        if as_json:
            doc = answer.get("status", {"volumes": every})
            click.echo(json.dumps(doc, indent=None if watch else 2, sort_keys=True))
        else:
            text = "\n\n".join(_fmt_status(s) for s in every)
            if watch and sys.stdout.isatty():
                click.echo("\033[H\033[J" + text)
            else:
                click.echo(text)
        if not watch:
            return
        time.sleep(0.5)


@volume.command("allow-degraded")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@_volume_option
def allow_degraded(config_path: str, volume_name: str | None) -> None:
    """Let a suspended sync primary complete writes without its peer.

    The peer is then behind; the writes are shipped when it returns, or tracked
    in the dirty bitmap if the log overflows.
    """
    from geoclus.control import request

    path, which = _target(config_path, volume_name)
    answer = request(path, "allow-degraded", **which)
    click.echo(f"degraded running allowed; {answer['released_writes']} blocked writes released")


@volume.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--discard-local",
    "choice",
    flag_value="discard",
    help="Roll this copy back to its peer at the next connect (split brain).",
)
@click.option("--keep-local", "choice", flag_value="keep", help="Withdraw --discard-local.")
@_volume_option
def resolve(config_path: str, choice: str | None, volume_name: str | None) -> None:
    """Resolve a split brain: choose the copy whose own changes are thrown away.

    Run it on the copy to roll back (it must be secondary). At the next connect
    the primary resyncs it, rolling back what it changed on its own.
    """
    from geoclus.control import request

    if choice is None:
        raise click.UsageError("say --discard-local or --keep-local")
    path, which = _target(config_path, volume_name)
    answer = request(path, "resolve", discard_local=choice == "discard", **which)
    if answer["discard"]:
        click.echo("this copy will be rolled back to its peer at the next connect")
    else:
        click.echo("this copy keeps its data (no discard mark)")


@volume.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--follow", is_flag=True, help="Keep printing new events until interrupted.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@_volume_option
def events(config_path: str, follow: bool, as_json: bool, volume_name: str | None) -> None:
    """Show the volume's state changes (connects, decisions, resyncs, ...)."""
    import datetime
    import time

    from geoclus.control import request

    path, which = _target(config_path, volume_name)
    since = 0
    while True:
        answer = request(path, "events", since=since, **which)
        if answer["missed"]:
            click.echo(f"({answer['missed']} older events no longer kept)", err=True)
        for e in answer["events"]:
            if as_json:
                click.echo(json.dumps(e, sort_keys=True))
            else:
                stamp = datetime.datetime.fromtimestamp(e["time"]).isoformat(
                    sep=" ", timespec="milliseconds"
                )
                click.echo(f"{stamp}  {e['kind']:<10} {e['message']}")
            since = e["seq"]
        if not follow:
            return
        time.sleep(0.5)


@volume.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--force", is_flag=True, help="Promote although the primary did not hand over (it is gone)."
)
@_volume_option
def promote(config_path: str, force: bool, volume_name: str | None) -> None:
    """Make this secondary the primary.

    Without --force only after the primary demoted itself with this copy in
    sync (see `switchover`). With --force, for a primary that is gone: a new
    generation; in async mode writes it acknowledged but never shipped are lost,
    and what is known about them is printed.
    """
    from geoclus.control import request

    path, which = _target(config_path, volume_name)
    r = request(path, "promote", force=force, timeout_s=60.0, **which)
    if r.get("forced"):
        missing = r["known_missing_writes"]
        count = "an unknown number of" if missing is None else f"at least {missing}"
        click.echo(
            f"FORCED promotion: now primary at write {r['applied_seq']}, generation "
            f"{r['generation']}; {count} writes of the old primary are known to be missing here"
            + (" (this copy was inconsistent!)" if r.get("was_inconsistent") else "")
            + (
                f"; rolled back {r['rolled_back_regions']} regions of a cut-off resync to "
                "its consistent pre-resync image"
                if r.get("rolled_back_regions")
                else ""
            )
        )
    else:
        click.echo(
            f"promoted: now primary at write {r['applied_seq']}, generation {r['generation']}"
        )


@volume.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@_volume_option
def demote(config_path: str, volume_name: str | None) -> None:
    """Make this primary a secondary (drains the peer first, bounded)."""
    from geoclus.control import request

    path, which = _target(config_path, volume_name)
    r = request(path, "demote", timeout_s=120.0, **which)
    click.echo(
        f"demoted: now secondary at write {r['last_seq']}; peer drained: {r['peer_drained']}"
    )


@volume.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The current primary's configuration.",
)
@click.option(
    "--to",
    "to_config",
    required=True,
    type=click.Path(dir_okay=False),
    help="The secondary that becomes primary.",
)
@_volume_option
def switchover(config_path: str, to_config: str, volume_name: str | None) -> None:
    """Planned role swap with no data loss and no resync: drain and demote the
    primary, then promote the secondary (refused if the drain did not finish)."""
    from geoclus.control import request

    path, which = _target(config_path, volume_name)
    to_path, to_which = _target(to_config, volume_name)
    click.echo("demoting the primary (draining writes to the peer) ...")
    r = request(path, "demote", timeout_s=120.0, **which)
    if not r["peer_drained"]:
        raise click.ClickException(
            "the primary could not drain to its peer (disconnected or too slow); it is now "
            "secondary. Re-promote it with `geoclus volume promote --force`, or promote the "
            "other with --force accepting the loss"
        )
    click.echo(f"demoted at write {r['last_seq']}; promoting the new primary ...")
    p = request(to_path, "promote", force=False, timeout_s=60.0, **to_which)
    click.echo(
        f"switchover done: new primary at write {p['applied_seq']}, generation "
        f"{p['generation']} (unchanged: no resync)"
    )


@volume.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def stop(config_path: str) -> None:
    """Ask the daemon to shut down cleanly (same as SIGTERM), every volume it serves."""
    from geoclus.control import request

    request(_target(config_path, None)[0], "shutdown")
    click.echo("shutdown requested")


def _attach_subcommands() -> None:
    from geoclus.ca_cli import ca
    from geoclus.cluster.cli import cluster, node, witness
    from geoclus.cluster.sim_cli import sim
    from geoclus.demo import demo
    from geoclus.linkemu_cli import linkemu

    main.add_command(ca)
    main.add_command(linkemu)
    main.add_command(demo)
    main.add_command(sim)
    main.add_command(cluster)
    main.add_command(node)
    main.add_command(witness)


_attach_subcommands()
