"""Quiescence (hibernation) of idle Raft groups in the pure core."""

from __future__ import annotations

import random

from raftnet import Network

from kvstore.raft import (
    Config,
    ConfState,
    MemoryStorage,
    Message,
    MessageType,
    ProgressState,
    RaftNode,
    Role,
)

MT = MessageType
Q = 3  # quiesce_ticks used by most tests


def quiesce_all(net: Network, max_ticks: int = 40) -> int:
    """Tick until every member is quiesced; returns the ticks it took."""
    for t in range(1, max_ticks + 1):
        net.tick(1)
        if all(m.node.quiesced for m in net.members.values()):
            return t
    raise AssertionError(f"group did not quiesce within {max_ticks} ticks")


def quiet_net(**cfg: object) -> Network:
    cfg.setdefault("quiesce_ticks", Q)
    net = Network(**cfg)
    net.elect(1)
    net.propose(1, b"x")
    quiesce_all(net)
    return net


def test_leader_quiesces_after_idle_ticks_and_sends_quiesce_heartbeats() -> None:
    net = Network(quiesce_ticks=Q)
    leader = net.elect(1)
    net.propose(1, b"x")
    net.delivered.clear()
    ticks = 0
    while not leader.quiesced:
        net.tick(1)
        ticks += 1
        assert ticks <= Q + 2
    # One tick for the followers to report the commit index, then Q idle ticks.
    assert ticks >= Q
    quiesce_hbs = [m for m in net.delivered if m.type == MT.HEARTBEAT and m.quiesce]
    assert sorted(m.to for m in quiesce_hbs) == [2, 3]
    last = leader.log.last_index()
    assert all(m.commit == last and m.log_term == leader.term for m in quiesce_hbs)
    # The followers quiesced on it and said so.
    assert net.node(2).quiesced and net.node(3).quiesced
    acks = [m for m in net.delivered if m.type == MT.HEARTBEAT_RESP and m.quiesce]
    assert sorted(m.frm for m in acks) == [2, 3] and not any(m.reject for m in acks)
    assert leader.quiesced and leader.role == Role.LEADER
    assert leader.status()["quiesced"] is True


def test_proposals_keep_the_leader_awake() -> None:
    net = Network(quiesce_ticks=Q)
    leader = net.elect(1)
    for i in range(20):
        net.propose(1, b"p%d" % i)
        net.tick(1)
        assert not leader.quiesced
    quiesce_all(net)


def test_ticks_while_quiesced_do_nothing() -> None:
    net = quiet_net()
    before = {nid: (m.node.tick_count, m.node.election_elapsed, m.node.heartbeat_elapsed)
              for nid, m in net.members.items()}
    net.delivered.clear()
    for m in net.members.values():
        for _ in range(1000):
            m.node.tick()
            assert not m.node.has_ready()
    net.stabilize()
    assert net.delivered == []
    after = {nid: (m.node.tick_count, m.node.election_elapsed, m.node.heartbeat_elapsed)
             for nid, m in net.members.items()}
    assert after == before
    # Many election timeouts later, no follower has campaigned and no leader stepped down.
    assert net.node(1).role == Role.LEADER
    assert all(net.node(i).role == Role.FOLLOWER and net.node(i).lead == 1 for i in (2, 3))


def test_proposal_wakes_the_leader_and_commits_normally() -> None:
    net = quiet_net()
    leader = net.node(1)
    term = leader.term
    net.delivered.clear()
    idx = leader.propose(b"wake")
    assert not leader.quiesced
    net.stabilize()
    assert all(not net.node(i).quiesced for i in (1, 2, 3))  # the wake-up heartbeat woke them
    net.heartbeat(1)  # followers learn the commit index with the next heartbeat
    for nid in (1, 2, 3):
        assert net.applied_data(nid)[-1] == b"wake"
        assert net.node(nid).committed == idx
    assert leader.term == term and leader.role == Role.LEADER
    # No follower asked the leader to wake: it woke first and told them.
    assert not [m for m in net.delivered if m.type == MT.HEARTBEAT_RESP and m.reject]
    quiesce_all(net)


