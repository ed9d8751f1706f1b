"""Scans inside transactions, the pure parts: `kvstore.txnscan` (a write after a scan of its
key is not refused; split / taken_scans / merge;
totality on hostile bodies), `scan_parts.combine` (a scan's answer from its group parts: the
key-order prefix of the whole range within the limit and budget) and `txn_reading.run_reading`
(where a reading transaction lands) over a small multi-version store."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.client.checks import RequestChecks
from kvstore.client.txns import first_key, txn_body
from kvstore.client.types import Compare, Op, TxnResponse
from kvstore.server.scan_parts import Part, combine
from kvstore.server.txn_reading import Exhausted, NoLeaseReader, evaluate_at, leased, run_reading, unchecked
from kvstore.server.txn_wire import txn_from_proto
from kvstore.shard.ranges import IntervalSet
from kvstore.storage import txn
from kvstore.txnscan import MAX_TXN_SCAN_PARTS, ScanRange, merge, outside, split, taken_scans
from kvstore.v1 import kv_pb2

MAX_KEY = 64
KEYS = [b"a", b"b", b"c", b"d"]


# --- split ----------------------------------------------------------------------------------
def _scan_op(lo: int, hi: int) -> kv_pb2.TxnOp:
    return kv_pb2.TxnOp(scan=kv_pb2.TxnScan(start=KEYS[lo], end=b"" if hi >= len(KEYS) else KEYS[hi]))


def _op(depth: int) -> st.SearchStrategy[kv_pb2.TxnOp]:
    key = st.sampled_from(KEYS)
    leaves = st.one_of(
        key.map(lambda k: kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=k, value=b"v"))),
        key.map(lambda k: kv_pb2.TxnOp(delete=k)),
        key.map(lambda k: kv_pb2.TxnOp(get=k)),
        st.tuples(st.integers(0, 3), st.integers(1, 4)).filter(lambda t: t[0] < t[1]).map(lambda t: _scan_op(*t)),
    )
    if depth >= 3:
        return leaves
    nested = st.builds(lambda s, f: kv_pb2.TxnOp(txn=kv_pb2.TxnBody(success=s, failure=f)),
                       st.lists(_op(depth + 1), max_size=3), st.lists(_op(depth + 1), max_size=3))
    return st.one_of(leaves, nested)


bodies = st.builds(lambda s, f: kv_pb2.TxnBody(success=s, failure=f),
                   st.lists(_op(1), max_size=4), st.lists(_op(1), max_size=4))


@settings(max_examples=100, deadline=None)
@given(bodies)
def test_split_refuses_no_write_after_a_scan(body: kv_pb2.TxnBody) -> None:
    """Each scan shows the state at its place on the path (`kvstore.txnpath`): a write after a
    scan into its range is served, never refused; the stripped body keeps every other operation."""
    stripped, plan = split(body, MAX_KEY)

    def count(b: kv_pb2.TxnBody, kind: str) -> int:
        ops = [*b.success, *b.failure]
        return sum(op.WhichOneof("op") == kind for op in ops) + sum(count(op.txn, kind) for op in ops
                                                                      if op.WhichOneof("op") == "txn")

    assert count(stripped, "scan") == 0 and len(plan.scans) == count(body, "scan")
    for kind in ("put", "delete", "get"):
        assert count(stripped, kind) == count(body, kind)


@settings(max_examples=100, deadline=None)
@given(bodies, st.data())
def test_split_taken_and_merge_put_every_scan_back_in_place(body: kv_pb2.TxnBody, data: st.DataObject) -> None:
    try:
        stripped, plan = split(body, MAX_KEY)
    except errors.InvalidArgument:
        return
    assert "scan" not in str(stripped)
    # a result of the stripped body along random branches: each op answered by its kind
    def result(b: kv_pb2.TxnBody) -> kv_pb2.TxnResult:
        ok = data.draw(st.booleans())
        r = kv_pb2.TxnResult(succeeded=ok)
        for op in b.success if ok else b.failure:
            which = op.WhichOneof("op")
            if which == "txn":
                r.responses.add().txn.CopyFrom(result(op.txn))
            elif which == "put":
                r.responses.add().put = 7
            elif which == "delete":
                r.responses.add().delete = True
            else:
                r.responses.add().get.SetInParent()
        return r

    res = result(stripped)
    taken = taken_scans(plan, res)
    answers = {i: kv_pb2.TxnScanResult(revision=i + 1) for i in taken}
    merged = merge(plan, res, answers)

    def walk(b: kv_pb2.TxnBody, m: kv_pb2.TxnResult, seen: list[int]) -> None:
        ops = b.success if m.succeeded else b.failure
        assert len(ops) == len(m.responses)
        for op, r in zip(ops, m.responses, strict=True):
            which = op.WhichOneof("op")
            assert r.WhichOneof("op") == which
            if which == "scan":
                seen.append(r.scan.revision - 1)
            elif which == "txn":
                walk(op.txn, r.txn, seen)

    seen: list[int] = []
    walk(body, merged, seen)
    assert seen == taken


@settings(max_examples=100, deadline=None)
@given(st.recursive(
    st.builds(kv_pb2.TxnOp, scan=st.builds(kv_pb2.TxnScan, start=st.binary(max_size=70), end=st.binary(max_size=70),
                                            prefix=st.binary(max_size=70), limit=st.integers(0, 2**64 - 1)))
    | st.builds(kv_pb2.TxnOp, put=st.builds(kv_pb2.TxnPut, key=st.binary(max_size=4)))
    | st.builds(kv_pb2.TxnOp, delete=st.binary(max_size=4)) | st.just(kv_pb2.TxnOp()),
    lambda ops: st.builds(lambda s, f: kv_pb2.TxnOp(txn=kv_pb2.TxnBody(success=s, failure=f)),
                          st.lists(ops, max_size=3), st.lists(ops, max_size=3)),
    max_leaves=40),
    st.lists(st.builds(kv_pb2.Compare, key=st.binary(max_size=4), target=st.integers(0, 7),
                       result=st.integers(0, 5), number=st.integers(-(2**63), 2**63 - 1)), max_size=3))
def test_split_is_total(op: kv_pb2.TxnOp, compares: list[kv_pb2.Compare]) -> None:
    """Hostile bodies: split answers or raises a definite InvalidArgument / KeyTooLarge."""
    body = kv_pb2.TxnBody(compares=compares, success=[op] * 3)
    try:
        split(body, MAX_KEY)
    except (errors.InvalidArgument, errors.KeyTooLarge) as err:
        assert err.definite


def test_scan_fields_are_checked() -> None:
    def one(**kw: object) -> kv_pb2.TxnBody:
        return kv_pb2.TxnBody(success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(**kw))])  # type: ignore[arg-type]

    _, plan = split(one(prefix=b"p\xff", start=b"z", end=b"a"), MAX_KEY)  # the prefix overrides both
    assert plan.scans == [ScanRange(b"p\xff", b"q", 0)]
    assert split(one(prefix=b"\xff\xff"), MAX_KEY)[1].scans == [ScanRange(b"\xff\xff", None, 0)]
    assert split(one(start=b"k", limit=5), MAX_KEY)[1].scans == [ScanRange(b"k", None, 5)]
    with pytest.raises(errors.KeyTooLarge):
        split(one(start=b"x" * (MAX_KEY + 1)), MAX_KEY)
    with pytest.raises(errors.InvalidArgument, match="not after its start"):
        split(one(start=b"b", end=b"a"), MAX_KEY)
    with pytest.raises(errors.InvalidArgument, match="limit"):
        split(one(limit=2**63), MAX_KEY)
    too_many = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan())] * (txn.MAX_TXN_ITEMS + 1))
    with pytest.raises(errors.InvalidArgument, match="more than"):
        split(too_many, MAX_KEY)


def _lease_cmp(lease: int = 7) -> kv_pb2.Compare:
    return kv_pb2.Compare(key=b"k", target=kv_pb2.COMPARE_LEASE, result=kv_pb2.EQUAL, number=lease)


def test_a_lease_compare_with_scans_is_kept_at_any_depth() -> None:
    """Issue 17: a transaction with scans may compare a key's lease, wherever the compare or the
    scan is: `split` (server and client) keeps the compare in the stripped body, as any other."""
    scan = kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"k"))
    nested_cmp = kv_pb2.TxnOp(txn=kv_pb2.TxnBody(compares=[_lease_cmp()], success=[kv_pb2.TxnOp(get=b"k")]))
    nested_scan = kv_pb2.TxnOp(txn=kv_pb2.TxnBody(failure=[scan]))
    for body in (kv_pb2.TxnBody(compares=[_lease_cmp()], success=[scan]),
                 kv_pb2.TxnBody(compares=[_lease_cmp()], failure=[nested_scan]),
                 kv_pb2.TxnBody(success=[scan], failure=[nested_cmp]),
                 kv_pb2.TxnBody(success=[nested_scan, nested_cmp])):
        stripped, plan = split(body, MAX_KEY)
        assert plan.scans and txn.compares_lease(txn_from_proto(stripped, unchecked, unchecked))
    checks = RequestChecks(timeout=5.0)
    b = txn_body(checks, [Compare.lease(b"k", "=", 7)], [Op.scan(prefix=b"k")], [])
    assert b.compares[0].target == kv_pb2.COMPARE_LEASE and b.compares[0].number == 7


def test_client_side_scan_ops() -> None:
    checks = RequestChecks(timeout=5.0)
    b = txn_body(checks, [], [Op.put(b"k", b"v"), Op.scan(prefix=b"k")], [])
    assert b.success[1].scan == kv_pb2.TxnScan(prefix=b"k")
    b = txn_body(checks, [Compare.version(b"k", ">", 0)], [Op.scan(b"a", b"z"), Op.delete(b"k")], [])
    assert b.success[1].delete == b"k"  # a write after a scan into its range: served (sequential)
    with pytest.raises(errors.InvalidArgument, match="limit"):
        txn_body(checks, [], [Op.scan(b"a", limit=-1)], [])
    # a transaction that names no key is routed by its first scan
    assert first_key(txn_body(checks, [], [Op.txn([], [Op.scan(prefix=b"p/")])], [])) == b"p/"
    assert first_key(txn_body(checks, [], [Op.scan()], [])) == b"\x00"
    r = kv_pb2.TxnResult(succeeded=True)
    s = r.responses.add().scan
    s.items.add(key=b"k", value=b"v", mod_revision=3)
    s.more, s.revision = True, 9
    got = TxnResponse.from_proto(r, 0).responses[0]
    assert got.kind == "scan" and got.more and got.revision == 9
    assert [(kv.key, kv.value, kv.mod_revision) for kv in got.items] == [(b"k", b"v", 3)]


# --- a scan's answer from its parts ----------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sets(st.binary(min_size=1, max_size=3), max_size=12), min_size=1, max_size=3),
       st.integers(0, 6), st.integers(0, 200))
def test_combine_is_the_key_order_prefix_within_limit_and_budget(groups: list[set[bytes]], limit: int,
                                                                  budget: int) -> None:
    """Each part reads as `TxnLocalReading.part` does (its keys in order until the budget is
    passed or limit + 1 are read); the answer is exactly the first keys of the whole range that
    fit, and `more` says whether any key is left out."""
    everything = sorted(k for g in groups for k in g)
    parts = []
    for g in groups:
        items, size, cut = [], 0, False
        for k in sorted(g):
            kv = kv_pb2.KeyValue(key=k, value=b"v")
            items.append(kv)
            size += kv.ByteSize()
            if size > budget:
                cut = True
                break
            if limit and len(items) > limit:
                cut = True
                break
        parts.append(Part(0, IntervalSet(), items, cut))
    kept, more, used = combine(parts, limit, budget)
    keys = [kv.key for kv in kept]
    assert keys == everything[: len(keys)]
    assert used == sum(kv.ByteSize() for kv in kept) <= budget
    assert not limit or len(keys) <= limit
    assert more == (len(keys) < len(everything))
    if more and len(keys) < (limit or len(everything)):  # cut by the budget: the next key would not fit
        nxt = kv_pb2.KeyValue(key=everything[len(keys)], value=b"v").ByteSize()
        assert used + nxt > budget


def test_a_part_that_stopped_before_any_item_leaves_the_answer_empty() -> None:
    """It read nothing: any key of the range may be in it, so no other part's key may be shown."""
    kv = kv_pb2.KeyValue(key=b"a", value=b"v")
    assert combine([Part(0, IntervalSet(), [kv], False), Part(0, IntervalSet(), [], True)], 0, 100) == ([], True, 0)


