"""State-machine commands carried in Raft entries, and their results. STANDARD LIBRARY ONLY.

The deterministic simulator imports this module; `tests/unit/test_storage.py` walks its imports.

Command wire format (big-endian, `struct`; never pickle or json):

    header   version:u8 (=3)  op:u8  client_id:u64  seq:u64  ack:u64
             flags:u8 (bit 0 = retry)  horizon:u64  revision:u64               43 bytes
             (versions 1 and 2, written by earlier releases, are decoded too: version 2's
             35-byte header stops before `revision` (0), version 1's 26-byte header after ack,
             with retry = False and horizon = 0)
    PUT      key_len:u32  key  value                          (value = the rest)
    DELETE   key_len:u32  key                                 (nothing may follow)
    CAS      flags:u8 (bit 0 = expect_absent)  key_len:u32  expected_len:u32  key  expected  value
    COMPACT  revision:u64 [keep:u8 = 1]                       (compact history at it; no key;
                                                               with the keep byte: under the
                                                               keep rule, `mvcc.compact`,
                                                               feature level 8)
    CLOSE    revision:u64                                     (close the group at it; no key,
                                                               no session)
    TXN      txn                                              (`txn.py`'s encoding, the rest;
                                                               no key: the command's key is b"")
    PREPARE .. FINALIZE (7..12)  body                         (`xtxn.py`'s encoding, the rest;
                                                               no key; only RECORD may carry a
                                                               session, only PREPARE a revision)
    LEASE_*  lease_id:u64 ttl_s:u64 renews:u64 remaining_ms:u64 [checked:u64: LEASE_PUT]  (ops 20..29, `leases.py`; no key,
             [until:u64: LEASE_ORPHAN]                            except LEASE_PUT's)
             LEASE_PUT then key_len:u32 key value

`revision` is the leader's proposed revision for the write (`mvcc.next_revision` turns it into
the write's revision at apply; 0 = none proposed). COMPACT and CLOSE carry their revision in
their body (the header's is 0). CLOSE raises the group's last revision to its revision without
writing (`machine.close`): once applied, the group never again writes at or below it.

Session fields: `client_id` 0 means "no session" (no deduplication); otherwise (client_id, seq)
names the request for exactly-once application, and `ack` says "the client has received replies
for every seq < ack" so the state machine may forget those results. `retry` says "an earlier
attempt of this write may have been applied" and `horizon` is the highest applied index of the
target group the client had seen in any reply before its first attempt that may have applied
(0 = unknown); together they let the state machine refuse a retry whose session expired
(`machine.apply_command`, result flag `session_expired`) instead of applying it a second time.

Result format: version:u8 (=2)  flags:u8  revision:u64  [current_len:u32 current]  [error: utf-8, the rest]
(version 1, cached by the previous release, has no revision: decoded with revision 0)
with flags bit 0 swapped, 1 found, 2 existed, 3 current present, 4 error present, 5 wrong shard,
6 session expired (never cached: such a result only answers the request that got it), 7 a
transaction result present (`txn.py`'s result encoding, after `current`, before the error).

Invariants:
- `decode_command(encode_command(c)) == c` for every valid command;
- decoding anything else raises `ValueError` with a message saying what is wrong (never another
  exception type), so the apply logic can turn garbage into a deterministic error result;
- keys are at most `MAX_KEY_SIZE` bytes (LMDB's 511-byte key limit minus the 8-byte group prefix);
  longer keys are rejected by both encoding and decoding.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from .keylimit import MAX_KEY_SIZE
from .leases import Kind as LeaseKind
from .leases import LeaseCmd
from .leases import body_size as lease_body_size
from .leases import decode_body as decode_lease_body
from .leases import encode_body as encode_lease_body
from .txn import Txn, TxnResult, decode_txn, decode_txn_result, encode_txn, encode_txn_result
from .xtxn import XCmd, XOp, decode_body, encode_body

__all__ = ["MAX_KEY_SIZE"]

FORMAT_VERSION = 3
FORMAT_VERSION_2 = 2
"""The previous release's format (no proposed revision): still decoded."""
FORMAT_VERSION_1 = 1
"""The format before it (no retry flag, no horizon): still decoded."""
RESULT_VERSION = 2
RESULT_VERSION_1 = 1