def test_a_message_wakes_a_follower_which_wakes_its_leader() -> None:
    net = quiet_net()
    n2 = net.node(2)
    stale_app = next(m for m in reversed(net.delivered) if m.type == MT.APP and m.to == 2)
    net.delivered.clear()
    n2.step(stale_app)  # e.g. a duplicated append that arrives late
    assert not n2.quiesced
    net.stabilize()
    wake_reqs = [m for m in net.delivered if m.type == MT.HEARTBEAT_RESP and m.reject]
    assert [(m.frm, m.to) for m in wake_reqs] == [(2, 1)]
    assert not net.node(1).quiesced and not net.node(3).quiesced
    term = net.node(1).term
    quiesce_all(net)  # the whole group goes back to sleep, without an election
    assert net.node(1).term == term and net.node(1).role == Role.LEADER


def test_late_acks_and_heartbeats_do_not_wake_anyone() -> None:
    net = Network(quiesce_ticks=Q)
    net.elect(1)
    net.propose(1, b"x")
    net.tick(1)
    old_hb = next(m for m in reversed(net.delivered) if m.type == MT.HEARTBEAT and m.to == 2)
    old_ack = next(m for m in reversed(net.delivered) if m.type == MT.HEARTBEAT_RESP and m.frm == 2)
    old_app_ack = next(m for m in reversed(net.delivered) if m.type == MT.APP_RESP and m.frm == 2)
    quiesce_all(net)
    net.node(1).step(old_ack)
    net.node(1).step(old_app_ack)
    net.node(2).step(old_hb)
    q = next(m for m in reversed(net.delivered) if m.type == MT.HEARTBEAT and m.quiesce and m.to == 2)
    net.node(2).step(q)  # a duplicate of the quiesce heartbeat
    assert all(m.node.quiesced for m in net.members.values())
    assert not any(m.node.has_ready() for m in net.members.values())


def test_wake_request_wakes_a_quiesced_leader() -> None:
    net = quiet_net()
    leader = net.node(1)
    leader.step(Message(MT.HEARTBEAT_RESP, 1, 3, term=leader.term, reject=True))
    assert not leader.quiesced
    rd = leader.ready()
    assert sorted(m.to for m in rd.messages if m.type == MT.HEARTBEAT and not m.quiesce) == [2, 3]
    leader.advance(rd)


def test_host_wake_then_election_after_leader_death() -> None:
    net = quiet_net()
    old_term = net.node(1).term
    net.isolate(1)  # the leader's node dies while the group is quiescent
    net.tick(100, only=[2, 3])
    assert net.node(2).role == Role.FOLLOWER and net.node(3).role == Role.FOLLOWER
    assert net.node(2).quiesced and net.node(3).quiesced  # only node-level liveness can notice
    n2, n3 = net.node(2), net.node(3)
    # The host of node 2 notices first; a woken follower waits a full election timeout.
    n2.wake()
    assert not n2.quiesced and n2.election_elapsed == 0
    assert n2.cfg.election_tick <= n2.randomized_election_timeout < 2 * n2.cfg.election_tick
    net.tick(n2.cfg.election_tick - 1, only=[2])
    assert n2.role == Role.FOLLOWER and n2.term == old_term
    # It campaigns; node 3, still quiesced, wakes on the pre-vote and votes.
    net.tick(n2.cfg.election_tick + 1, only=[2, 3])
    assert n2.role == Role.LEADER and n2.term == old_term + 1
    assert n3.lead == 2 and n3.vote == 2 and not n3.quiesced
    net.propose(2, b"after")
    net.heartbeat(2)
    assert net.applied_data(3)[-1] == b"after"
    # The old leader, still quiesced, steps down as soon as it hears from the new one.
    net.heal()
    assert net.node(1).quiesced and net.node(1).role == Role.LEADER
    net.tick(2, only=[2, 3])
    assert net.node(1).role == Role.FOLLOWER and net.node(1).lead == 2
    assert net.applied_data(1)[-1] == b"after"


