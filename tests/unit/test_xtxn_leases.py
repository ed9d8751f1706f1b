"""Leased puts and lease compares in transactions across groups (issue 17; `node/xtxn.py`'s
"Leases", `storage/xtxn.py`'s "Leased puts"): the new codec forms fuzzed (round trip, and
mangled bytes raise ValueError only), the coordinator's decisions (`plan`, `after_prepare`,
`record_command`, `commit_commands`, a resolver's `resolution`) driven over two groups' real
state machines (the lease's home and another group): attachments in both groups deleted by the
lease's deletion at one revision, a lease gone at PREPARE refusing the whole transaction, a lease
found gone only at COMMIT leaving no attachment (the COMMIT deletes the key, or the orphan sweep
does), the attach lock holding off a deletion, LEASE compares at R, and the level-7 gate."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xtxnlease import HOME, LID, OTHER, START, T1, T2, mangled

from kvstore import errors
from kvstore.node import xtxn as logic
from kvstore.node.version import (
    LEVEL_LEASES_2,
    LEVEL_XTXN_LEASES,
    SUPPORTED_LEVEL,
    ClusterVersion,
    CommandGate,
    command_level,
)
from kvstore.storage import leases, mvcc, txn, xtxn
from kvstore.storage.commands import ApplyResult, Command, decode_command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd
from kvstore.storage.machine import DictState
from kvstore.storage.txn import CmpResult, Compare, OpKind, Target, Txn, TxnOp
from kvstore.storage.xtxn import Intent, Record, State, TxnId, XCmd, XOp

MS = 1 << mvcc.PHYSICAL_SHIFT

# --- codec -----------------------------------------------------------------------------------------
ids_st = st.builds(TxnId, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
lease_st = st.builds(leases.make_id, st.integers(1, 4095), st.integers(0, 1 << 70))
key_st = st.binary(min_size=1, max_size=8)
checked_st = st.integers(0, leases.MAX_CHECKED)
revs_st = st.integers(0, mvcc.REVISION_MAX)


@st.composite
def prepare_st(draw: st.DrawFn) -> XCmd:
    keys = tuple(draw(st.lists(key_st, min_size=1, max_size=4, unique=True)))
    leased = tuple(dict.fromkeys(draw(st.lists(st.tuples(st.sampled_from(keys), lease_st, checked_st), max_size=4))))
    read = draw(st.booleans()) or not leased
    return XCmd(XOp.PREPARE, draw(ids_st), draw(st.integers(0, 4095)), draw(revs_st), keys=keys, leased=leased,
                read_leases=read)


@st.composite
def puts_st(draw: st.DrawFn) -> tuple[tuple[xtxn.Write, ...], tuple[xtxn.Leased, ...]]:
    keys = draw(st.lists(key_st, min_size=1, max_size=4, unique=True))
    writes = tuple((k, draw(st.binary(max_size=6)) if i == 0 else draw(st.one_of(st.none(), st.binary(max_size=6))))
                   for i, k in enumerate(keys))  # at least one put
    puts = [k for k, v in writes if v is not None]
    chosen = draw(st.lists(st.sampled_from(puts), unique=True, min_size=1))
    return writes, tuple((k, draw(lease_st), draw(checked_st)) for k in chosen)


@st.composite
def commit_st(draw: st.DrawFn) -> XCmd:
    writes, leased = draw(puts_st())
    return XCmd(XOp.COMMIT, draw(ids_st), at=draw(revs_st), writes=writes, leased=leased)


@st.composite
def record_st(draw: st.DrawFn) -> XCmd:
    writes, leased = draw(puts_st())
    return XCmd(XOp.RECORD, draw(ids_st), start=draw(revs_st), at=draw(revs_st),
                groups=((1, writes[:1]), (7, writes[1:])), leased=leased)


xcmd_st = st.one_of(prepare_st(), commit_st(), record_st())


@settings(max_examples=200, deadline=None)
@given(xcmd_st)
def test_leased_forms_round_trip_and_need_level_7(x: XCmd) -> None:
    data = encode_command(Command.cross(x, revision=5 if x.op == XOp.PREPARE else 0))
    assert decode_command(data).x == x
    assert command_level(data) == LEVEL_XTXN_LEASES <= SUPPORTED_LEVEL


@settings(max_examples=300, deadline=None)
@given(xcmd_st, st.data())
def test_mangled_leased_forms_raise_value_error_only(x: XCmd, data: st.DataObject) -> None:
    for b in mangled(encode_command(Command.cross(x, revision=5 if x.op == XOp.PREPARE else 0)), data):
        with contextlib.suppress(ValueError):
            decode_command(b)
        for decode in (xtxn.decode_attach_lock, xtxn.decode_prepared_leases, xtxn.decode_record):
            with contextlib.suppress(ValueError):
                decode(b[-40:])


@settings(max_examples=100, deadline=None)
@given(puts_st(), st.lists(st.integers(0, leases.MAX_LEASE_ID), max_size=5),
       st.lists(st.sampled_from([0, 1, 2]), max_size=5), st.lists(lease_st, min_size=1, max_size=4, unique=True))
def test_rows_and_answers_round_trip(wl: tuple[tuple[xtxn.Write, ...], tuple[xtxn.Leased, ...]], ks: list[int],
                                     codes: list[int], ids: list[int]) -> None:
    rec = Record(State.COMMITTED, START, START, None, ((2, wl[0]),), False, wl[1])
    raw = xtxn.encode_record(rec)
    assert xtxn.decode_record(raw) == rec
    xtxn.check_rows(mvcc.T_TXN, xtxn.row_record(T1), raw)
    assert rec.leased_of(2) == wl[1] and rec.leased_of(3) == ()
    assert xtxn.decode_prepared_leases(xtxn.encode_prepared_leases(tuple(ks), tuple(codes))) == (tuple(ks), tuple(codes))
    it = Intent(T1, HOME, START, START)
    lock = xtxn.encode_attach_lock(it, tuple(sorted(ids)))
    assert xtxn.decode_attach_lock(lock) == (it, tuple(sorted(ids)))
    xtxn.check_rows(mvcc.T_TXN, xtxn.row_attach_lock(T1), lock)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([b"a", b"r", b"t"]))
def test_the_new_decoders_are_total_on_any_bytes(raw: bytes, kind: bytes) -> None:
    for decode in (xtxn.decode_attach_lock, xtxn.decode_prepared_leases, xtxn.decode_record):
        with contextlib.suppress(ValueError):
            decode(raw)
    with contextlib.suppress(ValueError):
        xtxn.check_rows(mvcc.T_TXN, kind + raw[:16], raw[16:])
    for op in (XOp.PREPARE, XOp.COMMIT, XOp.RECORD):
        with contextlib.suppress(ValueError):
            xtxn.decode_body(op, T1.encode() + raw)


def test_encoders_and_decoders_refuse_bad_leased_forms() -> None:
    put = ((b"a", b"v"), (b"d", None))
    for bad in (
        XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"a",), leased=((b"z", LID, 1),)),  # a key it does not prepare
        XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"a",), leased=((b"a", LID, 1), (b"a", LID, 1))),  # twice
        XCmd(XOp.PREPARE, T1, HOME, START, lock=(b"a", b""), read_leases=True),  # a range
        XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"a",), leased=((b"a", 0, 1),)),  # lease 0
        XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"a",), leased=((b"a", LID, 1 << 63),)),  # checked
        XCmd(XOp.COMMIT, T1, at=5, writes=put, leased=((b"d", LID, 1),)),  # a delete is no put
        XCmd(XOp.COMMIT, T1, at=5, writes=put, leased=((b"a", LID, 1), (b"a", LID + 4096, 1))),  # a key twice
        XCmd(XOp.COMMIT, T1, at=5, delete_prepared=True, leased=((b"a", LID, 1),)),
        XCmd(XOp.COMMIT, T1, at=5, writes=put, read_leases=True),
        XCmd(XOp.RECORD, T1, start=1, at=5, groups=((HOME, put),), lease=LID, leased=((b"a", LID, 1),)),
    ):
        with pytest.raises(ValueError):
            xtxn.encode_body(bad)
    ok = xtxn.encode_body(XCmd(XOp.COMMIT, T1, at=5, writes=put, leased=((b"a", LID, 1),)))
    plain = xtxn.encode_body(XCmd(XOp.COMMIT, T1, at=5, writes=put))
    for raw in (plain + b"\x03\x00\x00", plain + b"\x04", ok + b"\x03", plain + b"\x02" + ok[len(plain):]):
        with pytest.raises(ValueError):
            xtxn.decode_body(XOp.COMMIT, raw)
    for raw in (b"", xtxn.encode_prepared_leases((1,), (0,)) + b"\x00", b"\x00\x00\x00\x01\x03"):
        with pytest.raises(ValueError):
            xtxn.decode_prepared_leases(raw)
    with pytest.raises(ValueError):  # leases unsorted
        xtxn.decode_attach_lock(Intent(T1, HOME, START, 9).encode() + (LID + 4096).to_bytes(8, "big")
                                + LID.to_bytes(8, "big"))


def test_the_gate_refuses_leased_forms_below_level_7() -> None:
    x = XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"a",), leased=((b"a", LID, 1),))
    data = encode_command(Command.cross(x, revision=5))
    plain = encode_command(Command.cross(XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"a",)), revision=5))
    gate = CommandGate(lambda: ClusterVersion(LEVEL_LEASES_2, {1: LEVEL_LEASES_2}), lambda: {1})
    gate.check(plain)
    with pytest.raises(errors.ClusterVersionTooLow) as e:
        gate.check(data)
    assert e.value.definite and "needs cluster version 7" in e.value.message
    CommandGate(lambda: ClusterVersion(LEVEL_XTXN_LEASES, {1: LEVEL_XTXN_LEASES}), lambda: {1}).check(data)


# --- two groups' state machines, driven by the coordinator's decisions -------------------------------
def lease(s: DictState, c: LeaseCmd, key: bytes = b"", value: bytes = b"", revision: int = 0) -> ApplyResult:
    return s.apply(encode_command(Command.lease_command(c, key, value, revision=revision)))


def groups() -> dict[int, DictState]:
    out = {HOME: DictState(group=HOME), OTHER: DictState(group=OTHER)}
    assert lease(out[HOME], LeaseCmd(Kind.GRANT, LID, ttl_s=10)).found
    return out


def lput(key: bytes, lid: int = LID) -> TxnOp:
    return TxnOp(OpKind.PUT, key, b"v-" + key, lease=lid, checked=START)


def plan_of(t: Txn, where: dict[bytes, int]) -> logic.Plan:
    return logic.plan(t, ((k, where[k]) for k, _ in txn.keys_of(t)))


def prepare(gs: dict[int, DictState], p: logic.Plan, tid: TxnId) -> dict[int, ApplyResult]:
    cmds = logic.prepare_commands(p, tid, START, START)
    return {g: gs[g].apply(cmds[g]) for g in sorted(cmds)}


def run_txn(gs: dict[int, DictState], t: Txn, where: dict[bytes, int], tid: TxnId = T1,
            skip_commit: int | None = None) -> logic.Ready:
    """PREPARE, decide, RECORD, COMMIT (but in `skip_commit`) as `CrossTxns.run` does."""
    p = plan_of(t, where)
    r = logic.after_prepare(t, p, prepare(gs, p, tid))
    assert isinstance(r, logic.Ready), r
    rec = gs[p.primary].apply(logic.record_command(tid, START, r))
    assert rec.error is None, rec.error
    for g, data in logic.commit_commands(tid, r, sorted(p.keys)).items():
        if g != skip_commit:
            assert gs[g].apply(data).error is None
    return r


def revoke_across(gs: dict[int, DictState], tid: TxnId = T2) -> logic.Ready | logic.Conflict | logic.Refused:
    """The lease's deletion across both groups (as the lessor runs it)."""
    p = logic.plan_lease(sorted(gs), LID)
    got = {g: gs[g].apply(encode_command(Command.cross(XCmd(XOp.PREPARE, tid, HOME, START, lease=LID),
                                                       revision=START))) for g in sorted(gs)}
    d = logic.after_prepare_range(p, got)
    if not isinstance(d, logic.Ready):
        for g, data in logic.abort_commands(tid, [g for g, r in got.items() if r.error is None]).items():
            gs[g].apply(data)
        return d
    assert gs[HOME].apply(logic.record_command(tid, START, d, lease=LID)).error is None
    for g, data in logic.commit_commands(tid, d, sorted(p.keys)).items():
        assert gs[g].apply(data).error is None
    return d


