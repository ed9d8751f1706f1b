"""`LmdbNodeStore`: a node's durable state (every Raft group's log, hard state and KV state machine) in
one LMDB environment, behind the calls the server's Ready loop makes.

One call = ONE write transaction = one fsync (with sync=True), for ALL groups: `persist_and_apply`
persists every group's snapshot, entries and hard state and applies every group's committed
entries atomically; `persist` and `apply` are its two halves. If a call raises, nothing of it was
written and every cache is unchanged (the call may be retried); `StorageFullError` also sets `full`.

After a restart (even kill -9) the store returns exactly what committed calls wrote: hard states,
logs, log bases, KV data, applied indexes (with their configurations), sessions and members.

Snapshots: `snapshot_chunks` streams a group's state at its applied index from one read
transaction; the receiver stores the chunks in a file (`receive_snapshot`) and installs it with
`persist(GroupWrite(..., snapshot=meta, snapshot_file=path))` inside the normal write
transaction, which deletes the file after commit. `meta` must be the metadata `snapshot_chunks`
returned on the sender (the file's header is checked against it).

Use a NodeStore from one thread only (the node's event loop).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.node.store import ApplyBatch, AuditHead, GroupWrite
from kvstore.node.store import NodeStore as ProtocolNodeStore
from kvstore.raft.types import ConfState, Entry, EntryType, HardState, SnapshotMeta, bootstrap_entries
from kvstore.shard.ranges import IntervalSet

from .commands import ApplyResult
from .errors import StorageError
from .kvstate import AppliedState, KVState, TxnStream
from .layout import (
    AUDIT_HEAD_KEY,
    DB_APPLIED,
    DB_NODEMETA,
    DB_RAFTLOG,
    DB_RAFTSTATE,
    DB_SHARDS,
    TOMBSTONE_TAG,
    U64,
    decode_audit_head,
    encode_audit_head,
)
from .lmdb_env import LmdbEnv
from .machine import SessionMeta
from .raftlog import GroupLogStorage, LogState
from .shardcmd import ShardState
from .snapfile import SnapshotHeader, read_snapshot_header, write_frames

if TYPE_CHECKING:
    from .lmdb_env import Txn

SNAPSHOT_DIR = "snapshots"
SNAPSHOT_SUFFIX = ".snap"


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
    ) -> None:
        self.path = Path(path)
        self.sync = sync
        self.snapshot_chunk_size = snapshot_chunk_size
        self.snapshot_dir = self.path / SNAPSHOT_DIR
        self._env = LmdbEnv(self.path, sync=sync, map_size=map_size, max_map_size=max_map_size)
        self._kv = KVState(self._env)
        self._logs: dict[int, GroupLogStorage] = {}
        self._groups: set[int] = self._scan_groups()
        for g in self._groups:
            self.log_storage(g)
            self._kv.applied(g)
        self._clean_snapshot_dir()

    # --- groups ---------------------------------------------------------------------------------
    def _scan_groups(self) -> set[int]:
        found: set[int] = set()
        with self._env.read() as txn:
            for name in (DB_RAFTSTATE, DB_APPLIED):
                for key in txn.cursor(db=self._env.db(name)).iternext(values=False):
                    found.add(U64.unpack_from(key)[0])
            cur = txn.cursor(db=self._env.db(DB_RAFTLOG))
            ok = cur.first()
            while ok:  # one seek per group, not one step per entry
                g = U64.unpack_from(cur.key())[0]
                found.add(g)
                ok = g < (1 << 64) - 1 and cur.set_range(U64.pack(g + 1))
        return found

    def groups(self) -> list[int]:
        """Groups with state on disk, sorted."""
        return sorted(self._groups)

    def has_group(self, group: int) -> bool:
        return group in self._groups

    def log_storage(self, group: int) -> GroupLogStorage:
        """The group's LogStorage (the same object on every call)."""
        ls = self._logs.get(group)
        if ls is None:
            kv = self._kv

            def applied() -> tuple[int, ConfState]:
                st = kv.applied(group)
                return st.index, st.conf_state

            ls = self._logs[group] = GroupLogStorage(self._env, group, applied)
        return ls

    def bootstrap(self, group: int, conf: ConfState, data: Sequence[bytes] = ()) -> bool:
        """Give a new group its initial log (`bootstrap_entries`, then one NORMAL entry per item of
        `data`, all at term 1 and committed) and HardState(1, 0, len). Every initial member must
        be given the same arguments. Does nothing and returns False if the group already has
        state or a tombstone."""
        if self._has_state(group) or group in self.tombstones():
            return False
        ents = bootstrap_entries(conf, group)
        ents += [Entry(1, len(ents) + i, EntryType.NORMAL, d, group) for i, d in enumerate(data, 1)]
        self.persist([GroupWrite(group, ents, HardState(1, 0, len(ents)))])
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
        return not self.log_storage(group).state.is_empty() or self._kv.applied(group).index != 0

    def destroy_group(self, group: int, tombstone: bool = False) -> None:
        """Delete everything of `group` (log, hard state, data, sessions, members, applied index),
        in one transaction; with `tombstone`, also record that it must never come back here."""
        ls = self.log_storage(group)

        def fn(txn: Txn) -> None:
            ls.stage_destroy(txn)
            self._kv.stage_destroy(txn, group)
            if tombstone:
                txn.put(U64.pack(group) + TOMBSTONE_TAG, b"", db=self._env.db(DB_SHARDS))

        self._env.write(fn)
        ls.reset()
        self._kv.forget(group)
        self._groups.discard(group)

    # --- the Ready loop ----------------------------------------------------------------------
    def persist(self, writes: Sequence[GroupWrite]) -> None:
        """ONE transaction + fsync: per group, in order, install the snapshot (if any), append the
        entries (truncating a conflicting suffix) and set the hard state."""
        self.persist_and_apply(writes, ())

    def apply(self, batches: Sequence[ApplyBatch]) -> list[list[ApplyResult | None]]:
        """ONE transaction: apply each batch's committed entries and record the new applied index
        with its configuration. Returns one result per entry (None for non-data entries)."""
        return self.persist_and_apply((), batches)

    def persist_and_apply(
        self,
        writes: Sequence[GroupWrite],
        batches: Sequence[ApplyBatch],
        on_applied: Callable[[list[list[ApplyResult | None]]], None] | None = None,
    ) -> list[list[ApplyResult | None]]:
        """`persist(writes)` then `apply(batches)`, in ONE transaction and one fsync.

        `on_applied(results)`, if given, is called inside the transaction as soon as the results
        are known, before the commit and its fsync (and again, with the same results, if the
        transaction is retried after growing the map): the entries applied are committed, so
        their outcome is decided whether or not this transaction becomes durable."""
        if not writes and not batches:
            return []
        kv = self._kv

        def fn(
            txn: Txn,
        ) -> tuple[list[list[ApplyResult | None]], dict[int, LogState], dict[int, AppliedState], list[Path]]:
            drafts: dict[int, LogState] = {}
            applied: dict[int, AppliedState] = {}
            files: list[Path] = []
            for w in writes:
                g = w.group
                ls = self.log_storage(g)
                d = drafts.get(g)
                if d is None:
                    d = drafts[g] = ls.draft()
                if w.snapshot is not None:
                    if w.snapshot_file is None:
                        raise ValueError(f"group {g}: a snapshot write needs its snapshot_file")
                    files.append(Path(w.snapshot_file))
                    cur = applied.get(g)
                    if cur is None:
                        cur = kv.applied(g)
                    # A snapshot not newer than what we have is superseded: only its file is dropped.
                    if w.snapshot.index > max(cur.index, d.base.index):
                        applied[g] = kv.stage_install(txn, g, w.snapshot, Path(w.snapshot_file))
                        ls.stage_snapshot(txn, d, w.snapshot)
                ls.stage_append(txn, d, w.entries)
                if w.hard_state is not None:
                    ls.stage_hard_state(txn, d, w.hard_state)
            results: list[list[ApplyResult | None]] = []
            for b in batches:
                cur = applied.get(b.group)
                if cur is None:
                    cur = kv.applied(b.group)
                res, applied[b.group] = kv.stage_apply(txn, b.group, cur, b.entries, b.conf_state)
                results.append(res)
            if on_applied is not None and results:
                on_applied(results)
            return results, drafts, applied, files

        results, drafts, applied, files = self._env.write(fn)
        for g, d in drafts.items():
            self._logs[g].commit_draft(d)
            if not d.is_empty():
                self._groups.add(g)
        for g, a in applied.items():
            kv.commit_applied(g, a)
            if a.index:
                self._groups.add(g)
        for f in files:
            with contextlib.suppress(OSError):
                f.unlink()
        return results

    def compact(self, group: int, index: int) -> None:
        """Discard log entries <= `index` (which must be <= the applied index) and record (index,
        term, configuration there) as the log's base. A no-op if already compacted that far."""
        ls = self.log_storage(group)
        if index <= ls.base.index:
            return
        applied = self._kv.applied(group).index

        def fn(txn: Txn) -> LogState:
            d = ls.draft()
            ls.stage_compact(txn, d, index, applied)
            return d

        ls.commit_draft(self._env.write(fn))

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

        self._env.write(fn)

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
        return self.log_storage(group).hard_state

    def members(self) -> dict[int, str]:
        """node id -> address, from the contexts of applied conf changes (all groups)."""
        return self._kv.members()

    @property
    def full(self) -> bool:
        """True after a StorageFullError, until a write succeeds with enough free disk space."""
        return self._env.full

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
        return self._kv.snapshot_stream(group, self.snapshot_chunk_size)

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
            st = self.log_storage(g).state
            groups[g] = {
                "first_index": st.first,
                "last_index": st.last,
                "log_entries": st.last - st.base.index,
                "applied_index": self._kv.applied(g).index,
                "term": st.hard_state.term,
                "commit": st.hard_state.commit,
            }
        return {
            **self.disk_usage(),
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
        """Close the environment (open streams become invalid). Idempotent."""
        self._env.close()

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
        env = lmdb.open(str(p), readonly=True, lock=True, subdir=True, max_dbs=16)
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
