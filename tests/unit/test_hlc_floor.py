"""Issue 17 review, finding 3: a client's floor is bounded by the WALL clock alone
(`HybridClock.floor_bound`: physical + 2 x max_offset), so repeated floors at the bound cannot
ratchet the leader's clock forward; legitimate floors (revisions of a node whose clock leads by
up to the uncertainty bound) are still accepted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.hlc import MAX_CLOCK_OFFSET_MS, HybridClock
from kvstore.storage import mvcc

NOW_MS = mvcc.EPOCH_MS + 10**9


def units(ms: int) -> int:
    """HLC units (revision >> SLOT_BITS) of wall time `ms`."""
    return (ms - mvcc.EPOCH_MS) << mvcc.LOGICAL_BITS


def rev(ms: int, logical: int = 0) -> int:
    return mvcc.make_revision(ms, logical, 0)


def test_floors_at_the_bound_cannot_ratchet_the_clock() -> None:
    clock = HybridClock(lambda: NOW_MS)
    ceiling = units(NOW_MS + 2 * MAX_CLOCK_OFFSET_MS)
    accepted = 0
    for _ in range(500):  # each a floor the offset ahead of everything the node has seen
        floor = (max(units(NOW_MS), clock.last) + (MAX_CLOCK_OFFSET_MS << mvcc.LOGICAL_BITS)) << mvcc.SLOT_BITS
        try:
            clock.propose(floor)
            accepted += 1
        except errors.FutureRevision as err:
            assert err.definite
        with pytest.raises(errors.FutureRevision):  # beyond the wall clock's bound: refused, whatever `last` is
            clock.check_floor(rev(NOW_MS + 2 * MAX_CLOCK_OFFSET_MS + 1))
    assert accepted >= 1  # the first is within 2 x offset of the wall clock
    assert clock.last <= ceiling + 500  # the floors' own step only, never a further 500 ms each
    assert clock.propose() >> mvcc.SLOT_BITS <= ceiling + 501
    assert clock.floor_bound(units(NOW_MS)) == ceiling


def test_legitimate_floors_are_accepted() -> None:
    """A revision another node made with its clock leading by the offset (and a logical count)."""
    here = HybridClock(lambda: NOW_MS)
    there = HybridClock(lambda: NOW_MS + MAX_CLOCK_OFFSET_MS)
    for _ in range(1000):
        floor = there.propose()
        r = here.propose(floor)
        assert r > floor
    here.check_floor(rev(NOW_MS + 2 * MAX_CLOCK_OFFSET_MS))  # exactly at the bound: accepted
    with pytest.raises(errors.FutureRevision):
        here.check_floor(rev(NOW_MS + 2 * MAX_CLOCK_OFFSET_MS + 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, mvcc.PROPOSAL_MAX), max_size=30), st.integers(0, 10_000))
def test_no_floor_sequence_moves_the_clock_past_the_bound(floors: list[int], skew_ms: int) -> None:
    """Hostile floors, any order: each is accepted or refused definitely, and the clock never
    runs more than 2 x max_offset (plus the floors' logical steps) ahead of the wall clock."""
    clock = HybridClock(lambda: NOW_MS + skew_ms)
    wall = units(NOW_MS + skew_ms)
    for f in floors:
        try:
            clock.propose(f)
        except errors.KVError as err:
            assert err.definite
    assert clock.last <= wall + (2 * MAX_CLOCK_OFFSET_MS << mvcc.LOGICAL_BITS) + len(floors)
