"""History compaction across the cluster: `KV.Compact`'s fan-out, and the automatic retention
(`--history-retention`): the metadata group's leader compacts every group at "now - retention"
once every `interval` (revisions carry their HLC time, so a revision of a time is exact to the
millisecond; see docs/REVISIONS.md). Each group clamps the revision to its own last one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kvstore import errors
from kvstore.node.host import Host
from kvstore.raft import Role
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import commands, mvcc

from .shards import GroupCaller, ShardTracker

log = logging.getLogger("kvstore.compaction")


async def compact_all(caller: GroupCaller, tracker: ShardTracker, revision: int) -> int:
    """Compact the metadata group and every data group of the shard map at `revision` (each
    through its leader's log). Definite InvalidArgument for a revision out of 1..2^63-1; a group
    that cannot be reached raises (retrying is safe: compaction is idempotent)."""
    if not 0 < revision <= mvcc.REVISION_MAX:
        raise errors.InvalidArgument(f"compact revision {revision} must be positive")
    smap = tracker.map
    if smap is None:
        raise errors.NoLeader("the shard map is not known on this node yet")
    data = commands.encode_compact(revision)
    for gid in (META_GROUP, *sorted(smap.groups)):
        res = await caller.propose(gid, data)
        if res.error:
            raise errors.InvalidArgument(f"group {gid}: {res.error}")
    return revision


def retention_revision(now_ms: int, retention_s: float) -> int:
    """The revision below which history is older than `retention_s` at `now_ms` (Unix ms): the
    first revision of that millisecond (0 if it is before the revision epoch)."""
    ms = now_ms - int(retention_s * 1000)
    return 0 if ms <= mvcc.EPOCH_MS else mvcc.make_revision(ms, 0, 0)


class Retention:
    """While this node leads the metadata group, compact every `interval` seconds at now - retention."""

    def __init__(
        self, host: Host, caller: GroupCaller, tracker: ShardTracker, retention_s: float,
        now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.host = host
        self.caller = caller
        self.tracker = tracker
        self.retention_s = retention_s
        self.interval = min(60.0, max(0.5, retention_s / 2))
        self.now_ms = now_ms
        self.compacted = 0
        """The last revision this node compacted at."""

    def leads_metadata(self) -> bool:
        g = self.host.groups.get(META_GROUP)
        return g is not None and g.core.role == Role.LEADER

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.leads_metadata():
                continue
            rev = retention_revision(self.now_ms(), self.retention_s)
            if rev <= self.compacted:
                continue
            try:
                self.compacted = await compact_all(self.caller, self.tracker, rev)
            except errors.KVError as err:  # no leader, a timeout: the next round tries again
                log.warning("history retention: compacting at %d failed: %s", rev, err)
