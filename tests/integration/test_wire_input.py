"""Malformed bytes and hostile field values on the wire (issue 13, part 7): every method of every
service a node serves answers garbage with INVALID_ARGUMENT (definite, naming what was wrong), and
no field value makes a request fail with UNKNOWN, kill its stream or disturb other clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onenode import OneNode, one_node

from kvstore.server.config import Limits
from kvstore.storage.commands import MAX_KEY_SIZE, U64_MAX
from kvstore.v1 import kv_pb2, kv_pb2_grpc, raft_pb2

pytestmark = pytest.mark.timeout(300)

GARBAGE = b"\xff\xff\xff\xff"
"""Not a protobuf message of any type: a varint that never ends."""


def _bytes_stream(*msgs: bytes) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for m in msgs:
            yield m

    return gen()


async def _call_raw(ch: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool) -> grpc.aio.AioRpcError:
    """Call `path` with GARBAGE as its (first) request message; the error it ends with."""
    try:
        if client_streaming and server_streaming:
            async for _ in ch.stream_stream(path)(_bytes_stream(GARBAGE), timeout=10):
                pass
        elif client_streaming:
            await ch.stream_unary(path)(_bytes_stream(GARBAGE), timeout=10)
        elif server_streaming:
            async for _ in ch.unary_stream(path)(GARBAGE, timeout=10):
                pass
        else:
            await ch.unary_unary(path)(GARBAGE, timeout=10)
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError(f"{path} accepted garbage")


def test_garbage_to_every_method_of_every_service_is_invalid_argument(tmp_path: Path) -> None:
    async def main() -> None:
        async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
            from google.protobuf import descriptor_pool

            pool = descriptor_pool.Default()
            methods = n.node.rpc_methods
            # Generated from what the node registered: every service, every method.
            assert {p.split("/")[1] for p in methods} == {
                "kvstore.v1.KV", "kvstore.v1.Admin", "kvstore.v1.Shard", "kvstore.v1.Raft", "kvstore.v1.Auth",
                "grpc.health.v1.Health", "etcdserverpb.KV", "etcdserverpb.Watch", "etcdserverpb.Lease",
                "etcdserverpb.Cluster", "etcdserverpb.Maintenance", "etcdserverpb.Auth",
                "v3lockpb.Lock", "v3electionpb.Election",
            }
            good = kv_pb2_grpc.KVStub(ch)
            for path in methods:
                service, name = path[1:].split("/")
                m = pool.FindServiceByName(service).FindMethodByName(name)
                err = await _call_raw(ch, path, m.client_streaming, m.server_streaming)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.code(), err.details())
                assert f"malformed {m.input_type.full_name}" in (err.details() or ""), path
                # ...and it harmed nobody: a good client is served in between.
                assert (await good.Put(kv_pb2.PutRequest(key=b"good", value=path.encode()))).error.code == kv_pb2.OK
            assert (await good.Get(kv_pb2.GetRequest(key=b"good"))).value == methods[-1].encode()

    asyncio.run(main())


def test_a_malformed_message_mid_stream_ends_the_stream_with_invalid_argument(tmp_path: Path) -> None:
    async def main() -> None:
        async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
            # KV.Stream: the operations read before the bad message are answered, then the call
            # fails with INVALID_ARGUMENT (nothing after it was read).
            call = ch.stream_stream("/kvstore.v1.KV/Stream")()
            op = kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"before", value=b"1"))
            await call.write(kv_pb2.OpBatch(ops=[op]).SerializeToString())
            first = kv_pb2.ResultBatch.FromString(await call.read())
            assert [(r.id, r.put.error.code) for r in first.results] == [(1, kv_pb2.OK)]
            await call.write(GARBAGE)
            await call.write(kv_pb2.OpBatch(ops=[kv_pb2.Op(id=2, put=kv_pb2.PutRequest(key=b"after", value=b"2"))])
                             .SerializeToString())
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                while (await call.read()) is not grpc.aio.EOF:
                    pass
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed kvstore.v1.OpBatch" in (ei.value.details() or "")
            kv = kv_pb2_grpc.KVStub(ch)
            assert (await kv.Get(kv_pb2.GetRequest(key=b"before"))).value == b"1"
            assert not (await kv.Get(kv_pb2.GetRequest(key=b"after"))).found
            # Raft.Send and Raft.SendSnapshot: a good first message (from the node itself, the one
            # member of this one-node cluster), then garbage.
            batch = raft_pb2.RaftBatch(cluster_id="kvstore", to=1, **{"from": 1}).SerializeToString()
            for path in ("/kvstore.v1.Raft/Send", "/kvstore.v1.Raft/SendSnapshot"):
                first_msg = batch if path.endswith("Send") else raft_pb2.SnapshotChunk(
                    cluster_id="kvstore", to=1, message=raft_pb2.RaftMessage(), data=b"partial", **{"from": 1}
                ).SerializeToString()
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await ch.stream_unary(path)(_bytes_stream(first_msg, GARBAGE), timeout=10)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, ei.value.details())
                assert "malformed kvstore.v1." in (ei.value.details() or "")

    asyncio.run(main())


# --- hypothesis: arbitrary field values on the KV requests ------------------------------------------
MAX_VALUE = Limits().max_value
u64 = st.integers(0, U64_MAX)
keys = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([MAX_KEY_SIZE, MAX_KEY_SIZE + 1, 4096, 4097]).map(lambda n: b"k" * n),
)
values = st.one_of(st.binary(max_size=24), st.sampled_from([MAX_VALUE, MAX_VALUE + 1]).map(lambda n: b"v" * n))
consistency = st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))
sessions = st.builds(kv_pb2.Session, client_id=u64, seq=u64, ack=u64)
requests = st.one_of(
    st.builds(kv_pb2.GetRequest, key=keys, consistency=consistency, max_staleness_ms=u64),
    st.builds(kv_pb2.PutRequest, key=keys, value=values, session=sessions),
    st.builds(kv_pb2.DeleteRequest, key=keys, session=sessions),
    st.builds(kv_pb2.CasRequest, key=keys, expected=values, value=values, expect_absent=st.booleans(), session=sessions),
    st.builds(
        kv_pb2.ScanRequest, prefix=keys, start=keys, end=keys, limit=u64, group=st.one_of(st.just(1), u64),
        consistency=consistency, max_staleness_ms=u64,
    ),
)
_KIND = {kv_pb2.GetRequest: "get", kv_pb2.PutRequest: "put", kv_pb2.DeleteRequest: "delete",
         kv_pb2.CasRequest: "cas", kv_pb2.ScanRequest: "scan"}


class _Fuzzed:
    """One node, one raw client stream kept open across every example, one good client."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.tmp_path = tmp_path
        self.ctx: Any = None
        self.n: OneNode | None = None
        self.ids = iter(range(1, 1 << 62))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def start(self) -> None:
        self.ctx = one_node(self.tmp_path, request_timeout=2.0)
        self.n = await self.ctx.__aenter__()
        self.ch = grpc.aio.insecure_channel(self.n.address)
        self.kv = kv_pb2_grpc.KVStub(self.ch)
        self.stream = self.kv.Stream()

    async def stop(self) -> None:
        self.stream.cancel()
        await self.ch.close()
        await self.ctx.__aexit__(None, None, None)

    async def on_stream(self, ops: list[kv_pb2.Op]) -> dict[int, kv_pb2.OpResult]:
        await self.stream.write(kv_pb2.OpBatch(ops=ops))
        got: dict[int, kv_pb2.OpResult] = {}
        deadline = time.monotonic() + 20
        while len(got) < len(ops):
            batch = await asyncio.wait_for(self.stream.read(), max(0.01, deadline - time.monotonic()))
            assert batch is not grpc.aio.EOF, "the stream died"
            for r in batch.results:
                assert r.id not in got, "answered twice"
                got[r.id] = r
        return got


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Fuzzed]:
    f = _Fuzzed(tmp_path_factory.mktemp("fuzz"))
    f.run(f.start())
    try:
        yield f
    finally:
        f.run(f.stop())
        f.loop.close()


