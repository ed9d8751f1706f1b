"""The `NodeStore` contract, on both implementations (LMDB and memory), and the memory store's
durability model.

The contract suite is parametrized over `lmdb` and `mem`; cross-implementation tests move
snapshots both ways; a Host-driven 3-node cluster runs the same script on each implementation; a
hypothesis test applies random operation sequences to both and compares everything observable.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import FaultRates, MemoryNodeStore, SimulatedCrash
from kvstore.node.store import ApplyBatch, AuditHead, GroupWrite, NodeStore
from kvstore.raft import ConfState, Message, MessageType, Role, Snapshot
from kvstore.raft.storage import CompactedError, SnapshotTemporarilyUnavailable, UnavailableError
from kvstore.raft.types import ConfChange, ConfChangeType, Entry, EntryType, HardState, RaftError
from kvstore.shard.ranges import HASH_MAX, IntervalSet, key_hash
from kvstore.storage import commands as cmds
from kvstore.storage import mvcc
from kvstore.storage.errors import (
    SnapshotFormatError,
    StorageClosedError,
    StorageError,
    StorageFullError,
    StorageIOError,
)
from kvstore.storage.machine import SessionLimits
from kvstore.storage.shardcmd import (
    REC_CLOSED,
    REC_DATA,
    REC_FLOOR,
    REC_HISTORY,
    REC_RESULT,
    ShardOp,
    encode_shard_command,
    iter_records,
)
from kvstore.storage.store import LmdbNodeStore

CONF = ConfState((1, 2, 3))
KINDS = ["lmdb", "lmdb-ckpt", "mem", "mem-ckpt"]
HALF = IntervalSet([(0, HASH_MAX // 2)])
OTHER = IntervalSet([(HASH_MAX // 2 + 1, HASH_MAX)])


def open_store(kind: str, path: Path, limits: SessionLimits | None = None, sync: bool = True) -> Any:
    if kind in ("lmdb", "lmdb-ckpt"):
        s = LmdbNodeStore(path, sync=sync, state_sync="checkpoint" if kind == "lmdb-ckpt" else "commit")
        if limits is not None:
            s._kv.session_limits = limits
        return s
    return MemoryNodeStore(sync=sync, session_limits=limits or SessionLimits(),
                           state_sync="checkpoint" if kind == "mem-ckpt" else "commit")


@pytest.fixture(params=KINDS)
def make(request: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    opened: list[Any] = []

    def factory(limits: SessionLimits | None = None, kind: str | None = None) -> Any:
        s = open_store(kind or request.param, tmp_path / f"s{len(opened)}", limits)
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


def append(store: NodeStore, group: int, datas: list[bytes], term: int = 1, etype: EntryType = EntryType.NORMAL) -> list[Entry]:
    ls = store.log_storage(group)
    start = ls.last_index() + 1
    es = [Entry(term, start + i, etype, d, group) for i, d in enumerate(datas)]
    store.persist_and_apply([GroupWrite(group, es, HardState(term, 0, es[-1].index))], ())
    return es


def apply_all(store: NodeStore, group: int, conf: ConfState = CONF) -> list[Any]:
    ls = store.log_storage(group)
    lo, hi = store.applied_index(group) + 1, ls.last_index() + 1
    if lo >= hi:
        return []
    return store.persist_and_apply((), [ApplyBatch(group, ls.entries(lo, hi), conf)])[0]


def snapshot_bytes(store: NodeStore, group: int) -> tuple[Any, bytes]:
    meta, chunks = store.snapshot_chunks(group)
    return meta, b"".join(chunks)


def observe(store: NodeStore, groups: list[int] | None = None) -> dict[str, Any]:
    """Everything a caller can see, per group; snapshots byte for byte (they carry data, sessions
    with their last/created, the session meta, shard state and members)."""
    out: dict[str, Any] = {"groups": store.groups(), "tombstones": store.tombstones(), "members": store.members()}
    for g in groups or store.groups():
        ls = store.log_storage(g)
        try:
            snap: Any = snapshot_bytes(store, g)
        except SnapshotTemporarilyUnavailable:
            snap = "unavailable"
        out[f"g{g}"] = (
            store.has_group(g), store.applied_index(g), store.shard_state(g), store.session_meta(g),
            store.count_keys(g), store.scan(g, b"", None), ls.initial_state(), ls.first_index(),
            ls.last_index(), ls.entries(ls.first_index(), ls.last_index() + 1), snap,
        )
    return out


def put(key: bytes, cid: int = 0, seq: int = 0, ack: int = 0) -> bytes:
    return cmds.encode_put(key, b"v" + key + b"%d" % seq, cid, seq, ack)


# --- the contract, on both ---------------------------------------------------------------------
def test_bootstrap_and_log_views(make: Callable[..., Any]) -> None:
    s = make()
    assert s.bootstrap(1, CONF, [put(b"a")]) is True
    assert s.bootstrap(1, CONF) is False
    assert s.groups() == [1] and s.has_group(1) and not s.has_group(2)
    ls = s.log_storage(1)
    assert ls is s.log_storage(1)
    assert (ls.first_index(), ls.last_index()) == (1, 4)
    assert ls.initial_state() == (HardState(1, 0, 4), ConfState())
    assert [e.type for e in ls.entries(1, 5)] == [EntryType.CONF_CHANGE] * 3 + [EntryType.NORMAL]
    assert ls.term(0) == 0 and ls.term(4) == 1
    with pytest.raises(UnavailableError):
        ls.term(5)
    with pytest.raises(UnavailableError):
        ls.entries(1, 6)
    assert len(ls.entries(1, 5, max_size=1)) == 1  # at least one entry, however small the limit
    empty = s.log_storage(9)
    assert (empty.first_index(), empty.last_index(), empty.initial_state()) == (1, 0, (HardState(), ConfState()))


def test_persist_truncates_a_conflicting_suffix_and_refuses_gaps(make: Callable[..., Any]) -> None:
    s = make()
    s.bootstrap(1, CONF)
    append(s, 1, [put(b"a"), put(b"b"), put(b"c")], term=2)  # 4..6
    s.persist_and_apply([GroupWrite(1, [Entry(3, 5, data=put(b"x"), group=1)], HardState(3, 2, 5))], ())
    ls = s.log_storage(1)
    assert ls.last_index() == 5 and [e.term for e in ls.entries(4, 6)] == [2, 3]
    assert ls.initial_state()[0] == HardState(3, 2, 5)
    before = observe(s)
    with pytest.raises(RaftError):
        s.persist_and_apply([GroupWrite(1, [Entry(3, 9, group=1)])], ())
    with pytest.raises(RaftError):  # an apply gap aborts the whole transaction, writes included
        s.persist_and_apply(
            [GroupWrite(1, [Entry(3, 6, data=put(b"y"), group=1)], HardState(3, 2, 6))],
            [ApplyBatch(1, [Entry(3, 5, data=put(b"z"), group=1)], CONF)],
        )
    assert observe(s) == before


def test_apply_kv_sessions_and_early_callback(make: Callable[..., Any]) -> None:
    s = make()
    s.bootstrap(1, CONF)
    es = append(s, 1, [
        put(b"k", 7, 1, 1),
        cmds.encode_cas(b"k", False, b"vk1", b"w", 7, 2, 2),
        put(b"k", 7, 1, 1),  # stale retry below the floor
        cmds.encode_delete(b"k", 7, 3, 3),
        cmds.encode_delete(b"k", 7, 3, 3),  # a retry: the cached result
        b"garbage",
    ])
    seen: list[tuple[int, int]] = []
    res = s.persist_and_apply((), [ApplyBatch(1, s.log_storage(1).entries(1, es[-1].index + 1), CONF)],
                              lambda r: seen.append((len(r[0]), s.applied_index(1))))
    assert seen == [(9, 0)]  # called with the results, before the applied index moved
    r = res[0]
    assert r[:3] == [None, None, None]  # conf changes
    assert r[4] is not None and r[4].swapped and r[4].index == 5
    assert r[5] is not None and r[5].error is not None and "stale" in r[5].error
    assert r[6] is not None and r[6].existed and r[7] == r[6]
    assert r[8] is not None and r[8].error is not None and "malformed" in r[8].error
    assert s.applied_index(1) == 9 and s.get(1, b"k") is None
    assert s.session_meta(1).count == 1
    assert s.persist_and_apply((), [ApplyBatch(1, s.log_storage(1).entries(8, 10), CONF)]) == [[None, None]]
    assert s.persist_and_apply((), ()) == []


def test_session_cap_evicts_lru_and_refuses_retries_past_the_horizon(make: Callable[..., Any]) -> None:
    s = make(SessionLimits(2, 1_000_000, 2))
    s.bootstrap(1, CONF)
    append(s, 1, [put(b"a", 1, 1), put(b"b", 2, 1), put(b"c", 3, 1)])
    apply_all(s, 1)
    m = s.session_meta(1)
    assert (m.count, m.evicted, m.horizon) == (2, 1, 4)  # client 1 (last = 4) was evicted
    append(s, 1, [cmds.encode_put(b"a", b"again", 1, 1, 0, True, 3)])
    [r] = apply_all(s, 1)
    assert r.session_expired and s.get(1, b"a") == b"va1"


def test_compaction_and_conf_at_the_base(make: Callable[..., Any]) -> None:
    s = make()
    s.bootstrap(1, ConfState((1,)))
    cc = ConfChange(ConfChangeType.ADD_VOTER, 2, b"127.0.0.1:2").encode()
    append(s, 1, [cc], etype=EntryType.CONF_CHANGE)
    append(s, 1, [put(b"a"), put(b"b")], term=2)
    with pytest.raises(RaftError):
        s.compact(1, 3)  # beyond the applied index
    apply_all(s, 1, ConfState((1, 2)))
    assert s.members() == {2: "127.0.0.1:2"}
    s.compact(1, 3)
    if getattr(s, "checkpointed", False):  # never past the last checkpoint: it has nothing applied
        assert s.log_storage(1).first_index() == 1
        s.checkpoint()
        s.compact(1, 3)
    ls = s.log_storage(1)
    assert (ls.first_index(), ls.last_index(), ls.term(3)) == (4, 4, 2)  # entries 1 (bootstrap), 2 (cc), 3-4
    assert ls.initial_state()[1] == ConfState((1, 2))
    with pytest.raises(CompactedError):
        ls.entries(3, 5)
    with pytest.raises(CompactedError):
        ls.term(2)
    s.compact(1, 2)  # no-op
    with pytest.raises(RaftError):
        s.compact(1, 9)
    assert ls.snapshot().meta.index == 4 and ls.snapshot().meta.term == 2
    s.compact(1, 4)
    assert ls.snapshot().meta.term == 2  # the base's term


def test_shard_commands_export_and_drop(make: Callable[..., Any]) -> None:
    s = make()
    s.bootstrap(1, CONF, [encode_shard_command(ShardOp.SET, IntervalSet.full())])
    keys = [b"k%d" % i for i in range(40)]
    append(s, 1, [put(k, 5, i + 1, i + 1) for i, k in enumerate(keys)])
    append(s, 1, [encode_shard_command(ShardOp.FREEZE, HALF, move=1)])
    apply_all(s, 1)
    st = s.shard_state(1)
    assert st is not None and st.frozen == HALF and st.active == OTHER
    with pytest.raises(StorageError):
        s.export_range(1, OTHER)
    recs = [r for chunk, _ in s.export_range(1, HALF, 64) for r in iter_records(chunk)]
    counts = sum(n for _, n in s.export_range(1, HALF, 64))
    data = [k for t, k, _ in recs if t == REC_DATA]
    assert data == sorted(k for k in keys if key_hash(k) in HALF) and counts == len(data)
    hist = {k: mvcc.decode_versions(v) for t, k, v in recs if t == REC_HISTORY}
    assert sorted(hist) == data and all(len(v) == 1 for v in hist.values())  # each key's one version
    # the source's closed revision first, then one session
    assert [t for t, _, _ in recs if t not in (REC_DATA, REC_HISTORY)] == [REC_CLOSED, REC_FLOOR, REC_RESULT]
    append(s, 1, [cmds.encode_compact(mvcc.REVISION_MAX)])
    apply_all(s, 1)
    assert s.shard_state(1) == st  # compaction keeps each key's current version: moves still carry it
    again = [r for chunk, _ in s.export_range(1, HALF, 64) for r in iter_records(chunk)]
    assert {k: mvcc.decode_versions(v) for t, k, v in again if t == REC_HISTORY} == hist
    append(s, 1, [put(data[0]), encode_shard_command(ShardOp.DROP, HALF, move=1)])
    r = apply_all(s, 1)
    assert r[0].wrong_shard and r[1].error is None  # a frozen key is not written; DROP forgets it
    assert s.count_keys(1) == len(keys) - len(data) and s.get(1, data[0]) is None


def test_destroy_group_and_tombstones(make: Callable[..., Any]) -> None:
    s = make()
    s.bootstrap(1, CONF, [put(b"a")])
    s.bootstrap(2, CONF, [put(b"b")])
    apply_all(s, 1)
    s.destroy_group(1, tombstone=True)
    assert s.groups() == [2] and s.tombstones() == {1} and s.get(1, b"a") is None
    assert s.applied_index(1) == 0 and s.log_storage(1).last_index() == 0
    assert s.bootstrap(1, CONF) is False
    s.destroy_group(2)
    assert s.groups() == [] and s.tombstones() == {1}


def test_reads_scan_and_chunks(make: Callable[..., Any]) -> None:
    s = make()
    s.bootstrap(1, CONF, [put(b"k%02d" % i) for i in range(30)])
    apply_all(s, 1)
    assert s.get(1, b"k03") == b"vk030" and s.get(1, b"x" * 5000) is None and s.get(2, b"k03") is None
    assert [k for k, _ in s.scan(1, b"k10", b"k13")] == [b"k10", b"k11", b"k12"]
    assert len(s.scan(1, b"", None, 5)) == 5 and len(s.scan(1, b"", None)) == 30
    chunks = list(s.scan_chunks(1, b"k05", None, 20, chunk_items=7))
    assert [len(c) for c in chunks] == [7, 7, 6]
    owned = IntervalSet([(0, HASH_MAX // 3)])
    got = [k for c in s.scan_chunks(1, b"", None, owned=owned) for k, _ in c]
    assert got == [k for k, _ in s.scan(1, b"", None) if key_hash(k) in owned]
    stream = s.scan_chunks(1, b"", None, chunk_items=1)
    first = next(stream)
    append(s, 1, [put(b"k00", 0)])
    apply_all(s, 1)
    assert [c[0][0] for c in stream][:2] == [b"k01", b"k02"] and first[0][0] == b"k00"  # one view
    stream.close()


def test_receive_snapshot_refuses_a_mismatch(make: Callable[..., Any]) -> None:
    s = make()
    s.bootstrap(1, CONF, [put(b"a")])
    apply_all(s, 1)
    meta, chunks = s.snapshot_chunks(1)
    path = s.receive_snapshot(1, chunks)
    bad = type(meta)(meta.index + 1, meta.term, meta.conf_state)
    before = observe(s)
    with pytest.raises(SnapshotFormatError):
        s.persist_and_apply([GroupWrite(1, [], None, bad, path)], ())
    assert observe(s) == before


@pytest.mark.parametrize(("src_kind", "dst_kind"), [(a, b) for a in KINDS for b in KINDS])
def test_snapshots_travel_between_implementations(tmp_path: Path, src_kind: str, dst_kind: str) -> None:
    limits = SessionLimits(3, 50, 1)
    src = open_store(src_kind, tmp_path / "src", limits)
    dst = open_store(dst_kind, tmp_path / "dst", limits)
    try:
        cc = ConfChange(ConfChangeType.ADD_VOTER, 4, b"10.0.0.4:1").encode()
        src.bootstrap(1, CONF, [encode_shard_command(ShardOp.SET, IntervalSet.full())])
        append(src, 1, [put(b"k%d" % i, i % 5, i + 1) for i in range(20)])
        append(src, 1, [cc], etype=EntryType.CONF_CHANGE)
        append(src, 1, [encode_shard_command(ShardOp.FREEZE, HALF, move=2)])
        apply_all(src, 1)
        src.compact(1, 10)
        dst.bootstrap(1, CONF, [put(b"stale")])
        meta, raw = snapshot_bytes(src, 1)
        path = dst.receive_snapshot(1, [raw[i : i + 100] for i in range(0, len(raw), 100)])
        dst.persist_and_apply([GroupWrite(1, [], HardState(1, 0, meta.index), meta, path)], ())
        a, b = observe(src, [1])["g1"], observe(dst, [1])["g1"]
        assert a[:6] == b[:6] and a[10] == b[10]  # state and the snapshot bytes
        assert dst.log_storage(1).first_index() == meta.index + 1 and dst.members() == src.members()
        # the same snapshot again is superseded: only its file is consumed
        path2 = dst.receive_snapshot(1, [raw])
        dst.persist_and_apply([GroupWrite(1, [], None, meta, path2)], ())
        assert observe(dst, [1])["g1"] == b
    finally:
        src.close()
        dst.close()


# --- the memory store's durability model -------------------------------------------------------
def _mem_with_history(sync: bool) -> tuple[MemoryNodeStore, list[dict[str, Any]]]:
    s = MemoryNodeStore(sync=sync)
    states = [observe(s)]
    s.bootstrap(1, CONF)
    states.append(observe(s))
    for i in range(4):
        append(s, 1, [put(b"k%d" % i, 3, i + 1)])
        apply_all(s, 1)
        states.append(observe(s))
    return s, states


def test_synced_transactions_survive_a_crash() -> None:
    s, states = _mem_with_history(sync=True)
    r = s.crash()
    assert observe(r) == states[-1]
    with pytest.raises(StorageClosedError):
        s.get(1, b"k0")


def _log_of(s: Any, g: int = 1) -> list[Any]:
    ls = s.log_storage(g)
    return ls.entries(ls.first_index(), ls.last_index() + 1)


def test_a_crash_keeps_what_was_synced_and_at_most_a_prefix_of_the_rest() -> None:
    """The Raft logs are a write-ahead log on `SimFileSystem`: a crash keeps every synced record
    and a random prefix of the unsynced ones (maybe torn: cut off at recovery). The state
    machine's unsynced transactions are all lost (or the oldest `keep_unsynced`)."""
    lasts = set()
    for seed in range(12):
        s = MemoryNodeStore(rng=random.Random(seed))
        s.bootstrap(1, CONF)
        for i in range(4):
            append(s, 1, [put(b"k%d" % i, 3, i + 1)])
            apply_all(s, 1)
        synced = observe(s)
        s.sync = False
        for i in range(3):
            append(s, 1, [put(b"u%d" % i)])
        assert s.unsynced == 3 and s.get(1, b"u0") is None and s.log_storage(1).last_index() == 10
        full = _log_of(s)
        r = s.crash()
        got = observe(r)
        last = r.log_storage(1).last_index()
        assert 7 <= last <= 10 and _log_of(r) == full[:last]
        assert got["g1"][:6] == synced["g1"][:6] and got["g1"][10] == synced["g1"][10]  # the state machine
        lasts.add(last)
    assert len(lasts) > 1  # some crashes kept unsynced appends, some did not
    s2, _ = _mem_with_history(sync=True)
    s2.sync = False
    s2.set_audit_head(AuditHead(1, b"m" * 32))
    s2.set_audit_head(AuditHead(2, b"n" * 32))
    assert s2.crash(keep_unsynced=1).audit_head() == AuditHead(1, b"m" * 32)


