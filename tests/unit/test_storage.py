"""kvstore.storage: the LMDB log storage, the KV state machine, snapshots, durability, growth, full disk."""

from __future__ import annotations

import ast
import contextlib
import os
import random
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.raft import (
    CompactedError,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    RaftError,
    Snapshot,
    SnapshotMeta,
    UnavailableError,
)
from kvstore.storage import commands as cmds
from kvstore.storage import raftlog
from kvstore.storage.commands import ApplyResult, Command, Op, decode_command, encode_command
from kvstore.storage.errors import ReadInvalidatedError, SnapshotFormatError, StorageFullError
from kvstore.storage.machine import STALE_REQUEST, DictState, apply_data
from kvstore.storage.snapfile import encode_snapshot
from kvstore.storage.store import ApplyBatch, GroupWrite, NodeStore

ROOT = Path(__file__).resolve().parents[2]
CONF = ConfState((1, 2, 3))


def put(
    index: int, key: bytes, value: bytes, cid: int = 0, seq: int = 0, ack: int = 0, term: int = 1
) -> Entry:
    return Entry(term, index, EntryType.NORMAL, cmds.encode_put(key, value, cid, seq, ack))


def open_store(path: Path, **kw: Any) -> NodeStore:
    kw.setdefault("sync", False)
    return NodeStore(path, **kw)


# =================================================================================================
# LogStorage behaviour, shared between MemoryStorage and GroupLogStorage
# =================================================================================================
class LogAdapter(Protocol):
    group: int

    def storage(self) -> Any: ...
    def append(self, entries: list[Entry]) -> None: ...
    def set_hard_state(self, hs: HardState) -> None: ...
    def compact(self, index: int) -> None: ...
    def install(self, meta: SnapshotMeta) -> None: ...


class MemAdapter:
    def __init__(self, group: int) -> None:
        self.group = group
        self.ms = MemoryStorage()

    def storage(self) -> Any:
        return self.ms

    def append(self, entries: list[Entry]) -> None:
        self.ms.append(entries)

    def set_hard_state(self, hs: HardState) -> None:
        self.ms.set_hard_state(hs)

    def compact(self, index: int) -> None:
        self.ms.compact(index)

    def install(self, meta: SnapshotMeta) -> None:
        self.ms.apply_snapshot(Snapshot(meta))


class LmdbAdapter:
    """Drives a group of a NodeStore like a MemoryStorage (compaction first applies what it needs)."""

    def __init__(self, store: NodeStore, group: int) -> None:
        self.store = store
        self.group = group

    def storage(self) -> Any:
        return self.store.log_storage(self.group)

    def append(self, entries: list[Entry]) -> None:
        self.store.persist([GroupWrite(self.group, entries)])

    def set_hard_state(self, hs: HardState) -> None:
        self.store.persist([GroupWrite(self.group, [], hs)])

    def compact(self, index: int) -> None:
        ls = self.store.log_storage(self.group)
        applied = self.store.applied_index(self.group)
        hi = min(index, ls.last_index())
        if hi > applied:
            self.store.apply([ApplyBatch(self.group, ls.entries(applied + 1, hi + 1), CONF)])
        self.store.compact(self.group, index)

    def install(self, meta: SnapshotMeta) -> None:
        path = self.store.receive_snapshot(self.group, encode_snapshot(self.group, meta, [], 64))
        self.store.persist([GroupWrite(self.group, [], None, meta, path)])
        assert not path.exists()


def ents(g: int, start: int, terms: list[int]) -> list[Entry]:
    return [Entry(t, start + i, EntryType.NORMAL, b"d%d-%d" % (g, start + i), g) for i, t in enumerate(terms)]


