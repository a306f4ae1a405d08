"""``geoclus cluster``, ``geoclus node`` and ``geoclus witness``: the cluster
service's commands. ``cluster init`` writes a starter configuration for every
node (and the witness) and the cluster CA with one certificate each; ``node
run`` and ``witness run`` run the processes; the other ``cluster`` commands
talk to the local node's control socket (``state_dir/control.sock``)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from geoclus.ca import init_ca, issue_node_cert
from geoclus.cluster.config import TIMER_KEYS, Timers, load_cluster_config, starter_config
from geoclus.control import request
from geoclus.errors import GeoclusError
from quorum.votes import QuorumKind


@click.group("cluster")
def cluster() -> None:
    """The stretched cluster service (membership, quorum, configuration)."""


def _parse_node(text: str) -> tuple[str, str, str]:
    name, sep, rest = text.partition("@")
    site, sep2, address = rest.partition("=")
    if not (sep and sep2 and name and site and address):
        raise click.BadParameter(f"{text!r}: write NAME@SITE=HOST:PORT, e.g. a1@A=10.0.0.1:7800")
    return name, site, address


@cluster.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@click.option("--name", "cluster_name", required=True, help="Cluster name.")
@click.option(
    "--node",
    "nodes",
    multiple=True,
    required=True,
    metavar="NAME@SITE=HOST:PORT",
    help="A node, its site and its address (repeat for every node).",
)
@click.option(
    "--quorum",
    type=click.Choice([k.value for k in QuorumKind]),
    default=QuorumKind.MAJORITY_WITNESS.value,
    show_default=True,
)
@click.option("--witness", default=None, metavar="HOST:PORT", help="The third-site witness.")
@click.option(
    "--quorum-volume",
    default="quorum",
    show_default=True,
    help="disk quorum: the export name of the quorum volume.",
)
@click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    metavar="HOST:PORT",
    help="disk quorum: the quorum volume's NBD export at one site (repeat for each).",
)
@click.option(
    "--mirror-name",
    "mirror_names",
    multiple=True,
    metavar="NAME",
    help="disk quorum with --witness: the certificate name of each mirror's volume daemon "
    "(in --mirror order; default qvol-1, qvol-2, ...).",
)
@click.option(
    "--timer",
    "timer_values",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a [timers] default, e.g. heartbeat_interval_s=0.3 (repeatable).",
)
@click.option(
    "--log-compact-entries",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="[log] compact_entries: reset the log once this many committed entries gather.",
)
@click.option(
    "--quorum-disk-tls/--no-quorum-disk-tls",
    default=False,
    show_default=True,
    help="disk quorum: reach the mirrors' exports with NBD STARTTLS and the node certificates.",
)
def init_cmd(
    directory: str,
    cluster_name: str,
    nodes: tuple[str, ...],
    quorum: str,
    witness: str | None,
    quorum_volume: str,
    mirrors: tuple[str, ...],
    mirror_names: tuple[str, ...],
    timer_values: tuple[str, ...],
    log_compact_entries: int,
    quorum_disk_tls: bool,
) -> None:
    """Write DIR/ca (the cluster CA, a certificate per node and the witness)
    and DIR/NODE.toml for every node, then check each file as `node run` will."""
    parsed = [_parse_node(n) for n in nodes]
    kind = QuorumKind(quorum)
    overrides: dict[str, float] = {}
    for item in timer_values:
        k, sep, v = item.partition("=")
        if not sep or k not in TIMER_KEYS:
            raise click.BadParameter(f"{item!r}: write KEY=VALUE with KEY one of {TIMER_KEYS}")
        try:
            overrides[k] = int(v) if k.startswith("missed_") else float(v)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {v!r} is not a number") from None
    timers = Timers(**overrides)  # type: ignore[arg-type]
    disk_witness = kind is QuorumKind.DISK and witness is not None
    if mirror_names and not disk_witness:
        raise click.BadParameter("--mirror-name is for --quorum disk with --witness")
    if disk_witness and not mirror_names:
        mirror_names = tuple(f"qvol-{i}" for i in range(1, len(mirrors) + 1))
    if disk_witness and len(mirror_names) != len(mirrors):
        raise click.BadParameter("give one --mirror-name per --mirror")
    try:
        ca_dir = os.path.join(directory, "ca")
        init_ca(ca_dir, cluster_name)
        for name, _, _ in parsed:
            issue_node_cert(ca_dir, name)
        if witness is not None:
            issue_node_cert(ca_dir, "witness")
        for mname in mirror_names:
            issue_node_cert(ca_dir, mname)
        cfg = None
        for name, _, _ in parsed:
            path = os.path.join(directory, f"{name}.toml")
            with open(path, "x") as f:
                f.write(
                    starter_config(
                        cluster_name,
                        name,
                        parsed,
                        kind,
                        witness,
                        timers,
                        quorum_volume=quorum_volume,
                        mirrors=list(mirrors),
                        log_compact_entries=log_compact_entries,
                        quorum_disk_tls=quorum_disk_tls,
                    )
                )
            cfg = load_cluster_config(path)
            click.echo(f"wrote {path}")
        if witness is not None and cfg is not None:
            from geoclus.cluster.witnessd import load_witness_config

            path = os.path.join(directory, "witness.toml")
            names = ", ".join(f'"{n}"' for n, _, _ in parsed)
            with open(path, "x") as f:
                f.write(
                    '# geoclus witness (docs/cluster.md, "The witness")\n[witness]\n'
                    f'cluster = "{cluster_name}"\nlisten = "{witness}"\nca = "ca/ca.crt"\n'
                    'cert = "ca/witness.crt"\nkey = "ca/witness.key"\n'
                    f'state_dir = "witness-state"\nnodes = [{names}]\n'
                    f"lease_s = {cfg.spec().max_lease_s!r}\n"
                    f"collect_s = {cfg.timers.heartbeat_interval_s!r}\n"
                )
                if disk_witness:
                    listed = ", ".join(f'"{n}"' for n in mirror_names)
                    f.write(
                        "# The quorum volume's mirrors: the witness decides which one may\n"
                        "# run alone (give each mirror's volume TOML a [witness] table).\n"
                        f"mirrors = [{listed}]\n"
                    )
            load_witness_config(path)
            click.echo(f"wrote {path}")
    except FileExistsError as exc:
        raise click.ClickException(f"{exc.filename} exists: choose an empty --dir") from None
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"cluster {cluster_name}: {len(parsed)} nodes, quorum {kind.value}; copy ca/ca.crt, "
        "ca/NODE.crt, ca/NODE.key and NODE.toml to each node (keep ca/ca.key off the nodes)"
    )


# --- talking to the local node -------------------------------------------------------


def _config_option(f: Any) -> Any:
    return click.option(
        "--config",
        "config_path",
        required=True,
        type=click.Path(dir_okay=False),
        help="This node's cluster TOML (its state_dir holds the control socket).",
    )(f)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def _ask(config_path: str, cmd: str, timeout_s: float = 30.0, **args: Any) -> dict[str, Any]:
    try:
        cfg = load_cluster_config(config_path)
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None
    sock = os.path.join(cfg.state_dir, "control.sock")
    if not os.path.exists(sock):
        raise click.ClickException(
            f"no control socket at {sock}: start the node with "
            f"`geoclus node run --config {config_path}`"
        )
    try:
        return request(sock, cmd, timeout_s=timeout_s, **args)
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None


def format_status(st: dict[str, Any]) -> str:
    """The text form of ``geoclus cluster status``."""
    q = st["quorum"]
    lines = [
        f"cluster {st['cluster']}  (seen from {st['node']}, site {st['site']})",
        f"quorum    {st['quorum_kind']}: "
        + ("HAS QUORUM" if st["acting"] else "NO QUORUM")
        + f" ({q['reason']})"
        + ("  [FORCED by the operator]" if st["forced"] else ""),
        f"view      {st['view'][0]} by {st['view'][1]}; locker {st['locker'] or '-'}; "
        f"members {', '.join(st['members']) or '-'}",
        f"config    version {st['config_version']} (log {st['log_length']}, "
        f"committed {st['commit']})",
        f"voters    {', '.join(st['voters'])}"
        + (
            f"  (next view: {', '.join(st['voters_committed'])})"
            if st["voters_committed"] != st["voters"]
            else ""
        ),
    ]
    w = st.get("witness")
    if w is not None:
        vote = f"vote held for {w['vote_s']:.1f} s more" if w["vote_s"] > 0 else "no vote held"
        link = "connected" if w["connected"] else "NOT connected"
        lines.append(f"witness   {w['address']} {link}; {vote}")
    qd = st.get("quorum_disk")
    if qd is not None:
        held = (
            f"held by this view for {qd['view_holds_s']:.1f} s more"
            if qd["view_holds_s"] > 0
            else "NOT held by this node's view"
        )
        using = qd["using"] or "no writable mirror connected"
        if qd["using"]:
            using += " (TLS)" if qd.get("tls") else " (plain TCP)"
        lines.append(
            f"disk      {qd['volume']} via {using}; {held}; arbitration {qd['phase']}"
            + (f"; last error: {qd['last_error']}" if qd["last_error"] else "")
        )
    lines.append("")
    lines.append(
        f"{'node':<12} {'site':<8} {'state':<9} {'networks':<9} round trip (p50/p99/max us)"
    )
    for n in st["nodes"]:
        nets = ",".join(str(x) for x in n["networks_up"]) or "-"
        if n.get("self"):
            rtt = "(this node)"
        else:
            parts = [
                f"net{k}: {v['p50']:.0f}/{v['p99']:.0f}/{v['max']:.0f}"
                for k, v in n.get("rtt_us", {}).items()
                if v["samples"]
            ]
            rtt = "; ".join(parts) or "-"
        lines.append(f"{n['name']:<12} {n['site']:<8} {n['state']:<9} {nets:<9} {rtt}")
    drops = st["heartbeats"]["dropped"]
    if drops:
        lines.append("")
        lines.append(
            "heartbeats dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items()))
        )
    return "\n".join(lines)


@cluster.command("status")
@_config_option
@_json_option
def status_cmd(config_path: str, as_json: bool) -> None:
    """Nodes, sites, states, networks, round trips, quorum, view, config version."""
    st = _ask(config_path, "status")["status"]
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


def _format_event(e: dict[str, Any]) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(e["wall_time"]))
    frac = f"{e['wall_time'] % 1:.3f}"[1:]
    return f"{t}{frac} {e['origin']:<10} {e['kind']:<10} {e['message']}"


@cluster.command("events")
@_config_option
@_json_option
@click.option("--follow", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
def events_cmd(config_path: str, as_json: bool, follow: bool) -> None:
    """The cluster-wide event history (every node's events, replicated)."""
    since = 0.0
    while True:
        evs = _ask(config_path, "events", since=since)["events"]
        for e in evs:
            click.echo(json.dumps(e) if as_json else _format_event(e))
            since = max(since, e["wall_time"])
        if not follow:
            return
        sys.stdout.flush()
        time.sleep(1.0)


@cluster.command("log")
@_config_option
@_json_option
def log_cmd(config_path: str, as_json: bool) -> None:
    """The committed configuration log as this node keeps it: the snapshot
    (updates folded by the last log reset) and the entries after it."""
    r = _ask(config_path, "log")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(
        f"snapshot: updates 1-{r['snapshot_index']}" if r["snapshot_index"] else "snapshot: none"
    )
    for e in r["entries"]:
        view = f"({e['view'][0]},{e['view'][1]})"
        click.echo(f"{e['index']:>8} {view:<10} {e['uid']:<24} {json.dumps(e['update'])}")


def _submit(config_path: str, update: dict[str, Any], timeout_s: float) -> None:
    r = _ask(config_path, "submit", timeout_s=timeout_s + 5, update=update, wait_s=timeout_s)
    click.echo(f"committed as update {r['index']}; configuration version {r['version']}")


@cluster.command("set")
@_config_option
@click.argument("key")
@click.argument("value")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True)
def set_cmd(config_path: str, key: str, value: str, timeout_s: float) -> None:
    """Set KEY to VALUE (JSON, or a plain string) on every node, atomically."""
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    _submit(config_path, {"op": "set", "key": key, "value": parsed}, timeout_s)


