"""Micro-benchmark: what revisions and MVCC history cost the state machine's apply on LMDB.

    python -m bench.apply_revisions [--puts N] [--batch B] [--keys K] [--value-bytes V]

Applies N puts (128-byte values by default, over K distinct keys, so most are overwrites that add
a history version) to one group of an `LmdbNodeStore` (sync off: the apply path's CPU and LMDB
cost, not the disk's), B entries per transaction as one Ready cycle does, then reads every key.
Prints puts/s applied (wall clock) and the CPU microseconds per put of this process (steadier than
the wall clock on a shared machine), and gets/s. Run it on two checkouts to compare: it uses only
APIs both sides have (`python bench/apply_revisions.py` with `PYTHONPATH=<other checkout>` runs
the other checkout's store under this script; `bench/ab_revisions.py` alternates the two).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.storage import commands
from kvstore.storage.store import LmdbNodeStore


def run(puts: int, batch: int, keys: int, value_bytes: int) -> tuple[float, float, float | None, float]:
    """(puts/s applied, gets/s, gets/s with metadata or None, CPU microseconds per put applied)."""
    conf = ConfState((1,))
    with tempfile.TemporaryDirectory() as tmp:
        s = LmdbNodeStore(Path(tmp) / "s", sync=False)
        try:
            s.bootstrap(1, conf)
            value = b"v" * value_bytes
            first = s.log_storage(1).last_index() + 1
            s.persist_and_apply([], [ApplyBatch(1, s.log_storage(1).entries(1, first), conf)])  # the bootstrap
            datas = [commands.encode_put(b"key/%06d" % (i % keys), value, 1, i + 1, i + 1) for i in range(puts)]
            t0 = time.perf_counter()
            c0 = time.process_time()
            index = first
            for lo in range(0, puts, batch):
                es = [Entry(1, index + j, EntryType.NORMAL, d, 1) for j, d in enumerate(datas[lo : lo + batch])]
                index += len(es)
                s.persist_and_apply([GroupWrite(1, es, HardState(1, 1, es[-1].index))], [])
                s.persist_and_apply([], [ApplyBatch(1, es, conf)])
            applied = time.perf_counter() - t0
            cpu = time.process_time() - c0
            t1 = time.perf_counter()
            for i in range(keys):
                assert s.get(1, b"key/%06d" % i) == value
            read = time.perf_counter() - t1
            meta = None
            if hasattr(s, "revisions"):  # reads with metadata (the server's get path), where built
                t2 = time.perf_counter()
                for i in range(keys):
                    v, _ = s.revisions.get_version(1, b"key/%06d" % i)
                    assert v is not None and v.value == value
                meta = keys / (time.perf_counter() - t2)
        finally:
            s.close()
    return puts / applied, keys / read, meta, cpu / puts * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--keys", type=int, default=1_000)
    ap.add_argument("--value-bytes", type=int, default=128)
    a = ap.parse_args()
    w, r, m, c = run(a.puts, a.batch, a.keys, a.value_bytes)
    with_meta = "" if m is None else f", {m:,.0f} gets/s with metadata"
    print(f"{a.puts} puts over {a.keys} keys, {a.batch} per transaction: {w:,.0f} puts/s applied "
          f"({c:.1f} CPU us per put), {r:,.0f} gets/s{with_meta}")


if __name__ == "__main__":
    main()
