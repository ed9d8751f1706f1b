"""The watch hub: change feeds of key ranges across groups, merged in revision order. Sans-I/O.

Synchronous and deterministic (no clock: `now` is handed in; no I/O but the store's reads, made
only from `WatchHub.step`), so the simulator can run it as the server does. The gRPC adapter
(`server/watch_service.py`) feeds a `WatchStream` the client's requests and sends what `take`
returns; the node's Ready loop calls `applied` with the groups each cycle applied to and then
`step`.

How a watch is served:
- **Groups.** A watch of one key covers the group its hash maps to; any other range covers every
  data group (keys are spread by hash), or only the ones its create names (`partial`: a client
  merges the sub-watches of a cover of the groups at several nodes, `client/watchmerge.py`).
  This node must host all of them (any replica: leader, follower or learner, since it reads its
  own applied state); otherwise the create is refused with a definite WRONG_SHARD naming them.
- **Start now.** A create with start revision 0 starts at M + 1, M = the highest last revision
  of its groups (or compact): the groups below M are closed up to M first (`_asked`), and the
  created reply (revision M) goes out only once every group reached M (`Watcher.waiting`,
  `_settle`; until then it is in `_waiting`, not advanced); nothing of the watch is sent before
  it. So every change applied after the created reply is delivered, and none applied before
  the create.
- **Progress at a revision.** A progress request at R (the adapter checked R against the clock)
  asks closes of every group of the stream's watches below R, up to R, and gives each watch a
  progress reply once its cursor passed R (`Watcher.progress_at`, `_progress_at`).
- **The frontier.** A group's last revision `RevState.last`, as applied here, is closed: every
  later write of the group gets a higher revision (the apply rule; CLOSE raises it without a
  write), except a cross-group transaction's commit at R >= the revision p it reserved while its
  intents are held: so the frontier is min(last, lowest pending p - 1) (`StoreSource.rev_state`). So a watcher may send every event at or below F = min over its groups of their last
  revision, and nothing at or below F can appear later: events go out in revision order, each
  once. `close_wants` names the groups to close so that held events go out (below).
- **Event-driven closes.** The hub knows, per watched group, the highest revision at which it saw
  the group apply a change (`written`: a write, not a CLOSE; found by reading one change row of
  the revisions a cycle applied). A watch over several groups whose frontier F is below a
  revision R = max `written` of its groups holds an event (maybe outside its key range) that waits
  for the groups whose last is below R: `close_wants` names exactly those, at R, as soon as a step
  sees it (and, for a progress request, every group below the highest last of the stream's
  watches). Closes raise `last` without a change, so they never make more wants: once the lagging
  groups are closed at R, nothing waits. The node (`kvstore/node/watchcloses.py`) coalesces and
  sends them. `lagging_groups` names the idle groups that hold back a watch with progress
  notifications (the node's periodic closer).
- **One reader for catch-up and live.** A watcher is a cursor `next_rev` into its groups' change
  logs (`storage/changefeed.py`): each step reads [next_rev, F] (bounded: whole revisions, at most
  `read_events` per group), merges by revision, filters by key range and kind, queues the events
  in replies (a revision never split; `revision` = everything at or below it sent), and moves
  next_rev past it. Watchers at the same position share the step's reads.
- **Work proportional to what changed.** Caught-up watchers of one group set (and prev_kv
  choice) are a `_Cohort` at one shared position: a step reads and merges its [pos, F] once,
  selects each distinct filter's events once and hands the same lists to that filter's members
  (a member that gets no event is not visited). Watchers catching up, or whose stream is full,
  are behind (`_behind`): visited one by one, they join the cohort at its position. Progress
  replies come from a heap of deadlines, slow-stream checks from the set of full streams,
  `lagging_groups` from per-set counts: no per-cycle walk over every watcher (`visits` counts
  the watchers steps looked at).
- **Compaction.** A start revision below a group's compact revision (or a cursor that
  compaction overtook) is canceled with COMPACTED naming it: definite, never a silent gap. A
  start at exactly the compact revision C works, as in etcd, when the group kept the changes at
  C (`RevState.kept`: a compaction under the keep rule, `mvcc.compact`), so the watch gets them
  (without prev_kv) and then everything after; a group compacted under the first rule (by a
  binary before feature level 8, or before the cluster reached it) consumed them, so a start at
  its C is refused too until its next keep-rule compaction.
- **Bounded memory.** A stream's queued replies are bounded (`stream_bytes`): above it the hub
  stops reading for it (its watchers fall behind and catch up from history when it drains). A
  stream that stays full for `slow_after` seconds, and the stream with the most queued bytes
  while all streams together exceed `node_bytes`, have their watches canceled (RESOURCE_EXHAUSTED,
  "slow watcher") with their queued events dropped and `resume_revision` = the first revision
  not handed to the transport. Watchers per stream and per node are capped; requests beyond are
  refused, definite.
- **Range moves.** When a covered group's shard state changes (a move's FREEZE, INSTALL,
  ACTIVATE or DROP: the map under the watch changes) or the group leaves this node, its watchers
  are canceled with WRONG_SHARD ("range moved") and `resume_revision` = next_rev (every event
  below it is queued before the cancel); a create while a covered group has frozen or
  installing ranges is refused the same way, to be retried. The client resumes transparently.
  A moved range's history keeps its revisions and its change-log rows in the target
  (`mvcc.install_history`), so the resumed watch catches up there.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvstore import errors
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import mvcc
from kvstore.storage.changefeed import PUT, Change, ChangeBatch
from kvstore.storage.errors import StorageError
from kvstore.storage.shardcmd import ShardState

from .watchspec import Reply, WatchSpec

SLOW = "slow watcher: its stream did not take the events sent to it in time; resume at resume_revision"
MOVED = "range moved: the groups serving the watched range changed; resume at resume_revision"


@dataclass(frozen=True, slots=True)
class WatchLimits:
    """Bounds of the hub (per node; every bound holds against hostile clients)."""

    watchers_per_stream: int = 1024
    watchers_per_node: int = 16384
    stream_bytes: int = 4 << 20
    """Queued replies of one stream; the hub reads nothing more for it above this."""
    node_bytes: int = 64 << 20
    """Queued replies of all streams; above it the fullest stream's watches are canceled."""
    requests_per_stream: int = 256
    """Requests queued on a stream before `step` handles them (the adapter waits above it)."""
    reply_bytes: int = 1 << 20
    """Events per reply (about; a revision is never split over replies)."""
    read_events: int = 1024
    """Changes read per group per watcher per step."""
    step_events: int = 2048
    """Changes read per step in all; the rest waits for the next step (`step` returns True)."""
    slow_after: float = 10.0
    """Seconds a stream may stay full before its watches are canceled."""
    progress_interval: float = 1.0
    """A quiet watcher with progress_notify gets a progress reply this often."""
    close_interval: float = 0.1
    """How often the node closes the groups `lagging_groups` names (the driver's period): the
    fallback that moves the frontier of watches with progress notifications."""
    close_idle: float = 0.05
    """A group that applied a change this recently is not named by `lagging_groups` (it is likely
    to pass the others by itself with its next write)."""


