"""Watch latency of a merged prefix watch (README, "Watch"): from an acknowledged put to its event
at a prefix watcher, on 5 nodes with 5 groups of 3 replicas (no node hosts every group: the
client merges sub-watches at a cover of nodes, `kvstore/client/watchmerge.py`) against 3 nodes
with the same 5 groups (every node hosts them all: one stream at one node), in the same run.

    python -m bench.watch_merged [--rate 20] [--seconds 5] [--rounds 1]

Writer and watcher share this process's event loop and clock (each its own client). Prints one
line per layout and round: puts, events, p50 / p99 ms, and the nodes the watch was served by.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python bench/watch_merged.py`: import `bench` from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kvbench.clusters import KvstoreCluster
from kvstore.client import AsyncClient

LAYOUTS = {"5 nodes, 5 groups x 3 replicas (merged)": 5, "3 nodes, 5 groups x 3 replicas (one node)": 3}


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


async def _measure(endpoints: list[str], rate: float, seconds: float) -> tuple[int, list[float], set[int]]:
    async with AsyncClient(endpoints, timeout=30) as w, AsyncClient(endpoints, timeout=30) as kv:
        for i in range(20):  # warm up: every group has a leader and the map is known
            await kv.put(b"bw/warm%d" % i, b"x")
        start = await kv.put(b"bw/start", b"0")
        acked: dict[int, float] = {}
        got: dict[int, float] = {}
        nodes: set[int] = set()
        total = int(rate * seconds)

        async def writer() -> None:
            t0 = time.monotonic()
            for i in range(total):  # paced, bounded
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                rev = await kv.put(b"bw/%03d" % (i % 200), b"v%d" % i)
                acked[rev] = time.monotonic()

        async def watcher() -> None:
            async for batch in w.watch_batches(prefix=b"bw/", start_revision=start + 1, progress=True):
                now = time.monotonic()
                nodes.add(batch.node_id)
                for e in batch.events:
                    got[e.revision] = now
                if len(acked) == total and all(r in got for r in acked):
                    return

        wt = asyncio.create_task(watcher())
        await writer()
        await asyncio.wait_for(wt, 60)
    lat = [(got[r] - t) * 1000 for r, t in acked.items()]
    return total, lat, nodes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20.0, help="puts/s")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args(argv)
    if not 0 < a.rate <= 1000 or not 0 < a.seconds <= 120 or not 1 <= a.rounds <= 10:
        ap.error("rate in (0, 1000], seconds in (0, 120], rounds in [1, 10]")
    for rnd in range(a.rounds):
        for name, n in LAYOUTS.items():
            root = Path(tempfile.mkdtemp(prefix="kvbench-wmerge-"))
            c = KvstoreCluster(root, ["--groups", "5", "--replication", "3"], n=n)
            try:
                c.start()
                total, lat, nodes = asyncio.run(_measure(c.endpoints, a.rate, a.seconds))
            finally:
                c.stop()
                shutil.rmtree(root, ignore_errors=True)
            print(f"round {rnd + 1} | {name} | {total} puts @ {a.rate:g}/s | ack->event p50 {_pct(lat, 0.5):.1f} ms, "
                  f"p99 {_pct(lat, 0.99):.1f} ms | served by nodes {sorted(nodes)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
