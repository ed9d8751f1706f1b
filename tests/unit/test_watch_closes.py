"""Event-driven closes for watches: the hub's `close_wants` (which groups an event waits on, at
which revision) and `kvstore/node/watchcloses.py` (coalescing, the frontier already passed,
retry after a failure with backoff, the in-flight bound), on the real hub over real in-memory
groups whose CLOSE commands go through the real apply."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_watch_hub import Cluster, drain, events

from kvstore import errors
from kvstore.node.closes import CloseCallback
from kvstore.node.watch import WatchHub, WatchStream
from kvstore.node.watchcloses import CloseSchedule, WatchCloser
from kvstore.node.watchspec import WatchSpec
from kvstore.storage import commands
from kvstore.storage.changefeed import PUT

# --- CloseSchedule --------------------------------------------------------------------------------


def test_wants_of_a_group_coalesce_into_one_close_in_flight_then_one_at_their_maximum() -> None:
    s = CloseSchedule()
    last = {1: 0}.get
    s.want(1, 100)
    assert s.due(0.0, last) == [(1, 100)]
    for rev in (300, 200, 250, 100):  # events keep arriving while the close is in flight
        s.want(1, rev)
    assert s.due(0.0, last) == []  # one close per group in flight
    s.finished(1, 100, 100, None, 0.0)
    assert s.due(0.0, last) == [(1, 300)]  # the next one closes at the largest wanted
    s.finished(1, 300, 300, None, 0.0)
    assert s.due(0.0, last) == [] and s.inflight == 0


def test_no_close_for_a_revision_the_group_passed_by_itself_or_by_an_earlier_close() -> None:
    s = CloseSchedule()
    s.want(1, 100)
    assert s.due(0.0, {1: 100}.get) == []  # its own writes passed it: dropped, nothing sent
    assert s.groups == {}
    s.want(2, 50)
    [(g, rev)] = s.due(0.0, {2: 0}.get)
    s.want(2, 400)  # a later event, while the close at 50 is in flight
    s.finished(g, rev, 500, None, 0.0)  # the leader's group was already at 500: that covers 400
    assert s.due(0.0, {2: 0}.get) == []  # (this replica has not applied it yet: no second close)
    s.want(2, 450)
    assert s.due(0.0, {2: 0}.get) == []
    s.want(2, 501)
    assert s.due(0.0, {2: 0}.get) == [(2, 501)]


def test_a_failed_close_is_retried_after_a_doubling_backoff_while_still_wanted() -> None:
    s = CloseSchedule(backoff=0.02, max_backoff=0.05)
    last = {1: 0}.get
    s.want(1, 100)
    assert s.due(0.0, last) == [(1, 100)]
    s.finished(1, 100, 0, errors.NoLeader("no leader"), 1.0)
    assert s.next_retry(1.0) == 1.02
    assert s.due(1.01, last) == []
    assert s.due(1.02, last) == [(1, 100)]
    s.finished(1, 100, 0, errors.Timeout("lost", indeterminate=True), 2.0)
    assert s.next_retry(2.0) == 2.04  # doubled
    s.want(1, 150)  # a later event meanwhile: the retry closes at it
    assert s.due(2.03, last) == [] and s.due(2.04, last) == [(1, 150)]
    s.finished(1, 150, 0, errors.NoLeader("no leader"), 3.0)
    assert s.next_retry(3.0) == 3.05  # capped at max_backoff
    assert s.due(3.05, {1: 150}.get) == []  # passed meanwhile: no retry
    assert s.groups == {} and s.next_retry(3.1) is None
    s.want(1, 200)
    assert s.due(3.05, {1: 150}.get) == [(1, 200)]  # a new want after that starts without backoff
    s.finished(1, 200, 200, None, 3.1)
    assert s.groups[1].failures == 0 and s.next_retry(3.1) is None


def test_a_busy_group_is_given_its_grace_to_pass_the_revision_by_itself() -> None:
    s = CloseSchedule()
    s.want(1, 100, hold_until=0.01)  # group 1 wrote at 0.0: it may pass 100 with its next write
    assert s.due(0.005, {1: 90}.get) == [] and s.next_retry(0.005) == 0.01
    assert s.due(0.008, {1: 120}.get) == []  # it did: nothing sent, nothing left
    assert s.groups == {} and s.next_retry(0.008) is None
    s.want(1, 200, hold_until=0.02)
    assert s.due(0.02, {1: 120}.get) == [(1, 200)]  # it stopped writing: closed after the grace


def test_closes_in_flight_are_bounded_and_the_rest_go_when_one_ends() -> None:
    s = CloseSchedule(max_inflight=2)
    last = dict.fromkeys(range(1, 6), 0).get
    for g in range(1, 6):
        s.want(g, 100 + g)
    first = s.due(0.0, last)
    assert len(first) == 2 and s.inflight == 2
    assert s.due(0.0, last) == []
    s.finished(*first[0], first[0][1], None, 0.0)
    second = s.due(0.0, last)
    assert len(second) == 1 and s.inflight == 2
    sent = {g for g, _ in first + second}
    assert len(sent) == 3


def test_a_group_no_longer_watched_is_forgotten() -> None:
    s = CloseSchedule()
    s.want(1, 100)
    s.want(2, 100)
    [(g, rev)] = s.due(0.0, {2: 0}.get)  # group 1 is no longer watched: dropped, not sent
    assert (g, rev) == (2, 100) and 1 not in s.groups
    s.want(2, 200)
    assert s.due(0.0, {}.get) == []  # unwatched while in flight: its want goes
    s.finished(2, 100, 100, None, 0.0)
    assert s.due(0.0, {}.get) == [] and s.groups == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["want", "due", "ok", "fail", "write"]), st.integers(1, 4),
                          st.integers(1, 60)), max_size=80),
       st.integers(1, 3))
def test_schedule_invariants_under_any_sequence(ops: list[tuple[str, int, int]], cap: int) -> None:
    """Whatever arrives in whatever order: at most one close per group and `cap` in all in
    flight, never a close at or below the group's last or a close already acknowledged, and
    every want above them is eventually sent once the failures stop."""
    s = CloseSchedule(max_inflight=cap, backoff=0.01, max_backoff=0.04)
    last = dict.fromkeys(range(1, 5), 0)
    reached = dict.fromkeys(range(1, 5), 0)
    flight: dict[int, int] = {}
    now = 0.0

    def due() -> None:
        for g, rev in s.due(now, last.get):
            assert g not in flight and rev > last[g] and rev > reached[g]
            flight[g] = rev
        assert len(flight) == s.inflight <= cap

    for op, g, rev in ops:
        now += 0.005
        if op == "want":
            s.want(g, rev)
        elif op == "due":
            due()
        elif op == "write":
            last[g] = max(last[g], rev)
        elif g in flight:
            r = flight.pop(g)
            if op == "ok":
                reached[g] = max(reached[g], r)
                s.finished(g, r, r, None, now)
            else:
                s.finished(g, r, 0, errors.NoLeader("x"), now)
        due()
    wanted = {g: w.want for g, w in s.groups.items() if w.want}
    for _ in range(20):  # no more failures: everything still wanted goes out
        now += 0.05
        due()
        for g in list(flight):
            r = flight.pop(g)
            reached[g] = max(reached[g], r)
            s.finished(g, r, r, None, now)
    for g, w in wanted.items():
        assert reached[g] >= w or last[g] >= w


# --- the hub's wants ------------------------------------------------------------------------------


def _prefix_watch(c: Cluster, hub: WatchHub, progress: bool = False) -> WatchStream:
    s = hub.open()
    # from the lowest last revision of the groups (what "now" meant before exact starts), so
    # the watch is created at once and the later writes of the test are its events
    start = min(c.store.revisions.rev_state(g).last for g in c.groups) + 1
    s.create(WatchSpec.make(b"", prefix=b"app/", start_revision=start, progress_notify=progress), c.groups,
             watch_id=1)
    drain(hub, s)
    hub.close_wants()  # (a new watch assumes every group may hold a change up to its last)
    return s


def test_an_event_asks_for_closes_of_exactly_the_groups_below_it_and_closes_make_no_more() -> None:
    c = Cluster()
    hub = c.hub()
    s = _prefix_watch(c, hub)
    c.apply(1, [commands.encode_close(c.tick())])  # a close is no event: it asks for nothing
    hub.applied([1])
    assert drain(hub, s) == [] and hub.close_wants() == {}
    r1 = c.put(2, b"app/a", b"1")
    hub.applied([2])
    assert drain(hub, s) == []
    assert hub.close_wants() == {1: r1, 3: r1}  # exactly the lagging groups, at the event
    assert hub.close_wants() == {}  # asked once (the node keeps it until the groups pass it)
    for g in (1, 3):
        c.apply(g, [commands.encode_close(r1)])
    hub.applied([1, 3])
    assert events(drain(hub, s)) == [(r1, b"app/a", PUT, b"1")]
    # the closes left groups 1 and 3 above r1 (their slots) and group 2 below them: no ping-pong
    assert hub.close_wants() == {}


def test_a_group_that_writes_past_the_event_by_itself_is_not_asked_to_close() -> None:
    c = Cluster()
    hub = c.hub()
    s = _prefix_watch(c, hub)
    r1 = c.put(1, b"app/a", b"1")
    r2 = c.put(2, b"other", b"2")  # outside the prefix: still a change the hub cannot rule out
    r3 = c.put(3, b"app/c", b"3")
    hub.applied([1, 2, 3])
    assert events(drain(hub, s)) == [(r1, b"app/a", PUT, b"1")]
    assert hub.close_wants() == {1: r3, 2: r3}  # the highest change waits on the others
    r4 = c.put(1, b"app/d", b"4")
    r5 = c.put(2, b"app/e", b"5")
    hub.applied([1, 2])
    assert events(drain(hub, s)) == [(r3, b"app/c", PUT, b"3")]
    assert r2 < r3 < r4 < r5
    assert hub.close_wants() == {1: r5, 3: r5}


def test_a_key_watch_asks_for_nothing_and_a_progress_request_asks_past_every_group() -> None:
    c = Cluster()
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"k"), [1], watch_id=1)
    drain(hub, s)
    rk = c.put(1, b"k", b"v")
    hub.applied([1])
    drain(hub, s)
    assert hub.close_wants() == {}
    p = _prefix_watch(c, hub)
    top = c.apply(2, [commands.encode_close(c.tick())])[0]
    assert top is not None
    hub.applied([2])
    drain(hub, p)
    # the put is a change the prefix watch waits for (it started below it); group 2 was closed
    # past it, group 3 still holds it; the close itself is no event: asks nothing above rk
    assert hub.close_wants() == {3: rk}
    p.progress()
    drain(hub, p)
    assert hub.close_wants() == {1: top.revision, 3: top.revision}  # the next reply gets past all


# --- the closer on the real hub -------------------------------------------------------------------


class Node:
    """One node's closes over a `Cluster`: `lead` groups close here (the CLOSE is applied through
    the real apply when the test says the round ended), the others are forwarded, which fail as
    long as `leaderless` holds them."""

    def __init__(self, c: Cluster, hub: WatchHub, lead: set[int]) -> None:
        self.c = c
        self.lead = lead
        self.now = 0.0
        self.leaderless: set[int] = set()
        self.rounds: list[tuple[int, int, CloseCallback]] = []
        self.sent: list[tuple[str, int, int]] = []
        self.closer = WatchCloser(hub, lambda g: g in self.lead, self._close("close"), self._close("forward"),
                                  lambda: self.now, lambda: None)

    def _close(self, how: str):  # type: ignore[no-untyped-def]
        def send(g: int, rev: int, cb: CloseCallback) -> None:
            self.sent.append((how, g, rev))
            if how == "forward" and g in self.leaderless:
                raise errors.NoLeader(f"no leader of group {g}")
            self.rounds.append((g, rev, cb))
        return send

    def round(self) -> None:
        """The Raft rounds of the closes in flight end: each CLOSE applies, its caller learns it."""
        rounds, self.rounds = self.rounds, []
        for g, rev, cb in rounds:
            [res] = self.c.apply(g, [commands.encode_close(rev)])
            assert res is not None and not res.error
            cb(res.revision, None)


def test_the_closer_gets_an_event_out_after_one_round_and_retries_a_failed_close() -> None:
    c = Cluster()
    hub = c.hub()
    s = _prefix_watch(c, hub)
    node = Node(c, hub, lead={1})
    node.leaderless.add(3)
    r1 = c.put(2, b"app/a", b"1")
    hub.applied([2])
    assert drain(hub, s) == []
    node.closer.run(node.now)
    assert sorted(node.sent) == [("close", 1, r1), ("forward", 3, r1)]
    retry = node.closer.retry_at(node.now)
    assert retry is not None and retry > node.now  # group 3 failed: after a backoff
    node.round()
    hub.applied([1])
    assert drain(hub, s) == []  # group 3 still holds it
    node.closer.run(node.now)
    assert len(node.sent) == 2  # nothing new before the backoff ends
    node.leaderless.clear()
    node.now = retry
    node.closer.run(node.now)
    assert node.sent[-1] == ("forward", 3, r1)
    node.round()
    hub.applied([3])
    assert events(drain(hub, s)) == [(r1, b"app/a", PUT, b"1")]
    node.closer.run(node.now)
    assert len(node.sent) == 3 and node.closer.retry_at(node.now) is None


def test_groups_that_all_write_pass_each_other_without_closes() -> None:
    c = Cluster()
    hub = c.hub()
    s = _prefix_watch(c, hub)
    node = Node(c, hub, lead={1, 2, 3})
    node.closer.busy_grace = 0.01
    revs = []
    for g in c.groups:  # every group writes (before the closer first runs)
        revs.append(c.put(g, b"app/w%d" % g, b"x"))
        hub.applied([g])
    got = []
    for i in range(30):  # every group writes every 3 ms (a high write rate)
        g = 1 + i % 3
        revs.append(c.put(g, b"app/%d" % i, b"x"))
        hub.applied([g])
        node.now = 0.001 * (i + 1)
        got += events(drain(hub, s, node.now))
        node.closer.run(node.now)
    assert node.sent == []  # each lagging group had written within the grace
    assert len(got) >= 28  # and the events went out as the groups passed each other
    node.now += 0.01
    node.closer.run(node.now)  # the writes stopped: the last event's lagging groups are closed
    assert sorted(g for _, g, _ in node.sent) == [1, 2] and {r for _, _, r in node.sent} == {revs[-1]}
    node.round()
    hub.applied([1, 2])
    got += events(drain(hub, s, node.now))
    assert [e[0] for e in got] == revs


def test_a_burst_of_writes_costs_one_close_per_lagging_group_per_round() -> None:
    c = Cluster()
    hub = c.hub()
    s = _prefix_watch(c, hub)
    node = Node(c, hub, lead={1, 2, 3})
    revs = []
    for i in range(50):  # 50 events in group 2 while the first closes are in flight
        revs.append(c.put(2, b"app/%d" % i, b"x"))
        hub.applied([2])
        drain(hub, s)
        node.closer.run(node.now)
    assert sorted(node.sent) == [("close", 1, revs[0]), ("close", 3, revs[0])]
    node.round()
    hub.applied([1, 3])
    got = drain(hub, s)
    assert [e[0] for e in events(got)] == revs[:1]  # the first event is out after one round
    node.closer.run(node.now)
    assert sorted(node.sent[2:]) == [("close", 1, revs[-1]), ("close", 3, revs[-1])]  # coalesced
    node.round()
    hub.applied([1, 3])
    got = drain(hub, s)
    assert [e[0] for e in events(got)] == revs[1:]  # the rest after the second
    node.closer.run(node.now)
    assert len(node.sent) == 4


def test_a_close_never_answered_is_taken_as_failed_after_the_timeout_and_sent_again() -> None:
    """A forward's reply can be lost and the leader that took a close can crash: without an
    answer the group would stay "in flight" for good and its watches would stall (simulator seed
    1138: a watch's frontier stopped 1.5 s before the end of the run)."""
    s = CloseSchedule(backoff=0.02, timeout=0.5)
    last = {1: 0}.get
    s.want(1, 100)
    assert s.due(0.0, last) == [(1, 100)]
    assert s.next_retry(0.1) == 0.5  # the driver's timer wakes at the timeout
    assert s.due(0.4, last) == []  # still in flight
    assert s.due(0.5, last) == [] and s.inflight == 0 and s.groups[1].failures == 1
    assert s.due(0.52, last) == [(1, 100)]  # asked again after the backoff
    s.finished(1, 100, 100, None, 0.55)  # (an answer, maybe the first close's, late)
    assert s.inflight == 0 and s.groups[1].reached == 100 and s.due(0.6, last) == []
