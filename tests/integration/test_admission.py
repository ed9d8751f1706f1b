"""Admission control on a real node (issue 15): each refusal path (rate limit on unary calls and
per stream operation, load shedding on a memory ceiling, the NOSPACE space alarm, the cap on
concurrent streams per connection, the idle-connection timeout), that every refusal is definite
and nothing refused was applied, that the client library honours retry-after, and that a client
refused for its rate harms no other client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clusterharness import free_ports
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onenode import OneNode, one_node

from kvstore import errors
from kvstore.client import AsyncClient
from kvstore.node.host import RaftSettings
from kvstore.node.ratelimit import RateLimit
from kvstore.node.shedding import ShedSettings
from kvstore.security import certs
from kvstore.server.admission import RETRY_AFTER_KEY, AdmissionSettings
from kvstore.server.config import NodeConfig
from kvstore.server.node import Node
from kvstore.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(120)

DATA_GROUP = 1


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Wait until `cond()` holds (polling), failing with `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def stored(n: OneNode, key: bytes) -> bytes | None:
    assert n.node.store is not None
    return n.node.store.get(DATA_GROUP, key)


async def stream_batch(stub: kv_pb2_grpc.KVStub, ops: list[kv_pb2.Op]) -> dict[int, kv_pb2.OpResult]:
    """Send one batch on a new KV.Stream and collect one result per operation."""
    call = stub.Stream(iter([kv_pb2.OpBatch(ops=ops)]), timeout=20)
    out: dict[int, kv_pb2.OpResult] = {}
    async for batch in call:
        for r in batch.results:
            out[r.id] = r
    return out


def put_op(i: int, key: bytes, value: bytes = b"v") -> kv_pb2.Op:
    return kv_pb2.Op(id=i, put=kv_pb2.PutRequest(key=key, value=value))


# --- rate limits -------------------------------------------------------------------------------


async def _stream_batch_over_the_rate_is_cut_and_the_rest_refused_definitely(tmp_path: Path) -> None:
    adm = AdmissionSettings(rate_limit=RateLimit(rate=4, burst=12))
    async with one_node(tmp_path, admission=adm) as n, grpc.aio.insecure_channel(n.address) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        assert n.node.admission is not None and n.node.admission.limiter is not None
        bucket = n.node.admission.limiter.buckets["ip:127.0.0.1"]  # the warm-up's writes spent some
        await wait_for(lambda: _true(bucket.tokens + (time.monotonic() - bucket.at) * 4 >= 12), "a full bucket")
        keys = [f"s{i}".encode() for i in range(30)]
        results = await stream_batch(stub, [put_op(i, k) for i, k in enumerate(keys)])
        assert sorted(results) == list(range(30))  # every operation answered
        ok = [i for i, r in results.items() if r.put.error.code == kv_pb2.OK]
        refused = [i for i, r in results.items() if r.put.error.code == kv_pb2.RESOURCE_EXHAUSTED]
        assert len(ok) + len(refused) == 30
        # 12 tokens, plus what refilled between the bucket's refill and the batch (4 per second).
        assert 12 <= len(ok) <= 14, (ok, refused)
        assert ok == list(range(len(ok)))  # the first ones of the batch ran
        for i in refused:
            e = results[i].put.error
            assert e.retry_after_ms > 0 and not e.indeterminate and "rate limit" in e.message
        # Nothing refused was applied; everything admitted was.
        last = keys[ok[-1]]
        await wait_for(lambda: _true(stored(n, last) is not None), "the admitted puts to apply")
        assert all(stored(n, keys[i]) == b"v" for i in ok)
        assert all(stored(n, keys[i]) is None for i in refused)
        assert n.node.admission.refused["rate_limit"] == len(refused)


async def _true(v: bool) -> bool:
    return v


async def _unary_calls_over_the_rate_end_resource_exhausted_with_retry_after(tmp_path: Path) -> None:
    adm = AdmissionSettings(rate_limit=RateLimit(rate=1, burst=3))
    async with one_node(tmp_path, admission=adm) as n, grpc.aio.insecure_channel(n.address) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        assert n.node.admission is not None and n.node.admission.limiter is not None
        bucket = n.node.admission.limiter.buckets["ip:127.0.0.1"]
        await wait_for(lambda: _true(bucket.tokens + (time.monotonic() - bucket.at) >= 3), "a full bucket")
        codes = []
        for i in range(6):
            try:
                r = await stub.Put(kv_pb2.PutRequest(key=b"u%d" % i, value=b"x"), timeout=5)
                codes.append(r.error.code)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                trailer = dict(e.trailing_metadata() or ())
                assert int(trailer[RETRY_AFTER_KEY]) > 0
                assert "definite" in (e.details() or "")
                codes.append(-1)
        assert codes[:3] == [kv_pb2.OK] * 3 and codes[-1] == -1  # 3 tokens (maybe one more refilled)
        refused = [i for i, c in enumerate(codes) if c == -1]
        assert all(stored(n, b"u%d" % i) is None for i in refused)
        # Scans (server streaming) are limited too; health checks and node traffic are not.
        with pytest.raises(grpc.aio.AioRpcError) as scan:
            async for _ in stub.Scan(kv_pb2.ScanRequest(group=DATA_GROUP), timeout=5):
                pass
        assert scan.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING


async def _the_client_waits_out_the_rate_limit_and_every_write_lands(tmp_path: Path) -> None:
    adm = AdmissionSettings(rate_limit=RateLimit(rate=40, burst=4))
    async with one_node(tmp_path, admission=adm) as n, AsyncClient([n.address], timeout=20, overload_retries=50) as kv:
        await asyncio.gather(*(kv.put(b"c%d" % i, b"%d" % i) for i in range(40)))
        assert n.node.admission is not None and n.node.admission.refused["rate_limit"] > 0
        for i in range(40):
            assert await kv.get(b"c%d" % i) == b"%d" % i


async def _the_client_gives_up_with_a_definite_error_when_the_wait_is_too_long(tmp_path: Path) -> None:
    adm = AdmissionSettings(rate_limit=RateLimit(rate=0.1, burst=20))  # then a token every 10 s
    async with one_node(tmp_path, admission=adm) as n:
        async with AsyncClient([n.address], timeout=3) as kv:
            done = 0
            with pytest.raises(errors.ResourceExhausted) as exc:
                for i in range(21):  # the bucket holds at most 20 tokens
                    await kv.put(b"k%d" % i, b"1")
                    done += 1
            assert exc.value.definite and exc.value.retry_after > 0 and done >= 10
        assert stored(n, b"k%d" % done) is None


async def _a_client_refused_for_its_rate_does_not_harm_another(tmp_path: Path) -> None:
    """Two users (client certificates alice and bob) of a TLS node limited to 5 ops/s and bursts
    of 20 each: alice floods it and is refused; bob's writes all go through, none refused."""
    d = tmp_path / "certs"
    certs.create_ca(d)
    certs.create_node(d, 1, ["127.0.0.1"])
    certs.create_client(d, "alice")
    certs.create_client(d, "bob")
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    cfg = NodeConfig(
        id=1, data_dir=tmp_path / "n1", listen=address, peers={1: address}, sync=False, request_timeout=3,
        raft=RaftSettings(tick_ms=20), groups=1, replication=1, certs_dir=d,
        admission=AdmissionSettings(rate_limit=RateLimit(rate=5, burst=20)),
    )
    node = Node(cfg)
    await node.start()
    try:
        async with AsyncClient([address], certs_dir=d, user="bob", timeout=20) as bob:
            await bob.put(b"bob/0", b"0")  # the node is up and leads its group
            async with AsyncClient([address], certs_dir=d, user="alice", timeout=2, overload_retries=0) as alice:
                results = await asyncio.gather(
                    *(alice.put(b"alice/%d" % i, b"x") for i in range(80)), return_exceptions=True
                )
                refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
                assert refused and all(r.definite for r in refused)
                assert all(type(r) is int or isinstance(r, errors.ResourceExhausted) for r in results)
                assert node.admission is not None
                refused_before = node.admission.refused["rate_limit"]
                for i in range(1, 8):  # within bob's own burst: none may be refused
                    await bob.put(b"bob/%d" % i, b"%d" % i)
                assert node.admission.refused["rate_limit"] == refused_before, dict(node.admission.limiter.buckets)
                assert node.admission.limiter is not None
                assert set(node.admission.limiter.buckets) == {"user:alice", "user:bob"}
    finally:
        await node.stop(grace=0.5)


