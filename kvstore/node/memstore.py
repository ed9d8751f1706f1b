"""`MemoryNodeStore`: the `NodeStore` for the deterministic simulator. Standard library only, plus
the storage layer's write-ahead log code (which does all its I/O through an injected file system).

Same behaviour as `LmdbNodeStore` (the contract test runs one suite on both): every group's Raft
log and hard state live in the SAME `storage/nodelogs.NodeLogs` (a `RaftWal`) the real store uses,
here on a `SimFileSystem`; the state machines are plain Python data: the apply logic is
`machine.apply_data` on `MemGroupView` (same session, LRU and shard semantics as the LMDB view),
snapshots use the `snapfile` format and come out byte-identical to LMDB's for the same state, and
`export_range` yields the same `shardcmd` records in the same order. `persist_and_apply` runs the
real store's three steps (snapshot install, the log's records and one sync, the apply
transaction). No clock; randomness only from the injected `random.Random` (fault injection, and
one draw at construction that seeds the simulated disk's crash outcomes).

Durability model (what the simulator relies on):
- the Raft logs: a record is durable once the WAL's `fdatasync` covered it (a cycle's sync; with
  `sync=False`, never, except a segment rotation); `crash()` crashes the simulated disk in its
  random mode: every synced record survives, plus a random prefix of the rest whose last write
  may be torn (the WAL's recovery cuts it). Then `NodeLogs.repair` runs, as the real store's
  start-up does;
- the state machines (and tombstones, the audit head): every write call is one transaction. It
  mutates the live state in place, recording an undo record per change; it becomes VISIBLE when
  the call returns (published scalars such as the applied index are switched at commit, so
  `on_applied` still sees the previous ones); it becomes DURABLE at its sync: with `sync=True` at
  commit (a sync flushes everything before it too: the journal is dropped); with `sync=False` its
  undo records are kept in the journal of unsynced transactions until `fsync()` or a later
  synced transaction; `crash()` undoes the journal newest first (keeping the oldest
  `keep_unsynced`), so everything not synced is gone. Received snapshot files are gone too (LMDB
  deletes them at open). A transaction that raises undoes its records at once.
- the state machines in checkpoint mode (`state_sync="checkpoint"`, as `LmdbNodeStore`'s
  `--state-sync checkpoint`): NO transaction is synced at commit; `checkpoint()` makes all of
  them durable at once (before a cycle once `checkpoint_every` cycles applied since the last one,
  after a snapshot install, between a destroy's state-machine write and its log record, after an
  audit head) and records each group's applied index then, which bounds `compact` (the WAL is the
  state machine's redo log from there). `crash()` undoes EVERY transaction after the last
  checkpoint (the real store restores the checkpoint's meta pages, whatever the OS wrote), so a
  restarted node's cores replay the committed entries from the checkpointed applied indexes. A
  checkpoint has the faults of a sync: a failed fsync raises StorageIOError and changes nothing
  (a forced one is then retried before anything else is written), a torn one crashes the machine
  and survives all or nothing.

Faults (deterministic: one-shot, or a rate drawn from the injected rng per synced step; the rng is
drawn only for a rate > 0, so adding no faults changes no random sequence):
- failed fsync (`fail_next_fsync`, `FaultRates.fsync`): of the log's sync, the call raises
  StorageIOError with the records written but not durable (a crash may lose them; the retry
  writes them again); of a transaction, it raises StorageIOError and the transaction is undone.
  A caller may assume exactly what `StorageError` promises (`node/store.py`) and may retry; it may
  not assume the retry succeeds, nor (as PostgreSQL learnt of real fsync errors) that anything
  written since the last successful sync reached the disk;
- full disk (`fill_disk`, `FaultRates.full_disk`): every write (and `receive_snapshot`) raises
  StorageFullError before writing anything and sets `full`, until `free_space()`; the next
  successful write clears `full` (as LMDB's does). The disk stays full across a crash;
- torn write (`tear_next_sync`, `FaultRates.torn`): the machine crashes DURING a sync. The call
  raises `SimulatedCrash` (not a StorageError: the process is gone, nothing may handle it); the
  store is dead until `crash()`. During the log's sync: the cycle's records survive as the
  simulated disk's crash decides (a prefix, maybe torn). During a transaction's (after
  `on_applied` ran): that transaction (and the unsynced ones before it) survives all or nothing,
  chosen by `torn_model` (LMDB's transactions are atomic via its meta-page flip).

Memory is not bounded (the simulator runs small states); the costs per transaction are the changes
it makes (no copy of the durable image: the undo journal is the difference).
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    RaftError,
    SnapshotMeta,
    bootstrap_entries,
)
from ..shard.ranges import IntervalSet, key_hash
from ..storage import changefeed, leases, mvcc, xtxn, xtxn_apply
from ..storage.commands import MAX_KEY_SIZE, ApplyResult, decode_result
from ..storage.errors import (
    SnapshotFormatError,
    StorageClosedError,
    StorageError,
    StorageFullError,
    StorageIOError,
)
from ..storage.machine import LIMITS, SessionHead, SessionLimits, SessionMeta, apply_data
from ..storage.mvcc_mem import N_TABLES, MemRows
from ..storage.nodelogs import NodeLogs, WalLogStorage, log_is_empty
from ..storage.shardcmd import (
    REC_CLOSED,
    REC_DATA,
    REC_FLOOR,
    REC_HISTORY,
    REC_LEASE,
    REC_RESULT,
    U64,
    U64_PAIR,
    ShardState,
    encode_closed,
    encode_record,
)
from ..storage.snapfile import (
    TAG_DATA,
    TAG_LEASES,
    TAG_MEMBER,
    TAG_REV_BASE,
    TAG_REV_CHANGES,
    TAG_REV_HIST,
    TAG_REV_KEYS,
    TAG_REV_STATE,
    TAG_SESSION,
    TAG_SHARDS,
    Record,
    SnapshotDecoder,
    encode_snapshot,
)
from ..storage.wal import CRASH_RANDOM, SimFileSystem, WalOptions
from .store import ApplyBatch, ApplyResults, AuditHead, GroupWrite, NodeStore

T = TypeVar("T")

SESSION_META_KEY = b"M"
"""The session meta row's key in a snapshot (as LMDB's `layout.SESSION_META_TAG`)."""
SNAPSHOT_DIR = Path("/memstore/snapshots")
"""A virtual directory: received snapshots live in memory under paths in it (nothing touches a disk)."""

WAL_OPTIONS = WalOptions(segment_bytes=64 << 10)
"""Small segments, so the simulator's runs rotate and checkpoint the log."""
_MISSING: Any = object()
_NORMAL = EntryType.NORMAL
_CONF_CHANGE = EntryType.CONF_CHANGE


