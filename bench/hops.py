"""Where a put and a linearizable get spend their time at 1 in flight, hop by hop.

`python -m bench.hops` starts a 3-node `kvstore serve` cluster with the hop tracer on
(`kvstore/hoptrace.py`: `KVSTORE_HOPTRACE` for the servers, `hoptrace.enable` for this
process's client), runs N puts then N linearizable gets one at a time through
`kvstore.client.AsyncClient`, stops the cluster (each process writes its marks at exit) and
puts every process's marks on one time line (CLOCK_MONOTONIC is one clock for the machine).
Each operation is the window between the client's `c.call` and `c.done`; inside it, each hop
is the time from one mark to the first next mark of the chain at or after it, in the process
that hop belongs to (C client, L the node that served the operation, F the follower whose
answer reached the leader first). It does this for a data directory on disk and on tmpfs
(`/dev/shm`: flushes nearly free), prints p50 and mean per hop in µs, and a cProfile summary of
the leader's event-loop thread over a second window of N puts and N gets (`KVSTORE_PROFILE`,
toggled by SIGUSR1; the persist thread is not in it).

At 1 in flight a heartbeat (every 100 ms tick) can take a mark meant for the operation: that
touches ~1 % of operations and the p50 ignores it. Every loop is bounded by N and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import io
import os
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.kvbench.adapters import KvstoreAdapter
from bench.kvbench.clusters import KvstoreCluster, filesystem_of
from kvstore import hoptrace
from kvstore.server.profiletoggle import ENV as PROFILE_ENV

# (hop label, process, mark). The first row is the start; each later row is a hop ending there.
PUT_CHAIN: list[tuple[str, str, str]] = [
    ("start", "C", "c.call"),
    ("client: op queued -> stream write", "C", "c.write"),
    ("gRPC: client -> leader handler", "L", "s.batch"),
    ("propose (validate, encode, Host.propose)", "L", "s.proposed"),
    ("leader Ready loop wakes", "L", "n.cycle"),
    ("Ready taken -> transport.send", "L", "t.send"),
    ("peer stream writes the append", "L", "t.out"),
    ("gRPC: leader -> follower", "F", "r.recv"),
    ("follower step + Ready loop wakes", "F", "n.cycle"),
    ("follower Ready -> persist call (thread or loop)", "F", "n.persist0"),
    ("follower persist (txn + fsync)", "F", "n.persist1"),
    ("follower end_cycle -> transport.send", "F", "t.send"),
    ("follower peer stream writes the response", "F", "t.out"),
    ("gRPC: follower -> leader", "L", "r.recv"),
    ("leader step + Ready loop wakes", "L", "n.cycle"),
    ("leader commit: Ready -> persist call", "L", "n.persist0"),
    ("apply (txn until results)", "L", "n.applied"),
    ("reply written (loop hand-off -> stream)", "L", "s.reply"),
    ("gRPC: leader -> client", "C", "c.read"),
    ("client wakes the caller", "C", "c.done"),
]
GET_CHAIN: list[tuple[str, str, str]] = [
    ("start", "C", "c.call"),
    ("client: op queued -> stream write", "C", "c.write"),
    ("gRPC: client -> leader handler", "L", "s.batch"),
    ("read index (validate, Host.read)", "L", "s.proposed"),
    ("leader Ready loop wakes", "L", "n.cycle"),
    ("Ready taken -> transport.send", "L", "t.send"),
    ("peer stream writes the heartbeat", "L", "t.out"),
    ("gRPC: leader -> follower", "F", "r.recv"),
    ("follower step + Ready loop wakes", "F", "n.cycle"),
    ("follower Ready -> transport.send", "F", "t.send"),
    ("follower peer stream writes the response", "F", "t.out"),
    ("gRPC: follower -> leader", "L", "r.recv"),
    ("leader step + Ready loop wakes", "L", "n.cycle"),
    ("leader Ready with the read state", "L", "n.end"),
    ("reply written (serve read -> stream)", "L", "s.reply"),
    ("gRPC: leader -> client", "C", "c.read"),
    ("client wakes the caller", "C", "c.done"),
]


@dataclass(slots=True)
class Timeline:
    """One process's marks: for each mark name, its times in order."""

    times: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, events: Sequence[tuple[int, str]]) -> Timeline:
        tl = cls()
        for t, name in sorted(events):
            tl.times[name].append(t)
        return tl

    def first_at_or_after(self, name: str, t: int) -> int | None:
        ts = self.times.get(name)
        if not ts:
            return None
        i = bisect.bisect_left(ts, t)
        return ts[i] if i < len(ts) else None


