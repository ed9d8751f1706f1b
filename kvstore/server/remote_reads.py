"""Reads of a data group this node does not host, made at a node that hosts it, as the caller
(kvstore's Txn with scans, `txn_scans.py`: the cut, a key at a revision, a scan's part).

A read at a revision R is exact on any replica of the group (docs/REVISIONS.md, "Reads at a
revision": the serving node closes the group at R through its leader if its applied last is
below R), and a linearizable read is served by any replica after a ReadIndex round; so any node
hosting the group serves these, the leader this node knows of first.

Invariants:
- a request leaves only with the caller's own credential, its token (`token_metadata`): the
  remote guard authenticates the caller by it, so RBAC, admission and audit apply as if the
  client had read there. On a TLS cluster a call without a token is never sent under this node's
  identity: `RemoteReads.of` refuses it up front (`PermissionDenied`, definite);
- each read tries at most `MAX_NODES` nodes hosting the group, each once; it moves to the next
  only when a node cannot be reached, breaks the stream, or does not serve the group
  (WRONG_SHARD, NOT_LEADER, SHUTTING_DOWN, STALE_REPLICA); any other answer is the read's
  (a refusal such as PERMISSION_DENIED or COMPACTED, or a retryable PROPOSAL_DROPPED /
  NO_LEADER left to the caller's bounded retries). Everything raised is a definite KVError
  (a read has no effects);
- a part already received from a node that then failed is dropped, never merged with another
  node's (the next node reads it whole)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from kvstore import errors
from kvstore.security.identity import METADATA_KEY, identity_of_call, token_of
from kvstore.shard.ranges import IntervalSet
from kvstore.v1 import kv_pb2, kv_pb2_grpc

from .scan_parts import ByteBudget, Part, PartItems
from .shards import GroupCaller

MAX_NODES = 3
"""The most nodes one read of a group is tried at (a group's replicas, typically)."""
_NEXT_NODE = frozenset({kv_pb2.WRONG_SHARD, kv_pb2.NOT_LEADER, kv_pb2.SHUTTING_DOWN, kv_pb2.STALE_REPLICA})
"""Reply codes that say "not here": the read is made at the next node that hosts the group."""
_CALLERS_STATUS: dict[grpc.StatusCode, type[errors.KVError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
}
"""gRPC statuses about the caller (its token, its rate): the same at every node, not retried."""
Metadata = tuple[tuple[str, str], ...]


def token_metadata(context: Any) -> Metadata:
    """The caller's token (kvstore's `authorization: Bearer` or etcd's `token` metadata) as
    kvstore's metadata, to forward; () without one, and () unless this node authenticated the
    caller by that token (`identity_of_call().via == "token"`: auth enabled, the token valid).
    A token that was not checked here (auth disabled) is never sent on: the next node would
    authenticate this node's certificate instead, lending the caller this node's identity."""
    if identity_of_call(context).via != "token":
        return ()
    try:
        token = token_of(context.invocation_metadata() or ())
    except Exception:  # a context without metadata (tests); malformed metadata was refused by the guard
        return ()
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


class NotServed(Exception):
    """A node did not serve the read (unreachable, a broken stream, not hosting the group, a
    malformed answer): it is made at the next node."""


class RemoteReads:
    """Reads of groups at the nodes `nodes(group)` names (addresses, best first; this node never
    among them), over `channel(address)`, with the caller's `metadata`, each call bounded by
    `timeout` seconds (see the module docstring)."""

    __slots__ = ("channel", "metadata", "nodes", "timeout")

    def __init__(self, nodes: Callable[[int], Sequence[str]], channel: Callable[[str], grpc.aio.Channel],
                 metadata: Metadata, timeout: float) -> None:
        self.nodes = nodes
        self.channel = channel
        self.metadata = metadata
        self.timeout = timeout

    @staticmethod
    def of(caller: GroupCaller | None, context: Any, timeout: float) -> RemoteReads | None:
        """The remote reads of a call with gRPC `context` on the node of `caller`: None where
        there are no other nodes (`caller` None). On a TLS cluster a call without a token gets
        one that refuses every read (never this node's identity lent to the caller)."""
        if caller is None:
            return None
        meta = token_metadata(context)

        if caller.credentials is not None and not meta:
            def refuse(group: int) -> list[str]:
                raise errors.PermissionDenied(
                    f"group {group} is not hosted on node {caller.node_id}: it is read at a node that hosts it, "
                    "as the caller, which on a TLS cluster needs the caller's token (log in, or send the "
                    "transaction to a node that hosts every group it reads)")
            return RemoteReads(refuse, caller.channel, meta, timeout)
        return RemoteReads(caller.replica_addresses, caller.channel, meta, timeout)

    def _targets(self, group: int) -> list[str]:
        addrs = list(self.nodes(group))[:MAX_NODES]
        if not addrs:
            raise errors.Unavailable(f"no other node is known to host group {group}")
        return addrs

    async def get(self, request: kv_pb2.GetRequest, group: int) -> kv_pb2.GetResponse:
        """`KV.Get` of `request` (a key of `group`) at a node hosting `group`: its successful
        reply (at the revision asked for; with `with_lease`, one that read the lease: a node that
        predates it answers without `lease_read` and counts as one that did not serve the read);
        raises its error (definite)."""
        why: list[str] = []
        for addr in self._targets(group):
            try:
                resp: kv_pb2.GetResponse = await kv_pb2_grpc.KVStub(self.channel(addr)).Get(
                    request, metadata=self.metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                _raise_callers(e)
                why.append(f"{addr}: {e.code().name}")
                continue
            if resp.error.code in _NEXT_NODE:
                why.append(f"{addr}: {kv_pb2.ErrorCode.Name(resp.error.code)}")
                continue
            _raise_reply(resp.error)
            if request.revision and resp.revision != request.revision:  # malformed: not the read asked for
                why.append(f"{addr}: served revision {resp.revision}, not {request.revision}")
                continue
            if request.with_lease and not resp.lease_read:  # an older node ignored with_lease
                why.append(f"{addr}: read no lease (a version before Get's with_lease)")
                continue
            return resp
        raise _unreached(group, why)

    async def scan(self, request: kv_pb2.ScanRequest, budget: ByteBudget) -> Part:
        """`KV.Scan` of `request` (one part, `request.group`, of [start, end)) at a node hosting
        the group, its items' bytes taken from `budget` until it is spent (`PartItems`). Raises
        the reply's error (definite). A node whose answer is malformed (`PartReader`) counts as
        one that did not serve it: what it sent is dropped (its bytes given back)."""
        why: list[str] = []
        for addr in self._targets(request.group):
            reader = PartReader(request, budget)
            try:
                return await self._scan_at(addr, reader)
            except NotServed as e:
                reader.items.drop()
                why.append(f"{addr}: {e}")
            except BaseException:
                reader.items.drop()
                raise
        raise _unreached(request.group, why)

    async def _scan_at(self, addr: str, reader: PartReader) -> Part:
        call = kv_pb2_grpc.KVStub(self.channel(addr)).Scan(reader.request, metadata=self.metadata,
                                                           timeout=self.timeout)
        try:
            async for msg in call:
                if reader.add(msg):
                    break
        except grpc.aio.AioRpcError as e:
            _raise_callers(e)
            raise NotServed(e.code().name) from None
        finally:
            call.cancel()
        return reader.part()


class PartReader:
    """One group's part of a scan from the messages of a remote `KV.Scan` reply, checked (pure:
    messages in, a `Part` or a refusal out; the messages are hostile input). `add` each message
    until it says done; then `part`. Raises only `NotServed` (the node did not serve the part,
    or answered it malformed: read it at the next node) and the reply's own KVError (definite).

    Every item is checked before it is kept: its key in the range asked for, after the one
    before (strictly: no key twice), its key's hash in the hash ranges the group claims to own
    (so the parts of groups whose owned ranges cover the hash space once never share a key), and
    for a read at a revision R, 0 < create_revision <= mod_revision <= R."""

    __slots__ = ("done", "first", "items", "last", "owned", "request")

    def __init__(self, request: kv_pb2.ScanRequest, budget: ByteBudget) -> None:
        self.request = request
        self.first: kv_pb2.ScanResponse | None = None
        self.owned = IntervalSet()
        self.items = PartItems(budget)
        self.last: bytes | None = None
        self.done = False
        """The last message came, or the items spent the budget (`part` may be taken)."""

    def add(self, msg: kv_pb2.ScanResponse) -> bool:
        """Take the next message; whether the part is complete (read no further)."""
        if self.done:
            raise NotServed("it sent more after the last message")
        if msg.error.code in _NEXT_NODE:
            raise NotServed(kv_pb2.ErrorCode.Name(msg.error.code))
        _raise_reply(msg.error)
        r = self.request
        if self.first is None:
            if r.revision and msg.revision != r.revision:
                raise NotServed(f"it served revision {msg.revision}, not {r.revision}")
            if msg.revision < 0:  # 0: a read of the current state of a group that wrote nothing
                raise NotServed(f"it served revision {msg.revision}")
            try:
                self.owned = IntervalSet(zip(msg.owned_lo, msg.owned_hi, strict=True))
            except ValueError as e:
                raise NotServed(f"its owned hash ranges are malformed: {e}") from None
            self.first = msg
        for kv in msg.items:
            k = kv.key
            if k < r.start or (r.end and k >= r.end) or (self.last is not None and k <= self.last):
                raise NotServed(f"it answered key {k[:32]!r} out of the range or out of order")
            if not self.owned.owns_key(k):
                raise NotServed(f"it answered key {k[:32]!r}, whose hash is outside the ranges it owns")
            if r.revision and not 0 < kv.create_revision <= kv.mod_revision <= r.revision:
                raise NotServed(f"it answered key {k[:32]!r} with revisions (create {kv.create_revision}, mod "
                                f"{kv.mod_revision}) not within 1..{r.revision}")
            self.last = k
            if self.items.add(kv):
                self.done = True
                return True
        self.done = not msg.more
        return self.done

    def part(self) -> Part:
        """The part read (raises `NotServed` if the stream ended before its last message)."""
        if self.first is None or not self.done:
            raise NotServed("the scan stream ended early")
        return Part(int(self.first.revision), self.owned, self.items.items, self.items.cut)


def _raise_reply(err: kv_pb2.Error) -> None:
    e = errors.from_proto(err, is_write=False) if err.code else None
    if e is not None:
        raise e


def _raise_callers(e: grpc.aio.AioRpcError) -> None:
    cls = _CALLERS_STATUS.get(e.code())
    if cls is not None:
        raise cls(f"a node hosting a group this node lacks refused the read: {e.details() or e.code().name}")


def _unreached(group: int, why: list[str]) -> errors.Unavailable:
    return errors.Unavailable(f"no node hosting group {group} served the read ({'; '.join(why)})")
