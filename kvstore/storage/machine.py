"""The KV state machine's apply logic, over an abstract view of one group's state. STANDARD LIBRARY ONLY.

`kvstate.py` runs this logic on LMDB inside the node's write transaction; the deterministic
simulator (or a test) can run exactly the same logic on `DictState`. A test walks this module's
imports.

Semantics (deterministic: every replica computes the same result and the same new state):
- PUT sets the key. DELETE removes it (result `existed`). CAS with `expect_absent` swaps iff the
  key is absent; otherwise iff the key is present and equal to `expected`; the result says
  `swapped`, `found`, and carries the `current` value when not swapped and found.
- Revisions (`mvcc.py`, docs/REVISIONS.md): a PUT, a successful CAS and a DELETE of a present key
  get the revision `mvcc.next_revision(last, proposed, group)` (strictly above the group's last,
  at least the leader's proposal, in the group's slot), carried in the result (and so in the
  session cache: a retry answers the same revision); the key's version is recorded in history.
  A failed CAS and a DELETE of an absent key change nothing and get no revision (0). A proposal
  beyond `mvcc.PROPOSAL_MAX` is refused (error result, nothing changes). COMPACT drops history
  at or below its revision (clamped to the group's last revision; never backwards). CLOSE
  raises the group's last revision to its revision (`last := max(last, R)`, writing nothing
  else), so every later write of the group gets a revision above R: a read at R ≤ last is exact
  forever after (docs/REVISIONS.md, "Reads at a revision"); one above `mvcc.PROPOSAL_MAX` is
  refused (error result, nothing changes). Both carry no session.
- TXN (`txn.py`): the compares and the branch's operations are evaluated by `txn.evaluate`
  (pure) against the group's current state, as if written at R = `mvcc.next_revision(last,
  proposed, group)`; then every write it returns is made at exactly R (etcd's rule: one revision
  per transaction; the change log holds them all at R, so a watch delivers them together). A
  transaction that writes nothing leaves the revision state alone (result revision 0). A put
  with a lease on the branch taken attaches its key as a LEASE_PUT would (`lease_refusal`: a
  lease that may not attach refuses the whole transaction, an error result, nothing written; a
  TXN naming a lease whose deletion is prepared here is LOCKED, `_locked`). The
  result (succeeded, per-operation responses) is cached in the session like any result, so a
  retry answers it again without re-running it. Ownership: every key the transaction names (on
  any path) must be served by the group, else `wrong_shard` as for a single key.
- Transactions across groups (PREPARE .. FINALIZE, `xtxn_apply.py`): no session but on RECORD
  (the client's, cached like any result unless refused); while a key holds an intent, every
  other command naming it (PUT, DELETE, CAS, TXN, another PREPARE) is refused LOCKED, not cached.
- Malformed command bytes change nothing and give a result with `error` set.
- Exactly-once (client_id != 0): each client has an ack *floor* (the highest `ack` seen, capped by
  the seq that carried it). A command with seq < floor is a stale retry of a request whose reply
  the client already received: it changes nothing (error result). A command whose (client_id, seq)
  has a cached result returns that result and changes nothing. Otherwise it is applied, its result
  cached, and if the floor rises, the client's cached results with seq < new floor are forgotten.
- Sessions expire (Raft dissertation §6.3, by log position): see "Session expiry" below.
- Ownership (multi-raft): after the session checks, a KV command whose key the group does not
  serve (`StateView.owns`) changes nothing and gives a `wrong_shard` result, which is NOT cached:
  its retry, at the group that serves the key, applies it. Shard commands (`shardcmd`) change
  which ranges the group serves; see that module for their rules.

Session expiry (deterministic: only the log decides, never a clock or a node-local setting).
The view's `index` is the log index of the entry being applied; the caller sets it first.
- Every session (client_id != 0) has a *head* (`SessionHead`: floor, last, created): `last` is the
  index of the entry that last touched it (created it, applied a command under it, or installed
  it by a range move), `created` the index of the entry that created this incarnation of it. An
  LRU index orders the sessions by (last, client_id); `SessionMeta` holds the group's session
  count, its *eviction horizon* H (the largest `last` of any session ever evicted from the group)
  and the number of evictions so far.
- After every applied entry: while count > `max_sessions`, the least recently touched session is
  evicted (head, cached results and LRU row removed, H raised to its `last`); then at most
  `idle_evictions` sessions untouched for `idle_entries` entries are evicted. The work per entry
  is bounded (an INSTALL adds at most the sessions it carries, and evicts as many).
- The retry rule: a command with client_id != 0, seq >= floor and no cached result, with `retry`
  set, is REFUSED (nothing changes, nothing cached, result `session_expired`) iff H > horizon and
  the session is unknown since the horizon (no head, or head.created > horizon).
  Why a retry is never applied twice: suppose an earlier attempt was applied at index t1 in this
  group. The client sent `horizon` from replies it had received before sending its first attempt
  that may have applied, and every index a reply carries is a committed (applied) index, while
  an entry proposed later lands after every committed entry: t1 > horizon. Applying it set the
  session's last >= t1 and cached its result. If the result is no longer cached and seq >= floor,
  the incarnation holding it was evicted (a floor raise past seq would make seq < floor), and the
  eviction raised H >= last >= t1 > horizon; a session recreated afterwards has created > t1 >
  horizon. So the refusal condition holds and the retry is refused. Conversely, if H <= horizon
  or the head existed since before the horizon (created <= horizon), no incarnation that could
  hold t1 was evicted, so the attempt was not applied and applying the retry is the first time.
  Range moves: an installed session gets last = created = the INSTALL's index in the target
  group (> any index the target had answered before), and a client whose retry goes to another
  group than its first attempt sends horizon 0, so the rule never relies on another group's
  indices. H is the group's own: snapshots carry it, range moves do not.
- A refused retry is indeterminate for the client (SESSION_EXPIRED): its first attempt may have
  been applied. Not covered: a first attempt (retry unset) delayed inside a server past the
  client's attempt timeout and proposed only after the client's retry was applied and the session
  then evicted; gRPC deadlines make the server drop late unary requests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..shard.ranges import IntervalSet, key_hash
from . import leases, mvcc, txn, xtxn_apply
from .commands import (
    LEASE_OPS,
    X_OPS,
    ApplyResult,
    Command,
    Op,
    decode_command,
    decode_result,
    encode_result,
    unknown_kind,
)
from .mvcc_mem import MemRows
from .shardcmd import (
    REC_CLOSED,
    REC_DATA,
    REC_FLOOR,
    REC_HISTORY,
    REC_LEASE,
    REC_RESULT,
    U64,
    U64_PAIR,
    ShardOp,
    ShardState,
    decode_closed,
    decode_shard_command,
    is_shard_command,
    iter_records,
)

_U64 = struct.Struct(">Q")

STALE_REQUEST = "stale request: the client already acknowledged the reply for this sequence number"
SESSION_EXPIRED = (
    "session expired: the client's session was evicted, so an earlier attempt of this write may have "
    "been applied; it was not applied again"
)

MAX_SESSIONS_PER_GROUP = 10_000
"""A group keeps at most this many client sessions; the least recently used one is evicted."""
SESSION_IDLE_ENTRIES = 1_000_000
"""A session untouched for this many entries of its group expires."""
IDLE_EVICTIONS_PER_ENTRY = 2
"""At most this many idle sessions are evicted per applied entry (bounded work; more than the one
session an entry can create, so idle sessions drain)."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The session limits of the apply logic. Part of the replicated logic: every replica must use
    the same ones (the defaults; tests use small ones), never a per-node setting."""

    max_sessions: int = MAX_SESSIONS_PER_GROUP
    idle_entries: int = SESSION_IDLE_ENTRIES
    idle_evictions: int = IDLE_EVICTIONS_PER_ENTRY

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.idle_entries < 1 or self.idle_evictions < 0:
            raise ValueError(f"invalid session limits {self}")


LIMITS = SessionLimits()

_HEAD = struct.Struct(">QQQ")
_HEAD_V1 = struct.Struct(">Q")
_META = struct.Struct(">QQQ")


@dataclass(frozen=True, slots=True)
class SessionHead:
    """A session's head row: its ack floor, the index of the entry that last touched it, and the
    index of the entry that created this incarnation of it."""

    floor: int = 0
    last: int = 0
    created: int = 0

    def encode(self) -> bytes:
        return _HEAD.pack(self.floor, self.last, self.created)

    @staticmethod
    def decode(raw: bytes) -> SessionHead:
        """Decode a head row; the previous release's 8-byte rows (floor only) give last = created
        = 0. Raises ValueError for anything else."""
        n = len(raw)
        if n == _HEAD.size:
            floor, last, created = _HEAD.unpack(raw)
            if created > last:
                raise ValueError(f"session head created at {created} after its last use at {last}")
            return SessionHead(floor, last, created)
        if n == _HEAD_V1.size:
            return SessionHead(_HEAD_V1.unpack(raw)[0], 0, 0)
        raise ValueError(f"session head row of {n} bytes (expected {_HEAD.size} or {_HEAD_V1.size})")


@dataclass(frozen=True, slots=True)
class SessionMeta:
    """A group's session bookkeeping: how many sessions it holds, its eviction horizon H (the
    largest `last` of any session evicted from it) and how many sessions it evicted so far."""

    count: int = 0
    horizon: int = 0
    evicted: int = 0

    def encode(self) -> bytes:
        return _META.pack(self.count, self.horizon, self.evicted)

    @staticmethod
    def decode(raw: bytes) -> SessionMeta:
        if len(raw) != _META.size:
            raise ValueError(f"session meta row of {len(raw)} bytes (expected {_META.size})")
        return SessionMeta(*_META.unpack(raw))


class StateView(Protocol):
    """One group's state, as the apply logic sees it. All changes belong to one atomic batch."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> bool:
        """Remove `key`; True if it existed."""
        ...

    index: int
    """The log index of the entry being applied (the caller sets it before each entry)."""

    group: int
    """The group's id (its revision slot)."""

    @property
    def mvcc(self) -> mvcc.Rows:
        """The group's MVCC tables (history, changes, revision state), in the same batch."""
        ...

    def session_head(self, client_id: int) -> SessionHead | None:
        """The client's head row (None: the group has no session of this client)."""
        ...

    def set_session_head(self, client_id: int, head: SessionHead, old: SessionHead | None) -> None:
        """Store `head` (old: the current head row, or None if there is none), keeping the LRU
        index in step (one row per head, ordered by (last, client_id))."""
        ...

    def delete_session(self, client_id: int, head: SessionHead) -> None:
        """Remove the client's head row, its LRU row and all its cached results."""
        ...

    def oldest_session(self) -> tuple[int, int] | None:
        """(last, client_id) of the least recently touched session (LRU order), or None."""
        ...

    def session_meta(self) -> SessionMeta: ...

    def set_session_meta(self, meta: SessionMeta) -> None: ...

    def session_result(self, client_id: int, seq: int) -> bytes | None:
        """The cached encoded result of (client_id, seq), if any."""
        ...

    def put_session_result(self, client_id: int, seq: int, result: bytes) -> None: ...

    def forget_results(self, client_id: int, old_floor: int, new_floor: int) -> None:
        """Forget the client's cached results with seq < new_floor (those below old_floor are
        already gone)."""
        ...

    @property
    def shards(self) -> ShardState | None:
        """The ranges the group serves and has frozen; None: an unsharded group (serves all)."""
        ...

    def set_shards(self, st: ShardState) -> None: ...

    def delete_hashes(self, ranges: IntervalSet) -> int:
        """Delete every data key whose hash is in `ranges`; returns how many."""
        ...


