"""The drain step (`Host.drain_leadership`) and the readiness rule (`kvstore.node.readiness`) on
three real hosts over an in-memory network."""

from __future__ import annotations

import random
from typing import Any

from kvstore import errors
from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.readiness import Readiness
from kvstore.raft import ConfState, Message, Role
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import commands

G = 1


class Net:
    def __init__(self, groups: tuple[int, ...] = (META_GROUP, G)) -> None:
        self.outbox: list[Message] = []
        self.down: set[int] = set()
        self.hosts = {i: Host(i, MemoryNodeStore(), self.outbox.extend, RaftSettings(), random.Random(i))
                      for i in (1, 2, 3)}
        for h in self.hosts.values():
            for g in groups:
                h.open_group(g, ConfState((1, 2, 3)))
        for g in groups:
            self.hosts[1].groups[g].core.campaign()
        self.pump()
        self.tick(2)  # heartbeats: the followers learn the commit index

    def pump(self) -> None:
        for _ in range(500):
            busy = False
            for nid, h in self.hosts.items():
                while nid not in self.down and h.has_work():
                    h.run_cycle()
                    busy = True
            msgs, self.outbox[:] = list(self.outbox), []
            for m in msgs:
                if m.to not in self.down and m.frm not in self.down:
                    self.hosts[m.to].step(m)
                    busy = True
            if not busy:
                return
        raise AssertionError("never went quiet")

    def round(self) -> None:
        """One cycle of every node with work, then one delivery of what they sent."""
        for nid, h in self.hosts.items():
            if nid not in self.down and h.has_work():
                h.run_cycle()
        msgs, self.outbox[:] = list(self.outbox), []
        for m in msgs:
            if m.to not in self.down and m.frm not in self.down:
                self.hosts[m.to].step(m)

    def tick_one(self, nid: int) -> None:
        self.hosts[nid].tick()

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            for nid, h in self.hosts.items():
                if nid not in self.down:
                    h.tick()
            self.pump()

    def leader(self, group: int) -> int:
        leads = [nid for nid, h in self.hosts.items() if nid not in self.down and h.groups[group].core.role == Role.LEADER]
        assert len(leads) <= 1
        return leads[0] if leads else 0


def test_a_drain_hands_every_group_over_and_answers_the_writes_waiting_here() -> None:
    net = Net()
    h1 = net.hosts[1]
    results: list[tuple[Any, errors.KVError | None]] = []
    h1.propose(G, commands.encode_put(b"k", b"v"), lambda r, e: results.append((r, e)))
    led, stuck = h1.drain_leadership()  # before the write is even replicated
    assert sorted(led) == [META_GROUP, G] and stuck == []
    # during the hand-over a new write is refused, definitely
    try:
        h1.propose(G, commands.encode_put(b"k2", b"v"), lambda r, e: None)
        raise AssertionError("proposal accepted during a transfer")
    except errors.KVError as err:
        assert not err.indeterminate
    net.pump()
    net.tick(2)
    assert h1.drain_leadership() == ([], [])
    assert net.leader(META_GROUP) in (2, 3) and net.leader(G) in (2, 3)
    assert h1.pending_writes() == 0
    assert len(results) == 1 and results[0][1] is None  # answered with its result, not an error
    # The new leader holds the write.
    assert net.hosts[net.leader(G)].store.get(G, b"k") == b"v"


def test_a_draining_node_refuses_leadership_and_a_drain_gives_up_when_nobody_takes_it() -> None:
    net = Net(groups=(G,))
    h1 = net.hosts[1]
    h1.drain_leadership()
    net.pump()
    new = net.leader(G)
    assert new in (2, 3)
    net.hosts[new].transfer_leader(G, 1)  # offered back while it drains: refused
    net.pump()
    net.tick(25)  # the offer times out
    assert net.leader(G) == new
    # Node `new` drains too, with node 1 draining and the third node down: each live voter is
    # offered the group once, then the drain gives the group up (it stays led here).
    third = ({2, 3} - {new}).pop()
    net.down.add(third)
    hn = net.hosts[new]
    hn.suspected = {third}
    led, stuck = hn.drain_leadership()
    assert led == [G] and stuck == []  # offered to node 1, which refuses
    net.pump()
    for _ in range(40):  # the offer times out (the group may quiesce meanwhile: a drain wakes it)
        net.tick()
        led, stuck = hn.drain_leadership()
        if stuck:
            break
    assert led == [G] and stuck == [G]
    assert net.leader(G) == new


def test_readiness_follows_storage_membership_leader_and_catch_up() -> None:
    net = Net()
    r1, r2 = Readiness(net.hosts[1]), Readiness(net.hosts[2])
    assert r1.check() is None and r2.check() is None
    # a node that does not host the metadata group (a --join node not added yet)
    lone = Host(9, MemoryNodeStore(), lambda ms: None, RaftSettings(), random.Random(9))
    assert "not a member" in (Readiness(lone).check() or "")
    # storage failed
    net.hosts[2].failed = "no space left on device"
    assert Readiness(net.hosts[2]).check() == "storage failed: no space left on device"
    net.hosts[2].failed = None
    # the follower's leader falls silent; the leader loses its quorum
    net.hosts[2].suspected = {1}
    assert r2.check() == "the metadata group's leader (node 1) is unreachable"
    net.hosts[1].suspected = {2, 3}
    assert r1.check() == "leads the metadata group but only 1 of its 3 voters are reachable"
    net.hosts[1].suspected = {3}
    assert r1.check() is None  # 2 of 3 is a quorum
    # a node has not caught up before its metadata group applied what it knows is committed:
    # node 3 learns the new commit index, and its next Ready cycle (which would apply) waits
    fresh = Readiness(net.hosts[3])
    core = net.hosts[3].groups[META_GROUP].core
    net.hosts[1].propose(META_GROUP, commands.encode_put(b"m", b"1"), lambda r, e: None)
    for _ in range(50):
        if core.applied < core.committed:
            break
        net.round()
        net.tick_one(1)
    assert core.applied < core.committed
    assert (fresh.check() or "").startswith("catching up: the metadata group applied")
    net.pump()
    assert fresh.check() is None and fresh.caught_up