def test_a_failed_fsync_applies_nothing_and_the_call_can_be_retried() -> None:
    """A failed fsync of the WAL: nothing applied, the records written but not durable (a crash
    may lose them); a failed fsync of the apply transaction: nothing of it stays (its results
    were computed). Either way the same call succeeds when retried."""
    es = [Entry(1, 8, data=put(b"x"), group=1)]
    s, _ = _mem_with_history(sync=True)
    s.fail_next_fsync()
    called: list[Any] = []
    with pytest.raises(StorageIOError):
        s.persist_and_apply([GroupWrite(1, es, HardState(1, 0, 8))], [ApplyBatch(1, es, CONF)], called.append)
    assert not called and s.applied_index(1) == 7 and s.get(1, b"x") is None
    r = s.crash()
    assert r.applied_index(1) == 7 and r.log_storage(1).last_index() in (7, 8)
    s, _ = _mem_with_history(sync=True)
    s.fail_next_fsync()
    with pytest.raises(StorageIOError):
        s.persist_and_apply([GroupWrite(1, es, HardState(1, 0, 8))], [ApplyBatch(1, es, CONF)])
    s.persist_and_apply([GroupWrite(1, es, HardState(1, 0, 8))], [ApplyBatch(1, es, CONF)])
    now = observe(s)
    assert s.get(1, b"x") == b"vx0" and observe(s.crash()) == now
    s, _ = _mem_with_history(sync=True)
    s.persist_and_apply([GroupWrite(1, es, HardState(1, 0, 8))], ())
    s.fail_next_fsync()
    with pytest.raises(StorageIOError):
        s.persist_and_apply((), [ApplyBatch(1, es, CONF)], called.append)
    assert called and s.applied_index(1) == 7 and s.get(1, b"x") is None
    s.persist_and_apply((), [ApplyBatch(1, es, CONF)])
    assert s.get(1, b"x") == b"vx0" and s.applied_index(1) == 8


