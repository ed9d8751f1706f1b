"""kvstore side by side with etcd 3.4: 3-node clusters on 127.0.0.1, data on disk, fsync on.

    python -m bench.compare run --systems kvstore,etcd --workloads put,get,mixed,scan \\
        --inflight 1,16,64,256 --duration 10 --warmup 2 --reps 3 --out results/
    python -m bench.compare failover --reps 10
    python -m bench.compare restart --keys 1000000
    python -m bench.compare profile --inflight 64 --duration 10 --native   # py-spy on the kvstore leader
    python -m bench.compare groups --groups 1,4,8          # needs `kvstore serve --groups N`
    python -m bench.compare idle-cpu --groups 1000         # needs `kvstore serve --groups N`

One system runs at a time; repetitions alternate the order of the systems; each (system, rep)
gets a fresh cluster in a fresh temporary directory. Every result is a JSON line (stdout and
OUT/*.jsonl); the summary is a markdown table (stdout and OUT/*.md); `run` also draws OUT/plot.png
when matplotlib is installed (`pip install -e '.[bench]'`). See bench/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from bench.kvbench import profile as prof
from bench.kvbench import report
from bench.kvbench.adapters import Adapter, make_adapter
from bench.kvbench.clusters import (
    SYSTEMS,
    BenchCluster,
    ClusterError,
    KvstoreCluster,
    check_real_disk,
    free_ports,
    make_cluster,
    proc_cpu_seconds,
)
from bench.kvbench.load import (
    DEFAULT_KEYS,
    DEFAULT_MAX_OPS,
    WORKLOADS,
    PointResult,
    make_keys,
    make_value,
    preload,
    run_point,
)

T = TypeVar("T")


def _install_event_loop() -> str:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _csv(kind: Callable[[str], T]) -> Callable[[click.Context, click.Parameter, str], list[T]]:
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list[T]:
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError as err:
            raise click.BadParameter(str(err)) from err

    return parse


def _systems(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    bad = [s for s in out if s not in SYSTEMS]
    if bad or not out:
        raise click.BadParameter(f"choose from {', '.join(SYSTEMS)}")
    return out


def _workloads(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    bad = [w for w in out if w not in WORKLOADS]
    if bad or not out:
        raise click.BadParameter(f"choose from {', '.join(WORKLOADS)}")
    return out


class Output:
    """JSON lines to stdout and to OUT/NAME.jsonl; tables to stdout and OUT/NAME.md."""

    def __init__(self, out: Path, name: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.dir = out
        self.name = name
        self.jsonl_path = out / f"{name}.jsonl"
        self._f: TextIO = open(self.jsonl_path, "w")  # noqa: SIM115 - closed in close()

    def emit(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, sort_keys=False)
        print(line, flush=True)
        self._f.write(line + "\n")
        self._f.flush()

    def say(self, text: str) -> None:
        print(text, flush=True)

    def table(self, text: str, header: str = "", suffix: str = "") -> Path:
        path = self.dir / f"{self.name}{suffix}.md"
        body = (header + "\n\n" if header else "") + text + "\n"
        path.write_text(body)
        print("\n" + body, flush=True)
        return path

    def close(self) -> None:
        self._f.close()


def _data_root(data_root: Path | None) -> tuple[Path, str]:
    root = data_root or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    try:
        fstype = check_real_disk(root)
    except ClusterError:
        if data_root is not None:
            raise
        root = Path("/var/tmp")  # the default temp dir is in memory here: use the disk
        fstype = check_real_disk(root)
    return root, fstype


@contextlib.contextmanager
def _cluster(
    system: str, data_root: Path, kvstore_args: Sequence[str], etcd_args: Sequence[str], keep: bool
) -> Iterator[BenchCluster]:
    """A started cluster in a fresh directory; stopped (by PID) and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"kvbench-{system}-", dir=data_root))
    cluster = make_cluster(system, root, kvstore_args=kvstore_args, etcd_args=etcd_args)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _leader_address(cluster: BenchCluster) -> str | None:
    lead = cluster.leader()
    return cluster.endpoints[lead - 1] if lead is not None else None


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every cluster started is stopped by the finally blocks."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


