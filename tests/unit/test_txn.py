"""Transactions in the state machine: the TXN command's codec (round trips, hostile bytes,
truncations, limits), its result's codec, and its apply semantics on `DictState` (compares on
missing keys, one revision for every write, sequential reads of the transaction's own writes,
nested transactions, exactly-once, ownership, the change log)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from txncodec import encoded_or_refused, valid

from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import mvcc
from kvstore.storage.changefeed import read_changes
from kvstore.storage.commands import (
    ApplyResult,
    Command,
    Op,
    decode_command,
    decode_result,
    encode_command,
    encode_result,
)
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import ShardState
from kvstore.storage.txn import (
    MAX_RESULT_VALUE_BYTES,
    MAX_TXN_DEPTH,
    MAX_TXN_ITEMS,
    CmpResult,
    Compare,
    OpKind,
    OpResult,
    Target,
    Txn,
    TxnOp,
    TxnResult,
    decode_txn,
    decode_txn_result,
    encode_txn,
    encode_txn_result,
    writes_of,
)

E, NE, GT, LT = CmpResult.EQUAL, CmpResult.NOT_EQUAL, CmpResult.GREATER, CmpResult.LESS


def put(k: bytes, v: bytes) -> TxnOp:
    return TxnOp(OpKind.PUT, k, v)


def get(k: bytes) -> TxnOp:
    return TxnOp(OpKind.GET, k)


def delete(k: bytes) -> TxnOp:
    return TxnOp(OpKind.DELETE, k)


def nested(cmps: tuple[Compare, ...], ok: tuple[TxnOp, ...], ko: tuple[TxnOp, ...] = ()) -> TxnOp:
    return TxnOp(OpKind.TXN, txn=Txn(cmps, ok, ko))


def run(s: DictState, t: Txn, cid: int = 0, seq: int = 0, revision: int = 0, retry: bool = False) -> ApplyResult:
    res = s.apply(encode_command(Command.transaction(t, cid, seq, seq, retry, 0, revision)))
    # every result survives the session cache's encoding
    assert decode_result(encode_result(res)) == res
    return res


# --- strategies ----------------------------------------------------------------------------------
keys = st.one_of(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), st.binary(min_size=1, max_size=8))
compares = st.builds(
    lambda k, t, r, v, n: Compare(k, t, r, v if t == Target.VALUE else b"", 0 if t == Target.VALUE else n),
    keys, st.sampled_from(list(Target)), st.sampled_from(list(CmpResult)), st.binary(max_size=8),
    st.one_of(st.integers(0, 3), st.integers(0, (1 << 63) - 1)),
)


def txns(depth: int = 1) -> st.SearchStrategy[Txn]:
    leaf = st.one_of(
        st.builds(put, keys, st.binary(max_size=8)), st.builds(get, keys), st.builds(delete, keys)
    )
    ops = leaf if depth >= 3 else st.one_of(leaf, txns(depth + 1).map(lambda t: TxnOp(OpKind.TXN, txn=t)))
    return st.builds(
        Txn, st.lists(compares, max_size=3).map(tuple), st.lists(ops, max_size=3).map(tuple),
        st.lists(ops, max_size=3).map(tuple),
    )


# --- codec ---------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(txns(), st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1), st.booleans())
def test_txn_command_round_trips(t: Txn, cid: int, seq: int, retry: bool) -> None:
    encoded = encoded_or_refused(t)
    if encoded is None:
        return
    cmd = Command.transaction(t, cid, seq, 0, retry, 5, 77)
    data = encode_command(cmd)
    assert decode_command(data) == cmd
    assert decode_txn(encoded) == t
    # every strict prefix is refused with ValueError (never another exception, never accepted)
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            decode_command(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_txn_decoder_is_total_on_garbage(data: bytes) -> None:
    for blob in (data, encode_command(Command.transaction(Txn((), (put(b"k", b"v"),)))) [:43] + data):
        try:
            cmd = decode_command(blob)
        except ValueError:
            continue
        assert decode_command(encode_command(cmd)) == cmd
    with contextlib.suppress(ValueError):
        decode_txn(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_txn_result_decoder_is_total(data: bytes) -> None:
    try:
        r, end = decode_txn_result(data)
    except ValueError:
        return
    assert encode_txn_result(r) == data[:end]


def test_txn_result_round_trips() -> None:
    r = TxnResult(True, (
        OpResult(OpKind.PUT), OpResult(OpKind.DELETE, True), OpResult(OpKind.GET),
        OpResult(OpKind.GET, True, b"v", 3, 4, 2),
        OpResult(OpKind.TXN, txn=TxnResult(False, (OpResult(OpKind.GET, True, b"", 1, 1, 1),), 9)),
    ), 9)
    data = encode_txn_result(r)
    assert decode_txn_result(data) == (r, len(data))
    res = ApplyResult(revision=9, txn=r)
    assert decode_result(encode_result(res)) == res


def test_txn_limits_and_rules() -> None:
    many = tuple(get(b"k%d" % i) for i in range(MAX_TXN_ITEMS + 1))
    with pytest.raises(ValueError, match="more than"):
        encode_txn(Txn((), many))
    deep = Txn((), (get(b"k"),))
    for _ in range(MAX_TXN_DEPTH):
        deep = Txn((), (TxnOp(OpKind.TXN, txn=deep),))
    with pytest.raises(ValueError, match="deeper"):
        encode_txn(deep)
    with pytest.raises(ValueError, match="more than once"):
        encode_txn(Txn((), (put(b"a", b"1"), delete(b"a"))))
    with pytest.raises(ValueError, match="more than once"):
        encode_txn(Txn((), (put(b"a", b"1"), nested((), (), (put(b"a", b"2"),)))))
    # the two branches of one nested transaction may write the same key (only one runs)
    encode_txn(Txn((), (nested((), (put(b"a", b"1"),), (put(b"a", b"2"),)),)))
    with pytest.raises(ValueError, match="empty"):
        encode_txn(Txn((), (get(b""),)))
    with pytest.raises(ValueError, match="exceeds"):
        encode_txn(Txn((), (get(b"k" * 504),)))
    with pytest.raises(ValueError, match="number"):
        encode_txn(Txn((Compare(b"k", Target.MOD, E, b"", 1 << 63),)))
    with pytest.raises(ValueError, match="no number"):
        encode_txn(Txn((Compare(b"k", Target.VALUE, E, b"", 1),)))
    # a hand-built deep nesting is refused by the decoder before it recurses further
    blob = b"\x00\x00\x00\x01\x00\x00" + b"\x04\x00\x00\x00\x00\x00\x01\x00\x00" * 50
    with pytest.raises(ValueError):
        decode_txn(blob)
    with pytest.raises(ValueError, match="no key"):
        encode_command(Command(Op.TXN, b"k", txn=Txn()))
    with pytest.raises(ValueError, match="carries no transaction"):
        encode_command(Command(Op.PUT, b"k", txn=Txn()))


# --- apply ---------------------------------------------------------------------------------------
def test_compares_on_a_missing_key() -> None:
    s = DictState()
    for c, holds in [
        (Compare(b"x", Target.VALUE, E, b""), False),
        (Compare(b"x", Target.VALUE, NE, b"v"), False),
        (Compare(b"x", Target.VALUE, LT, b"z"), False),
        (Compare(b"x", Target.VERSION, E, b"", 0), True),
        (Compare(b"x", Target.CREATE, E, b"", 0), True),
        (Compare(b"x", Target.MOD, GT, b"", 0), False),
        (Compare(b"x", Target.MOD, LT, b"", 1), True),
    ]:
        res = run(s, Txn((c,), (get(b"x"),), (get(b"x"),)))
        assert res.txn is not None and res.txn.succeeded is holds, c
        assert res.txn.responses == (OpResult(OpKind.GET),)
        assert res.revision == 0  # nothing written: no revision used


def test_all_writes_share_one_revision_and_the_change_log_has_them_together() -> None:
    s = DictState()
    r1 = s.apply(encode_command(Command.put(b"a", b"0")))
    t = Txn(
        (Compare(b"a", Target.VALUE, E, b"0"), Compare(b"a", Target.MOD, E, b"", r1.revision)),
        (put(b"a", b"1"), put(b"b", b"2"), delete(b"a"), get(b"b")),
    )
    with pytest.raises(ValueError, match="more than once"):
        encode_txn(t)
    t = Txn(t.compares, (put(b"a", b"1"), put(b"b", b"2"), delete(b"c"), get(b"a"), get(b"b")))
    res = run(s, t)
    assert res.txn is not None and res.txn.succeeded
    rev = res.revision
    assert rev > r1.revision and res.txn.revision == rev
    ra, rb = res.txn.responses[3], res.txn.responses[4]
    # reads inside the transaction see its own writes, at its revision
    assert (ra.value, ra.create_revision, ra.mod_revision, ra.version) == (b"1", r1.revision, rev, 2)
    assert (rb.value, rb.create_revision, rb.mod_revision, rb.version) == (b"2", rev, rev, 1)
    assert res.txn.responses[2] == OpResult(OpKind.DELETE, False)
    assert s.data == {b"a": b"1", b"b": b"2"}
    assert writes_of(t, res.txn) == [(b"a", b"1"), (b"b", b"2")]  # the absent c's delete wrote nothing
    assert mvcc.rev_state(s.rows).last == rev
    assert [r for r, _ in mvcc.changes_from(s.rows, rev)] == [rev, rev]
    batch = read_changes(s.rows, rev, rev, max_events=100, max_bytes=1 << 20, prev_kv=False)
    assert sorted((c.key, c.value, c.revision) for c in batch.changes) == [(b"a", b"1", rev), (b"b", b"2", rev)]
    # the next write gets a higher revision
    r3 = s.apply(encode_command(Command.put(b"c", b"3")))
    assert r3.revision > rev
    # a failed compare runs the failure branch; a delete there is at one revision too
    res = run(s, Txn((Compare(b"a", Target.VERSION, GT, b"", 5),), (put(b"z", b"z"),),
                     (delete(b"a"), delete(b"b"), get(b"a"))))
    assert res.txn is not None and not res.txn.succeeded
    assert res.txn.responses == (OpResult(OpKind.DELETE, True), OpResult(OpKind.DELETE, True), OpResult(OpKind.GET))
    assert [c.key for c in read_changes(s.rows, res.revision, res.revision, max_events=100, max_bytes=1 << 20, prev_kv=False).changes] == [b"a", b"b"]
    assert s.data == {b"c": b"3"}


def test_nested_transactions() -> None:
    s = DictState()
    t = Txn(
        (Compare(b"k", Target.CREATE, E, b"", 0),),
        (put(b"k", b"1"), nested((Compare(b"k", Target.VALUE, E, b"1"),), (put(b"n", b"yes"), get(b"k")),
                                 (put(b"n", b"no"),))),
        (nested((), (get(b"k"),)),),
    )
    res = run(s, t)
    assert res.txn is not None and res.txn.succeeded
    inner = res.txn.responses[1].txn
    assert inner is not None and inner.succeeded and inner.revision == res.revision
    assert inner.responses[1].value == b"1"
    assert s.data == {b"k": b"1", b"n": b"yes"}
    res = run(s, t)
    assert res.txn is not None and not res.txn.succeeded
    inner = res.txn.responses[0].txn
    assert inner is not None and inner.succeeded and inner.responses[0].value == b"1"


def test_exactly_once_under_a_session() -> None:
    s = DictState()
    t = Txn((Compare(b"n", Target.VERSION, E, b"", 0),), (put(b"n", b"1"),), (put(b"n", b"again"),))
    first = run(s, t, cid=7, seq=1)
    again = run(s, t, cid=7, seq=1, retry=True)
    assert first == again and again.revision == first.revision
    assert s.data == {b"n": b"1"}
    assert mvcc.rev_state(s.rows).last == first.revision


def test_a_txn_naming_a_key_the_group_does_not_serve_is_refused_whole() -> None:
    s = DictState()
    h = key_hash(b"mine")
    s.shard_state = ShardState(IntervalSet([(h, h + 1)]), IntervalSet())
    ok = run(s, Txn((), (put(b"mine", b"1"),)), cid=3, seq=1)
    assert ok.txn is not None and not ok.error
    # "other" appears only in a branch that would not run: still refused (ownership is static)
    res = run(s, Txn((Compare(b"mine", Target.VALUE, E, b"1"),), (put(b"mine", b"2"),), (get(b"other"),)), cid=3, seq=2)
    assert res.wrong_shard and res.txn is None
    assert s.data == {b"mine": b"1"}
    assert s.session_result(3, 2) is None  # never cached: its retry elsewhere may apply


def test_gets_returning_too_much_are_refused_whole_and_cache_only_the_error() -> None:
    """A tiny transaction may not make every replica keep a huge result: 40 GETs of a 1 MiB
    value (40 MiB) are refused with an error result, and its PUT is not made."""
    s = DictState()
    big = b"v" * (1 << 20)
    run(s, Txn((), (put(b"big", big),)))
    before = dict(s.data), mvcc.rev_state(s.rows)
    t = Txn((), (put(b"other", b"x"),) + (get(b"big"),) * 40)
    assert MAX_RESULT_VALUE_BYTES < 40 << 20
    res = run(s, t, cid=5, seq=1)
    assert res.error and "more than" in res.error and res.txn is None
    assert (dict(s.data), mvcc.rev_state(s.rows)) == before
    assert len(encode_result(res)) < 1000
    ok = run(s, Txn((), (get(b"big"),) * 8), cid=5, seq=2)  # 8 MiB: under the bound
    assert ok.txn is not None and all(o.value == big for o in ok.txn.responses)


def test_a_refused_proposal_changes_nothing() -> None:
    s = DictState()
    res = run(s, Txn((), (put(b"a", b"1"),)), revision=mvcc.PROPOSAL_MAX + 1)
    assert res.error and "revision refused" in res.error
    assert s.data == {} and mvcc.rev_state(s.rows).last == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(txns(), min_size=1, max_size=6))
def test_apply_matches_a_model(ts: list[Txn]) -> None:
    """Every transaction's outcome and effect (values and metadata) equal a direct model of
    etcd's semantics, with every write at the one revision the transaction gets."""
    s = DictState()
    model: dict[bytes, tuple[bytes, int, int, int]] = {}  # key -> value, create, mod, version
    ran = 0
    for t in filter(valid, ts):
        ran += 1
        before = mvcc.rev_state(s.rows).last
        rev = mvcc.next_revision(before, 0, s.group)

        def holds(c: Compare) -> bool:
            cur = model.get(c.key)
            if c.target == Target.VALUE:
                if cur is None:
                    return False
                a: bytes | int = cur[0]
                b: bytes | int = c.value
            elif c.target == Target.LEASE:
                a, b = 0, c.number  # these transactions attach no key to a lease
            else:
                i = {Target.CREATE: 1, Target.MOD: 2, Target.VERSION: 3}[c.target]
                a, b = (0 if cur is None else cur[i]), c.number
            return {E: a == b, NE: a != b, GT: a > b, LT: a < b}[c.result]  # type: ignore[operator]

        def model_run(t: Txn, rev: int = rev) -> TxnResult:
            ok = all(holds(c) for c in t.compares)
            out = []
            for op in t.success if ok else t.failure:
                cur = model.get(op.key)
                if op.kind == OpKind.PUT:
                    model[op.key] = (op.value, rev, rev, 1) if cur is None else (op.value, cur[1], rev, cur[3] + 1)
                    out.append(OpResult(op.kind))
                elif op.kind == OpKind.DELETE:
                    model.pop(op.key, None)
                    out.append(OpResult(op.kind, cur is not None))
                elif op.kind == OpKind.GET:
                    out.append(OpResult(op.kind) if cur is None else OpResult(op.kind, True, *cur))
                else:
                    assert op.txn is not None
                    out.append(OpResult(op.kind, txn=model_run(op.txn, rev)))
            return TxnResult(ok, tuple(out))

        expect = model_run(t)
        res = run(s, t)
        assert res.txn is not None
        assert _unstamped(res.txn) == expect
        assert s.data == {k: v[0] for k, v in model.items()}
        wrote = mvcc.rev_state(s.rows).last != before
        assert res.revision == (rev if wrote else 0)
        assert bool(writes_of(t, res.txn)) is wrote  # what the simulator's checker reconstructs
        if wrote:
            assert {r for r, _ in mvcc.changes_from(s.rows, before + 1)} == {rev}
        for k, (_, c, m, n) in model.items():
            meta = mvcc.current_meta(s.rows, k, s.data[k])
            assert meta is not None and (meta.create_revision, meta.mod_revision, meta.version) == (c, m, n)
    event(f"valid transactions: {min(ran, 3)}")


def _unstamped(r: TxnResult) -> TxnResult:
    return TxnResult(r.succeeded, tuple(
        OpResult(o.kind, txn=_unstamped(o.txn)) if o.txn is not None else o for o in r.responses
    ))
