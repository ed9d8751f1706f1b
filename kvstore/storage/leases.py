"""Leases (TTL) in a group's state machine: ids, records, command bodies, apply rules. STANDARD
LIBRARY ONLY (the simulator applies them on `DictState` / `MemoryNodeStore`).

Where a lease lives. A lease id is an int64 in 1..2**63-1 whose low 12 bits (`ID_GROUP_BITS`, the
same width as a revision's group slot) name its *home* data group: any node routes a lease
operation by the id alone. The home group's state machine holds the lease's record; keys attached
to it may live in any data group, each of which keeps its own attachment rows.

Rows (one table of the group's `mvcc.Rows`, `T_LEASES`: LMDB sub-database `leases`, carried by
raft snapshots as tag `snapfile.TAG_LEASES`; group prefix omitted):

    b"L" id:u64          -> record: ttl_s:u64 remaining_ms:u64 renews:u64 state:u8   (home group)
    b"A" id:u64 h:16     -> key        (key `key` is attached to lease id; h = BLAKE2b-128(key))
    b"K" h:16            -> id:u64     (the lease key `key` is attached to; at most one)
    b"X" id:u64          -> expiry:u64 (tombstone: the lease was revoked; refused here until forgotten)
    b"x" expiry:u64 id:u64 -> b""      (the tombstones by expiry: the age index the GC walks)
    b"C" id:u64          -> n:u64      (how many keys are attached to lease id here: its "A" rows;
                                        absent when none; kept by `attach`, `detach`, `forget_keys`,
                                        `forget_attached`, the only writers of "A" rows)

Commands (`commands.Op` codes 20..29, gated by `node.version.LEVEL_LEASES`, STATUS and ORPHAN
by `LEVEL_LEASES_2`: level-4 binaries without them exist; body = `BODY`:
lease_id:u64 ttl_s:u64 renews:u64 remaining_ms:u64, fields a kind does not use are 0; LEASE_PUT's
body is `PUT_BODY`: those four then checked:u64, and the command then carries key_len:u32 key
value. Leases are feature level 4, which no release has shipped, so LEASE_PUT's body changed in
place (no older format is decoded):

- GRANT(id, ttl_s): home group only; a record (remaining = ttl, renews = 1). Refused when the
  id is live, revoked (tombstone) or not homed here.
- RENEW(id): a keep-alive, through the log: remaining := ttl, renews += 1 (result `found`, and
  `current` = ttl_s:u64). An unknown or revoked lease: not found (no error).
- CHECKPOINT(id, renews, remaining_ms): the home leader's remaining TTL, applied only if the
  record's `renews` still equals `renews` (a renew after the leader read the record wins).
- EXPIRE(id, renews): the home leader's expiry, applied only if `renews` still matches (a renew
  that committed first cancels it); then as REVOKE.
- REVOKE(id): the record becomes REVOKED and every key attached to the lease IN THIS GROUP is
  deleted at one revision (DELETE events in the change log, so watches see them). REVOKE, EXPIRE
  and DROP are refused at apply (LOCKED, nothing changed, not cached: `machine._locked`) while a
  key attached to the lease in the group holds a cross-group transaction's intent or lies in a
  range lock; the lease clock and the DROP sender retry, the client's revoke gets a retryable
  error.
- DROP(id): in any group: the keys attached here are deleted at one revision, and the group
  keeps a tombstone so that a LEASE_PUT of that lease arriving later is refused. Like REVOKE and
  EXPIRE it waits (refused, retried) while an attached key is in a moving range (below).
- FORGET(id): home group: a REVOKED record whose DROPs every other data group applied becomes a
  tombstone.
- STATUS(id): home group: changes nothing; its result is the lease's `Status` (`home_status`),
  the orphan sweep's question.
- ORPHAN(id, until): in a group other than the home: a DROP applied only while the group's
  revision is `TOMB_MARGIN` before `until` (`orphan_drop`); its body is PUT_BODY's size, `until`
  in the place of `checked`.
- PUT(id, key, value, checked): a put that attaches `key` to the lease (detaching it from any
  other). Refused (definite, "requested lease not found") in the home group unless the record is
  LIVE; in any other group while it holds the lease's tombstone, and when `checked` (a
  revision-valued HLC reading taken before the lease was seen LIVE at its home; 0: never
  checked) is more than `LEASE_PUT_MAX_AGE` behind the group's last revision (below);
  refused (definite, `TOO_MANY_KEYS`) when it
  would attach a key to a lease that has `MAX_KEYS_PER_LEASE` keys attached in the group already
  (the "C" row: O(1)). So a lease's deletion in a group (the one-command REVOKE/EXPIRE/DROP or a
  PREPARE across groups, neither with a limit of its own) deletes at most that many keys, except
  where a range move's INSTALL brought more (never refused for the count: a move must finish). A plain write of an attached key (PUT, CAS,
  DELETE, a transaction's write, a cross-group COMMIT's write or delete) detaches it, as in etcd.

Invariant (no key stays attached to a dead lease forever): a group attaches a key to lease L only
while it holds no tombstone of L; the home leader fans DROP(L) out to every data group after L's
revocation (`node.lessor`) and FORGETs L only when all applied it. A LEASE_PUT applied before a
group's DROP is deleted by it; one after it is refused. The client library checks the lease at its
home before proposing a LEASE_PUT to another group (a definite "requested lease not found").
With more than one data group the lease's EXPIRE/REVOKE is instead one atomic deletion across
groups (a two-phase commit, `xtxn_apply.py`, feature level 4 like these commands): the home
group's RECORD is its commit point (`revoke_record`: LIVE, the same renew count for an expiry;
the record becomes the tombstone in the same apply) and each group's COMMIT deletes its attached
keys at the one revision R, then drops the attachment rows and keeps a tombstone
(`deleted_everywhere`); a LEASE_PUT meeting the deletion's lease lock is refused LOCKED. No DROP
or FORGET follows (the record is not REVOKED, it is gone).

Tombstones are forgotten (issue 17). A tombstone is written with an expiry: its *base* (a
revision-valued time no earlier than the lease's death, up to clock skew) plus `TOMB_LIFE`
(`LEASE_PUT_MAX_AGE + TOMB_MARGIN`; twice that in the home group, whose tombstone only refuses a
re-GRANT of the id and so outlives the other groups'), indexed by an age row `x`; every lease
command that applies (not a refused one) and every cross-group command forgets at most `GC_PER_ENTRY` tombstones whose
expiry is below the group's last revision (`gc`: a pure function of the rows, the same on every
replica and store); by the same rule an expired tombstone counts as absent before it is
forgotten (`live_tomb`: every reader deciding by a tombstone uses it, so a quiet group, where no
command runs `gc`, never refuses a put or deletes a moved key because of one). The bases: DROP and FORGET, max(last, proposed) - the proposal is the home
leader's / the DROP sender's HLC reading taken after the lease's death applied at its home (one
above `mvcc.PROPOSAL_MAX` is refused, a definite error result with nothing changed, whether or not
the command deletes a key, as a write's proposal is - so are REVOKE's and EXPIRE's, which run the
same deletion, `drop_attached`: a forged keyless DROP or FORGET must not keep a tombstone
forever); a
deletion across groups, max(last, R) in every group (R = max of the PREPAREs' revisions, each at
least the coordinator's HLC reading when it sent them). Why a LEASE_PUT that is accepted in a
group other than the home still meets the tombstone (L: max(the group's last revision when the
PUT applies, its proposal); c: its `checked`; b: the tombstone's base):
- accepted means L <= c + LEASE_PUT_MAX_AGE (`too_old`, `attach_refusal`);
- c was read before a read at the home saw the lease LIVE, so before its death applied there;
  the death's base b was read after the PREPAREs were sent (a deletion across groups) or after
  the death applied (DROP). Clock assumption: HLC readings of different nodes differ by less than
  their real-time order plus S, and a deletion's RECORD applies within T of its PREPAREs being
  sent; TOMB_MARGIN (120 s) >= S + T, so c <= b + TOMB_MARGIN;
- the tombstone is forgotten (or counts as absent, `live_tomb`) only at an apply whose L' >
  its expiry >= b + LEASE_PUT_MAX_AGE + TOMB_MARGIN (less for the orphan sweep's, still enough:
  `orphan_drop`) >= c + LEASE_PUT_MAX_AGE >= L, and the last revision only grows: so not before
  the PUT applies (GC at the PUT's own apply compares with its last, not above it either). A
  refused PUT changes nothing.
A PUT whose `checked` is 0 (never checked) or forged: 0 is refused in every group but the home
(L > LEASE_PUT_MAX_AGE for every revision after 2026-01-01T00:01Z); a forged future `checked` can
only attach a key its writer could have put without a lease anyway (its own write permission).
Residual assumption (as before this change for the coordinator's map): a range move whose
INSTALL brings a key attached to a lease that died by the one-command path reaches its ACTIVATE
within the tombstone's life (else `settle_dead_attachments` no longer sees the tombstone).

Range moves (`shardcmd`, `machine.apply_shard_command`). A moved key's attachment moves with it:
the source's export carries (key, lease id) records (`attachments`, `shardcmd.REC_LEASE`) and the
target's INSTALL attaches the key as a LEASE_PUT would (`attach`); BEGIN and the source's DROP
forget the attachment rows of the ranges they wipe (`forget_keys`). Which deletion runs is not
decided from a set of groups the home keeps (it keeps none): with more than one data group in the
map it is always the deletion across ALL data groups, with one the one-command path, whose DROP
fan-out re-reads the data groups before the FORGET (`node.lessor`). Invariant (every key attached
to a lease when its deletion commits is deleted, wherever a move put it):
- no deletion skips a moving key: REVOKE, EXPIRE and DROP are refused (LEASE_MOVING, WRONG_SHARD,
  nothing changed) while a key attached to the lease in the group is in a range it froze or is
  installing (`drop_attached`); the lease PREPARE is refused while the group has any range frozen
  or being installed (`xtxn_apply._prepare`). So a key is deleted by the group that serves it.
- no attachment arrives behind a deletion's back: a PREPARE that found a key put an intent on it,
  which keeps its range from freezing (FREEZE waits for intents) until the COMMIT deleted it; an
  INSTALL attaching a key to a lease whose deletion holds a lease lock in the target is refused
  (`machine._install_lease_check`; the move retries). Hence, with the deletion across groups,
  an INSTALL never meets the lease's tombstone (the COMMIT that wrote it followed PREPAREs in
  every group, the source's included, each of which either found and locked the key or ran
  before the range froze / after it moved).
- an attachment that does arrive for a lease dead in the target (its tombstone; in its home a
  record not LIVE) - possible with the one-command path, whose DROP may reach the target before
  the key does - does not stay attached: the ACTIVATE of its range deletes the key at a new
  revision of the target (`machine.settle_dead_attachments`), definitively, since no deletion of
  the lease would come there.
Not assumed any more: that the coordinator's map lists every data group (a map that lags behind
a group added and filled by a move after it was read leaves that group out of the plan), and
that a group created after a lease died meets no delayed LEASE_PUT of it: keys so left attached
to a dead lease are found by each data group's orphan sweep (`node/orphans.py`: LEASE_STATUS at
the home, then LEASE_ORPHAN, the guarded DROP: `home_status`, `orphan_drop`).

Every decoder is total: garbage raises `ValueError` (never another exception type).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from . import mvcc
from .keylimit import MAX_KEY_SIZE

ID_GROUP_BITS = 12
ID_GROUP_MASK = (1 << ID_GROUP_BITS) - 1
MAX_LEASE_ID = (1 << 63) - 1
MIN_TTL_S = 1
MAX_KEYS_PER_LEASE = 10_000
"""The most keys a LEASE_PUT attaches to one lease in one group (etcd-style limit; the same as a
range delete's keys per group, `xtxn_apply.MAX_RANGE_KEYS`)."""
TOO_MANY_KEYS = f"the lease has {MAX_KEYS_PER_LEASE} keys attached in this group (the most a lease may have)"
MAX_TTL_S = 9_000_000_000
"""etcd's MaxLeaseTTL (about 285 years)."""
T_LEASES = mvcc.T_LEASES
"""The lease table's number in the group's `mvcc.Rows` (after the MVCC and transaction tables)."""

LIVE = 0
REVOKED = 1

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_REC = struct.Struct(">QQQB")
_AGE = struct.Struct(">QQ")
BODY = struct.Struct(">QQQQ")
PUT_BODY = struct.Struct(">QQQQQ")
"""LEASE_PUT's body: BODY's fields, then `checked`."""
MAX_CHECKED = (1 << 63) - 1

LEASE_PUT_MAX_AGE = 60_000 << mvcc.PHYSICAL_SHIFT
"""How far (revision units: 60 s of HLC time) a LEASE_PUT's `checked` may be behind the last
revision of a group other than the lease's home when it applies (else refused, definitely)."""
TOMB_MARGIN = 120_000 << mvcc.PHYSICAL_SHIFT
"""The clock skew and deletion delay the tombstones' life allows for (module docstring)."""
TOMB_LIFE = LEASE_PUT_MAX_AGE + TOMB_MARGIN
"""How long after its base a tombstone is kept in a group other than the lease's home (3 min of
HLC time); the home keeps its own twice as long."""
GC_PER_ENTRY = 4
"""The most tombstones one applied command forgets."""
TOMB_EXPIRY_MAX = mvcc.REVISION_MAX - mvcc.STEP
"""The latest expiry a tombstone gets: below the last revision every group can reach (each
group's highest is at least `REVISION_MAX - STEP + 1`), so every tombstone can be forgotten
(a home tombstone based at `mvcc.PROPOSAL_MAX` would otherwise expire past the end)."""
_U64_MAX = (1 << 64) - 1


class Kind(enum.IntEnum):
    """Lease command kinds: their `commands.Op` codes."""

    GRANT = 20
    REVOKE = 21
    RENEW = 22
    CHECKPOINT = 23
    EXPIRE = 24
    DROP = 25
    FORGET = 26
    PUT = 27
    STATUS = 28
    ORPHAN = 29


KINDS = frozenset(int(k) for k in Kind)
NOT_FOUND = "requested lease not found"
EXISTS = "lease already exists"
"""The refusals a caller tells apart (`errors.LeaseNotFound`, `errors.LeaseExists`: the server
maps a command's result error equal to one of them onto its error class)."""


def home_group(lease_id: int) -> int:
    """The data group that holds lease `lease_id`'s record."""
    return lease_id & ID_GROUP_MASK


def check_id(lease_id: object) -> int:
    """`lease_id` if it is a valid lease id homed in a data group (not the metadata group 0),
    else ValueError."""
    if type(lease_id) is not int or not 0 < lease_id <= MAX_LEASE_ID:
        raise ValueError(f"lease id {lease_id!r} is not in 1..{MAX_LEASE_ID}")
    if home_group(lease_id) == 0:
        raise ValueError(f"lease id {lease_id:x} names group 0 as its home (the metadata group holds no leases)")
    return lease_id


def make_id(group: int, random_bits: int) -> int:
    """A lease id homed in `group` (1..4095) from `random_bits` (any int; its bits above the
    group's are used, never 0 there)."""
    if not 0 < group <= ID_GROUP_MASK:
        raise ValueError(f"group {group} cannot home leases (1..{ID_GROUP_MASK})")
    high = (random_bits % (MAX_LEASE_ID >> ID_GROUP_BITS)) + 1
    return (high << ID_GROUP_BITS) | group


def check_ttl(ttl_s: object) -> int:
    if type(ttl_s) is not int or not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"lease TTL {ttl_s!r} is not in {MIN_TTL_S}..{MAX_TTL_S} seconds")
    return ttl_s


