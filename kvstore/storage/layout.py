"""The on-disk layout: LMDB sub-database names and the `struct` encodings of their keys and values.

One LMDB environment per node holds every Raft group; every key starts with the group id as 8
big-endian bytes, so one group's rows are one contiguous key range in each sub-database and byte
order equals numeric order.

    raftlog    group:u64 index:u64             -> term:u64 type:u8 data          } the Raft logs
    raftstate  group:u64 b"h"                  -> hard state   term:u64 vote:u64 commit:u64
               group:u64 b"b"                  -> log base     index:u64 term:u64 conf
               (these three are only READ now, once: a data directory written before the Raft
               logs moved to the write-ahead log (`nodelogs.py`) has them copied into it and
               emptied at open, `walmigrate.py`)
               group:u64 b"s"                  -> the last snapshot installed: index:u64 term:u64
                                                  conf (written with the install; start-up
                                                  re-creates the WAL's log from it after a crash
                                                  between the install and the WAL's RESET)
    data       group:u64 user_key              -> value
    sessions   group:u64 client:u64            -> session head: floor:u64 last:u64 created:u64
                                                  (machine.SessionHead; the previous release
                                                  wrote floor:u64 only, still decoded)
               group:u64 client:u64 seq:u64    -> encoded ApplyResult (commands.encode_result)
               group:u64 b"M"                  -> session meta: count:u64 horizon:u64 evicted:u64
    session_lru group:u64 last:u64 client:u64  -> b"" (one row per head row: the LRU order;
                                                  derived from the head rows, rebuilt on install)
    applied    group:u64                       -> applied index:u64 conf
    members    group:u64 node:u64              -> address (utf-8), from applied conf changes
    shards     group:u64                       -> shardcmd.ShardState (served and frozen ranges)
               group:u64 b"T"                  -> b"" (tombstone: the group was destroyed here)

    rev_keys   group:u64 user_key              -> kid:u64 ...  } the MVCC history of `mvcc.py`:
    rev_changes group:u64 rev:u64 kid:u64      -> LOG row      } every version and tombstone in
                                                                 revision order (since data
                                                                 format 3; format 2 held the
                                                                 user key alone here)
    rev_hist   group:u64 kid:u64 rev:u64       -> history row  } data format 2's history; empty
                                                                 since the migration to format 3
                                                                 (`mvcc.rebuild_log`)
    rev_state  group:u64                       -> last:u64 compact:u64 next_kid:u64   } counters
    leases     group:u64 lease row             -> `leases.py`'s rows (records, attachments,
                                                  tombstones); table 6 of the group's `mvcc.Rows`
               (an environment made before revisions gets these tables, empty, when opened:
               its keys read as LEGACY keys, see `mvcc.py`)

    nodemeta   b"audit_head"                   -> the audit log's head (`node.store.AuditHead`):
                                                  seq:u64 floor:u64 mac:32 bytes

    conf = n_voters:u32 n_learners:u32 voter:u64 * n_voters learner:u64 * n_learners

The log base is the (index, term, configuration) of the last entry discarded by compaction or
replaced by an installed snapshot: `first_index() == base.index + 1`.
"""

from __future__ import annotations

import struct

from kvstore.raft.types import ConfState, HardState, SnapshotMeta

from .errors import StorageError

DB_RAFTLOG = b"raftlog"
DB_RAFTSTATE = b"raftstate"
DB_DATA = b"data"
DB_SESSIONS = b"sessions"
DB_APPLIED = b"applied"
DB_MEMBERS = b"members"
DB_SHARDS = b"shards"
DB_SESSION_LRU = b"session_lru"
DB_REV_KEYS = b"rev_keys"
DB_REV_HIST = b"rev_hist"
DB_REV_CHANGES = b"rev_changes"
DB_REV_STATE = b"rev_state"
DB_REV_TXN = b"rev_txn"
DB_REV_INTENTS = b"rev_intents"
DB_LEASES = b"leases"
DB_REVS = (DB_REV_KEYS, DB_REV_HIST, DB_REV_CHANGES, DB_REV_STATE, DB_REV_TXN, DB_REV_INTENTS, DB_LEASES)
"""The group's `mvcc.Rows` tables in table order: the MVCC tables of `mvcc.py` (T_KEYS, T_HIST,
T_CHANGES, T_STATE, T_TXN, T_INTENTS), then the lease table (`leases.T_LEASES`)."""
"""The MVCC tables of `mvcc.py` (T_KEYS, T_HIST, T_CHANGES, T_STATE, T_TXN, T_INTENTS, in that order), each row key
prefixed with the group id like every other table."""
DB_NODEMETA = b"nodemeta"
"""Small per-node records that belong to no group (keys are names, not group ids)."""
DB_NAMES = (DB_RAFTLOG, DB_RAFTSTATE, DB_DATA, DB_SESSIONS, DB_APPLIED, DB_MEMBERS, DB_SHARDS, DB_SESSION_LRU,
            DB_NODEMETA, *DB_REVS)
