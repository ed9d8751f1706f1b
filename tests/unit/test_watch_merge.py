"""The client's merge of sub-watches (`kvstore/client/watchmerge.py`), against a model.

The model: a history of revisions, each one write of 1..3 events in one group; sub-watches
each serve some groups (a cover) and answer in any interleaving with any response boundaries;
progress requests are answered late; subs fail and the merged watch restarts from
`restart_revision` with new subs. Checked over every run: ordered, unique, atomic (a revision's
events in one batch), bookmarkable (no event at or below a batch's revision later) and reliable
(the events are exactly the history's from the start through the last revision told).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.client.watchmerge import Batch, Merge, cover


@dataclass(frozen=True, slots=True)
class Ev:
    revision: int
    group: int
    n: int


def history(rng: random.Random, groups: int, revisions: int) -> list[Ev]:
    out: list[Ev] = []
    rev = 0
    for _ in range(revisions):
        rev += rng.randint(1, 3)
        g = rng.randrange(groups)
        out += [Ev(rev, g, i) for i in range(rng.randint(1, 3))]
    return out


class Server:
    """One sub-watch at a node: its groups' events from its start, in responses of any size."""

    def __init__(self, hist: list[Ev], groups: set[int], start: int, rng: random.Random, top: int) -> None:
        self.hist = [e for e in hist if e.group in groups]
        self.rng = rng
        self.top = top
        if start:
            self.pos = start - 1
        else:  # "now": some revision the node had reached
            self.pos = rng.randint(0, top)
        self.created = self.pos
        self.asked = 0

    def respond(self, upto: int | None = None) -> tuple[int, list[Ev]]:
        """A response up to a random revision (at least `upto` if given)."""
        lo = self.pos
        hi = max(lo, self.rng.randint(lo, self.top)) if upto is None else max(lo, upto)
        hi = min(max(hi, lo), self.top)
        evs = [e for e in self.hist if lo < e.revision <= hi]
        self.pos = hi
        return hi, evs


def run(seed: int, groups: int, revisions: int, nsubs: int, failures: int, start: int) -> None:
    rng = random.Random(seed)
    hist = history(rng, groups, revisions)
    top = hist[-1].revision + 5
    got: list[Batch[Ev]] = []
    first_base: int | None = None
    next_start = start
    fails = failures
    for _attempt in range(failures + 2):
        parts: list[set[int]] = [set() for _ in range(nsubs)]
        for g in range(groups):
            parts[rng.randrange(nsubs)].add(g)
        parts = [p for p in parts if p] or [set(range(groups))]
        m: Merge[Ev] = Merge(len(parts), next_start, max_queued=rng.choice([1, 5, 10_000]))
        servers = [Server(hist, p, next_start, rng, top) for p in parts]
        pending_create = list(range(len(servers)))
        rng.shuffle(pending_create)
        failed = False
        for _ in range(400):
            if pending_create and rng.random() < 0.5:
                i = pending_create.pop()
                m.created(i, servers[i].created)
            else:
                live = [i for i in range(len(servers)) if i not in pending_create and not m.paused(i)]
                if not live:
                    if pending_create:
                        continue
                    break
                i = rng.choice(live)
                sv = servers[i]
                if sv.asked and rng.random() < 0.5:  # a progress request answered
                    r, evs = sv.respond(sv.asked)
                    sv.asked = 0
                else:
                    r, evs = sv.respond()
                m.response(i, r, evs)
            if rng.random() < 0.05:
                m.catch_up()
            for i, rev in m.asks():
                assert servers[i].pos < rev <= top, (servers[i].pos, rev)
                if rng.random() < 0.1:  # its node's clock refuses it
                    m.refused(i)
                else:
                    servers[i].asked = max(servers[i].asked, rev)
            got += m.take()
            if m.started and first_base is None:
                first_base = m.base
            if fails and rng.random() < 0.02:
                fails -= 1
                failed = True
                break
        if not failed:
            # finish: every server answers up to the top
            while pending_create:
                i = pending_create.pop()
                m.created(i, servers[i].created)
            for i, sv in enumerate(servers):
                r, evs = sv.respond(top)
                m.response(i, r, evs)
            got += m.take()
            if first_base is None:
                first_base = m.base
            assert m.frontier == top
            break
        next_start = m.restart_revision
        if not next_start and got:
            next_start = got[-1].revision + 1
    assert first_base is not None
    check(got, hist, first_base, top)


