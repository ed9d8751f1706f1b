"""`NodeStore`: the one storage interface of a node, and what a Ready cycle hands it. STANDARD LIBRARY ONLY.

Two implementations: `kvstore.storage.store.LmdbNodeStore` (the server: every group's Raft log in
one write-ahead log, the state machines in one LMDB environment; a cycle is one `fdatasync` of
the log, then one LMDB transaction if it applies) and `kvstore.node.memstore.MemoryNodeStore`
(the simulator: the same write-ahead log code on a simulated file system, the state machines in
plain Python data, deterministic, with a durability model and disk faults). A contract test
(`tests/unit/test_node_store.py`) runs the same suite on both and checks they agree.

Contract shared by every method that writes (`persist_and_apply`, `bootstrap`, `destroy_group`,
`compact`):
- when a call returns, all of it is visible; a call that raises a programming error (RaftError
  for a gap, ValueError) wrote nothing. `persist_and_apply` is up to three steps (a snapshot
  install, the log's records, the apply transaction: `LmdbNodeStore`'s docstring): a
  `StorageError` leaves the steps before the failed one in place, which is harmless (a crash
  right after them leaves the same) and nothing of the failed step; the same call may be
  retried (it writes the log's records again and applies each entry once);
- when it returns on a store opened with `sync=True`, all of it is durable: after a crash (kill -9,
  power loss) the store returns exactly what returned calls wrote. With `sync=False` it is visible
  but may be lost by a machine crash (never half of it);
- `StorageFullError`: the disk is full; `full` is True until a later write succeeds.
  `StorageIOError`: the device failed (e.g. a failed fsync).

Reads see the last returned transaction. Streams (`scan_chunks`, `export_range`,
`snapshot_chunks`) are one consistent view taken when the call was made.

Use a store from one thread (the LMDB server runs `persist_and_apply` on a worker thread while its
event loop reads: allowed, LMDB readers see the last committed state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..raft.storage import LogStorage
from ..raft.types import ConfState, Entry, HardState, SnapshotMeta
from ..shard.ranges import IntervalSet
from ..storage import leases, mvcc, xtxn
from ..storage.changefeed import ChangeBatch
from ..storage.commands import ApplyResult
from ..storage.machine import SessionMeta
from ..storage.shardcmd import ShardState

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")

ApplyResults = list[list[ApplyResult | None]]
"""One list per `ApplyBatch`, one item per entry (None for entries without a data result)."""


@dataclass(slots=True)
class GroupWrite:
    """What to persist for one group (from its Ready): an installed snapshot (metadata + the file
    holding its data, from `receive_snapshot`), new entries (a conflicting suffix is truncated) and
    the hard state."""

    group: int
    entries: list[Entry]
    hard_state: HardState | None = None
    snapshot: SnapshotMeta | None = None
    snapshot_file: Path | None = None


@dataclass(slots=True)
class ApplyBatch:
    """Committed entries of one group to apply, in order, and the configuration in force after
    the last of them (`RaftNode.conf_state_at(last index)`)."""

    group: int
    entries: list[Entry]
    conf_state: ConfState


@dataclass(frozen=True, slots=True)
class AuditHead:
    """Where the node's audit log's MAC chain stood when it last made the log durable
    (`kvstore.security.audit`): the sequence number and MAC of the last line fsynced, and `floor`,
    the first sequence number still kept (lines below it may have been rotated away).

    Recorded only AFTER the lines up to `seq` are fsynced (and `floor` only BEFORE older files are
    deleted), so a crash can never leave a head that the log does not reach."""

    seq: int
    mac: bytes
    floor: int = 1


class ReadStream(Protocol[T_co]):
    """An iterator over one consistent read view; `close()` releases it early (idempotent)."""

    def __iter__(self) -> Iterator[T_co]: ...

    def __next__(self) -> T_co: ...

    def close(self) -> None: ...


class RevisionReads(Protocol):
    """A store's reads at a revision (docs/REVISIONS.md): each call is one consistent view."""

    def rev_state(self, group: int) -> mvcc.RevState:
        """The group's last and compact revisions (committed state)."""
        ...

    def min_pending(self, group: int) -> int:
        """The lowest revision a cross-group transaction reserved in the group and may still
        commit at or above (0: none; `xtxn_apply.min_pending`, committed state)."""
        ...

    def range_locks(self, group: int) -> list[bytes]:
        """The intents (encoded `xtxn.Intent`) of the range locks and lease locks held in the
        group (range deletes and lease deletions in progress; committed state)."""
        ...

    def intents(self, group: int, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """At most `limit` (key, intent row) of cross-group transactions' intents on keys in
        [start, end) (end None: to the last), in key order (committed state)."""
        ...

    def read_rows(self, group: int, fn: Callable[[mvcc.Rows], T]) -> T:
        """`fn` run on the group's committed rows, every table (one read view): the lease table
        (`storage/leases.py`, `leases.T_LEASES`) and the transaction records (`xtxn_apply`) are
        read through it. `fn` only reads."""
        ...

    def get_version(self, group: int, key: bytes, rev: int = 0, probe: xtxn.IntentProbe | None = None,
                    lease: leases.LeaseProbe | None = None) -> tuple[mvcc.Version | None, mvcc.RevState]:
        """The key's version at `rev` (0: now; None: absent) and the group's revision state;
        `probe` (if given) gets the key's intent from the same view, `lease` (if given; `rev` 0
        only: the attachment rows hold the current version's) the lease the key is attached to.
        Raises mvcc.Compacted below the compact revision."""
        ...

    def scan_versions(
        self, group: int, start: bytes, end: bytes | None, limit: int, rev: int, chunk_items: int, chunk_bytes: int,
        owned: IntervalSet | None = None, probe: xtxn.IntentProbe | None = None,
    ) -> tuple[mvcc.RevState, ReadStream[list[tuple[bytes, mvcc.Version]]]]:
        """Keys in [start, end) present at `rev` (0: now) with their versions, in chunks (as
        `NodeStore.scan_chunks`), and the revision state of that view; `probe` (if given) gets
        the intents on keys in [start, end) from the same view. Raises mvcc.Compacted."""
        ...

    def retention_step(self, group: int, walk: mvcc.RetentionWalk, max_rows: int = 0) -> bool:
        """Continue the walk for the group's retention point (`mvcc.retention_step`: the
        compact revision that keeps its newest `walk.keep` write revisions) over at most
        `max_rows` rows (0: no bound) of its committed change log, in one view; True once
        `walk.point` is the answer (0: nothing to compact; a group not here: 0)."""
        ...

    def changes(self, group: int, lo: int, hi: int, max_events: int, max_bytes: int, prev_kv: bool) -> ChangeBatch:
        """The group's changes with lo <= revision <= hi from its change log, in one view
        (`storage/changefeed.py`: whole revisions, at most about `max_events` / `max_bytes`;
        `upto` says how far it got). Raises mvcc.Compacted if lo < the compact revision."""
        ...


class NodeStore(Protocol):
    """A node's durable state: every Raft group's log, hard state and KV state machine. See the
    module docstring for what every write guarantees."""

    @property
    def snapshot_dir(self) -> Path:
        """Where the transport may put received snapshot files (LMDB: under the data directory;
        removed at open, since a received file is useless after a restart)."""
        ...

    @property
    def full(self) -> bool:
        """True after a StorageFullError, until a write succeeds with enough free space."""
        ...

    # --- groups ----------------------------------------------------------------------------
    def groups(self) -> list[int]:
        """Groups with state (log, hard state or applied index), sorted."""
        ...

    def has_group(self, group: int) -> bool:
        """`group in groups()`, in O(1)."""
        ...

    def tombstones(self) -> set[int]:
        """Groups destroyed here with `tombstone=True`: never recreated here (durable like any write)."""
        ...

    def log_storage(self, group: int) -> LogStorage:
        """The group's `LogStorage` (the same object on every call; it follows the group through
        later writes). It shows only what returned transactions wrote."""
        ...

    def bootstrap(self, group: int, conf: ConfState, data: Sequence[bytes] = ()) -> bool:
        """Give a new group its initial log (`bootstrap_entries`, then one NORMAL entry per item of
        `data`, all at term 1 and committed) and HardState(1, 0, len), in one transaction. Every
        initial member must be given the same arguments. Does nothing and returns False if the
        group already has state or a tombstone."""
        ...

    def destroy_group(self, group: int, tombstone: bool = False) -> None:
        """Delete everything of `group` (log, hard state, data, sessions, members, applied index,
        shard state) in one transaction; with `tombstone`, also record that it never comes back."""
        ...

    # --- the Ready loop ------------------------------------------------------------------------
    def waits_for_disk(self, writes: Sequence[GroupWrite], batches: Sequence[ApplyBatch]) -> bool:
        """Might `persist_and_apply(writes, batches)` wait for the disk (an `fdatasync`, or a
        checkpoint made now)? False only when it is sure not to: no entries, snapshot, term or
        vote to make durable (a hard state that moves only the commit index needs no flush)
        and an apply whose commit is not flushed. A driver may run such a call on its event
        loop instead of a thread; the call and its effects are the same either way."""
        ...

    def flushes_only_log(self, writes: Sequence[GroupWrite], batches: Sequence[ApplyBatch]) -> bool:
        """Is the write-ahead log's one `fdatasync` the most `persist_and_apply(writes, batches)`
        may wait for: no snapshot to install, no group without a log yet, no apply whose commit is
        flushed, no checkpoint made now? (`waits_for_disk` is then a question of entries, term
        and vote.) A driver may wait out such a call on its event loop when it is small."""
        ...

    def persist_and_apply(
        self,
        writes: Sequence[GroupWrite],
        batches: Sequence[ApplyBatch],
        on_applied: Callable[[ApplyResults], None] | None = None,
    ) -> ApplyResults:
        """For ALL groups at once (one `fdatasync` of the log, one apply transaction; see the module
        docstring for failures): per write, in order, install
        its snapshot (if newer than the group's applied index and log base; the file is consumed
        either way once the transaction commits), append its entries (truncating a conflicting
        suffix) and set its hard state; then per batch apply its committed entries, in order,
        each exactly once (an entry at or below the applied index is skipped with result None; a
        gap raises RaftError before anything is written), and record the new applied index with
        `conf_state`. The applied index and the data, sessions, members and shard state it covers
        change together; the results are computed inside the transaction, so they are those of
        the state the transaction commits.

        `on_applied(results)`, if given, is called inside the transaction as soon as the results
        are known, before the commit and its fsync (possibly more than once with the same
        results): the entries applied are committed, so their outcome is decided whether or not
        this transaction becomes durable. It must not read the store's data nor write: the
        applied index and shard state it could see are still the previous ones.

        Returns the results (`[]` for a call with nothing to do, which touches nothing)."""
        ...

    def compact(self, group: int, index: int) -> None:
        """Discard log entries <= `index` (which must be <= the applied index and the last index,
        else RaftError) and record (index, term, configuration in force there) as the log's base.
        A no-op (no transaction) if already compacted that far."""
        ...

    # --- state ----------------------------------------------------------------------------------
    def applied_index(self, group: int) -> int:
        """The group's last applied index (0 for an unknown group)."""
        ...

    def shard_state(self, group: int) -> ShardState | None:
        """The ranges the group serves as of its last applied transaction (None: unsharded)."""
        ...

    def session_meta(self, group: int) -> SessionMeta:
        """The group's session count, eviction horizon and evictions so far."""
        ...

    def count_keys(self, group: int) -> int:
        """How many data keys the group holds."""
        ...

    def members(self) -> dict[int, str]:
        """node id -> address, from the contexts of applied conf changes (all groups, in group
        order: a later group's address wins)."""
        ...

    def export_range(
        self, group: int, ranges: IntervalSet, chunk_bytes: int = 512 << 10
    ) -> ReadStream[tuple[bytes, int]]:
        """`shardcmd` install records of the frozen `ranges`: the data rows whose key hash is in
        them (key order), then every session (key order: a head as REC_FLOOR of its floor, each
        cached result as REC_RESULT; not the session meta), in chunks of about `chunk_bytes` with
        each chunk's data-row count. Raises StorageError unless `ranges` are frozen."""
        ...

    # --- the audit log's head --------------------------------------------------------------------
    def audit_head(self) -> AuditHead | None:
        """The audit chain's head last recorded with `set_audit_head` (None: never)."""
        ...

    def set_audit_head(self, head: AuditHead) -> None:
        """Record the audit chain's head: one small transaction, durable like every write (and
        with the same failure contract). May be called from another thread than the Ready loop's
        (the LMDB store serializes its write transactions)."""
        ...

    # --- reads -----------------------------------------------------------------------------------
    def get(self, group: int, key: bytes) -> bytes | None:
        """The value of `key` (None if absent or longer than the key limit)."""
        ...

    def scan(self, group: int, start: bytes, end: bytes | None, limit: int = 0) -> list[tuple[bytes, bytes]]:
        """Pairs with start <= key < end (end None: unbounded), in key order; limit <= 0: no limit."""
        ...

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
    ) -> ReadStream[list[tuple[bytes, bytes]]]:
        """Like `scan` (with `owned`, only keys whose hash is in it; `limit` counts those), in
        chunks of at most `chunk_items` pairs and about `chunk_bytes` (a chunk ends after the pair
        that reaches it); never an empty chunk. May raise ReadInvalidatedError mid-stream."""
        ...

    @property
    def revisions(self) -> RevisionReads:
        """Reads with revisions and per-key metadata (`storage/mvcc.py`)."""
        ...

    # --- snapshots ---------------------------------------------------------------------------------
    def snapshot_chunks(self, group: int) -> tuple[SnapshotMeta, Iterator[bytes]]:
        """(meta, chunks) of the group's state at its applied index in the `snapfile` format, one
        consistent view. Raises SnapshotTemporarilyUnavailable if the term of the applied index
        is not in the log any more."""
        ...

    def receive_snapshot(self, group: int, chunks: Iterable[bytes], directory: Path | None = None) -> Path:
        """Keep incoming snapshot chunks as a received file and return its path, to be installed by
        `persist_and_apply(GroupWrite(..., snapshot=meta, snapshot_file=path))`. Not durable: after
        a crash the file is gone. A full disk raises StorageFullError (nothing kept)."""
        ...

    # --- metrics and lifecycle ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Implementation-specific numbers; always `full` and `groups` (group -> first_index,
        last_index, log_entries, applied_index, term, commit)."""
        ...

    def close(self) -> None:
        """Release the store (open streams become invalid; later calls raise StorageClosedError).
        Idempotent."""
        ...
