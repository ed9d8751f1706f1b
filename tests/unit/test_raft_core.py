"""Scenario tests of the pure Raft core, driven through the synchronous test network."""

from __future__ import annotations

import random

import pytest
from raftnet import Network

from kvstore.raft import (
    CAMPAIGN_TRANSFER,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    ProgressState,
    ProposalDropped,
    RaftError,
    RaftNode,
    Role,
)

MT = MessageType


def test_single_leader_elected_and_log_replicated() -> None:
    net = Network()
    leader = net.elect(1)
    assert leader.term >= 2
    assert [net.node(i).lead for i in (1, 2, 3)] == [1, 1, 1]
    for i in range(10):
        net.propose(1, b"x%d" % i)
    net.heartbeat(1)
    for nid in (1, 2, 3):
        assert net.applied_data(nid) == [b"x%d" % i for i in range(10)]
        assert net.node(nid).committed == leader.log.last_index()


def test_commit_reaches_followers_with_the_next_append_heartbeat_or_read_index() -> None:
    """The leader does not send an append just to announce a commit: each follower learns it
    from the next append with entries, the next heartbeat, or right after a read index."""
    net = Network()
    leader = net.elect(1)
    for i in range(5):
        net.propose(1, b"y%d" % i)
    assert net.applied_data(1) == [b"y%d" % i for i in range(5)]
    for nid in (2, 3):  # the last commit has not been announced yet
        assert net.applied_data(nid) == [b"y%d" % i for i in range(4)]
        assert net.node(nid).committed == leader.committed - 1
    appends = [m for m in net.delivered if m.type == MT.APP and m.to == 2]
    assert all(m.entries for m in appends[-5:]), "an append carried no entries (a bare commit notice)"
    net.heartbeat(1)
    for nid in (2, 3):
        assert net.applied_data(nid)[-1] == b"y4" and net.node(nid).committed == leader.committed
    net.propose(1, b"z")
    n3 = net.node(3)
    assert n3.committed == leader.committed - 1
    net.delivered.clear()
    n3.read_index(b"r")
    net.stabilize()
    assert [r.context for r in net.members[3].reads] == [b"r"]
    assert n3.committed == leader.committed and net.applied_data(3)[-1] == b"z"
    to3 = [m.type for m in net.delivered if m.frm == 1 and m.to == 3]
    assert MT.APP in to3[to3.index(MT.READ_INDEX_RESP):], "no commit notice after the read index"


def test_lease_read_on_a_follower_gets_the_commit_index_at_once() -> None:
    """With lease reads there is no heartbeat round: the append after the answer is what tells
    the follower the commit index it must apply through."""
    net = Network(check_quorum=True, lease_read=True)
    leader = net.elect(1)
    net.tick(2)  # heartbeats acknowledged: the lease holds
    net.propose(1, b"w")
    n2 = net.node(2)
    assert n2.committed == leader.committed - 1
    n2.read_index(b"q")
    net.stabilize()
    assert [r.index for r in net.members[2].reads] == [leader.committed]
    assert n2.committed == leader.committed and net.applied_data(2)[-1] == b"w"


def test_new_leader_appends_empty_entry_of_its_term() -> None:
    net = Network()
    leader = net.elect(2)
    last = leader.log.slice(leader.log.last_index(), leader.log.last_index() + 1)[0]
    assert last.term == leader.term and last.data == b""
    assert leader.committed == last.index  # committed once a majority had it


def test_prevote_keeps_partitioned_node_from_disrupting_the_cluster() -> None:
    net = Network()
    net.elect(1)
    term = net.node(1).term
    net.isolate(3)
    net.tick(100, only=[3])  # node 3 campaigns over and over, but only pre-votes
    assert net.node(3).term == term
    net.heal()
    net.tick(5)
    assert net.node(1).role == Role.LEADER and net.node(1).term == term


