"""In-memory `LogStorage`, for unit tests and the deterministic simulator.

Everything written here counts as durable: the simulator models a crash by rebuilding a node from
its MemoryStorage and dropping all in-memory state of the core.
"""

from __future__ import annotations

from .storage import CompactedError, SnapshotTemporarilyUnavailable, UnavailableError
from .types import (
    ConfState,
    Entry,
    HardState,
    RaftError,
    Snapshot,
    SnapshotMeta,
    bootstrap_entries,
    limit_size,
)


class MemoryStorage:
    """Invariant: `self._ents[0]` is a dummy entry at the snapshot index/term."""

    __slots__ = ("_ents", "_hard_state", "_snapshot")

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._snapshot = Snapshot(SnapshotMeta(0, 0, ConfState()))
        self._ents: list[Entry] = [Entry(0, 0)]

    @classmethod
    def bootstrap(cls, conf: ConfState, group: int = 0) -> MemoryStorage:
        """Storage of an initial member of a new group (see `bootstrap_entries`)."""
        st = cls()
        ents = bootstrap_entries(conf, group)
        st.append(ents)
        st.set_hard_state(HardState(1, 0, len(ents)))
        return st

    # --- LogStorage -----------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.meta.conf_state

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError(index)
        if index - offset >= len(self._ents):
            raise UnavailableError(index)
        return self._ents[index - offset].term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def snapshot(self) -> Snapshot:
        if self._snapshot.meta.index == 0 and self._ents[0].index != 0:
            raise SnapshotTemporarilyUnavailable()
        return self._snapshot

    # --- writes by the application ------------------------------------------------------------
    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def set_hard_state(self, hs: HardState) -> None:
        self._hard_state = hs

    def append(self, entries: list[Entry]) -> None:
        """Append entries, truncating any existing suffix they conflict with."""
        if not entries:
            return
        first = self.first_index()
        # Entries that were already compacted are skipped.
        if entries[-1].index < first:
            return
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise RaftError(f"missing log entry: last {self.last_index()}, appended at {entries[0].index}")
        del self._ents[offset:]
        self._ents.extend(entries)

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the log with a snapshot (installed from the leader)."""
        if snap.meta.index <= self._snapshot.meta.index:
            return
        self._snapshot = snap
        self._ents = [Entry(snap.meta.term, snap.meta.index)]

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the state machine taken at applied index `index`."""
        if index <= self._snapshot.meta.index:
            return self._snapshot
        if index > self.last_index():
            raise RaftError(f"snapshot {index} beyond last index {self.last_index()}")
        snap = Snapshot(SnapshotMeta(index, self.term(index), conf_state), data)
        self._snapshot = snap
        return snap

    def compact(self, index: int) -> None:
        """Discard entries up to and including `index` (which must be covered by a snapshot)."""
        offset = self._ents[0].index
        if index <= offset:
            return
        if index > self.last_index():
            raise RaftError(f"compact {index} beyond last index {self.last_index()}")
        i = index - offset
        self._ents = [Entry(self._ents[i].term, index), *self._ents[i + 1 :]]
