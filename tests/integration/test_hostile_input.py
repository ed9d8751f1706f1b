"""Hostile and malformed input (issue 13): one limit per quantity, and every bad operation gets
its own definite answer without ending its stream or harming anybody else's requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from onenode import one_node

from kvstore.cli.server import cli
from kvstore.client import DEFAULT_MAX_KEY_SIZE
from kvstore.client.failures import classify as _classify
from kvstore.client.mux import OpMux
from kvstore.errors import InternalError
from kvstore.server.config import Limits
from kvstore.server.requests import KVRequests
from kvstore.storage import commands
from kvstore.storage.commands import MAX_KEY_SIZE, U64_MAX
from kvstore.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(120)

MAX_VALUE = Limits().max_value


def _session(seq: int) -> kv_pb2.Session:
    return kv_pb2.Session(client_id=777, seq=seq, ack=1)


def _put(op_id: int, key: bytes, value: bytes = b"v") -> kv_pb2.Op:
    return kv_pb2.Op(id=op_id, put=kv_pb2.PutRequest(key=key, value=value, session=_session(op_id)))


def _code(r: kv_pb2.OpResult) -> int:
    kind = r.WhichOneof("result")
    assert kind is not None, r
    return int(getattr(r, kind).error.code)


async def _exchange(address: str, batches: list[list[kv_pb2.Op]], timeout: float = 15.0) -> dict[int, list[kv_pb2.OpResult]]:
    """Send each batch and wait for all its answers; half-close; the stream must end with OK."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = kv_pb2_grpc.KVStub(ch).Stream()
        got: dict[int, list[kv_pb2.OpResult]] = {}
        for ops in batches:
            await call.write(kv_pb2.OpBatch(ops=ops))
            want = {op.id for op in ops}
            deadline = time.monotonic() + timeout
            while not want <= set(got):
                batch = await asyncio.wait_for(call.read(), max(0.01, deadline - time.monotonic()))
                assert batch is not grpc.aio.EOF, f"the stream ended; unanswered: {sorted(want - set(got))}"
                for r in batch.results:
                    got.setdefault(r.id, []).append(r)
        await call.done_writing()
        while (batch := await asyncio.wait_for(call.read(), timeout)) is not grpc.aio.EOF:
            for r in batch.results:
                got.setdefault(r.id, []).append(r)
        assert await call.code() == grpc.StatusCode.OK
        return got


# --- one limit per quantity ----------------------------------------------------------------------
def test_one_key_size_limit_for_config_client_encoder_and_flags() -> None:
    assert Limits().max_key == MAX_KEY_SIZE == DEFAULT_MAX_KEY_SIZE
    commands.encode_put(b"k" * MAX_KEY_SIZE, b"v")  # the longest key the server accepts encodes
    with pytest.raises(ValueError, match="max-key"):
        Limits(max_key=MAX_KEY_SIZE + 1).validate()
    with pytest.raises(ValueError, match="max-request"):
        Limits(max_request=2 * MAX_VALUE).validate()  # a CAS at the value limit would not fit
    Limits().validate()
    res = CliRunner().invoke(cli, ["serve", "--id", "1", "--data-dir", "x", "--max-key", str(MAX_KEY_SIZE + 1)])
    assert res.exit_code == 2 and "--max-key" in res.output