@cluster.command("delete")
@_config_option
@click.argument("key")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True)
def delete_cmd(config_path: str, key: str, timeout_s: float) -> None:
    """Delete KEY on every node, atomically."""
    _submit(config_path, {"op": "delete", "key": key}, timeout_s)


@cluster.command("get")
@_config_option
@_json_option
def get_cmd(config_path: str, as_json: bool) -> None:
    """The configuration database as this node has applied it."""
    r = _ask(config_path, "backup")
    state = json.loads(json.loads(r["checkpoint"])["state"])
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    click.echo(f"version {state['version']}")
    for k, v in sorted(state["values"].items()):
        click.echo(f"{k} = {json.dumps(v)}")
    for n in state["evicted"]:
        click.echo(f"evicted: {n}")
    for n in state["paused"]:
        click.echo(f"paused: {n}")


@cluster.command("evict")
@_config_option
@click.argument("node")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True)
def evict_cmd(config_path: str, node: str, timeout_s: float) -> None:
    """Remove NODE from the cluster for good: its certificate is refused from
    then on, the heartbeat key is rotated, and once the next view forms its
    vote leaves the total (quorum is counted over the remaining voters).
    Evictions take effect one at a time: a second one waits until the
    first has. NODE stops itself if it is running and learns of it."""
    _submit(config_path, {"op": "evict", "node": node}, timeout_s)


