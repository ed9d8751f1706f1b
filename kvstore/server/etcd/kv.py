"""etcd's `KV` service (Range, Put, DeleteRange, Txn, Compact) over kvstore's KV servicer:
every request checked (`convert.py`), then run as kvstore's own request (Get, Scan, Put,
LeasePut, Delete, Txn, Compact) through `forward.Forwarder`, so routing, validation,
permissions, admission and audit are kvstore's.

A range over several keys reads every data group of the shard map on this node concurrently
(each must be hosted here: a follower or learner serves it after a ReadIndex round),
linearizably unless `serializable`; what all its parts keep is bounded by one budget
(`MAX_RANGE_BYTES`); parts served at different revisions are read again at the highest one, so a
range is one consistent snapshot at one revision (as the client library's scans). Put's prev_kv
and DeleteRange's prev_kv on one key, and Put's ignore_value, are transactions (a get, then the
write, at one revision)."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore import errors
from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.storage import leases
from kvstore.v1 import kv_pb2

from .base import EtcdNode, fail
from .convert import (
    MAX_INT64,
    KeyRange,
    RangeQuery,
    check_put,
    invalid,
    key_range,
    range_query,
    range_reply,
    to_mvcc,
    txn_body,
    txn_keys,
    txn_reply,
)
from .status import KEY_NOT_FOUND, EtcdStatus, check_reply

IGNORE_VALUE_TRIES = 16
"""Put with ignore_value re-reads and retries its compare-and-put this often when the key keeps
changing under it (then a definite UNAVAILABLE)."""
MAX_RANGE_BYTES = 64 << 20
"""The most key and value bytes a Range keeps to answer, all its group parts together (a definite
RESOURCE_EXHAUSTED beyond)."""
RANGE_PARALLEL = 8
"""The most group parts of one Range read at once (a Range over many data groups reads the rest
as these finish)."""
RANGE_TRIES = 8
"""A range part refused because a transaction holds an intent (PROPOSAL_DROPPED, definite) or no
leader is known (an election) is read again this often, with a growing backoff."""


def _keep(q: RangeQuery) -> int:
    """How many keys of each group's part a Range needs: none to count; with a limit on key
    order and no revision filters the first limit + 1 (the parts merge in key order, and the one
    more tells `more`); else all (bounded by MAX_RANGE_BYTES)."""
    if q.count_only:
        return 0
    key_order = q.sort_target == rpc_pb2.RangeRequest.KEY and q.sort_order != rpc_pb2.RangeRequest.DESCEND
    if q.limit and key_order and not (q.min_mod or q.max_mod or q.min_create or q.max_create):
        return q.limit + 1
    return MAX_INT64


@dataclass(slots=True)
class _Budget:
    """The key and value bytes one Range's parts keep (read concurrently, one budget for all):
    `used` never stays above MAX_RANGE_BYTES (`take` raises first)."""

    used: int = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > MAX_RANGE_BYTES:
            raise EtcdStatus(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"kvstore: the range's answer would exceed {MAX_RANGE_BYTES >> 20} MiB: "
                             "ask for fewer keys (limit, a narrower range, keys_only or count_only)")

    def give_back(self, n: int) -> None:
        self.used -= n


def _leases_of(keys: list[bytes], rows: Any) -> dict[bytes, int]:
    return {k: leases.lease_of(rows, k) for k in keys}


class EtcdKV(rpc_pb2_grpc.KVServicer):
    def __init__(self, node: EtcdNode) -> None:
        self.n = node

    # --- Range ---------------------------------------------------------------------------
    async def Range(self, request: rpc_pb2.RangeRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.RangeResponse:
        try:
            q = range_query(request)
            resp = rpc_pb2.RangeResponse()
            if q.keys.single:
                items, rev, group = await self._get(q, context)
                count = len(items)
            else:
                items, count, rev = await self._scan(q, context)
                group = None
            range_reply(q, items, resp, self._leases(items) if not q.revision and not q.count_only else None, count)
            resp.header.CopyFrom(self.n.header(rev, group))
            return resp
        except Exception as err:
            await fail(err, context, "Range")

    async def read_range(self, q: RangeQuery, context: grpc.aio.ServicerContext
                         ) -> tuple[list[kv_pb2.KeyValue], int, int]:
        """A multi-key Range's (kept keys in key order, count, revision read at), as `Range` reads
        it, for the lock and election services (`caller.CallerKV`)."""
        return await self._scan(q, context)

    def leases_of(self, items: list[kv_pb2.KeyValue]) -> dict[bytes, int]:
        """`_leases`: each key's lease on this node's replica of its group (keys of groups not
        hosted here are left out)."""
        return self._leases(items)

    def _leases(self, items: list[kv_pb2.KeyValue]) -> dict[bytes, int]:
        """Each key's lease as attached now on this node's replica of its group (read right after
        the range, so at or after its read point; reads at a past revision report none)."""
        by_group: dict[int, list[bytes]] = {}
        for kv in items:
            by_group.setdefault(self.n.group_of(kv.key), []).append(kv.key)
        out: dict[bytes, int] = {}
        revisions = self.n.requests.store.revisions
        for g, keys in sorted(by_group.items()):
            if g in self.n.host.groups:
                out.update(revisions.read_rows(g, functools.partial(_leases_of, keys)))
        return out

    async def _get(self, q: RangeQuery, context: grpc.aio.ServicerContext
                   ) -> tuple[list[kv_pb2.KeyValue], int, int]:
        r = kv_pb2.GetRequest(key=q.keys.start, revision=q.revision,
                              consistency=kv_pb2.SERIALIZABLE if q.serializable else kv_pb2.LINEARIZABLE)
        group = self.n.group_of(q.keys.start)
        g = await self.n.forward.call("Get", r, context, is_write=False, group=group)
        items = [kv_pb2.KeyValue(key=q.keys.start, value=g.value, create_revision=g.create_revision,
                                 mod_revision=g.mod_revision, version=g.version)] if g.found else []
        return items, g.revision, group

    async def _part(self, keys: KeyRange, group: int, revision: int, consistency: int, keep: int, keys_only: bool,
                    budget: _Budget, context: grpc.aio.ServicerContext) -> tuple[list[kv_pb2.KeyValue], int, int, int]:
        """One group's part of a range: (its first `keep` keys, how many it holds, the revision
        it was read at, the bytes it keeps, taken from `budget`). The scan streams in chunks; what
        all parts keep together is bounded (`MAX_RANGE_BYTES`)."""
        req = kv_pb2.ScanRequest(start=keys.start, end=keys.end or b"", group=group, revision=revision,
                                 consistency=consistency)  # type: ignore[arg-type]
        for attempt in range(RANGE_TRIES):
            items: list[kv_pb2.KeyValue] = []
            count = size = rev = 0
            err: errors.KVError | None = None
            first = True
            async for msg in self.n.forward.scan(req, context):
                err = errors.from_proto(msg.error, is_write=False) if msg.HasField("error") else None
                if err is not None:
                    break
                if first:
                    rev, first = msg.revision, False
                count += len(msg.items)
                kept = msg.items[: max(0, keep - len(items))]
                n = sum(len(kv.key) + (0 if keys_only else len(kv.value)) for kv in kept)
                items.extend(kept)
                size += n
                budget.take(n)
            if err is None:
                return items, count, rev, size
            budget.give_back(size)
            if not isinstance(err, errors.ProposalDropped | errors.NoLeader) or attempt == RANGE_TRIES - 1:
                raise err
            await asyncio.sleep(0.02 * (1 << attempt))
        raise AssertionError("unreachable")

    async def _scan(self, q: RangeQuery, context: grpc.aio.ServicerContext
                    ) -> tuple[list[kv_pb2.KeyValue], int, int]:
        """(the keys kept, in key order; how many the range holds; the revision it was read at)."""
        groups = self.n.shard_map().data_groups()
        consistency = kv_pb2.SERIALIZABLE if q.serializable else kv_pb2.LINEARIZABLE
        keep = _keep(q)
        budget = _Budget()

        gate = asyncio.Semaphore(RANGE_PARALLEL)

        async def part(g: int, rev: int) -> tuple[list[kv_pb2.KeyValue], int, int, int]:
            async with gate:
                return await self._part(q.keys, g, rev, consistency, keep, q.keys_only, budget, context)

        async def read(rev: int, gs: list[int]) -> dict[int, tuple[list[kv_pb2.KeyValue], int, int, int]]:
            tasks = [asyncio.ensure_future(part(g, rev)) for g in gs]
            try:
                got = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:  # one part failed (or the budget ran out): the others stop too
                    t.cancel()
                raise
            return dict(zip(gs, got, strict=True))

        parts = await read(q.revision, groups)
        top = max((p[2] for p in parts.values()), default=0)
        if not q.revision and not q.serializable:
            # one snapshot: every group at the highest revision seen
            behind = [g for g, p in parts.items() if p[2] < top]
            for g in behind:
                budget.give_back(parts[g][3])
            parts.update(await read(top, behind))
        items = sorted((kv for p in parts.values() for kv in p[0]), key=lambda kv: kv.key)
        return items, sum(p[1] for p in parts.values()), q.revision or top

    # --- Put -----------------------------------------------------------------------------
    async def _lease_checked(self, lease_id: int, group: int, context: grpc.aio.ServicerContext) -> int:
        """A put with lease `lease_id` into `group`: when that is not the lease's home, the home
        leader's reading of when the lease was live (`LeasePutRequest.checked`; 0 if it is not:
        the put is then refused where it applies); in the home group its record decides."""
        if lease_id <= 0 or leases.home_group(lease_id) == group or leases.home_group(lease_id) == 0:
            return 0
        t = await self.n.forward.call("LeaseTimeToLive", kv_pb2.LeaseTimeToLiveRequest(id=lease_id), context,
                                      is_write=False, group=leases.home_group(lease_id))
        return int(t.checked) if t.ttl >= 0 else 0

    async def Put(self, request: rpc_pb2.PutRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.PutResponse:
        try:
            check_put(request)
            fw, key = self.n.forward, request.key
            group = self.n.group_of(key)
            if request.lease:
                checked = await self._lease_checked(request.lease, group, context)
                p = await fw.call("LeasePut", kv_pb2.LeasePutRequest(key=key, value=request.value, lease=request.lease,
                                                                     checked=checked),
                                  context, is_write=True, group=group)
                return rpc_pb2.PutResponse(header=self.n.header(p.revision, group))
            if request.ignore_value:
                return await self._put_keeping_value(request, group, context)
            if request.prev_kv:
                body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(get=key),
                                               kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=key, value=request.value))])
                t = await fw.call("Txn", kv_pb2.TxnRequest(txn=body), context, is_write=True, group=group)
                resp = rpc_pb2.PutResponse(header=self.n.header(t.revision, group))
                prev = t.result.responses[0].get
                if prev.key:
                    resp.prev_kv.CopyFrom(to_mvcc(prev))
                return resp
            p = await fw.call("Put", kv_pb2.PutRequest(key=key, value=request.value), context, is_write=True,
                              group=group)
            return rpc_pb2.PutResponse(header=self.n.header(p.revision, group))
        except Exception as err:
            await fail(err, context, "Put")

    async def _put_keeping_value(self, request: rpc_pb2.PutRequest, group: int,
                                 context: grpc.aio.ServicerContext) -> rpc_pb2.PutResponse:
        """ignore_value: put the key's current value again (a new version), as a compare of its
        mod revision and a put, retried while the key changes in between."""
        key, fw = request.key, self.n.forward
        for _ in range(IGNORE_VALUE_TRIES):
            g = await fw.call("Get", kv_pb2.GetRequest(key=key), context, is_write=False, group=group)
            if not g.found:
                raise invalid(KEY_NOT_FOUND)
            body = kv_pb2.TxnBody(
                compares=[kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_MOD, result=kv_pb2.EQUAL, number=g.mod_revision)],
                success=[kv_pb2.TxnOp(get=key), kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=key, value=g.value))],
            )
            t = await fw.call("Txn", kv_pb2.TxnRequest(txn=body), context, is_write=True, group=group)
            if t.result.succeeded:
                resp = rpc_pb2.PutResponse(header=self.n.header(t.revision, group))
                if request.prev_kv:
                    resp.prev_kv.CopyFrom(to_mvcc(t.result.responses[0].get))
                return resp
        raise EtcdStatus(grpc.StatusCode.UNAVAILABLE,
                         f"kvstore: ignore_value: the key changed under each of {IGNORE_VALUE_TRIES} tries; nothing was written")

    # --- DeleteRange ---------------------------------------------------------------------
    async def DeleteRange(self, request: rpc_pb2.DeleteRangeRequest, context: grpc.aio.ServicerContext
                          ) -> rpc_pb2.DeleteRangeResponse:
        try:
            keys = key_range(request.key, request.range_end)
            fw = self.n.forward
            if keys.single:
                group = self.n.group_of(keys.start)
                if request.prev_kv:
                    body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(get=keys.start), kv_pb2.TxnOp(delete=keys.start)])
                    t = await fw.call("Txn", kv_pb2.TxnRequest(txn=body), context, is_write=True, group=group)
                    resp = rpc_pb2.DeleteRangeResponse(header=self.n.header(t.revision, group),
                                                       deleted=1 if t.result.responses[1].delete else 0)
                    prev = t.result.responses[0].get
                    if prev.key:
                        resp.prev_kvs.append(to_mvcc(prev))
                    return resp
                d = await fw.call("Delete", kv_pb2.DeleteRequest(key=keys.start), context, is_write=True, group=group)
                return rpc_pb2.DeleteRangeResponse(header=self.n.header(d.revision, group), deleted=1 if d.existed else 0)
            d = await fw.call("Delete", kv_pb2.DeleteRequest(key=keys.start, range_end=keys.end or b"\x00"),
                              context, is_write=True)
            resp = rpc_pb2.DeleteRangeResponse(header=self.n.header(d.revision), deleted=d.deleted)
            if request.prev_kv and d.deleted:
                resp.prev_kvs.extend(to_mvcc(kv) for kv in await self._deleted(request, d.revision, d.deleted, context))
            return resp
        except Exception as err:
            await fail(err, context, "DeleteRange")

    async def _deleted(self, request: rpc_pb2.DeleteRangeRequest, revision: int, deleted: int,
                       context: grpc.aio.ServicerContext) -> list[kv_pb2.KeyValue]:
        """The keys a range delete at `revision` deleted, as they were before it: the range read
        exactly at `revision` - 1. The delete wrote at `revision` in every group at once
        (kvstore's range delete), so the state at `revision` - 1 is the state it deleted: every
        key present there is one it deleted, nothing can appear between the two, and the read
        finds exactly `deleted` keys. If that read fails (history compacted meanwhile, a budget),
        the delete has still happened: the error says so (indeterminate, never "not done")."""
        try:
            items, count, _ = await self._scan(range_query(rpc_pb2.RangeRequest(
                key=request.key, range_end=request.range_end, revision=revision - 1)), context)
        except Exception as err:
            raise EtcdStatus(grpc.StatusCode.UNAVAILABLE, f"kvstore: the range was deleted at revision {revision}, "
                             f"but reading its previous values failed: {err}", indeterminate=True) from None
        if count != deleted:
            raise EtcdStatus(grpc.StatusCode.INTERNAL, f"kvstore: the range delete at revision {revision} deleted "
                             f"{deleted} keys, but {count} were there before it", indeterminate=True)
        return items

    # --- Txn -----------------------------------------------------------------------------
    async def Txn(self, request: rpc_pb2.TxnRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.TxnResponse:
        try:
            body, plan = txn_body(request)
            resp = rpc_pb2.TxnResponse()
            if not body.compares and not body.success:
                # Nothing to compare and nothing to do on success: etcd answers "succeeded".
                resp.header.CopyFrom(self.n.header(0))
                resp.succeeded = True
                return resp
            groups = {self.n.group_of(k) for k in txn_keys(body)}
            one = groups.pop() if len(groups) == 1 else None
            t = await self.n.forward.call("Txn", kv_pb2.TxnRequest(txn=body), context, is_write=True, group=one)
            txn_reply(plan, t.result, self.n.header(t.revision, one), resp)
            return resp
        except Exception as err:
            await fail(err, context, "Txn")

    # --- Compact -------------------------------------------------------------------------
    async def Compact(self, request: rpc_pb2.CompactionRequest, context: grpc.aio.ServicerContext
                      ) -> rpc_pb2.CompactionResponse:
        try:
            if request.revision <= 0:
                raise invalid(f"etcdserver: compact revision {request.revision} must be positive")
            c = await self.n.forward.kv.Compact(kv_pb2.CompactRequest(revision=request.revision), context)
            check_reply(c.error, is_write=True)
            return rpc_pb2.CompactionResponse(header=self.n.header(c.revision))
        except Exception as err:
            await fail(err, context, "Compact")
