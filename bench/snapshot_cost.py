"""What a snapshot of one group costs to produce and to install, in one process (no cluster).

    python -m bench.snapshot_cost [--keys 125000] [--versions 1] [--rounds 3] [--profile install]

Builds a store (`LmdbNodeStore`, on `--dir`, default a temporary directory on the disk) with one
group of `--keys` keys of `--value-bytes` bytes, each written `--versions` times through the real
apply path (proposed revisions fixed, so the build is the same every run), then per round:

- produce: `snapshot_chunks` written to a file as a receiver would (`receive_snapshot`);
- install: that file installed into a fresh store (`persist_and_apply` with the snapshot, as a
  follower's persist thread does), its LMDB commit included.

Prints each round's wall and CPU seconds (this process's: the snapshot work is all in it) and
the medians. `--profile produce|install` runs one more round
of that step under cProfile and prints the top functions. Snapshot catch-up end to end (3 nodes)
is `bench/restart_and_catchup.py`.
"""

from __future__ import annotations

import cProfile
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import click

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.storage import commands as cmds
from kvstore.storage import mvcc
from kvstore.storage.snapfile import SnapshotFile
from kvstore.storage.store import LmdbNodeStore

T = TypeVar("T")
GROUP = 1
CONF = ConfState((1,))
BATCH = 2000


def build(path: Path, keys: int, versions: int, value_bytes: int) -> LmdbNodeStore:
    """A store whose group 1 holds `keys` keys written `versions` times each (in that many passes)."""
    s = LmdbNodeStore(path)
    assert s.bootstrap(GROUP, CONF)
    base = mvcc.EPOCH_MS + 3_600_000
    n = 0
    applied = 0
    for v in range(versions):
        for lo in range(0, keys, BATCH):
            first = s.log_storage(GROUP).last_index() + 1
            es: list[Entry] = []
            for i in range(lo, min(keys, lo + BATCH)):
                value = (b"%d-%d-" % (v, i) * value_bytes)[:value_bytes]
                data = cmds.encode_put(b"key-%08d" % i, value, revision=mvcc.make_revision(base + n, 0, GROUP))
                es.append(Entry(1, first + len(es), EntryType.NORMAL, data, GROUP))
                n += 1
            s.persist_and_apply([GroupWrite(GROUP, es, HardState(1, 0, es[-1].index))], ())
            ls = s.log_storage(GROUP)
            s.persist_and_apply((), [ApplyBatch(GROUP, ls.entries(applied + 1, ls.last_index() + 1), CONF)])
            applied = ls.last_index()
    return s


def produce(s: LmdbNodeStore, into: Path) -> Path:
    _, chunks = s.snapshot_chunks(GROUP)
    return s.receive_snapshot(GROUP, chunks, into)


def install(snap: Path, path: Path) -> LmdbNodeStore:
    b = LmdbNodeStore(path)
    meta = SnapshotFile(snap).header.meta
    b.persist_and_apply([GroupWrite(GROUP, [], HardState(1, 0, meta.index), meta, snap)], ())
    return b


def timed(step: Callable[[], T], prof: cProfile.Profile | None) -> tuple[T, float, float]:
    """`step()`'s result, wall and CPU seconds (under `prof` if given)."""
    if prof is not None:
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    out = step()
    t1, c1 = time.perf_counter(), time.process_time()
    if prof is not None:
        prof.disable()
    return out, t1 - t0, c1 - c0


@click.command()
@click.option("--keys", type=int, default=125_000, show_default=True)
@click.option("--versions", type=int, default=1, show_default=True, help="Writes of each key.")
@click.option("--value-bytes", type=int, default=100, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the stores go (default: a temporary directory).")
@click.option("--profile", type=click.Choice(["produce", "install"]), default=None,
              help="One more round of that step under cProfile.")
@click.option("--top", type=int, default=25, show_default=True)
def main(keys: int, versions: int, value_bytes: int, rounds: int, root: Path | None, profile: str | None,
         top: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="snapshot-cost-", dir=root))
    try:
        t0 = time.perf_counter()
        src = build(work / "src", keys, versions, value_bytes)
        print(f"built {keys} keys x {versions} versions in {time.perf_counter() - t0:.1f} s")
        times: dict[str, list[float]] = {"produce": [], "install": []}
        cpu: dict[str, list[float]] = {"produce": [], "install": []}
        snap = work / "snap"
        for r in range(rounds + (profile is not None)):
            prof = cProfile.Profile() if profile is not None and r == rounds else None
            if snap.exists():
                shutil.rmtree(snap)
            path, wall_p, cpu_p = timed(partial(produce, src, snap), prof if profile == "produce" else None)
            size = path.stat().st_size
            dst = work / f"dst{r}"
            b, wall_i, cpu_i = timed(partial(install, path, dst), prof if profile == "install" else None)
            b.close()
            shutil.rmtree(dst)
            if prof is not None:
                pstats.Stats(prof).sort_stats("tottime").print_stats(top)
                continue
            times["produce"].append(wall_p)
            times["install"].append(wall_i)
            cpu["produce"].append(cpu_p)
            cpu["install"].append(cpu_i)
            print(f"round {r}: produce {wall_p:.3f} s (CPU {cpu_p:.3f} s, {size / 1e6:.1f} MB), "
                  f"install {wall_i:.3f} s (CPU {cpu_i:.3f} s)")
        src.close()
        for step, ts in times.items():
            if ts:
                print(f"{step}: median {statistics.median(ts):.3f} s, CPU {statistics.median(cpu[step]):.3f} s "
                      f"over {len(ts)} rounds")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
