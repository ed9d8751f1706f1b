"""Watchers in the whole-node simulator: the real `WatchHub` on every simulated node, checked
against the history of applied writes with etcd's six watch guarantees (docs/REVISIONS.md,
"Watch"; etcd-io/etcd `tests/robustness/validate/watch.go`).

Each node runs a real `kvstore.node.watch.WatchHub` over its own store (`StoreSource`), one hub
per life of the node (a crash loses it and every stream on it). It is driven as
`kvstore/server/watch_service.py` drives it: after every Ready cycle the groups the cycle applied
(or installed a snapshot of) are handed to `applied` and the hub steps (again at once while it
says it has more to read); after every step the hub's close wants (`close_wants`: the groups an
event waits on, at its revision) go out through the real `kvstore.node.watchcloses.WatchCloser`
(coalesced, bounded, retried after a backoff) and `kvstore.node.closes.NodeCloses`, proposed at
the leader or forwarded to it over the simulated network (lost, delayed or cut like any
message); every `close_interval` the groups `lagging_groups(progress_only=True)` names (they hold
back a watch with progress notifications) are asked too, at max(their watcher's highest last
revision, the node's wall clock). A watch without progress notifications thus gets its events
through the event-driven closes alone, so the liveness check below checks them. The hub's bounds are drawn small per seed
(few changes per read and per step, small replies, small stream buffers, a short `slow_after`),
so that the catch-up boundaries, split replies and slow-watcher cancels happen in a short run.

Simulated clients watch one key, a range, the prefix `k` or the whole key space, from revision 0
(now), 1 (all history), a past write's revision (exactly, one above or one below: the catch-up
boundary) or a compacted one, with and without prev_kv, NOPUT / NODELETE and progress
notifications; one stream per watch, replies delivered in order after a network delay. A client
asks for a progress reply now and then, cancels its watch (and resumes it from its last
revision + 1, or stops), some clients read their stream too
slowly (the hub cancels them: RESOURCE_EXHAUSTED, resumable), range moves cancel watches
(WRONG_SHARD, resumable) and a node crash breaks the stream: the client resumes from its last
revision + 1 at a node that hosts the groups, as `kvstore/client/watches.py` does. A range
watch with no live node hosting every group (5 nodes, 3 replicas), and now and then one that has
such a node, is *merged* as the client library does it: sub-watches of the groups (each a stream
with `groups`, created `partial` after the adapter's checks: `check_groups` and the shard map
version) at a cover of nodes (the greedy `watchmerge.cover`, or each group at a random replica so
that 3-node runs merge too), their replies fed to the client's real `watchmerge.Merge` (a sub
that breaks its contract is a violation), its progress requests at a revision sent to the subs (checked against the node's
clock as the adapter does), `catch_up` every second, and any end of a sub restarting the whole
merged watch from its last revision + 1; its batches go through the same checks. A *chain* is
one client's watch across all its resumes. The groups are compacted now and then (at a past
write's revision, each group through its log), so starts below the compact revision, and
watchers compaction overtakes, are refused with COMPACTED (a start at exactly it is served); also on seeds with range moves, where
a move carries the source's compact revision to the target (`shardcmd`'s closed-revision record),
so a watch resumed in the target after a move is refused there too, never shown a gap.

Checked, per chain, on every reply as it arrives (the first four by `chaos.watchcheck.check_batch`,
which kvchaos runs on its real watchers too):
- **ordered**: event revisions strictly increase within and across responses (one key per
  revision here: non-decreasing inside a response is strictly increasing);
- **unique**: no (revision, key) twice;
- **atomic**: a response's events start above the last event of the previous response;
- **bookmarkable**: every reply's `revision` R says every event <= R was delivered: no later
  event at or below it (progress notifications, empty replies, the created and canceled replies);
- **resumable**: a canceled reply's `resume_revision` is its `revision` + 1 and not below what
  was delivered; a created reply says `revision` = start - 1; every event is in the watched range
  and kind;
- **compacted**: a start below a group's compact revision is refused with COMPACTED naming a
  compact revision > the start and <= the largest compaction asked for (a start at exactly the
  compact revision works, as in etcd, and is checked as reliable like any other); a watcher
  canceled by compaction is below it;

and at the end of the run against the final history of applied writes (`RevisionChecker`):
- **live** (with clocks within the uncertainty bound `MAX_CLOCK_OFFSET_MS`): a watch that reads
  its stream, created since `liveness_ms` after the heal on a node still up, has been told
  everything applied by then;
- **reliable**: the events of each chain are exactly the applied writes of its range and kinds
  with start <= revision <= its last bookmark, in order, each with its value, create revision
  and version (and prev_kv, when asked, the key's previous version unless compacted away).

Watchers use their own random stream and run on a fixed fifth of the seeds
(`watches_by_default`), so the other seeds replay as before.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.watchcheck import FeedState, check_batch
from kvstore import errors
from kvstore.client.watchmerge import Merge, cover
from kvstore.node.closes import CloseCallback, NodeCloses
from kvstore.node.hlc import MAX_CLOCK_OFFSET_MS
from kvstore.node.watch import StoreSource, WatchHub, WatchLimits, WatchStream
from kvstore.node.watchcloses import WatchCloser, replica_close
from kvstore.node.watchspec import ALL_KEYS_END, Reply, WatchSpec, check_groups
from kvstore.raft import Role
from kvstore.storage import commands, mvcc
from kvstore.storage.changefeed import PUT, Change

MAX_CHAINS = 400
"""Watch chains started per seed (bounded work)."""


class WatchViolation(AssertionError):
    """A watch guarantee does not hold."""


def watches_by_default(seed: int) -> bool:
    """Whether a seed runs watchers: a fixed fifth of the seeds, decided apart from the seed's
    own random stream."""
    return random.Random(f"watch:{seed}").random() < 0.2


def draw_limits(rng: random.Random) -> WatchLimits:
    """Hub bounds small enough that a short run crosses them."""
    return WatchLimits(
        stream_bytes=rng.choice((1500, 4000, 1 << 20)),
        node_bytes=rng.choice((6000, 64 << 20)),
        reply_bytes=rng.choice((120, 400, 1 << 20)),
        read_events=rng.choice((1, 3, 1024)),
        step_events=rng.choice((2, 8, 2048)),
        slow_after=rng.choice((0.3, 1.0)),
        progress_interval=rng.choice((0.1, 0.3)),
    )


@dataclass(slots=True)
class WatchStats:
    chains: int = 0
    """Client watches started (each followed across its resumes)."""
    creates: int = 0
    created: int = 0
    events: int = 0
    """Events delivered to clients (each checked on arrival and again at the end)."""
    replies: int = 0
    progress: int = 0
    """Replies without events (progress notifications, created / canceled replies)."""
    resumes: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    """Creates refused, by error code."""
    canceled: dict[str, int] = field(default_factory=dict)
    """Watches canceled by the server after they were created, by error code."""
    client_cancels: int = 0
    progress_requests: int = 0
    broken: int = 0
    """Streams broken by a node crash (the client resumed elsewhere)."""
    compactions: int = 0
    closes: int = 0
    closes_forwarded: int = 0
    checked_chains: int = 0
    checked_events: int = 0
    merged: int = 0
    """Merged watches opened (sub-watches at several nodes: `kvstore/client/watchmerge.py`)."""
    subs: int = 0
    """Their sub-watches."""
    asks: int = 0
    """Progress requests at a revision the merges sent to their subs."""


Event = tuple[int, bytes, int, bytes | None, int, int, bytes | None]
"""(revision, key, kind, value, create_revision, version, prev value) as a client got it."""


@dataclass(slots=True)
class _Chain:
    """One client's watch, followed across resumes. Invariant: every event it received is in
    `events`, in arrival order; `bookmark` is the highest `revision` of any reply received."""

    id: int
    spec: WatchSpec
    start: int
    """The start revision asked for first (0: now; resolved into `first` by the created reply)."""
    slow: bool
    first: int = 0
    bookmark: int = 0
    events: list[Event] = field(default_factory=list)
    seen: set[tuple[bytes | str, int]] = field(default_factory=set)
    """(key, revision) of every event received."""
    last_event: int = 0
    ended: str = ""
    attempt: int = 0
    """Bumped at every new stream: replies of an older stream are dropped."""
    stream: WatchStream | None = None
    node: int = 0
    epoch: int = 0
    created: bool = False
    """The current stream's watch was created."""
    created_at: int = 0
    """When the current stream's created reply arrived."""
    deliver_at: int = 0
    """When the current stream's last reply in flight arrives (replies arrive in order)."""
    asked: int = 0
    """The start revision of the current stream's create."""
    merge: Merge[Change] | None = None
    """A merged watch (no `stream`): the client's merge of `subs`."""
    subs: list[tuple[WatchStream, int, int]] = field(default_factory=list)
    """(stream, node id, node epoch) of each sub-watch of the merge."""

    def sub_of(self, node: int, sid: int) -> int | None:
        for i, (s, nid, _) in enumerate(self.subs):
            if nid == node and s.id == sid:
                return i
        return None