async def _users_of_one_address_have_their_own_buckets_which_follow_them_across_connections(
    tmp_path: Path,
) -> None:
    """Auth on, a plaintext node (no certificates): alice and bob log in from the same address,
    over the same connection. The rate limit runs after the guard, so each has a bucket of its
    own (keyed by the token's user, not the address): alice exhausts hers and is refused
    (definite, nothing applied) while bob, on the very same connection, is not; alice's bucket
    follows her to a new connection, for unary calls and KV.Stream operations alike. The limiter's
    clock is frozen once the users exist, so no bucket refills during the test."""
    adm = AdmissionSettings(rate_limit=RateLimit(rate=1, burst=20))
    async with one_node(tmp_path, admission=adm) as n, grpc.aio.insecure_channel(n.address) as ch:
        assert n.node.admission is not None and n.node.admission.limiter is not None
        tokens = await _users_alice_and_bob(ch)
        frozen = time.monotonic()
        n.node.admission.clock = lambda: frozen
        kv = kv_pb2_grpc.KVStub(ch)

        async def put(stub: kv_pb2_grpc.KVStub, who: str, key: bytes) -> str:
            try:
                r = await stub.Put(kv_pb2.PutRequest(key=key, value=b"v"), metadata=_bearer(tokens[who]), timeout=5)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "definite" in (e.details() or "")
                assert int(dict(e.trailing_metadata() or ())[RETRY_AFTER_KEY]) > 0
                return "refused"
            assert r.error.code == kv_pb2.OK, r.error
            return "ok"

        alice = [await put(kv, "alice", b"data/a%d" % i) for i in range(25)]
        assert alice == ["ok"] * 20 + ["refused"] * 5  # her burst, no refill (the clock is frozen)
        assert [await put(kv, "bob", b"data/b%d" % i) for i in range(5)] == ["ok"] * 5  # same connection
        assert all(stored(n, b"data/a%d" % i) is None for i in range(20, 25))
        assert {"user:alice", "user:bob"} <= set(n.node.admission.limiter.buckets)
        # A new connection from the same host does not buy alice a new bucket; bob is still served.
        async with grpc.aio.insecure_channel(n.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch2:
            kv2 = kv_pb2_grpc.KVStub(ch2)
            assert await put(kv2, "alice", b"data/again") == "refused"
            ops = [put_op(i, b"data/s%d" % i) for i in range(3)]
            for who, code in (("alice", kv_pb2.RESOURCE_EXHAUSTED), ("bob", kv_pb2.OK)):
                call = kv2.Stream(iter([kv_pb2.OpBatch(ops=ops)]), metadata=_bearer(tokens[who]), timeout=20)
                results = {r.id: r async for b in call for r in b.results}
                assert sorted(results) == [0, 1, 2]
                assert all(r.put.error.code == code for r in results.values()), (who, results)
                if code != kv_pb2.OK:
                    assert all(r.put.error.retry_after_ms > 0 and not r.put.error.indeterminate
                               for r in results.values())
        assert stored(n, b"data/again") is None


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def _users_alice_and_bob(ch: grpc.aio.Channel) -> dict[str, str]:
    """root, alice and bob (readwrite on data/), auth enabled; their tokens."""
    from kvstore.v1 import auth_pb2, auth_pb2_grpc

    a = auth_pb2_grpc.AuthStub(ch)
    op = auth_pb2.AuthChangeRequest
    perm = auth_pb2.Permission(kind=auth_pb2.READWRITE, key=b"data/", range_end=b"data0")
    for req in (op(op=op.USER_ADD, user="root", password="rootpw"), op(op=op.USER_ADD, user="alice", password="a"),
                op(op=op.USER_ADD, user="bob", password="b"), op(op=op.ROLE_ADD, role="rw"),
                op(op=op.ROLE_GRANT, role="rw", permission=perm), op(op=op.USER_GRANT_ROLE, user="alice", role="rw"),
                op(op=op.USER_GRANT_ROLE, user="bob", role="rw"), op(op=op.ENABLE)):
        r = await a.Change(req, timeout=10)
        assert r.error.code == kv_pb2.OK, r.error
    tokens = {}
    for user, pw in (("alice", "a"), ("bob", "b")):
        r = await a.Authenticate(auth_pb2.AuthenticateRequest(user=user, password=pw), timeout=10)
        assert r.error.code == kv_pb2.OK, r.error
        tokens[user] = r.token
    return tokens


# --- load shedding -----------------------------------------------------------------------------


async def _memory_ceiling_sheds_writes_and_serves_reads(tmp_path: Path) -> None:
    adm = AdmissionSettings(shed=ShedSettings(memory_limit=1 << 20), sample_interval=0.05)  # 1 MiB: always over
    async with one_node(tmp_path, admission=adm) as n, grpc.aio.insecure_channel(n.address) as ch:
        assert n.node.admission is not None and n.node.admission.shedder is not None
        shedder = n.node.admission.shedder
        await wait_for(lambda: _true(shedder.memory_shedding), "the first memory sample")
        stub = kv_pb2_grpc.KVStub(ch)

        async def readable() -> bool:
            r = await stub.Get(kv_pb2.GetRequest(key=b"nothing"), timeout=5)
            return r.error.code == kv_pb2.OK

        await wait_for(readable, "a linearizable read (reads are served while shedding)")
        r = await stub.Put(kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=5)
        assert r.error.code == kv_pb2.RESOURCE_EXHAUSTED and r.error.retry_after_ms > 0
        assert not r.error.indeterminate and "memory" in r.error.message
        d = await stub.Delete(kv_pb2.DeleteRequest(key=b"k"), timeout=5)
        assert d.error.code == kv_pb2.RESOURCE_EXHAUSTED
        res = await stream_batch(stub, [put_op(1, b"k2"), kv_pb2.Op(id=2, get=kv_pb2.GetRequest(key=b"k2"))])
        assert res[1].put.error.code == kv_pb2.RESOURCE_EXHAUSTED and res[1].put.error.retry_after_ms > 0
        assert res[2].get.error.code == kv_pb2.OK and not res[2].get.found
        assert stored(n, b"k") is None and stored(n, b"k2") is None


# --- the space quota ---------------------------------------------------------------------------


async def _etcd_sees_nospace(address: str) -> None:
    """etcd's API shows the alarm as etcd does: Maintenance.Alarm GET lists it, Status.errors
    names it, a Put is refused RESOURCE_EXHAUSTED "database space exceeded"."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        m = rpc_pb2_grpc.MaintenanceStub(ch)
        got = await m.Alarm(rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET), timeout=10)
        assert [(a.memberID, a.alarm) for a in got.alarms] == [(1, rpc_pb2.NOSPACE)]
        assert list((await m.Status(rpc_pb2.StatusRequest(), timeout=10)).errors) == ["memberID:1 alarm:NOSPACE "]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc_pb2_grpc.KVStub(ch).Put(rpc_pb2.PutRequest(key=b"small", value=b"1"), timeout=10)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                      "etcdserver: mvcc: database space exceeded")


async def _nospace_alarm_refuses_writes_serves_reads_and_deletes_until_disarmed(tmp_path: Path) -> None:
    """A real node with a small quota: writes past it raise the NOSPACE alarm in the metadata
    group; puts and CAS are refused (definite), reads and deletes served; a disarm while still
    over the quota does not stick; after deletes and compaction, disarm restores writes."""
    quota = 512 << 10
    async with one_node(tmp_path, admission=AdmissionSettings(quota_bytes=quota, sample_interval=0.05)) as n:
        node = n.node
        assert node.admission is not None and node.store is not None
        store, watch = node.store, node.admission.quota
        assert store.live_bytes() < quota  # type: ignore[attr-defined]
        async with AsyncClient([n.address], timeout=10) as kv:
            big = b"x" * (64 << 10)
            written = []
            with pytest.raises(errors.NoSpace) as exc:
                for i in range(100):  # bounded: 6.4 MiB at most
                    await kv.put(b"big/%d" % i, big)
                    written.append(b"big/%d" % i)
            assert exc.value.definite
            assert len(written) >= 4
            alarms = await kv.alarms()
            assert [(a.node_id, a.type) for a in alarms] == [(1, "NOSPACE")]
            await _etcd_sees_nospace(n.address)
            # Reads are served; puts and CAS refused, definitely, and not applied.
            assert await kv.get(written[0]) == big
            with pytest.raises(errors.NoSpace):
                await kv.put(b"small", b"1")
            with pytest.raises(errors.NoSpace):
                await kv.cas(written[0], big, b"y")
            assert stored(n, b"small") is None and stored(n, written[0]) == big
            # Disarmed while still over the quota: raised again at the next check.
            await kv.disarm_alarms()

            async def raised() -> bool:
                return bool(await kv.alarms())

            await wait_for(raised, "the alarm raised again while over the quota")
            # Deletes are served; the deleted values stay in the keys' history until it is
            # compacted (as in etcd); a snapshot frees the log; then disarm works.
            for k in written:
                assert await kv.delete(k) is True
            await kv.compact(kv.revision)
            await kv.snapshot(n.address)
            await wait_for(lambda: _true(store.live_bytes() <= quota), "space back under the quota")  # type: ignore[attr-defined]
            assert await kv.disarm_alarms() == []
            await kv.put(b"small", b"1")
            assert await kv.get(b"small") == b"1"
            # It stays disarmed: the watch measured the store (under its quota) twice since.
            seen = watch.checks
            await wait_for(lambda: _true(watch.checks >= seen + 2), "two more measurements")
            assert watch.used <= quota and await kv.alarms() == []


# --- connection limits -------------------------------------------------------------------------


async def _a_connection_over_its_stream_cap_waits_and_other_connections_are_served(tmp_path: Path) -> None:
    adm = AdmissionSettings(max_streams_per_connection=2)
    async with one_node(tmp_path, admission=adm) as n:
        ch = grpc.aio.insecure_channel(n.address)
        # A second connection of its own (not the shared subchannel of the first).
        other = grpc.aio.insecure_channel(n.address, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            stub = kv_pb2_grpc.KVStub(ch)
            queues: list[asyncio.Queue[kv_pb2.OpBatch | None]] = [asyncio.Queue(), asyncio.Queue()]

            async def feed(q: asyncio.Queue[kv_pb2.OpBatch | None]) -> AsyncIterator[kv_pb2.OpBatch]:
                while (b := await q.get()) is not None:
                    yield b

            streams = [stub.Stream(feed(q)) for q in queues]
            for i, (q, s) in enumerate(zip(queues, streams, strict=True)):
                await q.put(kv_pb2.OpBatch(ops=[put_op(1, b"open%d" % i)]))
                assert (await s.read()).results[0].put.error.code == kv_pb2.OK
            # The cap is reached: a third call on this connection is held back by HTTP/2 and never
            # reaches the server (here it ends at its deadline).
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await stub.Put(kv_pb2.PutRequest(key=b"third", value=b"x"), timeout=1)
            assert over.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert stored(n, b"third") is None
            # Another connection is unharmed.
            r = await kv_pb2_grpc.KVStub(other).Put(kv_pb2.PutRequest(key=b"other", value=b"x"), timeout=5)
            assert r.error.code == kv_pb2.OK
            # A freed stream lets the first connection go on.
            await queues[0].put(None)
            while await streams[0].read() is not grpc.aio.EOF:
                pass
            r = await stub.Put(kv_pb2.PutRequest(key=b"third", value=b"x"), timeout=5)
            assert r.error.code == kv_pb2.OK
            await queues[1].put(None)
            while await streams[1].read() is not grpc.aio.EOF:
                pass
        finally:
            await ch.close()
            await other.close()


async def _an_idle_connection_is_closed_by_the_server(tmp_path: Path) -> None:
    adm = AdmissionSettings(idle_timeout=0.3)
    async with one_node(tmp_path, admission=adm) as n, grpc.aio.insecure_channel(n.address) as ch:
        r = await kv_pb2_grpc.KVStub(ch).Put(kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=5)
        assert r.error.code == kv_pb2.OK
        assert ch.get_state() == grpc.ChannelConnectivity.READY
        await _wait_idle(ch, "the idle connection was never closed")  # the server's GOAWAY
        # The channel reconnects on the next call.
        r = await kv_pb2_grpc.KVStub(ch).Get(kv_pb2.GetRequest(key=b"k"), timeout=5)
        assert r.found and r.value == b"v"


async def _wait_idle(ch: grpc.aio.Channel, what: str, timeout: float = 20.0) -> None:
    """Wait until the channel's connection was closed (the channel goes IDLE)."""
    end = time.monotonic() + timeout
    state = ch.get_state()
    while state != grpc.ChannelConnectivity.IDLE:
        left = end - time.monotonic()
        assert left > 0, f"{what} (channel state {state})"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ch.wait_for_state_change(state), left)
        state = ch.get_state()


