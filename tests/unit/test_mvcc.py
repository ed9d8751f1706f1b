"""Revisions and MVCC history (storage/mvcc.py): the apply rule, and history on both the memory
view and LMDB against a model dict-of-histories, with compaction, snapshots and legacy keys."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.storage import commands as cmds
from kvstore.storage import mvcc
from kvstore.storage.machine import DictState
from kvstore.storage.store import LmdbNodeStore

CONF = ConfState((1,))
NOW = mvcc.make_revision(mvcc.EPOCH_MS + 3_600_000, 0, 0)


# --- the apply rule ----------------------------------------------------------------------------
@given(
    st.integers(0, mvcc.PROPOSAL_MAX),
    st.integers(0, mvcc.PROPOSAL_MAX),
    st.integers(0, mvcc.MAX_GROUPS - 1),
)
def test_next_revision_is_above_last_at_least_proposed_and_in_the_group_slot(last: int, proposed: int, g: int) -> None:
    rev = mvcc.next_revision(last, proposed, g)
    assert rev > last and rev >= proposed and rev % mvcc.STEP == g and 0 < rev <= mvcc.REVISION_MAX
    assert rev - mvcc.STEP < max(last + 1, proposed)  # the smallest such revision


@given(st.integers(mvcc.PROPOSAL_MAX + 1, 1 << 64), st.integers(0, mvcc.MAX_GROUPS - 1))
def test_absurd_proposals_are_refused(proposed: int, g: int) -> None:
    with pytest.raises(mvcc.RevisionError):
        mvcc.next_revision(0, proposed, g)


@given(
    st.integers(0, mvcc.REVISION_MAX),
    st.integers(-1, 1 << 64),
    st.integers(0, 3 * mvcc.MAX_GROUPS),
    st.booleans(),
)
def test_write_version_assigns_exactly_the_apply_rule(last: int, proposed: int, g: int, delete: bool) -> None:
    """write_version inlines next_revision (the hot path): the same revision, or the same refusal
    with nothing changed."""
    from kvstore.storage.mvcc_mem import MemRows

    rows = MemRows()
    rows.put(mvcc.T_STATE, b"", mvcc.RevState(last, 0, 5).encode())
    before = [dict(t) for t in rows.tables]
    try:
        want: int | None = mvcc.next_revision(last, proposed, g)
    except mvcc.RevisionError:
        want = None
    value = None if delete else b"v"
    prev = b"p" if delete else None
    if want is None:
        with pytest.raises(mvcc.RevisionError):
            mvcc.write_version(rows, g, b"k", value, prev, proposed)
        assert rows.tables == before
        return
    assert mvcc.write_version(rows, g, b"k", value, prev, proposed) == want
    assert mvcc.rev_state(rows) == mvcc.RevState(want, 0, 6)
    assert mvcc.kid_of(rows, b"k") == 5 and mvcc.key_history(rows, b"k")[-1][0] == want


def test_a_put_reads_the_value_before_only_for_a_key_without_history() -> None:
    """A PUT needs the key's old value only for a LEGACY key's first write: once the key has a
    key row, its value is not read again (one LMDB read less per put)."""
    s = DictState(group=5)
    s.data[b"old"] = b"v0"  # LEGACY
    reads: list[bytes] = []
    real_get = s.get

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(s, name)

        def get(self, key: bytes) -> bytes | None:
            reads.append(key)
            return real_get(key)

    from kvstore.storage.machine import execute

    view = Counting()
    for i in range(3):
        for k in (b"old", b"new"):
            assert execute(view, cmds.Command.put(k, b"%d" % i)).revision > 0  # type: ignore[arg-type]
    assert reads == [b"old", b"new"]
    assert mvcc.version_at(s.rows, b"old", 1, s.data[b"old"]) == mvcc.Version(b"v0", mvcc.LEGACY_META)
    assert mvcc.current_meta(s.rows, b"new", s.data[b"new"]).version == 3  # type: ignore[union-attr]


def test_a_forged_far_future_write_changes_nothing_and_the_group_keeps_writing() -> None:
    s = DictState(group=7)
    ok = s.apply(cmds.encode_put(b"k", b"1", revision=NOW))
    bad = s.apply(cmds.encode_put(b"k", b"2", revision=mvcc.PROPOSAL_MAX + 1))
    assert bad.error is not None and "revision" in bad.error and bad.revision == 0
    assert s.data[b"k"] == b"1" and mvcc.rev_state(s.rows).last == ok.revision
    after = s.apply(cmds.encode_put(b"k", b"3"))
    assert after.error is None and after.revision == ok.revision + mvcc.STEP


def test_clock_behind_keeps_revisions_strictly_increasing() -> None:
    s = DictState(group=3)
    revs = [s.apply(cmds.encode_put(b"k", b"%d" % i, revision=NOW - i * mvcc.STEP * 1000)).revision for i in range(5)]
    assert revs == sorted(set(revs)) and all(r % mvcc.STEP == 3 for r in revs) and revs[0] >= NOW


def test_failed_cas_and_missing_delete_get_no_revision_and_retry_answers_the_same() -> None:
    s = DictState(group=1)
    assert s.apply(cmds.encode_cas(b"k", False, b"x", b"y")).revision == 0
    assert s.apply(cmds.encode_delete(b"k")).revision == 0
    first = s.apply(cmds.encode_put(b"k", b"v", 9, 1, 0))
    again = s.apply(cmds.encode_put(b"k", b"v", 9, 1, 0, True))
    assert first.revision > 0 and again.revision == first.revision
    assert mvcc.current_meta(s.rows, b"k", s.data[b"k"]) == mvcc.KeyMeta(first.revision, first.revision, 1)


def test_legacy_keys_read_at_revision_one_and_keep_that_version() -> None:
    s = DictState(group=2)
    s.data[b"old"] = b"v0"  # written before revisions: no history rows
    assert mvcc.current_meta(s.rows, b"old", b"v0") == mvcc.LEGACY_META
    r = s.apply(cmds.encode_put(b"old", b"v1")).revision
    assert mvcc.version_at(s.rows, b"old", 1, s.data[b"old"]) == mvcc.Version(b"v0", mvcc.LEGACY_META)
    assert mvcc.version_at(s.rows, b"old", r, s.data[b"old"]) == mvcc.Version(b"v1", mvcc.KeyMeta(1, r, 2))


# --- history against a model -------------------------------------------------------------------
KEYS = [b"a", b"b", b"c", b"a\x00"]
op_st = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.binary(max_size=3), st.integers(0, 40)),
    st.tuples(st.just("del"), st.sampled_from(KEYS), st.just(b""), st.integers(0, 40)),
    st.tuples(st.just("cas"), st.sampled_from(KEYS), st.binary(max_size=1), st.integers(0, 40)),
    st.tuples(st.just("compact"), st.just(b""), st.just(b""), st.integers(0, 60)),
)


def _command(op: tuple[str, bytes, bytes, int], revs: list[int]) -> bytes:
    kind, key, value, n = op
    proposed = 0 if n % 3 == 0 else NOW + n * mvcc.STEP  # sometimes none, sometimes behind
    if kind == "put":
        return cmds.encode_put(key, value, revision=proposed)
    if kind == "del":
        return cmds.encode_delete(key, revision=proposed)
    if kind == "cas":
        return cmds.encode_cas(key, False, value, value + b"!", revision=proposed)
    # Both rules, mixed (each COMPACT names its own: the keep rule on even n).
    return cmds.encode_compact(revs[n % len(revs)] if revs else 1, keep=n % 2 == 0)


class Model:
    """Every (revision, key -> (value, create, version)) state the group went through."""

    def __init__(self) -> None:
        self.states: list[tuple[int, dict[bytes, tuple[bytes, int, int]]]] = []
        self.now: dict[bytes, tuple[bytes, int, int]] = {}
        self.compact = 0
        self.kept = False

    def write(self, rev: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            del self.now[key]
        else:
            old = self.now.get(key)
            self.now[key] = (value, rev, 1) if old is None else (value, old[1], old[2] + 1)
        self.states.append((rev, dict(self.now)))

    def at(self, rev: int) -> dict[bytes, tuple[bytes, int, int]]:
        out: dict[bytes, tuple[bytes, int, int]] = {}
        for r, state in self.states:
            if r > rev:
                break
            out = state
        return out


def _run(ops: list[tuple[str, bytes, bytes, int]], group: int) -> tuple[DictState, Model, list[bytes]]:
    s = DictState(group=group)
    m = Model()
    datas: list[bytes] = []
    last = 0
    for op in ops:
        data = _command(op, [r for r, _ in m.states])
        datas.append(data)
        before = dict(s.data)
        res = s.apply(data)
        assert res.error is None
        if op[0] == "compact":
            m.compact = res.revision
            assert res.revision == mvcc.rev_state(s.rows).compact
            m.kept = mvcc.rev_state(s.rows).kept
            continue
        changed = s.data != before or (op[0] == "put" and op[1] in before)
        if op[0] == "cas" and not res.swapped:
            assert res.revision == 0 and s.data == before
            continue
        if op[0] == "del" and not res.existed:
            assert res.revision == 0
            continue
        assert changed or op[0] == "put"
        assert res.revision > last and res.revision % mvcc.STEP == group  # strictly increasing, own slot
        last = res.revision
        m.write(res.revision, op[1], s.data.get(op[1]))
    return s, m, datas


def _check(read: object, m: Model, keys: list[bytes]) -> None:
    """`read(key, rev)` -> Version | None must match the model at every revision kept."""
    assert callable(read)
    for rev, _ in m.states:
        if rev < m.compact:
            continue
        state = m.at(rev)
        for k in keys:
            v = read(k, rev)
            want = state.get(k)
            if want is None:
                assert v is None, (k, rev)
            else:
                assert v is not None and v.value == want[0], (k, rev)
                assert v.meta.create_revision == want[1] and v.meta.version == want[2]
                assert v.meta.mod_revision <= rev


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, max_size=40))
def test_history_matches_a_model_at_every_revision(ops: list[tuple[str, bytes, bytes, int]]) -> None:
    s, m, _ = _run(ops, 5)
    _check(lambda k, r: mvcc.version_at(s.rows, k, r, s.data.get(k)), m, KEYS)
    # The change feed a watch will read: every write above the compact revision, in order, and
    # at it too if the last compaction kept them (the keep rule: a watch from it gets them).
    lo = m.compact if m.kept else m.compact + 1
    after = [r for r, _ in m.states if r >= lo]
    assert [r for r, _ in mvcc.changes_from(s.rows, m.compact)] == after
    # Compaction keeps at most the newest version at or below the compact revision per key (a
    # tombstone only at exactly it, and only if kept), and the change log holds exactly the
    # versions from `lo` on.
    kids = {k: mvcc.kid_of(s.rows, k) for k in KEYS}
    feed = {(r, k) for r, k in mvcc.changes_from(s.rows, 0)}
    for k, kid in kids.items():
        if kid is None:
            continue
        hist = mvcc.key_history(s.rows, k)
        revs = [r for r, _ in hist]
        assert revs, "a key id without history rows"
        assert len([r for r in revs if r <= m.compact]) <= 1
        for r, row in hist:
            if r < lo:
                assert mvcc.decode_row(r, row).value is not None, "a tombstone below the compact revision"
        assert {(r, k) for r in revs if r >= lo} == {(r, kk) for r, kk in feed if kk == k}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=1, max_size=30))
def test_lmdb_history_and_its_snapshot_match_the_model(ops: list[tuple[str, bytes, bytes, int]]) -> None:
    s, m, datas = _run(ops, 4)
    with tempfile.TemporaryDirectory() as tmp:
        a = LmdbNodeStore(Path(tmp) / "a")
        b = LmdbNodeStore(Path(tmp) / "b")
        try:
            assert a.bootstrap(4, CONF)
            es = [Entry(1, 2 + i, EntryType.NORMAL, d, 4) for i, d in enumerate(datas)]
            a.persist_and_apply([GroupWrite(4, es, HardState(1, 0, es[-1].index))], ())
            ls = a.log_storage(4)
            a.persist_and_apply((), [ApplyBatch(4, ls.entries(1, ls.last_index() + 1), CONF)])
            kv = a._kv

            def read(k: bytes, r: int) -> mvcc.Version | None:
                return kv.get_version(4, k, r)[0]

            _check(read, m, KEYS)
            for stored in (kv.rev_state(4), kv.get_version(4, b"a")[1]):
                assert stored == mvcc.rev_state(s.rows)
            if m.states and m.compact > m.states[0][0]:
                with pytest.raises(mvcc.Compacted) as e:
                    kv.get_version(4, b"a", m.states[0][0])
                assert e.value.compact_revision == m.compact
            # A scan at each revision is the model's state then (keys in order).
            for rev, _ in m.states[-3:]:
                if rev < m.compact:
                    continue
                _, stream = kv.scan_versions(4, b"", None, 0, rev, 2, 1 << 20)
                got = [(k, v.value) for chunk in stream for k, v in chunk]
                assert got == sorted((k, x[0]) for k, x in m.at(rev).items())
            # The snapshot carries the history: the receiver reads the same at every revision.
            meta, chunks = a.snapshot_chunks(4)
            path = b.receive_snapshot(4, list(chunks))
            b.persist_and_apply([GroupWrite(4, [], HardState(1, 0, meta.index), meta, path)], ())
            assert b._kv.rev_state(4) == kv.rev_state(4)  # the kept flag too (a follower installed from it agrees)
            assert b._kv.rev_state(4).kept == m.kept
            _check(lambda k, r: b._kv.get_version(4, k, r)[0], m, KEYS)
        finally:
            a.close()
            b.close()


# --- history moves with a range ------------------------------------------------------------------
def test_a_moved_key_keeps_its_history_and_later_writes_follow_it() -> None:
    from kvstore.shard.ranges import IntervalSet, key_hash
    from kvstore.storage.shardcmd import REC_DATA, REC_HISTORY, ShardOp, encode_record, encode_shard_command

    full = IntervalSet.full()
    src, dst = DictState(group=1), DictState(group=2)
    assert src.apply(encode_shard_command(ShardOp.SET, full)).error is None
    assert dst.apply(encode_shard_command(ShardOp.SET, IntervalSet())).error is None
    ahead = NOW + 10_000 * mvcc.STEP  # the source's clock ran far ahead of the target's
    revs = [src.apply(cmds.encode_put(b"m", b"%d" % i, revision=ahead)).revision for i in range(3)]
    gone = src.apply(cmds.encode_put(b"d", b"x", revision=ahead)).revision
    src.apply(cmds.encode_delete(b"d"))
    rng = IntervalSet([(key_hash(b"m"), key_hash(b"m"))]).union(IntervalSet([(key_hash(b"d"), key_hash(b"d"))]))
    assert src.apply(encode_shard_command(ShardOp.FREEZE, rng, move=1)).error is None
    records = encode_record(REC_DATA, b"m", src.data[b"m"]) + b"".join(
        encode_record(REC_HISTORY, k, mvcc.encode_versions(mvcc.key_history(src.rows, k))) for k in (b"d", b"m")
    )
    assert dst.apply(encode_shard_command(ShardOp.BEGIN, rng, move=1, token=5)).error is None
    # A malformed history record refuses the whole INSTALL: nothing changes.
    before = (dict(dst.data), [dict(t) for t in dst.rows.tables])
    bad = encode_record(REC_DATA, b"m", b"v") + encode_record(REC_HISTORY, b"m", b"\x00" * 5)
    res = dst.apply(encode_shard_command(ShardOp.INSTALL, records=bad, move=1, token=5))
    assert res.error is not None and "history" in res.error
    assert (dst.data, dst.rows.tables) == before
    assert dst.apply(encode_shard_command(ShardOp.INSTALL, records=records, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.ACTIVATE, rng, move=1, token=5)).error is None
    for i, r in enumerate(revs):  # the target reads the moved history exactly as the source did
        assert mvcc.version_at(dst.rows, b"m", r, dst.data.get(b"m")) == mvcc.version_at(src.rows, b"m", r, src.data[b"m"])
        assert mvcc.version_at(dst.rows, b"m", r, dst.data.get(b"m")).value == b"%d" % i  # type: ignore[union-attr]
    assert mvcc.version_at(dst.rows, b"d", gone, None) == mvcc.Version(b"x", mvcc.KeyMeta(gone, gone, 1))
    after = dst.apply(cmds.encode_put(b"m", b"new", revision=NOW)).revision  # the target's clock is behind
    assert after > max(revs) and after % mvcc.STEP == 2
    assert mvcc.current_meta(dst.rows, b"m", b"new") == mvcc.KeyMeta(revs[0], after, 4)


def test_a_data_directory_from_before_revisions_opens_and_its_keys_read_as_legacy(tmp_path: Path) -> None:
    """Rows written by the previous release (data, no history tables' rows) read at revision 1;
    the first write records the old version at revision 1; scans at 1 see the old keys."""
    from kvstore.storage.layout import DB_DATA, group_prefix

    path = tmp_path / "old"
    s = LmdbNodeStore(path)
    try:
        assert s.bootstrap(4, CONF)
        ls = s.log_storage(4)
        s.persist_and_apply((), [ApplyBatch(4, ls.entries(1, ls.last_index() + 1), CONF)])
        env = s._env
        env.write(lambda txn: [txn.put(group_prefix(4) + k, v, db=env.db(DB_DATA)) for k, v in
                               ((b"old/a", b"A"), (b"old/b", b""), (b"old/c", b"C"))])
    finally:
        s.close()
    s = LmdbNodeStore(path)  # reopened: the new tables exist, empty
    try:
        kv = s._kv
        assert kv.get_version(4, b"old/a") == (mvcc.Version(b"A", mvcc.LEGACY_META), mvcc.RevState())
        assert kv.get_version(4, b"old/b")[0] == mvcc.Version(b"", mvcc.LEGACY_META)  # an empty value is a value
        first = s.log_storage(4).last_index() + 1
        datas = [cmds.encode_put(b"old/a", b"A2", revision=NOW), cmds.encode_put(b"old/b", b"B2"),
                 cmds.encode_delete(b"old/c")]
        es = [Entry(1, first + i, EntryType.NORMAL, d, 4) for i, d in enumerate(datas)]
        s.persist_and_apply([GroupWrite(4, es, HardState(1, 0, es[-1].index))], ())
        res = s.persist_and_apply((), [ApplyBatch(4, es, CONF)])[0]
        ra, rb, rc = (r.revision for r in res)
        assert ra >= NOW and NOW <= ra < rb < rc
        assert kv.get_version(4, b"old/a")[0] == mvcc.Version(b"A2", mvcc.KeyMeta(1, ra, 2))
        assert kv.get_version(4, b"old/b")[0] == mvcc.Version(b"B2", mvcc.KeyMeta(1, rb, 2))
        assert kv.get_version(4, b"old/c")[0] is None
        for rev, want in ((1, [b"A", b"", b"C"]), (ra, [b"A2", b"", b"C"]), (rc, [b"A2", b"B2"])):
            _, stream = kv.scan_versions(4, b"old/", b"old0", 0, rev, 100, 1 << 20)
            assert [v.value for chunk in stream for _, v in chunk] == want, rev
    finally:
        s.close()


def test_the_expiry_walk_is_bounded_oldest_first_and_skips_malformed_rows() -> None:
    """`mvcc.expired` (the GC walk of the transaction `g` rows and the lease tombstones' `x`
    rows): at most `limit` keys whose expiry is below the group's last revision, oldest first; a
    row of another length is skipped, not the end of the walk."""
    from kvstore.storage.mvcc_mem import MemRows

    u64 = struct.Struct(">Q").pack
    rows = MemRows()
    rows.put(mvcc.T_STATE, b"", mvcc.RevState(100, 0, 1).encode())
    row = [b"x" + u64(e) + bytes((i,)) for i, e in enumerate((5, 7, 9, 99, 100, 300))]
    for k in row:
        rows.put(mvcc.T_LEASES, k, b"")
    rows.put(mvcc.T_LEASES, b"x" + u64(6), b"")  # malformed: one byte short
    rows.put(mvcc.T_LEASES, b"y" + u64(1) + b"\x00", b"")  # another index
    assert mvcc.expired(rows, mvcc.T_LEASES, b"x", 10, 3, "test") == row[:3]
    assert mvcc.expired(rows, mvcc.T_LEASES, b"x", 10, 10, "test") == row[:4]  # 100 is not below last
    assert mvcc.expired(rows, mvcc.T_LEASES, b"x", 10, 0, "test") == []
