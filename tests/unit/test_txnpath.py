"""A scan at its position on a transaction's path (`kvstore.txnpath`), against a reference model:
`txn.evaluate` itself run on the state at R - 1 along the path up to the scan, with a GET of every
key of a small key space there (the state a scan at that position must show), over random paths of
puts, deletes, range deletes and scans with limits, and random byte-budget cuts of the reads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.storage import txn
from kvstore.txnpath import DELETE, PUT, RANGE, Step, at_position, path_steps, read_plan, within_budget
from kvstore.txnscan import ScanRange, split
from kvstore.v1 import kv_pb2

R = 100
ALPHA = b"abcd"
UNIVERSE = sorted({bytes([x]) for x in ALPHA} | {bytes([x, y]) for x in ALPHA for y in ALPHA})
bound = st.sampled_from([*UNIVERSE, b"b\x00", b"e"])


def _range(lo: bytes, hi: bytes | None) -> tuple[bytes, bytes | None]:
    return (lo, hi) if hi is None or hi > lo else (hi, lo if lo > hi else None)


step = st.one_of(
    st.builds(lambda k, v: Step(PUT, k, value=v), st.sampled_from(UNIVERSE), st.binary(max_size=2)),
    st.builds(lambda k: Step(DELETE, k), st.sampled_from(UNIVERSE)),
    st.builds(lambda lo, hi: Step(RANGE, *_range(lo, hi)), bound, st.none() | bound),
    st.builds(lambda lo, hi, lim: Step(scan=lim, key=_range(lo, hi)[0], end=_range(lo, hi)[1]),
              bound, st.none() | bound, st.integers(0, 4)),
)
"""A scan step carries its range in key/end and its limit in `scan` (the test's own encoding)."""

initial = st.dictionaries(
    st.sampled_from(UNIVERSE),
    st.tuples(st.integers(1, 40), st.integers(0, 40), st.integers(1, 5), st.binary(max_size=2)).map(
        lambda t: txn.Current(t[3], t[0], t[0] + t[1], t[2])))


def _once(steps: list[Step]) -> list[Step]:
    """`steps` with every point write of a key already point-written dropped (one per path)."""
    seen: set[bytes] = set()
    out = []
    for s in steps:
        if s.kind in (PUT, DELETE):
            if s.key in seen:
                continue
            seen.add(s.key)
        out.append(s)
    return out


def _state_after(steps: list[Step], before: dict[bytes, txn.Current]) -> dict[bytes, txn.Current]:
    """The reference: `txn.evaluate` of the writes of `steps` then a GET of every key, on `before`."""
    ops = []
    for s in steps:
        if s.kind == PUT:
            ops.append(txn.TxnOp(txn.OpKind.PUT, s.key, s.value))
        elif s.kind == DELETE:
            ops.append(txn.TxnOp(txn.OpKind.DELETE, s.key))
        elif s.kind == RANGE:
            ops.append(txn.TxnOp(txn.OpKind.DELETE_RANGE, s.key, end=s.end or b""))
    ops += [txn.TxnOp(txn.OpKind.GET, k) for k in UNIVERSE]
    out = txn.evaluate(txn.Txn(success=tuple(ops)), before.get, R,
                       lambda lo, hi: [k for k in before if txn.in_range(k, lo, hi)])
    gets = out.result.responses[len(ops) - len(UNIVERSE):]
    return {k: txn.Current(g.value, g.create_revision, g.mod_revision, g.version)
            for k, g in zip(UNIVERSE, gets, strict=True) if g.found}


def _kv(k: bytes, c: txn.Current) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=k, value=c.value, create_revision=c.create_revision, mod_revision=c.mod_revision,
                           version=c.version)


def _read(state: dict[bytes, txn.Current], r: ScanRange) -> tuple[list[kv_pb2.KeyValue], bool]:
    """A scan of `r` on `state` as `txn_scans` reads one (its first `limit` keys, and more)."""
    keys = sorted(k for k in state if r.holds(k))
    more = bool(r.limit and len(keys) > r.limit)
    return [_kv(k, state[k]) for k in (keys[: r.limit] if r.limit else keys)], more


@settings(max_examples=400, deadline=None)
@given(initial, st.lists(step, max_size=10), st.lists(st.none() | st.integers(0, 3), max_size=12))
def test_a_scan_shows_the_state_at_its_position(before: dict[bytes, txn.Current], drawn: list[Step],
                                                 budget_cuts: list[int | None]) -> None:
    steps = _once(drawn)
    final = _state_after(steps, before)
    path = [Step(scan=i) if s.kind == "" else s for i, s in enumerate(steps)]
    for at, s in enumerate(steps):
        if s.kind:
            continue
        r = ScanRange(s.key, s.end, s.scan)
        expected_all = [_kv(k, c) for k, c in sorted(_state_after(steps[:at], before).items()) if r.holds(k)]
        plan = read_plan(path, at, r)
        cut = False
        if not plan.at_before:  # no later write meets the range: the state at R is the state here
            items, more = _read(final, r)
        else:
            assert all(r.holds(sub.start) for sub in plan.ranges)
            parts = []
            for i, sub in enumerate(plan.ranges):
                got, sub_more = _read(before, sub)
                c = budget_cuts[i] if i < len(budget_cuts) else None
                if c is not None and c < len(got):  # the byte budget stopped it after c items
                    got, sub_more, cut = got[:c], True, True
                parts.append((got, sub_more))
            prev = {k: before.get(k) for k in plan.puts}
            items, more = at_position(plan, r, R, parts, prev)
        if cut:
            assert more and items == expected_all[: len(items)]
        else:
            assert items == (expected_all[: r.limit] if r.limit else expected_all)
            assert more == bool(r.limit and len(expected_all) > r.limit)