def test_follower_behind_does_not_quiesce_and_keeps_the_leader_awake() -> None:
    net = Network(quiesce_ticks=Q)
    leader = net.elect(1)
    net.isolate(3)
    net.propose(1, b"only-two-have-it")
    net.tick(10 * Q, only=[1, 2])
    assert not leader.quiesced and not net.node(2).quiesced  # node 3 has not caught up
    assert leader.prs[3].match < leader.log.last_index()
    net.heal()
    quiesce_all(net)
    assert net.applied_data(3) == [b"only-two-have-it"]


def test_leader_waits_until_every_follower_knows_the_commit_index() -> None:
    net = Network(quiesce_ticks=Q)
    leader = net.elect(1)
    net.tick(1)

    def hide_commit_from_3(m: Message) -> bool:
        if m.to == 3 and m.type == MT.APP:
            m.commit = 0  # node 3 gets the entries but never learns they committed
        return not (m.to == 3 and m.type == MT.HEARTBEAT)

    net.filter = hide_commit_from_3
    net.propose(1, b"x")
    net.tick(10 * Q)
    assert leader.prs[3].match == leader.log.last_index() == leader.committed
    assert net.node(3).committed < leader.committed
    assert not leader.quiesced
    net.filter = None
    quiesce_all(net)
    assert net.node(3).committed == leader.committed


def test_follower_refuses_a_quiesce_heartbeat_it_cannot_honour() -> None:
    net = Network(quiesce_ticks=Q)
    leader = net.elect(1)
    net.propose(1, b"x")
    n2 = net.node(2)
    last = n2.log.last_index()
    for commit, log_term in ((last - 1, leader.term), (last, leader.term + 1)):
        n2.step(Message(MT.HEARTBEAT, 2, 1, term=leader.term, commit=commit, log_term=log_term,
                        index=leader.tick_count + 100, quiesce=True))
        assert not n2.quiesced
        rd = n2.ready()
        (resp,) = [m for m in rd.persisted_messages if m.type == MT.HEARTBEAT_RESP]
        assert resp.reject and not resp.quiesce  # "stay awake", which wakes a quiesced leader
        n2.advance(rd)


def test_lease_is_not_served_while_quiesced_nor_after_wake_until_fresh_acks() -> None:
    net = Network(lease_read=True, quiesce_ticks=Q)
    leader = net.elect(1)
    net.propose(1, b"x")
    net.tick(2)
    leader.read_index(b"awake")
    net.stabilize()
    assert [r.context for r in net.members[1].reads] == [b"awake"]  # the lease works
    quiesce_all(net)
    assert not leader._lease_valid()  # the lease was given up with quiescence
    old_ack = next(m for m in reversed(net.delivered) if m.type == MT.HEARTBEAT_RESP and not m.quiesce)
    # A read wakes the leader; its heartbeats are lost, so it must not be served.
    net.drop_types = {MT.HEARTBEAT}
    leader.read_index(b"after-wake")
    assert not leader.quiesced
    net.stabilize()
    assert [r.context for r in net.members[1].reads] == [b"awake"]
    # A late acknowledgement of a heartbeat sent before quiescing does not count either.
    leader.step(old_ack)
    assert not leader._lease_valid()
    net.stabilize()
    assert [r.context for r in net.members[1].reads] == [b"awake"]
    # Fresh acknowledgements of post-wake heartbeats confirm the read and renew the lease.
    net.drop_types = set()
    net.tick(1)
    assert [r.context for r in net.members[1].reads] == [b"awake", b"after-wake"]
    assert leader._lease_valid()
    net.delivered.clear()
    leader.read_index(b"lease-again")
    net.stabilize()
    assert net.members[1].reads[-1].context == b"lease-again"
    assert not [m for m in net.delivered if m.type == MT.HEARTBEAT]  # served from the lease