# --- where a reading transaction lands -------------------------------------------------------
class _Store:
    """A tiny multi-version store: key -> [(revision, value | None)], revisions from one counter."""

    def __init__(self) -> None:
        self.rev = itertools.count(10, 10)
        self.history: dict[bytes, list[tuple[int, bytes | None]]] = {}
        self.last = 0

    def write(self, key: bytes, value: bytes | None, floor: int = 0) -> int:
        rev = next(self.rev)
        while rev <= floor:
            rev = next(self.rev)
        self.history.setdefault(key, []).append((rev, value))
        self.last = rev
        return rev

    def at(self, key: bytes, revision: int) -> txn.Current | None:
        vs = [(r, v) for r, v in self.history.get(key, []) if r <= revision]
        if not vs or vs[-1][1] is None:
            return None
        return txn.Current(vs[-1][1] or b"", vs[0][0], vs[-1][0], len(vs))


class _IO:
    """`ReadingIO` over `_Store`, with a hook that lets another writer run before each cut."""

    def __init__(self, store: _Store, before_cut: list[tuple[bytes, bytes]]) -> None:
        self.s = store
        self.before_cut = before_cut
        self.writes = 0

    async def cut(self) -> int:
        if self.before_cut:
            self.s.write(*self.before_cut.pop(0))
        return self.s.last

    async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
        self.writes += 1
        res = await evaluate_at(body, self.s.last, self.get_at)
        if res is not None:
            return res, 0
        t = kv_pb2.TxnResult(succeeded=True)
        rev = 0
        for op in body.success:
            rev = self.s.write(op.put.key, op.put.value, floor)
            t.responses.add().put = rev
        return t, rev

    async def get_at(self, key: bytes, revision: int) -> txn.Current | None:
        return self.s.at(key, revision)

    async def current(self, key: bytes) -> txn.Current | None:
        return self.s.at(key, self.s.last)  # no key is attached to a lease here

    def can_write(self) -> bool:
        return True


