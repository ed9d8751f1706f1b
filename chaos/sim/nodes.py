"""Deterministic simulation of whole kvstore nodes: the real node logic on a simulated network.

Each simulated node runs the code a `kvstore serve` process runs between its sockets:
`kvstore.node.logic.NodeLogic` (bootstrap from the same flags, the shard map, reconcile,
admission of peer messages, ticks and peer liveness) around the real multi-raft host and its
Ready cycle, the real state machine (commands with client sessions, shard state) and a real
`NodeStore`. Only the shell differs: virtual time instead of a clock, scheduled events instead of
asyncio, a simulated network instead of gRPC.

Faults, all drawn from the seed (a seed replays exactly): message loss, duplication, delay and
reordering; partitions; crashes and restarts (the store recovers what it made durable: with the
in-memory store everything not synced is lost), also right after a cycle that acknowledged or
applied; per-node clock offsets and tick rates (skew); one slow disk (a lagging replica); failed
fsyncs, full disks and torn writes; leadership transfers; small appends (down to one entry per
message) and short in-flight windows; flapping leaders (a new leader cut off from everyone
shortly after its election, which leaves uncommitted suffixes of several terms around: Raft's
Figure 8); a forging outsider (node 1000, never a member) sending votes, higher-term heartbeats,
TIMEOUT_NOW and forged committed appends through the node's admission path, and a rogue member
(messages under a member's id that no correct member sends: TIMEOUT_NOW from a non-leader,
acknowledgements beyond the leader's log, term jumps) that only the group-level admission rules
stop; membership churn (`membership.py`); on a fixed half of the seeds quiescence, with pauses of
the workload and the quiesced-leader crash / isolate scenario at the end (`quiet.py`).

Checked on every seed: Raft's safety properties for every group after every event
(`invariants.SafetyChecker`), the clients' history for linearizability (`chaos.checker`), bounded
and stale reads against their stated bounds (`replica_reads`), and liveness: once the faults heal,
operations invoked after a grace period must succeed (and with quiescence, the groups must
quiesce and recover from the loss of their quiesced leader within a bound).

Range moves (`moves.py`, on half of the seeds): the metadata leader's real move coordinator
drives add-group / remove-group / rebalance moves over simulated RPCs while clients route by
their own maps (and retry until their deadline, and lose write replies), with faults aimed at
a move's steps; liveness then also requires every move finished. Two more checks run on every apply batch
without shard commands: a group refuses a key for ownership only if it does not serve it, and
no client write is executed twice (each carries a value of its own; one written at two log
positions is a retry applied again).

This is the one simulation engine (`python -m chaos.sim`). Races of range moves that random
seeds reach rarely are scripted on it in `scenarios.py`.
"""

from __future__ import annotations

import heapq
import itertools
import random
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chaos.checker import Verdict, check
from chaos.checker.history import Operation, Status
from kvstore import errors
from kvstore.node.hlc import HybridClock
from kvstore.node.host import RaftSettings
from kvstore.node.inbound import RefusalLog
from kvstore.node.logic import Bootstrap, NodeLogic
from kvstore.node.memstore import FaultRates, MemoryNodeStore, SimulatedCrash
from kvstore.node.reads import LINEARIZABLE, NodeReads
from kvstore.node.store import NodeStore
from kvstore.raft import (
    CAMPAIGN_TRANSFER,
    Entry,
    EntryType,
    Message,
    MessageType,
    Role,
    Snapshot,
)
from kvstore.raft.admission import MAX_TERM_JUMP
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import commands, mvcc, txn
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import StorageError
from kvstore.storage.shardcmd import is_shard_command
from kvstore.storage.store import LmdbNodeStore

from . import replica_reads
from .churn import CompetingSuffixes
from .closed_reads import ClosedReads, ClosedReadStats, ClosedReadViolation, closed_reads_by_default
from .invariants import SafetyChecker, SafetyViolation
from .leases import SETTLE_MS as LEASE_SETTLE_MS
from .leases import LeaseStats, LeaseViolation, SimLeases
from .locks import LockStats, LockViolation, SimLocks
from .membership import MembershipDriver
from .moves import SimMoves
from .quiet import QuiesceStats, QuietScenario, quiesce_by_default
from .revisions import RevisionChecker, RevisionViolation
from .txn_model import SETTLE_MS as TXN_SETTLE_MS
from .txn_model import TxnModel, TxnModelStats, TxnModelViolation
from .txn_pairs import TxnPairs, TxnPairStats, TxnPairViolation
from .watches import SimWatches, WatchStats, WatchViolation, watches_by_default

FORGER = 1000
"""The outsider's node id: never a member."""

StoreFactory = Callable[[int, Path], NodeStore]
"""Opens (or, after a crash, recovers) node `id`'s store under a directory of the run."""


@dataclass(slots=True)
class NodeSimParams:
    """Knobs of one run, drawn from the seed."""

    nodes: int = 3
    groups: int = 1
    tick_ms: int = 10
    election_tick: int = 10
    heartbeat_tick: int = 2
    fault_ms: int = 3000
    heal_ms: int = 3000
    liveness_ms: int = 2000
    clients: int = 4
    keys: int = 3
    client_timeout_ms: int = 600
    loss: float = 0.02
    duplicate: float = 0.02
    delay_ms: tuple[int, int] = (1, 8)
    long_delay: float = 0.02
    persist_ms: tuple[int, int] = (0, 4)
    slow_disk: int = 1
    """One node's transactions take this many times longer (1: none): a replica that lags."""
    nemesis_every_ms: tuple[int, int] = (80, 400)
    clock_offset_ms: int = 0
    """Largest offset of a node's clock from true time (either way)."""
    tick_skew: float = 0.0
    """Largest relative difference of a node's tick period from the nominal one."""
    fsync_fail: float = 0.0
    """Chance a synced transaction's fsync fails (the host retries it)."""
    torn_write: float = 0.0
    """Chance the machine crashes during a sync (all or nothing of that transaction survives)."""
    sync: bool = True
    """Stores make transactions durable (False only to plant "acknowledge before fsync")."""
    state_sync: str = "checkpoint"
    """How the stores' state machines become durable (`MemoryNodeStore`: `checkpoint`, a crash
    loses every apply since the last checkpoint and the cores replay the WAL; `commit`, each
    apply transaction is synced). Not drawn: `python -m chaos.sim --state-sync` sets it."""
    membership: bool = False
    """Replace voters by new nodes (remove from every group, add a new id, promote)."""
    lease_read: bool = False
    """Leaders serve linearizable reads from their lease (check-quorum) instead of a ReadIndex round."""
    quiesce_ticks: int = 0
    """Idle groups quiesce after this many ticks (0: never); peers' liveness pings wake them.
    With quiescence the workload pauses now and then and the run ends with the quiesced-leader
    scenario (`quiet.py`)."""
    max_size_per_msg: int = 1 << 20
    """Bytes of entries per append (at least one entry each): small values split a catching-up
    follower's appends into many, so a follower holds part of a leader's log for a while."""
    max_inflight_msgs: int = 256
    """Appends in flight per follower (1: one round trip per append)."""
    flap: float = 0.0
    """Chance that a newly elected leader is cut off from every other node `flap_ms` after its
    election (the previous cut heals): leaders that lose their majority right after winning,
    leaving uncommitted suffixes of several terms on different nodes, so that later leaders
    replicate older terms' entries (Raft's Figure 8) and truncate conflicting ones."""
    flap_ms: tuple[int, int] = (0, 60)
    churn: bool = False
    """Run the competing-suffixes scenario (`churn.py`) again and again while the faults last:
    leaders cut off with suffixes of their own, re-elected, and cut off again right after a
    partial replication (Raft's Figure 8)."""
    crash_after_cycle: float = 0.0
    """Chance a node crashes right after a cycle that sent votes, appends or acknowledgements
    (before anything else happens on it): the moments where durability matters most."""
    reads: replica_reads.ReadParams = field(default_factory=replica_reads.ReadParams)
    """Probing, and the mix of read levels and targets (`replica_reads`)."""
    moves: bool = False
    """Range moves (`chaos/sim/moves.py`): an admin plans add / remove group / rebalance while
    the metadata leader's coordinator drives the moves; clients route by their own maps."""
    max_groups: int = 4
    admin_ms: tuple[int, int] = (150, 700)
    reply_loss: float = 0.0
    """(With range moves, while faults run) the chance a write's reply is lost on its way to the
    client (a broken connection): the client retries under the same session, maybe elsewhere."""
    scripted: bool = False
    """A scripted scenario (`chaos/sim/scenarios.py`) drives the faults and the range moves: no
    random nemesis, no outsider, no admin."""
    disturb: float = 0.0
    """(With range moves, while faults run) the chance that a shard command proposed at a data
    group's leader is followed at once by a fault aimed at its move: that leader crashes or is
    cut off before the command commits, or the metadata leadership moves away from the
    coordinator mid-step (racing coordinators). `chaos/sim/moves.py` `SimMoves.disturb`."""

    @classmethod
    def draw(cls, rng: random.Random, nodes: int, moves: bool | None = None) -> NodeSimParams:
        return cls(
            nodes=nodes,
            groups=rng.choice((1, 1, 2)),
            election_tick=rng.choice((5, 10)),
            heartbeat_tick=rng.choice((1, 2)),
            loss=rng.choice((0.0, 0.01, 0.05, 0.1)),
            duplicate=rng.choice((0.0, 0.02, 0.1)),
            delay_ms=rng.choice(((1, 3), (1, 8), (2, 20))),
            long_delay=rng.choice((0.0, 0.02, 0.05)),
            persist_ms=rng.choice(((0, 1), (0, 4), (1, 15))),
            slow_disk=rng.choice((1, 1, 4, 10)),
            nemesis_every_ms=rng.choice(((50, 250), (80, 400), (200, 800))),
            keys=rng.choice((1, 2, 3)),
            clients=rng.choice((3, 4, 6)),
            clock_offset_ms=rng.choice((0, 50, 2000)),
            tick_skew=rng.choice((0.0, 0.05, 0.2)),
            lease_read=rng.random() < 0.5,
            membership=rng.random() < 0.5,
            quiesce_ticks=rng.choice((2, 4, 8)),
            crash_after_cycle=rng.choice((0.0, 0.0, 0.002, 0.01)),
            max_size_per_msg=rng.choice((1, 1, 512, 1 << 20)),
            max_inflight_msgs=rng.choice((1, 4, 256)),
            flap=rng.choice((0.0, 0.0, 0.3, 1.0)),
            churn=rng.random() < 0.5,
            fsync_fail=rng.choice((0.0, 0.0, 0.01, 0.05)),
            torn_write=rng.choice((0.0, 0.0, 0.002, 0.01)),
            reads=replica_reads.ReadParams.draw(rng),
        ).with_moves(rng, moves)

    def with_moves(self, rng: random.Random, moves: bool | None = None) -> NodeSimParams:
        """Range moves on half of the seeds (or all / none: `moves`), on a cluster started with
        2-4 data groups and clients using more keys (so that moves carry data)."""
        on, groups, keys = rng.random() < 0.5, rng.choice((2, 3, 4)), rng.choice((4, 6, 8))
        if on if moves is None else moves:
            self.moves, self.groups, self.keys = True, groups, keys
            self.disturb = rng.choice((0.15, 0.3, 0.5))
            self.reply_loss = rng.choice((0.0, 0.05, 0.1))
            # Membership churn and range moves are not combined on random seeds yet: ~1.5% of such
            # seeds (e.g. 1067 with 3 nodes, 1015 with 5) still miss the deadline after the heal,
            # because a replacement removes the old voter first and every group then runs on two
            # voters (no failure tolerated) for the whole change, which takes far longer with
            # every step recorded in the map beside the moves' own map changes. Two stalls of the
            # combination (seeds 53 and 86) were the simulator's membership driver's and are
            # fixed; `tests/simulation/test_node_sim_moves.py` runs the combination on fixed seeds.
            self.membership = False
        return self


