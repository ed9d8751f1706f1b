"""Range moves carry lease attachments (issue 17): the export's `REC_LEASE` records (both node
stores), the INSTALL that attaches them in the target (or deletes the key definitively when the
lease is dead there), BEGIN / DROP forgetting the attachment rows of the ranges they wipe, every
lease deletion refused while an attached key is frozen or being installed (and run after the
move where the move put the key), the cluster-version gate of the new INSTALL form, and the lease
clock's DROP to a data group added after the revoke."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node import xtxn as logic
from kvstore.node.lessor import Lessor, LessorParams
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.node.version import (
    LEVEL_CROSS_TRANSACTIONS,
    LEVEL_LEASES,
    ClusterVersion,
    CommandGate,
    install_level,
)
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import leases, mvcc, xtxn
from kvstore.storage.commands import ApplyResult, Command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd, Record
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import (
    REC_DATA,
    REC_LEASE,
    ShardOp,
    decode_shard_command,
    encode_record,
    encode_shard_command,
    iter_records,
)
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.xtxn import TxnId, XCmd, XOp

HOME, OTHER = 3, 5
LID = leases.make_id(HOME, 4242)
Q = [IntervalSet([(i << 62, ((i + 1) << 62) - 1)]) for i in range(4)]
MOVING = Q[1]
SRC = Q[1].union(Q[2]).union(Q[3])
START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)
TOKEN = 77
CONF = ConfState((1,))


def key_in(ranges: IntervalSet, prefix: bytes) -> bytes:
    return next(k for k in (prefix + b"%d" % i for i in range(10_000)) if key_hash(k) in ranges)


K_MOVE, K_STAY, K_PLAIN = key_in(MOVING, b"m/"), key_in(Q[2], b"s/"), key_in(MOVING, b"p/")


def lease_cmd(c: LeaseCmd, key: bytes = b"", value: bytes = b"") -> bytes:
    return encode_command(Command.lease_command(c, key, value, revision=START))


def shard(op: ShardOp, ranges: IntervalSet | None = None, records: bytes = b"", token: int = 0, move: int = 1) -> bytes:
    return encode_shard_command(op, ranges, records, token=token, move=move)


def source_commands() -> list[bytes]:
    """The home group (the source of the move): the lease, two attached keys (one moving) and a
    plain key in the moving range."""
    return [shard(ShardOp.SET, SRC), lease_cmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10)),
            lease_cmd(LeaseCmd(Kind.PUT, LID), K_MOVE, b"v"), lease_cmd(LeaseCmd(Kind.PUT, LID), K_STAY, b"v"),
            encode_command(Command.put(K_PLAIN, b"v", revision=START))]


# --- the record: decoders total, fuzzed ------------------------------------------------------------
def test_lease_records_round_trip_and_refuse_bad_ids() -> None:
    rec = encode_record(REC_LEASE, b"key", LID.to_bytes(8, "big"))
    assert list(iter_records(rec)) == [(REC_LEASE, b"key", LID.to_bytes(8, "big"))]
    for key, value in ((b"key", bytes(8)), (b"key", (1 << 63).to_bytes(8, "big")),  # id 0, above int64
                       (b"key", (4096).to_bytes(8, "big")),  # homed in group 0
                       (b"key", LID.to_bytes(8, "big")[:7]), (b"", LID.to_bytes(8, "big"))):
        with pytest.raises(ValueError):
            list(iter_records(encode_record(REC_LEASE, key, value)))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(1, (1 << 63) - 1), st.data())
def test_mangled_install_records_raise_value_error_only(key: bytes, lid: int, data: st.DataObject) -> None:
    raw = bytearray(shard(ShardOp.INSTALL, records=encode_record(REC_DATA, key, b"v")
                          + encode_record(REC_LEASE, key, lid.to_bytes(8, "big")), token=TOKEN))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for b in (bytes(raw), bytes(raw[:cut]), bytes(raw) + data.draw(st.binary(max_size=12))):
        with contextlib.suppress(ValueError):
            decode_shard_command(b)
        assert install_level(b) in (1, LEVEL_LEASES)  # total too
        s = DictState(group=OTHER)
        s.apply(shard(ShardOp.SET, Q[0]))
        s.apply(shard(ShardOp.BEGIN, MOVING, token=TOKEN))
        s.apply(b)  # garbage is an error result, never an exception


# --- both node stores export the attachments; the target attaches; the lease deletes the key there
def run(store: Any, g: int, datas: list[bytes]) -> list[ApplyResult]:
    ls = store.log_storage(g)
    last = ls.last_index()
    es = [Entry(1, last + 1 + i, EntryType.NORMAL, d, g) for i, d in enumerate(datas)]
    store.persist_and_apply([GroupWrite(g, es, HardState(1, 0, es[-1].index))], ())
    pending = ls.entries(store.applied_index(g) + 1, es[-1].index + 1)
    res = store.persist_and_apply((), [ApplyBatch(g, pending, CONF)])[0]
    return [r for r in res[len(pending) - len(es):] if r is not None]


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_a_move_carries_the_attachment_and_the_deletion_finds_the_key_in_the_target(kind: str,
                                                                                   tmp_path: Path) -> None:
    def open_(name: str) -> Any:
        return LmdbNodeStore(tmp_path / name) if kind == "lmdb" else MemoryNodeStore()

    a, b = open_("a"), open_("b")
    try:
        assert a.bootstrap(HOME, CONF) and b.bootstrap(OTHER, CONF)
        assert all(r.error is None for r in run(a, HOME, source_commands()))
        run(b, OTHER, [shard(ShardOp.SET, Q[0])])
        (frz, exp) = run(a, HOME, [shard(ShardOp.FREEZE, MOVING), lease_cmd(LeaseCmd(Kind.EXPIRE, LID, renews=1))])
        assert frz.error is None
        assert exp.wrong_shard and exp.error == leases.LEASE_MOVING  # waits for the move, nothing changed
        rec = a.revisions.read_rows(HOME, lambda rows: leases.get_record(rows, LID))
        assert rec is not None and rec.state == leases.LIVE and a.get(HOME, K_MOVE) == b"v"
        chunks = [c for c, _ in a.export_range(HOME, MOVING, 64)]
        recs = [r for c in chunks for r in iter_records(c)]
        assert [(k, int.from_bytes(v, "big")) for t, k, v in recs if t == REC_LEASE] == [(K_MOVE, LID)]
        installs = [shard(ShardOp.INSTALL, records=c, token=TOKEN) for c in chunks]
        assert all(install_level(d) == (LEVEL_LEASES if any(t == REC_LEASE for t, _, _ in iter_records(c)) else 1)
                   for d, c in zip(installs, chunks, strict=True))
        got = run(b, OTHER, [shard(ShardOp.BEGIN, MOVING, token=TOKEN), *installs,
                             shard(ShardOp.ACTIVATE, MOVING, token=TOKEN)])
        assert all(r.error is None for r in got), got
        assert run(a, HOME, [shard(ShardOp.DROP, MOVING)])[0].error is None
        attached = lambda s, g: s.revisions.read_rows(g, lambda rows: leases.attached_keys(rows, LID))  # noqa: E731
        assert attached(b, OTHER) == [K_MOVE] and attached(a, HOME) == [K_STAY]  # the source forgot its rows
        assert b.revisions.read_rows(OTHER, lambda rows: leases.lease_of(rows, K_PLAIN)) == 0
        # the lease's deletion across the two groups finds each key where it is now
        t = TxnId(1, 1)
        prep = {g: run(s, g, [encode_command(Command.cross(XCmd(XOp.PREPARE, t, HOME, START, lease=LID),
                                                              revision=START))])[0]
                for g, s in ((HOME, a), (OTHER, b))}
        assert xtxn.decode_found(prep[HOME].current or b"") == [K_STAY]
        assert xtxn.decode_found(prep[OTHER].current or b"") == [K_MOVE]
        ready = logic.after_prepare_range(logic.plan_lease([HOME, OTHER], LID, 1), prep)
        assert isinstance(ready, logic.Ready)
        assert run(a, HOME, [logic.record_command(t, START, ready, lease=LID, renews=1)])[0].error is None
        for g, s in ((HOME, a), (OTHER, b)):
            assert run(s, g, [encode_command(Command.cross(XCmd(XOp.COMMIT, t, at=ready.at,
                                                                  writes=ready.writes[g])))])[0].error is None
        assert b.get(OTHER, K_MOVE) is None and a.get(HOME, K_STAY) is None and b.get(OTHER, K_PLAIN) == b"v"
    finally:
        a.close()
        b.close()


# --- the rules, on DictState -----------------------------------------------------------------------
def moved() -> tuple[DictState, DictState, bytes]:
    """The home group with the moving range frozen, the target with the installation begun, and
    the install records of the moving range (its data and the attachment)."""
    src, dst = DictState(group=HOME), DictState(group=OTHER)
    for d in source_commands():
        assert src.apply(d).error is None
    assert src.apply(shard(ShardOp.FREEZE, MOVING)).error is None
    assert dst.apply(shard(ShardOp.SET, Q[0])).error is None
    assert dst.apply(shard(ShardOp.BEGIN, MOVING, token=TOKEN)).error is None
    records = (encode_record(REC_DATA, K_MOVE, b"v") + encode_record(REC_DATA, K_PLAIN, b"v")
               + encode_record(REC_LEASE, K_MOVE, LID.to_bytes(8, "big")))
    return src, dst, records


def test_the_one_group_deletion_runs_after_the_move_where_the_key_went() -> None:
    src, dst, records = moved()
    for c in (LeaseCmd(Kind.REVOKE, LID), LeaseCmd(Kind.EXPIRE, LID, renews=1)):
        r = src.apply(lease_cmd(c))
        assert r.wrong_shard and r.error == leases.LEASE_MOVING
    assert src.get(K_STAY) == b"v" and leases.get_record(src.rows, LID) == Record(10, 10_000, 1)
    assert dst.apply(shard(ShardOp.INSTALL, records=records, token=TOKEN)).error is None
    r = dst.apply(lease_cmd(LeaseCmd(Kind.DROP, LID)))  # installing: the DROP waits too
    assert r.wrong_shard and r.error == leases.LEASE_MOVING
    assert dst.rows.get(leases.T_LEASES, leases.tomb_key(LID)) is None
    assert dst.apply(shard(ShardOp.ACTIVATE, MOVING, token=TOKEN)).error is None
    assert src.apply(shard(ShardOp.DROP, MOVING)).error is None
    r = src.apply(lease_cmd(LeaseCmd(Kind.EXPIRE, LID, renews=1)))
    assert r.error is None and r.current == (1).to_bytes(8, "big") and src.get(K_STAY) is None
    r = dst.apply(lease_cmd(LeaseCmd(Kind.DROP, LID)))
    assert r.error is None and r.current == (1).to_bytes(8, "big") and r.revision > 0
    assert dst.get(K_MOVE) is None and dst.get(K_PLAIN) == b"v" and leases.attached_keys(dst.rows, LID) == []


def test_an_attachment_arriving_at_a_dead_lease_deletes_the_key_at_the_activate() -> None:
    _, dst, records = moved()
    assert dst.apply(lease_cmd(LeaseCmd(Kind.DROP, LID))).error is None  # nothing attached yet: a tombstone
    install = shard(ShardOp.INSTALL, records=records, token=TOKEN)
    assert dst.apply(install).error is None
    last = mvcc.rev_state(dst.rows).last
    assert dst.apply(shard(ShardOp.ACTIVATE, MOVING, token=TOKEN)).error is None
    assert dst.get(K_MOVE) is None and dst.get(K_PLAIN) == b"v" and leases.lease_of(dst.rows, K_MOVE) == 0
    hist = mvcc.key_history(dst.rows, K_MOVE)
    assert hist[-1][0] > last and mvcc.current_meta(dst.rows, K_MOVE, None) is None  # deleted at a new revision
    assert not dst.rows.has_attachments()
    assert dst.apply(install).error is not None and dst.get(K_MOVE) is None  # a late duplicate brings nothing back
    # the home group as the target, with its record REVOKED (the one-group path): deleted too
    home = DictState(group=HOME)
    for d in (shard(ShardOp.SET, Q[0]), lease_cmd(LeaseCmd(Kind.GRANT, LID, ttl_s=5)),
              lease_cmd(LeaseCmd(Kind.REVOKE, LID)), shard(ShardOp.BEGIN, MOVING, token=TOKEN),
              shard(ShardOp.INSTALL, records=records, token=TOKEN), shard(ShardOp.ACTIVATE, MOVING, token=TOKEN)):
        assert home.apply(d).error is None
    assert home.get(K_MOVE) is None and home.get(K_PLAIN) == b"v"


def test_an_install_waits_for_a_prepared_deletion_of_the_lease() -> None:
    _, dst, records = moved()
    t = TxnId(9, 9)
    assert dst.apply(encode_command(Command.cross(XCmd(XOp.PREPARE, t, HOME, START, lease=LID), revision=START))
                     ).wrong_shard  # the deletion's PREPARE itself waits while installing ...
    dst2 = DictState(group=OTHER)
    dst2.apply(shard(ShardOp.SET, Q[0]))
    assert dst2.apply(encode_command(Command.cross(XCmd(XOp.PREPARE, t, HOME, START, lease=LID),
                                                   revision=START))).error is None
    assert dst2.apply(shard(ShardOp.BEGIN, MOVING, token=TOKEN)).error is None  # ... but a BEGIN may follow it
    before = (dict(dst2.data), dict(dst2.rows.tables[leases.T_LEASES]))
    r = dst2.apply(shard(ShardOp.INSTALL, records=records, token=TOKEN))
    assert r.error is not None and "deletion is in progress" in r.error
    assert (dict(dst2.data), dict(dst2.rows.tables[leases.T_LEASES])) == before  # nothing changed
    assert dst2.apply(encode_command(Command.cross(XCmd(XOp.ABORT, t)))).error is None
    assert dst2.apply(shard(ShardOp.INSTALL, records=records, token=TOKEN)).error is None
    assert leases.attached_keys(dst2.rows, LID) == [K_MOVE]


def test_begin_forgets_a_superseded_installations_attachments() -> None:
    _, dst, records = moved()
    assert dst.apply(shard(ShardOp.INSTALL, records=records, token=TOKEN)).error is None
    assert leases.attached_keys(dst.rows, LID) == [K_MOVE]
    assert dst.apply(shard(ShardOp.BEGIN, MOVING, token=TOKEN + 2)).error is None  # a racing coordinator
    assert leases.attached_keys(dst.rows, LID) == [] and leases.lease_of(dst.rows, K_MOVE) == 0
    assert not dst.rows.has_attachments()


# --- the gate: a level-3 cluster never meets the new INSTALL form ----------------------------------
def test_an_install_with_attachments_needs_the_lease_level() -> None:
    with_lease = shard(ShardOp.INSTALL, records=encode_record(REC_LEASE, K_MOVE, LID.to_bytes(8, "big")), token=1)
    plain = shard(ShardOp.INSTALL, records=encode_record(REC_DATA, K_MOVE, b"v"), token=1)
    assert install_level(with_lease) == LEVEL_LEASES and install_level(plain) == 1
    assert install_level(shard(ShardOp.FREEZE, MOVING)) == 1 and install_level(with_lease[:-2]) == 1
    cluster = ClusterVersion(LEVEL_CROSS_TRANSACTIONS, {1: LEVEL_LEASES, 2: LEVEL_CROSS_TRANSACTIONS})
    gate = CommandGate(lambda: cluster, lambda: {1, 2})
    gate.check(plain)
    with pytest.raises(errors.ClusterVersionTooLow) as e:
        gate.check(with_lease)
    assert e.value.definite and f"needs cluster version {LEVEL_LEASES}" in e.value.message
    cluster = ClusterVersion(LEVEL_LEASES, {1: LEVEL_LEASES, 2: LEVEL_LEASES})
    gate.check(with_lease)


# --- the lease clock: a group that appears after the revoke gets its DROP before the FORGET ---------
def test_a_group_added_after_the_revoke_gets_a_drop() -> None:
    lz = Lessor(HOME, LessorParams(scan_interval_ms=100, retry_ms=500))
    recs = [(LID, Record(10, 0, 1, leases.REVOKED))]
    groups = [HOME, OTHER]
    step = lambda now: [(p.group, p.cmd.kind) for p in lz.step(now, 2, lambda: recs, lambda: groups)]  # noqa: E731
    props = lz.step(0, 2, lambda: recs, lambda: groups)
    assert [(p.group, p.cmd.kind) for p in props] == [(OTHER, Kind.DROP)]
    groups = [HOME, OTHER, 7]  # a range move's target, created meanwhile
    lz.on_outcome(props[0], True)
    assert step(50) == [(7, Kind.DROP)]  # before any FORGET
    assert step(600) == [(7, Kind.DROP)]  # refused (e.g. waiting for the move): sent again
    lz.on_outcome(lz.step(1200, 2, lambda: recs, lambda: groups)[0], True)
    assert step(1300) == [(HOME, Kind.FORGET)]
