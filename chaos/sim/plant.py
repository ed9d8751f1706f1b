"""Known Raft bugs that can be planted into the real core, to prove the simulator finds them.

Each bug replaces one method of the core for the duration of a `with planted(name):` block. The core
itself carries no trace of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

from kvstore.node import lessor as lessor_logic
from kvstore.node.closes import NodeCloses
from kvstore.node.host import Group, Host
from kvstore.node.inbound import Inbound
from kvstore.node.lessor import Lessor
from kvstore.node.memstore import _U_ATTR, ListStream, MemoryNodeStore, _undo
from kvstore.node.moves import MoveCoordinator, Propose, Work
from kvstore.node.orphans import OrphanSweep
from kvstore.node.reads import NodeReads
from kvstore.node.watch import StoreSource, WatchHub
from kvstore.raft import HardState, Message, RaftNode, Role, admission
from kvstore.raft.log import RaftLog
from kvstore.raft.readonly import ReadRequest
from kvstore.storage import commands, machine, mvcc, txn, xtxn_apply
from kvstore.storage.commands import ApplyResult, Op, encode_result
from kvstore.storage.shardcmd import (
    REC_DATA,
    ShardOp,
    decode_shard_command,
    encode_record,
    encode_shard_command,
    is_shard_command,
    iter_records,
)
from kvstore.storage.wal import Wal

from . import locks, nodes, xtxn_pairs


def _commit_previous_term(self: RaftLog, max_index: int, term: int) -> bool:
    # BUG: commits an entry by counting replicas even if it is from an earlier term (Figure 8).
    if max_index > self.committed:
        self.commit_to(max_index)
        return True
    return False


def _vote_without_log_check(self: RaftLog, last_index: int, term: int) -> bool:
    # BUG: grants votes without the "candidate's log is at least as up-to-date" check.
    return True


def _read_without_confirmation(self: RaftNode, req: ReadRequest) -> None:
    # BUG: a leader answers ReadIndex at its commit index without confirming it is still leader.
    self._release_read(self.log.committed, req)


def _forget_vote(self: RaftNode) -> HardState:
    # BUG: the vote is never part of the persisted hard state, so a restart forgets it.
    return HardState(self.term, 0, self.log.committed)


def _skip_log_consistency_check(self: RaftLog, index: int, term: int) -> bool:
    # BUG: a follower accepts entries without checking that its log matches at the previous entry
    # (and, through find_conflict, never truncates a conflicting suffix).
    return index <= self.last_index()


def _apply_before_commit(self: RaftLog, max_size: int | None = None) -> list[Any]:
    # BUG: hands out entries for applying as soon as they are in the log, committed or not.
    lo = max(self.applied + 1, self.first_index())
    hi = self.last_index() + 1
    if self.committed < hi - 1:
        self.committed = hi - 1  # keep the log's own invariant applied <= committed
    return self.slice(lo, hi, max_size) if hi > lo else []


def _keep_lease_across_quiescence(self: RaftNode) -> None:
    # BUG: a quiescing leader keeps the heartbeat acknowledgements it had, so after waking (its
    # tick count frozen meanwhile) it serves lease reads although its followers, once quiesced,
    # may vote for another leader at once.
    return


def _wake_does_nothing(self: RaftNode) -> None:
    # BUG: wake() is ignored, so a quiesced follower whose leader died never campaigns (nothing
    # else will ever wake it: the dead leader sends nothing).
    return


def _count_unpersisted_entries(self: RaftNode) -> int:
    # BUG: a leader counts the entries of its own log toward commitment before they are durable,
    # so an entry can commit (and be applied and acknowledged) with fewer durable copies than a
    # quorum: the leader's crash before its fsync loses an acknowledged write.
    return self.log.last_index()


def _admit_everything(
    core: RaftNode, m: Message, placed: Collection[int] = (), is_member: Callable[[int], bool] | None = None
) -> str | None:
    # BUG: no admission: every message reaches the core, whoever sent it (the simulator's
    # outsider then steers elections and gets forged writes committed).
    return None


def _admit_all_traffic(self: Inbound, m: Message) -> bool:
    # BUG (node): no admission at all: whatever arrives, from whoever, reaches the cores.
    return True


def _forget_cached_results(view: Any, cmd: Any) -> Any:
    # BUG (node): the session table does not deduplicate: a retried write is applied again.
    cid = cmd.client_id
    head = view.session_head(cid) if cid else None
    if cid and cmd.seq < (0 if head is None else head.floor):
        return machine.ApplyResult(error=machine.STALE_REQUEST)
    st = view.shards
    if st is not None and machine.key_hash(cmd.key) not in st.active:
        return machine.ApplyResult(wrong_shard=True, error="the key is not served by this group")
    result = machine.execute(view, cmd)
    if cid:
        view.put_session_result(cid, cmd.seq, machine.encode_result(result))
    return result


BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "commit-previous-term": (RaftLog, "maybe_commit", _commit_previous_term),
    "vote-without-log-check": (RaftLog, "is_up_to_date", _vote_without_log_check),
    "read-without-confirmation": (RaftNode, "_leader_read", _read_without_confirmation),
    "forget-vote": (RaftNode, "_hard_state", _forget_vote),
    "apply-before-commit": (RaftLog, "next_committed_entries", _apply_before_commit),
    "skip-log-consistency-check": (RaftLog, "match_term", _skip_log_consistency_check),
    "lease-across-quiescence": (RaftNode, "_forfeit_lease", _keep_lease_across_quiescence),
    "wake-does-nothing": (RaftNode, "wake", _wake_does_nothing),
    "no-admission": (admission, "refusal", _admit_everything),
    "apply-before-persist": (RaftNode, "_stable_last_index", _count_unpersisted_entries),
}

def _no_fsync(params: Any) -> bool:
    # BUG (node): the store never makes a transaction durable before the node acknowledges (a
    # missing fsync): votes, appends and writes are acknowledged, then lost in a crash.
    return False


_serve_reads = Host._serve_reads


def _serve_unapplied(self: Host, g: Group) -> None:
    # BUG (node): a replica serves a read as soon as the leader's read index arrives, at whatever
    # it has applied, instead of waiting until it has applied through that index.
    if g.core.role == Role.LEADER:
        _serve_reads(self, g)
        return
    ready, g.ready_reads = g.ready_reads, []
    for _, cb in ready:
        cb(g.core.applied, None)


def _evidence_at_response(self: NodeReads, group: int, sent_at: float) -> None:
    # BUG (node): the staleness evidence is the time the probe's answer was applied, not the time
    # the probe was sent: writes acknowledged while it was in flight count as seen.
    f = self._freshness(group)
    now = self.clock()
    if f.fresh_at is None or now > f.fresh_at:
        f.fresh_at = now
def _serve_frozen_ranges(view: Any, cmd: Any) -> Any:
    # BUG (node): a group keeps serving the ranges it froze: reads and writes of their keys are
    # still executed at the source after FREEZE, while their data is being (or was) exported.
    st = view.shards
    if st is None or not st.frozen:
        return _real_apply_command(view, cmd)
    served = dataclasses.replace(st, active=st.active.union(st.frozen))
    return _real_apply_command(_ServingView(view, served), cmd)


class _ServingView:
    """A state view whose shard state says the frozen ranges are served too."""

    def __init__(self, view: Any, shards: Any) -> None:
        self._view = view
        self.shards = shards

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)


_real_apply_command = machine.apply_command
_real_shard = MoveCoordinator._shard


def _activate_at_begin(self: MoveCoordinator, group: int, op: ShardOp, ranges: Any, move: int, token: int = 0) -> Work:
    # BUG (node): the coordinator activates the target right after BEGIN, before any INSTALL:
    # the target serves the ranges without their data (and sessions).
    res = yield from _real_shard(self, group, op, ranges, move, token)
    if op == ShardOp.BEGIN and not res.existed:
        yield Propose(group, encode_shard_command(ShardOp.ACTIVATE, ranges, token=token, move=move))
    return res


def _same_token(self: MoveCoordinator) -> int:
    # BUG (node): every installation attempt uses the same install token, so a racing
    # coordinator's BEGIN wipes what the other installed and the other's ACTIVATE still passes.
    return 1


_real_propose = Host.propose


def _ack_activate_when_proposed(self: Host, group: int, data: bytes, callback: Callable[[Any, Any], None]) -> int:
    # BUG (node): an ACTIVATE is acknowledged as soon as the leader appended it, not once it is
    # applied: the coordinator flips the map although the entry may never commit (a leader
    # change drops it) or be refused (a racing installation's token), and then nobody serves
    # the ranges.
    if not (is_shard_command(data) and decode_shard_command(data).op == ShardOp.ACTIVATE):
        return _real_propose(self, group, data, callback)
    index = _real_propose(self, group, data, lambda res, err: None)
    callback(ApplyResult(), None)
    return index


def _cache_wrong_shard(view: Any, cmd: Any) -> Any:
    # BUG (node): a write refused for ownership (WRONG_SHARD) is cached in the session table
    # like a result, so its retry at the group that serves the key (the cache travels with a
    # move's sessions) gets the refusal again, forever.
    res = _real_apply_command(view, cmd)
    cid = cmd.client_id
    if res.wrong_shard and cid and view.session_result(cid, cmd.seq) is None:
        head = view.session_head(cid)
        floor = 0 if head is None else head.floor
        if cmd.seq >= floor:
            view.put_session_result(cid, cmd.seq, encode_result(res))
            machine.touch_session(view, cid, head, floor)
    return res


_real_export_range = MemoryNodeStore.export_range


def _export_data_only(self: MemoryNodeStore, group: int, ranges: Any, chunk_bytes: int = 512 << 10) -> Any:
    # BUG (node): a range export carries the data rows only, not the source's session table, so
    # a write applied at the source whose reply was lost is applied again when retried at the
    # target.
    def data_only() -> Any:
        for chunk, keys in _real_export_range(self, group, ranges, chunk_bytes):
            rows = b"".join(encode_record(t, k, v) for t, k, v in iter_records(chunk) if t == REC_DATA)
            if rows:
                yield rows, keys

    return ListStream(data_only())


_real_apply_shard_command = machine.apply_shard_command


def _no_move_fence(view: Any, data: bytes) -> Any:
    # BUG (node): shard commands are not fenced by their move id: a late FREEZE or DROP of an
    # earlier move (a deposed coordinator's, or a request held up in the network) is applied as
    # if it belonged to the group's current move.
    st = view.shards
    try:
        cmd = decode_shard_command(data)
    except ValueError:
        return _real_apply_shard_command(view, data)
    if st is not None and cmd.op != ShardOp.SET and cmd.move < st.move:
        data = encode_shard_command(cmd.op, cmd.ranges, cmd.records, cmd.token, st.move)
    return _real_apply_shard_command(view, data)


_real_execute = machine.execute


class _StateOneBehind:
    """The MVCC tables of a view, with the group's last revision read one lower."""

    def __init__(self, rows: Any) -> None:
        self._rows = rows

    def get(self, t: int, k: bytes) -> bytes | None:
        raw = self._rows.get(t, k)
        if t != mvcc.T_STATE or raw is None:
            return raw
        st = mvcc.RevState.decode(raw)
        return mvcc.RevState(max(0, st.last - 1), st.compact, st.next_kid, st.kept).encode()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rows, name)


