"""Moving hash ranges between groups with their data, while clients keep reading and writing.

The coordinator runs on every node and acts only while its node leads the metadata group. It
drives each planned move (see shardmap.py) through idempotent steps, so a coordinator that
crashes or loses leadership mid-move is simply resumed by the next one:

    PENDING  --FREEZE(ranges) applied in the source-->                      FROZEN   (map CAS)
    FROZEN   --BEGIN, INSTALL chunks, ACTIVATE(ranges) applied in target--> FLIPPED  (map CAS,
                                                                  routes the ranges to the target)
    FLIPPED  --DROP(ranges) applied in the source-->                         removed (map CAS)

Why this is linearizable: the source serves the ranges up to the log position of FREEZE and never
again; their data is immutable from then on. The target serves them only after ACTIVATE, which
follows the installation of exactly that frozen data (and the source's session table, so a write
retried across the move is applied once). Every operation on a key therefore executes in exactly
one group's log, in an order consistent with real time: everything before FREEZE at the source,
everything after ACTIVATE at the target, and in between the key is served by no one (requests get
WRONG_SHARD, which is definite, and clients retry after refreshing the map).

A write refused for ownership is not cached in the session table, so its retry at the target is
applied there; a write applied at the source before FREEZE has its result cached, and the cache
travels with the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from kvstore.storage import commands
from kvstore.storage.commands import ApplyResult
from kvstore.storage.shardcmd import REC_DATA, ShardOp, encode_shard_command, iter_records

from .ranges import IntervalSet
from .shardmap import META_GROUP, SHARD_MAP_KEY, MoveState, PendingMove, ShardMap, ShardMapError

log = logging.getLogger("kvstore.rebalance")


class Cluster(Protocol):
    """What the coordinator needs from its node."""

    def is_meta_leader(self) -> bool: ...

    def current_map(self) -> tuple[ShardMap | None, bytes]: ...

    def node_addresses(self) -> dict[int, str]: ...

    async def propose(self, group: int, data: bytes) -> ApplyResult: ...

    def export(self, group: int, ranges: IntervalSet) -> AsyncIterator[bytes]: ...

    async def wait_map(self, version: int, timeout: float) -> bool: ...


class MoveFailed(Exception):
    pass


class Coordinator:
    def __init__(self, cluster: Cluster, interval: float = 0.2) -> None:
        self.cluster = cluster
        self.interval = interval
        self.wakeup = asyncio.Event()
        self.moved_keys = 0
        self.last_move: dict[str, float] = {}
        """Statistics of the last completed move: keys, seconds."""
        self._move_started: dict[int, float] = {}
        self._move_keys: dict[int, int] = {}
        self._settled_version = -1

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self.interval)
            self.wakeup.clear()
            if not self.cluster.is_meta_leader():
                continue
            try:
                while await self.step():
                    if not self.cluster.is_meta_leader():
                        break
            except asyncio.CancelledError:
                raise
            except Exception as err:  # every step is retried on the next round
                log.warning("shard coordinator: %s", err)
                await asyncio.sleep(0.5)

    async def update(self, change: Callable[[ShardMap], ShardMap], timeout: float = 20.0) -> ShardMap:
        """Apply `change` to the current map with compare-and-swap in the metadata group."""
        end = time.monotonic() + timeout
        m, raw = self.cluster.current_map()
        while time.monotonic() < end:
            if m is None:
                await asyncio.sleep(0.05)
                m, raw = self.cluster.current_map()
                continue
            new = change(m)
            new.check()
            res = await self.cluster.propose(
                META_GROUP, commands.encode_cas(SHARD_MAP_KEY, False, raw, new.encode())
            )
            if res.error:
                raise ShardMapError(f"shard map update refused: {res.error}")
            if res.swapped:
                await self.cluster.wait_map(new.version, 5.0)
                return new
            if res.current is None:
                raise ShardMapError("the shard map is missing from the metadata group")
            raw = res.current
            m = ShardMap.decode(raw)
        raise ShardMapError("shard map update did not complete in time")

    async def step(self) -> bool:
        """Do one step of work; True if something changed (call again at once)."""
        m, _ = self.cluster.current_map()
        if m is None:
            return False
        addrs = self.cluster.node_addresses()
        if addrs and addrs != m.nodes:
            await self.update(lambda cur: cur.with_nodes(addrs))
            return True
        if m.moves:
            await self.drive(m.moves[0])
            return True
        if m.version == self._settled_version:
            return False  # nothing changed since the last look (the usual case: cheap)
        owners = set(m.ring.owners)
        for g in m.data_groups():
            if g not in owners and not m.routes.get(g):
                log.info("dropping data group %d: it serves nothing any more", g)
                await self.update(functools.partial(ShardMap.drop_group, group=g))
                return True
        self._settled_version = m.version
        return False

    async def _shard(self, group: int, op: ShardOp, ranges: IntervalSet, move: int, token: int = 0) -> ApplyResult:
        res = await self.cluster.propose(group, encode_shard_command(op, ranges, token=token, move=move))
        if res.error:
            raise MoveFailed(f"{op.name} in group {group} refused: {res.error}")
        return res

    async def drive(self, mv: PendingMove) -> None:
        started = self._move_started.setdefault(mv.id, time.monotonic())
        if mv.state == MoveState.PENDING:
            log.info("move %d: freezing %d ranges in group %d (for group %d)", mv.id, len(mv.ranges), mv.source, mv.target)
            await self._shard(mv.source, ShardOp.FREEZE, mv.ranges, mv.id)
            await self.update(lambda cur: cur.set_move_state(mv.id, MoveState.FROZEN))
        elif mv.state == MoveState.FROZEN:
            # A fresh token per attempt: a racing coordinator's BEGIN makes our INSTALL and
            # ACTIVATE fail (and be retried) instead of activating half-wiped data.
            token = secrets.randbits(63) | 1
            res = await self._shard(mv.target, ShardOp.BEGIN, mv.ranges, mv.id, token)
            if not res.existed:
                keys = 0
                async for records in self.cluster.export(mv.source, mv.ranges):
                    res = await self.cluster.propose(
                        mv.target, encode_shard_command(ShardOp.INSTALL, records=records, token=token, move=mv.id)
                    )
                    if res.error:
                        raise MoveFailed(f"INSTALL in group {mv.target} refused: {res.error}")
                    keys += _count_data(records)
                self._move_keys[mv.id] = keys
                await self._shard(mv.target, ShardOp.ACTIVATE, mv.ranges, mv.id, token)
            await self.update(lambda cur: cur.set_move_state(mv.id, MoveState.FLIPPED))
            log.info("move %d: group %d serves the ranges now (%d keys)", mv.id, mv.target, self._move_keys.get(mv.id, -1))
        elif mv.state == MoveState.FLIPPED:
            await self._shard(mv.source, ShardOp.DROP, mv.ranges, mv.id)
            await self.update(lambda cur: cur.finish_move(mv.id))
            keys = self._move_keys.pop(mv.id, 0)
            self.moved_keys += keys
            self.last_move = {"keys": keys, "seconds": time.monotonic() - started}
            self._move_started.pop(mv.id, None)
            log.info("move %d done: %d keys in %.2fs", mv.id, keys, self.last_move["seconds"])


def _count_data(records: bytes) -> int:
    return sum(1 for tag, _, _ in iter_records(records) if tag == REC_DATA)
