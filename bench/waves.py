"""Where a batch of writes spends its time at N in flight: the stages of the write path, measured.

`python -m bench.waves [--inflight 64] [--workload put] [--seconds 4]` starts a 3-node
`kvstore serve` cluster with the hop tracer on (`kvstore/hoptrace.py`, as `bench/hops.py`), drives
one workload at N operations in flight through `AsyncClient` (`bench.kvbench.load.run_point`, the
load generator of `bench.compare`), stops the cluster and reads every process's marks over the
measured window. At N in flight the client's operations travel in batches (one `OpBatch` per
stream write, answered in `ResultBatch`es), so it reports per stage the median duration and, where
the marks carry a count, the median per operation:

- client: a `ResultBatch` read -> the next `OpBatch` written (the load generator and the client
  library turning answers into new operations), and the batch's round trip (written -> the next
  batch read);
- leader: an `OpBatch` taken by the handler -> proposed (validate, encode, `Host.propose_many`);
- Ready cycles of the leader and of each follower, split by what they do (new entries only,
  committed entries only, both, neither): begin -> end, and the storage call inside it
  (`n.persist0` -> `n.persist1`: the WAL's write and fsync and the apply, on the persist thread
  or the loop);
- the gaps between the leader's cycles (its loop between the end of one and the begin of the
  next: stepping messages, answering).

It runs on any checkout that has the count marks (`s.ops:N`, `n.size:W:A`, `c.ops:N`; this one
on). Every loop is bounded (the workload by `run_point`'s duration and count); the cluster is
stopped by its PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.kvbench.adapters import make_adapter
from bench.kvbench.clusters import KvstoreCluster
from bench.kvbench.load import make_keys, make_value, preload, run_point
from kvstore import hoptrace

Marks = list[tuple[int, str]]


def _count(name: str) -> int:
    """The count a mark `NAME:N` carries (0 for anything else: the parsers are total)."""
    digits = name.rpartition(":")[2]
    return int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 10 else 0


def cycles(marks: Marks) -> dict[str, list[tuple[int, int, int]]]:
    """Per kind of Ready cycle ("append", "apply", "append+apply", "other"): (begin -> end ns,
    storage call ns (0 if none), entries written + applied) of each complete cycle in `marks`."""
    out: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    begin: int | None = None
    p0 = p1 = n = 0
    kind = ""
    for t, name in marks:
        if name == "n.begin":
            begin, p0, p1, n, kind = t, 0, 0, 0, "other"
        elif begin is None:
            continue
        elif name.startswith("n.size:"):
            w, a = _count(name.rpartition(":")[0]), _count(name)
            n = w + a
            kind = "append+apply" if w and a else "append" if w else "apply" if a else "other"
        elif name == "n.persist0":
            p0 = t
        elif name == "n.persist1":
            p1 = t
        elif name == "n.end":
            out[kind].append((t - begin, p1 - p0 if p0 and p1 > p0 else 0, n))
            begin = None
    return out


def gaps(marks: Marks) -> list[int]:
    """Nanoseconds from each cycle's end to the next cycle's begin."""
    out: list[int] = []
    last: int | None = None
    for t, name in marks:
        if name == "n.end":
            last = t
        elif name == "n.begin" and last is not None:
            out.append(t - last)
            last = None
    return out


def pairs(marks: Marks, first: str, then: str, count: str | None = None) -> list[tuple[int, int]]:
    """(ns from each `first` mark to the next `then` mark, the count of the `count` mark that
    came with `first`, 0 if none)."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    n = 0
    for t, name in marks:
        if name == first:
            start, n = t, 0
        elif start is None:
            continue
        elif count is not None and name.startswith(count + ":"):
            n = _count(name)
        elif name == then:
            out.append((t - start, n))
            start = None
    return out


def _row(label: str, samples: Sequence[tuple[int, int]]) -> str:
    if not samples:
        return f"| {label} | 0 | | | |"
    ns = [d for d, _ in samples]
    per = [d / n for d, n in samples if n]
    ops = [n for _, n in samples if n]
    n_ops = f"{statistics.median(ops):g}" if ops else ""
    per_op = f"{statistics.median(per) / 1000:,.1f}" if per else ""
    return f"| {label} | {len(ns)} | {statistics.median(ns) / 1000:,.0f} | {n_ops} | {per_op} |"


