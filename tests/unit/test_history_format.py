"""Data format 3: each group's history in revision order (`mvcc.py`'s LOG table, with `prev` and
skew-binary `jump` links), migrated from format 2 at open, and snapshots that carry the same
records format 2 wrote, both ways (`tests/fixtures/make_history_v2.py` wrote the fixture with
the last format-2 release)."""

from __future__ import annotations

import math
import random
import struct
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fixturemod import fixture_module
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.storage import commands as cmds
from kvstore.storage import dataformat, mvcc
from kvstore.storage.errors import SnapshotFormatError
from kvstore.storage.machine import DictState
from kvstore.storage.mvcc_lmdb import LmdbRows, rev_dbs
from kvstore.storage.mvcc_mem import MemRows
from kvstore.storage.snapfile import TAG_REV_CHANGES, TAG_REV_HIST, SnapshotFile, encode_snapshot
from kvstore.storage.store import LmdbNodeStore

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


_FIX: Any = fixture_module("make_history_v2")
GROUP: int = _FIX.GROUP
commands = _FIX.commands
CONF = ConfState((1,))
KEYS = [b"a%d" % i for i in range(10)] + [b"hot", b"gone", b"never"]


def _extract(tmp: Path) -> Path:
    with tarfile.open(FIXTURES / "history_v2.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
    return tmp


def _fresh(path: Path) -> LmdbNodeStore:
    """A new store that applied the fixture's commands itself (format 3 from the start)."""
    s = LmdbNodeStore(path)
    assert s.bootstrap(GROUP, CONF)
    first = s.log_storage(GROUP).last_index() + 1
    es = [Entry(1, first + i, EntryType.NORMAL, d, GROUP) for i, d in enumerate(commands())]
    s.persist_and_apply([GroupWrite(GROUP, es, HardState(1, 0, es[-1].index))], ())
    ls = s.log_storage(GROUP)
    s.persist_and_apply((), [ApplyBatch(GROUP, ls.entries(1, ls.last_index() + 1), CONF)])
    return s


def _revisions(s: LmdbNodeStore) -> list[int]:
    """Every revision a command could have, from the compact revision to the last (and between)."""
    st = s._kv.rev_state(GROUP)
    base = mvcc.EPOCH_MS + 3_600_000
    revs = [mvcc.make_revision(base + i, 0, GROUP) for i in range(len(commands()) + 1)]
    return sorted({r for r in revs if st.compact <= r <= st.last} | {r + 1 for r in revs if st.compact <= r < st.last})


def _reads(s: LmdbNodeStore) -> dict[str, object]:
    """What a client can read of the group: every key at every revision, the change feed from the
    compact revision with prev_kv, the revision state."""
    kv = s._kv
    st = kv.rev_state(GROUP)
    out: dict[str, object] = {"state": st}
    for k in KEYS:
        out[k.decode()] = [(r, kv.get_version(GROUP, k, r)[0]) for r in _revisions(s)] + [kv.get_version(GROUP, k)[0]]
    out["changes"] = kv.changes(GROUP, st.compact, st.last, 1 << 20, 1 << 30, True).changes
    return out


def _check_links(s: LmdbNodeStore) -> int:
    """Every LOG row decodes, and its links point at older rows of the same key (or at a compacted
    tombstone). Returns how many rows."""
    n = 0
    with s._env.read() as txn:
        rows = LmdbRows(txn, GROUP, rev_dbs(s._env))
        assert next(rows.iter(mvcc.T_HIST, b"", None), None) is None, "history rows left behind"
        for k, v in rows.iter(mvcc.T_CHANGES, b"", None):
            r, kid = mvcc._PAIR.unpack(k)
            lr = mvcc.decode_log_row(r, v)
            assert mvcc.kid_of(rows, lr.key) == kid
            n += 1
    return n


def test_a_format_2_directory_is_migrated_at_open_and_reads_as_a_new_one(tmp_path: Path) -> None:
    old = _extract(tmp_path / "old") / "db"
    assert dataformat.read(old) == 2
    fresh = _fresh(tmp_path / "fresh")
    try:
        migrated = LmdbNodeStore(old)
        try:
            assert migrated.format == 2 and dataformat.read(old) == 3
            want = _reads(fresh)
            assert _reads(migrated) == want
            assert want["state"].kept and want["state"].compact > 0  # type: ignore[attr-defined]
            assert _check_links(migrated) == _check_links(fresh) > 50
            # Writes after the migration follow the migrated history.
            nxt = cmds.encode_put(b"hot", b"after", revision=0)
            for s in (migrated, fresh):
                i = s.log_storage(GROUP).last_index() + 1
                e = Entry(1, i, EntryType.NORMAL, nxt, GROUP)
                s.persist_and_apply([GroupWrite(GROUP, [e], HardState(1, 0, i))], ())
                s.persist_and_apply((), [ApplyBatch(GROUP, [e], CONF)])
            assert _reads(migrated) == _reads(fresh)
        finally:
            migrated.close()
        again = LmdbNodeStore(old)  # reopened: format 3, nothing migrates
        try:
            assert again.format == 3 and _reads(again) == _reads(fresh)
        finally:
            again.close()
    finally:
        fresh.close()


def test_the_migration_is_a_no_op_on_a_migrated_group(tmp_path: Path) -> None:
    """A crash after the migration's transaction but before the record: it runs again, and finds
    nothing to rebuild (no history rows), so it changes nothing."""
    s = _fresh(tmp_path / "s")
    try:
        before = _reads(s)
        s._migrate_history_to_log()
        assert _reads(s) == before
    finally:
        s.close()


def test_a_format_2_snapshot_installs_and_reads_as_a_new_one(tmp_path: Path) -> None:
    snap = _extract(tmp_path / "old") / "snapshot-v2.snap"
    fresh = _fresh(tmp_path / "fresh")
    b = LmdbNodeStore(tmp_path / "b")
    try:
        meta = SnapshotFile(snap).header.meta
        b.persist_and_apply([GroupWrite(GROUP, [], HardState(1, 0, meta.index), meta, snap)], ())
        assert _reads(b) == _reads(fresh)
        _check_links(b)
    finally:
        fresh.close()
        b.close()


def _records(path: Path) -> Counter[tuple[int, bytes, bytes]]:
    with SnapshotFile(path) as sf:
        return Counter((t, bytes(k), bytes(v)) for t, k, v in sf.records())


def test_a_new_snapshot_carries_exactly_the_records_format_2_wrote(tmp_path: Path) -> None:
    """So a format-2 release installs a new one: the records are the ones its own snapshot holds
    (the history in the exchange form, the change rows above the compact revision)."""
    old = _records(_extract(tmp_path / "old") / "snapshot-v2.snap")
    fresh = _fresh(tmp_path / "fresh")
    try:
        _, chunks = fresh.snapshot_chunks(GROUP)
        path = fresh.receive_snapshot(GROUP, list(chunks))
        new = _records(path)
    finally:
        fresh.close()
    assert {t for t, _, _ in old} >= {TAG_REV_HIST, TAG_REV_CHANGES}
    assert new == old


def test_a_snapshot_whose_key_row_does_not_name_its_newest_version_is_refused(tmp_path: Path) -> None:
    fresh = _fresh(tmp_path / "fresh")
    b = LmdbNodeStore(tmp_path / "b")
    try:
        meta, chunks = fresh.snapshot_chunks(GROUP)
        with SnapshotFile(fresh.receive_snapshot(GROUP, list(chunks))) as sf:
            recs = [(t, bytes(k), bytes(v)) for t, k, v in sf.records()]
        newest = max((r for r in recs if r[0] == TAG_REV_HIST), key=lambda x: mvcc._PAIR.unpack(x[1])[1])
        dropped = [r for r in recs if r != newest]  # its key's KEYS row now names a missing version
        path = b.receive_snapshot(GROUP, encode_snapshot(GROUP, meta, iter(dropped), 1 << 16))
        with pytest.raises(SnapshotFormatError, match="history"):
            b.persist_and_apply([GroupWrite(GROUP, [], HardState(1, 0, meta.index), meta, path)], ())
    finally:
        fresh.close()
        b.close()


# --- the chain's walk -----------------------------------------------------------------------------
class _Counting(MemRows):
    """MemRows counting the LOG lookups."""

    gets = 0

    def get(self, t: int, k: bytes) -> bytes | None:
        if t == mvcc.T_CHANGES:
            _Counting.gets += 1
        return super().get(t, k)


def test_a_read_at_any_revision_walks_logarithmically_many_versions() -> None:
    """2,000 versions of one key (deletes among them): the newest version at or below any
    revision takes O(log n) lookups (the jump links), and is the right one."""
    s = DictState(group=3)
    rows = _Counting()
    s.rows = rows
    model: list[tuple[int, bytes | None]] = []
    rng = random.Random(7)
    for i in range(2000):
        if rng.random() < 0.1:
            r = s.apply(cmds.encode_delete(b"k")).revision
            if r:
                model.append((r, None))
        else:
            model.append((s.apply(cmds.encode_put(b"k", b"v%d" % i)).revision, b"v%d" % i))
    worst = 0
    for r, want in model:
        for at in (r, r + 1):
            _Counting.gets = 0
            got = mvcc.version_at(rows, b"k", at, s.data.get(b"k"))
            worst = max(worst, _Counting.gets)
            assert (got.value if got is not None else None) == want
    # A walk by `prev` alone would take ~n lookups for the oldest: the bound is what `jump` buys.
    assert worst <= 3 * math.log2(len(model)) + 4, worst


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120), st.integers(0, mvcc.REVISION_MAX))
def test_the_log_row_decoder_is_total(raw: bytes, rev: int) -> None:
    try:
        lr = mvcc.decode_log_row(rev, raw)
    except ValueError:
        return
    assert lr.prev < rev and lr.jump < rev
    assert mvcc.log_row_key(raw) == lr.key


