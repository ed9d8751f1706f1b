"""kill -9 loop for the write-ahead log on the real file system: a child process appends cycles
of records to a `Wal` (`OsFileSystem`), `sync`s each and then prints `ACK <last seq>`; the parent
kills it with SIGKILL after a random number of further acknowledgements, reopens the log and
checks that every acknowledged record is there with its payload, in order (nothing torn, nothing
invented), then starts the next child on the same directory.

    python -m chaos.walkill --kills 300 [--dir D] [--seed S]      # the long soak (a few minutes)

A kill -9 keeps the page cache, so this proves the process-crash path (torn appends, rotation and
prefix truncation interrupted anywhere), not the `fdatasync`s: those are proven on the simulated
file system (`python -m chaos.sim.walcrash`). CI runs a few kills (`tests/integration/test_wal_kill9.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kvstore.storage.wal import OsFileSystem, Wal, WalOptions

OPTIONS = WalOptions(segment_bytes=64 << 10, max_record_bytes=8 << 10)


def payload(seq: int) -> bytes:
    """The one payload record `seq` may carry (so a reader can tell a torn or invented record)."""
    return hashlib.blake2b(seq.to_bytes(8, "little"), digest_size=16).digest() * (1 + seq % 40)


def child(directory: Path, seed: int) -> None:
    """Append and acknowledge cycles until killed (or stdout closes)."""
    rng = random.Random(seed)
    wal = Wal.open(OsFileSystem(directory), OPTIONS)
    while True:
        first = wal.last_seq + 1
        n = rng.randint(1, 8)
        wal.append([payload(s) for s in range(first, first + n)])
        wal.sync()
        if rng.random() < 0.05:
            wal.truncate_prefix(max(1, wal.last_seq - 200))
        try:
            sys.stdout.write(f"ACK {wal.last_seq}\n")
            sys.stdout.flush()
        except BrokenPipeError:
            return


TORN_TAILS = [0]
"""How many reopenings cut a torn tail (printed by the soak: evidence the kills land mid-write)."""


def check(directory: Path, acked: int) -> tuple[int, str | None]:
    """Reopen the log; (its last seq, the first problem found or None)."""
    recs: list[tuple[int, bytes]] = []
    wal = Wal.open(OsFileSystem(directory), OPTIONS, recs)
    TORN_TAILS[0] += wal.stats.torn_tail_bytes > 0
    try:
        for s, p in recs:
            if p != payload(s):
                return wal.last_seq, f"record {s} has a payload it was never given"
        if wal.last_seq < acked:
            return wal.last_seq, f"acknowledged records {wal.last_seq + 1}..{acked} lost"
        if recs and recs[-1][0] - recs[0][0] + 1 != len(recs):
            return wal.last_seq, "records are not contiguous"
        return wal.last_seq, None
    finally:
        wal.close()


def run_loop(directory: Path, kills: int, seed: int, max_acks_between: int = 40) -> list[str]:
    """`kills` rounds of start, wait for some acknowledgements, SIGKILL, check. Returns problems."""
    rng = random.Random(seed)
    problems: list[str] = []
    acked = 0
    for k in range(kills):
        want = rng.randint(1, max_acks_between)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chaos.walkill",
                "--child",
                "--dir",
                str(directory),
                "--seed",
                str(seed * 100_003 + k),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            seen = 0
            for line in proc.stdout:  # bounded: the child acknowledges forever; we stop after `want`
                if line.startswith("ACK "):
                    acked = max(acked, int(line.split()[1]))
                    seen += 1
                    if seen >= want:
                        break
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        last, problem = check(directory, acked)
        if problem is not None:
            problems.append(f"kill {k}: {problem}")
        acked = last
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=300)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.dir, a.seed)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVSTORE_BENCH_DIR", "/var/tmp")) as tmp:
        directory = a.dir or Path(tmp) / "wal"
        problems = run_loop(directory, a.kills, a.seed)
    for p in problems:
        print(p)
    print(f"{a.kills} kills, {len(problems)} problems, {TORN_TAILS[0]} torn tails cut")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