def test_quiesced_follower_woken_by_vote_request_votes() -> None:
    net = quiet_net(lease_read=True)
    n2 = net.node(2)
    term = n2.term
    last, lt = n2.log.last_index(), n2.log.last_term()
    n2.step(Message(MT.PRE_VOTE, 2, 3, term=term + 1, index=last, log_term=lt))
    assert not n2.quiesced
    rd = n2.ready()
    (pre,) = [m for m in rd.persisted_messages if m.type == MT.PRE_VOTE_RESP]
    assert not pre.reject  # not ignored on the "in leader lease" rule
    wake = [m for m in rd.persisted_messages if m.type == MT.HEARTBEAT_RESP]
    assert [(m.to, m.reject) for m in wake] == [(1, True)]  # and it asks its leader to wake
    n2.advance(rd)
    n2.step(Message(MT.VOTE, 2, 3, term=term + 1, index=last, log_term=lt))
    rd = n2.ready()
    (vote,) = [m for m in rd.persisted_messages if m.type == MT.VOTE_RESP]
    assert not vote.reject and n2.vote == 3 and n2.term == term + 1
    n2.advance(rd)


def test_awake_follower_still_ignores_votes_in_lease() -> None:
    """The lease rule is only lifted for a follower woken from quiescence."""
    net = quiet_net(lease_read=True)
    net.node(1).propose(b"wake")
    net.stabilize()
    n2 = net.node(2)
    assert not n2.quiesced and n2.lead == 1
    term = n2.term
    n2.step(Message(MT.VOTE, 2, 3, term=term + 1, index=100, log_term=term + 1))
    assert n2.term == term and n2.vote != 3


def test_stale_quiesce_heartbeat_after_wake_does_not_quiesce() -> None:
    net = quiet_net()
    q = next(m for m in reversed(net.delivered) if m.type == MT.HEARTBEAT and m.quiesce and m.to == 2)
    net.node(1).wake()  # the leader wakes and heartbeats; node 2 acknowledges a post-wake heartbeat
    net.stabilize()
    n2 = net.node(2)
    assert not n2.quiesced and n2.log.last_index() == q.commit  # nothing else changed
    n2.step(q)  # the old quiesce heartbeat, delivered late: the leader may count on node 2 again
    assert not n2.quiesced
    # Heartbeat indexes keep growing across quiescence.
    hbs = [m.index for m in net.delivered if m.type == MT.HEARTBEAT and m.to == 2]
    assert hbs == sorted(hbs)


def test_conf_change_and_transfer_wake_and_work() -> None:
    from kvstore.raft import ConfChange, ConfChangeType

    net = quiet_net()
    leader = net.node(1)
    net.add(4)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    assert not leader.quiesced
    net.stabilize()
    net.tick(2)
    assert net.node(4).conf.learners == (4,)
    quiesce_all(net)  # learners quiesce too
    assert net.node(4).quiesced
    net.node(1).transfer_leader(2)
    net.stabilize()
    assert net.node(2).role == Role.LEADER
    quiesce_all(net)


def test_follower_read_index_wakes_follower_and_leader() -> None:
    net = quiet_net()
    net.node(3).read_index(b"f")
    assert not net.node(3).quiesced
    net.stabilize()
    (rs,) = net.members[3].reads
    assert rs.context == b"f" and rs.index == net.node(1).committed
    assert not net.node(1).quiesced


def test_learner_that_missed_the_quiesce_heartbeat_wakes_its_leader() -> None:
    net = Network(learners=[4], quiesce_ticks=Q)
    leader = net.elect(1)
    net.propose(1, b"x")
    net.filter = lambda m: not (m.type == MT.HEARTBEAT and m.quiesce and m.to == 4)
    for _ in range(40):
        net.tick(1)
        if leader.quiesced:
            break
    assert leader.quiesced and net.node(2).quiesced and not net.node(4).quiesced
    net.filter = None
    term = leader.term
    quiesce_all(net, max_ticks=2 * leader.cfg.election_tick + 2 * Q + 4)
    assert leader.term == term and leader.role == Role.LEADER


