"""The pure parts of reading a transaction's scans at other nodes: `remote_reads.PartReader` (a
remote KV.Scan reply, hostile input, checked: a part or one refusal), the cut (`txn_reading.cut_of`,
at least revision 1 for KV.Txn and etcd's Txn alike), and the audit line of a transaction that
only scans."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.server.audit_rpc import _txn_fields
from kvstore.server.etcd.convert import RangeQuery, range_query
from kvstore.server.etcd.kv import EtcdKV, _EtcdReading
from kvstore.server.remote_reads import NotServed, PartReader
from kvstore.server.txn_reading import cut_of
from kvstore.shard.ranges import HASH_MAX
from kvstore.v1 import kv_pb2

FULL = {"owned_lo": [0], "owned_hi": [HASH_MAX]}


def _read(request: kv_pb2.ScanRequest, msgs: list[kv_pb2.ScanResponse], budget: int = 1 << 20) -> Any:
    r = PartReader(request, budget)
    for m in msgs:
        if r.add(m):
            break
    return r.part()


def test_a_part_in_several_messages_is_read_whole_and_cut_by_the_budget() -> None:
    req = kv_pb2.ScanRequest(start=b"a", end=b"z", group=3, revision=7)
    kvs = [kv_pb2.KeyValue(key=b"k%d" % i, value=b"v", mod_revision=5) for i in range(6)]
    msgs = [kv_pb2.ScanResponse(revision=7, more=True, items=kvs[:3], **FULL),  # type: ignore[arg-type]
            kv_pb2.ScanResponse(more=False, items=kvs[3:])]
    p = _read(req, msgs)
    assert (p.revision, p.owned.is_full(), [kv.key for kv in p.items], p.cut) == (7, True, [kv.key for kv in kvs], False)
    p = _read(req, msgs, budget=2 * kvs[0].ByteSize())  # past the budget at the third item: it stops there
    assert [kv.key for kv in p.items] == [b"k0", b"k1", b"k2"] and p.cut


@pytest.mark.parametrize(("msgs", "why"), [
    ([], "ended early"),
    ([kv_pb2.ScanResponse(revision=7, more=True, **FULL)], "ended early"),  # type: ignore[arg-type]
    ([kv_pb2.ScanResponse(revision=6, **FULL)], "revision 6, not 7"),  # type: ignore[arg-type]
    ([kv_pb2.ScanResponse(revision=7, owned_lo=[5], owned_hi=[4])], "malformed"),
    ([kv_pb2.ScanResponse(revision=7, owned_lo=[5], owned_hi=[])], "malformed"),
    ([kv_pb2.ScanResponse(revision=7, items=[kv_pb2.KeyValue(key=b"zz")], **FULL)], "out of the range"),  # type: ignore[arg-type]
    ([kv_pb2.ScanResponse(revision=7, items=[kv_pb2.KeyValue(key=b"b"), kv_pb2.KeyValue(key=b"b")],
                          **FULL)], "out of order"),  # type: ignore[arg-type]
    ([kv_pb2.ScanResponse(error=kv_pb2.Error(code=kv_pb2.WRONG_SHARD))], "WRONG_SHARD"),
    ([kv_pb2.ScanResponse(error=kv_pb2.Error(code=kv_pb2.STALE_REPLICA))], "STALE_REPLICA"),
])
def test_a_node_that_did_not_serve_the_part_is_named_so(msgs: list[kv_pb2.ScanResponse], why: str) -> None:
    with pytest.raises(NotServed, match=why):
        _read(kv_pb2.ScanRequest(start=b"a", end=b"z", group=3, revision=7), msgs)


def test_the_nodes_own_refusal_is_the_reads_definite_error() -> None:
    msgs = [kv_pb2.ScanResponse(error=kv_pb2.Error(code=kv_pb2.PERMISSION_DENIED, message="no", indeterminate=True))]
    with pytest.raises(errors.PermissionDenied) as e:
        _read(kv_pb2.ScanRequest(group=3, revision=7), msgs)
    assert e.value.definite


_items = st.lists(st.builds(kv_pb2.KeyValue, key=st.binary(max_size=4), value=st.binary(max_size=4)), max_size=4)
_owned = st.sampled_from([([0], [HASH_MAX]), ([], []), ([0, 10], [5, HASH_MAX])]) | st.tuples(
    st.lists(st.integers(0, 2**64 - 1), max_size=3), st.lists(st.integers(0, 2**64 - 1), max_size=3))
_msgs = st.lists(st.builds(
    lambda owned, **kw: kv_pb2.ScanResponse(owned_lo=owned[0], owned_hi=owned[1], **kw), _owned,
    revision=st.sampled_from([0, 7]) | st.integers(-(2**63), 2**63 - 1), more=st.booleans(), items=_items,
    error=st.just(kv_pb2.Error()) | st.builds(kv_pb2.Error, code=st.integers(0, 40))), max_size=4)


@settings(max_examples=300, deadline=None)
@given(msgs=_msgs, start=st.binary(max_size=2), end=st.binary(max_size=2), revision=st.sampled_from([0, 7]),
       budget=st.integers(0, 64))
def test_any_reply_is_a_checked_part_or_one_refusal(msgs: list[kv_pb2.ScanResponse], start: bytes, end: bytes,
                                                    revision: int, budget: int) -> None:
    req = kv_pb2.ScanRequest(start=start, end=end, group=1, revision=revision)
    try:
        p = _read(req, msgs, budget)
    except (NotServed, errors.KVError) as e:
        assert not isinstance(e, errors.KVError) or e.definite
        return
    keys = [kv.key for kv in p.items]
    assert keys == sorted(set(keys)) and all(start <= k and (not end or k < end) for k in keys)
    assert p.revision >= 0 and (not revision or p.revision == revision)
    assert all(0 <= lo <= hi <= HASH_MAX for lo, hi in p.owned)


def test_a_cut_is_at_least_revision_one() -> None:
    assert (cut_of([]), cut_of([0, 0]), cut_of([0, 9, 4])) == (1, 1, 9)


class _NothingWritten:
    """etcd's KV where no data group has written: a range is served at revision 0."""

    async def _scan(self, q: RangeQuery, context: Any) -> tuple[list[kv_pb2.KeyValue], int, int]:
        return [], 0, 0


def test_etcds_txn_with_ranges_cuts_an_empty_store_at_revision_one() -> None:
    q = range_query(rpc_pb2.RangeRequest(key=b"a", range_end=b"a\x00", count_only=True))
    reading = _EtcdReading(cast(EtcdKV, _NothingWritten()), q, None, None)
    assert asyncio.run(reading.cut()) == 1  # a read at 0 would be of the current state, not at a revision


def _txn(*ops: kv_pb2.TxnOp, failure: tuple[kv_pb2.TxnOp, ...] = ()) -> kv_pb2.TxnRequest:
    return kv_pb2.TxnRequest(txn=kv_pb2.TxnBody(success=list(ops), failure=list(failure)))


def test_the_audit_line_of_a_txn_names_a_scans_start_when_no_other_key() -> None:
    scan = kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"p/"))
    assert _txn_fields(_txn(scan))["key"] == "p/"
    assert _txn_fields(_txn(kv_pb2.TxnOp(scan=kv_pb2.TxnScan(start=b"s", end=b"t"))))["key"] == "s"
    assert _txn_fields(_txn(scan, failure=(kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"k")),)))["key"] == "k"
    assert "key" not in _txn_fields(_txn(kv_pb2.TxnOp(scan=kv_pb2.TxnScan())))