@cluster.command("pause")
@_config_option
@click.argument("node")
def pause_cmd(config_path: str, node: str) -> None:
    """NODE stays a voting member but takes no new resource groups."""
    _submit(config_path, {"op": "pause", "node": node}, 30.0)


@cluster.command("resume")
@_config_option
@click.argument("node")
def resume_cmd(config_path: str, node: str) -> None:
    """Undo `pause`."""
    _submit(config_path, {"op": "resume", "node": node}, 30.0)


@cluster.command("backup")
@_config_option
@click.argument("file", type=click.Path(dir_okay=False))
def backup_cmd(config_path: str, file: str) -> None:
    """Write the committed configuration database to FILE (self-checking)."""
    r = _ask(config_path, "backup")
    try:
        with open(file, "x") as f:
            f.write(r["checkpoint"])
    except FileExistsError:
        raise click.ClickException(f"{file} exists: choose a new file name") from None
    click.echo(f"wrote {file}: configuration version {r['version']}")


@cluster.command("restore")
@_config_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--timeout", "timeout_s", default=30.0, show_default=True)
def restore_cmd(config_path: str, file: str, timeout_s: float) -> None:
    """Replace the configuration database with FILE's, as one global update."""
    from geoclus.cluster.configdb import ConfigDb

    with open(file, "rb") as f:
        data = f.read()
    try:
        cfg = load_cluster_config(config_path)
        db = ConfigDb.from_checkpoint(data, cfg.name)
    except GeoclusError as exc:
        raise click.ClickException(f"{file}: {exc}; nothing was changed") from None
    r = _ask(
        config_path, "restore", timeout_s=timeout_s + 5, checkpoint=data.decode(), wait_s=timeout_s
    )
    click.echo(
        f"restored the backup of version {db.version} as update {r['index']}; "
        f"configuration version {r['version']}"
    )
    if r.get("note"):
        click.echo(f"note: {r['note']}")


