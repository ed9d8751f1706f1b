"""Review findings on transactions across groups (issue 17), each with the test that failed
before its fix: a range delete finding more keys than a command may list commits (its RECORD and
COMMITs say "every key prepared"); a RECORD that cannot be built releases every participant and
answers a definite InvalidArgument; a failure that is no KVError releases what was prepared
(definite) or, once the RECORD was sent, is indeterminate; group ids are bounded in the decoder;
snapshots' transaction rows are validated whole (`xtxn.check_rows`, fuzzed); the GC skips a
malformed row instead of stopping. The coordinator is the real `CrossTxns` over real state
machines (`DictState`, each proposal applied at once)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node import xtxn as logic
from kvstore.node.hlc import HybridClock
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.store import GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import HardState, SnapshotMeta
from kvstore.server.xtxn_run import CrossTxns
from kvstore.storage import leases, mvcc, xtxn, xtxn_apply
from kvstore.storage.commands import ApplyResult, Command, Op, decode_command, encode_command
from kvstore.storage.errors import SnapshotFormatError
from kvstore.storage.machine import DictState
from kvstore.storage.snapfile import TAG_REV_BASE, encode_snapshot
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.txn import OpKind, Txn, TxnOp, TxnResult
from kvstore.storage.xtxn import Intent, Record, State, TxnId, XCmd, XOp

NOW_MS = mvcc.EPOCH_MS + 10_000
START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)
T1 = TxnId(1, 1)


def _groups(n: int = 2) -> dict[int, DictState]:
    return {g: DictState(group=g) for g in range(1, n + 1)}


def _coordinator(g: dict[int, DictState], wrap: Callable[[int, bytes], Awaitable[None]] | None = None) -> CrossTxns:
    async def propose(gid: int, data: bytes) -> ApplyResult:
        if wrap is not None:
            await wrap(gid, data)
        return g[gid].apply(data)

    return CrossTxns(9, propose, HybridClock(lambda: NOW_MS), timeout=2.0)


def _intents(s: DictState) -> list[tuple[bytes, bytes]]:
    return list(s.rows.iter(mvcc.T_INTENTS, b"", None))


# --- 1. a range delete larger than a command may list --------------------------------------------
def test_a_range_delete_of_more_keys_than_a_command_lists_commits_whole() -> None:
    g = _groups()
    n1, n2 = xtxn.MAX_KEYS + 72, 40
    for i in range(n1):
        g[1].apply(encode_command(Command.put(b"r/1/%04d" % i, b"v")))
    for i in range(n2):
        g[2].apply(encode_command(Command.put(b"r/2/%04d" % i, b"v")))
    g[2].apply(encode_command(Command.put(b"s/keep", b"v")))

    async def main() -> ApplyResult:
        return await _coordinator(g).run(None, logic.plan_range([1, 2], b"r/", b"r0"))

    res = asyncio.run(main())
    assert res.txn is not None and len(res.txn.responses) == n1 + n2 and res.revision
    assert not any(k.startswith(b"r/") for s in g.values() for k in s.data)
    assert g[2].data[b"s/keep"] == b"v"
    assert not _intents(g[1]) and not _intents(g[2])
    rec = xtxn_apply.record_of(g[1].rows, next(iter(_records(g[1]))))
    assert rec is not None and rec.state == State.FINALIZED


def _records(s: DictState) -> list[TxnId]:
    return [TxnId.decode(bytes(k)[1:]) for k, _ in s.rows.iter(mvcc.T_TXN, b"r", b"s")]


def test_a_resolver_commits_a_range_delete_from_its_compact_record() -> None:
    """The coordinator dies after the RECORD: a resolver's COMMIT from the record deletes every
    key the group prepared (the record lists none of them)."""
    g = _groups()
    for i in range(xtxn.MAX_KEYS + 10):
        g[2].apply(encode_command(Command.put(b"r/%04d" % i, b"v")))
    p = logic.plan_range([1, 2], b"r/", b"r0")
    got = {gid: g[gid].apply(c) for gid, c in logic.prepare_commands(p, T1, START, 0).items()}
    ready = logic.after_prepare_range(p, got)
    assert isinstance(ready, logic.Ready)
    rec = g[1].apply(logic.record_command(T1, START, ready))
    assert rec.error is None
    intent = Intent.decode(bytes(_intents(g[2])[0][1]))
    follow = logic.resolution(intent, 2, g[1].apply(logic.resolve_command(intent)))
    assert follow is not None and g[2].apply(follow).error is None
    assert not g[2].data and not _intents(g[2])


def test_a_record_that_cannot_be_built_releases_every_group_definitely() -> None:
    """GETs of ten 1 MiB values: the prepared values fit a result, but not a RECORD."""
    g = _groups()
    big = b"x" * (1 << 20)
    ks = [(b"a%d" % i, 1 + i % 2) for i in range(10)]
    for k, gid in ks:
        g[gid].apply(encode_command(Command.put(k, big)))
    t = Txn((), (*(TxnOp(OpKind.GET, k) for k, _ in ks), TxnOp(OpKind.PUT, b"w", b"1")))
    p = logic.plan(t, [*ks, (b"w", 1)])

    async def main() -> None:
        with pytest.raises(errors.InvalidArgument) as e:
            await _coordinator(g).run(t, p)
        assert not e.value.indeterminate and "cannot be recorded" in e.value.message

    asyncio.run(main())
    assert not _intents(g[1]) and not _intents(g[2])
    assert b"w" not in g[1].data and not _records(g[1])


def test_plan_range_is_the_one_check_of_a_range() -> None:
    with pytest.raises(ValueError, match="at or before"):
        logic.plan_range([1], b"b", b"a")
    with pytest.raises(ValueError, match="at most"):
        logic.plan_range(range(1, xtxn.MAX_GROUPS_PER_TXN + 2), b"a", b"")
    with pytest.raises(ValueError, match="no data group"):
        logic.plan_range([], b"a", b"")


# --- 2. failures that are no KVError ---------------------------------------------------------------
TRANSFER = Txn((), (TxnOp(OpKind.PUT, b"a", b"1"), TxnOp(OpKind.PUT, b"b", b"2")))
PLAN = logic.plan(TRANSFER, [(b"a", 1), (b"b", 2)])


def _breaking(op: Op, group: int) -> Callable[[int, bytes], Awaitable[None]]:
    async def wrap(gid: int, data: bytes) -> None:
        if gid == group and decode_command(data).op == op:
            raise RuntimeError("the proposal path broke")
    return wrap


def test_a_broken_prepare_releases_the_prepared_groups_definitely() -> None:
    g = _groups()

    async def main() -> None:
        with pytest.raises(errors.ProposalDropped) as e:
            await _coordinator(g, _breaking(Op.PREPARE, 2)).run(TRANSFER, PLAN)
        assert not e.value.indeterminate
        # and so it reads at the client, over the wire
        back = errors.from_proto(errors.to_proto(e.value), is_write=True)
        assert back is not None and back.definite

    asyncio.run(main())
    assert not _intents(g[1]), "group 1's intents leaked"
    assert not g[1].data and not g[2].data


def test_a_broken_record_is_indeterminate_and_keeps_the_intents() -> None:
    g = _groups()

    async def main() -> None:
        with pytest.raises(errors.InternalError) as e:
            await _coordinator(g, _breaking(Op.RECORD, 1)).run(TRANSFER, PLAN)
        assert e.value.indeterminate
        back = errors.from_proto(errors.to_proto(e.value), is_write=True)
        assert back is not None and back.indeterminate

    asyncio.run(main())
    # nothing aborted: the RECORD may have applied; a resolver settles it (no record: ABORTED)
    assert _intents(g[1]) and _intents(g[2])


def test_a_broken_commit_after_the_record_still_answers_success() -> None:
    g = _groups()

    async def main() -> ApplyResult:
        return await _coordinator(g, _breaking(Op.COMMIT, 2)).run(TRANSFER, PLAN)

    res = asyncio.run(main())
    assert res.txn is not None and res.txn.succeeded
    assert g[1].data[b"a"] == b"1" and _intents(g[2])  # group 2 is left to a resolver
    rec = xtxn_apply.record_of(g[1].rows, _records(g[1])[0])
    assert rec is not None and rec.state == State.COMMITTED and rec.writes_of(2) == ((b"b", b"2"),)


# --- 8. group ids bounded in the decoder -----------------------------------------------------------
def test_group_ids_are_bounded_in_the_codecs() -> None:
    g = mvcc.MAX_GROUPS
    good = xtxn.encode_body(XCmd(XOp.PREPARE, T1, 5, START, keys=(b"k",)))
    bad = good[:16] + struct.pack(">Q", g) + good[24:]
    with pytest.raises(ValueError, match="primary group"):
        xtxn.decode_body(XOp.PREPARE, bad)
    with pytest.raises(ValueError, match="primary group"):
        xtxn.encode_body(XCmd(XOp.PREPARE, T1, g, START, keys=(b"k",)))
    with pytest.raises(ValueError, match="group"):
        xtxn.decode_body(XOp.FINALIZE, T1.encode() + struct.pack(">Q", g))
    with pytest.raises(ValueError, match="group"):
        xtxn.encode_body(XCmd(XOp.RECORD, T1, start=START, at=START, groups=((g, ()),)))
    rec = xtxn.encode_record(Record(State.COMMITTED, START, START, None, ((5, ()),)))
    forged = rec[:-10] + struct.pack(">Q", g) + rec[-2:]
    with pytest.raises(ValueError, match="group"):
        xtxn.decode_record(forged)


# --- 3. snapshot rows ------------------------------------------------------------------------------
def _real_rows() -> list[tuple[int, bytes, bytes]]:
    """Every kind of row a group really holds (a range delete prepared, a lease's deletion
    prepared, a record, done rows)."""
    s = DictState(group=1)
    for k in (b"d/1", b"d/2"):
        s.apply(encode_command(Command.put(k, b"v")))
    s.apply(encode_command(Command.cross(XCmd(XOp.PREPARE, T1, 1, START, keys=(b"x",), lock=(b"d/", b"d0")),
                                         revision=0)))
    s.apply(encode_command(Command.cross(XCmd(XOp.RESOLVE, TxnId(2, 2), start=START))))
    s.apply(encode_command(Command.cross(XCmd(XOp.PREPARE, TxnId(3, 3), 1, START, keys=(b"y",)))))
    s.apply(encode_command(Command.cross(XCmd(XOp.ABORT, TxnId(3, 3)))))
    s.apply(encode_command(Command.cross(XCmd(XOp.PREPARE, TxnId(4, 4), 1, START, lease=leases.make_id(1, 7)))))
    rows = [(t, bytes(k), bytes(v)) for t in (mvcc.T_TXN, mvcc.T_INTENTS) for k, v in s.rows.iter(t, b"", None)]
    assert {k[:1] for t, k, _ in rows if t == mvcc.T_TXN} == {b"t", b"l", b"e", b"p", b"r", b"d", b"g"}
    return rows


_ROWS = _real_rows()


def test_check_rows_accepts_every_real_row() -> None:
    for t, k, v in _real_rows():
        xtxn.check_rows(t, k, v)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([mvcc.T_TXN, mvcc.T_INTENTS]), st.data())
def test_check_rows_is_total_and_what_it_accepts_reads_back(table: int, data: st.DataObject) -> None:
    rows = [r for r in _ROWS if r[0] == table]
    _t, k, v = data.draw(st.sampled_from(rows))
    k = data.draw(st.sampled_from([k, k[:-1], k + b"\0", b"", k[:1] + bytes(8)]))
    raw = bytearray(v)
    if raw and data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    v = bytes(raw[:data.draw(st.integers(0, len(raw)))]) + data.draw(st.binary(max_size=3))
    try:
        xtxn.check_rows(table, k, v)
    except ValueError:
        return
    # an accepted row reads back without any other exception
    s = DictState(group=1)
    s.rows.put(table, k, v)
    assert xtxn_apply.min_pending(s.rows) >= 0
    xtxn_apply.range_locks(s.rows)
    xtxn_apply.lease_locks(s.rows)
    s.apply(encode_command(Command.cross(XCmd(XOp.FINALIZE, TxnId(9, 9)))))  # runs the GC


def test_min_pending_of_a_short_pending_row_is_a_revision_error_not_struct_error() -> None:
    s = DictState(group=1)
    s.rows.put(mvcc.T_TXN, b"p\x01", b"")
    with pytest.raises(mvcc.RevisionError):
        xtxn_apply.min_pending(s.rows)
    with pytest.raises(ValueError, match="p row key"):
        xtxn.check_rows(mvcc.T_TXN, b"p\x01", b"")


def test_the_gc_skips_a_malformed_row_instead_of_stopping() -> None:
    s = DictState(group=1)
    s.apply(encode_command(Command.cross(XCmd(XOp.RESOLVE, T1, start=START))))  # ABORTED record + g row
    s.rows.put(mvcc.T_TXN, b"g\x00", b"")  # sorts before every real g row
    s.apply(encode_command(Command.close(START + xtxn.MAX_AGE + 1)))
    s.apply(encode_command(Command.cross(XCmd(XOp.FINALIZE, TxnId(9, 9)))))
    assert xtxn_apply.record_of(s.rows, T1) is None, "the GC stopped at the malformed row"


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
@pytest.mark.parametrize("row", [
    (mvcc.T_TXN, b"p\x01", b""),  # a short pending row (min_pending: struct.error)
    (mvcc.T_TXN, b"g" + bytes(3), b""),  # a malformed GC row (the GC loop stopped at it)
    (mvcc.T_TXN, b"r" + bytes(16), b"\x09junk"),  # a record of no state
    (mvcc.T_TXN, b"e" + bytes(16), bytes(xtxn.INTENT_BYTES + 8)),  # a lease lock of lease id 0
    (mvcc.T_INTENTS, b"k", b"short"),  # an intent row that does not decode
])
def test_snapshot_install_refuses_a_bad_transaction_row(kind: str, row: tuple[int, bytes, bytes], tmp_path: Path) -> None:
    meta = SnapshotMeta(5, 1, ConfState((1, 2, 3)))
    t, k, v = row
    img = b"".join(encode_snapshot(4, meta, iter([(TAG_REV_BASE + t, k, v)]), 1 << 16))
    store = LmdbNodeStore(tmp_path / "s") if kind == "lmdb" else MemoryNodeStore()
    try:
        path = store.receive_snapshot(4, iter([img]))
        with pytest.raises(SnapshotFormatError, match=r"transaction row|bad row"):
            store.persist_and_apply([GroupWrite(4, [], HardState(1, 0, 5), meta, path)], ())
    finally:
        with contextlib.suppress(Exception):
            store.close()


def test_a_snapshot_of_real_transaction_rows_installs(tmp_path: Path) -> None:
    meta = SnapshotMeta(5, 1, ConfState((1, 2, 3)))
    recs = sorted((TAG_REV_BASE + t, k, v) for t, k, v in _ROWS)
    img = b"".join(encode_snapshot(4, meta, iter(recs), 1 << 16))
    store = LmdbNodeStore(tmp_path / "s")
    try:
        path = store.receive_snapshot(4, iter([img]))
        store.persist_and_apply([GroupWrite(4, [], HardState(1, 0, 5), meta, path)], ())
        assert store._kv.min_pending(4) > 0
    finally:
        store.close()


def test_results_of_a_range_delete_need_no_record_result() -> None:
    r = logic.Ready(START, TxnResult(True, (), START), {1: ((b"k", None),)}, delete_prepared=True)
    x = decode_command(logic.record_command(T1, START, r)).x
    assert x is not None and x.delete_prepared and x.groups == ((1, ()),) and x.result is None


def test_the_record_sweep_commits_a_range_delete_from_its_compact_record() -> None:
    """The coordinator dies after the RECORD and nobody meets the intents: the record sweep's
    COMMITs (`finish_commands`) delete every key each group prepared, as a resolver's do (before
    the fix they carried no `delete_prepared`: the intents were released and the keys kept)."""
    g = _groups()
    for i in range(40):
        g[1 + i % 2].apply(encode_command(Command.put(b"s/%04d" % i, b"v")))
    p = logic.plan_range([1, 2], b"s/", b"s0")
    got = {gid: g[gid].apply(c) for gid, c in logic.prepare_commands(p, T1, START, 0).items()}
    ready = logic.after_prepare_range(p, got)
    assert isinstance(ready, logic.Ready)
    assert g[1].apply(logic.record_command(T1, START, ready)).error is None
    stale = xtxn_apply.unfinished(g[1].rows, logic.sweep_before(NOW_MS), logic.RECORD_SWEEP_BATCH)
    assert [tid for tid, _ in stale] == [T1]
    for gid, data in sorted(logic.finish_commands(T1, stale[0][1]).items()):
        assert g[gid].apply(data).error is None
    assert not g[1].data and not g[2].data
    assert not _intents(g[1]) and not _intents(g[2])
