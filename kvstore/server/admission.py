"""Admission control, the asyncio side: rate limits per identity, load shedding and the space quota.

The decisions are synchronous logic in `kvstore/node/` (`ratelimit.RateLimiter`,
`shedding.LoadShedder`, `alarms.QuotaWatch` / `AlarmTracker`); this module only feeds them numbers
(the clock, the process's resident memory, the store's live bytes) and turns their answers into
gRPC refusals:

- **rate limit** (`--rate-limit`): every client RPC costs 1 token of its caller's bucket
  (`identity.rpc_identity`), every operation of a `KV.Stream` batch 1 (a batch of N costs N: the
  first ones the bucket covers run, the rest are refused). A refused unary or server-streaming
  RPC ends with status RESOURCE_EXHAUSTED and trailing metadata `retry-after-ms`; a refused stream
  operation gets a RESOURCE_EXHAUSTED error with `retry_after_ms` in its own result (the stream
  goes on). Internal RPCs between nodes (`Raft.*`, `Shard.GroupPropose`, `Shard.ExportRange`)
  and health checks are never limited: a client's load must not starve the cluster's own traffic.
- **load shedding** (`--max-apply-lag`, `--memory-limit`): `check_write` refuses a put, delete or
  CAS before it is proposed (RESOURCE_EXHAUSTED, definite, retry-after); reads are served.
- **space quota** (`--quota-bytes`): `run` measures the store every `quota_interval` seconds and
  raises this node's NOSPACE alarm in the metadata group when it is over; while any node's NOSPACE
  is raised, `check_write` refuses puts and CAS (NOSPACE, definite) on every node; deletes and
  reads are served. `disarm` clears alarms (see `kvstore/node/alarms.py` for why it is manual).

With no limit configured the cost on a write is one attribute test (`check_write`'s first line)
and no interceptor is installed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvstore import errors
from kvstore.node.alarms import (
    ALARMS_KEY,
    Alarm,
    AlarmTracker,
    AlarmType,
    QuotaWatch,
    with_alarm,
    without_alarms,
)
from kvstore.node.host import Host
from kvstore.node.ratelimit import RateLimit, RateLimiter
from kvstore.node.shedding import LoadShedder, ShedSettings
from kvstore.storage import commands

from .identity import rpc_identity

log = logging.getLogger("kvstore.admission")

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a rate-limited RPC: milliseconds to wait before retrying."""

UNLIMITED_METHODS = frozenset({
    "/kvstore.v1.Raft/Send", "/kvstore.v1.Raft/SendSnapshot",
    "/kvstore.v1.Shard/GroupPropose", "/kvstore.v1.Shard/ExportRange",
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
})
"""Methods no rate limit applies to: traffic between nodes, and health checks."""