_small = st.integers(0, 4)
_key_rows = st.tuples(st.just(mvcc.T_KEYS), st.binary(max_size=6), st.one_of(
    st.binary(max_size=40),
    st.builds(lambda kid, c, m, v: mvcc._KEYROW.pack(kid, c, m, v), _small, _small, _small, _small),
))
_hist_rows = st.tuples(st.just(mvcc.T_HIST), st.one_of(
    st.binary(max_size=20), st.builds(lambda kid, r: mvcc._PAIR.pack(kid, r), _small, _small),
), st.one_of(
    st.binary(max_size=30),
    st.builds(lambda k, c, v, val: mvcc.encode_row(k, c, v, val), st.integers(0, 3), _small, _small, st.binary(max_size=4)),
))


@st.composite
def _consistent(draw: st.DrawFn) -> list[tuple[int, bytes, bytes]]:
    """A group's rows in the exchange form that hold together: keys with their versions."""
    out: list[tuple[int, bytes, bytes]] = []
    for kid in range(1, draw(st.integers(1, 4))):
        revs = sorted(draw(st.sets(st.integers(1, 40), min_size=1, max_size=8)))
        for r in revs:
            kind = draw(st.sampled_from([mvcc.KIND_PUT, mvcc.KIND_DELETE]))
            row = mvcc.encode_row(kind, 1, 1, b"v%d" % r) if kind == mvcc.KIND_PUT else mvcc.encode_row(kind, 0, 0, b"")
            out.append((mvcc.T_HIST, mvcc._PAIR.pack(kid, r), row))
        out.append((mvcc.T_KEYS, b"key%d" % kid, mvcc._KEYROW.pack(kid, 0, revs[-1], 0)))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_consistent(), st.lists(st.one_of(_key_rows, _hist_rows), max_size=4))
