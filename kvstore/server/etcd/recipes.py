"""etcd's `v3lockpb.Lock` and `v3electionpb.Election` services, run on the server as kvstore's
lock and election recipes (`client/concurrency.py`: the same keys and the same rule) with the
caller's identity: each call's reads and writes go in-process through the node's KV servicer
with the call's own context (`caller.CallerKV`), so RBAC (read on the name's keys, write on the
caller's own key), admission control and the audit log see the caller, whether it came with a
token or a client certificate. The caller's lease is the session's: the caller keeps it alive,
as etcd clients do. The lock / candidate key is `NAME/<lease id, 16 hex digits>` (etcd: `NAME/<hex>`),
attached to the lease; the holder is the key with the lowest create revision under `NAME/`, and
its create revision is the fencing token (`LeaderKey.rev`, the response header's revision).

`Proclaim` is etcd's one transaction (a compare of the leader key's create revision and the
put of the new value attached to the request's lease). Waiting (Lock, Campaign, Observe)
watches keys under the name: in process where this node hosts the groups, else merged across
nodes as an etcd `Watch` (`watch.EtcdWatch.merged`: peers with the caller's token; on a TLS
cluster a caller without a token is refused there, definite)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from kvstore.etcdpb.mvccpb import kv_pb2 as mvccpb
from kvstore.etcdpb.v3electionpb import v3election_pb2 as epb
from kvstore.etcdpb.v3electionpb import v3election_pb2_grpc as epb_grpc
from kvstore.etcdpb.v3lockpb import v3lock_pb2 as lpb
from kvstore.etcdpb.v3lockpb import v3lock_pb2_grpc as lpb_grpc
from kvstore.storage import leases
from kvstore.v1 import kv_pb2

from .base import EtcdNode, fail
from .caller import CallerKV
from .convert import EtcdRequestError, invalid
from .kv import EtcdKV
from .lease import _lease
from .status import LEASE_NOT_FOUND, EtcdStatus
from .watch import EtcdWatch

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
    """What the two servicers share: the node, its etcd KV servicer (range reads) and the
    recipe steps, run as the caller (`CallerKV`)."""

    def __init__(self, node: EtcdNode, kv: EtcdKV, watch: EtcdWatch, timeout: float) -> None:
        self.n = node
        self.kv = kv
        self.watch = watch
        self.timeout = timeout

    def caller(self, context: grpc.aio.ServicerContext) -> CallerKV:
        return CallerKV(self.n, self.kv, self.watch, context)

    @staticmethod
    def prefix(name: bytes) -> bytes:
        return name.rstrip(b"/") + b"/"

    async def queue(self, c: CallerKV, name: bytes) -> tuple[list[kv_pb2.KeyValue], int]:
        """(the keys under the name by create revision, the revision read at): one scan."""
        items, rev = await c.scan(self.prefix(name))
        return sorted(items, key=lambda kv: (kv.create_revision, kv.key)), rev

    async def acquire(self, c: CallerKV, name: bytes, lease: int, value: bytes, *,
                      unlock_on_error: bool = False) -> tuple[bytes, int]:
        """(key, fencing token) once the caller's key `NAME/<lease>` is the lowest under the
        name (`concurrency.Mutex.acquire`'s rule): the key is put attached to `lease`, then each
        round waits for the key just ahead of it to be deleted. The key is deleted if the call
        ends first (as etcd's Mutex.Lock does when its context ends). A caller who may not read
        the name's keys is refused first (PERMISSION_DENIED, definite: nothing written).

        `unlock_on_error` (Lock, as etcd's Mutex.Lock unlocks on any wait error): once the put
        was attempted, ANY failure deletes the key (best effort, bounded by the timeout), so a
        failed Lock never leaves a queued key that later becomes the holder under the lease the
        client keeps alive; without it (Campaign, as etcd's Election.Campaign) only the call's
        end (a cancel) does."""
        key = self.prefix(name) + f"{lease:016x}".encode()
        await self.queue(c, name)
        try:
            await c.put(key, value, lease)
            while True:
                queue, rev = await self.queue(c, name)
                mine = next((kv.create_revision for kv in queue if kv.key == key), None)
                if mine is None:  # the lease ended while waiting: its keys went with it
                    raise EtcdStatus(grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
                ahead = [kv for kv in queue if kv.create_revision < mine]
                if not ahead:
                    return key, mine
                await c.wait_for(kv_pb2.WatchCreateRequest(key=ahead[-1].key, start_revision=rev + 1),
                                 deletes_only=True)
        except BaseException as err:
            if unlock_on_error or isinstance(err, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.delete(key), self.timeout)
            raise


class EtcdLock(lpb_grpc.LockServicer):
    def __init__(self, recipes: Recipes) -> None:
        self.r = recipes

    async def Lock(self, request: lpb.LockRequest, context: grpc.aio.ServicerContext) -> lpb.LockResponse:
        try:
            name, lease = recipe_name(request.name), recipe_lease(request.lease)
            key, fence = await self.r.acquire(self.r.caller(context), name, lease, b"", unlock_on_error=True)
            return lpb.LockResponse(header=self.r.n.header(fence), key=key)
        except Exception as err:
            await fail(err, context, "Lock")

    async def Unlock(self, request: lpb.UnlockRequest, context: grpc.aio.ServicerContext) -> lpb.UnlockResponse:
        try:
            if not request.key:
                raise invalid("etcdserver: key is not provided")
            rev = await self.r.caller(context).delete(request.key)
            return lpb.UnlockResponse(header=self.r.n.header(rev))
        except Exception as err:
            await fail(err, context, "Unlock")


class EtcdElection(epb_grpc.ElectionServicer):
    def __init__(self, recipes: Recipes) -> None:
        self.r = recipes

    async def Campaign(self, request: epb.CampaignRequest, context: grpc.aio.ServicerContext) -> epb.CampaignResponse:
        try:
            name, lease = recipe_name(request.name), recipe_lease(request.lease)
            key, fence = await self.r.acquire(self.r.caller(context), name, lease, request.value)
            return epb.CampaignResponse(header=self.r.n.header(fence),
                                        leader=epb.LeaderKey(name=name, key=key, rev=fence, lease=lease))
        except Exception as err:
            await fail(err, context, "Campaign")

    async def Proclaim(self, request: epb.ProclaimRequest, context: grpc.aio.ServicerContext) -> epb.ProclaimResponse:
        """etcd's `Election.Proclaim`: ONE transaction `If(CreateRevision(leader.key) ==
        leader.rev) Then(Put(leader.key, value, leader.lease))` (`CallerKV.put_if_created`);
        `election: not leader` when the compare fails (nothing written). The lease is the
        request's, as etcd's server (its session's lease is `leader.lease`); one that cannot be a
        kvstore lease's (0 included: etcd would grant a new session lease), or is gone, is
        `requested lease not found` (NOT_FOUND, definite)."""
        try:
            lk = request.leader
            if not lk.key or lk.rev <= 0:
                raise EtcdRequestError("FAILED_PRECONDITION", NOT_LEADER)
            lease = _lease(lk.lease, self.r.n.shard_map().data_groups())
            rev = await self.r.caller(context).put_if_created(lk.key, request.value, lease, lk.rev)
            if rev is None:
                raise EtcdRequestError("FAILED_PRECONDITION", NOT_LEADER)
            return epb.ProclaimResponse(header=self.r.n.header(rev, self.r.n.group_of(lk.key)))
        except Exception as err:
            await fail(err, context, "Proclaim")

    async def _leader(self, c: CallerKV, name: bytes) -> tuple[mvccpb.KeyValue | None, int]:
        """(the leader key, the lowest create revision under the name, if any; the revision read at)."""
        queue, rev = await self.r.queue(c, name)
        if not queue:
            return None, rev
        kv = queue[0]
        return mvccpb.KeyValue(key=kv.key, value=kv.value, create_revision=kv.create_revision,
                               mod_revision=kv.mod_revision, version=kv.version), rev

    async def Leader(self, request: epb.LeaderRequest, context: grpc.aio.ServicerContext) -> epb.LeaderResponse:
        try:
            name = recipe_name(request.name)
            kv, rev = await self._leader(self.r.caller(context), name)
            if kv is None:
                raise EtcdRequestError("NOT_FOUND", NO_LEADER)
            return epb.LeaderResponse(header=self.r.n.header(rev), kv=kv)
        except Exception as err:
            await fail(err, context, "Leader")

    async def Observe(self, request: epb.LeaderRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[epb.LeaderResponse]:
        """The leader now (if any) and again at every change of who leads or of the leader's value."""
        try:
            name = recipe_name(request.name)
            c = self.r.caller(context)
            last: tuple[bytes, int] | None = None
            while True:
                kv, rev = await self._leader(c, name)
                if kv is not None and (kv.key, kv.mod_revision) != last:
                    last = (kv.key, kv.mod_revision)
                    yield epb.LeaderResponse(header=self.r.n.header(kv.mod_revision), kv=kv)
                # something under the name changed after the read: look again
                await c.wait_for(kv_pb2.WatchCreateRequest(prefix=self.r.prefix(name), start_revision=rev + 1),
                                 deletes_only=False)
        except Exception as err:
            await fail(err, context, "Observe")

    async def Resign(self, request: epb.ResignRequest, context: grpc.aio.ServicerContext) -> epb.ResignResponse:
        """Delete the leader key if it is still the one that leader created (else nothing)."""
        try:
            lk = request.leader
            if not lk.key:
                raise invalid("etcdserver: key is not provided")
            rev = await self.r.caller(context).delete_if_created(lk.key, lk.rev)
            return epb.ResignResponse(header=self.r.n.header(rev))
        except Exception as err:
            await fail(err, context, "Resign")
