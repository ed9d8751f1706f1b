"""etcd's `Lease` service over kvstore's lease RPCs (`server/lease_service.py`): grant, revoke,
keep-alive (a stream; each renewal through the home group's log), time-to-live with keys, and
the list. Ids are kvstore's: an id's low 12 bits name its home data group; a grant with ID 0 gets
a random id homed in a random data group this node hosts (etcd picks one too), a grant with an id names a data
group in its low bits or is refused (INVALID_ARGUMENT, definite)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import grpc

from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.storage import leases
from kvstore.v1 import kv_pb2

from .base import EtcdNode, fail
from .convert import invalid
from .status import LEASE_NOT_FOUND, EtcdStatus

MAX_TTL = 9_000_000_000
"""kvstore's largest lease TTL in seconds (`storage/leases.check_ttl`)."""


def grant_id(requested: int, data_groups: list[int], rng: random.Random, hosted: frozenset[int] = frozenset()) -> int:
    """The kvstore lease id for an etcd grant asking for `requested` (0: any, homed in a random
    data group, one of the `hosted` ones if any is)."""
    if requested == 0:
        homes = [g for g in data_groups if 0 < g <= leases.ID_GROUP_MASK]
        homes = [g for g in homes if g in hosted] or homes
        if not homes:
            raise invalid("kvstore: no data group can home a lease")
        return leases.make_id(rng.choice(homes), rng.getrandbits(63))
    try:
        lid = leases.check_id(requested)
    except ValueError as err:
        raise invalid(f"kvstore: {err} (a kvstore lease id's low 12 bits name its home data group)") from None
    if leases.home_group(lid) not in data_groups:
        raise invalid(f"kvstore: lease id {lid:x} names group {leases.home_group(lid)} as its home, which is not a data group")
    return lid


class EtcdLease(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, node: EtcdNode, rng: random.Random | None = None) -> None:
        self.n = node
        self.rng = rng or random.Random()

    async def LeaseGrant(self, request: rpc_pb2.LeaseGrantRequest, context: grpc.aio.ServicerContext
                         ) -> rpc_pb2.LeaseGrantResponse:
        try:
            if not 0 < request.TTL <= MAX_TTL:
                raise invalid(f"etcdserver: lease TTL {request.TTL} is not in 1..{MAX_TTL}")
            lid = grant_id(request.ID, self.n.shard_map().data_groups(), self.rng, frozenset(self.n.host.groups))
            g = await self.n.forward.call("LeaseGrant", kv_pb2.LeaseGrantRequest(ttl=request.TTL, id=lid), context,
                                          is_write=True, group=leases.home_group(lid))
            return rpc_pb2.LeaseGrantResponse(header=self.n.header(0, leases.home_group(lid)), ID=g.id, TTL=g.ttl)
        except Exception as err:
            await fail(err, context, "LeaseGrant")

    async def LeaseRevoke(self, request: rpc_pb2.LeaseRevokeRequest, context: grpc.aio.ServicerContext
                          ) -> rpc_pb2.LeaseRevokeResponse:
        try:
            lid = _lease(request.ID, self.n.shard_map().data_groups())
            await self.n.forward.call("LeaseRevoke", kv_pb2.LeaseRevokeRequest(id=lid), context, is_write=True,
                                      group=leases.home_group(lid))
            return rpc_pb2.LeaseRevokeResponse(header=self.n.header(0, leases.home_group(lid)))
        except Exception as err:
            await fail(err, context, "LeaseRevoke")

    async def LeaseKeepAlive(self, request_iterator: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[rpc_pb2.LeaseKeepAliveResponse]:
        """One answer per request, in order. As etcd's: a lease that is not found (gone, never
        granted, or an id that cannot be a kvstore lease's) is answered TTL 0 with its ID, and the
        stream goes on (clients multiplex every lease on one stream); other errors end it."""
        try:
            async for r in request_iterator:
                try:
                    lid = _lease(r.ID, self.n.shard_map().data_groups())
                    k = await self.n.forward.keep_alive(self.n.forward.kv.leases, kv_pb2.LeaseKeepAliveRequest(id=lid),
                                                        context, leases.home_group(lid))
                except EtcdStatus as err:
                    if err.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    yield rpc_pb2.LeaseKeepAliveResponse(header=self.n.header(0), ID=r.ID, TTL=0)
                    continue
                yield rpc_pb2.LeaseKeepAliveResponse(header=self.n.header(0, leases.home_group(lid)), ID=lid, TTL=k.ttl)
        except Exception as err:
            await fail(err, context, "LeaseKeepAlive")

    async def LeaseTimeToLive(self, request: rpc_pb2.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
                              ) -> rpc_pb2.LeaseTimeToLiveResponse:
        try:
            lid = _lease(request.ID, self.n.shard_map().data_groups())
            t = await self.n.forward.call("LeaseTimeToLive", kv_pb2.LeaseTimeToLiveRequest(id=lid, keys=request.keys),
                                          context, is_write=False, group=leases.home_group(lid))
            return rpc_pb2.LeaseTimeToLiveResponse(header=self.n.header(0, leases.home_group(lid)), ID=lid, TTL=t.ttl,
                                                   grantedTTL=t.granted_ttl, keys=list(t.keys))
        except Exception as err:
            await fail(err, context, "LeaseTimeToLive")

    async def LeaseLeases(self, request: rpc_pb2.LeaseLeasesRequest, context: grpc.aio.ServicerContext
                          ) -> rpc_pb2.LeaseLeasesResponse:
        try:
            ls = await self.n.forward.call("LeaseLeases", kv_pb2.LeaseLeasesRequest(), context, is_write=False)
            return rpc_pb2.LeaseLeasesResponse(header=self.n.header(0),
                                               leases=[rpc_pb2.LeaseStatus(ID=i) for i in ls.ids])
        except Exception as err:
            await fail(err, context, "LeaseLeases")


def _lease(raw: int, data_groups: list[int]) -> int:
    """`raw` as a kvstore lease id, else etcd's "requested lease not found" (NOT_FOUND,
    definite): an id that cannot be a kvstore lease's, or one homed in a group that is not a
    data group, is not one it knows."""
    try:
        lid = leases.check_id(raw)
    except ValueError:
        raise EtcdStatus(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND) from None
    if leases.home_group(lid) not in data_groups:
        raise EtcdStatus(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
    return lid