def test_without_prevote_a_partitioned_node_bumps_its_term() -> None:
    net = Network(pre_vote=False, check_quorum=False)
    net.elect(1)
    term = net.node(1).term
    net.isolate(3)
    net.tick(100, only=[3])
    assert net.node(3).term > term + 2  # the behaviour pre-vote prevents


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    net = Network()
    net.elect(1)
    net.isolate(1)
    net.tick(2 * net.node(1).cfg.election_tick + 1, only=[1])
    assert net.node(1).role == Role.FOLLOWER


def test_leader_stickiness_follower_in_lease_ignores_vote_requests() -> None:
    net = Network()
    net.elect(1)
    n2 = net.node(2)
    term = n2.term
    n2.step(Message(MT.VOTE, 2, 3, term=term + 5, index=100, log_term=term + 5))
    assert n2.term == term and n2.lead == 1
    rd = n2.ready()
    assert not [m for m in rd.persisted_messages if m.type == MT.VOTE_RESP]
    n2.advance(rd)
    # A leadership-transfer campaign is allowed to break the lease.
    n2.step(Message(MT.VOTE, 2, 3, term=term + 5, index=100, log_term=term + 5, context=CAMPAIGN_TRANSFER))
    assert n2.term == term + 5 and n2.vote == 3


def test_vote_requires_up_to_date_log() -> None:
    net = Network(check_quorum=False, pre_vote=False)
    net.elect(1)
    net.propose(1, b"a")
    n2 = net.node(2)
    last, lt = n2.log.last_index(), n2.log.last_term()
    n2.step(Message(MT.VOTE, 2, 3, term=n2.term + 1, index=last - 1, log_term=lt))
    rd = n2.ready()
    (resp,) = [m for m in rd.persisted_messages if m.type == MT.VOTE_RESP]
    assert resp.reject and n2.vote == 0
    n2.advance(rd)


def test_one_vote_per_term() -> None:
    net = Network(check_quorum=False, pre_vote=False)
    n3 = net.node(3)
    t = n3.term + 1
    n3.step(Message(MT.VOTE, 3, 1, term=t, index=10, log_term=1))
    n3.step(Message(MT.VOTE, 3, 2, term=t, index=10, log_term=1))
    rd = n3.ready()
    resps = [(m.to, m.reject) for m in rd.persisted_messages if m.type == MT.VOTE_RESP]
    assert resps == [(1, False), (2, True)]
    assert rd.hard_state is not None and rd.hard_state.vote == 1


def test_vote_responses_wait_for_persistence_but_leader_appends_do_not() -> None:
    net = Network()
    net.elect(1)
    n2 = net.node(2)
    n2.step(Message(MT.VOTE, 2, 3, term=n2.term + 1, index=99, log_term=99, context=CAMPAIGN_TRANSFER))
    rd = n2.ready()
    assert rd.hard_state is not None and rd.hard_state.vote == 3
    assert not rd.messages
    assert [m.type for m in rd.persisted_messages] == [MT.VOTE_RESP]
    n2.advance(rd)
    leader = net.node(1)
    leader.propose(b"p")
    rd = leader.ready()
    assert {m.type for m in rd.messages} == {MT.APP}
    assert rd.entries and rd.entries[-1].data == b"p"


def test_leader_does_not_count_its_own_entry_before_it_is_durable() -> None:
    net = Network(ids=[1])
    leader = net.elect(1)
    idx = leader.propose(b"solo")
    assert leader.committed < idx
    rd = leader.ready()
    assert not rd.committed_entries or rd.committed_entries[-1].index < idx
    net.members[1].storage.append(rd.entries)
    leader.advance(rd)
    assert leader.committed == idx


