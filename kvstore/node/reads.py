"""Reads at every consistency level, on the leader and on replicas (followers and learners), as
synchronous node logic: no event loop, no futures, no clock and no randomness of its own.

Levels (chosen per request):

- ``linearizable``: on the leader, a ReadIndex round. On a replica, the core forwards a ReadIndex
  request to the leader; the read is served once the replica has applied through the index the
  leader confirmed (the host's `_serve_reads` holds it until then). A replica that has not heard
  from the leader within an election timeout refuses at once (STALE_REPLICA); a read whose index
  does not arrive in time, or that is pending when the node changes role or loses its leader,
  fails with STALE_REPLICA. It is never answered from unconfirmed local state.
- ``bounded`` (max staleness): served from local state if the node can *show* it is at most that
  far behind (see below), else refused with STALE_REPLICA; the leader, which is where a client
  ends up, falls back to a ReadIndex round instead of refusing, and reports the round's own
  bound, ``now - sent`` (not 0: a leader deposed after confirming may serve a state without a
  write the new leader acknowledged meanwhile); a round slower than the bound is refused too.
- ``stale``: local state at once; the point carries the applied index and the staleness bound
  (or None: unknown).

Staleness evidence, and why ``now - t`` bounds staleness. Every node, the leader included, sends a
ReadIndex *probe* every `probe_ticks` ticks (while the group is in demand here). When a probe
sent at local clock time ``t`` is answered with index ``i`` and the node has applied through
``i``, every write acknowledged before ``t`` is in its state:

1. a write is acknowledged only once its entry is committed, so a write acknowledged before
   ``t`` has an index ``<= `` the commit index of every leader that can still confirm its
   leadership after ``t`` (leader completeness; a leader serves ReadIndex only after an entry of
   its own term committed);
2. the leader that answers the probe received it after ``t`` and answered with at least its
   commit index at that moment, after confirming with a quorum that it still led then. A deposed
   leader cannot confirm (a quorum has moved to a higher term), so it never answers; a delayed
   or duplicated response can only carry an index that was valid for a request sent at ``t`` or
   earlier, and it is matched by the request's context, which is unique per request and per
   incarnation of the node (a nonce from the injected rng): an answer to a request of a previous
   life of the node never matches a new request;
3. the evidence is the *send* time ``t`` of the request, read on this node's own clock before the
   request left, and the age is ``now - t`` on the same clock. Both ends of the interval are
   read on one clock, so any offset between nodes' clocks cancels; nothing from another node's
   clock is ever used. (The argument assumes the local clock's *rate* is right, as a monotonic
   clock's is to a few ppm; ticks may be skewed, they only drive probing and timeouts.)

So for the newest answered-and-applied probe, ``now - t`` is an upper bound on how far the
state read now is behind the newest acknowledged write. Successful linearizable and bounded
read-index rounds count as probes too. A response can only *raise* ``fresh_at`` if its request
was sent later; evidence is never moved back nor forward by anything but a newer send time.

Invariants:
- ``fresh_at`` only ever holds the send time of a request that was answered and applied through;
- a pending request (read or probe) completes exactly once: its callback, or its failure from
  `tick` (expiry, role change, lost contact), whichever comes first;
- nothing here reads a clock or draws randomness except through `clock` and `rng`, handed in
  (the asyncio server hands in `time.monotonic`; the simulator hands in each node's offset clock).

`kvstore.server.reads` turns these callbacks into awaitables for the KV service.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvstore import errors
from kvstore.node.host import Host, ReadCallback
from kvstore.raft import ProposalDropped, RaftNode, Role

log = logging.getLogger("kvstore.reads")

Clock = Callable[[], float]
"""Seconds on this node's own clock (monotonic; any origin)."""

LINEARIZABLE = "linearizable"
BOUNDED = "bounded"
STALE = "stale"
LEVELS = (LINEARIZABLE, BOUNDED, STALE)


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


PointCallback = Callable[[ReadPoint | None, errors.KVError | None], None]
"""`(point, None)` once the group's local state may be read, or `(None, error)`."""

LeaderRead = Callable[[ReadCallback], None]
"""The leader's linearizable path: starts a ReadIndex round, `callback(applied, err)` when done;
raises a definite KVError if it cannot even start."""


class ReadObserver(Protocol):
    """What the reads report (the server counts them in Prometheus; the simulator ignores them)."""

    def served(self, level: str, role: str) -> None: ...

    def refused(self, level: str) -> None: ...

    def round_trip(self, kind: str, seconds: float) -> None: ...


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


