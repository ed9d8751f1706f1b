"""Is this node ready to serve clients? The rule behind `/readyz` (`kvstore/server/probes.py`).

A node is READY when all of these hold, checked in this order (the first that fails is the
one-line reason a probe reports):
1. storage works: the last Ready cycle persisted (`Host.failed` is None; a full disk is not
   ready, and the gRPC health status of `kvstore.v1.KV` is NOT_SERVING then too);
2. it has joined: it hosts the metadata group and is a member (voter or learner) of its
   configuration (a `--join` node is not ready until `kvctl member add` reached it);
3. it knows a live leader of the metadata group: a leader is known and, if it is another node,
   that node's liveness pings arrive (it is not in `Host.suspected`); if it is this node, a
   quorum of the group's voters is live (itself and the unsuspected others). A node whose peers
   are all stopped therefore goes not ready within an election timeout, even while its groups
   are quiesced;
4. it has caught up once: the metadata group's applied index has reached its commit index at
   least once since the process started (`caught_up`, latched: a busy follower whose applied
   index trails its commit index by one cycle does not flap). Until then its shard map may be
   older than the one the cluster uses.

A data group's own leader is not part of the rule: a node serves every key of a group it does
not lead by redirecting (NOT_LEADER), so a data group without a leader is the cluster's
problem, which every node's readiness would report alike. Pure: reads the host, changes only
the latch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.node.host import Host
from kvstore.raft import NONE, Role
from kvstore.shard.shardmap import META_GROUP

__all__ = ["Readiness"]


@dataclass(slots=True)
class Readiness:
    """The readiness rule (module docstring) for the node `host` runs. `check()` returns None
    when ready, else the reason (one line)."""

    host: Host
    caught_up: bool = False
    """Latched: the metadata group's applied index reached its commit index once (rule 4)."""

    def check(self) -> str | None:
        host = self.host
        if host.failed is not None:
            return f"storage failed: {host.failed}"
        g = host.groups.get(META_GROUP)
        me = host.node_id
        if g is None or me not in g.core.conf.members():
            return "not a member of the cluster yet (the metadata group does not list this node)"
        core = g.core
        lead = core.lead
        if lead == NONE:
            return "no leader of the metadata group known"
        if lead == me:
            if core.role != Role.LEADER:
                return "no leader of the metadata group known"
            voters = core.conf.voters
            live = sum(1 for v in voters if v == me or v not in host.suspected)
            if live <= len(voters) // 2:
                return f"leads the metadata group but only {live} of its {len(voters)} voters are reachable"
        elif lead in host.suspected:
            return f"the metadata group's leader (node {lead}) is unreachable"
        if not self.caught_up:
            if core.applied < core.committed or core.committed == 0:
                return (f"catching up: the metadata group applied {core.applied} of {core.committed} "
                        "committed entries")
            self.caught_up = True
        return None
