"""Reads at every consistency level, on the leader and on replicas (followers and learners).

Levels (chosen per request, `kvstore.v1.Consistency`):

- ``linearizable``: on the leader, a ReadIndex round (`Host.read`). On a replica, the core
  forwards a ReadIndex request to the leader; the read is served once the replica has applied
  through the index the leader confirmed. A replica that has not heard from the leader within an
  election timeout refuses at once (STALE_REPLICA); a read whose index does not arrive in time,
  or that is pending when the replica loses its leader or becomes leader itself, fails with
  STALE_REPLICA. It is never answered from unconfirmed local state.
- ``bounded`` (max staleness): served from local state if the node can *show* it is at most
  that far behind (see below), else refused with STALE_REPLICA; the leader, which is where a
  client ends up, falls back to a ReadIndex round instead of refusing.
- ``stale``: local state at once; the reply carries the applied index and the staleness bound
  (or "unknown").

Staleness evidence. Every node, the leader included, sends a ReadIndex *probe* every few ticks.
When a probe sent at clock time ``t`` is answered with index ``i`` and the node has applied
through ``i``, every write acknowledged before ``t`` is in its state: a leader answers a ReadIndex
only after confirming with a quorum that it still leads, at an index at least its commit index
when the request arrived. So ``now - t`` (for the newest such probe) bounds how far behind the
node is. It is a request/response measure on the node's own clock, so a delayed or duplicated
message, a deposed leader or a clock offset between nodes cannot make a replica look fresher
than it is. Linearizable replica reads count as probes too.

Plain synchronous code driven by the node's ticker (`tick`), except `read_point`, the coroutine
the KV service awaits. The clock is injected; `kvstore.raft` stays free of clocks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvstore import errors
from kvstore.node.host import Host, ReadCallback
from kvstore.raft import ProposalDropped, RaftNode, Role
from kvstore.v1 import kv_pb2

log = logging.getLogger("kvstore.reads")

Clock = Callable[[], float]

LINEARIZABLE = "linearizable"
BOUNDED = "bounded"
STALE = "stale"

_LEVELS: dict[int, str] = {kv_pb2.LINEARIZABLE: LINEARIZABLE, kv_pb2.STALE: STALE, kv_pb2.BOUNDED: BOUNDED}


def level_name(consistency: int) -> str:
    try:
        return _LEVELS[consistency]
    except KeyError:
        raise errors.InvalidArgument(f"unknown consistency level {consistency}") from None


@dataclass(slots=True)
class ReadSettings:
    probe_ticks: int = 2
    """Ticks between two staleness probes of a group (0: no probes; bounded reads on replicas then
    wait for a read-index round and stale reads report an unknown staleness)."""
    demand_ticks: int = 100
    """Probe a group only while it served a bounded or stale read here within this many ticks,
    or while this node is one of its learners (read replicas keep their evidence fresh): idle
    groups (thousands per node, most of them quiesced) cost nothing. 0: probe every group all
    the time."""
    index_wait_ticks: int = 0
    """A replica's linearizable read fails if its read index has not arrived within this many
    ticks (0: one election timeout)."""
    expire_ticks: int = 0
    """Any pending replica read (or probe) is dropped after this many ticks (0: index_wait_ticks
    x 4)."""


@dataclass(slots=True)
class ReadPoint:
    """Where a read was served: the applied index and how far behind it may be (seconds;
    0.0 for linearizable reads, None when unknown)."""

    index: int
    staleness: float | None
    level: str

    @property
    def staleness_ms(self) -> int:
        """For the wire: rounded up (the bound must not shrink), -1 if unknown."""
        if self.staleness is None:
            return -1
        return max(0, math.ceil(self.staleness * 1000))


@dataclass(slots=True)
class _Pending:
    group: int
    ctx: bytes
    callback: ReadCallback
    tick: int
    sent_at: float
    probe: bool
    as_leader: bool


@dataclass(slots=True)
class _Freshness:
    fresh_at: float | None = None
    """Clock time before which every acknowledged write is applied here."""
    probe: bytes | None = None
    """Context of the probe in flight."""
    last_probe_tick: int = -(1 << 62)
    last_demand_tick: int = -(1 << 62)
    """When this node last served (or was asked for) a bounded or stale read of the group."""


@dataclass
class ReadMetrics:
    """Read-replica metrics, registered in the node's registry."""

    registry: CollectorRegistry
    reads: Counter = field(init=False)
    refused: Counter = field(init=False)
    read_index_seconds: Histogram = field(init=False)
    staleness: Gauge = field(init=False)
    lag_entries: Gauge = field(init=False)
    peer_lag_entries: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.reads = Counter(
            "kvstore_reads_by_level_total", "Reads served, by consistency level and by the role of the node",
            ["level", "role"], registry=r,
        )
        self.refused = Counter(
            "kvstore_reads_refused_total", "Reads a replica refused (STALE_REPLICA), by level", ["level"], registry=r,
        )
        self.read_index_seconds = Histogram(
            "kvstore_read_index_seconds", "Round trip of a replica's ReadIndex request to the leader, by kind",
            ["kind"], registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
        )
        self.staleness = Gauge(
            "kvstore_replica_staleness_seconds",
            "Upper bound on how far this node's applied state is behind the leader (-1: unknown)", ["group"],
            registry=r,
        )
        self.lag_entries = Gauge(
            "kvstore_replica_lag_entries", "Entries this node knows are committed but has not applied", ["group"],
            registry=r,
        )
        self.peer_lag_entries = Gauge(
            "kvstore_peer_lag_entries", "On the leader: entries each member is behind the commit index",
            ["group", "peer"], registry=r,
        )