WHERE = {b"h/1": HOME, b"o/1": OTHER, b"o/2": OTHER}


def test_puts_on_one_lease_in_two_groups_attach_and_die_with_it_at_one_revision() -> None:
    gs = groups()
    r = run_txn(gs, Txn((), (lput(b"h/1"), lput(b"o/1"))), WHERE)
    assert r.leased == {HOME: ((b"h/1", LID, START),), OTHER: ((b"o/1", LID, START),)}
    for g, k in ((HOME, b"h/1"), (OTHER, b"o/1")):
        assert gs[g].get(k) == b"v-" + k and leases.lease_of(gs[g].rows, k) == LID
        assert not gs[g].rows.has_locks()  # the attach lock went with the COMMIT
    d = revoke_across(gs)
    assert isinstance(d, logic.Ready) and sorted(k for ws in d.writes.values() for k, _ in ws) == [b"h/1", b"o/1"]
    for g, k in ((HOME, b"h/1"), (OTHER, b"o/1")):
        assert gs[g].get(k) is None and leases.attached_keys(gs[g].rows, LID) == []
        assert mvcc.current_meta(gs[g].rows, k, None) is None
    # both DELETEs at the deletion's one revision R
    assert {mvcc.rev_state(s.rows).last >= d.at for s in gs.values()} == {True}


