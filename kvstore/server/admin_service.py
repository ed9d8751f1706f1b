"""Cluster administration (kvstore.v1.Admin): status, membership, leadership transfer, snapshots.

Membership is cluster-wide: a change applies to the metadata group and then to every data group
(or to the data groups a request lists), each at its own leader wherever that is, one group
after the other; the shard map's record of each group's replicas follows. A failure part-way
reports which groups were changed, and the same request can simply be repeated: groups that
already have the change are skipped (only recorded in the map if an earlier attempt failed
between the change and its record).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from kvstore import errors
from kvstore.node.alarms import Alarm, AlarmType
from kvstore.node.host import Host
from kvstore.node.kvhash import KVHasher
from kvstore.node.version import VersionTracker
from kvstore.raft import ConfChange, ConfChangeType
from kvstore.raft.types import MAX_CONF_CONTEXT, MAX_U63
from kvstore.shard.shardmap import META_GROUP, ShardMap
from kvstore.storage import mvcc
from kvstore.v1 import admin_pb2, admin_pb2_grpc

from .admission import Admission
from .config import NodeConfig
from .movedriver import MoveDriver
from .reads import ReplicaReads
from .shards import GroupCaller, ShardTracker
from .waiters import read_point


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        cfg: NodeConfig,
        host: Host,
        wake: Any,
        tracker: ShardTracker,
        caller: GroupCaller,
        coordinator: MoveDriver,
        reads: ReplicaReads | None = None,
        admission: Admission | None = None,
        versions: VersionTracker | None = None,
    ) -> None:
        self.admission = admission
        self.versions = versions
        self.coordinator = coordinator
        self.cfg = cfg
        self.host = host
        self.wake = wake
        self.tracker = tracker
        self.caller = caller
        self.reads = reads

    def _members(self) -> list[admin_pb2.Member]:
        g = self.host.groups.get(META_GROUP)
        learners = set(g.core.conf.learners) if g is not None else set()
        ids = set(self.host.members)
        if g is not None:
            ids |= set(g.core.conf.members())
        clients = self.tracker.map.clients if self.tracker.map is not None else {}
        return [
            admin_pb2.Member(id=i, address=self.host.members.get(i, ""), learner=i in learners,
                             client_address=clients.get(i, ""))
            for i in sorted(ids)
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
            sm = self.host.store.session_meta(st["group"])
            gs.sessions, gs.sessions_evicted = sm.count, sm.evicted
            for nid, pr in st["progress"].items():
                gs.progress.append(
                    admin_pb2.GroupStatus.Progress(id=nid, match=pr["match"], next=pr["next"], state=pr["state"])
                )
            groups.append(gs)
        reply = admin_pb2.StatusResponse(
            node_id=self.cfg.id, cluster_id=self.cfg.cluster_id, address=self.cfg.address,
            client_address=self.cfg.client_address, members=self._members(), groups=groups, storage_full=self.host.failed is not None,
        )
        if self.versions is not None:
            v = self.versions.value
            reply.cluster_version = v.cluster
            reply.supported_level = self.versions.supported
            for n, level in v.advertised.items():
                reply.member_levels[n] = level
        return reply

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


    # --- membership -----------------------------------------------------------------------------
    def _targets(self, listed: Any, *, meta: bool = False) -> list[int]:
        """The groups a request names (`listed`; none: the metadata group and every data group).
        A listed group must be a data group, or the metadata group (0) where `meta` allows it
        (a leadership transfer: etcd's MoveLeader moves it through here, audited)."""
        m = self.tracker.map
        if m is None:
            # E.g. a node still joining: it cannot know the data groups. Definite; the client
            # retries at another node.
            raise errors.NoLeader(f"node {self.cfg.id} has no shard map yet; ask another member")
        if listed:
            if m is not None:
                unknown = [g for g in listed if g not in m.groups and not (meta and g == META_GROUP)]
                if unknown:
                    raise errors.InvalidArgument(f"no data group(s) {unknown}")
            return sorted(set(listed))
        return [META_GROUP, *(m.data_groups() if m is not None else [])]

    def _conf_of(self, group: int) -> tuple[set[int], set[int]] | None:
        """(voters, learners) of `group` as this node knows them (None if not known here)."""
        g = self.host.groups.get(group)
        if g is not None and g.core.conf.voters:
            return set(g.core.conf.voters), set(g.core.conf.learners)
        m = self.tracker.map
        if m is not None and group in m.groups:
            p = m.groups[group]
            return set(p.voters), set(p.learners)
        return None

    async def _change(self, cc: ConfChange, groups: list[int]) -> admin_pb2.AdminResponse:
        done: list[int] = []
        try:
            for gid in groups:
                propose, record = member_step(gid, cc, self._conf_of(gid), self.tracker.map)
                if propose:
                    await self.caller.conf_change(gid, cc, timeout=self.cfg.request_timeout * 2)
                    done.append(gid)
                if record:
                    await self._record(gid, cc)
        except errors.KVError as err:
            note = f" (applied to groups {done}; repeat the request to finish)" if done else ""
            wrapped = type(err)(err.message + note, indeterminate=err.indeterminate) if type(err) in (
                errors.Timeout, errors.ProposalDropped, errors.InvalidArgument, errors.NoLeader, errors.LeadershipLost,
            ) else err
            return admin_pb2.AdminResponse(error=errors.to_proto(wrapped), members=self._members())
        what = f"{cc.type.name.lower()} {cc.node_id}"
        return admin_pb2.AdminResponse(message=f"{what}: done in groups {groups}", members=self._members())

    async def _record(self, gid: int, cc: ConfChange) -> None:
        """Make the shard map's replica list of `gid` follow an applied change."""
        def change(m: ShardMap) -> ShardMap:
            return m.with_member_change(gid, cc)

        await self.coordinator.update(change)

    async def AddMember(self, request: admin_pb2.AddMemberRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        try:
            if not 0 < request.id < MAX_U63 or ":" not in request.address:
                raise errors.InvalidArgument("member needs an id in 1..2^63-1 and an address HOST:PORT")
            if len(request.address.encode()) > MAX_CONF_CONTEXT:
                raise errors.InvalidArgument(f"member address longer than {MAX_CONF_CONTEXT} bytes")
            groups = self._targets(request.groups)
        except errors.KVError as err:
            return admin_pb2.AdminResponse(error=errors.to_proto(err))
        kind = ConfChangeType.ADD_LEARNER if request.learner else ConfChangeType.ADD_VOTER
        return await self._change(ConfChange(kind, request.id, request.address.encode()), groups)

    async def PromoteMember(self, request: admin_pb2.PromoteMemberRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        try:
            _check_node_id(request.id, allow_zero=False)
            groups = self._targets(request.groups)
            meta = self._conf_of(META_GROUP)
            if not request.groups and meta is not None and request.id not in meta[1] | meta[0]:
                raise errors.InvalidArgument(f"node {request.id} is not a learner")
        except errors.KVError as err:
            return admin_pb2.AdminResponse(error=errors.to_proto(err), members=self._members())
        return await self._change(ConfChange(ConfChangeType.ADD_VOTER, request.id), groups)

    async def RemoveMember(self, request: admin_pb2.RemoveMemberRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        try:
            _check_node_id(request.id, allow_zero=False)
            groups = self._targets(request.groups)
            meta = self._conf_of(META_GROUP)
            if not request.groups and meta is not None and request.id not in meta[0] | meta[1]:
                raise errors.InvalidArgument(f"node {request.id} is not a member")
        except errors.KVError as err:
            return admin_pb2.AdminResponse(error=errors.to_proto(err), members=self._members())
        # Data groups first, the metadata group last: the node keeps receiving the map until
        # it is out of every data group.
        order = [g for g in groups if g != META_GROUP] + [g for g in groups if g == META_GROUP]
        return await self._change(ConfChange(ConfChangeType.REMOVE_NODE, request.id), order)

    # --- leadership and snapshots ---------------------------------------------------------------
    async def TransferLeader(self, request: admin_pb2.TransferLeaderRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        try:
            _check_node_id(request.to, allow_zero=True)
            groups = self._targets(request.groups, meta=True)
            results = await asyncio.gather(
                *(self.caller.transfer(g, request.to, timeout=self.cfg.request_timeout) for g in groups),
                return_exceptions=True,
            )
            failed = [(g, r) for g, r in zip(groups, results, strict=True) if isinstance(r, BaseException)]
            if failed:
                g, r = failed[0]
                if isinstance(r, errors.KVError):
                    raise type(r)(f"group {g}: {r.message}", indeterminate=r.indeterminate) if type(r) in (
                        errors.Timeout, errors.ProposalDropped, errors.InvalidArgument, errors.NoLeader,
                    ) else r
                raise errors.InternalError(f"group {g}: {r}", indeterminate=True)
        except errors.KVError as err:
            return admin_pb2.AdminResponse(error=errors.to_proto(err))
        leaders = {g: self.host.leader_of(g)[0] for g in groups if g in self.host.groups}
        desc = ", ".join(f"group {g}: node {n}" for g, n in leaders.items())
        return admin_pb2.AdminResponse(message=f"leadership transferred ({desc})" if desc else "leadership transferred")

    async def Snapshot(self, request: admin_pb2.SnapshotRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AdminResponse:
        out = []
        for gid, g in sorted(self.host.groups.items()):
            applied = g.core.applied
            if applied > self.host.store.log_storage(gid).first_index():
                self.host.store.compact(gid, applied)
            out.append(f"{gid}@{applied}")
        return admin_pb2.AdminResponse(message="log compacted through " + ", ".join(out))


    # --- alarms ---------------------------------------------------------------------------------
    async def AlarmList(self, request: admin_pb2.AlarmListRequest, context: grpc.aio.ServicerContext) -> admin_pb2.AlarmResponse:
        """The alarms as this node applied them from the metadata group."""
        if self.admission is None:
            return admin_pb2.AlarmResponse()
        self.admission.alarms.refresh()
        return admin_pb2.AlarmResponse(alarms=_alarms_proto(self.admission.alarms.alarms))

    async def AlarmDisarm(
        self, request: admin_pb2.AlarmDisarmRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AlarmResponse:
        """Clear the matching alarms cluster-wide (a compare-and-swap in the metadata group). A node
        still over its quota raises NOSPACE again at its next check."""
        try:
            _check_node_id(request.node_id, allow_zero=True)
            if request.type not in (admin_pb2.ALARM_NONE, *[int(t) for t in AlarmType]):
                raise errors.InvalidArgument(f"unknown alarm type {request.type}")
            if self.admission is None:
                raise errors.InternalError("this node has no admission control", indeterminate=False)
            kind = AlarmType(request.type) if request.type != admin_pb2.ALARM_NONE else None
            alarms = await self.admission.disarm(request.node_id, kind)
        except errors.KVError as err:
            return admin_pb2.AlarmResponse(error=errors.to_proto(err))
        return admin_pb2.AlarmResponse(alarms=_alarms_proto(alarms))

    async def HashKV(self, request: admin_pb2.HashKVRequest, context: grpc.aio.ServicerContext) -> admin_pb2.HashKVResponse:
        """The hash of a group's key space at a revision on this node (see the message in
        admin.proto and `kvstore/node/kvhash.py`). Computed a chunk at a time on one read view,
        yielding to the event loop between chunks, so a big group does not hold the node up."""
        try:
            return await self._hash_kv(request.group, request.revision, request.exact)
        except errors.KVError as err:
            return admin_pb2.HashKVResponse(error=errors.to_proto(err), node_id=self.cfg.id, group=request.group)

    async def _hash_kv(self, gid: int, revision: int, exact: bool = False) -> admin_pb2.HashKVResponse:
        if revision < 0 or revision > MAX_U63:
            raise errors.InvalidArgument(f"revision {revision} is out of range")
        if gid not in self.host.groups:
            raise errors.WrongShard(f"group {gid} is not on node {self.cfg.id}")
        store = self.host.store
        if revision == 0 and not exact:
            await read_point(self.host, self.wake, gid, self.cfg.request_timeout)  # NOT_LEADER elsewhere
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.cfg.request_timeout
            while store.revisions.rev_state(gid).last < revision:
                if loop.time() >= deadline:
                    raise errors.Timeout(
                        f"group {gid} has not applied revision {revision} on node {self.cfg.id} within "
                        f"{self.cfg.request_timeout:g}s", indeterminate=False)
                await asyncio.sleep(self.cfg.raft.tick_ms / 1000)
                if gid not in self.host.groups:
                    raise errors.WrongShard(f"group {gid} left node {self.cfg.id}")
        g = self.host.groups.get(gid)
        if g is None:  # left this node while the read point or the wait ran
            raise errors.WrongShard(f"group {gid} left node {self.cfg.id}")
        applied = g.core.applied
        try:
            rst, stream = store.revisions.scan_versions(gid, b"", None, 0, revision, HASH_CHUNK_ITEMS, HASH_CHUNK_BYTES)
        except mvcc.Compacted as err:
            raise errors.Compacted(compact_revision=err.compact_revision) from None
        if exact and revision == 0 and rst.last != 0:
            stream.close()  # "at revision 0" is the empty history; this replica has written since
            raise errors.Unavailable(
                f"group {gid} wrote on node {self.cfg.id} after its leader hashed it at revision 0: check again")
        hasher = KVHasher()
        try:
            for chunk in stream:
                hasher.add(chunk)
                await asyncio.sleep(0)  # one chunk at a time: the loop serves others in between
        finally:
            stream.close()
        return admin_pb2.HashKVResponse(
            node_id=self.cfg.id, group=gid, revision=revision or rst.last, hash=hasher.digest(), keys=hasher.keys,
            applied=applied, compact_revision=rst.compact,
        )


HASH_CHUNK_ITEMS = 1024
HASH_CHUNK_BYTES = 1 << 20
"""`HashKV` hashes at most about this many keys / bytes between two turns of the event loop."""


def _alarms_proto(alarms: frozenset[Alarm]) -> list[admin_pb2.Alarm]:
    return [admin_pb2.Alarm(node_id=a.node, type=int(a.type)) for a in sorted(alarms)]  # type: ignore[arg-type]


def member_step(
    gid: int, cc: ConfChange, conf: tuple[set[int], set[int]] | None, smap: ShardMap | None
) -> tuple[bool, bool]:
    """What a membership request still has to do in group `gid`, given the group's (voters,
    learners) as this node knows them (`conf`) and this node's map: (propose `cc`, record it in
    the map). A group that already has the change is not changed again, but a data group's change
    is still recorded unless the map already follows it: an earlier attempt may have failed
    between the change and its record, and a map that never follows would keep a new replica
    from ever opening the group on its leader's messages (`kvstore.node.inbound`).
    The metadata group is never recorded (the map lists data groups only)."""
    data = gid != META_GROUP
    if conf is not None and _already(cc, *conf):
        return False, data and not (smap is not None and smap.reflects(gid, cc))
    return True, data


def _already(cc: ConfChange, voters: set[int], learners: set[int]) -> bool:
    n = cc.node_id
    if cc.type == ConfChangeType.ADD_LEARNER:
        return n in voters or n in learners
    if cc.type == ConfChangeType.ADD_VOTER:
        return n in voters
    return n not in voters and n not in learners


def _check_node_id(node: int, allow_zero: bool = False) -> None:
    """Node ids are 1..2^63-1 (0: "none", where the request allows it); anything else is a
    definite InvalidArgument before any group is asked."""
    if not (allow_zero and node == 0) and not 0 < node < MAX_U63:
        raise errors.InvalidArgument(f"node id {node} is outside 1..2^63-1")