def op_windows(client: Sequence[tuple[int, str]]) -> list[tuple[int, int]]:
    """(c.call, c.done) of each operation of the client's marks (1 in flight: they alternate)."""
    out, start = [], None
    for t, name in client:
        if name == "c.call":
            start = t
        elif name == "c.done" and start is not None:
            out.append((start, t))
            start = None
    return out


def walk(chain: list[tuple[str, str, str]], start: int, end: int, c: Timeline, leader: Timeline,
         followers: list[Timeline]) -> list[int] | None:
    """The hop durations (ns) of one operation, or None if a mark is missing in its window."""
    best: list[int] | None = None
    best_resp: int | None = None
    for f in followers:
        procs = {"C": c, "L": leader, "F": f}
        t, hops, resp = start, [], None
        ok = True
        for _label, proc, name in chain[1:]:
            nxt = procs[proc].first_at_or_after(name, t)
            if nxt is None or nxt > end:
                ok = False
                break
            if proc == "F":
                resp = nxt
            hops.append(nxt - t)
            t = nxt
        if ok and resp is not None and (best_resp is None or resp < best_resp):
            best, best_resp = hops, resp
    return best


def table(chain: list[tuple[str, str, str]], per_op: list[list[int]], totals: list[int]) -> str:
    lines = ["| hop | where | p50 µs | mean µs |", "|---|---|---|---|"]
    for i, (label, proc, _name) in enumerate(chain[1:]):
        col = [h[i] / 1000 for h in per_op]
        lines.append(f"| {label} | {proc} | {statistics.median(col):.0f} | {statistics.fmean(col):.0f} |")
    tot = [t / 1000 for t in totals]
    sum_p50 = sum(statistics.median([h[i] / 1000 for h in per_op]) for i in range(len(chain) - 1))
    lines.append(f"| **total (c.call -> c.done)** | | **{statistics.median(tot):.0f}** | "
                 f"**{statistics.fmean(tot):.0f}** |")
    lines.append(f"| (sum of the hops' p50) | | {sum_p50:.0f} | |")
    return "\n".join(lines)


async def _run_ops(kv: KvstoreAdapter, kind: str, n: int, deadline: float) -> int:
    value = b"v" * 128
    done = 0
    for i in range(n):
        if time.monotonic() > deadline:
            break
        key = f"key/{i % 1000:012d}".encode()
        if kind == "put":
            await kv.put(key, value)
        else:
            await kv.get(key)
        done += 1
    return done


async def _drive(endpoints: list[str], n: int, warmup: int, leader_pid: int | None,
                 profile: bool) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    kv = KvstoreAdapter(endpoints)
    deadline = time.monotonic() + 300
    try:
        await _run_ops(kv, "put", warmup, deadline)
        await _run_ops(kv, "get", warmup, deadline)
        hoptrace.clear()
        await _run_ops(kv, "put", n, deadline)
        puts = hoptrace.events()
        hoptrace.clear()
        await _run_ops(kv, "get", n, deadline)
        gets = hoptrace.events()
        hoptrace.clear()
        if profile and leader_pid is not None:
            os.kill(leader_pid, signal.SIGUSR1)
            await asyncio.sleep(0.2)  # the signal is handled by the node's loop
            await _run_ops(kv, "put", n, deadline)
            await _run_ops(kv, "get", n, deadline)
            os.kill(leader_pid, signal.SIGUSR1)
    finally:
        await kv.close()
    return puts, gets


@dataclass(slots=True)
class ModeResult:
    mode: str
    fs: str
    put: str
    get: str
    put_ops: int
    get_ops: int
    profile: str


