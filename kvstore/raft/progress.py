"""Per-follower replication progress, as seen by the leader.

States:
- PROBE: the leader does not know where the follower's log matches; it sends at most one append
  per heartbeat interval and waits for the answer (`paused`).
- REPLICATE: the follower is known to match up to `match`; appends are pipelined optimistically
  (`next` moves ahead of `match`) within a bounded in-flight window.
- SNAPSHOT: the follower needs a snapshot; nothing else is sent until the snapshot is reported
  done or failed.

Invariant: match < next.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


@dataclass(slots=True)
class Progress:
    match: int = 0
    next: int = 1
    state: ProgressState = ProgressState.PROBE
    paused: bool = False
    """In PROBE: an append is outstanding; wait for its answer (or the next heartbeat)."""
    pending_snapshot: int = 0
    recent_active: bool = False
    """Heard from since the last check-quorum round."""
    is_learner: bool = False
    inflight: deque[int] = field(default_factory=deque)
    """Last index of each append sent in REPLICATE state and not yet acknowledged."""
    read_round: int = 0
    """Highest ReadIndex round this follower has acknowledged (by heartbeat response)."""
    lease_tick: int = -1
    """Leader tick at which the newest heartbeat this follower acknowledged was sent."""
    commit_known: int = 0
    """Highest commit index the follower reported having (heartbeat responses, only with
    quiescence enabled): a leader quiesces only once every follower knows its commit index."""
    commit_sent: int = 0
    """Highest commit index an append to this follower carried (`Config.announce_commit`)."""

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
            self.pending_snapshot = 0
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.paused = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.paused = False
        self.inflight.clear()

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged up to `index`. Returns True if `match` moved forward."""
        updated = False
        if index > self.match:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of an append at `rejected`; `match_hint` is where to retry from.

        Returns False if the rejection is stale (out of order).
        """
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.paused = False
        return True

    def is_paused(self, max_inflight: int) -> bool:
        if self.state == ProgressState.PROBE:
            return self.paused
        if self.state == ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True

    def sent_entries(self, last: int) -> None:
        """An append ending at `last` was sent (`last` = index of its last entry)."""
        if self.state == ProgressState.REPLICATE:
            if last >= self.next:
                self.next = last + 1
                self.inflight.append(last)
        elif self.state == ProgressState.PROBE:
            self.paused = True
