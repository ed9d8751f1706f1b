"""Leases in the state machine (`kvstore/storage/leases.py`, `machine.apply_lease`): the lease
commands' codec (round trips, hostile bytes), ids, the apply rules on `DictState` (grant, renew,
conditional checkpoint and expiry, revoke deleting attached keys at one revision with DELETE
changes, the tombstone that refuses a late attach, detaching by a plain write), snapshots of the lease
table on the simulator's store, and where leases meet cross-group transactions (no deletion under
an intent or a range lock; a cross-group COMMIT detaches what it writes)."""

from __future__ import annotations

import contextlib
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.version import COMMAND_LEVELS, FORM_LEVELS, LEVEL_LEASES, LEVEL_LEASES_2, SUPPORTED_LEVEL
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.storage import leases, mvcc, xtxn
from kvstore.storage.changefeed import read_changes
from kvstore.storage.commands import LEASE_OPS, Command, Op, decode_command, encode_command
from kvstore.storage.errors import SnapshotFormatError
from kvstore.storage.leases import Kind, LeaseCmd, Record
from kvstore.storage.machine import DictState
from kvstore.storage.snapfile import TAG_LEASES, SnapshotDecoder, encode_snapshot
from kvstore.storage.store import ApplyBatch, GroupWrite, NodeStore
from kvstore.storage.xtxn import TxnId, XCmd, XOp

CONF = ConfState((1, 2, 3))

G = 3
LID = leases.make_id(G, 12345)
OTHER = leases.make_id(5, 999)


def run(s: DictState, c: LeaseCmd, key: bytes = b"", value: bytes = b"") -> object:
    return s.apply(encode_command(Command.lease_command(c, key, value)))


def grant(s: DictState, lid: int = LID, ttl: int = 10) -> object:
    return run(s, LeaseCmd(Kind.GRANT, lid, ttl_s=ttl))


def lput(s: DictState, key: bytes, value: bytes, lid: int = LID) -> object:
    return run(s, LeaseCmd(Kind.PUT, lid), key, value)


def test_ids_route_by_low_bits() -> None:
    assert leases.home_group(LID) == G
    assert 0 < LID <= leases.MAX_LEASE_ID
    assert leases.make_id(4095, -1) & 0xFFF == 4095
    assert leases.make_id(1, (1 << 80)) <= leases.MAX_LEASE_ID
    for bad in (0, -1, 1 << 63, 4096, "12", True):
        with pytest.raises(ValueError):
            leases.check_id(bad)
    with pytest.raises(ValueError):
        leases.make_id(0, 1)


def test_levels_cover_every_lease_op() -> None:
    assert {int(o) for o in Op if o.name.startswith("LEASE_")} == LEASE_OPS
    sweep = {int(Op.LEASE_STATUS), int(Op.LEASE_ORPHAN)}  # the orphan sweep's: level 5 (level-4 binaries lack them)
    assert all(COMMAND_LEVELS[op] == (LEVEL_LEASES_2 if op in sweep else LEVEL_LEASES) for op in LEASE_OPS)
    assert max(*COMMAND_LEVELS.values(), *FORM_LEVELS.values()) == SUPPORTED_LEVEL  # a form may be the newest level


lease_cmds = st.one_of(
    st.builds(lambda i, t: LeaseCmd(Kind.GRANT, i, ttl_s=t), st.integers(1, 2**51 - 1).map(lambda h: h << 12 | 7),
              st.integers(leases.MIN_TTL_S, leases.MAX_TTL_S)),
    st.builds(lambda k, i: LeaseCmd(k, i), st.sampled_from([Kind.REVOKE, Kind.RENEW, Kind.DROP, Kind.FORGET, Kind.PUT]),
              st.just(LID)),
    st.builds(lambda r, m: LeaseCmd(Kind.CHECKPOINT, LID, renews=r, remaining_ms=m), st.integers(1, 2**64 - 1),
              st.integers(0, leases.MAX_TTL_S * 1000)),
    st.builds(lambda r: LeaseCmd(Kind.EXPIRE, LID, renews=r), st.integers(1, 2**64 - 1)),
)


