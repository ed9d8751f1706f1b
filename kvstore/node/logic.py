"""One node's logic around its multi-raft host, synchronous and with everything injected.

`NodeLogic` owns the host (`host.Host`), the node's view of the shard map (`tracker`) and the
admission of other nodes' messages (`inbound`), and does what a node does between Ready cycles:
- at start: open every group on the store; a new cluster bootstraps the metadata group (group
  0, every voter, holding the initial shard map), computed identically on every node from the
  same flags; then reconcile;
- `reconcile()` (after every cycle in which the metadata group applied a new map): open the data
  groups the map places here (bootstrapping those this node is an initial member of), destroy
  the ones the map dropped and leave a tombstone (a late message cannot recreate them), and tell
  the host each group's preferred leader;
- `deliver(m)`: admit (`inbound.Inbound.admit`) and step a peer's message;
- `tick(now)`: tick the host, ping every peer (node-level liveness: one small batch per peer per
  tick, however many groups) and tell the host which peers were silent for an election timeout,
  so the quiesced groups they lead wake;
- `after_cycle()`: keep the transport's peer set in line with the membership and the map fresh.

Nothing here touches a socket, a clock or a thread: time comes in as `now`, randomness as the
`rng` handed in, storage is the `NodeStore` and the network is a `PeerTransport`. The asyncio
shell (`kvstore.server.node`) and the simulator drive the same code.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.node.store import NodeStore
from kvstore.raft import ConfState, Message
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap
from kvstore.storage import commands
from kvstore.storage.errors import StorageError
from kvstore.storage.shardcmd import ShardOp, encode_shard_command

from .host import Host, RaftSettings
from .inbound import Inbound, RefusalLog
from .tracker import ShardTracker

log = logging.getLogger("kvstore.node")


class PeerTransport(Protocol):
    """What the node logic needs from its network (gRPC streams in a process; a simulated
    network in the simulator). Every call only enqueues: none blocks or fails."""

    def send(self, messages: list[Message]) -> None: ...

    def send_snapshot(self, m: Message) -> None:
        """Stream the group's snapshot to `m.to`; report the outcome to the host
        (`Host.report_snapshot`) when done."""
        ...

    def set_addresses(self, addresses: dict[int, str]) -> None:
        """Bring the set of peers in line with the membership (node id -> address)."""
        ...

    def ping(self) -> None:
        """Send every peer a (possibly empty) batch now: node-level liveness."""
        ...

    @property
    def peer_ids(self) -> Collection[int]: ...


@dataclass(slots=True)
class Bootstrap:
    """How a new cluster starts: the same on every node, so every node computes the same logs."""

    peers: Mapping[int, str]
    groups: int = 1
    replication: int = 3
    vnodes: int = 128
    join: bool = False
    """Start without bootstrapping: wait to be added to an existing cluster."""


@dataclass(slots=True)
class NodeLogic:
    node_id: int
    store: NodeStore
    transport: PeerTransport
    settings: RaftSettings
    boot: Bootstrap
    rng: random.Random
    refusals: RefusalLog
    tracker: ShardTracker | None = None
    """The node's view of the map (default: a `ShardTracker` of `store`; the asyncio shell hands
    in one its coroutines can wait on)."""
    host: Host = field(init=False)
    inbound: Inbound = field(init=False)
    tombstones: set[int] = field(init=False)
    last_heard: dict[int, float] = field(default_factory=dict)
    started_at: float = 0.0
    _members_seen: dict[int, str] = field(default_factory=dict)
    on_reconciled: Callable[[], None] | None = None
    reconcile_due: bool = False
    """A reconcile failed on a storage error: the next tick tries again."""

    def __post_init__(self) -> None:
        store = self.store
        members = dict(self.boot.peers)
        members.update(store.members())
        self.host = Host(self.node_id, store, self.transport.send, self.settings, self.rng, members)
        self.host.on_snapshot_needed = self.transport.send_snapshot
        self.tombstones = store.tombstones()
        tracker = self.tracker = self.tracker or ShardTracker(store)
        self.inbound = Inbound(self.node_id, self.host, lambda: tracker.map, self.tombstones, self.refusals)

    @property
    def shard_tracker(self) -> ShardTracker:
        assert self.tracker is not None  # set in __post_init__
        return self.tracker

    # --- start and the shard map ------------------------------------------------------------
    def start(self, now: float) -> None:
        """Open every group on the store (bootstrapping a new cluster), then reconcile."""
        host, store = self.host, self.store
        self.started_at = now
        existing = store.groups()
        if not self.boot.join and META_GROUP not in existing:
            self._bootstrap_cluster()
        for gid in existing:
            host.open_group(gid, None)
        if META_GROUP not in host.groups:
            host.open_group(META_GROUP, None)  # joining: filled by the leader (log or snapshot)
        self.reconcile()
        self.sync_members()

    def _bootstrap_cluster(self) -> None:
        b = self.boot
        voters = tuple(sorted(b.peers))
        smap = ShardMap.initial(voters, b.groups, b.replication, b.vnodes, dict(b.peers))
        log.info(
            "bootstrapping a new cluster: voters %s, %d data groups, replication %d",
            list(voters), b.groups, smap.replication,
        )
        self.host.open_group(META_GROUP, ConfState(voters), [commands.encode_put(SHARD_MAP_KEY, smap.encode())])

    def reconcile(self) -> None:
        """Open the data groups the map places here; destroy the ones it dropped."""
        host, tracker = self.host, self.shard_tracker
        tracker.refresh()
        m = tracker.map
        if m is None:
            return
        host.client_addresses = m.clients
        self.reconcile_due = False
        try:
            for gid in m.groups_of_node(self.node_id):
                if gid in host.groups or gid in self.tombstones:
                    continue
                p = m.groups[gid]
                if self.node_id in p.bootstrap:
                    ranges = m.bootstrap_ranges(gid)
                    log.info("creating data group %d (voters %s, %.1f%% of the keys)", gid, list(p.bootstrap),
                             100 * ranges.size() / 2**64)
                    host.open_group(gid, ConfState(tuple(sorted(p.bootstrap))),
                                    [encode_shard_command(ShardOp.SET, ranges)])
                else:
                    host.open_group(gid, None)
            for gid in [g for g in host.groups if g != META_GROUP and g not in m.groups]:
                if gid < m.next_group:
                    log.info("destroying data group %d: the shard map dropped it", gid)
                    host.close_group(gid, destroy=True)
                    self.tombstones.add(gid)
        except StorageError as err:
            # Creating or destroying a group writes to the store; if that failed (a full disk, a
            # failed fsync), nothing of it happened: try again at the next tick.
            log.warning("reconciling with the shard map failed, retrying: %s", err)
            self.reconcile_due = True
        host.preferred_leader = {g: p.voters[0] for g, p in m.groups.items() if p.voters}
        if self.on_reconciled is not None:
            self.on_reconciled()

    # --- inputs -----------------------------------------------------------------------------
    def deliver(self, m: Message) -> bool:
        """A peer's message: admitted and stepped (True), or refused / dropped (False)."""
        return self.inbound.admit(m) and self.host.step(m)

    def peer_connected(self, node: int, now: float) -> None:
        """`node` opened a new connection (its stream to us started): see `Host.peer_connected`."""
        self.last_heard[node] = now
        self.host.peer_connected(node)

    def heard(self, node: int, now: float) -> None:
        """Anything (even an empty batch) arrived from `node` at `now`."""
        self.last_heard[node] = now

    def tick(self, now: float) -> None:
        """One tick of logical time at `now` (seconds on the node's own clock)."""
        self.host.tick()
        if self.reconcile_due:
            self.reconcile()
        self.transport.ping()
        s = self.settings
        timeout = s.election_tick * s.tick_ms / 1000
        silent = {n for n in self.transport.peer_ids if now - self.last_heard.get(n, self.started_at) > timeout}
        if silent or self.host.suspected:
            self.host.suspect(silent)

    def after_cycle(self) -> None:
        """After a Ready cycle: the transport follows the membership; a new map is reconciled."""
        self.sync_members()
        if self.shard_tracker.refresh():
            self.reconcile()

    def sync_members(self) -> None:
        if self.host.members != self._members_seen:
            self._members_seen = dict(self.host.members)
            self.transport.set_addresses(self._members_seen)
