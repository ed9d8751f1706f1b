"""Shard commands: how a data group takes on and gives up hash ranges. STANDARD LIBRARY ONLY.

They travel in NORMAL entries like KV commands; the first byte tells them apart (KV commands start
with their format version 1, shard commands with `SHARD_MAGIC`).

    SET        ranges         the group's initial ranges (bootstrap log only): active := ranges
    FREEZE     ranges         stop serving ranges (must be active or already frozen): from this log
                              position on, reads and writes of their keys are refused (WRONG_SHARD)
                              and their data never changes again
    BEGIN      token ranges   prepare to receive ranges: delete any leftover data in them and
                              remember (token, ranges) as the one installation in progress. If
                              they are already active here, does nothing and reports `existed`
    INSTALL    token records  data rows (of the ranges being installed) and session rows
                              exported from the source; refused unless `token` is the current one
    ACTIVATE   token ranges   start serving ranges: refused unless (token, ranges) is the current
                              installation; idempotent once active
    DROP       ranges         forget frozen ranges: delete their data, unmark them (idempotent)

    Every command but SET carries the id of the move it belongs to (move ids only grow, and the
    coordinator runs one move at a time); a group refuses a command of a move older than the
    newest it has accepted one of, so a request of a finished move that arrives late (a
    coordinator resuming after a pause, a retry that reached the leader late) cannot freeze,
    drop or install anything any more.

    wire: SHARD_MAGIC:u8 op:u8 [move:u64 unless SET] payload; ranges = IntervalSet.encode();
    token = u64;
    records = (tag:u8 key_len:u32 value_len:u32 key value)*, tag 1 = data row (key, value),
    2 = session floor (client:u64, floor:u64), 3 = session result (client:u64 seq:u64, result),
    4 = a key's history, 5 = the source's closed and compact revisions (and, from feature
    level 8, whether it kept the rows at the compact revision: `encode_closed`), 6 = a key's
    lease attachment (key, lease id:u64; `REC_LEASE`, feature level 4)

Invariants (with `machine.apply_command`):
- a group serves a key iff its hash is in the group's active set (a group without shard state,
  e.g. the metadata group, serves every key);
- active and frozen never overlap; a frozen range's data is immutable until DROP;
- ranges become active only through ACTIVATE of the installation whose BEGIN and INSTALLs ran
  under the same token, with no other BEGIN in between: two coordinators racing (an old
  metadata leader that has not noticed yet) can make each other fail and retry, but a BEGIN of
  one can never wipe data the other's ACTIVATE then serves;
- a command refused for ownership is not recorded in the session table, so its retry at the new
  owner applies it; a command whose result is cached returns it wherever the cache travelled.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..shard.ranges import IntervalSet
from .commands import MAX_KEY_SIZE, decode_result
from .leases import check_id as check_lease_id

SHARD_MAGIC = 0xA5

_HEAD = struct.Struct(">BB")
_REC = struct.Struct(">BII")
U64 = struct.Struct(">Q")
U64_PAIR = struct.Struct(">QQ")

REC_DATA = 1
REC_FLOOR = 2
REC_RESULT = 3
REC_HISTORY = 4
"""A moved key's retained history (`mvcc.encode_versions`), keyed by the user key."""
REC_CLOSED = 5
"""The source group's last (closed) and compact revisions when it exported (empty key, value
u64 last, u64 compact, compact <= last): the target's last revision is raised to the first, so a
read at R the source answered for a moved key (source last >= R) is not changed by a later write
of the target; its compact revision to the second, so no read or watch of the target below it
sees a moved key's history with the versions the source had compacted missing
(docs/REVISIONS.md). A 17-byte value ends with 1: the source kept the changes at its compact
revision (`mvcc.RevState.kept`), so the target compacts under the keep rule
(`machine.apply_shard_command`); only a source under the keep rule (feature level 8,
`node.version.install_level`) exports that form."""
_KEPT = b"\x01"


def encode_closed(last: int, compact: int, kept: bool) -> bytes:
    """A `REC_CLOSED` record's value: 16 bytes (last, compact), 17 with a trailing 1 if `kept`."""
    raw = U64_PAIR.pack(last, compact)
    return raw + _KEPT if kept else raw


def decode_closed(value: bytes) -> tuple[int, int, bool]:
    """(last, compact, kept) of a `REC_CLOSED` value; ValueError for anything but the two forms
    `encode_closed` writes, or compact above last."""
    n = len(value)
    if n == U64_PAIR.size:
        kept = False
    elif n == U64_PAIR.size + 1 and value[-1:] == _KEPT:
        kept = True
    else:
        raise ValueError("install closed-revision record is not (empty, u64 last, u64 compact[, kept 1])")
    last, comp = U64_PAIR.unpack_from(value)
    if comp > last:
        raise ValueError(f"install closed-revision record with compact {comp} above last {last}")
    return last, comp, kept


REC_LEASE = 6
"""A moved key's lease attachment (key, lease id u64: a valid id, `leases.check_id`): the INSTALL
attaches the key to the lease in the target as a LEASE_PUT would (`machine.apply_shard_command`).
Part of feature level 4 (`node.version.install_level`): only a range holding attached keys
exports one, and a key is attached only by a LEASE_PUT, which needs level 4 already."""


class ShardOp(enum.IntEnum):
    SET = 1
    FREEZE = 2
    BEGIN = 3
    INSTALL = 4
    ACTIVATE = 5
    DROP = 6


