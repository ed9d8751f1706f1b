"""kvstore's Txn with scans on the node receiving it (`server/txn_scans.py`), over a stand-in for
the node's request layer (`_Node`: a tiny multi-version store of several groups, every group
hosted here, a shard map that a test can split): the scans read exactly the groups of the cut,
a map that changed since the cut starts the reading again, a write under the client's session
that wrote nothing is not proposed again, and a scan's parts share one byte budget."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kvstore import errors
from kvstore.keyspace import prefix_end
from kvstore.security.authstate import PermKind
from kvstore.security.rbac import READ, WRITE
from kvstore.server import txn_scans
from kvstore.server.scan_parts import ByteBudget
from kvstore.server.txn_reading import Exhausted, Reading, run_reading
from kvstore.server.txn_scans import MapChanged, _answers, _Reading, scanning_txn
from kvstore.server.txn_wire import txn_from_proto
from kvstore.shard.ranges import HASH_MAX, IntervalSet, key_hash
from kvstore.storage import txn
from kvstore.txnscan import ScanRange, split
from kvstore.v1 import kv_pb2

HALF = HASH_MAX // 2
LOW, HIGH = IntervalSet([(0, HALF)]), IntervalSet([(HALF + 1, HASH_MAX)])


def _key_in(owned: IntervalSet, tag: bytes) -> bytes:
    return next(k for i in itertools.count() if key_hash(k := tag + b"%d" % i) in owned)


class _Map:
    def __init__(self, owned: dict[int, IntervalSet]) -> None:
        self.owned = owned

    def data_groups(self) -> list[int]:
        return sorted(self.owned)

    def group_for_hash(self, h: int) -> int:
        return next(g for g, o in self.owned.items() if h in o)


class _Stream:
    def __init__(self, chunk: list[tuple[bytes, Any]]) -> None:
        self.chunk = chunk

    def __iter__(self) -> Any:
        return iter([self.chunk])

    def close(self) -> None:
        pass


class _Node:
    """The parts of `KVRequests` that `txn_scans` uses, over rows (key, revision, value, group)
    written with one revision counter; `last[g]`: group g's applied last revision. `before_scan`
    runs once, as the first part is opened; `before_cut` before each read point."""

    def __init__(self) -> None:
        self.tracker = SimpleNamespace(map=_Map({1: IntervalSet.full()}), version=1)
        self.rows: list[tuple[bytes, int, bytes, int]] = []
        self.last: dict[int, int] = {}
        self.rev = itertools.count(1)
        self.closes = SimpleNamespace(last=lambda g: self.last.get(g, 0))
        self.metrics = SimpleNamespace(reads=SimpleNamespace(inc=lambda: None))
        self.cfg = SimpleNamespace(id=1, limits=SimpleNamespace(max_key=64), request_timeout=1.0)
        self.guard = None
        self.caller = None
        self.before_scan: Any = None
        self.before_cut: Any = None
        self.txns = 0
        self.cached: dict[tuple[int, int], kv_pb2.TxnResponse] = {}

    @property
    def host(self) -> Any:
        return SimpleNamespace(groups=set(self.tracker.map.data_groups()))

    def write(self, key: bytes, value: bytes, group: int | None = None) -> int:
        g = group or self.tracker.map.group_for_hash(key_hash(key))
        rev = next(self.rev)
        self.rows.append((key, rev, value, g))
        self.last[g] = rev
        return rev

    def at(self, key: bytes, revision: int) -> tuple[bytes, int, int, int] | None:
        vs = [(r, v) for k, r, v, _ in self.rows if k == key and r <= revision]
        return (vs[-1][1], vs[0][0], vs[-1][0], len(vs)) if vs else None

    async def read_point(self, g: int, consistency: int) -> None:
        if self.before_cut is not None:
            self.before_cut()

    async def scan_start(self, req: kv_pb2.ScanRequest) -> tuple[kv_pb2.ScanResponse, _Stream]:
        if self.before_scan is not None:
            hook, self.before_scan = self.before_scan, None
            hook()
        owned = self.tracker.map.owned[req.group]
        keys = sorted({k for k, *_ in self.rows if req.start <= k and (not req.end or k < req.end)
                       and key_hash(k) in owned})
        chunk = []
        for k in keys:
            got = self.at(k, req.revision)
            if got is not None:
                chunk.append((k, SimpleNamespace(value=got[0], meta=SimpleNamespace(
                    create_revision=got[1], mod_revision=got[2], version=got[3]))))
        msg = kv_pb2.ScanResponse(more=True, revision=req.revision, owned_lo=[a for a, _ in owned],
                                  owned_hi=[b for _, b in owned])
        return msg, _Stream(chunk[: req.limit or None])

    async def get(self, req: kv_pb2.GetRequest) -> kv_pb2.GetResponse:
        got = self.at(req.key, req.revision)
        if got is None:
            return kv_pb2.GetResponse(revision=req.revision)
        return kv_pb2.GetResponse(found=True, value=got[0], create_revision=got[1], mod_revision=got[2],
                                  version=got[3], revision=req.revision)

    async def run_txn(self, req: kv_pb2.TxnRequest) -> kv_pb2.TxnResponse:
        """A TXN whose branch takes the put if its one compare (value equal) holds, under the
        session's cache: a (client, seq) answered before gets that answer again."""
        self.txns += 1
        s = req.session
        if s.client_id and (s.client_id, s.seq) in self.cached:
            return self.cached[(s.client_id, s.seq)]
        c = req.txn.compares[0]
        now = self.at(c.key, HASH_MAX)
        resp = kv_pb2.TxnResponse(result=kv_pb2.TxnResult(succeeded=now is not None and now[0] == c.value))
        if resp.result.succeeded:
            put = req.txn.success[0].put
            resp.revision = self.write(put.key, put.value)
            resp.result.responses.add().put = resp.revision
        else:
            resp.result.responses.add().get.CopyFrom(kv_pb2.KeyValue())
        if s.client_id:
            self.cached[(s.client_id, s.seq)] = resp
        return resp

    def prepare_txn(self, req: kv_pb2.TxnRequest) -> tuple[Any, bytes]:
        """The checked transaction (the guard's WRITE / READ checks of the real one)."""
        t = txn_from_proto(req.txn, lambda k: None, lambda v: None)
        if self.guard is not None:
            for key, written in txn.keys_of(t):
                self.guard.check_key(key, WRITE if written else READ)
            for lo, hi in txn.delete_ranges(t):
                self.guard.check_range(lo, hi or None, WRITE)
        return t, b""

    def wrong_shard(self, message: str) -> errors.KVError:
        return errors.WrongShard(message)

    def ok(self) -> kv_pb2.Error:
        return kv_pb2.Error()

    def err(self, err: errors.KVError) -> kv_pb2.Error:
        return errors.to_proto(err)

    @staticmethod
    def internal(op: str, err: BaseException, *, indeterminate: bool | None = None) -> errors.InternalError:
        raise err


