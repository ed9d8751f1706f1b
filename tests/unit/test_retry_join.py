"""A retried session write whose first attempt is still pending at the leader that proposed it
is joined to that entry (`kvstore.node.pending`), not appended again: under overload, appending
every retry fed on itself (the simulator's seed 3444: 108 retry entries against 14 first
attempts in one group). Both waiters get the entry's outcome; after a leader change the entry's
failure is both waiters', and a retry at the new leader is proposed there."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hostpump import elected_three, pump
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.pending import MAX_JOINED, PendingWrites
from kvstore.raft import ConfState, Message, MessageType, Role
from kvstore.storage import commands
from kvstore.storage.commands import ApplyResult

Answers = list[tuple[Any, errors.KVError | None]]


def _cluster() -> tuple[dict[int, Host], list[Message]]:
    return elected_three()


def _pump(hosts: dict[int, Host], outbox: list[Message], cut: frozenset[int] = frozenset()) -> None:
    """Run cycles and deliver messages (none to or from a node in `cut`, whose cycles do not run)
    until quiet."""
    pump(hosts, outbox, cut, run_cut=False)


def _tick_until(hosts: dict[int, Host], outbox: list[Message], cond: Any) -> None:
    """Tick every node and pump until `cond()` (heartbeats bring a node that missed appends up
    to date); a bounded number of ticks, then the test fails."""
    for _ in range(100):
        _pump(hosts, outbox)
        if cond():
            return
        for h in hosts.values():
            h.tick()
    raise AssertionError("the condition never held")


def _collect(answers: Answers) -> Any:
    return lambda res, err: answers.append((res, err))


def _put(value: bytes, seq: int = 1, *, cid: int = 7, retry: bool = False, ack: int = 1, revision: int = 0) -> bytes:
    return commands.encode_put(b"k", value, cid, seq, ack, retry, horizon=0, revision=revision)


def _last(h: Host) -> int:
    return h.store.log_storage(0).last_index()


def test_a_retry_while_the_first_attempt_is_pending_appends_nothing_and_gets_its_result() -> None:
    hosts, outbox = _cluster()
    leader = hosts[1]
    first: Answers = []
    retry: Answers = []
    index = leader.propose(0, _put(b"v", revision=5), _collect(first))
    appended = leader.groups[0].core.log.last_index()
    # The retry differs in the header fields an attempt sets for itself (the retry flag, ack,
    # the proposed revision), not in its command.
    assert leader.propose(0, _put(b"v", retry=True, ack=0, revision=9), _collect(retry)) == index
    assert leader.groups[0].core.log.last_index() == appended  # nothing appended for the retry
    assert first == [] and retry == []
    _pump(hosts, outbox)
    assert len(first) == 1 and first[0][1] is None
    assert retry == first  # the same result object: the entry's
    res = first[0][0]
    assert isinstance(res, ApplyResult) and res.error is None and res.index == index
    assert hosts[2].store.get(0, b"k") == b"v"
    assert len(leader.groups[0].writes) == 0 and not leader.groups[0].writes.by_session


def test_a_retry_after_the_first_attempt_applied_is_proposed_and_answered_from_the_session() -> None:
    hosts, outbox = _cluster()
    leader = hosts[1]
    first: Answers = []
    retry: Answers = []
    index = leader.propose(0, _put(b"v"), _collect(first))
    _pump(hosts, outbox)
    assert leader.propose(0, _put(b"v", retry=True), _collect(retry)) == index + 1  # not pending: appended
    _pump(hosts, outbox)
    assert first[0][1] is None and retry[0][1] is None
    assert retry[0][0].revision == first[0][0].revision  # the session cache's answer


@pytest.mark.parametrize("other", [
    _put(b"w"),  # another value under the same seq: a client bug or a forged request
    _put(b"v", seq=2),  # another seq
    commands.encode_put(b"k", b"v", 8, 1, 1),  # another client
    commands.encode_delete(b"k", 7, 1, 1),  # another op
    _put(b"v")[:-1],  # another body
    commands.encode_put(b"k", b"v"),  # no session: never joined
], ids=["other-value", "other-seq", "other-client", "other-op", "other-body", "no-session"])
def test_a_write_that_is_not_the_same_session_write_is_proposed(other: bytes) -> None:
    hosts, outbox = _cluster()
    leader = hosts[1]
    original = _put(b"v") if commands.session_of(other) else commands.encode_put(b"k", b"v")
    a: Answers = []
    b: Answers = []
    index = leader.propose(0, original, _collect(a))
    assert leader.propose(0, other, _collect(b)) == index + 1
    _pump(hosts, outbox)
    assert a[0][1] is None and b[0][1] is None and b[0][0] is not a[0][0]


def test_a_retry_with_an_invalid_header_is_not_joined_to_a_valid_entry() -> None:
    hosts, outbox = _cluster()
    leader = hosts[1]
    good = _put(b"v")
    bad = bytearray(good)
    bad[26] = 0x80  # unknown session flags: the state machine refuses this command
    a: Answers = []
    b: Answers = []
    index = leader.propose(0, good, _collect(a))
    assert leader.propose(0, bytes(bad), _collect(b)) == index + 1
    _pump(hosts, outbox)
    assert a[0][0].error is None
    assert b[0][0].error is not None  # its own command's result: refused as malformed


def test_after_a_leader_change_both_waiters_fail_as_the_entry_and_a_retry_at_the_new_leader_applies() -> None:
    hosts, outbox = _cluster()
    old = hosts[1]
    first: Answers = []
    joined: Answers = []
    index = old.propose(0, _put(b"v"), _collect(first))
    assert old.propose(0, _put(b"v", retry=True), _collect(joined)) == index
    outbox.clear()  # the entry never leaves node 1
    # Node 2 takes over without node 1 and commits its own entry at that index.
    # (the TIMEOUT_NOW of a leadership transfer: node 3 votes although it heard node 1 lately)
    hosts[2].step(Message(MessageType.TIMEOUT_NOW, 2, 1, term=hosts[2].groups[0].core.term, group=0))
    _pump(hosts, outbox, cut=frozenset({1}))
    new = hosts[2]
    assert new.groups[0].core.role == Role.LEADER
    assert first == [] and joined == []
    # Node 1 has not heard of it: in its own term it still leads, and a retry there is still
    # joined to its entry (which it proposed in that term); it fails with the entry below.
    late: Answers = []
    assert old.groups[0].core.role == Role.LEADER
    assert old.propose(0, _put(b"v", retry=True), _collect(late)) == index
    # The client's retry at the new leader is proposed there (nothing pending of it there).
    again: Answers = []
    before = new.groups[0].core.log.last_index()
    new.propose(0, _put(b"v", retry=True), _collect(again))
    assert new.groups[0].core.log.last_index() == before + 1
    _tick_until(hosts, outbox, lambda: bool(first))  # node 1 hears of the new term: its entry at `index` is overwritten
    assert old.groups[0].core.role != Role.LEADER
    assert len(first) == 1 and isinstance(first[0][1], errors.ProposalDropped)
    assert not first[0][1].indeterminate  # definite: that entry never commits
    assert joined == first and late == first  # the same failure for every waiter of the entry
    assert len(old.groups[0].writes) == 0 and not old.groups[0].writes.by_session
    assert again[0][1] is None and again[0][0].error is None
    assert all(h.store.get(0, b"k") == b"v" for h in hosts.values())
    with pytest.raises(errors.NotLeader):  # and a retry at node 1 now is not joined to anything
        old.propose(0, _put(b"v", retry=True), _collect([]))


def test_an_entry_of_an_earlier_term_is_not_joined_even_by_the_same_node_leading_again() -> None:
    hosts, outbox = _cluster()
    node = hosts[1]
    first: Answers = []
    index = node.propose(0, _put(b"v"), _collect(first))
    outbox.clear()  # not replicated
    term = node.groups[0].core.term
    # Node 2 campaigns without node 3: node 1 steps down (a higher term) but refuses its vote
    # (its log is longer), so its entry stays in its log, still pending.
    hosts[2].step(Message(MessageType.TIMEOUT_NOW, 2, 1, term=hosts[2].groups[0].core.term, group=0))
    _pump(hosts, outbox, cut=frozenset({3}))
    core = node.groups[0].core
    assert core.role == Role.FOLLOWER and core.log.last_index() == index and first == []
    # Node 1 wins the next term; stop as soon as it leads, before its term's entry commits.
    node.step(Message(MessageType.TIMEOUT_NOW, 1, 2, term=core.term, group=0))  # votes despite the lease
    for _ in range(50):
        if core.role == Role.LEADER:
            break
        for h in hosts.values():
            while h.has_work():
                h.run_cycle()
        msgs, outbox[:] = list(outbox), []
        for m in msgs:
            hosts[m.to].step(m)
    assert core.role == Role.LEADER and core.term > term + 1
    assert index in node.groups[0].writes.by_index and first == []
    retry: Answers = []
    before = core.log.last_index()
    assert node.propose(0, _put(b"v", retry=True), _collect(retry)) == before + 1  # not joined: appended
    _pump(hosts, outbox)
    # The first entry committed with the new term's entry; the retry's copy was answered from
    # the session cache: the same write, applied once.
    assert first[0][1] is None and first[0][0].index == index
    assert retry[0][1] is None and retry[0][0].revision == first[0][0].revision
    table = node.groups[0].writes
    assert len(table) == 0 and not table.by_session


def test_closing_the_group_fails_the_entry_and_its_joined_retries_alike() -> None:
    hosts, _ = _cluster()
    leader = hosts[1]
    first: Answers = []
    joined: Answers = []
    index = leader.propose(0, _put(b"v"), _collect(first))
    assert leader.propose(0, _put(b"v", retry=True), _collect(joined)) == index
    leader.close_group(0, destroy=False)
    assert len(first) == 1 and isinstance(first[0][1], errors.LeadershipLost) and first[0][1].indeterminate
    assert joined == first


def test_an_index_taken_by_a_later_term_displaces_its_write_with_its_session() -> None:
    """A node whose log lost an entry in a leader change can append at that index again in a
    later term (the simulator's seed 1120): the write waiting there is handed back and its
    session no longer points anywhere (it pointed at the new entry's index: a KeyError)."""
    table = PendingWrites()
    answers: Answers = []
    table.add(20, 4, _put(b"v"), _collect(answers))
    assert table.join(4, _put(b"v", retry=True), _collect(answers)) == 20
    displaced = table.add(20, 7, _put(b"x", seq=9), lambda r, e: None)
    assert displaced is not None and displaced.term == 4 and displaced.joined
    assert table.by_session == {(7, 9): 20}
    assert table.join(7, _put(b"v", retry=True), lambda r, e: None) is None  # nothing to join: proposed
    assert table.add(21, 7, _put(b"v", retry=True), lambda r, e: None) is None
    assert table.by_session == {(7, 9): 20, (7, 1): 21}
    table.pop(20)
    table.pop(21)
    assert not table.by_session


def test_joined_retries_per_entry_are_bounded() -> None:
    hosts, outbox = _cluster()
    leader = hosts[1]
    index = leader.propose(0, _put(b"v"), lambda r, e: None)
    for _ in range(MAX_JOINED):
        assert leader.propose(0, _put(b"v", retry=True), lambda r, e: None) == index
    assert leader.propose(0, _put(b"v", retry=True), lambda r, e: None) == index + 1  # proposed as before
    # and retries still join the first attempt, not the extra copy
    table = leader.groups[0].writes
    assert table.by_session[(7, 1)] == index
    _pump(hosts, outbox)
    assert len(table) == 0 and not table.by_session


def test_propose_many_joins_retries_of_pending_writes_and_appends_the_rest() -> None:
    hosts, outbox = _cluster()
    leader = hosts[1]
    first: Answers = []
    index = leader.propose(0, _put(b"v"), _collect(first))
    a: Answers = []
    b: Answers = []
    last = leader.propose_many(0, [_put(b"v", retry=True), _put(b"x", seq=2)], [_collect(a), _collect(b)])
    assert last == index + 1  # one entry appended: the fresh write
    _pump(hosts, outbox)
    assert a == first and first[0][1] is None
    assert b[0][1] is None and b[0][0].index == index + 1


def test_propose_many_refused_leaves_no_retry_joined() -> None:
    hosts, outbox = _cluster()
    leader = hosts[1]
    first: Answers = []
    leader.propose(0, _put(b"v"), _collect(first))
    core = leader.groups[0].core
    core.transfer_leader(2)  # proposals are refused while it is in flight
    a: Answers = []
    with pytest.raises(errors.ProposalDropped):
        leader.propose_many(0, [_put(b"v", retry=True), _put(b"x", seq=2)], [_collect(a), _collect([])])
    entry = leader.groups[0].writes.by_index[max(leader.groups[0].writes.by_index)]
    assert not entry.joined
    _pump(hosts, outbox)
    assert first and a == []  # refused definitely: the entry's answer is not the refused retry's


# --- fuzz: the identity check and the table's invariants ------------------------------------------
_u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80))
def test_session_of_and_same_write_are_total(a: bytes, b: bytes) -> None:
    s = commands.session_of(a)
    assert s is None or (isinstance(s, tuple) and s[0] != 0)
    assert commands.same_write(a, b) in (True, False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=8), st.binary(max_size=8), _u64, _u64, _u64, st.booleans(), _u64, _u64,
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=3))
def test_same_write_means_the_same_command_but_for_the_attempts_own_fields(
    key: bytes, value: bytes, cid: int, ack: int, horizon: int, retry: bool, revision: int, seq: int,
    flips: list[tuple[int, int]],
) -> None:
    a = commands.encode_put(key, value, cid or 1, seq, 0, False, 0, 0)
    b = bytearray(commands.encode_put(key, value, cid or 1, seq, ack, retry, horizon, revision))
    for pos, byte in flips:
        if pos < len(b):
            b[pos] = byte
    if commands.same_write(a, bytes(b)):
        ca, cb = commands.decode_command(a), commands.decode_command(bytes(b))
        assert (ca.op, ca.key, ca.value, ca.client_id, ca.seq) == (cb.op, cb.key, cb.value, cb.client_id, cb.seq)
        assert ca.expected == cb.expected and ca.expect_absent == cb.expect_absent


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "join", "pop"]), st.integers(1, 12), st.integers(1, 3),
                          st.integers(1, 2), st.integers(0, 2)), max_size=60))