def test_a_vote_whose_fsync_failed_is_durable_once_the_retried_cycle_succeeds() -> None:
    """The retry of a cycle whose WAL fsync failed writes records the logs in memory already
    hold: it may stage none, or a vote that `must_sync` takes for "commit only". It must flush
    anyway, or the vote it then acknowledges is lost in a crash and the node votes twice in one
    term (simulator seed 2278: two leaders in term 9)."""
    kept = 0
    for seed in range(20):  # a crash keeps a random prefix of the unsynced WAL writes
        s = MemoryNodeStore(sync=True, rng=random.Random(seed))
        s.bootstrap(1, CONF)
        append(s, 1, [put(b"k")])
        hs, _ = s.log_storage(1).initial_state()
        vote = HardState(hs.term + 1, 3, hs.commit)
        s.fail_next_fsync()
        with pytest.raises(StorageIOError):
            s.persist_and_apply([GroupWrite(1, [], vote)], ())
        s.persist_and_apply([GroupWrite(1, [], vote)], ())  # the host's retry of the same cycle
        kept += s.crash().log_storage(1).initial_state()[0] == vote
    assert kept == 20


def test_full_disk_until_space_is_freed() -> None:
    s, states = _mem_with_history(sync=True)
    s.fill_disk()
    for _ in range(3):
        with pytest.raises(StorageFullError):
            append(s, 1, [put(b"x")])
        assert s.full and observe(s) == states[-1]
    with pytest.raises(StorageFullError):
        s.receive_snapshot(1, [b"abc"])
    r = s.crash()  # the disk is still full after a restart
    assert not r.full and observe(r) == states[-1]
    with pytest.raises(StorageFullError):
        append(r, 1, [put(b"x")])
    r.free_space()
    assert r.full
    append(r, 1, [put(b"x")])
    assert not r.full and r.log_storage(1).last_index() == 8


