"""The state machine's writeback pacer (`storage/writeback.py`): it calls the kernel often and
stops for good at close; a failing call ends it without harm; the LMDB environment runs it only
in checkpoint mode; the server's setting is validated."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

import pytest

from kvstore.server.config import MAX_WRITEBACK_MS, NodeConfig
from kvstore.storage import writeback
from kvstore.storage.lmdb_env import LmdbEnv
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.writeback import WritebackPacer

WAIT = 10.0


def _file(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.write_bytes(b"x" * 8192)
    return p


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_kernel_call_is_there_and_takes_a_file_with_dirty_pages(tmp_path: Path) -> None:
    assert writeback.available()
    p = _file(tmp_path)
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * 4096, 0)  # a dirty page
        writeback.start_writeback(fd)  # raises on failure
    finally:
        os.close(fd)
    with pytest.raises(OSError) as err:
        writeback.start_writeback(fd)  # closed: the kernel's error comes back as OSError
    assert err.value.errno == errno.EBADF


def test_the_pacer_calls_repeatedly_and_never_after_close(tmp_path: Path) -> None:
    calls: list[int] = []
    enough = threading.Event()

    def flush(fd: int) -> None:
        os.fstat(fd)  # its own descriptor, open
        calls.append(fd)
        if len(calls) >= 3:
            enough.set()

    pacer = WritebackPacer(_file(tmp_path), 0.001, flush=flush)
    assert enough.wait(WAIT), f"only {len(calls)} calls"
    fd = calls[0]
    assert all(c == fd for c in calls)
    pacer.close()
    assert not pacer.alive
    n = len(calls)
    assert pacer._fd == -1  # its descriptor closed with it
    pacer.close()  # idempotent
    assert len(calls) == n and pacer.failed is None


def test_a_failing_call_ends_the_pacer_and_nothing_else(tmp_path: Path) -> None:
    tried = threading.Event()

    def flush(fd: int) -> None:
        tried.set()
        raise OSError(errno.EIO, "simulated")

    pacer = WritebackPacer(_file(tmp_path), 0.001, flush=flush)
    assert tried.wait(WAIT)
    pacer._thread.join(WAIT)
    assert not pacer.alive
    assert pacer.failed is not None and pacer.failed.errno == errno.EIO
    assert pacer.calls == 0
    pacer.close()


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_the_interval_must_be_positive(tmp_path: Path, interval: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        WritebackPacer(_file(tmp_path), interval)


@pytest.mark.skipif(not writeback.available(), reason="no sync_file_range here")
def test_lmdb_runs_the_pacer_in_checkpoint_mode_only_and_stops_it_at_close(tmp_path: Path) -> None:
    env = LmdbEnv(tmp_path / "a", checkpointed=True, writeback_interval=0.001)
    try:
        assert env.pacer is not None and env.pacer.alive
        db = env.db(b"data")
        for i in range(50):
            env.write(lambda txn, i=i: txn.put(b"k%d" % i, b"v" * 100, db=db))
        pacer = env.pacer
    finally:
        env.close()
    assert not pacer.alive and pacer.failed is None
    plain = LmdbEnv(tmp_path / "b", checkpointed=False, writeback_interval=0.001)
    try:
        assert plain.pacer is None  # every commit is synced: nothing piles up
    finally:
        plain.close()
    off = LmdbEnv(tmp_path / "c", checkpointed=True, writeback_interval=0.0)
    try:
        assert off.pacer is None
    finally:
        off.close()


@pytest.mark.skipif(not writeback.available(), reason="no sync_file_range here")
def test_the_store_passes_the_interval_through_and_keeps_its_data(tmp_path: Path) -> None:
    from kvstore.raft import ConfState

    s = LmdbNodeStore(tmp_path / "s", state_sync="checkpoint", writeback_interval=0.001)
    try:
        assert s._env.pacer is not None and s._env.pacer.alive
        s.bootstrap(1, ConfState((1,)))
        last = s.log_storage(1).last_index()
        assert last >= 1
    finally:
        s.close()
    assert not s._env.pacer.alive
    again = LmdbNodeStore(tmp_path / "s", state_sync="checkpoint")
    try:
        assert again._env.pacer is None
        assert again.log_storage(1).last_index() == last
    finally:
        again.close()


@pytest.mark.parametrize("ms, ok", [(0, True), (200, True), (MAX_WRITEBACK_MS, True), (-1, False), (MAX_WRITEBACK_MS + 1, False)])
def test_the_servers_setting_is_validated(ms: int, ok: bool) -> None:
    cfg = NodeConfig(id=1, data_dir=Path("d"), listen="127.0.0.1:1", peers={1: "127.0.0.1:1"}, lmdb_writeback_ms=ms)
    if ok:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match="lmdb-writeback-ms"):
            cfg.validate()
