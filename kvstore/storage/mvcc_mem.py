"""`mvcc.Rows` in memory (the simulator's `MemoryNodeStore` and `machine.DictState`). STANDARD
LIBRARY ONLY. Invariant: `keys[t]` is the sorted list of the keys of `tables[t]`."""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .mvcc import T_CHANGES, T_INTENTS, T_KEYS, T_LEASES, T_TXN

N_TABLES = 7
"""The six MVCC tables and the lease table (`leases.T_LEASES`)."""

Undo = Callable[["MemRows", int, bytes, "bytes | None"], None]
"""Called before each change with (rows, table, key, the old value or None)."""


def _tables() -> list[dict[bytes, bytes]]:
    return [{} for _ in range(N_TABLES)]


def _keys() -> list[list[bytes]]:
    return [[] for _ in range(N_TABLES)]


@dataclass(slots=True)
class MemRows:
    tables: list[dict[bytes, bytes]] = field(default_factory=_tables)
    keys: list[list[bytes]] = field(default_factory=_keys)
    undo: Undo | None = None

    def get(self, t: int, k: bytes) -> bytes | None:
        return self.tables[t].get(k)

    def put(self, t: int, k: bytes, v: bytes) -> None:
        d = self.tables[t]
        old = d.get(k)
        if self.undo is not None:
            self.undo(self, t, k, old)
        if old is None:
            insort(self.keys[t], k)
        d[k] = v

    def add_log(self, rev_kid: bytes, row: bytes) -> bool:
        if rev_kid in self.tables[T_CHANGES]:
            return False
        self.put(T_CHANGES, rev_kid, row)
        return True

    def record(self, key: bytes, rev_kid: bytes, row: bytes, key_row: bytes | None) -> None:
        self.put(T_CHANGES, rev_kid, row)
        if key_row is not None:
            self.put(T_KEYS, key, key_row)

    def has_locks(self) -> bool:
        """Whether any intent, range lock or lease lock is held (`mvcc.Rows.has_locks`)."""
        if self.keys[T_INTENTS]:
            return True
        ks = self.keys[T_TXN]
        for tag in (b"a", b"e", b"l"):  # attach locks, lease locks, range locks
            i = bisect_left(ks, tag)
            if i < len(ks) and ks[i][:1] == tag:
                return True
        return False

    def has_attachments(self) -> bool:
        """Whether any key is attached to a lease (`mvcc.Rows.has_attachments`)."""
        ks = self.keys[T_LEASES]
        i = bisect_left(ks, b"K")
        return i < len(ks) and ks[i][:1] == b"K"

    def has_tombstones(self) -> bool:
        """Whether any lease tombstone is kept (`mvcc.Rows.has_tombstones`)."""
        ks = self.keys[T_LEASES]
        i = bisect_left(ks, b"x")
        return i < len(ks) and ks[i][:1] == b"x"

    def delete(self, t: int, k: bytes) -> None:
        d = self.tables[t]
        old = d.pop(k, None)
        if old is None:
            return
        if self.undo is not None:
            self.undo(self, t, k, old)
        ks = self.keys[t]
        del ks[bisect_left(ks, k)]

    def clear(self, t: int) -> None:
        for k in list(self.keys[t]):
            self.delete(t, k)

    def restore(self, t: int, k: bytes, old: bytes | None) -> None:
        """Undo one change: the row `k` back to `old` (None: absent)."""
        d = self.tables[t]
        ks = self.keys[t]
        if old is None:
            if d.pop(k, None) is not None:
                del ks[bisect_left(ks, k)]
        else:
            if k not in d:
                insort(ks, k)
            d[k] = old

    def last_le(self, t: int, lo: bytes, k: bytes) -> tuple[bytes, bytes] | None:
        ks = self.keys[t]
        i = bisect_right(ks, k) - 1
        if i < 0 or ks[i] < lo:
            return None
        return ks[i], self.tables[t][ks[i]]

    def iter(self, t: int, lo: bytes, hi: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        ks = self.keys[t]
        d = self.tables[t]
        i = bisect_left(ks, lo)
        while i < len(ks):
            k = ks[i]
            if hi is not None and k >= hi:
                return
            yield k, d[k]
            i = bisect_right(ks, k)

    def keys_back(self, t: int, lo: bytes, hi: bytes | None = None) -> Iterator[bytes]:
        ks = self.keys[t]
        top = len(ks) if hi is None else bisect_left(ks, hi)
        for i in range(top - 1, bisect_left(ks, lo) - 1, -1):
            yield ks[i]

    def copy(self) -> MemRows:
        return MemRows([dict(d) for d in self.tables], [list(k) for k in self.keys])
