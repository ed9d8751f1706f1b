"""Applying the commands of transactions across groups (two-phase commit). STANDARD LIBRARY ONLY.

Run by `machine.execute` on every replica, so everything here is a function of the log alone.
The rows are `xtxn.py`'s, in the group's MVCC tables (`mvcc.T_TXN`, `mvcc.T_INTENTS`); snapshots
carry them like every MVCC table.

Rules (each command is idempotent: a coordinator or a resolver may propose it again):
- PREPARE(id, primary, start, keys) with proposed revision P, in a participant: refused (nothing
  changes) if the group is more than `MAX_AGE` past `start`, if the transaction is already done
  here, if the group does not serve a key (`wrong_shard`; also for a range while any range of
  the group is frozen or being installed: a move), or if a key holds another
  transaction's intent (LOCKED, with that intent: the caller resolves it or waits). Otherwise it
  reserves p = `next_revision(last, P, group)` (last := p), records an intent per key at p, and
  answers the keys' current values as a `TxnResult` of GETs in key order, at revision p. The
  same PREPARE again (every key holds this transaction's intent) answers the same; a PREPARE
  naming some of them only is refused.
- While a key holds an intent, every other write of it is refused at apply (LOCKED, not cached:
  `locked`), so the key's versions stay below p, and its next version is the commit's, at
  R >= p.
- COMMIT(id, R, writes): every write's key must hold this transaction's intent (`delete_prepared`:
  the writes are the deletes of every key it prepared here, a range delete's or a lease
  deletion's; `ranges`, a transaction's range deletes: the writes, then the deletes of every
  other key it prepared here that lies in one of the ranges), R >= p and R
  above the compact revision; the writes are made at exactly R, each detaching its key from its
  lease (`leases.detach`, as a PUT does), then each leased put (`XCmd.leased`, level 7)
  attaching its key as a LEASE_PUT would (`attach_written`) - unless the lease is known dead
  here at R (`leases.may_attach`: its tombstone, or a record not LIVE in its home), when the
  key's deletion is written at R instead (answered in `current`, `xtxn.encode_found`: the
  commit point is passed, so the COMMIT cannot refuse; `node/xtxn.py`, "Leases") (`mvcc.write_version(commit=True)`:
  last := max(last, R); the change log rows at (R, kid), possibly below last), the intents go,
  and a *done* row stays (until the group is `MAX_AGE` past the start) so a delayed duplicate
  PREPARE is refused. With no intents of the transaction left: a no-op if it is done, else refused.
- ABORT(id): drops the intents (done row as for COMMIT). A no-op without intents.
- Leased puts (PREPARE with `leased` / `read_leases`, level 7): a new PREPARE is refused LOCKED
  while another transaction's lease lock holds one of their leases (a deletion of it is
  prepared); it answers per leased put whether it may attach (`leases.attach_refusal` at p, the
  per-lease key limit over every path's puts together), and the lease each named key is attached
  to if asked (`xtxn.encode_prepared_leases` in `current`), and writes an *attach lock* (row `a`)
  on the leases it accepted, until the COMMIT or ABORT: a lease's deletion (its PREPARE, and
  REVOKE / EXPIRE / DROP / ORPHAN by one command, `machine._locked`) meets it LOCKED. A
  deletion's PREPARE refused so leaves a wait marker (row `w`, `lease_waiting`): new leased
  PREPAREs of the lease are refused LOCKED for `xtxn.LEASE_WAIT_MS` (the transaction timeout),
  so the held attach locks drain and the deletion's retry proceeds (its COMMIT drops the
  marker); without it a stream of overlapping leased transactions could starve it. The
  per-lease key limit is checked at the PREPARE only (the COMMIT, past the commit point, attaches
  whatever it must): LEASE_PUTs applied between the two may take a lease past
  `leases.MAX_KEYS_PER_LEASE` in the group by the transaction's own puts at most (a deletion has
  no limit of its own, so this bounds work, not safety).
- A lease's deletion (PREPARE with a lease L, no keys): as a range delete, but its keys are the
  keys attached to L here (served, with a value: answered as found, each given an intent), and
  it holds a *lease lock* (row `e`) until its COMMIT or ABORT: a LEASE_PUT of L is refused
  LOCKED meanwhile (`lease_locked`), so every key attached to L when its RECORD commits is one
  its PREPARE found (at most `leases.MAX_KEYS_PER_LEASE` per group, the LEASE_PUT limit; a move
  may bring more: the PREPARE never refuses them for their number, or the lease could never be
  deleted). Its COMMIT deletes them at R (`delete_prepared`: every key it prepared here) and then drops L's
  attachment rows, and a group other than L's home keeps L's tombstone (`leases.deleted_everywhere`).
  Its RECORD, in L's home group, commits only if L is LIVE (and, for an expiry, still at the
  renew count it was decided on) and revokes and forgets it in the same apply (the record becomes
  its tombstone: no DROP or FORGET follows); else it writes the
  record ABORTED and is refused (`leases.revoke_record`).
- RECORD(id, start, R, result, writes per group), in the primary: the commit point. If the
  record says ABORTED (a resolver got there first): refused (TXN_ABORTED). If it says COMMITTED
  at R: answered again. If there is none: refused when the group is more than `MAX_AGE` past
  `start` (a late proposal can never commit after an ABORTED record was forgotten), else the
  record is written COMMITTED. The answer carries R, the client's result, and the id in
  `current` (a session's cached answer to an earlier attempt names that attempt's id). A refused
  RECORD is not cached in the session (`machine.apply_command`): the next attempt's applies.
- RESOLVE(id, start), in the primary: the record, as it is; none: an ABORTED record is written
  first (so the coordinator's RECORD can no longer commit). The answer's `current` is the record.
- FINALIZE(id, group): a COMMITTED record becomes FINALIZED (its writes dropped, the client's
  result kept) once every participant applied its COMMIT: group 0 (the coordinator's, or the
  record sweep's after it sent every COMMIT again: `unfinished`) says all did; a group (a
  resolver's, after it committed that group's intents) takes that participant off the record,
  which becomes FINALIZED when none is left. A COMMITTED record is listed by start (row `u`)
  until it is FINALIZED. ABORTED and FINALIZED records, and done rows, are forgotten once the group
  is `MAX_AGE` past the start (at most `GC_PER_ENTRY` per applied command of this module).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from ..shard.ranges import IntervalSet, key_hash
from . import leases, mvcc, txn, xtxn
from .commands import ApplyResult
from .shardcmd import ShardState
from .xtxn import Intent, Record, State, TxnId, XCmd, XOp

GC_PER_ENTRY = 4
TXN_ABORTED = "transaction aborted: a resolver aborted it before its commit point"
TOO_OLD = "transaction too old: its start is more than the maximum age behind the group"
_U64 = struct.Struct(">Q")


class View(Protocol):
    """What this module needs of a group's state (`machine.StateView` has it)."""

    group: int

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> bool: ...

    @property
    def mvcc(self) -> mvcc.Rows: ...

    @property
    def shards(self) -> ShardState | None: ...