@cluster.command("force-quorum")
@_config_option
@click.option("--site", required=True, help="The site to bring back (this node's site).")
def force_quorum_cmd(config_path: str, site: str) -> None:
    """Operator override for two sites with no witness: let SITE run without
    quorum. Refused while any node of another site still answers heartbeats.
    Read docs/operations.md ("Losing a site") first."""
    _ask(config_path, "force_quorum", site=site)
    click.echo(
        f"quorum forced for site {site}: its nodes form a view now; the override ends by "
        "itself when the other site rejoins. Make sure the other site stays down until then."
    )


@cluster.command("leave")
@_config_option
def leave_cmd(config_path: str) -> None:
    """Planned exit of this node: the others re-form at once; the daemon stops."""
    _ask(config_path, "leave")
    click.echo("left the cluster; the daemon stops")


@cluster.command("check-latency")
@_config_option
@_json_option
@click.option("--count", default=200, show_default=True, help="Probes per link.")
@click.option("--interval-ms", default=2.0, show_default=True, help="Between probe rounds.")
def check_latency_cmd(config_path: str, as_json: bool, count: int, interval_ms: float) -> None:
    """Probe every link with a burst and print a verdict per link."""
    links = _ask(
        config_path,
        "check_latency",
        timeout_s=60 + count * interval_ms / 1000,
        count=count,
        interval_s=interval_ms / 1000,
    )["links"]
    if as_json:
        click.echo(json.dumps(links, indent=2))
    else:
        for link in links:
            click.echo(link["line"])
    if not all(link["ok"] for link in links):
        sys.exit(1)