_common = [
    click.option("--systems", default="kvstore,etcd", show_default=True, callback=_systems,
                 help="Comma-separated: kvstore, etcd, kvstore-tls, etcd-tls (-tls: mutual TLS on), etcd-api "
                      "(kvstore driven through its etcd API by etcd's client)."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
                 show_default=True, help="Directory for the JSON lines, tables and plot."),
    click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Where the clusters' temporary data directories go (must be a real disk; "
                      "default: the system temp dir, or /var/tmp if that is tmpfs)."),
    click.option("--kvstore-arg", "kvstore_args", multiple=True,
                 help="Extra argument appended to every `kvstore serve` command line, e.g. "
                      "--kvstore-arg=--groups=4 (repeatable)."),
    click.option("--etcd-arg", "etcd_args", multiple=True,
                 help="Extra argument appended to every etcd command line (repeatable)."),
    click.option("--keep-data", is_flag=True, help="Keep the clusters' data directories and logs."),
]


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """kvstore vs etcd 3.4 on this machine (3 nodes each on 127.0.0.1, fsync on)."""
    _install_event_loop()
    _sigterm_as_interrupt()


# ----- run ---------------------------------------------------------------------------------------


async def _run_system(
    cluster: BenchCluster, *, leader: str | None, workloads: Sequence[str], inflights: Sequence[int],
    warmup: float, duration: float, keys: Sequence[bytes], value: bytes, rep: int, seed: int,
    max_ops: int, op_timeout: float, emit: Callable[[dict[str, Any]], None],
) -> list[PointResult]:
    adapter = make_adapter(cluster.system, cluster.endpoints, leader=leader, timeout=op_timeout, certs=cluster.certs)
    results = []
    try:
        rate = await preload(adapter, keys, value, inflight=64, timeout=600)
        emit({"kind": "preload", "system": cluster.system, "rep": rep, "keys": len(keys),
              "ops_per_s": round(rate, 1)})
        for w in workloads:
            for i in inflights:
                r = await run_point(
                    adapter, workload=w, inflight=i, warmup=warmup, duration=duration, keys=keys,
                    value=value, server_pids=cluster.pids(), rep=rep, seed=seed + rep, max_ops=max_ops,
                    op_timeout=op_timeout,
                )
                emit(r.to_json())
                results.append(r)
    finally:
        await adapter.close()
    return results


@cli.command()
@common
@click.option("--workloads", default="put,get,mixed,scan", show_default=True, callback=_workloads)
@click.option("--inflight", "inflights", default="1,16,64,256", show_default=True, callback=_csv(int),
              help="Operations in flight (concurrent workers), comma-separated.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Measured seconds per point.")
@click.option("--warmup", type=float, default=2.0, show_default=True, help="Unmeasured seconds before each point.")
@click.option("--reps", type=int, default=3, show_default=True, help="Repetitions (fresh clusters each).")
@click.option("--keys", "nkeys", type=int, default=DEFAULT_KEYS, show_default=True,
              help="Distinct 16-byte keys (all loaded before the points).")
@click.option("--max-ops", type=int, default=DEFAULT_MAX_OPS, show_default=True,
              help="Upper bound of operations per point.")
@click.option("--op-timeout", type=float, default=10.0, show_default=True, help="Deadline of one operation.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--no-plot", is_flag=True, help="Skip the plot even if matplotlib is installed.")
@click.option("--tls", is_flag=True,
              help="Also run each system with mutual TLS on (kvstore-tls, etcd-tls): ratios TLS vs TLS "
                   "and kvstore-tls/kvstore (the cost of TLS, A/B in the same run).")
