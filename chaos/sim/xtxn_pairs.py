"""Pair transactions ACROSS groups in the whole-node simulator: the two-phase commit of
`kvstore/node/xtxn.py` driven over the simulated network and Raft groups, with coordinator crashes.

`txn_pairs.TxnPairs` picks some pairs whose two keys are in different groups and hands their
transactions here. One attempt, at a node the client picked (the coordinator):

1. PREPARE in both groups (each proposed at the group's leader, following leader hints); a lock
   (another transaction's intent) or any failure aborts what was prepared and retries later with
   a new id; a lock older than the timeout is resolved first (RESOLVE in its primary, then COMMIT
   or ABORT where it was met) as a real node does.
2. `after_prepare` evaluates at R = max p_g; a read-only transaction releases its intents and is
   answered; otherwise the RECORD in the primary is the commit point; then COMMIT in both groups
   and FINALIZE.

The coordinator *dies* (stops driving the attempt, leaving its intents) with the probabilities
`DIE` after the PREPAREs, after the RECORD, or between the two COMMITs: later attempts on the
pair meet the intents and resolve them once they are older than the timeout. Every answered
transaction goes through `TxnPairs._check` (both keys read equal; the writes at one revision),
and the revision checker (`revisions.py`) records the COMMITs' writes at R, so closed reads and
watches check them too. A planted bug (`node-xtxn-commit-without-record`: the coordinator
commits without writing its record, so a resolver meeting an intent of a coordinator that died
between its COMMITs aborts that group while the other committed) makes pairs differ.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from kvstore import errors
from kvstore.node import xtxn as logic
from kvstore.storage import mvcc, txn, xtxn_apply
from kvstore.storage.commands import ApplyResult
from kvstore.storage.xtxn import Intent, Record, TxnId

DIE = (0.1, 0.1, 0.35)
"""The chance the coordinator dies after the PREPAREs, after the RECORD, between the COMMITs."""
TIMEOUT_MS = 600
"""An intent older than this is resolved by whoever meets it (the simulator's runs are short:
a real node's `logic.TXN_TIMEOUT_MS` is 5 s, `CrossTxns.txn_timeout_ms`)."""
SWEEP_MS = 250
"""Every group leader resolves its expired intents this often (the node's `CrossTxns.sweep`)."""
SEND_TRIES = 4
Answer = Callable[[ApplyResult | None, errors.KVError | None], None]


def commit_point(driver: CrossPairs, node: Any, primary: int, record: bytes, answer: Answer) -> None:
    """The commit point: propose the RECORD in the primary (`chaos/sim/plant.py` replaces this
    with a coordinator that commits without its record)."""
    driver._send(node, primary, record, answer)


class CrossOwner(Protocol):
    """What `CrossPairs` needs of the workload that drives it (`TxnPairs`, `TxnModel`, the lease
    clients' deletions): the simulation, a random stream, and the two callbacks."""

    sim: Any
    rng: random.Random

    def answered_cross(self, t: txn.Txn | None, r: txn.TxnResult, revision: int) -> None: ...

    def finished_record(self) -> None: ...


class CrossPairs:
    """Runs cross-group pair transactions for `TxnPairs` (its `sim`, `rng`, `stats`, `_check`)."""

    def __init__(self, pairs: CrossOwner) -> None:
        self.pairs = pairs
        self.sim = pairs.sim
        self.rng = pairs.rng
        self.died = 0
        self.resolved = 0
        self.finished = 0
        """COMMITTED records the record sweep finished (their coordinator died before FINALIZE)."""
        self.conflicts = 0
        self.released = 0
        """Attempts whose RECORD was refused for certain (intents released at once)."""
        self.resolving: set[TxnId] = set()

    # --- proposing in a group --------------------------------------------------------------
    def _send(self, node: Any, gid: int, data: bytes, answer: Answer, tries: int = 0, wait_ms: int = 0) -> None:
        """Propose `data` in group `gid` at its leader (starting from `node`, following hints);
        `answer(result, error)` once, from the applied result or the last failure. An attempt
        is given up (indeterminate) after `wait_ms` (0: the client timeout: a node's coordinator
        awaits each step's proposal for the whole request timeout; given up after a quarter of
        it, as before issue 17, a step queued behind a slow group's backlog was aborted and the
        transaction retried while its commands were still queued, feeding the backlog)."""
        sim = self.sim
        done = False

        def outcome(res: ApplyResult | None, err: errors.KVError | None, lead: int) -> None:
            nonlocal done
            if done:
                return
            done = True
            if err is None and res is not None:
                if res.revision:
                    sim._clock(node).observe(res.revision)
                answer(res, None)
                return
            if tries + 1 >= SEND_TRIES or (err is not None and err.indeterminate):
                # (an attempt that may still apply is not proposed again: the groups are slow
                # already; what it leaves behind is resolved like a dead coordinator's)
                answer(None, err or errors.Timeout("no result", indeterminate=True))
                return
            nxt = sim.nodes.get(lead) if lead and lead != node.id else None
            if nxt is None or nxt.removed or nxt.logic is None:
                live = [x for x in sim.nodes.values() if not x.removed and x.logic is not None]
                if not live:
                    answer(None, err)
                    return
                nxt = self.rng.choice(live)
            sim.at(self.rng.randrange(5, 40), self._send, nxt, gid, data, answer, tries + 1, wait_ms)

        def lost() -> None:
            outcome(None, errors.Timeout("attempt timed out", indeterminate=True), 0)

        sim.at(wait_ms or sim.p.client_timeout_ms, lost)
        if node.logic is None or gid not in node.logic.host.groups:
            sim.at(1, outcome, None, errors.Unavailable(f"n{node.id} is down or does not host g{gid}"), 0)
            return
        try:
            node.logic.host.propose(gid, data, lambda res, err: outcome(res, err, sim._lead(node, gid)))
        except errors.KVError as err:
            lead = err.leader_id if isinstance(err, errors.NotLeader) else 0
            sim.at(1, outcome, None, err, lead)
            return
        sim._kick(node)

    def _all(self, node: Any, cmds: dict[int, bytes], then: Callable[[dict[int, ApplyResult | None]], None]) -> None:
        """Send every command; `then(results)` once all answered (None: failed)."""
        got: dict[int, ApplyResult | None] = {}

        def one(g: int) -> Answer:
            def answer(res: ApplyResult | None, err: errors.KVError | None) -> None:
                got[g] = res if err is None else None
                if len(got) == len(cmds):
                    then(got)
            return answer

        for g, d in sorted(cmds.items()):
            self._send(node, g, d, one(g))

    def _forget(self, node: Any, cmds: dict[int, bytes]) -> None:
        self._all(node, cmds, lambda _got: None)

    def start_sweep(self) -> None:
        self.sim.at(SWEEP_MS, self._sweep)

    def _sweep(self) -> None:
        """Each live node resolves the expired intents of the data groups it leads, as the
        node's background sweep does (so a dead coordinator's intents nobody meets do not hold
        a range move, a watch or compaction back for ever)."""
        sim = self.sim
        for node, gid in sim.data_leaders():
            rows = [raw for _k, raw in node.store.intents(gid, b"", None, 16)] + node.store.range_locks(gid)
            for raw in rows:
                try:
                    self._meet(node, gid, Intent.decode(raw))
                except ValueError:
                    continue
            before = logic.sweep_before(self._now_ms(node), TIMEOUT_MS)
            for tid, rec in node.store.revisions.read_rows(
                    gid, lambda rows, b=before: xtxn_apply.unfinished(rows, b, logic.RECORD_SWEEP_BATCH)):
                self._finish(node, gid, tid, rec)
        sim.at(SWEEP_MS, self._sweep)

    def _finish(self, node: Any, primary: int, tid: TxnId, rec: Record) -> None:
        """The record sweep (`CrossTxns.finish`): a COMMITTED record older than the timeout whose
        coordinator died before its FINALIZE gets every participant's COMMIT again, then FINALIZE."""
        if tid in self.resolving:
            return
        self.resolving.add(tid)

        def committed(got: dict[int, ApplyResult | None]) -> None:
            if any(r is None for r in got.values()):
                self.resolving.discard(tid)
                return

            def finalized(res: ApplyResult | None, err: errors.KVError | None) -> None:
                self.resolving.discard(tid)
                if res is not None and err is None:
                    self.finished += 1
                    self.pairs.finished_record()

            self._send(node, primary, logic.finalize_command(tid), finalized)

        self._all(node, logic.finish_commands(tid, rec), committed)

    def _now_ms(self, node: Any) -> int:
        return mvcc.revision_ms(self.sim._clock(node).propose())

    # --- one attempt -------------------------------------------------------------------------
    def attempt(self, node: Any, t: txn.Txn | None, groups: dict[bytes, int], n: int, retry: Callable[[int], None],
                lock: tuple[bytes, bytes] | None = None, plan: logic.Plan | None = None,
                ended: Callable[[], None] | None = None) -> None:
        """One attempt of `t` (None: a range delete of `lock`, over every data group of `node`'s
        map, as is a `t` with range deletes, `logic.plan_ranges`; or `plan`: a lease's deletion,
        `logic.plan_lease`) coordinated at `node`;
        `retry(n + 1)` to try again later. Exactly one of the two follows every attempt:
        `retry(n + 1)`, or `ended()` once the transaction is over for its client (answered, or
        its outcome left to the resolvers: the coordinator died, or its RECORD's fate is
        unknown), so a workload can bound how many of its transactions are in flight."""

        def over() -> None:
            if ended is not None:
                ended()

        if plan is not None:
            p = plan
        elif t is None or txn.has_delete_range(t):  # a range delete, alone or in a transaction: every group
            smap = node.logic.shard_tracker.map if node.logic is not None else None
            if smap is None:
                retry(n + 1)
                return
            data_groups = [g for g in smap.data_groups() if g != 0]
            if t is None:
                assert lock is not None
                p = logic.plan_range(data_groups, *lock)
            else:
                p = logic.plan_ranges(t, ((k, groups[k]) for k, _ in txn.keys_of(t)), data_groups)
        else:
            p = logic.plan(t, ((k, groups[k]) for k, _ in txn.keys_of(t)))
        clock = self.sim._clock(node)
        tid = TxnId(node.id, self.rng.getrandbits(64))
        start = clock.propose()
        cmds = logic.prepare_commands(p, tid, start, clock.propose())

        def prepared(got: dict[int, ApplyResult | None]) -> None:
            results = {g: r for g, r in got.items() if r is not None}
            if len(results) < len(got):
                self._forget(node, logic.abort_commands(tid, got))
                retry(n + 1)
                return
            decision = logic.after_prepare(t, p, results) if t is not None else logic.after_prepare_range(p, results)
            if isinstance(decision, logic.Conflict):
                self.conflicts += 1
                self._forget(node, logic.abort_commands(tid, [g for g, r in results.items() if r.error is None]))
                self._meet(node, decision.group, decision.intent)
                retry(n + 1)
                return
            if isinstance(decision, logic.Refused):
                self._forget(node, logic.abort_commands(tid, got))
                retry(n + 1)
                return
            if not decision.writes_anything and not p.lease:
                self._forget(node, logic.abort_commands(tid, got))
                self.pairs.answered_cross(t, decision.result, decision.result.revision)
                over()
                return
            if self._dies(0):
                over()
                return
            record = logic.record_command(tid, start, decision, lease=p.lease, renews=p.renews)
            commit_point(self, node, p.primary, record,
                         lambda res, err: committed(decision, res if err is None else None, err))

        def committed(r: logic.Ready, res: ApplyResult | None, err: errors.KVError | None) -> None:
            if res is None:
                if err is not None and not err.indeterminate:
                    # The RECORD was definitely not applied (every try refused: no leader there,
                    # not a member): nothing is committed, so the coordinator releases its intents
                    # now, as the node's does (`CrossTxns._record` answers Aborted, then
                    # `_release`), instead of leaving them to the resolvers' timeout.
                    self.released += 1
                    self._forget(node, logic.abort_commands(tid, p.keys))
                    retry(n + 1)
                    return
                over()  # the commit point's outcome is unknown here: resolvers settle it
                return
            out = logic.after_record(tid, res)
            if isinstance(out, logic.Aborted):
                self._forget(node, logic.abort_commands(tid, p.keys))
                retry(n + 1)
                return
            if self._dies(1):
                over()
                return
            commits = logic.commit_commands(tid, r, p.keys)
            first, *rest = sorted(commits)
            ok: dict[int, bool] = {}

            def committed_in(g: int) -> Answer:
                def answer(res: ApplyResult | None, err: errors.KVError | None) -> None:
                    ok[g] = err is None and res is not None and res.error is None
                    if len(ok) == len(commits) and all(ok.values()):
                        # FINALIZE only once every participant applied its COMMIT (a group left
                        # with intents needs the record's writes to resolve them)
                        self._send(node, p.primary, logic.finalize_command(tid), lambda _res, _err: None)
                return answer

            self._send(node, first, commits[first], committed_in(first))
            if self._dies(2):
                over()
                return
            for g in rest:
                self._send(node, g, commits[g], committed_in(g))
            self.pairs.answered_cross(t, r.result, r.at)
            over()

        self._all(node, cmds, prepared)

    def _dies(self, point: int) -> bool:
        """Whether the coordinator dies here (only while the faults run, like every other fault:
        a dead coordinator's intents hold its groups' watch frontier until they are resolved, a
        timeout later, which the liveness checks after the heal do not allow for)."""
        if self.rng.random() < DIE[point] and self.sim._faults_on():
            self.died += 1
            return True
        return False

    def _meet(self, node: Any, group: int, intent: Intent) -> None:
        """An intent met in `group`: resolve it if it is older than the timeout."""
        if not logic.expired(intent, self._now_ms(node), TIMEOUT_MS) or intent.txn in self.resolving:
            return
        self.resolving.add(intent.txn)

        def resolved(res: ApplyResult | None, err: errors.KVError | None) -> None:
            follow = logic.resolution(intent, group, res) if res is not None and err is None else None
            if follow is None:
                self.resolving.discard(intent.txn)
                return
            self.resolved += 1
            assert follow is not None

            def applied(res2: ApplyResult | None, err2: errors.KVError | None) -> None:
                self.resolving.discard(intent.txn)
                done = logic.finalize_after(intent, group, follow) if res2 is not None and res2.error is None else None
                if done is not None and err2 is None:
                    self._send(node, intent.primary, done, lambda _res, _err: None)

            self._send(node, group, follow, applied, wait_ms=self.sim.p.client_timeout_ms)

        # A resolver's step waits for its command as long as the node's does (`CrossTxns._resolve`
        # awaits the proposal for the whole request timeout): given up after a quarter of it, a
        # RESOLVE stuck behind a slow group's backlog was proposed again by every sweep round,
        # each copy applied but unanswered, and the copies kept the group too busy to catch up.
        self._send(node, intent.primary, logic.resolve_command(intent), resolved, wait_ms=self.sim.p.client_timeout_ms)