def log_scenario(a: LogAdapter, t: int) -> Iterator[None]:
    """MemoryStorage's documented semantics, step by step (yields between steps for interleaving).
    `t` offsets the terms so two groups run with different logs."""
    s = a.storage
    g = a.group
    assert (s().first_index(), s().last_index(), s().term(0)) == (1, 0, 0)
    assert s().entries(1, 1) == []
    with pytest.raises(UnavailableError):
        s().term(1)
    with pytest.raises(UnavailableError):
        s().entries(1, 2)
    yield
    a.append(ents(g, 1, [t + 1, t + 1, t + 2, t + 2, t + 3]))
    yield
    assert (s().first_index(), s().last_index()) == (1, 5)
    assert [s().term(i) for i in range(0, 6)] == [0, t + 1, t + 1, t + 2, t + 2, t + 3]
    assert s().entries(2, 5) == ents(g, 2, [t + 1, t + 2, t + 2])
    size = ents(g, 1, [1])[0].size()
    assert len(s().entries(1, 6, max_size=0)) == 1  # at least one entry
    assert len(s().entries(1, 6, max_size=size * 2)) == 2
    assert len(s().entries(1, 6, max_size=size * 2 + 1)) == 2
    assert len(s().entries(1, 6, max_size=10**9)) == 5
    with pytest.raises(CompactedError):
        s().entries(0, 2)
    with pytest.raises(UnavailableError):
        s().entries(2, 7)
    with pytest.raises(UnavailableError):
        s().term(6)
    yield
    # A conflicting append truncates the suffix.
    a.append(ents(g, 3, [t + 4, t + 4]))
    yield
    assert s().last_index() == 4
    assert [s().term(i) for i in range(1, 5)] == [t + 1, t + 1, t + 4, t + 4]
    assert s().entries(1, 5) == ents(g, 1, [t + 1, t + 1]) + ents(g, 3, [t + 4, t + 4])
    with pytest.raises(RaftError):
        a.append(ents(g, 6, [t + 4]))  # gap
    assert s().last_index() == 4
    a.append(ents(g, 5, [t + 4, t + 5, t + 5]))
    yield
    assert s().last_index() == 7
    a.set_hard_state(HardState(t + 5, 2, 6))
    yield
    assert s().initial_state()[0] == HardState(t + 5, 2, 6)
    a.compact(3)
    yield
    assert (s().first_index(), s().last_index()) == (4, 7)
    assert s().term(3) == t + 4
    with pytest.raises(CompactedError):
        s().term(2)
    with pytest.raises(CompactedError):
        s().entries(3, 5)
    assert s().entries(4, 8) == ents(g, 4, [t + 4, t + 4, t + 5, t + 5])
    a.compact(2)  # already compacted: no-op
    assert s().first_index() == 4
    with pytest.raises(RaftError):
        a.compact(8)
    # Appends of compacted entries are skipped; overlapping ones are trimmed.
    a.append(ents(g, 1, [t + 1, t + 1]))
    assert s().last_index() == 7
    a.append(ents(g, 2, [t + 1, t + 4, t + 4, t + 6]))  # 2..3 compacted, 4 same, 5 conflicts
    yield
    assert s().last_index() == 5
    assert [s().term(i) for i in range(3, 6)] == [t + 4, t + 4, t + 6]
    a.install(SnapshotMeta(20, t + 7, CONF))
    yield
    assert (s().first_index(), s().last_index(), s().term(20)) == (21, 20, t + 7)
    with pytest.raises(CompactedError):
        s().term(19)
    a.append(ents(g, 21, [t + 7]))
    assert s().entries(21, 22) == ents(g, 21, [t + 7])
    assert s().initial_state() == (HardState(t + 5, 2, 6), CONF)


def _run_interleaved(adapters: list[LogAdapter]) -> None:
    gens = [log_scenario(a, 10 * i) for i, a in enumerate(adapters)]
    live = list(gens)
    while live:
        for gen in list(live):
            try:
                next(gen)
            except StopIteration:
                live.remove(gen)


def test_log_scenario_memory_storage() -> None:
    _run_interleaved([MemAdapter(1), MemAdapter(2)])


def test_log_scenario_lmdb_two_groups_interleaved(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n")
    _run_interleaved([LmdbAdapter(store, 1), LmdbAdapter(store, 2)])
    before = {g: _observe(store.log_storage(g)) for g in (1, 2)}
    store.close()
    store = open_store(tmp_path / "n")
    # The commit index (6) is below the applied index (20, the installed snapshot): a commit
    # index moves without a flush, so the store raises it to what LMDB applied when it opens.
    for g, (t, v) in ((1, (5, 2)), (2, (15, 2))):
        f, l_, (_, conf), terms, es = before[g]
        before[g] = (f, l_, (HardState(t, v, 20), conf), terms, es)
    assert {g: _observe(store.log_storage(g)) for g in (1, 2)} == before
    assert store.groups() == [1, 2]
    store.close()


def _observe(s: Any) -> tuple[Any, ...]:
    first, last = s.first_index(), s.last_index()
    terms = []
    for i in range(first - 2, last + 2):
        try:
            terms.append(s.term(i))
        except (CompactedError, UnavailableError) as err:
            terms.append(type(err).__name__)
    return first, last, s.initial_state(), tuple(terms), tuple(s.entries(first, last + 1))


@pytest.mark.parametrize("tail", [512, 3])
def test_log_differential_random_against_memory_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail: int
) -> None:
    """Random appends/truncations/compactions/snapshots/hard states on two interleaved groups of one
    env behave exactly like two MemoryStorages, across reopens; with the default in-memory tail
    of the log, and with a tail of 3 entries (reads then straddle it and the disk)."""
    monkeypatch.setattr(raftlog, "TAIL_ENTRIES", tail)
    rng = random.Random(7)
    store = open_store(tmp_path / "n")
    mems = {1: MemAdapter(1), 2: MemAdapter(2)}
    for step in range(400):
        g = rng.choice((1, 2))
        mem, lm = mems[g], LmdbAdapter(store, g)
        ms = mem.ms
        first, last = ms.first_index(), ms.last_index()
        r = rng.random()
        if r < 0.55:
            # Never truncate applied (committed) entries, as Raft never does.
            lo = max(first, store.applied_index(g) + 1)
            start = rng.randint(lo, last + 1) if rng.random() < 0.97 else last + 2
            prev = ms.term(start - 1) if first - 1 <= start - 1 <= last else 0
            terms, t = [], prev
            for _ in range(rng.randint(1, 5)):
                t += rng.random() < 0.3
                terms.append(t)
            batch = ents(g, start, terms)
            outcome = []
            for a in (mem, lm):
                try:
                    a.append(list(batch))
                    outcome.append(None)
                except RaftError:
                    outcome.append("gap")
            assert outcome[0] == outcome[1]
        elif r < 0.75:
            idx = rng.randint(first - 1, last + (rng.random() < 0.1))
            outcome = []
            for a in (mem, lm):
                try:
                    a.compact(idx)
                    outcome.append(None)
                except RaftError:
                    outcome.append("err")
            assert outcome[0] == outcome[1]
        elif r < 0.85:
            hs = HardState(rng.randint(1, 9), rng.randint(0, 3), rng.randint(0, 9))
            mem.set_hard_state(hs)
            lm.set_hard_state(hs)
        elif r < 0.88:
            meta = SnapshotMeta(
                last + rng.randint(1, 5), (ms.term(last) if last >= first - 1 else 0) + 1, CONF
            )
            mem.install(meta)
            lm.install(meta)
        elif r < 0.90:
            store.close()
            store = open_store(tmp_path / "n")
            for gg, ad in mems.items():  # the store raises a commit index below the applied one
                hs, a = ad.ms.initial_state()[0], store.applied_index(gg)
                if hs.commit < a <= ad.ms.last_index():
                    ad.ms.set_hard_state(HardState(hs.term, hs.vote, a))
        assert _observe(store.log_storage(g)) == _observe(ms), f"step {step}"
        s, m = store.log_storage(g), ms
        for _ in range(3):
            lo = rng.randint(m.first_index() - 1, m.last_index() + 1)
            hi = rng.randint(lo, m.last_index() + 2)
            ms_ = rng.choice((None, 0, 40, 100))
            res = []
            for x in (s, m):
                try:
                    res.append(x.entries(lo, hi, ms_))
                except (CompactedError, UnavailableError) as err:
                    res.append(type(err))
            assert res[0] == res[1], (lo, hi, ms_)
    store.close()


