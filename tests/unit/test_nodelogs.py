"""The node's Raft logs in the write-ahead log (`storage/nodelogs.py` inside `LmdbNodeStore`): one
`fdatasync` per cycle, the crash windows between the WAL and LMDB repaired at start-up, the WAL
kept bounded by checkpoints, and random cycles against `MemoryStorage` with crashes of the
simulated file system (unsynced records lost, torn writes)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft.memstorage import MemoryStorage
from kvstore.raft.storage import CompactedError, UnavailableError
from kvstore.raft.types import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMeta
from kvstore.storage import commands
from kvstore.storage.nodelogs import NodeLogs
from kvstore.storage.snapfile import encode_snapshot
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.wal import (
    CRASH_DROP,
    CRASH_RANDOM,
    CRASH_REORDER,
    OsFileSystem,
    SimFileSystem,
    WalOptions,
)

CONF = ConfState((1, 2, 3))


class CountingFs(OsFileSystem):
    """Counts the WAL's `fdatasync`s."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.syncs = [0]

    def open(self, name: str, *, create: bool = False) -> Any:
        f = super().open(name, create=create)
        syncs, real = self.syncs, f.fdatasync

        class Counted:
            def __getattr__(self, attr: str) -> Any:
                return getattr(f, attr)

            def fdatasync(self) -> None:
                syncs[0] += 1
                real()

        return Counted()


def ents(g: int, start: int, n: int, term: int = 1) -> list[Entry]:
    return [Entry(term, start + i, EntryType.NORMAL, commands.encode_put(b"k%d" % (start + i), b"v"), g) for i in range(n)]


def view(store: LmdbNodeStore, g: int) -> tuple[Any, ...]:
    ls = store.log_storage(g)
    lo, hi = ls.first_index(), ls.last_index()
    return ls.initial_state(), lo, hi, ls.term(lo - 1), ls.entries(lo, hi + 1)


def test_a_cycle_for_many_groups_is_one_fdatasync_and_reopens_the_same(tmp_path: Path) -> None:
    fs = CountingFs(tmp_path / "db" / "wal")
    store = LmdbNodeStore(tmp_path / "db", wal_fs=fs)
    for g in (1, 2, 3):
        store.bootstrap(g, CONF)
    before = fs.syncs[0]
    store.persist([GroupWrite(g, ents(g, 4, 5), HardState(2, 1, 6)) for g in (1, 2, 3)])
    assert fs.syncs[0] == before + 1  # one flush for three groups' entries and hard states
    store.persist_and_apply([], [ApplyBatch(1, store.log_storage(1).entries(1, 7), CONF)])
    assert fs.syncs[0] == before + 1  # applying writes nothing to the WAL
    # A cycle that only moves commit indexes (etcd's MustSync is false) is not flushed...
    store.persist_and_apply([GroupWrite(g, [], HardState(2, 1, 8)) for g in (1, 2)],
                            [ApplyBatch(1, store.log_storage(1).entries(7, 9), CONF)])
    assert fs.syncs[0] == before + 1 and store.hard_state(2) == HardState(2, 1, 8)
    store.persist([GroupWrite(3, [], HardState(3, 0, 6))])  # ...a new term is
    assert fs.syncs[0] == before + 2
    want = {g: view(store, g) for g in (1, 2, 3)}
    store.close()
    store = LmdbNodeStore(tmp_path / "db")
    assert {g: view(store, g) for g in (1, 2, 3)} == want and store.applied_index(1) == 8
    store.close()


def test_a_commit_index_lost_without_a_flush_is_raised_to_the_applied_index_at_open(tmp_path: Path) -> None:
    """The crash after an unflushed commit-only record and the apply transaction that followed
    it: LMDB has applied entries the WAL's commit index does not cover; the store raises the
    commit index before any core reads it (a core refuses an applied index above the commit)."""
    db = tmp_path / "db"
    store = LmdbNodeStore(db)
    store.bootstrap(1, CONF)
    store.persist([GroupWrite(1, ents(1, 4, 5), HardState(2, 1, 3))])
    wal_file = store._wal.rw.wal._file
    assert wal_file is not None
    end = store._wal.rw.wal._offset  # what the lost record would have followed
    store.persist_and_apply([GroupWrite(1, [], HardState(2, 1, 8))], [ApplyBatch(1, store.log_storage(1).entries(1, 9), CONF)])
    wal_file.truncate(end)  # the unflushed record never reached the disk
    store.close()
    store = LmdbNodeStore(db)
    assert store.applied_index(1) == 8 and store.hard_state(1) == HardState(2, 1, 8)
    assert store.log_storage(1).last_index() == 8
    store.close()


