"""`GroupLogStorage`: READ-ONLY access to one group's Raft log as kvstore kept it in LMDB before the
logs moved to the write-ahead log (`nodelogs.py`, issue 20). Only `walmigrate.py` uses it, once per
old data directory, to copy the logs into the WAL; nothing writes these tables any more.

It is a `kvstore.raft.storage.LogStorage` with `MemoryStorage`'s semantics. Layout: see
`layout.py`. Reads: `first_index`, `last_index`, `initial_state` and (almost always) `term` are
answered from a cache (`LogState`) without touching LMDB; `entries` with a cursor in a short read
transaction.

Invariants of the stored log (checked as far as a read needs them: a violation is a
StorageError, never another exception):
- entries are contiguous: keys (group, first_index) .. (group, last_index) exist, no others;
- `base` is the (index, term, configuration) of the last entry discarded (0, 0, empty initially);
  `first_index == base.index + 1`, `last_index >= base.index`;
- `base.conf_state` is the configuration in force after entry `base.index`.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.raft.storage import CompactedError, SnapshotTemporarilyUnavailable, UnavailableError
from kvstore.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
    limit_size,
)

from .errors import StorageError
from .layout import (
    DB_RAFTLOG,
    DB_RAFTSTATE,
    HARD_STATE_TAG,
    LOG_BASE_TAG,
    LOG_VALUE,
    U64_PAIR,
    decode_hard_state,
    decode_log_base,
    decode_log_term,
    group_end,
    group_prefix,
    log_key,
)

if TYPE_CHECKING:
    from .lmdb_env import LmdbEnv, Txn

_ENTRY_TYPES = {int(t): t for t in EntryType}

TAIL_ENTRIES = 512
"""How many of the most recently appended entries a group keeps in memory (`LogState.tail`)."""


@dataclass(slots=True)
class LogState:
    """The cached view of one group's log. `run_starts`/`run_terms` are runs of equal terms:
    entry i (run_starts[0] <= i <= last) has term run_terms[k] for the last k with run_starts[k] <= i.
    They cover the entries appended since the store was opened (plus the last entry at open)."""

    hard_state: HardState = field(default_factory=HardState)
    base: SnapshotMeta = field(default_factory=SnapshotMeta)
    last: int = 0
    run_starts: list[int] = field(default_factory=list)
    run_terms: list[int] = field(default_factory=list)
    tail: list[Entry] = field(default_factory=list)
    """The newest entries exactly as on disk: contiguous, ending at `last` when not empty, never
    below `first`; at most TAIL_ENTRIES of them."""

    @property
    def first(self) -> int:
        return self.base.index + 1

    def copy(self) -> LogState:
        return LogState(
            self.hard_state, self.base, self.last, list(self.run_starts), list(self.run_terms), list(self.tail)
        )

    def is_empty(self) -> bool:
        return self.hard_state == HardState() and self.base.index == 0 and self.last == 0


class GroupLogStorage:
    """`LogStorage` for one group. Obtain it from `NodeStore.log_storage(group)`."""

    __slots__ = ("_applied", "_env", "_prefix", "_st", "group")

    def __init__(self, env: LmdbEnv, group: int, applied: Callable[[], tuple[int, ConfState]]) -> None:
        self._env = env
        self.group = group
        self._prefix = group_prefix(group)
        self._applied = applied
        self._st = self._load()

    def _load(self) -> LogState:
        g = self.group
        st = LogState()
        with self._env.read() as txn:
            raw = txn.get(self._prefix + HARD_STATE_TAG, db=self._env.db(DB_RAFTSTATE))
            if raw is not None:
                st.hard_state = decode_hard_state(raw)
            raw = txn.get(self._prefix + LOG_BASE_TAG, db=self._env.db(DB_RAFTSTATE))
            if raw is not None:
                st.base = decode_log_base(raw)
            st.last = st.base.index
            cur = txn.cursor(db=self._env.db(DB_RAFTLOG))
            end = group_end(g)
            found = cur.prev() if end is not None and cur.set_range(end) else cur.last()
            if found:
                kg, last = U64_PAIR.unpack(cur.key())
                if kg == g:
                    first_ok = cur.set_key(log_key(g, st.first))
                    if not first_ok:
                        raise StorageError(f"raft log of group {g} is corrupt: entry {st.first} is missing")
                    if last < st.first:
                        raise StorageError(
                            f"raft log of group {g} has entries below its base {st.base.index}"
                        )
                    st.last = last
                    cur.set_key(log_key(g, last))
                    term = decode_log_term(cur.value())
                    st.run_starts.append(last)
                    st.run_terms.append(term)
        return st

    # --- LogStorage ---------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._st.hard_state, self._st.base.conf_state

    def first_index(self) -> int:
        return self._st.base.index + 1

    def last_index(self) -> int:
        return self._st.last

    def term(self, index: int) -> int:
        st = self._st
        base = st.base
        if index < base.index:
            raise CompactedError(index)
        if index > st.last:
            raise UnavailableError(index)
        if index == base.index:
            return base.term
        starts = st.run_starts
        if starts and index >= starts[0]:
            if index >= starts[-1]:
                return st.run_terms[-1]
            return st.run_terms[bisect_right(starts, index) - 1]
        with self._env.read() as txn:
            raw = txn.get(log_key(self.group, index), db=self._env.db(DB_RAFTLOG))
        if raw is None:
            raise StorageError(f"raft log of group {self.group} is corrupt: entry {index} is missing")
        return decode_log_term(raw)

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        st = self._st
        if lo <= st.base.index:
            raise CompactedError(lo)
        if hi > st.last + 1:
            raise UnavailableError(hi)
        if lo >= hi:
            return []
        tail = st.tail
        if tail and tail[0].index <= lo:
            t0 = tail[0].index
            return limit_size(tail[lo - t0 : hi - t0], max_size)
        with self._env.read() as txn:
            return self._read_entries(txn, lo, hi, max_size)

    def _read_entries(self, txn: Txn, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        group = self.group
        out: list[Entry] = []
        cur = txn.cursor(db=self._env.db(DB_RAFTLOG))
        if not cur.set_key(log_key(group, lo)):
            raise StorageError(f"raft log of group {group} is corrupt: entry {lo} is missing")
        size = 0
        types = _ENTRY_TYPES
        unpack = LOG_VALUE.unpack_from
        hdr = LOG_VALUE.size
        expect = lo
        try:
            for key, value in cur.iternext():
                if expect >= hi:
                    break
                kg, index = U64_PAIR.unpack(key)
                if kg != group or index != expect:
                    break
                term, etype = unpack(value)
                data = value[hdr:]
                if max_size is not None:
                    size += len(data) + 24
                    if out and size > max_size:
                        return out
                out.append(Entry(term, index, types[etype], data, group))
                expect += 1
        except (struct.error, KeyError) as err:  # a damaged record: one error type, as everywhere
            raise StorageError(f"raft log of group {group} is corrupt at entry {expect}: {err!r}") from None
        if expect < hi:
            raise StorageError(f"raft log of group {group} is corrupt: entry {expect} is missing")
        return out

    def snapshot(self) -> Snapshot:
        """The snapshot of the state machine at its applied index (data streamed separately by
        `NodeStore.snapshot_chunks`, whose metadata may be newer)."""
        index, conf = self._applied()
        try:
            term = self.term(index)
        except (CompactedError, UnavailableError):
            raise SnapshotTemporarilyUnavailable() from None
        return Snapshot(SnapshotMeta(index, term, conf), b"")

    # --- what the migration reads ----------------------------------------------------------
    @property
    def state(self) -> LogState:
        return self._st