# =================================================================================================
# persist(): atomic across groups, durable
# =================================================================================================
def test_a_failed_cycle_applies_nothing_and_its_retry_applies_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cycle is WAL records + one sync, then the apply transaction. A failure inside the apply
    transaction leaves no applied state anywhere; the logs it persisted stand (what a crash right
    after the sync leaves), and the same call retried gives the same logs and applies once. A gap
    (RaftError) is found before anything is written, in the logs or in LMDB."""
    from kvstore.storage.kvstate import KVState

    store = open_store(tmp_path / "n")
    store.persist([GroupWrite(1, ents(1, 1, [1, 1]), HardState(1, 0, 1)), GroupWrite(2, ents(2, 1, [1]))])
    real = KVState.stage_apply

    def boom(self: KVState, txn: Any, group: int, *rest: Any) -> Any:
        if group == 3:
            raise RuntimeError("simulated failure inside the apply transaction")
        return real(self, txn, group, *rest)

    monkeypatch.setattr(KVState, "stage_apply", boom)
    writes = [
        GroupWrite(1, ents(1, 2, [2, 2, 2]), HardState(2, 1, 3)),
        GroupWrite(2, ents(2, 2, [1]), HardState(1, 0, 2)),
        GroupWrite(3, ents(3, 1, [1]), HardState(1, 0, 1)),
    ]
    applies = [ApplyBatch(1, ents(1, 1, [1]), CONF), ApplyBatch(3, ents(3, 1, [1]), CONF)]
    with pytest.raises(RuntimeError, match="simulated"):
        store.persist_and_apply(writes, applies)
    assert (store.applied_index(1), store.applied_index(3)) == (0, 0)
    persisted = {g: _observe(store.log_storage(g)) for g in (1, 2, 3)}
    assert persisted[1][:3] == (1, 4, (HardState(2, 1, 3), ConfState()))
    monkeypatch.setattr(KVState, "stage_apply", real)
    store.persist_and_apply(writes, applies)
    assert {g: _observe(store.log_storage(g)) for g in (1, 2, 3)} == persisted
    assert (store.applied_index(1), store.applied_index(3)) == (1, 1)
    store.close()
    store = open_store(tmp_path / "n")
    assert {g: _observe(store.log_storage(g)) for g in (1, 2, 3)} == persisted
    assert (store.applied_index(1), store.applied_index(3)) == (1, 1)
    before = {g: _observe(store.log_storage(g)) for g in (1, 2, 3)}
    with pytest.raises(RaftError):  # a gap in one group's entries: the others are not written either
        store.persist([GroupWrite(2, ents(2, 3, [1]), HardState(1, 0, 3)), GroupWrite(1, ents(1, 9, [2]))])
    with pytest.raises(RaftError):  # an apply gap: nothing persisted either
        store.persist_and_apply([GroupWrite(2, ents(2, 3, [1]))], [ApplyBatch(3, ents(3, 3, [1]), CONF)])
    assert {g: _observe(store.log_storage(g)) for g in (1, 2, 3)} == before
    store.close()


def test_bootstrap(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n")
    assert store.groups() == []
    assert store.bootstrap(5, ConfState((1, 2), (3,)))
    assert not store.bootstrap(5, ConfState((9,)))
    ls = store.log_storage(5)
    assert ls is store.log_storage(5)
    assert (ls.first_index(), ls.last_index()) == (1, 3)
    assert ls.initial_state() == (HardState(1, 0, 3), ConfState())
    assert [ConfChange.decode(e.data).node_id for e in ls.entries(1, 4)] == [1, 2, 3]
    store.close()
    store = open_store(tmp_path / "n")
    assert store.groups() == [5]
    assert not store.bootstrap(5, ConfState((9,)))
    store.close()


def test_destroy_group(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n")
    for g in (1, 2):
        store.bootstrap(g, CONF)
        store.apply([ApplyBatch(g, store.log_storage(g).entries(1, 4), CONF)])
        _apply(
            store,
            g,
            [cmds.encode_put(b"k", b"v", 3, 1, 1), ConfChange(ConfChangeType.ADD_VOTER, 9, b"h9").encode()],
            [EntryType.NORMAL, EntryType.CONF_CHANGE],
        )
    before = _observe(store.log_storage(2)), store.scan(2, b"", None, 0), store.applied_index(2)
    store.destroy_group(1)
    assert store.groups() == [2] and store.get(1, b"k") is None and store.applied_index(1) == 0
    assert _observe(store.log_storage(1)) == _observe(MemoryStorage())
    assert (_observe(store.log_storage(2)), store.scan(2, b"", None, 0), store.applied_index(2)) == before
    assert store.members() == {9: "h9"}  # group 2's
    store.close()
    store = open_store(tmp_path / "n")
    assert store.groups() == [2] and store.bootstrap(1, CONF)
    store.close()


CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from kvstore.raft import ConfState, Entry, HardState
    from kvstore.storage import commands
    from kvstore.storage.store import ApplyBatch, GroupWrite, NodeStore

    path, min_acks, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    store = NodeStore(path, sync=True)
    conf = ConfState((1,))
    print("open", flush=True)
    i = 0
    while True:
        i += 1
        groups = (1, 2) if i % 2 else (2, 3)
        ws, bs = [], []
        for g in groups:
            idx = store.log_storage(g).last_index() + 1
            e = Entry(1, idx, data=commands.encode_put(b"k%d" % i, b"v%d" % i, 77, i, i))
            ws.append(GroupWrite(g, [e], HardState(1, 0, idx)))
            bs.append(ApplyBatch(g, [e], conf))
        if i % 3:
            store.persist_and_apply(ws, bs)
        else:
            store.persist(ws)
            store.apply(bs)
        print(i, *groups, flush=True)
        if i == min_acks:  # from now on, die at an arbitrary point (likely inside a write)
            threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    """
)


