"""The watch hub's per-cycle indexing (`kvstore/node/watch.py`: cohorts, watchers behind, the
progress heap, the full-stream set, per-set aggregates) against a simple model, and the work a
step does: it visits only the watchers that can move.

The model is the watch contract itself, evaluated on the complete history of writes: for every
reply a watcher's stream handed out with revision R, the events that watcher received so far
are exactly the writes matching it with revision in [start, R], in revision order, each once,
every revision's events in one reply; a canceled watch with a resume revision has received
exactly those below it; and once every group is closed past the last write, every watch still
open is told so. Groups are the real in-memory store with the real apply (`test_watch_hub`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_watch_hub import Cluster

from kvstore import errors
from kvstore.node.watch import WatchLimits, WatchStream
from kvstore.node.watchspec import Reply, WatchSpec
from kvstore.storage import commands
from kvstore.storage.changefeed import PUT

KEYS = [f"k/{i}".encode() for i in range(6)] + [b"o/x"]
GROUPS = (1, 2, 3)


def group_of(key: bytes) -> int:
    """Each key is written to one group (the hub only needs to know which groups a watch covers)."""
    return GROUPS[KEYS.index(key) % len(GROUPS)]


@dataclass
class Write:
    revision: int
    key: bytes
    kind: int
    value: bytes | None
    prev: bytes | None


@dataclass
class Watch:
    spec: WatchSpec
    groups: tuple[int, ...]
    start: int = 0
    replies: list[Reply] = field(default_factory=list)
    ended: bool = False
    cancel_asked: bool = False


def matching(history: list[Write], spec: WatchSpec, lo: int, hi: int) -> list[tuple[int, bytes, int, bytes | None, bytes | None]]:
    return [(w.revision, w.key, w.kind, w.value, w.prev if spec.prev_kv else None) for w in history
            if lo <= w.revision <= hi and spec.matches(w.key)
            and not (spec.no_put if w.kind == PUT else spec.no_delete)]


def check_against_model(history: list[Write], w: Watch) -> None:
    history = sorted(history, key=lambda x: x.revision)
    got: list[tuple[int, bytes, int, bytes | None, bytes | None]] = []
    seen_revs: set[int] = set()
    for r in w.replies:
        revs = {c.revision for c in r.events}
        assert not revs & seen_revs, "a revision split over replies, or repeated"
        seen_revs |= revs
        got += [(c.revision, c.key, c.kind, c.value, None if c.prev is None else c.prev.value) for c in r.events]
        if r.created:
            assert not w.start
            w.start = r.revision + 1
            assert not w.spec.start_revision or w.start == w.spec.start_revision
            continue
        if not w.start:  # its created reply was dropped with the rest by a slow-watcher cancel
            if r.canceled and not r.resume_revision and not r.events:
                continue  # canceled while a start "now" waited for its groups: nothing promised
            assert r.canceled and r.resume_revision, r
            w.start = w.spec.start_revision or r.resume_revision
        if r.canceled and r.resume_revision:
            assert r.revision == r.resume_revision - 1
        if r.canceled and not r.resume_revision:
            continue  # not resumable (compaction): it promises nothing more
        assert got == matching(history, w.spec, w.start, r.revision), (r, got)


WATCH_SPECS = st.one_of(
    st.builds(lambda p, prev, np, nd: (WatchSpec.make(b"", prefix=p, prev_kv=prev, no_put=np, no_delete=nd), GROUPS),
              st.sampled_from([b"k/", b"o/", b"k/1"]), st.booleans(), st.booleans(), st.booleans()),
    st.builds(lambda k, prev: (WatchSpec.make(k, prev_kv=prev), (group_of(k),)),
              st.sampled_from(KEYS), st.booleans()),
)

OPS = st.lists(st.one_of(
    st.tuples(st.just("create"), st.integers(0, 2), WATCH_SPECS, st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 2), st.integers(1, 12)),
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(0, 400)),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("close"), st.sampled_from(GROUPS)),
    st.tuples(st.just("take"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("step"), st.floats(0.0, 3.0)),
    st.tuples(st.just("progress"), st.integers(0, 2)),
), min_size=10, max_size=80)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_every_watcher_gets_exactly_the_model_events_under_random_creates_cancels_applies_closes_and_slow_streams(
        ops: list[tuple]) -> None:  # type: ignore[type-arg]
    c = Cluster()
    hub = c.hub(WatchLimits(stream_bytes=1500, node_bytes=1 << 30, reply_bytes=400, read_events=4,
                            step_events=10, slow_after=4.0, progress_interval=1.0))
    streams: list[WatchStream] = [hub.open() for _ in range(3)]
    watches: dict[tuple[int, int], Watch] = {}
    next_id = [1, 1, 1]
    history: list[Write] = []
    values: dict[bytes, bytes] = {}
    now = 0.0

    def take(i: int, n: int) -> int:
        got = streams[i].take(n)
        for r in got:
            w = watches[(i, r.watch_id)]
            if w.ended and w.cancel_asked and r.canceled and isinstance(r.error, errors.InvalidArgument):
                continue  # the answer to a cancel that crossed the server's own cancel: no such watch
            assert not w.ended, "a reply after the watch ended"
            w.replies.append(r)
            if r.canceled:
                w.ended = True
        return len(got)

    for op in ops:
        kind = op[0]
        if kind == "create":
            _, i, (spec, groups), explicit = op
            if explicit and history:
                spec = WatchSpec.make(spec.start, spec.end if spec.end is not None else b"\0",
                                      start_revision=history[len(history) // 2].revision, prev_kv=spec.prev_kv,
                                      no_put=spec.no_put, no_delete=spec.no_delete)
            wid = next_id[i]
            next_id[i] += 1
            watches[(i, wid)] = Watch(spec, groups)
            streams[i].create(spec, groups, wid)
        elif kind == "cancel":
            _, i, wid = op
            w = watches.get((i, wid))
            if w is not None and not w.ended and not w.cancel_asked:  # (a second one is refused: no such watch)
                w.cancel_asked = True
                streams[i].cancel(wid)
        elif kind == "put":
            key, v = op[1], str(op[2]).encode()
            rev = c.put(group_of(key), key, v)
            history.append(Write(rev, key, PUT, v, values.get(key)))
            values[key] = v
            hub.applied([group_of(key)])
        elif kind == "delete":
            key = op[1]
            rev = c.delete(group_of(key), key)
            if rev:
                history.append(Write(rev, key, 2, None, values.pop(key, None)))
            hub.applied([group_of(key)])
        elif kind == "close":
            c.apply(op[1], [commands.encode_close(c.tick())])
            hub.applied([op[1]])
        elif kind == "take":
            take(op[1], op[2])
        elif kind == "step":
            now += op[1]
            hub.step(now)
        else:
            streams[op[1]].progress()
    # the end: every group closed past every write, every stream drained
    top = c.tick()
    for g in GROUPS:
        c.apply(g, [commands.encode_close(top)])
    hub.applied(GROUPS)
    for ask in (False, True):  # then a progress request: every open watch says where it is
        if ask:
            for s in streams:
                s.progress()
        for _ in range(400):  # as the server: a step again after replies were taken (a full stream drained)
            more = hub.step(now)
            taken = sum(take(i, 1 << 20) for i in range(3))
            if not more and not taken and not any(s.requests for s in streams):
                break
        assert not any(s.outbox for s in streams)
    for (i, wid), w in watches.items():
        assert w.replies, f"watch {i}/{wid} was never answered"
        check_against_model(history, w)
        if not w.ended:
            assert w.replies[-1].revision >= top, "an open watch is not past the closed groups"
            assert streams[i].watchers[wid].next_rev == w.replies[-1].revision + 1
    assert hub.count == sum(len(s.watchers) for s in streams)
    for s in streams:
        s.close()
    assert hub.count == 0 and hub.pending_bytes == 0 and not hub.watching and not hub._cohorts
    assert not hub._behind and not hub._sets and not hub._psets and not hub._full


def test_a_step_after_an_apply_visits_only_the_watchers_that_get_events() -> None:
    c = Cluster()
    hub = c.hub()
    s = hub.open()
    keys1 = [f"a/{i}".encode() for i in range(200)]
    keys2 = [f"b/{i}".encode() for i in range(200)]
    for k in keys1:
        s.create(WatchSpec.make(k), (1,))
    for k in keys2:
        s.create(WatchSpec.make(k), (2,))
    for _ in range(300):  # 300 watches of a prefix over every group that sees none of these puts
        s.create(WatchSpec.make(b"", prefix=b"other/"), GROUPS)
    hub.step(0.0)
    s.take(1 << 20)
    assert len(s.watchers) == 700 and not hub._behind  # all caught up: in cohorts
    before = hub.visits
    for _ in range(5):  # idle steps visit nobody
        hub.step(0.5)
    assert hub.visits == before
    r = c.put(1, keys1[7], b"v")
    hub.applied([1])
    hub.step(1.0)
    got = s.take(1 << 20)
    assert [(x.revision, [e.key for e in x.events]) for x in got] == [(r, [keys1[7]])]
    assert hub.visits - before == 1  # the one watcher of that key, not the 699 others
    # a put every prefix watcher takes: each of them is visited once (it gets a reply)
    for g in GROUPS:
        c.apply(g, [commands.encode_close(c.tick())])
    hub.applied(GROUPS)
    hub.step(1.5)
    s.take(1 << 20)
    before = hub.visits
    rp = c.put(3, b"other/x", b"1")
    for g in (1, 2):
        c.apply(g, [commands.encode_close(rp)])
    hub.applied(GROUPS)
    hub.step(2.0)
    got = s.take(1 << 20)
    assert len(got) == 300 and {x.revision for x in got} == {rp}
    assert hub.visits - before == 300


def test_a_watcher_whose_stream_is_full_leaves_its_cohort_and_catches_up_from_history() -> None:
    c = Cluster(groups=(1,))
    hub = c.hub(WatchLimits(stream_bytes=1200, node_bytes=1 << 30, reply_bytes=300, slow_after=100.0))
    slow, fast = hub.open(), hub.open()
    slow.create(WatchSpec.make(b"k/", b"k0"), (1,), 1)
    fast.create(WatchSpec.make(b"k/", b"k0"), (1,), 1)
    hub.step(0.0)
    slow.take()
    fast.take()
    assert not hub._behind and len(hub._cohorts) == 1
    revs = []
    got_fast: list[Reply] = []
    for i in range(30):
        revs.append(c.put(1, f"k/{i}".encode(), b"x" * 100))
        hub.applied([1])
        hub.step(float(i))
        got_fast += fast.take(1 << 20)
    assert slow.bytes >= 1200 and len(hub._behind) == 1  # the slow one was left behind, bounded
    assert [e.revision for r in got_fast for e in r.events] == revs
    got_slow: list[Reply] = []
    for i in range(200):
        hub.step(30.0 + i)
        got_slow += slow.take(2)
        if not hub._behind and not slow.outbox:
            break
    assert [e.revision for r in got_slow for e in r.events] == revs  # nothing missed or repeated
    assert not hub._behind and len(hub._cohorts) == 1 and hub._cohorts[((1,), False)].size == 2


def test_lagging_groups_count_only_progress_watches_when_asked() -> None:
    c = Cluster()
    hub = c.hub()
    s = hub.open()
    s.create(WatchSpec.make(b"", prefix=b"p/"), GROUPS, 1)
    s.create(WatchSpec.make(b"", prefix=b"q/", progress_notify=True), (1, 2), 2)
    hub.step(0.0)
    r = c.put(3, b"x", b"1")
    hub.applied([3])
    hub.step(0.0)
    assert hub.lagging_groups(10.0) == {1: r, 2: r}
    assert hub.lagging_groups(10.0, progress_only=True) == {}
    r2 = c.put(2, b"y", b"1")
    hub.applied([2])
    hub.step(0.0)
    assert hub.lagging_groups(10.0, progress_only=True) == {1: r2}
    s.cancel(2)
    hub.step(0.0)
    assert hub.lagging_groups(10.0, progress_only=True) == {}