class WatchSource(Protocol):
    """What the hub reads: the applied state of the groups on this node (`StoreSource`)."""

    def rev_state(self, group: int) -> mvcc.RevState: ...

    def changes(self, group: int, lo: int, hi: int, max_events: int, max_bytes: int, prev_kv: bool) -> ChangeBatch: ...

    def shard_state(self, group: int) -> ShardState | None: ...


class StoreSource:
    """A `NodeStore` as a `WatchSource`."""

    __slots__ = ("_store",)

    def __init__(self, store: _Store) -> None:
        self._store = store

    def rev_state(self, group: int) -> mvcc.RevState:
        """The group's revision state, its `last` held below the lowest revision a cross-group
        transaction reserved and may still commit at (its COMMIT inserts change-log rows there,
        below the group's last): the frontier never passes a pending commit."""
        revs = self._store.revisions
        st = revs.rev_state(group)
        pending = revs.min_pending(group)
        if pending and pending <= st.last:
            return mvcc.RevState(pending - 1, st.compact, st.next_kid, st.kept)
        return st

    def changes(self, group: int, lo: int, hi: int, max_events: int, max_bytes: int, prev_kv: bool) -> ChangeBatch:
        return self._store.revisions.changes(group, lo, hi, max_events, max_bytes, prev_kv)

    def shard_state(self, group: int) -> ShardState | None:
        return self._store.shard_state(group)


class _Revisions(Protocol):
    def rev_state(self, group: int) -> mvcc.RevState: ...

    def min_pending(self, group: int) -> int: ...

    def changes(self, group: int, lo: int, hi: int, max_events: int, max_bytes: int, prev_kv: bool) -> ChangeBatch: ...


class _Store(Protocol):
    @property
    def revisions(self) -> _Revisions: ...

    def shard_state(self, group: int) -> ShardState | None: ...


@dataclass(slots=True, eq=False)
class Watcher:
    """One watch. Invariant: every matching event below `next_rev` is queued or sent; every reply
    the adapter took says everything at or below `delivered` is sent. `next_rev` is its own
    cursor `rev` while it is behind (catching up, or its stream full), and its cohort's `pos`
    while it is in one (caught up: `_Cohort`). Hashed by identity."""

    id: int
    spec: WatchSpec
    groups: tuple[int, ...]
    shards: dict[int, ShardState | None]
    rev: int
    delivered: int
    last_reply: float
    cohort: _Cohort | None = None
    waiting: int = 0
    """> 0: a watch started "now" whose created reply waits until every group reached this
    revision (its start - 1; closes asked): until then nothing of it is sent."""
    progress_at: int = 0
    """> 0: a progress request asked for a progress reply once `next_rev` - 1 reaches it."""
    partial: bool = False
    """A watch of some of its range's groups (a sub-watch a client merges with others)."""

    @property
    def next_rev(self) -> int:
        """The first revision not yet queued for it."""
        c = self.cohort
        return self.rev if c is None else c.pos

    @next_rev.setter
    def next_rev(self, rev: int) -> None:
        assert self.cohort is None, "a cohort member moves with its cohort"
        self.rev = rev


_Filter = tuple[bytes, bytes | None, bool, bool]
"""What selects a watch's events from a change log: (start, end, no_put, no_delete)."""


def _filter(spec: WatchSpec) -> _Filter:
    return (spec.start, spec.end, spec.no_put, spec.no_delete)


@dataclass(slots=True, eq=False)
class _Cohort:
    """The caught-up watchers of one group set and `prev_kv` choice, all at one position `pos`
    (every member's `next_rev`). A step reads [pos, frontier] of its groups once, merges it once,
    selects the events of each distinct filter once (single keys by a dict lookup per change)
    and hands the same event lists to every member of that filter: its cost is the changes read
    plus one reply per member that gets an event; members that get none are not visited.
    Invariant: `pos` <= frontier + 1 unless a member was created with a later start revision;
    a member whose stream is full when it would get events leaves at the position before them
    (it catches up from history as a watcher behind, then joins again)."""

    key: tuple[tuple[int, ...], bool]
    pos: int
    by_filter: dict[_Filter, dict[Watcher, WatchStream]] = field(default_factory=dict)
    keys: dict[bytes, list[_Filter]] = field(default_factory=dict)
    """Single-key filters by their key."""
    ranges: list[_Filter] = field(default_factory=list)
    """The other filters."""
    size: int = 0

    def add(self, w: Watcher, s: WatchStream) -> None:
        f = _filter(w.spec)
        members = self.by_filter.get(f)
        if members is None:
            members = self.by_filter[f] = {}
            if w.spec.single_key:
                self.keys.setdefault(f[0], []).append(f)
            else:
                self.ranges.append(f)
        members[w] = s
        w.cohort = self
        self.size += 1

    def remove(self, w: Watcher) -> None:
        f = _filter(w.spec)
        members = self.by_filter[f]
        del members[w]
        w.rev, w.cohort = self.pos, None
        self.size -= 1
        if not members:
            del self.by_filter[f]
            if w.spec.single_key:
                fs = self.keys[f[0]]
                fs.remove(f)
                if not fs:
                    del self.keys[f[0]]
            else:
                self.ranges.remove(f)

    def members(self) -> list[tuple[Watcher, WatchStream]]:
        return [m for ms in self.by_filter.values() for m in ms.items()]


@dataclass(slots=True)
class _Create:
    spec: WatchSpec
    groups: tuple[int, ...]
    watch_id: int
    partial: bool = False


