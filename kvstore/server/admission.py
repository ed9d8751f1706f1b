"""Admission control, the asyncio side: rate limits per identity, load shedding and the space quota.

The decisions are synchronous logic in `kvstore/node/` (`ratelimit.RateLimiter`,
`shedding.LoadShedder`, `alarms.QuotaWatch` / `AlarmTracker`); this module only feeds them numbers
(the clock, the process's resident memory, the store's live bytes) and turns their answers into
gRPC refusals:

- **rate limit** (`--rate-limit`): every client RPC costs 1 token of its caller's bucket, every
  operation of a `KV.Stream` batch 1 (a batch of N costs N: the first ones the bucket covers run,
  the rest are refused). The bucket is keyed by the principal the auth guard established
  (`rate_key`): `user:<name>` for a user (by token or by client certificate: the same bucket on
  every connection), `ip:<address>` for an anonymous caller (auth off, no certificate). The limit
  runs after the guard, in the guarded handler (`server/wire.py`, `admit_call`), so a token's
  user is known. A refused unary or server-streaming RPC ends with status RESOURCE_EXHAUSTED and
  trailing metadata `retry-after-ms`; a refused stream operation gets a RESOURCE_EXHAUSTED error
  with `retry_after_ms` in its own result (the stream goes on). Internal RPCs between nodes
  (`Raft.*`, `Shard.GroupPropose`, `Shard.ExportRange`), health checks, and any call made by a
  node (its node certificate) are never limited: a client's load must not starve the cluster's
  own traffic.
- **load shedding** (`--max-apply-lag`, `--memory-limit`): `check_write` refuses a put, delete or
  CAS before it is proposed (RESOURCE_EXHAUSTED, definite, retry-after); reads are served.
- **space quota** (`--quota-bytes`): `run` measures the store every `quota_interval` seconds and
  raises this node's NOSPACE alarm in the metadata group when it is over; while any node's NOSPACE
  is raised, `check_write` refuses puts and CAS (NOSPACE, definite) on every node; deletes and
  reads are served. `disarm` clears alarms (see `kvstore/node/alarms.py` for why it is manual).

With no limit configured the cost on a write is one attribute test (`check_write`'s first line)
and no call is wrapped with the rate limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

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
from kvstore.node.ratelimit import RateLimiter
from kvstore.node.shedding import LoadShedder
from kvstore.security.identity import Principal, PrincipalKind
from kvstore.storage import commands

from .admission_settings import AdmissionSettings

log = logging.getLogger("kvstore.admission")

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a rate-limited RPC: milliseconds to wait before retrying."""

UNLIMITED_METHODS = frozenset({
    "/kvstore.v1.Raft/Send", "/kvstore.v1.Raft/SendSnapshot",
    "/kvstore.v1.Shard/GroupPropose", "/kvstore.v1.Shard/ExportRange",
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List",
})
"""Methods no rate limit applies to: traffic between nodes, and health checks."""
UNLIMITED_SERVICES = ("/grpc.health.v1.Health/",)
"""Services none of whose methods is rate-limited (health checks, whatever methods they gain)."""


def peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` -> `ip:127.0.0.1`; `ipv6:[::1]:5000` -> `ip:::1`; else `peer:<peer>`
    (without the port: more connections from one host do not buy more rate)."""
    kind, sep, rest = peer.partition(":")
    if sep and kind in ("ipv4", "ipv6"):
        host = unquote(rest).rpartition(":")[0] or rest
        return "ip:" + host.strip("[]")
    return "peer:" + peer


def rate_key(p: Principal, context: Any = None) -> str | None:
    """The rate-limit bucket of principal `p` (as the auth guard established it): `user:<name>`
    for a user, by token or by certificate; None for a node (never limited); for an anonymous
    caller (auth off, no certificate) its address without the port, `ip:<address>` (from
    `p.peer`, else from `context.peer()`)."""
    if p.kind is PrincipalKind.USER:
        return "user:" + p.name
    if p.kind is PrincipalKind.NODE:
        return None
    peer = p.peer
    if not peer and context is not None:
        try:
            peer = str(context.peer() or "")
        except Exception:  # a context without a transport
            peer = ""
    return peer_host(peer)


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
                "delete keys, compact their history (`kvctl compact REV`) and the log (`kvctl raft-snapshot`), "
                "then `kvctl alarm disarm`"
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

    def call_limit(self) -> Admission | None:
        """This node's call limit for `wire.add_services` (None without a rate limit)."""
        return self if self.limiter is not None else None

    def limits(self, path: str) -> bool:
        """Whether calls of method `path` cost a token (not node traffic, not health checks)."""
        return path not in UNLIMITED_METHODS and not path.startswith(UNLIMITED_SERVICES)

    async def admit_call(self, p: Principal, context: grpc.aio.ServicerContext) -> None:
        """Abort the call with RESOURCE_EXHAUSTED (definite) and `retry-after-ms` if its caller,
        principal `p`, is over its rate."""
        key = rate_key(p, context)
        if key is None:
            return
        k, after = self.admit(key, 1)
        if k == 0:
            ms = errors.retry_after_ms(after)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit exceeded: retry after {ms} ms (definite: the operation was not applied)",
                trailing_metadata=((RETRY_AFTER_KEY, str(ms)),),
            )

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
