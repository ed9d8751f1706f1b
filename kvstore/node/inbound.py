"""Admission of Raft messages from other nodes, before any of them reaches a core.

`kvstore.transport.codec.from_proto` already refused every message that is malformed by itself.
`Inbound.admit` refuses the rest of what a cluster member would never send, judged against this
node's state:
- a sender that is not a member of the cluster (`is_member`: the metadata group's configuration,
  the members this node learned from applied configuration changes and `--peers`, the shard map's
  nodes): nothing from it reaches any group;
- a message for a group this node does not host, unless the shard map lists the group (and it was
  not destroyed here), the sender is one of the group's replicas by the map, and it is a leader's
  APP, HEARTBEAT or SNAP (then the group is opened empty and the leader fills it). So messages can
  create only groups that exist, never phantom ones;
- then the group-level rules of `kvstore.raft.admission` (shared with the simulator), with the
  group's replicas in the shard map counted as members: a sender outside the group, a term jump
  of more than `MAX_TERM_JUMP`, TIMEOUT_NOW from anyone but the leader, an APP_RESP beyond the
  log's end.

Refusals are counted per reason (`on_refused`) and logged once per sender and reason per minute,
never per message, so a flood cannot flood the log. Nothing here changes any state but the
counters: a refused message is dropped as if lost, which Raft tolerates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.raft import Message, MessageType, admission
from kvstore.shard.shardmap import META_GROUP, ShardMap

from .host import Host

log = logging.getLogger("kvstore.inbound")

LOG_EVERY = 60.0
"""Seconds between two log lines about the same sender and reason."""

_OPENING = frozenset({MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP})


@dataclass(slots=True)
class RefusalLog:
    """Logs a refusal once per (sender, reason) per `every` seconds; counts every one."""

    clock: Callable[[], float]
    every: float = LOG_EVERY
    counted: dict[str, int] = field(default_factory=dict)
    _last: dict[tuple[int, str], float] = field(default_factory=dict)
    on_refused: Callable[[str], None] | None = None

    def refuse(self, sender: int, reason: str, detail: str) -> None:
        self.counted[reason] = self.counted.get(reason, 0) + 1
        if self.on_refused is not None:
            self.on_refused(reason)
        now = self.clock()
        key = (sender, reason)
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            return
        if len(self._last) > 10_000:  # forged sender ids must not grow this without bound
            self._last.clear()
        self._last[key] = now
        log.warning("refused traffic from node %d (%s): %s [logged once a minute]", sender, reason, detail)


class Inbound:
    """The admission rules of the module docstring, over the node's host and shard map."""

    def __init__(
        self,
        node_id: int,
        host: Host,
        shard_map: Callable[[], ShardMap | None],
        tombstones: set[int],
        refusals: RefusalLog,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.shard_map = shard_map
        self.tombstones = tombstones
        self.refusals = refusals

    def is_member(self, node: int) -> bool:
        """Is `node` a member of the cluster as far as this node knows: of the metadata group, of
        the members learned from applied changes and `--peers`, of the shard map's nodes, or still
        of some group hosted here? (A member is removed group by group, the metadata group first:
        until its last group let it go, it must still be heard there.) Every check is O(1): the
        last asks the host's set of nodes its groups' configurations list (`Host.hosted`)."""
        if node == self.node_id or node in self.host.members:
            return True
        meta = self.host.groups.get(META_GROUP)
        if meta is not None and node in meta.core.conf.members():
            return True
        m = self.shard_map()
        if m is not None and node in m.nodes:
            return True
        return node in self.host.hosted

    def admit(self, m: Message) -> bool:
        """True if `m` may be stepped into its group (opening the group first if needed)."""
        frm = m.frm
        if not self.is_member(frm):
            self.refusals.refuse(frm, "not_member", f"{m.type.name} for group {m.group}: not a cluster member")
            return False
        g = self.host.groups.get(m.group)
        smap = self.shard_map()
        placed = smap.groups.get(m.group) if smap is not None else None
        if g is None:
            if m.group in self.tombstones or placed is None or frm not in placed.members():
                self.refusals.refuse(frm, "unknown_group", f"{m.type.name} for group {m.group}, which the shard "
                                     "map does not place on its sender (or was removed here)")
                return False
            if m.type not in _OPENING:
                return False  # only a leader's traffic opens a group; anything else waits for it
            if self.node_id in placed.bootstrap:
                # This node is one of the group's founding voters: it must create the group with
                # its bootstrap log (the node's reconcile does), never open it empty as a joiner.
                # An empty joiner catching up one entry at a time would apply the first
                # bootstrap CONF_CHANGE alone, see itself as the only voter and elect itself.
                return False
            log.info("opening group %d on a message from node %d", m.group, frm)
            g = self.host.open_group(m.group, None)
        reason = admission.refusal(g.core, m, placed.members() if placed is not None else ())
        if reason is not None:
            self.refusals.refuse(frm, reason, f"{m.type.name} for group {m.group} (term {m.term}; the group is "
                                 f"at term {g.core.term}, led by {g.core.lead})")
            return False
        return True