def test_a_plain_put_across_groups_detaches() -> None:
    gs = groups()
    run_txn(gs, Txn((), (lput(b"h/1"), lput(b"o/1"))), WHERE)
    run_txn(gs, Txn((), (TxnOp(OpKind.PUT, b"h/1", b"x"), TxnOp(OpKind.PUT, b"o/1", b"y"))), WHERE, T2)
    assert leases.lease_of(gs[OTHER].rows, b"o/1") == 0 and leases.lease_of(gs[HOME].rows, b"h/1") == 0
    revoke_across(gs, TxnId(9, 9))
    assert gs[OTHER].get(b"o/1") == b"y" and gs[HOME].get(b"h/1") == b"x"


def test_a_lease_gone_at_prepare_refuses_the_whole_transaction() -> None:
    gs = groups()
    assert isinstance(revoke_across(gs), logic.Ready)  # dead: tombstones in both groups
    t = Txn((), (lput(b"h/1"), TxnOp(OpKind.PUT, b"o/2", b"w"), lput(b"o/1")))
    p = plan_of(t, WHERE)
    d = logic.after_prepare(t, p, prepare(gs, p, T1))
    assert isinstance(d, logic.Refused) and d.lease_not_found and d.message == leases.NOT_FOUND
    for g, data in logic.abort_commands(T1, sorted(p.keys)).items():
        gs[g].apply(data)
    assert gs[OTHER].get(b"o/2") is None and gs[OTHER].get(b"o/1") is None and gs[HOME].get(b"h/1") is None
    assert not any(s.rows.has_locks() for s in gs.values())


