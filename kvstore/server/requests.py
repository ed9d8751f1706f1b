"""KV requests shared by the unary calls (`kv_service.py`) and `KV.Stream` (`op_stream.py`):
validation, routing to a group, requests as commands, results and errors as replies.

Both paths answer an operation with exactly the same reply because they build it here; neither
path module imports the other.

Invariants:
- a request that fails validation or routing raises a *definite* KVError before anything is
  proposed (never a raw ValueError: `_encode` turns the encoder's refusals into
  INVALID_ARGUMENT);
- a write is proposed only to a group on this node whose shard state serves the key; the group's
  state machine checks ownership again when it applies (WRONG_SHARD, never applied);
- every reply and every error carries this node's shard map version (`ok`, `err`), so a client
  routing by an older map learns of the newer one;
- a read is served from local state only at a read point `ReplicaReads` granted for the
  requested consistency, and ownership is checked at that point;
- a read at revision R > 0 is served only once the group's applied last revision here is >= R
  (`kvstore.node.closes`: closed through the group's log first if it is not), so its answer can
  never change afterwards; an R beyond the clock-uncertainty bound is refused (definite).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kvstore import errors
from kvstore.keyspace import prefix_end
from kvstore.node import xtxn as xlogic
from kvstore.node.closes import NodeCloses
from kvstore.node.hlc import HybridClock
from kvstore.node.host import Host
from kvstore.node.store import ReadStream, RevisionReads
from kvstore.raft import Role
from kvstore.security.guard import AuthGuard
from kvstore.security.rbac import READ, READWRITE, WRITE, PermKind
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import META_GROUP, ShardMap
from kvstore.storage import commands, leases, mvcc, txn
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import StorageError
from kvstore.storage.xtxn import Intent, IntentProbe, TxnId
from kvstore.v1 import kv_pb2

from . import waiters
from .admission import Admission
from .config import NodeConfig
from .metrics import Metrics
from .reads import LINEARIZABLE, ReadPoint, ReplicaReads
from .scan_parts import gather_parts
from .shards import GroupCaller, ShardTracker
from .txn_wire import result_into, txn_from_proto
from .xtxn_run import CrossTxns, planted_halt

log = logging.getLogger("kvstore.kv")

_REFUSALS: dict[str, type[errors.InvalidArgument]] = {
    leases.NOT_FOUND: errors.LeaseNotFound, leases.EXISTS: errors.LeaseExists}
"""A state machine's result error that is one of its named refusals (equal to the constant, as
the state machine writes it): the error class it is raised as."""


LEASE_ASKS_AT_ONCE = 8
"""How many leases' homes one transaction's coordinator asks at once (`_lease_stamps`)."""


class KVRequests:
    """Each key is served by the data group the shard map routes it to, if that group is on this
    node (led here, or, for reads, a replica that may serve them; see reads.py). The group itself
    decides ownership: a write it does not own is refused by its state machine (never applied,
    so definite), and a read checks the group's applied ranges at the read point."""

    def __init__(
        self,
        cfg: NodeConfig,
        host: Host,
        wake: Any,
        metrics: Metrics,
        tracker: ShardTracker,
        reads: ReplicaReads | None = None,
        admission: Admission | None = None,
        guard: AuthGuard | None = None,
        caller: GroupCaller | None = None,
    ) -> None:
        self.guard = guard
        """Key permissions per operation (None: no auth, as in tests of the bare service)."""
        self.cfg = cfg
        self.admission = admission
        """Write refusals (load shedding, the NOSPACE alarm) and rate limits; None: admit all."""
        self.host = host
        self.store = host.store
        self.wake = wake
        self.metrics = metrics
        self.tracker = tracker
        self.reads = reads or ReplicaReads(host, request_timeout=cfg.request_timeout)
        self.caller = caller
        """Forwards a close to a group's leader elsewhere (None: reads at a revision that need a
        close are served only where this node leads the group)."""
        closes = caller.closes if caller is not None else None
        if closes is None:
            closes = NodeCloses(host, HybridClock(lambda: time.time_ns() // 1_000_000), wake)
            if caller is not None:
                caller.closes = closes  # one per node: Shard.GroupPropose's closes go through it too
        self.closes = closes
        self.clock = closes.clock
        """Proposes the revisions of this node's writes (docs/REVISIONS.md); checks closes."""
        self._forwards: set[asyncio.Task[ApplyResult]] = set()
        halt = planted_halt(cfg.id, cfg.plant_xtxn_halt)
        self.cross: CrossTxns | None = (
            CrossTxns(cfg.id, caller.propose, self.clock, cfg.request_timeout, halt=halt) if caller is not None else None
        )
        """Runs transactions across groups (two-phase commit through each group's leader) and
        resolves intents this node's requests meet; None without a caller (a bare service): a
        cross-group transaction is refused then."""

    # --- validation -------------------------------------------------------------------------
    def check_key(self, key: bytes) -> None:
        if not key:
            raise errors.InvalidArgument("key must not be empty")
        if len(key) > self.cfg.limits.max_key:
            raise errors.KeyTooLarge(len(key), self.cfg.limits.max_key)

    def allow(self, key: bytes, access: PermKind) -> None:
        """PermissionDenied (definite) unless the call's identity may `access` `key`."""
        if self.guard is not None:
            self.guard.check_key(key, access)

    def check_value(self, value: bytes) -> None:
        if len(value) > self.cfg.limits.max_value:
            raise errors.ValueTooLarge(len(value), self.cfg.limits.max_value)

    # --- errors and success, stamped with the shard map version -----------------------------
    def err(self, err: errors.KVError) -> kv_pb2.Error:
        """The wire error, stamped with our shard map version: a client whose map is older
        refreshes it (a NOT_LEADER may come from routing by a stale map)."""
        e = errors.to_proto(err)
        e.shard_version = self.tracker.version
        return e

    @staticmethod
    def internal(op: str, err: BaseException, *, indeterminate: bool | None = None) -> errors.InternalError:
        """An unexpected exception while serving one operation: logged, and answered as INTERNAL
        for that operation only (indeterminate for a write unless the caller knows it was not
        proposed; a read's is definite on the client whatever this says)."""
        log.error("%s failed unexpectedly: %s: %s", op, type(err).__name__, err, exc_info=err)
        return errors.InternalError(f"{op} failed: {type(err).__name__}: {err}", indeterminate=indeterminate)

    def ok(self) -> kv_pb2.Error:
        """Success (code OK) carrying our shard map version, so that a client routing by an
        older map learns of the newer one even when its request happened to land right."""
        return kv_pb2.Error(shard_version=self.tracker.version)

    def wrong_shard(self, message: str) -> errors.WrongShard:
        return errors.WrongShard(message, shard_version=self.tracker.version)

    # --- routing ----------------------------------------------------------------------------
    def group_for(self, key: bytes, h: int | None = None) -> int:
        """The group the shard map routes `key` to, if it is on this node (definite error else).
        `h`: `key_hash(key)` if the caller has it already (one hash per request)."""
        m = self.tracker.map
        if m is None:
            raise errors.NoLeader("this node has no shard map yet")
        gid = m.group_for_hash(key_hash(key) if h is None else h)
        if gid not in self.host.groups:
            raise self.wrong_shard(f"the key's group {gid} is not on node {self.cfg.id}")
        return gid

    def check_owned(self, gid: int, key: bytes, h: int | None = None) -> None:
        """WRONG_SHARD (definite) unless `gid`'s shard state serves `key` (`h`: its hash, if known)."""
        st = self.store.shard_state(gid)
        if st is not None and (key_hash(key) if h is None else h) not in st.active:
            raise self.wrong_shard(f"group {gid} does not serve the key (it moved)")

    def route_write(self, key: bytes, data: bytes, delete: bool = False) -> int:
        """The group (led here, serving `key`) to propose the command `data` to; raises a definite
        KVError otherwise, admission's refusals included (RESOURCE_EXHAUSTED when the node sheds
        writes, NOSPACE for a put or CAS while the space alarm is raised; a `delete` frees space
        and is not refused for NOSPACE)."""
        if len(data) > self.cfg.limits.max_request:
            raise errors.RequestTooLarge(len(data), self.cfg.limits.max_request)
        h = key_hash(key)  # once: routing and the ownership check both need it
        gid = self.group_for(key, h)
        self.check_owned(gid, key, h)
        if self.admission is not None:
            self.admission.check_write(gid, delete)
        return gid

    def route_txn(self, t: txn.Txn, data: bytes) -> int | xlogic.Plan:
        """The one group every key of transaction `t` maps to (led here, serving them all), to
        propose `data` to; or, if its keys are in several groups, the plan of a two-phase commit
        across them (`kvstore.node.xtxn`, run by `cross_txn`: the participants' leaders may be
        anywhere). Definite errors: a key whose range moved (WRONG_SHARD, the client refreshes
        its map and retries), a cross-group transaction on a node that cannot run one, and
        admission's refusals as for a put."""
        if len(data) > self.cfg.limits.max_request:
            raise errors.RequestTooLarge(len(data), self.cfg.limits.max_request)
        m = self.tracker.map
        if m is None:
            raise errors.NoLeader("this node has no shard map yet")
        hashes = {k: key_hash(k) for k, _ in txn.keys_of(t)}
        if txn.has_delete_range(t):
            return self.route_ranges(t, data, m, hashes)
        if not hashes:
            raise errors.InvalidArgument("a transaction must name at least one key (it is routed by its keys)")
        groups: dict[int, bytes] = {}
        for k, h in hashes.items():
            groups.setdefault(m.group_for_hash(h), k)
        if len(groups) > 1:
            if self.cross is None:
                names = ", ".join(f"{g} (key {k[:32]!r})" for g, k in sorted(groups.items()))
                raise errors.InvalidArgument(f"this node runs no cross-group transactions: the keys are in groups {names}")
            if self.admission is not None:
                for g in sorted(groups):
                    self.admission.check_write(g, not _has_put(t))
            p = xlogic.plan(t, ((k, m.group_for_hash(h)) for k, h in hashes.items()))
            self._gate_leases(p)
            return p
        (gid,) = groups
        if gid not in self.host.groups:
            raise self.wrong_shard(f"the transaction's group {gid} is not on node {self.cfg.id}")
        for k, h in hashes.items():
            self.check_owned(gid, k, h)
        if self.admission is not None:
            self.admission.check_write(gid, not _has_put(t))
        return gid

    def _gate_leases(self, p: xlogic.Plan) -> None:
        """Leased puts and lease compares across groups are PREPARE/COMMIT/RECORD forms of level
        7: refused here (definite, ClusterVersionTooLow) while the cluster is below it."""
        if not (p.leased or p.read_leases) or self.host.gate is None:
            return
        try:
            probes = xlogic.prepare_commands(p, TxnId(0, 0), 0, 0)
        except ValueError as bad:
            raise errors.InvalidArgument(f"the transaction cannot be prepared: {bad}") from None
        for probe in probes.values():
            self.host.gate(probe)

    def route_ranges(self, t: txn.Txn, data: bytes, m: ShardMap, hashes: dict[bytes, int]) -> xlogic.Plan:
        """The plan of transaction `t` with range deletes: a two-phase commit over every data
        group, whatever groups its named keys are in (`xlogic.plan_ranges`). Definite errors: a
        cluster version below `LEVEL_TXN_RANGES` (the gate, on the transaction's own command: a
        TXN with a DELETE_RANGE is that level's form; with a leased put or lease compare too,
        below `LEVEL_XTXN_LEASES`: its PREPAREs' form), a node that runs no cross-group
        transactions, admission's refusals."""
        if self.host.gate is not None:
            self.host.gate(data)
        if self.cross is None:
            raise errors.InvalidArgument("this node runs no cross-group transactions (a range delete needs one)")
        groups = [g for g in m.data_groups() if g != META_GROUP]
        try:
            plan = xlogic.plan_ranges(t, ((k, m.group_for_hash(h)) for k, h in hashes.items()), groups)
        except ValueError as err:
            raise errors.InvalidArgument(str(err)) from None
        self._gate_leases(plan)
        if self.admission is not None:
            for g in groups:
                self.admission.check_write(g, not _has_put(t))
        return plan

    def prepare_txn(self, r: kv_pb2.TxnRequest) -> tuple[txn.Txn, bytes]:
        """(transaction, command) of a checked transaction: read permission on every key it
        compares or gets, write permission on every key it puts or deletes (on any path)."""
        t = txn_from_proto(r.txn, self.check_key, self.check_value)
        for key, written in txn.keys_of(t):
            self.allow(key, WRITE if written else READ)
        if self.guard is not None:
            for lo, hi in txn.delete_ranges(t):
                self.guard.check_range(lo, hi or None, WRITE)
        return t, self._txn_command(t, r)

    def _txn_command(self, t: txn.Txn, r: kv_pb2.TxnRequest) -> bytes:
        """The TXN command of transaction `t` under request `r`'s session."""
        s = r.session
        return _encode(
            commands.encode_command,
            commands.Command.transaction(t, s.client_id, s.seq, s.ack, s.retry, s.horizon, self.clock.propose(s.revision)),
        )

    def txn_reply_into(self, msg: kv_pb2.TxnResponse, t: txn.Txn, res: ApplyResult | None) -> None:
        """Fill `msg` with the applied result `res` of transaction `t` (raises a KVError when
        there is none to give: see below)."""
        if res is None:  # applied, but no result came back: retrying under the session answers it
            raise errors.InternalError("the transaction was applied but its result is not known here",
                                       indeterminate=True)
        if res.txn is None:  # a cached result of another command under this (client, seq)
            raise errors.InvalidArgument(
                "the session's result for this sequence number belongs to a different request (a reused seq)"
            )
        self._ok_into(msg.error)
        msg.index, msg.revision = res.index, res.revision
        result_into(msg.result, t, res.txn)

    async def cross_txn(self, t: txn.Txn, p: xlogic.Plan, r: kv_pb2.TxnRequest) -> kv_pb2.TxnResponse:
        """Run transaction `t` across the groups of plan `p` (raises a KVError on failure)."""
        assert self.cross is not None  # route_txn plans only when it exists
        t, p = await self._lease_checks(t, p)
        s = r.session
        res = await self.cross.run(t, p, s.revision, s.client_id, s.seq, s.ack, s.retry, s.horizon)
        self.metrics.writes.inc()
        msg = kv_pb2.TxnResponse()
        self.txn_reply_into(msg, t, res)
        return msg

    async def run_txn(self, r: kv_pb2.TxnRequest) -> kv_pb2.TxnResponse:
        """A transaction without scans, in one group or across groups: its reply, or a raised
        KVError (`txn_scans.py` runs the transaction part of one with scans through here). A
        one-group transaction's leased puts get their `checked` stamps as a cross-group one's
        (`_lease_stamps`: a raw KV.Txn without them is not refused for it)."""
        t, data = self.prepare_txn(r)
        gid = self.route_txn(t, data)
        if isinstance(gid, xlogic.Plan):
            return await self.cross_txn(t, gid, r)
        if txn.has_lease(t):
            one = gid
            stamps = await self._lease_stamps(t, lambda _k: one)
            if stamps:
                t = xlogic.with_checked(t, stamps)
                data = self._txn_command(t, r)
        result = await waiters.propose(self.host, self.wake, gid, data, self.cfg.request_timeout)
        res = self.write_outcome(gid, result)
        self.metrics.writes.inc()
        msg = kv_pb2.TxnResponse()
        self.txn_reply_into(msg, t, res)
        return msg

    async def _lease_checks(self, t: txn.Txn, p: xlogic.Plan) -> tuple[txn.Txn, xlogic.Plan]:
        """The coordinator's check of the leases of a transaction across groups (`_lease_stamps`),
        the plan made again with the stamps."""
        stamps = await self._lease_stamps(t, lambda k: p.group_of[k])
        if not stamps:
            return t, p
        t = xlogic.with_checked(t, stamps)
        group_for = ((k, p.group_of[k]) for k, _ in txn.keys_of(t))
        if p.lock is not None:  # a transaction with range deletes: every data group, as before
            return t, xlogic.plan_ranges(t, group_for, p.keys)
        return t, xlogic.plan(t, group_for)

    async def _lease_stamps(self, t: txn.Txn, group_of: Callable[[bytes], int]) -> dict[int, int]:
        """Lease -> `checked` stamp for the leases of `t`'s puts that need one: a put with a
        lease and no `checked` (the etcd layer and the client library send one: they asked the
        lease's home first) whose key (in group `group_of(key)`) is outside the lease's home
        group gets, if the home answers the lease ALIVE (a LEASE_STATUS through its log:
        linearizable), this node's clock reading taken before it asked, as LeaseTimeToLive's
        `checked`; else it keeps 0 and the key's group refuses it where it is on the path taken
        (`requested lease not found`). The homes are asked concurrently, at most
        `LEASE_ASKS_AT_ONCE` at a time, each within the request timeout (the proposals' own).
        A failure to ask is the request's (definite: nothing was proposed but the read-only
        STATUS). None needed, or no way to ask (no cross-group runner): no stamp."""
        if self.cross is None:
            return {}
        cross = self.cross
        m = self.tracker.map
        data_groups = set(m.data_groups()) if m is not None else set()
        need = sorted({lid for k, lid, checked in xlogic.leased_puts(t)
                       if not checked and leases.home_group(lid) != group_of(k)
                       and leases.home_group(lid) in data_groups})
        if not need:
            return {}

        async def ask(lid: int) -> tuple[int, int | None]:
            now = self.clock.propose(0)
            cmd = commands.encode_command(commands.Command.lease_command(leases.LeaseCmd(leases.Kind.STATUS, lid)))
            res = await cross.propose(leases.home_group(lid), cmd)
            try:
                alive = res.error is None and leases.Status.decode(res.current).state == leases.ALIVE
            except ValueError:
                alive = False
            return lid, now if alive else None

        # at most LEASE_ASKS_AT_ONCE at once; one failing cancels (and awaits) the others
        asked = await gather_parts([functools.partial(ask, lid) for lid in need], LEASE_ASKS_AT_ONCE)
        return {lid: now for lid, now in asked if now is not None}

    async def txn(self, r: kv_pb2.TxnRequest) -> kv_pb2.TxnResponse:
        """A whole transaction without scans (`KV.Txn`), every failure in the reply."""
        try:
            return await self.run_txn(r)
        except errors.KVError as err:
            return kv_pb2.TxnResponse(error=self.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.TxnResponse(error=self.err(self.internal("Txn", err)))

    # --- writes -----------------------------------------------------------------------------
    def write_outcome(self, gid: int, result: ApplyResult | None) -> ApplyResult | None:
        """The applied command's result, or the definite error its state machine answered."""
        if result is not None and result.wrong_shard:
            raise self.wrong_shard(f"group {gid} no longer serves the key (it moved)")
        if result is not None and result.session_expired:
            # A retry after its session was evicted: not applied now; an earlier attempt may have been.
            raise errors.SessionExpired(f"group {gid}: {result.error}")
        if result is not None and result.error and self.cross is not None:
            locked = self.cross.locked_error(gid, result)  # a key holds a transaction's intent
            if locked is not None:
                raise locked
        if result is not None and result.error:
            # The state machine refused it (e.g. a retry older than the session's ack): no effect.
            raise _REFUSALS.get(result.error, errors.InvalidArgument)(result.error)
        if result is not None and result.revision:
            self.clock.observe(result.revision)
        return result

    async def write(self, key: bytes, data: bytes, delete: bool = False) -> Any:
        """Propose `data` (a command for `key`) and wait for its outcome (the unary path; the
        stream proposes with a callback instead)."""
        gid = self.route_write(key, data, delete)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await waiters.propose(self.host, self.wake, gid, data, self.cfg.request_timeout)
        self.metrics.proposal_seconds.observe(loop.time() - t0)
        return self.write_outcome(gid, result)

    def prepare_put(self, r: kv_pb2.PutRequest) -> tuple[bytes, bytes]:
        """(key, command) of a checked put."""
        key, value = r.key, r.value  # each read of a bytes field makes a new bytes object: once
        self.check_key(key)
        self.allow(key, WRITE)
        self.check_value(value)
        s = r.session
        return key, _encode(
            commands.encode_put, key, value, s.client_id, s.seq, s.ack, s.retry, s.horizon,
            self.clock.propose(s.revision),
        )

    def prepare_delete(self, r: kv_pb2.DeleteRequest) -> tuple[bytes, bytes]:
        """(key, command) of a checked delete."""
        self.check_key(r.key)
        self.allow(r.key, WRITE)
        s = r.session
        return r.key, _encode(
            commands.encode_delete, r.key, s.client_id, s.seq, s.ack, s.retry, s.horizon, self.clock.propose(s.revision)
        )

    @staticmethod
    def is_range_delete(r: kv_pb2.DeleteRequest) -> bool:
        return bool(r.prefix or r.range_end)

    async def delete_range(self, r: kv_pb2.DeleteRequest) -> kv_pb2.DeleteResponse:
        """A range delete (`DeleteRequest.prefix` or `range_end`): every key of the range in
        every data group, atomically at one revision, by a two-phase commit that locks the
        range in each group (`kvstore.node.xtxn.plan_range`). Raises a KVError on failure (no
        session: a retry deletes what exists then)."""
        if r.prefix:
            if len(r.prefix) > self.cfg.limits.max_key:
                raise errors.KeyTooLarge(message=f"prefix of {len(r.prefix)} bytes is longer than the longest key")
            lo, hi = r.prefix, prefix_end(r.prefix) or b""
        else:
            self.check_key(r.key)
            if len(r.range_end) > self.cfg.limits.max_key:
                raise errors.KeyTooLarge(message=f"range end of {len(r.range_end)} bytes is longer than the longest key")
            lo, hi = r.key, b"" if r.range_end == b"\x00" else r.range_end
        m = self.tracker.map
        if m is None:
            raise errors.NoLeader("this node has no shard map yet")
        if self.cross is None:
            raise errors.InvalidArgument("this node runs no range deletes")
        groups = [g for g in m.data_groups() if g != META_GROUP]
        try:
            plan = xlogic.plan_range(groups, lo, hi)  # the one check of the range
        except ValueError as err:
            raise errors.InvalidArgument(str(err)) from None
        if self.guard is not None:
            self.guard.check_range(lo, hi or None, WRITE)
        if self.admission is not None:
            for g in groups:
                self.admission.check_write(g, True)
        res = await self.cross.run(None, plan, r.session.revision)
        self.metrics.writes.inc()
        n = len(res.txn.responses) if res.txn is not None else 0
        return kv_pb2.DeleteResponse(error=self.ok(), existed=n > 0, revision=res.revision, deleted=n)

    def prepare_cas(self, r: kv_pb2.CasRequest) -> tuple[bytes, bytes]:
        """(key, command) of a checked compare-and-swap (it may reveal the current value: read
        and write permission)."""
        self.check_key(r.key)
        self.allow(r.key, READWRITE)
        self.check_value(r.value)
        self.check_value(r.expected)
        if r.expect_absent and r.expected:
            raise errors.InvalidArgument("a CAS that expects the key absent must not carry an expected value")
        s = r.session
        return r.key, _encode(
            commands.encode_cas, r.key, r.expect_absent, r.expected, r.value, s.client_id, s.seq, s.ack,
            s.retry, s.horizon, self.clock.propose(s.revision),
        )

    # Write replies carry the index of the entry that applied them (a committed index: the client
    # learns the group's horizon from it, see kvstore.storage.machine). Each `*_reply_into` fills
    # an empty message in place (KV.Stream fills its OpResult's field: no reply built, then
    # copied); `*_reply` builds one. Both give the same message: an `error` present (OK, our
    # shard map version) and, for an applied result, its fields.
    def _ok_into(self, err: kv_pb2.Error) -> None:
        err.SetInParent()
        err.shard_version = self.tracker.version

    def put_reply_into(self, msg: kv_pb2.PutResponse, res: ApplyResult | None) -> None:
        self._ok_into(msg.error)
        if res is not None:
            msg.index, msg.revision = res.index, res.revision

    def delete_reply_into(self, msg: kv_pb2.DeleteResponse, res: ApplyResult | None) -> None:
        self._ok_into(msg.error)
        if res is not None:
            msg.existed, msg.index, msg.revision = bool(res.existed), res.index, res.revision

    def cas_reply_into(self, msg: kv_pb2.CasResponse, res: ApplyResult | None) -> None:
        self._ok_into(msg.error)
        if res is not None:
            msg.swapped, msg.found, msg.current = bool(res.swapped), bool(res.found), res.current or b""
            msg.index, msg.revision = res.index, res.revision

    def put_reply(self, res: ApplyResult | None) -> kv_pb2.PutResponse:
        msg = kv_pb2.PutResponse()
        self.put_reply_into(msg, res)
        return msg

    def delete_reply(self, res: ApplyResult | None) -> kv_pb2.DeleteResponse:
        msg = kv_pb2.DeleteResponse()
        self.delete_reply_into(msg, res)
        return msg

    def cas_reply(self, res: ApplyResult | None) -> kv_pb2.CasResponse:
        msg = kv_pb2.CasResponse()
        self.cas_reply_into(msg, res)
        return msg

    # --- reads ------------------------------------------------------------------------------
    def get_reply(self, gid: int, key: bytes, point: ReadPoint, revision: int = 0,
                  with_lease: bool = False) -> kv_pb2.GetResponse:
        """Read `key` from `gid`'s local state at `point` (ownership checked at the read point),
        at `revision` (0: the current version), with its metadata; with `with_lease` (`revision`
        0 only: `check_with_lease`) the lease a present key is attached to, from the same view
        (`lease_read` set; nothing more is read without it)."""
        self.check_owned(gid, key)
        probe = leases.LeaseProbe() if with_lease else None
        v, st, blocking = read_version(self.store.revisions, gid, key, revision, probe)
        served = served_at(revision, st)
        self.check_intents(gid, blocking)
        self.metrics.reads.inc()
        resp = kv_pb2.GetResponse(
            found=v is not None, index=point.index, staleness_ms=point.staleness_ms, node_id=self.cfg.id,
            error=self.ok(), revision=served,
        )
        if v is not None and v.value is not None:
            resp.value = v.value
            resp.create_revision, resp.mod_revision, resp.version = (
                v.meta.create_revision, v.meta.mod_revision, v.meta.version,
            )
            if probe is not None:
                resp.lease = probe.lease
        if probe is not None:
            resp.lease_read = True
        return resp

    def check_intents(self, gid: int, blocking: tuple[bytes, Intent] | None) -> None:
        """Refuse (definite, retryable) a read that `blocking_in_view` found blocked by an
        intent (resolving it meanwhile if it is old)."""
        if blocking is not None:
            key, intent = blocking
            if self.cross is not None:
                self.cross.met(gid, intent)
            raise errors.ProposalDropped(
                f"key {key[:32]!r} is held by transaction {intent.txn} in progress (group {gid}); retry"
            )

    async def read_point(self, gid: int, consistency: int, max_staleness_ms: int = 0) -> ReadPoint:
        """Wait until the group may be read at `consistency` (see reads.py: replicas serve too).
        A linearizable read where this node leads the group is the host's ReadIndex round itself
        (as `KV.Stream`'s gets): what `NodeReads.read` does for it, without its task and futures."""
        if consistency == kv_pb2.LINEARIZABLE:
            g = self.host.groups.get(gid)
            if g is not None and g.core.role == Role.LEADER:
                index = await waiters.read_point(self.host, self.wake, gid, self.cfg.request_timeout)
                if (m := self.reads.metrics) is not None:
                    m.served(LINEARIZABLE, "leader")
                return ReadPoint(index, 0.0, LINEARIZABLE)

        def leader_read() -> Awaitable[int]:
            return waiters.read_point(self.host, self.wake, gid, self.cfg.request_timeout)

        return await self.reads.read_point(gid, consistency, max_staleness_ms, leader_read, self.wake)

    async def get(self, request: kv_pb2.GetRequest) -> kv_pb2.GetResponse:
        """A whole read, every failure in the reply (`KV.Get`, and the stream's slow reads)."""
        try:
            self.check_key(request.key)
            self.check_read_revision(request.revision)
            check_with_lease(request)
            self.allow(request.key, READ)
            gid = self.group_for(request.key)
            point = await self.read_point(gid, request.consistency, request.max_staleness_ms)
            point = await self.closed_point(gid, request.revision, point)
            return self.get_reply(gid, request.key, point, request.revision, request.with_lease)
        except errors.KVError as err:
            return kv_pb2.GetResponse(error=self.err(err))
        except Exception as err:  # a bug: this request fails (INTERNAL), nobody else's does
            return kv_pb2.GetResponse(error=self.err(self.internal("Get", err)))

    # --- reads at a revision: exact across groups (kvstore.node.closes) -----------------------
    def check_read_revision(self, revision: int) -> None:
        """A read's revision: 0 (now) or a positive revision no more than the clock-uncertainty
        bound ahead of this node's clock (definite INVALID_ARGUMENT otherwise)."""
        check_revision(revision)
        if revision:
            self.closes.check(revision)

    def needs_close(self, gid: int, revision: int) -> bool:
        """Is a read of `gid` at `revision` here not final yet (its applied last is below it)?"""
        return bool(revision) and self.closes.last(gid) < revision

    async def closed_point(self, gid: int, revision: int, point: ReadPoint) -> ReadPoint:
        """`point`, or, if a read at `revision` is not final here yet, the point after closing
        the group at `revision` through its log (and applying the close here). Definite errors
        (a read has no effects): a close that was not confirmed in time is a TIMEOUT."""
        if not self.needs_close(gid, revision):
            return point
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

        def done(err: errors.KVError | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(None)

        self.closes.ensure_closed(gid, revision, self.reads.logic, self._forward_close, done)
        self.wake()
        timeout = self.cfg.request_timeout
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise errors.Timeout(
                f"group {gid} was not closed at revision {revision} within {timeout:g}s", indeterminate=False
            ) from None
        return ReadPoint(self.store.applied_index(gid), point.staleness, point.level)

    def _forward_close(self, gid: int, revision: int, callback: Callable[[int, errors.KVError | None], None]) -> None:
        """Have `gid`'s leader (elsewhere) close it at `revision` (`Shard.GroupPropose`, which
        the leader checks against its clock and coalesces); `callback(last, err)`."""
        if self.caller is None:
            callback(0, errors.NoLeader(f"node {self.cfg.id} cannot reach group {gid}'s leader to close it"))
            return
        task = asyncio.ensure_future(
            self.caller.propose(gid, commands.encode_close(revision), timeout=self.cfg.request_timeout)
        )
        self._forwards.add(task)

        def finished(t: asyncio.Task[ApplyResult]) -> None:
            self._forwards.discard(t)
            if t.cancelled():
                callback(0, errors.Unavailable(f"the close of group {gid} was cancelled"))
            elif isinstance(exc := t.exception(), errors.KVError):
                callback(0, exc)
            elif exc is not None:
                callback(0, self.internal("close", exc, indeterminate=False))
            elif (res := t.result()).error:
                callback(0, errors.InvalidArgument(f"group {gid} refused the close: {res.error}"))
            else:
                callback(res.revision, None)
            self.wake()

        task.add_done_callback(finished)

    # --- scans ------------------------------------------------------------------------------
    async def scan_once(self, request: kv_pb2.ScanRequest) -> kv_pb2.ScanResponse:
        """A scan answered in ONE message (for `KV.Stream`): the whole part, from one read
        transaction, if it fits in one chunk; otherwise `more=True` and no items (nothing of it
        is served: the client asks again with `KV.Scan`)."""
        try:
            msg, stream = await self.scan_start(request)
            try:
                first = next(stream, None)
                if first is not None and next(stream, None) is not None:
                    return kv_pb2.ScanResponse(more=True)
            except StorageError as err:
                raise errors.Unavailable(f"scan interrupted on node {self.cfg.id}: {err}") from err
            finally:
                stream.close()
        except errors.KVError as err:
            return kv_pb2.ScanResponse(error=self.err(err))
        except Exception as err:
            return kv_pb2.ScanResponse(error=self.err(self.internal("Scan", err)))
        if first is not None:
            add_items(msg, first)
        msg.more = False
        self.metrics.reads.inc()
        return msg

    async def scan_start(
        self, request: kv_pb2.ScanRequest
    ) -> tuple[kv_pb2.ScanResponse, ReadStream[list[tuple[bytes, mvcc.Version]]]]:
        """Check the request, wait for its read point and open the scan: the first message (the
        ranges served and where the scan is served, more=True, no items) and the chunks."""
        for name in ("prefix", "start", "end"):
            bound = getattr(request, name)
            if len(bound) > self.cfg.limits.max_key:
                raise errors.KeyTooLarge(message=(
                    f"scan {name} of {len(bound)} bytes is longer than the longest key ({self.cfg.limits.max_key})"
                ))
        self.check_read_revision(request.revision)
        if request.prefix:
            start, end = request.prefix, prefix_end(request.prefix)
        else:
            start, end = request.start, request.end or None
        if self.guard is not None:
            self.guard.check_range(start, end, READ)
        gid = request.group
        if gid == 0 or gid not in self.host.groups:
            raise self.wrong_shard(f"group {gid} is not on node {self.cfg.id}")
        point = await self.read_point(gid, request.consistency, request.max_staleness_ms)
        point = await self.closed_point(gid, request.revision, point)
        st = self.store.shard_state(gid)
        owned = st.active if st is not None else IntervalSet.full()
        rst, stream, blocking = open_scan(self.store.revisions, gid, start, end, request.limit or 0, request.revision, owned)
        try:
            self.check_intents(gid, blocking)
        except errors.KVError:
            stream.close()
            raise
        msg = kv_pb2.ScanResponse(more=True, owned_lo=[a for a, _ in owned], owned_hi=[b for _, b in owned])
        _scan_meta(msg, point, self.cfg.id)
        msg.revision = served_at(request.revision, rst)
        return msg, stream


def blocking_in_view(gid: int, probe: IntentProbe, served: int) -> tuple[bytes, Intent] | None:
    """The intent that blocks a read served at `served` (None: the answer is final): one on a
    read key prepared at or below `served`, whose commit may still write there (at R >= the
    prepared revision). `probe` holds the intents of the read's OWN view: an intent looked up in
    a later view could be gone, its COMMIT applied after the data was read, and the read would
    return one side of a transaction across groups. Raises a definite InternalError on a
    corrupt intent row."""
    try:
        return xlogic.blocking_intent(probe.rows, served)
    except ValueError:
        raise errors.InternalError(f"group {gid} holds a corrupt intent row", indeterminate=False) from None


WITH_LEASE_AT_REVISION = ("a Get with_lease reads the current version only (a key's lease is kept for its current "
                          "version): no revision")


def check_with_lease(request: kv_pb2.GetRequest) -> None:
    """A Get's with_lease asks for a current read (definite INVALID_ARGUMENT with a revision)."""
    if request.with_lease and request.revision:
        raise errors.InvalidArgument(WITH_LEASE_AT_REVISION)


def read_version(revisions: RevisionReads, gid: int, key: bytes, revision: int,
                 lease: leases.LeaseProbe | None = None,
                 ) -> tuple[mvcc.Version | None, mvcc.RevState, tuple[bytes, Intent] | None]:
    """`key`'s version in `gid` at `revision` (0: now), the view's revision state and the intent
    that blocks the answer (`blocking_in_view`), and (into `lease`, if given) the lease the key
    is attached to, all from one read view."""
    probe = IntentProbe(xlogic.READ_INTENTS_MAX)
    try:
        v, st = revisions.get_version(gid, key, revision, probe, lease)
    except mvcc.Compacted as err:
        raise errors.Compacted(compact_revision=err.compact_revision) from None
    return v, st, blocking_in_view(gid, probe, served_at(revision, st))


def open_scan(
    revisions: RevisionReads, gid: int, start: bytes, end: bytes | None, limit: int, revision: int,
    owned: IntervalSet,
) -> tuple[mvcc.RevState, ReadStream[list[tuple[bytes, mvcc.Version]]], tuple[bytes, Intent] | None]:
    """Open a scan of [start, end) in `gid` at `revision` (0: now): the view's revision state,
    its chunks and the intent that blocks it (`blocking_in_view`), all from one read view (the
    caller closes the stream)."""
    probe = IntentProbe(xlogic.READ_INTENTS_MAX)
    try:
        rst, stream = revisions.scan_versions(
            gid, start, end, limit, revision, SCAN_CHUNK_ITEMS, SCAN_CHUNK_BYTES, owned, probe
        )
    except mvcc.Compacted as err:
        raise errors.Compacted(compact_revision=err.compact_revision) from None
    try:
        return rst, stream, blocking_in_view(gid, probe, served_at(revision, rst))
    except errors.KVError:
        stream.close()
        raise


def _has_put(t: txn.Txn) -> bool:
    """Whether `t` may put a key (one that only deletes frees space: NOSPACE does not refuse it)."""
    return any(
        op.kind == txn.OpKind.PUT or (op.txn is not None and _has_put(op.txn)) for op in (*t.success, *t.failure)
    )


def _encode(encoder: Callable[..., bytes], *args: Any) -> bytes:
    """A command from checked request fields; whatever the encoder still refuses is the request's
    fault: a definite INVALID_ARGUMENT, never a raw ValueError."""
    try:
        return encoder(*args)
    except ValueError as err:
        raise errors.InvalidArgument(f"invalid request: {err}") from None


SCAN_CHUNK_ITEMS = 512
SCAN_CHUNK_BYTES = 256 << 10
"""A scan reply message holds at most about this many items / bytes."""


def check_revision(revision: int) -> None:
    """A read's revision: 0 (now) or a positive int64 (definite INVALID_ARGUMENT otherwise)."""
    if revision < 0:
        raise errors.InvalidArgument(f"revision {revision} is negative")


def served_at(revision: int, st: mvcc.RevState) -> int:
    """The revision a read was served at: the one asked for, or (a read of the current state) the
    group's last revision (0 while the group has written nothing). See docs/REVISIONS.md for
    what a revision above the group's last one means across groups."""
    return revision or st.last


def add_items(msg: kv_pb2.ScanResponse, chunk: list[tuple[bytes, mvcc.Version]]) -> None:
    """Append a chunk of (key, version) to a scan reply."""
    add = msg.items.add  # in place: no KeyValue objects to build and then copy
    for k, v in chunk:
        m = v.meta
        add(key=k, value=v.value, create_revision=m.create_revision, mod_revision=m.mod_revision, version=m.version)


def _scan_meta(resp: kv_pb2.ScanResponse, point: ReadPoint, node_id: int) -> None:
    """Where the scan was served: on the first message of the stream."""
    resp.index = point.index
    resp.staleness_ms = point.staleness_ms
    resp.node_id = node_id


