"""Client library tests against in-process fake servers (127.0.0.1 ephemeral ports only)."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from test_client_fakes import Action, FakeCluster, closed_port

from kvstore import errors
from kvstore.client import AsyncClient, Client, Compare, Op
from kvstore.client.invoke import LAST_SLIVER
from kvstore.client.retry import Backoff, BreakerState, CircuitBreaker, Deadline, RetryPolicy
from kvstore.client.routing import DEFAULT_GROUP, Router
from kvstore.client.scans import scan_range
from kvstore.v1 import kv_pb2

pytestmark = pytest.mark.timeout(30)

FAST: dict[str, Any] = dict(attempt_timeout=0.3, backoff_base=0.005, backoff_cap=0.05, seed=7)


@pytest.fixture(scope="module")
def shared() -> Iterator[FakeCluster]:
    with FakeCluster(3) as c:
        yield c


@pytest.fixture
def cluster(shared: FakeCluster) -> FakeCluster:
    """The module's fake cluster, reset to: node 1 leads, empty store, no scripts."""
    c = shared
    c.leader_id, c.term, c.hint, c.status_leader = 1, 1, True, True
    c.advertise.clear()
    c.store.clear()
    c.sessions.clear()
    c.applied.clear()
    c.calls.clear()
    c.admin_calls.clear()
    c.scan_chunk, c.scan_break_after, c.stream_scans = 3, None, True
    for n in c.nodes.values():
        n.hang = False
        n.script.clear()
    return c


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ----- errors -----


def test_error_definiteness_and_str() -> None:
    assert errors.NotLeader(2, "h:1").definite
    assert "definite" in str(errors.NotLeader(2, "h:1"))
    assert errors.Timeout("x").indeterminate
    assert "indeterminate" in str(errors.Timeout("x"))
    assert not errors.Timeout("x", indeterminate=False).indeterminate
    assert errors.LeadershipLost().indeterminate and errors.InternalError().indeterminate
    for cls in (errors.NoLeader, errors.KeyTooLarge, errors.ValueTooLarge, errors.RequestTooLarge,
                errors.InvalidArgument, errors.StorageFull, errors.ProposalDropped, errors.Unavailable,
                errors.WrongShard, errors.ShuttingDown):
        e = cls()
        assert isinstance(e, errors.KVError) and e.definite, cls
    assert errors.ValueTooLarge(2000000, 1048576).message == "value too large: 2000000 bytes > 1048576"


def test_from_proto_to_proto() -> None:
    assert errors.from_proto(kv_pb2.Error(), is_write=True) is None
    e = errors.from_proto(kv_pb2.Error(code=kv_pb2.NOT_LEADER, leader_id=3, leader_hint="a:1"), is_write=True)
    assert isinstance(e, errors.NotLeader) and (e.leader_id, e.leader_address) == (3, "a:1") and e.definite
    assert isinstance(errors.from_proto(kv_pb2.Error(code=kv_pb2.NOT_LEADER), is_write=False), errors.NoLeader)
    # TIMEOUT: indeterminate for a write even if the flag is missing, never for a read.
    t = errors.from_proto(kv_pb2.Error(code=kv_pb2.TIMEOUT), is_write=True)
    assert isinstance(t, errors.Timeout) and t.indeterminate
    t = errors.from_proto(kv_pb2.Error(code=kv_pb2.TIMEOUT, indeterminate=True), is_write=False)
    assert isinstance(t, errors.Timeout) and t.definite
    u = errors.from_proto(kv_pb2.Error(code=99, message="?"), is_write=True)  # type: ignore[arg-type]
    assert isinstance(u, errors.InternalError) and u.indeterminate
    for exc in (errors.NotLeader(4, "b:2"), errors.KeyTooLarge(5000, 4096), errors.LeadershipLost("gone"),
                errors.StorageFull("disk")):
        back = errors.from_proto(errors.to_proto(exc), is_write=True)
        assert type(back) is type(exc) and back is not None
        assert back.message == exc.message and back.indeterminate == exc.indeterminate
    p = errors.to_proto(RuntimeError("boom"))
    assert p.code == kv_pb2.INTERNAL and p.indeterminate


# ----- retry -----


def test_backoff_full_jitter_seeded() -> None:
    a = Backoff(0.02, 1.0, rng=random.Random(1))
    b = Backoff(0.02, 1.0, rng=random.Random(1))
    da = [a.next_delay() for _ in range(20)]
    assert da == [b.next_delay() for _ in range(20)]
    for i, d in enumerate(da):
        assert 0 <= d <= min(1.0, 0.02 * 2**i)
    a.reset()
    assert a.ceiling() == 0.02


def test_circuit_breaker() -> None:
    now = [0.0]
    br = CircuitBreaker(3, 2.0, clock=lambda: now[0])
    for _ in range(2):
        br.record_failure()
    assert br.allow() and br.state is BreakerState.CLOSED
    br.record_failure()
    assert br.state is BreakerState.OPEN and not br.allow()
    now[0] = 2.5
    assert br.state is BreakerState.HALF_OPEN
    assert br.allow()  # the probe
    assert not br.allow()  # only one probe at a time
    br.record_failure()  # probe failed: open again
    assert not br.allow()
    now[0] = 5.0
    assert br.allow()
    br.record_success()
    assert br.state is BreakerState.CLOSED and br.allow()


