"""The synchronous `Client` shared by many threads against a real 3-node cluster: every thread's
mixed operations (put, get, cas, delete, scan) see exactly that thread's own writes, and close()
with threads still calling leaves none of them waiting."""

from __future__ import annotations

import threading
import time

import pytest
from clusterharness import Cluster

from kvstore import errors
from kvstore.client import Client

pytestmark = pytest.mark.timeout(120)

THREADS = 24
ROUNDS = 8


def test_threads_share_one_client_and_each_reads_its_own_writes(cluster: Cluster) -> None:
    failures: list[BaseException] = []
    expected: dict[int, dict[bytes, bytes]] = {}
    with Client(cluster.endpoints, timeout=20) as c:

        def worker(w: int) -> None:
            mine: dict[bytes, bytes] = {}
            try:
                for i in range(ROUNDS):
                    k = b"thr/%02d/%02d" % (w, i)
                    c.put(k, b"%d.%d" % (w, i))
                    mine[k] = b"%d.%d" % (w, i)
                    assert c.get(k) == mine[k]
                    if i % 3 == 1:
                        assert c.cas(k, mine[k], b"cas.%d" % w)
                        assert not c.cas(k, mine[k], b"lost")
                        mine[k] = b"cas.%d" % w
                    elif i % 3 == 2:
                        assert c.delete(k)
                        del mine[k]
                        assert c.get(k) is None
                    assert dict(c.scan(b"thr/%02d/" % w)) == mine
                expected[w] = mine
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[0]
        everything = dict(c.scan(b"thr/"))
    assert everything == {k: v for mine in expected.values() for k, v in mine.items()}
    assert len(expected) == THREADS


def test_close_with_threads_calling_leaves_none_waiting(cluster: Cluster) -> None:
    """Threads put in a loop while close() runs: each stops with a result or a clear error
    (`ClientClosed`, definite, for a call refused or never started; a `KVError` saying
    definite or indeterminate for one cancelled in flight), and every acknowledged put is there."""
    c = Client(cluster.endpoints, timeout=20)
    c.put(b"warm", b"up")
    acked: list[bytes] = []
    outcomes: list[BaseException] = []
    started = threading.Barrier(9)

    def worker(w: int) -> None:
        started.wait()
        for i in range(10_000):  # bounded; close() ends it long before
            k = b"cl/%d/%d" % (w, i)
            try:
                c.put(k, b"v")
            except (RuntimeError, errors.KVError) as e:
                outcomes.append(e)
                return
            acked.append(k)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    started.wait()
    deadline = time.monotonic() + 30
    while len(acked) < 40:  # close while the puts are flowing
        assert time.monotonic() < deadline and not outcomes, outcomes
        time.sleep(0.01)
    c.close()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == 8
    for e in outcomes:
        assert "closed" in str(e), e
        if isinstance(e, errors.ClientClosed):
            assert e.definite  # refused, or never started: not applied
        elif isinstance(e, errors.KVError):
            assert e.indeterminate  # a put cancelled in flight may have been applied
    with Client(cluster.endpoints, timeout=20) as check:
        stored = dict(check.scan(b"cl/"))
    assert set(acked) <= set(stored)