@dataclass(frozen=True, slots=True)
class Record:
    """A lease's record in its home group. `remaining_ms` is the remaining TTL as of the entry
    that last set it (a GRANT, a RENEW, or the leader's CHECKPOINT); `renews` counts GRANT and
    RENEWs (CHECKPOINT and EXPIRE name it to be conditional on no renew in between)."""

    ttl_s: int
    remaining_ms: int
    renews: int
    state: int = LIVE

    def encode(self) -> bytes:
        return _REC.pack(self.ttl_s, self.remaining_ms, self.renews, self.state)

    @staticmethod
    def decode(raw: bytes) -> Record:
        if len(raw) != _REC.size:
            raise ValueError(f"lease record of {len(raw)} bytes, not {_REC.size}")
        ttl, rem, renews, state = _REC.unpack(raw)
        if not MIN_TTL_S <= ttl <= MAX_TTL_S:
            raise ValueError(f"lease record with TTL {ttl}")
        if rem > ttl * 1000:
            raise ValueError(f"lease record with remaining {rem} ms above its TTL of {ttl} s")
        if state not in (LIVE, REVOKED):
            raise ValueError(f"lease record in state {state}")
        return Record(ttl, rem, renews, state)


@dataclass(frozen=True, slots=True)
class LeaseCmd:
    """The lease part of a command (`commands.Command.lease`); LEASE_PUT's key and value are the
    command's own `key` and `value`."""

    kind: Kind
    lease_id: int
    ttl_s: int = 0
    renews: int = 0
    remaining_ms: int = 0
    checked: int = 0
    """LEASE_PUT only: a revision-valued HLC reading taken before the lease was seen LIVE at its
    home (0: not checked; refused outside the home group)."""
    until: int = 0
    """LEASE_ORPHAN only: the home's answer (`Status.until`): the lease cannot be granted again
    before its home's revision passes this (`orphan_drop`)."""

    def validate(self) -> None:
        """ValueError unless the fields fit the kind (what `decode_body` accepts)."""
        check_id(self.lease_id)
        k = self.kind
        if k == Kind.PUT:
            if type(self.checked) is not int or not 0 <= self.checked <= MAX_CHECKED:
                raise ValueError(f"LEASE_PUT checked revision {self.checked!r} is out of range")
        elif self.checked:
            raise ValueError(f"{k.name} carries no checked revision")
        if k == Kind.ORPHAN:
            if type(self.until) is not int or not 0 < self.until <= MAX_CHECKED:
                raise ValueError(f"LEASE_ORPHAN until revision {self.until!r} is out of range")
        elif self.until:
            raise ValueError(f"{k.name} carries no until revision")
        if k == Kind.GRANT:
            check_ttl(self.ttl_s)
        elif self.ttl_s:
            raise ValueError(f"{k.name} carries no TTL")
        if k in (Kind.CHECKPOINT, Kind.EXPIRE):
            if not 0 < self.renews < 1 << 64:
                raise ValueError(f"{k.name} needs the record's renew count (1..2**64-1), not {self.renews}")
        elif self.renews:
            raise ValueError(f"{k.name} carries no renew count")
        if k == Kind.CHECKPOINT:
            if not 0 <= self.remaining_ms <= MAX_TTL_S * 1000:
                raise ValueError(f"checkpoint remaining {self.remaining_ms} ms is out of range")
        elif self.remaining_ms:
            raise ValueError(f"{k.name} carries no remaining TTL")


