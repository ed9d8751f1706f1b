"""Leases in the whole-node simulator: the real lease clock (`kvstore/node/lessor.py`) on every
node, under the simulator's crashes, partitions, message loss and clock faults, checked for early
expiry and for expiry within the stated bound.

The shell part (what `kvstore/server/` does in a real node) is here: every node steps a `Lessor`
per data group every few milliseconds of its own clock, with the term it leads the group in
(`Host.leads_current`, else 0) and the group's applied lease records from its store, and proposes
what comes out at the leader of the target group. Each node's lease clock DRIFTS: local time =
offset + (1 + d) * true time with |d| <= `DRIFT` (the lessor is told rho = DRIFT).

Clients grant `LEASES` leases of `TTL_S` seconds in random home groups, attach two keys to each
(the first by a TXN whose put carries the lease, `txn.PUT_LEASE`, the second by LEASE_PUT, in
whatever groups the keys hash to), and keep them alive (RENEW through the log)
every 400 ms or 1.5 s (`KEEPALIVE_MS`); each client stops at a random time (after a last
keep-alive retried until answered; its home group's leadership is then transferred late in the
lease's life), one never does.

Checked (`LeaseViolation`):
- no early expiry: a lease is never seen REVOKED or forgotten (polled every `POLL_MS` on every live node)
  before t + TTL, t the send time of its grant or of any RENEW acknowledged as applied (found);
- expiry within the bound: a lease whose client stopped is revoked by t_last + TTL(1+rho)/(1-rho)
  + `SLACK_MS` + the time its home group had no current leader + (leader changes after t_last)
  * (checkpoint interval + scan interval) (the module docstring of `lessor.py`; an election's
  time is in the leaderless time),
  checked once the simulation healed;
- keys: at the end every key attached to a revoked lease is gone at the leader of the group
  that serves it then (with `--moves on`, often another group than it was attached in: a range
  move carries the attachment; a planted INSTALL that drops it, `node-install-drops-attachments`,
  is found), and a lease whose client never stopped still has its record LIVE;
- atomicity: the two keys of a lease (usually in two groups) that were deleted were deleted at
  ONE revision (`check_atomic`, from the revision checker's applied histories, where a
  COMMIT's deletes are placed at R): the lease clock's EXPIRE runs, with several data groups,
  as one two-phase commit (`_delete_across`, the pair workload's driver `CrossPairs` with
  `xtxn.plan_lease`; its coordinator may die, its intents and lease locks are resolved by the
  sweep). Deleting per group (`node-lease-partial-delete`) is found;
- with the pair transactions on as well (`--txn-pairs on`), each lease's second key is rewritten
  without the lease by a cross-group transaction (the pair workload's two-phase commit driver)
  after its attach: its COMMIT detaches the key, so no lease deletion may delete that write (the
  revision checker's history of the key never has the transaction's version followed directly
  by a deletion; `check_rewrites`). A planted COMMIT that leaves the key attached
  (`node-xtxn-commit-keeps-lease`) is found.
- orphans: with range moves on, a lease's deletion across groups plans over the data groups
  of the map read when it was granted (`STALE_MAP`: a coordinator whose map lags), so a key a
  move took to a group added since stays attached to the dead lease until the orphan sweep
  (`kvstore/node/orphans.py`, each data group's leader every `SWEEP` period) deletes it; the
  end check above finds it otherwise (`--plant lease-no-orphan-sweep`, seed 1019 with
  `--moves on`). Such a key is deleted at the sweep's revision, not the deletion's: the
  atomicity check leaves out the groups the plan left out.
- leased puts across groups (`run_node_seed(..., lease_txns=True)`): half the clients attach
  both keys of their lease in ONE transaction across groups (leased puts with the `checked`
  stamp of the coordinator's clock; `_attach_across`, through the lease deletions' two-phase
  commit driver), so the checks above cover those attachments: a planted COMMIT that writes the
  key without attaching it (`node-xtxn-commit-drops-attachment`) is found (a key of a dead lease
  still present).
`python -m chaos.sim --leases on` runs it (a fixed fifth of the seeds by default: `leases_by_default`).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvstore import errors
from kvstore.node import lessor as lessor_logic
from kvstore.node import xtxn as xlogic
from kvstore.node.lessor import Lessor, LessorParams, Proposal
from kvstore.node.orphans import OrphanSweep, Probe, SweepParams, status_of
from kvstore.storage import commands, leases, mvcc, txn
from kvstore.storage.commands import ApplyResult
from kvstore.storage.leases import Kind, LeaseCmd

from .xtxn_pairs import CrossPairs

LEASES = 4
TTL_S = 2
KEEPALIVE_MS = (400, 1_500)
"""A client keeps its lease alive every 400 ms, or every 1.5 s (close to the TTL: its renewals
race the leader's expiry whenever one is lost)."""
STEP_MS = 10
POLL_MS = 5
DRIFT = 0.2
"""The nodes' lease clocks run up to 20% fast or slow (the simulator's tick skew is as large)."""
PARAMS = LessorParams(drift=DRIFT, scan_interval_ms=20, checkpoint_interval_ms=1_000, retry_ms=150)
"""Checkpoints every second (light: the simulated cluster replicates small appends slowly)."""
REWRITE = 1.0
"""With the pair transactions on, the chance that a lease's second key is rewritten without the
lease by a cross-group transaction after its attach (`SimLeases._rewrite`)."""
REWRITTEN = b"tx"
SETTLE_MS = 1_500
"""The end check looks only at leases revoked at least this long ago (their deletion done)."""
SLACK_MS = 300
"""Scan, commit and retry latencies after a deadline (generous: the simulated network loses and
delays messages)."""


def _records(store: Any, group: int) -> Callable[[], list[tuple[int, leases.Record]]]:
    def read() -> list[tuple[int, leases.Record]]:
        out: list[tuple[int, leases.Record]] = store.revisions.read_rows(group, leases.iter_records)
        return out
    return read


def _page(store: Any, group: int) -> Callable[[int, int], list[int]]:
    def read(after: int, limit: int) -> list[int]:
        out: list[int] = store.revisions.read_rows(group, lambda rows: leases.attached_page(rows, after, limit))
        return out
    return read


def _const(groups: list[int]) -> Callable[[], list[int]]:
    return lambda: groups


_WRITES = frozenset({commands.Op.LEASE_PUT, commands.Op.LEASE_REVOKE, commands.Op.LEASE_EXPIRE,
                     commands.Op.LEASE_DROP, commands.Op.LEASE_FORGET, commands.Op.LEASE_ORPHAN,
                     commands.Op.TXN})
SWEEP = SweepParams(period_ms=300, page=64, answer_timeout_ms=1_000)
"""The orphan sweep's pace in the simulator (each data group's leader, `kvstore/node/orphans.py`)."""
STALE_MAP = 1.0
"""With range moves on, the chance that a lease's deletion across groups is planned over the data
groups of the map read when the lease was granted (a coordinator whose map lags: a group added
and filled by a move since is left out, issue 17's gap A; the orphan sweep deletes its keys).
Groups removed since are not planned over (a PREPARE there would never answer)."""


def _checked_at(t: txn.Txn, revision: int) -> txn.Txn:
    """`t` with every leased put's `checked` set to `revision` where it was 0."""
    def op(o: txn.TxnOp) -> txn.TxnOp:
        if o.lease and not o.checked:
            return dataclasses.replace(o, checked=revision)
        return dataclasses.replace(o, txn=_checked_at(o.txn, revision)) if o.txn is not None else o
    return txn.Txn(t.compares, tuple(map(op, t.success)), tuple(map(op, t.failure)))


class LeaseViolation(AssertionError):
    """A lease expired early, or not within the bound."""


def leases_by_default(seed: int) -> bool:
    return random.Random(f"leases:{seed}").random() < 0.2


@dataclass(slots=True)
class LeaseStats:
    granted: int = 0
    renewed: int = 0
    attached: int = 0
    attached_by_txn: int = 0
    """Of `attached`: by a TXN's leased put (each client's first key)."""
    attached_across: int = 0
    """Leases whose two keys (in two groups) one transaction across groups attached (answered)."""
    expired: int = 0
    kept: int = 0
    """Leases kept alive to the end (never expired)."""
    checked_bound: int = 0
    rewrites: int = 0
    """Cross-group transactions started over an attached key (`SimLeases._rewrite`)."""
    cross_deletions: int = 0
    """Lease deletions across groups (two-phase commits) that reached their COMMITs."""
    atomic_checked: int = 0
    """Leases whose keys in two groups were checked deleted at one revision."""
    moved_checked: int = 0
    """Keys of expired leases checked gone in another group than they were attached in (a range
    move carried them with their attachment)."""
    stale_plans: int = 0
    """Lease deletions across groups planned over a stale map that left a data group out."""
    orphans_swept: int = 0
    """Keys the orphan sweep deleted (LEASE_ORPHANs that applied, as answered)."""


@dataclass(slots=True)
class _Client:
    lid: int
    keys: list[bytes]
    stop_at: int
    every: int
    granted_at: int = -1
    held_until: int = 0
    """The latest t + TTL over acknowledged grants and renews (true ms)."""
    last_ack_send: int = -1
    last_sent: int = -1
    """The send time of the last grant or renew that may have applied (acknowledged or not)."""
    revoked_at: int = -1
    changes_after_stop: int = 0
    leaderless_ms: int = 0
    rewritten: set[bytes] = field(default_factory=set)
    """Keys a cross-group transaction may have rewritten without the lease (`SimLeases._rewrite`):
    the lease's deletion leaves them."""
    attached_in: dict[bytes, int] = field(default_factory=dict)
    """key -> the group it was attached in (a range move carries the attachment: a key moved away
    since is checked in the group that serves it at the end)."""
    stale_map: list[int] | None = None
    """The data groups when granted, if this lease's deletion plans over that map (`STALE_MAP`)."""
    left_out: set[int] = field(default_factory=set)
    """Data groups a deletion plan over the stale map left out (their keys are the sweep's: not
    deleted at the deletion's revision)."""


@dataclass(slots=True)
class _Own:
    """What `CrossPairs` needs of its owner: the simulator, a random source of its own (the lease
    clients' sequence stays as it was), and where answers go."""

    sim: Any
    rng: random.Random
    leases: SimLeases

    def answered_cross(self, t: txn.Txn | None, r: txn.TxnResult, revision: int) -> None:
        c = self.leases.attaching.pop(t, None) if t is not None else None
        if c is None:
            self.leases.stats.cross_deletions += 1
        elif r.succeeded:
            self.leases.attached_across(c)

    def finished_record(self) -> None:
        """The record sweep finished a lease deletion's record (nothing to count here)."""


@dataclass(slots=True)
class SimLeases:
    sim: Any
    rng: random.Random = field(init=False)
    clients: list[_Client] = field(default_factory=list)
    lessors: dict[tuple[int, int], Lessor] = field(default_factory=dict)
    drift: dict[int, float] = field(default_factory=dict)
    stats: LeaseStats = field(default_factory=LeaseStats)
    _leaders: dict[int, int] = field(default_factory=dict)
    cross: CrossPairs = field(init=False)
    """The two-phase commit driver of the lease deletions across groups (the shell's `CrossTxns`)."""
    _deleting: dict[int, int] = field(default_factory=dict)
    """lease -> when its last deletion attempt across groups started (one at a time per lease)."""
    sweeps: dict[tuple[int, int], OrphanSweep] = field(default_factory=dict)
    """(node, data group) -> that node's orphan sweep of the group (it sweeps while it leads it)."""
    across: bool = False
    """Half the clients attach both keys in one transaction across groups (`_attach_across`)."""
    attaching: dict[txn.Txn, _Client] = field(default_factory=dict)
    """A leased-put transaction in flight -> its client (its answer marks the keys attached)."""

    across_rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"leases-run:{self.sim.seed}")
        self.across_rng = random.Random(f"leases-across:{self.sim.seed}")
        self.cross = CrossPairs(_Own(self.sim, random.Random(f"leases-cross:{self.sim.seed}"), self))

    # --- clocks -----------------------------------------------------------------------------
    def local_ms(self, node: Any) -> float:
        d = self.drift.setdefault(node.id, self.rng.uniform(-DRIFT, DRIFT))
        return node.offset_ms + (1 + d) * self.sim.now

    def start(self) -> None:
        self.sim.at(self.rng.randrange(150, 300), self._setup)
        self.sim.at(STEP_MS, self._step_all)
        self.sim.at(POLL_MS, self._poll)
        self.cross.start_sweep()

    def _smap(self) -> Any:
        for n in sorted(self.sim.nodes.values(), key=lambda n: n.id):
            if n.logic is not None and n.logic.shard_tracker.map is not None:
                return n.logic.shard_tracker.map
        return None

    def _setup(self) -> None:
        smap = self._smap()
        if smap is None:
            self.sim.at(50, self._setup)
            return
        groups = smap.data_groups()
        end = self.sim.p.fault_ms + self.sim.p.heal_ms
        for i in range(LEASES):
            lid = leases.make_id(self.rng.choice(groups), self.rng.getrandbits(62))
            stop = end + 10**9 if i == 0 else self.rng.randrange(300, max(400, end - 3000))
            c = _Client(lid, [b"lease%d/a" % i, b"lease%d/b" % i], stop, self.rng.choice(KEEPALIVE_MS))
            if self.sim.moves is not None and self.rng.random() < STALE_MAP:
                c.stale_map = list(groups)
            self.clients.append(c)
            self._grant(c, 0)

    # --- proposing at a group's leader (the shell's forwarding) --------------------------------
    def _leader(self, group: int) -> Any:
        for n in self.sim.nodes.values():
            if n.logic is not None and not n.removed and n.logic.host.leads_current(group):
                return n
        return None

    def _propose(self, group: int, cmd: commands.Command, done: Any) -> None:
        """Propose `cmd` at `group`'s leader; a write (LEASE_PUT, and the deletions of REVOKE,
        EXPIRE, DROP) gets the revision that node's hybrid clock proposes, as the server's."""
        node = self._leader(group)
        if node is None:
            self.sim.at(1, done, None)
            return
        if cmd.op in _WRITES:
            cmd = dataclasses.replace(cmd, revision=self.sim._clock(node).propose())
        if cmd.lease is not None and cmd.lease.kind == Kind.PUT and not cmd.lease.checked:
            # the simulated clients attach only to a lease they hold (granted, not revoked by
            # them): checked now, at the proposing node's clock, as the server fills it
            cmd = dataclasses.replace(cmd, lease=dataclasses.replace(cmd.lease, checked=cmd.revision))
        if cmd.txn is not None and txn.has_lease(cmd.txn):  # likewise a TXN's leased put
            cmd = dataclasses.replace(cmd, txn=_checked_at(cmd.txn, cmd.revision))
        data = commands.encode_command(cmd)
        answered = False

        def cb(res: ApplyResult | None, err: errors.KVError | None) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            done(res if err is None else None)

        def lost() -> None:
            if not answered:
                cb(None, errors.Timeout("lost", indeterminate=True))

        try:
            node.logic.host.propose(group, data, cb)
        except errors.KVError as err:
            self.sim.at(1, cb, None, err)
            return
        self.sim.at(self.sim.p.client_timeout_ms // 3, lost)
        self.sim.kick(node)

    # --- clients ------------------------------------------------------------------------------
    def _grant(self, c: _Client, n: int) -> None:
        sent = self.sim.now
        data = commands.Command.lease_command(LeaseCmd(Kind.GRANT, c.lid, ttl_s=TTL_S))

        def done(res: ApplyResult | None) -> None:
            if res is not None and res.found:
                c.granted_at = sent
                c.last_sent = max(c.last_sent, sent)
                c.held_until = max(c.held_until, sent + TTL_S * 1000)
                c.last_ack_send = sent
                self.stats.granted += 1
                if self.across and self.across_rng.random() < 0.5:
                    self._attach_across(c, 0)
                else:
                    for k in c.keys:
                        self._attach(c, k, 0)
                self.sim.at(c.every, self._renew, c)
            elif res is not None and res.error == "lease already exists":
                return  # an earlier attempt applied but its answer was lost: this lease is not checked
            elif n < 20:
                self.sim.at(self.rng.randrange(20, 60), self._grant, c, n + 1)

        self._propose(leases.home_group(c.lid), data, done)

    def _attach(self, c: _Client, key: bytes, n: int) -> None:
        smap = self._smap()
        if smap is None or c.revoked_at >= 0:
            return
        by_txn = key == c.keys[0]
        data = (commands.Command.transaction(txn.Txn(success=(txn.TxnOp(txn.OpKind.PUT, key, b"v", lease=c.lid),)))
                if by_txn else commands.Command.lease_command(LeaseCmd(Kind.PUT, c.lid), key, b"v"))

        def done(res: ApplyResult | None) -> None:
            if res is not None and not res.error:
                self.stats.attached += 1
                self.stats.attached_by_txn += by_txn
                c.attached_in[key] = group
                if key == c.keys[-1] and self.sim.txn_pairs is not None and self.rng.random() < REWRITE:
                    self.sim.at(self.rng.randrange(50, 600), self._rewrite, c, key)
            elif (res is None or res.wrong_shard) and n < 20:
                self.sim.at(self.rng.randrange(20, 60), self._attach, c, key, n + 1)

        group = smap.group_for_key(key)
        self._propose(group, data, done)

    def _attach_across(self, c: _Client, n: int) -> None:
        """Both keys of `c`'s lease put with the lease in ONE transaction, coordinated at a random
        live node over its map (a two-phase commit when the keys are in two groups); each put
        carries the coordinator's clock reading as `checked` (the client holds the lease: as
        `_propose` stamps a LEASE_PUT). Retried while refused or conflicting; its answer marks
        the keys attached (`attached_across`)."""
        live = [x for x in self.sim.nodes.values() if not x.removed and x.logic is not None]
        if c.revoked_at >= 0 or not live or n > 20:
            return
        node = self.across_rng.choice(live)
        smap = node.logic.shard_tracker.map
        if smap is None:
            self.sim.at(self.across_rng.randrange(20, 60), self._attach_across, c, n + 1)
            return
        checked = self.sim._clock(node).propose()
        t = txn.Txn(success=tuple(txn.TxnOp(txn.OpKind.PUT, k, b"v", lease=c.lid, checked=checked) for k in c.keys))
        self.attaching[t] = c

        def retry(m: int) -> None:
            self.attaching.pop(t, None)
            self.sim.at(self.across_rng.randrange(50, 200), self._attach_across, c, m)

        self.cross.attempt(node, t, {k: smap.group_for_key(k) for k in c.keys}, n, retry)

    def attached_across(self, c: _Client) -> None:
        smap = self._smap()
        for k in c.keys:
            c.attached_in[k] = smap.group_for_key(k) if smap is not None else 0
        self.stats.attached += len(c.keys)
        self.stats.attached_across += 1

    def _rewrite(self, c: _Client, key: bytes) -> None:
        """A cross-group transaction puts `key` (attached to the lease) and a companion key in
        another group, without a lease (through the pair workload's two-phase commit driver): the
        COMMIT detaches `key`, so the lease's deletion must never delete this write
        (`check_rewrites`)."""
        smap = self._smap()
        pairs = self.sim.txn_pairs
        if smap is None or pairs is None:
            return
        g = smap.group_for_key(key)
        other = next((k for k in (key + b"/tx%d" % j for j in range(64)) if smap.group_for_key(k) != g), None)
        if other is None:
            return
        self.stats.rewrites += 1
        c.rewritten.add(key)
        t = txn.Txn(success=(txn.TxnOp(txn.OpKind.PUT, key, REWRITTEN), txn.TxnOp(txn.OpKind.PUT, other, REWRITTEN)))
        pairs.cross_attempt(t, {key: g, other: smap.group_for_key(other)}, 0)

    def _renew(self, c: _Client, final: int = 0) -> None:
        """A keep-alive; at `stop_at` the client sends a last one, retried until it is answered
        (so the bound is measured from a renewal known to have applied)."""
        sim = self.sim
        if c.revoked_at >= 0 or (sim.end is not None and sim.now >= sim.end - 100):
            return
        last = sim.now >= c.stop_at
        if last and final > 20:
            return
        sent = c.last_sent = sim.now
        data = commands.Command.lease_command(LeaseCmd(Kind.RENEW, c.lid))

        def done(res: ApplyResult | None) -> None:
            if res is not None and res.found:
                self.stats.renewed += 1
                c.held_until = max(c.held_until, sent + TTL_S * 1000)
                c.last_ack_send = max(c.last_ack_send, sent)
                if last and self.rng.random() < 0.3:  # late in the lease's life, the leadership moves
                    sim.at(int(TTL_S * 1000 * self.rng.uniform(0.6, 0.9)), self._transfer, leases.home_group(c.lid))
            elif last and res is None:
                sim.at(self.rng.randrange(10, 40), self._renew, c, final + 1)

        self._propose(leases.home_group(c.lid), data, done)
        if not last:
            sim.at(c.every, self._renew, c)

    def _transfer(self, group: int) -> None:
        node = self._leader(group)
        if node is not None:
            node.logic.host.transfer_leader(group, 0)
            self.sim.kick(node)

    # --- the shell's lessor loop ----------------------------------------------------------------
    def _step_all(self) -> None:
        sim = self.sim
        smap = self._smap()
        if smap is not None:
            groups = smap.data_groups()
            for n in list(sim.nodes.values()):
                if n.logic is None or n.removed or n.store is None:
                    continue
                host = n.logic.host
                for g in groups:
                    if g not in host.groups:
                        continue
                    lz = self.lessors.get((n.id, g))
                    if lz is None:
                        lz = self.lessors[(n.id, g)] = Lessor(g, PARAMS)
                    term = host.groups[g].core.term if host.leads_current(g) else 0
                    props = lz.step(self.local_ms(n), term, _records(n.store, g), _const(groups))
                    for p in props:
                        if p.cmd.kind == Kind.EXPIRE and lessor_logic.cross_group_deletion(groups):
                            self._delete_across(n, groups, p)
                        else:
                            self._send(lz, p)
                    sw = self.sweeps.get((n.id, g))
                    if sw is None:
                        sw = self.sweeps[(n.id, g)] = OrphanSweep(g, SWEEP)
                    for probe in sw.step(self.local_ms(n), term, _page(n.store, g)):
                        self._probe(sw, probe)
        sim.at(STEP_MS, self._step_all)

    def _delete_across(self, node: Any, groups: list[int], p: Proposal) -> None:
        """The shell's EXPIRE with several data groups: the lease's deletion as one two-phase
        commit coordinated at `node` (the home leader), at most one attempt per lease per client
        timeout (an attempt's intents hold back range moves: no tight retry loop); an aborted
        attempt is retried by the lease clock (its next EXPIRE after that)."""
        lid = p.cmd.lease_id
        if self.sim.now - self._deleting.get(lid, -10**9) < self.sim.p.client_timeout_ms:
            return
        self._deleting[lid] = self.sim.now
        c = next((c for c in self.clients if c.lid == lid), None)
        if c is not None and c.stale_map is not None:  # a coordinator whose map lags (gap A)
            stale = [g for g in groups if g in c.stale_map]
            if len(stale) > 1 and leases.home_group(lid) in stale and len(stale) < len(groups):
                c.left_out.update(set(groups) - set(stale))
                self.stats.stale_plans += 1
                groups = stale
        plan = xlogic.plan_lease(groups, lid, p.cmd.renews)
        self.cross.attempt(node, None, {}, 0, lambda _n: None, plan=plan)

    def _send(self, lz: Lessor, p: Proposal) -> None:
        data = commands.Command.lease_command(p.cmd)

        def done(res: ApplyResult | None) -> None:
            lz.on_outcome(p, res is not None and not res.error)

        self._propose(p.group, data, done)

    def _probe(self, sw: OrphanSweep, probe: Probe) -> None:
        """The shell of the orphan sweep (`kvstore/server/orphan_sweep.py`): the probe's
        LEASE_STATUS at the home's leader, then the LEASE_ORPHAN it asks for in the group."""
        def dropped(res: ApplyResult | None) -> None:
            ok = res is not None and not res.error
            if ok and res is not None and res.current:
                self.stats.orphans_swept += int.from_bytes(res.current, "big")
            sw.on_dropped(probe.lease_id, ok)

        def answered(res: ApplyResult | None) -> None:
            status = None if res is None else status_of(res.found, res.error, res.current)
            cmd = sw.on_status(probe, status)
            if cmd is not None:
                self._propose(sw.group, commands.Command.lease_command(cmd), dropped)

        self._propose(probe.home, commands.Command.lease_command(probe.command()), answered)

    # --- checks -------------------------------------------------------------------------------
    def _poll(self) -> None:
        sim = self.sim
        for c in self.clients:
            if c.granted_at < 0 or c.revoked_at >= 0:
                continue
            home = leases.home_group(c.lid)
            lead = self._leader(home)
            prev = self._leaders.get(home, 0)
            cur = lead.id if lead is not None else 0
            if sim.now > c.last_sent:
                if cur == 0:
                    c.leaderless_ms += POLL_MS
                elif cur != prev:
                    c.changes_after_stop += 1
            for n in sim.nodes.values():
                if n.logic is None or n.store is None:
                    continue
                rec = n.store.revisions.read_rows(home, lambda rows, lid=c.lid: leases.get_record(rows, lid))
                gone = rec is not None and rec.state == leases.REVOKED
                if not gone and rec is None and n.logic.host.groups.get(home) is not None:
                    gone = n.store.revisions.read_rows(
                        home, lambda rows, lid=c.lid: rows.get(leases.T_LEASES, leases.tomb_key(lid)) is not None)
                if gone:
                    c.revoked_at = sim.now
                    self.stats.expired += 1
                    if sim.now < c.held_until:
                        raise LeaseViolation(
                            f"lease {c.lid:x} expired at {sim.now} ms (seen on n{n.id}), before {c.held_until} ms: "
                            f"a keep-alive sent at {c.held_until - TTL_S * 1000} ms was acknowledged"
                        )
                    break
        for home in {leases.home_group(c.lid) for c in self.clients}:
            lead = self._leader(home)
            self._leaders[home] = lead.id if lead is not None else 0
        self._check_bound()
        sim.at(POLL_MS, self._poll)

    def _bound(self, c: _Client) -> float:
        rho = DRIFT
        p = PARAMS
        per_change = (p.checkpoint_interval_ms + p.scan_interval_ms) * (1 + rho) / (1 - rho)
        return (c.last_sent + TTL_S * 1000 * (1 + rho) / (1 - rho) + SLACK_MS + c.leaderless_ms
                + c.changes_after_stop * per_change)

    def _check_bound(self) -> None:
        sim = self.sim
        if sim.healed_at is None:
            return
        for c in self.clients:
            if c.granted_at < 0 or c.revoked_at >= 0 or sim.now <= c.stop_at:
                continue
            b = self._bound(c)
            if sim.now > b and b > sim.healed_at + SLACK_MS:
                raise LeaseViolation(
                    f"lease {c.lid:x} not expired at {sim.now} ms: its last keep-alive was sent at {c.last_sent} "
                    f"ms, bound {b:.0f} ms ({c.changes_after_stop} leader changes, {c.leaderless_ms} ms leaderless)"
                )

    def check_rewrites(self) -> None:
        """No lease deletion deletes a value a cross-group transaction wrote without the lease:
        in every key's applied history (the revision checker's), a version written by `_rewrite`
        is never followed directly by a deletion (only the lease's deletion deletes these keys;
        a later LEASE_PUT retry would attach it again first)."""
        for c in self.clients:
            for key in c.keys:
                vs = self.sim.revisions.versions.get(key, [])
                for (r1, v1), (r2, v2) in itertools.pairwise(vs):
                    if v1 == REWRITTEN and v2 is None:
                        raise LeaseViolation(
                            f"key {key!r}, written without a lease by a cross-group transaction at {r1}, was "
                            f"deleted at {r2} by the deletion of lease {c.lid:x} it was attached to before"
                        )

    def check_atomic(self) -> None:
        """A lease's deletion is atomic across groups: the keys of one lease that were deleted
        (in the applied histories of the revision checker; only their lease's deletion deletes
        them) were all deleted at ONE revision, so no read at any revision sees some deleted and
        others not."""
        for c in self.clients:
            firsts: dict[bytes, int] = {}
            for key in c.keys:
                if key in c.rewritten or c.attached_in.get(key) is None:
                    continue
                dels = [r for r, v in self.sim.revisions.versions.get(key, [])
                        if v is None and r % mvcc.STEP not in {mvcc.slot_of(g) for g in c.left_out}]
                if dels:
                    firsts[key] = dels[0]
            if len(set(firsts.values())) > 1:
                raise LeaseViolation(
                    f"lease {c.lid:x}'s keys were deleted at different revisions: "
                    + ", ".join(f"{k!r} at {r}" for k, r in sorted(firsts.items()))
                )
            if len(firsts) > 1 and len({c.attached_in[k] for k in firsts}) > 1:
                self.stats.atomic_checked += 1

    def moved_key_settling(self) -> bool:
        """Whether a lease revoked less than `SETTLE_MS` ago has a key that a range move took to
        another group than it was attached in (the end check would skip it)."""
        smap = self._smap()
        if smap is None:
            return False
        return any(0 <= self.sim.now - c.revoked_at < SETTLE_MS and c.revoked_at >= 0
                   and any(k in c.attached_in and k not in c.rewritten and smap.group_for_key(k) != c.attached_in[k]
                           for k in c.keys)
                   for c in self.clients)

    def check_end(self) -> None:
        """At the end: kept leases live; every key of an expired lease gone where caught up; no
        transaction's write deleted by a lease (`check_rewrites`)."""
        sim = self.sim
        self.check_rewrites()
        self.check_atomic()
        for c in self.clients:
            if c.granted_at < 0:
                continue
            if c.stop_at > sim.now and c.revoked_at < 0:
                self.stats.kept += 1
            if c.revoked_at >= 0 and c.revoked_at < c.held_until:
                raise LeaseViolation(f"lease {c.lid:x} expired early")
            if c.revoked_at >= 0:
                self.stats.checked_bound += 1
            if c.revoked_at < 0 or sim.now - c.revoked_at < SETTLE_MS or sim.healed_at is None:
                continue
            smap = self._smap()
            for k in c.keys:
                g = smap.group_for_key(k) if smap is not None else 0
                if c.attached_in.get(k) is None or k in c.rewritten:
                    continue  # never attached, or rewritten without the lease
                if c.attached_in[k] != g:
                    self.stats.moved_checked += 1  # a move carried it with its attachment
                lead = self._leader(g)
                if lead is not None and lead.store is not None and lead.store.get(g, k) is not None:
                    raise LeaseViolation(
                        f"key {k!r} of lease {c.lid:x} (revoked at {c.revoked_at} ms) is still present on n{lead.id}, "
                        f"the leader of group {g}, at {sim.now} ms"
                    )