def _install(store: LmdbNodeStore, g: int, meta: SnapshotMeta, hs: HardState) -> None:
    path = store.receive_snapshot(g, encode_snapshot(g, meta, [], 64))
    store.persist([GroupWrite(g, [], hs, meta, path)])


@pytest.mark.parametrize("conflict", [False, True])
def test_a_crash_between_the_snapshot_install_and_the_wal_reset_is_repaired_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conflict: bool
) -> None:
    """LMDB installs first; a crash before the WAL's RESET leaves the state machine ahead of the
    log (or, with `conflict`, the log holding another term at the snapshot's index): the next open
    resets the log to the snapshot's base before any core reads it."""
    db = tmp_path / "db"
    store = LmdbNodeStore(db)
    store.bootstrap(1, CONF)
    if conflict:  # uncommitted entries of an old term up to beyond the snapshot's index
        store.persist([GroupWrite(1, ents(1, 4, 30, term=1), HardState(3, 2, 3))])
    meta = SnapshotMeta(20, 4, CONF)

    class Crash(Exception):
        pass

    def crash(self: NodeLogs, records: Any) -> None:
        raise Crash()

    monkeypatch.setattr(NodeLogs, "write", crash)
    with pytest.raises(Crash):
        _install(store, 1, meta, HardState(4, 0, 20))
    monkeypatch.undo()
    assert store.applied_index(1) == 20  # the install is durable in LMDB
    store.close()
    store = LmdbNodeStore(db)
    ls = store.log_storage(1)
    assert (ls.first_index(), ls.last_index(), ls.term(20)) == (21, 20, 4)
    assert ls.initial_state() == (HardState(4, 0, 20), CONF)
    assert store.applied_index(1) == 20
    # The node goes on from the snapshot: new entries append after it.
    store.persist([GroupWrite(1, ents(1, 21, 2, term=4), HardState(4, 0, 22))])
    store.close()
    store = LmdbNodeStore(db)  # a clean log is not "repaired" again
    assert store.log_storage(1).last_index() == 22 and store.hard_state(1) == HardState(4, 0, 22)
    store.close()


def test_a_crash_between_the_lmdb_delete_and_the_wal_destroy_finishes_the_destroy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "db"
    store = LmdbNodeStore(db)
    store.bootstrap(1, CONF)
    store.bootstrap(2, CONF)
    store.apply([ApplyBatch(2, store.log_storage(2).entries(1, 4), CONF)])

    class Crash(Exception):
        pass

    def crash(self: NodeLogs, group: int) -> None:
        raise Crash()

    monkeypatch.setattr(NodeLogs, "destroy", crash)
    for g in (1, 2):
        with pytest.raises(Crash):
            store.destroy_group(g, tombstone=True)
    monkeypatch.undo()
    store.close()
    store = LmdbNodeStore(db)
    assert store.groups() == [] and store.tombstones() == {1, 2}
    assert store._wal.groups() == [] and store.log_storage(2).last_index() == 0
    assert store.bootstrap(1, CONF) is False  # never recreated
    store.close()


def test_checkpoints_keep_the_wal_bounded(tmp_path: Path) -> None:
    db = tmp_path / "db"
    store = LmdbNodeStore(db, sync=False, wal_segment_bytes=16 << 10)
    store.bootstrap(1, CONF)
    store.bootstrap(2, CONF)
    last = 3
    for _ in range(300):
        batch = {g: ents(g, last + 1, 4) for g in (1, 2)}
        store.persist([GroupWrite(g, batch[g], HardState(1, 0, last + 4)) for g in (1, 2)])
        store.apply([ApplyBatch(g, store.log_storage(g).entries(store.applied_index(g) + 1, last + 5), CONF) for g in (1, 2)])
        last += 4
        if last % 100 == 3:
            for g in (1, 2):
                store.compact(g, last - 20)
        assert len(store._wal.rw.wal.segments()) <= 4
    assert store._wal.checkpoints > 3
    want = {g: view(store, g) for g in (1, 2)}
    store.close()
    store = LmdbNodeStore(db, sync=False, wal_segment_bytes=16 << 10)
    assert {g: view(store, g) for g in (1, 2)} == want
    store.close()


# --- random cycles on the simulated file system against MemoryStorage ---------------------------
OPTS = WalOptions(segment_bytes=2048, max_record_bytes=1024)


