"""The multi-raft host: owns a node's Raft groups and runs their Ready loop.

Plain synchronous code. The asyncio driver (`node.py`) calls `tick()` on a timer, `step()` for each
message the transport delivers, `propose()` / `read()` for client requests, and `run_cycle()`
whenever `has_work()`; everything with a socket stays outside.

One cycle (`run_cycle`), run by the one Ready-loop implementation `kvstore.raft.readyloop` (this
module supplies the staging into one store batch, the sending and the answering):
1. collect the Ready of every group that has one;
2. hand the messages that need not wait to the transport;
3. ONE storage call for all groups: persist snapshots, entries and hard states (write-ahead log
   records and one fdatasync), then apply the committed entries in one LMDB write transaction
   (the driver runs this step on a worker thread, so the event loop keeps taking requests,
   which the next cycle batches);
4. hand the remaining messages (vote and append responses) to the transport;
5. answer the waiting clients (writes by (index, term), reads once applied through their index);
6. advance every group.

Writes are answered as soon as step 3 has computed their results (`Cycle.on_applied`, called
from inside the transaction, before its fsync) when that transaction's commit may wait for the
disk (`answers_early`; otherwise in step 5, right after it), not after the transaction is
durable: an entry
being applied is committed (durable on a majority), so its outcome is decided whatever happens
to this node's transaction, and a crash re-applies it from the log with the same result (the
session table makes that deterministic). What the answer must not precede is visibility to
reads, and it does not: a linearizable read waits for the group's applied index, which moves
only in step 6, after the transaction committed.

Invariants:
- a write is answered only after its entry is committed and its result computed by the state
  machine (above); a different term applied at its index means it can never commit: answered as
  definitely failed;
- a read is answered only after a ReadIndex round confirmed leadership and the group has applied
  through that index;
- a retried session write joined to a pending entry (`pending.PendingWrites`: proposed here in
  the current term, the same command) is answered exactly as that entry's write, by the rules
  above; the table of pending writes empties as entries apply, when the group closes and when
  storage fails; a write whose index this node appends at again in a later term (its entry was
  cut off its log by a leader change) leaves it unanswered (its waiters time out, indeterminate);
- a failed storage call (disk full) stops the loop before any dependent message leaves or any
  group advances: the node keeps its last durable state and refuses further work (new
  proposals and reads get a definite STORAGE_FULL) until the same cycle persists.

Recovering from a full disk (no restart): the failed cycle's transaction was aborted entirely
(nothing of it is visible, in LMDB or in the store's in-memory state) and its groups were not
advanced, so their Readys are still outstanding and the cores keep stepping messages meanwhile,
as they do while any cycle is in flight. `retry_cycle` hands the SAME cycle back to be persisted
again (with backoff: every tick at first, at most once a second); once that succeeds,
`end_cycle` finishes it as if nothing had happened and the node serves again. Nothing is lost
(the cycle is the only one not yet durable) and nothing is applied twice (the aborted apply left
no trace; the retry applies the same entries once, with the same results).

What a waiting client gets when the disk fills: a write whose entry was being applied when the
transaction failed may already be answered with its result (it is committed, so its outcome is
decided; see above); every other waiting write fails with an INDETERMINATE INTERNAL error, because
it may have committed on the other nodes and be applied by them (and by this one once it
recovers); waiting reads fail with a definite STORAGE_FULL.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore import errors
from kvstore.node.hosted import HostedMembers
from kvstore.node.pending import PendingWrite, PendingWrites, WriteCallback
from kvstore.node.store import ApplyBatch, GroupWrite, NodeStore
from kvstore.raft import (
    NONE,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    EntryType,
    Message,
    MessageType,
    ProposalDropped,
    RaftError,
    RaftNode,
    Ready,
    Role,
    readyloop,
)
from kvstore.storage.errors import StorageError

log = logging.getLogger("kvstore.host")

ReadCallback = Callable[[int, errors.KVError | None], None]


@dataclass(slots=True)
class RaftSettings:
    tick_ms: int = 100
    election_tick: int = 5
    """Ticks without a leader before a follower campaigns (randomized in [n, 2n)): 500 ms to 1 s
    at the default tick, so a failed leader is replaced within about a second."""
    heartbeat_tick: int = 1
    lease_read: bool = False
    max_inflight_msgs: int = 256
    max_size_per_msg: int = 1 << 20
    compact_threshold: int = 10_000
    """Compact a group's log once it holds this many applied entries."""
    compact_keep: int = 1_000
    """Entries kept behind the applied index after compaction, for slow followers."""
    announce_commit: bool = True
    """Followers learn a new commit index at once when it covers the leader's whole log (see
    `kvstore.raft.core`, "Commit propagation"), not at the next heartbeat."""
    quiesce_ticks: int = 20
    """An idle group stops heartbeating and ticking after this many ticks (0: never). The node's
    own liveness pings (one small batch per peer per tick, whatever the number of groups) wake a
    quiesced group whose leader's node falls silent; see `Host.suspect`."""