def execute(view: StateView, cmd: Command) -> ApplyResult:
    """Apply `cmd` without any session handling. A write that changes state gets its revision
    from `mvcc.write_version` (which refuses an absurd proposal before anything changes)."""
    op = cmd.op
    try:
        if op == Op.PUT:  # the key's value is read only for a LEGACY key (no key row yet)
            rev = mvcc.write_version(view.mvcc, view.group, cmd.key, cmd.value, None, cmd.revision, view.get)
            view.put(cmd.key, cmd.value)
            leases.detach(view.mvcc, cmd.key)
            return ApplyResult(revision=rev)
        if op == Op.DELETE:
            prev = view.get(cmd.key)
            if prev is None:
                return ApplyResult(existed=False)
            rev = mvcc.write_version(view.mvcc, view.group, cmd.key, None, prev, cmd.revision)
            view.delete(cmd.key)
            leases.detach(view.mvcc, cmd.key)
            return ApplyResult(existed=True, revision=rev)
        if op == Op.CAS:
            current = view.get(cmd.key)
            swap = current is None if cmd.expect_absent else current is not None and current == cmd.expected
            if swap:
                rev = mvcc.write_version(view.mvcc, view.group, cmd.key, cmd.value, current, cmd.revision)
                view.put(cmd.key, cmd.value)
                leases.detach(view.mvcc, cmd.key)
                return ApplyResult(swapped=True, found=current is not None, revision=rev)
            return ApplyResult(found=current is not None, current=current)
        if op == Op.TXN:
            assert cmd.txn is not None  # decode_command guarantees it
            return apply_txn(view, cmd.txn, cmd.revision)
        if op in X_OPS:
            assert cmd.x is not None  # decode_command guarantees it
            return xtxn_apply.apply(view, cmd.x, cmd.revision)
        if op == Op.COMPACT:
            return compact(view, cmd.revision, cmd.keep)
        if op == Op.CLOSE:
            return close(view, cmd.revision)
        if cmd.lease is not None:
            return apply_lease(view, cmd)
    except mvcc.RevisionError as err:
        return ApplyResult(error=f"revision refused: {err}")
    return ApplyResult(error=f"unknown command op {op!r}")


