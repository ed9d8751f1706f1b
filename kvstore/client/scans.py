"""Scans across groups: each data group is asked (concurrently) for its part, and the parts are
merged in key order.

Invariants:
- the parts' owned hash ranges, reported by each group at its read point, must cover the hash
  space exactly once; otherwise a range moved between the read points and the scan starts again
  with a fresh shard map (so no key is missed or returned twice);
- a linearizable scan across groups is ONE consistent snapshot (docs/REVISIONS.md, "Reads at a
  revision"): phase 1 opens every part linearizably and learns the revision r_g each group served
  it at; R = max r_g; phase 2 re-reads at R every part with r_g < R (its group closes itself at R
  first, so the answer is final). Every write acknowledged before the scan started is <= its
  group's r_g <= R, and the parts are exactly the state after the writes <= R: linearizable
  and atomic. A scan at a given revision R is that snapshot at R. Bounded and stale scans
  stay per part (each as consistent as its level at its own read point); one group needs no
  second phase; if the re-read parts' ranges no longer cover the hash space once (a range
  moved between the phases), the scan starts again with a fresh map;
- a part whose stream breaks is resumed after the last key received, and only if its group
  still owns the same ranges (otherwise the scan fails with a definite Unavailable);
- at most ``limit`` pairs are returned (0: all); a small limit asks each part in one message on
  the operation stream (`ONE_MESSAGE_SCAN`).
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from kvstore.client.channels import Channels
from kvstore.client.checks import RequestChecks, check_bytes, check_revision
from kvstore.client.cluster_view import ClusterView
from kvstore.client.failures import classify, is_retryable
from kvstore.client.invoke import FREE_REDIRECTS, Invoker
from kvstore.client.retry import Backoff, Deadline, RetryPolicy
from kvstore.client.types import Consistency, KeyValue, ReadPreference
from kvstore.errors import InvalidArgument, KVError, Timeout, Unavailable, from_proto
from kvstore.keyspace import prefix_end
from kvstore.shard.ranges import IntervalSet, covers_once
from kvstore.storage.commands import U64_MAX
from kvstore.v1 import kv_pb2

__all__ = ["ONE_MESSAGE_SCAN", "Scans", "scan_range"]

#: A scan with a limit up to this asks each group for its part in one message on the node's
#: operation stream (no gRPC call per part; a node's chunks hold 512 pairs), falling back to a
#: `KV.Scan` stream for a part that does not fit.
ONE_MESSAGE_SCAN = 512


class Scans:
    """The scan path."""

    def __init__(
        self, checks: RequestChecks, channels: Channels, view: ClusterView, invoker: Invoker, policy: RetryPolicy,
        rng: random.Random,
    ) -> None:
        self.checks = checks
        self.channels = channels
        self.view = view
        self.router = view.router
        self.replicas = view.replicas
        self.invoker = invoker
        self.policy = policy
        self._rng = rng
        self.observe: Callable[[int], None] = lambda revision: None
        """Told the revision a linearizable scan was served at (across groups: R) (the client's
        causality floor)."""

    async def scan(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> AsyncIterator[tuple[bytes, bytes]]:
        """Stream ``(key, value)`` pairs in key order: keys starting with ``prefix`` and within
        ``[start, end)`` (both optional), at most ``limit`` (0 = all).

        Use as ``async for key, value in client.scan(b"user/"):``. Keys are spread over every
        data group by hashing, so the scan asks every group (concurrently) for its part and merges
        them. Each part is read at its group's leader (linearizable per group), and the parts must
        cover the hash space exactly once (otherwise a range was moving: the scan is retried with
        a fresh shard map). A linearizable scan is one consistent snapshot of every group (at
        the highest revision the groups served it at: a second round re-reads the groups that
        served it below that revision; see the module docstring); bounded and stale scans are
        consistent per group only. ``timeout`` bounds the whole scan, retries included.
        ``revision`` (> 0): the keys exactly as they were at that revision, in every group (a
        revision beyond what the cluster has issued is refused with
        :class:`~kvstore.errors.InvalidArgument`); below a group's compact revision the scan
        fails with :class:`~kvstore.errors.Compacted`.
        """
        async for chunk in self.scan_kvs(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference, revision=revision,
        ):
            for kv in chunk:
                yield kv.key, kv.value

    async def scan_chunks(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> AsyncGenerator[list[tuple[bytes, bytes]], None]:
        """Like :meth:`scan`, in lists of pairs."""
        async for chunk in self.scan_kvs(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference, revision=revision,
        ):
            yield [(kv.key, kv.value) for kv in chunk]

    async def scan_kvs(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> AsyncGenerator[list[KeyValue], None]:
        """Like :meth:`scan`, in lists of :class:`KeyValue` (with each key's metadata)."""
        prefix = check_bytes("prefix", prefix)
        revision = check_revision(revision)
        start = None if start is None else check_bytes("start", start)
        end = None if end is None else check_bytes("end", end)
        if not 0 <= limit <= U64_MAX:
            raise InvalidArgument(f"limit must be in 0..{U64_MAX}")
        opts = self.checks.read_options(consistency, max_staleness, read_preference, timeout)
        level, staleness_ms, pref, deadline = opts.level, opts.staleness_ms, opts.preference, opts.deadline
        lo, hi = scan_range(prefix, start, end)
        if hi is not None and lo >= hi:
            return
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
        learns_leader = opts.learns_leader and pref == "leader"
        while True:
            await self.view.ensure_map(deadline)
            groups = self.router.scan_groups()
            sharded = self.router.shard_map is not None
            parts = [
                _ScanPart(g, lo, hi, level, staleness_ms, pref, 0 < limit <= ONE_MESSAGE_SCAN, revision) for g in groups
            ]
            try:
                await asyncio.gather(*(self._scan_open(p, limit, level, deadline, learns_leader) for p in parts))
            except BaseException:
                for p in parts:
                    p.close()
                raise
            if _whole(parts, sharded):
                if revision or level != kv_pb2.LINEARIZABLE or len(parts) == 1:
                    if not revision and level == kv_pb2.LINEARIZABLE and parts:
                        self.observe(max(p.served for p in parts))  # one group: its read point's revision
                    break
                try:
                    await self._snapshot(parts, limit, level, deadline, learns_leader)
                except BaseException:
                    for p in parts:
                        p.close()
                    raise
                if _whole(parts, sharded):
                    break  # (else a range moved between the two phases: start again)
            for p in parts:
                p.close()
            # A range moved between the parts' read points: try again with a newer map.
            self.router.invalidate_shard_map()
            if deadline.expired:
                raise Timeout(f"scan did not get a consistent set of parts within {deadline.timeout:g}s "
                              "(ranges kept moving between groups, or no shard map yet)")
            await asyncio.sleep(deadline.bound(backoff.next_delay()))
        try:
            remaining = limit
            heap: list[tuple[bytes, int]] = []
            for i, p in enumerate(parts):
                if await self._scan_fill(p, limit, level, timeout, learns_leader):
                    heap.append((p.buf[0].key, i))
            heapq.heapify(heap)
            out: list[KeyValue] = []
            while heap:
                _, i = heapq.heappop(heap)
                p = parts[i]
                out.append(p.buf.popleft())
                if remaining:
                    remaining -= 1
                    if remaining == 0:
                        break
                if not p.buf and not p.done:
                    if out:  # hand over what we have before waiting for the network
                        yield out
                        out = []
                    await self._scan_fill(p, limit, level, timeout, learns_leader)
                if p.buf:
                    heapq.heappush(heap, (p.buf[0].key, i))
                if len(out) >= 512:
                    yield out
                    out = []
            if out:
                yield out
        finally:
            for p in parts:
                p.close()

    async def _snapshot(
        self, parts: list[_ScanPart], limit: int, level: kv_pb2.Consistency, deadline: Deadline, learns_leader: bool
    ) -> None:
        """Phase 2 of a linearizable scan across groups (module docstring): every part is read
        at R = the highest revision a part was served at; those served below R start again at
        R (their groups close at R first). A part resumed later asks for R too."""
        at = max(p.served for p in parts)
        if not at:
            return  # no group has written anything: every part is the (empty) state at 0
        behind = [p for p in parts if p.served < at]
        for p in parts:
            p.revision = at
        for p in behind:
            p.restart()
        await asyncio.gather(*(self._scan_open(p, limit, level, deadline, learns_leader) for p in behind))
        self.observe(at)

    async def _scan_open(
        self, part: _ScanPart, limit: int, level: kv_pb2.Consistency, deadline: Deadline, learns_leader: bool
    ) -> None:
        """Open ``part``'s stream at its group's leader (retrying as any read) and read its first
        message, which carries the hash ranges the group serves at its read point."""
        group = part.group
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
        attempts = redirects = 0
        last: KVError | None = None
        only_transport = True
        unreachable: dict[str, str] = {}
        while True:
            if deadline.expired:
                raise self.invoker.give_up("scan", deadline, attempts, last, None, only_transport, unreachable, None)
            target = None
            if part.pref != "leader":  # each eligible replica once, then the leader path
                await self.view.ensure_members(group, deadline)
                target = self.replicas.pick(group, part.pref, exclude=part.replicas_tried)
                if target is not None:
                    part.replicas_tried.append(target)
            if target is None:
                await self.view.maybe_discover(group, deadline)
                target = self.router.pick(group)
            if target is None:
                wait = max(0.01, self.router.next_retry_at() - time.monotonic())
                await asyncio.sleep(deadline.bound(max(wait, backoff.next_delay())))
                continue
            attempts += 1
            want = max(0, limit - part.received) if limit else 0
            req = kv_pb2.ScanRequest(
                start=part.lo, end=part.hi or b"", limit=want, consistency=level, group=group,
                max_staleness_ms=part.staleness_ms, revision=part.revision,
            )
            # A small part is asked for in one message on the node's operation stream; others
            # get a KV.Scan stream, with no gRPC deadline: every message must arrive within the
            # attempt timeout and the deadline instead.
            stream = None if part.one_message else self.channels.kv(target).Scan(req)
            err: KVError
            retryable = True
            try:
                wait = deadline.bound(self.policy.attempt_timeout)
                try:
                    if stream is None:
                        resp = await self.channels.mux(target).call("scan", req, wait if wait > 0 else 0.001)
                    else:  # (asyncio.timeout, not wait_for: wait_for can lose a cancel to a read that completed)
                        async with asyncio.timeout(wait if wait > 0 else 0.001):
                            resp = await stream.read()
                except TimeoutError:
                    err = Timeout(f"{target} did not answer in time")
                    self.router.on_transport_failure(group, target, "timed out")
                    unreachable[target] = "timed out"
                else:
                    if resp is grpc.aio.EOF:
                        err = Unavailable(f"{target} ended the scan stream early")
                    elif (maybe := from_proto(resp.error, is_write=False)) is not None:
                        err = maybe
                        only_transport = False
                        retryable = is_retryable(err)
                        self.router.on_reply(target)
                    elif stream is None and resp.more:
                        part.one_message = False  # it does not fit in one message: stream it
                        continue
                    else:
                        self._scan_reply(group, target, learns_leader)
                        if target in part.replicas_tried:
                            self.replicas.record_served(target)
                        owned = IntervalSet(zip(resp.owned_lo, resp.owned_hi, strict=True))
                        if part.owned is not None and owned != part.owned:
                            if stream is not None:
                                stream.cancel()
                            raise Unavailable(
                                f"scan interrupted: group {group}'s ranges changed while it was resumed; retry the scan"
                            )
                        part.owned = owned
                        part.stream, part.target = stream, target
                        part.served = resp.revision
                        part.take(resp)
                        return
            except grpc.aio.AioRpcError as e:
                if stream is None and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    part.one_message = False  # a node that cannot scan on its operation stream
                    continue
                failure = classify(e, endpoint=target, is_write=False)
                err = failure.error
                retryable = failure.retryable
                if failure.transport:
                    self.router.on_transport_failure(group, target, failure.reason)
                    unreachable[target] = failure.reason
                else:
                    only_transport = False
                    self.router.on_reply(target)
            if stream is not None:
                stream.cancel()
            last = err
            if not retryable:
                raise err
            if self.invoker.reroute(group, target, err) and redirects < FREE_REDIRECTS:
                redirects += 1
                continue
            redirects = 0
            await asyncio.sleep(deadline.bound(backoff.next_delay()))

    async def _scan_fill(
        self, part: _ScanPart, limit: int, level: kv_pb2.Consistency, timeout: float | None, learns_leader: bool
    ) -> bool:
        """Read until ``part`` has buffered items or is done; a broken stream is resumed after
        the last key received. True if items are buffered."""
        while not part.buf and not part.done:
            deadline = self.checks.deadline(timeout)  # each chunk gets a fresh deadline
            if part.stream is None:
                await self._scan_open(part, limit, level, deadline, learns_leader)
                continue
            target = part.target
            try:
                wait = deadline.bound(self.policy.attempt_timeout)
                async with asyncio.timeout(wait if wait > 0 else 0.001):  # (a cancel is never lost to the read)
                    resp = await part.stream.read()
            except TimeoutError:
                self.router.on_transport_failure(part.group, target, "timed out")
                part.close()
                continue
            except grpc.aio.AioRpcError as e:
                failure = classify(e, endpoint=target, is_write=False)
                if failure.transport:
                    self.router.on_transport_failure(part.group, target, failure.reason)
                if not failure.retryable:
                    raise failure.error from None
                part.close()
                continue
            if resp is grpc.aio.EOF:
                part.close()
                continue
            maybe = from_proto(resp.error, is_write=False)
            if maybe is not None:
                part.close()
                if not is_retryable(maybe):
                    raise maybe
                self.invoker.reroute(part.group, target, maybe)
                continue
            part.take(resp)
        return bool(part.buf)

    def _scan_reply(self, group: int, target: str, learns_leader: bool) -> None:
        if learns_leader:
            self.router.on_success(group, target)
        else:
            self.router.on_reply(target)


class _ScanPart:
    """One group's stream of a fanned-out scan."""

    __slots__ = (
        "buf", "done", "first_lo", "first_one_message", "group", "hi", "level", "lo", "one_message", "owned", "pref",
        "received", "replicas_tried", "revision", "served", "staleness_ms", "stream", "target",
    )

    def __init__(
        self, group: int, lo: bytes, hi: bytes | None, level: kv_pb2.Consistency, staleness_ms: int, pref: str,
        one_message: bool = False, revision: int = 0,
    ) -> None:
        self.group = group
        self.revision = revision
        """Scan at this revision (0: now); a resumed stream asks for the same one."""
        self.one_message = one_message
        """Ask for the part in one message on the operation stream (until it turns out not to fit)."""
        self.level = level
        self.staleness_ms = staleness_ms
        self.pref = pref
        self.replicas_tried: list[str] = []
        self.lo = lo  # where to resume: after the last key received
        self.first_lo = lo
        self.first_one_message = one_message
        self.served = 0
        """The revision the part was served at (its first message's)."""
        self.hi = hi
        self.owned: IntervalSet | None = None
        self.buf: deque[KeyValue] = deque()
        self.done = False
        self.received = 0
        self.stream: Any = None
        self.target = ""

    def take(self, resp: kv_pb2.ScanResponse) -> None:
        items = [KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in resp.items]
        if items:
            self.buf.extend(items)
            self.received += len(items)
            self.lo = items[-1].key + b"\x00"
        if not resp.more:
            self.done = True
            self.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None

    def restart(self) -> None:
        """Drop what was received: the part is read again from its start (at `revision`), its
        served ranges too (the scan checks they still cover the hash space once)."""
        self.close()
        self.owned = None
        self.buf.clear()
        self.done = False
        self.received = 0
        self.lo = self.first_lo
        self.one_message = self.first_one_message


def _whole(parts: list[_ScanPart], sharded: bool) -> bool:
    """The parts are the whole keyspace: their owned ranges cover the hash space exactly once.
    Without a shard map (a server that offers none, or a new cluster whose metadata group has not
    applied its map yet) the one part must still own everything, or report no ranges at all
    (a server without sharding): a part of a sharded cluster is not taken for the whole."""
    owned = [p.owned or IntervalSet() for p in parts]
    if not sharded and not any(owned):
        return True
    return covers_once(owned)


def scan_range(prefix: bytes, start: bytes | None, end: bytes | None) -> tuple[bytes, bytes | None]:
    """Combine a prefix and optional ``[start, end)`` bounds into one range (end None = open)."""
    lo = max(start or b"", prefix)
    hi = end or None
    if prefix:
        pend = prefix_end(prefix)
        if pend is not None and (hi is None or pend < hi):
            hi = pend
    return lo, hi
