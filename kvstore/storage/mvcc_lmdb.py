"""`mvcc.Rows` on LMDB: the MVCC tables of one group (`layout.DB_REVS`) inside a transaction.

Every row key is the group prefix + the table key; `last_le` and `iter` never leave the group."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .layout import DB_REVS, group_end, group_prefix
from .mvcc import T_CHANGES as _T_CHANGES
from .mvcc import T_INTENTS as _T_INTENTS
from .mvcc import T_KEYS as _T_KEYS
from .mvcc import T_LEASES as _T_LEASES
from .mvcc import T_STATE as _T_STATE
from .mvcc import T_TXN as _T_TXN

if TYPE_CHECKING:
    from .lmdb_env import Cursor, Db, LmdbEnv, Txn


def rev_dbs(env: LmdbEnv) -> tuple[Db, ...]:
    return tuple(env.db(name) for name in DB_REVS)


class LmdbRows:
    """The MVCC tables of `group` seen through `txn` (a write transaction, or a read one for
    `get`, `last_le` and `iter` only).

    The key rows are read, and the write path's two rows written, through cursors kept for the
    view's life (made on first use): a cursor operation skips the cursor setup that every
    `txn.get` / `txn.put` does (measured ~0.6 -> ~0.3 µs for a key row's read and rewrite). LMDB
    keeps cursors of a write transaction valid across the transaction's other writes."""

    __slots__ = (
        "_attached", "_changes", "_dbs", "_dirty", "_end", "_keycur", "_keys", "_locks", "_logcur", "_p", "_puts", "_state",
        "_tombs", "_txn",
    )

    def __init__(self, txn: Txn, group: int, dbs: tuple[Db, ...]) -> None:
        self._txn = txn
        self._p = group_prefix(group)
        self._end = group_end(group)
        self._dbs = dbs
        self._changes, self._keys = dbs[_T_CHANGES], dbs[_T_KEYS]
        self._keycur: Cursor | None = None
        self._logcur: Cursor | None = None
        self._puts: tuple[Callable[[bytes, bytes], bool], ...] | None = None
        """The write path's (LOG, KEYS) cursors' `put`, once `record` ran."""
        self._state: bytes | None = None
        """The group's revision state row, once read or written: read once per batch, written
        once per batch by `flush` (the caller's, before its transaction commits)."""
        self._dirty = False
        self._locks: bool | None = None
        """Whether the group holds an intent or a range lock (None: not known yet; read once per
        batch, and again after this view deletes one)."""
        self._attached: bool | None = None
        """Whether a key of the group is attached to a lease (None: not known yet; as `_locks`)."""
        self._tombs: bool | None = None
        """Whether the group keeps a lease tombstone (None: not known yet; as `_locks`)."""

    def get(self, t: int, k: bytes) -> bytes | None:
        if t == _T_KEYS:
            return self._key_cursor().get(self._p + k)
        if t == _T_CHANGES:  # the write path's links (`mvcc._links`) and the chain's walks
            return self._log_cursor().get(self._p + k)
        if t == _T_STATE:
            if self._state is None:
                self._state = self._txn.get(self._p + k, db=self._dbs[t])
            return self._state
        return self._txn.get(self._p + k, db=self._dbs[t])

    def put(self, t: int, k: bytes, v: bytes) -> None:
        if t == _T_KEYS:  # a builder's key rows (`mvcc.LogBuilder`): through the kept cursor
            self._key_cursor().put(self._p + k, v)
            return
        if t == _T_STATE:
            self._state, self._dirty = v, True
            return
        if t == _T_INTENTS or (t == _T_TXN and k[:1] in (b"l", b"e", b"a")):
            self._locks = True
        elif t == _T_LEASES and k[:1] == b"K":
            self._attached = True
        elif t == _T_LEASES and k[:1] == b"x":
            self._tombs = True
        self._txn.put(self._p + k, v, db=self._dbs[t])

    def has_locks(self) -> bool:
        """Whether the group holds any intent, range lock or lease lock (the write path's lock check is
        skipped without: one look per batch)."""
        if self._locks is None:
            p = self._p
            found = False
            for t, lo in ((_T_INTENTS, p), (_T_TXN, p + b"l"), (_T_TXN, p + b"e"), (_T_TXN, p + b"a")):
                cur = self._txn.cursor(db=self._dbs[t])
                if cur.set_range(lo):
                    k = cur.key()
                    if k[:len(lo)] == lo:
                        found = True
                        break
            self._locks = found
        return self._locks

    def has_attachments(self) -> bool:
        """Whether a key of the group is attached to a lease (a write's detach is skipped
        without: one look per batch)."""
        if self._attached is None:
            lo = self._p + b"K"
            cur = self._txn.cursor(db=self._dbs[_T_LEASES])
            self._attached = bool(cur.set_range(lo)) and cur.key()[:len(lo)] == lo
        return self._attached

    def has_tombstones(self) -> bool:
        """Whether the group keeps a lease tombstone (`leases.gc` is skipped without: one look per
        batch)."""
        if self._tombs is None:
            lo = self._p + b"x"
            cur = self._txn.cursor(db=self._dbs[_T_LEASES])
            self._tombs = bool(cur.set_range(lo)) and cur.key()[:len(lo)] == lo
        return self._tombs

    def record(self, key: bytes, rev_kid: bytes, row: bytes, key_row: bytes | None) -> None:
        puts = self._puts
        if puts is None:
            txn = self._txn
            puts = self._puts = tuple(txn.cursor(db=db).put for db in (self._changes, self._keys))
        p = self._p
        puts[0](p + rev_kid, row)
        if key_row is not None:
            puts[1](p + key, key_row)

    def add_log(self, rev_kid: bytes, row: bytes) -> bool:
        return bool(self._log_cursor().put(self._p + rev_kid, row, overwrite=False))

    def _key_cursor(self) -> Cursor:
        cur = self._keycur
        if cur is None:
            cur = self._keycur = self._txn.cursor(db=self._keys)
        return cur

    def _log_cursor(self) -> Cursor:
        cur = self._logcur
        if cur is None:
            cur = self._logcur = self._txn.cursor(db=self._changes)
        return cur

    def flush(self) -> None:
        """Write the revision state row if it changed (once per apply batch)."""
        if self._dirty and self._state is not None:
            self._txn.put(self._p, self._state, db=self._dbs[_T_STATE])
            self._dirty = False

    def delete(self, t: int, k: bytes) -> None:
        if t in (_T_INTENTS, _T_TXN):
            self._locks = None
        elif t == _T_LEASES:
            self._attached = self._tombs = None
        self._txn.delete(self._p + k, db=self._dbs[t])

    def clear(self, t: int) -> None:
        if t in (_T_INTENTS, _T_TXN):
            self._locks = None
        elif t == _T_LEASES:
            self._attached = self._tombs = None
        elif t == _T_STATE:
            self._state, self._dirty = None, False
        p, n = self._p, len(self._p)
        cur = self._txn.cursor(db=self._dbs[t])
        ok = cur.set_range(p)
        while ok and cur.key()[:n] == p:
            ok = cur.delete()  # deletes the row, and moves to the next

    def last_le(self, t: int, lo: bytes, k: bytes) -> tuple[bytes, bytes] | None:
        p = self._p
        target, low = p + k, p + lo
        cur = self._txn.cursor(db=self._dbs[t])
        if cur.set_range(target):
            if cur.key() != target and not cur.prev():
                return None
        elif not cur.last():
            return None
        key = cur.key()
        if key < low or key > target:
            return None
        return bytes(key[8:]), bytes(cur.value())

    def iter(self, t: int, lo: bytes, hi: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        p = self._p
        end = p + hi if hi is not None else self._end
        cur = self._txn.cursor(db=self._dbs[t])
        if not cur.set_range(p + lo):
            return
        for k, v in cur.iternext():
            if end is not None and k >= end:
                return
            yield bytes(k[8:]), bytes(v)

    def keys_back(self, t: int, lo: bytes, hi: bytes | None = None) -> Iterator[bytes]:
        low = self._p + lo
        cur = self._txn.cursor(db=self._dbs[t])
        # From the last row below `end`: the one before the first at or after it (or the table's last).
        end = self._p + hi if hi is not None else self._end
        ok = cur.prev() if end is not None and cur.set_range(end) else cur.last()
        while ok:
            k = cur.key()
            if k < low:
                return
            yield bytes(k[8:])
            ok = cur.prev()
