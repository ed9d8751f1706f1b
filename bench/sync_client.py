"""The synchronous `Client` from many threads against the `AsyncClient` at the same concurrency,
same local 3-node cluster, same run.

    python bench/sync_client.py [--seconds 3] [--rounds 3] [--concurrency 1,8,32]

One 3-node cluster of `kvstore serve` processes on 127.0.0.1 (data in a temporary directory
removed at the end, processes stopped by PID). For each workload (put, linearizable get) and
each concurrency N, a round runs A then B, alternating, so both see the same machine:

- A: one `Client` shared by N threads, each doing the operation in a loop;
- B: one `AsyncClient` on uvloop (as `bench/compare.py` runs it) with N tasks doing the same.

Each run is bounded by `--seconds` (after one warm-up operation per worker) and counts only
successful operations (any error stops the bench). Prints every round, then the medians and the
ratio sync/async, and the client's CPU time per operation (this process's user + system time
over the run: it runs the client only, the nodes are other processes), which a busy machine
disturbs less than throughput. The machine may be shared: read the ratios of one run, not
absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.client import AsyncClient, Client

VALUE = b"v" * 64
KEYS = 1000


def _key(worker: int, i: int) -> bytes:
    return b"bench/%03d/%04d" % (worker, i % KEYS)


def sync_rate(endpoints: list[str], workload: str, threads: int, seconds: float) -> tuple[float, float]:
    """Operations/s of one `Client` shared by `threads` threads for `seconds`, and this
    process's CPU seconds per operation."""
    counts = [0] * threads
    errors: list[BaseException] = []
    window = [0.0]
    cpu = [0.0]

    def open_window() -> None:  # run by the last thread to reach the barrier, before any leaves
        cpu[0] = time.process_time()
        window[0] = time.monotonic() + seconds

    start = threading.Barrier(threads + 1, action=open_window)

    with Client(endpoints, timeout=30) as c:
        op: Callable[[int, int], object]
        if workload == "put":
            def op(w: int, i: int) -> object:
                return c.put(_key(w, i), VALUE)
        else:
            def op(w: int, i: int) -> object:
                return c.get(_key(w % 8, i))

        def worker(w: int) -> None:
            try:
                op(w, 0)  # warm-up: connections, leader, shard map
                start.wait()
                i, end = 1, window[0]
                while time.monotonic() < end:
                    op(w, i)
                    i += 1
                counts[w] = i - 1
            except BaseException as e:
                errors.append(e)
                start.abort()

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in ts:
            t.start()
        with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: reported below
            start.wait()
        t0 = window[0] - seconds
        for t in ts:
            t.join()
        elapsed = time.monotonic() - t0
        used = time.process_time() - cpu[0]
    if errors:
        raise RuntimeError(f"a sync worker failed: {errors[0]!r}")
    ops = sum(counts)
    return ops / elapsed, used / max(1, ops)


async def _async_rate(endpoints: list[str], workload: str, tasks: int, seconds: float) -> tuple[float, float]:
    async with AsyncClient(endpoints, timeout=30) as c:
        async def op(w: int, i: int) -> object:
            if workload == "put":
                return await c.put(_key(w, i), VALUE)
            return await c.get(_key(w % 8, i))

        await asyncio.gather(*(op(w, 0) for w in range(tasks)))
        end = time.monotonic() + seconds

        async def worker(w: int) -> int:
            i = 1
            while time.monotonic() < end:
                await op(w, i)
                i += 1
            return i - 1

        t0, c0 = time.monotonic(), time.process_time()
        ops = sum(await asyncio.gather(*(worker(w) for w in range(tasks))))
        return ops / (time.monotonic() - t0), (time.process_time() - c0) / max(1, ops)


def async_rate(endpoints: list[str], workload: str, tasks: int, seconds: float) -> tuple[float, float]:
    """Operations/s of one `AsyncClient` (uvloop) with `tasks` tasks for `seconds`, and this
    process's CPU seconds per operation."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(_async_rate(endpoints, workload, tasks, seconds))
    return uvloop.run(_async_rate(endpoints, workload, tasks, seconds))


async def fill(endpoints: list[str]) -> None:
    """Write the keys the gets read (8 workers' worth), 64 at a time."""
    async with AsyncClient(endpoints, timeout=30) as c:
        keys = [_key(w, i) for w in range(8) for i in range(KEYS)]
        for j in range(0, len(keys), 64):
            await asyncio.gather(*(c.put(k, VALUE) for k in keys[j:j + 64]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--workloads", default="put,get")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cluster is stopped
    root = Path(tempfile.mkdtemp(prefix="kvbench-syncclient-"))
    cluster = Cluster(root, n=3)
    try:
        cluster.start()
        cluster.settled_leader()
        asyncio.run(fill(cluster.endpoints))
        results: dict[tuple[str, int], tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {}
        for r in range(args.rounds):
            for wl in workloads:
                for n in levels:
                    s, a = results.setdefault((wl, n), ([], []))
                    s.append(sync_rate(cluster.endpoints, wl, n, args.seconds))
                    a.append(async_rate(cluster.endpoints, wl, n, args.seconds))
                    (sr, sc), (ar, ac) = s[-1], a[-1]
                    print(f"round {r + 1} {wl:>3} x{n:<3}: sync {sr:8.0f}/s {sc * 1e6:6.1f} us/op  "
                          f"async {ar:8.0f}/s {ac * 1e6:6.1f} us/op  sync/async {sr / ar:.2f}", flush=True)
        print(f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each (3 nodes, fsync on, linearizable gets; "
              f"client CPU per operation):")
        print("| workload | concurrency | sync Client (threads) | AsyncClient (tasks) | sync/async "
              "| client CPU sync | client CPU async |")
        print("|---|---|---|---|---|---|---|")
        for (wl, n), (s, a) in results.items():
            ms, ma = statistics.median(x[0] for x in s), statistics.median(x[0] for x in a)
            cs, ca = statistics.median(x[1] for x in s), statistics.median(x[1] for x in a)
            print(f"| {wl} | {n} | {ms:,.0f}/s | {ma:,.0f}/s | {ms / ma:.2f}x | {cs * 1e6:.0f} us | {ca * 1e6:.0f} us |")
        print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        cluster.stop()  # by PID
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
