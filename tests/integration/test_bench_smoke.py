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

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.timeout(240)


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
        "--inflight", "1,16", "--duration", "0.5", "--warmup", "0.2", "--reps", "1", "--keys", "1000",
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
                assert p["errors"] == 0, (system, workload, inflight, p["error_sample"])
                assert p["p50_us"] > 0 and p["p99_us"] >= p["p50_us"], p
                assert p["server_cpu_s"] > 0, p
    for workload in ("put", "get"):
        for inflight in (1, 16):
            row = re.search(rf"^\| {workload} \| {inflight} \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|", out, re.M)
            assert row is not None, f"no table row for {workload} {inflight}:\n{out[-3000:]}"
    assert "cores on this machine" in out  # the note that servers and load generator compete
    assert (out_dir / "run.md").read_text().count("\n| ") >= 5


def test_bench_smoke_etcd_api(tmp_path: Path) -> None:
    """`--systems etcd-api`: a kvstore cluster driven by etcd's adapter through kvstore's etcd
    API (no etcd needed): every point served without errors, the all-systems table printed."""
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bench.compare", "run", "--systems", "etcd-api", "--workloads", "put,get,txn",
        "--inflight", "4", "--duration", "1", "--warmup", "0.3", "--reps", "1", "--keys", "200",
        "--out", str(out_dir), "--data-root", str(tmp_path), "--no-plot",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the benchmark stops its cluster on the way out
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the benchmark did not finish in 120 s:\n{out[-5000:]}")
    assert proc.returncode == 0, out[-5000:]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    points = {r["workload"]: r for r in records if r["kind"] == "point"}
    assert set(points) == {"put", "get", "txn"}, out[-3000:]
    for p in points.values():
        assert p["system"] == "etcd-api" and p["ops"] > 0 and p["errors"] == 0, (p["workload"], p["error_sample"])
    assert "etcd-api ops/s" in out  # the every-system table


def _point(system: str, rep: int, ops_per_s: float, p99: float) -> dict[str, object]:
    return {
        "kind": "point", "system": system, "workload": "put", "inflight": 16, "rep": rep, "ops": 100,
        "ops_per_s": ops_per_s, "errors": 0, "p50_us": p99 / 2, "p99_us": p99, "p999_us": p99 * 2,
        "server_cores": 1.0, "loadgen_cores": 0.2, "server_cpu_us_per_op": 500.0, "loadgen_cpu_us_per_op": 90.0,
    }


def test_summary_takes_medians_and_ratios_pair_by_pair() -> None:
    from bench.kvbench import report

    # Drift: rep 1 is slow for both systems; the ratio of each pair is 0.5 whatever the drift.
    pts = [
        _point("kvstore", 0, 1000, 10_000), _point("etcd", 0, 2000, 5_000),
        _point("kvstore", 1, 100, 100_000), _point("etcd", 1, 200, 50_000),
        _point("kvstore", 2, 900, 11_000), _point("etcd", 2, 1800, 5_500),
    ]
    (row,) = report.summarize(pts, ["kvstore", "etcd"])
    assert row["kvstore"]["ops_per_s"] == 900 and row["etcd"]["ops_per_s"] == 1800
    assert row["ratio_ops_per_s"] == 0.5 and row["ratio_p99"] == 2.0 and row["ratio_pairs"] == 3
    table = report.markdown_table([row])
    assert "| put | 16 | 900 | 1,800 | 0.50 |" in table


