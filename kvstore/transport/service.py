"""Inbound Raft traffic: the `Raft` gRPC service.

What arrives here is hostile until shown otherwise:
- with TLS, the caller's certificate (verified by the handshake against the cluster's CA) must
  be a node certificate naming the node id the stream claims in `from` (`verify`, see
  `kvstore.security.tls.PeerVerifier`), else PERMISSION_DENIED before anything is delivered;
- a batch or snapshot from a node of another cluster (cluster id mismatch) or addressed to
  another node id is refused with FAILED_PRECONDITION; one from a node that is not a member of
  this cluster (`is_member`) with PERMISSION_DENIED. Membership is checked on every batch, so a
  node removed while its stream is open is cut off at its next batch;
- each message is decoded by the total `codec.from_proto` (malformed: dropped, counted); its
  sender and addressee must be those of its batch; the node then admits it or not
  (`kvstore.node.inbound`) before any core sees it;
- a received snapshot is checked whole (framing, every record, count, checksum, and a header
  naming the same group, index, term and configuration as its message) before it is delivered,
  so a damaged or forged snapshot never reaches the store's install transaction;
- a snapshot stream is bounded: at most `SnapshotLimits.per_sender` in flight from one node
  (more are refused at once, and the sender's Raft retries later), and the file stops growing
  (refused, file deleted) once the file system's free space would fall below
  `SnapshotLimits.reserve_bytes` (or a tenth of the file system, if smaller), so no member, however broken, can fill the disk the node's
  write-ahead log needs. The file's writes and its `fsync` run off the event loop.
Refusals are logged once per sender and reason per minute (`RefusalLog`), never per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import grpc

from kvstore import hoptrace
from kvstore.raft import Message, MessageType
from kvstore.storage.errors import SnapshotFormatError
from kvstore.storage.snapfile import SnapshotFile, write_frames
from kvstore.v1 import raft_pb2, raft_pb2_grpc

from .codec import MessageError, from_proto

if TYPE_CHECKING:
    from kvstore.node.inbound import RefusalLog

log = logging.getLogger("kvstore.transport")


@dataclass(frozen=True, slots=True)
class SnapshotLimits:
    """Bounds on receiving snapshots (per node)."""

    per_sender: int = 16
    """Snapshot streams in flight from one node (one per group it sends: a new member may take
    many groups at once)."""
    reserve_bytes: int = 256 << 20
    """Free space a received snapshot file must leave on its file system (at most a tenth of the
    file system's size: a small disk still takes snapshots)."""
    check_every: int = 4 << 20
    """Re-read the free space after this many bytes written."""


def _disk_usage(path: Path) -> tuple[int, int]:
    """(total, free) bytes of the file system holding `path`."""
    usage = shutil.disk_usage(path)
    return usage.total, usage.free


class RaftService(raft_pb2_grpc.RaftServicer):
    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        deliver: Callable[[Message], None],
        snapshot_dir: Path,
        on_heard: Callable[[int], None] | None = None,
        is_member: Callable[[int], bool] | None = None,
        on_connected: Callable[[int], None] | None = None,
        refusals: RefusalLog | None = None,
        verify: Callable[[grpc.aio.ServicerContext, int], str | None] | None = None,
        snapshot_limits: SnapshotLimits | None = None,
        disk_usage: Callable[[Path], tuple[int, int]] = _disk_usage,
    ) -> None:
        self.snapshot_limits = snapshot_limits or SnapshotLimits()
        self.disk_usage = disk_usage
        """(total, free) bytes of the file system of a path (injected: tests fill a disk without one)."""
        self._receiving: dict[int, int] = {}
        """Snapshot streams in flight per sender."""
        self.verify = verify
        """TLS: why the caller may not speak for a node id (None: it may). None: no TLS check."""
        self.on_heard = on_heard
        """Called with the sender of every accepted batch (node-level liveness)."""
        self.is_member = is_member
        self.on_connected = on_connected
        """Called with the sender when a new batch stream from it was accepted (it may have
        restarted; see `kvstore.node.host.Host.peer_connected`)."""
        """Is this node id a member of the cluster? (None: everyone is, for tests of the codec.)"""
        self.refusals = refusals
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.deliver = deliver
        self.snapshot_dir = snapshot_dir
        self.received_batches = 0
        self.received_messages = 0
        self.rejected = 0

    def _refuse(self, frm: int, reason: str, detail: str) -> None:
        self.rejected += 1
        if self.refusals is not None:
            self.refusals.refuse(frm, reason, detail)
        else:
            log.warning("refused traffic from node %d (%s): %s", frm, reason, detail)

    async def _check(self, cluster_id: str, frm: int, to: int, context: grpc.aio.ServicerContext) -> None:
        if self.verify is not None and (why := self.verify(context, frm)) is not None:
            self._refuse(frm, "identity", why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"not node {frm}: {why}")
        if cluster_id != self.cluster_id:
            self._refuse(frm, "cluster_id", f"cluster id mismatch: it is of cluster {cluster_id[:64]!r}, "
                         f"this is {self.cluster_id!r}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cluster id mismatch: this is {self.cluster_id!r}")
        if to != self.node_id:
            self._refuse(frm, "wrong_node", f"addressed to node {to}; this is node {self.node_id}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this is node {self.node_id}, not {to}")
        if self.is_member is not None and not self.is_member(frm):
            self._refuse(frm, "not_member", f"node {frm} is not a member of cluster {self.cluster_id!r}")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"node {frm} is not a member of cluster {self.cluster_id!r}"
            )

    async def Send(
        self, request_iterator: AsyncIterator[raft_pb2.RaftBatch], context: grpc.aio.ServicerContext
    ) -> raft_pb2.RaftDone:
        first: tuple[str, int, int] | None = None
        connected = False
        async for batch in request_iterator:
            if hoptrace.ON:
                hoptrace.mark("r.recv")
            frm = getattr(batch, "from")
            if first is None:
                first = (batch.cluster_id, frm, batch.to)
            elif (batch.cluster_id, frm, batch.to) != first:
                self._refuse(frm, "addressing", "a batch's cluster, sender or addressee changed mid-stream")
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "addressing changed mid-stream")
            await self._check(batch.cluster_id, frm, batch.to, context)
            if not connected:  # the first accepted batch of this stream
                connected = True
                if self.on_connected is not None:
                    self.on_connected(frm)
            self.received_batches += 1
            if self.on_heard is not None:
                self.on_heard(frm)
            for pm in batch.messages:
                try:
                    m = from_proto(pm)
                except MessageError as err:
                    self._refuse(frm, "malformed", str(err))
                    continue
                if m.frm != frm or m.to != self.node_id or m.type == MessageType.SNAP:
                    self._refuse(frm, "addressing", f"{m.type.name} from {m.frm} to {m.to} in a batch from {frm}")
                    continue
                self.received_messages += 1
                self.deliver(m)
        return raft_pb2.RaftDone()

    async def SendSnapshot(
        self, request_iterator: AsyncIterator[raft_pb2.SnapshotChunk], context: grpc.aio.ServicerContext
    ) -> raft_pb2.SnapshotDone:
        head: raft_pb2.RaftMessage | None = None
        sender = 0
        counted = False
        lim = self.snapshot_limits
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="recv-", suffix=".snap", dir=self.snapshot_dir)
        path = Path(name)
        complete = False
        written = 0
        checked_at = -lim.check_every  # check before the first write
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request_iterator:
                    if head is None:
                        sender = getattr(chunk, "from")
                        await self._check(chunk.cluster_id, sender, chunk.to, context)
                        if not chunk.HasField("message"):
                            return raft_pb2.SnapshotDone(installed=False, error="first chunk carries no message")
                        if self._receiving.get(sender, 0) >= lim.per_sender:
                            self._refuse(sender, "snapshot_limit", f"more than {lim.per_sender} snapshots in flight")
                            return raft_pb2.SnapshotDone(
                                installed=False, error=f"more than {lim.per_sender} snapshots in flight from node {sender}"
                            )
                        self._receiving[sender] = self._receiving.get(sender, 0) + 1
                        counted = True
                        head = chunk.message
                    if chunk.data:
                        if written + len(chunk.data) - checked_at >= lim.check_every:
                            total, free = await asyncio.to_thread(self.disk_usage, self.snapshot_dir)
                            checked_at = written
                            reserve = min(lim.reserve_bytes, total // 10)
                            if free - len(chunk.data) - lim.check_every < reserve:
                                self._refuse(sender, "snapshot_space", f"{free} bytes free after {written} received")
                                return raft_pb2.SnapshotDone(
                                    installed=False,
                                    error=f"refused: receiving it would leave under {reserve} bytes free "
                                    f"({free} free after {written} bytes of it)",
                                )
                        await asyncio.to_thread(write_frames, f, [chunk.data])
                        written += len(chunk.data)
                    if chunk.last:
                        complete = True
                        break
                if complete and head is not None:
                    await asyncio.to_thread(_flush_and_sync, f)
            if head is None or not complete:
                return raft_pb2.SnapshotDone(installed=False, error="snapshot stream ended early")
            frm = sender
            try:
                m = from_proto(head, snapshot_data=str(path).encode())
                if m.type != MessageType.SNAP or m.snapshot is None:
                    raise MessageError("first chunk is not a snapshot message")
                if m.to != self.node_id or m.frm != frm:
                    raise MessageError(f"snapshot message from {m.frm} to {m.to} in a stream from {frm}")
                await asyncio.to_thread(_verify_snapshot_file, path, m)  # reads the whole file
            except (MessageError, SnapshotFormatError) as err:
                self._refuse(frm, "snapshot", str(err))
                return raft_pb2.SnapshotDone(installed=False, error=f"refused: {err}")
            self.deliver(m)
            path = Path()  # handed over: the store deletes it once installed (or it is superseded)
            return raft_pb2.SnapshotDone(installed=True)
        finally:
            if counted:
                left = self._receiving[sender] - 1
                if left:
                    self._receiving[sender] = left
                else:
                    del self._receiving[sender]
            if path != Path():
                with contextlib.suppress(OSError):
                    path.unlink()


def _flush_and_sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _verify_snapshot_file(path: Path, m: Message) -> None:
    """Read the whole received file (bounded memory) and check it is the snapshot `m` announces:
    raises SnapshotFormatError otherwise."""
    assert m.snapshot is not None
    meta = m.snapshot.meta
    with SnapshotFile(path) as sf:
        h = sf.header
        if h.group != m.group or (h.meta.index, h.meta.term) != (meta.index, meta.term) or (
            sorted(h.meta.conf_state.voters), sorted(h.meta.conf_state.learners)
        ) != (list(meta.conf_state.voters), list(meta.conf_state.learners)):
            raise SnapshotFormatError(
                f"snapshot file of group {h.group} at {h.meta.index}/{h.meta.term} does not match its message "
                f"(group {m.group} at {meta.index}/{meta.term})"
            )
        for _ in sf.records():
            pass
