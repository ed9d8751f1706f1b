"""One key of the metadata group, decoded, as of this node's *applied* state.

The shard map, the cluster's alarms and the auth state each live under one key of group 0 and are
followed the same way: after every Ready cycle the node calls `refresh`, which costs one
comparison unless group 0 applied something since, and re-decodes only when the stored bytes
changed. The view may lag the committed state by a little, which is safe because every write is
checked again where it applies.

A stored value that does not decode (it cannot get into group 0 through the node's own checks:
`kvstore.node.grouprequests.check_group_request`) is logged and ignored: the last good value
stays in force, so a corrupt value never replaces a good one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from kvstore.shard.shardmap import META_GROUP

log = logging.getLogger("kvstore.metakey")

T = TypeVar("T")


class MetaStore(Protocol):
    """What a tracker reads of a node's store (`kvstore.node.store.NodeStore` has it)."""

    def has_group(self, group: int) -> bool: ...

    def applied_index(self, group: int) -> int: ...

    def get(self, group: int, key: bytes) -> bytes | None: ...


class MetaKeyTracker(Generic[T]):
    """`value`: the decoded value of `key` in group 0 as applied here; `stored`: the bytes it was
    decoded from (None: the key was never stored). `on_change` callbacks run after each change
    (the asyncio shell wakes its waiters from there).

    `absent`: what an unstored key means. None keeps the last value (the shard map and the auth
    state are never deleted); otherwise the key's removal sets the value to `absent`."""

    __slots__ = ("_decode", "_seen_applied", "absent", "errors", "key", "on_change", "store", "stored", "value", "what")

    def __init__(
        self, store: MetaStore, key: bytes, what: str, decode: Callable[[bytes], T], initial: T, *,
        absent: T | None = None, errors: tuple[type[Exception], ...] = (ValueError,),
    ) -> None:
        self.store = store
        self.key = key
        self.what = what
        self._decode = decode
        self.errors = errors
        self.value: T = initial
        self.absent = absent
        self.stored: bytes | None = None
        self._seen_applied = -1
        self.on_change: list[Callable[[], None]] = []

    def refresh(self) -> bool:
        """Re-read the key if the metadata group applied something; True if the value changed."""
        store = self.store
        if not store.has_group(META_GROUP):  # runs after every Ready cycle: kept cheap
            return False
        applied = store.applied_index(META_GROUP)
        if applied == self._seen_applied:
            return False
        self._seen_applied = applied
        raw = store.get(META_GROUP, self.key)
        if raw == self.stored or (raw is None and self.absent is None):
            return False
        if raw is None:
            assert self.absent is not None
            value = self.absent
        else:
            try:
                value = self._decode(raw)
            except self.errors as err:
                log.error("cannot decode the %s: %s", self.what, err)
                return False
        old, self.value = self.value, value
        self.stored = None if raw is None else bytes(raw)
        self._updated(old, value)
        for cb in self.on_change:
            cb()
        return True

    def _updated(self, old: T, new: T) -> None:
        """Called on every change, before the callbacks (subclasses keep derived state here)."""
