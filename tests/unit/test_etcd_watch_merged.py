"""etcd watches over groups the serving node does not host (`kvstore/server/etcd/watchmerged.py`):
`MergedWatches` run over in-memory sub-streams (`_Nodes`: each node serves its groups of one
shared log as a node's hub would), with the real merge loop (`kvstore.client.watchrun`) and
`Merge`; the cover and the Forwarder's TLS rule; the classification of a sub's cancel."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from cancelcheck import assert_cancels_kept, cancel_as_it_arrives
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.client.watchrun import Requests
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.security.identity import ANONYMOUS, Principal, PrincipalKind, set_identity
from kvstore.server.etcd.forward import Forwarder
from kvstore.server.etcd.status import COMPACTED
from kvstore.server.etcd.watchmerged import (
    MAX_PER_STREAM,
    Budget,
    Definite,
    MergedWatches,
    Restart,
    canceled_by,
    plan_cover,
)
from kvstore.v1 import kv_pb2

ME = 1
MEMBERS = {1: {1, 2}, 2: {2, 3}, 3: {3}}
"""group -> its nodes; this node (1) hosts group 1 only."""


class _Nodes:
    """In-memory sub-streams over one log of (revision, group, key, value): a node's stream is
    created at start - 1 (start 0: the log's top), then answers each append with the events of
    its groups up to the top (its revision the top). `down` nodes fail (`Restart`), a node in
    `compacted` cancels its sub as compacted."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int, bytes, bytes]] = []
        self.changed = asyncio.Condition()
        self.opened: list[tuple[int, tuple[int, ...], int]] = []
        self.closed: list[int] = []
        self.down: set[int] = set()
        self.compacted: dict[int, int] = {}
        self.ends: tuple[type[BaseException], ...] = (Restart, Definite)

    async def put(self, rev: int, group: int, key: bytes, value: bytes = b"v") -> None:
        async with self.changed:
            self.log.append((rev, group, key, value))
            self.changed.notify_all()

    async def fail(self, node: int) -> None:
        async with self.changed:
            self.down.add(node)
            self.changed.notify_all()

    def top(self) -> int:
        return self.log[-1][0] if self.log else 0

    async def stream(self, node: int, create: kv_pb2.WatchCreateRequest, extra: Requests
                     ) -> AsyncIterator[kv_pb2.WatchResponse]:
        self.opened.append((node, tuple(create.groups), create.start_revision))
        try:
            if node in self.down:
                raise Restart(node, "down")
            pos = create.start_revision - 1 if create.start_revision else self.top()
            yield kv_pb2.WatchResponse(watch_id=1, created=True, revision=pos)
            if node in self.compacted:
                yield kv_pb2.WatchResponse(watch_id=1, canceled=True, compact_revision=self.compacted[node],
                                           error=kv_pb2.Error(code=kv_pb2.COMPACTED, message="compacted"))
            while True:
                async with self.changed:
                    await self.changed.wait_for(lambda p=pos: self.top() > p or node in self.down)
                if node in self.down:
                    raise Restart(node, "down")
                top = self.top()
                evs = [kv_pb2.Event(kv=kv_pb2.KeyValue(key=k, value=v, mod_revision=r))
                       for r, g, k, v in self.log if pos < r <= top and g in create.groups]
                yield kv_pb2.WatchResponse(watch_id=1, revision=top, events=evs)
                pos = top
        finally:
            self.closed.append(node)

    def canceled(self, resp: kv_pb2.WatchResponse, node: int) -> BaseException:
        return canceled_by(resp, node)

    def failed(self, node: int, message: str, breach: bool) -> BaseException:
        return Restart(node, message)


def _planner(nodes: _Nodes, remote_ok: bool = True) -> Callable[
        [kv_pb2.WatchCreateRequest, list[int]], tuple[list[tuple[int, tuple[int, ...]]], int] | str | None]:
    def plan(c: kv_pb2.WatchCreateRequest, failed: list[int]) -> tuple[list[tuple[int, tuple[int, ...]]], int] | str | None:
        p = plan_cover(sorted(MEMBERS), MEMBERS, ME, {1}, {1, 2, 3}, failed, remote_ok)
        return (p, 7) if isinstance(p, list) else p
    return plan


def _setup(nodes: _Nodes, budget: Budget | None = None, remote_ok: bool = True
           ) -> tuple[MergedWatches, asyncio.Queue[rpc_pb2.WatchResponse]]:
    out: asyncio.Queue[rpc_pb2.WatchResponse] = asyncio.Queue()

    async def emit(r: rpc_pb2.WatchResponse, fragment: bool) -> None:
        await out.put(r)

    mw = MergedWatches(_planner(nodes, remote_ok), nodes, emit, lambda rev: rpc_pb2.ResponseHeader(revision=rev),
                       budget or Budget(), random.Random(1), catch_up=0.05)
    return mw, out


def _create(start: int = 1) -> kv_pb2.WatchCreateRequest:
    return kv_pb2.WatchCreateRequest(key=b"a", range_end=b"b", start_revision=start, watch_id=1)


async def _until(out: asyncio.Queue[rpc_pb2.WatchResponse], done: Callable[[list[rpc_pb2.WatchResponse]], bool]
                 ) -> list[rpc_pb2.WatchResponse]:
    got: list[rpc_pb2.WatchResponse] = []
    while not done(got):
        got.append(await asyncio.wait_for(out.get(), 10))
    return got


def _revs(got: list[rpc_pb2.WatchResponse]) -> list[int]:
    return [e.kv.mod_revision for r in got for e in r.events]


def _run(main: Callable[[], Awaitable[None]]) -> None:
    async def checked() -> None:
        await main()
        me = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not me] == []  # nothing left running

    asyncio.run(checked())


