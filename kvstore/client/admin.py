"""Admin, membership and shard calls: node status, membership changes, leadership transfer,
snapshots, and shard map operations (info, add/remove group, rebalance).

Every answer is a kvstore type (`kvstore.client.types`), never a wire message. Admin and shard
operations that change the cluster carry no session: an indeterminate outcome is not retried
(it is reported, indeterminate, for the caller to check).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from kvstore.client.channels import Channels
from kvstore.client.checks import RequestChecks, check_revision
from kvstore.client.cluster_view import ClusterView
from kvstore.client.failures import RpcFailure
from kvstore.client.invoke import Invoker
from kvstore.client.retry import RetryPolicy
from kvstore.client.routing import DEFAULT_GROUP
from kvstore.client.types import AdminResult, Alarm, GroupHash, NodeStatus, ShardOpResult, Status
from kvstore.errors import InternalError, InvalidArgument, Unavailable
from kvstore.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, shard_pb2

__all__ = ["Admin"]


class Admin:
    """The admin and shard calls."""

    def __init__(
        self, checks: RequestChecks, channels: Channels, view: ClusterView, invoker: Invoker, policy: RetryPolicy
    ) -> None:
        self.checks = checks
        self.channels = channels
        self.view = view
        self.router = view.router
        self.invoker = invoker
        self.policy = policy

    async def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> Status:
        """Admin.Status of ``endpoint``, or of whichever node answers first (the leader if known)."""

        async def call(ep: str, t: float) -> admin_pb2.StatusResponse:
            resp: admin_pb2.StatusResponse = await self.channels.admin(ep).Status(admin_pb2.StatusRequest(), timeout=t)
            self.view.learn(ep, resp)
            return resp

        resp = await self.invoker.invoke(
            "status",
            call,
            deadline=self.checks.deadline(timeout),
            is_write=False,
            endpoint=endpoint,
            error_of=lambda r: None,
            learns_leader=False,
        )
        return Status.from_proto(resp)

    async def cluster_status(self, *, timeout: float | None = None) -> list[NodeStatus]:
        """Admin.Status of every known endpoint and every member they report, concurrently.

        One attempt per node, each bounded by the attempt timeout. Nodes that cannot be reached
        are listed with their error. Ordered by node id (unreachable ones last, by address).
        Raises :class:`Unavailable` if no node answers.
        """
        deadline = self.checks.deadline(timeout)
        results: dict[str, NodeStatus] = {}
        reasons: set[str] = set()
        seen_ids: set[int] = set()
        while True:
            todo = [ep for ep in self.router.endpoints if ep not in results]
            if not todo or deadline.expired:
                break
            t = deadline.bound(self.policy.attempt_timeout)
            answers = await asyncio.gather(*(self.view.status_once(ep, t) for ep in todo), return_exceptions=True)
            for ep, ans in zip(todo, answers, strict=True):
                if isinstance(ans, admin_pb2.StatusResponse):
                    results[ep] = NodeStatus(ep, status=Status.from_proto(ans))
                elif isinstance(ans, RpcFailure):
                    results[ep] = NodeStatus(ep, error=ans.error)
                    reasons.add(ans.reason)
                elif isinstance(ans, BaseException) and not isinstance(ans, Exception):
                    raise ans
                else:
                    results[ep] = NodeStatus(ep, error=InternalError(str(ans), indeterminate=False))
        if not any(ns.status is not None for ns in results.values()):
            eps = ", ".join(self.router.endpoints)
            raise Unavailable(f"cannot reach any endpoint ({eps}): {'; '.join(sorted(reasons)) or 'timed out'}")
        # An advertised address and a dialed one may name the same node: keep the first answer.
        out: list[NodeStatus] = []
        for ns in results.values():
            if ns.status is not None:
                if ns.status.node_id in seen_ids:
                    continue
                seen_ids.add(ns.status.node_id)
            out.append(ns)
        out.sort(key=lambda ns: (ns.status is None, ns.status.node_id if ns.status else 0, ns.address))
        return out

    async def _admin_call(
        self,
        op: str,
        call: Callable[[admin_pb2_grpc.AdminStub, float], Awaitable[admin_pb2.AdminResponse]],
        *,
        endpoint: str | None = None,
        timeout: float | None = None,
    ) -> AdminResult:
        # Admin operations carry no session, so an indeterminate outcome is not retried. A
        # membership change or transfer runs group after group on the server: each attempt may
        # use the whole budget rather than the per-attempt timeout of a single read or write.
        # Default budget: 3x a read's or write's (a change commits in every group, one by one).
        deadline = self.checks.deadline(timeout if timeout is not None else 3 * self.policy.timeout)
        resp = await self.invoker.invoke(
            op,
            lambda ep, t: call(self.channels.admin(ep), max(t, deadline.remaining())),
            deadline=deadline,
            is_write=True,
            endpoint=endpoint,
            retry_indeterminate=False,
        )
        return AdminResult.from_proto(resp)

    async def add_member(
        self, id: int, address: str, learner: bool = True, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        """Add node ``id`` at ``address``, as a learner by default (promote it once caught up), to
        the metadata group and every data group, or only to the data ``groups`` given."""
        req = admin_pb2.AddMemberRequest(id=id, address=address, learner=learner, groups=list(groups))
        return await self._admin_call("add member", lambda s, t: s.AddMember(req, timeout=t), timeout=timeout)

    async def promote_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        """Promote learner ``id`` to voter (everywhere, or in the data ``groups`` given)."""
        req = admin_pb2.PromoteMemberRequest(id=id, groups=list(groups))
        return await self._admin_call(
            "promote member", lambda s, t: s.PromoteMember(req, timeout=t), timeout=timeout
        )

    async def remove_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        """Remove node ``id`` from the cluster (or only from the data ``groups`` given)."""
        req = admin_pb2.RemoveMemberRequest(id=id, groups=list(groups))
        return await self._admin_call(
            "remove member", lambda s, t: s.RemoveMember(req, timeout=t), timeout=timeout
        )

    async def transfer_leader(
        self, to: int = 0, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        """Hand leadership of every group (or of ``groups``) to node ``to`` (0: each group's
        most up-to-date other voter)."""
        req = admin_pb2.TransferLeaderRequest(to=to, groups=list(groups))
        resp = await self._admin_call(
            "transfer leader", lambda s, t: s.TransferLeader(req, timeout=t), timeout=timeout
        )
        for g in [DEFAULT_GROUP, 0, *self.router.scan_groups()]:
            self.router.forget_leader(g)
        return resp

    async def _shard_op(
        self, op: str, req: shard_pb2.ShardOpRequest, timeout: float | None, *, write: bool
    ) -> ShardOpResult:
        resp: shard_pb2.ShardOpResponse = await self.invoker.invoke(
            op,
            # With `wait`, the server answers once every move is done: the attempt may take as
            # long as the request's own timeout.
            lambda ep, t: self.channels.shard(ep).ShardOp(req, timeout=max(t, req.timeout + 5.0) if req.wait else t),
            deadline=self.checks.deadline(timeout),
            is_write=write,
            retry_indeterminate=False,
            learns_leader=False,
        )
        return ShardOpResult.from_proto(resp)

    async def shards(self, *, timeout: float | None = None) -> ShardOpResult:
        """The shard map's groups: replicas, leader, key count, share of the hash space."""
        return await self._shard_op("shards", shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.INFO), timeout,
                                    write=False)

    async def add_group(self, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        """Add a data group; with ``wait``, return once its ranges have moved in."""
        req = shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.ADD_GROUP, wait=wait, timeout=timeout)
        return await self._shard_op("add group", req, timeout + 10, write=True)

    async def remove_group(self, group: int, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        """Move every range of ``group`` to the other groups, then drop it."""
        req = shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.REMOVE_GROUP, group=group, wait=wait,
                                       timeout=timeout)
        return await self._shard_op("remove group", req, timeout + 10, write=True)

    async def rebalance(self, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        """Return every group to its even share of the ring, moving ranges as needed."""
        req = shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.REBALANCE, wait=wait, timeout=timeout)
        return await self._shard_op("rebalance", req, timeout + 10, write=True)

    async def alarms(self, *, timeout: float | None = None) -> list[Alarm]:
        """The cluster's alarms (as the node asked applied them from the metadata group)."""
        req = admin_pb2.AlarmListRequest()
        deadline = self.checks.deadline(timeout)
        resp = await self.invoker.invoke(
            "alarm list", lambda ep, t: self.channels.admin(ep).AlarmList(req, timeout=t),
            deadline=deadline, is_write=False, learns_leader=False,
        )
        return _alarms(resp)

    async def disarm_alarms(
        self, node_id: int = 0, type: str | None = None, *, timeout: float | None = None
    ) -> list[Alarm]:
        """Disarm the matching alarms cluster-wide (node_id 0: every node's; type None: every
        type); the alarms still raised after. A node still over its quota raises NOSPACE again."""
        kind = "ALARM_NONE" if type is None else f"ALARM_{type.upper()}"
        if kind not in admin_pb2.AlarmType.keys():  # noqa: SIM118 - an enum wrapper, not a dict
            raise InvalidArgument(f"unknown alarm type {type!r}")
        req = admin_pb2.AlarmDisarmRequest(node_id=node_id, type=kind)
        deadline = self.checks.deadline(timeout)
        resp = await self.invoker.invoke(
            "alarm disarm", lambda ep, t: self.channels.admin(ep).AlarmDisarm(req, timeout=t),
            deadline=deadline, is_write=True, learns_leader=False,
        )
        return _alarms(resp)

    async def compact(self, revision: int, *, timeout: float | None = None) -> int:
        """Compact the history of every group at ``revision`` (KV.Compact; admin permission).
        Idempotent, so an indeterminate attempt is retried. Returns the revision compacted at."""
        rev = check_revision(revision, zero=False)
        req = kv_pb2.CompactRequest(revision=rev)
        deadline = self.checks.deadline(timeout if timeout is not None else 3 * self.policy.timeout)
        resp = await self.invoker.invoke(
            "compact", lambda ep, t: self.channels.kv(ep).Compact(req, timeout=max(t, deadline.remaining())),
            deadline=deadline, is_write=True, learns_leader=False,
        )
        return int(resp.revision)

    async def snapshot(
        self, endpoint: str | None = None, *, timeout: float | None = None
    ) -> AdminResult:
        """Trigger a snapshot (and log compaction) at ``endpoint``, or at the leader."""
        req = admin_pb2.SnapshotRequest()
        return await self._admin_call(
            "snapshot", lambda s, t: s.Snapshot(req, timeout=t), endpoint=endpoint, timeout=timeout
        )

    async def hash_kv(
        self, endpoint: str, group: int, revision: int = 0, *, exact: bool = False, timeout: float | None = None
    ) -> GroupHash:
        """The hash of `group`'s key space at `revision` on the node at `endpoint` (Admin.HashKV;
        admin permission). Revision 0 without `exact`: `endpoint` must be the group's leader, which
        hashes at its last revision after a linearizable read point (NOT_LEADER elsewhere, not
        retried: the caller picks the node); with `exact`, at `revision` as given, 0 included (a
        leader's answer for a group that never wrote). A read: an attempt that failed is retried
        at the same node."""
        if not 0 <= group <= MAX_GROUP_ID:
            raise InvalidArgument(f"group {group} is out of range")
        rev = check_revision(revision, zero=True)
        req = admin_pb2.HashKVRequest(group=group, revision=rev, exact=exact)
        resp = await self.invoker.invoke(
            "hash_kv", lambda ep, t: self.channels.admin(ep).HashKV(req, timeout=t),
            deadline=self.checks.deadline(timeout), is_write=False, endpoint=endpoint, learns_leader=False,
        )
        return GroupHash.from_proto(resp)


MAX_GROUP_ID = (1 << 63) - 1


def _alarms(resp: admin_pb2.AlarmResponse) -> list[Alarm]:
    return [Alarm(a.node_id, admin_pb2.AlarmType.Name(a.type).removeprefix("ALARM_")) for a in resp.alarms]
