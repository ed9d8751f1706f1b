"""Scripted scenarios of the whole-node engine: a seed plus a schedule of events, for races of
range moves that random seeds reach rarely or never.
`python -m chaos.sim.scenarios NAME [--plant BUG] [--trace]`.

A scenario runs `chaos.sim.nodes.NodeSimulation` with range moves and clients as usual, but no
random nemesis, outsider or admin (`NodeSimParams.scripted`): its script plans the moves, holds
coordinators' requests back (`SimMoves.gate`: a paused process, a request stuck in the network),
moves leaderships and holds back chosen Raft messages (`NodeSimulation.cut`: a node's metadata
traffic, so its map lags; a leader's messages in one group, so what it appends never commits),
then lets everything go and the faults heal. Every check of a random seed applies (Raft safety,
linearizability, ownership refusals, exactly-once, liveness and every move finished with each
group serving exactly its routes). The script's own notes say whether it reached each step: a scenario whose
script gave up waiting proves nothing, and its result says so.

- `racing-install`: an old metadata leader A has installed a move's data and stops right before
  ACTIVATE; the new leader B starts the same step, and its BEGIN wipes A's installation; then A's
  ACTIVATE arrives. The install tokens refuse it (`node-shared-install-token` lets it through:
  the target serves the ranges without their data).
- `lost-reply`: a client's compare-and-swap is applied in a group right before the FREEZE of the
  move that removes the group, and every reply is lost until the group is gone; the client's
  retry (same session) then goes to the group that received the ranges. The session table
  travelled with the data, so that group answers it from the table: swapped
  (`node-export-without-sessions` applies it again: not swapped, although the value is the one
  it wrote). A retry that reaches the source answers from its own table, so only a source that
  is gone sends retries to the target.
- `stale-freeze`: A stops right before FREEZE of move 1 (group 1 -> new group 2); B does the
  whole move, then moves the ranges back (group 2 removed); then A's FREEZE reaches group 1's
  leader, whose own map lags (it still shows move 1). The move id fences it off
  (`node-no-move-fence` lets it freeze ranges that came back, which nobody serves after).
- `stale-drop`: (two groups) a new group takes ranges from both; A stops right before DROP of
  the move out of group 1; B finishes the moves, moves the ranges back (the new group removed),
  then removes group 1 (all its ranges frozen for a move to group 2); A's DROP reaches group 1's
  leader (a lagging map) while that move is frozen, before its export. The move id fences it
  off (`node-no-move-fence` lets it delete frozen data the export was about to carry: the move
  then never finishes).
- `flip-before-activate`: (one group) a new group takes ranges from group 1; the coordinator
  stops right before ACTIVATE; the new group's leader L loses every message it sends in that
  group from then on, and the coordinator goes on: L appends ACTIVATE, which never commits (the
  other two elect a leader without it, and L's copy is overwritten when it hears again). The
  coordinator's request is retried at the new leader and the map flips only once a replica of
  the target has applied ACTIVATE (`node-flip-before-activate` acknowledges ACTIVATE when L
  appended it: the map flips, the source drops the ranges, and nobody serves them). The
  script notes whether the target served the ranges when the map flipped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from kvstore import errors
from kvstore.raft import Entry, Role
from kvstore.raft.log import RaftLog
from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import META_GROUP, MoveState, ShardMap
from kvstore.storage.shardcmd import ShardOp, decode_shard_command, is_shard_command

from .moves import ExportChunk, Propose, Request, SimMoves
from .nodes import NodeSimParams, NodeSimResult, NodeSimulation, SimNode
from .plant import ALL_BUGS, planted

Wait = int | Callable[[], bool]
"""What a script yields: milliseconds to wait, or a condition to wait for (polled)."""
Steps = Generator[Wait, None, None]

POLL_MS = 5
WAIT_LIMIT_MS = 3000
"""A condition not met within this long ends the script (noted: the scenario proves nothing)."""


def shard_op(req: Request) -> ShardOp | None:
    """The shard command a coordinator's request proposes, if any."""
    if isinstance(req, Propose) and is_shard_command(req.data):
        return decode_shard_command(req.data).op
    return None