U64_MAX = (1 << 64) - 1

_HEAD = struct.Struct(">BBQQQBQQ")
_HEAD_V2 = struct.Struct(">BBQQQBQ")
_HEAD_V1 = struct.Struct(">BBQQQ")
_SESSION = struct.Struct(">BBQQ")
"""The current header's first fields: version, op, client_id, seq."""
_RETRY = 0x01
_U32 = struct.Struct(">I")
_CAS = struct.Struct(">BII")
_RES = struct.Struct(">BBQ")
_RES_V1 = struct.Struct(">BB")
_U64 = struct.Struct(">Q")

_CAS_EXPECT_ABSENT = 0x01


def command_size_bound(key_len: int, value_len: int) -> int:
    """The size of the largest command with a key of `key_len` bytes and values of at most
    `value_len` bytes (a CAS: its expected value and its new value)."""
    return _HEAD.size + _CAS.size + key_len + 2 * value_len

_R_SWAPPED = 0x01
_R_FOUND = 0x02
_R_EXISTED = 0x04
_R_CURRENT = 0x08
_R_ERROR = 0x10
_R_WRONG_SHARD = 0x20
_R_SESSION_EXPIRED = 0x40
_R_TXN = 0x80
_R_ALL = (
    _R_SWAPPED | _R_FOUND | _R_EXISTED | _R_CURRENT | _R_ERROR | _R_WRONG_SHARD | _R_SESSION_EXPIRED | _R_TXN
)


class Op(enum.IntEnum):
    PUT = 1
    DELETE = 2
    CAS = 3
    COMPACT = 4
    CLOSE = 5
    TXN = 6
    PREPARE = int(XOp.PREPARE)
    COMMIT = int(XOp.COMMIT)
    ABORT = int(XOp.ABORT)
    RECORD = int(XOp.RECORD)
    RESOLVE = int(XOp.RESOLVE)
    FINALIZE = int(XOp.FINALIZE)
    LEASE_GRANT = 20
    LEASE_REVOKE = 21
    LEASE_RENEW = 22
    LEASE_CHECKPOINT = 23
    LEASE_EXPIRE = 24
    LEASE_DROP = 25
    LEASE_FORGET = 26
    LEASE_PUT = 27
    LEASE_STATUS = 28
    LEASE_ORPHAN = 29


X_OPS = frozenset((Op.PREPARE, Op.COMMIT, Op.ABORT, Op.RECORD, Op.RESOLVE, Op.FINALIZE))
"""The commands of transactions across groups (`xtxn.py`): proposed only by a node's own
coordinator or resolver, never accepted from a client or a peer's GroupPropose."""


LEASE_OPS = frozenset(int(k) for k in LeaseKind)
"""The lease commands' ops (`leases.Kind`; each `Op.LEASE_*` has the same code)."""
assert {int(o) for o in Op if o.name.startswith("LEASE_")} == LEASE_OPS

_BODY_ONLY = (Op.COMPACT, Op.CLOSE)
"""Ops whose only field is the revision in their body (no key, value, or header revision)."""

_OPS = {int(o): o for o in Op}

_COMPACT_KEEP = 1
"""The COMPACT body's trailing byte of its keep-rule form."""


