"""etcd's `KV` service (Range, Put, DeleteRange, Txn, Compact) over kvstore's KV servicer:
every request checked (`convert.py`), then run as kvstore's own request (Get, Scan, Put,
LeasePut, Delete, Txn, Compact) through `forward.Forwarder`, so routing, validation,
permissions, admission and audit are kvstore's.

A range over several keys reads every data group of the shard map on this node concurrently
(each must be hosted here: a follower or learner serves it after a ReadIndex round),
linearizably unless `serializable`; what all its parts keep is bounded by one budget
(`MAX_RANGE_BYTES`); parts served at different revisions are read again at the highest one, so a
range is one consistent snapshot at one revision (as the client library's scans). Put's prev_kv
and DeleteRange's prev_kv on one key, and Put's ignore_value and ignore_lease, are transactions
(a get, then the write, at one revision; ignore_* compare the value's mod revision or the lease
as read before, and retry). A Txn's DeleteRange over a range is kvstore's range delete inside a
transaction (`_txn_range_deletes`: a two-phase commit over every data group). A Txn whose reads
over several keys come before writes into them, or with such reads and a range delete or writes
in several groups, is kvstore's Txn with scans (`_txn_scanning`: each read at its place)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore import errors
from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.storage import leases, txn
from kvstore.storage.errors import StorageError
from kvstore.txnscan import has_range_deletes
from kvstore.v1 import kv_pb2

from ..scan_parts import PARALLEL, gather_parts, retrying
from ..txn_reading import Exhausted, cut_of, leased, run_reading, unchecked
from ..txn_scans import MAX_TXN_SCAN_BYTES
from ..txn_wire import txn_from_proto
from .base import EtcdNode, fail
from .convert import (
    MAX_INT64,
    KeyRange,
    RangeAnswer,
    RangeQuery,
    TxnPlan,
    check_put,
    compares_lease,
    ignored_puts,
    invalid,
    key_range,
    leased_puts,
    range_query,
    range_reply,
    scan_answers,
    taken_ranges,
    to_mvcc,
    txn_body,
    txn_gets,
    txn_keys,
    txn_reply,
    unsupported,
    with_scans,
)
from .lease import _lease
from .status import KEY_NOT_FOUND, LEASE_NOT_FOUND, EtcdStatus, check_reply

RETRY_BACKOFF = (0.005, 0.16)
"""A Put or Txn with ignore_value / ignore_lease whose guarded TXN lost a race (the key changed
between its read and the TXN, or the replica read lagged) reads again after a backoff growing
from the first to the second (seconds), for at most the forwarder's timeout (then a definite
UNAVAILABLE: `EtcdKV._retries`)."""
MAX_RANGE_BYTES = 64 << 20
"""The most key and value bytes a Range keeps to answer, all its group parts together (a definite
RESOURCE_EXHAUSTED beyond)."""
RANGE_PARALLEL = PARALLEL
"""The most group parts of one Range read at once (`scan_parts.gather_parts`: a Range over many
data groups reads the rest as these finish)."""
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


def _state_of(state: dict[bytes, tuple[kv_pb2.KeyValue | None, int]], key: bytes) -> txn.Current | None:
    """`key`'s state as read (`EtcdKV._current`: the key or None, its lease) for `txn.evaluate`."""
    kv, lease = state[key]
    return None if kv is None else txn.Current(kv.value, kv.create_revision, kv.mod_revision, kv.version, lease)


