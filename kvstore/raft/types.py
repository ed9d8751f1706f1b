"""Value types of the Raft core: entries, messages, hard state, configurations, snapshots, Ready.

Everything here is plain data. Messages and entries carry the id of the Raft group they belong to,
so one process can multiplex many groups over one transport; the core itself only ever sees its own
group id.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

NONE = 0
"""Node id meaning "nobody" (no vote, no known leader). Real node ids are >= 1."""


class MessageType(enum.IntEnum):
    """Raft messages. Local inputs (ticks, proposals) are method calls, not messages."""

    APP = 1
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PRE_VOTE = 5
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9
    TIMEOUT_NOW = 10
    READ_INDEX = 11
    READ_INDEX_RESP = 12
    TRANSFER_LEADER = 13


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 0
    """Add a voter, or promote an existing learner to voter."""
    ADD_LEARNER = 1
    """Add a learner (non-voting member that receives the log)."""
    REMOVE_NODE = 2
    """Remove a voter or a learner."""


@dataclass(slots=True)
class Entry:
    """A log entry. `data` is opaque to the core except for CONF_CHANGE entries."""

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""
    group: int = 0

    def size(self) -> int:
        return len(self.data) + 24


def limit_size(ents: list[Entry], max_size: int | None) -> list[Entry]:
    """The longest prefix of `ents` whose total `size()` is at most `max_size`, but never less than
    one entry (a single entry over the limit still goes); all of them if `max_size` is None."""
    if max_size is None or not ents:
        return ents
    size = 0
    for i, e in enumerate(ents):
        size += e.size()
        if i and size > max_size:
            return ents[:i]
    return ents


def entries_to_append(ents: list[Entry], base_index: int, last_index: int) -> list[Entry]:
    """What of `ents` a log whose compacted base is `base_index` and whose last entry is
    `last_index` must append (dropping entries at or below its base); raises RaftError if they
    would leave a gap after `last_index` or are not contiguous. The caller truncates its log
    from the first returned entry's index on (a conflicting suffix) before appending them."""
    if not ents or ents[-1].index <= base_index:
        return []
    if ents[0].index <= base_index:
        ents = ents[base_index + 1 - ents[0].index :]
    start, new_last = ents[0].index, ents[-1].index
    if start > last_index + 1:
        raise RaftError(f"missing log entry: last {last_index}, appended at {start}")
    if new_last - start + 1 != len(ents):
        raise RaftError(f"appended entries {start}..{new_last} are not contiguous")
    return ents


@dataclass(slots=True, frozen=True)
class HardState:
    """State that must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


@dataclass(slots=True, frozen=True)
class ConfState:
    """A cluster configuration: sorted voter and learner ids. Disjoint sets."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()

    def members(self) -> tuple[int, ...]:
        return tuple(sorted(self.voters + self.learners))

    def apply(self, cc: ConfChange) -> ConfState:
        """Return the configuration after `cc`. Invalid changes raise ValueError."""
        voters = set(self.voters)
        learners = set(self.learners)
        node = cc.node_id
        if node == NONE:
            raise ValueError("conf change names node 0")
        if cc.type == ConfChangeType.ADD_VOTER:
            learners.discard(node)
            voters.add(node)
        elif cc.type == ConfChangeType.ADD_LEARNER:
            if node in voters:
                raise ValueError(f"node {node} is a voter; demotion is not supported")
            learners.add(node)
        elif cc.type == ConfChangeType.REMOVE_NODE:
            voters.discard(node)
            learners.discard(node)
        if not voters:
            raise ValueError("a configuration needs at least one voter")
        return ConfState(tuple(sorted(voters)), tuple(sorted(learners)))


_CC = struct.Struct(">BQ")

MAX_U63 = 1 << 63
"""Every term, index and node id is below this: values that arrive from outside at or above it
are refused before they reach a core (their successors must still encode as u64)."""

MAX_CONF_CONTEXT = 1024
"""Longest conf-change context (the application's: a member's address)."""


