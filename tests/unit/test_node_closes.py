"""`kvstore.node.closes`: the leader's closes (checked against its clock, observed by it,
coalesced per group) and exact reads at a revision on any node (close through the leader, then
a linearizable read point), on three real hosts over an in-memory network."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.closes import CloseCallback, NodeCloses
from kvstore.node.hlc import MAX_CLOCK_OFFSET_MS, HybridClock
from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.reads import NodeReads
from kvstore.raft import ConfState, Message, MessageType, Role
from kvstore.storage import commands, mvcc

NOW_MS = mvcc.EPOCH_MS + 86_400_000
G = 3


class Cluster:
    def __init__(self) -> None:
        self.outbox: list[Message] = []
        self.forwarded: list[int] = []
        self.hosts = {i: Host(i, MemoryNodeStore(), self.outbox.extend, RaftSettings(), random.Random(i)) for i in (1, 2, 3)}
        self.closes = {i: NodeCloses(h, HybridClock(lambda: NOW_MS)) for i, h in self.hosts.items()}
        self.reads = {
            i: NodeReads(h, clock=lambda: 0.0, rng=random.Random(10 + i)) for i, h in self.hosts.items()
        }
        for h in self.hosts.values():
            h.open_group(G, ConfState((1, 2, 3)))
        self.hosts[1].groups[G].core.campaign()
        self.pump()

    def pump(self) -> None:
        for _ in range(200):
            busy = False
            for h in self.hosts.values():
                while h.has_work():
                    h.run_cycle()
                    busy = True
            msgs, self.outbox[:] = list(self.outbox), []
            for m in msgs:
                self.hosts[m.to].step(m)
                busy = True
            if not busy:
                return
        raise AssertionError("never went quiet")

    def settle(self) -> None:
        """Pump, then a heartbeat round, so the followers learn the commit index too."""
        self.pump()
        for _ in range(2):
            self.hosts[1].tick()
            self.pump()

    def last(self, node: int) -> int:
        return self.hosts[node].store.revisions.rev_state(G).last

    def forward(self, group: int, revision: int, cb: CloseCallback) -> None:
        """A non-leader's forward: the leader (node 1) closes it (as Shard.GroupPropose does)."""
        self.forwarded.append(revision)
        self.closes[1].close(group, revision, cb)


def _collect() -> tuple[list[tuple[int, errors.KVError | None]], Callable[[int, errors.KVError | None], None]]:
    out: list[tuple[int, errors.KVError | None]] = []
    return out, lambda last, err: out.append((last, err))


def test_closes_raise_last_on_every_replica_and_later_writes_go_above() -> None:
    c = Cluster()
    r = mvcc.make_revision(NOW_MS, 5, 0)
    got, cb = _collect()
    c.closes[1].close(G, r, cb)
    c.settle()
    assert got == [(r, None)] and all(c.last(n) == r for n in (1, 2, 3))
    assert c.closes[1].clock.last >= r >> mvcc.SLOT_BITS  # observed: later proposals are above R
    res: list[Any] = []
    c.hosts[1].propose(G, commands.encode_put(b"k", b"v", revision=c.closes[1].clock.propose()), lambda x, e: res.append(x))
    c.pump()
    assert res[0].revision > r and res[0].revision % mvcc.STEP == G


def test_concurrent_closes_coalesce_into_one_close_of_the_max() -> None:
    c = Cluster()
    base = mvcc.make_revision(NOW_MS, 0, 0)
    got, cb = _collect()
    nc = c.closes[1]
    nc.close(G, base + 10, cb)  # proposed at once
    for d in (30, 20, 50, 40, 5):  # wait for it; then ONE close of the max (50); 5 rides the first
        nc.close(G, base + d, cb)
    c.settle()
    assert nc.proposed == 2
    assert sorted(x for x, _ in got) == [base + 10, base + 10, base + 50, base + 50, base + 50, base + 50]
    assert all(err is None for _, err in got) and c.last(2) == base + 50
    # A close at or below the applied last needs no entry, and answers at once through a read.
    got2: list[errors.KVError | None] = []
    nc.ensure_closed(G, base + 20, c.reads[1], c.forward, got2.append)
    assert got2 == [None] and nc.proposed == 2