def test_rebuilding_from_hostile_rows_is_a_value_error_or_a_consistent_log(
    good: list[tuple[int, bytes, bytes]], bad: list[tuple[int, bytes, bytes]]
) -> None:
    """Snapshot rows are hostile: `rebuild_log` refuses what does not hold together, never
    raises anything else, and what it accepts reads back: every key's versions at their
    revisions, through the links."""
    rows = MemRows()
    for t, k, v in good + bad:
        rows.put(t, k, v)
    hist = {mvcc._PAIR.unpack(k): v for k, v in rows.tables[mvcc.T_HIST].items() if len(k) == 16}
    keys = dict(rows.tables[mvcc.T_KEYS])
    try:
        n = mvcc.rebuild_log(rows)
    except ValueError:
        event("refused")
        return
    event(f"accepted {min(n, 3)}+ versions")
    assert not rows.tables[mvcc.T_HIST] and not mvcc.needs_rebuild(rows)
    for key, raw in keys.items():
        kid, _, mod, _ = mvcc._KEYROW.unpack(raw)
        row = mvcc._key_row(rows, key)
        assert row is not None and row[0] == kid and row[1].mod_revision == mod
        for (hk, r), v in hist.items():
            if hk == kid:
                got = mvcc._version_at(rows, kid, mod, r)
                assert got is not None and got[0] == r and got[1].value == mvcc.decode_row(r, v).value