@dataclass(slots=True)
class Group:
    id: int
    core: RaftNode
    writes: PendingWrites = field(default_factory=PendingWrites)
    """Writes proposed here and not answered yet, and the retries joined to them (`pending`)."""
    reads: dict[bytes, ReadCallback] = field(default_factory=dict)
    """Reads waiting for their ReadState, by context."""
    ready_reads: list[tuple[int, ReadCallback]] = field(default_factory=list)
    """Reads whose index is known, waiting for the group to apply through it."""


@dataclass(slots=True)
class Cycle:
    """One Ready-loop iteration in flight: the batch to persist and apply, and its outcome."""

    store: NodeStore
    turn: readyloop.Turn[Group]
    writes: list[GroupWrite] = field(default_factory=list)
    applies: list[ApplyBatch] = field(default_factory=list)
    results: list[list[Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    """How long `persist` took, if the driver timed it (the host reads no clock)."""
    on_applied: Callable[[Cycle, list[list[Any]]], None] | None = None
    """Called (on the persist thread, inside the transaction, before its fsync) with the apply
    results, so the driver can have `Host.answer_writes` run early; see the module docstring."""

    @property
    def readies(self) -> list[tuple[Group, Ready]]:
        """The groups in this cycle and their Readies, in the order taken."""
        return [(g, rd) for g, _, rd in self.turn.readies]

    @property
    def sent_early(self) -> bool:
        """Step 2 handed messages to the transport (they may leave before the batch is durable)."""
        return self.turn.sent_early

    def touches_storage(self) -> bool:
        """Has step 3 anything to write or apply? (If not, `persist` is a no-op.)"""
        return bool(self.writes or self.applies)

    def persist(self) -> None:
        """Step 3: the WAL's records and one fdatasync, then one LMDB write transaction, for every
        group (`NodeStore.persist_and_apply`). Thread-safe with
        respect to the host: touches only the store and this cycle."""
        early = self.on_applied
        try:
            self.results = self.store.persist_and_apply(
                self.writes, self.applies, None if early is None else (lambda res: early(self, res))
            )
        except StorageError as err:
            self.error = str(err)


class Host:
    def __init__(
        self,
        node_id: int,
        store: NodeStore,
        send: Callable[[list[Message]], None],
        settings: RaftSettings,
        rng: random.Random,
        members: dict[int, str] | None = None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.send = send
        self.settings = settings
        self.rng = rng
        self.groups: dict[int, Group] = {}
        self.members: dict[int, str] = dict(members or {})
        """node id -> address; initial peers plus every member added at runtime."""
        self.client_addresses: dict[int, str] = {}
        """node id -> client-only address, as the shard map publishes them (kept by `NodeLogic`);
        NOT_LEADER carries the leader's, for clients that connect to client ports."""
        self.failed: str | None = None
        """Why storage failed (the node refuses work until `_failed_cycle` persists), or None."""
        self._failed_cycle: Cycle | None = None
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._ctx = 0
        self.on_leader_change: Callable[[int, int], None] | None = None
        self.on_snapshot_needed: Callable[[Message], None] | None = None
        self.preferred_leader: dict[int, int] = {}
        """group -> the node that should lead it (leader balancing); see `_balance_leaders`."""
        self.balance_every_ticks = 20
        self.balance_backoff_ticks = 300
        self._ticks = 0
        self._balance_next: dict[int, int] = {}
        self._dirty: set[int] = set()
        """Groups that may have a Ready: stepped, proposed to, read, ticked while awake, woken or
        just handled. Only these are asked `has_ready()` (thousands of idle groups cost nothing);
        every `full_scan_ticks` all groups are asked anyway, as a safety net."""
        self.full_scan_ticks = 10
        self.suspected: set[int] = set()
        """Nodes whose liveness pings stopped (see `suspect`)."""
        self.draining = False
        """Set by a drain (`drain_leadership`): TimeoutNow is refused, so leadership is not handed
        back to a node that is leaving."""
        self._drain_tried: dict[int, set[int]] = {}
        """group -> the voters a drain offered its leadership to (each is offered it once)."""
        self.gate: Callable[[bytes], None] | None = None
        """Checks a command before it is proposed and raises a definite KVError to refuse it (the
        cluster-version gate, `kvstore.node.version.CommandGate.check`); None admits everything."""
        self.hosted = HostedMembers()
        self._removed: set[int] = set()
        """Nodes removed by an applied change, still in `members` while some hosted group's
        configuration lists them (see `_forget_removed`)."""
        """The nodes some hosted group's configuration lists (kept current: see `hosted`)."""

    # --- groups -----------------------------------------------------------------------------
    def open_group(self, group: int, bootstrap: ConfState | None, data: Sequence[bytes] = ()) -> Group:
        """Open a group from storage; with `bootstrap`, create it first if it has no state (its
        log then starts with one CONF_CHANGE per member and the commands `data`, all committed)."""
        if group in self.groups:
            return self.groups[group]
        if bootstrap is not None:
            self.store.bootstrap(group, bootstrap, data)
        s = self.settings
        cfg = Config(
            id=self.node_id,
            group=group,
            election_tick=s.election_tick,
            heartbeat_tick=s.heartbeat_tick,
            applied=self.store.applied_index(group),
            lease_read=s.lease_read,
            quiesce_ticks=s.quiesce_ticks,
            announce_commit=s.announce_commit,
            max_inflight_msgs=s.max_inflight_msgs,
            max_size_per_msg=s.max_size_per_msg,
        )
        core = RaftNode(cfg, self.store.log_storage(group), random.Random(self.rng.getrandbits(64)), log)
        g = self.groups[group] = Group(group, core)
        self.hosted.update(group, core.conf)
        self._dirty.add(group)
        return g

    def touch(self, group: int) -> None:
        """`group`'s core was driven outside the host (e.g. a replica ReadIndex): look at it."""
        self._dirty.add(group)

    def suspect(self, silent: set[int]) -> None:
        """The node's liveness view: `silent` nodes sent nothing (not even a ping) for an election
        timeout. Wake every quiesced group led by one of them, so its followers time out and
        elect a new leader."""
        self.suspected = silent
        if not silent:
            return
        for gid, g in self.groups.items():
            core = g.core
            if core.quiesced and core.lead in silent:
                core.wake()
                self._dirty.add(gid)

    def peer_connected(self, node: int) -> None:
        """`node` opened a new connection to this node: it may have restarted, and a restarted
        node leads nothing, whatever this node's quiesced groups believe (and if it cannot
        campaign, e.g. it had appended its own removal, nothing else would ever wake them while
        its liveness pings keep coming). Wake every quiesced group it led, as `suspect` does."""
        for gid, g in self.groups.items():
            core = g.core
            if core.quiesced and core.lead == node:
                core.wake()
                self._dirty.add(gid)

    def close_group(self, group: int, destroy: bool) -> None:
        """Stop hosting `group`: its waiting clients get an indeterminate error (writes may still
        commit on the remaining replicas) and, with `destroy`, its state is deleted and a tombstone
        keeps it from being recreated by a late message. Call only between cycles."""
        g = self.groups.pop(group, None)
        self.hosted.drop(group)
        if self._removed:
            self._forget_removed()
        if g is not None:
            err = errors.LeadershipLost(f"group {group} left this node", indeterminate=True)
            for w in g.writes.drain():
                w.answer(None, err)
            gone = errors.WrongShard(f"group {group} left this node")
            for cb in g.reads.values():
                cb(0, gone)
            for _, cb in g.ready_reads:
                cb(0, gone)
        if destroy:
            self.store.destroy_group(group, tombstone=True)

    def leader_of(self, group: int) -> tuple[int, str]:
        g = self.groups.get(group)
        if g is None:
            return NONE, ""
        lead = g.core.lead
        return lead, self.members.get(lead, "")

    def leads_current(self, group: int) -> bool:
        """Does this node lead `group` with a current view of its state? A new leader's applied
        state may lag what earlier leaders committed until it has applied an entry of its own
        term (the empty entry it appends on election); from then on it has applied everything
        committed before its term. A move coordinator acts only then: driving from a lagging map
        it would propose steps of moves that are already finished, which every up-to-date node
        refuses (WRONG_SHARD, retried until the request's deadline) - a stall after every
        metadata failover."""
        g = self.groups.get(group)
        if g is None or g.core.role != Role.LEADER:
            return False
        core = g.core
        return core.log.term_or_zero(core.applied) == core.term

    def not_leader_error(self, group: int) -> errors.KVError:
        """The error for a request that needs group `group`'s leader here, when this node does
        not lead it: NotLeader with the leader's addresses if one is known, else NoLeader (also
        for a group not hosted here). Definite: nothing was proposed."""
        g = self.groups.get(group)
        if g is None:
            return errors.NoLeader(f"group {group} is not hosted on node {self.node_id}")
        return self._not_leader(g)

    def _not_leader(self, g: Group) -> errors.KVError:
        lead = g.core.lead
        if lead == NONE or lead == self.node_id:
            return errors.NoLeader(f"group {g.id} has no leader right now")
        return errors.NotLeader(lead, self.members.get(lead, ""),
                                leader_client_address=self.client_addresses.get(lead, ""))

    def _check_writable(self) -> None:
        if self.failed is not None:
            raise errors.StorageFull(self.failed)

    # --- inputs -----------------------------------------------------------------------------
    def step(self, m: Message) -> bool:
        """Step a peer's message into its group's core. The caller has admitted it (see
        `kvstore.node.inbound`); a message for a group not hosted here is dropped. A message
        the core finds inconsistent with its log (RaftError: e.g. a commit index beyond the
        log, an append conflicting with committed entries; no correct member sends either) is
        dropped too, with a warning, leaving the core as any message of its term would: it can
        neither crash the node nor change the log. Returns False if the message was dropped."""
        g = self.groups.get(m.group)
        if g is None:
            log.debug("message for unknown group %d from node %d dropped", m.group, m.frm)
            return False
        self._dirty.add(m.group)
        if m.type == MessageType.TIMEOUT_NOW:
            if self.draining:  # leaving: do not take leadership (the sender's transfer times out)
                log.info("group %d: draining, refused leadership offered by node %d", m.group, m.frm)
                return False
            # Leadership handed here on purpose (an operator's transfer, a drain) is held: the
            # balancer leaves this group alone for `balance_backoff_ticks` before handing it on.
            self._balance_next[m.group] = max(self._balance_next.get(m.group, 0), self._ticks + self.balance_backoff_ticks)
        try:
            g.core.step(m)
        except RaftError as err:
            log.warning("group %d: dropped %s from node %d: %s", m.group, m.type.name, m.frm, err)
            return False
        finally:
            self.hosted.update(m.group, g.core.conf)  # an append or a snapshot may change it
        return True

    def tick(self) -> None:
        # The balancer looks at `recent_active`, which a leader's check-quorum round (inside
        # core.tick) resets: look before ticking, or a round that lines up with the balancer's
        # period would hide every follower forever.
        self._ticks += 1
        if self.preferred_leader and self._ticks % self.balance_every_ticks == 0:
            self._balance_leaders()
        dirty = self._dirty
        for gid, g in self.groups.items():
            awake = not g.core.quiesced  # a quiesced group's tick is O(1) and never makes it ready
            g.core.tick()
            if awake:
                dirty.add(gid)
        if self._ticks % self.full_scan_ticks == 0:
            dirty.update(self.groups)

    def _balance_leaders(self) -> None:
        """Hand each group this node leads to its preferred leader, once that node is a voter,
        reachable (recently active) and fully caught up. A failed attempt backs off for a while,
        so a slow or flaky preferred node does not make the group flap; so does leadership that
        reached this node by a transfer (TimeoutNow, see `step`), so an operator's
        `transfer-leader` holds for at least `balance_backoff_ticks` rather than one balancer
        period."""
        for gid, g in self.groups.items():
            core = g.core
            want = self.preferred_leader.get(gid)
            if core.role != Role.LEADER or want is None or want == self.node_id:
                continue
            if core.lead_transferee != NONE or self._balance_next.get(gid, 0) > self._ticks:
                continue
            pr = core.prs.get(want)
            if pr is None or want not in core.conf.voters or not pr.recent_active:
                continue
            if pr.match != core.log.last_index():
                continue
            self._balance_next[gid] = self._ticks + self.balance_backoff_ticks
            log.info("group %d: handing leadership to its preferred leader %d", gid, want)
            core.transfer_leader(want)
            self._dirty.add(gid)

    def propose(self, group: int, data: bytes, callback: WriteCallback) -> int:
        """Propose a command; `callback(result, None)` once applied, or `(None, error)`.

        Raises a definite KVError (not leader, transfer in progress, storage full, a command kind
        the cluster version does not allow yet: `gate`) if the command could not even be appended.

        A retry of a session write whose earlier attempt this node proposed in its current term
        and is still pending (`pending.PendingWrites.join`: same session, same command) is joined
        to that entry instead of appended again: `callback` gets the entry's outcome, and its
        index is returned. Nothing is appended then, so a leadership transfer does not refuse it.
        """
        self._check_writable()
        g = self.groups[group]
        if g.core.role != Role.LEADER:
            raise self._not_leader(g)
        if self.gate is not None:
            self.gate(data)
        term = g.core.term
        joined = g.writes.join(term, data, callback)
        if joined is not None:
            return joined
        try:
            index = g.core.propose(data)
        except ProposalDropped as err:
            raise errors.ProposalDropped(str(err)) from err
        self._dirty.add(group)
        _lost(g.writes.add(index, term, data, callback))
        return index

    def propose_many(self, group: int, datas: list[bytes], callbacks: list[WriteCallback]) -> int:
        """Propose several commands to one group in one append: `callbacks[i]` answers
        `datas[i]` as `propose`'s callback does. One core call for all of them (one leadership
        check, one append, one append message per follower instead of one per command); the
        entries get consecutive indexes, in order. Raises a definite KVError, as `propose`, and
        then none of them was appended (nor joined). A retry of a write pending here is joined to
        its entry as in `propose` (only to entries pending before this call). Returns the index
        of the last one appended, or of the last entry joined if none was appended."""
        if len(datas) != len(callbacks) or not datas:
            raise ValueError("propose_many needs one callback per command, and at least one command")
        self._check_writable()
        g = self.groups[group]
        if g.core.role != Role.LEADER:
            raise self._not_leader(g)
        gate = self.gate
        if gate is not None:
            for data in datas:
                gate(data)
        term = g.core.term
        writes = g.writes
        joined: list[tuple[int, WriteCallback]] = []
        fresh: list[bytes] = []
        fresh_callbacks: list[WriteCallback] = []
        for data, callback in zip(datas, callbacks, strict=True):
            index = writes.join(term, data, callback)
            if index is None:
                fresh.append(data)
                fresh_callbacks.append(callback)
            else:
                joined.append((index, callback))
        last = max((index for index, _ in joined), default=0)
        if fresh:
            try:
                last = g.core.propose(fresh)
            except ProposalDropped as err:
                writes.unjoin(joined)  # definite for all of them: none stays joined either
                raise errors.ProposalDropped(str(err)) from err
            self._dirty.add(group)
            for index, (data, callback) in enumerate(zip(fresh, fresh_callbacks, strict=True), last - len(fresh) + 1):
                _lost(writes.add(index, term, data, callback))
        return last

    def propose_conf_change(self, group: int, cc: ConfChange, callback: WriteCallback) -> int:
        self._check_writable()
        g = self.groups[group]
        if g.core.role != Role.LEADER:
            raise self._not_leader(g)
        try:
            index = g.core.propose_conf_change(cc)
        except ProposalDropped as err:
            raise errors.ProposalDropped(str(err)) from err
        self.hosted.update(group, g.core.conf)  # the leader's configuration changes on append
        self._dirty.add(group)
        _lost(g.writes.add(index, g.core.term, b"", callback))  # no session: never joined
        return index

    def read(self, group: int, callback: ReadCallback) -> None:
        """Linearizable read: `callback(applied_index, None)` once it is safe to read local state."""
        self._check_writable()
        g = self.groups[group]
        if g.core.role != Role.LEADER:
            raise self._not_leader(g)
        self._ctx += 1
        ctx = self._ctx.to_bytes(8, "big")
        try:
            g.core.read_index(ctx)
        except ProposalDropped as err:
            raise errors.NoLeader(str(err)) from err
        self._dirty.add(group)
        g.reads[ctx] = callback

    def transfer_leader(self, group: int, to: int) -> None:
        g = self.groups[group]
        if g.core.role != Role.LEADER:
            raise self._not_leader(g)
        if to == NONE:
            # The most up-to-date voter other than us.
            cands = [
                (pr.match, nid) for nid, pr in sorted(g.core.prs.items())
                if nid != self.node_id and nid in g.core.conf.voters
            ]
            if not cands:
                raise errors.InvalidArgument("no other voter to transfer leadership to")
            to = max(cands)[1]
        if to not in g.core.conf.voters:
            raise errors.InvalidArgument(f"node {to} is not a voter of group {group}")
        g.core.transfer_leader(to)
        self._dirty.add(group)

    def drain_leadership(self) -> tuple[list[int], list[int]]:
        """One step of a drain (SIGTERM, `kvstore/server/node.py`): hand every group this node
        leads to another voter. Returns (the groups it still leads, those of them nobody is left
        to take). Call it again (every tick) until the first list is empty, or equals the second,
        or the drain's time is up.

        For each led group without a transfer in flight, the target is the voter not tried yet in
        this drain, recently active and not suspected, with the highest match index; the core
        appends to it until it has the whole log, then sends it TimeoutNow, so the new leader holds
        every entry this node appended and the writes waiting here are answered when this node,
        now a follower, applies them. A voter that did not take it (the transfer timed out after
        an election timeout: e.g. it is draining too and refused) is not tried again, so a drain
        of a whole cluster at once ends within one election timeout per voter. While a transfer
        is in flight the core refuses proposals (definite ProposalDropped: the client retries)."""
        self.draining = True
        led: list[int] = []
        stuck: list[int] = []
        for gid, g in self.groups.items():
            core = g.core
            if core.role != Role.LEADER:
                continue
            led.append(gid)
            if core.lead_transferee != NONE:
                continue
            if core.quiesced:  # its followers' activity is unknown: wake it, hand it on next time
                core.wake()
                self._dirty.add(gid)
                continue
            tried = self._drain_tried.setdefault(gid, set())
            cands = [
                (pr.match, nid) for nid, pr in sorted(core.prs.items())
                if nid != self.node_id and nid in core.conf.voters and nid not in tried
                and pr.recent_active and nid not in self.suspected
            ]
            if not cands:
                stuck.append(gid)
                continue
            to = max(cands)[1]
            tried.add(to)
            log.info("group %d: draining, handing leadership to node %d", gid, to)
            core.transfer_leader(to)
            self._dirty.add(gid)
        return led, stuck

    def pending_writes(self) -> int:
        """Writes proposed here that are not answered yet (all groups)."""
        return sum(len(g.writes) for g in self.groups.values())

    def report_snapshot(self, group: int, to: int, failed: bool) -> None:
        g = self.groups.get(group)
        if g is not None:
            g.core.report_snapshot(to, failed)
            self._dirty.add(group)

    def report_unreachable(self, to: int) -> None:
        for gid, g in self.groups.items():
            g.core.report_unreachable(to)
            self._dirty.add(gid)

    # --- the Ready loop ---------------------------------------------------------------------
    def _ready_groups(self) -> list[Group]:
        """The dirty groups that have a Ready; the others are clean until touched again."""
        out = []
        groups = self.groups
        for gid in self._dirty:
            g = groups.get(gid)
            if g is not None and g.core.has_ready():
                out.append(g)
        self._dirty = {g.id for g in out}
        return out

    def has_work(self) -> bool:
        if self.failed is not None:
            return False
        return bool(self._ready_groups())

    def run_cycle(self) -> int:
        """One whole iteration of the Ready loop over all groups (begin, persist, end).

        Returns the number of groups handled."""
        cycle = self.begin_cycle()
        if cycle is None:
            return 0
        cycle.persist()
        return self.end_cycle(cycle)

    def begin_cycle(self) -> Cycle | None:
        """Steps 1-2: take every group's Ready, send what need not wait, prepare the batch.

        Until `end_cycle`, the groups in the cycle hand out no new Ready, but they keep taking
        messages, ticks and proposals; `Cycle.persist` touches only the store and may run on
        another thread meanwhile."""
        if self.failed is not None:
            return None
        writes: list[GroupWrite] = []
        applies: list[ApplyBatch] = []
        stage = functools.partial(_stage, writes, applies)
        turn = readyloop.begin(((g, g.core) for g in self._ready_groups()), self._send, stage)
        if turn is None:
            return None
        return Cycle(self.store, turn, writes, applies)

    def end_cycle(self, cycle: Cycle) -> int:
        """Steps 4-6, once `cycle.persist()` returned: send the rest, answer clients, advance.
        A failed persist stops the host (see `_fail`); a retried one that succeeded resumes it."""
        if cycle.error is not None:
            self._fail(cycle.error, cycle)
            return 0
        if self._failed_cycle is not None:
            assert cycle is self._failed_cycle, "only the failed cycle may end while storage is failed"
            log.warning("storage works again: the node resumes (it had stopped on: %s)", self.failed)
            self.failed = None
            self._failed_cycle = None
        by_group = {a.group: r for a, r in zip(cycle.applies, cycle.results, strict=True)}
        return readyloop.end(
            cycle.turn, self._send, lambda g, rd: self._apply(g, rd, by_group.get(g.id, ())), self._advanced
        )

    def awaits_writes(self, cycle: Cycle) -> bool:
        """Does any group `cycle` applies have writes waiting here?"""
        groups = self.groups
        return any((g := groups.get(a.group)) is not None and g.writes for a in cycle.applies)

    def answers_early(self, cycle: Cycle) -> bool:
        """Is answering `cycle`'s writes from inside its apply transaction (`Cycle.on_applied`)
        worth a hand-off: writes wait here, and the transaction's commit may wait for the disk
        (`NodeStore.waits_for_disk` of the apply alone: a commit flushed in `commit` mode, a
        checkpoint due)? In checkpoint mode the commit is not flushed: the answers then leave
        with `end_cycle`, together with the reads the cycle releases, in one wake-up of the
        driver's loop instead of two (bench/README.md, "Answers at the end of the cycle")."""
        return self.awaits_writes(cycle) and self.store.waits_for_disk((), cycle.applies)

    def answer_writes(self, cycle: Cycle, results: list[list[Any]]) -> None:
        """Answer the writes whose entries `cycle` is applying, from `results` (computed inside
        its transaction, maybe before the fsync). Idempotent; `end_cycle` answers whatever is
        left. Call on the host's thread."""
        if self.failed is not None:
            return
        for a, res in zip(cycle.applies, results, strict=True):
            g = self.groups.get(a.group)
            if g is None or not g.writes:
                continue
            for e, r in zip(a.entries, res, strict=True):
                w = g.writes.pop(e.index)
                if w is not None:
                    _answer(w, e.term, r)

    def _send(self, msgs: list[Message]) -> None:
        out = []
        for m in msgs:
            if m.type == MessageType.SNAP and self.on_snapshot_needed is not None:
                self.on_snapshot_needed(m)
            else:
                out.append(m)
        if out:
            self.send(out)

    def _apply(self, g: Group, rd: Ready, results: Sequence[Any]) -> None:
        """Before `g` advances past `rd`: note membership changes, answer the writes `rd` applied
        (from the store's `results`), queue its read states."""
        for e, res in zip(rd.committed_entries, results, strict=True):
            if e.type == EntryType.CONF_CHANGE:
                self._applied_conf_change(g.id, e.data)
            w = g.writes.pop(e.index)
            if w is not None:
                _answer(w, e.term, res)
        for rs in rd.read_states:
            cb = g.reads.pop(rs.context, None)
            if cb is not None:
                g.ready_reads.append((rs.index, cb))

    def _advanced(self, g: Group, rd: Ready) -> None:
        """After `g` advanced past `rd`: leader changes, reads, compaction. (`advance` never
        changes the role, so the role now is the role `rd` was applied under.)"""
        self._dirty.add(g.id)  # advancing may have made more ready (e.g. newly committed entries)
        self.hosted.update(g.id, g.core.conf)
        was_leader = g.core.role == Role.LEADER
        if rd.soft_state is not None:
            if self.on_leader_change is not None:
                self.on_leader_change(g.id, rd.soft_state.leader)
            if was_leader or rd.soft_state.role != Role.LEADER:
                self._drop_reads(g)
        self._serve_reads(g)
        self._maybe_compact(g)

    def _serve_reads(self, g: Group) -> None:
        if not g.ready_reads:
            return
        applied = g.core.applied
        keep = []
        for index, cb in g.ready_reads:
            if index <= applied:
                cb(applied, None)
            else:
                keep.append((index, cb))
        g.ready_reads = keep

    def _drop_reads(self, g: Group) -> None:
        if g.core.role == Role.LEADER or not (g.reads or g.ready_reads):
            return
        err = self._not_leader(g)
        reads, g.reads = g.reads, {}
        for cb in reads.values():
            cb(0, err)

    def _maybe_compact(self, g: Group) -> None:
        st = self.store.log_storage(g.id)
        applied = g.core.applied
        if applied - st.first_index() >= self.settings.compact_threshold:
            try:
                self.store.compact(g.id, applied - self.settings.compact_keep)
            except StorageError as err:  # optional work: the next cycle tries again
                log.warning("compacting group %d failed: %s", g.id, err)

    def _applied_conf_change(self, group: int, data: bytes) -> None:
        try:
            cc = ConfChange.decode(data)
        except ValueError:
            return  # the core skips an invalid conf change too (never written since validation)
        if cc.type == ConfChangeType.REMOVE_NODE:
            if cc.node_id != self.node_id:
                self._removed.add(cc.node_id)
                self._forget_removed(leaving=group)
        elif cc.context:
            self._removed.discard(cc.node_id)
            self.members[cc.node_id] = cc.context.decode()

    def _forget_removed(self, leaving: int = -1) -> None:
        """Drop from `members` the removed nodes that no hosted group lists any more, in its newest
        configuration or in its applied one (`leaving`: the group applying a node's removal right
        now). A member is removed group by group, and the transport follows `members`: until the
        last group here let a node go, this node must keep answering it there. Dropping it at its
        first removal cut a metadata leader off from its followers while it was removing itself
        there (their acknowledgements never reached it: check-quorum deposed it and the change
        timed out). The applied configuration counts too: a follower that appended a node's
        removal must still acknowledge it to that node, if it leads. Runs only when a removal is
        applied or a group closes (O(groups) each time)."""
        for n in list(self._removed):
            if n in self.hosted or any(
                n in g.core.conf_state_at(g.core.applied).members()
                for gid, g in self.groups.items() if gid != leaving
            ):
                continue
            self.members.pop(n, None)
            self._removed.discard(n)

    def retry_cycle(self, now: float) -> Cycle | None:
        """The failed cycle, to persist again and then end (`end_cycle`), if storage failed and a
        retry is due at `now` (seconds, any monotonic clock); else None. Retries back off from
        one tick to one second."""
        cycle = self._failed_cycle
        if cycle is None or now < self._retry_at:
            return None
        tick = self.settings.tick_ms / 1000
        self._retry_delay = min(1.0, max(tick, 2 * self._retry_delay))
        self._retry_at = now + self._retry_delay
        cycle.error = None
        return cycle

    def _fail(self, reason: str, cycle: Cycle) -> None:
        """Stop: `cycle` is not durable, so nothing that depends on it may happen until it is
        (`retry_cycle`). Logged once per failure, not once per retry."""
        self._failed_cycle = cycle
        if self.failed is not None:
            self.failed = reason
            return  # a retry failed again: nothing is waiting any more
        log.error("storage failed, node stops accepting work until the disk has room: %s", reason)
        self.failed = reason
        self._retry_at = 0.0
        self._retry_delay = 0.0
        err = errors.StorageFull(reason)
        lost = errors.InternalError(f"storage failed before the write was known to be applied: {reason}")
        for g in self.groups.values():
            for w in g.writes.drain():
                w.answer(None, lost)
            reads, g.reads = g.reads, {}
            for cb in reads.values():
                cb(0, err)
            ready_reads, g.ready_reads = g.ready_reads, []
            for _, cb in ready_reads:
                cb(0, err)

    # --- introspection ----------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        out = []
        for gid in sorted(self.groups):
            core = self.groups[gid].core
            st = core.status()
            st["first_index"] = self.store.log_storage(gid).first_index()
            out.append(st)
        return out


def _stage(writes: list[GroupWrite], applies: list[ApplyBatch], g: Group, core: RaftNode, rd: Ready) -> None:
    """Add `rd` to a cycle's batch: its snapshot, entries and hard state to persist, its committed
    entries to apply (with the configuration in force at the last of them). Host thread."""
    if rd.snapshot is not None:
        log.info(
            "installing snapshot of group %d at index %d (term %d)",
            g.id, rd.snapshot.meta.index, rd.snapshot.meta.term,
        )
    if rd.entries or rd.hard_state is not None or rd.snapshot is not None:
        writes.append(
            GroupWrite(
                g.id,
                rd.entries,
                rd.hard_state,
                rd.snapshot.meta if rd.snapshot is not None else None,
                Path(rd.snapshot.data.decode()) if rd.snapshot is not None else None,
            )
        )
    if rd.committed_entries:
        last = rd.committed_entries[-1].index
        applies.append(ApplyBatch(g.id, rd.committed_entries, core.conf_state_at(last)))


def _lost(w: PendingWrite | None) -> None:
    """A write whose entry this node's log lost at its index (`PendingWrites.add` took the index
    for a later term's entry) is left unanswered, as before the table joined retries: its waiters
    time out, indeterminate (another node may still commit it). Answering it at once with an
    indeterminate LeadershipLost stalled a range move behind a lease deletion's PREPARE in the
    simulator (seed 1145, 5 nodes): not done until that is understood."""
    del w


def _answer(w: PendingWrite, term: int, result: Any) -> None:
    """The entry at a waiting write's index was applied with `term`: its own entry (same term)
    or another leader's, which means the write can never commit."""
    if w.term == term:
        w.answer(result, None)
    else:
        w.answer(None, errors.ProposalDropped("another leader's entry took this log position"))
