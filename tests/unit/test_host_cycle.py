"""The host's Ready cycle with a real LMDB store: when waiting writes are answered."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore import errors
from kvstore.node.host import Host, RaftSettings
from kvstore.raft import ConfState, Message, Role
from kvstore.storage import commands
from kvstore.storage.errors import StorageFullError
from kvstore.storage.store import LmdbNodeStore as NodeStore
from kvstore.storage.wal import OsFileSystem
from kvstore.storage.wal.osfs import OsFile


def _single_voter(tmp_path: Path) -> tuple[Host, NodeStore]:
    store = NodeStore(tmp_path / "n1", sync=True, wal_fs=_FullDiskFs(tmp_path / "n1" / "wal"))
    sent: list[Message] = []
    host = Host(1, store, sent.extend, RaftSettings(), random.Random(1))
    host.open_group(1, ConfState((1,)))
    host.groups[1].core.campaign()
    while host.has_work():
        host.run_cycle()
    assert host.groups[1].core.role == Role.LEADER
    return host, store


class _FullDiskFs(OsFileSystem):
    """The WAL's directory: its next `fail_writes` writes fail with ENOSPC (one per attempt of a
    cycle: the failed write poisons the log, which the store reopens before the next attempt)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail_writes = 0
        self.failed = 0

    def open(self, name: str, *, create: bool = False) -> _FullDiskFile:
        f = super().open(name, create=create)
        return _FullDiskFile(f._fd, f.name, self)


class _FullDiskFile(OsFile):
    __slots__ = ("fs",)

    def __init__(self, fd: int, name: str, fs: _FullDiskFs) -> None:
        super().__init__(fd, name)
        self.fs = fs

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        fs = self.fs
        if fs.fail_writes > 0:
            fs.fail_writes -= 1
            fs.failed += 1
            raise OSError(errno.ENOSPC, "injected: no space left on device")
        super().write_at(offset, data)


def test_a_write_is_answered_from_inside_its_apply_transaction_and_only_once(tmp_path: Path) -> None:
    """The answer comes as soon as the state machine computed the result, before the transaction
    commits (the entry is committed already, so the outcome is decided); reads cannot see the
    write before then either, because the applied index moves only after the commit."""
    host, store = _single_voter(tmp_path)
    try:
        answers: list[tuple[object, object, int]] = []

        def answered(res: object, err: object) -> None:
            answers.append((res, err, store.applied_index(1)))

        before = store.applied_index(1)
        idx = host.propose(1, commands.encode_cas(b"k", True, b"", b"v", 7, 1, 1), answered)
        cycle = host.begin_cycle()
        assert cycle is not None and not cycle.applies  # first the entry is made durable
        cycle.persist()
        host.end_cycle(cycle)
        assert answers == []
        cycle = host.begin_cycle()
        assert cycle is not None and [e.index for a in cycle.applies for e in a.entries] == [idx]
        cycle.on_applied = host.answer_writes
        cycle.persist()
        assert len(answers) == 1
        res, err, applied_then = answers[0]
        assert err is None and getattr(res, "swapped", None) is True
        assert applied_then == before  # answered before its transaction committed
        host.end_cycle(cycle)
        assert len(answers) == 1  # end_cycle does not answer it again
        assert store.applied_index(1) == idx and host.groups[1].core.applied == idx
        assert store.get(1, b"k") == b"v"
    finally:
        store.close()


def test_without_an_early_hook_end_cycle_answers(tmp_path: Path) -> None:
    host, store = _single_voter(tmp_path)
    try:
        answers: list[object] = []
        idx = host.propose(1, commands.encode_put(b"a", b"1"), lambda r, e: answers.append(e))
        while host.has_work():
            host.run_cycle()
        assert answers == [None] and store.applied_index(1) == idx
    finally:
        store.close()


def test_propose_many_appends_in_order_and_answers_each_write(tmp_path: Path) -> None:
    host, store = _single_voter(tmp_path)
    try:
        answers: list[tuple[int, Any, Any]] = []

        def cb(i: int) -> Callable[[Any, Any], None]:
            return lambda r, e: answers.append((i, r, e))

        datas = [
            commands.encode_cas(b"k", True, b"", b"1", 7, 1, 1),   # swaps: absent
            commands.encode_cas(b"k", True, b"", b"2", 7, 2, 2),   # after it, in order: k is present
            commands.encode_put(b"j", b"x"),
        ]
        before = store.log_storage(1).last_index()
        last = host.propose_many(1, datas, [cb(0), cb(1), cb(2)])
        assert last == before + 3
        while host.has_work():
            host.run_cycle()
        assert [i for i, _, _ in answers] == [0, 1, 2] and all(e is None for _, _, e in answers)
        assert answers[0][1].swapped and not answers[1][1].swapped and answers[2][1].revision > 0
        assert [answers[i][1].index for i in range(3)] == [before + 1, before + 2, before + 3]
        assert store.get(1, b"k") == b"1" and store.get(1, b"j") == b"x"
        with pytest.raises(ValueError):
            host.propose_many(1, datas, [cb(0)])
        with pytest.raises(ValueError):
            host.propose_many(1, [], [])
        assert store.log_storage(1).last_index() == last  # refused: nothing appended
    finally:
        store.close()