@given(st.one_of(
    st.integers(-(1 << 64), 1 << 64),
    st.integers(-5000, 5000).map(lambda d: mvcc.make_revision(NOW_MS + MAX_CLOCK_OFFSET_MS, 0, 0) + d),
))
def test_a_close_beyond_the_clock_bound_is_refused_definitely_and_changes_nothing(rev: int) -> None:
    host = Host(1, MemoryNodeStore(), lambda m: None, RaftSettings(), random.Random(1))
    nc = NodeCloses(host, HybridClock(lambda: NOW_MS))
    bound = mvcc.make_revision(NOW_MS + MAX_CLOCK_OFFSET_MS, 0, 0) >> mvcc.SLOT_BITS  # (ms, logical 0)
    ok = 0 <= rev <= mvcc.PROPOSAL_MAX and rev >> mvcc.SLOT_BITS <= bound
    try:
        nc.check(rev)
    except errors.InvalidArgument as err:
        assert not err.indeterminate and not ok
        assert nc.clock.last == 0
        return
    assert ok


def test_a_far_future_close_is_refused_before_proposing() -> None:
    c = Cluster()
    far = mvcc.make_revision(NOW_MS + 10 * MAX_CLOCK_OFFSET_MS, 0, 0)
    before = c.hosts[1].groups[G].core.log.last_index()
    with pytest.raises(errors.InvalidArgument):
        c.closes[1].close(G, far, lambda last, err: None)
    assert c.hosts[1].groups[G].core.log.last_index() == before and c.closes[1].proposed == 0


def test_a_follower_closes_through_the_leader_then_has_applied_it() -> None:
    c = Cluster()
    w: list[Any] = []
    c.hosts[1].propose(G, commands.encode_put(b"k", b"v1", revision=c.closes[1].clock.propose()), lambda x, e: w.append(x))
    c.pump()
    r = mvcc.make_revision(NOW_MS, 100, 0)
    assert c.last(3) < r
    done: list[errors.KVError | None] = []
    c.closes[3].ensure_closed(G, r, c.reads[3], c.forward, done.append)
    c.pump()
    assert done == [None] and c.forwarded == [r]
    assert c.last(3) >= r  # applied here: the history at r is final on node 3
    v, _ = c.hosts[3].store.revisions.get_version(G, b"k", r)
    assert v is not None and v.value == b"v1"
    # A leader's write afterwards is above r, so the answer at r never changes.
    c.hosts[1].propose(G, commands.encode_put(b"k", b"v2", revision=c.closes[1].clock.propose()), lambda x, e: w.append(x))
    c.pump()
    assert w[-1].revision > r
    v, _ = c.hosts[3].store.revisions.get_version(G, b"k", r)
    assert v is not None and v.value == b"v1"


def test_a_non_leader_refuses_to_close_itself() -> None:
    c = Cluster()
    with pytest.raises(errors.NotLeader):
        c.closes[2].close(G, mvcc.make_revision(NOW_MS, 1, 0), lambda last, err: None)


def test_closes_of_a_deposed_leader_fail_and_the_pending_ones_too() -> None:
    c = Cluster()
    base = mvcc.make_revision(NOW_MS, 0, 0)
    got, cb = _collect()
    nc = c.closes[1]
    nc.close(G, base + 1, cb)
    nc.close(G, base + 2, cb)  # waits for the first
    # Node 1 loses leadership before anything commits: node 2 takes over (messages to and
    # from node 1 are lost).
    c.outbox.clear()
    for h in c.hosts.values():
        while h.has_work():
            h.run_cycle()
    c.outbox.clear()
    core2 = c.hosts[2].groups[G].core
    c.hosts[2].step(Message(MessageType.TIMEOUT_NOW, 2, 1, term=core2.term, group=G))  # a transfer
    for _ in range(100):
        for h in c.hosts.values():
            while h.has_work():
                h.run_cycle()
        msgs, c.outbox[:] = list(c.outbox), []
        for m in msgs:
            if 1 not in (m.to, m.frm):
                c.hosts[m.to].step(m)
        if not msgs:
            break
    assert core2.role == Role.LEADER
    for _ in range(3):  # node 1 hears of the new term: its entry is replaced, its closes fail
        c.hosts[2].tick()
        c.pump()
    assert len(got) == 2 and all(err is not None and last == 0 for last, err in got)


