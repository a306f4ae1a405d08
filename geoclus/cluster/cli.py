"""``geoclus cluster``: cluster-wide commands. ``init`` writes a starter
configuration for every node and the cluster CA with one certificate per node
(and one for the witness)."""

from __future__ import annotations

import os

import click

from geoclus.ca import init_ca, issue_node_cert
from geoclus.cluster.config import load_cluster_config, starter_config
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
def init_cmd(
    directory: str, cluster_name: str, nodes: tuple[str, ...], quorum: str, witness: str | None
) -> None:
    """Write DIR/ca (the cluster CA, a certificate per node and the witness)
    and DIR/NODE.toml for every node, then check each file as `node run` will."""
    parsed = [_parse_node(n) for n in nodes]
    kind = QuorumKind(quorum)
    try:
        ca_dir = os.path.join(directory, "ca")
        init_ca(ca_dir, cluster_name)
        for name, _, _ in parsed:
            issue_node_cert(ca_dir, name)
        if witness is not None:
            issue_node_cert(ca_dir, "witness")
        for name, _, _ in parsed:
            path = os.path.join(directory, f"{name}.toml")
            with open(path, "x") as f:
                f.write(starter_config(cluster_name, name, parsed, kind, witness))
            load_cluster_config(path)
            click.echo(f"wrote {path}")
    except FileExistsError as exc:
        raise click.ClickException(f"{exc.filename} exists: choose an empty --dir") from None
    except GeoclusError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"cluster {cluster_name}: {len(parsed)} nodes, quorum {kind.value}; copy ca/ca.crt, "
        "ca/NODE.crt, ca/NODE.key and NODE.toml to each node (keep ca/ca.key off the nodes)"
    )
