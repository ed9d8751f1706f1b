"""Where the slow operations of a put load fall in time, and what the page cache did meanwhile.

    python -m bench.tails [--system kvstore|etcd] [--inflight 16] [--seconds 10] [--kvstore-arg=ARG ...]

One fresh 3-node cluster on the disk (`bench.compare`'s harness, 10,000 keys preloaded), N workers
putting 128-byte values to random keys for S seconds (bounded: S seconds, then each worker's
operation in flight). Prints throughput, p50 / p99 / max, the 100 ms windows holding the
operations at or above p99 and each window's slowest put (stalls show as runs of windows), the
kernel's dirty and writeback page-cache totals sampled every 50 ms (`/proc/meminfo`: a burst of
writeback shows as dirty falling by hundreds of MB), and bytes written per put by each server
process (`/proc/PID/io`: `wchar` by its calls, `write_bytes` sent to the disk). Written to find
why kvstore's p99.9 was 10x etcd's at 16 puts in flight (bench/README.md, "Steady writeback of the
state machine").
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click

from bench.compare import _data_root, _settled_leader
from bench.kvbench.adapters import make_adapter
from bench.kvbench.clusters import KvstoreCluster, make_cluster
from bench.kvbench.load import make_keys, make_value, preload


def _meminfo() -> tuple[int, int]:
    """(Dirty, Writeback) in KiB."""
    d: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Dirty", "Writeback"):
                d[k] = int(v.split()[0])
    return d.get("Dirty", 0), d.get("Writeback", 0)


def _proc_io(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v)
    except OSError:
        pass
    return out


async def _run(system: str, inflight: int, seconds: float, kvstore_args: tuple[str, ...]) -> None:
    root_dir, _ = _data_root(None)
    root = Path(tempfile.mkdtemp(prefix="kvbench-tails-", dir=root_dir))
    cluster = make_cluster(system, root, kvstore_args=kvstore_args)
    cluster.start()
    try:
        keys, value = make_keys(10_000), make_value(0)
        adapter = make_adapter(system, cluster.endpoints, timeout=10)
        try:
            await preload(adapter, keys, value, inflight=64, timeout=600)
            if isinstance(cluster, KvstoreCluster):
                await _settled_leader(cluster)
            pids = cluster.pids()
            ops: list[tuple[float, float]] = []
            mem: list[tuple[float, int, int]] = []
            start = time.perf_counter()
            end = start + seconds

            async def worker(i: int) -> None:
                rng = random.Random(i)
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    await adapter.put(keys[rng.randrange(len(keys))], value)
                    t1 = time.perf_counter()
                    ops.append((t1 - start, t1 - t0))

            async def sampler() -> None:
                while time.perf_counter() < end:
                    mem.append((time.perf_counter() - start, *_meminfo()))
                    await asyncio.sleep(0.05)

            io0 = {p: _proc_io(p) for p in pids}
            await asyncio.gather(sampler(), *(worker(i) for i in range(inflight)))
            io1 = {p: _proc_io(p) for p in pids}
        finally:
            await adapter.close()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    lat = sorted(x for _, x in ops)
    p99 = lat[int(len(lat) * 0.99)]
    print(f"{system} put @{inflight}: {len(ops) / seconds:,.0f}/s, p50 {statistics.median(lat) * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms ({len(ops):,} puts)")
    slow: dict[int, int] = {}
    worst: dict[int, float] = {}
    for t, x in ops:
        w = int(t * 10)
        worst[w] = max(worst.get(w, 0.0), x)
        if x >= p99:
            slow[w] = slow.get(w, 0) + 1
    print("windows (s) with puts >= p99, count and slowest ms:",
          " ".join(f"{w / 10:.1f}:{n}/{worst[w] * 1e3:.0f}" for w, n in sorted(slow.items())))
    print(f"page cache: dirty max {max(d for _, d, _ in mem) // 1024} MiB; samples with writeback > 1 MiB "
          "(s: dirty/writeback MiB):", " ".join(f"{t:.2f}:{d // 1024}/{wb // 1024}" for t, d, wb in mem if wb > 1024))
    for p in pids:
        a, b = io0[p], io1[p]
        if a and b:
            print(f"server pid {p}: {(b['wchar'] - a['wchar']) / len(ops):,.0f} B written per put by its calls, "
                  f"{(b['write_bytes'] - a['write_bytes']) / len(ops):,.0f} B sent to the disk")


@click.command(help=__doc__)
@click.option("--system", type=click.Choice(["kvstore", "etcd"]), default="kvstore", show_default=True)
@click.option("--inflight", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--seconds", type=click.FloatRange(1, 600), default=10.0, show_default=True)
@click.option("--kvstore-arg", "kvstore_args", multiple=True, help="Extra `kvstore serve` argument (repeatable).")
def main(system: str, inflight: int, seconds: float, kvstore_args: tuple[str, ...]) -> None:
    asyncio.run(_run(system, inflight, seconds, kvstore_args))


if __name__ == "__main__":
    main()
