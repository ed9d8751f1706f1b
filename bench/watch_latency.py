"""Watch latency: from an acknowledged put to its event at the watchers (p50 / p99).

    python bench/watch_latency.py [--seconds 5] [--rate 20] [--watchers 1,1000]

Real `kvstore serve` processes on 127.0.0.1 (free ports): 3 nodes, `--groups 3`. A writer (this
process) puts keys under `lat/` at a fixed rate (`--rate` puts/s, one at a time, keys spread over
the three groups) for `--seconds`; a watcher process opens ONE `KV.Watch` stream to node 1 with
N watches of the prefix `lat/` (N from `--watchers`; many watches multiplexed on one stream, so
the watchers' own process decodes N responses per put and nothing else), and a second run
watches one key (one group: no frontier to wait for). Latency = the event's arrival at the
watcher process minus the put's acknowledgement at the writer (both `time.monotonic`, one
machine). A prefix watch spans the three groups, so an event waits until the other two groups
are closed past it (the serving node closes lagging quiet groups every 100 ms): that is most of its
latency at a low put rate. Everything is bounded in time; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import grpc
from clusterharness import Cluster

from kvstore.client import AsyncClient
from kvstore.v1 import kv_pb2, kv_pb2_grpc


def _watcher(endpoint: str, n: int, key: bytes, prefix: bytes, until: float, ready: mp.Queue, out: mp.Queue) -> None:
    async def run() -> list[tuple[int, float]]:
        got: list[tuple[int, float]] = []
        q: asyncio.Queue[kv_pb2.WatchRequest | None] = asyncio.Queue()

        async def requests():  # type: ignore[no-untyped-def]
            while (r := await q.get()) is not None:
                yield r

        async with grpc.aio.insecure_channel(endpoint) as ch:
            call = kv_pb2_grpc.KVStub(ch).Watch(requests())
            for i in range(n):
                q.put_nowait(kv_pb2.WatchRequest(create_request=kv_pb2.WatchCreateRequest(
                    key=key, prefix=prefix, watch_id=i + 1)))
            created = 0
            it = call.__aiter__()
            while created < n:
                r = await it.__anext__()
                created += r.created
            ready.put(True)
            while time.monotonic() < until:
                try:
                    r = await asyncio.wait_for(it.__anext__(), max(0.1, until - time.monotonic()))
                except TimeoutError:
                    break
                t = time.monotonic()
                got += [(e.kv.mod_revision, t) for e in r.events]
            call.cancel()
            q.put_nowait(None)
        return got

    out.put(asyncio.run(run()))


def one_run(endpoints: list[str], n: int, key: bytes, prefix: bytes, seconds: float, rate: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    until = time.monotonic() + seconds + 30
    p = ctx.Process(target=_watcher, args=(endpoints[0], n, key, prefix, until, ready, out))
    p.start()
    try:
        ready.get(timeout=60)
        acks = asyncio.run(_writes(endpoints, key, prefix, seconds, rate))
        arrivals = out.get(timeout=seconds + 60)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    lat = sorted((t - acks[rev]) * 1000 for rev, t in arrivals if rev in acks)
    want = len(acks) * n
    return {
        "watchers": n, "puts": len(acks), "events": len(lat), "missing": want - len(lat),
        "p50_ms": statistics.median(lat) if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
    }


async def _writes(endpoints: list[str], key: bytes, prefix: bytes, seconds: float, rate: float) -> dict[int, float]:
    acks: dict[int, float] = {}
    async with AsyncClient(endpoints, timeout=10) as c:
        i = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            k = key or prefix + b"%04d" % (i % 64)
            rev = await c.put(k, b"x" * 32)
            acks[rev] = time.monotonic()
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
    return acks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=20.0, help="puts per second (fixed)")
    ap.add_argument("--watchers", default="1,1000", help="comma-separated watcher counts (prefix watch)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvbench-watch-") as d:
        c = Cluster(Path(d), 3, extra_args=["--groups", "3"])
        try:
            c.start()
            print(f"3 nodes, 3 data groups; puts at {args.rate:g}/s for {args.seconds:g}s; watches on one stream at node 1")
            print(f"{'watch':>12} {'watchers':>9} {'puts':>6} {'events':>8} {'missing':>8} {'p50 ms':>8} {'p99 ms':>8}")
            runs = [("prefix lat/", int(n), b"", b"lat/") for n in args.watchers.split(",")]
            runs.append(("key lat/k", 1, b"lat/k", b""))
            for name, n, key, prefix in runs:
                r = one_run(c.endpoints, n, key, prefix, args.seconds, args.rate)
                print(f"{name:>12} {n:>9} {r['puts']:>6.0f} {r['events']:>8.0f} {r['missing']:>8.0f} "
                      f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}", flush=True)
        finally:
            c.stop()


if __name__ == "__main__":
    main()
