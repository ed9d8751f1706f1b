"""Revisions end to end on a 3-node cluster of real `kvstore serve` processes (two data groups):
write revisions, per-key metadata, get/scan at a revision, compaction and COMPACTED, kvctl."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterharness import Cluster

from kvstore import errors
from kvstore.client import Client
from kvstore.storage import mvcc

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3, extra_args=["--groups", "2"])
    try:
        yield c.start()
    finally:
        c.stop()


def kvctl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints), "--timeout", "20",
         *args],
        capture_output=True, text=True, timeout=60,
    )


def test_get_at_revision_compact_and_compacted(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=30) as kv:
        r1 = kv.put(b"app/a", b"1")
        r2 = kv.put(b"app/a", b"2")
        rb = kv.put(b"app/b", b"x")
        assert kv.delete(b"app/b")
        rd = kv.revision
        r3 = kv.put(b"app/a", b"3")
        revs = [r1, r2, rb, rd, r3]
        # One client's writes: strictly increasing (causal: each carries the last one it saw),
        # unique, in the slot of the group that applied them.
        assert revs == sorted(set(revs)) and all(0 < r <= mvcc.REVISION_MAX for r in revs)
        now = kv.read(b"app/a")
        assert (now.value, now.create_revision, now.mod_revision, now.version) == (b"3", r1, r3, 3)
        assert now.revision >= r3
        assert kv.get(b"app/a", revision=r1) == b"1" and kv.get(b"app/a", revision=r3 - 1) == b"2"
        assert kv.get(b"app/b", revision=rb) == b"x" and kv.get(b"app/b", revision=rd) is None
        old = kv.read(b"app/a", revision=r2)
        assert (old.value, old.mod_revision, old.version, old.revision) == (b"2", r2, 2, r2)
        assert dict(kv.scan(b"app/", revision=rb)) == {b"app/a": b"2", b"app/b": b"x"}
        assert [(x.key, x.version) for x in kv.scan_kvs(b"app/")] == [(b"app/a", 3)]
        with pytest.raises(errors.InvalidArgument):
            kv.get(b"app/a", revision=-1)

        assert kv.compact(r2) == r2
        with pytest.raises(errors.Compacted) as e:
            kv.get(b"app/a", revision=r1)
        assert e.value.compact_revision >= r2 - mvcc.STEP and not e.value.indeterminate
        assert kv.get(b"app/a", revision=r2) == b"2"  # the version at the compact revision stays
        assert kv.compact(r1) == r1  # an older compaction is a no-op, not an error

    out = kvctl(cluster, "-o", "json", "get", "app/a")
    got = json.loads(out.stdout)
    assert out.returncode == 0 and got["mod_revision"] == r3 and got["version"] == 3 and got["revision"] >= r3
    out = kvctl(cluster, "get", "app/a", "--rev", str(r2))
    assert out.returncode == 0 and out.stdout == "2\n"
    out = kvctl(cluster, "get", "app/a", "--rev", str(r1))
    assert out.returncode == 2 and "compact revision is" in out.stderr
    out = kvctl(cluster, "-o", "json", "scan", "app/", "--rev", str(r2))
    assert out.returncode == 0 and [json.loads(line)["value"] for line in out.stdout.splitlines()] == ["2"]
    out = kvctl(cluster, "compact", str(r3))
    assert out.returncode == 0 and str(r3) in out.stdout


def test_history_moves_with_its_range(cluster: Cluster) -> None:
    """Keys that move to a new group keep their metadata and their history: a read at an old
    revision answers the same after the move, and a later write continues the key's versions."""
    with Client(cluster.endpoints, timeout=30) as kv:
        keys = [b"mv/%02d" % i for i in range(24)]
        first = {k: kv.put(k, b"one") for k in keys}
        second = {k: kv.put(k, b"two") for k in keys}
        before = kv.shard_map(refresh=True)
        assert before is not None
        kv.add_group(wait=True, timeout=120)
        after = kv.shard_map(refresh=True)
        assert after is not None
        moved = [k for k in keys if after.group_for_key(k) != before.group_for_key(k)]
        assert moved, "no key moved to the new group"
        for k in keys:
            assert kv.get(k, revision=first[k]) == b"one" and kv.get(k, revision=second[k]) == b"two"
            r = kv.read(k)
            assert (r.value, r.create_revision, r.mod_revision, r.version) == (b"two", first[k], second[k], 2)
        k = moved[0]
        third = kv.put(k, b"three")
        r = kv.read(k)
        assert third > second[k] and (r.create_revision, r.version) == (first[k], 3)
        assert kv.get(k, revision=second[k]) == b"two"


def test_history_retention_compacts_old_versions_by_itself(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "retention", 3, extra_args=["--history-retention", "1"])
    try:
        c.start()
        with Client(c.endpoints, timeout=30) as kv:
            r1 = kv.put(b"ret/a", b"1")
            r2 = kv.put(b"ret/a", b"2")
            deadline = time.monotonic() + 30
            while True:  # wait for the condition: the metadata leader's next round compacts r1
                try:
                    kv.get(b"ret/a", revision=r1)
                except errors.Compacted as err:
                    assert err.compact_revision >= r2 - mvcc.STEP
                    break
                assert time.monotonic() < deadline, "history older than the retention was never compacted"
                time.sleep(0.2)
            assert kv.get(b"ret/a", revision=r2) == b"2"  # the newest version stays
            assert kv.get(b"ret/a") == b"2"
    finally:
        c.stop()