class SimulatedCrash(Exception):
    """The machine crashed during a sync (a torn write). The store is dead: call `crash()`."""


TornWriteModel = Callable[[random.Random, int], int]
"""(rng, records in the torn transaction) -> how many of them survive the crash, a prefix."""


def all_or_nothing(rng: random.Random, records: int) -> int:
    """LMDB's model: a transaction is durable whole (its meta page made it) or not at all."""
    return records if rng.random() < 0.5 else 0


@dataclass(slots=True)
class FaultRates:
    """Probabilities per synced write transaction (drawn from the store's rng)."""

    fsync: float = 0.0
    full_disk: float = 0.0
    torn: float = 0.0


@dataclass(slots=True, frozen=True)
class _Applied:
    """Published: applied index, the configuration in force there, and the shard state."""

    index: int = 0
    conf_state: ConfState = field(default_factory=ConfState)
    shards: ShardState | None = None


@dataclass(slots=True)
class _Group:
    """One group's state. Invariants: `lru` is sorted and holds exactly (head.last, cid) for each
    head; `results` keys are clients (possibly with an empty dict); `keys` is None or the sorted
    keys of `data`; `meta` None means no session meta row (as in LMDB)."""

    applied: _Applied = field(default_factory=_Applied)
    snap_base: SnapshotMeta | None = None
    """The base of the last snapshot installed (for `NodeLogs.repair` after a crash)."""
    data: dict[bytes, bytes] = field(default_factory=dict)
    heads: dict[int, SessionHead] = field(default_factory=dict)
    results: dict[int, dict[int, bytes]] = field(default_factory=dict)
    lru: list[tuple[int, int]] = field(default_factory=list)
    meta: SessionMeta | None = None
    members: dict[int, bytes] = field(default_factory=dict)
    keys: list[bytes] | None = None
    rows: MemRows = field(default_factory=MemRows)
    """The MVCC tables (`storage/mvcc.py`)."""

    def sorted_keys(self) -> list[bytes]:
        k = self.keys
        if k is None:
            k = self.keys = sorted(self.data)
        return k


# Undo records: (op, target, key, old).
_U_DICT = 0  # target: dict; old value or _MISSING (pop)
_U_DATA = 1  # target: _Group; a data key (also invalidates the sorted key cache)
_U_ATTR = 2  # target: object; key: attribute name
_U_LRU_ADD = 3  # target: _Group; key: the LRU item added
_U_LRU_DEL = 4  # target: _Group; key: the LRU item removed
_U_SET_ADD = 6  # target: set; key: the item added
_U_ROWS = 7  # target: MemRows; key: (table, row key); old: the old value or None
Undo = tuple[int, Any, Any, Any]


def _undo(records: list[Undo], keep: int = 0) -> None:
    """Undo `records[keep:]`, newest first."""
    for i in range(len(records) - 1, keep - 1, -1):
        op, target, key, old = records[i]
        if op == _U_DATA:
            if old is _MISSING:
                del target.data[key]
            else:
                target.data[key] = old
            target.keys = None
        elif op == _U_DICT:
            if old is _MISSING:
                del target[key]
            else:
                target[key] = old
        elif op == _U_ATTR:
            setattr(target, key, old)
        elif op == _U_LRU_ADD:
            lru = target.lru
            del lru[bisect_left(lru, key)]
        elif op == _U_LRU_DEL:
            insort(target.lru, key)
        elif op == _U_SET_ADD:
            target.discard(key)
        elif op == _U_ROWS:
            target.restore(key[0], key[1], old)


class MemGroupView:
    """`machine.StateView` of one group inside a transaction; every change is recorded in `undo`."""

    __slots__ = ("_g", "_u", "changed", "group", "index", "shards")

    def __init__(self, g: _Group, undo: list[Undo], shards: ShardState | None, group: int) -> None:
        self._g = g
        self._u = undo
        self.shards = shards
        self.changed = False
        self.index = 0
        self.group = group

        def record(rows: MemRows, t: int, k: bytes, old: bytes | None) -> None:
            undo.append((_U_ROWS, rows, (t, k), old))

        g.rows.undo = record

    @property
    def mvcc(self) -> MemRows:
        return self._g.rows

    def get(self, key: bytes) -> bytes | None:
        return self._g.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        g = self._g
        old = g.data.get(key, _MISSING)
        g.data[key] = value
        self._u.append((_U_DATA, g, key, old))
        if old is _MISSING:
            g.keys = None

    def delete(self, key: bytes) -> bool:
        g = self._g
        old = g.data.pop(key, _MISSING)
        if old is _MISSING:
            return False
        self._u.append((_U_DATA, g, key, old))
        g.keys = None
        return True

    def session_head(self, client_id: int) -> SessionHead | None:
        return self._g.heads.get(client_id)

    def _lru_del(self, item: tuple[int, int]) -> None:
        lru = self._g.lru
        i = bisect_left(lru, item)
        if i < len(lru) and lru[i] == item:
            del lru[i]
            self._u.append((_U_LRU_DEL, self._g, item, None))

    def _lru_add(self, item: tuple[int, int]) -> None:
        lru = self._g.lru
        i = bisect_left(lru, item)
        if i == len(lru) or lru[i] != item:
            lru.insert(i, item)
            self._u.append((_U_LRU_ADD, self._g, item, None))

    def set_session_head(self, client_id: int, head: SessionHead, old: SessionHead | None) -> None:
        g = self._g
        if old is not None:
            self._lru_del((old.last, client_id))
        self._u.append((_U_DICT, g.heads, client_id, g.heads.get(client_id, _MISSING)))
        g.heads[client_id] = head
        self._lru_add((head.last, client_id))

    def delete_session(self, client_id: int, head: SessionHead) -> None:
        g = self._g
        self._lru_del((head.last, client_id))
        old = g.heads.pop(client_id, _MISSING)
        if old is not _MISSING:
            self._u.append((_U_DICT, g.heads, client_id, old))
        res = g.results.pop(client_id, _MISSING)
        if res is not _MISSING:
            self._u.append((_U_DICT, g.results, client_id, res))  # the detached dict is not mutated again

    def oldest_session(self) -> tuple[int, int] | None:
        lru = self._g.lru
        return lru[0] if lru else None

    def session_meta(self) -> SessionMeta:
        m = self._g.meta
        return SessionMeta() if m is None else m

    def set_session_meta(self, meta: SessionMeta) -> None:
        g = self._g
        self._u.append((_U_ATTR, g, "meta", g.meta))
        g.meta = meta

    def session_result(self, client_id: int, seq: int) -> bytes | None:
        d = self._g.results.get(client_id)
        return None if d is None else d.get(seq)

    def put_session_result(self, client_id: int, seq: int, result: bytes) -> None:
        g = self._g
        d = g.results.get(client_id)
        if d is None:
            d = g.results[client_id] = {}
            self._u.append((_U_DICT, g.results, client_id, _MISSING))
        self._u.append((_U_DICT, d, seq, d.get(seq, _MISSING)))
        d[seq] = result

    def forget_results(self, client_id: int, old_floor: int, new_floor: int) -> None:
        d = self._g.results.get(client_id)
        if not d or new_floor <= old_floor:
            return
        for s in [s for s in d if s < new_floor]:
            self._u.append((_U_DICT, d, s, d.pop(s)))

    def set_shards(self, st: ShardState) -> None:
        self.shards = st
        self.changed = True

    def delete_hashes(self, ranges: IntervalSet) -> int:
        gone = [k for k in self._g.data if key_hash(k) in ranges]
        for k in gone:
            self.delete(k)
        return len(gone)


