"""Membership churn in the whole-node simulator, the way an operator does it with `kvctl member`.

One change at a time, each a sequence of single-server conf changes applied group by group
(the metadata group first, as `kvstore.server.admin_service` does), each step proposed at that
group's current leader and retried until it is applied:

- replace: remove a voter from every group and stop its process for good, then start a brand-new
  node (a new id, an empty store, `--join`), add it as a learner everywhere and promote it to
  voter once it has caught up.

A step that is refused (not the leader, a change already in progress, the leader has not
committed in its term yet) or lost in a crash is simply retried; conf changes are idempotent in
the sense that a no-op is refused, which the driver counts as done.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore import errors
from kvstore.node.logic import NodeLogic
from kvstore.raft import ConfChange, ConfChangeType, Role


class SimNode(Protocol):
    """What the driver reads of a simulated node (`nodes.SimNode`)."""

    id: int
    logic: NodeLogic | None
    epoch: int
    removed: bool


class NodeSimulation(Protocol):
    """What the driver needs of the simulation (`nodes.NodeSimulation`)."""

    nodes: dict[int, Any]
    rng: random.Random
    next_id: int

    def log(self, msg: str) -> None: ...

    def at(self, delay: float, fn: Callable[..., None], *args: Any) -> None: ...

    def retire(self, nid: int) -> None: ...

    def add_node(self, nid: int) -> None: ...

    def kick(self, n: Any) -> None: ...


@dataclass(slots=True)
class Step:
    group: int
    change: ConfChange
    then: str = ""
    """What to do once applied: "" nothing, "stop" stop the removed node, "start" start the new one."""
    recorded: bool = False
    """The shard map's replica list follows the change (data groups, as the Admin service does)."""