def _split(n: _Node) -> None:
    """The map as after a split of group 1: group 2 owns the upper half of the hashes."""
    n.tracker.map = _Map({1: LOW, 2: HIGH})


def _reading(n: _Node, session: kv_pb2.Session | None = None) -> _Reading:
    return _Reading(cast(Any, n), session or kv_pb2.Session(), None, ScanRange(b"", None, 0))


def test_a_scan_reads_exactly_the_groups_of_the_cut_and_a_changed_map_is_refused() -> None:
    """The map gains group 2 (a split) between the cut and the scan, while group 2 already holds
    a write acknowledged before the transaction, above the cut: read in the new map's groups at
    R = M the scan would miss it; in the cut's groups the parts no longer cover the hashes."""
    n = _Node()
    low, high = _key_in(LOW, b"a"), _key_in(HIGH, b"b")
    n.write(low, b"1")
    io = _reading(n)
    m = asyncio.run(io.cut())
    assert (m, io.groups) == (1, [1])
    _split(n)
    n.write(high, b"2", group=2)  # acknowledged; its revision 2 is above M
    with pytest.raises(MapChanged):
        asyncio.run(io.scan(ScanRange(b"", None, 0), m, [1 << 20]))


def test_a_txn_whose_map_changed_under_its_scan_reads_again_from_a_new_cut() -> None:
    n = _Node()
    low, high = _key_in(LOW, b"a"), _key_in(HIGH, b"b")
    n.write(low, b"1")
    n.write(high, b"2", group=2)  # in group 2, which this node's map does not show yet
    n.before_scan = lambda: _split(n)
    body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(start=b"", end=b""))])
    resp = asyncio.run(scanning_txn(cast(Any, n), kv_pb2.TxnRequest(txn=body)))
    assert resp.error.code == kv_pb2.OK, resp.error
    scan = resp.result.responses[0].scan
    assert (sorted(kv.key for kv in scan.items), scan.revision) == (sorted([low, high]), 2)


