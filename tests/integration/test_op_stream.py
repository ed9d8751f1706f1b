"""KV.Stream, the multiplexed operation stream the client library uses: real node processes.

Every operation sent on a stream gets exactly one answer with its id, the same answer the unary
call gives, and errors keep saying whether the operation may have happened."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from clusterharness import Cluster, NodeProc

from kvstore import errors
from kvstore.client import AsyncClient
from kvstore.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(180)


def _settled_leader(cluster: Cluster) -> NodeProc:
    return cluster.settled_leader()


def _session(seq: int) -> kv_pb2.Session:
    return kv_pb2.Session(client_id=4242, seq=seq, ack=1)


async def _exchange(address: str, batches: list[list[kv_pb2.Op]], timeout: float = 20.0) -> dict[int, list[kv_pb2.OpResult]]:
    """Send each batch, wait for all of its answers, then send the next; answers by id."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = kv_pb2_grpc.KVStub(ch).Stream()
        got: dict[int, list[kv_pb2.OpResult]] = {}
        for ops in batches:
            await call.write(kv_pb2.OpBatch(ops=ops))
            want = {op.id for op in ops}
            deadline = time.monotonic() + timeout
            while not want <= set(got):
                batch = await asyncio.wait_for(call.read(), max(0.01, deadline - time.monotonic()))
                assert batch is not grpc.aio.EOF
                for r in batch.results:
                    got.setdefault(r.id, []).append(r)
        await call.done_writing()
        # Nothing more arrives: the stream ends once every operation is answered.
        while (batch := await asyncio.wait_for(call.read(), timeout)) is not grpc.aio.EOF:
            for r in batch.results:
                got.setdefault(r.id, []).append(r)
        return got


def test_each_operation_is_answered_once_like_the_unary_call(cluster: Cluster) -> None:
    leader = _settled_leader(cluster)
    first = [
        kv_pb2.Op(id=i, put=kv_pb2.PutRequest(key=b"s/%d" % i, value=b"v%d" % i, session=_session(i)))
        for i in range(1, 51)
    ]
    first += [
        kv_pb2.Op(id=100, put=kv_pb2.PutRequest(key=b"", value=b"x", session=_session(100))),
        kv_pb2.Op(id=101, put=kv_pb2.PutRequest(key=b"big", value=b"x" * (2 << 20), session=_session(101))),
        kv_pb2.Op(id=102),  # no operation in it
    ]
    second = [kv_pb2.Op(id=200 + i, get=kv_pb2.GetRequest(key=b"s/%d" % i)) for i in range(1, 51)]
    third = [
        kv_pb2.Op(id=300, get=kv_pb2.GetRequest(key=b"missing")),
        kv_pb2.Op(id=301, cas=kv_pb2.CasRequest(key=b"s/1", expected=b"v1", value=b"new", session=_session(301))),
        kv_pb2.Op(id=302, cas=kv_pb2.CasRequest(key=b"s/2", expected=b"nope", value=b"new", session=_session(302))),
        kv_pb2.Op(id=303, delete=kv_pb2.DeleteRequest(key=b"s/3", session=_session(303))),
        kv_pb2.Op(id=304, delete=kv_pb2.DeleteRequest(key=b"never", session=_session(304))),
    ]
    got = asyncio.run(_exchange(leader.address, [first, second, third]))
    assert sorted(got) == sorted(op.id for op in first + second + third)
    assert all(len(rs) == 1 for rs in got.values()), "an operation was answered twice"
    res = {i: rs[0] for i, rs in got.items()}
    for i in range(1, 51):
        assert res[i].WhichOneof("result") == "put" and res[i].put.error.code == kv_pb2.OK
        g = res[200 + i]
        assert g.get.error.code == kv_pb2.OK and g.get.found and g.get.value == b"v%d" % i
        assert g.get.node_id == leader.id
    assert res[100].put.error.code == kv_pb2.INVALID_ARGUMENT and not res[100].put.error.indeterminate
    assert res[101].put.error.code == kv_pb2.VALUE_TOO_LARGE and not res[101].put.error.indeterminate
    assert res[102].WhichOneof("result") is None
    assert res[300].get.error.code == kv_pb2.OK and not res[300].get.found
    assert res[301].cas.swapped and res[301].cas.found
    assert not res[302].cas.swapped and res[302].cas.current == b"v2"
    assert res[303].delete.existed and not res[304].delete.existed
    # The stream fills each write's reply in place: exactly the message the unary path builds
    # (an OK error present with the map version, then the applied result's fields, nothing else).
    for i in (*range(1, 51), 301, 302, 303, 304):
        kind = res[i].WhichOneof("result")
        r = getattr(res[i], kind)
        assert r.HasField("error") and r.error.code == kv_pb2.OK and r.error.shard_version > 0
        assert r.index > 0 and (r.revision > 0) == (i not in (302, 304)), (i, r)
    assert res[1].put == kv_pb2.PutResponse(
        error=kv_pb2.Error(shard_version=res[1].put.error.shard_version), index=res[1].put.index,
        revision=res[1].put.revision,
    )

    async def unary_retries() -> tuple[kv_pb2.PutResponse, kv_pb2.CasResponse]:
        async with grpc.aio.insecure_channel(leader.address) as ch:
            stub = kv_pb2_grpc.KVStub(ch)
            put = await stub.Put(kv_pb2.PutRequest(key=b"s/7", value=b"v7", session=_session(7)), timeout=20)
            cas = await stub.Cas(
                kv_pb2.CasRequest(key=b"s/2", expected=b"nope", value=b"new", session=_session(302)), timeout=20
            )
            return put, cas

    # The same writes retried (same sessions) on the unary calls: answered from the session
    # table (the same revision and outcome; the index is the retry's own entry), with the very
    # messages the stream answered otherwise.
    unary_put, unary_cas = asyncio.run(unary_retries())
    for unary, streamed in ((unary_put, res[7].put), (unary_cas, res[302].cas)):
        assert unary.index > streamed.index
        unary.index = streamed.index
        assert unary.SerializeToString() == streamed.SerializeToString()

    # A retry of an applied write (same session) is answered from the session table, not applied
    # again: the CAS that swapped says so again although the value is no longer "v1".
    again = asyncio.run(_exchange(leader.address, [[
        kv_pb2.Op(id=1, cas=kv_pb2.CasRequest(key=b"s/1", expected=b"v1", value=b"new", session=_session(301))),
        kv_pb2.Op(id=2, get=kv_pb2.GetRequest(key=b"s/1")),
    ]]))
    assert again[1][0].cas.swapped
    assert again[2][0].get.value == b"new"


