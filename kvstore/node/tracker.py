"""A node's view of the shard map: the map as of the metadata group's *applied* state here.

It may lag the committed map, which is safe because every group checks ownership itself (a
stale map only costs a WRONG_SHARD round trip). A map that does not decode (it cannot get into
group 0 through the node's own checks, see `kvstore.node.grouprequests.check_group_request`) is
logged and ignored: the last good map stays in force.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvstore.node.store import NodeStore
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap, ShardMapError

log = logging.getLogger("kvstore.shards")


class ShardTracker:
    """The shard map as of the metadata group's applied state on this node."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store
        self.map: ShardMap | None = None
        self.raw: bytes = b""
        self._seen_applied = -1
        self.on_change: list[Callable[[], None]] = []
        """Called after the map changed (the asyncio shell wakes its waiters from here)."""

    def refresh(self) -> bool:
        """Re-read the map if the metadata group applied something; True if the map changed."""
        if not self.store.has_group(META_GROUP):  # runs after every Ready cycle: no sorting
            return False
        applied = self.store.applied_index(META_GROUP)
        if applied == self._seen_applied:
            return False
        self._seen_applied = applied
        raw = self.store.get(META_GROUP, SHARD_MAP_KEY)
        if raw is None or raw == self.raw:
            return False
        try:
            m = ShardMap.decode(raw)
        except ShardMapError as err:
            log.error("cannot decode the shard map: %s", err)
            return False
        self.map, self.raw = m, bytes(raw)
        for cb in self.on_change:
            cb()
        return True

    @property
    def version(self) -> int:
        return self.map.version if self.map is not None else 0
