"""One kvstore node process: the asyncio and gRPC shell around `kvstore.node.logic.NodeLogic`.

Startup: open the store, start the node logic (which opens every group and bootstraps a new
cluster: see `kvstore.node.logic`), then the gRPC server (Raft, KV, Admin, Shard and the
standard grpc.health.v1 service) and, with `--client-listen`, the client-only port (the same
servicers, client methods only: `clientport.py`) and the loop publishing its address in the shard
map (`clientaddr.py`), the tick timer, the Ready loop and the shard coordinator.
The shell only drives the logic: ticks on a timer (`NodeLogic.tick`), peer messages as they
arrive (`NodeLogic.deliver`), each Ready cycle with its persist step on a thread, then
`NodeLogic.after_cycle` (membership and shard map).
Shutdown (SIGTERM / SIGINT): first a drain (`drain`, at most `--drain-timeout` seconds: readiness
and the health of `kvstore.v1.KV` go NOT_SERVING, every group this node leads is handed to another
up-to-date voter, and the writes waiting here are answered), then health goes NOT_SERVING, the
server stops taking requests and gives in-flight ones a grace period, the loops stop, the store
closes. Nothing durable depends on a
graceful stop: kill -9 at any moment loses no acknowledged write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2

from kvstore import hoptrace
from kvstore.node.alarms import AlarmTracker
from kvstore.node.forcenew import force_logs, lost_groups
from kvstore.node.host import Cycle, Host
from kvstore.node.inbound import Inbound, RefusalLog
from kvstore.node.logic import Bootstrap, NodeLogic
from kvstore.node.readiness import Readiness
from kvstore.node.store import NodeStore
from kvstore.node.version import CommandGate, VersionTracker, members_of
from kvstore.node.xtxn import RECORD_SWEEP_BATCH
from kvstore.raft import Message, Role
from kvstore.security.audit import KEY_FILE, AuditLog, load_or_create_key
from kvstore.security.guard import AuthGuard, AuthTracker
from kvstore.security.tls import NodeTls, PeerVerifier
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import xtxn_apply
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.xtxn import Record, TxnId
from kvstore.transport.peer import CHANNEL_OPTIONS, Transport
from kvstore.transport.service import RaftService
from kvstore.v1 import admin_pb2, auth_pb2, kv_pb2, raft_pb2, shard_pb2

from . import wire
from .admin_service import AdminService
from .admission import Admission
from .audit_rpc import audited
from .auth_service import AuthService
from .clientaddr import publish_client_address
from .clientport import ClientPort
from .compaction import Retention, RevisionRetention
from .config import NodeConfig
from .etcd import etcd_services
from .etcd.maintenance import remove_snapshot_leftovers
from .forcenew import rewrite_shard_map
from .kv_service import KVService
from .learner import register_learner
from .metrics import Metrics
from .movedriver import MoveDriver
from .probes import PERSIST_STUCK
from .reads import ReadMetrics, ReplicaReads
from .shards import AsyncShardTracker, GroupCaller, NodeCluster, ShardService
from .versions import maintain_cluster_version
from .watch_service import WatchDriver
from .xtxn_run import SWEEP_BATCH

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
        self.client_port: ClientPort | None = None
        """The client-only port (`cfg.client_listen`), None without one."""
        self.tls: NodeTls | None = None
        """TLS material (`cfg.certs_dir`), None for a plaintext node; reloaded by `reload_certificates`."""
        self.audit: AuditLog | None = None
        """The audit log (`cfg.audit`, `--audit-log`), None without one. Authentication reports its
        events with `self.audit.auth_event(...)`."""
        self.health = health.HealthServicer()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.rpc_methods: list[str] = []
        """Every gRPC method the node serves (`/package.Service/Method`)."""
        self.tracker: AsyncShardTracker | None = None
        self.auth: AuthTracker
        """The auth state as of the metadata group's applied state here."""
        self.guard: AuthGuard
        """Authenticates every call and checks permissions (`kvstore/security/guard.py`)."""
        self.caller: GroupCaller | None = None
        self.coordinator: MoveDriver | None = None
        self._gauges_at = 0.0
        self._gauge_seen: dict[int, tuple[int, ...]] = {}
        self.inbound: Inbound
        self.logic: NodeLogic
        self.died = asyncio.Event()
        """Set when a loop the node needs ended (see `_task_ended`): the process must exit."""
        self.fatal: str | None = None
        self._stopping = False
        self.alarms: AlarmTracker | None = None
        self.versions: VersionTracker | None = None
        """The cluster version and every member's advertised feature level (`node/version.py`)."""
        self.watch: WatchDriver | None = None
        """Drives the watch hub from the Ready loop (`server/watch_service.py`)."""
        self.admission: Admission | None = None
        self.readiness: Readiness | None = None
        self.draining = False
        """Set by `drain` (SIGTERM): not ready any more."""
        self.persist_since: float | None = None
        """`time.monotonic()` when the storage call in flight started (None: none in flight)."""

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
        for gone in remove_snapshot_leftovers(cfg.data_dir):  # a Snapshot call's files from before a crash
            log.warning("node %d: removed %s, left by an etcd Snapshot call of a previous run", cfg.id, gone)
        # A large map reserves address space only; it spares growing the map (which would
        # invalidate open read transactions such as streaming scans) in all but huge stores.
        if cfg.certs_dir is not None:
            self.tls = NodeTls(cfg.certs_dir, cfg.id)  # before the store: bad certificates fail fast
        tls = self.tls
        self.store = store = LmdbNodeStore(
            cfg.data_dir / "db", sync=cfg.sync, map_size=1 << 36, wal_segment_bytes=cfg.wal_segment_bytes,
            state_sync=cfg.state_sync, writeback_interval=cfg.lmdb_writeback_ms / 1000,
        )
        if cfg.audit is not None:
            self.audit = AuditLog(cfg.audit, load_or_create_key(cfg.data_dir / KEY_FILE), store, cfg.id)
            self.audit.open()
        audit = self.audit

        def watched(servicer: object, name: str) -> object:
            return servicer if audit is None else audited(servicer, name, audit, writes=cfg.audit_writes)
        self.transport = Transport(
            cfg.id, cfg.cluster_id, store, on_unreachable=lambda n: self.logic.host.report_unreachable(n),
            on_snapshot_done=self._snapshot_done, tls=tls,
        )
        tracker = self.tracker = AsyncShardTracker(store)
        refused = self.metrics.inbound_refused
        peers = dict(cfg.peers)
        if cfg.force_new_cluster:
            peers = {cfg.id: cfg.address}
            self._force_logs(store, tracker)
        self.logic = logic = NodeLogic(
            cfg.id, store, _CountingTransport(self.transport, self.metrics), cfg.raft,
            Bootstrap(peers, cfg.groups, cfg.replication, cfg.vnodes, cfg.join), random.Random(),
            RefusalLog(time.monotonic, on_refused=lambda reason: refused.labels(reason).inc()), tracker,
        )
        host = self.host = logic.host
        self.readiness = Readiness(host)
        self.inbound = logic.inbound
        caller = self.caller = GroupCaller(
            cfg.id, host, self.wake, tracker, cfg.request_timeout, cfg.cluster_id,
            credentials=tls.channel_credentials if tls is not None else None,
        )
        verifier = PeerVerifier(caller.address) if tls is not None else None
        verify = verifier.refusal if verifier is not None else None
        auth = self.auth = AuthTracker(store)
        auth.refresh()
        self.guard = guard = AuthGuard(auth, verifier)
        self.coordinator = MoveDriver(NodeCluster(host, tracker, caller))
        logic.start(time.monotonic())
        self.reads = ReplicaReads(
            host, cfg.reads, metrics=ReadMetrics(self.metrics.registry), request_timeout=cfg.request_timeout
        )
        versions = self.versions = VersionTracker(store, cfg.feature_level)
        versions.refresh()
        host.gate = CommandGate(lambda: versions.value, lambda: members_of(tracker.map)).check
        self.metrics.cluster_version.set_function(lambda: versions.value.cluster)
        self.metrics.supported_level.set_function(lambda: versions.supported)
        alarms = self.alarms = AlarmTracker(store)
        alarms.refresh()
        alarm_gauge = self.metrics.alarms.labels("NOSPACE")
        alarms.on_change.append(lambda: alarm_gauge.set(len(alarms.alarms)))
        admission = self.admission = Admission(
            cfg.id, cfg.admission, host, alarms,
            propose_meta=lambda data: caller.propose(META_GROUP, data), live_bytes=store.live_bytes,
        )
        refused_by = self.metrics.admission_refused
        admission.on_refused = lambda reason: refused_by.labels(reason).inc()

        self.kv = kv = KVService(cfg, host, self.wake, self.metrics, tracker, self.reads, admission, guard, caller)
        kv.orphan_sweep.cluster_version = lambda: versions.value.cluster
        kv.cluster_version = lambda: versions.value.cluster
        self.watch = watch = WatchDriver(kv.watch_hub, host, kv.requests, self.wake)
        hub = kv.watch_hub
        m = self.metrics
        m.watchers.set_function(lambda: hub.count)
        m.watch_pending_bytes.set_function(lambda: hub.pending_bytes)
        m.watch_canceled.labels("slow").set_function(lambda: hub.canceled_slow)
        m.watch_canceled.labels("moved").set_function(lambda: hub.canceled_moved)
        m.watch_closes.set_function(lambda: watch.closes_sent)
        server = self.server = grpc.aio.server(options=cfg.admission.server_options(CHANNEL_OPTIONS))
        # Every method of every service decodes its request totally (wire.py): malformed bytes
        # get INVALID_ARGUMENT, never UNKNOWN.
        services: list[tuple[object, ServiceDescriptor]] = [
            (RaftService(cfg.id, cfg.cluster_id, self._deliver, store.snapshot_dir, on_heard=self._heard,
                         is_member=self.inbound.is_member, refusals=self.inbound.refusals,
                         on_connected=self._connected, verify=verify),
             raft_pb2.DESCRIPTOR.services_by_name["Raft"]),
            (watched(kv, "kvstore.v1.KV"),
             kv_pb2.DESCRIPTOR.services_by_name["KV"]),
            (watched(AdminService(cfg, host, self.wake, tracker, caller, self.coordinator, self.reads, admission,
                                  versions),
                     "kvstore.v1.Admin"),
             admin_pb2.DESCRIPTOR.services_by_name["Admin"]),
            (watched(ShardService(cfg.id, host, self.wake, tracker, caller, self.coordinator, cfg.request_timeout,
                                  cluster_id=cfg.cluster_id, is_member=self.inbound.is_member,
                                  refusals=self.inbound.refusals, verify=verify), "kvstore.v1.Shard"),
             shard_pb2.DESCRIPTOR.services_by_name["Shard"]),
            (watched(AuthService(auth, guard, caller, cfg.request_timeout), "kvstore.v1.Auth"),
             auth_pb2.DESCRIPTOR.services_by_name["Auth"]),
            (self.health, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        ]
        # etcd's v3 KV, Watch, Lease, Cluster, Maintenance and Auth on the same port, over the
        # (audited) KV, Admin and Auth servicers.
        services += etcd_services(services[1][0], services[2][0], services[4][0], caller, cfg.cluster_id, cfg.id,
                                  cfg.request_timeout)
        limit = admission.call_limit()
        self.rpc_methods = wire.add_services(server, services, guard, limit=limit)
        self.port = (
            server.add_insecure_port(cfg.listen) if tls is None
            else server.add_secure_port(cfg.listen, tls.server_credentials())
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        if cfg.client_listen:
            # The client-only port: the same servicers, client methods only, tokens required.
            self.client_port = ClientPort(cfg.client_listen, tls, cfg.admission.server_options(CHANNEL_OPTIONS))
            await self.client_port.start(services, guard, limit)
        await server.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._ticker(), name="ticker"),
            loop.create_task(self._ready_loop(), name="ready-loop"),
            loop.create_task(self.coordinator.run(), name="shard-coordinator"),
            loop.create_task(admission.run(), name="admission"),
            loop.create_task(self.watch.closer(), name="watch-closer"),
            loop.create_task(self.kv.lease_driver.run(), name="lease-clock"),
            loop.create_task(self.kv.orphan_sweep.run(), name="lease-orphan-sweep"),
            loop.create_task(publish_client_address(cfg.id, cfg.client_address, tracker, caller.propose),
                             name="client-address"),
            loop.create_task(maintain_cluster_version(cfg.id, host, versions, tracker, caller.propose),
                             name="cluster-version"),
        ]
        cross = kv.requests.cross
        if cross is not None:
            def led() -> list[int]:
                return sorted(g for g, grp in host.groups.items() if g != META_GROUP and grp.core.lead == cfg.id)

            def intents(g: int) -> list[tuple[bytes, bytes]]:
                revs = store.revisions
                return [*revs.intents(g, b"", None, SWEEP_BATCH), *((b"", raw) for raw in revs.range_locks(g))]

            def records(g: int, before: int) -> list[tuple[TxnId, Record]]:
                return store.revisions.read_rows(g, lambda rows: xtxn_apply.unfinished(rows, before,
                                                                                         RECORD_SWEEP_BATCH))

            self._tasks.append(loop.create_task(cross.sweep(led, intents, records=records), name="intent-sweep"))
        retention: Retention | None = None
        if cfg.history_retention > 0:
            retention = Retention(self.host, self.caller, self.tracker, cfg.history_retention,
                                  interval=cfg.history_retention_interval)
        elif cfg.history_retention_revisions > 0:
            retention = RevisionRetention(self.host, self.caller, self.tracker, cfg.history_retention_revisions,
                                          interval=cfg.history_retention_interval)
        if retention is not None:
            retention.cluster_version = lambda: self.versions.value.cluster
            self._tasks.append(loop.create_task(retention.run(), name="history-retention"))
        for t in self._tasks:
            t.add_done_callback(self._task_ended)
        if cfg.learner:
            self._tasks.append(loop.create_task(self._register_learner(), name="register-learner"))
        if cfg.force_new_cluster:  # ends once the map is rewritten: not a task the node needs
            self._tasks.append(loop.create_task(
                rewrite_shard_map(cfg.id, cfg.address, host, tracker, caller.propose), name="force-new-cluster"))
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("kvstore.v1.KV", health_pb2.HealthCheckResponse.SERVING)
        log.info("node %d of cluster %r serving on %s (%s)%s", cfg.id, cfg.cluster_id, cfg.listen,
                 f"TLS, certificates from {cfg.certs_dir}" if tls is not None else "plaintext, no TLS",
                 f"; clients with a token on {cfg.client_listen}" if cfg.client_listen else "")

    def _force_logs(self, store: NodeStore, tracker: AsyncShardTracker) -> None:
        """`--force-new-cluster`, step 1 (`kvstore.node.forcenew.force_logs`), before any core
        starts; says loudly what it did and which data groups are lost."""
        cfg = self.cfg
        done = force_logs(store, cfg.id)
        for f in done:
            if f.removed or f.promoted:
                log.warning("force-new-cluster: group %d is now node %d alone (removed %s%s); committed through %d",
                            f.group, cfg.id, f.removed, ", promoted from learner" if f.promoted else "", f.last)
        tracker.refresh()
        lost = lost_groups(tracker.map, cfg.id) if tracker.map is not None else []
        if lost:
            log.critical("force-new-cluster: data groups %s have no replica on node %d: their keys are LOST "
                         "(they stay in the shard map, unavailable)", lost, cfg.id)
        log.warning("force-new-cluster: node %d starts as a new single-member cluster from its data "
                    "(%d groups); add members back with `kvctl member add`", cfg.id, len(done))

    def reload_certificates(self) -> bool:
        """SIGHUP: read the certs directory again. On success the server presents the new
        certificate at every later handshake, peer streams redial with it, and the group caller's
        channels are replaced; open connections and the cluster keep working. On failure (logged)
        nothing changes."""
        if self.tls is None:
            log.warning("SIGHUP: this node runs without --certs-dir; nothing to reload")
            return False
        if not self.tls.reload():
            return False
        if self.transport is not None:
            self.transport.certificates_reloaded()
        if self.caller is not None:
            self.caller.reset_channels()
        return True

    # --- wiring -----------------------------------------------------------------------------
    def _deliver(self, m: Message) -> None:
        self.metrics.messages_received.inc()
        if self.logic.deliver(m):
            self.wake()

    def _snapshot_done(self, group: int, to: int, failed: bool) -> None:
        assert self.host is not None
        self.host.report_snapshot(group, to, failed)
        self.wake()

    def _connected(self, node: int) -> None:
        self.logic.peer_connected(node, time.monotonic())
        self.wake()

    def _heard(self, node: int) -> None:
        self.logic.heard(node, time.monotonic())  # the event loop's clock

    async def _ticker(self) -> None:
        assert self.host is not None
        loop = asyncio.get_running_loop()
        period = self.cfg.raft.tick_ms / 1000
        next_at = loop.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += period
            if loop.time() - next_at > 5 * period:
                next_at = loop.time() + period  # we were paused (SIGSTOP): do not tick in a burst
            self.logic.tick(loop.time())
            if self.reads is not None:
                self.reads.tick()
            self.wake()

    async def _ready_loop(self) -> None:
        host = self.host
        assert host is not None
        m = self.metrics
        loop = asyncio.get_running_loop()

        def early(cycle: Cycle, results: list[list[Any]]) -> None:
            # Answer the writes being applied while the transaction is still being made durable
            # (see host.py: their outcome is decided; reads still wait for the applied index).
            if hoptrace.ON:
                hoptrace.mark("n.applied")
            loop.call_soon_threadsafe(host.answer_writes, cycle, results)

        inline_max = self.cfg.inline_apply
        inline_writes = self.cfg.inline_persist

        watch = self.watch
        assert watch is not None
        with PersistThread(loop) as io:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while True:
                    if hoptrace.ON:
                        hoptrace.mark("n.cycle")
                    cycle = host.begin_cycle()
                    if cycle is None:
                        break
                    if hoptrace.ON:
                        hoptrace.mark("n.begin")
                        written = sum(len(w.entries) for w in cycle.writes)
                        hoptrace.mark(f"n.size:{written}:{sum(len(a.entries) for a in cycle.applies)}")
                    stored = cycle.touches_storage()
                    if stored and _applies_here(cycle, inline_max, inline_writes):
                        # Only committed entries to apply and nothing to flush (the leader's
                        # commit of a small batch), or a few new entries whose only wait is the
                        # log's flush (a follower's append; `--inline-persist`): the same call
                        # on this thread, no hand-off to the persist thread and back (issue 20:
                        # two wake-ups off a put). `end_cycle` answers the writes applied, right
                        # after.
                        if cycle.sent_early:
                            await asyncio.sleep(0)  # the appends and commits leave first
                        _timed_persist(cycle)
                        if hoptrace.ON and cycle.applies:
                            hoptrace.mark("n.applied")  # (the thread's path marks it in `early`)
                    elif stored:
                        if host.answers_early(cycle):
                            cycle.on_applied = early
                        # The fsync runs off the event loop: requests and messages that arrive
                        # meanwhile are stepped into the cores and go out in the next cycle.
                        if cycle.sent_early:
                            # Let the peer streams write the appends first: the persist thread
                            # takes the GIL for its Python part and would hold them back.
                            await asyncio.sleep(0)
                        self.persist_since = time.monotonic()
                        try:
                            await io.run(functools.partial(_timed_persist, cycle))
                        finally:
                            self.persist_since = None
                    # else only messages and read states (heartbeats, read-index rounds): no
                    # thread round trip for an empty transaction.
                    n = host.end_cycle(cycle)
                    watch.after_cycle(cycle.applies, cycle.writes)
                    if hoptrace.ON:
                        hoptrace.mark("n.end")
                    if stored:
                        m.fsync_seconds.observe(cycle.seconds)
                    m.ready_groups.observe(n)
                    self.logic.after_cycle()
                    self.auth.refresh()
                    if self.alarms is not None:
                        self.alarms.refresh()
                    if self.versions is not None:
                        self.versions.refresh()
                watch.step()  # watch requests, progress, slow streams (between cycles)
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

    # --- probes and drain (`probes.py`; run on the event loop) ---------------------------------
    def liveness(self) -> str | None:
        """None while the node works (`/livez`), else why not: a loop it needs died, or one
        storage call has been running for more than `PERSIST_STUCK` seconds."""
        if self.fatal is not None:
            return f"a loop of the node died: {self.fatal}"
        since = self.persist_since
        if since is not None and (stuck := time.monotonic() - since) > PERSIST_STUCK:
            return f"a storage call has been running for {stuck:.0f} s"
        return None

    def ready(self) -> str | None:
        """None when the node serves (`/readyz`: `kvstore.node.readiness`), else why not."""
        if self.draining or self._stopping:
            return "stopping: handing leadership to other nodes"
        if self.readiness is None:
            return "starting"
        return self.readiness.check()

    async def drain(self, timeout: float) -> bool:
        """SIGTERM: hand every group this node leads to another up-to-date voter (`Host.
        drain_leadership`, retried every tick) and wait until it leads none and no write
        proposed here waits for its answer, for at most `timeout` seconds. Meanwhile the node
        keeps running (it must replicate to the new leaders and answer its waiting writes) but
        is not ready, and new proposals here are refused with a definite error (transfer in
        progress, then NOT_LEADER), which clients retry at the new leader. It ends early when no
        live voter is left to take the groups still led here (the whole cluster stopping).
        True if it drained."""
        host = self.host
        if host is None or timeout <= 0:
            return False
        self.draining = True
        self.health.set("kvstore.v1.KV", health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        period = self.cfg.raft.tick_ms / 1000
        had = sum(1 for g in host.groups.values() if g.core.role == Role.LEADER)
        while True:
            led, stuck = host.drain_leadership()
            waiting = host.pending_writes()
            if not led and not waiting:
                log.info("node %d: drained: handed leadership of %d group(s) to other nodes in %.2f s; "
                         "stopping", self.cfg.id, had, loop.time() - started)
                return True
            if led and len(stuck) == len(led):
                log.warning("node %d: drain: no live voter left to take group(s) %s; stopping anyway",
                            self.cfg.id, stuck)
                return False
            if loop.time() >= deadline or self.died.is_set():
                log.warning("node %d: drain timed out after %.1f s: still leads group(s) %s, %d write(s) "
                            "unanswered; stopping anyway", self.cfg.id, timeout, led, waiting)
                return False
            self.wake()
            await asyncio.sleep(period)

    async def _register_learner(self) -> None:
        assert self.host is not None
        host = self.host
        others = [addr for nid, addr in sorted(self.cfg.peers.items()) if nid != self.cfg.id]
        await register_learner(
            self.cfg.id, self.cfg.address, others,
            lambda: (g := host.groups.get(META_GROUP)) is not None and self.cfg.id in g.core.conf.members(),
            META_GROUP, credentials=self.tls.channel_credentials() if self.tls is not None else None,
        )

    async def stop(self, grace: float = 2.0) -> None:
        self._stopping = True
        self.health.enter_graceful_shutdown()
        if self.client_port is not None:
            await self.client_port.stop(grace)
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
        if self.audit is not None:  # before the store: it records the head there
            await asyncio.get_running_loop().run_in_executor(None, self.audit.close)
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


class _CountingTransport:
    """The node's `PeerTransport`: the gRPC transport, counting the Raft messages sent."""

    def __init__(self, transport: Transport, metrics: Metrics) -> None:
        self._t = transport
        self._sent = metrics.messages_sent
        self.send_snapshot = transport.send_snapshot
        self.set_addresses = transport.set_addresses
        self.ping = transport.ping

    def send(self, messages: list[Message]) -> None:
        self._sent.inc(len(messages))
        self._t.send(messages)

    @property
    def peer_ids(self) -> list[int]:
        return self._t.peer_ids


def _applies_here(cycle: Cycle, most: int, most_written: int = 0) -> bool:
    """Does the Ready loop run `cycle`'s storage call itself: at most `most` entries to apply,
    and either a call that waits for no disk (`NodeStore.waits_for_disk`) or, with at most
    `most_written` new entries, one whose only wait is the log's flush
    (`NodeStore.flushes_only_log`: the loop then waits it out)? Never with `most` 0."""
    if most <= 0 or sum(len(b.entries) for b in cycle.applies) > most:
        return False
    if most_written > 0 and sum(len(w.entries) for w in cycle.writes) <= most_written:
        return cycle.store.flushes_only_log(cycle.writes, cycle.applies)
    return not cycle.store.waits_for_disk(cycle.writes, cycle.applies)


def _timed_persist(cycle: Cycle) -> None:
    """`cycle.persist()`, timed for the persist metric (on the persist thread, or the loop)."""
    if hoptrace.ON:
        hoptrace.mark("n.persist0")
    t0 = time.perf_counter()
    cycle.persist()
    cycle.seconds = time.perf_counter() - t0
    if hoptrace.ON:
        hoptrace.mark("n.persist1")