def test_unary_calls_answer_limits_with_definite_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
            kv = kv_pb2_grpc.KVStub(ch)
            ok = await kv.Put(kv_pb2.PutRequest(key=b"k" * MAX_KEY_SIZE, value=b"v" * MAX_VALUE))
            assert ok.error.code == kv_pb2.OK
            for size in (MAX_KEY_SIZE + 1, 4096):  # 504..4096 used to be UNKNOWN: Unexpected ValueError
                for r in (
                    await kv.Put(kv_pb2.PutRequest(key=b"k" * size, value=b"v")),
                    await kv.Delete(kv_pb2.DeleteRequest(key=b"k" * size)),
                    await kv.Cas(kv_pb2.CasRequest(key=b"k" * size, expect_absent=True, value=b"v")),
                    await kv.Get(kv_pb2.GetRequest(key=b"k" * size)),
                ):
                    assert r.error.code == kv_pb2.KEY_TOO_LARGE and not r.error.indeterminate, r.error
            big = b"v" * (MAX_VALUE + 1)
            for r in (
                await kv.Put(kv_pb2.PutRequest(key=b"a", value=big)),
                await kv.Cas(kv_pb2.CasRequest(key=b"a", expected=big, value=b"v")),
            ):
                assert r.error.code == kv_pb2.VALUE_TOO_LARGE and not r.error.indeterminate
            at_limit = b"e" * MAX_VALUE
            c = await kv.Cas(kv_pb2.CasRequest(key=b"k" * MAX_KEY_SIZE, expected=at_limit, value=at_limit))
            assert c.error.code == kv_pb2.OK and not c.swapped and c.found
            r = await kv.Cas(kv_pb2.CasRequest(key=b"a", expect_absent=True, expected=b"x", value=b"v"))
            assert r.error.code == kv_pb2.INVALID_ARGUMENT and not r.error.indeterminate
            for field in ("prefix", "start", "end"):
                scan = kv.Scan(kv_pb2.ScanRequest(group=1, **{field: b"p" * (MAX_KEY_SIZE + 1)}))
                msgs = [m async for m in scan]
                assert [m.error.code for m in msgs] == [kv_pb2.KEY_TOO_LARGE]
            msgs = [m async for m in kv.Scan(kv_pb2.ScanRequest(group=1, limit=U64_MAX))]
            assert msgs[-1].error.code == kv_pb2.OK and {i.key for m in msgs for i in m.items} >= {b"warm"}

    asyncio.run(main())


def test_a_bad_operation_on_the_stream_gets_its_own_answer_and_the_stream_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        async with one_node(tmp_path) as n:
            first = [
                _put(1, b"good/1"),
                _put(2, b"k" * (MAX_KEY_SIZE + 1)),
                kv_pb2.Op(id=3, cas=kv_pb2.CasRequest(key=b"c", expect_absent=True, expected=b"x", value=b"v")),
                _put(4, b"big", b"v" * (MAX_VALUE + 1)),
                kv_pb2.Op(id=5, get=kv_pb2.GetRequest(key=b"k" * 4096)),
                kv_pb2.Op(id=6, scan=kv_pb2.ScanRequest(group=1, limit=U64_MAX, prefix=b"good/")),
                kv_pb2.Op(id=7, scan=kv_pb2.ScanRequest(group=1, prefix=b"p" * 4096)),
                _put(8, b"good/2", b"v" * MAX_VALUE),
            ]
            second = [_put(9, b"good/3"), kv_pb2.Op(id=10, get=kv_pb2.GetRequest(key=b"good/2"))]
            got = await _exchange(n.address, [first, second])
            assert {i: len(rs) for i, rs in got.items()} == {i: 1 for i in range(1, 11)}
            codes = {i: _code(rs[0]) for i, rs in got.items()}
            assert codes == {
                1: kv_pb2.OK, 2: kv_pb2.KEY_TOO_LARGE, 3: kv_pb2.INVALID_ARGUMENT, 4: kv_pb2.VALUE_TOO_LARGE,
                5: kv_pb2.KEY_TOO_LARGE, 6: kv_pb2.OK, 7: kv_pb2.KEY_TOO_LARGE, 8: kv_pb2.OK, 9: kv_pb2.OK,
                10: kv_pb2.OK,
            }
            for i in (2, 3, 4, 5, 7):
                r = got[i][0]
                assert not getattr(r, r.WhichOneof("result")).error.indeterminate
            assert got[10][0].get.value == b"v" * MAX_VALUE

    asyncio.run(main())


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """KVRequests with bugs: preparing a put of b"boom", reading b"boom" and scanning b"boom"
    raise exceptions that are no KVError (the read's from inside the host's Ready loop)."""
    prepare, reply, scan = KVRequests.prepare_put, KVRequests.get_reply, KVRequests.scan_once

    def bad_prepare(self: KVRequests, r: kv_pb2.PutRequest) -> tuple[bytes, bytes]:
        if r.key == b"boom":
            raise RuntimeError("planted bug in prepare_put")
        return prepare(self, r)

    def bad_reply(self: KVRequests, gid: int, key: bytes, point: Any, *args: Any, **kw: Any) -> kv_pb2.GetResponse:
        if key == b"boom":
            raise KeyError("planted bug in get_reply")
        return reply(self, gid, key, point, *args, **kw)

    async def bad_scan(self: KVRequests, request: kv_pb2.ScanRequest) -> kv_pb2.ScanResponse:
        if request.prefix == b"boom":
            raise ZeroDivisionError("planted bug in scan_once")
        return await scan(self, request)

    monkeypatch.setattr(KVRequests, "prepare_put", bad_prepare)
    monkeypatch.setattr(KVRequests, "get_reply", bad_reply)
    monkeypatch.setattr(KVRequests, "scan_once", bad_scan)
    yield


