"""Operations on a real cluster: the `/livez` and `/readyz` probes and the SIGTERM drain."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

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
    cluster = Cluster(tmp_path, 3)
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
        for nid in (2, 3):
            cluster.nodes[nid].terminate()
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
            for g in led_before:
                assert f"group {g}: draining, handing leadership to node" in text
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
