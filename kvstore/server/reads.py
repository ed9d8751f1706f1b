"""Replica reads for the asyncio server: a thin adapter over `kvstore.node.reads`.

The logic (read points at every consistency level on leaders and replicas, staleness evidence
from probes and why ``now - t`` bounds staleness, refusals with STALE_REPLICA, tick-based expiry)
is synchronous node logic in `kvstore.node.reads.NodeReads`, which the deterministic simulator
runs as is. This module only:
- hands it the process's clock (`time.monotonic`) and a randomly seeded rng (the context nonce);
- turns its callbacks into awaitables for the KV service (`read_point`), with the request
  timeout (a definite TIMEOUT: reads never have effects);
- counts what it reports in Prometheus (`ReadMetrics`) and keeps the per-group gauges.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvstore import errors
from kvstore.node.host import Host, ReadCallback
from kvstore.node.reads import (
    BOUNDED,
    LINEARIZABLE,
    STALE,
    Clock,
    NodeReads,
    ReadPoint,
    ReadSettings,
    _Freshness,
    _Pending,
)
from kvstore.raft import Role
from kvstore.v1 import kv_pb2

__all__ = [
    "BOUNDED", "LINEARIZABLE", "STALE", "ReadMetrics", "ReadPoint", "ReadSettings", "ReplicaReads", "level_name",
]

_LEVELS: dict[int, str] = {kv_pb2.LINEARIZABLE: LINEARIZABLE, kv_pb2.STALE: STALE, kv_pb2.BOUNDED: BOUNDED}


def level_name(consistency: int) -> str:
    try:
        return _LEVELS[consistency]
    except KeyError:
        raise errors.InvalidArgument(f"unknown consistency level {consistency}") from None


@dataclass
class ReadMetrics:
    """Read-replica metrics, registered in the node's registry; the `ReadObserver` of the node's
    `NodeReads`."""

    registry: CollectorRegistry
    reads: Counter = field(init=False)
    refused_total: Counter = field(init=False)
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
        self.refused_total = Counter(
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

    # --- ReadObserver ---------------------------------------------------------------------------
    def served(self, level: str, role: str) -> None:
        self.reads.labels(level, role).inc()

    def refused(self, level: str) -> None:
        self.refused_total.labels(level).inc()

    def round_trip(self, kind: str, seconds: float) -> None:
        self.read_index_seconds.labels(kind).observe(seconds)


class ReplicaReads:
    """`NodeReads` for the asyncio server (same calls, plus the awaitable `read_point`)."""

    def __init__(
        self,
        host: Host,
        settings: ReadSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        metrics: ReadMetrics | None = None,
        request_timeout: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.logic = NodeReads(host, settings, clock=clock, rng=rng or random.Random(), observer=metrics)
        self.host = host
        self.metrics = metrics
        self.request_timeout = request_timeout
        self._gauge_seen: dict[int, tuple[object, ...]] = {}

    @property
    def settings(self) -> ReadSettings:
        return self.logic.settings

    @property
    def _fresh(self) -> dict[int, _Freshness]:
        return self.logic._fresh

    @property
    def _pending(self) -> dict[bytes, _Pending]:
        return self.logic._pending

    def staleness(self, group: int) -> float | None:
        return self.logic.staleness(group)

    def leader_contact_seconds(self, group: int) -> float | None:
        return self.logic.leader_contact_seconds(group)

    def replica_read(self, group: int, callback: ReadCallback) -> None:
        self.logic.replica_read(group, callback)

    def tick(self) -> bool:
        return self.logic.tick()

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
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ReadPoint] = loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        tasks: list[asyncio.Future[int]] = []

        def done(point: ReadPoint | None, err: errors.KVError | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                assert point is not None
                fut.set_result(point)

        def leader(callback: ReadCallback) -> None:
            task = asyncio.ensure_future(leader_read())
            tasks.append(task)

            def finished(t: asyncio.Future[int]) -> None:
                if t.cancelled():
                    return
                exc = t.exception()
                if isinstance(exc, errors.KVError):
                    callback(0, exc)
                elif exc is not None:
                    if not fut.done():
                        fut.set_exception(exc)  # a bug: this read fails loudly
                else:
                    callback(t.result(), None)

            task.add_done_callback(finished)

        self.logic.read(group, level, max_staleness_ms, done, leader)
        if fut.done():
            return fut.result()
        wake()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.request_timeout)
        except TimeoutError:
            raise errors.Timeout(
                f"read not confirmed within {self.request_timeout:g}s", indeterminate=False
            ) from None
        finally:
            for t in tasks:
                t.cancel()

    # --- introspection ------------------------------------------------------------------------
    def update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        seen = self._gauge_seen
        for gid, g in self.host.groups.items():
            core = g.core
            s = self.staleness(gid)
            key: tuple[Any, ...] = (s, core.committed, core.applied, core.role, core.quiesced)
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