def body_size(kind: int) -> int:
    """The size of the lease body of a command of op `kind` (a lease kind)."""
    return PUT_BODY.size if kind in (Kind.PUT, Kind.ORPHAN) else BODY.size


def encode_body(c: LeaseCmd) -> bytes:
    c.validate()
    if c.kind == Kind.PUT:
        return PUT_BODY.pack(c.lease_id, c.ttl_s, c.renews, c.remaining_ms, c.checked)
    if c.kind == Kind.ORPHAN:
        return PUT_BODY.pack(c.lease_id, c.ttl_s, c.renews, c.remaining_ms, c.until)
    return BODY.pack(c.lease_id, c.ttl_s, c.renews, c.remaining_ms)


def decode_body(kind: int, body: bytes | memoryview) -> LeaseCmd:
    """The lease fields of a command of op `kind` (exactly `body_size(kind)` bytes). ValueError
    on garbage."""
    if kind not in KINDS:
        raise ValueError(f"op {kind} is not a lease command")
    size = body_size(kind)
    if len(body) != size:
        raise ValueError(f"lease command body of {len(body)} bytes, not {size}")
    until = 0
    if kind == Kind.PUT:
        lid, ttl, renews, rem, checked = PUT_BODY.unpack(body)
    elif kind == Kind.ORPHAN:
        (lid, ttl, renews, rem, until), checked = PUT_BODY.unpack(body), 0
    else:
        (lid, ttl, renews, rem), checked = BODY.unpack(body), 0
    c = LeaseCmd(Kind(kind), lid, ttl, renews, rem, checked, until)
    c.validate()
    return c


