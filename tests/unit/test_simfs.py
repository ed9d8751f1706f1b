"""The simulated file system's crash model (`kvstore/storage/wal/simfs.py`), which the WAL's crash
tests rest on: what each crash mode keeps of files and of the directory."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.storage.wal import (
    CRASH_DROP,
    CRASH_KEEP,
    CRASH_RANDOM,
    CRASH_REORDER,
    SimCrashedError,
    SimFileSystem,
)


def _read(fs: SimFileSystem, name: str) -> bytes:
    f = fs.open(name)
    return f.read(0, f.size())


def test_drop_keeps_only_synced_bytes_and_synced_names() -> None:
    fs = SimFileSystem()
    f = fs.open("a", create=True)
    f.write_at(0, b"durable")
    f.fdatasync()
    fs.fsync_dir()
    f.write_at(7, b"+lost")
    g = fs.open("b", create=True)  # never in a synced directory
    g.write_at(0, b"x")
    g.fdatasync()
    after = fs.crash(CRASH_DROP)
    assert after.list() == ["a"] and _read(after, "a") == b"durable"
    with pytest.raises(SimCrashedError):
        f.write_at(0, b"late")


def test_unsynced_unlink_and_rename_come_back_on_drop() -> None:
    fs = SimFileSystem()
    for name in ("a", "b"):
        fs.open(name, create=True).fdatasync()
    fs.fsync_dir()
    fs.unlink("a")
    fs.rename("b", "c")
    assert fs.crash(CRASH_DROP).list() == ["a", "b"]


def test_keep_is_the_page_cache() -> None:
    fs = SimFileSystem()
    f = fs.open("a", create=True)
    f.write_at(0, b"never synced")
    after = fs.crash(CRASH_KEEP)
    assert after.list() == ["a"] and _read(after, "a") == b"never synced"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6), st.integers(0, 2**32))
def test_random_keeps_a_prefix_of_writes_the_last_maybe_torn(writes: list[bytes], seed: int) -> None:
    fs = SimFileSystem(random.Random(seed))
    f = fs.open("log", create=True)
    f.write_at(0, b"BASE")
    f.fdatasync()
    fs.fsync_dir()
    pos = 4
    for w in writes:
        f.write_at(pos, w)
        pos += len(w)
    got = _read(fs.crash(CRASH_RANDOM), "log")
    assert got.startswith(b"BASE")
    full = b"BASE" + b"".join(writes)
    assert full.startswith(got)  # a prefix of the appends, cut anywhere in the last one kept


def test_failed_fdatasync_makes_nothing_durable() -> None:
    fs = SimFileSystem()
    f = fs.open("a", create=True)
    fs.fsync_dir()
    f.write_at(0, b"x")
    fs.fail_next_fdatasync()
    with pytest.raises(OSError):
        f.fdatasync()
    assert _read(fs.crash(CRASH_DROP), "a") == b""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6), st.integers(0, 2**32))
def test_reorder_keeps_any_subset_of_writes(writes: list[bytes], seed: int) -> None:
    fs = SimFileSystem(random.Random(seed))
    f = fs.open("log", create=True)
    f.allocate(200)
    f.fdatasync()
    fs.fsync_dir()
    pos = 0
    spans = []
    for w in writes:
        f.write_at(pos, w)
        spans.append((pos, w))
        pos += len(w)
    got = _read(fs.crash(CRASH_REORDER), "log")
    assert len(got) == 200
    for p, w in spans:  # each write's bytes are its own bytes or still zeros, nothing else
        assert all(got[p + i] in (w[i], 0) for i in range(len(w)))
