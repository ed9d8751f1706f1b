"""A seeded, deterministic simulation of a kvstore Raft group.

The real `kvstore.raft.RaftNode` runs on 3 or 5 simulated nodes. One `random.Random(seed)` drives
everything: message delay, loss, duplication and reordering; partitions of every shape; crashes
that lose whatever was not yet durable; restarts; membership changes; leadership transfers;
snapshots and log compaction; clients doing put / delete / cas / linearizable get. Safety
properties are checked after every event (see `invariants`), the client history is checked for
linearizability at the end, and liveness is checked after the faults heal.

Quiescence (on for about half the seeds by default, see `quiesce_by_default`; `--quiesce on|off`
forces it): nodes run with `Config.quiesce_ticks`, the workload pauses now and then so the group
goes quiet, and every node models the host's node-level liveness: each tick it pings every peer
through the simulated network (partitions, loss, delay and crashes apply; pings are not part of
the client history) and calls `wake()` when it has not heard from its group's leader for an
election timeout. Before the final heal a scenario stops the faults, lets the group quiesce,
then crashes or isolates the quiesced leader: a new leader must be elected and commit a client
write within a bound, and (isolation) a read sent to the old leader must not see stale data.

Time is integer milliseconds of simulated time. A node's work on a Ready is split in two events,
as a real host does it: *start* (take the Ready, send the messages that need not wait) and
*persist* (make entries and hard state durable, send the rest, apply, advance). A crash between
the two loses the Ready.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.checker import Verdict, check
from chaos.checker.history import Operation, Status
from kvstore.raft import (
    CAMPAIGN_TRANSFER,
    NONE,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RaftNode,
    Ready,
    Role,
    admission,
)

from .invariants import SafetyChecker, SafetyViolation
from .kvsm import KVStateMachine, encode_command

FORGER = 1000
"""The outsider's node id: never a member (the simulator's members are numbered from 1 up)."""


@dataclass(slots=True)
class SimParams:
    """Knobs of one run, drawn from the seed."""

    nodes: int = 3
    tick_ms: int = 10
    election_tick: int = 10
    heartbeat_tick: int = 2
    lease_read: bool = False
    fault_ms: int = 3000
    heal_ms: int = 4000
    """Quiet period after the faults heal; liveness must hold within it."""
    liveness_ms: int = 2500
    """Operations invoked this long after the heal must all succeed."""
    clients: int = 4
    keys: int = 3
    client_timeout_ms: int = 600
    loss: float = 0.02
    duplicate: float = 0.02
    delay_ms: tuple[int, int] = (1, 8)
    long_delay: float = 0.02
    persist_ms: tuple[int, int] = (0, 4)
    nemesis_every_ms: tuple[int, int] = (80, 400)
    max_log: int = 150
    """Compact a node's log when it grows past this many entries."""
    crash_after_vote: float = 0.0
    """Chance a node crashes right after its vote became durable and was sent (then restarts)."""
    crash_after_append: float = 0.0
    """Chance a leader crashes right after sending appends (before they are acknowledged)."""
    crash_after_ack: float = 0.0
    """Chance a node crashes right after acknowledging client writes (before telling followers
    the new commit index)."""
    quiesce_ticks: int = 0
    """Config.quiesce_ticks of every node; 0 runs without quiescence (and without pings, idle
    gaps and the quiesced-leader scenario, so such runs are exactly what they were before)."""
    idle_every_ms: tuple[int, int] = (300, 900)
    """With quiescence: time between the starts of two pauses of the whole workload."""
    idle_ms: tuple[int, int] = (150, 700)
    """With quiescence: length of one pause of the workload."""
    quiesce_within_ms: int = 4000
    """Scenario bound: once faults stop and clients idle, the leader must quiesce within this."""
    recover_within_ms: int = 3000
    """Scenario bound: after its quiesced leader is crashed or isolated, the group must elect a
    new leader that commits a client write within this."""

    @classmethod
    def draw(cls, rng: random.Random, nodes: int) -> SimParams:
        return cls(
            nodes=nodes,
            lease_read=rng.random() < 0.3,
            election_tick=rng.choice((5, 10)),
            heartbeat_tick=rng.choice((1, 2)),
            loss=rng.choice((0.0, 0.01, 0.05, 0.1)),
            duplicate=rng.choice((0.0, 0.02, 0.1)),
            delay_ms=rng.choice(((1, 3), (1, 8), (2, 20))),
            long_delay=rng.choice((0.0, 0.02, 0.05)),
            persist_ms=rng.choice(((0, 1), (0, 4), (1, 15))),
            nemesis_every_ms=rng.choice(((50, 250), (80, 400), (200, 800))),
            max_log=rng.choice((40, 150, 1000)),
            keys=rng.choice((1, 2, 3)),
            clients=rng.choice((3, 4, 6)),
            crash_after_vote=rng.choice((0.0, 0.0, 0.1, 0.3)),
            crash_after_append=rng.choice((0.0, 0.0, 0.005, 0.02)),
            crash_after_ack=rng.choice((0.0, 0.0, 0.02, 0.1)),
        )


