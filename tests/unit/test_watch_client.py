"""The client's choice of where to watch (`kvstore/client/watches.py`), on real shard maps: a
node that hosts every group of the range, else a cover of the groups by few nodes (one
sub-watch each, merged by the client)."""

from __future__ import annotations

import asyncio
import random

from kvstore.client.checks import RequestChecks
from kvstore.client.retry import Deadline, RetryPolicy
from kvstore.client.routing import Router
from kvstore.client.watches import Watches
from kvstore.shard.shardmap import ShardMap

NODES = {n: f"127.0.0.1:{2378 + n}" for n in range(1, 6)}


class MapView:
    """The part of `ClusterView` a watch uses: the router and its shard map (already known)."""

    def __init__(self, m: ShardMap) -> None:
        self.router = Router(list(NODES.values()))
        self.router.set_shard_map(m)
        self.m = m

    async def shard_map(self, deadline: Deadline, *, refresh: bool = False) -> ShardMap:
        return self.m


def watches(m: ShardMap) -> Watches:
    return Watches(RequestChecks(timeout=5.0), None, MapView(m), RetryPolicy(), random.Random(1))  # type: ignore[arg-type]


def hosts_of(m: ShardMap, groups: list[int]) -> set[str]:
    common = set.intersection(*(set(m.groups[g].members()) for g in groups))
    return {NODES[n] for n in common}


def test_a_prefix_watch_goes_to_a_node_hosting_every_group() -> None:
    m = ShardMap.initial([1, 2, 3], 3, replication=3, addresses={n: NODES[n] for n in (1, 2, 3)})
    w = watches(m)
    for _ in range(20):
        [(ep, groups)], _ = asyncio.run(w._plan(None, []))
        assert ep in hosts_of(m, m.data_groups()) and groups == ()


def test_a_key_watch_goes_to_a_replica_of_its_group() -> None:
    m = ShardMap.initial(list(NODES), 5, replication=3, addresses=NODES)
    w = watches(m)
    g = m.group_for_key(b"k")
    for _ in range(20):
        [(ep, groups)], _ = asyncio.run(w._plan(b"k", []))
        assert ep in hosts_of(m, [g]) and groups == ()


def cover_of(planned: tuple[list[tuple[str, tuple[int, ...]]], int], m: ShardMap) -> dict[int, tuple[int, ...]]:
    plan, version = planned
    assert version == m.version  # each sub-watch's node checks it
    node_of = {a: n for n, a in NODES.items()}
    out = {node_of[ep]: gs for ep, gs in plan}
    assert len(out) == len(plan), "one sub-watch per node"
    assert sorted(g for gs in out.values() for g in gs) == m.data_groups(), "every group exactly once"
    assert all(n in m.groups[g].members() for n, gs in out.items() for g in gs), "each at a host"
    return out


def test_with_no_node_hosting_every_group_a_prefix_watch_is_covered_by_few_nodes() -> None:
    m = ShardMap.initial(list(NODES), 5, replication=3, addresses=NODES)
    assert not hosts_of(m, m.data_groups())
    w = watches(m)
    for _ in range(20):
        c = cover_of(asyncio.run(w._plan(None, [])), m)
        assert len(c) == 2  # 5 groups of 3 replicas on 5 nodes: two nodes hold them all


def test_the_cover_avoids_nodes_that_failed_and_nodes_whose_breaker_is_open() -> None:
    m = ShardMap.initial(list(NODES), 5, replication=3, addresses=NODES)
    w = watches(m)
    c = cover_of(asyncio.run(w._plan(None, [NODES[1], NODES[2]])), m)
    assert not {1, 2} & set(c)
    br = w.router.breaker(NODES[3])
    for _ in range(100):
        br.record_failure()
    assert not br.would_allow()
    c = cover_of(asyncio.run(w._plan(None, [NODES[1]])), m)
    assert not {1, 3} & set(c)
