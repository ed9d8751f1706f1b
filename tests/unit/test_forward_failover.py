"""The etcd API's reads of a group this node does not host (`Forwarder.scan`, the part of an
etcd Range or Txn range; `Forwarder.etcd_range`, a LEASE compare's reading) go to another node
that hosts it: one that cannot be reached (down, restarting: UNAVAILABLE) before it answered
is passed over for the next; any other failure, or one after a part of the answer went out,
ends the read with a definite error. Real gRPC servers on loopback, one port closed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.etcdpb.mvccpb import kv_pb2 as mvcc_pb2
from kvstore.server.etcd.forward import Forwarder
from kvstore.server.etcd.status import EtcdStatus
from kvstore.v1 import kv_pb2, kv_pb2_grpc


class _Ctx:
    def invocation_metadata(self) -> Any:
        return ()


class _Scans(kv_pb2_grpc.KVServicer):
    """Serves Scan: two chunks, or `fail` (a status) after `after` chunks."""

    def __init__(self, fail: grpc.StatusCode | None = None, after: int = 0) -> None:
        self.fail, self.after, self.calls = fail, after, 0

    async def Scan(self, request: kv_pb2.ScanRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[kv_pb2.ScanResponse]:
        self.calls += 1
        for i in range(2):
            if self.fail is not None and i == self.after:
                await context.abort(self.fail, "refused here")
            yield kv_pb2.ScanResponse(revision=9, items=[kv_pb2.KeyValue(key=b"k%d" % i, value=b"v")])


class _Ranges(rpc_pb2_grpc.KVServicer):
    def __init__(self, fail: grpc.StatusCode | None = None) -> None:
        self.fail, self.calls = fail, 0

    async def Range(self, request: rpc_pb2.RangeRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.RangeResponse:
        self.calls += 1
        if self.fail is not None:
            await context.abort(self.fail, "refused here")
        return rpc_pb2.RangeResponse(kvs=[mvcc_pb2.KeyValue(key=request.key, lease=7)])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serving(scans: _Scans, ranges: _Ranges) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    kv_pb2_grpc.add_KVServicer_to_server(scans, server)
    rpc_pb2_grpc.add_KVServicer_to_server(ranges, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _forwarder(addrs: dict[int, str], channels: dict[str, grpc.aio.Channel]) -> Forwarder:
    """A Forwarder at node 1, which hosts no group and knows nodes `addrs` (its candidates for
    any group, in id order)."""
    def channel(addr: str) -> grpc.aio.Channel:
        if addr not in channels:
            channels[addr] = grpc.aio.insecure_channel(addr)
        return channels[addr]

    host = SimpleNamespace(groups={}, members={n: None for n in addrs}, leader_of=lambda g: (0, 0))
    caller = SimpleNamespace(credentials=None, node_id=1, host=host, tracker=SimpleNamespace(map=None),
                             channel=channel, address=addrs.get,
                             replica_addresses=lambda group: [addrs[n] for n in sorted(addrs) if n != 1])
    return Forwarder(kv=None, caller=cast(Any, caller), timeout=10.0)


async def _scan(fw: Forwarder) -> list[bytes]:
    got: list[bytes] = []
    async for msg in fw.scan(kv_pb2.ScanRequest(group=5, start=b"k"), cast(Any, _Ctx())):
        got += [kv.key for kv in msg.items]
    return got


def _run(first: tuple[_Scans, _Ranges] | None, second: tuple[_Scans, _Ranges], body: Any) -> Any:
    """`body(forwarder)` with node 2 at `first` (None: a closed port) and node 3 at `second`."""
    async def main() -> Any:
        servers: list[grpc.aio.Server] = []
        channels: dict[str, grpc.aio.Channel] = {}
        try:
            addrs = {}
            for n, svc in ((2, first), (3, second)):
                if svc is None:
                    addrs[n] = f"127.0.0.1:{_closed_port()}"
                else:
                    server, addrs[n] = await _serving(*svc)
                    servers.append(server)
            return await body(_forwarder(addrs, channels))
        finally:
            for ch in channels.values():
                await ch.close()
            for s in servers:
                await s.stop(None)
    return asyncio.run(main())


def test_a_scan_passes_over_a_node_that_cannot_be_reached() -> None:
    live = (_Scans(), _Ranges())
    assert _run(None, live, _scan) == [b"k0", b"k1"]
    assert live[0].calls == 1


def test_a_scan_passes_over_a_node_unavailable_before_its_first_message() -> None:
    down, live = (_Scans(grpc.StatusCode.UNAVAILABLE, 0), _Ranges()), (_Scans(), _Ranges())
    assert _run(down, live, _scan) == [b"k0", b"k1"]
    assert down[0].calls == 1 and live[0].calls == 1


@pytest.mark.parametrize(("code", "after"), [(grpc.StatusCode.UNAVAILABLE, 1),  # a part already passed on
                                             (grpc.StatusCode.PERMISSION_DENIED, 0),  # the caller's fault
                                             (grpc.StatusCode.RESOURCE_EXHAUSTED, 0)])
def test_a_scan_failing_otherwise_ends_with_a_definite_error_and_tries_no_other(code: grpc.StatusCode,
                                                                                 after: int) -> None:
    bad, other = (_Scans(code, after), _Ranges()), (_Scans(), _Ranges())
    with pytest.raises(EtcdStatus) as e:
        _run(bad, other, _scan)
    assert other[0].calls == 0 and bad[0].calls == 1
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and not e.value.indeterminate
    assert "reading group 5" in e.value.message and "refused here" in e.value.message


def test_a_scan_with_every_node_down_says_where_each_failed() -> None:
    down = (_Scans(grpc.StatusCode.UNAVAILABLE, 0), _Ranges())
    with pytest.raises(EtcdStatus) as e:
        _run(None, down, _scan)
    assert e.value.message.count("failed: UNAVAILABLE") == 2 and not e.value.indeterminate


async def _range(fw: Forwarder) -> rpc_pb2.RangeResponse:
    return await fw.etcd_range(rpc_pb2.RangeRequest(key=b"k"), cast(Any, _Ctx()), 5)


def test_a_lease_reading_passes_over_unreachable_and_unavailable_nodes() -> None:
    live = (_Scans(), _Ranges())
    assert _run(None, live, _range).kvs[0].lease == 7
    down, live = (_Scans(), _Ranges(grpc.StatusCode.UNAVAILABLE)), (_Scans(), _Ranges())
    assert _run(down, live, _range).kvs[0].lease == 7
    assert down[1].calls == 1 and live[1].calls == 1


def test_a_lease_reading_refused_otherwise_is_that_nodes_status_and_tries_no_other() -> None:
    bad, other = (_Scans(), _Ranges(grpc.StatusCode.PERMISSION_DENIED)), (_Scans(), _Ranges())
    with pytest.raises(EtcdStatus) as e:
        _run(bad, other, _range)
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and other[1].calls == 0


def test_the_replicas_to_read_a_group_at_are_its_leader_then_its_members_never_this_node() -> None:
    """`GroupCaller.replica_addresses`, the list both the etcd API's reads and the transactions'
    remote reads walk: the known leader first, then the group's members, each once; this node
    and nodes with no known address left out."""
    from kvstore.raft import ConfState
    from kvstore.server.shards import GroupCaller

    conf = ConfState((1, 2, 3, 4))
    host = SimpleNamespace(groups={5: SimpleNamespace(core=SimpleNamespace(conf=conf))},
                           members={1: "a1", 2: "a2", 3: "a3", 4: ""}, leader_of=lambda g: (3, "a3"))
    caller = GroupCaller(1, cast(Any, host), lambda: None, cast(Any, SimpleNamespace(map=None)), 1.0)
    assert caller.replica_addresses(5) == ["a3", "a2"]
    host.leader_of = lambda g: (1, "a1")  # this node leads it: only the others, in id order
    assert caller.replica_addresses(5) == ["a2", "a3"]


class _Renewals:
    """A node's `keep_alive_one`: answers the scripted errors in turn, then a renewal."""

    def __init__(self, *errors: kv_pb2.Error) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def keep_alive_one(self, r: kv_pb2.LeaseKeepAliveRequest) -> kv_pb2.LeaseKeepAliveResponse:
        self.calls += 1
        if self.errors:
            return kv_pb2.LeaseKeepAliveResponse(error=self.errors.pop(0), id=r.id)
        return kv_pb2.LeaseKeepAliveResponse(id=r.id, ttl=30)


