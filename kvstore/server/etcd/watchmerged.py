"""etcd watches whose range spans a data group the serving node does not host: each one runs as
a merged watch (`kvstore.client.watchrun.merged_watch`, the loop kvstore's client runs), with
sub-watches of the groups covered by few nodes (`watchmerge.cover` over the node's shard map:
this node first, for the groups it hosts, then other members), each restricted to its groups
with the map's `shard_version`, merged by `watchmerge.Merge`.

Sub-streams (`PeerSubs`): the groups this node hosts are watched at its own KV servicer, in
process (no network hop, no token needed: the audited servicer checks the caller's own
credential as for any local watch); the others at other nodes over the node's peer channels
(`GroupCaller.channel`), with the caller's token in the metadata, under the Forwarder's rule
(`Forwarder.may_forward`): on a TLS cluster a call without a token never reaches other nodes
under this node's identity, and such a watch is canceled with a reason saying so (definite).

One etcd watch (`_Merged`), invariants:
- it stays one etcd watch on the client's stream: `created` first (header: the merged created
  revision), then each event once in revision order, a revision's events in one response;
- any sub's failure (a broken or idle stream, a cancel a new watch overcomes, a broken
  contract) restarts the merged watch from its last delivered revision + 1 with a fresh cover
  that avoids the nodes that just failed, after a backoff (`BACKOFF_BASE`..`BACKOFF_CAP`,
  reset by a started merged watch); a definite error (compacted, permission, an invalid
  request) cancels the etcd watch with etcd's reason;
- a progress request is answered at the merged revision (everything at or below it was sent);
  with progress_notify a quiet watch gets a progress response about every
  `WatchLimits.progress_interval`, as kvstore's hub sends one;
- bounded: at most `MAX_PER_STREAM` merged watches per etcd stream and `MAX_PER_NODE` per node
  (each opens up to one outbound stream per node); a create beyond is answered created and
  canceled with the reason (definite); a sub is read no more while it holds `MAX_QUEUED` events
  or `MAX_QUEUED_BYTES` bytes it cannot emit yet (`Merge.paused`), and a merged batch goes out
  as responses of at most about `REPLY_BYTES` of events each, split between revisions (never
  inside one: a revision is one response, as kvstore's hub sends it);
- a create is answered within `create_timeout` (the node's request timeout): a watch with no
  created point by then (no cover of its groups, or subs failing before all are created) is
  answered created and canceled with a `kvstore: ...` reason (definite), so one watch never
  blocks its stream's other requests;
- every end of the task is answered: an unexpected exception (a bug) is logged and cancels
  the etcd watch with `kvstore: internal error ...`; a cancel carries the kvstore error class
  (`Definite.error`, `MergedWatches.ended`) for in-process waiters (`caller.CallerKV`);
- the local sub runs the KV servicer with the etcd call's context wrapped (`SubContext`): the
  servicer's abort (a credential that no longer checks) ends the merged watch with a definite
  reason, never the whole etcd call;
- `MergedWatches.close` (the etcd stream ended) cancels and awaits every task it started; a
  cancel of one watch cancels and awaits its task before the canceled response goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvstore import errors
from kvstore.client.watchmerge import MAX_QUEUED_BYTES, cover
from kvstore.client.watchrun import CATCH_UP, RESUMABLE, Requests, SubStreams, merged_watch
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.etcdpb.mvccpb import kv_pb2 as mvccpb
from kvstore.node.watch import WatchLimits
from kvstore.v1 import kv_pb2, kv_pb2_grpc

from .convert import watch_event
from .status import COMPACTED, PERMISSION_DENIED

log = logging.getLogger("kvstore.etcd.watch")

MAX_PER_STREAM = 16
"""Merged watches one etcd Watch stream may run at once."""

MAX_PER_NODE = 256
"""Merged watches one node runs at once (for all its etcd streams)."""

SUB_IDLE = 8.0
"""Seconds without any response from a sub-stream (its watches ask progress notifications, one
a second when quiet) before it counts as failed."""

MAX_QUEUED = 10_000
"""Events a sub may hold ahead of the others before it is read no more (`Merge.paused`; also
`MAX_QUEUED_BYTES`, the hub's per-stream bound `WatchLimits.stream_bytes`, whichever comes first)."""

REPLY_BYTES = WatchLimits().reply_bytes
"""A merged batch is sent as etcd responses of at most about this many bytes of events each
(kvstore's hub bound for one reply), split between revisions."""

CREATE_TIMEOUT = 5.0
"""Seconds a merged create may go without a created point before it is answered created and
canceled (`MergedWatches.create_timeout`; the node passes its request timeout)."""

BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0

PROGRESS_INTERVAL = WatchLimits().progress_interval
"""A quiet merged watch with progress_notify gets a progress response this often (the hub's)."""


@dataclass(frozen=True, slots=True)
class SubEvent:
    """A sub's event with its revision (what `Merge` orders by)."""

    revision: int
    event: kv_pb2.Event

    @staticmethod
    def of(e: kv_pb2.Event) -> SubEvent:
        return SubEvent(e.kv.mod_revision, e)


class Restart(Exception):
    """A sub ended in a way a new merged watch from the last delivered revision overcomes."""

    def __init__(self, node: int | None, why: str) -> None:
        super().__init__(why)
        self.node = node


class Definite(Exception):
    """The etcd watch ends: canceled with etcd's `reason` (and `compact_revision`); `error` is
    the kvstore error class it stands for (what an in-process waiter raises: `error_of`)."""

    def __init__(self, reason: str, compact_revision: int = 0,
                 error: type[errors.KVError] = errors.InternalError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.compact_revision = compact_revision
        self.error = error

    def error_of(self) -> errors.KVError:
        """The kvstore error of this end (definite: a watch writes nothing)."""
        if issubclass(self.error, errors.Compacted):
            return errors.Compacted(self.reason, compact_revision=self.compact_revision)
        return self.error(self.reason, indeterminate=False)


_ABORT_ERRORS: dict[grpc.StatusCode, type[errors.KVError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
}


class SubContext:
    """The etcd call's context as the local sub's KV servicer sees it: everything is the call's
    (its identity, metadata, peer), except `abort`, which raises `Definite` (the merged watch
    ends with the reason) instead of ending the whole etcd call."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> None:
        raise Definite(f"kvstore: {code.name} {details}", error=_ABORT_ERRORS.get(code, errors.InternalError))

    def set_trailing_metadata(self, *_: Any) -> None:
        """The etcd call's own trailing metadata is its own to set, never a sub's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def canceled_by(resp: kv_pb2.WatchResponse, node: int | None) -> Exception:
    """What a sub's cancel means: compacted (definite, etcd's reason and the compact revision),
    a restart (a resume revision, a retryable error), or another definite error (permission:
    etcd's reason; anything else: `kvstore: ...`)."""
    err = errors.from_proto(resp.error, is_write=False) if resp.HasField("error") else None
    if resp.compact_revision or isinstance(err, errors.Compacted):
        return Definite(COMPACTED, resp.compact_revision or getattr(err, "compact_revision", 0), errors.Compacted)
    if resp.resume_revision or err is None or isinstance(err, RESUMABLE):
        return Restart(node, f"canceled: {resp.cancel_reason or (err.message if err else 'no reason')}")
    if isinstance(err, errors.PermissionDenied):
        return Definite(PERMISSION_DENIED, error=errors.PermissionDenied)
    return Definite(f"kvstore: {err.message}", error=type(err))


def reply_pieces(events: Sequence[SubEvent], reply_bytes: int) -> list[list[mvccpb.Event]]:
    """`events` (revision order) as etcd events in pieces of at most `reply_bytes` bytes of
    events each, split only between revisions (a revision larger than that is one piece by
    itself); joined, the pieces are every event in order. At least one piece."""
    out: list[list[mvccpb.Event]] = [[]]
    size = 0
    i, n = 0, len(events)
    while i < n:
        r = events[i].revision
        j = i
        part = []
        while j < n and events[j].revision == r:
            part.append(watch_event(events[j].event))
            j += 1
        cost = sum(e.ByteSize() for e in part)
        if out[-1] and size + cost > reply_bytes:
            out.append([])
            size = 0
        out[-1].extend(part)
        size += cost
        i = j
    return out


def plan_cover(groups: Collection[int], members: Mapping[int, Collection[int]], me: int, hosted: Collection[int],
               reachable: Collection[int], failed: Collection[int], remote_ok: bool
               ) -> list[tuple[int, tuple[int, ...]]] | str | None:
    """Where to watch `groups`: [(node, its groups)] covering every group with few nodes, this
    node (`me`, hosting `hosted`) first, avoiding the nodes in `failed` if possible; other nodes
    only among `reachable` (those with an address) and only if `remote_ok` (the Forwarder's
    rule). This node counts as a member of exactly the groups it `hosted` (the map may name it for
    a group whose replica is not here yet, or not any more). A str: why it cannot be done
    (definite); None: no cover now (nodes down: retry)."""
    members = {g: (set(members.get(g, ())) - {me}) | ({me} if g in hosted else set()) for g in groups}
    if not remote_ok:
        missing = sorted(g for g in groups if g not in hosted)
        if missing:
            return (f"kvstore: this node does not host group(s) {', '.join(map(str, missing))} of the watched "
                    "range, and on a TLS cluster it watches groups at other nodes only with the caller's token "
                    "(authenticate, or watch at a node that hosts every group)")
        return [(me, tuple(sorted(groups)))]
    usable = {me} | set(reachable)
    order = [me, *sorted(set(reachable) - {me})]
    for pool in (usable - set(failed), usable):
        c = cover(groups, members, pool, order)
        if c is not None:
            return sorted(c.items(), key=lambda kv: (kv[0] != me, kv[0]))
    return None


class PeerSubs:
    """The node's sub-streams (`watchrun.SubStreams`): `me` at the node's KV servicer `local`
    (the etcd call's `context`), other nodes over `channel(address)` with `metadata` (the
    caller's token); a node's address from `address`."""

    def __init__(self, me: int, local: Any, context: grpc.aio.ServicerContext,
                 channel: Callable[[str], grpc.aio.Channel] | None, address: Callable[[int], str],
                 metadata: tuple[tuple[str, str], ...], idle: float = SUB_IDLE) -> None:
        self.me = me
        self.local = local
        self.context = SubContext(context)
        self.channel = channel
        self.address = address
        self.metadata = metadata
        self.idle = idle
        self.breaches = 0
        self.ends: tuple[type[BaseException], ...] = (Restart, Definite)

    async def stream(self, node: int, create: kv_pb2.WatchCreateRequest, extra: Requests
                     ) -> AsyncGenerator[kv_pb2.WatchResponse, None]:
        async def requests() -> AsyncIterator[kv_pb2.WatchRequest]:
            yield kv_pb2.WatchRequest(create_request=create)
            while (r := await extra.get()) is not None:
                yield r

        call: Any = None
        if node == self.me:
            it: Any = self.local.Watch(requests(), self.context)
        else:
            addr = self.address(node)
            if not addr or self.channel is None:
                raise Restart(node, f"no address of node {node}")
            call = kv_pb2_grpc.KVStub(self.channel(addr)).Watch(requests(), metadata=self.metadata)
            it = call.__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle):  # (not wait_for: it can lose a cancel)
                        data = await it.__anext__()
                except StopAsyncIteration:
                    raise Restart(node, f"node {node} ended the watch stream") from None
                except TimeoutError:
                    raise Restart(node, f"node {node} answered nothing for {self.idle} s") from None
                except grpc.aio.AioRpcError as e:
                    if e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                        raise Definite(f"kvstore: node {node}: {e.code().name} {e.details()}",
                                       error=_ABORT_ERRORS[e.code()]) from None
                    raise Restart(node, f"node {node}: {e.code().name} {e.details()}") from None
                yield data if isinstance(data, kv_pb2.WatchResponse) else kv_pb2.WatchResponse.FromString(data)
        finally:
            extra.put_nowait(None)
            if call is not None:
                call.cancel()
            elif hasattr(it, "aclose"):
                with contextlib.suppress(Exception):
                    await it.aclose()

    def canceled(self, resp: kv_pb2.WatchResponse, node: int) -> BaseException:
        return canceled_by(resp, node)

    def failed(self, node: int, message: str, breach: bool) -> BaseException:
        if breach:
            self.breaches += 1
        return Restart(node, message)


Emit = Callable[[rpc_pb2.WatchResponse, bool], Awaitable[None]]
"""Queue a response for the client (second argument: the watch asked for fragments)."""
Planner = Callable[[kv_pb2.WatchCreateRequest, list[int]], "tuple[list[tuple[int, tuple[int, ...]]], int] | str | None"]
"""(the create, the nodes that failed lately) -> (plan, shard map version), a definite reason, or
None (no cover now)."""


@dataclass(slots=True)
class Budget:
    """The node's count of running merged watches (`MAX_PER_NODE`)."""

    limit: int = MAX_PER_NODE
    running: int = 0


@dataclass(slots=True, eq=False)
class _Merged:
    wid: int
    create: kv_pb2.WatchCreateRequest
    fragment: bool
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once `created` (or created and canceled) went out."""
    created: bool = False
    revision: int = 0
    """The merged revision: every event at or below it was sent."""
    task: asyncio.Task[None] | None = None
    why: str = "no attempt ended yet"
    """Why its last attempt did not get it created (the create deadline's reason names it)."""


class MergedWatches:
    """The merged etcd watches of one etcd Watch stream (see the module docstring). `planner`
    covers a create's groups; `subs` opens the sub-streams; `emit` queues responses for the
    client; `header(revision)` makes a response header."""

    def __init__(self, planner: Planner, subs: SubStreams[int], emit: Emit,
                 header: Callable[[int], rpc_pb2.ResponseHeader], budget: Budget,
                 rng: random.Random | None = None, catch_up: float = CATCH_UP,
                 create_timeout: float = CREATE_TIMEOUT, reply_bytes: int = REPLY_BYTES) -> None:
        self.create_timeout = create_timeout
        self.reply_bytes = reply_bytes
        self.ended: dict[int, Definite] = {}
        """Why the latest watches that ended definitely ended (by etcd id; at most
        `MAX_PER_STREAM`, the oldest forgotten first)."""
        self.planner = planner
        self.subs = subs
        self.emit = emit
        self.header = header
        self.budget = budget
        self.rng = rng or random.Random()
        self.catch_up = catch_up
        self.watches: dict[int, _Merged] = {}
        self.none = asyncio.Event()
        """Set while no merged watch runs (`drained`)."""
        self.none.set()
        self.restarts = 0
        """Merged watches restarted after a sub's failure (for tests and logs)."""

    def __contains__(self, wid: int) -> bool:
        return wid in self.watches

    async def start(self, wid: int, create: kv_pb2.WatchCreateRequest, fragment: bool) -> asyncio.Event:
        """Run etcd watch `wid` (kvstore's `create`) merged; the returned event is set once it
        was answered created (or created and canceled)."""
        w = _Merged(wid, create, fragment)
        if len(self.watches) >= MAX_PER_STREAM or self.budget.running >= self.budget.limit:
            which = (f"{MAX_PER_STREAM} per stream" if len(self.watches) >= MAX_PER_STREAM
                     else f"{self.budget.limit} per node")
            await self._end(w, Definite(f"kvstore: too many watches across nodes ({which}): watch at a node "
                                        "that hosts every group of the range, or cancel some",
                                        error=errors.ResourceExhausted))
            return w.answered
        self.watches[wid] = w
        self.none.clear()
        self.budget.running += 1
        w.task = asyncio.get_running_loop().create_task(self._run(w))
        return w.answered

    async def cancel(self, wid: int) -> None:
        """Cancel etcd watch `wid` (one of this stream's): its task ends first, then the
        canceled response goes out."""
        w = self.watches.get(wid)
        if w is None:
            return
        await self._stop(w)
        await self.emit(rpc_pb2.WatchResponse(header=self.header(w.revision), watch_id=wid, canceled=True), False)

    async def progress(self) -> None:
        """A progress request: each created watch answers at its merged revision."""
        for w in list(self.watches.values()):
            if w.created:
                await self.emit(rpc_pb2.WatchResponse(header=self.header(w.revision), watch_id=w.wid), False)

    async def drained(self) -> None:
        """Until no merged watch runs (a client that closed its side of the stream keeps its
        watches, as etcd's does)."""
        await self.none.wait()

    async def close(self) -> None:
        """The stream ended: every task cancelled and awaited."""
        for w in list(self.watches.values()):
            await self._stop(w)

    async def _stop(self, w: _Merged) -> None:
        t = w.task
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._forget(w)

    def _forget(self, w: _Merged) -> None:
        if self.watches.get(w.wid) is w:
            del self.watches[w.wid]
            self.budget.running -= 1
            if not self.watches:
                self.none.set()
        w.answered.set()

    async def _end(self, w: _Merged, d: Definite) -> None:
        self.ended.pop(w.wid, None)
        self.ended[w.wid] = d
        while len(self.ended) > MAX_PER_STREAM:
            del self.ended[next(iter(self.ended))]
        if not w.created:
            w.created = True
            await self.emit(rpc_pb2.WatchResponse(header=self.header(0), watch_id=w.wid, created=True), False)
            w.answered.set()
        await self.emit(rpc_pb2.WatchResponse(header=self.header(w.revision), watch_id=w.wid, canceled=True,
                                              cancel_reason=d.reason, compact_revision=d.compact_revision), False)

    async def _run(self, w: _Merged) -> None:
        """The watch's task: attempts until a definite end; every end is answered (see the
        module docstring: the create deadline, an unexpected exception)."""
        try:
            deadline = asyncio.timeout(self.create_timeout)
            try:
                async with deadline:
                    await self._attempts(w, deadline)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise Definite(f"kvstore: the watch across nodes was not created within {self.create_timeout} s "
                               f"(last: {w.why}): watch again, or at a node that hosts every group of the range",
                               error=errors.Unavailable) from None
        except Definite as d:
            await self._end(w, d)
        except Exception as err:
            log.exception("etcd watch %d across nodes failed", w.wid)
            await self._end(w, Definite(f"kvstore: internal error: {type(err).__name__}: {err}"))
        finally:
            self._forget(w)

    async def _send(self, w: _Merged, revision: int, events: tuple[SubEvent, ...]) -> None:
        """A batch's events as responses of `reply_pieces`; each response's header revision:
        everything at or below it was sent (the batch's `revision` for the last one)."""
        pieces = reply_pieces(events, self.reply_bytes)
        for k, piece in enumerate(pieces):
            rev = revision if k == len(pieces) - 1 else piece[-1].kv.mod_revision
            resp = rpc_pb2.WatchResponse(header=self.header(rev), watch_id=w.wid)
            resp.events.extend(piece)
            await self.emit(resp, w.fragment)

    async def _attempts(self, w: _Merged, deadline: asyncio.Timeout) -> None:
        loop = asyncio.get_running_loop()
        next_rev = w.create.start_revision
        failed: list[int] = []
        delay = BACKOFF_BASE
        last_sent = loop.time()
        while True:
            p = self.planner(w.create, failed)
            if isinstance(p, str):
                raise Definite(p, error=errors.Unauthenticated)
            if p is None:
                w.why = "no cover of its groups (their nodes down or without an address)"
            else:
                plan, version = p
                c = kv_pb2.WatchCreateRequest()
                c.CopyFrom(w.create)
                c.watch_id, c.start_revision, c.progress_notify, c.shard_version = 1, next_rev, True, version
                try:
                    run = merged_watch(plan, c, self.subs, SubEvent.of, MAX_QUEUED, self.catch_up,
                                       MAX_QUEUED_BYTES)
                    opened = False
                    async with contextlib.aclosing(run) as batches:
                        async for b, _node in batches:
                            first, point = not w.created, not opened  # point: this attempt's created point
                            if point:
                                opened = True
                                failed.clear()
                                delay = BACKOFF_BASE
                            next_rev = b.revision + 1
                            if first:
                                w.created = True
                                deadline.reschedule(None)
                                await self.emit(rpc_pb2.WatchResponse(
                                    header=self.header(b.revision), watch_id=w.wid, created=True), False)
                                w.answered.set()
                                last_sent = loop.time()
                            if b.events:
                                await self._send(w, b.revision, b.events)
                                last_sent = loop.time()
                            elif (w.create.progress_notify and not point
                                  and loop.time() - last_sent >= PROGRESS_INTERVAL):
                                await self.emit(rpc_pb2.WatchResponse(
                                    header=self.header(b.revision), watch_id=w.wid), False)
                                last_sent = loop.time()
                            w.revision = b.revision
                except Restart as r:
                    w.why = f"a sub-watch failed: {r}"
                    self.restarts += 1
                    if r.node is not None:
                        failed.append(r.node)
                        del failed[:-16]
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, BACKOFF_CAP)
