"""`server/scan_parts.gather_parts` (the parts of a range read at most `parallel` at once; one
failing cancels the others, which are gone before the error is raised) and the forwarding of a
caller's token (`remote_reads.token_metadata`, shared by kvstore's Txn with scans and etcd's
forwarder): sent on only when this node authenticated the caller by it. What is read again: a
replica's refusal for want of a leader, by etcd's forwarder (reads only) and by a range's parts."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kvstore import errors
from kvstore.security.identity import ANONYMOUS, Principal, PrincipalKind, set_identity
from kvstore.server.etcd.forward import Forwarder
from kvstore.server.etcd.status import EtcdStatus
from kvstore.server.remote_reads import RemoteReads, token_metadata
from kvstore.server.scan_parts import gather_parts, retrying
from kvstore.v1 import kv_pb2


def test_parts_are_read_at_most_parallel_at_once_and_in_order() -> None:
    running, most = [0], [0]

    def read(i: int) -> Any:
        async def go() -> int:
            running[0] += 1
            most[0] = max(most[0], running[0])
            await asyncio.sleep(0)
            running[0] -= 1
            return i
        return go

    assert asyncio.run(gather_parts([read(i) for i in range(20)], 3)) == list(range(20))
    assert most[0] == 3


def test_one_part_failing_cancels_the_others_and_they_end_before_the_error() -> None:
    ended: list[str] = []

    async def main() -> None:
        async def slow() -> int:
            try:
                await asyncio.Event().wait()
            finally:
                ended.append("slow")
            return 0

        async def failing() -> int:
            await asyncio.sleep(0)
            raise errors.Unavailable("a part failed")

        with pytest.raises(errors.Unavailable):
            await gather_parts([slow, slow, failing, slow], 8)
        assert ended == ["slow"] * 3  # every other part was cancelled and has ended

    asyncio.run(main())


class _Ctx:
    def invocation_metadata(self) -> Any:
        return (("authorization", "Bearer someone-elses"),)


def _caller(tls: bool) -> Any:
    return SimpleNamespace(credentials=object() if tls else None, node_id=1, host=None, tracker=None,
                           channel=lambda addr: None, address=lambda n: None, replica_addresses=lambda g: [])


@pytest.mark.parametrize(("via", "forwarded"), [("token", True), ("certificate", False), ("none", False)])
def test_a_token_is_forwarded_only_if_it_authenticated_the_caller_here(via: str, forwarded: bool) -> None:
    kind = PrincipalKind.NODE if via == "certificate" else PrincipalKind.USER
    set_identity(Principal(kind, "u", via))
    try:
        meta = token_metadata(_Ctx())
        assert meta == ((("authorization", "Bearer someone-elses"),) if forwarded else ())
        # on a TLS cluster a caller not authenticated by its token is refused, never read for as this node
        reads = RemoteReads.of(cast(Any, _caller(tls=True)), _Ctx(), 1.0)
        assert reads is not None
        if not forwarded:
            with pytest.raises(errors.PermissionDenied):
                reads.nodes(3)
        assert Forwarder(kv=None, caller=cast(Any, _caller(tls=True)), timeout=1.0).may_forward(
            cast(Any, _Ctx())) == forwarded
    finally:
        set_identity(ANONYMOUS)


class _KV:
    """A node's KV servicer whose first `refusals` replies are `code` refusals, then OK."""

    def __init__(self, code: int, refusals: int) -> None:
        self.code, self.refusals, self.calls = code, refusals, 0

    async def Get(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.calls <= self.refusals:
            return kv_pb2.GetResponse(error=kv_pb2.Error(code=self.code, message="node 2 knows no leader"))
        return kv_pb2.GetResponse(found=True, value=b"v")

    Put = Get


def test_the_forwarder_waits_out_a_replica_that_knows_no_leader_for_a_read_only() -> None:
    """etcd's member waits for a leader rather than fail a linearizable read: a replica's
    STALE_REPLICA refusal of a read is tried again (within the timeout); a write's is not."""
    kv = _KV(kv_pb2.STALE_REPLICA, 3)
    resp = asyncio.run(Forwarder(kv=kv, caller=None, timeout=5.0).call("Get", None, cast(Any, _Ctx()),
                                                                        is_write=False))
    assert resp.value == b"v" and kv.calls == 4
    kv = _KV(kv_pb2.STALE_REPLICA, 3)
    with pytest.raises(EtcdStatus):
        asyncio.run(Forwarder(kv=kv, caller=None, timeout=5.0).call("Put", None, cast(Any, _Ctx()), is_write=True))
    assert kv.calls == 1
    kv = _KV(kv_pb2.STALE_REPLICA, 1000)  # a replica that never hears from a leader: bounded by the timeout
    with pytest.raises(EtcdStatus):
        asyncio.run(Forwarder(kv=kv, caller=None, timeout=0.3).call("Get", None, cast(Any, _Ctx()), is_write=False))
    assert 2 <= kv.calls < 20


def test_a_read_part_refused_by_a_replica_without_a_leader_is_tried_again() -> None:
    calls = [0]

    async def once() -> int:
        calls[0] += 1
        if calls[0] < 3:
            raise errors.StaleReplica("node 3 knows no leader (group 1)")
        return 7

    assert asyncio.run(retrying(once, 8, 0.001)) == 7 and calls[0] == 3
