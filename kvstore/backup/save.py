"""`kvctl snapshot save`: write the whole keyspace of a running cluster at ONE revision to a file.

How the revision is chosen: a linearizable scan (of one key) through the client library opens
every data group's part at a read point and settles on R = the highest revision a group served
its part at (`kvstore/client/scans.py`; docs/REVISIONS.md, "Reads at a revision"); every write
acknowledged before the save started is at or below it. Then every key is read by a scan AT R,
which is exact in every group (a group whose applied last revision is below R is closed at R
through its log first, so it can never again write at or below R). So the file holds exactly
the writes with revision <= R in every group, whatever writes run meanwhile; the writer checks
every key's mod_revision <= R.

Also saved: the auth state (users with their password hashes, roles, whether auth is on: the
metadata group's value as the serving node applied it, `Auth.Status` with `export_state`; needs
the admin permission) and the source cluster's data groups, replication and virtual nodes (the
defaults of `kvstore restore`).

Bounded memory: keys stream from the scan (a chunk per group at a time) into the file.
Atomic: the file is written under a temporary name in the target's directory, fsynced, renamed
over the target and the directory fsynced; a failure leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from kvstore.backup.format import BackupInfo, BackupKey, BackupLease, BackupSummary, BackupWriter
from kvstore.client import Client
from kvstore.errors import InvalidArgument, PermissionDenied
from kvstore.shard.shardmap import DEFAULT_REPLICATION, DEFAULT_VNODES, ShardMap
from kvstore.storage.fsutil import fsync_dir
from kvstore.v1 import auth_pb2

Progress = Callable[[int, int], None]
"""Told (keys written, bytes written) as the save proceeds."""


class SavedKey(Protocol):
    """A key as a scan returns it (`client.types.KeyValue`, `kv_pb2.KeyValue`)."""

    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes: ...
    @property
    def create_revision(self) -> int: ...
    @property
    def mod_revision(self) -> int: ...
    @property
    def version(self) -> int: ...


class SavedLease(Protocol):
    """A lease as its home answers it (`client.types.LeaseInfo`, `kv_pb2.LeaseTimeToLiveResponse`)."""

    @property
    def ttl(self) -> int: ...
    @property
    def granted_ttl(self) -> int: ...
    @property
    def keys(self) -> Sequence[bytes]: ...


class Source(Protocol):
    """What a save reads, all of it as one caller: the client library (`ClientSource`, `kvctl
    snapshot save`) or a node serving etcd's Snapshot in-process as its caller
    (`server/etcd/backup.py`)."""

    def export_auth(self) -> bytes:
        """The encoded auth state; PermissionDenied (definite) unless the caller is an admin."""
        ...

    def shard_map(self) -> ShardMap | None: ...

    def choose_revision(self, timeout: float) -> int:
        """R (see `choose_revision`); InvalidArgument if nothing was ever written."""
        ...

    def scan_at(self, revision: int, timeout: float) -> Iterator[SavedKey]:
        """Every key at `revision`, in ascending key order."""
        ...

    def lease_list(self, timeout: float) -> list[int]: ...

    def lease_time_to_live(self, lease_id: int, timeout: float) -> SavedLease:
        """The lease with its keys (ttl -1: gone)."""
        ...


class ClientSource:
    """A `Source` over the client library."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def export_auth(self) -> bytes:
        return export_auth(self.client)

    def shard_map(self) -> ShardMap | None:
        return self.client.shard_map(refresh=True)

    def choose_revision(self, timeout: float) -> int:
        return choose_revision(self.client, timeout)

    def scan_at(self, revision: int, timeout: float) -> Iterator[SavedKey]:
        return iter(self.client.scan_kvs(revision=revision, timeout=timeout))

    def lease_list(self, timeout: float) -> list[int]:
        return self.client.lease_list(timeout=timeout)

    def lease_time_to_live(self, lease_id: int, timeout: float) -> SavedLease:
        return self.client.lease_time_to_live(lease_id, keys=True, timeout=timeout)


def check_exported(admin: bool, state: bytes) -> bytes:
    """The auth state an `Auth.Status` with `export_state` answered; PermissionDenied (definite)
    unless the caller is an admin."""
    if not admin or not state:
        raise PermissionDenied(
            "snapshot save needs the admin permission (the backup holds the users and roles)", indeterminate=False
        )
    return state


def export_auth(client: Client) -> bytes:
    """The encoded auth state; PermissionDenied (definite) unless the caller is an admin."""
    resp = client.auth_call("Status", auth_pb2.AuthStatusRequest(export_state=True))
    return check_exported(resp.admin, bytes(resp.state))


def choose_revision(client: Client, timeout: float) -> int:
    """R: the revision a linearizable scan of every group is served at (one key is enough: the
    scan opens every group's part at a read point and settles on their highest revision). Every
    write acknowledged before this call is at or below it. InvalidArgument if nothing was ever
    written (no revision to save at)."""
    for _ in client.scan_kvs(limit=1, consistency="linearizable", timeout=timeout):
        break
    if client.revision < 1:
        raise InvalidArgument("the cluster has no revision to save at yet (nothing was ever written)")
    return client.revision


def save(client: Client, path: Path, *, timeout: float, progress: Progress | None = None) -> BackupSummary:
    """Write the backup to `path` atomically; its summary. Raises the client's KVError on a failed
    scan (nothing is written then), OSError on a failed write."""
    return save_from(ClientSource(client), path, timeout=timeout, progress=progress)


def save_from(source: Source, path: Path, *, timeout: float, progress: Progress | None = None) -> BackupSummary:
    """`save` from any `Source`: the same file, the same guarantees."""
    auth = source.export_auth()
    smap = source.shard_map()
    groups, replication, vnodes = (1, DEFAULT_REPLICATION, DEFAULT_VNODES) if smap is None else (
        max(1, len(smap.groups)), smap.replication, smap.vnodes)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            revision = source.choose_revision(timeout)
            info = BackupInfo(revision, int(time.time() * 1000), groups, min(replication, 7), vnodes)
            w = BackupWriter(f, info, auth)
            for kv in source.scan_at(revision, timeout):
                w.add(BackupKey(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version))
                if progress is not None and w.keys % 1000 == 0:
                    progress(w.keys, w.size)
            attached: set[bytes] = set()
            for lid in source.lease_list(timeout):
                if progress is not None:  # a caller that stops the save is heard per lease too
                    progress(w.keys, w.size)
                # each lease's remaining TTL and keys as its home leader answers now (after the
                # scan: not at the keys' revision); one that is gone meanwhile is left out. A key
                # re-attached to another lease between two of these answers is named by both: it
                # is kept with the first (the file holds each key under one lease at most)
                lease = source.lease_time_to_live(lid, timeout)
                if lease.ttl >= 0:
                    keys = tuple(k for k in sorted(set(lease.keys)) if k not in attached)
                    attached.update(keys)
                    w.add_lease(BackupLease(lid, lease.granted_ttl, min(lease.ttl, lease.granted_ttl) * 1000, keys))
            digest = w.finish()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    if progress is not None:
        progress(w.keys, w.size)
    return BackupSummary(info, auth, w.keys, w.records, w.size, digest)
