"""Crash the write-ahead log on the simulated file system and check that no acknowledged record
is lost: `python -m chaos.sim.walcrash --seeds N [--mode drop|keep|random|reorder] [--plant BUG]`.

One seed: a `Wal` on a `SimFileSystem` runs Ready-like cycles (append a batch of records, `sync`,
then "acknowledge" them: from here on they must survive), with suffix truncations (Raft log
conflicts) and prefix truncations (compaction) mixed in, and crashes at random points (between
an append and its sync too). After every crash the log is reopened and checked:
- every acknowledged record not truncated away is there, with its payload, in order;
- every record returned is one that was appended at that sequence number (nothing torn, nothing
  from before a truncation);
- with `--mode keep` (kill -9: the page cache survives) every appended record is there.

`--mode keep` cannot catch a missing `fdatasync` (the page cache has the bytes); `drop` (power
loss), `random` (a random prefix of the unsynced writes survives, the last one maybe torn) and
`reorder` (any subset of them survives, each maybe torn) can: `--plant wal-skip-fdatasync` shows it (`tests/unit/test_wal_crash.py`).
"""

from __future__ import annotations

import argparse
import random
import sys

from kvstore.storage.wal import Wal, WalOptions
from kvstore.storage.wal.simfs import (
    CRASH_DROP,
    CRASH_KEEP,
    CRASH_RANDOM,
    CRASH_REORDER,
    CrashMode,
    SimFileSystem,
)

from .plant import ALL_BUGS, planted

OPTIONS = WalOptions(segment_bytes=512, max_record_bytes=300)


def run_seed(seed: int, mode: CrashMode, cycles: int = 60) -> str | None:
    """One seed; returns a description of the first violation, or None."""
    rng = random.Random(seed)
    fs = SimFileSystem(random.Random(seed ^ 0x5EED))
    wal = Wal.open(fs, OPTIONS)
    written: dict[int, bytes] = {}
    acked = 0  # every record <= acked (and >= floor) was acknowledged
    floor = 1
    for cycle in range(cycles):
        roll = rng.random()
        if roll < 0.1 and wal.last_seq > floor:
            keep = rng.randint(max(floor, wal.first_seq) - 1, wal.last_seq)
            wal.truncate_suffix(keep)
            for s in range(keep + 1, max(written, default=0) + 1):
                written.pop(s, None)
            acked = min(acked, keep)
        elif roll < 0.2 and wal.last_seq >= floor:
            floor = rng.randint(floor, wal.last_seq)
            wal.truncate_prefix(floor)
        batch = [
            rng.randbytes(rng.randint(0, 120)) + f"{seed}/{cycle}/{i}".encode()
            for i in range(rng.randint(1, 4))
        ]
        last = wal.append(batch)
        for i, p in enumerate(batch):
            written[last - len(batch) + 1 + i] = p
        crash_before_sync = rng.random() < 0.15
        if not crash_before_sync:
            wal.sync()
            acked = last  # the cycle is acknowledged: it must survive any crash from now on
        if crash_before_sync or rng.random() < 0.15:
            fs = fs.crash(mode)
            recs: list[tuple[int, bytes]] = []
            wal = Wal.open(fs, OPTIONS, recs)
            got = dict(recs)
            for s in range(floor, acked + 1):
                if got.get(s) != written.get(s):
                    return f"seed {seed} cycle {cycle}: acknowledged record {s} lost after a crash ({mode})"
            for s, p in recs:
                if written.get(s) != p:
                    return f"seed {seed} cycle {cycle}: record {s} after the crash was never appended there"
            if mode == CRASH_KEEP and wal.last_seq != max(written, default=0):
                return f"seed {seed} cycle {cycle}: kill -9 lost records {wal.last_seq + 1}..{max(written)}"
            written = got
            acked = wal.last_seq  # open made what it returned durable
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument(
        "--mode", choices=[CRASH_DROP, CRASH_KEEP, CRASH_RANDOM, CRASH_REORDER], default=CRASH_RANDOM
    )
    ap.add_argument("--plant", choices=sorted(ALL_BUGS), help="plant a known bug (to see the check catch it)")
    a = ap.parse_args()
    failures = 0
    with planted(a.plant):
        for seed in range(a.start, a.start + a.seeds):
            problem = run_seed(seed, a.mode)
            if problem is not None:
                failures += 1
                print(problem, flush=True)
    print(f"{a.seeds} seeds, {failures} failed ({a.mode})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