@settings(max_examples=200, deadline=None)
@given(lease_cmds, st.binary(max_size=40), st.binary(max_size=40), st.integers(0, 2**64 - 1))
def test_codec_round_trip(c: LeaseCmd, key: bytes, value: bytes, cid: int) -> None:
    if c.kind != Kind.PUT:
        key = value = b""
    cmd = Command.lease_command(c, key, value, client_id=cid, seq=1, revision=5)
    assert decode_command(encode_command(cmd)) == cmd


@settings(max_examples=400, deadline=None)
@given(lease_cmds, st.data())
def test_hostile_bytes_raise_value_error_only(c: LeaseCmd, data: st.DataObject) -> None:
    raw = bytearray(encode_command(Command.lease_command(c, b"k" if c.kind == Kind.PUT else b"")))
    how = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    elif how == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    try:
        back = decode_command(bytes(raw))
    except ValueError:
        return
    assert decode_command(encode_command(back)) == back  # whatever decodes is a valid command


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_row_and_record_decoders_are_total(key: bytes, value: bytes) -> None:
    for f in (lambda: Record.decode(value), lambda: leases.check_rows(key, value),
              lambda: leases.decode_body(Kind.GRANT, value)):
        with contextlib.suppress(ValueError):
            f()


def test_encode_refuses_invalid_fields() -> None:
    for bad in (LeaseCmd(Kind.GRANT, LID, ttl_s=0), LeaseCmd(Kind.RENEW, LID, ttl_s=5), LeaseCmd(Kind.EXPIRE, LID),
                LeaseCmd(Kind.CHECKPOINT, LID, renews=1, remaining_ms=-1), LeaseCmd(Kind.REVOKE, 4096)):
        with pytest.raises(ValueError):
            encode_command(Command.lease_command(bad))
    with pytest.raises(ValueError):
        encode_command(Command.lease_command(LeaseCmd(Kind.REVOKE, LID), b"k"))
    with pytest.raises(ValueError):
        encode_command(Command(Op.LEASE_RENEW, b""))


def test_grant_renew_revoke_deletes_attached_keys_at_one_revision() -> None:
    s = DictState(group=G)
    r = grant(s)
    assert r.found and r.current == struct.pack(">Q", 10) and not r.error  # type: ignore[attr-defined]
    assert grant(s).error == "lease already exists"  # type: ignore[attr-defined]
    assert grant(s, lid=OTHER).error  # type: ignore[attr-defined]  # homed in group 5, not here
    for k in (b"a", b"b", b"c"):
        assert not lput(s, k, b"v").error  # type: ignore[attr-defined]
    s.apply(encode_command(Command.put(b"c", b"plain")))  # a plain write detaches "c"
    never = leases.make_id(G, 4242)  # homed here, never granted: the home refuses it
    assert lput(s, b"x", b"v", lid=never).error == leases.NOT_FOUND  # type: ignore[attr-defined]
    rn = run(s, LeaseCmd(Kind.RENEW, LID))
    assert rn.found and leases.get_record(s.rows, LID) == Record(10, 10_000, 2)  # type: ignore[attr-defined]
    rv = run(s, LeaseCmd(Kind.REVOKE, LID))
    assert rv.found and rv.current == struct.pack(">Q", 2) and rv.revision > 0  # type: ignore[attr-defined]
    assert s.data == {b"c": b"plain"}
    changes = read_changes(s.rows, rv.revision, rv.revision, max_events=10, max_bytes=1 << 20, prev_kv=False)  # type: ignore[attr-defined]
    assert sorted((c.key, c.value) for c in changes.changes) == [(b"a", None), (b"b", None)]
    # a revoked lease: renew finds nothing, a put is refused, a second revoke is "not found"
    assert not run(s, LeaseCmd(Kind.RENEW, LID)).found  # type: ignore[attr-defined]
    assert lput(s, b"d", b"v").error == leases.NOT_FOUND  # type: ignore[attr-defined]
    assert run(s, LeaseCmd(Kind.REVOKE, LID)).error == leases.NOT_FOUND  # type: ignore[attr-defined]
    assert run(s, LeaseCmd(Kind.FORGET, LID)).found  # type: ignore[attr-defined]
    assert leases.get_record(s.rows, LID) is None
    assert grant(s).error == "lease already exists"  # an id is never live twice
    assert lput(s, b"d", b"v").error == leases.NOT_FOUND  # type: ignore[attr-defined]


