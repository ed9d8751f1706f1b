"""`kvstore cert create-ca | create-node | create-client`: write a cluster's certificates."""

from __future__ import annotations

from pathlib import Path

import click

CERTS_DIR = click.option(
    "--certs-dir", type=click.Path(file_okay=False, path_type=Path), required=True, envvar="KVSTORE_CERTS_DIR",
    help="The certs directory (ca.crt, node.crt/node.key, client.<user>.crt/.key).",
)
CA_KEY = click.option(
    "--ca-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="The CA's private key [default: <certs-dir>/ca.key]. Keep it off the nodes in production.",
)
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace existing files.")


def _run(fn: object, *args: object, **kwargs: object) -> None:
    try:
        written = fn(*args, **kwargs)  # type: ignore[operator]
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {written.cert} and {written.key} (the key with mode 0600)")


@click.group("cert")
def cert() -> None:
    """Create the cluster's CA, node and client certificates (EC P-256)."""


@cert.command("create-ca")
@CERTS_DIR
@CA_KEY
@OVERWRITE
@click.option("--lifetime-days", type=click.IntRange(1, 36600), default=3660, show_default=True)
def create_ca(certs_dir: Path, ca_key: Path | None, overwrite: bool, lifetime_days: int) -> None:
    """Create the cluster's CA: ca.crt and ca.key."""
    from kvstore.security import certs

    _run(certs.create_ca, certs_dir, ca_key=ca_key, overwrite=overwrite, days=lifetime_days)


@cert.command("create-node")
@CERTS_DIR
@CA_KEY
@OVERWRITE
@click.option("--node-id", type=click.IntRange(min=1), required=True, help="The node id it certifies.")
@click.option("--host", "hosts", multiple=True, required=True,
              help="A DNS name or IP address the node is reached at (repeat; every address in --peers, "
              "--advertise and the clients' --endpoints).")
@click.option("--lifetime-days", type=click.IntRange(1, 36600), default=1830, show_default=True)
def create_node(certs_dir: Path, ca_key: Path | None, overwrite: bool, node_id: int, hosts: tuple[str, ...],
                lifetime_days: int) -> None:
    """Create node.crt and node.key for one node (SAN kvstore://node/<id> plus each --host)."""
    from kvstore.security import certs

    _run(certs.create_node, certs_dir, node_id, list(hosts), ca_key=ca_key, overwrite=overwrite,
         days=lifetime_days)


@cert.command("create-client")
@CERTS_DIR
@CA_KEY
@OVERWRITE
@click.option("--user", default="root", show_default=True, help="The user (the certificate's CN).")
@click.option("--lifetime-days", type=click.IntRange(1, 36600), default=1830, show_default=True)
def create_client(certs_dir: Path, ca_key: Path | None, overwrite: bool, user: str, lifetime_days: int) -> None:
    """Create client.<user>.crt and client.<user>.key."""
    from kvstore.security import certs

    _run(certs.create_client, certs_dir, user, ca_key=ca_key, overwrite=overwrite, days=lifetime_days)