# --- rows -----------------------------------------------------------------------------------------
def key_hash16(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=16).digest()


def record_key(lease_id: int) -> bytes:
    return b"L" + _U64.pack(lease_id)


def tomb_key(lease_id: int) -> bytes:
    return b"X" + _U64.pack(lease_id)


def age_key(expiry: int, lease_id: int) -> bytes:
    return b"x" + _AGE.pack(expiry, lease_id)


def tomb_expiry(rows: mvcc.Rows, lease_id: int) -> int | None:
    """The expiry of the group's tombstone of `lease_id` (None: no tombstone)."""
    raw = rows.get(T_LEASES, tomb_key(lease_id))
    if raw is None:
        return None
    if len(raw) != 8:
        raise mvcc.RevisionError(f"corrupt lease tombstone of {len(raw)} bytes")
    return int(_U64.unpack(bytes(raw))[0])


def live_tomb(rows: mvcc.Rows, lease_id: int, at: int = 0) -> int | None:
    """The expiry of the group's tombstone of `lease_id` if it still counts (None: no
    tombstone, or one whose expiry is below max(the group's last revision, `at`): `gc` forgets
    it at the next command that runs it, so every reader deciding by a tombstone treats it as
    absent already). Deterministic: a function of the rows (and of `at`, a revision the entry
    carries: a put's proposal, whose own revision will be at least that), `gc`'s rule, so a quiet
    group (no lease command applied to run `gc`) decides as if it had run."""
    expiry = tomb_expiry(rows, lease_id)
    if expiry is None or expiry < max(mvcc.rev_state(rows).last, at):
        return None
    return expiry


def put_tomb(rows: mvcc.Rows, group: int, lease_id: int, base: int, cap: int = TOMB_EXPIRY_MAX) -> None:
    """Keep a tombstone of `lease_id` until `base` + its life (`TOMB_LIFE`, twice that in the
    home group; at most `cap`, itself at most `TOMB_EXPIRY_MAX`: the orphan sweep's DROP caps it,
    `orphan_drop`); an existing tombstone keeps the later expiry."""
    life = TOMB_LIFE * 2 if home_group(lease_id) == group else TOMB_LIFE
    expiry = min(base + life, cap, TOMB_EXPIRY_MAX)
    old = tomb_expiry(rows, lease_id)
    if old is not None:
        if old >= expiry:
            return
        rows.delete(T_LEASES, age_key(old, lease_id))
    rows.put(T_LEASES, tomb_key(lease_id), _U64.pack(expiry))
    rows.put(T_LEASES, age_key(expiry, lease_id), b"")


def forget_tomb(rows: mvcc.Rows, lease_id: int) -> None:
    """Remove the group's tombstone of `lease_id` and its age row, if any."""
    expiry = tomb_expiry(rows, lease_id)
    if expiry is not None:
        rows.delete(T_LEASES, tomb_key(lease_id))
        rows.delete(T_LEASES, age_key(expiry, lease_id))


def gc(rows: mvcc.Rows) -> int:
    """Forget at most `GC_PER_ENTRY` tombstones whose expiry is below the group's last revision
    (with their age rows), oldest first (`mvcc.expired`); returns how many. Deterministic: a
    function of the rows. A group that keeps no tombstone answers from the rows' per-batch flag
    (`mvcc.Rows.has_tombstones`): a plain lease command (GRANT, RENEW) costs no walk there."""
    if not rows.has_tombstones():
        return 0
    gone = mvcc.expired(rows, T_LEASES, b"x", 1 + _AGE.size, GC_PER_ENTRY, "lease tombstone")
    for k in gone:
        lid = _U64.unpack_from(k, 9)[0]
        rows.delete(T_LEASES, k)
        raw = rows.get(T_LEASES, tomb_key(lid))
        if raw is not None and bytes(raw) == k[1:9]:
            rows.delete(T_LEASES, tomb_key(lid))
    return len(gone)


def too_old(rows: mvcc.Rows, checked: int, at: int = 0) -> bool:
    """Whether a LEASE_PUT checked at `checked` is refused in a group other than its lease's home:
    max(the group's last revision, `at`: the put's proposal) is more than `LEASE_PUT_MAX_AGE`
    past it."""
    return max(mvcc.rev_state(rows).last, at) > checked + LEASE_PUT_MAX_AGE


def attach_key(lease_id: int, key: bytes) -> bytes:
    return b"A" + _U64.pack(lease_id) + key_hash16(key)


def count_key(lease_id: int) -> bytes:
    return b"C" + _U64.pack(lease_id)


def count_row(n: int) -> bytes:
    """The value of a lease's count row (`count_key`): how many keys are attached to it in the
    group, n >= 1 (the row is absent at 0: `check_rows`)."""
    if not 0 < n <= _U64_MAX:
        raise ValueError(f"lease attachment count {n} is not a positive u64")
    return _U64.pack(n)


def attached_count(rows: mvcc.Rows, lease_id: int) -> int:
    """How many keys are attached to `lease_id` in this group (its "C" row; 0 when absent)."""
    raw = rows.get(T_LEASES, count_key(lease_id))
    if raw is None:
        return 0
    if len(raw) != 8:
        raise mvcc.RevisionError(f"corrupt lease count row of {len(raw)} bytes")
    return int(_U64.unpack(bytes(raw))[0])


def _count_add(rows: mvcc.Rows, lease_id: int, delta: int) -> None:
    """Add `delta` to `lease_id`'s count row (the row goes at 0; never below 0)."""
    n = attached_count(rows, lease_id) + delta
    if n > 0:
        rows.put(T_LEASES, count_key(lease_id), count_row(n))
    else:
        rows.delete(T_LEASES, count_key(lease_id))