def test_expire_and_checkpoint_are_conditional_on_the_renew_count() -> None:
    s = DictState(group=G)
    grant(s, ttl=30)
    lput(s, b"k", b"v")
    assert run(s, LeaseCmd(Kind.CHECKPOINT, LID, renews=1, remaining_ms=12_000)).found  # type: ignore[attr-defined]
    assert leases.get_record(s.rows, LID) == Record(30, 12_000, 1)
    run(s, LeaseCmd(Kind.RENEW, LID))
    # the leader read renews=1 before the renew committed: both its steps are no-ops now
    assert not run(s, LeaseCmd(Kind.CHECKPOINT, LID, renews=1, remaining_ms=1)).found  # type: ignore[attr-defined]
    assert not run(s, LeaseCmd(Kind.EXPIRE, LID, renews=1)).found  # type: ignore[attr-defined]
    assert s.data == {b"k": b"v"} and leases.get_record(s.rows, LID) == Record(30, 30_000, 2)
    ex = run(s, LeaseCmd(Kind.EXPIRE, LID, renews=2))
    assert ex.found and s.data == {}  # type: ignore[attr-defined]
    assert leases.get_record(s.rows, LID) == Record(30, 0, 2, leases.REVOKED)


def test_drop_in_another_group_and_the_late_attach() -> None:
    other = DictState(group=5)
    assert not lput(other, b"k1", b"v").error  # type: ignore[attr-defined]  # the client checked the home first
    assert not lput(other, b"k2", b"v").error  # type: ignore[attr-defined]
    assert leases.attached_leases(other.rows) == [LID]
    d = other.apply(encode_command(Command.lease_command(LeaseCmd(Kind.DROP, LID))))
    assert d.found and d.current == struct.pack(">Q", 2) and other.data == {}
    assert leases.attached_leases(other.rows) == []
    # a put of the lease that arrives after the drop is refused: nothing stays attached to it
    assert lput(other, b"k3", b"v").error == leases.NOT_FOUND  # type: ignore[attr-defined]
    assert other.data == {}
    # the home-only commands are refused elsewhere
    assert run(other, LeaseCmd(Kind.REVOKE, LID)).error  # type: ignore[attr-defined]


def test_reattach_moves_the_key_to_the_new_lease() -> None:
    s = DictState(group=G)
    second = leases.make_id(G, 777)
    grant(s)
    grant(s, lid=second)
    lput(s, b"k", b"1")
    lput(s, b"k", b"2", lid=second)
    assert leases.lease_of(s.rows, b"k") == second
    run(s, LeaseCmd(Kind.REVOKE, LID))
    assert s.data == {b"k": b"2"}
    run(s, LeaseCmd(Kind.REVOKE, second))
    assert s.data == {}


def _apply(store: Any, g: int, datas: list[bytes]) -> list[Any]:
    start = store.applied_index(g) + 1
    es = [Entry(1, start + i, EntryType.NORMAL, d) for i, d in enumerate(datas)]
    store.persist([GroupWrite(g, es)])
    return list(store.apply([ApplyBatch(g, es, CONF)])[0])


def _lease_cmds() -> list[bytes]:
    c = Command.lease_command
    return [encode_command(c(LeaseCmd(Kind.GRANT, LID, ttl_s=10))),
            encode_command(c(LeaseCmd(Kind.PUT, LID), b"k", b"v")),
            encode_command(c(LeaseCmd(Kind.PUT, OTHER), b"j", b"w")),
            encode_command(c(LeaseCmd(Kind.CHECKPOINT, LID, renews=1, remaining_ms=4_000))),
            encode_command(c(LeaseCmd(Kind.DROP, leases.make_id(9, 1))))]


