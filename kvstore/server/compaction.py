"""History compaction across the cluster: `KV.Compact`'s fan-out, and the automatic retention
driven by the metadata group's leader once every `interval`, which compacts every group at one
revision (each group clamps it to its own last one; docs/REVISIONS.md, "Retention"):

- by time (`--history-retention SECONDS`, `Retention`): at "now - retention" (revisions carry
  their HLC time, so a revision of a time is exact to the millisecond);
- by revisions (`--history-retention-revisions N`, `RevisionRetention`): at the highest of the
  data groups' points, each computed by the group's leader from its own change log
  (`kvstore.node.retention`: the cluster keeps its newest N write revisions)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kvstore import errors
from kvstore.node.host import Host
from kvstore.node.retention import check_keep, cluster_point
from kvstore.node.version import LEVEL_COMPACT_KEEP
from kvstore.raft import Role
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import commands, mvcc

from .shards import GroupCaller, ShardTracker

log = logging.getLogger("kvstore.compaction")


def keep_rule(cluster_version: Callable[[], int] | None) -> bool:
    """Whether a COMPACT proposed now may use the keep rule (`mvcc.compact`): only once the
    cluster version (None: not known, the first rule) is `LEVEL_COMPACT_KEEP`, so no member
    that applies the rules differently can meet the command (the gate refuses it below that
    level anyway)."""
    return cluster_version is not None and cluster_version() >= LEVEL_COMPACT_KEEP


async def compact_all(caller: GroupCaller, tracker: ShardTracker, revision: int, keep: bool = False) -> int:
    """Compact the metadata group and every data group of the shard map at `revision` (each
    through its leader's log), under the keep rule if `keep` (`keep_rule`; the command carries
    the rule, every replica applies it). Definite InvalidArgument for a revision out of
    1..2^63-1; a group that cannot be reached raises (retrying is safe: compaction is
    idempotent)."""
    if not 0 < revision <= mvcc.REVISION_MAX:
        raise errors.InvalidArgument(f"compact revision {revision} must be positive")
    smap = tracker.map
    if smap is None:
        raise errors.NoLeader("the shard map is not known on this node yet")
    data = commands.encode_compact(revision, keep)
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
        now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000, interval: float = 0.0,
    ) -> None:
        self.host = host
        self.caller = caller
        self.tracker = tracker
        self.retention_s = retention_s
        self.interval = interval or min(60.0, max(0.5, retention_s / 2))
        self.now_ms = now_ms
        self.compacted = 0
        """The last revision this node compacted at."""
        self.cluster_version: Callable[[], int] | None = None
        """The applied cluster version (the node sets it): the keep rule once it allows (`keep_rule`)."""

    def leads_metadata(self) -> bool:
        g = self.host.groups.get(META_GROUP)
        return g is not None and g.core.role == Role.LEADER

    async def point(self) -> int:
        """The revision to compact every group at now (0: none)."""
        return retention_revision(self.now_ms(), self.retention_s)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.round()

    async def round(self) -> None:
        """One round: compact at `point()` if this node leads the metadata group and the point
        moved past the last one it compacted at."""
        if not self.leads_metadata():
            return
        rev = await self.point()
        if rev <= self.compacted:
            return
        try:
            self.compacted = await compact_all(self.caller, self.tracker, rev, keep_rule(self.cluster_version))
        except errors.KVError as err:  # no leader, a timeout: the next round tries again
            log.warning("history retention: compacting at %d failed: %s", rev, err)


class RevisionRetention(Retention):
    """Retention by revisions: every `interval` seconds (300 by default, etcd's period in its
    revision mode), ask each data group's leader for its point keeping `keep` write revisions
    and compact every group at the highest (`kvstore.node.retention`). A group that does not
    answer in time is left out of the round's maximum: that only lowers it (keeps more)."""

    def __init__(self, host: Host, caller: GroupCaller, tracker: ShardTracker, keep: int, interval: float = 0.0) -> None:
        super().__init__(host, caller, tracker, 0.0, interval=interval or 300.0)
        self.keep = check_keep(keep)

    async def point(self) -> int:
        smap = self.tracker.map
        if smap is None:
            return 0
        points: dict[int, int] = {}
        for gid in smap.data_groups():
            try:
                points[gid] = await self.caller.retention_point(gid, self.keep, timeout=self.caller.request_timeout)
            except errors.KVError as err:
                log.info("history retention: group %d gave no retention point this round: %s", gid, err)
        return cluster_point(points)
