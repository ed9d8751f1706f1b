"""Reads at every consistency level in the whole-node simulator, and the check of staleness bounds.

Each simulated node runs the real `kvstore.node.reads.NodeReads` over its host, with the node's
own clock (true time plus the node's offset; its ticks are skewed too) and an rng drawn from the
seed. Clients read:

- linearizably at any node, leader or follower (`linearizable_read`): the leader runs a ReadIndex
  round, a follower asks the leader for a read index and waits until it has applied through it.
  These reads go into the history that `chaos.checker` checks for linearizability;
- with bounded staleness or stale (`bounded_read`), at any node. These are not linearizable and
  stay out of that history; instead `StalenessChecker` checks each answer against the bound the
  node stated, by the simulator's TRUE clock:

      a read served at true time T with staleness bound s must reflect every write
      acknowledged before T - s,

  i.e. the applied index it was served at is at least the index of every such write (a write's
  entry index, from its result; the group's log is the same on every node, which the safety
  checker checks). A bounded read must also state s <= its max staleness. Node clock offsets
  cancel in an honest bound (it is measured on one clock); a bound computed from the wrong
  instant or across clocks does not survive this check.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore import errors
from kvstore.node.host import Host
from kvstore.node.logic import NodeLogic
from kvstore.node.reads import BOUNDED, LINEARIZABLE, STALE, NodeReads, ReadPoint, ReadSettings
from kvstore.node.store import NodeStore
from kvstore.raft import Role
from kvstore.shard.ranges import key_hash


class SimNode(Protocol):
    """What these reads use of a simulated node (`nodes.SimNode`; a protocol, so that this module
    does not import the simulator that imports it)."""

    id: int
    epoch: int
    reads: NodeReads | None
    store: NodeStore | None
    logic: NodeLogic | None


class NodeSimulation(Protocol):
    """What these reads use of the simulation (`nodes.NodeSimulation`)."""

    now: int
    rng: random.Random
    p: Any
    pending: dict[int, Callable[[], None]]
    healed_at: int | None
    late_timeouts: list[str]
    stale_check: StalenessChecker
    reads_params: ReadParams

    @property
    def _op_ids(self) -> Iterator[int]: ...

    def at(self, delay: float, fn: Callable[..., None], *args: Any) -> None: ...

    def log(self, msg: str) -> None: ...

    def _client_next(self, process: int) -> None: ...

    def _route(self, node: Any, k: bytes) -> int: ...

    def _lead(self, node: Any, gid: int) -> int: ...

    def _kick(self, n: Any) -> None: ...

TOLERANCE_MS = 0.5
"""Simulated times are whole milliseconds; bounds are floats computed from them."""


class StaleReadViolation(AssertionError):
    """A bounded or stale read was older than the staleness bound it stated."""


@dataclass(slots=True)
class ReadParams:
    """The run's read knobs, drawn from the seed."""

    probe_ticks: int = 2
    demand_ticks: int = 100
    anywhere: float = 0.5
    """Chance a linearizable read goes to a random node (often a follower) instead of the leader
    the client last saw."""
    bounded: float = 0.3
    """Share of reads that are bounded-staleness reads."""
    stale: float = 0.1
    """Share of reads that are stale reads."""
    max_staleness_ms: tuple[int, ...] = (20, 50, 200, 1000)

    @classmethod
    def draw(cls, rng: random.Random) -> ReadParams:
        return cls(
            probe_ticks=rng.choice((1, 2, 5)),
            demand_ticks=rng.choice((0, 100)),
            anywhere=rng.choice((0.3, 0.6, 0.9)),
            bounded=rng.choice((0.2, 0.4)),
            stale=rng.choice((0.05, 0.15)),
        )

    def level(self, rng: random.Random) -> str:
        r = rng.random()
        if r < self.bounded:
            return BOUNDED
        if r < self.bounded + self.stale:
            return STALE
        return LINEARIZABLE


def node_reads(host: Host, clock: Callable[[], float], rng: random.Random, params: ReadParams) -> NodeReads:
    """A node's read logic, as `kvstore serve` builds it (but with the simulated clock)."""
    return NodeReads(host, ReadSettings(probe_ticks=params.probe_ticks, demand_ticks=params.demand_ticks),
                     clock=clock, rng=rng)


