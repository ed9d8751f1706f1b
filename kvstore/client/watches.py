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

The node serving a watch must host every group the range lives in (a watch of one key: its
group; any other range: every data group); the client picks such a node from its shard map.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
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
from kvstore.v1 import kv_pb2

__all__ = ["WatchBatch", "WatchEvent", "Watches"]

IDLE_TIMEOUT = 8.0
"""Seconds without any response (events, progress) before the client moves the watch elsewhere."""

_RESUMABLE = (errors.WrongShard, errors.NoLeader, errors.ResourceExhausted, errors.Unavailable,
              errors.ShuttingDown, errors.Timeout, errors.StaleReplica, errors.InternalError)


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
        self.resumes = 0
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
        next_rev = start_revision
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
        tried: list[str] = []
        started = False
        while True:
            ep = await self._pick(key if single else None, tried)
            create = kv_pb2.WatchCreateRequest(
                key=key, range_end=range_end, prefix=prefix, start_revision=next_rev, prev_kv=prev_kv,
                progress_notify=True, watch_id=1,
            )
            if started:
                self.resumes += 1
            try:
                async for resp in self._stream(ep, create):
                    if resp.created:
                        started = True
                        tried.clear()
                        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
                        if not next_rev:
                            next_rev = resp.revision + 1
                        continue
                    if resp.canceled:
                        err = errors.from_proto(resp.error, is_write=False) if resp.HasField("error") else None
                        if resp.compact_revision or isinstance(err, errors.Compacted):
                            crev = resp.compact_revision or getattr(err, "compact_revision", 0)
                            raise errors.Compacted(
                                err.message if err is not None else f"revision compacted: the compact revision is {crev}",
                                compact_revision=crev)
                        if resp.resume_revision:
                            next_rev = resp.resume_revision
                            raise _Resume(err)
                        if err is None or isinstance(err, _RESUMABLE):
                            raise _Resume(err)
                        raise err
                    batch = WatchBatch(resp.revision, tuple(_event(e) for e in resp.events), not resp.events, resp.node_id)
                    if batch.events or progress:
                        yield batch
                    if resp.revision + 1 > next_rev:
                        next_rev = resp.revision + 1
            except _Resume as r:
                if isinstance(r.error, errors.WrongShard):
                    self.router.invalidate_shard_map(r.error.shard_version)
                tried.append(ep)
            except grpc.aio.AioRpcError as e:
                failure = classify(e, endpoint=ep, is_write=False)
                if not failure.retryable and e.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise failure.error from None
                if failure.transport:
                    self.router.on_transport_failure(None, ep, failure.reason)
                tried.append(ep)
            except _Idle:
                tried.append(ep)
            del tried[:-16]  # the recent failures are enough to pick another node
            await asyncio.sleep(backoff.next_delay())

    async def _pick(self, key: bytes | None, tried: list[str]) -> str:
        """A node that hosts every group of the range (a key: its group), preferring one not tried
        since the last success."""
        deadline = Deadline(self.policy.timeout)
        m = None
        with contextlib.suppress(errors.KVError):
            m = await self.view.shard_map(deadline, refresh=bool(tried))
        router = self.router
        eps: list[str] = []
        if m is not None:
            groups = [m.group_for_key(key)] if key is not None else m.data_groups()
            hosts: set[int] | None = None
            for g in groups:
                placement = m.groups.get(g)
                members = set(placement.members()) if placement is not None else set()
                hosts = members if hosts is None else hosts & members
            if hosts is not None and not hosts:
                raise errors.WrongShard(
                    f"no node hosts every group of the watched range (groups {', '.join(map(str, groups))}): a "
                    "prefix or range watch needs a node that replicates every data group (node-to-node feeds "
                    "are not built yet)")
            book = m.clients if router.client_port else m.nodes
            for n in sorted(hosts or ()):
                addr = router.address_of(n) or book.get(n)
                if addr:
                    eps.append(router.add_endpoint(addr) or addr)
        if not eps:
            eps = list(router.endpoints)
        fresh = [e for e in eps if e not in tried and router.breaker(e).would_allow()]
        pool = fresh or [e for e in eps if router.breaker(e).would_allow()] or eps
        return pool[self._rng.randrange(len(pool))]

    async def _stream(self, ep: str, create: kv_pb2.WatchCreateRequest) -> AsyncIterator[kv_pb2.WatchResponse]:
        """One `KV.Watch` stream at `ep` with one create; its responses, raising `_Idle` when the
        node goes quiet for `idle_timeout`."""
        done = asyncio.Event()

        async def requests() -> AsyncIterator[kv_pb2.WatchRequest]:
            yield kv_pb2.WatchRequest(create_request=create)
            await done.wait()

        call = self.channels.kv(ep).Watch(requests())
        it = call.__aiter__()
        try:
            while True:
                try:
                    resp = await asyncio.wait_for(it.__anext__(), self.idle_timeout)
                except StopAsyncIteration:
                    raise _Resume(errors.Unavailable(f"{ep} ended the watch stream")) from None
                except TimeoutError:
                    raise _Idle() from None
                self.router.on_reply(ep)
                yield resp
        finally:
            done.set()
            call.cancel()


class _Resume(Exception):
    """The stream ended in a way a new watch from the same revision overcomes."""

    def __init__(self, error: errors.KVError | None) -> None:
        super().__init__(str(error))
        self.error = error


class _Idle(Exception):
    """The serving node sent nothing for the idle timeout."""
