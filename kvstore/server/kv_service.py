"""The client KV API (kvstore.v1.KV): the gRPC servicer. Requests become proposals and ReadIndex
reads on the host through `requests.KVRequests`, which the multiplexed `KV.Stream`
(`op_stream.py`) shares, so a unary call and a stream operation get the same answer.

Every reply's `error` says whether the operation definitely did not happen or may have happened:
validation failures, NOT_LEADER and dropped proposals are definite; a write that was proposed and
then timed out is indeterminate (it may still commit), and the client retries it under the same
session, which the state machine deduplicates. No RPC raises: one request's failure, even an
unexpected exception (INTERNAL, logged), is in its reply.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvstore import errors
from kvstore.node.host import Host
from kvstore.node.watch import StoreSource, WatchHub, WatchLimits
from kvstore.security.guard import AuthGuard
from kvstore.storage.errors import StorageError
from kvstore.txnscan import has_scans
from kvstore.v1 import kv_pb2, kv_pb2_grpc

from .admission import Admission
from .compaction import compact_all, keep_rule
from .config import NodeConfig
from .lease_service import LeaseDriver, LeaseRequests
from .metrics import Metrics
from .op_stream import OpStream
from .orphan_sweep import OrphanDriver
from .reads import ReplicaReads
from .requests import KVRequests, add_items
from .shards import GroupCaller, ShardTracker
from .txn_scans import scanning_txn
from .watch_service import WatchService


class KVService(kv_pb2_grpc.KVServicer):
    """The RPCs of `KV`, each a thin wrapper over `KVRequests` (see there for routing and
    ownership)."""

    def __init__(
        self,
        cfg: NodeConfig,
        host: Host,
        wake: Any,
        metrics: Metrics,
        tracker: ShardTracker,
        reads: ReplicaReads | None = None,
        admission: Admission | None = None,
        guard: AuthGuard | None = None,
        caller: GroupCaller | None = None,
    ) -> None:
        self.cfg = cfg
        self.caller = caller
        """Proposes a COMPACT to every group's leader (None: Compact is unavailable)."""
        self.cluster_version: Callable[[], int] | None = None
        """The applied cluster version (the node sets it): Compact uses the keep rule once it
        allows (`compaction.keep_rule`)."""
        self.metrics = metrics
        self.requests = KVRequests(cfg, host, wake, metrics, tracker, reads, admission, guard, caller)
        self.watch_hub = WatchHub(StoreSource(host.store), host.groups.__contains__, WatchLimits())
        """The node's watches (`kvstore/node/watch.py`); the node's Ready loop drives it (`WatchDriver`)."""
        self.watches = WatchService(self.requests, self.watch_hub)
        self.lease_driver = LeaseDriver(self.requests, caller)
        """The node's lease clocks (`node/lessor.py`); the node runs its loop."""
        self.leases = LeaseRequests(self.requests, self.lease_driver.lessors)
        self.orphan_sweep = OrphanDriver(self.requests, caller, cfg.lease_orphan_sweep)
        """The node's orphan-attachment sweeps (`node/orphans.py`); the node runs its loop."""

    async def LeaseGrant(self, request: kv_pb2.LeaseGrantRequest, context: grpc.aio.ServicerContext
                         ) -> kv_pb2.LeaseGrantResponse:
        return await self.leases.grant(request)

    async def LeaseRevoke(self, request: kv_pb2.LeaseRevokeRequest, context: grpc.aio.ServicerContext
                          ) -> kv_pb2.LeaseRevokeResponse:
        return await self.leases.revoke(request)

    async def LeaseKeepAlive(self, request_iterator: AsyncIterator[kv_pb2.LeaseKeepAliveRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[kv_pb2.LeaseKeepAliveResponse]:
        async for resp in self.leases.keep_alive(request_iterator):
            yield resp

    async def LeaseTimeToLive(self, request: kv_pb2.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
                              ) -> kv_pb2.LeaseTimeToLiveResponse:
        return await self.leases.time_to_live(request)

    async def LeaseLeases(self, request: kv_pb2.LeaseLeasesRequest, context: grpc.aio.ServicerContext
                          ) -> kv_pb2.LeaseLeasesResponse:
        return await self.leases.leases(request)

    async def LeasePut(self, request: kv_pb2.LeasePutRequest, context: grpc.aio.ServicerContext) -> kv_pb2.PutResponse:
        return await self.leases.put(request)

    async def Get(self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext | None) -> kv_pb2.GetResponse:
        return await self.requests.get(request)

    async def Put(self, request: kv_pb2.PutRequest, context: grpc.aio.ServicerContext) -> kv_pb2.PutResponse:
        rq = self.requests
        try:
            res = await rq.write(*rq.prepare_put(request))
            self.metrics.writes.inc()
            return rq.put_reply(res)
        except errors.KVError as err:
            return kv_pb2.PutResponse(error=rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.PutResponse(error=rq.err(rq.internal("Put", err)))

    async def Delete(self, request: kv_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> kv_pb2.DeleteResponse:
        rq = self.requests
        try:
            if rq.is_range_delete(request):
                return await rq.delete_range(request)
            res = await rq.write(*rq.prepare_delete(request), delete=True)
            self.metrics.writes.inc()
            return rq.delete_reply(res)
        except errors.KVError as err:
            return kv_pb2.DeleteResponse(error=rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.DeleteResponse(error=rq.err(rq.internal("Delete", err)))

    async def Cas(self, request: kv_pb2.CasRequest, context: grpc.aio.ServicerContext) -> kv_pb2.CasResponse:
        rq = self.requests
        try:
            res = await rq.write(*rq.prepare_cas(request))
            self.metrics.writes.inc()
            return rq.cas_reply(res)
        except errors.KVError as err:
            return kv_pb2.CasResponse(error=rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.CasResponse(error=rq.err(rq.internal("Cas", err)))

    async def Txn(self, request: kv_pb2.TxnRequest, context: grpc.aio.ServicerContext) -> kv_pb2.TxnResponse:
        """A transaction: in one group or across groups (see `KVRequests.txn`); with scans,
        served by this node (`txn_scans.py`)."""
        if has_scans(request.txn):
            return await scanning_txn(self.requests, request, context)
        return await self.requests.txn(request)

    async def Compact(self, request: kv_pb2.CompactRequest, context: grpc.aio.ServicerContext) -> kv_pb2.CompactResponse:
        """Compact every group's history at `revision` (each group clamps it to its own last
        revision; see storage/mvcc.py). A revision below the current compact revision of a group
        is a no-op there. Definite INVALID_ARGUMENT for a revision <= 0 or beyond int64; a group
        that cannot be reached makes the call fail (retrying it is safe: compaction is
        idempotent)."""
        rq = self.requests
        try:
            if self.caller is None:
                raise errors.NoLeader("compaction is not available on this node")
            rev = await compact_all(self.caller, rq.tracker, request.revision, keep_rule(self.cluster_version))
            return kv_pb2.CompactResponse(error=rq.ok(), revision=rev)
        except errors.KVError as err:
            return kv_pb2.CompactResponse(error=rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.CompactResponse(error=rq.err(rq.internal("Compact", err)))

    async def Stream(
        self, request_iterator: AsyncIterator[kv_pb2.OpBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.ResultBatch]:
        """Multiplexed operations (see op_stream.py; a rate limit counts each operation)."""
        async for batch in OpStream(self.requests, context).run(request_iterator):
            yield batch

    async def Watch(
        self, request_iterator: AsyncIterator[kv_pb2.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Change feeds of key ranges, many on one stream (see watch_service.py; the responses
        come serialized)."""
        async for resp in self.watches.watch(request_iterator, context):
            yield resp

    async def Scan(
        self, request: kv_pb2.ScanRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.ScanResponse]:
        """One group's part of a scan: the hash ranges the group serves at the read point (so
        that the client can check that the parts of a fanned-out scan cover the hash space exactly
        once), then the keys in range that the group serves.

        As few messages as the chunks allow (each costs a stream write on both sides): the ranges
        ride with the first chunk and `more=False` with the last, so a scan that fits in one chunk
        is one message. A chunk is held back until the next one (or the end) is known: at most
        two chunks are in memory."""
        rq = self.requests
        try:
            msg, stream = await rq.scan_start(request)
        except errors.KVError as err:
            yield kv_pb2.ScanResponse(error=rq.err(err))
            return
        except Exception as err:
            yield kv_pb2.ScanResponse(error=rq.err(rq.internal("Scan", err)))
            return
        filled = False
        try:
            for chunk in stream:
                if filled:
                    yield msg
                    msg = kv_pb2.ScanResponse(more=True)
                add_items(msg, chunk)
                filled = True
        except StorageError as err:
            yield kv_pb2.ScanResponse(error=rq.err(errors.Unavailable(f"scan interrupted on node {self.cfg.id}: {err}")))
            return
        finally:
            stream.close()
        msg.more = False
        self.metrics.reads.inc()
        yield msg
