"""A range delete inside a transaction (DELETE_RANGE, level 6): `txn.evaluate`'s sequential
semantics against a model (hypothesis), the codecs' new forms (TXN op kind 6 and its result,
the COMMIT / RECORD / record-row tail 4 with the ranges) round-tripped and fuzzed, the feature
gate, and the two-phase commit over three groups' state machines driven by the node logic
(`node/xtxn.plan_ranges`, `after_prepare`): one revision in every group, DELETE events at R,
lease attachments dropped, the range lock against other transactions, and a coordinator that
dies after its RECORD recovered by resolvers."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.cli.txnparse import TxnSyntaxError, parse_txn
from kvstore.client.types import Op
from kvstore.node import xtxn as logic
from kvstore.node.version import LEVEL_LEASES_2, LEVEL_TXN_RANGES, ClusterVersion, CommandGate, command_level
from kvstore.storage import leases, mvcc, txn, xtxn, xtxn_apply
from kvstore.storage.changefeed import read_changes
from kvstore.storage.commands import Command, decode_command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd
from kvstore.storage.machine import ONE_GROUP_RANGE_DELETE, DictState
from kvstore.storage.txn import CmpResult, Compare, OpKind, OpResult, Target, Txn, TxnOp, TxnResult
from kvstore.storage.xtxn import Record, State, TxnId, XCmd, XOp

START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)
KEYS = [b"a", b"b", b"c", b"d", b"e"]
key_st = st.sampled_from(KEYS)


# --- evaluate against a model --------------------------------------------------------------------
def range_st() -> st.SearchStrategy[tuple[bytes, bytes]]:
    bound = st.sampled_from([b"", b"a", b"b", b"bb", b"c", b"d", b"f"])
    return st.tuples(bound, bound).filter(lambda r: (r[0] or r[1]) and (not r[1] or r[1] > r[0]))


def op_st(depth: int) -> st.SearchStrategy[TxnOp]:
    base = st.one_of(
        st.builds(lambda k, v: TxnOp(OpKind.PUT, k, v), key_st, st.sampled_from([b"1", b"2"])),
        st.builds(lambda k: TxnOp(OpKind.DELETE, k), key_st),
        st.builds(lambda k: TxnOp(OpKind.GET, k), key_st),
        range_st().map(lambda r: TxnOp(OpKind.DELETE_RANGE, r[0], end=r[1])),
    )
    if depth >= 2:
        return base
    nested = st.builds(lambda c, s, f: TxnOp(OpKind.TXN, txn=Txn(tuple(c), tuple(s), tuple(f))),
                       st.lists(cmp_st(), max_size=1), st.lists(op_st(depth + 1), max_size=3),
                       st.lists(op_st(depth + 1), max_size=3))
    return st.one_of(base, nested)


def cmp_st() -> st.SearchStrategy[Compare]:
    return st.builds(lambda k, n: Compare(k, Target.VERSION, CmpResult.GREATER, number=n), key_st, st.integers(0, 1))


txn_st = st.builds(lambda c, s, f: Txn(tuple(c), tuple(s), tuple(f)), st.lists(cmp_st(), max_size=2),
                   st.lists(op_st(1), max_size=6), st.lists(op_st(1), max_size=3))
base_st = st.dictionaries(key_st, st.sampled_from([b"x", b"y"]))


def model(t: Txn, state: dict[bytes, bytes]) -> tuple[list[tuple[OpKind, bool, bytes, int]], bool]:
    """The plain sequential meaning: each operation on a dict, in order; (kind, found, value,
    deleted or a GET's version) per operation of the top level (nested ones flattened after
    their op). A key deleted by a range and put again continues its versions (one version at
    the revision: the put's)."""
    out: list[tuple[OpKind, bool, bytes, int]] = []
    version = {k: 1 for k in state}
    gone: dict[bytes, int] = {}

    def run(t: Txn) -> bool:
        ok = all(version.get(c.key, 0) > c.number for c in t.compares)
        for op in t.success if ok else t.failure:
            if op.kind == OpKind.PUT:
                state[op.key] = op.value
                version[op.key] = version.get(op.key, gone.pop(op.key, 0)) + 1
                out.append((op.kind, False, b"", 0))
            elif op.kind == OpKind.DELETE:
                out.append((op.kind, state.pop(op.key, None) is not None, b"", 0))
                version.pop(op.key, None)
            elif op.kind == OpKind.GET:
                v = state.get(op.key)
                out.append((op.kind, v is not None, v or b"", version.get(op.key, 0)))
            elif op.kind == OpKind.DELETE_RANGE:
                deleted = [k for k in state if txn.in_range(k, op.key, op.end)]
                for k in deleted:
                    del state[k]
                    gone[k] = version.pop(k)
                out.append((op.kind, False, b"", len(deleted)))
            else:
                assert op.txn is not None
                out.append((op.kind, False, b"", 0))
                run(op.txn)
        return ok

    return out, run(t)


def flatten(r: TxnResult) -> list[tuple[OpKind, bool, bytes, int]]:
    out: list[tuple[OpKind, bool, bytes, int]] = []
    for o in r.responses:
        out.append((o.kind, o.found if o.kind != OpKind.PUT else False, o.value,
                    o.version if o.kind == OpKind.GET else o.deleted))
        if o.txn is not None:
            out += flatten(o.txn)
    return out


def commit_rule(base: dict[bytes, bytes], out: txn.Outcome) -> dict[bytes, bytes]:
    """What the COMMITs make of `base` (xtxn_apply's rule): the writes, then every other key
    present in one of the ranges deleted."""
    final = dict(base)
    named = {k for k, _ in out.writes}
    for k, v in out.writes:
        if v is None:
            final.pop(k, None)
        else:
            final[k] = v
    for k in list(final):
        if k in base and k not in named and any(txn.in_range(k, lo, hi) for lo, hi in out.ranges):
            del final[k]
    return final


@settings(max_examples=400, deadline=None)
@given(txn_st, base_st)
def test_evaluate_is_sequential_over_range_deletes(t: Txn, base: dict[bytes, bytes]) -> None:
    try:
        txn.check_txn(t)
    except ValueError:
        assume(False)
    R = 1000

    def read(k: bytes) -> txn.Current | None:
        return txn.Current(base[k], 5, 5, 1) if k in base else None

    out = txn.evaluate(t, read, R, lambda lo, hi: [k for k in base if txn.in_range(k, lo, hi)])
    state = dict(base)
    want, ok = model(t, state)
    assert out.result.succeeded == ok
    assert flatten(out.result) == want
    assert commit_rule(base, out) == state
    assert len({k for k, _ in out.writes}) == len(out.writes)  # each key once: one version at R
    deleted = any(k not in state for k in base)
    ranged = any(d for kind, _, _, d in want if kind == OpKind.DELETE_RANGE)
    assert (out.result.revision == R) == bool(out.writes or ranged or deleted)
    if not txn.has_delete_range(t):  # without one: exactly the old behaviour
        assert not out.ranges


def test_range_delete_semantics_spelled_out() -> None:
    base = {b"p/1": b"x", b"p/2": b"y", b"q": b"z"}
    t = Txn((), (TxnOp(OpKind.PUT, b"p/3", b"new"), TxnOp(OpKind.GET, b"p/1"),
                 TxnOp(OpKind.DELETE_RANGE, b"p/", end=b"p0"), TxnOp(OpKind.GET, b"p/1"),
                 TxnOp(OpKind.PUT, b"p/2", b"again"), TxnOp(OpKind.GET, b"p/2")))
    out = txn.evaluate(t, lambda k: txn.Current(base[k], 1, 1, 1) if k in base else None, 77,
                       lambda lo, hi: [k for k in base if txn.in_range(k, lo, hi)])
    kinds = [(o.kind, o.found, o.value, o.deleted) for o in out.result.responses]
    assert kinds == [(OpKind.PUT, False, b"", 0), (OpKind.GET, True, b"x", 0), (OpKind.DELETE_RANGE, False, b"", 3),
                     (OpKind.GET, False, b"", 0), (OpKind.PUT, False, b"", 0), (OpKind.GET, True, b"again", 0)]
    again = out.result.responses[-1]  # p/2 deleted by the range, put again: its next version (1 + 1)
    assert (again.create_revision, again.mod_revision, again.version) == (1, 77, 2)
    assert out.writes == [(b"p/3", None), (b"p/2", b"again")] and out.ranges == [(b"p/", b"p0")]
    assert out.result.revision == 77
    with pytest.raises(txn.NoScanner):  # a one-group evaluation has no scanner
        txn.evaluate(t, lambda k: None, 77)


# --- codecs ----------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(txn_st)
def test_txn_with_range_deletes_round_trips(t: Txn) -> None:
    try:
        raw = txn.encode_txn(t)
    except ValueError:
        assume(False)
    assert txn.decode_txn(raw) == t


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.integers(0, 79), st.integers(0, 255))
def test_txn_decoders_are_total_on_range_deletes(data: bytes, i: int, b: int) -> None:
    good = txn.encode_txn(Txn((), (TxnOp(OpKind.DELETE_RANGE, b"a", end=b"b"),)))
    res = txn.encode_txn_result(TxnResult(True, (OpResult(OpKind.DELETE_RANGE, deleted=3),), 9))
    for raw in (data, good + data, res + data):
        mangled = bytearray(raw)
        if mangled:
            mangled[i % len(mangled)] = b
        for blob in (bytes(raw), bytes(mangled)):
            with contextlib.suppress(ValueError):
                txn.decode_txn(blob)
            with contextlib.suppress(ValueError):
                txn.decode_txn_result(blob)