class _ViewOneBehind:
    def __init__(self, view: Any) -> None:
        self._view = view
        self.mvcc = _StateOneBehind(view.mvcc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)


def _delete_without_bump(view: Any, cmd: Any) -> Any:
    # BUG: a DELETE's revision is max(last, proposed) instead of above the group's last revision
    # (a revision not bumped on one path): it can repeat the previous write's revision.
    if cmd.op != Op.DELETE:
        return _real_execute(view, cmd)
    return _real_execute(_ViewOneBehind(view), cmd)


def _read_at_revision_unclosed(
    self: NodeCloses, group: int, revision: int, reads: NodeReads, forward: Any, done: Callable[[Any], None]
) -> None:
    # BUG: a read at revision R is served without closing the group at R first: a group whose
    # last revision is below R answers with its current state, and may later write at or below R.
    done(None)


NODE_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "node-read-at-revision-unclosed": (NodeCloses, "ensure_closed", _read_at_revision_unclosed),
    "node-revision-not-bumped": (machine, "execute", _delete_without_bump),
    "node-ack-before-fsync": (nodes, "syncs_writes", _no_fsync),
    "node-no-inbound": (Inbound, "admit", _admit_all_traffic),
    "node-no-dedup": (machine, "apply_command", _forget_cached_results),
    "node-replica-read-unapplied": (Host, "_serve_reads", _serve_unapplied),
    "node-stale-bound-lies": (NodeReads, "_evidence", _evidence_at_response),
    "node-serve-after-freeze": (machine, "apply_command", _serve_frozen_ranges),
    "node-activate-before-install": (MoveCoordinator, "_shard", _activate_at_begin),
    "node-shared-install-token": (MoveCoordinator, "new_token", _same_token),
    "node-flip-before-activate": (Host, "propose", _ack_activate_when_proposed),
    "node-cache-wrong-shard": (machine, "apply_command", _cache_wrong_shard),
    "node-export-without-sessions": (MemoryNodeStore, "export_range", _export_data_only),
    "node-no-move-fence": (machine, "apply_shard_command", _no_move_fence),
}
"""Bugs planted into the node's logic (not the core): only the whole-node simulator
(`chaos/sim/nodes.py`) runs that code."""