def test_a_batch_of_writes_is_proposed_together_in_order_and_a_repeated_id_is_refused(cluster: Cluster) -> None:
    """The writes of one batch go to their group in one append, in the batch's order (a CAS that
    expects what an earlier put of the same batch wrote swaps); an operation id repeated inside
    the batch is refused (definite) while the first one is answered normally."""
    leader = _settled_leader(cluster)
    batch = [
        kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"b/k", value=b"one", session=_session(1001))),
        kv_pb2.Op(id=2, cas=kv_pb2.CasRequest(key=b"b/k", expected=b"one", value=b"two", session=_session(1002))),
        kv_pb2.Op(id=3, put=kv_pb2.PutRequest(key=b"b/other", value=b"x", session=_session(1003))),
        kv_pb2.Op(id=3, put=kv_pb2.PutRequest(key=b"b/dup", value=b"y", session=_session(1004))),
        kv_pb2.Op(id=4, get=kv_pb2.GetRequest(key=b"b/k")),
    ]
    got = asyncio.run(_exchange(leader.address, [batch]))
    assert got[1][0].put.error.code == kv_pb2.OK
    assert got[2][0].cas.swapped, got[2][0]
    assert got[2][0].cas.index == got[1][0].put.index + 1  # one append, in the batch's order
    three = sorted(r.put.error.code for r in got[3])
    assert three == sorted([kv_pb2.OK, kv_pb2.INVALID_ARGUMENT]), got[3]
    refused = next(r.put.error for r in got[3] if r.put.error.code != kv_pb2.OK)
    assert "already in flight" in refused.message and not refused.indeterminate
    after = asyncio.run(_exchange(leader.address, [[kv_pb2.Op(id=1, get=kv_pb2.GetRequest(key=b"b/dup"))]]))
    assert not after[1][0].get.found  # the refused one was never proposed