def test_propose_many_on_a_non_leader_refuses_all_definitely_and_appends_nothing(tmp_path: Path) -> None:
    store = NodeStore(tmp_path / "n2", sync=False)
    try:
        host = Host(2, store, lambda ms: None, RaftSettings(), random.Random(2))
        host.open_group(1, ConfState((1, 2, 3)))
        before = store.log_storage(1).last_index()
        answers: list[object] = []
        with pytest.raises((errors.NotLeader, errors.NoLeader)) as info:
            host.propose_many(1, [commands.encode_put(b"a", b"1"), commands.encode_put(b"b", b"2")],
                              [lambda r, e: answers.append(e), lambda r, e: answers.append(e)])
        assert not info.value.indeterminate
        while host.has_work():
            host.run_cycle()
        assert store.log_storage(1).last_index() == before and answers == [] and not host.groups[1].writes
    finally:
        store.close()


class _FullDisk:
    """The store's disk fills (`arm`): the next `n` attempts of one step fail as a full disk
    does: the WAL's write of a cycle's records ("wal"), or LMDB's apply transaction ("lmdb": run
    in full, then its commit fails; aborted, nothing of it stays)."""

    def __init__(self, store: NodeStore) -> None:
        self.env = store._env
        fs = store._wal._fs
        assert isinstance(fs, _FullDiskFs)
        self.fs = fs
        self.real_write = self.env.write
        self.left = 0
        self.lmdb_failed = 0
        self.env.write = self.write  # type: ignore[method-assign]

    def arm(self, n: int, target: str) -> None:
        if target == "wal":
            self.fs.fail_writes = n
        else:
            self.left = n

    @property
    def failed(self) -> int:
        return self.lmdb_failed + self.fs.failed

    def write(self, fn: Callable[[Any], Any]) -> Any:
        if self.left <= 0:
            return self.real_write(fn)
        self.left -= 1
        self.lmdb_failed += 1

        def failing(txn: Any) -> Any:
            fn(txn)  # everything staged, then the commit fails
            raise StorageFullError("injected: no space left on device")

        return self.real_write(failing)


def _retry_until_resumed(host: Host, disk: _FullDisk, clock: list[float]) -> int:
    """Drive the failed host the way node.py's Ready loop does: retry the failed cycle whenever
    one is due, one simulated tick apart. Returns the number of retries."""
    retries = 0
    for _ in range(1000):
        if host.failed is None:
            return retries
        clock[0] += host.settings.tick_ms / 1000
        assert host.begin_cycle() is None  # no new cycle while storage is failed
        cycle = host.retry_cycle(clock[0])
        if cycle is None:
            continue
        retries += 1
        cycle.persist()
        host.end_cycle(cycle)
    raise AssertionError("the host never resumed")


