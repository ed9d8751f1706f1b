"""Closing groups at a revision, and reads at a revision that are exact across groups
(docs/REVISIONS.md, "Reads at a revision"). Synchronous node logic: no event loop, no clock of
its own (the leader's `HybridClock` is handed in), no I/O; `kvstore.server.requests` runs it
with asyncio, the simulator as is.

A group's applied `RevState.last` is a *closed revision*: every later write of the group gets a
revision above it (the apply rule, `mvcc.next_revision`). A CLOSE command (`commands.Op.CLOSE`)
raises it without writing: once a replica has applied `CLOSE(R)`, the group can never again
write at or below R, so its history answers a read at R for good.

- `NodeCloses.close(group, R, callback)` runs on the group's leader: it refuses a revision
  beyond `mvcc.PROPOSAL_MAX` or further ahead of the leader's wall clock than the uncertainty
  bound (`HybridClock.check_close`: a far-future R would drag every later revision of the group
  forward; definite INVALID_ARGUMENT; the bound ignores observed revisions, so repeated closes
  cannot ratchet it), observes R with the leader's clock (its later proposals
  are above it), and proposes `CLOSE(R)`. Closes of one group that arrive while one is in
  flight coalesce: the next proposal closes at the largest of them, and a close at or below one
  in flight waits for that one. `callback(last, None)` with the group's last revision once
  applied (>= R), or `(0, error)`.
- `NodeCloses.ensure_closed(group, R, reads, forward, done)` makes a read at R of `group` exact
  on any node: nothing to do if the local applied last is >= R; otherwise the close goes
  through the group's leader (`close` here if this node leads it, else `forward` to the leader,
  which the server does over `Shard.GroupPropose`), then this node takes a linearizable read
  point (`NodeReads`): it has applied through an index at or above the close's, so its applied
  last is >= R. `done(None)` then, or `done(error)` (reads have no effects: always definite).

Invariants:
- a callback is called exactly once (maybe before the call returns);
- a CLOSE is proposed only by a leader, only for 0 < R <= its clock now + `max_offset_ms`;
- at most one CLOSE per group is in flight from this node; the pending ones are merged into
  one (their maximum).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvstore import errors
from kvstore.node.hlc import HybridClock
from kvstore.node.host import Host
from kvstore.node.reads import LINEARIZABLE, NodeReads, ReadPoint
from kvstore.raft import Role
from kvstore.storage import commands

CloseCallback = Callable[[int, errors.KVError | None], None]
"""`(last, None)`: the group's last revision once the close applied (>= the revision asked
for); `(0, error)` otherwise."""

Forward = Callable[[int, int, CloseCallback], None]
"""`forward(group, revision, callback)`: have the group's leader close it (a non-leader's path)."""

Done = Callable[[errors.KVError | None], None]


@dataclass(slots=True)
class _GroupCloses:
    """One group's closes on its leader: the one in flight and the ones waiting for it."""

    inflight: int = 0
    """The revision of the CLOSE in flight (0: none)."""
    riding: list[tuple[int, CloseCallback]] = field(default_factory=list)
    """Callers answered by the CLOSE in flight (their revision <= `inflight`)."""
    pending: int = 0
    """The largest revision waiting for the next CLOSE (0: none)."""
    waiting: list[tuple[int, CloseCallback]] = field(default_factory=list)