@dataclass(slots=True)
class _EtcdReading:
    """`txn_reading.ReadingIO` through etcd's forwarder: the cut is a linearizable count-only
    range (`cut`) across every data group, the write one TXN of `group`, the reads `Get`s (a
    key's current lease: a linearizable Get with_lease, `current`)."""

    kv: EtcdKV
    cut_query: RangeQuery
    group: int | None
    context: grpc.aio.ServicerContext

    async def cut(self) -> int:
        _, _, floor = await self.kv._scan(self.cut_query, self.context)
        return cut_of([floor])  # a range read at the highest revision of its parts: 0 if none wrote

    def can_write(self) -> bool:
        return True  # no client session: each write is a new proposal

    async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
        t = await self.kv.n.forward.call("Txn", kv_pb2.TxnRequest(txn=body, session=kv_pb2.Session(revision=floor)),
                                         self.context, is_write=True, group=self.group)
        return t.result, int(t.revision)

    async def get_at(self, key: bytes, revision: int) -> txn.Current | None:
        g = await self.kv.n.forward.call("Get", kv_pb2.GetRequest(key=key, revision=revision), self.context,
                                         is_write=False, group=self.kv.n.group_of(key))
        return txn.Current(g.value, g.create_revision, g.mod_revision, g.version) if g.found else None

    async def current(self, key: bytes) -> txn.Current | None:
        req = kv_pb2.GetRequest(key=key, with_lease=True, consistency=kv_pb2.LINEARIZABLE)
        g = await self.kv.n.forward.call("Get", req, self.context, is_write=False, group=self.kv.n.group_of(key))
        return leased(g)


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

    def _txn_leases(self, items: list[kv_pb2.KeyValue]) -> dict[bytes, int]:
        """`_leases` for a Txn's reads, which may follow its write: a lease table that cannot be
        read (a group dropped from this node meanwhile) reports no leases rather than turn a
        done write into an error."""
        try:
            return self._leases(items)
        except (errors.KVError, StorageError):
            return {}

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

        async def once() -> tuple[list[kv_pb2.KeyValue], int, int, int]:
            items: list[kv_pb2.KeyValue] = []
            count = size = rev = 0
            first = True
            async for msg in self.n.forward.scan(req, context):
                err = errors.from_proto(msg.error, is_write=False) if msg.HasField("error") else None
                if err is not None:
                    budget.give_back(size)
                    raise err
                if first:
                    rev, first = msg.revision, False
                count += len(msg.items)
                kept = msg.items[: max(0, keep - len(items))]
                n = sum(len(kv.key) + (0 if keys_only else len(kv.value)) for kv in kept)
                items.extend(kept)
                size += n
                budget.take(n)
            return items, count, rev, size

        return await retrying(once, RANGE_TRIES, 0.02)

    async def _scan(self, q: RangeQuery, context: grpc.aio.ServicerContext
                    ) -> tuple[list[kv_pb2.KeyValue], int, int]:
        """(the keys kept, in key order; how many the range holds; the revision it was read at)."""
        groups = self.n.shard_map().data_groups()
        consistency = kv_pb2.SERIALIZABLE if q.serializable else kv_pb2.LINEARIZABLE
        keep = _keep(q)
        budget = _Budget()

        async def read(rev: int, gs: list[int]) -> dict[int, tuple[list[kv_pb2.KeyValue], int, int, int]]:
            got = await gather_parts([functools.partial(self._part, q.keys, g, rev, consistency, keep, q.keys_only,
                                                        budget, context) for g in gs], RANGE_PARALLEL)
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

    async def _retries(self) -> AsyncIterator[int]:
        """Attempt numbers 0, 1, ... for a read-then-guarded-TXN loop: each after the first
        after a growing backoff (`RETRY_BACKOFF`), none once the forwarder's timeout since the
        first has passed."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.n.forward.timeout
        delay, cap = RETRY_BACKOFF
        attempt = 0
        while True:
            yield attempt
            attempt += 1
            if loop.time() + delay > end:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)

    # --- Put -----------------------------------------------------------------------------
    async def lease_checked(self, lease_id: int, group: int, context: grpc.aio.ServicerContext) -> int:
        """A put with lease `lease_id` into `group`: when that is not the lease's home, the home
        leader's reading of when the lease was live (`LeasePutRequest.checked`; 0 if it is not:
        the put is then refused where it applies); in the home group its record decides. An id
        that cannot be a lease's, or one homed outside the data groups, is etcd's "requested
        lease not found" (NOT_FOUND, definite: `lease._lease`), never a routing error."""
        _lease(lease_id, self.n.shard_map().data_groups())
        if leases.home_group(lease_id) == group:
            return 0
        t = await self.n.forward.call("LeaseTimeToLive", kv_pb2.LeaseTimeToLiveRequest(id=lease_id), context,
                                      is_write=False, group=leases.home_group(lease_id))
        return int(t.checked) if t.ttl >= 0 else 0

    async def Put(self, request: rpc_pb2.PutRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.PutResponse:
        try:
            check_put(request)
            fw, key = self.n.forward, request.key
            group = self.n.group_of(key)
            checked = await self.lease_checked(request.lease, group, context) if request.lease else 0
            if request.ignore_value or request.ignore_lease:
                return await self._put_reading(request, group, checked, context)
            if request.lease and not request.prev_kv:
                p = await fw.call("LeasePut", kv_pb2.LeasePutRequest(key=key, value=request.value, lease=request.lease,
                                                                     checked=checked),
                                  context, is_write=True, group=group)
                return rpc_pb2.PutResponse(header=self.n.header(p.revision, group))
            if request.prev_kv:
                put = kv_pb2.TxnPut(key=key, value=request.value, lease=request.lease, checked=checked)
                body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(get=key), kv_pb2.TxnOp(put=put)])
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

    async def _current(self, key: bytes, group: int, with_lease: bool, context: grpc.aio.ServicerContext
                       ) -> tuple[kv_pb2.KeyValue | None, int]:
        """(`key` as a linearizable read finds it, None if absent; with `with_lease` the lease it
        is attached to as a replica of its group reports it right after the read, else 0). The
        lease is read on this node's replica where it hosts the group, else by etcd's Range at a
        node that does (`Forwarder.etcd_range`). Either may lag the key's newest write: callers
        compare what they read in the transaction that depends on it."""
        if not with_lease or group in self.n.host.groups:
            items, _, _ = await self._get(range_query(rpc_pb2.RangeRequest(key=key)), context)
            lease = self._leases(items).get(key, 0) if with_lease else 0
            return (items[0] if items else None), lease
        r = await self.n.forward.etcd_range(rpc_pb2.RangeRequest(key=key), context, group)
        if not r.kvs:
            return None, 0
        kv = r.kvs[0]
        return kv_pb2.KeyValue(key=kv.key, value=kv.value, create_revision=kv.create_revision,
                               mod_revision=kv.mod_revision, version=kv.version), kv.lease

    async def _put_reading(self, request: rpc_pb2.PutRequest, group: int, checked: int,
                           context: grpc.aio.ServicerContext) -> rpc_pb2.PutResponse:
        """ignore_value and / or ignore_lease, as etcd's apply reads them: the put keeps the
        key's current value (ignore_value; else the request's) and the lease it is attached to
        (ignore_lease; else the request's, `checked` its home's reading); a key that does not
        exist is etcd's `key not found` (definite). Atomic: the key is read (`_current`), then ONE
        TXN of its group compares what the put depends on as read (the key exists; its mod
        revision for ignore_value; its lease for ignore_lease) and puts (after a get, for
        prev_kv); a compare that fails (the key changed in between, or the replica read lagged)
        reads again after a backoff, within the forwarder's timeout (`_retries`; then a definite
        UNAVAILABLE). A kept lease that is gone while the key is still attached to it (a
        revoke deletes the keys of other groups just after it answered) reads again too: its key
        is about to go."""
        key, fw = request.key, self.n.forward
        async for _ in self._retries():
            cur, lease = await self._current(key, group, request.ignore_lease, context)
            if cur is None:
                raise invalid(KEY_NOT_FOUND)
            compares = [kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_VERSION, result=kv_pb2.GREATER, number=0)]
            if request.ignore_value:
                compares.append(kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_MOD, result=kv_pb2.EQUAL,
                                               number=cur.mod_revision))
            if request.ignore_lease:
                compares.append(kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_LEASE, result=kv_pb2.EQUAL, number=lease))
                checked = await self.lease_checked(lease, group, context) if lease else 0
            else:
                lease = request.lease
            put = kv_pb2.TxnPut(key=key, value=cur.value if request.ignore_value else request.value, lease=lease,
                                checked=checked)
            body = kv_pb2.TxnBody(compares=compares, success=[kv_pb2.TxnOp(get=key), kv_pb2.TxnOp(put=put)])
            try:
                t = await fw.call("Txn", kv_pb2.TxnRequest(txn=body), context, is_write=True, group=group)
            except EtcdStatus as err:
                if not (request.ignore_lease and lease and err.message == LEASE_NOT_FOUND and not err.indeterminate):
                    raise
                continue
            if t.result.succeeded:
                resp = rpc_pb2.PutResponse(header=self.n.header(t.revision, group))
                if request.prev_kv:
                    resp.prev_kv.CopyFrom(to_mvcc(t.result.responses[0].get, lease=lease if request.ignore_lease else 0))
                return resp
        raise EtcdStatus(grpc.StatusCode.UNAVAILABLE,
                         f"kvstore: ignore_value / ignore_lease: the key changed under each try for "
                         f"{self.n.forward.timeout:g} s; nothing was written")

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
            if not body.compares and not body.success and not plan.ranges:
                # Nothing to compare and nothing to do on success: etcd answers "succeeded".
                resp.header.CopyFrom(self.n.header(0))
                resp.succeeded = True
                return resp
            if plan.ranges and (plan.sequential or has_range_deletes(body)
                                or len({self.n.group_of(k) for k in txn_keys(body, gets=False)}) > 1):
                return await self._txn_scanning(body, plan, context)
            if has_range_deletes(body):  # kvstore's range delete: a two-phase commit over every group
                return await self._txn_range_deletes(body, plan, context)
            groups = {self.n.group_of(k) for k in txn_keys(body)}
            one = groups.pop() if len(groups) == 1 else None
            if one is None and plan.ranges:
                # compares and writes in one group: its one-key reads of other groups may be read
                # at the transaction's revision too (`_txn_reading`)
                written = {self.n.group_of(k) for k in txn_keys(body, gets=False)}
                if len(written) <= 1:
                    one = written.pop() if written else None
                    body, plan = txn_body(request, reads_outside=lambda k: self.n.group_of(k) != one)
            if any(ignored_puts(plan, body)):
                if one is None or plan.ranges:
                    raise unsupported("Put's ignore_value or ignore_lease in a transaction whose keys are in several "
                                      "groups or that reads a range (range_end or a revision)")
                return await self._txn_ignoring(body, plan, one, context)
            leased = leased_puts(body)  # across groups too: the two-phase commit carries them (level 7)
            for put in leased:
                put.checked = await self.lease_checked(put.lease, self.n.group_of(put.key), context)
            if plan.ranges:
                return await self._txn_reading(body, plan, one, context)
            t = await self.n.forward.call("Txn", kv_pb2.TxnRequest(txn=body), context, is_write=True, group=one)
            txn_reply(plan, t.result, self.n.header(t.revision, one), resp, None, self._txn_leases(txn_gets(t.result)))
            return resp
        except Exception as err:
            await fail(err, context, "Txn")

    async def _txn_range_deletes(self, body: kv_pb2.TxnBody, plan: TxnPlan, context: grpc.aio.ServicerContext
                                 ) -> rpc_pb2.TxnResponse:
        """A Txn with a DeleteRange over a range: kvstore's Txn with `delete_range` ops, which the
        node runs as a two-phase commit over every data group (atomic at one revision); one with
        reads over several keys or at a revision (or a prev_kv of a range) is `_txn_scanning`'s.
        Puts with ignore_value / ignore_lease (one group's feature) are refused (`unsupported`).
        Leased puts (checked at the lease's home first, as a Put's) and lease compares are
        carried (level 7)."""
        if any(ignored_puts(plan, body)):
            raise unsupported("Put's ignore_lease / ignore_value in a transaction with a range delete")
        for put in leased_puts(body):
            put.checked = await self.lease_checked(put.lease, self.n.group_of(put.key), context)
        t = await self.n.forward.call("Txn", kv_pb2.TxnRequest(txn=body), context, is_write=True)
        resp = rpc_pb2.TxnResponse()
        txn_reply(plan, t.result, self.n.header(t.revision), resp, None, self._txn_leases(txn_gets(t.result)))
        return resp

    async def _txn_scanning(self, body: kv_pb2.TxnBody, plan: TxnPlan, context: grpc.aio.ServicerContext
                            ) -> rpc_pb2.TxnResponse:
        """A Txn with reads over several keys that `_txn_reading` cannot serve: a read before a
        write into it on its path (`TxnPlan.sequential`), a range delete (its prev_kv too: its
        range read right before it, `OpPlan.prev_range`), or compares and writes in several
        groups. Run as kvstore's Txn with each read a scan in its place
        (`convert.with_scans`; `server/txn_scans.py`): one TXN or a two-phase commit at revision
        R, each scan showing the state at its place on the path taken (`kvstore/txnpath.py`),
        as etcd's sequential Txn; a scan reads every key of its range (the count is etcd's), and
        `range_reply` applies the limit, sort and filters; a lease compare is kvstore's (its
        read-only evaluation reads the lease: `txn_reading`). Refused (FAILED_PRECONDITION): a
        read at a revision, a put's ignore_value / ignore_lease here. A scan cut by the
        reply's budget (one for all the Txn's ranges together) fails (RESOURCE_EXHAUSTED;
        indeterminate if the Txn wrote). The header's revision is the one the Txn landed at (its
        write's, or the cut it was evaluated at: `TxnResponse.read_revision`)."""
        if any(q.revision for q in plan.ranges):
            raise unsupported("a range read at a revision in a transaction that writes into a range it read "
                              "before, deletes a range, or has compares and writes in several groups")
        if any(ignored_puts(plan, body)):
            raise unsupported("Put's ignore_value or ignore_lease in a transaction whose keys are in several "
                              "groups or that reads a range (range_end or a revision)")
        for put in leased_puts(body):
            put.checked = await self.lease_checked(put.lease, self.n.group_of(put.key), context)
        t = await self.n.forward.call("Txn", kv_pb2.TxnRequest(txn=with_scans(plan, body)), context, is_write=True)
        wrote = int(t.revision)
        try:
            result, scans = scan_answers(plan, t.result)
        except ValueError as err:
            raise EtcdStatus(grpc.StatusCode.INTERNAL, f"kvstore: {err}", indeterminate=bool(wrote)) from None
        answers: dict[int, RangeAnswer] = {}
        for i, sc in scans.items():
            if sc.more:
                raise EtcdStatus(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"kvstore: the ranges of the transaction hold more than its reply's budget "
                                 f"({MAX_TXN_SCAN_BYTES >> 20} MiB for all of them together; narrower ranges)"
                                 + (f"; the transaction was written at revision {wrote}" if wrote else
                                    "; nothing was written"), indeterminate=bool(wrote))
            items = list(sc.items)
            answers[i] = (items, len(items), {} if plan.ranges[i].count_only else self._txn_leases(items))
        # the revision the Txn landed at (its write's, or the cut it was evaluated at), as the
        # other Txn paths answer; a server before `read_revision`: a scan's, else the current one
        rev = wrote or int(t.read_revision) or max((sc.revision for sc in scans.values()), default=0)
        written = {self.n.group_of(k) for k in txn_keys(body, gets=False)}
        group = written.pop() if wrote and len(written) == 1 and not has_range_deletes(body) else None
        resp = rpc_pb2.TxnResponse()
        txn_reply(plan, result, self.n.header(rev, group), resp, answers, self._txn_leases(txn_gets(result)))
        return resp

    async def _txn_ignoring(self, body: kv_pb2.TxnBody, plan: TxnPlan, group: int,
                            context: grpc.aio.ServicerContext) -> rpc_pb2.TxnResponse:
        """A Txn of ONE `group` (no external ranges) with puts that keep the key's value
        (ignore_value) or lease (ignore_lease), as etcd's apply: such a put on the path taken
        whose key does not exist fails the whole Txn (`etcdserver: key not found`, nothing
        written); else it puts the key's value / lease as they are when the Txn applies.

        kvstore's TXN has no such put, so each try: (1) every key the Txn names is read
        (`_current`: linearizably, with its lease where the Txn keeps or compares one); (2) the
        ignored puts are filled in from what was read (a key is written at most once on a path,
        so what it holds when its put runs is what it held before the Txn), and the Txn is
        evaluated on that state (`txn.evaluate`, pure) to find its path; (3) ONE TXN of the group
        is proposed whose compares guard every key as read (its mod revision, or version 0 if
        absent; its lease where read) and whose success is the filled Txn (one level deeper),
        or nothing when the path puts an absent key (then the guard holding proves the key
        absent at one point: `key not found`). A guard holds only if every key the Txn reads or
        writes is exactly as read, so the filled Txn takes the evaluated path and its puts keep
        what the keys hold: atomic, as etcd's. A failed guard reads again (`_retries`: within the
        forwarder's timeout, then a definite UNAVAILABLE). A Txn nested 4 deep, or too
        large to guard within 128 compares and operations, is refused (FAILED_PRECONDITION)."""
        keys = sorted(set(txn_keys(body)))
        leased_keys = set(keys) if compares_lease(body) else {
            put.key for put, p, _ in ignored_puts(plan, body) if p.ignore_lease}
        fw = self.n.forward
        last: Exception | None = None
        async for _ in self._retries():
            # bounded, and one failing read cancels (and awaits) the others before a retry
            read = await gather_parts([functools.partial(self._current, k, group, k in leased_keys, context)
                                       for k in keys])
            state = dict(zip(keys, read, strict=True))
            filled = kv_pb2.TxnBody()
            filled.CopyFrom(body)
            for put, p, _ in ignored_puts(plan, filled):
                kv, lease = state[put.key]
                if kv is not None:
                    put.value = kv.value if p.ignore_value else put.value
                    put.lease = lease if p.ignore_lease else put.lease
            try:
                out = txn.evaluate(txn_from_proto(filled, unchecked, unchecked), functools.partial(_state_of, state), 1)
            except txn.ResultTooLarge as err:
                raise EtcdStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, f"kvstore: {err}") from None
            taken = [(put, p) for put, p, on in ignored_puts(plan, filled, out.result) if on]
            absent = any(state[put.key][0] is None for put, _ in taken)
            kept = any(p.ignore_lease and put.lease for put, p in taken)  # a lease the Txn keeps
            guards: list[kv_pb2.Compare] = []
            for k in keys:
                kv, lease = state[k]
                guards.append(kv_pb2.Compare(key=k, target=kv_pb2.COMPARE_VERSION, result=kv_pb2.EQUAL, number=0)
                              if kv is None else
                              kv_pb2.Compare(key=k, target=kv_pb2.COMPARE_MOD, result=kv_pb2.EQUAL,
                                             number=kv.mod_revision))
                if k in leased_keys:
                    guards.append(kv_pb2.Compare(key=k, target=kv_pb2.COMPARE_LEASE, result=kv_pb2.EQUAL, number=lease))
            if not absent:
                for put in leased_puts(filled):
                    put.checked = await self.lease_checked(put.lease, group, context)
            outer = kv_pb2.TxnBody(compares=guards, success=[] if absent else [kv_pb2.TxnOp(txn=filled)])  # a copy
            try:
                txn_from_proto(outer, unchecked, unchecked)
            except errors.InvalidArgument:
                raise unsupported("Put's ignore_value or ignore_lease in a transaction nested 4 deep or with too "
                                  "many keys to guard (a compare of each key and one more level)") from None
            try:
                t = await fw.call("Txn", kv_pb2.TxnRequest(txn=outer), context, is_write=True, group=group)
            except EtcdStatus as err:
                if err.message != LEASE_NOT_FOUND or err.indeterminate or not kept:
                    raise
                last = err  # a lease is gone: if the kept one, its key is about to go with it; read again
                continue
            if not t.result.succeeded:
                last = None
                continue
            if absent:
                raise invalid(KEY_NOT_FOUND)
            inner = t.result.responses[0].txn
            resp = rpc_pb2.TxnResponse()
            txn_reply(plan, inner, self.n.header(t.revision, group), resp, None, self._txn_leases(txn_gets(inner)),
                      {k: state[k][1] for k in leased_keys})  # leases as guarded: exact before the Txn
            return resp
        if last is not None:
            raise last
        raise EtcdStatus(grpc.StatusCode.UNAVAILABLE,
                         f"kvstore: the transaction's keys changed under each try for {self.n.forward.timeout:g} s; "
                         "nothing was written")

    async def _txn_reading(self, body: kv_pb2.TxnBody, plan: TxnPlan, group: int | None,
                           context: grpc.aio.ServicerContext) -> rpc_pb2.TxnResponse:
        """A Txn with ranges over several keys (or at a revision, or its one-key reads:
        `TxnPlan.ranges`) whose compares and writes (`body`, with the gets of prev_kv) are all in
        ONE `group` (or there are none): `txn_reading.run_reading` (its docstring gives the
        algorithm and why it is etcd's atomic Txn) finds the revision R the Txn landed at, with
        the cut M a count-only range across every data group (`_scan`), the write `group`'s one
        TXN proposed with floor M, and the keys of a read-only evaluation read exactly at M (a
        compared lease: the key's current lease while its version is still the one at M,
        `_EtcdReading.current`); then every range on the path taken is read exactly at R in every group (at the revision
        it names, if it names one). Keys that changed under each try: a definite UNAVAILABLE."""
        first = plan.ranges[0]
        # a count of one key's range across every data group: a linearizable cut of all groups
        # (any range over several keys reads every group) without scanning the Txn's ranges
        cut = dataclasses.replace(first, revision=0, serializable=False, count_only=True,
                                  keys=KeyRange(first.keys.start, first.keys.start + b"\x00"))
        try:
            landed = await run_reading(body, _EtcdReading(self, cut, group, context))
        except Exhausted as err:
            raise EtcdStatus(grpc.StatusCode.UNAVAILABLE, f"kvstore: {err}") from None
        except txn.ResultTooLarge as err:
            raise EtcdStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, f"kvstore: {err}") from None
        result, rev, wrote = landed.result, landed.revision, landed.wrote
        answers: dict[int, RangeAnswer] = {}
        try:
            for i in taken_ranges(plan, result):
                q = plan.ranges[i]
                at = dataclasses.replace(q, revision=q.revision or rev, serializable=False)
                if at.keys.single:
                    items, _, _ = await self._get(at, context)
                    count = len(items)
                else:
                    items, count, _ = await self._scan(at, context)
                # leases as a Range of the current state reports them (a read at a past revision: none)
                answers[i] = (items, count, {} if q.revision or q.count_only else self._txn_leases(items))
        except Exception as err:
            if not wrote:
                raise
            # the write is done: an error now must not read as "nothing happened"
            detail = err.message if isinstance(err, EtcdStatus) else str(err) or type(err).__name__
            raise EtcdStatus(grpc.StatusCode.UNAVAILABLE,
                             f"kvstore: the transaction was written at revision {rev} but reading its ranges "
                             f"failed: {detail}", indeterminate=True) from None
        resp = rpc_pb2.TxnResponse()
        txn_reply(plan, result, self.n.header(rev, group if wrote else None), resp, answers,
                  self._txn_leases(txn_gets(result)))
        return resp

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
