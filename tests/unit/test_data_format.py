"""The data directory's format version (kvstore/storage/dataformat.py, run by LmdbNodeStore at
open): a new directory records the current format; a newer format is refused before anything is
opened or changed, also by `kvstore serve` with a clear message; an older one (the pre-WAL
fixture, with or without a record) is migrated and its record raised only after the migration
finished; a damaged record is one definite error."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.storage import dataformat, store
from kvstore.storage.dataformat import FORMAT_FILE, FORMAT_VERSION, FORMATS, FormatError
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.walmigrate import lmdb_log_groups

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def record(path: Path, version: int) -> None:
    body = f"kvstore data format {version}"
    (path / FORMAT_FILE).write_text(f"{body} crc={zlib.crc32(body.encode()):08x}\n")


def old_dir(tmp: Path) -> Path:
    with tarfile.open(FIXTURES / "lmdb_raftlog_v1.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "db"


def test_every_older_format_has_its_migration() -> None:
    assert set(FORMATS) == set(range(1, FORMAT_VERSION + 1))
    assert set(store.MIGRATIONS) == set(range(1, FORMAT_VERSION))


def test_a_new_directory_records_the_current_format(tmp_path: Path) -> None:
    db = tmp_path / "db"
    LmdbNodeStore(db, sync=False).close()
    assert dataformat.read(db) == FORMAT_VERSION
    s = LmdbNodeStore(db, sync=False)
    assert s.format == FORMAT_VERSION
    s.close()


def test_a_newer_format_is_refused_before_anything_is_touched(tmp_path: Path) -> None:
    db = tmp_path / "db"
    LmdbNodeStore(db, sync=False).close()
    record(db, FORMAT_VERSION + 1)
    before = {p.name: p.stat().st_mtime_ns for p in db.rglob("*")}
    with pytest.raises(FormatError, match=rf"has data format {FORMAT_VERSION + 1}, newer than this binary knows"):
        LmdbNodeStore(db, sync=False)
    assert {p.name: p.stat().st_mtime_ns for p in db.rglob("*")} == before
    # `kvstore serve` says so and exits 2, without starting.
    out = subprocess.run(
        [sys.executable, "-m", "kvstore.cli.server", "serve", "--id", "1", "--data-dir", str(tmp_path),
         "--listen", "127.0.0.1:1", "--peers", "1=127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"has data format {FORMAT_VERSION + 1}, newer than this binary knows" in out.stderr


@pytest.mark.parametrize("with_record", [False, True])
def test_an_older_format_is_migrated_and_then_recorded(tmp_path: Path, with_record: bool) -> None:
    db = old_dir(tmp_path)
    if with_record:
        record(db, 1)
    s = LmdbNodeStore(db)
    try:
        assert s.format == 1 and dataformat.read(db) == FORMAT_VERSION
        assert lmdb_log_groups(s._env) == [] and sorted(s._wal.groups()) == [1, 2]
    finally:
        s.close()
    s = LmdbNodeStore(db)
    assert s.format == FORMAT_VERSION and s.groups() == [1, 2]
    s.close()


def test_a_migration_cut_short_keeps_the_old_record_and_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = old_dir(tmp_path)
    real = store.MIGRATIONS[1]

    def crashes(s: LmdbNodeStore) -> None:
        real(s)
        raise OSError("crash after the migration, before the record")

    monkeypatch.setitem(store.MIGRATIONS, 1, crashes)
    with pytest.raises(OSError, match="crash after the migration"):
        LmdbNodeStore(db)
    assert dataformat.read(db) is None  # still the pre-record format
    monkeypatch.setitem(store.MIGRATIONS, 1, real)
    s = LmdbNodeStore(db)
    try:
        assert dataformat.read(db) == FORMAT_VERSION and s.groups() == [1, 2]
    finally:
        s.close()


@given(st.binary(max_size=140))
def test_the_record_decoder_is_total(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / FORMAT_FILE).write_bytes(data)
        with contextlib.suppress(FormatError):
            v = dataformat.read(Path(d))
            assert v is not None and (Path(d) / FORMAT_FILE).read_bytes() == dataformat._line(v).encode()


@pytest.mark.parametrize("text", ["kvstore data format 2\n", "kvstore data format 02 crc=00000000\n", "", "\xff"])
def test_damaged_records_are_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / FORMAT_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(FormatError):
        dataformat.check(tmp_path)
    record(tmp_path, 0)
    with pytest.raises(FormatError, match="never existed"):
        dataformat.check(tmp_path)
    os.remove(tmp_path / FORMAT_FILE)


def test_the_record_is_whole_when_the_os_writes_a_byte_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(dataformat.os, "write", lambda fd, data: real(fd, bytes(data[:1])))
    dataformat.write(tmp_path, FORMAT_VERSION)
    monkeypatch.undo()
    assert dataformat.read(tmp_path) == FORMAT_VERSION


def test_a_full_disk_while_recording_is_a_format_error_and_keeps_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataformat.write(tmp_path, 1)

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataformat.os, "write", full)
    with pytest.raises(FormatError, match="cannot write the data format record"):
        dataformat.write(tmp_path, FORMAT_VERSION)
    monkeypatch.undo()
    assert dataformat.read(tmp_path) == 1