@dataclass(slots=True)
class Command:
    """One state-machine command. `value` is used by PUT and CAS; `expected`/`expect_absent` by CAS.

    CAS: with `expect_absent`, swap iff the key is absent (`expected` must then be empty);
    otherwise swap iff the key is present and its value equals `expected`.

    A value: nothing assigns to a command's fields once built. Not `frozen`: `decode_command`
    builds one per applied entry, and a frozen dataclass's `__init__` (one `object.__setattr__`
    per field) costs about four times a plain one there (bench/README.md, "Put CPU since the
    revisions"); not hashable, as nothing needs it to be.
    """

    op: Op
    key: bytes
    value: bytes = b""
    expected: bytes = b""
    expect_absent: bool = False
    client_id: int = 0
    seq: int = 0
    ack: int = 0
    retry: bool = False
    """An earlier attempt of this write may have been applied."""
    horizon: int = 0
    """The highest applied index of the target group the client had seen before its first attempt
    that may have applied (0 = unknown)."""
    revision: int = 0
    """PUT/DELETE/CAS/TXN: the leader's proposed revision (0 = none); COMPACT: the compact revision;
    CLOSE: the revision to close the group at."""
    txn: Txn | None = None
    """TXN: the transaction (its key is b"", its value and expected empty)."""
    x: XCmd | None = None
    """PREPARE .. FINALIZE: the cross-group command's body (`x.op` is the command's op)."""
    keep: bool = False
    """COMPACT: compact under the keep rule (the changes at the compact revision stay; the form
    with the keep byte, feature level 8, `node.version.LEVEL_COMPACT_KEEP`); False: the first
    rule (consumed), the only one binaries before that level know."""
    lease: LeaseCmd | None = None
    """LEASE_*: the lease fields (`leases.py`); LEASE_PUT's key and value are `key` and `value`,
    the other lease commands have neither."""

    @classmethod
    def lease_command(
        cls, c: LeaseCmd, key: bytes = b"", value: bytes = b"", client_id: int = 0, seq: int = 0, ack: int = 0,
        retry: bool = False, horizon: int = 0, revision: int = 0,
    ) -> Command:
        """A lease command (`leases.LeaseCmd`); `key`/`value` only for LEASE_PUT."""
        return cls(Op(int(c.kind)), key, value, b"", False, client_id, seq, ack, retry, horizon, revision, lease=c)

    @classmethod
    def put(
        cls, key: bytes, value: bytes, client_id: int = 0, seq: int = 0, ack: int = 0,
        retry: bool = False, horizon: int = 0, revision: int = 0,
    ) -> Command:
        return cls(Op.PUT, key, value, b"", False, client_id, seq, ack, retry, horizon, revision)

    @classmethod
    def delete(
        cls, key: bytes, client_id: int = 0, seq: int = 0, ack: int = 0, retry: bool = False, horizon: int = 0,
        revision: int = 0,
    ) -> Command:
        return cls(Op.DELETE, key, b"", b"", False, client_id, seq, ack, retry, horizon, revision)

    @classmethod
    def cas(
        cls,
        key: bytes,
        expect_absent: bool,
        expected: bytes,
        value: bytes,
        client_id: int = 0,
        seq: int = 0,
        ack: int = 0,
        retry: bool = False,
        horizon: int = 0,
        revision: int = 0,
    ) -> Command:
        return cls(Op.CAS, key, value, expected, expect_absent, client_id, seq, ack, retry, horizon, revision)

    @classmethod
    def transaction(
        cls, t: Txn, client_id: int = 0, seq: int = 0, ack: int = 0, retry: bool = False, horizon: int = 0,
        revision: int = 0,
    ) -> Command:
        return cls(Op.TXN, b"", b"", b"", False, client_id, seq, ack, retry, horizon, revision, t)

    @classmethod
    def cross(
        cls, x: XCmd, client_id: int = 0, seq: int = 0, ack: int = 0, revision: int = 0, retry: bool = False,
        horizon: int = 0,
    ) -> Command:
        """A command of a transaction across groups (a session only on RECORD, a revision only
        on PREPARE)."""
        return cls(Op(int(x.op)), b"", client_id=client_id, seq=seq, ack=ack, retry=retry, horizon=horizon,
                   revision=revision, x=x)

    @classmethod
    def compact(cls, revision: int, keep: bool = False) -> Command:
        """Compact the group's history at `revision` (no session: compaction is idempotent),
        under the keep rule if `keep` (only once the cluster version allows it)."""
        return cls(Op.COMPACT, b"", revision=revision, keep=keep)

    @classmethod
    def close(cls, revision: int) -> Command:
        """Close the group at `revision`: its last revision becomes at least `revision`, so every
        later write of the group gets a higher one (no key, no session: closing is idempotent)."""
        return cls(Op.CLOSE, b"", revision=revision)


