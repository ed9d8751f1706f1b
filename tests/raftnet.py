"""A tiny synchronous network of RaftNodes for scenario tests (in the style of etcd's `network`).

Every node runs its Readies through the one Ready loop (`kvstore.raft.readyloop`) and persists
each into its MemoryStorage at once, so "durable" here is immediate; the node simulator is where
persistence lags and crashes lose data.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvstore.raft import (
    Config,
    ConfState,
    Entry,
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    RaftNode,
    ReadState,
    Ready,
    Role,
    readyloop,
)


@dataclass
class Member:
    node: RaftNode
    storage: MemoryStorage
    applied: list[Entry] = field(default_factory=list)
    reads: list[ReadState] = field(default_factory=list)


def _persist(m: Member, node: RaftNode, rd: Ready) -> None:
    readyloop.persist_to_memory(m.storage, rd)
    if rd.snapshot is not None:
        meta = rd.snapshot.meta
        m.applied = [Entry(meta.term, meta.index, EntryType.NORMAL, b"<snap>")]


def _apply(m: Member, rd: Ready) -> None:
    m.applied.extend(rd.committed_entries)
    m.reads.extend(rd.read_states)


class Network:
    def __init__(
        self,
        ids: Iterable[int] = (1, 2, 3),
        *,
        learners: Iterable[int] = (),
        seed: int = 1,
        **cfg: object,
    ) -> None:
        self.ids = sorted(ids)
        self.conf = ConfState(tuple(self.ids), tuple(sorted(learners)))
        self.cfg = cfg
        self.seed = seed
        self.members: dict[int, Member] = {}
        self.dropped: set[tuple[int, int]] = set()
        self.drop_types: set[MessageType] = set()
        self.queue: list[Message] = []
        self.filter: Callable[[Message], bool] | None = None
        """If set, a message is delivered only when filter(message) is true."""
        self.delivered: list[Message] = []
        for nid in self.ids + sorted(learners):
            self.add(nid, self.conf)

    def add(self, nid: int, conf: ConfState | None = None) -> Member:
        storage = MemoryStorage.bootstrap(conf) if conf is not None else MemoryStorage()
        node = RaftNode(Config(id=nid, **self.cfg), storage, random.Random(self.seed * 1000 + nid))  # type: ignore[arg-type]
        m = self.members[nid] = Member(node, storage)
        return m

    def restart(self, nid: int) -> None:
        """Rebuild a node from its storage (its applied state is kept in `Member.applied`)."""
        old = self.members[nid]
        applied = old.applied[-1].index if old.applied else 0
        applied = max(applied, old.storage.first_index() - 1)
        node = RaftNode(
            Config(id=nid, applied=applied, **self.cfg),  # type: ignore[arg-type]
            old.storage,
            random.Random(self.seed * 1000 + nid + 7),
        )
        old.node = node

    def node(self, nid: int) -> RaftNode:
        return self.members[nid].node

    def leader(self) -> RaftNode | None:
        leaders = [m.node for m in self.members.values() if m.node.role == Role.LEADER]
        if not leaders:
            return None
        return max(leaders, key=lambda n: n.term)

    # --- faults -------------------------------------------------------------------------
    def isolate(self, nid: int) -> None:
        for other in self.members:
            if other != nid:
                self.dropped.add((nid, other))
                self.dropped.add((other, nid))

    def cut(self, a: int, b: int) -> None:
        self.dropped.add((a, b))
        self.dropped.add((b, a))

    def heal(self) -> None:
        self.dropped.clear()
        self.drop_types.clear()

    # --- driving ------------------------------------------------------------------------
    def _drain(self, nid: int) -> None:
        m = self.members[nid]
        readyloop.drain(m, m.node, self.queue.extend, _persist, _apply)

    def stabilize(self, max_steps: int = 100_000) -> None:
        """Deliver messages and drain Readies until nothing is left to do."""
        for _ in range(max_steps):
            for nid in sorted(self.members):
                self._drain(nid)
            if not self.queue:
                return
            q, self.queue = self.queue, []
            for msg in q:
                if (msg.frm, msg.to) in self.dropped or msg.type in self.drop_types:
                    continue
                if self.filter is not None and not self.filter(msg):
                    continue
                if msg.to not in self.members:
                    continue
                self.delivered.append(msg)
                self.members[msg.to].node.step(msg)
        raise AssertionError("network did not stabilize")

    def tick(self, n: int = 1, only: Iterable[int] | None = None) -> None:
        ids = sorted(only) if only is not None else sorted(self.members)
        for _ in range(n):
            for nid in ids:
                self.members[nid].node.tick()
            self.stabilize()

    def expire_leases(self) -> None:
        """Let every node forget it heard from a leader recently (as if an election timeout passed
        without heartbeats), so that vote requests are considered."""
        for m in self.members.values():
            n = m.node
            n.boot_ticks = n.cfg.election_tick
            if n.role != Role.LEADER:
                n.election_elapsed = n.cfg.election_tick

    def elect(self, nid: int) -> RaftNode:
        """Make `nid` campaign and return it as leader."""
        node = self.node(nid)
        for _ in range(5):
            self.expire_leases()
            node.campaign()
            self.stabilize()
            if node.role == Role.LEADER:
                return node
        raise AssertionError(f"node {nid} did not become leader")

    def heartbeat(self, nid: int) -> None:
        """Tick leader `nid` until it heartbeats, and deliver: followers learn its commit index
        (a leader does not broadcast commit advances by themselves; see kvstore.raft.core)."""
        self.tick(self.node(nid).cfg.heartbeat_tick, only=[nid])

    def propose(self, nid: int, data: bytes) -> int:
        idx = self.node(nid).propose(data)
        self.stabilize()
        return idx

    def applied_data(self, nid: int) -> list[bytes]:
        return [e.data for e in self.members[nid].applied if e.type == EntryType.NORMAL and e.data]
