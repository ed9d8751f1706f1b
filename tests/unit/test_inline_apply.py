"""A Ready cycle the node runs on its event loop instead of the persist thread (issue 20,
`server/node.py`, `--inline-apply`): one that only applies a few committed entries and waits for
no disk. `NodeStore.waits_for_disk` decides the second half; it must be sound: whenever it says
no, `persist_and_apply` makes no `fdatasync` of the WAL and no LMDB flush (else the event loop
would stall on the disk); and it must say yes for entries, terms, votes, new groups and commit
mode (else the same call would block the loop on a flush).

`--inline-persist N` also runs a cycle with at most N new entries on the loop when its only wait
is the WAL's one `fdatasync` (`NodeStore.flushes_only_log`): never a snapshot, a new group, an
apply flushed in `commit` mode, or a checkpoint made now (those may take far longer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.node.host import Cycle
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.server.node import _applies_here
from kvstore.storage import commands as cmds
from kvstore.storage.lmdb_env import LmdbEnv
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.wal.osfs import OsFile

CONF = ConfState((1,))


class _Flushes:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real_fdatasync, real_sync_all = OsFile.fdatasync, LmdbEnv.sync_all

        def fdatasync(f: OsFile) -> None:
            self.n += 1
            real_fdatasync(f)

        def sync_all(env: LmdbEnv) -> None:
            self.n += 1
            real_sync_all(env)

        monkeypatch.setattr(OsFile, "fdatasync", fdatasync)
        monkeypatch.setattr(LmdbEnv, "sync_all", sync_all)


def _store(path: Path, state_sync: str) -> tuple[LmdbNodeStore, HardState]:
    s = LmdbNodeStore(path, state_sync=state_sync)
    s.bootstrap(1, CONF)
    ls = s.log_storage(1)
    s.persist_and_apply((), [ApplyBatch(1, ls.entries(1, ls.last_index() + 1), CONF)])
    hs = s.log_storage(1).initial_state()[0]
    return s, hs


def _puts(start: int, n: int, term: int) -> list[Entry]:
    return [Entry(term, start + i, EntryType.NORMAL, cmds.encode_put(b"k%d" % i, b"v", 5, start + i, 0), 1)
            for i in range(n)]


def test_what_waits_for_the_disk(tmp_path: Path) -> None:
    s, hs = _store(tmp_path / "a", "checkpoint")
    try:
        last = s.log_storage(1).last_index()
        ents = _puts(last + 1, 2, hs.term)
        moved = HardState(hs.term, hs.vote, hs.commit + 1)
        assert s.waits_for_disk([GroupWrite(1, ents, None)], [])  # entries
        assert s.waits_for_disk([GroupWrite(1, [], HardState(hs.term + 1, 0, hs.commit))], [])  # a term
        assert s.waits_for_disk([GroupWrite(1, [], HardState(hs.term, 3, hs.commit))], [])  # a vote
        assert s.waits_for_disk([GroupWrite(9, [], moved)], [])  # a group with no log yet
        assert not s.waits_for_disk([GroupWrite(1, [], moved)], [])  # only the commit index
        assert not s.waits_for_disk([], [ApplyBatch(1, ents, CONF)])  # an apply: unsynced here
        assert not s.waits_for_disk([GroupWrite(1, [], moved), GroupWrite(1, [], None)], [ApplyBatch(1, ents, CONF)])
        # What may wait for the log's one flush and nothing else (--inline-persist)
        assert s.flushes_only_log([GroupWrite(1, ents, None)], [ApplyBatch(1, ents, CONF)])  # entries, an apply
        assert s.flushes_only_log([GroupWrite(1, [], HardState(hs.term + 1, 0, hs.commit))], [])  # a term
        assert s.flushes_only_log([GroupWrite(1, [], moved)], [])
        assert not s.flushes_only_log([GroupWrite(9, ents, moved)], [])  # a group with no log yet
        s._ckpt_now = True  # a checkpoint forced: made by the next call, synchronously
        assert not s.flushes_only_log([GroupWrite(1, ents, None)], [])
        assert s.waits_for_disk([GroupWrite(1, [], moved)], [])
    finally:
        s.close()
    c, hs = _store(tmp_path / "b", "commit")
    try:
        ents = _puts(2, 1, hs.term)
        assert c.waits_for_disk([], [ApplyBatch(1, ents, CONF)])  # every apply commit flushed
        assert not c.waits_for_disk([GroupWrite(1, [], HardState(hs.term, hs.vote, hs.commit + 1))], [])
        assert not c.flushes_only_log([], [ApplyBatch(1, ents, CONF)])
        assert c.flushes_only_log([GroupWrite(1, ents, None)], [])
    finally:
        c.close()


_STEP = st.tuples(st.integers(0, 3), st.booleans(), st.sampled_from(["same", "term", "vote"]), st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_STEP, min_size=1, max_size=8))
def test_a_cycle_said_not_to_wait_makes_no_flush(tmp_path_factory: pytest.TempPathFactory,
                                                 monkeypatch: pytest.MonkeyPatch, steps: list[Any]) -> None:
    """Random cycles of a leader (entries or none, a commit index that moves or not, a new term or
    vote, the committed entries applied or not): whenever `waits_for_disk` says no, the cycle
    flushes nothing; whenever it writes entries it says yes and flushes once."""
    s, hs = _store(tmp_path_factory.mktemp("s"), "checkpoint")
    flushes = _Flushes(monkeypatch)
    try:
        log = s.log_storage(1)
        applied = log.last_index()
        for n, commit, change, apply in steps:
            last = log.last_index()
            ents = _puts(last + 1, n, hs.term if change != "term" else hs.term + 1)
            term = hs.term + (change == "term")
            vote = {"same": hs.vote, "term": 0, "vote": hs.vote or 1}[change]
            top = last + n
            new_hs = HardState(term, vote, top if commit else hs.commit)
            writes = [GroupWrite(1, ents, new_hs if new_hs != hs else None)]
            if change == "vote" and hs.vote:  # a vote once cast stays in its term
                writes = [GroupWrite(1, ents, HardState(term, hs.vote, new_hs.commit))]
            due = [e for e in log.entries(applied + 1, last + 1) + ents if e.index <= new_hs.commit]
            batches = [ApplyBatch(1, due, CONF)] if apply and due else []
            waits = s.waits_for_disk(writes, batches)
            only_log = s.flushes_only_log(writes, batches)
            before = flushes.n
            s.persist_and_apply(writes, batches)
            if not waits:
                assert flushes.n == before, (writes, batches)
            if ents:
                assert waits and flushes.n == before + 1
            if only_log:
                assert flushes.n <= before + 1  # at most the log's one flush
            hs = log.initial_state()[0]
            if batches:
                applied = batches[-1].entries[-1].index
    finally:
        s.close()


def test_the_loop_runs_only_small_cycles_that_wait_for_nothing(tmp_path: Path) -> None:
    s, hs = _store(tmp_path / "a", "checkpoint")
    try:
        moved = HardState(hs.term, hs.vote, hs.commit + 1)
        ents = _puts(2, 3, hs.term)

        def cycle(writes: list[GroupWrite], applies: list[ApplyBatch]) -> Cycle:
            return Cycle(store=s, turn=None, writes=writes, applies=applies)  # type: ignore[arg-type]

        assert _applies_here(cycle([GroupWrite(1, [], moved)], [ApplyBatch(1, ents, CONF)]), 3)
        assert not _applies_here(cycle([GroupWrite(1, [], moved)], [ApplyBatch(1, ents, CONF)]), 2)  # too many
        assert not _applies_here(cycle([GroupWrite(1, [], moved)], [ApplyBatch(1, ents, CONF)]), 0)  # off
        assert not _applies_here(cycle([GroupWrite(1, ents, moved)], []), 16)  # entries to flush
        # --inline-persist: a few entries whose only wait is the log's flush
        assert _applies_here(cycle([GroupWrite(1, ents, moved)], []), 16, 3)
        assert not _applies_here(cycle([GroupWrite(1, ents, moved)], []), 16, 2)  # too many entries
        assert _applies_here(cycle([GroupWrite(1, ents[:1], moved)], [ApplyBatch(1, ents[:1], CONF)]), 16, 1)
        assert not _applies_here(cycle([GroupWrite(1, ents[:1], moved)], [ApplyBatch(1, ents, CONF)]), 2, 1)  # applies
        assert not _applies_here(cycle([GroupWrite(9, ents[:1], moved)], []), 16, 4)  # a new group
        assert not _applies_here(cycle([GroupWrite(1, ents, moved)], []), 0, 4)  # inline off altogether
    finally:
        s.close()