@dataclass(slots=True)
class ApplyResult:
    """What applying one command did. Cached per (client_id, seq) in the session table.

    PUT: all flags False. DELETE: `existed`. CAS: `swapped`, `found` (the key was present) and
    `current` (the value found, when not swapped and found). `error` is set instead when the command
    could not be applied (malformed, or a stale retry below the session's ack floor); such a command
    changed nothing.
    """

    swapped: bool = False
    found: bool = False
    existed: bool = False
    current: bytes | None = None
    error: str | None = None
    wrong_shard: bool = False
    """The group does not serve the key (not applied, never cached; `error` says so too)."""
    session_expired: bool = False
    """A retry whose session expired: not applied now, never cached, `error` says so too; an
    earlier attempt may have been applied (indeterminate for the client)."""
    txn: TxnResult | None = None
    """A TXN's result (None for every other command; a TXN refused before it ran has none either)."""
    revision: int = field(default=0, compare=False)
    """The revision of the write (0: it changed nothing, e.g. a failed CAS or a delete of an
    absent key; for a COMPACT, the revision the group compacted at; for a CLOSE, the group's last
    revision after it). Encoded (a retry answers
    the same revision), but not part of equality, like `index`: results compare by outcome."""
    index: int = field(default=0, compare=False)
    """The log index of the entry that produced this result (set by the caller that applied it;
    not part of the encoded result)."""


# --- commands ------------------------------------------------------------------------------------
def encode_command(cmd: Command) -> bytes:
    """Encode `cmd`. Raises ValueError for invalid commands (key too long, out-of-range session
    numbers, CAS with expect_absent and a non-empty expected value)."""
    key = bytes(cmd.key)
    if len(key) > MAX_KEY_SIZE:
        raise ValueError(f"key of {len(key)} bytes exceeds the maximum of {MAX_KEY_SIZE}")
    for name, n in (
        ("client_id", cmd.client_id), ("seq", cmd.seq), ("ack", cmd.ack), ("horizon", cmd.horizon),
        ("revision", cmd.revision),
    ):
        if not 0 <= n <= U64_MAX:
            raise ValueError(f"{name} {n} is not a 64-bit unsigned integer")
    rev = 0 if cmd.op in _BODY_ONLY else cmd.revision
    if cmd.keep and cmd.op != Op.COMPACT:
        raise ValueError(f"{cmd.op.name} has no keep rule (only COMPACT has)")
    head = _HEAD.pack(
        FORMAT_VERSION, int(cmd.op), cmd.client_id, cmd.seq, cmd.ack, _RETRY if cmd.retry else 0, cmd.horizon, rev
    )
    if cmd.op in _BODY_ONLY:
        if key or cmd.value or cmd.expected or cmd.expect_absent:
            raise ValueError(f"{cmd.op.name} carries no key or value")
        if cmd.op == Op.CLOSE and (cmd.client_id or cmd.seq or cmd.ack or cmd.retry or cmd.horizon):
            raise ValueError("CLOSE carries no session")
        return head + _U64.pack(cmd.revision) + (bytes((_COMPACT_KEEP,)) if cmd.keep else b"")
    if cmd.op == Op.TXN:
        if key or cmd.value or cmd.expected or cmd.expect_absent or cmd.txn is None:
            raise ValueError("TXN carries a transaction and no key or value")
        return head + encode_txn(cmd.txn)
    if cmd.op in X_OPS:
        if key or cmd.value or cmd.expected or cmd.expect_absent or cmd.txn is not None or cmd.x is None:
            raise ValueError(f"{cmd.op.name} carries its body and no key or value")
        if int(cmd.x.op) != int(cmd.op):
            raise ValueError(f"{cmd.op.name} carries the body of a {cmd.x.op.name}")
        _check_x_head(cmd.op, cmd.client_id, cmd.seq, cmd.ack, cmd.retry, cmd.horizon, cmd.revision)
        return head + encode_body(cmd.x)
    if cmd.txn is not None or cmd.x is not None:
        raise ValueError(f"{cmd.op.name} carries no transaction")
    if int(cmd.op) in LEASE_OPS:
        lc = cmd.lease
        if lc is None or int(lc.kind) != int(cmd.op):
            raise ValueError(f"{cmd.op.name} needs its lease fields of the same kind")
        body = encode_lease_body(lc)
        if cmd.expected or cmd.expect_absent:
            raise ValueError(f"{cmd.op.name} carries no expected value")
        if cmd.op == Op.LEASE_PUT:
            return b"".join((head, body, _U32.pack(len(key)), key, cmd.value))
        if key or cmd.value:
            raise ValueError(f"{cmd.op.name} carries no key or value")
        return head + body
    if cmd.lease is not None:
        raise ValueError(f"{cmd.op.name} carries no lease fields")
    if cmd.op == Op.PUT:
        return b"".join((head, _U32.pack(len(key)), key, cmd.value))
    if cmd.op == Op.DELETE:
        return b"".join((head, _U32.pack(len(key)), key))
    if cmd.op == Op.CAS:
        if cmd.expect_absent and cmd.expected:
            raise ValueError("CAS with expect_absent must not carry an expected value")
        flags = _CAS_EXPECT_ABSENT if cmd.expect_absent else 0
        return b"".join((head, _CAS.pack(flags, len(key), len(cmd.expected)), key, cmd.expected, cmd.value))
    raise ValueError(f"unknown command op {cmd.op!r}")


