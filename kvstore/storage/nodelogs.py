"""`NodeLogs`: every Raft group's log and hard state of one node in ONE write-ahead log (a `RaftWal`),
as `LmdbNodeStore` keeps them (issue 20). LMDB holds only the state machine.

What a Ready cycle costs: `stage(writes)` turns the cycle's `GroupWrite`s into WAL records for
all groups (a RESET for a new group or an installed snapshot, ENTRIES, HARD_STATE), `write` +
`sync` append them and make them durable with ONE `fdatasync`; only then may the store run the
LMDB transaction that applies (entries applied in a cycle may be the ones persisted in it), and
only after `sync` returned may anything that depends on these records be sent or acknowledged.

Views: `view(group)` is the group's `LogStorage` for its core: the same object for the life of
the store, reading whatever log the `RaftWal` holds for the group now (a RESET replaces a group's
`GroupLog` object, a reopen after a full disk replaces the `RaftWal`). The records a cycle writes
are visible to readers at once (before the sync): the core reads its storage only below its
unstable entries and acts on a Ready only after `advance`, which follows the sync.

Threads: the Ready loop writes from the persist thread while the event loop may compact (the
Admin service) or read; every write runs under `lock` (the caller takes it around a whole cycle,
so a compaction never lands between a cycle's records and its sync). Reads take no lock: a
`GroupLog` changes by single list operations, and the core never reads the indexes a cycle in
flight is rewriting (above).

Failures: an error from `RaftWal` poisons it. A full disk (`StorageFullError`) reopens it from
the directory before the error propagates, so the host's retry of the same cycle can succeed
once there is room: records of the failed cycle that reached the file come back (harmless: they
say what the retry writes again, and nothing acknowledged depends on them). Any other I/O error
(a failed `fdatasync`: what reached the disk is unknown, and the page cache may lie about it)
fails the logs for good: every later write raises `StorageIOError` until the process restarts
and recovers from the disk.

Checkpoints: once the log has `CHECKPOINT_SEGMENTS` segments (or two more than after the last
checkpoint, if the live logs fill more than one), `RaftWal.checkpoint` restates the groups that
pin old segments and removes those segments. It restates every live log whole, so it drops no
entry a log still holds: what bounds the state machine's redo log (with `--state-sync
checkpoint`, every entry after a group's applied index in LMDB's last checkpoint) is the
compaction bound the store passes to `compact`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from kvstore.node.store import GroupWrite
from kvstore.raft.storage import CompactedError, SnapshotTemporarilyUnavailable, UnavailableError
from kvstore.raft.types import ConfState, Entry, HardState, RaftError, Snapshot, SnapshotMeta

from .errors import StorageError, StorageFullError, StorageIOError
from .raftwal import RaftWal
from .wal import FileSystem, WalOptions
from .walgroups import GroupLog
from .walrec import KIND_COMPACT, KIND_DESTROY, KIND_ENTRIES, KIND_HARD_STATE, KIND_RESET, GroupRecord, encode

CHECKPOINT_SEGMENTS = 3
"""Checkpoint the WAL once it has this many segments."""
SEGMENT_BYTES = 8 << 20
"""A node's WAL segment size (preallocated; a put costs ~100-200 bytes of it)."""

_EMPTY_BASE = SnapshotMeta()
log = logging.getLogger("kvstore.storage")


def hard_state_needs_sync(before: HardState, after: HardState) -> bool:
    """Does going from `before` to `after` change what a Raft message may promise (etcd's
    `MustSync`)? The term or the vote do; the commit index alone does not: it becomes durable with
    the next sync, and one lost in a crash is learnt again from the leader."""
    return after.term != before.term or after.vote != before.vote


def log_is_empty(g: GroupLog | None) -> bool:
    """No entries, no base, the zero hard state (a group that never persisted anything)."""
    return g is None or (not g.ents and g.base.index == 0 and g.hard_state == HardState())