def test_a_torn_sync_crashes_the_machine() -> None:
    """The machine crashes during the WAL's sync (a torn write): the cycle's records survive
    whole, in part or not at all (a torn record is cut at recovery), nothing was applied. During
    the sync of an apply transaction: all or nothing (LMDB's meta-page flip)."""
    outcomes: set[Any] = set()
    for seed in range(16):
        s = MemoryNodeStore(rng=random.Random(seed))
        s.bootstrap(1, CONF)
        before = observe(s)
        boot = _log_of(s)
        es = [Entry(1, 4, data=put(b"a"), group=1), Entry(1, 5, data=put(b"b"), group=1)]
        s.tear_next_sync()
        with pytest.raises(SimulatedCrash):
            s.persist_and_apply([GroupWrite(1, es, HardState(1, 0, 5))], ())
        with pytest.raises(StorageClosedError):
            s.applied_index(1)
        r = s.crash()
        last = r.log_storage(1).last_index()
        assert last in (3, 4, 5) and _log_of(r) == (boot + es)[:last]
        assert observe(r)["g1"][:6] == before["g1"][:6]
        outcomes.add(last)
        if last == 5:  # a torn apply transaction
            r.tear_next_sync()
            called: list[Any] = []
            with pytest.raises(SimulatedCrash):
                r.persist_and_apply((), [ApplyBatch(1, _log_of(r), CONF)], called.append)
            assert called
            r2 = r.crash()
            assert r2.applied_index(1) in (0, 5)
            outcomes.add(("applied", r2.applied_index(1)))
    assert {3, 5} <= outcomes and {("applied", 0), ("applied", 5)} <= outcomes


