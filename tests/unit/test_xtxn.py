"""Transactions across groups in the state machine: the PREPARE .. FINALIZE commands' codecs
(round trips, hostile bytes: every decoder total) and their apply semantics on `DictState`
(intents lock writes without caching the refusal, a commit at R below the group's last revision
is exact at every revision, abort, the record as the commit point against a resolver, the age
rule, idempotency, compaction and range moves held back by intents)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import leases, mvcc, xtxn, xtxn_apply
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
from kvstore.storage.machine import DictState, UnknownCommandKind
from kvstore.storage.shardcmd import ShardOp, ShardState, encode_shard_command
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.txn import OpKind, OpResult, Txn, TxnOp, TxnResult
from kvstore.storage.xtxn import Intent, Record, State, TxnId, XCmd, XOp

T1, T2 = TxnId(1, 1), TxnId(2, 7)
START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)

keys_st = st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=5, unique=True)
writes_st = st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.none() | st.binary(max_size=20)),
                     max_size=5, unique_by=lambda w: w[0])
ids_st = st.builds(TxnId, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
revs_st = st.integers(0, mvcc.REVISION_MAX)
lease_st = st.builds(leases.make_id, st.integers(1, 4095), st.integers(0, 1 << 70))
result_st = st.none() | st.just(TxnResult(True, (OpResult(OpKind.PUT),), 5))
lock_st = st.none() | st.tuples(st.binary(max_size=8), st.binary(max_size=8)).map(
    lambda r: (r[0], r[1] if not r[1] or r[1] > r[0] else b""))
xcmd_st = st.one_of(
    st.builds(lambda t, p, s, ks, lk: XCmd(XOp.PREPARE, t, p, s, keys=tuple(ks), lock=lk), ids_st,
              st.integers(0, 4095), revs_st, keys_st, lock_st),
    st.builds(lambda t, p, s, lk: XCmd(XOp.PREPARE, t, p, s, lock=lk), ids_st, st.integers(0, 4095), revs_st,
              st.tuples(st.binary(max_size=8), st.just(b""))),
    st.builds(lambda t, a, ws: XCmd(XOp.COMMIT, t, at=a, writes=tuple(ws)), ids_st, revs_st, writes_st),
    st.builds(lambda t: XCmd(XOp.ABORT, t), ids_st),
    st.builds(lambda t, g: XCmd(XOp.FINALIZE, t, group=g), ids_st, st.integers(0, mvcc.MAX_GROUPS - 1)),
    st.builds(lambda t, a: XCmd(XOp.COMMIT, t, at=a, delete_prepared=True), ids_st, revs_st),
    st.builds(lambda t, s, a, n: XCmd(XOp.RECORD, t, start=s, at=a, groups=tuple((i, ()) for i in range(n)),
                                      delete_prepared=True), ids_st, revs_st, revs_st, st.integers(0, 3)),
    st.builds(lambda t, s: XCmd(XOp.RESOLVE, t, start=s), ids_st, revs_st),
    # a lease's deletion: PREPARE range flag 2; RECORD with the lease tail, alone or before tail 2
    st.builds(lambda t, p, s, lid: XCmd(XOp.PREPARE, t, p, s, lease=lid), ids_st, st.integers(0, 4095), revs_st,
              lease_st),
    st.builds(lambda t, s, a, lid, r, n, every: XCmd(XOp.RECORD, t, start=s, at=a, lease=lid, renews=r,
                                                     groups=tuple((i, ()) for i in range(n)), delete_prepared=every),
              ids_st, revs_st, revs_st, lease_st, st.integers(0, (1 << 64) - 1), st.integers(0, 3), st.booleans()),
    st.builds(lambda t, s, a, r, g: XCmd(XOp.RECORD, t, start=s, at=a, result=r,
                                         groups=tuple((i, tuple(ws)) for i, ws in enumerate(g))),
              ids_st, revs_st, revs_st, result_st, st.lists(writes_st, max_size=3)),
)


def cmd(x: XCmd, revision: int = 0, cid: int = 0, seq: int = 0) -> bytes:
    return encode_command(Command.cross(x, cid, seq, seq, revision))


@settings(max_examples=150, deadline=None)
@given(xcmd_st)
def test_cross_commands_round_trip(x: XCmd) -> None:
    rev = 5 if x.op == XOp.PREPARE else 0
    cid = 3 if x.op == XOp.RECORD else 0
    c = decode_command(cmd(x, rev, cid, 4 if cid else 0))
    assert c.op == Op(int(x.op)) and c.x == x and c.revision == rev and c.client_id == cid


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(XOp)), st.binary(max_size=200))
def test_every_decoder_is_total(op: XOp, data: bytes) -> None:
    for f in (lambda: xtxn.decode_body(op, data), lambda: xtxn.decode_record(data), lambda: xtxn.decode_lock(data),
              lambda: xtxn.Intent.decode(data), lambda: xtxn.decode_range_lock(data), lambda: xtxn.decode_found(data),
              lambda: xtxn.decode_txn_keys(data), lambda: xtxn.decode_lease_lock(data), lambda: xtxn.check_rows(mvcc.T_TXN, data[:25], data[25:]),
              lambda: xtxn.check_rows(mvcc.T_INTENTS, data[:8], data[8:])):
        with contextlib.suppress(ValueError):
            f()


@settings(max_examples=200, deadline=None)
@given(xcmd_st, st.data())
def test_mangled_commands_decode_or_raise_value_error(x: XCmd, data: st.DataObject) -> None:
    raw = bytearray(cmd(x, 5 if x.op == XOp.PREPARE else 0))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for b in (bytes(raw), bytes(raw[:cut])):
        with contextlib.suppress(ValueError):
            decode_command(b)
        # applying garbage answers an error (or stops, for a kind this release does not know)
        s = DictState()
        with contextlib.suppress(UnknownCommandKind):
            s.apply(b)


def test_encoders_refuse_what_decoders_refuse() -> None:
    with pytest.raises(ValueError):
        xtxn.encode_body(XCmd(XOp.PREPARE, T1, 1, START, keys=()))
    with pytest.raises(ValueError):
        xtxn.encode_body(XCmd(XOp.PREPARE, T1, 1, START, keys=(b"a", b"a")))
    with pytest.raises(ValueError):
        xtxn.encode_body(XCmd(XOp.ABORT, T1, at=5))
    with pytest.raises(ValueError):
        xtxn.encode_body(XCmd(XOp.COMMIT, T1, at=5, writes=((b"a", b"1"), (b"a", None))))
    with pytest.raises(ValueError):  # a session on anything but RECORD
        encode_command(Command.cross(XCmd(XOp.ABORT, T1), client_id=3, seq=1))
    with pytest.raises(ValueError):  # a revision on anything but PREPARE
        encode_command(Command.cross(XCmd(XOp.COMMIT, T1, at=5), revision=9))
    with pytest.raises(ValueError):  # op and body disagree
        encode_command(Command(Op.COMMIT, b"", x=XCmd(XOp.ABORT, T1)))


# --- apply ---------------------------------------------------------------------------------------
def state(group: int = 1) -> DictState:
    return DictState(group=group)


def prepare(s: DictState, t: TxnId, keys: tuple[bytes, ...], proposed: int = 0, primary: int = 1,
            start: int = START) -> ApplyResult:
    return s.apply(cmd(XCmd(XOp.PREPARE, t, primary, start, keys=keys), proposed))


def last(s: DictState) -> int:
    return mvcc.rev_state(s.rows).last


def test_prepare_reserves_a_revision_and_answers_the_values() -> None:
    s = state()
    r0 = s.apply(encode_command(Command.put(b"a", b"old")))
    res = prepare(s, T1, (b"a", b"b"))
    assert res.error is None and res.revision > r0.revision and last(s) == res.revision
    assert res.txn is not None and res.txn.revision == res.revision
    a, b = res.txn.responses
    assert a.found and a.value == b"old" and a.mod_revision == r0.revision and not b.found
    again = prepare(s, T1, (b"b", b"a"))  # idempotent: the same reservation
    assert again.revision == res.revision and last(s) == res.revision
    assert prepare(s, T1, (b"a",)).error is not None  # other keys than it prepared
    assert xtxn_apply.min_pending(s.rows) == res.revision


def test_an_intent_refuses_other_writes_without_caching_the_refusal() -> None:
    s = state()
    p = prepare(s, T1, (b"a",))
    for c in (Command.put(b"a", b"x", 5, 1, 1), Command.delete(b"a"), Command.cas(b"a", True, b"", b"v"),
              Command.transaction(Txn(success=(TxnOp(OpKind.GET, b"a"),)), 5, 2, 1)):
        r = s.apply(encode_command(c))
        assert r.error is not None and r.error.startswith(xtxn.LOCKED) and r.current is not None
        key, intent = xtxn.decode_lock(r.current)
        assert key == b"a" and intent == Intent(T1, 1, START, p.revision)
    assert s.session_result(5, 1) is None and s.session_result(5, 2) is None
    other = prepare(s, T2, (b"b", b"a"))
    assert other.error is not None and other.error.startswith(xtxn.LOCKED)
    assert s.rows.get(mvcc.T_INTENTS, b"b") is None  # the refused PREPARE changed nothing
    s.apply(cmd(XCmd(XOp.ABORT, T1)))
    assert s.apply(encode_command(Command.put(b"a", b"x", 5, 1, 1))).error is None  # the retry applies now
    assert xtxn_apply.min_pending(s.rows) == 0


def test_a_commit_below_last_is_exact_at_every_revision() -> None:
    s = state(group=1)
    w0 = s.apply(encode_command(Command.put(b"a", b"v0"))).revision
    p = prepare(s, T1, (b"a", b"new")).revision
    w1 = s.apply(encode_command(Command.put(b"z", b"other", revision=p + 4096 * 10))).revision  # writes go on
    assert w1 > p
    at = p + 4096 * 3 + 1  # R = another group's reservation, in its slot, above p, below last
    assert p < at < w1
    r = s.apply(cmd(XCmd(XOp.COMMIT, T1, at=at, writes=((b"a", b"v1"), (b"new", b"n1")))))
    assert r.error is None and last(s) == w1  # last := max(last, R)
    assert s.get(b"a") == b"v1" and s.get(b"new") == b"n1"
    assert mvcc.version_at(s.rows, b"a", at - 1, s.get(b"a")).value == b"v0"  # type: ignore[union-attr]
    v = mvcc.version_at(s.rows, b"a", at, s.get(b"a"))
    assert v is not None and v.value == b"v1" and v.meta.mod_revision == at and v.meta.version == 2
    assert mvcc.version_at(s.rows, b"new", at - 1, s.get(b"new")) is None
    batch = read_changes(s.rows, w0 + 1, last(s), max_events=100, max_bytes=1 << 20, prev_kv=False)
    assert sorted((c.revision, c.key) for c in batch.changes) == [(at, b"a"), (at, b"new"), (w1, b"z")]
    assert s.rows.get(mvcc.T_INTENTS, b"a") is None and xtxn_apply.min_pending(s.rows) == 0
    # a duplicate COMMIT is a no-op; a late duplicate PREPARE is refused (the transaction is done)
    assert s.apply(cmd(XCmd(XOp.COMMIT, T1, at=at, writes=((b"a", b"v1"),)))).error is None
    assert s.get(b"a") == b"v1"
    assert prepare(s, T1, (b"a", b"new")).error is not None
    # the next write follows: above last
    assert s.apply(encode_command(Command.put(b"a", b"v2"))).revision > w1


def test_commit_refuses_keys_it_did_not_prepare_and_revisions_below_the_reservation() -> None:
    s = state()
    p = prepare(s, T1, (b"a",)).revision
    assert s.apply(cmd(XCmd(XOp.COMMIT, T1, at=p, writes=((b"b", b"x"),)))).error is not None
    assert s.apply(cmd(XCmd(XOp.COMMIT, T1, at=p - 1, writes=((b"a", b"x"),)))).error is not None
    assert s.apply(cmd(XCmd(XOp.COMMIT, T2, at=p, writes=()))).error is not None  # never prepared here
    assert s.get(b"a") is None and s.get(b"b") is None
    assert s.apply(cmd(XCmd(XOp.COMMIT, T1, at=p, writes=((b"a", None),)))).error is None  # delete of absent
    assert s.get(b"a") is None


def test_the_record_is_the_commit_point_against_a_resolver() -> None:
    s = state()
    res = TxnResult(True, (OpResult(OpKind.PUT),), 99)
    groups = ((1, ((b"a", b"1"),)), (2, ((b"b", b"2"),)))
    rec = s.apply(cmd(XCmd(XOp.RECORD, T1, start=START, at=99, result=res, groups=groups), cid=7, seq=1))
    assert rec.error is None and rec.revision == 99 and rec.txn == res and rec.current == T1.encode()
    # a resolver finds it committed, with the writes of its group
    got = s.apply(cmd(XCmd(XOp.RESOLVE, T1, start=START)))
    assert got.current is not None
    r = xtxn.decode_record(got.current)
    assert r.state == State.COMMITTED and r.at == 99 and r.writes_of(2) == ((b"b", b"2"),)
    # the client's retry under the same session gets the cached answer naming the first attempt
    again = s.apply(cmd(XCmd(XOp.RECORD, T2, start=START, at=123, result=None, groups=()), cid=7, seq=1))
    assert again.current == T1.encode() and again.revision == 99
    # a resolver first: the coordinator's RECORD is refused afterwards
    got = s.apply(cmd(XCmd(XOp.RESOLVE, T2, start=START)))
    assert got.current is not None and xtxn.decode_record(got.current).state == State.ABORTED
    late = s.apply(cmd(XCmd(XOp.RECORD, T2, start=START, at=5, result=None, groups=())))
    assert late.error == xtxn_apply.TXN_ABORTED
    # FINALIZE drops the writes; the record still answers committed
    s.apply(cmd(XCmd(XOp.FINALIZE, T1)))
    fin = xtxn_apply.record_of(s.rows, T1)
    assert fin is not None and fin.state == State.FINALIZED and fin.writes == ()


def test_the_age_rule_and_forgetting_old_rows() -> None:
    s = state()
    p = prepare(s, T1, (b"a",)).revision
    s.apply(cmd(XCmd(XOp.ABORT, T1)))
    s.apply(cmd(XCmd(XOp.RESOLVE, T2, start=START)))  # an ABORTED record
    assert s.rows.get(mvcc.T_TXN, xtxn.row_done(T1)) is not None
    s.apply(encode_command(Command.close(START + xtxn.MAX_AGE + 1)))
    assert prepare(s, TxnId(3, 3), (b"b",)).error == xtxn_apply.TOO_OLD
    assert s.apply(cmd(XCmd(XOp.RECORD, TxnId(3, 3), start=START, at=p))).error == xtxn_apply.TOO_OLD
    s.apply(cmd(XCmd(XOp.FINALIZE, TxnId(9, 9))))  # any command of this module collects
    assert s.rows.get(mvcc.T_TXN, xtxn.row_done(T1)) is None
    assert xtxn_apply.record_of(s.rows, T2) is None
    assert list(s.rows.iter(mvcc.T_TXN, b"", None)) == []


def test_compaction_never_passes_a_pending_reservation() -> None:
    s = state()
    s.apply(encode_command(Command.put(b"a", b"1")))
    p = prepare(s, T1, (b"a",)).revision
    for i in range(3):
        s.apply(encode_command(Command.put(b"k%d" % i, b"x")))
    r = s.apply(encode_command(Command.compact(last(s))))
    assert r.revision == p - 1
    s.apply(cmd(XCmd(XOp.COMMIT, T1, at=p, writes=((b"a", b"2"),))))
    assert mvcc.version_at(s.rows, b"a", p, s.get(b"a")).value == b"2"  # type: ignore[union-attr]
    assert s.apply(encode_command(Command.compact(last(s)))).revision == last(s)


def test_a_range_holding_intents_cannot_be_frozen() -> None:
    s = state()
    s.shard_state = ShardState(IntervalSet.full(), IntervalSet())
    prepare(s, T1, (b"a",))
    h = key_hash(b"a")
    r = IntervalSet([(h, h)])
    frz = s.apply(encode_shard_command(ShardOp.FREEZE, r, move=1))
    assert frz.error is not None and "intents" in frz.error
    s.apply(cmd(XCmd(XOp.ABORT, T1)))
    assert s.apply(encode_shard_command(ShardOp.FREEZE, r, move=1)).error is None
    assert prepare(s, T2, (b"a",)).wrong_shard  # frozen: not served


def test_results_round_trip() -> None:
    s = state()
    res = prepare(s, T1, (b"a",))
    assert decode_result(encode_result(res)) == res
    lock = s.apply(encode_command(Command.put(b"a", b"x")))
    assert decode_result(encode_result(lock)) == lock
    rec = Record(State.COMMITTED, START, 9, None, ((1, ((b"a", None),)),))
    assert xtxn.decode_record(xtxn.encode_record(rec)) == rec


# --- both node stores: apply, and snapshots carry intents ---------------------------------------
@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_node_stores_apply_and_snapshots_carry_intents(kind: str, tmp_path: Path) -> None:
    def open_(name: str) -> Any:
        return LmdbNodeStore(tmp_path / name) if kind == "lmdb" else MemoryNodeStore()

    conf = ConfState((1, 2, 3))
    a, b = open_("a"), open_("b")
    try:
        assert a.bootstrap(4, conf)
        datas = [encode_command(Command.put(b"a", b"v0")), cmd(XCmd(XOp.PREPARE, T1, 4, START, keys=(b"a", b"n"))),
                 encode_command(Command.put(b"a", b"lost"))]
        es = [Entry(1, 2 + i, EntryType.NORMAL, d, 4) for i, d in enumerate(datas)]
        a.persist_and_apply([GroupWrite(4, es, HardState(1, 0, es[-1].index))], ())
        ls = a.log_storage(4)
        res = a.persist_and_apply((), [ApplyBatch(4, ls.entries(1, ls.last_index() + 1), conf)])[0]
        p = res[-2].revision
        assert res[-1].error is not None and res[-1].error.startswith(xtxn.LOCKED)
        meta, chunks = a.snapshot_chunks(4)
        path = b.receive_snapshot(4, list(chunks))
        b.persist_and_apply([GroupWrite(4, [], HardState(1, 0, meta.index), meta, path)], ())
        more = [encode_command(Command.put(b"n", b"lost")),
                cmd(XCmd(XOp.COMMIT, T1, at=p, writes=((b"a", b"v1"), (b"n", b"n1"))))]
        es = [Entry(1, meta.index + 1 + i, EntryType.NORMAL, d, 4) for i, d in enumerate(more)]
        after = b.persist_and_apply([GroupWrite(4, es, HardState(1, 0, es[-1].index))], [ApplyBatch(4, es, conf)])[0]
        assert after[0].error is not None and after[0].error.startswith(xtxn.LOCKED)  # the intent came along
        assert after[1].error is None
        assert b.get(4, b"a") == b"v1" and b.get(4, b"n") == b"n1"
        reader = b._kv if kind == "lmdb" else b
        v, rs = reader.get_version(4, b"a", p)
        assert v is not None and v.value == b"v1" and v.meta.mod_revision == p and rs.last == p
        old, _ = reader.get_version(4, b"a", p - 1)
        assert old is not None and old.value == b"v0"
    finally:
        a.close()
        b.close()


# --- the coordinator's and resolver's decisions (kvstore/node/xtxn.py) over two groups ----------
def _run_until(crash_after: int) -> tuple[DictState, DictState, int]:
    """One transaction over groups 1 and 2 (a in 1: the primary, b in 2), driven by the node
    logic, with the coordinator dying after `crash_after` steps (a large number: it finishes);
    then a resolver meets whatever intents remain. Returns the groups and the commit revision
    (0: it did not reach its commit point)."""
    from kvstore.node import xtxn as logic
    from kvstore.storage.txn import CmpResult, Compare, Target

    g = {1: state(1), 2: state(2)}
    g[1].apply(encode_command(Command.put(b"a", b"1")))
    t = Txn((Compare(b"a", Target.VALUE, CmpResult.EQUAL, b"1"),),
            (TxnOp(OpKind.PUT, b"a", b"2"), TxnOp(OpKind.PUT, b"b", b"2")))
    p = logic.plan(t, [(b"a", 1), (b"b", 2)])
    tid = TxnId(5, 5)
    steps: list[tuple[int, bytes]] = []
    results: dict[int, ApplyResult] = {}
    for gid, data in logic.prepare_commands(p, tid, START, 0).items():
        steps.append((gid, data))
    done = 0
    for gid, data in steps:
        if done == crash_after:
            break
        results[gid] = g[gid].apply(data)
        done += 1
    committed = 0
    if done == len(steps):
        ready = logic.after_prepare(t, p, results)
        assert isinstance(ready, logic.Ready) and ready.at == max(r.revision for r in results.values())
        if done < crash_after:
            out = logic.after_record(tid, g[1].apply(logic.record_command(tid, START, ready)))
            assert isinstance(out, logic.Committed) and out.mine
            committed = ready.at
            done += 1
            for gid, data in logic.commit_commands(tid, ready, [1, 2]).items():
                if done >= crash_after:
                    break
                assert g[gid].apply(data).error is None
                done += 1
    # a resolver meets what is left, in either group
    for gid in (2, 1):
        lock = g[gid].apply(encode_command(Command.put(b"a" if gid == 1 else b"b", b"other")))
        met = logic.lock_of(lock)
        if met is None:
            continue
        _, intent = met
        assert logic.expired(intent, mvcc.revision_ms(START) + logic.TXN_TIMEOUT_MS + 1)
        res = g[intent.primary].apply(logic.resolve_command(intent))
        follow = logic.resolution(intent, gid, res)
        assert follow is not None and g[gid].apply(follow).error is None
    return g[1], g[2], committed


@pytest.mark.parametrize("crash_after", range(7))
def test_a_dead_coordinator_leaves_all_or_nothing(crash_after: int) -> None:
    a, b, committed = _run_until(crash_after)
    va, vb = a.get(b"a"), b.get(b"b")
    if committed:  # both writes at R in both groups (the resolver's own write came after)
        for s, k in ((a, b"a"), (b, b"b")):
            v = mvcc.version_at(s.rows, k, committed, s.get(k))
            assert v is not None and v.value == b"2" and v.meta.mod_revision == committed
    else:
        assert va in (b"1", b"other") and vb in (None, b"other")
        assert all(v != b"2" for v in (va, vb))
    assert xtxn_apply.min_pending(a.rows) == xtxn_apply.min_pending(b.rows) == 0


def test_the_watch_frontier_stays_below_a_pending_commit(tmp_path: Path) -> None:
    """`StoreSource.rev_state` (what the watch hub takes as a group's closed frontier) holds the
    group's last below the lowest pending reservation: a commit at R >= p inserts change-log
    rows below last, which a watch must not have passed."""
    from kvstore.node.watch import StoreSource

    conf = ConfState((1, 2, 3))
    s = MemoryNodeStore()
    assert s.bootstrap(4, conf)
    datas = [cmd(XCmd(XOp.PREPARE, T1, 4, START, keys=(b"a",))), encode_command(Command.put(b"z", b"1"))]
    es = [Entry(1, 2 + i, EntryType.NORMAL, d, 4) for i, d in enumerate(datas)]
    s.persist_and_apply([GroupWrite(4, es, HardState(1, 0, es[-1].index))], ())
    ls = s.log_storage(4)
    res = s.persist_and_apply((), [ApplyBatch(4, ls.entries(1, ls.last_index() + 1), conf)])[0]
    p, w = res[-2].revision, res[-1].revision
    assert w > p and s.revisions.rev_state(4).last == w
    assert s.min_pending(4) == p and StoreSource(s).rev_state(4).last == p - 1
    es = [Entry(1, 4, EntryType.NORMAL, cmd(XCmd(XOp.COMMIT, T1, at=p, writes=((b"a", b"2"),))), 4)]
    s.persist_and_apply([GroupWrite(4, es, HardState(1, 0, 4))], [ApplyBatch(4, es, conf)])
    assert s.min_pending(4) == 0 and StoreSource(s).rev_state(4).last == w


def test_a_range_prepare_locks_the_range() -> None:
    s = state()
    for k in (b"d/1", b"d/2", b"e/1"):
        s.apply(encode_command(Command.put(k, b"v")))
    s.apply(encode_command(Command.delete(b"d/2")))  # a key row left by a delete: not found
    s.apply(encode_command(Command.put(b"d/3", b"v")))
    res = s.apply(cmd(XCmd(XOp.PREPARE, T1, 1, START, lock=(b"d/", b"d0"))))
    assert res.error is None and res.current is not None
    assert xtxn.decode_found(res.current) == [b"d/1", b"d/3"]
    for c in (Command.put(b"d/new", b"x"), Command.put(b"d/1", b"x"), Command.delete(b"d/3")):
        r = s.apply(encode_command(c))
        assert r.error is not None and r.error.startswith(xtxn.LOCKED)
    assert s.apply(encode_command(Command.put(b"e/2", b"x"))).error is None  # outside the range
    other = s.apply(cmd(XCmd(XOp.PREPARE, T2, 1, START, lock=(b"d/5", b""))))  # overlapping
    assert other.error is not None and other.error.startswith(xtxn.LOCKED)
    assert s.apply(cmd(XCmd(XOp.PREPARE, T2, 1, START, keys=(b"d/9",)))).error is not None  # inside it
    frz = s.apply(encode_shard_command(ShardOp.FREEZE, IntervalSet([(0, 5)]), move=1))
    assert frz.error is not None and "intents" in frz.error
    again = s.apply(cmd(XCmd(XOp.PREPARE, T1, 1, START, lock=(b"d/", b"d0"))))  # idempotent
    assert again.revision == res.revision and again.current == res.current
    done = s.apply(cmd(XCmd(XOp.COMMIT, T1, at=res.revision, writes=((b"d/1", None), (b"d/3", None)))))
    assert done.error is None and s.get(b"d/1") is None and s.get(b"d/3") is None and s.get(b"e/1") == b"v"
    assert s.apply(encode_command(Command.put(b"d/new", b"x"))).error is None  # released
    assert list(s.rows.iter(mvcc.T_TXN, b"l", b"m")) == []


def test_a_refused_record_is_not_cached_in_the_session() -> None:
    s = state()
    s.apply(cmd(XCmd(XOp.RESOLVE, T1, start=START)))  # a resolver aborted attempt T1 first
    r1 = s.apply(cmd(XCmd(XOp.RECORD, T1, start=START, at=5), cid=7, seq=1))
    assert r1.error == xtxn_apply.TXN_ABORTED and s.session_result(7, 1) is None
    r2 = s.apply(cmd(XCmd(XOp.RECORD, T2, start=START, at=9), cid=7, seq=1))  # the next attempt commits
    assert r2.error is None and r2.current == T2.encode() and s.session_result(7, 1) is not None


def test_a_range_prepare_waits_for_a_moving_range() -> None:
    s = state()
    s.shard_state = ShardState(IntervalSet.full(), IntervalSet())
    s.apply(encode_command(Command.put(b"d/1", b"v")))
    h = key_hash(b"d/1")
    assert s.apply(encode_shard_command(ShardOp.FREEZE, IntervalSet([(h, h)]), move=1)).error is None
    # d/1 is frozen (moving out): a range delete here would miss it or delete it twice
    r = s.apply(cmd(XCmd(XOp.PREPARE, T1, 1, START, lock=(b"d/", b"d0"))))
    assert r.wrong_shard and s.rows.get(mvcc.T_TXN, b"l" + T1.encode()) is None


def test_the_read_rule_finds_a_blocking_intent_behind_many_others() -> None:
    from kvstore.node import xtxn as logic

    later = [(b"k%04d" % i, Intent(TxnId(1, i), 1, START, 1000).encode()) for i in range(200)]
    rows = [*later, (b"z", Intent(T2, 1, START, 10).encode())]
    assert logic.blocking_intent(later, 999) is None  # all prepared above the read: final
    assert logic.blocking_intent(rows, 999) == (b"z", Intent(T2, 1, START, 10))
    assert logic.blocking_intent(rows, 1000) is not None
    with pytest.raises(ValueError):
        logic.blocking_intent([(b"x", b"garbage")], 5)
    assert logic.READ_INTENTS_MAX > 200


def test_resolvers_finalize_a_dead_coordinators_record_group_by_group() -> None:
    s = state()
    groups = ((1, ((b"a", b"1"),)), (2, ((b"b", b"2"),)), (3, ()))
    s.apply(cmd(XCmd(XOp.RECORD, T1, start=START, at=99, groups=groups)))
    s.apply(cmd(XCmd(XOp.FINALIZE, T1, group=2)))  # group 2's resolver committed its intents
    rec = xtxn_apply.record_of(s.rows, T1)
    assert rec is not None and rec.state == State.COMMITTED and [g for g, _ in rec.writes] == [1, 3]
    assert rec.writes_of(1) == ((b"a", b"1"),)
    s.apply(cmd(XCmd(XOp.FINALIZE, T1, group=1)))
    s.apply(cmd(XCmd(XOp.FINALIZE, T1, group=3)))
    rec = xtxn_apply.record_of(s.rows, T1)
    assert rec is not None and rec.state == State.FINALIZED and rec.writes == ()
    # and then forgotten once old
    s.apply(encode_command(Command.close(START + xtxn.MAX_AGE + 1)))
    s.apply(cmd(XCmd(XOp.FINALIZE, TxnId(9, 9))))
    assert xtxn_apply.record_of(s.rows, T1) is None