def test_figure8_commit_only_by_counting_current_term_entries() -> None:
    """Raft paper Figure 8: an old-term entry on a majority is not committed by counting."""
    net = Network(ids=[1, 2, 3, 4, 5], pre_vote=False, check_quorum=False, max_size_per_msg=1)
    net.elect(1)
    # (a) n1 leads and replicates entry A only to n2.
    for o in (3, 4, 5):
        net.cut(1, o)
    ia = net.propose(1, b"A")
    assert net.node(2).log.last_index() == ia and net.node(3).log.last_index() < ia
    # (b) n5 leads with n3 and n4 and appends its own entry at A's index, replicated nowhere.
    net.heal()
    net.isolate(1)
    net.isolate(2)
    net.filter = lambda m: not (m.frm == 5 and m.type == MT.APP)
    n5 = net.elect(5)
    assert n5.log.last_index() == ia and n5.log.last_term() > net.node(1).log.term(ia)
    # (c) n1 comes back and leads again (n5 gone); it replicates A to n3, but its own-term entry
    # does not get there.
    net.filter = None
    net.heal()
    net.isolate(5)
    net.cut(1, 4)
    net.restart(1)  # n1 crashed meanwhile; it restarts from its durable state
    own = ia + 1

    def without_own_entry(m: Message) -> bool:
        if m.type == MT.APP and m.to == 3:
            m.entries = [e for e in m.entries if e.index < own]
        return True

    net.filter = without_own_entry
    n1 = net.elect(1)
    assert n1.log.last_index() == own and n1.log.term(own) == n1.term
    net.tick(3, only=[1])
    assert net.node(3).log.match_term(ia, net.node(1).log.term(ia))  # A is on n1, n2, n3: a majority
    assert n1.committed < ia, "an entry from an earlier term was committed by counting replicas"
    # (d) n1 dies; n5 wins with n3 and n4 (its last term is higher) and overwrites A everywhere.
    net.filter = None
    net.heal()
    net.isolate(1)
    net.restart(5)
    n5 = net.elect(5)
    net.propose(5, b"B")
    for nid in (2, 3, 4, 5):
        assert net.node(nid).log.term(ia) == n5.log.term(ia)
        assert b"A" not in net.applied_data(nid)


def test_fast_backtracking_needs_few_round_trips() -> None:
    net = Network(check_quorum=False, pre_vote=False)
    n1 = net.elect(1)
    for i in range(20):
        net.propose(1, b"common%d" % i)
    net.isolate(1)
    for i in range(30):
        n1.propose(b"lost%d" % i)  # a long uncommitted tail only n1 has
    net.stabilize()
    net.heal()
    net.isolate(1)
    net.elect(2)
    for i in range(30):
        net.propose(2, b"kept%d" % i)
    n3 = net.elect(3)  # a new leader whose log ends past the point where n1 diverged
    net.heal()
    net.delivered.clear()
    net.tick(3)
    rejects = [m for m in net.delivered if m.type == MT.APP_RESP and m.reject and m.frm == 1]
    # Without the term hints the leader would back up one entry per round trip (30 of them).
    assert 1 <= len(rejects) <= 2
    assert net.applied_data(1) == net.applied_data(n3.id)
    assert not any(d.startswith(b"lost") for d in net.applied_data(1))


def test_pipelining_respects_inflight_window() -> None:
    net = Network(max_inflight_msgs=2)
    leader = net.elect(1)
    pr = leader.prs[2]
    assert pr.state == ProgressState.REPLICATE
    net.dropped.add((1, 2))
    net.dropped.add((2, 1))
    sent_before = len(net.delivered)
    for i in range(6):
        leader.propose(b"w%d" % i)
    assert len(pr.inflight) == 2
    assert pr.is_paused(2)
    net.heal()
    net.stabilize()
    assert sent_before < len(net.delivered)
    net.tick(3)
    assert net.applied_data(2) == net.applied_data(1)


def test_snapshot_catches_up_a_follower_behind_the_compacted_log() -> None:
    net = Network()
    net.elect(1)
    net.isolate(3)
    for i in range(20):
        net.propose(1, b"s%d" % i)
    leader = net.node(1)
    st = net.members[1].storage
    applied = leader.applied
    st.create_snapshot(applied, leader.conf_state_at(applied), b"SNAPDATA")
    st.compact(applied)
    net.heal()
    net.delivered.clear()
    for _ in range(3):
        net.tick(1)
    snaps = [m for m in net.delivered if m.type == MT.SNAP and m.to == 3]
    assert snaps and snaps[0].snapshot is not None and snaps[0].snapshot.data == b"SNAPDATA"
    leader.report_snapshot(3, failed=False)
    net.tick(3)
    assert net.members[3].storage.first_index() == applied + 1
    assert net.node(3).committed == leader.committed
    assert leader.prs[3].state == ProgressState.REPLICATE