def test_run_reading_lands_at_the_write_or_at_a_cut() -> None:
    s = _Store()
    s.write(b"k", b"0")
    body = kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=b"k", target=kv_pb2.COMPARE_VALUE, result=kv_pb2.EQUAL,
                                                   value=b"0")],
                          success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"k", value=b"1"))],
                          failure=[kv_pb2.TxnOp(get=b"k")])
    io = _IO(s, [])
    landed = asyncio.run(run_reading(body, io))
    assert landed.wrote and landed.revision == s.last and landed.result.succeeded
    # now the compare fails: no write, evaluated read-only at a cut (the get sees "1")
    landed = asyncio.run(run_reading(body, io))
    assert not landed.wrote and landed.revision == s.last and not landed.result.succeeded
    assert landed.result.responses[0].get.value == b"1"
    # a writer flips the key back between the write (nothing written) and the cut, every time:
    # each evaluation would write, so it starts again, and gives up (nothing written)

    class Flipping(_IO):
        async def cut(self) -> int:
            s.write(b"k", b"0")  # after the write saw "1": the evaluation at the cut would write
            return s.last

        async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
            s.write(b"k", b"1")
            return await super().write(body, floor)

    with pytest.raises(Exhausted):
        asyncio.run(run_reading(body, Flipping(s, []), tries=3))
    # read-only bodies never write
    ro = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(get=b"k")])
    io = _IO(s, [])
    landed = asyncio.run(run_reading(ro, io))
    assert io.writes == 0 and not landed.wrote and landed.revision == s.last


