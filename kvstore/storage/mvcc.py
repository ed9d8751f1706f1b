"""Revisions, per-key metadata and MVCC history of one group. STANDARD LIBRARY ONLY.

`docs/REVISIONS.md` is the design; this module is its deterministic part, run by the apply logic
(`machine.py`) on every replica alike and by the read paths.

Revision layout (a positive int64; `int` here, 63 bits used):

    bit 62 ........ 22 | 21 ..... 12 | 11 ...... 0
        ms since EPOCH |   logical   | group slot
        (41 bits)      |  (10 bits)  |  (12 bits)

The group slot is the group id (groups 0..4095, `MAX_GROUPS`), so revisions of different groups
never collide. The leader proposes an HLC reading (`kvstore.node.hlc`) in the command; the apply
rule (`next_revision`) makes the revision strictly greater than the group's last one and at least
the proposal, in the group's own slot: the same on every replica, whatever the leader's clock did.

Tables (ordered byte maps the view provides, one set per group; `Rows`):

    KEYS     user key                 -> kid:u64 create:u64 mod:u64 version:u64 depth:u64
                                         jump:u64 jump_depth:u64 jump_jump:u64 jump_jump_depth:u64
                                         (a key that has history rows, and its current metadata:
                                         mod = the revision of its newest version; create =
                                         version = 0 when that version is a tombstone; then that
                                         version's links and its jump's, `_links_after`; the
                                         first 32 bytes are the exchange form)
    LOG      revision:u64 kid:u64     -> kind:u8 create:u64 version:u64 prev:u64 jump:u64
             (table T_CHANGES)           depth:u64 jump_depth:u64 key_len:u16 user_key value
                                         (every retained version of every key, in revision
                                         order: a batch of writes appends at the table's end;
                                         watch reads it from a revision onward, compaction walks
                                         it; `LogRow`)
    HIST     kid:u64 revision:u64     -> kind:u8 create_revision:u64 version:u64 value
                                         (a version in the exchange form: data format 2's
                                         history, until `rebuild_log` migrates it; empty since)
    STATE    b""                      -> last:u64 compact:u64 next_kid:u64

A key is identified in history by a group-local id (`kid`) because LMDB keys are at most 511
bytes: user key + revision would not fit for the longest keys. A key's versions form a chain
through `prev` (the revision of its version before, 0: none); `jump` points further back (a
skew-binary jump pointer, Myers 1983: `depth` counts the versions before this one in the chain,
`jump_depth` is the jump target's), so the newest version at or below a revision is found in
O(log n) lookups (`_version_at`); a write sets them from its KEYS row, reading a LOG row only
for half the versions of a long chain. Any older version of
the key is a correct jump target; the rule only bounds the walk. Invariants:
- every key with a KEYS row has at least one LOG row; its newest, at (mod, kid), is its current
  state (a PUT row whose value is also in `data`, or a DELETE tombstone when the key is absent);
- the versions above the compact revision C, and those at C too if the revision state is `kept`
  (a compaction under the keep rule left them for a watch from C; `compact`), are the changes a
  watch replays; readers never look below C (reads there raise `Compacted`);
- after compaction at C, each key keeps only its newest version at or below C (none if that is a
  tombstone below C, or at C under the first rule; under the keep rule a tombstone at exactly C
  stays until the next compaction) and every version above C. So a `prev` that is missing names
  a tombstone compacted away (the key was absent there), and nothing of the key is older;
- a key in `data` without a KEYS row is a LEGACY key, written before revisions existed: it reads
  as create_revision = mod_revision = version = `LEGACY_REVISION` (1); its first write under
  revisions first records that version as a LOG row at revision 1. This is the migration: lazy
  and deterministic (every replica has the same data at the same entry), with no format bump.

Snapshots and range moves carry versions in the exchange form (KEYS rows of 32 bytes, HIST rows, and CHANGES rows
`revision:u64 kid:u64 -> user key` for the changes above C, which data format 2 kept as a table
of its own): the same records any release writes and reads (`snapshot_keys`,
`snapshot_records` writes them, `LogBuilder` reads them), so a snapshot crosses a rolling
upgrade either way.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

EPOCH_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z in Unix milliseconds: physical time 0 of a revision."""
SLOT_BITS = 12
LOGICAL_BITS = 10
STEP = 1 << SLOT_BITS
"""Revisions of one group differ by multiples of STEP."""
MAX_GROUPS = STEP
"""Groups 0 .. MAX_GROUPS - 1 have a slot of their own."""
PHYSICAL_SHIFT = SLOT_BITS + LOGICAL_BITS
REVISION_MAX = (1 << 63) - 1
PROPOSAL_MAX = REVISION_MAX - (1 << 40)
"""A proposed revision above this is refused at apply (a forged or absurd far-future value must
not push a group to the end of the int64 range, where it could never write again)."""
LEGACY_REVISION = 1
"""The revision of every version written before revisions existed (below every real one)."""

T_KEYS = 0
T_HIST = 1
T_CHANGES = 2
T_STATE = 3
T_TXN = 4
"""Cross-group transactions' intents, records and bookkeeping (`xtxn.py` describes its rows)."""
T_INTENTS = 5
"""Cross-group transactions' intents: user key -> `xtxn.Intent`."""
T_LEASES = 6
"""Leases (`leases.py` describes its rows); attachments are the rows `K` + hash (`has_attachments`)."""

KIND_PUT = 1
KIND_DELETE = 2

