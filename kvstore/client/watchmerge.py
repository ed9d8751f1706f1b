"""Merging the sub-watches of one watch served by several nodes. Sans-I/O: pure and deterministic.

When no node hosts every group of a watched range, the client covers the groups with a few nodes
(`cover`: greedy set cover over the shard map's replicas) and opens one sub-watch per node, each
restricted to the groups given to it (`WatchCreateRequest.groups`). `Merge` turns the sub-watches'
responses back into one watch with the same contract as a watch served by one node (README,
"Watch"); `kvstore/client/watches.py` runs it over gRPC streams, the tests and the simulator feed
it directly.

Invariants (each sub i is a watch of some groups; f_i its frontier, the `revision` of its last
response: it has delivered every event of its groups at or below f_i):
- F = max(base, min f_i) is the merged frontier: every event of the range at or below F has been
  received (the subs cover every group), and none at or below it can still come. `base` is the
  revision below the start (start - 1), or with a start "now" the highest created revision M of
  the subs.
- Everything at or below F is emitted, in revision order, all events of one revision in one
  batch (a revision lives in one group: its slot bits name it; so in one sub, and is never
  split over a sub's responses), each event once, nothing at or below `base` (so nothing from before the start).
  `emitted` is the highest F handed out; a restart from `emitted` + 1 misses and repeats nothing.
- Nothing is emitted before every sub is created (the start is not known before).
- A sub holding an event at R > F waits for the subs below R: `asks` names them, at R (the
  highest wanted), one progress request in flight per sub (`WatchProgressRequest.revision`: its
  node closes its groups up to R and answers once past it). A start "now" asks the subs created
  below M for M the same way.
- Memory: `paused(i)` says sub i holds at least `max_queued` events, or `max_bytes` bytes of
  events (`response`'s sizes), it cannot emit yet; its reader should stop reading (transport flow control then holds the node back). The sub at the
  frontier holds nothing unemittable, so pausing never stalls the merge.
- Bookmarks while quiet: `catch_up` (the caller's timer) asks the subs below the most advanced
  one to reach its revision (their nodes also close a quiet sub's groups at the clock's now, as
  for any watch with progress notifications), so the merged revision follows the clock.
- A progress request the sub's node refuses (its clock is behind the revision by more than the
  uncertainty bound) is asked again after the next `catch_up` (about a second), not at once.
- Any other failure of a sub (a broken stream, a cancel) ends the merged watch:
  the caller starts a new one from `restart_revision` with a fresh cover (`Merge` does not
  recover itself).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

__all__ = ["MAX_QUEUED_BYTES", "Batch", "Merge", "cover"]

MAX_QUEUED_BYTES = 4 << 20
"""Bytes of events a sub may hold ahead of the others before it is read no more (`Merge.paused`):
the node watch hub's per-stream bound (`WatchLimits.stream_bytes`), shared by kvstore's client
and the etcd API's merged watches."""


class _HasRevision(Protocol):
    @property
    def revision(self) -> int: ...


E = TypeVar("E", bound=_HasRevision)


@dataclass(frozen=True, slots=True)
class Batch(Generic[E]):
    """What the merged watch delivers: its events (revision order, every revision whole) and
    `revision`: every event at or below it has been delivered. No events: a progress batch."""

    revision: int
    events: tuple[E, ...]


@dataclass(slots=True)
class _Sub(Generic[E]):
    frontier: int = -1
    """The revision of its last response (-1: not created yet)."""
    created: int = -1
    """The revision of its created response."""
    queue: deque[tuple[int, tuple[E, ...], int]] = field(default_factory=deque)
    """Received events above the merged frontier, by revision (one entry per revision: the
    revision, its events, their bytes)."""
    queued: int = 0
    """Events in `queue`."""
    queued_bytes: int = 0
    """Bytes of the events in `queue` (as `response` was told)."""
    want: int = 0
    """The highest revision to ask it to progress to."""
    asked: int = 0
    """The revision of its progress request in flight (answered once frontier >= it)."""
    held: bool = False
    """Its node refused a progress request (its clock is behind the revision): asked again
    only after the next `catch_up`."""