ONE_GROUP_RANGE_DELETE = "a transaction with a range delete runs across every data group, not as one group's TXN"


def apply_txn(view: StateView, t: txn.Txn, proposed: int) -> ApplyResult:
    """Run transaction `t` at one revision (see the module docstring). RevisionError (a refused
    proposal) propagates before anything changed."""
    if txn.has_delete_range(t):  # its keys are in every group: only a two-phase commit locks them all
        return ApplyResult(error=ONE_GROUP_RANGE_DELETE)
    rows = view.mvcc
    rev = mvcc.next_revision(mvcc.rev_state(rows).last, proposed, view.group)

    with_leases = txn.compares_lease(t)

    def read(key: bytes) -> txn.Current | None:
        value = view.get(key)
        meta = mvcc.current_meta(rows, key, value)
        if value is None or meta is None:
            return None
        return txn.Current(value, meta.create_revision, meta.mod_revision, meta.version,
                           leases.lease_of(rows, key) if with_leases else 0)

    try:
        out = txn.evaluate(t, read, rev)
    except txn.ResultTooLarge as err:
        return ApplyResult(error=str(err))  # nothing written
    refused = lease_refusal(rows, view.group, out.leased, rev)
    if refused is not None:
        return ApplyResult(error=refused)  # nothing written: the whole transaction is refused
    for key, value in out.writes:
        prev = view.get(key)
        mvcc.write_version(rows, view.group, key, value, prev, rev, exact=True)
        if value is None:
            view.delete(key)
        else:
            view.put(key, value)
        leases.detach(rows, key)
    attach_leased(rows, out.leased)
    return ApplyResult(revision=out.result.revision, txn=out.result)


