"""An etcd call runs where it lands (etcd clients do not follow leader hints): its kvstore
request goes to the node's own KV servicer (the audited one, behind the caller's own credential,
so RBAC and audit apply as for kvstore's RPCs), and a reply NOT_LEADER with the leader's address
(or WRONG_SHARD for a group this node does not host: to a node that hosts it) is sent on to that
node's KV service with the caller's bearer token (at most `MAX_HOPS` hops).

Forwarding never lends this node's identity to a caller: on a TLS cluster a call is forwarded
only if it carries a token (the leader authenticates the caller by it); otherwise the reply
stays NOT_LEADER (UNAVAILABLE "etcdserver: not leader", definite) and the client retries
another endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.node.grouprequests import leader_candidates
from kvstore.v1 import kv_pb2, kv_pb2_grpc

from ..remote_reads import token_metadata
from ..shards import GroupCaller
from .status import EtcdStatus, check_reply

MAX_HOPS = 3
__all__ = ["MAX_HOPS", "Forwarder", "token_metadata", "waits_for_leader"]


class _Replied(Protocol):
    @property
    def error(self) -> kv_pb2.Error: ...


_R = TypeVar("_R", bound=_Replied)


def waits_for_leader(err: kv_pb2.Error, is_write: bool) -> bool:
    """Whether a reply's error is a definite refusal that an election or a leadership transfer
    ends (no leader known, a dropped proposal, a NOT_LEADER naming nobody; for a read also a
    replica's STALE_REPLICA), so the etcd API retries it within its timeout."""
    code = err.code
    if err.indeterminate:
        return False
    return (code == kv_pb2.PROPOSAL_DROPPED or code == kv_pb2.NO_LEADER
            or (code == kv_pb2.NOT_LEADER and not err.leader_hint)
            or (code == kv_pb2.STALE_REPLICA and not is_write))


@dataclass(slots=True)
class Forwarder:
    """Runs kvstore KV requests for the etcd servicers (see the module docstring). `kv` is the
    node's KV servicer as registered (audited with --audit-log); `caller` supplies channels to
    other nodes; `timeout` bounds each forwarded call."""

    kv: Any
    caller: GroupCaller | None
    timeout: float

    def may_forward(self, context: grpc.aio.ServicerContext) -> bool:
        """Whether a call of `context` may be sent on to other nodes: there are peers, and on a
        TLS cluster the call carries the caller's token (never this node's identity)."""
        if self.caller is None:
            return False
        return self.caller.credentials is None or bool(token_metadata(context))

    def stub(self, addr: str) -> kv_pb2_grpc.KVStub:
        assert self.caller is not None
        return kv_pb2_grpc.KVStub(self.caller.channel(addr))

    async def call(self, method: str, request: Any, context: grpc.aio.ServicerContext, *, is_write: bool,
                   group: int | None = None) -> Any:
        """The reply of KV.`method` for `request`, from this node or its group's leader; raises
        `EtcdStatus` for an error reply. A definite refusal that an election or a leadership
        transfer ends (no leader known, a dropped proposal) is retried with backoff for up to
        `timeout`, as etcd's server waits for a leader: etcd clients do not retry a write. So is
        a read a replica refused for want of its leader (STALE_REPLICA: no leader known, out of
        contact, no read index in time): an etcd member waits for the leader rather than fail a
        linearizable read; a read has no effects, so trying again is always safe.
        `group`: the one group the request touches, if known: a node that does not host it sends
        the request on to one that does (its leader, if known)."""
        return await self._until_led(
            lambda: self._call_once(method, request, context, is_write=is_write, group=group), is_write)

    async def _until_led(self, attempt: Callable[[], Awaitable[_R]], is_write: bool) -> _R:
        """`attempt()`'s reply once its error is not one an election ends (`waits_for_leader`),
        or the last one when `timeout` runs out (backoff 20 ms doubling to 250 ms); raises the
        EtcdStatus of an error reply."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        delay = 0.02
        while True:
            resp = await attempt()
            error = resp.error
            if not waits_for_leader(error, is_write) or loop.time() + delay > end:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        check_reply(error, is_write=is_write)
        return resp

    def _target(self, err: kv_pb2.Error, group: int | None) -> str:
        """Where to send a request answered `err` on: the leader a NOT_LEADER names; for a
        WRONG_SHARD of a `group` this node does not host, the best guess among its members
        (`leader_candidates`); "" for nowhere."""
        if err.code == kv_pb2.NOT_LEADER:
            return err.leader_hint
        c = self.caller
        if err.code == kv_pb2.WRONG_SHARD and group is not None and c is not None and group not in c.host.groups:
            for n in leader_candidates(c.host, c.tracker.map, group):
                if n != c.node_id and (addr := c.address(n)):
                    return addr
        return ""

    async def _call_once(self, method: str, request: Any, context: grpc.aio.ServicerContext, *, is_write: bool,
                         group: int | None) -> Any:
        resp = await getattr(self.kv, method)(request, context)
        hops = 0
        while hops < MAX_HOPS and (addr := self._target(resp.error, group)) and self.may_forward(context):
            hops += 1
            try:
                resp = await getattr(self.stub(addr), method)(
                    request, metadata=token_metadata(context), timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                raise EtcdStatus(grpc.StatusCode.UNAVAILABLE,
                                 f"kvstore: the call forwarded to the leader failed: {e.code().name} {e.details()}",
                                 indeterminate=is_write) from None
        return resp

    async def etcd_range(self, request: rpc_pb2.RangeRequest, context: grpc.aio.ServicerContext,
                         group: int) -> rpc_pb2.RangeResponse:
        """etcd's `KV.Range` of `request` at a node that hosts `group`, which this node does not
        (with the caller's token, under the same rule as `call`): its answer reports each key's
        lease as attached on that node's replica of the group. A node that cannot be reached or
        is unavailable (UNAVAILABLE: down, restarting, no leader) is passed over for the next
        one that hosts the group (a read: trying another is always safe); any other failure is
        that node's status (definite: a read), as is the last node's. A call that may not be
        forwarded (TLS without a token) or a group with no known member is FAILED_PRECONDITION,
        definite."""
        addrs = self._hosts(group, context)
        for i, addr in enumerate(addrs):
            try:
                return await rpc_pb2_grpc.KVStub(self._channel(addr)).Range(
                    request, metadata=token_metadata(context), timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and i + 1 < len(addrs):
                    continue
                raise EtcdStatus(e.code(), e.details() or f"kvstore: reading group {group} at {addr} failed"
                                 ) from None
        raise EtcdStatus(grpc.StatusCode.FAILED_PRECONDITION,
                         f"kvstore: this reads a key's lease where its data group {group} is hosted; this node does "
                         "not host it and may not send the call on (on a TLS cluster only a call with a token is): "
                         "send it to a node that hosts the group")

    def _hosts(self, group: int, context: grpc.aio.ServicerContext) -> list[str]:
        """The addresses of the other nodes to read `group` at, best guess first (its leader,
        then its members: `leader_candidates`); none if the call may not be sent on."""
        c = self.caller
        if c is None or not self.may_forward(context):
            return []
        return c.replica_addresses(group)

    def _channel(self, addr: str) -> grpc.aio.Channel:
        assert self.caller is not None
        return self.caller.channel(addr)

    def scan(self, request: kv_pb2.ScanRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[kv_pb2.ScanResponse]:
        """KV.Scan of one group's part: here if this node hosts the group, else at a node that
        does (any replica serves it; with the caller's token, under the same rule as `call`)."""
        c = self.caller
        if c is None or request.group in c.host.groups:
            return self.kv.Scan(request, context)
        addrs = self._hosts(request.group, context)
        return self._remote_scan(addrs, request, context) if addrs else self.kv.Scan(request, context)

    async def _remote_scan(self, addrs: list[str], request: kv_pb2.ScanRequest, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[kv_pb2.ScanResponse]:
        """The scan's messages from the first of `addrs` that serves it. A node that fails
        UNAVAILABLE (down, restarting) before its first message is passed over for the next (a
        read: trying another replica is always safe); once a message was passed on, a failure
        ends the scan (the caller retries the part whole), as does the last node's."""
        why: list[str] = []
        for i, addr in enumerate(addrs):
            sent = False
            try:
                async for msg in self.stub(addr).Scan(request, metadata=token_metadata(context), timeout=self.timeout):
                    sent = True
                    yield msg
                return
            except grpc.aio.AioRpcError as e:
                why.append(f"at {addr} failed: {e.code().name} {e.details()}")
                if sent or e.code() != grpc.StatusCode.UNAVAILABLE or i + 1 == len(addrs):
                    raise EtcdStatus(grpc.StatusCode.UNAVAILABLE,
                                     f"kvstore: reading group {request.group} {'; '.join(why)}") from None

    async def keep_alive(self, local: Any, request: kv_pb2.LeaseKeepAliveRequest, context: grpc.aio.ServicerContext,
                         group: int) -> kv_pb2.LeaseKeepAliveResponse:
        """One keep-alive: `local.keep_alive_one` here, or one message on a LeaseKeepAlive
        stream to the leader of the lease's home `group`. A definite refusal that an election or
        a leadership transfer ends is retried with backoff for up to `timeout`, as `call` does
        (etcd's server waits for a leader to renew a lease, and `etcdctl lease keep-alive --once`
        does not retry: it failed with "no leader" while a group changed leaders)."""
        return await self._until_led(lambda: self._keep_alive_once(local, request, context, group), True)

    async def _keep_alive_once(self, local: Any, request: kv_pb2.LeaseKeepAliveRequest,
                               context: grpc.aio.ServicerContext, group: int) -> kv_pb2.LeaseKeepAliveResponse:
        resp = await local.keep_alive_one(request)
        hops = 0
        while hops < MAX_HOPS and (addr := self._target(resp.error, group)) and self.may_forward(context):
            hops += 1

            async def one() -> AsyncIterator[kv_pb2.LeaseKeepAliveRequest]:
                yield request

            try:
                call = self.stub(addr).LeaseKeepAlive(
                    one(), metadata=token_metadata(context), timeout=self.timeout)
                got = None
                async for r in call:
                    got = r
                    break
                call.cancel()
            except grpc.aio.AioRpcError as e:
                raise EtcdStatus(grpc.StatusCode.UNAVAILABLE,
                                 f"kvstore: the keep-alive forwarded to the leader failed: {e.code().name}",
                                 indeterminate=True) from None
            if got is None:
                raise EtcdStatus(grpc.StatusCode.UNAVAILABLE, "kvstore: the leader ended the keep-alive stream",
                                 indeterminate=True)
            resp = got
        return resp

