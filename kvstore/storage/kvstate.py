"""The KV state machine on LMDB: apply committed entries, reads, and snapshots (stream out, install in).

The apply logic itself is `machine.py` (standard library only, shared with the simulator); this
module runs it on an `LmdbGroupView` inside the node's write transaction.

Invariants:
- the applied index of a group (sub-db `applied`) and the data, sessions and members it covers
  change in the SAME write transaction (`stage_apply`, `stage_install`): a crash never applies an
  entry twice or loses one;
- entries are applied strictly in index order, each exactly once: an entry at or below the applied
  index is skipped (result None), a gap raises RaftError (nothing of the batch is written);
- the applied index is recorded with the configuration in force at it (`ApplyBatch.conf_state`),
  which is what a snapshot taken there carries;
- a snapshot stream is read from ONE read transaction, so its metadata (applied index, its term,
  configuration) and its rows are one consistent view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from kvstore.raft.storage import SnapshotTemporarilyUnavailable
from kvstore.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    RaftError,
    SnapshotMeta,
)
from kvstore.shard.ranges import IntervalSet, key_hash

from . import changefeed, leases, mvcc, xtxn, xtxn_apply
from .commands import MAX_KEY_SIZE, ApplyResult, decode_result
from .errors import SnapshotFormatError, StorageError
from .layout import (
    DB_APPLIED,
    DB_DATA,
    DB_MEMBERS,
    DB_REVS,
    DB_SESSION_LRU,
    DB_SESSIONS,
    DB_SHARDS,
    SESSION_META_TAG,
    U64,
    U64_PAIR,
    decode_applied,
    encode_applied,
    group_end,
    group_prefix,
)
from .machine import LIMITS, SessionHead, SessionLimits, SessionMeta, apply_data
from .mvcc_lmdb import LmdbRows, rev_dbs
from .shardcmd import (
    REC_CLOSED,
    REC_DATA,
    REC_FLOOR,
    REC_HISTORY,
    REC_LEASE,
    REC_RESULT,
    ShardState,
    encode_closed,
    encode_record,
)
from .snapfile import (
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
    SnapshotFile,
    encode_snapshot,
)

if TYPE_CHECKING:
    from .lmdb_env import Db, LmdbEnv, Reader, Txn

T = TypeVar("T")

_NORMAL = EntryType.NORMAL
_CONF_CHANGE = EntryType.CONF_CHANGE


@dataclass(slots=True)
class AppliedState:
    """A group's applied index, the configuration in force at it, and its shard state. Published
    (`KVState.commit_applied`) only after the transaction that wrote it committed, so readers
    never see ranges whose data is not durable yet."""

    index: int = 0
    conf_state: ConfState = field(default_factory=ConfState)
    shards: ShardState | None = None


_HEAD_UNREAD = SessionHead(-1, -1, -1)
"""`LmdbGroupView._heads`' marker of a client whose head row was not read yet (never a row)."""
MAX_DIRTY_HEADS = 16
"""Session heads `LmdbGroupView` holds back before it writes them all (bounds `oldest_session`'s
merge, which is linear in them)."""
MAX_STALE_LRU_SKIPS = 4
"""LRU rows of held-back heads `oldest_session` steps over before it writes the heads instead."""