@dataclass(slots=True)
class _Cancel:
    watch_id: int


@dataclass(slots=True)
class _Progress:
    revision: int = 0


_Request = _Create | _Cancel | _Progress


class WatchStream:
    """One client stream: its watchers, its queue of replies (`take`), its pending requests."""

    def __init__(self, hub: WatchHub, sid: int) -> None:
        self.hub = hub
        self.id = sid
        self.watchers: dict[int, Watcher] = {}
        self.outbox: deque[tuple[Reply, Watcher | None]] = deque()
        self.bytes = 0
        self.requests: deque[_Request] = deque()
        self.next_id = 1
        self.stalled_since: float | None = None
        self.closed = False
        self.on_reply: Callable[[], None] | None = None
        """Called whenever a reply is queued (the adapter wakes its sender)."""

    # --- requests (the adapter; handled by the next `step`) ----------------------------------
    def create(self, spec: WatchSpec, groups: Sequence[int], watch_id: int = 0, partial: bool = False) -> None:
        """Ask for a watch of `spec` over `groups` (the data groups its range may live in, or with
        `partial` some of them: the client merges the others from other nodes) with the client's
        id (0: one is assigned). Answered by a created or a canceled reply."""
        self._queue(_Create(spec, tuple(sorted(set(groups))), watch_id, partial))

    def cancel(self, watch_id: int) -> None:
        self._queue(_Cancel(watch_id))

    def progress(self, revision: int = 0) -> None:
        """A progress reply for every watch of the stream: at once (`revision` 0), or once it has
        everything up to `revision` (its groups below it are closed up to it first; the caller
        checked `revision` against the node's clock)."""
        self._queue(_Progress(revision))

    def refuse(self, watch_id: int, err: errors.KVError, canceled: bool = True) -> None:
        """Answer a create the adapter refused (permission, malformed fields): canceled, definite.
        (Not `canceled`: a refused progress request, `watch_id` 0, that touches no watch.)"""
        self._put(Reply(watch_id, canceled=canceled, cancel_reason=err.message if canceled else "", error=err,
                        compact_revision=getattr(err, "compact_revision", 0)), None)

    def _queue(self, r: _Request) -> None:
        if not self.closed:
            self.requests.append(r)
            self.hub._has_requests = True

    @property
    def busy(self) -> bool:
        """The adapter should read no more requests until replies are taken / requests handled."""
        lim = self.hub.limits
        return self.bytes >= lim.stream_bytes or len(self.requests) >= lim.requests_per_stream

    # --- replies ------------------------------------------------------------------------------
    def take(self, max_replies: int = 64) -> list[Reply]:
        """The next queued replies, in order (handed to the transport)."""
        out: list[Reply] = []
        hub = self.hub
        full = self.bytes >= hub.limits.stream_bytes
        if full:
            hub._work = True  # it may drain below the bound: the hub reads for it again
        outbox = self.outbox
        n = min(len(outbox), max_replies)
        taken = 0
        for _ in range(n):
            r, w = outbox.popleft()
            taken += r.size
            if w is not None and r.revision > w.delivered:
                w.delivered = r.revision
            out.append(r)
        self.bytes -= taken
        hub.pending_bytes -= taken
        if full and self.bytes < hub.limits.stream_bytes:
            hub._full.pop(self, None)
            self.stalled_since = None
        return out

    def _put(self, r: Reply, w: Watcher | None) -> None:
        """Queue `r`; wake the adapter if the outbox was empty (it drains all of it per wake)."""
        was_empty = not self.outbox
        self.outbox.append((r, w))
        self.bytes += r.size
        hub = self.hub
        hub.pending_bytes += r.size
        if self.bytes >= hub.limits.stream_bytes:
            hub._full[self] = None
        if was_empty and self.on_reply is not None:
            self.on_reply()

    def close(self) -> None:
        """The client went away: forget its watchers and replies."""
        if self.closed:
            return
        self.closed = True
        hub = self.hub
        for w in list(self.watchers.values()):
            hub._forget(self, w)
        hub.pending_bytes -= self.bytes
        self.bytes = 0
        self.outbox.clear()
        self.requests.clear()
        hub._full.pop(self, None)
        hub.streams.pop(self.id, None)


