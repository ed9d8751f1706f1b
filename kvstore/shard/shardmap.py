"""The versioned shard map: groups and their replicas, the ring, routing, and moves in progress.

It is the value of key `SHARD_MAP_KEY` in the metadata group (group 0), changed only by
compare-and-swap on the whole encoded value, so every change is a linearizable step from one
version to the next (`version` increases by one per change).

- `ring`: the target layout (virtual-node points owned by groups, see ring.py);
- `routes`: which group serves each hash value *now*. Outside a move it equals the ring's arcs;
  a planned move keeps its ranges routed to the source until the target has installed them and
  serves them (state FLIPPED), which is when the route changes, in the same map change;
- `moves`: ranges planned to change group; the coordinator (`kvstore.node.moves`) drives each through
  PENDING -> FROZEN -> FLIPPED -> removed.

Invariants: `routes` partitions the hash space (every hash value is routed to exactly one group);
every routed group is in `groups`; group ids are never reused.
"""

from __future__ import annotations

import bisect
import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kvstore.raft.types import ConfChange, ConfChangeType
from kvstore.v1 import shard_pb2

from .endpoints import MAX_ADDRESSES, check_address
from .ranges import HASH_MAX, IntervalSet, key_hash
from .ring import Ring, ring_diff

SHARD_MAP_KEY = b"\x00kvstore/shardmap"
META_GROUP = 0
DEFAULT_VNODES = 128
DEFAULT_REPLICATION = 3


class MoveState(enum.IntEnum):
    PENDING = shard_pb2.MOVE_PENDING
    FROZEN = shard_pb2.MOVE_FROZEN
    FLIPPED = shard_pb2.MOVE_FLIPPED


@dataclass(frozen=True, slots=True)
class GroupPlacement:
    id: int
    voters: tuple[int, ...]
    """In placement order: voters[0] is the preferred leader."""
    learners: tuple[int, ...] = ()
    bootstrap: tuple[int, ...] = ()
    """The voters the group was created with (immutable): they bootstrap it identically."""

    def members(self) -> tuple[int, ...]:
        return (*self.voters, *self.learners)


@dataclass(frozen=True, slots=True)
class PendingMove:
    id: int
    source: int
    target: int
    ranges: IntervalSet
    state: MoveState = MoveState.PENDING


class ShardMapError(Exception):
    """A shard-map change that is not allowed (the message says why)."""


def place(nodes: Sequence[int], count: int, replication: int) -> list[tuple[int, ...]]:
    """Initial placement of `count` groups: group i takes the next `rf` nodes round robin
    (positions i*rf .. i*rf+rf-1), so replica counts differ by at most one between nodes; each
    group's preferred leader (first) is the member that leads the fewest groups so far."""
    ns = sorted(nodes)
    rf = min(replication, len(ns))
    leads = dict.fromkeys(ns, 0)
    out = []
    for i in range(count):
        members = [ns[(i * rf + j) % len(ns)] for j in range(rf)]
        first = min(members, key=lambda n: (leads[n], members.index(n)))
        leads[first] += 1
        out.append((first, *(m for m in members if m != first)))
    return out


MAX_GROUP_ID = 4095
"""The largest group id: revisions carry the group id in a 12-bit slot (`mvcc.MAX_GROUPS` slots,
docs/REVISIONS.md), so a larger id would share a slot and revisions would stop being unique.
Ids are never reused: a cluster can create groups 1..MAX_GROUP_ID over its life (the shard
package does not import storage: `tests/unit/test_close.py` checks the two agree)."""


