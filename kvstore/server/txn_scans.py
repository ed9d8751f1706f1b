"""`KV.Txn` with scans (`TxnOp.scan`), served by the node that receives it: the transaction
without its scans (`kvstore.txnscan.split`) runs as any transaction (one group's TXN, or a
two-phase commit across groups: `KVRequests.run_txn`) proposed with the floor of a linearizable
cut of every data group, or, if the branch taken writes nothing, is evaluated read-only at a cut
(`txn_reading.run_reading`: the algorithm and why it is atomic at one revision R); then every
scan on the path taken is read exactly in every data group and put in its place
(`txnscan.merge`), showing the state at its position on the path (etcd's sequential
semantics, `kvstore/txnpath.py`): read at R if the branch taken wrote nothing or no write after
the scan meets its range; else its range outside the ranges deleted before it read at R - 1,
with the keys put before it read at R - 1 too, and the writes before it applied. A group
hosted here is read here (a follower serves its part after a ReadIndex round); one this node
lacks is read at a node that hosts it, as the caller (`remote_reads.RemoteReads`: the caller's
token, so RBAC applies there as here; another replica if one is down, bounded): its part of a
scan, its part of the cut M (a linearizable read point there), the transaction's keys read
at a revision, and the current version and lease of a key a LEASE compare names (a Get
with_lease: how the read-only evaluation knows a key's lease at the cut, `txn_reading`).

Invariants:
- everything is checked (scans' bounds, the transaction's keys, values and permissions, READ
  on every scan's range, and READ on what the read-only evaluation reads: every key the body
  names, written ones too, and every range it deletes) before anything is proposed or read: a
  refusal is definite, and never depends on the data;
- a scan's parts cover the hash space exactly once (the groups' owned ranges at their read
  points; a range moving between groups reads again), and it is read at R (or R - 1, above) in
  exactly the groups of the cut M (every write acknowledged before the call is at or below M
  in one of them): a group the shard map gained since (a split) took no part in M, so a scan
  whose parts do not cover the hash space while the map's data groups differ from the cut's
  starts again from a new cut if nothing was written (`MapChanged`), or fails indeterminate
  after a write;
- a scan's parts are read at most `scan_parts.PARALLEL` at once, keep one byte budget together,
  and when one fails the others are cancelled and gone before anything is read again;
- a read of a group hosted elsewhere is made as the caller, never as this node;
- all scans of one transaction keep at most `MAX_TXN_SCAN_BYTES` together (with the GETs'
  bounded values the reply stays under the 64 MiB message limit): a scan cut by it (or by its
  limit) says `more`, its items a prefix of the range in key order;
- an error after the transaction wrote is indeterminate (the write is done), never "not
  applied"."""

from __future__ import annotations

import functools
from typing import Any

from kvstore import errors
from kvstore.security.rbac import READ
from kvstore.shard.ranges import IntervalSet, covers_once, key_hash
from kvstore.storage import txn
from kvstore.storage.errors import StorageError
from kvstore.txnpath import at_position, path_steps, read_plan, within_budget
from kvstore.txnscan import ScanPlan, ScanRange, merge, split, taken_scans
from kvstore.v1 import kv_pb2

from .remote_reads import RemoteReads
from .requests import KVRequests
from .scan_parts import ByteBudget, Part, PartItems, combine, gather_parts, retrying
from .txn_reading import TXN_READ_TRIES, Exhausted, Reading, cut_of, leased, run_reading

MAX_TXN_SCAN_BYTES = 24 << 20
"""The most serialized item bytes all scans of one transaction return together (the GETs' values
are bounded by `txn.MAX_RESULT_VALUE_BYTES`, 32 MiB: the reply stays under 64 MiB)."""
READ_TRIES = 8
"""A read refused because a transaction holds an intent (PROPOSAL_DROPPED), no leader is known,
or a range is moving between groups is made again this often, with a growing backoff."""
_BACKOFF = 0.01
"""The first retry's backoff (seconds; doubling)."""