async def _a_client_pinging_too_often_is_disconnected(tmp_path: Path) -> None:
    adm = AdmissionSettings(max_ping_strikes=2)
    async with one_node(tmp_path, admission=adm) as n:
        pinger = grpc.aio.insecure_channel(n.address, options=[
            ("grpc.keepalive_time_ms", 100), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ])
        try:
            r = await kv_pb2_grpc.KVStub(pinger).Put(kv_pb2.PutRequest(key=b"p", value=b"1"), timeout=5)
            assert r.error.code == kv_pb2.OK
            await _wait_idle(pinger, "the server never sent the over-eager pinger away")
        finally:
            await pinger.close()
        # Others are served as before.
        async with grpc.aio.insecure_channel(n.address) as ch:
            r = await kv_pb2_grpc.KVStub(ch).Get(kv_pb2.GetRequest(key=b"p"), timeout=5)
            assert r.found


def test_stream_batch_over_the_rate_is_cut_and_the_rest_refused_definitely(tmp_path: Path) -> None:
    asyncio.run(_stream_batch_over_the_rate_is_cut_and_the_rest_refused_definitely(tmp_path))


def test_unary_calls_over_the_rate_end_resource_exhausted_with_retry_after(tmp_path: Path) -> None:
    asyncio.run(_unary_calls_over_the_rate_end_resource_exhausted_with_retry_after(tmp_path))