def _check_x_head(op: Op, client_id: int, seq: int, ack: int, retry: bool, horizon: int, revision: int) -> None:
    """A cross-group command's header: a session only on RECORD, a revision only on PREPARE."""
    if op != Op.RECORD and (client_id or seq or ack or retry or horizon):
        raise ValueError(f"{op.name} carries no session")
    if op != Op.PREPARE and revision:
        raise ValueError(f"{op.name} carries no proposed revision")


def _session_head(
    op: int, key: bytes, client_id: int, seq: int, ack: int, retry: bool, horizon: int, revision: int
) -> bytes:
    """The header of a keyed command (PUT, DELETE, CAS), with the checks `encode_command` makes
    first, in its order and with its messages: the key's length, then each 64-bit field."""
    if len(key) > MAX_KEY_SIZE:
        raise ValueError(f"key of {len(key)} bytes exceeds the maximum of {MAX_KEY_SIZE}")
    if not (
        0 <= client_id <= U64_MAX and 0 <= seq <= U64_MAX and 0 <= ack <= U64_MAX and 0 <= horizon <= U64_MAX
        and 0 <= revision <= U64_MAX
    ):
        for name, n in (("client_id", client_id), ("seq", seq), ("ack", ack), ("horizon", horizon), ("revision", revision)):
            if not 0 <= n <= U64_MAX:
                raise ValueError(f"{name} {n} is not a 64-bit unsigned integer")
    return _HEAD.pack(FORMAT_VERSION, op, client_id, seq, ack, _RETRY if retry else 0, horizon, revision)


# The write path's encoders build the bytes directly (no `Command` on the way: the hot path of
# every write request); each returns exactly `encode_command` of the same command and refuses
# exactly what it refuses, with the same message (tests/unit/test_commands_fast.py checks both).
_OP_PUT, _OP_DELETE, _OP_CAS = int(Op.PUT), int(Op.DELETE), int(Op.CAS)


def encode_put(
    key: bytes, value: bytes, client_id: int = 0, seq: int = 0, ack: int = 0, retry: bool = False, horizon: int = 0,
    revision: int = 0,
) -> bytes:
    key = bytes(key)
    head = _session_head(_OP_PUT, key, client_id, seq, ack, retry, horizon, revision)
    return b"".join((head, _U32.pack(len(key)), key, value))


def encode_delete(
    key: bytes, client_id: int = 0, seq: int = 0, ack: int = 0, retry: bool = False, horizon: int = 0,
    revision: int = 0,
) -> bytes:
    key = bytes(key)
    head = _session_head(_OP_DELETE, key, client_id, seq, ack, retry, horizon, revision)
    return b"".join((head, _U32.pack(len(key)), key))