def test_a_read_only_evaluation_with_a_range_delete_reads_each_ranges_first_key() -> None:
    """`evaluate_at` of a body with range deletes (a branch taken that deleted nothing): an empty
    range on the path deletes nothing (count 0, the result stands); one holding a key would
    write (None: start again); without `first_at` it is a bug (NoScanner)."""
    s = _Store()
    s.write(b"k/1", b"x")
    at = s.last
    dr = kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(start=b"e/", end=b"e0"))
    body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(get=b"k/1"), dr])

    async def get_at(key: bytes, revision: int) -> txn.Current | None:
        return s.at(key, revision)

    async def first_at(lo: bytes, hi: bytes, revision: int) -> bytes | None:
        keys = sorted(k for k in s.history if s.at(k, revision) is not None and txn.in_range(k, lo, hi))
        return keys[0] if keys else None

    res = asyncio.run(evaluate_at(body, at, get_at, first_at))
    assert res is not None and res.succeeded and res.responses[1].delete_range == 0
    assert res.responses[0].get.value == b"x"
    s.write(b"e/1", b"y")
    assert asyncio.run(evaluate_at(body, s.last, get_at, first_at)) is None
    assert asyncio.run(evaluate_at(body, at, get_at, first_at)) is not None  # at the earlier revision: empty
    with pytest.raises(txn.NoScanner):
        asyncio.run(evaluate_at(body, at, get_at))