def test_an_unexpected_exception_fails_only_its_own_operation(tmp_path: Path, faulty: None) -> None:
    async def main() -> None:
        async with one_node(tmp_path) as n:
            ops = [
                _put(1, b"boom"),
                kv_pb2.Op(id=2, get=kv_pb2.GetRequest(key=b"boom")),
                kv_pb2.Op(id=3, scan=kv_pb2.ScanRequest(group=1, prefix=b"boom")),
                _put(4, b"fine"),
            ]
            got = await _exchange(n.address, [ops, [kv_pb2.Op(id=5, get=kv_pb2.GetRequest(key=b"fine"))]])
            assert {i: _code(rs[0]) for i, rs in got.items()} == {
                1: kv_pb2.INTERNAL, 2: kv_pb2.INTERNAL, 3: kv_pb2.INTERNAL, 4: kv_pb2.OK, 5: kv_pb2.OK,
            }
            assert not got[1][0].put.error.indeterminate  # refused before it was proposed
            assert "planted bug" in got[2][0].get.error.message
            async with grpc.aio.insecure_channel(n.address) as ch:
                kv = kv_pb2_grpc.KVStub(ch)
                r = await kv.Put(kv_pb2.PutRequest(key=b"boom", value=b"v"))
                assert r.error.code == kv_pb2.INTERNAL  # in the reply, not a raw UNKNOWN status
                g = await kv.Get(kv_pb2.GetRequest(key=b"boom"))
                assert g.error.code == kv_pb2.INTERNAL
                # The Ready loop survived the bug in its callback: the node still serves.
                assert (await kv.Put(kv_pb2.PutRequest(key=b"after", value=b"1"))).error.code == kv_pb2.OK
                assert (await kv.Get(kv_pb2.GetRequest(key=b"after"))).value == b"1"

    asyncio.run(main())


# --- the client's side of a stream the server ends ------------------------------------------------
class _DroppingKV(kv_pb2_grpc.KVServicer):
    """A faulty server: reads one batch, answers nothing, ends the stream with OK."""

    async def Stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        async for _ in request_iterator:
            return
        yield kv_pb2.ResultBatch()  # pragma: no cover - makes this an async generator