class ReplicaReads:
    def __init__(
        self,
        host: Host,
        settings: ReadSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        metrics: ReadMetrics | None = None,
        request_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.settings = settings or ReadSettings()
        self.clock = clock
        self.metrics = metrics
        self.request_timeout = request_timeout
        # Contexts are 16 bytes (the host's own are 8): a per-process nonce keeps an answer to a
        # request of a previous incarnation of this node from matching a new request.
        self._nonce = os.urandom(8)
        self._seq = 0
        self._ticks = 0
        self._pending: dict[bytes, _Pending] = {}
        self._fresh: dict[int, _Freshness] = {}
        self._gauge_seen: dict[int, tuple[object, ...]] = {}

    # --- evidence ---------------------------------------------------------------------------
    def _freshness(self, group: int) -> _Freshness:
        f = self._fresh.get(group)
        if f is None:
            f = self._fresh[group] = _Freshness()
        return f

    def staleness(self, group: int) -> float | None:
        """Seconds this node may be behind the leader (None: no evidence)."""
        f = self._fresh.get(group)
        if f is None or f.fresh_at is None:
            return None
        return max(0.0, self.clock() - f.fresh_at)

    def leader_contact_seconds(self, group: int) -> float | None:
        g = self.host.groups.get(group)
        if g is None:
            return None
        ticks = g.core.leader_contact_ticks
        return None if ticks is None else ticks * self.host.settings.tick_ms / 1000

    def _evidence(self, group: int, sent_at: float) -> None:
        f = self._freshness(group)
        if f.fresh_at is None or sent_at > f.fresh_at:
            f.fresh_at = sent_at

    def _wait_ticks(self, core: RaftNode) -> int:
        return self.settings.index_wait_ticks or core.cfg.election_tick

    def _expire_ticks(self, core: RaftNode) -> int:
        return self.settings.expire_ticks or 4 * self._wait_ticks(core)

    def _in_contact(self, core: RaftNode) -> bool:
        if core.quiesced:
            # A quiesced group sends no heartbeats: its leader is as alive as its node, whose
            # liveness pings keep arriving (Host.suspect); the read index will wake the group.
            return core.lead != 0 and core.lead not in self.host.suspected
        ticks = core.leader_contact_ticks
        return ticks is not None and ticks < core.cfg.election_tick

    # --- replica ReadIndex ------------------------------------------------------------------
    def _next_ctx(self) -> bytes:
        self._seq += 1
        return self._nonce + self._seq.to_bytes(8, "big")

    def _send_read_index(self, group: int, callback: ReadCallback, *, probe: bool) -> bytes:
        """Ask the leader for a read index through the core; `callback(applied, err)` once applied
        through it (or on failure). Raises StaleReplica if no leader is known."""
        g = self.host.groups[group]
        ctx = self._next_ctx()
        sent_at = self.clock()

        def done(applied: int, err: errors.KVError | None) -> None:
            if self._pending.pop(ctx, None) is None:
                return  # already failed by `tick`
            if probe:
                f = self._freshness(group)
                if f.probe == ctx:
                    f.probe = None
            if err is None:
                self._evidence(group, sent_at)
                if self.metrics is not None:
                    self.metrics.read_index_seconds.labels("probe" if probe else "read").observe(
                        self.clock() - sent_at
                    )
            callback(applied, err)

        try:
            g.core.read_index(ctx)
            self.host.touch(group)
        except ProposalDropped as err:
            raise errors.StaleReplica(f"node {self.host.node_id} knows no leader of group {group}: {err}") from err
        g.reads[ctx] = done
        self._pending[ctx] = _Pending(group, ctx, done, self._ticks, sent_at, probe, g.core.role == Role.LEADER)
        return ctx

    def replica_read(self, group: int, callback: ReadCallback) -> None:
        """Linearizable read on a replica: `callback(applied_index, None)` once safe, or
        `(0, error)`. Raises StaleReplica at once if the replica is cut off from the leader."""
        self.host._check_writable()
        g = self.host.groups[group]
        core = g.core
        if not self._in_contact(core):
            contact = self.leader_contact_seconds(group)
            why = "knows no leader" if contact is None else f"has not heard from the leader for {contact:.1f}s"
            raise errors.StaleReplica(
                f"node {self.host.node_id} {why} (group {group}): it cannot serve linearizable reads now"
            )
        self._send_read_index(group, callback, probe=False)

    def _fail(self, p: _Pending, why: str) -> None:
        g = self.host.groups.get(p.group)
        if g is not None:
            g.reads.pop(p.ctx, None)
            if g.ready_reads:
                g.ready_reads = [(i, cb) for i, cb in g.ready_reads if cb is not p.callback]
        p.callback(0, errors.StaleReplica(why))

    # --- the ticker ---------------------------------------------------------------------------
    def tick(self) -> bool:
        """Called after every `Host.tick()`: expire replica reads that cannot complete, and send
        staleness probes. Returns True if a message may be waiting to go out."""
        self._ticks += 1
        now = self._ticks
        for p in list(self._pending.values()):
            g = self.host.groups.get(p.group)
            if g is None:
                self._fail(p, f"group {p.group} is gone from this node")
                continue
            core = g.core
            age = now - p.tick
            what = "probe" if p.probe else "read"
            if p.ctx in g.reads:  # still waiting for the index
                if p.as_leader != (core.role == Role.LEADER):
                    self._fail(p, f"node {self.host.node_id} changed role while a {what} was pending; retry")
                elif not self._in_contact(core):
                    self._fail(p, f"node {self.host.node_id} lost contact with the leader; retry elsewhere")
                elif age >= self._wait_ticks(core):
                    ms = age * self.host.settings.tick_ms
                    self._fail(p, f"node {self.host.node_id} got no read index from the leader within {ms} ms")
            elif age >= self._expire_ticks(core):
                self._fail(p, f"node {self.host.node_id} did not apply through the read index in time")
        sent = False
        step = self.settings.probe_ticks
        if step > 0 and self.host.failed is None:
            demand = self.settings.demand_ticks
            me = self.host.node_id
            for gid, grp in list(self.host.groups.items()):
                fr = self._fresh.get(gid)
                recent = fr is not None and now - fr.last_demand_tick <= demand
                if demand and not recent and me not in grp.core.conf.learners:
                    continue
                f = self._freshness(gid)
                if f.probe is not None or now - f.last_probe_tick < step:
                    continue
                core = grp.core
                if core.role != Role.LEADER and not self._in_contact(core):
                    continue
                f.last_probe_tick = now
                try:
                    f.probe = self._send_read_index(gid, _ignore, probe=True)
                    sent = True
                except errors.KVError:
                    f.probe = None
        return sent

    # --- the KV service's entry point ---------------------------------------------------------
    async def read_point(
        self,
        group: int,
        consistency: int,
        max_staleness_ms: int,
        leader_read: Callable[[], Awaitable[int]],
        wake: Callable[[], None],
    ) -> ReadPoint:
        """Wait until `group`'s local state may be read at `consistency`; returns where.
        `leader_read` is the leader's linearizable path (a ReadIndex round). Raises KVError."""
        level = level_name(consistency)
        g = self.host.groups[group]
        core = g.core
        leader = core.role == Role.LEADER
        point: ReadPoint
        if level == LINEARIZABLE:
            if leader:
                point = ReadPoint(await leader_read(), 0.0, level)
            else:
                point = ReadPoint(await self._replica_linearizable(group, wake), 0.0, level)
        elif level == STALE:
            self._freshness(group).last_demand_tick = self._ticks
            point = ReadPoint(self.host.store.applied_index(group), self.staleness(group), level)
        else:
            if max_staleness_ms <= 0:
                raise errors.InvalidArgument("bounded reads need max_staleness_ms > 0")
            f = self._freshness(group)
            idle = bool(self.settings.demand_ticks) and self._ticks - f.last_demand_tick > self.settings.demand_ticks
            f.last_demand_tick = self._ticks
            s = self.staleness(group)
            if s is not None and s * 1000 <= max_staleness_ms:
                point = ReadPoint(self.host.store.applied_index(group), s, level)
            elif leader:
                point = ReadPoint(await leader_read(), 0.0, level)
            elif idle or s is None:
                # Not probing this group lately: one read-index round gives fresh evidence
                # (and refuses at once if the replica is cut off from the leader).
                await self._replica_linearizable(group, wake)
                s = self.staleness(group)
                if s is None or s * 1000 > max_staleness_ms:
                    raise errors.StaleReplica(
                        f"node {self.host.node_id} cannot show it is within {max_staleness_ms} ms of the leader"
                    )
                point = ReadPoint(self.host.store.applied_index(group), s, level)
            else:
                if self.metrics is not None:
                    self.metrics.refused.labels(level).inc()
                known = "no evidence yet" if s is None else f"it may be {s * 1000:.0f} ms behind"
                raise errors.StaleReplica(
                    f"node {self.host.node_id} cannot show it is within {max_staleness_ms} ms of the leader "
                    f"({known}); read elsewhere"
                )
        if self.metrics is not None:
            self.metrics.reads.labels(level, "leader" if leader else "replica").inc()
        return point

    async def _replica_linearizable(self, group: int, wake: Callable[[], None]) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def done(index: int, err: errors.KVError | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(index)

        try:
            self.replica_read(group, done)
        except errors.StaleReplica:
            if self.metrics is not None:
                self.metrics.refused.labels(LINEARIZABLE).inc()
            raise
        wake()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.request_timeout)
        except TimeoutError:
            raise errors.Timeout(
                f"replica read not confirmed within {self.request_timeout:g}s", indeterminate=False
            ) from None

    # --- introspection ------------------------------------------------------------------------
    def update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        seen = self._gauge_seen
        for gid, g in self.host.groups.items():
            core = g.core
            s = self.staleness(gid)
            key = (s, core.committed, core.applied, core.role, core.quiesced)
            if core.quiesced and seen.get(gid) == key:
                continue  # an idle group: its gauges are already right (thousands per node)
            seen[gid] = key
            label = str(gid)
            m.staleness.labels(label).set(-1 if s is None else s)
            m.lag_entries.labels(label).set(max(0, core.committed - core.applied))
            if core.role == Role.LEADER:
                for nid, pr in core.prs.items():
                    if nid != self.host.node_id:
                        m.peer_lag_entries.labels(label, str(nid)).set(max(0, core.committed - pr.match))


def _ignore(_applied: int, _err: errors.KVError | None) -> None:
    pass