def attach_leased(rows: mvcc.Rows, leased: list[tuple[bytes, int, int]]) -> None:
    """Attach each key a transaction put with a lease (key, lease, checked), once its writes
    are made (their detach first): the rows a LEASE_PUT writes (`leases.attach`)."""
    for key, lid, _checked in leased:
        leases.attach(rows, key, lid)


def lease_refusal(rows: mvcc.Rows, group: int, leased: list[tuple[bytes, int, int]], at: int = 0) -> str | None:
    """Why a transaction's puts with leases (key, lease, checked; each key once), at revision
    `at`, may not attach in this group, or None: each by a LEASE_PUT's rules
    (`leases.attach_refusal`: else `leases.NOT_FOUND`); and no lease may end with more than
    `leases.MAX_KEYS_PER_LEASE` keys attached here (the new attachments of one transaction
    counted together): else `leases.TOO_MANY_KEYS` (`leases.attach_refusals`). Pure: reads only."""
    refusals = leases.attach_refusals(rows, group, leased, at)
    return next((r for r in refusals if r not in (None, leases.TOO_MANY_KEYS)),
                leases.TOO_MANY_KEYS if leases.TOO_MANY_KEYS in refusals else None)


def apply_lease(view: StateView, cmd: Command) -> ApplyResult:
    """A lease command (`leases.apply`). The result: `found`; `current` = ttl_s:u64 for a GRANT
    or a RENEW that found the lease, the number of keys deleted:u64 for REVOKE, EXPIRE, DROP and
    ORPHAN, the encoded `leases.Status` for a STATUS;
    `revision` of the deletion or of a LEASE_PUT; `error` when refused (nothing changed), with
    `wrong_shard` when a deletion waits for a range move (an attached key is frozen or being
    installed here: `leases.LEASE_MOVING`; not cached, so a retry applies)."""
    lc = cmd.lease
    assert lc is not None  # the caller checked
    st = view.shards
    if st is None or lc.kind not in _LEASE_DELETES:  # only a deletion asks what the group serves or moves
        out = leases.apply(view.mvcc, view.group, lc, cmd.key, cmd.value, cmd.revision, view.get, view.put,
                           view.delete)
    else:
        moving = st.frozen.union(st.installing)
        out = leases.apply(view.mvcc, view.group, lc, cmd.key, cmd.value, cmd.revision, view.get, view.put,
                           view.delete, lambda k: key_hash(k) in st.active, lambda k: key_hash(k) in moving)
    if out.moving:  # definite and retryable (WRONG_SHARD): the deletion runs again after the move
        return ApplyResult(wrong_shard=True, error=out.error)
    k = lc.kind
    current = None
    if out.found and k in (leases.Kind.GRANT, leases.Kind.RENEW):
        current = _U64.pack(out.ttl_s)
    elif out.found and k in (leases.Kind.REVOKE, leases.Kind.EXPIRE, leases.Kind.DROP, leases.Kind.ORPHAN):
        current = _U64.pack(out.deleted)
    elif out.status is not None:  # LEASE_STATUS: the home's answer (`leases.Status`)
        current = out.status.encode()
    return ApplyResult(found=out.found, current=current, error=out.error, revision=out.revision)


def serves(st: ShardState | None, cmd: Command) -> bool:
    """Whether a group with shard state `st` serves every key `cmd` names."""
    if st is None:
        return True
    if cmd.txn is not None:
        return all(key_hash(k) in st.active for k, _ in txn.keys_of(cmd.txn))
    if cmd.op in LEASE_OPS and cmd.op != Op.LEASE_PUT:
        return True  # no key: a lease record is the group's by its id, not by a key's hash
    return key_hash(cmd.key) in st.active


_LEASE_DELETES = frozenset({leases.Kind.REVOKE, leases.Kind.EXPIRE, leases.Kind.DROP, leases.Kind.ORPHAN})


def _locked(view: StateView, cmd: Command) -> ApplyResult | None:
    """The LOCKED result if a key `cmd` writes or reads holds a cross-group transaction's intent
    (`xtxn_apply.locked`; a corrupt intent row gives an error result). A lease's REVOKE, EXPIRE
    or DROP writes every key attached to the lease in this group: it is refused (all or nothing,
    not cached; the lease clock or the client retries) while any of them holds an intent or lies
    in a range lock, so no key is ever deleted under a prepared transaction; a LEASE_PUT is
    refused while a deletion of its lease holds a lease lock here (`xtxn_apply.lease_locked`)."""
    try:
        if cmd.txn is not None:
            for key, lid in txn.leased_puts(cmd.txn):  # as a LEASE_PUT: not while its lease's deletion is prepared
                lock = xtxn_apply.lease_locked(view.mvcc, lid, key)
                if lock is not None:
                    return lock
            return xtxn_apply.locked(view.mvcc, (k for k, _ in txn.keys_of(cmd.txn)))
        lc = cmd.lease
        if lc is not None and lc.kind in _LEASE_DELETES:
            if not view.mvcc.has_locks():
                return None
            keys = leases.attached_keys(view.mvcc, lc.lease_id)
            first = keys[0] if keys else b"\x00"
            return (xtxn_apply.locked(view.mvcc, keys) or xtxn_apply.lease_locked(view.mvcc, lc.lease_id, first)
                    or xtxn_apply.attach_locked(view.mvcc, lc.lease_id, first))
        if lc is not None and lc.kind == leases.Kind.PUT:  # no attach to a lease whose deletion is prepared
            return xtxn_apply.lease_locked(view.mvcc, lc.lease_id, cmd.key) or xtxn_apply.locked(view.mvcc, (cmd.key,))
        if lc is not None:  # GRANT, RENEW, CHECKPOINT, FORGET, STATUS: no key (as `serves`), nothing to lock
            return None
        return xtxn_apply.locked(view.mvcc, (cmd.key,))
    except mvcc.RevisionError as err:
        return ApplyResult(error=f"revision refused: {err}")


