"""etcd's watch `fragment` (`kvstore/server/etcd/watch.py` `fragments`): a response larger than the
limit is split as etcd 3.4's `sendFragments` splits it; the pieces joined are the response."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.etcdpb.mvccpb import kv_pb2 as mvcc_pb2
from kvstore.server.etcd.watch import fragments


def _resp(sizes: list[int]) -> rpc_pb2.WatchResponse:
    r = rpc_pb2.WatchResponse(header=rpc_pb2.ResponseHeader(cluster_id=7, member_id=2, revision=99), watch_id=3)
    for i, n in enumerate(sizes):
        r.events.append(mvcc_pb2.Event(kv=mvcc_pb2.KeyValue(key=b"k%d" % i, value=b"v" * n, mod_revision=99)))
    return r


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), max_size=40), limit=st.integers(1, 20_000))
def test_pieces_join_to_the_response_and_stay_under_the_limit(sizes: list[int], limit: int) -> None:
    r = _resp(sizes)
    pieces = fragments(r, limit)
    assert [e for p in pieces for e in p.events] == list(r.events)
    if len(sizes) < 2 or r.ByteSize() < limit:
        assert pieces == [r] and not r.fragment
        return
    assert [p.fragment for p in pieces] == [True] * (len(pieces) - 1) + [False]
    for i, p in enumerate(pieces):
        assert p.header == r.header and p.watch_id == r.watch_id and p.events
        if len(p.events) > 1:
            assert p.ByteSize() < limit
        if i + 1 < len(pieces):  # as etcd: a piece ends only where the next event would reach the limit
            fuller = rpc_pb2.WatchResponse()
            fuller.CopyFrom(p)
            fuller.events.append(pieces[i + 1].events[0])
            assert fuller.ByteSize() >= limit


def test_a_large_revision_is_split_and_a_small_one_is_not() -> None:
    big = _resp([100_000] * 50)  # 5 MB
    pieces = fragments(big, 1 << 20)
    assert len(pieces) == 5 and all(p.ByteSize() < 1 << 20 for p in pieces)
    assert sum(len(p.events) for p in pieces) == 50
    small = _resp([10] * 50)
    assert fragments(small, 1 << 20) == [small]
    one = _resp([2 << 20])  # one event larger than the limit goes whole (etcd's rule)
    assert fragments(one, 1 << 20) == [one]


def test_a_fragmented_response_is_one_outbox_item_and_its_pieces_leave_together() -> None:
    """Several writers share a stream's outbox (the pump and each merged watch): the pieces of
    one fragmented response are one item, so no other response lands between them."""
    import asyncio

    from kvstore.server.etcd.watch import queued, sent

    big = _resp([100_000] * 30)
    item = queued(big, True, 1 << 20)
    assert isinstance(item, tuple) and list(sent(item)) == fragments(big, 1 << 20)
    small = _resp([10] * 3)
    assert queued(small, True, 1 << 20) is small and sent(small) == (small,)
    assert queued(big, False, 1 << 20) is big  # without `fragment`: whole

    async def run() -> list[tuple[int, bool]]:
        out: asyncio.Queue[object] = asyncio.Queue(1)
        others = [rpc_pb2.WatchResponse(watch_id=9, events=[mvcc_pb2.Event()]) for _ in range(5)]

        async def writer_big() -> None:
            await out.put(queued(big, True, 1 << 20))

        async def writer_small() -> None:
            for r in others:
                await out.put(queued(r, True, 1 << 20))

        tasks = [asyncio.ensure_future(writer_small()), asyncio.ensure_future(writer_big())]
        got: list[tuple[int, bool]] = []
        while len(got) < 5 + len(fragments(big, 1 << 20)):
            item = await out.get()
            assert isinstance(item, rpc_pb2.WatchResponse | tuple)
            got.extend((r.watch_id, r.fragment) for r in sent(item))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return got

    got = asyncio.run(run())
    ids = [w for w, _ in got]
    first = ids.index(3)
    assert ids[first:first + len(fragments(big, 1 << 20))] == [3] * len(fragments(big, 1 << 20))