def _drange(start: bytes, end: bytes) -> kv_pb2.TxnOp:
    return kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(start=start, end=end))


def _scan(prefix: bytes) -> kv_pb2.TxnOp:
    return kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=prefix))


def test_scans_split_by_range_deletes_into_too_many_reads_are_refused() -> None:
    """Issue 18: 64 disjoint range deletes, then 63 scans over them, would read each scan as
    its 65 gaps across every data group (about 4,000 reads): refused up front, definite. A
    transaction whose range deletes split no scan is never refused for its scans."""
    dels = [_drange(b"p/%03d" % i, b"p/%03d\x00" % i) for i in range(64)]
    with pytest.raises(errors.InvalidArgument, match=f"more than {MAX_TXN_SCAN_PARTS} ranges"):
        split(kv_pb2.TxnBody(success=[*dels, *(_scan(b"p/") for _ in range(63))]), MAX_KEY)
    with pytest.raises(errors.InvalidArgument, match="ranges"):  # nested deletes are before the scans too
        split(kv_pb2.TxnBody(success=[kv_pb2.TxnOp(txn=kv_pb2.TxnBody(failure=dels[:3])),
                                      *(_scan(b"p/") for _ in range(40))]), MAX_KEY)
    split(kv_pb2.TxnBody(success=[_scan(b"p/") for _ in range(128)]), MAX_KEY)  # no range delete
    split(kv_pb2.TxnBody(success=[*dels, *(_scan(b"q/") for _ in range(63))]), MAX_KEY)  # deletes meet no scan
    split(kv_pb2.TxnBody(success=[_drange(b"p/", b"p0"), *(_scan(b"p/") for _ in range(100))]), MAX_KEY)  # covered
    split(kv_pb2.TxnBody(success=dels, failure=[_scan(b"p/") for _ in range(63)]), MAX_KEY)  # another path
    split(kv_pb2.TxnBody(success=[_drange(b"p/1", b"p/2"), *(_scan(b"p/") for _ in range(64))]), MAX_KEY)  # 2 each


@settings(max_examples=200, deadline=None)
@given(lo=st.sampled_from(KEYS), hi=st.sampled_from([*KEYS, None]),
       gone=st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from([*KEYS, None])), max_size=4))
def test_outside_is_the_range_minus_the_deleted_ranges(lo: bytes, hi: bytes | None,
                                                       gone: list[tuple[bytes, bytes | None]]) -> None:
    r = ScanRange(lo, hi, 3)
    parts = outside(r, gone, 3)
    probes = [k + t for k in KEYS for t in (b"", b"\x00", b"z")]
    for k in probes:
        kept = r.holds(k) and not any(s <= k and (e is None or k < e) for s, e in gone if e is None or s < e)
        assert sum(p.holds(k) for p in parts) == int(kept), k
    assert all(p.limit == 3 and (p.end is None or p.start < p.end) for p in parts)
    assert all(a.end is not None and a.end <= b.start for a, b in itertools.pairwise(parts))


