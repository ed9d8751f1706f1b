"""etcd v3 requests to kvstore's (`kvstore/server/etcd/convert.py`): every decoded request either
translates or is refused with `EtcdRequestError` (fuzzed with hypothesis from raw bytes and from
well-formed messages with hostile field values), and the replies are built as etcd builds them
(count before the revision filters, sort defaults, limit and `more`, keys_only, count_only).
A Txn's ranges over several keys or at a revision become no kvstore op (the caller reads them at
the transaction's revision): `taken_ranges` names those on the path a result took, and the
reply maps every op back, whichever branch ran."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.server.etcd.convert import (
    MAX_DEPTH,
    MAX_TXN_OPS,
    EtcdRequestError,
    check_put,
    cluster_id_of,
    ignored_puts,
    leased_puts,
    range_query,
    range_reply,
    scan_answers,
    taken_ranges,
    txn_body,
    txn_gets,
    txn_reply,
    watch_create,
    with_scans,
)
from kvstore.server.etcd.lease import grant_id
from kvstore.server.txn_reading import has_writes
from kvstore.storage import leases, txn
from kvstore.storage.txn import MAX_TXN_DEPTH, MAX_TXN_ITEMS
from kvstore.v1 import kv_pb2

INT64 = st.integers(-(2**63), 2**63 - 1)
KEYS = st.binary(max_size=6)


def _total(fn, msg) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(msg)
    except EtcdRequestError as err:
        assert err.message and err.code in {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_any_bytes_decode_and_convert_or_refuse(data: bytes) -> None:
    for cls, fn in ((rpc_pb2.RangeRequest, range_query), (rpc_pb2.PutRequest, check_put),
                    (rpc_pb2.TxnRequest, txn_body), (rpc_pb2.WatchCreateRequest, lambda m: watch_create(m, 1))):
        try:
            msg = cls.FromString(data)
        except DecodeError:
            continue
        _total(fn, msg)


ranges = st.builds(
    rpc_pb2.RangeRequest, key=KEYS, range_end=KEYS, limit=INT64, revision=INT64,
    sort_order=st.integers(0, 4), sort_target=st.integers(0, 6), serializable=st.booleans(),
    keys_only=st.booleans(), count_only=st.booleans(), min_mod_revision=INT64, max_create_revision=INT64,
)
puts = st.builds(rpc_pb2.PutRequest, key=KEYS, value=KEYS, lease=INT64, prev_kv=st.booleans(),
                 ignore_value=st.booleans(), ignore_lease=st.booleans())
deletes = st.builds(rpc_pb2.DeleteRangeRequest, key=KEYS, range_end=KEYS, prev_kv=st.booleans())
compares = st.builds(rpc_pb2.Compare, key=KEYS, result=st.integers(0, 5), target=st.integers(0, 6),
                     version=INT64, range_end=st.sampled_from([b"", b"z"]))


def _ops(depth: int) -> st.SearchStrategy[rpc_pb2.RequestOp]:
    leaf = st.one_of(
        st.builds(rpc_pb2.RequestOp, request_range=ranges), st.builds(rpc_pb2.RequestOp, request_put=puts),
        st.builds(rpc_pb2.RequestOp, request_delete_range=deletes), st.just(rpc_pb2.RequestOp()),
    )
    if depth == 0:
        return leaf
    return st.one_of(leaf, st.builds(rpc_pb2.RequestOp, request_txn=_txns(depth - 1)))


def _txns(depth: int) -> st.SearchStrategy[rpc_pb2.TxnRequest]:
    return st.builds(rpc_pb2.TxnRequest, compare=st.lists(compares, max_size=3),
                     success=st.lists(_ops(depth), max_size=3), failure=st.lists(_ops(depth), max_size=3))


@settings(max_examples=300, deadline=None)
@given(r=ranges, p=puts, t=_txns(5), w=st.builds(
    rpc_pb2.WatchCreateRequest, key=KEYS, range_end=KEYS, start_revision=INT64,
    filters=st.lists(st.integers(0, 3), max_size=3), fragment=st.booleans()))
def test_hostile_field_values_convert_or_refuse(r: rpc_pb2.RangeRequest, p: rpc_pb2.PutRequest,
                                                t: rpc_pb2.TxnRequest, w: rpc_pb2.WatchCreateRequest) -> None:
    _total(range_query, r)
    _total(check_put, p)
    _total(txn_body, t)
    _total(lambda m: watch_create(m, 1), w)
    try:
        body, plan = txn_body(t)
    except EtcdRequestError:
        return
    flagged = [op.request_put.key for op in _all_ops(t) if op.request_put.ignore_value or op.request_put.ignore_lease]
    assert sorted(put.key for put, _, on in ignored_puts(plan, body) if not on) == sorted(flagged)


def _all_ops(t: rpc_pb2.TxnRequest) -> list[rpc_pb2.RequestOp]:
    out = []
    for op in (*t.success, *t.failure):
        out += _all_ops(op.request_txn) if op.WhichOneof("request") == "request_txn" else [op]
    return out


def test_the_empty_key_and_etcds_messages() -> None:
    with pytest.raises(EtcdRequestError, match=r"^etcdserver: key is not provided$"):
        range_query(rpc_pb2.RangeRequest())
    with pytest.raises(EtcdRequestError, match=r"^etcdserver: value is provided$"):
        check_put(rpc_pb2.PutRequest(key=b"k", value=b"v", ignore_value=True))
    with pytest.raises(EtcdRequestError, match=r"^etcdserver: lease is provided$"):
        check_put(rpc_pb2.PutRequest(key=b"k", lease=5, ignore_lease=True))
    with pytest.raises(EtcdRequestError) as e:
        txn_body(rpc_pb2.TxnRequest(compare=[rpc_pb2.Compare(key=b"k", range_end=b"z")]))
    assert e.value.code == "FAILED_PRECONDITION" and "range_end" in e.value.message
    body, _ = txn_body(rpc_pb2.TxnRequest(compare=[rpc_pb2.Compare(key=b"k", target=rpc_pb2.Compare.LEASE, lease=7)]))
    assert (body.compares[0].target, body.compares[0].number) == (kv_pb2.COMPARE_LEASE, 7)
    many = rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"k%d" % i))
                                       for i in range(129)])
    with pytest.raises(EtcdRequestError, match="too many operations"):
        txn_body(many)


def test_all_keys_prefix_and_single_key() -> None:
    assert range_query(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0")).keys.end == b""
    assert range_query(rpc_pb2.RangeRequest(key=b"a")).keys.single
    q = range_query(rpc_pb2.RangeRequest(key=b"a/", range_end=b"a0"))
    assert (q.keys.start, q.keys.end) == (b"a/", b"a0")
    w = watch_create(rpc_pb2.WatchCreateRequest(key=b"a", range_end=b"\0", filters=[rpc_pb2.WatchCreateRequest.NODELETE]), 7)
    assert (w.key, w.range_end, w.watch_id, list(w.filters)) == (b"a", b"\0", 7, [kv_pb2.WatchCreateRequest.NODELETE])


def _kv(key: bytes, value: bytes, create: int, mod: int, version: int) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=key, value=value, create_revision=create, mod_revision=mod, version=version)


ITEMS = [_kv(b"a", b"3", 10, 50, 2), _kv(b"b", b"1", 20, 20, 1), _kv(b"c", b"2", 30, 40, 3)]


def _reply(**kw: object) -> rpc_pb2.RangeResponse:
    r = rpc_pb2.RangeResponse()
    range_reply(range_query(rpc_pb2.RangeRequest(key=b"a", range_end=b"z", **kw)), ITEMS, r)  # type: ignore[arg-type]
    return r


def test_range_reply_as_etcds_apply() -> None:
    r = _reply(limit=2)
    assert [kv.key for kv in r.kvs] == [b"a", b"b"] and r.more and r.count == 3
    assert [kv.key for kv in _reply(sort_target=rpc_pb2.RangeRequest.MOD).kvs] == [b"b", b"c", b"a"]  # ascending by default
    r = _reply(sort_target=rpc_pb2.RangeRequest.VALUE, sort_order=rpc_pb2.RangeRequest.DESCEND, limit=1)
    assert [kv.key for kv in r.kvs] == [b"a"] and r.more
    r = _reply(min_mod_revision=30, keys_only=True)
    assert [(kv.key, kv.value) for kv in r.kvs] == [(b"a", b""), (b"c", b"")] and r.count == 3  # count before filters
    r = _reply(count_only=True)
    assert r.count == 3 and not r.kvs
    r = _reply(max_create_revision=20, min_create_revision=20)
    assert [kv.key for kv in r.kvs] == [b"b"]


def test_txn_plan_maps_results_back_with_prev_kv() -> None:
    t = rpc_pb2.TxnRequest(
        compare=[rpc_pb2.Compare(key=b"k", target=rpc_pb2.Compare.VALUE, result=rpc_pb2.Compare.EQUAL, value=b"x")],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"k", value=b"y", prev_kv=True)),
                 rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"d")),
                 rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"k", keys_only=True))],
    )
    body, plan = txn_body(t)
    assert [op.WhichOneof("op") for op in body.success] == ["get", "put", "delete", "get"]
    assert body.compares[0].target == kv_pb2.COMPARE_VALUE and body.compares[0].value == b"x"
    res = kv_pb2.TxnResult(succeeded=True, responses=[
        kv_pb2.TxnOpResponse(get=_kv(b"k", b"x", 1, 1, 1)), kv_pb2.TxnOpResponse(put=5),
        kv_pb2.TxnOpResponse(delete=True), kv_pb2.TxnOpResponse(get=_kv(b"k", b"y", 1, 5, 2))])
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, res, rpc_pb2.ResponseHeader(revision=5), out)
    assert out.succeeded and len(out.responses) == 3
    assert out.responses[0].response_put.prev_kv.value == b"x"
    assert out.responses[1].response_delete_range.deleted == 1
    kvs = out.responses[2].response_range.kvs
    assert [(kv.key, kv.value, kv.version) for kv in kvs] == [(b"k", b"", 2)]


def test_cluster_id_and_lease_ids() -> None:
    assert cluster_id_of("kvstore") == cluster_id_of("kvstore") != cluster_id_of("other")
    assert 0 < cluster_id_of("") < 2**64
    rng = random.Random(1)
    for _ in range(50):
        lid = grant_id(0, [1, 2], rng)
        assert leases.home_group(lid) in (1, 2) and 0 < lid < 2**63
    assert grant_id(4096 + 2, [1, 2], rng) == 4098
    for bad in (-1, 4096 * 5, 4096 + 3):
        with pytest.raises(EtcdRequestError):
            grant_id(bad, [1, 2], rng)


def test_a_grant_prefers_a_group_this_node_hosts() -> None:
    rng = random.Random(2)
    assert {leases.home_group(grant_id(0, [1, 2, 3], rng, frozenset({0, 3}))) for _ in range(20)} == {3}


def _items(body: kv_pb2.TxnBody) -> int:
    """kvstore's count of a transaction's compares and operations (`storage/txn.check_txn`)."""
    n = len(body.compares) + len(body.success) + len(body.failure)
    return n + sum(_items(op.txn) for op in (*body.success, *body.failure) if op.WhichOneof("op") == "txn")


def _put(key: bytes, prev_kv: bool = False) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, prev_kv=prev_kv))


def _del(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))


@settings(max_examples=200, deadline=None)
@given(t=_txns(5))
def test_a_converted_txn_keeps_kvstores_limits(t: rpc_pb2.TxnRequest) -> None:
    """Whatever converts fits kvstore's transaction limits (counted in kvstore ops: a prev_kv is
    a get more), so the client gets etcd's error, never kvstore's later refusal."""
    try:
        body, _ = txn_body(t)
    except EtcdRequestError:
        return
    assert _items(body) <= MAX_TXN_ITEMS


def test_txn_limits_are_kvstores_and_count_prev_kv_gets() -> None:
    assert (MAX_TXN_OPS, MAX_DEPTH) == (MAX_TXN_ITEMS, MAX_TXN_DEPTH)
    with pytest.raises(EtcdRequestError, match=r"^etcdserver: too many operations in txn request$"):
        txn_body(rpc_pb2.TxnRequest(success=[_put(b"k%d" % i, prev_kv=True) for i in range(65)]))  # 130 ops
    body, _ = txn_body(rpc_pb2.TxnRequest(success=[_put(b"k%d" % i, prev_kv=True) for i in range(64)]))
    assert _items(body) == MAX_TXN_ITEMS


def test_a_key_written_twice_in_one_branch_is_refused_as_etcd() -> None:
    dup = r"^etcdserver: duplicate key given in txn request$"
    nested = rpc_pb2.TxnRequest(success=[_put(b"a")], failure=[_put(b"a")])
    for bad in ([_put(b"a"), _put(b"a")], [_put(b"a"), _del(b"a")],
                [_put(b"a"), rpc_pb2.RequestOp(request_txn=nested)],
                [_del(b"a"), rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(failure=[_put(b"a")]))]):
        with pytest.raises(EtcdRequestError, match=dup):
            txn_body(rpc_pb2.TxnRequest(success=bad))
        with pytest.raises(EtcdRequestError, match=dup):
            txn_body(rpc_pb2.TxnRequest(failure=bad))
    # deleting twice, one put per branch, and a nested txn's two branches naming one key are etcd's too
    txn_body(rpc_pb2.TxnRequest(success=[_del(b"b"), _del(b"b"), rpc_pb2.RequestOp(request_txn=nested)],
                                failure=[_put(b"a")]))


def test_range_deletes_are_checked_against_puts_in_etcds_order() -> None:
    """etcd's `checkIntervals`: a branch's ranges hold against its own puts and its nested
    transactions' puts; a nested transaction's then and else are apart (a range in one, a put
    of a key in it in the other, is fine); a nested transaction's puts are not checked against
    the ranges of nested transactions after it."""
    dup = r"^etcdserver: duplicate key given in txn request$"
    rng = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"a", range_end=b"z"))

    def txn(success: list[rpc_pb2.RequestOp], failure: list[rpc_pb2.RequestOp] = []) -> rpc_pb2.RequestOp:  # noqa: B006
        return rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(success=success, failure=failure))

    for bad in ([rng, _put(b"b")], [_put(b"b"), rng], [rng, txn([_put(b"b")])], [txn([rng]), _put(b"b")],
                [txn([rng]), txn([], [_put(b"b")])], [txn([rng, _put(b"b")])]):
        with pytest.raises(EtcdRequestError, match=dup):
            txn_body(rpc_pb2.TxnRequest(success=bad))
    for good in ([txn([rng], [_put(b"b")])], [txn([_put(b"b")]), txn([rng])], [rng, _put(b"zz")]):
        txn_body(rpc_pb2.TxnRequest(success=good))


def test_a_range_in_a_txn_applies_its_filters_sort_and_limit() -> None:
    kv = _kv(b"k", b"v", 3, 7, 2)
    cases = [(rpc_pb2.RangeRequest(key=b"k", max_mod_revision=6), 1, []),
             (rpc_pb2.RangeRequest(key=b"k", min_create_revision=4), 1, []),
             (rpc_pb2.RangeRequest(key=b"k", min_mod_revision=7, limit=1, sort_target=rpc_pb2.RangeRequest.MOD,
                                   sort_order=rpc_pb2.RangeRequest.DESCEND), 1, [b"v"]),
             (rpc_pb2.RangeRequest(key=b"k", count_only=True), 1, [])]
    for req, count, values in cases:
        _, plan = txn_body(rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_range=req)]))
        out = rpc_pb2.TxnResponse()
        txn_reply(plan, kv_pb2.TxnResult(succeeded=True, responses=[kv_pb2.TxnOpResponse(get=kv)]),
                  rpc_pb2.ResponseHeader(revision=7), out)
        rr = out.responses[0].response_range
        assert (rr.count, [k.value for k in rr.kvs], rr.more) == (count, values, False), req


def test_a_future_revision_is_told_by_its_class_not_its_message() -> None:
    """kvstore's clock refuses a revision it cannot have yet with `FutureRevision` (a distinct
    flag on the wire), which etcd's API answers with etcd's future-revision error; another
    INVALID_ARGUMENT is never taken for one by its text."""
    import grpc

    from kvstore import errors
    from kvstore.node.hlc import HybridClock
    from kvstore.server.etcd.status import FUTURE_REV, of_kv_error
    from kvstore.storage import mvcc

    clock = HybridClock(lambda: 1_000_000)
    now = clock.propose()
    clock.check_close(now)  # a revision this node issued: fine
    for rev in (mvcc.PROPOSAL_MAX + 1, now + (10_000 << mvcc.PHYSICAL_SHIFT)):
        with pytest.raises(errors.FutureRevision):
            clock.check_close(rev)
    with pytest.raises(errors.InvalidArgument) as neg:
        clock.check_close(-1)
    assert not isinstance(neg.value, errors.FutureRevision)
    back = errors.from_proto(errors.to_proto(errors.FutureRevision("revision 9 is ahead")), is_write=False)
    assert isinstance(back, errors.FutureRevision) and back.message == "revision 9 is ahead"
    assert type(errors.from_proto(errors.to_proto(errors.InvalidArgument("x")), is_write=False)) is errors.InvalidArgument
    st = of_kv_error(back)
    assert (st.code, st.message, st.indeterminate) == (grpc.StatusCode.OUT_OF_RANGE, FUTURE_REV, False)
    st = of_kv_error(errors.InvalidArgument("revision 5 is out of range"))
    assert st.code == grpc.StatusCode.INVALID_ARGUMENT and st.message == "etcdserver: revision 5 is out of range"


def _result_of(body: kv_pb2.TxnBody, succeeded: bool) -> kv_pb2.TxnResult:
    """A kvstore result shaped as `body`'s branch `succeeded` (nested ones succeed)."""
    res = kv_pb2.TxnResult(succeeded=succeeded)
    for op in body.success if succeeded else body.failure:
        which = op.WhichOneof("op")
        if which == "put":
            res.responses.add(put=7)
        elif which == "delete":
            res.responses.add(delete=True)
        elif which == "get":
            res.responses.add(get=_kv(op.get, b"v", 3, 7, 1))
        elif which == "delete_range":
            res.responses.add(delete_range=2)
        else:
            res.responses.add(txn=_result_of(op.txn, True))
    return res


