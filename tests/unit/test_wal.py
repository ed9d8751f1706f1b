"""The write-ahead log (`kvstore/storage/wal/`): format, rotation, truncation, recovery on the real
and the simulated file system, hostile segment files, and random append/sync/truncate/crash runs
on the simulated one (every synced record survives, nothing torn is ever returned)."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.storage.errors import StorageClosedError, StorageFullError, StorageIOError
from kvstore.storage.wal import (
    CRASH_DROP,
    CRASH_KEEP,
    CRASH_RANDOM,
    CRASH_REORDER,
    FileSystem,
    OsFileSystem,
    SimFileSystem,
    Wal,
    WalCorruptError,
    WalOptions,
)
from kvstore.storage.wal.record import (
    RECORD_HEADER,
    SEGMENT_HEADER,
    encode_record,
    encode_segment_header,
    scan_records,
    segment_name,
)

SMALL = WalOptions(segment_bytes=256, max_record_bytes=200)


def reopen(fs: FileSystem, opts: WalOptions = SMALL) -> tuple[Wal, list[tuple[int, bytes]]]:
    recs: list[tuple[int, bytes]] = []
    return Wal.open(fs, opts, recs), recs


def payloads(n: int, size: int = 40, tag: str = "p") -> list[bytes]:
    return [f"{tag}{i}:".encode() + bytes([i % 251]) * size for i in range(n)]


# --- the real file system -------------------------------------------------------------------------
def test_round_trip_rotation_and_reopen_on_disk(tmp_path: Path) -> None:
    fs = OsFileSystem(tmp_path / "wal")
    wal = Wal.open(fs, SMALL)
    data = payloads(20)
    for i in range(0, 20, 3):
        wal.append(data[i : i + 3])
        wal.sync()
    assert wal.last_seq == 20 and len(wal.segments()) > 3
    assert all(
        (tmp_path / "wal" / n).stat().st_size >= SMALL.segment_bytes for n in wal.segments()
    )  # preallocated
    wal.close()
    wal, recs = reopen(OsFileSystem(tmp_path / "wal"))
    assert recs == list(enumerate(data, 1))
    assert wal.stats.torn_tail_bytes == 0
    wal.append([b"next"])
    wal.sync()
    wal.close()
    _, recs = reopen(OsFileSystem(tmp_path / "wal"))
    assert recs[-1] == (21, b"next")


def test_torn_tail_on_disk_is_cut_and_never_used(tmp_path: Path) -> None:
    fs = OsFileSystem(tmp_path)
    wal = Wal.open(fs, WalOptions(segment_bytes=4096))
    wal.append([b"one", b"two"])
    wal.sync()
    wal.close()
    seg = tmp_path / segment_name(1)
    raw = bytearray(seg.read_bytes())
    end = SEGMENT_HEADER.size + 2 * RECORD_HEADER.size + 6
    rec3 = encode_record(3, b"three")
    raw[end : end + len(rec3) - 2] = rec3[:-2]  # a record torn two bytes before its end
    rec4 = encode_record(4, b"four")  # and a valid-looking record after it: never used
    raw[end + len(rec3) : end + len(rec3) + len(rec4)] = rec4
    seg.write_bytes(bytes(raw))
    wal, recs = reopen(OsFileSystem(tmp_path), WalOptions(segment_bytes=4096))
    assert recs == [(1, b"one"), (2, b"two")]
    assert wal.stats.torn_tail_bytes > 0
    wal.append([b"3again"])
    wal.sync()
    wal.close()
    _, recs = reopen(OsFileSystem(tmp_path), WalOptions(segment_bytes=4096))
    assert recs == [(1, b"one"), (2, b"two"), (3, b"3again")]


def test_one_fdatasync_per_sync_and_none_for_nothing_new() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, WalOptions(segment_bytes=1 << 20))
    before = fs.fdatasyncs
    for _ in range(10):
        wal.append(payloads(5))
        wal.sync()
    assert fs.fdatasyncs - before == 10
    wal.sync()
    assert fs.fdatasyncs - before == 10
    assert wal.stats.syncs == 10


def test_truncate_suffix_across_segments_is_durable_at_once() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, SMALL)
    wal.append(payloads(30))
    wal.sync()
    n = len(wal.segments())
    wal.truncate_suffix(7)
    assert wal.last_seq == 7 and len(wal.segments()) < n
    fs = fs.crash(CRASH_DROP)  # no sync after the truncation: it is durable by itself
    wal, recs = reopen(fs)
    assert [s for s, _ in recs] == list(range(1, 8))
    wal.append([b"new8"])
    wal.sync()
    _, recs = reopen(fs.crash(CRASH_DROP))
    assert recs[-1] == (8, b"new8") and len(recs) == 8


def test_truncate_suffix_to_nothing_and_bounds() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, SMALL, start_seq=5)
    wal.append(payloads(3))
    wal.sync()
    wal.truncate_suffix(4)
    assert wal.last_seq == 4
    wal.truncate_suffix(10)  # nothing after it: a no-op
    with pytest.raises(ValueError):
        wal.truncate_suffix(2)
    _, recs = reopen(fs.crash(CRASH_DROP))
    assert recs == []


def test_truncate_prefix_drops_whole_segments_only() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, SMALL)
    wal.append(payloads(30))
    wal.sync()
    firsts = [int(n.split(".")[0]) for n in wal.segments()]
    removed = wal.truncate_prefix(firsts[2] + 1)
    assert removed == 2 and wal.first_seq == firsts[2]
    assert wal.truncate_prefix(10_000) == len(firsts) - 3  # never the last segment
    _, recs = reopen(fs.crash(CRASH_DROP))
    assert recs and recs[-1][0] == 30 and recs[0][0] == firsts[-1]


def test_prefix_leftovers_behind_a_gap_are_dropped() -> None:
    """The unlinks of a prefix truncation persisted out of order: segments A and C remain, B is
    gone. A is a leftover (everything before the last gap is): recovery removes it."""
    fs = SimFileSystem()
    wal = Wal.open(fs, SMALL)
    wal.append(payloads(30))
    wal.sync()
    names = wal.segments()
    fs.unlink(names[1])
    fs.fsync_dir()
    wal, recs = reopen(fs.crash(CRASH_DROP))
    assert wal.stats.leftovers == [names[0]]
    assert recs[0][0] == int(names[2].split(".")[0]) and recs[-1][0] == 30


def test_interrupted_segment_creation_is_cleaned_up() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, SMALL)
    wal.append([b"a"])
    wal.sync()
    f = fs.open(segment_name(2) + ".tmp", create=True)
    f.write_at(0, b"half a header")
    f.fdatasync()
    fs.fsync_dir()
    fs.open("notes.txt", create=True)  # somebody else's file: ignored, never deleted
    fs.fsync_dir()
    _, recs = reopen(fs.crash(CRASH_DROP))
    assert recs == [(1, b"a")]


def test_failed_fdatasync_poisons_until_reopened() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, SMALL)
    wal.append([b"a"])
    fs.fail_next_fdatasync()
    with pytest.raises(StorageIOError):
        wal.sync()
    with pytest.raises(StorageIOError, match="reopened"):
        wal.append([b"b"])
    assert wal.synced_seq == 0
    _, recs = reopen(fs.crash(CRASH_DROP))
    assert recs == []


def test_full_disk_is_a_storage_full_error() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, WalOptions(segment_bytes=256, max_record_bytes=200, preallocate=False))
    fs.fill()
    with pytest.raises(StorageFullError):
        wal.append([b"x" * 10])
    wal.close()
    with pytest.raises(StorageClosedError):
        wal.sync()
    fs.free()
    wal, recs = reopen(fs)
    assert recs == []


def test_oversized_record_refused_before_writing() -> None:
    wal = Wal.open(SimFileSystem(), SMALL)
    with pytest.raises(ValueError):
        wal.append([b"ok", b"x" * 201])
    assert wal.last_seq == 0
    assert wal.append([b"y" * 200]) == 1  # the largest record fits a segment of its own


def test_os_errors_translate() -> None:
    class Broken(SimFileSystem):
        def list(self) -> list[str]:
            raise OSError(errno.EIO, "dead disk")

    with pytest.raises(StorageIOError, match="dead disk"):
        Wal.open(Broken(), SMALL)


# --- hostile segment files ------------------------------------------------------------------------
def _segment_fs(body: bytes, first: int = 1, header: bytes | None = None) -> SimFileSystem:
    fs = SimFileSystem()
    f = fs.open(segment_name(first), create=True)
    f.write_at(0, (encode_segment_header(first) if header is None else header) + body)
    f.fdatasync()
    fs.fsync_dir()
    return fs


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_segment_bytes_truncate_or_refuse(body: bytes) -> None:
    """Random bytes after a valid header: recovery returns the valid prefix (possibly nothing)
    and cuts the rest; it never crashes otherwise."""
    fs = _segment_fs(body)
    wal, recs = reopen(fs, WalOptions(segment_bytes=4096, max_record_bytes=1000))
    assert [s for s, _ in recs] == list(range(1, len(recs) + 1))
    wal.append([b"after"])
    wal.sync()
    _, again = reopen(fs.crash(CRASH_DROP), WalOptions(segment_bytes=4096, max_record_bytes=1000))
    assert again == [*recs, (len(recs) + 1, b"after")]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=64))
def test_fuzz_random_headers_and_files_refused_clearly(body: bytes, header: bytes) -> None:
    fs = _segment_fs(body, header=header)
    try:
        reopen(fs)
    except WalCorruptError as err:
        assert "segment" in str(err)
    else:  # only a header that happens to be valid passes (practically never)
        assert header[: SEGMENT_HEADER.size] == encode_segment_header(1)


@given(st.integers(min_value=0, max_value=(1 << 32) - 1), st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_huge_lengths_are_a_torn_record_not_an_allocation(length: int, seq: int) -> None:
    raw = RECORD_HEADER.pack(0xDEADBEEF, length, seq) + b"x" * 10
    end = scan_records(raw, 0, 1, 1 << 20, [])
    assert end.offset == 0 and not end.clean


def test_a_file_larger_than_any_segment_is_refused() -> None:
    fs = _segment_fs(bytes(5000))
    with pytest.raises(WalCorruptError, match="larger than any segment"):
        reopen(fs, WalOptions(segment_bytes=1024, max_record_bytes=1000))


def test_corruption_before_the_last_segment_is_refused_not_dropped() -> None:
    fs = SimFileSystem()
    wal = Wal.open(fs, SMALL)
    wal.append(payloads(20))
    wal.sync()
    first = wal.segments()[0]
    f = fs.open(first)
    f.write_at(SEGMENT_HEADER.size + RECORD_HEADER.size + 1, b"\xff")  # a flipped byte in a sealed segment
    f.fdatasync()
    with pytest.raises(WalCorruptError, match="not the last segment"):
        reopen(fs)


# --- random runs on the simulated file system --------------------------------------------------------
OP = st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(min_value=0, max_value=150), min_size=1, max_size=5)),
    st.tuples(st.just("sync"), st.just(0)),
    st.tuples(st.just("truncate_suffix"), st.integers(min_value=0, max_value=1000)),
    st.tuples(st.just("truncate_prefix"), st.integers(min_value=0, max_value=1000)),
    st.tuples(st.just("crash"), st.sampled_from([CRASH_DROP, CRASH_KEEP, CRASH_RANDOM, CRASH_REORDER])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OP, max_size=40), st.integers(min_value=0, max_value=2**32))
def test_random_append_sync_truncate_crash(ops: list[tuple[str, object]], seed: int) -> None:
    """After any crash: every synced record (not truncated away) is present, in order, with its
    payload; every record returned was appended at its sequence number (nothing torn); after a
    kill -9 (page cache kept) every appended record is present."""
    rng = random.Random(seed)
    fs = SimFileSystem(random.Random(seed))
    wal = Wal.open(fs, SMALL)
    written: dict[int, bytes] = {}
    synced = 0
    floor = 1
    for op, arg in ops:
        if op == "append":
            assert isinstance(arg, list)
            batch = [rng.randbytes(n) for n in arg]
            last = wal.append(batch)
            for i, p in enumerate(batch):
                written[last - len(batch) + 1 + i] = p
        elif op == "sync":
            wal.sync()
            synced = wal.last_seq
        elif op == "truncate_suffix":
            assert isinstance(arg, int)
            lo = max(wal.first_seq, floor) - 1
            if wal.last_seq < lo:  # a crash lost the unsynced records `floor` was set on: none to cut
                continue
            keep = lo + arg % (wal.last_seq - lo + 1)
            before = wal.last_seq
            wal.truncate_suffix(keep)
            for s in [s for s in written if s > keep]:
                del written[s]
            if keep < before:
                synced = keep  # a truncation is durable at once, the records it kept with it
        elif op == "truncate_prefix":
            assert isinstance(arg, int)
            if wal.last_seq >= floor:
                floor = floor + arg % (wal.last_seq - floor + 1)
                wal.truncate_prefix(floor)
        else:
            assert isinstance(arg, str)
            fs = fs.crash(arg)  # type: ignore[arg-type]
            wal, recs = reopen(fs)
            got = dict(recs)
            assert [s for s, _ in recs] == sorted(got) and (
                not recs or recs[-1][0] - recs[0][0] + 1 == len(recs)
            )
            for s in range(floor, synced + 1):
                assert got.get(s) == written[s], f"synced record {s} lost"
            for s, p in recs:
                assert written.get(s) == p, f"record {s} returned but never appended there"
            if arg == CRASH_KEEP:
                assert wal.last_seq == max(written, default=0) or not written
            written = got
            synced = wal.last_seq
            assert wal.synced_seq == synced


def test_zero_filled_segments_on_disk(tmp_path: Path) -> None:
    fs = OsFileSystem(tmp_path, zero_fill=True)
    wal = Wal.open(fs, WalOptions(segment_bytes=3 << 20))
    wal.append([b"r1", b"r2"])
    wal.sync()
    seg = tmp_path / wal.segments()[0]
    assert seg.stat().st_size == 3 << 20 and seg.stat().st_blocks * 512 >= 3 << 20  # preallocated
    wal.close()
    _, recs = reopen(OsFileSystem(tmp_path), WalOptions(segment_bytes=3 << 20))
    assert recs == [(1, b"r1"), (2, b"r2")]
