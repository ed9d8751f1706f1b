"""What the client knows of the cluster, and how it learns it: the shard map (Shard.GetShardMap),
each group's leader, the members, their addresses and roles (Admin.Status).

Invariants: concurrent operations share one map fetch, one leader-discovery round and one
membership refresh (each a single background task); discovery asks every endpoint at most once
per `DISCOVERY_INTERVAL` when the leader is unknown; a failed answer never removes what is known
(the router's rotation remains).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import grpc.aio

from kvstore.client.channels import Channels
from kvstore.client.failures import RpcFailure, classify
from kvstore.client.readpref import ReplicaRouter
from kvstore.client.retry import Deadline, RetryPolicy
from kvstore.client.routing import Router
from kvstore.shard.shardmap import ShardMap, ShardMapError
from kvstore.v1 import admin_pb2, shard_pb2

__all__ = ["DISCOVERY_INTERVAL", "DISCOVERY_TIMEOUT", "ClusterView"]

#: Don't ask every endpoint for Admin.Status more often than this when the leader is unknown.
DISCOVERY_INTERVAL = 0.5
#: Upper bound of one discovery round.
DISCOVERY_TIMEOUT = 1.0


class ClusterView:
    """The router (leaders, endpoints, breakers, shard map) and the replica router (members and
    roles), kept fresh from the cluster's answers."""

    def __init__(self, router: Router, replicas: ReplicaRouter, channels: Channels, policy: RetryPolicy) -> None:
        self.router = router
        self.replicas = replicas
        self.channels = channels
        self.policy = policy
        self._map_fetch: asyncio.Task[None] | None = None
        self._discovery: asyncio.Task[None] | None = None
        self._members_refresh: asyncio.Task[None] | None = None

    def cancel_background(self) -> None:
        """Cancel a discovery round and a membership refresh in progress."""
        for task in (self._discovery, self._members_refresh):
            if task is not None and not task.done():
                task.cancel()

    def cancel_map_fetch(self) -> None:
        if self._map_fetch is not None and not self._map_fetch.done():
            self._map_fetch.cancel()

    # ----- the shard map -----

    async def fetch_map(self, deadline: Deadline) -> None:
        """Ask the endpoints (breakers permitting) for the shard map, one after the other, until
        one has a version we want; keep the newest seen."""
        router = self.router
        unimplemented = 0
        asked = 0
        for ep in list(router.endpoints):
            if not router.needs_map() or deadline.expired:
                return
            if not router.breaker(ep).would_allow():
                continue
            asked += 1
            try:
                resp = await self.channels.shard(ep).GetShardMap(
                    shard_pb2.GetShardMapRequest(), timeout=deadline.bound(self.policy.attempt_timeout)
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    unimplemented += 1
                    continue
                failure = classify(e, endpoint=ep, is_write=False)
                if failure.transport:
                    router.on_transport_failure(None, ep, failure.reason)
                continue
            router.on_reply(ep)
            if resp.error.code or not resp.map:
                continue
            try:
                router.set_shard_map(ShardMap.decode(resp.map))
            except ShardMapError:
                continue
        if asked and unimplemented == asked and router.shard_map is None:
            router.unsharded = True
        elif router.shard_map is not None:
            router.map_settled()  # nobody has a newer one yet: route with ours, WRONG_SHARD asks again

    async def ensure_map(self, deadline: Deadline) -> None:
        if not self.router.needs_map():
            return
        if self._map_fetch is None or self._map_fetch.done():
            self._map_fetch = asyncio.ensure_future(self.fetch_map(deadline))
        await asyncio.wait([self._map_fetch], timeout=deadline.remaining())

    async def shard_map(self, deadline: Deadline, *, refresh: bool = False) -> ShardMap | None:
        """The cached shard map (fetched first if needed); with ``refresh``, the newest map any
        reachable node has (nodes apply map changes at their own pace). None for a server
        without sharding."""
        if refresh:
            eps = [ep for ep in self.router.endpoints if self.router.breaker(ep).would_allow()]
            t = deadline.bound(self.policy.attempt_timeout)
            answers = await asyncio.gather(
                *(self.channels.shard(ep).GetShardMap(shard_pb2.GetShardMapRequest(), timeout=t) for ep in eps),
                return_exceptions=True,
            )
            for ans in answers:
                if isinstance(ans, shard_pb2.GetShardMapResponse) and not ans.error.code and ans.map:
                    with contextlib.suppress(ShardMapError):
                        self.router.set_shard_map(ShardMap.decode(ans.map))
        await self.ensure_map(deadline)
        return self.router.shard_map

    # ----- leaders and members -----

    async def status_once(self, endpoint: str, timeout: float) -> admin_pb2.StatusResponse:
        """One Admin.Status call; learns from the answer; raises RpcFailure."""
        try:
            resp: admin_pb2.StatusResponse = await self.channels.admin(endpoint).Status(
                admin_pb2.StatusRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            failure = classify(e, endpoint=endpoint, is_write=False)
            if failure.transport:
                self.router.on_transport_failure(None, endpoint, failure.reason)
            raise failure from None
        self.learn(endpoint, resp)
        return resp

    def learn(self, endpoint: str, resp: admin_pb2.StatusResponse) -> None:
        self.router.learn_status(
            endpoint,
            resp.node_id,
            [(m.id, m.client_address if self.router.client_port else m.address) for m in resp.members],
            [(g.group, g.leader_id, g.term) for g in resp.groups],
        )
        self.learn_members(resp)

    def learn_members(self, resp: admin_pb2.StatusResponse) -> None:
        self.replicas.learn(
            (g.group, g.role, g.leader_id, g.term, list(g.voters), list(g.learners)) for g in resp.groups
        )

    async def discover(self, group: int, deadline: Deadline) -> None:
        """Ask every endpoint whose breaker allows it for Admin.Status, concurrently; stop at the
        first answer that names a leader for ``group``. Failures are ignored (rotation remains)."""
        timeout = deadline.bound(min(self.policy.attempt_timeout, DISCOVERY_TIMEOUT))
        if timeout <= 0:
            return
        eps = [ep for ep in self.router.endpoints if self.router.breaker(ep).would_allow()]
        if not eps:
            return
        tasks = [asyncio.ensure_future(self.status_once(ep, timeout)) for ep in eps]
        try:
            for fut in asyncio.as_completed(tasks, timeout=timeout + 0.05):
                try:
                    await fut
                except (RpcFailure, TimeoutError, grpc.aio.AioRpcError):
                    continue
                if self.router.leader(group) is not None:
                    return
        except TimeoutError:
            return
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def maybe_discover(self, group: int, deadline: Deadline) -> None:
        if self.router.leader(group) is not None:
            return
        # Concurrent operations share one discovery round.
        if self._discovery is not None and not self._discovery.done():
            await asyncio.wait([self._discovery], timeout=deadline.remaining())
            return
        now = time.monotonic()
        if now - self.router.last_discovery < DISCOVERY_INTERVAL:
            return
        self.router.last_discovery = now
        self._discovery = asyncio.ensure_future(self.discover(group, deadline))
        await asyncio.wait([self._discovery], timeout=deadline.remaining())

    async def refresh_members(self, timeout: float) -> None:
        """Admin.Status of every endpoint whose breaker allows it, concurrently (learns members,
        their addresses and roles)."""
        eps = [ep for ep in self.router.endpoints if self.router.breaker(ep).would_allow()]
        await asyncio.gather(*(self.status_once(ep, timeout) for ep in eps), return_exceptions=True)

    async def ensure_members(self, group: int, deadline: Deadline) -> None:
        """Keep the membership fresh: wait for it the first time, refresh it in the background."""
        if not self.replicas.needs_refresh(group):
            return
        if self._members_refresh is None or self._members_refresh.done():
            self.replicas.last_refresh = time.monotonic()
            timeout = max(0.05, deadline.bound(min(self.policy.attempt_timeout, DISCOVERY_TIMEOUT)))
            self._members_refresh = asyncio.ensure_future(self.refresh_members(timeout))
        if not self.replicas.knows(group):
            await asyncio.wait([self._members_refresh], timeout=deadline.remaining())