MOVE_BUGS = (
    "node-serve-after-freeze",
    "node-activate-before-install",
    "node-shared-install-token",
    "node-flip-before-activate",
    "node-cache-wrong-shard",
    "node-export-without-sessions",
    "node-no-move-fence",
)
"""The node bugs that only range moves show (`tests/simulation/test_node_sim_moves.py` hunts them with moves
on every seed)."""


_real_changes = StoreSource.changes


def _frontier_beyond(self: WatchHub, groups: tuple[int, ...]) -> int:
    # BUG: a watcher over several groups is sent everything up to the HIGHEST last revision of its
    # groups instead of the lowest (the frontier): a quiet group may still write below it, and
    # that write is never sent (and the bookmark already said everything below it was).
    return max(self.last[g] for g in groups)


def _catch_up_past_cursor(self: StoreSource, group: int, lo: int, hi: int, max_events: int, max_bytes: int,
                          prev_kv: bool) -> Any:
    # BUG: the catch-up read starts one past the watcher's cursor (an off-by-one at the change
    # log's boundary): a change at exactly the start revision (or at a resume revision) is skipped.
    return _real_changes(self, group, lo + 1, hi, max_events, max_bytes, prev_kv)


_real_rev_state = StoreSource.rev_state


def _compact_revision_refused(self: StoreSource, group: int) -> Any:
    # BUG: the hub takes a group's compact revision C for C + 1, so a watch from exactly C is
    # refused as compacted (kvstore's rule before issue 18), where etcd serves it with C's changes.
    st = _real_rev_state(self, group)
    return mvcc.RevState(st.last, st.compact + 1, st.next_kid, st.kept) if st.compact else st