def _flipping(n: _Node) -> kv_pb2.TxnBody:
    """Every cut finds k = "0" (so the body would write), every TXN finds k = "1" (it writes
    nothing): the reading never lands."""
    n.write(b"k", b"1")
    n.before_cut = lambda: n.write(b"k", b"0")
    real = n.run_txn

    async def run_txn(req: kv_pb2.TxnRequest) -> kv_pb2.TxnResponse:
        n.write(b"k", b"1")
        return await real(req)

    n.run_txn = run_txn  # type: ignore[method-assign]
    return kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=b"k", target=kv_pb2.COMPARE_VALUE, result=kv_pb2.EQUAL,
                                                   value=b"0")],
                          success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"k", value=b"x"))],
                          failure=[kv_pb2.TxnOp(get=b"k")])


def test_under_a_session_a_txn_that_wrote_nothing_is_never_proposed_again() -> None:
    n = _Node()
    body = _flipping(n)
    with pytest.raises(Exhausted):
        asyncio.run(run_reading(body, _reading(n, kv_pb2.Session(client_id=7, seq=1)), tries=4))
    assert n.txns == 1  # tries 2-4: a new cut, evaluated read-only (the session would answer the cached result)
    n = _Node()
    body = _flipping(n)
    with pytest.raises(Exhausted):
        asyncio.run(run_reading(body, _reading(n), tries=4))
    assert n.txns == 4  # without a session each try is a new proposal


def test_a_scans_parts_share_one_byte_budget() -> None:
    n = _Node()
    _split(n)
    for i in range(40):
        n.write(b"k%02d" % i, b"v" * 100)
    io = _reading(n)
    m = asyncio.run(io.cut())
    one = kv_pb2.KeyValue(key=b"k00", value=b"v" * 100, create_revision=1, mod_revision=1, version=1).ByteSize()
    budget = ByteBudget(5 * one)
    parts = [asyncio.run(io.part(g, ScanRange(b"", None, 0), m, budget)) for g in io.groups]
    assert all(p.cut for p in parts)
    assert sum(len(p.items) for p in parts) <= 5 + len(parts)  # at most one item past the budget per part
    left = [10 * one]
    out = asyncio.run(io.scan(ScanRange(b"", None, 0), m, left))
    assert out.more and [kv.key for kv in out.items] == [b"k%02d" % i for i in range(len(out.items))]
    assert 0 < len(out.items) <= 10 and left[0] >= 0