@dataclass(slots=True)
class ShardMap:
    version: int
    replication: int
    vnodes: int
    groups: dict[int, GroupPlacement]
    ring: Ring
    routes: dict[int, IntervalSet]
    moves: list[PendingMove] = field(default_factory=list)
    next_move: int = 1
    next_group: int = 1
    nodes: dict[int, str] = field(default_factory=dict)
    initial_groups: int = 0
    """Groups 1..initial_groups were created with the cluster, serving their ring arcs."""
    clients: dict[int, str] = field(default_factory=dict)
    """node id -> client-only address (`--client-listen`), published by each node itself
    (`kvstore.node.clientaddr`); only nodes of `nodes`, each a valid `HOST:PORT`."""
    _table: tuple[list[int], list[int], list[int]] | None = field(default=None, compare=False, repr=False)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def initial(
        cls,
        nodes: Sequence[int],
        groups: int,
        replication: int = DEFAULT_REPLICATION,
        vnodes: int = DEFAULT_VNODES,
        addresses: dict[int, str] | None = None,
    ) -> ShardMap:
        """The map every node of a new cluster computes identically from its flags."""
        if groups < 1:
            raise ShardMapError("a cluster needs at least one data group")
        if groups > MAX_GROUP_ID:
            raise ShardMapError(f"at most {MAX_GROUP_ID} data groups (group ids are revision slots)")
        if not nodes:
            raise ShardMapError("a cluster needs at least one node")
        if not 1 <= vnodes <= 4096:
            raise ShardMapError("vnodes must be between 1 and 4096")
        ids = list(range(1, groups + 1))
        placements = place(nodes, groups, replication)
        ring = Ring.build(ids, vnodes)
        return cls(
            version=1,
            replication=replication,
            vnodes=vnodes,
            groups={g: GroupPlacement(g, p, (), p) for g, p in zip(ids, placements, strict=True)},
            ring=ring,
            routes=ring.ownership(),
            next_group=groups + 1,
            nodes=dict(addresses or {}),
            initial_groups=groups,
        )

    def bootstrap_ranges(self, group: int) -> IntervalSet:
        """The ranges a group serves when created: its arcs of the initial ring for the cluster's
        initial groups, nothing for groups added later (they receive ranges by moves)."""
        if not 1 <= group <= self.initial_groups:
            return IntervalSet()
        return _initial_ownership(self.initial_groups, self.vnodes).get(group, IntervalSet())

    # --- lookups ------------------------------------------------------------------------------
    def _lookup(self) -> tuple[list[int], list[int], list[int]]:
        if self._table is None:
            rows = sorted((lo, hi, g) for g, s in self.routes.items() for lo, hi in s)
            self._table = ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        return self._table

    def group_for_hash(self, h: int) -> int:
        los, his, gs = self._lookup()
        i = bisect.bisect_right(los, h) - 1
        if i < 0 or h > his[i]:
            raise ShardMapError(f"hash {h:#x} is not routed (corrupt map version {self.version})")
        return gs[i]

    def group_for_key(self, key: bytes) -> int:
        return self.group_for_hash(key_hash(key))

    def data_groups(self) -> list[int]:
        return sorted(self.groups)

    def groups_of_node(self, node: int) -> list[int]:
        return sorted(g for g, p in self.groups.items() if node in p.members())

    def share(self, group: int) -> float:
        s = self.routes.get(group)
        return 0.0 if s is None else s.size() / (HASH_MAX + 1)

    def check(self) -> None:
        """Raise ShardMapError unless the invariants hold: every group has at least one voter,
        its replicas are distinct node ids >= 1 and it is below `next_group` (at most
        `MAX_GROUP_ID` + 1); the ring's owners,
        the routes and the moves name only groups of the map; the routes cover the hash space
        exactly once."""
        if self.version < 1 or self.replication < 1:
            raise ShardMapError(f"version {self.version} / replication {self.replication} must be >= 1")
        if self.next_group > MAX_GROUP_ID + 1:
            raise ShardMapError(f"next_group {self.next_group} is past the last group id {MAX_GROUP_ID}")
        for g, p in self.groups.items():
            ids = p.members()
            if g != p.id or not 0 < g < self.next_group:
                raise ShardMapError(f"group {g} is not a data group id below next_group {self.next_group}")
            if not p.voters or len(set(ids)) != len(ids) or any(n < 1 for n in ids):
                raise ShardMapError(f"group {g} has no voter, a replica twice, or node 0")
        if any(o not in self.groups for o in self.ring.owners):
            raise ShardMapError("the ring names a group that is not in the map")
        for mv in self.moves:
            if mv.source not in self.groups or mv.target not in self.groups or mv.id >= self.next_move:
                raise ShardMapError(f"move {mv.id} names an unknown group or an id at or past next_move")
        total = 0
        seen = IntervalSet()
        for g, s in self.routes.items():
            if g not in self.groups:
                raise ShardMapError(f"group {g} is routed but not in the map")
            if seen.overlaps(s):
                raise ShardMapError(f"group {g}'s routes overlap another group's")
            seen = seen.union(s)
            total += s.size()
        if total != HASH_MAX + 1:
            raise ShardMapError(f"routes cover {total} hash values, not the whole space")
        if len(self.clients) > MAX_ADDRESSES:
            raise ShardMapError(f"more than {MAX_ADDRESSES} client addresses")
        for n, addr in self.clients.items():
            if n not in self.nodes:
                raise ShardMapError(f"client address of node {n}, which is not a node of the map")
            try:
                check_address(addr)
            except ValueError as err:
                raise ShardMapError(f"client address of node {n}: {err}") from None

    # --- changes (each returns a new map, one version later) ------------------------------------
    def _next(self, **changes: object) -> ShardMap:
        m = replace(self, version=self.version + 1, _table=None, **changes)  # type: ignore[arg-type]
        return m

    def _plan(self, ring: Ring, groups: dict[int, GroupPlacement], **changes: object) -> ShardMap:
        if self.moves:
            raise ShardMapError(f"{len(self.moves)} range moves are still in progress; wait for them")
        moves = []
        nm = self.next_move
        for mv in ring_diff_routes(self.routes, ring.ownership()):
            moves.append(PendingMove(nm, mv[0], mv[1], mv[2]))
            nm += 1
        return self._next(ring=ring, groups=groups, moves=moves, next_move=nm, **changes)

    def plan_add_group(self, nodes: Sequence[int]) -> ShardMap:
        """Add a data group placed on the least loaded of `nodes`; plan the moves of the ranges
        its ring points take over."""
        gid = self.next_group
        if gid > MAX_GROUP_ID:
            raise ShardMapError(
                f"cannot add a group: group ids 1..{MAX_GROUP_ID} are all used (ids are never reused, and a "
                f"group's id is its revision slot: a larger one would share a slot with group {gid % (MAX_GROUP_ID + 1)})"
            )
        voters = self._place_new(nodes)
        groups = dict(self.groups)
        groups[gid] = GroupPlacement(gid, voters, (), voters)
        return self._plan(self.ring.with_groups([gid], self.vnodes), groups, next_group=gid + 1)

    def plan_remove_group(self, group: int) -> ShardMap:
        """Hand the group's ring points to the other groups (round robin) and plan the moves.
        The group stays in the map, serving nothing, until `drop_group` once the moves are done."""
        if group not in self.groups:
            raise ShardMapError(f"no data group {group}")
        # Heirs: groups that still own ring points (not ones being removed themselves).
        heirs = [g for g in self.data_groups() if g != group and g in self.ring.owners]
        if not heirs:
            raise ShardMapError("cannot remove the last data group")
        return self._plan(self.ring.without_group(group, heirs), dict(self.groups))

    def plan_rebalance(self) -> ShardMap:
        """Return to the canonical ring (`vnodes` points per group) and plan the moves."""
        live = [g for g in self.data_groups() if g in self.ring.owners]  # not groups being removed
        ring = Ring.build(live, self.vnodes)
        return self._plan(ring, dict(self.groups))

    def drop_group(self, group: int) -> ShardMap:
        if self.routes.get(group) or group in self.ring.owners:
            raise ShardMapError(f"group {group} still owns ranges")
        if any(group in (m.source, m.target) for m in self.moves):
            raise ShardMapError(f"group {group} is part of a move in progress")
        groups = {g: p for g, p in self.groups.items() if g != group}
        routes = {g: s for g, s in self.routes.items() if g != group}
        return self._next(groups=groups, routes=routes)

    def set_move_state(self, move_id: int, state: MoveState) -> ShardMap:
        """FROZEN, or FLIPPED (which also routes the move's ranges to its target)."""
        moves = []
        routes = dict(self.routes)
        for m in self.moves:
            if m.id == move_id and state > m.state:  # states only advance (a stale coordinator)
                if state == MoveState.FLIPPED:
                    routes[m.source] = routes.get(m.source, IntervalSet()).difference(m.ranges)
                    routes[m.target] = routes.get(m.target, IntervalSet()).union(m.ranges)
                    if not routes[m.source]:
                        del routes[m.source]
                m = replace(m, state=state)
            moves.append(m)
        return self._next(moves=moves, routes=routes)

    def finish_move(self, move_id: int) -> ShardMap:
        return self._next(moves=[m for m in self.moves if m.id != move_id])

    def with_nodes(self, nodes: dict[int, str]) -> ShardMap:
        """The map with the members' (peer) addresses `nodes`; client addresses of nodes that
        are no longer members are dropped."""
        return self._next(nodes=dict(nodes), clients={n: a for n, a in self.clients.items() if n in nodes})

    def with_client(self, node: int, address: str) -> ShardMap:
        """The map with node `node`'s client address set to `address` ("": removed). Raises
        ShardMapError for a node the map does not list or an address that is not HOST:PORT."""
        if node not in self.nodes:
            raise ShardMapError(f"node {node} is not a node of the map")
        clients = dict(self.clients)
        if address:
            try:
                clients[node] = check_address(address)
            except ValueError as err:
                raise ShardMapError(str(err)) from None
        else:
            clients.pop(node, None)
        return self._next(clients=clients)

    def with_member_change(self, group: int, cc: ConfChange) -> ShardMap:
        """The map with `group`'s replica list following the applied change `cc` (a group the map
        does not have any more stays as it is: the result is then this map itself)."""
        if group not in self.groups:
            return self
        p = self.groups[group]
        voters, learners = list(p.voters), set(p.learners)
        n = cc.node_id
        if cc.type == ConfChangeType.ADD_LEARNER:
            learners.add(n)
        elif cc.type == ConfChangeType.ADD_VOTER:
            learners.discard(n)
            if n not in voters:
                voters.append(n)
        else:
            learners.discard(n)
            voters = [v for v in voters if v != n]
        return self.with_group_members(group, voters, sorted(learners))

    def reflects(self, group: int, cc: ConfChange) -> bool:
        """Does this map's replica list of `group` already follow the applied change `cc` (or
        does the map not have `group` any more, so there is nothing to record)? As Raft sees a
        change it need not apply: a learner added is listed (a voter counts), a voter added is a
        voter, a node removed is not listed."""
        p = self.groups.get(group)
        if p is None:
            return True
        n = cc.node_id
        if cc.type == ConfChangeType.ADD_LEARNER:
            return n in p.members()
        if cc.type == ConfChangeType.ADD_VOTER:
            return n in p.voters and n not in p.learners
        return n not in p.members()

    def with_group_members(self, group: int, voters: Sequence[int], learners: Sequence[int]) -> ShardMap:
        old = self.groups[group]
        order = [v for v in old.voters if v in voters] + [v for v in sorted(voters) if v not in old.voters]
        groups = dict(self.groups)
        groups[group] = GroupPlacement(group, tuple(order), tuple(sorted(learners)), old.bootstrap)
        return self._next(groups=groups)

    def _place_new(self, nodes: Sequence[int]) -> tuple[int, ...]:
        if not nodes:
            raise ShardMapError("no nodes to place a group on")
        load = {n: 0 for n in nodes}
        lead = {n: 0 for n in nodes}
        for p in self.groups.values():
            for n in p.members():
                if n in load:
                    load[n] += 1
            if p.voters and p.voters[0] in lead:
                lead[p.voters[0]] += 1
        rf = min(self.replication, len(load))
        chosen = sorted(load, key=lambda n: (load[n], n))[:rf]
        first = min(chosen, key=lambda n: (lead[n], n))
        return (first, *sorted(n for n in chosen if n != first))

    # --- wire ---------------------------------------------------------------------------------
    def to_proto(self) -> shard_pb2.ShardMap:
        pb = shard_pb2.ShardMap(
            version=self.version,
            replication=self.replication,
            vnodes=self.vnodes,
            next_move=self.next_move,
            next_group=self.next_group,
            initial_groups=self.initial_groups,
        )
        for g in self.data_groups():
            p = self.groups[g]
            pb.groups.add(id=g, voters=p.voters, learners=p.learners, bootstrap=p.bootstrap)
        pb.points.extend(self.ring.points)
        pb.owners.extend(self.ring.owners)
        los, his, gs = self._lookup()
        pb.route_lo.extend(los)
        pb.route_hi.extend(his)
        pb.route_group.extend(gs)
        for m in self.moves:
            pb.moves.add(
                id=m.id, source=m.source, target=m.target,
                lo=[a for a, _ in m.ranges], hi=[b for _, b in m.ranges], state=int(m.state),
            )
        for n, addr in sorted(self.nodes.items()):
            pb.nodes[n] = addr
        for n, addr in sorted(self.clients.items()):
            pb.clients[n] = addr
        return pb

    def encode(self) -> bytes:
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def decode(cls, data: bytes) -> ShardMap:
        """Decode and check (`check`) a map. Total: anything else raises ShardMapError."""
        pb = shard_pb2.ShardMap()
        try:
            pb.ParseFromString(data)
        except Exception as err:  # protobuf's DecodeError
            raise ShardMapError(f"corrupt shard map: {err}") from None
        try:
            m = cls.from_proto(pb)
            m.check()
        except ShardMapError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
            raise ShardMapError(f"corrupt shard map: {err}") from None
        return m

    @classmethod
    def from_proto(cls, pb: shard_pb2.ShardMap) -> ShardMap:
        if not (len(pb.route_lo) == len(pb.route_hi) == len(pb.route_group)):
            raise ShardMapError("corrupt shard map: route columns differ in length")
        if len(pb.points) != len(pb.owners):
            raise ShardMapError("corrupt shard map: ring columns differ in length")
        parts: dict[int, list[tuple[int, int]]] = {}
        for lo, hi, g in zip(pb.route_lo, pb.route_hi, pb.route_group, strict=True):
            parts.setdefault(g, []).append((lo, hi))
        m = cls(
            version=pb.version,
            replication=pb.replication,
            vnodes=pb.vnodes,
            groups={
                g.id: GroupPlacement(g.id, tuple(g.voters), tuple(g.learners), tuple(g.bootstrap))
                for g in pb.groups
            },
            ring=Ring(zip(pb.points, pb.owners, strict=True)),
            routes={g: IntervalSet(iv) for g, iv in parts.items()},
            moves=[
                PendingMove(mv.id, mv.source, mv.target, IntervalSet(zip(mv.lo, mv.hi, strict=True)),
                            MoveState(mv.state))
                for mv in pb.moves
            ],
            next_move=pb.next_move,
            next_group=pb.next_group,
            nodes=dict(pb.nodes),
            initial_groups=pb.initial_groups,
            clients=dict(pb.clients),
        )
        return m


@functools.lru_cache(maxsize=4)
def _initial_ownership(groups: int, vnodes: int) -> dict[int, IntervalSet]:
    """The initial ring's arcs per group, computed once (a node creates thousands of groups)."""
    return Ring.build(range(1, groups + 1), vnodes).ownership()


def ring_diff_routes(
    old: dict[int, IntervalSet], new: dict[int, IntervalSet]
) -> list[tuple[int, int, IntervalSet]]:
    """(source, target, ranges) for every hash range whose group differs between two partitions."""
    out = []
    for s in sorted(old):
        for t in sorted(new):
            if s == t:
                continue
            r = old[s].intersection(new[t])
            if r:
                out.append((s, t, r))
    return out


__all__ = [
    "DEFAULT_REPLICATION",
    "DEFAULT_VNODES",
    "META_GROUP",
    "SHARD_MAP_KEY",
    "GroupPlacement",
    "MoveState",
    "PendingMove",
    "ShardMap",
    "ShardMapError",
    "place",
    "ring_diff",
]