def test_range_checks() -> None:
    for bad in (TxnOp(OpKind.DELETE_RANGE), TxnOp(OpKind.DELETE_RANGE, b"b", end=b"a"),
                TxnOp(OpKind.DELETE_RANGE, b"a", end=b"a"), TxnOp(OpKind.DELETE_RANGE, b"a", b"v"),
                TxnOp(OpKind.DELETE_RANGE, b"x" * 5000), TxnOp(OpKind.PUT, b"a", b"v", end=b"b")):
        with pytest.raises(ValueError):
            txn.encode_txn(Txn((), (bad,)))
    # a range may overlap the transaction's own writes (sequential), unlike two puts of one key
    txn.check_txn(Txn((), (TxnOp(OpKind.PUT, b"a", b"1"), TxnOp(OpKind.DELETE_RANGE, b"a", end=b"b"))))
    assert txn.range_hull(Txn((), (TxnOp(OpKind.DELETE_RANGE, b"b", end=b"c"),),
                              (TxnOp(OpKind.DELETE_RANGE, b"a", end=b"bb"),))) == (b"a", b"c")
    assert txn.range_hull(Txn((), (TxnOp(OpKind.DELETE_RANGE, b"b"), TxnOp(OpKind.DELETE_RANGE, b"a", end=b"c")))) \
        == (b"a", b"")
    assert list(txn.keys_of(Txn((), (TxnOp(OpKind.DELETE_RANGE, b"a", end=b"b"),)))) == []


