"""`kvstore restore`: a new cluster member's data directory holding exactly a backup's keys.

Every member of the new cluster is restored from the same file with the same `--peers`,
`--groups`, `--replication` and `--vnodes`, so every member computes the same shard map
(`ShardMap.initial`, as `kvstore serve` bootstraps a new cluster) and the same group states; the
new cluster then starts with `kvstore serve` on those directories (its bootstrap flags are not
used again: the map is in the metadata group's log). What a member's directory holds:

- the metadata group (every voter): its bootstrap log, as `serve` writes it, with the commands
  CLOSE(R) (so the group's later revisions are above R), the put of the new shard map and the
  put of the backup's auth state (users, roles, whether auth is on) with a new token key derived
  from the old one and the file's hash (`restored_auth`: old tokens are not valid here);
- each data group the map creates with this node among its initial voters: a Raft snapshot
  installed at index 1, term 1, with the group's initial members as its configuration, holding
  the group's ranges of the new ring (keys are re-hashed: any number of groups) and the backup's
  keys whose hash falls in them, each with its value, create and mod revisions and version
  (history rows as `mvcc.py` keeps them), and the revision state last = compact = R. So later
  writes of the group get revisions above R (the apply rule), reads at R return exactly the
  backup, and reads or watches below R fail COMPACTED; and the leases the backup has (README
  "Leases"): each lease's record in its home group (the group its id names: a lease whose home
  group the new cluster does not have is not restored, its keys are restored unattached), with
  the remaining TTL it had when saved, which the new cluster's leader counts from when it first
  reads it; the attachments of the keys each group holds. Members the map places in a group later
  (none at start) would receive it by Raft snapshot as usual.

The file is verified whole (hash included) before anything is written; the directory is built
under a temporary name next to the target and renamed into place, so a failed restore leaves no
half-restored directory. A non-empty target is refused. Memory: one key chunk of the file and one
snapshot chunk at a time (one pass over the file per hosted data group).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from kvstore.backup.format import BackupReader, BackupSummary, verify
from kvstore.node.store import GroupWrite
from kvstore.raft.types import ConfState, HardState, SnapshotMeta
from kvstore.security.authstate import AUTH_KEY, AuthError, AuthState
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap, ShardMapError
from kvstore.storage import leases, mvcc
from kvstore.storage.commands import encode_close, encode_put
from kvstore.storage.fsutil import fsync_dir
from kvstore.storage.shardcmd import ShardState
from kvstore.storage.snapfile import (
    TAG_DATA,
    TAG_LEASES,
    TAG_REV_HIST,
    TAG_REV_KEYS,
    TAG_REV_STATE,
    TAG_SHARDS,
    Record,
    encode_snapshot,
)
from kvstore.storage.store import LmdbNodeStore

SNAPSHOT_INDEX = 1
SNAPSHOT_TERM = 1
CHUNK = 1 << 20


class RestoreError(ValueError):
    """The restore cannot be done (the message says why); nothing was written."""


@dataclass(frozen=True, slots=True)
class RestoreResult:
    summary: BackupSummary
    shard_map: ShardMap
    groups: dict[int, int]
    """data group hosted here -> keys restored into it"""


def group_records(
    path: Path, ranges: IntervalSet, revision: int, counts: list[int], sha256: str, group: int = 0,
    homes: Collection[int] = frozenset(),
) -> Iterator[Record]:
    """The snapshot records of data group `group` serving `ranges`: its shard state, then per key
    of the backup in those ranges its data, key and history rows, then its revision state, then
    its lease rows (the records of the leases homed in `group`, with the remaining TTL the backup
    has; the attachments of its keys to leases whose home group is one of `homes`, the new
    cluster's data groups: a lease homed elsewhere is not restored, so its keys stay unattached).
    Each pass reads the file again: RestoreError if it is no longer the file `verify` read
    (`sha256`), or if a key is attached to two leases."""
    yield TAG_SHARDS, b"", ShardState(ranges, IntervalSet()).encode()
    kid = 1
    with open(path, "rb") as f:
        reader = BackupReader(f)
        for k in reader.entries():
            if key_hash(k.key) not in ranges:
                continue
            meta = mvcc.KeyMeta(k.create_revision, k.mod_revision, k.version)
            yield TAG_DATA, k.key, k.value
            yield TAG_REV_KEYS, k.key, mvcc.encode_key_row(kid, meta)
            yield TAG_REV_HIST, mvcc.hist_key(kid, k.mod_revision), mvcc.encode_row(
                mvcc.KIND_PUT, k.create_revision, k.version, k.value)
            kid += 1
    if reader.sha256 != sha256:
        raise RestoreError(f"{path} changed while it was being restored (sha256 {reader.sha256}, verified {sha256})")
    counts.append(kid - 1)
    # Not `kept` (no change-log rows at R): the 24-byte state row every binary reads, whatever
    # level the restored cluster will run at; a watch from R is refused COMPACTED (first R + 1),
    # never served a partial R (the backup holds no deletes at R).
    yield TAG_REV_STATE, b"", mvcc.RevState(revision, revision, kid).encode()
    rows: dict[bytes, bytes] = {}
    attached: dict[int, int] = {}
    """lease id -> how many of its keys are attached here: its count row, which a LEASE_PUT's
    limit reads (`leases.count_row`)."""
    for le in reader.leases:
        if group and leases.home_group(le.id) == group:
            rows[leases.record_key(le.id)] = leases.Record(le.ttl_s, le.remaining_ms, 1).encode()
        if leases.home_group(le.id) not in homes:
            continue  # the lease is not restored: its keys come back unattached
        for key in le.keys:
            if key_hash(key) in ranges:
                owner = leases.owner_key(key)
                if owner in rows:
                    raise RestoreError(f"key {key[:64]!r} is attached to two leases in the backup "
                                       f"({int.from_bytes(rows[owner], 'big'):x} and {le.id:x})")
                rows[leases.attach_key(le.id, key)] = key
                rows[owner] = leases.owner_row(le.id)
                attached[le.id] = attached.get(le.id, 0) + 1
    for lid, n in attached.items():
        rows[leases.count_key(lid)] = leases.count_row(n)
    for row in sorted(rows):
        yield TAG_LEASES, row, rows[row]


def restored_auth(auth: bytes, file_sha256: str) -> bytes:
    """The backup's auth state with a new token key, derived from the old one and the file's hash
    (the same on every member restored from the file; secret as the old one is): tokens the old
    cluster issued are not valid on the new one."""
    try:
        st = AuthState.decode(auth)
    except AuthError as err:
        raise RestoreError(f"the backup's auth state does not decode: {err}") from None
    if not st.token_key:
        return auth
    key = hashlib.sha256(b"kvstore restore\x00" + st.token_key + bytes.fromhex(file_sha256)).digest()
    return replace(st, token_key=key[: len(st.token_key)]).encode()


def _check_target(data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir():
            raise RestoreError(f"{data_dir} exists and is not a directory")
        if any(data_dir.iterdir()):
            raise RestoreError(f"{data_dir} is not empty: restore creates a new member's data directory")


def restore(
    path: Path,
    data_dir: Path,
    node_id: int,
    peers: Mapping[int, str],
    *,
    groups: int | None = None,
    replication: int | None = None,
    vnodes: int | None = None,
) -> RestoreResult:
    """Create `data_dir` for member `node_id` of the new cluster `peers` from the backup at `path`.
    Defaults for groups, replication and vnodes: the source cluster's (from the file).
    Raises RestoreError (or BackupFormatError, a damaged file) before writing anything."""
    path, data_dir = Path(path), Path(data_dir)
    if node_id not in peers:
        raise RestoreError(f"node {node_id} is not in --peers ({sorted(peers)})")
    _check_target(data_dir)
    with open(path, "rb") as f:
        summary = verify(f)
    info = summary.info
    voters = tuple(sorted(peers))
    try:
        smap = ShardMap.initial(
            voters, groups or info.groups, replication or info.replication, vnodes or info.vnodes, dict(peers)
        )
    except ShardMapError as err:
        raise RestoreError(str(err)) from None
    parent = data_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restore-", dir=parent))
    restored: dict[int, int] = {}
    homes = frozenset(smap.data_groups())
    try:
        with LmdbNodeStore(tmp / "db", map_size=1 << 36, state_sync="checkpoint") as store:
            for gid in smap.groups_of_node(node_id):
                p = smap.groups[gid]
                if node_id not in p.bootstrap:
                    continue
                conf = ConfState(tuple(sorted(p.bootstrap)))
                meta = SnapshotMeta(SNAPSHOT_INDEX, SNAPSHOT_TERM, conf)
                counts: list[int] = []
                records = group_records(path, smap.bootstrap_ranges(gid), info.revision, counts, summary.sha256, gid,
                                        homes)
                snap = store.receive_snapshot(gid, encode_snapshot(gid, meta, records, CHUNK))
                store.persist([GroupWrite(gid, [], HardState(SNAPSHOT_TERM, 0, SNAPSHOT_INDEX), meta, snap)])
                restored[gid] = counts[0]
            boot = [encode_close(info.revision), encode_put(SHARD_MAP_KEY, smap.encode())]
            if summary.auth:
                boot.append(encode_put(AUTH_KEY, restored_auth(summary.auth, summary.sha256)))
            store.bootstrap(META_GROUP, ConfState(voters), boot)
        if data_dir.exists():
            data_dir.rmdir()  # empty (checked above)
        os.replace(tmp, data_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    fsync_dir(parent)
    return RestoreResult(summary, smap, restored)
