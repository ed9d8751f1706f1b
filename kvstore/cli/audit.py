"""`kvstore audit verify PATH`: check an audit log's MAC chain and its recorded head.

Exit status: 0 the log verifies (lines after the recorded head are reported as unconfirmed, not
as tampering), 1 it does not (the message names the first bad line), 2 the check could not run
(no key, unreadable store).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group("audit")
def audit() -> None:
    """Work with a node's audit log (`kvstore serve --audit-log`)."""


@audit.command("verify")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The node's MAC key [default: <data-dir>/audit.key].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The node's data directory: its store holds the chain's recorded head (needed to detect "
                   "lines removed from the end) and, by default, the key.")
def verify_cmd(path: Path, key_file: Path | None, data_dir: Path | None) -> None:
    """Verify the audit log at PATH and its rotated files (PATH.1, PATH.2, ...)."""
    from kvstore.security.audit import KEY_FILE, KeyFileError, read_key, verify
    from kvstore.storage.errors import StorageError
    from kvstore.storage.store import read_audit_head

    if key_file is None:
        if data_dir is None:
            raise click.UsageError("give --key-file or --data-dir (whose audit.key is the node's key)")
        key_file = data_dir / KEY_FILE
    try:
        key = read_key(key_file)
    except KeyFileError as err:
        click.echo(f"kvstore audit verify: {err}", err=True)
        sys.exit(2)
    head = None
    if data_dir is not None:
        try:
            head = read_audit_head(data_dir / "db")
        except StorageError as err:
            click.echo(f"kvstore audit verify: {err}", err=True)
            sys.exit(2)
        if head is None:
            click.echo(f"note: the store in {data_dir} has no recorded audit head (nothing confirmed yet)")
    if not path.exists() and not any(path.parent.glob(path.name + ".*")):
        click.echo(f"kvstore audit verify: no audit log at {path}", err=True)
        sys.exit(2)
    report = verify(path, key, head)
    if head is not None:
        click.echo(f"recorded head: seq {head.seq}, kept from seq {head.floor}")
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)