def _retention_point(revs: list[int], keep: int) -> int:
    """The compact revision retention by revisions picks for these writes (the only writes of
    the data groups): the highest of the groups' (keep+1)-th newest revisions."""
    points = []
    for slot in {r % mvcc.STEP for r in revs}:
        mine = sorted((r for r in revs if r % mvcc.STEP == slot), reverse=True)
        points.append(mine[keep] if len(mine) > keep else 0)
    return max(points)


def _wait_compacted_at(kv: Client, key: bytes, point: int) -> None:
    """Wait for the condition: a read of `key` just below `point` is COMPACTED naming `point`."""
    deadline = time.monotonic() + 30
    while True:
        try:
            kv.get(key, revision=point - 1)
        except errors.Compacted as err:
            if err.compact_revision == point:
                return
            assert err.compact_revision < point, f"compacted at {err.compact_revision}, beyond {point}"
        assert time.monotonic() < deadline, f"never compacted at {point}"
        time.sleep(0.1)


def _check_retained(kv: Client, writes: list[tuple[bytes, int, bytes]], keep: int, point: int) -> None:
    """Reads at the cluster's `keep` newest revisions (and at the point) answer what was written;
    a read below the point is COMPACTED naming it."""
    newest = sorted(writes, key=lambda w: w[1])[-keep:]
    assert all(r > point for _, r, _ in newest)
    for key, r, value in newest:
        assert kv.get(key, revision=r) == value
    for key, r, value in writes:
        if r >= point:
            assert kv.get(key, revision=r) == value
        else:
            with pytest.raises(errors.Compacted) as e:
                kv.get(key, revision=r)
            assert e.value.compact_revision == point


def test_history_retention_by_revisions_keeps_the_newest_revisions_across_a_restart_and_a_move(tmp_path: Path) -> None:
    """`--history-retention-revisions 4` on 3 nodes with two data groups: the metadata leader
    compacts every group at the highest of the groups' 5th newest write revisions; the cluster's
    4 newest (and every one above that point) stay readable, below it reads are COMPACTED naming
    it; after every node crashed and restarted, later writes move the point on the same way; and
    after a range moved to a new group with its history, the new group's point decides."""
    keep = 4
    c = Cluster(tmp_path / "retention", 3, extra_args=[
        "--groups", "2", "--history-retention-revisions", str(keep), "--history-retention-interval", "0.3",
    ])
    try:
        c.start()
        writes: list[tuple[bytes, int, bytes]] = []
        with Client(c.endpoints, timeout=30) as kv:
            for i in range(12):
                key, value = b"rr/%d" % (i % 5), b"v%d" % i
                writes.append((key, kv.put(key, value), value))
            revs = [r for _, r, _ in writes]
            assert len({r % mvcc.STEP for r in revs}) == 2  # both data groups wrote
            point = _retention_point(revs, keep)
            top = next(k for k, r, _ in writes if r == point)
            _wait_compacted_at(kv, top, point)
            _check_retained(kv, writes, keep, point)
        # Every node crashes and restarts: the new metadata leader's rounds compute from the
        # stored change logs (the loop keeps no state of its own).
        for n in c.nodes.values():
            n.kill9()
        for n in c.nodes.values():
            n.start()
        c.wait_leader()
        with Client(c.endpoints, timeout=30) as kv:
            for i in range(6):
                key, value = b"rr/%d" % (i % 5), b"w%d" % i
                writes.append((key, kv.put(key, value), value))
            point = _retention_point([r for _, r, _ in writes], keep)
            top = next(k for k, r, _ in writes if r == point)
            _wait_compacted_at(kv, top, point)
            _check_retained(kv, writes, keep, point)
            # A range move to a new group: the moved keys' history is the new group's, which
            # then writes the cluster's newest revisions, so its own point becomes the cluster's.
            extra = [b"rm/%02d" % i for i in range(24)]
            first = {k: kv.put(k, b"x") for k in extra}
            before = kv.shard_map(refresh=True)
            kv.add_group(wait=True, timeout=120)
            after = kv.shard_map(refresh=True)
            assert before is not None and after is not None
            moved = [k for k in extra if after.group_for_key(k) != before.group_for_key(k)]
            assert moved, "no key moved to the new group"
            m = moved[0]
            mine = [(m, kv.put(m, b"n%d" % i), b"n%d" % i) for i in range(2 * keep + 2)]
            point = mine[-keep - 1][1]  # the new group's (keep+1)-th newest, the cluster's too
            _wait_compacted_at(kv, m, point)
            for key, r, value in mine[-keep - 1:]:
                assert kv.get(key, revision=r) == value
            for r in (first[m], *(r for _, r, _ in mine[: -keep - 1])):  # moved history too
                with pytest.raises(errors.Compacted) as e:
                    kv.get(m, revision=r)
                assert e.value.compact_revision == point
    finally:
        c.stop()
