"""Which messages a group's core may be handed at all: the group-level admission rules.

Pure and deterministic (standard library only): the node (`kvstore.node.inbound`) and the
simulator apply the same rules to every message before `RaftNode.step`. A message is refused
(the reason is returned) when no correct member of the group could have sent it to this core:
- its sender is not a member of the cluster (`is_member`, the application's knowledge), or is
  in neither the core's newest configuration, nor its committed one (an uncommitted removal may
  yet be rolled back), nor `placed` (the replicas the application knows the group is adding,
  e.g. from its shard map); a core with no configuration yet (a replica waiting to be filled),
  or one that is not in its own newest configuration, goes by cluster membership alone: the
  latter is a replica catching up a log that adds it only later (a joining node that has so
  far appended only the group's first entries, whose configuration may name none of today's
  members, not even its leader), or one removed from the group. A leader's traffic (APP,
  HEARTBEAT, SNAP) of the core's term or newer from a cluster member is admitted whatever the
  core's configuration says: a lagging replica must hear a leader that was added to the group
  after the newest configuration it knows, or it never catches up (Raft's safety does not rest
  on who may lead: one leader per term is decided by the votes);
- its term is more than `MAX_TERM_JUMP` above the core's: terms grow by one per election round
  and rounds are an election timeout apart, so such a jump would take decades of failed
  elections (and a term near 2^64 would make the next election's term unencodable);
- it is a TIMEOUT_NOW from anyone but the core's leader in the core's term (only a leader
  transferring its leadership sends one);
- it is an APP_RESP accepting entries beyond the end of the core's log.
A refused message is dropped as if lost, which Raft tolerates.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from .core import RaftNode
from .types import Message, MessageType

MAX_TERM_JUMP = 1 << 32
"""Largest term increase a message may bring (see the module docstring)."""

_LEADER_TRAFFIC = frozenset({MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP})


def refusal(
    core: RaftNode, m: Message, placed: Collection[int] = (), is_member: Callable[[int], bool] | None = None
) -> str | None:
    """The reason `core` must not be handed `m`, or None if it may. `is_member` (if given) says
    whether a node id belongs to the cluster at all; it is what an empty core goes by."""
    conf = core.conf
    frm = m.frm
    if is_member is not None and not is_member(frm):
        return "not_member"
    me = core.id
    if conf.voters and (me in conf.voters or me in conf.learners) and frm not in conf.voters \
            and frm not in conf.learners and frm not in placed \
            and not (m.type in _LEADER_TRAFFIC and m.term >= core.term):
        # The newest configuration may come from an uncommitted entry that a new leader will
        # overwrite: its members count until a removal is committed (or the node would never
        # hear the leader that rolls the removal back).
        done = core.conf_state_at(core.log.committed)
        if frm not in done.voters and frm not in done.learners:
            return "not_group_member"
    if m.term > core.term + MAX_TERM_JUMP:
        return "term_jump"
    if m.type == MessageType.APP_RESP and not m.reject and m.index > core.log.last_index():
        return "beyond_log"
    if m.type == MessageType.TIMEOUT_NOW and (frm != core.lead or m.term != core.term):
        return "timeout_now"
    return None