def _range_op(key: bytes, end: bytes = b"", **kw: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key, range_end=end, **kw))  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(t=_txns(3), succeeded=st.booleans())
def test_every_converted_txn_maps_either_branch_back(t: rpc_pb2.TxnRequest, succeeded: bool) -> None:
    try:
        body, plan = txn_body(t)
    except EtcdRequestError:
        return
    res = _result_of(body, succeeded)
    taken = taken_ranges(plan, res)
    assert len(set(taken)) == len(taken) and all(0 <= i < len(plan.ranges) for i in taken)
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, res, rpc_pb2.ResponseHeader(revision=7), out, {i: ([], 0, {}) for i in taken})
    assert out.succeeded == succeeded
    assert len(out.responses) == len(t.success if succeeded else t.failure)
    assert has_writes(body) == any(op.WhichOneof("op") in ("put", "delete", "delete_range") for op in _walk(body))


def _walk(body: kv_pb2.TxnBody) -> list[kv_pb2.TxnOp]:
    out = []
    for op in (*body.success, *body.failure):
        out.append(op)
        if op.WhichOneof("op") == "txn":
            out += _walk(op.txn)
    return out


def test_a_lock_txn_leaves_its_prefix_ranges_to_the_caller() -> None:
    """Mutex.Lock's Txn: If(create(k) = 0) Then(put k with a lease, first key of the prefix by
    create) Else(get k, the same range): the put carries its lease, the one-key get stays in the
    body, each prefix range becomes an external read mapped back on the branch taken."""
    lid = leases.make_id(2, 99)
    first = {"sort_target": rpc_pb2.RangeRequest.CREATE, "sort_order": rpc_pb2.RangeRequest.ASCEND, "limit": 1}
    t = rpc_pb2.TxnRequest(
        compare=[rpc_pb2.Compare(key=b"lk/1", target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL)],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"lk/1", lease=lid)),
                 _range_op(b"lk/", b"lk0", **first)],
        failure=[_range_op(b"lk/1"), _range_op(b"lk/", b"lk0", **first),
                 _range_op(b"lk/1", revision=5)],
    )
    body, plan = txn_body(t)
    assert [op.WhichOneof("op") for op in body.success] == ["put"] and body.success[0].put.lease == lid
    assert [op.WhichOneof("op") for op in body.failure] == ["get"]
    assert [p.external for p in plan.success] == [-1, 0] and [p.external for p in plan.failure] == [-1, 1, 2]
    assert [(q.keys.start, q.keys.end, q.revision) for q in plan.ranges] == [
        (b"lk/", b"lk0", 0), (b"lk/", b"lk0", 0), (b"lk/1", None, 5)]
    assert has_writes(body) and [p.lease for p in leased_puts(body)] == [lid]

    ok = kv_pb2.TxnResult(succeeded=True, responses=[kv_pb2.TxnOpResponse(put=9)])
    assert taken_ranges(plan, ok) == [0]
    holder = [_kv(b"lk/0", b"", 4, 4, 1)]
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, ok, rpc_pb2.ResponseHeader(revision=9), out, {0: (holder, 2, {b"lk/0": lid})})
    rr = out.responses[1].response_range
    assert (rr.count, [(k.key, k.create_revision, k.lease) for k in rr.kvs]) == (2, [(b"lk/0", 4, lid)])
    assert out.responses[1].response_range.header.revision == 9

    ko = kv_pb2.TxnResult(succeeded=False, responses=[kv_pb2.TxnOpResponse(get=_kv(b"lk/1", b"", 6, 6, 1))])
    assert taken_ranges(plan, ko) == [1, 2] and [kv.key for kv in txn_gets(ko)] == [b"lk/1"]
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, ko, rpc_pb2.ResponseHeader(revision=9), out, {1: (holder, 2, {}), 2: ([], 0, {})},
              {b"lk/1": lid})
    assert [r.response_range.kvs[0].lease if r.response_range.kvs else None for r in out.responses] == [lid, 0, None]