def test_lmdb_and_memory_stores_apply_and_snapshot_the_lease_table(tmp_path: Path) -> None:
    """The LMDB store and the simulator's store give DictState's results, carry the lease rows in
    raft snapshots byte for byte alike, and a snapshot installed elsewhere brings the leases along
    (a revoke there deletes the attached key)."""
    lm = NodeStore(tmp_path / "a", sync=False)
    mem = MemoryNodeStore(rng=random.Random(1))
    ref = DictState(group=G)
    want = [ref.apply(d) for d in _lease_cmds()]
    assert _apply(lm, G, _lease_cmds()) == want == _apply(mem, G, _lease_cmds())
    m1, c1 = lm.snapshot_chunks(G)
    _, c2 = mem.snapshot_chunks(G)
    img = b"".join(c1)
    assert img == b"".join(c2)
    dec = SnapshotDecoder()
    recs = dec.feed(img)
    dec.finish()
    assert {k[:1] for t, k, _ in recs if t == TAG_LEASES} == {b"L", b"A", b"K", b"X", b"x", b"C"}
    other = NodeStore(tmp_path / "b", sync=False)
    path = other.receive_snapshot(G, iter([img]))
    other.persist([GroupWrite(G, [], HardState(m1.term, 0, m1.index), m1, path)])
    rv = _apply(other, G, [encode_command(Command.lease_command(LeaseCmd(Kind.REVOKE, LID)))])
    assert rv[0].found and other.get(G, b"k") is None and other.get(G, b"j") == b"w"
    for st_ in (lm, other):
        st_.close()


def test_snapshot_install_refuses_a_bad_lease_row(tmp_path: Path) -> None:
    from kvstore.raft.types import SnapshotMeta

    meta = SnapshotMeta(5, 1, CONF)
    img = b"".join(encode_snapshot(G, meta, iter([(TAG_LEASES, b"L" + bytes(8), b"junk")]), 1 << 16))
    st_ = NodeStore(tmp_path / "c", sync=False)
    path = st_.receive_snapshot(G, iter([img]))
    with pytest.raises(SnapshotFormatError):
        st_.persist([GroupWrite(G, [], HardState(1, 0, 5), meta, path)])
    st_.close()


def test_a_revoke_waits_while_an_attached_key_is_frozen_for_a_move() -> None:
    """A frozen range is immutable while it is exported, and its keys move with their
    attachments: the deletion is refused whole (WRONG_SHARD, nothing changed) and runs again
    after the move (tests/unit/test_lease_moves.py has the move)."""
    from kvstore.shard.ranges import IntervalSet, key_hash
    from kvstore.storage.shardcmd import ShardState

    s = DictState(group=G)
    grant(s)
    lput(s, b"moving", b"v")
    lput(s, b"staying", b"v")
    h = key_hash(b"moving")
    everything = IntervalSet.full()
    frozen = IntervalSet([(h, h + 1)])
    s.shard_state = ShardState(everything.difference(frozen), frozen)
    r = run(s, LeaseCmd(Kind.REVOKE, LID))
    assert r.wrong_shard and r.error == leases.LEASE_MOVING  # type: ignore[attr-defined]
    assert s.data == {b"moving": b"v", b"staying": b"v"}
    rec = leases.get_record(s.rows, LID)
    assert rec is not None and rec.state == leases.LIVE
    s.shard_state = ShardState(everything.difference(frozen), IntervalSet())  # the move dropped it
    r = run(s, LeaseCmd(Kind.REVOKE, LID))
    assert r.found and r.current == struct.pack(">Q", 1)  # type: ignore[attr-defined]
    assert s.data == {b"moving": b"v"}  # a row the group no longer owns is only detached
    assert leases.attached_keys(s.rows, LID) == []


# --- where leases meet cross-group transactions --------------------------------------------------
T1, T2 = TxnId(1, 1), TxnId(2, 7)
START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)


def xrun(s: DictState, x: XCmd, revision: int = 0) -> Any:
    return s.apply(encode_command(Command.cross(x, 0, 0, 0, revision)))


