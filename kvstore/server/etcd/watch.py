"""etcd's `Watch` service over kvstore's watch stream (`server/watch_service.py`, the node's
watch hub): each etcd request becomes a kvstore one, each kvstore response an etcd one, on one
stream. Watch ids: etcd numbers a stream's watches from 0 (or takes the client's); kvstore's are
> 0, so etcd id `e` is kvstore id `e + 1`. A create that does not check (`convert.watch_create`)
is answered as etcd answers an invalid one: watch_id -1, created and canceled, with the reason;
the stream goes on. Creates are answered in the order they came (the next request is read once
the previous create is answered), as etcd's clients expect. Automatic ids are never reused on a
stream (etcd's nextID only grows). A cancel of an id the stream does not have is not answered
(as etcd's). Backpressure: at most `OUTBOX` translated responses wait for the client; beyond,
the translation stops reading kvstore's stream, so kvstore's per-stream byte bound and its
slow-watcher cancel apply to an etcd client that does not read. A watch created with `fragment`
gets a response larger than the node's request limit (`Limits.max_request`, etcd's
`--max-request-bytes`) split as etcd's `sendFragments` splits it (`fragments`): clients that
cannot receive messages that large (gRPC's default receive limit is 4 MiB) can still watch big
revisions; clientv3 joins the pieces. A watch whose range spans a data group this node does not
host runs merged across nodes (`watchmerged.MergedWatches`, one per stream), beside the stream's
local watches, under the same ids, create order and outbox."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.etcdpb.mvccpb import kv_pb2 as mvcc_pb2
from kvstore.node.watch import WatchLimits
from kvstore.v1 import kv_pb2

from .base import EtcdNode, fail
from .convert import MAX_INT64, EtcdRequestError, watch_create, watch_event
from .forward import token_metadata
from .status import COMPACTED, PERMISSION_DENIED
from .watchmerged import Budget, MergedWatches, PeerSubs, plan_cover

_DONE = object()
OUTBOX = 4
"""Translated responses queued for the client (each at most about kvstore's `reply_bytes`, 1 MiB)."""


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def fragments(resp: rpc_pb2.WatchResponse, max_bytes: int) -> list[rpc_pb2.WatchResponse]:
    """`resp` as etcd 3.4's `sendFragments` sends it to a watch created with `fragment`: whole
    when it is smaller than `max_bytes` or has fewer than two events; else pieces with the same
    header and id, each taking events in order while it stays under `max_bytes` (at least one
    event each), `fragment` set on every piece but the last. Invariants: the pieces' events,
    joined, are `resp`'s in order; a piece of two or more events encodes to fewer than
    `max_bytes` bytes."""
    if len(resp.events) < 2 or resp.ByteSize() < max_bytes:
        return [resp]
    shell = rpc_pb2.WatchResponse()
    shell.CopyFrom(resp)
    del shell.events[:]
    shell.fragment = True
    base = shell.ByteSize()
    out: list[rpc_pb2.WatchResponse] = []
    cur: list[mvcc_pb2.Event] = []
    size = base
    for ev in resp.events:
        n = ev.ByteSize()
        cost = 1 + _varint_len(n) + n  # field tag, length, the event
        if cur and size + cost >= max_bytes:
            piece = rpc_pb2.WatchResponse()
            piece.CopyFrom(shell)
            piece.events.extend(cur)
            out.append(piece)
            cur, size = [], base
        cur.append(ev)
        size += cost
    last = rpc_pb2.WatchResponse()
    last.CopyFrom(shell)
    last.fragment = False
    last.events.extend(cur)
    out.append(last)
    return out


Queued = rpc_pb2.WatchResponse | tuple[rpc_pb2.WatchResponse, ...]
"""One item of a stream's outbox: a response, or the pieces of one fragmented response."""


def queued(resp: rpc_pb2.WatchResponse, fragment: bool, max_bytes: int) -> Queued:
    """`resp` as ONE outbox item: its pieces (`fragments`) together when it is split, so they
    leave back to back (clientv3 drops a response of another watch that comes between two
    pieces, and the outbox has several writers: the stream's pump and each merged watch)."""
    pieces = fragments(resp, max_bytes) if fragment else [resp]
    return pieces[0] if len(pieces) == 1 else tuple(pieces)


def sent(item: Queued) -> tuple[rpc_pb2.WatchResponse, ...]:
    """The responses an outbox item sends, in order."""
    return item if isinstance(item, tuple) else (item,)


class EtcdWatch(rpc_pb2_grpc.WatchServicer):
    def __init__(self, node: EtcdNode) -> None:
        self.n = node
        self.budget = Budget()
        """The node's merged watches (`watchmerged.MAX_PER_NODE`)."""

    def _groups(self, c: kv_pb2.WatchCreateRequest) -> list[int] | None:
        """The data groups kvstore's watch `c` needs (as the hub counts them: a key's group, else
        every data group); None without a shard map."""
        m = self.n.requests.tracker.map
        if m is None:
            return None
        return [m.group_for_key(c.key)] if not c.range_end and not c.prefix else m.data_groups()

    def merges(self, c: kv_pb2.WatchCreateRequest) -> bool:
        """`_merges`, for the lock and election services' waits (`caller.CallerKV.wait_for`)."""
        return self._merges(c)

    def merged(self, context: grpc.aio.ServicerContext,
               emit: Callable[[rpc_pb2.WatchResponse, bool], Awaitable[None]]) -> MergedWatches:
        """`_merged`, for the lock and election services' waits."""
        return self._merged(context, emit)

    def _merges(self, c: kv_pb2.WatchCreateRequest) -> bool:
        """`c` spans a group this node does not host: it runs merged (`watchmerged`)."""
        groups = self._groups(c)
        return groups is not None and any(g not in self.n.host.groups for g in groups)

    def _merged(self, context: grpc.aio.ServicerContext,
                emit: Callable[[rpc_pb2.WatchResponse, bool], Awaitable[None]]) -> MergedWatches:
        n = self.n
        caller = n.forward.caller
        remote_ok = n.forward.may_forward(context)

        def plan(c: kv_pb2.WatchCreateRequest, failed: list[int]
                 ) -> tuple[list[tuple[int, tuple[int, ...]]], int] | str | None:
            m = n.requests.tracker.map
            groups = self._groups(c)
            if m is None or groups is None:
                return None
            members = {g: m.groups[g].members() if g in m.groups else () for g in groups}
            everyone = set().union(*map(set, members.values()))
            reachable = {x for x in everyone if caller is not None and caller.address(x)}
            p = plan_cover(groups, members, n.member_id, n.host.groups, reachable, failed, remote_ok)
            return (p, m.version) if isinstance(p, list) else p

        subs = PeerSubs(n.member_id, n.forward.kv, context, caller.channel if caller is not None else None,
                        caller.address if caller is not None else (lambda _: ""), token_metadata(context))
        return MergedWatches(plan, subs, emit, n.header, self.budget, create_timeout=n.forward.timeout,
                             reply_bytes=WatchLimits().reply_bytes)

    def _response(self, r: kv_pb2.WatchResponse) -> rpc_pb2.WatchResponse | None:
        """etcd's response for kvstore's `r` (None: nothing to send, e.g. a refused progress
        request, which names no watch)."""
        if r.watch_id <= 0:
            return None
        out = rpc_pb2.WatchResponse(header=self.n.header(r.revision), watch_id=r.watch_id - 1, created=r.created,
                                    canceled=r.canceled, compact_revision=r.compact_revision)
        if r.canceled:
            if r.error.code == kv_pb2.COMPACTED:
                out.cancel_reason = COMPACTED
            elif r.error.code == kv_pb2.PERMISSION_DENIED:
                out.cancel_reason = PERMISSION_DENIED
            elif r.cancel_reason or r.error.message:
                out.cancel_reason = f"kvstore: {r.cancel_reason or r.error.message}"
        out.events.extend(watch_event(e) for e in r.events)
        return out

    async def Watch(self, request_iterator: AsyncIterator[rpc_pb2.WatchRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[rpc_pb2.WatchResponse]:
        out: asyncio.Queue[object] = asyncio.Queue(OUTBOX)
        in_use: set[int] = set()
        created: set[int] = set()
        """kvstore ids of the watches answered `created` (and not canceled since)."""
        pending: dict[int, asyncio.Event] = {}
        """kvstore ids of creates sent and not answered yet."""
        fragmented: set[int] = set()
        """kvstore ids of the watches created with `fragment`."""
        max_bytes = self.n.requests.cfg.limits.max_request
        next_id = 0

        async def emit(resp: rpc_pb2.WatchResponse, fragment: bool) -> None:
            """Queue `resp` for the client (waits while the client does not read: backpressure),
            as one item (`queued`)."""
            await out.put(queued(resp, fragment, max_bytes))

        merged = self._merged(context, emit)
        """The stream's watches over groups this node does not host (their etcd ids)."""

        async def translated() -> AsyncIterator[kv_pb2.WatchRequest]:
            nonlocal next_id
            async for req in request_iterator:
                kind = req.WhichOneof("request_union")
                if kind == "create_request":
                    c = req.create_request
                    wid = c.watch_id
                    try:
                        if wid < 0 or wid >= MAX_INT64:
                            raise EtcdRequestError("INVALID_ARGUMENT", f"etcdserver: watch_id {wid} is out of range")
                        if wid == 0 or wid in in_use or wid in merged:
                            if wid and (wid in in_use or wid in merged):
                                raise EtcdRequestError("INVALID_ARGUMENT", "etcdserver: duplicate watch ID")
                            while next_id in in_use or next_id in merged:
                                next_id += 1
                            wid = next_id
                            next_id += 1  # never reused on this stream (etcd's nextID++)
                        kc = watch_create(c, wid + 1)
                        if c.fragment:
                            fragmented.add(kc.watch_id)
                    except EtcdRequestError as err:
                        await out.put(rpc_pb2.WatchResponse(header=self.n.header(0), watch_id=-1, created=True,
                                                            canceled=True, cancel_reason=err.message))
                        continue
                    if self._merges(kc):
                        fragmented.discard(kc.watch_id)
                        await (await merged.start(wid, kc, c.fragment)).wait()  # creates answered in order
                        continue
                    in_use.add(wid)
                    answered = pending[kc.watch_id] = asyncio.Event()
                    yield kv_pb2.WatchRequest(create_request=kc)
                    # etcd answers creates in order (clients match `created` replies to their
                    # creates by order): the next request waits for this one's answer
                    await answered.wait()
                elif kind == "cancel_request":
                    wid = req.cancel_request.watch_id
                    if wid in merged:
                        await merged.cancel(wid)
                    elif 0 <= wid < MAX_INT64:
                        yield kv_pb2.WatchRequest(cancel_request=kv_pb2.WatchCancelRequest(watch_id=wid + 1))
                elif kind == "progress_request":
                    await merged.progress()
                    yield kv_pb2.WatchRequest(progress_request=kv_pb2.WatchProgressRequest())
            await merged.drained()  # half-closed: the merged watches go on until they end

        async def pump() -> None:
            try:
                async for data in self.n.forward.kv.Watch(translated(), context):
                    r = data if isinstance(data, kv_pb2.WatchResponse) else kv_pb2.WatchResponse.FromString(data)
                    if r.canceled and not r.created and r.watch_id > 0:
                        if r.watch_id in pending:
                            # etcd answers every create with `created` first (clients match creates
                            # by it), then the cancel (e.g. a compacted start revision)
                            await out.put(rpc_pb2.WatchResponse(header=self.n.header(r.revision),
                                                                watch_id=r.watch_id - 1, created=True))
                        elif r.watch_id not in created:
                            continue  # a cancel of a watch this stream does not have: etcd says nothing
                    if r.created:
                        created.add(r.watch_id)
                    if (r.created or r.canceled) and r.watch_id in pending:
                        pending.pop(r.watch_id).set()
                    e = self._response(r)
                    if r.canceled and r.watch_id > 0:
                        in_use.discard(r.watch_id - 1)
                        created.discard(r.watch_id)
                        fragmented.discard(r.watch_id)
                    if e is not None:
                        await emit(e, r.watch_id in fragmented)
            except asyncio.CancelledError as err:
                # the sender cancels this task when the call ends; any other cancel ends the call
                with contextlib.suppress(asyncio.QueueFull):
                    out.put_nowait(err)
                raise
            except BaseException as err:  # handed to the sender, which ends the call with it
                await out.put(err)
                await out.put(_DONE)
            else:
                await out.put(_DONE)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            while True:
                item = await out.get()
                if item is _DONE:
                    break
                if isinstance(item, asyncio.CancelledError | grpc.aio.AbortError):
                    raise item  # a cancel, or kvstore's watch already ended the call with its status
                if isinstance(item, BaseException):
                    await fail(item, context, "Watch")
                assert isinstance(item, rpc_pb2.WatchResponse | tuple)
                for resp in sent(item):
                    yield resp
        finally:
            task.cancel()
            await merged.close()
