"""Time to move a range of keys between Raft groups (multi-raft rebalancing), under no load.

    python bench/move_range.py [--keys 200000] [--value-size 100] [--inflight 128]

Starts a 3-node cluster (real `kvstore serve` processes on 127.0.0.1, data in a temporary
directory removed at the end) with ONE data group, loads N keys, then adds a second group with
`add_group(wait=True)`: about half of the keys move into it (freeze in the source, export,
install through the target's log, activate, flip the map, drop in the source). Prints the load
rate, the number of keys moved, the wall time of the whole move and keys/s, then checks that
every key still reads back (a full scan) and prints the time of that scan.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.client import AsyncClient


async def load(endpoints: list[str], keys: int, value: bytes, inflight: int) -> float:
    t0 = time.perf_counter()
    async with AsyncClient(endpoints, timeout=30) as c:
        queue = iter(range(keys))

        async def worker() -> None:
            for i in queue:
                await c.put(b"key/%08d" % i, value)

        await asyncio.gather(*(worker() for _ in range(inflight)))
    return keys / (time.perf_counter() - t0)


async def move(endpoints: list[str], keys: int) -> None:
    async with AsyncClient(endpoints, timeout=600) as c:
        before = await c.shards()
        t0 = time.perf_counter()
        resp = await c.add_group(wait=True, timeout=600)
        dt = time.perf_counter() - t0
        after = await c.shards()
        new = max(after.groups, key=lambda g: g.id)
        print(resp.message)
        print(f"moved {new.keys} of {sum(g.keys for g in before.groups)} keys into group {new.id} "
              f"in {dt:.2f} s ({new.keys / dt:,.0f} keys/s)")
        t0 = time.perf_counter()
        n = 0
        async for _ in c.scan(b"key/"):
            n += 1
        print(f"scan after the move: {n} keys in {time.perf_counter() - t0:.2f} s")
        if n != keys:
            raise SystemExit(f"LOST KEYS: {keys - n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--inflight", type=int, default=128)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvbench-move-"))
    cluster = Cluster(root, 3, extra_args=["--groups", "1", "--compact-threshold", "50000"])
    try:
        cluster.start()
        cluster.wait_leader(timeout=60)
        rate = asyncio.run(load(cluster.endpoints, args.keys, b"v" * args.value_size, args.inflight))
        print(f"loaded {args.keys} keys of {args.value_size} B at {rate:,.0f} puts/s ({args.inflight} in flight)")
        asyncio.run(move(cluster.endpoints, args.keys))
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