def test_a_rebuild_keeps_what_compaction_keeps_of_a_key_moved_in_under_format_2() -> None:
    """Format 2 installed a moved key's every version, some below the group's compact revision
    C: the rebuild keeps the newest at or below C and those above, as a compaction would."""
    rows = MemRows()
    rows.put(mvcc.T_STATE, b"", mvcc.RevState(30, 10, 2).encode())
    for r in (3, 5, 20):
        rows.put(mvcc.T_HIST, mvcc._PAIR.pack(1, r), mvcc.encode_row(mvcc.KIND_PUT, 3, 1, b"v%d" % r))
    rows.put(mvcc.T_KEYS, b"k", mvcc._KEYROW.pack(1, 3, 20, 1))
    assert mvcc.rebuild_log(rows) == 2
    assert [r for r, _ in mvcc.key_history(rows, b"k")] == [5, 20]
    assert mvcc.version_at(rows, b"k", 10, b"v20").value == b"v5"  # type: ignore[union-attr]


@pytest.mark.parametrize("inline", [mvcc.INLINE_VERSIONS, 5])
def test_a_new_snapshot_installs_and_reads_as_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         inline: int) -> None:
    """Per key inline (held one key at a time by the receiver), and with the long histories sent
    after every key (`INLINE_VERSIONS` lowered: the fixture's hot key has more), which the
    receiver stages and builds at the end."""
    monkeypatch.setattr(mvcc, "INLINE_VERSIONS", inline)
    staged: list[int] = []
    rebuild = mvcc.rebuild_log

    def counting(*a: object, **kw: object) -> int:
        n = rebuild(*a, **kw)  # type: ignore[arg-type]
        staged.append(n)
        return n

    monkeypatch.setattr(mvcc, "rebuild_log", counting)
    fresh = _fresh(tmp_path / "fresh")
    b = LmdbNodeStore(tmp_path / "b")
    try:
        i = fresh.log_storage(GROUP).last_index() + 1  # a key after "hot", whose history is long
        e = Entry(1, i, EntryType.NORMAL, cmds.encode_put(b"zz", b"last key"), GROUP)
        fresh.persist_and_apply([GroupWrite(GROUP, [e], HardState(1, 0, i))], ())
        fresh.persist_and_apply((), [ApplyBatch(GROUP, [e], CONF)])
        meta, chunks = fresh.snapshot_chunks(GROUP)
        path = b.receive_snapshot(GROUP, list(chunks))
        b.persist_and_apply([GroupWrite(GROUP, [], HardState(1, 0, meta.index), meta, path)], ())
        assert _reads(b) == _reads(fresh)
        assert _check_links(b) == _check_links(fresh)
        assert bool(staged) == (inline == 5) and all(n > 5 for n in staged)  # only the long histories staged
    finally:
        fresh.close()
        b.close()