def test_a_dead_lease_on_the_path_not_taken_refuses_nothing() -> None:
    gs = groups()
    revoke_across(gs)
    exists = Compare(b"o/2", Target.VERSION, CmpResult.GREATER, number=0)  # false: o/2 is absent
    t = Txn((exists,), (lput(b"o/1"),), (TxnOp(OpKind.PUT, b"h/1", b"plain"), TxnOp(OpKind.PUT, b"o/2", b"p")))
    r = run_txn(gs, t, WHERE)
    assert not r.result.succeeded and r.leased == {}
    assert gs[HOME].get(b"h/1") == b"plain" and gs[OTHER].get(b"o/1") is None


def test_too_many_keys_refuses_definitely() -> None:
    gs = groups()
    for i in range(3):
        assert lease(gs[OTHER], LeaseCmd(Kind.PUT, LID, checked=START), b"o/k%d" % i, b"x").error is None
    rows = gs[OTHER].rows
    rows.put(leases.T_LEASES, leases.count_key(LID), leases.count_row(leases.MAX_KEYS_PER_LEASE))
    t = Txn((), (lput(b"h/1"), lput(b"o/1")))
    p = plan_of(t, WHERE)
    d = logic.after_prepare(t, p, prepare(gs, p, T1))
    assert isinstance(d, logic.Refused) and not d.lease_not_found and leases.TOO_MANY_KEYS in d.message


