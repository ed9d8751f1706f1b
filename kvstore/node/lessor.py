"""The home-group leader's lease clock: when a lease expires, checkpoints of remaining TTLs, and
the deletion of a revoked lease's keys in every data group. Synchronous and pure: the node's
monotonic clock (`now_ms`), the group's applied lease records and its data groups are handed in;
what to propose comes out (`Proposal`s), and the shell feeds back their outcomes.

Only a leader that has applied an entry of its own term (`Host.leads_current`) decides anything:
its applied state then holds every RENEW committed before its term. Followers never look at their
clocks for leases; expiry happens only when the leader's EXPIRE command applies, on every replica.

Rules (`leases.py` has the commands):
- On taking the lead in term T at local time p (and at every scan, `scan_interval_ms`), every LIVE
  record whose renew count the table does not have yet gets deadline = o + remaining_ms·(1+rho),
  o the local time it was read (o >= the time its entry applied here). A lease whose renew count
  is unchanged keeps its deadline.
- At its deadline the leader proposes EXPIRE(id, renews): it applies only if no RENEW committed
  first (renews unchanged), else it is a no-op and the next scan takes the new renew count.
- Every `checkpoint_interval_ms` it proposes CHECKPOINT(id, renews, ceil((deadline - now)/(1+rho))),
  also conditional on the renew count: the remaining TTL survives a leader change, it is never
  reset to the full TTL (etcd-io/etcd#9395).
- With more than one data group (`cross_group_deletion`), the shell runs an EXPIRE as the lease's
  deletion across groups (`xtxn.plan_lease` with the renew count): it commits only if no RENEW
  applied in the home group before its RECORD (the commit point), which revokes and forgets the
  lease (its record becomes the tombstone: every group's COMMIT deletes the keys and keeps a
  tombstone, so nothing is left to DROP or FORGET) and fixes the revision R at which every group
  deletes the lease's keys. An attempt that aborts (a lock, a lost reply) is retried like a lost
  EXPIRE.
- A REVOKED record (the one-command EXPIRE/REVOKE): DROP(id) to every other data group until
  each applied one, then FORGET(id). The data groups are read again at every scan and before the
  FORGET, so a group added meanwhile (a range move's target) gets its DROP too; a DROP refused
  while an attached key of its group is in a moving range (WRONG_SHARD) is sent again.
- Work per step: the timed leases sit in a heap by the time each is next due (its deadline, its
  next checkpoint, or its EXPIRE's retry), so a step pops only what is due; the applied records
  are read once per `scan_interval_ms`.

The bound. rho (`drift`) is the largest rate error of any node's monotonic clock (offsets do not
matter: only elapsed time on one node's clock is used). Safety: if a RENEW sent by a client at
real time t is applied while the lease is live, the lease's EXPIRE does not apply before t + TTL.
Sketch: the renew applied at some real time a >= t with remaining = TTL. A leader that reads a
record version with remaining r at local time o sets a deadline of o + r(1+rho) local, i.e. at least
r real seconds after o, and o is after that version applied (so after a >= t when r = TTL). A
checkpoint taken at local time c writes r' = ceil((deadline - c)/(1+rho)), so any leader reading it
at o' >= c gets o' + r'(1+rho) >= the old deadline (a checkpoint never shortens a lease); a stale
EXPIRE or CHECKPOINT (renews changed) does not apply. Liveness: after the last renew (applied at
a), a stable leader expires the lease by a + scan_interval + TTL(1+rho)/(1-rho) + one commit; each
leader change adds at most an election (election timeout + the new leader's first commit) plus
`checkpoint_interval_ms` (the age of the newest checkpoint), each scaled by (1+rho)/(1-rho); and
an EXPIRE refused because an attached key of the home group holds a cross-group transaction's
intent (`machine._locked`) is sent again every `retry_ms`, so the lock's lifetime adds to it (at
most the transaction timeout plus the intent sweep's interval when the coordinator died). A DROP
refused the same way stays pending and is sent again. A deletion across groups adds its two-phase
commit's latency (a PREPARE in every data group, then the RECORD) to the one commit, and an
attempt that aborts adds `retry_ms` per retry; safety is unchanged (the RECORD applies only if
the renew count still matches, as the EXPIRE did).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..storage import leases
from ..storage.leases import Kind, LeaseCmd, Record


def deletion_groups(data_groups: Iterable[int]) -> list[int]:
    """The groups a lease's deletion covers: every data group of the shard map (ascending),
    never the metadata group 0 (it holds no keys). The revoke and the expiry both use it."""
    return sorted(set(data_groups) - {0})


def cross_group_deletion(data_groups: Iterable[int]) -> bool:
    """Whether a lease's EXPIRE or REVOKE must run as one transaction across groups (the shell's
    two-phase commit, `xtxn.plan_lease`: every data group deletes the lease's keys at one
    revision R, the home group's RECORD the commit point) rather than as one command of the home
    group: whenever there is more than one data group (a key attached to the lease may be in
    any of them; the home cannot know which)."""
    return len(deletion_groups(data_groups)) > 1


@dataclass(frozen=True, slots=True)
class LessorParams:
    """Timing of the lease clock (node-local settings: they change WHEN a leader proposes, never
    what applies)."""

    drift: float = 0.01
    """rho: the largest clock rate error assumed (0.01 = 1%)."""
    scan_interval_ms: int = 500
    """How often the applied records are read (new leases, renews)."""
    checkpoint_interval_ms: int = 5_000
    """How often a lease's remaining TTL is checkpointed through the log."""
    retry_ms: int = 1_000
    """How long a proposal (EXPIRE, DROP, FORGET) waits for its outcome before it is sent again."""
    max_proposals: int = 1_000
    """At most this many proposals per step (bounded work; the rest wait for the next step)."""

    def __post_init__(self) -> None:
        if not 0 <= self.drift < 0.5:
            raise ValueError(f"drift {self.drift} is not in [0, 0.5)")
        for name in ("scan_interval_ms", "checkpoint_interval_ms", "retry_ms", "max_proposals"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class Proposal:
    """A lease command for the shell to propose to `group`."""

    group: int
    cmd: LeaseCmd


@dataclass(slots=True)
class _Lease:
    renews: int
    deadline: float
    checkpointed: float
    ttl_s: int
    expire_sent: float = -math.inf
    due: float = math.inf
    """When `step` must next look at it (`Lessor._due`); its entry in `Lessor._heap` is the one
    with this time (others for the id are stale)."""


@dataclass(slots=True)
class _Revoked:
    """A REVOKED lease's DROPs: `pending` the data groups still to apply one, `done` those that
    did (a data group that appears later, e.g. the target of a range move that carried a key
    attached to the lease, is added to `pending` at the next scan and before the FORGET)."""

    pending: set[int]
    sent: dict[int, float] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


class Lessor:
    """The lease clock of one home group on one node (see the module docstring). `step` is called
    by the shell on every tick; it does nothing unless `term` is the term this node leads the
    group in with a current view (0: not such a leader)."""

    def __init__(self, group: int, params: LessorParams | None = None) -> None:
        self.group = group
        self.p = params or LessorParams()
        self.term = 0
        self.leases: dict[int, _Lease] = {}
        self._heap: list[tuple[float, int]] = []
        """(due, id) of the timed leases: a step pops only what is due (O(due) per tick, not
        O(leases)); an entry whose lease is gone or has another `due` is stale and skipped."""
        self.revoked: dict[int, _Revoked] = {}
        self._scanned = -math.inf
        self.expired = 0
        """EXPIREs proposed by this node (the shell counts the applied ones)."""

    def remaining_ms(self, lease_id: int, now_ms: float) -> int | None:
        """The lease's remaining TTL as this leader times it (real ms, rounded down), None if it
        is not timing it."""
        le = self.leases.get(lease_id)
        if le is None:
            return None
        return max(0, int((le.deadline - now_ms) / (1 + self.p.drift)))

    def step(
        self,
        now_ms: float,
        term: int,
        records: Callable[[], Iterable[tuple[int, Record]]],
        data_groups: Callable[[], Iterable[int]],
    ) -> list[Proposal]:
        """What to propose now. `records` reads the group's applied lease records; `data_groups`
        the data groups of the shard map (where a revoked lease's keys may be)."""
        if term == 0:
            if self.term:
                self._reset(0)
            return []
        if term != self.term:
            self._reset(term)
        p = self.p
        if now_ms - self._scanned >= p.scan_interval_ms:
            self._scan(now_ms, records(), data_groups)
        out: list[Proposal] = []
        limit = p.max_proposals
        heap = self._heap
        while heap and heap[0][0] <= now_ms and len(out) < limit:
            due, lid = heapq.heappop(heap)
            le = self.leases.get(lid)
            if le is None or le.due != due:
                continue  # stale: the lease is gone, or was scheduled again
            if le.deadline <= now_ms:
                if now_ms - le.expire_sent >= p.retry_ms:
                    le.expire_sent = now_ms
                    self.expired += 1
                    out.append(Proposal(self.group, LeaseCmd(Kind.EXPIRE, lid, renews=le.renews)))
            elif now_ms - le.checkpointed >= p.checkpoint_interval_ms:
                le.checkpointed = now_ms
                rem = math.ceil((le.deadline - now_ms) / (1 + p.drift))
                out.append(Proposal(self.group, LeaseCmd(Kind.CHECKPOINT, lid, renews=le.renews,
                                                         remaining_ms=min(rem, le.ttl_s * 1000))))
            self._schedule(lid, le)
        others: set[int] | None = None  # the other data groups: read once per step, when first needed
        for lid, rv in self.revoked.items():
            if len(out) >= limit:
                break
            if not rv.pending:
                if others is None:
                    others = set(data_groups()) - {0, self.group}
                rv.pending = others - rv.done
            if not rv.pending:
                if now_ms - rv.sent.get(self.group, -math.inf) >= p.retry_ms:
                    rv.sent[self.group] = now_ms
                    out.append(Proposal(self.group, LeaseCmd(Kind.FORGET, lid)))
                continue
            for g in sorted(rv.pending):
                if now_ms - rv.sent.get(g, -math.inf) >= p.retry_ms:
                    rv.sent[g] = now_ms
                    out.append(Proposal(g, LeaseCmd(Kind.DROP, lid)))
        return out

    def on_outcome(self, prop: Proposal, applied: bool) -> None:
        """The outcome of a proposal this lessor made: `applied` if its command applied (any
        result), False if it was refused or lost (it is sent again after `retry_ms`)."""
        c = prop.cmd
        if c.kind == Kind.DROP and applied:
            rv = self.revoked.get(c.lease_id)
            if rv is not None:
                rv.pending.discard(prop.group)
                rv.done.add(prop.group)
        elif c.kind == Kind.FORGET and applied:
            self.revoked.pop(c.lease_id, None)

    def _due(self, le: _Lease) -> float:
        """When `step` must look at `le` next: its deadline or next checkpoint, or once its
        EXPIRE was sent, when that may be sent again."""
        if le.expire_sent > -math.inf:
            return max(le.deadline, le.expire_sent + self.p.retry_ms)
        return min(le.deadline, le.checkpointed + self.p.checkpoint_interval_ms)

    def _schedule(self, lid: int, le: _Lease) -> None:
        le.due = self._due(le)
        heapq.heappush(self._heap, (le.due, lid))
        if len(self._heap) > 4 * len(self.leases) + 64:  # drop the stale entries
            self._heap = [(x.due, i) for i, x in self.leases.items()]
            heapq.heapify(self._heap)

    def _reset(self, term: int) -> None:
        self.term = term
        self.leases.clear()
        self._heap.clear()
        self.revoked.clear()
        self._scanned = -math.inf

    def _scan(self, now_ms: float, recs: Iterable[tuple[int, Record]], data_groups: Callable[[], Iterable[int]]) -> None:
        self._scanned = now_ms
        factor = 1 + self.p.drift
        seen: set[int] = set()
        groups: list[int] | None = None
        for lid, rec in recs:
            seen.add(lid)
            if rec.state == leases.LIVE:
                le = self.leases.get(lid)
                if le is None or le.renews != rec.renews:
                    le = self.leases[lid] = _Lease(rec.renews, now_ms + rec.remaining_ms * factor, now_ms, rec.ttl_s)
                    self._schedule(lid, le)
                continue
            self.leases.pop(lid, None)
            if groups is None:
                groups = sorted(set(data_groups()) - {0, self.group})
            rv = self.revoked.get(lid)
            if rv is None:
                self.revoked[lid] = _Revoked(set(groups))
            else:
                rv.pending.update(g for g in groups if g not in rv.done)
        for lid in [x for x in self.leases if x not in seen]:
            del self.leases[lid]
        for lid in [x for x in self.revoked if x not in seen]:
            del self.revoked[lid]
