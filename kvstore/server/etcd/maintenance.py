"""etcd's `Maintenance` service on a multi-group kvstore node. What each answer means here:

- `Status`: `version` the etcd API level (`ops.VERSION`); `dbSize` this node's LMDB file bytes,
  `dbSizeInUse` its live bytes; `leader`, `raftTerm`, `raftIndex` (commit) and
  `raftAppliedIndex` are the metadata group's as this node sees them (data groups have leaders
  and terms of their own: `kvctl status`); `errors` the raised alarms; `isLearner` whether this
  node is a learner of the metadata group.
- `Alarm`: kvstore's cluster-wide alarms (NOSPACE only). GET lists, DEACTIVATE disarms (a node
  still over quota raises NOSPACE again); ACTIVATE is refused (kvstore raises NOSPACE itself).
- `Hash` / `HashKV`: each data group this node hosts hashed as `kvctl check` does
  (`Admin.HashKV`, exact), folded into one uint32 (`ops.hash32`). Without a revision each group
  is hashed at its last revision here; with one, at that revision (a group whose last revision
  here is lower: at its last). Nodes hosting different groups answer different hashes.
- `Snapshot`: the consistent backup `kvctl snapshot save` writes (`kvstore/backup/save.py`),
  saved by this node in-process as the caller (`backup.CallerSource`: its token or client
  certificate; the admin permission, as `kvctl snapshot save`) into its data directory and
  streamed, then etcd's envelope (`backup/format.etcd_envelope`: padding and a SHA-256, which
  `etcdctl snapshot save` checks); `kvstore restore` and `kvctl snapshot status` read the saved
  file, `etcdctl snapshot restore` cannot.
- `MoveLeader`: every data group `targetID` is a voter of hands it leadership (`Admin.TransferLeader`),
  then the metadata group.
- `Defragment`: a no-op success (LMDB reuses freed pages)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from kvstore.backup.format import etcd_envelope
from kvstore.backup.save import save_from
from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.security.identity import identity_of_call
from kvstore.shard.shardmap import META_GROUP
from kvstore.v1 import admin_pb2

from .backup import CallerSource
from .base import EtcdNode, fail
from .convert import EtcdRequestError, invalid
from .kv import EtcdKV
from .ops import BAD_TRANSFEREE, VERSION, etcd_alarms, hash32, kvstore_alarm
from .status import checked

CHUNK = 64 * 1024
"""Bytes per SnapshotResponse."""


class EtcdMaintenance(rpc_pb2_grpc.MaintenanceServicer):
    def __init__(self, node: EtcdNode, admin: Any, auth: Any, kv: EtcdKV, timeout: float) -> None:
        self.n = node
        self.admin = admin
        self.auth = auth
        self.kv = kv
        self.timeout = timeout

    def _may_list_alarms(self) -> bool:
        """Whether the caller may see the raised alarms: kvstore's AlarmList is ADMIN, and the
        servicer called in-process does not pass through the guard's rule, so it is checked here
        (auth off: anyone)."""
        guard = self.n.requests.guard
        return guard is None or not guard.enabled() or guard.grants(identity_of_call()).admin

    async def Status(self, request: rpc_pb2.StatusRequest, context: grpc.aio.ServicerContext
                     ) -> rpc_pb2.StatusResponse:
        try:
            host = self.n.host
            store: Any = host.store  # the node's LMDB store (`storage/store.py`): sizes are its own
            usage = store.disk_usage()
            resp = rpc_pb2.StatusResponse(header=self.n.header(0, META_GROUP), version=VERSION,
                                          dbSize=int(usage.get("file_bytes", 0)), dbSizeInUse=int(store.live_bytes()))
            g = host.groups.get(META_GROUP)
            if g is not None:
                st: dict[str, Any] = g.core.status()
                resp.leader, resp.raftTerm = int(st["leader"]), int(st["term"])
                resp.raftIndex, resp.raftAppliedIndex = int(st["commit"]), int(st["applied"])
                resp.isLearner = self.n.member_id in set(g.core.conf.learners)
            if self._may_list_alarms():
                alarms = checked(await self.admin.AlarmList(admin_pb2.AlarmListRequest(), context), is_write=False)
                resp.errors.extend(f"memberID:{a.memberID} alarm:NOSPACE " for a in etcd_alarms(alarms.alarms))
            return resp
        except Exception as err:
            await fail(err, context, "Status")

    async def Alarm(self, request: rpc_pb2.AlarmRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.AlarmResponse:
        try:
            kind = kvstore_alarm(request.alarm)
            if request.action == rpc_pb2.AlarmRequest.GET:
                resp = checked(await self.admin.AlarmList(admin_pb2.AlarmListRequest(), context), is_write=False)
            elif request.action == rpc_pb2.AlarmRequest.DEACTIVATE:
                if kind is None:  # CORRUPT: never raised here, nothing to disarm
                    resp = checked(await self.admin.AlarmList(admin_pb2.AlarmListRequest(), context), is_write=False)
                else:
                    resp = checked(await self.admin.AlarmDisarm(
                        admin_pb2.AlarmDisarmRequest(node_id=request.memberID, type=kind), context), is_write=True)  # type: ignore[arg-type]
            elif request.action == rpc_pb2.AlarmRequest.ACTIVATE:
                raise EtcdRequestError("FAILED_PRECONDITION",
                                       "kvstore: alarms are raised by the nodes themselves (NOSPACE past --quota-bytes)")
            else:
                raise invalid(f"etcdserver: unknown alarm action {request.action}")
            return rpc_pb2.AlarmResponse(header=self.n.header(0, META_GROUP), alarms=etcd_alarms(resp.alarms))
        except Exception as err:
            await fail(err, context, "Alarm")

    async def Defragment(self, request: rpc_pb2.DefragmentRequest, context: grpc.aio.ServicerContext
                         ) -> rpc_pb2.DefragmentResponse:
        return rpc_pb2.DefragmentResponse(header=self.n.header(0))

    async def _hash(self, revision: int, context: grpc.aio.ServicerContext) -> tuple[int, int, int]:
        """(hash32, highest compact revision, revision served) of the data groups hosted here;
        the revision served is the highest one a group was hashed at (0 if none is hosted)."""
        if revision < 0:
            raise invalid(f"etcdserver: revision {revision} is negative")
        m = self.n.shard_map()
        parts: list[tuple[int, bytes]] = []
        compact = served = 0
        for gid in m.data_groups():
            if gid not in self.n.host.groups:
                continue
            last = self.n.host.store.revisions.rev_state(gid).last
            at = last if revision == 0 else min(revision, last)
            r = checked(await self.admin.HashKV(admin_pb2.HashKVRequest(group=gid, revision=at, exact=True), context),
                        is_write=False)
            parts.append((gid, bytes(r.hash)))
            compact = max(compact, r.compact_revision)
            served = max(served, at)
        return hash32(parts), compact, served

    async def Hash(self, request: rpc_pb2.HashRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.HashResponse:
        try:
            h, _, served = await self._hash(0, context)
            return rpc_pb2.HashResponse(header=self.n.header(served), hash=h)
        except Exception as err:
            await fail(err, context, "Hash")

    async def HashKV(self, request: rpc_pb2.HashKVRequest, context: grpc.aio.ServicerContext
                     ) -> rpc_pb2.HashKVResponse:
        """The header's revision is the revision the hash was taken at (the highest of the
        groups'), never the one asked for: a group whose last revision here is lower is hashed at
        its last, and a revision beyond every group's is served at theirs."""
        try:
            h, compact, served = await self._hash(request.revision, context)
            return rpc_pb2.HashKVResponse(header=self.n.header(served), hash=h, compact_revision=compact)
        except Exception as err:
            await fail(err, context, "HashKV")

    async def MoveLeader(self, request: rpc_pb2.MoveLeaderRequest, context: grpc.aio.ServicerContext
                         ) -> rpc_pb2.MoveLeaderResponse:
        try:
            g = self.n.host.groups.get(META_GROUP)
            voters = set(g.core.conf.voters) if g is not None else set()
            if request.targetID == 0 or (voters and request.targetID not in voters):
                raise EtcdRequestError("FAILED_PRECONDITION", BAD_TRANSFEREE)
            m = self.n.shard_map()
            # the data groups the target votes in (others cannot move to it) and the metadata
            # group, whose leader Status reports: one audited Admin.TransferLeader
            hosting = [gid for gid in m.data_groups() if request.targetID in m.groups[gid].voters]
            checked(await self.admin.TransferLeader(
                admin_pb2.TransferLeaderRequest(to=request.targetID, groups=[*hosting, META_GROUP]), context),
                is_write=True)
            return rpc_pb2.MoveLeaderResponse(header=self.n.header(0, META_GROUP))
        except Exception as err:
            await fail(err, context, "MoveLeader")

    async def Snapshot(self, request: rpc_pb2.SnapshotRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[rpc_pb2.SnapshotResponse]:
        """The backup file, CHUNK bytes a message; `remaining_bytes` counts what follows each.
        The file is written under the node's data directory (`SNAPSHOT_PREFIX`) and removed when
        the call ends, however it ends: a call that ends while the save runs (the client went
        away) stops the save at its next progress report and waits for its thread to finish
        before removing the file, so a save finishing late cannot leave it behind."""
        try:
            source = CallerSource(self.n, self.kv, self.auth, context, asyncio.get_running_loop(), self.timeout)
            source.check_reach()
            directory = Path(self.n.requests.cfg.data_dir)
            fd, name = tempfile.mkstemp(prefix=SNAPSHOT_PREFIX, suffix=".kvbackup", dir=directory)
            os.close(fd)
            path = Path(name)
            stop = threading.Event()
            job: asyncio.Future[None] | None = None
            try:
                job = asyncio.ensure_future(asyncio.to_thread(_save, source, path, self.timeout, stop))
                await asyncio.shield(job)
                size = path.stat().st_size
                total = size + len(etcd_envelope(size, hashlib.sha256()))
                hashed = hashlib.sha256()
                sent = 0
                with path.open("rb") as f:
                    while True:
                        blob = f.read(CHUNK)
                        if not blob:
                            if sent != size:
                                raise OSError(f"the backup file changed size while it was sent ({sent} != {size})")
                            blob = etcd_envelope(size, hashed)
                        else:
                            hashed.update(blob)
                        sent += len(blob)
                        yield rpc_pb2.SnapshotResponse(header=self.n.header(0), remaining_bytes=total - sent, blob=blob)
                        if sent == total:
                            break
            finally:
                stop.set()
                if job is not None:
                    await _settled(job)
                with contextlib.suppress(OSError):
                    path.unlink()
        except Exception as err:
            await fail(err, context, "Snapshot")


SNAPSHOT_PREFIX = ".etcd-snapshot-"
"""Name prefix of the backup file a `Maintenance.Snapshot` call writes in the node's data
directory (removed when the call ends, and at node start: `remove_snapshot_leftovers`)."""

SNAPSHOT_LEFTOVERS = (f"{SNAPSHOT_PREFIX}*", f".{SNAPSHOT_PREFIX}*.part")
"""What a node that stopped mid-Snapshot (a crash) leaves in its data directory: the call's
backup file and `save_from`'s partial file beside it (`.<the backup's name>.<random>.part`)."""


def remove_snapshot_leftovers(directory: Path) -> list[Path]:
    """Remove the files of Snapshot calls a previous run of the node left in `directory` (no
    call of this run exists yet: called where the node opens its data directory, before it
    serves); the paths removed. A file that cannot be removed is left (the node still starts)."""
    gone: list[Path] = []
    for pattern in SNAPSHOT_LEFTOVERS:
        for path in sorted(directory.glob(pattern)):
            if path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()
                    gone.append(path)
    return gone


class SaveStopped(Exception):
    """The call a backup was saved for ended: the save stops (its partial file removed)."""


async def _settled(job: asyncio.Future[None]) -> None:
    """Wait until `job` (a save's thread, which cannot be interrupted) has finished, through
    cancellations of the waiting task (re-raised once it has); its outcome is dropped."""
    cancelled = False
    while not job.done():
        try:
            await asyncio.wait({job})
        except asyncio.CancelledError:
            cancelled = True
    if not job.cancelled():
        job.exception()  # retrieved: a stopped or failed save is the call's end, already reported
    if cancelled:
        raise asyncio.CancelledError


def _save(source: CallerSource, path: Path, timeout: float, stop: threading.Event) -> None:
    """`kvctl snapshot save`'s save (`backup/save.py`) from `source`, in a worker thread (the
    writer is synchronous; its reads run on the loop as the caller). Raises SaveStopped at a
    progress report (every 1000 keys, and before each lease) once `stop` is set (the save then
    removes its partial file)."""
    def progress(_keys: int, _size: int) -> None:
        if stop.is_set():
            raise SaveStopped("the Snapshot call ended")

    save_from(source, path, timeout=timeout, progress=progress)
