"""Closing the groups a watch waits on, as soon as it waits (docs/REVISIONS.md, "Watch", "Idle
groups"). Synchronous node logic: no event loop, no clock of its own (`clock` is handed in), no
I/O; `kvstore.server.watch_service.WatchDriver` runs it with asyncio, the simulator as is.

The hub (`kvstore.node.watch.WatchHub.close_wants`) says which groups to close at which revision
so that the events it holds go out; the periodic closer adds the groups that hold back watches
with progress notifications. `CloseSchedule` decides what to send and when; `WatchCloser` sends
it through `kvstore.node.closes` (proposed here if this node leads the group, else forwarded to
its leader over `Shard.GroupPropose` and followed by a read point on this replica:
`replica_close`).

Invariants of `CloseSchedule`:
- at most one close per group is in flight, and at most `max_inflight` in all; what is asked for
  meanwhile is merged into the group's `want` (their maximum) and sent when the one in flight
  ends (coalesced: a thousand events waiting on a group cost one close per Raft round of it);
- nothing is sent for a revision the group has already passed (its last revision as applied
  here, or a close of it acknowledged at or above it): a group that writes by itself past R needs
  no close, and a want it passed is dropped;
- a want may be held until a time (`hold_until`): `WatchCloser` holds the want of a group that
  applied a change of its own within the last `busy_grace` seconds, so under a high write rate
  groups that write pass each other's revisions by themselves instead of closing each other
  (at most `busy_grace` more wait for an event when the busy group stops);
- a failed close is sent again after a backoff (`backoff` doubling up to `max_backoff` per
  consecutive failure of the group), as long as it is still wanted; a success resets it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvstore import errors
from kvstore.node.closes import CloseCallback, Forward, NodeCloses
from kvstore.node.reads import NodeReads

from .watch import WatchHub


@dataclass(slots=True)
class _Group:
    """One group's closes (see the module docstring)."""

    want: int = 0
    """The largest revision asked for and not yet known to be reached (0: none)."""
    inflight: int = 0
    """The revision of the close in flight (0: none)."""
    reached: int = 0
    """The highest revision a close of the group was acknowledged at (its leader applied it)."""
    failures: int = 0
    """Consecutive failed closes."""
    retry_at: float = 0.0
    """No close before this time (after a failure)."""
    hold_until: float = 0.0
    """Nor before this one (the group writes by itself: it may pass the want)."""
    sent_at: float = 0.0
    """When the close in flight was sent."""


class CloseSchedule:
    """Which groups to close at which revision, and when (see the module docstring)."""

    def __init__(self, max_inflight: int = 64, backoff: float = 0.02, max_backoff: float = 1.0,
                 timeout: float = 0.5) -> None:
        if max_inflight < 1 or backoff <= 0 or max_backoff < backoff or timeout <= 0:
            raise ValueError("max_inflight >= 1, 0 < backoff <= max_backoff and timeout > 0")
        self.max_inflight = max_inflight
        self.timeout = timeout
        """A close unanswered this long (seconds) is taken as failed and asked again: its answer
        may never come (a forward's reply lost, the leader that took it crashed or deposed). A
        late answer of it is ignored, or counts for the close sent again at the same revision
        (both are true statements about the group)."""
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.groups: dict[int, _Group] = {}
        self.inflight = 0
        """Closes in flight (<= `max_inflight`)."""

    def want(self, group: int, revision: int, hold_until: float = 0.0) -> None:
        """Ask for `group` to be closed at `revision` (merged with what is already asked), not
        before `hold_until`."""
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = _Group()
        if revision > g.want and revision > g.reached:
            g.want = revision
        g.hold_until = hold_until

    def due(self, now: float, last: Callable[[int], int | None]) -> list[tuple[int, int]]:
        """The closes to send now, as (group, revision), marked in flight: each group with a want
        above its `last` (None: no longer of interest, forgotten) and above what a close reached,
        with none in flight and no backoff pending, up to the in-flight bound."""
        out: list[tuple[int, int]] = []
        for gid in list(self.groups):
            g = self.groups[gid]
            have = last(gid)
            if have is None:
                if not g.inflight:
                    del self.groups[gid]
                else:
                    g.want = 0
                continue
            if g.inflight and now - g.sent_at >= self.timeout:
                self.finished(gid, g.inflight, 0, _TIMED_OUT, now)
            if g.want and (g.want <= have or g.want <= g.reached):
                g.want = 0  # passed by itself (its own writes) or by an earlier close
            if not g.want:
                if not g.inflight and g.reached <= have:
                    del self.groups[gid]  # nothing asked, nothing to remember
                continue
            if g.inflight or now < g.retry_at or now < g.hold_until or self.inflight >= self.max_inflight:
                continue
            g.inflight, g.want = g.want, 0
            g.sent_at = now
            self.inflight += 1
            out.append((gid, g.inflight))
        return out

    def finished(self, group: int, revision: int, reached: int, err: errors.KVError | None, now: float) -> None:
        """The close of `group` at `revision` ended: acknowledged with the group's last revision
        `reached` (>= revision), or failed with `err` (asked again after a backoff)."""
        g = self.groups.get(group)
        if g is None or g.inflight != revision:
            return
        g.inflight = 0
        self.inflight -= 1
        if err is None:
            g.failures = 0
            g.retry_at = 0.0
            g.reached = max(g.reached, reached, revision)
            return
        g.failures += 1
        g.retry_at = now + min(self.max_backoff, self.backoff * (1 << min(g.failures - 1, 30)))
        if revision > g.want:
            g.want = revision

    def next_retry(self, now: float) -> float | None:
        """When the earliest close that waits for its backoff or hold may be sent (None: none
        waits; one that waits for the in-flight bound goes when a close ends)."""
        times = [t for g in self.groups.values()
                 if g.want and not g.inflight and (t := max(g.retry_at, g.hold_until)) > now]
        times += [g.sent_at + self.timeout for g in self.groups.values() if g.inflight]
        return min(times, default=None)