def test_deadline_and_policy() -> None:
    now = [10.0]
    d = Deadline(1.5, clock=lambda: now[0])
    assert d.remaining() == 1.5 and d.bound(5) == 1.5 and not d.expired
    now[0] = 12.0
    assert d.expired and d.remaining() == 0
    with pytest.raises(ValueError):
        RetryPolicy(timeout=0)


# ----- routing -----


def test_router_learns_and_rotates() -> None:
    r = Router(["a:1", "b:2", " a:1 "])
    assert r.endpoints == ("a:1", "b:2")
    assert r.pick(DEFAULT_GROUP) == "a:1"
    # Redirect to an address we did not know: it is added and becomes the leader.
    assert r.on_redirect(DEFAULT_GROUP, "a:1", 3, "c:3") == "c:3"
    assert r.endpoints == ("a:1", "b:2", "c:3") and r.pick(DEFAULT_GROUP) == "c:3"
    # A redirect to the node that answered is no redirect.
    assert r.on_redirect(DEFAULT_GROUP, "c:3", 0, "c:3") is None and r.leader(DEFAULT_GROUP) is None
    r.on_transport_failure(DEFAULT_GROUP, "c:3")
    assert r.pick(DEFAULT_GROUP) == "a:1"
    # Status: dialed addresses win over advertised ones; the leader is learned by id.
    r.learn_status("b:2", 2, [(1, "10.0.0.1:1"), (2, "10.0.0.2:2"), (4, "d:4")], [(1, 4, 7)])
    assert r.leader(DEFAULT_GROUP) == "d:4" and "d:4" in r.endpoints and "10.0.0.2:2" not in r.endpoints
    r.learn_status("a:1", 1, [], [(1, 2, 6)])  # older term: ignored
    assert r.leader(DEFAULT_GROUP) == "d:4"
    assert r.on_redirect(DEFAULT_GROUP, "d:4", 2, "10.0.0.2:2") == "b:2"  # known id -> dialed address
    assert r.group_for_key(b"anything") == DEFAULT_GROUP


def test_scan_range() -> None:
    assert scan_range(b"ab", None, None) == (b"ab", b"ac")
    assert scan_range(b"a\xff", None, None) == (b"a\xff", b"b")
    assert scan_range(b"\xff\xff", None, None) == (b"\xff\xff", None)
    assert scan_range(b"", b"c", b"f") == (b"c", b"f")
    assert scan_range(b"b", b"a", b"bb") == (b"b", b"bb")


# ----- client against the fake cluster -----


