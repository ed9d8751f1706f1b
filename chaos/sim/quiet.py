"""Quiescence in the whole-node simulator: idle pauses of the workload, and the quiesced-leader scenario.

On the seeds that run with quiescence (a fixed half by default, `quiesce_by_default`; forced by
`--quiesce on|off`) every node runs with `RaftSettings.quiesce_ticks`, and:

- the whole workload pauses now and then (`idle_every_ms`, `idle_ms`) while the faults go on, so
  groups go quiet and are woken again by requests, by faults hitting them while they sleep, or by
  the hosts' liveness view (a node whose pings stopped: `Host.suspect`);
- at the end of the fault window, instead of healing at once, the *quiesced-leader scenario*:
  the faults stop (network healed, crashed nodes restarted) and the clients go idle until every
  group and every member of it has quiesced (within `quiesce_within_ms`, or the run fails:
  quiescence must happen). Then the node leading a client key's group is crashed or cut off
  (isolation more often with lease reads: it stays up, unaware). Every group it led must elect a
  new leader that commits an entry of its own term, and a client write through that leader must
  succeed, within `recover_within_ms` (nothing but the hosts' liveness can wake the quiesced
  followers). After isolation, a linearizable read of the written key is sent to the old leader:
  serving it from a lease held before it quiesced would be a stale read, which the history check
  catches. Then the run heals as usual.

`QuiesceStats` counts what quiescence did in one run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from chaos.checker.history import Status
from kvstore.node.logic import NodeLogic
from kvstore.raft import RaftNode, Role


def quiesce_by_default(seed: int) -> bool:
    """Whether a seed runs with quiescence unless told otherwise: a fixed half of all seeds,
    decided apart from the seed's own random stream."""
    return random.Random(f"quiesce:{seed}").random() < 0.5


@dataclass(slots=True)
class QuiesceStats:
    """What quiescence did in one run (all zero when it is off)."""

    leader_quiesces: int = 0
    leader_quiesces_under_faults: int = 0
    """Of those, while the faults were on (before the scenario)."""
    follower_quiesces: int = 0
    wakes: int = 0
    scenario: str = ""
    """The quiesced-leader scenario: "crash", "isolate", "skipped (...)" or "" (not run)."""
    recovered_ms: int | None = None
    """Scenario: time from the fault to a new leader that committed a client write."""


class SimNode(Protocol):
    id: int
    epoch: int
    removed: bool
    logic: NodeLogic | None


class NodeSimulation(Protocol):
    """What the scenario needs of the simulation (`nodes.NodeSimulation`)."""

    rng: random.Random
    now: int
    blocked: set[tuple[int, int]]
    healed_at: int | None

    @property
    def nodes(self) -> Mapping[int, Any]: ...

    def at(self, delay: float, fn: Callable[..., None], *args: Any) -> None: ...

    def log(self, msg: str) -> None: ...

    def crash(self, nid: int) -> None: ...

    def restart(self, nid: int) -> None: ...

    def heal_all(self) -> None: ...

    def calm_down(self) -> None: ...

    def one_shot(self, f: str, key: str, value: Any, target: Any, after: Callable[[Status, Any], None]) -> None: ...

    def fail(self, msg: str) -> None: ...

    def changing_membership(self) -> bool: ...


@dataclass(slots=True)
class QuietParams:
    idle_every_ms: tuple[int, int] = (300, 900)
    """Time between the starts of two pauses of the whole workload."""
    idle_ms: tuple[int, int] = (150, 700)
    """Length of one pause."""
    quiesce_within_ms: int = 4000
    """Once faults stop and clients idle, every group must quiesce within this."""
    recover_within_ms: int = 3000
    """After its quiesced leader is crashed or isolated, a group must elect a new leader that
    commits a client write within this."""


