"""What admission control costs a write when no limit is near (issue 15: "keep the fast path cheap").

    python bench/admission.py [--seconds 5] [--rounds 2] [--inflight 64]

1. In-process: nanoseconds per decision of the rate limiter (one identity, far from its limit),
   the load shedder (apply lag and memory far from their limits) and the per-write check with the
   alarm set clear.
2. A/B on real `kvstore serve` processes (one node, one data group, data in a temporary directory
   removed at the end; each process stopped by its PID): puts/s with `--inflight` operations in
   flight on one `KV.Stream`, without any limit (A) and with every limit configured far away (B:
   `--rate-limit 10000000 --max-apply-lag 1000000 --memory-limit 64G --quota-bytes 64G`),
   alternating A and B `--rounds` times so both see the same machine. Bounded by `--seconds` per run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.node.ratelimit import RateLimit, RateLimiter
from kvstore.node.shedding import LoadShedder, ShedSettings
from kvstore.v1 import kv_pb2, kv_pb2_grpc

FAR_LIMITS = [
    "--rate-limit", "10000000", "--max-apply-lag", "1000000", "--memory-limit", "64G", "--quota-bytes", "64G",
]


def micro(n: int = 1_000_000) -> None:
    lim = RateLimiter(RateLimit(1e12, 1e12))
    t0 = time.perf_counter()
    for i in range(n):
        lim.admit("user:alice", 1, float(i))
    rl = (time.perf_counter() - t0) / n * 1e9
    sh = LoadShedder(ShedSettings(max_apply_lag=1_000_000, memory_limit=1 << 40))
    sh.observe_memory(1 << 30, 0.0)
    t0 = time.perf_counter()
    for i in range(n):
        sh.write_refusal(i + 10, i)
    sd = (time.perf_counter() - t0) / n * 1e9
    print(f"rate limiter admit: {rl:.0f} ns/op; load shedder write_refusal: {sd:.0f} ns/op")


async def drive(address: str, seconds: float, inflight: int) -> float:
    """Puts/s over one KV.Stream with `inflight` operations outstanding, for `seconds`."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        q: asyncio.Queue[kv_pb2.OpBatch | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[kv_pb2.OpBatch]:
            while (b := await q.get()) is not None:
                yield b

        call = stub.Stream(feed())
        next_id = 0

        def batch(k: int) -> kv_pb2.OpBatch:
            nonlocal next_id
            ops = []
            for _ in range(k):
                next_id += 1
                ops.append(kv_pb2.Op(id=next_id, put=kv_pb2.PutRequest(key=b"k%d" % (next_id % 10_000), value=b"v" * 64)))
            return kv_pb2.OpBatch(ops=ops)

        # Warm up until the node answers OK.
        await q.put(batch(1))
        while True:
            rb = await call.read()
            if rb is grpc.aio.EOF:
                raise RuntimeError("stream ended")
            if all(r.put.error.code == kv_pb2.OK for r in rb.results):
                break
            await q.put(batch(len(rb.results)))
        done = 0
        await q.put(batch(inflight))
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            rb = await call.read()
            if rb is grpc.aio.EOF:
                raise RuntimeError("stream ended")
            bad = [r for r in rb.results if r.put.error.code != kv_pb2.OK]
            if bad:
                raise RuntimeError(f"a put failed: {bad[0].put.error}")
            done += len(rb.results)
            await q.put(batch(len(rb.results)))
        rate = done / (time.monotonic() - t0)
        await q.put(None)
        call.cancel()
        return rate


def run_one(extra: list[str], seconds: float, inflight: int) -> float:
    root = Path(tempfile.mkdtemp(prefix="kvbench-admission-"))
    c = Cluster(root, n=1, extra_args=["--groups", "1", *extra])
    try:
        c.start()
        ld = c.wait_leader()
        return asyncio.run(drive(ld.address, seconds, inflight))
    finally:
        c.stop()  # each process by its PID
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=64)
    args = ap.parse_args()
    micro()
    a: list[float] = []
    b: list[float] = []
    for r in range(args.rounds):
        a.append(run_one([], args.seconds, args.inflight))
        b.append(run_one(FAR_LIMITS, args.seconds, args.inflight))
        print(f"round {r + 1}: no limits {a[-1]:.0f} puts/s; every limit configured, far away {b[-1]:.0f} puts/s")
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"median: A (no limits) {ma:.0f} puts/s, B (far limits) {mb:.0f} puts/s: B/A = {mb / ma:.3f}")


if __name__ == "__main__":
    main()