def test_the_attach_lock_holds_off_the_lease_deletion_and_a_deletion_lock_holds_off_the_prepare() -> None:
    gs = groups()
    t = Txn((), (lput(b"h/1"), lput(b"o/1")))
    p = plan_of(t, WHERE)
    got = prepare(gs, p, T1)
    assert all(r.error is None for r in got.values())
    d = revoke_across(gs)  # the deletion meets the attach lock: LOCKED, it retries (or resolves T1)
    assert isinstance(d, logic.Conflict) and d.intent.txn == T1
    r = lease(gs[HOME], LeaseCmd(Kind.REVOKE, LID))  # the one-command path is held off too
    assert r.error is not None and r.error.startswith(xtxn.LOCKED)
    r = lease(gs[OTHER], LeaseCmd(Kind.DROP, LID), revision=START)
    assert r.error is not None and r.error.startswith(xtxn.LOCKED)
    assert lease(gs[OTHER], LeaseCmd(Kind.PUT, LID, checked=START), b"o/2", b"x").error is None  # puts are not
    ready = logic.after_prepare(t, p, got)
    assert isinstance(ready, logic.Ready)
    assert gs[HOME].apply(logic.record_command(T1, START, ready)).error is None
    for g, data in logic.commit_commands(T1, ready, sorted(p.keys)).items():
        assert gs[g].apply(data).error is None
    d2 = revoke_across(gs, TxnId(7, 7))
    assert isinstance(d2, logic.Ready)
    assert gs[OTHER].get(b"o/1") is None and gs[OTHER].get(b"o/2") is None and gs[HOME].get(b"h/1") is None
    # the other way round: a deletion prepared first refuses the transaction's PREPARE (LOCKED)
    gs = groups()
    prep = encode_command(Command.cross(XCmd(XOp.PREPARE, T2, HOME, START, lease=LID), revision=START))
    assert gs[OTHER].apply(prep).error is None
    d3 = logic.after_prepare(t, p, prepare(gs, p, T1))
    assert isinstance(d3, logic.Conflict) and d3.intent.txn == T2