def owner_key(key: bytes) -> bytes:
    return b"K" + key_hash16(key)


def owner_row(lease_id: int) -> bytes:
    """The value of a key's owner row (`owner_key`): the id of the lease it is attached to."""
    return _U64.pack(lease_id)


def get_record(rows: mvcc.Rows, lease_id: int) -> Record | None:
    raw = rows.get(T_LEASES, record_key(lease_id))
    return None if raw is None else Record.decode(bytes(raw))


def attached_keys(rows: mvcc.Rows, lease_id: int) -> list[bytes]:
    """The keys attached to `lease_id` in this group, in attachment-row order."""
    lo = b"A" + _U64.pack(lease_id)
    hi = b"A" + _U64.pack(lease_id + 1)
    return [bytes(v) for _, v in rows.iter(T_LEASES, lo, hi)]


def iter_records(rows: mvcc.Rows) -> list[tuple[int, Record]]:
    """Every lease record of the group (home leases), by id."""
    out: list[tuple[int, Record]] = []
    for k, v in rows.iter(T_LEASES, b"L", b"M"):
        if len(k) != 9:
            raise ValueError(f"lease record key of {len(k)} bytes")
        out.append((_U64.unpack_from(k, 1)[0], Record.decode(bytes(v))))
    return out


def attached_leases(rows: mvcc.Rows) -> list[int]:
    """The ids of the leases with keys attached in this group (each once, ascending)."""
    out: list[int] = []
    for k, _ in rows.iter(T_LEASES, b"A", b"B"):
        lid = _U64.unpack_from(k, 1)[0]
        if not out or out[-1] != lid:
            out.append(lid)
    return out


def lease_of(rows: mvcc.Rows, key: bytes) -> int:
    """The lease `key` is attached to in this group (0: none)."""
    raw = rows.get(T_LEASES, owner_key(key))
    return 0 if raw is None else int(_U64.unpack(bytes(raw))[0])


@dataclass(slots=True)
class LeaseProbe:
    """A current read's request for the lease its key is attached to, filled by the store from
    the read's OWN view (the same read transaction as the key's current version: a write
    between them may change both). `lease`: the attachment row's lease, 0 for none (read
    whether or not the key is present: a caller takes it for a present key only)."""

    lease: int = 0


def detach(rows: mvcc.Rows, key: bytes) -> None:
    """Detach `key` from its lease, if any (a plain write or delete of the key). A group with
    no attachment at all answers from the rows' per-batch flag (`mvcc.Rows.has_attachments`)."""
    if not rows.has_attachments():
        return
    ok = owner_key(key)
    raw = rows.get(T_LEASES, ok)
    if raw is None:
        return
    lid = _U64.unpack(bytes(raw))[0]
    rows.delete(T_LEASES, ok)
    rows.delete(T_LEASES, attach_key(lid, key))
    _count_add(rows, lid, -1)


def attach(rows: mvcc.Rows, key: bytes, lease_id: int) -> None:
    """Attach `key` to `lease_id` (detaching it from any other): the rows a LEASE_PUT writes, and
    an INSTALL of a moved key's attachment."""
    old = lease_of(rows, key)
    if old != lease_id:
        if old:
            rows.delete(T_LEASES, attach_key(old, key))
            _count_add(rows, old, -1)
        rows.put(T_LEASES, owner_key(key), owner_row(lease_id))
        rows.put(T_LEASES, attach_key(lease_id, key), key)
        _count_add(rows, lease_id, 1)


def attach_refused(rows: mvcc.Rows, key: bytes, lease_id: int) -> bool:
    """Whether attaching `key` to `lease_id` would exceed `MAX_KEYS_PER_LEASE` here (a key
    attached to it already is not a new attachment)."""
    return attached_count(rows, lease_id) >= MAX_KEYS_PER_LEASE and lease_of(rows, key) != lease_id


def attachments(rows: mvcc.Rows, chosen: Callable[[bytes], bool]) -> list[tuple[bytes, int]]:
    """(key, lease id) of every attachment in this group whose key is `chosen` (a range move's
    export: the keys of the frozen ranges), in attachment-row order (the same on every replica)."""
    out: list[tuple[bytes, int]] = []
    for k, v in rows.iter(T_LEASES, b"A", b"B"):
        key = bytes(v)
        if chosen(key):
            out.append((key, int(_U64.unpack_from(bytes(k), 1)[0])))
    return out


def forget_keys(rows: mvcc.Rows, chosen: Callable[[bytes], bool]) -> int:
    """Remove the attachment rows of every attached key that is `chosen` (the ranges a group
    drops after a move, or wipes before installing them). Returns how many."""
    return _forget(rows, attachments(rows, chosen))


def _forget(rows: mvcc.Rows, gone: list[tuple[bytes, int]]) -> int:
    """Remove the attachment rows (`A`, `K`) of each (key, lease id) of `gone` (attachments the
    group holds) and lower each lease's count row by its number (the row goes at 0). Returns
    how many. The one writer of `forget_keys` and `forget_attached`."""
    per: dict[int, int] = {}
    for key, lid in gone:
        rows.delete(T_LEASES, attach_key(lid, key))
        rows.delete(T_LEASES, owner_key(key))
        per[lid] = per.get(lid, 0) + 1
    for lid, n in per.items():
        _count_add(rows, lid, -n)
    return len(gone)


def may_attach(rows: mvcc.Rows, group: int, lease_id: int, at: int = 0) -> bool:
    """Whether a key may be attached to `lease_id` in this group: in its home group only while
    its record is LIVE, elsewhere unless the group holds a tombstone of it that still counts
    (`live_tomb`, with `at`: an expired one is absent, whether or not `gc` has forgotten it)."""
    if home_group(lease_id) == group:
        rec = get_record(rows, lease_id)
        return rec is not None and rec.state == LIVE
    return live_tomb(rows, lease_id, at) is None


def attach_refusal(rows: mvcc.Rows, group: int, lease_id: int, checked: int, at: int = 0) -> str | None:
    """Why a put with lease `lease_id` (checked at `checked`, proposed at `at`) may not attach
    its key in this group, or None: the LEASE_PUT rule (module docstring), shared by LEASE_PUT
    and a transaction's PUT_LEASE (`machine.lease_refusal`). `NOT_FOUND` unless `may_attach`,
    and in a group other than the home also when `checked` is too old (`too_old`). Both compare
    with the same now = max(last, at), so a put accepted (now <= checked + LEASE_PUT_MAX_AGE)
    still meets every tombstone whose expiry is at least checked + LEASE_PUT_MAX_AGE. Pure:
    reads only. (The per-lease key limit, `MAX_KEYS_PER_LEASE`, is the caller's: it counts
    differently for one put and for a transaction's puts together.)"""
    if not may_attach(rows, group, lease_id, at):
        return NOT_FOUND
    if home_group(lease_id) != group and too_old(rows, checked, at):
        return NOT_FOUND
    return None


