"""The client KV API (kvstore.v1.KV): requests become proposals and ReadIndex reads on the host.

Every reply's `error` says whether the operation definitely did not happen or may have happened:
validation failures, NOT_LEADER and dropped proposals are definite; a write that was proposed and
then timed out is indeterminate (it may still commit), and the client retries it under the same
session, which the state machine deduplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kvstore import errors
from kvstore.node.host import Host
from kvstore.node.store import ReadStream
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import commands
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import StorageError
from kvstore.v1 import kv_pb2, kv_pb2_grpc

from . import waiters
from .config import NodeConfig
from .metrics import Metrics
from .op_stream import OpStream
from .reads import ReadPoint, ReplicaReads
from .shards import ShardTracker

log = logging.getLogger("kvstore.kv")


class KVService(kv_pb2_grpc.KVServicer):
    """Each key is served by the data group the shard map routes it to, if that group is on this
    node (led here, or, for reads, a replica that may serve them; see reads.py). The group itself
    decides ownership: a write it does not own is refused by its state machine (never applied,
    so definite), and a read checks the group's applied ranges at the read point."""

    def __init__(
        self,
        cfg: NodeConfig,
        host: Host,
        wake: Any,
        metrics: Metrics,
        tracker: ShardTracker,
        reads: ReplicaReads | None = None,
    ) -> None:
        self.cfg = cfg
        self.host = host
        self.store = host.store
        self.wake = wake
        self.metrics = metrics
        self.tracker = tracker
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

    def _err(self, err: errors.KVError) -> kv_pb2.Error:
        """The wire error, stamped with our shard map version: a client whose map is older
        refreshes it (a NOT_LEADER may come from routing by a stale map)."""
        e = errors.to_proto(err)
        e.shard_version = self.tracker.version
        return e

    @staticmethod
    def internal(op: str, err: BaseException, *, indeterminate: bool | None = None) -> errors.InternalError:
        """An unexpected exception while serving one operation: logged, and answered as INTERNAL
        for that operation only (indeterminate for a write unless the caller knows it was not
        proposed; a read's is definite on the client whatever this says)."""
        log.error("%s failed unexpectedly: %s: %s", op, type(err).__name__, err, exc_info=err)
        return errors.InternalError(f"{op} failed: {type(err).__name__}: {err}", indeterminate=indeterminate)

    def _ok(self) -> kv_pb2.Error:
        """Success (code OK) carrying our shard map version, so that a client routing by an
        older map learns of the newer one even when its request happened to land right."""
        return kv_pb2.Error(shard_version=self.tracker.version)

    def _wrong_shard(self, message: str) -> errors.WrongShard:
        return errors.WrongShard(message, shard_version=self.tracker.version)

    def _group_for(self, key: bytes) -> int:
        m = self.tracker.map
        if m is None:
            raise errors.NoLeader("this node has no shard map yet")
        gid = m.group_for_key(key)
        if gid not in self.host.groups:
            raise self._wrong_shard(f"the key's group {gid} is not on node {self.cfg.id}")
        return gid

    def _check_owned(self, gid: int, key: bytes) -> None:
        st = self.store.shard_state(gid)
        if st is not None and key_hash(key) not in st.active:
            raise self._wrong_shard(f"group {gid} does not serve the key (it moved)")

    def route_write(self, key: bytes, data: bytes) -> int:
        """The group (led here, serving `key`) to propose the command `data` to; raises a definite
        KVError otherwise."""
        if len(data) > self.cfg.limits.max_request:
            raise errors.RequestTooLarge(len(data), self.cfg.limits.max_request)
        gid = self._group_for(key)
        self._check_owned(gid, key)
        return gid

    def write_outcome(self, gid: int, result: ApplyResult | None) -> ApplyResult | None:
        """The applied command's result, or the definite error its state machine answered."""
        if result is not None and result.wrong_shard:
            raise self._wrong_shard(f"group {gid} no longer serves the key (it moved)")
        if result is not None and result.session_expired:
            # A retry after its session was evicted: not applied now; an earlier attempt may have been.
            raise errors.SessionExpired(f"group {gid}: {result.error}")
        if result is not None and result.error:
            # The state machine refused it (e.g. a retry older than the session's ack): no effect.
            raise errors.InvalidArgument(result.error)
        return result

    async def _write(self, key: bytes, data: bytes) -> Any:
        gid = self.route_write(key, data)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await waiters.propose(self.host, self.wake, gid, data, self.cfg.request_timeout)
        self.metrics.proposal_seconds.observe(loop.time() - t0)
        return self.write_outcome(gid, result)

    # --- requests as commands, results as replies (shared by the unary calls and the stream) --
    def prepare_put(self, r: kv_pb2.PutRequest) -> tuple[bytes, bytes]:
        self._check_key(r.key)
        self._check_value(r.value)
        s = r.session
        return r.key, _encode(commands.encode_put, r.key, r.value, s.client_id, s.seq, s.ack, s.retry, s.horizon)

    def prepare_delete(self, r: kv_pb2.DeleteRequest) -> tuple[bytes, bytes]:
        self._check_key(r.key)
        s = r.session
        return r.key, _encode(commands.encode_delete, r.key, s.client_id, s.seq, s.ack, s.retry, s.horizon)

    def prepare_cas(self, r: kv_pb2.CasRequest) -> tuple[bytes, bytes]:
        self._check_key(r.key)
        self._check_value(r.value)
        self._check_value(r.expected)
        if r.expect_absent and r.expected:
            raise errors.InvalidArgument("a CAS that expects the key absent must not carry an expected value")
        s = r.session
        return r.key, _encode(
            commands.encode_cas, r.key, r.expect_absent, r.expected, r.value, s.client_id, s.seq, s.ack,
            s.retry, s.horizon,
        )

    # Write replies carry the index of the entry that applied them (a committed index: the client
    # learns the group's horizon from it, see kvstore.storage.machine).
    def put_reply(self, res: ApplyResult | None) -> kv_pb2.PutResponse:
        return kv_pb2.PutResponse(error=self._ok(), index=0 if res is None else res.index)

    def delete_reply(self, res: ApplyResult | None) -> kv_pb2.DeleteResponse:
        if res is None:
            return kv_pb2.DeleteResponse(error=self._ok())
        return kv_pb2.DeleteResponse(existed=bool(res.existed), error=self._ok(), index=res.index)

    def cas_reply(self, res: ApplyResult | None) -> kv_pb2.CasResponse:
        if res is None:
            return kv_pb2.CasResponse(error=self._ok())
        return kv_pb2.CasResponse(
            swapped=bool(res.swapped), found=bool(res.found), current=res.current or b"", error=self._ok(),
            index=res.index,
        )

    def get_reply(self, gid: int, key: bytes, point: ReadPoint) -> kv_pb2.GetResponse:
        """Read `key` from `gid`'s local state at `point` (ownership checked at the read point)."""
        self._check_owned(gid, key)
        value = self.store.get(gid, key)
        self.metrics.reads.inc()
        return kv_pb2.GetResponse(
            found=value is not None, value=value or b"", index=point.index,
            staleness_ms=point.staleness_ms, node_id=self.cfg.id, error=self._ok(),
        )

    async def _read_point(self, gid: int, consistency: int, max_staleness_ms: int = 0) -> ReadPoint:
        """Wait until the group may be read at `consistency` (see reads.py: replicas serve too)."""

        def leader_read() -> Awaitable[int]:
            return waiters.read_point(self.host, self.wake, gid, self.cfg.request_timeout)

        return await self.reads.read_point(gid, consistency, max_staleness_ms, leader_read, self.wake)

    @staticmethod
    def _session(s: kv_pb2.Session) -> tuple[int, int, int]:
        return s.client_id, s.seq, s.ack

    # --- RPCs -------------------------------------------------------------------------------
    async def Get(self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext | None) -> kv_pb2.GetResponse:
        try:
            self._check_key(request.key)
            gid = self._group_for(request.key)
            point = await self._read_point(gid, request.consistency, request.max_staleness_ms)
            return self.get_reply(gid, request.key, point)
        except errors.KVError as err:
            return kv_pb2.GetResponse(error=self._err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.GetResponse(error=self._err(self.internal("Get", err)))

    async def Put(self, request: kv_pb2.PutRequest, context: grpc.aio.ServicerContext) -> kv_pb2.PutResponse:
        try:
            res = await self._write(*self.prepare_put(request))
            self.metrics.writes.inc()
            return self.put_reply(res)
        except errors.KVError as err:
            return kv_pb2.PutResponse(error=self._err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.PutResponse(error=self._err(self.internal("Put", err)))

    async def Delete(self, request: kv_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> kv_pb2.DeleteResponse:
        try:
            res = await self._write(*self.prepare_delete(request))
            self.metrics.writes.inc()
            return self.delete_reply(res)
        except errors.KVError as err:
            return kv_pb2.DeleteResponse(error=self._err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.DeleteResponse(error=self._err(self.internal("Delete", err)))

    async def Cas(self, request: kv_pb2.CasRequest, context: grpc.aio.ServicerContext) -> kv_pb2.CasResponse:
        try:
            res = await self._write(*self.prepare_cas(request))
            self.metrics.writes.inc()
            return self.cas_reply(res)
        except errors.KVError as err:
            return kv_pb2.CasResponse(error=self._err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.CasResponse(error=self._err(self.internal("Cas", err)))

    async def Stream(
        self, request_iterator: AsyncIterator[kv_pb2.OpBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.ResultBatch]:
        """Multiplexed operations (see op_stream.py)."""
        async for batch in OpStream(self).run(request_iterator):
            yield batch

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
        try:
            msg, stream = await self._scan_start(request)
        except errors.KVError as err:
            yield kv_pb2.ScanResponse(error=self._err(err))
            return
        except Exception as err:
            yield kv_pb2.ScanResponse(error=self._err(self.internal("Scan", err)))
            return
        filled = False
        try:
            for chunk in stream:
                if filled:
                    yield msg
                    msg = kv_pb2.ScanResponse(more=True)
                _add_items(msg, chunk)
                filled = True
        except StorageError as err:
            yield kv_pb2.ScanResponse(error=self._err(errors.Unavailable(f"scan interrupted on node {self.cfg.id}: {err}")))
            return
        finally:
            stream.close()
        msg.more = False
        self.metrics.reads.inc()
        yield msg

    async def scan_once(self, request: kv_pb2.ScanRequest) -> kv_pb2.ScanResponse:
        """A scan answered in ONE message (for `KV.Stream`): the whole part, from one read
        transaction, if it fits in one chunk; otherwise `more=True` and no items (nothing of it
        is served: the client asks again with `KV.Scan`)."""
        try:
            msg, stream = await self._scan_start(request)
            try:
                first = next(stream, None)
                if first is not None and next(stream, None) is not None:
                    return kv_pb2.ScanResponse(more=True)
            except StorageError as err:
                raise errors.Unavailable(f"scan interrupted on node {self.cfg.id}: {err}") from err
            finally:
                stream.close()
        except errors.KVError as err:
            return kv_pb2.ScanResponse(error=self._err(err))
        except Exception as err:
            return kv_pb2.ScanResponse(error=self._err(self.internal("Scan", err)))
        if first is not None:
            _add_items(msg, first)
        msg.more = False
        self.metrics.reads.inc()
        return msg

    async def _scan_start(
        self, request: kv_pb2.ScanRequest
    ) -> tuple[kv_pb2.ScanResponse, ReadStream[list[tuple[bytes, bytes]]]]:
        """Check the request, wait for its read point and open the scan: the first message (the
        ranges served and where the scan is served, more=True, no items) and the chunks."""
        for name in ("prefix", "start", "end"):
            bound = getattr(request, name)
            if len(bound) > self.cfg.limits.max_key:
                raise errors.KeyTooLarge(message=(
                    f"scan {name} of {len(bound)} bytes is longer than the longest key ({self.cfg.limits.max_key})"
                ))
        if request.prefix:
            start, end = request.prefix, _prefix_end(request.prefix)
        else:
            start, end = request.start, request.end or None
        gid = request.group
        if gid == 0 or gid not in self.host.groups:
            raise self._wrong_shard(f"group {gid} is not on node {self.cfg.id}")
        point = await self._read_point(gid, request.consistency, request.max_staleness_ms)
        st = self.store.shard_state(gid)
        owned = st.active if st is not None else IntervalSet.full()
        stream = self.store.scan_chunks(gid, start, end, request.limit or 0, owned=owned)
        msg = kv_pb2.ScanResponse(more=True, owned_lo=[a for a, _ in owned], owned_hi=[b for _, b in owned])
        _scan_meta(msg, point, self.cfg.id)
        return msg, stream


def _encode(encoder: Callable[..., bytes], *args: Any) -> bytes:
    """A command from checked request fields; whatever the encoder still refuses is the request's
    fault: a definite INVALID_ARGUMENT, never a raw ValueError."""
    try:
        return encoder(*args)
    except ValueError as err:
        raise errors.InvalidArgument(f"invalid request: {err}") from None


def _add_items(msg: kv_pb2.ScanResponse, chunk: list[tuple[bytes, bytes]]) -> None:
    add = msg.items.add  # in place: no KeyValue objects to build and then copy
    for k, v in chunk:
        add(key=k, value=v)


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
