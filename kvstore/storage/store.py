"""`LmdbNodeStore`: a node's durable state behind the calls the server's Ready loop makes: every Raft
group's log and hard state in ONE write-ahead log (`nodelogs.NodeLogs`, a `RaftWal` under
`<path>/wal`), the KV state machine of every group in ONE LMDB environment (`<path>`).

One Ready cycle (`persist_and_apply`), for ALL groups (issue 20):
1. (only if the cycle installs a snapshot) ONE synced LMDB transaction installs the snapshots;
2. the cycle's WAL records (RESET for a new group or an installed snapshot, ENTRIES, HARD_STATE),
   then ONE `fdatasync` of the WAL;
3. (only if the cycle applies) ONE LMDB transaction applies the committed entries (data and
   applied index stay consistent in LMDB). Entries applied may be those persisted in step 2.
`state_sync` (`kvstore serve --state-sync`) decides whether step 3 (and step 1) flush:
- `commit`: every LMDB transaction is synced. A cycle that only persists costs one `fdatasync`;
  one that persists and applies, the WAL's and LMDB's (two ordered flushes: data, then the meta
  page).
- `checkpoint`: no LMDB transaction is synced; a cycle costs the WAL's one `fdatasync`. The
  checkpointer (`checkpoint`) makes them durable: in the background of the cycles when
  `CheckpointPolicy` says so (or a compaction is held back, or the replay after an unclean start
  is done: prepared between cycles, flushed on a thread of its own), and synchronously at open
  and close, right after step 1, between a destroy's LMDB write and its DESTROY record, after an
  audit head and right after a map growth. A checkpoint pins a read transaction on the latest
  snapshot, saves LMDB's two meta pages and every group's applied index (read from the pinned
  snapshot), `env.sync(True)`s, records them durably in `<path>/checkpoint` (`lmdbckpt.py`),
  then releases the previous pin: LMDB never
  reuses a page a live reader can reach, so the checkpointed tree survives any later unsynced
  commit, and only the meta pages (overwritten in place) need the copy. Invariants: the WAL
  keeps every entry after each group's checkpointed applied index (`compact` never passes it),
  and the last checkpoint's tree is pinned from its record until the next record is durable.
  Open after an unclean stop: the record's meta pages are written back before LMDB opens
  (`lmdbckpt.restore`; a clean stop ended with a checkpoint, so they match and nothing is
  written); the cores then start at the checkpoint's applied indexes, below their commit
  indexes, and replay the WAL's committed entries (the apply rules are deterministic).

Failures: a call that raises wrote nothing of step 3; the programming errors (a gap in entries
to append or to apply: RaftError) are found before step 1. A storage error after step 1 or 2
leaves those steps in place, which is harmless: installing a snapshot the node's core holds in
its Ready, or persisting entries and hard states nobody was told about yet, is what a crash
right after the same write would leave; the same call may be retried (it writes the WAL records
again, skips the installed snapshot and applies once). `StorageFullError` also sets `full`.

Why this order (the crash cases): the WAL RESET of an installed snapshot comes AFTER the LMDB
install, so a crash between leaves the state machine ahead of the log, never a log compacted past
what the state machine holds; start-up (`_repair`) then writes the RESET from the snapshot base
LMDB recorded with the install, before any core starts. Compaction is a COMPACT record never past
LMDB's (durable) applied index. A destroyed group is deleted from LMDB first (with its
tombstone), then DESTROYed in the WAL; start-up finishes a destroy a crash interrupted. A data
directory from before the WAL has its LMDB logs moved into it at open (`walmigrate.py`), as the
migration from data format 1 to 2 (`dataformat.py`: the format record, checked before anything
opens, newer formats refused; `MIGRATIONS`).

After a restart (even kill -9, or power loss with sync=True) the store returns exactly what
returned calls wrote: hard states, logs, log bases, KV data, applied indexes (with their
configurations), sessions and members; in checkpoint mode, the state machine as of the last
checkpoint, and the logs hold every committed entry after it (a core's replay brings it back
to what was applied, with the same results).

Snapshots: `snapshot_chunks` streams a group's state at its applied index from one read
transaction; the receiver stores the chunks in a file (`receive_snapshot`) and installs it with
`persist(GroupWrite(..., snapshot=meta, snapshot_file=path))`, which deletes the file afterwards.
`meta` must be the metadata `snapshot_chunks` returned on the sender (the file's header is
checked against it).

Use a NodeStore from one thread only (the node's event loop), except `persist_and_apply`, which
the server runs on its persist thread (the WAL's lock serializes it with `compact` and the other
writes; LMDB serializes its own transactions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.node.store import ApplyBatch, AuditHead, GroupWrite
from kvstore.node.store import NodeStore as ProtocolNodeStore
from kvstore.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    RaftError,
    SnapshotMeta,
    bootstrap_entries,
)
from kvstore.shard.ranges import IntervalSet

from . import dataformat, lmdbckpt, mvcc
from .commands import ApplyResult
from .errors import StorageError, StorageIOError
from .kvstate import AppliedState, KVState, TxnStream
from .layout import (
    AUDIT_HEAD_KEY,
    DB_APPLIED,
    DB_NODEMETA,
    DB_RAFTSTATE,
    DB_REV_HIST,
    DB_REV_KEYS,
    DB_SHARDS,
    SNAPSHOT_BASE_TAG,
    TOMBSTONE_TAG,
    U64,
    decode_applied,
    decode_audit_head,
    decode_log_base,
    encode_audit_head,
    encode_log_base,
)
from .lmdb_env import LmdbEnv
from .lmdbckpt import STATE_SYNC_MODES
from .machine import SessionMeta
from .mvcc_lmdb import LmdbRows, rev_dbs
from .nodelogs import SEGMENT_BYTES, NodeLogs, WalLogStorage, hard_state_needs_sync, log_is_empty
from .shardcmd import ShardState
from .snapfile import SnapshotHeader, read_snapshot_header, write_frames
from .wal import FileSystem, OsFileSystem, WalOptions
from .walmigrate import migrate

log = logging.getLogger("kvstore.storage")

if TYPE_CHECKING:
    from .lmdb_env import Txn

SNAPSHOT_DIR = "snapshots"
WAL_DIR = "wal"
SNAPSHOT_SUFFIX = ".snap"



@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When the checkpointer runs (checkpoint mode): before a cycle, once this many applying
    cycles, applied entry bytes or seconds passed since the last checkpoint (whichever comes
    first); also at open, at close, after a snapshot install, a group destroy, an audit head
    and a map growth. Bounds the WAL a restart after a crash replays."""

    cycles: int = 4096
    bytes: int = 32 << 20
    seconds: float = 5.0