@pytest.mark.parametrize("delay", [0.01, 0.2])
def test_crash_kill9_keeps_every_acknowledged_write(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "n"
    min_acks = 20
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(path), str(min_acks), str(delay)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == -9, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == "open"
    acked: list[tuple[int, tuple[int, ...]]] = []
    # Only complete lines are acknowledgements (the kill may cut the last print short).
    for line in proc.stdout.split("\n")[1:-1]:
        i, *gs = map(int, line.split())
        acked.append((i, tuple(gs)))
    assert len(acked) >= min_acks
    store = open_store(path)
    for g in (1, 2, 3):
        ls = store.log_storage(g)
        # Each call wrote entry + hard state (+ applied index) together; persist() then apply()
        # may have been cut between the two calls, leaving the last entry to re-apply.
        assert ls.last_index() == store.hard_state(g).commit
        assert store.applied_index(g) in (ls.last_index(), ls.last_index() - 1)
        mine = [i for i, gs in acked if g in gs]
        assert ls.last_index() >= len(mine)
        assert ls.last_index() <= len(mine) + 1  # at most the one in flight at the kill
        for i in mine:
            assert store.get(g, b"k%d" % i) == b"v%d" % i
    # The sessions came back too: re-applying an acknowledged request returns its cached result.
    i, gs = acked[-1]
    g = gs[0]
    nxt = store.applied_index(g) + 1
    e = Entry(1, nxt, data=cmds.encode_put(b"k%d" % i, b"CHANGED", 77, i, i))
    store.persist_and_apply([GroupWrite(g, [e])], [ApplyBatch(g, [e], CONF)])
    assert store.get(g, b"k%d" % i) == b"v%d" % i
    store.close()


# =================================================================================================
# apply(): semantics, atomicity, exactly-once
# =================================================================================================
def _apply(store: NodeStore, g: int, datas: list[bytes], types: list[EntryType] | None = None) -> list[Any]:
    start = store.applied_index(g) + 1
    es = [Entry(1, start + i, (types or [EntryType.NORMAL] * len(datas))[i], d) for i, d in enumerate(datas)]
    store.persist([GroupWrite(g, es)])
    return store.apply([ApplyBatch(g, es, CONF)])[0]


def test_apply_put_delete_cas_results(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n")
    r = _apply(
        store,
        1,
        [
            cmds.encode_put(b"a", b"1"),
            cmds.encode_cas(b"a", False, b"1", b"2"),  # swap
            cmds.encode_cas(b"a", False, b"1", b"3"),  # no swap: current 2
            cmds.encode_cas(b"a", True, b"", b"4"),  # expect absent: present -> no swap
            cmds.encode_cas(b"b", True, b"", b"5"),  # absent -> swap
            cmds.encode_cas(b"c", False, b"x", b"6"),  # absent, expected x -> no swap, not found
            cmds.encode_delete(b"a"),
            cmds.encode_delete(b"a"),
            b"",  # empty entry (a new leader's)
            b"\x07garbage",
        ],
    )
    assert r[0] == ApplyResult()
    assert r[1] == ApplyResult(swapped=True, found=True)
    assert r[2] == ApplyResult(found=True, current=b"2")
    assert r[3] == ApplyResult(found=True, current=b"2")
    assert r[4] == ApplyResult(swapped=True, found=False)
    assert r[5] == ApplyResult(found=False)
    assert r[6] == ApplyResult(existed=True) and r[7] == ApplyResult(existed=False)
    assert r[8] is None
    assert r[9] is not None and r[9].error is not None and "malformed command" in r[9].error
    assert store.get(1, b"a") is None and store.get(1, b"b") == b"5" and store.get(1, b"c") is None
    assert store.applied_index(1) == 10
    # Conf changes only advance the applied index (and remember member addresses).
    cc = ConfChange(ConfChangeType.ADD_VOTER, 4, b"10.0.0.4:7000").encode()
    assert _apply(store, 1, [cc], [EntryType.CONF_CHANGE]) == [None]
    assert store.applied_index(1) == 11 and store.members() == {4: "10.0.0.4:7000"}
    _apply(store, 1, [ConfChange(ConfChangeType.REMOVE_NODE, 4).encode()], [EntryType.CONF_CHANGE])
    assert store.members() == {}
    # scan
    _apply(store, 1, [cmds.encode_put(b"k%02d" % i, b"v%d" % i) for i in range(20)])
    _apply(store, 2, [cmds.encode_put(b"k05", b"other group")])
    assert store.scan(1, b"k05", b"k08", 0) == [(b"k05", b"v5"), (b"k06", b"v6"), (b"k07", b"v7")]
    assert len(store.scan(1, b"k", None, 0)) == 20 and len(store.scan(1, b"", None, 3)) == 3
    assert store.scan(1, b"k08", b"k05", 0) == []
    assert store.scan(2, b"", None, 0) == [(b"k05", b"other group")]
    chunks = list(store.scan_chunks(1, b"k", None, 0, chunk_items=6))
    assert [len(c) for c in chunks] == [6, 6, 6, 2]
    assert [kv for c in chunks for kv in c][:2] == [(b"k00", b"v0"), (b"k01", b"v1")]
    assert sum(len(c) for c in store.scan_chunks(1, b"", None, 7, chunk_items=3)) == 7
    store.close()


def test_scan_chunks_is_one_consistent_view(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n")
    _apply(store, 1, [cmds.encode_put(b"k%03d" % i, b"old") for i in range(100)])
    it = iter(store.scan_chunks(1, b"", None, 0, chunk_items=10))
    first = next(it)
    _apply(store, 1, [cmds.encode_put(b"k%03d" % i, b"new") for i in range(100)])
    rest = [kv for c in it for kv in c]
    assert {v for _, v in first + rest} == {b"old"} and len(first + rest) == 100
    store.close()


def test_applied_index_moves_with_data_in_one_txn(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n")
    _apply(store, 1, [cmds.encode_put(b"a", b"1")])
    _apply(store, 2, [cmds.encode_put(b"b", b"1")])
    good = ApplyBatch(1, [put(2, b"a", b"2"), put(3, b"x", b"x")], CONF)
    gap = ApplyBatch(2, [put(5, b"b", b"2")], CONF)  # entry 2..4 missing
    with pytest.raises(RaftError, match="lost"):
        store.apply([good, gap])
    assert (store.applied_index(1), store.get(1, b"a"), store.get(1, b"x")) == (1, b"1", None)
    store.close()
    store = open_store(tmp_path / "n")
    assert (store.applied_index(1), store.get(1, b"a"), store.get(1, b"x")) == (1, b"1", None)
    # Already-applied entries are never applied twice.
    assert store.apply([ApplyBatch(1, [put(1, b"a", b"again"), put(2, b"a", b"2")], CONF)]) == [
        [None, ApplyResult()]
    ]
    assert store.get(1, b"a") == b"2" and store.applied_index(1) == 2
    assert store.applied_conf_state(1) == CONF
    store.close()


def test_exactly_once_sessions(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n")
    r = _apply(
        store,
        1,
        [
            cmds.encode_cas(b"k", True, b"", b"v1", 9, 1, 1),
            cmds.encode_put(b"k", b"v2", 9, 2, 1),
            cmds.encode_cas(b"k", True, b"", b"v1", 9, 1, 1),  # retry of seq 1 in a later entry
        ],
    )
    assert r[0] == ApplyResult(swapped=True) and r[2] == r[0]  # cached result, not re-executed
    assert store.get(1, b"k") == b"v2"
    # Another client and client 0 (no session) are independent.
    r = _apply(store, 1, [cmds.encode_put(b"k", b"x", 10, 1, 1), cmds.encode_put(b"k", b"v2")])
    assert r == [ApplyResult(), ApplyResult()]
    # Client 9: head row + results of seq 1 and 2; client 10: head row + seq 1; the meta row.
    assert store.stats()["rows"]["sessions"] == 3 + 2 + 1
    # ack=3 says the replies for seq 1 and 2 arrived: their rows are garbage-collected.
    r = _apply(store, 1, [cmds.encode_put(b"j", b"1", 9, 3, 3)])
    assert store.stats()["rows"]["sessions"] == 2 + 2 + 1
    # A delayed duplicate of an acknowledged request is refused, not re-applied.
    r = _apply(
        store, 1, [cmds.encode_cas(b"k", True, b"", b"v1", 9, 1, 1), cmds.encode_delete(b"k", 9, 2, 1)]
    )
    assert r[0] is not None and r[0].error == STALE_REQUEST and r[1] == r[0]
    assert store.get(1, b"k") == b"v2"
    # Sessions survive a restart.
    store.close()
    store = open_store(tmp_path / "n")
    assert _apply(store, 1, [cmds.encode_put(b"j", b"changed", 9, 3, 3)]) == [ApplyResult()]
    assert store.get(1, b"j") == b"1"
    store.close()


def test_lmdb_apply_matches_pure_machine(tmp_path: Path) -> None:
    """The LMDB state machine and the pure DictState agree on every result and on the final data."""
    rng = random.Random(3)
    store = open_store(tmp_path / "n")
    ref = DictState()
    seqs = {1: 0, 2: 0}
    history: list[bytes] = []
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, 8)):
            if history and rng.random() < 0.15:
                batch.append(rng.choice(history))  # a retry
                continue
            key = b"k%d" % rng.randint(0, 5)
            cid = rng.choice((0, 1, 2))
            seq = 0
            if cid:
                seqs[cid] += 1
                seq = seqs[cid]
            ack = rng.randint(max(seq - 3, 0), seq) if cid else 0
            kind = rng.randrange(4)
            if kind == 0:
                data = cmds.encode_put(key, b"%d" % rng.randint(0, 3), cid, seq, ack)
            elif kind == 1:
                data = cmds.encode_delete(key, cid, seq, ack)
            else:
                absent = kind == 3 and rng.random() < 0.5
                exp = b"" if absent else b"%d" % rng.randint(0, 3)
                data = cmds.encode_cas(key, absent, exp, b"%d" % rng.randint(0, 3), cid, seq, ack)
            history.append(data)
            batch.append(data)
        got = _apply(store, 1, batch)
        want = [apply_data(ref, d) for d in batch]
        assert got == want
    assert dict(store.scan(1, b"", None, 0)) == ref.data
    store.close()


# =================================================================================================
# Snapshots
# =================================================================================================
def _fill(store: NodeStore, g: int, n: int, tag: bytes, value_size: int = 100) -> None:
    for lo in range(0, n, 500):
        _apply(
            store,
            g,
            [
                cmds.encode_put(b"key%06d" % i, tag * value_size, 5, i + 1, i)
                for i in range(lo, min(n, lo + 500))
            ],
        )


def test_snapshot_transfer_between_nodes(tmp_path: Path) -> None:
    n1 = open_store(tmp_path / "n1", snapshot_chunk_size=4096)
    n2 = open_store(tmp_path / "n2", snapshot_chunk_size=4096)
    _fill(n1, 1, 2000, b"a")
    cc = ConfChange(ConfChangeType.ADD_LEARNER, 4, b"host4:1").encode()
    _apply(
        n1,
        1,
        [cc, cmds.encode_cas(b"key000001", False, b"nope", b"x", 6, 1, 1)],
        [EntryType.CONF_CHANGE, EntryType.NORMAL],
    )
    n1.compact(1, n1.applied_index(1) - 3)
    # Node 2: stale state of group 1 (must disappear) and a group 2 (must stay untouched).
    _fill(n2, 1, 10, b"z")
    _apply(n2, 1, [cmds.encode_put(b"only-on-n2", b"x", 8, 1, 1)])
    _fill(n2, 2, 300, b"b")
    g2_before = (n2.scan(2, b"", None, 0), n2.applied_index(2), _observe(n2.log_storage(2)))

    meta, chunks = n1.snapshot_chunks(1)
    assert meta.index == n1.applied_index(1) and meta.term == n1.log_storage(1).term(meta.index)
    assert meta.conf_state == CONF
    sizes: list[int] = []

    def counted() -> Iterator[bytes]:
        for c in chunks:
            sizes.append(len(c))
            yield c

    path = n2.receive_snapshot(1, counted())
    assert len(sizes) > 50 and max(sizes) <= 4096
    assert path.exists() and path.parent == tmp_path / "n2" / "snapshots"
    assert n2.snapshot_file_header(path).meta == meta
    hs = HardState(meta.term, 0, meta.index)
    n2.persist([GroupWrite(1, [], hs, meta, path)])
    assert not path.exists()

    def image(store: NodeStore) -> bytes:
        m, cs = store.snapshot_chunks(1)
        return repr(m).encode() + b"".join(cs)

    assert image(n2) == image(n1)  # identical data, sessions and members, same meta
    assert n2.applied_index(1) == meta.index and n2.members() == {4: "host4:1"}
    ls = n2.log_storage(1)
    assert (ls.first_index(), ls.last_index(), ls.term(meta.index)) == (meta.index + 1, meta.index, meta.term)
    assert ls.initial_state() == (hs, CONF)
    assert n2.get(1, b"only-on-n2") is None
    assert (n2.scan(2, b"", None, 0), n2.applied_index(2), _observe(n2.log_storage(2))) == g2_before
    # Sessions came along: a retry of a request applied on node 1 returns its cached result.
    r = n2.persist_and_apply(
        [GroupWrite(1, [e := put(meta.index + 1, b"key000001", b"retry", 6, 1, 1)])],
        [ApplyBatch(1, [e], CONF)],
    )
    assert r == [[ApplyResult(found=True, current=b"a" * 100)]]
    n2.close()
    n2 = open_store(tmp_path / "n2")
    assert n2.applied_index(1) == meta.index + 1 and n2.log_storage(1).first_index() == meta.index + 1
    n1.close()
    n2.close()


def test_snapshot_memory_is_bounded(tmp_path: Path) -> None:
    n1 = open_store(tmp_path / "n1", snapshot_chunk_size=32 << 10)
    n2 = open_store(tmp_path / "n2", snapshot_chunk_size=32 << 10)
    _fill(n1, 1, 4000, b"m", value_size=1000)  # ~4 MB
    tracemalloc.start()
    try:
        meta, chunks = n1.snapshot_chunks(1)
        path = n2.receive_snapshot(1, chunks)
        _, peak_out = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        n2.persist([GroupWrite(1, [], None, meta, path)])
        _, peak_in = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_out < 1 << 20 and peak_in < 1 << 20, (peak_out, peak_in)
    assert n2.scan(1, b"key003999", None, 0) == [(b"key003999", b"m" * 1000)]
    n1.close()
    n2.close()


def test_corrupt_or_mismatched_snapshot_installs_nothing(tmp_path: Path) -> None:
    n1 = open_store(tmp_path / "n1", snapshot_chunk_size=1024)
    n2 = open_store(tmp_path / "n2")
    _fill(n1, 1, 200, b"a")
    _fill(n2, 1, 5, b"z")
    before = n2.scan(1, b"", None, 0), n2.applied_index(1), _observe(n2.log_storage(1))
    meta, chunks = n1.snapshot_chunks(1)
    data = bytearray(b"".join(chunks))
    data[data.index(b"a" * 100, len(data) // 2) + 50] ^= 0xFF  # inside a value: only the checksum sees it
    path = n2.receive_snapshot(1, [bytes(data)])
    with pytest.raises(SnapshotFormatError, match="checksum"):
        n2.persist([GroupWrite(1, [], None, meta, path)])
    path = n2.receive_snapshot(1, [bytes(data[: len(data) // 2])])
    with pytest.raises(SnapshotFormatError, match="truncated"):
        n2.persist([GroupWrite(1, [], None, meta, path)])
    meta2, chunks2 = n1.snapshot_chunks(1)
    path = n2.receive_snapshot(1, chunks2)
    with pytest.raises(SnapshotFormatError, match="installed as index"):
        n2.persist([GroupWrite(1, [], None, SnapshotMeta(meta2.index + 1, meta2.term, CONF), path)])
    assert (n2.scan(1, b"", None, 0), n2.applied_index(1), _observe(n2.log_storage(1))) == before
    # A snapshot not newer than the applied state is superseded: ignored, its file removed.
    m_old, c_old = n2.snapshot_chunks(1)
    path = n2.receive_snapshot(1, c_old)
    n2.persist([GroupWrite(1, [], None, m_old, path)])
    assert not path.exists() and n2.applied_index(1) == before[1]
    n1.close()
    n2.close()


# =================================================================================================
# Map growth
# =================================================================================================
def test_map_grows_instead_of_failing(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n", map_size=1 << 20)
    # One transaction far larger than the map: MapFullError, grow, retry.
    big = [put(i + 1, b"big%03d" % i, bytes([i % 251]) * 30_000) for i in range(100)]
    store.persist_and_apply([GroupWrite(1, big)], [ApplyBatch(1, big, CONF)])
    # Then 20 MiB more in many transactions.
    value = b"v" * 10_000
    idx = 100
    for b in range(20):
        batch = [put(idx + i + 1, b"k%02d-%03d" % (b, i), value) for i in range(100)]
        idx += 100
        store.persist_and_apply([GroupWrite(1, batch)], [ApplyBatch(1, batch, CONF)])
    assert store.stats()["map_grow_count"] >= 4 and store.disk_usage()["map_size"] > 40 << 20
    store.close()
    store = open_store(tmp_path / "n", map_size=1 << 20)
    assert store.get(1, b"big042") == bytes([42]) * 30_000
    assert len(store.scan(1, b"k", None, 0)) == 2000 and store.get(1, b"k19-099") == value
    assert (
        store.applied_index(1) == 2100 and store.log_storage(1).entries(2100, 2101)[0].data == batch[-1].data
    )
    store.close()


def test_map_growth_cuts_off_open_streams_cleanly(tmp_path: Path) -> None:
    store = open_store(tmp_path / "n", map_size=1 << 20)
    _apply(store, 1, [cmds.encode_put(b"a%03d" % i, b"x") for i in range(100)])
    stream = store.scan_chunks(1, b"", None, 0, chunk_items=10)
    assert len(next(stream)) == 10
    _apply(store, 1, [cmds.encode_put(b"b%03d" % i, b"y" * 20_000) for i in range(100)])  # forces growth
    with pytest.raises(ReadInvalidatedError, match="retry"):
        next(stream)
    assert len(store.scan(1, b"a", b"b", 0)) == 100  # a new read works
    store.close()


# =================================================================================================
# Full disk
# =================================================================================================
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None,
    reason="needs root to mount a small tmpfs (CI runs as root)",
)
def test_full_disk_raises_storage_full_and_loses_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        store = NodeStore(fs / "db", sync=True, wal_segment_bytes=256 << 10)
        store.bootstrap(1, CONF)
        store.apply([ApplyBatch(1, store.log_storage(1).entries(1, 4), CONF)])
        acked = 0
        value = b"x" * 1000
        with pytest.raises(StorageFullError) as info:
            for _ in range(1000):
                idx = store.log_storage(1).last_index()
                batch = [put(idx + i + 1, b"k%06d" % (acked + i), value) for i in range(50)]
                store.persist_and_apply(
                    [GroupWrite(1, batch, HardState(1, 0, idx + 50))], [ApplyBatch(1, batch, CONF)]
                )
                acked += 50
        msg = str(info.value).lower()
        assert "storage full" in msg and "no space left" in msg
        assert store.full and acked > 100
        # Nothing of the failed cycle was applied; its entries may have reached the log (the WAL
        # step comes first: harmless, a retry writes them again).
        applied = store.applied_index(1)
        assert applied == 3 + acked and store.log_storage(1).last_index() in (applied, applied + 50)
        assert store.get(1, b"k%06d" % (acked - 1)) == value and store.get(1, b"k%06d" % acked) is None
        # The environment is still usable.
        assert len(store.scan(1, b"k", None, 0)) == acked
        store.close()
        store = NodeStore(fs / "db", sync=True, wal_segment_bytes=256 << 10)
        assert not store.full
        assert store.applied_index(1) == applied and store.log_storage(1).last_index() >= applied
        assert len(store.scan(1, b"k", None, 0)) == acked
        assert store.get(1, b"k%06d" % (acked - 1)) == value
        # Receiving a snapshot onto the full disk fails the same way, leaving no file behind.
        with pytest.raises(StorageFullError):
            store.receive_snapshot(1, (b"s" * 65536 for _ in range(200)))
        assert store.full and not list(fs.rglob("recv-*"))
        store.close()


# =================================================================================================
# Commands
# =================================================================================================
u64 = st.integers(0, (1 << 64) - 1)
keys = st.binary(max_size=cmds.MAX_KEY_SIZE)
commands_st = st.one_of(
    st.builds(Command.put, keys, st.binary(max_size=300), u64, u64, u64),
    st.builds(Command.delete, keys, u64, u64, u64),
    st.builds(
        lambda k, absent, exp, v, c, s, a: Command.cas(k, absent, b"" if absent else exp, v, c, s, a),
        keys,
        st.booleans(),
        st.binary(max_size=300),
        st.binary(max_size=300),
        u64,
        u64,
        u64,
    ),
)


@settings(max_examples=300, deadline=None)
@given(commands_st)
def test_command_round_trip(cmd: Command) -> None:
    assert decode_command(encode_command(cmd)) == cmd


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.binary(max_size=50)),
    st.one_of(st.none(), st.text(max_size=30)),
)
def test_result_round_trip(
    swapped: bool, found: bool, existed: bool, current: bytes | None, error: str | None
) -> None:
    r = ApplyResult(swapped, found, existed, current, error)
    assert cmds.decode_result(cmds.encode_result(r)) == r


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_decoding_garbage_raises_value_error_only(data: bytes) -> None:
    try:
        cmd = decode_command(data)
    except ValueError:
        return
    assert encode_command(cmd) == data  # whatever decodes is canonical
    with contextlib.suppress(ValueError):
        cmds.decode_result(data)


def test_garbage_messages_are_clear() -> None:
    good = cmds.encode_delete(b"key", 1, 2, 3)
    cases = {
        b"": "too short",
        b"\x09" + good[1:]: "format version 9",
        good[:1] + b"\x1f" + good[2:]: "unknown command op 31",
        good[:-1]: "truncated",
        good + b"x": "trailing",
        cmds.encode_put(b"k", b"v")[:45]: "truncated",
    }
    for data, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            decode_command(data)
    with pytest.raises(ValueError, match="exceeds the maximum"):
        encode_command(Command.put(b"k" * (cmds.MAX_KEY_SIZE + 1), b""))
    with pytest.raises(ValueError, match="expect_absent"):
        encode_command(Command(Op.CAS, b"k", b"v", b"e", True))
    assert decode_command(good) == Command.delete(b"key", 1, 2, 3)


PURE = [
    "storage/commands.py", "storage/machine.py", "storage/shardcmd.py", "shard/ranges.py", "storage/mvcc.py",
    "storage/mvcc_mem.py", "storage/txn.py", "storage/keylimit.py", "storage/xtxn.py", "storage/xtxn_apply.py", "storage/leases.py",
]


def test_pure_modules_import_only_the_standard_library() -> None:
    base = ROOT / "kvstore"
    for name in PURE:
        here = (base / name).parent
        for node in ast.walk(ast.parse((base / name).read_text())):
            mods: list[str] = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    target = here.parents[node.level - 2] if node.level > 1 else here
                    names = [node.module.replace(".", "/")] if node.module else [a.name for a in node.names]
                    for mod_path in names:
                        rel = (target / f"{mod_path}.py").relative_to(base)
                        assert str(rel) in PURE, f"{name} imports {rel}, which is not pure"
                    continue
                mods = [node.module or ""]
            for mod in mods:
                top = mod.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", f"{name} imports {mod}"
                assert top not in {"os", "time", "random", "socket", "asyncio", "threading"}, f"{name}: {mod}"
    # And importing them does not drag LMDB in (the package __init__ is lazy).
    code = "import sys, kvstore.storage.commands, kvstore.storage.machine; assert 'lmdb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