def test_a_lease_found_dead_only_at_commit_leaves_no_attachment() -> None:
    """After the commit point the COMMIT cannot refuse: a lease known dead in the group (here its
    tombstone, from a death the attach lock did not see) makes the COMMIT write the key's
    deletion instead; a death the group does not know of leaves the key attached, and the orphan
    sweep's LEASE_STATUS / LEASE_ORPHAN delete it."""
    gs = groups()
    assert lease(gs[OTHER], LeaseCmd(Kind.PUT, LID, checked=START), b"o/2", b"old").error is None
    t = Txn((), (lput(b"h/1"), lput(b"o/1"), lput(b"o/2")))
    p = plan_of(t, WHERE)
    ready = logic.after_prepare(t, p, prepare(gs, p, T1))
    assert isinstance(ready, logic.Ready)
    assert gs[HOME].apply(logic.record_command(T1, START, ready)).error is None
    leases.put_tomb(gs[OTHER].rows, OTHER, LID, START)  # the lease died unseen by the lock
    cmds = logic.commit_commands(T1, ready, sorted(p.keys))
    done = gs[OTHER].apply(cmds[OTHER])
    assert done.error is None and xtxn.decode_found(done.current or b"") == [b"o/1", b"o/2"]  # deleted instead
    assert gs[OTHER].get(b"o/1") is None and gs[OTHER].get(b"o/2") is None  # deleted at R, not attached
    assert leases.attached_keys(gs[OTHER].rows, LID) == [] and leases.attached_count(gs[OTHER].rows, LID) == 0
    meta = mvcc.current_meta(gs[OTHER].rows, b"o/2", None)
    assert meta is None and mvcc.rev_state(gs[OTHER].rows).last >= ready.at
    # the home: the lease's record went (dead) with no tombstone this group's COMMIT could see:
    assert gs[HOME].apply(cmds[HOME]).error is None
    assert leases.lease_of(gs[HOME].rows, b"h/1") == LID  # alive here: attached
    gs2 = groups()
    ready2 = run_txn(gs2, Txn((), (lput(b"h/1"), lput(b"o/1"))), WHERE, skip_commit=OTHER)
    home = gs2[HOME]
    lease(home, LeaseCmd(Kind.REVOKE, LID), revision=START + MS)  # one-command death, unseen by OTHER
    lease(home, LeaseCmd(Kind.FORGET, LID), revision=START + 2 * MS)
    assert gs2[OTHER].apply(logic.commit_commands(T1, ready2, [OTHER])[OTHER]).error is None
    assert leases.lease_of(gs2[OTHER].rows, b"o/1") == LID  # attached to a dead lease: the sweep's
    status = leases.home_status(home.rows, LID)
    assert status.state == leases.DEAD
    orphan = lease(gs2[OTHER], LeaseCmd(Kind.ORPHAN, LID, until=status.until), revision=START + 3 * MS)
    assert orphan.error is None and gs2[OTHER].get(b"o/1") is None
    assert leases.attached_keys(gs2[OTHER].rows, LID) == []


def test_lease_compares_across_groups_read_the_keys_leases_at_r() -> None:
    gs = groups()
    run_txn(gs, Txn((), (lput(b"h/1"), lput(b"o/1"))), WHERE)
    is_l = Compare(b"o/1", Target.LEASE, CmpResult.EQUAL, number=LID)
    none = Compare(b"h/1", Target.LEASE, CmpResult.EQUAL, number=0)
    r = run_txn(gs, Txn((is_l,), (TxnOp(OpKind.PUT, b"h/1", b"plain"),)), WHERE, T2)
    assert r.result.succeeded and leases.lease_of(gs[HOME].rows, b"h/1") == 0
    r = run_txn(gs, Txn((is_l, none), (TxnOp(OpKind.GET, b"o/2"),), (TxnOp(OpKind.GET, b"h/1"),)), WHERE,
                TxnId(3, 3))
    assert r.result.succeeded  # o/1 on LID and h/1 now on none
    r = run_txn(gs, Txn((Compare(b"h/1", Target.LEASE, CmpResult.EQUAL, number=LID),),
                        (TxnOp(OpKind.PUT, b"o/2", b"no"),)), WHERE, TxnId(4, 4))
    assert not r.result.succeeded and gs[OTHER].get(b"o/2") is None


