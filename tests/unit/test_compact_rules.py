"""Compaction's two rules (issue 18): the first (the changes at the compact revision C are
consumed, as binaries before feature level 8 compact) and the keep rule (they stay, for a watch
from C). The COMPACT command names its rule, so replicas of one group apply it identically
whatever their binary; the keep form is refused below cluster version 8; the revision state and
an INSTALL's closed record carry whether the rows at C were kept. Decoders of the new forms are
total."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.version import (
    LEVEL_COMPACT_KEEP,
    LEVEL_LEASES,
    SUPPORTED_LEVEL,
    ClusterVersion,
    CommandGate,
    command_level,
    install_level,
)
from kvstore.storage import commands as cmds
from kvstore.storage import mvcc
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import (
    REC_CLOSED,
    ShardOp,
    decode_closed,
    encode_closed,
    encode_record,
    encode_shard_command,
)

NOW = mvcc.make_revision(mvcc.EPOCH_MS + 1_000, 0, 0)


def _tombstone_at_c(keep: bool) -> DictState:
    s = DictState(group=3)
    s.apply(cmds.encode_put(b"a", b"1", revision=NOW))
    c = s.apply(cmds.encode_delete(b"a", revision=NOW)).revision
    s.apply(cmds.encode_put(b"b", b"1", revision=NOW))
    assert s.apply(cmds.encode_compact(c, keep=keep)).revision == c
    return s


def test_the_first_rule_consumes_a_tombstone_at_c_and_the_keep_rule_keeps_its_key_id() -> None:
    """What diverged between binaries: under the first rule the key's id goes with its last row,
    so its next write takes a new id; under the keep rule it is reused. Each follows the command."""
    first, keep = _tombstone_at_c(False), _tombstone_at_c(True)
    assert mvcc.kid_of(first.rows, b"a") is None and mvcc.kid_of(keep.rows, b"a") == 1
    assert not mvcc.rev_state(first.rows).kept and mvcc.rev_state(keep.rows).kept
    for s in (first, keep):
        s.apply(cmds.encode_put(b"a", b"2", revision=NOW))
    assert mvcc.kid_of(first.rows, b"a") == 3 and mvcc.kid_of(keep.rows, b"a") == 1
    assert mvcc.rev_state(first.rows).next_kid == 4 and mvcc.rev_state(keep.rows).next_kid == 3
    assert mvcc.rev_state(keep.rows).kept  # a write keeps the flag


ops = st.lists(st.tuples(st.sampled_from(["put", "del", "compact", "compact-keep"]),
                         st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 30)), max_size=25)


def _feed(s: DictState, script: list[tuple[str, bytes, int]]) -> None:
    revs: list[int] = []
    for kind, key, n in script:
        if kind in ("put", "del"):
            data = cmds.encode_put(key, b"v%d" % n, revision=NOW) if kind == "put" else cmds.encode_delete(key)
            rev = s.apply(data).revision
            if rev:  # 0: a delete of an absent key wrote nothing
                revs.append(rev)
        else:
            at = revs[n % len(revs)] if revs else 1
            assert s.apply(cmds.encode_compact(at, keep=kind == "compact-keep")).error is None


def _rows(s: DictState) -> dict[int, list[tuple[bytes, bytes]]]:
    return {t: [(bytes(k), bytes(v)) for k, v in s.rows.iter(t, b"", None)]
            for t in (mvcc.T_KEYS, mvcc.T_HIST, mvcc.T_CHANGES, mvcc.T_STATE)}


@settings(max_examples=60, deadline=None)
@given(ops)
def test_replicas_fed_the_same_commands_hold_the_same_rows(script: list[tuple[str, bytes, int]]) -> None:
    """Apply depends on the commands alone (either rule, mixed): two replicas end identical, and
    the change log holds rows at C only if the state says they were kept."""
    a, b = DictState(group=3), DictState(group=3)
    _feed(a, script)
    _feed(b, script)
    assert _rows(a) == _rows(b)
    rs = mvcc.rev_state(a.rows)
    at_c = [r for r, _ in mvcc.changes_from(a.rows, 0) if r == rs.compact]
    assert rs.kept or not at_c


def test_a_keep_rule_compact_is_refused_below_cluster_version_8() -> None:
    keep, first = cmds.encode_compact(5, keep=True), cmds.encode_compact(5)
    assert command_level(keep) == LEVEL_COMPACT_KEEP == SUPPORTED_LEVEL and command_level(first) == 1
    low = CommandGate(lambda: ClusterVersion(LEVEL_COMPACT_KEEP - 1), lambda: {1, 2})
    with pytest.raises(errors.ClusterVersionTooLow, match="COMPACT keeping the changes at the compact revision"):
        low.check(keep)
    low.check(first)
    CommandGate(lambda: ClusterVersion(LEVEL_COMPACT_KEEP), lambda: {1}).check(keep)


def test_an_install_from_a_kept_source_needs_level_8() -> None:
    def install(kept: bool) -> bytes:
        rec = encode_record(REC_CLOSED, b"", encode_closed(NOW + 10, NOW, kept))
        return encode_shard_command(ShardOp.INSTALL, records=rec, move=1, token=5)

    assert install_level(install(True)) == LEVEL_COMPACT_KEEP and install_level(install(False)) == 1
    gate = CommandGate(lambda: ClusterVersion(LEVEL_LEASES), lambda: {1})
    with pytest.raises(errors.ClusterVersionTooLow, match="changes kept"):
        gate.check(install(True))
    gate.check(install(False))


@given(st.binary(max_size=40))
def test_revision_state_and_closed_record_decoding_is_total(raw: bytes) -> None:
    """Either ValueError or a value whose encoding is `raw` (canonical: one encoding a value)."""
    with contextlib.suppress(ValueError):
        assert mvcc.RevState.decode(raw).encode() == raw
    with contextlib.suppress(ValueError):
        assert encode_closed(*decode_closed(raw)) == raw


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.booleans())
def test_revision_state_round_trips_and_is_24_bytes_unless_kept(last: int, compact: int, kid: int,
                                                                  kept: bool) -> None:
    s = mvcc.RevState(last, compact, kid, kept)
    raw = s.encode()
    assert mvcc.RevState.decode(raw) == s and len(raw) == 24 + kept
    with pytest.raises(ValueError):
        mvcc.RevState.decode(raw[:24] + b"\x00")


@given(st.integers(0, 2**63), st.binary(max_size=3))
def test_compact_decoding_is_total_and_names_its_rule(rev: int, tail: bytes) -> None:
    for keep in (False, True):
        data = cmds.encode_compact(rev, keep)
        assert cmds.decode_command(data) == cmds.Command.compact(rev, keep)
    data = cmds.encode_compact(rev) + tail
    if tail == b"\x01":
        assert cmds.decode_command(data).keep
    elif tail:
        with pytest.raises(ValueError):
            cmds.decode_command(data)
    with pytest.raises(ValueError):
        cmds.encode_command(cmds.Command(cmds.Op.PUT, b"k", keep=True))


def _install_closed(dst: DictState, last: int, compact: int, kept: bool) -> None:
    from kvstore.shard.ranges import IntervalSet, key_hash
    from kvstore.storage.shardcmd import REC_DATA

    rng = IntervalSet([(key_hash(b"moved"), key_hash(b"moved"))])
    records = encode_record(REC_CLOSED, b"", encode_closed(last, compact, kept)) + encode_record(REC_DATA, b"moved", b"v")
    assert dst.apply(encode_shard_command(ShardOp.BEGIN, rng, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.INSTALL, records=records, move=1, token=5)).error is None


@pytest.mark.parametrize("kept", [False, True])
def test_an_install_compacts_the_target_under_its_sources_rule(kept: bool) -> None:
    """The target of a move compacts at the source's compact revision under the rule the
    source's closed record names (deterministic on every replica of the target), and records it."""
    from kvstore.shard.ranges import IntervalSet, key_hash

    dst = DictState(group=2)
    assert dst.apply(encode_shard_command(ShardOp.SET, IntervalSet.full().difference(
        IntervalSet([(key_hash(b"moved"), key_hash(b"moved"))])))).error is None
    own = dst.apply(cmds.encode_put(b"own", b"1", revision=NOW)).revision
    _install_closed(dst, own + 10 * mvcc.STEP, own, kept)
    rs = mvcc.rev_state(dst.rows)
    assert (rs.compact, rs.kept) == (own, kept)
    assert [r for r, _ in mvcc.changes_from(dst.rows, 0)] == ([own] if kept else [])


def test_a_kept_target_whose_source_did_not_keep_the_same_compact_revision_consumes_its_own() -> None:
    """Same compact revision C, target kept, source not: the moved keys' changes at C are gone,
    so the target consumes its own changes at C and stops claiming them (a watch from C is then
    refused: no silent gap)."""
    from kvstore.shard.ranges import IntervalSet, key_hash

    dst = DictState(group=2)
    assert dst.apply(encode_shard_command(ShardOp.SET, IntervalSet.full().difference(
        IntervalSet([(key_hash(b"moved"), key_hash(b"moved"))])))).error is None
    own = dst.apply(cmds.encode_put(b"own", b"1", revision=NOW)).revision
    assert dst.apply(cmds.encode_compact(own, keep=True)).revision == own
    assert mvcc.rev_state(dst.rows).kept
    _install_closed(dst, own + 10 * mvcc.STEP, own, False)
    rs = mvcc.rev_state(dst.rows)
    assert (rs.compact, rs.kept) == (own, False)
    assert list(mvcc.changes_from(dst.rows, 0)) == []
    assert dst.data[b"own"] == b"1" and mvcc.version_at(dst.rows, b"own", own, b"1") is not None