def compact(view: StateView, revision: int, keep: bool) -> ApplyResult:
    """Compact the group's history at `revision` (result revision: the group's compact revision
    afterwards) under the rule the command names (`keep`: `mvcc.compact`), whatever this binary."""
    if not 0 < revision <= mvcc.REVISION_MAX:
        return ApplyResult(error=f"compact revision {revision} is out of range")
    rows = view.mvcc
    st = mvcc.rev_state(rows)
    pending = xtxn_apply.min_pending(rows)
    if pending:  # a cross-group commit may still write at or above it
        revision = min(revision, pending - 1)
    new = mvcc.compact(rows, st, revision, keep)
    if new != st:
        rows.put(mvcc.T_STATE, b"", new.encode())
    return ApplyResult(revision=new.compact)


def close(view: StateView, revision: int) -> ApplyResult:
    """Close the group at `revision`: last := max(last, revision) in its revision state, nothing
    else (result revision: the group's last revision afterwards). A revision above
    `mvcc.PROPOSAL_MAX` is refused (error result, nothing changed): a forged close must not push
    the group to the end of the int64 range, where it could never write again."""
    if not 0 <= revision <= mvcc.PROPOSAL_MAX:
        return ApplyResult(error=f"close revision {revision} is out of range")
    rows = view.mvcc
    st = mvcc.rev_state(rows)
    if revision <= st.last:
        return ApplyResult(revision=st.last)
    rows.put(mvcc.T_STATE, b"", mvcc.RevState(revision, st.compact, st.next_kid, st.kept).encode())
    return ApplyResult(revision=revision)


def forget_history(view: StateView, ranges: IntervalSet) -> None:
    """Drop the history of every key whose hash is in `ranges` (before their data goes)."""
    rows = view.mvcc
    gone = [bytes(k) for k, _ in rows.iter(mvcc.T_KEYS, b"", None) if key_hash(bytes(k)) in ranges]
    for k in gone:
        mvcc.forget_key(rows, k)


def touch_session(view: StateView, client_id: int, old: SessionHead | None, floor: int) -> None:
    """Record that the entry being applied touched the session: last := view.index (creating the
    head, with created := view.index, if there is none; the count grows then)."""
    idx = view.index
    if old is None:
        view.set_session_head(client_id, SessionHead(floor, idx, idx), None)
        m = view.session_meta()
        view.set_session_meta(replace(m, count=m.count + 1))
    elif old.floor != floor or old.last != idx:
        view.set_session_head(client_id, SessionHead(floor, idx, old.created), old)


def evict_sessions(view: StateView, limits: SessionLimits = LIMITS) -> int:
    """Evict over-cap sessions, then at most `limits.idle_evictions` idle ones (see the module
    docstring). Returns how many were evicted."""
    m = view.session_meta()
    n = 0
    idle = 0
    while m.count > 0:
        oldest = view.oldest_session()
        if oldest is None:
            break
        last, cid = oldest
        if m.count <= limits.max_sessions:
            if idle >= limits.idle_evictions or last + limits.idle_entries > view.index:
                break
            idle += 1
        head = view.session_head(cid)
        if head is None:  # an LRU row without its head: cannot happen (they change together)
            raise AssertionError(f"session LRU row of client {cid} has no head row")
        view.delete_session(cid, head)
        m = SessionMeta(m.count - 1, max(m.horizon, head.last), m.evicted + 1)
        n += 1
    if n:
        view.set_session_meta(m)
    return n