class LmdbGroupView:
    """`machine.StateView` of one group inside a write transaction. The session meta row is read
    once and written through on every change. Values, session rows and the session LRU are read
    and written through cursors kept for the view's life (cheaper than `txn.get` / `txn.put` /
    `txn.delete`, which set one up per call; LMDB keeps them valid across the other writes).

    Session heads are written back, not through: every entry of a session touches its head (and
    so its LRU row), and a batch holds many entries of few sessions. `set_session_head` keeps the
    new head in `_heads` and, the first time in the view, the row it replaces in `_dirty`;
    `flush_sessions` (the end of `stage_apply`, or at once when more than `MAX_DIRTY_HEADS` are
    held) writes each held head once: the replaced row's LRU row deleted, the head and its LRU row
    put. Invariant: the tables plus `_dirty`'s heads are exactly what writing through would have
    left; every read of heads or LRU order merges them (`session_head`, `oldest_session`), and
    `delete_session` flushes first. So the results and the rows do not depend on where batches
    begin and end, which every replica's apply must not (`tests/unit/test_sessions.py`). A batch
    of one entry writes through (`hold_heads` False: holding back would only add work)."""

    __slots__ = (
        "_data", "_dcur", "_dirty", "_front", "_front_end", "_heads", "_hold", "_lcur", "_lru", "_meta", "_p", "_scur",
        "_sessions", "_shards_db", "_txn", "changed", "group", "index", "mvcc", "shards",
    )

    def __init__(
        self, txn: Txn, group: int, data: Db, sessions: Db, shards_db: Db, shards: ShardState | None,
        lru: Db, revs: tuple[Db, ...], hold_heads: bool = True,
    ) -> None:
        self._txn = txn
        self.group = group
        self.mvcc = LmdbRows(txn, group, revs)
        """The group's MVCC tables in this transaction (an attribute, not a property: the write
        path reads it on every write)."""
        self._p = group_prefix(group)
        self._data = data
        self._dcur = txn.cursor(db=data)
        self._scur = txn.cursor(db=sessions)
        self._lcur = txn.cursor(db=lru)
        self._sessions = sessions
        self._shards_db = shards_db
        self._lru = lru
        self._meta: SessionMeta | None = None
        self._heads: dict[int, SessionHead | None] = {}
        """Each client's head as writing through would have left it (None: no head), once read."""
        self._dirty: dict[int, tuple[SessionHead, SessionHead | None]] = {}
        """Clients whose head is held back -> (that head, the head row the tables hold or None)."""
        self._front: list[tuple[int, int]] | None = None
        """The group's first LRU rows as the table holds them, as far as `_lru_row` read them;
        None after the table changed."""
        self._front_end = False
        """Whether `_front` holds all of them."""
        self._hold = hold_heads
        """Whether heads are held back (False: written through, for a batch of one entry, where
        holding back saves nothing)."""
        self.shards = shards
        self.changed = False
        self.index = 0

    def set_shards(self, st: ShardState) -> None:
        self.shards = st
        self.changed = True
        self._txn.put(self._p, st.encode(), db=self._shards_db)

    def delete_hashes(self, ranges: IntervalSet) -> int:
        p = self._p
        cur = self._txn.cursor(db=self._data)
        n = 0
        if not cur.set_range(p):
            return 0
        while True:
            k = cur.key()
            if not k.startswith(p):
                return n
            if key_hash(k[8:]) in ranges:
                n += 1
                if not cur.delete():
                    return n
            elif not cur.next():
                return n

    def get(self, key: bytes) -> bytes | None:
        return self._dcur.get(self._p + key)

    def put(self, key: bytes, value: bytes) -> None:
        self._dcur.put(self._p + key, value)

    def delete(self, key: bytes) -> bool:
        return self._txn.delete(self._p + key, db=self._data)

    # --- sessions -----------------------------------------------------------------------------
    def session_head(self, client_id: int) -> SessionHead | None:
        h = self._heads.get(client_id, _HEAD_UNREAD)
        if h is _HEAD_UNREAD:
            raw = self._scur.get(self._p + U64.pack(client_id))
            h = self._heads[client_id] = None if raw is None else _decode_head(raw)
        return h

    def set_session_head(self, client_id: int, head: SessionHead, old: SessionHead | None) -> None:
        if not self._hold:
            self._write_head(client_id, head, old)
            self._heads[client_id] = head
            self._front = None
            return
        held = self._dirty.get(client_id)
        if held is not None:
            old = held[1]
        elif len(self._dirty) >= MAX_DIRTY_HEADS:
            self.flush_sessions()
        self._dirty[client_id] = (head, old)
        self._heads[client_id] = head

    def _write_head(self, client_id: int, head: SessionHead, old: SessionHead | None) -> None:
        """Store `head` in place of the head row `old` (None: none), its LRU row with it."""
        p, lcur = self._p, self._lcur
        if old is not None and lcur.set_key(p + U64_PAIR.pack(old.last, client_id)):
            lcur.delete()
        self._scur.put(p + U64.pack(client_id), head.encode())
        lcur.put(p + U64_PAIR.pack(head.last, client_id), b"")

    def flush_sessions(self) -> None:
        """Write every held-back head (see the class docstring)."""
        if not self._dirty:
            return
        for cid, (head, old) in self._dirty.items():
            self._write_head(cid, head, old)
        self._dirty.clear()
        self._front = None

    def delete_session(self, client_id: int, head: SessionHead) -> None:
        self.flush_sessions()
        self._front = None
        self._heads[client_id] = None
        txn, db, p = self._txn, self._sessions, self._p
        txn.delete(p + U64_PAIR.pack(head.last, client_id), db=self._lru)
        txn.delete(p + U64.pack(client_id), db=db)
        # The cached results: group + client + seq keys, contiguous after the head row.
        start = p + U64.pack(client_id)
        cur = txn.cursor(db=db)
        if not cur.set_range(start + bytes(8)):
            return
        while cur.key()[:16] == start:
            if not cur.delete():
                break

    def _lru_row(self, i: int) -> tuple[int, int] | None:
        """The group's `i`-th LRU row as the table holds it (None: it has fewer), read once: the
        rows read are kept in `_front` until the table changes, and the kept cursor stays on the
        last of them (only `flush_sessions` moves it otherwise, and it clears `_front`)."""
        front = self._front
        if front is None:
            front = self._front = []
            self._front_end = False
        if i < len(front):
            return front[i]
        if self._front_end:
            return None
        cur, p = self._lcur, self._p
        while len(front) <= i:
            if not (cur.set_range(p) if not front else cur.next()) or (k := cur.key())[:8] != p:
                self._front_end = True  # (an exhausted cursor's next() would start over)
                return None
            front.append(U64_PAIR.unpack_from(k, 8))
        return front[i]

    def oldest_session(self) -> tuple[int, int] | None:
        dirty = self._dirty
        found = self._lru_row(0)
        if dirty:
            i = 0
            while found is not None:
                held = dirty.get(found[1])
                if held is None or held[1] is None or held[1].last != found[0]:
                    break
                # the row a held-back head replaces: gone when written through
                i += 1
                if i > MAX_STALE_LRU_SKIPS:
                    self.flush_sessions()
                    return self.oldest_session()
                found = self._lru_row(i)
            first = min((h.last, c) for c, (h, _) in dirty.items())
            if found is None or first < found:
                return first
        return found

    def session_meta(self) -> SessionMeta:
        m = self._meta
        if m is None:
            raw = self._txn.get(self._p + SESSION_META_TAG, db=self._sessions)
            m = self._meta = SessionMeta() if raw is None else _decode_meta(raw)
        return m

    def set_session_meta(self, meta: SessionMeta) -> None:
        self._meta = meta
        self._txn.put(self._p + SESSION_META_TAG, meta.encode(), db=self._sessions)

    def session_result(self, client_id: int, seq: int) -> bytes | None:
        return self._scur.get(self._p + U64_PAIR.pack(client_id, seq))

    def put_session_result(self, client_id: int, seq: int, result: bytes) -> None:
        self._scur.put(self._p + U64_PAIR.pack(client_id, seq), result)

    def forget_results(self, client_id: int, old_floor: int, new_floor: int) -> None:
        txn, db, p = self._txn, self._sessions, self._p
        if new_floor <= old_floor:
            return
        # Rows below old_floor are already gone: only [old_floor, new_floor) can remain.
        if new_floor - old_floor <= 16:
            scur = self._scur
            for s in range(old_floor, new_floor):
                if scur.set_key(p + U64_PAIR.pack(client_id, s)):
                    scur.delete()
            return
        cur = txn.cursor(db=db)
        end = p + U64_PAIR.pack(client_id, new_floor)
        if not cur.set_range(p + U64_PAIR.pack(client_id, 0)):
            return
        while cur.key() < end:
            if not cur.delete():
                break