def test_events_in_order_once_then_progress_and_cancel() -> None:
    async def main() -> None:
        nodes = _Nodes()
        mw, out = _setup(nodes)
        await (await mw.start(5, _create(), False)).wait()
        for rev, g in [(1, 3), (2, 1), (3, 2), (4, 3), (5, 1), (6, 2)]:
            await nodes.put(rev, g, b"a%d" % rev)
        got = await _until(out, lambda got: 6 in _revs(got))
        assert got[0].created and got[0].watch_id == 5 and not got[0].events
        assert _revs(got) == [1, 2, 3, 4, 5, 6] and all(r.watch_id == 5 and not r.canceled for r in got)
        assert {n for n, _, _ in nodes.opened} == {2, 3}  # node 2 has groups 1 and 2, node 3 group 3
        await mw.progress()
        (p,) = await _until(out, lambda got: any(not r.events for r in got))
        assert p.watch_id == 5 and p.header.revision >= 6 and not p.created and not p.canceled
        await mw.cancel(5)
        last = await _until(out, lambda got: any(r.canceled for r in got))
        assert last[-1].canceled and last[-1].watch_id == 5 and 6 not in _revs(last)
        assert 5 not in mw and mw.budget.running == 0
        assert sorted(nodes.closed) == sorted(n for n, _, _ in nodes.opened)
    _run(main)


def test_a_failed_sub_restarts_from_the_last_delivered_revision_avoiding_the_node() -> None:
    async def main() -> None:
        nodes = _Nodes()
        mw, out = _setup(nodes)
        await (await mw.start(0, _create(), False)).wait()
        for rev, g in [(1, 1), (2, 2), (3, 3)]:
            await nodes.put(rev, g, b"a%d" % rev)
        got = await _until(out, lambda got: 3 in _revs(got))
        opened = len(nodes.opened)
        await nodes.fail(2)
        for rev, g in [(4, 2), (5, 1), (6, 3)]:
            await nodes.put(rev, g, b"a%d" % rev)
        got += await _until(out, lambda more: 6 in _revs(more))
        assert _revs(got) == [1, 2, 3, 4, 5, 6]  # nothing missed, nothing repeated
        assert not any(r.canceled for r in got) and [r.created for r in got].count(True) == 1
        again = nodes.opened[opened:]
        assert again and all(n != 2 and start == 4 for n, _, start in again)  # elsewhere, from the last delivered + 1
        assert {g for n, gs, _ in again for g in gs} == {1, 2, 3} and mw.restarts >= 1
        await mw.close()
        assert mw.budget.running == 0
    _run(main)