ids_st = st.builds(TxnId, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
ranges_st = st.lists(range_st(), min_size=1, max_size=3, unique=True).map(tuple)
writes_st = st.lists(st.tuples(key_st, st.none() | st.binary(max_size=4)), max_size=3, unique_by=lambda w: w[0])


def _leased_of(ws: list[tuple[bytes, bytes | None]], pick: list[bool]) -> tuple[xtxn.Leased, ...]:
    """Leased puts (the combined form, tails 3 and 4) for the puts `pick` marks."""
    return tuple((k, 0x1001 + i, i) for i, ((k, v), on) in enumerate(zip(ws, pick, strict=False)) if on and v is not None)


picks_st = st.lists(st.booleans(), max_size=3)
xcmd_st = st.one_of(
    st.builds(lambda t, a, ws, rs, pk: XCmd(XOp.COMMIT, t, at=a, writes=tuple(ws), ranges=rs,
                                            leased=_leased_of(ws, pk)),
              ids_st, st.integers(0, mvcc.REVISION_MAX), writes_st, ranges_st, picks_st),
    st.builds(lambda t, a, ws, rs, pk: XCmd(XOp.RECORD, t, start=START, at=a, groups=((1, tuple(ws)), (2, ())),
                                            result=TxnResult(True, (OpResult(OpKind.DELETE_RANGE, deleted=2),), a),
                                            ranges=rs, leased=_leased_of(ws, pk)),
              ids_st, st.integers(0, mvcc.REVISION_MAX), writes_st, ranges_st, picks_st),
)


@settings(max_examples=150, deadline=None)
@given(xcmd_st, st.data())
def test_cross_commands_with_ranges_round_trip_and_mangled_raise_value_error(x: XCmd, data: st.DataObject) -> None:
    raw = encode_command(Command.cross(x))
    assert decode_command(raw).x == x
    rec = Record(State.COMMITTED, START, x.at, x.result, x.groups or ((1, x.writes),), False, x.leased, x.ranges)
    assert xtxn.decode_record(xtxn.encode_record(rec)) == rec
    for blob in (raw, xtxn.encode_record(rec)):
        b = bytearray(blob)
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(b)))
        for m in (bytes(b), bytes(b[:cut])):
            with contextlib.suppress(ValueError):
                decode_command(m)
            with contextlib.suppress(ValueError):
                xtxn.decode_record(m)
            with contextlib.suppress(ValueError):
                xtxn.check_rows(mvcc.T_TXN, xtxn.row_record(TxnId(1, 1)), m)


