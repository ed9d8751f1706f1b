"""Exact reads at a revision across groups, and atomic linearizable scans across groups, on a
3-node cluster of real `kvstore serve` processes with three data groups (docs/REVISIONS.md,
"Reads at a revision"): a group whose applied last revision is below R closes itself at R
through its log before answering, so the answer never changes afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterharness import Cluster

from kvstore import errors
from kvstore.client import Client
from kvstore.node.hlc import MAX_CLOCK_OFFSET_MS
from kvstore.shard.shardmap import ShardMap
from kvstore.storage import mvcc

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("closed")), 3, extra_args=["--groups", "3"])
    try:
        yield c.start()
    finally:
        c.stop()


def keys_by_group(m: ShardMap, prefix: bytes, per_group: int) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {g: [] for g in m.data_groups()}
    i = 0
    while any(len(v) < per_group for v in out.values()):
        k = prefix + b"%d" % i
        g = m.group_for_key(k)
        if len(out[g]) < per_group:
            out[g].append(k)
        i += 1
        assert i < 100_000
    return out


def _shard_map(kv: Client) -> ShardMap:
    m = kv.shard_map(refresh=True)
    assert m is not None and len(m.data_groups()) == 3
    return m


def _ahead(ms: int) -> int:
    """A revision `ms` ahead of the wall clock now (slot 0)."""
    return mvcc.make_revision(time.time_ns() // 1_000_000 + ms, 0, 0)


def test_a_scan_at_a_revision_is_exactly_the_writes_at_or_below_it(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=30) as kv:
        by_group = keys_by_group(_shard_map(kv), b"at/", 4)
        idle, busy, other = sorted(by_group)
        written: list[tuple[int, bytes, bytes]] = []  # (revision, key, value) of every write
        for g in (idle, busy, other):
            for k in by_group[g]:
                written.append((kv.put(k, b"0"), k, b"0"))
        # R ahead of every group's last revision (within the clock bound): every group has to
        # close itself at R before it can answer at R; a group that did not would later write
        # at or below R, and the second scan below would differ from the first.
        r = _ahead(MAX_CLOCK_OFFSET_MS // 2)
        stop = threading.Event()
        failures: list[BaseException] = []
        later: list[tuple[int, bytes, bytes]] = []

        def writer() -> None:  # keeps writing to two groups while the scans run
            try:
                with Client(cluster.endpoints, timeout=30) as w:
                    n = 0
                    while not stop.is_set() and n < 400:
                        n += 1
                        for g in (busy, other):
                            k = by_group[g][n % 4]
                            v = b"%d" % n
                            later.append((w.put(k, v), k, v))
            except BaseException as err:  # reported by the test thread
                failures.append(err)

        t = threading.Thread(target=writer)
        t.start()
        try:
            while len(later) < 10:  # the writer is going
                assert t.is_alive() and not failures, failures
                time.sleep(0.01)
            first = dict(kv.scan(b"at/", revision=r))
            got_idle = kv.read(by_group[idle][0], revision=r)
            while len(later) < 30 and t.is_alive():
                time.sleep(0.01)
            second = dict(kv.scan(b"at/", revision=r))
        finally:
            stop.set()
            t.join(60)
        assert not failures, failures
        assert got_idle.revision == r and got_idle.value == b"0"
        # Every write acknowledged: the state after exactly the writes <= R, in revision order.
        want: dict[bytes, bytes] = {}
        for rev, k, v in sorted(written + later):
            if rev <= r:
                want[k] = v
        assert first == want and second == want
        assert any(rev > r for rev, _, _ in later)  # writes went on past R meanwhile
        # The idle group was closed at R: its next write is above R (its clock alone would have
        # put it below R: R is ahead of every clock).
        assert kv.put(by_group[idle][1], b"after") > r


def test_a_revision_beyond_what_the_cluster_issued_is_refused(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=30) as kv:
        far = _ahead(20 * MAX_CLOCK_OFFSET_MS)
        with pytest.raises(errors.InvalidArgument) as e:
            kv.get(b"at/x", revision=far)
        assert not e.value.indeterminate
        with pytest.raises(errors.InvalidArgument):
            dict(kv.scan(b"at/", revision=far))
        # Nothing was closed at it: the next write is still on the clock, far below it.
        assert kv.put(b"at/x", b"1") < far


def test_a_linearizable_scan_across_groups_is_atomic_against_a_concurrent_writer(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=30) as kv:
        by_group = keys_by_group(_shard_map(kv), b"pair/", 1)
        g1, g2, _ = sorted(by_group)
        k1, k2 = by_group[g1][0], by_group[g2][0]
        kv.put(k1, b"0")
        kv.put(k2, b"0")
        stop = threading.Event()
        failures: list[BaseException] = []
        rounds = [0]

        def writer() -> None:  # k1 then k2, each pair in order: k2 = i only after k1 = i
            try:
                with Client(cluster.endpoints, timeout=30) as w:
                    i = 0
                    while not stop.is_set() and i < 2000:
                        i += 1
                        w.put(k1, b"%d" % i)
                        w.put(k2, b"%d" % i)
                        rounds[0] = i
            except BaseException as err:  # reported by the test thread
                failures.append(err)

        t = threading.Thread(target=writer)
        t.start()
        seen: list[tuple[int, int]] = []
        try:
            for _ in range(60):
                assert not failures, failures
                snap = dict(kv.scan(b"pair/"))
                a, b = int(snap[k1]), int(snap[k2])
                seen.append((a, b))
                # Atomic: never k2's new value without k1's (and k1 at most one ahead).
                assert a in (b, b + 1), f"scan saw k1={a}, k2={b}: not one snapshot"
        finally:
            stop.set()
            t.join(60)
        assert not failures, failures
        assert len({s for s in seen}) > 5  # the scans did overlap the writes
        assert kv.revision > 0  # the client's causality floor took the scans' revisions too