def test_a_compacted_sub_cancels_the_etcd_watch_with_etcds_reason() -> None:
    async def main() -> None:
        nodes = _Nodes()
        nodes.compacted[3] = 9
        mw, out = _setup(nodes)
        await (await mw.start(2, _create(), False)).wait()
        got = await _until(out, lambda got: any(r.canceled for r in got))
        assert [(r.created, r.canceled) for r in got] == [(True, False), (False, True)]
        assert got[1].cancel_reason == COMPACTED and got[1].compact_revision == 9 and got[1].watch_id == 2
        assert 2 not in mw and mw.budget.running == 0
    _run(main)


def test_without_a_token_on_tls_the_watch_is_canceled_with_the_reason() -> None:
    async def main() -> None:
        nodes = _Nodes()
        mw, out = _setup(nodes, remote_ok=False)
        await (await mw.start(0, _create(), False)).wait()
        got = await _until(out, lambda got: any(r.canceled for r in got))
        assert got[0].created and got[1].canceled
        assert "group(s) 2, 3" in got[1].cancel_reason and "token" in got[1].cancel_reason
        assert nodes.opened == []  # nothing reached another node
    _run(main)


def test_the_cover_puts_this_node_first_avoids_failed_nodes_and_keeps_the_tls_rule() -> None:
    assert plan_cover([1], MEMBERS, ME, {1}, {1, 2, 3}, [], False) == [(1, (1,))]  # all hosted: local
    refused = plan_cover([1, 2], MEMBERS, ME, {1}, {1, 2, 3}, [], False)
    assert isinstance(refused, str) and "group(s) 2" in refused and "token" in refused
    assert plan_cover([1, 3], MEMBERS, ME, {1}, {1, 2, 3}, [], True) == [(1, (1,)), (3, (3,))]
    assert plan_cover([1, 2, 3], MEMBERS, ME, {1}, {1, 2, 3}, [2], True) == [(1, (1,)), (3, (2, 3))]
    assert plan_cover([1, 2, 3], MEMBERS, ME, {1}, {1, 2, 3}, [2, 3], True) == [(2, (1, 2)), (3, (3,))]
    assert plan_cover([1, 2, 3], MEMBERS, ME, {1}, {1, 2}, [], True) is None  # group 3: no address


class _Ctx:
    def __init__(self, md: tuple[tuple[str, str], ...]) -> None:
        self.md = md

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.md


class _Caller:
    def __init__(self, credentials: object | None) -> None:
        self.credentials = credentials


def test_the_forwarders_rule_other_nodes_only_with_the_callers_token_on_tls() -> None:
    def may(caller: Any, md: tuple[tuple[str, str], ...]) -> bool:
        return Forwarder(kv=None, caller=caller, timeout=1.0).may_forward(_Ctx(md))  # type: ignore[arg-type]

    assert not may(None, (("token", "t"),))  # no peers
    assert may(_Caller(None), ())  # no TLS
    assert not may(_Caller(object()), ())  # TLS, no token: never this node's identity
    # a token this node did not authenticate the caller by (auth disabled): never sent on
    assert not may(_Caller(object()), (("token", "t"),))
    set_identity(Principal(PrincipalKind.USER, "u", "token"))
    try:
        assert may(_Caller(object()), (("token", "t"),))
        assert may(_Caller(object()), (("authorization", "Bearer t"),))
    finally:
        set_identity(ANONYMOUS)


