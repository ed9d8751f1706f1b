"""The asyncio half of `kvstore serve --force-new-cluster` (the decisions are
`kvstore.node.forcenew`'s): once this node leads the metadata group with a current view, propose
the rewritten shard map until it is applied, saying loudly which data groups are lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from kvstore import errors
from kvstore.node.forcenew import lost_groups, map_command
from kvstore.node.host import Host
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage.commands import ApplyResult

from .shards import AsyncShardTracker

log = logging.getLogger("kvstore.node")

RETRY = 0.5
"""Seconds between two looks while the map is not rewritten yet."""


async def rewrite_shard_map(
    node: int, address: str, host: Host, tracker: AsyncShardTracker,
    propose: Callable[[int, bytes], Awaitable[ApplyResult]], retry: float = RETRY,
) -> None:
    """Make the applied shard map name this node as the only node and the only voter of its
    groups (returns once it does)."""
    while True:
        changed = tracker.changed
        m, raw = tracker.map, tracker.raw
        if m is not None and host.leads_current(META_GROUP):
            cmd = map_command(m, raw, node, address)
            if cmd is None:
                lost = lost_groups(m, node)
                log.warning("force-new-cluster: the shard map (version %d) now names node %d alone%s", m.version,
                            node, f"; data groups LOST with the other nodes: {lost}" if lost else "")
                return
            try:
                res = await propose(META_GROUP, cmd)
                if res.swapped:
                    log.warning("force-new-cluster: rewrote the shard map")
            except errors.KVError as err:
                log.info("force-new-cluster: the map rewrite failed (retrying): %s", err.message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), retry)