def test_the_puts_a_scan_answers_before_a_later_write_are_charged_to_the_budget(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    """Issue 18: 3 puts, then 100 scans of their prefix (empty before the transaction), then a
    delete in it: each scan is answered from R - 1 plus the puts before it, and those puts take
    their bytes from the transaction's one budget: once it is spent a scan answers a prefix
    that says `more`, never the puts again (before the fix: all 100 answered all 3 puts)."""
    monkeypatch.setattr(txn_scans, "MAX_TXN_SCAN_BYTES", 8 << 10)
    n = _Node()
    n.write(b"q", b"0")  # R - 1 holds nothing under p/
    io = _reading(n)
    asyncio.run(io.cut())
    puts = [kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"p/%d" % i, value=b"v" * 1024)) for i in range(3)]
    scans = [kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"p/")) for _ in range(100)]
    body, plan = split(kv_pb2.TxnBody(success=[*puts, *scans, kv_pb2.TxnOp(delete=b"p/zz")]), 64)
    rev = n.write(b"p/0", b"v" * 1024)  # the transaction's revision R
    result = kv_pb2.TxnResult(succeeded=True, responses=[*(kv_pb2.TxnOpResponse(put=rev) for _ in puts),
                                                         kv_pb2.TxnOpResponse(delete=False)])
    answers = asyncio.run(_answers(io, body, plan, Reading(result, rev, True)))
    assert sorted(answers) == list(range(100))
    total = sum(kv.ByteSize() for a in answers.values() for kv in a.items)
    assert total <= 8 << 10
    keys = [b"p/0", b"p/1", b"p/2"]
    full = [i for i in range(100) if [kv.key for kv in answers[i].items] == keys and not answers[i].more]
    assert full == list(range(len(full))) and len(full) >= 1  # the first scans, while the budget lasts
    for i in range(len(full), 100):  # then a prefix that says more
        got = [kv.key for kv in answers[i].items]
        assert answers[i].more and got == keys[:len(got)] and len(got) < 3
    assert all(a.revision == rev for a in answers.values())


class _Guard:
    """A caller who may write every key, and read every key but those under `unread`."""

    def __init__(self, unread: bytes) -> None:
        self.unread = unread

    def check_range(self, lo: bytes, hi: bytes | None, access: PermKind) -> None:
        meets = (hi is None or hi > self.unread) and lo < prefix_end(self.unread)  # type: ignore[operator]
        if access & READ and meets:
            raise errors.PermissionDenied(f"may not read [{lo!r}, {hi!r})")

    def check_key(self, key: bytes, access: PermKind) -> None:
        self.check_range(key, key + b"\x00", access)


@pytest.mark.parametrize("write", [
    kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(prefix=b"w/")),  # its range's first key is read
    kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"w/k", value=b"v")),   # its key is read
])
def test_what_the_read_only_evaluation_reads_is_checked_before_anything_is_proposed(write: kv_pb2.TxnOp) -> None:
    """Issue 18: a caller who may write w/ but not read it, a scan it may read and a write into
    w/: refused PERMISSION_DENIED (definite) before any proposal, whatever w/ holds (before the
    fix: only when the branch taken wrote nothing, after its proposal went out)."""
    n = _Node()
    n.write(b"a", b"1")
    n.guard = _Guard(b"w/")
    body = kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=b"a", target=kv_pb2.COMPARE_VALUE, result=kv_pb2.EQUAL,
                                                   value=b"1")],
                          success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"a")), write])
    resp = asyncio.run(scanning_txn(cast(Any, n), kv_pb2.TxnRequest(txn=body)))
    assert resp.error.code == kv_pb2.PERMISSION_DENIED and not resp.error.indeterminate, resp.error
    assert n.txns == 0


def test_a_txn_that_wrote_nothing_answers_the_revision_it_was_evaluated_at() -> None:
    """`read_revision`: the cut the transaction was evaluated at, also when the path taken has no
    scan (etcd's Txn header reports it: `etcd/kv.py` `_txn_scanning`); its writes' if it wrote."""
    n = _Node()
    n.write(b"a", b"1")
    m = n.write(b"b", b"2")
    body = kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=b"a", target=kv_pb2.COMPARE_VALUE, result=kv_pb2.EQUAL,
                                                   value=b"0")],
                          success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"a")),
                                   kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"a", value=b"x"))],
                          failure=[kv_pb2.TxnOp(get=b"a")])
    resp = asyncio.run(scanning_txn(cast(Any, n), kv_pb2.TxnRequest(txn=body)))
    assert resp.error.code == kv_pb2.OK and not resp.result.succeeded, resp
    assert (resp.revision, resp.read_revision) == (0, m)
    body.compares[0].value = b"1"
    resp = asyncio.run(scanning_txn(cast(Any, n), kv_pb2.TxnRequest(txn=body)))
    assert resp.result.succeeded and resp.revision == resp.read_revision == resp.result.responses[0].scan.revision