def test_basic_ops(cluster: FakeCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            assert await c.get(b"k") is None
            await c.put(b"k", b"v1")
            assert await c.get(b"k") == b"v1"
            assert await c.get(b"k", consistency="serializable") == b"v1"
            assert await c.cas(b"k", b"v1", b"v2") is True
            assert await c.cas(b"k", b"v1", b"v3") is False
            assert await c.cas(b"new", None, b"x") is True
            assert await c.cas(b"new", None, b"y") is False
            assert await c.delete(b"k") is True
            assert await c.delete(b"k") is False
            assert cluster.store == {b"new": b"x"}

    run(main())
    # Sessions: one client id, a fresh seq per write, ack = lowest in flight (= seq when sequential).
    writes = [c for c in cluster.calls if c.method != "Get"]
    assert len({c.client_id for c in writes}) == 1 and writes[0].client_id != 0
    assert [c.seq for c in writes] == [1, 2, 3, 4, 5, 6, 7]
    assert all(c.ack == c.seq for c in writes)
    assert all(c.node == 1 for c in cluster.calls)


def test_discovers_leader_from_a_follower(cluster: FakeCluster) -> None:
    cluster.set_leader(3)

    async def main() -> None:
        async with AsyncClient([cluster.addr(1)], **FAST) as c:
            await c.put(b"a", b"1")
            assert c.router.leader(DEFAULT_GROUP) == cluster.addr(3)
            assert set(c.endpoints) == set(cluster.endpoints)  # members learned from Status

    run(main())
    assert [c.node for c in cluster.kv_calls("Put")] == [3]  # discovery sent it straight to the leader


def test_follows_not_leader_redirect(cluster: FakeCluster) -> None:
    cluster.status_leader = False  # discovery learns nothing: the redirect must do it
    cluster.set_leader(2)

    async def main() -> None:
        async with AsyncClient([cluster.addr(1)], **FAST) as c:
            await c.put(b"a", b"1")
            assert await c.get(b"a") == b"1"

    run(main())
    puts = cluster.kv_calls("Put")
    assert [p.node for p in puts] == [1, 2]
    assert puts[0].seq == puts[1].seq and puts[0].client_id == puts[1].client_id
    assert [g.node for g in cluster.kv_calls("Get")] == [2]  # leader cached


def test_redirect_to_unlisted_address(cluster: FakeCluster) -> None:
    cluster.status_leader = False
    cluster.set_leader(3)

    async def main() -> None:
        async with AsyncClient([cluster.addr(1)], **FAST) as c:
            # Hide the members: only the NOT_LEADER hint names node 3's address.
            c.router.learn_status = lambda *a, **k: None  # type: ignore[method-assign]
            await c.put(b"a", b"1")
            assert cluster.addr(3) in c.endpoints

    run(main())
    assert [p.node for p in cluster.kv_calls("Put")] == [1, 3]


def test_leader_change_mid_session(cluster: FakeCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            await c.put(b"a", b"1")
            cluster.set_leader(2)
            await c.put(b"b", b"2")
            cluster.hint = False
            cluster.set_leader(3)  # NOT_LEADER without address: resolved by node id
            await c.put(b"c", b"3")

    run(main())
    assert cluster.store == {b"a": b"1", b"b": b"2", b"c": b"3"}
    assert [p.node for p in cluster.kv_calls("Put")][-1] == 3


def test_no_leader_until_deadline_is_definite(cluster: FakeCluster) -> None:
    cluster.leader_id = 0

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, timeout=0.4, **FAST) as c:
            t0 = time.monotonic()
            with pytest.raises(errors.NoLeader) as ei:
                await c.put(b"a", b"1")
            # it tried until the last sliver of the deadline (`invoke.LAST_SLIVER`), then gave up
            # definite: no attempt was started so late that the deadline would cut it short
            assert time.monotonic() - t0 >= 0.4 - 0.3 * LAST_SLIVER
            assert ei.value.definite and "gave up after" in ei.value.message

    run(main())
    puts = cluster.kv_calls("Put")
    assert len(puts) > 3 and len({(p.client_id, p.seq) for p in puts}) == 1
    assert cluster.applied == []


def test_closing_an_async_client_under_retry_fails_the_operation_with_client_closed(cluster: FakeCluster) -> None:
    """close() while a put retries against a cluster without a leader: the put ends at once with
    ClientClosed (a KVError, definite: no attempt could have applied), not a bare RuntimeError."""
    cluster.leader_id = 0

    async def main() -> None:
        c = AsyncClient(cluster.endpoints, timeout=30, **FAST)
        put = asyncio.ensure_future(c.put(b"closing", b"1"))
        while len(cluster.kv_calls("Put")) < 2:
            await asyncio.sleep(0.005)
        await c.close()
        with pytest.raises(errors.ClientClosed) as ei:
            await asyncio.wait_for(put, 5)  # ends with the close, not at its 30 s timeout
        assert isinstance(ei.value, errors.KVError) and ei.value.definite
        with pytest.raises(errors.ClientClosed):
            await c.get(b"closing")

    run(main())
    assert cluster.applied == []


def test_indeterminate_retries_reuse_session_exactly_once(cluster: FakeCluster) -> None:
    # Applied, but the client hears TIMEOUT, then LEADERSHIP_LOST, then the truth.
    cluster.script(1, Action("error", kv_pb2.TIMEOUT, indeterminate=True, apply=True),
                   Action("error", kv_pb2.LEADERSHIP_LOST, indeterminate=True))

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            await c.put(b"k", b"v")
            assert await c.cas(b"c", None, b"1") is True

    run(main())
    puts = cluster.kv_calls("Put")
    assert len(puts) >= 3
    assert len({(p.client_id, p.seq) for p in puts}) == 1
    assert [a for a in cluster.applied if a[0] == "Put"] == [("Put", puts[0].client_id, puts[0].seq, b"k")]


def test_txn_retries_reuse_its_session_and_errors_say_definite_or_not(cluster: FakeCluster) -> None:
    """A transaction applied while the client heard TIMEOUT is retried under the same session,
    applied once, and answered with its first result; a definite refusal is definite; a
    malformed transaction is refused before anything is sent."""
    cluster.script(1, Action("error", kv_pb2.TIMEOUT, indeterminate=True, apply=True, methods=("Txn",)),
                   Action("error", kv_pb2.LEADERSHIP_LOST, indeterminate=True, methods=("Txn",)))

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            r = await c.txn([], [Op.put(b"tx", b"1"), Op.get(b"tx")])
            assert r.succeeded and [x.kind for x in r.responses] == ["put", "get"]
            kv = r.responses[1].kv
            assert kv is not None and kv.value == b"1"
            r = await c.txn([Compare.value(b"tx", "=", b"other")], [Op.put(b"tx", b"2")], [Op.get(b"nope")])
            assert not r.succeeded and r.responses[0].kv is None
            cluster.script(1, Action("error", kv_pb2.INVALID_ARGUMENT, methods=("Txn",)))
            with pytest.raises(errors.InvalidArgument) as ei:
                await c.txn([], [Op.put(b"tx", b"3")])
            assert ei.value.definite
            cluster.script(1, *[Action("error", kv_pb2.TIMEOUT, indeterminate=True, methods=("Txn",))] * 1000)
            with pytest.raises(errors.Timeout) as et:
                await c.txn([], [Op.put(b"tx", b"4")], timeout=0.3)
            assert et.value.indeterminate
            cluster.nodes[1].script.clear()
            before, sent = len(cluster.kv_calls("Txn")), len(cluster.calls)
            leased = Op.put(b"l", b"1", lease=0x5001)  # a valid lease: its LeaseTimeToLive must not go first
            for bad, msg in [
                (([], [leased, Op.get(b"")]), "empty"),
                (([Compare(b"k", "value", "==", b"v")], [leased]), "operator"),
                (([], [Op.put(b"l", b"1", lease=[1])]), "lease"),  # type: ignore[arg-type]
                (([], [leased, Op.put(b"m", b"1", lease="x")]), "lease"),  # type: ignore[arg-type]
                (([], []), "at least one key"),
                (([Compare.version(b"k", ">", -1)], [Op.get(b"k")]), "integer"),
                (([Compare(b"k", "value", "==", b"v")], [Op.get(b"k")]), "operator"),
                (([], [Op.get(b"")]), "empty"),
                (([], [Op.txn([], [Op.txn([], [Op.txn([], [Op.txn([], [Op.get(b"k")])])])])]), "deeper"),
            ]:
                with pytest.raises(errors.InvalidArgument, match=msg):
                    await c.txn(*bad)  # type: ignore[arg-type]
            assert len(cluster.kv_calls("Txn")) == before and len(cluster.calls) == sent  # nothing sent

    run(main())
    txns = [t for t in cluster.kv_calls("Txn") if t.node == 1]
    assert len({(t.client_id, t.seq) for t in txns[:3]}) == 1 and [t.retry for t in txns[:3]] == [False, True, True]
    applied = [a for a in cluster.applied if a[0] == "Txn"]
    assert [a[2] for a in applied] == [txns[0].seq, txns[0].seq + 1]  # the first once, the second; no others


def test_retry_after_indeterminate_carries_retry_and_horizon(cluster: FakeCluster) -> None:
    """A write's attempts after an indeterminate outcome say `retry` and carry the highest index
    the client had seen from the group before the first attempt; definite refusals do not."""
    cluster.script(1, Action("error", kv_pb2.PROPOSAL_DROPPED, methods=("Put",)))  # definite
    seen = []

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            await c.put(b"a", b"1")
            await c.put(b"b", b"2")  # the reply carries the fake's entry index
            seen.append(cluster.index)
            cluster.script(1, Action("error", kv_pb2.TIMEOUT, indeterminate=True, apply=True, methods=("Put",)),
                           Action("error", kv_pb2.LEADERSHIP_LOST, indeterminate=True, methods=("Put",)))
            await c.put(b"c", b"3")

    run(main())
    # (The client may also try another node after a TIMEOUT: it answers NOT_LEADER.)
    puts = [(p.key, p.retry, p.horizon) for p in cluster.kv_calls("Put") if p.node == 1]
    assert puts == [
        (b"a", False, 0), (b"a", False, 0),  # a definite refusal is not a reason for `retry`
        (b"b", False, 0),
        (b"c", False, 0), (b"c", True, seen[0]), (b"c", True, seen[0]),
    ], puts
    assert seen[0] > 0


def test_session_expired_is_indeterminate_and_not_retried(cluster: FakeCluster) -> None:
    cluster.script(1, Action("error", kv_pb2.TIMEOUT, indeterminate=True, apply=True, methods=("Put",)),
                   Action("error", kv_pb2.SESSION_EXPIRED, methods=("Put",)))

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            with pytest.raises(errors.SessionExpired) as ei:
                await c.put(b"k", b"v")
            assert ei.value.indeterminate and "may have been applied" in str(ei.value)

    run(main())
    puts = [(p.retry, p.horizon) for p in cluster.kv_calls("Put") if p.node == 1]
    assert puts == [(False, 0), (True, 0)], puts  # answered SESSION_EXPIRED: not tried again


def test_indeterminate_until_deadline_raises_indeterminate_timeout(cluster: FakeCluster) -> None:
    cluster.script(1, *[Action("error", kv_pb2.TIMEOUT, indeterminate=True, methods=("Put",))] * 1000)

    async def main() -> None:
        # Only the scripted node as endpoint, and a deadline a loaded machine cannot spend on
        # redirects before the first attempt reaches it (a run on a busy CI machine did).
        async with AsyncClient([cluster.addr(1)], timeout=1.0, **FAST) as c:
            with pytest.raises(errors.Timeout) as ei:
                await c.put(b"k", b"v")
            assert ei.value.indeterminate and "may have been applied" in str(ei.value)
            # A read that times out at the server is definite.
            cluster.nodes[1].script.clear()
            cluster.script(1, *[Action("error", kv_pb2.TIMEOUT, indeterminate=True, methods=("Get",))] * 1000)
            with pytest.raises(errors.Timeout) as ei2:
                await c.get(b"k")
            assert ei2.value.definite

    run(main())


def test_giving_up_mid_redirect_reports_what_the_leader_said_not_the_redirect(cluster: FakeCluster) -> None:
    """The leader answers a read TIMEOUT (definite for a read), so the client tries another node,
    whose NOT_LEADER points back at the leader; the deadline passes before that redirect is
    followed. The error is the leader's TIMEOUT, not the follower's "not leader" (a CI run saw
    "not leader (gave up after 61 attempts)" for a read the leader kept timing out)."""
    now = [0.0]
    a, b = cluster.addr(1), cluster.addr(2)

    async def main() -> None:
        async with AsyncClient([a, b], timeout=5, **FAST) as c:
            invoker = c._reads.invoker
            invoker.router.on_success(DEFAULT_GROUP, a)
            seen: list[str] = []

            async def call(ep: str, t: float) -> kv_pb2.GetResponse:
                seen.append(ep)
                if ep == a:
                    now[0] += 0.01
                    return kv_pb2.GetResponse(error=kv_pb2.Error(code=kv_pb2.TIMEOUT, message="read index timed out"))
                now[0] += 0.5  # the follower's answer takes half the deadline
                return kv_pb2.GetResponse(error=kv_pb2.Error(
                    code=kv_pb2.NOT_LEADER, message="not leader", leader_id=1, leader_hint=a))

            with pytest.raises(errors.Timeout) as ei:
                await invoker.invoke("get", call, deadline=Deadline(1.0, clock=lambda: now[0]), is_write=False)
            assert seen[-1] == b and seen[0] == a  # the deadline passed right after a redirect
            assert ei.value.definite and "read index timed out" in ei.value.message
            assert "gave up after" in ei.value.message

    run(main())


def test_indeterminate_then_definite_stays_indeterminate(cluster: FakeCluster) -> None:
    cluster.script(1, Action("error", kv_pb2.INTERNAL, indeterminate=True),
                   Action("error", kv_pb2.INVALID_ARGUMENT))

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            with pytest.raises(errors.InvalidArgument) as ei:
                await c.put(b"k", b"v")
            assert ei.value.indeterminate

    run(main())


def test_hung_leader(cluster: FakeCluster) -> None:
    cluster.nodes[1].hang = True

    async def main() -> None:
        async with AsyncClient([cluster.addr(1)], timeout=0.5, **FAST) as c:
            with pytest.raises(errors.Timeout) as ei:
                await c.put(b"k", b"v")
            assert ei.value.indeterminate  # DEADLINE_EXCEEDED after sending
            # By now the breaker is open: the read is never sent. Either way: definite.
            with pytest.raises((errors.Timeout, errors.Unavailable)) as ei2:
                await c.get(b"k")
            assert ei2.value.definite
            assert "timed out" in ei2.value.message or "did not answer in time" in ei2.value.message

    run(main())


def test_hung_leader_fails_over(cluster: FakeCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.endpoints, timeout=3.0, **FAST) as c:
            await c.put(b"a", b"1")
            cluster.nodes[1].hang = True
            cluster.set_leader(2)  # an election happened behind the hung node's back
            await c.put(b"b", b"2")

    run(main())
    assert cluster.store == {b"a": b"1", b"b": b"2"}
    b_puts = [p for p in cluster.kv_calls("Put") if p.key == b"b"]
    assert b_puts[0].node == 1 and b_puts[-1].node == 2
    assert len({p.seq for p in b_puts}) == 1


def test_all_endpoints_down_is_unavailable(cluster: FakeCluster) -> None:
    eps = [closed_port(), closed_port()]

    async def main() -> None:
        async with AsyncClient(eps, timeout=0.5, **FAST) as c:
            with pytest.raises(errors.Unavailable) as ei:
                await c.put(b"k", b"v")
            assert ei.value.definite
            msg = ei.value.message
            assert msg.startswith(f"cannot reach any endpoint ({eps[0]}, {eps[1]})")
            assert "connection refused" in msg

    run(main())


def test_dead_endpoint_breaker_opens(cluster: FakeCluster) -> None:
    dead = closed_port()
    cluster.status_leader = False

    async def main() -> None:
        async with AsyncClient([dead, cluster.addr(2)], breaker_threshold=1, breaker_cooldown=60, **FAST) as c:
            for i in range(5):
                await c.put(b"k%d" % i, b"v")
            assert c.router.breaker(dead).state is BreakerState.OPEN
            assert c.router.leader(DEFAULT_GROUP) == cluster.addr(1)

    run(main())
    assert len(cluster.store) == 5


def test_unavailable_after_send_is_indeterminate_and_retried(cluster: FakeCluster) -> None:
    cluster.script(1, Action("abort", status=grpc.StatusCode.UNAVAILABLE, details="Socket closed", apply=True))

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            await c.put(b"k", b"v")

    run(main())
    puts = cluster.kv_calls("Put")
    assert len(puts) >= 2 and len({(p.client_id, p.seq) for p in puts}) == 1
    assert len(cluster.applied) == 1


def test_size_validation_without_round_trip(cluster: FakeCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            with pytest.raises(errors.KeyTooLarge) as ek:
                await c.put(b"k" * 504, b"v")
            assert ek.value.message == "key too large: 504 bytes > 503" and ek.value.definite
            with pytest.raises(errors.ValueTooLarge) as ev:
                await c.put(b"k", b"v" * (1024 * 1024 + 1))
            assert ev.value.message == "value too large: 1048577 bytes > 1048576"
            with pytest.raises(errors.ValueTooLarge):
                await c.cas(b"k", b"x" * (1024 * 1024 + 1), b"v")
            with pytest.raises(errors.KeyTooLarge):
                await c.get(b"k" * 5000)
            with pytest.raises(errors.InvalidArgument):
                await c.get(b"")
            with pytest.raises(TypeError):
                await c.put("text", b"v")  # type: ignore[arg-type]
        async with AsyncClient(cluster.endpoints, max_value_size=10, **FAST) as c:
            with pytest.raises(errors.ValueTooLarge):
                await c.put(b"k", b"v" * 11)
        assert cluster.calls == []
        # Limits raised client-side: the server's KEY_TOO_LARGE comes back, not retried.
        async with AsyncClient(cluster.endpoints, max_key_size=10_000, **FAST) as c:
            with pytest.raises(errors.KeyTooLarge) as ek2:
                await c.put(b"k" * 5000, b"v")
            assert ek2.value.definite
        assert len(cluster.kv_calls("Put")) == 1

    run(main())


def test_read_options_are_refused_the_same_way_by_reads_and_scans_without_round_trip(cluster: FakeCluster) -> None:
    """Point reads and scans take their options from one check (`RequestChecks.read_options`)."""

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            bad: list[tuple[dict[str, Any], type[Exception]]] = [
                (dict(read_preference="closest"), errors.InvalidArgument),
                (dict(consistency="eventual"), errors.InvalidArgument),
                (dict(consistency="bounded"), errors.InvalidArgument),  # no bound, no default
                (dict(consistency="bounded", max_staleness=float("nan")), errors.InvalidArgument),
                (dict(timeout=0), ValueError),
            ]
            for kwargs, kind in bad:
                with pytest.raises(kind):
                    await c.read(b"k", **kwargs)
                with pytest.raises(kind):
                    await c.get(b"k", **kwargs)
                with pytest.raises(kind):
                    async for _ in c.scan(b"p", **kwargs):
                        pass
                with pytest.raises(kind):
                    # an empty range: refused all the same, before it is found empty
                    async for _ in c.scan(start=b"b", end=b"a", **kwargs):
                        pass
        assert cluster.calls == []

    run(main())


def test_ack_is_lowest_seq_in_flight(cluster: FakeCluster) -> None:
    cluster.script(1, Action("delay", seconds=0.3, methods=("Put",)))

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            await c.get(b"warm")  # learn the leader first
            slow = asyncio.ensure_future(c.put(b"slow", b"1"))
            await asyncio.sleep(0.05)
            await c.put(b"fast", b"2")
            await slow
            await c.put(b"last", b"3")

    run(main())
    puts = {p.key: p for p in cluster.kv_calls("Put")}
    assert (puts[b"slow"].seq, puts[b"slow"].ack) == (1, 1)
    assert (puts[b"fast"].seq, puts[b"fast"].ack) == (2, 1)
    assert (puts[b"last"].seq, puts[b"last"].ack) == (3, 3)


def test_scan_streams_and_resumes(cluster: FakeCluster) -> None:
    for i in range(10):
        cluster.store[b"p/%02d" % i] = b"v%d" % i
    cluster.store[b"q/x"] = b"other"

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            got = [kv async for kv in c.scan(b"p/")]
            assert got == [(b"p/%02d" % i, b"v%d" % i) for i in range(10)]
            chunks = [ch async for ch in c.scan_chunks(b"p/")]
            assert [len(ch) for ch in chunks] == [3, 3, 3, 1]  # streamed, not one message
            assert [k async for k, _ in c.scan(b"p/", limit=4)] == [b"p/%02d" % i for i in range(4)]
            assert [k async for k, _ in c.scan(start=b"p/05", end=b"p/07")] == [b"p/05", b"p/06"]
            assert len([kv async for kv in c.scan()]) == 11
            # Stream breaks after the first chunk: resumed after the last key, no duplicates.
            cluster.scan_break_after = 1
            cluster.calls.clear()
            got = [kv async for kv in c.scan(b"p/", limit=8)]
            assert [k for k, _ in got] == [b"p/%02d" % i for i in range(8)]
            scans = cluster.kv_calls("Scan")
            assert scans[0].key == b"p/" and all(s.key == b"p/02\x00" for s in scans[1:])
            # Abandoning a scan early is fine.
            async for _ in c.scan(b"p/"):
                break

    run(main())


def test_small_scan_is_one_message_on_the_operation_stream(cluster: FakeCluster) -> None:
    """A scan with a small limit asks on KV.Stream; a part that does not fit in one message (the
    node answers more=True and nothing) is streamed from the start; so is every part on a node
    whose KV.Stream does not know scans."""
    for i in range(10):
        cluster.store[b"p/%02d" % i] = b"v%d" % i

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, **FAST) as c:
            assert await _scan(c, b"p/", 3) == [b"p/00", b"p/01", b"p/02"]
            assert [s.method for s in cluster.calls] == ["ScanOnce"]
            cluster.calls.clear()
            assert await _scan(c, b"p/", 5) == [b"p/%02d" % i for i in range(5)]
            assert [(s.method, s.key) for s in cluster.calls] == [("ScanOnce", b"p/"), ("Scan", b"p/")]
            cluster.calls.clear()
            assert await _scan(c, b"p/", 0) == [b"p/%02d" % i for i in range(10)]  # no limit: streamed
            assert [s.method for s in cluster.calls] == ["Scan"]
            cluster.calls.clear()
            cluster.stream_scans = False
            assert await _scan(c, b"p/", 2) == [b"p/00", b"p/01"]
            assert [s.method for s in cluster.calls] == ["Scan"]

    run(main())


async def _scan(c: AsyncClient, prefix: bytes, limit: int) -> list[bytes]:
    return [k async for k, _ in c.scan(prefix, limit=limit)]


def test_scan_follows_redirect(cluster: FakeCluster) -> None:
    cluster.store.update({b"a": b"1", b"b": b"2"})
    cluster.status_leader = False
    cluster.set_leader(2)

    async def main() -> None:
        async with AsyncClient([cluster.addr(1)], **FAST) as c:
            assert [kv async for kv in c.scan()] == [(b"a", b"1"), (b"b", b"2")]

    run(main())
    assert [s.node for s in cluster.kv_calls("Scan")] == [1, 2]


def test_admin(cluster: FakeCluster) -> None:
    dead = closed_port()

    async def main() -> None:
        async with AsyncClient([cluster.addr(2), dead], **FAST) as c:
            st = await c.status(cluster.addr(3))
            assert st.node_id == 3 and st.groups[0].leader_id == 1
            nodes = await c.cluster_status()
            assert [n.status.node_id for n in nodes if n.status] == [1, 2, 3]
            assert [n.address for n in nodes if n.status is None] == [dead]
            r = await c.add_member(4, "127.0.0.1:1", learner=True)
            assert r.message == "added 4"
            await c.promote_member(4)
            await c.remove_member(4)
            await c.snapshot()
            await c.snapshot(cluster.addr(1))
            await c.transfer_leader(2)
            await c.put(b"after", b"transfer")
            # Admin calls carry no session: an indeterminate outcome is not retried.
            cluster.nodes[2].hang = True
            with pytest.raises(errors.KVError) as ei:
                await c.remove_member(4, timeout=1.0)
            assert ei.value.indeterminate
            cluster.nodes[2].hang = False

    run(main())
    names = [(n, name) for n, name, _ in cluster.admin_calls]
    assert (1, "AddMember") in names and (1, "TransferLeader") in names
    assert cluster.admin_calls[-1][1] == "RemoveMember"
    assert len([a for a in cluster.admin_calls if a[1] == "RemoveMember"]) == 2
    assert cluster.kv_calls("Put")[-1].node == 2


def test_cluster_status_all_down() -> None:
    async def main() -> None:
        async with AsyncClient([closed_port()], **FAST) as c:
            with pytest.raises(errors.Unavailable, match="cannot reach any endpoint"):
                await c.cluster_status()

    run(main())


# ----- the synchronous client -----


def test_sync_client_plain_and_context_manager(cluster: FakeCluster) -> None:
    c = Client(cluster.endpoints, **FAST)
    try:
        c.put(b"s/1", b"a")
        c.put(b"s/2", b"b")
        assert c.get(b"s/1") == b"a"
        assert c.cas(b"s/1", b"a", b"c")
        assert list(c.scan(b"s/")) == [(b"s/1", b"c"), (b"s/2", b"b")]
        it = c.scan(b"s/")
        assert next(it) == (b"s/1", b"c")
        del it
        assert c.status().node_id in (1, 2, 3)
        with pytest.raises(errors.ValueTooLarge):
            c.put(b"k", b"x" * (2 << 20))
    finally:
        c.close()
    c.close()  # idempotent
    with pytest.raises(RuntimeError):
        c.get(b"s/1")
    with Client(cluster.endpoints, **FAST) as c2:
        assert c2.delete(b"s/2") is True
        assert c2.get(b"s/2") is None


def test_sync_client_from_threads(cluster: FakeCluster) -> None:
    results: list[bytes | None] = []
    with Client(cluster.endpoints, **FAST) as c:

        def worker(i: int) -> None:
            c.put(b"t/%d" % i, b"%d" % i)
            results.append(c.get(b"t/%d" % i))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == sorted(b"%d" % i for i in range(8))  # type: ignore[type-var]
    assert len({(p.client_id, p.seq) for p in cluster.kv_calls("Put")}) == 8


def test_sync_client_inside_running_loop(cluster: FakeCluster) -> None:
    async def main() -> bytes | None:
        with Client(cluster.endpoints, **FAST) as c:
            c.put(b"x", b"y")
            return c.get(b"x")

    assert run(main()) == b"y"


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_sync_client_close_releases_calls_in_flight(cluster: FakeCluster) -> None:
    """close() while threads wait on hung calls: every one of them returns at once with an error
    that says a write may have applied (it was sent) and a read did not; none hangs."""
    c = Client([cluster.addr(1)], timeout=30, attempt_timeout=30, backoff_base=0.005, backoff_cap=0.05, seed=7)
    c.put(b"warm", b"up")  # the stream is open
    cluster.nodes[1].hang = True
    outcomes: dict[str, BaseException | object] = {}

    def call(name: str, f: Any) -> None:
        try:
            outcomes[name] = f()
        except BaseException as e:
            outcomes[name] = e

    threads = [
        threading.Thread(target=call, args=("put", lambda: c.put(b"k", b"v"))),
        threading.Thread(target=call, args=("get", lambda: c.get(b"k"))),
    ]
    for t in threads:
        t.start()
    _wait_for(lambda: {p.key for p in cluster.kv_calls("Put")} >= {b"k"} and cluster.kv_calls("Get"))
    c.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    put_err, get_err = outcomes["put"], outcomes["get"]
    assert isinstance(put_err, errors.KVError) and put_err.indeterminate, put_err
    assert isinstance(get_err, errors.KVError) and get_err.definite, get_err
    with pytest.raises(RuntimeError, match="closed"):
        c.put(b"after", b"close")


def test_sync_client_many_threads_each_read_their_own_writes(cluster: FakeCluster) -> None:
    """32 threads share one Client, each writes, overwrites, cas-es and deletes its own keys:
    every thread reads back exactly what it wrote, and every write had its own session seq."""
    n, per = 32, 6
    failures: list[BaseException] = []
    with Client(cluster.endpoints, **FAST) as c:

        def worker(w: int) -> None:
            try:
                for i in range(per):
                    k = b"mt/%d/%d" % (w, i)
                    c.put(k, b"a%d" % w)
                    assert c.get(k) == b"a%d" % w
                    assert c.cas(k, b"a%d" % w, b"b%d" % w)
                    assert not c.cas(k, b"a%d" % w, b"c")
                    if i % 2:
                        assert c.delete(k)
                        assert c.get(k) is None
                    else:
                        assert c.get(k) == b"b%d" % w
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert not failures, failures[0]
    assert cluster.store == {b"mt/%d/%d" % (w, i): b"b%d" % w for w in range(n) for i in range(0, per, 2)}
    # A put whose attempt timed out (0.3 s: CI load does that) is resent under its own session
    # seq, so a seq may arrive more than once, but only ever with the same key; and every one of
    # the n * per puts had a seq of its own.
    by_seq: dict[tuple[int, int], bytes] = {}
    for p in cluster.kv_calls("Put"):
        if p.key.startswith(b"mt/"):
            assert by_seq.setdefault((p.client_id, p.seq), p.key) == p.key
    assert len(by_seq) == n * per


def test_sync_client_a_long_call_does_not_hold_back_the_other_threads(cluster: FakeCluster) -> None:
    """One thread's call runs for long (a watch waiting for events, say) while another thread
    calls in a loop: every call already waiting or running counts towards the threads in use, so
    the other thread's calls leave at once, never held for `coalesce` waiting for a thread that
    is busy; and once the client sat idle, a lone call leaves at once too."""
    from kvstore.client.client import IDLE_RESET

    with Client(cluster.endpoints, coalesce=0.1, **FAST) as c:
        c.put(b"lc/k", b"v")
        release = asyncio.Event()

        async def long_call() -> None:
            await release.wait()

        t = threading.Thread(target=c._run, args=(long_call(),))
        t.start()
        _wait_for(lambda: len(c._live) == 1)
        for _ in range(10):
            assert c.get(b"lc/k") == b"v"
        c._loop.call_soon_threadsafe(release.set)
        t.join(10)
        assert not t.is_alive()
        assert c._holds_expired == 0

        def worker() -> None:
            for _ in range(5):
                assert c.get(b"lc/k") == b"v"

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        expired = c._holds_expired  # 8 threads finishing one by one: some holds ran out
        _wait_for(lambda: not c._live and c._loop.time() - c._idle_since > IDLE_RESET * 0.1)
        assert c.get(b"lc/k") == b"v"
        assert c._holds_expired == expired


def _gets_from_threads(c: Client, key: bytes, value: bytes, threads: int = 8, each: int = 10) -> None:
    """`threads` threads each get `key` `each` times: every get returns `value`, none hangs."""
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(each):
                assert c.get(key) == value
        except BaseException as e:
            failures.append(e)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts)
    assert not failures, failures[0]


