"""Reading a group's change log for watch: the changes of a revision interval with their values.
STANDARD LIBRARY ONLY.

The change log (`mvcc.T_CHANGES`, the LOG table: `revision:u64 kid:u64 -> version`) holds one
row per retained version, in revision order, with its key and value; the version before it (a
watcher's `prev_kv`) is the row its `prev` link names. `read_changes` turns an interval of it into `Change`s, inside one read view the caller
provides (an LMDB read transaction, or the in-memory rows).

Invariants (what watch builds on):
- the changes come in revision order, and all changes of one revision come together: a read
  that stops early (`max_events` / `max_bytes`) stops after a whole revision, and says through
  which revision it is complete (`ChangeBatch.upto`);
- a read that starts below the group's compact revision C raises `mvcc.Compacted`: changes
  there are gone, so nothing is silently skipped; the check and the read share the caller's view.
  A read from C itself works if the group kept the changes at C (`RevState.kept`: the keep rule
  of `mvcc.compact`), their prev_kv gone (the versions before C are); otherwise it raises too;
- a change whose row does not decode is a ValueError (the caller reports a corrupt store), never
  a skipped event.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import mvcc

_PAIR = struct.Struct(">QQ")

PUT = mvcc.KIND_PUT
DELETE = mvcc.KIND_DELETE


@dataclass(slots=True)
class Change:
    """One change of one key: PUT (`value`, `create_revision`, `version` as in etcd) or DELETE
    (value None, create_revision = version = 0). `prev` is the key's version before it (None:
    absent, not asked for, or compacted away)."""

    revision: int
    key: bytes
    kind: int
    value: bytes | None
    create_revision: int
    version: int
    prev: mvcc.Version | None = None

    def size(self) -> int:
        """Bytes it takes on the wire, roughly (bounds buffers)."""
        n = 48 + len(self.key) + (len(self.value) if self.value is not None else 0)
        if self.prev is not None and self.prev.value is not None:
            n += len(self.key) + len(self.prev.value) + 24
        return n


@dataclass(slots=True)
class ChangeBatch:
    """The changes of a group with lo <= revision <= upto, in revision order, read in one view
    whose revision state was `state` (`upto` = the requested `hi` unless the read stopped early
    at a revision boundary)."""

    state: mvcc.RevState
    changes: list[Change] = field(default_factory=list)
    upto: int = 0


def read_changes(
    rows: mvcc.Rows, lo: int, hi: int, *, max_events: int, max_bytes: int, prev_kv: bool
) -> ChangeBatch:
    """The changes with `lo` <= revision <= `hi` of the group whose tables `rows` are (see the
    module docstring). Raises mvcc.Compacted if `lo` is below the compact revision (the changes
    of [lo, compact) are gone), or at it when its changes were not kept (`RevState.kept`), ValueError for a corrupt row. `lo` >= 1."""
    st = mvcc.rev_state(rows)
    if lo < st.compact or (lo == st.compact and not st.kept):
        raise mvcc.Compacted(st.compact)
    out = ChangeBatch(st, [], hi)
    if hi < lo:
        return out
    stop_hi = _PAIR.pack(hi + 1, 0) if hi < mvcc.REVISION_MAX else None
    size = 0
    for k, v in rows.iter(mvcc.T_CHANGES, _PAIR.pack(lo, 0), stop_hi):
        rev, kid = _PAIR.unpack(bytes(k))
        changes = out.changes
        if changes and rev != changes[-1].revision and (len(changes) >= max_events or size >= max_bytes):
            out.upto = changes[-1].revision
            return out
        c = _change(rows, rev, kid, bytes(v), prev_kv)
        changes.append(c)
        size += c.size()
    return out


def _change(rows: mvcc.Rows, rev: int, kid: int, raw: bytes, prev_kv: bool) -> Change:
    lr = mvcc.decode_log_row(rev, raw)
    prev = None
    if prev_kv and lr.prev:
        got = rows.get(mvcc.T_CHANGES, _PAIR.pack(lr.prev, kid))
        if got is not None:  # missing: a tombstone compacted away (absent then)
            pv = mvcc.decode_log_row(lr.prev, bytes(got))
            prev = pv.at(lr.prev) if pv.kind == PUT else None
    if lr.kind == DELETE:
        return Change(rev, lr.key, DELETE, None, 0, 0, prev)
    return Change(rev, lr.key, PUT, lr.value, lr.create, lr.version, prev)
