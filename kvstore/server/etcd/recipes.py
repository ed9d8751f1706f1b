"""etcd's `v3lockpb.Lock` and `v3electionpb.Election` services, run on the server over kvstore's
lock and election recipes (`client/concurrency.py`) as the caller: each call opens a kvstore
client to this node with the caller's token (so RBAC applies to the lock keys as to the
caller's own writes). The caller's lease is the session's: the caller keeps it alive, as etcd
clients do. The lock / candidate key is `NAME/<lease id, 16 hex digits>` (etcd: `NAME/<hex>`),
attached to the lease; the holder is the key with the lowest create revision under `NAME/`, and
its create revision is the fencing token (`LeaderKey.rev`, the response header's revision).

Differences from etcd: `Proclaim` checks the leader key's create revision and then puts the new
value attached to the lease (two steps, not one transaction: kvstore transactions do not carry
leases), so a Proclaim racing the same holder's Resign may put the key back as a new candidate,
which then waits behind the others until its lease ends; a node of a TLS cluster does not serve
these calls (FAILED_PRECONDITION: it has no client certificate to act as the caller with)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from kvstore.client.async_client import AsyncClient
from kvstore.client.concurrency import Election, LockLost, Mutex, Session
from kvstore.client.types import Compare, Op
from kvstore.etcdpb.mvccpb import kv_pb2 as mvccpb
from kvstore.etcdpb.v3electionpb import v3election_pb2 as epb
from kvstore.etcdpb.v3electionpb import v3election_pb2_grpc as epb_grpc
from kvstore.etcdpb.v3lockpb import v3lock_pb2 as lpb
from kvstore.etcdpb.v3lockpb import v3lock_pb2_grpc as lpb_grpc
from kvstore.security.identity import token_of
from kvstore.storage import leases

from .base import EtcdNode, fail
from .convert import EtcdRequestError, invalid
from .status import LEASE_NOT_FOUND, EtcdStatus

NOT_LEADER = "election: not leader"
NO_LEADER = "election: no leader"


def recipe_name(name: bytes) -> bytes:
    """A lock or election name as the recipes take it; a definite INVALID_ARGUMENT if empty or
    only slashes (the recipes strip trailing ones)."""
    if not name.rstrip(b"/"):
        raise invalid("etcdserver: a lock or election needs a name")
    return name


def recipe_lease(lease: int) -> int:
    """The caller's lease id; etcd's `requested lease not found` for one that cannot exist."""
    try:
        return leases.check_id(lease)
    except ValueError:
        raise EtcdStatus(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND) from None


class Recipes:
    """What the two servicers share: the node and a client per call as the caller."""

    def __init__(self, node: EtcdNode, address: str, tls: bool, timeout: float) -> None:
        self.n = node
        self.address = address
        self.tls = tls
        self.timeout = timeout

    @contextlib.asynccontextmanager
    async def client(self, context: grpc.aio.ServicerContext) -> AsyncIterator[AsyncClient]:
        if self.tls:
            raise EtcdRequestError("FAILED_PRECONDITION",
                                   "kvstore: locks and elections through the etcd API are not served on a TLS cluster: "
                                   "use kvstore's client (kvstore.client.concurrency)")
        c = AsyncClient([self.address], timeout=self.timeout, token=token_of(context.invocation_metadata()))
        try:
            yield c
        finally:
            await c.close()

    def session(self, client: AsyncClient, lease: int) -> Session:
        """A session on the caller's lease (kept alive by the caller, never revoked here)."""
        s = Session(client)
        s.lease = lease
        return s

    async def acquire(self, m: Mutex, value: bytes) -> tuple[bytes, int]:
        """(key, fencing token) once `m` is held; the key is deleted if the call ends first (as
        etcd's Mutex.Lock does when its context ends). A caller who may not read the name's keys
        is refused first (PERMISSION_DENIED, definite: nothing written)."""
        await m.holder()
        try:
            held = await m.acquire(value)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(m.session.client.delete(m.key), self.timeout)
            raise
        except LockLost:
            raise EtcdStatus(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND) from None
        return held.key, held.fence