@dataclass
class Script:
    """What a script sees of the simulation, and the notes it leaves."""

    sim: NodeSimulation
    notes: list[str] = field(default_factory=list)
    gave_up: str | None = None
    facts: dict[str, str] = field(default_factory=dict)
    """What the script did that a test may look up (e.g. the value a scripted write wrote)."""

    @property
    def moves(self) -> SimMoves:
        assert self.sim.moves is not None
        return self.sim.moves

    def note(self, msg: str) -> None:
        self.notes.append(f"{self.sim.now:>6} ms  {msg}")
        self.sim.log(f"SCRIPT {msg}")

    def map(self) -> ShardMap | None:
        return self.moves.final_map()

    def node_map(self, nid: int) -> ShardMap | None:
        n = self.sim.nodes[nid]
        return n.logic.shard_tracker.map if n.logic is not None else None

    def leader(self, group: int) -> SimNode | None:
        for _, n in sorted(self.sim.nodes.items()):
            g = n.logic.host.groups.get(group) if n.logic is not None else None
            if g is not None and g.core.role == Role.LEADER:
                return n
        return None

    def lead(self, group: int, to: int) -> Steps:
        """Move `group`'s leadership to node `to` (asked again until it is there)."""
        while (cur := self.leader(group)) is None or cur.id != to:
            if cur is not None and cur.logic is not None:
                try:
                    cur.logic.host.transfer_leader(group, to)
                    self.sim.kick(cur)
                except errors.KVError as err:  # e.g. not caught up yet: asked again
                    self.sim.log(f"SCRIPT transfer of g{group} to n{to}: {err}")
            yield 50
        self.note(f"n{to} leads g{group}")

    def held(self, nid: int, op: ShardOp) -> bool:
        return any(run.nid == nid and shard_op(req) == op for run, req in self.moves.held)

    def settled(self) -> bool:
        m = self.map()
        return m is not None and not m.moves

    def frozen(self, group: int, nid: int) -> bool:
        """Has node `nid`'s replica of `group` ranges frozen?"""
        store = self.sim.nodes[nid].store
        st = store.shard_state(group) if store is not None else None
        return st is not None and bool(st.frozen)


ScriptFn = Callable[[Script], Steps]


def _drive(s: Script, steps: Steps, waiting: Callable[[], bool] | None = None,
           since: int = 0) -> None:
    """Run the script until its next wait, and schedule the rest."""
    sim = s.sim
    if waiting is not None and not waiting():
        if sim.now - since > WAIT_LIMIT_MS:
            s.gave_up = f"gave up waiting at {sim.now} ms (after: {s.notes[-1] if s.notes else 'start'})"
            s.note(s.gave_up)
            steps.close()
            _let_go(s)
            return
        sim.at(POLL_MS, _drive, s, steps, waiting, since)
        return
    try:
        w = next(steps)
    except StopIteration:
        s.note("script done")
        _let_go(s)
        return
    if isinstance(w, int):
        sim.at(w, _drive, s, steps)
    else:
        sim.at(0, _drive, s, steps, w, sim.now)


def _let_go(s: Script) -> None:
    s.sim.cut = None
    if s.sim.moves is not None:
        s.sim.moves.gate = None
        s.sim.moves.release()


def _ready(s: Script) -> Steps:
    """The cluster is up and the clients have written for a while."""
    yield lambda: s.map() is not None and s.leader(META_GROUP) is not None
    yield 400


def racing_install(s: Script) -> Steps:
    yield from _ready(s)
    a = s.leader(META_GROUP)
    assert a is not None
    b = min(x for x in s.sim.nodes if x != a.id)
    s.note(f"A = n{a.id} (metadata leader), B = n{b}")
    s.moves.gate = lambda nid, req: (nid == a.id and shard_op(req) == ShardOp.ACTIVATE) or (
        nid == b and shard_op(req) == ShardOp.INSTALL)
    voters = sorted(s.sim.nodes)
    s.moves.plan(a, "add a group", lambda cur: cur.plan_add_group(voters))
    yield lambda: s.held(a.id, ShardOp.ACTIVATE)
    s.note("A installed the data and stops right before ACTIVATE")
    yield from s.lead(META_GROUP, b)
    yield lambda: s.held(b, ShardOp.INSTALL)
    s.note("B's BEGIN was applied (a new installation), B stops before INSTALL")
    s.moves.release(lambda nid, req: nid == a.id)
    s.note("A's ACTIVATE goes on")
    yield 300
    s.moves.gate = None
    s.moves.release()
    s.note("B goes on")
    yield s.settled
    s.note("the move is done")