def test_rate_based_faults_are_deterministic_and_a_failed_call_applies_nothing() -> None:
    def run(seed: int) -> tuple[list[str], dict[str, Any]]:
        s = MemoryNodeStore(rng=random.Random(seed), rates=FaultRates(fsync=0.2, full_disk=0.1))
        log: list[str] = []
        s.rates, rates = FaultRates(), s.rates
        s.bootstrap(1, CONF)
        s.rates = rates
        for i in range(60):
            s.free_space()
            key = b"k%d" % i
            for call in (lambda x: append(x, 1, [put(key)]), lambda x: apply_all(x, 1)):  # noqa: B023 - called at once
                was = (s.applied_index(1), s.scan(1, b"", None))
                try:
                    call(s)
                except (StorageIOError, StorageFullError) as err:
                    log.append(type(err).__name__)
                    assert (s.applied_index(1), s.scan(1, b"", None)) == was  # nothing applied
                    continue
                log.append("ok")
        return log, observe(s.crash())

    a, b = run(3), run(3)
    assert a == b and {"ok", "StorageIOError", "StorageFullError"} <= set(a[0])


def test_reading_data_inside_the_write_transaction_is_refused() -> None:
    s = MemoryNodeStore()
    s.bootstrap(1, CONF, [put(b"a")])
    with pytest.raises(RuntimeError):
        apply_all_with(s, lambda r: s.get(1, b"a"))
    assert s.applied_index(1) == 0 and s.get(1, b"a") is None  # aborted, nothing stayed


