"""Conversion between the core's `Message` and the wire's `RaftMessage`."""

from __future__ import annotations

from kvstore.raft import ConfState, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMeta
from kvstore.v1 import raft_pb2

_ENTRY_TYPES = {int(t): t for t in EntryType}
_MSG_TYPES = {int(t): t for t in MessageType}


def to_proto(m: Message) -> raft_pb2.RaftMessage:
    pm = raft_pb2.RaftMessage(
        group=m.group, type=int(m.type), to=m.to, term=m.term, log_term=m.log_term,
        index=m.index, commit=m.commit, reject=m.reject, reject_hint=m.reject_hint, context=m.context,
        seq=m.seq, quiesce=m.quiesce,
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
    cs = ConfState(tuple(sorted(pm.conf_state.voters)), tuple(sorted(pm.conf_state.learners)))
    return SnapshotMeta(pm.index, pm.term, cs)


def from_proto(pm: raft_pb2.RaftMessage, snapshot_data: bytes = b"") -> Message:
    """Decode a wire message. Raises ValueError on an unknown type."""
    mtype = _MSG_TYPES.get(pm.type)
    if mtype is None:
        raise ValueError(f"unknown raft message type {pm.type}")
    group = pm.group
    entries = []
    for e in pm.entries:
        et = _ENTRY_TYPES.get(e.type)
        if et is None:
            raise ValueError(f"unknown entry type {e.type}")
        entries.append(Entry(e.term, e.index, et, e.data, group))
    snap = None
    if pm.HasField("snapshot"):
        snap = Snapshot(meta_from_proto(pm.snapshot), snapshot_data)
    return Message(
        mtype, pm.to, getattr(pm, "from"), term=pm.term, group=group, log_term=pm.log_term,
        index=pm.index, entries=entries, commit=pm.commit, reject=pm.reject,
        reject_hint=pm.reject_hint, snapshot=snap, context=pm.context, seq=pm.seq, quiesce=pm.quiesce,
    )
