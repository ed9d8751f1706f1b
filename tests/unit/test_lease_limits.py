"""Review findings on a lease's deletion across groups (issue 17): a LEASE_PUT attaches at most
`leases.MAX_KEYS_PER_LEASE` keys to a lease per group (an O(1) count row kept on every attach
and detach path, carried and checked with the lease rows), and a lease deletion's PREPARE has no
lower limit of its own (a move may bring more keys; a refused PREPARE would leave the lease
undeletable forever); one group-count check for range deletes and lease deletions; the lease
clock survives a deletion it cannot plan; one helper names the groups a deletion covers."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node import lessor
from kvstore.node import xtxn as logic
from kvstore.node.hlc import HybridClock
from kvstore.node.lessor import Proposal
from kvstore.server.lease_service import LeaseDriver, LeaseRequests
from kvstore.server.xtxn_run import CrossTxns
from kvstore.shard.ranges import key_hash
from kvstore.storage import leases, mvcc, xtxn
from kvstore.storage.commands import ApplyResult, Command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd
from kvstore.storage.machine import DictState

HOME, OTHER = 3, 5
LID = leases.make_id(HOME, 4242)
LID2 = leases.make_id(7, 99)


def lease(s: DictState, c: LeaseCmd, key: bytes = b"", value: bytes = b"") -> ApplyResult:
    return s.apply(encode_command(Command.lease_command(c, key, value)))


def counts_match(rows: mvcc.Rows) -> None:
    """Every lease's count row equals its attachment rows (absent when there are none)."""
    for k, v in rows.iter(leases.T_LEASES, b"C", b"D"):
        lid = int.from_bytes(bytes(k)[1:], "big")
        assert int.from_bytes(bytes(v), "big") == len(leases.attached_keys(rows, lid)) > 0
    for lid in leases.attached_leases(rows):
        assert leases.attached_count(rows, lid) == len(leases.attached_keys(rows, lid))


def test_a_lease_put_beyond_the_limit_is_refused_and_a_deletion_takes_every_key() -> None:
    """The (MAX+1)th LEASE_PUT of a lease in a group is refused, definitely, nothing written;
    re-putting an attached key, or attaching after a plain write detached one, is accepted. A
    key a move's INSTALL attaches (`leases.attach`) may take the count past the limit: the
    deletion across groups still deletes every key at one revision (before the fix its PREPARE
    refused more than 10,000 keys, every time)."""
    home, other = DictState(group=HOME), DictState(group=OTHER)
    assert lease(home, LeaseCmd(Kind.GRANT, LID, ttl_s=10)).found
    n = leases.MAX_KEYS_PER_LEASE
    keys = [b"o/%05d" % i for i in range(n)]
    for k in keys:
        assert lease(other, LeaseCmd(Kind.PUT, LID), k, b"v").error is None
    assert leases.attached_count(other.rows, LID) == n
    res = lease(other, LeaseCmd(Kind.PUT, LID), b"o/extra", b"v")
    assert res.error == leases.TOO_MANY_KEYS and other.get(b"o/extra") is None
    assert leases.lease_of(other.rows, b"o/extra") == 0
    assert lease(other, LeaseCmd(Kind.PUT, LID), keys[0], b"v2").error is None  # already attached
    assert lease(other, LeaseCmd(Kind.PUT, LID2), b"o/extra", b"v").error is None  # another lease
    assert lease(other, LeaseCmd(Kind.PUT, LID2), keys[1], b"v").error is None  # moved to LID2
    assert lease(other, LeaseCmd(Kind.PUT, LID), b"o/new", b"v").error is None  # a free slot
    other.apply(encode_command(Command.put(keys[2], b"plain")))  # detaches
    assert lease(other, LeaseCmd(Kind.PUT, LID), b"o/new2", b"v").error is None
    assert lease(other, LeaseCmd(Kind.PUT, LID), b"o/new3", b"v").error == leases.TOO_MANY_KEYS
    other.apply(encode_command(Command.put(b"o/moved", b"v")))
    leases.attach(other.rows, b"o/moved", LID)  # what a move's INSTALL does: never refused
    assert leases.attached_count(other.rows, LID) == n + 1
    counts_match(other.rows)

    groups = {HOME: home, OTHER: other}

    async def propose(g: int, data: bytes) -> ApplyResult:
        return groups[g].apply(data)

    async def main() -> ApplyResult:
        coord = CrossTxns(9, propose, HybridClock(lambda: mvcc.EPOCH_MS + 10_000), timeout=5.0)
        return await coord.run(None, logic.plan_lease([HOME, OTHER], LID))

    res = asyncio.run(main())
    assert res.txn is not None and len(res.txn.responses) == n + 1 and res.revision
    assert leases.attached_keys(other.rows, LID) == [] and leases.attached_count(other.rows, LID) == 0
    assert other.get(keys[0]) is None and other.get(b"o/moved") is None
    assert other.get(keys[2]) == b"plain" and other.get(keys[1]) == b"v"  # detached, other lease
    counts_match(other.rows)


def test_the_one_command_revoke_has_no_lower_limit_than_the_prepare() -> None:
    """With one data group the REVOKE deletes every attached key too, past the limit."""
    home = DictState(group=HOME)
    assert lease(home, LeaseCmd(Kind.GRANT, LID, ttl_s=10)).found
    for i in range(3):
        home.apply(encode_command(Command.put(b"k%d" % i, b"v")))
        leases.attach(home.rows, b"k%d" % i, LID)
    res = lease(home, LeaseCmd(Kind.REVOKE, LID))
    assert res.found and int.from_bytes(res.current or b"", "big") == 3
    assert leases.attached_count(home.rows, LID) == 0