class _Interrupted(Exception):
    pass


def test_sync_client_an_interrupted_caller_leaves_the_others_running(cluster: FakeCluster) -> None:
    """A signal interrupts the main thread waiting on a call (as Ctrl-C does): the call raises
    there, its task is cancelled (it no longer counts as running), and the other threads' calls
    go on."""

    def interrupt(*_: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with Client(cluster.endpoints, **FAST) as c:
            c.put(b"rl/k", b"v")
            release = asyncio.Event()

            async def long_call() -> None:
                await release.wait()

            def interrupter() -> None:
                _wait_for(lambda: len(c._live) == 1)
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

            t = threading.Thread(target=interrupter)
            t.start()
            with pytest.raises(_Interrupted):
                c._run(long_call())
            t.join(10)
            _wait_for(lambda: not c._live)  # its task was cancelled
            _gets_from_threads(c, b"rl/k", b"v", threads=32)
            assert not c._live
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sync_client_a_call_cancelled_before_its_first_step_still_wakes_its_thread(cluster: FakeCluster) -> None:
    """close() (or an abandoning caller) may cancel a call's task before it ever ran: the call is
    finished all the same (ClientClosed, definite: nothing was sent), its thread woken, and it
    no longer counts as running."""
    from kvstore.client.client import _Call

    with Client(cluster.endpoints, **FAST) as c:
        ran: list[bool] = []

        async def op() -> None:
            ran.append(True)

        done = threading.Lock()
        done.acquire()
        call = _Call(op(), done, write=True)

        def start_and_cancel() -> None:  # on the loop thread, in one callback: no step ran
            with c._inbox_lock:
                c._inbox.append(call)
            c._start_inbox()
            c._cancel(call)

        c._loop.call_soon_threadsafe(start_and_cancel)
        assert done.acquire(timeout=10)
        assert isinstance(call.error, errors.ClientClosed) and call.error.definite
        assert not ran and not c._live
        c.put(b"after", b"cancel")  # the client goes on
        assert c.get(b"after") == b"cancel"


def test_sync_client_coalesce_is_validated_and_zero_works(cluster: FakeCluster) -> None:
    for bad in (-0.001, 0.5):
        with pytest.raises(ValueError, match="coalesce"):
            Client(cluster.endpoints, coalesce=bad)
    got: list[bytes | None] = []
    with Client(cluster.endpoints, coalesce=0, **FAST) as c:

        def worker(i: int) -> None:
            c.put(b"z/%d" % i, b"%d" % i)
            got.append(c.get(b"z/%d" % i))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sorted(got) == sorted(b"%d" % i for i in range(8))  # type: ignore[type-var]
