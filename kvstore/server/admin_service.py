"""Cluster administration (kvstore.v1.Admin): status, membership, leadership transfer, snapshots."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from kvstore import errors
from kvstore.raft import ConfChange, ConfChangeType, Role
from kvstore.v1 import admin_pb2, admin_pb2_grpc

from .config import DATA_GROUP, NodeConfig
from .host import Host
from .reads import ReplicaReads


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, cfg: NodeConfig, host: Host, wake: Any, reads: ReplicaReads | None = None) -> None:
        self.cfg = cfg
        self.host = host
        self.wake = wake
        self.reads = reads

    def _members(self) -> list[admin_pb2.Member]:
        g = self.host.groups.get(DATA_GROUP)
        learners = set(g.core.conf.learners) if g is not None else set()
        ids = set(self.host.members)
        if g is not None:
            ids |= set(g.core.conf.members())
        return [
            admin_pb2.Member(id=i, address=self.host.members.get(i, ""), learner=i in learners) for i in sorted(ids)
        ]

    async def Status(self, request: admin_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> admin_pb2.StatusResponse:
        groups = []
        for st in self.host.status():
            gs = admin_pb2.GroupStatus(
                group=st["group"], role=st["role"], term=st["term"], leader_id=st["leader"], commit=st["commit"],
                applied=st["applied"], last_index=st["last_index"], first_index=st["first_index"],
                voters=st["voters"], learners=st["learners"],
            )
            self._replica_status(gs)
            for nid, pr in st["progress"].items():
                gs.progress.append(
                    admin_pb2.GroupStatus.Progress(id=nid, match=pr["match"], next=pr["next"], state=pr["state"])
                )
            groups.append(gs)
        return admin_pb2.StatusResponse(
            node_id=self.cfg.id, cluster_id=self.cfg.cluster_id, address=self.cfg.address,
            members=self._members(), groups=groups, storage_full=self.host.failed is not None,
        )

    def _replica_status(self, gs: admin_pb2.GroupStatus) -> None:
        """Read-replica fields: staleness bound and time since leader contact."""
        contact = None
        if self.reads is not None:
            s = self.reads.staleness(gs.group)
            gs.staleness_ms = -1 if s is None else int(s * 1000 + 0.999)
            contact = self.reads.leader_contact_seconds(gs.group)
        else:
            gs.staleness_ms = -1
        gs.leader_contact_ms = -1 if contact is None else int(contact * 1000)

    async def _conf_change(self, cc: ConfChange) -> admin_pb2.AdminResponse:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def done(_res: Any, err: errors.KVError | None) -> None:
            if not fut.done():
                if err is not None:
                    fut.set_exception(err)
                else:
                    fut.set_result(None)

        try:
            self.host.propose_conf_change(DATA_GROUP, cc, done)
            self.wake()
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.cfg.request_timeout)
            except TimeoutError:
                raise errors.Timeout("membership change not applied in time", indeterminate=True) from None
        except errors.KVError as err:
            return admin_pb2.AdminResponse(error=errors.to_proto(err), members=self._members())
        return admin_pb2.AdminResponse(message=f"{cc.type.name.lower()} {cc.node_id}: done", members=self._members())

    async def AddMember(self, request: admin_pb2.AddMemberRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        if request.id < 1 or ":" not in request.address:
            err = errors.InvalidArgument("member needs an id >= 1 and an address HOST:PORT")
            return admin_pb2.AdminResponse(error=errors.to_proto(err))
        kind = ConfChangeType.ADD_LEARNER if request.learner else ConfChangeType.ADD_VOTER
        return await self._conf_change(ConfChange(kind, request.id, request.address.encode()))

    async def PromoteMember(self, request: admin_pb2.PromoteMemberRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        g = self.host.groups[DATA_GROUP]
        if request.id not in g.core.conf.learners:
            err = errors.InvalidArgument(f"node {request.id} is not a learner")
            return admin_pb2.AdminResponse(error=errors.to_proto(err), members=self._members())
        return await self._conf_change(ConfChange(ConfChangeType.ADD_VOTER, request.id))

    async def RemoveMember(self, request: admin_pb2.RemoveMemberRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        g = self.host.groups[DATA_GROUP]
        if request.id not in g.core.conf.members():
            err = errors.InvalidArgument(f"node {request.id} is not a member")
            return admin_pb2.AdminResponse(error=errors.to_proto(err), members=self._members())
        return await self._conf_change(ConfChange(ConfChangeType.REMOVE_NODE, request.id))

    async def TransferLeader(self, request: admin_pb2.TransferLeaderRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        try:
            core = self.host.groups[DATA_GROUP].core
            if request.to == self.cfg.id and core.role == Role.LEADER:
                return admin_pb2.AdminResponse(message=f"node {self.cfg.id} is already the leader")
            self.host.transfer_leader(DATA_GROUP, request.to)
            self.wake()
            target = core.lead_transferee
            deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout
            while core.role == Role.LEADER and asyncio.get_running_loop().time() < deadline:
                if core.lead_transferee == 0:
                    # The core gave up (the target did not catch up within an election timeout).
                    raise errors.ProposalDropped(f"leadership transfer to node {target} did not complete; retry")
                await asyncio.sleep(0.01)
            if core.role == Role.LEADER:
                raise errors.Timeout("leadership transfer did not complete in time", indeterminate=True)
        except errors.KVError as err:
            return admin_pb2.AdminResponse(error=errors.to_proto(err))
        lead, addr = self.host.leader_of(DATA_GROUP)
        return admin_pb2.AdminResponse(message=f"leader is now node {lead} ({addr})")

    async def Snapshot(self, request: admin_pb2.SnapshotRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        g = self.host.groups[DATA_GROUP]
        applied = g.core.applied
        self.host.store.compact(DATA_GROUP, applied)
        return admin_pb2.AdminResponse(message=f"log compacted through index {applied}")