class WalLogStorage:
    """`kvstore.raft.storage.LogStorage` of one group: the group's current `GroupLog` (see the
    module docstring); an empty log while the WAL has none. `applied()` gives `snapshot()` the
    state machine's applied index and configuration."""

    __slots__ = ("_applied", "_logs", "group")

    def __init__(self, logs: NodeLogs, group: int, applied: Callable[[], tuple[int, ConfState]]) -> None:
        self._logs = logs
        self.group = group
        self._applied = applied

    def log(self) -> GroupLog | None:
        return self._logs.rw.groups.groups.get(self.group)

    def initial_state(self) -> tuple[HardState, ConfState]:
        g = self.log()
        return (HardState(), ConfState()) if g is None else g.initial_state()

    @property
    def hard_state(self) -> HardState:
        g = self.log()
        return HardState() if g is None else g.hard_state

    @property
    def base(self) -> SnapshotMeta:
        g = self.log()
        return _EMPTY_BASE if g is None else g.base

    def first_index(self) -> int:
        g = self.log()
        return 1 if g is None else g.first_index()

    def last_index(self) -> int:
        g = self.log()
        return 0 if g is None else g.last_index()

    def term(self, index: int) -> int:
        g = self.log()
        if g is None:
            if index == 0:
                return 0
            raise CompactedError(index) if index < 0 else UnavailableError(index)
        return g.term(index)

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        g = self.log()
        if g is None:
            if lo <= 0:
                raise CompactedError(lo)
            if hi > 1:
                raise UnavailableError(hi)
            return []
        return g.entries(lo, hi, max_size)

    def term_or_none(self, index: int) -> int | None:
        """The term of `index` if the log (or its base) still has it."""
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return None

    def snapshot(self) -> Snapshot:
        index, conf = self._applied()
        term = self.term_or_none(index)
        if term is None:
            raise SnapshotTemporarilyUnavailable()
        return Snapshot(SnapshotMeta(index, term, conf), b"")


