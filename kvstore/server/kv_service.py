"""The client KV API (kvstore.v1.KV): requests become proposals and ReadIndex reads on the host.

Every reply's `error` says whether the operation definitely did not happen or may have happened:
validation failures, NOT_LEADER and dropped proposals are definite; a write that was proposed and
then timed out is indeterminate (it may still commit), and the client retries it under the same
session, which the state machine deduplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kvstore import errors
from kvstore.storage import commands
from kvstore.v1 import kv_pb2, kv_pb2_grpc

from .config import DATA_GROUP, NodeConfig
from .host import Host
from .metrics import Metrics
from .reads import ReadPoint, ReplicaReads

log = logging.getLogger("kvstore.kv")


class KVService(kv_pb2_grpc.KVServicer):
    def __init__(
        self, cfg: NodeConfig, host: Host, wake: Any, metrics: Metrics, reads: ReplicaReads | None = None
    ) -> None:
        self.cfg = cfg
        self.host = host
        self.store = host.store
        self.wake = wake
        self.metrics = metrics
        self.group = DATA_GROUP
        self.reads = reads or ReplicaReads(host, request_timeout=cfg.request_timeout)

    # --- helpers ----------------------------------------------------------------------------
    def _check_key(self, key: bytes) -> None:
        if not key:
            raise errors.InvalidArgument("key must not be empty")
        if len(key) > self.cfg.limits.max_key:
            raise errors.KeyTooLarge(len(key), self.cfg.limits.max_key)

    def _check_value(self, value: bytes) -> None:
        if len(value) > self.cfg.limits.max_value:
            raise errors.ValueTooLarge(len(value), self.cfg.limits.max_value)

    async def _write(self, data: bytes) -> Any:
        if len(data) > self.cfg.limits.max_request:
            raise errors.RequestTooLarge(len(data), self.cfg.limits.max_request)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, err: errors.KVError | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(result)

        t0 = loop.time()
        self.host.propose(self.group, data, done)
        self.wake()
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), self.cfg.request_timeout)
        except TimeoutError:
            raise errors.Timeout(
                f"write not applied within {self.cfg.request_timeout:g}s", indeterminate=True
            ) from None
        self.metrics.proposal_seconds.observe(loop.time() - t0)
        if result is not None and result.error:
            # The state machine refused it (e.g. a retry older than the session's ack): no effect.
            raise errors.InvalidArgument(result.error)
        return result

    async def _linearizable(self) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def done(index: int, err: errors.KVError | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(index)

        self.host.read(self.group, done)
        self.wake()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.cfg.request_timeout)
        except TimeoutError:
            raise errors.Timeout(
                f"read not confirmed within {self.cfg.request_timeout:g}s", indeterminate=False
            ) from None

    async def _read_point(self, consistency: int, max_staleness_ms: int = 0) -> ReadPoint:
        """Wait until the group may be read at `consistency` (see reads.py: replicas serve too)."""
        return await self.reads.read_point(self.group, consistency, max_staleness_ms, self._linearizable, self.wake)

    @staticmethod
    def _session(s: kv_pb2.Session) -> tuple[int, int, int]:
        return s.client_id, s.seq, s.ack

    # --- RPCs -------------------------------------------------------------------------------
    async def Get(self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext) -> kv_pb2.GetResponse:
        try:
            self._check_key(request.key)
            point = await self._read_point(request.consistency, request.max_staleness_ms)
            value = self.store.get(self.group, request.key)
            self.metrics.reads.inc()
            return kv_pb2.GetResponse(
                found=value is not None, value=value or b"", index=point.index,
                staleness_ms=point.staleness_ms, node_id=self.cfg.id,
            )
        except errors.KVError as err:
            return kv_pb2.GetResponse(error=errors.to_proto(err))

    async def Put(self, request: kv_pb2.PutRequest, context: grpc.aio.ServicerContext) -> kv_pb2.PutResponse:
        try:
            self._check_key(request.key)
            self._check_value(request.value)
            cid, seq, ack = self._session(request.session)
            await self._write(commands.encode_put(request.key, request.value, cid, seq, ack))
            self.metrics.writes.inc()
            return kv_pb2.PutResponse()
        except errors.KVError as err:
            return kv_pb2.PutResponse(error=errors.to_proto(err))

    async def Delete(self, request: kv_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> kv_pb2.DeleteResponse:
        try:
            self._check_key(request.key)
            cid, seq, ack = self._session(request.session)
            res = await self._write(commands.encode_delete(request.key, cid, seq, ack))
            self.metrics.writes.inc()
            return kv_pb2.DeleteResponse(existed=bool(res.existed))
        except errors.KVError as err:
            return kv_pb2.DeleteResponse(error=errors.to_proto(err))

    async def Cas(self, request: kv_pb2.CasRequest, context: grpc.aio.ServicerContext) -> kv_pb2.CasResponse:
        try:
            self._check_key(request.key)
            self._check_value(request.value)
            self._check_value(request.expected)
            cid, seq, ack = self._session(request.session)
            data = commands.encode_cas(
                request.key, request.expect_absent, request.expected, request.value, cid, seq, ack
            )
            res = await self._write(data)
            self.metrics.writes.inc()
            return kv_pb2.CasResponse(
                swapped=bool(res.swapped), found=bool(res.found), current=res.current or b""
            )
        except errors.KVError as err:
            return kv_pb2.CasResponse(error=errors.to_proto(err))

    async def Scan(
        self, request: kv_pb2.ScanRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.ScanResponse]:
        try:
            if request.prefix:
                start, end = request.prefix, _prefix_end(request.prefix)
            else:
                start, end = request.start, request.end or None
            point = await self._read_point(request.consistency, request.max_staleness_ms)
        except errors.KVError as err:
            yield kv_pb2.ScanResponse(error=errors.to_proto(err))
            return
        limit = request.limit or 0
        sent = 0
        first = True
        for chunk in self.store.scan_chunks(self.group, start, end, limit):
            sent += len(chunk)
            resp = kv_pb2.ScanResponse(items=[kv_pb2.KeyValue(key=k, value=v) for k, v in chunk], more=True)
            if first:
                _scan_meta(resp, point, self.cfg.id)
                first = False
            yield resp
        resp = kv_pb2.ScanResponse(more=False)
        if first:
            _scan_meta(resp, point, self.cfg.id)
        yield resp
        self.metrics.reads.inc()


def _scan_meta(resp: kv_pb2.ScanResponse, point: ReadPoint, node_id: int) -> None:
    """Where the scan was served: on the first message of the stream."""
    resp.index = point.index
    resp.staleness_ms = point.staleness_ms
    resp.node_id = node_id


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key with `prefix` (None: no upper bound)."""
    p = bytearray(prefix)
    while p:
        if p[-1] != 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return None