@dataclass(frozen=True, slots=True)
class ShardState:
    """What a data group serves (`active`), what it gave up but still holds (`frozen`), and the
    installation in progress (`installing` under `token`)."""

    active: IntervalSet
    frozen: IntervalSet
    installing: IntervalSet = field(default_factory=IntervalSet)
    token: int = 0
    move: int = 0
    """The newest move the group accepted a command of."""

    def encode(self) -> bytes:
        out = self.active.encode() + self.frozen.encode()
        if self.installing or self.token or self.move:
            out += U64.pack(self.token) + self.installing.encode() + U64.pack(self.move)
        return out

    @classmethod
    def decode(cls, data: bytes) -> ShardState:
        active, pos = IntervalSet.decode_from(data)
        frozen, pos = IntervalSet.decode_from(data, pos)
        installing, token = IntervalSet(), 0
        if pos < len(data):
            if len(data) < pos + 8:
                raise ValueError("shard state truncated in its install token")
            (token,) = U64.unpack_from(data, pos)
            installing, pos = IntervalSet.decode_from(data, pos + 8)
        move = 0
        if pos < len(data):
            if len(data) < pos + 8:
                raise ValueError("shard state truncated in its move id")
            (move,) = U64.unpack_from(data, pos)
            pos += 8
        if pos != len(data):
            raise ValueError("shard state has trailing bytes")
        return cls(active, frozen, installing, token, move)


@dataclass(frozen=True, slots=True)
class ShardCommand:
    op: ShardOp
    ranges: IntervalSet = field(default_factory=IntervalSet)
    records: bytes = b""
    token: int = 0
    move: int = 0

_TOKEN_OPS = frozenset({ShardOp.BEGIN, ShardOp.INSTALL, ShardOp.ACTIVATE})


def is_shard_command(data: bytes) -> bool:
    return bool(data) and data[0] == SHARD_MAGIC


def encode_shard_command(
    op: ShardOp, ranges: IntervalSet | None = None, records: bytes = b"", token: int = 0, move: int = 0
) -> bytes:
    head = _HEAD.pack(SHARD_MAGIC, int(op))
    if op != ShardOp.SET:
        head += U64.pack(move)
    if op in _TOKEN_OPS:
        head += U64.pack(token)
    if op == ShardOp.INSTALL:
        return head + records
    if ranges is None:
        raise ValueError(f"{op.name} needs ranges")
    return head + ranges.encode()


def decode_shard_command(data: bytes) -> ShardCommand:
    if len(data) < _HEAD.size:
        raise ValueError("shard command too short")
    magic, op = _HEAD.unpack_from(data)
    if magic != SHARD_MAGIC:
        raise ValueError("not a shard command")
    try:
        kind = ShardOp(op)
    except ValueError:
        raise ValueError(f"unknown shard op {op}") from None
    body = data[_HEAD.size :]
    token = move = 0
    if kind != ShardOp.SET:
        if len(body) < 8:
            raise ValueError(f"{kind.name} command truncated in its move id")
        (move,) = U64.unpack_from(body)
        body = body[8:]
    if kind in _TOKEN_OPS:
        if len(body) < 8:
            raise ValueError(f"{kind.name} command truncated in its token")
        (token,) = U64.unpack_from(body)
        body = body[8:]
    if kind == ShardOp.INSTALL:
        for _ in iter_records(body):  # validate the framing before anything is applied
            pass
        return ShardCommand(kind, records=body, token=token, move=move)
    return ShardCommand(kind, IntervalSet.decode(body), token=token, move=move)


def encode_record(tag: int, key: bytes, value: bytes) -> bytes:
    return _REC.pack(tag, len(key), len(value)) + key + value


_TAGS = frozenset({REC_DATA, REC_FLOOR, REC_RESULT, REC_HISTORY, REC_CLOSED, REC_LEASE})


def iter_records(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """The (tag, key, value) records of an INSTALL's body, checked as they are read: any
    malformed record raises ValueError (total on garbage)."""
    pos, n = 0, len(data)
    while pos < n:
        if pos + _REC.size > n:
            raise ValueError("install records truncated in a header")
        tag, kl, vl = _REC.unpack_from(data, pos)
        pos += _REC.size
        if tag not in _TAGS or pos + kl + vl > n:
            raise ValueError("install records malformed")
        key, value = data[pos : pos + kl], data[pos + kl : pos + kl + vl]
        if tag in (REC_DATA, REC_HISTORY, REC_LEASE) and not 0 < kl <= MAX_KEY_SIZE:
            raise ValueError(f"install data key of {kl} bytes")
        if tag == REC_FLOOR and (kl != 8 or vl != 8):
            raise ValueError("install floor record is not (u64, u64)")
        if tag == REC_CLOSED:
            if kl != 0:
                raise ValueError("install closed-revision record has a key")
            decode_closed(value)
        if tag == REC_LEASE:
            if vl != 8:
                raise ValueError("install lease record's value is not a lease id (u64)")
            check_lease_id(U64.unpack(value)[0])  # ValueError: not a lease id
        if tag == REC_RESULT:
            if kl != 16:
                raise ValueError("install result record key is not (u64, u64)")
            decode_result(value)  # raises ValueError if it is not an encoded result
        yield tag, key, value
        pos += kl + vl