class NodeReads:
    """The node's read points and staleness evidence over its host. Drive it with `tick()` after
    every `Host.tick()`; ask it with `read()` (every level) or `replica_read()`."""

    def __init__(
        self,
        host: Host,
        settings: ReadSettings | None = None,
        *,
        clock: Clock,
        rng: random.Random,
        observer: ReadObserver | None = None,
    ) -> None:
        self.host = host
        self.settings = settings or ReadSettings()
        self.clock = clock
        self.observer = observer
        # Contexts are 16 bytes (the host's own are 8, so they never collide): a nonce per
        # incarnation keeps an answer to a request of a previous life of this node from matching
        # a new request (see the module docstring, point 2).
        self._nonce = rng.getrandbits(64).to_bytes(8, "big")
        self._seq = 0
        self._ticks = 0
        self._pending: dict[bytes, _Pending] = {}
        self._fresh: dict[int, _Freshness] = {}

    # --- evidence ---------------------------------------------------------------------------
    def _freshness(self, group: int) -> _Freshness:
        f = self._fresh.get(group)
        if f is None:
            f = self._fresh[group] = _Freshness()
        return f

    def staleness(self, group: int) -> float | None:
        """Seconds this node may be behind the newest acknowledged write (None: no evidence)."""
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
        """A read-index request sent at `sent_at` (this node's clock) was answered and applied
        through: every write acknowledged before `sent_at` is in the state. Only ever moves
        forward."""
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

    # --- ReadIndex requests -----------------------------------------------------------------
    def _next_ctx(self) -> bytes:
        self._seq += 1
        return self._nonce + self._seq.to_bytes(8, "big")

    def _send_read_index(self, group: int, callback: ReadCallback, *, probe: bool) -> bytes:
        """Ask for a read index through the core (the leader runs the round itself, a replica
        forwards it); `callback(applied, err)` once applied through it (or on failure, exactly
        once). Raises StaleReplica if no leader is known."""
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
                if self.observer is not None:
                    self.observer.round_trip("probe" if probe else "read", self.clock() - sent_at)
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

    def leader_read(self, group: int, callback: ReadCallback) -> None:
        """Linearizable read on the leader: a ReadIndex round run by this node's core, with the
        same expiry as a replica's (the default `LeaderRead` of `read`). Raises NotLeader /
        NoLeader if this node does not lead `group`."""
        self.host._check_writable()
        g = self.host.groups[group]
        if g.core.role != Role.LEADER:
            raise self.host.not_leader_error(g.id)
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
        """Called after every `Host.tick()`: expire reads that cannot complete, and send staleness
        probes. Returns True if a message may be waiting to go out."""
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

    # --- the entry point: a read at any level -------------------------------------------------
    def read(
        self,
        group: int,
        level: str,
        max_staleness_ms: int,
        done: PointCallback,
        leader_read: LeaderRead | None = None,
    ) -> None:
        """Find a point at which `group`'s local state may be read at `level` (one of `LEVELS`).

        Raises a definite KVError if the read is refused at once (no leader known, cut off from
        the leader, no evidence of being within `max_staleness_ms`, storage failed); otherwise
        calls `done(point, None)` or `done(None, error)` exactly once, maybe before returning.
        `leader_read` is the leader's linearizable path (default: `self.leader_read`)."""
        if level not in LEVELS:
            raise errors.InvalidArgument(f"unknown consistency level {level!r}")
        g = self.host.groups[group]
        leader = g.core.role == Role.LEADER
        role = "leader" if leader else "replica"
        store = self.host.store
        lead: LeaderRead = leader_read or (lambda cb: self.leader_read(group, cb))

        def served(point: ReadPoint) -> None:
            if self.observer is not None:
                self.observer.served(level, role)
            done(point, None)

        if level == LINEARIZABLE:
            if leader:
                lead(_on_index(done, lambda index: served(ReadPoint(index, 0.0, level))))
            else:
                self._replica_round(group, _on_index(done, lambda index: served(ReadPoint(index, 0.0, level))))
            return
        if level == STALE:
            self._freshness(group).last_demand_tick = self._ticks
            served(ReadPoint(store.applied_index(group), self.staleness(group), level))
            return
        if max_staleness_ms <= 0:
            raise errors.InvalidArgument("bounded reads need max_staleness_ms > 0")
        f = self._freshness(group)
        idle = bool(self.settings.demand_ticks) and self._ticks - f.last_demand_tick > self.settings.demand_ticks
        f.last_demand_tick = self._ticks
        s = self.staleness(group)
        if s is not None and s * 1000 <= max_staleness_ms:
            served(ReadPoint(store.applied_index(group), s, level))
        elif leader:
            # One ReadIndex round; its bound is the round's own age on this clock (module
            # docstring), which a slow round may push past the bound: then it is refused too.
            sent = self.clock()

            def after_leader_round(index: int) -> None:
                age = max(0.0, self.clock() - sent)
                if age * 1000 > max_staleness_ms:
                    if self.observer is not None:
                        self.observer.refused(level)
                    done(None, errors.StaleReplica(
                        f"node {self.host.node_id}: the read-index round took {age * 1000:.0f} ms, longer than "
                        f"the {max_staleness_ms} ms bound"
                    ))
                    return
                served(ReadPoint(index, age, level))

            lead(_on_index(done, after_leader_round))
        elif idle or s is None:
            # Not probing this group lately: one read-index round gives fresh evidence (and
            # refuses at once if the replica is cut off from the leader).
            def after_round(_index: int) -> None:
                s2 = self.staleness(group)
                if s2 is None or s2 * 1000 > max_staleness_ms:
                    done(None, errors.StaleReplica(
                        f"node {self.host.node_id} cannot show it is within {max_staleness_ms} ms of the leader"
                    ))
                    return
                served(ReadPoint(store.applied_index(group), s2, level))

            self._replica_round(group, _on_index(done, after_round))
        else:
            if self.observer is not None:
                self.observer.refused(level)
            known = "no evidence yet" if s is None else f"it may be {s * 1000:.0f} ms behind"
            raise errors.StaleReplica(
                f"node {self.host.node_id} cannot show it is within {max_staleness_ms} ms of the leader "
                f"({known}); read elsewhere"
            )

    def _replica_round(self, group: int, callback: ReadCallback) -> None:
        try:
            self.replica_read(group, callback)
        except errors.StaleReplica:
            if self.observer is not None:
                self.observer.refused(LINEARIZABLE)
            raise


def _on_index(done: PointCallback, then: Callable[[int], None]) -> ReadCallback:
    """A `ReadCallback` that hands a failure to `done` and an applied index to `then`."""

    def cb(applied: int, err: errors.KVError | None) -> None:
        if err is not None:
            done(None, err)
        else:
            then(applied)

    return cb


def _ignore(_applied: int, _err: errors.KVError | None) -> None:
    pass