# --- reading the rows ----------------------------------------------------------------------------
def intent_of(rows: mvcc.Rows, key: bytes) -> Intent | None:
    """The key's intent, if any. A corrupt row raises RevisionError (as a corrupt state does)."""
    raw = rows.get(mvcc.T_INTENTS, key)
    if raw is None:
        return None
    try:
        return Intent.decode(bytes(raw))
    except ValueError as err:
        raise mvcc.RevisionError(f"corrupt intent row: {err}") from None


_L = TypeVar("_L")


def _lock_rows(rows: mvcc.Rows, tag: bytes, decode: Callable[[bytes], _L], what: str) -> list[_L]:
    """Every `T_TXN` row of kind `tag` decoded (locks: few); a corrupt one is a RevisionError."""
    out = []
    for _k, v in rows.iter(mvcc.T_TXN, tag, bytes([tag[0] + 1])):
        try:
            out.append(decode(bytes(v)))
        except ValueError as err:
            raise mvcc.RevisionError(f"corrupt {what} row: {err}") from None
    return out


def range_locks(rows: mvcc.Rows) -> list[tuple[Intent, tuple[bytes, bytes]]]:
    """The group's range locks (range deletes in progress; few)."""
    return _lock_rows(rows, b"l", xtxn.decode_range_lock, "range lock")


def lease_locks(rows: mvcc.Rows) -> list[tuple[Intent, int]]:
    """The group's lease locks (lease deletions in progress; few)."""
    return _lock_rows(rows, b"e", xtxn.decode_lease_lock, "lease lock")