_NO_LEADER = kv_pb2.Error(code=kv_pb2.NO_LEADER, message="no leader")


def test_a_keep_alive_waits_out_an_election_as_etcd_does() -> None:
    """No leader known, a dropped proposal, a NOT_LEADER naming nobody: definite refusals that
    an election ends, retried within the timeout (etcdctl's `keep-alive --once` does not retry:
    in CI it failed "no leader" while a group changed leaders)."""
    local = _Renewals(_NO_LEADER, kv_pb2.Error(code=kv_pb2.PROPOSAL_DROPPED),
                      kv_pb2.Error(code=kv_pb2.NOT_LEADER))
    fwd = Forwarder(kv=None, caller=None, timeout=10.0)
    resp = asyncio.run(fwd.keep_alive(local, kv_pb2.LeaseKeepAliveRequest(id=5), cast(Any, _Ctx()), group=2))
    assert (resp.id, resp.ttl, local.calls) == (5, 30, 4)


def test_a_keep_alive_without_a_leader_for_the_whole_timeout_fails_definite() -> None:
    local = _Renewals(*[_NO_LEADER] * 1000)
    fwd = Forwarder(kv=None, caller=None, timeout=0.3)
    with pytest.raises(EtcdStatus) as err:
        asyncio.run(fwd.keep_alive(local, kv_pb2.LeaseKeepAliveRequest(id=5), cast(Any, _Ctx()), group=2))
    assert "no leader" in err.value.message and not err.value.indeterminate, (err.value.code, err.value.message)
    assert 2 <= local.calls < 1000


@pytest.mark.parametrize("error", [
    kv_pb2.Error(code=kv_pb2.INVALID_ARGUMENT, refusal=kv_pb2.REFUSAL_LEASE_NOT_FOUND, message="lease not found"),
    kv_pb2.Error(code=kv_pb2.NO_LEADER, indeterminate=True, message="lost"),
])
def test_a_keep_alive_refused_for_good_or_maybe_applied_is_not_retried(error: kv_pb2.Error) -> None:
    local = _Renewals(error)
    fwd = Forwarder(kv=None, caller=None, timeout=10.0)
    with pytest.raises(EtcdStatus):
        asyncio.run(fwd.keep_alive(local, kv_pb2.LeaseKeepAliveRequest(id=5), cast(Any, _Ctx()), group=2))
    assert local.calls == 1
