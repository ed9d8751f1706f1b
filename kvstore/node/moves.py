"""Moving hash ranges between groups with their data, while clients keep reading and writing:
the range-move coordinator as synchronous, sans-I/O code.

The coordinator runs on every node and acts only while its node leads the metadata group. It
drives each planned move (see `kvstore.shard.shardmap`) through idempotent steps, so a
coordinator that crashes or loses leadership mid-move is simply resumed by the next one:

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

Why racing coordinators are harmless: every shard command carries its move's id (groups refuse
commands of older moves, so a late FREEZE or DROP of a finished move changes nothing), every
installation attempt draws a fresh install token (a racing coordinator's BEGIN makes the other's
INSTALL and ACTIVATE fail instead of activating half-wiped data), and every map change is a
compare-and-swap in the metadata group whose move states only advance.

Sans I/O: the coordinator never sends anything. A unit of work (`MoveCoordinator.next_work`,
`MoveCoordinator.update`) is a generator that yields requests (`Propose` a command to a group's
leader, read the next `ExportChunk` of frozen ranges from a group's leader, `WaitMap` until this
node's map reaches a version) and is sent each request's outcome; a request that failed for
good is thrown into it as an exception (it propagates: the step is retried from the map later,
which is safe because every step is idempotent). Time comes from the `clock` handed in (used for
statistics only) and install tokens from the `rng` handed in, so the asyncio shell
(`kvstore.server.movedriver`) and the deterministic simulator (`chaos.sim.moves`) drive the same
code.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, MoveState, PendingMove, ShardMap, ShardMapError
from kvstore.storage import commands
from kvstore.storage.commands import ApplyResult
from kvstore.storage.shardcmd import REC_DATA, ShardOp, encode_shard_command, iter_records

log = logging.getLogger("kvstore.moves")

MAX_CAS_ATTEMPTS = 64
"""A map change gives up after this many lost compare-and-swaps in a row (someone else keeps
changing the map); the caller retries later."""


@dataclass(frozen=True, slots=True)
class Propose:
    """Run `data` (a shard command, or a CAS of the map in the metadata group) at `group`'s
    leader until it is applied (outcome: its `ApplyResult`) or fails for good (thrown in).
    Every command the coordinator proposes is idempotent or self-checking, so the shell may
    retry an attempt whose outcome is unknown."""

    group: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ExportChunk:
    """The next chunk of install records (data rows and the session table) of `ranges`, frozen
    in `group`, read at the group's leader after a read barrier (outcome: the records, or None
    after the last chunk). `first` starts a new export; the shell may retry one only before
    its first chunk was handed out (after that, a broken export fails for good)."""

    group: int
    ranges: IntervalSet
    first: bool


@dataclass(frozen=True, slots=True)
class WaitMap:
    """Wait (bounded) until this node's applied map reaches `version` (outcome: whether it did)."""

    version: int


Request = Propose | ExportChunk | WaitMap
Work = Generator[Request, Any, Any]
"""A unit of the coordinator's work: yields requests, is sent their outcomes."""


class MoveFailed(Exception):
    """A step was refused (its group's state machine said why); retried later from the map."""