def test_puts_with_a_lease_convert_and_ignored_puts_are_planned_to_fill_in() -> None:
    lid = leases.make_id(1, 5)
    body, _ = txn_body(rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(
        request_put=rpc_pb2.PutRequest(key=b"k", value=b"v", lease=lid, prev_kv=True))]))
    assert [op.WhichOneof("op") for op in body.success] == ["get", "put"] and body.success[1].put.checked == 0
    check_put(rpc_pb2.PutRequest(key=b"k", lease=lid, prev_kv=True))
    check_put(rpc_pb2.PutRequest(key=b"k", lease=lid, ignore_value=True))
    check_put(rpc_pb2.PutRequest(key=b"k", ignore_lease=True, ignore_value=True, prev_kv=True))

    def put(key: bytes, **kw: object) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, **kw))  # type: ignore[arg-type]

    t = rpc_pb2.TxnRequest(
        success=[put(b"a", ignore_value=True, prev_kv=True), rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(
            success=[put(b"b", value=b"v", ignore_lease=True)], failure=[put(b"c", value=b"w")]))],
        failure=[put(b"d", ignore_value=True, ignore_lease=True)])
    body, plan = txn_body(t)
    got = [(x.key, p.ignore_value, p.ignore_lease, on) for x, p, on in ignored_puts(plan, body)]
    assert got == [(b"a", True, False, False), (b"b", False, True, False), (b"d", True, True, False)]
    taken = txn.TxnResult(True, (txn.OpResult(txn.OpKind.GET), txn.OpResult(txn.OpKind.PUT),
                                 txn.OpResult(txn.OpKind.TXN, txn=txn.TxnResult(True, (txn.OpResult(txn.OpKind.PUT),)))))
    assert [(x.key, on) for x, _, on in ignored_puts(plan, body, taken)] == [(b"a", True), (b"b", True), (b"d", False)]
    other = txn.TxnResult(True, (txn.OpResult(txn.OpKind.GET), txn.OpResult(txn.OpKind.PUT),
                                 txn.OpResult(txn.OpKind.TXN, txn=txn.TxnResult(False, (txn.OpResult(txn.OpKind.PUT),)))))
    assert [(x.key, on) for x, _, on in ignored_puts(plan, body, other)] == [(b"a", True), (b"b", False), (b"d", False)]
    for x, _, _ in ignored_puts(plan, body):  # the messages themselves: filled in place
        x.value, x.lease = b"kept", lid
    assert (body.success[1].put.value, body.success[2].txn.success[0].put.lease) == (b"kept", lid)
    assert body.failure[0].put.value == b"kept"