def check(got: list[Batch[Ev]], hist: list[Ev], base: int, top: int) -> None:
    told = base
    seen: list[Ev] = []
    for b in got:
        assert b.revision >= told, "a batch went back"
        revs = [e.revision for e in b.events]
        assert revs == sorted(revs), "ordered within a batch"
        if b.events:
            assert b.events[0].revision > told, "bookmarkable / atomic: nothing at or below an earlier batch"
            assert b.events[-1].revision <= b.revision
        seen += b.events
        told = b.revision
    assert told == top
    want = [e for e in hist if base < e.revision <= top]
    key = [(e.revision, e.group, e.n) for e in seen]
    assert len(set(key)) == len(key), "unique"
    assert sorted(key) == sorted((e.revision, e.group, e.n) for e in want), "reliable: exactly the history"
    assert [e.revision for e in seen] == sorted(e.revision for e in seen), "ordered"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 6), st.integers(1, 60), st.integers(1, 4), st.integers(0, 3),
       st.sampled_from([0, 1, 5]))
def test_the_merge_matches_the_history_under_any_interleaving_failures_and_restarts(
        seed: int, groups: int, revisions: int, nsubs: int, failures: int, start: int) -> None:
    run(seed, groups, revisions, nsubs, failures, start)


def test_an_event_held_by_one_sub_asks_the_lagging_subs_to_get_past_it() -> None:
    m: Merge[Ev] = Merge(3, 10)
    for i in range(3):
        m.created(i, 9)
    assert [(b.revision, b.events) for b in m.take()] == [(9, ())]  # the created point
    m.response(0, 20, [Ev(15, 0, 0), Ev(20, 0, 0)])
    assert m.take() == []  # subs 1 and 2 may still hold events below 15
    assert sorted(m.asks()) == [(1, 20), (2, 20)]
    assert m.asks() == []  # one in flight per sub
    m.response(1, 16, [Ev(12, 1, 0)])
    m.response(2, 20, [])
    assert [(b.revision, [e.revision for e in b.events]) for b in m.take()] == [(16, [12, 15])]
    assert m.asks() == []  # sub 1's request (20) is still in flight
    m.response(1, 20, [])
    assert [(b.revision, [e.revision for e in b.events]) for b in m.take()] == [(20, [20])]
    assert m.restart_revision == 21


def test_a_start_now_begins_at_the_highest_created_revision_and_drops_what_came_before() -> None:
    m: Merge[Ev] = Merge(2, 0)
    m.created(0, 50)
    assert not m.started and m.restart_revision == 0
    m.response(0, 60, [Ev(55, 0, 0)])
    m.created(1, 40)
    assert m.started and m.base == 50
    assert m.asks() == [(1, 55)]
    m.response(1, 58, [Ev(45, 1, 0), Ev(52, 1, 0)])  # 45: before the start, dropped
    got = m.take()
    assert [(b.revision, [e.revision for e in b.events]) for b in got] == [(50, []), (58, [52, 55])]


def test_a_sub_far_ahead_is_paused_and_the_one_at_the_frontier_never_is() -> None:
    m: Merge[Ev] = Merge(2, 1, max_queued=3)
    m.created(0, 0)
    m.created(1, 0)
    m.take()
    m.response(0, 10, [Ev(r, 0, 0) for r in range(1, 6)])
    assert m.paused(0) and not m.paused(1)
    m.response(1, 10, [])
    assert not m.paused(0)
    assert [e.revision for b in m.take() for e in b.events] == [1, 2, 3, 4, 5]


def test_a_sub_holding_many_bytes_is_paused_before_many_events() -> None:
    """Memory is bounded by bytes, not only by counts: two 600-byte events pass a 1000-byte bound."""
    m: Merge[Ev] = Merge(2, 1, max_queued=10_000, max_bytes=1000)
    m.created(0, 0)
    m.created(1, 0)
    m.take()
    m.response(0, 1, [Ev(1, 0, 0)], [600])
    assert not m.paused(0)
    m.response(0, 2, [Ev(2, 0, 0)], [600])
    assert m.paused(0) and not m.paused(1)
    m.response(1, 1, [])
    assert not m.paused(0)  # revision 1 went out: 600 bytes left
    assert [e.revision for b in m.take() for e in b.events] == [1]
    m.response(1, 2, [])
    assert [e.revision for b in m.take() for e in b.events] == [2]
    assert m.subs[0].queued_bytes == 0
    with pytest.raises(ValueError):
        m.response(0, 3, [Ev(3, 0, 0)], [1, 2])  # a size per event
    with pytest.raises(ValueError):
        Merge(2, 1, max_bytes=0)


