"""The sans-I/O range-move coordinator (`kvstore.node.moves`) driven by hand: its requests are
answered at once by the real state machine on in-memory groups, so a test can interleave two
coordinators exactly (the races of `chaos/sim/scenarios.py`, without an event loop or a network)."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest

from kvstore.node.moves import ExportChunk, MoveCoordinator, MoveFailed, Propose, Request, WaitMap, Work
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap
from kvstore.storage import commands
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import (
    REC_DATA,
    REC_FLOOR,
    REC_RESULT,
    U64,
    U64_PAIR,
    ShardOp,
    decode_shard_command,
    encode_record,
    encode_shard_command,
    is_shard_command,
)


def export_records(state: DictState, ranges: IntervalSet, chunk_bytes: int) -> list[bytes]:
    """The install records of `ranges` in `state` (data rows, then the session table in LMDB
    row order: a client's floor before its cached results), in chunks, as a store exports them."""
    recs = [encode_record(REC_DATA, k, state.data[k]) for k in sorted(state.data) if key_hash(k) in ranges]
    rows = [(U64.pack(cid), U64.pack(floor)) for cid, floor in state.floors.items()]
    rows += [(U64_PAIR.pack(cid, seq), res) for (cid, seq), res in state.sessions.items()]
    recs += [encode_record(REC_FLOOR if len(k) == 8 else REC_RESULT, k, v) for k, v in sorted(rows)]
    chunks: list[bytes] = []
    buf: list[bytes] = []
    size = 0
    for rec in recs:
        buf.append(rec)
        size += len(rec)
        if size >= chunk_bytes:
            chunks.append(b"".join(buf))
            buf, size = [], 0
    if buf:
        chunks.append(b"".join(buf))
    return chunks


class Groups:
    """In-memory groups applying every request at once (no faults)."""

    def __init__(self, keys: int = 40) -> None:
        self.states: dict[int, DictState] = {META_GROUP: DictState()}
        m0 = ShardMap.initial([1, 2, 3], 1, vnodes=4)
        self.states[META_GROUP].apply(commands.encode_put(SHARD_MAP_KEY, m0.encode()))
        for i in range(keys):
            self.apply(1, commands.encode_put(f"k{i}".encode(), f"v{i}".encode()))

    def current(self) -> tuple[ShardMap, bytes]:
        raw = self.states[META_GROUP].get(SHARD_MAP_KEY)
        assert raw is not None
        return ShardMap.decode(raw), raw

    def apply(self, group: int, data: bytes) -> Any:
        if group not in self.states:
            st = self.states[group] = DictState()
            st.apply(encode_shard_command(ShardOp.SET, self.current()[0].bootstrap_ranges(group)))
        return self.states[group].apply(data)


class Driver:
    """Runs one unit of work; can stop right before a given shard command."""

    def __init__(self, groups: Groups, work: Work) -> None:
        self.g = groups
        self.work = work
        self.chunks: list[bytes] = []
        self.pending: Request | None = None
        self.started = False

    def _outcome(self, req: Request) -> Any:
        if isinstance(req, Propose):
            return self.g.apply(req.group, req.data)
        if isinstance(req, ExportChunk):
            if req.first:
                self.chunks = export_records(self.g.states[req.group], req.ranges, 64)
            return self.chunks.pop(0) if self.chunks else None
        assert isinstance(req, WaitMap)
        return True

    def run(self, stop_before: ShardOp | None = None) -> bool:
        """Go on until done (True) or right before `stop_before` is proposed (False)."""
        try:
            if not self.started:
                self.started = True
                self.pending = next(self.work)
            while True:
                req = self.pending
                assert req is not None
                if (stop_before is not None and isinstance(req, Propose) and is_shard_command(req.data)
                        and decode_shard_command(req.data).op == stop_before):
                    return False
                self.pending = self.work.send(self._outcome(req))
        except StopIteration:
            return True


def settle(g: Groups, c: MoveCoordinator) -> None:
    for _ in range(100):
        m, raw = g.current()
        work = c.next_work(m, raw, {})
        if work is None:
            return
        assert Driver(g, work).run()
    raise AssertionError("the coordinator never settled")


def check_end(g: Groups, r1: IntervalSet, before: dict[bytes, bytes]) -> None:
    m, _ = g.current()
    assert not m.moves
    for gid in m.data_groups():
        sh = g.states[gid].shard_state
        assert sh is not None and not sh.frozen and sh.active == m.routes.get(gid, IntervalSet())
    owner = g.states[m.group_for_hash(next(iter(r1))[0])]
    assert {k: v for k, v in owner.data.items() if key_hash(k) in r1} == before


def _plan_add(g: Groups, c: MoveCoordinator) -> tuple[IntervalSet, dict[bytes, bytes]]:
    m, raw = g.current()
    assert Driver(g, c.update(m, raw, lambda cur: cur.plan_add_group([1, 2, 3]))).run()
    m, _ = g.current()
    r1 = m.moves[0].ranges
    return r1, {k: v for k, v in g.states[1].data.items() if key_hash(k) in r1}


def test_one_coordinator_moves_data_and_finishes() -> None:
    g = Groups()
    c = MoveCoordinator(random.Random(1))
    r1, before = _plan_add(g, c)
    assert before  # the move carries data
    settle(g, c)
    check_end(g, r1, before)
    assert c.moved_keys == len(before)


def _racing_install(g: Groups, a: MoveCoordinator, b: MoveCoordinator) -> None:
    """A installed the move's data and is about to ACTIVATE when B (the new metadata leader)
    starts the same step: B's BEGIN wipes what A installed; then A goes on."""
    r1, before = _plan_add(g, a)
    m, raw = g.current()
    assert Driver(g, a.next_work(m, raw, {}) or iter(())).run()  # FREEZE, map FROZEN
    m, raw = g.current()
    da = Driver(g, a.next_work(m, raw, {}) or iter(()))
    assert not da.run(stop_before=ShardOp.ACTIVATE)
    db = Driver(g, b.next_work(m, raw, {}) or iter(()))
    assert not db.run(stop_before=ShardOp.INSTALL)  # B's BEGIN applied
    with contextlib.suppress(MoveFailed):  # A's ACTIVATE refused: the installation is not the current one any more
        da.run()
    with contextlib.suppress(MoveFailed):
        db.run()
    settle(g, b)
    check_end(g, r1, before)


def test_racing_install_cannot_activate_wiped_data() -> None:
    _racing_install(Groups(), MoveCoordinator(random.Random(1)), MoveCoordinator(random.Random(2)))


def test_racing_install_with_a_shared_token_loses_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race with the planted bug node-shared-install-token: the check above fails."""
    monkeypatch.setattr(MoveCoordinator, "new_token", lambda self: 1)
    with pytest.raises(AssertionError):
        _racing_install(Groups(), MoveCoordinator(random.Random(1)), MoveCoordinator(random.Random(2)))


def test_a_stale_freeze_changes_nothing() -> None:
    """A stops right before FREEZE of move 1; B finishes it, the admin removes the new group,
    B moves the ranges back; then A's FREEZE arrives (move ids fence it off)."""
    g = Groups()
    a, b = MoveCoordinator(random.Random(1)), MoveCoordinator(random.Random(2))
    r1, before = _plan_add(g, a)
    m, raw = g.current()
    da = Driver(g, a.next_work(m, raw, {}) or iter(()))
    assert not da.run(stop_before=ShardOp.FREEZE)
    settle(g, b)
    m, raw = g.current()
    assert Driver(g, b.update(m, raw, lambda cur: cur.plan_remove_group(2))).run()
    settle(g, b)
    with contextlib.suppress(MoveFailed):
        da.run()
    settle(g, b)
    check_end(g, r1, before)