class QuietScenario:
    """Idle pauses and the quiesced-leader scenario of one run (module docstring)."""

    def __init__(self, sim: NodeSimulation, keys: int, lease_read: bool, params: QuietParams | None = None) -> None:
        self.sim = sim
        self.keys = keys
        self.lease_read = lease_read
        self.p = params or QuietParams()
        self.stats = QuiesceStats()
        self.idle_until = -1
        """Clients start no operation before this time."""
        self.calm = False
        """The scenario runs: no nemesis faults."""
        self._seen: dict[tuple[int, int], bool] = {}

    # --- the workload pauses ----------------------------------------------------------------
    def start(self) -> None:
        self.sim.at(self.sim.rng.randrange(*self.p.idle_every_ms), self._idle_gap)

    def clients_wait(self) -> int:
        """How long a client must still wait before its next operation (0: go)."""
        return max(0, self.idle_until - self.sim.now)

    def _idle_gap(self) -> None:
        sim = self.sim
        if self.calm or sim.healed_at is not None:
            return
        gap = sim.rng.randrange(*self.p.idle_ms)
        self.idle_until = max(self.idle_until, sim.now + gap)
        sim.log(f"IDLE: clients pause for {gap} ms")
        sim.at(gap + sim.rng.randrange(*self.p.idle_every_ms), self._idle_gap)

    # --- what quiescence did ----------------------------------------------------------------
    def observe(self, nid: int, gid: int, core: RaftNode, faults_on: bool) -> None:
        """Called for every group of every running node after every event."""
        q = core.quiesced
        key = (nid, gid)
        if self._seen.get(key, False) == q:
            return
        self._seen[key] = q
        st = self.stats
        if not q:
            st.wakes += 1
            self.sim.log(f"n{nid} g{gid} WOKE ({core.role.name.lower()}, term {core.term})")
            return
        if core.role == Role.LEADER:
            st.leader_quiesces += 1
            st.leader_quiesces_under_faults += faults_on
        else:
            st.follower_quiesces += 1
        self.sim.log(f"n{nid} g{gid} QUIESCED ({core.role.name.lower()}, term {core.term}, commit {core.committed})")

    def forget(self, nid: int) -> None:
        """Node `nid` crashed: its groups start awake."""
        for key in [k for k in self._seen if k[0] == nid]:
            del self._seen[key]

    # --- the quiesced-leader scenario -------------------------------------------------------
    def begin(self) -> None:
        """Faults stop and clients idle; once everything quiesced, strike the leader."""
        sim = self.sim
        self.calm = True
        sim.calm_down()
        self.idle_until = 1 << 60
        sim.log("SCENARIO: faults stop, clients idle; waiting for every group to quiesce")
        sim.at(20, self._strike, sim.now)

    def _running(self) -> list[Any]:
        return [n for _, n in sorted(self.sim.nodes.items()) if n.logic is not None and not n.removed]

    def _leaders(self) -> dict[int, tuple[Any, RaftNode]]:
        """group -> (node, core) of its newest-term leader among the running nodes."""
        out: dict[int, tuple[Any, RaftNode]] = {}
        for n in self._running():
            for gid, g in n.logic.host.groups.items():
                c = g.core
                if c.role == Role.LEADER and (gid not in out or c.term > out[gid][1].term):
                    out[gid] = (n, c)
        return out

    def _eligible(self) -> dict[int, tuple[Any, RaftNode]]:
        """The groups that must quiesce (group -> leader): those with a leader whose voters all
        run and host the group. (A leader keeps heartbeating a voter that does not answer, e.g.
        one added to a group whose place in the shard map was not recorded: that group stays
        awake by design.)"""
        running = {n.id: n for n in self._running()}
        out = {}
        for gid, (lead, core) in self._leaders().items():
            if all(v in running and gid in running[v].logic.host.groups for v in core.conf.voters):
                out[gid] = (lead, core)
        return out

    def _quiet(self, gid: int) -> bool:
        return all(n.logic.host.groups[gid].core.quiesced for n in self._running() if gid in n.logic.host.groups)

    def _retired(self, victim: int) -> set[int]:
        """The data groups the newest shard map among the running nodes but `victim` no longer
        lists, of those some running node still hosts (empty before any node has a map)."""
        maps = [n.logic.shard_tracker.map for n in self._running() if n.id != victim]
        newest = max((m for m in maps if m is not None), key=lambda m: m.version, default=None)
        if newest is None:
            return set()
        listed = set(newest.data_groups())
        return {gid for n in self._running() for gid in n.logic.host.groups if gid != 0 and gid not in listed}

    def _strike(self, started: int) -> None:
        sim = self.sim
        eligible = self._eligible()
        # A membership change still under way (the operator's procedure finishes first: a node
        # half removed is not a quiesced group's leader to strike), or a group still awake.
        if sim.changing_membership() or not eligible or not all(self._quiet(gid) for gid in eligible):
            if sim.now - started > self.p.quiesce_within_ms:
                sim.fail(f"liveness: the groups did not all quiesce (or a membership change did not finish) within "
                         f"{self.p.quiesce_within_ms} ms after the faults stopped and the clients went idle")
                return
            sim.at(20, self._strike, started)
            return
        smap = next((n.logic.shard_tracker.map for n in self._running() if n.logic.shard_tracker.map), None)
        keys = [f"k{i}" for i in range(self.keys)]
        sim.rng.shuffle(keys)
        key = next((k for k in keys if smap is not None and smap.group_for_key(k.encode()) in eligible), None)
        gid = smap.group_for_key(key.encode()) if smap is not None and key is not None else min(eligible)
        victim = eligible[gid][0]
        led = {g: c.term for g, (n, c) in eligible.items() if n is victim}
        if any(len(eligible[g][1].conf.voters) < 3 for g in led):
            self.stats.scenario = "skipped (fewer than 3 voters)"
            self.end()
            return
        isolate = sim.rng.random() < (0.75 if self.lease_read else 0.5)
        kind = "isolate" if isolate else "crash"
        self.stats.scenario = kind
        sim.log(f"SCENARIO: {kind} the quiesced leader n{victim.id} of groups {sorted(led)}")
        if isolate:
            for o in sorted(sim.nodes):
                if o != victim.id:
                    sim.blocked |= {(o, victim.id), (victim.id, o)}
        else:
            sim.crash(victim.id)
        sim.at(20, self._recover, victim.id, led, key, kind, sim.now)

    def _recover(self, victim: int, led: dict[int, int], key: str | None, kind: str, struck: int) -> None:
        """Wait for new leaders that committed an entry of their term, then write through one."""
        sim = self.sim
        if sim.now - struck > self.p.recover_within_ms:
            sim.fail(f"liveness: {sim.now - struck} ms after its quiesced leader n{victim} was "
                     f"{'crashed' if kind == 'crash' else 'isolated'}, groups {sorted(led)} have no new leader "
                     "serving writes")
            return
        leaders = self._leaders()
        retired = self._retired(victim)
        for gid, term in sorted(led.items()):
            if gid in retired:
                # A range move that was finishing when the faults stopped retired the group (its
                # ranges are served by another group now, which the write below goes through):
                # nobody elects a leader for it any more (seed 1261, 3 nodes).
                continue
            got = leaders.get(gid)
            # A crashed victim may be back already (a restart scheduled by an earlier crash of it
            # fires after the strike: seed 1051 with --watches on, 3 nodes); leading again at a
            # later term with an entry of it committed, it is a recovery too.
            again = kind == "crash" and got is not None and got[0].id == victim
            if got is None or (got[0].id == victim and not again) or got[1].term <= term \
                    or got[1].log.term_or_zero(got[1].committed) != got[1].term:
                sim.at(20, self._recover, victim, led, key, kind, struck)
                return
        if key is None:  # the victim led no client key's group: new leaders are the recovery
            self.stats.recovered_ms = sim.now - struck
            self.end()
            return
        target = None
        for n in self._running():
            smap = n.logic.shard_tracker.map
            if n.id != victim and smap is not None:
                got = leaders.get(smap.group_for_key(key.encode()))
                target = got[0] if got is not None else None
                break

        def written(status: Status, _output: Any) -> None:
            if status != Status.OK:
                sim.at(20, self._recover, victim, led, key, kind, struck)
                return
            self.stats.recovered_ms = sim.now - struck
            sim.log(f"SCENARIO: a new leader committed a write {sim.now - struck} ms after the fault")
            old = sim.nodes[victim]
            if kind == "isolate" and old.logic is not None:
                # The old leader (quiesced, cut off, unaware of the new term) must not serve a
                # read from a lease it held before it quiesced. (Invoked after the write
                # completed, so the two are not concurrent.)
                sim.at(5, sim.one_shot, "get", key, None, old, lambda _s, _o: self.end())
            else:
                self.end()

        if target is None:
            sim.at(20, self._recover, victim, led, key, kind, struck)
            return
        sim.one_shot("put", key, None, target, written)

    def end(self) -> None:
        self.idle_until = -1
        self.sim.heal_all()