class _Moving(errors.NoLeader):
    """The parts' owned ranges do not cover the hash space once, the shard map's data groups
    still those of the cut: a range is moving between them (retried)."""


class MapChanged(Exception):
    """The parts' owned ranges do not cover the hash space once and the shard map's data groups
    are no longer those of the cut: the scans cannot be read at R in the cut's groups (nothing
    written: start again from a new cut; after a write: indeterminate)."""


class _Reading:
    """`txn_reading.ReadingIO` of the node receiving the transaction: the cut from every data
    group's linearizable read point, the write `KVRequests.run_txn` under the request's session,
    the reads of keys at a revision `KVRequests.get`; a group not hosted here is read through
    `remote` (None: no other node, such a group is WRONG_SHARD), a key's current version with its
    lease (`current`, for LEASE compares) a Get with_lease. `probe`: a range the caller may
    read (the first scan's), whose one-key scan at a remote node gives that group's read point.

    `groups`: the data groups of the last cut, exactly the groups every scan reads. Under the
    client's session (`session.client_id`) a write that wrote nothing is never proposed again:
    its retry would answer that first result from the session's cache (`can_write`)."""

    __slots__ = ("groups", "index", "probe", "remote", "rq", "session", "wrote_nothing")

    def __init__(self, rq: KVRequests, session: kv_pb2.Session, remote: RemoteReads | None, probe: ScanRange) -> None:
        self.rq = rq
        self.session = session
        self.remote = remote
        self.probe = probe
        self.index = 0
        """The applied index of the write's reply (0: none)."""
        self.groups: list[int] = []
        self.wrote_nothing = False
        """A write under the session answered that its branch wrote nothing."""

    def map_groups(self) -> list[int]:
        """The data groups of this node's shard map now."""
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

    async def _last(self, g: int) -> int:
        """Group `g`'s applied last revision at a linearizable read point."""
        remote = self._elsewhere(g)
        if remote is None:
            await self.rq.read_point(g, kv_pb2.LINEARIZABLE)
            return self.rq.closes.last(g)
        # a linearizable one-key read there: served at its applied last revision
        req = kv_pb2.ScanRequest(start=self.probe.start, end=self.probe.end or b"", group=g, limit=1,
                                 consistency=kv_pb2.LINEARIZABLE)
        return (await remote.scan(req, ByteBudget(MAX_TXN_SCAN_BYTES))).revision

    async def cut(self) -> int:
        groups = self.map_groups()

        lasts = await gather_parts([functools.partial(retrying, functools.partial(self._last, g), READ_TRIES, _BACKOFF)
                                    for g in groups])
        self.groups = groups
        return cut_of(lasts)

    def can_write(self) -> bool:
        return not (self.wrote_nothing and self.session.client_id)

    async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
        s = kv_pb2.Session()
        s.CopyFrom(self.session)
        s.revision = max(s.revision, floor)
        resp = await self.rq.run_txn(kv_pb2.TxnRequest(txn=body, session=s))
        self.index = resp.index
        if not resp.revision:
            self.wrote_nothing = True
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

        return await retrying(once, READ_TRIES, _BACKOFF)

    async def current(self, key: bytes) -> txn.Current | None:
        """`key`'s current version and lease from one view (a linearizable Get with_lease here,
        or at a node hosting its group: `RemoteReads.get` skips one that reads no lease;
        `txn_reading.leased` refuses such an answer, definite)."""
        req = kv_pb2.GetRequest(key=key, with_lease=True, consistency=kv_pb2.LINEARIZABLE)
        m = self.rq.tracker.map
        group = m.group_for_hash(key_hash(key)) if m is not None else 0
        remote = self._elsewhere(group) if group else None

        async def once() -> txn.Current | None:
            if remote is not None:
                return leased(await remote.get(req, group))
            g = await self.rq.get(req)
            err = errors.from_proto(g.error, is_write=False) if g.error.code else None
            if err is not None:
                raise err
            return leased(g)

        return await retrying(once, READ_TRIES, _BACKOFF)

    async def first_at(self, lo: bytes, hi: bytes, revision: int) -> bytes | None:
        """The first key of [lo, hi) (hi b"": no end) exactly at `revision` in the cut's groups
        (`txn_reading.evaluate_at`; a read cut by the budget before any key answers `lo`: it may
        hold one, so the evaluation takes the range as not empty and starts again)."""
        got = await self.scan(ScanRange(lo, hi or None, 1), revision, [MAX_TXN_SCAN_BYTES])
        return got.items[0].key if got.items else (lo if got.more else None)

    async def part(self, g: int, r: ScanRange, revision: int, budget: ByteBudget) -> Part:
        """Group `g`'s keys of `r` at `revision`, their bytes taken from `budget` (`PartItems`:
        until it is spent, and the limit plus one)."""
        req = kv_pb2.ScanRequest(start=r.start, end=r.end or b"", group=g, revision=revision,
                                 limit=r.limit + 1 if r.limit else 0, consistency=kv_pb2.LINEARIZABLE)
        remote = self._elsewhere(g)
        if remote is not None:
            got = await remote.scan(req, budget)
        else:
            got = await self._local_part(req, budget)
        got.cut = got.cut or bool(r.limit and len(got.items) > r.limit)
        return got

    async def _local_part(self, req: kv_pb2.ScanRequest, budget: ByteBudget) -> Part:
        msg, stream = await self.rq.scan_start(req)
        acc = PartItems(budget)
        try:
            stop = False
            for chunk in stream:
                for k, v in chunk:
                    m = v.meta
                    stop = acc.add(kv_pb2.KeyValue(key=k, value=v.value, create_revision=m.create_revision,
                                                   mod_revision=m.mod_revision, version=m.version))
                    if stop:
                        break
                if stop:
                    break
        except StorageError as err:
            raise errors.Unavailable(f"scan interrupted on node {self.rq.cfg.id}: {err}") from err
        finally:
            stream.close()
        return Part(int(msg.revision), IntervalSet(zip(msg.owned_lo, msg.owned_hi, strict=True)), acc.items, acc.cut)

    async def scan(self, r: ScanRange, revision: int, budget: list[int]) -> kv_pb2.TxnScanResult:
        """`r` exactly at `revision` in the groups of the cut, within `budget[0]` bytes (taken).
        Raises `MapChanged` if the parts do not cover the hash space and the map's groups are
        no longer the cut's (see the module docstring)."""
        groups = self.groups
        if not groups:
            raise AssertionError("a scan is read only after a cut")

        async def once() -> list[Part]:
            shared = ByteBudget(budget[0])  # one budget for this attempt's parts (the last one's are gone)
            parts = await gather_parts([functools.partial(self.part, g, r, revision, shared) for g in groups])
            if not covers_once(p.owned for p in parts):
                if self.map_groups() != groups:
                    raise MapChanged("the shard map's data groups changed since the cut")
                raise _Moving("a range is moving between groups")
            return parts

        parts = await retrying(once, READ_TRIES, _BACKOFF)
        out = kv_pb2.TxnScanResult(revision=revision)
        items, out.more, used = combine(parts, r.limit, budget[0])
        out.items.extend(items)
        budget[0] -= used
        self.rq.metrics.reads.inc()
        return out


