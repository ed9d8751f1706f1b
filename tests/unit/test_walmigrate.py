"""An old data directory (Raft logs in LMDB, written by the code before the WAL was wired in:
`tests/fixtures/lmdb_raftlog_v1.tar.gz`) opens with today's `LmdbNodeStore`: every group's log,
base and hard state come out of the WAL as they were, the LMDB log tables are emptied, the
state machine is untouched, and a crash at any point of the migration loses nothing."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest
from fixturemod import fixture_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.storage.dataformat import FORMAT_FILE
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.walmigrate import drop_lmdb_logs, import_lmdb_logs, lmdb_log_groups

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


FIX: Any = fixture_module("make_lmdb_raftlog_v1")


def _unpack(tmp: Path) -> Path:
    with tarfile.open(FIXTURES / "lmdb_raftlog_v1.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "db"


def _check(store: LmdbNodeStore) -> None:
    want: dict[str, Any] = FIX.describe()
    assert store.groups() == [1, 2] and store.tombstones() == set(want["tombstones"])
    g1 = want["g1"]
    ls = store.log_storage(1)
    assert (ls.first_index(), ls.last_index()) == (g1["first"], g1["last"])
    assert ls.initial_state() == (HardState(*g1["hs"]), ConfState((1, 2, 3)))
    assert ls.term(g1["first"] - 1) == g1["base_term"]
    got = ls.entries(g1["first"], g1["last"] + 1)
    assert got == [Entry(2, i, EntryType.NORMAL, FIX.put(i), 1) for i in range(g1["first"], g1["last"] + 1)]
    assert store.applied_index(1) == g1["applied"]
    assert store.get(1, b"k25") == b"v25" * 20 and store.get(1, b"k31") is None
    g2 = want["g2"]
    ls2 = store.log_storage(2)
    assert (ls2.first_index(), ls2.last_index(), ls2.initial_state()[0]) == (g2["first"], g2["last"], HardState(*g2["hs"]))
    assert store.applied_index(2) == g2["applied"] and store.get(2, b"k100") == b"v100" * 20
    assert store.log_storage(5).last_index() == 0


def test_an_old_data_directory_moves_its_logs_into_the_wal(tmp_path: Path) -> None:
    db = _unpack(tmp_path)
    store = LmdbNodeStore(db)
    try:
        assert lmdb_log_groups(store._env) == []  # the LMDB log tables were emptied
        assert sorted(store._wal.groups()) == [1, 2]
        _check(store)
        # The node goes on from there: the WAL takes new entries, applies and compactions.
        new = Entry(2, 41, data=FIX.put(41), group=1)
        store.persist_and_apply(
            [GroupWrite(1, [new], HardState(2, 1, 41))],
            [ApplyBatch(1, [*store.log_storage(1).entries(31, 41), new], ConfState((1, 2, 3)))],
        )
        store.compact(1, 35)
        assert store.applied_index(1) == 41 and store.log_storage(1).first_index() == 36
    finally:
        store.close()
    store = LmdbNodeStore(db)
    try:
        assert store.get(1, b"k41") == b"v41" * 20 and store.log_storage(1).first_index() == 36
        assert store.log_storage(1).last_index() == 41 and store.hard_state(1) == HardState(2, 1, 41)
    finally:
        store.close()


@pytest.mark.parametrize("crash_after", ["import_unsynced", "import", "drop"])
def test_a_migration_cut_short_by_a_crash_completes_on_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_after: str
) -> None:
    """The WAL copy is durable before the LMDB one goes: a crash after the (unsynced or synced)
    import, or after the drop, and the next open has every log exactly once."""
    from kvstore.storage import walmigrate
    from kvstore.storage.raftwal import RaftWal

    class Crash(Exception):
        pass

    db = _unpack(tmp_path)
    real_sync = RaftWal.sync
    if crash_after == "import_unsynced":
        # The import's records are written but its one sync never happens: after a kill -9
        # they may or may not be on disk; here they are (page cache), and must not count twice.
        def no_sync(self: RaftWal) -> None:
            raise Crash()

        monkeypatch.setattr(RaftWal, "sync", no_sync)
    elif crash_after == "import":
        def crash_drop(env: Any) -> None:
            raise Crash()

        monkeypatch.setattr(walmigrate, "drop_lmdb_logs", crash_drop)
    else:
        real_drop = drop_lmdb_logs

        def drop_then_crash(env: Any) -> None:
            real_drop(env)
            raise Crash()

        monkeypatch.setattr(walmigrate, "drop_lmdb_logs", drop_then_crash)
    with pytest.raises(Crash):
        LmdbNodeStore(db)
    monkeypatch.setattr(RaftWal, "sync", real_sync)
    monkeypatch.setattr(walmigrate, "drop_lmdb_logs", drop_lmdb_logs)
    store = LmdbNodeStore(db)
    try:
        assert lmdb_log_groups(store._env) == []
        _check(store)
        assert import_lmdb_logs(store._env, store._wal.rw) == []  # nothing left to import
    finally:
        store.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hs=st.binary(max_size=30), base=st.binary(max_size=40),
    entries=st.lists(st.tuples(st.integers(0, 6), st.binary(max_size=20)), max_size=5),
)
def test_hostile_lmdb_log_tables_fail_the_open_cleanly(
    tmp_path_factory: pytest.TempPathFactory, hs: bytes, base: bytes, entries: list[tuple[int, bytes]]
) -> None:
    """Whatever bytes an old data directory's log tables hold, opening it either migrates them or
    raises StorageError (a clear refusal), never another exception, and never half a migration."""
    from kvstore.storage import layout
    from kvstore.storage.errors import StorageError

    db = tmp_path_factory.mktemp("hostile") / "db"
    store = LmdbNodeStore(db, sync=False, wal_segment_bytes=64 << 10)
    env = store._env
    p = layout.group_prefix(7)

    def fill(txn: Any) -> None:
        if hs:
            txn.put(p + layout.HARD_STATE_TAG, hs, db=env.db(layout.DB_RAFTSTATE))
        if base:
            txn.put(p + layout.LOG_BASE_TAG, base, db=env.db(layout.DB_RAFTSTATE))
        for index, value in entries:
            txn.put(layout.log_key(7, index), value, db=env.db(layout.DB_RAFTLOG))

    env.write(fill)
    store.close()
    (db / FORMAT_FILE).unlink()  # a directory written before the format record: format 1, migrated at open
    try:
        store = LmdbNodeStore(db, sync=False, wal_segment_bytes=64 << 10)
    except StorageError:
        return
    try:
        assert lmdb_log_groups(store._env) == []  # migrated whole: the tables are empty
    finally:
        store.close()