@dataclass(slots=True)
class _NodeHub:
    hub: WatchHub
    epoch: int
    closer: WatchCloser
    retry_armed: bool = False
    retry_at: float = 0.0
    chains: dict[int, _Chain] = field(default_factory=dict)
    """stream id -> the chain it serves."""


class SimWatches:
    """The simulator's watch hubs, clients and checks (module docstring)."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.rng = random.Random(f"watches:{sim.seed}")
        self.limits = draw_limits(self.rng)
        self.stats = WatchStats()
        self.hubs: dict[int, _NodeHub] = {}
        self.chains: list[_Chain] = []
        self._closes: dict[int, tuple[int, NodeCloses]] = {}
        self.compacted = 0
        """The largest revision a compaction was asked for (each group clamps it to its last)."""
        self.compact = True
        self.settled: tuple[int, int] | None = None
        """(time, the highest revision applied then), `liveness_ms` after the heal."""

    # --- wiring ---------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.rng.randint(2, 4)):
            self.sim.at(self.rng.randrange(100, 500), self._new_chain, i % 3 == 2)
        self.sim.at(self.rng.randrange(100, 300), self._closer)
        if self.compact:
            self.sim.at(self.rng.randrange(600, 1500), self._compaction)

    def hub(self, n: Any) -> _NodeHub | None:
        """Node `n`'s hub (a new one after a restart: a crash loses the hub and its streams)."""
        if n.logic is None or n.store is None:
            return None
        h = self.hubs.get(n.id)
        if h is not None and h.epoch == n.epoch:
            return h
        logic = n.logic
        hub = WatchHub(StoreSource(n.store), lambda g: g in logic.host.groups, self.limits)
        epoch = n.epoch

        def leads(g: int) -> bool:
            grp = logic.host.groups.get(g)
            return grp is not None and grp.core.role == Role.LEADER

        def close(g: int, revision: int, cb: CloseCallback) -> None:
            self.stats.closes += 1
            self.closes(n).close(g, revision, self._logged(n, g, revision, cb))
            self.sim._kick(n)

        def forward(g: int, revision: int, cb: CloseCallback) -> None:
            self.stats.closes += 1
            if n.reads is None:
                raise errors.Unavailable(f"n{n.id} has no reads (not booted)")
            send = replica_close(self.closes(n), n.reads, lambda g2, r2, cb2: self._forward(n, g2, r2, cb2))
            send(g, revision, self._logged(n, g, revision, cb))

        def wake() -> None:
            if n.epoch == epoch:
                self.sim.at(0, self._run_closes, n.id, epoch)
                self.sim._kick(n)

        closer = WatchCloser(hub, leads, close, forward, lambda: self.sim._node_now(n), wake)
        h = self.hubs[n.id] = _NodeHub(hub, epoch, closer)
        return h

    def _logged(self, n: Any, g: int, revision: int, cb: CloseCallback) -> CloseCallback:
        def done(last: int, err: errors.KVError | None) -> None:
            if err is not None:
                self.sim.log(f"watch close of g{g} at {revision} from n{n.id} failed: {err!r}")
            cb(last, err)
        return done

    def after_cycle(self, n: Any, cycle: Any) -> None:
        """What `WatchDriver.after_cycle` does after each Ready cycle of node `n`."""
        h = self.hubs.get(n.id)
        if h is None or h.epoch != n.epoch or h.hub.idle:
            return
        h.hub.applied(a.group for a in cycle.applies)
        h.hub.applied(w.group for w in cycle.writes if w.snapshot is not None)
        self._step(n, h)

    def _step(self, n: Any, h: _NodeHub) -> None:
        if n.logic is None or h.epoch != n.epoch or h.hub.idle:
            return
        more = h.hub.step(self.sim._node_now(n))
        self._pump(n, h)
        if more:
            self.sim.at(1, self._step_again, n.id, h.epoch)
        self._send_closes(n, h)

    def _send_closes(self, n: Any, h: _NodeHub) -> None:
        """What `WatchDriver` does after a step: send the closes due; arm the retry timer."""
        now = self.sim._node_now(n)
        h.closer.run(now)
        at = h.closer.retry_at(now)
        if at is not None and (not h.retry_armed or at < h.retry_at):
            h.retry_armed, h.retry_at = True, at  # (an earlier timer still armed just runs early)
            self.sim.at(max(1, int((at - now) * 1000) + 1), self._retried, n.id, h.epoch)

    def _retried(self, nid: int, epoch: int) -> None:
        h = self.hubs.get(nid)
        if h is not None and h.epoch == epoch:
            h.retry_armed = False
            self._run_closes(nid, epoch)

    def _run_closes(self, nid: int, epoch: int) -> None:
        n = self.sim.nodes.get(nid)
        h = self.hubs.get(nid)
        if n is not None and n.logic is not None and h is not None and h.epoch == epoch == n.epoch:
            self._send_closes(n, h)

    def _step_again(self, nid: int, epoch: int) -> None:
        n = self.sim.nodes.get(nid)
        h = self.hubs.get(nid)
        if n is not None and h is not None and h.epoch == epoch == n.epoch:
            self._step(n, h)

    def _pump(self, n: Any, h: _NodeHub) -> None:
        """Hand the queued replies of every stream with a reading client to the network."""
        for sid, c in list(h.chains.items()):
            if c.merge is not None:
                i = c.sub_of(n.id, sid)
                if i is not None and not c.merge.paused(i):  # (a sub far ahead is read no more)
                    self._send_sub(c, i, c.subs[i][0].take(1 << 20))
                continue
            s = c.stream
            if s is None or s.id != sid or c.slow:
                continue
            self._send(c, s.take(1 << 20))

    def _send_sub(self, c: _Chain, i: int, replies: list[Reply]) -> None:
        attempt = c.attempt
        for r in replies:
            c.deliver_at = max(c.deliver_at, self.sim.now + self.rng.randint(*self.sim.p.delay_ms))
            self.sim.at(c.deliver_at - self.sim.now, self._receive_sub, c, attempt, i, r)

    def _send(self, c: _Chain, replies: list[Reply]) -> None:
        attempt = c.attempt
        for r in replies:
            c.deliver_at = max(c.deliver_at, self.sim.now + self.rng.randint(*self.sim.p.delay_ms))
            self.sim.at(c.deliver_at - self.sim.now, self._receive, c, attempt, r)

    # --- closing idle groups (the driver's `closer`) -----------------------------------------------
    def _closer(self) -> None:
        sim = self.sim
        if sim.end is not None and sim.now >= sim.end:
            return
        if sim.quiet is not None and sim.quiet.calm:
            self._stop_all()
            return
        if self.settled is None and sim.healed_at is not None and sim.now >= sim.healed_at + sim.p.liveness_ms:
            self.settled = (sim.now, max(self._revisions(), default=0))
        period = int(self.limits.close_interval * 1000)
        for nid in sorted(self.hubs):
            h = self.hubs[nid]
            n = sim.nodes.get(nid)
            if n is None or n.logic is None or h.epoch != n.epoch or not h.hub.watching:
                continue
            now = sim._node_now(n)
            wall = mvcc.make_revision(mvcc.EPOCH_MS + int(now * 1000), 0, 0)
            lagging = h.hub.lagging_groups(now, progress_only=True)
            if lagging:
                h.closer.ask({g: max(top, wall) for g, top in sorted(lagging.items())})
                self._send_closes(n, h)
        sim.at(period, self._closer)

    def closes(self, n: Any) -> NodeCloses:
        """Node `n`'s `NodeCloses` (shared with the cross-group scans when they run: one per node,
        as the server has one)."""
        if self.sim.closed_reads is not None:
            nc: NodeCloses = self.sim.closed_reads.closes(n)
            return nc
        have = self._closes.get(n.id)
        if have is not None and have[0] == n.epoch:
            return have[1]
        nc = NodeCloses(n.logic.host, self.sim._clock(n), wake=lambda: self.sim._kick(n))
        self._closes[n.id] = (n.epoch, nc)
        return nc

    def _forward(self, n: Any, group: int, revision: int, cb: CloseCallback) -> None:
        """`Shard.GroupPropose` of a CLOSE to the group's leader over the simulated network."""
        sim = self.sim
        lead, _ = n.logic.host.leader_of(group)
        if not lead or lead == n.id:
            sim.at(1, cb, 0, errors.NoLeader(f"n{n.id} knows no other leader of g{group}"))
            return
        self.stats.closes_forwarded += 1

        def back(last: int, err: errors.KVError | None) -> None:
            self._carry(lead, n.id, lambda: cb(last, err))

        def arrive() -> None:
            dst = sim.nodes.get(lead)
            if dst is None or dst.logic is None:
                sim.at(sim.p.client_timeout_ms, cb, 0, errors.Timeout("forward lost", indeterminate=True))
                return
            try:
                self.closes(dst).close(group, revision, back)
            except errors.KVError as err:
                back(0, err)
            sim._kick(dst)

        self._carry(n.id, lead, arrive, lambda: cb(0, errors.Timeout("forward lost", indeterminate=True)))

    def _carry(self, frm: int, to: int, fn: Callable[[], None], lost: Callable[[], None] | None = None) -> None:
        sim = self.sim
        if (frm, to) in sim.blocked or (sim._faults_on() and self.rng.random() < sim.p.loss):
            if lost is not None:
                sim.at(sim.p.client_timeout_ms, lost)  # the RPC's deadline
            return
        sim.at(self.rng.randint(*sim.p.delay_ms), fn)

    # --- compaction -----------------------------------------------------------------------------
    def _compaction(self) -> None:
        """Compact every data group at a past write's revision (`KV.Compact`: a COMPACT through
        each group's log at its leader)."""
        sim = self.sim
        if self._closing_time():
            return
        revs = self._revisions()
        if len(revs) > 4:
            at = revs[self.rng.randrange(len(revs) // 4, len(revs) // 2 + 1)]
            self.compacted = max(self.compacted, at)
            self.stats.compactions += 1
            for nid, n in sorted(sim.nodes.items()):
                if n.logic is None:
                    continue
                m = n.logic.shard_tracker.map
                for g, grp in sorted(n.logic.host.groups.items()):
                    if m is not None and g in m.data_groups() and grp.core.role == Role.LEADER:
                        try:
                            n.logic.host.propose(g, commands.encode_compact(at, keep=True), lambda _r, _e: None)
                        except errors.KVError:
                            continue
                        sim.log(f"watch: COMPACT g{g} at {at} (n{nid})")
                sim._kick(n)
            if self.rng.random() < 0.4:  # a watch from exactly the compact revision: served
                sim.at(self.rng.randrange(50, 400), self._new_chain, False, at)
        sim.at(self.rng.randrange(500, 1500), self._compaction)

    def _revisions(self) -> list[int]:
        return sorted(r for vs in self.sim.revisions.versions.values() for r, _ in vs)

    # --- clients --------------------------------------------------------------------------------
    def _alive(self) -> list[Any]:
        return [n for _, n in sorted(self.sim.nodes.items()) if n.logic is not None and not n.removed]

    def _closing_time(self) -> bool:
        """No new watch now: the run ends soon, or the clients went idle for the quiesced-leader
        scenario (`quiet.py`: every group must quiesce, and a watcher waiting on an idle group
        keeps it awake by closing it)."""
        sim = self.sim
        if sim.quiet is not None and sim.quiet.calm:
            return True
        return sim.end is not None and sim.now >= sim.end - sim.p.client_timeout_ms

    def _stop_all(self) -> None:
        """Every client stops watching (its stream closes: the hub forgets its watchers)."""
        for c in self.chains:
            if not c.ended:
                c.ended = "clients idle"
                self._drop_stream(c)

    def _new_chain(self, slow: bool, start: int | None = None) -> None:
        """A new watch (chain) of a random range, from `start` (None: a random start)."""
        if self._closing_time() or self.stats.chains >= MAX_CHAINS:
            return
        rng = self.rng
        keys = self.sim.p.keys
        r = rng.random()
        if r < 0.35:
            spec = WatchSpec.make(f"k{rng.randrange(keys)}".encode())
        elif r < 0.55:
            spec = WatchSpec.make(b"", prefix=b"k")
        elif r < 0.75:
            spec = WatchSpec.make(b"", ALL_KEYS_END)
        else:
            a, b = sorted(rng.sample(range(keys + 1), 2)) if keys > 1 else (0, 1)
            spec = WatchSpec.make(f"k{a}".encode(), f"k{b}".encode() if b < keys else b"l")
        spec = WatchSpec(spec.start, spec.end, 0, rng.random() < 0.5, rng.random() < 0.8,
                         rng.random() < 0.1, rng.random() < 0.1)
        c = _Chain(self.stats.chains, spec, self._pick_start() if start is None else start, slow)
        self.stats.chains += 1
        self.chains.append(c)
        self.sim.log(f"watch #{c.id} {spec} from {c.start}{' (slow reader)' if slow else ''}")
        self._open(c, c.start)
        if not slow:
            self.sim.at(rng.randrange(300, 2500), self._maybe_cancel, c)
        else:
            self.sim.at(rng.randrange(50, 200), self._slow_read, c)

    def _pick_start(self) -> int:
        rng = self.rng
        revs = self._revisions()
        r = rng.random()
        if not revs or r < 0.3:
            return 0
        if r < 0.4:
            return 1
        if r < 0.55 and self.compacted:
            return rng.choice([x for x in revs if x <= self.compacted] or [self.compacted])
        at = rng.choice(revs[-40:])
        return max(1, at + rng.choice((-1, 0, 0, 1)))

    def _open(self, c: _Chain, start: int, avoid: int = 0) -> None:
        """A new stream for chain `c` at a node that may host its groups, with a create at `start`."""
        sim = self.sim
        alive = self._alive()
        if not alive:
            sim.at(50, self._retry, c, start)
            return
        choices = [n for n in alive if n.id != avoid] or alive
        able = [n for n in choices if self._hosts_all(n, c.spec)]
        if not c.slow and not c.spec.single_key and (not able or self.rng.random() < 0.3):
            self._open_merged(c, start, alive, avoid)
            return
        if able and self.rng.random() < 0.8:  # (a client that learned which nodes serve the watch)
            choices = able
        n = self.rng.choice(choices)
        h = self.hub(n)
        assert h is not None
        c.attempt += 1
        s = h.hub.open()
        h.chains[s.id] = c
        c.stream, c.node, c.epoch, c.created, c.asked, c.deliver_at = s, n.id, n.epoch, False, start, sim.now
        spec = WatchSpec(c.spec.start, c.spec.end, start, c.spec.prev_kv, c.spec.progress_notify,
                         c.spec.no_put, c.spec.no_delete)
        self.stats.creates += 1
        m = n.logic.shard_tracker.map
        if m is None:
            s.refuse(1, errors.NoLeader("this node has no shard map yet"))
        else:
            s.create(spec, [m.group_for_key(spec.start)] if spec.single_key else m.data_groups(), 1)
        self._pump(n, h)
        sim._kick(n)
        sim.at(50, self._watch_stream, c, c.attempt)

    @staticmethod
    def _hosts_all(n: Any, spec: WatchSpec) -> bool:
        """Does node `n` host every group the watch covers (by its own map)?"""
        m = n.logic.shard_tracker.map
        if m is None:
            return False
        groups = [m.group_for_key(spec.start)] if spec.single_key else m.data_groups()
        return all(g in n.logic.host.groups for g in groups)

    def _retry(self, c: _Chain, start: int) -> None:
        if not c.ended and not self._closing_time():
            self._open(c, start, avoid=c.node)
        elif not c.ended:
            c.ended = "run over"

    def _drop_stream(self, c: _Chain) -> None:
        """The client is done with its current stream: whatever else arrives on it is ignored."""
        c.attempt += 1
        for sub, nid, epoch in c.subs:
            h = self.hubs.get(nid)
            if h is not None and h.epoch == epoch:
                h.chains.pop(sub.id, None)
                sub.close()
        c.subs = []
        c.merge = None
        s = c.stream
        h = self.hubs.get(c.node)
        if s is not None:
            if h is not None and h.epoch == c.epoch:
                h.chains.pop(s.id, None)
                s.close()
            c.stream = None

    def _watch_stream(self, c: _Chain, attempt: int) -> None:
        """The client notices a broken stream (its node crashed) once the replies sent before the
        crash arrived, and resumes from its last revision + 1 elsewhere."""
        if c.ended or c.attempt != attempt:
            return
        if self._chain_up(c):
            self.sim.at(50, self._watch_stream, c, attempt)
            return
        self.sim.at(max(0, c.deliver_at - self.sim.now) + 1, self._broken, c, attempt)

    def _broken(self, c: _Chain, attempt: int) -> None:
        if c.ended or c.attempt != attempt:
            return
        self.stats.broken += 1
        self._drop_stream(c)
        self._resume(c)

    def _resume(self, c: _Chain) -> None:
        """Start again at the last revision + 1 (or at the start if never created)."""
        start = c.bookmark + 1 if c.first else c.asked
        if c.first:
            self.stats.resumes += 1
        attempt = c.attempt
        self.sim.at(self.rng.randrange(5, 60), self._reopen, c, start, attempt)

    def _reopen(self, c: _Chain, start: int, attempt: int) -> None:
        if c.ended or c.attempt != attempt:
            return
        if self._closing_time():
            c.ended = "run over"
            return
        self._open(c, start, avoid=c.node)

    def _maybe_cancel(self, c: _Chain) -> None:
        if c.ended:
            return
        if c.merge is not None:
            self._maybe_cancel_merged(c)
            return
        s = c.stream
        if s is not None and c.created and not s.closed and self.rng.random() < 0.3:
            self.stats.progress_requests += 1
            s.progress()  # answered with a progress reply: a bookmark like any other
            n = self.sim.nodes.get(c.node)
            if n is not None and n.epoch == c.epoch:
                self.sim._kick(n)
        elif s is not None and c.created and not s.closed:
            self.stats.client_cancels += 1
            s.cancel(1)
            n = self.sim.nodes.get(c.node)
            if n is not None and n.epoch == c.epoch:
                self.sim._kick(n)
            return
        self.sim.at(self.rng.randrange(300, 2500), self._maybe_cancel, c)

    def _slow_read(self, c: _Chain) -> None:
        """A slow client takes a reply or two now and then (the hub cancels it once its stream
        stays full for `slow_after`)."""
        if c.ended:
            return
        s = c.stream
        h = self.hubs.get(c.node)
        if s is not None and not s.closed and h is not None and h.epoch == c.epoch:
            self._send(c, s.take(self.rng.randint(1, 2)))
            n = self.sim.nodes.get(c.node)
            if n is not None and n.epoch == c.epoch:
                self.sim._kick(n)
        self.sim.at(self.rng.randrange(200, 900), self._slow_read, c)

    # --- merged watches (sub-watches at several nodes, the client's merge) --------------------
    def _chain_up(self, c: _Chain) -> bool:
        """Every node serving the chain's current stream(s) is up in the same life."""
        if c.merge is not None:
            return all((n := self.sim.nodes.get(nid)) is not None and n.epoch == epoch and n.logic is not None
                       for _, nid, epoch in c.subs)
        n = self.sim.nodes.get(c.node)
        return n is not None and n.epoch == c.epoch and n.logic is not None

    def _open_merged(self, c: _Chain, start: int, alive: list[Any], avoid: int) -> None:
        """What `kvstore/client/watches.py` does when no live node hosts every group of a range:
        sub-watches of the groups at a cover of nodes (greedy by the map of a random live node; or
        now and then each group at a random replica, so 3-node runs merge too), merged."""
        sim, rng = self.sim, self.rng
        m = rng.choice(alive).logic.shard_tracker.map
        if m is None:
            sim.at(50, self._retry, c, start)
            return
        groups = m.data_groups()
        members = {g: set(m.groups[g].members()) for g in groups}
        up = {n.id for n in alive}
        plan: dict[int, tuple[int, ...]] | None
        if rng.random() < 0.5:
            plan = cover(groups, members, up - {avoid}) or cover(groups, members, up)
        else:
            picks: dict[int, list[int]] = {}
            for g in groups:
                hosts = sorted(members[g] & up)
                if not hosts:
                    plan = None
                    break
                picks.setdefault(rng.choice(hosts), []).append(g)
            else:
                plan = {n: tuple(gs) for n, gs in picks.items()}
        if not plan:
            sim.at(50, self._retry, c, start)
            return
        c.attempt += 1
        c.merge = Merge(len(plan), start, max_queued=rng.choice([2, 50, 10_000]))
        c.subs = []
        c.stream, c.created, c.asked, c.deliver_at = None, False, start, sim.now
        self.stats.merged += 1
        spec = WatchSpec(c.spec.start, c.spec.end, start, c.spec.prev_kv, c.spec.progress_notify,
                         c.spec.no_put, c.spec.no_delete)
        for nid, gs in sorted(plan.items()):
            n = sim.nodes[nid]
            h = self.hub(n)
            assert h is not None
            s = h.hub.open()
            h.chains[s.id] = c
            c.subs.append((s, nid, n.epoch))
            self.stats.creates += 1
            self.stats.subs += 1
            nm = n.logic.shard_tracker.map
            try:  # the adapter's check, against this node's map
                if nm is None:
                    raise errors.NoLeader("this node has no shard map yet")
                allowed = nm.data_groups()
                chosen = check_groups(gs, allowed)
                if len(chosen) < len(allowed) and nm.version != m.version:
                    raise errors.WrongShard(f"map version {m.version}, the node's is {nm.version}")
            except errors.InvalidArgument as err:  # its map differs from the one the cover came from
                s.refuse(1, errors.WrongShard(err.message))
            except errors.KVError as err:
                s.refuse(1, err)
            else:
                s.create(spec, chosen, 1, partial=len(chosen) < len(allowed))
        c.node, c.epoch = c.subs[0][1], c.subs[0][2]
        sim.log(f"watch #{c.id} merged from {start}: " + ", ".join(f"n{nid} {gs}" for nid, gs in sorted(plan.items())))
        for _, nid, _ in c.subs:
            n = sim.nodes[nid]
            h = self.hub(n)
            assert h is not None
            self._pump(n, h)
            sim._kick(n)
        sim.at(50, self._watch_stream, c, c.attempt)
        sim.at(1000, self._catch_up, c, c.attempt)

    def _catch_up(self, c: _Chain, attempt: int) -> None:
        """The client's timer: bookmarks while quiet (`Merge.catch_up`)."""
        if c.ended or c.attempt != attempt or c.merge is None:
            return
        c.merge.catch_up()
        self._asks(c)
        self.sim.at(1000, self._catch_up, c, attempt)

    def _asks(self, c: _Chain) -> None:
        mg = c.merge
        assert mg is not None
        for j, rev in mg.asks():
            s, nid, epoch = c.subs[j]
            n = self.sim.nodes.get(nid)
            if n is None or n.epoch != epoch or n.logic is None or s.closed:
                continue
            if not self._clock_ok(n, rev):  # the adapter refuses it: asked again after a catch_up
                self.sim.log(f"watch #{c.id}: progress at {rev} refused by n{nid}'s clock")
                mg.refused(j)
                continue
            self.stats.asks += 1
            s.progress(rev)
            self.sim._kick(n)

    def _clock_ok(self, n: Any, revision: int) -> bool:
        """`NodeCloses.check` on node `n` (its clock: what the adapter checks)."""
        try:
            self.closes(n).check(revision)
        except errors.InvalidArgument:
            return False
        return True

    def _maybe_cancel_merged(self, c: _Chain) -> None:
        """A merged watch's client asks its subs for progress now and then, or stops (and maybe
        starts again from its last revision + 1)."""
        if self.rng.random() < 0.3:
            for s, nid, epoch in c.subs:
                n = self.sim.nodes.get(nid)
                if n is not None and n.epoch == epoch and not s.closed:
                    self.stats.progress_requests += 1
                    s.progress()
                    self.sim._kick(n)
        elif c.created:
            self.stats.client_cancels += 1
            self._drop_stream(c)
            if self.rng.random() < 0.5:
                c.ended = "canceled by the client"
                self.sim.at(self.rng.randrange(50, 300), self._new_chain, False)
                return
            self._resume(c)
        self.sim.at(self.rng.randrange(300, 2500), self._maybe_cancel, c)

    def _receive_sub(self, c: _Chain, attempt: int, i: int, r: Reply) -> None:
        if c.ended or c.attempt != attempt or c.merge is None:
            return
        self.stats.replies += 1
        mg = c.merge
        where = f"watch #{c.id} ({c.spec}) merged, sub {i} at n{c.subs[i][1]}"
        if r.created:
            want = c.asked - 1 if c.asked > mvcc.LEGACY_REVISION else (
                mvcc.LEGACY_REVISION if c.asked else r.revision)
            if r.revision != want:
                raise WatchViolation(f"{where}: created at revision {r.revision} for a start of {c.asked}")
            mg.created(i, r.revision)
        elif r.canceled:
            self._sub_canceled(c, i, r, where)
            return
        elif r.error is not None:
            raise WatchViolation(f"{where}: a request refused: {r.error!r}")
        else:
            try:
                mg.response(i, r.revision, r.events)
            except ValueError as err:
                raise WatchViolation(f"{where}: {err}") from None
        self._asks(c)
        if c.merge is not mg:
            return
        for b in mg.take():
            if not c.created:
                self._on_created(c, Reply(1, revision=b.revision, created=True), where)
                if not b.events:
                    continue
            self._on_events(c, Reply(1, revision=b.revision, events=list(b.events)), where)
        self._pump_subs(c)

    def _pump_subs(self, c: _Chain) -> None:
        """Subs paused for being far ahead may be read again."""
        for _, nid, epoch in c.subs:
            n = self.sim.nodes.get(nid)
            h = self.hubs.get(nid)
            if n is not None and h is not None and h.epoch == epoch == n.epoch and n.logic is not None:
                self._pump(n, h)

    def _sub_canceled(self, c: _Chain, i: int, r: Reply, where: str) -> None:
        """A sub ended: COMPACTED ends the chain (checked as for one stream); anything else
        restarts the whole merged watch from its last revision + 1 (`_resume`)."""
        err = r.error
        code = type(err).__name__ if err is not None else "client"
        self.sim.log(f"{where}: canceled ({code}: {r.cancel_reason}), resume {r.resume_revision}")
        if isinstance(err, errors.InvalidArgument):
            raise WatchViolation(f"{where}: a valid create refused: {r.cancel_reason}")
        if err is None:
            raise WatchViolation(f"{where}: canceled as by the client, which never cancels a sub")
        self._drop_stream(c)
        if not c.created:
            self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
        else:
            self.stats.canceled[code] = self.stats.canceled.get(code, 0) + 1
        if isinstance(err, errors.Compacted):
            crev = r.compact_revision
            if crev > self.compacted or (not c.created and c.asked and crev <= c.asked):
                raise WatchViolation(
                    f"{where}: compacted at {crev} (start {c.asked}, largest compaction asked for: {self.compacted})")
            c.ended = "compacted"
            return
        if r.resume_revision and r.resume_revision != r.revision + 1:
            raise WatchViolation(
                f"{where}: canceled at revision {r.revision} with resume revision {r.resume_revision}")
        self._resume(c)

    # --- replies and the checks on arrival --------------------------------------------------------
    def _receive(self, c: _Chain, attempt: int, r: Reply) -> None:
        if c.ended or c.attempt != attempt:
            return
        self.stats.replies += 1
        where = f"watch #{c.id} ({c.spec}) at n{c.node}"
        if r.created:
            self._on_created(c, r, where)
            return
        if r.canceled:
            self._on_canceled(c, r, where)
            return
        if not c.created:
            raise WatchViolation(f"{where}: a reply before its watch was created: {r}")
        self._on_events(c, r, where)

    def _on_created(self, c: _Chain, r: Reply, where: str) -> None:
        self.stats.created += 1
        c.created = True
        c.created_at = self.sim.now
        want = c.asked - 1 if c.asked > mvcc.LEGACY_REVISION else (
            mvcc.LEGACY_REVISION if c.asked else r.revision)
        if r.revision != want:
            raise WatchViolation(f"{where}: created at revision {r.revision} for a start of {c.asked}")
        if not c.first:
            c.first = r.revision + 1
        elif r.revision != max(c.bookmark, mvcc.LEGACY_REVISION):  # (a start of 1 is one of 2)
            raise WatchViolation(f"{where}: resumed at {r.revision + 1}, its last revision was {c.bookmark}")
        c.bookmark = max(c.bookmark, r.revision)
        self.sim.log(f"{where}: created, events from {r.revision + 1}")

    def _on_canceled(self, c: _Chain, r: Reply, where: str) -> None:
        err = r.error
        code = type(err).__name__ if err is not None else "client"
        self._drop_stream(c)
        self.sim.log(f"{where}: canceled ({code}: {r.cancel_reason}), resume {r.resume_revision}")
        if not c.created:
            self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
            if isinstance(err, errors.Compacted):
                crev = r.compact_revision
                if not c.asked or not (c.asked < crev <= self.compacted):
                    raise WatchViolation(
                        f"{where}: a start at {c.asked} refused as compacted at {crev} (largest compaction "
                        f"asked for: {self.compacted})")
                c.ended = "compacted"
                return
            if isinstance(err, errors.InvalidArgument):
                raise WatchViolation(f"{where}: a valid create refused: {r.cancel_reason}")
            self.sim.at(self.rng.randrange(20, 100), self._retry, c, c.asked)
            return
        self.stats.canceled[code] = self.stats.canceled.get(code, 0) + 1
        if r.revision < c.bookmark:
            raise WatchViolation(f"{where}: canceled at revision {r.revision}, below its last revision {c.bookmark}")
        if isinstance(err, errors.Compacted):
            if r.compact_revision <= r.revision + 1 or r.compact_revision > self.compacted:
                raise WatchViolation(
                    f"{where}: canceled as compacted at {r.compact_revision} while at {r.revision + 1}")
            c.bookmark = r.revision
            c.ended = "compacted"
            return
        c.bookmark = r.revision
        if err is None:  # the client's own cancel: resume (a new watch from the next revision) or stop
            if self.rng.random() < 0.5:
                c.ended = "canceled by the client"
                self.sim.at(self.rng.randrange(50, 300), self._new_chain, False)
                return
            self._resume(c)
            self.sim.at(self.rng.randrange(300, 2500), self._maybe_cancel, c)
            return
        if r.resume_revision != r.revision + 1:
            raise WatchViolation(
                f"{where}: canceled at revision {r.revision} with resume revision {r.resume_revision}")
        self._resume(c)

    def _on_events(self, c: _Chain, r: Reply, where: str) -> None:
        # ordered, unique, atomic, bookmarkable: the checks kvchaos runs on its real watchers
        feed = FeedState(c.bookmark, c.last_event, c.seen)
        bad = check_batch(feed, r.revision, [(e.revision, e.key) for e in r.events])
        if bad is not None:
            raise WatchViolation(f"{where}: {bad.prop}: {bad.message}")
        if not r.events:
            self.stats.progress += 1
        for e in r.events:
            ev = _event(e)
            if e.revision < c.first or not c.spec.matches(e.key) or (
                    c.spec.no_put if e.kind == PUT else c.spec.no_delete):
                raise WatchViolation(f"{where}: event {ev[:3]} is not in the watch (from {c.first})")
            c.events.append(ev)
        c.last_event = feed.last_event
        self.stats.events += len(r.events)
        c.bookmark = r.revision

    # --- the end of the run: live and reliable ---------------------------------------------------
    def check_end(self) -> None:
        """Every chain's events against the final history (module docstring: reliable), and
        liveness: a watch that reads its stream, on a node up since the cluster settled, has
        been told everything applied by then."""
        self._check_live()
        self._check_reliable()

    def _check_live(self) -> None:
        if self.settled is None or 2 * self.sim.p.clock_offset_ms > MAX_CLOCK_OFFSET_MS:
            # Clocks further apart than the stated bound: a leader refuses to close its group at
            # a revision another group's faster clock issued (`HybridClock.check_close`), so a
            # watch across groups waits for the slow group's own next write (by design).
            return
        at, target = self.settled
        for c in self.chains:
            if c.ended or c.slow or not c.created or c.created_at > at or not self._chain_up(c):
                continue
            # With progress notifications the watch is told the frontier even when its keys are
            # quiet; without them (as in etcd) only its own events tell it anything, so what it
            # must have been told is its last matching change applied by then (seed 1122: a key
            # watch whose group kept writing other keys).
            # A key watch covers one group, which nothing closes for it while quiet (the periodic
            # closes are for watches over several groups, or parts of merged ones): its bookmark
            # moves with its group's own writes and with closes other watches cause, so only its
            # own changes are owed (seed 1138 once merged watches changed the watchers' draws).
            owed_all = c.spec.progress_notify and not c.spec.single_key
            need = target if owed_all else self._last_matching(c, target)
            if c.bookmark < need:
                raise WatchViolation(
                    f"liveness: watch #{c.id} ({c.spec}) at n{c.node} was told everything through {c.bookmark} by the "
                    f"end of the run ({self.sim.now} ms), below the revision {need} applied by {at} ms")

    def _last_matching(self, c: _Chain, target: int) -> int:
        """The highest revision <= `target` of a change the watch `c` would get (0: none)."""
        best = 0
        for key, vs in self.sim.revisions.versions.items():
            if not c.spec.matches(key):
                continue
            for rev, value in vs:
                if best < rev <= target and rev >= c.first and not (
                        c.spec.no_delete if value is None else c.spec.no_put):
                    best = rev
        return best

    def _check_reliable(self) -> None:
        hist = self.sim.revisions.versions
        expected_all: list[Event] = []
        for key, vs in hist.items():
            create = version = 0
            before: bytes | None = None
            for rev, value in vs:
                if value is None:
                    expected_all.append((rev, key, mvcc.KIND_DELETE, None, 0, 0, before))
                    create = version = 0
                else:
                    if not version:
                        create = rev
                    version += 1
                    expected_all.append((rev, key, PUT, value, create, version, before))
                before = value
        expected_all.sort()
        for c in self.chains:
            if not c.first:
                continue
            spec = c.spec
            want = [e for e in expected_all if c.first <= e[0] <= c.bookmark and spec.matches(e[1])
                    and not (spec.no_put if e[2] == PUT else spec.no_delete)]
            # Within one revision, compare contents, not order: a cross-group transaction's events
            # at R come from several groups, group by group (order across revisions is checked
            # per reply, `check_batch`).
            got = sorted(c.events, key=lambda e: (e[0], e[1]))
            self.stats.checked_chains += 1
            self.stats.checked_events += len(got)
            for i in range(max(len(want), len(got))):
                w = want[i] if i < len(want) else None
                g = got[i] if i < len(got) else None
                if w is None or g is None or w[:6] != g[:6]:
                    what = "missing" if g is None or (w is not None and w[0] < g[0]) else "unexpected"
                    raise WatchViolation(
                        f"watch #{c.id} ({spec}) from {c.first}, complete through {c.bookmark}: reliable: event "
                        f"#{i} {what}: got {g and g[:6]}, the history has {w and w[:6]}")
                if spec.prev_kv and g[6] is not None and g[6] != w[6]:
                    raise WatchViolation(
                        f"watch #{c.id}: event {g[:3]} has prev_kv {g[6]!r}, the key's previous value was {w[6]!r}")
                if spec.prev_kv and g[6] is None and w[6] is not None and g[0] > self.compacted:
                    prev_rev = max((r for r, _ in hist[g[1]] if r < g[0]), default=0)
                    if prev_rev > self.compacted:
                        raise WatchViolation(f"watch #{c.id}: event {g[:3]} lacks its prev_kv {w[6]!r}")

    def summary(self) -> str:
        s = self.stats
        return (
            f"watches: {s.chains} chains, {s.creates} creates ({s.created} created), {s.events} events, "
            f"{s.progress} replies without events ({s.progress_requests} asked), {s.resumes} resumes, refused {dict(sorted(s.refused.items()))}, "
            f"canceled {dict(sorted(s.canceled.items()))}, {s.client_cancels} client cancels, {s.broken} broken "
            f"by crashes, {s.compactions} compactions, {s.closes} closes ({s.closes_forwarded} forwarded), "
            f"{s.checked_events} events checked in {s.checked_chains} chains, {s.merged} merged watches "
            f"({s.subs} sub-watches, {s.asks} progress requests at a revision)"
        )


def _event(c: Change) -> Event:
    prev = c.prev.value if c.prev is not None else None
    return (c.revision, c.key, c.kind, c.value, c.create_revision, c.version, prev)