def _run_until_signal(run: Any, verbose: bool) -> None:
    """Run a daemon's ``run`` under trio until it returns or SIGTERM/SIGINT."""
    import logging
    import signal

    import trio

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    async def main() -> None:
        async with trio.open_nursery() as n:

            async def runner() -> None:
                await run()
                n.cancel_scope.cancel()  # it returned by itself (`cluster leave`)

            n.start_soon(runner)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    n.cancel_scope.cancel()
                    return

    trio.run(main)


@click.group("node")
def node() -> None:
    """This node's cluster service."""


@node.command("run")
@_config_option
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def node_run(config_path: str, verbose: bool) -> None:
    """Run this node's cluster service until stopped (or `cluster leave`)."""
    from geoclus.cluster.daemon import NodeDaemon

    try:
        cfg = load_cluster_config(config_path)
        d = NodeDaemon(cfg)
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None
    _run_until_signal(d.run, verbose)
    if d.core.evicted:
        raise click.ClickException(
            f"node {cfg.node} was evicted from cluster {cfg.name}: it stopped for good. To "
            "bring this machine back, give it a new node name and certificate and add it "
            "to every node's configuration"
        )


@click.group("witness")
def witness() -> None:
    """The third-site witness."""


@witness.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def witness_run(config_path: str, verbose: bool) -> None:
    """Run the witness until stopped."""
    from geoclus.cluster.witnessd import WitnessDaemon, load_witness_config

    try:
        d = WitnessDaemon(load_witness_config(config_path))
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None
    _run_until_signal(d.run, verbose)


@witness.command("status")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@_json_option
def witness_status(config_path: str, as_json: bool) -> None:
    """Which view holds the witness's vote, and what it recorded."""
    from geoclus.cluster.witnessd import load_witness_config

    try:
        cfg = load_witness_config(config_path)
        st = request(os.path.join(cfg.state_dir, "control.sock"), "status")["status"]
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    h = st["holder"]
    holder = (
        f"view {h['view']} (members {', '.join(map(str, h['members']))}), "
        f"lease {h['lease_left_s']:.1f} s left"
        if h
        else "nobody"
    )
    click.echo(f"witness of {st['cluster']} on {st['listen']}: vote held by {holder}")
    click.echo(
        f"recorded log position {st['recorded']}; {st['grants']} grants, "
        f"{st['refusals']} refusals; connected: {', '.join(st['connected']) or '-'}"
    )
    for volume, t in st.get("mirrors", {}).items():
        alone = (
            f"may run alone ({t['lease_left_s']:.1f} s of lease left)"
            if t["lease_left_s"] > 0
            else "lease ended"
        )
        mark = (
            "; the other mirror is OUTDATED until the holder reports the sync" if t["alone"] else ""
        )
        click.echo(
            f"volume {volume}: ticket held by {t['holder'] or 'nobody'} (epoch {t['epoch']}), "
            f"{alone}{mark}; {t['grants']} grants, {t['refusals']} refusals"
        )


@witness.command("release-mirror")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--volume", "volume", required=True, help="The replicated volume's name.")
def witness_release_mirror(config_path: str, volume: str) -> None:
    """Operator override: forget which mirror of VOLUME holds the ticket and
    which one is outdated. Only after checking, by hand, which copy is current
    (e.g. the holder's site is destroyed and its alone writes are given up)."""
    from geoclus.cluster.witnessd import load_witness_config

    try:
        cfg = load_witness_config(config_path)
        request(os.path.join(cfg.state_dir, "control.sock"), "release-mirror", volume=volume)
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"released the ticket of volume {volume}: the next claim decides (a secondary after "
        "the primary preference)"
    )
