"""The client's choice of a node to watch at (`kvstore/client/watches.py`), on real shard maps:
a node that hosts every group of the range, or a definite error when none does."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvstore import errors
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
        assert asyncio.run(w._pick(None, [])) in hosts_of(m, m.data_groups())


def test_a_key_watch_goes_to_a_replica_of_its_group() -> None:
    m = ShardMap.initial(list(NODES), 5, replication=3, addresses=NODES)
    w = watches(m)
    g = m.group_for_key(b"k")
    for _ in range(20):
        assert asyncio.run(w._pick(b"k", [])) in hosts_of(m, [g])


def test_no_node_hosting_every_group_is_a_definite_error() -> None:
    m = ShardMap.initial(list(NODES), 5, replication=3, addresses=NODES)
    assert not hosts_of(m, m.data_groups())
    with pytest.raises(errors.WrongShard) as e:
        asyncio.run(watches(m)._pick(None, []))
    assert not e.value.indeterminate and "node-to-node" in e.value.message
