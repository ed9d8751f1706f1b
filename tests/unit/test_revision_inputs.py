"""Hostile revision inputs: every new field is validated and every new decoder is total."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore import errors
from kvstore.client.checks import check_revision
from kvstore.node.hlc import MAX_CLOCK_OFFSET_MS, HybridClock
from kvstore.server.requests import check_revision as server_check_revision
from kvstore.storage import commands as cmds
from kvstore.storage import mvcc
from kvstore.storage.machine import DictState, UnknownCommandKind

NOW_MS = mvcc.EPOCH_MS + 86_400_000


def clock() -> HybridClock:
    return HybridClock(lambda: NOW_MS)


@given(st.integers(-(1 << 70), 1 << 70))
def test_a_client_floor_is_accepted_only_within_the_clock_bound(floor: int) -> None:
    c = clock()
    ahead_ms = ((floor >> mvcc.PHYSICAL_SHIFT) + mvcc.EPOCH_MS) - NOW_MS if floor >= 0 else 0
    try:
        rev = c.propose(floor)
    except errors.InvalidArgument as err:
        assert not err.indeterminate
        assert floor < 0 or floor > mvcc.PROPOSAL_MAX or ahead_ms >= MAX_CLOCK_OFFSET_MS
        assert c.last == 0  # a refused floor moves nothing
        return
    assert 0 <= floor <= mvcc.PROPOSAL_MAX and ahead_ms <= MAX_CLOCK_OFFSET_MS
    assert rev > floor and rev <= mvcc.PROPOSAL_MAX
    assert c.propose() > rev  # strictly increasing readings


def test_proposals_follow_the_clock_and_never_go_back() -> None:
    t = [NOW_MS]
    c = HybridClock(lambda: t[0])
    a = c.propose()
    t[0] -= 10_000  # the clock jumps back
    b = c.propose()
    t[0] += 20_000
    d = c.propose()
    assert a < b < d and mvcc.revision_ms(a) == NOW_MS and mvcc.revision_ms(d) == NOW_MS + 10_000


@given(st.integers(-(1 << 70), 1 << 70))
def test_read_revisions_are_checked_on_both_sides(rev: int) -> None:
    if rev < 0:
        with pytest.raises(errors.InvalidArgument):
            server_check_revision(rev)
    else:
        server_check_revision(rev)
    ok = 0 <= rev <= mvcc.REVISION_MAX
    if ok:
        assert check_revision(rev) == rev
    else:
        with pytest.raises(errors.InvalidArgument):
            check_revision(rev)
    with pytest.raises(TypeError):
        check_revision(str(rev))


@given(st.binary(max_size=80))
def test_command_and_history_decoders_are_total(data: bytes) -> None:
    for decode in (cmds.decode_command, cmds.decode_result, mvcc.decode_versions, mvcc.RevState.decode):
        with contextlib.suppress(ValueError):
            decode(data)
    s = DictState(group=9)
    if cmds.unknown_kind(data) is not None:  # what a newer release writes: apply stops (version.py)
        with pytest.raises(UnknownCommandKind):
            s.apply(data)
        return
    res = s.apply(data)  # garbage as an entry: an error result or a valid command, never a crash
    assert res.error is not None or res.revision >= 0


@given(st.integers(0, (1 << 64) - 1))
def test_compact_at_any_revision_is_total_and_never_goes_backwards(rev: int) -> None:
    s = DictState(group=1)
    w = s.apply(cmds.encode_put(b"k", b"v")).revision
    res = s.apply(cmds.encode_compact(rev))
    if 0 < rev <= mvcc.REVISION_MAX:
        assert res.error is None and res.revision == min(rev, w) == mvcc.rev_state(s.rows).compact
    else:
        assert res.error is not None and mvcc.rev_state(s.rows).compact == 0
    assert s.data == {b"k": b"v"}
    again = s.apply(cmds.encode_compact(1))
    assert again.revision == mvcc.rev_state(s.rows).compact  # never backwards


def test_the_client_sends_the_highest_revision_it_observed_with_every_write() -> None:
    from kvstore.client.writes import Writes

    w = Writes(7, None, None, None)  # type: ignore[arg-type]  # begin_write needs none of them
    assert w.begin_write().revision == 0
    for seen in (5, 3, 9, 9, 1):
        w.observe(seen)
    s = w.begin_write()
    assert (s.client_id, s.revision) == (7, 9)


@given(st.integers(0, 10**9), st.integers(0, 10**6), st.floats(0.001, 10**6))
def test_retention_compacts_exactly_what_is_older_than_it(age_ms: int, jitter: int, retention_s: float) -> None:
    from kvstore.server.compaction import retention_revision

    now = NOW_MS + 10**9
    written = now - age_ms
    rev = HybridClock(lambda: written).propose() + jitter % mvcc.STEP  # any slot, logical 0
    cut = retention_revision(now, retention_s)
    older = written < now - int(retention_s * 1000)
    assert (rev < cut) == older
