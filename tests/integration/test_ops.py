"""Operations on a real cluster: the `/livez` and `/readyz` probes and the SIGTERM drain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import lmdb
from clusterharness import Cluster, NodeProc, free_ports, probe, wait_probe

from kvstore import errors
from kvstore.client import Client

DRAINED = "drained: handed leadership of"
STOPPED = "stopped"


def _with_metrics(cluster: Cluster) -> dict[int, int]:
    """Give every node a metrics port; returns node id -> port."""
    ports = dict(zip(sorted(cluster.nodes), free_ports(len(cluster.nodes)), strict=True))
    for nid, node in cluster.nodes.items():
        node.args += ["--metrics-listen", f"127.0.0.1:{ports[nid]}"]
    return ports


def leaders(cluster: Cluster, groups: range) -> dict[int, int]:
    """group -> leader id, as the running nodes that host it agree (missing: no agreement)."""
    out: dict[int, int] = {}
    for gid in groups:
        views = set()
        for n in cluster.nodes.values():
            st = n.status() if n.alive else None
            if st is not None:
                views.update(g.leader_id for g in st.groups if g.group == gid)
        if len(views) == 1 and 0 not in views:
            out[gid] = views.pop()
    return out


def test_probes_follow_the_node_and_its_peers(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 3, extra_args=["--drain-timeout", "5"])
    ports = _with_metrics(cluster)
    try:
        cluster.start()
        for port in ports.values():
            assert wait_probe(port, "/readyz", 200) == "ok\n"
            assert probe(port, "/livez") == (200, "ok\n")
        status, body = probe(ports[1], "/metrics")
        assert status == 200 and "kvstore_" in body  # the metrics are still there
        req = urllib.request.Request(f"http://127.0.0.1:{ports[1]}/readyz", data=b"x", method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("POST /readyz answered")
        except urllib.error.HTTPError as err:
            assert err.code == 405
        # A node whose peers are all stopped is alive but not ready.
        for nid in (2, 3):  # both at once (each stop takes a grace period)
            proc = cluster.nodes[nid].proc
            assert proc is not None
            proc.send_signal(signal.SIGTERM)
        for nid in (2, 3):  # one SIGTERM each: a second one could hit the exiting interpreter
            proc = cluster.nodes[nid].proc
            assert proc is not None and proc.wait(30) == 0
        reason = wait_probe(ports[1], "/readyz", 503)
        assert reason.endswith("\n") and reason.count("\n") == 1
        assert "reachable" in reason or "no leader" in reason, reason
        assert probe(ports[1], "/livez") == (200, "ok\n")
        # Ready again once a quorum is back.
        cluster.nodes[2].start()
        wait_probe(ports[1], "/readyz", 200)
        wait_probe(ports[2], "/readyz", 200)
    finally:
        cluster.stop()


def _leads(cluster: Cluster, groups: range) -> NodeProc | None:
    """A running node that leads one of `groups` (the one that leads most)."""
    led = leaders(cluster, groups)
    counts: dict[int, int] = {}
    for nid in led.values():
        counts[nid] = counts.get(nid, 0) + 1
    if not counts:
        return None
    return cluster.nodes[max(counts, key=lambda n: counts[n])]


def test_sigterm_hands_leadership_over_before_stopping(tmp_path: Path) -> None:
    """Every node, while it leads groups, gets SIGTERM while a client writes: it hands its
    leaderships to the others before it exits, and no write fails with an indeterminate error."""
    groups = range(0, 3)  # the metadata group and two data groups
    cluster = Cluster(tmp_path, 3, extra_args=["--groups", "2", "--drain-timeout", "10"])
    ports = _with_metrics(cluster)
    failures: list[BaseException] = []
    written = [0]
    stop = threading.Event()

    def writer() -> None:
        with Client(cluster.endpoints) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.put(b"k%03d" % (i % 100), b"v%d" % i)
                    written[0] += 1
                except errors.KVError as err:
                    failures.append(err)
                i += 1

    try:
        cluster.start()
        for port in ports.values():
            wait_probe(port, "/readyz", 200)
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        drained: set[int] = set()
        deadline = time.monotonic() + 120
        while drained != set(cluster.nodes):
            assert time.monotonic() < deadline, f"drained only {drained}"
            victim = None
            for nid in sorted(set(cluster.nodes) - drained):
                led = leaders(cluster, groups)
                if nid in led.values():
                    victim = cluster.nodes[nid]
                    break
            if victim is None:  # the remaining nodes lead nothing right now: hand them some
                nid = min(set(cluster.nodes) - drained)
                with Client(cluster.endpoints) as c:
                    c.transfer_leader(nid)
                continue
            led_before = sorted(g for g, n in leaders(cluster, groups).items() if n == victim.id)
            before = written[0]
            assert victim.terminate(timeout=30) == 0
            text = victim.log_text()
            assert DRAINED in text, text[-3000:]
            # the hand-over happened before the node stopped
            assert text.rindex(DRAINED) < text.rindex(f"node {victim.id} {STOPPED}")
            stopped_at = text.rindex(f"node {victim.id} {STOPPED}")
            for g in led_before:  # each handed over before the stop: by the drain, or (a race with the
                # SIGTERM) by the balancer moving it to its preferred leader just before
                handed = [text.rfind(f"group {g}: draining, handing leadership to node"),
                          text.rfind(f"group {g}: handing leadership to its preferred leader")]
                assert 0 <= max(handed) < stopped_at, (g, text[-3000:])
            drained.add(victim.id)
            victim.start()
            wait_probe(ports[victim.id], "/readyz", 200)
            # writes went on through the drain
            wait_until = time.monotonic() + 30
            while written[0] <= before + 5:
                assert time.monotonic() < wait_until, "writes stalled"
                time.sleep(0.05)
        stop.set()
        t.join(30)
        indeterminate = [f for f in failures if isinstance(f, errors.KVError) and f.indeterminate]
        assert not indeterminate, indeterminate
        assert not failures, failures
    finally:
        stop.set()
        cluster.stop()


def _kvctl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints), *args],
        capture_output=True, text=True, timeout=120,
    )


def _plant(data_dir: Path, value: bytes, planted: bytes) -> int:
    """Change `value` to `planted` wherever the stopped node's LMDB holds it (the current value
    in `data`, the version in the history, `rev_changes`, whose rows end with the value: what a
    bit flip or a bug in one replica's apply would leave); returns the rows changed."""
    env = lmdb.open(str(data_dir / "db"), max_dbs=32, subdir=True)
    changed = 0
    try:
        with env.begin(write=True) as txn:
            for name in (b"data", b"rev_changes"):
                db = env.open_db(name, txn=txn, create=False)
                rows = [(k, v) for k, v in txn.cursor(db=db) if v.endswith(value)]
                for k, v in rows:
                    txn.put(k, v[: len(v) - len(value)] + planted, db=db)
                    changed += 1
    finally:
        env.close()
    return changed