def test_the_ranges_tail_is_refused_where_it_does_not_belong() -> None:
    t = TxnId(1, 1)
    with pytest.raises(ValueError):  # never with tail 2
        xtxn.encode_body(XCmd(XOp.COMMIT, t, at=5, delete_prepared=True, ranges=((b"a", b"b"),)))
    with pytest.raises(ValueError):  # nor on a lease's deletion
        xtxn.encode_body(XCmd(XOp.RECORD, t, start=START, at=5, lease=leases.make_id(1, 1), ranges=((b"a", b""),)))
    with pytest.raises(ValueError):
        xtxn.encode_body(XCmd(XOp.COMMIT, t, at=5, ranges=((b"b", b"a"),)))
    with pytest.raises(ValueError):
        xtxn.encode_body(XCmd(XOp.PREPARE, t, 1, START, keys=(b"a",), ranges=((b"a", b"b"),)))
    with pytest.raises(ValueError):  # tail 2 then 3: one tail only
        xtxn.decode_body(XOp.COMMIT, t.encode() + (5).to_bytes(8, "big") + b"\x00\x00\x02\x03\x00\x01\x00\x01a\x00\x00")


# --- the feature level -----------------------------------------------------------------------------
def test_the_forms_need_level_6_and_the_gate_refuses_them_below() -> None:
    t = Txn((), (TxnOp(OpKind.DELETE_RANGE, b"a", end=b"b"),))
    data = encode_command(Command.transaction(t))
    commit = encode_command(Command.cross(XCmd(XOp.COMMIT, TxnId(1, 1), at=5, ranges=((b"a", b"b"),))))
    plain = encode_command(Command.cross(XCmd(XOp.COMMIT, TxnId(1, 1), at=5)))
    assert command_level(data) == command_level(commit) == LEVEL_TXN_RANGES
    assert command_level(plain) < LEVEL_TXN_RANGES
    gate = CommandGate(lambda: ClusterVersion(LEVEL_LEASES_2, {1: LEVEL_LEASES_2}), lambda: {1}).check
    for d in (data, commit):
        with pytest.raises(errors.ClusterVersionTooLow) as err:
            gate(d)
        assert not err.value.indeterminate and "range delete" in err.value.message
    gate(plain)
    CommandGate(lambda: ClusterVersion(LEVEL_TXN_RANGES, {1: LEVEL_TXN_RANGES}), lambda: {1}).check(data)
    # a one-group TXN with one is refused at apply, changing nothing
    s = DictState(group=1)
    s.apply(encode_command(Command.put(b"a1", b"v")))
    res = s.apply(data)
    assert res.error == ONE_GROUP_RANGE_DELETE and s.get(b"a1") == b"v"


# --- the two-phase commit over three groups ------------------------------------------------------
GROUPS = (1, 2, 3)


def groups_with(data: dict[int, dict[bytes, bytes]]) -> dict[int, DictState]:
    g = {gid: DictState(group=gid) for gid in GROUPS}
    for gid, kvs in data.items():
        for k, v in kvs.items():
            assert g[gid].apply(encode_command(Command.put(k, v))).error is None
    return g