def test_a_resolver_commits_with_the_records_leases() -> None:
    """The coordinator died after its RECORD: a resolver's COMMIT (and the record sweep's) come
    from the record, which keeps the leased puts of the participants still to commit."""
    gs = groups()
    t = Txn((), (lput(b"h/1"), lput(b"o/1"), TxnOp(OpKind.PUT, b"o/2", b"plain")))
    p = plan_of(t, WHERE)
    ready = logic.after_prepare(t, p, prepare(gs, p, T1))
    assert isinstance(ready, logic.Ready)
    assert gs[HOME].apply(logic.record_command(T1, START, ready)).error is None
    home_commit = logic.commit_commands(T1, ready, [HOME])[HOME]
    assert gs[HOME].apply(home_commit).error is None
    assert gs[HOME].apply(logic.finalize_command(T1, HOME)).error is None  # HOME done: OTHER's part stays
    intent = Intent(T1, HOME, START, START)
    answer = gs[HOME].apply(logic.resolve_command(intent))
    rec = logic.committed_record(answer)
    assert rec is not None and rec.leased == ((b"o/1", LID, START),)
    follow = logic.resolution(intent, OTHER, answer)
    assert follow is not None and decode_command(follow).x == XCmd(
        XOp.COMMIT, T1, at=ready.at, writes=ready.writes[OTHER], leased=((b"o/1", LID, START),))
    assert gs[OTHER].apply(follow).error is None
    assert leases.lease_of(gs[OTHER].rows, b"o/1") == LID and leases.lease_of(gs[OTHER].rows, b"o/2") == 0
    assert logic.finish_commands(T1, rec)[OTHER] == follow  # the record sweep sends the same COMMIT


# --- the client's wire form ------------------------------------------------------------------------
def test_the_clients_leased_puts_and_lease_compares_on_the_wire() -> None:
    from kvstore.client.checks import RequestChecks
    from kvstore.client.txns import leased_ids, txn_body
    from kvstore.client.types import Compare as CCompare
    from kvstore.client.types import Op
    from kvstore.server.txn_wire import txn_from_proto
    from kvstore.v1 import kv_pb2

    checks = RequestChecks(timeout=1.0)
    ops = [Op.put(b"a", b"1", lease=LID), Op.txn([], [Op.put(b"b", b"2", lease=LID + 4096)], [Op.put(b"c", b"3")])]
    assert sorted(leased_ids(ops)) == [LID, LID + 4096]
    body = txn_body(checks, [CCompare.lease(b"a", "=", LID)], ops, [], {LID: 77})
    assert body.compares[0].target == kv_pb2.COMPARE_LEASE and body.compares[0].number == LID
    assert (body.success[0].put.lease, body.success[0].put.checked) == (LID, 77)
    assert (body.success[1].txn.success[0].put.lease, body.success[1].txn.success[0].put.checked) == (LID + 4096, 0)
    t = txn_from_proto(body, lambda k: k, lambda v: v)
    assert txn.compares_lease(t) and list(logic.leased_puts(t)) == [(b"a", LID, 77), (b"b", LID + 4096, 0)]
    with pytest.raises(errors.InvalidArgument):
        txn_body(checks, [], [Op.put(b"a", b"1", lease=1 << 63)], [])


def test_with_checked_stamps_only_unchecked_puts_of_the_leases_given() -> None:
    other = LID + 4096
    t = Txn((), (TxnOp(OpKind.PUT, b"a", b"1", lease=LID), TxnOp(OpKind.PUT, b"b", b"2", lease=other, checked=5),
                 TxnOp(OpKind.TXN, txn=Txn((), (TxnOp(OpKind.PUT, b"c", b"3", lease=other),),
                                           (TxnOp(OpKind.PUT, b"d", b"4"),)))))
    got = logic.with_checked(t, {LID: 9, other: 11})
    assert list(logic.leased_puts(got)) == [(b"a", LID, 9), (b"b", other, 5), (b"c", other, 11)]
    assert logic.with_checked(t, {}) == t
    txn.check_txn(got)


