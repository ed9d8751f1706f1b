"""The simulated file system catches a write-ahead log that acknowledges a cycle without its
fdatasync (planted bug `wal-skip-fdatasync`), and a kill -9 cannot: the page cache keeps the
bytes. `chaos/sim/walcrash.py` is the checker (`python -m chaos.sim.walcrash --seeds N`)."""

from __future__ import annotations

import random

import pytest

from chaos.sim.plant import STORAGE_BUGS, planted
from chaos.sim.walcrash import run_seed
from kvstore.storage.wal import (
    CRASH_DROP,
    CRASH_KEEP,
    CRASH_RANDOM,
    CRASH_REORDER,
    SimFileSystem,
    Wal,
    WalOptions,
)

SEEDS = range(40)


@pytest.mark.parametrize("mode", [CRASH_DROP, CRASH_KEEP, CRASH_RANDOM, CRASH_REORDER])
def test_the_real_wal_loses_no_acknowledged_record(mode: str) -> None:
    problems = [p for seed in SEEDS if (p := run_seed(seed, mode)) is not None]  # type: ignore[arg-type]
    assert problems == []


@pytest.mark.parametrize("mode", [CRASH_DROP, CRASH_RANDOM, CRASH_REORDER])
def test_skipped_fdatasync_is_caught_by_the_simulated_file_system(mode: str) -> None:
    with planted("wal-skip-fdatasync"):
        found = [seed for seed in SEEDS if run_seed(seed, mode) is not None]  # type: ignore[arg-type]
    assert found and found[0] <= 3, found  # found within a few seeds (in practice: the first)


def test_kill_9_cannot_catch_a_skipped_fdatasync() -> None:
    """The reason the simulated file system exists: with the page cache kept, the bug is invisible."""
    with planted("wal-skip-fdatasync"):
        assert [seed for seed in SEEDS if run_seed(seed, CRASH_KEEP) is not None] == []


def test_planted_bug_really_skips_the_flush_and_is_removed_afterwards() -> None:
    fs = SimFileSystem(random.Random(1))
    wal = Wal.open(fs, WalOptions(segment_bytes=4096))
    base = fs.fdatasyncs
    with planted("wal-skip-fdatasync"):
        wal.append([b"a"])
        wal.sync()
        assert fs.fdatasyncs == base and wal.synced_seq == 1
    wal.append([b"b"])
    wal.sync()
    assert fs.fdatasyncs == base + 1
    # the WAL's one plant is this one (the `lmdb-*` plants break the checkpointer's model of the
    # simulated store instead: `tests/simulation/test_node_sim.py` hunts them)
    assert {n for n in STORAGE_BUGS if not n.startswith("lmdb-")} == {"wal-skip-fdatasync"}