def prepared(g: dict[int, DictState], t: Txn, group_of: dict[bytes, int], tid: TxnId
             ) -> tuple[logic.Plan, logic.Conflict | logic.Refused | logic.Ready]:
    p = logic.plan_ranges(t, [(k, group_of[k]) for k, _ in txn.keys_of(t)], GROUPS)
    cmds = logic.prepare_commands(p, tid, START, 0)
    assert sorted(cmds) == list(GROUPS)  # every group takes part
    results = {gid: g[gid].apply(data) for gid, data in cmds.items()}
    return p, logic.after_prepare(t, p, results)


def test_a_transaction_deletes_a_range_in_every_group_at_one_revision() -> None:
    g = groups_with({1: {b"p/1": b"x", b"k": b"0"}, 2: {b"p/2": b"x", b"q/1": b"x"}, 3: {b"p/3": b"x"}})
    lid = leases.make_id(3, 9)
    assert g[3].apply(encode_command(Command.lease_command(LeaseCmd(Kind.GRANT, lid, ttl_s=60)))).found
    assert g[3].apply(encode_command(Command.lease_command(LeaseCmd(Kind.PUT, lid), b"p/4", b"l"))).error is None
    before = {gid: mvcc.rev_state(s.rows).last for gid, s in g.items()}
    m0 = mvcc.current_meta(g[2].rows, b"p/2", g[2].get(b"p/2"))
    assert m0 is not None
    before_create = m0.create_revision
    t = Txn((Compare(b"k", Target.VALUE, CmpResult.EQUAL, b"0"),),
            (TxnOp(OpKind.PUT, b"p/1", b"kept?"), TxnOp(OpKind.DELETE_RANGE, b"p/", end=b"p0"),
             TxnOp(OpKind.GET, b"p/1"), TxnOp(OpKind.PUT, b"p/9", b"new"), TxnOp(OpKind.PUT, b"k", b"1"),
             TxnOp(OpKind.PUT, b"p/2", b"back"), TxnOp(OpKind.GET, b"p/2")))
    tid = TxnId(7, 7)
    p, ready = prepared(g, t, {b"k": 1, b"p/1": 1, b"p/9": 2, b"p/2": 2}, tid)
    assert p.primary == 1 and p.lock == (b"p/", b"p0")
    assert isinstance(ready, logic.Ready) and ready.ranges == ((b"p/", b"p0"),)
    R = ready.at
    dr = ready.result.responses[1]
    assert dr.kind == OpKind.DELETE_RANGE and dr.deleted == 4  # p/1 (put before it), p/2, p/3, p/4
    assert not ready.result.responses[2].found
    # the range is locked in every group meanwhile, against writes and other range deletes
    r = g[2].apply(encode_command(Command.put(b"p/new", b"x")))
    assert r.error is not None and r.error.startswith(xtxn.LOCKED)
    other = g[3].apply(encode_command(Command.cross(XCmd(XOp.PREPARE, TxnId(8, 8), 3, START, lock=(b"p/3", b"")))))
    assert other.error is not None and other.error.startswith(xtxn.LOCKED)
    assert logic.after_record(tid, g[1].apply(logic.record_command(tid, START, ready))) == \
        logic.Committed(R, ready.result, True)
    for gid, data in logic.commit_commands(tid, ready, GROUPS).items():
        assert g[gid].apply(data).error is None
    assert [g[1].get(b"p/1"), g[3].get(b"p/3"), g[3].get(b"p/4")] == [None] * 3
    # deleted by the range and put again: one version at R, the key's next, as the GET said
    back = ready.result.responses[-1]
    meta = mvcc.current_meta(g[2].rows, b"p/2", g[2].get(b"p/2"))
    assert g[2].get(b"p/2") == back.value == b"back" and meta is not None
    assert (meta.create_revision, meta.mod_revision, meta.version) == \
        (back.create_revision, back.mod_revision, back.version) == (before_create, R, 2)
    assert g[2].get(b"p/9") == b"new" and g[2].get(b"q/1") == b"x" and g[1].get(b"k") == b"1"
    assert leases.lease_of(g[3].rows, b"p/4") == 0 and leases.attached_keys(g[3].rows, lid) == []
    for gid, gone in ((1, [b"k", b"p/1"]), (2, [b"p/2", b"p/9"]), (3, [b"p/3", b"p/4"])):  # p/2: put again
        batch = read_changes(g[gid].rows, before[gid] + 1, mvcc.REVISION_MAX, max_events=100, max_bytes=1 << 20,
                             prev_kv=False)
        assert sorted(c.key for c in batch.changes) == gone and {c.revision for c in batch.changes} == {R}
        assert all(c.value is None for c in batch.changes if c.key not in (b"k", b"p/9", b"p/2"))
        assert xtxn_apply.min_pending(g[gid].rows) == 0 and not list(g[gid].rows.iter(mvcc.T_TXN, b"l", b"m"))
    # the next writer into the range goes through
    assert g[2].apply(encode_command(Command.put(b"p/new", b"x"))).error is None


