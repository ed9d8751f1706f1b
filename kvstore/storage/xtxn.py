"""Transactions across groups (two-phase commit): the commands' bodies, the rows they keep, and
their codecs. STANDARD LIBRARY ONLY (the simulator imports it; `xtxn_apply.py` applies them).

A cross-group transaction has a 16-byte id (`TxnId`: the coordinator's node id and a counter or
random number, unique), a *primary* group (the group of its first key: it holds the transaction
*record*, the commit point) and a *start* (a revision-valued reading of the coordinator's clock
when it began; every command of the transaction is refused once the group's last revision is
more than `MAX_AGE` past it, so a delayed duplicate can never act after the transaction's rows
were forgotten). Commands (op codes in `commands.Op`; none carries a client key of its own):

    PREPARE   id primary:u64 start:u64 n:u16 (klen:u16 key)* r:u8 [slen:u16 start elen:u16 end]
                                                                  (in each participant; r = 1:
                                                                  also lock the key range
                                                                  [start, end), end empty = no end;
                                                                  r = 2: then lease:u64, lock the
                                                                  keys attached to that lease;
                                                                  r = 3: then read:u8 leased, the
                                                                  keys' leased puts and whether to
                                                                  answer the keys' leases;
                                                                  r = 4: slen:u16 start elen:u16
                                                                  end read:u8 leased: r = 1's
                                                                  range lock and r = 3's leases)
    COMMIT    id at:u64 n:u16 write* [2:u8] [3:u8 leased]        (in each participant; tail 2:
              [4:u8 ranges]                                       delete every key prepared; tail
                                                                  3: the puts' leases; tail 4:
                                                                  also delete every key prepared in
                                                                  one of the ranges but the writes')
    ABORT     id                                                  (in each participant)
    RECORD    id start:u64 at:u64 result-len:u32 result n:u16 (group:u64 n:u16 write*)*
              [1:u8 lease:u64 renews:u64] [2:u8] [3:u8 leased]    (in the primary: the commit point;
              [4:u8 ranges]                                       tail 1: a lease's deletion; tail 2:
                                                                  every group's COMMIT deletes every
                                                                  key prepared; both: in that order;
                                                                  tail 3: the leases of every
                                                                  group's puts; tail 4: every
                                                                  group's COMMIT has these ranges,
                                                                  as COMMIT's tail 4)
    RESOLVE   id start:u64                                        (in the primary)
    FINALIZE  id group:u64                                        (in the primary; group 0: every
                                                                  participant applied its COMMIT,
                                                                  else that participant did)
    write     flags:u8 (bit 0: a put) klen:u16 key [vlen:u32 value]
    leased    n:u16 (klen:u16 key lease:u64 checked:u64)*        (puts that attach their key to a
                                                                  lease, `Leased`; level 7)
    ranges    n:u16 (slen:u16 start elen:u16 end)*                (1 to `MAX_KEYS`, each a valid
                                                                  `txn.check_range`, distinct)

Tails come in ascending tag order, each at most once; tags 3 and 4 never come with 1 or 2 (a
lease's deletion and a delete-prepared range delete put nothing and name no ranges).

Group ids (PREPARE's primary, FINALIZE's group, a RECORD's groups) are below `mvcc.MAX_GROUPS`.
The tail byte 2 (with no write listed; absent: not) is the compact form of a range delete and
of a lease's deletion (`XCmd.delete_prepared`; tag 2, after the RECORD's lease tail, tag 1, when
both are there: tags come in increasing order, each at most once): the COMMIT deletes every key
the transaction prepared in the group, and the RECORD says so of every group it lists. A range
or lease PREPARE may find up to `xtxn_apply.MAX_RANGE_KEYS` keys per group (a lease's: the
LEASE_PUT's limit, `leases.MAX_KEYS_PER_LEASE`, or more a move brought), far more than a
command may list (`MAX_KEYS`, and `MAX_BODY` bytes): the keys need not be listed, because the
group's intents fix them (its range lock refuses every insert into the range, its lease lock
every attachment to the lease, until the COMMIT or ABORT), so the commit point and the COMMITs
describe any deletion the PREPAREs accepted. The coordinator sends a lease's deletion as a
RECORD with both tails (`node/xtxn.record_command`); the codec also takes the lease tail alone.
Tail 4 (`XCmd.ranges`, level 6: a transaction with DELETE_RANGE operations, `storage/txn.py`)
is the same idea for a transaction's range deletes: its PREPAREs name its keys and lock the hull
of its ranges in every group, and its COMMIT makes the listed writes (of named keys, each its
final state) and deletes every other key it prepared in the group that lies in one of the
ranges the transaction's path ran; the RECORD carries the ranges for every group's COMMIT
(a resolver's too). Tail 4 never comes with tail 1 or 2.

Leased puts (`XCmd.leased`, feature level 7, `node.version.LEVEL_XTXN_LEASES`): a transaction's
put that attaches its key to a lease, as a LEASE_PUT does (`Leased`: key, lease, checked). A
PREPARE lists the leased puts on ANY path of the transaction whose key it names (distinct
triples: the two branches of a nested transaction may put one key with two leases), checks each
as a LEASE_PUT would and answers per triple whether it may attach (`encode_prepared_leases`),
and holds an *attach lock* (row `a`) on their leases until its COMMIT or ABORT: a deletion of
such a lease is refused LOCKED meanwhile. With `read_leases` it also answers the lease each key
it names is attached to (a LEASE compare is evaluated by the coordinator at R). A COMMIT lists
the leased puts among its writes (each a put it writes, each key once), a RECORD those of every
group (as one list: each key is in one group), and so does the COMMITTED record row (the
resolvers and the record sweep build the COMMITs from it). Tail 3 never comes with tail 1 or 2
(a lease's deletion and a range delete put nothing), but may come with tail 4: a transaction
with range deletes and leased puts (its PREPAREs: form 4, a range lock with the leases; the
answer is the lease answer then the keys found, `encode_prepared_found_leases`).

Rows (`row_*` give the keys; `check_rows` validates one, as a snapshot brings it):

    table mvcc.T_INTENTS:
    key                     -> intent   id primary:u64 start:u64 prepared:u64      (one per key)
    table mvcc.T_TXN:
    t + id                  -> prepared:u64 start:u64 (klen:u16 key)*  the keys of its intents here
    l + id                  -> intent slen:u16 start end   a range lock (a range delete's)
    e + id                  -> intent lease:u64   a lease lock (a lease deletion's: no LEASE_PUT of it)
    p + prepared:u64 + id   -> b""      the transactions by prepared revision (the minimum pending)
    r + id                  -> record   state:u8 start:u64 at:u64 result-len:u32 result n:u16
                                        (group:u64 n:u16 write*)* [2:u8] [3:u8 leased] [4:u8 ranges]
    a + id                  -> intent (lease:u64)+  an attach lock: the leases the transaction's
                                        PREPARE will attach keys to here (ascending, distinct)
    d + id                  -> start:u64  the transaction is done in this group (committed or aborted)
    w + lease:u64           -> intent   a lease's deletion waits here: its PREPARE met attach locks
                                        (the deletion's intent, `prepared` = when it was refused);
                                        new leased PREPAREs of the lease are refused LOCKED until
                                        `LEASE_WAIT_MS` past it (`xtxn_apply.lease_waiting`)
    g + expiry:u64 + id     -> b""      age-ordered index of the rows forgotten at `expiry`
    u + start:u64 + id      -> b""      a COMMITTED record not FINALIZED yet, by start (the record
                                        sweep finishes those whose coordinator died before FINALIZE)

Invariants: every decoder is total (raises `ValueError`, never another type) and bounded (at
most `MAX_KEYS` keys or writes per group, `MAX_GROUPS_PER_TXN` groups, `MAX_BODY` bytes);
`decode_*(encode_*(x)) == x`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from . import leases, mvcc
from .keylimit import MAX_KEY_SIZE
from .txn import MAX_TXN_BYTES, MAX_TXN_ITEMS, TxnResult, check_range, decode_txn_result, encode_txn_result

MAX_KEYS = MAX_TXN_ITEMS
"""The most keys (PREPARE) or writes (COMMIT, a group of a RECORD) per group and command."""
MAX_GROUPS_PER_TXN = MAX_TXN_ITEMS
"""The most participant groups a RECORD lists."""
MAX_BODY = 2 * MAX_TXN_BYTES + (1 << 20)
"""The largest body of any of these commands."""
MAX_AGE = 120_000 << mvcc.PHYSICAL_SHIFT
"""How long (in revision units: 120 s of HLC time) after its start a transaction's commands are
still applied. A coordinator gives up long before (its request's deadline)."""
ID_BYTES = 16

_ID = struct.Struct(">QQ")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_INTENT = struct.Struct(">16sQQQ")
INTENT_BYTES = _INTENT.size
_REC_HEAD = struct.Struct(">BQQ")
_W_PUT = 0x01


@dataclass(frozen=True, slots=True, order=True)
class TxnId:
    """A transaction's id: the coordinator's node id and a number unique on that node."""

    node: int
    n: int

    def encode(self) -> bytes:
        return _ID.pack(self.node, self.n)

    @staticmethod
    def decode(raw: bytes) -> TxnId:
        if len(raw) != ID_BYTES:
            raise ValueError(f"transaction id of {len(raw)} bytes (expected {ID_BYTES})")
        return TxnId(*_ID.unpack(raw))

    def __str__(self) -> str:
        return f"{self.node:x}-{self.n:x}"


@dataclass(frozen=True, slots=True)
class Intent:
    """A key's intent: transaction `txn` prepared it at revision `prepared` in this group; its
    record is in group `primary`; it started at `start`."""

    txn: TxnId
    primary: int
    start: int
    prepared: int

    def encode(self) -> bytes:
        return _INTENT.pack(self.txn.encode(), self.primary, self.start, self.prepared)

    @staticmethod
    def decode(raw: bytes) -> Intent:
        if len(raw) != _INTENT.size:
            raise ValueError(f"intent row of {len(raw)} bytes (expected {_INTENT.size})")
        tid, primary, start, prepared = _INTENT.unpack(raw)
        return Intent(TxnId.decode(tid), primary, start, prepared)


Write = tuple[bytes, "bytes | None"]
"""(key, new value; None: delete)."""
Leased = tuple[bytes, int, int]
"""(key, lease, checked): a put that attaches its key to the lease, with its LEASE_PUT `checked`
stamp (`leases.attach_refusal`); the put's value is its write's."""


@dataclass(slots=True)
class IntentProbe:
    """A read's request for the pending intents on the keys it reads, filled by the store from
    the read's OWN view (the same read transaction as its data): a COMMIT landing between the
    data and a separate look at the intents would drop the intent unseen while the data predates
    the commit (half of a transaction across groups in a linearizable scan). `rows`: at most
    `limit` (key, intent row) in key order, of the keys the read covers."""

    limit: int
    rows: list[tuple[bytes, bytes]] = field(default_factory=list)


class State(enum.IntEnum):
    COMMITTED = 1
    ABORTED = 2
    FINALIZED = 3
    """Committed, and every participant has applied its COMMIT (the writes are no longer kept)."""


_STATES = {int(s): s for s in State}


@dataclass(frozen=True, slots=True)
class Record:
    """A transaction record (in its primary group). COMMITTED: at revision `at` with `writes`
    per participant group and the client's `result`; ABORTED: nothing (at 0)."""

    state: State
    start: int
    at: int = 0
    result: TxnResult | None = None
    writes: tuple[tuple[int, tuple[Write, ...]], ...] = ()
    delete_prepared: bool = False
    """A range delete's (module docstring): each group's COMMIT deletes every key the
    transaction prepared there (`writes` lists the groups, with no write)."""
    leased: tuple[Leased, ...] = ()
    """The leased puts among `writes` (every group's; a key at most once)."""
    ranges: tuple[tuple[bytes, bytes], ...] = ()
    """A transaction's range deletes (tail 4): each group's COMMIT also deletes every key the
    transaction prepared there in one of them, except the keys its writes name."""

    def writes_of(self, group: int) -> tuple[Write, ...]:
        for g, ws in self.writes:
            if g == group:
                return ws
        return ()

    def leased_of(self, group: int) -> tuple[Leased, ...]:
        """The leased puts among the writes of participant `group`."""
        return leased_in(self.leased, self.writes_of(group))


def leased_in(leased: tuple[Leased, ...], writes: tuple[Write, ...]) -> tuple[Leased, ...]:
    """The entries of `leased` whose key `writes` lists (in `leased`'s order)."""
    keys = {k for k, _ in writes}
    return tuple(x for x in leased if x[0] in keys)


class XOp(enum.IntEnum):
    PREPARE = 7
    COMMIT = 8
    ABORT = 9
    RECORD = 10
    RESOLVE = 11
    FINALIZE = 12


@dataclass(frozen=True, slots=True)
class XCmd:
    """The body of one cross-group command (which fields matter depends on `op`, see the module
    docstring; the others are at their defaults, and `encode_body` refuses them otherwise)."""

    op: XOp
    txn: TxnId
    primary: int = 0
    start: int = 0
    at: int = 0
    keys: tuple[bytes, ...] = ()
    writes: tuple[Write, ...] = ()
    result: TxnResult | None = None
    groups: tuple[tuple[int, tuple[Write, ...]], ...] = ()
    lock: tuple[bytes, bytes] | None = None
    """PREPARE: a key range [start, end) to lock too (end b"": no end), every key in it found
    answered (a range delete)."""
    group: int = 0
    """FINALIZE: the participant that applied its COMMIT (0: every one)."""
    delete_prepared: bool = False
    """COMMIT (with no `writes`): delete every key the transaction prepared in the group; RECORD
    (every group listed with no write): so does each group's COMMIT. The compact form of a range
    delete and of a lease's deletion (module docstring)."""
    lease: int = 0
    """PREPARE: lock the keys attached to this lease in the group (every one found answered; a
    lease's deletion, no keys named). RECORD: the commit point of that deletion, in the lease's
    home group: it commits only while the lease is LIVE (and, with `renews`, still has that
    renew count: an expiry), and revokes and forgets the lease in the same apply
    (its record becomes the tombstone)."""
    renews: int = 0
    """RECORD with a lease: the renew count an expiry was decided on (0: a revoke, any)."""
    leased: tuple[Leased, ...] = ()
    """PREPARE: the leased puts on any path of the transaction whose key it names (distinct);
    COMMIT: those among its writes; RECORD: those among every group's writes (module docstring)."""
    read_leases: bool = False
    """PREPARE: also answer the lease each named key is attached to (a LEASE compare)."""
    ranges: tuple[tuple[bytes, bytes], ...] = ()
    """COMMIT, RECORD (tail 4, level 6): the range deletes a transaction's path ran; the COMMIT
    also deletes every key the transaction prepared in the group in one of them but those its
    writes name (`Record.ranges`)."""


# --- rows ----------------------------------------------------------------------------------------
def row_txn(t: TxnId) -> bytes:
    return b"t" + t.encode()


def row_pending(prepared: int, t: TxnId) -> bytes:
    return b"p" + _U64.pack(prepared) + t.encode()


def row_lock(t: TxnId) -> bytes:
    return b"l" + t.encode()


def row_lease_lock(t: TxnId) -> bytes:
    return b"e" + t.encode()


def row_attach_lock(t: TxnId) -> bytes:
    return b"a" + t.encode()


def row_lease_wait(lease_id: int) -> bytes:
    return b"w" + _U64.pack(lease_id)


LEASE_WAIT_MS = 5_000
"""How long a lease deletion's wait marker (row `w`) holds off new leased PREPAREs of its lease
(the transaction timeout, `node/xtxn.TXN_TIMEOUT_MS`: every attach lock held when the deletion
was refused is gone by then - committed, aborted, or resolved by whoever meets it)."""


def row_record(t: TxnId) -> bytes:
    return b"r" + t.encode()


def row_done(t: TxnId) -> bytes:
    return b"d" + t.encode()


def row_gc(expiry: int, t: TxnId) -> bytes:
    return b"g" + _U64.pack(expiry) + t.encode()


def encode_txn_keys(keys: tuple[bytes, ...] | list[bytes], prepared: int, start: int) -> bytes:
    """The `t` row: the keys of a transaction's intents in the group."""
    return _U64.pack(prepared) + _U64.pack(start) + b"".join(_U16.pack(len(k)) + k for k in keys)


def row_unfinished(start: int, t: TxnId) -> bytes:
    return b"u" + _U64.pack(start) + t.encode()


def decode_txn_keys(raw: bytes) -> tuple[int, int, list[bytes]]:
    """(prepared, start, keys) of a `t` row. Total: ValueError for anything malformed."""
    b = _Buf(bytes(raw), 0)
    prepared = b.u(_U64, "the prepared revision")
    start = b.u(_U64, "the start")
    _check_rev("prepared revision", prepared)
    _check_rev("start", start)
    out: list[bytes] = []
    while b.pos < len(b.data):
        out.append(b.key())
    return prepared, start, out


_ROW_ID = 1 + ID_BYTES
_ROW_REV_ID = 1 + 8 + ID_BYTES


def check_rows(table: int, key: bytes, value: bytes) -> None:
    """Validate one row of `mvcc.T_TXN` or `mvcc.T_INTENTS` as a snapshot brings it (the row
    table in the module docstring): its key's shape and its value decode, so nothing that reads
    the rows later (`min_pending`, the GC, the read rule, the sweep) meets a malformed one.
    Total: ValueError for anything malformed (the caller refuses the whole snapshot)."""
    key, value = bytes(key), bytes(value)
    if table == mvcc.T_INTENTS:
        _check_key(key)
        Intent.decode(value)
        return
    if table != mvcc.T_TXN:
        raise ValueError(f"table {table} holds no transaction rows")
    kind = key[:1]
    if kind in (b"t", b"l", b"e", b"r", b"d", b"a"):
        if len(key) != _ROW_ID:
            raise ValueError(f"{kind.decode()} row key of {len(key)} bytes (expected {_ROW_ID})")
        if kind == b"t":
            decode_txn_keys(value)
        elif kind == b"l":
            decode_range_lock(value)
        elif kind == b"e":
            decode_lease_lock(value)
        elif kind == b"a":
            decode_attach_lock(value)
        elif kind == b"r":
            decode_record(value)
        elif len(value) != _U64.size:
            raise ValueError(f"done row of {len(value)} bytes (expected {_U64.size})")
        else:
            _check_rev("start", _U64.unpack(value)[0])
    elif kind == b"w":
        if len(key) != 1 + _U64.size:
            raise ValueError(f"w row key of {len(key)} bytes (expected {1 + _U64.size})")
        check_lease(_U64.unpack_from(key, 1)[0])
        Intent.decode(value)
    elif kind in (b"p", b"g", b"u"):
        if len(key) != _ROW_REV_ID:
            raise ValueError(f"{kind.decode()} row key of {len(key)} bytes (expected {_ROW_REV_ID})")
        _check_rev("revision", _U64.unpack_from(key, 1)[0])
        if value:
            raise ValueError(f"{kind.decode()} row with a value of {len(value)} bytes (expected none)")
    else:
        raise ValueError(f"unknown transaction row kind {kind!r}")


# --- codec helpers -------------------------------------------------------------------------------
class _Buf:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ValueError(f"truncated in {what}")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def u(self, s: struct.Struct, what: str) -> int:
        return int(s.unpack(self.take(s.size, what))[0])

    def key(self) -> bytes:
        n = self.u(_U16, "a key's length")
        if not 0 < n <= MAX_KEY_SIZE:
            raise ValueError(f"key of {n} bytes (must be 1 to {MAX_KEY_SIZE})")
        return self.take(n, "a key")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} trailing bytes")


