"""`KV.Txn` with scans (`TxnOp.scan`), served by the node that receives it: the transaction
without its scans (`kvstore.txnscan.split`) runs as any transaction (one group's TXN, or a
two-phase commit across groups: `KVRequests.run_txn`) proposed with the floor of a linearizable
cut of every data group, or, if the branch taken writes nothing, is evaluated read-only at a cut
(`txn_reading.run_reading`: the algorithm and why it is atomic at one revision R); then every
scan on the path taken is read exactly at R in every data group and put in its place
(`txnscan.merge`). A group hosted here is read here (a follower serves its part after a
ReadIndex round); one this node lacks is read at a node that hosts it, as the caller
(`remote_reads.RemoteReads`: the caller's token, so RBAC applies there as here; another replica
if one is down, bounded): its part of a scan, its part of the cut M (a linearizable read point
there), and the transaction's keys read at a revision.

Invariants:
- everything is checked (scans' bounds and the refusal rule, the transaction's keys, values
  and permissions, READ on every scan's range) before anything is proposed or read: a refusal
  is definite;
- a scan's parts cover the hash space exactly once (the groups' owned ranges at their read
  points; a range moving between groups reads again), and it is read at R in every group:
  exactly the writes <= R, the transaction's own included;
- a read of a group hosted elsewhere is made as the caller, never as this node;
- all scans of one transaction keep at most `MAX_TXN_SCAN_BYTES` together (with the GETs'
  bounded values the reply stays under the 64 MiB message limit): a scan cut by it (or by its
  limit) says `more`, its items a prefix of the range in key order;
- an error after the transaction wrote is indeterminate (the write is done), never "not
  applied"."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvstore import errors
from kvstore.security.rbac import READ
from kvstore.shard.ranges import IntervalSet, covers_once, key_hash
from kvstore.storage import txn
from kvstore.storage.errors import StorageError
from kvstore.txnscan import ScanRange, merge, split, taken_scans
from kvstore.v1 import kv_pb2

from .remote_reads import RemoteReads
from .requests import KVRequests
from .txn_reading import Exhausted, cut_of, run_reading

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


class _Reading:
    """`txn_reading.ReadingIO` of the node receiving the transaction: the cut from every data
    group's linearizable read point, the write `KVRequests.run_txn` under the request's session,
    the reads of keys at a revision `KVRequests.get`; a group not hosted here is read through
    `remote` (None: no other node, such a group is WRONG_SHARD). `probe`: a range the caller may
    read (the first scan's), whose one-key scan at a remote node gives that group's read point."""

    __slots__ = ("index", "probe", "remote", "rq", "session")

    def __init__(self, rq: KVRequests, session: kv_pb2.Session, remote: RemoteReads | None, probe: ScanRange) -> None:
        self.rq = rq
        self.session = session
        self.remote = remote
        self.probe = probe
        self.index = 0
        """The applied index of the write's reply (0: none)."""

    def groups(self) -> list[int]:
        m = self.rq.tracker.map
        if m is None:
            raise errors.NoLeader("this node has no shard map yet")
        groups = m.data_groups()
        if self.remote is None:
            for g in groups:
                if g not in self.rq.host.groups:
                    raise self.rq.wrong_shard(f"a transaction's scans read every data group, group {g} is not on node "
                                              f"{self.rq.cfg.id}, and it reaches no other node")
        return groups

    def _elsewhere(self, g: int) -> RemoteReads | None:
        """The remote reads of group `g` if it is not hosted here (None: read here)."""
        return None if g in self.rq.host.groups else self.remote

    async def cut(self) -> int:
        rq = self.rq

        async def last(g: int) -> int:
            remote = self._elsewhere(g)
            if remote is None:
                await rq.read_point(g, kv_pb2.LINEARIZABLE)
                return rq.closes.last(g)
            # a linearizable one-key read there: served at its applied last revision
            req = kv_pb2.ScanRequest(start=self.probe.start, end=self.probe.end or b"", group=g, limit=1,
                                     consistency=kv_pb2.LINEARIZABLE)
            return (await _retrying(lambda: remote.scan(req, MAX_TXN_SCAN_BYTES))).revision

        return cut_of(await asyncio.gather(*(last(g) for g in self.groups())))

    async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
        s = kv_pb2.Session()
        s.CopyFrom(self.session)
        s.revision = max(s.revision, floor)
        resp = await self.rq.run_txn(kv_pb2.TxnRequest(txn=body, session=s))
        self.index = resp.index
        return resp.result, int(resp.revision)

    async def get_at(self, key: bytes, revision: int) -> txn.Current | None:
        req = kv_pb2.GetRequest(key=key, revision=revision)
        m = self.rq.tracker.map
        group = m.group_for_hash(key_hash(key)) if m is not None else 0
        remote = self._elsewhere(group) if group else None

        async def once() -> txn.Current | None:
            if remote is not None:
                g = await remote.get(req, group)
            else:
                g = await self.rq.get(req)
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
        remote = self._elsewhere(g)
        if remote is not None:
            got = await remote.scan(req, budget)
            return Part(got.items, got.cut or bool(r.limit and len(got.items) > r.limit), got.owned)
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


async def scanning_txn(rq: KVRequests, r: kv_pb2.TxnRequest, context: Any = None) -> kv_pb2.TxnResponse:
    """A whole transaction with scans (see the module docstring), every failure in the reply.
    `context`: the call's gRPC context (its token goes with reads of groups hosted elsewhere)."""
    wrote = 0
    try:
        body, plan = split(r.txn, rq.cfg.limits.max_key)
        if rq.guard is not None:
            for sr in plan.scans:
                rq.guard.check_range(sr.start, sr.end, READ)
        rq.prepare_txn(kv_pb2.TxnRequest(txn=body))  # checks every key, value and permission; nothing sent
        io = _Reading(rq, r.session, RemoteReads.of(rq.caller, context, rq.cfg.request_timeout), plan.scans[0])
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