def test_merged_watches_are_bounded_per_stream_and_per_node() -> None:
    async def main() -> None:
        nodes = _Nodes()
        mw, out = _setup(nodes)
        for wid in range(MAX_PER_STREAM):
            await (await mw.start(wid, _create(), False)).wait()
        await (await mw.start(99, _create(), False)).wait()
        got = await _until(out, lambda got: any(r.canceled for r in got))
        assert got[-1].watch_id == 99 and "too many watches across nodes" in got[-1].cancel_reason
        assert len(mw.watches) == MAX_PER_STREAM and mw.budget.running == MAX_PER_STREAM
        other, out2 = _setup(nodes, Budget(limit=MAX_PER_STREAM))
        mw.budget = other.budget = Budget(limit=1, running=1)
        await (await other.start(0, _create(), False)).wait()
        got = await _until(out2, lambda got: any(r.canceled for r in got))
        assert "1 per node" in got[-1].cancel_reason
        for wid in range(100, 100 + 2 * MAX_PER_STREAM):  # refused creates are remembered boundedly
            await (await other.start(wid, _create(), False)).wait()
        assert len(other.ended) == MAX_PER_STREAM and max(other.ended) == 99 + 2 * MAX_PER_STREAM
        mw.budget.running = MAX_PER_STREAM
        await mw.close()
        assert mw.watches == {} and mw.budget.running == 0
        assert sorted(nodes.closed) == sorted(n for n, _, _ in nodes.opened)
    _run(main)


def test_the_end_of_the_stream_cancels_every_task() -> None:
    async def main() -> None:
        nodes = _Nodes()
        mw, out = _setup(nodes)
        for wid in range(3):
            await (await mw.start(wid, _create(), False)).wait()
        await nodes.put(1, 2, b"a")
        await _until(out, lambda got: len(_revs(got)) == 3)
        assert len(asyncio.all_tasks()) > 1
        await mw.close()  # _run then checks that no task is left
        assert sorted(nodes.closed) == sorted(n for n, _, _ in nodes.opened) and len(nodes.opened) == 6
    _run(main)


_CODES = list(kv_pb2.ErrorCode.values())


@settings(max_examples=150, deadline=None)
@given(code=st.sampled_from(_CODES), message=st.text(max_size=40), compact=st.integers(0, 2**63 - 1),
       resume=st.integers(0, 2**63 - 1), has_error=st.booleans(), reason=st.text(max_size=20))
def test_a_subs_cancel_is_always_a_restart_or_a_definite_reason(code: int, message: str, compact: int, resume: int,
                                                                  has_error: bool, reason: str) -> None:
    r = kv_pb2.WatchResponse(watch_id=1, canceled=True, compact_revision=compact, resume_revision=resume,
                             cancel_reason=reason)
    if has_error:
        r.error.CopyFrom(kv_pb2.Error(code=code, message=message))  # type: ignore[arg-type]
    got = canceled_by(r, 3)
    assert isinstance(got, Restart | Definite)
    if compact:
        assert isinstance(got, Definite) and got.reason == COMPACTED and got.compact_revision == compact
    if isinstance(got, Definite):
        assert got.reason.startswith(("etcdserver: ", "kvstore: "))


def test_a_garbage_local_response_restarts_not_crashes() -> None:
    """The node's own servicer hands serialized bytes: garbage is a sub failure (a restart)."""
    from kvstore.server.etcd.watchmerged import PeerSubs

    class _Local:
        async def Watch(self, requests: AsyncIterator[kv_pb2.WatchRequest], context: object) -> AsyncIterator[bytes]:
            yield b"\xff\xff\xff"

    async def main() -> None:
        subs = PeerSubs(ME, _Local(), None, None, lambda _: "", ())  # type: ignore[arg-type]
        q: Requests = asyncio.Queue()
        with pytest.raises(DecodeError):  # merged_watch makes it `subs.failed`: a restart
            async for _ in subs.stream(ME, _create(), q):
                pass
        assert isinstance(subs.failed(ME, "garbage", False), Restart)
    asyncio.run(main())