@dataclass(slots=True)
class AdmissionSettings:
    """Admission control flags (all off by default)."""

    rate_limit: RateLimit | None = None
    shed: ShedSettings = field(default_factory=ShedSettings)
    quota_bytes: int = 0
    """Space quota of this node's store (live bytes); 0: none."""
    max_streams_per_connection: int = 0
    """HTTP/2 MAX_CONCURRENT_STREAMS the server advertises (0: gRPC's default, unlimited)."""
    idle_timeout: float = 0.0
    """Seconds after which a connection with no RPC in flight is closed (GOAWAY); 0: never."""
    max_ping_strikes: int = 0
    """Keepalive enforcement: a connection that pings more often than every 5 s without data is
    closed (GOAWAY too_many_pings) after this many such pings; 0: never (gRPC's "unlimited")."""
    sample_interval: float = 0.5
    """How often the memory and the store's size are measured, in seconds."""

    def validate(self) -> None:
        self.shed.validate()
        if self.quota_bytes < 0:
            raise ValueError("--quota-bytes must be >= 0")
        if self.max_streams_per_connection < 0:
            raise ValueError("--max-streams-per-connection must be >= 0")
        if self.idle_timeout < 0:
            raise ValueError("--idle-timeout must be >= 0")
        if self.max_ping_strikes < 0:
            raise ValueError("--max-ping-strikes must be >= 0")
        if self.sample_interval <= 0:
            raise ValueError("the sample interval must be > 0")

    def server_options(self, base: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """`base` (the node's channel options) with the connection limits set over it: each key
        once (gRPC does not say which of two equal keys wins)."""
        out = dict(base)
        if self.max_streams_per_connection:
            out["grpc.max_concurrent_streams"] = self.max_streams_per_connection
        if self.idle_timeout:
            out["grpc.max_connection_idle_ms"] = max(1, int(self.idle_timeout * 1000))
        if self.max_ping_strikes:
            out["grpc.http2.max_ping_strikes"] = self.max_ping_strikes
        return list(out.items())


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm; elsewhere the peak)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Admission:
    """A node's admission control (see the module docstring)."""

    def __init__(
        self,
        node_id: int,
        settings: AdmissionSettings,
        host: Host,
        alarms: AlarmTracker,
        propose_meta: Callable[[bytes], Awaitable[commands.ApplyResult]] | None = None,
        live_bytes: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory: Callable[[], int] = resident_bytes,
    ) -> None:
        self.node_id = node_id
        self.settings = settings
        self.host = host
        self.alarms = alarms
        self.clock = clock
        self.memory = memory
        self.propose_meta = propose_meta
        """Runs a command at the metadata group's leader (the node's `GroupCaller`)."""
        self.live_bytes = live_bytes
        self.limiter = RateLimiter(settings.rate_limit) if settings.rate_limit is not None else None
        self.shedder = LoadShedder(settings.shed) if settings.shed.enabled else None
        self.quota = QuotaWatch(node_id, settings.quota_bytes)
        self.refused: dict[str, int] = {"rate_limit": 0, "nospace": 0}
        self.on_refused: Callable[[str], None] | None = None
        """Counts a refusal by reason (the node's Prometheus counter)."""

    # --- per request ------------------------------------------------------------------------
    def _count(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    def check_write(self, gid: int, delete: bool) -> None:
        """Raise the definite refusal of a new write to `gid`, if any (before it is proposed)."""
        if self.alarms.nospace and not delete:
            self.refused["nospace"] += 1
            self._count("nospace")
            raise errors.NoSpace(
                "the cluster's space quota alarm is raised (NOSPACE): puts and compare-and-swaps are refused; "
                "delete keys, compact (`kvctl snapshot`), then `kvctl alarm disarm`"
            )
        if self.shedder is not None:
            g = self.host.groups.get(gid)
            if g is not None:
                refusal = self.shedder.write_refusal(g.core.committed, g.core.applied)
                if refusal is not None:
                    why, after = refusal
                    self._count("memory" if self.shedder.memory_shedding else "apply_lag")
                    raise errors.ResourceExhausted(f"node {self.node_id} sheds writes: {why}", retry_after=after)

    def admit(self, identity: str, n: int) -> tuple[int, float]:
        """Rate limit: how many of `n` operations of `identity` may run now, and the retry-after
        (seconds) for the rest."""
        if self.limiter is None:
            return n, 0.0
        k, after = self.limiter.admit(identity, n, self.clock())
        if k < n:
            self.refused["rate_limit"] += n - k
            self._count("rate_limit")
        return k, after

    def interceptor(self) -> grpc.aio.ServerInterceptor | None:
        """The server interceptor that rate-limits unary and server-streaming client RPCs (None
        without a rate limit). `KV.Stream` is limited per operation by the stream itself."""
        return _RateLimitInterceptor(self) if self.limiter is not None else None

    # --- alarms -----------------------------------------------------------------------------
    async def _cas_alarms(self, change: Callable[[frozenset[Alarm]], bytes]) -> frozenset[Alarm]:
        """Compare-and-swap the alarm set at the metadata leader, retrying on a lost race with
        the set as this node last applied it."""
        if self.propose_meta is None:
            raise errors.InternalError("this node cannot change alarms", indeterminate=False)
        for _ in range(20):
            self.alarms.refresh()
            raw = self.alarms.raw
            new = change(self.alarms.alarms)
            if raw is not None and new == raw:
                return self.alarms.alarms
            res = await self.propose_meta(commands.encode_cas(ALARMS_KEY, raw is None, raw or b"", new))
            if res.swapped:
                return await self._wait_applied(new)
            await asyncio.sleep(0.05)  # someone else changed the set: read it again
        raise errors.Timeout("the alarm set kept changing under this request", indeterminate=True)

    async def _wait_applied(self, raw: bytes, timeout: float = 5.0) -> frozenset[Alarm]:
        """Wait (bounded) until this node applied the set it wrote, so the caller sees it."""
        end = self.clock() + timeout
        while self.alarms.raw != raw and self.clock() < end:
            await asyncio.sleep(0.01)
            self.alarms.refresh()
        return self.alarms.alarms

    async def disarm(self, node: int = 0, kind: AlarmType | None = None) -> frozenset[Alarm]:
        """Clear the matching alarms cluster-wide; the alarms still raised after."""
        alarms = await self._cas_alarms(lambda a: without_alarms(a, node, kind))
        log.warning("alarms disarmed (node %s, type %s); now: %s", node or "any",
                    kind.name if kind is not None else "any", sorted(alarms) or "none")
        return alarms

    async def raise_nospace(self) -> None:
        alarm = Alarm(self.node_id, AlarmType.NOSPACE)
        log.error("node %d: store uses %d bytes, over its quota of %d: raising the NOSPACE alarm "
                  "(writes other than deletes are refused cluster-wide)", self.node_id, self.quota.used,
                  self.quota.quota)
        await self._cas_alarms(lambda a: with_alarm(a, alarm))

    # --- the sampling loop ------------------------------------------------------------------
    async def run(self) -> None:
        """Measure memory and the store's size every `sample_interval` seconds (only what is
        configured) and act on it. Runs until cancelled; a failed alarm proposal is retried at
        the next sample."""
        if self.shedder is None and self.settings.quota_bytes <= 0:
            await asyncio.get_running_loop().create_future()  # nothing to measure: idle until cancelled
        shedder = self.shedder
        while True:
            now = self.clock()
            if shedder is not None and shedder.settings.memory_limit > 0:
                was = shedder.memory_shedding
                shedder.observe_memory(self.memory(), now)
                if shedder.memory_shedding != was:
                    log.warning("node %d: %s shedding writes (resident memory %d MiB, limit %d MiB)", self.node_id,
                                "started" if shedder.memory_shedding else "stopped", shedder.memory >> 20,
                                shedder.settings.memory_limit >> 20)
            if self.settings.quota_bytes > 0 and self.live_bytes is not None:
                self.alarms.refresh()
                if self.quota.should_raise(self.live_bytes(), self.alarms.alarms, now):
                    try:
                        await self.raise_nospace()
                    except errors.KVError as err:
                        log.warning("raising the NOSPACE alarm failed, retrying: %s", err)
            await asyncio.sleep(self.settings.sample_interval)


class _RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary-request handlers of client RPCs with the rate limit (see `Admission`)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method in UNLIMITED_METHODS or handler.request_streaming:
            return handler
        admission = self.admission
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await _limit(admission, context)
                return await inner(request, context)

            return handler._replace(unary_unary=unary)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await _limit(admission, context)
                async for r in inner_stream(request, context):
                    yield r

            return handler._replace(unary_stream=unary_stream)
        return handler


async def _limit(admission: Admission, context: grpc.aio.ServicerContext) -> None:
    """Abort the call with RESOURCE_EXHAUSTED and `retry-after-ms` if its caller is over its rate."""
    k, after = admission.admit(rpc_identity(context), 1)
    if k == 0:
        ms = errors.retry_after_ms(after)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"rate limit exceeded: retry after {ms} ms (definite: the operation was not applied)",
            trailing_metadata=((RETRY_AFTER_KEY, str(ms)),),
        )
