"""Issue 17 review, finding 1: a lease id granted again after its death must not meet the old
incarnation's tombstones. The orphan sweep's tombstone is capped at `until - TOMB_MARGIN`
(`leases.orphan_drop`), and every reader deciding by a tombstone treats one whose expiry is below
the group's last revision as absent (`leases.live_tomb`, `gc`'s rule), so a quiet group (no lease
command to run `gc`) decides as if it had run. Pure state machines (`DictState`)."""

from __future__ import annotations

from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import leases, mvcc
from kvstore.storage.commands import Command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd, Status
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import (
    REC_DATA,
    REC_HISTORY,
    REC_LEASE,
    ShardOp,
    encode_record,
    encode_shard_command,
)

HOME, G = 3, 5
LID = leases.make_id(HOME, 777)
MS = 1 << mvcc.PHYSICAL_SHIFT
T0 = mvcc.make_revision(mvcc.EPOCH_MS + 10**9, 0, 0)
Q = [IntervalSet([(i << 62, ((i + 1) << 62) - 1)]) for i in range(4)]
MOVING = Q[1]
SRC = Q[1].union(Q[2]).union(Q[3])
TOKEN = 9


def key_in(ranges: IntervalSet, prefix: bytes) -> bytes:
    return next(k for k in (prefix + b"%d" % i for i in range(10_000)) if key_hash(k) in ranges)


def lcmd(c: LeaseCmd, key: bytes = b"", value: bytes = b"", revision: int = 0) -> bytes:
    return encode_command(Command.lease_command(c, key, value, revision=revision))


def shard(op: ShardOp, ranges: IntervalSet | None = None, records: bytes = b"") -> bytes:
    return encode_shard_command(op, ranges, records, token=TOKEN, move=1)


def ok(s: DictState, data: bytes) -> None:
    res = s.apply(data)
    assert res.error is None, res.error


def status(home: DictState) -> Status:
    res = home.apply(lcmd(LeaseCmd(Kind.STATUS, LID)))
    assert res.found and res.current is not None
    return Status.decode(res.current)


def dead_lease_and_orphan_group() -> tuple[DictState, DictState, int]:
    """The home (serving SRC) with LID granted, revoked and forgotten at T0; group G (serving
    Q[0]) that held an orphan key of LID, dropped by the sweep's LEASE_ORPHAN as early as its
    guard allows less 10 s. Returns them and the home's `until`."""
    home, g = DictState(group=HOME), DictState(group=G)
    ok(home, shard(ShardOp.SET, SRC))
    ok(g, shard(ShardOp.SET, Q[0]))
    ok(home, lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10)))
    orphan = key_in(Q[0], b"o/")
    ok(g, lcmd(LeaseCmd(Kind.PUT, LID, checked=T0), orphan, b"v", revision=T0))
    ok(home, lcmd(LeaseCmd(Kind.REVOKE, LID), revision=T0 + MS))
    ok(home, lcmd(LeaseCmd(Kind.FORGET, LID), revision=T0 + 2 * MS))
    s = status(home)
    assert s.state == leases.DEAD
    at = s.until - leases.TOMB_MARGIN - 10_000 * MS
    ok(g, lcmd(LeaseCmd(Kind.ORPHAN, LID, until=s.until), revision=at))
    assert g.get(orphan) is None
    return home, g, s.until


def test_the_orphan_sweeps_tombstone_ends_before_the_id_can_be_granted_again() -> None:
    _, g, until = dead_lease_and_orphan_group()
    expiry = leases.tomb_expiry(g.rows, LID)
    assert expiry is not None and expiry <= until - leases.TOMB_MARGIN
    # ... and still outlives every delayed put of the dead incarnation (checked before its death)
    checked = T0
    assert expiry >= checked + leases.LEASE_PUT_MAX_AGE