@dataclass(slots=True)
class MembershipDriver:
    sim: NodeSimulation
    steps: deque[Step] = field(default_factory=deque)
    attempts: int = 0
    busy: bool = False
    done: int = 0
    _proposal: object | None = None
    """The conf change proposal whose answer is awaited (None: none is)."""
    _recording: object | None = None
    """The map recording whose end is awaited (None: none is)."""

    def start_replace(self) -> bool:
        """Plan the replacement of a random member (up or down) by a new node; False if one is
        under way."""
        sim = self.sim
        if self.steps:
            return False
        members = [n for n in sim.nodes.values() if not n.removed]
        victim = sim.rng.choice(members)
        groups = self._groups()
        if not groups:
            return False
        new_id = sim.next_id
        sim.next_id += 1
        addr = f"sim-{new_id}:2379"
        sim.log(f"MEMBER replace n{victim.id} by n{new_id} in groups {groups}")
        for g in groups:
            self.steps.append(Step(g, ConfChange(ConfChangeType.REMOVE_NODE, victim.id)))
        self.steps.append(Step(-1, ConfChange(ConfChangeType.REMOVE_NODE, victim.id), "stop"))
        self.steps.append(Step(-1, ConfChange(ConfChangeType.ADD_LEARNER, new_id, addr.encode()), "start"))
        for g in groups:
            self.steps.append(Step(g, ConfChange(ConfChangeType.ADD_LEARNER, new_id, addr.encode())))
        for g in groups:
            self.steps.append(Step(g, ConfChange(ConfChangeType.ADD_VOTER, new_id)))
        self._next()
        return True

    def _exists(self, group: int) -> bool:
        """Is `group` in the newest shard map any running node has?"""
        newest = None
        for n in self.sim.nodes.values():
            m = n.logic.shard_tracker.map if n.logic is not None else None
            if m is not None and (newest is None or m.version > newest.version):
                newest = m
        return newest is None or group in newest.groups

    def _groups(self) -> list[int]:
        """Every group of the cluster, the metadata group first."""
        for n in self.sim.nodes.values():
            if n.logic is not None and (m := n.logic.shard_tracker.map) is not None:
                return [0, *m.data_groups()]
        return []

    def _next(self) -> None:
        sim = self.sim
        if not self.steps or self.busy:
            return
        step = self.steps[0]
        if step.group == -1:  # a process action between the conf changes
            self.steps.popleft()
            if step.then == "stop":
                sim.retire(step.change.node_id)
            else:
                sim.add_node(step.change.node_id)
            sim.at(1, self._next)
            return
        if step.group != 0 and not self._exists(step.group):
            self.steps.popleft()  # a range move dropped the group meanwhile: nothing to change
            sim.log(f"MEMBER g{step.group} is gone: {step.change.type.name} n{step.change.node_id} skipped")
            sim.at(1, self._next)
            return
        leader = self._leader(step.group)
        if leader is None or leader.logic is None:
            sim.at(sim.rng.randrange(20, 80), self._next)
            return
        self.busy = True
        self.attempts += 1
        epoch = leader.epoch
        token = self._proposal = object()

        def applied(res: object, err: errors.KVError | None) -> None:
            if self._proposal is not token or leader.epoch != epoch:
                return  # given up on (`_unstick`) and retried meanwhile
            self._proposal = None
            self.busy = False
            if err is None:
                self._done(step, leader)
            else:
                sim.log(f"MEMBER {step.change.type.name} n{step.change.node_id} in g{step.group} failed: {err}")
                sim.at(sim.rng.randrange(10, 60), self._next)

        try:
            leader.logic.host.propose_conf_change(step.group, step.change, applied)
        except errors.KVError as err:
            self.busy = False
            self._proposal = None
            if "no-op" in err.message:
                self._done(step, leader)
            else:
                sim.log(f"MEMBER {step.change.type.name} n{step.change.node_id} in g{step.group} refused: {err}")
                sim.at(sim.rng.randrange(10, 60), self._next)
            return
        sim.kick(leader)
        # An answer lost in a crash of the leader: give up on it after a while (it is retried,
        # and a retry of a change that was applied is a no-op, counted as done).
        sim.at(400, self._unstick, token)

    def _unstick(self, token: object) -> None:
        """Give up on the proposal `token` if it is still unanswered. (Only that proposal: once
        it was answered, the step may be recording its change in the shard map, which takes as
        long as it takes; restarting the step then would start a second recording and orphan
        the first, over and over under a slow metadata group.)"""
        if self._proposal is token:
            self._proposal = None
            self.busy = False
            self._next()

    def _done(self, step: Step, leader: SimNode) -> None:
        sim = self.sim
        moves = getattr(sim, "admin_maps", None)
        if step.group > 0 and moves is not None and not step.recorded:
            # As the Admin service does: the shard map's replica list follows each data group's
            # change (range moves place and address groups by it), before the next step.
            self.busy = True
            token = object()
            self._recording = token

            def recorded(ok: bool) -> None:
                if self._recording is not token:
                    return  # given up on (below) and retried meanwhile
                self._recording = None
                self.busy = False
                if ok:
                    step.recorded = True
                    self._done(step, leader)
                else:
                    sim.at(sim.rng.randrange(20, 80), self._done, step, leader)

            def give_up() -> None:  # as the Admin service's request timeout would
                if self._recording is token:
                    sim.log(f"MEMBER recording {step.change.type.name} n{step.change.node_id} in g{step.group} "
                            "timed out: retrying")
                    recorded(False)

            moves.record(step.group, step.change, recorded)
            sim.at(2000, give_up)
            return
        if self.steps and self.steps[0] is step:
            self.steps.popleft()
        sim.log(f"MEMBER {step.change.type.name} n{step.change.node_id} applied in g{step.group} (via n{leader.id})")
        if not self.steps:
            self.done += 1
            sim.log("MEMBER change complete")
        sim.at(1, self._next)

    def _leader(self, group: int) -> SimNode | None:
        for n in sorted(self.sim.nodes.values(), key=lambda x: x.id):
            if n.logic is None:
                continue
            g = n.logic.host.groups.get(group)
            if g is not None and g.core.role == Role.LEADER:
                return n
        return None