def apply_all_with(s: NodeStore, cb: Callable[[Any], Any]) -> Any:
    ls = s.log_storage(1)
    return s.persist_and_apply((), [ApplyBatch(1, ls.entries(1, ls.last_index() + 1), CONF)], cb)


# --- the host on both stores -------------------------------------------------------------------
def _cluster_run(kind: str, tmp: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """Three hosts, messages routed in memory, one deterministic script: elect node 1, write,
    cut node 3 off while the leader compacts, heal (node 3 needs a snapshot), write more."""
    stores = {i: open_store(kind, tmp / f"{kind}{i}") for i in (1, 2, 3)}
    outbox: list[Message] = []
    snaps: list[Message] = []
    cfg = RaftSettings(compact_threshold=15, compact_keep=2)
    hosts = {i: Host(i, stores[i], outbox.extend, cfg, random.Random(i)) for i in stores}
    for h in hosts.values():
        h.on_snapshot_needed = snaps.append
        h.open_group(1, CONF)
    cut: set[int] = set()
    installed: list[int] = []

    def pump() -> None:
        for _ in range(500):
            busy = False
            for h in hosts.values():
                while h.has_work():
                    h.run_cycle()
                    busy = True
            msgs, outbox[:] = list(outbox), []
            for m in msgs:
                if m.to not in cut and m.frm not in cut:
                    hosts[m.to].step(m)
                    busy = True
            pending, snaps[:] = list(snaps), []
            for m in pending:
                if m.to in cut:
                    hosts[m.frm].report_snapshot(m.group, m.to, True)
                    continue
                meta, chunks = stores[m.frm].snapshot_chunks(m.group)
                path = stores[m.to].receive_snapshot(m.group, chunks)
                m.snapshot = Snapshot(meta, str(path).encode())
                assert m.type == MessageType.SNAP
                hosts[m.to].step(m)
                hosts[m.frm].report_snapshot(m.group, m.to, False)
                installed.append(meta.index)
                busy = True
            if not busy:
                return
        raise AssertionError("the cluster never went quiet")

    answers: list[Any] = []
    hosts[1].groups[1].core.campaign()
    pump()
    assert hosts[1].groups[1].core.role == Role.LEADER

    def write(data: bytes) -> None:
        hosts[1].propose(1, data, lambda r, e: answers.append((r, None if e is None else type(e).__name__)))

    for i in range(5):
        write(put(b"a%d" % i, 9, i + 1, i))
    pump()
    cut.add(3)
    for i in range(25):
        write(cmds.encode_cas(b"c", i == 0, b"" if i == 0 else b"%d" % (i - 1), b"%d" % i, 11, i + 1, i))
        pump()
    cut.clear()
    for h in hosts.values():  # heartbeats reach node 3, which is far behind the compacted log
        h.tick()
    pump()
    write(cmds.encode_delete(b"a0", 9, 6, 5))
    pump()
    for h in hosts.values():  # a heartbeat carries the last commit index to the followers
        h.tick()
    pump()
    states = [observe(stores[i]) for i in (1, 2, 3)]
    answers.append(("snapshots installed", installed))
    for s in stores.values():
        s.close()
    return answers, states


def test_the_host_runs_the_same_on_both_stores(tmp_path: Path) -> None:
    a_ans, a_states = _cluster_run("lmdb", tmp_path)
    b_ans, b_states = _cluster_run("mem", tmp_path)
    assert len(a_ans) == 32 and all(e is None for _, e in a_ans[:-1])
    assert len(a_ans[-1][1]) == 1  # node 3 was sent one snapshot
    assert a_ans == b_ans
    assert a_states == b_states
    assert a_states[2]["g1"][1] == a_states[0]["g1"][1]  # node 3 caught up (through a snapshot)
    assert a_states[0]["g1"][5][0] == (b"a1", b"va12") and a_states[0]["g1"][5][-1] == (b"c", b"24")


# --- the differential oracle -------------------------------------------------------------------
KEYS = [b"a", b"b", b"c", b"d", b"e"]
command = st.one_of(
    st.builds(lambda k, c, s, a: cmds.encode_put(k, b"x" + k, c, s, min(a, s)),
              st.sampled_from(KEYS), st.integers(0, 6), st.integers(1, 6), st.integers(0, 6)),
    st.builds(lambda k, c, s: cmds.encode_delete(k, c, s), st.sampled_from(KEYS), st.integers(0, 6), st.integers(1, 6)),
    st.builds(lambda k, c, s, r, h: cmds.encode_cas(k, True, b"", b"y", c, s, 0, r, h),
              st.sampled_from(KEYS), st.integers(0, 6), st.integers(1, 6), st.booleans(), st.integers(0, 20)),
    st.sampled_from([
        encode_shard_command(ShardOp.SET, IntervalSet.full()),
        encode_shard_command(ShardOp.FREEZE, HALF, move=1),
        encode_shard_command(ShardOp.DROP, HALF, move=1),
        encode_shard_command(ShardOp.BEGIN, HALF, token=3, move=2),
        encode_shard_command(ShardOp.ACTIVATE, HALF, token=3, move=2),
        b"\x00junk",
    ]),
)
op = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 2), st.lists(command, min_size=1, max_size=6)),
    st.tuples(st.just("member"), st.integers(1, 2), st.integers(1, 5), st.booleans()),
    st.tuples(st.just("apply"), st.integers(1, 2), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(1, 2), st.integers(1, 3)),
    st.tuples(st.just("compact"), st.integers(1, 2)),
    st.tuples(st.just("snapshot"), st.integers(1, 2)),
    st.tuples(st.just("destroy"), st.integers(1, 2)),
)