def test_the_pending_table_stays_bounded_and_consistent(ops: list[tuple[str, int, int, int, int]]) -> None:
    table = PendingWrites()
    for op, index, seq, term, cid in ops:
        data = commands.encode_put(b"k", b"v", cid, seq, 0)
        if op == "add":
            had = table.by_index.get(index)
            displaced = table.add(index, term, data, lambda r, e: None)
            assert displaced is had
        elif op == "join":
            got = table.join(term, data, lambda r, e: None)
            if got is not None:
                w = table.by_index[got]
                assert w.term == term and commands.same_write(w.data, data) and cid != 0
        elif op == "pop":
            table.pop(index)
        assert len(table.by_session) <= len(table.by_index)
        for s, i in table.by_session.items():
            assert commands.session_of(table.by_index[i].data) == s
        assert all(len(w.joined or ()) <= MAX_JOINED for w in table.values())
    table.drain()
    assert len(table) == 0 and not table.by_session


def test_the_first_attempt_and_the_joined_retry_keep_their_own_deadlines() -> None:
    """Through the server's waiters: the first attempt gives up (its Timeout, indeterminate)
    while its entry is pending; the retry joins the entry and is answered with its result."""
    import asyncio

    from kvstore.server import waiters

    host = Host(1, MemoryNodeStore(), lambda msgs: None, RaftSettings(), random.Random(1))
    host.open_group(0, ConfState((1,)))
    host.groups[0].core.campaign()
    while host.has_work():
        host.run_cycle()
    assert host.groups[0].core.role == Role.LEADER

    async def run() -> None:
        with pytest.raises(errors.Timeout) as first:  # nothing runs the host meanwhile
            await waiters.propose(host, lambda: None, 0, _put(b"v"), 0.01)
        assert first.value.indeterminate
        pending = host.groups[0].writes
        assert len(pending) == 1
        index = next(iter(pending.by_index))
        last = host.groups[0].core.log.last_index()

        def wake() -> None:  # the driver's Ready loop, run once the retry is registered
            asyncio.get_running_loop().call_soon(lambda: [host.run_cycle() for _ in range(3) if host.has_work()])

        res = await waiters.propose(host, wake, 0, _put(b"v", retry=True), 5.0)
        assert host.groups[0].core.log.last_index() == last  # joined: nothing appended
        assert res is not None and res.error is None and res.index == index
        assert len(pending) == 0

    asyncio.run(run())
