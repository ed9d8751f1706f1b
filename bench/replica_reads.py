"""Read throughput with 0, 1 and 2 read replicas, and replica lag under a write load.

    python bench/replica_reads.py [--seconds 5] [--procs 2] [--inflight 32] [--keys 1000]

Real `kvstore serve` processes on 127.0.0.1 (free ports): 3 voters, plus 0, 1 or 2 learners
started with `--learner`; data in a temporary directory removed at the end. The same read load
for every configuration: `--procs` client processes with `--inflight` concurrent gets each, on
random keys, for `--seconds`. Reads are linearizable or stale, and go to the leader
(`read_preference="leader"`, the only option without replicas), to the replicas (`replica`:
learners, then followers) or to any member (`nearest`), least-outstanding balanced.

Then, with 2 learners: a write load (one process, `--inflight` concurrent puts) while the learners'
status is sampled every 50 ms: entries behind the leader's commit index and the staleness bound
each learner reports. Everything is bounded in time; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.client import AsyncClient, Client


def _reader(endpoints: list[str], keys: int, seconds: float, inflight: int, consistency: str, pref: str,
            q: mp.Queue) -> None:
    async def run() -> tuple[int, int, dict[int, int]]:
        served: dict[int, int] = {}
        ok = errs = 0
        async with AsyncClient(endpoints, timeout=5, read_preference=pref) as c:  # type: ignore[arg-type]
            await c.read(b"bench/0", consistency=consistency)  # type: ignore[arg-type]  # warm up
            stop = time.monotonic() + seconds

            async def worker(seed: int) -> None:
                nonlocal ok, errs
                rng = random.Random(seed)
                while time.monotonic() < stop:
                    try:
                        r = await c.read(b"bench/%d" % rng.randrange(keys), consistency=consistency)  # type: ignore[arg-type]
                    except Exception:
                        errs += 1
                        continue
                    ok += 1
                    served[r.node_id] = served.get(r.node_id, 0) + 1

            await asyncio.gather(*(worker(os.getpid() * 1000 + i) for i in range(inflight)))
        return ok, errs, served

    q.put(asyncio.run(run()))


def read_load(endpoints: list[str], args: argparse.Namespace, consistency: str, pref: str) -> tuple[float, int, dict[int, int]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_reader, args=(endpoints, args.keys, args.seconds, args.inflight, consistency, pref, q))
        for _ in range(args.procs)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=args.seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    ok = sum(r[0] for r in results)
    errs = sum(r[1] for r in results)
    served: dict[int, int] = {}
    for r in results:
        for nid, n in r[2].items():
            served[nid] = served.get(nid, 0) + n
    return ok / args.seconds, errs, served


async def write_load(endpoints: list[str], seconds: float, inflight: int) -> int:
    n = 0
    stop = time.monotonic() + seconds
    async with AsyncClient(endpoints, timeout=10) as c:

        async def worker(w: int) -> None:
            nonlocal n
            i = 0
            while time.monotonic() < stop:
                await c.put(b"w/%d/%d" % (w, i), b"x" * 100)
                i += 1
                n += 1

        await asyncio.gather(*(worker(w) for w in range(inflight)))
    return n


def measure_lag(cluster: Cluster, args: argparse.Namespace) -> None:
    learners = [cluster.nodes[i] for i in sorted(cluster.nodes) if i > 3]
    samples: dict[int, list[tuple[int, int]]] = {n.id: [] for n in learners}
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_writer, args=(cluster.endpoints, args.seconds, args.inflight))
    t0 = time.monotonic()
    p.start()
    time.sleep(0.5)  # let the load ramp up
    while p.is_alive() and time.monotonic() - t0 < args.seconds + 30:
        ld = cluster.leader()
        lst = ld.status() if ld is not None else None
        if lst is not None:
            commit = lst.groups[0].commit
            for n in learners:
                st = n.status()
                if st is not None and st.groups:
                    g = st.groups[0]
                    samples[n.id].append((max(0, commit - g.applied), g.staleness_ms))
        time.sleep(0.05)
    p.join(30)
    for nid, s in samples.items():
        if not s:
            continue
        ents = [e for e, _ in s]
        ms = [m for _, m in s if m >= 0]
        q99 = sorted(ms)[int(0.99 * (len(ms) - 1))] if ms else -1
        print(f"  learner {nid}: {len(s)} samples; entries behind mean {statistics.mean(ents):.1f} "
              f"max {max(ents)}; staleness bound mean {statistics.mean(ms):.0f} ms, p99 {q99} ms, max {max(ms)} ms")


def _writer(endpoints: list[str], seconds: float, inflight: int) -> None:
    t0 = time.perf_counter()
    n = asyncio.run(write_load(endpoints, seconds, inflight))
    print(f"  write load: {n / (time.perf_counter() - t0):,.0f} puts/s ({inflight} in flight)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--tick-ms", type=int, default=100)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvbench-replicas-"))
    print(f"read load: {args.procs} client processes x {args.inflight} in flight, {args.seconds:g} s per row; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'learners':>8} {'consistency':>12} {'read from':>9} {'reads/s':>9} {'errors':>6}  served by node")
    cluster = Cluster(root, 3, extra_args=["--tick-ms", str(args.tick_ms)])
    # the harness defaults to 50 ms ticks; the last --tick-ms given wins
    try:
        cluster.start()
        with Client(cluster.endpoints) as c:
            for i in range(args.keys):
                c.put(b"bench/%d" % i, b"v" * 100)
        for learners in (0, 1, 2):
            while len(cluster.nodes) < 3 + learners:
                n = cluster.add_node(len(cluster.nodes) + 1, learner=True)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    st = n.status()
                    if st is not None and st.groups and st.groups[0].applied >= args.keys and st.groups[0].staleness_ms >= 0:
                        break
                    time.sleep(0.1)
            prefs = ["leader", "nearest"] + (["replica"] if learners else [])
            for consistency in ("linearizable", "stale"):
                for pref in prefs:
                    rate, errs, served = read_load(cluster.endpoints, args, consistency, pref)
                    by = " ".join(f"{nid}:{100 * n / max(1, sum(served.values())):.0f}%" for nid, n in sorted(served.items()))
                    print(f"{learners:>8} {consistency:>12} {pref:>9} {rate:>9,.0f} {errs:>6}  {by}", flush=True)
        print(f"lag of 2 learners under a write load ({args.seconds:g} s, tick {args.tick_ms} ms):")
        measure_lag(cluster, args)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