def _step(s: NodeStore, o: tuple[Any, ...], term: int) -> Any:
    kind, g = o[0], o[1]
    ls = s.log_storage(g)
    if kind == "append":
        return append(s, g, o[2], term) and None
    if kind == "member":
        cc = ConfChange(ConfChangeType.ADD_VOTER if o[3] else ConfChangeType.REMOVE_NODE, o[2], b"n%d" % o[2])
        append(s, g, [cc.encode()], term, EntryType.CONF_CHANGE)
        return None
    if kind == "apply":
        lo = s.applied_index(g) + 1
        hi = min(ls.last_index() + 1, lo + o[2])
        if lo >= hi:
            return None
        return s.persist_and_apply((), [ApplyBatch(g, ls.entries(lo, hi), CONF)])
    if kind == "truncate":
        start = max(s.applied_index(g), ls.first_index() - 1, ls.last_index() - o[2]) + 1
        es = [Entry(term, start + i, data=put(b"t%d" % i), group=g) for i in range(2)]
        return s.persist_and_apply([GroupWrite(g, es, HardState(term, 0, start + 1))], ())
    if kind == "compact":
        return s.compact(g, s.applied_index(g))
    if kind == "snapshot":  # a round trip through the store itself: a newer one is installed
        return snapshot_bytes(s, g)
    s.destroy_group(g, tombstone=False)
    return None