def apply_command(view: StateView, cmd: Command) -> ApplyResult:
    """Apply `cmd` with exactly-once session handling (see the module docstring). Evicting
    sessions is the caller's (`apply_data`) job, after the entry."""
    cid = cmd.client_id
    if cmd.op == Op.COMPACT or cmd.op == Op.CLOSE:
        return execute(view, cmd) if cid == 0 else ApplyResult(error=f"{cmd.op.name} takes no session")
    if cid == 0:
        if cmd.op not in X_OPS:
            if not serves(view.shards, cmd):
                return ApplyResult(wrong_shard=True, error="the key is not served by this group")
            lock = _locked(view, cmd)
            if lock is not None:
                return lock
        return execute(view, cmd)
    head = view.session_head(cid)
    floor = 0 if head is None else head.floor
    if cmd.seq < floor:
        return ApplyResult(error=STALE_REQUEST)
    cached = view.session_result(cid, cmd.seq)
    if cached is not None:
        return decode_result(cached)
    if cmd.retry and (head is None or head.created > cmd.horizon) and view.session_meta().horizon > cmd.horizon:
        return ApplyResult(session_expired=True, error=SESSION_EXPIRED)
    if cmd.op not in X_OPS:
        if not serves(view.shards, cmd):
            return ApplyResult(wrong_shard=True, error="the key is not served by this group")
        lock = _locked(view, cmd)
        if lock is not None:  # not cached: the retry applies once the transaction resolved
            return lock
    result = execute(view, cmd)
    if cmd.op == Op.RECORD and result.error is not None:
        return result  # a refused commit point changed nothing: not cached, the next attempt's RECORD applies
    if result.wrong_shard:
        return result  # a lease deletion waiting for a move changed nothing: not cached, its retry applies
    new_floor = max(floor, min(cmd.ack, cmd.seq))
    view.put_session_result(cid, cmd.seq, encode_result(result))
    if new_floor > floor:
        view.forget_results(cid, floor, new_floor)
    touch_session(view, cid, head, new_floor)
    return result


def _keep(view: StateView, st: ShardState) -> None:
    """Store `st` (e.g. a newer move id) if it differs from the view's."""
    if view.shards != st:
        view.set_shards(st)


def apply_shard_command(view: StateView, data: bytes) -> ApplyResult:
    """Apply a shard command (see `shardcmd`). Refusals change nothing and carry an error."""
    try:
        cmd = decode_shard_command(data)
    except ValueError as err:
        return ApplyResult(error=f"malformed shard command: {err}")
    st = view.shards
    empty = IntervalSet()
    if cmd.op == ShardOp.SET:
        if st is not None and (st.active or st.frozen):
            return ApplyResult(error="the group already has ranges")
        view.set_shards(ShardState(cmd.ranges, empty))
        return ApplyResult()
    if st is None:
        st = ShardState(IntervalSet.full(), empty)  # an unsharded group serves every key
    if cmd.move < st.move:
        return ApplyResult(error=f"stale request of move {cmd.move}: the group has seen move {st.move}")
    if cmd.move > st.move:  # recorded with the command's effect (refusals below change nothing)
        st = replace(st, move=cmd.move)
    r = cmd.ranges
    if cmd.op == ShardOp.FREEZE:
        if r.issubset(st.frozen):
            _keep(view, st)
            return ApplyResult()
        if not r.difference(st.frozen).issubset(st.active):
            return ApplyResult(error="cannot freeze ranges the group does not serve")
        if xtxn_apply.intents_in(view.mvcc, r):  # the move waits: intents never move
            return ApplyResult(error="cannot freeze ranges that hold intents of transactions in progress")
        view.set_shards(replace(st, active=st.active.difference(r), frozen=st.frozen.union(r)))
        return ApplyResult()
    if cmd.op == ShardOp.BEGIN:
        if r.issubset(st.active):
            _keep(view, st)
            return ApplyResult(existed=True)
        if r.overlaps(st.active) or r.overlaps(st.frozen):
            return ApplyResult(error="ranges to receive overlap ranges the group serves or froze")
        wipe = r.union(st.installing)
        forget_history(view, wipe)
        view.delete_hashes(wipe)
        leases.forget_keys(view.mvcc, lambda k: key_hash(k) in wipe)
        view.set_shards(replace(st, installing=r, token=cmd.token))
        return ApplyResult()
    if cmd.op == ShardOp.INSTALL:
        if cmd.token != st.token:
            return ApplyResult(error="install superseded by another installation (token mismatch)")
        records = list(iter_records(cmd.records))
        histories: dict[bytes, list[tuple[int, bytes]]] = {}
        closed = compacted = 0
        keep = False
        for tag, key, value in records:  # all checks first: a refused INSTALL changes nothing
            if tag == REC_CLOSED:
                at, comp, kept = decode_closed(value)  # well-formed, comp <= at: checked by iter_records
                if at > mvcc.PROPOSAL_MAX:
                    return ApplyResult(error=f"install with a closed revision {at} out of range")
                if comp > compacted:
                    keep = kept
                elif comp == compacted:
                    keep = keep and kept
                closed, compacted = max(closed, at), max(compacted, comp)
            if tag == REC_HISTORY:
                try:
                    histories[key] = mvcc.decode_versions(value)
                except ValueError as err:
                    return ApplyResult(error=f"install with a bad history record: {err}")
            if tag == REC_LEASE:
                refused = _install_lease_check(view, key, value)
                if refused is not None:
                    return refused
            if tag in (REC_DATA, REC_HISTORY, REC_LEASE):
                h = key_hash(key)
                if h in st.active or h in st.frozen:
                    return ApplyResult(error="install would overwrite a served key (or a frozen one)")
                if h not in st.installing:
                    return ApplyResult(error="install of a key outside the ranges being installed")
        if histories or closed:
            rows = view.mvcc
            rst = mvcc.rev_state(rows)
            if closed > rst.last:  # the source's closed revision: later writes here go above it
                rst = mvcc.RevState(closed, rst.compact, rst.next_kid, rst.kept)
            if compacted and compacted >= rst.compact:
                # The source compacted further: the moved keys' versions below its compact
                # revision are gone, so this group's history below it is no longer whole either.
                # Compact this group's own history there first (deterministic, like any COMPACT;
                # after `last` is raised to the source's closed revision, so the compaction
                # reaches `compacted` and consumes every change below it), under the rule the
                # source's compaction followed, as its record says (`keep`: never this binary's
                # choice), then the moved rows land (change-log rows above it, and at it if
                # kept). At the same compact revision a kept target whose source did not keep
                # consumes its own changes there (the moved keys' are gone: no silent gap).
                rst = mvcc.compact(rows, rst, compacted, keep)
            for key, versions in histories.items():
                rst = mvcc.install_history(rows, rst, key, versions)
            rows.put(mvcc.T_STATE, b"", rst.encode())
        for tag, key, value in records:
            if tag == REC_DATA:
                view.put(key, value)
            elif tag == REC_FLOOR:  # the session arrives: last := this INSTALL's index
                (cid,) = U64.unpack(key)
                (floor,) = U64.unpack(value)
                head = view.session_head(cid)
                old = 0 if head is None else head.floor
                if floor > old:
                    view.forget_results(cid, old, floor)
                touch_session(view, cid, head, max(old, floor))
            elif tag == REC_RESULT:
                cid, seq = U64_PAIR.unpack(key)
                head = view.session_head(cid)
                floor = 0 if head is None else head.floor
                if seq >= floor and view.session_result(cid, seq) is None:
                    view.put_session_result(cid, seq, value)
                touch_session(view, cid, head, floor)
        install_attachments(view, [(k, v) for tag, k, v in records if tag == REC_LEASE])
        return ApplyResult()
    if cmd.op == ShardOp.ACTIVATE:
        if r.issubset(st.active):
            _keep(view, st)
            return ApplyResult()
        if r.overlaps(st.frozen):
            return ApplyResult(error="cannot activate ranges the group froze")
        if cmd.token != st.token or r != st.installing:
            return ApplyResult(error="activate of an installation that is not the current one")
        try:
            settle_dead_attachments(view, r)
        except mvcc.RevisionError as err:
            return ApplyResult(error=f"revision refused: {err}")
        view.set_shards(replace(st, active=st.active.union(r), installing=IntervalSet(), token=0))
        return ApplyResult()
    if cmd.op == ShardOp.DROP:
        if r.overlaps(st.active) or r.overlaps(st.installing):
            return ApplyResult(error="cannot drop ranges the group serves or is installing")
        gone = r.intersection(st.frozen)
        forget_history(view, gone)
        view.delete_hashes(gone)
        leases.forget_keys(view.mvcc, lambda k: key_hash(k) in gone)
        view.set_shards(replace(st, frozen=st.frozen.difference(r)))
        return ApplyResult()
    return ApplyResult(error=f"unknown shard op {cmd.op!r}")


