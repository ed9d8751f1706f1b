"""Leases on the client (`KV.Lease*`): grant, revoke, keep-alive, time-to-live, list, and puts
attached to a lease. Each call goes to the lease's home group's leader (the id's low 12 bits name
the group), retried by the invoker like any write: NOT_LEADER redirects, a lost reply of a grant,
a revoke or a keep-alive is retried (each is safe to apply twice: a second grant of the same id
answers "lease already exists", which a retried grant takes as its own success; a second revoke
"requested lease not found"; a second renewal only renews again).

A lease id chosen by the client (`grant(ttl)` without an id) is random, homed in a random data
group of the client's shard map. Errors say whether the operation may have happened, as for
every write (`kvstore.errors`)."""

from __future__ import annotations

import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from kvstore.client.channels import Channels
from kvstore.client.checks import RequestChecks
from kvstore.client.cluster_view import ClusterView
from kvstore.client.failures import with_message
from kvstore.client.invoke import Invoker
from kvstore.client.writes import Writes
from kvstore.errors import InvalidArgument, KVError
from kvstore.storage import leases
from kvstore.v1 import kv_pb2

__all__ = ["LeaseInfo", "Leases"]


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease's time to live: `ttl` remaining seconds (-1: not found, expired or revoked),
    `granted_ttl` seconds, `keys` attached (when asked for), `checked` (an HLC reading the home
    leader took before it found the lease live; 0 if not live: what a put with it carries)."""

    id: int
    ttl: int
    granted_ttl: int
    keys: tuple[bytes, ...] = ()
    checked: int = 0


def _id(lease_id: object) -> int:
    try:
        return leases.check_id(lease_id)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


class Leases:
    def __init__(self, checks: RequestChecks, channels: Channels, view: ClusterView, invoker: Invoker,
                 writes: Writes, rng: random.Random) -> None:
        self.checks = checks
        self.channels = channels
        self.view = view
        self.invoker = invoker
        self.writes = writes
        self.rng = rng

    async def _home(self, op: str, lease_id: int, call: Any, timeout: float | None) -> Any:
        return await self.invoker.invoke(op, call, deadline=self.checks.deadline(timeout), is_write=True,
                                         group=leases.home_group(lease_id))

    async def grant(self, ttl: int, lease_id: int = 0, *, timeout: float | None = None) -> int:
        """Grant a lease of `ttl` seconds; returns its id (`lease_id`, or a random one)."""
        try:
            leases.check_ttl(ttl)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        if lease_id:
            lid = _id(lease_id)
        else:
            deadline = self.checks.deadline(timeout)
            await self.view.ensure_map(deadline)
            groups = [g for g in self.view.router.scan_groups() if 0 < g <= leases.ID_GROUP_MASK]
            if not groups:
                raise InvalidArgument("the cluster has no data group to home a lease in")
            lid = leases.make_id(self.rng.choice(groups), self.rng.getrandbits(62))
        req = kv_pb2.LeaseGrantRequest(ttl=ttl, id=lid)
        attempts = [0]

        def call(ep: str, t: float) -> Awaitable[kv_pb2.LeaseGrantResponse]:
            attempts[0] += 1
            return self.channels.kv(ep).LeaseGrant(req, timeout=t)

        try:
            resp = await self._home("lease grant", lid, call, timeout)
        except InvalidArgument as err:
            if attempts[0] > 1 and "lease already exists" in err.message and not lease_id:
                return lid  # our own earlier attempt applied (a random id is nobody else's)
            raise
        return int(resp.id)

    async def revoke(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Revoke a lease: its keys are deleted (the home group's at once, the others' by their
        groups right after). Returns the number deleted in the home group."""
        lid = _id(lease_id)
        req = kv_pb2.LeaseRevokeRequest(id=lid)
        resp = await self._home("lease revoke", lid, lambda ep, t: self.channels.kv(ep).LeaseRevoke(req, timeout=t),
                                timeout)
        return int(resp.deleted)

    async def keep_alive_once(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Renew a lease once (through its home group's log); returns its granted TTL, 0 if it
        was not found (expired or revoked), as etcd's keep-alive."""
        lid = _id(lease_id)

        async def call(ep: str, t: float) -> kv_pb2.LeaseKeepAliveResponse:
            stream = self.channels.kv(ep).LeaseKeepAlive(timeout=t)
            try:
                await stream.write(kv_pb2.LeaseKeepAliveRequest(id=lid))
                resp: kv_pb2.LeaseKeepAliveResponse = await stream.read()
                await stream.done_writing()
                return resp
            finally:
                stream.cancel()

        resp = await self._home("lease keep-alive", lid, call, timeout)
        return int(resp.ttl)

    async def time_to_live(self, lease_id: int, keys: bool = False, *, timeout: float | None = None) -> LeaseInfo:
        lid = _id(lease_id)
        req = kv_pb2.LeaseTimeToLiveRequest(id=lid, keys=keys)
        resp = await self._home("lease timetolive", lid,
                                lambda ep, t: self.channels.kv(ep).LeaseTimeToLive(req, timeout=t), timeout)
        return LeaseInfo(lid, int(resp.ttl), int(resp.granted_ttl), tuple(resp.keys), int(resp.checked))

    async def list(self, *, timeout: float | None = None) -> list[int]:
        """The live leases' ids: the union of what every reachable node's replicas of the data
        groups hold (each group's leader among them has applied every grant it acknowledged; a
        lagging replica may still list a lease revoked a moment ago)."""
        req = kv_pb2.LeaseLeasesRequest()
        ids: set[int] = set()
        answered = 0
        last: KVError | None = None
        for ep in list(self.view.router.endpoints):
            try:
                resp = await self.invoker.invoke(
                    "lease list", lambda e, t: self.channels.kv(e).LeaseLeases(req, timeout=t),
                    deadline=self.checks.deadline(timeout), is_write=False, learns_leader=False, endpoint=ep,
                )
            except KVError as err:
                last = err
                continue
            answered += 1
            ids.update(int(i) for i in resp.ids)
        if not answered and last is not None:
            raise last
        return sorted(ids)

    async def put(self, key: bytes, value: bytes, lease_id: int, *, timeout: float | None = None) -> int:
        """Put `key` attached to the lease (exactly-once, like `put`); returns its revision.
        Refused (definite InvalidArgument "requested lease not found") if the lease is not live."""
        lid = _id(lease_id)
        k, v = self.checks.key(key), self.checks.value(value)
        # The lease must be live at its home (its leader answers): a key in another group is
        # attached only to a lease its home had granted; one revoked since is refused there
        # (its tombstone), as is a put applied more than 60 s after this check (`checked`).
        info = await self.time_to_live(lid, timeout=timeout)
        if info.ttl < 0:
            raise InvalidArgument(f"{leases.NOT_FOUND}: lease {lid:x}")
        try:
            resp = await self.writes.write(
                "lease put", k,
                lambda s: kv_pb2.LeasePutRequest(key=k, value=v, lease=lid, session=s, checked=info.checked), timeout,
                unary=lambda ep, req, t: self.channels.kv(ep).LeasePut(req, timeout=t),
            )
        except KVError as err:
            if leases.NOT_FOUND in err.message:
                raise with_message(err, f"{leases.NOT_FOUND}: lease {lid:x}") from None
            raise
        return int(resp.revision)