def test_profile_categories_walk_from_the_innermost_frame() -> None:
    from bench.kvbench import profile

    raw = "\n".join([
        "thread (1): MainThread;run (asyncio/runners.py:118);Put (kvstore/server/kv_service.py:90);"
        "propose (kvstore/raft/core.py:470) 7",
        "thread (2): persist_0;persist (kvstore/node/host.py:108);write (kvstore/storage/lmdb_env.py:161);"
        "fdatasync (libc.so.6) 3",
        "thread (1): MainThread;uv_run (core.c:464);epoll_wait (libc.so.6) 90",
    ])
    stacks = profile.parse_raw(raw)
    cats = profile.categorize(stacks)
    assert cats["Raft core (kvstore/raft)"] == 7
    assert cats["fsync (fdatasync, in the LMDB commit)"] == 3
    assert sum(profile.busy(stacks).values()) == 10
    assert profile.by_thread(stacks)["thread (1): MainThread"] == 97


def test_bench_tls_runs_both_systems_with_mutual_tls(tmp_path: Path) -> None:
    """`--systems kvstore,etcd --tls` runs each system plain and with mutual TLS (certificates of
    one CA per cluster; etcd with --client-cert-auth and --peer-client-cert-auth) and reports the
    TLS-vs-TLS ratio and the cost of TLS to kvstore (kvstore-tls/kvstore)."""
    _need_etcd()
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bench.compare", "run", "--systems", "kvstore,etcd", "--tls", "--workloads", "put",
        "--inflight", "4", "--duration", "1", "--warmup", "0.5", "--reps", "1", "--keys", "200",
        "--out", str(out_dir), "--data-root", str(tmp_path), "--no-plot",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the benchmark did not finish in 240 s:\n{out[-5000:]}")
    assert proc.returncode == 0, out[-5000:]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    points = {r["system"]: r for r in records if r["kind"] == "point"}
    assert sorted(points) == ["etcd", "etcd-tls", "kvstore", "kvstore-tls"], out[-3000:]
    for p in points.values():
        assert p["ops"] > 0 and p["errors"] == 0, p
    (summary,) = [r for r in records if r["kind"] == "summary"]
    assert set(summary["ratios"]) == {"kvstore/etcd", "kvstore-tls/etcd-tls", "kvstore-tls/kvstore"}
    for ratio in summary["ratios"].values():
        assert ratio["pairs"] == 1 and ratio["ops_per_s"] > 0, ratio
    ratios_md = (out_dir / "run-ratios.md").read_text()
    assert "ops/s kvstore-tls/kvstore" in ratios_md and "\n| put | 4 |" in ratios_md


def test_tls_clusters_refuse_a_client_without_a_certificate(tmp_path: Path) -> None:
    """The -tls clusters really run TLS with client authentication: a plaintext client, and a
    TLS client without a certificate, get no answer from either system; kvstore-tls has auth
    enabled (every call authenticated, every key checked)."""
    _need_etcd()
    import grpc

    from bench.kvbench.clusters import make_cluster
    from kvstore.etcdpb.etcdserverpb import rpc_pb2 as etcd_pb2
    from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc as etcd_pb2_grpc

    for system in ("kvstore-tls", "etcd-tls"):
        cluster = make_cluster(system, tmp_path / system)
        try:
            cluster.start()
            assert cluster.certs is not None
            ep = cluster.endpoints[0]
            anonymous = grpc.ssl_channel_credentials(root_certificates=cluster.certs.ca.read_bytes())
            for ch in (grpc.insecure_channel(ep), grpc.secure_channel(ep, anonymous)):
                with ch, pytest.raises(grpc.RpcError) as err:
                    if system == "etcd-tls":
                        etcd_pb2_grpc.KVStub(ch).Range(etcd_pb2.RangeRequest(key=b"k"), timeout=3)
                    else:
                        from kvstore.v1 import kv_pb2, kv_pb2_grpc

                        kv_pb2_grpc.KVStub(ch).Get(kv_pb2.GetRequest(key=b"k"), timeout=3)
                assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                                            grpc.StatusCode.DEADLINE_EXCEEDED), (system, err.value)
            if system == "kvstore-tls":  # TLS + auth: root, by its certificate, is who the bench runs as
                from kvstore.security.tls import client_credentials
                from kvstore.v1 import auth_pb2, auth_pb2_grpc

                with grpc.secure_channel(ep, client_credentials(cluster.certs.client_dir)) as ch:
                    st = auth_pb2_grpc.AuthStub(ch).Status(auth_pb2.AuthStatusRequest(), timeout=10)
                assert st.enabled and st.admin, st
        finally:
            cluster.stop()