async def _answers(io: _Reading, body: kv_pb2.TxnBody, plan: ScanPlan,
                   landed: Reading) -> dict[int, kv_pb2.TxnScanResult]:
    """Every scan on the path `landed` took, by index, each at its position on the path (module
    docstring), all within `MAX_TXN_SCAN_BYTES`."""
    answers: dict[int, kv_pb2.TxnScanResult] = {}
    budget = [MAX_TXN_SCAN_BYTES]
    rev = landed.revision
    if not landed.wrote:
        for i in taken_scans(plan, landed.result):
            answers[i] = await io.scan(plan.scans[i], rev, budget)
        return answers
    steps = path_steps(plan, body, landed.result)
    for at, step in enumerate(steps):
        if step.scan < 0:
            continue
        r = plan.scans[step.scan]
        how = read_plan(steps, at, r)
        if not how.at_before:
            answers[step.scan] = await io.scan(r, rev, budget)
            continue
        parts: list[tuple[list[kv_pb2.KeyValue], bool]] = []
        for sub in how.ranges:
            got = await io.scan(sub, rev - 1, budget)
            parts.append((list(got.items), got.more))
            if got.more:
                break
        found = await gather_parts([functools.partial(io.get_at, k, rev - 1) for k in how.puts])
        items, more = at_position(how, r, rev, parts, dict(zip(how.puts, found, strict=True)))
        items, more, used = within_budget(items, more, rev, budget[0])  # the puts: never read, not yet charged
        budget[0] -= used
        answers[step.scan] = kv_pb2.TxnScanResult(items=items, more=more, revision=rev)
    return answers


