"""Recovery after losing quorum: `kvstore serve --force-new-cluster` (etcd's flag) makes one
survivor a new single-member cluster from its own data.

Two steps, both idempotent (a crash anywhere: run the same command again):
1. `force_logs`, on the store BEFORE any core starts: for every group the node hosts (the
   metadata group and its data groups), the configuration at the end of its log (the base's
   configuration with every conf-change entry of the log applied, as the core computes it) is
   rewritten to this node as the only voter by conf-change entries appended to the log (ADD_VOTER
   of itself if it was a learner, then a REMOVE_NODE of every other member), and the hard state's
   commit index moved to the new last index. As in etcd, this commits whatever the log held
   uncommitted: the survivor's log becomes the truth. The cores then start, replay and apply
   those entries like any committed conf change.
2. `rewrite_map`, once the node leads the metadata group with a current view: the shard map with
   the node as the only node and the only voter of every group it hosts, and only its client
   address. Data groups it does NOT host are gone (their replicas were on the lost nodes): they
   stay in the map with their old placements, so their keys answer NO_LEADER / time out rather
   than route to a group that holds none of them; `lost_groups` lists them and the node logs them
   loudly at every start of the forced recovery.

Synchronous and pure over the `NodeStore` protocol (the asyncio loop that proposes the map is
`kvstore.server.forcenew`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.node.store import GroupWrite, NodeStore
from kvstore.raft import ConfChange, ConfChangeType
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap
from kvstore.storage import commands

__all__ = ["ForceError", "ForcedGroup", "conf_at_end", "force_logs", "lost_groups", "map_command", "rewrite_map"]


class ForceError(Exception):
    """This node's data cannot become a new cluster (it does not host the metadata group)."""


@dataclass(frozen=True, slots=True)
class ForcedGroup:
    """What `force_logs` did to one group: the members it removed, whether it promoted this node
    from learner, and the last index (committed) after."""

    group: int
    removed: tuple[int, ...]
    promoted: bool
    last: int


def conf_at_end(store: NodeStore, group: int) -> ConfState:
    """The group's configuration after the last entry of its log (as `RaftNode` computes it)."""
    ls = store.log_storage(group)
    conf = ls.initial_state()[1]
    first, last = ls.first_index(), ls.last_index()
    if last >= first:
        for e in ls.entries(first, last + 1):
            if e.type == EntryType.CONF_CHANGE:
                try:
                    conf = conf.apply(ConfChange.decode(e.data))
                except ValueError:
                    continue  # the core ignores it too
    return conf


def force_logs(store: NodeStore, node: int) -> list[ForcedGroup]:
    """Step 1 (see the module docstring): one durable write for all hosted groups. Groups where
    this node is already the only member are left alone (nothing appended)."""
    groups = store.groups()
    if META_GROUP not in groups:
        raise ForceError(
            f"node {node} does not host the metadata group (group {META_GROUP}): its data cannot become a new "
            "cluster; force a member of the metadata group instead"
        )
    writes: list[GroupWrite] = []
    done: list[ForcedGroup] = []
    for gid in groups:
        conf = conf_at_end(store, gid)
        if node not in conf.voters and node not in conf.learners:
            if gid == META_GROUP:  # it would start, never lead group 0, and never rewrite the map
                raise ForceError(
                    f"node {node} is not a member of the metadata group at the end of its log (being removed or not "
                    "yet added): force a member of the metadata group instead"
                )
            continue  # being removed from it, or not yet added: not hosted
        changes: list[ConfChange] = []
        promoted = node in conf.learners
        if promoted:
            changes.append(ConfChange(ConfChangeType.ADD_VOTER, node))
        others = tuple(sorted(n for n in (*conf.voters, *conf.learners) if n != node))
        changes.extend(ConfChange(ConfChangeType.REMOVE_NODE, n) for n in others)
        ls = store.log_storage(gid)
        hs = ls.initial_state()[0]
        last = ls.last_index()
        if not changes:
            if hs.commit < last:  # the log's uncommitted tail: committed by this node alone
                writes.append(GroupWrite(gid, [], HardState(hs.term, hs.vote, last)))
            done.append(ForcedGroup(gid, (), False, last))
            continue
        term = max(hs.term, ls.term(last), 1)
        ents = [Entry(term, last + i, EntryType.CONF_CHANGE, cc.encode(), group=gid)
                for i, cc in enumerate(changes, 1)]
        new_last = last + len(ents)
        writes.append(GroupWrite(gid, ents, HardState(term, hs.vote if term == hs.term else 0, new_last)))
        done.append(ForcedGroup(gid, others, promoted, new_last))
    if writes:
        store.persist_and_apply(writes, [])
    return done


def lost_groups(m: ShardMap, node: int) -> list[int]:
    """The data groups of the map this node is not a member of: gone with the lost nodes."""
    return [g for g, p in sorted(m.groups.items()) if node not in p.members()]


def rewrite_map(m: ShardMap, node: int, address: str) -> ShardMap | None:
    """Step 2: the map with `node` (at `address`) the only node and the only voter of every group
    it hosts (None if `m` already is). Lost groups keep their placements (see the module
    docstring); other nodes' client addresses go (the node publishes its own as always)."""
    new = m
    for g, p in sorted(m.groups.items()):
        if node in p.members() and (p.voters != (node,) or p.learners):
            new = new.with_group_members(g, [node], [])
    if new.nodes != {node: address}:
        new = new.with_nodes({node: address})
    if new is m:
        return None
    new.check()
    return new


def map_command(m: ShardMap, raw: bytes, node: int, address: str) -> bytes | None:
    """The metadata-group compare-and-swap of step 2, or None when the map is already rewritten."""
    new = rewrite_map(m, node, address)
    return None if new is None else commands.encode_cas(SHARD_MAP_KEY, False, raw, new.encode())