def test_reads_outside_leave_every_read_to_the_caller() -> None:
    t = rpc_pb2.TxnRequest(
        compare=[rpc_pb2.Compare(key=b"a", target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.EQUAL)],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"a", prev_kv=True)), _range_op(b"b")],
        failure=[rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(success=[_range_op(b"c")]))])
    body, plan = txn_body(t, reads_outside=lambda k: True)
    assert [op.WhichOneof("op") for op in body.success] == ["get", "put"]  # prev_kv's get stays: a written key
    assert [q.keys.start for q in plan.ranges] == [b"b", b"c"]
    res = _result_of(body, False)
    assert taken_ranges(plan, res) == [1]
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, res, rpc_pb2.ResponseHeader(revision=3), out, {1: ([_kv(b"c", b"x", 2, 2, 1)], 1, {})})
    assert out.responses[0].response_txn.responses[0].response_range.kvs[0].value == b"x"


def _t_rng(key: bytes, end: bytes = b"", revision: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key, range_end=end, revision=revision))


def _t_put(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"v"))


def _t_del(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))


def _t_nested(success: list[rpc_pb2.RequestOp], failure: list[rpc_pb2.RequestOp] | None = None) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(success=success, failure=failure or []))


@pytest.mark.parametrize("success", [
    [_t_rng(b"p/", b"p0"), _t_put(b"p/x")],                    # a range, then a put into it
    [_t_rng(b"p/", b"p0"), _t_del(b"p/x")],                    # ... a delete in it
    [_t_rng(b"p/", b"p0"), _t_nested([_t_put(b"p/x")])],         # ... a nested put in it
    [_t_nested([], [_t_rng(b"p/", b"\x00")]), _t_put(b"p/x")],   # a nested (else) range, then a put in it
    [_t_rng(b"p/x"), _t_put(b"p/x")],                          # an external one-key read (reads_outside), then its put
])
def test_a_write_after_an_external_read_of_its_key_is_sequential(success: list[rpc_pb2.RequestOp]) -> None:
    """An external read at the transaction's revision would show the writes after it, where
    etcd's sees only the writes before it (`storeTxnWrite.Range`): such a Txn is planned
    `sequential` (the caller reads each range at its place: kvstore's Txn with scans)."""
    _, plan = txn_body(rpc_pb2.TxnRequest(success=success), reads_outside=lambda k: True)
    assert plan.sequential


