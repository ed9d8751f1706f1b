"""The Raft logs of all groups in one write-ahead log (`storage/walrec.py`, `storage/walgroups.py`):
the record codec (round trip, total decoding of hostile bytes), the log semantics against
`MemoryStorage`, and random runs of appends / conflicting overwrites / hard states / compactions /
snapshot installs / destroys / checkpoints (rewrite forward + prefix truncation) with crashes of
the simulated file system: the recovered logs are exactly the reference after some prefix of the
written records that includes every synced one."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.raft.memstorage import MemoryStorage
from kvstore.raft.storage import CompactedError, UnavailableError
from kvstore.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    RaftError,
    Snapshot,
    SnapshotMeta,
)
from kvstore.storage.errors import StorageError
from kvstore.storage.raftwal import CHECKPOINT_NAME, RaftWal
from kvstore.storage.wal import (
    CRASH_DROP,
    CRASH_KEEP,
    CRASH_RANDOM,
    CRASH_REORDER,
    SimFileSystem,
    Wal,
    WalCorruptError,
    WalOptions,
)
from kvstore.storage.walgroups import WalGroups
from kvstore.storage.walrec import (
    KIND_COMPACT,
    KIND_DESTROY,
    KIND_ENTRIES,
    KIND_HARD_STATE,
    KIND_RESET,
    GroupRecord,
    WalRecordError,
    decode,
    encode,
)

U64 = st.integers(0, (1 << 64) - 1)
BIG = 1 << 20


def _conf() -> st.SearchStrategy[ConfState]:
    return st.lists(st.integers(1, 1 << 40), unique=True, max_size=6).flatmap(
        lambda ids: st.integers(0, len(ids)).map(lambda k: ConfState(tuple(ids[:k]), tuple(ids[k:])))
    )


def _entries(group: int, low: bool = False) -> st.SearchStrategy[tuple[Entry, ...]]:
    return st.tuples(
        st.integers(1, 8) if low else st.integers(1, 1 << 62),
        st.lists(
            st.tuples(U64, st.sampled_from(list(EntryType)), st.binary(max_size=40)), min_size=1, max_size=8
        ),
    ).map(lambda a: tuple(Entry(t, a[0] + i, ty, d, group) for i, (t, ty, d) in enumerate(a[1])))


def _records(small_groups: bool = False) -> st.SearchStrategy[GroupRecord]:
    hs = st.builds(HardState, U64, U64, U64)
    meta = st.builds(SnapshotMeta, st.integers(0, 6) if small_groups else U64, U64, _conf())
    return (st.integers(0, 2) if small_groups else U64).flatmap(
        lambda g: st.one_of(
            st.builds(lambda m, h: GroupRecord(KIND_RESET, g, base=m, hard_state=h), meta, hs),
            st.builds(lambda m: GroupRecord(KIND_COMPACT, g, base=m), meta.filter(lambda m: m.index > 0)),
            st.builds(lambda h: GroupRecord(KIND_HARD_STATE, g, hard_state=h), hs),
            st.just(GroupRecord(KIND_DESTROY, g)),
            _entries(g, small_groups).map(lambda e: GroupRecord(KIND_ENTRIES, g, entries=e)),
        )
    )


@given(_records())
def test_every_record_round_trips(rec: GroupRecord) -> None:
    (payload,) = encode(rec, BIG)
    assert decode(payload) == rec


@given(_records(), st.data())
def test_a_damaged_record_decodes_to_itself_or_a_record_error(rec: GroupRecord, data: st.DataObject) -> None:
    (payload,) = encode(rec, BIG)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(WalRecordError):
        decode(payload[:cut])  # every kind's body has a fixed minimum: a strict prefix never decodes
    with pytest.raises(WalRecordError):
        decode(payload + data.draw(st.binary(min_size=1, max_size=9)))
    pos = data.draw(st.integers(0, len(payload) - 1))
    flipped = bytearray(payload)
    flipped[pos] ^= data.draw(st.integers(1, 255))
    try:
        out = decode(bytes(flipped))
    except WalRecordError:
        return
    assert encode(out, BIG) == [bytes(flipped)]  # what decodes is exactly what it says


@settings(max_examples=400)
@given(st.binary(max_size=120))
def test_decode_is_total_on_any_bytes(raw: bytes) -> None:
    try:
        rec = decode(raw)
    except WalRecordError:
        return
    assert encode(rec, BIG) == [raw]


@settings(max_examples=100)
@given(st.lists(_records(small_groups=True), max_size=12), st.integers(1, 4))
def test_recovery_from_any_sequence_of_records_is_total(recs: list[GroupRecord], from_seq: int) -> None:
    """Whatever a (hostile) directory holds, recovery returns logs that keep the invariants or
    raises StorageError: nothing else."""
    payloads = [(i, p) for i, r in enumerate(recs, 1) for p in encode(r, BIG)]
    try:
        wg = WalGroups.recover(payloads, from_seq, BIG)
    except StorageError:
        return
    for g in wg.groups.values():
        assert [e.index for e in g.ents] == list(range(g.first_index(), g.last_index() + 1))
        assert len(g.seqs) == len(g.ents) and g.seqs == sorted(g.seqs) and all(s >= g.anchor for s in g.seqs)


def test_a_record_claiming_more_entries_than_its_bytes_is_refused_cheaply() -> None:
    (payload,) = encode(GroupRecord(KIND_ENTRIES, 3, entries=(Entry(1, 5),)), BIG)
    huge = payload[:17] + (0xFFFFFFFF).to_bytes(4, "big") + payload[21:]
    with pytest.raises(WalRecordError, match="claims"):
        decode(huge)
    with pytest.raises(WalRecordError, match="kind 9"):
        decode(bytes([9]) + bytes(8))
    with pytest.raises(ValueError):
        encode(GroupRecord(KIND_RESET, 1, base=SnapshotMeta()), BIG)  # no hard state


# --- the logs ---------------------------------------------------------------------------------------
def _wal(fs: SimFileSystem, opts: WalOptions) -> tuple[Wal, list[tuple[int, bytes]]]:
    recs: list[tuple[int, bytes]] = []
    return Wal.open(fs, opts, recs), recs


def test_semantics_match_memory_storage_and_a_batch_is_checked_before_it_is_written() -> None:
    fs = SimFileSystem()
    wal, _ = _wal(fs, WalOptions(segment_bytes=512, max_record_bytes=300))
    wg = WalGroups(300)
    ref = MemoryStorage()
    wg.write(wal, [GroupRecord(KIND_RESET, 7, base=SnapshotMeta(), hard_state=HardState())])
    g = wg.groups[7]
    batches = [
        [Entry(1, i, group=7) for i in range(1, 6)],
        [Entry(2, i, group=7) for i in range(3, 9)],  # conflicting suffix: 3..5 replaced
        [
            Entry(2, i, group=7) for i in range(2, 4)
        ],  # an overwrite with the same terms truncates what follows, as MemoryStorage does
        [Entry(3, i, data=bytes(200), group=7) for i in range(4, 7)],  # split into several payloads
    ]
    for ents in batches:
        wg.write(wal, [GroupRecord(KIND_ENTRIES, 7, entries=tuple(ents))])
        ref.append(ents)
        assert (g.first_index(), g.last_index()) == (ref.first_index(), ref.last_index())
        assert g.entries(1, g.last_index() + 1) == ref.entries(1, ref.last_index() + 1)
    assert wal.last_seq > 5  # the 200-byte entries went one per payload
    before = wal.last_seq
    with pytest.raises(RaftError, match="missing log entry"):
        wg.write(
            wal,
            [
                GroupRecord(KIND_HARD_STATE, 7, hard_state=HardState(3, 1, 2)),
                GroupRecord(KIND_ENTRIES, 7, entries=(Entry(3, 9, group=7),)),
            ],
        )
    with pytest.raises(ValueError, match="another group"):
        wg.write(wal, [GroupRecord(KIND_ENTRIES, 7, entries=(Entry(3, 7),))])
    with pytest.raises(RaftError, match="no log"):
        wg.write(wal, [GroupRecord(KIND_HARD_STATE, 8, hard_state=HardState(1, 0, 0))])
    assert wal.last_seq == before and g.hard_state == HardState()  # nothing of a refused batch happened
    cc = ConfChange(ConfChangeType.ADD_VOTER, 4).encode()
    wg.write(wal, [GroupRecord(KIND_ENTRIES, 7, entries=(Entry(3, 7, EntryType.CONF_CHANGE, cc, 7),))])
    base = g.compaction_base(7)
    assert base == SnapshotMeta(7, 3, ConfState((4,)))
    with pytest.raises(RaftError):
        g.compaction_base(8)
    wg.write(wal, [GroupRecord(KIND_COMPACT, 7, base=SnapshotMeta(5, 3, ConfState()))])
    ref.compact(5)
    assert g.first_index() == 6 and g.term(5) == 3 == ref.term(5)
    with pytest.raises(CompactedError):
        g.entries(5, 7)
    with pytest.raises(UnavailableError):
        g.term(8)
    wal.sync()
    recs: list[tuple[int, bytes]] = []
    Wal.open(fs.crash(CRASH_DROP), WalOptions(segment_bytes=512, max_record_bytes=300), recs)
    again = WalGroups.recover(recs, 1, 300).groups[7]
    assert (again.base, again.ents, again.seqs, again.hard_state) == (g.base, g.ents, g.seqs, g.hard_state)


def test_recovery_refuses_a_group_without_its_reset_and_skips_what_a_reset_or_destroy_replaced() -> None:
    ent = encode(GroupRecord(KIND_ENTRIES, 1, entries=(Entry(1, 1),)), BIG)[0]
    with pytest.raises(StorageError, match="no RESET"):
        WalGroups.recover([(1, ent)], 1, BIG)
    reset = encode(GroupRecord(KIND_RESET, 1, base=SnapshotMeta(10, 2), hard_state=HardState(2, 0, 10)), BIG)[
        0
    ]
    destroy = encode(GroupRecord(KIND_DESTROY, 1), BIG)[0]
    # Entries 1.. before the RESET at 10 would leave a gap if they were replayed after it.
    got = WalGroups.recover([(1, ent), (2, reset)], 1, BIG)
    assert got.groups[1].first_index() == 11 and got.groups[1].last_index() == 10
    assert WalGroups.recover([(1, reset), (2, ent), (3, destroy)], 1, BIG).groups == {}
    # A record below the checkpoint's from_seq is a leftover: never replayed.
    assert WalGroups.recover([(1, reset), (2, destroy)], 2, BIG).groups == {}
    with pytest.raises(StorageError, match="record 3"):
        WalGroups.recover(
            [(2, reset), (3, encode(GroupRecord(KIND_ENTRIES, 1, entries=(Entry(1, 12),)), BIG)[0])], 1, BIG
        )


def test_checkpoints_keep_the_log_bounded_and_a_damaged_checkpoint_file_is_refused() -> None:
    fs = SimFileSystem(random.Random(3))
    opts = WalOptions(segment_bytes=600, max_record_bytes=300)
    rw = RaftWal.open(fs, opts)
    rw.write([GroupRecord(KIND_RESET, g, base=SnapshotMeta(), hard_state=HardState()) for g in (1, 2)])
    most = 0
    for i in range(1, 301):
        g = 1 + i % 2
        idx = rw.groups.groups[g].last_index() + 1
        rw.write(
            [
                GroupRecord(KIND_ENTRIES, g, entries=(Entry(1, idx, data=bytes(40), group=g),)),
                GroupRecord(KIND_HARD_STATE, g, hard_state=HardState(1, 0, idx)),
            ]
        )
        rw.sync()
        if idx > 5:  # the state machine applied (and checkpointed) up to idx - 5
            log = rw.groups.groups[g]
            rw.write([GroupRecord(KIND_COMPACT, g, base=log.compaction_base(idx - 5))])
        if i % 10 == 0:
            rw.checkpoint()
            most = max(most, len(rw.wal.segments()))
    assert 1 < most <= 6, most  # ~300 x 2 x 70 bytes written: 60+ segments without checkpoints
    want = {g: (lg.base, lg.hard_state, lg.ents) for g, lg in rw.groups.groups.items()}
    assert rw.from_seq > 1
    rw.sync()
    fs = fs.crash(CRASH_DROP)
    again = RaftWal.open(fs, opts)
    assert {g: (lg.base, lg.hard_state, lg.ents) for g, lg in again.groups.groups.items()} == want
    again.close()
    f = fs.open(CHECKPOINT_NAME)
    raw = f.read(0, 100)
    f.write_at(9, bytes([raw[9] ^ 1]))
    f.close()
    with pytest.raises(WalCorruptError, match="checkpoint"):
        RaftWal.open(fs, opts)


# --- random runs with crashes -----------------------------------------------------------------------
class _Ref:
    """The reference: MemoryStorage for the entries, the base and hard state beside it."""

    def __init__(self, base: SnapshotMeta, hs: HardState) -> None:
        self.ms = MemoryStorage()
        if base.index:
            self.ms.apply_snapshot(Snapshot(base))
        self.base = base
        self.hs = hs

    def view(self) -> tuple[object, ...]:
        ms = self.ms
        return (
            self.base,
            self.hs,
            ms.first_index(),
            ms.last_index(),
            tuple(ms.entries(ms.first_index(), ms.last_index() + 1)),
        )


def _view(wg: WalGroups) -> dict[int, tuple[object, ...]]:
    out: dict[int, tuple[object, ...]] = {}
    for gid, g in wg.groups.items():
        assert g.term(g.base.index) == g.base.term
        out[gid] = (
            g.base,
            g.hard_state,
            g.first_index(),
            g.last_index(),
            tuple(g.entries(g.first_index(), g.last_index() + 1)),
        )
    return out


def _run(seed: int, mode: str, steps: int) -> int:
    """One random run; returns how many crashes it recovered from."""
    rng = random.Random(seed)
    opts = WalOptions(segment_bytes=400, max_record_bytes=250)
    fs = SimFileSystem(random.Random(seed))
    rw = RaftWal.open(fs, opts)
    wal, wg = rw.wal, rw.groups
    refs: dict[int, _Ref] = {}
    views: dict[int, dict[int, tuple[object, ...]]] = {0: {}}  # last seq -> reference view
    crashes = 0
    acked = 0

    def same_view_up_to_now(prev: int) -> None:
        # A rewrite or checkpoint changes no log: every prefix of its records recovers the same.
        now = {k: v.view() for k, v in refs.items()}
        for q in range(prev + 1, wal.last_seq + 1):
            views[q] = now

    for _ in range(steps):
        op = rng.random()
        gid = rng.randrange(3)
        r = refs.get(gid)
        recs: list[GroupRecord] = []
        if r is None or op < 0.04:
            base = SnapshotMeta(rng.choice([0, rng.randrange(1, 50)]), rng.randrange(0, 4), ConfState((1, 2)))
            recs = [GroupRecord(KIND_RESET, gid, base=base, hard_state=HardState(base.term, 1, base.index))]
        elif op < 0.55:
            last = r.ms.last_index()
            start = rng.randint(max(1, r.ms.first_index() - 2), last + 1)
            term = r.hs.term + rng.randrange(2)
            n = rng.randrange(1, 5)
            data = [rng.randbytes(rng.choice([3, 60, 200])) for _ in range(n)]
            recs = [
                GroupRecord(
                    KIND_ENTRIES,
                    gid,
                    entries=tuple(Entry(term, start + i, EntryType.NORMAL, data[i], gid) for i in range(n)),
                )
            ]
        elif op < 0.75:
            recs = [
                GroupRecord(
                    KIND_HARD_STATE,
                    gid,
                    hard_state=HardState(r.hs.term + 1, rng.randrange(3), r.ms.last_index()),
                )
            ]
        elif op < 0.85 and r.ms.last_index() > r.base.index:
            idx = rng.randint(r.base.index + 1, r.ms.last_index())
            recs = [GroupRecord(KIND_COMPACT, gid, base=wg.groups[gid].compaction_base(idx))]
        elif op < 0.88:
            recs = [GroupRecord(KIND_DESTROY, gid)]
        elif op < 0.92:
            # A checkpoint: restate the groups that pin old segments, sync, save from_seq, drop
            # whole segments below it.
            prev = wal.last_seq
            rw.checkpoint()
            acked = wal.last_seq
            same_view_up_to_now(prev)
            continue
        elif op < 0.94:
            # Rewrites NOT synced (a checkpoint a crash interrupts): a cut rewrite must vanish whole.
            prev = wal.last_seq
            for g in sorted(wg.groups):
                wg.write(wal, wg.rewrite(g))
            same_view_up_to_now(prev)
            continue
        else:
            if rng.random() < 0.6:
                wal.sync()
                acked = wal.last_seq
            if rng.random() < 0.5:
                continue
            # Crash: recovery returns the reference after some prefix that includes every synced record.
            # (`acked`, not `wal.synced_seq`: a segment rotation syncs records no one acknowledged,
            # e.g. the RESET of an unsynced rewrite, which recovery then drops with its pieces.)
            fs = fs.crash(mode)
            crashes += 1
            rw = RaftWal.open(fs, opts)
            wal, wg = rw.wal, rw.groups
            last = wal.last_seq
            assert last >= acked
            assert last in views, (last, sorted(views)[-5:])
            assert _view(wg) == views[last]
            refs = {}
            for gid2, g in wg.groups.items():
                refs[gid2] = _Ref(g.base, g.hard_state)
                if g.ents:
                    refs[gid2].ms.append(list(g.ents))
            views = {k: v for k, v in views.items() if k <= last}
            continue
        for rec in recs:
            # One record per write, so every record boundary has a reference view.
            wg.write(wal, [rec])
            if rec.kind == KIND_RESET:
                assert rec.base is not None and rec.hard_state is not None
                refs[gid] = _Ref(rec.base, rec.hard_state)
            elif rec.kind == KIND_DESTROY:
                refs.pop(gid, None)
            elif rec.kind == KIND_ENTRIES:
                # A split ENTRIES record writes several payloads: views only at its end (a crash
                # keeping part of it is checked by the prefix of its pieces below).
                first = wal.last_seq - len(encode(rec, opts.max_record_bytes)) + 1
                for k, piece in enumerate(encode(rec, opts.max_record_bytes)):
                    refs[gid].ms.append(list(decode(piece).entries))
                    views[first + k] = {k2: v.view() for k2, v in refs.items()}
                continue
            elif rec.kind == KIND_HARD_STATE:
                assert rec.hard_state is not None
                refs[gid].hs = rec.hard_state
            elif rec.kind == KIND_COMPACT:
                assert rec.base is not None
                refs[gid].ms.compact(rec.base.index)
                refs[gid].base = rec.base
            views[wal.last_seq] = {k: v.view() for k, v in refs.items()}
        assert _view(wg) == {k: v.view() for k, v in refs.items()}
    return crashes


@pytest.mark.parametrize("mode", [CRASH_DROP, CRASH_RANDOM, CRASH_REORDER, CRASH_KEEP])
def test_random_runs_recover_exactly_a_prefix_holding_every_synced_record(mode: str) -> None:
    assert sum(_run(seed, mode, 300) for seed in range(8)) >= 8


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1 << 30), st.sampled_from([CRASH_DROP, CRASH_RANDOM, CRASH_REORDER]))
def test_random_runs_hypothesis(seed: int, mode: str) -> None:
    _run(seed, mode, 150)
