"""CLOSE: closing a group at a revision (commands.py, machine.close; docs/REVISIONS.md, "Reads at a
revision"). The command's encoding is total and strict; applying it raises the group's last
revision without writing, on both stores and through snapshots, and every later write of the
group gets a higher revision."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.store import ApplyBatch, GroupWrite, NodeStore
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.storage import commands as cmds
from kvstore.storage import mvcc
from kvstore.storage.machine import DictState, UnknownCommandKind
from kvstore.storage.store import LmdbNodeStore

CONF = ConfState((1,))
NOW = mvcc.make_revision(mvcc.EPOCH_MS + 3_600_000, 0, 0)
_HEAD = struct.Struct(">BBQQQBQQ")


# --- the encoding ------------------------------------------------------------------------------
@given(st.integers(0, (1 << 64) - 1))
def test_close_round_trips_and_is_a_header_and_one_u64(rev: int) -> None:
    data = cmds.encode_close(rev)
    assert len(data) == _HEAD.size + 8 and data[0] == cmds.FORMAT_VERSION and data[1] == cmds.Op.CLOSE == 5
    assert cmds.decode_command(data) == cmds.Command.close(rev) == cmds.Command(cmds.Op.CLOSE, b"", revision=rev)


@pytest.mark.parametrize("rev", [-1, 1 << 64])
def test_close_of_a_revision_outside_u64_is_refused_by_the_encoder(rev: int) -> None:
    with pytest.raises(ValueError):
        cmds.encode_close(rev)


@pytest.mark.parametrize(
    "cmd",
    [
        cmds.Command(cmds.Op.CLOSE, b"k", revision=5),
        cmds.Command(cmds.Op.CLOSE, b"", b"v", revision=5),
        cmds.Command(cmds.Op.CLOSE, b"", client_id=1, seq=1, revision=5),
        cmds.Command(cmds.Op.CLOSE, b"", horizon=3, revision=5),
        cmds.Command(cmds.Op.CLOSE, b"", retry=True, revision=5),
    ],
)
def test_close_carries_no_key_value_or_session(cmd: cmds.Command) -> None:
    with pytest.raises(ValueError):
        cmds.encode_command(cmd)


def _close_bytes(version: int, cid: int, seq: int, ack: int, flags: int, horizon: int, hrev: int, body: bytes) -> bytes:
    return _HEAD.pack(version, int(cmds.Op.CLOSE), cid, seq, ack, flags, horizon, hrev) + body


@given(
    st.sampled_from([1, 2, 3, 4]),
    st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2),
    st.binary(max_size=12),
)
def test_close_decoder_accepts_exactly_the_well_formed_command(
    version: int, cid: int, seq: int, ack: int, flags: int, horizon: int, hrev: int, body: bytes
) -> None:
    data = _close_bytes(version, cid, seq, ack, flags, horizon, hrev, body)
    well_formed = version == 3 and not (cid or seq or ack or flags or horizon or hrev) and len(body) == 8
    try:
        cmd = cmds.decode_command(data)
    except ValueError as err:
        assert not well_formed, err
        return
    assert well_formed and cmd == cmds.Command.close(int.from_bytes(body, "big"))


@settings(max_examples=300)
@given(st.binary(max_size=64), st.integers(0, 60))
def test_close_decoder_is_total_on_garbage_and_mutations(garbage: bytes, flip: int) -> None:
    """Random bytes and single-byte mutations of a valid CLOSE: a Command or ValueError, never
    anything else; and applying them as entries gives a result, never an exception, except for
    what a newer release would write (the current format's well-formed header with an op code
    this release does not know, `cmds.unknown_kind`): that stops apply (UnknownCommandKind, the
    cluster-version backstop) and changes nothing."""
    good = bytearray(cmds.encode_close(NOW))
    good[flip % len(good)] ^= 0xFF if flip < len(good) else 0
    for data in (garbage, bytes(good), bytes([3, 5]) + garbage, bytes(good[: flip % len(good)])):
        with contextlib.suppress(ValueError):
            cmds.decode_command(data)
        s = DictState(group=3)
        if cmds.unknown_kind(data) is not None:
            before = (dict(s.data), [dict(t) for t in s.rows.tables])
            with pytest.raises(UnknownCommandKind):
                s.apply(data)
            assert (dict(s.data), [dict(t) for t in s.rows.tables]) == before
            continue
        res = s.apply(data)
        assert res.error is not None or res.revision >= 0


# --- applying it -------------------------------------------------------------------------------
@given(st.integers(0, (1 << 64) - 1), st.integers(0, 40))
def test_close_raises_last_and_later_writes_go_above_it(rev: int, writes: int) -> None:
    s = DictState(group=7)
    w = s.apply(cmds.encode_put(b"k", b"v", revision=NOW)).revision
    before = (dict(s.data), [dict(t) for t in s.rows.tables])
    res = s.apply(cmds.encode_close(rev))
    st_after = mvcc.rev_state(s.rows)
    if rev > mvcc.PROPOSAL_MAX:
        assert res.error is not None and "out of range" in res.error
        assert (s.data, s.rows.tables) == before  # refused: nothing changed
        assert st_after.last == w
    else:
        assert res.error is None and res.revision == max(w, rev) == st_after.last
        assert s.data == before[0]  # no data, no history row, no change row
        assert [s.rows.tables[t] for t in (mvcc.T_KEYS, mvcc.T_HIST, mvcc.T_CHANGES)] == [
            before[1][t] for t in (mvcc.T_KEYS, mvcc.T_HIST, mvcc.T_CHANGES)
        ]
    # Every later write, whatever its proposal, is above the closed revision and in the slot.
    nxt = s.apply(cmds.encode_put(b"k", b"w%d" % writes, revision=NOW)).revision
    assert nxt > st_after.last and nxt % mvcc.STEP == 7
    # A read at the closed revision answers what it did before the write.
    if rev <= mvcc.PROPOSAL_MAX and rev >= w:
        got = mvcc.version_at(s.rows, b"k", rev, s.data.get(b"k"))
        assert got is not None and got.value == b"v"


def test_close_never_lowers_last_and_answers_the_last_revision() -> None:
    s = DictState(group=2)
    hi = NOW + 100 * mvcc.STEP
    assert s.apply(cmds.encode_close(hi)).revision == hi
    assert s.apply(cmds.encode_close(NOW)).revision == hi  # below: a no-op answering last
    assert s.apply(cmds.encode_close(0)).revision == hi
    assert mvcc.rev_state(s.rows).last == hi


def test_close_takes_no_session_even_when_built_directly() -> None:
    from kvstore.storage.machine import apply_command

    s = DictState(group=2)
    res = apply_command(s, cmds.Command(cmds.Op.CLOSE, b"", client_id=4, seq=1, revision=NOW))
    assert res.error == "CLOSE takes no session" and mvcc.rev_state(s.rows).last == 0


def test_compaction_after_a_close_may_reach_the_closed_revision() -> None:
    s = DictState(group=1)
    w = s.apply(cmds.encode_put(b"k", b"v", revision=NOW)).revision
    s.apply(cmds.encode_close(w + 10 * mvcc.STEP))
    assert s.apply(cmds.encode_compact(mvcc.REVISION_MAX)).revision == w + 10 * mvcc.STEP
    assert mvcc.version_at(s.rows, b"k", w + 10 * mvcc.STEP, s.data[b"k"]) is not None


# --- on both stores, and in snapshots ----------------------------------------------------------
def _open(kind: str, path: Path) -> Any:
    return LmdbNodeStore(path) if kind == "lmdb" else MemoryNodeStore()


@pytest.fixture(params=["lmdb", "mem"])
def make(request: Any, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    opened: list[Any] = []

    def factory() -> Any:
        s = _open(request.param, tmp_path / f"s{len(opened)}")
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


def _append_apply(store: NodeStore, group: int, datas: list[bytes]) -> list[Any]:
    ls = store.log_storage(group)
    start = ls.last_index() + 1
    es = [Entry(1, start + i, EntryType.NORMAL, d, group) for i, d in enumerate(datas)]
    store.persist_and_apply([GroupWrite(group, es, HardState(1, 0, es[-1].index))], ())
    ls = store.log_storage(group)
    lo, hi = store.applied_index(group) + 1, ls.last_index() + 1
    return store.persist_and_apply((), [ApplyBatch(group, ls.entries(lo, hi), CONF)])[0]


def test_close_on_the_store_and_its_snapshot(make: Callable[[], Any]) -> None:
    a, b = make(), make()
    assert a.bootstrap(4, CONF)
    res = _append_apply(a, 4, [cmds.encode_put(b"k", b"v1", revision=NOW)])
    w = res[-1].revision
    closed = w + 50 * mvcc.STEP
    # A close and a write in one apply batch: the write lands above the close.
    res = _append_apply(a, 4, [cmds.encode_close(closed), cmds.encode_put(b"k", b"v2", revision=NOW)])
    assert res[0].revision == closed and res[0].error is None
    w2 = res[1].revision
    assert w2 > closed and w2 % mvcc.STEP == 4
    # Refused far-future close: an error result, the state unchanged.
    res = _append_apply(a, 4, [cmds.encode_close(mvcc.PROPOSAL_MAX + 1)])
    assert res[0].error is not None and a.revisions.rev_state(4).last == w2
    # Reads at the closed revision see v1; after w2 they see v2.
    assert a.revisions.get_version(4, b"k", closed)[0].value == b"v1"
    assert a.revisions.get_version(4, b"k", w2)[0].value == b"v2"
    res = _append_apply(a, 4, [cmds.encode_close(w2 + 7 * mvcc.STEP)])
    assert a.revisions.rev_state(4).last == res[0].revision == w2 + 7 * mvcc.STEP
    # The snapshot carries the closed revision: the receiver's next write is above it too.
    meta, chunks = a.snapshot_chunks(4)
    path = b.receive_snapshot(4, list(chunks))
    b.persist_and_apply([GroupWrite(4, [], HardState(1, 0, meta.index), meta, path)], ())
    assert b.revisions.rev_state(4) == a.revisions.rev_state(4)
    after = _append_apply(b, 4, [cmds.encode_put(b"k", b"v3", revision=NOW)])[0].revision
    assert after > w2 + 7 * mvcc.STEP


# --- group ids are revision slots: add-group stops at 4095 ---------------------------------------
def test_add_group_is_refused_past_the_last_revision_slot() -> None:
    from dataclasses import replace

    from kvstore.shard.shardmap import MAX_GROUP_ID, ShardMap, ShardMapError

    assert MAX_GROUP_ID == mvcc.MAX_GROUPS - 1
    m = ShardMap.initial([1, 2, 3], 2)
    m = replace(m, next_group=MAX_GROUP_ID)  # groups 3..4094 were created and removed since
    last = m.plan_add_group([1, 2, 3])
    assert MAX_GROUP_ID in last.groups and last.next_group == MAX_GROUP_ID + 1
    last.check()
    done = replace(last, moves=[])
    with pytest.raises(ShardMapError, match=r"group ids 1\.\.4095 are all used"):
        done.plan_add_group([1, 2, 3])
    with pytest.raises(ShardMapError, match="past the last group id"):
        replace(done, next_group=MAX_GROUP_ID + 2).check()  # a forged map cannot name more
    with pytest.raises(ShardMapError):
        ShardMap.initial([1], MAX_GROUP_ID + 1)


def test_serve_refuses_more_initial_groups_than_revision_slots(tmp_path: Path) -> None:
    from kvstore.server.config import NodeConfig

    cfg = NodeConfig(id=1, listen="127.0.0.1:1", peers={1: "127.0.0.1:1"}, data_dir=tmp_path, groups=4096)
    with pytest.raises(ValueError, match="at most 4095"):
        cfg.validate()


# --- a range move carries the source's closed revision -------------------------------------------
def test_a_moved_range_lands_in_a_group_closed_at_the_sources_last_revision(make: Callable[[], Any]) -> None:
    """A read at R that the source answered for a key (its last >= R) stays true after the key
    moves: the export carries the source's last revision (REC_CLOSED) and the INSTALL raises the
    target's last to it, so the target's later writes of the key go above R."""
    from kvstore.shard.ranges import IntervalSet, key_hash
    from kvstore.storage.shardcmd import (
        REC_CLOSED,
        ShardOp,
        encode_record,
        encode_shard_command,
        iter_records,
    )

    src = make()
    assert src.bootstrap(1, CONF, [encode_shard_command(ShardOp.SET, IntervalSet.full())])
    w = _append_apply(src, 1, [cmds.encode_put(b"m", b"old", revision=NOW)])[-1].revision
    r = w + 300 * mvcc.STEP  # a read at r answered by the source: closed there
    _append_apply(src, 1, [cmds.encode_close(r)])
    rng = IntervalSet([(key_hash(b"m"), key_hash(b"m"))])
    assert _append_apply(src, 1, [encode_shard_command(ShardOp.FREEZE, rng, move=1)])[-1].error is None
    records = b"".join(chunk for chunk, _ in src.export_range(1, rng, 1 << 20))
    recs = list(iter_records(records))
    assert recs[0] == (REC_CLOSED, b"", r.to_bytes(8, "big") + (0).to_bytes(8, "big"))
    dst = DictState(group=2)
    assert dst.apply(encode_shard_command(ShardOp.SET, IntervalSet())).error is None
    assert dst.apply(encode_shard_command(ShardOp.BEGIN, rng, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.INSTALL, records=records, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.ACTIVATE, rng, move=1, token=5)).error is None
    assert mvcc.rev_state(dst.rows).last == r
    later = dst.apply(cmds.encode_put(b"m", b"new", revision=NOW)).revision  # the target's clock is behind
    assert later > r
    assert mvcc.version_at(dst.rows, b"m", r, dst.data[b"m"]).value == b"old"  # type: ignore[union-attr]
    # A forged closed revision beyond PROPOSAL_MAX refuses the whole INSTALL.
    bad = DictState(group=3)
    bad.apply(encode_shard_command(ShardOp.SET, IntervalSet()))
    bad.apply(encode_shard_command(ShardOp.BEGIN, rng, move=1, token=5))
    forged = encode_record(REC_CLOSED, b"", (mvcc.PROPOSAL_MAX + 1).to_bytes(8, "big") + bytes(8)) + records
    res = bad.apply(encode_shard_command(ShardOp.INSTALL, records=forged, move=1, token=5))
    assert res.error is not None and mvcc.rev_state(bad.rows).last == 0 and not bad.data
    for key, value in ((b"k", bytes(16)), (b"", bytes(8)), (b"", (1).to_bytes(8, "big") + (2).to_bytes(8, "big"))):
        with pytest.raises(ValueError):  # a key, the old 8-byte form, compact above last
            list(iter_records(encode_record(REC_CLOSED, key, value)))


def test_a_moved_range_lands_in_a_group_compacted_at_least_at_the_sources_compact_revision(
    make: Callable[[], Any],
) -> None:
    """The source compacted at C (the moved key keeps only its newest version <= C and later
    ones); the target had compacted less. After the move the target's compact revision is C: a
    read below C is COMPACTED (it would otherwise miss the versions the source dropped), its
    own keys' history below C is compacted like any COMPACT, and what is at or above C reads
    the same as at the source."""
    from kvstore.shard.ranges import IntervalSet, key_hash
    from kvstore.storage.shardcmd import ShardOp, encode_shard_command

    src = make()
    assert src.bootstrap(1, CONF, [encode_shard_command(ShardOp.SET, IntervalSet.full())])
    puts = [cmds.encode_put(b"m", b"v%d" % i, revision=NOW) for i in range(4)]
    revs = [res.revision for res in _append_apply(src, 1, puts)[-4:]]  # (the bootstrap's entry first)
    c = revs[2]
    assert _append_apply(src, 1, [cmds.encode_compact(c, keep=True)])[-1].error is None
    rng = IntervalSet([(key_hash(b"m"), key_hash(b"m"))])
    assert _append_apply(src, 1, [encode_shard_command(ShardOp.FREEZE, rng, move=1)])[-1].error is None
    records = b"".join(chunk for chunk, _ in src.export_range(1, rng, 1 << 20))
    dst = DictState(group=2)
    assert dst.apply(encode_shard_command(ShardOp.SET, IntervalSet.full().difference(rng))).error is None
    own = [dst.apply(cmds.encode_put(b"own/%d" % i, b"o%d" % i, revision=NOW)).revision for i in range(2)]
    dst.apply(cmds.encode_put(b"own/0", b"o-again", revision=NOW))
    assert mvcc.rev_state(dst.rows).compact == 0
    assert dst.apply(encode_shard_command(ShardOp.BEGIN, rng, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.INSTALL, records=records, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.ACTIVATE, rng, move=1, token=5)).error is None
    st = mvcc.rev_state(dst.rows)
    assert st.compact == c and st.last >= revs[-1] and st.kept  # the source kept C: so does the target
    # at and above C: the moved key reads as at the source
    for at, want in ((c, b"v2"), (revs[3], b"v3")):
        assert mvcc.version_at(dst.rows, b"m", at, dst.data[b"m"]).value == want  # type: ignore[union-attr]
    # the change log (what a watch replays) holds nothing below C, and the changes at C (a watch
    # from exactly C gets them, as at the source)
    assert all(r >= c for r, _ in mvcc.changes_from(dst.rows, 0))
    assert {(c, b"m"), (revs[3], b"m")} <= set(mvcc.changes_from(dst.rows, 0))
    # the target's own keys keep their newest version at or below C (compaction keeps it)
    assert own[1] < c
    assert mvcc.version_at(dst.rows, b"own/1", st.last, dst.data[b"own/1"]).value == b"o1"  # type: ignore[union-attr]