def test_a_moved_key_of_the_granted_again_lease_is_kept_at_the_activate() -> None:
    """The reviewer's scenario: the home grants the id again once its tombstone expired; a key of
    the new incarnation is moved into G, which still held the sweep's tombstone uncapped: its
    ACTIVATE deleted that LIVE key. Now the tombstone has expired by then and the key stays."""
    home, g, until = dead_lease_and_orphan_group()
    clock = key_in(Q[2], b"c/")
    ok(home, encode_command(Command.put(clock, b"t", revision=until + MS)))  # the home's last passes `until`
    ok(home, lcmd(LeaseCmd(Kind.RENEW, leases.make_id(HOME, 1))))  # any lease command: `gc` forgets the tombstone
    ok(home, lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10)))  # granted again (client-chosen id)
    key = key_in(MOVING, b"m/")
    ok(home, lcmd(LeaseCmd(Kind.PUT, LID), key, b"live", revision=until + 2 * MS))
    ok(home, shard(ShardOp.FREEZE, MOVING))
    records = (encode_record(REC_DATA, key, b"live")
               + encode_record(REC_HISTORY, key, mvcc.encode_versions(mvcc.key_history(home.rows, key)))
               + encode_record(REC_LEASE, key, LID.to_bytes(8, "big")))
    ok(g, shard(ShardOp.BEGIN, MOVING))
    ok(g, shard(ShardOp.INSTALL, MOVING, records))
    ok(g, shard(ShardOp.ACTIVATE, MOVING))
    assert g.get(key) == b"live" and leases.lease_of(g.rows, key) == LID
    assert leases.attached_keys(g.rows, LID) == [key]
    # and a put of the new incarnation straight into G is accepted
    other = key_in(Q[0], b"n/")
    res = g.apply(lcmd(LeaseCmd(Kind.PUT, LID, checked=until + 2 * MS), other, b"w", revision=until + 3 * MS))
    assert res.error is None and leases.lease_of(g.rows, other) == LID


def test_an_expired_tombstone_counts_as_absent_in_a_quiet_group() -> None:
    """`gc` runs only at lease and cross-group commands: in a group that only takes plain writes
    an expired tombstone is still a row, and must decide nothing."""
    g = DictState(group=G)
    ok(g, lcmd(LeaseCmd(Kind.DROP, LID), revision=T0))
    expiry = leases.tomb_expiry(g.rows, LID)
    assert expiry is not None
    fresh = expiry + MS
    ok(g, encode_command(Command.put(b"plain", b"x", revision=fresh)))  # last passes the expiry, no gc
    assert leases.tomb_expiry(g.rows, LID) == expiry  # still a row ...
    assert leases.may_attach(g.rows, G, LID)  # ... but absent
    res = g.apply(lcmd(LeaseCmd(Kind.PUT, LID, checked=fresh), b"k", b"v", revision=fresh + MS))
    assert res.error is None and leases.lease_of(g.rows, b"k") == LID
    # the home: an expired tombstone neither answers DEAD nor refuses a GRANT
    home = DictState(group=HOME)
    ok(home, lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10)))
    ok(home, lcmd(LeaseCmd(Kind.REVOKE, LID), revision=T0))
    ok(home, lcmd(LeaseCmd(Kind.FORGET, LID), revision=T0))
    hexp = leases.tomb_expiry(home.rows, LID)
    assert hexp is not None and status(home) == Status(leases.DEAD, hexp)
    ok(home, encode_command(Command.put(b"plain", b"x", revision=hexp + MS)))
    assert leases.tomb_expiry(home.rows, LID) == hexp and status(home) == Status(leases.UNKNOWN)
    ok(home, lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10)))
    assert leases.tomb_expiry(home.rows, LID) is None and status(home) == Status(leases.ALIVE)


def test_a_live_tombstone_still_refuses_and_the_home_grant_too() -> None:
    g = DictState(group=G)
    ok(g, lcmd(LeaseCmd(Kind.DROP, LID), revision=T0))
    expiry = leases.tomb_expiry(g.rows, LID)
    assert expiry is not None
    res = g.apply(lcmd(LeaseCmd(Kind.PUT, LID, checked=T0), b"k", b"v", revision=T0 + MS))
    assert res.error == leases.NOT_FOUND
    # a put proposed past the expiry in a group whose last is still before it: its own revision
    # will be past the expiry, so the tombstone no longer counts, but its `checked` is then too old
    res = g.apply(lcmd(LeaseCmd(Kind.PUT, LID, checked=T0), b"k", b"v", revision=expiry + MS))
    assert res.error == leases.NOT_FOUND