def quiesce_by_default(seed: int) -> bool:
    """Whether a seed runs with quiescence unless told otherwise: a fixed half of all seeds,
    decided apart from the seed's own random stream."""
    return random.Random(f"quiesce:{seed}").random() < 0.5


@dataclass(slots=True)
class QuiesceStats:
    """What quiescence did in one run (all zero when it is off)."""

    leader_quiesces: int = 0
    leader_quiesces_under_faults: int = 0
    """Of those, while the nemesis was active (before the scenario)."""
    follower_quiesces: int = 0
    wakes: int = 0
    host_wakes: int = 0
    """wake() calls by the simulated host's node-level liveness that woke a quiesced node."""
    scenario: str = ""
    """The quiesced-leader scenario: "crash", "isolate", "skipped (...)" or "" (not run)."""
    recovered_ms: int | None = None
    """Scenario: time from the fault to a new leader that committed a client write."""


@dataclass(slots=True)
class PendingWrite:
    term: int
    done: Callable[[Status, Any], None]


@dataclass(slots=True)
class SimNode:
    id: int
    storage: MemoryStorage
    sm: KVStateMachine = field(default_factory=KVStateMachine)
    core: RaftNode | None = None
    epoch: int = 0
    tick_ms: int = 10
    ready_busy: bool = False
    writes: dict[int, list[PendingWrite]] = field(default_factory=dict)
    reads: dict[bytes, Callable[[Status, Any], None]] = field(default_factory=dict)
    ready_reads: list[tuple[int, bytes]] = field(default_factory=list)
    removed: bool = False
    seen_commit: int = 0
    last_heard: dict[int, int] = field(default_factory=dict)
    """Host liveness (quiescence runs): when a ping from each peer last arrived."""
    booted_at: int = 0
    quiesced_seen: bool = False

    @property
    def alive(self) -> bool:
        return self.core is not None


class SimulationFailure(AssertionError):
    pass


@dataclass
class SimResult:
    seed: int
    ok: bool
    violation: str | None
    ops: int
    events: int
    sim_ms: int
    verdict: str
    history: list[Operation]
    trace: list[str]
    quiesce_ticks: int = 0
    quiesce: QuiesceStats = field(default_factory=QuiesceStats)