def run(
    systems: list[str], out: Path, data_root: Path | None, kvstore_args: tuple[str, ...],
    etcd_args: tuple[str, ...], keep_data: bool, workloads: list[str], inflights: list[int], duration: float,
    warmup: float, reps: int, nkeys: int, max_ops: int, op_timeout: float, seed: int, no_plot: bool, tls: bool,
) -> None:
    """Throughput, latency and CPU for each workload x in-flight point, per system and rep."""
    if reps < 1 or nkeys < 1 or not inflights or min(inflights) < 1:
        raise click.UsageError("--reps, --keys and every --inflight must be >= 1")
    if tls:
        systems = list(dict.fromkeys([*systems, *(s if s.endswith("-tls") else f"{s}-tls" for s in systems
                                                   if s != "etcd-api")]))
    root, fstype = _data_root(data_root)
    o = Output(out, "run")
    meta = report.machine_info(root, fstype)
    meta.update(systems=systems, workloads=workloads, inflight=inflights, duration=duration, warmup=warmup,
                reps=reps, keys=nkeys, key_size=16, value_size=128, kvstore_args=list(kvstore_args),
                etcd_args=list(etcd_args))
    o.emit(meta)
    o.say(report.competition_note(meta["cores"]))
    keys, value = make_keys(nkeys), make_value(seed)
    points: list[dict[str, Any]] = []
    failures = 0
    try:
        for rep in range(reps):
            order = systems if rep % 2 == 0 else list(reversed(systems))
            for system in order:
                try:
                    with _cluster(system, root, kvstore_args, etcd_args, keep_data) as cluster:
                        leader = _leader_address(cluster)
                        res = _run(_run_system(
                            cluster, leader=leader, workloads=workloads, inflights=inflights, warmup=warmup,
                            duration=duration, keys=keys, value=value, rep=rep, seed=seed, max_ops=max_ops,
                            op_timeout=op_timeout, emit=o.emit,
                        ))
                        points.extend(r.to_json() for r in res)
                except (ClusterError, TimeoutError, OSError) as err:
                    failures += 1
                    o.emit({"kind": "error", "system": system, "rep": rep, "error": str(err)[-2000:]})
        summary = report.summarize(points, systems)
        for row in summary:
            o.emit(row)
        header = (
            f"kvstore vs etcd: 3 nodes each on 127.0.0.1, fsync on, {nkeys:,} keys of 16 B, values of 128 B; "
            f"{duration:g} s per point after {warmup:g} s warm-up; median of {reps} rep(s); ratios rep by rep.\n"
            f"Machine: {report.machine_line(meta)}\n{report.competition_note(meta['cores'])}"
        )
        o.table(report.markdown_table(summary), header)
        if any(s.endswith("-tls") or s == "etcd-api" for s in systems):
            o.table(report.ratio_table(summary, systems), "Every system and every ratio (a/b, rep by rep):",
                    suffix="-ratios")
        if not no_plot and summary:
            title = (f"kvstore vs etcd {meta['etcd']}: 3 nodes on loopback, fsync on; "
                     f"median of {reps} rep(s), {duration:g} s/point; {meta['cores']} shared cores")
            path = report.plot(summary, systems, out / "plot.png", title)
            o.say(f"plot: {path}" if path else "plot: skipped (matplotlib not installed: pip install -e '.[bench]')")
    finally:
        o.close()
    if failures:
        raise SystemExit(1)


# ----- failover ----------------------------------------------------------------------------------