DEFINITE_OK = {
    kv_pb2.OK, kv_pb2.INVALID_ARGUMENT, kv_pb2.KEY_TOO_LARGE, kv_pb2.VALUE_TOO_LARGE, kv_pb2.REQUEST_TOO_LARGE,
    kv_pb2.WRONG_SHARD, kv_pb2.STALE_REPLICA,
}


def _check(reply: Any, what: object) -> None:
    e = reply.error
    assert e.code in DEFINITE_OK and not e.indeterminate, (what, e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=requests, timeout_ms=st.integers(0, 2**32 - 1))
def test_any_field_values_get_a_success_or_a_definite_error(fuzzed: _Fuzzed, req: Any, timeout_ms: int) -> None:
    kind = _KIND[type(req)]

    async def main() -> None:
        # Unary: never a gRPC status (UNKNOWN), always an answer in the reply.
        kv = fuzzed.kv
        if kind == "scan":
            replies = [m async for m in kv.Scan(req, timeout=20)]
            for m in replies:
                _check(m, req)
        else:
            _check(await getattr(kv, kind.capitalize())(req, timeout=20), req)
        # The same on the stream, next to a good operation; the stream lives on.
        bad_id, good_id = next(fuzzed.ids), next(fuzzed.ids)
        op = kv_pb2.Op(id=bad_id, timeout_ms=timeout_ms)
        getattr(op, kind).CopyFrom(req)
        good = kv_pb2.Op(id=good_id, put=kv_pb2.PutRequest(key=b"good", value=b"%d" % good_id))
        got = await fuzzed.on_stream([op, good])
        r = got[bad_id]
        which = r.WhichOneof("result")
        assert which == kind
        reply = getattr(r, which)
        if timeout_ms and reply.error.code == kv_pb2.TIMEOUT:
            assert kind in ("get", "scan") and not reply.error.indeterminate  # a tiny timeout on a read
        else:
            _check(reply, req)
        assert got[good_id].put.error.code == kv_pb2.OK
        assert (await kv.Get(kv_pb2.GetRequest(key=b"good"))).value == b"%d" % good_id

    fuzzed.run(main())