def encode_cas(
    key: bytes,
    expect_absent: bool,
    expected: bytes,
    value: bytes,
    client_id: int = 0,
    seq: int = 0,
    ack: int = 0,
    retry: bool = False,
    horizon: int = 0,
    revision: int = 0,
) -> bytes:
    key = bytes(key)
    head = _session_head(_OP_CAS, key, client_id, seq, ack, retry, horizon, revision)
    if expect_absent and expected:
        raise ValueError("CAS with expect_absent must not carry an expected value")
    flags = _CAS_EXPECT_ABSENT if expect_absent else 0
    return b"".join((head, _CAS.pack(flags, len(key), len(expected)), key, expected, value))


def encode_compact(revision: int, keep: bool = False) -> bytes:
    """A COMPACT at `revision`; with `keep`, its keep-rule form (feature level 8)."""
    return encode_command(Command.compact(revision, keep))


def encode_close(revision: int) -> bytes:
    """A CLOSE of the group at `revision` (ValueError unless 0 <= revision < 2^64)."""
    return encode_command(Command.close(revision))


def unknown_kind(data: bytes) -> int | None:
    """The kind (op code) of `data` if it is what a newer release would write for a kind this one
    does not know (`kvstore.node.version`): the current format's whole, well-formed header (a
    newer release never writes a new kind in an older format) with an op code outside `Op`.
    Anything else that does not decode is garbage (None): an error result at apply, not a stop,
    so a short or damaged entry never stops a node."""
    if len(data) < _HEAD.size or data[0] != FORMAT_VERSION or data[1] in _OPS:
        return None
    if _HEAD.unpack_from(data)[5] & ~_RETRY:
        return None
    return data[1]


def session_of(data: bytes) -> tuple[int, int] | None:
    """(client_id, seq) of a command in the current format that carries a session, else None
    (client_id 0: no session; an older format or a short header: never a retry to join). Reads
    only the header: cheap enough for every proposal. Says nothing about the rest being valid."""
    if len(data) < _HEAD.size or data[0] != FORMAT_VERSION:
        return None
    _, _, client_id, seq = _SESSION.unpack_from(data)
    return (client_id, seq) if client_id else None


def same_write(a: bytes, b: bytes) -> bool:
    """Are `a` and `b` attempts of one session write: the same format, op, client_id, seq and
    body byte for byte, differing at most in the header fields an attempt sets for itself (ack,
    the retry flag, horizon, the proposed revision), and both valid commands?

    Invariant: when it holds, applying `b` right after `a` answers `b` with `a`'s result (the
    session cache holds it: `machine.apply_command`; ack is capped by seq there, so neither ack
    changes the write's own outcome) or changes nothing at all (a result that is not cached:
    a refusal); so `a`'s result is a true answer for `b`. Both are decoded: a header only one of
    them has valid (unknown flags, a revision on a RECORD) must not borrow the other's result."""
    if session_of(a) is None or a[:_SESSION.size] != b[:_SESSION.size] or a[_HEAD.size:] != b[_HEAD.size:]:
        return False
    try:
        decode_command(a)
        decode_command(b)
    except ValueError:
        return False
    return True