WATCH_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "watch-beyond-frontier": (WatchHub, "_frontier", _frontier_beyond),
    "watch-catch-up-off-by-one": (StoreSource, "changes", _catch_up_past_cursor),
    "watch-compact-revision-refused": (StoreSource, "rev_state", _compact_revision_refused),
}
"""Bugs planted into the watch hub (`kvstore/node/watch.py`): found by the simulator's watchers
(`chaos/sim/watches.py`; `tests/simulation/test_node_sim_watches.py`)."""


def _ack_without_fdatasync(self: Wal) -> None:
    # BUG: the WAL acknowledges the cycle (its records count as durable) without its fdatasync:
    # the bytes are in the page cache only, so a kill -9 keeps them and a power loss does not.
    self._check()
    self._synced = self.next_seq - 1


def _compact_past_checkpoint(self: MemoryNodeStore, group: int, index: int) -> None:
    # BUG: the Raft log is compacted up to the LIVE applied index, past the last checkpoint of
    # the state machine: after a crash the state machine is back at the checkpoint and the
    # entries it must replay are gone from the WAL.
    self._check_open()
    self._wal.compact(group, index, self._applied_index(group))


def _skip_meta_restore(self: MemoryNodeStore, keep_unsynced: int) -> None:
    # BUG: a start after a crash opens LMDB as the crash left it instead of writing the
    # checkpoint's meta pages back: the newest meta page (with its applied indexes) reached the
    # disk, the data pages it points to did not. The node believes it applied what it lost.
    for undo in reversed(self._journal):
        _undo([u for u in undo if not (u[0] == _U_ATTR and u[2] == "applied")])


