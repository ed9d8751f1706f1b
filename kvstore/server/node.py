"""One kvstore node process: wires storage, host, transport and gRPC services on asyncio.

Startup: open the store and every group on it; a new cluster bootstraps the metadata group
(group 0, every voter, holding the initial shard map) and this node's data groups, all computed
identically on every node from the flags. Then the gRPC server (Raft, KV, Admin, Shard and the
standard grpc.health.v1 service), the tick timer, the Ready loop and the shard coordinator.

After every Ready cycle the node re-reads the shard map if the metadata group applied something,
and reconciles: it opens the data groups the map places on it (bootstrapping those it is an
initial member of), and destroys, leaving a tombstone, the groups the map dropped.
Shutdown (SIGTERM / SIGINT): health goes NOT_SERVING, the server stops taking requests and gives
in-flight ones a grace period, the loops stop, the store closes. Nothing durable depends on a
graceful stop: kill -9 at any moment loses no acknowledged write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from kvstore.node.store import NodeStore
from kvstore.raft import ConfState, Message, Role
from kvstore.shard.rebalance import Coordinator
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap
from kvstore.storage import commands
from kvstore.storage.shardcmd import ShardOp, encode_shard_command
from kvstore.storage.store import LmdbNodeStore
from kvstore.transport.peer import CHANNEL_OPTIONS, Transport
from kvstore.transport.service import RaftService
from kvstore.v1 import admin_pb2, kv_pb2, raft_pb2, shard_pb2

from . import wire
from .admin_service import AdminService
from .config import NodeConfig
from .host import Cycle, Host
from .inbound import Inbound, RefusalLog
from .kv_service import KVService
from .learner import register_learner
from .metrics import Metrics
from .reads import ReadMetrics, ReplicaReads
from .shards import GroupCaller, NodeCluster, ShardService, ShardTracker

log = logging.getLogger("kvstore.node")


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.metrics = Metrics()
        self.store: NodeStore | None = None
        self.host: Host | None = None
        self.reads: ReplicaReads | None = None
        self.transport: Transport | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.HealthServicer()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._members_seen: dict[int, str] = {}
        self.port = 0
        self.rpc_methods: list[str] = []
        """Every gRPC method the node serves (`/package.Service/Method`)."""
        self.tracker: ShardTracker | None = None
        self.caller: GroupCaller | None = None
        self.coordinator: Coordinator | None = None
        self._tombstones: set[int] = set()
        self._gauges_at = 0.0
        self._gauge_seen: dict[int, tuple[int, ...]] = {}
        self._last_heard: dict[int, float] = {}
        self._started_at = 0.0
        self.inbound: Inbound
        self.died = asyncio.Event()
        """Set when a loop the node needs ended (see `_task_ended`): the process must exit."""
        self.fatal: str | None = None
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """A loop the node cannot live without ended (they run until `stop` cancels them): log
        why, stop serving (health NOT_SERVING) and set `died`, so the process exits non-zero and
        a supervisor restarts it, instead of lingering as a node that answers nothing."""
        if self._stopping or task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.critical("node %d: task %s died; the node stops", self.cfg.id, task.get_name(),
                         exc_info=(type(err), err, err.__traceback__))
        else:
            log.critical("node %d: task %s ended unexpectedly; the node stops", self.cfg.id, task.get_name())
        self.fatal = f"task {task.get_name()} ended: {err!r}"
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("kvstore.v1.KV", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.died.set()

    async def start(self) -> None:
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        # A large map reserves address space only; it spares growing the map (which would
        # invalidate open read transactions such as streaming scans) in all but huge stores.
        self.store = store = LmdbNodeStore(cfg.data_dir / "db", sync=cfg.sync, map_size=1 << 36)
        members = dict(cfg.peers)
        members.update(store.members())
        host = self.host = Host(cfg.id, store, self._send, cfg.raft, random.Random(), members)
        self.transport = Transport(
            cfg.id, cfg.cluster_id, store, on_unreachable=host.report_unreachable,
            on_snapshot_done=self._snapshot_done,
        )
        host.on_snapshot_needed = self._send_snapshot
        self._tombstones = store.tombstones()
        existing = store.groups()
        if not cfg.join and META_GROUP not in existing:
            self._bootstrap_cluster()
        for gid in existing:
            host.open_group(gid, None)
        if META_GROUP not in host.groups:
            host.open_group(META_GROUP, None)  # joining: filled by the leader (log or snapshot)
        tracker = self.tracker = ShardTracker(store)
        refused = self.metrics.inbound_refused
        self.inbound = Inbound(
            cfg.id, host, lambda: tracker.map, self._tombstones,
            RefusalLog(time.monotonic, on_refused=lambda reason: refused.labels(reason).inc()),
        )
        caller = self.caller = GroupCaller(cfg.id, host, self.wake, tracker, cfg.request_timeout, cfg.cluster_id)
        self.coordinator = Coordinator(NodeCluster(host, tracker, caller))
        self._reconcile()
        self.reads = ReplicaReads(
            host, cfg.reads, metrics=ReadMetrics(self.metrics.registry), request_timeout=cfg.request_timeout
        )

        server = self.server = grpc.aio.server(options=CHANNEL_OPTIONS)
        # Every method of every service decodes its request totally (wire.py): malformed bytes
        # get INVALID_ARGUMENT, never UNKNOWN.
        self.rpc_methods = wire.add_services(server, [
            (RaftService(cfg.id, cfg.cluster_id, self._deliver, store.snapshot_dir, on_heard=self._heard,
                         is_member=self.inbound.is_member, refusals=self.inbound.refusals),
             raft_pb2.DESCRIPTOR.services_by_name["Raft"]),
            (KVService(cfg, host, self.wake, self.metrics, tracker, self.reads),
             kv_pb2.DESCRIPTOR.services_by_name["KV"]),
            (AdminService(cfg, host, self.wake, tracker, caller, self.coordinator, self.reads),
             admin_pb2.DESCRIPTOR.services_by_name["Admin"]),
            (ShardService(cfg.id, host, self.wake, tracker, caller, self.coordinator, cfg.request_timeout,
                          cluster_id=cfg.cluster_id, is_member=self.inbound.is_member,
                          refusals=self.inbound.refusals),
             shard_pb2.DESCRIPTOR.services_by_name["Shard"]),
            (self.health, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        ])
        self.port = server.add_insecure_port(cfg.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        await server.start()
        self._sync_members()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._ticker(), name="ticker"),
            loop.create_task(self._ready_loop(), name="ready-loop"),
            loop.create_task(self.coordinator.run(), name="shard-coordinator"),
        ]
        for t in self._tasks:
            t.add_done_callback(self._task_ended)
        if cfg.learner:
            self._tasks.append(loop.create_task(self._register_learner(), name="register-learner"))
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("kvstore.v1.KV", health_pb2.HealthCheckResponse.SERVING)
        log.info("node %d of cluster %r serving on %s", cfg.id, cfg.cluster_id, cfg.listen)

    # --- groups and the shard map ------------------------------------------------------------
    def _bootstrap_cluster(self) -> None:
        """A new cluster: the metadata group with the initial shard map, then this node's data
        groups. Every node computes the same logs from the same flags."""
        cfg = self.cfg
        assert self.host is not None
        voters = tuple(sorted(cfg.peers))
        smap = ShardMap.initial(voters, cfg.groups, cfg.replication, cfg.vnodes, dict(cfg.peers))
        log.info(
            "bootstrapping a new cluster: voters %s, %d data groups, replication %d",
            list(voters), cfg.groups, smap.replication,
        )
        self.host.open_group(META_GROUP, ConfState(voters), [commands.encode_put(SHARD_MAP_KEY, smap.encode())])

    def _reconcile(self) -> None:
        """Open the data groups the map places here; destroy the ones it dropped."""
        host, tracker = self.host, self.tracker
        assert host is not None and tracker is not None
        tracker.refresh()
        m = tracker.map
        if m is None:
            return
        for gid in m.groups_of_node(self.cfg.id):
            if gid in host.groups or gid in self._tombstones:
                continue
            p = m.groups[gid]
            if self.cfg.id in p.bootstrap:
                ranges = m.bootstrap_ranges(gid)
                log.info("creating data group %d (voters %s, %.1f%% of the keys)", gid, list(p.bootstrap),
                         100 * ranges.size() / 2**64)
                host.open_group(gid, ConfState(tuple(sorted(p.bootstrap))),
                                [encode_shard_command(ShardOp.SET, ranges)])
            else:
                host.open_group(gid, None)
        for gid in [g for g in host.groups if g != META_GROUP and g not in m.groups]:
            if gid < m.next_group:
                log.info("destroying data group %d: the shard map dropped it", gid)
                host.close_group(gid, destroy=True)
                self._tombstones.add(gid)
        host.preferred_leader = {g: p.voters[0] for g, p in m.groups.items() if p.voters}

    # --- wiring -----------------------------------------------------------------------------
    def _deliver(self, m: Message) -> None:
        assert self.host is not None
        self.metrics.messages_received.inc()
        if self.inbound.admit(m) and self.host.step(m):
            self.wake()

    def _send(self, msgs: list[Message]) -> None:
        assert self.transport is not None
        self.metrics.messages_sent.inc(len(msgs))
        self.transport.send(msgs)

    def _send_snapshot(self, m: Message) -> None:
        assert self.transport is not None
        self.transport.send_snapshot(m)

    def _snapshot_done(self, group: int, to: int, failed: bool) -> None:
        assert self.host is not None
        self.host.report_snapshot(group, to, failed)
        self.wake()

    def _sync_members(self) -> None:
        assert self.host is not None and self.transport is not None
        if self.host.members != self._members_seen:
            self._members_seen = dict(self.host.members)
            self.transport.set_addresses(self._members_seen)

    def _heard(self, node: int) -> None:
        self._last_heard[node] = time.monotonic()  # the event loop's clock

    def _liveness(self, now: float) -> None:
        """Node-level liveness, one small batch per peer per tick however many groups there are:
        ping every peer, and tell the host which peers have been silent for an election timeout
        (it wakes the quiesced groups they lead)."""
        assert self.host is not None and self.transport is not None
        self.transport.ping()
        timeout = self.cfg.raft.election_tick * self.cfg.raft.tick_ms / 1000
        silent = {
            n for n in self.transport.peers
            if now - self._last_heard.get(n, self._started_at) > timeout
        }
        if silent or self.host.suspected:
            self.host.suspect(silent)

    async def _ticker(self) -> None:
        assert self.host is not None
        loop = asyncio.get_running_loop()
        period = self.cfg.raft.tick_ms / 1000
        next_at = loop.time() + period
        self._started_at = loop.time()
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += period
            if loop.time() - next_at > 5 * period:
                next_at = loop.time() + period  # we were paused (SIGSTOP): do not tick in a burst
            self.host.tick()
            if self.reads is not None:
                self.reads.tick()
            self._liveness(loop.time())
            self.wake()

    async def _ready_loop(self) -> None:
        host = self.host
        assert host is not None
        m = self.metrics
        loop = asyncio.get_running_loop()

        def early(cycle: Cycle, results: list[list[Any]]) -> None:
            # Answer the writes being applied while the transaction is still being made durable
            # (see host.py: their outcome is decided; reads still wait for the applied index).
            loop.call_soon_threadsafe(host.answer_writes, cycle, results)

        with PersistThread(loop) as io:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while True:
                    cycle = host.begin_cycle()
                    if cycle is None:
                        break
                    stored = cycle.touches_storage()
                    if stored:
                        if host.awaits_writes(cycle):
                            cycle.on_applied = early
                        # The fsync runs off the event loop: requests and messages that arrive
                        # meanwhile are stepped into the cores and go out in the next cycle.
                        if cycle.sent_early:
                            # Let the peer streams write the appends first: the persist thread
                            # takes the GIL for its Python part and would hold them back.
                            await asyncio.sleep(0)
                        await io.run(cycle.persist)
                    # else only messages and read states (heartbeats, read-index rounds): no
                    # thread round trip for an empty transaction.
                    n = host.end_cycle(cycle)
                    if stored:
                        m.fsync_seconds.observe(cycle.seconds)
                    m.ready_groups.observe(n)
                    self._sync_members()
                    if self.tracker is not None and self.tracker.refresh():
                        self._reconcile()
                if host.failed is not None:
                    m.storage_full.set(1)
                    self.health.set("kvstore.v1.KV", health_pb2.HealthCheckResponse.NOT_SERVING)
                    if (failed := host.retry_cycle(loop.time())) is not None:  # disk full: retry
                        await io.run(failed.persist)
                        host.end_cycle(failed)
                        if host.failed is None:
                            m.storage_full.set(0)
                            self.health.set("kvstore.v1.KV", health_pb2.HealthCheckResponse.SERVING)
                            self.wake()
                self._update_gauges()

    def _update_gauges(self) -> None:
        """Per-group gauges, at most once a second (a node may host thousands of groups)."""
        assert self.host is not None
        now = asyncio.get_running_loop().time()
        if now < self._gauges_at:
            return
        self._gauges_at = now + 1.0
        seen = self._gauge_seen
        for gid, g in self.host.groups.items():
            core = g.core
            key = (core.term, core.lead, core.role, core.committed, core.applied)
            if seen.get(gid) == key:
                continue  # unchanged (most groups of a node hosting thousands are idle)
            seen[gid] = key
            label = str(gid)
            self.metrics.term.labels(label).set(core.term)
            self.metrics.leader.labels(label).set(core.lead)
            self.metrics.is_leader.labels(label).set(1 if core.role == Role.LEADER else 0)
            self.metrics.commit.labels(label).set(core.committed)
            self.metrics.applied.labels(label).set(core.applied)
            sm = self.host.store.session_meta(gid)
            self.metrics.sessions.labels(label).set(sm.count)
            self.metrics.sessions_evicted.labels(label).set(sm.evicted)
        if self.reads is not None:
            self.reads.update_gauges()

    async def _register_learner(self) -> None:
        assert self.host is not None
        host = self.host
        others = [addr for nid, addr in sorted(self.cfg.peers.items()) if nid != self.cfg.id]
        await register_learner(
            self.cfg.id, self.cfg.address, others,
            lambda: (g := host.groups.get(META_GROUP)) is not None and self.cfg.id in g.core.conf.members(),
            META_GROUP,
        )

    async def stop(self, grace: float = 2.0) -> None:
        self._stopping = True
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a death is logged already
                await t
        if self.transport is not None:
            await self.transport.close()
        if self.caller is not None:
            await self.caller.close()
        if self.store is not None:
            self.store.close()
        log.info("node %d stopped", self.cfg.id)


class PersistThread:
    """The one thread the Ready loop hands each cycle's storage call to (a bare queue and a
    future: a thread pool's bookkeeping cost ~10% of a follower's busy time at low load)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="persist", daemon=True)

    def __enter__(self) -> PersistThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._jobs.put(None)
        self._thread.join()

    def run(self, fn: Callable[[], None]) -> asyncio.Future[None]:
        fut = self._loop.create_future()
        self._jobs.put((fn, fut))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, fut = job
            try:
                fn()
            except BaseException as err:
                self._loop.call_soon_threadsafe(_settle, fut, err)
            else:
                self._loop.call_soon_threadsafe(_settle, fut, None)


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return  # the awaiting task was cancelled
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)