def test_the_client_waits_out_the_rate_limit_and_every_write_lands(tmp_path: Path) -> None:
    asyncio.run(_the_client_waits_out_the_rate_limit_and_every_write_lands(tmp_path))


def test_the_client_gives_up_with_a_definite_error_when_the_wait_is_too_long(tmp_path: Path) -> None:
    asyncio.run(_the_client_gives_up_with_a_definite_error_when_the_wait_is_too_long(tmp_path))


def test_a_client_refused_for_its_rate_does_not_harm_another(tmp_path: Path) -> None:
    asyncio.run(_a_client_refused_for_its_rate_does_not_harm_another(tmp_path))


def test_users_of_one_address_have_their_own_buckets_which_follow_them_across_connections(tmp_path: Path) -> None:
    asyncio.run(_users_of_one_address_have_their_own_buckets_which_follow_them_across_connections(tmp_path))


def test_memory_ceiling_sheds_writes_and_serves_reads(tmp_path: Path) -> None:
    asyncio.run(_memory_ceiling_sheds_writes_and_serves_reads(tmp_path))


def test_nospace_alarm_refuses_writes_serves_reads_and_deletes_until_disarmed(tmp_path: Path) -> None:
    asyncio.run(_nospace_alarm_refuses_writes_serves_reads_and_deletes_until_disarmed(tmp_path))