@pytest.mark.parametrize("bad", [
    lambda m: m.response(0, 5, [Ev(7, 0, 0)]),  # an event above the response's revision
    lambda m: m.response(0, 9, [Ev(8, 0, 0), Ev(6, 0, 0)]),  # out of order
    lambda m: m.response(0, 3, []),  # back
    lambda m: m.created(0, 4),  # twice
])
def test_a_misbehaving_sub_is_an_error_not_a_wrong_merge(bad) -> None:  # type: ignore[no-untyped-def]
    m: Merge[Ev] = Merge(2, 5)
    m.created(0, 4)
    with pytest.raises(ValueError):
        bad(m)


def test_cover_uses_few_nodes_and_every_group_goes_to_a_host() -> None:
    # 5 nodes, 5 groups of 3 replicas each (round robin): no node hosts every group
    members = {g: {(g + i) % 5 + 1 for i in range(3)} for g in range(5)}
    c = cover(range(5), members, usable={1, 2, 3, 4, 5})
    assert c is not None and len(c) == 2
    assert sorted(g for gs in c.values() for g in gs) == [0, 1, 2, 3, 4]
    assert all(n in members[g] for n, gs in c.items() for g in gs)
    assert cover(range(5), members, usable={1}) is None
    one = cover([0, 1], {0: {1, 2}, 1: {2, 3}}, usable={1, 2, 3})
    assert one == {2: (0, 1)}


@given(st.dictionaries(st.integers(0, 20), st.sets(st.integers(1, 8), max_size=4), max_size=12),
       st.sets(st.integers(1, 8)))
def test_cover_is_a_cover_or_none(members: dict[int, set[int]], usable: set[int]) -> None:
    c = cover(members, members, usable)
    coverable = all(members[g] & usable for g in members)
    assert (c is not None) == coverable
    if c is not None:
        assert sorted(g for gs in c.values() for g in gs) == sorted(members)
        assert all(n in usable and n in members[g] for n, gs in c.items() for g in gs)


def test_catch_up_asks_the_subs_below_the_most_advanced_one() -> None:
    m: Merge[Ev] = Merge(3, 5)
    m.catch_up()  # not started: nothing to ask
    for i in range(3):
        m.created(i, 4)
    m.response(1, 30, [])
    m.response(2, 12, [])
    assert m.asks() == []  # no event waits
    m.catch_up()
    assert sorted(m.asks()) == [(0, 30), (2, 30)]
    m.response(0, 31, [])
    m.response(2, 30, [])
    assert [b.revision for b in m.take()] == [4, 12, 30]


def test_a_refused_progress_request_is_asked_again_only_after_a_catch_up() -> None:
    m: Merge[Ev] = Merge(2, 5)
    m.created(0, 4)
    m.created(1, 4)
    m.response(0, 20, [Ev(20, 0, 0)])
    assert m.asks() == [(1, 20)]
    m.refused(1)
    m.response(0, 21, [])
    assert m.asks() == []  # held
    m.catch_up()
    assert m.asks() == [(1, 21)]


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.lists(st.integers(0, 5000), max_size=4)),
                      max_size=40),
       bound=st.integers(1, 20_000))
def test_the_byte_count_is_exactly_what_is_held_and_drains_to_zero(steps: list[tuple[int, int, list[int]]],
                                                                  bound: int) -> None:
    """Any responses with any sizes: each sub's byte count is the sum of the sizes of the events
    it holds, `paused` says so against the bound, and once every sub catches up nothing is held."""
    m: Merge[Ev] = Merge(3, 1, max_queued=10_000, max_bytes=bound)
    for i in range(3):
        m.created(i, 0)
    revs = [0, 0, 0]
    top = 0
    for sub, ahead, sizes in steps:
        top = max(top, revs[sub]) + 1  # this response's revisions: top .. (one event each), above its last
        evs = [Ev(top + k, sub, 0) for k in range(len(sizes))]
        top += len(sizes)
        revs[sub] = top + ahead
        m.response(sub, revs[sub], evs, sizes)
        for s in m.subs:
            assert s.queued_bytes == sum(n for _, _, n in s.queue) >= 0
        assert all(m.paused(i) == (s.queued_bytes >= bound or s.queued >= 10_000) for i, s in enumerate(m.subs))
    end = max(revs) + top
    for i in range(3):
        m.response(i, end, [])
    assert all(s.queued_bytes == 0 and s.queued == 0 and not m.paused(i) for i, s in enumerate(m.subs))