# --- a LEASE compare in the read-only evaluation ----------------------------------------------
class _Leased:
    """Versions with their lease: key -> [(revision, value | None, lease)] (an attachment changes
    only with a new version: `txn_reading`'s premise). A read at a revision carries no lease;
    `current` reads the newest version with its lease, and counts its calls."""

    def __init__(self) -> None:
        self.history: dict[bytes, list[tuple[int, bytes | None, int]]] = {}
        self.last = 0
        self.current_reads: list[bytes] = []

    def write(self, key: bytes, value: bytes | None, lease: int = 0) -> int:
        self.last += 10
        self.history.setdefault(key, []).append((self.last, value, 0 if value is None else lease))
        return self.last

    def _cur(self, key: bytes, revision: int, with_lease: bool) -> txn.Current | None:
        vs = [v for v in self.history.get(key, []) if v[0] <= revision]
        if not vs or vs[-1][1] is None:
            return None
        born = max((i for i, v in enumerate(vs) if i == 0 or vs[i - 1][1] is None), default=0)
        return txn.Current(vs[-1][1] or b"", vs[born][0], vs[-1][0], len(vs) - born, vs[-1][2] if with_lease else 0)

    def lease_at(self, key: bytes, revision: int) -> int:
        """The model: the lease of the key's version at `revision` (0: absent), as etcd compares it."""
        c = self._cur(key, revision, True)
        return 0 if c is None else c.lease

    async def get_at(self, key: bytes, revision: int) -> txn.Current | None:
        return self._cur(key, revision, False)

    async def current(self, key: bytes) -> txn.Current | None:
        self.current_reads.append(key)
        return self._cur(key, self.last, True)


def _lease_body(key: bytes, op: int, lease: int) -> kv_pb2.TxnBody:
    return kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_LEASE, result=op, number=lease)],
                          success=[kv_pb2.TxnOp(get=key)], failure=[kv_pb2.TxnOp(get=b"other")])


def test_a_lease_compare_is_evaluated_on_the_lease_at_the_cut() -> None:
    """Same version now as at M: compared on its lease (holds / fails); a newer version or a
    delete after M (even with the same lease): None, start again; absent at M: lease 0, and no
    current read; no `current` reader: a bug (NoLeaseReader)."""
    s = _Leased()
    s.write(b"k", b"v", 7)
    m = s.last

    def ev(body: kv_pb2.TxnBody, at: int) -> kv_pb2.TxnResult | None:
        return asyncio.run(evaluate_at(body, at, s.get_at, None, s.current))

    held = ev(_lease_body(b"k", kv_pb2.EQUAL, 7), m)
    assert held is not None and held.succeeded and held.responses[0].get.value == b"v"
    failed = ev(_lease_body(b"k", kv_pb2.EQUAL, 8), m)
    assert failed is not None and not failed.succeeded
    assert ev(_lease_body(b"k", kv_pb2.EQUAL, 0), m).succeeded is False  # type: ignore[union-attr]
    s.write(b"x", b"unrelated")  # other keys' writes after M change nothing
    assert ev(_lease_body(b"k", kv_pb2.GREATER, 6), m).succeeded  # type: ignore[union-attr]
    s.write(b"k", b"v2", 7)  # a newer version, the same lease: its lease at M is not known now
    assert ev(_lease_body(b"k", kv_pb2.EQUAL, 7), m) is None
    assert ev(_lease_body(b"k", kv_pb2.EQUAL, 7), s.last).succeeded  # type: ignore[union-attr]
    s.write(b"k", None)
    assert ev(_lease_body(b"k", kv_pb2.EQUAL, 0), s.last - 10) is None  # gone since
    s.current_reads.clear()
    absent = ev(_lease_body(b"k", kv_pb2.EQUAL, 0), s.last)
    assert absent is not None and absent.succeeded and s.current_reads == []  # absent at M: lease 0
    assert ev(_lease_body(b"nope", kv_pb2.NOT_EQUAL, 0), s.last).succeeded is False  # type: ignore[union-attr]
    with pytest.raises(NoLeaseReader):
        asyncio.run(evaluate_at(_lease_body(b"k", kv_pb2.EQUAL, 0), m, s.get_at))