def test_a_range_delete_after_a_range_read_is_sequential() -> None:
    """etcd's "get --prefix then del --prefix" in one Txn."""
    dr = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"p/", range_end=b"p0"))
    body, plan = txn_body(rpc_pb2.TxnRequest(success=[_t_rng(b"p/", b"p0"), dr]))
    assert plan.sequential and [op.WhichOneof("op") for op in body.success] == ["delete_range"]
    body, plan = txn_body(rpc_pb2.TxnRequest(success=[_t_rng(b"q/", b"q0"), dr]))  # another range
    assert not plan.sequential


@settings(max_examples=200, deadline=None)
@given(t=_txns(3), succeeded=st.booleans())
def test_with_scans_puts_each_external_range_in_its_place(t: rpc_pb2.TxnRequest, succeeded: bool) -> None:
    """`with_scans` turns each external range into a scan in its place (`txnscan.split` takes
    them out again, leaving the body); `scan_answers` takes a result of that Txn apart into the
    body's result (as `txn_reply` maps it) and the scans' answers, by external index."""
    try:
        body, plan = txn_body(t)
    except EtcdRequestError:
        return
    if any(q.revision for q in plan.ranges):
        return
    splan = _scans_round_trip(plan, body, succeeded)[0]
    for q, r in zip(plan.ranges, splan.scans, strict=True):
        assert r.start == q.keys.start and r.limit == 0 and all(
            q.keys.holds(k) == r.holds(k) for k in (q.keys.start, q.keys.start + b"\x00", b"\xff" * 3))