def test_read_index_batches_reads_into_one_confirmation_round() -> None:
    net = Network()
    leader = net.elect(1)
    net.propose(1, b"v")
    net.delivered.clear()
    for i in range(5):
        leader.read_index(b"r%d" % i)
    net.stabilize()
    heartbeats = [m for m in net.delivered if m.type == MT.HEARTBEAT]
    assert len(heartbeats) == 2  # one round: one heartbeat per follower for all five reads
    reads = net.members[1].reads
    assert [r.context for r in reads] == [b"r%d" % i for i in range(5)]
    assert all(r.index == leader.committed for r in reads)


def test_reads_during_an_unconfirmed_round_wait_for_it_then_share_the_next_one() -> None:
    net = Network()
    leader = net.elect(1)
    net.propose(1, b"v")
    net.delivered.clear()
    leader.read_index(b"a")
    net._drain(1)  # round 1's heartbeats are out, not delivered yet
    first = {m.seq for m in net.queue if m.type == MT.HEARTBEAT}
    assert len(first) == 1
    for i in range(3):
        leader.read_index(b"b%d" % i)
    assert not leader.has_ready()  # nothing to send while round 1 is unconfirmed
    net.stabilize()
    rounds = [m.seq for m in net.delivered if m.type == MT.HEARTBEAT]
    (s,) = first
    assert rounds == [s, s, s + 1, s + 1]  # two rounds for four reads, not four
    assert [r.context for r in net.members[1].reads] == [b"a", b"b0", b"b1", b"b2"]
    assert all(r.index == leader.committed for r in net.members[1].reads)


def test_a_second_round_may_go_out_with_max_read_rounds_2() -> None:
    net = Network(max_read_rounds=2)
    leader = net.elect(1)
    net.propose(1, b"v")
    net.delivered.clear()
    leader.read_index(b"a")
    net._drain(1)
    leader.read_index(b"b")
    assert leader.has_ready()
    net._drain(1)
    leader.read_index(b"c")
    assert not leader.has_ready()
    net.stabilize()
    assert [r.context for r in net.members[1].reads] == [b"a", b"b", b"c"]
    with pytest.raises(RaftError):
        Config(id=1, max_read_rounds=0).validate()


def test_reads_held_behind_a_lost_round_leave_after_the_next_heartbeat_confirms_it() -> None:
    net = Network()
    leader = net.elect(1)
    net.propose(1, b"v")
    net.drop_types.add(MT.HEARTBEAT)
    leader.read_index(b"a")
    net.stabilize()
    leader.read_index(b"b")
    net.stabilize()
    assert net.members[1].reads == []
    assert leader.read_only.unsent  # held: round 1 is still unconfirmed
    net.heal()
    net.heartbeat(1)  # the periodic heartbeat carries round 1's number: confirmed, then "b" goes
    assert [r.context for r in net.members[1].reads] == [b"a", b"b"]


def test_read_index_is_not_served_without_a_quorum() -> None:
    net = Network()
    leader = net.elect(1)
    net.isolate(1)
    leader.read_index(b"stale?")
    net.stabilize()
    assert net.members[1].reads == []
    net.heal()
    net.tick(2)
    assert [r.context for r in net.members[1].reads] == [b"stale?"]


def test_read_index_waits_for_commit_in_the_new_term() -> None:
    net = Network()
    net.elect(1)
    net.propose(1, b"x")
    net.filter = lambda m: not (m.frm == 2 and m.type == MT.APP)  # the new leader cannot commit
    net.node(1).transfer_leader(2)
    net.stabilize()
    n2 = net.node(2)
    assert n2.role == Role.LEADER and n2.log.term(n2.committed) != n2.term
    n2.read_index(b"early")
    net.tick(3)
    assert net.members[2].reads == []
    net.filter = None
    net.tick(2)
    assert [r.context for r in net.members[2].reads] == [b"early"]
    assert n2.log.term(net.members[2].reads[0].index) == n2.term