def test_learner_restarted_in_a_quiescent_group_wakes_it() -> None:
    net = Network(learners=[4], quiesce_ticks=Q)
    leader = net.elect(1)
    net.propose(1, b"x")
    quiesce_all(net)
    net.restart(4)  # knows no leader now; the quiesced group sends nothing
    n4 = net.node(4)
    assert n4.lead == 0 and not n4.quiesced
    quiesce_all(net, max_ticks=2 * leader.cfg.election_tick + 2 * Q + 4)
    assert n4.lead == 1 and leader.role == Role.LEADER


def test_a_removed_node_does_not_keep_waking_the_group() -> None:
    from kvstore.raft import ConfChange, ConfChangeType

    net = Network(ids=[1, 2, 3, 4], quiesce_ticks=Q)
    old = net.elect(1)
    net.tick(2)
    old.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))  # the leader removes itself
    net.stabilize()
    assert old.role == Role.FOLLOWER and old.conf.voters == (2, 3, 4)  # knows; keeps running
    net.tick(3 * old.cfg.election_tick)
    new = net.leader()
    assert new is not None and new.id != 1
    for _ in range(40):
        net.tick(1)
        if all(net.node(i).quiesced for i in (2, 3, 4)):
            break
    net.delivered.clear()
    net.tick(10 * old.cfg.election_tick)
    assert all(net.node(i).quiesced for i in (2, 3, 4))
    assert not [m for m in net.delivered if m.frm == 1]


def test_unreachable_follower_is_probed_back_and_the_group_quiesces() -> None:
    net = Network(quiesce_ticks=Q)
    leader = net.elect(1)
    net.propose(1, b"x")
    leader.report_unreachable(2)
    assert leader.prs[2].state == ProgressState.PROBE
    quiesce_all(net)
    assert leader.prs[2].state == ProgressState.REPLICATE


def test_single_voter_group_quiesces_and_wakes() -> None:
    net = Network(ids=[1], quiesce_ticks=Q)
    leader = net.elect(1)
    quiesce_all(net)
    net.propose(1, b"solo")
    assert net.applied_data(1) == [b"solo"] and not leader.quiesced
    quiesce_all(net)


def test_wake_is_always_safe() -> None:
    net = Network(quiesce_ticks=Q)
    net.elect(1)
    for m in net.members.values():
        m.node.wake()  # awake: no-op
        assert not m.node.has_ready()
    quiesce_all(net)
    net.node(1).wake()
    net.stabilize()
    assert all(not m.node.quiesced for m in net.members.values())
    quiesce_all(net)
    assert net.node(1).role == Role.LEADER


def test_quiesce_ticks_zero_leaves_behaviour_unchanged() -> None:
    net = Network()  # quiesce_ticks defaults to 0
    leader = net.elect(1)
    net.propose(1, b"x")
    net.delivered.clear()
    net.tick(200)
    assert not any(m.node.quiesced for m in net.members.values())
    hbs = [m for m in net.delivered if m.type == MT.HEARTBEAT]
    assert len(hbs) == 2 * 200  # one heartbeat per follower per tick, forever
    resps = [m for m in net.delivered if m.type == MT.HEARTBEAT_RESP]
    assert all(not m.quiesce and not m.reject and m.commit == 0 for m in resps)
    assert all(not m.quiesce for m in net.delivered)
    assert leader.role == Role.LEADER
    assert all(m.node._lease_floor == 0 for m in net.members.values())
    # wake() on a node that never quiesces does nothing.
    leader.wake()
    assert not leader.has_ready()


def test_config_rejects_negative_quiesce_ticks() -> None:
    import pytest

    from kvstore.raft import RaftError

    with pytest.raises(RaftError, match="quiesce_ticks"):
        RaftNode(Config(id=1, quiesce_ticks=-1), MemoryStorage.bootstrap(ConfState((1,))), random.Random(1))