class SimulationFailure(AssertionError):
    pass


@dataclass
class NodeSimResult:
    seed: int
    ok: bool
    violation: str | None
    ops: int
    events: int
    sim_ms: int
    verdict: str
    history: list[Operation]
    trace: list[str]
    forged: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    membership_changes: int = 0
    """Voters replaced by new nodes (every step applied in every group)."""
    moves: dict[str, int] = field(default_factory=dict)
    """With range moves: plans, moves planned and finished, keys moved (`SimMoves.summary`)."""
    quiesce_ticks: int = 0
    quiesce: QuiesceStats = field(default_factory=QuiesceStats)
    """What quiescence did (`quiet.py`; all zero when it was off)."""
    closed_reads: ClosedReadStats | None = None
    """What the cross-group scans did (`closed_reads.py`; None when they were off)."""
    watches: WatchStats | None = None
    """What the watchers did (`watches.py`; None when they were off)."""
    txn_pairs: TxnPairStats | None = None
    """What the pair transactions did (`txn_pairs.py`; None when they were off)."""
    leases: LeaseStats | None = None
    """What the lease clients did (`leases.py`; None when they were off)."""
    txns: TxnModelStats | None = None
    """What the general transactions did (`txn_model.py`; None when they were off)."""
    locks: LockStats | None = None
    """What the lock clients did (`locks.py`; None when they were off)."""


class SimTransport:
    """A node's `PeerTransport` on the simulated network."""

    def __init__(self, sim: NodeSimulation, node_id: int) -> None:
        self.sim = sim
        self.node_id = node_id
        self.addresses: dict[int, str] = {}

    def send(self, messages: list[Message]) -> None:
        # As the real transport (`kvstore.transport.peer.Transport.send`): a message to a node
        # outside the address book the node logic keeps (`set_addresses`) is dropped.
        for m in messages:
            if m.to in self.addresses:
                self.sim._send(m)

    def send_snapshot(self, m: Message) -> None:
        if m.to in self.addresses:
            self.sim._send_snapshot(self.node_id, m)
        else:  # the real transport reports "no address for node N" as a failed snapshot
            sim = self.sim
            sim.at(1, sim._snapshot_done, self.node_id, sim.nodes[self.node_id].epoch, m.group, m.to, True)

    def set_addresses(self, addresses: dict[int, str]) -> None:
        self.addresses = {n: a for n, a in addresses.items() if n != self.node_id}

    def ping(self) -> None:
        self.sim._ping(self.node_id, sorted(self.addresses))

    @property
    def peer_ids(self) -> Collection[int]:
        return list(self.addresses)


@dataclass(slots=True)
class SimNode:
    id: int
    dir: Path
    store: NodeStore | None = None
    logic: NodeLogic | None = None
    reads: NodeReads | None = None
    epoch: int = 0
    """Bumped at every crash: events scheduled for an earlier life of the node are dropped."""
    cycling: bool = False
    removed: bool = False
    """Removed from the cluster and stopped for good (membership churn)."""
    join: bool = False
    """Started empty with --join (added by a membership change)."""
    offset_ms: int = 0
    tick_ms: float = 10.0
    disk_factor: int = 1
    seen_commit: dict[int, int] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.logic is not None