def report(client: Marks, leader: Marks, followers: dict[str, Marks]) -> str:
    rows = [
        "| stage | samples | median µs | ops (median) | µs per op (median) |",
        "|---|---|---|---|---|",
        _row("client: answers read -> next batch written", pairs(client, "c.read", "c.write", "c.results")),
        _row("client: batch written -> next answers read", pairs(client, "c.write", "c.read", "c.ops")),
        _row("leader: batch taken -> proposed", pairs(leader, "s.batch", "s.proposed", "s.ops")),
        _row("leader: between cycles (end -> next begin)", [(g, 0) for g in gaps(leader)]),
    ]
    for who, marks in [("leader", leader), *sorted(followers.items())]:
        for kind, cs in sorted(cycles(marks).items()):
            rows.append(_row(f"{who}: {kind} cycle, begin -> end (ops: entries)", [(d, n) for d, _, n in cs]))
            stored = [(p, n) for _, p, n in cs if p]
            if stored:
                rows.append(_row(f"{who}: {kind} cycle, storage call", stored))
    return "\n".join(rows)


async def _drive(cluster: KvstoreCluster, workload: str, inflight: int, seconds: float,
                 warmup: float) -> tuple[float, float]:
    adapter = make_adapter("kvstore", cluster.endpoints, timeout=10)
    try:
        keys, value = make_keys(10_000), make_value()
        await preload(adapter, keys, value, inflight=64, timeout=600)
        hoptrace.enable(None)  # this process: in memory only (`main` reads it)
        hoptrace.clear()
        res = await run_point(adapter, workload=workload, inflight=inflight, warmup=warmup, duration=seconds,
                              keys=keys, value=value, server_pids=cluster.pids())
    finally:
        await adapter.close()
    return res.ops_per_s, res.p50_us


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--workload", default="put", choices=["put", "mixed"])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--data-root", type=Path, default=None, help="where the data directories go (a real disk)")
    ap.add_argument("--server-arg", action="append", default=[], help="appended to every `kvstore serve`")
    a = ap.parse_args(argv)
    if not 1 <= a.inflight <= 4096 or not 0 < a.seconds <= 600:
        ap.error("--inflight in 1..4096, --seconds in (0, 600]")
    with tempfile.TemporaryDirectory(dir=a.data_root) as d:
        root = Path(d)
        trace = root / "trace"
        trace.mkdir()
        os.environ[hoptrace.ENV] = str(trace)
        cluster = KvstoreCluster(root / "data", extra_args=a.server_arg)
        try:
            cluster.start()
        finally:
            del os.environ[hoptrace.ENV]
        try:
            pids = {nid: n.proc.pid for nid, n in cluster.nodes.items() if n.proc is not None}
            ops, p50 = asyncio.run(_drive(cluster, a.workload, a.inflight, a.seconds, a.warmup))
        finally:
            cluster.stop()
        client = hoptrace.events()
        if not client:
            print("no trace of the client", file=sys.stderr)
            return 1
        start, end = client[0][0], client[-1][0]
        marks = {nid: [(t, nm) for t, nm in hoptrace.read_dump(trace / f"{pid}.hops") if start <= t <= end]
                 for nid, pid in pids.items() if (trace / f"{pid}.hops").exists()}
        # The leader: the node whose handler took the client's batches in the window (not asked of
        # the cluster afterwards: the leader balancer may have moved it meanwhile).
        taken = {nid: sum(1 for _, nm in m if nm == "s.batch") for nid, m in marks.items()}
        lead = max(taken, key=lambda nid: taken[nid], default=None)
        if lead is None or not taken[lead]:
            print("no node's trace took the client's batches", file=sys.stderr)
            return 1
        followers = {f"follower {nid}": m for nid, m in marks.items() if nid != lead}
        print(f"{a.workload} at {a.inflight} in flight, {a.seconds:g} s: {ops:,.0f} ops/s, p50 {p50 / 1000:.2f} ms "
              f"(tracing on); leader node {lead}\n")
        print(report(client, marks[lead], followers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
