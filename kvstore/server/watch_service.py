"""`KV.Watch`: the gRPC adapter of the node's watch hub (`kvstore/node/watch.py`). Thin: it
turns requests into hub calls and the hub's replies into `WatchResponse`s; all watch logic
(frontier, catch-up, bounds, cancels) is in the hub.

Per stream:
- a create is checked here for what needs the call: the caller's RBAC read permission on the
  whole watched range (PERMISSION_DENIED, definite) and, with a rate limit, one token of the
  caller's bucket (RESOURCE_EXHAUSTED with a retry-after); its groups come from this node's
  shard map (one key: its group; a range: every data group); the hub does the rest;
- the stream reads no more requests while the hub says it is busy (replies not taken, or too
  many requests queued): gRPC flow control pushes back on the client;
- replies are sent in order, serialized by `watch_encode.WatchEncoder` (a batch of events the hub
  handed to many watchers is serialized once and its bytes appended to each response's own
  fields; consecutive event replies of one watch that queued up go out as one response; the
  server's serializer passes bytes through); the sender wakes when the stream's queue stops being
  empty (senders are woken at most `WAKE_BATCH` per turn of the event loop, so the Raft messages
  and the next put are not queued behind a thousand sends) and sends all of it before it waits
  again; a stream opened with a token re-checks it before each batch of replies and ends
  UNAUTHENTICATED once it expired or was revoked;
- a stream whose client closed its side keeps serving its watches (as etcd's does) and ends
  once none is left; when the call ends, the stream's watchers are forgotten.

`WatchDriver` is the node side of the hub's timing: `after_cycle` (the groups a Ready cycle
applied to, then a step) from the Ready loop; after every step the hub's close wants go out at
once through `kvstore.node.watchcloses.WatchCloser` (coalesced, one close per group in flight,
retried after a backoff: a timer wakes the loop), via `kvstore.node.closes` (locally if this
node leads the group, else via its leader), so an event held by idle groups goes out after one
Raft round of them. `closer` (a task) is the fallback for progress notifications: every
`close_interval` (100 ms) it asks closes of the idle groups holding back a watch with progress
notifications (`lagging_groups(progress_only=True)`), at max(their top, the wall clock now).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvstore import errors
from kvstore.node.host import Host
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.node.watch import WatchHub, WatchStream
from kvstore.node.watchcloses import WatchCloser, replica_close
from kvstore.node.watchspec import WatchSpec, check_groups
from kvstore.raft import Role
from kvstore.security.guard import credential_of_call
from kvstore.security.identity import identity_of_call
from kvstore.security.rbac import READ
from kvstore.storage import mvcc
from kvstore.v1 import kv_pb2

from .admission import rate_key
from .requests import KVRequests
from .watch_encode import WatchEncoder

log = logging.getLogger("kvstore.watch")

_NOPUT = kv_pb2.WatchCreateRequest.NOPUT
_NODELETE = kv_pb2.WatchCreateRequest.NODELETE

PLANT_ENV = "KVSTORE_PLANT_WATCH_BUG"
"""PLANTED BUG, for testing kvchaos's watch checks only: the variable of `kvstore serve`'s hidden
option `--plant-watch-bug` (`NodeConfig.plant_watch_bug`, read once at start-up; nothing here
reads the environment). ``drop`` or ``repeat`` makes every `PLANT_EVERY`-th response with events
lose its last event or repeat its first one. Never set unless a test asks for it (kvchaos's
hidden ``--plant-watch-bug``)."""

PLANT_EVERY = 20

WAKE_BATCH = 32
"""Stream senders woken per turn of the event loop (`WatchService._wake_soon`)."""


class WatchService:
    """The `KV.Watch` handler of one node (used by `KVService.Watch`)."""

    def __init__(self, rq: KVRequests, hub: WatchHub) -> None:
        self.rq = rq
        self.hub = hub
        self.node_id = rq.cfg.id
        plant = rq.cfg.plant_watch_bug
        self.encoder = WatchEncoder(self.node_id, rq.err, plant, PLANT_EVERY)
        """Replies to serialized responses (`server/watch_encode.py`)."""
        self._ready: deque[Callable[[], None]] = deque()
        """Senders to wake (`_wake_soon`), in order."""
        self._pumping = False
        if plant:
            log.warning("PLANTED WATCH BUG %r is active (%s): watch responses are corrupted", plant, PLANT_ENV)

    async def watch(self, requests: AsyncIterator[kv_pb2.WatchRequest], context: Any) -> AsyncIterator[bytes]:
        """Serve one `KV.Watch` call: its responses, serialized (`WatchEncoder.encode_all`)."""
        rq = self.rq
        s = self.hub.open()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] | None = None
        """Set while the sender waits for replies (the hub wakes it when the outbox stops being
        empty, and the sender then sends everything queued before it waits again)."""

        def wake() -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        room = asyncio.Event()
        s.on_reply = lambda: self._wake_soon(wake)
        stream_bytes = self.hub.limits.stream_bytes
        max_merge = self.hub.limits.reply_bytes
        encode_all = self.encoder.encode_all
        adm = rq.admission
        limited = adm is not None and adm.limiter is not None
        bucket = (rate_key(identity_of_call(), context) or "") if limited else ""
        cred = credential_of_call() if rq.guard is not None else None
        cred = cred if cred is not None and cred.key else None
        reading = True

        async def read() -> None:
            nonlocal reading
            try:
                async for req in requests:
                    kind = req.WhichOneof("request_union")
                    if kind == "create_request":
                        self._create(s, req.create_request, bucket if limited else None)
                    elif kind == "cancel_request":
                        s.cancel(req.cancel_request.watch_id)
                    elif kind == "progress_request":
                        self._progress(s, req.progress_request.revision)
                    rq.wake()
                    while s.busy and not s.closed:
                        room.clear()
                        await room.wait()
            finally:
                reading = False
                wake()

        reader = loop.create_task(read())
        try:
            while True:
                if not s.outbox:
                    if not s.busy:
                        room.set()
                    if not reading and not s.watchers and not s.requests:
                        break  # half-closed by the client, and nothing left to watch or answer
                    waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        waiter = None
                    continue
                full = s.bytes >= stream_bytes
                replies = s.take(1 << 16)
                if not s.busy:
                    room.set()
                if cred is not None and rq.guard is not None:
                    try:
                        rq.guard.recheck(cred)
                    except errors.Unauthenticated as err:
                        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"KV.Watch: {err.message}")
                if full and self.hub.watching:
                    rq.wake()  # the hub stopped reading for this stream: it may read again now
                for data in encode_all(replies, max_merge):
                    yield data
        finally:
            s.close()
            room.set()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _create(self, s: WatchStream, c: kv_pb2.WatchCreateRequest, bucket: str | None) -> None:
        """Check a create (fields, permission, rate) and hand it to the hub; a refusal is its
        reply (definite)."""
        rq = self.rq
        try:
            spec = WatchSpec.make(
                c.key, c.range_end, c.prefix, c.start_revision, prev_kv=c.prev_kv, progress_notify=c.progress_notify,
                no_put=_NOPUT in c.filters, no_delete=_NODELETE in c.filters, max_key=rq.cfg.limits.max_key,
            )
            if rq.guard is not None:
                rq.guard.check_range(spec.start, spec.end, READ)
            if bucket is not None and rq.admission is not None:
                k, after = rq.admission.admit(bucket, 1)
                if not k:
                    raise errors.ResourceExhausted(
                        f"rate limit exceeded: retry after {errors.retry_after_ms(after)} ms", retry_after=after)
            m = rq.tracker.map
            if m is None:
                raise errors.NoLeader("this node has no shard map yet")
            groups = [m.group_for_key(spec.start)] if spec.single_key else m.data_groups()
            partial = False
            if c.groups:
                chosen = check_groups(c.groups, groups)
                partial = len(chosen) < len(groups)
                groups = chosen
                if partial and c.shard_version != m.version:
                    raise errors.WrongShard(
                        f"the watch names groups of shard map version {c.shard_version}, this node's map is "
                        f"version {m.version}: cover the range again", shard_version=m.version)
        except errors.KVError as err:
            s.refuse(c.watch_id, err)
            return
        s.create(spec, groups, c.watch_id, partial)

    def _progress(self, s: WatchStream, revision: int) -> None:
        """A progress request; one at a revision is checked against the node's clock first (a
        refusal is one response with watch_id 0 and the error, definite: no watch is touched)."""
        if revision:
            try:
                if revision < 0:
                    raise errors.InvalidArgument(f"progress revision {revision} is negative")
                self.rq.closes.check(revision)
            except errors.KVError as err:
                s.refuse(0, errors.InvalidArgument(f"progress request refused: {err.message}"), canceled=False)
                return
        s.progress(revision)

    def _wake_soon(self, wake: Callable[[], None]) -> None:
        """Wake a stream's sender, at most `WAKE_BATCH` per turn of the event loop: a put that
        1,000 watchers take wakes them in batches with the loop's I/O (Raft messages, the next
        put) in between, instead of queueing 1,000 sends ahead of it."""
        self._ready.append(wake)
        if not self._pumping:
            self._pumping = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        ready = self._ready
        for _ in range(min(len(ready), WAKE_BATCH)):
            ready.popleft()()
        if ready:
            asyncio.get_running_loop().call_soon(self._pump)
        else:
            self._pumping = False


class WatchDriver:
    """Runs the hub from the node's loop (see the module docstring)."""

    def __init__(self, hub: WatchHub, host: Host, rq: KVRequests, wake: Callable[[], None]) -> None:
        self.hub = hub
        self.host = host
        self.rq = rq
        self.wake = wake
        self.closing = WatchCloser(
            hub, self._leads, rq.closes.close,
            replica_close(rq.closes, rq.reads.logic, rq._forward_close), time.monotonic, wake)
        self._retry: asyncio.TimerHandle | None = None
        self._retry_at = 0.0

    @property
    def closes_sent(self) -> int:
        """CLOSE commands this node sent (or forwarded) for its watches."""
        return self.closing.sent

    def _leads(self, g: int) -> bool:
        grp = self.host.groups.get(g)
        return grp is not None and grp.core.role == Role.LEADER

    def after_cycle(self, applies: list[ApplyBatch], writes: list[GroupWrite]) -> None:
        hub = self.hub
        if hub.idle:
            return
        hub.applied(a.group for a in applies)
        hub.applied(w.group for w in writes if w.snapshot is not None)
        self.step()

    def step(self) -> None:
        """One hub step (on the Ready loop). A failure of it (a bug) cancels every watch, to be
        resumed by its client, and never stops the Ready loop."""
        hub = self.hub
        if hub.idle:
            return
        try:
            more = hub.step(time.monotonic())
        except Exception as err:
            log.exception("a watch step failed: every watch is canceled (its client resumes it)")
            hub.cancel_everything(errors.InternalError(f"the watch hub failed: {type(err).__name__}: {err}",
                                                       indeterminate=False))
            return
        if more:
            asyncio.get_running_loop().call_soon(self.wake)
        self._closes()

    def _closes(self) -> None:
        """Send the closes the hub wants now; arm the timer of the next retry."""
        c = self.closing
        now = time.monotonic()
        try:
            c.run(now)
        except Exception:  # optional work: a bug here must not take the node down
            log.exception("closing watched groups failed")
            return
        at = c.retry_at(now)
        if at is not None and (self._retry is None or at < self._retry_at):
            if self._retry is not None:
                self._retry.cancel()
            self._retry_at = at
            self._retry = asyncio.get_running_loop().call_later(at - now, self._retried)

    def _retried(self) -> None:
        self._retry = None
        self.wake()

    async def closer(self) -> None:
        """Every close interval: ask closes of the idle groups holding back a watch with
        progress notifications (the events themselves do not wait for this: `step`)."""
        interval = self.hub.limits.close_interval
        while True:
            await asyncio.sleep(interval)
            if not self.hub.watching:
                continue
            try:
                lagging = self.hub.lagging_groups(time.monotonic(), progress_only=True)
                if not lagging:
                    continue
                now = mvcc.make_revision(time.time_ns() // 1_000_000, 0, 0)
                self.closing.ask({g: max(top, now) for g, top in lagging.items()})
            except Exception:  # optional work: a bug here must not take the node down
                log.exception("closing idle watched groups failed")
            self.wake()