def test_a_commit_attaching_a_lease_its_attach_lock_does_not_hold_deletes_the_key() -> None:
    """Defence in depth: a COMMIT whose leased put names a lease the transaction's attach lock
    here does not hold (its PREPARE never accepted it) attaches nothing: the key's deletion is
    written at R instead, as for a lease found dead."""
    gs = groups()
    other_lease = leases.make_id(HOME, 4343)
    assert lease(gs[HOME], LeaseCmd(Kind.GRANT, other_lease, ttl_s=10)).found  # live, but never locked
    t = Txn((), (lput(b"h/1"), lput(b"o/1")))
    p = plan_of(t, WHERE)
    ready = logic.after_prepare(t, p, prepare(gs, p, T1))
    assert isinstance(ready, logic.Ready)
    forged = XCmd(XOp.COMMIT, T1, at=ready.at, writes=((b"o/1", b"v-o/1"),), leased=((b"o/1", other_lease, START),))
    res = gs[OTHER].apply(encode_command(Command.cross(forged)))
    assert res.error is None and xtxn.decode_found(res.current or b"") == [b"o/1"]
    assert gs[OTHER].get(b"o/1") is None and leases.lease_of(gs[OTHER].rows, b"o/1") == 0
    assert leases.attached_keys(gs[OTHER].rows, other_lease) == []


def test_a_lease_deletion_proceeds_under_a_stream_of_leased_transactions() -> None:
    """Liveness: each round a new transaction prepares leased puts of the lease, the lease's
    deletion tries, and the oldest transaction commits. Without the deletion's wait marker a
    new attach lock is always held when the deletion tries (starved without bound); with it,
    the new PREPAREs wait (LOCKED), the held attach locks drain, and the deletion proceeds."""
    gs = groups()
    pending: list[tuple[TxnId, logic.Plan, logic.Ready]] = []
    waited = 0
    for i in range(6):
        tid = TxnId(10, i)
        t = Txn((), (lput(b"h/1"), lput(b"o/1")))
        p = plan_of(t, WHERE)
        got = prepare(gs, p, tid)
        r = logic.after_prepare(t, p, got)
        if isinstance(r, logic.Ready):
            pending.append((tid, p, r))
        else:
            assert isinstance(r, logic.Conflict), r  # the deletion's marker: wait, retry later
            waited += 1
            for g, data in logic.abort_commands(tid, [g for g, x in got.items() if x.error is None]).items():
                gs[g].apply(data)
        d = revoke_across(gs, TxnId(99, i))
        if isinstance(d, logic.Ready):
            break
        assert isinstance(d, logic.Conflict), d
        ptid, pp, pr = pending.pop(0)
        assert gs[pp.primary].apply(logic.record_command(ptid, START, pr)).error is None
        for g, data in logic.commit_commands(ptid, pr, sorted(pp.keys)).items():
            assert gs[g].apply(data).error is None
    else:
        raise AssertionError("the lease's deletion never proceeded")
    assert waited >= 1 and i <= 2
    assert all(leases.attached_keys(s.rows, LID) == [] for s in gs.values())
    assert gs[HOME].get(b"h/1") is None and gs[OTHER].get(b"o/1") is None
    assert all(s.rows.get(mvcc.T_TXN, xtxn.row_lease_wait(LID)) is None for s in gs.values())  # gone at COMMIT


def test_the_lease_wait_row_is_checked_as_a_snapshot_brings_it() -> None:
    row, value = xtxn.row_lease_wait(LID), Intent(T1, HOME, START, START).encode()
    xtxn.check_rows(mvcc.T_TXN, row, value)
    for bad_row, bad_value in ((row[:-1], value), (row, value[:-1]), (b"w" + b"\x00" * 8, value)):
        with pytest.raises(ValueError):
            xtxn.check_rows(mvcc.T_TXN, bad_row, bad_value)
