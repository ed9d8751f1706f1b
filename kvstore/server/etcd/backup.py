"""The backup `Maintenance.Snapshot` streams, saved in-process as the caller.

`backup/save.py`'s `save_from` runs in a worker thread (it writes the file synchronously); its
reads come from `CallerSource`, which runs each one on the node's event loop through the node's
own request layer with the etcd call's context (`Forwarder.call` / `Forwarder.scan`, the Auth
servicer, the etcd KV servicer's range reading): the guard's record of the caller's identity
(token or client certificate) is carried into the thread and back (`asyncio.to_thread` and
`run_coroutine_threadsafe` copy the context), so RBAC, admission control and the audit log see
the caller, and no client connection back to the node is needed (TLS clusters are served).

Reach: a data group this node does not host is read where it is only with the caller's token
(or on a cluster without TLS), as every etcd call (`forward.py`); leases are listed at every
member reachable so (a member that does not answer is skipped, as the client library's list
does). A caller with a client certificate and no token is refused (FAILED_PRECONDITION,
definite) where the node lacks a data group, before anything is written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Coroutine, Iterator
from typing import Any, TypeVar

import grpc

from kvstore import errors
from kvstore.backup.save import SavedKey, SavedLease, check_exported
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.shard.shardmap import ShardMap
from kvstore.storage import leases
from kvstore.v1 import auth_pb2, kv_pb2

from .base import EtcdNode
from .convert import EtcdRequestError, range_query
from .forward import token_metadata
from .kv import EtcdKV

_T = TypeVar("_T")


class CallerSource:
    """A `backup.save.Source` read as the caller of one etcd call (see the module docstring).
    Its methods are called from a worker thread, never from the loop."""

    def __init__(self, node: EtcdNode, kv: EtcdKV, auth: Any, context: grpc.aio.ServicerContext,
                 loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.n = node
        self.kv = kv
        self.auth = auth
        self.context = context
        self.loop = loop
        self.timeout = timeout

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # --- the checks before anything is written ---------------------------------------------
    def check_reach(self) -> None:
        """FAILED_PRECONDITION (definite) if some data group is neither hosted here nor
        reachable for this caller (a certificate without a token on a TLS cluster)."""
        lacking = [g for g in self.shard_map().data_groups() if g not in self.n.host.groups]
        if lacking and not self.n.forward.may_forward(self.context):
            raise EtcdRequestError(
                "FAILED_PRECONDITION",
                f"kvstore: this node does not host data group(s) {lacking}, which a caller without a token is "
                "not read at on a TLS cluster: send the Snapshot to a node that hosts every group, or log in")

    # --- Source ----------------------------------------------------------------------------
    def export_auth(self) -> bytes:
        async def status() -> auth_pb2.AuthStatusResponse:
            r: auth_pb2.AuthStatusResponse = await self.auth.Status(auth_pb2.AuthStatusRequest(export_state=True),
                                                                     self.context)
            return r

        r = self._run(status())
        return check_exported(r.admin, bytes(r.state))

    def shard_map(self) -> ShardMap:
        return self.n.shard_map()

    def choose_revision(self, timeout: float) -> int:
        q = range_query(rpc_pb2.RangeRequest(key=b"\x00", range_end=b"\x00", limit=1, keys_only=True))
        _items, _count, rev = self._run(self.kv.read_range(q, self.context))
        if rev < 1:
            raise errors.InvalidArgument("the cluster has no revision to save at yet (nothing was ever written)")
        return rev

    def scan_at(self, revision: int, timeout: float) -> Iterator[SavedKey]:
        merged = self._merged(revision)

        async def step() -> kv_pb2.KeyValue | None:
            return await anext(merged, None)

        async def close() -> None:
            await merged.aclose()

        try:
            while (kv := self._run(step())) is not None:
                yield kv
        finally:
            self._run(close())

    def lease_list(self, timeout: float) -> list[int]:
        return self._run(self._lease_ids())

    def lease_time_to_live(self, lease_id: int, timeout: float) -> SavedLease:
        r: kv_pb2.LeaseTimeToLiveResponse = self._run(self.n.forward.call(
            "LeaseTimeToLive", kv_pb2.LeaseTimeToLiveRequest(id=lease_id, keys=True), self.context, is_write=False,
            group=leases.home_group(lease_id)))
        return r

    # --- on the loop -----------------------------------------------------------------------
    async def _group(self, group: int, revision: int) -> AsyncGenerator[kv_pb2.KeyValue, None]:
        """One group's keys at `revision`, in key order (where the group is)."""
        req = kv_pb2.ScanRequest(group=group, revision=revision, consistency=kv_pb2.LINEARIZABLE)
        async for msg in self.n.forward.scan(req, self.context):
            if msg.HasField("error"):
                err = errors.from_proto(msg.error, is_write=False)
                if err is not None:
                    raise err
            for kv in msg.items:
                yield kv

    async def _merged(self, revision: int) -> AsyncGenerator[kv_pb2.KeyValue, None]:
        """Every group's keys at `revision`, merged into ascending key order (a key lives in one
        group)."""
        streams = [self._group(g, revision) for g in self.shard_map().data_groups()]
        heads: dict[int, kv_pb2.KeyValue] = {}
        try:
            for i, s in enumerate(streams):
                async for kv in s:
                    heads[i] = kv
                    break
            while heads:
                i = min(heads, key=lambda j: heads[j].key)
                yield heads.pop(i)
                async for kv in streams[i]:
                    heads[i] = kv
                    break
        finally:
            for s in streams:
                await s.aclose()

    async def _lease_ids(self) -> list[int]:
        """The live leases' ids: this node's replicas' and, for data groups it lacks, every
        other member's reachable for this caller (`Forwarder` rules)."""
        fw = self.n.forward
        ids = set((await fw.call("LeaseLeases", kv_pb2.LeaseLeasesRequest(), self.context, is_write=False)).ids)
        c = fw.caller
        lacking = [g for g in self.shard_map().data_groups() if g not in self.n.host.groups]
        if lacking and c is not None and fw.may_forward(self.context):
            for node, addr in sorted(c.host.members.items()):
                if node == c.node_id or not addr:
                    continue
                try:
                    r = await fw.stub(addr).LeaseLeases(kv_pb2.LeaseLeasesRequest(),
                                                         metadata=token_metadata(self.context), timeout=self.timeout)
                except grpc.aio.AioRpcError:
                    continue  # a member down: its groups' leases come from the other replicas
                if r.error.code == kv_pb2.OK:
                    ids.update(r.ids)
        return sorted(ids)
