"""The cluster version on a real 3-node cluster (every member's level in Admin.Status and
`kvctl status`), then recovery after losing quorum (`kvstore serve --force-new-cluster`, kvstore/node/forcenew.py):
a 3-node cluster with two data groups loses two nodes (kill -9); the survivor restarts as a new
single-member cluster from its data: every acknowledged key is readable, writes work, every group
(and the shard map) names it alone, and a new member added back gets the data."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import CliRunner
from clusterharness import Cluster

from kvstore import errors
from kvstore.cli.kvctl import cli as kvctl_cli
from kvstore.client import Client
from kvstore.node.version import SUPPORTED_LEVEL

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")


def eventually(fn: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """`fn()`'s result once it stops raising a KVError (polling), failing after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except errors.KVError as err:
            assert time.monotonic() < end, f"timed out waiting for {what}: {err}"
            time.sleep(0.05)


def test_a_survivor_becomes_a_new_cluster_and_takes_a_new_member(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 3, extra_args=["--groups", "2"]).start()
    try:
        keys = {b"f%03d" % i: b"v%d" % i for i in range(40)}
        with Client(cluster.endpoints, timeout=10) as c:
            for k, v in keys.items():
                c.put(k, v)
        # Every member advertised its feature level; `kvctl status` shows them and the cluster version.
        end = time.monotonic() + 30
        while True:
            st = cluster.nodes[1].status()
            if st is not None and dict(st.member_levels) == {1: SUPPORTED_LEVEL, 2: SUPPORTED_LEVEL, 3: SUPPORTED_LEVEL}:
                break
            assert time.monotonic() < end, f"levels never advertised: {st}"
            time.sleep(0.05)
        assert st.cluster_version == SUPPORTED_LEVEL  # raised once all three advertised
        r = CliRunner().invoke(kvctl_cli, ["--endpoints", ",".join(cluster.endpoints), "status", "-o", "json"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        node1 = next(n for n in json.loads(r.stdout)["nodes"] if n.get("node_id") == 1)
        lv = SUPPORTED_LEVEL
        assert node1["cluster_version"] == lv and node1["member_levels"] == {"1": lv, "2": lv, "3": lv}
        survivor = cluster.nodes[1]
        # A write is acknowledged once a majority holds it: the survivor may lag behind nodes 2 and 3.
        # --force-new-cluster keeps exactly what the survivor has (as etcd's does), so the operator picks
        # the member with the most recent data; here: wait until node 1 itself has applied every key.
        with Client([survivor.address], timeout=5) as c1:
            end = time.monotonic() + 30
            while any(c1.get(k, consistency="serializable") != v for k, v in keys.items()):
                assert time.monotonic() < end, "node 1 never applied every acknowledged key"
                time.sleep(0.05)
        cluster.nodes[2].kill9()
        cluster.nodes[3].kill9()
        survivor.terminate()
        survivor.args.append("--force-new-cluster")
        survivor.start()
        with Client([survivor.address], timeout=5) as c:
            eventually(lambda: c.put(b"after", b"ok"), "a write on the forced cluster")
            for k, v in keys.items():
                assert c.get(k) == v
            st = survivor.status()
            assert st is not None and {g.group for g in st.groups} == {0, 1, 2}
            assert all(list(g.voters) == [1] and not g.learners for g in st.groups)
            assert "force-new-cluster: the shard map" in survivor.log_text()

            new = cluster.add_node(4)
            eventually(lambda: c.add_member(4, new.address, learner=True), "adding node 4")

            def caught_up() -> bool:
                s = new.status()
                return s is not None and {g.group for g in s.groups} == {0, 1, 2} and all(
                    g.applied > 0 for g in s.groups)

            end = time.monotonic() + 30
            while not caught_up():
                assert time.monotonic() < end, new.log_text()[-3000:]
                time.sleep(0.05)
            eventually(lambda: c.promote_member(4), "promoting node 4")
            c.put(b"with-4", b"ok")
        with Client([new.address], timeout=5) as c4:  # node 4's own replica (serializable reads)
            end = time.monotonic() + 30
            while c4.get(b"with-4", consistency="serializable") != b"ok":
                assert time.monotonic() < end, "node 4 never applied the write made after it joined"
                time.sleep(0.05)
            for k, v in keys.items():
                assert c4.get(k, consistency="serializable") == v
    finally:
        cluster.stop()