class EtcdLock(lpb_grpc.LockServicer):
    def __init__(self, recipes: Recipes) -> None:
        self.r = recipes

    async def Lock(self, request: lpb.LockRequest, context: grpc.aio.ServicerContext) -> lpb.LockResponse:
        try:
            name, lease = recipe_name(request.name), recipe_lease(request.lease)
            async with self.r.client(context) as c:
                key, fence = await self.r.acquire(Mutex(self.r.session(c, lease), name), b"")
            return lpb.LockResponse(header=self.r.n.header(fence), key=key)
        except Exception as err:
            await fail(err, context, "Lock")

    async def Unlock(self, request: lpb.UnlockRequest, context: grpc.aio.ServicerContext) -> lpb.UnlockResponse:
        try:
            if not request.key:
                raise invalid("etcdserver: key is not provided")
            async with self.r.client(context) as c:
                await c.delete(request.key)
                rev = c.revision
            return lpb.UnlockResponse(header=self.r.n.header(rev))
        except Exception as err:
            await fail(err, context, "Unlock")


class EtcdElection(epb_grpc.ElectionServicer):
    def __init__(self, recipes: Recipes) -> None:
        self.r = recipes

    async def Campaign(self, request: epb.CampaignRequest, context: grpc.aio.ServicerContext) -> epb.CampaignResponse:
        try:
            name, lease = recipe_name(request.name), recipe_lease(request.lease)
            async with self.r.client(context) as c:
                key, fence = await self.r.acquire(Election(self.r.session(c, lease), name), request.value)
            return epb.CampaignResponse(header=self.r.n.header(fence),
                                        leader=epb.LeaderKey(name=name, key=key, rev=fence, lease=lease))
        except Exception as err:
            await fail(err, context, "Campaign")

    async def Proclaim(self, request: epb.ProclaimRequest, context: grpc.aio.ServicerContext) -> epb.ProclaimResponse:
        try:
            lk = request.leader
            lease = recipe_lease(lk.lease)
            if not lk.key or lk.rev <= 0:
                raise EtcdRequestError("FAILED_PRECONDITION", NOT_LEADER)
            async with self.r.client(context) as c:
                cur = await c.read(lk.key)
                if cur.value is None or cur.create_revision != lk.rev:
                    raise EtcdRequestError("FAILED_PRECONDITION", NOT_LEADER)
                rev = await c.leases.put(lk.key, request.value, lease)
            return epb.ProclaimResponse(header=self.r.n.header(rev))
        except Exception as err:
            await fail(err, context, "Proclaim")

    async def _leader(self, c: AsyncClient, name: bytes) -> mvccpb.KeyValue | None:
        e = Election(self.r.session(c, 0), name)
        while True:
            holder = await e.holder()
            if holder is None:
                return None
            cur = await c.read(holder[1])
            if cur.value is not None:  # else gone since the scan: ask again
                return mvccpb.KeyValue(key=holder[1], value=cur.value, create_revision=cur.create_revision,
                                       mod_revision=cur.mod_revision, version=cur.version)

    async def Leader(self, request: epb.LeaderRequest, context: grpc.aio.ServicerContext) -> epb.LeaderResponse:
        try:
            name = recipe_name(request.name)
            async with self.r.client(context) as c:
                kv = await self._leader(c, name)
                if kv is None:
                    raise EtcdRequestError("NOT_FOUND", NO_LEADER)
                return epb.LeaderResponse(header=self.r.n.header(c.revision), kv=kv)
        except Exception as err:
            await fail(err, context, "Leader")

    async def Observe(self, request: epb.LeaderRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[epb.LeaderResponse]:
        """The leader now (if any) and again at every change of who leads or of the leader's value."""
        try:
            name = recipe_name(request.name)
            prefix = name.rstrip(b"/") + b"/"
            async with self.r.client(context) as c:
                last: tuple[bytes, int] | None = None
                while True:
                    start = c.revision + 1 if c.revision else 0
                    kv = await self._leader(c, name)
                    if kv is not None and (kv.key, kv.mod_revision) != last:
                        last = (kv.key, kv.mod_revision)
                        yield epb.LeaderResponse(header=self.r.n.header(kv.mod_revision), kv=kv)
                    async for _ in c.watch(prefix=prefix, start_revision=start):
                        break  # something under the name changed: look again
        except Exception as err:
            await fail(err, context, "Observe")

    async def Resign(self, request: epb.ResignRequest, context: grpc.aio.ServicerContext) -> epb.ResignResponse:
        """Delete the leader key if it is still the one that leader created (else nothing)."""
        try:
            lk = request.leader
            if not lk.key:
                raise invalid("etcdserver: key is not provided")
            async with self.r.client(context) as c:
                r = await c.txn([Compare.create(lk.key, "=", lk.rev)], [Op.delete(lk.key)])
            return epb.ResignResponse(header=self.r.n.header(r.revision))
        except Exception as err:
            await fail(err, context, "Resign")
