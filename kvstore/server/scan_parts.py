"""A range's group parts, read concurrently within one byte budget: the mechanism etcd's Range
(`etcd/kv.py`) and kvstore's Txn with scans (`txn_scans.py`, `remote_reads.py`) share.

- `gather_parts`: the parts' reads, at most `parallel` at once; when one fails every other is
  cancelled and has ended before the failure is raised (a retry never overlaps an old read);
- `ByteBudget`: one budget for all parts of one read (never one per part);
- `PartItems`: one group's items as they stream in, taking their bytes from the shared budget;
  a part stops at the first item that does not fit (it keeps that one: every stopped part holds
  at least one item, so the answer can go up to it);
- `Part`, `combine`: a scan's answer from its parts;
- `retrying`: a part (or a read point) read again after a refusal that passes.

Invariants: the bytes all parts of one read keep are at most the budget plus one item per part;
`combine` returns a prefix of the range in key order, never past a stopped part's last item."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kvstore import errors
from kvstore.shard.ranges import IntervalSet
from kvstore.v1 import kv_pb2

PARALLEL = 8
"""The most group parts of one read made at once (a read over more groups reads the rest as
these finish)."""
T = TypeVar("T")


async def gather_parts(reads: Sequence[Callable[[], Awaitable[T]]], parallel: int = PARALLEL) -> list[T]:
    """Each of `reads` made, at most `parallel` at once: their results in order. If one raises
    (or this is cancelled), the others are cancelled and awaited, then the error is raised."""
    gate = asyncio.Semaphore(parallel)

    async def one(read: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await read()

    tasks = [asyncio.ensure_future(one(r)) for r in reads]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:  # one part failed: the others stop too, and are gone before a retry
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass(slots=True)
class ByteBudget:
    """The bytes the parts of one read keep together: `used` may pass `limit` (`take` says so)."""

    limit: int
    used: int = 0

    def take(self, n: int) -> bool:
        """Take `n` bytes; whether they fit (the total is still within `limit`)."""
        self.used += n
        return self.used <= self.limit

    def give_back(self, n: int) -> None:
        self.used -= n


@dataclass(slots=True)
class PartItems:
    """One group's items of a scan in key order as they are read, their bytes taken from the
    shared `budget`; `cut`: it stopped early (an item did not fit: keys after it were not read)."""

    budget: ByteBudget
    items: list[kv_pb2.KeyValue] = field(default_factory=list)
    size: int = 0
    cut: bool = False

    def add(self, kv: kv_pb2.KeyValue) -> bool:
        """Keep `kv`; whether the part must stop (the budget is spent)."""
        n = kv.ByteSize()
        self.items.append(kv)
        self.size += n
        if not self.budget.take(n):
            self.cut = True
        return self.cut

    def drop(self) -> None:
        """Forget the items (a part read again elsewhere): their bytes go back to the budget."""
        self.budget.give_back(self.size)
        self.items, self.size, self.cut = [], 0, False


@dataclass(slots=True)
class Part:
    """One group's part of a scan: the revision it was served at (the one asked for, or the
    serving replica's applied last for a read of the current state), the hash ranges the group
    owned there, its items in key order (each in the range asked for), and whether it stopped
    early (the budget or the limit: keys after its last item were not read)."""

    revision: int
    owned: IntervalSet
    items: list[kv_pb2.KeyValue]
    cut: bool


def combine(parts: Sequence[Part], limit: int, budget: int) -> tuple[list[kv_pb2.KeyValue], bool, int]:
    """The answer of a scan from its group parts: (the items, a prefix of the range in key
    order: at most `limit` (0: any number), at most `budget` serialized bytes; whether the range
    holds more; the bytes they take). A part that stopped early read nothing after its last
    item, so the answer never goes past the first such item (one that stopped with no item
    read nothing: the answer is empty)."""
    if any(p.cut and not p.items for p in parts):
        return [], True, 0
    ends = [p.items[-1].key for p in parts if p.cut]
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


RETRIED = (errors.ProposalDropped, errors.NoLeader, errors.StaleReplica)
"""Refusals of a read part that an election or a leader's contact ends: a replica that knows no
leader (or lost contact with it) refuses a linearizable read (STALE_REPLICA) until it hears
from one; a read has no effects, so trying again is safe. Also: a transaction holds an intent
on a read key (PROPOSAL_DROPPED), no leader is known (NO_LEADER, an election)."""


async def retrying(attempt_once: Callable[[], Awaitable[T]], tries: int, backoff: float) -> T:
    """`attempt_once()`, made again after a `RETRIED` refusal, `tries` times at most, the
    first retry after `backoff` seconds, each next one after twice as long; the last refusal is
    raised."""
    for attempt in range(tries):
        try:
            return await attempt_once()
        except RETRIED:
            if attempt == tries - 1:
                raise
        await asyncio.sleep(backoff * (1 << attempt))
    raise AssertionError("unreachable")
