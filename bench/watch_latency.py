"""Watch latency, kvstore against etcd 3.4 in one run: from an acknowledged put to its event at
every watcher (p50 / p99).

    python -m bench.watch_latency [--rows key:1@20,prefix:1@20,prefix:1000@5] [--seconds 10]
                                  [--rounds 3] [--systems kvstore,etcd] [--out results/]

Same shape for both systems: 3 server processes on 127.0.0.1 (kvstore `serve --groups 3`, etcd
3.4 with its defaults), data on disk, fsync on. A row is ``KIND:WATCHERS@RATE``:

- ``key``: every watcher watches one key, and every put writes that key (kvstore: one group);
- ``prefix``: every watcher watches the prefix ``wl/<row>/`` and the puts go round 64 keys under
  it (kvstore: the keys hash to all 3 data groups, so every watch spans the 3 groups);

and RATE is the fixed put rate (puts/s, one at a time, for ``--seconds``). Every watcher must
receive every acknowledged put: events expected = puts x watchers, and the table says how many
arrived, how many are missing (and, in the JSON lines, duplicates and revisions never
acknowledged). The watchers run in separate processes (``--watchers-per-proc``, at most
``--max-procs``), each watch on its own gRPC stream: kvstore through its client library
(``AsyncClient.watch_batches``, which puts a prefix watch on a node hosting every group, at
random among them), etcd through the v3 ``Watch`` API (generated stubs in ``kvstore/etcdpb``,
grpc.aio), watch i at member i mod 3. Latency = the event's arrival at its watcher process minus
the put's acknowledgement at the writer (this process), both ``time.monotonic()``
(CLOCK_MONOTONIC, one clock for every process on a Linux host); it can be slightly negative when
a watcher hears of a put before the writer hears the acknowledgement. The busiest watcher
process's CPU (cores) is reported so a saturated watcher side shows: near 1.0 it is the bottleneck.

Rounds alternate the order of the systems (kvstore first in even rounds); each (round, system)
starts a fresh cluster and runs every row on it. The summary takes medians over rounds, and the
kvstore/etcd ratio of p50 and of p99 round by round (same round, same row), then its median.
``--profile`` (kvstore) runs each node's event loop under cProfile during the measured puts of
the row with the most watchers (the server's SIGUSR1 toggle, ``KVSTORE_PROFILE``) and writes the
top entries per node to ``OUT/watch-profile.txt``.

Every load loop is bounded by a count and a time; every process this starts (servers, watcher
processes) is stopped by its PID. Output: JSON lines (stdout and ``OUT/watch.jsonl``) and the
markdown table (stdout and ``OUT/watch.md``). Exit status 1 if a cluster failed to come up or a
row could not run (the error is a JSON line); missing events are reported, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import pstats
import queue
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

if __package__ in (None, ""):  # `python bench/watch_latency.py`: import `bench` from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kvbench.clusters import (
    BenchCluster,
    ClusterError,
    EtcdCluster,
    KvstoreCluster,
    check_real_disk,
    proc_cpu_seconds,
)
from bench.kvbench.report import machine_info, machine_line
from bench.kvbench.watchers import WatcherResult, WatchPlan, watcher_process
from bench.kvbench.watchstats import markdown, summarize, tally
from bench.kvbench.watchwrite import EtcdWriter, KvstoreWriter, RevisionWriter, paced_puts
from kvstore.server.profiletoggle import ENV as PROFILE_ENV

SYSTEMS = ("kvstore", "etcd")
PREFIX_KEYS = 64
"""Keys a prefix row's puts go round (with 3 kvstore groups, every group gets some)."""
READY_TIMEOUT = 90.0
"""Seconds for the watcher processes to start and establish every watch."""


