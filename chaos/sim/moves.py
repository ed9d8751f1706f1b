"""Range moves in the whole-node simulator (`chaos/sim/nodes.py`): the real move coordinator
(`kvstore.node.moves.MoveCoordinator`) on the simulated nodes, its requests carried as simulated
RPCs, an admin planning changes, and clients that route by their own (stale) maps.

- **Coordinators.** Every node has one (a crash loses it; the restarted node makes a new one).
  Every `POLL_MS` of virtual time, a node that leads the metadata group (by its own core) and
  has no unit of work running asks its coordinator for the next one and runs it, as
  `kvstore.server.movedriver.MoveDriver` does. A deposed leader's work keeps running until it
  ends, concurrently with its successor's (racing coordinators, as with a real deposed leader).
- **Requests as RPCs.** `Propose` and `ExportChunk` go to the group's leader the way
  `GroupCaller` finds it (its hint, the group's members by the node's map, the metadata group's
  voters; NOT_LEADER hints followed), locally or over the simulated network, where they can be
  lost or delayed while faults run (late requests that arrive after the caller gave up: up to
  1.5 s) or cut by a partition, and
  are retried by the caller (each attempt awaited for the request timeout, `REQUEST_MS`, as
  `GroupCaller` awaits it) until a deadline (`CALL_MS`), after which the failure is thrown into
  the work (the coordinator retries the step from the map later). At the receiving node a
  proposal is checked by `kvstore.node.grouprequests.check_group_request` against that node's map and
  proposed to its host like `local_group_call`; an export waits for a read barrier
  (`Host.read`) and reads the frozen ranges from the store like `local_export`. `WaitMap` polls
  the node's tracker.
- **Admin.** While faults run, every `admin_ms` an admin asks a random node to add a data group,
  remove one (never the last) or rebalance, through that node's coordinator's `update` (the
  map's compare-and-swap), as `ShardService.ShardOp` does; at most `max_groups` data groups.
- **Faults aimed at a move's steps** (`disturb`, with the seed's chance per shard command
  while faults run): right after a shard command was proposed at a data group's leader, that
  leader crashes or is cut off before the command commits, or the metadata leadership moves
  away from the coordinator (which may also pause for a while: its step resumes in the middle
  of its successor's).
- **Scripts** (`chaos/sim/scenarios.py`): `plan` plans a change at a chosen node; `gate` holds
  chosen requests of chosen coordinators back until `release`.
- **Clients.** Each client process keeps its own copy of the map (fetched from a node on first
  use and after a WRONG_SHARD, like the client library's `ClusterView`) and a leader cache per
  group; `target` picks the node to send a key's operation to.

Checked after the heal (`check_finished`, part of liveness): every planned move finished, every
drained group was dropped, and every group serves exactly the ranges the final map routes to it
(on its most advanced replica) with nothing left frozen.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore import errors
from kvstore.node.grouprequests import check_group_request, refused_for_good
from kvstore.node.logic import NodeLogic
from kvstore.node.moves import ExportChunk, MoveCoordinator, MoveFailed, Propose, Request, WaitMap, Work
from kvstore.node.store import NodeStore
from kvstore.raft import ConfChange, Role
from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import META_GROUP, ShardMap, ShardMapError
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import StorageError
from kvstore.v1 import shard_pb2


class SimNode(Protocol):
    """What this module uses of `nodes.SimNode` (a protocol: `nodes` imports this module)."""

    @property
    def id(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def logic(self) -> NodeLogic | None: ...
    @property
    def store(self) -> NodeStore | None: ...


class SimParams(Protocol):
    @property
    def loss(self) -> float: ...
    @property
    def long_delay(self) -> float: ...
    @property
    def delay_ms(self) -> tuple[int, int]: ...
    @property
    def admin_ms(self) -> tuple[int, int]: ...
    @property
    def max_groups(self) -> int: ...
    @property
    def disturb(self) -> float: ...
    @property
    def scripted(self) -> bool: ...


class NodeSimulation(Protocol):
    """What this module uses of `nodes.NodeSimulation`."""

    @property
    def rng(self) -> random.Random: ...
    @property
    def p(self) -> SimParams: ...
    @property
    def now(self) -> int: ...
    @property
    def nodes(self) -> Mapping[int, SimNode]: ...
    blocked: set[tuple[int, int]]
    def at(self, delay: float, fn: Callable[..., None], *args: Any) -> None: ...
    def log(self, msg: str) -> None: ...
    def _faults_on(self) -> bool: ...
    def _kick(self, n: Any) -> None: ...
    def crash(self, nid: int) -> None: ...
    def restart(self, nid: int) -> None: ...

POLL_MS = 20
"""How often a metadata leader's coordinator looks for work (the product's is 200 ms, woken at
once by a plan)."""
REQUEST_MS = 375
"""The nodes' request timeout, one attempt's timeout (`GroupCaller.call`: each attempt waits up
to the node's request timeout, 5 s, which is 2.5 x the client library's attempt timeout of 2 s;
here 2.5 x the simulated clients' 150 ms). An attempt given up sooner re-proposes its command
while the first is still queued: on the slowest schedules (one entry per append, one append in
flight, 2-20 ms hops) a group whose commit latency exceeded a 100 ms attempt never answered a
FREEZE in time again, every retry adding to its backlog (seed 3108, 5 nodes: a move stuck in
PENDING after the heal)."""
CALL_MS = 4 * REQUEST_MS
"""A request's deadline over all its attempts (GroupCaller: 4 x the request timeout)."""
WAIT_MAP_MS = 500
EXPORT_CHUNK_BYTES = 256
"""Small, so that a move installs its data in several INSTALLs."""


@dataclass(slots=True)
class _Run:
    """One unit of a coordinator's work in flight on node `nid` (in its life `epoch`)."""

    nid: int
    epoch: int
    work: Work
    what: str
    chunks: list[bytes] = field(default_factory=list)
    on_end: Callable[[bool], None] | None = None
    ended: bool = False


class SimMoves:
    """Range moves for one `NodeSimulation` (see the module docstring)."""

    def __init__(self, sim: NodeSimulation) -> None:
        self.sim = sim
        self.rng = sim.rng
        self.coords: dict[int, tuple[int, MoveCoordinator]] = {}
        self.busy: dict[int, int] = {}
        """node -> the epoch in which its coordinator's current unit of work started."""
        self.client_maps: dict[int, ShardMap] = {}
        self.group_leader: dict[int, int] = {}
        self.stats: Counter[str] = Counter()
        self.gate: Callable[[int, Request], bool] | None = None
        """A scripted scenario's hold on coordinators' requests: (node, request) -> hold it back
        (as a paused process or a slow network would) until `release`."""
        self.held: list[tuple[_Run, Request]] = []
        self.paused: dict[int, int] = {}
        """node -> until when its coordinator's work is paused (virtual ms)."""
        self.failures: list[str] = []
        """Why units of work failed (refused steps, lost map updates), in order."""

    # --- the coordinators ---------------------------------------------------------------------
    def start(self) -> None:
        self.sim.at(POLL_MS, self._poll)
        if not self.sim.p.scripted:
            self.sim.at(self.rng.randrange(*self.sim.p.admin_ms), self._admin)

    def plan(self, n: SimNode, what: str, change: Callable[[ShardMap], ShardMap]) -> None:
        """Plan a map change through node `n`'s coordinator, as `ShardService.ShardOp` does."""
        assert n.logic is not None
        tracker = n.logic.shard_tracker
        assert tracker.map is not None
        self.sim.log(f"ADMIN at n{n.id}: {what}")
        self.stats["plans"] += 1
        self._run(n, self.coordinator(n).update(tracker.map, tracker.raw, change), f"admin: {what}")

    def release(self, which: Callable[[int, Request], bool] = lambda nid, req: True) -> int:
        """Let the held requests `which` go on; returns how many."""
        go = [(run, req) for run, req in self.held if which(run.nid, req)]
        self.held = [x for x in self.held if x not in go]
        for run, req in go:
            self.sim.log(f"n{run.nid} {run.what}: request released")
            self._issue(run, req, held=False)
        return len(go)

    def coordinator(self, n: SimNode) -> MoveCoordinator:
        """Node `n`'s coordinator in its current life (a crash loses the old one)."""
        got = self.coords.get(n.id)
        if got is None or got[0] != n.epoch:
            sim = self.sim
            got = self.coords[n.id] = (n.epoch, MoveCoordinator(random.Random(self.rng.getrandbits(64)),
                                                                 clock=lambda: sim.now / 1000))
        return got[1]

    def _poll(self) -> None:
        sim = self.sim
        for nid, n in sorted(sim.nodes.items()):
            if n.logic is None or self.busy.get(nid) == n.epoch:
                continue
            if not n.logic.host.leads_current(META_GROUP):  # as `NodeCluster.is_meta_leader`
                continue
            tracker = n.logic.shard_tracker
            work = self.coordinator(n).next_work(tracker.map, tracker.raw, self._addresses(n))
            if work is not None:
                self.busy[nid] = n.epoch
                self._run(n, work, "coordinator", on_end=functools.partial(self._idle, nid, n.epoch))
        sim.at(POLL_MS, self._poll)

    def _idle(self, nid: int, epoch: int, ok: bool) -> None:
        if self.busy.get(nid) == epoch:
            del self.busy[nid]

    @staticmethod
    def _addresses(n: SimNode) -> dict[int, str]:
        """`NodeCluster.node_addresses`: the metadata group's members with their addresses."""
        assert n.logic is not None
        host = n.logic.host
        g = host.groups.get(META_GROUP)
        if g is None:
            return {}
        return {m: host.members[m] for m in g.core.conf.members() if m in host.members}

    # --- the admin ----------------------------------------------------------------------------
    def _admin(self) -> None:
        sim = self.sim
        if not sim._faults_on():
            return
        sim.at(self.rng.randrange(*sim.p.admin_ms), self._admin)
        alive = [n for _, n in sorted(sim.nodes.items()) if n.logic is not None]
        if not alive:
            return
        n = self.rng.choice(alive)
        assert n.logic is not None
        m, raw = n.logic.shard_tracker.map, n.logic.shard_tracker.raw
        if m is None:
            return
        meta = n.logic.host.groups.get(META_GROUP)
        voters = sorted(meta.core.conf.voters) if meta is not None else sorted(m.nodes)
        groups = m.data_groups()
        r = self.rng.random()
        change: Callable[[ShardMap], ShardMap]
        if len(groups) < sim.p.max_groups and (r < 0.45 or len(groups) == 1):
            what, change = "add a group", lambda cur: cur.plan_add_group(voters)
        elif len(groups) > 1 and r < 0.8:
            victim = self.rng.choice(groups)
            what, change = f"remove group {victim}", lambda cur: cur.plan_remove_group(victim)
        else:
            what, change = "rebalance", ShardMap.plan_rebalance
        sim.log(f"ADMIN at n{n.id}: {what}")
        self.stats["plans"] += 1
        self._run(n, self.coordinator(n).update(m, raw, change), f"admin: {what}")

    def record(self, group: int, cc: ConfChange, on_end: Callable[[bool], None]) -> None:
        """Make the map's replica list of `group` follow an applied conf change, through a random
        live node's coordinator, as the Admin service does after each group's change."""
        # The operator asks a member of the cluster (by the metadata leader's configuration), not
        # a node on its way out, whose view of the metadata group stops when it is removed.
        members: set[int] = set()
        for _, x in sorted(self.sim.nodes.items()):
            g = x.logic.host.groups.get(META_GROUP) if x.logic is not None else None
            if g is not None and g.core.role == Role.LEADER:
                members = set(g.core.conf.voters)
        alive = [n for _, n in sorted(self.sim.nodes.items()) if n.logic is not None and n.id in members]
        n = self.rng.choice(alive) if alive else None
        m = n.logic.shard_tracker.map if n is not None and n.logic is not None else None
        if n is None or n.logic is None or m is None:
            self.sim.at(50, on_end, False)
            return
        if group not in m.groups or m.with_member_change(group, cc).groups[group] == m.groups[group]:
            self.sim.at(1, on_end, True)  # dropped meanwhile, or already recorded: nothing to change
            return
        self._run(n, self.coordinator(n).update(m, n.logic.shard_tracker.raw,
                                                lambda cur: cur.with_member_change(group, cc)),
                  f"admin: record {cc.type.name} n{cc.node_id} in g{group}", on_end=on_end)

    # --- running work -------------------------------------------------------------------------
    def _run(self, n: SimNode, work: Work, what: str, on_end: Callable[[bool], None] | None = None) -> None:
        run = _Run(n.id, n.epoch, work, what, on_end=on_end)
        self._advance(run, lambda: next(work))

    def _alive(self, run: _Run) -> bool:
        n = self.sim.nodes[run.nid]
        return n.logic is not None and n.epoch == run.epoch

    def _advance(self, run: _Run, step: Callable[[], Request]) -> None:
        """Feed the work (`step` sends an outcome or throws a failure) and issue its next request."""
        if not self._alive(run):
            self._end(run, False)  # the node crashed: its coordinator's work died with it
            return
        try:
            req = step()
        except StopIteration:
            self.sim.log(f"n{run.nid} {run.what}: done")
            self._end(run, True)
            return
        except (MoveFailed, ShardMapError, errors.KVError) as err:
            self.sim.log(f"n{run.nid} {run.what}: failed: {err}")
            self.stats["failed_work"] += 1
            self.failures.append(f"n{run.nid} {run.what}: {err}")
            self._end(run, False)
            return
        self._issue(run, req)

    def _end(self, run: _Run, ok: bool) -> None:
        """The work ended (done, failed, or its node crashed): its caller learns it exactly once."""
        run.work.close()
        if run.ended:
            return
        run.ended = True
        if run.on_end is not None:
            run.on_end(ok)

    def _answer(self, run: _Run, outcome: Any, err: Exception | None) -> None:
        if err is not None:
            self._advance(run, lambda: run.work.throw(err))
        else:
            self._advance(run, lambda: run.work.send(outcome))

    def _issue(self, run: _Run, req: Request, held: bool = True) -> None:
        sim = self.sim
        if held and self.paused.get(run.nid, 0) > sim.now:  # its process is paused
            sim.at(self.paused[run.nid] - sim.now, self._issue, run, req)
            return
        if held and self.gate is not None and self.gate(run.nid, req):
            sim.log(f"n{run.nid} {run.what}: request held")
            self.held.append((run, req))
            return
        if isinstance(req, Propose):
            self.stats["proposals"] += 1
            self._call(run, req.group,
                       lambda dst, reply: self._serve_propose(dst, req.group, req.data, reply, run.nid),
                       lambda res, err: self._answer(run, res, err), final_invalid=True)
        elif isinstance(req, ExportChunk):
            if not req.first:
                sim.at(0, self._answer, run, run.chunks.pop(0) if run.chunks else None, None)
                return
            self.stats["exports"] += 1

            def exported(chunks: Any, err: errors.KVError | None) -> None:
                run.chunks = list(chunks or [])
                self._answer(run, run.chunks.pop(0) if run.chunks and err is None else None, err)

            self._call(run, req.group, lambda dst, reply: self._serve_export(dst, req.group, req.ranges, reply),
                       exported, final_invalid=False)
        elif isinstance(req, WaitMap):
            self._wait_map(run, req.version, sim.now + WAIT_MAP_MS)
        else:  # pragma: no cover
            raise TypeError(f"unknown request {req!r}")

    def _wait_map(self, run: _Run, version: int, deadline: int) -> None:
        n = self.sim.nodes[run.nid]
        if not self._alive(run):
            self._end(run, False)
            return
        assert n.logic is not None
        if n.logic.shard_tracker.version >= version or self.sim.now >= deadline:
            self._answer(run, n.logic.shard_tracker.version >= version, None)
            return
        self.sim.at(5, self._wait_map, run, version, deadline)

    # --- requests as RPCs (GroupCaller) ------------------------------------------------------
    def _candidates(self, n: SimNode, group: int) -> list[int]:
        """`GroupCaller._candidates`: nodes to try for `group`'s leader, best guess first."""
        assert n.logic is not None
        host = n.logic.host
        out: list[int] = []
        lead, _ = host.leader_of(group)
        if lead:
            out.append(lead)
        m = n.logic.shard_tracker.map
        if m is not None and group in m.groups:
            out += [x for x in m.groups[group].members() if x not in out]
        g = host.groups.get(group)
        if g is not None:
            out += [x for x in sorted(g.core.conf.members()) if x not in out]
        if group == META_GROUP or not out:
            out += [x for x in sorted(host.members) if x not in out]
        return out

    def _call(
        self,
        run: _Run,
        group: int,
        serve: Callable[[SimNode, Callable[[Any, errors.KVError | None], None]], None],
        done: Callable[[Any, errors.KVError | None], None],
        final_invalid: bool,
    ) -> None:
        """Run `serve` at `group`'s leader (retried like `GroupCaller.call` until `CALL_MS`)."""
        sim = self.sim
        deadline = sim.now + CALL_MS
        tried = 0
        delay = 20.0

        def attempt(hint: int) -> None:
            nonlocal tried, delay
            if not self._alive(run):
                self._end(run, False)
                return
            if sim.now >= deadline:
                done(None, errors.Timeout(f"group {group}: no leader completed the request in time",
                                          indeterminate=True))
                return
            n = sim.nodes[run.nid]
            cands = self._candidates(n, group)
            target = hint or (cands[tried % len(cands)] if cands else n.id)
            tried += 1
            answered = False
            sim.log(f"n{run.nid} {run.what}: request to g{group} at n{target}")

            def answer(res: Any, err: errors.KVError | None) -> None:
                nonlocal answered, delay
                if answered:
                    return
                if not self._alive(run):
                    self._end(run, False)
                    return
                answered = True
                sim.log(f"n{run.nid} {run.what}: g{group} at n{target} answered "
                        f"{type(err).__name__ + ': ' + str(err) if err else 'ok'}")
                if err is None:
                    done(res, None)
                    return
                if isinstance(err, errors.NotLeader) and err.leader_id and err.leader_id != target:
                    sim.at(0, attempt, err.leader_id)
                    return
                if final_invalid and isinstance(err, errors.InvalidArgument):
                    done(None, err)
                    return
                caller = sim.nodes[run.nid].logic
                if caller is not None and refused_for_good(err, caller.shard_tracker.version):
                    done(None, err)  # as `GroupCaller.call`: a stale step of a finished move
                    return
                sim.at(delay * (0.5 + self.rng.random()), attempt, 0)
                delay = min(delay * 2, 500.0)

            # as GroupCaller: the request timeout, or what is left of the deadline (at least 50 ms)
            sim.at(min(REQUEST_MS, max(50, deadline - sim.now)), answer, None,
                   errors.Timeout("attempt timed out", indeterminate=True))
            self._rpc(run.nid, target, serve, answer)

        attempt(0)

    def _rpc(
        self,
        frm: int,
        to: int,
        serve: Callable[[SimNode, Callable[[Any, errors.KVError | None], None]], None],
        answer: Callable[[Any, errors.KVError | None], None],
    ) -> None:
        """Carry a request from `frm` to `to` and its reply back (each way lost, delayed or cut
        like any message; a request to the node itself is served at once)."""
        sim = self.sim

        def arrive() -> None:
            dst = sim.nodes.get(to)
            if dst is None or dst.logic is None or (frm, to) in sim.blocked:
                return
            serve(dst, lambda res, err: self._carry(to, frm, lambda: answer(res, err)))

        if frm == to:
            sim.at(0, arrive)
        else:
            self._carry(frm, to, arrive)

    def _carry(self, frm: int, to: int, fn: Callable[[], None]) -> None:
        sim = self.sim
        if frm == to:
            sim.at(0, fn)
            return
        # (A stream over TCP loses a request only with its connection: while faults run.)
        if (frm, to) in sim.blocked or (sim._faults_on() and self.rng.random() < sim.p.loss):
            return
        d = self.rng.randint(*sim.p.delay_ms)
        if sim._faults_on() and self.rng.random() < sim.p.long_delay:
            d += self.rng.randint(20, 1500)  # held up in the network: may arrive after the caller gave up
        sim.at(d, fn)

    def _serve_propose(self, dst: SimNode, group: int, data: bytes,
                       reply: Callable[[Any, errors.KVError | None], None], origin: int) -> None:
        """`local_group_call` for a proposal: checked, then proposed at this node's host."""
        logic = dst.logic
        assert logic is not None
        try:
            if group not in logic.host.groups:
                raise errors.WrongShard(f"group {group} is not on this node")
            check_group_request(shard_pb2.GroupProposeRequest(group=group, command=data), logic.shard_tracker.map)
            logic.host.propose(group, data, lambda res, err: reply(res if res is not None else ApplyResult(), err))
        except errors.KVError as err:
            reply(None, err)
            return
        self.sim._kick(dst)
        if group != META_GROUP:
            self.disturb(dst, origin)

    def disturb(self, leader: SimNode, origin: int) -> None:
        """A fault aimed at a move's step, right after a shard command was proposed at `leader`
        for node `origin`'s coordinator (with the seed's `disturb` chance, while faults run):
        the leader crashes or is cut off before the command commits (the step may be lost, and
        so may the replies of client writes in flight there), or the metadata leadership moves
        away from the coordinator, whose step keeps running beside its successor's (racing
        coordinators), maybe after a pause of its process (a stale coordinator resuming in the
        middle of its successor's step)."""
        sim = self.sim
        if not sim._faults_on() or self.rng.random() >= sim.p.disturb:
            return
        r = self.rng.random()
        when = self.rng.randint(0, 4)
        if r < 0.3:
            self.stats["disturb_crash"] += 1
            sim.at(when, self._crash, leader.id, leader.epoch)
        elif r < 0.5:
            self.stats["disturb_isolate"] += 1
            sim.at(when, self._isolate, leader.id)
        elif r < 0.75:
            self.stats["disturb_meta"] += 1
            sim.at(when, self._move_meta_leader)
        else:
            self.stats["disturb_pause"] += 1
            self.paused[origin] = sim.now + self.rng.randint(20, 300)
            sim.log(f"n{origin} coordinator PAUSED (aimed at a move's step)")
            sim.at(when, self._move_meta_leader)

    def _crash(self, nid: int, epoch: int) -> None:
        n = self.sim.nodes[nid]
        if n.logic is None or n.epoch != epoch:
            return
        self.sim.log(f"n{nid} CRASH (aimed at a move's step)")
        self.sim.crash(nid)
        self.sim.at(self.rng.randrange(20, 600), self.sim.restart, nid)

    def _isolate(self, nid: int) -> None:
        sim = self.sim
        others = [x for x in sorted(sim.nodes) if x != nid]
        cut = {(nid, x) for x in others} | {(x, nid) for x in others}
        sim.blocked = set(sim.blocked) | cut
        sim.log(f"PARTITION n{nid} cut off (aimed at a move's step)")

        def heal() -> None:
            if sim._faults_on():
                sim.blocked = set(sim.blocked) - cut
                sim.log(f"n{nid} reachable again")

        sim.at(self.rng.randrange(50, 500), heal)

    def _move_meta_leader(self) -> None:
        for _, n in sorted(self.sim.nodes.items()):
            g = n.logic.host.groups.get(META_GROUP) if n.logic is not None else None
            if g is not None and g.core.role == Role.LEADER:
                try:
                    n.logic.host.transfer_leader(META_GROUP, 0)  # type: ignore[union-attr]
                except errors.KVError:
                    return
                self.sim.log(f"n{n.id} TRANSFER g0 (aimed at a move's step)")
                self.sim._kick(n)
                return

    def _serve_export(self, dst: SimNode, group: int, ranges: IntervalSet,
                      reply: Callable[[Any, errors.KVError | None], None]) -> None:
        """`local_export`: a read barrier at the group's leader, then the frozen ranges' records."""
        logic, store = dst.logic, dst.store
        assert logic is not None and store is not None
        epoch = dst.epoch

        def read(index: int, err: errors.KVError | None) -> None:
            if err is not None or dst.epoch != epoch:
                reply(None, err or errors.Unavailable("node restarted"))
                return
            try:
                chunks = [records for records, _ in store.export_range(group, ranges, EXPORT_CHUNK_BYTES)]
            except StorageError as e:
                reply(None, errors.InvalidArgument(str(e)))
                return
            reply(chunks, None)

        try:
            if group not in logic.host.groups:
                raise errors.WrongShard(f"group {group} is not on this node")
            logic.host.read(group, read)
        except errors.KVError as err:
            reply(None, err)
            return
        self.sim._kick(dst)

    # --- clients ------------------------------------------------------------------------------
    def refresh(self, process: int) -> None:
        """The client fetches the map again (from a random live node, as `ClusterView` does)."""
        alive = [n for _, n in sorted(self.sim.nodes.items()) if n.logic is not None]
        if alive:
            n = self.rng.choice(alive)
            assert n.logic is not None
            m = n.logic.shard_tracker.map
            if m is not None:
                self.client_maps[process] = m

    def target(self, process: int, key: bytes, avoid: int = 0) -> int:
        """The node a client sends `key`'s operation to: the leader it last saw for the key's
        group by its own map, else a member of that group (not `avoid`); 0: no idea."""
        if process not in self.client_maps:
            self.refresh(process)
        m = self.client_maps.get(process)
        if m is None:
            return 0
        gid = m.group_for_key(key)
        lead = self.group_leader.get(gid, 0)
        if lead and lead != avoid and lead in self.sim.nodes:
            return lead
        members = [x for x in (m.groups[gid].members() if gid in m.groups else ()) if x != avoid and x in self.sim.nodes]
        return self.rng.choice(members) if members else 0

    def learned(self, process: int, key: bytes, leader: int) -> None:
        """A client's operation on `key` succeeded at `leader`."""
        m = self.client_maps.get(process)
        if m is not None:
            self.group_leader[m.group_for_key(key)] = leader

    # --- checks -------------------------------------------------------------------------------
    def final_map(self) -> ShardMap | None:
        best: ShardMap | None = None
        for _, n in sorted(self.sim.nodes.items()):
            m = n.logic.shard_tracker.map if n.logic is not None else None
            if m is not None and (best is None or m.version > best.version):
                best = m
        return best

    def summary(self) -> dict[str, int]:
        """What the run did: plans, moves planned and finished, keys moved, requests."""
        m = self.final_map()
        out = dict(self.stats)
        if m is not None:
            first = 1  # move ids start at 1 in a new cluster
            out["moves"] = m.next_move - first
            out["moves_done"] = m.next_move - first - len(m.moves)
        out["keys_moved"] = sum(c.moved_keys for _, c in self.coords.values())
        return out

    def exists(self, group: int) -> bool:
        """Is `group` still in the (newest) map? (Dropped groups need no leader any more.)"""
        m = self.final_map()
        return m is None or group == META_GROUP or group in m.groups

    def check_finished(self) -> str | None:
        """After the heal: what is left undone (None: every move finished and took effect)."""
        m = self.final_map()
        if m is None:
            return "no node has a shard map"
        if m.moves:
            return f"{len(m.moves)} range moves not finished (map version {m.version}): " + ", ".join(
                f"move {mv.id} {mv.source}->{mv.target} {mv.state.name}" for mv in m.moves)
        owners = set(m.ring.owners)
        drained = [g for g in m.data_groups() if g not in owners and not m.routes.get(g)]
        if drained:
            return f"groups {drained} serve nothing but were not dropped"
        for gid in m.data_groups():
            best: tuple[int, Any] | None = None
            for _, n in sorted(self.sim.nodes.items()):
                if n.logic is None or n.store is None or gid not in n.logic.host.groups:
                    continue
                applied = n.store.applied_index(gid)
                if best is None or applied > best[0]:
                    best = (applied, n.store.shard_state(gid))
            if best is None:
                return f"group {gid} is on no live node"
            st = best[1]
            routes = m.routes.get(gid, IntervalSet())
            if st is None or st.active != routes or st.frozen:
                return f"group {gid} does not serve exactly the ranges the map routes to it (or keeps some frozen)"
        return None
