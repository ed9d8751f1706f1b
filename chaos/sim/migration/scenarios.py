"""Scripted interleavings of two real coordinators, for races the random search finds rarely.

A `ScriptedCluster` applies every command at once with the real state machine (no faults) and
lets a script stop one coordinator right before a given shard command and let it go after
another coordinator's command was applied. `python -m chaos.sim.migration --scenario NAME`.

- `racing-install`: an old metadata leader (A) has installed a move's data and is about to
  ACTIVATE when the new leader (B) starts the same step; B's BEGIN wipes what A installed. The
  install tokens make A's ACTIVATE fail, so nothing is lost (this is the race they fixed).
- `stale-freeze`: A stops right before FREEZE of move 1 (group 1 -> new group 2); B does the whole
  move, the admin removes group 2, B moves the ranges back to group 1; then A's FREEZE arrives.
- `stale-drop`: A stops right before DROP of move 1; B finishes move 1, the admin removes group 2,
  B starts moving the ranges back to group 1 (BEGIN, INSTALL); A's DROP arrives before B's
  ACTIVATE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kvstore.server.movedriver import MoveDriver
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap
from kvstore.storage import commands
from kvstore.storage.commands import ApplyResult
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import ShardOp, decode_shard_command, encode_shard_command, is_shard_command

from . import world


@dataclass
class Outcome:
    name: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class ScriptedCluster:
    """`movedriver.Cluster` over shared in-memory groups, for one named coordinator."""

    def __init__(self, name: str, world_: ScriptedWorld) -> None:
        self.name = name
        self.w = world_

    def is_meta_leader(self) -> bool:
        return True

    def current_map(self) -> tuple[ShardMap | None, bytes]:
        raw = self.w.groups[META_GROUP].get(SHARD_MAP_KEY)
        assert raw is not None
        return ShardMap.decode(raw), raw

    def node_addresses(self) -> dict[int, str]:
        return {}

    async def propose(self, group: int, data: bytes) -> ApplyResult:
        op = decode_shard_command(data).op if is_shard_command(data) else None
        hold = self.w.holds.pop((self.name, op), None)
        if hold is not None:
            self.w.say(f"{self.name} stops before {op.name if op else '?'}")
            await hold.wait()
            self.w.say(f"{self.name} resumes")
        res = self.w.apply(group, data)
        if op is not None:
            g = self.w.groups[group]
            outcome = f"refused: {res.error}" if res.error else "existed" if res.existed else "ok"
            self.w.say(f"{self.name}: group {group} <- {op.name}: {outcome} ({len(g.data)} keys)")
            after = self.w.after.pop((self.name, op), None)
            if after is not None:
                after.set()
        await asyncio.sleep(0)
        return res

    async def export(self, group: int, ranges: IntervalSet) -> AsyncIterator[bytes]:
        for chunk in world.export_records(self.w.groups[group], ranges, 1 << 20):
            await asyncio.sleep(0)
            yield chunk

    async def wait_map(self, version: int, timeout: float) -> bool:
        return True


class ScriptedWorld:
    def __init__(self, out: Outcome, keys: int = 40) -> None:
        self.out = out
        self.groups: dict[int, DictState] = {META_GROUP: DictState()}
        self.holds: dict[tuple[str, ShardOp | None], asyncio.Event] = {}
        self.after: dict[tuple[str, ShardOp | None], asyncio.Event] = {}
        m0 = ShardMap.initial([1, 2, 3], 1, vnodes=4)
        self.groups[META_GROUP].apply(commands.encode_put(SHARD_MAP_KEY, m0.encode()))
        self.apply(1, b"")  # creates group 1
        for i in range(keys):
            self.apply(1, commands.encode_put(f"k{i}".encode(), f"v{i}".encode()))

    def say(self, line: str) -> None:
        self.out.lines.append(line)

    def apply(self, group: int, data: bytes) -> ApplyResult:
        if group not in self.groups:
            raw = self.groups[META_GROUP].get(SHARD_MAP_KEY)
            assert raw is not None
            st = self.groups[group] = DictState()
            st.apply(encode_shard_command(ShardOp.SET, ShardMap.decode(raw).bootstrap_ranges(group)))
        return self.groups[group].apply(data) if data else ApplyResult()

    def coordinator(self, name: str) -> MoveDriver:
        return MoveDriver(ScriptedCluster(name, self))

    def stop_before(self, name: str, op: ShardOp) -> asyncio.Event:
        ev = self.holds[(name, op)] = asyncio.Event()
        return ev

    def when_applied(self, name: str, op: ShardOp, ev: asyncio.Event) -> None:
        self.after[(name, op)] = ev


async def _settle(c: MoveDriver) -> None:
    while await c.step():
        pass


async def _finish(task: asyncio.Task[Any], w: ScriptedWorld) -> None:
    try:
        await task
    except Exception as err:  # a refused step: the coordinator would retry it later
        w.say(f"  ({type(err).__name__}: {err})")


def _check_end(w: ScriptedWorld, r1: IntervalSet, keys_before: dict[bytes, bytes]) -> None:
    m, _ = ScriptedCluster("check", w).current_map()
    assert m is not None
    out = w.out
    if m.moves:
        out.problems.append(f"moves left: {m.moves}")
    for gid, st in w.groups.items():
        if gid == META_GROUP or st.shard_state is None or gid not in m.groups:
            continue
        routes = m.routes.get(gid, IntervalSet())
        if st.shard_state.frozen:
            out.problems.append(f"group {gid} has ranges frozen with no move: they are served by no one")
        if st.shard_state.active != routes:
            out.problems.append(f"group {gid} serves other ranges than the map routes to it")
    owner = m.group_for_hash(next(iter(r1))[0])
    have = {k: v for k, v in w.groups[owner].data.items() if key_hash(k) in r1}
    if have != keys_before:
        out.problems.append(f"{len(keys_before) - len(have)} of the {len(keys_before)} keys of the moved "
                            f"ranges are gone from group {owner}, which serves them")


async def racing_install(out: Outcome) -> None:
    w = ScriptedWorld(out)
    a, b = w.coordinator("A"), w.coordinator("B")
    await a.update(lambda cur: cur.plan_add_group([1, 2, 3]))
    m, _ = a.cluster.current_map()
    assert m is not None
    r1 = m.moves[0].ranges
    before = {k: v for k, v in w.groups[1].data.items() if key_hash(k) in r1}
    assert await a.step()  # FREEZE
    resume = w.stop_before("A", ShardOp.ACTIVATE)
    w.when_applied("B", ShardOp.BEGIN, resume)  # A goes on right after B's BEGIN ...
    hold_b = w.stop_before("B", ShardOp.INSTALL)  # ... before B installs anything
    ta = asyncio.ensure_future(a.step())
    await asyncio.sleep(0.01)
    tb = asyncio.ensure_future(b.step())
    await asyncio.sleep(0.01)
    hold_b.set()
    await _finish(ta, w)
    await _finish(tb, w)
    await _settle(b)
    _check_end(w, r1, before)


async def stale_freeze(out: Outcome) -> None:
    await _stale(out, ShardOp.FREEZE)


async def stale_drop(out: Outcome) -> None:
    await _stale(out, ShardOp.DROP)


async def _stale(out: Outcome, op: ShardOp) -> None:
    w = ScriptedWorld(out)
    a, b = w.coordinator("A"), w.coordinator("B")
    await a.update(lambda cur: cur.plan_add_group([1, 2, 3]))  # move 1: group 1 -> group 2
    m, _ = a.cluster.current_map()
    assert m is not None
    r1 = m.moves[0].ranges
    before = {k: v for k, v in w.groups[1].data.items() if key_hash(k) in r1}
    resume = w.stop_before("A", op)
    if op == ShardOp.DROP:
        assert await a.step() and await a.step()  # A: FREEZE ... FLIPPED
    ta = asyncio.ensure_future(a.step())  # A stops before `op`
    await asyncio.sleep(0.01)
    w.say("B, the new metadata leader, finishes move 1; the admin removes group 2 (move 2: back to group 1)")
    await _settle(b)
    await b.update(lambda cur: cur.plan_remove_group(2))
    if op == ShardOp.DROP:
        w.when_applied("B", ShardOp.INSTALL, resume)  # A goes on after B's INSTALL ...
        hold_b = w.stop_before("B", ShardOp.ACTIVATE)  # ... and before B's ACTIVATE
        tb = asyncio.ensure_future(_settle(b))
        await asyncio.sleep(0.01)
        hold_b.set()
        await _finish(tb, w)
    else:
        await _settle(b)
        resume.set()
    await _finish(ta, w)
    await _settle(b)
    _check_end(w, r1, before)


SCENARIOS: dict[str, Callable[[Outcome], Coroutine[Any, Any, None]]] = {
    "racing-install": racing_install,
    "stale-freeze": stale_freeze,
    "stale-drop": stale_drop,
}


def run_scenario(name: str) -> Outcome:
    out = Outcome(name)
    asyncio.run(SCENARIOS[name](out))
    return out
