"""Outbound Raft traffic: one long-lived client stream per peer, batching all groups' messages.

`PeerSender.send(messages)` only enqueues: it never blocks the Ready loop. A task per peer drains
the queue, coalescing everything queued since its last write into one `RaftBatch`, and keeps one
`Raft.Send` stream open, reconnecting with exponential backoff when it breaks. Messages queued
while a peer is unreachable are dropped beyond a bound (Raft retransmits what matters) and the host
is told the peer is unreachable so its progress falls back to probing.

Snapshots go over a separate `Raft.SendSnapshot` call per snapshot, streamed in bounded chunks
from one consistent read of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import grpc

from kvstore import hoptrace
from kvstore.node.store import NodeStore
from kvstore.raft import Message, Snapshot
from kvstore.v1 import raft_pb2, raft_pb2_grpc

from .codec import to_proto

if TYPE_CHECKING:
    from kvstore.security.tls import NodeTls

log = logging.getLogger("kvstore.transport")

MAX_QUEUED = 10_000
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Server side: accept the clients' keepalive pings (every 10 s, also on idle connections)
    # instead of answering GOAWAY "too_many_pings".
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
DIAL_OPTIONS = [
    *CHANNEL_OPTIONS,
    # A channel that failed to connect fails every call at once until its next attempt, and
    # gRPC's default backoff between attempts grows to 120 s: a node down for 20 s was out of
    # its peers' reach for another ~5 s after it restarted, one down for a minute for up to
    # ~40 s (its leaders could not send it appends, the etcd API's forwarded calls failed
    # UNAVAILABLE). Between cluster members the attempts stay at most 1 s apart.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""The options of every channel a node dials to another member (raft streams, snapshots,
forwarded and remote calls); `CHANNEL_OPTIONS` are also its server's."""


class Peer:
    """The outbound connection to one peer node."""

    def __init__(
        self, transport: Transport, node_id: int, address: str,
    ) -> None:
        self.t = transport
        self.id = node_id
        self.address = address
        self.queue: list[raft_pb2.RaftMessage] = []
        self.wake = asyncio.Event()
        self.channel: grpc.aio.Channel | None = None
        self.channel_generation = 0
        """The TLS generation (`NodeTls.generation`) `channel` was dialled with."""
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        self.dropped = 0
        self.sent_batches = 0
        self.sent_messages = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"peer-{self.id}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.channel is not None:
            await self.channel.close()

    def enqueue(self, m: raft_pb2.RaftMessage) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        self.queue.append(m)
        self.wake.set()

    def ping(self) -> None:
        """Send a batch now even if nothing is queued: node-level liveness, one small batch per
        peer per tick however many groups (idle groups stop heartbeating; see Host.suspect)."""
        self.wake.set()

    def _channel(self) -> grpc.aio.Channel:
        """The channel to the peer; after a certificate reload, a new one dialled with the new
        credentials (the old one is closed: its stream has ended, see `_batches`)."""
        tls = self.t.tls
        if self.channel is not None and tls is not None and self.channel_generation != tls.generation:
            old, self.channel = self.channel, None
            asyncio.get_running_loop().create_task(old.close(grace=5.0))
        if self.channel is None:
            self.channel = self.t.dial(self.address)
            self.channel_generation = tls.generation if tls is not None else 0
        return self.channel

    def _stale(self) -> bool:
        tls = self.t.tls
        return tls is not None and self.channel_generation != tls.generation

    async def _batches(self) -> AsyncIterator[raft_pb2.RaftBatch]:
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
            self.wake.clear()
            if self._stale():
                return  # certificates reloaded: end this stream cleanly, `_run` redials
            msgs, self.queue = self.queue, []
            self.sent_batches += 1
            self.sent_messages += len(msgs)
            batch = raft_pb2.RaftBatch(cluster_id=self.t.cluster_id, to=self.id, messages=msgs)
            setattr(batch, "from", self.t.node_id)
            if hoptrace.ON:
                hoptrace.mark("t.out")
            yield batch

    async def _run(self) -> None:
        backoff = 0.05
        rng = random.Random()
        while True:
            stub = raft_pb2_grpc.RaftStub(self._channel())
            try:
                call = stub.Send(self._batches())
                self.connected = True
                await call
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if self.connected:
                    log.info("stream to node %d at %s broke: %s", self.id, self.address, err.code().name)
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.error("node %d at %s refused us: %s", self.id, self.address, err.details())
            except Exception:
                log.exception("stream to node %d failed", self.id)
            self.connected = False
            self.queue.clear()
            self.t.on_unreachable(self.id)
            await asyncio.sleep(backoff * (0.5 + rng.random()))
            backoff = min(backoff * 2, 1.0)


