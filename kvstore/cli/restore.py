"""`kvstore restore FILE`: a new cluster member's data directory from a `kvctl snapshot save` file."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kvstore.server.config import parse_peers


@click.command("restore")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The member's new data directory (must not exist or be empty).")
@click.option("--id", "node_id", type=click.IntRange(min=1), required=True, help="This member's node id.")
@click.option("--peers", required=True, help="The NEW cluster: 1=HOST:PORT,2=HOST:PORT,... (includes this node); "
              "the same on every member.")
@click.option("--groups", type=click.IntRange(1, 4095), default=None,
              help="Data groups of the new cluster (default: the source cluster's); keys are re-hashed into them.")
@click.option("--replication", type=click.IntRange(1, 7), default=None,
              help="Replicas per data group (default: the source cluster's).")
@click.option("--vnodes", type=click.IntRange(1, 4096), default=None, help="Virtual nodes per group on the ring "
              "(default: the source cluster's).")
def restore(path: Path, data_dir: Path, node_id: int, peers: str, groups: int | None, replication: int | None,
            vnodes: int | None) -> None:
    """Create the data directory of member --id of a NEW cluster holding exactly FILE's keys, users
    and roles. Restore every member from the same FILE with the same --peers, --groups,
    --replication and --vnodes, then start each with `kvstore serve --data-dir ...` (same --id and
    --peers). Later revisions are above the backup's. The whole file is verified first."""
    from kvstore.backup.format import BackupFormatError
    from kvstore.backup.restore import RestoreError
    from kvstore.backup.restore import restore as do_restore
    from kvstore.storage.errors import StorageError

    try:
        peer_map = parse_peers(peers)
        res = do_restore(path, data_dir, node_id, peer_map, groups=groups, replication=replication, vnodes=vnodes)
    except BackupFormatError as err:
        click.echo(f"kvstore restore: {path} is damaged or not a backup: {err}", err=True)
        sys.exit(2)
    except (RestoreError, ValueError, OSError, StorageError) as err:
        click.echo(f"kvstore restore: {err}", err=True)
        sys.exit(2)
    s = res.summary
    hosted = ", ".join(f"group {g}: {n} keys" for g, n in sorted(res.groups.items())) or "no data group"
    click.echo(f"restored {data_dir} (node {node_id}) from {path}: revision {s.info.revision}, {s.keys} keys in "
               f"{len(res.shard_map.groups)} data groups; here {hosted}")