class Merge(Generic[E]):
    """One merged watch over `subs` sub-watches (see the module docstring). `start_revision` 0:
    start "now" (every sub created with 0)."""

    def __init__(self, subs: int, start_revision: int, max_queued: int = 10_000,
                 max_bytes: int = MAX_QUEUED_BYTES) -> None:
        if subs < 1 or start_revision < 0 or max_queued < 1 or max_bytes < 1:
            raise ValueError("subs >= 1, start_revision >= 0, max_queued >= 1, max_bytes >= 1")
        self.subs: list[_Sub[E]] = [_Sub() for _ in range(subs)]
        self.now = not start_revision
        self.base = start_revision - 1 if start_revision else -1
        """Nothing at or below it is emitted (-1 with a start now: not known yet)."""
        self.emitted = -1
        """The highest frontier handed out (-1: none yet)."""
        self.max_queued = max_queued
        self.max_bytes = max_bytes
        self._out: list[Batch[E]] = []
        self._started = False

    # --- inputs -------------------------------------------------------------------------------
    def created(self, sub: int, revision: int) -> None:
        """Sub `sub` was created; its created response's `revision` (its start - 1)."""
        s = self.subs[sub]
        if s.frontier >= 0:
            raise ValueError(f"sub {sub} created twice")
        s.frontier = s.created = revision
        if all(x.frontier >= 0 for x in self.subs):
            self._start()
        self._move()

    def response(self, sub: int, revision: int, events: Sequence[E], sizes: Sequence[int] = ()) -> None:
        """A response of sub `sub`: `events` (revision order) and its `revision` (>= each);
        `sizes`: each event's bytes (what `paused` counts; none given: 0 each)."""
        s = self.subs[sub]
        if sizes and len(sizes) != len(events):
            raise ValueError(f"sub {sub}: {len(sizes)} sizes for {len(events)} events")
        if s.frontier < 0:
            raise ValueError(f"sub {sub} answered before it was created")
        if revision < s.frontier or (events and events[0].revision <= s.frontier):
            raise ValueError(f"sub {sub} went back: {revision} after {s.frontier}")
        q = s.queue
        i = 0
        n = len(events)
        floor = max(self.base, self.emitted)
        while i < n:
            r = events[i].revision
            j = i + 1
            while j < n and events[j].revision == r:
                j += 1
            if r > revision or (j < n and events[j].revision < r):
                raise ValueError(f"sub {sub} sent events out of order or above its revision {revision}")
            if r > floor:
                nbytes = sum(sizes[i:j]) if sizes else 0
                q.append((r, tuple(events[i:j]), nbytes))
                s.queued += j - i
                s.queued_bytes += nbytes
            i = j
        s.frontier = revision
        self._move()

    # --- outputs ------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Every sub is created: `base` is known."""
        return self._started

    @property
    def frontier(self) -> int:
        """F (see the module docstring); -1 before the start."""
        if not self._started:
            return -1
        return max(self.base, min(s.frontier for s in self.subs))

    @property
    def restart_revision(self) -> int:
        """Where a new merged watch should start after a failure: `emitted` + 1, or 0 (now) if
        nothing was started yet with a start now."""
        if self.emitted >= 0:
            return self.emitted + 1
        return 0 if self.now else self.base + 1

    def take(self) -> list[Batch[E]]:
        """The batches to deliver, in order (the first one after the start is at `base`, no
        events: the merged created point)."""
        out, self._out = self._out, []
        return out

    def asks(self) -> list[tuple[int, int]]:
        """(sub, revision) progress requests to send now (marked in flight)."""
        out: list[tuple[int, int]] = []
        for i, s in enumerate(self.subs):
            if s.want > s.frontier and s.asked <= s.frontier and s.frontier >= 0 and not s.held:
                s.asked = s.want
                out.append((i, s.want))
        return out

    def catch_up(self) -> None:
        """Bookmarks while quiet (the caller's timer, about once a second): ask the subs below
        the most advanced one to get to its revision, so the merged revision follows it even
        when no event waits (as a progress request does for the groups of a watch on one node)."""
        if not self._started:
            return
        top = max(s.frontier for s in self.subs)
        for s in self.subs:
            s.held = False
            if s.frontier < top:
                s.want = max(s.want, top)

    def refused(self, sub: int) -> None:
        """Sub `sub`'s node refused its progress request (the revision is further ahead of its
        clock than the uncertainty bound: clocks apart by more than that). The want stays; it is
        asked again after the next `catch_up` (its clock moves on meanwhile)."""
        s = self.subs[sub]
        s.asked = 0
        s.held = True

    def paused(self, sub: int) -> bool:
        """Sub `sub` holds too many events, or bytes of events, it cannot emit yet: stop
        reading it for now."""
        s = self.subs[sub]
        return s.queued >= self.max_queued or s.queued_bytes >= self.max_bytes

    # --- internals ----------------------------------------------------------------------------
    def _start(self) -> None:
        self._started = True
        if self.now:
            self.base = max(s.created for s in self.subs)
            for s in self.subs:  # events of the start's past are not the watch's
                while s.queue and s.queue[0][0] <= self.base:
                    _, evs, nbytes = s.queue.popleft()
                    s.queued -= len(evs)
                    s.queued_bytes -= nbytes
        for s in self.subs:
            if s.frontier < self.base:
                s.want = max(s.want, self.base)

    def _move(self) -> None:
        if not self._started:
            return
        f = self.frontier
        if f > self.emitted:
            ready = [self._ready(s, f) for s in self.subs]
            groups = [g for g in ready if g]
            merged = groups[0] if len(groups) == 1 else list(heapq.merge(*groups, key=_first))
            events: list[E] = []
            for _, evs, _n in merged:
                events.extend(evs)
            self._out.append(Batch(f, tuple(events)))
            self.emitted = f
        # the subs holding events above F wait on the others: ask those to get past them
        top = max((s.queue[-1][0] for s in self.subs if s.queue), default=0)
        if top > f:
            for s in self.subs:
                if s.frontier < top:
                    s.want = max(s.want, top)

    @staticmethod
    def _ready(s: _Sub[E], f: int) -> list[tuple[int, tuple[E, ...], int]]:
        out = []
        q = s.queue
        while q and q[0][0] <= f:
            item = q.popleft()
            s.queued -= len(item[1])
            s.queued_bytes -= item[2]
            out.append(item)
        return out


def _first(item: tuple[int, tuple[E, ...], int]) -> int:
    return item[0]


def cover(groups: Iterable[int], members: Mapping[int, Collection[int]], usable: Collection[int],
          order: Sequence[int] = ()) -> dict[int, tuple[int, ...]] | None:
    """Give every group of `groups` to one node that hosts it (`members`: group -> its nodes),
    using few nodes: greedy set cover over the `usable` nodes (the node covering the most groups
    still uncovered first; ties: earlier in `order`, then the lower id). None if some group has
    no usable node. Node -> its groups (sorted)."""
    todo = set(groups)
    hosts: dict[int, set[int]] = {}
    for g in todo:
        for n in members.get(g, ()):
            if n in usable:
                hosts.setdefault(n, set()).add(g)
    rank = {n: i for i, n in enumerate(order)}
    out: dict[int, tuple[int, ...]] = {}
    while todo:
        best = max(hosts, key=lambda n: (len(hosts[n] & todo), -rank.get(n, len(rank)), -n), default=None)
        if best is None or not hosts[best] & todo:
            return None
        mine = hosts.pop(best) & todo
        out[best] = tuple(sorted(mine))
        todo -= mine
    return out