STORAGE_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "wal-skip-fdatasync": (Wal, "sync", _ack_without_fdatasync),
    "lmdb-compact-past-checkpoint": (MemoryNodeStore, "compact", _compact_past_checkpoint),
    "lmdb-skip-meta-restore": (MemoryNodeStore, "_lose_unsynced", _skip_meta_restore),
}
"""Bugs planted into the storage layer's write-ahead log. Found by `chaos/sim/walcrash.py` on the
simulated file system (`tests/unit/test_wal_crash.py`) and by the whole-node simulator, whose
`MemoryNodeStore` keeps the nodes' Raft logs in that WAL on `SimFileSystem`
(`tests/simulation/test_node_sim.py`). The `lmdb-*` ones break the LMDB checkpointer's model in
`MemoryNodeStore` (checkpoint mode, the simulator's default): found by the whole-node simulator."""

def _txn_partial(view: Any, t: txn.Txn, proposed: int) -> ApplyResult:
    # BUG: a transaction that writes several keys loses its last write (not atomic).
    rows = view.mvcc
    rev = mvcc.next_revision(mvcc.rev_state(rows).last, proposed, view.group)

    def read(key: bytes) -> txn.Current | None:
        value = view.get(key)
        meta = mvcc.current_meta(rows, key, value)
        return None if value is None or meta is None else txn.Current(
            value, meta.create_revision, meta.mod_revision, meta.version)

    out = txn.evaluate(t, read, rev)
    for key, value in out.writes[:-1] if len(out.writes) > 1 else out.writes:
        mvcc.write_version(rows, view.group, key, value, view.get(key), rev, exact=True)
        if value is None:
            view.delete(key)
        else:
            view.put(key, value)
    return ApplyResult(revision=out.result.revision, txn=out.result)


def _commit_without_record(driver: Any, node: Any, primary: int, record: bytes, answer: Any) -> None:
    # BUG: the coordinator takes its commit point as passed without proposing the RECORD: a
    # resolver finds no record and aborts the intents it meets, while other groups committed.
    x = commands.decode_command(record).x
    assert x is not None
    answer(ApplyResult(revision=x.at, txn=x.result, current=x.txn.encode()), None)


_finish = xtxn_apply._finish