def run_mode(mode: str, root: Path, n: int, warmup: int, profile: bool, top: int,
             server_args: Sequence[str] = ()) -> ModeResult:
    trace_dir = root / "trace"
    trace_dir.mkdir(parents=True)
    prof_path = root / "leader.prof"
    os.environ[hoptrace.ENV] = str(trace_dir)
    os.environ[PROFILE_ENV] = str(prof_path)
    cluster = KvstoreCluster(root / "data", extra_args=server_args)
    try:
        cluster.start()
    finally:
        del os.environ[hoptrace.ENV]
        del os.environ[PROFILE_ENV]
    pids: dict[int, int] = {}
    try:
        pids = {nid: n_.proc.pid for nid, n_ in cluster.nodes.items() if n_.proc is not None}
        lead = cluster.leader()
        leader_pid = pids.get(lead) if lead is not None else None
        puts, gets = asyncio.run(_drive(cluster.endpoints, n, warmup, leader_pid, profile))
    finally:
        cluster.stop()
    with open(root / "client.hops", "w") as f:
        f.writelines(f"{t} {nm}\n" for t, nm in [*puts, *gets])
    servers = {pid: hoptrace.read_dump(trace_dir / f"{pid}.hops") for pid in pids.values()
               if (trace_dir / f"{pid}.hops").exists()}
    if not servers:
        raise SystemExit(f"no trace files in {trace_dir}: did the nodes exit cleanly?")
    # The node that served an operation: the one whose handler took its batch inside its window
    # (the leader balancer may move the leadership between operations).
    lines = {p: Timeline.of(ev) for p, ev in servers.items()}
    out = {}
    counts = {}
    for kind, client_events, chain in (("put", puts, PUT_CHAIN), ("get", gets, GET_CHAIN)):
        c = Timeline.of(client_events)
        per_op, totals = [], []
        for s, e in op_windows(client_events):
            served = [p for p, tl in lines.items() if (t := tl.first_at_or_after("s.batch", s)) is not None and t <= e]
            if len(served) != 1:
                continue
            leader = lines[served[0]]
            followers = [tl for p, tl in lines.items() if p != served[0]]
            hops = walk(chain, s, e, c, leader, followers)
            if hops is not None:
                per_op.append(hops)
                totals.append(e - s)
        counts[kind] = len(per_op)
        out[kind] = table(chain, per_op, totals) if per_op else "(no complete operation traced)"
    summary = ""
    if profile and prof_path.exists():
        buf = io.StringIO()
        st = pstats.Stats(str(prof_path), stream=buf)
        st.sort_stats("tottime").print_stats(top)
        summary = buf.getvalue()
    return ModeResult(mode, filesystem_of(root), out["put"], out["get"], counts["put"], counts["get"], summary)


def _profile_rows(text: str) -> str:
    """The pstats table without its header noise."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("ncalls"):
            return "\n".join(lines[i:])
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=500, help="operations traced per kind (default 500)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--modes", default="disk,tmpfs", help="disk, tmpfs or both")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="where the disk mode's data goes (default: the system temp dir)")
    ap.add_argument("--tmpfs-root", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--top", type=int, default=25, help="profile rows printed")
    ap.add_argument("--keep", action="store_true", help="keep the data and trace directories")
    ap.add_argument("--out", type=Path, default=None, help="also write the report to OUT/hops.md")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for every `kvstore serve`, e.g. --server-arg=--inline-persist=0 (repeatable)")
    args = ap.parse_args(argv)
    hoptrace.enable(None)  # this process's client marks (the servers get KVSTORE_HOPTRACE)
    report = []
    for mode in args.modes.split(","):
        base = args.tmpfs_root if mode == "tmpfs" else args.data_root
        if mode == "tmpfs" and filesystem_of(base) not in ("tmpfs", "ramfs"):
            print(f"{base} is not tmpfs; skipping the tmpfs mode", file=sys.stderr)
            continue
        root = Path(tempfile.mkdtemp(prefix="kvhops-", dir=base))
        try:
            r = run_mode(mode, root, args.ops, args.warmup, not args.no_profile, args.top, args.server_arg)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        part = [f"## {mode} ({r.fs}): put, 1 in flight, {r.put_ops} ops", "", r.put, "",
                f"## {mode} ({r.fs}): linearizable get, 1 in flight, {r.get_ops} ops", "", r.get, ""]
        if r.profile:
            part += [f"## {mode}: leader event-loop thread, cProfile by own time ({args.ops} puts + "
                     f"{args.ops} gets)", "", "```", _profile_rows(r.profile).rstrip(), "```", ""]
        text = "\n".join(part)
        print(text, flush=True)
        report.append(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hops.md").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
