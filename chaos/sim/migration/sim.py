"""A seeded, deterministic simulation of range migration (kvstore.node.moves) under faults.

Real code under test: `kvstore.node.moves.MoveCoordinator` driven by the node's asyncio shell
`kvstore.server.movedriver.MoveDriver` (every step of every move, several coordinators at
once), `ShardMap` (planning, move states, the compare-and-swap of the map in the metadata group)
and the state machine (`machine.apply_data` on `DictState`: KV commands with sessions and
ownership checks, shard commands with install tokens). Simulated around it (see `world`): the
Raft groups as atomic logs with faulty proposals, the nodes' lagging views of the map, exports,
clients that route and retry like the real client, an admin that keeps planning changes
(add / remove a group, rebalance), and a nemesis.

One `random.Random(seed)` drives every choice (also the coordinators' install tokens) and
everything runs on one `VirtualLoop` (virtual time, handed to the driver as its clock), so a
seed replays exactly (`python -m chaos.sim.migration --seed S --trace`). Half of the seeds use
tight timing (fast failovers, short pauses), where a deposed coordinator often resumes in the
middle of its successor's step.

A run: faults for `fault_s` seconds of virtual time (proposal faults, broken exports, metadata
leadership moving while the old leader's coordinator finishes its step, coordinators crashing and
restarting, nodes pausing, slow map views) while the clients and the admin work; then heal, let
the coordinators finish every move, let the clients run a little longer, read every key. Checked:

- during the run: every map version partitions the hash space (`ShardMap.check`); a write is
  executed at most once (per client id and seq, over all groups); and, unless `protocol_checks`
  is off, the protocol's own invariants: no two groups serve the same hash (split brain); a group
  starts serving ranges only for a planned move and with exactly the data the source froze; a
  map that flips a move routes it to a group that serves it; a group refuses a key for ownership
  only if it does not serve it;
- after the heal: every client operation succeeds (liveness, with a longer deadline); at the end
  no moves are left, every group serves exactly its routes and has nothing frozen, no group holds
  data for a key it does not serve, every key reads back;
- the history of client operations (with the final reads) is linearizable (`chaos.checker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from chaos.checker import Verdict, check
from chaos.checker.history import Operation, Status, format_op
from kvstore import errors
from kvstore.node.moves import count_data
from kvstore.server.movedriver import MoveDriver
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, MoveState, ShardMap, ShardMapError
from kvstore.storage import commands
from kvstore.storage.commands import ApplyResult, Command
from kvstore.storage.machine import DictState, apply_data
from kvstore.storage.shardcmd import ShardOp, decode_shard_command, encode_shard_command, is_shard_command

from . import vloop, world
from .world import Group, Limbo, Node, SimCluster

NODES = (1, 2, 3)


@dataclass(slots=True)
class MigParams:
    """Knobs of one run (times in virtual seconds). `draw` varies some of them per seed."""

    initial_groups: int = 2
    max_groups: int = 4
    vnodes: int = 4
    keys: int = 16
    clients: int = 4
    fault_s: float = 5.0
    settle_s: float = 40.0
    """After the heal, every move must be done within this."""
    tail_s: float = 0.4
    """The clients keep working this long after the moves are done."""
    net: tuple[float, float] = (0.0005, 0.004)
    commit: tuple[float, float] = (0.001, 0.008)
    """From a proposal reaching the leader to its application (replication, fsync)."""
    p_drop: float = 0.03
    p_limbo: float = 0.03
    p_lost_ack: float = 0.03
    limbo_apply: float = 0.5
    p_late: float = 0.0
    """A request reaches the group's leader only after its sender gave up (held up in the
    network: TCP retransmits after a partition heals), and is proposed then. Off by default,
    see `--late-requests`."""
    late: tuple[float, float] = (0.3, 3.0)
    limbo_wait: tuple[float, float] = (0.002, 0.6)
    attempt_timeout: float = 0.15
    op_timeout: float = 1.0
    healed_op_timeout: float = 5.0
    """The deadline of operations invoked after the heal, which must all succeed (liveness)."""
    coord_attempt: float = 0.15
    coord_interval: float = 0.2
    """Coordinator.run's polling interval (the product's default)."""
    think: tuple[float, float] = (0.0, 0.05)
    export_chunk: tuple[int, int] = (40, 300)
    p_export_break: float = 0.08
    view_lag: tuple[float, float] = (0.0, 0.015)
    slow_view: tuple[float, float] = (0.05, 0.6)
    nemesis_every: tuple[float, float] = (0.1, 0.5)
    pause: tuple[float, float] = (0.02, 0.4)
    long_pause: tuple[float, float] = (0.0, 0.0)
    """A quarter of the pauses last this long instead (a process stopped for seconds); off by
    default, see `--long-pauses`."""
    restart: tuple[float, float] = (0.05, 0.8)
    election: tuple[float, float] = (0.1, 0.35)
    admin_every: tuple[float, float] = (0.2, 1.0)
    protocol_checks: bool = True
    """Check the protocol's own invariants as it runs (split brain, what an ACTIVATE serves, what
    a FLIPPED map routes, refusals by an owner). False: judge only by what clients and the final
    state show (linearizability, exactly-once, final ownership and liveness)."""
    overlap: bool = True
    """A coordinator that lost the metadata leadership (or was paused) keeps running its current
    step, as a real deposed leader does, concurrently with the new leader's. False: a node's
    coordinator stops the moment its node loses the leadership (no concurrent coordinators)."""

    @classmethod
    def draw(cls, rng: random.Random, **overrides: Any) -> MigParams:
        p = cls(
            initial_groups=rng.choice((1, 2, 2, 3)),
            vnodes=rng.choice((2, 4, 4, 8)),
            p_drop=rng.choice((0.0, 0.02, 0.05)),
            p_limbo=rng.choice((0.0, 0.03, 0.06)),
            p_lost_ack=rng.choice((0.0, 0.03, 0.06)),
            p_export_break=rng.choice((0.0, 0.05, 0.15)),
            limbo_apply=rng.choice((0.2, 0.5, 0.8)),
        )
        if rng.random() < 0.5:
            # Tight timing: fast failovers, short pauses, a busy nemesis. A deposed coordinator
            # then often resumes while its successor is in the middle of the same step.
            p.coord_interval = 0.05
            p.election = (0.02, 0.08)
            p.pause = (0.02, 0.12)
            p.nemesis_every = (0.05, 0.3)
        for k, v in overrides.items():
            if k not in {f.name for f in fields(cls)}:
                raise TypeError(f"unknown parameter {k!r}")
            setattr(p, k, v)
        return p


@dataclass
class MigResult:
    seed: int
    ok: bool
    violation: str | None
    ops: int
    moves: int
    plans: int
    keys_moved: int
    sim_s: float
    verdict: str
    stats: dict[str, int] = field(default_factory=dict)
    history: list[Operation] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)


def token_rng(sim: Simulation) -> random.Random:
    """The random source of a coordinator's install tokens: drawn from the run's seeded
    generator, so that a seed replays exactly (a planted bug replaces this function)."""
    return random.Random(sim.rng.getrandbits(64))


class _TraceHandler(logging.Handler):
    def __init__(self, sim: Simulation) -> None:
        super().__init__(logging.DEBUG)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        self.sim.log(f"[moves] {record.getMessage()}")


@contextlib.contextmanager
def _patched_runtime(sim: Simulation) -> Iterator[None]:
    """The coordinator's log into the trace (not stderr)."""
    lg = logging.getLogger("kvstore.moves")
    saved = (lg.level, lg.propagate, list(lg.handlers))
    lg.handlers = [_TraceHandler(sim)] if sim.trace_on else [logging.NullHandler()]
    lg.propagate = False
    lg.setLevel(logging.INFO if sim.trace_on else logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(saved[0])
        lg.propagate = saved[1]
        lg.handlers = saved[2]


class SimClient:
    """A client like kvstore.client: routes by its cached map (refreshed on WRONG_SHARD), writes
    under a session (client_id, seq, ack = lowest seq in flight; the same request on every retry),
    retries definite and indeterminate errors until its deadline."""

    def __init__(self, sim: Simulation, idx: int) -> None:
        self.sim = sim
        self.cid = sim.rng.getrandbits(63) | 1
        self.process = sim.new_process()
        self.next_seq = 1
        self.inflight: dict[int, None] = {}
        self.map: ShardMap | None = None
        self.shift = idx
        self.known: dict[str, str | None] = {}

    def fetch_map(self, want: int = 0) -> None:
        """Ask the nodes (in random order) for their map; keep the newest seen."""
        sim = self.sim
        order = list(NODES)
        sim.rng.shuffle(order)
        for nid in order:
            m = sim.nodes[nid].map
            if m is not None and (self.map is None or m.version > self.map.version):
                self.map = m
            if self.map is not None and self.map.version >= want:
                return

    def pick(self, gid: int) -> Node:
        return self.sim.nodes[NODES[(gid + self.shift) % len(NODES)]]

    async def run(self) -> None:
        sim = self.sim
        rng = sim.rng
        while sim.workload_on:
            await sim.sleep(rng.uniform(*sim.p.think))
            if not sim.workload_on:
                return
            key = rng.choice(sim.keys)
            r = rng.random()
            value: Any = None
            if r < 0.4:
                f = "get"
            elif r < 0.7:
                f, value = "put", sim.new_value()
            elif r < 0.93:
                f = "cas"
                exp = self.known.get(key) if rng.random() < 0.8 else sim.old_value()
                value = (exp, sim.new_value())
            else:
                f = "delete"
            await self.invoke(f, key, value)

    async def invoke(self, f: str, key: str, value: Any) -> Operation:
        sim = self.sim
        t0 = sim.now
        kb = key.encode()
        seq = 0
        data: bytes | None = None
        if f != "get":
            seq = self.next_seq
            self.next_seq += 1
            self.inflight[seq] = None
            ack = next(iter(self.inflight))
            cid = self.cid
            if f == "put":
                data = commands.encode_put(kb, value.encode(), cid, seq, ack)
            elif f == "delete":
                data = commands.encode_delete(kb, cid, seq, ack)
            else:
                exp, new = value
                data = commands.encode_cas(kb, exp is None, b"" if exp is None else exp.encode(), new.encode(),
                                           cid, seq, ack)
        try:
            status, out = await self._attempts(kb, data)
        finally:
            if seq:
                self.inflight.pop(seq, None)
        output: Any = None
        if status is Status.OK:
            if f == "get":
                output = None if out is None else out.decode()
                self.known[key] = output
            elif f == "cas":
                assert isinstance(out, ApplyResult)
                output = bool(out.swapped)
                if out.swapped:
                    self.known[key] = value[1]
                else:
                    self.known[key] = None if out.current is None else out.current.decode()
            elif f == "put":
                self.known[key] = value
            else:
                self.known[key] = None
        op = Operation(self.process, f, key, value, output, t0,
                       None if status is Status.INFO else sim.now, status)
        sim.history.append(op)
        sim.stats[f"op_{status.value}"] += 1
        if status is not Status.OK and sim.healed_at is not None and t0 >= sim.healed_at:
            sim.violate(f"liveness: {format_op(op)} failed although it was invoked after the heal "
                        f"(client {self.cid:#x}, seq {seq})")
        if sim.trace_on:
            sim.log(f"client {self.cid & 0xFFFF:04x} seq {seq}: {format_op(op)}")
        if status is Status.INFO:  # Jepsen retires a process whose operation is indeterminate
            self.process = sim.new_process()
        return op

    async def _attempts(self, kb: bytes, data: bytes | None) -> tuple[Status, Any]:
        sim = self.sim
        p = sim.p
        rng = sim.rng
        deadline = sim.now + (p.op_timeout if sim.faults_on else p.healed_op_timeout)
        indeterminate = False
        backoff = 0.01
        redirects = 0
        while sim.now < deadline:
            if self.map is None:
                self.fetch_map()
                if self.map is None:
                    await sim.sleep(0.02)
                    continue
            gid = self.map.group_for_key(kb)
            node = self.pick(gid)
            try:
                if data is None:
                    return Status.OK, await sim.serve_get(node, kb)
                return Status.OK, await sim.serve_write(node, kb, data)
            except errors.WrongShard as err:
                sim.stats["wrong_shard_replies"] += 1
                have = self.map.version
                self.fetch_map(err.shard_version)
                if err.shard_version > have and self.map.version > have and redirects < 3:
                    redirects += 1
                    continue
                self.shift = rng.randrange(len(NODES))
            except errors.InvalidArgument:
                return (Status.INFO if indeterminate else Status.FAIL), None
            except errors.KVError as err:
                if err.indeterminate:
                    indeterminate = True
                if node.version > self.map.version:  # every error carries the node's map version
                    self.fetch_map(node.version)
                self.shift = rng.randrange(len(NODES))
            redirects = 0
            left = deadline - sim.now
            if left <= 0:
                break
            await sim.sleep(min(left, backoff * (0.5 + rng.random())))
            backoff = min(backoff * 2, 0.2)
        return (Status.INFO if indeterminate and data is not None else Status.FAIL), None


class Violation(Exception):
    pass


class Simulation:
    def __init__(self, seed: int, params: MigParams | None = None, *, trace: bool = False,
                 **overrides: Any) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.p = params if params is not None else MigParams.draw(self.rng, **overrides)
        self.trace_on = trace
        self.trace: list[str] = []
        self.violation: str | None = None
        self.groups: dict[int, Group] = {}
        self.nodes: dict[int, Node] = {}
        self.meta_leader = NODES[0]
        self.faults_on = True
        self.healed_at: float | None = None
        self.workload_on = True
        self.history: list[Operation] = []
        self.stats: Counter[str] = Counter()
        self.keys = [f"k{i}" for i in range(self.p.keys)]
        self.committed: ShardMap | None = None
        self.committed_raw = b""
        self.executions: dict[tuple[int, int], list[str]] = {}
        self._next_process = 0
        self._value = itertools.count(1)
        self._limbo_seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # --- small helpers ------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def log(self, msg: str) -> None:
        if self.trace_on:
            self.trace.append(f"{self.now:9.4f} {msg}")

    def violate(self, msg: str) -> None:
        if self.violation is None:
            self.violation = msg
            self.log(f"VIOLATION {msg}")

    def new_process(self) -> int:
        self._next_process += 1
        return self._next_process

    def new_value(self) -> str:
        return f"v{next(self._value)}"

    def old_value(self) -> str | None:
        n = next(self._value)
        return None if n < 2 or self.rng.random() < 0.3 else f"v{self.rng.randrange(1, n)}"

    def sleep(self, delay: float) -> asyncio.Future[None]:
        """asyncio.sleep without its get_running_loop() call (a getpid() system call each time,
        which dominates the run time in some sandboxes)."""
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._loop.call_later(delay, _wake, fut)
        return fut

    def net(self) -> asyncio.Future[None]:
        """One network hop."""
        return self.sleep(self.rng.uniform(*self.p.net))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.violate(f"{name} raised {type(err).__name__}: {err}")

        assert self._loop is not None
        t = self._loop.create_task(guarded())
        t.add_done_callback(lambda _: coro.close())  # no "never awaited" warning if cancelled unstarted
        self._tasks.append(t)
        return t

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_later(delay, fn, *args)

    # --- the groups ---------------------------------------------------------------------------
    def apply(self, g: Group, data: bytes, origin: str) -> ApplyResult:
        """Apply a proposal now: earlier proposals still in limbo are decided first."""
        if g.limbo:
            self._decide(g, None)
        return self._apply_now(g, data, origin)

    def _decide(self, g: Group, upto: Limbo | None) -> None:
        """Decide the limbo entries in log order, up to `upto` (None: all)."""
        if upto is not None and upto.decided:
            return
        while g.limbo:
            e = g.limbo.pop(0)
            e.decided = True
            if g.alive and self.rng.random() < self.p.limbo_apply:
                self.stats["limbo_applied"] += 1
                self._apply_now(g, e.data, f"{e.origin} (delayed since {e.submitted:.4f})")
            else:
                self.stats["limbo_dropped"] += 1
                self.log(f"g{g.gid}: dropped delayed proposal of {e.origin}")
            if e is upto:
                return

    def _apply_now(self, g: Group, data: bytes, origin: str) -> ApplyResult:
        st = g.state
        kv: Command | None = None
        if not is_shard_command(data):
            with contextlib.suppress(ValueError):
                kv = commands.decode_command(data)
        had = kv is not None and kv.client_id != 0 and st.session_result(kv.client_id, kv.seq) is not None
        before = st.shard_state
        st.index = g.applied + 1
        res = apply_data(st, data)
        g.applied += 1
        if kv is not None:
            if kv.client_id and not had and st.session_result(kv.client_id, kv.seq) is not None:
                where = self.executions.setdefault((kv.client_id, kv.seq), [])
                where.append(f"group {g.gid} at {self.now:.4f} ({origin})")
                if len(where) > 1:
                    self.violate(f"exactly-once: write (client {kv.client_id:#x}, seq {kv.seq}) on key "
                                 f"{kv.key!r} executed {len(where)} times: {'; '.join(where)}")
            sh = st.shard_state
            if res.wrong_shard and sh is not None and key_hash(kv.key) in sh.active:
                self.stats["owner_refusals"] += 1
            if self.p.protocol_checks and res.wrong_shard and sh is not None and key_hash(kv.key) in sh.active:
                self.violate(f"group {g.gid} answered WRONG_SHARD for key {kv.key!r} (client "
                             f"{kv.client_id:#x}, seq {kv.seq}) although it serves the key")
            if self.trace_on:
                self.log(f"g{g.gid} <- {kv.op.name} {kv.key!r} seq {kv.seq} ({origin}): {_fmt_result(res)}")
            if g.gid == META_GROUP and kv.key == SHARD_MAP_KEY:
                self._map_applied()
        else:
            self._shard_applied(g, data, res, origin, before.active if before is not None else None)
        return res

    def _shard_applied(self, g: Group, data: bytes, res: ApplyResult, origin: str,
                       active_before: IntervalSet | None) -> None:
        try:
            cmd = decode_shard_command(data)
        except ValueError:
            return
        if res.error:
            self.stats["shard_refused"] += 1
        else:
            self.stats[f"shard_{cmd.op.name.lower()}"] += 1
        if cmd.op == ShardOp.INSTALL and not res.error:
            self.stats["keys_installed"] += count_data(cmd.records)
        if self.trace_on:
            what = f"{len(cmd.records)} bytes of records" if cmd.op == ShardOp.INSTALL else _fmt_ranges(cmd.ranges)
            sh = g.state.shard_state
            self.log(f"g{g.gid} <- {cmd.op.name} {what} ({origin}): {_fmt_result(res)}; now active "
                     f"{_fmt_ranges(sh.active) if sh else 'all'} frozen {_fmt_ranges(sh.frozen) if sh else '-'}")
        if not self.p.protocol_checks:
            return
        if cmd.op in (ShardOp.ACTIVATE, ShardOp.SET) and not res.error:
            self._check_split_brain()
        if cmd.op == ShardOp.ACTIVATE and not res.error and active_before is not None \
                and not cmd.ranges.issubset(active_before):
            self._check_activation(g, cmd.ranges, origin)

    def _check_activation(self, g: Group, r: IntervalSet, origin: str) -> None:
        """A group starts serving `r`: a move to it must be planned, and it must hold exactly the
        data that the move's source froze in `r` (immutable there until DROP)."""
        m = self.committed
        mv = next((mv for mv in m.moves if mv.target == g.gid and mv.ranges == r), None) if m else None
        if mv is None:
            self.violate(f"group {g.gid} started serving {_fmt_ranges(r)} ({origin}), but no move to it "
                         f"is planned (a stale ACTIVATE)")
            return
        src = self.groups.get(mv.source)
        sh = src.state.shard_state if src is not None else None
        if src is None or sh is None or not r.issubset(sh.frozen):
            return
        want = {k: v for k, v in src.state.data.items() if key_hash(k) in r}
        have = {k: v for k, v in g.state.data.items() if key_hash(k) in r}
        if want != have:
            missing = sorted(k for k in want if k not in have)
            extra = sorted(k for k in have if k not in want)
            differ = sorted(k for k in want if k in have and want[k] != have[k])
            self.violate(f"move {mv.id}: group {g.gid} started serving {_fmt_ranges(r)} ({origin}) without "
                         f"the source's data: missing {missing}, extra {extra}, different {differ}")

    def _check_split_brain(self) -> None:
        seen: list[tuple[int, IntervalSet]] = []
        for gid, g in self.groups.items():
            sh = g.state.shard_state
            if gid == META_GROUP or not g.alive or sh is None:
                continue
            for other, act in seen:
                both = act.intersection(sh.active)
                if both:
                    self.violate(f"split brain: groups {other} and {gid} both serve {_fmt_ranges(both)}")
            seen.append((gid, sh.active))

    def _map_applied(self) -> None:
        raw = self.groups[META_GROUP].state.get(SHARD_MAP_KEY)
        if raw is None or raw == self.committed_raw:
            return
        m = ShardMap.decode(raw)
        try:
            m.check()
        except ShardMapError as err:
            self.violate(f"shard map version {m.version} is invalid: {err}")
        old = self.committed
        self.committed, self.committed_raw = m, raw
        self.stats["map_versions"] += 1
        if old is not None:
            ids = {mv.id for mv in m.moves}
            done = [mv.id for mv in old.moves if mv.id not in ids]
            self.stats["moves_done"] += len(done)
            was = {mv.id: mv.state for mv in old.moves}
            for mv in m.moves:
                if self.p.protocol_checks and mv.state == MoveState.FLIPPED and was.get(mv.id) != MoveState.FLIPPED:
                    tg = self.groups.get(mv.target)
                    sh = tg.state.shard_state if tg is not None else None
                    if sh is None or not mv.ranges.issubset(sh.active):
                        self.violate(f"map v{m.version} routes move {mv.id}'s ranges {_fmt_ranges(mv.ranges)} "
                                     f"to group {mv.target}, which does not serve them")
        if self.trace_on:
            self.log(f"map v{m.version}: routes {_fmt_routes(m)}; moves " + (", ".join(
                f"#{mv.id} g{mv.source}->g{mv.target} {mv.state.name}" for mv in m.moves) or "none"))
        for gid in m.data_groups():
            if gid not in self.groups:
                self._create_group(m, gid)
        for gid, g in self.groups.items():
            if gid != META_GROUP and g.alive and gid not in m.groups and gid < m.next_group:
                self._destroy_group(g)
        for node in self.nodes.values():
            lag = self.rng.uniform(*self.p.view_lag)
            if self.now < node.slow_until:
                lag += self.rng.uniform(*self.p.slow_view)
            self.later(lag, node.see, m, raw)

    def _create_group(self, m: ShardMap, gid: int) -> None:
        g = self.groups[gid] = Group(gid, DictState())
        apply_data(g.state, encode_shard_command(ShardOp.SET, m.bootstrap_ranges(gid)))
        self.log(f"group {gid} created, serving {_fmt_ranges(m.bootstrap_ranges(gid))}")

    def _destroy_group(self, g: Group) -> None:
        sh = g.state.shard_state
        if sh is not None and (sh.active or sh.frozen):
            self.violate(f"group {g.gid} dropped while it serves {_fmt_ranges(sh.active)} and has "
                         f"{_fmt_ranges(sh.frozen)} frozen")
        if g.state.data:
            self.stats["dropped_group_leftovers"] += len(g.state.data)
        g.alive = False
        g.limbo.clear()
        self.log(f"group {g.gid} destroyed ({len(g.state.data)} data rows left)")

    async def submit(self, gid: int, data: bytes, origin: str, timeout: float, *, hop: bool = True) -> ApplyResult:
        """One attempt at proposing `data` to group `gid` (see world's docstring for the fates);
        `hop`: first travel to the group's leader (False: the caller is there already)."""
        if hop:
            await self.net()
        g = self.groups.get(gid)
        if g is None or not g.alive:
            raise errors.WrongShard(f"group {gid} is not on this node")
        p = self.p
        lost = False
        if self.faults_on:
            r = self.rng.random()
            if r < p.p_drop:
                self.stats["proposals_dropped"] += 1
                await self.net()
                raise errors.ProposalDropped(f"group {gid}: proposal dropped")
            r -= p.p_drop
            if r < p.p_limbo:
                self.stats["proposals_delayed"] += 1
                e = Limbo(next(self._limbo_seq), data, origin, self.now)
                g.limbo.append(e)
                self.later(self.rng.uniform(*p.limbo_wait), self._decide, g, e)
                await self.sleep(timeout)
                raise errors.Timeout(f"group {gid}: proposal timed out", indeterminate=True)
            r -= p.p_limbo
            if r < p.p_late:
                self.stats["requests_late"] += 1
                self.spawn(self._arrive_late(gid, data, origin), "late request")
                await self.sleep(timeout)
                raise errors.Timeout(f"group {gid}: request timed out", indeterminate=True)
            lost = r - p.p_late < p.p_lost_ack
        await self.sleep(self.rng.uniform(*p.commit))  # replication and fsync
        if not g.alive:
            raise errors.LeadershipLost(f"group {gid} left this node", indeterminate=True)
        if lost:
            self.stats["acks_lost"] += 1
            self.apply(g, data, origin + " (ack lost)")
            await self.sleep(timeout if self.rng.random() < 0.5 else self.rng.uniform(*p.net))
            raise errors.LeadershipLost(f"group {gid}: leadership lost", indeterminate=True)
        res = self.apply(g, data, origin)
        await self.net()
        return res

    async def _arrive_late(self, gid: int, data: bytes, origin: str) -> None:
        """A request held up in the network reaches the leader after its sender gave up on it,
        and is proposed then (a new proposal: nothing orders it before later ones)."""
        delay = self.rng.uniform(*self.p.late)
        await self.sleep(delay)
        g = self.groups.get(gid)
        if g is not None and g.alive:
            self.apply(g, data, f"{origin} (request sent {delay:.3f}s earlier)")

    def export_now(self, gid: int, ranges: IntervalSet) -> list[bytes]:
        g = self.groups.get(gid)
        if g is None or not g.alive:
            raise errors.WrongShard(f"group {gid} is not on this node")
        sh = g.state.shard_state
        if world.EXPORT_REQUIRES_FROZEN and (sh is None or not ranges.issubset(sh.frozen)):
            raise errors.InvalidArgument(f"group {gid} has not frozen the ranges to export")
        self.stats["exports"] += 1
        return world.export_records(g.state, ranges, self.rng.randint(*self.p.export_chunk))

    # --- the servers' KV service -----------------------------------------------------------------
    def _route(self, node: Node, kb: bytes) -> Group:
        m = node.map
        if m is None:
            raise errors.NoLeader("this node has no shard map yet")
        gid = m.group_for_key(kb)
        g = self.groups.get(gid)
        if g is None or not g.alive:
            raise errors.WrongShard(f"the key's group {gid} is not on node {node.id}", shard_version=m.version)
        return g

    def _check_owned(self, node: Node, g: Group, kb: bytes) -> None:
        sh = g.state.shard_state
        if sh is not None and key_hash(kb) not in sh.active:
            raise errors.WrongShard(f"group {g.gid} does not serve the key (it moved)", shard_version=node.version)

    async def serve_write(self, node: Node, kb: bytes, data: bytes) -> ApplyResult:
        await self.net()
        g = self._route(node, kb)
        self._check_owned(node, g, kb)
        # The pre-check reads the leader's applied state; the proposal lands in the log a round
        # trip later, possibly after a FREEZE that was committed but not applied yet.
        res = await self.submit(g.gid, data, f"client via n{node.id}", self.p.attempt_timeout)
        if res.wrong_shard:
            raise errors.WrongShard(f"group {g.gid} no longer serves the key (it moved)", shard_version=node.version)
        if res.error:
            raise errors.InvalidArgument(res.error)
        return res

    async def serve_get(self, node: Node, kb: bytes) -> bytes | None:
        await self.net()
        g = self._route(node, kb)
        if self.faults_on and self.rng.random() < self.p.p_drop:
            await self.net()
            raise errors.NoLeader(f"group {g.gid} has no leader right now")
        # (the ReadIndex round is folded into the request's trip) then read at the applied state
        if not g.alive:
            raise errors.WrongShard(f"group {g.gid} left this node", shard_version=node.version)
        self._check_owned(node, g, kb)
        value = g.state.get(kb)
        await self.net()
        return value

    # --- coordinators, nemesis, admin ---------------------------------------------------------
    def start_coordinator(self, node: Node) -> None:
        node.incarnation += 1
        c = MoveDriver(SimCluster(self, node), interval=self.p.coord_interval, rng=token_rng(self),
                      clock=lambda: self.now)
        node.coordinator = c
        node.task = self.spawn(c.run(), f"coordinator of node {node.id}")
        self.log(f"node {node.id}: coordinator #{node.incarnation} started")

    def crash_coordinator(self, node: Node) -> None:
        if node.task is not None:
            node.task.cancel()
        node.task = None
        node.coordinator = None
        self.stats["crashes"] += 1
        self.log(f"node {node.id}: coordinator crashed")

    def restart_coordinator(self, node: Node) -> None:
        if node.coordinator is None:
            self.start_coordinator(node)

    def failover(self, to: int | None = None) -> None:
        old = self.meta_leader
        if to is None:
            cands = [n for n in NODES if n != old and not self.nodes[n].paused and self.nodes[n].coordinator]
            to = self.rng.choice(cands or [n for n in NODES if n != old])
        if to == old:
            return
        self.meta_leader = to
        self.stats["failovers"] += 1
        self.log(f"metadata leadership: node {old} -> node {to}")
        if not self.p.overlap:
            # The deposed leader's coordinator stops at once (and starts afresh, idle).
            self.crash_coordinator(self.nodes[old])
            self.start_coordinator(self.nodes[old])

    def _failover_if(self, nid: int) -> None:
        node = self.nodes[nid]
        if self.meta_leader == nid and (node.paused or node.coordinator is None) and self.faults_on:
            self.failover()

    def pause(self, node: Node, d: float) -> None:
        node.paused = True
        node.resumed = asyncio.Event()
        self.stats["pauses"] += 1
        self.log(f"node {node.id}: paused for {d:.3f}s")
        self.later(d, self.resume, node)
        self.later(self.rng.uniform(*self.p.election), self._failover_if, node.id)

    def resume(self, node: Node) -> None:
        if node.paused:
            node.paused = False
            node.resumed.set()
            if node.stashed is not None:
                node.see(*node.stashed)
                node.stashed = None
            self.log(f"node {node.id}: resumed")

    async def nemesis(self) -> None:
        rng = self.rng
        p = self.p
        while self.faults_on:
            await self.sleep(rng.uniform(*p.nemesis_every))
            if not self.faults_on:
                return
            r = rng.random()
            leader = self.nodes[self.meta_leader]
            victim = leader if rng.random() < 0.5 else self.nodes[rng.choice(NODES)]
            if r < 0.3:
                self.failover()
            elif r < 0.5:
                if victim.coordinator is not None:
                    self.crash_coordinator(victim)
                    self.later(rng.uniform(*p.restart), self.restart_coordinator, victim)
                    self.later(rng.uniform(*p.election), self._failover_if, victim.id)
            elif r < 0.75:
                if not p.overlap or victim.paused:
                    continue
                d = rng.uniform(*(p.long_pause if p.long_pause[1] > 0 and rng.random() < 0.25 else p.pause))
                if rng.random() < 0.5:
                    self.pause(victim, d)
                else:
                    victim.armed = d
                    self.log(f"node {victim.id}: will stall for {d:.3f}s at its coordinator's next call")
            else:
                victim.slow_until = self.now + rng.uniform(0.2, 2.0)
                self.log(f"node {victim.id}: applies the metadata log slowly until {victim.slow_until:.3f}")

    async def admin(self) -> None:
        rng = self.rng
        p = self.p
        while self.faults_on:
            await self.sleep(rng.uniform(*p.admin_every))
            if not self.faults_on or self.committed is None:
                return
            cands = [n for n in NODES if not self.nodes[n].paused and self.nodes[n].coordinator is not None]
            if not cands:
                continue
            c = self.nodes[rng.choice(cands)].coordinator
            assert c is not None
            groups = self.committed.data_groups()
            r = rng.random()
            change: Callable[[ShardMap], ShardMap]
            if len(groups) < p.max_groups and (r < 0.45 or len(groups) == 1):
                what = "add a group"
                change = functools.partial(ShardMap.plan_add_group, nodes=list(NODES))
            elif len(groups) > 1 and r < 0.8:
                victim = rng.choice(groups)
                what = f"remove group {victim}"
                change = functools.partial(ShardMap.plan_remove_group, group=victim)
            else:
                what = "rebalance"
                change = ShardMap.plan_rebalance
            try:
                new = await c.update(change, timeout=3.0)
            except (ShardMapError, errors.KVError) as err:
                self.log(f"admin: {what}: {err}")
                continue
            self.stats["plans"] += 1
            self.log(f"admin: {what}: map v{new.version}, {len(new.moves)} moves planned")
            c.wakeup.set()

    # --- the run ------------------------------------------------------------------------------
    def _settled(self) -> bool:
        m = self.committed
        if m is None or m.moves:
            return False
        if any(g not in m.ring.owners and not m.routes.get(g) for g in m.groups):
            return False
        return all(n.version == m.version for n in self.nodes.values())

    def heal(self) -> None:
        self.faults_on = False
        self.healed_at = self.now
        self.log("HEAL: no more faults")
        for g in list(self.groups.values()):
            if g.limbo:
                self._decide(g, None)
        for node in self.nodes.values():
            node.armed = None
            self.resume(node)
            node.slow_until = 0.0
            self.restart_coordinator(node)

    async def main(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._main()
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _main(self) -> None:
        p = self.p
        m0 = ShardMap.initial(NODES, p.initial_groups, replication=3, vnodes=p.vnodes,
                              addresses={n: f"10.0.0.{n}:2379" for n in NODES})
        meta = self.groups[META_GROUP] = Group(META_GROUP, DictState())
        for nid in NODES:
            self.nodes[nid] = Node(nid)
        self._apply_now(meta, commands.encode_put(SHARD_MAP_KEY, m0.encode()), "bootstrap")
        for node in self.nodes.values():
            node.see(m0, self.committed_raw)
            self.start_coordinator(node)
        clients = [SimClient(self, i) for i in range(p.clients)]
        workers = [self.spawn(c.run(), f"client {i}") for i, c in enumerate(clients)]
        nemesis = self.spawn(self.nemesis(), "nemesis")
        admin = self.spawn(self.admin(), "admin")
        end = self.now + p.fault_s
        while self.now < end and self.violation is None:
            await self.sleep(0.05)
        self.heal()
        nemesis.cancel()
        admin.cancel()
        settle_end = self.now + p.settle_s
        while not self._settled() and self.now < settle_end and self.violation is None:
            await self.sleep(0.05)
        if self.violation is None and not self._settled():
            m = self.committed
            assert m is not None
            self.violate(f"liveness: {p.settle_s:g}s after the heal, the moves are not done: " + (", ".join(
                f"#{mv.id} g{mv.source}->g{mv.target} {mv.state.name}" for mv in m.moves) or "groups to drop"))
        tail_end = self.now + p.tail_s
        while self.now < tail_end and self.violation is None:
            await self.sleep(0.05)
        self.workload_on = False
        for w in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w
        for node in self.nodes.values():
            if node.task is not None:
                node.task.cancel()
        await self.sleep(1.0)  # let every cancelled coordinator unwind
        if self.violation is None:
            self._check_final()
        if self.violation is None:
            final = SimClient(self, 0)
            for key in self.keys:
                op = await final.invoke("get", key, None)
                if op.status is not Status.OK:
                    self.violate(f"liveness: the final read of {key} failed after the heal")

    def _check_final(self) -> None:
        m = self.committed
        assert m is not None
        try:
            m.check()
        except ShardMapError as err:
            self.violate(f"final map: {err}")
        for gid, g in self.groups.items():
            if gid == META_GROUP:
                continue
            if not g.alive:
                continue
            if gid not in m.groups:
                self.violate(f"group {gid} is alive but not in the final map")
                continue
            sh = g.state.shard_state
            routes = m.routes.get(gid, IntervalSet())
            if sh is None:
                self.violate(f"group {gid} has no shard state")
                continue
            if sh.frozen:
                self.violate(f"group {gid} still has {_fmt_ranges(sh.frozen)} frozen at the end")
            if sh.active != routes:
                self.violate(f"group {gid} serves {_fmt_ranges(sh.active)} but the map routes "
                             f"{_fmt_ranges(routes)} to it")
            for k in g.state.data:
                if key_hash(k) not in routes:
                    self.violate(f"group {gid} holds key {k!r}, which the map routes to group "
                                 f"{m.group_for_key(k)}")
        for gid in m.groups:
            have = self.groups.get(gid)
            if have is None or not have.alive:
                self.violate(f"group {gid} is in the final map but does not exist")

    def run(self) -> MigResult:
        with _patched_runtime(self):
            try:
                vloop.run(self.main())
            except vloop.SimulationDeadlock as err:
                self.violate(f"simulation deadlock: {err}")
        verdict = "skipped"
        violation = self.violation
        if violation is None:
            res = check(self.history, timeout=20.0)
            verdict = res.verdict.value
            if res.verdict == Verdict.NOT_LINEARIZABLE:
                shown = "; ".join(format_op(o) for o in res.counterexample[:12])
                violation = f"linearizability: key {res.bad_key!r} cannot be linearized: {shown}"
            elif res.verdict == Verdict.UNKNOWN:
                violation = "linearizability: the checker gave up (unknown)"
        return MigResult(
            seed=self.seed, ok=violation is None, violation=violation, ops=len(self.history),
            moves=self.stats["moves_done"], plans=self.stats["plans"], keys_moved=self.stats["keys_installed"],
            sim_s=self.now, verdict=verdict, stats=dict(self.stats), history=self.history, trace=self.trace,
        )


def run_seed(seed: int, *, trace: bool = False, params: MigParams | None = None, **overrides: Any) -> MigResult:
    """Run one seed (parameters drawn from it unless given; `overrides` replace drawn ones)."""
    return Simulation(seed, params, trace=trace, **overrides).run()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fmt_ranges(s: IntervalSet) -> str:
    if not s:
        return "{}"
    parts = [f"{lo >> 48:04x}-{hi >> 48:04x}" for lo, hi in s]
    return "{" + ",".join(parts[:6]) + (",..." if len(parts) > 6 else "") + "}"


def _fmt_routes(m: ShardMap) -> str:
    return " ".join(f"g{g}:{_fmt_ranges(s)}" for g, s in sorted(m.routes.items()))


def _fmt_result(res: ApplyResult) -> str:
    if res.wrong_shard:
        return "WRONG_SHARD"
    if res.error:
        return f"error: {res.error}"
    flags = [n for n in ("swapped", "found", "existed") if getattr(res, n)]
    return "ok" + (f" ({', '.join(flags)})" if flags else "")