@dataclass(frozen=True, slots=True)
class Row:
    kind: str
    """"key" or "prefix"."""
    watchers: int
    rate: float

    @property
    def name(self) -> str:
        return f"{self.kind} x{self.watchers} @{self.rate:g}/s"

    @staticmethod
    def parse(spec: str) -> Row:
        """``KIND:WATCHERS@RATE``, e.g. ``prefix:1000@5``."""
        try:
            kind, rest = spec.split(":", 1)
            n, rate = rest.split("@", 1)
            row = Row(kind.strip(), int(n), float(rate))
        except ValueError:
            raise ValueError(f"row {spec!r} is not KIND:WATCHERS@RATE (e.g. prefix:1000@5)") from None
        if row.kind not in ("key", "prefix"):
            raise ValueError(f"row {spec!r}: KIND is key or prefix")
        if not 1 <= row.watchers <= 100_000 or not 0 < row.rate <= 10_000 or not math.isfinite(row.rate):
            raise ValueError(f"row {spec!r}: 1 <= WATCHERS <= 100000 and 0 < RATE <= 10000")
        return row


class Output:
    """JSON lines to stdout and OUT/watch.jsonl."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.dir = out
        self._f: TextIO = open(out / "watch.jsonl", "w")  # noqa: SIM115 - closed in close()

    def emit(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _data_root(given: Path | None) -> tuple[Path, str]:
    root = given or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    try:
        return root, check_real_disk(root)
    except ClusterError:
        if given is not None:
            raise
        return Path("/var/tmp"), check_real_disk(Path("/var/tmp"))  # the temp dir is in memory here


@contextlib.contextmanager
def _cluster(system: str, data_root: Path, groups: int, keep: bool, profile_dir: Path | None) -> Iterator[BenchCluster]:
    """A started 3-node cluster in a fresh directory; stopped by PID and removed afterwards. With
    ``profile_dir`` (kvstore), node N starts with KVSTORE_PROFILE=profile_dir/nN.prof."""
    root = Path(tempfile.mkdtemp(prefix=f"kvbench-watch-{system}-", dir=data_root))
    cluster: KvstoreCluster | EtcdCluster
    if system == "kvstore":
        cluster = KvstoreCluster(root, ["--groups", str(groups)] if groups > 1 else [])
    else:
        cluster = EtcdCluster(root)
    try:
        if isinstance(cluster, KvstoreCluster) and profile_dir is not None:
            for nid, node in cluster.nodes.items():
                os.environ[PROFILE_ENV] = str(profile_dir / f"n{nid}.prof")
                try:
                    node.start()
                finally:
                    del os.environ[PROFILE_ENV]
            cluster.wait_ready()
        else:
            cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _split(total: int, per_proc: int, max_procs: int) -> list[int]:
    """Watches per process: as few processes as ``per_proc`` allows, at most ``max_procs``,
    the watches spread evenly."""
    procs = max(1, min(max_procs, math.ceil(total / per_proc)))
    return [total // procs + (i < total % procs) for i in range(procs)]


@dataclass(slots=True)
class RowSetup:
    keys: list[bytes]
    watched: bytes
    end_key: bytes


def _row_setup(row: Row, index: int) -> RowSetup:
    prefix = b"wl/%d/" % index
    if row.kind == "key":
        k = prefix + b"k"
        return RowSetup([k], k, k)
    return RowSetup([prefix + b"%04d" % i for i in range(PREFIX_KEYS)], prefix, prefix + b"end")


async def _wait_ready(ready_q: Any, procs: int, deadline: float) -> str:
    """'' once every watcher process said ready; else why not."""
    ready = 0
    while ready < procs:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"{procs - ready} of {procs} watcher processes not ready in {READY_TIMEOUT:g} s"
        try:
            what, _first = await asyncio.to_thread(ready_q.get, True, min(left, 1.0))
        except queue.Empty:
            continue
        if what != "ready":
            return "a watcher process failed before its watches were established"
        ready += 1
    return ""


async def _collect(out_q: Any, procs: int, deadline: float) -> list[WatcherResult]:
    results: list[WatcherResult] = []
    while len(results) < procs and time.monotonic() < deadline:
        try:
            _first, res = await asyncio.to_thread(out_q.get, True, min(1.0, max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            continue
        results.append(res)
    return results


def _stop(procs: Sequence[Any]) -> None:
    """Join every watcher process; one still alive after 10 s is killed (by its PID)."""
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


def _by_node(acks: dict[int, float], results: Sequence[WatcherResult]) -> dict[str, dict[str, float]]:
    """Per serving node (kvstore: the node that answered a watch first; etcd: its member): how
    many watches it served and their ack->event p50 (a follower applies later than the leader)."""
    per: dict[int, list[tuple[Sequence[int], Sequence[float]]]] = {}
    for r in results:
        for node, revs, times in zip(r.nodes, r.revisions, r.arrivals, strict=True):
            per.setdefault(node, []).append((revs, times))
    return {str(n): {"watches": len(w), "p50_ms": tally(acks, w).p50} for n, w in sorted(per.items())}


async def run_row(cluster: BenchCluster, system: str, writer: RevisionWriter, row: Row, index: int, *,
                  seconds: float, warmup_puts: int, per_proc: int, max_procs: int, drain: float,
                  profile_pids: Sequence[int] = ()) -> dict[str, Any]:
    """One row on a running cluster: watcher processes up, warm-up puts, measured puts at the
    row's rate, the end marker, every watcher's events collected and matched."""
    setup = _row_setup(row, index)
    value = b"v" * 32
    end_value = b"end-%d-%d" % (os.getpid(), time.monotonic_ns())
    start_rev = await writer.put(setup.keys[0], b"start")
    count = max(1, round(row.rate * seconds))
    write_limit = seconds * 2 + 10
    t0 = time.monotonic()
    deadline = t0 + READY_TIMEOUT + write_limit + drain
    ctx = mp.get_context("spawn")
    ready_q, out_q = ctx.Queue(), ctx.Queue()
    split = _split(row.watchers, per_proc, max_procs)
    procs = []
    first = 0
    for n in split:
        plan = WatchPlan(system, tuple(cluster.endpoints), setup.watched, row.kind == "prefix", n, first,
                         start_rev + 1, end_value, deadline)
        p = ctx.Process(target=watcher_process, args=(plan, ready_q, out_q), daemon=True)
        p.start()
        procs.append(p)
        first += n
    try:
        why = await _wait_ready(ready_q, len(procs), t0 + READY_TIMEOUT)
        if why:
            return {"kind": "error", "system": system, "row": row.name, "error": why}
        ready_s = time.monotonic() - t0
        warm = await paced_puts(writer, setup.keys, value, rate=row.rate, count=warmup_puts,
                                max_seconds=warmup_puts / row.rate + 10)
        for pid in profile_pids:
            os.kill(pid, signal.SIGUSR1)  # start the node's cProfile (its loop handles the signal)
        c0 = proc_cpu_seconds(cluster.pids())
        res = await paced_puts(writer, setup.keys, value, rate=row.rate, count=count, max_seconds=write_limit)
        server_cores = (proc_cpu_seconds(cluster.pids()) - c0) / max(1e-9, res.ended - res.started)
        for pid in profile_pids:
            os.kill(pid, signal.SIGUSR1)  # stop it and write the stats
        for _attempt in range(5):  # the end marker: each watch stops when it sees it
            try:
                await writer.put(setup.end_key, end_value)
                break
            except Exception:
                await asyncio.sleep(1)
        results = await _collect(out_q, len(procs), deadline + 15)
    finally:
        await asyncio.to_thread(_stop, procs)
    errors = [r.error for r in results if r.error]
    watches = [(revs, times) for r in results for revs, times in zip(r.revisions, r.arrivals, strict=True)]
    t = tally(res.acks, watches, ignore=frozenset(warm.acks), sends=res.sends)
    # Watches of a process that never reported count as receiving nothing.
    unreported = row.watchers - len(watches)
    expected = t.expected + unreported * len(res.acks)
    cores = [r.cpu_s / r.wall_s for r in results if r.wall_s > 0]
    return {
        "kind": "point", "system": system, "row": row.name, "watch": row.kind, "watchers": row.watchers,
        "target_rate": row.rate, "puts": len(res.acks), "puts_per_s": res.rate, "write_errors": res.errors,
        "first_write_error": res.first_error, "expected": expected, "received": t.received,
        "missing": expected - t.received, "duplicates": t.duplicates, "unexpected": t.unexpected,
        "ended": sum(r.ended for r in results), "p50_ms": t.p50, "p99_ms": t.p99,
        "send_p50_ms": t.send_p50, "send_p99_ms": t.send_p99,
        "min_ms": t.latencies_ms[0] if t.latencies_ms else math.nan,
        "max_ms": t.latencies_ms[-1] if t.latencies_ms else math.nan,
        "watcher_procs": len(procs), "watcher_cores_max": max(cores, default=0.0), "watcher_cores_sum": sum(cores),
        "server_cores": server_cores, "ready_s": ready_s, "loadavg_1m": os.getloadavg()[0],
        "watch_resumes": sum(r.resumes for r in results), "by_node": _by_node(res.acks, results),
        "watcher_errors": errors[:3],
    }


async def run_system(cluster: BenchCluster, system: str, rows: Sequence[Row], rnd: int, args: argparse.Namespace,
                     out: Output) -> list[dict[str, Any]]:
    writer: RevisionWriter
    if isinstance(cluster, KvstoreCluster):
        writer = KvstoreWriter(cluster.endpoints)
    else:
        lead = cluster.leader()
        writer = EtcdWriter(cluster.endpoints[(lead or 1) - 1])
    biggest = max(range(len(rows)), key=lambda i: rows[i].watchers)
    points = []
    try:
        for i, row in enumerate(rows):
            prof = cluster.pids() if args.profile and system == "kvstore" and i == biggest else []
            p = await run_row(cluster, system, writer, row, i, seconds=args.seconds, warmup_puts=args.warmup_puts,
                              per_proc=args.watchers_per_proc, max_procs=args.max_procs, drain=args.drain,
                              profile_pids=prof)
            p["round"] = rnd
            out.emit(p)
            if p["kind"] == "point":
                points.append(p)
    finally:
        await writer.close()
    return points


def _profile_report(profile_dir: Path, top: int) -> str:
    parts = []
    for path in sorted(profile_dir.glob("n*.prof")):
        buf = io.StringIO()
        st = pstats.Stats(str(path), stream=buf)
        parts.append(f"== node {path.stem[1:]}: event-loop thread, total {st.total_tt:.2f} s "  # type: ignore[attr-defined]
                     f"in the window; by own time ==")
        st.sort_stats("tottime").print_stats(top)
        text = buf.getvalue()
        lines = text.splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
        parts.append("\n".join(lines[start:]).rstrip())
        buf = io.StringIO()
        st.stream = buf  # type: ignore[attr-defined]
        st.sort_stats("cumulative").print_stats(top)
        lines = buf.getvalue().splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
        parts.append(f"-- node {path.stem[1:]}, by cumulative time --\n" + "\n".join(lines[start:]).rstrip())
    return "\n\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.watch_latency", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--systems", default="kvstore,etcd", help="comma-separated: kvstore, etcd")
    ap.add_argument("--rows", default="key:1@20,prefix:1@20,prefix:1000@5",
                    help="comma-separated KIND:WATCHERS@RATE (KIND key or prefix; RATE puts/s)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured puts per row: RATE x SECONDS")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-puts", type=int, default=5, help="puts before the measured ones (not counted)")
    ap.add_argument("--watchers-per-proc", type=int, default=125,
                    help="watches per watcher process (a put's burst of events is read in sequence there)")
    ap.add_argument("--max-procs", type=int, default=8)
    ap.add_argument("--drain", type=float, default=30.0, help="seconds the watchers wait for the last events")
    ap.add_argument("--groups", type=int, default=3, help="kvstore data groups (serve --groups)")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--data-root", type=Path, default=None,
                    help="where the clusters' data go (a real disk; default: the temp dir, or /var/tmp)")
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile every kvstore node's event loop during the row with the most watchers")
    ap.add_argument("--profile-top", type=int, default=20)
    ap.add_argument("--from-jsonl", type=Path, default=None,
                    help="run nothing: summarize the points of an earlier run's watch.jsonl again")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or any(s not in SYSTEMS for s in args.systems):
        ap.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    try:
        args.rows = [Row.parse(s) for s in args.rows.split(",") if s.strip()]
    except ValueError as e:
        ap.error(str(e))
    if not args.rows:
        ap.error("--rows: at least one row")
    if not (0 < args.seconds <= 3600 and 1 <= args.rounds <= 100 and 0 <= args.warmup_puts <= 10_000
            and 1 <= args.watchers_per_proc <= 100_000 and 1 <= args.max_procs <= 64 and 0 < args.drain <= 600
            and 1 <= args.groups <= 64):
        ap.error("an option is out of range")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_jsonl is not None:
        recs = [json.loads(ln) for ln in args.from_jsonl.read_text().splitlines() if ln.startswith("{")]
        print(markdown(summarize([r for r in recs if r["kind"] == "point"], args.systems), args.systems))
        return 0

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwind: every cluster and watcher process is stopped

    signal.signal(signal.SIGTERM, on_term)
    data_root, fstype = _data_root(args.data_root)
    out = Output(args.out)
    meta = machine_info(data_root, fstype)
    meta.update(kind="meta", bench="watch", groups=args.groups, seconds=args.seconds,
                rows=[r.name for r in args.rows], loadavg=os.getloadavg())
    out.emit(meta)
    profile_dir = Path(tempfile.mkdtemp(prefix="kvbench-watch-prof-", dir=data_root)) if args.profile else None
    points: list[dict[str, Any]] = []
    status = 0
    try:
        for rnd in range(args.rounds):
            order = args.systems if rnd % 2 == 0 else list(reversed(args.systems))
            for system in order:
                try:
                    with _cluster(system, data_root, args.groups, args.keep_data, profile_dir) as cluster:
                        points += asyncio.run(run_system(cluster, system, args.rows, rnd, args, out))
                except ClusterError as e:
                    out.emit({"kind": "error", "system": system, "round": rnd, "error": str(e)})
                    status = 1
        summaries = summarize(points, args.systems)
        for s in summaries:
            out.emit(s)
        if len({(p["system"], p["row"], p["round"]) for p in points}) < args.rounds * len(args.systems) * len(args.rows):
            status = 1  # a row did not run (its error is a JSON line)
        table = markdown(summaries, args.systems)
        header = (
            f"Watch latency (`python -m bench.watch_latency`): {machine_line(meta)}; 3 nodes each on 127.0.0.1, "
            f"kvstore with --groups {args.groups}; {args.rounds} rounds, {args.seconds:g} s of puts per row; "
            f"latency = event arrival at the watcher process - put acknowledgement at the writer "
            f"(time.monotonic, one host); load average (1, 5, 15 min) at the start "
            f"{', '.join(f'{x:.1f}' for x in meta['loadavg'])}, at the end "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
        )
        body = header + "\n\n" + table + "\n"
        (args.out / "watch.md").write_text(body)
        print("\n" + body, flush=True)
        if profile_dir is not None and any(profile_dir.glob("n*.prof")):
            report = _profile_report(profile_dir, args.profile_top)
            (args.out / "watch-profile.txt").write_text(report)
            print(report, flush=True)
    except KeyboardInterrupt:
        status = 130
    finally:
        out.close()
        if profile_dir is not None:
            shutil.rmtree(profile_dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