def _commit_skipping_ranges(view: Any, rows: mvcc.Rows, c: Any) -> ApplyResult:
    # BUG: an even-numbered group's COMMIT of a transaction with range deletes makes its listed
    # writes but skips the range deletions (every replica alike: the data, not Raft, is wrong).
    if c.ranges and view.group % 2 == 0:
        c = dataclasses.replace(c, ranges=())
    return _finish(view, rows, c)


TXN_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "node-txn-partial": (machine, "apply_txn", _txn_partial),
    "node-xtxn-commit-without-record": (xtxn_pairs, "commit_point", _commit_without_record),
}
"""Bugs in transactions, found by the pair transactions (`txn_pairs.py`, forced on in
`tests/simulation/test_node_sim_txn.py`)."""

TXN_RANGE_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "node-xtxn-commit-skips-ranges": (xtxn_apply, "_finish", _commit_skipping_ranges),
}
"""Bugs in range deletes inside transactions, found by the range-heavy pair transactions
(`txn_pairs.TxnPairs.ranges`, `--txn-pairs ranges`; `tests/simulation/test_node_sim_txn.py`)."""


def _txn_stale_compare(view: Any, t: txn.Txn, proposed: int) -> ApplyResult:
    # BUG: the compares read each key one write behind (its version before its last change,
    # e.g. from a stale cache); the operations read the current state.
    rows = view.mvcc
    rev = mvcc.next_revision(mvcc.rev_state(rows).last, proposed, view.group)

    def read(key: bytes) -> txn.Current | None:
        value = view.get(key)
        meta = mvcc.current_meta(rows, key, value)
        return None if value is None or meta is None else txn.Current(
            value, meta.create_revision, meta.mod_revision, meta.version)

    def stale(key: bytes) -> txn.Current | None:
        cur = read(key)
        if cur is None or cur.version < 2:
            return None  # absent before its creation
        old = mvcc.version_at(rows, key, cur.mod_revision - 1, view.get(key))
        return None if old is None or old.value is None else txn.Current(
            old.value, old.meta.create_revision, old.meta.mod_revision, old.meta.version)

    ok = all(txn._holds(c, stale(c.key)) for c in t.compares)
    out = txn.evaluate(txn.Txn((), t.success if ok else t.failure), read, rev)
    result = txn.TxnResult(ok, out.result.responses, out.result.revision)
    for key, value in out.writes:
        mvcc.write_version(rows, view.group, key, value, view.get(key), rev, exact=True)
        if value is None:
            view.delete(key)
        else:
            view.put(key, value)
    return ApplyResult(revision=result.revision, txn=result)


TXN_MODEL_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "node-txn-stale-compare": (machine, "apply_txn", _txn_stale_compare),
}
"""Bugs in one-group transactions that keep them atomic but not serializable, found by the
general transactions' model (`txn_model.py`, forced on in `tests/simulation/test_node_sim_txn_model.py`)."""

def _scan_without_margin(self: Lessor, now_ms: float, recs: Any, data_groups: Any) -> None:
    # BUG: the deadline is the remaining TTL on the leader's own clock, with no margin for its
    # rate error: a leader whose clock runs fast expires a lease before the client's TTL passed.
    drift = self.p.drift
    self.p = dataclasses.replace(self.p, drift=0.0)
    try:
        _real_scan(self, now_ms, recs, data_groups)
    finally:
        self.p = dataclasses.replace(self.p, drift=drift)


_real_scan = Lessor._scan

def _commit_keeps_lease(rows: Any, key: bytes) -> None:
    # BUG: a cross-group COMMIT's write leaves the key attached to its lease: the lease's expiry
    # later deletes what the transaction wrote without a lease.
    return None


def _commit_drops_attachment(rows: Any, key: bytes, lease_id: int) -> None:
    # BUG: a cross-group COMMIT writes a leased put's key but does not attach it: the key
    # outlives its lease.
    return None


