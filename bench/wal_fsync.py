"""What one durable write costs on this disk, printed as numbers (no assertion about speed):

- `fdatasync`: latency of one 4 KiB append + `fdatasync` to a preallocated file (p50, p99, mean
  over `--syncs` iterations): the floor of any durable write path on this machine;
- `lmdb`: latency of one durable LMDB write transaction (one small put, sync on: LMDB flushes the
  data pages, then the meta page: two ordered flushes);
- `wal`: latency of one `kvstore.storage.wal.Wal` cycle (append one 4 KiB record + `sync`: one
  `fdatasync`), on the real file system, with segments preallocated by `posix_fallocate`
  (`wal_cycle_4k`) and by writing zeros (`wal_cycle_4k_zero_fill`);
- the same raw `fdatasync` loop over a zero-filled file (`fdatasync_4k_zero_filled`);
- one persist-only Ready cycle of one group (one 100-byte entry + its hard state): through
  `kvstore.storage.raftwal.RaftWal` (`raftwal_persist`: records + one `sync`) and through
  `LmdbNodeStore.persist` (`store_persist`: one LMDB transaction, two flushes), the node's path today.

The directory is `$KVSTORE_BENCH_DIR` (default /var/tmp: a disk, where /tmp may be tmpfs).

    python -m bench.wal_fsync [--syncs 500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

from kvstore.node.store import GroupWrite
from kvstore.raft.types import ConfState, Entry, HardState, SnapshotMeta
from kvstore.storage.raftwal import RaftWal
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.wal import OsFileSystem, Wal, WalOptions
from kvstore.storage.walrec import KIND_ENTRIES, KIND_HARD_STATE, KIND_RESET, GroupRecord


def _stats(name: str, samples: list[float]) -> dict[str, object]:
    s = sorted(samples)
    return {
        "bench": name,
        "n": len(s),
        "p50_us": round(s[len(s) // 2] * 1e6),
        "p99_us": round(s[min(len(s) - 1, (len(s) * 99) // 100)] * 1e6),
        "mean_us": round(statistics.fmean(s) * 1e6),
        "per_s": round(len(s) / sum(s)),
    }


def _time(n: int, fn: Callable[[int], None]) -> list[float]:
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def bench_fdatasync(root: Path, n: int, zero_fill: bool = False) -> list[float]:
    block = os.urandom(4096)
    fd = os.open(root / "raw", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if zero_fill:
            os.pwrite(fd, bytes((n + 1) * 4096), 0)
        else:
            os.posix_fallocate(fd, 0, (n + 1) * 4096)
        os.fsync(fd)

        def one(i: int) -> None:
            os.pwrite(fd, block, i * 4096)
            os.fdatasync(fd)

        return _time(n, one)
    finally:
        os.close(fd)


def bench_lmdb(root: Path, n: int) -> list[float]:
    env = lmdb.open(str(root / "lmdb"), map_size=64 << 20, sync=True, metasync=True)
    try:

        def one(i: int) -> None:
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(8, "big"), b"x" * 100)

        return _time(n, one)
    finally:
        env.close()


def bench_wal(root: Path, n: int, zero_fill: bool = False) -> list[float]:
    d = root / ("wal-zero" if zero_fill else "wal")
    wal = Wal.open(
        OsFileSystem(d, zero_fill=zero_fill), WalOptions(segment_bytes=max(1 << 20, (n + 2) * 4200))
    )
    payload = os.urandom(4096 - 16)
    try:

        def one(i: int) -> None:
            wal.append([payload])
            wal.sync()

        return _time(n, one)
    finally:
        wal.close()


def bench_raftwal_persist(root: Path, n: int) -> list[float]:
    rw = RaftWal.open(OsFileSystem(root / "raftwal"), WalOptions(segment_bytes=max(1 << 20, (n + 2) * 256)))
    rw.write([GroupRecord(KIND_RESET, 1, base=SnapshotMeta(0, 0, ConfState((1,))), hard_state=HardState())])
    rw.sync()
    try:

        def one(i: int) -> None:
            rw.write(
                [
                    GroupRecord(KIND_ENTRIES, 1, entries=(Entry(1, i + 1, data=b"x" * 100, group=1),)),
                    GroupRecord(KIND_HARD_STATE, 1, hard_state=HardState(1, 1, i + 1)),
                ]
            )
            rw.sync()

        return _time(n, one)
    finally:
        rw.close()


def bench_store_persist(root: Path, n: int) -> list[float]:
    store = LmdbNodeStore(root / "store")
    try:

        def one(i: int) -> None:
            store.persist(
                [GroupWrite(1, [Entry(1, i + 1, data=b"x" * 100, group=1)], HardState(1, 1, i + 1))]
            )

        return _time(n, one)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--syncs", type=int, default=500)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVSTORE_BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        runs: list[tuple[str, Callable[[], list[float]]]] = [
            ("fdatasync_4k", lambda: bench_fdatasync(root, a.syncs)),
            ("fdatasync_4k_zero_filled", lambda: bench_fdatasync(root, a.syncs, zero_fill=True)),
            ("lmdb_commit", lambda: bench_lmdb(root, a.syncs)),
            ("wal_cycle_4k", lambda: bench_wal(root, a.syncs)),
            ("wal_cycle_4k_zero_fill", lambda: bench_wal(root, a.syncs, zero_fill=True)),
            ("raftwal_persist", lambda: bench_raftwal_persist(root, a.syncs)),
            ("store_persist", lambda: bench_store_persist(root, a.syncs)),
        ]
        for name, fn in runs:
            print(json.dumps(_stats(name, fn())), flush=True)


if __name__ == "__main__":
    main()