def test_stream_to_a_follower_redirects_writes_and_serves_reads(cluster: Cluster) -> None:
    for _ in range(20):  # bounded: the leader balancer may move the leadership between look and put
        leader = _settled_leader(cluster)
        wrote = asyncio.run(_exchange(leader.address, [[
            kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"f", value=b"1", session=_session(1))),
        ]]))
        if wrote[1][0].put.error.code != kv_pb2.NOT_LEADER:
            break
    assert wrote[1][0].put.error.code == kv_pb2.OK, wrote[1][0].put.error
    for _ in range(20):  # bounded: an election or a balancer's move under way: look again
        now_leading = _settled_leader(cluster)
        follower = next(n for n in cluster.nodes.values() if n.id != now_leading.id)
        got = asyncio.run(_exchange(follower.address, [[
            kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"g", value=b"2", session=_session(2))),
            kv_pb2.Op(id=2, get=kv_pb2.GetRequest(key=b"f")),  # linearizable, through the leader's read index
            kv_pb2.Op(id=3, get=kv_pb2.GetRequest(key=b"f", consistency=kv_pb2.STALE)),
        ]]))
        # STALE_REPLICA: the follower's read-index round did not finish within its wait (a loaded
        # machine): the definite "read elsewhere" answer. (A change of leader fails the read at
        # once with NOT_LEADER / NO_LEADER instead: `Host._drop_reads`.)
        retry = (kv_pb2.NO_LEADER, kv_pb2.NOT_LEADER, kv_pb2.TIMEOUT, kv_pb2.STALE_REPLICA)
        if got[2][0].get.error.code not in retry and got[1][0].put.error.code != kv_pb2.OK:
            break  # put OK: the follower had become the leader meanwhile
    put = got[1][0].put
    assert put.error.code in (kv_pb2.NOT_LEADER, kv_pb2.NO_LEADER) and not put.error.indeterminate, put
    if put.error.code == kv_pb2.NOT_LEADER and put.error.leader_hint:
        assert put.error.leader_hint in {n.address for n in cluster.nodes.values() if n.id != follower.id}
    assert got[2][0].get.error.code == kv_pb2.OK, got[2][0]
    assert got[2][0].get.value == b"1" and got[2][0].get.node_id == follower.id, got[2][0]
    assert got[3][0].get.error.code == kv_pb2.OK and got[3][0].get.node_id == follower.id


