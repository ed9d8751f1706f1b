"""Replica reads on the real host and state machine, in process: three voter hosts and a learner
host with LMDB stores, messages routed in memory (and dropped to make partitions), a fake clock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore import errors
from kvstore.node.host import Host, RaftSettings
from kvstore.raft import ConfState, Message, Role
from kvstore.server.reads import ReadPoint, ReadSettings, ReplicaReads
from kvstore.storage import commands
from kvstore.storage.store import LmdbNodeStore as NodeStore
from kvstore.v1 import kv_pb2

GROUP = 1
VOTERS = (1, 2, 3)
LEARNER = 4
TICK_MS = 100


class Net:
    def __init__(self, root: Path) -> None:
        self.now = 1000.0
        self.queue: list[Message] = []
        self.cut: set[int] = set()
        self.hosts: dict[int, Host] = {}
        self.reads: dict[int, ReplicaReads] = {}
        conf = ConfState(VOTERS, (LEARNER,))
        for nid in (*VOTERS, LEARNER):
            store = NodeStore(root / f"n{nid}", sync=False)
            host = Host(nid, store, self.queue.extend, RaftSettings(tick_ms=TICK_MS, election_tick=10), random.Random(nid))
            host.open_group(GROUP, conf)
            self.hosts[nid] = host
            self.reads[nid] = ReplicaReads(host, ReadSettings(probe_ticks=1, demand_ticks=0), clock=lambda: self.now)

    def close(self) -> None:
        for h in self.hosts.values():
            h.store.close()

    def core(self, nid: int):  # type: ignore[no-untyped-def]
        return self.hosts[nid].groups[GROUP].core

    def pump(self) -> None:
        for _ in range(1000):
            busy = False
            for h in self.hosts.values():
                while h.has_work():
                    h.run_cycle()
                    busy = True
            q, self.queue[:] = list(self.queue), []
            for m in q:
                busy = True
                if m.frm in self.cut or m.to in self.cut:
                    continue
                self.hosts[m.to].step(m)
            if not busy:
                return
        raise AssertionError("did not settle")

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.now += TICK_MS / 1000
            for nid, h in self.hosts.items():
                h.tick()
                self.reads[nid].tick()
            self.pump()

    def elect(self) -> int:
        self.core(1).campaign()
        self.pump()
        assert self.core(1).role == Role.LEADER
        return 1

    def put(self, key: bytes, value: bytes) -> int:
        done: list[object] = []
        idx = self.hosts[1].propose(GROUP, commands.encode_put(key, value), lambda r, e: done.append(e))
        self.pump()
        assert done == [None]
        return idx


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path)
    try:
        n.elect()
        n.tick(2)
        yield n
    finally:
        n.close()


def _read(net: Net, nid: int) -> list[tuple[int, errors.KVError | None]]:
    out: list[tuple[int, errors.KVError | None]] = []
    net.reads[nid].replica_read(GROUP, lambda i, e: out.append((i, e)))
    return out


def test_learner_linearizable_read_sees_every_acknowledged_write(net: Net) -> None:
    for i in range(5):
        idx = net.put(b"k", b"v%d" % i)
        out = _read(net, LEARNER)
        net.pump()
        assert out and out[0][1] is None and out[0][0] >= idx
        assert net.hosts[LEARNER].store.get(GROUP, b"k") == b"v%d" % i


def test_learner_read_waits_until_applied_through_the_read_index(net: Net) -> None:
    net.cut = {LEARNER}
    idx = net.put(b"k", b"new")  # committed by the voters; the learner has not seen it
    net.cut = set()
    # The learner's read index is >= idx, so it must wait for the entry to arrive and apply.
    out = _read(net, LEARNER)
    net.pump()
    assert out[0][1] is None and out[0][0] >= idx
    assert net.hosts[LEARNER].store.get(GROUP, b"k") == b"new"


def test_partitioned_learner_refuses_linearizable_reads_and_reports_growing_staleness(net: Net) -> None:
    net.put(b"k", b"old")
    net.tick(1)
    r = net.reads[LEARNER]
    assert r.staleness(GROUP) is not None and r.staleness(GROUP) <= 0.2
    net.cut = {LEARNER}
    pending = _read(net, LEARNER)  # sent just as the partition starts: never answered
    net.put(b"k", b"new")
    election = net.core(LEARNER).cfg.election_tick
    net.tick(election)
    # The pending read failed with a definite, retryable error; it was not served stale.
    assert len(pending) == 1 and isinstance(pending[0][1], errors.StaleReplica)
    # New linearizable reads are refused at once.
    with pytest.raises(errors.StaleReplica, match="has not heard from the leader"):
        _read(net, LEARNER)
    # Stale reads are served, and their staleness bound covers the partition.
    s = r.staleness(GROUP)
    assert s is not None and s >= election * TICK_MS / 1000

    async def points() -> tuple[object, ...]:
        async def never() -> int:
            raise AssertionError("a replica must not use the leader path")

        stale = await r.read_point(GROUP, kv_pb2.STALE, 0, never, lambda: None)
        with pytest.raises(errors.StaleReplica, match="cannot show it is within 500 ms"):
            await r.read_point(GROUP, kv_pb2.BOUNDED, 500, never, lambda: None)
        loose = await r.read_point(GROUP, kv_pb2.BOUNDED, 60_000, never, lambda: None)
        with pytest.raises(errors.StaleReplica):
            await r.read_point(GROUP, kv_pb2.LINEARIZABLE, 0, never, lambda: None)
        return stale, loose

    stale, loose = asyncio.run(points())
    assert stale.staleness == s and stale.staleness_ms >= 1000  # type: ignore[attr-defined]
    assert loose.level == "bounded"  # type: ignore[attr-defined]
    assert net.hosts[LEARNER].store.get(GROUP, b"k") == b"old"
    # Healed: it catches up, the bound shrinks, linearizable reads work again.
    net.cut = set()
    net.tick(3)
    out = _read(net, LEARNER)
    net.pump()
    assert out[0][1] is None and net.hosts[LEARNER].store.get(GROUP, b"k") == b"new"
    s2 = r.staleness(GROUP)
    assert s2 is not None and s2 <= 0.3


def test_pending_read_fails_when_the_leader_goes_away(net: Net) -> None:
    net.cut = {1}
    out = _read(net, 2)
    net.tick(4 * net.core(2).cfg.election_tick)  # 2 and 3 elect a new leader meanwhile
    assert len(out) == 1 and isinstance(out[0][1], errors.KVError) and not out[0][1].indeterminate
    assert net.core(2).role == Role.LEADER or net.core(3).role == Role.LEADER
    # The learner follows the new leader and serves linearizable reads again.
    out = _read(net, LEARNER)
    net.pump()
    assert out[0][1] is None


def test_leader_bounded_read_falls_back_to_read_index(net: Net) -> None:
    r = net.reads[1]
    net.reads[1]._fresh.clear()  # no evidence yet (as right after an election)
    called: list[int] = []

    async def leader_read() -> int:
        called.append(1)
        return 7

    async def go() -> object:
        return await r.read_point(GROUP, kv_pb2.BOUNDED, 100, leader_read, lambda: None)

    p = asyncio.run(go())
    assert called == [1] and p.index == 7 and p.staleness == 0.0  # type: ignore[attr-defined]


def test_probes_follow_demand_and_an_idle_bounded_read_gets_fresh_evidence(net: Net) -> None:
    """With demand-driven probing (the default), a follower of an idle group sends no probes at
    all (learners, read replicas, always probe); a bounded read on it then runs one read-index
    round and is served with an honest, small bound; and from then on the group is probed until
    it goes idle again."""
    net.put(b"k", b"v")
    follower = next(n for n in VOTERS if net.core(n).role != Role.LEADER)
    r = ReplicaReads(net.hosts[follower], ReadSettings(probe_ticks=1, demand_ticks=5), clock=lambda: net.now)
    net.reads[follower] = r
    net.tick(3)
    assert r.staleness(GROUP) is None and not r._pending  # idle: nothing was probed

    async def bounded() -> ReadPoint:
        async def never() -> int:
            raise AssertionError("a replica must not take the leader's path")

        task = asyncio.ensure_future(
            r.read_point(GROUP, kv_pb2.BOUNDED, 500, never, lambda: None)
        )
        for _ in range(50):
            await asyncio.sleep(0)
            net.pump()
            if task.done():
                break
        return await task

    point = asyncio.run(bounded())
    assert point.staleness is not None and point.staleness <= 0.5
    assert net.hosts[follower].store.get(GROUP, b"k") == b"v"
    net.tick(2)
    assert r._fresh[GROUP].last_probe_tick > 0  # probing while in demand
    last = r._fresh[GROUP].last_probe_tick
    net.tick(10)
    probed_until = r._fresh[GROUP].last_probe_tick
    net.tick(10)
    assert r._fresh[GROUP].last_probe_tick == probed_until >= last  # idle again: no more probes
