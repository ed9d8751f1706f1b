"""Hostile transactions on one node, as `KV.Txn` calls and on `KV.Stream`: any field values (unknown enums, negative numbers,
oversized or empty keys, unset operations, scans with any bounds and limits, deep nesting, too many items, duplicate
writes)
get a success or a definite error in the reply, never UNKNOWN, never an indeterminate error;
and a node keeps serving afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onenode import one_node

from kvstore import errors
from kvstore.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(300)

DEFINITE_OK = {kv_pb2.OK, kv_pb2.INVALID_ARGUMENT, kv_pb2.KEY_TOO_LARGE, kv_pb2.VALUE_TOO_LARGE,
               kv_pb2.REQUEST_TOO_LARGE}

keys = st.one_of(st.sampled_from([b"a", b"b", b""]), st.binary(max_size=600))
compares = st.builds(
    kv_pb2.Compare, key=keys, target=st.integers(-1, 6), result=st.integers(-1, 6), value=st.binary(max_size=20),
    number=st.integers(-(2**63), 2**63 - 1),
)


def _ops(body: st.SearchStrategy[kv_pb2.TxnBody]) -> st.SearchStrategy[kv_pb2.TxnOp]:
    return st.one_of(
        st.builds(lambda k, v: kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=k, value=v)), keys, st.binary(max_size=20)),
        st.builds(lambda k: kv_pb2.TxnOp(get=k), keys),
        st.builds(lambda k: kv_pb2.TxnOp(delete=k), keys),
        st.just(kv_pb2.TxnOp()),
        st.builds(lambda a, b, p, n: kv_pb2.TxnOp(scan=kv_pb2.TxnScan(start=a, end=b, prefix=p, limit=n)),
                  keys, keys, st.sampled_from([b"", b"a"]) | st.binary(max_size=600), st.integers(0, 2**64 - 1)),
        body.map(lambda b: kv_pb2.TxnOp(txn=b)),
    )


bodies = st.recursive(
    st.builds(kv_pb2.TxnBody, compares=st.lists(compares, max_size=3)),
    lambda inner: st.builds(kv_pb2.TxnBody, compares=st.lists(compares, max_size=3),
                            success=st.lists(_ops(inner), max_size=4), failure=st.lists(_ops(inner), max_size=4)),
    max_leaves=20,
)


class _Node:
    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.tmp = tmp
        self.ids = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def start(self) -> None:
        self.ctx = one_node(self.tmp, request_timeout=2.0)
        self.n = await self.ctx.__aenter__()
        self.ch = grpc.aio.insecure_channel(self.n.address)
        self.kv = kv_pb2_grpc.KVStub(self.ch)

    async def stop(self) -> None:
        await self.ch.close()
        await self.ctx.__aexit__(None, None, None)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Node]:
    n = _Node(tmp_path_factory.mktemp("txnwire"))
    n.run(n.start())
    try:
        yield n
    finally:
        n.run(n.stop())
        n.loop.close()


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=bodies, seq=st.integers(0, 2**64 - 1), revision=st.integers(-(2**63), 2**63 - 1))
def test_any_txn_request_gets_a_success_or_a_definite_error(node: _Node, body: kv_pb2.TxnBody, seq: int,
                                                            revision: int) -> None:
    async def main() -> None:
        req = kv_pb2.TxnRequest(txn=body, session=kv_pb2.Session(client_id=0, seq=seq, revision=revision))
        r = await node.kv.Txn(req, timeout=20)
        assert r.error.code in DEFINITE_OK and not r.error.indeterminate, (req, r.error)
        if r.error.code == kv_pb2.OK:
            assert r.HasField("result")
        # the same on KV.Stream, next to a good operation: the same kind of answer, the stream lives on
        node.ids += 2
        ops = [kv_pb2.Op(id=node.ids, txn=req), kv_pb2.Op(id=node.ids + 1, put=kv_pb2.PutRequest(key=b"alive", value=b"1"))]
        got: dict[int, kv_pb2.OpResult] = {}
        async for rb in node.kv.Stream(iter([kv_pb2.OpBatch(ops=ops)]), timeout=20):
            for res in rb.results:
                got[res.id] = res
        bad, good = got[node.ids], got[node.ids + 1]
        assert bad.WhichOneof("result") == "txn"
        assert bad.txn.error.code in DEFINITE_OK and not bad.txn.error.indeterminate, (req, bad.txn.error)
        assert good.put.error.code == kv_pb2.OK
        # the node keeps serving
        assert (await node.kv.Put(kv_pb2.PutRequest(key=b"alive", value=b"1"), timeout=20)).error.code == kv_pb2.OK

    node.run(main())


def test_txn_refusals_say_what_is_wrong(node: _Node) -> None:
    def body(*ops: kv_pb2.TxnOp, cmps: tuple[kv_pb2.Compare, ...] = ()) -> kv_pb2.TxnRequest:
        return kv_pb2.TxnRequest(txn=kv_pb2.TxnBody(compares=list(cmps), success=list(ops)))

    deep = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(get=b"k")])
    for _ in range(5):
        deep = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(txn=deep)])
    cases = [
        (kv_pb2.TxnRequest(), "at least one key"),
        (body(kv_pb2.TxnOp()), "sets none of"),
        (body(kv_pb2.TxnOp(get=b"")), "key must not be empty"),
        (body(kv_pb2.TxnOp(get=b"k" * 600)), "key"),
        (body(cmps=(kv_pb2.Compare(key=b"k"),)), "no valid target"),
        (body(cmps=(kv_pb2.Compare(key=b"k", target=kv_pb2.COMPARE_MOD, result=kv_pb2.LESS, number=-1),)), ">= 0"),
        (body(*[kv_pb2.TxnOp(get=b"k%d" % i) for i in range(129)]), "more than 128"),
        (kv_pb2.TxnRequest(txn=deep), "deeper than 4"),
        (body(kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"k")), kv_pb2.TxnOp(delete=b"k")), "more than once"),
        (body(kv_pb2.TxnOp(scan=kv_pb2.TxnScan(start=b"k" * 600))), "longer than the longest key"),
        (body(kv_pb2.TxnOp(scan=kv_pb2.TxnScan(start=b"b", end=b"a"))), "not after its start"),
        (body(kv_pb2.TxnOp(scan=kv_pb2.TxnScan(limit=2**63))), "limit"),
        (body(kv_pb2.TxnOp(scan=kv_pb2.TxnScan()), kv_pb2.TxnOp(get=b"")), "key must not be empty"),
        # range deletes (`TxnRange`): their bounds, checked before anything is proposed
        (body(kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange())), "needs a start or an end"),
        (body(kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(start=b"b", end=b"a"))), "at or before its start"),
        (body(kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(start=b"a", prefix=b"p"))), "carries no start or end"),
        (body(kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(prefix=b"k" * 600))), "key"),
        (body(kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"k")), kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(start=b"k5")),
              kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(prefix=b"k" * 600))), "key"),
    ]

    async def main() -> None:
        for req, msg in cases:
            r = await node.kv.Txn(req, timeout=20)
            assert r.error.code != kv_pb2.OK and not r.error.indeterminate, (req, r.error)
            assert msg in r.error.message, (msg, r.error.message)

    node.run(main())


def test_remote_reads_go_on_to_another_node_when_one_is_down_bounded(node: _Node) -> None:
    """`RemoteReads` (how a transaction's scans read a group the serving node lacks): a node that
    cannot be reached, or that does not host the group, is passed over for the next one that
    hosts it (here the one node, group 1); with none left the read fails, definite, naming each
    node tried; at most `MAX_NODES` nodes are tried."""
    from clusterharness import free_ports

    from kvstore.server.remote_reads import MAX_NODES, RemoteReads
    from kvstore.server.scan_parts import ByteBudget

    (port,) = free_ports(1)
    dead = f"127.0.0.1:{port}"  # nothing listens there

    async def main() -> None:
        assert (await node.kv.Put(kv_pb2.PutRequest(key=b"rr/a", value=b"1"), timeout=20)).error.code == kv_pb2.OK
        p = await node.kv.Put(kv_pb2.PutRequest(key=b"rr/b", value=b"2"), timeout=20)
        channels: dict[str, grpc.aio.Channel] = {}

        def channel(addr: str) -> grpc.aio.Channel:
            return channels.setdefault(addr, grpc.aio.insecure_channel(addr))

        try:
            live = RemoteReads(lambda g: [dead, node.n.address], channel, (), 5.0)
            part = await live.scan(kv_pb2.ScanRequest(prefix=b"", start=b"rr/", end=b"rr0", group=1,
                                                      revision=p.revision), ByteBudget(1 << 20))
            assert [(kv.key, kv.value) for kv in part.items] == [(b"rr/a", b"1"), (b"rr/b", b"2")]
            assert (part.revision, part.cut, part.owned.is_full()) == (p.revision, False, True)
            g = await live.get(kv_pb2.GetRequest(key=b"rr/a", revision=p.revision), 1)
            assert (g.value, g.node_id) == (b"1", 1)
            for reads, group in ((RemoteReads(lambda g: [dead], channel, (), 5.0), 1), (live, 2)):
                with pytest.raises(errors.Unavailable) as e:  # group 2: WRONG_SHARD at the one node
                    await reads.scan(kv_pb2.ScanRequest(start=b"rr/", end=b"rr0", group=group), ByteBudget(1 << 20))
                assert e.value.definite and dead in e.value.message
            tried: list[str] = []

            def counted(addr: str) -> grpc.aio.Channel:
                tried.append(addr)
                return channel(addr)

            many = RemoteReads(lambda g: [dead] * 2 * MAX_NODES, counted, (), 5.0)
            with pytest.raises(errors.Unavailable):
                await many.get(kv_pb2.GetRequest(key=b"rr/a"), 1)
            assert len(tried) == MAX_NODES
        finally:
            for ch in channels.values():
                await ch.close()

    node.run(main())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=keys, with_lease=st.booleans(), revision=st.integers(-(2**63), 2**63 - 1), consistency=st.integers(-1, 4))
def test_any_get_with_lease_gets_the_lease_or_a_definite_error(node: _Node, key: bytes, with_lease: bool,
                                                               revision: int, consistency: int) -> None:
    """A Get's with_lease (hostile: any key, revision, consistency), on KV.Get and KV.Stream:
    with a revision a definite INVALID_ARGUMENT; else, answered, `lease_read` says exactly
    whether it was asked, and an unleased or absent key has lease 0. A valid revision with
    with_lease is refused for with_lease itself."""
    async def main() -> None:
        req = kv_pb2.GetRequest(key=key, with_lease=with_lease, revision=revision)
        req.consistency = consistency  # type: ignore[assignment]
        node.ids += 1
        batch = kv_pb2.OpBatch(ops=[kv_pb2.Op(id=node.ids, get=req)])
        streamed = [res.get async for rb in node.kv.Stream(iter([batch]), timeout=20) for res in rb.results]
        for r in (await node.kv.Get(req, timeout=20), *streamed):
            assert not r.error.indeterminate, (req, r.error)
            if with_lease and revision:
                assert r.error.code == kv_pb2.INVALID_ARGUMENT, (req, r.error)  # this, or a bad revision's
            if r.error.code == kv_pb2.OK:
                assert r.lease_read == with_lease and r.lease == 0, (req, r)

    node.run(main())


def test_a_get_with_lease_at_a_valid_revision_is_refused_for_it(node: _Node) -> None:
    async def main() -> None:
        p = await node.kv.Put(kv_pb2.PutRequest(key=b"wl/a", value=b"1"), timeout=20)
        r = await node.kv.Get(kv_pb2.GetRequest(key=b"wl/a", with_lease=True, revision=p.revision), timeout=20)
        assert r.error.code == kv_pb2.INVALID_ARGUMENT and "with_lease" in r.error.message, r.error
        assert not r.error.indeterminate
        ok = await node.kv.Get(kv_pb2.GetRequest(key=b"wl/a", revision=p.revision), timeout=20)
        assert ok.error.code == kv_pb2.OK and ok.value == b"1" and not ok.lease_read

    node.run(main())


def test_remote_reads_pass_over_a_node_that_reads_no_lease(node: _Node) -> None:
    """A node that predates Get's with_lease ignores the field (proto3: an unknown field) and
    answers without a lease. Here such a node is the real node behind a gRPC front that drops
    the field as an older binary's decoder does. `RemoteReads.get` passes it over for a node
    that reads the lease; with only such nodes the read fails, definite: its silence is never
    taken for "no lease"."""
    from kvstore.server.remote_reads import RemoteReads
    from kvstore.storage import leases

    class OldNode(kv_pb2_grpc.KVServicer):
        async def Get(self, request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
            old = kv_pb2.GetRequest()
            old.CopyFrom(request)
            old.ClearField("with_lease")
            resp: kv_pb2.GetResponse = await node.kv.Get(old, timeout=20)
            return resp

    async def main() -> None:
        g = await node.kv.LeaseGrant(kv_pb2.LeaseGrantRequest(ttl=60, id=leases.make_id(1, 77)), timeout=20)
        assert g.error.code == kv_pb2.OK, g.error
        p = await node.kv.LeasePut(kv_pb2.LeasePutRequest(key=b"rl/a", value=b"1", lease=g.id), timeout=20)
        assert p.error.code == kv_pb2.OK, p.error
        server = grpc.aio.server()
        kv_pb2_grpc.add_KVServicer_to_server(OldNode(), server)  # type: ignore[no-untyped-call]
        old = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        channels: dict[str, grpc.aio.Channel] = {}

        def channel(addr: str) -> grpc.aio.Channel:
            return channels.setdefault(addr, grpc.aio.insecure_channel(addr))

        req = kv_pb2.GetRequest(key=b"rl/a", with_lease=True)
        try:
            plain = await RemoteReads(lambda _g: [old], channel, (), 5.0).get(kv_pb2.GetRequest(key=b"rl/a"), 1)
            assert plain.value == b"1"  # the old node serves what it knows
            got = await RemoteReads(lambda _g: [old, node.n.address], channel, (), 5.0).get(req, 1)
            assert got.lease_read and got.lease == g.id and got.value == b"1"
            with pytest.raises(errors.Unavailable, match="read no lease") as e:
                await RemoteReads(lambda _g: [old], channel, (), 5.0).get(req, 1)
            assert e.value.definite
        finally:
            for ch in channels.values():
                await ch.close()
            await server.stop(None)

    node.run(main())
