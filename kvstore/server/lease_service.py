"""The lease RPCs of `KV` (LeaseGrant, LeaseRevoke, LeaseKeepAlive, LeaseTimeToLive, LeaseLeases,
LeasePut) and the node's lease clock driver. A thin shell: the rules are `storage/leases.py`
(what applies) and `node/lessor.py` (when the home leader expires and checkpoints).

Routing: a lease operation goes to the lease's home group (`leases.home_group(id)`, the id's low
12 bits), which must be led here (else NOT_LEADER / NO_LEADER with the leader's hint: the client
retries there). A LeasePut goes to the key's group; for a key outside the home group the home's
record is checked first where this node leads the home group with a current view; elsewhere the
client library (or the etcd layer) has checked it at the home leader just before and passes the
home's `checked` answer (`client/leases.py`); a lease revoked since is refused by the key's group
once the lease's deletion committed there (its tombstone), and a put whose `checked` is more
than 60 s (HLC) behind the group when it applies is refused, so tombstones can be forgotten
(`leases.py`). LeaseTimeToLive answers `checked`: this node's HLC reading taken before its read.
With more than one data group, a revoke and the lease clock's expiry delete the lease's keys in
every group at one revision: a two-phase commit (`xtxn.plan_lease`) whose commit point, the
home group's RECORD, revokes the lease (`LeaseRequests._delete_across`, `LeaseDriver._expire_across`).

What answers read: LeaseTimeToLive's remaining TTL is the home leader's lease clock (its
`Lessor`), or the last checkpoint if the lease clock has not timed it yet; its keys, and
LeaseLeases, come from the replicas of the data groups on the answering node (they may lag their
leaders by what is in flight). Every error says whether the operation may have happened.

Permissions (as etcd): granting, keeping alive and listing need an authenticated caller when auth
is on; LeasePut needs write on its key; LeaseRevoke write on every key attached to the lease, in
every data group (`check_revoke`: a caller who may write every key passes at once; else the node
checks the keys attached in its replicas, and refuses, definitely, when it does not host every
data group, since it cannot see the keys of the others); LeaseTimeToLive with keys read on each
key it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from kvstore import errors
from kvstore.node import lessor as lessor_logic
from kvstore.node import xtxn as xlogic
from kvstore.node.lessor import Lessor, LessorParams, Proposal
from kvstore.security.identity import identity_of_call
from kvstore.security.rbac import READ, WRITE, Grants
from kvstore.storage import commands, leases
from kvstore.storage.commands import ApplyResult
from kvstore.storage.leases import Kind, LeaseCmd
from kvstore.v1 import kv_pb2

from . import waiters
from .coalesce import CoalescingQueue
from .group_driver import GroupDriver
from .requests import KVRequests

log = logging.getLogger("kvstore.leases")

KEEPALIVE_BUFFER = 256
"""The most keep-alive replies one stream holds unread (one per lease, the latest)."""

_WRITES = frozenset({Kind.PUT, Kind.REVOKE, Kind.EXPIRE, Kind.DROP, Kind.FORGET})
"""The kinds proposed with an HLC reading (a write's revision; DROP's and FORGET's: the base of
the tombstone they keep, `leases.put_tomb`)."""


def check_revoke(lid: int, grants: Grants | None, data_groups: Collection[int] | None, hosted: Collection[int],
                 attached: Callable[[], list[bytes]]) -> None:
    """etcd's rule for LeaseRevoke: the caller (`grants`; None: auth is off) must be allowed to
    write every key attached to the lease, in any data group. Whoever may write every key passes
    at once. Else every data group (`data_groups`, None: no shard map yet) must be `hosted`
    here, and each key `attached` (read from those replicas) writable; a group not hosted here
    could hold an attached key this node cannot see, so the revoke is refused. Raises
    PermissionDenied (definite: nothing was proposed)."""
    if grants is None or grants.allows_range(b"\x00", None, WRITE):  # every key (keys are non-empty)
        return
    missing = sorted(set(data_groups) - set(hosted)) if data_groups is not None else None
    if missing is None or missing:
        raise errors.PermissionDenied(
            f"revoking lease {lid:x} needs write permission on every key attached to it, and this node cannot "
            f"see the keys of data groups {missing if missing else 'it has no map of'}: revoke it through a node "
            "that hosts every data group, or as a user who may write every key")
    for k in attached():
        if not grants.allows(k, WRITE):
            raise errors.PermissionDenied(f"revoking lease {lid:x} needs write permission on its attached key "
                                          f"{k[:64]!r}")


def _lease_id(raw: int) -> int:
    try:
        return leases.check_id(int(raw))
    except ValueError as err:
        raise errors.InvalidArgument(str(err)) from None


class LeaseRequests:
    """The lease RPCs over `KVRequests` (its host, clock, routing and errors)."""

    def __init__(self, rq: KVRequests, lessors: dict[int, Lessor]) -> None:
        self.rq = rq
        self.lessors = lessors

    def _encode(self, c: LeaseCmd, key: bytes = b"", value: bytes = b"", s: kv_pb2.Session | None = None) -> bytes:
        rev = self.rq.clock.propose(s.revision if s is not None else 0) if c.kind in _WRITES else 0
        if s is None:
            cmd = commands.Command.lease_command(c, key, value, revision=rev)
        else:
            cmd = commands.Command.lease_command(c, key, value, s.client_id, s.seq, s.ack, s.retry, s.horizon, rev)
        try:
            return commands.encode_command(cmd)
        except ValueError as err:
            raise errors.InvalidArgument(str(err)) from None

    async def _propose_home(self, lid: int, data: bytes) -> ApplyResult:
        g = leases.home_group(lid)
        rq = self.rq
        if g not in rq.host.groups:
            raise rq.wrong_shard(f"lease {lid:x}'s home group {g} is not on node {rq.cfg.id}")
        res = await waiters.propose(rq.host, rq.wake, g, data, rq.cfg.request_timeout)
        out = rq.write_outcome(g, res)
        if out is None:
            raise errors.InternalError("the lease command was applied but its result is not known here",
                                       indeterminate=True)
        return out

    def _record(self, lid: int) -> leases.Record | None:
        g = leases.home_group(lid)
        if g not in self.rq.host.groups:
            return None
        return self.rq.store.revisions.read_rows(g, lambda rows: leases.get_record(rows, lid))

    def _attached(self, lid: int) -> list[bytes]:
        out: list[bytes] = []
        for g in sorted(self.rq.host.groups):
            if g != 0:
                out += self.rq.store.revisions.read_rows(g, lambda rows: leases.attached_keys(rows, lid))
        return sorted(set(out))

    async def grant(self, r: kv_pb2.LeaseGrantRequest) -> kv_pb2.LeaseGrantResponse:
        try:
            lid = _lease_id(r.id)
            try:
                ttl = leases.check_ttl(int(r.ttl))
            except ValueError as err:
                raise errors.InvalidArgument(str(err)) from None
            res = await self._propose_home(lid, self._encode(LeaseCmd(Kind.GRANT, lid, ttl_s=ttl)))
            if not res.found:  # a GRANT that applied either found (created) the lease or was refused
                raise errors.LeaseExists(leases.EXISTS)
            return kv_pb2.LeaseGrantResponse(error=self.rq.ok(), id=lid, ttl=ttl)
        except errors.KVError as err:
            return kv_pb2.LeaseGrantResponse(error=self.rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.LeaseGrantResponse(error=self.rq.err(self.rq.internal("LeaseGrant", err)))

    async def revoke(self, r: kv_pb2.LeaseRevokeRequest) -> kv_pb2.LeaseRevokeResponse:
        try:
            lid = _lease_id(r.id)
            rq = self.rq
            grants = None
            if rq.guard is not None and rq.guard.tracker.state.enabled:
                grants = rq.guard.grants(identity_of_call())
            smap = rq.tracker.map
            data = lessor_logic.deletion_groups(smap.data_groups()) if smap is not None else None
            check_revoke(lid, grants, data, rq.host.groups, lambda: self._attached(lid))
            if rq.cross is not None and data is not None and lessor_logic.cross_group_deletion(data):
                n = await self._delete_across(lid, data)
            else:
                res = await self._propose_home(lid, self._encode(LeaseCmd(Kind.REVOKE, lid)))
                n = int.from_bytes(res.current or b"", "big")
            return kv_pb2.LeaseRevokeResponse(error=self.rq.ok(), deleted=n)
        except errors.KVError as err:
            return kv_pb2.LeaseRevokeResponse(error=self.rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.LeaseRevokeResponse(error=self.rq.err(self.rq.internal("LeaseRevoke", err)))

    async def _delete_across(self, lid: int, groups: list[int]) -> int:
        """A revoke with several data groups: the lease's keys in every group deleted at one
        revision by a two-phase commit whose RECORD (in the home group) revokes the lease
        (`xlogic.plan_lease`). The number of keys deleted; a lease not live, or homed in a group
        that is not a data group: a definite InvalidArgument("requested lease not found"); a lease
        that cannot be deleted atomically (`xlogic.plan_lease` refuses the plan: too many data
        groups): a definite InvalidArgument saying why."""
        assert self.rq.cross is not None
        if leases.home_group(lid) not in groups:  # no such group, so no such lease (etcd's answer)
            raise errors.LeaseNotFound(leases.NOT_FOUND)
        try:
            plan = xlogic.plan_lease(groups, lid)
        except ValueError as err:
            raise errors.InvalidArgument(f"lease {lid:x} cannot be revoked: {err}") from None
        try:
            res = await self.rq.cross.run(None, plan)
        except errors.InvalidArgument as err:
            if isinstance(err, errors.LeaseNotFound) or leases.NOT_FOUND in err.message:
                raise errors.LeaseNotFound(leases.NOT_FOUND) from None
            raise
        return len(res.txn.responses) if res.txn is not None else 0

    async def keep_alive_one(self, r: kv_pb2.LeaseKeepAliveRequest) -> kv_pb2.LeaseKeepAliveResponse:
        try:
            lid = _lease_id(r.id)
            res = await self._propose_home(lid, self._encode(LeaseCmd(Kind.RENEW, lid)))
            ttl = int.from_bytes(res.current, "big") if res.found and res.current else 0
            return kv_pb2.LeaseKeepAliveResponse(error=self.rq.ok(), id=lid, ttl=ttl)
        except errors.KVError as err:
            return kv_pb2.LeaseKeepAliveResponse(error=self.rq.err(err), id=r.id)
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.LeaseKeepAliveResponse(error=self.rq.err(self.rq.internal("LeaseKeepAlive", err)), id=r.id)

    async def keep_alive(self, requests: AsyncIterator[kv_pb2.LeaseKeepAliveRequest], window: int = 1024,
                         buffered: int = KEEPALIVE_BUFFER) -> AsyncIterator[kv_pb2.LeaseKeepAliveResponse]:
        """Replies to the requests (each renewal through the home group's log), up to `window`
        renewals in flight at once: replies come as renewals apply (each names its lease). At
        most `buffered` replies wait to be read, one per lease (`CoalescingQueue`: a newer reply
        of a lease replaces its unread one, since only the latest TTL matters); while they are
        all other leases' the renewals wait, and so does the reading of requests: a client that
        never reads its replies holds at most `window` + `buffered` of them in the server."""
        out: CoalescingQueue[int, kv_pb2.LeaseKeepAliveResponse] = CoalescingQueue(buffered)
        slots = asyncio.Semaphore(window)
        tasks: set[asyncio.Task[None]] = set()

        async def one(r: kv_pb2.LeaseKeepAliveRequest) -> None:
            try:
                await out.put(r.id, await self.keep_alive_one(r))
            finally:
                slots.release()

        async def reader() -> None:
            try:
                async for r in requests:
                    await slots.acquire()
                    t = asyncio.get_running_loop().create_task(one(r))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await out.close()

        feed = asyncio.get_running_loop().create_task(reader())
        try:
            while (resp := await out.get()) is not None:
                yield resp
        finally:
            feed.cancel()
            for t in list(tasks):
                t.cancel()

    async def time_to_live(self, r: kv_pb2.LeaseTimeToLiveRequest) -> kv_pb2.LeaseTimeToLiveResponse:
        rq = self.rq
        try:
            lid = _lease_id(r.id)
            g = leases.home_group(lid)
            if g not in rq.host.groups:
                raise rq.wrong_shard(f"lease {lid:x}'s home group {g} is not on node {rq.cfg.id}")
            if not rq.host.leads_current(g):
                raise rq.host.not_leader_error(g)
            # a linearizable read point: a grant acknowledged from inside its apply transaction
            # is visible to the read that follows it; `checked` is read before it (a put with
            # the lease may use it: the lease was live at a time after it)
            checked = rq.clock.propose(0)
            await rq.read_point(g, kv_pb2.LINEARIZABLE)
            rec = self._record(lid)
            if rec is None or rec.state != leases.LIVE:
                return kv_pb2.LeaseTimeToLiveResponse(error=rq.ok(), id=lid, ttl=-1)
            lz = self.lessors.get(g)
            rem = lz.remaining_ms(lid, time.monotonic() * 1000) if lz is not None else None
            rem = rec.remaining_ms if rem is None else rem
            keys = self._attached(lid) if r.keys else []
            for k in keys:
                rq.allow(k, READ)
            return kv_pb2.LeaseTimeToLiveResponse(error=rq.ok(), id=lid, ttl=rem // 1000, granted_ttl=rec.ttl_s,
                                                  keys=keys, checked=checked)
        except errors.KVError as err:
            return kv_pb2.LeaseTimeToLiveResponse(error=rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.LeaseTimeToLiveResponse(error=rq.err(rq.internal("LeaseTimeToLive", err)))

    async def leases(self, r: kv_pb2.LeaseLeasesRequest) -> kv_pb2.LeaseLeasesResponse:
        rq = self.rq
        try:
            ids: list[int] = []
            for g in sorted(rq.host.groups):
                if g != 0:
                    ids += [lid for lid, rec in rq.store.revisions.read_rows(g, leases.iter_records)
                            if rec.state == leases.LIVE]
            return kv_pb2.LeaseLeasesResponse(error=rq.ok(), ids=sorted(ids))
        except errors.KVError as err:
            return kv_pb2.LeaseLeasesResponse(error=rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.LeaseLeasesResponse(error=rq.err(rq.internal("LeaseLeases", err)))

    async def put(self, r: kv_pb2.LeasePutRequest) -> kv_pb2.PutResponse:
        rq = self.rq
        try:
            key, value = r.key, r.value
            rq.check_key(key)
            rq.allow(key, WRITE)
            rq.check_value(value)
            lid = _lease_id(r.lease)
            if not 0 <= r.checked <= leases.MAX_CHECKED:
                raise errors.InvalidArgument(f"lease put checked revision {r.checked} is out of range")
            checked = r.checked
            home = leases.home_group(lid)
            if rq.host.leads_current(home) and rq.group_for(key) != home:
                now = rq.clock.propose(0)  # read before the check: the lease is live after it
                await rq.read_point(home, kv_pb2.LINEARIZABLE)
                rec = self._record(lid)  # this node leads the home group: refuse a dead lease here
                if rec is None or rec.state != leases.LIVE:
                    raise errors.LeaseNotFound(leases.NOT_FOUND)
                checked = max(checked, now)
            # else the key's group refuses the put unless `checked` is recent (`leases.too_old`)
            data = self._encode(LeaseCmd(Kind.PUT, lid, checked=checked), key, value, r.session)
            res = await rq.write(key, data)
            rq.metrics.writes.inc()
            return rq.put_reply(res)
        except errors.KVError as err:
            return kv_pb2.PutResponse(error=rq.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.PutResponse(error=rq.err(rq.internal("LeasePut", err)))


_UNPLANNABLE_LOGGED = 4096
"""How many unplannable lease deletions a `LeaseDriver` remembers having logged."""


class LeaseDriver(GroupDriver[Lessor]):
    """The node's lease clocks: every `period` seconds (`GroupDriver.interval`), a `Lessor` per data group hosted here is
    stepped with this node's monotonic clock and, if this node leads the group with a current
    view, its term; what it asks for is proposed (the home group's commands here, a DROP at the
    other group's leader through `caller`). Counts the expiries that applied (`/metrics`).
    `lessors` is the driver's `states` (`group_driver.GroupDriver`)."""

    def __init__(self, rq: KVRequests, caller: Any, params: LessorParams | None = None, period: float = 0.1) -> None:
        super().__init__(rq, period, "lease clock")
        self.caller = caller
        self.params = params or LessorParams()
        self.lessors: dict[int, Lessor] = self.states
        self.expired = 0
        self._deleting: set[int] = set()
        """Leases whose deletion across groups is under way here (one attempt at a time)."""
        self._unplannable: set[int] = set()
        """Leases whose deletion across groups could not be planned (logged once each; bounded by
        `_UNPLANNABLE_LOGGED`, then forgotten and logged again)."""

    def new_state(self, group: int) -> Lessor:
        return Lessor(group, self.params)

    def step(self) -> None:
        rq = self.rq
        groups = self.deletion_groups()
        now = time.monotonic() * 1000
        for g, lz, term in self.led(groups):
            props = lz.step(now, term, self._records(g), lambda: groups)
            for p in props:
                if p.cmd.kind == Kind.EXPIRE and rq.cross is not None and lessor_logic.cross_group_deletion(groups):
                    self.spawn(self._expire_across(lz, p, list(groups)))
                else:
                    self.spawn(self._send(lz, p))

    def after_step(self) -> None:
        self.rq.metrics.leases.set(self.live_count())

    def _records(self, g: int) -> Callable[[], list[tuple[int, leases.Record]]]:
        store = self.rq.store

        def read() -> list[tuple[int, leases.Record]]:
            out: list[tuple[int, leases.Record]] = store.revisions.read_rows(g, leases.iter_records)
            return out
        return read

    async def _expire_across(self, lz: Lessor, p: Proposal, groups: list[int]) -> None:
        """An EXPIRE with several data groups: the lease's deletion as one two-phase commit
        (`xlogic.plan_lease` with the renew count), at most one attempt per lease at a time; an
        attempt that fails is retried by the lease clock (its next EXPIRE). A deletion that cannot
        be planned (`xlogic.plan_lease`: more data groups than one transaction spans) is logged
        once per lease, never split (that would not be atomic), and retried like any other."""
        rq = self.rq
        lid = p.cmd.lease_id
        if rq.cross is None or lid in self._deleting:
            return
        self._deleting.add(lid)
        try:
            plan = xlogic.plan_lease(groups, lid, p.cmd.renews)
            await rq.cross.run(None, plan)
            self.expired += 1
            rq.metrics.lease_expired.inc()
        except ValueError as err:  # no atomic deletion is possible with this map: never split, retried
            if lid not in self._unplannable:
                if len(self._unplannable) >= _UNPLANNABLE_LOGGED:
                    self._unplannable.clear()
                self._unplannable.add(lid)
                log.error("lease %x expired but cannot be deleted across groups: %s", lid, err)
        except errors.KVError as err:  # renewed or revoked meanwhile (definite), or retried later
            log.debug("deletion of lease %x across groups: %s", lid, err)
        finally:
            self._deleting.discard(lid)

    async def _send(self, lz: Lessor, p: Proposal) -> None:
        rq = self.rq
        rev = rq.clock.propose(0) if p.cmd.kind in _WRITES else 0
        data = commands.encode_command(commands.Command.lease_command(p.cmd, revision=rev))
        try:
            if p.group in rq.host.groups and rq.host.leads_current(p.group):
                res = await waiters.propose(rq.host, rq.wake, p.group, data, rq.cfg.request_timeout)
            elif self.caller is not None:
                res = await self.caller.propose(p.group, data)
            else:
                lz.on_outcome(p, False)
                return
        except errors.KVError as err:
            log.debug("lease command %s to group %d failed: %s", p.cmd.kind.name, p.group, err)
            lz.on_outcome(p, False)
            return
        ok = res is not None and not res.error
        if res is not None and res.error and rq.cross is not None:
            rq.cross.locked_error(p.group, res)  # an attached key holds an intent: resolve it if old; retried
        if ok and p.cmd.kind == Kind.EXPIRE and res is not None and res.found:
            self.expired += 1
            rq.metrics.lease_expired.inc()
        lz.on_outcome(p, ok)

    def live_count(self) -> int:
        """Live leases homed in the groups this node leads."""
        return sum(len(lz.leases) for lz in self.lessors.values())