def test_kvctl_check_passes_then_names_the_diverged_group(tmp_path: Path) -> None:
    # --state-sync commit: a restart opens LMDB as it is (in checkpoint mode it would go back to
    # its last checkpoint, undoing the planted change, and replay the log)
    cluster = Cluster(tmp_path, 3, extra_args=["--groups", "2", "--state-sync", "commit"])
    try:
        cluster.start()
        # A new cluster: its data groups never wrote (each leader hashes at revision 0, and the
        # other voters are asked at exactly 0: once they were refused as "not the leader")
        fresh = _kvctl(cluster, "check")
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        assert fresh.stdout.count(": ok at revision") == 3
        with Client(cluster.endpoints) as c:
            for i in range(200):
                c.put(b"key%03d" % i, b"value-%03d" % i)
            c.delete(b"key007")
            target = b"value-042"
            smap = c.shard_map(refresh=True)
            assert smap is not None
            gid = smap.group_for_key(b"key042")
        ok = _kvctl(cluster, "check")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.count(": ok at revision") == 3  # the metadata group and both data groups
        js = _kvctl(cluster, "-o", "json", "check")
        assert js.returncode == 0
        report = json.loads(js.stdout)
        assert report["ok"] and sum(len(g["hashes"]) for g in report["groups"]) == 9
        # A replica diverges (planted while it is stopped): one that neither leads the group nor
        # is its preferred leader (the balancer would hand it the group back).
        leader = cluster.settled_leader(gid)
        victim = cluster.nodes[next(n for n in sorted(cluster.nodes) if n != leader.id)]
        assert victim.terminate() == 0
        assert _plant(victim.data_dir, target, b"value-XYZ") == 2
        victim.start()
        cluster.wait_leader()
        deadline = time.monotonic() + 60
        while True:  # until the restarted node answers the check (its status shows it back)
            bad = _kvctl(cluster, "check")
            if "not checked" not in bad.stdout and bad.returncode != 2:
                break
            assert time.monotonic() < deadline, bad.stdout + bad.stderr
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert f"replicas differ in group(s) {gid} (node(s) {victim.id})" in bad.stderr
        assert f"group {gid}: DIFFERS" in bad.stdout
        others = [g for g in range(3) if g != gid]
        for g in others:
            assert f"group {g}: ok" in bad.stdout
    finally:
        cluster.stop()