def attach_refusals(rows: mvcc.Rows, group: int, leased: Iterable[tuple[bytes, int, int]],
                    at: int = 0) -> list[str | None]:
    """Per leased put (key, lease, checked) of one transaction, at revision `at`: why it may not
    attach its key in this group (`attach_refusal`'s `NOT_FOUND`; else `TOO_MANY_KEYS` when its
    lease would end with more than `MAX_KEYS_PER_LEASE` keys attached here, the transaction's
    new attachments of the lease counted together, each key once), or None. Shared by a TXN's
    leased puts (`machine.lease_refusal`) and a cross-group PREPARE's
    (`xtxn_apply._attach_refusals`). Pure: reads only."""
    leased = list(leased)
    new: dict[int, set[bytes]] = {}
    for key, lid, _checked in leased:
        if lease_of(rows, key) != lid:
            new.setdefault(lid, set()).add(key)
    out: list[str | None] = []
    for _key, lid, checked in leased:
        refused = attach_refusal(rows, group, lid, checked, at)
        if refused is None and attached_count(rows, lid) + len(new.get(lid, ())) > MAX_KEYS_PER_LEASE:
            refused = TOO_MANY_KEYS
        out.append(refused)
    return out


def check_rows(key: bytes, value: bytes) -> None:
    """ValueError unless (key, value) is a well-formed lease-table row (snapshot installs)."""
    if not key:
        raise ValueError("empty lease row key")
    t, n = key[:1], len(key)
    if t == b"L" and n == 9:
        Record.decode(value)
    elif t == b"X" and n == 9:
        if len(value) != 8:
            raise ValueError(f"lease tombstone of {len(value)} bytes")
    elif t == b"x" and n == 17:
        if value:
            raise ValueError("lease tombstone age row with a value")
    elif t == b"C" and n == 9:
        if len(value) != 8 or _U64.unpack(value)[0] == 0:
            raise ValueError("lease count row that is not a positive u64")
    elif t == b"A" and n == 25:
        if not 0 < len(value) <= MAX_KEY_SIZE or key_hash16(value) != key[9:]:
            raise ValueError("lease attachment row whose key does not match its hash")
    elif t == b"K" and n == 17:
        if len(value) != 8:
            raise ValueError(f"lease owner row of {len(value)} bytes")
    else:
        raise ValueError(f"lease row key {bytes(key[:1])!r} of {n} bytes")


# --- apply ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    """What a lease command did: `found` (the lease was live / the conditional step applied),
    `ttl_s` (RENEW), `deleted` keys at `revision` (REVOKE, EXPIRE, DROP), `error` (refused,
    nothing changed)."""

    found: bool = False
    ttl_s: int = 0
    deleted: int = 0
    revision: int = 0
    error: str | None = None
    moving: bool = False
    """Refused because an attached key is in a moving range (LEASE_MOVING)."""
    status: Status | None = None
    """LEASE_STATUS: the home's answer (`home_status`)."""


Get = Callable[[bytes], "bytes | None"]
Delete = Callable[[bytes], bool]
Put = Callable[[bytes, bytes], None]


LEASE_MOVING = "a key attached to the lease is in a range being moved: its deletion waits for the move"
"""A lease deletion (REVOKE, EXPIRE, DROP) refused while a key attached to the lease in the group
lies in a range the group froze or is installing (retried: the lease clock, the DROP sender,
the client's revoke on WRONG_SHARD)."""

Pred = Callable[[bytes], bool]


def drop_attached(rows: mvcc.Rows, group: int, lease_id: int, proposed: int, get: Get, delete: Delete,
                  serves: Pred = lambda _k: True, moving: Pred = lambda _k: False) -> Outcome:
    """Delete every key attached to `lease_id` in this group at ONE revision (mvcc.next_revision
    of the proposal) and its attachment rows. The per-group half of a lease's deletion (see the
    module docstring); RevisionError propagates before anything changed. Refused (LEASE_MOVING,
    `Outcome.moving`, nothing changed) while an attached key is `moving` (in a range the group
    froze or is installing: a frozen key is immutable, so its export reads the same on every
    replica, and it moves WITH its attachment; the deletion is retried after the move, where
    the move put the key). A key neither served nor moving (a row the group no longer owns) is
    only detached. A proposal above `mvcc.PROPOSAL_MAX` is refused (RevisionError) whether or not
    a key is deleted: a DROP's tombstone is based on it, and a forged keyless one must not keep a
    tombstone forever."""
    mvcc.check_proposal(proposed)
    keys = attached_keys(rows, lease_id)
    if any(moving(k) for k in keys):
        return Outcome(error=LEASE_MOVING, moving=True)
    present = [(k, v) for k in keys if serves(k) and (v := get(k)) is not None]
    rev = 0
    if present:
        rev = mvcc.next_revision(mvcc.rev_state(rows).last, proposed, group)
        delete_at(rows, group, rev, present, delete)
    forget_attached(rows, lease_id, keys)
    return Outcome(found=True, deleted=len(present), revision=rev)


def delete_at(rows: mvcc.Rows, group: int, rev: int, keys: Sequence[tuple[bytes, bytes | None]], delete: Delete) -> None:
    """Delete each (key, current value) of `keys` at revision `rev` (a next revision of the group:
    `mvcc.write_version(exact=True)`; a key whose value is None is absent: nothing to delete). The
    one loop of a lease's deletion in a group (`drop_attached`) and of the ACTIVATE's deletion of
    keys a move brought attached to a dead lease (`machine.settle_dead_attachments`); their
    attachment rows are the caller's."""
    for k, prev in keys:
        if prev is not None:
            mvcc.write_version(rows, group, k, None, prev, rev, exact=True)
            delete(k)


def forget_attached(rows: mvcc.Rows, lease_id: int, keys: list[bytes] | None = None) -> None:
    """Remove every attachment row of `lease_id` in this group (`keys`: `attached_keys`, if read
    already), its count row with them; the keys themselves are not touched."""
    _forget(rows, [(k, lease_id) for k in (attached_keys(rows, lease_id) if keys is None else keys)])


LEASE_RENEWED = "lease renewed since its expiry was decided"
"""A lease deletion's RECORD refused because an expiry's renew count no longer matches."""