def decode_command(data: bytes) -> Command:
    """Decode a command. Raises ValueError (with a clear message) for anything malformed."""
    data = bytes(data)
    n = len(data)
    if n < 1:
        raise ValueError("command too short: 0 bytes")
    version = data[0]
    if version == FORMAT_VERSION:
        if n < _HEAD.size:
            raise ValueError(f"command too short: {n} bytes, the header alone is {_HEAD.size}")
        _, op, client_id, seq, ack, cflags, horizon, revision = _HEAD.unpack_from(data)
        if cflags & ~_RETRY:
            raise ValueError(f"command has unknown session flags {cflags:#x}")
        retry = bool(cflags & _RETRY)
        pos = _HEAD.size
    elif version == FORMAT_VERSION_2:
        if n < _HEAD_V2.size:
            raise ValueError(f"command too short: {n} bytes, the header alone is {_HEAD_V2.size}")
        _, op, client_id, seq, ack, cflags, horizon = _HEAD_V2.unpack_from(data)
        if cflags & ~_RETRY:
            raise ValueError(f"command has unknown session flags {cflags:#x}")
        retry = bool(cflags & _RETRY)
        revision = 0
        pos = _HEAD_V2.size
    elif version == FORMAT_VERSION_1:
        if n < _HEAD_V1.size:
            raise ValueError(f"command too short: {n} bytes, the header alone is {_HEAD_V1.size}")
        _, op, client_id, seq, ack = _HEAD_V1.unpack_from(data)
        retry, horizon, revision = False, 0, 0
        pos = _HEAD_V1.size
    else:
        raise ValueError(f"unknown command format version {version} (expected 1 to {FORMAT_VERSION})")
    kind = _OPS.get(op)
    if kind is None:
        raise ValueError(f"unknown command op {op}")
    if kind == Op.COMPACT:
        if version != FORMAT_VERSION or n not in (pos + _U64.size, pos + _U64.size + 1) or revision:
            raise ValueError("malformed COMPACT command")
        keep = n == pos + _U64.size + 1
        if keep and data[-1] != _COMPACT_KEEP:
            raise ValueError(f"COMPACT command with an unknown rule byte {data[-1]:#x}")
        (at,) = _U64.unpack_from(data, pos)
        return Command(Op.COMPACT, b"", client_id=client_id, seq=seq, ack=ack, retry=retry, horizon=horizon,
                       revision=at, keep=keep)
    if kind == Op.CLOSE:
        if version != FORMAT_VERSION or n != pos + _U64.size or revision:
            raise ValueError("malformed CLOSE command")
        if client_id or seq or ack or retry or horizon:
            raise ValueError("CLOSE command carries a session")
        (at,) = _U64.unpack_from(data, pos)
        return Command(Op.CLOSE, b"", revision=at)
    if kind in X_OPS:
        if version != FORMAT_VERSION:
            raise ValueError(f"{kind.name} command in format version {version}")
        _check_x_head(kind, client_id, seq, ack, retry, horizon, revision)
        return Command(
            kind, b"", b"", b"", False, client_id, seq, ack, retry, horizon, revision, None,
            decode_body(XOp(int(kind)), data, pos),
        )
    if kind == Op.TXN:
        if version != FORMAT_VERSION:
            raise ValueError(f"TXN command in format version {version}")
        return Command(Op.TXN, b"", b"", b"", False, client_id, seq, ack, retry, horizon, revision, decode_txn(data, pos))
    if op in LEASE_OPS:
        if version != FORMAT_VERSION:
            raise ValueError(f"{kind.name} command in format version {version}")
        end = pos + lease_body_size(op)
        if n < end:
            raise ValueError(f"{kind.name} command truncated: needs {end} bytes, has {n}")
        lc = decode_lease_body(op, data[pos:end])
        if kind != Op.LEASE_PUT:
            if n != end:
                raise ValueError(f"{kind.name} command has {n - end} trailing bytes")
            return Command(kind, b"", b"", b"", False, client_id, seq, ack, retry, horizon, revision, lease=lc)
        if n < end + _U32.size:
            raise ValueError("LEASE_PUT command truncated in its key length")
        (klen,) = _U32.unpack_from(data, end)
        pos = end + _U32.size
        if klen > MAX_KEY_SIZE:
            raise ValueError(f"key of {klen} bytes exceeds the maximum of {MAX_KEY_SIZE}")
        if pos + klen > n:
            raise ValueError(f"LEASE_PUT command truncated: key needs {pos + klen} bytes, has {n}")
        key = data[pos : pos + klen]
        return Command(kind, key, data[pos + klen :], b"", False, client_id, seq, ack, retry, horizon, revision, lease=lc)
    if kind == Op.CAS:
        if n < pos + _CAS.size:
            raise ValueError("CAS command truncated in its length fields")
        flags, klen, elen = _CAS.unpack_from(data, pos)
        if flags & ~_CAS_EXPECT_ABSENT:
            raise ValueError(f"CAS command has unknown flags {flags:#x}")
        pos += _CAS.size
        if klen > MAX_KEY_SIZE:
            raise ValueError(f"key of {klen} bytes exceeds the maximum of {MAX_KEY_SIZE}")
        if pos + klen + elen > n:
            raise ValueError(f"CAS command truncated: needs {pos + klen + elen} bytes, has {n}")
        absent = bool(flags & _CAS_EXPECT_ABSENT)
        if absent and elen:
            raise ValueError("CAS with expect_absent carries an expected value")
        key = data[pos : pos + klen]
        expected = data[pos + klen : pos + klen + elen]
        value = data[pos + klen + elen :]
        return Command(Op.CAS, key, value, expected, absent, client_id, seq, ack, retry, horizon, revision)
    if n < pos + _U32.size:
        raise ValueError(f"{kind.name} command truncated in its key length")
    (klen,) = _U32.unpack_from(data, pos)
    pos += _U32.size
    if klen > MAX_KEY_SIZE:
        raise ValueError(f"key of {klen} bytes exceeds the maximum of {MAX_KEY_SIZE}")
    if pos + klen > n:
        raise ValueError(f"{kind.name} command truncated: key needs {pos + klen} bytes, has {n}")
    key = data[pos : pos + klen]
    if kind == Op.PUT:
        return Command(Op.PUT, key, data[pos + klen :], b"", False, client_id, seq, ack, retry, horizon, revision)
    if pos + klen != n:
        raise ValueError(f"DELETE command has {n - pos - klen} trailing bytes")
    return Command(Op.DELETE, key, b"", b"", False, client_id, seq, ack, retry, horizon, revision)