class NodeSimulation:
    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        params: NodeSimParams | None = None,
        trace: bool = False,
        store_factory: StoreFactory | None = None,
        root: Path | None = None,
        moves: bool | None = None,
        quiesce: bool | None = None,
        closed_reads: bool | None = None,
        watches: bool | None = None,
        txn_pairs: bool | Literal["ranges"] | None = None,
        leases: bool | None = None,
        txns: bool | None = None,
        locks: bool | None = None,
        lease_txns: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.p = params or NodeSimParams.draw(self.rng, nodes, moves)
        if quiesce is None and params is None:
            quiesce = quiesce_by_default(seed)
        if quiesce is not None and quiesce != bool(self.p.quiesce_ticks):
            self.p.quiesce_ticks = self.rng.choice((2, 4, 8)) if quiesce else 0
        self.quiet = QuietScenario(self, self.p.keys, self.p.lease_read) if self.p.quiesce_ticks else None
        if self.quiet is not None:
            # Probing every group all the time (demand_ticks 0) would keep every group awake:
            # with quiescence, probes run only while reads are in demand.
            self.p.reads.demand_ticks = self.p.reads.demand_ticks or 100
        self._one_shot: set[int] = set()
        self._leader_terms: dict[int, int] = {}
        """group -> the newest term in which a leader was seen."""
        """Client processes that do one operation only (the quiesced-leader scenario's)."""
        self.store_factory = store_factory or memory_store(self)
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix=f"nodesim-{seed}-"))
        self.now = 0
        self._seq = itertools.count()
        self._events: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self.events_run = 0
        self.trace_on = trace
        self.trace: list[str] = []
        self.safety: dict[int, SafetyChecker] = {}
        self.revisions = RevisionChecker()
        self.clocks: dict[int, HybridClock] = {}
        """node id -> the HLC its writes are proposed with (its skewed simulated clock)."""
        self.blocked: set[tuple[int, int]] = set()
        self.history: list[Operation] = []
        self.healed_at: int | None = None
        self.end: int | None = None
        self._extended_leases = False
        """The run went on once so that a just-revoked lease's moved keys are checked."""
        self._moves_at_heal = 0
        """Range moves finished when the faults stopped (see `_extend_for_moves`)."""
        self._extended = False
        self._extended_txns = False
        """The run went on once so that a general transaction's unfinished COMMITs are finished
        (see `_extend_for_txns`)."""
        self.forged = 0
        self.refused: dict[str, int] = {}
        self.peers = {i: f"sim-{i}:2379" for i in range(1, self.p.nodes + 1)}
        self.nodes: dict[int, SimNode] = {}
        self._next_process = 0
        self._value = itertools.count(1)
        self._client_ids = itertools.count(1)
        self.leader_hint: dict[int, int] = {}
        self.sessions: dict[int, list[int]] = {}
        """process -> [client id, next seq]."""
        self.pending: dict[int, Callable[[], None]] = {}
        self.late_timeouts: list[str] = []
        self.leader_seen: dict[int, int] = {}
        """group -> the last time some node was its leader."""
        self._op_ids = itertools.count()
        self.next_id = self.p.nodes + 1
        self.membership = MembershipDriver(self)
        self.reads_params = self.p.reads
        self.stale_check = replica_reads.StalenessChecker()
        self.moves = SimMoves(self) if self.p.moves else None
        self.churn = CompetingSuffixes(self, self.p.keys) if self.p.churn else None
        self.admin_maps = self.moves if self.moves is not None else SimMoves(self)
        """Records each data group's membership change in the shard map (`SimMoves.record`), as the
        Admin service does after every change whether or not ranges move: the range moves' own
        when they run, else one that is never started (it plans no moves)."""
        if closed_reads is None:
            closed_reads = params is None and closed_reads_by_default(seed)
        self.closed_reads = ClosedReads(self) if closed_reads else None
        """Scans across groups at a revision and linearizable ones (`closed_reads.py`)."""
        if watches is None:
            watches = params is None and watches_by_default(seed)
        self.watches = SimWatches(self) if watches else None
        self.txn_pairs = TxnPairs(self, ranges=txn_pairs == "ranges") if txn_pairs else None
        self.leases = SimLeases(self, across=lease_txns) if leases and self.quiet is None else None
        """Leases with the real lease clock on every node, drifting clocks, checked for early
        expiry and the expiry bound (`leases.py`; off unless asked for, and off with quiescence:
        a live lease keeps its home group awake, its leader's clock checkpoints it)."""
        """Multi-key transactions on key pairs, checked for atomicity (`txn_pairs.py`; off unless
        asked for, so the seeds pinned by tests replay as before; `python -m chaos.sim` runs them
        on a fifth of the seeds, `txn_pairs_by_default`)."""
        """The real watch hub on every node, simulated watchers and their checks (`watches.py`)."""
        self.txn_model = TxnModel(self) if txns else None
        """General transactions checked against a sequential model (`txn_model.py`; off unless
        asked for, like the pair transactions; `python -m chaos.sim`: `txn_model_by_default`)."""
        self.locks = SimLocks(self) if locks and self.quiet is None else None
        """Lock clients with fencing tokens and the resource that checks them (`locks.py`; off
        unless asked for, and off with quiescence like the lease clients)."""
        self.written: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        """(key, value) -> the (group, index) of the entry that wrote it (`_check_written_once`)."""
        self.cut: Callable[[Message], bool] | None = None
        """A scripted scenario's network filter: the messages it holds back (lost)."""
        for nid in self.peers:
            self._make_node(nid)
        # A disk slower than half an election timeout livelocks elections in any Raft (a vote
        # waits for its persist step, and candidates time out first): the slow node stays within
        # what a deployment must guarantee (election timeouts well above fsync latency).
        self.p.slow_disk = max(1, min(self.p.slow_disk, self.p.election_tick * self.p.tick_ms // (2 * self.p.persist_ms[1] or 1)))
        self.nodes[self.rng.choice(sorted(self.nodes))].disk_factor = self.p.slow_disk

    def _make_node(self, nid: int, join: bool = False) -> SimNode:
        n = SimNode(nid, self.root / f"n{nid}", join=join)
        n.offset_ms = self.rng.randint(-self.p.clock_offset_ms, self.p.clock_offset_ms)
        n.tick_ms = self.p.tick_ms * (1 + self.rng.uniform(-self.p.tick_skew, self.p.tick_skew))
        self.nodes[nid] = n
        return n

    def add_node(self, nid: int) -> None:
        """Start a brand-new node `nid` with an empty store and --join (membership churn)."""
        self.peers[nid] = f"sim-{nid}:2379"
        n = self._make_node(nid, join=True)
        self.log(f"n{nid} NEW NODE (joining)")
        self.at(0, self._boot, n)

    def retire(self, nid: int) -> None:
        """Stop node `nid` for good: it was removed from every group."""
        n = self.nodes[nid]
        self.log(f"n{nid} RETIRED")
        if n.logic is not None:
            self.crash(nid)
        n.removed = True
        self.peers.pop(nid, None)

    def kick(self, n: SimNode) -> None:
        self._kick(n)

    # --- event loop -------------------------------------------------------------------------
    def at(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (self.now + max(0, int(delay)), next(self._seq), fn, args))

    def log(self, msg: str) -> None:
        if self.trace_on:
            self.trace.append(f"{self.now:>7}ms {msg}")

    def run(self) -> NodeSimResult:
        violation: str | None = None
        try:
            for n in self.nodes.values():
                self.at(0, self._boot, n)
            for _ in range(self.p.clients):
                self.at(self.rng.randrange(0, 50), self._client_next, self._new_process())
            if not self.p.scripted:
                self.at(self.rng.randrange(*self.p.nemesis_every_ms), self._nemesis)
            if self.quiet is not None:
                self.quiet.start()
                self.at(self.p.fault_ms, self.quiet.begin)
            else:
                self.at(self.p.fault_ms, self._heal_all)
            if self.moves is not None:
                self.moves.start()
            if self.churn is not None:
                self.churn.start((50, max(51, self.p.fault_ms // 4)))
            if self.closed_reads is not None:
                self.closed_reads.start()
            if self.watches is not None:
                self.watches.start()
            if self.txn_pairs is not None:
                self.txn_pairs.start()
            if self.leases is not None:
                self.leases.start()
            if self.txn_model is not None:
                self.txn_model.start()
            if self.locks is not None:
                self.locks.start()
            while self._events:
                t, seq, fn, args = heapq.heappop(self._events)
                if self.end is not None and t > self.end:
                    if self._extend_for_moves() or self._extend_for_leases() or self._extend_for_txns():
                        heapq.heappush(self._events, (t, seq, fn, args))
                        continue
                    break
                self.now = t
                try:
                    fn(*args)
                except SimulatedCrash:  # a torn write, whatever store call it happened in
                    self._torn()
                self.events_run += 1
                self._check_safety()
                if self.churn is not None and self.churn.active:
                    self.churn.observe()
            for timeout in list(self.pending.values()):
                timeout()
            if self.closed_reads is not None:
                self.closed_reads.recheck()
            if self.watches is not None:
                self.watches.check_end()
            if self.leases is not None:
                self.leases.check_end()
            if self.txn_model is not None:
                self.txn_model.check_end()
            if self.locks is not None:
                self.locks.check_end()
            self._check_liveness()
            res = check(self.history, timeout=20.0)
            verdict = res.verdict.value
            if res.verdict == Verdict.NOT_LINEARIZABLE:
                shown = "; ".join(str(o) for o in (res.counterexample or [])[:6])
                violation = f"linearizability: key {res.bad_key} is not linearizable: {shown}"
        except (
            SafetyViolation, SimulationFailure, replica_reads.StaleReadViolation, RevisionViolation,
            ClosedReadViolation, WatchViolation, TxnPairViolation, LeaseViolation,
            TxnModelViolation, LockViolation,
        ) as err:
            violation = f"{type(err).__name__}: {err}"
            verdict = "violation"
        except Exception as err:  # the node code raised where it must not: a bug found
            violation = f"node code raised {type(err).__name__}: {err} (at {self.now} ms)"
            verdict = "violation"
        finally:
            self._close()
        return NodeSimResult(
            self.seed, violation is None, violation, len(self.history), self.events_run, self.now, verdict,
            self.history, self.trace, self.forged, dict(self.refused), self.membership.done,
            self.moves.summary() if self.moves is not None else {},
            self.p.quiesce_ticks, self.quiet.stats if self.quiet is not None else QuiesceStats(),
            self.closed_reads.stats if self.closed_reads is not None else None,
            self.watches.stats if self.watches is not None else None,
            self.txn_pairs.stats if self.txn_pairs is not None else None,
            self.leases.stats if self.leases is not None else None,
            self.txn_model.stats if self.txn_model is not None else None,
            self.locks.stats if self.locks is not None else None,
        )

    def _close(self) -> None:
        for n in self.nodes.values():
            if n.store is not None:
                n.store.close()
                n.store = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- nodes ------------------------------------------------------------------------------
    def _node_now(self, n: SimNode) -> float:
        """Node `n`'s clock in seconds (offset from true time)."""
        return (self.now + n.offset_ms) / 1000

    def _boot(self, n: SimNode) -> None:
        if n.store is None:
            n.store = self.store_factory(n.id, n.dir)
        p = self.p
        settings = RaftSettings(
            tick_ms=p.tick_ms, election_tick=p.election_tick, heartbeat_tick=p.heartbeat_tick,
            quiesce_ticks=p.quiesce_ticks, lease_read=p.lease_read, max_size_per_msg=p.max_size_per_msg,
            max_inflight_msgs=p.max_inflight_msgs, compact_threshold=self.rng.choice((40, 200, 10_000)), compact_keep=self.rng.choice((0, 5, 20)),
        )

        def refused(reason: str) -> None:
            self.refused[reason] = self.refused.get(reason, 0) + 1

        logic = NodeLogic(
            n.id, n.store, SimTransport(self, n.id), settings,
            Bootstrap(dict(self.peers), p.groups, 3, 16, join=n.join), random.Random(self.rng.getrandbits(64)),
            RefusalLog(lambda: self._node_now(n), on_refused=refused),
        )
        try:
            logic.start(self._node_now(n))
        except StorageError as err:  # the process exits at start (its supervisor restarts it)
            self.log(f"n{n.id} START FAILED: {err}")
            self.at(self.rng.randrange(20, 200), self.restart, n.id)
            return
        n.logic = logic
        n.reads = replica_reads.node_reads(logic.host, lambda: self._node_now(n), random.Random(self.rng.getrandbits(64)),
                             self.reads_params)
        n.seen_commit = {}
        self.log(f"n{n.id} BOOT (groups {sorted(n.logic.host.groups)})")
        self.at(n.tick_ms, self._tick, n.id, n.epoch)
        self._kick(n)
        for peer in sorted(self.peers):  # its transport opens a stream to every peer
            if peer != n.id:
                self.at(self.rng.randint(*self.p.delay_ms), self._connect, n.id, n.epoch, peer)

    def _connect(self, frm: int, epoch: int, to: int) -> None:
        """Node `frm`'s new stream reaches `to` (retried while a partition cuts it off, as the
        transport reconnects with backoff)."""
        src = self.nodes[frm]
        if src.epoch != epoch or src.logic is None:
            return
        if (frm, to) in self.blocked:
            self.at(100, self._connect, frm, epoch, to)
            return
        dst = self.nodes.get(to)
        if dst is not None and dst.logic is not None:
            dst.logic.peer_connected(frm, self._node_now(dst))
            self._kick(dst)

    def crash(self, nid: int) -> None:
        n = self.nodes[nid]
        if n.logic is None:
            return
        self.log(f"n{nid} CRASH")
        if self.quiet is not None:
            self.quiet.forget(nid)
        n.epoch += 1
        n.logic = None
        n.reads = None
        n.cycling = False
        assert n.store is not None
        if isinstance(n.store, MemoryNodeStore):
            n.store = n.store.crash()  # what was not synced is gone
        else:
            n.store.close()  # LMDB: a reopen recovers the last committed transaction
            n.store = None

    def restart(self, nid: int) -> None:
        n = self.nodes[nid]
        if n.logic is None and not n.removed:
            self._boot(n)

    def _tick(self, nid: int, epoch: int) -> None:
        n = self.nodes[nid]
        if n.epoch != epoch or n.logic is None:
            return
        n.logic.tick(self._node_now(n))
        if n.reads is not None:
            n.reads.tick()
        self._kick(n)
        self.at(n.tick_ms, self._tick, nid, epoch)

    def _kick(self, n: SimNode) -> None:
        if not n.cycling and n.logic is not None:
            n.cycling = True
            self.at(0, self._cycle, n.id, n.epoch)

    def _cycle(self, nid: int, epoch: int) -> None:
        n = self.nodes[nid]
        if n.epoch != epoch or n.logic is None:
            return
        host = n.logic.host
        cycle = host.begin_cycle()
        if cycle is None:
            n.cycling = False  # (a failed store: `_retry_storage` is running)
            return
        delay = self.rng.randint(*self.p.persist_ms) * n.disk_factor if cycle.touches_storage() else 0
        if cycle.touches_storage() and host.answers_early(cycle):
            cycle.on_applied = host.answer_writes

        def finish() -> None:
            if n.epoch != epoch or n.logic is None:
                return  # crashed while persisting: the transaction never happened
            served = self._served_before(n, cycle)
            writes = self._writes_before(n, cycle, served)
            if not self._persist(n, cycle):
                return
            self._check_ownership_refusals(n, cycle, served)
            self._check_written_once(n, writes)
            self._check_revisions(n, cycle)
            host.end_cycle(cycle)
            n.logic.after_cycle()
            if self.watches is not None:
                self.watches.after_cycle(n, cycle)
            if host.failed is not None:
                self.log(f"n{nid} STORAGE FAILED: {host.failed}")
                self.at(n.tick_ms, self._retry_storage, nid, epoch)
                return
            if self._faults_on() and self.rng.random() < self.p.crash_after_cycle and any(
                rd.persisted_messages or rd.committed_entries for _, rd in cycle.readies
            ):
                self.log(f"n{nid} CRASH right after a cycle that acknowledged or applied")
                self.crash(nid)
                self.at(self.rng.randrange(20, 400), self.restart, nid)
                return
            self.at(0, self._cycle, nid, epoch)

        self.at(delay, finish)

    def _persist(self, n: SimNode, cycle: Any) -> bool:
        """Run the cycle's transaction; a torn write crashes the machine (False)."""
        try:
            cycle.persist()
        except SimulatedCrash:
            self._torn()
            return False
        return True

    def _served_before(self, n: SimNode, cycle: Any) -> dict[int, IntervalSet]:
        """The ranges each data group `cycle` applies to served before it, for the groups whose
        batch holds no shard command (their ranges stay the same throughout the batch)."""
        out: dict[int, IntervalSet] = {}
        if n.store is None or not self.p.moves:
            return out
        snapshots = {w.group for w in cycle.writes if w.snapshot is not None}
        for a in cycle.applies:
            if a.group == META_GROUP or a.group in snapshots \
                    or any(e.data and is_shard_command(e.data) for e in a.entries):
                continue
            st = n.store.shard_state(a.group)
            if st is not None:
                out[a.group] = st.active
        return out

    def _writes_before(self, n: SimNode, cycle: Any, served: dict[int, IntervalSet]) -> list[tuple[int, int, bytes, bytes, bytes | None]]:
        """The clients' puts and compare-and-swaps `cycle` applies (groups as in `_served_before`,
        keys written by one entry of their batch only): (group, index, key, new value, value
        before the batch)."""
        out = []
        assert n.store is not None or not served
        for a in cycle.applies:
            if a.group not in served:
                continue
            found: dict[bytes, list[tuple[int, bytes]]] = {}
            for e in a.entries:
                if not e.data:
                    continue
                try:
                    cmd = commands.decode_command(e.data)
                except ValueError:
                    continue
                if cmd.client_id and cmd.op in (commands.Op.PUT, commands.Op.CAS):
                    found.setdefault(cmd.key, []).append((e.index, cmd.value))
                elif cmd.client_id and cmd.txn is not None:
                    for key, value in _txn_puts(cmd.txn):
                        found.setdefault(key, []).append((e.index, value))
                elif cmd.op == commands.Op.DELETE:
                    found.setdefault(cmd.key, []).append((0, b""))
            for key, ws in found.items():
                if len(ws) == 1 and ws[0][0]:
                    out.append((a.group, ws[0][0], key, ws[0][1], n.store.get(a.group, key)))  # type: ignore[union-attr]
        return out

    def _check_written_once(self, n: SimNode, writes: list[tuple[int, int, bytes, bytes, bytes | None]]) -> None:
        """Exactly-once: every client write carries a value of its own, so a value written (the key
        held something else before the entry and holds the value after it) at two log positions
        (a group and an index) means a write was executed twice: a retry applied again."""
        if n.store is None:
            return
        for group, index, key, value, before in writes:
            if before == value or n.store.get(group, key) != value:
                continue  # not written by this entry (refused, not swapped, or answered from the cache)
            at = self.written.setdefault((key, value), (group, index))
            if at != (group, index):
                raise SimulationFailure(
                    f"exactly-once: the write of {value!r} to {key!r} was executed twice: in group {at[0]} at "
                    f"index {at[1]}, and in group {group} at index {index} (n{n.id})"
                )

    def _check_revisions(self, n: SimNode, cycle: Any) -> None:
        """The revision rules (`revisions.py`) on every entry the cycle applied."""
        if cycle.error is not None or len(cycle.results) != len(cycle.applies):
            return  # the transaction failed: nothing was applied
        store = n.store

        def deleted_at(group: int) -> Callable[[int], list[bytes]]:
            def at(rev: int) -> list[bytes]:
                if store is None:
                    return []
                batch = store.revisions.changes(group, rev, rev, 10_000, 1 << 30, False)
                return [c.key for c in batch.changes if c.value is None]
            return at

        for a, results in zip(cycle.applies, cycle.results, strict=True):
            for e, res in zip(a.entries, results, strict=True):
                if isinstance(res, ApplyResult) and e.data and not is_shard_command(e.data):
                    self.revisions.on_apply(n.id, a.group, e.index, e.data, res, deleted_at(a.group))

    def _check_ownership_refusals(self, n: SimNode, cycle: Any, served: dict[int, IntervalSet]) -> None:
        """A group refuses a key for ownership (WRONG_SHARD) only if it does not serve the key at
        that point of its log. (Checked for batches without shard commands, where the ranges
        served before the batch are those served at every entry of it.)"""
        if cycle.error is not None or len(cycle.results) != len(cycle.applies):
            return  # the transaction failed: nothing was applied
        for a, results in zip(cycle.applies, cycle.results, strict=True):
            active = served.get(a.group)
            if active is None:
                continue
            for e, res in zip(a.entries, results, strict=True):
                if not (isinstance(res, ApplyResult) and res.wrong_shard):
                    continue
                try:
                    cmd = commands.decode_command(e.data)
                except ValueError:
                    continue
                # a transaction is refused if any of its keys is not served
                keys = (
                    [k for k, _ in txn.keys_of(cmd.txn)] if cmd.txn is not None
                    else list(cmd.x.keys) if cmd.x is not None else [cmd.key]
                )
                if not keys or (cmd.x is not None and cmd.x.lock is not None):
                    continue  # a range delete's PREPARE (alone or a transaction's) refused while a range moves
                key = keys[0]
                if all(key_hash(k) in active for k in keys):
                    raise SimulationFailure(
                        f"ownership: group {a.group} answered WRONG_SHARD at index {e.index} (n{n.id}) for "
                        f"key {key!r}, which it serves"
                    )

    def _torn(self) -> None:
        """A store crashed during a sync: its machine goes down with it, and restarts later."""
        for n in self.nodes.values():
            if isinstance(n.store, MemoryNodeStore) and n.store.crashed:
                self.log(f"n{n.id} TORN WRITE: the machine crashes during its sync")
                if n.logic is None:  # (it was starting)
                    n.store = n.store.crash()
                else:
                    self.crash(n.id)
                self.at(self.rng.randrange(20, 400), self.restart, n.id)

    def _retry_storage(self, nid: int, epoch: int) -> None:
        """What the shell does while storage fails: retry the failed cycle with backoff."""
        n = self.nodes[nid]
        if n.epoch != epoch or n.logic is None:
            return
        host = n.logic.host
        cycle = host.retry_cycle(self._node_now(n))
        if cycle is not None:
            served = self._served_before(n, cycle)
            writes = self._writes_before(n, cycle, served)
            if not self._persist(n, cycle):
                return
            # A retried cycle applies what the failed one did not: the same checks as `_cycle`
            # (they skip a cycle that failed again).
            self._check_ownership_refusals(n, cycle, served)
            self._check_written_once(n, writes)
            self._check_revisions(n, cycle)
            host.end_cycle(cycle)
            n.logic.after_cycle()
            if self.watches is not None:
                self.watches.after_cycle(n, cycle)
        if host.failed is None:
            self.log(f"n{nid} STORAGE WORKS AGAIN")
            n.cycling = False
            self._kick(n)
            return
        self.at(n.tick_ms, self._retry_storage, nid, epoch)

    # --- network ----------------------------------------------------------------------------
    def _send(self, m: Message) -> None:
        if self.rng.random() < self.p.loss:
            return
        copies = 2 if self.rng.random() < self.p.duplicate else 1
        for _ in range(copies):
            d = self.rng.randint(*self.p.delay_ms)
            if self.rng.random() < self.p.long_delay:
                d += self.rng.randint(20, 300)
            self.at(d, self._deliver, m)

    def _deliver(self, m: Message) -> None:
        dst = self.nodes.get(m.to)
        if dst is None or dst.logic is None or (m.frm, m.to) in self.blocked or (self.cut is not None and self.cut(m)):
            return
        dst.logic.heard(m.frm, self._node_now(dst))
        ok = dst.logic.deliver(m)
        if self.trace_on:
            self.log(f"{'' if ok else 'REFUSED '}n{m.frm} -> n{m.to} g{m.group} {m.type.name} t{m.term} "
                     f"i{m.index}/{m.log_term} c{m.commit} n{len(m.entries)}{' reject' if m.reject else ''}")
        if ok:
            if self.churn is not None and self.churn.active:
                self.churn.delivered(m)
            self._kick(dst)

    def _ping(self, frm: int, peers: list[int]) -> None:
        for to in peers:
            if (frm, to) not in self.blocked and self.rng.random() >= self.p.loss:
                self.at(self.rng.randint(*self.p.delay_ms), self._heard, frm, to)

    def _heard(self, frm: int, to: int) -> None:
        dst = self.nodes.get(to)
        if dst is not None and dst.logic is not None and (frm, to) not in self.blocked:
            dst.logic.heard(frm, self._node_now(dst))

    def _send_snapshot(self, frm: int, m: Message) -> None:
        """The sender streams its group's state (one consistent read) to the receiver, which
        keeps it in a file and steps the SNAP message naming it; the sender learns the outcome."""
        src = self.nodes[frm]
        epoch = src.epoch
        assert src.store is not None
        try:
            meta, chunks = src.store.snapshot_chunks(m.group)
            data = list(chunks)
        except Exception as err:  # e.g. the applied index's term was compacted: retried later
            self.log(f"n{frm} snapshot of g{m.group} unavailable: {err}")
            self.at(1, self._snapshot_done, frm, epoch, m.group, m.to, True)
            return
        lost = self.rng.random() < self.p.loss or (frm, m.to) in self.blocked

        def arrive() -> None:
            dst = self.nodes.get(m.to)
            ok = False
            if not lost and dst is not None and dst.logic is not None and dst.store is not None \
                    and (frm, m.to) not in self.blocked:
                try:
                    path = dst.store.receive_snapshot(m.group, iter(data))
                except StorageError as err:  # e.g. a full disk: the stream fails, retried later
                    self.log(f"n{m.to} cannot keep the snapshot of g{m.group}: {err}")
                    self.at(self.rng.randint(*self.p.delay_ms), self._snapshot_done, frm, epoch, m.group, m.to, True)
                    return
                snap = Message(
                    MessageType.SNAP, m.to, frm, term=m.term, group=m.group,
                    snapshot=Snapshot(meta, str(path).encode()),
                )
                ok = dst.logic.deliver(snap)
                self._kick(dst)
                self.log(f"n{frm} -> n{m.to} SNAPSHOT g{m.group} at {meta.index} ({'stepped' if ok else 'refused'})")
            self.at(self.rng.randint(*self.p.delay_ms), self._snapshot_done, frm, epoch, m.group, m.to, not ok)

        self.at(self.rng.randint(*self.p.delay_ms) * 3, arrive)

    def _snapshot_done(self, frm: int, epoch: int, group: int, to: int, failed: bool) -> None:
        src = self.nodes[frm]
        if src.epoch == epoch and src.logic is not None:
            src.logic.host.report_snapshot(group, to, failed)
            self._kick(src)

    # --- safety -----------------------------------------------------------------------------
    def _check_safety(self) -> None:
        quiet = self.quiet
        faults_on = quiet is not None and self._faults_on()
        for n in self.nodes.values():
            if n.logic is None:
                continue
            for gid, g in n.logic.host.groups.items():
                core = g.core
                checker = self.safety.get(gid)
                if checker is None:  # (not setdefault: it would build a checker per event)
                    checker = self.safety[gid] = SafetyChecker()
                seen = n.seen_commit.get(gid, 0)
                if core.committed > seen:
                    log = core.log
                    for i in range(max(seen + 1, log.first_index()), core.committed + 1):
                        checker.on_commit(n.id, i, log.term(i))
                    n.seen_commit[gid] = core.committed
                if core.role == Role.LEADER:
                    checker.on_leader(core)
                    self.leader_seen[gid] = self.now
                    if self._leader_terms.get(gid, 0) < core.term:
                        self._leader_terms[gid] = core.term
                        self._elected(n, gid, core.term)
                if quiet is not None:
                    quiet.observe(n.id, gid, core, faults_on)

    def _check_liveness(self) -> None:
        """Once the faults healed and the cluster had `liveness_ms` to settle: every group has a
        leader, no operation invoked since timed out, and some succeeded (definite refusals, e.g.
        NOT_LEADER at a follower, are fine: the client goes to the leader next)."""
        healed = self.healed_at
        if healed is None:
            return
        # An election may be under way (the leader balancer moves leaders; a slow disk delays the
        # vote and append acknowledgements, each of which waits for its persist step).
        bound = 4 * self.p.election_tick * self.p.tick_ms + 6 * self.p.persist_ms[1] * self.p.slow_disk
        for gid in sorted(self.safety):
            if self.moves is not None and not self.moves.exists(gid):
                continue  # dropped by a move
            if self.now - self.leader_seen.get(gid, -bound - 1) > bound:
                raise SimulationFailure(
                    f"liveness: group {gid} had no leader in the last {bound} ms ({self.p.heal_ms} ms after the heal)"
                )
        if self.late_timeouts:
            raise SimulationFailure(
                f"liveness: {len(self.late_timeouts)} operations invoked after the cluster settled timed out, "
                f"e.g. {self.late_timeouts[0]}"
            )
        if self.membership.steps:
            raise SimulationFailure(
                f"liveness: a membership change is still under way {self.p.heal_ms} ms after the heal "
                f"(next: {self.membership.steps[0]})"
            )
        unfinished = self.moves.check_finished() if self.moves is not None else None
        if unfinished:
            raise SimulationFailure(f"liveness: {unfinished} ({self.p.heal_ms} ms after the heal)")
        cutoff = healed + self.p.liveness_ms
        if not any(o.invoke >= cutoff and o.status == Status.OK for o in self.history):
            raise SimulationFailure("liveness: no operation succeeded after the cluster settled")

    # --- clients ----------------------------------------------------------------------------
    def _new_process(self) -> int:
        p = self._next_process
        self._next_process += 1
        self.sessions[p] = [next(self._client_ids), 1]
        return p

    def _client_next(self, process: int) -> None:
        if self.end is not None and self.now >= self.end - self.p.client_timeout_ms:
            return
        if process in self._one_shot:
            return
        rng = self.rng
        if self.quiet is not None and (wait := self.quiet.clients_wait()):
            self.at(min(wait, 100) + rng.randrange(0, 30), self._client_next, process)
            return
        key = f"k{rng.randrange(self.p.keys)}"
        r = rng.random()
        value: Any
        as_txn = False
        if r < 0.4:
            f, value = "get", None
        elif r < 0.75:
            f, value = "put", f"v{next(self._value)}"
        elif r < 0.95:
            exp = None if rng.random() < 0.2 else f"v{rng.randrange(max(1, next(self._value) - 1)) + 1}"
            n = next(self._value)
            f, value = "cas", (exp, f"v{n}")
            # every 4th compare-and-swap is proposed as the equivalent one-key transaction (TXN:
            # compare the value, or create = 0 for "absent"; put, else get), checked as a cas;
            # chosen by the value's number, so the seeds' random streams are unchanged
            as_txn = n % 4 == 0
        else:
            f, value = "delete", None
        hint = self.leader_hint.get(process, 0)
        members = [n for n in self.nodes.values() if not n.removed]
        anywhere = self.reads_params.anywhere if f == "get" else 0.2
        target = self.nodes[hint] if hint in self.nodes and not self.nodes[hint].removed and rng.random() >= anywhere \
            else rng.choice(members)
        if self.moves is not None:
            chosen = self.nodes.get(self.moves.target(process, key.encode()))
            if chosen is not None and not chosen.removed:
                target = chosen
        if f == "get" and (level := self.reads_params.level(rng)) != LINEARIZABLE:
            replica_reads.bounded_read(self, process, key, level, target)  # checked against its bound, not linearizable
            return
        self._invoke(process, f, key, value, target, as_txn=as_txn)

    def one_shot(self, f: str, key: str, value: Any, target: SimNode,
                 after: Callable[[Status, Any], None]) -> None:
        """One operation of a new client process that does nothing else (a put of a fresh
        value if `value` is None); `after(status, output)` once it completed."""
        process = self._new_process()
        self._one_shot.add(process)
        if f == "put" and value is None:
            value = f"v{next(self._value)}"
        self._invoke(process, f, key, value, target, after)

    def _invoke(self, process: int, f: str, key: str, value: Any, target: SimNode,
                after: Callable[[Status, Any], None] | None = None, as_txn: bool = False) -> None:
        """One client operation, as the client library does it: reads go to one node; writes
        carry the process's session (client id, seq) and are retried at the leader (hinted or
        another node) under the same session while an attempt's outcome is unknown, so the state
        machine's deduplication is what keeps a retried write from applying twice (a retry that
        reaches the leader while its first attempt is still pending there, in the same term, is
        joined to that entry by the real host instead: `kvstore/node/pending.py`)."""
        invoked = self.now
        finished = False
        op_id = next(self._op_ids)
        maybe_applied = False

        def done(status: Status, output: Any = None, via: int = 0) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.pending.pop(op_id, None)
            if status == Status.OK and via:
                self.leader_hint[process] = via
                if self.moves is not None:
                    self.moves.learned(process, key.encode(), via)
            if status == Status.FAIL and maybe_applied:
                status = Status.INFO  # an earlier attempt may have applied: indeterminate
            self.history.append(Operation(
                process=process, f=f, key=key, value=value, output=output, invoke=float(invoked),
                complete=None if status == Status.INFO else float(self.now), status=status,
            ))
            self.log(f"client p{process} {f} {key} {value!r} -> {status.value} {output!r}")
            if after is not None:
                after(status, output)
            if process in self._one_shot:
                return
            nxt = process
            if status == Status.INFO:  # Jepsen retires a process whose operation is indeterminate
                nxt = self._new_process()
                self.leader_hint[nxt] = self.leader_hint.pop(process, 0)
            self.at(self.rng.randrange(0, 30), self._client_next, nxt)

        def timeout() -> None:
            if not finished and self.healed_at is not None and invoked >= self.healed_at + self.p.liveness_ms:
                if self._key_in_moving_range(key):
                    # its range is still being moved at the deadline: the operation waited for the
                    # move, whose own progress the moves' liveness check bounds (`check_finished`).
                    # A range whose move finished before the deadline is not excused (a move that
                    # flips to a group that does not serve shows as exactly these timeouts).
                    self.log(f"late timeout of p{process} {f} {key}: its range is still moving")
                else:
                    self.late_timeouts.append(f"p{process} {f} {key} invoked at {invoked} ms")
            done(Status.INFO if f != "get" else Status.FAIL)

        self.pending[op_id] = timeout
        self.at(self.p.client_timeout_ms, timeout)
        k = key.encode()
        if f == "get":
            self._read(target, k, lambda out, ok, lead: done(Status.OK, out, lead) if ok else done(Status.FAIL))
            return
        session = self.sessions[process]
        cid, seq = session
        session[1] += 1

        def command(node: SimNode, retry: bool) -> bytes:
            rev = self._clock(node).propose()  # the proposing node's HLC, as the server's request path
            if f == "put":
                return commands.encode_put(k, value.encode(), cid, seq, seq, retry, revision=rev)
            if f == "delete":
                return commands.encode_delete(k, cid, seq, seq, retry, revision=rev)
            exp, new = value
            if as_txn:
                return commands.encode_command(commands.Command.transaction(
                    _cas_txn(k, exp, new), cid, seq, seq, retry, revision=rev))
            return commands.encode_cas(
                k, exp is None, (exp or "").encode(), new.encode(), cid, seq, seq, retry, revision=rev
            )

        def attempt(node: SimNode, n: int) -> None:
            if finished:
                return
            tried = False
            epoch = node.epoch

            def outcome(res: ApplyResult | None, err: errors.KVError | None, lead: int) -> None:
                nonlocal maybe_applied, tried
                if finished or tried:
                    return
                tried = True
                if err is None and res is not None and res.session_expired:
                    maybe_applied = True
                    done(Status.INFO)
                    return
                if err is None and not (res is not None and (res.wrong_shard or res.error)):
                    swapped = res is not None and (res.txn.succeeded if res.txn is not None else res.swapped)
                    done(Status.OK, bool(swapped) if f == "cas" else None, node.id)
                    return
                if err is not None and err.indeterminate:
                    maybe_applied = True
                wrong_shard = isinstance(err, errors.WrongShard) or (err is None and res is not None and res.wrong_shard)
                if self.moves is None and (n >= 4 or wrong_shard):
                    done(Status.FAIL)
                    return
                # (With range moves, like the client library: retried, the map refreshed after a
                # WRONG_SHARD, until the operation's deadline.)
                nxt = self.nodes.get(lead) if lead and lead != node.id else None
                if self.moves is not None and nxt is None:  # like the client library: refresh the map
                    if wrong_shard:
                        self.moves.refresh(process)
                    nxt = self.nodes.get(self.moves.target(process, k, avoid=node.id))
                if nxt is None or nxt.removed:
                    others = [x for x in self.nodes.values() if x.id != node.id and not x.removed]
                    nxt = self.rng.choice(others)
                self.at(self.rng.randrange(5, 40), attempt, nxt, n + 1)

            def lost() -> None:  # this attempt's reply never came: its outcome is unknown
                if not tried and node.epoch == epoch:
                    outcome(None, errors.Timeout("attempt timed out", indeterminate=True), 0)
                elif not tried:
                    outcome(None, errors.LeadershipLost("node crashed", indeterminate=True), 0)

            self.at(self.p.client_timeout_ms // 4, lost)
            self._write(node, k, command(node, retry=n > 0 and maybe_applied), outcome)

        attempt(target, 0)

    def _clock(self, node: SimNode) -> HybridClock:
        c = self.clocks.get(node.id)
        if c is None:
            c = self.clocks[node.id] = HybridClock(lambda: mvcc.EPOCH_MS + int(self._node_now(node) * 1000))
        return c

    def _route(self, node: SimNode, k: bytes) -> int:
        """The group `node` would serve `k` from (by its own shard map); raises a definite error
        when it cannot."""
        logic = node.logic
        if logic is None:
            raise errors.Unavailable(f"n{node.id} is down")
        smap = logic.shard_tracker.map
        if smap is None:
            raise errors.NoLeader(f"n{node.id} has no shard map yet")
        gid = smap.group_for_key(k)
        if gid not in logic.host.groups:
            raise errors.WrongShard(f"group {gid} is not on n{node.id}")
        return gid

    def _lead(self, node: SimNode, gid: int) -> int:
        g = node.logic.host.groups.get(gid) if node.logic is not None else None
        return g.core.lead if g is not None else 0

    def data_leaders(self) -> Iterator[tuple[SimNode, int]]:
        """(node, group) for each data group a live node leads now, by node then group: where
        a node's background work on its led groups (the intent sweep) runs."""
        for node in sorted(self.nodes.values(), key=lambda x: x.id):
            if node.removed or node.logic is None or node.store is None:
                continue
            for gid in sorted(node.logic.host.groups):
                if gid != 0 and self._lead(node, gid) == node.id:
                    yield node, gid

    def _write(self, node: SimNode, k: bytes, data: bytes,
               outcome: Callable[[ApplyResult | None, errors.KVError | None, int], None]) -> None:
        """Propose `data` at `node` (which must lead `k`'s group); `outcome(result, error, leader
        hint)` once applied or refused."""
        try:
            gid = self._route(node, k)
            assert node.logic is not None

            def answered(res: ApplyResult | None, err: errors.KVError | None) -> None:
                if err is None and res is not None and not (res.wrong_shard or res.error or res.session_expired):
                    self.stale_check.acked(gid, res.index, self.now)  # the bound reads are checked against
                    self.revisions.on_reply(gid, res)
                    self._clock(node).observe(res.revision)
                if self.p.reply_loss and self._faults_on() and self.rng.random() < self.p.reply_loss:
                    self.log(f"n{node.id} reply to a write in g{gid} lost")
                    return  # the client's attempt times out: its outcome is unknown
                if self.closed_reads is not None and err is None and res is not None and not res.error:
                    self.closed_reads.ack(res.revision)
                outcome(res, err, self._lead(node, gid))

            node.logic.host.propose(gid, data, answered)
        except errors.KVError as err:
            lead = err.leader_id if isinstance(err, errors.NotLeader) else 0
            self.at(1, outcome, None, err, lead)
            return
        self._kick(node)

    def _read(self, node: SimNode, k: bytes, answer: Callable[[str | None, bool, int], None]) -> None:
        """A linearizable read at `node`, leader or follower (`kvstore.node.reads` through
        `replica_reads`): `answer(value, ok, leader hint)`."""
        replica_reads.linearizable_read(self, node, k, answer)

    # --- nemesis ----------------------------------------------------------------------------
    def _faults_on(self) -> bool:
        return self.healed_at is None and not (self.quiet is not None and self.quiet.calm)

    def fail(self, msg: str) -> None:
        raise SimulationFailure(msg)

    def changing_membership(self) -> bool:
        return bool(self.membership.steps)

    def heal_all(self) -> None:
        self._heal_all()

    def _nemesis(self) -> None:
        if not self._faults_on():
            return
        rng = self.rng
        r = rng.random()
        alive = [n for n in self.nodes.values() if n.alive]
        if r < 0.45 and self._churning():
            pass  # the scenario shapes the network meanwhile
        elif r < 0.3:
            ids = sorted(self.nodes)
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            a, b = ids[:cut], ids[cut:]
            self.blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
            self.log(f"PARTITION {sorted(a)} | {sorted(b)}")
        elif r < 0.45:
            self.blocked.clear()
            self.log("HEAL network")
        elif r < 0.65 and alive:
            victim = rng.choice(alive)
            self.crash(victim.id)
            self.at(rng.randrange(20, 600), self.restart, victim.id)
        elif r < 0.75 and alive:
            n = rng.choice(alive)
            assert n.logic is not None
            for gid, g in sorted(n.logic.host.groups.items()):
                if g.core.role == Role.LEADER:
                    try:
                        n.logic.host.transfer_leader(gid, 0)
                        self.log(f"n{n.id} TRANSFER g{gid}")
                    except errors.KVError:
                        pass
            self._kick(n)
        elif r < 0.85 and self.p.membership:
            self.membership.start_replace()
        elif r < 0.9:
            self._forge()
        elif r < 0.95 and alive:
            n = rng.choice(alive)
            if isinstance(n.store, MemoryNodeStore):
                n.store.fill_disk()
                self.log(f"n{n.id} DISK FULL")
                self.at(rng.randrange(50, 800), self._free_space, n.id, n.store)
        self.at(rng.randrange(*self.p.nemesis_every_ms), self._nemesis)

    def _elected(self, n: SimNode, gid: int, term: int) -> None:
        """A new leader of `gid` on `n`: with `flap`, cut it off from every other node shortly."""
        self.log(f"n{n.id} LEADER g{gid} term {term}")
        if self.p.flap and self._faults_on() and not self._churning() and self.rng.random() < self.p.flap:
            self.at(self.rng.randint(*self.p.flap_ms), self._cut_off, n.id, n.epoch, gid)

    def _churning(self) -> bool:
        """The competing-suffixes scenario runs: it alone shapes the network meanwhile."""
        return self.churn is not None and self.churn.active

    def _cut_off(self, nid: int, epoch: int, gid: int) -> None:
        n = self.nodes[nid]
        if not self._faults_on() or self._churning() or n.epoch != epoch or n.logic is None:
            return
        cut = {(nid, o) for o in self.nodes if o != nid} | {(o, nid) for o in self.nodes if o != nid}
        self.blocked = cut
        self.log(f"FLAP: n{nid} cut off after its election in g{gid}")
        self.at(self.rng.randrange(100, 600), self._rejoin, cut)

    def _rejoin(self, cut: set[tuple[int, int]]) -> None:
        if self.blocked == cut and self._faults_on() and not self._churning():
            self.blocked = set()
            self.log("FLAP: healed")

    def _forge(self) -> None:
        """The outsider's burst: what would steer a group or rewrite its log if it got through."""
        rng = self.rng
        for n in sorted(self.nodes.values(), key=lambda x: x.id):
            if n.logic is None:
                continue
            for gid, g in sorted(n.logic.host.groups.items()):
                core = g.core
                t = core.term + rng.randint(1, 3)
                last = core.log.last_index()
                put = commands.encode_put(f"k{rng.randrange(self.p.keys)}".encode(), b"FORGED")
                for m in (
                    Message(MessageType.VOTE, n.id, FORGER, term=t, group=gid, index=last + 100, log_term=t,
                            context=CAMPAIGN_TRANSFER),
                    Message(MessageType.HEARTBEAT, n.id, FORGER, term=t, group=gid, commit=core.log.committed),
                    Message(MessageType.TIMEOUT_NOW, n.id, FORGER, term=core.term, group=gid),
                    Message(MessageType.APP, n.id, FORGER, term=t, group=gid, index=last,
                            log_term=core.log.last_term(), commit=last + 1,
                            entries=[Entry(t, last + 1, EntryType.NORMAL, put, gid)]),
                    Message(MessageType.HEARTBEAT, n.id, FORGER, term=t, group=gid + 500),
                ):
                    self.forged += 1
                    self.at(rng.randint(*self.p.delay_ms), self._deliver, m)
        self.log("FORGE burst from outsider n1000")
        self._forge_as_member()

    def _forge_as_member(self) -> None:
        """A rogue member's burst: messages under the id of a real member of the group (a peer
        whose identity check was bypassed, or a broken member) that no correct member could
        send, so that only the group-level admission rules (`kvstore.raft.admission`) stand
        between them and the core: a TIMEOUT_NOW from a member that is not the leader (an
        election that skips the leader's lease), an APP_RESP acknowledging entries beyond the
        leader's log (the leader would count a replica that does not hold them), and a term
        jump beyond `MAX_TERM_JUMP`. Each is made when it arrives, against the receiver's state
        then (a forged acknowledgement within the log would be indistinguishable from a real
        one), and delivered past the network and the node's liveness view (the impersonated
        member may be down or cut off)."""
        rng = self.rng
        for n in sorted(self.nodes.values(), key=lambda x: x.id):
            if n.logic is None:
                continue
            for gid in sorted(n.logic.host.groups):
                for kind in ("timeout_now", "app_resp", "term_jump"):
                    self.forged += 1
                    self.at(rng.randint(*self.p.delay_ms), self._deliver_forged, n.id, gid, kind)
        self.log("FORGE burst under members' ids")

    def _deliver_forged(self, nid: int, gid: int, kind: str) -> None:
        dst = self.nodes.get(nid)
        g = dst.logic.host.groups.get(gid) if dst is not None and dst.logic is not None else None
        if dst is None or dst.logic is None or g is None:
            return
        core, rng = g.core, self.rng
        others = [v for v in core.conf.voters if v != nid]
        if kind == "timeout_now":
            others = [v for v in others if v != core.lead]
        if not others or (kind == "app_resp" and core.role != Role.LEADER):
            return
        frm = rng.choice(others)
        if kind == "timeout_now":
            m = Message(MessageType.TIMEOUT_NOW, nid, frm, term=core.term, group=gid)
        elif kind == "app_resp":
            m = Message(MessageType.APP_RESP, nid, frm, term=core.term, group=gid,
                        index=core.log.last_index() + rng.randint(1, 4))
        else:
            m = Message(MessageType.HEARTBEAT, nid, frm, term=core.term + MAX_TERM_JUMP + rng.randint(1, 1000),
                        group=gid)
        ok = dst.logic.deliver(m)
        self.log(f"{'ADMITTED' if ok else 'REFUSED'} forged n{m.frm} -> n{m.to} g{m.group} {m.type.name} "
                 f"t{m.term} i{m.index}")
        if ok:
            self._kick(dst)

    def _free_space(self, nid: int, store: NodeStore) -> None:
        if isinstance(store, MemoryNodeStore):
            store.free_space()
            self.log(f"n{nid} DISK HAS ROOM AGAIN")

    def calm_down(self) -> None:
        """Faults stop: the network heals, disks have room and no faults, crashed nodes restart."""
        self.blocked.clear()
        for nid, n in sorted(self.nodes.items()):
            if isinstance(n.store, MemoryNodeStore):
                n.store.free_space()
                n.store.rates = FaultRates()
            if n.logic is None:
                self.restart(nid)

    def _heal_all(self) -> None:
        self.calm_down()
        self.healed_at = self.now
        self.end = self.now + self.p.heal_ms
        self._moves_at_heal = self._moves_done()
        self.log("HEAL ALL (faults stop)")

    def _key_in_moving_range(self, key: str) -> bool:
        """Is `key` in a range some unfinished range move (in the newest map any node holds)
        is moving? Writes to it wait for the move's freeze and flip."""
        m = self.moves.final_map() if self.moves is not None else None
        if m is None or not m.moves:
            return False
        h = key_hash(key.encode())
        return any(h in mv.ranges for mv in m.moves)

    def _moves_done(self) -> int:
        m = self.moves.final_map() if self.moves is not None else None
        return 0 if m is None else m.next_move - 1 - len(m.moves)

    def _extend_for_moves(self) -> bool:
        """At the end of the run: range-move work still pending (moves, or a group they drained
        and the coordinator has not dropped yet), but some moves finished since the heal (the
        coordinator drives moves one by one, and an admin may have queued many during the
        faults)? Then the run goes on once for another `heal_ms`, and all of it must have
        finished by then. A stalled coordinator (no move finished since the heal) gets no extra
        time. Runs that finished their moves in time are unchanged (same events, same result)."""
        if self._extended or self.moves is None or self.end is None:
            return False
        m = self.moves.final_map()
        if m is None or self._moves_done() <= self._moves_at_heal:
            return False
        pending = self.moves.check_finished()  # moves, or a drained group not dropped yet
        if pending is None:
            return False
        self._extended = True
        self.end += self.p.heal_ms
        self.log(f"EXTEND the run by {self.p.heal_ms} ms: {pending}, "
                 f"{self._moves_done() - self._moves_at_heal} moves finished since the heal")
        return True


    def _extend_for_leases(self) -> bool:
        """At the end of the run, with leases and range moves on: a lease revoked so recently
        that its keys' deletion may still be under way, one of them moved to another group since
        its attach? Then the run goes on once for `leases.SETTLE_MS`, so the end check sees
        where the move put the key (a move carries its attachment). Other runs are unchanged."""
        if self._extended_leases or self.leases is None or self.moves is None or self.end is None:
            return False
        if not self.leases.moved_key_settling():
            return False
        self._extended_leases = True
        self.end += LEASE_SETTLE_MS
        self.log(f"EXTEND the run by {LEASE_SETTLE_MS} ms: a moved key's lease was revoked just now")
        return True

    def _extend_for_txns(self) -> bool:
        """At the end of the run, with the general transactions: one of them still holds an
        intent (`TxnModel.unfinished`: the end came between its commit point and a COMMIT its
        coordinator gave up, so the group has not applied that COMMIT yet, though a reader there
        is held off by the intent until a resolver or the record sweep applies it)? Then the run
        goes on once for `txn_model.SETTLE_MS` (and twice the largest clock offset), so that the model is checked against the history
        every reader sees (seed 3919). Other runs are unchanged."""
        if self._extended_txns or self.txn_model is None or self.end is None:
            return False
        pending = self.txn_model.unfinished()
        if pending is None:
            return False
        self._extended_txns = True
        self.txn_model.stats.settled = 1
        # the intent expires by the clock of the group leader that meets it, which may be up to
        # two clock offsets behind the coordinator's that stamped its start
        more = TXN_SETTLE_MS + 2 * self.p.clock_offset_ms
        self.end += more
        self.log(f"EXTEND the run by {more} ms: {pending}")
        return True


def syncs_writes(params: NodeSimParams) -> bool:
    """Do the nodes' stores make each transaction durable before the node goes on? (The planted
    bug "ack-before-fsync" says no: acknowledgements then precede durability.)"""
    return params.sync


STATE_SYNC: str | None = None
"""Overrides every run's `NodeSimParams.state_sync` (`python -m chaos.sim --state-sync`)."""


def memory_store(sim: NodeSimulation) -> StoreFactory:
    """In-memory stores with the run's disk faults: failed fsyncs and torn writes at the seed's
    rates (a crash recovers only what was synced). A store made once the faults stopped (after
    the heal, or in the quiet scenario's calm: a replacement node started then) has none, like
    every other store from then on (`calm_down`)."""
    rates = FaultRates(fsync=sim.p.fsync_fail, torn=sim.p.torn_write)

    def factory(node_id: int, directory: Path) -> NodeStore:
        return MemoryNodeStore(sync=syncs_writes(sim.p), rng=random.Random(sim.rng.getrandbits(64)),
                               rates=rates if sim._faults_on() else FaultRates(), snapshot_chunk_size=4096,
                               state_sync=STATE_SYNC or sim.p.state_sync)

    return factory


def lmdb_store(node_id: int, directory: Path) -> NodeStore:
    """The real LMDB store without fsync (a crash here recovers the last committed transaction:
    the page cache survives a simulated crash, as it survives kill -9)."""
    directory.mkdir(parents=True, exist_ok=True)
    return LmdbNodeStore(directory / "db", sync=False, map_size=1 << 26)


def run_node_seed(seed: int, nodes: int = 3, trace: bool = False, params: NodeSimParams | None = None,
                  store_factory: StoreFactory | None = None, moves: bool | None = None,
                  quiesce: bool | None = None, closed_reads: bool | None = None,
                  watches: bool | None = None, txn_pairs: bool | Literal["ranges"] | None = None,
                  leases: bool | None = None, txns: bool | None = None,
                  locks: bool | None = None, lease_txns: bool = False) -> NodeSimResult:
    """One seed; `moves` forces range moves on or off (default: drawn, on half of the seeds),
    `quiesce` quiescence (default: `quiesce_by_default`), `closed_reads` the cross-group scans
    (default: `closed_reads_by_default`, when the params are drawn), `watches` the watchers
    (default: `watches_by_default`, when the params are drawn), `txn_pairs` the pair
    transactions (default: off; "ranges": on, range-delete heavy, `TxnPairs.ranges`), `leases` the lease clients (default: off), `txns` the general
    transactions checked against a model (default: off), `locks` the lock clients with fencing
    (default: off), `lease_txns` (with `leases`) the lease clients attaching both keys of a
    lease in one transaction across groups, half the time (default: off)."""
    return NodeSimulation(
        seed, nodes, params, trace, store_factory, moves=moves, quiesce=quiesce, closed_reads=closed_reads,
        watches=watches, txn_pairs=txn_pairs, leases=leases, txns=txns, locks=locks, lease_txns=lease_txns,
    ).run()


def _cas_txn(key: bytes, expected: str | None, new: str) -> txn.Txn:
    """The one-key transaction equivalent to a CAS of `key` (expected None: "absent")."""
    cmp = (txn.Compare(key, txn.Target.CREATE, txn.CmpResult.EQUAL, b"", 0) if expected is None
           else txn.Compare(key, txn.Target.VALUE, txn.CmpResult.EQUAL, expected.encode()))
    return txn.Txn((cmp,), (txn.TxnOp(txn.OpKind.PUT, key, new.encode()),), (txn.TxnOp(txn.OpKind.GET, key),))


def _txn_puts(t: txn.Txn) -> list[tuple[bytes, bytes]]:
    """Every (key, value) a PUT anywhere in `t` may write."""
    out: list[tuple[bytes, bytes]] = []
    for op in (*t.success, *t.failure):
        if op.kind == txn.OpKind.PUT:
            out.append((op.key, op.value))
        elif op.txn is not None:
            out += _txn_puts(op.txn)
    return out
