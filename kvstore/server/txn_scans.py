"""`KV.Txn` with scans (`TxnOp.scan`), served by the node that receives it: the transaction
without its scans (`kvstore.txnscan.split`) runs as any transaction (one group's TXN, or a
two-phase commit across groups: `KVRequests.run_txn`) proposed with the floor of a linearizable
cut of every data group, or, if the branch taken writes nothing, is evaluated read-only at a cut
(`txn_reading.run_reading`: the algorithm and why it is atomic at one revision R); then every
scan on the path taken is read exactly at R in every data group (each must be hosted on this
node: a follower serves its part after a ReadIndex round) and put in its place
(`txnscan.merge`).

Invariants:
- everything is checked (scans' bounds and the refusal rule, the transaction's keys, values
  and permissions, READ on every scan's range) before anything is proposed or read: a refusal
  is definite;
- a scan's parts cover the hash space exactly once (the groups' owned ranges at their read
  points; a range moving between groups reads again), and it is read at R in every group:
  exactly the writes <= R, the transaction's own included;
- all scans of one transaction keep at most `MAX_TXN_SCAN_BYTES` together (with the GETs'
  bounded values the reply stays under the 64 MiB message limit): a scan cut by it (or by its
  limit) says `more`, its items a prefix of the range in key order;
- an error after the transaction wrote is indeterminate (the write is done), never "not
  applied"."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from kvstore import errors
from kvstore.security.rbac import READ
from kvstore.shard.ranges import IntervalSet, covers_once
from kvstore.storage import txn
from kvstore.storage.errors import StorageError
from kvstore.txnscan import ScanRange, merge, split, taken_scans
from kvstore.v1 import kv_pb2

from .requests import KVRequests
from .txn_reading import Exhausted, run_reading

MAX_TXN_SCAN_BYTES = 24 << 20
"""The most serialized item bytes all scans of one transaction return together (the GETs' values
are bounded by `txn.MAX_RESULT_VALUE_BYTES`, 32 MiB: the reply stays under 64 MiB)."""
READ_TRIES = 8
"""A read refused because a transaction holds an intent (PROPOSAL_DROPPED), no leader is known,
or a range is moving between groups is made again this often, with a growing backoff."""
_RETRIED = (errors.ProposalDropped, errors.NoLeader)
T = TypeVar("T")


class _Moving(errors.NoLeader):
    """The parts' owned ranges do not cover the hash space once: a range is moving (retried)."""


@dataclass(slots=True)
class Part:
    """One group's part of a scan: its items in key order, whether it stopped early (the bytes
    budget or the limit: keys after its last item were not read), its owned hash ranges."""

    items: list[kv_pb2.KeyValue]
    cut: bool
    owned: IntervalSet


def combine(parts: list[Part], limit: int, budget: int) -> tuple[list[kv_pb2.KeyValue], bool, int]:
    """The answer of a scan from its group parts: (the items, a prefix of the range in key
    order: at most `limit` (0: any number), at most `budget` serialized bytes; whether the range
    holds more; the bytes they take). A part that stopped early read nothing after its last
    item, so the answer never goes past the first such item."""
    ends = [p.items[-1].key for p in parts if p.cut and p.items]
    upto = min(ends) if ends else None
    merged = sorted((kv for p in parts for kv in p.items if upto is None or kv.key <= upto), key=lambda kv: kv.key)
    more = any(p.cut for p in parts)
    size = 0
    kept: list[kv_pb2.KeyValue] = []
    for kv in merged:
        n = kv.ByteSize()
        if (limit and len(kept) >= limit) or size + n > budget:
            more = True
            break
        kept.append(kv)
        size += n
    return kept, more, size


async def _retrying(attempt_once: Callable[[], Awaitable[T]]) -> T:
    """`attempt_once()`, made again after a retryable refusal (`READ_TRIES` times at most)."""
    for attempt in range(READ_TRIES):
        try:
            return await attempt_once()
        except _RETRIED:
            if attempt == READ_TRIES - 1:
                raise
        await asyncio.sleep(0.01 * (1 << attempt))
    raise AssertionError("unreachable")


