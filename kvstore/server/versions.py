"""The asyncio loop that keeps the cluster version moving (the decisions are
`kvstore.node.version`'s; this module only proposes them and waits).

On every node, for its lifetime: advertise this binary's supported level in the metadata group
while the applied value does not carry it; on the metadata group's leader (with a current view,
`Host.leads_current`), raise the cluster version once every member advertised a higher level.
A node whose binary supports less than the applied cluster version ends the loop with an error,
which stops the node (`Node._task_ended`): it may not know a command kind in its logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from kvstore import errors
from kvstore.node.host import Host
from kvstore.node.version import FEATURES, VersionTracker, advertise_command, members_of, raise_command
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage.commands import ApplyResult

from .shards import AsyncShardTracker

log = logging.getLogger("kvstore.node")

RETRY = 1.0
"""Seconds between two tries while something is still to be proposed."""
IDLE = 5.0
"""Seconds between two looks when nothing is to be done (members may have changed)."""


class BinaryTooOld(RuntimeError):
    """This binary supports less than the cluster version the metadata group applied."""


async def maintain_cluster_version(
    node: int, host: Host, versions: VersionTracker, tracker: AsyncShardTracker,
    propose: Callable[[int, bytes], Awaitable[ApplyResult]], retry: float = RETRY, idle: float = IDLE,
) -> None:
    """Advertise node `node`'s level and, while it leads the metadata group, raise the cluster
    version (forever, or until the binary is found too old)."""
    changed = asyncio.Event()
    versions.on_change.append(changed.set)
    while True:
        changed.clear()
        versions.refresh()
        if versions.too_old:
            raise BinaryTooOld(
                f"node {node}'s binary supports feature level {versions.supported} but the cluster version is "
                f"{versions.value.cluster}; run a release that supports level {versions.value.cluster} "
                f"({FEATURES.get(versions.value.cluster, 'a newer feature level')})"
            )
        v, raw = versions.value, versions.raw
        cmd = advertise_command(v, raw, node, versions.supported)
        what = f"advertised feature level {versions.supported}"
        if cmd is None and host.leads_current(META_GROUP):
            cmd = raise_command(v, raw, members_of(tracker.map))
            what = "raised the cluster version"
        if cmd is not None:
            try:
                res = await propose(META_GROUP, cmd)
                if res.swapped:
                    log.info("node %d %s", node, what)
            except errors.KVError as err:
                log.debug("cluster version step failed (retrying): %s", err.message)
            except Exception:  # an unexpected failure must not end the node: decide again later
                log.exception("cluster version step failed (retrying)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), retry if cmd is not None else idle)