def _scans_round_trip(plan: Any, body: kv_pb2.TxnBody, succeeded: bool) -> tuple[Any, kv_pb2.TxnResult, list[int]]:
    """`with_scans`, then `split` back to `body`; a result of the taken branch merged with an
    answer per taken scan comes apart (`scan_answers`) into that result and those answers.
    Returns (the scans' plan, the body's result, the taken ranges)."""
    from kvstore.txnscan import merge, split, taken_scans

    stripped, splan = split(with_scans(plan, body), 1 << 16)
    assert stripped == body and len(splan.scans) == len(plan.ranges)
    res = _result_of(body, succeeded)
    taken = taken_ranges(plan, res)
    assert taken == taken_scans(splan, res)
    answers = {i: kv_pb2.TxnScanResult(revision=i + 1) for i in taken}
    back, got = scan_answers(plan, merge(splan, res, answers))
    assert back == res and got == answers
    return splan, back, taken


_responses = st.lists(st.sampled_from([kv_pb2.TxnOpResponse(put=1), kv_pb2.TxnOpResponse(delete=True),
                                       kv_pb2.TxnOpResponse(get=kv_pb2.KeyValue(key=b"k")),
                                       kv_pb2.TxnOpResponse(delete_range=2),
                                       kv_pb2.TxnOpResponse(scan=kv_pb2.TxnScanResult(revision=3)),
                                       kv_pb2.TxnOpResponse(txn=kv_pb2.TxnResult(succeeded=True))]), max_size=6)