def _check_key(k: bytes) -> None:
    if not 0 < len(k) <= MAX_KEY_SIZE:
        raise ValueError(f"key of {len(k)} bytes (must be 1 to {MAX_KEY_SIZE})")


def _check_range(lo: bytes, hi: bytes) -> None:
    if len(lo) > MAX_KEY_SIZE or len(hi) > MAX_KEY_SIZE:
        raise ValueError(f"range bound longer than {MAX_KEY_SIZE} bytes")
    if hi and hi <= lo:
        raise ValueError("range end at or before its start")


def in_range(key: bytes, lock: tuple[bytes, bytes]) -> bool:
    lo, hi = lock
    return key >= lo and (not hi or key < hi)


def overlaps(a: tuple[bytes, bytes], b: tuple[bytes, bytes]) -> bool:
    return (not a[1] or b[0] < a[1]) and (not b[1] or a[0] < b[1])


def encode_range_lock(intent: Intent, lock: tuple[bytes, bytes]) -> bytes:
    lo, hi = lock
    return intent.encode() + _U16.pack(len(lo)) + lo + hi


def decode_range_lock(raw: bytes) -> tuple[Intent, tuple[bytes, bytes]]:
    """Total: ValueError for anything malformed."""
    b = _Buf(bytes(raw), 0)
    intent = Intent.decode(b.take(_INTENT.size, "the intent"))
    lo = b.take(b.u(_U16, "the range start's length"), "the range start")
    hi = bytes(raw[b.pos:])
    _check_range(lo, hi)
    return intent, (lo, hi)