def test_a_branch_without_the_range_delete_leaves_the_range_alone() -> None:
    g = groups_with({1: {b"p/1": b"x"}, 2: {b"k": b"0"}})
    t = Txn((Compare(b"k", Target.VALUE, CmpResult.EQUAL, b"nope"),),
            (TxnOp(OpKind.DELETE_RANGE, b"p/", end=b"p0"),), (TxnOp(OpKind.GET, b"p/1"),))
    _p, ready = prepared(g, t, {b"k": 2, b"p/1": 1}, TxnId(1, 2))
    assert isinstance(ready, logic.Ready) and not ready.result.succeeded and not ready.writes_anything
    assert ready.result.responses[0].found


def test_the_range_conflicts_with_intents_and_the_bound_is_the_standalone_ones() -> None:
    g = groups_with({1: {b"p/1": b"x"}, 2: {b"p/2": b"y"}})
    held = g[2].apply(encode_command(Command.cross(XCmd(XOp.PREPARE, TxnId(9, 9), 2, START, keys=(b"p/2",)))))
    assert held.error is None
    t = Txn((), (TxnOp(OpKind.DELETE_RANGE, b"p/", end=b"p0"),))
    _p, dec = prepared(g, t, {}, TxnId(1, 3))
    assert isinstance(dec, logic.Conflict) and dec.key == b"p/2" and dec.intent.txn == TxnId(9, 9)
    # more keys than a range delete may cover in a group: refused (definite), nothing written
    big = groups_with({3: {b"r/%05d" % i: b"v" for i in range(xtxn_apply.MAX_RANGE_KEYS + 1)}})
    t2 = Txn((), (TxnOp(OpKind.DELETE_RANGE, b"r/"),))
    _p, dec2 = prepared(big, t2, {}, TxnId(1, 4))
    assert isinstance(dec2, logic.Refused) and str(xtxn_apply.MAX_RANGE_KEYS) in dec2.message


@pytest.mark.parametrize("commits_before_death", [0, 1])
def test_resolvers_commit_a_dead_coordinators_range_deletes(commits_before_death: int) -> None:
    g = groups_with({1: {b"k": b"0"}, 2: {b"p/2": b"x"}, 3: {b"p/3": b"x", b"p/4": b"x"}})
    t = Txn((), (TxnOp(OpKind.DELETE_RANGE, b"p/", end=b"p0"), TxnOp(OpKind.PUT, b"k", b"1")))
    tid = TxnId(3, 3)
    _p, ready = prepared(g, t, {b"k": 1}, tid)
    assert isinstance(ready, logic.Ready)
    assert isinstance(logic.after_record(tid, g[1].apply(logic.record_command(tid, START, ready))), logic.Committed)
    for gid, data in list(logic.commit_commands(tid, ready, GROUPS).items())[:commits_before_death]:
        assert g[gid].apply(data).error is None
    # the coordinator died: a writer meets the intents in groups 2 and 3 and resolves them
    for gid, key in ((2, b"p/2"), (3, b"p/new")):
        met = logic.lock_of(g[gid].apply(encode_command(Command.put(key, b"w"))))
        assert met is not None
        intent = met[1]
        follow = logic.resolution(intent, gid, g[intent.primary].apply(logic.resolve_command(intent)))
        assert follow is not None and decode_command(follow).x.ranges == ((b"p/", b"p0"),)  # type: ignore[union-attr]
        assert g[gid].apply(follow).error is None
    assert g[2].get(b"p/2") is None and g[3].get(b"p/3") is None and g[3].get(b"p/4") is None
    for gid in (2, 3):
        batch = read_changes(g[gid].rows, 1, mvcc.REVISION_MAX, max_events=100, max_bytes=1 << 20, prev_kv=False)
        assert {c.revision for c in batch.changes if c.value is None} == {ready.at}


