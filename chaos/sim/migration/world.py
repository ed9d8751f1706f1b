"""The simulated cluster the migration protocol runs against.

- A `Group` is one Raft group seen from outside: an atomic, linearizable log that applies each
  command with the real state machine (`machine.apply_data` on a `DictState`). Raft itself is
  tested by `chaos.sim`; here only the outcomes a proposer can observe are modelled:

    applied and acknowledged;  applied, acknowledgement lost (indeterminate);  not applied
    (definite error);  delayed ("in limbo": the caller times out, indeterminate; the entry is
    applied or dropped later).

  A proposal is applied a commit latency after it reached the leader (replication and fsync),
  so proposals in flight together apply in either order. Optionally (`p_late`, off by default) a
  request is held up in the network and reaches the leader only after its sender gave up: it is
  proposed then, like a fresh proposal (TCP delivers a retransmitted gRPC request after a
  partition heals; the server gives it a fresh deadline).

  A delayed entry keeps its place in the log the way Raft keeps it: it is decided (applied or
  dropped) before any proposal submitted after it is applied in the same group (an entry that
  commits later is in a slot below every entry of a later term, and below later entries of its
  own leader), so it may apply long after its caller gave up, but never after a later proposal
  to the same group. Reads do not decide it (ReadIndex does not commit anything new).
- A `Node` runs a real `MoveDriver` (the node's shell of the move coordinator) over `SimCluster` (the
  `movedriver.Cluster`
  protocol, modelled on `server.shards.GroupCaller`/`NodeCluster`): it sees the shard map as its
  own applied copy of the metadata group (it lags), retries a proposal until a deadline like
  GroupCaller.call does, and exports ranges like GroupCaller.export (retried from the start before
  the first chunk, broken for good after). A node can be paused (a SIGSTOP'd process: its view
  of the map stands still and its coordinator stops at its next call into the cluster; it resumes
  where it stopped, with what it knew then; a pause can also be armed to strike at the next call,
  i.e. in the middle of a move), and its coordinator can crash and restart (a new object).
- `export_records` is `KVState.export_range` for a `DictState`: the data rows whose key hash is
  in the (frozen) ranges, then every session row (floors and cached results), as `shardcmd`
  install records, in LMDB key order, from one consistent view, in chunks of about `chunk_bytes`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvstore import errors
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import ShardMap
from kvstore.storage.commands import ApplyResult
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import REC_DATA, REC_FLOOR, REC_RESULT, U64, U64_PAIR, encode_record

if TYPE_CHECKING:
    from kvstore.server.movedriver import MoveDriver


EXPORT_REQUIRES_FROZEN = True
"""Like KVState.export_range, refuse to export ranges the group has not frozen (a plant lifts it)."""


def export_records(state: DictState, ranges: IntervalSet, chunk_bytes: int) -> list[bytes]:
    """The install records of `ranges` in `state`, in chunks (see the module docstring)."""
    chunks: list[bytes] = []
    buf: list[bytes] = []
    size = 0

    def add(rec: bytes) -> None:
        nonlocal buf, size
        buf.append(rec)
        size += len(rec)
        if size >= chunk_bytes:
            chunks.append(b"".join(buf))
            buf, size = [], 0

    for k in sorted(state.data):
        if key_hash(k) in ranges:
            add(encode_record(REC_DATA, k, state.data[k]))
    for k, v in session_rows(state):
        add(encode_record(REC_FLOOR if len(k) == 8 else REC_RESULT, k, v))
    if buf:
        chunks.append(b"".join(buf))
    return chunks


def session_rows(state: DictState) -> list[tuple[bytes, bytes]]:
    """The session table as the LMDB rows (key without the group prefix, value), in key order:
    a client's floor (8-byte key) sorts before its cached results (16-byte keys)."""
    rows = [(U64.pack(cid), U64.pack(floor)) for cid, floor in state.floors.items()]
    rows += [(U64_PAIR.pack(cid, seq), res) for (cid, seq), res in state.sessions.items()]
    rows.sort()
    return rows


@dataclass(slots=True)
class Limbo:
    """A proposal whose caller timed out before it was decided."""

    seq: int
    data: bytes
    origin: str
    submitted: float
    decided: bool = False


@dataclass(slots=True)
class Group:
    gid: int
    state: DictState
    alive: bool = True
    limbo: list[Limbo] = field(default_factory=list)
    applied: int = 0


