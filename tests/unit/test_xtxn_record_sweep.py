"""The record sweep (issue 17): a coordinator that dies between its RECORD and its FINALIZE leaves
a COMMITTED record that no resolver finishes once every participant's intents are gone (nobody
meets them), and main's age-ordered `g` rows never forget a COMMITTED record. The primary lists
such records by start (`xtxn_apply.unfinished`, rows `u`); the sweep (`node.xtxn.finish_commands`
then `finalize_command`) sends every participant's COMMIT again and FINALIZEs the record, which is
then forgotten by age with its `u` row."""

from __future__ import annotations

import pytest

from kvstore.node import xtxn as logic
from kvstore.storage import mvcc, xtxn, xtxn_apply
from kvstore.storage.commands import Command, encode_command
from kvstore.storage.machine import DictState
from kvstore.storage.txn import CmpResult, Compare, OpKind, Target, Txn, TxnOp
from kvstore.storage.xtxn import State, TxnId, XCmd, XOp

START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)
NOW_MS = mvcc.revision_ms(START) + logic.TXN_TIMEOUT_MS + 1
TID = TxnId(5, 5)


def committed_then_dead(commits: int) -> tuple[dict[int, DictState], int]:
    """A transaction over groups 1 (the primary, key a) and 2 (key b) whose coordinator died
    after its RECORD and `commits` of its COMMITs (never FINALIZE). Returns the groups and R."""
    g = {1: DictState(group=1), 2: DictState(group=2)}
    g[1].apply(encode_command(Command.put(b"a", b"1")))
    t = Txn((Compare(b"a", Target.VALUE, CmpResult.EQUAL, b"1"),),
            (TxnOp(OpKind.PUT, b"a", b"2"), TxnOp(OpKind.PUT, b"b", b"2")))
    p = logic.plan(t, [(b"a", 1), (b"b", 2)])
    res = {gid: g[gid].apply(data) for gid, data in logic.prepare_commands(p, TID, START, 0).items()}
    ready = logic.after_prepare(t, p, res)
    assert isinstance(ready, logic.Ready)
    assert isinstance(logic.after_record(TID, g[1].apply(logic.record_command(TID, START, ready))), logic.Committed)
    for gid, data in list(logic.commit_commands(TID, ready, [1, 2]).items())[:commits]:
        assert g[gid].apply(data).error is None
    return g, ready.at


def sweep(g: dict[int, DictState], now_ms: int = NOW_MS) -> int:
    """One round of the record sweep over the primary (group 1); how many records it finished."""
    stale = xtxn_apply.unfinished(g[1].rows, logic.sweep_before(now_ms), logic.RECORD_SWEEP_BATCH)
    for tid, rec in stale:
        for gid, data in sorted(logic.finish_commands(tid, rec).items()):
            g[gid].apply(data)  # applied, whatever its result
        g[1].apply(logic.finalize_command(tid))
    return len(stale)


@pytest.mark.parametrize("commits", [0, 1, 2])
def test_the_sweep_finishes_a_record_whose_coordinator_died_before_finalize(commits: int) -> None:
    g, at = committed_then_dead(commits)
    assert sweep(g, mvcc.revision_ms(START) + 10) == 0  # young: its coordinator may still finish it
    rec = xtxn_apply.record_of(g[1].rows, TID)
    assert rec is not None and rec.state == State.COMMITTED
    assert sweep(g) == 1
    rec = xtxn_apply.record_of(g[1].rows, TID)
    assert rec is not None and rec.state == State.FINALIZED and rec.writes == ()
    for s, k in ((g[1], b"a"), (g[2], b"b")):  # every participant committed at R, nothing pending
        v = mvcc.version_at(s.rows, k, at, s.get(k))
        assert v is not None and v.value == b"2" and v.meta.mod_revision == at
        assert xtxn_apply.min_pending(s.rows) == 0
    assert sweep(g) == 0  # listed no more
    g[1].apply(encode_command(Command.close(START + xtxn.MAX_AGE + 1)))
    g[1].apply(encode_command(Command.cross(XCmd(XOp.FINALIZE, TxnId(9, 9)))))  # any command of the module collects
    assert xtxn_apply.record_of(g[1].rows, TID) is None
    assert list(g[1].rows.iter(mvcc.T_TXN, b"u", b"v")) == []


def test_a_participant_whose_done_row_was_forgotten_still_counts_as_committed() -> None:
    g, _ = committed_then_dead(2)
    g[2].apply(encode_command(Command.close(START + xtxn.MAX_AGE + 1)))
    g[2].apply(encode_command(Command.cross(XCmd(XOp.FINALIZE, TxnId(9, 9)))))
    assert g[2].rows.get(mvcc.T_TXN, xtxn.row_done(TID)) is None
    again = g[2].apply(logic.finish_commands(TID, xtxn_apply.record_of(g[1].rows, TID))[2])  # type: ignore[arg-type]
    assert again.error is not None and g[2].get(b"b") == b"2"  # refused, nothing changed
    assert sweep(g) == 1
    rec = xtxn_apply.record_of(g[1].rows, TID)
    assert rec is not None and rec.state == State.FINALIZED


def test_a_coordinator_that_finalizes_leaves_nothing_to_sweep() -> None:
    g, _ = committed_then_dead(2)
    g[1].apply(logic.finalize_command(TID))
    assert list(g[1].rows.iter(mvcc.T_TXN, b"u", b"v")) == [] and sweep(g) == 0


def test_a_snapshot_with_an_unfinished_record_row_passes_the_row_check() -> None:
    """A primary holding a COMMITTED, unfinished record has a `u` row; snapshots carry it, and
    the snapshot row check (`xtxn.check_rows`) must accept it, or no follower could install a
    snapshot of that group while such a record exists."""
    g, _ = committed_then_dead(0)
    rows = [(bytes(k), bytes(v)) for k, v in g[1].rows.iter(mvcc.T_TXN, b"", None)]
    assert any(k[:1] == b"u" for k, _ in rows)
    for k, v in rows:
        xtxn.check_rows(mvcc.T_TXN, k, v)
    with pytest.raises(ValueError):
        xtxn.check_rows(mvcc.T_TXN, b"u" + bytes(3), b"")
