"""Inbound Raft traffic: the `Raft` gRPC service.

A batch from a node of another cluster (cluster id mismatch) or addressed to another node id is
refused with FAILED_PRECONDITION and logged; malformed messages are dropped and logged. Nothing
from a peer is trusted beyond what the Raft core itself checks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from kvstore.raft import Message, MessageType
from kvstore.storage.snapfile import write_frames
from kvstore.v1 import raft_pb2, raft_pb2_grpc

from .codec import from_proto

log = logging.getLogger("kvstore.transport")


class RaftService(raft_pb2_grpc.RaftServicer):
    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        deliver: Callable[[Message], None],
        snapshot_dir: Path,
        on_heard: Callable[[int], None] | None = None,
    ) -> None:
        self.on_heard = on_heard
        """Called with the sender of every accepted batch (node-level liveness)."""
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.deliver = deliver
        self.snapshot_dir = snapshot_dir
        self.received_batches = 0
        self.received_messages = 0
        self.rejected = 0

    async def _check(self, cluster_id: str, frm: int, to: int, context: grpc.aio.ServicerContext) -> None:
        if cluster_id != self.cluster_id:
            self.rejected += 1
            log.error(
                "rejected traffic from node %d of cluster %r (this is cluster %r)", frm, cluster_id, self.cluster_id
            )
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cluster id mismatch: this is {self.cluster_id!r}")
        if to != self.node_id:
            self.rejected += 1
            log.error("rejected traffic for node %d from node %d: this is node %d", to, frm, self.node_id)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this is node {self.node_id}, not {to}")

    async def Send(
        self, request_iterator: AsyncIterator[raft_pb2.RaftBatch], context: grpc.aio.ServicerContext
    ) -> raft_pb2.RaftDone:
        checked = False
        async for batch in request_iterator:
            frm = getattr(batch, "from")
            if not checked:
                await self._check(batch.cluster_id, frm, batch.to, context)
                checked = True
            self.received_batches += 1
            if self.on_heard is not None:
                self.on_heard(frm)
            for pm in batch.messages:
                try:
                    m = from_proto(pm)
                except ValueError as err:
                    log.warning("dropping malformed message from node %d: %s", frm, err)
                    continue
                if m.frm != frm or m.to != self.node_id or m.type == MessageType.SNAP:
                    log.warning("dropping message with forged addressing from node %d", frm)
                    continue
                self.received_messages += 1
                self.deliver(m)
        return raft_pb2.RaftDone()

    async def SendSnapshot(
        self, request_iterator: AsyncIterator[raft_pb2.SnapshotChunk], context: grpc.aio.ServicerContext
    ) -> raft_pb2.SnapshotDone:
        head: raft_pb2.RaftMessage | None = None
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="recv-", suffix=".snap", dir=self.snapshot_dir)
        path = Path(name)
        complete = False
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request_iterator:
                    if head is None:
                        await self._check(chunk.cluster_id, getattr(chunk, "from"), chunk.to, context)
                        if not chunk.HasField("message"):
                            return raft_pb2.SnapshotDone(installed=False, error="first chunk carries no message")
                        head = chunk.message
                    if chunk.data:
                        write_frames(f, [chunk.data])
                    if chunk.last:
                        complete = True
                        break
                f.flush()
                os.fsync(f.fileno())
            if head is None or not complete:
                return raft_pb2.SnapshotDone(installed=False, error="snapshot stream ended early")
            m = from_proto(head, snapshot_data=str(path).encode())
            if m.type != MessageType.SNAP or m.snapshot is None:
                return raft_pb2.SnapshotDone(installed=False, error="first chunk is not a snapshot message")
            self.deliver(m)
            path = Path()  # handed over: the store deletes it once installed (or it is superseded)
            return raft_pb2.SnapshotDone(installed=True)
        finally:
            if path != Path():
                with contextlib.suppress(OSError):
                    path.unlink()