def _wait_healthy(cluster: BenchCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.healthy():
            return
        time.sleep(0.1)
    raise ClusterError(f"{cluster.system} cluster not healthy within {timeout:g} s\n{cluster.logs()}")


async def probe_until_ack(
    adapter: Adapter, key: bytes, value: bytes, *, timeout: float, interval: float
) -> tuple[float, int]:
    """Start a put probe every ``interval`` seconds (each bounded by what is left of ``timeout``)
    until one is acknowledged: (seconds to that ack, probes started). Overlapping probes make the
    figure the cluster's recovery time, not one client's retry timer. Bounded by time and by
    ``timeout / interval`` probes."""
    t0 = time.perf_counter()
    tasks: set[asyncio.Future[None]] = set()
    probes = 0
    try:
        while probes < int(timeout / interval) + 1:
            left = timeout - (time.perf_counter() - t0)
            if left <= 0:
                break
            tasks.add(asyncio.ensure_future(adapter.probe_put(key + b"/%d" % probes, value, probes, left)))
            probes += 1
            done, _ = await asyncio.wait(tasks, timeout=min(interval, left), return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                tasks.discard(t)
                if not t.cancelled() and t.exception() is None:
                    return time.perf_counter() - t0, probes
        raise TimeoutError(f"no write acknowledged within {timeout:g} s")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _failover(
    cluster: BenchCluster, reps: int, timeout: float, settle: float, interval: float,
    emit: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    value = make_value()
    out = []
    adapter: Adapter = make_adapter(cluster.system, cluster.endpoints, timeout=timeout, certs=cluster.certs)
    try:
        for i in range(reps):
            await asyncio.to_thread(_wait_healthy, cluster, 120)
            await asyncio.sleep(settle)
            lead = await asyncio.to_thread(cluster.leader)
            if lead is None:
                raise ClusterError("no leader")
            adapter.prefer(cluster.endpoints[lead - 1])
            await adapter.put_until_ack(b"failover/warm", value, 30)  # the client knows the leader
            t0 = time.perf_counter()
            cluster.kill9(lead)
            killed = time.perf_counter() - t0
            _, probes = await probe_until_ack(
                adapter, b"failover/%04d" % i, value, timeout=timeout, interval=interval
            )
            dt = time.perf_counter() - t0
            rec = {"kind": "failover", "system": cluster.system, "rep": i, "killed": lead,
                   "seconds": round(dt, 4), "kill_s": round(killed, 4), "probes": probes}
            emit(rec)
            out.append(rec)
            cluster.restart(lead)
    finally:
        await adapter.close()
    return out


@cli.command()
@common
@click.option("--reps", type=int, default=10, show_default=True, help="Leader kills per system.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Give up on one failover after this.")
@click.option("--settle", type=float, default=1.0, show_default=True,
              help="Seconds to wait once the cluster is healthy again before the next kill.")
@click.option("--probe-interval", type=float, default=0.1, show_default=True,
              help="A new put probe starts this often until one is acknowledged.")
def failover(
    systems: list[str], out: Path, data_root: Path | None, kvstore_args: tuple[str, ...],
    etcd_args: tuple[str, ...], keep_data: bool, reps: int, timeout: float, settle: float, probe_interval: float,
) -> None:
    """Time from kill -9 of the leader to the next acknowledged write (the killed node is
    restarted and the cluster healthy again between kills). Right after the kill, a put probe
    starts every --probe-interval s (kvstore: through the client library, which retries and
    finds the new leader; etcd: one Put per probe, rotating over the members from the old
    leader); the first acknowledgement stops the clock."""
    root, fstype = _data_root(data_root)
    o = Output(out, "failover")
    meta = report.machine_info(root, fstype)
    o.emit(meta)
    records: list[dict[str, Any]] = []
    failures = 0
    try:
        for system in systems:
            try:
                with _cluster(system, root, kvstore_args, etcd_args, keep_data) as cluster:
                    records += _run(_failover(cluster, reps, timeout, settle, probe_interval, o.emit))
            except (ClusterError, TimeoutError, OSError) as err:
                failures += 1
                o.emit({"kind": "error", "system": system, "error": str(err)[-2000:]})
        for s in systems:
            xs = [r["seconds"] for r in records if r["system"] == s]
            if xs:
                o.emit({"kind": "failover_summary", "system": s, "n": len(xs), "median_s": statistics.median(xs),
                        "min_s": min(xs), "max_s": max(xs)})
        o.table(report.failover_table(records, systems),
                f"Leader kill -9 to the next acknowledged write (a put probe every {probe_interval:g} s), "
                f"default settings. Machine: {report.machine_line(meta)}")
    finally:
        o.close()
    if failures:
        raise SystemExit(1)


# ----- restart -----------------------------------------------------------------------------------


async def _load(cluster: BenchCluster, keys: Sequence[bytes], value: bytes, inflight: int, timeout: float) -> float:
    adapter = make_adapter(cluster.system, cluster.endpoints, leader=_leader_address(cluster), timeout=30, certs=cluster.certs)
    try:
        return await preload(adapter, keys, value, inflight=inflight, timeout=timeout)
    finally:
        await adapter.close()


async def _first_read(cluster: BenchCluster, key: bytes, value: bytes, timeout: float) -> float:
    """Seconds until a linearizable read of ``key`` returns ``value`` (any member will do)."""
    t0 = time.perf_counter()
    adapter = make_adapter(cluster.system, cluster.endpoints, timeout=2.0, certs=cluster.certs)
    try:
        i = 0
        while time.perf_counter() - t0 < timeout:
            try:
                got = await adapter.get(key)
                if got == value:
                    return time.perf_counter() - t0
                raise ClusterError(f"{key!r} read back as {got!r:.40}")
            except ClusterError:
                raise
            except Exception:
                i += 1
                adapter.prefer(cluster.endpoints[i % len(cluster.endpoints)])
                await asyncio.sleep(0.02)
        raise TimeoutError(f"no linearizable read within {timeout:g} s")
    finally:
        await adapter.close()


@cli.command()
@common
@click.option("--keys", "nkeys", type=int, default=1_000_000, show_default=True)
@click.option("--inflight", type=int, default=256, show_default=True, help="Puts in flight while loading.")
@click.option("--load-timeout", type=float, default=3600.0, show_default=True)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Bound of the restart wait.")
def restart(
    systems: list[str], out: Path, data_root: Path | None, kvstore_args: tuple[str, ...],
    etcd_args: tuple[str, ...], keep_data: bool, nkeys: int, inflight: int, load_timeout: float, timeout: float,
) -> None:
    """Load N keys, stop all 3 nodes (SIGTERM), start them again: seconds from starting the
    processes to the first linearizable read of the last key loaded."""
    root, fstype = _data_root(data_root)
    o = Output(out, "restart")
    meta = report.machine_info(root, fstype)
    o.emit(meta)
    keys, value = make_keys(nkeys), make_value()
    records: list[dict[str, Any]] = []
    try:
        for system in systems:
            rec: dict[str, Any] = {"kind": "restart", "system": system, "keys": nkeys}
            try:
                with _cluster(system, root, kvstore_args, etcd_args, keep_data) as cluster:
                    rate = _run(_load(cluster, keys, value, inflight, load_timeout))
                    rec["load_ops_per_s"] = round(rate, 1)
                    cluster.stop()
                    rec["disk_mib"] = round(report.dir_size_mib(cluster.root), 1)
                    cluster.start_all()
                    rec["restart_s"] = round(_run(_first_read(cluster, keys[-1], value, timeout)), 3)
            except (ClusterError, TimeoutError, OSError) as err:
                rec["error"] = str(err)[-2000:]
            o.emit(rec)
            records.append(rec)
        o.table(report.restart_table(records), f"Restart of 3 stopped nodes. Machine: {report.machine_line(meta)}")
    finally:
        o.close()
    if any("error" in r for r in records):
        raise SystemExit(1)


# ----- multi-raft hooks ----------------------------------------------------------------------------


@cli.command()
@common
@click.option("--groups", "group_counts", default="1,4,8", show_default=True, callback=_csv(int),
              help="Raft group counts: one kvstore run per value, with --groups=N on every serve.")
@click.option("--inflight", "inflights", default="64", show_default=True, callback=_csv(int))
@click.option("--duration", type=float, default=10.0, show_default=True)
@click.option("--warmup", type=float, default=2.0, show_default=True)
@click.option("--keys", "nkeys", type=int, default=DEFAULT_KEYS, show_default=True)
@click.option("--op-timeout", type=float, default=10.0, show_default=True)
def groups(
    systems: list[str], out: Path, data_root: Path | None, kvstore_args: tuple[str, ...],
    etcd_args: tuple[str, ...], keep_data: bool, group_counts: list[int], inflights: list[int], duration: float,
    warmup: float, nkeys: int, op_timeout: float,
) -> None:
    """kvstore put throughput with 1, 4, 8... Raft groups (`kvstore serve --groups N`, multi-raft).

    kvstore only (--systems is ignored). Fails until `serve` has the --groups flag."""
    root, fstype = _data_root(data_root)
    o = Output(out, "groups")
    o.emit(report.machine_info(root, fstype))
    keys, value = make_keys(nkeys), make_value()
    records: list[dict[str, Any]] = []
    try:
        for n in group_counts:
            args = [*kvstore_args, f"--groups={n}"]
            try:
                with _cluster("kvstore", root, args, etcd_args, keep_data) as cluster:
                    res = _run(_run_system(
                        cluster, leader=None, workloads=["put"], inflights=inflights, warmup=warmup,
                        duration=duration, keys=keys, value=value, rep=0, seed=1, max_ops=DEFAULT_MAX_OPS,
                        op_timeout=op_timeout, emit=lambda d: None,
                    ))
                    for r in res:
                        r.extra["groups"] = n
                        o.emit(r.to_json())
                        records.append(r.to_json())
            except (ClusterError, TimeoutError, OSError) as err:
                rec = {"kind": "error", "system": "kvstore", "groups": n, "error": str(err)[-2000:]}
                o.emit(rec)
                records.append(rec)
        o.table(report.groups_table(records), "kvstore put throughput by number of Raft groups")
    finally:
        o.close()
    if any(r.get("kind") == "error" for r in records):
        raise SystemExit(1)


@cli.command("idle-cpu")
@common
@click.option("--groups", "ngroups", type=int, default=1000, show_default=True,
              help="Raft groups per node (--groups=N on every serve); 0: do not pass the flag.")
@click.option("--settle", type=float, default=10.0, show_default=True, help="Seconds after start before measuring.")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Measured seconds.")
def idle_cpu(
    systems: list[str], out: Path, data_root: Path | None, kvstore_args: tuple[str, ...],
    etcd_args: tuple[str, ...], keep_data: bool, ngroups: int, settle: float, duration: float,
) -> None:
    """CPU of each node of an idle cluster hosting N Raft groups (and of etcd, for reference,
    if --systems names it). Needs `kvstore serve --groups N` for N > 0."""
    root, fstype = _data_root(data_root)
    o = Output(out, "idle-cpu")
    o.emit(report.machine_info(root, fstype))
    lines = ["| system | groups | CPU per node (cores) | total (cores) |", "|---|---|---|---|"]
    failed = False
    try:
        for system in systems:
            args = [*kvstore_args, f"--groups={ngroups}"] if system == "kvstore" and ngroups > 0 else kvstore_args
            try:
                with _cluster(system, root, args, etcd_args, keep_data) as cluster:
                    time.sleep(settle)
                    pids = cluster.pids()
                    before = [proc_cpu_seconds([p]) for p in pids]
                    t0 = time.perf_counter()
                    time.sleep(duration)
                    after = [proc_cpu_seconds([p]) for p in pids]
                    el = time.perf_counter() - t0
                    per = [round((b - a) / el, 4) for a, b in zip(before, after, strict=True)]
                    shown = "-" if system != "kvstore" else str(ngroups) if ngroups > 0 else "default (no flag)"
                    rec = {"kind": "idle_cpu", "system": system, "groups": ngroups if system == "kvstore" else None,
                           "per_node_cores": per, "total_cores": round(sum(per), 4), "seconds": round(el, 2)}
                    o.emit(rec)
                    lines.append(f"| {system} | {shown} "
                                 f"| {', '.join(f'{x:.3f}' for x in per)} | {sum(per):.3f} |")
            except (ClusterError, TimeoutError, OSError) as err:
                failed = True
                o.emit({"kind": "error", "system": system, "groups": ngroups, "error": str(err)[-2000:]})
                lines.append(f"| {system} | {ngroups} | failed: {report.one_line(str(err))} | - |")
        o.table("\n".join(lines), "CPU of idle nodes")
    finally:
        o.close()
    if failed:
        raise SystemExit(1)


# ----- profile -----------------------------------------------------------------------------------


def _pyspy_binary(given: str | None) -> str:
    if given:
        return given
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if not found:
        raise click.UsageError("py-spy not found: pip install -e '.[bench]' (or --py-spy PATH)")
    return found


async def _pyspy(cmd: list[str], timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return "py-spy timed out"
    return "" if proc.returncode == 0 else err.decode(errors="replace")[-2000:]


async def _profile(
    cluster: KvstoreCluster, metrics: dict[int, str], *, pyspy: str, out: Path, inflight: int, warmup: float,
    duration: float, rate: int, native: bool, keys: Sequence[bytes], value: bytes,
) -> dict[str, Any]:
    adapter = make_adapter("kvstore", cluster.endpoints, timeout=10)
    try:
        await preload(adapter, keys, value, inflight=64, timeout=600)
        # Right after start the leader balancer may hand the group to its preferred leader:
        # profile the node that leads once leadership stays put.
        lead = await _settled_leader(cluster)
        node = cluster.nodes[lead]
        assert node.proc is not None
        pid = node.proc.pid
        window = 2 * duration + 4
        load = asyncio.ensure_future(run_point(
            adapter, workload="put", inflight=inflight, warmup=warmup, duration=window, keys=keys, value=value,
            server_pids=cluster.pids(),
        ))
        await asyncio.sleep(warmup + 1)
        base = [pyspy, "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", str(rate),
                "--format", "raw", "--threads"] + (["--native"] if native else [])
        for _attempt in range(3):
            # (A py-spy started while the load generator's gRPC threads are busy sometimes exits
            # at once without recording: try again.)
            (out / "profile-cpu.txt").unlink(missing_ok=True)
            m0 = await asyncio.to_thread(prof.scrape, metrics[lead])
            c0, t0 = prof.thread_cpu(pid), time.perf_counter()
            err_cpu = await _pyspy([*base, "-o", str(out / "profile-cpu.txt")], duration + 60)
            m1 = await asyncio.to_thread(prof.scrape, metrics[lead])
            c1, t1 = prof.thread_cpu(pid), time.perf_counter()
            if err_cpu or ((out / "profile-cpu.txt").exists() and t1 - t0 >= duration / 2):
                break
        (out / "profile-gil.txt").unlink(missing_ok=True)
        err_wall = await _pyspy([*base, "--gil", "-o", str(out / "profile-gil.txt")], duration + 60)
        result = await load
    finally:
        await adapter.close()
    return {
        "leader": lead, "pid": pid, "load": result.to_json(), "seconds": t1 - t0,
        "metrics": prof.metrics_delta(m0, m1, t1 - t0),
        "threads": prof.thread_cpu_delta(c0, c1, pid),
        "pyspy_errors": [e for e in (err_cpu, err_wall) if e],
    }


async def _settled_leader(cluster: KvstoreCluster, timeout: float = 30.0) -> int:
    """The data group's leader once two looks 1.5 s apart agree."""
    deadline = time.monotonic() + timeout
    lead = await asyncio.to_thread(cluster.leader)
    while True:
        await asyncio.sleep(1.5)
        again = await asyncio.to_thread(cluster.leader)
        if again is not None and again == lead:
            return again
        if time.monotonic() > deadline:
            raise ClusterError(f"no settled leader within {timeout:g} s")
        lead = again


def _profile_report(res: dict[str, Any], out: Path, inflight: int) -> str:
    cpu = prof.read_raw(out / "profile-cpu.txt")
    gil = prof.read_raw(out / "profile-gil.txt")
    ld = res["load"]
    m = res["metrics"]
    secs = res["seconds"]
    parts = [
        f"Leader (node {res['leader']}, pid {res['pid']}) under `put` at {inflight} in flight: whole run "
        f"{ld['ops_per_s']:,.0f} puts/s, p50 {ld['p50_us'] / 1000:.1f} ms, p99 {ld['p99_us'] / 1000:.1f} ms "
        f"(py-spy pauses the process to sample, which slows it somewhat).",
        "",
        "Node metrics over the on-CPU recording window:",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:,.3f} |" for k, v in m.items()),
        "",
        "CPU by thread of the leader process (/proc/PID/task, same window):",
        "",
        prof.thread_table(res["threads"], secs),
    ]
    for stacks, what in (
        (cpu, "on-CPU samples (py-spy's idle filter; with --native, C frames too)"),
        (prof.busy(cpu), "of those not waiting for work (epoll/poll waits and the idle persist worker removed)"),
        (gil, "samples holding the GIL (py-spy --gil: the Python work, which one core at most can do)"),
    ):
        if not stacks:
            continue
        total = sum(stacks.values())
        parts += [
            "",
            f"{total} {what}, by category (first match from the innermost frame outwards):",
            "",
            prof.pct_table(prof.categorize(stacks), total, "category"),
            "",
            "Top self time (innermost frame):",
            "",
            prof.pct_table(prof.self_time(stacks), total, "function (file:line)", limit=30),
            "",
            "By thread:",
            "",
            prof.pct_table(prof.by_thread(stacks), total, "thread"),
        ]
    if res["pyspy_errors"]:
        parts += ["", "py-spy reported: " + " / ".join(e.strip().splitlines()[-1] for e in res["pyspy_errors"])]
    return "\n".join(parts)


@cli.command("profile")
@common
@click.option("--inflight", type=int, default=64, show_default=True)
@click.option("--warmup", type=float, default=3.0, show_default=True)
@click.option("--duration", type=float, default=10.0, show_default=True,
              help="Seconds of each of the two py-spy recordings (on-CPU, then GIL-holding).")
@click.option("--rate", type=int, default=100, show_default=True, help="py-spy samples per second.")
@click.option("--native", is_flag=True, help="py-spy --native (C frames of gRPC, LMDB, ...).")
@click.option("--py-spy", "pyspy", default=None, help="The py-spy binary (default: beside this python, or PATH).")
@click.option("--keys", "nkeys", type=int, default=DEFAULT_KEYS, show_default=True)
def profile_cmd(
    systems: list[str], out: Path, data_root: Path | None, kvstore_args: tuple[str, ...],
    etcd_args: tuple[str, ...], keep_data: bool, inflight: int, warmup: float, duration: float, rate: int,
    native: bool, pyspy: str | None, nkeys: int,
) -> None:
    """Profile the kvstore leader under put load: py-spy twice (on-CPU, then only samples holding
    the GIL), CPU and run-queue wait per thread from /proc, and the node's metrics. Writes
    OUT/profile-cpu.txt and OUT/profile-gil.txt (py-spy raw / collapsed stacks, which speedscope
    opens) and OUT/profile.md. kvstore only."""
    binary = _pyspy_binary(pyspy)
    root, _ = _data_root(data_root)
    o = Output(out, "profile")
    keys, value = make_keys(nkeys), make_value()
    dirpath = Path(tempfile.mkdtemp(prefix="kvbench-profile-", dir=root))
    cluster = KvstoreCluster(dirpath, kvstore_args)
    ports = free_ports(len(cluster.nodes))
    metrics = {}
    for (nid, node), port in zip(sorted(cluster.nodes.items()), ports, strict=True):
        metrics[nid] = f"127.0.0.1:{port}"
        node.args += ["--metrics-listen", metrics[nid]]
    try:
        cluster.start()
        res = _run(_profile(cluster, metrics, pyspy=binary, out=out, inflight=inflight, warmup=warmup,
                            duration=duration, rate=rate, native=native, keys=keys, value=value))
        o.emit({"kind": "profile", **{k: v for k, v in res.items() if k != "load"}})
        o.emit(res["load"])
        o.table(_profile_report(res, out, inflight), "kvstore leader profile under put load")
    finally:
        cluster.stop()
        o.close()
        if not keep_data:
            shutil.rmtree(dirpath, ignore_errors=True)


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        print("interrupted; clusters stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
