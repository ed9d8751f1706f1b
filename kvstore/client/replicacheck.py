"""The replica-consistency check (`kvctl check`): do every group's voters hold the same data?

For each group (the metadata group 0 and every data group of the shard map), one after the
other:
1. its leader (the node that says it leads, in the highest term; looked up again if it moved)
   hashes the group's key space at its last revision R,
   after a linearizable read point (`Admin.HashKV` with revision 0);
2. every other voter hashes it at R, once it has applied the group's writes up to R (the node
   waits, bounded by its request timeout). Revisions grow along the log, so every replica
   hashes exactly the writes at or below R, whatever it applied since (etcd's HashKV at a
   revision);
3. the hashes (and key counts) must be equal.

A range move changes which keys a group holds without a new revision of theirs, so the check
refuses to start while one is in progress, and reports an error if the shard map changed
during the check. A replica that cannot be asked is an error, never a pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvstore.client.client import Client
from kvstore.client.types import GroupHash, NodeStatus
from kvstore.errors import KVError, NoLeader, NotLeader
from kvstore.shard.shardmap import META_GROUP

__all__ = ["CheckError", "GroupCheck", "check_replicas"]


class CheckError(Exception):
    """The check could not run (a range move in progress, no leader, the map changed)."""


@dataclass(slots=True)
class GroupCheck:
    """One group's outcome: `hashes` by node id, `errors` (node id -> why it could not be
    asked). `consistent` only if every voter answered with the leader's hash (and key count)."""

    group: int
    leader: int
    voters: tuple[int, ...]
    revision: int = 0
    hashes: dict[int, GroupHash] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        if self.errors or set(self.hashes) != set(self.voters):
            return False
        lead = self.hashes[self.leader]
        return all(h.hash == lead.hash and h.keys == lead.keys for h in self.hashes.values())

    @property
    def diverged(self) -> list[int]:
        """The voters whose hash differs from the one a majority of the voters holds (every
        voter that answered, when no hash has a majority)."""
        votes: dict[tuple[bytes, int], list[int]] = {}
        for n, h in self.hashes.items():
            votes.setdefault((h.hash, h.keys), []).append(n)
        if len(votes) <= 1:
            return []
        best = max(votes.values(), key=len)
        if 2 * len(best) <= len(self.voters):
            return sorted(self.hashes)
        return sorted(n for n in self.hashes if n not in best)


def _views(nodes: list[NodeStatus], group: int) -> tuple[int, tuple[int, ...], dict[int, str]]:
    """(the node that says it leads the group, in the highest term, or 0; the group's voters as
    that leader has them; node id -> address)."""
    addresses: dict[int, str] = {}
    lead, term = 0, -1
    voters: tuple[int, ...] = ()
    for ns in nodes:
        st = ns.status
        if st is None:
            continue
        addresses[st.node_id] = ns.address
        for m in st.members:
            addresses.setdefault(m.id, m.address)
        for g in st.groups:
            if g.group == group and g.role == "leader" and g.term > term:
                lead, term, voters = st.node_id, g.term, g.voters
    return lead, voters, addresses


LEADER_ATTEMPTS = 5
"""Times a group's leader is looked up again when it moved between the status and the hash."""


def check_group(c: Client, group: int, nodes: list[NodeStatus], timeout: float | None = None) -> GroupCheck:
    """Check one group (module docstring). `nodes`: a recent `cluster_status`, refreshed here
    when the group's leader moved."""
    for attempt in range(LEADER_ATTEMPTS):
        if attempt:
            time.sleep(0.2 * attempt)  # leadership is moving (e.g. the balancer): look again
            nodes = c.cluster_status(timeout=timeout)
        lead, voters, addresses = _views(nodes, group)
        if lead == 0 or lead not in voters or lead not in addresses:
            continue
        try:
            first = c.hash_kv(addresses[lead], group, 0, timeout=timeout)
        except (NotLeader, NoLeader):
            continue
        if (first.node_id, first.group) != (lead, group):
            continue  # the address answers for another node (a stale view): look again
        break
    else:
        raise CheckError(f"group {group} has no leader to ask right now; retry")
    out = GroupCheck(group, lead, voters)
    out.hashes[lead] = first
    out.revision = first.revision
    for v in voters:
        if v == lead:
            continue
        addr = addresses.get(v)
        if addr is None:
            out.errors[v] = "no address known"
            continue
        try:
            h = c.hash_kv(addr, group, first.revision, exact=True, timeout=timeout)
        except KVError as err:
            out.errors[v] = str(err)
            continue
        if (h.node_id, h.group) != (v, group):  # never count one node's hash as another's
            out.errors[v] = f"{addr} answered as node {h.node_id} for group {h.group}"
            continue
        out.hashes[v] = h
    return out


def check_replicas(c: Client, timeout: float | None = None) -> list[GroupCheck]:
    """Check every group (module docstring). Raises CheckError if the check cannot be made,
    KVError if a leader could not be asked."""
    smap = c.shard_map(refresh=True, timeout=timeout)
    if smap is None:
        raise CheckError("no shard map yet")
    if smap.moves:
        raise CheckError(f"{len(smap.moves)} range move(s) in progress; retry when they are done")
    nodes = c.cluster_status(timeout=timeout)
    results = [check_group(c, g, nodes, timeout) for g in [META_GROUP, *sorted(smap.groups)]]
    after = c.shard_map(refresh=True, timeout=timeout)
    if after is None or after.version != smap.version:
        raise CheckError(f"the shard map changed during the check (version {smap.version} -> "
                         f"{after.version if after is not None else '?'}); retry")
    return results