@settings(max_examples=int(os.environ.get("NODE_STORE_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_both_stores_agree_on_random_operations(ops: list[tuple[Any, ...]]) -> None:
    limits = SessionLimits(3, 10, 1)
    with tempfile.TemporaryDirectory() as d:
        a = open_store("lmdb", Path(d) / "a", limits)
        b = open_store("mem", Path(d) / "b", limits)
        try:
            for g in (1, 2):
                a.bootstrap(g, CONF)
                b.bootstrap(g, CONF)
            for term, o in enumerate(ops, 2):
                out = []
                for s in (a, b):
                    try:
                        out.append(("ok", _step(s, o, term)))
                    except (RaftError, StorageError, SnapshotTemporarilyUnavailable, CompactedError) as err:
                        out.append(("err", type(err).__name__))
                assert out[0] == out[1], o
                assert observe(a) == observe(b), o
        finally:
            a.close()
            b.close()


def test_audit_head_is_a_durable_write(make: Callable[..., Any]) -> None:
    from kvstore.node.store import AuditHead

    s = make()
    assert s.audit_head() is None
    s.set_audit_head(AuditHead(5, b"\x01" * 32, 2))
    s.set_audit_head(AuditHead(9, b"\x02" * 32, 3))
    assert s.audit_head() == AuditHead(9, b"\x02" * 32, 3)
    if isinstance(s, MemoryNodeStore):
        assert s.crash().audit_head() == AuditHead(9, b"\x02" * 32, 3)


def test_an_unsynced_audit_head_is_lost_in_a_crash() -> None:
    from kvstore.node.store import AuditHead

    s = MemoryNodeStore(sync=True)
    s.set_audit_head(AuditHead(1, b"\x01" * 32))
    s.sync = False
    s.set_audit_head(AuditHead(2, b"\x02" * 32))
    assert s.crash().audit_head() == AuditHead(1, b"\x01" * 32)


def test_checkpoint_mode_crash_loses_every_apply_since_the_last_checkpoint() -> None:
    """`MemoryNodeStore(state_sync="checkpoint")`: applies are durable only at a checkpoint; a crash
    goes back to it whatever the OS wrote (`keep_unsynced` is ignored), the WAL keeps the entries to
    replay, and compaction never passes the checkpointed applied index."""
    s = MemoryNodeStore(state_sync="checkpoint", checkpoint_every=1 << 30)
    s.bootstrap(1, ConfState((1,)))
    append(s, 1, [put(b"a"), put(b"b")])
    apply_all(s, 1, ConfState((1,)))
    s.checkpoint()
    at = s.applied_index(1)
    append(s, 1, [put(b"c")])
    apply_all(s, 1, ConfState((1,)))
    live = s.applied_index(1)
    assert s.checkpointed_applied(1) == at < live
    s.compact(1, live)
    assert s.log_storage(1).first_index() == at + 1  # not past the checkpoint
    r = s.crash(keep_unsynced=5)
    assert r.applied_index(1) == at and r.get(1, b"c") is None
    ls = r.log_storage(1)
    assert ls.last_index() == live and ls.first_index() == at + 1  # the replay's entries are there
    apply_all(r, 1, ConfState((1,)))
    assert r.get(1, b"c") == b"vc0"
    r.checkpoint()
    assert r.crash().get(1, b"c") == b"vc0"


def test_checkpoint_mode_a_failed_forced_checkpoint_is_retried_before_the_next_write() -> None:
    s = MemoryNodeStore(state_sync="checkpoint", checkpoint_every=1 << 30)
    s.bootstrap(1, ConfState((1,)))
    apply_all(s, 1, ConfState((1,)))
    s.bootstrap(2, ConfState((1,)))
    apply_all(s, 2, ConfState((1,)))
    s.checkpoint()
    s.fail_next_fsync()
    with pytest.raises(StorageIOError):
        s.destroy_group(2, tombstone=True)  # deleted, not durable, the log not destroyed yet
    assert s.crash().has_group(2)  # lost: the group is back whole
    s2 = MemoryNodeStore(state_sync="checkpoint", checkpoint_every=1 << 30)
    s2.bootstrap(1, ConfState((1,)))
    apply_all(s2, 1, ConfState((1,)))
    s2.bootstrap(2, ConfState((1,)))
    apply_all(s2, 2, ConfState((1,)))
    s2.checkpoint()
    s2.fail_next_fsync()
    with pytest.raises(StorageIOError):
        s2.destroy_group(2, tombstone=True)
    append(s2, 1, [put(b"x")])  # the next write checkpoints first
    r = s2.crash()
    assert not r.has_group(2) and 2 in r.tombstones()  # start-up finished the destroy