def _stale(s: Script, op: ShardOp) -> Steps:
    """A stops right before `op` (FREEZE or DROP) of a move out of group 1; group 1's leader ends
    up a node whose map still shows that move when A's request reaches it (see the module
    docstring)."""
    yield from _ready(s)
    m0 = s.map()
    assert m0 is not None
    pref = m0.groups[1].voters[0]
    meta = s.leader(META_GROUP)
    assert meta is not None
    y = max(x for x in s.sim.nodes if x not in (pref, meta.id))
    a = meta
    b = next(x for x in sorted(s.sim.nodes) if x not in (a.id, y))
    bn = s.sim.nodes[b]
    s.note(f"A = n{a.id} (metadata leader), B = n{b}, Y = n{y} (its map will lag)")
    if (cur := s.leader(1)) is not None and cur.id == y:
        yield from s.lead(1, pref)
    s.moves.gate = lambda nid, req: nid == a.id and shard_op(req) == op and isinstance(req, Propose) and req.group == 1
    voters = sorted(s.sim.nodes)
    s.moves.plan(a, "add a group (its ranges move out of the others)", lambda cur: cur.plan_add_group(voters))
    yield lambda: s.held(a.id, op)
    s.note(f"A stops right before {op.name} of the move out of group 1")
    yield lambda: (ym := s.node_map(y)) is not None and bool(ym.moves)
    # Y hears nothing of the metadata group (its map lags) nor of the data groups but group 1
    # (so it leads none of them while its map would refuse their moves' steps).
    s.sim.cut = lambda m: m.to == y and m.group != 1
    s.note(f"Y's traffic but group 1's is held back: its map stays at version {s.node_map(y).version}")  # type: ignore[union-attr]
    yield from s.lead(META_GROUP, b)
    yield s.settled
    new = max(s.map().groups)  # type: ignore[union-attr]
    s.note(f"B finished the moves to group {new}")
    s.moves.plan(bn, f"remove group {new} (its ranges move back)", lambda cur: cur.plan_remove_group(new))
    yield lambda: s.settled() and new not in s.map().groups  # type: ignore[union-attr]
    s.note(f"B moved the ranges back; group {new} is gone")
    if op == ShardOp.DROP:
        s.moves.gate = lambda nid, req: (nid == a.id and shard_op(req) == op) or (
            nid == b and isinstance(req, ExportChunk))
        s.moves.plan(bn, "remove group 1 (every range of it frozen for the move)", lambda cur: cur.plan_remove_group(1))
        yield lambda: any(run.nid == b and isinstance(req, ExportChunk) for run, req in s.moves.held)
        s.note("group 1 froze all its ranges for the move; B stops before the export")
    yield from s.lead(1, y)
    s.moves.release(lambda nid, req: nid == a.id)
    s.note(f"A's {op.name} goes on (to Y, whose map still shows that move)")
    yield 300
    s.moves.gate = None
    s.moves.release()
    s.sim.cut = None
    s.note("everything goes on; Y catches up")
    yield s.settled
    s.note("no move left")


def lost_reply(s: Script) -> Steps:
    yield from _ready(s)
    a = s.leader(META_GROUP)
    assert a is not None
    s.moves.gate = lambda nid, req: shard_op(req) == ShardOp.FREEZE
    s.moves.plan(a, "remove group 2 (its ranges move to group 1)", lambda cur: cur.plan_remove_group(2))
    yield lambda: s.held(a.id, ShardOp.FREEZE)
    m = s.map()
    src = s.leader(2)
    assert m is not None and m.moves and src is not None and src.store is not None
    # A key of group 2 that no workload client writes: a concurrent write to the cas's key could
    # make its compare fail for its own reasons (seen once commits reached followers faster).
    key = next(f"lost-reply-{i}" for i in range(10_000) if m.group_for_key(f"lost-reply-{i}".encode()) == 2)
    old = src.store.get(2, key.encode())
    assert old is None
    new = f"v{next(s.sim._value)}"
    s.sim.p.reply_loss = 1.0
    s.note(f"the coordinator stops right before FREEZE; a client's cas({key}: {old!r} -> {new!r}) at "
           f"group 2's leader n{src.id}; from now on every reply to a write is lost")
    s.facts["cas_new"] = new
    s.sim._invoke(s.sim._new_process(), "cas", key, (old.decode() if old is not None else None, new), src)
    yield 30
    s.moves.gate = None
    s.moves.release()
    s.note("FREEZE goes on")
    yield lambda: 2 not in s.map().groups  # type: ignore[union-attr]
    s.sim.p.reply_loss = 0.0
    s.note("group 2 is gone; replies arrive again (the client's retry goes to group 1 now)")
    yield s.settled
    s.note("no move left")