def lease_locked(rows: mvcc.Rows, lease_id: int, key: bytes, mine: TxnId | None = None) -> ApplyResult | None:
    """The LOCKED result (naming `key`) if another transaction than `mine` holds a lease lock
    of `lease_id` here (its deletion is prepared: no key may be attached to it), or None."""
    if not rows.has_locks():
        return None
    for it, lid in lease_locks(rows):
        if lid == lease_id and it.txn != mine:
            return _lock_result(key, it)
    return None


def attach_locks(rows: mvcc.Rows) -> list[tuple[Intent, tuple[int, ...]]]:
    """The group's attach locks (prepared transactions with leased puts; few)."""
    return _lock_rows(rows, b"a", xtxn.decode_attach_lock, "attach lock")


def attach_locked(rows: mvcc.Rows, lease_id: int, key: bytes) -> ApplyResult | None:
    """The LOCKED result (naming `key`) if a transaction holds an attach lock on `lease_id` here
    (its PREPARE accepted a put attaching a key to the lease: no deletion of the lease may run
    before its COMMIT or ABORT), or None."""
    if not rows.has_locks():
        return None
    for it, ids in attach_locks(rows):
        if lease_id in ids:
            return _lock_result(key, it)
    return None


def _lock_result(k: bytes, it: Intent) -> ApplyResult:
    return ApplyResult(error=f"{xtxn.LOCKED} {it.txn}", current=xtxn.encode_lock(k, it))


def locked(rows: mvcc.Rows, keys: Iterable[bytes], mine: TxnId | None = None) -> ApplyResult | None:
    """The LOCKED result for the first of `keys` holding an intent or inside a range lock (of
    another transaction than `mine`), or None."""
    if not rows.has_locks():
        return None
    ranges: list[tuple[Intent, tuple[bytes, bytes]]] | None = None
    for k in keys:
        it = intent_of(rows, k)
        if it is not None and it.txn != mine:
            return _lock_result(k, it)
        if ranges is None:
            ranges = range_locks(rows)
        for rit, rng in ranges:
            if rit.txn != mine and xtxn.in_range(k, rng):
                return _lock_result(k, rit)
    return None


def min_pending(rows: mvcc.Rows) -> int:
    """The lowest revision reserved by a PREPARE whose intents are still held (0: none). A commit
    may still write at any revision at or above it. A malformed row (never there: snapshots are
    checked by `xtxn.check_rows`) raises RevisionError."""
    for k, _ in rows.iter(mvcc.T_TXN, b"p", b"q"):
        if len(k) < 1 + _U64.size:
            raise mvcc.RevisionError(f"corrupt pending row of {len(k)} bytes")
        return int(_U64.unpack_from(bytes(k), 1)[0])
    return 0