class Node:
    """One server process: its view of the map, its coordinator, and whether it is paused."""

    def __init__(self, nid: int) -> None:
        self.id = nid
        self.map: ShardMap | None = None
        self.raw = b""
        self.changed = asyncio.Event()
        self.paused = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.coordinator: MoveDriver | None = None
        self.task: asyncio.Task[None] | None = None
        self.incarnation = 0
        self.slow_until = 0.0
        """Until then, this node applies the metadata log late (a slow or partitioned follower)."""
        self.stashed: tuple[ShardMap, bytes] | None = None
        self.armed: float | None = None
        """Stall for this long at the coordinator's next call into the cluster (a process that
        stops in the middle of a move: GC, swapping, SIGSTOP)."""

    @property
    def version(self) -> int:
        return self.map.version if self.map is not None else 0

    def see(self, m: ShardMap, raw: bytes) -> None:
        """The node applied a new map (a paused process applies it when it resumes)."""
        if self.paused:
            if self.stashed is None or m.version > self.stashed[0].version:
                self.stashed = (m, raw)
            return
        if m.version <= self.version:
            return
        self.map, self.raw = m, raw
        self.changed.set()
        self.changed = asyncio.Event()

    async def gate(self) -> None:
        """Wait while the process is paused."""
        while self.paused:
            await self.resumed.wait()


class SimParams(Protocol):
    """The knobs `SimCluster` reads (`sim.MigParams` has them)."""

    @property
    def coord_attempt(self) -> float: ...

    @property
    def p_export_break(self) -> float: ...


class SimWorld(Protocol):
    """What `SimCluster` needs of the simulation (`sim.Simulation` provides it). A protocol, so
    that this module does not import `sim` (which imports this module)."""

    @property
    def p(self) -> SimParams: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def faults_on(self) -> bool: ...

    @property
    def meta_leader(self) -> int: ...

    @property
    def now(self) -> float: ...

    def pause(self, node: Node, d: float) -> None: ...

    def sleep(self, delay: float) -> asyncio.Future[None]: ...

    def net(self) -> asyncio.Future[None]: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...

    async def submit(self, gid: int, data: bytes, origin: str, timeout: float, *, hop: bool = True) -> ApplyResult: ...

    def export_now(self, gid: int, ranges: IntervalSet) -> list[bytes]: ...


class SimCluster:
    """`movedriver.Cluster` of one simulated node."""

    def __init__(self, sim: SimWorld, node: Node) -> None:
        self.sim = sim
        self.node = node
        self.origin = f"coord n{node.id}#{node.incarnation}"

    async def _gate(self) -> None:
        node = self.node
        if node.armed is not None and not node.paused:
            self.sim.pause(node, node.armed)
            node.armed = None
        await node.gate()

    def is_meta_leader(self) -> bool:
        return self.sim.meta_leader == self.node.id

    def current_map(self) -> tuple[ShardMap | None, bytes]:
        return self.node.map, self.node.raw

    def node_addresses(self) -> dict[int, str]:
        m = self.node.map
        return dict(m.nodes) if m is not None else {}

    async def propose(self, group: int, data: bytes) -> ApplyResult:
        """GroupCaller.call: retried (definite and indeterminate errors alike) until a deadline."""
        sim = self.sim
        p = sim.p
        end = sim.now + p.coord_attempt * 4
        delay = 0.02
        last: errors.KVError | None = None
        while sim.now < end:
            await self._gate()
            try:
                return await sim.submit(group, data, self.origin, p.coord_attempt)
            except errors.InvalidArgument:
                raise
            except errors.KVError as err:
                last = err
            await self._gate()
            await sim.sleep(delay * (0.5 + sim.rng.random()))
            delay = min(delay * 2, 0.5)
        raise errors.Timeout(f"group {group}: no leader completed the request in time (last error: {last})",
                             indeterminate=True)

    async def export(self, group: int, ranges: IntervalSet) -> AsyncIterator[bytes]:
        """GroupCaller.export: read at the group (after a read barrier) from one consistent view;
        retried from the start before the first chunk, broken for good after it."""
        sim = self.sim
        p = sim.p
        end = sim.now + p.coord_attempt * 4
        last: Exception | None = None
        while sim.now < end:
            await self._gate()
            await sim.net()
            try:
                chunks = sim.export_now(group, ranges)
            except errors.KVError as err:
                last = err
                await sim.sleep(0.05)
                continue
            started = False
            for chunk in chunks:
                await sim.net()
                if sim.faults_on and sim.rng.random() < p.p_export_break:
                    broke = errors.Unavailable(f"export from group {group}: stream broke")
                    if started:
                        raise errors.Unavailable(f"export from group {group} broke: {broke}")
                    last = broke
                    break
                started = True
                yield chunk
                await self._gate()
            else:
                return
            await sim.sleep(0.05)
        raise errors.Timeout(f"export from group {group} did not complete (last error: {last})")

    async def wait_map(self, version: int, timeout: float) -> bool:
        end = self.sim.now + timeout
        node = self.node
        while node.version < version:
            left = end - self.sim.now
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(node.changed.wait(), left)
            except TimeoutError:
                return False
        return True