def test_a_lease_deletion_never_deletes_under_an_intent() -> None:
    s = DictState(group=G)
    grant(s)
    for k in (b"a", b"b"):
        lput(s, k, b"v")
    s.apply(encode_command(Command.put(b"z", b"plain")))
    p = xrun(s, XCmd(XOp.PREPARE, T1, 1, START, keys=(b"b",)))
    assert p.error is None
    before = (dict(s.data), leases.attached_keys(s.rows, LID), leases.get_record(s.rows, LID))
    for c in (LeaseCmd(Kind.REVOKE, LID), LeaseCmd(Kind.EXPIRE, LID, renews=1), LeaseCmd(Kind.DROP, LID)):
        r = s.apply(encode_command(Command.lease_command(c, client_id=9, seq=1, ack=1)))
        assert r.error is not None and r.error.startswith(xtxn.LOCKED) and r.current is not None
        assert xtxn.decode_lock(r.current)[0] == b"b"
        assert s.session_result(9, 1) is None  # not cached: the retry applies once the intent is gone
        assert (dict(s.data), leases.attached_keys(s.rows, LID), leases.get_record(s.rows, LID)) == before
    # another lease's deletion is not held back by an intent on a key it does not hold
    second = leases.make_id(G, 31)
    grant(s, lid=second)
    lput(s, b"c", b"v", lid=second)
    assert run(s, LeaseCmd(Kind.REVOKE, second)).found  # type: ignore[attr-defined]
    assert b"c" not in s.data
    xrun(s, XCmd(XOp.ABORT, T1))
    rv = s.apply(encode_command(Command.lease_command(LeaseCmd(Kind.REVOKE, LID), client_id=9, seq=1, ack=1)))
    assert rv.found and rv.current == struct.pack(">Q", 2) and s.data == {b"z": b"plain"}


def test_a_range_lock_holds_back_a_lease_deletion_in_another_group() -> None:
    other = DictState(group=5)
    for k in (b"d/1", b"e/1"):
        lput(other, k, b"v")
    assert xrun(other, XCmd(XOp.PREPARE, T2, 1, START, lock=(b"d/", b"d0"))).error is None
    r = other.apply(encode_command(Command.lease_command(LeaseCmd(Kind.DROP, LID))))
    assert r.error is not None and r.error.startswith(xtxn.LOCKED)
    assert other.data == {b"d/1": b"v", b"e/1": b"v"} and leases.attached_leases(other.rows) == [LID]
    assert other.rows.get(leases.T_LEASES, leases.tomb_key(LID)) is None  # no tombstone either: all or nothing
    xrun(other, XCmd(XOp.ABORT, T2))
    d = other.apply(encode_command(Command.lease_command(LeaseCmd(Kind.DROP, LID))))
    assert d.found and other.data == {}


def test_a_cross_group_commit_detaches_the_keys_it_writes() -> None:
    s = DictState(group=G)
    grant(s)
    for k in (b"a", b"b", b"c", b"d/1"):
        lput(s, k, b"v")
    p = xrun(s, XCmd(XOp.PREPARE, T1, 1, START, keys=(b"a", b"b"))).revision
    assert xrun(s, XCmd(XOp.COMMIT, T1, at=p, writes=((b"a", b"new"), (b"b", None)))).error is None
    assert leases.lease_of(s.rows, b"a") == 0 and leases.lease_of(s.rows, b"b") == 0
    # a range delete's COMMIT detaches what it deletes
    rp = xrun(s, XCmd(XOp.PREPARE, T2, 1, START, lock=(b"d/", b"d0")))
    assert rp.error is None and rp.current is not None and xtxn.decode_found(rp.current) == [b"d/1"]
    assert xrun(s, XCmd(XOp.COMMIT, T2, at=rp.revision, writes=((b"d/1", None),))).error is None
    assert leases.attached_keys(s.rows, LID) == [b"c"]
    rv = run(s, LeaseCmd(Kind.REVOKE, LID))
    # the lease's expiry deletes only the key still attached: the transaction's write stays
    assert rv.current == struct.pack(">Q", 1) and s.data == {b"a": b"new"}  # type: ignore[attr-defined]
