"""Competing suffixes in the whole-node simulator: leaders that lose their majority at the worst moments.

A scenario the nemesis runs (on the seeds that draw it, again and again while the faults last)
against one group that serves a client key and has three voters A, B, C:

1. cut off A, the group's leader, and have a client write at it: A appends an entry that only it
   holds (term t1);
2. as soon as another node B is seen leading (term t2), cut B off instead, before its first
   append leaves, and have a client write at it: B holds a suffix of term t2 that only it has;
3. A and C are connected again: A, whose log is the more up to date, is elected again (term t3)
   and starts bringing C up to date, from its oldest entry C lacks;
4. the moment A hears C's first acknowledgement in t3 (a partial replication: with small
   appends, of A's own term-t1 entry only), A is cut off, and B comes back.

B's suffix (term t2) beats what C holds if C has nothing of term t3 yet, so B may be elected and
overwrite C's copy of A's entry: correct Raft never counts that entry as committed by replicas
alone (it is not of A's current term: Figure 8 of the Raft paper), and the safety checker sees
any node that did. Any step that does not happen within `step_ms` (another node won, a crash
intervened) ends the round; the network heals and the nemesis goes on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from chaos.checker.history import Status
from kvstore.raft import Message, MessageType, Role


class NodeSimulation(Protocol):
    """What the scenario needs of the simulation (`nodes.NodeSimulation`)."""

    rng: random.Random
    now: int
    blocked: set[tuple[int, int]]

    @property
    def nodes(self) -> Mapping[int, Any]: ...

    def at(self, delay: float, fn: Callable[..., None], *args: Any) -> None: ...

    def log(self, msg: str) -> None: ...

    def _faults_on(self) -> bool: ...

    def one_shot(self, f: str, key: str, value: Any, target: Any, after: Callable[[Status, Any], None]) -> None: ...


class CompetingSuffixes:
    """The scenario of the module docstring; `active` while a round runs (the nemesis leaves the
    network alone then)."""

    def __init__(self, sim: NodeSimulation, keys: int, step_ms: int = 1500) -> None:
        self.sim = sim
        self.keys = keys
        self.step_ms = step_ms
        self.active = False
        self.rounds = 0
        self.reached = 0
        """Rounds that got to step 4 (A cut off right after a partial replication)."""
        self.phase = ""
        self.group = -1
        self.key = ""
        self.a = self.b = self.c = 0
        self.term = 0
        self._round = 0

    def start(self, at_ms: tuple[int, int]) -> None:
        self.sim.at(self.sim.rng.randrange(*at_ms), self._begin)

    def _cut(self, nid: int) -> None:
        sim = self.sim
        sim.blocked = {(nid, o) for o in sim.nodes if o != nid} | {(o, nid) for o in sim.nodes if o != nid}

    def _leader(self, gid: int) -> tuple[Any, Any] | None:
        best = None
        for _, n in sorted(self.sim.nodes.items()):
            g = n.logic.host.groups.get(gid) if n.logic is not None else None
            if g is not None and g.core.role == Role.LEADER and (best is None or g.core.term > best[1].term):
                best = (n, g.core)
        return best

    def _begin(self) -> None:
        sim = self.sim
        if not sim._faults_on():
            return
        pick = self._pick()
        if pick is None:
            sim.at(sim.rng.randrange(100, 300), self._begin)
            return
        (a, core), gid, key = pick
        self.active, self.group, self.key, self.a, self.term = True, gid, key, a.id, core.term
        self.b = self.c = 0
        self.rounds += 1
        self._round += 1
        self.phase = "new leader"
        self._cut(a.id)
        sim.log(f"CHURN: cut off n{a.id}, leader of g{gid} (term {core.term}); voters {list(core.conf.voters)}; "
                f"a write at it")
        sim.one_shot("put", key, None, a, lambda _s, _o: None)
        sim.at(self.step_ms, self._give_up, self._round, self.phase)

    def _pick(self) -> tuple[tuple[Any, Any], int, str] | None:
        """A group serving a client key, with three voters all running, and its leader."""
        sim = self.sim
        keys = [f"k{i}" for i in range(self.keys)]
        sim.rng.shuffle(keys)
        for k in keys:
            for _, n in sorted(sim.nodes.items()):
                smap = n.logic.shard_tracker.map if n.logic is not None else None
                if smap is None:
                    continue
                gid = smap.group_for_key(k.encode())
                lead = self._leader(gid)
                if lead is not None and len(lead[1].conf.voters) == 3 and all(
                    sim.nodes.get(v) is not None and sim.nodes[v].logic is not None for v in lead[1].conf.voters
                ):
                    return lead, gid, k
                break
        return None

    def _stopped(self) -> bool:
        """The faults stopped (the run heals, or another scenario runs): the round ends at
        once, leaving the network to whoever shapes it now."""
        if self.sim._faults_on():
            return False
        self.active = False
        self.phase = ""
        return True

    def observe(self) -> None:
        """After every event while a round runs: move on when the awaited leader shows up."""
        if self._stopped():
            return
        lead = self._leader(self.group)
        if lead is None or lead[1].term <= self.term:
            return
        n, core = lead
        sim = self.sim
        if self.phase == "new leader" and n.id != self.a:
            self.b, self.term = n.id, core.term
            self.c = next((v for v in core.conf.voters if v not in (self.a, self.b)), 0)
            self._cut(n.id)
            self.phase = "old leader again"
            sim.log(f"CHURN: n{n.id} leads g{self.group} (term {core.term}): cut off at once, a write at it; "
                    f"n{self.a} and n{self.c} meet again")
            sim.one_shot("put", self.key, None, n, lambda _s, _o: None)
            sim.at(self.step_ms, self._give_up, self._round, self.phase)
        elif self.phase == "old leader again":
            if n.id != self.a:
                self._end(f"n{n.id} won instead of n{self.a}")
                return
            self.term = core.term
            self.phase = "partial replication"
            sim.log(f"CHURN: n{self.a} leads g{self.group} again (term {core.term}); cut off at its first "
                    f"acknowledgement from n{self.c}")
            sim.at(self.step_ms, self._give_up, self._round, self.phase)

    def delivered(self, m: Message) -> None:
        """A message was stepped into its node: step 4's trigger."""
        if self._stopped():
            return
        if self.phase == "partial replication" and m.type == MessageType.APP_RESP and not m.reject \
                and m.to == self.a and m.frm == self.c and m.group == self.group and m.term == self.term:
            self.reached += 1
            self._cut(self.a)
            self.phase = "done"
            self.sim.log(f"CHURN: n{self.a} cut off right after n{self.c} acknowledged index {m.index}; "
                         f"n{self.b} is back")
            self.sim.at(self.sim.rng.randrange(300, 800), self._end, "done", self._round)

    def _give_up(self, round_: int, phase: str) -> None:
        if self.active and self._round == round_ and self.phase == phase:
            self._end(f"no progress in phase {phase!r} within {self.step_ms} ms")

    def _end(self, why: str, round_: int | None = None) -> None:
        if not self.active or (round_ is not None and round_ != self._round) or self._stopped():
            return
        sim = self.sim
        self.active = False
        self.phase = ""
        sim.blocked = set()
        sim.log(f"CHURN: round over ({why}); network healed")
        if sim._faults_on():
            sim.at(sim.rng.randrange(50, 300), self._begin)
