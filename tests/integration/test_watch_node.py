"""`KV.Watch` on one real node (in the test's event loop): hostile requests over the wire get
definite answers and harm no other stream; progress on request; many watches on one stream."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from onenode import one_node
from test_auth import Op, bearer, change, setup_auth

from kvstore.node.ratelimit import RateLimit
from kvstore.server.admission_settings import AdmissionSettings
from kvstore.v1 import auth_pb2_grpc, kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(120)

W = kv_pb2.WatchRequest
C = kv_pb2.WatchCreateRequest


class Stream:
    """One raw `KV.Watch` call: send requests, read responses."""

    def __init__(self, stub: kv_pb2_grpc.KVStub) -> None:
        self.q: asyncio.Queue[kv_pb2.WatchRequest | None] = asyncio.Queue()
        self.call = stub.Watch(self._requests())
        self.it = self.call.__aiter__()

    async def _requests(self) -> AsyncIterator[kv_pb2.WatchRequest]:
        while (r := await self.q.get()) is not None:
            yield r

    def send(self, r: kv_pb2.WatchRequest) -> None:
        self.q.put_nowait(r)

    async def recv(self) -> kv_pb2.WatchResponse:
        return await asyncio.wait_for(self.it.__anext__(), 20)


def test_hostile_watch_requests_get_definite_answers_and_harm_nobody(tmp_path: Path) -> None:
    asyncio.run(_hostile(tmp_path))


async def _hostile(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        good = Stream(stub)
        good.send(W(create_request=C(prefix=b"ok/", watch_id=1)))
        assert (await good.recv()).created

        bad = Stream(stub)
        cases = [
            C(key=b"k", start_revision=-1),                       # negative revision
            C(key=b"x" * 100_000),                                # huge key
            C(key=b"b", range_end=b"a"),                          # inverted range
            C(key=b"a", prefix=b"p"),                             # key and prefix
            C(),                                                  # nothing to watch
            C(key=b"k", watch_id=-5),                             # negative id
        ]
        for c in cases:
            bad.send(W(create_request=c))
            r = await bad.recv()
            assert r.canceled and not r.created and r.error.code != kv_pb2.OK and not r.error.indeterminate, (c, r)
        bad.send(W(cancel_request=kv_pb2.WatchCancelRequest(watch_id=424242)))  # unknown id
        r = await bad.recv()
        assert r.canceled and r.error.code == kv_pb2.INVALID_ARGUMENT
        bad.send(W())  # an empty request: ignored
        for _ in range(600):  # progress requests with no watch: no reply each, and no wedge
            bad.send(W(progress_request=kv_pb2.WatchProgressRequest()))
        # thousands of creates on one stream: at most 1024 watches, the rest refused (definite)
        rng = random.Random(7)
        for i in range(3000):
            key = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
            bad.send(W(create_request=C(key=key, range_end=rng.choice([b"", b"\0"]), watch_id=i + 1,
                                        start_revision=rng.choice([0, 1, 2**62]))))
        created = refused = 0
        while created + refused < 3000:
            r = await bad.recv()
            if r.created:
                created += 1
            elif not r.canceled:
                continue  # events or progress of the watches created (some start at revision 1)
            else:
                assert r.canceled and r.error.code == kv_pb2.RESOURCE_EXHAUSTED and not r.error.indeterminate, r
                refused += 1
        assert created == 1024 and refused == 3000 - 1024

        # the good stream is unharmed: its event arrives, and progress on request
        put = await stub.Put(kv_pb2.PutRequest(key=b"ok/1", value=b"v"))
        r = await good.recv()
        while not r.events:  # progress responses may come first
            r = await good.recv()
        assert [(e.kv.key, e.kv.value, e.kv.mod_revision) for e in r.events] == [(b"ok/1", b"v", put.revision)]
        good.send(W(progress_request=kv_pb2.WatchProgressRequest()))
        r = await good.recv()
        assert r.watch_id == 1 and not r.events and r.revision >= put.revision
        for s in (good, bad):
            s.call.cancel()
        # the node forgets both streams' watches
        hub = n.node.watch.hub if n.node.watch is not None else None
        assert hub is not None
        for _ in range(200):
            if hub.count == 0:
                break
            await asyncio.sleep(0.01)
        assert hub.count == 0 and hub.pending_bytes == 0


def test_hostile_groups_and_progress_revisions_get_definite_answers_and_harm_nobody(tmp_path: Path) -> None:
    asyncio.run(_hostile_groups(tmp_path))


async def _hostile_groups(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        assert n.node.tracker is not None and n.node.tracker.map is not None
        [g] = n.node.tracker.map.data_groups()
        good = Stream(stub)
        good.send(W(create_request=C(prefix=b"ok/", watch_id=1, groups=[g])))  # every group, named
        assert (await good.recv()).created
        bad = Stream(stub)
        for c in [
            C(prefix=b"p", groups=[g + 1000]),            # not a data group
            C(prefix=b"p", groups=[g, g]),                # twice
            C(prefix=b"p", groups=list(range(1, 2000))),  # too many
            C(key=b"k", groups=[g + 1]),                  # not the key's group
        ]:
            bad.send(W(create_request=c))
            r = await bad.recv()
            assert r.canceled and r.error.code == kv_pb2.INVALID_ARGUMENT and not r.error.indeterminate, (c, r)
        for rev in (-1, 2**62, 2**63 - 1):  # negative, far ahead of the clock: refused, no watch touched
            bad.send(W(progress_request=kv_pb2.WatchProgressRequest(revision=rev)))
            r = await bad.recv()
            assert (r.watch_id, r.canceled, r.created, r.error.code, r.error.indeterminate) == (
                0, False, False, kv_pb2.INVALID_ARGUMENT, False), r
        # the good stream is unharmed; a progress request at a revision is answered past it
        put = await stub.Put(kv_pb2.PutRequest(key=b"ok/1", value=b"v"))
        r = await good.recv()
        while not r.events:
            r = await good.recv()
        assert [(e.kv.key, e.kv.mod_revision) for e in r.events] == [(b"ok/1", put.revision)]
        target = put.revision + (50 << 22)  # 50 ms of the clock later (within the clock bound)
        good.send(W(progress_request=kv_pb2.WatchProgressRequest(revision=target)))
        r = await good.recv()
        while r.revision < target:  # quiet-time progress responses may come first
            assert not r.events and not r.canceled, r
            r = await good.recv()
        assert r.watch_id == 1 and not r.events and not r.canceled
        for s in (good, bad):
            s.call.cancel()


def test_malformed_watch_bytes_are_invalid_argument(tmp_path: Path) -> None:
    asyncio.run(_malformed(tmp_path))


async def _malformed(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
        call = ch.stream_stream("/kvstore.v1.KV/Watch", request_serializer=lambda b: b,
                                response_deserializer=kv_pb2.WatchResponse.FromString)

        async def junk() -> AsyncIterator[bytes]:
            yield b"\xff\xff\xff\xff"

        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call(junk()):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_creates_count_against_the_callers_rate_limit(tmp_path: Path) -> None:
    asyncio.run(_rate_limited(tmp_path))


async def _rate_limited(tmp_path: Path) -> None:
    adm = AdmissionSettings(rate_limit=RateLimit(rate=1, burst=3))
    async with one_node(tmp_path, admission=adm) as n, grpc.aio.insecure_channel(n.address) as ch:
        s = Stream(kv_pb2_grpc.KVStub(ch))
        for i in range(10):
            s.send(W(create_request=C(key=b"rl/%d" % i, watch_id=i + 1)))
        answers = [await s.recv() for _ in range(10)]
        created = [r for r in answers if r.created]
        refused = [r for r in answers if r.canceled]
        assert len(created) <= 3 and len(refused) >= 7 and len(created) + len(refused) == 10  # burst 3
        for r in refused:
            assert r.error.code == kv_pb2.RESOURCE_EXHAUSTED and r.error.retry_after_ms > 0 and not r.error.indeterminate
        # after the retry-after the server named, a create is admitted again
        await asyncio.sleep(max(r.error.retry_after_ms for r in refused) / 1000)
        s.send(W(create_request=C(key=b"rl/again", watch_id=100)))
        r = await s.recv()
        assert r.created and r.watch_id == 100
        s.call.cancel()


def test_a_watch_stream_ends_unauthenticated_once_its_token_is_revoked(tmp_path: Path) -> None:
    asyncio.run(_revoked(tmp_path))


async def _revoked(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
        tokens = await setup_auth(n)
        stub = kv_pb2_grpc.KVStub(ch)
        q: asyncio.Queue[kv_pb2.WatchRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[kv_pb2.WatchRequest]:
            while (r := await q.get()) is not None:
                yield r

        call = stub.Watch(requests(), metadata=bearer(tokens["alice"]))
        it = call.__aiter__()
        q.put_nowait(W(create_request=C(prefix=b"data/", watch_id=1)))
        denied = W(create_request=C(prefix=b"other/", watch_id=2))  # alice may read data/ only
        assert (await asyncio.wait_for(it.__anext__(), 20)).created
        q.put_nowait(denied)
        r = await asyncio.wait_for(it.__anext__(), 20)
        assert r.canceled and r.error.code == kv_pb2.PERMISSION_DENIED and not r.error.indeterminate
        put = await stub.Put(kv_pb2.PutRequest(key=b"data/x", value=b"1"), metadata=bearer(tokens["root"]))
        r = await asyncio.wait_for(it.__anext__(), 20)
        assert [e.kv.mod_revision for e in r.events] == [put.revision]
        # the password changes: alice's tokens are void, so the next reply ends the stream
        a = auth_pb2_grpc.AuthStub(ch)
        res = await change(a, tokens["root"], op=Op.USER_PASSWD, user="alice", password="changed")
        assert res.error.code == kv_pb2.OK
        await stub.Put(kv_pb2.PutRequest(key=b"data/y", value=b"2"), metadata=bearer(tokens["root"]))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while True:
                r = await asyncio.wait_for(it.__anext__(), 20)
                assert not r.events, "an event was sent after the token was revoked"
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        q.put_nowait(None)
