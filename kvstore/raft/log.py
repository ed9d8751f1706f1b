"""RaftLog: the stable log (in `LogStorage`) plus the unstable tail not yet handed to storage.

Invariants:
- indexes are contiguous: stable entries [storage.first_index(), storage.last_index()], then the
  unstable entries starting at `unstable_offset`, which may overwrite a stable suffix (the
  application truncates storage when it appends them);
- applied <= committed <= last_index();
- an unstable snapshot, if any, replaces everything before unstable_offset.
"""

from __future__ import annotations

from .storage import CompactedError, LogStorage, UnavailableError
from .types import Entry, RaftError, Snapshot, limit_size


class RaftLog:
    __slots__ = ("applied", "committed", "storage", "unstable", "unstable_offset", "unstable_snapshot")

    def __init__(self, storage: LogStorage, applied: int = 0) -> None:
        self.storage = storage
        self.unstable: list[Entry] = []
        self.unstable_snapshot: Snapshot | None = None
        self.unstable_offset = storage.last_index() + 1
        first = storage.first_index()
        hs, _ = storage.initial_state()
        self.committed = max(hs.commit, first - 1)
        if applied and not first - 1 <= applied <= self.committed:
            raise RaftError(f"applied {applied} outside [{first - 1}, {self.committed}]")
        self.applied = max(applied, first - 1)

    # --- indexes and terms ------------------------------------------------------------------
    def first_index(self) -> int:
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.meta.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        if self.unstable:
            return self.unstable_offset + len(self.unstable) - 1
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.meta.index
        return self.storage.last_index()

    def term(self, index: int) -> int:
        """Term at `index`. Raises CompactedError / UnavailableError outside the log."""
        off = self.unstable_offset
        if index >= off:
            i = index - off
            if i < len(self.unstable):
                return self.unstable[i].term
            raise UnavailableError(index)
        snap = self.unstable_snapshot
        if snap is not None:
            if index == snap.meta.index:
                return snap.meta.term
            if index < snap.meta.index:
                raise CompactedError(index)
        if index < self.first_index() - 1:
            raise CompactedError(index)
        if index > self.last_index():
            raise UnavailableError(index)
        return self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Raft §5.4.1: is a log ending at (last_index, term) at least as up-to-date as ours?"""
        lt = self.last_term()
        return term > lt or (term == lt and last_index >= self.last_index())

    # --- appending --------------------------------------------------------------------------
    def find_conflict(self, ents: list[Entry]) -> int:
        """Index of the first entry in `ents` whose term differs from ours (or is new); 0 if none."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest (i, t) with i <= index and t <= term in our log (for fast backtracking).

        If the log is compacted past the answer, returns the first index we still know minus one.
        """
        index = min(index, self.last_index())
        while index > 0:
            try:
                t = self.term(index)
            except CompactedError:
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def append(self, ents: list[Entry]) -> int:
        """Append to the unstable tail, truncating any conflicting suffix. Returns last index."""
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise RaftError(f"append after {after} is below committed {self.committed}")
        off = self.unstable_offset
        if after + 1 == off + len(self.unstable):
            self.unstable.extend(ents)
        elif after + 1 <= off:
            # Replace the whole unstable tail; storage will be truncated by the application.
            self.unstable_offset = after + 1
            self.unstable = list(ents)
        else:
            del self.unstable[after + 1 - off :]
            self.unstable.extend(ents)
        return self.last_index()

    # --- reading ----------------------------------------------------------------------------
    def slice(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi). Raises CompactedError if lo is compacted."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        out: list[Entry] = []
        off = self.unstable_offset
        if lo < off:
            out = self.storage.entries(lo, min(hi, off), max_size)
            if len(out) < min(hi, off) - lo:
                return out  # size limit reached
        if hi > off:
            # (The stored part is already within the limit: limiting the whole keeps it.)
            out = limit_size(out + self.unstable[max(lo, off) - off : hi - off], max_size)
        return out

    def entries_from(self, lo: int, max_size: int | None = None) -> list[Entry]:
        if lo > self.last_index():
            return []
        return self.slice(lo, self.last_index() + 1, max_size)

    def has_next_committed(self) -> bool:
        return self.committed > self.applied

    def next_committed_entries(self, max_size: int | None = None) -> list[Entry]:
        lo = max(self.applied + 1, self.first_index())
        if self.committed + 1 > lo:
            return self.slice(lo, self.committed + 1, max_size)
        return []

    # --- cursors ----------------------------------------------------------------------------
    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise RaftError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """Commit `max_index` only if its entry is from `term` (Raft §5.4.2)."""
        if max_index > self.committed and self.term_or_zero(max_index) == term:
            self.commit_to(max_index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index == 0:
            return
        if index > self.committed or index < self.applied:
            raise RaftError(f"applied {index} outside [{self.applied}, {self.committed}]")
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        """Entries through (index, term) are durable: drop them from the unstable tail."""
        off = self.unstable_offset
        if index < off or index >= off + len(self.unstable):
            return
        if self.unstable[index - off].term != term:
            return  # overwritten after the Ready was handed out
        del self.unstable[: index + 1 - off]
        self.unstable_offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.unstable_snapshot is not None and self.unstable_snapshot.meta.index == index:
            self.unstable_snapshot = None

    def restore(self, snap: Snapshot) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.committed = snap.meta.index
        self.unstable = []
        self.unstable_offset = snap.meta.index + 1
        self.unstable_snapshot = snap