class Transport:
    """All outbound peers of a node, plus snapshot streaming."""

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        store: NodeStore,
        on_unreachable: Callable[[int], None],
        on_snapshot_done: Callable[[int, int, bool], None],
        tls: NodeTls | None = None,
    ) -> None:
        self.tls = tls
        """None: plaintext channels; else every channel presents the node certificate."""
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.store = store
        self.on_unreachable = on_unreachable
        self.on_snapshot_done = on_snapshot_done
        self.peers: dict[int, Peer] = {}
        self.addresses: dict[int, str] = {}
        self._snapshots: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.unknown_dropped = 0

    def set_addresses(self, addresses: dict[int, str]) -> None:
        """Bring the peer set in line with the membership (id -> address)."""
        for nid, addr in sorted(addresses.items()):
            if nid == self.node_id:
                continue
            p = self.peers.get(nid)
            if p is not None and p.address == addr:
                continue
            if p is not None:
                asyncio.get_running_loop().create_task(p.stop())
            p = self.peers[nid] = Peer(self, nid, addr)
            p.start()
        for nid in list(self.peers):
            if nid not in addresses:
                asyncio.get_running_loop().create_task(self.peers.pop(nid).stop())
        self.addresses = dict(addresses)

    @property
    def peer_ids(self) -> list[int]:
        return list(self.peers)

    def dial(self, address: str) -> grpc.aio.Channel:
        """A channel to a peer: TLS with this node's certificate when the node has one."""
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=DIAL_OPTIONS)
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=DIAL_OPTIONS)

    def certificates_reloaded(self) -> None:
        """Each peer ends its stream after its next batch and redials with the new credentials
        (no batch is lost: the queue is kept; a snapshot in flight finishes on its channel)."""
        for p in self.peers.values():
            p.ping()

    def ping(self) -> None:
        for p in self.peers.values():
            p.ping()

    def send(self, messages: list[Message]) -> None:
        if hoptrace.ON:
            hoptrace.mark("t.send")
        for m in messages:
            p = self.peers.get(m.to)
            if p is None:
                self.unknown_dropped += 1
                continue
            p.enqueue(to_proto(m))

    def send_snapshot(self, m: Message) -> None:
        key = (m.group, m.to)
        if key in self._snapshots and not self._snapshots[key].done():
            return
        self._snapshots[key] = asyncio.get_running_loop().create_task(self._send_snapshot(m))

    async def _send_snapshot(self, m: Message) -> None:
        addr = self.addresses.get(m.to)
        ok = False
        try:
            if addr is None:
                raise RuntimeError(f"no address for node {m.to}")
            meta, chunks = self.store.snapshot_chunks(m.group)
            m.snapshot = Snapshot(meta, b"")
            head = to_proto(m)

            def chunk(data: bytes, first: bool, last: bool) -> raft_pb2.SnapshotChunk:
                c = raft_pb2.SnapshotChunk(cluster_id=self.cluster_id, to=m.to, data=data, last=last)
                setattr(c, "from", self.node_id)
                if first:
                    c.message.CopyFrom(head)
                return c

            async def stream() -> AsyncIterator[raft_pb2.SnapshotChunk]:
                first = True
                for data in chunks:
                    yield chunk(data, first, False)
                    first = False
                    await asyncio.sleep(0)
                yield chunk(b"", first, True)

            ch = self.peers[m.to]._channel() if m.to in self.peers else self.dial(addr)
            stub = raft_pb2_grpc.RaftStub(ch)
            log.info("sending snapshot of group %d at index %d to node %d", m.group, meta.index, m.to)
            resp = await stub.SendSnapshot(stream(), timeout=600)
            ok = resp.installed
            if not ok:
                log.warning("node %d rejected snapshot of group %d: %s", m.to, m.group, resp.error)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning("snapshot of group %d to node %d failed: %s", m.group, m.to, err)
        finally:
            self.on_snapshot_done(m.group, m.to, not ok)

    async def close(self) -> None:
        for t in self._snapshots.values():
            t.cancel()
        for p in list(self.peers.values()):
            await p.stop()
        self.peers.clear()