class MoveCoordinator:
    """The move coordinator of one node (see the module docstring). Not thread-safe; one unit of
    work at a time per coordinator (the shell's job), though map changes (`update`) may run
    beside it."""

    def __init__(self, rng: random.Random, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.rng = rng
        self.clock = clock
        self.moved_keys = 0
        self.last_move: dict[str, float] = {}
        """Statistics of the last completed move: keys, seconds."""
        self._move_started: dict[int, float] = {}
        self._move_keys: dict[int, int] = {}
        self._settled_version = -1

    # --- map changes --------------------------------------------------------------------------
    def update(self, current: ShardMap, raw: bytes, change: Callable[[ShardMap], ShardMap]) -> Work:
        """Apply `change` to the map with compare-and-swap in the metadata group, starting from
        `current` (encoded as `raw`); returns (StopIteration value) the new map once this node's
        map reached it or the wait timed out. A lost CAS retries with the map the metadata group
        holds; `change` raising `ShardMapError` (not allowed) or a refused CAS propagate."""
        m = current
        for _ in range(MAX_CAS_ATTEMPTS):
            new = change(m)
            new.check()
            res: ApplyResult = yield Propose(META_GROUP, commands.encode_cas(SHARD_MAP_KEY, False, raw, new.encode()))
            if res.error:
                raise ShardMapError(f"shard map update refused: {res.error}")
            if res.swapped:
                yield WaitMap(new.version)
                return new
            if res.current is None:
                raise ShardMapError("the shard map is missing from the metadata group")
            raw = res.current
            m = ShardMap.decode(raw)
        raise ShardMapError(f"shard map update lost {MAX_CAS_ATTEMPTS} compare-and-swaps in a row")

    # --- moves --------------------------------------------------------------------------------
    def next_work(self, smap: ShardMap | None, raw: bytes, addresses: dict[int, str]) -> Work | None:
        """The next unit of work given this node's map (None: nothing to do; the usual case is
        cheap). Call while this node leads the metadata group; after the work completes (or
        fails), call again."""
        m = smap
        if m is None:
            return None
        if addresses and addresses != m.nodes:
            return self.update(m, raw, lambda cur: cur.with_nodes(addresses))
        if m.moves:
            return self.drive(m, raw, m.moves[0])
        if m.version == self._settled_version:
            return None  # nothing changed since the last look
        owners = set(m.ring.owners)
        for g in m.data_groups():
            if g not in owners and not m.routes.get(g):
                log.info("dropping data group %d: it serves nothing any more", g)
                return self.update(m, raw, functools.partial(ShardMap.drop_group, group=g))
        self._settled_version = m.version
        return None

    def _shard(self, group: int, op: ShardOp, ranges: IntervalSet, move: int, token: int = 0) -> Work:
        res: ApplyResult = yield Propose(group, encode_shard_command(op, ranges, token=token, move=move))
        if res.error:
            raise MoveFailed(f"{op.name} in group {group} refused: {res.error}")
        return res

    def new_token(self) -> int:
        """A fresh install token (odd, never 0) for one installation attempt."""
        return self.rng.getrandbits(63) | 1

    def drive(self, m: ShardMap, raw: bytes, mv: PendingMove) -> Work:
        """One step of move `mv` (as of map `m`): from its state to the next."""
        started = self._move_started.setdefault(mv.id, self.clock())
        if mv.state == MoveState.PENDING:
            log.info("move %d: freezing %d ranges in group %d (for group %d)", mv.id, len(mv.ranges), mv.source, mv.target)
            yield from self._shard(mv.source, ShardOp.FREEZE, mv.ranges, mv.id)
            yield from self.update(m, raw, lambda cur: cur.set_move_state(mv.id, MoveState.FROZEN))
        elif mv.state == MoveState.FROZEN:
            # A fresh token per attempt: a racing coordinator's BEGIN makes our INSTALL and
            # ACTIVATE fail (and be retried) instead of activating half-wiped data.
            token = self.new_token()
            res = yield from self._shard(mv.target, ShardOp.BEGIN, mv.ranges, mv.id, token)
            if not res.existed:
                keys = 0
                first = True
                while True:
                    records: bytes | None = yield ExportChunk(mv.source, mv.ranges, first)
                    first = False
                    if records is None:
                        break
                    got: ApplyResult = yield Propose(
                        mv.target, encode_shard_command(ShardOp.INSTALL, records=records, token=token, move=mv.id)
                    )
                    if got.error:
                        raise MoveFailed(f"INSTALL in group {mv.target} refused: {got.error}")
                    keys += count_data(records)
                self._move_keys[mv.id] = keys
                yield from self._shard(mv.target, ShardOp.ACTIVATE, mv.ranges, mv.id, token)
            yield from self.update(m, raw, lambda cur: cur.set_move_state(mv.id, MoveState.FLIPPED))
            log.info("move %d: group %d serves the ranges now (%d keys)", mv.id, mv.target, self._move_keys.get(mv.id, -1))
        elif mv.state == MoveState.FLIPPED:
            yield from self._shard(mv.source, ShardOp.DROP, mv.ranges, mv.id)
            yield from self.update(m, raw, lambda cur: cur.finish_move(mv.id))
            keys = self._move_keys.pop(mv.id, 0)
            self.moved_keys += keys
            self.last_move = {"keys": keys, "seconds": self.clock() - started}
            self._move_started.pop(mv.id, None)
            log.info("move %d done: %d keys in %.2fs", mv.id, keys, self.last_move["seconds"])


def count_data(records: bytes) -> int:
    """How many data rows (keys) a chunk of install records holds."""
    return sum(1 for tag, _, _ in iter_records(records) if tag == REC_DATA)
