"""Moving an old data directory's Raft logs (LMDB) into the WAL (`storage/walmigrate.py`): every
group's log, base and hard state come out the same through `LogStorage`, durably, and a second
run changes nothing."""

from __future__ import annotations

from pathlib import Path

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft.storage import LogStorage
from kvstore.raft.types import ConfState, Entry, HardState
from kvstore.storage.raftwal import RaftWal
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.wal import OsFileSystem, WalOptions
from kvstore.storage.walmigrate import import_lmdb_logs

OPTS = WalOptions(segment_bytes=4096, max_record_bytes=2048)


def _view(ls: LogStorage | None) -> tuple[object, ...]:
    assert ls is not None
    lo, hi = ls.first_index(), ls.last_index()
    return (ls.initial_state(), lo, hi, ls.term(lo - 1), ls.entries(lo, hi + 1))


def test_lmdb_logs_move_into_the_wal_whole_and_durably(tmp_path: Path) -> None:
    store = LmdbNodeStore(tmp_path / "db")
    conf = ConfState((1, 2, 3))
    assert store.bootstrap(1, conf)
    assert store.bootstrap(2, ConfState((1,)), [b"a", b"b"])
    ents = [Entry(2, i, data=bytes([i]) * 300, group=1) for i in range(4, 30)]
    store.persist([GroupWrite(1, ents, HardState(2, 1, 20))])
    boot = store.log_storage(1).entries(1, 4)
    store.apply([ApplyBatch(1, boot, conf)])
    store.compact(1, 2)
    assert store.log_storage(1).first_index() == 3
    want = {g: _view(store.log_storage(g)) for g in (1, 2)}

    rw = RaftWal.open(OsFileSystem(tmp_path / "wal"), OPTS)
    assert import_lmdb_logs(store, rw) == [1, 2]
    assert len(rw.wal.segments()) > 1  # group 1's entries spread over segments and payloads
    assert {g: _view(rw.log(g)) for g in (1, 2)} == want
    rw.close()
    rw = RaftWal.open(OsFileSystem(tmp_path / "wal"), OPTS)
    assert {g: _view(rw.log(g)) for g in (1, 2)} == want
    last = rw.wal.last_seq
    assert import_lmdb_logs(store, rw) == [] and rw.wal.last_seq == last
    rw.close()
    store.close()
