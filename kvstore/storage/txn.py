"""Multi-key transactions (etcd's Txn shape): types, wire codec and evaluation. STANDARD LIBRARY ONLY.

A transaction is a list of compares, then the operations of the `success` branch if every
compare holds, else those of the `failure` branch. Operations: PUT, DELETE and GET of one key,
DELETE_RANGE of a key range [start, end) (end empty: no end; level 6, run only across groups:
see below), and a nested transaction. The apply logic (`machine.apply_txn`) runs it inside one group at one
revision; a later two-phase commit across groups is meant to reuse `evaluate` unchanged at a
prepared revision (the function takes the revision and a reader, and returns the writes to make).

Compare semantics (etcd's): target VALUE compares the value bytewise; VERSION, CREATE and MOD
compare the key's version, create revision and mod revision as integers; LEASE the id of the
lease the key is attached to (0: none; `Current.lease`, read only for a transaction with such a
compare). A missing key has
version = create = mod = 0, and every VALUE compare on it is false (whatever the operator): so
`create("k") = "0"` is the existence test ("k" is absent), as in etcd.

Evaluation is sequential: each operation sees the writes of the operations before it in the
same transaction (a GET after a PUT of the key returns the new value, at the transaction's
revision). A DELETE of an absent key writes nothing. A DELETE_RANGE deletes every key present
in its range at that point (its result: how many), so a GET of such a key after it reads it
absent, and a PUT into the range after it survives (the PUT's value is the key's at the
revision; a key present before the transaction keeps its history: its one version at the
revision is the PUT's, the key's next version, as if overwritten, and a GET after the PUT says
so); a PUT before it is deleted again. Its keys are not named (`keys_of` skips it): the
caller hands `evaluate` a `Scanner` of the keys present in a range, and gets back, besides the
writes of named keys (each key once, its final state), the ranges the path taken deleted
(`Outcome.ranges`): the caller deletes every key present in one of them that is not among the
writes (`storage/xtxn_apply.py`'s COMMIT). Only a two-phase commit over every data group, which
locks the ranges in each, can do that atomically: a one-group TXN with a DELETE_RANGE is refused
at apply (`machine.apply_txn`).

Wire format (big-endian `struct`; never pickle or json):

    txn     n_cmp:u16 n_success:u16 n_failure:u16  cmp*  op*  op*
    cmp     target:u8 result:u8 key_len:u16 key  (VALUE: len:u32 value | other: number:u64)
    op      kind:u8 key_len:u16 key  (PUT: len:u32 value | TXN: key_len 0, then a txn |
                                      PUT_LEASE (5): len:u32 value lease:u64 checked:u64 |
                                      DELETE_RANGE (6): the key is the start, end_len:u16 end)
    result  flags:u8 (bit 0 succeeded) revision:u64 n:u16  opres*
    opres   kind:u8  (PUT: nothing | DELETE: existed:u8 |
                      GET: found:u8 [create:u64 mod:u64 version:u64 len:u32 value] | TXN: result |
                      DELETE_RANGE: deleted:u64)

Invariants (checked by `check_txn`, run by both `encode_txn` and `decode_txn`):
- at most `MAX_TXN_ITEMS` compares + operations in the whole tree, nesting at most
  `MAX_TXN_DEPTH` deep (the top level is depth 1), an encoding of at most `MAX_TXN_BYTES`;
- keys are non-empty and at most `MAX_KEY_SIZE` bytes; numbers are 0 .. 2^63 - 1;
- a LEASE compare, like a PUT with a lease, is a later form of TXN (target 5: a node below feature
  level 5 decodes it as malformed; `has_lease`);
- only a PUT carries a lease (a valid lease id: `leases.check_id`) and `checked` (0 .. 2^63 - 1,
  and 0 without a lease); a PUT with a lease is encoded as kind PUT_LEASE, a later form of TXN
  that a node below feature level 5 decodes as malformed (`node.version.FORM_LEVELS`);
- no key is written (PUT or DELETE) twice on any path the transaction can take (etcd's rule:
  every write of a transaction has the same revision, and one key has one version per
  revision); the two branches of one nested transaction may write the same key. A DELETE_RANGE
  may cover keys the transaction PUTs or DELETEs (unlike etcd, which refuses that overlap): the
  operations are sequential and each key keeps its final state, one version at the revision;
- a DELETE_RANGE's start and end are at most `MAX_KEY_SIZE` bytes, not both empty, and a
  non-empty end is above the start; it is a later form of TXN (level 6, `has_delete_range`);
- `decode_txn(encode_txn(t)) == t`, and decoding anything else raises ValueError (never another
  exception type), likewise for results.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from . import leases
from .keylimit import MAX_KEY_SIZE

MAX_TXN_ITEMS = 128
"""Compares plus operations in a whole transaction tree."""
MAX_TXN_DEPTH = 4
"""Nesting depth (the top-level transaction is depth 1)."""
MAX_TXN_BYTES = 4 << 20
"""The largest encoded transaction (the server's request limit is usually smaller)."""
NUMBER_MAX = (1 << 63) - 1

_COUNTS = struct.Struct(">HHH")
_CMP = struct.Struct(">BBH")
_OP = struct.Struct(">BH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_RES = struct.Struct(">BQH")
_META = struct.Struct(">QQQI")


class Target(enum.IntEnum):
    VALUE = 1
    VERSION = 2
    CREATE = 3
    MOD = 4
    LEASE = 5


class CmpResult(enum.IntEnum):
    EQUAL = 1
    NOT_EQUAL = 2
    GREATER = 3
    LESS = 4


class OpKind(enum.IntEnum):
    PUT = 1
    DELETE = 2
    GET = 3
    TXN = 4
    DELETE_RANGE = 6
    """Wire kind 6 (5 is PUT_LEASE, a PUT's form)."""


_TARGETS = {int(t): t for t in Target}
_RESULTS = {int(r): r for r in CmpResult}
_KINDS = {int(k): k for k in OpKind}
PUT_LEASE = 5
"""The wire kind of a PUT with a lease (decoded as an OpKind.PUT carrying `lease`, `checked`)."""
_LEASE_TAIL = struct.Struct(">QQ")


@dataclass(frozen=True, slots=True)
class Compare:
    """`target(key) result operand`: `value` is the operand of a VALUE compare, `number` of the others."""

    key: bytes
    target: Target
    result: CmpResult
    value: bytes = b""
    number: int = 0


@dataclass(frozen=True, slots=True)
class TxnOp:
    """One operation: PUT `key` = `value`, DELETE `key`, GET `key`, DELETE_RANGE [`key`, `end`)
    (`end` b"": no end), or the nested `txn` (no key). A PUT's `lease` (0: none) attaches the key
    to that lease; `checked` is a LEASE_PUT's (when the lease was seen live at its home,
    `leases.LeaseCmd.checked`)."""

    kind: OpKind
    key: bytes = b""
    value: bytes = b""
    txn: Txn | None = None
    lease: int = 0
    checked: int = 0
    end: bytes = b""


@dataclass(frozen=True, slots=True)
class Txn:
    compares: tuple[Compare, ...] = ()
    success: tuple[TxnOp, ...] = ()
    failure: tuple[TxnOp, ...] = ()


@dataclass(frozen=True, slots=True)
class OpResult:
    """What one operation did. PUT: nothing more (its revision is the transaction's). DELETE:
    `found` = the key existed. GET: `found`, and when found `value` and the key's metadata.
    TXN: `txn`, the nested transaction's result. DELETE_RANGE: `deleted`, how many keys."""

    kind: OpKind
    found: bool = False
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    txn: TxnResult | None = None
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Whether the compares held, one result per operation of the branch taken, and the revision
    of the transaction's writes (0: it wrote nothing; the same in nested results)."""

    succeeded: bool
    responses: tuple[OpResult, ...] = ()
    revision: int = 0


@dataclass(slots=True)
class Current:
    """A key's current state as `evaluate` reads it (None for an absent key)."""

    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0
    """The lease the key is attached to (0: none, or not read: see `compares_lease`)."""


Reader = Callable[[bytes], "Current | None"]
Scanner = Callable[[bytes, bytes], "Iterable[bytes]"]
"""The keys present in [start, end) (end b"": no end) before the transaction, in any order."""


# --- validation ----------------------------------------------------------------------------------
def _check_key(key: bytes) -> None:
    if not key:
        raise ValueError("transaction key must not be empty")
    if len(key) > MAX_KEY_SIZE:
        raise ValueError(f"key of {len(key)} bytes exceeds the maximum of {MAX_KEY_SIZE}")


def _writes(ops: tuple[TxnOp, ...]) -> set[bytes]:
    """The keys a branch may write; ValueError if one path writes a key twice."""
    out: set[bytes] = set()
    for op in ops:
        if op.kind in (OpKind.PUT, OpKind.DELETE):
            mine = {op.key}
        elif op.kind == OpKind.TXN and op.txn is not None:
            mine = _writes(op.txn.success) | _writes(op.txn.failure)
        else:
            continue
        dup = out & mine
        if dup:
            raise ValueError(f"transaction writes key {min(dup)!r} more than once")
        out |= mine
    return out


def check_txn(t: Txn) -> None:
    """Raise ValueError unless `t` keeps the module's invariants (size checked by the codec)."""
    items = 0

    def walk(t: Txn, depth: int) -> None:
        nonlocal items
        if depth > MAX_TXN_DEPTH:
            raise ValueError(f"transaction nested deeper than {MAX_TXN_DEPTH}")
        items += len(t.compares) + len(t.success) + len(t.failure)
        if items > MAX_TXN_ITEMS:
            raise ValueError(f"transaction has more than {MAX_TXN_ITEMS} compares and operations")
        for c in t.compares:
            _check_key(c.key)
            if not isinstance(c.target, Target) or not isinstance(c.result, CmpResult):
                raise ValueError(f"bad compare {c.target!r} {c.result!r}")
            if c.target == Target.VALUE:
                if c.number:
                    raise ValueError("a VALUE compare carries no number")
            elif c.value or not 0 <= c.number <= NUMBER_MAX:
                raise ValueError(f"a {c.target.name} compare needs a number in 0..{NUMBER_MAX} and no value")
        for op in (*t.success, *t.failure):
            if op.kind == OpKind.TXN:
                if op.txn is None or op.key or op.value:
                    raise ValueError("a nested transaction operation carries a transaction and no key or value")
                walk(op.txn, depth + 1)
                continue
            if not isinstance(op.kind, OpKind):
                raise ValueError(f"bad operation kind {op.kind!r}")
            if op.kind == OpKind.DELETE_RANGE:
                if op.txn is not None or op.value or op.lease or op.checked:
                    raise ValueError("a DELETE_RANGE operation carries only a start and an end")
                check_range(op.key, op.end)
                continue
            if op.end:
                raise ValueError(f"a {op.kind.name} operation carries no range end")
            _check_key(op.key)
            if op.txn is not None or (op.value and op.kind != OpKind.PUT):
                raise ValueError(f"a {op.kind.name} operation carries only a key")
            if op.lease or op.checked:
                if op.kind != OpKind.PUT:
                    raise ValueError(f"a {op.kind.name} operation carries no lease")
                leases.check_id(op.lease)
                if type(op.checked) is not int or not 0 <= op.checked <= NUMBER_MAX:
                    raise ValueError(f"a leased put's checked revision {op.checked!r} is out of range")

    walk(t, 1)
    _writes(t.success)
    _writes(t.failure)


def check_range(start: bytes, end: bytes) -> None:
    """ValueError unless [start, end) is a DELETE_RANGE's range (module docstring)."""
    if len(start) > MAX_KEY_SIZE or len(end) > MAX_KEY_SIZE:
        raise ValueError(f"a range bound is longer than {MAX_KEY_SIZE} bytes")
    if not start and not end:
        raise ValueError("a range delete needs a start or an end (the whole key space: start b'\\x00')")
    if end and end <= start:
        raise ValueError("a range delete's end is at or before its start")


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """Whether `key` is in [start, end) (end b"": no end)."""
    return key >= start and (not end or key < end)


def delete_ranges(t: Txn) -> Iterator[tuple[bytes, bytes]]:
    """(start, end) of every DELETE_RANGE on any path of `t`."""
    for op in (*t.success, *t.failure):
        if op.kind == OpKind.DELETE_RANGE:
            yield op.key, op.end
        elif op.txn is not None:
            yield from delete_ranges(op.txn)


def has_delete_range(t: Txn) -> bool:
    """Whether a DELETE_RANGE is on any path of `t` (its encoding then needs level 6, and it
    runs only as a two-phase commit over every data group)."""
    return any(True for _ in delete_ranges(t))


def range_hull(t: Txn) -> tuple[bytes, bytes] | None:
    """The smallest range [start, end) (end b"": no end) holding every DELETE_RANGE of `t` (the
    range a two-phase commit locks in each group), or None without one."""
    rs = list(delete_ranges(t))
    if not rs:
        return None
    lo = min(s for s, _ in rs)
    hi = b"" if any(not e for _, e in rs) else max(e for _, e in rs)
    return lo, hi


def compares_lease(t: Txn) -> bool:
    """Whether a LEASE compare is on any path of `t` (its reader must then fill `Current.lease`)."""
    return any(c.target == Target.LEASE for c in t.compares) or any(
        op.txn is not None and compares_lease(op.txn) for op in (*t.success, *t.failure))


def has_lease(t: Txn) -> bool:
    """Whether a PUT with a lease or a LEASE compare is on any path of `t` (its encoding then
    needs level 5)."""
    return compares_lease(t) or any(leased_puts(t))


def leased_puts(t: Txn) -> Iterator[tuple[bytes, int]]:
    """(key, lease) of every PUT with a lease on any path of `t`."""
    for op in (*t.success, *t.failure):
        if op.lease:
            yield op.key, op.lease
        elif op.txn is not None:
            yield from leased_puts(op.txn)


def keys_of(t: Txn) -> Iterator[tuple[bytes, bool]]:
    """Every (key, written) the transaction names, on every path (compares and GETs: read; a
    DELETE_RANGE names none)."""
    for c in t.compares:
        yield c.key, False
    for op in (*t.success, *t.failure):
        if op.kind == OpKind.TXN:
            assert op.txn is not None
            yield from keys_of(op.txn)
        elif op.kind != OpKind.DELETE_RANGE:  # its keys are not named: `delete_ranges`
            yield op.key, op.kind != OpKind.GET


# --- codec ---------------------------------------------------------------------------------------
def encode_txn(t: Txn) -> bytes:
    """Encode `t`; ValueError if it breaks the invariants."""
    check_txn(t)
    out = bytearray()
    _enc(t, out)
    if len(out) > MAX_TXN_BYTES:
        raise ValueError(f"transaction of {len(out)} bytes exceeds the maximum of {MAX_TXN_BYTES}")
    return bytes(out)


def _enc(t: Txn, out: bytearray) -> None:
    out += _COUNTS.pack(len(t.compares), len(t.success), len(t.failure))
    for c in t.compares:
        out += _CMP.pack(c.target, c.result, len(c.key)) + c.key
        out += _U32.pack(len(c.value)) + c.value if c.target == Target.VALUE else _U64.pack(c.number)
    for op in (*t.success, *t.failure):
        out += _OP.pack(PUT_LEASE if op.lease else op.kind, len(op.key)) + op.key
        if op.kind == OpKind.PUT:
            out += _U32.pack(len(op.value)) + op.value
            if op.lease:
                out += _LEASE_TAIL.pack(op.lease, op.checked)
        elif op.kind == OpKind.TXN:
            assert op.txn is not None
            _enc(op.txn, out)
        elif op.kind == OpKind.DELETE_RANGE:
            out += _U16.pack(len(op.end)) + op.end


class _Buf:
    """A cursor over bytes whose reads raise ValueError when they run past the end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ValueError(f"transaction truncated in {what}")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def unpack(self, s: struct.Struct, what: str) -> tuple[int, ...]:
        return s.unpack(self.take(s.size, what))


def decode_txn(data: bytes, pos: int = 0) -> Txn:
    """Decode a transaction occupying data[pos:] exactly; ValueError for anything malformed."""
    data = bytes(data)
    if len(data) - pos > MAX_TXN_BYTES:
        raise ValueError(f"transaction of {len(data) - pos} bytes exceeds the maximum of {MAX_TXN_BYTES}")
    buf = _Buf(data, pos)
    items = [0]
    t = _dec(buf, 1, items)
    if buf.pos != len(data):
        raise ValueError(f"transaction has {len(data) - buf.pos} trailing bytes")
    check_txn(t)
    return t


def _dec(buf: _Buf, depth: int, items: list[int]) -> Txn:
    if depth > MAX_TXN_DEPTH:
        raise ValueError(f"transaction nested deeper than {MAX_TXN_DEPTH}")
    nc, ns, nf = buf.unpack(_COUNTS, "its counts")
    items[0] += nc + ns + nf
    if items[0] > MAX_TXN_ITEMS:
        raise ValueError(f"transaction has more than {MAX_TXN_ITEMS} compares and operations")
    cmps = []
    for _ in range(nc):
        tg, rs, kl = buf.unpack(_CMP, "a compare")
        target, result = _TARGETS.get(tg), _RESULTS.get(rs)
        if target is None or result is None:
            raise ValueError(f"unknown compare target {tg} or result {rs}")
        key = buf.take(kl, "a compare key")
        if target == Target.VALUE:
            (vl,) = buf.unpack(_U32, "a compare value length")
            cmps.append(Compare(key, target, result, buf.take(vl, "a compare value")))
        else:
            (num,) = buf.unpack(_U64, "a compare number")
            cmps.append(Compare(key, target, result, b"", num))
    ops: list[TxnOp] = []
    for _ in range(ns + nf):
        k, kl = buf.unpack(_OP, "an operation")
        kind = OpKind.PUT if k == PUT_LEASE else _KINDS.get(k)
        if kind is None:
            raise ValueError(f"unknown transaction operation kind {k}")
        key = buf.take(kl, "an operation key")
        if kind == OpKind.PUT:
            (vl,) = buf.unpack(_U32, "a put value length")
            value = buf.take(vl, "a put value")
            if k == PUT_LEASE:
                lease, checked = buf.unpack(_LEASE_TAIL, "a put's lease")
                if not lease:
                    raise ValueError("a leased put with lease 0")  # not canonical: that is a PUT
                ops.append(TxnOp(kind, key, value, lease=lease, checked=checked))
            else:
                ops.append(TxnOp(kind, key, value))
        elif kind == OpKind.TXN:
            if key:
                raise ValueError("a nested transaction operation carries a key")
            ops.append(TxnOp(kind, txn=_dec(buf, depth + 1, items)))
        elif kind == OpKind.DELETE_RANGE:
            (el,) = buf.unpack(_U16, "a range end length")
            ops.append(TxnOp(kind, key, end=buf.take(el, "a range end")))
        else:
            ops.append(TxnOp(kind, key))
    return Txn(tuple(cmps), tuple(ops[:ns]), tuple(ops[ns:]))


def encode_txn_result(r: TxnResult) -> bytes:
    out = bytearray()
    _enc_res(r, out)
    return bytes(out)


def _enc_res(r: TxnResult, out: bytearray) -> None:
    out += _RES.pack(1 if r.succeeded else 0, r.revision, len(r.responses))
    for o in r.responses:
        out.append(o.kind)
        if o.kind == OpKind.DELETE:
            out.append(1 if o.found else 0)
        elif o.kind == OpKind.GET:
            out.append(1 if o.found else 0)
            if o.found:
                out += _META.pack(o.create_revision, o.mod_revision, o.version, len(o.value)) + o.value
        elif o.kind == OpKind.TXN:
            assert o.txn is not None
            _enc_res(o.txn, out)
        elif o.kind == OpKind.DELETE_RANGE:
            out += _U64.pack(o.deleted)


def decode_txn_result(data: bytes, pos: int = 0) -> tuple[TxnResult, int]:
    """Decode a result starting at data[pos]; returns it and the position after it. ValueError
    for anything malformed."""
    buf = _Buf(bytes(data), pos)
    r = _dec_res(buf, 1)
    return r, buf.pos


def _dec_res(buf: _Buf, depth: int) -> TxnResult:
    if depth > MAX_TXN_DEPTH:
        raise ValueError(f"transaction result nested deeper than {MAX_TXN_DEPTH}")
    flags, rev, n = buf.unpack(_RES, "a result header")
    if flags & ~1:
        raise ValueError(f"transaction result has unknown flags {flags:#x}")
    if n > MAX_TXN_ITEMS:
        raise ValueError(f"transaction result with {n} responses")
    out = []
    for _ in range(n):
        (k,) = buf.take(1, "a response kind")
        kind = _KINDS.get(k)
        if kind is None:
            raise ValueError(f"unknown transaction response kind {k}")
        if kind == OpKind.PUT:
            out.append(OpResult(kind))
        elif kind == OpKind.TXN:
            out.append(OpResult(kind, txn=_dec_res(buf, depth + 1)))
        elif kind == OpKind.DELETE_RANGE:
            (n,) = buf.unpack(_U64, "a range delete's count")
            if n > NUMBER_MAX:
                raise ValueError(f"a range delete's count {n} is out of range")
            out.append(OpResult(kind, deleted=n))
        else:
            (found,) = buf.take(1, "a response flag")
            if found > 1:
                raise ValueError(f"transaction response flag {found}")
            if kind == OpKind.GET and found:
                c, m, v, vl = buf.unpack(_META, "a get response")
                out.append(OpResult(kind, True, buf.take(vl, "a get value"), c, m, v))
            else:
                out.append(OpResult(kind, bool(found)))
    return TxnResult(bool(flags & 1), tuple(out), rev)


# --- evaluation ----------------------------------------------------------------------------------
def _holds(c: Compare, cur: Current | None) -> bool:
    if c.target == Target.VALUE:
        if cur is None:
            return False
        a: bytes | int = cur.value
        b: bytes | int = c.value
    else:
        a = 0 if cur is None else (
            cur.version if c.target == Target.VERSION
            else cur.create_revision if c.target == Target.CREATE
            else cur.lease if c.target == Target.LEASE else cur.mod_revision
        )
        b = c.number
    if c.result == CmpResult.EQUAL:
        return a == b
    if c.result == CmpResult.NOT_EQUAL:
        return a != b
    if c.result == CmpResult.GREATER:
        return a > b  # type: ignore[operator]
    return a < b  # type: ignore[operator]


MAX_RESULT_VALUE_BYTES = 32 << 20
"""The most value bytes one transaction's GETs may return, together (a result must fit a reply,
and a result with a session is kept in every replica's session table until acknowledged: 128
GETs of a 1 MiB value would otherwise make a 561-byte command answer with 128 MiB)."""


class ResultTooLarge(ValueError):
    """The transaction's GETs would return more than `MAX_RESULT_VALUE_BYTES`: it is refused
    whole (the same on every replica: the total is a function of the state)."""


@dataclass(slots=True)
class Outcome:
    """`evaluate`'s answer: the result, and the writes to make at its revision in order (key,
    new value; None: delete a present key; each key once, its final state); `leased`: (key,
    lease, checked) of every PUT with a lease among them, in order; `ranges`: the DELETE_RANGEs
    the path taken ran, (start, end) in order, each once: every key present in one of them that
    is not among `writes` is deleted at the revision too (`writes` holds every named key such a
    range deleted that a PUT or DELETE of the transaction wrote before it)."""

    result: TxnResult
    writes: list[tuple[bytes, bytes | None]]
    leased: list[tuple[bytes, int, int]] = field(default_factory=list)
    ranges: list[tuple[bytes, bytes]] = field(default_factory=list)


class NoScanner(ValueError):
    """A DELETE_RANGE met by an evaluation without a `Scanner` (a one-group TXN)."""


def evaluate(t: Txn, read: Reader, revision: int, scan: Scanner | None = None) -> Outcome:
    """Evaluate `t` against the state `read` returns, as if its writes happen at `revision`
    (pure: nothing is written; deterministic). The caller makes `Outcome.writes`, all at
    `revision`, and deletes the keys of `Outcome.ranges` that are not among them; the result's
    revision is `revision` if the transaction wrote or deleted anything, else 0. `scan` gives
    the keys present in a range (a DELETE_RANGE's; it must agree with `read`: the keys it gives
    are present, and every named key present in the range is among them); a DELETE_RANGE on the
    path taken without one raises `NoScanner`. Raises `ResultTooLarge` (nothing to write then)
    if the GETs would return more than `MAX_RESULT_VALUE_BYTES` of values."""
    overlay: dict[bytes, Current | None] = {}
    written: dict[bytes, bytes | None] = {}
    leased: list[tuple[bytes, int, int]] = []
    ranges: list[tuple[bytes, bytes]] = []
    range_gone: set[bytes] = set()
    returned = 0
    range_deleted = 0

    def cur(key: bytes) -> Current | None:
        return overlay[key] if key in overlay else read(key)

    def run(t: Txn) -> tuple[bool, list[OpResult]]:
        ok = all(_holds(c, cur(c.key)) for c in t.compares)
        res: list[OpResult] = []
        nonlocal returned, range_deleted
        for op in t.success if ok else t.failure:
            if op.kind == OpKind.GET:
                c = cur(op.key)
                if c is not None:
                    returned += len(c.value)
                    if returned > MAX_RESULT_VALUE_BYTES:
                        raise ResultTooLarge(
                            f"the transaction's gets would return more than {MAX_RESULT_VALUE_BYTES} bytes of values")
                res.append(OpResult(op.kind) if c is None else OpResult(
                    op.kind, True, c.value, c.create_revision, c.mod_revision, c.version))
            elif op.kind == OpKind.PUT:
                c = cur(op.key)
                if c is None and op.key in range_gone:  # one version at R: the key's next (module docstring)
                    c = read(op.key)
                overlay[op.key] = (
                    Current(op.value, revision, revision, 1, op.lease) if c is None
                    else Current(op.value, c.create_revision, revision, c.version + 1, op.lease)
                )
                written[op.key] = op.value
                if op.lease:
                    leased.append((op.key, op.lease, op.checked))
                res.append(OpResult(op.kind))
            elif op.kind == OpKind.DELETE:
                c = cur(op.key)
                if c is not None:
                    overlay[op.key] = None
                    written[op.key] = None
                res.append(OpResult(op.kind, c is not None))
            elif op.kind == OpKind.DELETE_RANGE:
                if scan is None:
                    raise NoScanner("a range delete inside a transaction runs only across groups")
                lo, hi = op.key, op.end
                present = {k for k in scan(lo, hi) if k not in overlay and in_range(k, lo, hi)}
                present |= {k for k, v in overlay.items() if v is not None and in_range(k, lo, hi)}
                for k in present:
                    overlay[k] = None
                    range_gone.add(k)
                    if k in written:  # a PUT of this transaction before it: now deleted
                        written[k] = None
                leased[:] = [x for x in leased if not in_range(x[0], lo, hi)]
                if (lo, hi) not in ranges:
                    ranges.append((lo, hi))
                range_deleted += len(present)
                res.append(OpResult(op.kind, deleted=len(present)))
            else:
                assert op.txn is not None
                sub_ok, sub = run(op.txn)
                res.append(OpResult(op.kind, txn=TxnResult(sub_ok, tuple(sub))))
        return ok, res

    ok, res = run(t)
    rev = revision if written or range_deleted else 0
    return Outcome(_stamp(TxnResult(ok, tuple(res)), rev), list(written.items()), leased, ranges)


def _stamp(r: TxnResult, rev: int) -> TxnResult:
    """`r` with `rev` as the revision of it and of every nested result."""
    return TxnResult(
        r.succeeded,
        tuple(OpResult(o.kind, txn=_stamp(o.txn, rev)) if o.txn is not None else o for o in r.responses),
        rev,
    )


def writes_of(t: Txn, r: TxnResult) -> list[tuple[bytes, bytes | None]]:
    """The writes (key, new value; None: deleted) that applying `t` made, given its result `r`
    (the same list `evaluate` returned: the branches `r` says ran, a DELETE only if the key
    existed). ValueError if `r` is not a result of `t` (checkers use it on replicated results)."""
    ops = t.success if r.succeeded else t.failure
    if len(ops) != len(r.responses):
        raise ValueError("transaction result does not match the transaction")
    out: list[tuple[bytes, bytes | None]] = []
    for op, o in zip(ops, r.responses, strict=True):
        if op.kind != o.kind:
            raise ValueError("transaction result does not match the transaction")
        if op.kind == OpKind.PUT:
            out.append((op.key, op.value))
        elif op.kind == OpKind.DELETE and o.found:
            out.append((op.key, None))
        elif op.kind == OpKind.TXN:
            assert op.txn is not None and o.txn is not None
            out += writes_of(op.txn, o.txn)
        elif op.kind == OpKind.DELETE_RANGE:
            raise ValueError("a range delete's writes are not in its result")
    return out
