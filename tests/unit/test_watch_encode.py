"""The watch adapter's encoding (`kvstore/server/watch_encode.py`): replies to serialized
`WatchResponse`s, one serialization of a shared event batch for every stream, and consecutive
event replies of one watch merged into one response. Checked by decoding what goes on the wire:
per watch, the same events in the same order, each revision's events in one response, the last
revision said, and every reply that is more than events (created, canceled, error) sent as is."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.watchspec import Reply
from kvstore.server.watch_encode import WatchEncoder
from kvstore.storage import mvcc
from kvstore.storage.changefeed import DELETE, PUT, Change
from kvstore.v1 import kv_pb2


def encoder() -> WatchEncoder:
    return WatchEncoder(7, errors.to_proto)


def change(rev: int, i: int, delete: bool, prev: bool) -> Change:
    key = f"k/{i}".encode()
    if delete:
        return Change(rev, key, DELETE, None, 0, 0)
    p = mvcc.Version(f"old{i}".encode(), mvcc.KeyMeta(rev - 1, rev - 1, 1)) if prev else None
    return Change(rev, key, PUT, f"v{rev}".encode(), rev, 2, p)


@st.composite
def reply_lists(draw: st.DrawFn) -> list[Reply]:
    """Replies of up to 3 watches interleaved, each watch's revisions increasing; some event
    batches shared by several watches (the hub hands one list to many)."""
    out: list[Reply] = []
    rev = {1: 100, 2: 100, 3: 100}
    shared: list[Change] | None = None
    for kind, wid, n, flags in draw(st.lists(st.tuples(
            st.sampled_from(["events", "events", "events", "shared", "progress", "created", "canceled"]),
            st.integers(1, 3), st.integers(1, 4), st.integers(0, 7)), min_size=1, max_size=30)):
        if kind == "created":
            out.append(Reply(wid, revision=rev[wid], created=True))
        elif kind == "canceled":
            err = errors.ResourceExhausted("slow")
            out.append(Reply(wid, revision=rev[wid], canceled=True, cancel_reason=err.message, error=err,
                             resume_revision=rev[wid] + 1))
        elif kind == "progress":
            out.append(Reply(wid, revision=rev[wid]))
        else:
            if kind == "shared" and shared is not None and shared[0].revision > rev[wid]:
                evs = shared
            else:
                evs = []
                for j in range(n):
                    r = rev[wid] + 1 + j // 2  # two changes per revision at times
                    evs.append(change(r, j, bool(flags & 1) and j % 2 == 1, bool(flags & 2)))
                shared = evs
            rev[wid] = evs[-1].revision
            out.append(Reply(wid, revision=rev[wid], events=evs, size=64 + sum(c.size() for c in evs)))
    return out


def ev_tuple(e: kv_pb2.Event) -> tuple:  # type: ignore[type-arg]
    return (e.type, e.kv.key, e.kv.value, e.kv.mod_revision, e.kv.create_revision, e.kv.version,
            e.prev_kv.value if e.HasField("prev_kv") else None)


def ch_tuple(c: Change) -> tuple:  # type: ignore[type-arg]
    put = c.kind == PUT
    return (kv_pb2.Event.PUT if put else kv_pb2.Event.DELETE, c.key, c.value or b"", c.revision,
            c.create_revision if put else 0, c.version if put else 0,
            c.prev.value if c.prev is not None and c.prev.value is not None else None)


@settings(max_examples=100, deadline=None)
@given(reply_lists(), st.sampled_from([200, 1 << 20]))
def test_encoded_responses_carry_every_event_once_in_order_and_every_control_reply(
        replies: list[Reply], max_merge: int) -> None:
    enc = encoder()
    resps = [kv_pb2.WatchResponse.FromString(b) for b in enc.encode_all(replies, max_merge)]
    assert len(resps) <= len(replies)
    assert all(r.node_id == 7 for r in resps)
    for wid in (1, 2, 3):
        mine = [r for r in replies if r.watch_id == wid]
        got = [r for r in resps if r.watch_id == wid]
        assert [ev_tuple(e) for r in got for e in r.events] == [ch_tuple(c) for r in mine for c in r.events]
        assert [r.revision for r in got][-1:] == [r.revision for r in mine][-1:]
        assert [r.revision for r in got] == sorted(r.revision for r in got)
        assert {r.revision for r in got} <= {r.revision for r in mine}
        # control replies go out as they are
        ctl = [(r.created, r.canceled, r.cancel_reason, r.resume_revision, r.revision) for r in mine
               if r.created or r.canceled]
        assert [(r.created, r.canceled, r.cancel_reason, r.resume_revision, r.revision) for r in got
                if r.created or r.canceled] == ctl
        assert all(r.error.code for r in got if r.canceled)
        seen: set[int] = set()
        for r in got:  # a revision's events never split over responses
            revs = {e.kv.mod_revision for e in r.events}
            assert not revs & seen
            seen |= revs
            if r.events:
                assert r.revision == r.events[-1].kv.mod_revision


def test_a_backlog_of_event_replies_of_one_watch_goes_out_as_one_response_within_the_size_bound() -> None:
    enc = encoder()
    replies = [Reply(1, revision=r, events=[change(r, 0, False, False)], size=200) for r in range(10, 20)]
    [one] = enc.encode_all(replies, 1 << 20)
    resp = kv_pb2.WatchResponse.FromString(one)
    assert resp.revision == 19 and [e.kv.mod_revision for e in resp.events] == list(range(10, 20))
    parts = [kv_pb2.WatchResponse.FromString(b) for b in enc.encode_all(replies, 450)]
    assert [len(p.events) for p in parts] == [2, 2, 2, 2, 2] and [p.revision for p in parts] == [11, 13, 15, 17, 19]


def test_a_shared_batch_is_serialized_once() -> None:
    enc = encoder()
    evs = [change(5, 0, False, True), change(5, 1, True, False)]
    calls = 0
    real = enc._add_events

    def counting(resp: kv_pb2.WatchResponse, events: list[Change]) -> None:
        nonlocal calls
        calls += 1
        real(resp, events)

    enc._add_events = counting  # type: ignore[method-assign]
    out = [enc.encode(Reply(w, revision=5, events=evs, size=300)) for w in range(1, 101)]
    assert calls == 1
    decoded = [kv_pb2.WatchResponse.FromString(b) for b in out]
    assert [d.watch_id for d in decoded] == list(range(1, 101))
    assert all([ev_tuple(e) for e in d.events] == [ch_tuple(c) for c in evs] and d.revision == 5 for d in decoded)