def _decode_head(raw: bytes) -> SessionHead:
    try:
        return SessionHead.decode(bytes(raw))
    except ValueError as err:
        raise StorageError(f"corrupt session head row: {err}") from None


def _decode_meta(raw: bytes) -> SessionMeta:
    try:
        return SessionMeta.decode(bytes(raw))
    except ValueError as err:
        raise StorageError(f"corrupt session meta row: {err}") from None


def _apply_member(txn: Txn, db: Db, group: int, data: bytes) -> None:
    """Remember member addresses from applied conf changes (context = address)."""
    try:
        cc = ConfChange.decode(data)
    except ValueError:
        return
    key = group_prefix(group) + U64.pack(cc.node_id)
    if cc.type == ConfChangeType.REMOVE_NODE:
        txn.delete(key, db=db)
    elif cc.context:
        txn.put(key, cc.context, db=db)


class TxnStream(Generic[T]):
    """An iterator over items produced from one long-lived read transaction (a consistent view).

    Every `next()` first checks the transaction is still valid (ReadInvalidatedError otherwise:
    the map grew meanwhile). Exhaustion, an error or `close()` releases the transaction."""

    __slots__ = ("_gen", "_reader")

    def __init__(self, reader: Reader, gen: Iterator[T]) -> None:
        self._reader = reader
        self._gen = gen

    def __iter__(self) -> TxnStream[T]:
        return self

    def __next__(self) -> T:
        try:
            self._reader.check()
            return next(self._gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._reader.close()


class KVState:
    """The state machine of every group on one node's env; caches each group's `AppliedState`."""

    __slots__ = ("_applied", "_env", "session_limits")

    def __init__(self, env: LmdbEnv, session_limits: SessionLimits = LIMITS) -> None:
        self._env = env
        self._applied: dict[int, AppliedState] = {}
        self.session_limits = session_limits
        """Part of the replicated apply logic: the defaults everywhere (tests may use small ones
        on every replica alike); never a per-node setting."""

    # --- applied index ----------------------------------------------------------------------
    def applied(self, group: int) -> AppliedState:
        st = self._applied.get(group)
        if st is None:
            with self._env.read() as txn:
                raw = txn.get(group_prefix(group), db=self._env.db(DB_APPLIED))
                sraw = txn.get(group_prefix(group), db=self._env.db(DB_SHARDS))
            st = AppliedState() if raw is None else AppliedState(*decode_applied(raw))
            if sraw is not None:
                st.shards = _decode_shards(sraw)
            self._applied[group] = st
        return st

    def commit_applied(self, group: int, st: AppliedState) -> None:
        self._applied[group] = st

    def forget(self, group: int) -> None:
        self._applied.pop(group, None)

    # --- staged writes -----------------------------------------------------------------------
    def stage_apply(
        self, txn: Txn, group: int, cur: AppliedState, entries: list[Entry], conf_state: ConfState
    ) -> tuple[list[ApplyResult | None], AppliedState]:
        """Apply `entries` (committed, in order) after `cur`; returns the results and the new state."""
        env = self._env
        view = LmdbGroupView(
            txn, group, env.db(DB_DATA), env.db(DB_SESSIONS), env.db(DB_SHARDS), cur.shards, env.db(DB_SESSION_LRU),
            rev_dbs(env), len(entries) > 1,
        )
        limits = self.session_limits
        idx = cur.index
        results: list[ApplyResult | None] = []
        for e in entries:
            if e.index <= idx:
                results.append(None)  # already applied: never twice
                continue
            if e.index != idx + 1:
                raise RaftError(f"group {group}: entry {e.index} applied after {idx}: entries would be lost")
            idx = e.index
            if e.type == _NORMAL and e.data:
                view.index = idx
                res = apply_data(view, e.data, limits)
                res.index = idx
                results.append(res)
            elif e.type == _NORMAL:
                results.append(None)
            else:
                results.append(None)
                if e.type == _CONF_CHANGE:
                    _apply_member(txn, env.db(DB_MEMBERS), group, e.data)
        view.flush_sessions()  # the held-back session heads, once per batch
        view.mvcc.flush()  # the revision state, once per batch
        if idx == cur.index:
            return results, cur
        txn.put(group_prefix(group), encode_applied(idx, conf_state), db=env.db(DB_APPLIED))
        return results, AppliedState(idx, conf_state, view.shards)

    def stage_install(self, txn: Txn, group: int, meta: SnapshotMeta, path: Path) -> AppliedState:
        """Replace the group's data, sessions and members by the snapshot file's, and set the
        applied index + configuration to the snapshot's. Streams the file (bounded memory)."""
        env = self._env
        try:
            sf = SnapshotFile(path)
        except FileNotFoundError:
            raise StorageError(f"snapshot file {path} does not exist") from None
        p = group_prefix(group)
        with sf:
            h = sf.header
            if h.group != group:
                raise SnapshotFormatError(f"snapshot file {path} is of group {h.group}, not {group}")
            hm = h.meta
            if (hm.index, hm.term) != (meta.index, meta.term) or (
                sorted(hm.conf_state.voters),
                sorted(hm.conf_state.learners),
            ) != (sorted(meta.conf_state.voters), sorted(meta.conf_state.learners)):
                raise SnapshotFormatError(
                    f"snapshot file {path} is at index {hm.index} term {hm.term} {hm.conf_state}, "
                    f"but is installed as index {meta.index} term {meta.term} {meta.conf_state}"
                )
            self.stage_delete_rows(txn, group)
            dbs = {
                TAG_DATA: env.db(DB_DATA),
                TAG_SESSION: env.db(DB_SESSIONS),
                TAG_MEMBER: env.db(DB_MEMBERS),
                **{TAG_REV_BASE + t: env.db(name) for t, name in enumerate(DB_REVS)},
            }
            put = txn.put
            shards = None
            log = mvcc.LogBuilder(LmdbRows(txn, group, rev_dbs(env)))
            lru = env.db(DB_SESSION_LRU)
            heads = 0
            smeta = SessionMeta()
            data_put = txn.cursor(db=dbs[TAG_DATA]).put  # a kept cursor: no cursor set up per row
            log_key, log_hist = log.key, log.hist
            for tag, key, value in sf.records():
                # the most frequent records first: a key's data, key and history rows (the
                # change rows are derived again from the history, `mvcc.LogBuilder`)
                if tag in (TAG_REV_HIST, TAG_REV_KEYS):
                    try:
                        (log_hist if tag == TAG_REV_HIST else log_key)(key, value)
                    except ValueError as err:
                        raise SnapshotFormatError(f"snapshot file {path} has a bad history: {err}") from None
                    continue
                if tag == TAG_REV_CHANGES:
                    try:
                        mvcc.check_change_row(key, value)
                    except ValueError as err:
                        raise SnapshotFormatError(f"snapshot file {path} has a bad change row: {err}") from None
                    continue
                if tag == TAG_DATA:
                    if len(key) > MAX_KEY_SIZE:
                        raise SnapshotFormatError(f"snapshot file {path} has a key of {len(key)} bytes")
                    data_put(p + key, value)
                    continue
                if tag == TAG_SHARDS:
                    shards = _decode_shards(value)
                    put(p, value, db=env.db(DB_SHARDS))
                    continue
                if tag == TAG_REV_STATE:
                    try:
                        log.compact = mvcc.RevState.decode(value).compact
                    except ValueError as err:
                        raise SnapshotFormatError(f"snapshot file {path} has a bad revision state: {err}") from None
                if tag == TAG_LEASES:
                    try:
                        leases.check_rows(key, value)
                    except ValueError as err:
                        raise SnapshotFormatError(f"snapshot file {path} has a bad lease row: {err}") from None
                if tag - TAG_REV_BASE in (mvcc.T_TXN, mvcc.T_INTENTS):
                    try:
                        xtxn.check_rows(tag - TAG_REV_BASE, key, value)
                    except ValueError as err:
                        raise SnapshotFormatError(f"snapshot file {path} has a bad transaction row: {err}") from None
                if len(key) > MAX_KEY_SIZE:
                    raise SnapshotFormatError(f"snapshot file {path} has a key of {len(key)} bytes")
                if tag == TAG_SESSION:
                    try:
                        if len(key) == 8:  # a head row: its LRU row is derived from it
                            head = SessionHead.decode(value)
                            put(p + U64_PAIR.pack(head.last, U64.unpack(key)[0]), b"", db=lru)
                            heads += 1
                        elif len(key) == 16:
                            decode_result(value)
                        elif key == SESSION_META_TAG:
                            smeta = SessionMeta.decode(value)
                            continue  # written below, with the count of the heads installed
                        else:
                            raise ValueError(f"session row key of {len(key)} bytes")
                    except ValueError as err:
                        raise SnapshotFormatError(f"snapshot file {path} has a bad session row: {err}") from None
                put(p + key, value, db=dbs[tag])
            if heads or smeta != SessionMeta():
                put(p + SESSION_META_TAG, SessionMeta(heads, smeta.horizon, smeta.evicted).encode(), db=env.db(DB_SESSIONS))
            try:
                log.finish()
            except ValueError as err:
                raise SnapshotFormatError(f"snapshot file {path} has a bad history: {err}") from None
        txn.put(p, encode_applied(hm.index, hm.conf_state), db=env.db(DB_APPLIED))
        return AppliedState(hm.index, hm.conf_state, shards)

    def stage_delete_rows(self, txn: Txn, group: int) -> None:
        """Delete the group's data, sessions and members (not its applied index)."""
        env = self._env
        for name in (DB_DATA, DB_SESSIONS, DB_MEMBERS, DB_SESSION_LRU, *DB_REVS):
            _delete_prefix(txn, env.db(name), group)
        txn.delete(group_prefix(group), db=env.db(DB_SHARDS))

    def stage_destroy(self, txn: Txn, group: int) -> None:
        self.stage_delete_rows(txn, group)
        txn.delete(group_prefix(group), db=self._env.db(DB_APPLIED))

    # --- reads --------------------------------------------------------------------------------
    def get(self, group: int, key: bytes) -> bytes | None:
        if len(key) > MAX_KEY_SIZE:
            return None
        env = self._env
        return env.get(env.db(DB_DATA), group_prefix(group) + key)

    def scan(self, group: int, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        with self._env.read() as txn:
            for kv in _iter_range(txn, self._env.db(DB_DATA), group, start, end):
                out.append(kv)
                if len(out) == limit:
                    break
        return out

    def scan_chunks(
        self,
        group: int,
        start: bytes,
        end: bytes | None,
        limit: int,
        chunk_items: int,
        chunk_bytes: int,
        owned: IntervalSet | None = None,
    ) -> TxnStream[list[tuple[bytes, bytes]]]:
        reader = self._env.reader()
        db = self._env.db(DB_DATA)
        if owned is not None and owned.is_full():
            owned = None  # every key is owned: no need to hash each one

        def gen() -> Iterator[list[tuple[bytes, bytes]]]:
            txn = reader.check()
            chunk: list[tuple[bytes, bytes]] = []
            size = n = 0
            for k, v in _iter_range(txn, db, group, start, end):
                if owned is not None and key_hash(k) not in owned:
                    continue
                n += 1
                chunk.append((k, v))
                size += len(k) + len(v)
                if n == limit:
                    break
                if len(chunk) >= chunk_items or size >= chunk_bytes:
                    yield chunk
                    chunk, size = [], 0
            if chunk:
                yield chunk

        return TxnStream(reader, gen())

    # --- reads with revisions (mvcc.py) ----------------------------------------------------------
    def rev_state(self, group: int) -> mvcc.RevState:
        """The group's revision state as committed (last revision, compact revision)."""
        with self._env.read() as txn:
            return _rev_state(LmdbRows(txn, group, rev_dbs(self._env)))

    def min_pending(self, group: int) -> int:
        with self._env.read() as txn:
            return xtxn_apply.min_pending(LmdbRows(txn, group, rev_dbs(self._env)))

    def range_locks(self, group: int) -> list[bytes]:
        with self._env.read() as txn:
            return xtxn_apply.lock_intent_rows(LmdbRows(txn, group, rev_dbs(self._env)))

    def intents(self, group: int, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """At most `limit` intents on keys in [start, end), in key order (`mvcc.T_INTENTS`)."""
        with self._env.read() as txn:
            rows = LmdbRows(txn, group, rev_dbs(self._env))
            return xtxn_apply.intent_rows(rows, start, end, limit)

    def read_rows(self, group: int, fn: Callable[[mvcc.Rows], T]) -> T:
        """`fn` on the group's committed rows (every table), in one read transaction."""
        with self._env.read() as txn:
            return fn(LmdbRows(txn, group, rev_dbs(self._env)))

    def get_version(self, group: int, key: bytes, rev: int = 0, probe: xtxn.IntentProbe | None = None,
                    lease: leases.LeaseProbe | None = None) -> tuple[mvcc.Version | None, mvcc.RevState]:
        """The key's version at revision `rev` (0: its current one), the group's revision state,
        (into `probe`) the key's intent and (into `lease`, `rev` 0 only) the lease it is attached
        to, from ONE read transaction. Raises mvcc.Compacted if `rev` is below the compact
        revision."""
        if lease is not None and rev:
            raise ValueError("a key's lease is read with its current version only")
        env = self._env
        with env.read() as txn:
            rows = LmdbRows(txn, group, rev_dbs(env))
            st = _rev_state(rows)
            if probe is not None:
                probe.rows = xtxn_apply.intent_rows(rows, key, key + b"\x00", probe.limit)
            if len(key) > MAX_KEY_SIZE:
                return None, st
            if lease is not None:
                lease.lease = leases.lease_of(rows, key)
            current = txn.get(group_prefix(group) + key, db=env.db(DB_DATA))
            return _version(rows, st, key, rev, None if current is None else bytes(current)), st

    def scan_versions(
        self,
        group: int,
        start: bytes,
        end: bytes | None,
        limit: int,
        rev: int,
        chunk_items: int,
        chunk_bytes: int,
        owned: IntervalSet | None = None,
        probe: xtxn.IntentProbe | None = None,
    ) -> tuple[mvcc.RevState, TxnStream[list[tuple[bytes, mvcc.Version]]]]:
        """The group's keys in [start, end) at revision `rev` (0: now) with their metadata, in
        chunks, from ONE read transaction, the revision state of that transaction and (into
        `probe`) the intents on keys in [start, end) in it. Raises mvcc.Compacted if `rev` is
        below the compact revision."""
        env = self._env
        reader = env.reader()
        try:
            txn = reader.check()
            rows = LmdbRows(txn, group, rev_dbs(env))
            st = _rev_state(rows)
            if rev and rev < st.compact:
                raise mvcc.Compacted(st.compact)
            if probe is not None:
                probe.rows = xtxn_apply.intent_rows(rows, start, end, probe.limit)
        except BaseException:
            reader.close()
            raise
        if owned is not None and owned.is_full():
            owned = None
        data_db = env.db(DB_DATA)

        def gen() -> Iterator[list[tuple[bytes, mvcc.Version]]]:
            chunk: list[tuple[bytes, mvcc.Version]] = []
            size = n = 0
            current = _iter_range(txn, data_db, group, start, end)
            for k, v in _checked(mvcc.versions_in_range(rows, current, start, end, rev), group):
                if owned is not None and key_hash(k) not in owned:
                    continue
                assert v.value is not None
                n += 1
                chunk.append((k, v))
                size += len(k) + len(v.value)
                if n == limit:
                    break
                if len(chunk) >= chunk_items or size >= chunk_bytes:
                    yield chunk
                    chunk, size = [], 0
            if chunk:
                yield chunk

        return st, TxnStream(reader, gen())

    def changes(
        self, group: int, lo: int, hi: int, max_events: int, max_bytes: int, prev_kv: bool
    ) -> changefeed.ChangeBatch:
        """The group's changes in [lo, hi] from ONE read transaction (`changefeed.read_changes`);
        mvcc.Compacted below the compact revision, StorageError for a corrupt row."""
        with self._env.read() as txn:
            rows = LmdbRows(txn, group, rev_dbs(self._env))
            try:
                return changefeed.read_changes(
                    rows, lo, hi, max_events=max_events, max_bytes=max_bytes, prev_kv=prev_kv
                )
            except mvcc.RevisionError as err:
                raise StorageError(str(err)) from None
            except ValueError as err:
                raise StorageError(f"corrupt change log of group {group}: {err}") from None

    def retention_step(self, group: int, walk: mvcc.RetentionWalk, max_rows: int = 0) -> bool:
        """`mvcc.retention_step` on the group's committed state, in ONE read transaction (each
        step its own): True once `walk.point` is the answer. StorageError for a corrupt change
        log or revision state."""
        with self._env.read() as txn:
            try:
                return mvcc.retention_step(LmdbRows(txn, group, rev_dbs(self._env)), walk, max_rows)
            except ValueError as err:  # RevisionError too (a corrupt revision state)
                raise StorageError(f"corrupt change log of group {group}: {err}") from None

    def members(self) -> dict[int, str]:
        out: dict[int, str] = {}
        with self._env.read() as txn:
            for key, value in txn.cursor(db=self._env.db(DB_MEMBERS)).iternext():
                out[U64_PAIR.unpack(key)[1]] = value.decode(errors="replace")
        return out

    # --- snapshots out ------------------------------------------------------------------------
    def snapshot_stream(
        self, group: int, chunk_size: int, term_of: Callable[[int], int | None]
    ) -> tuple[SnapshotMeta, TxnStream[bytes]]:
        """The group's state at its applied index as (meta, chunks), from ONE read transaction.
        `term_of(index)` is the term of a log index (None if the log no longer has it: the WAL
        holds the logs); raises SnapshotTemporarilyUnavailable then."""
        env = self._env
        reader = env.reader()
        try:
            txn = reader.check()
            p = group_prefix(group)
            raw = txn.get(p, db=env.db(DB_APPLIED))
            index, conf = (0, ConfState()) if raw is None else decode_applied(raw)
            term = 0 if index == 0 else term_of(index)
            if term is None:
                raise SnapshotTemporarilyUnavailable()
        except BaseException:
            reader.close()
            raise
        meta = SnapshotMeta(index, term, conf)

        def records() -> Iterator[Record]:
            shards = txn.get(p, db=env.db(DB_SHARDS))
            if shards is not None:
                yield TAG_SHARDS, b"", shards
            tables = [(TAG_DATA, DB_DATA), (TAG_SESSION, DB_SESSIONS), (TAG_MEMBER, DB_MEMBERS)]
            # The revision state before the history: a receiver that knows the compact revision
            # drops what compaction would (`mvcc.LogBuilder`); any order installs.
            revs = [(TAG_REV_BASE + t, name) for t, name in enumerate(DB_REVS)]
            tables += sorted(revs, key=lambda tn: tn[0] != TAG_REV_STATE)
            rows = LmdbRows(txn, group, rev_dbs(env))
            for tag, name in tables:
                if tag == TAG_REV_KEYS:  # the history in the exchange form, per key (`mvcc.snapshot_records`)
                    yield from mvcc.snapshot_records(rows, _rev_state(rows), TAG_REV_BASE)
                elif tag in (TAG_REV_HIST, TAG_REV_CHANGES):
                    continue
                else:
                    for k, v in _iter_range(txn, env.db(name), group, b"", None):
                        yield tag, k, v

        return meta, TxnStream(reader, encode_snapshot(group, meta, records(), chunk_size))


    # --- range export (moving ranges between groups) ---------------------------------------
    def export_range(self, group: int, ranges: IntervalSet, chunk_bytes: int) -> TxnStream[tuple[bytes, int]]:
        """The group's data rows whose key hash is in `ranges`, and all its sessions (each head row
        as a REC_FLOOR of its floor alone, each cached result as a REC_RESULT; not the session meta
        row: the eviction horizon stays with its group), and the keys' lease attachments (REC_LEASE), as `shardcmd` install records in chunks of about `chunk_bytes` (each with its data-row count),
        from ONE read transaction. Raises StorageError unless `ranges` are frozen in the group
        (their data is then immutable, so any replica applied past the FREEZE exports the same)."""
        env = self._env
        reader = env.reader()
        try:
            txn = reader.check()
            p = group_prefix(group)
            raw = txn.get(p, db=env.db(DB_SHARDS))
            st = None if raw is None else _decode_shards(raw)
            if st is None or not ranges.issubset(st.frozen):
                raise StorageError(f"group {group} has not frozen the ranges to export")
        except BaseException:
            reader.close()
            raise

        def gen() -> Iterator[tuple[bytes, int]]:
            rows = LmdbRows(txn, group, rev_dbs(env))
            rst = _rev_state(rows)
            buf: list[bytes] = [encode_record(REC_CLOSED, b"", encode_closed(rst.last, rst.compact, rst.kept))]
            size = len(buf[0])
            keys = 0
            for k, v in _iter_range(txn, env.db(DB_DATA), group, b"", None):
                if key_hash(k) not in ranges:
                    continue
                rec = encode_record(REC_DATA, k, v)
                buf.append(rec)
                size += len(rec)
                keys += 1
                if size >= chunk_bytes:
                    yield b"".join(buf), keys
                    buf, size, keys = [], 0, 0
            for k, _ in rows.iter(mvcc.T_KEYS, b"", None):
                if key_hash(k) not in ranges:
                    continue
                rec = encode_record(REC_HISTORY, k, mvcc.encode_versions(mvcc.key_history(rows, k)))
                buf.append(rec)
                size += len(rec)
                if size >= chunk_bytes:
                    yield b"".join(buf), keys
                    buf, size, keys = [], 0, 0
            for k, lid in leases.attachments(rows, lambda key: key_hash(key) in ranges):
                rec = encode_record(REC_LEASE, k, U64.pack(lid))
                buf.append(rec)
                size += len(rec)
                if size >= chunk_bytes:
                    yield b"".join(buf), keys
                    buf, size, keys = [], 0, 0
            for k, v in _iter_range(txn, env.db(DB_SESSIONS), group, b"", None):
                if len(k) == 8:
                    rec = encode_record(REC_FLOOR, k, U64.pack(_decode_head(v).floor))
                elif len(k) == 16:
                    rec = encode_record(REC_RESULT, k, v)
                else:
                    continue  # the session meta row
                buf.append(rec)
                size += len(rec)
                if size >= chunk_bytes:
                    yield b"".join(buf), keys
                    buf, size, keys = [], 0, 0
            if buf:
                yield b"".join(buf), keys

        return TxnStream(reader, gen())

    def session_meta(self, group: int) -> SessionMeta:
        """The group's session count, eviction horizon and evictions so far (committed state)."""
        env = self._env
        raw = env.get(env.db(DB_SESSIONS), group_prefix(group) + SESSION_META_TAG)
        return SessionMeta() if raw is None else _decode_meta(raw)

    def count_keys(self, group: int) -> int:
        with self._env.read() as txn:
            return sum(1 for _ in _iter_range(txn, self._env.db(DB_DATA), group, b"", None))


def _checked(it: Iterator[T], group: int) -> Iterator[T]:
    """`it`, with a corrupt history row (ValueError) reported as a StorageError."""
    try:
        yield from it
    except ValueError as err:
        raise StorageError(f"corrupt history in group {group}: {err}") from None


def _rev_state(rows: LmdbRows) -> mvcc.RevState:
    try:
        return mvcc.rev_state(rows)
    except mvcc.RevisionError as err:
        raise StorageError(str(err)) from None


def _version(rows: LmdbRows, st: mvcc.RevState, key: bytes, rev: int, current: bytes | None) -> mvcc.Version | None:
    """`mvcc.version_at`, with the current version for rev 0 and Compacted below the compact
    revision; a corrupt history row is a StorageError."""
    if rev and rev < st.compact:
        raise mvcc.Compacted(st.compact)
    try:
        return mvcc.version_at(rows, key, rev or mvcc.REVISION_MAX, current)
    except ValueError as err:
        raise StorageError(f"corrupt history of group key {key!r}: {err}") from None


def _decode_shards(raw: bytes) -> ShardState:
    try:
        return ShardState.decode(bytes(raw))
    except ValueError as err:
        raise StorageError(f"corrupt shard state: {err}") from None


def _iter_range(
    txn: Txn, db: Db, group: int, start: bytes, end: bytes | None
) -> Iterator[tuple[bytes, bytes]]:
    """(user key, value) of `group` with start <= key < end (end None: to the group's last key)."""
    p = group_prefix(group)
    lo = p + start
    hi = p + end if end is not None else group_end(group)
    if hi is not None and hi <= lo:
        return
    cur = txn.cursor(db=db)
    # LMDB cannot seek to a key longer than its limit; no stored key equals such a bound anyway.
    if not cur.set_range(lo if len(start) <= MAX_KEY_SIZE else p + start[:MAX_KEY_SIZE]):
        return
    for k, v in cur.iternext():
        if hi is not None and k >= hi:
            return
        if k < lo:
            continue
        yield k[8:], v


def _delete_prefix(txn: Txn, db: Db, group: int) -> None:
    p = group_prefix(group)
    end = group_end(group)
    cur = txn.cursor(db=db)
    if not cur.set_range(p):
        return
    while True:
        k = cur.key()
        if not k or (end is not None and k >= end):
            return
        if not cur.delete():
            return