def test_progress_notify_sends_progress_for_a_quiet_watch_and_only_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A revision with no event of the range (here: of a group no sub watches) moves the merged
    revision: with progress_notify a progress response at it (the interval set to 0 here: the
    hub's 1 s otherwise), without, nothing until the next event."""
    import kvstore.server.etcd.watchmerged as wm

    monkeypatch.setattr(wm, "PROGRESS_INTERVAL", 0.0)

    async def main() -> None:
        nodes = _Nodes()
        mw, out = _setup(nodes)
        quiet = _create()
        quiet.progress_notify = True
        await (await mw.start(0, quiet, False)).wait()
        await (await mw.start(1, _create(), False)).wait()
        await nodes.put(1, 9, b"elsewhere")
        got = await _until(out, lambda got: any(r.watch_id == 0 and not r.created for r in got))
        await nodes.put(2, 1, b"a2")
        got += await _until(out, lambda more: sum(2 in _revs([r]) for r in more) == 2)
        by: dict[int, list[rpc_pb2.WatchResponse]] = {0: [], 1: []}
        for r in got:
            by[r.watch_id].append(r)
        assert [(r.created, r.header.revision, _revs([r])) for r in by[0]] == [
            (True, 0, []), (False, 1, []), (False, 2, [2])]
        assert [(r.created, _revs([r])) for r in by[1]] == [(True, []), (False, [2])]
        await mw.close()
    _run(main)


@settings(max_examples=200, deadline=None)
@given(members=st.dictionaries(st.integers(1, 6), st.sets(st.integers(1, 5), max_size=3), min_size=1, max_size=6),
       hosted=st.sets(st.integers(1, 6), max_size=6), reachable=st.sets(st.integers(1, 5), max_size=5),
       failed=st.lists(st.integers(1, 5), max_size=4), remote_ok=st.booleans())
def test_a_cover_gives_each_group_to_one_node_hosting_it(members: dict[int, set[int]], hosted: set[int],
                                                         reachable: set[int], failed: list[int],
                                                         remote_ok: bool) -> None:
    groups = sorted(members)
    p = plan_cover(groups, members, ME, hosted, reachable, failed, remote_ok)
    if isinstance(p, str):
        assert not remote_ok and any(g not in hosted for g in groups) and "token" in p
        return
    if p is None:  # some group has no usable node
        assert remote_ok and any(not ((members[g] - {ME}) & reachable or g in hosted) for g in groups)
        return
    got = sorted(g for _, gs in p for g in gs)
    assert got == groups  # every group, once
    for node, gs in p:
        assert gs and all((g in hosted) if node == ME else (node in members[g] and node in reachable) for g in gs)
    assert remote_ok or [n for n, _ in p] == [ME]
    assert ME not in [n for n, _ in p][1:]  # this node first when it takes part


def test_a_watch_from_now_starts_above_the_subs_created_revisions() -> None:
    async def main() -> None:
        nodes = _Nodes()
        for rev, g in [(1, 1), (2, 2), (3, 3)]:
            await nodes.put(rev, g, b"old%d" % rev)
        mw, out = _setup(nodes)
        await (await mw.start(4, _create(0), False)).wait()
        for rev, g in [(4, 3), (5, 2), (6, 1)]:
            await nodes.put(rev, g, b"new%d" % rev)
        got = await _until(out, lambda got: 6 in _revs(got))
        assert got[0].created and got[0].header.revision == 3
        assert _revs(got) == [4, 5, 6]
        await mw.close()
    _run(main)


def _answered_within(ev: asyncio.Event) -> Awaitable[bool]:
    return asyncio.wait_for(ev.wait(), 5)


def test_a_create_with_no_cover_is_answered_created_and_canceled_after_the_timeout() -> None:
    """No cover (the planner finds none) never blocks the stream: created and canceled (definite)."""
    async def main() -> None:
        out: asyncio.Queue[rpc_pb2.WatchResponse] = asyncio.Queue()

        async def emit(r: rpc_pb2.WatchResponse, fragment: bool) -> None:
            await out.put(r)

        mw = MergedWatches(lambda c, failed: None, _Nodes(), emit, lambda rev: rpc_pb2.ResponseHeader(revision=rev),
                           Budget(), random.Random(1), catch_up=0.05, create_timeout=0.2)
        await _answered_within(await mw.start(3, _create(), False))
        got = await _until(out, lambda got: any(r.canceled for r in got))
        assert [(r.watch_id, r.created, r.canceled) for r in got] == [(3, True, False), (3, False, True)]
        assert got[1].cancel_reason.startswith("kvstore: ") and "not created within" in got[1].cancel_reason
        assert "no cover of its groups" in got[1].cancel_reason
        assert mw.ended[3].error is errors.Unavailable and 3 not in mw and mw.budget.running == 0
    _run(main)


def test_an_unexpected_exception_ends_the_watch_with_an_internal_error() -> None:
    def broken(c: kv_pb2.WatchCreateRequest, failed: list[int]) -> Any:
        raise RuntimeError("a bug")

    async def main() -> None:
        nodes = _Nodes()
        mw, out = _setup(nodes)
        mw.planner = broken
        await _answered_within(await mw.start(4, _create(), False))
        got = await _until(out, lambda got: any(r.canceled for r in got))
        assert got[0].created and got[1].canceled
        assert got[1].cancel_reason == "kvstore: internal error: RuntimeError: a bug"
        assert 4 not in mw and mw.budget.running == 0
    _run(main)


class _CallAborted(Exception):
    """What grpc's abort raises: the whole etcd call ends."""


class _EtcdCall:
    def __init__(self) -> None:
        self.aborted = False

    async def abort(self, code: Any, details: str = "") -> None:
        self.aborted = True
        raise _CallAborted(details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


def test_the_local_subs_abort_ends_the_merged_watch_not_the_etcd_call() -> None:
    """The KV servicer's credential recheck aborts with UNAUTHENTICATED: the merged watch is
    canceled with the reason (definite, Unauthenticated), the etcd call goes on."""
    import grpc

    from kvstore.server.etcd.watchmerged import PeerSubs

    class _Local:
        async def Watch(self, requests: AsyncIterator[kv_pb2.WatchRequest], context: Any
                        ) -> AsyncIterator[kv_pb2.WatchResponse]:
            assert context.invocation_metadata() == ()  # the call's own, otherwise
            yield kv_pb2.WatchResponse(watch_id=1, created=True, revision=0)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "KV.Watch: the token expired")

    async def main() -> None:
        call = _EtcdCall()
        out: asyncio.Queue[rpc_pb2.WatchResponse] = asyncio.Queue()

        async def emit(r: rpc_pb2.WatchResponse, fragment: bool) -> None:
            await out.put(r)

        subs = PeerSubs(ME, _Local(), call, None, lambda _: "", ())  # type: ignore[arg-type]
        mw = MergedWatches(lambda c, failed: ([(ME, (1,))], 7), subs, emit,
                           lambda rev: rpc_pb2.ResponseHeader(revision=rev), Budget(), random.Random(1),
                           catch_up=0.05)
        await _answered_within(await mw.start(0, _create(), False))
        got = await _until(out, lambda got: any(r.canceled for r in got))
        assert got[-1].canceled and "UNAUTHENTICATED" in got[-1].cancel_reason and "expired" in got[-1].cancel_reason
        assert not call.aborted and mw.restarts == 0
        err = mw.ended[0].error_of()
        assert isinstance(err, errors.Unauthenticated) and err.definite
    _run(main)


def test_a_batch_of_many_revisions_goes_out_in_responses_of_at_most_reply_bytes() -> None:
    """Split between revisions, never inside one; headers: everything at or below them was sent."""
    async def main() -> None:
        nodes = _Nodes()
        for rev, g in [(1, 1), (2, 2), (2, 2), (3, 3), (4, 1), (5, 2), (6, 3)]:
            await nodes.put(rev, g, b"x" * 200)
        out: asyncio.Queue[rpc_pb2.WatchResponse] = asyncio.Queue()

        async def emit(r: rpc_pb2.WatchResponse, fragment: bool) -> None:
            await out.put(r)

        mw = MergedWatches(_planner(nodes), nodes, emit, lambda rev: rpc_pb2.ResponseHeader(revision=rev),
                           Budget(), random.Random(1), catch_up=0.05, reply_bytes=500)
        await (await mw.start(0, _create(), False)).wait()
        got = await _until(out, lambda got: 6 in _revs(got))
        data = [r for r in got if r.events]
        assert _revs(got) == [1, 2, 2, 3, 4, 5, 6]
        assert len(data) > 1  # not one response of everything
        for r in data:
            revs = {e.kv.mod_revision for e in r.events}
            assert sum(e.ByteSize() for e in r.events) <= 500 or len(revs) == 1
            assert r.header.revision >= max(revs)
        assert sum(2 in _revs([r]) for r in data) == 1  # revision 2 whole in one response
        heads = [r.header.revision for r in data]
        assert heads == sorted(heads)
        await mw.close()
    _run(main)


def test_a_sub_far_ahead_is_read_no_more_past_the_byte_bound() -> None:
    """One sub streams 100 KiB events, the other is silent: the first is read up to about the
    byte bound (plus one response in the inbox), not for 64 responses or 10,000 events."""
    from kvstore.client.watchmerge import Batch
    from kvstore.client.watchrun import merged_watch
    from kvstore.server.etcd.watchmerged import SubEvent

    produced = [0]

    class _Subs:
        ends: tuple[type[BaseException], ...] = (Restart, Definite)

        async def stream(self, node: int, create: kv_pb2.WatchCreateRequest, extra: Requests
                         ) -> AsyncIterator[kv_pb2.WatchResponse]:
            yield kv_pb2.WatchResponse(watch_id=1, created=True, revision=0)
            if node == 2:
                await asyncio.Event().wait()
            for rev in range(1, 200):
                produced[0] += 1
                yield kv_pb2.WatchResponse(watch_id=1, revision=rev, events=[
                    kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"a", value=b"x" * 100_000, mod_revision=rev))])

        def canceled(self, resp: kv_pb2.WatchResponse, node: int) -> BaseException:
            return canceled_by(resp, node)

        def failed(self, node: int, message: str, breach: bool) -> BaseException:
            return Restart(node, message)

    async def main() -> None:
        run = merged_watch([(1, (1,)), (2, (2,))], _create(), _Subs(), SubEvent.of, 10_000, 60.0, 1 << 20)
        batches: list[Any] = []

        async def consume() -> None:
            async for b in run:
                batches.append(b)

        consumer = asyncio.ensure_future(consume())
        for _ in range(2000):  # let every task run until nothing moves
            await asyncio.sleep(0)
        assert not consumer.done()
        assert [b for b, _ in batches] == [Batch(0, ())]  # created; sub 2 is silent at 0
        assert 10 <= produced[0] <= 13
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await run.aclose()
    _run(main)