class NodeLogs:
    """See the module docstring. `sync=False`: `sync()` flushes nothing (tests, `--no-sync`)."""

    __slots__ = ("_ckpt_at", "_failed", "_fs", "_opts", "_views", "checkpoints", "full", "lock", "rw", "sync_enabled")

    def __init__(self, fs: FileSystem, opts: WalOptions | None = None, *, sync: bool = True) -> None:
        self._fs = fs
        self._opts = opts or WalOptions(segment_bytes=SEGMENT_BYTES)
        self.rw = RaftWal.open(fs, self._opts)
        self.sync_enabled = sync
        self.lock = threading.RLock()
        self._failed: StorageError | None = None
        self._views: dict[int, WalLogStorage] = {}
        self._ckpt_at = CHECKPOINT_SEGMENTS
        self.checkpoints = 0
        self.full = False
        """True after a `StorageFullError`, until a `sync` succeeds."""

    # --- reads ------------------------------------------------------------------------------------
    def groups(self) -> list[int]:
        """Groups the WAL holds a log for (possibly empty ones), sorted."""
        return sorted(self.rw.groups.groups)

    def log(self, group: int) -> GroupLog | None:
        return self.rw.groups.groups.get(group)

    def view(self, group: int, applied: Callable[[], tuple[int, ConfState]]) -> WalLogStorage:
        v = self._views.get(group)
        if v is None:
            v = self._views[group] = WalLogStorage(self, group, applied)
        return v

    # --- building a cycle's records ----------------------------------------------------------------
    def stage(self, writes: Sequence[GroupWrite], applied: Callable[[int], int]) -> list[GroupRecord]:
        """The records that persist `writes` (in order): per write, a RESET if the group has no
        log yet or the write installs a snapshot beyond the log's base (never below the state
        machine's `applied(group)`: a snapshot older than that is superseded), then its entries,
        then its hard state if it changed. Nothing is written."""
        recs: list[GroupRecord] = []
        base: dict[int, int | None] = {}
        hs: dict[int, HardState] = {}
        for w in writes:
            g = w.group
            if g not in base:
                cur = self.log(g)
                base[g] = None if cur is None else cur.base.index
                hs[g] = HardState() if cur is None else cur.hard_state
            snap = w.snapshot
            new_hs = w.hard_state if w.hard_state is not None else hs[g]
            b = base[g]
            if snap is not None and (b is None or snap.index > b) and snap.index >= applied(g):
                recs.append(GroupRecord(KIND_RESET, g, base=snap, hard_state=new_hs))
                base[g], hs[g] = snap.index, new_hs
            elif b is None:
                recs.append(GroupRecord(KIND_RESET, g, base=_EMPTY_BASE, hard_state=new_hs))
                base[g], hs[g] = 0, new_hs
            if w.entries:
                ents = w.entries
                if any(e.group != g for e in ents):  # the core's entries carry their group already
                    ents = [Entry(e.term, e.index, e.type, e.data, g) for e in ents]
                recs.append(GroupRecord(KIND_ENTRIES, g, entries=tuple(ents)))
            if new_hs != hs[g]:
                recs.append(GroupRecord(KIND_HARD_STATE, g, hard_state=new_hs))
                hs[g] = new_hs
        return recs

    def must_sync(self, records: list[GroupRecord]) -> bool:
        """Do `records` (not written yet) change anything a Raft message may promise (etcd's
        `MustSync`)? Entries, a new base, a destroy, a term or a vote do; a HARD_STATE that only
        moves the commit index does not: it becomes durable with the next sync, and a commit
        index lost in a crash is learnt again from the leader (start-up raises it to the applied
        index LMDB keeps durably: `LmdbNodeStore._repair`)."""
        prev: dict[int, HardState] = {}
        for r in records:
            if r.kind != KIND_HARD_STATE or r.hard_state is None:
                return True
            before = prev.get(r.group)
            if before is None:
                lg = self.log(r.group)
                if lg is None:
                    return True
                before = lg.hard_state
            hs = r.hard_state
            if hard_state_needs_sync(before, hs):
                return True
            prev[r.group] = hs
        return False

    def check(self, records: list[GroupRecord]) -> None:
        """Raise (RaftError / ValueError) if `records` could not be written after the current logs."""
        self.rw.groups._check(records)

    # --- writes (call with `lock` held) ------------------------------------------------------------
    def write(self, records: list[GroupRecord]) -> None:
        """Append and apply `records` (NOT durable until `sync`)."""
        if not records:
            return
        self._check_usable()
        try:
            self.rw.write(records)
        except StorageError as err:
            raise self._failure(err) from err

    def sync(self, flush: bool = True) -> None:
        """ONE `fdatasync` for everything written so far (none if nothing is new, sync is off or
        not `flush`: see `must_sync`); then a checkpoint if the log has grown by enough segments."""
        self._check_usable()
        rw = self.rw
        try:
            if self.sync_enabled and flush:
                rw.sync()
            if len(rw.wal.segments()) >= self._ckpt_at:
                rw.checkpoint()
                self.checkpoints += 1
                self._ckpt_at = max(CHECKPOINT_SEGMENTS, len(rw.wal.segments()) + 2)
        except StorageError as err:
            raise self._failure(err) from err
        self.full = False

    def checkpoint_due(self) -> bool:
        """Will the next `sync` checkpoint the log (it has grown by enough segments)?"""
        return len(self.rw.wal.segments()) >= self._ckpt_at

    def write_synced(self, records: list[GroupRecord]) -> None:
        """`write` then `sync`, under the lock."""
        with self.lock:
            self.check(records)
            self.write(records)
            self.sync()

    def bootstrap(self, group: int, hard_state: HardState, entries: list[Entry]) -> None:
        """The group's first log, all of it in one write and one sync: a RESET announcing the
        ENTRIES payloads that follow it (a crash that keeps only part of them drops them all)."""
        body = GroupRecord(KIND_ENTRIES, group, entries=tuple(entries))
        follow = len(encode(body, self.rw.groups.max_record_bytes)) if entries else 0
        recs = [GroupRecord(KIND_RESET, group, base=_EMPTY_BASE, hard_state=hard_state, follow=follow)]
        if entries:
            recs.append(body)
        self.write_synced(recs)

    def reset(self, group: int, base: SnapshotMeta, hard_state: HardState) -> None:
        """Replace the group's log by an empty one at `base` (durable on return)."""
        self.write_synced([GroupRecord(KIND_RESET, group, base=base, hard_state=hard_state)])

    def destroy(self, group: int) -> None:
        """Forget the group's log (durable on return); nothing if the WAL has none."""
        with self.lock:
            if self.log(group) is not None:
                self.write_synced([GroupRecord(KIND_DESTROY, group)])

    def compact(self, group: int, index: int, applied: int) -> None:
        """Discard entries <= `index` (a COMPACT record, durable on return). `index` must not pass
        `applied` (the state machine's DURABLE applied index) nor the last index (RaftError). A
        no-op if already compacted that far."""
        with self.lock:
            g = self.log(group)
            if g is None or index <= g.base.index:
                return
            if index > g.last_index():
                raise RaftError(f"compact {index} beyond last index {g.last_index()}")
            if index > applied:
                raise RaftError(f"compact {index} beyond applied index {applied}")
            self.write_synced([GroupRecord(KIND_COMPACT, group, base=g.compaction_base(index))])

    # --- start-up -----------------------------------------------------------------------------------
    def repair(
        self,
        groups: Iterable[int],
        applied: Callable[[int], int],
        snapshot_base: Callable[[int], SnapshotMeta | None],
        dead: set[int],
    ) -> set[int]:
        """Finish what a crash interrupted between the logs and the state machine, before any
        core starts; returns the groups left with no state at all. `groups`: those with state in
        the state machine; `applied(g)`: its DURABLE applied index; `snapshot_base(g)`: the base
        of the last snapshot installed there (recorded with the install); `dead`: tombstones.
        - a destroy (state machine deleted first, the WAL's DESTROY not written): a tombstoned
          group, or a log whose base is above the applied index (only a destroy lowers that);
        - a commit index that moved without a flush and was lost (`must_sync`): raised to the
          applied index (applied entries were committed);
        - a snapshot install (state machine first, the WAL's RESET not written): the applied
          index is the recorded snapshot base, and the log ends before it or holds another term
          there: the RESET is written now. An applied index beyond the log with no snapshot
          there is damage: StorageError."""
        gone: set[int] = set()
        for g in sorted(set(self.groups()) | set(groups)):
            lg = self.log(g)
            a = applied(g)
            if g in dead or (lg is not None and lg.base.index > a):
                if lg is not None:
                    log.warning("group %d: finishing its interrupted destroy", g)
                    self.destroy(g)
                if a == 0:
                    gone.add(g)
                continue
            if a == 0:
                continue
            if lg is not None and lg.hard_state.commit < a <= lg.last_index():
                hs = lg.hard_state
                self.write_synced([GroupRecord(KIND_HARD_STATE, g, hard_state=HardState(hs.term, hs.vote, a))])
            base = snapshot_base(g)
            if lg is not None and a <= lg.last_index():
                if base is None or base.index != a or lg.term(a) == base.term:
                    continue
            elif base is None or base.index != a:
                raise StorageError(
                    f"group {g}: the state machine is at index {a}, beyond its log (last index "
                    f"{0 if lg is None else lg.last_index()}), and no snapshot was installed there"
                )
            hs = HardState() if lg is None else lg.hard_state
            hs = HardState(hs.term, hs.vote, a) if hs.term >= base.term else HardState(base.term, 0, a)
            log.warning("group %d: resetting its log to the snapshot installed at %d before a crash", g, a)
            self.reset(g, base, hs)
        return gone

    # --- failures and lifecycle ------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StorageIOError(f"the write-ahead log failed and the node must be restarted: {self._failed}")

    def _failure(self, err: StorageError) -> StorageError:
        """After `RaftWal` raised: reopen it (full disk) or fail for good (module docstring)."""
        if isinstance(err, StorageFullError):
            self.full = True
            self.rw.close()
            try:
                self.rw = RaftWal.open(self._fs, self._opts)
            except StorageError as again:
                self._failed = again
            return err
        self._failed = err
        return err

    def close(self) -> None:
        self.rw.close()