def test_a_connection_over_its_stream_cap_waits_and_other_connections_are_served(tmp_path: Path) -> None:
    asyncio.run(_a_connection_over_its_stream_cap_waits_and_other_connections_are_served(tmp_path))


def test_an_idle_connection_is_closed_by_the_server(tmp_path: Path) -> None:
    asyncio.run(_an_idle_connection_is_closed_by_the_server(tmp_path))


def test_a_client_pinging_too_often_is_disconnected(tmp_path: Path) -> None:
    asyncio.run(_a_client_pinging_too_often_is_disconnected(tmp_path))


def test_nospace_raised_on_a_follower_is_obeyed_by_every_node_of_a_cluster(tmp_path: Path) -> None:
    """Three `kvstore serve` processes with a small quota: the alarm is raised through the
    metadata group (by followers too, over Shard.GroupPropose to its leader), every node lists it
    and every node refuses puts, while reads and deletes are served through all of them."""
    from clusterharness import Cluster

    from kvstore.client import Client

    c = Cluster(tmp_path, 3, extra_args=["--quota-bytes", "768K"])
    try:
        c.start()
        with Client(c.endpoints, timeout=10) as kv:
            big = b"x" * (64 << 10)
            written = []
            # Up to 1.25 MiB of values: over the quota on every node. The store is measured every
            # 0.5 s, so the alarm may come during these puts or only after all of them: either
            # way it is awaited below, and a put refused here is definite.
            for i in range(20):
                try:
                    kv.put(b"big/%d" % i, big)
                except errors.NoSpace as refused_early:
                    assert refused_early.definite
                    break
                written.append(b"big/%d" % i)
            assert written
            # All three nodes went over: each raises its own alarm; at most one of them leads
            # group 0, so the others' went through Shard.GroupPropose.
            end = time.monotonic() + 20
            while len(kv.alarms()) < 3:
                assert time.monotonic() < end, f"alarms: {kv.alarms()}"
                time.sleep(0.05)
            with pytest.raises(errors.NoSpace) as over:
                kv.put(b"big/over", big)
            assert over.value.definite
        everyone = [(1, "NOSPACE"), (2, "NOSPACE"), (3, "NOSPACE")]
        for ep in c.endpoints:  # every node, asked alone, lists them (once it applied the last one)
            with Client([ep], timeout=10) as one:
                end = time.monotonic() + 20
                while (seen := sorted((a.node_id, a.type) for a in one.alarms())) != everyone:
                    assert time.monotonic() < end, f"node at {ep} lists {seen}"
                    time.sleep(0.05)
                assert one.get(written[0], read_preference="nearest", consistency="stale") == big
        kvctl = [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(c.endpoints)]
        out = subprocess.run([*kvctl, "alarm", "list", "-o", "json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"alarms": [{"node_id": i, "type": "NOSPACE"} for i in (1, 2, 3)]}
        refused = subprocess.run([*kvctl, "put", "small", "1"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "NOSPACE" in refused.stderr + refused.stdout  # 2: definitely not applied
        with Client(c.endpoints, timeout=10) as kv:
            with pytest.raises(errors.NoSpace) as exc:
                kv.put(b"small", b"1")
            assert exc.value.definite
            assert kv.get(written[0]) == big
            assert kv.delete(written[0]) is True
            assert kv.get(written[0]) is None
    finally:
        c.stop()


# --- hypothesis: arbitrary alarm requests ------------------------------------------------------


class _AlarmNode:
    """One node (no quota) kept across examples on a private event loop."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.tmp_path = tmp_path

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def start(self) -> None:
        self.ctx = one_node(self.tmp_path)
        self.n = await self.ctx.__aenter__()
        self.ch = grpc.aio.insecure_channel(self.n.address)
        self.admin = admin_pb2_grpc.AdminStub(self.ch)

    async def stop(self) -> None:
        await self.ch.close()
        await self.ctx.__aexit__(None, None, None)


@pytest.fixture(scope="module")
def alarm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_AlarmNode]:
    f = _AlarmNode(tmp_path_factory.mktemp("alarms"))
    f.run(f.start())
    try:
        yield f
    finally:
        f.run(f.stop())
        f.loop.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node_id=st.integers(0, 2**64 - 1), kind=st.integers(-(2**31), 2**31 - 1))
def test_any_alarm_disarm_request_gets_an_answer_or_a_definite_error(
    alarm_node: _AlarmNode, node_id: int, kind: int
) -> None:
    async def main() -> None:
        r = await alarm_node.admin.AlarmDisarm(admin_pb2.AlarmDisarmRequest(node_id=node_id, type=kind), timeout=20)
        valid = node_id < 2**63 and kind in (admin_pb2.ALARM_NONE, admin_pb2.ALARM_NOSPACE)
        if valid:
            assert r.error.code == kv_pb2.OK and list(r.alarms) == []
        else:
            assert r.error.code == kv_pb2.INVALID_ARGUMENT and not r.error.indeterminate
        listed = await alarm_node.admin.AlarmList(admin_pb2.AlarmListRequest(), timeout=20)
        assert listed.error.code == kv_pb2.OK and list(listed.alarms) == []

    alarm_node.run(main())