# --- kvctl txn's del forms (etcdctl's getDelOp) ----------------------------------------------------
def test_txnparse_del_forms() -> None:
    def ops(line: str) -> tuple[Op, ...]:
        return parse_txn(f"\n{line}\n", lambda s: s.encode()).success

    assert ops("del a") == (Op.delete(b"a"),)
    assert ops("del a c") == (Op.delete_range(b"a", b"c"),)
    assert ops("del --range a c") == (Op.delete_range(b"a", b"c"),)
    assert ops('del a ""') == (Op.delete(b"a"),)
    assert ops("del --prefix p/") == ops("del p/ --prefix") == (Op.delete_range(b"", prefix=b"p/"),)
    assert ops('del --prefix ""') == ops('del --from-key ""') == (Op.delete_range(b"\x00"),)
    assert ops("del --from-key m") == (Op.delete_range(b"m"),)
    for bad in ("del --prefix --from-key a", "del --prefix a b", "del --from-key a b", "del --prev-kv a",
                "del", "del a b c", "put a b --lease=zz"):
        with pytest.raises(TxnSyntaxError):
            ops(bad)


def test_a_prefix_op_is_checked_on_the_client() -> None:
    from kvstore.client.checks import RequestChecks
    from kvstore.client.txns import first_key, txn_body

    checks = RequestChecks(timeout=1.0, max_key_size=16, max_value_size=16)
    b = txn_body(checks, (), (Op.delete_range(b"", prefix=b"p/"), Op.delete_range(b"a", b"c")), ())
    assert b.success[0].delete_range.prefix == b"p/" and b.success[1].delete_range.end == b"c"
    assert first_key(b) == b"p/"
    for bad in (Op.delete_range(b""), Op.delete_range(b"b", b"a"), Op.delete_range(b"a", prefix=b"p"),
                Op.delete_range(b"x" * 17)):
        with pytest.raises((errors.InvalidArgument, errors.KeyTooLarge)):
            txn_body(checks, (), (bad,), ())


def test_the_record_keeps_its_ranges_through_a_partial_finalize() -> None:
    s = DictState(group=1)
    tid = TxnId(4, 4)
    res = TxnResult(True, (OpResult(OpKind.DELETE_RANGE, deleted=1),), 0)
    rec = XCmd(XOp.RECORD, tid, start=START, at=mvcc.make_revision(mvcc.EPOCH_MS + 2000, 0, 1), result=res,
               groups=((1, ()), (2, ())), ranges=((b"a", b"b"),))
    assert s.apply(encode_command(Command.cross(rec))).error is None
    assert s.apply(logic.finalize_command(tid, 1)).error is None
    left = xtxn_apply.record_of(s.rows, tid)
    assert left is not None and left.state == State.COMMITTED and left.ranges == ((b"a", b"b"),)
    assert logic.finish_commands(tid, left) == {
        2: encode_command(Command.cross(XCmd(XOp.COMMIT, tid, at=rec.at, ranges=((b"a", b"b"),))))}


