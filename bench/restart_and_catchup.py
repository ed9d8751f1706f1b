"""Restart time and snapshot catch-up time of a 3-node cluster holding N keys.

    python bench/restart_and_catchup.py [--keys 100000] [--value-size 100] [--inflight 64] [--state-sync MODE]

Real `kvstore serve` processes on 127.0.0.1 (free ports), data in a temporary directory that is
removed at the end. Prints: load rate; time from starting all three stopped nodes to the first
linearizable read; time for a node that was down during the load (and then the log was compacted)
to catch up by snapshot.
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

from kvstore.client import AsyncClient, Client, group_status


async def load(endpoints: list[str], keys: int, value: bytes, inflight: int, prefix: bytes) -> float:
    t0 = time.perf_counter()
    async with AsyncClient(endpoints, timeout=30) as c:
        queue = iter(range(keys))

        async def worker() -> None:
            for i in queue:
                await c.put(prefix + b"%08d" % i, value)

        await asyncio.gather(*(worker() for _ in range(inflight)))
    return keys / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--state-sync", choices=("checkpoint", "commit"), default=None,
                    help="the nodes' --state-sync (default: serve's default)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvbench-"))
    mode = ["--state-sync", args.state_sync] if args.state_sync else []
    cluster = Cluster(root, 3, extra_args=["--compact-threshold", "20000", *mode])
    try:
        cluster.start()
        value = b"v" * args.value_size
        rate = asyncio.run(load(cluster.endpoints, args.keys, value, args.inflight, b"key/"))
        print(f"loaded {args.keys} keys of {args.value_size} B at {rate:,.0f} puts/s ({args.inflight} in flight)")

        for n in cluster.nodes.values():
            n.terminate()
        t0 = time.monotonic()
        for n in cluster.nodes.values():
            n.start()
        cluster.wait_leader(timeout=120)
        with Client(cluster.endpoints, timeout=60) as c:
            got = c.get(b"key/%08d" % (args.keys - 1))
        restart = time.monotonic() - t0
        assert got == value, got
        print(f"restart of 3 nodes with {args.keys} keys to first linearizable read: {restart:.2f} s")

        leader = cluster.wait_leader()
        lagger = next(n for n in cluster.nodes.values() if n.id != leader.id)
        lagger.kill9()
        asyncio.run(load(cluster.endpoints, 25_000, value, args.inflight, b"more/"))
        with Client(cluster.endpoints) as c:
            c.snapshot()  # compact the leader's log: the lagger can only catch up by snapshot
        st = leader.status()
        assert st is not None
        gs = group_status(st)  # the data group (groups[0] is the metadata group)
        assert gs is not None
        target = gs.commit
        t0 = time.monotonic()
        lagger.start()
        while True:
            s = lagger.status()
            if s is not None and (lg := group_status(s)) is not None and lg.applied >= target:
                break
            if time.monotonic() - t0 > 600:
                raise SystemExit("catch-up did not finish in 600 s")
            time.sleep(0.02)
        catchup = time.monotonic() - t0
        print(f"snapshot catch-up of a node ({args.keys + 25_000} keys) from process start: {catchup:.2f} s")
        assert "installing snapshot" in lagger.log_text()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
