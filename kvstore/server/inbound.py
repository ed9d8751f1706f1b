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
- a sender that is not in the group's configuration here nor among its replicas in the shard map
  (a node that holds no state of the group yet, with an empty configuration, accepts any member);
- a term more than `MAX_TERM_JUMP` above the group's: terms grow by one per election round and
  rounds are an election timeout apart, so such a jump would take decades of failed elections;
- TIMEOUT_NOW from anyone but the group's current leader (only a leader transferring its
  leadership sends it), and an APP_RESP accepting entries beyond the log's end.

Refusals are counted per reason (`on_refused`) and logged once per sender and reason per minute,
never per message, so a flood cannot flood the log. Nothing here changes any state but the
counters: a refused message is dropped as if lost, which Raft tolerates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.raft import Message, MessageType
from kvstore.shard.shardmap import META_GROUP, ShardMap

from .host import Host

log = logging.getLogger("kvstore.inbound")

MAX_TERM_JUMP = 1 << 32
"""Largest term increase a message may bring (see the module docstring)."""

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
        """Is `node` a member of the cluster as far as this node knows?"""
        if node == self.node_id or node in self.host.members:
            return True
        meta = self.host.groups.get(META_GROUP)
        if meta is not None and node in meta.core.conf.members():
            return True
        m = self.shard_map()
        return m is not None and node in m.nodes

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
            log.info("opening group %d on a message from node %d", m.group, frm)
            g = self.host.open_group(m.group, None)
        core = g.core
        conf = core.conf
        if conf.voters and frm not in conf.voters and frm not in conf.learners and (
            placed is None or frm not in placed.members()
        ):
            self.refusals.refuse(frm, "not_group_member", f"{m.type.name} for group {m.group}, of which it is "
                                 "not a member")
            return False
        if m.term > core.term + MAX_TERM_JUMP:
            self.refusals.refuse(frm, "term_jump", f"{m.type.name} for group {m.group} with term {m.term}, "
                                 f"the group is at term {core.term}")
            return False
        if m.type == MessageType.APP_RESP and not m.reject and m.index > core.log.last_index():
            self.refusals.refuse(frm, "beyond_log", f"APP_RESP for group {m.group} matching index {m.index}, "
                                 f"beyond the log's last index {core.log.last_index()}")
            return False
        if m.type == MessageType.TIMEOUT_NOW and (frm != core.lead or m.term != core.term):
            self.refusals.refuse(frm, "timeout_now", f"TIMEOUT_NOW for group {m.group} from a node that is not "
                                 "its leader")
            return False
        return True