# --- the etcd layer's mapping (server/etcd/convert.py) -----------------------------------------------
def test_etcd_txn_delete_range_maps_to_the_op() -> None:
    from kvstore.etcdpb.etcdserverpb import rpc_pb2
    from kvstore.server.etcd.convert import EtcdRequestError, txn_body, txn_reply
    from kvstore.txnscan import has_range_deletes
    from kvstore.v1 import kv_pb2

    def dr(key: bytes, end: bytes, prev: bool = False) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=end, prev_kv=prev))

    def put(key: bytes) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"v"))

    body, plan = txn_body(rpc_pb2.TxnRequest(success=[dr(b"a/", b"a0"), put(b"b")], failure=[dr(b"\0", b"\0")]))
    assert body.success[0].delete_range == kv_pb2.TxnRange(start=b"a/", end=b"a0")
    assert body.failure[0].delete_range == kv_pb2.TxnRange(start=b"\0", end=b"") and has_range_deletes(body)
    res = kv_pb2.TxnResult(succeeded=True, responses=[kv_pb2.TxnOpResponse(delete_range=4), kv_pb2.TxnOpResponse(put=9)])
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, res, rpc_pb2.ResponseHeader(revision=9), out)
    assert out.responses[0].response_delete_range.deleted == 4 and out.responses[1].HasField("response_put")
    for bad, code in (([dr(b"a/", b"a0"), put(b"a/x")], "INVALID_ARGUMENT"),
                      ([put(b"a/x"), dr(b"a/", b"a0")], "INVALID_ARGUMENT")):
        with pytest.raises(EtcdRequestError) as e:
            txn_body(rpc_pb2.TxnRequest(success=bad))
        assert e.value.code == code
    # prev_kv: its range read right before it (an external range), the prev_kvs from its answer
    body, plan = txn_body(rpc_pb2.TxnRequest(success=[dr(b"a/", b"a0", prev=True)]))
    assert plan.sequential and plan.success[0].prev_range == 0 and len(plan.ranges) == 1
    kv = kv_pb2.KeyValue(key=b"a/1", value=b"v", create_revision=2, mod_revision=3, version=2)
    out = rpc_pb2.TxnResponse()
    txn_reply(plan, kv_pb2.TxnResult(succeeded=True, responses=[kv_pb2.TxnOpResponse(delete_range=1)]),
              rpc_pb2.ResponseHeader(revision=9), out, {0: ([kv], 1, {})})
    d = out.responses[0].response_delete_range
    assert d.deleted == 1 and [(x.key, x.value, x.version) for x in d.prev_kvs] == [(b"a/1", b"v", 2)]
    # a read over the range before it: read at its place (before the delete), as etcd's
    rng = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"a/", range_end=b"a0"))
    assert txn_body(rpc_pb2.TxnRequest(success=[rng, dr(b"a/", b"a0")]))[1].sequential


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12), st.binary(max_size=12), st.binary(max_size=12))
def test_the_wire_range_is_checked_totally(start: bytes, end: bytes, prefix: bytes) -> None:
    """`TxnRange` from the wire (`server/txn_wire.range_of`) and from the client (`client/txns`):
    a valid range or a definite KVError, never anything else; both sides agree."""
    from kvstore.client.checks import RequestChecks
    from kvstore.client.txns import txn_body
    from kvstore.server.txn_wire import range_of

    def check_key(k: bytes) -> None:
        if len(k) > 8:
            raise errors.KeyTooLarge(len(k), 8)

    try:
        lo, hi = range_of(start, end, prefix, check_key)
    except errors.KVError as err:
        assert err.definite
        server_ok = False
    else:
        txn.check_range(lo, hi)
        assert all(txn.in_range(prefix + x, lo, hi) for x in (b"", b"\x00", b"\xff")) if prefix else (lo, hi) == (
            start, end)
        server_ok = True
    checks = RequestChecks(timeout=1.0, max_key_size=8, max_value_size=8)
    try:
        txn_body(checks, (), (Op.delete_range(start, end, prefix=prefix),), ())
        client_ok = True
    except errors.KVError as err:
        assert err.definite
        client_ok = False
    assert client_ok == server_ok


def test_scans_and_range_deletes_in_one_transaction() -> None:
    """txnscan's split (`kvstore/txnscan.split`, client and server): scans and range deletes in
    one transaction, in any order, are split apart (each scan shows the state at its place on the
    path: `kvstore/txnpath.py`); a range delete alone passes through untouched."""
    from kvstore.txnscan import split
    from kvstore.v1 import kv_pb2

    def body(*ops: kv_pb2.TxnOp) -> kv_pb2.TxnBody:
        return kv_pb2.TxnBody(success=list(ops))

    dr = kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(prefix=b"a/"))
    out, plan = split(body(dr, kv_pb2.TxnOp(get=b"a/1")), 64)
    assert list(out.success) == [dr, kv_pb2.TxnOp(get=b"a/1")] and not plan.scans
    for scan in (kv_pb2.TxnScan(start=b"a/5"), kv_pb2.TxnScan(prefix=b"b/")):
        out, plan = split(body(kv_pb2.TxnOp(scan=scan), dr), 64)
        assert list(out.success) == [dr] and len(plan.scans) == 1
    out, plan = split(kv_pb2.TxnBody(success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"b/"))],
                                     failure=[kv_pb2.TxnOp(txn=body(dr))]), 64)
    assert list(out.failure) == [kv_pb2.TxnOp(txn=body(dr))] and len(plan.scans) == 1
