"""What the etcd servicers share: the node's identity for response headers and the calls into
kvstore's KV servicer (`forward.Forwarder`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import grpc

from kvstore import errors
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.node.host import Host
from kvstore.shard.ranges import key_hash
from kvstore.shard.shardmap import ShardMap

from ..requests import KVRequests
from ..wire import MalformedRequest
from .convert import EtcdRequestError, cluster_id_of
from .forward import Forwarder
from .status import EtcdStatus, of_kv_error, of_request_error


@dataclass(slots=True)
class EtcdNode:
    """One node as etcd's API shows it. Header fields: `cluster_id` from the cluster's name
    (`convert.cluster_id_of`), `member_id` the node id, `revision` the revision the operation
    was served or written at (a reply with none, e.g. a lease's or an empty Txn's: the node's
    current revision, `current_revision`, as etcd's), `raft_term` the term of the group that
    served it on this node (0 where several groups or none hosted here did)."""

    host: Host
    requests: KVRequests
    forward: Forwarder
    cluster_id: int
    member_id: int

    @classmethod
    def of(cls, host: Host, requests: KVRequests, forward: Forwarder, cluster_name: str, node_id: int) -> EtcdNode:
        return cls(host, requests, forward, cluster_id_of(cluster_name), node_id)

    def header(self, revision: int, group: int | None = None) -> rpc_pb2.ResponseHeader:
        term = 0
        if group is not None:
            g = self.host.groups.get(group)
            term = g.core.term if g is not None else 0
        return rpc_pb2.ResponseHeader(cluster_id=self.cluster_id, member_id=self.member_id,
                                      revision=revision if revision > 0 else self.current_revision(),
                                      raft_term=term)

    def current_revision(self) -> int:
        """The highest revision the groups hosted on this node applied (0 if none is): etcd's
        current revision, for replies that were served at none (a group's own may be far behind
        when nothing was written to it)."""
        revisions = self.requests.store.revisions
        return max((revisions.rev_state(g).last for g in self.host.groups), default=0)

    def shard_map(self) -> ShardMap:
        m = self.requests.tracker.map
        if m is None:
            raise of_kv_error(errors.NoLeader("this node has no shard map yet"))
        return m

    def group_of(self, key: bytes) -> int:
        return self.shard_map().group_for_hash(key_hash(key))


async def fail(err: BaseException, context: grpc.aio.ServicerContext, what: str) -> NoReturn:
    """End the call with the etcd status of `err` (a bug: INTERNAL, indeterminate). A malformed
    message in a request stream goes back to `wire.py`, which ends the call INVALID_ARGUMENT."""
    if isinstance(err, MalformedRequest):
        raise err
    if isinstance(err, EtcdRequestError):
        await of_request_error(err).abort(context)
    if isinstance(err, errors.KVError):
        await of_kv_error(err).abort(context)
    if isinstance(err, EtcdStatus):
        await err.abort(context)
    await EtcdStatus(grpc.StatusCode.INTERNAL, f"kvstore: {what} failed: {type(err).__name__}: {err}",
                     indeterminate=True).abort(context)
    raise AssertionError("unreachable")  # context.abort raises
