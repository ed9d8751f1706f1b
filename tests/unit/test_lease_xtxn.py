"""A lease's deletion across groups (`xtxn_apply`'s lease PREPARE / RECORD / COMMIT, `leases.py`'s
`revoke_record` / `deleted_everywhere`): the codec's new fields fuzzed (with the compact
delete-prepared form a lease's deletion is sent in: a RECORD with the lease tail, then tail 2), and
the apply rules on two groups' state machines (the lease's home and another group), also through
the real coordinator (`CrossTxns`) with more keys in a group than a command may list."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xtxnlease import HOME, LID, OTHER, START, T1, T2, mangled

from kvstore import errors
from kvstore.node import lessor
from kvstore.node import xtxn as logic
from kvstore.node.hlc import HybridClock
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.node.version import (
    COMMAND_LEVELS,
    LEVEL_CROSS_TRANSACTIONS,
    LEVEL_LEASES,
    ClusterVersion,
    CommandGate,
    command_level,
)
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.server.xtxn_run import CrossTxns
from kvstore.storage import leases, mvcc, txn, xtxn, xtxn_apply
from kvstore.storage.commands import ApplyResult, Command, decode_command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd
from kvstore.storage.machine import DictState
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.xtxn import Intent, State, TxnId, XCmd, XOp

ids_st = st.builds(TxnId, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
lease_st = st.builds(leases.make_id, st.integers(1, 4095), st.integers(0, 1 << 70))
revs_st = st.integers(0, mvcc.REVISION_MAX)
xcmd_st = st.one_of(
    st.builds(lambda t, p, s, lid: XCmd(XOp.PREPARE, t, p, s, lease=lid), ids_st, st.integers(0, 4095), revs_st,
              lease_st),
    st.builds(lambda t, s, a, lid, r: XCmd(XOp.RECORD, t, start=s, at=a, lease=lid, renews=r,
                                           groups=((1, ((b"k", None),)), (2, ()))),
              ids_st, revs_st, revs_st, lease_st, st.integers(0, (1 << 64) - 1)),
    # the form the coordinator sends: the lease tail, then "every group deletes every key prepared"
    st.builds(lambda t, s, a, lid, r, n: XCmd(XOp.RECORD, t, start=s, at=a, lease=lid, renews=r,
                                              groups=tuple((i, ()) for i in range(1, n + 1)), delete_prepared=True),
              ids_st, revs_st, revs_st, lease_st, st.integers(0, (1 << 64) - 1), st.integers(0, 3)),
)


@settings(max_examples=150, deadline=None)
@given(xcmd_st)
def test_lease_fields_round_trip(x: XCmd) -> None:
    rev = 5 if x.op == XOp.PREPARE else 0
    c = decode_command(encode_command(Command.cross(x, revision=rev)))
    assert c.x == x


@settings(max_examples=300, deadline=None)
@given(xcmd_st, st.data())
def test_mangled_lease_commands_raise_value_error_only(x: XCmd, data: st.DataObject) -> None:
    for b in mangled(encode_command(Command.cross(x, revision=5 if x.op == XOp.PREPARE else 0)), data):
        with contextlib.suppress(ValueError):
            decode_command(b)
        with contextlib.suppress(ValueError):
            xtxn.decode_lease_lock(b[-40:])


def test_the_record_tails_are_canonical() -> None:
    """Tag 1 (the lease) then tag 2 (delete every key prepared), each at most once, in that order;
    anything else is a ValueError, as is a write listed beside tag 2."""
    both = xtxn.encode_body(XCmd(XOp.RECORD, T1, start=START, at=START, groups=((HOME, ()),), lease=LID, renews=4,
                                 delete_prepared=True))
    lease_tail = struct.pack(">BQQ", 1, LID, 4)
    assert both.endswith(lease_tail + b"\x02")
    body = both[:-len(lease_tail) - 1]
    assert xtxn.decode_body(XOp.RECORD, body + lease_tail).delete_prepared is False
    assert xtxn.decode_body(XOp.RECORD, body + b"\x02").lease == 0
    for bad in (body + b"\x02" + lease_tail, body + lease_tail + lease_tail, body + lease_tail + b"\x02\x02",
                body + b"\x03", body + lease_tail[:-1], body + lease_tail + b"\x01"):
        with pytest.raises(ValueError):
            xtxn.decode_body(XOp.RECORD, bad)
    with pytest.raises(ValueError):
        xtxn.encode_body(XCmd(XOp.RECORD, T1, start=START, at=START, groups=((HOME, ((b"k", None),)),), lease=LID,
                              delete_prepared=True))


def test_encoders_refuse_bad_lease_fields() -> None:
    for bad in (
        XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"a",), lease=LID),  # keys and a lease
        XCmd(XOp.PREPARE, T1, HOME, START, lock=(b"a", b""), lease=LID),  # a range and a lease
        XCmd(XOp.PREPARE, T1, HOME, START, lease=leases.make_id(1, 1) & ~leases.ID_GROUP_MASK),  # group 0
        XCmd(XOp.RECORD, T1, start=START, at=5, renews=3),  # a renew count without a lease
        XCmd(XOp.COMMIT, T1, at=5, lease=LID),
        XCmd(XOp.ABORT, T1, lease=LID),
    ):
        with pytest.raises(ValueError):
            xtxn.encode_body(bad)
    with pytest.raises(ValueError):
        xtxn.decode_lease_lock(Intent(T1, HOME, START, 9).encode() + b"\0" * 8)  # lease id 0


def test_the_plan_and_when_it_is_used() -> None:
    p = logic.plan_lease([OTHER, HOME, OTHER], LID, 7)
    assert p.primary == HOME and sorted(p.keys) == [HOME, OTHER] and p.lease == LID and p.renews == 7
    with pytest.raises(ValueError):
        logic.plan_lease([OTHER], LID)  # its home must be a data group
    assert lessor.cross_group_deletion([0, HOME, OTHER]) and not lessor.cross_group_deletion([0, HOME])


# --- apply on two groups ---------------------------------------------------------------------------
def lease(s: DictState, c: LeaseCmd, key: bytes = b"", value: bytes = b"", revision: int = 0) -> ApplyResult:
    return s.apply(encode_command(Command.lease_command(c, key, value, revision=revision)))


def x(s: DictState, c: XCmd, revision: int = 0) -> ApplyResult:
    return s.apply(encode_command(Command.cross(c, revision=revision)))


def setup() -> tuple[DictState, DictState]:
    home, other = DictState(group=HOME), DictState(group=OTHER)
    assert lease(home, LeaseCmd(Kind.GRANT, LID, ttl_s=10)).found
    assert lease(home, LeaseCmd(Kind.PUT, LID), b"h/1", b"v").error is None
    assert lease(other, LeaseCmd(Kind.PUT, LID), b"o/1", b"v").error is None
    assert lease(other, LeaseCmd(Kind.PUT, LID), b"o/2", b"v").error is None
    other.apply(encode_command(Command.put(b"o/plain", b"v")))
    return home, other


def prepare_both(home: DictState, other: DictState, t: TxnId) -> dict[int, ApplyResult]:
    out = {}
    for g, s in ((HOME, home), (OTHER, other)):
        out[g] = x(s, XCmd(XOp.PREPARE, t, HOME, START, lease=LID), revision=START)
        assert out[g].error is None, out[g].error
    return out


def test_an_expiry_deletes_every_groups_keys_at_one_revision() -> None:
    home, other = setup()
    p = logic.plan_lease([HOME, OTHER], LID, renews=1)
    got = prepare_both(home, other, T1)
    assert xtxn.decode_found(got[HOME].current or b"") == [b"h/1"]
    assert sorted(xtxn.decode_found(got[OTHER].current or b"")) == [b"o/1", b"o/2"]
    # while prepared: no key is attached to the lease in either group, its keys are locked
    for s, k in ((home, b"h/new"), (other, b"o/new")):
        r = lease(s, LeaseCmd(Kind.PUT, LID), k, b"x")
        assert r.error is not None and r.error.startswith(xtxn.LOCKED)
    assert other.apply(encode_command(Command.put(b"o/1", b"x"))).error is not None
    assert lease(home, LeaseCmd(Kind.REVOKE, LID)).error is not None  # the one-command path waits too
    ready = logic.after_prepare_range(p, got)
    assert isinstance(ready, logic.Ready) and ready.at == max(r.revision for r in got.values())
    rec = home.apply(logic.record_command(T1, START, ready, lease=LID, renews=1))
    assert rec.error is None and rec.revision == ready.at
    # revoked and forgotten by the commit point: the record is the tombstone (no DROP, no FORGET)
    assert leases.get_record(home.rows, LID) is None
    assert home.rows.get(leases.T_LEASES, leases.tomb_key(LID)) is not None
    assert leases.iter_records(home.rows) == []  # nothing left for the lease clock
    for g, s in ((HOME, home), (OTHER, other)):
        assert x(s, XCmd(XOp.COMMIT, T1, at=ready.at, writes=ready.writes[g])).error is None
    assert home.get(b"h/1") is None and other.get(b"o/1") is None and other.get(b"o/2") is None
    assert other.get(b"o/plain") == b"v"
    for s in (home, other):
        assert leases.attached_keys(s.rows, LID) == [] and not s.rows.has_locks()
    assert sorted(ready.writes[OTHER]) == [(b"o/1", None), (b"o/2", None)]
    assert mvcc.rev_state(other.rows).last >= ready.at and mvcc.rev_state(home.rows).last >= ready.at
    assert other.rows.get(leases.T_LEASES, leases.tomb_key(LID)) is not None
    for s, k in ((home, b"h/2"), (other, b"o/3")):  # after: a put with the dead lease is refused
        assert lease(s, LeaseCmd(Kind.PUT, LID), k, b"x").error == leases.NOT_FOUND


def test_a_renew_before_the_record_aborts_the_expiry() -> None:
    home, other = setup()
    p = logic.plan_lease([HOME, OTHER], LID, renews=1)
    ready = logic.after_prepare_range(p, prepare_both(home, other, T1))
    assert isinstance(ready, logic.Ready)
    assert lease(home, LeaseCmd(Kind.RENEW, LID)).found  # RENEW is not locked
    rec = home.apply(logic.record_command(T1, START, ready, lease=LID, renews=1))
    assert rec.error == leases.LEASE_RENEWED
    r = xtxn_record(home, T1)
    assert r is not None and r.state == State.ABORTED  # decided: a duplicate RECORD cannot commit
    again = home.apply(logic.record_command(T1, START, ready, lease=LID, renews=1))
    assert again.error is not None
    for s in (home, other):
        assert x(s, XCmd(XOp.ABORT, T1)).error is None
        assert not s.rows.has_locks()
    live = leases.get_record(home.rows, LID)
    assert live is not None and live.state == leases.LIVE
    assert other.get(b"o/1") == b"v" and sorted(leases.attached_keys(other.rows, LID)) == [b"o/1", b"o/2"]
    assert other.rows.get(leases.T_LEASES, leases.tomb_key(LID)) is None
    assert lease(other, LeaseCmd(Kind.PUT, LID), b"o/3", b"x").error is None  # attaching again


def test_a_revoke_needs_a_live_lease_and_two_deletions_exclude_each_other() -> None:
    home, other = setup()
    prepare_both(home, other, T1)
    second = x(other, XCmd(XOp.PREPARE, T2, HOME, START, lease=LID), revision=START)
    assert second.error is not None and second.error.startswith(xtxn.LOCKED)
    for s in (home, other):
        x(s, XCmd(XOp.ABORT, T1))
    assert lease(home, LeaseCmd(Kind.REVOKE, LID)).error is None  # the one-command path, now free
    p = logic.plan_lease([HOME, OTHER], LID)
    ready = logic.after_prepare_range(p, prepare_both(home, other, T2))
    assert isinstance(ready, logic.Ready)
    rec = home.apply(logic.record_command(T2, START, ready, lease=LID))
    assert rec.error == leases.NOT_FOUND


def test_a_record_outside_the_home_group_is_refused() -> None:
    home, other = setup()
    ready = logic.after_prepare_range(logic.plan_lease([HOME, OTHER], LID), prepare_both(home, other, T1))
    assert isinstance(ready, logic.Ready)
    rec = other.apply(logic.record_command(T1, START, ready, lease=LID))
    assert rec.error is not None and "homed in group" in rec.error


def _attach_many(home: DictState, other: DictState, n: int) -> list[bytes]:
    """`n` keys attached to LID in `other` (more than a command lists), one in `home`."""
    assert lease(home, LeaseCmd(Kind.GRANT, LID, ttl_s=10)).found
    assert lease(home, LeaseCmd(Kind.PUT, LID), b"h/1", b"v").error is None
    keys = [b"o/%04d" % i for i in range(n)]
    for k in keys:
        assert lease(other, LeaseCmd(Kind.PUT, LID), k, b"v").error is None
    other.apply(encode_command(Command.put(b"o/plain", b"v")))
    return keys


def test_the_coordinator_deletes_more_keys_than_a_command_lists_in_one_commit() -> None:
    """Through the real coordinator (`CrossTxns.run` over two state machines, each proposal
    applied at once): a group holding more keys of the lease than a COMMIT or RECORD may list
    (`xtxn.MAX_KEYS`) is deleted whole at one revision; the RECORD lists no key (the compact
    form, with the lease tail) and revokes and forgets the lease."""
    home, other = DictState(group=HOME), DictState(group=OTHER)
    keys = _attach_many(home, other, xtxn.MAX_KEYS + 40)
    groups = {HOME: home, OTHER: other}
    sent: list[XCmd] = []

    async def propose(g: int, data: bytes) -> ApplyResult:
        c = decode_command(data).x
        assert c is not None
        sent.append(c)
        return groups[g].apply(data)

    async def main() -> ApplyResult:
        coord = CrossTxns(9, propose, HybridClock(lambda: mvcc.EPOCH_MS + 10_000), timeout=2.0)
        return await coord.run(None, logic.plan_lease([HOME, OTHER], LID))

    res = asyncio.run(main())
    assert res.txn is not None and len(res.txn.responses) == len(keys) + 1 and res.revision
    records = [c for c in sent if c.op == XOp.RECORD]
    assert len(records) == 1 and records[0].lease == LID and records[0].delete_prepared
    assert records[0].groups == ((HOME, ()), (OTHER, ())) and records[0].result is None
    commits = [c for c in sent if c.op == XOp.COMMIT]
    assert len(commits) == 2 and all(c.delete_prepared and c.at == res.revision for c in commits)
    assert not any(k.startswith((b"o/0", b"h/")) for s in groups.values() for k in s.data)
    assert other.get(b"o/plain") == b"v"
    for s in groups.values():
        assert leases.attached_keys(s.rows, LID) == [] and not s.rows.has_locks()
        assert s.rows.get(leases.T_LEASES, leases.tomb_key(LID)) is not None
        assert mvcc.rev_state(s.rows).last >= res.revision
    assert leases.get_record(home.rows, LID) is None  # revoked and forgotten at the commit point
    tid = TxnId.decode(bytes(next(iter(home.rows.iter(mvcc.T_TXN, b"r", b"s")))[0])[1:])
    rec = xtxn_record(home, tid)
    assert rec is not None and rec.state == State.FINALIZED and rec.at == res.revision


def test_a_resolver_finishes_a_lease_deletion_from_its_compact_record() -> None:
    """The coordinator dies after the RECORD: a resolver's COMMIT from the record (which lists no
    key) deletes every key the group prepared, drops the attachments and keeps the tombstone."""
    home, other = DictState(group=HOME), DictState(group=OTHER)
    keys = _attach_many(home, other, xtxn.MAX_KEYS + 10)
    p = logic.plan_lease([HOME, OTHER], LID)
    ready = logic.after_prepare_range(p, prepare_both(home, other, T1))
    assert isinstance(ready, logic.Ready) and ready.delete_prepared
    assert len(ready.writes[OTHER]) == len(keys)
    assert home.apply(logic.record_command(T1, START, ready, lease=LID)).error is None
    rec = xtxn_record(home, T1)
    assert rec is not None and rec.delete_prepared and rec.writes == ((HOME, ()), (OTHER, ()))
    for g, s in ((OTHER, other), (HOME, home)):
        intent = Intent.decode(bytes(next(iter(s.rows.iter(mvcc.T_INTENTS, b"", None)))[1]))
        follow = logic.resolution(intent, g, home.apply(logic.resolve_command(intent)))
        assert follow is not None and s.apply(follow).error is None
        assert home.apply(logic.finalize_command(T1, g)).error is None  # the resolver's, naming the group
    assert not any(k.startswith((b"o/0", b"h/")) for s in (home, other) for k in s.data)
    assert other.get(b"o/plain") == b"v"
    for s in (home, other):
        assert not list(s.rows.iter(mvcc.T_INTENTS, b"", None)) and not s.rows.has_locks()
        assert leases.attached_keys(s.rows, LID) == []
    assert other.rows.get(leases.T_LEASES, leases.tomb_key(LID)) is not None
    done = xtxn_apply.record_of(home.rows, T1)
    assert done is not None and done.state == State.FINALIZED


def xtxn_record(s: DictState, t: TxnId) -> xtxn.Record | None:
    raw = s.rows.get(mvcc.T_TXN, xtxn.row_record(t))
    return None if raw is None else xtxn.decode_record(bytes(raw))


# --- both node stores: the lease lock refuses a LEASE_PUT, a snapshot carries it, COMMIT releases it
@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_node_stores_hold_the_lease_lock(kind: str, tmp_path: Path) -> None:
    def open_(name: str) -> Any:
        return LmdbNodeStore(tmp_path / name) if kind == "lmdb" else MemoryNodeStore()

    conf = ConfState((1, 2, 3))
    a, b = open_("a"), open_("b")
    g = OTHER
    try:
        assert a.bootstrap(g, conf)
        datas = [encode_command(Command.lease_command(LeaseCmd(Kind.PUT, LID), b"o/1", b"v", revision=START)),
                 encode_command(Command.cross(XCmd(XOp.PREPARE, T1, HOME, START, lease=LID), revision=START)),
                 encode_command(Command.lease_command(LeaseCmd(Kind.PUT, LID), b"o/2", b"v", revision=START))]
        es = [Entry(1, 2 + i, EntryType.NORMAL, d, g) for i, d in enumerate(datas)]
        a.persist_and_apply([GroupWrite(g, es, HardState(1, 0, es[-1].index))], ())
        ls = a.log_storage(g)
        res = a.persist_and_apply((), [ApplyBatch(g, ls.entries(1, ls.last_index() + 1), conf)])[0]
        p = res[-2].revision
        assert xtxn.decode_found(res[-2].current or b"") == [b"o/1"]
        assert res[-1].error is not None and res[-1].error.startswith(xtxn.LOCKED)
        assert [bytes(x) for x in a.revisions.range_locks(g)] == [Intent(T1, HOME, START, p).encode()]  # swept like range locks
        meta, chunks = a.snapshot_chunks(g)
        path = b.receive_snapshot(g, list(chunks))
        b.persist_and_apply([GroupWrite(g, [], HardState(1, 0, meta.index), meta, path)], ())
        more = [encode_command(Command.lease_command(LeaseCmd(Kind.PUT, LID), b"o/3", b"v", revision=START)),
                encode_command(Command.cross(XCmd(XOp.COMMIT, T1, at=p, writes=((b"o/1", None),)))),
                encode_command(Command.lease_command(LeaseCmd(Kind.PUT, LID), b"o/4", b"v", revision=START))]
        es = [Entry(1, meta.index + 1 + i, EntryType.NORMAL, d, g) for i, d in enumerate(more)]
        after = b.persist_and_apply([GroupWrite(g, es, HardState(1, 0, es[-1].index))], [ApplyBatch(g, es, conf)])[0]
        assert after[0].error is not None and after[0].error.startswith(xtxn.LOCKED)  # the lock came along
        assert after[1].error is None and b.get(g, b"o/1") is None
        assert after[2].error == leases.NOT_FOUND  # the tombstone, after the deletion
        assert b.revisions.range_locks(g) == []
    finally:
        a.close()
        b.close()


# --- feature level: the lease forms of PREPARE and RECORD are level 4 ------------------------------
def test_the_lease_forms_need_the_lease_level() -> None:
    ready = logic.Ready(START, txn.TxnResult(True, (), START), {HOME: ()})
    compact = logic.Ready(START, txn.TxnResult(True, (), START), {HOME: ((b"k", None),)}, delete_prepared=True)
    lease_forms = [encode_command(Command.cross(XCmd(XOp.PREPARE, T1, HOME, START, lease=LID), revision=START)),
                   logic.record_command(T1, START, ready, lease=LID, renews=2),
                   logic.record_command(T1, START, compact, lease=LID)]  # both tails: a lease's deletion
    # the compact form alone (a range delete's RECORD and COMMIT) is part of level 3 itself
    plain_forms = [encode_command(Command.cross(XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"k",)), revision=START)),
                   logic.record_command(T1, START, ready), logic.record_command(T1, START, compact),
                   *logic.commit_commands(T1, compact, [HOME]).values()]
    assert [command_level(d) for d in lease_forms] == [LEVEL_LEASES] * 3
    assert [command_level(d) for d in plain_forms] == [LEVEL_CROSS_TRANSACTIONS] * 4
    assert command_level(lease_forms[0][:-3]) == COMMAND_LEVELS[lease_forms[0][1]]  # garbage: its kind's level
    cluster = ClusterVersion(LEVEL_CROSS_TRANSACTIONS, {1: LEVEL_LEASES, 2: LEVEL_CROSS_TRANSACTIONS})
    gate = CommandGate(lambda: cluster, lambda: {1, 2})
    for d in plain_forms:
        gate.check(d)
    for d in lease_forms:
        with pytest.raises(errors.ClusterVersionTooLow) as e:
            gate.check(d)
        assert e.value.definite and "lease's deletion across groups" in e.value.message
        assert f"needs cluster version {LEVEL_LEASES}" in e.value.message and "node 2 (advertises 3)" in e.value.message
    cluster = ClusterVersion(LEVEL_LEASES, {1: LEVEL_LEASES, 2: LEVEL_LEASES})
    for d in lease_forms + plain_forms:
        gate.check(d)


# --- a write detaches its key: the per-batch "any attachment" flag of both row kinds ---------------
@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_a_write_detaches_after_an_attach_in_the_same_batch(kind: str, tmp_path: Path) -> None:
    store: Any = LmdbNodeStore(tmp_path / "s") if kind == "lmdb" else MemoryNodeStore()
    conf = ConfState((1, 2, 3))
    g = OTHER
    try:
        assert store.bootstrap(g, conf)
        datas = [encode_command(Command.put(b"plain", b"v", revision=START)),  # nothing attached yet
                 encode_command(Command.lease_command(LeaseCmd(Kind.PUT, LID), b"k", b"v", revision=START)),
                 encode_command(Command.lease_command(LeaseCmd(Kind.PUT, LID), b"k2", b"v", revision=START)),
                 encode_command(Command.put(b"k", b"w", revision=START)),  # detaches k (same batch)
                 encode_command(Command.delete(b"k2", revision=START))]  # and k2: none left
        es = [Entry(1, 2 + i, EntryType.NORMAL, d, g) for i, d in enumerate(datas)]
        store.persist_and_apply([GroupWrite(g, es, HardState(1, 0, es[-1].index))], ())
        ls = store.log_storage(g)
        res = store.persist_and_apply((), [ApplyBatch(g, ls.entries(1, ls.last_index() + 1), conf)])[0]
        assert all(r.error is None for r in res[-len(datas):]), res
        assert store.revisions.read_rows(g, lambda rows: (leases.attached_keys(rows, LID), rows.has_attachments(),
                                                             leases.lease_of(rows, b"k"))) == ([], False, 0)
    finally:
        store.close()
    s = DictState(group=g)
    assert not s.rows.has_attachments()
    assert lease(s, LeaseCmd(Kind.PUT, LID), b"k", b"v").error is None and s.rows.has_attachments()
    s.apply(encode_command(Command.put(b"k", b"w")))
    assert not s.rows.has_attachments() and leases.attached_keys(s.rows, LID) == []