def test_watch_bench_smoke_etcd(tmp_path: Path) -> None:
    """`bench/watch_latency.py` end to end on etcd (the kvstore side's watch path is the client
    library's, covered by tests/integration/test_watch_cluster.py; a kvstore cluster would cost
    this smoke ~7 s more): a 3-member etcd, two prefix watchers in a watcher process through
    the v3 Watch API, a few puts; every watcher gets every put, and the table says so. Nothing
    about speed."""
    _need_etcd()
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bench.watch_latency", "--systems", "etcd", "--rows", "prefix:2@50",
        "--seconds", "0.2", "--rounds", "1", "--warmup-puts", "1", "--out", str(out_dir),
        "--data-root", str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the benchmark stops its cluster and watchers on the way out
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the watch benchmark did not finish in 120 s:\n{out[-5000:]}")
    assert proc.returncode == 0, out[-5000:]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records == [json.loads(line) for line in (out_dir / "watch.jsonl").read_text().splitlines()]
    (point,) = [r for r in records if r["kind"] == "point"]
    assert point["system"] == "etcd" and point["watchers"] == 2 and point["puts"] == 10, point
    assert point["expected"] == 20 and point["received"] == 20 and point["missing"] == 0, point
    assert point["duplicates"] == 0 and point["unexpected"] == 0 and point["write_errors"] == 0, point
    assert point["send_p50_ms"] > 0 and point["send_p99_ms"] >= point["send_p50_ms"], point
    assert "| prefix x2 @50/s | etcd |" in (out_dir / "watch.md").read_text()


def test_waves_smoke_traces_every_stage_of_a_batch(tmp_path: Path) -> None:
    """`bench/waves.py` at 8 in flight for 1 s: the client's batches, the leader's proposals and
    every node's append and apply cycles were traced (the count marks reach the report)."""
    cmd = [sys.executable, "-m", "bench.waves", "--inflight", "8", "--seconds", "1", "--warmup", "0.2",
           "--data-root", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = {m.group(1): (int(m.group(2)), m.group(3))
            for m in re.finditer(r"^\| ([^|]+?) \| (\d+) \| [\d,]* \| ([\d.]*) \|", proc.stdout, re.M)}
    for stage in ("client: answers read -> next batch written", "leader: batch taken -> proposed",
                  "leader: append cycle, begin -> end (ops: entries)",
                  "leader: apply cycle, begin -> end (ops: entries)"):
        assert stage in rows and rows[stage][0] > 0, (stage, proc.stdout[-3000:])
        assert rows[stage][1] and float(rows[stage][1]) >= 1, (stage, rows[stage])  # the batch's size
    assert sum(1 for s in rows if s.startswith("follower ") and "append cycle, begin" in s) == 2, proc.stdout
    assert list(tmp_path.iterdir()) == [], "the benchmark left its data directory behind"


def test_rejoin_smoke_a_node_back_from_an_outage_serves(tmp_path: Path) -> None:
    """`bench/rejoin.py` with a 2 s outage: the restarted follower served the last put written
    while it was down, the round's line says so, and the data directory is gone afterwards."""
    cmd = [sys.executable, "-m", "bench.rejoin", "--down", "2", "--data-root", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    m = re.search(r"^round 1: down 2 s \((\d+) puts meanwhile\); served the last put ([\d.]+) s after its start",
                  proc.stdout, re.M)
    assert m is not None and int(m.group(1)) > 0, proc.stdout[-3000:]
    assert list(tmp_path.iterdir()) == [], "the benchmark left its data directory behind"