class LmdbNodeStore:
    """The node's durable state on LMDB: the `kvstore.node.store.NodeStore` protocol. See the
    module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: bool = True,
        map_size: int = 64 << 20,
        snapshot_chunk_size: int = 1 << 20,
        max_map_size: int = 1 << 40,
        wal_segment_bytes: int = SEGMENT_BYTES,
        wal_fs: FileSystem | None = None,
        state_sync: str = "commit",
        checkpoint_policy: CheckpointPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        writeback_interval: float = 0.0,
    ) -> None:
        """`wal_fs`: the WAL's directory (default: `<path>/wal` on the OS; tests wrap it to
        inject faults). `state_sync`: one of `STATE_SYNC_MODES` (checkpoint mode needs `sync`;
        without it nothing is flushed either way). `writeback_interval` (seconds, checkpoint mode;
        0 = off): how often LMDB's dirty pages are sent on to the disk between checkpoints
        (`LmdbEnv`, `writeback.py`: timing only)."""
        if state_sync not in STATE_SYNC_MODES:
            raise ValueError(f"state_sync must be one of {STATE_SYNC_MODES}, not {state_sync!r}")
        self.path = Path(path)
        self.sync = sync
        self.state_sync = state_sync
        self.checkpointed = sync and state_sync == "checkpoint"
        self.checkpoint_policy = checkpoint_policy or CheckpointPolicy()
        self._clock = clock
        self._ckpt_applied: dict[int, int] = {}
        """group -> its applied index in the last checkpoint (checkpoint mode): what a crash
        restores, so what the WAL must keep everything after (`compact`)."""
        self._ckpt_failed: StorageError | None = None
        self._ckpt_cycles = 0
        self._ckpt_bytes = 0
        self._ckpt_at = clock()
        self._replay: dict[int, int] = {}
        """group -> the commit index its core replays up to after this open (checkpoint mode):
        once every group got there, the next cycle checkpoints, so repeated crashes never make
        the replay (and the WAL kept for it) grow."""
        self._ckpt_now = False
        """A forced checkpoint failed (full disk): the next write runs one first, synchronously."""
        self._ckpt_soon = False
        """The next cycle starts a checkpoint whatever the policy says (the replay after an
        unclean start is done, a compaction is held back by the last checkpoint)."""
        self._ckpt_thread: threading.Thread | None = None
        self._ckpt_lock = threading.Lock()
        self._ckpt_txnid = 0
        """The LMDB transaction of the last checkpoint record written."""
        self.checkpoints = 0
        self.restored = False
        """True if this open put the state machine back to its last checkpoint (unclean stop)."""
        self.snapshot_chunk_size = snapshot_chunk_size
        self.snapshot_dir = self.path / SNAPSHOT_DIR
        self.path.mkdir(parents=True, exist_ok=True)
        self.format = dataformat.check(self.path)  # before anything opens: refuses a newer format
        """The data format the directory had when opened (`dataformat.py`); migrated to the
        current one by this open."""
        saved = lmdbckpt.read(self.path)
        self._lock_fd: int | None = None
        if self.checkpointed or saved is not None:
            self._lock_fd = lmdbckpt.lock(self.path)
        if saved is not None:
            try:
                self.restored = lmdbckpt.restore(self.path, saved)
            except BaseException:
                self._unlock()
                raise
            if self.restored:
                log.warning("the state machine was not stopped cleanly: restored its checkpoint at "
                            "LMDB transaction %d; the WAL's committed entries after it are replayed", saved.txnid)
        try:
            self._env = LmdbEnv(
                self.path, sync=sync, map_size=map_size, max_map_size=max_map_size, checkpointed=self.checkpointed,
                writeback_interval=writeback_interval,
            )
        except BaseException:
            self._unlock()
            raise
        self._kv = KVState(self._env)
        try:
            if self.checkpointed:
                self._env.after_grow = self._checkpoint_locked
                self._env.before_grow = self._no_finish_in_flight
                self.checkpoint()
            elif saved is not None:
                lmdbckpt.remove(self.path)  # commit mode from here: every apply is synced
        except BaseException:
            self._env.close()
            self._unlock()
            raise
        try:
            opts = WalOptions(segment_bytes=wal_segment_bytes)
            fs = wal_fs if wal_fs is not None else OsFileSystem(self.path / WAL_DIR)
            self._wal = NodeLogs(fs, opts, sync=sync)
        except BaseException:
            self._env.close()
            self._unlock()
            raise
        try:
            self._migrate()
            self._groups: set[int] = self._scan_groups()
            self._repair()
            if self.checkpointed:
                for g in self._groups:
                    lg = self._wal.log(g)
                    if lg is not None and lg.hard_state.commit > self._kv.applied(g).index:
                        self._replay[g] = lg.hard_state.commit
        except BaseException:
            self.close()
            raise
        self._clean_snapshot_dir()

    def _migrate(self) -> None:
        """Run the migrations from the directory's format up to `dataformat.FORMAT_VERSION`, in
        order; each is idempotent, and the record moves to v + 1 only once migration v is durable
        (in checkpoint mode: after a checkpoint)."""
        for version in range(self.format, dataformat.FORMAT_VERSION):
            log.warning("migrating the data directory %s from format %d to %d (%s)", self.path, version, version + 1,
                        dataformat.FORMATS[version + 1])
            MIGRATIONS[version](self)
            if self.checkpointed:
                self.checkpoint()
            dataformat.write(self.path, version + 1)

    def _migrate_logs_to_wal(self) -> None:
        """Format 1 -> 2: the Raft logs move from LMDB into the write-ahead log (`walmigrate.py`)."""
        moved = migrate(self._env, self._wal.rw)
        if moved:
            log.info("moved the Raft logs of groups %s from LMDB into the write-ahead log", moved)

    def _migrate_history_to_log(self) -> None:
        """Format 2 -> 3: every group's history (`rev_hist`, keyed by key id) and change log
        (`rev_changes`) become one table in revision order, and the key rows gain their links
        (`mvcc.rebuild_log`), all groups in one LMDB transaction. A group already rebuilt is
        skipped (`mvcc.needs_rebuild`), so a migration cut short runs again whole."""
        env = self._env

        def run(txn: Txn) -> tuple[list[int], int]:
            groups: set[int] = set()
            for db in (env.db(DB_REV_HIST), env.db(DB_REV_KEYS)):
                cur = txn.cursor(db=db)
                ok = cur.first()
                while ok:
                    g = U64.unpack_from(cur.key())[0]
                    groups.add(g)
                    ok = g < (1 << 64) - 1 and cur.set_range(U64.pack(g + 1))
            done, n = [], 0
            for g in sorted(groups):
                rows = LmdbRows(txn, g, rev_dbs(env))
                if not mvcc.needs_rebuild(rows):
                    continue
                try:
                    n += mvcc.rebuild_log(rows)
                except ValueError as err:
                    raise StorageError(f"group {g}'s history cannot be migrated: {err}") from None
                done.append(g)
            return done, n

        groups, n = env.write(run)
        if groups:
            log.info("rebuilt the history of groups %s in revision order (%d versions)", groups, n)

    # --- groups ---------------------------------------------------------------------------------
    def _scan_groups(self) -> set[int]:
        found = {g for g in self._wal.groups() if not log_is_empty(self._wal.log(g))}
        with self._env.read() as txn:
            for key in txn.cursor(db=self._env.db(DB_APPLIED)).iternext(values=False):
                found.add(U64.unpack_from(key)[0])
        return found

    def _snapshot_base(self, group: int) -> SnapshotMeta | None:
        raw = self._env.get(self._env.db(DB_RAFTSTATE), U64.pack(group) + SNAPSHOT_BASE_TAG)
        return None if raw is None else decode_log_base(raw)

    def _repair(self) -> None:
        """Finish what a crash interrupted, before any core starts (`NodeLogs.repair`)."""
        gone = self._wal.repair(
            sorted(self._groups), lambda g: self._kv.applied(g).index, self._snapshot_base, self.tombstones()
        )
        self._groups -= gone

    def groups(self) -> list[int]:
        """Groups with state on disk, sorted."""
        return sorted(self._groups)

    def has_group(self, group: int) -> bool:
        return group in self._groups

    def log_storage(self, group: int) -> WalLogStorage:
        """The group's LogStorage (the same object on every call)."""
        kv = self._kv

        def applied() -> tuple[int, ConfState]:
            st = kv.applied(group)
            return st.index, st.conf_state

        return self._wal.view(group, applied)

    def bootstrap(self, group: int, conf: ConfState, data: Sequence[bytes] = ()) -> bool:
        """Give a new group its initial log (`bootstrap_entries`, then one NORMAL entry per item of
        `data`, all at term 1 and committed) and HardState(1, 0, len). Every initial member must
        be given the same arguments. Does nothing and returns False if the group already has
        state or a tombstone."""
        if self._has_state(group) or group in self.tombstones():
            return False
        ents = bootstrap_entries(conf, group)
        ents += [Entry(1, len(ents) + i, EntryType.NORMAL, d, group) for i, d in enumerate(data, 1)]
        self._wal.bootstrap(group, HardState(1, 0, len(ents)), ents)
        self._groups.add(group)
        return True

    def tombstones(self) -> set[int]:
        """Groups destroyed on this node; they are never recreated here."""
        out: set[int] = set()
        with self._env.read() as txn:
            for key in txn.cursor(db=self._env.db(DB_SHARDS)).iternext(values=False):
                if len(key) == 9 and key[8:] == TOMBSTONE_TAG:
                    out.add(U64.unpack_from(key)[0])
        return out

    def _has_state(self, group: int) -> bool:
        return not log_is_empty(self._wal.log(group)) or self._kv.applied(group).index != 0

    def destroy_group(self, group: int, tombstone: bool = False) -> None:
        """Delete everything of `group` (data, sessions, members, applied index in one LMDB
        transaction, with the tombstone if asked; then its log: a DESTROY in the WAL, synced);
        with `tombstone`, it must never come back here."""
        raftstate = self._env.db(DB_RAFTSTATE)

        def fn(txn: Txn) -> None:
            self._kv.stage_destroy(txn, group)
            txn.delete(U64.pack(group) + SNAPSHOT_BASE_TAG, db=raftstate)
            if tombstone:
                txn.put(U64.pack(group) + TOMBSTONE_TAG, b"", db=self._env.db(DB_SHARDS))

        with self._wal.lock:
            self._check_checkpoints()
            if self.checkpointed and self._ckpt_now:
                self.checkpoint()
            self._env.write(fn)
            self._kv.forget(group)
            self._groups.discard(group)
            if self.checkpointed:
                self._ckpt_now = True  # if it fails (full disk), the next write checkpoints first
                self.checkpoint()  # the deletion is durable before the log goes
            self._wal.destroy(group)

    # --- the Ready loop ----------------------------------------------------------------------
    def persist(self, writes: Sequence[GroupWrite]) -> None:
        """ONE transaction + fsync: per group, in order, install the snapshot (if any), append the
        entries (truncating a conflicting suffix) and set the hard state."""
        self.persist_and_apply(writes, ())

    def apply(self, batches: Sequence[ApplyBatch]) -> list[list[ApplyResult | None]]:
        """ONE transaction: apply each batch's committed entries and record the new applied index
        with its configuration. Returns one result per entry (None for non-data entries)."""
        return self.persist_and_apply((), batches)

    def waits_for_disk(self, writes: Sequence[GroupWrite], batches: Sequence[ApplyBatch]) -> bool:
        """See `NodeStore.waits_for_disk`: True for entries, a term or vote change, or anything
        `flushes_only_log` refuses (a snapshot, a group with no log yet, an apply in `commit`
        mode, a checkpoint due now)."""
        if not self.flushes_only_log(writes, batches):
            return True
        for w in writes:
            if w.entries:
                return True
            hs = w.hard_state
            if hs is None:
                continue
            lg = self._wal.log(w.group)
            if lg is None or hard_state_needs_sync(lg.hard_state, hs):
                return True
        return False

    def flushes_only_log(self, writes: Sequence[GroupWrite], batches: Sequence[ApplyBatch]) -> bool:
        """See `NodeStore.flushes_only_log`: False for a snapshot, a group with no log yet, an
        apply in `commit` mode (each apply commit is flushed), a checkpoint due now (of LMDB:
        forced, or failed: the call raises; of the log: it has grown by enough segments). Read
        without the WAL's lock: the caller is the one thread that writes (between its cycles
        nothing changes what it reads but its own next call)."""
        if batches and not self.checkpointed:
            return False
        if self._ckpt_now or self._ckpt_failed is not None or (writes and self._wal.checkpoint_due()):
            return False
        wal = self._wal
        return all(w.snapshot is None and wal.log(w.group) is not None for w in writes)

    def persist_and_apply(
        self,
        writes: Sequence[GroupWrite],
        batches: Sequence[ApplyBatch],
        on_applied: Callable[[list[list[ApplyResult | None]]], None] | None = None,
    ) -> list[list[ApplyResult | None]]:
        """`persist(writes)` then `apply(batches)`: the three steps of the module docstring, one
        `fdatasync` of the WAL for all groups' records (plus LMDB's commit if anything applies).

        `on_applied(results)`, if given, is called inside the apply transaction as soon as the
        results are known, before its commit and fsync (and again, with the same results, if the
        transaction is retried after growing the map): the entries applied are committed, so
        their outcome is decided whether or not this transaction becomes durable."""
        if not writes and not batches:
            return []
        kv = self._kv
        with self._wal.lock:
            self._check_checkpoints()
            installs = self._installs(writes)
            self._check_applies(batches, installs)
            records = self._wal.stage(writes, lambda g: max(kv.applied(g).index, installs.get(g, 0)))
            self._wal.check(records)
            files = [Path(w.snapshot_file) for w in writes if w.snapshot is not None and w.snapshot_file is not None]
            if self.checkpointed and self._ckpt_now:
                self.checkpoint()  # a forced one that failed (full disk): before anything else
            elif self.checkpointed and self._checkpoint_due():
                self._checkpoint_soon()  # between cycles: a failure here wrote nothing of this one
            if installs:
                self._install(writes, installs)
                if self.checkpointed:
                    self._ckpt_now = True  # if it fails (full disk), the retry checkpoints first
                    self.checkpoint()  # the install is durable before the WAL's RESET
            if records:
                flush = self._wal.must_sync(records)
                self._wal.write(records)
                self._wal.sync(flush)
                for r in records:
                    self._groups.add(r.group)
            results: list[list[ApplyResult | None]] = []
            if batches:
                results = self._apply(batches, on_applied)
                if self.checkpointed:
                    self._ckpt_cycles += 1
                    self._ckpt_bytes += sum(len(e.data) for b in batches for e in b.entries)
                    if self._replay:
                        self._replayed()
        for f in files:
            with contextlib.suppress(OSError):
                f.unlink()
        return results

    def _installs(self, writes: Sequence[GroupWrite]) -> dict[int, int]:
        """group -> index of the snapshot this call installs in LMDB (newer than its applied index)."""
        out: dict[int, int] = {}
        for w in writes:
            if w.snapshot is None:
                continue
            if w.snapshot_file is None:
                raise ValueError(f"group {w.group}: a snapshot write needs its snapshot_file")
            cur = max(self._kv.applied(w.group).index, out.get(w.group, 0))
            if w.snapshot.index > cur:
                out[w.group] = w.snapshot.index
        return out

    def _check_applies(self, batches: Sequence[ApplyBatch], installs: dict[int, int]) -> None:
        """RaftError before anything is written if a batch would leave a gap after the applied index."""
        idx: dict[int, int] = {}
        for b in batches:
            g = b.group
            cur = idx.get(g)
            if cur is None:
                cur = max(self._kv.applied(g).index, installs.get(g, 0))
            for e in b.entries:
                if e.index <= cur:
                    continue
                if e.index != cur + 1:
                    raise RaftError(f"group {g}: entry {e.index} applied after {cur}: entries would be lost")
                cur = e.index
            idx[g] = cur

    def _install(self, writes: Sequence[GroupWrite], installs: dict[int, int]) -> None:
        """Step 1: the snapshots newer than the applied index, in ONE LMDB transaction (with the
        base each leaves, for `_repair`)."""
        kv = self._kv
        raftstate = self._env.db(DB_RAFTSTATE)

        def fn(txn: Txn) -> dict[int, AppliedState]:
            applied: dict[int, AppliedState] = {}
            for w in writes:
                snap, g = w.snapshot, w.group
                if snap is None or w.snapshot_file is None or installs.get(g) != snap.index:
                    continue
                applied[g] = kv.stage_install(txn, g, snap, Path(w.snapshot_file))
                txn.put(U64.pack(g) + SNAPSHOT_BASE_TAG, encode_log_base(snap), db=raftstate)
            return applied

        for g, a in self._env.write(fn).items():
            kv.commit_applied(g, a)
            self._groups.add(g)

    def _apply(
        self,
        batches: Sequence[ApplyBatch],
        on_applied: Callable[[list[list[ApplyResult | None]]], None] | None,
    ) -> list[list[ApplyResult | None]]:
        """Step 3: apply every batch in ONE LMDB transaction."""
        kv = self._kv

        def fn(txn: Txn) -> tuple[list[list[ApplyResult | None]], dict[int, AppliedState]]:
            applied: dict[int, AppliedState] = {}
            results: list[list[ApplyResult | None]] = []
            for b in batches:
                cur = applied.get(b.group)
                if cur is None:
                    cur = kv.applied(b.group)
                res, applied[b.group] = kv.stage_apply(txn, b.group, cur, b.entries, b.conf_state)
                results.append(res)
            if on_applied is not None and results:
                on_applied(results)
            return results, applied

        results, applied = self._env.write(fn)
        for g, a in applied.items():
            kv.commit_applied(g, a)
            if a.index:
                self._groups.add(g)
        return results

    def compact(self, group: int, index: int) -> None:
        """Discard log entries <= `index` (which must be <= the applied index) and record (index,
        term, configuration there) as the log's base: a COMPACT record in the WAL, synced. A no-op
        if already compacted that far. In checkpoint mode never past the group's applied index in
        the last checkpoint: `index` is lowered to it (a crash restores the state machine there,
        and the WAL is its redo log from there), and the next cycle checkpoints, so the caller's
        next compaction goes as far as it asked."""
        applied = self._kv.applied(group).index
        if self.checkpointed and index <= applied:
            bound = self._ckpt_applied.get(group, 0)
            if index > bound:
                index = bound
                self._ckpt_soon = True  # the next cycle checkpoints: the compaction then goes through
        self._wal.compact(group, index, applied)

    # --- the checkpointer (checkpoint mode) ---------------------------------------------------------
    def checkpointed_applied(self, group: int) -> int:
        """The group's applied index a crash now would restore (the live one in commit mode)."""
        if self.checkpointed:
            return self._ckpt_applied.get(group, 0)
        return self._kv.applied(group).index

    def _replayed(self) -> None:
        kv = self._kv
        for g in [g for g, upto in self._replay.items() if kv.applied(g).index >= upto or g not in self._groups]:
            del self._replay[g]
        if not self._replay:
            self._ckpt_soon = True

    def _checkpoint_due(self) -> bool:
        p = self.checkpoint_policy
        if self._ckpt_soon:
            return True
        if not (self._ckpt_cycles or self._ckpt_bytes):
            return False
        return (
            self._ckpt_cycles >= p.cycles
            or self._ckpt_bytes >= p.bytes
            or self._clock() - self._ckpt_at >= p.seconds
        )

    def _check_checkpoints(self) -> None:
        if self._ckpt_failed is not None:
            raise StorageIOError(
                f"a checkpoint of the state machine failed and the node must be restarted: {self._ckpt_failed}"
            )

    def checkpoint(self) -> None:
        """Make everything committed to LMDB durable and restorable now (checkpoint mode; a no-op
        otherwise), waiting for a background checkpoint in flight first. The steps: under LMDB's
        write lock (no commit in between) (1) pin a read transaction on the latest snapshot and
        read, from the page cache, the two meta pages (the newer must be at the pinned
        transaction) and every group's applied index FROM THE PINNED SNAPSHOT; then (2)
        `env.sync(True)` (every page of the pinned tree was written before (1), so it is on disk
        after it, whatever later commits do), (3) write the record (`lmdbckpt.write`: atomic,
        durable), (4) release the previous pin. A crash before (3) restores the previous
        checkpoint, whose pages the previous pin kept. Here (2) to (4) run under the write lock;
        `_checkpoint_soon` runs them on a thread of their own while cycles go on.
        A failure fails the checkpointer for good (after a failed flush what reached the disk is
        unknown, and a later successful one proves nothing): every later write raises
        StorageIOError until a restart restores the last good checkpoint. Except no room for
        the record (`CheckpointSpaceError`, a `StorageFullError`, sets `full`): nothing was
        replaced, the previous checkpoint and its pin hold, and the next cycle tries again
        before writing anything (a forced one is never skipped)."""
        if not self.checkpointed:
            return
        self._check_checkpoints()
        for _ in range(8):  # again only if a map growth dropped it before the growth could checkpoint
            with self._env.write_lock:
                prepared = self._prepare_checkpoint()
            if self._finish_checkpoint(prepared):  # commits may go on meanwhile
                self._ckpt_now = False  # (only a synchronous one clears it: what a forced one waits for)
                return
        raise StorageIOError("a checkpoint of the state machine was cut by a map growth eight times in a row")

    def _checkpoint_locked(self) -> None:
        """A whole checkpoint under the write lock (after a map growth: before the next commit)."""
        self._check_checkpoints()
        if self._finish_checkpoint(self._prepare_checkpoint()):  # (no growth can cut it: the lock)
            self._ckpt_now = False

    def _prepare_checkpoint(self) -> tuple[Txn, lmdbckpt.Checkpoint, int]:
        """Step (1), with LMDB's write lock held. Also returns the map's generation (a growth
        before `_finish_checkpoint` kills the pin: that checkpoint is dropped, the growth's own
        covers it)."""
        env = self._env
        generation = env.generation
        pin = env.begin_read()
        try:
            metas = lmdbckpt.read_metas(self.path / "data.mdb", env.psize)
            txnid = lmdbckpt.meta_txnid(metas, env.psize)
            if txnid != pin.id():
                raise StorageError(
                    f"LMDB's meta pages are at transaction {txnid}, the pinned snapshot at {pin.id()}: "
                    "this LMDB's file layout is not the one the checkpointer knows"
                )
            applied = []
            for key, raw in pin.cursor(db=env.db(DB_APPLIED)):
                if len(key) == U64.size:
                    applied.append((U64.unpack(key)[0], decode_applied(raw)[0]))
        except BaseException as err:
            self._checkpoint_failed(pin, err)
            raise
        self._ckpt_cycles = self._ckpt_bytes = 0
        self._ckpt_soon = False
        self._ckpt_at = self._clock()
        return pin, lmdbckpt.Checkpoint(env.psize, txnid, tuple(sorted(applied)), metas), generation

    def _finish_checkpoint(self, prepared: tuple[Txn, lmdbckpt.Checkpoint, int]) -> bool:
        """Steps (2) to (4), without LMDB's write lock (its flush is one `fdatasync`), under
        `_ckpt_lock`: one finish at a time, so a record and its pin change together (a record
        whose tree is not pinned never exists), never back to an older snapshot, and a map growth
        (`before_grow` takes the lock) never lands inside one. Returns True once a record at or
        after the prepared snapshot is durable (this one, or a newer one that finished first)."""
        pin, ckpt, generation = prepared
        with self._ckpt_lock:
            if self._env.generation != generation or ckpt.txnid < self._ckpt_txnid:
                with contextlib.suppress(Exception):  # a growth killed it, or a newer one is done
                    pin.abort()
                return self._ckpt_txnid >= ckpt.txnid
            try:
                self._env.sync_all()
                lmdbckpt.write(self.path, ckpt)
            except BaseException as err:
                self._checkpoint_failed(pin, err)
                raise
            self._env.pin(pin)
            self._ckpt_txnid = ckpt.txnid
            self._ckpt_applied = ckpt.applied_map()
            self.checkpoints += 1
            return True

    def _no_finish_in_flight(self) -> None:
        """`LmdbEnv.before_grow`: wait for a checkpoint's finish in flight (on another thread)."""
        with self._ckpt_lock:
            pass

    def _checkpoint_failed(self, pin: Txn, err: BaseException) -> None:
        with contextlib.suppress(Exception):
            pin.abort()
        if isinstance(err, lmdbckpt.CheckpointSpaceError):
            self._env.full = True  # the previous record and its pin still hold: retried later
            self._ckpt_soon = True
        elif isinstance(err, StorageError):
            self._ckpt_failed = err

    def _checkpoint_soon(self) -> None:
        """A checkpoint the policy asks for: prepared here (a moment under the write lock), its
        flush and record on a thread of their own, so no cycle waits for the flush. One at a
        time; a failure shows at the next write (`_check_checkpoints`)."""
        if self._ckpt_thread is not None:
            if self._ckpt_thread.is_alive():
                return
            self._ckpt_thread = None
        with self._env.write_lock:
            prepared = self._prepare_checkpoint()

        def run() -> None:
            try:
                self._finish_checkpoint(prepared)
            except Exception as err:  # kept in `_ckpt_failed` (or retried: full disk)
                log.error("a background checkpoint of the state machine failed: %s", err)

        t = threading.Thread(target=run, name="lmdb-checkpoint", daemon=True)
        self._ckpt_thread = t
        t.start()

    def wait_checkpoint(self) -> None:
        """Wait for a background checkpoint in flight, if any (done before a close)."""
        t = self._ckpt_thread
        if t is not None:
            t.join()
            self._ckpt_thread = None

    # --- the audit log's head -------------------------------------------------------------------
    def audit_head(self) -> AuditHead | None:
        raw = self._env.get(self._env.db(DB_NODEMETA), AUDIT_HEAD_KEY)
        if raw is None:
            return None
        seq, floor, mac = decode_audit_head(raw)
        return AuditHead(seq, mac, floor)

    def set_audit_head(self, head: AuditHead) -> None:
        """One write transaction (durable on return with sync=True). Called from the audit
        writer's thread: `LmdbEnv.write` serializes it with the Ready loop's transactions."""
        value = encode_audit_head(head.seq, head.floor, head.mac)
        db = self._env.db(DB_NODEMETA)

        def fn(txn: Txn) -> None:
            txn.put(AUDIT_HEAD_KEY, value, db=db)

        self._check_checkpoints()
        self._env.write(fn)
        self.checkpoint()  # checkpoint mode: durable on return all the same

    # --- state ----------------------------------------------------------------------------------
    def applied_index(self, group: int) -> int:
        return self._kv.applied(group).index

    def applied_conf_state(self, group: int) -> ConfState:
        return self._kv.applied(group).conf_state

    def shard_state(self, group: int) -> ShardState | None:
        """The ranges the group serves as of its last durable apply (None: an unsharded group)."""
        return self._kv.applied(group).shards

    def export_range(self, group: int, ranges: IntervalSet, chunk_bytes: int = 512 << 10) -> TxnStream[tuple[bytes, int]]:
        """Install records of the frozen `ranges` (see `KVState.export_range`)."""
        return self._kv.export_range(group, ranges, chunk_bytes)

    def count_keys(self, group: int) -> int:
        return self._kv.count_keys(group)

    def session_meta(self, group: int) -> SessionMeta:
        """The group's session count, eviction horizon and evictions so far (committed state)."""
        return self._kv.session_meta(group)

    def hard_state(self, group: int) -> HardState:
        lg = self._wal.log(group)
        return HardState() if lg is None else lg.hard_state

    def members(self) -> dict[int, str]:
        """node id -> address, from the contexts of applied conf changes (all groups)."""
        return self._kv.members()

    @property
    def full(self) -> bool:
        """True after a StorageFullError, until a write succeeds with enough free disk space."""
        return self._env.full or self._wal.full

    # --- reads -----------------------------------------------------------------------------------
    @property
    def revisions(self) -> KVState:
        """Reads with revisions and per-key metadata (`KVState.get_version`, `scan_versions`)."""
        return self._kv

    def get(self, group: int, key: bytes) -> bytes | None:
        return self._kv.get(group, key)

    def scan(self, group: int, start: bytes, end: bytes | None, limit: int = 0) -> list[tuple[bytes, bytes]]:
        """Pairs with start <= key < end (end None: unbounded), in key order; limit <= 0: no limit."""
        return self._kv.scan(group, start, end, limit)

    def scan_chunks(
        self,
        group: int,
        start: bytes,
        end: bytes | None,
        limit: int = 0,
        *,
        chunk_items: int = 512,
        chunk_bytes: int = 256 << 10,
        owned: IntervalSet | None = None,
    ) -> TxnStream[list[tuple[bytes, bytes]]]:
        """Like `scan`, streamed in chunks of at most `chunk_items` pairs and about `chunk_bytes`
        (a chunk ends after the pair that reaches it), all from ONE read transaction opened by this
        call. With `owned`, only keys whose hash is in it. Raises ReadInvalidatedError mid-stream
        if the map had to grow meanwhile."""
        return self._kv.scan_chunks(group, start, end, limit, chunk_items, chunk_bytes, owned)

    # --- snapshots --------------------------------------------------------------------------------
    def snapshot_chunks(self, group: int) -> tuple[SnapshotMeta, Iterator[bytes]]:
        """(meta, chunks) of the group's state at its applied index, from ONE read transaction;
        chunks are at most `snapshot_chunk_size` bytes. Raises SnapshotTemporarilyUnavailable if
        the term of the applied index is not available."""
        return self._kv.snapshot_stream(group, self.snapshot_chunk_size, self.log_storage(group).term_or_none)

    def receive_snapshot(self, group: int, chunks: Iterable[bytes], directory: Path | None = None) -> Path:
        """Write incoming chunks to a new file (under the data dir by default) and return its path.
        Memory stays bounded by one chunk. A full disk raises StorageFullError (file removed).
        The file is not fsynced: after a restart it is useless anyway and removed."""
        d = Path(directory) if directory is not None else self.snapshot_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"recv-{group}-", suffix=SNAPSHOT_SUFFIX, dir=d)
        except OSError as err:
            raise self._env.translate_error(err, "creating a snapshot file") from err
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                write_frames(f, chunks)
        except BaseException as err:
            with contextlib.suppress(OSError):
                path.unlink()
            if isinstance(err, OSError):
                raise self._env.translate_error(err, "receiving a snapshot") from err
            raise
        return path

    @staticmethod
    def snapshot_file_header(path: str | os.PathLike[str]) -> SnapshotHeader:
        """The group and metadata carried by a received snapshot file."""
        return read_snapshot_header(Path(path))

    def _clean_snapshot_dir(self) -> None:
        """Received snapshot files left by a previous run can never be installed: delete them."""
        if self.snapshot_dir.is_dir():
            for f in self.snapshot_dir.glob(f"recv-*{SNAPSHOT_SUFFIX}"):
                with contextlib.suppress(OSError):
                    f.unlink()

    # --- metrics ---------------------------------------------------------------------------------
    def disk_usage(self) -> dict[str, int]:
        """map_size, used_bytes (pages in use), file_bytes, fs_free_bytes, fs_total_bytes."""
        return self._env.disk_usage()

    def live_bytes(self) -> int:
        """Bytes the stored data occupies now (shrinks after deletes and log compaction)."""
        return self._env.live_bytes()

    def stats(self) -> dict[str, Any]:
        groups: dict[int, dict[str, int]] = {}
        for g in sorted(self._groups):
            ls = self.log_storage(g)
            hs = ls.hard_state
            groups[g] = {
                "first_index": ls.first_index(),
                "last_index": ls.last_index(),
                "log_entries": ls.last_index() - ls.base.index,
                "applied_index": self._kv.applied(g).index,
                "term": hs.term,
                "commit": hs.commit,
            }
        wal = self._wal.rw.wal
        return {
            **self.disk_usage(),
            "wal_segments": len(wal.segments()),
            "wal_syncs": wal.stats.syncs,
            "wal_checkpoints": self._wal.checkpoints,
            "state_sync": self.state_sync if self.sync else "off",
            "lmdb_checkpoints": self.checkpoints,
            "full": self.full,
            "map_grow_count": self._env.grow_count,
            "rows": self._env.db_entries(),
            "groups": groups,
        }

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._env.closed

    def close(self) -> None:
        """Checkpoint (checkpoint mode: a clean stop, which the next open needs not restore), close
        the environment and the WAL (open streams become invalid). Idempotent."""
        if hasattr(self, "_ckpt_thread"):
            self.wait_checkpoint()
        if self.checkpointed and not self._env.closed and self._ckpt_failed is None:
            try:
                self.checkpoint()
            except StorageError as err:
                log.error("the last checkpoint at close failed (the next start restores the one before): %s", err)
        if hasattr(self, "_wal"):
            self._wal.close()
        self._env.close()
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> LmdbNodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_audit_head(path: str | os.PathLike[str]) -> AuditHead | None:
    """The audit head recorded in the LMDB environment at `path` (a node's `<data-dir>/db`),
    read without writing anything (safe while the node runs); None if none was recorded.
    Raises StorageError if there is no such environment or the record is damaged."""
    import lmdb

    p = Path(path)
    if not (p / "data.mdb").exists():
        raise StorageError(f"no node store at {p} (expected {p / 'data.mdb'})")
    try:
        env = lmdb.open(str(p), readonly=True, lock=True, subdir=True, max_dbs=32)
    except lmdb.Error as err:
        raise StorageError(f"cannot open the node store at {p}: {err}") from err
    try:
        with env.begin() as txn:
            try:
                db = env.open_db(DB_NODEMETA, txn=txn, create=False)
            except lmdb.NotFoundError:
                return None
            raw = txn.get(AUDIT_HEAD_KEY, db=db)
    finally:
        env.close()
    if raw is None:
        return None
    seq, floor, mac = decode_audit_head(raw)
    return AuditHead(seq, mac, floor)


NodeStore = LmdbNodeStore
"""Old name of `LmdbNodeStore` (the protocol is `kvstore.node.store.NodeStore`); kept so nothing breaks."""

__all__ = ["ApplyBatch", "AuditHead", "GroupWrite", "LmdbNodeStore", "NodeStore", "read_audit_head"]


def _is_a_node_store(store: LmdbNodeStore) -> ProtocolNodeStore:
    """Never called: makes mypy check that `LmdbNodeStore` implements the protocol."""
    return store


MIGRATIONS: dict[int, Callable[[LmdbNodeStore], None]] = {
    1: LmdbNodeStore._migrate_logs_to_wal,
    2: LmdbNodeStore._migrate_history_to_log,
}
"""Data format v -> the migration to v + 1 (`dataformat.py`): one per older format, in order."""
