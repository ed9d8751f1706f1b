"""The asyncio loop that publishes this node's client address in the shard map (the decision is
`kvstore.node.clientaddr.publish_command`; this module only proposes it and waits).

It runs on every node for the node's lifetime: whenever the applied map differs from what the
node serves (its `--client-advertise` / `--client-listen`, or "" without a client port), it
proposes the compare-and-swap to the metadata group's leader, then waits for the next map
change (or a retry period: a failed or lost proposal is simply decided again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from kvstore import errors
from kvstore.node.clientaddr import publish_command
from kvstore.shard.shardmap import META_GROUP, ShardMapError
from kvstore.storage.commands import ApplyResult

from .shards import AsyncShardTracker

log = logging.getLogger("kvstore.node")

RETRY = 1.0
"""Seconds between two looks at a map that still needs this node's entry."""


async def publish_client_address(
    node: int, address: str, tracker: AsyncShardTracker,
    propose: Callable[[int, bytes], Awaitable[ApplyResult]], retry: float = RETRY,
) -> None:
    """Keep node `node`'s client address in the shard map equal to `address` (forever)."""
    while True:
        changed = tracker.changed
        try:
            cmd = publish_command(tracker.map, tracker.raw, node, address)
        except ShardMapError as err:  # cannot happen for a validated address; never kill the node for it
            log.error("cannot publish client address %r: %s", address, err)
            cmd = None
        if cmd is not None:
            try:
                res = await propose(META_GROUP, cmd)
                if res.swapped:
                    log.info("node %d published its client address %r", node, address)
            except errors.KVError as err:
                log.debug("publishing the client address failed (retrying): %s", err.message)
            except Exception:  # an unexpected failure must not end the node: decide again later
                log.exception("publishing the client address failed (retrying)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), retry if cmd is not None or tracker.map is None else 30.0)
