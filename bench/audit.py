"""The audit log's costs, printed as numbers (no assertion about speed):

- `record`: microseconds per event on the calling thread (the event loop's cost per audited call);
- `writer`: lines per second the writer thread seals (HMAC) and appends, with the head recorded in
  a real LMDB store (sync on) every `--sync-lines` lines;
- `verify`: lines per second `verify` checks;
- `puts`: puts per second of a one-node `kvstore serve` at `--inflight` operations in flight,
  without an audit log and with `--audit-log --audit-writes`, alternated `--reps` times (A/B in
  the same run); bounded by `--puts` per measurement.

    python -m bench.audit [--events 100000] [--puts 20000] [--inflight 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvstore.security.audit import AuditLog, AuditSettings, verify
from kvstore.storage.store import LmdbNodeStore

KEY = bytes(range(32))


def bench_log(root: Path, events: int, sync_lines: int) -> dict[str, float]:
    store = LmdbNodeStore(root / "db")
    log = AuditLog(AuditSettings(root / "audit.log", sync_lines=sync_lines, max_bytes=16 << 20), KEY, store, 1)
    log.open()
    try:
        t0 = time.perf_counter()
        for i in range(events):
            log.record("KV.Stream.put", "root", "ipv4:127.0.0.1:50000", "ok", key=f"bench/{i:08d}", value_bytes=100)
        t1 = time.perf_counter()
        assert log.flush(timeout=600)
        t2 = time.perf_counter()
        head = store.audit_head()
    finally:
        log.close()
        store.close()
    t3 = time.perf_counter()
    report = verify(root / "audit.log", KEY, head)
    t4 = time.perf_counter()
    assert report.ok, report.problem
    return {
        "record_us": (t1 - t0) / events * 1e6,
        "writer_lines_per_s": events / (t2 - t0),
        "verify_lines_per_s": report.lines / (t4 - t3),
        "bytes_per_line": sum(p.stat().st_size for p in root.glob("audit.log*")) / events,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _puts(address: str, n: int, inflight: int) -> float:
    from kvstore.client import AsyncClient

    async with AsyncClient([address]) as kv:
        await kv.put(b"warm", b"up", timeout=30)
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                await kv.put(f"bench/{i % 10_000:05d}".encode(), b"x" * 100)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        return n / (time.perf_counter() - t0)


def bench_puts(root: Path, audit: bool, n: int, inflight: int) -> float:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    d = Path(tempfile.mkdtemp(dir=root))
    args = [sys.executable, "-m", "kvstore.cli.server", "serve", "--id", "1", "--data-dir", str(d / "n1"),
            "--listen", address, "--peers", f"1={address}", "--replication", "1", "--log-level", "warning"]
    if audit:
        args += ["--audit-log", str(d / "audit.log"), "--audit-writes"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while b"ready on" not in proc.stdout.readline():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the node did not start")
        return asyncio.run(_puts(address, n, inflight))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--sync-lines", type=int, default=1000)
    ap.add_argument("--puts", type=int, default=20_000)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-puts", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVSTORE_BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        (root / "log").mkdir()
        print(json.dumps({"bench": "log", "events": a.events, "sync_lines": a.sync_lines,
                          **{k: round(v, 2) for k, v in bench_log(root / "log", a.events, a.sync_lines).items()}}))
        if a.skip_puts:
            return
        results: dict[str, list[float]] = {"off": [], "audit_writes": []}
        for _ in range(a.reps):
            for name, on in (("off", False), ("audit_writes", True)):
                results[name].append(bench_puts(root, on, a.puts, a.inflight))
                print(json.dumps({"bench": "puts", "audit": name, "inflight": a.inflight, "puts": a.puts,
                                  "puts_per_s": round(results[name][-1])}), flush=True)
        med_off, med_on = (sorted(results[k])[len(results[k]) // 2] for k in ("off", "audit_writes"))
        print(json.dumps({"bench": "puts_median", "off": round(med_off), "audit_writes": round(med_on),
                          "cost_percent": round(100 * (med_off - med_on) / med_off, 1)}))


if __name__ == "__main__":
    main()