def _same(logs: NodeLogs, g: int, ms: MemoryStorage) -> None:
    lg = logs.log(g)
    assert lg is not None
    assert lg.initial_state() == ms.initial_state()
    assert (lg.first_index(), lg.last_index()) == (ms.first_index(), ms.last_index())
    assert lg.entries(lg.first_index(), lg.last_index() + 1) == ms.entries(ms.first_index(), ms.last_index() + 1)
    for i in (ms.first_index() - 1, ms.last_index()):
        assert lg.term(i) == ms.term(i)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 1 << 30), mode=st.sampled_from([CRASH_DROP, CRASH_RANDOM, CRASH_REORDER]))
def test_random_cycles_recover_every_synced_cycle(seed: int, mode: Any) -> None:
    """Cycles of appends (with conflicting overwrites), hard states and snapshot RESETs for two
    groups through `NodeLogs.stage` / `write` / `sync`, compactions between them, on a WAL small
    enough to rotate and checkpoint; then a crash of the simulated disk (random prefixes of the
    unsynced writes, reordered, torn). The reopened logs equal the reference after the last
    synced cycle; a last cycle left unsynced under power loss (CRASH_DROP) is gone whole."""
    rng = random.Random(seed)
    fs = SimFileSystem(random.Random(seed + 1))
    logs = NodeLogs(fs, OPTS)
    ref = {g: MemoryStorage() for g in (1, 2)}
    applied = {1: 0, 2: 0}

    def state() -> dict[int, tuple[Any, ...]]:
        return {
            g: (ms.initial_state(), ms.first_index(), ms.last_index(), ms.entries(ms.first_index(), ms.last_index() + 1))
            for g, ms in ref.items() if logs.log(g) is not None
        }

    synced = state()
    steps = rng.randint(1, 40)
    for step in range(steps):
        writes: list[GroupWrite] = []
        for g in (1, 2):
            ms = ref[g]
            r = rng.random()
            if r < 0.1 and logs.log(g) is not None:
                meta = SnapshotMeta(ms.last_index() + rng.randint(1, 4), 9 + ms.initial_state()[0].term, CONF)
                hs = HardState(meta.term, 0, meta.index)
                writes.append(GroupWrite(g, [], hs, meta, Path("unused")))
                ms.apply_snapshot(Snapshot(meta))
                ms.set_hard_state(hs)
                applied[g] = meta.index
            elif r < 0.8:
                lo = max(ms.first_index(), applied[g] + 1)
                start = rng.randint(lo, ms.last_index() + 1)
                term = ms.initial_state()[0].term + rng.randint(0, 1)
                es = [Entry(term, start + i, EntryType.NORMAL, bytes([rng.randrange(256)]) * rng.randint(0, 300), g)
                      for i in range(rng.randint(1, 6))]
                hs = HardState(term, rng.randint(0, 3), min(es[-1].index, ms.initial_state()[0].commit + 2))
                writes.append(GroupWrite(g, es, hs))
                ms.append(es)
                ms.set_hard_state(hs)
        durable = logs.rw.wal.synced_seq
        logs.write(logs.stage(writes, lambda g: 0))
        if step == steps - 1 and mode == CRASH_DROP and rng.random() < 0.5 and logs.rw.wal.synced_seq == durable:
            break  # the last cycle never synced (nor did a rotation flush part of it): power loss takes it all
        logs.sync()
        for g in (1, 2):
            ms = ref[g]
            if logs.log(g) is not None and rng.random() < 0.2 and ms.last_index() > ms.first_index():
                idx = rng.randint(ms.first_index(), ms.last_index())
                applied[g] = max(applied[g], idx)
                logs.compact(g, idx, applied[g])  # a synced write of its own
                ms.compact(idx)
        synced = state()
    after = NodeLogs(fs.crash(mode), OPTS)
    got = {}
    for g in after.groups():
        lg = after.log(g)
        assert lg is not None
        got[g] = ((lg.hard_state, lg.base.conf_state), lg.first_index(), lg.last_index(),
                  lg.entries(lg.first_index(), lg.last_index() + 1))
    assert got == synced


def test_the_logs_views_answer_like_an_empty_memory_storage(tmp_path: Path) -> None:
    store = LmdbNodeStore(tmp_path / "db")
    ls, ms = store.log_storage(9), MemoryStorage()
    assert (ls.first_index(), ls.last_index(), ls.term(0), ls.entries(1, 1)) == (1, 0, 0, [])
    for bad in (lambda s: s.term(1), lambda s: s.entries(1, 2)):
        for s in (ls, ms):
            with pytest.raises(UnavailableError):
                bad(s)
    with pytest.raises(CompactedError):
        ls.entries(0, 1)
    store.close()