def test_follower_read_index_goes_through_the_leader() -> None:
    net = Network()
    net.elect(1)
    net.propose(1, b"x")
    net.node(3).read_index(b"f")
    net.stabilize()
    (rs,) = net.members[3].reads
    assert rs.context == b"f" and rs.index == net.node(1).committed


def test_lease_read_skips_the_round_while_the_lease_holds() -> None:
    net = Network(lease_read=True)
    leader = net.elect(1)
    net.tick(3)
    net.delivered.clear()
    leader.read_index(b"lease")
    net.stabilize()
    assert [r.context for r in net.members[1].reads] == [b"lease"]
    assert not [m for m in net.delivered if m.type == MT.HEARTBEAT]
    # Isolated for an election timeout, the lease runs out and reads wait for a quorum.
    net.isolate(1)
    net.tick(leader.cfg.election_tick - 1, only=[1])
    leader.read_index(b"expired")
    net.stabilize()
    assert [r.context for r in net.members[1].reads] == [b"lease"]


def test_lease_is_given_up_after_a_leadership_transfer_starts() -> None:
    net = Network(lease_read=True)
    leader = net.elect(1)
    net.tick(3)
    net.drop_types = {MT.TIMEOUT_NOW}
    leader.transfer_leader(2)
    net.stabilize()
    assert leader.transfer_sent_this_term
    net.tick(leader.cfg.election_tick)  # the transfer times out; n1 is still leader
    assert leader.role == Role.LEADER and leader.lead_transferee == 0
    # A TimeoutNow may still be in flight, so the lease is void for the rest of the term: the
    # read needs a heartbeat round, which cannot happen while heartbeats are lost.
    net.drop_types = {MT.HEARTBEAT}
    leader.read_index(b"after-transfer")
    net.stabilize()
    assert net.members[1].reads == []
    net.drop_types = set()
    net.tick(2)
    assert [r.context for r in net.members[1].reads] == [b"after-transfer"]


def test_leadership_transfer_and_proposals_refused_meanwhile() -> None:
    net = Network()
    leader = net.elect(1)
    net.isolate(3)
    net.propose(1, b"a")
    leader.transfer_leader(3)  # n3 lags behind: it must catch up first
    with pytest.raises(ProposalDropped):
        leader.propose(b"during")
    net.heal()
    net.stabilize()
    assert net.node(3).role == Role.LEADER
    assert leader.role == Role.FOLLOWER and leader.lead == 3
    net.propose(3, b"after")
    net.heartbeat(3)
    assert net.applied_data(1)[-2:] == [b"a", b"after"]


def test_add_learner_promote_and_remove_leader() -> None:
    net = Network()
    leader = net.elect(1)
    net.propose(1, b"before")
    net.add(4)  # empty storage: learns the configuration from the log
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    net.stabilize()
    net.tick(2)
    n4 = net.node(4)
    assert n4.conf.learners == (4,) and n4.conf.voters == (1, 2, 3)
    assert net.applied_data(4) == [b"before"]
    # A learner never campaigns.
    net.tick(5 * n4.cfg.election_tick, only=[4])
    assert n4.role == Role.FOLLOWER and n4.term == leader.term
    # Learners do not count toward commit: with 2 and 3 down, nothing commits.
    net.isolate(2)
    net.isolate(3)
    idx = leader.propose(b"needs-voters")
    net.stabilize()
    assert leader.committed < idx
    net.heal()
    net.tick(2)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4))
    net.stabilize()
    assert leader.conf.voters == (1, 2, 3, 4)
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    net.stabilize()
    net.tick(2 * n4.cfg.election_tick + 5, only=[2, 3, 4])
    new = net.leader()
    assert new is not None and new.id != 1 and new.conf.voters == (2, 3, 4)
    assert leader.role == Role.FOLLOWER
    net.propose(new.id, b"after-removal")
    assert net.applied_data(4)[-1] == b"after-removal"