@dataclass
class StalenessChecker:
    """Checks every bounded and stale read against the bound it stated (module docstring)."""

    _times: dict[int, list[int]] = field(default_factory=dict)
    """group -> true times of acknowledged writes, in order."""
    _max_index: dict[int, list[int]] = field(default_factory=dict)
    """group -> the largest entry index among the writes acknowledged up to each of `_times`."""
    checked: int = 0
    unknown: int = 0
    refused: int = 0
    leader_served: int = 0
    replica_served: int = 0
    """Bounded and stale reads served by a leader / a follower."""
    linearizable_at_followers: int = 0
    """Linearizable reads a follower served (ReadIndex from the leader, then applied through)."""
    worst_ms: float = 0.0
    """The largest stated bound of a checked read."""

    def acked(self, group: int, index: int, at: int) -> None:
        """A node answered a write (entry `index` of `group`) as done at true time `at`."""
        times = self._times.setdefault(group, [])
        mx = self._max_index.setdefault(group, [])
        assert not times or times[-1] <= at
        times.append(at)
        mx.append(max(index, mx[-1] if mx else 0))

    def newest_acked_before(self, group: int, t: float) -> int:
        """The largest index among the writes of `group` acknowledged strictly before `t`."""
        times = self._times.get(group, [])
        i = bisect.bisect_left(times, t)  # times[:i] < t
        return self._max_index[group][i - 1] if i else 0

    def check(self, node: int, group: int, point: ReadPoint, max_staleness_ms: int, at: int, what: str) -> None:
        """A read of `group` at node `node` served at true time `at` from local state at `point`."""
        if point.level == BOUNDED and (point.staleness is None or point.staleness * 1000 > max_staleness_ms):
            raise StaleReadViolation(f"{what} at n{node}: bounded read with max staleness {max_staleness_ms} ms "
                                     f"served with a stated staleness of {point.staleness}")
        if point.staleness is None:
            self.unknown += 1
            return
        bound_ms = point.staleness * 1000
        self.checked += 1
        self.worst_ms = max(self.worst_ms, bound_ms)
        need = self.newest_acked_before(group, at - bound_ms - TOLERANCE_MS)
        if point.index < need:
            raise StaleReadViolation(
                f"{what} at n{node} (g{group}) served at {at} ms from applied index {point.index} stating "
                f"staleness {bound_ms:.1f} ms, but a write acknowledged before {at - bound_ms:.1f} ms has index "
                f"{need}: the read is older than its bound"
            )


def linearizable_read(sim: NodeSimulation, node: SimNode, k: bytes,
                      answer: Callable[[str | None, bool, int], None]) -> None:
    """A linearizable read at `node`, leader or follower, through its `NodeReads`:
    `answer(value, ok, leader hint)` (the hint is the node itself only if it leads the group)."""
    epoch = node.epoch
    gid = -1
    try:
        gid = sim._route(node, k)
        reads = node.reads
        assert reads is not None and node.store is not None
        store = node.store

        def served(point: ReadPoint | None, err: errors.KVError | None) -> None:
            if err is not None or point is None or node.epoch != epoch:
                answer(None, False, sim._lead(node, gid))
                return
            st = store.shard_state(gid)
            if st is not None and key_hash(k) not in st.active:
                answer(None, False, 0)
                return
            got = store.get(gid, k)
            lead = sim._lead(node, gid)
            if lead != node.id:
                sim.stale_check.linearizable_at_followers += 1
            answer(None if got is None else got.decode(), True, lead)

        reads.read(gid, LINEARIZABLE, 0, served)
    except errors.KVError as err:
        lead = err.leader_id if isinstance(err, errors.NotLeader) else sim._lead(node, gid) if gid >= 0 else 0
        sim.at(1, answer, None, False, lead)
        return
    sim._kick(node)


def bounded_read(sim: NodeSimulation, process: int, key: str, level: str, target: SimNode) -> None:
    """A client's bounded or stale read at `target`: checked against its stated bound when it is
    served, not put in the linearizability history. Then the process goes on."""
    rp = sim.reads_params
    max_ms = sim.rng.choice(rp.max_staleness_ms) if level == BOUNDED else 0
    k = key.encode()
    invoked = sim.now
    finished = False
    op_id = next(sim._op_ids)
    what = f"p{process} {level} read of {key}" + (f" (max {max_ms} ms)" if level == BOUNDED else "")
    epoch = target.epoch

    def finish(outcome: str) -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        sim.pending.pop(op_id, None)
        sim.log(f"client {what} at n{target.id} -> {outcome}")
        sim.at(sim.rng.randrange(0, 30), sim._client_next, process)

    def timeout() -> None:
        if not finished and sim.healed_at is not None and invoked >= sim.healed_at + sim.p.liveness_ms:
            sim.late_timeouts.append(f"{what} invoked at {invoked} ms")
        finish("timeout")

    sim.pending[op_id] = timeout
    sim.at(sim.p.client_timeout_ms, timeout)
    try:
        gid = sim._route(target, k)
        reads = target.reads
        assert reads is not None and target.store is not None and target.logic is not None
        store = target.store
        leader = target.logic.host.groups[gid].core.role == Role.LEADER

        def served(point: ReadPoint | None, err: errors.KVError | None) -> None:
            if target.epoch != epoch:
                return
            if err is not None or point is None:
                sim.stale_check.refused += 1
                finish(f"refused: {err}")
                return
            st = store.shard_state(gid)
            if st is not None and key_hash(k) not in st.active:
                finish("wrong shard")
                return
            got = store.get(gid, k)
            # Checked even if the client gave up meanwhile: the node served it.
            sim.stale_check.check(target.id, gid, point, max_ms, sim.now, what)
            if leader:
                sim.stale_check.leader_served += 1
            else:
                sim.stale_check.replica_served += 1
            finish(f"{None if got is None else got.decode()!r} at index {point.index}, staleness {point.staleness}")

        reads.read(gid, level, max_ms, served)
    except errors.KVError as err:
        sim.stale_check.refused += 1
        sim.at(1, finish, f"refused: {err}")
        return
    sim._kick(target)
