"""The contract between the Raft core and durable log storage.

The core only reads from storage; the application writes to it after handling a `Ready`
(append `Ready.entries`, set `Ready.hard_state`, apply `Ready.snapshot`). Everything the storage
returns is durable: after a crash and restart it returns the same.

Invariants a `LogStorage` keeps:
- entries are contiguous from `first_index()` to `last_index()`;
- `term(first_index() - 1)` is available (the term of the last compacted entry, or of the snapshot);
- `first_index() - 1` is the index of the latest snapshot (0 if none).
"""

from __future__ import annotations

from typing import Protocol

from .types import ConfState, Entry, HardState, Snapshot


class CompactedError(Exception):
    """The requested index lies before the first available entry (compacted into a snapshot)."""


class UnavailableError(Exception):
    """The requested index lies after the last entry."""


class SnapshotTemporarilyUnavailable(Exception):
    """The snapshot is being prepared; the core retries later."""


class LogStorage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the configuration of the latest snapshot."""
        ...

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi). With `max_size`, at least one entry and at most that many bytes."""
        ...

    def term(self, index: int) -> int:
        """Term of the entry at `index`; valid for first_index()-1 .. last_index()."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (for sending to a follower that is too far behind)."""
        ...
