"""Micro-benchmark: the persist thread's work per put, as a leader's Ready cycles do it.

    python bench/persist_cycle.py [--puts N] [--batch B] [--sync 0|1] [--state-sync MODE] [--dir DIR]

One group of an `LmdbNodeStore` in a temporary directory under DIR (default: the system's;
give a directory on the disk the server would use), N puts (64-byte values over 10,000 keys, no
sessions, as `ab_revisions.py`'s end-to-end driver sends them), B per cycle: each cycle's one
`persist_and_apply` call persists batch k (entries and hard state) and applies batch k-1, as a
single-node leader's cycle does. With `--sync 1` (the server's setting) every cycle flushes what
the store flushes (on main: the WAL's fdatasync, then LMDB's commit; before the WAL: LMDB's
commit alone; with `--state-sync checkpoint`, the WAL's fdatasync alone, plus the checkpoints
the store's policy runs). Prints the CPU microseconds per put of this process, user and system (the
kernel's share of the flushes included), and puts/s. Uses only APIs every checkout since
4965e32 has: `bench/ab_revisions.py` runs it on two checkouts, alternating.
"""

from __future__ import annotations

import argparse
import inspect
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.storage import commands
from kvstore.storage.store import LmdbNodeStore


def run(puts: int, batch: int, sync: bool, parent: str | None, state_sync: str | None = None) -> tuple[float, float, float]:
    """(user CPU µs per put, system CPU µs per put, puts/s) over `puts` puts."""
    conf = ConfState((1,))
    revisions = "revision" in inspect.signature(commands.encode_put).parameters
    datas = [
        commands.encode_put(b"k%d" % (i % 10_000), b"v" * 64, *((0, 0, 0, False, 0, i + 1) if revisions else ()))
        for i in range(puts)
    ]
    with tempfile.TemporaryDirectory(prefix="kvbench-persist-", dir=parent) as tmp:
        mode: dict[str, Any] = {"state_sync": state_sync} if state_sync else {}
        s = LmdbNodeStore(Path(tmp) / "s", sync=sync, **mode)
        try:
            s.bootstrap(1, conf)
            first = s.log_storage(1).last_index() + 1
            s.persist_and_apply([], [ApplyBatch(1, s.log_storage(1).entries(1, first), conf)])
            index, prev = first, None
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for lo in range(0, puts, batch):
                es = [Entry(1, index + j, EntryType.NORMAL, d, 1) for j, d in enumerate(datas[lo : lo + batch])]
                index += len(es)
                commit = es[0].index - 1  # batch k-1 is committed (and applied in this cycle)
                s.persist_and_apply([GroupWrite(1, es, HardState(1, 1, commit))], [ApplyBatch(1, prev, conf)] if prev else [])
                prev = es
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            # Every batch but the last was applied: the last put of each key among them reads back.
            applied = puts - len(prev or [])
            for i in range(max(0, applied - 10_000), applied):
                if s.get(1, b"k%d" % (i % 10_000)) != b"v" * 64:
                    raise AssertionError(f"put {i} was not applied")
        finally:
            s.close()
    return (r1.ru_utime - r0.ru_utime) / puts * 1e6, (r1.ru_stime - r0.ru_stime) / puts * 1e6, puts / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sync", type=int, choices=(0, 1), default=1)
    ap.add_argument("--state-sync", choices=("checkpoint", "commit"), default=None,
                    help="the store's state_sync (default: the store's; needs a checkout that has it)")
    ap.add_argument("--dir", default=None, help="where the temporary store goes (default: the system's)")
    a = ap.parse_args()
    user, system, rate = run(a.puts, a.batch, bool(a.sync), a.dir, a.state_sync)
    print(f"{a.puts} puts, {a.batch} per cycle, sync {a.sync}, state-sync {a.state_sync or 'default'}: {user + system:.1f} CPU us per put "
          f"(user {user:.1f}, system {system:.1f}), {rate:,.0f} puts/s")


if __name__ == "__main__":
    main()
