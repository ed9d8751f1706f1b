"""A bounded reply buffer that keeps only the latest reply per key (a lease keep-alive stream's:
a reply only needs to carry the lease's latest TTL).

Invariants: at most `maxsize` replies wait, one per key; a reply for a key already waiting
replaces it in place (the older is dropped, its place in line is kept); a producer with a reply
for another key waits while the buffer is full (so a client that sends requests and never reads
the replies stops being read from instead of growing the server's memory); `get` returns replies
in the order their keys first entered, then None once closed and drained.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class CoalescingQueue(Generic[K, V]):
    """See the module docstring. For one event loop (one stream)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._pending: dict[K, V] = {}
        self._closed = False
        self._cond = asyncio.Condition()
        self.coalesced = 0
        """Replies replaced by a newer one of the same key before they were read."""

    def __len__(self) -> int:
        return len(self._pending)

    async def put(self, key: K, value: V) -> None:
        """Add `value` as `key`'s latest reply, waiting while the buffer is full of other keys'."""
        async with self._cond:
            while key not in self._pending and len(self._pending) >= self.maxsize:
                await self._cond.wait()
            if key in self._pending:
                self.coalesced += 1
            self._pending[key] = value
            self._cond.notify_all()

    async def close(self) -> None:
        """No more replies: `get` answers None once the buffer is drained."""
        async with self._cond:
            self._closed = True
            self._cond.notify_all()

    async def get(self) -> V | None:
        """The oldest waiting key's latest reply (None: closed and drained)."""
        async with self._cond:
            while not self._pending and not self._closed:
                await self._cond.wait()
            if not self._pending:
                return None
            key = next(iter(self._pending))
            value = self._pending.pop(key)
            self._cond.notify_all()
            return value
