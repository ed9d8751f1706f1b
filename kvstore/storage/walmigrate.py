"""Moving the Raft logs of an old data directory (kept in LMDB by `raftlog.GroupLogStorage`) into a
`RaftWal`: for each group with a log in LMDB and none in the WAL, a rewrite (a RESET at the LMDB
log's base with its hard state, announcing its entries, then the entries), and ONE `sync` at the
end. Idempotent: a crash before the sync leaves the WAL without (or with a dropped, cut) rewrite
and the LMDB logs untouched, so running it again gives the same result. Only after it returned may
the caller empty the LMDB log tables (that order: the WAL copy is durable before the old one goes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .raftwal import RaftWal
from .walrec import KIND_ENTRIES, KIND_RESET, GroupRecord, encode

if TYPE_CHECKING:
    from .store import LmdbNodeStore


def import_lmdb_logs(store: LmdbNodeStore, rw: RaftWal) -> list[int]:
    """Copy every LMDB group log the WAL lacks into it (module docstring); returns those groups."""
    done: list[int] = []
    for gid in store.groups():
        if rw.log(gid) is not None:
            continue
        ls = store.log_storage(gid)
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
