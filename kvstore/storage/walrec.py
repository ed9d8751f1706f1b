"""The write-ahead log's payloads for Raft groups: what one WAL record says about one group.

A `wal.Wal` record is an opaque payload; this module gives it meaning (issue 20, step 1 of wiring
the log in). Every payload is `kind u8 | group u64 | body`, big-endian:

- `KIND_RESET`  body `index u64 | term u64 | hs term u64 | vote u64 | commit u64 | follow u32 |
  conf`: the group's log is replaced wholesale: no entries, base (index, term, conf), that hard
  state (a RESET is self-contained: nothing before it is needed); the next `follow` records are
  ENTRIES of the same group that belong to it (a rewrite), and recovery drops a RESET whose
  `follow` records did not all survive (it was not synced: the records before it still stand)
  — the first record of every group (created empty or by
  bootstrap), a snapshot install, and a "rewrite forward" of a group whose records pin old
  segments. Recovery ignores every record of a group before its last RESET (`walgroups.py`).
- `KIND_ENTRIES` body `first u64 | count u32 | count * (term u64 | type u8 | len u32 | data)`:
  entries `first .. first+count-1`, appended exactly as `MemoryStorage.append` does (entries at or
  below the base are skipped; an append at or below the last index truncates the conflicting
  suffix first).
- `KIND_HARD_STATE` body `term u64 | vote u64 | commit u64`.
- `KIND_COMPACT` body `index u64 | term u64 | conf`: entries up to `index` discarded, the base
  becomes (index, term, conf) — the writer computed term and configuration, replay only installs.
- `KIND_DESTROY` no body: the group is gone (recovery drops everything of it before this record).

`conf` is `layout.encode_conf`. Decoding is TOTAL: anything but a payload `encode_*` could have
produced (unknown kind, short or trailing bytes, an unknown entry type, an index or count that
overflows, a configuration with overlapping voters/learners) raises `WalRecordError` — never
another exception, never a partly-decoded record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvstore.raft.types import ConfState, Entry, EntryType, HardState, SnapshotMeta

from .errors import StorageError
from .layout import decode_conf, encode_conf

KIND_RESET = 1
KIND_ENTRIES = 2
KIND_HARD_STATE = 3
KIND_COMPACT = 4
KIND_DESTROY = 5

_HEAD = struct.Struct(">BQ")
_BASE = struct.Struct(">QQ")
_ENTRIES_HEAD = struct.Struct(">QI")
_ENTRY_HEAD = struct.Struct(">QBI")
_HARD = struct.Struct(">QQQ")
_U32 = struct.Struct(">I")
_U64_MAX = (1 << 64) - 1
_ENTRY_TYPES = {int(t): t for t in EntryType}


class WalRecordError(StorageError):
    """A write-ahead log payload that no `encode_*` of this module produces."""


@dataclass(slots=True, frozen=True)
class GroupRecord:
    """One decoded payload (or one to encode: `encode`). Which fields mean something depends on
    `kind`: `base` for RESET and COMPACT, `entries` for ENTRIES (contiguous, `entries[0].index >=
    1`), `hard_state` for HARD_STATE and RESET; DESTROY has none."""

    kind: int
    group: int
    base: SnapshotMeta | None = None
    entries: tuple[Entry, ...] = ()
    hard_state: HardState | None = None
    follow: int = 0
    """RESET only: how many ENTRIES records right after it belong to it."""


def encode_reset(group: int, base: SnapshotMeta, hs: HardState, follow: int = 0) -> bytes:
    return (
        _HEAD.pack(KIND_RESET, group)
        + _BASE.pack(base.index, base.term)
        + _HARD.pack(hs.term, hs.vote, hs.commit)
        + _U32.pack(follow)
        + encode_conf(base.conf_state)
    )


def encode_compact(group: int, base: SnapshotMeta) -> bytes:
    return _HEAD.pack(KIND_COMPACT, group) + _BASE.pack(base.index, base.term) + encode_conf(base.conf_state)


def encode_hard_state(group: int, hs: HardState) -> bytes:
    return _HEAD.pack(KIND_HARD_STATE, group) + _HARD.pack(hs.term, hs.vote, hs.commit)


def encode_destroy(group: int) -> bytes:
    return _HEAD.pack(KIND_DESTROY, group)


def encode_entries(group: int, entries: list[Entry], max_bytes: int) -> list[bytes]:
    """Payloads holding `entries` (contiguous), each at most `max_bytes` unless a single entry is
    larger (then it is alone in its payload and the WAL's own limit decides). Splitting a batch is
    harmless: each piece appends right after the previous one, so no piece truncates another."""
    out: list[bytes] = []
    i, n = 0, len(entries)
    fixed = _HEAD.size + _ENTRIES_HEAD.size
    while i < n:
        parts: list[bytes] = []
        size = fixed
        j = i
        while j < n:
            e = entries[j]
            rec = _ENTRY_HEAD.pack(e.term, int(e.type), len(e.data))
            if j > i and size + len(rec) + len(e.data) > max_bytes:
                break
            parts.append(rec)
            parts.append(e.data)
            size += len(rec) + len(e.data)
            j += 1
        head = _HEAD.pack(KIND_ENTRIES, group) + _ENTRIES_HEAD.pack(entries[i].index, j - i)
        out.append(head + b"".join(parts))
        i = j
    return out


def encode(rec: GroupRecord, max_bytes: int) -> list[bytes]:
    """The payloads of `rec` (one, except ENTRIES split by `encode_entries`). A record missing the
    field its kind needs raises ValueError."""
    if rec.kind == KIND_ENTRIES:
        return encode_entries(rec.group, list(rec.entries), max_bytes)
    if rec.kind == KIND_DESTROY:
        return [encode_destroy(rec.group)]
    if rec.kind == KIND_HARD_STATE and rec.hard_state is not None:
        return [encode_hard_state(rec.group, rec.hard_state)]
    if rec.kind == KIND_COMPACT and rec.base is not None:
        return [encode_compact(rec.group, rec.base)]
    if rec.kind == KIND_RESET and rec.base is not None and rec.hard_state is not None:
        return [encode_reset(rec.group, rec.base, rec.hard_state, rec.follow)]
    raise ValueError(f"an incomplete or unknown write-ahead log record: {rec}")


def decode(payload: bytes) -> GroupRecord:
    """The record `payload` encodes (total: see the module docstring)."""
    try:
        return _decode(payload)
    except WalRecordError:
        raise
    except (struct.error, ValueError, StorageError) as err:
        raise WalRecordError(f"corrupt write-ahead log record ({len(payload)} bytes): {err}") from None


def _decode(p: bytes) -> GroupRecord:
    kind, group = _HEAD.unpack_from(p)
    pos = _HEAD.size
    if kind in (KIND_RESET, KIND_COMPACT):
        index, term = _BASE.unpack_from(p, pos)
        pos += _BASE.size
        hs = None
        follow = 0
        if kind == KIND_RESET:
            hs = HardState(*_HARD.unpack_from(p, pos))
            (follow,) = _U32.unpack_from(p, pos + _HARD.size)
            pos += _HARD.size + _U32.size
        conf = decode_conf(p, pos)
        pos += 8 + 8 * (len(conf.voters) + len(conf.learners))
        _check_conf(conf, len(conf.voters) + len(conf.learners))
        if kind == KIND_COMPACT and index == 0:
            raise WalRecordError("a compaction record at index 0")
        rec = GroupRecord(kind, group, base=SnapshotMeta(index, term, conf), hard_state=hs, follow=follow)
    elif kind == KIND_HARD_STATE:
        rec = GroupRecord(kind, group, hard_state=HardState(*_HARD.unpack_from(p, pos)))
        pos += _HARD.size
    elif kind == KIND_DESTROY:
        rec = GroupRecord(kind, group)
    elif kind == KIND_ENTRIES:
        first, count = _ENTRIES_HEAD.unpack_from(p, pos)
        pos += _ENTRIES_HEAD.size
        if first == 0 or count == 0 or first + count - 1 > _U64_MAX:
            raise WalRecordError(f"an entries record at {first} with {count} entries")
        if count * _ENTRY_HEAD.size > len(p) - pos:
            raise WalRecordError(f"an entries record claims {count} entries in {len(p)} bytes")
        ents: list[Entry] = []
        for k in range(count):
            term, etype, size = _ENTRY_HEAD.unpack_from(p, pos)
            pos += _ENTRY_HEAD.size
            t = _ENTRY_TYPES.get(etype)
            if t is None:
                raise WalRecordError(f"unknown entry type {etype}")
            if pos + size > len(p):
                raise WalRecordError(f"entry {first + k} runs past the record ({size} bytes)")
            ents.append(Entry(term, first + k, t, p[pos : pos + size], group))
            pos += size
        rec = GroupRecord(kind, group, entries=tuple(ents))
    else:
        raise WalRecordError(f"unknown record kind {kind}")
    if pos != len(p):
        raise WalRecordError(f"{len(p) - pos} trailing bytes after a kind {kind} record")
    return rec


def _check_conf(conf: ConfState, n: int) -> None:
    if len(set(conf.voters) | set(conf.learners)) != n:
        raise WalRecordError(f"a configuration with repeated members: {conf}")
