"""``ca``: create the cluster CA and issue node certificates for mutual TLS.

Every operating error is printed as one line and exits non-zero
(:class:`click.ClickException`), never a traceback.
"""

from __future__ import annotations

import click

from geoclus.ca import init_ca, issue_node_cert
from geoclus.errors import GeoclusError

__all__ = ["ca"]


@click.group(name="ca")
def ca() -> None:
    """Manage the cluster CA and node certificates (mutual TLS between nodes)."""


@ca.command("init")
@click.option(
    "--dir", "directory", required=True, type=click.Path(file_okay=False), help="CA directory."
)
@click.option("--cluster", "cluster", default="geoclus", show_default=True, help="Cluster name.")
@click.option(
    "--valid-days", type=int, default=3650, show_default=True, help="CA certificate lifetime."
)
@click.option(
    "--force", is_flag=True, help="Replace an existing CA (its certificates stop working)."
)
def init_cmd(directory: str, cluster: str, valid_days: int, force: bool) -> None:
    """Create ca.crt and ca.key (mode 0600) in DIR."""
    try:
        paths = init_ca(directory, cluster, valid_days=valid_days, force=force)
    except GeoclusError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {paths.cert} (cluster CA certificate: copy it to every node)")
    click.echo(f"wrote {paths.key} (CA private key, mode 0600: keep it here, never copy it)")


@ca.command("issue")
@click.argument("node")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False),
    help="CA directory (holding ca.crt and ca.key).",
)
@click.option(
    "--valid-days", type=int, default=825, show_default=True, help="Certificate lifetime."
)
@click.option("--force", is_flag=True, help="Replace an existing certificate for NODE.")
def issue_cmd(node: str, directory: str, valid_days: int, force: bool) -> None:
    """Issue NODE.crt and NODE.key (mode 0600) in DIR, signed by the cluster CA."""
    try:
        paths = issue_node_cert(directory, node, valid_days=valid_days, force=force)
    except GeoclusError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {paths.cert} (certificate for node {node})")
    click.echo(f"wrote {paths.key} (private key of node {node}, mode 0600)")
    click.echo(f"copy {paths.ca_cert}, {paths.cert.name} and {paths.key.name} to node {node}")
