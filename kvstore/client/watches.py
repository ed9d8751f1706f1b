"""Watch on the client: a change feed that resumes by itself (`KV.Watch`).

Semantics the caller can rely on (README, "Watch"):
- events come in revision order, each exactly once, from ``start_revision`` on (0: from the
  moment the watch is created: every change from the revision the server names then);
- the feed survives a broken stream, a node crash or restart, a leader change, a range move and
  a server-side cancel with a resume revision: the client opens a new watch at another (or the
  same) node from the revision after the last response it received (a response's ``revision``
  covers every event at or below it), so nothing is missed or repeated;
- a watch whose start revision (or position, after a long outage) is compacted raises
  :class:`~kvstore.errors.Compacted` naming the compact revision (definite); an error that
  retrying cannot fix (permission, invalid request) is raised as it is (definite);
- a node that answers nothing (not even the progress responses the client always asks for,
  one a second when quiet) for ``idle_timeout`` seconds is left for another one.

A node serves a watch of the groups it hosts. The client picks a live node that hosts every
group of the range (a watch of one key: its group; any other range: every data group) from its
shard map; when none does (say 5 nodes with 3 replicas), it covers the groups with few nodes
(`watchmerge.cover`), opens one sub-watch of its groups at each (`WatchCreateRequest.groups`,
each its own stream) and merges them (`watchmerge.Merge`: revision order, whole revisions, the
lowest of the subs' revisions as the merged one; progress requests at a revision to the subs an
event waits on). Any end of a sub restarts the whole merged watch from its last delivered
revision + 1 with a fresh cover, so the contract above holds for merged watches too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio

from kvstore import errors
from kvstore.client.channels import Channels
from kvstore.client.checks import INT64_MAX, RequestChecks, check_bytes
from kvstore.client.cluster_view import ClusterView
from kvstore.client.failures import classify
from kvstore.client.retry import Backoff, Deadline, RetryPolicy
from kvstore.client.types import KeyValue
from kvstore.client.watchmerge import cover
from kvstore.client.watchrun import CATCH_UP, RESUMABLE, merged_watch
from kvstore.v1 import kv_pb2

__all__ = ["WatchBatch", "WatchEvent", "Watches"]

IDLE_TIMEOUT = 8.0
"""Seconds without any response (events, progress) before the client moves the watch elsewhere."""

MAX_QUEUED = 10_000
"""Events a sub-watch of a merged watch may hold ahead of the others before it is read no more."""

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change: ``type`` "PUT" (``value`` and the key's metadata after it) or "DELETE"
    (``value`` None; ``mod_revision`` is the delete's revision). ``prev`` is the key's version
    before it (with ``prev_kv``; None if the key was absent or that version is compacted)."""

    type: str
    key: bytes
    value: bytes | None
    create_revision: int
    mod_revision: int
    version: int
    prev: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.mod_revision


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One response: its events (all of a revision together) and ``revision``: every event at or
    below it has been delivered. ``progress``: a progress response (no events)."""

    revision: int
    events: tuple[WatchEvent, ...]
    progress: bool = False
    node_id: int = 0
    """The node that served it."""


def _event(e: kv_pb2.Event) -> WatchEvent:
    kv = e.kv
    prev = None
    if e.HasField("prev_kv"):
        p = e.prev_kv
        prev = KeyValue(p.key, p.value, p.create_revision, p.mod_revision, p.version)
    if e.type == kv_pb2.Event.DELETE:
        return WatchEvent("DELETE", kv.key, None, 0, kv.mod_revision, 0, prev)
    return WatchEvent("PUT", kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, prev)


class Watches:
    """The watch path of `AsyncClient`."""

    def __init__(self, checks: RequestChecks, channels: Channels, view: ClusterView, policy: RetryPolicy,
                 rng: random.Random) -> None:
        self.checks = checks
        self.channels = channels
        self.view = view
        self.router = view.router
        self.policy = policy
        self._rng = rng
        self.idle_timeout = IDLE_TIMEOUT
        self.max_queued = MAX_QUEUED
        self.resumes = 0
        self.breaches = 0
        """How many times a sub-watch of a merged watch broke the watch contract (events out of
        order, a revision going back, an answer before its created reply): the merged watch
        restarts from its last delivered revision, so nothing wrong reaches the caller, but the
        server misbehaved; a harness (kvchaos) counts these as violations."""
        """How many times a watch of this client was resumed (new stream) after it had started."""

    async def watch_batches(
        self,
        key: bytes = b"",
        *,
        prefix: bytes = b"",
        range_end: bytes = b"",
        start_revision: int = 0,
        prev_kv: bool = False,
        progress: bool = False,
    ) -> AsyncIterator[WatchBatch]:
        """The responses of a watch of ``key`` (with ``range_end``: [key, range_end); ``b"\\0"``:
        every key >= key) or of ``prefix``, from ``start_revision`` (0: now), resumed across
        failures (see the module docstring). With ``progress``, progress responses too."""
        key = check_bytes("key", key)
        prefix = check_bytes("prefix", prefix)
        range_end = check_bytes("range_end", range_end)
        limit = self.checks.max_key_size
        if max(len(key), len(prefix), len(range_end)) > limit:
            raise errors.KeyTooLarge(message=f"a watch's key, prefix and range end are at most {limit} bytes")
        if not 0 <= start_revision <= INT64_MAX:
            raise errors.InvalidArgument(f"start revision {start_revision} is not in [0, 2^63)")
        if not key and not prefix and not range_end:
            raise errors.InvalidArgument("a watch needs a key, a range or a prefix")
        single = not prefix and not range_end
        cur = _Cursor(start_revision)
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
        tried: list[str] = []
        while True:
            plan, version = await self._plan(key if single else None, tried)
            create = kv_pb2.WatchCreateRequest(
                key=key, range_end=range_end, prefix=prefix, start_revision=cur.next_rev, prev_kv=prev_kv,
                progress_notify=True, watch_id=1, shard_version=version if len(plan) > 1 else 0,
            )
            if cur.started:
                self.resumes += 1
            attempt = self._one(plan[0][0], create, cur) if len(plan) == 1 else self._merged(plan, create, cur)
            log.debug("watch from revision %d (0: now) at %s", cur.next_rev,
                      ", ".join(f"{ep} groups {list(gs) or 'all'}" for ep, gs in plan))
            failed: str | None = None
            try:
                async with contextlib.aclosing(attempt) as batches:
                    async for batch in batches:
                        if batch.events or progress:
                            yield batch
            except _Resume as r:
                log.debug("watch at %s ended (%s): resuming from %d", r.endpoint, r.error, cur.next_rev)
                if isinstance(r.error, errors.WrongShard):
                    self.router.invalidate_shard_map(r.error.shard_version)
                failed = r.endpoint
            except _Broken as b:
                failure = classify(b.error, endpoint=b.endpoint, is_write=False)
                log.debug("watch at %s broke (%s): %s", b.endpoint, failure.reason,
                          "resuming" if failure.retryable else "giving up")
                if not failure.retryable and b.error.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise failure.error from None
                if failure.transport:
                    self.router.on_transport_failure(None, b.endpoint, failure.reason)
                failed = b.endpoint
            except _Idle as i:
                log.debug("watch at %s answered nothing for %.1f s: resuming elsewhere", i.endpoint, self.idle_timeout)
                failed = i.endpoint
            if cur.ok:  # it had started since the last failure: start afresh
                cur.ok = False
                tried.clear()
                backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
            if failed is not None:
                tried.append(failed)
            del tried[:-16]  # the recent failures are enough to pick other nodes
            await asyncio.sleep(backoff.next_delay())

    async def _one(self, ep: str, create: kv_pb2.WatchCreateRequest, cur: _Cursor) -> AsyncGenerator[WatchBatch, None]:
        """One watch at one node that hosts every group of the range; its batches (raises
        `_Resume`, `_Broken` or `_Idle` when it ends, or a definite error)."""
        async for resp in self._stream(ep, create, asyncio.Queue()):
            if resp.created:
                cur.started = cur.ok = True
                if not cur.next_rev:
                    cur.next_rev = resp.revision + 1
                continue
            if resp.canceled:
                if resp.resume_revision:
                    cur.next_rev = resp.resume_revision
                raise _canceled(resp, ep)
            if resp.HasField("error"):  # a refused request (we send none that can be)
                raise _Resume(errors.from_proto(resp.error, is_write=False), ep)
            batch = WatchBatch(resp.revision, tuple(_event(e) for e in resp.events), not resp.events, resp.node_id)
            if resp.revision + 1 > cur.next_rev:
                cur.next_rev = resp.revision + 1
            yield batch

    async def _merged(self, plan: list[tuple[str, tuple[int, ...]]], create: kv_pb2.WatchCreateRequest,
                      cur: _Cursor) -> AsyncGenerator[WatchBatch, None]:
        """One watch merged from sub-watches of the groups in `plan` (endpoint, its groups):
        `kvstore.client.watchrun.merged_watch` over one stream each (`_Subs`). Any sub's end ends
        it (the caller starts a new one from `cur.next_rev` with a fresh cover: simple and exact)."""
        run = merged_watch(plan, create, _Subs(self), _event, self.max_queued, CATCH_UP)
        async with contextlib.aclosing(run) as batches:
            async for b, node in batches:
                first = not cur.started or not cur.ok
                cur.started = cur.ok = True
                cur.next_rev = b.revision + 1
                if not first or b.events:
                    yield WatchBatch(b.revision, b.events, not b.events, node)

    async def _plan(self, key: bytes | None, tried: list[str]) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
        """Where to watch: [(a node that hosts every group of the range, ())] (a key: its group),
        preferring one not tried since the last success; else, when no such node is usable, a
        cover of the groups by few nodes [(node, its groups), ...] (`watchmerge.cover`: greedy,
        over the untried live nodes first, then the live ones, then all). With the version of
        the shard map it comes from (each sub-watch's node checks it is its own: a newer map may
        hold a group the cover lacks)."""
        deadline = Deadline(self.policy.timeout)
        m = None
        with contextlib.suppress(errors.KVError):
            m = await self.view.shard_map(deadline, refresh=bool(tried))
        router = self.router
        if m is not None:
            groups = [m.group_for_key(key)] if key is not None else m.data_groups()
            members = {g: set(m.groups[g].members()) if g in m.groups else set() for g in groups}
            book = m.clients if router.client_port else m.nodes
            eps: dict[int, str] = {}
            for n in sorted(set().union(*members.values())):
                addr = router.address_of(n) or book.get(n)
                if addr:
                    eps[n] = router.add_endpoint(addr) or addr
            live = {n for n, e in eps.items() if router.breaker(e).would_allow()}
            fresh = {n for n in live if eps[n] not in tried}
            order = sorted(eps)
            self._rng.shuffle(order)
            for pool in (fresh, live, set(eps)):
                whole = [n for n in order if n in pool and all(n in members[g] for g in groups)]
                if whole:
                    return [(eps[whole[0]], ())], m.version
                c = cover(groups, members, pool, order)
                if c is not None:
                    return [(eps[n], gs) for n, gs in sorted(c.items())], m.version
        all_eps = list(router.endpoints)
        fresh_eps = [e for e in all_eps if e not in tried and router.breaker(e).would_allow()]
        some = fresh_eps or [e for e in all_eps if router.breaker(e).would_allow()] or all_eps
        return [(some[self._rng.randrange(len(some))], ())], 0

    async def _stream(self, ep: str, create: kv_pb2.WatchCreateRequest,
                      extra: asyncio.Queue[kv_pb2.WatchRequest | None]) -> AsyncGenerator[kv_pb2.WatchResponse, None]:
        """One `KV.Watch` stream at `ep` with one create, then the requests put in `extra`; its
        responses, raising `_Idle` when the node goes quiet for `idle_timeout`, `_Broken` when
        the call fails, `_Resume` when the node ends it."""

        async def requests() -> AsyncIterator[kv_pb2.WatchRequest]:
            yield kv_pb2.WatchRequest(create_request=create)
            while (r := await extra.get()) is not None:
                yield r

        call = self.channels.kv(ep).Watch(requests())
        it = call.__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):  # (not wait_for: it can lose a cancel)
                        resp = await it.__anext__()
                except StopAsyncIteration:
                    raise _Resume(errors.Unavailable(f"{ep} ended the watch stream"), ep) from None
                except TimeoutError:
                    raise _Idle(ep) from None
                except grpc.aio.AioRpcError as e:
                    raise _Broken(e, ep) from None
                self.router.on_reply(ep)
                yield resp
        finally:
            extra.put_nowait(None)
            call.cancel()


class _Subs:
    """The client's sub-watches of a merged watch (`watchrun.SubStreams`): `Watches._stream` at
    an endpoint; a broken contract counts in `Watches.breaches`."""

    ends: tuple[type[BaseException], ...] = ()

    def __init__(self, w: Watches) -> None:
        self.w = w
        self.ends = (_Resume, _Broken, _Idle)

    def stream(self, key: str, create: kv_pb2.WatchCreateRequest,
               extra: asyncio.Queue[kv_pb2.WatchRequest | None]) -> AsyncGenerator[kv_pb2.WatchResponse, None]:
        return self.w._stream(key, create, extra)

    def canceled(self, resp: kv_pb2.WatchResponse, key: str) -> BaseException:
        return _canceled(resp, key)

    def failed(self, key: str, message: str, breach: bool) -> BaseException:
        if breach:
            self.w.breaches += 1
        return _Resume(errors.InternalError(message, indeterminate=False), key)


@dataclass(slots=True)
class _Cursor:
    """Where a watch is: the next revision to deliver (0: start now, not created yet)."""

    next_rev: int
    started: bool = False
    """It was created once (a later attempt is a resume)."""
    ok: bool = False
    """Created since the last failure."""


def _canceled(resp: kv_pb2.WatchResponse, ep: str) -> Exception:
    """What a server's cancel means for the client: Compacted (definite), a resume, or the
    error as it is (definite: permission, invalid request)."""
    err = errors.from_proto(resp.error, is_write=False) if resp.HasField("error") else None
    if resp.compact_revision or isinstance(err, errors.Compacted):
        crev = resp.compact_revision or getattr(err, "compact_revision", 0)
        return errors.Compacted(
            err.message if err is not None else f"revision compacted: the compact revision is {crev}",
            compact_revision=crev)
    if resp.resume_revision or err is None or isinstance(err, RESUMABLE):
        return _Resume(err, ep)
    return err


class _Resume(Exception):
    """The stream ended in a way a new watch from the same revision overcomes."""

    def __init__(self, error: errors.KVError | None, endpoint: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.endpoint = endpoint


class _Broken(Exception):
    """The call failed (a gRPC status)."""

    def __init__(self, error: grpc.aio.AioRpcError, endpoint: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.endpoint = endpoint


class _Idle(Exception):
    """The serving node sent nothing for the idle timeout."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.endpoint = endpoint
