"""kvstore requests of one etcd call, run in-process as its caller (for the lock and election
services, `recipes.py`).

Every request goes through the node's KV servicer as registered (`Forwarder.call`, the etcd KV
servicer's range reading, the KV servicer's Watch; a watch over a group this node does not host
runs merged across nodes as an etcd watch does, `watch.EtcdWatch.merged`) with the etcd call's
own gRPC context: the
guard recorded the caller's identity (token or client certificate) in the call's task, so RBAC,
admission control and the audit log see the caller, never the node, and nothing opens a client
connection back to the node (so TLS clusters are served the same way).

Invariant: `revision` only grows; it is the highest revision a request of this call was served
or written at (0 before any)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from kvstore import errors
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.keyspace import prefix_end
from kvstore.v1 import kv_pb2

from .base import EtcdNode
from .convert import range_query

if TYPE_CHECKING:
    from .kv import EtcdKV
    from .watch import EtcdWatch

WATCH_ID = 1
"""The id of the one watch a `CallerKV.wait_for` stream opens (kvstore's ids are > 0)."""


class CallerKV:
    """kvstore reads and writes as the caller of one etcd call (see the module docstring)."""

    def __init__(self, node: EtcdNode, kv: EtcdKV, watch: EtcdWatch, context: grpc.aio.ServicerContext) -> None:
        self.n = node
        self.kv = kv
        self.watch = watch
        self.context = context
        self.revision = 0

    def _seen(self, revision: int) -> int:
        self.revision = max(self.revision, revision)
        return revision

    async def scan(self, prefix: bytes) -> tuple[list[kv_pb2.KeyValue], int]:
        """(every key under `prefix`, in key order; the revision they were read at): one
        linearizable snapshot over every data group, as the etcd `KV.Range` of the prefix."""
        q = range_query(rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix) or b"\x00"))
        items, _count, rev = await self.kv.read_range(q, self.context)
        return items, self._seen(rev)

    async def get(self, key: bytes) -> kv_pb2.GetResponse:
        """`key` as a linearizable read at its group finds it."""
        g = await self.n.forward.call("Get", kv_pb2.GetRequest(key=key), self.context, is_write=False,
                                      group=self.n.group_of(key))
        self._seen(g.revision)
        return g

    async def put(self, key: bytes, value: bytes, lease: int) -> int:
        """Put `key` attached to `lease` (as the etcd `KV.Put` with a lease, its lease check
        `EtcdKV.lease_checked`: an id that cannot be a data group's lease is etcd's "requested
        lease not found"); its revision."""
        group = self.n.group_of(key)
        checked = await self.kv.lease_checked(lease, group, self.context)
        p = await self.n.forward.call("LeasePut", kv_pb2.LeasePutRequest(key=key, value=value, lease=lease,
                                                                         checked=checked),
                                      self.context, is_write=True, group=group)
        return self._seen(p.revision)

    async def put_if_created(self, key: bytes, value: bytes, lease: int, create_revision: int) -> int | None:
        """Put `key` attached to `lease` if its create revision is `create_revision`, as ONE
        transaction (etcd's `Election.Proclaim`: `If(CreateRevision(key) == rev)
        Then(Put(key, value, lease))`); the transaction's revision, or None if the compare failed
        (nothing written). A lease that is gone refuses the whole transaction (etcd's
        `requested lease not found`, definite)."""
        group = self.n.group_of(key)
        checked = await self.kv.lease_checked(lease, group, self.context)
        body = kv_pb2.TxnBody(
            compares=[kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_CREATE, result=kv_pb2.EQUAL,
                                     number=create_revision)],
            success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=key, value=value, lease=lease, checked=checked))])
        t = await self.n.forward.call("Txn", kv_pb2.TxnRequest(txn=body), self.context, is_write=True, group=group)
        if not t.result.succeeded:
            return None
        return self._seen(t.revision)

    async def delete(self, key: bytes) -> int:
        """Delete `key`; the delete's revision (0: the key was absent, nothing changed)."""
        d = await self.n.forward.call("Delete", kv_pb2.DeleteRequest(key=key), self.context, is_write=True,
                                      group=self.n.group_of(key))
        return self._seen(d.revision)

    async def delete_if_created(self, key: bytes, create_revision: int) -> int:
        """Delete `key` if its create revision is `create_revision` (one transaction); the
        transaction's revision."""
        body = kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_CREATE, result=kv_pb2.EQUAL,
                                                       number=create_revision)],
                              success=[kv_pb2.TxnOp(delete=key)])
        t = await self.n.forward.call("Txn", kv_pb2.TxnRequest(txn=body), self.context, is_write=True,
                                      group=self.n.group_of(key))
        return self._seen(t.revision)

    async def wait_for(self, create: kv_pb2.WatchCreateRequest, *, deletes_only: bool) -> None:
        """Return once the watch `create` (from its start revision) sees an event (a DELETE if
        `deletes_only`). Raises the kvstore error of a canceled watch (e.g. COMPACTED, or
        WRONG_SHARD where this node does not host the key's group: definite)."""
        create.watch_id = WATCH_ID
        if self.watch.merges(create):
            await self._wait_merged(create, deletes_only=deletes_only)
            return
        done = asyncio.Event()

        async def requests() -> AsyncIterator[kv_pb2.WatchRequest]:
            yield kv_pb2.WatchRequest(create_request=create)
            await done.wait()  # the request side stays open until the event came

        stream = self.n.forward.kv.Watch(requests(), self.context)
        try:
            async for data in stream:
                r = data if isinstance(data, kv_pb2.WatchResponse) else kv_pb2.WatchResponse.FromString(data)
                if r.canceled:
                    err = errors.from_proto(r.error, is_write=False) if r.HasField("error") else None
                    raise err or errors.Unavailable(f"the watch was canceled: {r.cancel_reason}")
                if any(e.type == kv_pb2.Event.DELETE or not deletes_only for e in r.events):
                    self._seen(r.revision)
                    return
            raise errors.Unavailable("the node ended the watch")
        finally:
            done.set()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _wait_merged(self, create: kv_pb2.WatchCreateRequest, *, deletes_only: bool) -> None:
        """`wait_for` of a watch over a data group this node does not host: run merged across
        nodes as an etcd watch of this call (`watch.EtcdWatch.merged`: sub-watches here and at
        peers with the caller's token); a cancel ends the wait with the kvstore error the merged
        watch ended with (`watchmerged.Definite.error`: compacted, permission denied, too many
        watches, ...), as the local path raises the hub's."""
        got: asyncio.Queue[rpc_pb2.WatchResponse] = asyncio.Queue()

        async def emit(resp: rpc_pb2.WatchResponse, _fragment: bool) -> None:
            got.put_nowait(resp)

        merged = self.watch.merged(self.context, emit)
        try:
            await merged.start(0, create, False)
            while True:
                r = await got.get()
                if r.canceled:  # the kvstore error it ended with (compacted, permission, ...)
                    ended = merged.ended.get(0)
                    if ended is not None:
                        raise ended.error_of()
                    raise errors.Unavailable(f"the wait's watch was canceled: {r.cancel_reason}")
                if any(e.type == e.DELETE or not deletes_only for e in r.events):
                    self._seen(r.header.revision)
                    return
        finally:
            await merged.close()