def test_a_merged_wait_raises_the_kvstore_error_the_watch_ended_with() -> None:
    """`CallerKV.wait_for` over a merged watch: "too many watches" is ResourceExhausted, a TLS
    caller without a token Unauthenticated (never a retryable Unavailable)."""
    from kvstore.server.etcd.caller import CallerKV

    class _Watch:
        def __init__(self, budget: Budget, remote_ok: bool) -> None:
            self.budget, self.remote_ok = budget, remote_ok

        def merges(self, c: kv_pb2.WatchCreateRequest) -> bool:
            return True

        def merged(self, context: Any, emit: Any) -> MergedWatches:
            return MergedWatches(_planner(_Nodes(), self.remote_ok), _Nodes(), emit,
                                 lambda rev: rpc_pb2.ResponseHeader(revision=rev), self.budget, random.Random(1))

    async def wait(budget: Budget, remote_ok: bool) -> None:
        c = CallerKV(None, None, _Watch(budget, remote_ok), None)  # type: ignore[arg-type]
        await c.wait_for(_create(), deletes_only=True)

    with pytest.raises(errors.ResourceExhausted, match="too many watches"):
        asyncio.run(wait(Budget(limit=0), True))
    with pytest.raises(errors.Unauthenticated, match="token"):
        asyncio.run(wait(Budget(), False))


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 700)), max_size=30), cap=st.integers(1, 3000))
def test_reply_pieces_split_between_revisions_within_the_bound(sizes: list[tuple[int, int]], cap: int) -> None:
    from kvstore.server.etcd.watchmerged import SubEvent, reply_pieces

    events: list[SubEvent] = []
    for rev, (count, size) in enumerate(sizes, start=1):
        events += [SubEvent.of(kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"k%d" % k, value=b"v" * size, mod_revision=rev)))
                   for k in range(count)]
    pieces = reply_pieces(events, cap)
    assert pieces and [(e.kv.key, e.kv.mod_revision) for p in pieces for e in p] == [
        (e.event.kv.key, e.revision) for e in events]
    seen: set[int] = set()
    for p in pieces:
        revs = [e.kv.mod_revision for e in p]
        assert not seen & set(revs)  # a revision never split
        seen |= set(revs)
        assert sum(e.ByteSize() for e in p) <= cap or len(set(revs)) == 1
    assert all(pieces) or len(pieces) == 1


