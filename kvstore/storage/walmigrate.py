"""Moving the Raft logs of an old data directory (kept in LMDB, read by `raftlog.GroupLogStorage`) into
the node's `RaftWal`, once, when `LmdbNodeStore` opens it (issue 20).

`migrate(env, rw)` does it in this order, each step safe to crash after:
1. `import_lmdb_logs`: for each group with a log in LMDB and none in the WAL, a rewrite (a RESET
   at the LMDB log's base with its hard state, announcing its entries, then the entries); ONE
   `sync` at the end. A crash before the sync leaves the WAL without (or with a dropped, cut)
   rewrite and the LMDB logs untouched, so running it again gives the same result;
2. `drop_lmdb_logs`: ONE LMDB transaction empties the log tables (every entry, hard state and
   log base). Only after step 1 returned: the WAL copy is durable before the old one goes. A
   crash between leaves both copies; the next open skips every group the WAL already has and
   empties the tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.raft.types import ConfState

from .layout import DB_RAFTLOG, DB_RAFTSTATE, HARD_STATE_TAG, LOG_BASE_TAG, U64
from .raftlog import GroupLogStorage
from .raftwal import RaftWal
from .walrec import KIND_ENTRIES, KIND_RESET, GroupRecord, encode

if TYPE_CHECKING:
    from .lmdb_env import LmdbEnv, Txn


def _no_applied() -> tuple[int, ConfState]:
    return 0, ConfState()


def lmdb_log_groups(env: LmdbEnv) -> list[int]:
    """Groups with a log, hard state or log base in the LMDB log tables, sorted."""
    found: set[int] = set()
    with env.read() as txn:
        for key in txn.cursor(db=env.db(DB_RAFTSTATE)).iternext(values=False):
            if len(key) == 9 and key[8:] in (HARD_STATE_TAG, LOG_BASE_TAG):
                found.add(U64.unpack_from(key)[0])
        cur = txn.cursor(db=env.db(DB_RAFTLOG))
        ok = cur.first()
        while ok:  # one seek per group, not one step per entry
            g = U64.unpack_from(cur.key())[0]
            found.add(g)
            ok = g < (1 << 64) - 1 and cur.set_range(U64.pack(g + 1))
    return sorted(found)


def import_lmdb_logs(env: LmdbEnv, rw: RaftWal) -> list[int]:
    """Copy every LMDB group log the WAL lacks into it (step 1); returns those groups."""
    done: list[int] = []
    for gid in lmdb_log_groups(env):
        if rw.log(gid) is not None:
            continue
        ls = GroupLogStorage(env, gid, _no_applied)
        st = ls.state
        if st.is_empty():
            continue
        ents = (
            ls.entries(ls.first_index(), ls.last_index() + 1) if ls.last_index() >= ls.first_index() else []
        )
        recs = [GroupRecord(KIND_RESET, gid, base=st.base, hard_state=st.hard_state)]
        if ents:
            body = GroupRecord(KIND_ENTRIES, gid, entries=tuple(ents))
            follow = len(encode(body, rw.groups.max_record_bytes))
            recs = [GroupRecord(KIND_RESET, gid, base=st.base, hard_state=st.hard_state, follow=follow), body]
        rw.write(recs)
        done.append(gid)
    rw.sync()
    return done


def drop_lmdb_logs(env: LmdbEnv) -> None:
    """Empty the LMDB log tables in one transaction (step 2)."""

    def fn(txn: Txn) -> None:
        txn.drop(env.db(DB_RAFTLOG), delete=False)
        cur = txn.cursor(db=env.db(DB_RAFTSTATE))
        gone = [k for k in cur.iternext(values=False) if len(k) == 9 and k[8:] in (HARD_STATE_TAG, LOG_BASE_TAG)]
        for k in gone:
            txn.delete(k, db=env.db(DB_RAFTSTATE))

    env.write(fn)


def migrate(env: LmdbEnv, rw: RaftWal) -> list[int]:
    """Steps 1 and 2 if the LMDB log tables hold anything; returns the groups imported."""
    if not lmdb_log_groups(env):
        return []
    done = import_lmdb_logs(env, rw)
    drop_lmdb_logs(env)
    return done