async def scanning_txn(rq: KVRequests, r: kv_pb2.TxnRequest, context: Any = None) -> kv_pb2.TxnResponse:
    """A whole transaction with scans (see the module docstring), every failure in the reply.
    `context`: the call's gRPC context (its token goes with reads of groups hosted elsewhere).
    A scan finding the shard map changed since the cut (`MapChanged`) starts the whole reading
    again from a new cut when nothing was written (`TXN_READ_TRIES` times at most, then a
    definite, retryable UNAVAILABLE)."""
    wrote = 0
    try:
        body, plan = split(r.txn, rq.cfg.limits.max_key)
        if rq.guard is not None:
            for sr in plan.scans:
                rq.guard.check_range(sr.start, sr.end, READ)
        t, _ = rq.prepare_txn(kv_pb2.TxnRequest(txn=body))  # checks every key, value and permission; nothing sent
        if rq.guard is not None:
            # the read-only evaluation (when the branch taken writes nothing) reads every key the
            # body names and the first key of each range it deletes, as the caller (at another
            # node too): READ on them, here, so that a refusal is definite and before any proposal
            for key, _written in txn.keys_of(t):
                rq.guard.check_key(key, READ)
            for lo, hi in txn.delete_ranges(t):
                rq.guard.check_range(lo, hi or None, READ)
        io = _Reading(rq, r.session, RemoteReads.of(rq.caller, context, rq.cfg.request_timeout), plan.scans[0])
        for _attempt in range(TXN_READ_TRIES):
            try:
                landed = await run_reading(body, io, first_at=io.first_at)
            except MapChanged:  # a range delete's range read at a new cut: nothing was written
                continue
            except Exhausted as err:
                raise errors.Unavailable(str(err)) from None
            except txn.ResultTooLarge as err:
                raise errors.InvalidArgument(f"invalid transaction: {err}") from None
            if landed.wrote:
                wrote = landed.revision
            try:
                answers = await _answers(io, body, plan, landed)
            except MapChanged as err:
                if wrote:
                    raise errors.Unavailable(f"the transaction was written at revision {wrote} but its scans could not "
                                             f"be read there: {err}", indeterminate=True) from None
                continue
            except errors.KVError as err:
                if not wrote:
                    raise
                raise errors.Unavailable(f"the transaction was written at revision {wrote} but reading its scans "
                                         f"failed: {err.message}", indeterminate=True) from None
            return kv_pb2.TxnResponse(error=rq.ok(), result=merge(plan, landed.result, answers), index=io.index,
                                      revision=wrote, read_revision=landed.revision)
        raise errors.Unavailable(f"the shard map's data groups changed under each of {TXN_READ_TRIES} tries to read "
                                 "the transaction's scans; nothing was written")
    except errors.KVError as err:
        return kv_pb2.TxnResponse(error=rq.err(err))
    except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
        return kv_pb2.TxnResponse(error=rq.err(rq.internal("Txn", err, indeterminate=True if wrote else None)))