def test_a_cycle_that_failed_on_a_full_disk_is_retried_until_it_persists(tmp_path: Path) -> None:
    """Persist fails (full disk) three times, then succeeds: the host refuses work meanwhile with
    definite errors, fails the waiting write as INDETERMINATE (it is committed on recovery, once),
    then resumes without a restart; nothing is lost, nothing applied twice."""
    host, store = _single_voter(tmp_path)
    disk = _FullDisk(store)
    clock = [0.0]
    try:
        answers: list[tuple[Any, Any]] = []
        idx = host.propose(1, commands.encode_cas(b"k", True, b"", b"v1", 7, 1, 1), lambda r, e: answers.append((r, e)))
        disk.arm(3, "wal")
        cycle = host.begin_cycle()
        assert cycle is not None and cycle.writes  # the entry, to be made durable
        cycle.persist()
        host.end_cycle(cycle)
        assert host.failed is not None and disk.failed == 1
        [(res, err)] = answers
        assert res is None and isinstance(err, errors.InternalError) and err.indeterminate
        with pytest.raises(errors.StorageFull) as full:
            host.propose(1, commands.encode_put(b"x", b"1"), lambda r, e: None)
        assert full.value.definite
        with pytest.raises(errors.StorageFull):
            host.read(1, lambda i, e: None)
        retry = host.retry_cycle(clock[0])  # the first retry is due at once: the same cycle
        assert retry is cycle
        retry.persist()
        host.end_cycle(retry)
        assert host.failed is not None and disk.failed == 2
        assert host.retry_cycle(clock[0]) is None  # the next one only after the backoff
        assert _retry_until_resumed(host, disk, clock) == 2 and disk.failed == 3
        while host.has_work():
            host.run_cycle()
        assert store.get(1, b"k") == b"v1"
        assert store.applied_index(1) == host.groups[1].core.applied >= idx
        assert store.log_storage(1).last_index() == host.groups[1].core.log.last_index()
        # The client's retry of the indeterminate write (same session) gets the result it had.
        again: list[tuple[Any, Any]] = []
        host.propose(1, commands.encode_cas(b"k", True, b"", b"v1", 7, 1, 1), lambda r, e: again.append((r, e)))
        while host.has_work():
            host.run_cycle()
        [(res, err)] = again
        assert err is None and res.swapped

        # A failure of the APPLY transaction, with the write answered early from inside it.
        answers.clear()
        idx2 = host.propose(1, commands.encode_cas(b"k", False, b"v1", b"v2", 7, 2, 2), lambda r, e: answers.append((r, e)))
        cycle = host.begin_cycle()
        assert cycle is not None
        cycle.persist()
        host.end_cycle(cycle)  # the entry is durable and committed (one voter)
        cycle = host.begin_cycle()
        assert cycle is not None and [e.index for a in cycle.applies for e in a.entries] == [idx2]
        cycle.on_applied = host.answer_writes
        disk.arm(1, "lmdb")
        cycle.persist()
        host.end_cycle(cycle)
        assert host.failed is not None and store.get(1, b"k") == b"v1"  # the apply was aborted
        assert len(answers) == 1 and answers[0][1] is None and answers[0][0].swapped  # decided
        assert _retry_until_resumed(host, disk, clock) == 1
        assert len(answers) == 1  # not answered twice
        assert store.get(1, b"k") == b"v2" and store.applied_index(1) == idx2
        # Applied once: the CAS from v1 would fail now, and the session still has its result.
        late: list[tuple[Any, Any]] = []
        host.propose(1, commands.encode_cas(b"k", False, b"v1", b"v3", 7, 3, 3), lambda r, e: late.append((r, e)))
        while host.has_work():
            host.run_cycle()
        assert late[0][1] is None and not late[0][0].swapped and late[0][0].current == b"v2"
    finally:
        store.close()


@pytest.mark.parametrize(("state_sync", "early"), [("commit", True), ("checkpoint", False)])
def test_writes_are_answered_from_inside_the_apply_only_when_its_commit_waits_for_the_disk(
    tmp_path: Path, state_sync: str, early: bool
) -> None:
    """`Host.answers_early`: worth the hand-off when the apply's commit is flushed (`commit` mode);
    in checkpoint mode (the server's default) the commit is not, and the driver answers at the
    end of the cycle. A cycle with no write waiting here never answers early. Either way the
    write is answered once, with its result."""
    store = NodeStore(tmp_path / "n1", sync=True, state_sync=state_sync)
    host = Host(1, store, lambda msgs: None, RaftSettings(), random.Random(1))
    try:
        host.open_group(1, ConfState((1,)))
        host.groups[1].core.campaign()
        while host.has_work():
            host.run_cycle()
        answers: list[tuple[Any, Any]] = []
        idx = host.propose(1, commands.encode_cas(b"k", True, b"", b"v", 7, 1, 1), lambda r, e: answers.append((r, e)))
        cycle = host.begin_cycle()
        assert cycle is not None and not cycle.applies
        assert not host.answers_early(cycle)  # nothing to apply yet
        cycle.persist()
        host.end_cycle(cycle)
        cycle = host.begin_cycle()
        assert cycle is not None and [e.index for a in cycle.applies for e in a.entries] == [idx]
        assert host.answers_early(cycle) is early
        if host.answers_early(cycle):
            cycle.on_applied = host.answer_writes
        cycle.persist()
        assert len(answers) == (1 if early else 0)
        host.end_cycle(cycle)
        assert len(answers) == 1 and answers[0][1] is None and getattr(answers[0][0], "swapped", None) is True
        host.propose(1, commands.encode_put(b"x", b"1"), lambda r, e: None)
        while host.has_work():
            cycle = host.begin_cycle()
            assert cycle is not None
            host.groups[1].writes.drain()  # nobody waits here any more
            assert not host.answers_early(cycle)
            cycle.persist()
            host.end_cycle(cycle)
    finally:
        store.close()