log = logging.getLogger("kvstore.mvcc")
_U64 = struct.Struct(">Q")
_PAIR = struct.Struct(">QQ")
_ROW = struct.Struct(">BQQ")
ROW_HEADER_BYTES = _ROW.size
"""Bytes a history row adds to its value (`encode_row`)."""
_STATE = struct.Struct(">QQQ")
_KEYROW = struct.Struct(">QQQQ")
"""A KEYS row in the exchange form (snapshots, restores; data format 2's rows)."""
_KEYROW3 = struct.Struct(">QQQQQQQQQ")
"""A KEYS row: the exchange form, then the current version's links (`_links_after`)."""
_KEYROW3_PACK = _KEYROW3.pack
_KEYROW3_UNPACK = _KEYROW3.unpack
_KEYROW3_SIZE = _KEYROW3.size
_MAX_KEY = _U64.pack((1 << 64) - 1)
# Bound methods and sizes of the hot path (write_version), looked up once.
_PAIR_PACK = _PAIR.pack
_ROW_PACK = _ROW.pack
_STATE_PACK = _STATE.pack
_STATE_UNPACK = _STATE.unpack
_STATE_SIZE = _STATE.size
_KEPT = b"\x01"
"""The revision state row's trailing byte when the rows at the compact revision were kept."""
_KEYROW_PACK = _KEYROW.pack
_KEYROW_UNPACK = _KEYROW.unpack
_KEYROW_SIZE = _KEYROW.size
_TOMBSTONE = _ROW.pack(KIND_DELETE, 0, 0)
_LOG = struct.Struct(">BQQQQQQH")
"""A LOG row's header: kind, create, version, prev, jump, depth, jump_depth, key_len."""
_LOG_PACK = _LOG.pack
_LOG_UNPACK_FROM = _LOG.unpack_from
_LOG_SIZE = _LOG.size
_LINKS_PACK = struct.Struct(">QQQQH").pack
"""A LOG row's links and key length: its header after the HIST row's head (`_ROW`)."""
_U16 = struct.Struct(">H")
_PREV_FROM = struct.Struct(">Q").unpack_from
_ROW_SIZE = _ROW.size
_PAIR_UNPACK = _PAIR.unpack
_MAX_KEY_LEN = (1 << 16) - 1


@dataclass(slots=True)
class LogRow:
    """A decoded LOG row (`decode_log_row`): one version of a key and its chain links."""

    kind: int
    create: int
    version: int
    prev: int
    jump: int
    depth: int
    jump_depth: int
    key: bytes
    value: bytes

    def at(self, rev: int) -> Version:
        """This version as read at its revision `rev`."""
        if self.kind == KIND_PUT:
            return Version(self.value, KeyMeta(self.create, rev, self.version))
        return Version(None, KeyMeta(0, rev, 0))

    def exchange(self) -> bytes:
        """The version in the exchange form (a HIST row: snapshots, range moves)."""
        if self.kind == KIND_PUT:
            return _ROW_PACK(KIND_PUT, self.create, self.version) + self.value
        return _TOMBSTONE


def decode_log_row(rev: int, raw: bytes) -> LogRow:
    """Decode the LOG row at revision `rev`. Total: ValueError for anything malformed (a short
    row, an unknown kind, a tombstone with a value, links that do not point below `rev`)."""
    if len(raw) < _LOG_SIZE:
        raise ValueError(f"log row of {len(raw)} bytes")
    kind, create, version, prev, jump, depth, jump_depth, klen = _LOG_UNPACK_FROM(raw)
    end = _LOG_SIZE + klen
    if end > len(raw):
        raise ValueError(f"log row of {len(raw)} bytes with a key of {klen}")
    if kind == KIND_DELETE:
        if end != len(raw) or create or version:
            raise ValueError("log row: a tombstone with a value or metadata")
    elif kind != KIND_PUT:
        raise ValueError(f"log row of kind {kind}")
    if prev >= rev or jump >= rev or (jump and not prev) or (prev and not depth):
        raise ValueError(f"log row at revision {rev} links to {prev} / {jump} (depth {depth})")
    return LogRow(kind, create, version, prev, jump, depth, jump_depth, bytes(raw[_LOG_SIZE:end]),
                  bytes(raw[end:]))


def log_row_key(raw: bytes) -> bytes:
    """The user key of a LOG row (ValueError if it is too short to hold one)."""
    if len(raw) < _LOG_SIZE:
        raise ValueError(f"log row of {len(raw)} bytes")
    (klen,) = _U16.unpack_from(raw, _LOG_SIZE - 2)
    if _LOG_SIZE + klen > len(raw):
        raise ValueError(f"log row of {len(raw)} bytes with a key of {klen}")
    return bytes(raw[_LOG_SIZE:_LOG_SIZE + klen])


def _links_after(
    rows: Rows, kid: int, prev: int, pd: int, pj: int, pjd: int, pjj: int, pjjd: int
) -> tuple[int, int, int, int, int]:
    """The links of a new version of key `kid` whose version before is at `prev` (0: none), given
    that version's (depth, jump, jump_depth) and its jump's (jump, jump_depth), as its KEYS row
    keeps them: (depth, jump, jump_depth) of the new version and its jump's (jump, jump_depth),
    for the new KEYS row. Myers' skew-binary rule: jump to the jump's jump if prev..jump and
    jump..jump's jump span as many versions, else to prev. Only the first case reads a row (the
    jump target's, for its own jump: half the writes); a missing one (compacted below C) leaves
    it 0, so the next write jumps to its prev: any older version is a correct jump target."""
    if not prev:
        return 0, 0, 0, 0, 0
    if pj and pjj and pd - pjd == pjd - pjjd:
        raw = rows.get(T_CHANGES, _PAIR_PACK(pjj, kid))
        if raw is None or len(raw) < _LOG_SIZE:
            return pd + 1, pjj, pjjd, 0, 0
        _, _, _, _, jj, _, jjd, _ = _LOG_UNPACK_FROM(raw)
        return pd + 1, pjj, pjjd, jj, jjd
    return pd + 1, prev, pd, pj, pjd


class RevisionError(ValueError):
    """A revision that cannot be used (bad proposal, beyond the int64 range)."""


class Compacted(Exception):
    """A read below the group's compact revision: its history is gone."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted: the compact revision is {compact_revision}")
        self.compact_revision = compact_revision


def make_revision(physical_ms: int, logical: int, slot: int) -> int:
    """The revision of an HLC reading (ms since the Unix epoch, logical) in `slot`."""
    ms = max(0, physical_ms - EPOCH_MS)
    return (((ms << LOGICAL_BITS) + logical) << SLOT_BITS) | slot


def revision_ms(rev: int) -> int:
    """The Unix milliseconds a revision's physical part says (its HLC wall time)."""
    return (rev >> PHYSICAL_SHIFT) + EPOCH_MS


def slot_of(group: int) -> int:
    return group % MAX_GROUPS