def _per_group_deletion(data_groups: Any) -> bool:
    # BUG: a lease's expiry deletes its keys per group as before the deletion across groups: the
    # home group's EXPIRE deletes its own at one revision, each other group's DROP its own at
    # another; a reader between them sees the lease's keys partly deleted.
    return False


def _txn_attaches_nothing(rows: Any, leased: Any) -> None:
    # BUG: a TXN's put with a lease writes the key but never attaches it: the lease's expiry
    # leaves the key behind.
    return None


LEASE_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "lease-no-drift-margin": (Lessor, "_scan", _scan_without_margin),
    "node-lease-partial-delete": (lessor_logic, "cross_group_deletion", _per_group_deletion),
    "node-txn-lease-not-attached": (machine, "attach_leased", _txn_attaches_nothing),
}
"""Bugs in leases, found by the lease clients (`leases.py`, forced on in
`tests/simulation/test_node_sim_leases.py`)."""

LEASE_TXN_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "node-xtxn-commit-keeps-lease": (xtxn_apply, "detach_written", _commit_keeps_lease),
}
"""Bugs where leases meet cross-group transactions, found by the lease clients with the pair
transactions on (`leases.py`'s rewrites; `tests/simulation/test_node_sim_leases.py`)."""

LEASE_XTXN_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "node-xtxn-commit-drops-attachment": (xtxn_apply, "attach_written", _commit_drops_attachment),
}
"""Bugs in leased puts across groups, found by the lease clients attaching both keys of a lease
in one cross-group transaction (`leases.py`'s `lease_txns`: the end check finds the key of a
dead lease still present)."""

def _holder_latest(queue: dict[bytes, int]) -> bytes:
    # BUG: the holder is the key with the HIGHEST create revision (the newest waiter).
    return max(queue, key=lambda k: queue[k])


def _fence_lease_id(queue: dict[bytes, int], key: bytes, lease_id: int) -> int:
    # BUG: the fencing token is the session's lease id (unique, but random: not ordered like the
    # acquisitions).
    return lease_id


LOCK_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "lock-holder-latest": (locks, "holder_of", _holder_latest),
    "lock-fence-lease-id": (locks, "fence_of", _fence_lease_id),
}
"""Bugs in the lock recipe, found by the lock clients' checks (`locks.py`, forced on in
`tests/simulation/test_node_sim_locks.py`)."""

def _install_drops_attachments(view: Any, recs: Any) -> None:
    # BUG: an INSTALL ignores the moved keys' lease attachments (as before moves carried them):
    # a key moved to another group stays there after its lease expired.
    return None


def _no_orphan_sweep(self: OrphanSweep, now_ms: float, term: int, page: Any) -> list[Any]:
    # BUG: no orphan sweep: a key attached in a group a lease's deletion left out (its
    # coordinator's map lagged behind a group added and filled by a move) outlives the lease.
    return []


LEASE_MOVE_BUGS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "node-install-drops-attachments": (machine, "install_attachments", _install_drops_attachments),
    "lease-no-orphan-sweep": (OrphanSweep, "step", _no_orphan_sweep),
}
"""Bugs where leases meet range moves, found by the lease clients with the moves on (`leases.py`'s
end check in the group serving each key; `tests/simulation/test_node_sim_leases.py`)."""

ALL_BUGS = {**BUGS, **NODE_BUGS, **STORAGE_BUGS, **WATCH_BUGS, **TXN_BUGS, **TXN_RANGE_BUGS, **TXN_MODEL_BUGS,
            **LEASE_BUGS, **LEASE_TXN_BUGS, **LEASE_XTXN_BUGS, **LOCK_BUGS, **LEASE_MOVE_BUGS}


@contextmanager
def planted(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    cls, attr, bug = ALL_BUGS[name]
    original = cls.__dict__[attr]
    setattr(cls, attr, bug)
    try:
        yield
    finally:
        setattr(cls, attr, original)
