"""A node's view of the shard map: the map as of the metadata group's *applied* state here.

It may lag the committed map, which is safe because every group checks ownership itself (a
stale map only costs a WRONG_SHARD round trip). A map that does not decode (it cannot get into
group 0 through the node's own checks, see `kvstore.node.grouprequests.check_group_request`) is
logged and ignored: the last good map stays in force.
"""

from __future__ import annotations

from kvstore.node.metakey import MetaKeyTracker
from kvstore.node.store import NodeStore
from kvstore.shard.shardmap import SHARD_MAP_KEY, ShardMap, ShardMapError


class ShardTracker(MetaKeyTracker[ShardMap | None]):
    """The shard map as of the metadata group's applied state on this node (`map`: None before
    the first; `raw`: its encoding, b"" before the first, what a CAS of the map expects)."""

    __slots__ = ()

    def __init__(self, store: NodeStore) -> None:
        super().__init__(store, SHARD_MAP_KEY, "shard map", ShardMap.decode, None, errors=(ShardMapError,))

    @property
    def map(self) -> ShardMap | None:
        return self.value

    @map.setter
    def map(self, m: ShardMap | None) -> None:
        self.value = m

    @property
    def raw(self) -> bytes:
        return self.stored or b""

    @property
    def version(self) -> int:
        return self.map.version if self.map is not None else 0