def test_group_propose_takes_a_well_formed_close_for_any_group_and_nothing_like_it() -> None:
    from kvstore.node.grouprequests import check_group_request
    from kvstore.v1 import shard_pb2

    good = commands.encode_close(mvcc.make_revision(NOW_MS, 0, 0))
    for gid in (0, 1, G):
        assert check_group_request(shard_pb2.GroupProposeRequest(group=gid, command=good), None) is None
    # A CLOSE with a session, a key, or a truncated body is no CLOSE: refused in a data group.
    bad_session = bytearray(good)
    bad_session[2:10] = (7).to_bytes(8, "big")
    for bad in (bytes(bad_session), good[:-1], good + b"\x00"):
        with pytest.raises(errors.InvalidArgument):
            check_group_request(shard_pb2.GroupProposeRequest(group=G, command=bad), None)


def test_a_forwarded_close_is_checked_against_the_receiving_leaders_clock() -> None:
    import asyncio

    from kvstore.server.shards import local_group_call
    from kvstore.v1 import shard_pb2

    c = Cluster()

    async def call(rev: int) -> shard_pb2.GroupProposeResponse:
        req = shard_pb2.GroupProposeRequest(group=G, command=commands.encode_close(rev))
        task = asyncio.ensure_future(local_group_call(c.hosts[1], lambda: None, req, 5.0, None, c.closes[1]))
        while not task.done():  # the test drives the hosts (no node loop here)
            await asyncio.sleep(0)
            c.settle()
        return task.result()

    far = mvcc.make_revision(NOW_MS + 10 * MAX_CLOCK_OFFSET_MS, 0, 0)
    resp = asyncio.run(call(far))
    assert errors.from_proto(resp.error, is_write=True) is not None and c.closes[1].proposed == 0
    ok = mvcc.make_revision(NOW_MS, 9, 0)
    resp = asyncio.run(call(ok))
    assert not resp.error.code and commands.decode_result(resp.result).revision == ok == c.last(1)
    # Without the node's closes (no clock to check against) a CLOSE is refused, not proposed.
    req = shard_pb2.GroupProposeRequest(group=G, command=commands.encode_close(ok + 1))
    resp = asyncio.run(local_group_call(c.hosts[1], lambda: None, req, 5.0, None, None))
    err = errors.from_proto(resp.error, is_write=True)
    assert err is not None and not err.indeterminate and "does not close groups" in str(err)
    assert c.last(1) == ok


def test_repeated_closes_cannot_ratchet_the_bound_forward() -> None:
    """Each close is observed by the leader's clock, but the bound is the wall clock's: a close
    at the bound, then one at the bound past it, is refused (else closes could drag revisions
    forward without limit)."""
    c = Cluster()
    nc = c.closes[1]
    edge = mvcc.make_revision(NOW_MS + MAX_CLOCK_OFFSET_MS, 0, 0)
    got, cb = _collect()
    nc.close(G, edge, cb)
    c.settle()
    assert got == [(edge, None)] and nc.clock.last >= edge >> mvcc.SLOT_BITS
    with pytest.raises(errors.InvalidArgument):
        nc.close(G, mvcc.make_revision(NOW_MS + 2 * MAX_CLOCK_OFFSET_MS, 0, 0), cb)


def test_a_group_that_leaves_the_node_while_its_close_is_forwarded_fails_the_read_definitely() -> None:
    """Found by the simulator (seed 1052): a replica's group was removed (a range move emptied
    it) between forwarding the close and the answer; the read must fail, not raise."""
    c = Cluster()
    r = mvcc.make_revision(NOW_MS, 100, 0)

    def forward(group: int, revision: int, cb: CloseCallback) -> None:
        c.hosts[3].close_group(G, destroy=False)
        c.closes[1].close(group, revision, cb)

    done: list[errors.KVError | None] = []
    c.closes[3].ensure_closed(G, r, c.reads[3], forward, done.append)
    c.settle()
    assert len(done) == 1 and isinstance(done[0], errors.WrongShard) and not done[0].indeterminate