class WatchHub:
    """Every watch stream of a node (see the module docstring)."""

    def __init__(self, source: WatchSource, hosts: Callable[[int], bool], limits: WatchLimits | None = None) -> None:
        self.source = source
        self.hosts = hosts
        self.limits = limits or WatchLimits()
        self.streams: dict[int, WatchStream] = {}
        self.pending_bytes = 0
        """Bytes queued in all streams' outboxes."""
        self.count = 0
        """Watchers on this node."""
        self.last: dict[int, int] = {}
        """Watched group -> its last revision as applied here (the frontier's inputs)."""
        self.changed_at: dict[int, float] = {}
        """Watched group -> when its last revision last changed (or it became watched)."""
        self.written: dict[int, int] = {}
        """Watched group -> the highest revision at or below which it may hold a change a watcher
        waits for: its last revision when a refresh saw a change applied (or when it became
        watched: unknown, so assumed), else unchanged (a CLOSE). Invariant: every change of the
        group applied here is at or below it, and it is <= `last`."""
        self.wrote_at: dict[int, float] = {}
        """Watched group (of a watch over several groups) -> when a refresh last saw it apply a
        change (a busy group may pass a wanted revision by itself: `watchcloses`)."""
        self._sets: dict[tuple[int, ...], int] = {}
        """The group sets of watches over several groups -> how many watches have it."""
        self._multi: dict[int, int] = {}
        """Group -> how many watches over several groups cover it (only those need `written`)."""
        self._asked: dict[int, int] = {}
        """Closes asked for by progress requests since the last `close_wants`."""
        self._wants_changed = False
        """`last`, `written`, the sets or `_asked` changed since the last `close_wants`."""
        self._psets: dict[tuple[int, ...], int] = {}
        """The group sets of watches over several groups with progress notifications -> how many."""
        self.watching: dict[int, dict[Watcher, WatchStream]] = {}
        """Watched group -> its watchers."""
        self._shards: dict[int, dict[ShardState | None, int]] = {}
        """Watched group -> the shard states its watchers were created under -> how many (a
        refresh walks the group's watchers only when the group's state is not the only one)."""
        self._cohorts: dict[tuple[tuple[int, ...], bool], _Cohort] = {}
        """(groups, prev_kv) -> the caught-up watchers of it (`_Cohort`)."""
        self._behind: dict[Watcher, WatchStream] = {}
        """Watchers not in a cohort: catching up from history, stalled by their full stream, or
        created at a later start revision than their cohort's position. A step visits them one by
        one (bounded by `step_events`); once caught up they join their cohort."""
        self._full: dict[WatchStream, None] = {}
        """Streams at or above `stream_bytes` (the slow-stream checks look at these only)."""
        self._progress: list[tuple[float, int, Watcher, WatchStream]] = []
        """Heap of (when due, seq, watcher, stream): watchers with progress notifications, each
        once while it lives (dead entries are dropped when popped, or by a rebuild)."""
        self._pseq = 0
        self._waiting: dict[Watcher, WatchStream] = {}
        """Watches started "now" whose created reply waits for their groups to reach their start
        (`_settle`): indexed per group (their groups' last revisions are refreshed) but in no
        cohort and not behind, so nothing of them is read or sent yet."""
        self._progress_at: dict[Watcher, WatchStream] = {}
        """Watchers owed a progress reply once their cursor passes `progress_at`."""
        self._partial: dict[tuple[int, ...], int] = {}
        """The group sets of partial watches (sub-watches of merged ones) -> how many."""
        self._ppartial: dict[tuple[int, ...], int] = {}
        """The same, of those with progress notifications."""
        self._dirty: set[int] = set()
        self._has_requests = False
        self._work = False
        """Something may let a watcher move: a frontier moved, a watch was created, a step left
        work, a full stream drained. Without it a step reads nothing and visits no watcher: a
        thousand idle watches cost nothing per Ready cycle (progress replies and slow streams
        are found by the heap of deadlines and the set of full streams)."""
        self._sid = 0
        self._rr = 0
        self.visits = 0
        """Watchers the steps looked at one by one (a measure of the per-cycle work: a cohort's
        members that get no event, and idle watchers, are not visited)."""
        self.canceled_slow = 0
        self.canceled_moved = 0

    # --- inputs ---------------------------------------------------------------------------------
    def open(self) -> WatchStream:
        self._sid += 1
        s = self.streams[self._sid] = WatchStream(self, self._sid)
        return s

    def applied(self, groups: Iterable[int]) -> None:
        """A cycle applied entries (or installed a snapshot) in `groups`: the next step looks at
        their revision and shard state again. Costs nothing for unwatched groups."""
        w = self.watching
        for g in groups:
            if g in w:
                self._dirty.add(g)

    @property
    def idle(self) -> bool:
        """Nothing to do: no watcher, no request."""
        return not self.watching and not self._has_requests

    # --- the step -------------------------------------------------------------------------------
    def step(self, now: float) -> bool:
        """Handle queued requests, look at the groups that applied, move every watcher forward
        within the bounds. Returns True if a watcher still has events to read (step again soon)."""
        if self.idle:
            return False
        hosts = self.hosts
        for g in self.watching:
            if not hosts(g):  # the group left this node (no apply will say so)
                self._dirty.add(g)
        for g in sorted(self._dirty):
            self._refresh(g, now)
        self._dirty.clear()
        if self._has_requests:
            self._has_requests = False
            for s in list(self.streams.values()):
                if not s.requests:
                    continue
                while s.requests:
                    self._handle(s, s.requests.popleft(), now)
                if s.on_reply is not None:
                    s.on_reply()  # its queue of requests has room again (even if nothing was queued)
        lim = self.limits
        if self._full:
            self._check_full(now)
        more = False
        if self._waiting:
            for w, s in list(self._waiting.items()):
                if s.watchers.get(w.id) is not w:
                    del self._waiting[w]
                elif self._settle(s, w, now):
                    del self._waiting[w]
                    self._behind[w] = s
                    self._work = True
        if self._work:
            self._work = False
            budget = [lim.step_events]
            cache = _StepCache()
            for c in list(self._cohorts.values()):
                if budget[0] <= 0:
                    more = True
                    break
                while self._advance_cohort(c, now, cache, budget):
                    if budget[0] <= 0:
                        more = True
                        break
            if self._behind and self._advance_behind(now, cache, budget):
                more = True
        if self._progress and self._progress[0][0] <= now:
            self._progress_due(now)
        if self._progress_at:
            for w, s in list(self._progress_at.items()):
                if s.watchers.get(w.id) is not w or not w.progress_at:
                    del self._progress_at[w]
                elif w.next_rev > w.progress_at and not w.waiting:
                    w.progress_at = 0
                    del self._progress_at[w]
                    self._reply(s, w, Reply(w.id, revision=w.next_rev - 1), now)
        while self.pending_bytes > lim.node_bytes:
            fullest = max(self.streams.values(), key=lambda x: x.bytes, default=None)
            if fullest is None or not fullest.watchers:
                break
            self._cancel_all(fullest, SLOW)
        if more:
            self._work = True
        return more

    def close_wants(self) -> dict[int, int]:
        """Group -> the revision to close it at so that the events the hub holds go out (see the
        module docstring): for each set of groups watched together, every group whose last is
        below the highest `written` of the set, at that revision; plus the closes progress
        requests asked for. Empty when nothing changed since the last call (the caller keeps
        what it was told until the groups pass it). Reads nothing."""
        if not self._wants_changed:
            return {}
        self._wants_changed = False
        out, self._asked = self._asked, {}
        last, written = self.last, self.written
        for gs in self._sets:
            top = max(written[g] for g in gs)
            for g in gs:
                if last[g] < top and out.get(g, 0) < top:
                    out[g] = top
        return out

    def lagging_groups(self, now: float, progress_only: bool = False) -> dict[int, int]:
        """Quiet groups (last revision unchanged for `close_idle`) that hold some watcher's
        frontier below another of its groups' last revision: group -> that revision. Closing the
        group at (at least) it lets the watcher's frontier move. With `progress_only`, only the
        watches with progress notifications count (the others wait for events only:
        `close_wants`). A watch of some groups of its range (`partial`: part of a merged watch)
        counts with one group too, and all its quiet groups are named (at its top): the node
        closes them at its clock's now, so the merged watch's revision follows the clock while
        quiet as a watch of every group does."""
        out: dict[int, int] = {}
        wait = self.limits.close_idle
        last, changed = self.last, self.changed_at
        for gs in self._psets if progress_only else self._sets:  # per group set, not per watcher
            top = max(last[g] for g in gs)
            for g in gs:
                if last[g] < top and now - changed[g] >= wait and out.get(g, 0) < top:
                    out[g] = top
        for gs in self._ppartial if progress_only else self._partial:  # every quiet group of it
            top = max(last[g] for g in gs)
            for g in gs:
                if now - changed[g] >= wait and out.get(g, -1) < top:
                    out[g] = top
        return out

    # --- requests -------------------------------------------------------------------------------
    def _handle(self, s: WatchStream, r: _Request, now: float) -> None:
        if isinstance(r, _Create):
            self._create(s, r, now)
        elif isinstance(r, _Cancel):
            w = s.watchers.get(r.watch_id)
            if w is None:
                s.refuse(r.watch_id, errors.InvalidArgument(f"no watch {r.watch_id} on this stream"))
                return
            self._forget(s, w)
            s._put(Reply(w.id, revision=w.next_rev - 1, canceled=True, cancel_reason="canceled by the client"), None)
        elif r.revision:
            self._progress_to(s, r.revision)
        else:
            asked, last = self._asked, self.last
            for w in s.watchers.values():
                if w.waiting:
                    continue  # not created yet: its created reply comes first
                self._reply(s, w, Reply(w.id, revision=w.next_rev - 1), now)
                if len(w.groups) > 1:  # the next reply should get past every group's last now
                    top = max(last[g] for g in w.groups)
                    for g in w.groups:
                        if last[g] < top and asked.get(g, 0) < top:
                            asked[g] = top
                            self._wants_changed = True

    def _progress_to(self, s: WatchStream, revision: int) -> None:
        """A progress request at `revision`: close every group of the stream's watches below it
        up to it (coalesced per group with every other want), and mark each watch that has not
        got that far to get a progress reply once it has (`step`)."""
        asked, last = self._asked, self.last
        for w in s.watchers.values():
            if w.next_rev > revision and not w.waiting:
                self._work = True  # it is there already: the next pass answers
            w.progress_at = max(w.progress_at, revision)
            self._progress_at[w] = s
            for g in w.groups:
                if last[g] < revision and asked.get(g, 0) < revision:
                    asked[g] = revision
                    self._wants_changed = True

    def _settle(self, s: WatchStream, w: Watcher, now: float) -> bool:
        """A watch started "now" at M = `waiting`: answer its created reply once every group of
        it reached M (closed there), so every change applied after that reply is above M and
        delivered, none at or below it. False while it waits."""
        last = self.last
        if min(last[g] for g in w.groups) < w.waiting:
            return False
        w.waiting = 0
        self._reply(s, w, Reply(w.id, revision=w.next_rev - 1, created=True), now)
        return True

    def _create(self, s: WatchStream, r: _Create, now: float) -> None:
        lim = self.limits
        wid = r.watch_id
        if wid < 0:
            s.refuse(wid, errors.InvalidArgument(f"watch id {wid} is negative"))
            return
        if wid == 0:
            while s.next_id in s.watchers:
                s.next_id += 1
            wid = s.next_id
            s.next_id += 1
        elif wid in s.watchers:
            s.refuse(wid, errors.InvalidArgument(f"watch id {wid} is already in use on this stream"))
            return
        if len(s.watchers) >= lim.watchers_per_stream or self.count >= lim.watchers_per_node:
            s.refuse(wid, errors.ResourceExhausted(
                f"too many watches (at most {lim.watchers_per_stream} per stream, {lim.watchers_per_node} per node)"))
            return
        if not r.groups:
            s.refuse(wid, errors.WrongShard("the watched range lies in no data group (no shard map yet?)"))
            return
        missing = [g for g in r.groups if not self.hosts(g)]
        if missing:
            s.refuse(wid, errors.WrongShard(
                f"this node does not host group(s) {_names(missing)} of the watched range (it needs groups "
                f"{_names(r.groups)}); watch at a node that hosts them all"))
            return
        src = self.source
        shards: dict[int, ShardState | None] = {}
        states: dict[int, mvcc.RevState] = {}
        try:
            for g in r.groups:
                sh = shards[g] = src.shard_state(g)
                if sh is not None and (sh.frozen or sh.installing):
                    s.refuse(wid, errors.WrongShard(f"a range of group {g} is moving: watch again once it moved"))
                    return
                if sh is not None and r.spec.single_key and key_hash(r.spec.start) not in sh.active:
                    s.refuse(wid, errors.WrongShard(f"group {g} does not serve the key (it moved)"))
                    return
                states[g] = src.rev_state(g)
        except StorageError as err:
            s.refuse(wid, errors.Unavailable(f"cannot read the watched groups here: {err}"))
            return
        if not r.spec.single_key and not r.partial and all(sh is not None for sh in shards.values()):
            served = IntervalSet()
            for sh in shards.values():
                assert sh is not None
                served = served.union(sh.active)
            if not served.is_full():  # the map here lags a group that serves part of the range
                s.refuse(wid, errors.WrongShard(
                    f"groups {_names(r.groups)} do not serve every key here (this node's shard map is behind)"))
                return
        for g, st in states.items():
            if g not in self.last:
                self.changed_at[g] = now
                self.written[g] = st.last  # unknown: the group may hold a change up to its last
            if self.last.get(g) != st.last:
                self.last[g] = st.last
                self.written[g] = max(self.written[g], st.last)  # (not refreshed since it moved)
        start = r.spec.start_revision
        compact = max(st.compact for st in states.values())
        if not start:
            # Exactly now: at the highest last revision of the groups (the created reply waits
            # until the others are closed up to it: `_settle`).
            start = max(max(self.last[g] for g in r.groups), compact) + 1
        elif start <= mvcc.LEGACY_REVISION:
            # Revision 1 holds the versions written before revisions existed (one row per such
            # key, all at 1, recorded lazily): the state before history began, not changes.
            start = mvcc.LEGACY_REVISION + 1
        # The first start each group serves: its compact revision C if it kept the changes at C
        # (`RevState.kept`: a compaction under the keep rule), else C + 1 (an older rule consumed them).
        first = max(st.compact + (0 if st.kept or not st.compact else 1) for st in states.values())
        if start < first:
            s.refuse(wid, errors.Compacted(
                f"watch start revision {start} is compacted: the compact revision is {compact} "
                f"(watch from {first} or later)", compact_revision=compact))
            return
        w = Watcher(wid, r.spec, r.groups, shards, start, start - 1, now, partial=r.partial)
        if not r.spec.start_revision and any(self.last[g] < start - 1 for g in r.groups):
            w.waiting = start - 1
            asked = self._asked
            for g in r.groups:
                if self.last[g] < w.waiting and asked.get(g, 0) < w.waiting:
                    asked[g] = w.waiting
                    self._wants_changed = True
        s.watchers[wid] = w
        self.count += 1
        self._work = True
        self._index(s, w, now)
        if r.partial:
            self._partial[r.groups] = self._partial.get(r.groups, 0) + 1
            if r.spec.progress_notify:
                self._ppartial[r.groups] = self._ppartial.get(r.groups, 0) + 1
        if len(r.groups) > 1:
            self._sets[r.groups] = self._sets.get(r.groups, 0) + 1
            for g in r.groups:
                if g not in self._multi:  # `written` was not kept up to date: assume a change
                    self.written[g] = self.last[g]
                self._multi[g] = self._multi.get(g, 0) + 1
            self._wants_changed = True
        if not w.waiting:
            self._reply(s, w, Reply(wid, revision=start - 1, created=True), now)

    # --- moving forward -------------------------------------------------------------------------
    def _advance(self, s: WatchStream, w: Watcher, now: float, cache: _StepCache, budget: list[int]) -> bool:
        """Queue `w`'s events in [next_rev, frontier] (bounded). True if more remain. Watchers of
        the same spec, groups and position share one merge (`cache.merged`): a thousand watches
        of one prefix cost one read and one merge per step, and a reply each."""
        hi = self._frontier(w.groups)
        lo = w.next_rev
        if hi < lo:
            return False
        mk = (w.groups, lo, hi, w.spec)
        done = cache.merged.get(mk)
        if done is not None:
            events, upto, size = done
            w.next_rev = upto + 1
            if events:
                self._queue_events(s, w, events, upto, now, size)
            return upto < hi
        lim = self.limits
        prev = w.spec.prev_kv
        batches: list[ChangeBatch] = []
        for g in w.groups:
            k = (g, lo, hi, prev)
            b = cache.reads.get(k)
            if b is None:
                try:
                    b = self.source.changes(g, lo, hi, lim.read_events, lim.reply_bytes, prev)
                except mvcc.Compacted as err:
                    self._cancel(s, w, errors.Compacted(
                        f"the watch fell behind compaction in group {g}: the compact revision is "
                        f"{err.compact_revision}", compact_revision=err.compact_revision), resumable=False)
                    return False
                except StorageError as err:
                    self._cancel(s, w, errors.Unavailable(f"reading group {g}'s changes failed here: {err}"))
                    return False
                cache.reads[k] = b
                budget[0] -= len(b.changes)
            batches.append(b)
        upto = min(b.upto for b in batches)
        spec = w.spec
        lists = [[c for c in b.changes if c.revision <= upto and spec.matches(c.key) and _wanted(spec, c)]
                 for b in batches]
        events = lists[0] if len(lists) == 1 else list(heapq.merge(*lists, key=_rev))
        size = sum(c.size() for c in events)
        cache.merged[mk] = (events, upto, size)
        w.next_rev = upto + 1
        if events:
            self._queue_events(s, w, events, upto, now, size)
        return upto < hi

    def _frontier(self, groups: tuple[int, ...]) -> int:
        """The revision up to which watchers of `groups` may be sent everything: the lowest last
        revision of the groups (see the module docstring)."""
        last = self.last
        return min(last[g] for g in groups)

    def _queue_events(self, s: WatchStream, w: Watcher, events: list[Change], upto: int, now: float,
                      total: int) -> None:
        """Replies of at most about `reply_bytes` of events each, a revision never split; the
        last one says `upto`. (`events` may be shared with other watchers: never changed.)"""
        cap = self.limits.reply_bytes
        if total + 64 <= cap:
            self._reply(s, w, Reply(w.id, revision=upto, events=events, size=64 + total), now)
            return
        cur: list[Change] = []
        size = 64
        for c in events:
            if cur and c.revision != cur[-1].revision and size >= cap:
                self._reply(s, w, Reply(w.id, revision=cur[-1].revision, events=cur, size=size), now)
                cur, size = [], 64
            cur.append(c)
            size += c.size()
        self._reply(s, w, Reply(w.id, revision=upto, events=cur, size=size), now)

    def _reply(self, s: WatchStream, w: Watcher, r: Reply, now: float) -> None:
        s._put(r, w)
        w.last_reply = now

    def _advance_cohort(self, c: _Cohort, now: float, cache: _StepCache, budget: list[int]) -> bool:
        """Move cohort `c` over [pos, frontier] (bounded like `_advance`): one read per group, one
        merge, the events of each filter selected once and handed to its members. True if more
        remain."""
        if self._cohorts.get(c.key) is not c:
            return False  # emptied (canceled, or its members' streams full) earlier in the step
        gs, prev = c.key
        hi = self._frontier(gs)
        lo = c.pos
        if hi < lo:
            return False
        lim = self.limits
        batches: list[ChangeBatch] = []
        for g in gs:
            k = (g, lo, hi, prev)
            b = cache.reads.get(k)
            if b is None:
                try:
                    b = self.source.changes(g, lo, hi, lim.read_events, lim.reply_bytes, prev)
                except mvcc.Compacted as err:
                    e: errors.KVError = errors.Compacted(
                        f"the watch fell behind compaction in group {g}: the compact revision is "
                        f"{err.compact_revision}", compact_revision=err.compact_revision)
                    for w, s in c.members():
                        self._cancel(s, w, e, resumable=False)
                    return False
                except StorageError as err2:
                    e = errors.Unavailable(f"reading group {g}'s changes failed here: {err2}")
                    for w, s in c.members():
                        self._cancel(s, w, e)
                    return False
                cache.reads[k] = b
                budget[0] -= len(b.changes)
            batches.append(b)
        upto = min(b.upto for b in batches)
        if len(batches) == 1:
            changes = [x for x in batches[0].changes if x.revision <= upto]
        else:
            changes = list(heapq.merge(*([x for x in b.changes if x.revision <= upto] for b in batches), key=_rev))
        c.pos = upto + 1
        if changes:
            self._hand_out(c, changes, lo, upto, now)
        return upto < hi

    def _hand_out(self, c: _Cohort, changes: list[Change], lo: int, upto: int, now: float) -> None:
        """Queue the events of [lo, upto] (`changes`, in revision order) to the members of `c` they
        match; a member whose stream is full leaves `c` at `lo` instead."""
        hits: dict[_Filter, list[Change]] = {}
        if c.keys:
            keys = c.keys
            for ch in changes:
                fs = keys.get(ch.key)
                if fs is not None:
                    for f in fs:
                        if not (f[2] if ch.kind == PUT else f[3]):
                            hits.setdefault(f, []).append(ch)
        for f in c.ranges:
            start, end, no_put, no_delete = f
            evs = [ch for ch in changes if start <= ch.key and (end is None or ch.key < end)
                   and not (no_put if ch.kind == PUT else no_delete)]
            if evs:
                hits[f] = evs
        if not hits:
            return
        cap = self.limits.stream_bytes
        full: list[tuple[Watcher, WatchStream]] = []
        for f, evs in hits.items():
            parts = self._parts(evs, upto)
            members = c.by_filter[f]
            self.visits += len(members)
            for w, s in members.items():
                if s.bytes >= cap:
                    full.append((w, s))
                    continue
                wid = w.id
                for part, rev, size in parts:
                    s._put(Reply(wid, revision=rev, events=part, size=size), w)
                w.last_reply = now
        for w, s in full:  # it reads [lo, ...] from history once its stream drains
            c.remove(w)
            w.rev = lo
            self._behind[w] = s
        if not c.size and self._cohorts.get(c.key) is c:
            del self._cohorts[c.key]

    def _parts(self, events: list[Change], upto: int) -> list[tuple[list[Change], int, int]]:
        """`events` as the (events, revision, size) of replies of at most about `reply_bytes`
        each, a revision never split; the last one says `upto` (the lists are shared: never
        changed)."""
        cap = self.limits.reply_bytes
        total = sum(ch.size() for ch in events)
        if total + 64 <= cap:
            return [(events, upto, 64 + total)]
        out: list[tuple[list[Change], int, int]] = []
        cur: list[Change] = []
        size = 64
        for ch in events:
            if cur and ch.revision != cur[-1].revision and size >= cap:
                out.append((cur, cur[-1].revision, size))
                cur, size = [], 64
            cur.append(ch)
            size += ch.size()
        out.append((cur, upto, size))
        return out

    def _advance_behind(self, now: float, cache: _StepCache, budget: list[int]) -> bool:
        """Move the watchers behind, one by one, round robin, within the budget; those caught up
        join their cohort. True if one has more to read."""
        lim = self.limits
        more = False
        todo = list(self._behind.items())
        if len(todo) > 1:
            self._rr = (self._rr + 1) % len(todo)
            todo = todo[self._rr:] + todo[: self._rr]
        for w, s in todo:
            if s.bytes >= lim.stream_bytes or self._behind.get(w) is not s:
                continue  # a full stream: its watchers wait until it drains (`take`)
            if budget[0] <= 0:
                more = True
                break
            self.visits += 1
            stopped = False
            while self._advance(s, w, now, cache, budget):
                if budget[0] <= 0 or s.bytes >= lim.stream_bytes or s.watchers.get(w.id) is not w:
                    more = stopped = True
                    break
            if not stopped and s.watchers.get(w.id) is w:
                self._join(s, w)
        return more

    def _join(self, s: WatchStream, w: Watcher) -> None:
        """`w` (behind) joins its cohort if it is caught up and at the cohort's position (or
        starts the cohort)."""
        if w.rev <= self._frontier(w.groups):
            return
        key = (w.groups, w.spec.prev_kv)
        c = self._cohorts.get(key)
        if c is None:
            c = self._cohorts[key] = _Cohort(key, w.rev)
        elif c.pos != w.rev:
            return
        del self._behind[w]
        c.add(w, s)

    def _index(self, s: WatchStream, w: Watcher, now: float) -> None:
        """Make a new watcher known to the per-group and per-set indexes (it starts behind)."""
        for g in w.groups:
            self.watching.setdefault(g, {})[w] = s
            counts = self._shards.setdefault(g, {})
            sh = w.shards.get(g)
            counts[sh] = counts.get(sh, 0) + 1
        if w.waiting:
            self._waiting[w] = s
        else:
            self._behind[w] = s
        if w.spec.progress_notify:
            if len(w.groups) > 1:
                self._psets[w.groups] = self._psets.get(w.groups, 0) + 1
            self._pseq += 1
            heapq.heappush(self._progress, (now + self.limits.progress_interval, self._pseq, w, s))
            if len(self._progress) > 2 * self.count + 64:  # canceled watchers' entries
                self._progress = [e for e in self._progress if e[3].watchers.get(e[2].id) is e[2]]
                heapq.heapify(self._progress)

    def _progress_due(self, now: float) -> None:
        """Progress replies of the watchers with progress notifications quiet for an interval."""
        lim = self.limits
        heap = self._progress
        while heap and heap[0][0] <= now:
            _, _, w, s = heapq.heappop(heap)
            if s.watchers.get(w.id) is not w:
                continue
            due = w.last_reply + lim.progress_interval
            if w.waiting:  # not created yet: no progress reply before its created reply
                due = now + lim.progress_interval / 4
            elif due <= now:
                self.visits += 1
                if s.bytes < lim.stream_bytes:
                    self._reply(s, w, Reply(w.id, revision=w.next_rev - 1), now)
                    due = now + lim.progress_interval
                else:
                    due = now + lim.progress_interval / 4
            self._pseq += 1
            heapq.heappush(heap, (due, self._pseq, w, s))

    def _check_full(self, now: float) -> None:
        """Slow streams: a stream full for `slow_after` seconds has its watches canceled."""
        lim = self.limits
        for s in list(self._full):
            if s.bytes < lim.stream_bytes:
                del self._full[s]
                s.stalled_since = None
            elif s.stalled_since is None:
                s.stalled_since = now
            elif now - s.stalled_since >= lim.slow_after:
                self._cancel_all(s, SLOW)

    # --- cancels --------------------------------------------------------------------------------
    def _refresh(self, g: int, now: float) -> None:
        """Group `g` applied something: its frontier, and whether its shard state (a range move)
        or its presence here changed under its watchers."""
        if g not in self.watching:
            return
        src = self.source
        if not self.hosts(g):
            err: errors.KVError = errors.WrongShard(f"group {g} left this node; {MOVED}")
            for w, s in list(self.watching.get(g, {}).items()):
                self.canceled_moved += 1
                self._cancel(s, w, err)
            return
        try:
            st = src.rev_state(g)
            sh = src.shard_state(g)
        except StorageError as err2:
            for w, s in list(self.watching.get(g, {}).items()):
                self._cancel(s, w, errors.Unavailable(f"reading group {g} failed here: {err2}"))
            return
        old = self.last.get(g)
        if old != st.last:
            self.last[g] = st.last
            self.changed_at[g] = now
            self._work = True
            if g in self._multi:
                self._wants_changed = True  # a want may be met, or a new one made
                seen = self.written.get(g, 0)
                if old is None or (st.last > seen and self._wrote(g, max(old, seen) + 1, st.last)):
                    self.written[g] = st.last
                    self.wrote_at[g] = now
        counts = self._shards.get(g)
        if counts is None or (len(counts) == 1 and sh in counts):
            return  # every watcher of g was created under its state now: none to cancel
        for w, s in list(self.watching.get(g, {}).items()):
            self.visits += 1
            if w.shards.get(g) != sh:
                self.canceled_moved += 1
                self._cancel(s, w, errors.WrongShard(f"group {g}: {MOVED}"))

    def _wrote(self, g: int, lo: int, hi: int) -> bool:
        """Whether group `g` holds a change in [lo, hi] (one row read). When it cannot tell (a
        compaction passed lo, a failed read) it says yes: a close too many, never an event held."""
        try:
            return bool(self.source.changes(g, lo, hi, 1, 1, False).changes)
        except (mvcc.Compacted, StorageError):
            return True

    def cancel_everything(self, err: errors.KVError) -> None:
        """Cancel every watch of the node with `err`, resumable, dropping queued events (the
        driver's answer to an unexpected failure of a step: the watchers start again, nothing
        else of the node is affected)."""
        self._dirty.clear()
        for s in list(self.streams.values()):
            s.requests.clear()
            for w in list(s.watchers.values()):
                self._cancel(s, w, err, drop=True)

    def _cancel_all(self, s: WatchStream, reason: str) -> None:
        """Cancel every watch of a slow stream, dropping its queued events (bounded memory)."""
        for w in list(s.watchers.values()):
            self.canceled_slow += 1
            self._cancel(s, w, errors.ResourceExhausted(reason), drop=True)

    def _cancel(self, s: WatchStream, w: Watcher, err: errors.KVError, *, resumable: bool = True,
                drop: bool = False) -> None:
        """Cancel `w` with `err` (definite). Resumable: at `next_rev` (its events below it are
        queued ahead of the cancel), or with `drop`, at `delivered` + 1 after removing its
        queued replies."""
        self._forget(s, w)
        if drop:
            keep: deque[tuple[Reply, Watcher | None]] = deque()
            for r, ww in s.outbox:
                if ww is w:
                    s.bytes -= r.size
                    self.pending_bytes -= r.size
                else:
                    keep.append((r, ww))
            s.outbox = keep
            if s.bytes < self.limits.stream_bytes:
                self._full.pop(s, None)
                s.stalled_since = None
            resume = w.delivered + 1
        else:
            resume = w.next_rev
        s._put(Reply(w.id, revision=resume - 1, canceled=True, cancel_reason=err.message, error=err,
                     resume_revision=resume if resumable else 0,
                     compact_revision=getattr(err, "compact_revision", 0)), None)

    def _forget(self, s: WatchStream, w: Watcher) -> None:
        if s.watchers.pop(w.id, None) is None:
            return
        self.count -= 1
        c = w.cohort
        if c is not None:
            c.remove(w)  # its position stays the cohort's (`next_rev`)
            if not c.size and self._cohorts.get(c.key) is c:
                del self._cohorts[c.key]
        else:
            self._behind.pop(w, None)
        self._waiting.pop(w, None)
        self._progress_at.pop(w, None)
        if w.partial:
            for sets in (self._partial, self._ppartial) if w.spec.progress_notify else (self._partial,):
                n = sets[w.groups] - 1
                if n:
                    sets[w.groups] = n
                else:
                    del sets[w.groups]
        if w.spec.progress_notify and len(w.groups) > 1:
            n = self._psets[w.groups] - 1
            if n:
                self._psets[w.groups] = n
            else:
                del self._psets[w.groups]
        if len(w.groups) > 1:
            n = self._sets[w.groups] - 1
            if n:
                self._sets[w.groups] = n
            else:
                del self._sets[w.groups]
            for g in w.groups:
                m = self._multi[g] - 1
                if m:
                    self._multi[g] = m
                else:
                    del self._multi[g]
        for g in w.groups:
            counts = self._shards.get(g)
            if counts is not None:
                sh = w.shards.get(g)
                m = counts.get(sh, 0) - 1
                if m > 0:
                    counts[sh] = m
                else:
                    counts.pop(sh, None)
            lst = self.watching.get(g)
            if lst is None:
                continue
            lst.pop(w, None)
            if not lst:
                del self.watching[g]
                self._shards.pop(g, None)
                self.last.pop(g, None)
                self.changed_at.pop(g, None)
                self.written.pop(g, None)
                self.wrote_at.pop(g, None)
                self._asked.pop(g, None)
                self._dirty.discard(g)


@dataclass(slots=True)
class _StepCache:
    """What one step read and merged, shared by the watchers at the same position."""

    reads: dict[tuple[int, int, int, bool], ChangeBatch] = field(default_factory=dict)
    merged: dict[tuple[tuple[int, ...], int, int, WatchSpec], tuple[list[Change], int, int]] = field(
        default_factory=dict)


def _rev(c: Change) -> int:
    return c.revision


def _wanted(spec: WatchSpec, c: Change) -> bool:
    if c.kind == PUT:
        return not spec.no_put
    return not spec.no_delete


def _names(groups: Iterable[int]) -> str:
    return ", ".join(str(g) for g in groups)


__all__ = ["MOVED", "SLOW", "StoreSource", "WatchHub", "WatchLimits", "WatchSource", "WatchStream", "Watcher"]