def _install_lease_check(view: StateView, key: bytes, value: bytes) -> ApplyResult | None:
    """The refusal of an INSTALL record attaching `key` to a lease whose deletion across groups
    holds a lease lock in this group (prepared here, not yet committed or aborted), or None. The
    move waits (the coordinator retries the installation): a key attached to the lease must not
    arrive after the deletion's PREPARE looked for the lease's keys here."""
    (lid,) = U64.unpack(value)  # a valid lease id: checked by iter_records
    try:
        lock = xtxn_apply.lease_locked(view.mvcc, lid, key)
    except mvcc.RevisionError as err:
        return ApplyResult(error=f"revision refused: {err}")
    if lock is not None:
        return ApplyResult(error=f"install of a key attached to lease {lid:x}, whose deletion is in progress here")
    return None


def install_attachments(view: StateView, recs: list[tuple[bytes, bytes]]) -> None:
    """An INSTALL's lease attachments (`REC_LEASE`: key, lease id): each key is attached to its
    lease as a LEASE_PUT would attach it (`leases.attach`), so the lease's deletion deletes it in
    this group once the range is served here. (While the range is being installed, no deletion
    touches it: REVOKE / EXPIRE / DROP and the lease PREPARE wait for the move.) An attachment to
    a lease that is dead here is settled by the ACTIVATE (`settle_dead_attachments`)."""
    rows = view.mvcc
    for key, raw in recs:
        leases.attach(rows, key, U64.unpack(raw)[0])


