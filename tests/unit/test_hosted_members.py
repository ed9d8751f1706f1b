"""The host's set of nodes its groups' configurations list (`kvstore.node.hosted`), which
`Inbound.is_member` asks instead of walking every group: it follows members added and removed,
groups opened and closed."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.node.host import Host, RaftSettings
from kvstore.node.hosted import HostedMembers
from kvstore.node.inbound import Inbound, RefusalLog
from kvstore.node.memstore import MemoryNodeStore
from kvstore.raft import ConfChange, ConfChangeType, ConfState, Message, Role


def _settle(host: Host) -> None:
    for _ in range(100):
        if not host.has_work():
            return
        host.run_cycle()
    raise AssertionError("the host did not settle")


def _single_voter_host() -> tuple[Host, Inbound, list[object]]:
    sent: list[Message] = []
    host = Host(1, MemoryNodeStore(), sent.extend, RaftSettings(), random.Random(3))
    host.open_group(1, ConfState((1,)))
    host.groups[1].core.campaign()
    _settle(host)
    assert host.groups[1].core.role == Role.LEADER
    inbound = Inbound(1, host, lambda: None, set(), RefusalLog(clock=lambda: 0.0))
    answers: list[object] = []
    return host, inbound, answers


def test_member_set_follows_add_and_remove_member() -> None:
    host, inbound, answers = _single_voter_host()
    assert 1 in host.hosted and 4 not in host.hosted and not inbound.is_member(4)
    # no address in the change: the node is known only through the group's configuration
    host.propose_conf_change(1, ConfChange(ConfChangeType.ADD_LEARNER, 4), lambda r, e: answers.append(e))
    assert 4 in host.hosted  # the leader's configuration changes when the change is appended
    _settle(host)
    assert answers == [None]
    assert 4 not in host.members and 4 in host.hosted and inbound.is_member(4)
    host.propose_conf_change(1, ConfChange(ConfChangeType.REMOVE_NODE, 4), lambda r, e: answers.append(e))
    _settle(host)
    assert answers == [None, None]
    assert 4 not in host.hosted and not inbound.is_member(4)
    assert host.hosted.counts == {1: 1}


def test_member_set_follows_groups_opened_and_closed() -> None:
    host, inbound, _ = _single_voter_host()
    host.open_group(2, ConfState((1, 5), (6,)))
    host.open_group(3, ConfState((1, 5)))
    assert host.hosted.counts == {1: 3, 5: 2, 6: 1}
    assert inbound.is_member(5) and inbound.is_member(6)
    host.close_group(2, destroy=True)
    assert host.hosted.counts == {1: 2, 5: 1}
    assert inbound.is_member(5) and not inbound.is_member(6)
    host.close_group(3, destroy=False)
    assert not inbound.is_member(5) and host.hosted.counts == {1: 1}


ids = st.integers(1, 6)
confs = st.builds(
    lambda v, extra: ConfState(tuple(sorted(v)), tuple(sorted(set(extra) - set(v)))),
    st.sets(ids, min_size=1, max_size=4),
    st.sets(ids, max_size=3),
)
ops = st.lists(st.tuples(st.sampled_from(["update", "update", "same", "drop"]), st.integers(1, 4), confs), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_member_set_matches_a_walk_over_the_groups(seq: list[tuple[str, int, ConfState]]) -> None:
    hosted = HostedMembers()
    groups: dict[int, ConfState] = {}
    for op, group, conf in seq:
        if op == "drop":
            hosted.drop(group)
            groups.pop(group, None)
        elif op == "same" and group in groups:
            equal = ConfState(groups[group].voters, groups[group].learners)  # equal, not identical
            hosted.update(group, equal)
            groups[group] = equal
        else:
            hosted.update(group, conf)
            groups[group] = conf
        for node in range(0, 8):
            walked = any(node in c.voters or node in c.learners for c in groups.values())
            assert (node in hosted) == walked
        assert all(n > 0 for n in hosted.counts.values())


def test_a_node_removed_from_one_group_keeps_its_address_until_its_last_group_here_lets_it_go() -> None:
    """`Host.members` is the address book the transport follows: a node removed from a data group
    but still a voter of the metadata group must stay reachable (dropping it at the first removal
    cut a metadata leader off from its followers while it removed itself: check-quorum deposed it
    and `kvctl member remove` timed out)."""
    host, inbound, answers = _single_voter_host()
    host.open_group(0, ConfState((1,)))
    host.groups[0].core.campaign()
    _settle(host)
    for g in (0, 1):
        host.propose_conf_change(g, ConfChange(ConfChangeType.ADD_LEARNER, 4, b"127.0.0.1:4"),
                                 lambda r, e: answers.append(e))
    _settle(host)
    assert answers == [None, None] and host.members.get(4) == "127.0.0.1:4"
    host.propose_conf_change(1, ConfChange(ConfChangeType.REMOVE_NODE, 4), lambda r, e: answers.append(e))
    _settle(host)
    assert answers[-1] is None and 4 not in host.groups[1].core.conf.members()
    assert host.members.get(4) == "127.0.0.1:4", "still a member of group 0: its address must stay"
    host.propose_conf_change(0, ConfChange(ConfChangeType.REMOVE_NODE, 4), lambda r, e: answers.append(e))
    _settle(host)
    assert answers[-1] is None and 4 not in host.members and not inbound.is_member(4)


def test_a_removed_node_leaves_the_address_book_when_the_last_group_listing_it_closes() -> None:
    host, _, answers = _single_voter_host()
    host.open_group(2, ConfState((1,), (4,)))
    host.propose_conf_change(1, ConfChange(ConfChangeType.ADD_LEARNER, 4, b"127.0.0.1:4"),
                             lambda r, e: answers.append(e))
    _settle(host)
    host.propose_conf_change(1, ConfChange(ConfChangeType.REMOVE_NODE, 4), lambda r, e: answers.append(e))
    _settle(host)
    assert answers == [None, None] and host.members.get(4) == "127.0.0.1:4"  # group 2 lists it
    host.close_group(2, destroy=False)
    assert 4 not in host.members
