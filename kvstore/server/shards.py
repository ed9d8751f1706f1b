"""The node's side of sharding: its view of the shard map, calls to any group's leader, and the
Shard gRPC service (map, group proposals, range export, `kvctl shards` operations).

- `AsyncShardTracker` is `kvstore.node.tracker.ShardTracker` (the map as of the metadata
  group's applied state here) with a way to wait for a map version.
- `GroupCaller` runs a command on a group's leader wherever it is: locally through the host, or
  over `Shard.GroupPropose` on the node that leads it, following NOT_LEADER hints.

What a request may ask, and which nodes to try, is decided by the pure
`kvstore.node.grouprequests` (`check_group_request` is re-exported here for existing callers);
this module only awaits, calls and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvstore import errors
from kvstore.node import retention
from kvstore.node.closes import NodeCloses
from kvstore.node.grouprequests import (
    check_export_request,
    check_group_request,
    check_wait_timeout,
    describe_moves,
    is_close,
    leader_candidates,
    refused_for_good,
)
from kvstore.node.host import Host
from kvstore.node.inbound import RefusalLog
from kvstore.node.store import NodeStore
from kvstore.node.tracker import ShardTracker
from kvstore.raft import ConfChange, Role
from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import META_GROUP, ShardMap, ShardMapError
from kvstore.storage import commands
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import StorageError
from kvstore.transport.peer import DIAL_OPTIONS
from kvstore.v1 import shard_pb2, shard_pb2_grpc

from . import waiters
from .movedriver import MoveDriver

log = logging.getLogger("kvstore.shards")

__all__ = [
    "AsyncShardTracker",
    "GroupCaller",
    "NodeCluster",
    "ShardService",
    "check_group_request",
    "local_export",
    "local_group_call",
    "transfer_leader",
]


class AsyncShardTracker(ShardTracker):
    """`ShardTracker` with what asyncio callers need: wait until the map reaches a version."""

    def __init__(self, store: NodeStore) -> None:
        super().__init__(store)
        self.changed = asyncio.Event()
        self.on_change.append(self._changed)

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_version(self, version: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.version < version:
            left = end - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return False
        return True


class GroupCaller:
    """Propose to / read from / export from any group's leader, local or remote."""

    def __init__(
        self,
        node_id: int,
        host: Host,
        wake: Callable[[], None],
        tracker: ShardTracker,
        request_timeout: float,
        cluster_id: str = "kvstore",
        credentials: Callable[[], grpc.ChannelCredentials] | None = None,
    ) -> None:
        self.credentials = credentials
        """TLS: the current channel credentials (None: plaintext); see `reset_channels`."""
        self.node_id = node_id
        self.host = host
        self.wake = wake
        self.tracker = tracker
        self.request_timeout = request_timeout
        self.cluster_id = cluster_id
        """Stamped with `node_id` on every request to another node (internal RPCs)."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._rng = random.Random()
        self.closes: NodeCloses | None = None
        """This node's closes (the node sets it): a CLOSE for a group led here goes through it,
        coalesced with the group's other closes (None: proposed as any command)."""

    def channel(self, addr: str) -> grpc.aio.Channel:
        """The channel to the node at `addr` (one per address, TLS with the node's credentials
        when it has them)."""
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = (
                grpc.aio.insecure_channel(addr, options=DIAL_OPTIONS) if self.credentials is None
                else grpc.aio.secure_channel(addr, self.credentials(), options=DIAL_OPTIONS)
            )
        return ch

    def stub(self, addr: str) -> shard_pb2_grpc.ShardStub:
        return shard_pb2_grpc.ShardStub(self.channel(addr))

    def reset_channels(self) -> None:
        """Certificates were reloaded: later calls dial new channels; the old ones are closed
        once the calls on them had time to finish."""
        chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            asyncio.get_running_loop().create_task(ch.close(grace=2 * self.request_timeout + 1))

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            await ch.close()

    def address(self, node: int) -> str:
        addr = self.host.members.get(node, "")
        if not addr and self.tracker.map is not None:
            addr = self.tracker.map.nodes.get(node, "")
        return addr

    def replica_addresses(self, group: int) -> list[str]:
        """The addresses of the other nodes to read `group` at, best guess first (its leader,
        then its members: `leader_candidates`), each once; nodes with no known address left out."""
        return [a for n in self._candidates(group) if n != self.node_id and (a := self.address(n))]

    def _pick(self, group: int, tried: int) -> int:
        """The node to try for `group` on attempt number `tried`: round robin over the
        candidates, best guess first (this node if it knows none)."""
        cands = self._candidates(group)
        return cands[tried % len(cands)] if cands else self.node_id

    def _candidates(self, group: int) -> list[int]:
        """Nodes to try for `group`'s leader, best guess first."""
        return leader_candidates(self.host, self.tracker.map, group)

    async def call(
        self,
        group: int,
        request: shard_pb2.GroupProposeRequest,
        *,
        timeout: float | None = None,
        retry_indeterminate: bool = True,
    ) -> shard_pb2.GroupProposeResponse:
        """Run `request` at `group`'s leader until it succeeds or fails for good. Shard commands
        and map CAS are idempotent or self-checking, so by default an indeterminate outcome is
        retried too."""
        request.cluster_id, request.from_node = self.cluster_id, self.node_id
        loop = asyncio.get_running_loop()
        end = loop.time() + (timeout if timeout is not None else self.request_timeout * 4)
        delay = 0.02
        last: errors.KVError | None = None
        hint: int = 0
        tried = 0
        while loop.time() < end:
            target = hint or self._pick(group, tried)
            hint = 0
            tried += 1
            attempt = min(self.request_timeout, max(0.05, end - loop.time()))
            try:
                if target == self.node_id:
                    resp = await local_group_call(
                        self.host, self.wake, request, attempt, self.tracker.map, self.closes
                    )
                else:
                    addr = self.address(target)
                    if not addr:
                        raise errors.NoLeader(f"no address for node {target}")
                    resp = await self.stub(addr).GroupPropose(request, timeout=attempt + 0.5)
            except grpc.aio.AioRpcError as e:
                last = errors.Unavailable(f"node {target}: {e.code().name}")
            else:
                err = errors.from_proto(resp.error, is_write=True)
                if err is None:
                    return resp
                last = err
                if isinstance(err, errors.NotLeader) and err.leader_id and err.leader_id != target:
                    hint = err.leader_id
                    continue
                if isinstance(err, errors.InvalidArgument) or refused_for_good(err, self.tracker.version):
                    raise err
                if err.indeterminate and not retry_indeterminate:
                    raise err
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, 0.5)
        raise errors.Timeout(
            f"group {group}: no leader completed the request in time (last error: {last})", indeterminate=True
        )

    async def propose(self, group: int, data: bytes, *, timeout: float | None = None) -> ApplyResult:
        resp = await self.call(group, shard_pb2.GroupProposeRequest(group=group, command=data), timeout=timeout)
        return commands.decode_result(resp.result) if resp.result else ApplyResult()

    async def retention_point(self, group: int, keep: int, *, timeout: float | None = None) -> int:
        """The group's retention point keeping its newest `keep` write revisions, computed by its
        leader from its change log (`kvstore.node.retention`); an answer that is not a revision
        of the group is refused (definite InvalidArgument)."""
        resp = await self.call(group, shard_pb2.GroupProposeRequest(group=group, retention_keep=keep), timeout=timeout)
        return retention.check_point(group, resp.revision)

    async def transfer(self, group: int, to: int, *, timeout: float | None = None) -> None:
        await self.call(
            group, shard_pb2.GroupProposeRequest(group=group, transfer=True, transfer_to=to),
            timeout=timeout, retry_indeterminate=False,
        )

    async def conf_change(self, group: int, cc: ConfChange, *, timeout: float | None = None) -> None:
        await self.call(
            group, shard_pb2.GroupProposeRequest(group=group, conf_change=cc.encode()),
            timeout=timeout, retry_indeterminate=False,
        )

    async def export(self, group: int, ranges: IntervalSet, *, timeout: float | None = None) -> AsyncIterator[bytes]:
        """The install records of `ranges` (frozen in `group`), read at the group's leader after a
        read barrier. Retries from the start on failure before the first chunk only."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (timeout if timeout is not None else self.request_timeout * 4)
        req = shard_pb2.ExportRangeRequest(
            group=group, lo=[a for a, _ in ranges], hi=[b for _, b in ranges], chunk_bytes=512 << 10,
            cluster_id=self.cluster_id, from_node=self.node_id,
        )
        tried = 0
        hint = 0
        last: Exception | None = None
        while loop.time() < end:
            target = hint or self._pick(group, tried)
            hint = 0
            tried += 1
            addr = self.address(target) if target != self.node_id else ""
            if target != self.node_id and not addr:
                await asyncio.sleep(0.05)
                continue
            stream: Any = (
                local_export(self.host, self.wake, req, self.request_timeout)
                if target == self.node_id
                else self.stub(addr).ExportRange(req)
            )
            started = False
            try:
                async for chunk in stream:
                    err = errors.from_proto(chunk.error, is_write=False) if chunk.HasField("error") else None
                    if err is not None:
                        if isinstance(err, errors.NotLeader) and err.leader_id:
                            hint = err.leader_id
                        raise err
                    started = True
                    yield chunk.records
                return
            except (grpc.aio.AioRpcError, errors.KVError) as e:
                if started:
                    raise errors.Unavailable(f"export from group {group} broke: {e}") from None
                last = e
            await asyncio.sleep(0.05)
        raise errors.Timeout(f"export from group {group} did not complete (last error: {last})")


async def local_group_call(
    host: Host, wake: Callable[[], None], request: shard_pb2.GroupProposeRequest, timeout: float,
    smap: ShardMap | None, closes: NodeCloses | None = None,
) -> shard_pb2.GroupProposeResponse:
    """Run a GroupPropose request on this node (which must lead the group); errors in the reply.
    A CLOSE goes through `closes` (checked against this leader's clock, coalesced; refused
    without it)."""
    try:
        if request.group not in host.groups:
            raise errors.WrongShard(f"group {request.group} is not on this node")
        cc = check_group_request(request, smap)
        if cc is not None:
            await waiters.propose_conf_change(host, wake, request.group, cc, timeout)
            return shard_pb2.GroupProposeResponse()
        if request.retention_keep:
            walk = retention.begin_walk(host, request.group, request.retention_keep)
            while not retention.walk_step(host, request.group, walk):
                await asyncio.sleep(0)  # a long change log: let the node's loop run between steps
            return shard_pb2.GroupProposeResponse(revision=walk.point)
        if request.read_barrier:
            index = await waiters.read_point(host, wake, request.group, timeout)
            return shard_pb2.GroupProposeResponse(index=index)
        if request.transfer:
            await transfer_leader(host, wake, request.group, request.transfer_to, timeout)
            return shard_pb2.GroupProposeResponse()
        if is_close(request.command):
            if closes is None:
                raise errors.Unavailable("this node does not close groups (no clock to check a close against)")
            at = commands.decode_command(request.command).revision
            last = await waiters.close(closes, wake, request.group, at, timeout)
            return shard_pb2.GroupProposeResponse(result=commands.encode_result(ApplyResult(revision=last)))
        res = await waiters.propose(host, wake, request.group, request.command, timeout)
        return shard_pb2.GroupProposeResponse(result=commands.encode_result(res) if res is not None else b"")
    except errors.KVError as err:
        return shard_pb2.GroupProposeResponse(error=errors.to_proto(err))


async def local_export(
    host: Host, wake: Callable[[], None], request: shard_pb2.ExportRangeRequest, timeout: float
) -> AsyncIterator[shard_pb2.ExportRangeChunk]:
    try:
        if request.group not in host.groups:
            raise errors.WrongShard(f"group {request.group} is not on this node")
        ranges, chunk_bytes = check_export_request(request.lo, request.hi, request.chunk_bytes)
        await waiters.read_point(host, wake, request.group, timeout)
        stream = host.store.export_range(request.group, ranges, chunk_bytes)
    except (errors.KVError, StorageError) as err:
        kv_err = err if isinstance(err, errors.KVError) else errors.InvalidArgument(str(err))
        yield shard_pb2.ExportRangeChunk(error=errors.to_proto(kv_err))
        return
    try:
        for records, keys in stream:
            yield shard_pb2.ExportRangeChunk(records=records, keys=keys)
            await asyncio.sleep(0)
    finally:
        stream.close()


async def transfer_leader(host: Host, wake: Callable[[], None], group: int, to: int, timeout: float) -> None:
    """Hand `group`'s leadership (held here) to `to` (0: the most up-to-date other voter) and
    wait until this node sees the target leading, as etcd's MoveLeader waits: stepping down
    alone is not enough (the target is then only a candidate, and may lose). Raises
    ProposalDropped (definite) if the core gave the transfer up or another node won, Timeout
    (indeterminate) if neither happened in time."""
    core = host.groups[group].core
    if to == host.node_id and core.role == Role.LEADER:
        return
    host.transfer_leader(group, to)
    wake()
    target = core.lead_transferee
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if core.role == Role.LEADER:
            if core.lead_transferee == 0:
                # The core gave up (the target did not catch up within an election timeout).
                raise errors.ProposalDropped(f"leadership transfer to node {target} did not complete; retry")
        elif core.lead == target:
            return
        elif core.lead != 0:
            raise errors.ProposalDropped(f"leadership went to node {core.lead}, not node {target}; retry")
        await asyncio.sleep(0.01)
    if core.role == Role.LEADER:
        raise errors.Timeout("leadership transfer did not complete in time", indeterminate=True)
    raise errors.Timeout(f"this node stepped down but did not see node {target} lead in time", indeterminate=True)


class NodeCluster:
    """`movedriver.Cluster` for this node: the move coordinator's requests go through `GroupCaller`."""

    def __init__(self, host: Host, tracker: AsyncShardTracker, caller: GroupCaller) -> None:
        self.host = host
        self.tracker = tracker
        self.caller = caller

    def is_meta_leader(self) -> bool:
        return self.host.leads_current(META_GROUP)

    def current_map(self) -> tuple[ShardMap | None, bytes]:
        return self.tracker.map, self.tracker.raw

    def node_addresses(self) -> dict[int, str]:
        g = self.host.groups.get(META_GROUP)
        if g is None:
            return {}
        return {n: self.host.members[n] for n in g.core.conf.members() if n in self.host.members}

    async def propose(self, group: int, data: bytes) -> ApplyResult:
        return await self.caller.propose(group, data)

    def export(self, group: int, ranges: IntervalSet) -> AsyncIterator[bytes]:
        return self.caller.export(group, ranges)

    async def wait_map(self, version: int, timeout: float) -> bool:
        return await self.tracker.wait_version(version, timeout)


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(
        self,
        node_id: int,
        host: Host,
        wake: Callable[[], None],
        tracker: AsyncShardTracker,
        caller: GroupCaller,
        coordinator: MoveDriver,
        request_timeout: float,
        cluster_id: str = "kvstore",
        is_member: Callable[[int], bool] = lambda node: True,
        refusals: RefusalLog | None = None,
        verify: Callable[[grpc.aio.ServicerContext, int], str | None] | None = None,
    ) -> None:
        self.verify = verify
        """TLS: why the caller may not speak for a node id (None: it may); None: no TLS check."""
        self.cluster_id = cluster_id
        self.is_member = is_member
        self.refusals = refusals
        self.node_id = node_id
        self.host = host
        self.wake = wake
        self.tracker = tracker
        self.caller = caller
        self.coordinator = coordinator
        self.request_timeout = request_timeout

    async def GetShardMap(
        self, request: shard_pb2.GetShardMapRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.GetShardMapResponse:
        if self.tracker.map is None:
            err = errors.NoLeader("this node has no shard map yet")
            return shard_pb2.GetShardMapResponse(error=errors.to_proto(err))
        return shard_pb2.GetShardMapResponse(map=self.tracker.raw, version=self.tracker.version)

    async def _internal(self, cluster_id: str, frm: int, what: str, context: grpc.aio.ServicerContext) -> None:
        """Internal RPCs answer only members of this cluster (by the caller's cluster id and node
        id, and with TLS by its certificate, which must be the node certificate of `frm`)."""
        if self.verify is not None and (why := self.verify(context, frm)) is not None:
            if self.refusals is not None:
                self.refusals.refuse(frm, "identity", f"{what}: {why}")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{what}: not node {frm}: {why}")
        if cluster_id != self.cluster_id or not self.is_member(frm):
            if self.refusals is not None:  # counted, logged once per sender per minute
                self.refusals.refuse(frm, "not_member", f"{what} (cluster {cluster_id[:64]!r}): not a member")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{what} is internal: only members of cluster {self.cluster_id!r} may call it",
            )

    async def GroupPropose(
        self, request: shard_pb2.GroupProposeRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.GroupProposeResponse:
        await self._internal(request.cluster_id, request.from_node, "Shard.GroupPropose", context)
        return await local_group_call(
            self.host, self.wake, request, self.request_timeout, self.tracker.map, self.caller.closes
        )

    async def ExportRange(
        self, request: shard_pb2.ExportRangeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ExportRangeChunk]:
        await self._internal(request.cluster_id, request.from_node, "Shard.ExportRange", context)
        async for chunk in local_export(self.host, self.wake, request, self.request_timeout):
            yield chunk

    def _local_info(self, gid: int) -> shard_pb2.GroupInfo:
        g = self.host.groups[gid]
        m = self.tracker.map
        st = self.host.store.shard_state(gid)
        return shard_pb2.GroupInfo(
            id=gid, voters=sorted(g.core.conf.voters), learners=sorted(g.core.conf.learners),
            leader_id=g.core.lead, keys=self.host.store.count_keys(gid),
            ranges=len(st.active) if st is not None else 0,
            share=m.share(gid) if m is not None else 0.0, applied=g.core.applied,
        )

    async def _remote_info(self, gid: int, nodes: list[int]) -> shard_pb2.GroupInfo:
        for n in nodes:
            addr = self.caller.address(n)
            if not addr or n == self.node_id:
                continue
            try:
                resp = await self.caller.stub(addr).ShardOp(
                    shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.INFO, group=gid), timeout=2.0
                )
            except grpc.aio.AioRpcError:
                continue
            if resp.groups:
                return resp.groups[0]
        m = self.tracker.map
        return shard_pb2.GroupInfo(id=gid, share=m.share(gid) if m is not None else 0.0)

    async def ShardOp(self, request: shard_pb2.ShardOpRequest, context: grpc.aio.ServicerContext) -> shard_pb2.ShardOpResponse:
        Op = shard_pb2.ShardOpRequest
        try:
            m = self.tracker.map
            if m is None:
                raise errors.NoLeader("this node has no shard map yet")
            if request.op == Op.INFO:
                if request.group:
                    if request.group not in self.host.groups:
                        raise errors.WrongShard(f"group {request.group} is not on this node")
                    return shard_pb2.ShardOpResponse(version=m.version, groups=[self._local_info(request.group)])
                infos = []
                for gid in m.data_groups():
                    if gid in self.host.groups:
                        infos.append(self._local_info(gid))
                    else:
                        infos.append(await self._remote_info(gid, list(m.groups[gid].members())))
                return shard_pb2.ShardOpResponse(
                    version=m.version, groups=infos, moves_pending=len(m.moves),
                    message=describe_moves(m),
                )
            check_wait_timeout(request.wait, request.timeout)
            meta = self.host.groups.get(META_GROUP)
            nodes = sorted(meta.core.conf.voters) if meta is not None else sorted(m.nodes)
            if request.op == Op.ADD_GROUP:
                new = await self.coordinator.update(lambda cur: cur.plan_add_group(nodes))
                what = f"added group {new.next_group - 1} on nodes {list(new.groups[new.next_group - 1].voters)}"
            elif request.op == Op.REMOVE_GROUP:
                new = await self.coordinator.update(lambda cur: cur.plan_remove_group(request.group))
                what = f"removing group {request.group}"
            elif request.op == Op.REBALANCE:
                new = await self.coordinator.update(lambda cur: cur.plan_rebalance())
                what = "rebalancing"
            else:
                raise errors.InvalidArgument(f"unknown shard operation {request.op}")
            self.coordinator.wakeup.set()
            msg = f"{what}: {len(new.moves)} range moves planned (map version {new.version})"
            if request.wait:
                done = await self._wait_settled(request.timeout or 300.0)
                cur = self.tracker.map
                if not done:
                    raise errors.Timeout(f"{msg}; moves still pending after {request.timeout or 300.0:g}s", indeterminate=True)
                msg += f"; all moves done (map version {cur.version if cur else 0})"
            return shard_pb2.ShardOpResponse(message=msg, version=self.tracker.version,
                                             moves_pending=len(self.tracker.map.moves) if self.tracker.map else 0)
        except ShardMapError as err:
            return shard_pb2.ShardOpResponse(error=errors.to_proto(errors.InvalidArgument(str(err))))
        except errors.KVError as err:
            return shard_pb2.ShardOpResponse(error=errors.to_proto(err))

    async def _wait_settled(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            m = self.tracker.map
            owners = set(m.ring.owners) if m is not None else set()
            if m is not None and not m.moves and all(g in owners or m.routes.get(g) for g in m.groups):
                return True
            ev = self.tracker.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), min(1.0, max(0.01, end - loop.time())))
        return False