def test_server_times_out_operations_it_cannot_finish(cluster: Cluster) -> None:
    """Without a quorum a write cannot commit: the stream answers TIMEOUT, indeterminate for the
    write (it may still commit later), definite for the read, within the operation's timeout."""
    leader = _settled_leader(cluster)
    asyncio.run(_exchange(leader.address, [[
        kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"t", value=b"1", session=_session(1))),
    ]]))
    stopped = [n for n in cluster.nodes.values() if n.id != leader.id]
    for n in stopped:
        assert n.proc is not None
        os.kill(n.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        got = asyncio.run(_exchange(leader.address, [[
            kv_pb2.Op(id=1, timeout_ms=400, put=kv_pb2.PutRequest(key=b"t", value=b"2", session=_session(2))),
            kv_pb2.Op(id=2, timeout_ms=400, get=kv_pb2.GetRequest(key=b"t")),
        ]]))
        took = time.monotonic() - t0
    finally:
        for n in stopped:
            assert n.proc is not None
            os.kill(n.proc.pid, signal.SIGCONT)
    put, get = got[1][0].put, got[2][0].get
    assert put.error.code == kv_pb2.TIMEOUT and put.error.indeterminate, put
    # The read times out, or fails at once when check-quorum deposes the cut-off leader first:
    # definite either way.
    assert get.error.code in (kv_pb2.TIMEOUT, kv_pb2.NOT_LEADER, kv_pb2.NO_LEADER), get
    assert not get.error.indeterminate
    assert took < 5.0


def test_client_multiplexes_concurrent_operations(cluster: Cluster) -> None:
    async def run() -> None:
        async with AsyncClient(cluster.endpoints, timeout=20) as c:
            await asyncio.gather(*(c.put(b"m/%03d" % i, b"%d" % i) for i in range(300)))
            values = await asyncio.gather(*(c.get(b"m/%03d" % i) for i in range(300)))
            assert values == [b"%d" % i for i in range(300)]
            swaps = await asyncio.gather(*(c.cas(b"m/000", b"0", b"w%d" % i) for i in range(20)))
            assert sum(swaps) == 1
            deleted = await asyncio.gather(*(c.delete(b"m/%03d" % i) for i in range(0, 300, 3)))
            assert all(deleted)
            assert await c.get(b"m/003") is None and await c.get(b"m/004") == b"4"
            assert len(c.channels.muxes) >= 1 and all(m._pending == {} for m in c.channels.muxes.values())

    asyncio.run(run())


def test_client_errors_from_a_broken_stream_say_whether_the_write_may_have_happened(cluster: Cluster) -> None:
    """Writes in flight when the leader dies are either acknowledged (and then readable) or fail
    as indeterminate; none fails as definite and then turns out applied."""
    leader = _settled_leader(cluster)

    async def run() -> tuple[list[int], list[tuple[int, errors.KVError]]]:
        ok: list[int] = []
        failed: list[tuple[int, errors.KVError]] = []
        async with AsyncClient([leader.address], timeout=1.5, attempt_timeout=1.0) as c:
            await c.put(b"warm", b"1")

            async def one(i: int) -> None:
                try:
                    await c.put(b"b/%03d" % i, b"x")
                    ok.append(i)
                except errors.KVError as e:
                    failed.append((i, e))

            tasks = [asyncio.ensure_future(one(i)) for i in range(200)]
            await asyncio.sleep(0.01)
            leader.kill9()
            await asyncio.gather(*tasks)
        return ok, failed

    ok, failed = asyncio.run(run())
    assert len(ok) + len(failed) == 200
    cluster.wait_leader(exclude=leader.id)

    async def check() -> dict[int, bool]:
        async with AsyncClient([n.address for n in cluster.nodes.values() if n.id != leader.id], timeout=20) as c:
            return {i: (await c.get(b"b/%03d" % i)) is not None for i in range(200)}

    present = asyncio.run(check())
    assert all(present[i] for i in ok), "an acknowledged write was lost"
    for i, e in failed:
        if present[i]:
            assert e.indeterminate, f"write {i} failed as definite ({e}) but was applied"


def test_scans_take_as_few_messages_as_their_chunks_allow(cluster: Cluster) -> None:
    """KV.Scan: the ranges served ride with the first chunk and more=False with the last (a scan
    that fits in one chunk of 512 pairs is one message). KV.Stream: a scan is answered in one
    message, whole, or with more=True and nothing when it does not fit; the client falls back to
    KV.Scan for such a part and gets the same keys."""
    leader = _settled_leader(cluster)
    keys = [b"sc/%05d" % i for i in range(1100)]

    async def fill() -> None:
        async with AsyncClient(cluster.endpoints, timeout=20) as c:
            sem = asyncio.Semaphore(64)

            async def put(k: bytes) -> None:
                async with sem:
                    await c.put(k, k[::-1])

            await asyncio.gather(*(put(k) for k in keys))

    asyncio.run(fill())
    g = 1  # the data group of a 3-node cluster

    async def scan_rpc(req: kv_pb2.ScanRequest) -> list[kv_pb2.ScanResponse]:
        async with grpc.aio.insecure_channel(leader.address) as ch:
            return [m async for m in kv_pb2_grpc.KVStub(ch).Scan(req)]

    whole = asyncio.run(scan_rpc(kv_pb2.ScanRequest(prefix=b"sc/", group=g)))
    assert [(len(m.items), m.more) for m in whole] == [(512, True), (512, True), (76, False)]
    assert [kv.key for m in whole for kv in m.items] == keys
    assert all(kv.value == kv.key[::-1] for m in whole for kv in m.items)
    first = whole[0]
    assert list(first.owned_lo) == [0] and list(first.owned_hi) == [2**64 - 1]
    assert first.node_id == leader.id and first.index > 0
    small = asyncio.run(scan_rpc(kv_pb2.ScanRequest(prefix=b"sc/", limit=100, group=g)))
    assert [(len(m.items), m.more) for m in small] == [(100, False)] and small[0].owned_hi
    empty = asyncio.run(scan_rpc(kv_pb2.ScanRequest(prefix=b"none/", group=g)))
    assert [(len(m.items), m.more) for m in empty] == [(0, False)] and empty[0].owned_hi

    got = asyncio.run(_exchange(leader.address, [[
        kv_pb2.Op(id=1, scan=kv_pb2.ScanRequest(prefix=b"sc/", limit=100, group=g)),
        kv_pb2.Op(id=2, scan=kv_pb2.ScanRequest(prefix=b"sc/", limit=600, group=g)),
        kv_pb2.Op(id=3, scan=kv_pb2.ScanRequest(start=b"sc/01000", group=g)),
        kv_pb2.Op(id=4, scan=kv_pb2.ScanRequest(prefix=b"sc/", group=99)),
    ]]))
    assert all(len(rs) == 1 for rs in got.values()) and sorted(got) == [1, 2, 3, 4]
    one = got[1][0].scan
    assert one.error.code == kv_pb2.OK and not one.more
    assert [kv.key for kv in one.items] == keys[:100] and one.node_id == leader.id and one.owned_hi
    too_big = got[2][0].scan
    assert too_big.error.code == kv_pb2.OK and too_big.more and not too_big.items
    tail = got[3][0].scan
    assert not tail.more and [kv.key for kv in tail.items] == keys[1000:]
    assert got[4][0].scan.error.code == kv_pb2.WRONG_SHARD

    async def client_scans() -> tuple[list[bytes], list[bytes]]:
        async with AsyncClient(cluster.endpoints, timeout=20) as c:
            return [k async for k, _ in c.scan(b"sc/", limit=60)], [k async for k, _ in c.scan(b"sc/", limit=600)]

    sixty, six_hundred = asyncio.run(client_scans())
    assert sixty == keys[:60] and six_hundred == keys[:600]