def stale_freeze(s: Script) -> Steps:
    yield from _stale(s, ShardOp.FREEZE)


def stale_drop(s: Script) -> Steps:
    yield from _stale(s, ShardOp.DROP)


def _appended(s: Script, nid: int, group: int, op: ShardOp) -> Entry | None:
    """The first uncommitted `op` in node `nid`'s log of `group` (None: there is none)."""
    n = s.sim.nodes[nid]
    g = n.logic.host.groups.get(group) if n.logic is not None else None
    if g is None:
        return None
    log = g.core.log
    for e in log.entries_from(log.committed + 1):
        if is_shard_command(e.data) and decode_shard_command(e.data).op == op:
            return e
    return None


def _serving(s: Script, group: int, ranges: IntervalSet) -> bool:
    """Has some live replica of `group` applied the activation of `ranges`?"""
    for _, n in sorted(s.sim.nodes.items()):
        st = n.store.shard_state(group) if n.store is not None and n.logic is not None else None
        if st is not None and ranges.issubset(st.active):
            return True
    return False


def _watch_flip(s: Script, move: int, target: int, ranges: IntervalSet) -> None:
    """Note the moment the map first shows `move` flipped (or gone), and whether `target`
    served its ranges then (fact `flipped`: "served" or "unserved")."""
    m = s.map()
    mv = next((x for x in m.moves if x.id == move), None) if m is not None else None
    if mv is not None and mv.state != MoveState.FLIPPED:
        s.sim.at(1, _watch_flip, s, move, target, ranges)
        return
    served = _serving(s, target, ranges)
    s.facts["flipped"] = "served" if served else "unserved"
    s.note(f"the map flipped move {move}: group {target} "
           + ("serves the ranges (ACTIVATE applied)" if served else "does NOT serve the ranges (ACTIVATE not applied)"))


def flip_before_activate(s: Script) -> Steps:
    yield from _ready(s)
    a = s.leader(META_GROUP)
    assert a is not None
    s.moves.gate = lambda nid, req: shard_op(req) == ShardOp.ACTIVATE
    voters = sorted(s.sim.nodes)
    s.moves.plan(a, "add a group (its ranges move out of group 1)", lambda cur: cur.plan_add_group(voters))
    yield lambda: any(shard_op(req) == ShardOp.ACTIVATE for _, req in s.moves.held)
    m = s.map()
    assert m is not None and len(m.moves) == 1
    mv = m.moves[0]
    target = mv.target
    yield lambda: s.leader(target) is not None
    lead = s.leader(target)
    assert lead is not None
    lid = lead.id
    s.note(f"the coordinator n{a.id} installed move {mv.id}'s data in group {target} and stops right "
           f"before ACTIVATE; L = n{lid} leads group {target}")
    s.sim.cut = lambda msg: msg.frm == lid and msg.group == target
    s.moves.gate = None
    s.moves.release()
    s.sim.at(0, _watch_flip, s, mv.id, target, mv.ranges)
    s.note(f"L's messages in group {target} are lost from now on; ACTIVATE goes on")
    yield lambda: _appended(s, lid, target, ShardOp.ACTIVATE) is not None
    entry = _appended(s, lid, target, ShardOp.ACTIVATE)
    assert entry is not None
    index, term = entry.index, entry.term

    def log_of(nid: int) -> RaftLog | None:
        lg = s.sim.nodes[nid].logic
        g = lg.host.groups.get(target) if lg is not None else None
        return g.core.log if g is not None else None

    def term_at(nid: int) -> int:
        log = log_of(nid)
        return log.term_or_zero(index) if log is not None else 0

    others = [f"n{x}" for x in sorted(s.sim.nodes) if x != lid and term_at(x) == term]
    s.note(f"L appended ACTIVATE at index {index} in term {term}; "
           + (f"{', '.join(others)} too" if others else "nobody else has it"))

    def overwritten() -> bool:
        new = s.leader(target)
        log = log_of(new.id) if new is not None and new.id != lid else None
        return log is not None and log.committed >= index and log.term_or_zero(index) != term

    yield overwritten
    new = s.leader(target)
    assert new is not None
    s.note(f"n{new.id} leads group {target} and committed index {index} without L's ACTIVATE "
           f"(an entry of term {term_at(new.id)} there)")
    s.sim.cut = None
    s.note("L hears again")

    def replaced() -> bool:
        log = log_of(lid)
        return log is not None and log.committed >= index and log.term_or_zero(index) != term

    yield replaced
    s.note(f"L's ACTIVATE at index {index} is gone (L committed the new leader's entry there): "
           "the entry was lost with the leader change")
    s.facts["activate_lost"] = f"index {index} term {term}"
    yield lambda: "flipped" in s.facts
    yield s.settled
    s.note("no move left")