def test_a_tombstone_row_with_metadata_reads_as_a_tombstone() -> None:
    """Hypothesis found it: a HIST tombstone row saying create 0, version 1 (format 2's decoder
    ignores a tombstone's metadata) was copied into a LOG row that the LOG's decoder refuses, so
    a later read failed. The builder writes a tombstone's metadata as 0."""
    rows = MemRows()
    rows.put(mvcc.T_HIST, mvcc._PAIR.pack(1, 1), mvcc.encode_row(mvcc.KIND_PUT, 1, 1, b"v1"))
    rows.put(mvcc.T_HIST, mvcc._PAIR.pack(1, 2), mvcc._ROW.pack(mvcc.KIND_DELETE, 7, 1))
    rows.put(mvcc.T_KEYS, b"k", mvcc._KEYROW.pack(1, 0, 2, 0))
    assert mvcc.rebuild_log(rows) == 2
    assert mvcc.version_at(rows, b"k", 1, None).value == b"v1"  # type: ignore[union-attr]
    assert mvcc.version_at(rows, b"k", 2, None) is None
    assert mvcc.key_history(rows, b"k")[-1] == (2, mvcc._ROW.pack(mvcc.KIND_DELETE, 0, 0))


@pytest.mark.parametrize("store", ["memory", "lmdb"])
def test_two_keys_claiming_one_version_are_refused(tmp_path: Path, store: str) -> None:
    """A forged snapshot gives two keys the same key id and a version at the same revision: the
    second LOG row would overwrite the first (one key's reads would return the other's value).
    The builder writes each LOG row only where none is (`Rows.add_log`) and refuses the rest, in
    both `Rows` (the simulator's and LMDB's), as rows come and when staged ones are rebuilt."""
    v1 = mvcc.encode_row(mvcc.KIND_PUT, 5, 1, b"a's value")
    v2 = mvcc.encode_row(mvcc.KIND_PUT, 5, 1, b"b's value")
    for inline in (True, False):
        if store == "memory":
            rows: Any = MemRows()
            s = None
        else:
            s = LmdbNodeStore(tmp_path / f"s{inline}")
            txn = s._env.env.begin(write=True)
            rows = LmdbRows(txn, GROUP, rev_dbs(s._env))
        try:
            b = mvcc.LogBuilder(rows, 0)
            with pytest.raises(ValueError, match="two versions at revision 5 of key id 1"):
                for key, row in ((b"a", v1), (b"b", v2)):
                    if inline:
                        b.key(key, mvcc._KEYROW.pack(1, 5, 5, 1))
                        b.hist(mvcc._PAIR.pack(1, 5), row)
                    else:
                        rows.put(mvcc.T_KEYS, key, mvcc._KEYROW.pack(1, 5, 5, 1))
                        rows.put(mvcc.T_HIST, mvcc._PAIR.pack(1, 5), row)
                if inline:
                    b.finish()
                else:
                    rows.put(mvcc.T_HIST, mvcc._PAIR.pack(1, 5), v1)  # both keys name it
                    mvcc.rebuild_log(rows, 0, keep_log=True)
        finally:
            if s is not None:
                txn.abort()
                s.close()


@pytest.mark.parametrize("which", ["newest", "older", "other key"])
def test_a_damaged_log_row_on_disk_stops_a_snapshot_with_a_value_error(which: str) -> None:
    """Producing a snapshot reads each LOG row it sends: one cut short on disk (or holding another
    key's bytes) is a ValueError (a corrupt store, reported), never a struct.error or a record
    sliced at the wrong place."""
    rows = MemRows()
    base = mvcc.EPOCH_MS + 3_600_000
    for i in range(3):
        mvcc.write_version(rows, GROUP, b"key", b"value-%d" % i, None if i == 0 else b"value-%d" % (i - 1),
                           mvcc.make_revision(base + i, 0, GROUP))
    chain = sorted(rows.tables[mvcc.T_CHANGES])
    assert len(chain) == 3
    list(mvcc.snapshot_records(rows, mvcc.rev_state(rows)))  # whole, it is sent
    k = chain[-1] if which == "newest" else chain[0]
    raw = rows.tables[mvcc.T_CHANGES][k]
    if which == "other key":  # the same length field, a longer key: the value would be cut wrong
        rows.tables[mvcc.T_CHANGES][k] = raw[:mvcc._LOG_SIZE - 2] + struct.pack(">H", 5) + b"key!!" + raw[mvcc._LOG_SIZE + 3:]
    else:
        rows.tables[mvcc.T_CHANGES][k] = raw[:mvcc._LOG_SIZE - 1]
    with pytest.raises(ValueError):
        list(mvcc.snapshot_records(rows, mvcc.rev_state(rows)))