def revoke_record(rows: mvcc.Rows, group: int, lease_id: int, renews: int, base: int) -> str | None:
    """The commit point of a lease's deletion across groups (a RECORD with a lease, in its home
    group): if the record is LIVE and (`renews` != 0, an expiry) still has that renew count, the
    lease is revoked and forgotten at once (its record becomes the tombstone: every group's
    COMMIT deletes its keys and keeps a tombstone, so no DROP and no FORGET follow); else the
    reason it is refused (nothing changed). `base`: the tombstone's base (the deletion's R)."""
    if home_group(lease_id) != group:
        return f"lease {lease_id:x} is homed in group {home_group(lease_id)}, not {group}"
    rec = get_record(rows, lease_id)
    if rec is None or rec.state != LIVE:
        return NOT_FOUND
    if renews and rec.renews != renews:
        return LEASE_RENEWED
    rows.delete(T_LEASES, record_key(lease_id))
    put_tomb(rows, group, lease_id, max(base, mvcc.rev_state(rows).last))
    return None


def deleted_everywhere(rows: mvcc.Rows, group: int, lease_id: int, base: int) -> None:
    """A lease deletion's COMMIT in this group (its keys' deletes are the COMMIT's: every key
    the deletion prepared here, `XCmd.delete_prepared`, or the writes it lists): the
    attachment rows go and a group other than the home keeps a tombstone, so that a LEASE_PUT
    of the lease arriving later is refused (`base`: the deletion's R, `put_tomb`)."""
    forget_attached(rows, lease_id)
    if home_group(lease_id) != group:
        put_tomb(rows, group, lease_id, max(base, mvcc.rev_state(rows).last))


def apply(rows: mvcc.Rows, group: int, c: LeaseCmd, key: bytes, value: bytes, proposed: int,
          get: Get, put: Put, delete: Delete, serves: Pred = lambda _k: True,
          moving: Pred = lambda _k: False) -> Outcome:
    """Apply lease command `c` to a group (see the module docstring). `key`/`value`: LEASE_PUT's;
    `proposed`: the leader's proposed revision for a write; `serves(key)`: whether the group
    serves the key; `moving(key)`: whether it lies in a range the group froze or is installing
    (a deletion is then refused whole: `drop_attached`). RevisionError propagates before
    anything changed. A command that applied then forgets expired tombstones (`gc`; a refused
    one changes nothing)."""
    out = _apply(rows, group, c, key, value, proposed, get, put, delete, serves, moving)
    if out.error is None:
        gc(rows)
    return out


def _apply(rows: mvcc.Rows, group: int, c: LeaseCmd, key: bytes, value: bytes, proposed: int,
           get: Get, put: Put, delete: Delete, serves: Pred, moving: Pred) -> Outcome:
    lid, k = c.lease_id, c.kind
    home = home_group(lid) == group
    rk = record_key(lid)
    rec = get_record(rows, lid) if home else None
    if k == Kind.GRANT:
        if not home:
            return Outcome(error=f"lease {lid:x} is homed in group {home_group(lid)}, not {group}")
        if rec is not None or live_tomb(rows, lid) is not None:
            return Outcome(error=EXISTS)
        forget_tomb(rows, lid)  # an expired one (`live_tomb`) that `gc` has not reached yet
        rows.put(T_LEASES, rk, Record(c.ttl_s, c.ttl_s * 1000, 1).encode())
        return Outcome(found=True, ttl_s=c.ttl_s)
    if k == Kind.PUT:
        refused = attach_refusal(rows, group, lid, c.checked, proposed)
        if refused is not None:
            return Outcome(error=refused)
        if attach_refused(rows, key, lid):
            return Outcome(error=TOO_MANY_KEYS)
        rev = mvcc.write_version(rows, group, key, value, None, proposed, get)
        put(key, value)
        attach(rows, key, lid)
        return Outcome(found=True, revision=rev)
    if k == Kind.STATUS:
        if not home:
            return Outcome(error=f"lease {lid:x} is homed in group {home_group(lid)}, not {group}")
        return Outcome(found=True, status=home_status(rows, lid))
    if k == Kind.ORPHAN:
        return orphan_drop(rows, group, c, proposed, get, delete, serves, moving)
    if k == Kind.DROP:
        out = drop_attached(rows, group, lid, proposed, get, delete, serves, moving)
        if out.error is not None:
            return out
        if not home:
            put_tomb(rows, group, lid, max(proposed, mvcc.rev_state(rows).last))
        return out
    if not home:
        return Outcome(error=f"lease {lid:x} is homed in group {home_group(lid)}, not {group}")
    live = rec is not None and rec.state == LIVE
    if k == Kind.RENEW:
        if rec is None or not live:
            return Outcome()
        rows.put(T_LEASES, rk, Record(rec.ttl_s, rec.ttl_s * 1000, rec.renews + 1).encode())
        return Outcome(found=True, ttl_s=rec.ttl_s)
    if k == Kind.CHECKPOINT:
        if rec is None or not live or rec.renews != c.renews:
            return Outcome()
        rem = min(c.remaining_ms, rec.ttl_s * 1000)
        rows.put(T_LEASES, rk, Record(rec.ttl_s, rem, rec.renews).encode())
        return Outcome(found=True)
    if k == Kind.EXPIRE or k == Kind.REVOKE:
        if rec is None or not live or (k == Kind.EXPIRE and rec.renews != c.renews):
            return Outcome(error=NOT_FOUND) if k == Kind.REVOKE else Outcome()
        out = drop_attached(rows, group, lid, proposed, get, delete, serves, moving)
        if out.error is None:
            rows.put(T_LEASES, rk, Record(rec.ttl_s, 0, rec.renews, REVOKED).encode())
        return out
    if k == Kind.FORGET:
        mvcc.check_proposal(proposed)  # the tombstone's base: refused beyond PROPOSAL_MAX, as a DROP's
        if rec is None or rec.state != REVOKED:
            return Outcome()
        rows.delete(T_LEASES, rk)
        put_tomb(rows, group, lid, max(proposed, mvcc.rev_state(rows).last))
        return Outcome(found=True)
    return Outcome(error=f"unknown lease command {k!r}")


# --- the orphan sweep (`node/orphans.py`): a lease's status at its home, the guarded DROP ----------
ALIVE = 0
DEAD = 1
UNKNOWN = 2
_STATUS = struct.Struct(">BQ")
ORPHAN_STALE = "the orphan sweep's answer is too old: the lease's id may have been granted again"
"""A LEASE_ORPHAN refused: applied too close to (or past) its `until` (nothing changed)."""