def check_proposal(proposed: int) -> int:
    """`proposed` if it may be a write's proposed revision (0..PROPOSAL_MAX), else RevisionError
    (the apply rule's refusal of an absurd proposal: `next_revision`, `write_version`, and a
    command that writes only a revision-based time, such as a lease's tombstone)."""
    if proposed > PROPOSAL_MAX or proposed < 0:
        raise RevisionError(f"proposed revision {proposed} is out of range")
    return proposed


def next_revision(last: int, proposed: int, group: int) -> int:
    """The apply rule: the smallest revision in `group`'s slot that is > `last` and >= `proposed`.

    Strictly increasing in apply order, unique across groups (distinct slots), at least the
    proposal (so at least every revision the client and the leader had seen, plus one), and
    deterministic. Raises RevisionError if the proposal is absurd (above PROPOSAL_MAX) or the
    result would leave the int64 range."""
    check_proposal(proposed)
    c = max(last + 1, proposed)
    slot = slot_of(group)
    rev = ((c - slot + STEP - 1) >> SLOT_BITS << SLOT_BITS) + slot
    if rev > REVISION_MAX:
        raise RevisionError(f"group {group} has run out of revisions (last {last})")
    return rev


@dataclass(slots=True)
class RevState:
    """(A value: never mutated; not frozen only because frozen dataclasses cost 5x to build on
    the apply path.) A group's revision state: the last revision it assigned (or received with moved history),
    its compact revision, and the next key id."""

    last: int = 0
    compact: int = 0
    next_kid: int = 1
    kept: bool = False
    """The change-log rows (and tombstones) at exactly `compact` were kept (a compaction under
    the keep rule, `compact(keep=True)`, an INSTALL from such a source): a watch from
    `compact` is served. False after a compaction under the first rule (everything at `compact`
    consumed, as binaries before feature level `LEVEL_COMPACT_KEEP` compact), and when nothing
    was compacted. Invariant: CHANGES holds rows at `compact` only if `kept`."""

    def encode(self) -> bytes:
        """24 bytes (last, compact, next_kid) when not `kept`: exactly what binaries before the
        flag write and read; 25 with a trailing 1 when `kept` (only written once the cluster is at
        the keep rule's level, so no older binary meets it)."""
        raw = _STATE.pack(self.last, self.compact, self.next_kid)
        return raw + _KEPT if self.kept else raw

    @staticmethod
    def decode(raw: bytes) -> RevState:
        """Total: ValueError for anything but the two canonical forms `encode` writes."""
        n = len(raw)
        if n == _STATE.size:
            return RevState(*_STATE.unpack(raw))
        if n == _STATE.size + 1 and raw[-1:] == _KEPT:
            last, compact, next_kid = _STATE.unpack_from(raw)
            return RevState(last, compact, next_kid, True)
        if n == _STATE.size + 1:
            raise ValueError(f"revision state row with an unknown flag byte {raw[-1]:#x}")
        raise ValueError(f"revision state row of {n} bytes (expected {_STATE.size} or {_STATE.size + 1})")


@dataclass(slots=True)
class KeyMeta:
    """A key's metadata at some revision (etcd's meanings): the revision that created it (since it
    was last absent), the revision of its last change, and how many changes since its creation."""

    create_revision: int
    mod_revision: int
    version: int


LEGACY_META = KeyMeta(LEGACY_REVISION, LEGACY_REVISION, 1)


@dataclass(slots=True)
class Version:
    """One version of a key: its value (None: deleted) and metadata (mod_revision: the change)."""

    value: bytes | None
    meta: KeyMeta


def encode_row(kind: int, create: int, version: int, value: bytes) -> bytes:
    return _ROW.pack(kind, create, version) + value


def decode_row(rev: int, raw: bytes) -> Version:
    """Decode a HIST row (at revision `rev`); ValueError for anything malformed."""
    if len(raw) < _ROW.size:
        raise ValueError(f"history row of {len(raw)} bytes")
    kind, create, version = _ROW.unpack_from(raw)
    if kind == KIND_PUT:
        return Version(bytes(raw[_ROW.size :]), KeyMeta(create, rev, version))
    if kind == KIND_DELETE and len(raw) == _ROW.size:
        return Version(None, KeyMeta(0, rev, 0))
    raise ValueError(f"history row of kind {kind} and {len(raw)} bytes")


