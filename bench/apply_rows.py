"""Micro-benchmark: what the rows a put's apply writes cost, per put (issue 20).

    python -m bench.apply_rows [--puts N] [--batch B] [--rounds R] [--dir DIR]

The persist thread's work per put, as `bench/persist_cycle.py` measures it (one group of an
`LmdbNodeStore` in checkpoint mode, the server's default; one WAL `fdatasync` per cycle; each
call persists batch k and applies batch k-1), under the load of `bench.compare`'s put workload:
one client session (seq rising, 64 in flight: ack = seq - 64), 10,000 keys of 16 bytes written
once, then N puts of 128-byte values to random keys. Two variants, each in a fresh directory,
rounds alternating, medians printed:

- `as is`: the apply as the server runs it;
- `no data row`: without the `data` table's row (the key's current value), i.e. what keeping the
  value in the key's metadata row (`rev_keys`, written by every put anyway) would save.

The variant is NOT a working layout (reads of the rows it skips would fail): it measures what
those writes cost. The cost is in the pages, not the bytes: each put dirties one page of each
random-key table, copy-on-write copies it, and the commit writes it out (the system time). Until
data format 3 the history was a third such table (keyed by key id, then revision); the history
in revision order appends at the table's end instead (`bench/README.md`, "The history in
revision order", has the before and after).
Prints CPU µs per put (user, system) of this process and puts/s.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.storage import commands, kvstate
from kvstore.storage.store import LmdbNodeStore

KEYS = 10_000
VALUE_SIZE = 128
INFLIGHT = 64
VARIANTS = ("as is", "no data row")


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Patch the apply's row writes for `name` (restored on exit)."""
    view_put = kvstate.LmdbGroupView.put
    if name == "no data row":
        def put(self: kvstate.LmdbGroupView, key: bytes, value: bytes) -> None:
            return None

        kvstate.LmdbGroupView.put = put  # type: ignore[method-assign]
    try:
        yield
    finally:
        kvstate.LmdbGroupView.put = view_put  # type: ignore[method-assign]


def commands_for(puts: int) -> list[bytes]:
    rng = random.Random(1)
    value = rng.randbytes(VALUE_SIZE)
    keys = [b"key/%012d" % i for i in range(KEYS)]
    out = []
    for i in range(KEYS + puts):
        key = keys[i] if i < KEYS else rng.choice(keys)
        seq = i + 1
        out.append(commands.encode_put(key, value, 7, seq, max(0, seq - INFLIGHT)))
    return out


def run(datas: list[bytes], batch: int, parent: str | None) -> tuple[float, float, float]:
    """(user µs per put, system µs per put, puts/s) over the puts after the first KEYS."""
    conf = ConfState((1,))
    with tempfile.TemporaryDirectory(prefix="kvbench-rows-", dir=parent) as tmp:
        s = LmdbNodeStore(Path(tmp) / "s", sync=True, state_sync="checkpoint")
        try:
            s.bootstrap(1, conf)
            first = s.log_storage(1).last_index() + 1
            s.persist_and_apply([], [ApplyBatch(1, s.log_storage(1).entries(1, first), conf)])
            index, prev = first, None
            for part in (datas[:KEYS], datas[KEYS:]):  # the keys' first writes, then the measured puts
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                for lo in range(0, len(part), batch):
                    es = [Entry(1, index + j, EntryType.NORMAL, d, 1) for j, d in enumerate(part[lo:lo + batch])]
                    index += len(es)
                    s.persist_and_apply([GroupWrite(1, es, HardState(1, 1, es[0].index - 1))],
                                        [ApplyBatch(1, prev, conf)] if prev else [])
                    prev = es
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            s.close()
    n = len(datas) - KEYS
    return (r1.ru_utime - r0.ru_utime) / n * 1e6, (r1.ru_stime - r0.ru_stime) / n * 1e6, n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=32, help="puts per cycle (the servers' ~32 at 64 in flight)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the temporary stores go (give a real disk)")
    a = ap.parse_args()
    datas = commands_for(a.puts)
    got: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        for name in VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS)):
            with variant(name):
                got[name].append(run(datas, a.batch, a.dir))
    print(f"{a.puts} puts after {KEYS} keys, {a.batch} per cycle, {a.rounds} rounds (medians):")
    base = statistics.median(u + s for u, s, _ in got["as is"])
    for name in VARIANTS:
        user = statistics.median(u for u, _, _ in got[name])
        system = statistics.median(s for _, s, _ in got[name])
        total = statistics.median(u + s for u, s, _ in got[name])
        rate = statistics.median(p for _, _, p in got[name])
        print(f"  {name:26} {total:6.1f} CPU µs/put (user {user:5.1f}, system {system:5.1f}), "
              f"{rate:8,.0f} puts/s, {total / base:.2f}x")


if __name__ == "__main__":
    main()