_TIMED_OUT = errors.Timeout("the close was not answered in time", indeterminate=True)

Leads = Callable[[int], bool]
"""`leads(group)`: this node leads the group now."""

Send = Callable[[int, int, CloseCallback], None]
"""`send(group, revision, callback)`: close it (`NodeCloses.close` here, or the forward to its
leader); may raise a definite KVError instead of calling back."""


def replica_close(closes: NodeCloses, reads: NodeReads, forward: Forward) -> Send:
    """The `Send` of a replica that does not lead the group: `NodeCloses.ensure_closed` (the
    close through the leader, then a linearizable read point here), so the callback comes once
    this replica applied the close: the leader sends it the commit index right after answering
    its read index, whatever `kvstore/raft/core.py` ("Commit propagation") would otherwise do.
    (With `announce_commit` on, the follower would mostly have learned it within a round trip
    anyway: the read index round is then the price of knowing it here.) The callback's revision
    is the one asked for (the group is closed at least there, as applied here)."""

    def send(group: int, revision: int, cb: CloseCallback) -> None:
        def done(err: errors.KVError | None) -> None:
            cb(0 if err is not None else revision, err)

        closes.ensure_closed(group, revision, reads, forward, done)

    return send


class WatchCloser:
    """A node's closes for its watches: the hub's wants through a `CloseSchedule`, sent at the
    group's leader (`close`) or forwarded to it (`forward`). `run` after every hub step (and
    after `wake`, which a finished close calls); the driver also calls `run` by `retry_at`."""

    def __init__(self, hub: WatchHub, leads: Leads, close: Send, forward: Send, clock: Callable[[], float],
                 wake: Callable[[], None], schedule: CloseSchedule | None = None, busy_grace: float = 0.01) -> None:
        self.hub = hub
        self.leads = leads
        self.close = close
        self.forward = forward
        self.clock = clock
        self.wake = wake
        self.schedule = schedule or CloseSchedule()
        self.busy_grace = busy_grace
        """A group that applied a change of its own this recently is given this long to pass a
        wanted revision by itself before it is closed (seconds; 0: never held)."""
        self.sent = 0
        """Closes sent (a measure of what watches cost)."""
        self.failed = 0

    def ask(self, wants: dict[int, int]) -> None:
        """Closes asked for outside the hub's events (the periodic closer's lagging groups)."""
        for g, rev in wants.items():
            self.schedule.want(g, rev)

    def run(self, now: float) -> None:
        """Take the hub's new wants and send what is due."""
        sched = self.schedule
        wrote, grace = self.hub.wrote_at, self.busy_grace
        for g, rev in self.hub.close_wants().items():
            t = wrote.get(g)
            sched.want(g, rev, t + grace if t is not None and grace else 0.0)
        if not sched.groups:
            return
        for g, rev in sched.due(now, self.hub.last.get):
            self._send(g, rev)

    def retry_at(self, now: float) -> float | None:
        """When `run` has a held or retried close to send (the driver's timer)."""
        return self.schedule.next_retry(now)

    def _send(self, g: int, rev: int) -> None:
        self.sent += 1
        answered = False

        def done(last: int, err: errors.KVError | None) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            if err is not None:
                self.failed += 1
            self.schedule.finished(g, rev, last, err, self.clock())
            self.wake()

        try:
            (self.close if self.leads(g) else self.forward)(g, rev, done)
        except errors.KVError as err:
            done(0, err)


__all__ = ["CloseSchedule", "WatchCloser", "replica_close"]
