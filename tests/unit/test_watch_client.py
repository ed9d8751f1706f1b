"""The client's choice of where to watch (`kvstore/client/watches.py`), on real shard maps: a
node that hosts every group of the range, else a cover of the groups by few nodes (one
sub-watch each, merged by the client)."""

from __future__ import annotations

import asyncio
import random

import grpc
import grpc.aio
from cancelcheck import assert_cancels_kept, cancel_as_it_arrives, spin

from kvstore.client.checks import RequestChecks
from kvstore.client.retry import Deadline, RetryPolicy
from kvstore.client.routing import Router
from kvstore.client.watches import Watches, _Broken, _Cursor
from kvstore.shard.shardmap import ShardMap
from kvstore.v1 import kv_pb2

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


# --- the merged watch's end, over the client's own streams -------------------------------------
# CI once hung test_watch_merged's kill test for 150 s: the kill ended one sub's stream, and as
# the merge loop canceled the other subs' readers, one of them had just received a response.
# Python 3.11's `asyncio.wait_for` then returns that response instead of raising the cancel, so
# that reader put it in the inbox nobody reads any more and waited forever for it to be taken;
# the loop's teardown waited for that reader, and the watch never resumed.


class _Call:
    """A scripted `KV.Watch` call: its responses (or the error it fails with) come from `q`."""

    def __init__(self, ep: str) -> None:
        self.ep = ep
        self.q: asyncio.Queue[kv_pb2.WatchResponse | BaseException] = asyncio.Queue()
        self.canceled = False

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> kv_pb2.WatchResponse:
        item = await self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.canceled = True


class _Channels:
    """The part of `Channels` a watch uses (`kv(ep).Watch`), answering with scripted calls."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def kv(self, ep: str) -> _Channels:
        self._ep = ep
        return self

    def Watch(self, requests: object) -> _Call:  # (the stub's name)
        c = _Call(self._ep)
        self.calls.append(c)
        return c


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "killed")


def test_a_sub_stream_read_canceled_as_its_response_arrives_ends_canceled() -> None:
    """`Watches._stream`: a cancel the task accepted (cancel() True) always ends it canceled,
    whichever turn of the loop the response came in (the read is never returned instead)."""
    m = ShardMap.initial(list(NODES), 5, replication=3, addresses=NODES)

    async def trial(turns: int) -> tuple[bool, bool]:
        ch = _Channels()
        w = Watches(RequestChecks(timeout=5.0), ch, MapView(m), RetryPolicy(), random.Random(1))  # type: ignore[arg-type]
        stream = w._stream(NODES[1], kv_pb2.WatchCreateRequest(prefix=b"p", watch_id=1), asyncio.Queue())
        return await cancel_as_it_arrives(stream, lambda: ch.calls[0].q.put_nowait(kv_pb2.WatchResponse(revision=7)),
                                          turns)

    assert_cancels_kept(trial)


def test_a_merged_watch_ends_when_a_sub_fails_as_another_gets_a_response() -> None:
    """`Watches._merged` over the client's streams: sub 1's stream fails (its node was killed)
    and sub 2's response arrives `turns` turns of the loop later, for every `turns`: the merged
    watch ends with the failure (the caller resumes from it) and closes both calls."""
    m = ShardMap.initial(list(NODES), 5, replication=3, addresses=NODES)

    async def trial(turns: int) -> None:
        ch = _Channels()
        w = Watches(RequestChecks(timeout=5.0), ch, MapView(m), RetryPolicy(), random.Random(1))  # type: ignore[arg-type]
        plan = [(NODES[1], (1,)), (NODES[2], (2,))]
        create = kv_pb2.WatchCreateRequest(prefix=b"p", start_revision=100, watch_id=1)
        ended: list[BaseException] = []

        async def consume() -> None:
            try:
                async for _ in w._merged(plan, create, _Cursor(100)):
                    pass
            except _Broken as err:
                ended.append(err)

        consumer = asyncio.ensure_future(consume())
        await spin(5)
        a, b = ch.calls
        for c in (a, b):
            c.q.put_nowait(kv_pb2.WatchResponse(created=True, revision=99))
        await spin(10)
        a.q.put_nowait(_unavailable())
        await spin(turns)
        b.q.put_nowait(kv_pb2.WatchResponse(revision=150))
        for _ in range(500):  # until nothing moves (no I/O, no timer: bounded)
            if consumer.done():
                break
            await asyncio.sleep(0)
        assert consumer.done(), f"the merged watch hung after sub 1 failed ({turns} turns)"
        consumer.result()
        assert [e.endpoint for e in ended] == [NODES[1]]  # type: ignore[attr-defined]
        assert a.canceled and b.canceled

    for turns in range(8):
        asyncio.run(trial(turns))