class _LocalReading:
    """`txn_reading.ReadingIO` on this node: the cut from every data group's linearizable read
    point here, the write `KVRequests.run_txn` under the request's session, the reads of keys
    at a revision `KVRequests.get`."""

    __slots__ = ("index", "rq", "session")

    def __init__(self, rq: KVRequests, session: kv_pb2.Session) -> None:
        self.rq = rq
        self.session = session
        self.index = 0
        """The applied index of the write's reply (0: none)."""

    def groups(self) -> list[int]:
        m = self.rq.tracker.map
        if m is None:
            raise errors.NoLeader("this node has no shard map yet")
        groups = m.data_groups()
        for g in groups:
            if g not in self.rq.host.groups:
                raise self.rq.wrong_shard(f"a transaction's scans read every data group on the node that receives "
                                          f"it, and group {g} is not on node {self.rq.cfg.id}")
        return groups

    async def cut(self) -> int:
        rq = self.rq

        async def last(g: int) -> int:
            await rq.read_point(g, kv_pb2.LINEARIZABLE)
            return rq.closes.last(g)

        # at least 1: a read at revision 0 would be of the current state, not exact (a store
        # that has written nothing holds nothing at revision 1)
        return max(await asyncio.gather(*(last(g) for g in self.groups())), default=0) or 1

    async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
        s = kv_pb2.Session()
        s.CopyFrom(self.session)
        s.revision = max(s.revision, floor)
        resp = await self.rq.run_txn(kv_pb2.TxnRequest(txn=body, session=s))
        self.index = resp.index
        return resp.result, int(resp.revision)

    async def get_at(self, key: bytes, revision: int) -> txn.Current | None:
        async def once() -> txn.Current | None:
            g = await self.rq.get(kv_pb2.GetRequest(key=key, revision=revision))
            err = errors.from_proto(g.error, is_write=False) if g.error.code else None
            if err is not None:
                raise err
            return txn.Current(g.value, g.create_revision, g.mod_revision, g.version) if g.found else None

        return await _retrying(once)

    async def part(self, g: int, r: ScanRange, revision: int, budget: int) -> Part:
        """Group `g`'s keys of `r` at `revision`, as many as `budget` bytes (and the limit) allow
        plus one."""
        req = kv_pb2.ScanRequest(start=r.start, end=r.end or b"", group=g, revision=revision,
                                 limit=r.limit + 1 if r.limit else 0, consistency=kv_pb2.LINEARIZABLE)
        msg, stream = await self.rq.scan_start(req)
        items: list[kv_pb2.KeyValue] = []
        size, cut = 0, False
        try:
            for chunk in stream:
                for k, v in chunk:
                    m = v.meta
                    kv = kv_pb2.KeyValue(key=k, value=v.value, create_revision=m.create_revision,
                                         mod_revision=m.mod_revision, version=m.version)
                    items.append(kv)
                    size += kv.ByteSize()
                    if size > budget:
                        cut = True
                        break
                if cut:
                    break
        except StorageError as err:
            raise errors.Unavailable(f"scan interrupted on node {self.rq.cfg.id}: {err}") from err
        finally:
            stream.close()
        cut = cut or bool(r.limit and len(items) > r.limit)
        return Part(items, cut, IntervalSet(zip(msg.owned_lo, msg.owned_hi, strict=True)))

    async def scan(self, r: ScanRange, revision: int, budget: list[int]) -> kv_pb2.TxnScanResult:
        """`r` exactly at `revision` across every data group, within `budget[0]` bytes (taken)."""
        groups = self.groups()

        async def once() -> list[Part]:
            parts = await asyncio.gather(*(self.part(g, r, revision, budget[0]) for g in groups))
            if not covers_once(p.owned for p in parts):
                raise _Moving("a range is moving between groups")
            return list(parts)

        parts = await _retrying(once)
        out = kv_pb2.TxnScanResult(revision=revision)
        items, out.more, used = combine(parts, r.limit, budget[0])
        out.items.extend(items)
        budget[0] -= used
        self.rq.metrics.reads.inc()
        return out


async def scanning_txn(rq: KVRequests, r: kv_pb2.TxnRequest) -> kv_pb2.TxnResponse:
    """A whole transaction with scans (see the module docstring), every failure in the reply."""
    wrote = 0
    try:
        body, plan = split(r.txn, rq.cfg.limits.max_key)
        if rq.guard is not None:
            for sr in plan.scans:
                rq.guard.check_range(sr.start, sr.end, READ)
        rq.prepare_txn(kv_pb2.TxnRequest(txn=body))  # checks every key, value and permission; nothing sent
        io = _LocalReading(rq, r.session)
        try:
            landed = await run_reading(body, io)
        except Exhausted as err:
            raise errors.Unavailable(str(err)) from None
        except txn.ResultTooLarge as err:
            raise errors.InvalidArgument(f"invalid transaction: {err}") from None
        if landed.wrote:
            wrote = landed.revision
        answers: dict[int, kv_pb2.TxnScanResult] = {}
        budget = [MAX_TXN_SCAN_BYTES]
        try:
            for i in taken_scans(plan, landed.result):
                answers[i] = await io.scan(plan.scans[i], landed.revision, budget)
        except errors.KVError as err:
            if not wrote:
                raise
            raise errors.Unavailable(f"the transaction was written at revision {wrote} but reading its scans failed: "
                                     f"{err.message}", indeterminate=True) from None
        return kv_pb2.TxnResponse(error=rq.ok(), result=merge(plan, landed.result, answers), index=io.index,
                                  revision=wrote)
    except errors.KVError as err:
        return kv_pb2.TxnResponse(error=rq.err(err))
    except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
        return kv_pb2.TxnResponse(error=rq.err(rq.internal("Txn", err, indeterminate=True if wrote else None)))