# --- results -------------------------------------------------------------------------------------
def encode_result(res: ApplyResult) -> bytes:
    flags = (
        (_R_SWAPPED if res.swapped else 0)
        | (_R_FOUND if res.found else 0)
        | (_R_EXISTED if res.existed else 0)
        | (_R_CURRENT if res.current is not None else 0)
        | (_R_ERROR if res.error is not None else 0)
        | (_R_WRONG_SHARD if res.wrong_shard else 0)
        | (_R_SESSION_EXPIRED if res.session_expired else 0)
        | (_R_TXN if res.txn is not None else 0)
    )
    parts = [_RES.pack(RESULT_VERSION, flags, res.revision)]
    if res.current is not None:
        parts += (_U32.pack(len(res.current)), res.current)
    if res.txn is not None:
        parts.append(encode_txn_result(res.txn))
    if res.error is not None:
        parts.append(res.error.encode())
    return b"".join(parts)


def decode_result(data: bytes) -> ApplyResult:
    """Decode a result. Raises ValueError for anything malformed."""
    data = bytes(data)
    n = len(data)
    if n < _RES_V1.size:
        raise ValueError(f"result too short: {n} bytes")
    version, flags = _RES_V1.unpack_from(data)
    if version == RESULT_VERSION:
        if n < _RES.size:
            raise ValueError(f"result too short: {n} bytes")
        revision = _U64.unpack_from(data, _RES_V1.size)[0]
        pos = _RES.size
    elif version == RESULT_VERSION_1:
        revision = 0
        pos = _RES_V1.size
    else:
        raise ValueError(f"unknown result format version {version} (expected {RESULT_VERSION_1} or {RESULT_VERSION})")
    if flags & ~_R_ALL:
        raise ValueError(f"result has unknown flags {flags:#x}")
    current = None
    if flags & _R_CURRENT:
        if n < pos + _U32.size:
            raise ValueError("result truncated in its value length")
        (clen,) = _U32.unpack_from(data, pos)
        pos += _U32.size
        if pos + clen > n:
            raise ValueError(f"result truncated: value needs {pos + clen} bytes, has {n}")
        current = data[pos : pos + clen]
        pos += clen
    txn = None
    if flags & _R_TXN:
        txn, pos = decode_txn_result(data, pos)
    error = None
    if flags & _R_ERROR:
        try:
            error = data[pos:].decode()
        except UnicodeDecodeError as err:
            raise ValueError(f"result error text is not UTF-8: {err}") from None
    elif pos != n:
        raise ValueError(f"result has {n - pos} trailing bytes")
    return ApplyResult(
        bool(flags & _R_SWAPPED), bool(flags & _R_FOUND), bool(flags & _R_EXISTED), current, error,
        bool(flags & _R_WRONG_SHARD), bool(flags & _R_SESSION_EXPIRED), txn, revision,
    )