_ops = st.lists(st.tuples(st.sampled_from(["lput", "put", "del", "drop", "forget", "install"]),
                          st.integers(0, 2), st.integers(0, 7)), max_size=60)


@settings(max_examples=120, deadline=None)
@given(_ops)
def test_the_count_row_follows_every_attach_and_detach_path(ops: list[tuple[str, int, int]]) -> None:
    """LEASE_PUT, a plain PUT or DELETE, DROP, a move's INSTALL (`attach`) and BEGIN/DROP
    (`forget_keys`), in any order: each lease's count row equals its attachment rows."""
    s = DictState(group=OTHER)
    lids = [leases.make_id(7, i) for i in range(3)]
    for op, li, ki in ops:
        key = b"k%d" % ki
        if op == "lput":
            lease(s, LeaseCmd(Kind.PUT, lids[li]), key, b"v")
        elif op == "put":
            s.apply(encode_command(Command.put(key, b"w")))
        elif op == "del":
            s.apply(encode_command(Command.delete(key)))
        elif op == "drop":
            assert lease(s, LeaseCmd(Kind.DROP, lids[li])).error is None
        elif op == "install":
            leases.attach(s.rows, key, lids[li])
        else:
            leases.forget_keys(s.rows, lambda k, li=li: key_hash(k) % 3 == li)
        counts_match(s.rows)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12), st.binary(max_size=12))
def test_count_rows_are_checked_like_every_lease_row(tail: bytes, value: bytes) -> None:
    """`check_rows` is total on count rows: ValueError unless a 9-byte key and a positive u64."""
    key = b"C" + tail
    ok = len(key) == 9 and len(value) == 8 and int.from_bytes(value, "big") > 0
    if ok:
        leases.check_rows(key, value)
    else:
        with pytest.raises(ValueError):
            leases.check_rows(key, value)


def test_one_group_count_check_for_range_and_lease_deletions() -> None:
    many = list(range(1, xtxn.MAX_GROUPS_PER_TXN + 2))
    most = many[:-1]
    assert logic.plan_lease(most, LID).keys.keys() == set(most)
    for plan in (lambda gs: logic.plan_lease(gs, LID), lambda gs: logic.plan_range(gs, b"a", b"b")):
        plan(most)
        with pytest.raises(ValueError, match=f"spans at most {xtxn.MAX_GROUPS_PER_TXN} data groups"):
            plan(many)
    assert lessor.deletion_groups([5, 0, 3, 5]) == [3, 5]
    assert lessor.cross_group_deletion([0, 3, 5]) and not lessor.cross_group_deletion([0, 3])


def test_the_lease_clock_logs_a_deletion_it_cannot_plan_once(caplog: pytest.LogCaptureFixture) -> None:
    """A plan that raises ValueError (home not a data group; too many groups) does not escape
    the lease clock's task (before the fix: an unretrieved task exception every retry); it is
    logged once per lease, and retried."""
    async def propose(g: int, data: bytes) -> ApplyResult:
        raise AssertionError("nothing is proposed for a deletion that cannot be planned")

    async def main() -> LeaseDriver:
        coord = CrossTxns(9, propose, HybridClock(lambda: mvcc.EPOCH_MS + 10_000), timeout=1.0)
        rq = types.SimpleNamespace(cross=coord, metrics=None)
        d = LeaseDriver(rq, None)  # type: ignore[arg-type]
        lz = lessor.Lessor(HOME)
        p = Proposal(HOME, LeaseCmd(Kind.EXPIRE, LID, renews=1))
        for groups in ([OTHER, 9], [OTHER, 9], list(range(1, xtxn.MAX_GROUPS_PER_TXN + 2))):
            await d._expire_across(lz, p, groups)
        assert not d._deleting and d.expired == 0
        return d

    with caplog.at_level(logging.ERROR, logger="kvstore"):
        asyncio.run(main())
    logged = [r for r in caplog.records if "cannot be deleted across groups" in r.getMessage()]
    assert len(logged) == 1 and f"{LID:x}" in logged[0].getMessage()


def test_a_revoke_that_cannot_be_planned_is_refused_definitely() -> None:
    """The revoke path turns the plan's ValueError into a definite InvalidArgument saying why
    (before the fix: a ValueError, answered INTERNAL, which reads as indeterminate)."""
    async def propose(g: int, data: bytes) -> ApplyResult:
        raise AssertionError("nothing is proposed for a deletion that cannot be planned")

    async def main() -> None:
        coord = CrossTxns(9, propose, HybridClock(lambda: mvcc.EPOCH_MS + 10_000), timeout=1.0)
        lr = LeaseRequests(types.SimpleNamespace(cross=coord), {})  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument, match=f"lease {LID:x} cannot be revoked"):
            await lr._delete_across(LID, list(range(1, xtxn.MAX_GROUPS_PER_TXN + 2)))
        # A lease homed in a group that is not a data group cannot exist: etcd's "not found".
        with pytest.raises(errors.InvalidArgument) as err:
            await lr._delete_across(LID, [OTHER, 9])
        assert err.value.message == leases.NOT_FOUND

    asyncio.run(main())
