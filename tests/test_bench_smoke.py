"""Smoke of the kvstore-vs-etcd benchmark (bench/compare.py): it runs and prints a table.

Nothing about speed is asserted: ~1.5 s per point, in-flight 1 and 16, workloads put and get,
one repetition, kvstore and etcd 3.4 (Debian's etcd-server, which .ci/run installs). Every server
process is started and stopped by the benchmark itself, by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(240)


def test_etcd_proto_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "bench" / "gen_proto.sh"), str(tmp_path)],
        check=True, cwd=ROOT, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = sorted((tmp_path / "bench" / "etcdpb").iterdir())
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed; run bench/gen_proto.sh"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale; run bench/gen_proto.sh"


def _need_etcd() -> None:
    if shutil.which("etcd") is None:
        if os.environ.get("CI"):
            pytest.fail("etcd is not installed (.ci/run installs etcd-server)")
        pytest.skip("etcd is not installed: apt-get install -y etcd-server etcd-client")


def test_bench_smoke_kvstore_vs_etcd(tmp_path: Path) -> None:
    _need_etcd()
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bench.compare", "run", "--systems", "kvstore,etcd", "--workloads", "put,get",
        "--inflight", "1,16", "--duration", "1.5", "--warmup", "0.5", "--reps", "1", "--keys", "1000",
        "--out", str(out_dir), "--data-root", str(tmp_path), "--no-plot",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the benchmark stops its clusters on the way out
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the benchmark did not finish in 180 s:\n{out[-5000:]}")
    assert proc.returncode == 0, out[-5000:]

    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records == [json.loads(line) for line in (out_dir / "run.jsonl").read_text().splitlines()]
    points = {(r["system"], r["workload"], r["inflight"]): r for r in records if r["kind"] == "point"}
    for system in ("kvstore", "etcd"):
        for workload in ("put", "get"):
            for inflight in (1, 16):
                p = points.get((system, workload, inflight))
                assert p is not None, f"no result for {system} {workload} {inflight}:\n{out[-3000:]}"
                assert p["ops"] > 0 and p["ops_per_s"] > 0, p
                assert p["errors"] == 0, p
                assert p["p50_us"] > 0 and p["p99_us"] >= p["p50_us"], p
                assert p["server_cpu_s"] > 0, p
    for workload in ("put", "get"):
        for inflight in (1, 16):
            row = re.search(rf"^\| {workload} \| {inflight} \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|", out, re.M)
            assert row is not None, f"no table row for {workload} {inflight}:\n{out[-3000:]}"
    assert "cores on this machine" in out  # the note that servers and load generator compete
    assert (out_dir / "run.md").read_text().count("\n| ") >= 5