def test_a_scan_then_a_delete_of_its_range_shows_the_keys_before() -> None:
    """etcd's "get --prefix k then del --prefix k" in one transaction."""
    before = {b"k1": txn.Current(b"x", 5, 7, 2), b"k2": txn.Current(b"y", 6, 6, 1), b"l": txn.Current(b"z", 3, 3, 1)}
    r = ScanRange(b"k", b"l", 0)
    path = [Step(scan=0), Step(RANGE, b"k", b"l")]
    plan = read_plan(path, 0, r)
    assert plan.at_before and plan.ranges == [r] and not plan.writes
    items, more = at_position(plan, r, R, [_read(before, r)], {})
    assert [(kv.key, kv.version) for kv in items] == [(b"k1", 2), (b"k2", 1)] and not more
    # a put before the scan, a range delete after: the put shows, its version the next
    path = [Step(PUT, b"k1", value=b"n"), Step(scan=0), Step(RANGE, b"a", None)]
    plan = read_plan(path, 1, ScanRange(b"k", b"l", 1))
    assert plan.puts == [b"k1"] and plan.ranges == [ScanRange(b"k", b"l", 2)]
    items, more = at_position(plan, ScanRange(b"k", b"l", 1), R, [_read(before, plan.ranges[0])],
                              {b"k1": before[b"k1"]})
    assert [(kv.key, kv.value, kv.mod_revision, kv.version) for kv in items] == [(b"k1", b"n", R, 3)] and more
    # no write after the scan meets its range: read at R as is
    assert not read_plan([Step(RANGE, b"k", b"l"), Step(scan=0), Step(PUT, b"m")], 1, r).at_before


def _op(depth: int) -> st.SearchStrategy[kv_pb2.TxnOp]:
    key = st.sampled_from([b"a", b"b", b"c"])
    leaves = st.one_of(
        key.map(lambda k: kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=k, value=b"v"))),
        key.map(lambda k: kv_pb2.TxnOp(delete=k)),
        key.map(lambda k: kv_pb2.TxnOp(get=k)),
        key.map(lambda k: kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(prefix=k))),
        key.map(lambda k: kv_pb2.TxnOp(scan=kv_pb2.TxnScan(start=k))),
    )
    if depth >= 3:
        return leaves
    nested = st.builds(lambda s, f: kv_pb2.TxnOp(txn=kv_pb2.TxnBody(success=s, failure=f)),
                       st.lists(_op(depth + 1), max_size=3), st.lists(_op(depth + 1), max_size=3))
    return st.one_of(leaves, nested)


@settings(max_examples=150, deadline=None)
@given(st.lists(_op(1), max_size=4), st.lists(_op(1), max_size=4), st.data())
def test_path_steps_are_the_writes_and_scans_of_the_branches_taken(success: list[kv_pb2.TxnOp],
                                                                   failure: list[kv_pb2.TxnOp],
                                                                   data: st.DataObject) -> None:
    body = kv_pb2.TxnBody(success=success, failure=failure)
    stripped, plan = split(body, 64)

    def result(b: kv_pb2.TxnBody) -> kv_pb2.TxnResult:
        ok = data.draw(st.booleans())
        r = kv_pb2.TxnResult(succeeded=ok)
        for op in b.success if ok else b.failure:
            if op.WhichOneof("op") == "txn":
                r.responses.add().txn.CopyFrom(result(op.txn))
            else:
                r.responses.add().get.SetInParent()
        return r

    res = result(stripped)
    steps = path_steps(plan, stripped, res)

    def walk(b: kv_pb2.TxnBody, r: kv_pb2.TxnResult, scans: list[int]) -> list[Step]:
        """The same path read off the original body (scans numbered in the order split met them)."""
        out: list[Step] = []
        ops = b.success if r.succeeded else b.failure
        i = 0
        for op in ops:
            which = op.WhichOneof("op")
            if which == "scan":
                out.append(Step(scan=scans.pop(0)))
                continue
            if which == "txn":
                out += walk(op.txn, r.responses[i].txn, scans)
            elif which == "put":
                out.append(Step(PUT, op.put.key, value=op.put.value))
            elif which == "delete":
                out.append(Step(DELETE, op.delete))
            elif which == "delete_range":
                p = op.delete_range.prefix
                out.append(Step(RANGE, p, p[:-1] + bytes([p[-1] + 1])))
            i += 1
        return out

    taken = [s.scan for s in steps if s.scan >= 0]
    assert steps == walk(body, res, list(taken))
    assert all(plan.scans[i].start for i in taken)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.sampled_from(UNIVERSE), unique=True, max_size=8).map(sorted),
       stamped=st.lists(st.booleans(), min_size=8, max_size=8), more=st.booleans(), budget=st.integers(0, 120))
def test_within_budget_charges_the_puts_in_key_order_and_cuts_a_prefix(keys: list[bytes], stamped: list[bool],
                                                                       more: bool, budget: int) -> None:
    """The items stamped R (the transaction's puts, never read) take their bytes from the budget
    in key order; the answer is cut before the first that does not fit and then says more; the
    items read at R - 1 (charged by their read) pass."""
    items = [kv_pb2.KeyValue(key=k, value=b"v" * 9, mod_revision=R if p else 7, version=1)
             for k, p in zip(keys, stamped, strict=False)]
    got, got_more, used = within_budget(items, more, R, budget)
    assert got == items[:len(got)]
    assert used == sum(kv.ByteSize() for kv in got if kv.mod_revision == R) <= budget
    if len(got) < len(items):
        assert got_more and items[len(got)].mod_revision == R
        assert used + items[len(got)].ByteSize() > budget
    else:
        assert got_more == more
