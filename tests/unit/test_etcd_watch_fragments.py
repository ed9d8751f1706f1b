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