class Rows(Protocol):
    """Ordered byte maps, one per table, of one group (inside the apply's transaction, or a read
    transaction: readers use only `get`, `last_le` and `iter`)."""

    def get(self, t: int, k: bytes) -> bytes | None: ...

    def put(self, t: int, k: bytes, v: bytes) -> None: ...

    def record(self, key: bytes, rev_kid: bytes, row: bytes, key_row: bytes | None) -> None:
        """One version of `key`, in one call (the write path): LOG[rev_kid] = row and, unless
        key_row is None, KEYS[key] = key_row. The same as two `put`s."""
        ...

    def add_log(self, rev_kid: bytes, row: bytes) -> bool:
        """LOG[rev_kid] = row unless a row is there already: then nothing is written and False
        returned (a builder's check that no two versions share a (revision, key id), in the same
        lookup as the write)."""
        ...

    def delete(self, t: int, k: bytes) -> None: ...

    def clear(self, t: int) -> None:
        """Delete every row of table `t` (a rebuild's staging rows: `rebuild_log`)."""
        ...

    def has_locks(self) -> bool:
        """Whether the group holds any cross-group intent (`T_INTENTS`), range lock (`T_TXN` rows
        `l...`), lease lock (`T_TXN` rows `e...`, a lease deletion's, possibly with no intent) or attach lock (`a...`):
        when it holds none, no write can be locked (the hot path skips the check)."""
        ...

    def has_attachments(self) -> bool:
        """Whether any key of the group is attached to a lease (`T_LEASES` rows `K...`): when
        none is, a write has nothing to detach (the hot path skips the lookup)."""
        ...

    def has_tombstones(self) -> bool:
        """Whether the group keeps any lease tombstone (`T_LEASES` age rows `x...`): when it keeps
        none, a lease command has none to forget (`leases.gc` skips its walk)."""
        ...

    def last_le(self, t: int, lo: bytes, k: bytes) -> tuple[bytes, bytes] | None:
        """The row with the greatest key in [lo, k], if any."""
        ...

    def iter(self, t: int, lo: bytes, hi: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """Rows with lo <= key < hi (hi None: to the end), ascending. The caller may change
        the table while iterating only at rows it has already passed."""
        ...

    def keys_back(self, t: int, lo: bytes, hi: bytes | None = None) -> Iterator[bytes]:
        """The keys of the rows with lo <= key < hi (hi None: to the group's last row),
        descending. Read only: the caller does not change the table while iterating."""
        ...


def expired(rows: Rows, t: int, tag: bytes, key_len: int, limit: int, what: str) -> list[bytes]:
    """The keys of at most `limit` rows of the expiry index `tag` in table `t` (row keys of
    `key_len` bytes: `tag` expiry:u64 ...) whose expiry is below the group's last revision, oldest
    first: what one applied command forgets (the cross-group transactions' `g` rows, the lease
    tombstones' `x` rows). A row of another length (never there: snapshots are checked) is
    skipped, not the end of the walk. Deterministic: a function of the rows."""
    last = rev_state(rows).last
    out: list[bytes] = []
    for k, _ in rows.iter(t, tag, bytes((tag[0] + 1,))):
        k = bytes(k)
        if len(k) != key_len:
            log.warning("%s GC: skipped a malformed row of %d bytes", what, len(k))
            continue
        if len(out) >= limit or _U64.unpack_from(k, 1)[0] >= last:
            break
        out.append(k)
    return out


def rev_state(rows: Rows) -> RevState:
    raw = rows.get(T_STATE, b"")
    if raw is None:
        return RevState()
    try:
        return RevState.decode(bytes(raw))
    except ValueError as err:
        raise RevisionError(f"corrupt revision state: {err}") from None


def _version_at(rows: Rows, kid: int, top: int, rev: int) -> tuple[int, Version] | None:
    """The newest version of key `kid` at or below `rev`, walking back from its version at `top`
    (its newest): by `jump` while the jump target is still above `rev`, else by `prev`. Every
    version above `rev` >= C exists (compaction removes none), so the walk meets no hole above
    `rev`; a missing row at or below it is a compacted tombstone: absent. ValueError for a
    corrupt row."""
    r = top
    while True:
        raw = rows.get(T_CHANGES, _PAIR_PACK(r, kid))
        if raw is None:
            return None
        lr = decode_log_row(r, bytes(raw))
        if r <= rev:
            return r, lr.at(r)
        if lr.jump > rev:
            r = lr.jump
        elif lr.prev:
            r = lr.prev
        else:
            return None


def _key_row(rows: Rows, key: bytes) -> tuple[int, KeyMeta] | None:
    """(kid, current metadata) of a key with history; ValueError for a corrupt row."""
    raw = rows.get(T_KEYS, key)
    if raw is None:
        return None
    if len(raw) != _KEYROW3_SIZE:
        raise ValueError(f"key row of {len(raw)} bytes (expected {_KEYROW3_SIZE})")
    kid, create, mod, version = _KEYROW.unpack_from(bytes(raw))
    return kid, KeyMeta(create, mod, version)


def encode_key_row(kid: int, meta: KeyMeta) -> bytes:
    """A KEYS row in the exchange form: the key's id and current metadata (for writers of whole
    tables: restore; the receiver's `rebuild_log` adds the links)."""
    return _KEYROW_PACK(kid, meta.create_revision, meta.mod_revision, meta.version)


def hist_key(kid: int, rev: int) -> bytes:
    """The HIST key of version `rev` of key `kid` (and, swapped, a CHANGES key)."""
    return _PAIR_PACK(kid, rev)


def kid_of(rows: Rows, key: bytes) -> int | None:
    row = _key_row(rows, key)
    return None if row is None else row[0]


def version_at(rows: Rows, key: bytes, rev: int, current: bytes | None) -> Version | None:
    """The key's version at revision `rev` (None: absent then). `current` is its value in `data`
    (used for a LEGACY key, and for the current version: rev at or above its mod_revision). The
    caller checks `rev` against the compact revision."""
    row = _key_row(rows, key)
    if row is None:
        return Version(current, LEGACY_META) if current is not None and rev >= LEGACY_REVISION else None
    kid, meta = row
    if rev >= meta.mod_revision:  # the current version: no history lookup
        return None if current is None or not meta.version else Version(current, meta)
    got = _version_at(rows, kid, meta.mod_revision, rev)
    if got is None or got[1].value is None:
        return None
    return got[1]


def current_meta(rows: Rows, key: bytes, current: bytes | None) -> KeyMeta | None:
    """The metadata of the key's current version (None: absent)."""
    if current is None:
        return None
    v = version_at(rows, key, REVISION_MAX, current)
    return None if v is None else v.meta


def write_version(
    rows: Rows,
    group: int,
    key: bytes,
    value: bytes | None,
    prev: bytes | None,
    proposed: int,
    read_prev: Callable[[bytes], bytes | None] | None = None,
    exact: bool = False,
    commit: bool = False,
) -> int:
    """The apply path of one write, in one call (the hot path: no intermediate objects): assign
    the revision (`next_revision` from the group's state), record `key`'s new version (`value`;
    None: a delete, a tombstone) after `prev` (its value before, None = absent; present for a
    delete) in history, the changes and its key row (`Rows.record`: one call for the three rows),
    and store the new state. Returns the revision. Raises RevisionError before changing anything.
    A LEGACY key's old version is recorded at revision 1 first; a put after absence starts at
    version 1, else version + 1.

    `read_prev` (a PUT, which does not need the key's value itself): `prev` is not known and is
    read with it only if the key has no key row (the only case that needs it: a LEGACY key's
    first write); a key with a key row costs no read of its value.

    `exact` (a transaction's writes, which share one revision): the write's revision is
    `proposed` itself, which must be in the group's slot and >= the group's last revision (the
    caller took it from `next_revision`; its first write raises last to it, the others find last
    equal to it). The caller writes each key at most once per revision.

    `commit` (a cross-group transaction's COMMIT, `xtxn_apply`): the revision is `proposed`
    itself, above the group's compact revision, possibly in another group's slot and below the
    group's last revision (it is >= the revision the group reserved for the transaction while
    the key's intent held every other write of it back, so it is above the key's own versions);
    last := max(last, proposed)."""
    raw = rows.get(T_STATE, b"")
    kept = b""
    if raw is None:
        last, compact, next_kid = 0, 0, 1
    elif len(raw) == _STATE_SIZE:
        last, compact, next_kid = _STATE_UNPACK(raw)
    elif len(raw) == _STATE_SIZE + 1 and bytes(raw[-1:]) == _KEPT:
        last, compact, next_kid = _STATE_UNPACK(bytes(raw[:_STATE_SIZE]))
        kept = _KEPT
    else:
        raise RevisionError(f"corrupt revision state: a row of {len(raw)} bytes")
    if commit:
        if not compact < proposed <= REVISION_MAX:
            raise RevisionError(f"commit revision {proposed} of group {group} is at or below its compact revision")
        rev = proposed
    elif exact:
        if not last <= proposed <= REVISION_MAX or proposed % STEP != group % MAX_GROUPS:
            raise RevisionError(f"revision {proposed} is not a next revision of group {group} (last {last})")
        rev = proposed
    # next_revision(last, proposed, group), inlined (the hot path; test_mvcc checks they agree).
    elif proposed > PROPOSAL_MAX or proposed < 0:
        raise RevisionError(f"proposed revision {proposed} is out of range")
    else:
        c = last + 1 if last >= proposed else proposed
        slot = group % MAX_GROUPS
        rev = ((c - slot + STEP - 1) >> SLOT_BITS << SLOT_BITS) + slot
        if rev > REVISION_MAX:
            raise RevisionError(f"group {group} has run out of revisions (last {last})")
    krow = rows.get(T_KEYS, key)
    if krow is None:  # the key's first write under revisions
        if read_prev is not None:
            prev = read_prev(key)
        kid, next_kid = next_kid, next_kid + 1
        pd = pj = pjd = pjj = pjjd = 0
        if prev is not None:
            create, version, mod = LEGACY_REVISION, 1, LEGACY_REVISION
            rows.record(
                key, _PAIR_PACK(LEGACY_REVISION, kid),
                _LOG_PACK(KIND_PUT, LEGACY_REVISION, 1, 0, 0, 0, 0, len(key)) + key + prev, None,
            )
        else:
            create = version = mod = 0
    elif len(krow) == _KEYROW3_SIZE:
        kid, create, mod, version, pd, pj, pjd, pjj, pjjd = _KEYROW3_UNPACK(krow)
    else:
        raise RevisionError(f"corrupt key row of {len(krow)} bytes")
    if mod:
        depth, jump, jdepth, jj, jjd = _links_after(rows, kid, mod, pd, pj, pjd, pjj, pjjd)
    else:
        depth = jump = jdepth = jj = jjd = 0
    if value is None:
        row = _LOG_PACK(KIND_DELETE, 0, 0, mod, jump, depth, jdepth, len(key)) + key
        create = version = 0
    else:
        if version:
            version += 1
        else:
            create, version = rev, 1
        row = _LOG_PACK(KIND_PUT, create, version, mod, jump, depth, jdepth, len(key)) + key + value
    rows.record(key, _PAIR_PACK(rev, kid), row, _KEYROW3_PACK(kid, create, rev, version, depth, jump, jdepth, jj, jjd))
    rows.put(T_STATE, b"", _STATE_PACK(rev if rev > last else last, compact, next_kid) + kept)
    return rev


def compact(rows: Rows, st: RevState, rev: int, keep: bool) -> RevState:
    """Compact history at `rev` = C (clamped to the group's last revision; never backwards): walk
    the changes from the old compact revision (itself included only if its rows were `kept`)
    through C (C may be the old compact revision only under the first rule with its rows kept:
    they are consumed then; otherwise a C at or below it changes nothing); each one supersedes every older version of its key, and is consumed: its
    change-log row goes, and so does its version if it is a tombstone (and the key's id once it
    has no rows left). Work is proportional to the changes compacted.

    Two rules, chosen by the COMPACT command (never by the binary, so every replica of a group
    applies one command identically during a rolling upgrade): with `keep` (the keep rule,
    feature level `LEVEL_COMPACT_KEEP`) the changes at exactly C stay whole (version and
    change-log row, tombstones too) and the result is `kept`: a watch from C delivers them, as
    etcd's watch from its compact revision does (without prev_kv: the versions before C are
    gone); the next compaction walks from C again and consumes them. Without it (the first
    rule, what binaries before that level do) the changes at C are consumed too and the result
    is not `kept`: a watch from C is refused."""
    c = min(rev, st.last)
    if c < st.compact or (c == st.compact and (keep or not st.kept)):
        return st  # at the compact revision itself only the first rule on kept rows does anything
    start = st.compact if st.kept else st.compact + 1
    lo = _PAIR.pack(start, 0) if st.compact else b""
    hi = _PAIR.pack(c + 1, 0) if c < REVISION_MAX else None
    done: list[tuple[bytes, int, int, int, int, bytes]] = []
    for k, v in rows.iter(T_CHANGES, lo, hi):
        r, kid = _PAIR.unpack(bytes(k))
        lr = decode_log_row(r, bytes(v))
        done.append((bytes(k), r, kid, lr.prev, lr.kind, lr.key))
    for lk, r, kid, prev, kind, key in done:
        if prev:  # superseded: the key's newest version at or below C is at r now
            rows.delete(T_CHANGES, _PAIR.pack(prev, kid))
        if kind != KIND_DELETE or (keep and r == c):
            continue
        rows.delete(T_CHANGES, lk)  # a tombstone at or below C reads as absent without its row
        krow = _key_row(rows, key)
        if krow is not None and krow[0] == kid and krow[1].mod_revision == r:
            rows.delete(T_KEYS, key)  # its newest version: the key has no rows left
    return RevState(st.last, c, st.next_kid, keep)


def _chain(rows: Rows, kid: int, top: int) -> list[tuple[int, LogRow]]:
    """Every retained version of key `kid` from its newest (at `top`) back, by `prev` (a missing
    row ends it: nothing older is left, see the invariants)."""
    out: list[tuple[int, LogRow]] = []
    r = top
    while r:
        raw = rows.get(T_CHANGES, _PAIR.pack(r, kid))
        if raw is None:
            break
        lr = decode_log_row(r, bytes(raw))
        out.append((r, lr))
        r = lr.prev
    return out


def forget_key(rows: Rows, key: bytes) -> None:
    """Drop every history row of `key` (its range moved away)."""
    row = _key_row(rows, key)
    if row is None:
        return
    kid, meta = row
    for r, _ in _chain(rows, kid, meta.mod_revision):
        rows.delete(T_CHANGES, _PAIR.pack(r, kid))
    rows.delete(T_KEYS, key)


def key_history(rows: Rows, key: bytes) -> list[tuple[int, bytes]]:
    """Every retained (revision, version in the exchange form) of `key`, ascending (moves carry
    them)."""
    row = _key_row(rows, key)
    if row is None:
        return []
    kid, meta = row
    return [(r, lr.exchange()) for r, lr in reversed(_chain(rows, kid, meta.mod_revision))]


def install_history(rows: Rows, st: RevState, key: bytes, versions: list[tuple[int, bytes]]) -> RevState:
    """Install a moved key's history (from another group; ascending revisions, each row checked:
    `decode_versions`): its rows under a new id here, built as a snapshot's are (`LogBuilder`),
    and the group's last revision raised past them so later writes of the key come after its
    history. Of the versions at or below this group's compact revision only the newest is kept
    (the invariant after compaction: the others are never read here)."""
    forget_key(rows, key)
    if not versions:
        return st
    kid = st.next_kid
    last, newest = versions[-1]
    b = LogBuilder(rows, st.compact)
    b.key(key, encode_key_row(kid, decode_row(last, newest).meta))  # ValueError: the caller's refusal
    for r, row in versions:
        b.hist(hist_key(kid, r), row)
    b.finish()
    return RevState(max(st.last, last), st.compact, kid + 1, st.kept)


INLINE_VERSIONS = 4096
INLINE_BYTES = 1 << 20
"""A key's versions go out right after its KEYS row (`snapshot_records`) if they are at most
this many and this many bytes; a longer history goes after every key, in revision order."""


def snapshot_records(rows: Rows, st: RevState, base: int = 0) -> Iterator[tuple[int, bytes, bytes]]:
    """The group's history in the exchange form, as (table, key, value) with table T_KEYS (the
    32-byte KEYS row), T_HIST (`kid:u64 rev:u64` -> HIST row) or T_CHANGES (`rev:u64 kid:u64` ->
    user key, for the versions above the compact revision, and at it if `kept`: data format 2's
    change rows, which releases before format 3 read): per key in key order its KEYS row, then
    its versions in ascending revisions with their change rows, so a receiver builds its LOG
    holding one key at a time (`LogBuilder`). A key with more than `INLINE_VERSIONS` versions or
    `INLINE_BYTES` of them sends its versions after every key, in revision order (memory here
    stays bounded; the receiver stages them). `base` is added to each table number (a snapshot's
    record tags: the caller delegates with `yield from`, no generator step per record of its
    own). Bytes only: a LOG row is the HIST row's 17-byte head, the links, the key, then the HIST
    row's value; the receiver checks every row."""
    lo = st.compact if st.kept else st.compact + 1
    t_keys, t_hist, t_changes = base + T_KEYS, base + T_HIST, base + T_CHANGES
    later: set[int] = set()
    get = rows.get
    u64 = _U64.pack
    for k, v in rows.iter(T_KEYS, b"", None):
        v = v[:_KEYROW_SIZE]
        kid, _, mod, _ = _KEYROW_UNPACK(v)
        yield t_keys, k, v
        hk = u64(kid)
        raw = get(T_CHANGES, _PAIR_PACK(mod, kid)) if mod else None
        if raw is None:
            continue
        key = log_row_key(raw)  # checked: a truncated row on disk is a ValueError, not a struct.error
        r = _PREV_FROM(raw, _ROW_SIZE)[0]
        if not r:  # one version (most keys): no chain to gather
            rk = u64(mod)
            yield t_hist, hk + rk, raw[:_ROW_SIZE] + raw[_LOG_SIZE + len(key):]
            if mod >= lo:
                yield t_changes, rk + hk, key
            continue
        chain: list[tuple[int, bytes]] = [(mod, raw)]
        size = len(raw)
        end = _LOG_SIZE + len(key)
        while r and len(chain) < INLINE_VERSIONS and size < INLINE_BYTES:
            raw = get(T_CHANGES, _PAIR_PACK(r, kid))
            if raw is None:
                break
            if len(raw) < end or _U16.unpack_from(raw, _LOG_SIZE - 2)[0] != end - _LOG_SIZE:
                raise ValueError(f"log row at revision {r} of key id {kid} does not hold the key's {end - _LOG_SIZE} bytes")
            chain.append((r, raw))
            size += len(raw)
            r = _PREV_FROM(raw, _ROW_SIZE)[0]
        if r and (len(chain) >= INLINE_VERSIONS or size >= INLINE_BYTES):
            later.add(kid)
            continue
        for r, raw in reversed(chain):  # every version holds the key (each row checked above)
            rk = u64(r)
            yield t_hist, hk + rk, raw[:_ROW_SIZE] + raw[end:]
            if r >= lo:
                yield t_changes, rk + hk, key
    if later:
        for k, raw in rows.iter(T_CHANGES, b"", None):
            if _U64.unpack_from(k, 8)[0] in later:
                key = log_row_key(raw)  # checked: a truncated row on disk is a ValueError
                yield t_hist, k[8:] + k[:8], raw[:_ROW_SIZE] + raw[_LOG_SIZE + len(key):]
                if _U64.unpack_from(k)[0] >= lo:
                    yield t_changes, k, key


def check_change_row(k: bytes, v: bytes) -> None:
    """A snapshot's CHANGES row (derived again from its HIST rows, so only checked for shape)."""
    if len(k) != _PAIR.size or not v or len(v) > _MAX_KEY_LEN:
        raise ValueError(f"change row with a key of {len(k)} bytes and a value of {len(v)}")


class LogBuilder:
    """Builds a group's LOG rows and linked KEYS rows from records in the exchange form, streamed,
    holding one key at a time: a KEYS row (`key`), then the HIST rows of its key id in ascending
    revisions (`hist`) become its LOG rows at once and, when the next key comes, its KEYS row
    (what this release's snapshots send, `snapshot_records`, and a restore). Anything else (a
    KEYS row with no versions right after it, a HIST row of another key id: a snapshot of data
    format 2, which sends all KEYS rows, then all HIST rows by key id; a key whose long history
    comes last) is staged in the KEYS and HIST tables, and `finish` builds those keys from them
    (`rebuild_log`). Memory: one key's state, whatever the group's size.

    With `compact` known, a key's versions below its newest at or below it are dropped (what
    compaction keeps; format 2 kept those of a key moved in). Every row is checked: ValueError
    (the caller's refusal) for a malformed row, a KEYS row not in the exchange form, revisions
    out of order, two versions at one (revision, key id), or a key whose newest version is not
    the one its KEYS row names; a HIST row of a key id no KEYS row names is dropped."""

    __slots__ = ("_depth", "_head", "_jdepth", "_jj", "_jjd", "_jump", "_key", "_kid", "_mod", "_prev", "_row",
                 "_rows", "_staged", "compact", "versions")

    def __init__(self, rows: Rows, compact: int | None = None) -> None:
        self._rows = rows
        self._staged = False
        self.compact = compact
        self.versions = 0
        # The key being built (`_key` None: none): its id, the revision its KEYS row names, that
        # row (exchange form), and its newest version written so far (revision, 0 for none yet;
        # links; its jump's links; the HIST row's 17-byte head). In slots, not an object per key.
        self._key: bytes | None = None
        self._kid = self._mod = self._prev = self._depth = self._jump = self._jdepth = self._jj = self._jjd = 0
        self._row = self._head = b""

    def key(self, k: bytes, v: bytes) -> None:
        if len(v) != _KEYROW_SIZE or len(k) > _MAX_KEY_LEN:
            raise ValueError(f"key row of {len(v)} bytes, not in the exchange form ({_KEYROW_SIZE})")
        if self._key is not None:
            self._end_key()
        self._kid, _, self._mod, _ = _KEYROW_UNPACK(v)
        self._key, self._row, self._prev = bytes(k), bytes(v), 0

    def hist(self, hk: bytes, row: bytes) -> None:
        if len(hk) != _PAIR.size:
            raise ValueError(f"history row key of {len(hk)} bytes")
        kid, r = _PAIR_UNPACK(hk)
        if not 0 < r <= REVISION_MAX:
            raise ValueError(f"history row of key id {kid} at revision {r}")
        n = len(row)
        kind = row[0] if n else None
        if n >= _ROW_SIZE and kind == KIND_PUT:
            head = bytes(row[:_ROW_SIZE])
        elif n == _ROW_SIZE and kind == KIND_DELETE:
            head = _TOMBSTONE  # a tombstone's metadata reads as 0 whatever the row says (`decode_row`)
        else:
            raise ValueError(f"history row of kind {kind} and {n} bytes")
        key = self._key
        rows = self._rows
        if key is None or self._kid != kid:
            rows.put(T_HIST, hk, row)
            self._staged = True
            return
        prev = self._prev
        if r <= prev:
            raise ValueError(f"history row of key id {kid} at revision {r} after {prev}")
        c = self.compact
        if c is not None and prev and r <= c:  # prev is superseded at or below C: compaction's rule
            rows.delete(T_CHANGES, _PAIR_PACK(prev, kid))
            self.versions -= 1
            prev = 0
        if prev:
            depth, jump, jdepth, jj, jjd = _links_after(rows, kid, prev, self._depth, self._jump, self._jdepth,
                                                        self._jj, self._jjd)
        else:
            depth = jump = jdepth = jj = jjd = 0
        if not rows.add_log(_PAIR_PACK(r, kid), head + _LINKS_PACK(prev, jump, depth, jdepth, len(key)) + key
                            + row[_ROW_SIZE:]):  # another key with this id wrote it: forged
            raise ValueError(f"two versions at revision {r} of key id {kid}")
        self._prev, self._depth, self._jump, self._jdepth, self._jj, self._jjd, self._head = (
            r, depth, jump, jdepth, jj, jjd, head)
        self.versions += 1

    def _end_key(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        rows = self._rows
        prev, mod = self._prev, self._mod
        if not prev:  # nothing came right after it: staged, for `finish`
            rows.put(T_KEYS, key, self._row)
            self._staged = True
            return
        if prev != mod:
            raise ValueError(f"key row of key id {self._kid} names revision {mod}, its newest version is {prev}")
        kind, create, version = _ROW.unpack(self._head)
        if kind != KIND_PUT:
            create = version = 0
        rows.put(T_KEYS, key, _KEYROW3_PACK(self._kid, create, mod, version, self._depth, self._jump, self._jdepth,
                                            self._jj, self._jjd))

    def finish(self) -> int:
        """End the last key, build the staged ones (`rebuild_log`); the number of versions written."""
        self._end_key()
        if self._staged:
            self._staged = False
            self.versions += rebuild_log(self._rows, self.compact, keep_log=True)
        return self.versions


_BATCH = 1024


def rebuild_log(rows: Rows, compact: int | None = None, keep_log: bool = False) -> int:
    """Turn the group's staged rows in the exchange form (32-byte KEYS rows, HIST rows: data
    format 2's tables, or what a `LogBuilder` staged) into LOG rows and linked KEYS rows, and
    return how many versions; the HIST rows go (any of a key id no KEYS row names too). KEYS
    rows already linked are left alone. Unless `keep_log`, any LOG row the group held before is
    dropped first (format 2's CHANGES rows share the table and the keys), and the compact
    revision is the group's. Memory: `_BATCH` keys at a time, and one key's state. ValueError as
    `LogBuilder`."""
    if not keep_log:
        rows.clear(T_CHANGES)
        compact = rev_state(rows).compact  # RevisionError (a ValueError) for a corrupt state row
    b = LogBuilder(rows, compact)
    after = b""
    while True:
        batch: list[tuple[bytes, bytes]] = []
        for k, v in rows.iter(T_KEYS, after, None):
            batch.append((bytes(k), bytes(v)))
            if len(batch) >= _BATCH:
                break
        if not batch:
            break
        after = batch[-1][0] + b"\x00"  # the least key above the batch's last
        for k, v in batch:
            if len(v) == _KEYROW3_SIZE:
                continue  # built already
            b.key(k, v)
            kid = _KEYROW_UNPACK(v)[0]
            for hk, hv in rows.iter(T_HIST, _U64.pack(kid), _U64.pack(kid + 1)):
                b.hist(bytes(hk), bytes(hv))
            if b._key is None or not b._prev:
                raise ValueError(f"key row of key id {kid} names revision {_KEYROW_UNPACK(v)[2]}, its "
                                 f"newest version is missing")
            b._end_key()
    rows.clear(T_HIST)
    return b.versions


def needs_rebuild(rows: Rows) -> bool:
    """Whether the group holds rows in the exchange form (`rebuild_log` has work): HIST rows, or
    a KEYS row without links. False for a group already rebuilt, so a migration cut short after
    some groups (or all) may run again."""
    if next(rows.iter(T_HIST, b"", None), None) is not None:
        return True
    first = next(rows.iter(T_KEYS, b"", None), None)
    return first is not None and len(first[1]) != _KEYROW3_SIZE


def encode_versions(versions: list[tuple[int, bytes]]) -> bytes:
    """A moved key's history as one record value: (revision:u64 len:u32 row)*."""
    return b"".join(_U64.pack(r) + struct.pack(">I", len(row)) + row for r, row in versions)


def decode_versions(raw: bytes) -> list[tuple[int, bytes]]:
    """Inverse of `encode_versions`; ValueError for anything malformed (revisions must ascend)."""
    out: list[tuple[int, bytes]] = []
    pos, n = 0, len(raw)
    while pos < n:
        if pos + 12 > n:
            raise ValueError("history record truncated")
        (r,) = _U64.unpack_from(raw, pos)
        (ln,) = struct.unpack_from(">I", raw, pos + 8)
        pos += 12
        if pos + ln > n:
            raise ValueError("history record truncated in a row")
        if not 0 < r <= REVISION_MAX or (out and r <= out[-1][0]):
            raise ValueError(f"history record revision {r} out of order or range")
        row = bytes(raw[pos : pos + ln])
        decode_row(r, row)
        out.append((r, row))
        pos += ln
    return out


def versions_in_range(
    rows: Rows, current: Iterator[tuple[bytes, bytes]], start: bytes, end: bytes | None, rev: int
) -> Iterator[tuple[bytes, Version]]:
    """The keys in [start, end) present at revision `rev` (0: now) with their versions, in key
    order. `current` yields the group's (key, value) rows in [start, end) in key order; at a past
    revision the keys that have history (deleted since, or changed) are merged in. The caller
    checks `rev` against the compact revision."""
    at = rev or REVISION_MAX

    def keys() -> Iterator[tuple[bytes, bytes | None]]:
        if not rev:
            yield from current
            return
        hist = (bytes(k) for k, _ in rows.iter(T_KEYS, start, end))
        a, b = next(current, None), next(hist, None)
        while a is not None or b is not None:
            if a is not None and (b is None or a[0] <= b):
                if a[0] == b:
                    b = next(hist, None)
                yield a
                a = next(current, None)
            else:
                assert b is not None
                yield b, None
                b = next(hist, None)

    for k, value in keys():
        v = version_at(rows, k, at, value)
        if v is not None and v.value is not None:
            yield k, v


@dataclass(slots=True)
class RetentionWalk:
    """A backwards walk of a group's change log for its retention point (`retention_step`),
    resumable across read views so a long one can be cut into bounded steps. `seen` distinct
    write revisions counted so far, the lowest of them `prev` (0: none yet); `point` is the
    answer once `done`: the revision of the (keep + 1)-th newest, or 0 (the log holds `keep` or
    fewer above the compact revision)."""

    keep: int
    seen: int = 0
    prev: int = 0
    done: bool = False
    point: int = 0


def retention_step(rows: Rows, walk: RetentionWalk, max_rows: int = 0) -> bool:
    """Continue `walk` in `rows` for at most `max_rows` change-log rows (0: no bound); True once
    it is done (then `walk.point` is the answer).

    The retention point keeps the group's newest `keep` (>= 1) write revisions: the revision of
    its (keep + 1)-th newest distinct change revision, read backwards from the end of its change
    log. Compacting at it keeps every change above it (the newest `keep`) and the state at it:
    reads at it and above still work. The LEGACY revision (1: versions written before revisions
    existed) is not a write and is not counted; several changes of one revision count once.
    Resumed in a later view, the walk continues below `prev`: writes since land above it and do
    not count, rows installed below it by a range move meanwhile are counted if reached, rows
    compacted meanwhile are not; each only lowers the point or leaves it at or below the compact
    revision (a no-op compaction), so a resumed walk never compacts what a single view would
    have kept. ValueError for a malformed change-log key or a bad `keep`."""
    if walk.keep < 1:
        raise ValueError(f"keep {walk.keep} must be at least 1")
    if walk.done:
        return True
    st = rev_state(rows)
    lo = _PAIR.pack(max(st.compact, LEGACY_REVISION) + 1, 0)
    hi = _PAIR.pack(walk.prev, 0) if walk.prev else None
    for n, k in enumerate(rows.keys_back(T_CHANGES, lo, hi), 1):
        if len(k) != _PAIR.size:
            raise ValueError(f"change-log key of {len(k)} bytes")
        (r,) = _U64.unpack_from(k)
        if r != walk.prev:
            walk.seen, walk.prev = walk.seen + 1, r
            if walk.seen > walk.keep:
                walk.point, walk.done = r, True
                return True
        if n == max_rows:
            return False
    walk.done = True
    return True


def retention_point(rows: Rows, keep: int) -> int:
    """The group's retention point keeping its newest `keep` write revisions, in one view
    (`retention_step` without a bound; 0: nothing to compact). Work: keep + 1 rows at most."""
    walk = RetentionWalk(keep)
    retention_step(rows, walk)
    return walk.point


def changes_from(rows: Rows, rev: int) -> Iterator[tuple[int, bytes]]:
    """(revision, key) of every retained change at or after `rev`, in revision order: what a
    watch starting at `rev` replays. A change is a version above the compact revision (or at it,
    if `kept`); the versions kept below it are not changes (a watch from there is refused)."""
    st = rev_state(rows)
    lo = max(rev, st.compact if st.kept else st.compact + 1)
    for k, v in rows.iter(T_CHANGES, _PAIR.pack(lo, 0), None):
        yield _PAIR.unpack(bytes(k))[0], log_row_key(bytes(v))
