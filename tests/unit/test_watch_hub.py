"""The watch hub (`kvstore/node/watch.py`) on the real state machine and change log, in memory.

Groups are real `MemoryNodeStore` groups whose entries (puts, deletes, CLOSE, COMPACT, shard
commands) are applied by the real apply logic; the hub reads them through `StoreSource`, as the
server does on LMDB. Checked: order across groups under interleaved applies, the frontier rule,
catch-up then live without gaps or repeats, compaction, slow watchers, range moves, progress,
and hostile requests (hypothesis).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.store import ApplyBatch
from kvstore.node.watch import SLOW, StoreSource, WatchHub, WatchLimits, WatchStream
from kvstore.node.watchspec import Reply, WatchSpec
from kvstore.raft.types import ConfState, Entry, EntryType
from kvstore.shard.ranges import HASH_MAX, IntervalSet
from kvstore.storage import commands, mvcc
from kvstore.storage.changefeed import DELETE, PUT
from kvstore.storage.shardcmd import ShardOp, encode_shard_command

CONF = ConfState((1,))


@dataclass
class Cluster:
    """Data groups on one in-memory store; `apply` runs commands through the real apply."""

    groups: tuple[int, ...] = (1, 2, 3)
    store: MemoryNodeStore = field(default_factory=lambda: MemoryNodeStore(sync=True))
    hosted: set[int] = field(default_factory=set)
    clock: int = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)

    def __post_init__(self) -> None:
        for g in self.groups:
            self.store.bootstrap(g, CONF)
            self.hosted.add(g)
            self.apply(g, [])  # apply the bootstrap entries

    def apply(self, g: int, datas: list[bytes]) -> list[commands.ApplyResult | None]:
        log = self.store.log_storage(g)
        applied = self.store.applied_index(g)
        last = log.last_index()
        ents = list(log.entries(applied + 1, last + 1)) if last > applied else []
        idx = last
        for d in datas:
            idx += 1
            ents.append(Entry(1, idx, EntryType.NORMAL, d, g))
        if datas:
            from kvstore.node.store import GroupWrite

            self.store.persist([GroupWrite(g, ents[-len(datas):])])
        if not ents:
            return []
        [res] = self.store.persist_and_apply([], [ApplyBatch(g, ents, CONF)])
        return res[-len(datas):] if datas else []

    def tick(self, ms: int = 1) -> int:
        self.clock += ms << (mvcc.SLOT_BITS + mvcc.LOGICAL_BITS)
        return self.clock

    def put(self, g: int, key: bytes, value: bytes) -> int:
        [r] = self.apply(g, [commands.encode_put(key, value, revision=self.tick())])
        assert r is not None and r.revision, r
        return r.revision

    def delete(self, g: int, key: bytes) -> int:
        [r] = self.apply(g, [commands.encode_delete(key, revision=self.tick())])
        assert r is not None
        return r.revision

    def hub(self, limits: WatchLimits | None = None) -> WatchHub:
        return WatchHub(StoreSource(self.store), lambda g: g in self.hosted, limits)


def drain(hub: WatchHub, s: WatchStream, now: float = 0.0, steps: int = 1000) -> list[Reply]:
    out: list[Reply] = []
    for _ in range(steps):
        more = hub.step(now)
        out += s.take(10_000)
        if not more and not s.outbox:
            break
    return out


def events(replies: list[Reply]) -> list[tuple[int, bytes, int, bytes | None]]:
    return [(c.revision, c.key, c.kind, c.value) for r in replies for c in r.events]


def test_a_prefix_watch_merges_groups_in_revision_order_up_to_the_frontier() -> None:
    c = Cluster()
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", prefix=b"app/"), c.groups, watch_id=7)
    [created] = drain(hub, s)
    assert created.created and created.watch_id == 7 and not created.canceled
    r1 = c.put(1, b"app/a", b"1")
    r2 = c.put(2, b"app/b", b"2")
    r_other = c.put(2, b"other", b"x")  # outside the prefix
    hub.applied([1, 2])
    # group 3 is idle below r1: nothing may go out yet (its next write could be below r1)
    assert drain(hub, s) == []
    assert hub.lagging_groups(10.0) == {1: r_other, 3: r_other}
    # group 3 closes above both: both events, in order, in one step
    [res] = c.apply(3, [commands.encode_close(r2)])
    assert res is not None and res.revision >= r2
    hub.applied([3])
    got = drain(hub, s)
    assert events(got) == [(r1, b"app/a", PUT, b"1")]
    # r2 is above group 1's last: held back until group 1 passes it
    r3 = c.put(1, b"app/c", b"3")
    c.apply(3, [commands.encode_close(r3)])
    c.apply(2, [commands.encode_close(r3)])
    hub.applied([1, 2, 3])
    got = drain(hub, s)
    assert events(got) == [(r2, b"app/b", PUT, b"2"), (r3, b"app/c", PUT, b"3")]
    assert got[-1].revision == r3


def test_catch_up_then_live_without_gaps_or_repeats_under_interleaved_applies() -> None:
    rng = random.Random(5)
    c = Cluster()
    written: list[tuple[int, bytes, int, bytes | None]] = []
    for i in range(300):
        g = rng.choice(c.groups)
        k = f"k/{rng.randrange(40)}".encode()
        if rng.random() < 0.2:
            r = c.delete(g, k)
            if r:
                written.append((r, k, DELETE, None))
        else:
            v = str(i).encode()
            written.append((c.put(g, k, v), k, PUT, v))
    start = written[50][0]
    hub = c.hub(WatchLimits(read_events=7, reply_bytes=300, step_events=20))
    s = hub.open()
    s.create(WatchSpec.make(b"k/", b"k0", start_revision=start), c.groups)
    seen = drain(hub, s)
    assert seen[0].created and seen[0].revision == start - 1
    for i in range(300):  # live, with catch-up still running
        g = rng.choice(c.groups)
        k = f"k/{rng.randrange(40)}".encode()
        v = f"live{i}".encode()
        written.append((c.put(g, k, v), k, PUT, v))
        hub.applied([g])
        if i % 7 == 0:
            seen += drain(hub, s, steps=1)
    top = max(r for r, *_ in written)
    for g in c.groups:
        c.apply(g, [commands.encode_close(top)])
    hub.applied(c.groups)
    seen += drain(hub, s)
    want = sorted(e for e in written if e[0] >= start)
    assert events(seen) == want
    revs = [r.revision for r in seen]
    assert revs == sorted(revs)
    for r in seen:  # a reply's revision covers its events
        assert all(e.revision <= r.revision for e in r.events)


def test_prev_kv_create_revision_and_version() -> None:
    c = Cluster(groups=(1,))
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"x", prev_kv=True), (1,))
    drain(hub, s)
    r1 = c.put(1, b"x", b"a")
    r2 = c.put(1, b"x", b"b")
    r3 = c.delete(1, b"x")
    r4 = c.put(1, b"x", b"c")
    hub.applied([1])
    evs = [e for r in drain(hub, s) for e in r.events]
    assert [(e.revision, e.kind, e.value, e.create_revision, e.version) for e in evs] == [
        (r1, PUT, b"a", r1, 1), (r2, PUT, b"b", r1, 2), (r3, DELETE, None, 0, 0), (r4, PUT, b"c", r4, 1)]
    assert [None if e.prev is None else e.prev.value for e in evs] == [None, b"a", b"b", None]


def test_filters_and_single_key() -> None:
    c = Cluster(groups=(1,))
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"a", no_put=True), (1,), 1)
    s.create(WatchSpec.make(b"a", b"\0", no_delete=True), (1,), 2)
    drain(hub, s)
    c.put(1, b"a", b"1")
    c.put(1, b"ab", b"2")
    rd = c.delete(1, b"a")
    hub.applied([1])
    got = drain(hub, s)
    by = {1: [], 2: []}  # type: dict[int, list[tuple[int, bytes]]]
    for r in got:
        by[r.watch_id] += [(e.kind, e.key) for e in r.events]
    assert by == {1: [(DELETE, b"a")], 2: [(PUT, b"a"), (PUT, b"ab")]}
    assert rd


def test_compacted_start_and_a_watcher_overtaken_by_compaction_are_canceled_naming_it() -> None:
    c = Cluster(groups=(1, 2))
    revs = [c.put(1 + i % 2, f"k{i}".encode(), b"v") for i in range(10)]
    [res] = c.apply(1, [commands.encode_compact(revs[4], keep=True)])
    assert res is not None
    compact = res.revision
    hub = c.hub(WatchLimits(read_events=1, step_events=1))
    s = hub.open()
    s.create(WatchSpec.make(b"k", b"l", start_revision=revs[0]), (1, 2), 1)
    [r] = drain(hub, s)
    assert r.canceled and not r.created and r.compact_revision == compact
    assert isinstance(r.error, errors.Compacted) and not r.error.indeterminate
    # at it: served, one revision per step; then compaction overtakes the lagging watcher
    s.create(WatchSpec.make(b"k", b"l", start_revision=compact), (1, 2), 2)
    assert hub.step(0.0)
    first = s.take()
    assert first[0].created and len(events(first)) == 1
    c.apply(1, [commands.encode_compact(revs[9], keep=True)])
    hub.applied([1])
    got = drain(hub, s)
    assert got[-1].canceled and isinstance(got[-1].error, errors.Compacted) and got[-1].resume_revision == 0
    assert got[-1].compact_revision == c.store.revisions.rev_state(1).compact


def test_a_start_at_exactly_the_compact_revision_gets_its_changes_without_prev_kv() -> None:
    """As etcd's watch from its compact revision C: the changes at C come (they are the state
    at C, which compaction keeps), without prev_kv (the versions before C are gone); a delete
    at C comes too (etcd's compaction drops a tombstone at C, kvstore keeps it until the next
    compaction); one below C is refused naming C."""
    c = Cluster(groups=(1, 2))
    c.put(1, b"ka", b"1")
    c.put(1, b"kb", b"1")
    r_put = c.put(1, b"ka", b"2")
    r_del = c.delete(1, b"kb")
    later = c.put(2, b"kc", b"3")
    c.apply(1, [commands.encode_close(later)])
    hub = c.hub()
    for at, want in ((r_put, (r_put, b"ka", PUT, b"2")), (r_del, (r_del, b"kb", DELETE, None))):
        [res] = c.apply(1, [commands.encode_compact(at, keep=True)])
        assert res is not None and res.revision == at
        s = hub.open()
        s.create(WatchSpec.make(b"k", b"l", start_revision=at, prev_kv=True), (1, 2), 1)
        s.create(WatchSpec.make(b"k", b"l", start_revision=at - 1), (1, 2), 2)
        got = drain(hub, s)
        served = [r for r in got if r.watch_id == 1]
        assert served[0].created and served[0].revision == at - 1
        evs = events(served)
        assert evs[0] == want and evs[-1] == (later, b"kc", PUT, b"3")
        assert [ev.prev for r in served for ev in r.events if ev.revision == at] == [None]
        [refused] = [r for r in got if r.watch_id == 2]
        assert refused.canceled and isinstance(refused.error, errors.Compacted)
        assert refused.compact_revision == at


def test_a_start_at_the_compact_revision_is_refused_unless_its_changes_were_kept() -> None:
    """A group compacted under the first rule (a binary before feature level 8, or before the
    cluster reached it) consumed the changes at its compact revision C: a start at C is refused
    (COMPACTED naming C, a start at C + 1 is served), as is a lagging watcher's read from C,
    never a silent gap; its next keep-rule compaction at C2 serves a start at C2 again."""
    c = Cluster(groups=(1,))
    r1 = c.put(1, b"ka", b"1")
    r2 = c.put(1, b"kb", b"1")
    r3 = c.put(1, b"ka", b"2")
    [res] = c.apply(1, [commands.encode_compact(r2)])
    assert res is not None and res.revision == r2
    assert not c.store.revisions.rev_state(1).kept
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"k", b"l", start_revision=r2), (1,), 1)
    s.create(WatchSpec.make(b"k", b"l", start_revision=r2 + 1), (1,), 2)
    got = drain(hub, s)
    [refused] = [r for r in got if r.watch_id == 1]
    assert refused.canceled and isinstance(refused.error, errors.Compacted)
    assert refused.compact_revision == r2 and f"watch from {r2 + 1}" in refused.cancel_reason
    assert events([r for r in got if r.watch_id == 2]) == [(r3, b"ka", PUT, b"2")]
    [res] = c.apply(1, [commands.encode_compact(r3, keep=True)])
    assert res is not None and res.revision == r3 and c.store.revisions.rev_state(1).kept
    s = hub.open()
    s.create(WatchSpec.make(b"k", b"l", start_revision=r3), (1,), 3)
    got = drain(hub, s)
    assert got[0].created and events(got) == [(r3, b"ka", PUT, b"2")]
    assert r1 < r2


def test_start_one_begins_after_the_legacy_revision() -> None:
    c = Cluster(groups=(1,))
    r = c.put(1, b"a", b"1")
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"a", start_revision=1), (1,))
    got = drain(hub, s)
    assert got[0].created and got[0].revision == mvcc.LEGACY_REVISION
    assert events(got) == [(r, b"a", PUT, b"1")]


def test_start_zero_starts_exactly_at_the_highest_last_revision_once_the_others_are_closed_there() -> None:
    c = Cluster(groups=(1, 2))
    c.put(1, b"a", b"1")
    r2 = c.put(2, b"b", b"2")
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", b"\0"), (1, 2))
    # group 1 is below r2: no created reply (nothing) until it is closed up to r2
    assert drain(hub, s) == []
    assert hub.close_wants() == {1: r2}
    c.apply(2, [commands.encode_close(c.tick())])  # group 2 moves on: no created reply yet
    hub.applied([2])
    assert drain(hub, s) == []
    c.apply(1, [commands.encode_close(r2)])
    hub.applied([1])
    [created] = drain(hub, s)
    assert created.created and created.revision == r2
    # nothing at or below r2 is delivered (both puts came before the create); later changes are
    r3 = c.put(2, b"c", b"3")
    r4 = c.put(1, b"d", b"4")
    c.apply(2, [commands.encode_close(r4)])
    hub.applied([1, 2])
    assert events(drain(hub, s)) == [(r3, b"c", PUT, b"3"), (r4, b"d", PUT, b"4")]


def test_start_zero_on_groups_already_level_answers_at_once() -> None:
    c = Cluster(groups=(1, 2))
    r = c.put(1, b"a", b"1")
    c.apply(2, [commands.encode_close(r)])
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", b"\0"), (1, 2))
    [created] = drain(hub, s)
    top = max(c.store.revisions.rev_state(g).last for g in (1, 2))
    assert created.created and created.revision == top
    assert hub.close_wants() == {}


def test_a_watch_of_some_groups_sees_only_theirs_and_needs_only_them_hosted() -> None:
    c = Cluster()
    c.hosted.discard(3)
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", prefix=b"k", start_revision=2), (1, 2), watch_id=1, partial=True)
    s.create(WatchSpec.make(b"", prefix=b"k", start_revision=2), (1, 2, 3), watch_id=2, partial=True)
    got = drain(hub, s)
    assert [(x.watch_id, x.created, x.canceled) for x in got] == [(1, True, False), (2, False, True)]
    assert isinstance(got[1].error, errors.WrongShard) and "3" in got[1].cancel_reason
    r1 = c.put(1, b"k1", b"1")
    c.put(3, b"k3", b"3")  # not watched here
    r2 = c.put(2, b"k2", b"2")
    c.apply(1, [commands.encode_close(r2)])
    hub.applied([1, 2, 3])
    assert events(drain(hub, s)) == [(r1, b"k1", PUT, b"1"), (r2, b"k2", PUT, b"2")]


def test_a_progress_request_at_a_revision_closes_the_groups_below_it_and_answers_once_past_it() -> None:
    c = Cluster(groups=(1, 2))
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", prefix=b"k", start_revision=2), (1,), watch_id=1, partial=True)
    s.create(WatchSpec.make(b"", prefix=b"k", start_revision=2), (1, 2), watch_id=2)
    drain(hub, s)
    hub.close_wants()
    target = c.tick(50)
    s.progress(target)
    assert drain(hub, s) == []  # neither watch has reached it
    assert hub.close_wants() == {1: target, 2: target}
    c.apply(1, [commands.encode_close(target)])
    hub.applied([1])
    got = drain(hub, s)
    assert [(x.watch_id, x.events, x.created) for x in got] == [(1, [], False)] and got[0].revision >= target
    c.apply(2, [commands.encode_close(target)])
    hub.applied([2])
    got = drain(hub, s)
    assert [(x.watch_id, x.events) for x in got] == [(2, [])] and got[0].revision >= target
    assert drain(hub, s, now=0.1) == []  # answered once
    s.progress(target)  # already past it: answered at the next step, no close asked
    got = drain(hub, s)
    assert sorted(x.watch_id for x in got) == [1, 2] and all(x.revision >= target for x in got)
    assert hub.close_wants() == {}


def test_progress_on_request_and_when_quiet() -> None:
    c = Cluster(groups=(1,))
    hub = c.hub(WatchLimits(progress_interval=1.0))
    s = hub.open()
    s.create(WatchSpec.make(b"p", progress_notify=True), (1,), 1)
    s.create(WatchSpec.make(b"q"), (1,), 2)
    drain(hub, s, now=0.0)
    r = c.put(1, b"zzz", b"1")  # another key moves the frontier
    hub.applied([1])
    assert drain(hub, s, now=0.5) == []
    got = drain(hub, s, now=1.5)
    assert [(x.watch_id, x.revision, x.events) for x in got] == [(1, r, [])]
    s.progress()
    got = drain(hub, s, now=1.6)
    assert sorted((x.watch_id, x.revision) for x in got) == [(1, r), (2, r)]


def test_cancel_and_unknown_ids() -> None:
    c = Cluster(groups=(1,))
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"a"), (1,), 5)
    s.create(WatchSpec.make(b"b"), (1,), 5)  # duplicate id
    s.cancel(99)
    s.cancel(5)
    got = drain(hub, s)
    assert got[0].created
    assert got[1].canceled and isinstance(got[1].error, errors.InvalidArgument)
    assert got[2].canceled and isinstance(got[2].error, errors.InvalidArgument)
    assert got[3].canceled and got[3].error is None and got[3].watch_id == 5
    assert hub.count == 0 and not hub.watching
    c.put(1, b"a", b"1")
    hub.applied([1])
    assert drain(hub, s) == []


def test_a_group_not_hosted_here_is_refused_naming_the_groups() -> None:
    c = Cluster(groups=(1, 2))
    c.hosted.discard(2)
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"a", b"\0"), (1, 2), 1)
    [r] = drain(hub, s)
    assert r.canceled and isinstance(r.error, errors.WrongShard) and "group(s) 2" in r.error.message
    assert not r.error.indeterminate and r.resume_revision == 0


def test_a_group_that_leaves_the_node_cancels_its_watches_with_the_resume_revision() -> None:
    c = Cluster(groups=(1, 2))
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", b"\0"), (1, 2), 1)
    [created] = drain(hub, s)
    c.hosted.discard(2)  # e.g. its replica here was removed: no apply tells the hub
    [r] = drain(hub, s)
    assert r.canceled and isinstance(r.error, errors.WrongShard) and r.resume_revision == created.revision + 1
    assert hub.count == 0 and not hub.watching


def test_a_range_move_cancels_with_the_resume_revision_and_a_moving_range_is_refused() -> None:
    c = Cluster(groups=(1, 2))
    for g in c.groups:
        c.apply(g, [encode_shard_command(ShardOp.SET, IntervalSet([(0, 1 << 63)] if g == 1 else [(1 << 63, HASH_MAX)]))])
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", b"\0"), (1,), 9)  # a lagging map that misses group 2
    [r] = drain(hub, s)
    assert r.canceled and isinstance(r.error, errors.WrongShard) and "behind" in r.error.message
    s.create(WatchSpec.make(b"", b"\0"), (1, 2), 1)
    drain(hub, s)
    r1 = c.put(1, b"a", b"1")
    c.apply(2, [commands.encode_close(r1)])
    hub.applied([1, 2])
    assert events(drain(hub, s)) == [(r1, b"a", PUT, b"1")]
    c.apply(1, [encode_shard_command(ShardOp.FREEZE, IntervalSet([(0, 1 << 62)]), move=1)])
    hub.applied([1])
    [r] = drain(hub, s)
    assert r.canceled and isinstance(r.error, errors.WrongShard) and r.resume_revision == r1 + 1
    assert "range moved" in r.cancel_reason
    s.create(WatchSpec.make(b"", b"\0", start_revision=r1 + 1), (1, 2), 2)
    [r] = drain(hub, s)
    assert r.canceled and "moving" in r.cancel_reason


def test_a_slow_stream_is_canceled_with_its_resume_revision_and_memory_stays_bounded() -> None:
    c = Cluster(groups=(1,))
    lim = WatchLimits(stream_bytes=2000, node_bytes=1 << 30, reply_bytes=500, slow_after=5.0)
    hub = c.hub(lim)
    slow, fast = hub.open(), hub.open()
    slow.create(WatchSpec.make(b"k", b"l"), (1,), 1)
    fast.create(WatchSpec.make(b"k", b"l"), (1,), 1)
    hub.step(0.0)
    slow.take()
    fast.take()
    revs = [c.put(1, f"k{i:03}".encode(), b"x" * 100) for i in range(100)]
    hub.applied([1])
    taken = slow.take(1)  # the slow client reads one reply, then nothing
    fast_got: list[Reply] = []
    for t in range(12):
        hub.step(float(t))
        assert slow.bytes <= lim.stream_bytes + lim.reply_bytes + 1000  # bounded
        if not taken:
            taken = slow.take(1)
        fast_got += fast.take(10_000)
    assert [e.revision for e in events_of(fast_got)] == revs  # the fast one is not held back
    rest = slow.take(10_000)
    cancel = rest[-1]
    assert cancel.canceled and cancel.cancel_reason == SLOW and isinstance(cancel.error, errors.ResourceExhausted)
    delivered = max(r.revision for r in taken)
    assert cancel.resume_revision == delivered + 1
    assert hub.pending_bytes == fast.bytes + slow.bytes == 0


def events_of(replies: list[Reply]) -> list:  # type: ignore[type-arg]
    return [e for r in replies for e in r.events]


def test_the_node_budget_cancels_the_fullest_stream() -> None:
    c = Cluster(groups=(1,))
    lim = WatchLimits(stream_bytes=10_000, node_bytes=12_000, reply_bytes=1000)
    hub = c.hub(lim)
    a, b = hub.open(), hub.open()
    a.create(WatchSpec.make(b"k", b"l"), (1,), 1)
    b.create(WatchSpec.make(b"k", b"l"), (1,), 1)
    hub.step(0.0)
    a.take()
    b.take()
    for i in range(100):
        c.put(1, f"k{i:03}".encode(), b"x" * 100)
    hub.applied([1])
    hub.step(0.0)
    assert hub.pending_bytes <= lim.node_bytes + 1000
    canceled = [r for s in (a, b) for r in s.take(10_000) if r.canceled]
    assert len(canceled) == 1 and canceled[0].cancel_reason == SLOW and canceled[0].resume_revision > 0


def test_handled_requests_signal_the_stream_even_without_a_reply() -> None:
    """A stream full of requests that produce no reply (progress with no watch) must still be told
    that its queue drained, or its adapter would wait for room forever."""
    c = Cluster(groups=(1,))
    hub = c.hub(WatchLimits(requests_per_stream=4))
    s = hub.open()
    calls = []
    s.on_reply = lambda: calls.append(1)
    for _ in range(4):
        s.progress()
    assert s.busy
    hub.step(0.0)
    assert not s.busy and calls and not s.take()


def test_cancel_everything_is_resumable_at_what_was_delivered() -> None:
    c = Cluster(groups=(1,))
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"k", b"l"), (1,), 1)
    drain(hub, s)
    r1 = c.put(1, b"k1", b"1")
    hub.applied([1])
    assert events(drain(hub, s)) == [(r1, b"k1", PUT, b"1")]
    c.put(1, b"k2", b"2")
    hub.applied([1])
    hub.step(0.0)  # queued, not taken
    hub.cancel_everything(errors.InternalError("boom", indeterminate=False))
    [r] = s.take()
    assert r.canceled and r.resume_revision == r1 + 1 and hub.count == 0 and hub.pending_bytes == 0


def test_closing_a_stream_forgets_everything() -> None:
    c = Cluster(groups=(1, 2))
    hub = c.hub()
    s = hub.open()
    for i in range(10):
        s.create(WatchSpec.make(f"k{i}".encode()), (1, 2), 0)
    hub.step(0.0)
    assert hub.count == 10 and hub.pending_bytes > 0
    s.close()
    assert hub.count == 0 and hub.pending_bytes == 0 and not hub.watching and not hub.streams and hub.idle


# --- hostile requests ------------------------------------------------------------------------------

@given(
    key=st.binary(max_size=5000), end=st.binary(max_size=5000), prefix=st.binary(max_size=5000),
    rev=st.integers(min_value=-(2**70), max_value=2**70),
)
@settings(max_examples=300, deadline=None)
def test_any_create_fields_give_a_spec_or_a_definite_error(key: bytes, end: bytes, prefix: bytes, rev: int) -> None:
    try:
        spec = WatchSpec.make(key, end, prefix, rev)
    except errors.KVError as err:
        assert not err.indeterminate
        return
    assert 0 <= spec.start_revision <= mvcc.REVISION_MAX
    assert spec.end is None or spec.start < spec.end
    assert len(spec.start) <= 4096


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.integers(min_value=-3, max_value=40), st.integers(min_value=0, max_value=2**63),
                  st.sampled_from([(1,), (2,), (1, 2), (1, 2, 9)])),
        st.tuples(st.just("cancel"), st.integers(min_value=-3, max_value=40)),
        st.tuples(st.just("progress")),
        st.tuples(st.just("progress_to"), st.integers(min_value=0, max_value=2**40)),
        st.tuples(st.just("partial"), st.integers(min_value=0, max_value=40), st.sampled_from([(1,), (2,)])),
        st.tuples(st.just("put"), st.sampled_from([1, 2])),
        st.tuples(st.just("take")),
    ),
    max_size=60,
)


@given(actions=ACTIONS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_request_sequences_keep_the_bounds_and_answer_every_create(actions: list[tuple]) -> None:  # type: ignore[type-arg]
    c = Cluster(groups=(1, 2))
    lim = WatchLimits(watchers_per_stream=8, watchers_per_node=12, stream_bytes=3000, reply_bytes=400)
    hub = c.hub(lim)
    s, other = hub.open(), hub.open()
    other.create(WatchSpec.make(b"k", b"\0"), (1, 2), 1)
    creates = 0
    got: list[Reply] = []
    for a in actions:
        if a[0] == "create":
            creates += 1
            s.create(WatchSpec.make(b"k", b"\0", start_revision=min(a[2], mvcc.REVISION_MAX)), a[3], a[1])
        elif a[0] == "cancel":
            s.cancel(a[1])
        elif a[0] == "progress":
            s.progress()
        elif a[0] == "progress_to":  # (the adapter bounds it by the clock; the hub must cope anyway)
            s.progress(c.clock + a[1])
        elif a[0] == "partial":
            creates += 1
            s.create(WatchSpec.make(b"", prefix=b"k"), a[2], a[1], partial=True)
        elif a[0] == "put":
            c.put(a[1], b"k1", b"v" * 50)
            hub.applied([a[1]])
        else:
            got += s.take(3)
        hub.step(0.0)
        _close_as_asked(c, hub)
        assert len(s.watchers) <= lim.watchers_per_stream and hub.count <= lim.watchers_per_node
        assert s.bytes == sum(r.size for r, _ in s.outbox)
    for _ in range(3):  # the closes asked for land (starts now get their created reply)
        got += drain(hub, s)
        _close_as_asked(c, hub)
    got += drain(hub, s)
    # every create is answered exactly once: created, or refused (definite)
    refused = [r for r in got if r.canceled and r.error is not None and "no watch" not in r.error.message]
    assert len([r for r in got if r.created]) + len(refused) == creates
    for r in got:
        if r.error is not None:
            assert not r.error.indeterminate
    # the other stream's watcher is unharmed
    assert 1 in other.watchers


def _close_as_asked(c: Cluster, hub: WatchHub) -> None:
    """What the node's closer does with the hub's wants: CLOSE entries, applied."""
    for g, rev in sorted(hub.close_wants().items()):
        c.apply(g, [commands.encode_close(rev)])
        hub.applied([g])


def test_thousands_of_creates_on_one_stream_are_bounded() -> None:
    c = Cluster(groups=(1,))
    hub = c.hub(WatchLimits(watchers_per_stream=100))
    s = hub.open()
    for _ in range(5000):
        if s.busy:
            hub.step(0.0)
            s.take(10_000)
        s.create(WatchSpec.make(b"k"), (1,), 0)
    hub.step(0.0)
    got = s.take(100_000)
    assert hub.count == 100 == len(s.watchers)
    assert sum(1 for r in got if r.canceled and isinstance(r.error, errors.ResourceExhausted)) > 0


@pytest.mark.parametrize("bad", [b"", b"a" * 5000])
def test_bad_keys_are_refused(bad: bytes) -> None:
    with pytest.raises(errors.KVError):
        WatchSpec.make(bad)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.lists(st.integers(1, 30), max_size=20, unique=True))
def test_named_groups_are_checked_totally(asked: list[int], allowed: list[int]) -> None:
    from kvstore.node.watchspec import check_groups

    try:
        got = check_groups(asked, sorted(allowed))
    except errors.InvalidArgument as err:
        assert not err.indeterminate
        assert len(set(asked)) != len(asked) or not set(asked) <= set(allowed)
    else:
        assert got == sorted(asked) and set(got) <= set(allowed) and len(set(asked)) == len(asked)


def test_a_quiet_partial_watch_with_progress_names_its_groups_for_the_periodic_closer() -> None:
    c = Cluster(groups=(1, 2))
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"k", progress_notify=True), (1,), watch_id=1)  # a key watch: never
    s.create(WatchSpec.make(b"", prefix=b"p", progress_notify=True, start_revision=2), (2,), watch_id=2,
             partial=True)
    drain(hub, s, now=0.0)
    assert hub.lagging_groups(0.01, progress_only=True) == {}  # not quiet yet
    last2 = c.store.revisions.rev_state(2).last
    assert hub.lagging_groups(1.0, progress_only=True) == {2: last2}  # closed at the clock's now by the node