class Simulation:
    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        params: SimParams | None = None,
        trace: bool = False,
        quiesce: bool | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.p = params or SimParams.draw(self.rng, nodes)
        if quiesce is None and params is None:
            quiesce = quiesce_by_default(seed)
        if quiesce is not None and quiesce != bool(self.p.quiesce_ticks):
            # (Only quiescence runs draw anything more from the seed's random stream.)
            self.p.quiesce_ticks = self.rng.choice((2, 4, 8)) if quiesce else 0
        self.qstats = QuiesceStats()
        self.idle_until = -1
        """With quiescence: clients start no operation before this time."""
        self.calm = False
        """The quiesced-leader scenario runs: no nemesis, no crash_after_* faults."""
        self.end: int | None = None
        """End of the run: set when the faults heal."""
        self._one_shot: set[int] = set()
        """Client processes that do one operation only (the scenario's)."""
        self._ping_cb = self._deliver_ping
        self.now = 0
        self._seq = itertools.count()
        self._events: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self.events_run = 0
        self.trace_on = trace
        self.trace: list[str] = []
        self.safety = SafetyChecker()
        self.blocked: set[tuple[int, int]] = set()
        self.forged_sent = 0
        self.forged_refused = 0
        """Messages the outsider sent, and messages admission refused (the outsider's and any
        other message no member of the group could send)."""
        self.nodes: dict[int, SimNode] = {}
        self.next_id = self.p.nodes + 1
        self.history: list[Operation] = []
        self.healed_at: int | None = None
        self.workload_on = True
        self._next_process = 0
        self._ctx = itertools.count(1)
        self._value = itertools.count(1)
        self.pending: dict[int, Callable[[], None]] = {}
        self._op_ids = itertools.count()
        self.leader_hint: dict[int, int] = {}
        """Each client's belief of who leads (a client library's leader cache)."""
        initial = ConfState(tuple(range(1, self.p.nodes + 1)))
        for nid in range(1, self.p.nodes + 1):
            self._create_node(nid, initial)

    # --- event loop -------------------------------------------------------------------------
    def at(self, delay: int, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (self.now + max(0, delay), next(self._seq), fn, args))

    def log(self, msg: str) -> None:
        if self.trace_on:
            self.trace.append(f"{self.now:7d}ms {msg}")

    def run(self) -> SimResult:
        violation: str | None = None
        try:
            self._start()
            ping = self._ping_cb
            while self._events and (self.end is None or self._events[0][0] <= self.end):
                t, _, fn, args = heapq.heappop(self._events)
                self.now = t
                fn(*args)
                self.events_run += 1
                if fn is not ping:  # a ping changes no core
                    self._check_nodes()
            self._check_liveness()
            # Operations still in flight at the end are indeterminate (writes) or void (reads).
            for op_timeout in list(self.pending.values()):
                op_timeout()
        except (SafetyViolation, SimulationFailure) as err:
            violation = f"{type(err).__name__}: {err}"
            self.log(f"VIOLATION {violation}")
        except Exception as err:  # any exception escaping the core is a bug it detected in itself
            violation = f"core raised {type(err).__name__}: {err}"
            self.log(f"VIOLATION {violation}")
        verdict = "skipped"
        if violation is None:
            res = check(self.history, timeout=20.0)
            verdict = res.verdict.value
            if res.verdict == Verdict.NOT_LINEARIZABLE:
                shown = "; ".join(_fmt_op(o) for o in res.counterexample[:12])
                violation = f"linearizability: key {res.bad_key!r} cannot be linearized: {shown}"
            elif res.verdict == Verdict.UNKNOWN:
                violation = "linearizability: checker gave up (unknown)"
        return SimResult(
            self.seed, violation is None, violation, len(self.history), self.events_run, self.now,
            verdict, self.history, self.trace, self.p.quiesce_ticks, self.qstats,
        )

    def _start(self) -> None:
        for n in self._sorted_nodes():
            self.at(self.rng.randrange(n.tick_ms), self._tick, n.id, n.epoch)
        for _ in range(self.p.clients):
            self.at(self.rng.randrange(50, 300), self._client_next, self._new_process())
        self.at(self.rng.randrange(*self.p.nemesis_every_ms), self._nemesis)
        if self.p.quiesce_ticks:
            self.at(self.rng.randrange(*self.p.idle_every_ms), self._idle_gap)
            self.at(self.p.fault_ms, self._quiet_scenario)
        else:
            self.at(self.p.fault_ms, self._heal_all)

    def _faults_on(self) -> bool:
        return self.healed_at is None and not self.calm

    def _sorted_nodes(self) -> list[SimNode]:
        return [self.nodes[k] for k in sorted(self.nodes)]

    # --- nodes ------------------------------------------------------------------------------
    def _create_node(self, nid: int, conf: ConfState) -> SimNode:
        n = SimNode(nid, MemoryStorage.bootstrap(conf) if conf.voters else MemoryStorage(), tick_ms=self.p.tick_ms + self.rng.choice((0, 0, 1)))
        self.nodes[nid] = n
        self._boot(n)
        return n

    def _boot(self, n: SimNode) -> None:
        cfg = Config(
            id=n.id,
            election_tick=self.p.election_tick,
            heartbeat_tick=self.p.heartbeat_tick,
            applied=n.sm.applied,
            lease_read=self.p.lease_read,
            lease_drift_ticks=2,
            max_inflight_msgs=self.rng.choice((1, 4, 64)),
            max_size_per_msg=self.rng.choice((200, 4096, 1 << 20)),
            quiesce_ticks=self.p.quiesce_ticks,
        )
        n.core = RaftNode(cfg, n.storage, random.Random(self.rng.getrandbits(64)))
        n.seen_commit = n.core.committed
        n.last_heard = {}
        n.booted_at = self.now
        n.quiesced_seen = False
        n.ready_busy = False
        n.writes = {}
        n.reads = {}
        n.ready_reads = []

    def crash(self, nid: int) -> None:
        n = self.nodes[nid]
        if not n.alive:
            return
        self.log(f"n{nid} CRASH")
        n.core = None
        n.epoch += 1
        # In-flight client requests on the node die with it: their clients time out.
        n.writes = {}
        n.reads = {}
        n.ready_reads = []

    def restart(self, nid: int) -> None:
        n = self.nodes[nid]
        if n.alive or n.removed:
            return
        self.log(f"n{nid} RESTART (term {n.storage.hard_state.term}, applied {n.sm.applied})")
        n.epoch += 1
        self._boot(n)
        self.at(self.rng.randrange(n.tick_ms), self._tick, n.id, n.epoch)

    def _tick(self, nid: int, epoch: int) -> None:
        n = self.nodes[nid]
        if n.epoch != epoch or n.core is None:
            return
        if self.p.quiesce_ticks:
            self._host_liveness(n)
        n.core.tick()
        self._kick(n)
        self.at(n.tick_ms, self._tick, nid, epoch)

    # --- node-level liveness (the host's, with quiescence) ---------------------------------
    def _host_liveness(self, n: SimNode) -> None:
        """What the real host does every tick: ping every peer, and wake the groups whose
        leader's node has been silent for an election timeout."""
        for peer in sorted(self.nodes):
            if peer != n.id and not self.nodes[peer].removed:
                self._send_ping(n.id, peer)
        core = n.core
        assert core is not None
        lead = core.lead
        if lead in (NONE, n.id):
            return
        if self.now - n.last_heard.get(lead, n.booted_at) >= self.p.election_tick * n.tick_ms:
            if core.quiesced:
                self.qstats.host_wakes += 1
                self.log(f"n{n.id} host: no ping from leader n{lead} for an election timeout; wake()")
            core.wake()
            self._kick(n)

    def _send_ping(self, frm: int, to: int) -> None:
        if self.rng.random() < self.p.loss:
            return
        d = self.rng.randint(*self.p.delay_ms)
        if self.rng.random() < self.p.long_delay:
            d += self.rng.randint(20, 300)
        self.at(d, self._ping_cb, frm, to)

    def _deliver_ping(self, frm: int, to: int) -> None:
        dst = self.nodes.get(to)
        if dst is not None and dst.core is not None and (frm, to) not in self.blocked:
            dst.last_heard[frm] = self.now

    def _kick(self, n: SimNode) -> None:
        if n.core is not None and not n.ready_busy and n.core.has_ready():
            n.ready_busy = True
            self.at(self.rng.randrange(0, 2), self._ready_start, n.id, n.epoch)

    def _ready_start(self, nid: int, epoch: int) -> None:
        n = self.nodes[nid]
        if n.epoch != epoch or n.core is None:
            return
        rd = n.core.ready()
        for m in rd.messages:
            self._send(m)
        if (
            self._faults_on()
            and any(m.type == MessageType.APP and m.entries for m in rd.messages)
            and self.rng.random() < self.p.crash_after_append
        ):
            self.crash(nid)
            self.at(self.rng.randrange(1, 300), self.restart, nid)
            return
        self.at(self.rng.randint(*self.p.persist_ms), self._ready_persist, nid, epoch, rd)

    def _ready_persist(self, nid: int, epoch: int, rd: Ready) -> None:
        n = self.nodes[nid]
        if n.epoch != epoch or n.core is None:
            return  # crashed before the batch became durable: it is lost
        core = n.core
        st = n.storage
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
            n.sm.restore(rd.snapshot.meta.index, rd.snapshot.data)
            self.log(f"n{nid} installed snapshot at {rd.snapshot.meta.index}")
        if rd.entries:
            st.append(rd.entries)
            first = st.first_index()
            prev = [st.term(e.index - 1) if e.index - 1 >= first - 1 else None for e in rd.entries]
            self.safety.on_persist(nid, rd.entries, prev)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        for m in rd.persisted_messages:
            self._send(m)
        acked = False
        for e in rd.committed_entries:
            self.safety.on_apply(nid, e)
            if e.index <= n.sm.applied:
                raise SafetyViolation(f"n{nid} asked to apply {e.index} again (applied {n.sm.applied})")
            result = None
            if e.type == EntryType.NORMAL and e.data:
                result = n.sm.apply(e.index, e.data)
            else:
                n.sm.skip(e.index)
            for w in n.writes.pop(e.index, []):
                if w.term == e.term:
                    w.done(Status.OK, result)
                    acked = True
                else:
                    w.done(Status.FAIL, None)  # another entry won this index: ours never commits
        n.ready_reads.extend((rs.index, rs.context) for rs in rd.read_states)
        core.advance(rd)
        n.ready_busy = False
        if acked and self._faults_on() and self.rng.random() < self.p.crash_after_ack:
            self.crash(nid)
            self.at(self.rng.randrange(20, 300), self.restart, nid)
            return
        if (
            self._faults_on()
            and self.p.crash_after_vote
            and any(m.type == MessageType.VOTE_RESP and not m.reject for m in rd.persisted_messages)
            and self.rng.random() < self.p.crash_after_vote
        ):
            self.crash(nid)
            self.at(self.rng.randrange(0, 3), self.restart, nid)
            return
        self._serve_reads(n)
        self._maybe_compact(n)
        self._kick(n)

    def _serve_reads(self, n: SimNode) -> None:
        if not n.ready_reads:
            return
        keep = []
        for index, ctx in n.ready_reads:
            if index <= n.sm.applied:
                cb = n.reads.pop(ctx, None)
                if cb is not None:
                    cb(Status.OK, n.sm)
            else:
                keep.append((index, ctx))
        n.ready_reads = keep

    def _maybe_compact(self, n: SimNode, force: bool = False) -> None:
        core = n.core
        if core is None:
            return
        st = n.storage
        applied = n.sm.applied
        if applied < st.first_index():
            return
        if not force and st.last_index() - st.first_index() < self.p.max_log:
            return
        st.create_snapshot(applied, core.conf_state_at(applied), n.sm.snapshot())
        keep = self.rng.choice((0, 5, 20))
        st.compact(max(st.first_index() - 1, applied - keep))
        self.log(f"n{n.id} snapshot at {applied}, log now [{st.first_index()}, {st.last_index()}]")

    # --- network ----------------------------------------------------------------------------
    def _send(self, m: Message) -> None:
        if self.rng.random() < self.p.loss:
            self._dropped(m)
            return
        copies = 2 if self.rng.random() < self.p.duplicate else 1
        for _ in range(copies):
            d = self.rng.randint(*self.p.delay_ms)
            if self.rng.random() < self.p.long_delay:
                d += self.rng.randint(20, 300)
            self.at(d, self._deliver, m)

    def _dropped(self, m: Message) -> None:
        if m.type == MessageType.SNAP:
            sender = self.nodes.get(m.frm)
            if sender is not None and sender.core is not None:
                sender.core.report_snapshot(m.to, failed=True)
                self._kick(sender)

    def _deliver(self, m: Message) -> None:
        dst = self.nodes.get(m.to)
        if dst is None or dst.core is None or (m.frm, m.to) in self.blocked:
            self._dropped(m)
            return
        reason = admission.refusal(dst.core, m, is_member=self.nodes.__contains__)
        if reason is not None:
            self.forged_refused += 1
            if self.trace_on:
                self.log(f"REFUSED ({reason}) {_fmt_msg(m)}")
            return
        if self.trace_on and m.type not in (MessageType.HEARTBEAT, MessageType.HEARTBEAT_RESP):
            self.log(_fmt_msg(m))
        dst.core.step(m)
        self._kick(dst)
        if m.type == MessageType.SNAP:
            sender = self.nodes.get(m.frm)
            if sender is not None and sender.core is not None:
                sender.core.report_snapshot(m.to, failed=False)
                self._kick(sender)

    # --- safety -----------------------------------------------------------------------------
    def _check_nodes(self) -> None:
        for n in self.nodes.values():
            core = n.core
            if core is None:
                continue
            if core.committed > n.seen_commit:
                log = core.log
                for i in range(max(n.seen_commit + 1, log.first_index()), core.committed + 1):
                    self.safety.on_commit(n.id, i, log.term(i))
                n.seen_commit = core.committed
            if core.role == Role.LEADER:
                if self.safety.leaders.get(core.term) is None:
                    self.log(f"n{n.id} LEADER term {core.term} (last {core.log.last_index()})")
                self.safety.on_leader(core)
            if core.quiesced != n.quiesced_seen:
                n.quiesced_seen = core.quiesced
                qs = self.qstats
                if not core.quiesced:
                    qs.wakes += 1
                    self.log(f"n{n.id} WOKE ({core.role.name.lower()}, term {core.term})")
                else:
                    if core.role == Role.LEADER:
                        qs.leader_quiesces += 1
                        if self._faults_on():
                            qs.leader_quiesces_under_faults += 1
                    else:
                        qs.follower_quiesces += 1
                    self.log(f"n{n.id} QUIESCED ({core.role.name.lower()}, term {core.term}, commit {core.committed})")

    def current_leader(self) -> SimNode | None:
        best: SimNode | None = None
        for n in self._sorted_nodes():
            if n.core is not None and n.core.role == Role.LEADER and (
                best is None or best.core is None or n.core.term > best.core.term
            ):
                best = n
        return best

    # --- clients ----------------------------------------------------------------------------
    def _new_process(self) -> int:
        self._next_process += 1
        return self._next_process

    def _client_next(self, process: int) -> None:
        if not self.workload_on or process in self._one_shot:
            return
        rng = self.rng
        if self.now < self.idle_until:  # (only with quiescence) the workload pauses
            self.at(min(self.idle_until - self.now, 100) + rng.randrange(0, 30), self._client_next, process)
            return
        key = f"k{rng.randrange(self.p.keys)}"
        r = rng.random()
        value: Any
        if r < 0.4:
            f, value = "get", None
        elif r < 0.75:
            f, value = "put", f"v{next(self._value)}"
        elif r < 0.95:
            exp = None if rng.random() < 0.2 else f"v{rng.randrange(max(1, next(self._value) - 1)) + 1}"
            f, value = "cas", (exp, f"v{next(self._value)}")
        else:
            f, value = "delete", None
        members = [n for n in self._sorted_nodes() if not n.removed]
        hint = self.leader_hint.get(process, 1)
        if rng.random() < 0.8 and hint in self.nodes and not self.nodes[hint].removed:
            target = self.nodes[hint]
        else:
            target = rng.choice(members)
        self._invoke(process, f, key, value, target)

    def _invoke(
        self,
        process: int,
        f: str,
        key: str,
        value: Any,
        target: SimNode,
        after: Callable[[Status], None] | None = None,
    ) -> None:
        invoked = self.now
        finished = False

        def done(status: Status, result: Any) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.pending.pop(op_id, None)
            output: Any = None
            if status == Status.OK:
                if f == "get":
                    assert isinstance(result, KVStateMachine)
                    output = result.data.get(key)
                elif f == "cas":
                    output = bool(result)
                self.leader_hint[process] = target.id
            elif target.core is not None and target.core.lead != NONE:
                self.leader_hint[process] = target.core.lead
            op = Operation(
                process=process, f=f, key=key, value=value, output=output, invoke=float(invoked),
                complete=None if status == Status.INFO else float(self.now), status=status,
            )
            self.history.append(op)
            self.log(f"client p{process} {f} {key} {value!r} -> {status.value} {output!r} (via n{target.id})")
            if after is not None:
                after(status)
            if process in self._one_shot:
                return
            nxt = process
            if status == Status.INFO:  # Jepsen retires a process whose operation is indeterminate
                nxt = self._new_process()
                self.leader_hint[nxt] = self.leader_hint.pop(process, 1)
            self.at(self.rng.randrange(0, 30), self._client_next, nxt)

        def timeout() -> None:
            # A write that timed out may still commit later: indeterminate. A read has no effect.
            done(Status.INFO if f != "get" else Status.FAIL, None)

        op_id = next(self._op_ids)
        self.pending[op_id] = timeout
        self.at(self.p.client_timeout_ms, timeout)
        core = target.core
        if core is None:
            self.at(1, done, Status.FAIL, None)  # connection refused: it never reached a server
            return
        try:
            if f == "get":
                ctx = next(self._ctx).to_bytes(8, "big")
                core.read_index(ctx)
                target.reads[ctx] = done
            else:
                if f == "put":
                    cmd = encode_command("put", key, value)
                elif f == "delete":
                    cmd = encode_command("delete", key)
                else:
                    cmd = encode_command("cas", key, value[1], value[0])
                index = core.propose(cmd)
                target.writes.setdefault(index, []).append(PendingWrite(core.term, done))
        except ProposalDropped:
            self.at(1, done, Status.FAIL, None)
            return
        self._kick(target)

    # --- nemesis ----------------------------------------------------------------------------
    def _nemesis(self) -> None:
        if not self._faults_on():
            return
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            self._partition()
        elif r < 0.5:
            self.blocked.clear()
            self.log("HEAL network")
        elif r < 0.65:
            alive = [n for n in self._sorted_nodes() if n.alive and not n.removed]
            leader = self.current_leader()
            victim = leader if leader is not None and rng.random() < 0.5 else (rng.choice(alive) if alive else None)
            if victim is not None:
                self.crash(victim.id)
                self.at(rng.randrange(20, 600), self.restart, victim.id)
        elif r < 0.73:
            self._transfer()
        elif r < 0.85:
            self._membership()
        elif r < 0.93:
            self._forge()
        else:
            alive = [n for n in self._sorted_nodes() if n.alive]
            if alive:
                self._maybe_compact(rng.choice(alive), force=True)
        self.at(rng.randrange(*self.p.nemesis_every_ms), self._nemesis)

    def _forge(self) -> None:
        """An outsider (a node id that never was a member) sends what would steer or rewrite a
        group if cores took it: votes with the transfer context and higher terms, heartbeats of
        higher terms, TIMEOUT_NOW, and a leader's append of a forged write, committed at once.
        Admission (`kvstore.raft.admission`) must refuse all of it: none may change a term, a
        leader or a log (the safety and linearizability checks would see a forged write)."""
        rng = self.rng
        frm = FORGER
        targets = [n for n in self._sorted_nodes() if n.alive and n.core is not None]
        for n in targets:
            core = n.core
            assert core is not None
            t = core.term + rng.randint(1, 3)
            last = core.log.last_index()
            forged = Entry(t, last + 1, EntryType.NORMAL, encode_command("put", f"k{rng.randrange(self.p.keys)}", "FORGED"))
            msgs = [
                Message(MessageType.VOTE, n.id, frm, term=t, index=last + 100, log_term=t, context=CAMPAIGN_TRANSFER),
                Message(MessageType.HEARTBEAT, n.id, frm, term=t, commit=core.log.committed),
                Message(MessageType.TIMEOUT_NOW, n.id, frm, term=core.term),
                Message(MessageType.APP, n.id, frm, term=t, index=last, log_term=core.log.last_term(),
                        commit=last + 1, entries=[forged]),
            ]
            for m in msgs:
                self.forged_sent += 1
                self.at(rng.randint(*self.p.delay_ms), self._deliver, m)
        self.log(f"FORGE {4 * len(targets)} messages from outsider n{frm}")

    def _partition(self) -> None:
        rng = self.rng
        ids = sorted(n.id for n in self.nodes.values() if not n.removed)
        leader = self.current_leader()
        kind = rng.choice(("isolate", "isolate-leader", "halves", "bridge", "random"))
        self.blocked.clear()
        if kind == "isolate" or (kind == "isolate-leader" and leader is None):
            self._isolate(rng.choice(ids), ids)
        elif kind == "isolate-leader":
            assert leader is not None
            self._isolate(leader.id, ids)
        elif kind == "halves":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            minority = shuffled[: len(ids) // 2]
            for a in minority:
                for b in ids:
                    if b not in minority:
                        self._cut(a, b)
        elif kind == "bridge":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            bridge = shuffled[0]
            rest = shuffled[1:]
            left, right = rest[: len(rest) // 2], rest[len(rest) // 2 :]
            for a in left:
                for b in right:
                    self._cut(a, b)
            kind = f"bridge via n{bridge}"
        else:
            for a, b in itertools.combinations(ids, 2):
                if rng.random() < 0.4:
                    self._cut(a, b)
        self.log(f"PARTITION {kind}: blocked {sorted(self.blocked)}")

    def _isolate(self, nid: int, ids: list[int]) -> None:
        for o in ids:
            if o != nid:
                self._cut(nid, o)

    def _cut(self, a: int, b: int) -> None:
        self.blocked.add((a, b))
        self.blocked.add((b, a))

    def _transfer(self) -> None:
        leader = self.current_leader()
        if leader is None or leader.core is None:
            return
        voters = [v for v in leader.core.conf.voters if v != leader.id]
        if voters:
            target = self.rng.choice(voters)
            self.log(f"TRANSFER leadership n{leader.id} -> n{target}")
            leader.core.transfer_leader(target)
            self._kick(leader)

    def _membership(self) -> None:
        leader = self.current_leader()
        if leader is None or leader.core is None:
            return
        core = leader.core
        conf = core.conf
        rng = self.rng
        learners = [i for i in conf.learners if i in self.nodes]
        cc: ConfChange | None = None
        if learners and (len(conf.voters) <= self.p.nodes or rng.random() < 0.3):
            cand = rng.choice(learners)
            if core.prs.get(cand) is not None and core.prs[cand].match + 5 >= core.log.last_index():
                cc = ConfChange(ConfChangeType.ADD_VOTER, cand)
        elif len(conf.voters) > self.p.nodes or (len(conf.voters) == self.p.nodes and rng.random() < 0.5):
            cc = ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(conf.voters))
        elif len(conf.voters) + len(conf.learners) <= self.p.nodes + 1:
            nid = self.next_id
            self.next_id += 1
            self._create_node(nid, ConfState())
            n = self.nodes[nid]
            self.at(self.rng.randrange(n.tick_ms), self._tick, nid, n.epoch)
            cc = ConfChange(ConfChangeType.ADD_LEARNER, nid)
        if cc is None:
            return
        try:
            index = core.propose_conf_change(cc)
        except ProposalDropped as err:
            self.log(f"MEMBER {cc.type.name} n{cc.node_id} dropped: {err}")
            return
        self.log(f"MEMBER {cc.type.name} n{cc.node_id} proposed by n{leader.id} at {index}")
        if cc.type == ConfChangeType.REMOVE_NODE:
            self.at(self.rng.randrange(100, 600), self._retire_if_removed, cc.node_id, index)
        self._kick(leader)

    def _retire_if_removed(self, nid: int, index: int) -> None:
        """Stop a node once its removal (the entry at `index`) is committed."""
        n = self.nodes[nid]
        if n.removed:
            return
        leader = self.current_leader()
        if leader is None or leader.core is None or leader.core.committed < index:
            self.at(200, self._retire_if_removed, nid, index)
            return
        if nid in leader.core.conf.members():
            return  # the removal was lost (overwritten) or the node was re-added
        self.log(f"n{nid} RETIRED (removed from the configuration)")
        self.crash(nid)
        n.removed = True

    def _heal_all(self) -> None:
        self.healed_at = self.now
        self.end = self.now + self.p.heal_ms
        self.idle_until = min(self.idle_until, self.now)
        self.blocked.clear()
        self.log("HEAL ALL: network healed, nodes restarted, nemesis stopped")
        for n in self._sorted_nodes():
            if not n.alive and not n.removed:
                self.restart(n.id)

    # --- quiescence: idle workload and the quiesced-leader scenario ---------------------------
    def _idle_gap(self) -> None:
        """Pause the whole workload for a while, so that the group quiesces (and is then woken
        by the clients' next requests, or by faults hitting it while it sleeps)."""
        if self.calm or (self.healed_at is not None and self.now >= self.healed_at + self.p.liveness_ms - 1000):
            return
        gap = self.rng.randrange(*self.p.idle_ms)
        self.idle_until = max(self.idle_until, self.now + gap)
        self.log(f"IDLE: clients pause for {gap} ms")
        self.at(gap + self.rng.randrange(*self.p.idle_every_ms), self._idle_gap)

    def _quiet_scenario(self) -> None:
        """Faults stop and clients idle; once the leader has quiesced, crash or isolate it."""
        self.calm = True
        self.blocked.clear()
        self.idle_until = 1 << 60
        self.log("SCENARIO: faults stop, clients idle; waiting for the leader to quiesce")
        for n in self._sorted_nodes():
            if not n.alive and not n.removed:
                self.restart(n.id)
        self.at(20, self._scenario_strike, self.now)

    def _scenario_strike(self, started: int) -> None:
        leader = self.current_leader()
        core = leader.core if leader is not None else None
        if leader is None or core is None or not self._all_quiesced(core.conf.members()):
            if self.now - started > self.p.quiesce_within_ms:
                raise SimulationFailure(
                    f"liveness: the group did not quiesce within {self.p.quiesce_within_ms} ms after the "
                    "faults stopped and the clients went idle"
                )
            self.at(20, self._scenario_strike, started)
            return
        voters = core.conf.voters
        if len(voters) < 3:
            # Membership churn left too few voters for a majority without the leader: add one
            # (which wakes the group), then wait for it to quiesce again.
            if not self._scenario_grow(leader):
                self.qstats.scenario = f"skipped ({len(voters)} voters)"
                self.log(f"SCENARIO skipped: only {len(voters)} voters")
                self._scenario_end()
                return
            self.at(20, self._scenario_strike, self.now)
            return
        # Isolation is what tests lease reads (the old leader stays up, unaware): favour it then.
        isolate = self.rng.random() < (0.75 if self.p.lease_read else 0.5)
        kind = "isolate" if isolate else "crash"
        self.qstats.scenario = kind
        self.log(f"SCENARIO: {kind} the quiesced leader n{leader.id} (term {core.term})")
        if kind == "crash":
            self.crash(leader.id)
        else:
            self._isolate(leader.id, sorted(n.id for n in self.nodes.values() if not n.removed))
        self.at(20, self._scenario_recover, leader.id, core.term, kind, self.now)

    def _all_quiesced(self, members: tuple[int, ...]) -> bool:
        """Every running member is quiesced (so only the host's liveness can wake them now)."""
        for nid in members:
            n = self.nodes.get(nid)
            if n is not None and n.core is not None and not n.core.quiesced:
                return False
        return True

    def _scenario_grow(self, leader: SimNode) -> bool:
        core = leader.core
        assert core is not None
        learners = [i for i in core.conf.learners if i in self.nodes and self.nodes[i].alive]
        if learners:
            cc = ConfChange(ConfChangeType.ADD_VOTER, learners[0])
        elif self.next_id <= 2 * self.p.nodes + 5:
            nid = self.next_id
            self.next_id += 1
            n = self._create_node(nid, ConfState())
            self.at(self.rng.randrange(n.tick_ms), self._tick, nid, n.epoch)
            cc = ConfChange(ConfChangeType.ADD_LEARNER, nid)
        else:
            return False
        try:
            index = core.propose_conf_change(cc)
        except ProposalDropped as err:
            self.log(f"SCENARIO: {cc.type.name} n{cc.node_id} dropped: {err}")
            return False
        self.log(f"SCENARIO: {cc.type.name} n{cc.node_id} proposed by n{leader.id} at {index}")
        self._kick(leader)
        return True

    def _scenario_recover(self, victim: int, term: int, kind: str, struck: int) -> None:
        """Wait for a new leader that committed an entry of its term, then write through it."""
        if self.now - struck > self.p.recover_within_ms:
            raise SimulationFailure(
                f"liveness: {self.now - struck} ms after its quiesced leader n{victim} (term {term}) was "
                f"{'crashed' if kind == 'crash' else 'isolated'}, the group has no new leader serving writes"
            )
        new = self.current_leader()
        core = new.core if new is not None else None
        if (
            new is None
            or core is None
            or new.id == victim
            or core.term <= term
            or core.log.term_or_zero(core.committed) != core.term
        ):
            self.at(20, self._scenario_recover, victim, term, kind, struck)
            return
        process = self._new_process()
        self._one_shot.add(process)

        def written(status: Status) -> None:
            if status != Status.OK:
                self.at(20, self._scenario_recover, victim, term, kind, struck)
                return
            self.qstats.recovered_ms = self.now - struck
            self.log(f"SCENARIO: n{new.id} leads term {core.term} and committed a write {self.now - struck} ms after the fault")
            old = self.nodes[victim]
            if kind == "isolate" and old.core is not None:
                # The old leader (quiesced, cut off, unaware of the new term) must not serve a
                # read from a lease it held before it quiesced.
                # (Invoked strictly after the write completed, so that the two are not concurrent.)
                reader = self._new_process()
                self._one_shot.add(reader)
                self.at(
                    5, self._invoke, reader, "get", "k0", None, old, lambda _status: self._scenario_end()
                )
            else:
                self._scenario_end()

        self._invoke(process, "put", "k0", f"v{next(self._value)}", new, after=written)

    def _scenario_end(self) -> None:
        self._heal_all()
        self.at(self.rng.randrange(200, 600), self._idle_gap)

    # --- liveness ---------------------------------------------------------------------------
    def _check_liveness(self) -> None:
        assert self.healed_at is not None
        leader = self.current_leader()
        if leader is None or leader.core is None:
            raise SimulationFailure(f"liveness: no leader {self.p.heal_ms} ms after the faults healed")
        cutoff = self.healed_at + self.p.liveness_ms
        late = [o for o in self.history if o.invoke >= cutoff]
        bad = [o for o in late if o.status == Status.INFO]
        ok = [o for o in late if o.status == Status.OK]
        if bad:
            raise SimulationFailure(
                f"liveness: {len(bad)} operations invoked after the cluster settled timed out, e.g. {_fmt_op(bad[0])}"
            )
        if not ok:
            raise SimulationFailure("liveness: no operation succeeded after the cluster settled")


def _fmt_op(o: Operation) -> str:
    end = "∞" if o.complete is None else f"{o.complete:.0f}"
    return f"p{o.process} {o.f}({o.key}, {o.value!r}) -> {o.status.value} {o.output!r} [{o.invoke:.0f}, {end}]"


def _fmt_msg(m: Message) -> str:
    extra = ""
    if m.type == MessageType.APP:
        ents = f"{m.entries[0].index}..{m.entries[-1].index}" if m.entries else "-"
        extra = f" prev=({m.index},{m.log_term}) ents={ents} commit={m.commit}"
    elif m.type == MessageType.APP_RESP:
        extra = f" index={m.index}" + (f" REJECT hint=({m.reject_hint},{m.log_term})" if m.reject else "")
    elif m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
        extra = f" last=({m.index},{m.log_term})"
    elif m.type in (MessageType.VOTE_RESP, MessageType.PRE_VOTE_RESP):
        extra = " REJECT" if m.reject else " GRANT"
    elif m.type == MessageType.SNAP and m.snapshot is not None:
        extra = f" snap=({m.snapshot.meta.index},{m.snapshot.meta.term})"
    return f"n{m.frm} -> n{m.to} {m.type.name} t{m.term}{extra}"


def run_seed(
    seed: int,
    nodes: int = 3,
    trace: bool = False,
    params: SimParams | None = None,
    quiesce: bool | None = None,
) -> SimResult:
    """Run one seed. `quiesce`: None = the seed's default (`quiesce_by_default`), or force it."""
    return Simulation(seed, nodes, params, trace, quiesce).run()