def intent_rows(rows: mvcc.Rows, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
    """At most `limit` (key, intent row) of the intents on keys in [start, end), in key order
    (the node stores' intent reads and read probes share it)."""
    out: list[tuple[bytes, bytes]] = []
    for k, v in rows.iter(mvcc.T_INTENTS, start, end):
        if len(out) >= limit:
            break
        out.append((k, v))
    return out


def lock_intent_rows(rows: mvcc.Rows) -> list[bytes]:
    """The intent (`xtxn.Intent` encoding, `xtxn.INTENT_BYTES`) of every lease lock and range
    lock the group holds, lease locks first (the node stores' lock reads: the intent sweep
    resolves them like intents)."""
    return [bytes(v)[:xtxn.INTENT_BYTES] for lo, hi in ((b"e", b"f"), (b"l", b"m"))
            for _k, v in rows.iter(mvcc.T_TXN, lo, hi)]


def intents_in(rows: mvcc.Rows, ranges: IntervalSet) -> bool:
    """Whether a key whose hash is in `ranges` holds an intent, or any range lock is held (a
    key range covers every hash range): a range move waits for them."""
    if any(True for _ in rows.iter(mvcc.T_TXN, b"l", b"m")):
        return True
    return any(key_hash(bytes(k)) in ranges for k, _ in rows.iter(mvcc.T_INTENTS, b"", None))


def unfinished(rows: mvcc.Rows, before: int, limit: int) -> list[tuple[TxnId, Record]]:
    """At most `limit` COMMITTED records of this (primary) group not FINALIZED yet whose start is
    below `before`, oldest first (rows `u`): a coordinator that died after its RECORD and before
    its FINALIZE leaves one; the record sweep (`node.xtxn.finish_commands`) sends the COMMITs
    again and FINALIZEs it, after which it is forgotten by age like any FINALIZED record."""
    out: list[tuple[TxnId, Record]] = []
    for k, _ in rows.iter(mvcc.T_TXN, b"u", b"v"):
        k = bytes(k)
        if len(out) >= limit:
            break
        if len(k) != 1 + 8 + xtxn.ID_BYTES:  # malformed (snapshots are checked): skip, as `_gc` does
            continue
        if _U64.unpack_from(k, 1)[0] >= before:
            break
        t = TxnId.decode(k[9:])
        rec = record_of(rows, t)
        if rec is not None and rec.state == State.COMMITTED:
            out.append((t, rec))
    return out


def record_of(rows: mvcc.Rows, t: TxnId) -> Record | None:
    raw = rows.get(mvcc.T_TXN, xtxn.row_record(t))
    if raw is None:
        return None
    try:
        return xtxn.decode_record(bytes(raw))
    except ValueError as err:
        raise mvcc.RevisionError(f"corrupt transaction record: {err}") from None


def prepared_keys(rows: mvcc.Rows, t: TxnId) -> tuple[int, int, list[bytes]] | None:
    """(p, start, keys) of the transaction's intents in this group, or None if it holds none."""
    raw = rows.get(mvcc.T_TXN, xtxn.row_txn(t))
    if raw is None:
        return None
    try:
        return xtxn.decode_txn_keys(bytes(raw))
    except ValueError as err:
        raise mvcc.RevisionError(f"corrupt transaction key list: {err}") from None


# --- apply ---------------------------------------------------------------------------------------
def apply(view: View, c: XCmd, proposed: int) -> ApplyResult:
    """Apply cross-group command `c` (see the module docstring). RevisionError propagates (the
    caller turns it into an error result) only before anything changed."""
    rows = view.mvcc
    res = _apply(view, rows, c, proposed)
    _gc(rows)
    leases.gc(rows)  # the lease tombstones a COMMIT or RECORD keeps are forgotten here too
    return res


def _apply(view: View, rows: mvcc.Rows, c: XCmd, proposed: int) -> ApplyResult:
    if c.op == XOp.PREPARE:
        return _prepare(view, rows, c, proposed)
    if c.op in (XOp.COMMIT, XOp.ABORT):
        return _finish(view, rows, c)
    if c.op == XOp.RECORD:
        return _record(rows, c, view.group)
    if c.op == XOp.RESOLVE:
        return _resolve(rows, c)
    if c.op == XOp.FINALIZE:
        rec = record_of(rows, c.txn)
        if rec is not None and rec.state == State.COMMITTED:
            left = tuple((g, ws) for g, ws in rec.writes if c.group and g != c.group)
            if left:  # one participant done (a resolver's): the others may still need their writes
                kept = tuple(x for g, _ws in left for x in rec.leased_of(g))
                rows.put(mvcc.T_TXN, xtxn.row_record(c.txn), xtxn.encode_record(
                    Record(State.COMMITTED, rec.start, rec.at, rec.result, left, rec.delete_prepared, kept,
                           rec.ranges)))
            else:
                rows.put(mvcc.T_TXN, xtxn.row_record(c.txn),
                         xtxn.encode_record(Record(State.FINALIZED, rec.start, rec.at, rec.result)))
                rows.delete(mvcc.T_TXN, xtxn.row_unfinished(rec.start, c.txn))
                _gc_later(rows, rec.start, c.txn)
        return ApplyResult()
    return ApplyResult(error=f"unknown cross-group op {c.op!r}")


def _too_old(rows: mvcc.Rows, start: int) -> bool:
    return mvcc.rev_state(rows).last > start + xtxn.MAX_AGE


def _gc_later(rows: mvcc.Rows, start: int, t: TxnId) -> None:
    rows.put(mvcc.T_TXN, xtxn.row_gc(start + xtxn.MAX_AGE, t), b"")


def _gc(rows: mvcc.Rows) -> None:
    """Forget at most GC_PER_ENTRY expired rows (ABORTED / FINALIZED records, done rows), by
    their expiry index (`g` rows: `mvcc.expired`, the walk the lease tombstones' GC uses too)."""
    for k in mvcc.expired(rows, mvcc.T_TXN, b"g", 1 + 8 + xtxn.ID_BYTES, GC_PER_ENTRY, "transaction"):
        t = TxnId.decode(k[9:])
        rows.delete(mvcc.T_TXN, k)
        rows.delete(mvcc.T_TXN, xtxn.row_done(t))
        rec = rows.get(mvcc.T_TXN, xtxn.row_record(t))
        if rec is not None and bytes(rec)[:1] != bytes((int(State.COMMITTED),)):
            rows.delete(mvcc.T_TXN, xtxn.row_record(t))


def _prepare(view: View, rows: mvcc.Rows, c: XCmd, proposed: int) -> ApplyResult:
    if _too_old(rows, c.start):
        return ApplyResult(error=TOO_OLD)
    if rows.get(mvcc.T_TXN, xtxn.row_done(c.txn)) is not None:
        return ApplyResult(error="transaction already finished in this group")
    st = view.shards
    if st is not None and not all(key_hash(k) in st.active for k in c.keys):
        return ApplyResult(wrong_shard=True, error="the key is not served by this group")
    if (c.lock is not None or c.lease) and st is not None and (st.frozen or st.installing):
        # keys of a moving range are in two groups or none: a range delete waits for the move
        return ApplyResult(wrong_shard=True, error="a range of this group is moving: the range delete waits for it")
    mine = prepared_keys(rows, c.txn)
    found: list[bytes] = []
    if mine is None:
        lock = locked(rows, c.keys)
        if lock is not None:
            return lock
        if c.lock is not None:
            conflict = _range_conflict(view, rows, c, found)
            if conflict is not None:
                return conflict
        now = max(mvcc.rev_state(rows).last, proposed)
        if c.lease:
            conflict = _lease_conflict(view, rows, c, found, now)
            if conflict is not None:
                return conflict
        for k, lid, _checked in c.leased:  # as a LEASE_PUT: not while a deletion of its lease is
            lock = lease_locked(rows, lid, k) or lease_waiting(rows, lid, k, now)  # prepared or waits
            if lock is not None:
                return lock
        p = mvcc.next_revision(mvcc.rev_state(rows).last, proposed, view.group)
    elif (not set(c.keys) <= set(mine[2]) or (c.lock is None and not c.lease and len(c.keys) != len(mine[2]))
          or (c.lease and rows.get(mvcc.T_TXN, xtxn.row_lease_lock(c.txn)) is None)):
        return ApplyResult(error="PREPARE names other keys than the transaction prepared in this group")
    else:
        p = mine[0]
        named = set(c.keys)
        found = [k for k in mine[2] if k not in named]
    gets: list[txn.OpResult] = []
    size = 0
    for k in c.keys:
        value = view.get(k)
        meta = mvcc.current_meta(rows, k, value)
        if value is None or meta is None:
            gets.append(txn.OpResult(txn.OpKind.GET))
            continue
        size += len(value)
        if size > txn.MAX_RESULT_VALUE_BYTES:
            return ApplyResult(error=f"the prepared keys hold more than {txn.MAX_RESULT_VALUE_BYTES} bytes of values")
        gets.append(txn.OpResult(txn.OpKind.GET, True, value, meta.create_revision, meta.mod_revision, meta.version))
    lease_answer: bytes | None = None
    locking: tuple[int, ...] = ()
    if c.leased or c.read_leases:
        refusals = _attach_refusals(view, rows, c, p, mine is not None)
        locking = tuple(sorted({lid for (_k, lid, _c), r in zip(c.leased, refusals, strict=True)
                                if r == xtxn.REFUSAL_NONE}))
        key_leases = tuple(leases.lease_of(rows, k) for k in c.keys) if c.read_leases else ()
        lease_answer = xtxn.encode_prepared_leases(key_leases, refusals)
    if mine is None:
        it = Intent(c.txn, c.primary, c.start, p)
        intent = it.encode()
        if locking:
            rows.put(mvcc.T_TXN, xtxn.row_attach_lock(c.txn), xtxn.encode_attach_lock(it, locking))
        for k in (*c.keys, *found):
            rows.put(mvcc.T_INTENTS, k, intent)
        rows.put(mvcc.T_TXN, xtxn.row_txn(c.txn), xtxn.encode_txn_keys((*c.keys, *found), p, c.start))
        rows.put(mvcc.T_TXN, xtxn.row_pending(p, c.txn), b"")
        if c.lock is not None:
            rows.put(mvcc.T_TXN, xtxn.row_lock(c.txn), xtxn.encode_range_lock(it, c.lock))
        if c.lease:
            rows.put(mvcc.T_TXN, xtxn.row_lease_lock(c.txn), xtxn.encode_lease_lock(it, c.lease))
        rs = mvcc.rev_state(rows)
        rows.put(mvcc.T_STATE, b"", mvcc.RevState(p, rs.compact, rs.next_kid, rs.kept).encode())
    return ApplyResult(
        revision=p, txn=txn.TxnResult(True, tuple(gets), p),
        current=_prepare_answer(c, found, lease_answer),
    )


def _prepare_answer(c: XCmd, found: list[bytes], lease_answer: bytes | None) -> bytes | None:
    """A PREPARE's `current`: the keys found in its range or lease (`xtxn.encode_found`), its
    lease answer (`xtxn.encode_prepared_leases`), or both (form 4: a range lock with leases)."""
    if c.lock is None and not c.lease:
        return lease_answer
    if lease_answer is None:
        return xtxn.encode_found(found)
    return lease_answer + xtxn.encode_found(found)


def _attach_refusals(view: View, rows: mvcc.Rows, c: XCmd, p: int, again: bool) -> tuple[int, ...]:
    """Per leased put of PREPARE `c` (reserving `p`): whether it may attach its key here, by a
    LEASE_PUT's rules at `p` (`leases.attach_refusal`: `REFUSAL_NOT_FOUND`; the per-lease key
    limit, every path's new attachments of the lease counted together: `REFUSAL_TOO_MANY`).
    The same PREPARE `again` also refuses a put whose lease its attach lock does not hold (the
    first answer refused it: it must not attach unguarded now)."""
    held = attach_lock_of(rows, c.txn) if again else ()
    out: list[int] = []
    for (_k, lid, _checked), refused in zip(c.leased, leases.attach_refusals(rows, view.group, c.leased, p),
                                            strict=True):
        if (refused is not None and refused != leases.TOO_MANY_KEYS) or (again and lid not in held):
            out.append(xtxn.REFUSAL_NOT_FOUND)
        elif refused == leases.TOO_MANY_KEYS:
            out.append(xtxn.REFUSAL_TOO_MANY)
        else:
            out.append(xtxn.REFUSAL_NONE)
    return tuple(out)


def attach_lock_of(rows: mvcc.Rows, t: TxnId) -> tuple[int, ...]:
    """The leases transaction `t`'s attach lock holds here (none without its row)."""
    raw = rows.get(mvcc.T_TXN, xtxn.row_attach_lock(t))
    if raw is None:
        return ()
    try:
        return xtxn.decode_attach_lock(bytes(raw))[1]
    except ValueError as err:
        raise mvcc.RevisionError(f"corrupt attach lock row: {err}") from None


MAX_RANGE_KEYS = 10_000
"""The most keys one group's part of a range delete may cover (their intents are written by
one PREPARE, their deletes by one COMMIT). Far more than a command may list (`xtxn.MAX_KEYS`):
the RECORD and the COMMITs of a range delete do not list its keys but say "every key the
transaction prepared here" (`XCmd.delete_prepared`), which the group's intents fix and its
range lock keeps fixed, so whatever a PREPARE accepted the commit point can describe. A lease's
deletion has the same form (its lease lock keeps the keys fixed); its bound is the LEASE_PUT's
(`leases.MAX_KEYS_PER_LEASE`, equal), not a refusal of the PREPARE."""


def _range_conflict(view: View, rows: mvcc.Rows, c: XCmd, found: list[bytes]) -> ApplyResult | None:
    """For a PREPARE with a range: the LOCKED result if another transaction holds an intent on a
    key in it or a range lock overlapping it; else fill `found` with the keys present in it
    (not named by the PREPARE itself). An error result if it holds too many."""
    assert c.lock is not None
    lo, hi = c.lock
    for rit, rng in range_locks(rows):
        if xtxn.overlaps(rng, c.lock):
            return _lock_result(max(lo, rng[0]) or b"\x00", rit)  # a key in both ranges names the lock
    end = hi or None
    for k, v in rows.iter(mvcc.T_INTENTS, lo, end):
        try:
            return _lock_result(bytes(k), Intent.decode(bytes(v)))
        except ValueError as err:
            raise mvcc.RevisionError(f"corrupt intent row: {err}") from None
    named = set(c.keys)
    st = view.shards
    for k, _ in rows.iter(mvcc.T_KEYS, lo, end):
        key = bytes(k)
        if key in named or view.get(key) is None or (st is not None and key_hash(key) not in st.active):
            continue
        found.append(key)
        if len(found) > MAX_RANGE_KEYS:
            return ApplyResult(error=f"the range holds more than {MAX_RANGE_KEYS} keys in group {view.group}")
    return None


def lease_waiting(rows: mvcc.Rows, lease_id: int, key: bytes, now: int) -> ApplyResult | None:
    """The LOCKED result (naming `key` and the waiting deletion's intent) if a deletion of
    `lease_id` was refused here by attach locks less than `xtxn.LEASE_WAIT_MS` before `now` (its
    wait marker, row `w`): a new leased PREPARE of the lease waits, so the attach locks drain
    and the deletion's retry proceeds (else a stream of overlapping leased transactions could
    hold the lease's EXPIRE / REVOKE off without bound). None otherwise."""
    raw = rows.get(mvcc.T_TXN, xtxn.row_lease_wait(lease_id))
    if raw is None:
        return None
    try:
        it = Intent.decode(bytes(raw))
    except ValueError as err:
        raise mvcc.RevisionError(f"corrupt lease wait row: {err}") from None
    if _ms(now) - _ms(it.prepared) >= xtxn.LEASE_WAIT_MS:  # past its bound: forgotten
        rows.delete(mvcc.T_TXN, xtxn.row_lease_wait(lease_id))
        return None
    return _lock_result(key, it)


def _ms(revision: int) -> int:
    return revision >> mvcc.PHYSICAL_SHIFT


def _lease_conflict(view: View, rows: mvcc.Rows, c: XCmd, found: list[bytes], now: int) -> ApplyResult | None:
    """For a PREPARE with a lease: the LOCKED result if a key attached to it holds another
    transaction's intent or lies in a range lock, or another deletion of the lease holds its
    lease lock; else fill `found` with the attached keys present here (served, with a value).
    No limit of its own on how many (as the one-command REVOKE/EXPIRE/DROP has none): a LEASE_PUT
    attaches at most `leases.MAX_KEYS_PER_LEASE` keys to a lease per group, and a refused PREPARE
    would leave the lease undeletable forever (a range move's INSTALL may bring more)."""
    keys = leases.attached_keys(rows, c.lease)
    first = keys[0] if keys else b"\x00"
    lock = locked(rows, keys) or lease_locked(rows, c.lease, first)
    if lock is not None:
        return lock
    lock = attach_locked(rows, c.lease, first)
    if lock is not None:  # attach locks hold the deletion off: new ones wait (its marker) till they drain
        if lease_waiting(rows, c.lease, first, now) is None:
            rows.put(mvcc.T_TXN, xtxn.row_lease_wait(c.lease), Intent(c.txn, c.primary, c.start, now).encode())
        return lock
    st = view.shards
    for k in keys:
        if (st is None or key_hash(k) in st.active) and view.get(k) is not None:
            found.append(k)
    return None


def _finish(view: View, rows: mvcc.Rows, c: XCmd) -> ApplyResult:
    mine = prepared_keys(rows, c.txn)
    if mine is None:
        if c.op == XOp.ABORT or rows.get(mvcc.T_TXN, xtxn.row_done(c.txn)) is not None:
            return ApplyResult(revision=c.at)
        return ApplyResult(error="COMMIT of a transaction that holds no intents in this group")
    p, start, keys = mine
    ll = rows.get(mvcc.T_TXN, xtxn.row_lease_lock(c.txn))
    lease_id: int | None = None
    if ll is not None:
        try:
            lease_id = xtxn.decode_lease_lock(bytes(ll))[1]
        except ValueError as err:
            raise mvcc.RevisionError(f"corrupt lease lock row: {err}") from None
    dead: set[bytes] = set()
    if c.op == XOp.COMMIT:
        held = set(keys)
        if any(k not in held for k, _ in c.writes):
            return ApplyResult(error="COMMIT writes a key the transaction did not prepare in this group")
        st = mvcc.rev_state(rows)
        if not (c.at >= p and c.at > st.compact):
            return ApplyResult(error=f"COMMIT at {c.at} below the transaction's prepared revision {p}")
        writes: Iterable[xtxn.Write] = ((k, None) for k in keys) if c.delete_prepared else c.writes
        if c.ranges:  # a transaction's range deletes: every other key it prepared in one of them
            named = {k for k, _ in c.writes}
            writes = (*c.writes, *((k, None) for k in keys
                                   if k not in named and any(txn.in_range(k, lo, hi) for lo, hi in c.ranges)))
        attaching = {k: lid for k, lid, _checked in c.leased}
        locked_leases = attach_lock_of(rows, c.txn) if attaching else ()
        # a lease its attach lock does not hold (the PREPARE refused it: a COMMIT must never
        # carry it) is treated as dead, as is one that died here after the commit point: the
        # put is made and deleted with it
        dead = {k for k, lid in attaching.items() if lid not in locked_leases or not leases.may_attach(rows, view.group, lid, c.at)}
        if dead:
            writes = [(k, None if k in dead else v) for k, v in writes]
        for k, v in writes:
            prev = view.get(k)
            if v is None and prev is None:
                continue
            mvcc.write_version(rows, view.group, k, v, prev, c.at, commit=True)
            if v is None:
                view.delete(k)
            else:
                view.put(k, v)
            detach_written(rows, k)
        for k, lid in attaching.items():
            if k not in dead:
                attach_written(rows, k, lid)
    if lease_id is not None:
        if c.op == XOp.COMMIT:
            leases.deleted_everywhere(rows, view.group, lease_id, c.at)
            rows.delete(mvcc.T_TXN, xtxn.row_lease_wait(lease_id))
        rows.delete(mvcc.T_TXN, xtxn.row_lease_lock(c.txn))
    for k in keys:
        rows.delete(mvcc.T_INTENTS, k)
    rows.delete(mvcc.T_TXN, xtxn.row_txn(c.txn))
    rows.delete(mvcc.T_TXN, xtxn.row_pending(p, c.txn))
    rows.delete(mvcc.T_TXN, xtxn.row_lock(c.txn))
    rows.delete(mvcc.T_TXN, xtxn.row_attach_lock(c.txn))
    rows.put(mvcc.T_TXN, xtxn.row_done(c.txn), _U64.pack(start))
    _gc_later(rows, start, c.txn)
    if c.op == XOp.COMMIT and dead:  # the keys deleted instead of put (`current`: the checkers' view)
        return ApplyResult(revision=c.at, current=xtxn.encode_found(sorted(dead)))
    return ApplyResult(revision=c.at)


def detach_written(rows: mvcc.Rows, key: bytes) -> None:
    """A COMMIT's write or delete of `key` detaches it from its lease, as a PUT does (else the
    lease's expiry would later delete what the transaction wrote without it)."""
    leases.detach(rows, key)


def attach_written(rows: mvcc.Rows, key: bytes, lease_id: int) -> None:
    """A COMMIT's leased put of `key` (written and detached first) attaches it to its lease, as
    a LEASE_PUT does (`leases.attach`)."""
    leases.attach(rows, key, lease_id)


def _answer(rec: Record, t: TxnId) -> ApplyResult:
    return ApplyResult(revision=rec.at, txn=rec.result, current=t.encode())


def _record(rows: mvcc.Rows, c: XCmd, group: int) -> ApplyResult:
    rec = record_of(rows, c.txn)
    if rec is not None:
        if rec.state == State.ABORTED:
            return ApplyResult(error=TXN_ABORTED)
        if rec.at != c.at:
            return ApplyResult(error=f"the transaction is already recorded at {rec.at}")
        return _answer(Record(rec.state, rec.start, rec.at, rec.result if rec.result is not None else c.result), c.txn)
    if _too_old(rows, c.start):
        return ApplyResult(error=TOO_OLD)
    if c.lease:
        refused = leases.revoke_record(rows, group, c.lease, c.renews, c.at)
        if refused is not None:  # decided: no later attempt of this id commits (ABORTED, as a RESOLVE)
            rows.put(mvcc.T_TXN, xtxn.row_record(c.txn), xtxn.encode_record(Record(State.ABORTED, c.start)))
            _gc_later(rows, c.start, c.txn)
            return ApplyResult(error=refused)
    new = Record(State.COMMITTED, c.start, c.at, c.result, c.groups, c.delete_prepared, c.leased, c.ranges)
    rows.put(mvcc.T_TXN, xtxn.row_record(c.txn), xtxn.encode_record(new))
    rows.put(mvcc.T_TXN, xtxn.row_unfinished(c.start, c.txn), b"")
    return _answer(new, c.txn)


def _resolve(rows: mvcc.Rows, c: XCmd) -> ApplyResult:
    rec = record_of(rows, c.txn)
    if rec is None:
        rec = Record(State.ABORTED, c.start)
        rows.put(mvcc.T_TXN, xtxn.row_record(c.txn), xtxn.encode_record(rec))
        _gc_later(rows, c.start, c.txn)
    return ApplyResult(revision=rec.at, current=xtxn.encode_record(rec))
