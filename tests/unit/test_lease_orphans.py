"""The orphan-attachment sweep (issue 17's last two gaps; `kvstore/node/orphans.py`,
`leases.home_status` / `leases.orphan_drop`): the codec of LEASE_STATUS, LEASE_ORPHAN and the
home's `Status` (round trips, hostile bytes), the home's answer from its rows, the guarded DROP
(dead: deleted at one revision and a tombstone; a stale answer, the home group: refused, nothing
changed), and the sweep's logic driven over two `DictState` groups (dead -> deleted, alive ->
kept, unknown or no answer -> kept, paging resumes where it stopped, only a current leader
sweeps)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvstore.node import version
from kvstore.node.orphans import OrphanSweep, Probe, SweepParams, status_of
from kvstore.storage import leases, mvcc
from kvstore.storage.commands import Command, Op, decode_command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd, Status
from kvstore.storage.machine import DictState

HOME = 3
G = 5
LID = leases.make_id(HOME, 12345)
MS = 1 << mvcc.PHYSICAL_SHIFT


def at(ms: int) -> int:
    return mvcc.make_revision(mvcc.EPOCH_MS + ms, 0, 0)


T0 = at(10**9)


def lcmd(c: LeaseCmd, key: bytes = b"", value: bytes = b"", revision: int = 0) -> bytes:
    return encode_command(Command.lease_command(c, key, value, revision=revision))


def last(s: DictState) -> int:
    return mvcc.rev_state(s.rows).last


def grant(home: DictState, lid: int = LID) -> None:
    assert home.apply(lcmd(LeaseCmd(Kind.GRANT, lid, ttl_s=10))).found


def attach(s: DictState, key: bytes, lid: int = LID, rev: int = T0) -> None:
    res = s.apply(lcmd(LeaseCmd(Kind.PUT, lid, checked=rev), key, b"v", revision=rev))
    assert res.error is None, res.error


def kill(home: DictState, lid: int = LID, forget: bool = True) -> None:
    """The one-command REVOKE at the home, then (`forget`) its FORGET: the record a tombstone."""
    assert home.apply(lcmd(LeaseCmd(Kind.REVOKE, lid), revision=T0 + MS)).error is None
    if forget:
        assert home.apply(lcmd(LeaseCmd(Kind.FORGET, lid), revision=T0 + 2 * MS)).found


def status(home: DictState, lid: int = LID) -> Status | None:
    res = home.apply(lcmd(LeaseCmd(Kind.STATUS, lid)))
    return status_of(res.found, res.error, res.current)


# --- codec -------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2**51 - 1), st.integers(1, leases.MAX_CHECKED))
def test_status_and_orphan_commands_round_trip(high: int, until: int) -> None:
    lid = high << leases.ID_GROUP_BITS | 7
    for c in (LeaseCmd(Kind.STATUS, lid), LeaseCmd(Kind.ORPHAN, lid, until=until)):
        cmd = Command.lease_command(c, revision=5)
        assert decode_command(encode_command(cmd)) == cmd
        assert leases.decode_body(int(c.kind), leases.encode_body(c)) == c


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([int(Kind.STATUS), int(Kind.ORPHAN)]), st.binary(max_size=48))
def test_lease_body_decode_is_total(kind: int, raw: bytes) -> None:
    try:
        c = leases.decode_body(kind, raw)
    except ValueError:
        return
    assert leases.encode_body(c) == raw


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12))
@example(b"\x00\x80" + bytes(7))  # not DEAD with an `until` above MAX_CHECKED: once accepted
def test_status_decode_is_total(raw: bytes) -> None:
    try:
        s = Status.decode(raw)
    except ValueError:
        return
    assert s.encode() == raw and (s.state == leases.DEAD) == (s.until > 0)


def test_bad_fields_are_refused() -> None:
    for c in (LeaseCmd(Kind.ORPHAN, LID), LeaseCmd(Kind.ORPHAN, LID, until=leases.MAX_CHECKED + 1),
              LeaseCmd(Kind.STATUS, LID, until=5), LeaseCmd(Kind.DROP, LID, until=5)):
        with pytest.raises(ValueError):
            leases.encode_body(c)
    assert Status.decode(Status(leases.DEAD, 9).encode()) == Status(leases.DEAD, 9)
    for bad in (None, b"", Status(leases.ALIVE).encode()[:-1], bytes([1]) + bytes(8), bytes([0]) + (1).to_bytes(8, "big"),
                bytes([3]) + bytes(8)):
        with pytest.raises(ValueError):
            Status.decode(bad)
    assert status_of(False, None, Status(leases.DEAD, 9).encode()) is None
    assert status_of(True, "refused", Status(leases.DEAD, 9).encode()) is None
    assert status_of(True, None, b"junk") is None


def test_new_kinds_are_gated_at_level_5() -> None:
    """Level-4 binaries without LEASE_STATUS / LEASE_ORPHAN exist: a level-4 cluster must not log them."""
    for op in (Op.LEASE_STATUS, Op.LEASE_ORPHAN):
        assert version.COMMAND_LEVELS[op] == version.LEVEL_LEASES_2 == 5
    assert all(version.COMMAND_LEVELS[op] == version.LEVEL_LEASES for op in Op
               if op.name.startswith("LEASE_") and op not in version.SWEEP_OPS)
    data = lcmd(LeaseCmd(Kind.ORPHAN, LID, until=7))
    assert version.command_level(data) == version.LEVEL_LEASES_2
    gate = version.CommandGate(lambda: version.ClusterVersion(4, {1: 4}), lambda: {1})
    from kvstore import errors
    for c in (LeaseCmd(Kind.STATUS, LID), LeaseCmd(Kind.ORPHAN, LID, until=7)):
        with pytest.raises(errors.ClusterVersionTooLow):
            gate.check(lcmd(c))
        version.CommandGate(lambda: version.ClusterVersion(5, {1: 5}), lambda: {1}).check(lcmd(c))


def test_sweep_does_nothing_below_level_5() -> None:
    g = DictState(group=G)
    attach(g, b"a")
    sw = OrphanSweep(G, SweepParams(period_ms=10, page=8))
    reads: list[int] = []

    def counted(after: int, limit: int) -> list[int]:
        reads.append(after)
        return leases.attached_page(g.rows, after, limit)
    for t in range(5):
        assert sw.step(10.0 * t, 1, counted, cluster=version.LEVEL_LEASES) == []
    assert reads == [] and not sw.pending  # not even the index is read
    assert [p.lease_id for p in sw.step(50.0, 1, counted, cluster=version.LEVEL_LEASES_2)] == [LID]


# --- the home's answer ----------------------------------------------------------------------------
def test_home_status_from_its_rows() -> None:
    home = DictState(group=HOME)
    assert status(home) == Status(leases.UNKNOWN)  # never granted (a forged id, or forgotten)
    grant(home)
    assert status(home) == Status(leases.ALIVE)
    kill(home, forget=False)  # REVOKED: not DEAD until its FORGET's tombstone gives `until` a base after the death
    assert status(home) == Status(leases.UNKNOWN)
    assert home.apply(lcmd(LeaseCmd(Kind.FORGET, LID), revision=T0 + 2 * MS)).found
    s = status(home)
    assert s == Status(leases.DEAD, leases.tomb_expiry(home.rows, LID) or 0) and s.until > last(home)
    assert DictState(group=G).apply(lcmd(LeaseCmd(Kind.STATUS, LID))).error  # only the home answers


# --- the guarded DROP -----------------------------------------------------------------------------
def test_orphan_of_a_dead_lease_is_deleted_at_one_revision_with_a_tombstone() -> None:
    home, g = DictState(group=HOME), DictState(group=G)
    grant(home)
    attach(g, b"a")
    attach(g, b"b")
    kill(home)
    s = status(home)
    assert s is not None and s.state == leases.DEAD
    res = g.apply(lcmd(LeaseCmd(Kind.ORPHAN, LID, until=s.until), revision=T0 + 3 * MS))
    assert res.error is None and int.from_bytes(res.current or b"", "big") == 2
    assert b"a" not in g.data and b"b" not in g.data
    assert res.revision > last(home) and res.revision == last(g)  # both deleted by this one write
    assert leases.attached_keys(g.rows, LID) == [] and leases.tomb_expiry(g.rows, LID) is not None
    late = g.apply(lcmd(LeaseCmd(Kind.PUT, LID, checked=T0), b"c", b"v", revision=T0 + 4 * MS))
    assert late.error == leases.NOT_FOUND  # a delayed put of the dead lease meets the tombstone


def test_orphan_with_a_stale_answer_changes_nothing() -> None:
    g = DictState(group=G)
    attach(g, b"a")
    before = [dict(t) for t in g.rows.tables]
    until = T0 + 5 * MS + leases.TOMB_MARGIN - 1  # applied at T0 + 5 ms: too close to `until`
    res = g.apply(lcmd(LeaseCmd(Kind.ORPHAN, LID, until=until), revision=T0 + 5 * MS))
    assert res.error == leases.ORPHAN_STALE
    assert g.data[b"a"] == b"v" and leases.attached_keys(g.rows, LID) == [b"a"]
    assert leases.tomb_expiry(g.rows, LID) is None
    assert [dict(t) for t in g.rows.tables] == before


def test_orphan_in_the_home_group_is_refused() -> None:
    home = DictState(group=HOME)
    grant(home)
    attach(home, b"a")
    res = home.apply(lcmd(LeaseCmd(Kind.ORPHAN, LID, until=leases.MAX_CHECKED), revision=T0 + MS))
    assert res.error and home.data[b"a"] == b"v"


# --- the sweep, driven over two groups --------------------------------------------------------------
def page(s: DictState) -> Any:
    return lambda after, limit: leases.attached_page(s.rows, after, limit)


def run_pass(sw: OrphanSweep, now: float, g: DictState, homes: dict[int, DictState],
             answer: bool = True) -> list[Probe]:
    """One pass: each probe asked at its home (when `answer`), each LEASE_ORPHAN applied in `g`."""
    probes = sw.step(now, 1, page(g))
    for p in probes:
        st_ = status(homes[p.home], p.lease_id) if answer and p.home in homes else None
        cmd = sw.on_status(p, st_)
        if cmd is not None:
            res = g.apply(lcmd(cmd, revision=max(last(g), T0) + MS))
            sw.on_dropped(p.lease_id, res.error is None)
    return probes


def test_sweep_deletes_dead_keeps_alive_and_unknown() -> None:
    home, g = DictState(group=HOME), DictState(group=G)
    dead, alive = LID, leases.make_id(HOME, 999)
    unknown, unreachable = leases.make_id(HOME, 4242), leases.make_id(7, 5)
    grant(home, dead)
    grant(home, alive)
    for lid, key in ((dead, b"d"), (alive, b"a"), (unknown, b"u"), (unreachable, b"x")):
        attach(g, key, lid)
    kill(home, dead)
    sw = OrphanSweep(G, SweepParams(period_ms=1000, page=8))
    probes = run_pass(sw, 0.0, g, {HOME: home})
    assert sorted(p.lease_id for p in probes) == sorted((dead, alive, unknown, unreachable))
    assert b"d" not in g.data and sw.dropped == 1
    assert g.data[b"a"] == g.data[b"u"] == g.data[b"x"] == b"v"
    assert leases.attached_keys(g.rows, alive) == [b"a"]
    assert not sw.pending
    assert sw.step(500.0, 1, page(g)) == []  # the next pass is a period later
    assert {p.lease_id for p in run_pass(sw, 1000.0, g, {HOME: home})} == {alive, unknown, unreachable}
    assert g.data[b"a"] == b"v" and sw.dropped == 1


def test_sweep_pages_resume_where_they_stopped() -> None:
    home, g = DictState(group=HOME), DictState(group=G)
    ids = sorted(leases.make_id(HOME, i) for i in range(1, 6))
    for i, lid in enumerate(ids):
        grant(home, lid)
        attach(g, b"k%d" % i, lid)
    sw = OrphanSweep(G, SweepParams(period_ms=10, page=2))
    seen = [[p.lease_id for p in run_pass(sw, 10.0 * n, g, {HOME: home})] for n in range(4)]
    assert seen == [ids[0:2], ids[2:4], ids[4:5], ids[0:2]]
    for lid in ids[2:]:
        kill(home, lid)
    assert [p.lease_id for p in run_pass(sw, 40.0, g, {HOME: home})] == ids[2:4]
    assert [p.lease_id for p in run_pass(sw, 50.0, g, {HOME: home})] == ids[4:5]
    assert sorted(g.data) == [b"k0", b"k1"] and sw.dropped == 3


def test_sweep_only_as_current_leader_and_one_pass_at_a_time() -> None:
    g = DictState(group=G)
    attach(g, b"a")
    grant(g, leases.make_id(G, 3))
    attach(g, b"h", leases.make_id(G, 3))  # homed here: never probed (its home deletes it)
    sw = OrphanSweep(G, SweepParams(period_ms=10, page=8, answer_timeout_ms=100))
    assert sw.step(0.0, 0, page(g)) == []
    probes = sw.step(0.0, 2, page(g))
    assert [p.lease_id for p in probes] == [LID] and probes[0].home == HOME
    assert sw.step(50.0, 2, page(g)) == []  # still awaiting the answer
    assert [p.lease_id for p in sw.step(100.0, 2, page(g))] == [LID]  # timed out: asked again
    assert sw.on_status(probes[0], None) is None and not sw.pending  # no answer: kept
    assert sw.step(110.0, 0, page(g)) == [] and sw.on_status(probes[0], Status(leases.DEAD, 9)) is None
    assert [p.lease_id for p in sw.step(120.0, 3, page(g))] == [LID]  # a new term starts at once


def test_sweep_params_are_validated() -> None:
    for bad in ({"period_ms": 0}, {"page": 0}, {"page": 5000}, {"answer_timeout_ms": -1}):
        with pytest.raises(ValueError):
            SweepParams(**bad)  # type: ignore[arg-type]


def test_group_propose_takes_the_sweeps_commands_to_data_groups_only() -> None:
    from kvstore import errors
    from kvstore.node.grouprequests import check_group_request
    from kvstore.v1 import shard_pb2

    for c in (LeaseCmd(Kind.STATUS, LID), LeaseCmd(Kind.ORPHAN, LID, until=9)):
        data = lcmd(c)
        assert check_group_request(shard_pb2.GroupProposeRequest(group=HOME, command=data), None) is None
        with pytest.raises(errors.InvalidArgument):
            check_group_request(shard_pb2.GroupProposeRequest(group=0, command=data), None)
    with pytest.raises(errors.KVError):  # a body that does not decode is no lease command
        check_group_request(shard_pb2.GroupProposeRequest(group=HOME, command=lcmd(LeaseCmd(Kind.STATUS, LID))[:-1]),
                            None)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 600_000), st.integers(0, 600_000), st.integers(1, 900_000))
def test_orphan_applies_exactly_when_the_answer_is_fresh(last_ms: int, proposed_ms: int, until_ms: int) -> None:
    """LEASE_ORPHAN deletes iff max(proposed, last) + TOMB_MARGIN <= until; refused, it changes nothing."""
    g = DictState(group=G)
    attach(g, b"a")
    if last_ms:
        assert g.apply(encode_command(Command.put(b"clock", b"x", revision=T0 + last_ms * MS))).error is None
    before, last0 = [dict(t) for t in g.rows.tables], last(g)
    until, proposed = T0 + until_ms * MS, T0 + proposed_ms * MS
    res = g.apply(lcmd(LeaseCmd(Kind.ORPHAN, LID, until=until), revision=proposed))
    if max(proposed, last0) + leases.TOMB_MARGIN <= until:
        assert res.error is None and b"a" not in g.data
    else:
        assert res.error == leases.ORPHAN_STALE and [dict(t) for t in g.rows.tables] == before


def test_sweep_pages_back_to_back_and_waits_a_period_between_cycles() -> None:
    """A full page's answers in: the next page starts at once (no period in between); only after
    the short page closing a cycle does the next cycle wait a period. An unanswered page holds
    the next back until its answers are in."""
    home, g = DictState(group=HOME), DictState(group=G)
    ids = sorted(leases.make_id(HOME, i) for i in range(1, 8))
    for i, lid in enumerate(ids):
        grant(home, lid)
        attach(g, b"k%d" % i, lid)
    sw = OrphanSweep(G, SweepParams(period_ms=60_000, page=2, answer_timeout_ms=30_000))
    seen = [[p.lease_id for p in run_pass(sw, 1.0, g, {HOME: home})] for _ in range(4)]
    assert seen == [ids[0:2], ids[2:4], ids[4:6], ids[6:7]]  # one cycle, all at t = 1 ms
    assert sw.step(1.0, 1, page(g)) == [] and sw.step(60_000.0, 1, page(g)) == []  # the cycle ended
    first = sw.step(60_001.0, 1, page(g))
    assert [p.lease_id for p in first] == ids[0:2]
    assert sw.step(60_001.0, 1, page(g)) == []  # its answers are not in yet
    for p in first:
        assert sw.on_status(p, status(home, p.lease_id)) is None  # ALIVE: kept, answered
    assert [p.lease_id for p in sw.step(60_001.0, 1, page(g))] == ids[2:4]


def test_the_node_driver_proposes_nothing_below_level_5(caplog: pytest.LogCaptureFixture) -> None:
    """The asyncio shell (`server/orphan_sweep.py`) over a node that leads a data group with an
    attached key: while the cluster version is 4 it reads no page, starts no probe and logs one
    line however often it steps; at 5 it sweeps."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from kvstore.server.orphan_sweep import OrphanDriver

    g = DictState(group=G)
    attach(g, b"a")
    reads: list[int] = []

    def read_rows(group: int, fn: Any) -> Any:
        reads.append(group)
        return fn(g.rows)
    host = SimpleNamespace(groups={G: SimpleNamespace(core=SimpleNamespace(term=2))}, leads_current=lambda _g: True)
    rq = SimpleNamespace(host=host, tracker=SimpleNamespace(map=SimpleNamespace(data_groups=lambda: [G])),
                         store=SimpleNamespace(revisions=SimpleNamespace(read_rows=read_rows)))
    level = [version.LEVEL_LEASES]
    driver = OrphanDriver(rq, None, period=0.01, cluster_version=lambda: level[0])  # type: ignore[arg-type]

    async def steps() -> int:
        with caplog.at_level(logging.INFO, logger="kvstore.leases"):
            for _ in range(20):
                driver.step()
        quiet = len(driver._tasks)
        level[0] = version.LEVEL_LEASES_2
        driver.step()  # now a pass: the probe goes to the home (no caller here: no answer, keys kept)
        await asyncio.gather(*driver._tasks)
        return quiet
    assert asyncio.run(steps()) == 0
    assert reads == [G]  # the one page read at level 5, none before
    assert [r.getMessage() for r in caplog.records if "orphan sweep" in r.getMessage()] == [
        f"orphan sweep: waits for cluster version {version.LEVEL_LEASES_2} (it is {version.LEVEL_LEASES})"]
