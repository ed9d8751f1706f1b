"""etcd's `Cluster` service over kvstore's membership (`server/admin_service.py`): a change
applies to the metadata group and to every data group, as `kvctl member add/remove/promote` does,
each at its group's leader. Members are kvstore's (`ops.member_of`); MemberAdd picks the new id
as etcd's server does, at random (`ops.new_member_id`, `ops.NEW_MEMBER_IDS`: never a member's,
and above hand-numbered ids, so not a just-removed node's; the node is then started with
`kvstore serve --id ID --join ...`).
MemberUpdate changes nothing kvstore can change: the same peer URL is a success, another is
refused (FAILED_PRECONDITION, definite). Headers carry the metadata group's raft term."""

from __future__ import annotations

import secrets
from typing import Any

import grpc

from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.shard.shardmap import META_GROUP
from kvstore.v1 import admin_pb2

from .base import EtcdNode, fail
from .convert import EtcdRequestError
from .ops import (
    MEMBER_NOT_FOUND,
    NOT_LEARNER,
    PEER_URL_EXISTS,
    member_of,
    new_member_id,
    one_peer_address,
)
from .status import EtcdStatus, checked


def secrets_draw(low: int, high: int) -> int:
    """A random integer in [low, high) (the system's CSPRNG: ids are not guessable)."""
    return low + secrets.randbelow(high - low)


class EtcdCluster(rpc_pb2_grpc.ClusterServicer):
    def __init__(self, node: EtcdNode, admin: Any) -> None:
        self.n = node
        self.admin = admin

    async def _members(self, context: grpc.aio.ServicerContext) -> list[admin_pb2.Member]:
        st = await self.admin.Status(admin_pb2.StatusRequest(), context)
        return list(st.members)

    async def _known(self, member: int, context: grpc.aio.ServicerContext) -> admin_pb2.Member:
        for m in await self._members(context):
            if m.id == member:
                return m
        raise EtcdStatus(grpc.StatusCode.NOT_FOUND, MEMBER_NOT_FOUND)

    def _header(self) -> rpc_pb2.ResponseHeader:
        return self.n.header(0, META_GROUP)

    async def MemberList(self, request: rpc_pb2.MemberListRequest, context: grpc.aio.ServicerContext
                         ) -> rpc_pb2.MemberListResponse:
        try:
            return rpc_pb2.MemberListResponse(header=self._header(),
                                              members=[member_of(m) for m in await self._members(context)])
        except Exception as err:
            await fail(err, context, "MemberList")

    async def MemberAdd(self, request: rpc_pb2.MemberAddRequest, context: grpc.aio.ServicerContext
                        ) -> rpc_pb2.MemberAddResponse:
        try:
            address = one_peer_address(request.peerURLs)
            members = await self._members(context)
            if any(m.address == address for m in members):
                raise EtcdRequestError("FAILED_PRECONDITION", PEER_URL_EXISTS)
            new = new_member_id((m.id for m in members), secrets_draw)
            resp = checked(await self.admin.AddMember(
                admin_pb2.AddMemberRequest(id=new, address=address, learner=request.isLearner), context), is_write=True)
            added = next((m for m in resp.members if m.id == new),
                         admin_pb2.Member(id=new, address=address, learner=request.isLearner))
            return rpc_pb2.MemberAddResponse(header=self._header(), member=member_of(added),
                                             members=[member_of(m) for m in resp.members])
        except Exception as err:
            await fail(err, context, "MemberAdd")

    async def MemberRemove(self, request: rpc_pb2.MemberRemoveRequest, context: grpc.aio.ServicerContext
                           ) -> rpc_pb2.MemberRemoveResponse:
        try:
            await self._known(request.ID, context)
            resp = checked(await self.admin.RemoveMember(admin_pb2.RemoveMemberRequest(id=request.ID), context), is_write=True)
            return rpc_pb2.MemberRemoveResponse(header=self._header(), members=[member_of(m) for m in resp.members])
        except Exception as err:
            await fail(err, context, "MemberRemove")

    async def MemberPromote(self, request: rpc_pb2.MemberPromoteRequest, context: grpc.aio.ServicerContext
                            ) -> rpc_pb2.MemberPromoteResponse:
        try:
            if not (await self._known(request.ID, context)).learner:
                raise EtcdRequestError("FAILED_PRECONDITION", NOT_LEARNER)
            resp = checked(await self.admin.PromoteMember(admin_pb2.PromoteMemberRequest(id=request.ID), context),
                           is_write=True)
            return rpc_pb2.MemberPromoteResponse(header=self._header(), members=[member_of(m) for m in resp.members])
        except Exception as err:
            await fail(err, context, "MemberPromote")

    async def MemberUpdate(self, request: rpc_pb2.MemberUpdateRequest, context: grpc.aio.ServicerContext
                           ) -> rpc_pb2.MemberUpdateResponse:
        try:
            address = one_peer_address(request.peerURLs)
            m = await self._known(request.ID, context)
            if m.address != address:
                raise EtcdRequestError(
                    "FAILED_PRECONDITION",
                    f"kvstore: a member's peer address cannot change (member {m.id:x} is at {m.address}): "
                    "remove it and add a new member instead")
            return rpc_pb2.MemberUpdateResponse(header=self._header(),
                                                members=[member_of(x) for x in await self._members(context)])
        except Exception as err:
            await fail(err, context, "MemberUpdate")