def test_conf_change_rules() -> None:
    net = Network()
    leader = net.elect(1)
    with pytest.raises(ProposalDropped, match="no-op"):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 2))
    with pytest.raises(ProposalDropped, match="demotion"):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 2))
    net.isolate(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ProposalDropped, match="already in progress"):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 5))
    with pytest.raises(ProposalDropped, match="not leader"):
        net.node(2).propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 5))
    with pytest.raises(ValueError, match="at least one voter"):
        ConfState((1,)).apply(ConfChange(ConfChangeType.REMOVE_NODE, 1))


def test_conf_change_waits_for_a_commit_in_the_leaders_term() -> None:
    net = Network()
    net.elect(1)
    net.filter = lambda m: not (m.frm == 2 and m.type == MT.APP)
    net.node(1).transfer_leader(2)
    net.stabilize()
    n2 = net.node(2)
    assert n2.role == Role.LEADER
    with pytest.raises(ProposalDropped, match="not yet committed"):
        n2.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))


def test_uncommitted_configuration_is_reverted_when_truncated() -> None:
    net = Network(pre_vote=False, check_quorum=False)
    leader = net.elect(1)
    net.isolate(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 9))
    net.stabilize()
    assert leader.conf.learners == (9,)
    net.heal()
    net.isolate(1)
    net.elect(2)
    net.propose(2, b"win")
    net.heal()
    net.tick(3)
    assert net.node(1).conf.learners == ()
    assert net.node(1).role == Role.FOLLOWER


def test_restart_restores_term_vote_log_and_configuration() -> None:
    net = Network()
    net.elect(1)
    for i in range(5):
        net.propose(1, b"r%d" % i)
    before = net.node(2)
    term, vote, commit, conf = before.term, before.vote, before.committed, before.conf
    net.restart(2)
    after = net.node(2)
    assert (after.term, after.vote, after.committed, after.conf) == (term, vote, commit, conf)
    assert after.role == Role.FOLLOWER
    net.propose(1, b"after-restart")
    net.heartbeat(1)
    assert net.applied_data(2)[-1] == b"after-restart"


def test_group_id_is_stamped_on_messages_and_entries() -> None:
    st = MemoryStorage.bootstrap(ConfState((1, 2)), group=7)
    node = RaftNode(Config(id=1, group=7), st, random.Random(1))
    for _ in range(40):
        node.tick()
    rd = node.ready()
    assert rd.persisted_messages and all(m.group == 7 for m in rd.persisted_messages)
    with pytest.raises(Exception, match="group"):
        node.step(Message(MT.HEARTBEAT, 1, 2, term=5, group=8))


def test_a_commit_only_append_goes_unanswered_only_when_accepted() -> None:
    """A member answers a commit announcement it cannot accept (a gap: the leader must back up)
    and one behind its own commit (the leader learns the member's commit); it applies one it
    accepts without an answer, since the answer would only repeat the match the leader knows."""
    st = MemoryStorage.bootstrap(ConfState((1, 2, 3)))
    node = RaftNode(Config(id=3), st, random.Random(1))
    last = node.log.last_index()

    def answers(m: Message) -> list[Message]:
        node.step(m)
        rd = node.ready()
        node.advance(rd)
        return [x for x in rd.messages + rd.persisted_messages if x.type == MT.APP_RESP]

    (gap,) = answers(Message(MT.APP, 3, 1, term=2, index=last + 5, log_term=2, commit=last + 5, commit_only=True))
    assert gap.reject and gap.to == 1
    assert answers(Message(MT.APP, 3, 1, term=2, index=last, log_term=node.log.term(last), commit=last,
                           commit_only=True)) == []
    assert node.committed == last and node.lead == 1
    (behind,) = answers(Message(MT.APP, 3, 1, term=2, index=last - 1, log_term=node.log.term(last - 1),
                                commit=last - 1, commit_only=True))
    assert not behind.reject and behind.index == node.committed


def test_conf_change_entry_roundtrip() -> None:
    cc = ConfChange(ConfChangeType.ADD_LEARNER, 12345, b"addr:1")
    assert ConfChange.decode(cc.encode()) == cc
    assert EntryType.CONF_CHANGE == 1