class NodeCloses:
    """One node's closes (leader side) and exact reads at a revision (any node)."""

    def __init__(self, host: Host, clock: HybridClock, wake: Callable[[], None] = lambda: None) -> None:
        self.host = host
        self.wake = wake
        """Called after proposing or starting a read from a callback (the driver runs a cycle)."""
        self.clock = clock
        """The node's HLC: the one its writes are proposed with (a close is checked against it
        and observed by it)."""
        self._groups: dict[int, _GroupCloses] = {}
        self.proposed = 0
        """CLOSE commands proposed by this node (a measure of what closes cost)."""

    # --- checks -----------------------------------------------------------------------------
    def check(self, revision: int) -> None:
        """Refuse (definite InvalidArgument; FutureRevision for one that is absurd (above
        `mvcc.PROPOSAL_MAX`) or more than the clock-uncertainty bound ahead of this node's clock) a
        revision to read or close at that is negative, absurd or in the future: no node has issued
        it, and closing at it would drag the group's later revisions into the future."""
        try:
            self.clock.check_close(revision)
        except errors.InvalidArgument as err:
            raise type(err)(
                f"revision {revision} is beyond what the cluster has issued ({err})"
            ) from None

    def last(self, group: int) -> int:
        """The group's applied last (closed) revision on this node."""
        return self.host.store.revisions.rev_state(group).last

    # --- the leader's side ------------------------------------------------------------------
    def close(self, group: int, revision: int, callback: CloseCallback) -> None:
        """Close `group` (led here) at `revision` through its log; see the module docstring.
        Raises a definite KVError (InvalidArgument, NotLeader, NoLeader, StorageFull) if it
        cannot even be proposed."""
        self.check(revision)
        g = self.host.groups.get(group)
        if g is None:
            raise errors.WrongShard(f"group {group} is not on node {self.host.node_id}")
        if g.core.role != Role.LEADER:
            raise self.host.not_leader_error(g.id)
        self.host._check_writable()
        self.clock.observe(revision)
        gc = self._groups.get(group)
        if gc is None:
            gc = self._groups[group] = _GroupCloses()
        if gc.inflight and revision <= gc.inflight:
            gc.riding.append((revision, callback))
            return
        gc.pending = max(gc.pending, revision)
        gc.waiting.append((revision, callback))
        if not gc.inflight:
            self._propose(group, gc)

    def _propose(self, group: int, gc: _GroupCloses) -> None:
        """Propose a CLOSE at the largest pending revision; its callers ride it."""
        rev, callers = gc.pending, gc.waiting
        gc.pending, gc.waiting = 0, []
        gc.inflight, gc.riding = rev, callers

        def applied(result: Any, err: errors.KVError | None) -> None:
            riding = gc.riding
            gc.inflight, gc.riding = 0, []
            if err is None and (result is None or result.error):
                why = "no result" if result is None else result.error
                err = errors.InvalidArgument(f"group {group} refused the close at {rev}: {why}")
            last = 0 if err is not None else result.revision
            for _, cb in riding:
                cb(last, err)
            if gc.waiting:
                self._next(group, gc)
            elif not gc.inflight:
                self._groups.pop(group, None)

        try:
            self.host.propose(group, commands.encode_close(rev), applied)
        except errors.KVError as err:
            gc.inflight, gc.riding = 0, []
            for _, cb in callers:
                cb(0, err)
            if gc.waiting and not gc.inflight:
                self._next(group, gc)  # closes asked for by those callbacks
            elif not gc.inflight:
                self._groups.pop(group, None)
            return
        self.proposed += 1
        self.wake()

    def _next(self, group: int, gc: _GroupCloses) -> None:
        """Propose the closes that waited for the one that just finished (if still leading)."""
        g = self.host.groups.get(group)
        if g is None or g.core.role != Role.LEADER:
            waiting, gc.waiting, gc.pending = gc.waiting, [], 0
            self._groups.pop(group, None)
            err = errors.NoLeader(f"group {group} is gone") if g is None else self.host.not_leader_error(g.id)
            for _, cb in waiting:
                cb(0, err)
            return
        self._propose(group, gc)

    # --- any node: exact reads at a revision --------------------------------------------------
    def ensure_closed(self, group: int, revision: int, reads: NodeReads, forward: Forward, done: Done) -> None:
        """Call `done(None)` once this node's applied state of `group` is closed at `revision`
        (a read at it is final), or `done(error)`; see the module docstring. Raises a definite
        KVError if it cannot even start."""
        if self.last(group) >= revision:
            done(None)
            return
        self.check(revision)

        def at_point(point: ReadPoint | None, err: errors.KVError | None) -> None:
            if err is not None:
                done(err)
                return
            have = self.last(group)
            if have >= revision:
                done(None)
            else:  # cannot happen: the read point is at or after the close's entry
                done(errors.Unavailable(
                    f"node {self.host.node_id}: group {group} is closed at {have}, below {revision}; retry"
                ))

        def closed(_last: int, err: errors.KVError | None) -> None:
            if err is not None:
                done(err)
                return
            if group not in self.host.groups:  # gone from this node meanwhile (a move, a removal)
                done(errors.WrongShard(f"group {group} is no longer on node {self.host.node_id}"))
                return
            try:
                reads.read(group, LINEARIZABLE, 0, at_point)
            except errors.KVError as e:
                done(e)
                return
            self.wake()

        g = self.host.groups.get(group)
        if g is None:
            raise errors.WrongShard(f"group {group} is not on node {self.host.node_id}")
        if g.core.role == Role.LEADER:
            self.close(group, revision, closed)
        else:
            forward(group, revision, closed)

