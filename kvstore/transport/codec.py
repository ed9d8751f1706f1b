"""Conversion between the core's `Message` and the wire's `RaftMessage`.

`from_proto` is total: a wire message either becomes a `Message` that is well formed by itself,
or raises `MessageError` (a ValueError) naming what is wrong; nothing else escapes. Well formed
means, whatever the receiver's state:
- its type and every entry's type are known, and it is a type that travels between nodes;
- every term, index, commit and node id is below 2^63 (`MAX_U63`), so it and its successor
  encode as u64 wherever they are stored; the sender and the receiver are real node ids (>= 1);
- its entries are consecutive, starting right after `index`, with terms that never decrease,
  never exceed the message's term and are not below `log_term`; each CONF_CHANGE entry decodes;
- a snapshot's metadata names a configuration with at least one voter, disjoint from its
  learners, at an index >= 1;
- its context is at most `MAX_CONTEXT` bytes.
What depends on the receiver (does it host the group, is the sender a member, is the term jump
one the protocol can produce) is checked by `kvstore.node.inbound` before the message is
stepped into a core.
"""

from __future__ import annotations

from kvstore.raft import ConfChange, ConfState, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMeta
from kvstore.raft.types import MAX_U63
from kvstore.v1 import raft_pb2

_ENTRY_TYPES = {int(t): t for t in EntryType}
_MSG_TYPES = {int(t): t for t in MessageType}

MAX_CONTEXT = 1024
"""Longest message context (the core uses 8-byte read-index contexts and b"transfer")."""


class MessageError(ValueError):
    """A wire message that is malformed by itself (see the module docstring)."""


def to_proto(m: Message) -> raft_pb2.RaftMessage:
    pm = raft_pb2.RaftMessage(
        group=m.group, type=int(m.type), to=m.to, term=m.term, log_term=m.log_term,
        index=m.index, commit=m.commit, reject=m.reject, reject_hint=m.reject_hint, context=m.context,
        seq=m.seq, quiesce=m.quiesce, commit_only=m.commit_only,
    )
    setattr(pm, "from", m.frm)
    if m.entries:
        pm.entries.extend(
            raft_pb2.Entry(term=e.term, index=e.index, type=int(e.type), data=e.data) for e in m.entries
        )
    if m.snapshot is not None:
        meta = m.snapshot.meta
        pm.snapshot.index = meta.index
        pm.snapshot.term = meta.term
        pm.snapshot.conf_state.voters.extend(meta.conf_state.voters)
        pm.snapshot.conf_state.learners.extend(meta.conf_state.learners)
    return pm


def meta_from_proto(pm: raft_pb2.SnapshotMeta) -> SnapshotMeta:
    """Snapshot metadata from the wire; raises MessageError unless it is well formed."""
    voters, learners = list(pm.conf_state.voters), list(pm.conf_state.learners)
    ids = voters + learners
    if not voters:
        raise MessageError("snapshot configuration has no voter")
    if len(set(ids)) != len(ids):
        raise MessageError("snapshot configuration lists a node twice")
    if any(not 0 < n < MAX_U63 for n in ids):
        raise MessageError("snapshot configuration names node 0 or an id >= 2^63")
    if not 0 < pm.index < MAX_U63 or not 0 < pm.term < MAX_U63:
        raise MessageError(f"snapshot at index {pm.index} term {pm.term} is out of range")
    return SnapshotMeta(pm.index, pm.term, ConfState(tuple(sorted(voters)), tuple(sorted(learners))))


def from_proto(pm: raft_pb2.RaftMessage, snapshot_data: bytes = b"") -> Message:
    """Decode a wire message; raises MessageError unless it is well formed (module docstring)."""
    mtype = _MSG_TYPES.get(pm.type)
    if mtype is None:
        raise MessageError(f"unknown raft message type {pm.type}")
    frm = getattr(pm, "from")
    if not 0 < frm < MAX_U63 or not 0 < pm.to < MAX_U63:
        raise MessageError(f"message from node {frm} to node {pm.to}: node ids are 1..2^63-1")
    term = pm.term
    for name, v in (
        ("term", term), ("log_term", pm.log_term), ("index", pm.index), ("commit", pm.commit),
        ("reject_hint", pm.reject_hint), ("seq", pm.seq), ("group", pm.group),
    ):
        if v >= MAX_U63:
            raise MessageError(f"{mtype.name} {name} {v} is not below 2^63")
    if len(pm.context) > MAX_CONTEXT:
        raise MessageError(f"{mtype.name} context of {len(pm.context)} bytes exceeds {MAX_CONTEXT}")
    group = pm.group
    entries: list[Entry] = []
    if pm.commit_only and (mtype != MessageType.APP or pm.entries):
        raise MessageError(f"{mtype.name} marked commit-only (only an empty APP may be)")
    if pm.entries:
        if mtype != MessageType.APP:
            raise MessageError(f"{mtype.name} carries entries")
        expect, prev_term = pm.index + 1, pm.log_term
        for e in pm.entries:
            et = _ENTRY_TYPES.get(e.type)
            if et is None:
                raise MessageError(f"unknown entry type {e.type}")
            if e.index != expect:
                raise MessageError(f"entry {e.index} where entry {expect} was due")
            if not prev_term <= e.term <= term:
                raise MessageError(
                    f"entry {e.index} has term {e.term}, outside [{prev_term}, {term}] (terms never decrease)"
                )
            if et == EntryType.CONF_CHANGE:
                try:
                    ConfChange.decode(e.data)
                except ValueError as err:
                    raise MessageError(f"entry {e.index}: malformed conf change: {err}") from None
            entries.append(Entry(e.term, e.index, et, e.data, group))
            expect, prev_term = expect + 1, e.term
        if expect >= MAX_U63:
            raise MessageError("entries run past index 2^63")
    snap = None
    if pm.HasField("snapshot"):
        if mtype != MessageType.SNAP:
            raise MessageError(f"{mtype.name} carries a snapshot")
        snap = Snapshot(meta_from_proto(pm.snapshot), snapshot_data)
    elif mtype == MessageType.SNAP:
        raise MessageError("SNAP message without a snapshot")
    return Message(
        mtype, pm.to, frm, term=term, group=group, log_term=pm.log_term,
        index=pm.index, entries=entries, commit=pm.commit, reject=pm.reject,
        reject_hint=pm.reject_hint, snapshot=snap, context=pm.context, seq=pm.seq, quiesce=pm.quiesce,
        commit_only=pm.commit_only,
    )
