"""The load generator: N concurrent worker coroutines over one adapter, warm-up then a fixed window.

Every operation is timed with ``time.perf_counter_ns`` around the awaited call. An operation
counts (throughput and latency) if it completes while the window is open; errors are counted in
the window too. Server CPU is the sum of utime+stime of the server processes over the window
(/proc), the load generator's is this process's own (``getrusage``, all threads: the event loop
and gRPC's). Every loop is bounded by time and by a count of operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.kvbench.adapters import Adapter
from bench.kvbench.clusters import proc_cpu_seconds

WORKLOADS = ("put", "get", "mixed", "scan", "txn", "txnx")
"""txn: 2 compares and 2 puts on a pair of keys (for kvstore, two keys of one group); txnx: the
same on keys of two groups (kvstore: a two-phase commit; etcd: the same as txn)."""
SCAN_LIMIT = 100
KEY_SIZE = 16
VALUE_SIZE = 128
DEFAULT_KEYS = 10_000
DEFAULT_MAX_OPS = 10_000_000
#: After the window closes, operations still in flight get this long (beyond their own
#: timeout) before their workers are cancelled.
DRAIN_GRACE = 5.0


def make_keys(n: int) -> list[bytes]:
    """``n`` distinct keys of exactly 16 bytes, in key order: ``key/000000000042``."""
    if not 0 < n <= 10**12:
        raise ValueError("between 1 and 10**12 keys")
    return [b"key/%012d" % i for i in range(n)]


def make_value(seed: int = 0) -> bytes:
    """128 pseudo-random bytes (the same for every run with the same seed)."""
    return random.Random(seed).randbytes(VALUE_SIZE)


def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loadavg() -> float:
    """The machine's 1-minute load average (how busy the shared cores were: other work counts)."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in microseconds (0 if empty)."""
    if not sorted_ns:
        return 0.0
    rank = max(1, min(len(sorted_ns), -(-int(q * 1_000_000) * len(sorted_ns) // 1_000_000)))
    return sorted_ns[rank - 1] / 1000.0


@dataclass
class PointResult:
    system: str
    workload: str
    inflight: int
    rep: int
    duration_s: float
    ops: int
    ops_per_s: float
    errors: int
    p50_us: float
    p99_us: float
    p999_us: float
    mean_us: float
    max_us: float
    server_cpu_s: float
    server_cores: float
    loadgen_cpu_s: float
    loadgen_cores: float
    server_cpu_us_per_op: float
    loadgen_cpu_us_per_op: float
    warmup_s: float
    warmup_errors: int = 0
    error_sample: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = "point"
        return d


class _State:
    __slots__ = ("count", "errors", "lat", "measuring", "sample", "stop", "warm_errors")

    def __init__(self) -> None:
        self.lat: list[int] = []
        self.measuring = False
        self.stop = False
        self.count = 0
        self.errors = 0
        self.warm_errors = 0
        self.sample = ""


async def run_point(
    adapter: Adapter,
    *,
    workload: str,
    inflight: int,
    warmup: float,
    duration: float,
    keys: Sequence[bytes],
    value: bytes,
    server_pids: Sequence[int],
    rep: int = 0,
    seed: int = 0,
    max_ops: int = DEFAULT_MAX_OPS,
    op_timeout: float = 10.0,
) -> PointResult:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}")
    if inflight < 1 or duration <= 0 or warmup < 0:
        raise ValueError("inflight >= 1, duration > 0, warmup >= 0")
    st = _State()
    done = asyncio.Event()
    nkeys = len(keys)
    perf = time.perf_counter_ns

    pairs = await adapter.pairs(keys, cross=workload == "txnx") if workload in ("txn", "txnx") else []
    if workload in ("txn", "txnx") and not pairs:
        raise ValueError(f"the {workload} workload needs pairs of keys (in one group, or in two for txnx)")

    async def worker(wid: int) -> None:
        rng = random.Random(seed * 1_000_003 + wid)
        pick = rng.randrange
        put, get, scan, txn2 = adapter.put, adapter.get, adapter.scan, adapter.txn2
        while not st.stop:
            key = keys[pick(nkeys)]
            kind = workload
            if kind == "mixed":
                kind = "put" if rng.random() < 0.5 else "get"
            t0 = perf()
            try:
                if kind == "put":
                    await put(key, value)
                elif kind == "get":
                    if await get(key) is None:
                        raise LookupError(f"{key!r} not found")
                elif kind in ("txn", "txnx"):
                    k1, k2 = pairs[pick(len(pairs))]
                    await txn2(k1, k2, value)
                else:
                    await scan(key, SCAN_LIMIT)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if st.measuring:
                    st.errors += 1
                    if not st.sample:
                        st.sample = f"{type(err).__name__}: {err}"[:300]
                elif not st.stop:
                    st.warm_errors += 1
                await asyncio.sleep(0.001)  # a failing system must not turn this into a spin
                continue
            t1 = perf()
            if st.measuring:
                st.lat.append(t1 - t0)
            st.count += 1
            if st.count >= max_ops:
                st.stop = True
                done.set()

    tasks = [asyncio.ensure_future(worker(i)) for i in range(inflight)]
    try:
        if warmup > 0:
            await asyncio.sleep(warmup)
        pids = list(server_pids)
        s0, c0, t0 = proc_cpu_seconds(pids), cpu_self(), time.perf_counter()
        st.measuring = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), duration)
        st.measuring = False
        s1, c1, t1 = proc_cpu_seconds(pids), cpu_self(), time.perf_counter()
        st.stop = True
        await asyncio.wait(tasks, timeout=op_timeout + DRAIN_GRACE)
    finally:
        st.stop = True
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = t1 - t0
    lat = sorted(st.lat)
    n = len(lat)
    server_cpu, loadgen_cpu = s1 - s0, c1 - c0
    return PointResult(
        system=adapter.system,
        workload=workload,
        inflight=inflight,
        rep=rep,
        duration_s=round(elapsed, 4),
        ops=n,
        ops_per_s=round(n / elapsed, 1),
        errors=st.errors,
        p50_us=percentile(lat, 0.50),
        p99_us=percentile(lat, 0.99),
        p999_us=percentile(lat, 0.999),
        mean_us=round(sum(lat) / n / 1000.0, 1) if n else 0.0,
        max_us=lat[-1] / 1000.0 if n else 0.0,
        server_cpu_s=round(server_cpu, 3),
        server_cores=round(server_cpu / elapsed, 3),
        loadgen_cpu_s=round(loadgen_cpu, 3),
        loadgen_cores=round(loadgen_cpu / elapsed, 3),
        server_cpu_us_per_op=round(server_cpu * 1e6 / n, 1) if n else 0.0,
        loadgen_cpu_us_per_op=round(loadgen_cpu * 1e6 / n, 1) if n else 0.0,
        warmup_s=warmup,
        warmup_errors=st.warm_errors,
        error_sample=st.sample,
        extra={"loadavg_1m": loadavg()},
    )


async def preload(
    adapter: Adapter, keys: Sequence[bytes], value: bytes, *, inflight: int = 64, timeout: float = 600.0
) -> float:
    """Put every key once (``inflight`` at a time); returns puts/s. Bounded by ``timeout``:
    raises TimeoutError if not done by then, and by the number of keys (each key once)."""
    it = iter(keys)
    t0 = time.perf_counter()

    async def worker() -> None:
        for k in it:
            for attempt in range(3):  # a transient error (e.g. a leader change) is retried twice
                try:
                    await adapter.put(k, value)
                    break
                except Exception:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(inflight, max(1, len(keys))))]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()  # re-raise a worker's error
        if pending:
            raise TimeoutError(f"loading {len(keys)} keys took longer than {timeout:g} s")
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return len(keys) / (time.perf_counter() - t0)