def settle_dead_attachments(view: StateView, ranges: IntervalSet) -> None:
    """At the ACTIVATE of `ranges`: a key installed there attached to a lease that may not be
    attached here any more (`leases.may_attach`: this group holds the lease's tombstone and it
    still counts at max(last, the key's mod revision) - a key written after the tombstone
    expired is of a later incarnation of the id, `leases.orphan_drop` - or this group is its
    home and its record is not LIVE) is deleted, at one new revision of this group for all
    such keys, and detached: definitively, since its lease is gone and no deletion of it would
    come here. (Done once, at the ACTIVATE, so a late duplicate INSTALL chunk cannot bring the
    key back after it.) With a lease's deletion across groups this cannot happen (the source's
    PREPARE found the key, whose intent then kept its range from freezing until the COMMIT
    deleted it, or the source refused to prepare while the range was frozen; and an INSTALL is
    refused while the deletion's lease lock is held here); it can with the one-group REVOKE,
    whose DROP may reach this group before the key does. RevisionError propagates before
    anything changed."""
    rows = view.mvcc
    if not rows.has_attachments():
        return
    dead: list[tuple[bytes, bytes | None]] = []
    for key, lid in leases.attachments(rows, lambda k: key_hash(k) in ranges):
        value = view.get(key)
        meta = mvcc.current_meta(rows, key, value)
        if not leases.may_attach(rows, view.group, lid, meta.mod_revision if meta is not None else 0):
            dead.append((key, value))
    if not dead:
        return
    rev = mvcc.next_revision(mvcc.rev_state(rows).last, 0, view.group)
    leases.delete_at(rows, view.group, rev, dead, view.delete)
    for key, _ in dead:
        leases.detach(rows, key)


class UnknownCommandKind(Exception):
    """An entry holds a command of a known format but of a kind this release does not know: a
    newer release wrote it (`kvstore.node.version` gates new kinds until every member supports
    them; a member started later with an older release can still meet one). Applying it as an
    error result would make this replica diverge from those that know the kind, so apply stops
    instead (etcd panics likewise): the raising transaction is abandoned whole and the node stops;
    it applies the entry after an upgrade. No proposal path of this release can put such an entry
    into a log (`grouprequests.check_group_request`, the KV services encode every command)."""


def apply_data(view: StateView, data: bytes, limits: SessionLimits = LIMITS) -> ApplyResult:
    """Apply the data of the NORMAL entry at `view.index`, then evict sessions as `limits` say.
    Garbage yields an error result and changes nothing (but sessions may still expire); a command
    of a kind this release does not know raises `UnknownCommandKind`."""
    if is_shard_command(data):
        res = apply_shard_command(view, data)
    else:
        try:
            cmd = decode_command(data)
        except ValueError as err:
            kind = unknown_kind(data)
            if kind is not None:
                raise UnknownCommandKind(
                    f"entry {view.index} of group {view.group} holds a command of kind {kind}, which this release "
                    "does not know (a newer release wrote it): upgrade this node; it stops rather than diverge"
                ) from None
            res = ApplyResult(error=f"malformed command: {err}")
        else:
            res = apply_command(view, cmd)
    evict_sessions(view, limits)
    return res


@dataclass(slots=True)
class DictState:
    """An in-memory `StateView` (for the simulator and tests). `apply` sets `index` to the next
    entry's index and applies it; callers with their own log positions set `index` themselves."""

    data: dict[bytes, bytes] = field(default_factory=dict)
    sessions: dict[tuple[int, int], bytes] = field(default_factory=dict)
    heads: dict[int, SessionHead] = field(default_factory=dict)
    lru: set[tuple[int, int]] = field(default_factory=set)
    meta: SessionMeta = field(default_factory=SessionMeta)
    shard_state: ShardState | None = None
    index: int = 0
    group: int = 1
    rows: MemRows = field(default_factory=MemRows)

    @property
    def mvcc(self) -> MemRows:
        return self.rows

    def apply(self, data: bytes, limits: SessionLimits = LIMITS) -> ApplyResult:
        """Apply `data` as the next entry (index + 1)."""
        self.index += 1
        return apply_data(self, data, limits)

    @property
    def floors(self) -> dict[int, int]:
        """Each session's ack floor (sessions with floor 0 included)."""
        return {cid: h.floor for cid, h in self.heads.items()}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def session_head(self, client_id: int) -> SessionHead | None:
        return self.heads.get(client_id)

    def set_session_head(self, client_id: int, head: SessionHead, old: SessionHead | None) -> None:
        if old is not None:
            self.lru.discard((old.last, client_id))
        self.heads[client_id] = head
        self.lru.add((head.last, client_id))

    def delete_session(self, client_id: int, head: SessionHead) -> None:
        del self.heads[client_id]
        self.lru.discard((head.last, client_id))
        for k in [k for k in self.sessions if k[0] == client_id]:
            del self.sessions[k]

    def oldest_session(self) -> tuple[int, int] | None:
        return min(self.lru) if self.lru else None

    def session_meta(self) -> SessionMeta:
        return self.meta

    def set_session_meta(self, meta: SessionMeta) -> None:
        self.meta = meta

    def session_result(self, client_id: int, seq: int) -> bytes | None:
        return self.sessions.get((client_id, seq))

    def put_session_result(self, client_id: int, seq: int, result: bytes) -> None:
        self.sessions[(client_id, seq)] = result

    def forget_results(self, client_id: int, old_floor: int, new_floor: int) -> None:
        for k in [k for k in self.sessions if k[0] == client_id and k[1] < new_floor]:
            del self.sessions[k]

    @property
    def shards(self) -> ShardState | None:
        return self.shard_state

    def set_shards(self, st: ShardState) -> None:
        self.shard_state = st

    def delete_hashes(self, ranges: IntervalSet) -> int:
        gone = [k for k in self.data if key_hash(k) in ranges]
        for k in gone:
            del self.data[k]
        return len(gone)