AUDIT_HEAD_KEY = b"audit_head"
_AUDIT_HEAD = struct.Struct(">QQ32s")

SESSION_META_TAG = b"M"
"""Key suffix (after the group prefix) of a group's session meta row in `sessions`; its 9-byte key
never collides with a head row (16 bytes) or a result row (24 bytes)."""

U64 = struct.Struct(">Q")
U64_PAIR = struct.Struct(">QQ")
LOG_VALUE = struct.Struct(">QB")
HARD_STATE = struct.Struct(">QQQ")
_CONF_HEAD = struct.Struct(">II")

HARD_STATE_TAG = b"h"
TOMBSTONE_TAG = b"T"
LOG_BASE_TAG = b"b"
SNAPSHOT_BASE_TAG = b"s"
GROUP_MAX = (1 << 64) - 1


def group_prefix(group: int) -> bytes:
    return U64.pack(group)


def group_end(group: int) -> bytes | None:
    """The smallest key after every key of `group` (None for the last possible group)."""
    return None if group == GROUP_MAX else U64.pack(group + 1)


def log_key(group: int, index: int) -> bytes:
    return U64_PAIR.pack(group, index)


def encode_conf(cs: ConfState) -> bytes:
    ids = (*cs.voters, *cs.learners)
    return _CONF_HEAD.pack(len(cs.voters), len(cs.learners)) + struct.pack(f">{len(ids)}Q", *ids)


def decode_conf(data: bytes, pos: int = 0) -> ConfState:
    try:
        nv, nl = _CONF_HEAD.unpack_from(data, pos)
        if nv + nl > 4096:
            raise struct.error(f"{nv + nl} member ids")
        ids = struct.unpack_from(f">{nv + nl}Q", data, pos + _CONF_HEAD.size)
    except struct.error as err:
        raise StorageError(f"corrupt configuration record: {err}") from None
    return ConfState(tuple(ids[:nv]), tuple(ids[nv:]))


def encode_hard_state(hs: HardState) -> bytes:
    return HARD_STATE.pack(hs.term, hs.vote, hs.commit)


def decode_hard_state(data: bytes) -> HardState:
    """Total: a record that is not one raises StorageError (as every decoder here does)."""
    try:
        return HardState(*HARD_STATE.unpack(data))
    except struct.error as err:
        raise StorageError(f"corrupt hard state record ({len(data)} bytes): {err}") from None


def encode_log_base(meta: SnapshotMeta) -> bytes:
    return U64_PAIR.pack(meta.index, meta.term) + encode_conf(meta.conf_state)


def decode_log_base(data: bytes) -> SnapshotMeta:
    try:
        index, term = U64_PAIR.unpack_from(data)
    except struct.error as err:
        raise StorageError(f"corrupt log base record: {err}") from None
    return SnapshotMeta(index, term, decode_conf(data, U64_PAIR.size))


def encode_applied(index: int, cs: ConfState) -> bytes:
    return U64.pack(index) + encode_conf(cs)


def decode_applied(data: bytes) -> tuple[int, ConfState]:
    try:
        (index,) = U64.unpack_from(data)
    except struct.error as err:
        raise StorageError(f"corrupt applied-index record: {err}") from None
    return index, decode_conf(data, U64.size)


def decode_log_term(data: bytes) -> int:
    """The term of a stored log entry's value (StorageError if it is not one)."""
    try:
        return int(LOG_VALUE.unpack_from(data)[0])
    except struct.error as err:
        raise StorageError(f"corrupt log entry record: {err}") from None


def encode_audit_head(seq: int, floor: int, mac: bytes) -> bytes:
    return _AUDIT_HEAD.pack(seq, floor, mac)


def decode_audit_head(raw: bytes) -> tuple[int, int, bytes]:
    """(seq, floor, mac) of a stored audit head; StorageError for anything else."""
    if len(raw) != _AUDIT_HEAD.size:
        raise StorageError(f"audit head record of {len(raw)} bytes, expected {_AUDIT_HEAD.size}")
    seq, floor, mac = _AUDIT_HEAD.unpack(raw)
    return seq, floor, mac