def test_a_create_whose_subs_keep_failing_is_answered_after_the_timeout() -> None:
    """Group 3 lives on node 3 only, which is down: every attempt fails before all subs are
    created; the create is answered created and canceled (definite), not left pending."""
    async def main() -> None:
        nodes = _Nodes()
        nodes.down.add(3)
        out: asyncio.Queue[rpc_pb2.WatchResponse] = asyncio.Queue()

        async def emit(r: rpc_pb2.WatchResponse, fragment: bool) -> None:
            await out.put(r)

        mw = MergedWatches(_planner(nodes), nodes, emit, lambda rev: rpc_pb2.ResponseHeader(revision=rev),
                           Budget(), random.Random(1), catch_up=0.05, create_timeout=0.3)
        await _answered_within(await mw.start(1, _create(), False))
        got = await _until(out, lambda got: any(r.canceled for r in got))
        assert [(r.created, r.canceled) for r in got] == [(True, False), (False, True)]
        assert "not created within" in got[1].cancel_reason
        assert "a sub-watch failed" in got[1].cancel_reason and mw.restarts >= 1
        assert sorted(nodes.closed) == sorted(n for n, _, _ in nodes.opened) and mw.budget.running == 0
    _run(main)


def test_a_sub_stream_read_canceled_as_its_response_arrives_ends_canceled() -> None:
    """`PeerSubs.stream` (here the local sub): a cancel the reading task accepted always ends it
    canceled, whichever turn of the loop the response came in (Python 3.11's `wait_for` would
    return the read instead, and the merge loop's reader then waited forever: CI's hang of the
    client's merged watch, `tests/unit/test_watch_client.py`)."""
    from kvstore.server.etcd.watchmerged import PeerSubs

    async def trial(turns: int) -> tuple[bool, bool]:
        q: asyncio.Queue[bytes] = asyncio.Queue()

        class _Local:
            async def Watch(self, requests: AsyncIterator[kv_pb2.WatchRequest], context: object
                            ) -> AsyncIterator[bytes]:
                while True:
                    yield await q.get()

        subs = PeerSubs(ME, _Local(), None, None, lambda _: "", ())  # type: ignore[arg-type]
        stream = subs.stream(ME, _create(), asyncio.Queue())
        return await cancel_as_it_arrives(
            stream, lambda: q.put_nowait(kv_pb2.WatchResponse(revision=7).SerializeToString()), turns)

    assert_cancels_kept(trial)
