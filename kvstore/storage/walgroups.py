"""The Raft logs of all groups of a node, kept in memory and made durable by ONE write-ahead log.

`GroupLog` is one group's `kvstore.raft.storage.LogStorage` (same semantics as `MemoryStorage`:
append truncates a conflicting suffix, compaction keeps the term and configuration of the last
discarded entry, the same errors). `WalGroups` holds every group's `GroupLog` and changes them only
through `GroupRecord`s (`walrec.py`):

- `write(wal, records)` checks the whole batch against the current logs FIRST (a batch that would
  leave a gap, compact beyond the last entry or name a missing group raises before anything is
  written), appends the payloads to the `Wal` (NOT synced: the caller makes ONE `wal.sync()` per
  Ready cycle, before anything that depends on these records is sent or acknowledged), then
  applies each record with its sequence number. The logs are visible at once (the Raft core may
  read them in the same cycle; it acts on them only after the sync, the Ready contract).
- `recover(records, from_seq)` rebuilds the same logs from the records a `Wal.open` returned:
  records below `from_seq` (leftovers of a `truncate_prefix`, which keeps whole segments) are
  skipped, and so is every record of a group before its last RESET or DESTROY, and a rewrite
  (a RESET announcing `follow` ENTRIES records) that a crash cut short — the transitions
  are the same functions `write` uses, so the recovered logs equal the written ones exactly
  (a prefix of them, for what was not synced before a crash).

Invariants (`GroupLog`): entries contiguous from `base.index + 1` to `last_index()`;
`seqs[i]` is the WAL sequence number of the record that wrote `ents[i]`, non-decreasing (an
overwrite at index i drops everything above i); `anchor` (the seq of the group's last RESET) is
at most every seq the group's state depends on. Hence `needed_seq()` (the least anchor of any
group) is a safe prefix-truncation point: record `from_seq = needed_seq()` durably (the
checkpoint), THEN `wal.truncate_prefix(from_seq)`; and `recover(..., from_seq)` gives back every
live group. A group whose anchor pins old segments is moved forward by writing `rewrite(group)`
(a RESET with its base and hard state, then its entries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvstore.raft.storage import CompactedError, SnapshotTemporarilyUnavailable, UnavailableError
from kvstore.raft.types import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    RaftError,
    Snapshot,
    SnapshotMeta,
    entries_to_append,
    limit_size,
)

from .errors import StorageError
from .wal import Wal
from .walrec import (
    KIND_COMPACT,
    KIND_DESTROY,
    KIND_ENTRIES,
    KIND_HARD_STATE,
    KIND_RESET,
    GroupRecord,
    decode,
    encode,
)

_CONF_CHANGE = EntryType.CONF_CHANGE


class GroupLog:
    """One group's log (see the module docstring). `applied` tells `snapshot()` the state
    machine's applied index and configuration (default: the log's base)."""

    __slots__ = ("anchor", "applied", "base", "ents", "group", "hard_state", "seqs")

    def __init__(self, group: int, base: SnapshotMeta, hard_state: HardState, anchor: int) -> None:
        self.group = group
        self.base = base
        self.hard_state = hard_state
        self.ents: list[Entry] = []
        self.seqs: list[int] = []
        self.anchor = anchor
        self.applied: Callable[[], tuple[int, ConfState]] | None = None

    # --- LogStorage ---------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self.base.conf_state

    def first_index(self) -> int:
        return self.base.index + 1

    def last_index(self) -> int:
        return self.base.index + len(self.ents)

    def term(self, index: int) -> int:
        b = self.base.index
        if index < b:
            raise CompactedError(index)
        if index > b + len(self.ents):
            raise UnavailableError(index)
        return self.base.term if index == b else self.ents[index - b - 1].term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        b = self.base.index
        if lo <= b:
            raise CompactedError(lo)
        if hi > b + len(self.ents) + 1:
            raise UnavailableError(hi)
        if lo >= hi:
            return []
        return limit_size(self.ents[lo - b - 1 : hi - b - 1], max_size)

    def snapshot(self) -> Snapshot:
        index, conf = self.applied() if self.applied is not None else (self.base.index, self.base.conf_state)
        try:
            term = self.term(index)
        except (CompactedError, UnavailableError):
            raise SnapshotTemporarilyUnavailable() from None
        return Snapshot(SnapshotMeta(index, term, conf), b"")

    # --- what a compaction needs ----------------------------------------------------------------
    def compaction_base(self, index: int) -> SnapshotMeta:
        """The base a compaction at `index` installs: its term and the configuration in force
        after it (CONF_CHANGE entries applied to the base's, invalid ones skipped as the core
        does). `index` must lie in first_index() .. last_index()."""
        b = self.base.index
        if not b < index <= b + len(self.ents):
            raise RaftError(f"compact {index} outside {b + 1}..{b + len(self.ents)}")
        conf = self.base.conf_state
        for e in self.ents[: index - b]:
            if e.type == _CONF_CHANGE:
                try:
                    conf = conf.apply(ConfChange.decode(e.data))
                except ValueError:
                    continue
        return SnapshotMeta(index, self.ents[index - b - 1].term, conf)

    # --- transitions (the same live and at recovery) -------------------------------------------
    def _append(self, entries: list[Entry], seq: int) -> None:
        b = self.base.index
        ents = entries_to_append(entries, b, b + len(self.ents))
        if not ents:
            return
        cut = ents[0].index - b - 1
        del self.ents[cut:]
        del self.seqs[cut:]
        self.ents.extend(ents)
        self.seqs.extend([seq] * len(ents))

    def _compact(self, base: SnapshotMeta) -> None:
        b = self.base.index
        if base.index <= b:
            return
        if base.index > b + len(self.ents):
            raise RaftError(f"compact {base.index} beyond last index {b + len(self.ents)}")
        del self.ents[: base.index - b]
        del self.seqs[: base.index - b]
        self.base = base


class WalGroups:
    """Every group's `GroupLog` over one `Wal` (see the module docstring). One thread."""

    __slots__ = ("cut_rewrite", "groups", "max_record_bytes")

    def __init__(self, max_record_bytes: int) -> None:
        self.groups: dict[int, GroupLog] = {}
        self.max_record_bytes = max_record_bytes
        self.cut_rewrite: int | None = None
        """Set by `recover`: the seq of a rewrite's RESET that a crash cut short and that was
        therefore ignored. The caller MUST `wal.truncate_suffix(cut_rewrite - 1)` before writing
        anything (else the new records would follow the leftover pieces)."""

    @classmethod
    def recover(cls, records: Iterable[tuple[int, bytes]], from_seq: int, max_record_bytes: int) -> WalGroups:
        """The logs the records (as `Wal.open` returned them) describe. A record that does not
        decode, or a group whose kept records do not start with a RESET, or a transition the
        writer could never have made raises `StorageError` (the log refuses to guess)."""
        decoded = [(seq, decode(p)) for seq, p in records if seq >= from_seq]
        cut: int | None = None
        for i, (seq, rec) in enumerate(decoded):
            if rec.kind == KIND_RESET and rec.follow:
                pieces = decoded[i + 1 : i + 1 + rec.follow]
                if any(r.kind != KIND_ENTRIES or r.group != rec.group for _, r in pieces):
                    raise StorageError(
                        f"write-ahead log: the rewrite of group {rec.group} at {seq} is interleaved"
                    )
                if len(pieces) < rec.follow:  # an unsynced rewrite cut by a crash: it never happened
                    del decoded[i:]
                    cut = seq
                    break
        start: dict[int, int] = {}
        for i, (_, rec) in enumerate(decoded):
            if rec.kind in (KIND_RESET, KIND_DESTROY):
                start[rec.group] = i
        wg = cls(max_record_bytes)
        wg.cut_rewrite = cut
        for i, (seq, rec) in enumerate(decoded):
            s = start.get(rec.group)
            if s is None or i < s:
                if s is None:
                    raise StorageError(
                        f"write-ahead log: group {rec.group} has records from seq {seq} but no RESET"
                    )
                continue
            try:
                wg._apply(rec, seq)
            except RaftError as err:
                raise StorageError(f"write-ahead log: record {seq} of group {rec.group}: {err}") from None
        return wg

    def write(self, wal: Wal, records: list[GroupRecord]) -> None:
        """Check, append (unsynced) and apply `records`, in order (see the module docstring).
        On an error nothing was applied; a `StorageError` from the `Wal` poisons it (reopen)."""
        self._check(records)
        payloads: list[bytes] = []
        counts: list[int] = []
        limit = self.max_record_bytes
        for rec in records:
            ps = encode(rec, limit)
            payloads.extend(ps)
            counts.append(len(ps))
        if not payloads:
            return
        last = wal.append(payloads)
        seq = last - len(payloads) + 1
        for rec, n in zip(records, counts, strict=True):
            if rec.kind == KIND_ENTRIES and n > 1:
                self._apply_split(rec, seq, n)
            else:
                self._apply(rec, seq)
            seq += n

    def needed_seq(self, default: int) -> int:
        """The least sequence number any live group still needs (`default` if there is none)."""
        return min((g.anchor for g in self.groups.values()), default=default)

    def rewrite(self, group: int) -> list[GroupRecord]:
        """Records that restate `group` whole (its anchor moves to where they are written): a
        RESET announcing the ENTRIES payloads that follow it, so that a crash keeping only part
        of them drops the whole rewrite instead of losing entries. Write them in one `write`."""
        g = self.groups[group]
        if not g.ents:
            return [GroupRecord(KIND_RESET, group, base=g.base, hard_state=g.hard_state)]
        ents = GroupRecord(KIND_ENTRIES, group, entries=tuple(g.ents))
        follow = len(encode(ents, self.max_record_bytes))
        return [GroupRecord(KIND_RESET, group, base=g.base, hard_state=g.hard_state, follow=follow), ents]

    # --- internals ------------------------------------------------------------------------------
    def _check(self, records: list[GroupRecord]) -> None:
        """Raise (RaftError / ValueError) if any record of the batch could not be applied after
        the ones before it. Tracks (base index, last index) per group through the batch."""
        shape: dict[int, tuple[int, int] | None] = {}
        for i, rec in enumerate(records):
            g = rec.group
            if g not in shape:
                cur = self.groups.get(g)
                shape[g] = None if cur is None else (cur.base.index, cur.last_index())
            now = shape[g]
            if rec.kind == KIND_RESET:
                if rec.base is None or rec.hard_state is None:
                    raise ValueError("a RESET record needs a base and a hard state")
                if rec.follow:
                    nxt = records[i + 1] if i + 1 < len(records) else None
                    if (
                        nxt is None
                        or nxt.kind != KIND_ENTRIES
                        or nxt.group != g
                        or len(encode(nxt, self.max_record_bytes)) != rec.follow
                    ):
                        raise ValueError(
                            "a RESET with `follow` must be followed by exactly that many ENTRIES payloads"
                        )
                shape[g] = (rec.base.index, rec.base.index)
                continue
            if rec.kind == KIND_DESTROY:
                shape[g] = None
                continue
            if now is None:
                raise RaftError(f"group {g} has no log (a RESET must come first)")
            b, last = now
            if rec.kind == KIND_ENTRIES:
                if any(e.group != g for e in rec.entries):
                    raise ValueError(f"an entries record of group {g} holds another group's entry")
                ents = entries_to_append(list(rec.entries), b, last)
                if ents:
                    shape[g] = (b, ents[-1].index)
            elif rec.kind == KIND_HARD_STATE:
                if rec.hard_state is None:
                    raise ValueError("a HARD_STATE record needs a hard state")
            elif rec.kind == KIND_COMPACT:
                if rec.base is None or rec.base.index == 0:
                    raise ValueError("a COMPACT record needs a base above 0")
                if rec.base.index > last:
                    raise RaftError(f"compact {rec.base.index} beyond last index {last}")
                shape[g] = (max(b, rec.base.index), last)
            else:
                raise ValueError(f"unknown record kind {rec.kind}")

    def _apply(self, rec: GroupRecord, seq: int) -> None:
        kind, gid = rec.kind, rec.group
        if kind == KIND_RESET:
            assert rec.base is not None and rec.hard_state is not None
            self.groups[gid] = GroupLog(gid, rec.base, rec.hard_state, seq)
            return
        if kind == KIND_DESTROY:
            self.groups.pop(gid, None)
            return
        g = self.groups.get(gid)
        if g is None:
            raise RaftError(f"group {gid} has no log")
        if kind == KIND_ENTRIES:
            g._append(list(rec.entries), seq)
        elif kind == KIND_HARD_STATE:
            assert rec.hard_state is not None
            g.hard_state = rec.hard_state
        elif kind == KIND_COMPACT:
            assert rec.base is not None
            g._compact(rec.base)

    def _apply_split(self, rec: GroupRecord, seq: int, pieces: int) -> None:
        """Apply an ENTRIES record that `encode` split into `pieces` payloads exactly as
        recovery will see them: each piece with its own sequence number."""
        for k, p in enumerate(encode(rec, self.max_record_bytes)):
            assert k < pieces
            self._apply(decode(p), seq + k)