def test_vote_survives_a_restart() -> None:
    """A node that voted, crashed and restarted must not vote for someone else in that term."""
    net = Network(check_quorum=False, pre_vote=False)
    n3 = net.node(3)
    t = n3.term + 1
    n3.step(Message(MT.VOTE, 3, 1, term=t, index=10, log_term=1))
    net.stabilize()  # the vote is persisted and answered
    net.restart(3)
    n3 = net.node(3)
    assert (n3.term, n3.vote) == (t, 1)
    n3.step(Message(MT.VOTE, 3, 2, term=t, index=10, log_term=1))
    rd = n3.ready()
    (resp,) = [m for m in rd.persisted_messages if m.type == MT.VOTE_RESP]
    assert resp.reject


def test_learner_read_index_and_leader_contact_ticks() -> None:
    net = Network((1, 2, 3), learners=(4,))
    leader = net.elect(1)
    net.propose(1, b"x")
    learner = net.node(4)
    assert leader.leader_contact_ticks == 0
    assert learner.leader_contact_ticks == 0 and learner.lead == 1
    # A learner's read index comes from the leader, at the leader's commit index.
    learner.read_index(b"l1")
    net.stabilize()
    assert [(r.index, r.context) for r in net.members[4].reads] == [(leader.committed, b"l1")]
    # Cut off, it never gets an answer, and the ticks since leader contact keep growing (a
    # learner never campaigns, so it keeps believing in its last leader).
    net.isolate(4)
    learner.read_index(b"l2")
    net.tick(3 * learner.cfg.election_tick)
    assert [r.context for r in net.members[4].reads] == [b"l1"]
    assert learner.lead == 1 and learner.leader_contact_ticks == 3 * learner.cfg.election_tick
    net.heal()
    net.tick(1)
    assert learner.leader_contact_ticks == 0
    # A node without a leader reports None.
    net.isolate(2)
    net.tick(3 * net.node(2).cfg.election_tick, only=[2])
    assert net.node(2).leader_contact_ticks is None


@pytest.mark.parametrize("announce", [False, True])
def test_announce_commit_tells_followers_and_learners_a_lone_write_without_a_heartbeat(announce: bool) -> None:
    """With `announce_commit`, once the whole log is committed every caught-up member gets the
    commit index in one empty append, so it applies a lone write without waiting for a
    heartbeat; without it, members learn it only at the next heartbeat. Under a stream of writes
    (entries still in flight) nothing extra is sent."""
    net = Network(learners=[4], announce_commit=announce)
    leader = net.elect(1)
    net.heartbeat(1)
    net.delivered.clear()
    idx = net.propose(1, b"lone")  # stabilize: every message delivered, no tick
    assert leader.committed == idx
    knows = [net.node(n).committed == idx for n in (2, 3, 4)]
    assert knows == [announce] * 3
    assert (net.applied_data(4) == [b"lone"]) is announce
    empties = [m for m in net.delivered if m.type == MT.APP and not m.entries and m.frm == 1]
    assert len(empties) == (3 if announce else 0)
    # Each announcement is marked commit-only and goes unanswered: the members' only answers are
    # to the append carrying the entry (one per member).
    assert all(m.commit_only for m in empties)
    answers = [m for m in net.delivered if m.type == MT.APP_RESP and m.to == 1]
    assert sorted(m.frm for m in answers) == [2, 3, 4] and all(m.index == idx for m in answers)
    net.heartbeat(1)
    assert all(net.node(n).committed == idx for n in (2, 3, 4))  # a heartbeat tells them anyway
    # A burst proposed before any answer: only the last commit, covering the whole log, is
    # announced (each member at most once per commit index).
    net.delivered.clear()
    for i in range(5):
        leader.propose(b"burst%d" % i)
    net.stabilize()
    last = leader.log.last_index()
    assert leader.committed == last
    commits = [m.commit for m in net.delivered if m.type == MT.APP and not m.entries and m.frm == 1]
    assert all(c == last for c in commits) and len(commits) == (3 if announce else 0)