def test_only_the_keys_lease_compares_name_are_read_with_their_lease() -> None:
    s = _Leased()
    for k in (b"a", b"b", b"c"):
        s.write(k, b"v", 5)
    nested = kv_pb2.TxnOp(txn=kv_pb2.TxnBody(
        compares=[kv_pb2.Compare(key=b"c", target=kv_pb2.COMPARE_LEASE, result=kv_pb2.EQUAL, number=5)]))
    body = kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=b"a", target=kv_pb2.COMPARE_LEASE, result=kv_pb2.EQUAL,
                                                   number=5),
                                    kv_pb2.Compare(key=b"b", target=kv_pb2.COMPARE_VERSION, result=kv_pb2.EQUAL,
                                                   number=1)],
                          success=[nested])
    res = asyncio.run(evaluate_at(body, s.last, s.get_at, None, s.current))
    assert res is not None and res.succeeded and res.responses[0].txn.succeeded
    assert sorted(s.current_reads) == [b"a", b"c"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"k", b"j"]), st.one_of(st.none(), st.sampled_from([b"v", b"w"])),
                          st.integers(0, 3)), max_size=8),
       st.integers(0, 9), st.integers(0, 3), st.sampled_from([kv_pb2.EQUAL, kv_pb2.NOT_EQUAL, kv_pb2.GREATER,
                                                              kv_pb2.LESS]))
def test_a_lease_compare_at_a_cut_is_etcds_or_starts_again(writes: list[tuple[bytes, bytes | None, int]], cut: int,
                                                           number: int, op: int) -> None:
    """Against the model (the lease of the key's version at M; 0 when absent): the evaluation at
    any M either compares exactly that lease, or (only when the key present at M has a newer
    version or is gone now) starts again."""
    s = _Leased()
    for key, value, lease in writes:
        s.write(key, value, lease)
    m = min(cut * 10, s.last) or 1
    res = asyncio.run(evaluate_at(_lease_body(b"k", op, number), m, s.get_at, None, s.current))
    at, now = s._cur(b"k", m, True), s._cur(b"k", s.last, True)
    if at is not None and (now is None or now.mod_revision != at.mod_revision):
        assert res is None
        return
    want = s.lease_at(b"k", m)
    holds = {kv_pb2.EQUAL: want == number, kv_pb2.NOT_EQUAL: want != number, kv_pb2.GREATER: want > number,
             kv_pb2.LESS: want < number}[op]
    assert res is not None and res.succeeded == holds


def test_run_reading_starts_again_while_a_compared_key_changes_and_gives_up() -> None:
    """A key a LEASE compare names rewritten after every cut: each evaluation starts again,
    then `Exhausted` (nothing written); once it holds still, the reading lands at a cut."""
    s = _Leased()
    s.write(b"k", b"v", 7)

    class Churning:
        def __init__(self, churn: bool) -> None:
            self.churn = churn

        async def cut(self) -> int:
            m = s.last
            if self.churn:
                s.write(b"k", b"v", 7)  # after the cut: a newer version, the same lease
            return m

        def can_write(self) -> bool:
            return True

        async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
            raise AssertionError("a read-only body never writes")

        async def get_at(self, key: bytes, revision: int) -> txn.Current | None:
            return await s.get_at(key, revision)

        async def current(self, key: bytes) -> txn.Current | None:
            return await s.current(key)

    body = _lease_body(b"k", kv_pb2.EQUAL, 7)
    with pytest.raises(Exhausted):
        asyncio.run(run_reading(body, Churning(True), tries=3))
    landed = asyncio.run(run_reading(body, Churning(False)))
    assert not landed.wrote and landed.result.succeeded and landed.revision == s.last


def test_leased_refuses_an_answer_that_read_no_lease() -> None:
    """A node before Get's with_lease ignores it: its answer (lease_read false) is never taken
    for "no lease" (definite UNAVAILABLE: nothing was written)."""
    old = kv_pb2.GetResponse(found=True, value=b"v", mod_revision=3, node_id=4)
    with pytest.raises(errors.Unavailable, match="no lease") as info:
        leased(old)
    assert info.value.definite
    got = leased(kv_pb2.GetResponse(found=True, value=b"v", create_revision=2, mod_revision=3, version=2, lease=9,
                                    lease_read=True))
    assert got == txn.Current(b"v", 2, 3, 2, 9)
    assert leased(kv_pb2.GetResponse(lease_read=True)) is None
