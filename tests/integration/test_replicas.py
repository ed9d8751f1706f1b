"""Read replicas on a real cluster: 3 voters + 2 learners (`kvstore serve --learner`), loopback.

Partitions need network namespaces: those cases are in tests/chaos/test_chaos.py (the `replicas`
workload and nemesis) and, in process, tests/integration/test_replica_reads.py.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from clusterharness import Cluster, NodeProc

from kvstore.cli.kvctl import cli
from kvstore.client import Client, group_status

pytestmark = pytest.mark.timeout(240)


def _g(st: Any) -> Any:
    g = group_status(st)
    assert g is not None, "the node has no data group 1"
    return g


def wait_caught_up(cluster: Cluster, nodes: list[NodeProc], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ld = cluster.leader()
        lst = ld.status() if ld is not None else None
        if lst is not None:
            commit = _g(lst).commit
            sts = [n.status() for n in nodes]
            if all(st is not None and (g := group_status(st)) is not None and g.applied >= commit for st in sts):
                return
        time.sleep(0.1)
    raise AssertionError("learners did not catch up:\n" + "\n".join(n.log_text()[-2000:] for n in nodes))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("replicas"), 3, extra_args=["--compact-threshold", "200"])
    try:
        c.start()
        with Client(c.endpoints) as cl:
            for i in range(400):
                cl.put(b"pre/%03d" % i, b"x" * 100)
            cl.snapshot()  # the learners can only catch up from a snapshot
        c.add_node(4, learner=True)
        c.add_node(5, learner=True)
        wait_caught_up(c, [c.nodes[4], c.nodes[5]])
        yield c
    finally:
        c.stop()


def test_learners_catch_up_by_snapshot_and_never_vote(cluster: Cluster) -> None:
    for nid in (4, 5):
        log = cluster.nodes[nid].log_text()
        assert "registered as a learner" in log or "is a member of group" in log, log[-2000:]
        assert "installing snapshot" in log, log[-2000:]
        st = cluster.nodes[nid].status()
        assert st is not None and group_status(st).first_index > 1  # type: ignore[union-attr]  # its log starts after the snapshot
    ld = cluster.leader()
    assert ld is not None and ld.id in (1, 2, 3)
    g = group_status(ld.status())  # type: ignore[arg-type]
    assert g is not None
    assert list(g.voters) == [1, 2, 3] and list(g.learners) == [4, 5]
    with Client(cluster.endpoints, read_preference="replica") as c:
        assert c.get(b"pre/123") == b"x" * 100


def test_linearizable_replica_reads_see_every_acknowledged_write(cluster: Cluster) -> None:
    served: collections.Counter[int] = collections.Counter()
    with Client(cluster.endpoints) as writer, Client(cluster.endpoints, read_preference="replica") as reader:
        for i in range(60):
            writer.put(b"lin", b"%d" % i)
            res = reader.read(b"lin")  # linearizable by default
            assert res.value == b"%d" % i, (i, res)
            assert res.staleness == 0.0
            served[res.node_id] += 1
        assert set(served) == {4, 5}, served  # both learners took reads, the voters none
        # stale and bounded reads through the replicas report a staleness bound
        writer.put(b"lin", b"last")
        deadline = time.monotonic() + 10  # until both learners applied it (stale reads show it)
        while any(reader.read(b"lin", consistency="stale", read_preference="replica").value != b"last"
                  for _ in range(4)):
            assert time.monotonic() < deadline, "the learners never applied the last write"
            time.sleep(0.05)
        for level, bound in (("stale", None), ("bounded", "2s")):
            res = reader.read(b"lin", consistency=level, max_staleness=bound)  # type: ignore[arg-type]
            assert res.node_id in (4, 5) and res.value == b"last"
            assert res.staleness is not None and 0 <= res.staleness < 2.0, res


def test_kvctl_status_and_get_through_replicas(cluster: Cluster) -> None:
    eps = ",".join(cluster.endpoints)

    def kvctl(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(cli, ["--endpoints", eps, *args], env={"COLUMNS": "200"}, catch_exceptions=False)
        return r.exit_code, r.stdout

    code, out = kvctl("status")
    # One row per node and group (the metadata group 0 and data group 1): 2 learners x 2 groups.
    assert code == 0 and "LAG" in out and out.count("(learner)") == 4, out
    code, out = kvctl("put", "cli", "v")
    put_done = time.monotonic()
    assert code == 0
    code, out = kvctl("-o", "json", "get", "cli", "--read-from", "replica")  # linearizable
    got = json.loads(out)
    assert code == 0 and got["value"] == "v" and got["node_id"] in (4, 5), got
    read_start = time.monotonic()
    code, out = kvctl("-o", "json", "get", "cli", "--read-from", "replica", "--consistency", "bounded",
                      "--max-staleness", "2s")
    got = json.loads(out)
    assert code == 0 and got["node_id"] in (4, 5) and got["staleness_ms"] < 2000, got
    # A bounded read may miss a write acknowledged within its staleness bound, and only then
    # (replicas learn the commit index with the next append or heartbeat): the bound is honest.
    assert got["value"] == "v" or got["staleness_ms"] >= 1000 * (read_start - put_done), got
    # Staleness evidence is gathered on demand (probes run while bounded/stale reads arrive), so
    # the replica that served the bounded read reports a bound; the other one may not know yet.
    code, out = kvctl("-o", "json", "status")
    nodes = {n["node_id"]: n for n in json.loads(out)["nodes"]}
    for nid in (4, 5):
        g = next(x for x in nodes[nid]["groups"] if x["group"] == 1)
        assert g["lag_entries"] is not None and g["lag_entries"] < 50
        assert g["leader_contact_ms"] is not None
        if nid == got["node_id"]:
            assert g["staleness_ms"] is not None and g["staleness_ms"] < 2000, g
        else:
            assert g["staleness_ms"] is None or g["staleness_ms"] < 2000, g
    code, out = kvctl("get", "cli", "--read-from", "nearest", "--consistency", "stale")
    assert code == 0 and out.strip() == "v"
    code, out = kvctl("scan", "pre/00", "--keys-only", "--read-from", "replica", "--consistency", "stale")
    assert code == 0 and out.split() == [f"pre/{i:03d}" for i in range(10)], out


def test_scans_through_replicas(cluster: Cluster) -> None:
    with Client(cluster.endpoints) as writer, Client(cluster.endpoints, read_preference="replica") as reader:
        writer.put(b"scan/x", b"1")
        assert list(reader.scan(b"scan/")) == [(b"scan/x", b"1")]
        assert len(list(reader.scan(b"pre/", consistency="bounded", max_staleness=2.0))) == 400
        learners = {cluster.nodes[4].address, cluster.nodes[5].address}
        assert set(reader.async_client.replicas.served) <= learners
        assert sum(reader.async_client.replicas.served.values()) == 2


def test_killing_learners_never_affects_writes(cluster: Cluster) -> None:
    with Client(cluster.endpoints) as c, Client(cluster.endpoints, read_preference="replica") as reader:
        for nid in (4, 5):
            cluster.nodes[nid].kill9()
        slowest = 0.0
        for i in range(100):
            t0 = time.monotonic()
            c.put(b"during-kill/%d" % i, b"v")
            slowest = max(slowest, time.monotonic() - t0)
        # (Commits never wait for learners; the bound does not measure speed, it catches a write
        # stuck behind a dead learner, which would wait out a request timeout of 5 s.)
        assert slowest < 3.0, slowest
        # replica reads fall back to the followers (and the leader) while no learner is up
        res = reader.read(b"during-kill/99")
        assert res.value == b"v" and res.node_id in (1, 2, 3)
        for nid in (4, 5):
            cluster.nodes[nid].start()
        wait_caught_up(cluster, [cluster.nodes[4], cluster.nodes[5]])
        # back in rotation (their breakers let a probe through after the cooldown)
        deadline = time.monotonic() + 15
        seen: set[int] = set()
        while time.monotonic() < deadline and not {4, 5} <= seen:
            seen.add(reader.read(b"during-kill/99").node_id)
            time.sleep(0.05)
        assert {4, 5} <= seen, seen


def test_promote_a_learner_to_voter(cluster: Cluster) -> None:
    with Client(cluster.endpoints) as c:
        resp = c.promote_member(4)
        assert "done" in resp.message
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ld = cluster.leader()
            st = ld.status() if ld is not None else None
            if st is not None and (g := group_status(st)) is not None and list(g.voters) == [1, 2, 3, 4]:
                break
            time.sleep(0.1)
        assert st is not None and list(_g(st).voters) == [1, 2, 3, 4] and list(_g(st).learners) == [5]
        c.put(b"after-promote", b"1")
        assert c.get(b"after-promote") == b"1"
    with Client(cluster.endpoints, read_preference="replica") as reader:
        # The one learner left serves replica reads (once it has applied the write; until then
        # a follower may answer, as the read preference allows).
        deadline = time.monotonic() + 15
        while (res := reader.read(b"after-promote")).node_id != 5:
            assert res.value == b"1" and res.node_id in (1, 2, 3, 4), res
            assert time.monotonic() < deadline, "the remaining learner never served a replica read"
            time.sleep(0.05)