def test_client_fails_operations_of_a_stream_the_server_ended_with_ok() -> None:
    async def main() -> None:
        server = grpc.aio.server()
        kv_pb2_grpc.add_KVServicer_to_server(_DroppingKV(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                for kind, req, is_write in (
                    ("put", kv_pb2.PutRequest(key=b"k", value=b"v"), True),
                    ("get", kv_pb2.GetRequest(key=b"k"), False),
                ):
                    mux = OpMux(ch, "fake")
                    t0 = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await mux.call(kind, req, timeout=10)
                    assert time.monotonic() - t0 < 5  # failed at the end of the stream, not at its timeout
                    assert ei.value.code() == grpc.StatusCode.INTERNAL
                    err = _classify(ei.value, endpoint="fake", is_write=is_write).error
                    assert isinstance(err, InternalError) and err.indeterminate is is_write
                    await mux.close()
        finally:
            await server.stop(0)

    asyncio.run(main())


# --- admin requests with hostile values ----------------------------------------------------------
_U63 = 1 << 63
_U64_MAX = (1 << 64) - 1


def test_admin_requests_with_hostile_ids_get_definite_errors_and_change_nothing(tmp_path: Path) -> None:
    """Member ids at or above 2^63 (a conf change no replica could decode, which would stop the
    group's replication for good once appended), addresses longer than a conf change carries,
    unknown groups and transfer targets: each gets a definite error, and the membership and the
    node's service are unchanged."""
    from kvstore.v1 import admin_pb2, admin_pb2_grpc

    async def scenario() -> None:
        async with one_node(tmp_path) as one, grpc.aio.insecure_channel(one.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            kv = kv_pb2_grpc.KVStub(ch)
            before = await admin.Status(admin_pb2.StatusRequest(), timeout=5)
            bad = [
                admin.AddMember(admin_pb2.AddMemberRequest(id=_U63, address="a:1", learner=True)),
                admin.AddMember(admin_pb2.AddMemberRequest(id=_U64_MAX, address="a:1", learner=True)),
                admin.AddMember(admin_pb2.AddMemberRequest(id=0, address="a:1", learner=True)),
                admin.AddMember(admin_pb2.AddMemberRequest(id=5, address="a:" + "9" * 2000, learner=True)),
                admin.AddMember(admin_pb2.AddMemberRequest(id=5, address="no-port", learner=True)),
                admin.AddMember(admin_pb2.AddMemberRequest(id=5, address="a:1", learner=True, groups=[_U64_MAX])),
                admin.PromoteMember(admin_pb2.PromoteMemberRequest(id=_U64_MAX)),
                admin.PromoteMember(admin_pb2.PromoteMemberRequest(id=_U63, groups=[1])),
                admin.RemoveMember(admin_pb2.RemoveMemberRequest(id=_U64_MAX)),
                admin.RemoveMember(admin_pb2.RemoveMemberRequest(id=_U63, groups=[1])),
                admin.TransferLeader(admin_pb2.TransferLeaderRequest(to=_U64_MAX, groups=[1])),
                admin.TransferLeader(admin_pb2.TransferLeaderRequest(to=7, groups=[_U63])),
            ]
            for call in bad:
                resp = await call
                assert resp.error.code != kv_pb2.OK, resp
                assert not resp.error.indeterminate, resp
            after = await admin.Status(admin_pb2.StatusRequest(), timeout=5)
            assert [(g.group, list(g.voters), list(g.learners)) for g in after.groups] == [
                (g.group, list(g.voters), list(g.learners)) for g in before.groups
            ]
            r = await kv.Put(kv_pb2.PutRequest(key=b"still", value=b"serving"), timeout=5)
            assert r.error.code == kv_pb2.OK

    asyncio.run(scenario())


def test_the_core_refuses_a_conf_change_no_replica_could_decode() -> None:
    import random as _random

    from kvstore.raft import Config, ConfState, MemoryStorage, ProposalDropped, RaftNode, Role, readyloop
    from kvstore.raft.types import ConfChange, ConfChangeType

    storage = MemoryStorage.bootstrap(ConfState((1,)))
    core = RaftNode(Config(id=1), storage, _random.Random(1))
    core.campaign()
    readyloop.drain(
        None, core, lambda msgs: None, lambda _k, _c, rd: readyloop.persist_to_memory(storage, rd), lambda _k, rd: None
    )
    assert core.role == Role.LEADER
    for cc in (ConfChange(ConfChangeType.ADD_LEARNER, _U63, b"a:1"),
               ConfChange(ConfChangeType.ADD_LEARNER, 5, b"x" * 2000)):
        with pytest.raises(ProposalDropped, match="invalid membership change"):
            core.propose_conf_change(cc)


def test_shard_requests_with_hostile_values_get_definite_errors(tmp_path: Path) -> None:
    """ShardOp waits bounded by a finite timeout; ExportRange (internal) refuses non-members,
    chunks it would have to hold gigabytes for, and malformed ranges."""
    from kvstore.v1 import shard_pb2, shard_pb2_grpc

    async def scenario() -> None:
        async with one_node(tmp_path) as one, grpc.aio.insecure_channel(one.address) as ch:
            shard = shard_pb2_grpc.ShardStub(ch)
            for t in (float("nan"), float("inf"), -1.0, 1e9):
                r = await shard.ShardOp(shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.REBALANCE, wait=True,
                                                                 timeout=t), timeout=10)
                assert r.error.code == kv_pb2.INVALID_ARGUMENT and not r.error.indeterminate, r
            r = await shard.ShardOp(shard_pb2.ShardOpRequest(op=77), timeout=10)
            assert r.error.code == kv_pb2.INVALID_ARGUMENT
            r = await shard.ShardOp(shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.REMOVE_GROUP,
                                                             group=_U64_MAX), timeout=10)
            assert r.error.code == kv_pb2.INVALID_ARGUMENT
            member = {"cluster_id": "kvstore", "from_node": 1}
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in shard.ExportRange(shard_pb2.ExportRangeRequest(group=1, lo=[0], hi=[5]), timeout=10):
                    pass
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
            for req in (
                shard_pb2.ExportRangeRequest(group=1, lo=[0], hi=[5], chunk_bytes=(1 << 32) - 1, **member),
                shard_pb2.ExportRangeRequest(group=1, lo=[0, 9], hi=[5], **member),
                shard_pb2.ExportRangeRequest(group=1, lo=[9], hi=[5], **member),
            ):
                chunks = [c async for c in shard.ExportRange(req, timeout=10)]
                assert len(chunks) == 1 and chunks[0].error.code == kv_pb2.INVALID_ARGUMENT, chunks

    asyncio.run(scenario())