@dataclass(slots=True, frozen=True)
class ConfChange:
    """A single-server membership change, carried in a CONF_CHANGE entry's data.

    `context` is opaque to the core (the application may put the new member's address there).
    """

    type: ConfChangeType
    node_id: int
    context: bytes = b""

    def encode(self) -> bytes:
        return _CC.pack(int(self.type), self.node_id) + self.context

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """Decode a CONF_CHANGE entry's data. Total: anything malformed (short, unknown type,
        node id 0 or not below `MAX_U63`, a context over `MAX_CONF_CONTEXT` bytes) raises
        ValueError and nothing else."""
        if len(data) < _CC.size:
            raise ValueError(f"conf change of {len(data)} bytes is shorter than its {_CC.size}-byte header")
        t, node = _CC.unpack_from(data)
        try:
            kind = ConfChangeType(t)
        except ValueError:
            raise ValueError(f"unknown conf change type {t}") from None
        if not 0 < node < MAX_U63:
            raise ValueError(f"conf change names node {node}")
        if len(data) - _CC.size > MAX_CONF_CONTEXT:
            raise ValueError(f"conf change context of {len(data) - _CC.size} bytes exceeds {MAX_CONF_CONTEXT}")
        return cls(kind, node, bytes(data[_CC.size :]))


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(slots=True, frozen=True)
class Snapshot:
    """A snapshot of the state machine at `meta.index`.

    `data` is opaque to the core. The transport may carry it in chunks; the core sees it whole.
    """

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.meta.index == 0


@dataclass(slots=True)
class Message:
    """A Raft message between two nodes of one group.

    Field use by type:
    - APP: index/log_term = entry preceding `entries`; commit = leader commit. commit_only = True
      marks a commit announcement (core docstring, "Commit propagation"): no entries, sent to a
      member the leader knows holds its whole log (match = index = commit); a member that accepts
      it sends no APP_RESP, which would tell the leader nothing it does not know.
    - APP_RESP: index = last index matched (accept) or the rejected index (reject);
      reject_hint/log_term = the follower's hint for fast backtracking.
    - VOTE/PRE_VOTE: index/log_term = candidate's last entry; context = b"transfer" for a
      leadership-transfer campaign (voters then ignore their leader lease).
    - HEARTBEAT: commit = min(leader commit, follower match); seq = latest ReadIndex round;
      index = the leader's tick when it was sent (lease bookkeeping; increases with every
      heartbeat the leader sends within a term). quiesce = True marks the leader's last heartbeat
      before it quiesces; it then also carries log_term = the term of the leader's last entry
      (whose index is `commit`).
    - HEARTBEAT_RESP: seq and index = echoed. With quiescence enabled: commit = the follower's
      commit index; quiesce = True answers a quiesce heartbeat with "I quiesced too";
      reject = True asks a quiesced leader to wake ("I am awake": the follower could not
      quiesce, or it left quiescence on its own).
    - READ_INDEX/READ_INDEX_RESP: context = the application's request context; index = read index.
    - SNAP: snapshot.
    """

    type: MessageType
    to: int
    frm: int
    term: int = 0
    group: int = 0
    log_term: int = 0
    index: int = 0
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""
    seq: int = 0
    quiesce: bool = False
    commit_only: bool = False


@dataclass(slots=True, frozen=True)
class SoftState:
    """Volatile state the application may want to observe; never persisted."""

    leader: int = NONE
    role: Role = Role.FOLLOWER


@dataclass(slots=True, frozen=True)
class ReadState:
    """A released read request: serve it once the application has applied through `index`."""

    index: int
    context: bytes


@dataclass(slots=True)
class Ready:
    """What the application must do next, handed out by `RaftNode.ready()`.

    Order of work for the application:
    1. persist `snapshot` (if any), `entries` and `hard_state` (if any) durably, in one batch;
       `messages` may be sent before or while persisting;
    2. send `persisted_messages` (only after step 1 is durable);
    3. apply `committed_entries` in order, then call `RaftNode.advance(ready)`.

    `read_states` may be served once the local state machine has applied through their index.
    """

    number: int
    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    persisted_messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)


def bootstrap_entries(conf: ConfState, group: int = 0) -> list[Entry]:
    """The first entries of a new group's log: one committed CONF_CHANGE per initial member.

    Every initial member starts with exactly these entries (index 1.., term 1) and a hard state of
    term 1 and commit len(entries). The configuration is therefore part of the log, and a node that
    joins later learns it by replication like everything else.
    """
    changes = [ConfChange(ConfChangeType.ADD_VOTER, v) for v in sorted(conf.voters)]
    changes += [ConfChange(ConfChangeType.ADD_LEARNER, v) for v in sorted(conf.learners)]
    return [Entry(1, i, EntryType.CONF_CHANGE, cc.encode(), group) for i, cc in enumerate(changes, 1)]


class ProposalDropped(Exception):
    """The proposal was not appended: it definitely did not happen."""


class RaftError(Exception):
    """Programming errors in the use of the core (bad storage, bad arguments)."""