@settings(max_examples=200, deadline=None)
@given(t=_txns(3), succeeded=st.booleans(), responses=_responses)
def test_scan_answers_of_any_result_is_total(t: rpc_pb2.TxnRequest, succeeded: bool,
                                             responses: list[kv_pb2.TxnOpResponse]) -> None:
    """A result that does not fit the plan: ValueError, never another exception."""
    try:
        _, plan = txn_body(t)
    except EtcdRequestError:
        return
    with contextlib.suppress(ValueError):
        scan_answers(plan, kv_pb2.TxnResult(succeeded=succeeded, responses=responses))


@pytest.mark.parametrize("success, failure", [
    ([_t_put(b"p/x"), _t_rng(b"p/", b"p0")], []),              # the Mutex's shape: the put, then the range
    ([_t_rng(b"p/", b"p0"), _t_put(b"q/x")], []),              # a put outside the range
    ([_t_rng(b"p/", b"p0", revision=5), _t_put(b"p/x")], []),  # a read at a revision of its own
    ([_t_rng(b"p/", b"p0")], [_t_put(b"p/x")]),                # the other branch writes
    ([_t_rng(b"p/x"), _t_put(b"p/x")], []),                    # a one-key read of the written group: a get in the TXN
])
def test_reads_that_see_what_etcd_sees_are_accepted(success: list[rpc_pb2.RequestOp],
                                                     failure: list[rpc_pb2.RequestOp]) -> None:
    body, plan = txn_body(rpc_pb2.TxnRequest(success=success, failure=failure), reads_outside=lambda k: False)
    assert not plan.sequential
    assert [op.put.key for op in (*body.success, *body.failure) if op.WhichOneof("op") == "put"] in ([b"p/x"], [b"q/x"])
    assert all(not q.keys.single or q.revision for q in plan.ranges)  # one-key reads went into the TXN