def encode_lease_lock(intent: Intent, lease_id: int) -> bytes:
    return intent.encode() + _U64.pack(lease_id)


def decode_lease_lock(raw: bytes) -> tuple[Intent, int]:
    """Total: ValueError for anything malformed."""
    b = _Buf(bytes(raw), 0)
    intent = Intent.decode(b.take(_INTENT.size, "the intent"))
    lid = check_lease(b.u(_U64, "the lease id"))
    b.end()
    return intent, lid


def encode_attach_lock(intent: Intent, lease_ids: tuple[int, ...]) -> bytes:
    """An attach lock's row: the intent and the leases (ascending, distinct, at least one)."""
    _check_attach(lease_ids)
    return intent.encode() + b"".join(_U64.pack(lid) for lid in lease_ids)


def decode_attach_lock(raw: bytes) -> tuple[Intent, tuple[int, ...]]:
    """Total: ValueError for anything malformed."""
    b = _Buf(bytes(raw), 0)
    intent = Intent.decode(b.take(_INTENT.size, "the intent"))
    if (len(b.data) - b.pos) % _U64.size:
        raise ValueError("an attach lock's leases are not whole u64s")
    ids = tuple(b.u(_U64, "a lease id") for _ in range((len(b.data) - b.pos) // _U64.size))
    _check_attach(ids)
    return intent, ids


def _check_attach(ids: tuple[int, ...]) -> None:
    if not ids or list(ids) != sorted(set(ids)):
        raise ValueError("an attach lock names one or more leases, distinct and ascending")
    for lid in ids:
        check_lease(lid)


REFUSAL_NONE = 0
REFUSAL_NOT_FOUND = 1
REFUSAL_TOO_MANY = 2
_REFUSALS = (REFUSAL_NONE, REFUSAL_NOT_FOUND, REFUSAL_TOO_MANY)


def encode_prepared_leases(key_leases: tuple[int, ...], refusals: tuple[int, ...]) -> bytes:
    """A PREPARE's answer (`ApplyResult.current`) with leased puts or `read_leases`: the lease
    of each key it names (none unless asked: 0 for a key attached to none), then per leased put
    it lists whether it may attach (`REFUSAL_*`)."""
    if len(key_leases) > MAX_KEYS or len(refusals) > MAX_TXN_ITEMS:
        raise ValueError("a PREPARE's lease answer is too long")
    if any(r not in _REFUSALS for r in refusals) or any(not 0 <= x <= leases.MAX_LEASE_ID for x in key_leases):
        raise ValueError("a PREPARE's lease answer is malformed")
    return (_U16.pack(len(key_leases)) + b"".join(_U64.pack(x) for x in key_leases)
            + _U16.pack(len(refusals)) + bytes(refusals))


def decode_prepared_leases(raw: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Total: ValueError for anything malformed."""
    b = _Buf(bytes(raw), 0)
    out = _dec_prepared_leases(b)
    b.end()
    return out


def encode_prepared_found_leases(found: list[bytes], key_leases: tuple[int, ...],
                                 refusals: tuple[int, ...]) -> bytes:
    """A form-4 PREPARE's answer (a range lock with leased puts or `read_leases`): the lease
    answer (`encode_prepared_leases`), then the keys found in the range (`encode_found`)."""
    return encode_prepared_leases(key_leases, refusals) + encode_found(found)


def decode_prepared_found_leases(raw: bytes) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...]]:
    """(found, key leases, refusals) of `encode_prepared_found_leases`. Total: ValueError for
    anything malformed."""
    b = _Buf(bytes(raw), 0)
    ids, refusals = _dec_prepared_leases(b)
    return decode_found(b.data[b.pos:]), ids, refusals


def _dec_prepared_leases(b: _Buf) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = b.u(_U16, "the number of keys")
    if n > MAX_KEYS:
        raise ValueError(f"lease answer of {n} keys (at most {MAX_KEYS})")
    ids = tuple(b.u(_U64, "a key's lease") for _ in range(n))
    if any(x > leases.MAX_LEASE_ID for x in ids):
        raise ValueError("a key's lease is out of range")
    m = b.u(_U16, "the number of leased puts")
    if m > MAX_TXN_ITEMS:
        raise ValueError(f"lease answer of {m} leased puts (at most {MAX_TXN_ITEMS})")
    refusals = tuple(b.take(m, "the refusals"))
    if any(r not in _REFUSALS for r in refusals):
        raise ValueError("unknown leased put refusal")
    return ids, refusals


def check_lease(lease_id: int) -> int:
    """`lease_id` if it is a valid lease id (`leases.check_id`), else ValueError."""
    return leases.check_id(lease_id)


def encode_found(keys: list[bytes]) -> bytes:
    """A range PREPARE's answer (`ApplyResult.current`): the keys it found in the range."""
    return b"".join(_U16.pack(len(k)) + k for k in keys)


def decode_found(raw: bytes) -> list[bytes]:
    b = _Buf(bytes(raw), 0)
    out: list[bytes] = []
    while b.pos < len(b.data):
        out.append(b.key())
    return out


def _check_rev(name: str, n: int) -> None:
    if not 0 <= n <= mvcc.REVISION_MAX:
        raise ValueError(f"{name} {n} is out of range")


def _check_group(name: str, g: int) -> None:
    if not 0 <= g < mvcc.MAX_GROUPS:
        raise ValueError(f"{name} {g} is out of range (0 to {mvcc.MAX_GROUPS - 1})")


_TAIL_LEASE = 1
"""The tail tag of a RECORD of a lease's deletion (then lease:u64 renews:u64); before tag 2."""
_TAIL_DELETE_PREPARED = 2
"""The tail tag of a COMMIT, RECORD or record row that deletes every key prepared (after a
RECORD's lease tail, if any)."""
_TAIL_LEASED = 3
"""The tail tag of a COMMIT, RECORD or record row with leased puts (the last tail; never with
tag 1 or 2)."""
_LEASED_ENTRY = struct.Struct(">QQ")
"""A leased put's lease:u64 checked:u64 (after its key, in every `leased` list)."""


_TAIL_RANGES = 4
"""The tail tag of a COMMIT, RECORD or record row with a transaction's range deletes (then the
ranges; the last tail, never with tag 1 or 2)."""
Ranges = tuple[tuple[bytes, bytes], ...]


def _enc_all(flag: bool, out: list[bytes]) -> None:
    if flag:
        out.append(_U8.pack(_TAIL_DELETE_PREPARED))


def _dec_all(b: _Buf) -> bool:
    """The optional delete-prepared tail (absent: False; another byte is left for the next
    tail's reader, `_dec_leased`)."""
    if b.pos == len(b.data) or b.data[b.pos] != _TAIL_DELETE_PREPARED:
        return False
    b.pos += 1
    return True


def _check_ranges(ranges: Ranges) -> None:
    if not 0 < len(ranges) <= MAX_KEYS:
        raise ValueError(f"{len(ranges)} ranges (must be 1 to {MAX_KEYS})")
    if len(set(ranges)) != len(ranges):
        raise ValueError("a range is listed twice")
    for lo, hi in ranges:
        try:
            check_range(lo, hi)
        except ValueError as err:
            raise ValueError(str(err)) from None


def _enc_ranges(ranges: Ranges, out: list[bytes]) -> None:
    """The optional ranges tail (tag 4: none when `ranges` is empty; the last tail)."""
    if ranges:
        _check_ranges(ranges)
        out += (_U8.pack(_TAIL_RANGES), _U16.pack(len(ranges)))
        for lo, hi in ranges:
            out += (_U16.pack(len(lo)), lo, _U16.pack(len(hi)), hi)


def _dec_ranges(b: _Buf) -> Ranges:
    """The optional ranges tail (absent: no range; an unknown tag is refused; a tag-4 tail must
    list 1 to `MAX_KEYS` distinct valid ranges)."""
    if b.pos == len(b.data):
        return ()
    if b.u(_U8, "the tail's tag") != _TAIL_RANGES:
        raise ValueError("unknown tail")
    n = b.u(_U16, "the number of ranges")
    if not 0 < n <= MAX_KEYS:
        raise ValueError(f"{n} ranges (must be 1 to {MAX_KEYS})")
    out: list[tuple[bytes, bytes]] = []
    for _ in range(n):
        lo = b.take(b.u(_U16, "a range start's length"), "a range start")
        hi = b.take(b.u(_U16, "a range end's length"), "a range end")
        out.append((lo, hi))
    rs = tuple(out)
    _check_ranges(rs)
    return rs


def _enc_leased_list(ls: tuple[Leased, ...], out: list[bytes]) -> None:
    if len(ls) > MAX_TXN_ITEMS:
        raise ValueError(f"{len(ls)} leased puts (at most {MAX_TXN_ITEMS})")
    out.append(_U16.pack(len(ls)))
    for k, lid, checked in ls:
        _check_key(k)
        check_lease(lid)
        _check_checked(checked)
        out += (_U16.pack(len(k)), k, _LEASED_ENTRY.pack(lid, checked))


def _dec_leased_list(b: _Buf) -> tuple[Leased, ...]:
    n = b.u(_U16, "the number of leased puts")
    if n > MAX_TXN_ITEMS:
        raise ValueError(f"{n} leased puts (at most {MAX_TXN_ITEMS})")
    out: list[Leased] = []
    for _ in range(n):
        k = b.key()
        lid = check_lease(b.u(_U64, "a put's lease"))
        checked = _check_checked(b.u(_U64, "a put's checked revision"))
        out.append((k, lid, checked))
    return tuple(out)


def _check_checked(checked: int) -> int:
    if type(checked) is not int or not 0 <= checked <= leases.MAX_CHECKED:
        raise ValueError(f"a leased put's checked revision {checked!r} is out of range")
    return checked


def _enc_leased(ls: tuple[Leased, ...], out: list[bytes]) -> None:
    """The optional leased tail (tag 3: none when `ls` is empty)."""
    if ls:
        out.append(_U8.pack(_TAIL_LEASED))
        _enc_leased_list(ls, out)


def _dec_leased(b: _Buf) -> tuple[Leased, ...]:
    """The optional leased tail (absent: no leased put; another byte is left for the next
    tail's reader, `_dec_ranges`, which refuses an unknown tag; an empty list is not canonical:
    refused)."""
    if b.pos == len(b.data) or b.data[b.pos] != _TAIL_LEASED:
        return ()
    b.pos += 1
    ls = _dec_leased_list(b)
    if not ls:
        raise ValueError("a leased tail lists no leased put")
    return ls


def _check_ranges_alone(ranges: Ranges, exclusive: bool) -> None:
    """A COMMIT's, RECORD's or record's ranges never come with a delete-prepared or lease tail
    (`exclusive`)."""
    if ranges and exclusive:
        raise ValueError("ranges never come with a delete-prepared range or a lease's deletion")


def _check_leased(ls: tuple[Leased, ...], groups: tuple[tuple[int, tuple[Write, ...]], ...],
                  exclusive: bool) -> None:
    """A COMMIT's, RECORD's or record's leased puts: each is a put the writes list (`groups`),
    each key once; none alongside a delete-prepared or lease tail (`exclusive`)."""
    if not ls:
        return
    if exclusive:
        raise ValueError("leased puts never come with a range or lease deletion")
    puts = {k for _g, ws in groups for k, v in ws if v is not None}
    keys = [k for k, _l, _c in ls]
    if len(set(keys)) != len(keys):
        raise ValueError("a key is put with a lease twice")
    if not set(keys) <= puts:
        raise ValueError("a leased put's key is not among the puts")


def _check_all(flag: bool, groups: tuple[tuple[int, tuple[Write, ...]], ...]) -> None:
    if flag and any(ws for _g, ws in groups):
        raise ValueError("a delete-prepared command lists no write")


def _enc_writes(ws: tuple[Write, ...], out: list[bytes]) -> None:
    if len(ws) > MAX_KEYS:
        raise ValueError(f"{len(ws)} writes (at most {MAX_KEYS})")
    seen: set[bytes] = set()
    out.append(_U16.pack(len(ws)))
    for k, v in ws:
        _check_key(k)
        if k in seen:
            raise ValueError(f"key {k!r} written twice")
        seen.add(k)
        out += (_U8.pack(_W_PUT if v is not None else 0), _U16.pack(len(k)), k)
        if v is not None:
            out += (_U32.pack(len(v)), v)


def _dec_writes(b: _Buf) -> tuple[Write, ...]:
    n = b.u(_U16, "the number of writes")
    if n > MAX_KEYS:
        raise ValueError(f"{n} writes (at most {MAX_KEYS})")
    out: list[Write] = []
    seen: set[bytes] = set()
    for _ in range(n):
        flags = b.u(_U8, "a write's flags")
        if flags & ~_W_PUT:
            raise ValueError(f"write with unknown flags {flags:#x}")
        k = b.key()
        if k in seen:
            raise ValueError(f"key {k!r} written twice")
        seen.add(k)
        v = b.take(b.u(_U32, "a value's length"), "a value") if flags & _W_PUT else None
        out.append((k, v))
    return tuple(out)


def _enc_groups(gs: tuple[tuple[int, tuple[Write, ...]], ...], out: list[bytes]) -> None:
    if len(gs) > MAX_GROUPS_PER_TXN:
        raise ValueError(f"{len(gs)} groups (at most {MAX_GROUPS_PER_TXN})")
    ids = [g for g, _ in gs]
    if ids != sorted(set(ids)):
        raise ValueError("groups must be distinct and in increasing order")
    for g in ids:
        _check_group("group", g)
    out.append(_U16.pack(len(gs)))
    for g, ws in gs:
        out.append(_U64.pack(g))
        _enc_writes(ws, out)


def _dec_groups(b: _Buf) -> tuple[tuple[int, tuple[Write, ...]], ...]:
    n = b.u(_U16, "the number of groups")
    if n > MAX_GROUPS_PER_TXN:
        raise ValueError(f"{n} groups (at most {MAX_GROUPS_PER_TXN})")
    out: list[tuple[int, tuple[Write, ...]]] = []
    for _ in range(n):
        g = b.u(_U64, "a group id")
        _check_group("group", g)
        if out and g <= out[-1][0]:
            raise ValueError("groups must be distinct and in increasing order")
        out.append((g, _dec_writes(b)))
    return tuple(out)


def _enc_result(r: TxnResult | None, out: list[bytes]) -> None:
    raw = b"" if r is None else encode_txn_result(r)
    out += (_U32.pack(len(raw)), raw)


def _dec_result(b: _Buf) -> TxnResult | None:
    raw = b.take(b.u(_U32, "the result's length"), "the result")
    if not raw:
        return None
    r, pos = decode_txn_result(raw, 0)
    if pos != len(raw):
        raise ValueError("the result has trailing bytes")
    return r


# --- command bodies ------------------------------------------------------------------------------
def _check_prepare_leased(keys: tuple[bytes, ...], leased: tuple[Leased, ...], other: bool) -> None:
    """A PREPARE's leased puts / lease read: keys named (no lease deletion: `other`; a range
    lock may come too, form 4), each leased put's key among them, no triple twice."""
    if other or not keys:
        raise ValueError("leased puts and lease reads come with named keys only")
    if len(set(leased)) != len(leased):
        raise ValueError("a PREPARE lists a leased put twice")
    named = set(keys)
    if any(k not in named for k, _l, _c in leased):
        raise ValueError("a PREPARE's leased put names a key it does not prepare")


def encode_body(c: XCmd) -> bytes:
    """The body of `c` (after the command header). ValueError if it breaks the invariants."""
    out: list[bytes] = [c.txn.encode()]
    defaults = XCmd(c.op, c.txn)
    if c.op == XOp.PREPARE:
        _check_rev("start", c.start)
        if not (len(c.keys) > 0 or c.lock is not None or c.lease) or len(c.keys) > MAX_KEYS:
            raise ValueError(f"PREPARE of {len(c.keys)} keys (must be 1 to {MAX_KEYS}, or 0 with a range or lease)")
        if len(set(c.keys)) != len(c.keys):
            raise ValueError("PREPARE names a key twice")
        if c.lease and (c.keys or c.lock is not None):
            raise ValueError("a lease's PREPARE names no keys and no range")
        if c != XCmd(c.op, c.txn, c.primary, c.start, keys=c.keys, lock=c.lock, lease=c.lease, leased=c.leased,
                     read_leases=c.read_leases):
            raise ValueError("PREPARE carries fields it does not use")
        if c.leased or c.read_leases:
            _check_prepare_leased(c.keys, c.leased, bool(c.lease))
        _check_group("primary group", c.primary)
        out += (_U64.pack(c.primary), _U64.pack(c.start), _U16.pack(len(c.keys)))
        for k in c.keys:
            _check_key(k)
            out += (_U16.pack(len(k)), k)
        if c.lease:
            out += (_U8.pack(2), _U64.pack(check_lease(c.lease)))
        elif c.leased or c.read_leases:
            if c.lock is None:
                out.append(_U8.pack(3))
            else:  # form 4: the range lock, then form 3's leases
                lo, hi = c.lock
                _check_range(lo, hi)
                out += (_U8.pack(4), _U16.pack(len(lo)), lo, _U16.pack(len(hi)), hi)
            out.append(_U8.pack(1 if c.read_leases else 0))
            _enc_leased_list(c.leased, out)
        elif c.lock is None:
            out.append(_U8.pack(0))
        else:
            lo, hi = c.lock
            _check_range(lo, hi)
            out += (_U8.pack(1), _U16.pack(len(lo)), lo, _U16.pack(len(hi)), hi)
    elif c.op == XOp.COMMIT:
        _check_rev("commit revision", c.at)
        if c != XCmd(c.op, c.txn, at=c.at, writes=c.writes, delete_prepared=c.delete_prepared, leased=c.leased,
                     ranges=c.ranges):
            raise ValueError("COMMIT carries fields it does not use")
        _check_all(c.delete_prepared, ((0, c.writes),))
        _check_leased(c.leased, ((0, c.writes),), c.delete_prepared)
        _check_ranges_alone(c.ranges, c.delete_prepared)
        out.append(_U64.pack(c.at))
        _enc_writes(c.writes, out)
        _enc_all(c.delete_prepared, out)
        _enc_leased(c.leased, out)
        _enc_ranges(c.ranges, out)
    elif c.op == XOp.ABORT:
        if c != defaults:
            raise ValueError(f"{c.op.name} carries nothing but the transaction id")
    elif c.op == XOp.FINALIZE:
        if c != XCmd(c.op, c.txn, group=c.group):
            raise ValueError("FINALIZE carries the transaction id and a group only")
        _check_group("group", c.group)
        out.append(_U64.pack(c.group))
    elif c.op == XOp.RECORD:
        _check_rev("start", c.start)
        _check_rev("commit revision", c.at)
        if c != XCmd(c.op, c.txn, start=c.start, at=c.at, result=c.result, groups=c.groups, lease=c.lease,
                     renews=c.renews, delete_prepared=c.delete_prepared, leased=c.leased, ranges=c.ranges) \
                or (c.renews and not c.lease) or not 0 <= c.renews < 1 << 64:
            raise ValueError("RECORD carries fields it does not use")
        _check_all(c.delete_prepared, c.groups)
        _check_leased(c.leased, c.groups, c.delete_prepared or bool(c.lease))
        _check_ranges_alone(c.ranges, c.delete_prepared or bool(c.lease))
        out += (_U64.pack(c.start), _U64.pack(c.at))
        _enc_result(c.result, out)
        _enc_groups(c.groups, out)
        if c.lease:
            out += (_U8.pack(_TAIL_LEASE), _U64.pack(check_lease(c.lease)), _U64.pack(c.renews))
        _enc_all(c.delete_prepared, out)
        _enc_leased(c.leased, out)
        _enc_ranges(c.ranges, out)
    elif c.op == XOp.RESOLVE:
        _check_rev("start", c.start)
        if c != XCmd(c.op, c.txn, start=c.start):
            raise ValueError("RESOLVE carries fields it does not use")
        out.append(_U64.pack(c.start))
    else:
        raise ValueError(f"unknown cross-group op {c.op!r}")
    body = b"".join(out)
    if len(body) > MAX_BODY:
        raise ValueError(f"{c.op.name} of {len(body)} bytes (at most {MAX_BODY})")
    return body


def decode_body(op: XOp, data: bytes, pos: int = 0) -> XCmd:
    """Decode the body of a command of kind `op` from `data[pos:]` (all of it). Total: raises
    ValueError for anything malformed."""
    if len(data) - pos > MAX_BODY:
        raise ValueError(f"{op.name} of {len(data) - pos} bytes (at most {MAX_BODY})")
    b = _Buf(data, pos)
    t = TxnId.decode(b.take(ID_BYTES, "the transaction id"))
    c: XCmd
    if op == XOp.PREPARE:
        primary = b.u(_U64, "the primary group")
        _check_group("primary group", primary)
        start = b.u(_U64, "the start")
        _check_rev("start", start)
        n = b.u(_U16, "the number of keys")
        if n > MAX_KEYS:
            raise ValueError(f"PREPARE of {n} keys (at most {MAX_KEYS})")
        keys = tuple(b.key() for _ in range(n))
        if len(set(keys)) != n:
            raise ValueError("PREPARE names a key twice")
        flag = b.u(_U8, "the range flag")
        lock: tuple[bytes, bytes] | None = None
        lease = 0
        leased: tuple[Leased, ...] = ()
        read = False
        if flag in (1, 4):
            lo = b.take(b.u(_U16, "the range start's length"), "the range start")
            hi = b.take(b.u(_U16, "the range end's length"), "the range end")
            _check_range(lo, hi)
            lock = (lo, hi)
        if flag in (3, 4):
            r = b.u(_U8, "the read-leases flag")
            if r > 1:
                raise ValueError(f"read-leases flag {r}")
            read = r == 1
            leased = _dec_leased_list(b)
            if not (read or leased):
                raise ValueError("a PREPARE's lease form with no leased put and no lease read")
            _check_prepare_leased(keys, leased, False)
        elif flag == 2:
            lease = check_lease(b.u(_U64, "the lease id"))
            if n:
                raise ValueError("a lease's PREPARE names no keys")
        elif flag not in (0, 1, 4):
            raise ValueError(f"unknown range flag {flag}")
        if not n and lock is None and not lease:
            raise ValueError("PREPARE of no key and no range")
        c = XCmd(op, t, primary, start, keys=keys, lock=lock, lease=lease, leased=leased, read_leases=read)
    elif op == XOp.COMMIT:
        at = b.u(_U64, "the commit revision")
        _check_rev("commit revision", at)
        writes = _dec_writes(b)
        every = _dec_all(b)
        _check_all(every, ((0, writes),))
        leased = _dec_leased(b)
        _check_leased(leased, ((0, writes),), every)
        ranges = _dec_ranges(b)
        _check_ranges_alone(ranges, every)
        c = XCmd(op, t, at=at, writes=writes, delete_prepared=every, leased=leased, ranges=ranges)
    elif op == XOp.ABORT:
        c = XCmd(op, t)
    elif op == XOp.FINALIZE:
        group = b.u(_U64, "the group")
        _check_group("group", group)
        c = XCmd(op, t, group=group)
    elif op == XOp.RECORD:
        start = b.u(_U64, "the start")
        at = b.u(_U64, "the commit revision")
        _check_rev("start", start)
        _check_rev("commit revision", at)
        result, groups = _dec_result(b), _dec_groups(b)
        lease = renews = 0
        if b.pos < len(b.data) and b.data[b.pos] == _TAIL_LEASE:
            b.pos += 1
            lease = check_lease(b.u(_U64, "the lease id"))
            renews = b.u(_U64, "the renew count")
        every = _dec_all(b)
        _check_all(every, groups)
        leased = _dec_leased(b)
        _check_leased(leased, groups, every or bool(lease))
        ranges = _dec_ranges(b)
        _check_ranges_alone(ranges, every or bool(lease))
        c = XCmd(op, t, start=start, at=at, result=result, groups=groups, lease=lease, renews=renews,
                 delete_prepared=every, leased=leased, ranges=ranges)
    elif op == XOp.RESOLVE:
        start = b.u(_U64, "the start")
        _check_rev("start", start)
        c = XCmd(op, t, start=start)
    else:
        raise ValueError(f"unknown cross-group op {op!r}")
    b.end()
    return c


# --- records -------------------------------------------------------------------------------------
def encode_record(r: Record) -> bytes:
    _check_rev("start", r.start)
    _check_rev("commit revision", r.at)
    _check_all(r.delete_prepared, r.writes)
    _check_leased(r.leased, r.writes, r.delete_prepared)
    _check_ranges_alone(r.ranges, r.delete_prepared)
    out: list[bytes] = [_REC_HEAD.pack(int(r.state), r.start, r.at)]
    _enc_result(r.result, out)
    _enc_groups(r.writes, out)
    _enc_all(r.delete_prepared, out)
    _enc_leased(r.leased, out)
    _enc_ranges(r.ranges, out)
    return b"".join(out)


def decode_record(raw: bytes) -> Record:
    """Total: ValueError for anything malformed."""
    if len(raw) > MAX_BODY:
        raise ValueError(f"record of {len(raw)} bytes (at most {MAX_BODY})")
    b = _Buf(raw, 0)
    st = b.u(_U8, "the record's state")
    state = _STATES.get(st)
    if state is None:
        raise ValueError(f"record of unknown state {st}")
    start = b.u(_U64, "the start")
    at = b.u(_U64, "the commit revision")
    _check_rev("start", start)
    _check_rev("commit revision", at)
    res = _dec_result(b)
    groups = _dec_groups(b)
    every = _dec_all(b)
    _check_all(every, groups)
    leased = _dec_leased(b)
    _check_leased(leased, groups, every)
    ranges = _dec_ranges(b)
    _check_ranges_alone(ranges, every)
    b.end()
    return Record(state, start, at, res, groups, every, leased, ranges)


# --- a lock met by a write -----------------------------------------------------------------------
LOCKED = "key locked by a transaction in progress"
"""The error text's start of a command refused because a key it names holds another transaction's
intent (nothing changed, nothing cached: retry after the transaction resolves)."""


def encode_lock(key: bytes, intent: Intent) -> bytes:
    """The `current` of a LOCKED result: which key, and its intent."""
    return _U16.pack(len(key)) + key + intent.encode()


def decode_lock(raw: bytes) -> tuple[bytes, Intent]:
    """Total: ValueError for anything malformed."""
    b = _Buf(bytes(raw), 0)
    key = b.key()
    intent = Intent.decode(b.take(_INTENT.size, "the intent"))
    b.end()
    return key, intent