_EMPTY_APPLIED = _Applied()


class ListStream(Generic[T]):
    """A `ReadStream` over items computed when the read was made (one consistent view)."""

    __slots__ = ("_it",)

    def __init__(self, it: Iterator[T]) -> None:
        self._it = it

    def __iter__(self) -> ListStream[T]:
        return self

    def __next__(self) -> T:
        return next(self._it)

    def close(self) -> None:
        self._it = iter(())


class MemoryNodeStore:
    """The in-memory `NodeStore`. See the module docstring for the durability model and faults."""

    def __init__(
        self,
        *,
        sync: bool = True,
        rng: random.Random | None = None,
        rates: FaultRates | None = None,
        snapshot_chunk_size: int = 1 << 20,
        session_limits: SessionLimits = LIMITS,
        torn_model: TornWriteModel = all_or_nothing,
        wal_fs: SimFileSystem | None = None,
        state_sync: str = "commit",
        checkpoint_every: int = 32,
    ) -> None:
        self.rng = rng if rng is not None else random.Random(0)
        self._fs = wal_fs if wal_fs is not None else SimFileSystem(random.Random(self.rng.getrandbits(64)))
        """The simulated disk holding the Raft logs' write-ahead log (its own rng, drawn once
        from `rng` here: its crashes keep random prefixes of the unsynced writes, maybe torn)."""
        self._wal = NodeLogs(self._fs, WAL_OPTIONS, sync=sync)
        self._wal_unsynced = 0
        self._wal_sync_failed = False
        """A WAL fsync failed and none succeeded since: the next cycle flushes, whatever its records
        (a retried cycle's records are already in the logs in memory, so it may stage none, or a
        vote that looks like "commit only" to `must_sync`)."""
        self.rates = rates if rates is not None else FaultRates()
        self.snapshot_chunk_size = snapshot_chunk_size
        self.session_limits = session_limits
        """Part of the replicated apply logic: the same on every replica (as `KVState`'s)."""
        self.torn_model = torn_model
        self._groups: dict[int, _Group] = {}
        self._tombstones: set[int] = set()
        self._audit_head: AuditHead | None = None
        self._journal: list[list[Undo]] = []
        """Undo records of the transactions committed since the last sync, oldest first."""
        self._torn: list[Undo] | None = None
        self._received: dict[str, list[bytes]] = {}
        self._recv_seq = 0
        self._in_txn = False
        self._closed = False
        self._dead = False
        self._full = False
        self._disk_full = False
        self._fail_fsync = 0
        self._tear = 0
        self.syncs = 0
        self.transactions = 0
        if state_sync not in ("checkpoint", "commit"):
            raise ValueError(f"state_sync must be 'checkpoint' or 'commit', not {state_sync!r}")
        self.state_sync = state_sync
        self.checkpointed = state_sync == "checkpoint"
        self.checkpoint_every = checkpoint_every
        self.checkpoints = 0
        self._ckpt_applied: dict[int, int] = {}
        """group -> its applied index at the last checkpoint (what a crash keeps)."""
        self._ckpt_cycles = 0
        self._ckpt_forced = False
        """A forced checkpoint (install, destroy) failed: the next write checkpoints first."""
        self._ckpt_torn = False

    @property
    def sync(self) -> bool:
        """With False, transactions (and the WAL's records) are visible at once but durable only
        at the next sync."""
        return self._wal.sync_enabled

    @sync.setter
    def sync(self, on: bool) -> None:
        self._wal.sync_enabled = on

    # --- faults and crashes -----------------------------------------------------------------
    def fail_next_fsync(self, n: int = 1) -> None:
        """The next `n` synced transactions fail their fsync (StorageIOError, undone)."""
        self._fail_fsync += n

    def fill_disk(self) -> None:
        """The disk is full from now on, until `free_space()`."""
        self._disk_full = True

    def free_space(self) -> None:
        """The disk has room again (`full` clears at the next successful write)."""
        self._disk_full = False

    def tear_next_sync(self) -> None:
        """The machine crashes during the next sync (see the module docstring)."""
        self._tear += 1

    @property
    def unsynced(self) -> int:
        """How many committed transactions (state machine) and WAL writes a crash may lose now."""
        return len(self._journal) + self._wal_unsynced

    def fsync(self) -> None:
        """Make everything visible durable (as a sync would; no fault is injected here)."""
        self._check_open()
        self._journal.clear()
        self._ckpt_done()
        self._wal.rw.sync()
        self._wal_unsynced = 0
        self.syncs += 1

    def crash(self, keep_unsynced: int = 0) -> MemoryNodeStore:
        """The machine crashed (or the process died): this store becomes unusable, and the store a
        restart finds is returned, built from the durable image only. `keep_unsynced`: how many of
        the oldest unsynced transactions the OS happened to write back anyway (default 0). A torn
        sync in flight survives as `torn_model` decides (with the unsynced ones it was flushing)."""
        if self._in_txn:
            raise RuntimeError("crash() from inside a write transaction")
        if self._ckpt_torn and self.rng.random() < 0.5:  # the torn checkpoint's record made it
            self._journal.clear()
        if self.checkpointed:
            keep_unsynced = 0  # the checkpoint's meta pages are restored: nothing after it survives
        torn = self._torn
        if torn is not None:
            keep = self.torn_model(self.rng, len(torn))
            if keep == len(torn):  # its sync completed: everything before it is durable too
                self._journal.clear()
            else:
                _undo(torn, keep)
                if keep:  # the WAL hook: a prefix of a sequential log means all before it was written
                    self._journal.clear()
        self._lose_unsynced(keep_unsynced)
        self._journal.clear()
        self._torn = None
        self._dead = self._closed = True
        fs = self._fs.crash(CRASH_RANDOM)  # the WAL: what was synced, plus any prefix of the rest (maybe torn)
        new = MemoryNodeStore(
            sync=self.sync, rng=self.rng, rates=self.rates, snapshot_chunk_size=self.snapshot_chunk_size,
            session_limits=self.session_limits, torn_model=self.torn_model, wal_fs=fs,
            state_sync=self.state_sync, checkpoint_every=self.checkpoint_every,
        )
        new._groups = self._groups
        new._tombstones = self._tombstones
        new._audit_head = self._audit_head
        new._disk_full = self._disk_full
        self._groups = {}
        self._tombstones = set()
        groups = new._groups
        gone = new._wal.repair(
            sorted(g for g, st in groups.items() if st.applied.index),
            lambda g: groups[g].applied.index if g in groups else 0,
            lambda g: groups[g].snap_base if g in groups else None,
            new._tombstones,
        )
        for g in gone:
            st = groups.get(g)
            if st is not None and not st.applied.index:
                del groups[g]
        new._ckpt_done()
        return new

    def _lose_unsynced(self, keep_unsynced: int) -> None:
        """At a crash: undo the transactions no sync or checkpoint covered, newest first (but the
        oldest `keep_unsynced`)."""
        for undo in reversed(self._journal[keep_unsynced:]):
            _undo(undo)

    # --- checkpoints (checkpoint mode) ------------------------------------------------------------
    def checkpoint(self) -> None:
        """Make every transaction durable (checkpoint mode; module docstring), with a sync's faults."""
        if not self.checkpointed:
            return
        self._check_open()
        if self._in_txn:
            raise RuntimeError("checkpoint from inside a write transaction")
        if not self.sync:
            return  # nothing ever becomes durable (the planted "acknowledge before fsync")
        if self._disk_full or self._draw(self.rates.full_disk):
            self._disk_full = self._full = True
            raise StorageFullError("simulated: no space left on device (checkpoint record)")
        if self._fail_fsync > 0 or self._draw(self.rates.fsync):
            self._fail_fsync = max(0, self._fail_fsync - 1)
            raise StorageIOError("simulated: fsync of the state machine's checkpoint failed (EIO)")
        if self._tear > 0 or self._draw(self.rates.torn):
            self._tear = max(0, self._tear - 1)
            self._ckpt_torn = self._dead = True
            raise SimulatedCrash("simulated: the machine crashed during a checkpoint")
        self._journal.clear()
        self._ckpt_done()
        self.syncs += 1
        self.checkpoints += 1
        self._full = False

    def _ckpt_done(self) -> None:
        self._ckpt_applied = {g: st.applied.index for g, st in self._groups.items()}
        self._ckpt_cycles = 0
        self._ckpt_forced = False

    def _forced_checkpoint(self) -> None:
        """A checkpoint an ordering needs (install before the WAL's RESET, destroy before DESTROY)."""
        if self.checkpointed:
            self._ckpt_forced = True
            self.checkpoint()

    def checkpointed_applied(self, group: int) -> int:
        """The group's applied index a crash now would keep."""
        if self.checkpointed:
            return self._ckpt_applied.get(group, 0)
        return self._applied_index(group)

    # --- transactions --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._dead:
            raise StorageClosedError("the store crashed; recover it with crash()")
        if self._closed:
            raise StorageClosedError("the store is closed")

    def _live(self) -> dict[int, _Group]:
        self._check_open()
        return self._groups

    def _read(self, group: int) -> _Group | None:
        self._check_open()
        if self._in_txn:
            raise RuntimeError("the store's data was read from inside its write transaction")
        return self._groups.get(group)

    def _group_for_write(self, group: int, undo: list[Undo]) -> _Group:
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group()
            undo.append((_U_DICT, self._groups, group, _MISSING))
        return g

    def _write(self, fn: Callable[[list[Undo]], T]) -> T:
        """Run `fn(undo)` as one transaction, then commit it (faults strike here)."""
        self._check_open()
        if self._in_txn:
            raise RuntimeError("nested write transaction")
        undo: list[Undo] = []
        self._in_txn = True
        try:
            out = fn(undo)
            self._commit(undo)
        except SimulatedCrash:
            self._torn = undo
            self._dead = True
            raise
        except BaseException:
            _undo(undo)
            raise
        finally:
            self._in_txn = False
        return out

    def _draw(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def _commit(self, undo: list[Undo]) -> None:
        if self._disk_full or self._draw(self.rates.full_disk):
            self._disk_full = self._full = True
            raise StorageFullError("simulated: no space left on device")
        self.transactions += 1
        if not self.sync or self.checkpointed:
            self._journal.append(undo)
            self._full = False
            return
        if self._fail_fsync > 0 or self._draw(self.rates.fsync):
            self._fail_fsync = max(0, self._fail_fsync - 1)
            self.transactions -= 1
            raise StorageIOError("simulated: fsync failed (EIO)")
        if self._tear > 0 or self._draw(self.rates.torn):
            self._tear = max(0, self._tear - 1)
            raise SimulatedCrash("simulated: the machine crashed during fsync")
        self._journal.clear()
        self.syncs += 1
        self._full = False

    # --- groups ------------------------------------------------------------------------------
    @property
    def snapshot_dir(self) -> Path:
        return SNAPSHOT_DIR

    @property
    def full(self) -> bool:
        return self._full

    def _has_state(self, gid: int) -> bool:
        st = self._groups.get(gid)
        return (st is not None and st.applied.index != 0) or not log_is_empty(self._wal.log(gid))

    def groups(self) -> list[int]:
        live = self._live()
        return sorted(g for g in set(live) | set(self._wal.groups()) if self._has_state(g))

    def has_group(self, group: int) -> bool:
        self._live()
        return self._has_state(group)

    def tombstones(self) -> set[int]:
        self._check_open()
        return set(self._tombstones)

    def log_storage(self, group: int) -> WalLogStorage:
        groups = self._groups

        def applied() -> tuple[int, ConfState]:
            g = groups.get(group)
            a = _EMPTY_APPLIED if g is None else g.applied
            return a.index, a.conf_state

        return self._wal.view(group, applied)

    def hard_state(self, group: int) -> HardState:
        self._live()
        lg = self._wal.log(group)
        return HardState() if lg is None else lg.hard_state

    def bootstrap(self, group: int, conf: ConfState, data: Sequence[bytes] = ()) -> bool:
        if self.has_group(group) or group in self._tombstones:
            return False
        ents = bootstrap_entries(conf, group)
        ents += [Entry(1, len(ents) + i, EntryType.NORMAL, d, group) for i, d in enumerate(data, 1)]
        self._wal_fault()
        self._wal.bootstrap(group, HardState(1, 0, len(ents)), ents)
        self._wal_flushed()
        return True

    def destroy_group(self, group: int, tombstone: bool = False) -> None:
        def fn(undo: list[Undo]) -> None:
            old = self._groups.pop(group, _MISSING)
            if old is not _MISSING:
                undo.append((_U_DICT, self._groups, group, old))  # detached: never mutated again
            if tombstone and group not in self._tombstones:
                self._tombstones.add(group)
                undo.append((_U_SET_ADD, self._tombstones, group, None))

        if self._ckpt_forced:
            self.checkpoint()
        self._write(fn)  # the state machine first, then the log (`NodeLogs.repair` finishes it)
        self._forced_checkpoint()
        self._wal.destroy(group)

    # --- the audit log's head ---------------------------------------------------------------------
    def audit_head(self) -> AuditHead | None:
        self._check_open()
        return self._audit_head

    def set_audit_head(self, head: AuditHead) -> None:
        def fn(undo: list[Undo]) -> None:
            undo.append((_U_ATTR, self, "_audit_head", self._audit_head))
            self._audit_head = head

        self._write(fn)
        self.checkpoint()  # checkpoint mode: durable on return all the same

    # --- the Ready loop -------------------------------------------------------------------------
    def persist(self, writes: Sequence[GroupWrite]) -> None:
        self.persist_and_apply(writes, ())

    def apply(self, batches: Sequence[ApplyBatch]) -> ApplyResults:
        return self.persist_and_apply((), batches)

    def waits_for_disk(self, writes: Sequence[GroupWrite], batches: Sequence[ApplyBatch]) -> bool:
        """Always (conservative): the simulator's drivers call `persist_and_apply` in line anyway."""
        return True

    def flushes_only_log(self, writes: Sequence[GroupWrite], batches: Sequence[ApplyBatch]) -> bool:
        """Never (conservative), as `waits_for_disk`."""
        return False

    def persist_and_apply(
        self,
        writes: Sequence[GroupWrite],
        batches: Sequence[ApplyBatch],
        on_applied: Callable[[ApplyResults], None] | None = None,
    ) -> ApplyResults:
        """The three steps of `LmdbNodeStore.persist_and_apply`: snapshot installs (one synced
        transaction), the WAL's records and ONE sync, the apply transaction (synced)."""
        if not writes and not batches:
            return []
        self._check_open()
        if self._in_txn:
            raise RuntimeError("nested write transaction")
        installs = self._installs(writes)
        self._check_applies(batches, installs)
        records = self._wal.stage(writes, lambda gid: max(self._applied_index(gid), installs.get(gid, 0)))
        self._wal.check(records)
        files = [str(w.snapshot_file) for w in writes if w.snapshot is not None and w.snapshot_file is not None]
        if self.checkpointed and (self._ckpt_forced or self._ckpt_cycles >= self.checkpoint_every):
            self.checkpoint()  # between cycles: a failure here wrote nothing of this one
        if installs:
            self._write(lambda undo: self._install_all(writes, installs, undo))
            self._forced_checkpoint()  # the install is durable before the WAL's RESET
        if records:
            flush = self._wal.must_sync(records)
            self._wal_fault()
            self._wal.write(records)
            self._wal_sync(flush)
        elif self._wal_sync_failed:
            # A retried cycle whose records were written before the failed fsync stages none now
            # (the logs in memory already hold them): they still have to become durable.
            self._wal_sync(True)
        results: ApplyResults = []
        if batches:
            results = self._write(lambda undo: self._apply_all(batches, on_applied, undo))
            self._ckpt_cycles += 1
        for f in files:
            self._received.pop(f, None)
        return results

    def _applied_index(self, gid: int) -> int:
        g = self._groups.get(gid)
        return 0 if g is None else g.applied.index

    def _installs(self, writes: Sequence[GroupWrite]) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in writes:
            if w.snapshot is None:
                continue
            if w.snapshot_file is None:
                raise ValueError(f"group {w.group}: a snapshot write needs its snapshot_file")
            if w.snapshot.index > max(self._applied_index(w.group), out.get(w.group, 0)):
                out[w.group] = w.snapshot.index
        return out

    def _check_applies(self, batches: Sequence[ApplyBatch], installs: dict[int, int]) -> None:
        idx: dict[int, int] = {}
        for b in batches:
            cur = idx.get(b.group)
            if cur is None:
                cur = max(self._applied_index(b.group), installs.get(b.group, 0))
            for e in b.entries:
                if e.index <= cur:
                    continue
                if e.index != cur + 1:
                    raise RaftError(f"group {b.group}: entry {e.index} applied after {cur}: entries would be lost")
                cur = e.index
            idx[b.group] = cur

    def _install_all(self, writes: Sequence[GroupWrite], installs: dict[int, int], undo: list[Undo]) -> None:
        for w in writes:
            snap, gid = w.snapshot, w.group
            if snap is None or w.snapshot_file is None or installs.get(gid) != snap.index:
                continue
            g = self._group_for_write(gid, undo)
            a = self._install(g, gid, snap, str(w.snapshot_file), undo)
            undo.append((_U_ATTR, g, "snap_base", g.snap_base))
            g.snap_base = snap
            undo.append((_U_ATTR, g, "applied", g.applied))
            g.applied = a

    def _apply_all(
        self, batches: Sequence[ApplyBatch], on_applied: Callable[[ApplyResults], None] | None, undo: list[Undo]
    ) -> ApplyResults:
        applied: dict[int, _Applied] = {}
        results: ApplyResults = []
        for b in batches:
            g = self._group_for_write(b.group, undo)
            cur = applied.get(b.group, g.applied)
            res, applied[b.group] = self._apply(g, b, cur, undo)
            results.append(res)
        if on_applied is not None and results:
            on_applied(results)
        # Publish (still inside the transaction: a failing commit undoes it).
        for gid, a in applied.items():
            g = self._groups[gid]
            if a is not g.applied:
                undo.append((_U_ATTR, g, "applied", g.applied))
                g.applied = a
        return results

    # --- the WAL step's faults ----------------------------------------------------------------------
    def _wal_fault(self) -> None:
        """Before the WAL is written: a full disk refuses it (nothing written)."""
        if self._disk_full or self._draw(self.rates.full_disk):
            self._disk_full = self._full = True
            raise StorageFullError("simulated: no space left on device (write-ahead log)")

    def _wal_sync(self, flush: bool) -> None:
        """The WAL's one sync of a cycle, with the faults of a synced transaction: a failed
        fsync raises StorageIOError (the records stay written, not durable: the retry writes them
        again), a torn write is the machine crashing during the sync (`crash()` keeps a random
        prefix of the unsynced writes, maybe torn)."""
        if self._wal_sync_failed:
            flush = True
        if not flush or not self.sync:
            self._wal.sync(flush=False)
            self._wal_unsynced += 1
            self._full = False
            return
        if self._fail_fsync > 0 or self._draw(self.rates.fsync):
            self._fail_fsync = max(0, self._fail_fsync - 1)
            self._wal_unsynced += 1
            self._wal_sync_failed = True
            raise StorageIOError("simulated: fsync of the write-ahead log failed (EIO)")
        if self._tear > 0 or self._draw(self.rates.torn):
            self._tear = max(0, self._tear - 1)
            self._dead = True
            raise SimulatedCrash("simulated: the machine crashed during the write-ahead log's fsync")
        self._wal.sync()
        self._wal_flushed()

    def _wal_flushed(self) -> None:
        self._wal_unsynced = 0
        self._wal_sync_failed = False
        self.syncs += 1
        self._full = False

    def _apply(
        self, g: _Group, b: ApplyBatch, cur: _Applied, undo: list[Undo]
    ) -> tuple[list[ApplyResult | None], _Applied]:
        """`KVState.stage_apply` on memory."""
        view = MemGroupView(g, undo, cur.shards, b.group)
        limits = self.session_limits
        idx = cur.index
        results: list[ApplyResult | None] = []
        for e in b.entries:
            if e.index <= idx:
                results.append(None)
                continue
            if e.index != idx + 1:
                raise RaftError(f"group {b.group}: entry {e.index} applied after {idx}: entries would be lost")
            idx = e.index
            if e.type == _NORMAL and e.data:
                view.index = idx
                res = apply_data(view, e.data, limits)
                res.index = idx
                results.append(res)
            else:
                results.append(None)
                if e.type == _CONF_CHANGE:
                    _apply_member(g, e.data, undo)
        if idx == cur.index:
            return results, cur
        return results, _Applied(idx, b.conf_state, view.shards)

    def _install(self, g: _Group, gid: int, meta: SnapshotMeta, name: str, undo: list[Undo]) -> _Applied:
        """`KVState.stage_install` on memory: replace the group's rows by the received snapshot's."""
        chunks = self._received.get(name)
        if chunks is None:
            raise StorageError(f"snapshot file {name} does not exist")
        dec = SnapshotDecoder()
        records: list[Record] = []
        for c in chunks:
            records += dec.feed(c)
        dec.finish()
        h = dec.header
        assert h is not None  # finish() raised otherwise
        if h.group != gid:
            raise SnapshotFormatError(f"snapshot file {name} is of group {h.group}, not {gid}")
        hm = h.meta
        if (hm.index, hm.term) != (meta.index, meta.term) or (
            sorted(hm.conf_state.voters), sorted(hm.conf_state.learners)
        ) != (sorted(meta.conf_state.voters), sorted(meta.conf_state.learners)):
            raise SnapshotFormatError(
                f"snapshot file {name} is at index {hm.index} term {hm.term} {hm.conf_state}, "
                f"but is installed as index {meta.index} term {meta.term} {meta.conf_state}"
            )
        data: dict[bytes, bytes] = {}
        heads: dict[int, SessionHead] = {}
        results: dict[int, dict[int, bytes]] = {}
        members: dict[int, bytes] = {}
        shards: ShardState | None = None
        smeta = SessionMeta()
        rows = MemRows()
        log = mvcc.LogBuilder(rows)
        for tag, key, value in records:
            if tag == TAG_SHARDS:
                shards = _decode_shards(value)
                continue
            if len(key) > MAX_KEY_SIZE:
                raise SnapshotFormatError(f"snapshot file {name} has a key of {len(key)} bytes")
            try:
                if TAG_REV_BASE <= tag <= TAG_LEASES:
                    if tag == TAG_REV_STATE:
                        log.compact = mvcc.RevState.decode(value).compact
                    elif tag in (TAG_REV_KEYS, TAG_REV_HIST):  # as `LmdbNodeStore`: built as they come
                        (log.key if tag == TAG_REV_KEYS else log.hist)(key, value)
                        continue
                    elif tag == TAG_LEASES:
                        leases.check_rows(key, value)
                    elif tag - TAG_REV_BASE in (mvcc.T_TXN, mvcc.T_INTENTS):
                        xtxn.check_rows(tag - TAG_REV_BASE, key, value)
                    elif tag == TAG_REV_CHANGES:  # derived again from the history (`mvcc.LogBuilder`)
                        mvcc.check_change_row(key, value)
                        continue
                    rows.put(tag - TAG_REV_BASE, key, value)
                elif tag == TAG_DATA:
                    data[key] = value
                elif tag == TAG_SESSION:
                    if len(key) == 8:
                        heads[U64.unpack(key)[0]] = SessionHead.decode(value)
                    elif len(key) == 16:
                        decode_result(value)
                        cid, seq = U64_PAIR.unpack(key)
                        results.setdefault(cid, {})[seq] = value
                    elif key == SESSION_META_KEY:
                        smeta = SessionMeta.decode(value)
                    else:
                        raise ValueError(f"session row key of {len(key)} bytes")
                elif tag == TAG_MEMBER:
                    if len(key) != 8:
                        raise ValueError(f"member row key of {len(key)} bytes")
                    members[U64.unpack(key)[0]] = value
            except ValueError as err:
                raise SnapshotFormatError(f"snapshot file {name} has a bad row: {err}") from None
        try:
            log.finish()
        except ValueError as err:
            raise SnapshotFormatError(f"snapshot file {name} has a bad history: {err}") from None
        for attr, new in (
            ("data", data), ("heads", heads), ("results", results), ("members", members), ("rows", rows),
            ("lru", sorted((h.last, cid) for cid, h in heads.items())),
            ("meta", SessionMeta(len(heads), smeta.horizon, smeta.evicted)
             if heads or smeta != SessionMeta() else None),
            ("keys", None),
        ):
            undo.append((_U_ATTR, g, attr, getattr(g, attr)))
            setattr(g, attr, new)
        return _Applied(hm.index, hm.conf_state, shards)

    def compact(self, group: int, index: int) -> None:
        """In checkpoint mode never past the group's applied index at the last checkpoint (as
        `LmdbNodeStore.compact`): `index` is lowered to it."""
        self._check_open()
        applied = self._applied_index(group)
        if self.checkpointed and index <= applied:
            index = min(index, self._ckpt_applied.get(group, 0))
        self._wal.compact(group, index, applied)

    # --- state ----------------------------------------------------------------------------------
    def applied_index(self, group: int) -> int:
        g = self._live().get(group)
        return 0 if g is None else g.applied.index

    def applied_conf_state(self, group: int) -> ConfState:
        g = self._live().get(group)
        return ConfState() if g is None else g.applied.conf_state

    def shard_state(self, group: int) -> ShardState | None:
        g = self._live().get(group)
        return None if g is None else g.applied.shards

    def session_meta(self, group: int) -> SessionMeta:
        g = self._read(group)
        return SessionMeta() if g is None or g.meta is None else g.meta

    def count_keys(self, group: int) -> int:
        g = self._read(group)
        return 0 if g is None else len(g.data)

    def members(self) -> dict[int, str]:
        self._check_open()
        out: dict[int, str] = {}
        for gid in sorted(self._groups):
            m = self._groups[gid].members
            for node in sorted(m):
                out[node] = m[node].decode(errors="replace")
        return out

    def export_range(
        self, group: int, ranges: IntervalSet, chunk_bytes: int = 512 << 10
    ) -> ListStream[tuple[bytes, int]]:
        g = self._read(group)
        st = None if g is None else g.applied.shards
        if g is None or st is None or not ranges.issubset(st.frozen):
            raise StorageError(f"group {group} has not frozen the ranges to export")
        rst = mvcc.rev_state(g.rows)
        recs: list[tuple[bytes, bool]] = [(encode_record(REC_CLOSED, b"", encode_closed(rst.last, rst.compact, rst.kept)), False)]
        data = g.data
        for k in g.sorted_keys():
            if key_hash(k) in ranges:
                recs.append((encode_record(REC_DATA, k, data[k]), True))
        for k, _ in g.rows.iter(mvcc.T_KEYS, b"", None):
            if key_hash(k) in ranges:
                recs.append((encode_record(REC_HISTORY, k, mvcc.encode_versions(mvcc.key_history(g.rows, k))), False))
        for k, lid in leases.attachments(g.rows, lambda key: key_hash(key) in ranges):
            recs.append((encode_record(REC_LEASE, k, U64.pack(lid)), False))
        for key, value in _session_rows(g, meta=False):
            if len(key) == 8:
                recs.append((encode_record(REC_FLOOR, key, U64.pack(SessionHead.decode(value).floor)), False))
            else:
                recs.append((encode_record(REC_RESULT, key, value), False))

        def gen() -> Iterator[tuple[bytes, int]]:
            buf: list[bytes] = []
            size = keys = 0
            for rec, is_data in recs:
                buf.append(rec)
                size += len(rec)
                keys += is_data
                if size >= chunk_bytes:
                    yield b"".join(buf), keys
                    buf, size, keys = [], 0, 0
            if buf:
                yield b"".join(buf), keys

        return ListStream(gen())

    # --- reads -----------------------------------------------------------------------------------
    @property
    def revisions(self) -> MemoryNodeStore:
        return self

    def rev_state(self, group: int) -> mvcc.RevState:
        g = self._read(group)
        return mvcc.RevState() if g is None else mvcc.rev_state(g.rows)

    def min_pending(self, group: int) -> int:
        g = self._read(group)
        return 0 if g is None else xtxn_apply.min_pending(g.rows)

    def range_locks(self, group: int) -> list[bytes]:
        g = self._read(group)
        return [] if g is None else xtxn_apply.lock_intent_rows(g.rows)

    def intents(self, group: int, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        g = self._read(group)
        if g is None:
            return []
        return xtxn_apply.intent_rows(g.rows, start, end, limit)

    def read_rows(self, group: int, fn: Callable[[mvcc.Rows], T]) -> T:
        g = self._read(group)
        return fn(MemRows() if g is None else g.rows)

    def get_version(self, group: int, key: bytes, rev: int = 0, probe: xtxn.IntentProbe | None = None,
                    lease: leases.LeaseProbe | None = None) -> tuple[mvcc.Version | None, mvcc.RevState]:
        if lease is not None and rev:
            raise ValueError("a key's lease is read with its current version only")
        g = self._read(group)
        if g is None:
            return None, mvcc.RevState()
        st = mvcc.rev_state(g.rows)
        if rev and rev < st.compact:
            raise mvcc.Compacted(st.compact)
        if probe is not None:  # the same view (nothing applies in between: one thread)
            probe.rows = xtxn_apply.intent_rows(g.rows, key, key + b"\x00", probe.limit)
        if len(key) > MAX_KEY_SIZE:
            return None, st
        if lease is not None:
            lease.lease = leases.lease_of(g.rows, key)
        return mvcc.version_at(g.rows, key, rev or mvcc.REVISION_MAX, g.data.get(key)), st

    def scan_versions(
        self, group: int, start: bytes, end: bytes | None, limit: int, rev: int, chunk_items: int, chunk_bytes: int,
        owned: IntervalSet | None = None, probe: xtxn.IntentProbe | None = None,
    ) -> tuple[mvcc.RevState, ListStream[list[tuple[bytes, mvcc.Version]]]]:
        g = self._read(group)
        if g is None:
            return mvcc.RevState(), ListStream(iter(()))
        st = mvcc.rev_state(g.rows)
        if rev and rev < st.compact:
            raise mvcc.Compacted(st.compact)
        if probe is not None:
            probe.rows = xtxn_apply.intent_rows(g.rows, start, end, probe.limit)
        data = g.data
        current = iter([(k, data[k]) for k in self._range(g, start, end)])
        items: list[tuple[bytes, mvcc.Version]] = []
        for k, v in mvcc.versions_in_range(g.rows.copy(), current, start, end, rev):
            if owned is not None and key_hash(k) not in owned:
                continue
            items.append((k, v))
            if len(items) == limit:
                break
        chunks = [items[i : i + chunk_items] for i in range(0, len(items), chunk_items)]
        return st, ListStream(iter(chunks))

    def changes(
        self, group: int, lo: int, hi: int, max_events: int, max_bytes: int, prev_kv: bool
    ) -> changefeed.ChangeBatch:
        g = self._read(group)
        if g is None:
            return changefeed.ChangeBatch(mvcc.RevState(), [], hi)
        return changefeed.read_changes(g.rows, lo, hi, max_events=max_events, max_bytes=max_bytes, prev_kv=prev_kv)

    def retention_step(self, group: int, walk: mvcc.RetentionWalk, max_rows: int = 0) -> bool:
        g = self._read(group)
        if g is None:
            walk.done = True
            return True
        return mvcc.retention_step(g.rows, walk, max_rows)

    # --- reads -----------------------------------------------------------------------------------
    def get(self, group: int, key: bytes) -> bytes | None:
        g = self._read(group)
        if g is None or len(key) > MAX_KEY_SIZE:
            return None
        return g.data.get(key)

    def _range(self, g: _Group, start: bytes, end: bytes | None) -> list[bytes]:
        keys = g.sorted_keys()
        lo = bisect_left(keys, start)
        hi = len(keys) if end is None else bisect_left(keys, end)
        return keys[lo:hi] if hi > lo else []

    def scan(self, group: int, start: bytes, end: bytes | None, limit: int = 0) -> list[tuple[bytes, bytes]]:
        g = self._read(group)
        if g is None:
            return []
        keys = self._range(g, start, end)
        if limit > 0:
            keys = keys[:limit]
        return [(k, g.data[k]) for k in keys]

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
    ) -> ListStream[list[tuple[bytes, bytes]]]:
        g = self._read(group)
        pairs: list[tuple[bytes, bytes]] = []
        if g is not None:
            data = g.data
            if owned is not None and owned.is_full():
                owned = None
            for k in self._range(g, start, end):
                if owned is not None and key_hash(k) not in owned:
                    continue
                pairs.append((k, data[k]))
                if len(pairs) == limit:
                    break

        def gen() -> Iterator[list[tuple[bytes, bytes]]]:
            chunk: list[tuple[bytes, bytes]] = []
            size = 0
            for k, v in pairs:
                chunk.append((k, v))
                size += len(k) + len(v)
                if len(chunk) >= chunk_items or size >= chunk_bytes:
                    yield chunk
                    chunk, size = [], 0
            if chunk:
                yield chunk

        return ListStream(gen())

    # --- snapshots --------------------------------------------------------------------------------
    def snapshot_chunks(self, group: int) -> tuple[SnapshotMeta, Iterator[bytes]]:
        g = self._read(group)
        if g is None:
            return SnapshotMeta(), encode_snapshot(group, SnapshotMeta(), iter(()), self.snapshot_chunk_size)
        a = g.applied
        meta = SnapshotMeta(a.index, self.log_storage(group).snapshot().meta.term, a.conf_state)
        records: list[Record] = []
        if a.shards is not None:
            records.append((TAG_SHARDS, b"", a.shards.encode()))
        data = g.data
        records += [(TAG_DATA, k, data[k]) for k in g.sorted_keys()]
        records += [(TAG_SESSION, k, v) for k, v in _session_rows(g, meta=True)]
        records += [(TAG_MEMBER, U64.pack(n), g.members[n]) for n in sorted(g.members)]
        for t in sorted(range(N_TABLES), key=lambda t: TAG_REV_BASE + t != TAG_REV_STATE):  # as `LmdbNodeStore`
            if TAG_REV_BASE + t == TAG_REV_KEYS:  # the history in the exchange form, as `LmdbNodeStore`
                records += mvcc.snapshot_records(g.rows, mvcc.rev_state(g.rows), TAG_REV_BASE)
            elif TAG_REV_BASE + t in (TAG_REV_HIST, TAG_REV_CHANGES):
                continue
            else:
                records += [(TAG_REV_BASE + t, k, v) for k, v in g.rows.iter(t, b"", None)]
        return meta, encode_snapshot(group, meta, records, self.snapshot_chunk_size)

    def receive_snapshot(self, group: int, chunks: Iterable[bytes], directory: Path | None = None) -> Path:
        """Keep the chunks in memory under a new virtual path (`directory` is ignored)."""
        self._check_open()
        if self._disk_full:
            self._full = True
            raise StorageFullError("simulated: no space left on device (receiving a snapshot)")
        kept = [bytes(c) for c in chunks if c]
        self._recv_seq += 1
        path = SNAPSHOT_DIR / f"recv-{group}-{self._recv_seq}.snap"
        self._received[str(path)] = kept
        return path

    # --- metrics and lifecycle ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        groups: dict[int, dict[str, int]] = {}
        for gid in self.groups():
            ls = self.log_storage(gid)
            hs = ls.hard_state
            groups[gid] = {
                "first_index": ls.first_index(),
                "last_index": ls.last_index(),
                "log_entries": ls.last_index() - ls.base.index,
                "applied_index": self._applied_index(gid),
                "term": hs.term,
                "commit": hs.commit,
            }
        return {
            "full": self.full,
            "groups": groups,
            "transactions": self.transactions,
            "syncs": self.syncs,
            "unsynced": self.unsynced,
            "checkpoints": self.checkpoints,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def crashed(self) -> bool:
        """The machine crashed during a sync (a torn write): recover with `crash()`."""
        return self._dead

    def close(self) -> None:
        self._closed = True


def _apply_member(g: _Group, data: bytes, undo: list[Undo]) -> None:
    try:
        cc = ConfChange.decode(data)
    except ValueError:
        return
    m = g.members
    if cc.type == ConfChangeType.REMOVE_NODE:
        if cc.node_id in m:
            undo.append((_U_DICT, m, cc.node_id, m.pop(cc.node_id)))
    elif cc.context:
        undo.append((_U_DICT, m, cc.node_id, m.get(cc.node_id, _MISSING)))
        m[cc.node_id] = cc.context


def _session_rows(g: _Group, meta: bool) -> list[tuple[bytes, bytes]]:
    """The group's session rows as LMDB stores them (key without the group prefix), in key order."""
    rows = [(U64.pack(cid), h.encode()) for cid, h in g.heads.items()]
    for cid, d in g.results.items():
        rows += [(U64_PAIR.pack(cid, seq), v) for seq, v in d.items()]
    if meta and g.meta is not None:
        rows.append((SESSION_META_KEY, g.meta.encode()))
    rows.sort()
    return rows


def _decode_shards(raw: bytes) -> ShardState:
    try:
        return ShardState.decode(bytes(raw))
    except ValueError as err:
        raise StorageError(f"corrupt shard state: {err}") from None


def _is_a_node_store(store: MemoryNodeStore) -> NodeStore:
    """Never called: makes mypy check that `MemoryNodeStore` implements the protocol."""
    return store