def test_one_key_reads_after_an_external_range_keep_their_leases() -> None:
    """A one-key read after an external range in the same branch reports its own lease (the
    range's answer must not shadow the map of the one-key reads' leases)."""
    body, plan = txn_body(rpc_pb2.TxnRequest(success=[_t_rng(b"a", b"c"), _t_rng(b"x")]))
    assert [op.WhichOneof("op") for op in body.success] == ["get"] and len(plan.ranges) == 1
    x = kv_pb2.KeyValue(key=b"x", value=b"1", create_revision=2, mod_revision=2, version=1)
    res = kv_pb2.TxnResult(succeeded=True, responses=[kv_pb2.TxnOpResponse(get=x)])
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, res, rpc_pb2.ResponseHeader(revision=3), out, {0: ([], 0, {})}, {b"x": 77})
    assert out.responses[1].response_range.kvs[0].lease == 77


def _t_drange(key: bytes, end: bytes, prev_kv: bool = True) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=end, prev_kv=prev_kv))


def test_a_nested_range_delete_with_prev_kv_reads_its_range_in_its_place() -> None:
    """A nested plan's range deletes index the top-level plan's `ranges` (issue 18: IndexError)."""
    from kvstore.txnscan import merge, split

    t = rpc_pb2.TxnRequest(success=[_t_nested([_t_nested([_t_drange(b"a", b"b")])], [_t_drange(b"c", b"d")])])
    body, plan = txn_body(t)
    full = with_scans(plan, body)
    inner = full.success[0].txn.success[0].txn.success
    assert [op.WhichOneof("op") for op in inner] == ["scan", "delete_range"]
    assert (inner[0].scan.start, inner[0].scan.end) == (b"a", b"b")
    assert (full.success[0].txn.failure[0].scan.start, full.success[0].txn.failure[0].scan.end) == (b"c", b"d")
    stripped, splan = split(full, 1 << 16)
    assert stripped == body
    res = _result_of(body, True)
    answers = {0: kv_pb2.TxnScanResult(items=[_kv(b"a1", b"x", 2, 2, 1)], revision=5)}
    back, got = scan_answers(plan, merge(splan, res, answers))
    assert back == res and got == answers
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, back, rpc_pb2.ResponseHeader(revision=5), out, {0: ([_kv(b"a1", b"x", 2, 2, 1)], 1, {})})
    dr = out.responses[0].response_txn.responses[0].response_txn.responses[0].response_delete_range
    assert [kv.key for kv in dr.prev_kvs] == [b"a1"]


_NARROW = st.sampled_from([b"a", b"b", b"c", b"d", b"\x00"])


def _narrow_ops(depth: int) -> st.SearchStrategy[rpc_pb2.RequestOp]:
    leaf = st.one_of(
        st.builds(rpc_pb2.RequestOp, request_range=st.builds(rpc_pb2.RangeRequest, key=_NARROW,
                                                             range_end=st.sampled_from([b"", b"c", b"\x00"]))),
        st.builds(rpc_pb2.RequestOp, request_put=st.builds(rpc_pb2.PutRequest, key=_NARROW, prev_kv=st.booleans())),
        st.builds(rpc_pb2.RequestOp, request_delete_range=st.builds(
            rpc_pb2.DeleteRangeRequest, key=_NARROW, range_end=st.sampled_from([b"", b"c", b"e", b"\x00"]),
            prev_kv=st.booleans())),
    )
    if depth == 0:
        return leaf
    return st.one_of(leaf, st.builds(rpc_pb2.RequestOp, request_txn=_narrow_txns(depth - 1)))


def _narrow_txns(depth: int) -> st.SearchStrategy[rpc_pb2.TxnRequest]:
    return st.builds(rpc_pb2.TxnRequest, success=st.lists(_narrow_ops(depth), max_size=3),
                     failure=st.lists(_narrow_ops(depth), max_size=3))


@settings(max_examples=300, deadline=None)
@given(t=_narrow_txns(3), succeeded=st.booleans())
def test_with_scans_of_nested_range_deletes_and_ranges_is_total(t: rpc_pb2.TxnRequest, succeeded: bool) -> None:
    """Over nested Txns of few keys (so range deletes with prev_kv and ranges nest often):
    `txn_body` refuses only with `EtcdRequestError`; what converts goes through `with_scans`,
    `split`, `merge` and `scan_answers` back to its result and answers (no IndexError / KeyError)."""
    try:
        body, plan = txn_body(t)
    except EtcdRequestError:
        return
    _, back, taken = _scans_round_trip(plan, body, succeeded)
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, back, rpc_pb2.ResponseHeader(revision=7), out, {i: ([], 0, {}) for i in taken})
    assert len(out.responses) == len(t.success if succeeded else t.failure)
