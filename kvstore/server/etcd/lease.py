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
            lid = _lease(request.ID)
            if leases.home_group(lid) not in self.n.shard_map().data_groups():
                # no lease can be homed there: etcd's answer for a lease it does not know
                from .status import LEASE_NOT_FOUND, EtcdStatus

                raise EtcdStatus(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
            await self.n.forward.call("LeaseRevoke", kv_pb2.LeaseRevokeRequest(id=lid), context, is_write=True,
                                      group=leases.home_group(lid))
            return rpc_pb2.LeaseRevokeResponse(header=self.n.header(0, leases.home_group(lid)))
        except Exception as err:
            await fail(err, context, "LeaseRevoke")

    async def LeaseKeepAlive(self, request_iterator: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[rpc_pb2.LeaseKeepAliveResponse]:
        """One answer per request, in order (etcd: TTL 0 for a lease that is gone)."""
        try:
            async for r in request_iterator:
                lid = _lease(r.ID)
                k = await self.n.forward.keep_alive(self.n.forward.kv.leases, kv_pb2.LeaseKeepAliveRequest(id=lid),
                                                    context, leases.home_group(lid))
                yield rpc_pb2.LeaseKeepAliveResponse(header=self.n.header(0, leases.home_group(lid)), ID=lid, TTL=k.ttl)
        except Exception as err:
            await fail(err, context, "LeaseKeepAlive")

    async def LeaseTimeToLive(self, request: rpc_pb2.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
                              ) -> rpc_pb2.LeaseTimeToLiveResponse:
        try:
            lid = _lease(request.ID)
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


def _lease(raw: int) -> int:
    try:
        return leases.check_id(raw)
    except ValueError:
        # etcd answers an id it does not know with "requested lease not found"; an id that cannot
        # be a kvstore lease is not one it knows.
        from .status import LEASE_NOT_FOUND, EtcdStatus

        raise EtcdStatus(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND) from None