@dataclass(frozen=True, slots=True)
class Status:
    """A lease's status at its home (LEASE_STATUS's result, `home_status`): ALIVE (its record is
    LIVE), DEAD (revoked, and its id cannot be granted again before the home's revision passes
    `until`: the home's tombstone expiry, or a lower bound of the tombstone to come), UNKNOWN
    (no record and no tombstone: never granted, or its tombstone forgotten; it may be granted at
    any time). Invariant: `until` > 0 exactly when DEAD."""

    state: int
    until: int = 0

    def encode(self) -> bytes:
        return _STATUS.pack(self.state, self.until)

    @staticmethod
    def decode(raw: bytes | None) -> Status:
        """Total: ValueError on anything but a well-formed status."""
        if raw is None or len(raw) != _STATUS.size:
            raise ValueError(f"lease status of {None if raw is None else len(raw)} bytes, not {_STATUS.size}")
        state, until = _STATUS.unpack(raw)
        if state not in (ALIVE, DEAD, UNKNOWN):
            raise ValueError(f"lease status in state {state}")
        if not (0 < until <= MAX_CHECKED if state == DEAD else until == 0):  # `until` > 0 exactly when DEAD
            raise ValueError(f"lease status {state} with until {until}")
        return Status(state, until)


def home_status(rows: mvcc.Rows, lease_id: int) -> Status:
    """The status of `lease_id` in its home group's rows (a pure function of them): ALIVE while
    its record is LIVE; DEAD with a tombstone that still counts (`live_tomb`; `until` = its
    expiry, at most `TOMB_EXPIRY_MAX`: the GRANT of the id is refused until the home's last
    revision passes it); else UNKNOWN - no record and no tombstone, an expired tombstone (the
    id may be granted again at any time), or a REVOKED record: its one-command deletion is
    under way (the lessor's DROPs, then the FORGET whose tombstone the sweep then gets). A
    REVOKED record is not DEAD because `until` must be a tombstone expiry based after the death
    (`orphan_drop` caps its own tombstone at `until - TOMB_MARGIN` and relies on that base);
    the home's last revision is no such base (a REVOKE that deleted nothing there moves it not)."""
    rec = get_record(rows, lease_id)
    if rec is not None:
        return Status(ALIVE) if rec.state == LIVE else Status(UNKNOWN)
    expiry = live_tomb(rows, lease_id)
    if expiry is not None and expiry > 0:
        return Status(DEAD, min(expiry, TOMB_EXPIRY_MAX))
    return Status(UNKNOWN)


def orphan_drop(rows: mvcc.Rows, group: int, c: LeaseCmd, proposed: int, get: Get, delete: Delete,
                serves: Pred, moving: Pred) -> Outcome:
    """LEASE_ORPHAN(id, until) in a group other than the lease's home: the orphan sweep found
    keys attached here to a lease its home answered DEAD (`Status`, `until`). Applies as a
    DROP (`drop_attached`, then the DROP's tombstone) if the group's revision `at` =
    max(proposed, last) satisfies at + TOMB_MARGIN <= until; else refused (ORPHAN_STALE,
    nothing changed: the sweep asks again).

    Why no key of a live lease is deleted. The keys deleted are those attached to the id here
    when this applies. The home answered DEAD through its log, so the incarnation any of them
    was attached to (the lease was LIVE at its LEASE_PUT, or its attachment came from such a
    PUT by a move) had died by then, unless the id was granted again since. A new GRANT of the
    id applies at the home only once the home's last revision is past `until` (the tombstone's
    expiry, `gc`), so after some HLC reading >= until; a LEASE_PUT of that new incarnation here
    follows it in real time, so under the clock assumption of the module docstring (readings of
    different nodes differ by less than their real-time order plus S <= TOMB_MARGIN) this
    group's revision is then > until - TOMB_MARGIN >= at: it applies after this command, and
    does not meet its tombstone (below). A delayed LEASE_PUT of the dead incarnation applied
    before this is deleted with the rest; one after it meets the tombstone.

    The tombstone's expiry is E = min(at + TOMB_LIFE, until - TOMB_MARGIN) (`put_tomb`'s cap;
    the guard makes E >= at). Why the cap. Without it the tombstone would outlive the home's
    by up to LEASE_PUT_MAX_AGE: the home may then grant the id again (client-chosen ids) while
    this group still refuses its puts, and a range move bringing a key of that LIVE incarnation
    here would attach it at INSTALL and delete it at ACTIVATE (`settle_dead_attachments`). With
    it: a key of the new incarnation was written after the re-GRANT, which applied at the home
    with its last revision past `until`, so (clock assumption) at a revision > until - S >=
    until - TOMB_MARGIN >= E; its put here (now = max(last, its proposal) > E) or its INSTALL
    (which raises this group's last past the key's history, `mvcc.install_history`) finds the
    tombstone expired (`live_tomb`: absent from then on, as `gc` will forget it). Why E still
    outlives every delayed put of the old incarnation (c: its `checked`; b: the home's
    tombstone base, read after the death, so c <= b + TOMB_MARGIN as in the module docstring;
    until >= b + 2 * TOMB_LIFE, since `home_status` answers DEAD only with a tombstone and an
    existing one keeps the later expiry; TOMB_EXPIRY_MAX aside):
    until - TOMB_MARGIN >= b + 2 * LEASE_PUT_MAX_AGE + TOMB_MARGIN >= c + 2 * LEASE_PUT_MAX_AGE
    >= c + LEASE_PUT_MAX_AGE, and at + TOMB_LIFE >= c + LEASE_PUT_MAX_AGE as for a DROP (`at` >=
    this proposal, a reading after the home answered DEAD); a put is accepted only while
    now <= c + LEASE_PUT_MAX_AGE <= E (`attach_refusal`), when the tombstone still counts."""
    lid = c.lease_id
    if home_group(lid) == group:
        return Outcome(error=f"lease {lid:x} is homed in group {group}: its home deletes its keys, not the sweep")
    at = max(proposed, mvcc.rev_state(rows).last)
    if at + TOMB_MARGIN > c.until:
        return Outcome(error=ORPHAN_STALE)
    out = drop_attached(rows, group, lid, proposed, get, delete, serves, moving)
    if out.error is None:
        put_tomb(rows, group, lid, at, cap=c.until - TOMB_MARGIN)
    return out


def attached_page(rows: mvcc.Rows, after: int, limit: int) -> list[int]:
    """At most `limit` ids of leases with keys attached in this group, ascending, each above
    `after` (their count rows "C", one per lease: O(limit) rows read)."""
    out: list[int] = []
    if limit <= 0 or after >= MAX_LEASE_ID:
        return out
    for k, _ in rows.iter(T_LEASES, count_key(after + 1), b"D"):
        if len(out) >= limit:
            break
        if len(k) == 9:
            out.append(int(_U64.unpack_from(bytes(k), 1)[0]))
    return out