@dataclass(frozen=True)
class Scenario:
    script: ScriptFn
    seed: int
    groups: int
    catches: str
    """The planted bug (`chaos.sim.plant`) this scenario catches."""


SCENARIOS: dict[str, Scenario] = {
    "racing-install": Scenario(racing_install, seed=1, groups=1, catches="node-shared-install-token"),
    # stale-freeze: seed 1 stopped showing the race once revisions changed every seed's timing
    # (group 1's preferred leader took its leadership back from Y as A's FREEZE arrived).
    "stale-freeze": Scenario(stale_freeze, seed=2, groups=1, catches="node-no-move-fence"),
    "stale-drop": Scenario(stale_drop, seed=1, groups=2, catches="node-no-move-fence"),
    "lost-reply": Scenario(lost_reply, seed=1, groups=2, catches="node-export-without-sessions"),
    "flip-before-activate": Scenario(flip_before_activate, seed=1, groups=1, catches="node-flip-before-activate"),
}


@dataclass
class ScenarioResult:
    name: str
    result: NodeSimResult
    notes: list[str]
    gave_up: str | None
    failures: list[str]
    """What the coordinators' work failed on (refused steps), in order."""
    facts: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.result.ok and self.gave_up is None


def params(groups: int) -> NodeSimParams:
    """A calm cluster (no message loss, no random faults) of 3 nodes with range moves."""
    return NodeSimParams(
        nodes=3, groups=groups, moves=True, scripted=True, keys=8, clients=4, loss=0.0, duplicate=0.0,
        long_delay=0.0, delay_ms=(1, 6), persist_ms=(0, 3), fault_ms=6000, heal_ms=3000,
    )


def run_scenario(name: str, trace: bool = False, seed: int | None = None) -> ScenarioResult:
    """Run scenario `name` (on its own seed unless `seed` is given: the script fixes the order
    of the events that matter; the seed, the timing of everything else)."""
    sc = SCENARIOS[name]
    sim = NodeSimulation(sc.seed if seed is None else seed, params=params(sc.groups), trace=trace)
    s = Script(sim)
    sim.at(0, _drive, s, sc.script(s))
    res = sim.run()
    assert sim.moves is not None
    return ScenarioResult(name, res, s.notes, s.gave_up, list(sim.moves.failures), s.facts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.sim.scenarios", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(SCENARIOS))
    ap.add_argument("--plant", choices=sorted(ALL_BUGS), help="plant a known bug (to see the scenario catch it)")
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args(argv)
    if not args.trace:
        logging.disable(logging.CRITICAL)
    with planted(args.plant):
        out = run_scenario(args.name, trace=args.trace)
    if args.trace:
        print("\n".join(out.result.trace))
    print("\n".join(out.notes))
    for f in out.failures:
        print(f"  coordinator work failed: {f}")
    print(f"scenario {args.name}: " + ("ok" if out.ok else (out.result.violation or out.gave_up or "?")))
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
